//! Door events from the cabinets (SPEC.md 1.5 `DOOR_EVENT`), as the stream consumer hands
//! them over. The order is found by the order id the cabinet repeats, or else as the door's
//! running order. Nothing is dropped: an event no order explains becomes an anomaly, except
//! during a restock, when an operator opens doors without orders.
//!
//! A close event for an order that never reached "door open" (the open result was lost or is
//! still on its way: the documents' problem 2) is applied anyway: the order is settled from
//! the weights like any other and flagged for review.

use std::time::Duration;

use protocol::DeviceId;
use protocol::cabinet::{DoorEvent, DoorState};
use serde_json::json;

use super::anomalies::{self, NewAnomaly, kind};
use super::orders::{self, COLUMNS, Changes, Due, Order};
use super::{State, opening, restock, settlement};
use crate::app::App;
use crate::error::StoreError;

async fn find_order(app: &App, cabinet: &str, event: &DoorEvent) -> Result<Option<Order>, StoreError> {
    let client = app.pg.get().await?;
    let door = i16::from(event.door_id);
    let row = match &event.order_id {
        Some(id) => {
            client
                .query_opt(
                    &format!("SELECT {COLUMNS} FROM orders WHERE id = $1 AND cabinet_id = $2 AND door_id = $3"),
                    &[&id.as_str(), &cabinet, &door],
                )
                .await?
        }
        None => {
            client
                .query_opt(
                    &format!(
                        "SELECT {COLUMNS} FROM orders WHERE cabinet_id = $1 AND door_id = $2
                            AND state IN ('created', 'authorised', 'door_opening', 'door_open', 'door_closed')"
                    ),
                    &[&cabinet, &door],
                )
                .await?
        }
    };
    Ok(row.as_ref().map(Order::from_row))
}

fn event_json(event: &DoorEvent) -> serde_json::Value {
    json!({
        "door_id": event.door_id,
        "state": if event.state == DoorState::Open { "open" } else { "closed" },
        "event_time_ms": event.event_time_ms,
        "order_id": event.order_id.as_ref().map(|o| o.as_str().to_owned()),
    })
}

/// What identifies a door event (SPEC.md 1.7 `DOOR_EVENT`): cabinet, door, state and event
/// time. A retransmission, the same event re-sent with a new seq after a reconnect, and a
/// redelivered stream entry all share it, so an anomaly recorded under it (with its kind: one
/// event may explain anomalies of different kinds) is recorded once.
fn event_key(cabinet: &str, event: &DoorEvent) -> String {
    let state = if event.state == DoorState::Open { "open" } else { "closed" };
    format!("door_event:{cabinet}:{}:{state}:{}", event.door_id, event.event_time_ms)
}

/// Applies a door event. Applying the same event (by [`event_key`]) again changes nothing.
/// Returns the consumer's result label.
///
/// # Errors
/// Storage errors (the entry is then retried).
pub async fn on_door_event(app: &App, cabinet: &DeviceId, event: &DoorEvent) -> Result<&'static str, StoreError> {
    let cabinet = cabinet.as_str();
    let key = event_key(cabinet, event);
    let source = |kind: &str| format!("{kind}:{key}");
    let Some(order) = find_order(app, cabinet, event).await? else {
        if restock::is_running(app, cabinet, event.door_id).await? {
            return Ok("restock");
        }
        let a = NewAnomaly {
            kind: kind::EVENT_WITHOUT_ORDER,
            source: source(kind::EVENT_WITHOUT_ORDER),
            order_id: None,
            cabinet_id: cabinet,
            door_id: event.door_id,
            detail: json!({"event": event_json(event)}),
        };
        anomalies::record_now(app, &a).await?;
        return Ok("anomaly");
    };
    let event_ms = i64::try_from(event.event_time_ms).unwrap_or(i64::MAX);
    match (event.state, order.state) {
        (DoorState::Open, State::Authorised | State::DoorOpening) => {
            opening::mark_open(app, &order.id, "door_opened_event", Some(event_ms)).await?;
            Ok("applied")
        }
        (DoorState::Open, State::DoorOpen | State::DoorClosed) => {
            // The event after the command's result (or a redelivery): record the time only.
            let client = app.pg.get().await?;
            client
                .execute("UPDATE orders SET opened_ms = COALESCE(opened_ms, $2) WHERE id = $1", &[&order.id, &event_ms])
                .await?;
            Ok("unchanged")
        }
        (DoorState::Closed, State::DoorOpen) => {
            closed(app, &order, event_ms, None).await?;
            Ok("applied")
        }
        (DoorState::Closed, State::DoorOpening | State::Authorised) => {
            closed(app, &order, event_ms, Some(&source(kind::CLOSE_BEFORE_OPEN))).await?;
            Ok("applied")
        }
        (DoorState::Closed, State::DoorClosed) => Ok("unchanged"),
        // A late or redelivered event of the purchase that already ended: nothing new.
        (_, State::Settled | State::Abnormal) if order.closed_ms.is_some_and(|c| event_ms <= c) => Ok("unchanged"),
        // The door moved for an order not authorised, or one already finished (cancelled
        // after the cabinet stayed silent, yet the door did open): goods may have left.
        (_, State::Created | State::Settled | State::Cancelled | State::Abnormal) => {
            let k = if order.state == State::Created { kind::EVENT_WITHOUT_ORDER } else { kind::EVENT_AFTER_END };
            let detail = json!({"event": event_json(event), "order_state": order.state, "goods": order.goods});
            let a = NewAnomaly::of_order(k, source(k), &order, detail);
            anomalies::record_now(app, &a).await?;
            Ok("anomaly")
        }
    }
}

/// Moves the order to `door_closed` and tries to settle at once. `early`: the anomaly source of a close
/// event that came before the door was known open (flagged, recorded as an anomaly).
async fn closed(app: &App, order: &Order, event_ms: i64, early: Option<&str>) -> Result<(), StoreError> {
    let wait = Duration::from_secs(app.config.purchases.settle_wait_s);
    let changes = Changes {
        door_state: Some("closed"),
        closed_ms: Some(event_ms),
        review: early.map(|_| kind::CLOSE_BEFORE_OPEN),
        due: Some(Due::In(wait)),
        ..Changes::default()
    };
    let from = [State::Authorised, State::DoorOpening, State::DoorOpen];
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let moved = orders::transition(&tx, &order.id, &from, State::DoorClosed, "door_closed_event", changes).await?;
    if let (Some(_), Some(entry)) = (&moved, early) {
        let detail = json!({"order_state": order.state, "goods": order.goods});
        let a = NewAnomaly::of_order(kind::CLOSE_BEFORE_OPEN, entry.to_owned(), order, detail);
        anomalies::record(app, &tx, &a).await?;
    }
    tx.commit().await?;
    if moved.is_some() {
        app.metrics.order_transitions.with_label_values(&["door_closed"]).inc();
        app.purchase_wakers.relay.notify_one();
        settlement::try_settle(app, &order.id, false).await?;
    }
    Ok(())
}
