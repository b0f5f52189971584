//! Opening the door of an authorised order. First the goods behind the door are snapshotted
//! (product, price, unit weight and the last stable weight of each lane): the settlement
//! compares against that snapshot, and an order whose lanes have no known weight is cancelled
//! before the door opens, since nobody could tell what was taken. Then `OPEN_DOOR` goes to the
//! cabinet; without an answer its door state is queried up to `door_queries` times; still
//! nothing, and the order is cancelled with the door state *abnormal* and an operator notice
//! (the documents' problem 1). Every attempt is counted in the row, so an instance that takes
//! the order over after a crash continues the count instead of starting again. A door event
//! may move the order meanwhile; the loop stops as soon as it sees that.

use std::collections::HashMap;
use std::time::Duration;

use protocol::DeviceId;
use protocol::OrderId;
use protocol::bus::{CommandBody, DeviceKey, Outcome};
use protocol::cabinet::{CommandAction, CommandStatus, DoorStatus};
use serde_json::json;

use super::State;
use super::anomalies::{self, NewAnomaly, kind};
use super::lock;
use super::orders::{self, Changes, Due, Order};
use super::reckon::GoodsLane;
use crate::app::{App, now_ms};
use crate::error::StoreError;
use crate::weights;

/// How long a driver may hold an order while opening its door before another instance may
/// take it over: every attempt's deadline and pause, plus slack.
pub fn lease(app: &App) -> Duration {
    let p = &app.config.purchases;
    let attempts = u64::from(p.door_queries) + 1;
    Duration::from_millis(attempts * (p.open_timeout_ms + 1000) + u64::from(p.door_queries) * p.query_interval_ms)
        + Duration::from_secs(10)
}

/// The lanes behind the order's door as they are now. `Ok(None)`: a lane that holds a product
/// has no stable weight taken after the door's last close (the shelf may have changed since,
/// so nobody could tell what this order takes).
async fn snapshot(app: &App, order: &Order) -> Result<Option<Vec<GoodsLane>>, StoreError> {
    let client = app.pg.get().await?;
    let last_close: Option<i64> = client
        .query_one(
            "SELECT max(closed_ms) FROM orders WHERE cabinet_id = $1 AND door_id = $2 AND id <> $3",
            &[&order.cabinet_id, &i16::from(order.door_id), &order.id],
        )
        .await?
        .get(0);
    let fresh_after = u64::try_from(last_close.unwrap_or(0)).unwrap_or(0);
    let rows = client
        .query(
            "SELECT l.lane_id, l.product_id, p.unit_grams, COALESCE(l.price_cents, p.price_cents)
               FROM lanes l JOIN products p ON p.id = l.product_id
              WHERE l.cabinet_id = $1 AND l.door_id = $2 ORDER BY l.lane_id",
            &[&order.cabinet_id, &i16::from(order.door_id)],
        )
        .await?;
    let cached: HashMap<u8, weights::LaneWeight> = weights::current(app, &order.cabinet_id)
        .await?
        .into_iter()
        .filter(|w| w.door_id == order.door_id)
        .map(|w| (w.lane_id, w))
        .collect();
    let mut goods = Vec::with_capacity(rows.len());
    for r in rows {
        let lane_id = u8::try_from(r.get::<_, i16>(0)).unwrap_or(0);
        let Some(w) = cached.get(&lane_id).filter(|w| w.sample_ms > fresh_after) else { return Ok(None) };
        goods.push(GoodsLane {
            lane_id,
            product_id: r.get(1),
            unit_grams: r.get(2),
            price_cents: r.get(3),
            grams_before: w.grams,
            sample_ms: w.sample_ms,
        });
    }
    Ok(Some(goods))
}

/// Marks the door open (from the cabinet's result, a query, or its door event).
///
/// # Errors
/// Storage errors.
pub async fn mark_open(app: &App, id: &str, cause: &str, opened_ms: Option<i64>) -> Result<Option<Order>, StoreError> {
    let changes = Changes {
        door_state: Some("open"),
        opened_ms,
        due: Some(Due::In(Duration::from_secs(app.config.purchases.door_open_max_s))),
        ..Changes::default()
    };
    let moved =
        orders::transition_now(app, id, &[State::Authorised, State::DoorOpening], State::DoorOpen, cause, changes)
            .await?;
    if let Some(t) = moved.as_ref().and_then(|o| o.authorised_ms) {
        app.metrics.door_open_seconds.observe(now_ms().saturating_sub(t) as f64 / 1000.0);
    }
    Ok(moved)
}

/// Cancels an order whose door did not open, releasing the lock.
async fn cancel(
    app: &App,
    order: &Order,
    reason: &str,
    door_state: &'static str,
    silent: bool,
) -> Result<(), StoreError> {
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let changes = Changes { door_state: Some(door_state), reason: Some(reason.into()), ..Changes::default() };
    let moved =
        orders::transition(&tx, &order.id, &[State::Authorised, State::DoorOpening], State::Cancelled, reason, changes)
            .await?;
    if moved.is_some() && silent {
        let detail = json!({"attempts": order.open_attempts, "goods": order.goods});
        let a = NewAnomaly::of_order(kind::CABINET_SILENT, format!("silent:{}", order.id), order, detail);
        anomalies::record(app, &tx, &a).await?;
    }
    tx.commit().await?;
    if moved.is_some() {
        app.metrics.order_transitions.with_label_values(&["cancelled"]).inc();
        lock::release_quietly(app, order.door(), &order.lock_token).await;
        app.purchase_wakers.relay.notify_one();
        tracing::info!(order = %order.id, reason, "order cancelled before the door opened");
    }
    Ok(())
}

