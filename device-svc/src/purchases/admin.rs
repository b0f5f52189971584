//! An operator's decisions about an order that the cabinet cannot finish on its own: cancel an
//! order whose door has not opened, and force-close an order whose door never reported closed,
//! saying what the operator saw at the cabinet. Each is a transition of the state machine like
//! any other (the order row locked, the state it starts from checked, the cause
//! `operator:<name>` recorded), its audit row carries the operator's reason, and a retry of the
//! same decision (after an answer lost) is answered with the order as it is.
//!
//! Settling an order in review is [`super::settlement::settle_by_operator`]; refunds, charges
//! and waivers are [`super::money`].

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use super::anomalies::{self, NewAnomaly};
use super::orders::{self, Changes, Due, Order};
use super::{State, lock, settlement};
use crate::app::App;
use crate::clock::now_ms;
use crate::error::StoreError;

/// Why an operator acts, as every decision names it.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// Who (a person's name or id; the API key says which key).
    pub operator: String,
    /// Why, in the operator's words (kept in the audit trail and the order's reason).
    pub reason: String,
}

impl Decision {
    fn check(&self) -> Result<(), StoreError> {
        if self.operator.is_empty() || self.operator.len() > 128 || self.operator.chars().any(char::is_control) {
            return Err(StoreError::invalid("operator", "1 to 128 characters, no control characters"));
        }
        if self.reason.is_empty() || self.reason.len() > 256 || self.reason.contains('\0') {
            return Err(StoreError::invalid("reason", "1 to 256 characters"));
        }
        crate::auth::audit::note_reason(&format!("{}: {}", self.operator, self.reason));
        Ok(())
    }

    fn cause(&self) -> String {
        format!("operator:{}", self.operator)
    }
}

/// What the operator saw of the door when force-closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DoorSeen {
    /// Shut: the order settles by the weights, as after a close event.
    Closed,
    /// Open (a broken lock or sensor): the goods cannot be judged by the weights.
    Open,
}

/// The body of a force-close.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForceClose {
    /// Who and why.
    #[serde(flatten)]
    pub decision: Decision,
    /// What the operator saw.
    pub door: DoorSeen,
}

/// The anomaly an operator's force-close of an open door raises.
pub const FORCE_CLOSED_OPEN: &str = "force_closed_door_open";
/// The review flag of a force-closed order.
pub const FORCE_CLOSED: &str = "force_closed";

/// Cancels an order whose door has not been asked to open (`created` or `authorised`),
/// releasing its user and its door.
///
/// # Errors
/// `Invalid` (operator, reason), `NotFound`, `Rejected("door_opening")` once the open command
/// may have reached the cabinet (force-close it when the door's state is known),
/// `Rejected("not_cancellable")` for an order past that, or storage errors.
pub async fn cancel(app: &App, id: &str, d: &Decision) -> Result<Order, StoreError> {
    d.check()?;
    let changes =
        Changes { reason: Some("operator_cancelled".into()), door_state: Some("closed"), ..Changes::default() };
    let from = [State::Created, State::Authorised];
    if let Some(order) = orders::transition_now(app, id, &from, State::Cancelled, &d.cause(), changes).await? {
        lock::release_quietly(app, order.door(), &order.lock_token).await;
        tracing::info!(order = %id, operator = %d.operator, "order cancelled by an operator");
        return Ok(order);
    }
    let now = orders::get(app, id).await?;
    match now.state {
        State::Cancelled if now.reason.as_deref() == Some("operator_cancelled") => Ok(now),
        State::DoorOpening => Err(StoreError::rejected(
            "door_opening",
            format!("order {id}'s open command may have reached the cabinet: force-close it once the door is seen"),
        )),
        s => Err(StoreError::rejected("not_cancellable", format!("order {id} is {}", s.as_str()))),
    }
}

/// Ends an order whose door never reported closed (`door_opening` or `door_open`), with the
/// door state the operator saw: `closed` settles by the weights as a close event would (the
/// order flagged `force_closed` for review); `open` sends it to review (`abnormal`, reason
/// `force_closed_door_open`, an anomaly) and takes the door out of sale until a restock.
///
/// # Errors
/// `Invalid`, `NotFound`, `Rejected("not_open")` for an order in another state, or storage
/// errors.
pub async fn force_close(app: &App, id: &str, f: &ForceClose) -> Result<Order, StoreError> {
    f.decision.check()?;
    let from = [State::DoorOpening, State::DoorOpen];
    let cause = f.decision.cause();
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let moved = match f.door {
        DoorSeen::Closed => {
            let changes = Changes {
                door_state: Some("closed"),
                closed_ms: Some(i64::try_from(now_ms()).unwrap_or(i64::MAX)),
                review: Some(FORCE_CLOSED),
                due: Some(Due::In(Duration::from_secs(app.config.purchases.settle_wait_s))),
                ..Changes::default()
            };
            orders::transition(&tx, id, &from, State::DoorClosed, &cause, changes).await?
        }
        DoorSeen::Open => {
            let changes = Changes {
                door_state: Some("abnormal"),
                reason: Some(FORCE_CLOSED_OPEN.into()),
                review: Some(FORCE_CLOSED),
                ..Changes::default()
            };
            let moved = orders::transition(&tx, id, &from, State::Abnormal, &cause, changes).await?;
            if let Some(order) = &moved {
                tx.execute(
                    "UPDATE doors SET out_of_sale = $3 WHERE cabinet_id = $1 AND door_id = $2",
                    &[&order.cabinet_id, &i16::from(order.door_id), &format!("{FORCE_CLOSED_OPEN}:{id}")],
                )
                .await?;
                let detail =
                    json!({"operator": f.decision.operator, "reason": f.decision.reason, "goods": order.goods});
                let a = NewAnomaly::of_order(FORCE_CLOSED_OPEN, format!("force_closed:{id}"), order, detail);
                anomalies::record(app, &tx, &a).await?;
            }
            moved
        }
    };
    crate::auth::audit::commit(tx).await?;
    drop(client);
    let Some(order) = moved else {
        let now = orders::get(app, id).await?;
        let same = now.review.iter().any(|r| r == FORCE_CLOSED)
            && match f.door {
                DoorSeen::Closed => now.door_state == "closed",
                DoorSeen::Open => now.reason.as_deref() == Some(FORCE_CLOSED_OPEN),
            };
        if same {
            return Ok(now);
        }
        return Err(StoreError::rejected("not_open", format!("order {id} is {}", now.state.as_str())));
    };
    app.metrics.order_transitions.with_label_values(&[order.state.as_str()]).inc();
    app.purchase_wakers.relay.notify_one();
    tracing::info!(order = %id, operator = %f.decision.operator, door = ?f.door, "order force-closed by an operator");
    if order.state == State::DoorClosed {
        settlement::try_settle(app, id, false).await?;
        return orders::get(app, id).await;
    }
    Ok(order)
}