/// Counts one more attempt; `None` once the order left `door_opening` (an event moved it).
async fn next_attempt(app: &App, id: &str) -> Result<Option<i32>, StoreError> {
    let client = app.pg.get().await?;
    let row = client
        .query_opt(
            "UPDATE orders SET open_attempts = open_attempts + 1 WHERE id = $1 AND state = 'door_opening'
             RETURNING open_attempts",
            &[&id],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Drives an authorised (or half-opened) order until its door is open or it is cancelled.
///
/// # Errors
/// Storage errors; the order stays claimed until its lease ends and is then retried.
pub async fn open_door(app: &App, order: Order) -> Result<(), StoreError> {
    let mut order = order;
    if order.state == State::Authorised {
        let Some(goods) = snapshot(app, &order).await? else {
            return cancel(app, &order, "weights_unknown", "closed", false).await;
        };
        let goods = serde_json::to_value(&goods).map_err(|e| StoreError::invalid("goods", e.to_string()))?;
        let changes = Changes { door_state: Some("opening"), goods: Some(goods), ..Changes::default() };
        match orders::transition_now(app, &order.id, &[State::Authorised], State::DoorOpening, "opening", changes)
            .await?
        {
            Some(o) => order = o,
            None => return Ok(()),
        }
    }
    if order.state != State::DoorOpening {
        return Ok(());
    }
    let p = app.config.purchases.clone();
    let cabinet = DeviceId::new(&order.cabinet_id).map_err(|e| StoreError::invalid("cabinet_id", e.to_string()))?;
    let device = DeviceKey::Cabinet(cabinet);
    let order_id = OrderId::new(&order.id).map_err(|e| StoreError::invalid("order_id", e.to_string()))?;
    let max_attempts = i32::try_from(p.door_queries).unwrap_or(i32::MAX).saturating_add(1);
    // An earlier run of this order (an instance that stopped mid-opening) may have sent the
    // open: then only ask, since a query cannot open a door late. Within this run the open is
    // sent again while Redis refused to take it (it never reached the cabinet; a repeated open
    // is harmless anyway, the cabinet answers OK for the same order).
    let mut open_sent = order.open_attempts > 0;
    loop {
        let Some(attempt) = next_attempt(app, &order.id).await? else { return Ok(()) };
        order.open_attempts = attempt;
        if attempt > max_attempts {
            return cancel(app, &order, "cabinet_silent", "abnormal", true).await;
        }
        if attempt > 1 {
            tokio::time::sleep(Duration::from_millis(p.query_interval_ms)).await;
        }
        let opening = !open_sent;
        let action = if opening {
            CommandAction::OpenDoor { door_id: order.door_id, order_id: order_id.clone() }
        } else {
            CommandAction::QueryDoor { door_id: order.door_id }
        };
        let sent =
            app.commander.send(&device, CommandBody::Cabinet(action), Duration::from_millis(p.open_timeout_ms)).await;
        let outcome = match sent {
            Ok(outcome) => outcome,
            Err(StoreError::Redis(e)) => {
                tracing::warn!(order = %order.id, attempt, error = %e, "door command not sent; Redis refused it");
                continue;
            }
            Err(e) => return Err(e),
        };
        open_sent = true;
        match outcome {
            Outcome::Cabinet(r) if r.status == CommandStatus::Ok && (opening || r.door_state == DoorStatus::Open) => {
                let cause = if opening { "open_result" } else { "query_open" };
                mark_open(app, &order.id, cause, None).await?;
                return Ok(());
            }
            Outcome::Cabinet(r) if r.status == CommandStatus::Ok && r.door_state == DoorStatus::Closed => {
                return cancel(app, &order, "door_not_opened", "closed", false).await;
            }
            Outcome::Cabinet(r) if r.status != CommandStatus::Ok => {
                let reason = format!("door_failed:{:?}", r.status).to_lowercase();
                return cancel(app, &order, &reason, "closed", false).await;
            }
            Outcome::Invalid(why) => {
                tracing::warn!(order = %order.id, why, "open-door command refused as invalid");
                return cancel(app, &order, "command_invalid", "closed", false).await;
            }
            // No answer, an unknown door state, a busy queue, a cabinet between connections:
            // ask again.
            Outcome::Cabinet(_)
            | Outcome::TimedOut
            | Outcome::NotConnected
            | Outcome::Busy
            | Outcome::Delivered
            | Outcome::Vehicle(_) => {
                tracing::debug!(order = %order.id, attempt, outcome = outcome.label(), "door not confirmed yet");
            }
        }
    }
}
