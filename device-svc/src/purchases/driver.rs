//! The order driver: every timer of a purchase is the order's `due_at` in PostgreSQL, so a
//! timer survives any restart and is fired by exactly one instance. Each poll claims the due
//! orders with `FOR UPDATE SKIP LOCKED` and pushes their `due_at` one lease ahead in the same
//! statement; the claiming instance then acts, and the action moves `due_at` on. An instance
//! that dies mid-action leaves the lease to run out, and another instance takes the order; an
//! action that failed on PostgreSQL or Redis makes its order due again a second later.
//!
//! What "due" means depends on the state:
//! - `created`: the authorisation deadline passed: cancel (the delayed cancellation);
//! - `authorised` / `door_opening`: open the door ([`opening`]);
//! - `door_open`: open longer than `door_open_max_s`: tell operators once; still open at
//!   `door_never_closed_s`: the order to review, its user released, the door out of sale;
//! - `door_closed`: the settlement wait is over: settle or send to review.
//!
//! The driver also renews the door locks of running orders and restocks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::anomalies::{self, NewAnomaly, kind};
use super::orders::{self, COLUMN_COUNT, COLUMNS, Order};
use super::{State, lock, opening, settlement};
use crate::app::App;
use crate::error::StoreError;

/// Orders claimed per poll.
const CLAIM: i64 = 100;

/// Claims the due orders for one lease; each with the lease's end as stored (its `due_at`).
async fn claim(app: &App) -> Result<Vec<(Order, SystemTime)>, StoreError> {
    let lease_ms = opening::lease(app).as_millis() as f64;
    let client = app.pg.get().await?;
    let rows = client
        .query(
            &format!(
                "UPDATE orders SET due_at = now() + make_interval(secs => $2::float8 / 1000)
                  WHERE id IN (SELECT id FROM orders WHERE due_at <= now() ORDER BY due_at LIMIT $1
                               FOR UPDATE SKIP LOCKED)
                  RETURNING {COLUMNS}, due_at"
            ),
            &[&CLAIM, &lease_ms],
        )
        .await?;
    Ok(rows.iter().map(|r| (Order::from_row(r), r.get::<_, SystemTime>(COLUMN_COUNT))).collect())
}

/// Does what a due order needs.
async fn act(app: &App, order: Order) -> Result<(), StoreError> {
    match order.state {
        State::Created => {
            orders::expire_unauthorised(app, &order.id).await?;
        }
        State::Authorised | State::DoorOpening => opening::open_door(app, order).await?,
        State::DoorOpen => {
            let detail = json!({"opened_ms": order.opened_ms, "goods": order.goods});
            let a = NewAnomaly::of_order(kind::DOOR_LEFT_OPEN, format!("left_open:{}", order.id), &order, detail);
            if anomalies::record_now(app, &a).await? {
                // The first limit: operators are told; the second is timed from here.
                let p = &app.config.purchases;
                let wait_ms = (p.door_never_closed_s - p.door_open_max_s) as f64 * 1000.0;
                let client = app.pg.get().await?;
                client
                    .execute(
                        "UPDATE orders SET due_at = now() + make_interval(secs => $2::float8 / 1000)
                          WHERE id = $1 AND state = 'door_open'",
                        &[&order.id, &wait_ms],
                    )
                    .await?;
            } else {
                never_closed(app, &order).await?;
            }
        }
        State::DoorClosed => {
            settlement::try_settle(app, &order.id, true).await?;
        }
        State::Settled | State::Cancelled | State::Abnormal => {
            let client = app.pg.get().await?;
            client.execute("UPDATE orders SET due_at = NULL WHERE id = $1", &[&order.id]).await?;
        }
    }
    Ok(())
}

/// The second limit: the door was never reported closed. The order goes to review (releasing its
/// user, who may buy elsewhere), the door out of sale until an operator restocks it, and
/// operators are told, all in one transaction.
async fn never_closed(app: &App, order: &Order) -> Result<(), StoreError> {
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let changes = orders::Changes {
        reason: Some(kind::DOOR_NEVER_CLOSED.into()),
        door_state: Some("abnormal"),
        ..orders::Changes::default()
    };
    let moved =
        orders::transition(&tx, &order.id, &[State::DoorOpen], State::Abnormal, kind::DOOR_NEVER_CLOSED, changes)
            .await?;
    if moved.is_some() {
        tx.execute(
            "UPDATE doors SET out_of_sale = $3 WHERE cabinet_id = $1 AND door_id = $2",
            &[&order.cabinet_id, &i16::from(order.door_id), &format!("{}:{}", kind::DOOR_NEVER_CLOSED, order.id)],
        )
        .await?;
        let detail = json!({"opened_ms": order.opened_ms, "goods": order.goods});
        let a = NewAnomaly::of_order(kind::DOOR_NEVER_CLOSED, format!("never_closed:{}", order.id), order, detail);
        anomalies::record(app, &tx, &a).await?;
    }
    tx.commit().await?;
    if moved.is_some() {
        app.metrics.order_transitions.with_label_values(&[State::Abnormal.as_str()]).inc();
        app.purchase_wakers.relay.notify_one();
        tracing::warn!(order = %order.id, cabinet = %order.cabinet_id, door = order.door_id, "door never reported closed; order to review, door out of sale");
    }
    Ok(())
}

/// Runs until `stop`: claims due orders at every poll (or at once when woken) and acts on each
/// in a task of its own; renews door locks every third of their TTL.
pub async fn run(app: Arc<App>, stop: CancellationToken) {
    let poll = Duration::from_millis(app.config.purchases.poll_ms);
    let renew_every = Duration::from_secs(app.config.purchases.lock_ttl_s) / 3;
    let mut last_renew = tokio::time::Instant::now();
    let tasks = TaskTracker::new();
    // The orders being acted on and the ends of their leases, handed back at a graceful stop.
    let in_hand: Arc<std::sync::Mutex<HashMap<String, SystemTime>>> = Arc::default();
    while !stop.is_cancelled() {
        match claim(&app).await {
            Ok(due) => {
                for (order, lease) in due {
                    let (app, stop, in_hand) = (Arc::clone(&app), stop.clone(), Arc::clone(&in_hand));
                    tasks.spawn(async move {
                        let id = order.id.clone();
                        in_hand.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(id.clone(), lease);
                        tokio::select! {
                            result = act(&app, order) => match result {
                                // A store that failed stops the action between two stored
                                // steps, as a stop does: the order is handed back to be tried
                                // again soon, not held for the rest of its lease (Redis
                                // restarting within every lease held it for minutes).
                                Err(e @ (StoreError::Redis(_) | StoreError::Postgres(_) | StoreError::Pool(_))) => {
                                    app.metrics.order_action_failures.inc();
                                    match retry_soon(&app, &id, lease).await {
                                        Ok(n) => tracing::warn!(order = %id, error = %e, soon = n == 1, "failed to act on a due order; retried"),
                                        Err(again) => tracing::warn!(order = %id, error = %e, %again, "failed to act on a due order; retried after its lease"),
                                    }
                                }
                                Err(e) => tracing::warn!(order = %id, error = %e, "failed to act on a due order; retried after its lease"),
                                Ok(()) => {}
                            },
                            // Every step is stored as it is made: stopping between two is safe;
                            // the order is handed back below (or, after a crash, taken over
                            // when its lease ends).
                            () = stop.cancelled() => return,
                        }
                        in_hand.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id);
                    });
                }
            }
            Err(e) => tracing::warn!(error = %e, "failed to claim due orders"),
        }
        if last_renew.elapsed() >= renew_every {
            last_renew = tokio::time::Instant::now();
            if let Err(e) = lock::renew_all(&app).await {
                tracing::warn!(error = %e, "failed to renew door locks");
            }
        }
        tokio::select! {
            () = app.purchase_wakers.driver.notified() => {}
            () = tokio::time::sleep(poll) => {}
            () = stop.cancelled() => {}
        }
    }
    tasks.close();
    tasks.wait().await;
    let held: Vec<(String, SystemTime)> =
        in_hand.lock().unwrap_or_else(std::sync::PoisonError::into_inner).drain().collect();
    if let Err(e) = hand_back(&app, &held).await {
        tracing::warn!(error = %e, orders = held.len(), "failed to hand orders back; taken over when their leases end");
    }
}

/// How soon an order whose action failed is due again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// Makes the order `id`, whose action failed, due again in [`RETRY_AFTER_FAILURE`].
async fn retry_soon(app: &App, id: &str, lease: SystemTime) -> Result<u64, StoreError> {
    let client = app.pg.get().await?;
    requeue(&client, id, lease, RETRY_AFTER_FAILURE).await
}

/// Makes the order `id` due `after` from now if it is still on this claim's `lease` (its
/// action had not stored a next step with a time of its own). Returns the rows changed.
async fn requeue(
    client: &tokio_postgres::Client,
    id: &str,
    lease: SystemTime,
    after: Duration,
) -> Result<u64, StoreError> {
    let after_ms = after.as_secs_f64() * 1000.0;
    Ok(client
        .execute(
            "UPDATE orders SET due_at = now() + make_interval(secs => $3::float8 / 1000) WHERE id = $1 AND due_at = $2",
            &[&id, &lease, &after_ms],
        )
        .await?)
}

/// At a graceful stop, gives back the orders this instance was acting on (`held`: id and the
/// end of the lease its claim set): one whose action stopped midway (its `due_at` still that
/// lease) is due at once, for another instance to take now rather than when the lease ends;
/// one whose action had moved on keeps the time it set (an order just opened is not due
/// before `door_open_max_s`). The door locks of those it had just ended are released (an end
/// is stored before its lock is released; a stop in between would leave the door refused
/// `door_busy` until the lock's TTL).
async fn hand_back(app: &App, held: &[(String, SystemTime)]) -> Result<(), StoreError> {
    if held.is_empty() {
        return Ok(());
    }
    let client = app.pg.get().await?;
    let mut running = 0;
    for (id, lease) in held {
        running += requeue(&client, id, *lease, Duration::ZERO).await?;
    }
    let ids: Vec<&str> = held.iter().map(|(id, _)| id.as_str()).collect();
    let ended = client
        .query(
            "SELECT cabinet_id, door_id, lock_token FROM orders
              WHERE id = ANY($1) AND state IN ('settled', 'cancelled', 'abnormal')",
            &[&ids],
        )
        .await?;
    for row in &ended {
        let (cabinet, door, token): (String, i16, String) = (row.get(0), row.get(1), row.get(2));
        lock::release_quietly(app, lock::Door { cabinet: &cabinet, door: u8::try_from(door).unwrap_or(0) }, &token)
            .await;
    }
    tracing::info!(running, ended = ended.len(), "orders handed back at stop");
    Ok(())
}

/// Sets `devsvc_orders{state}` from PostgreSQL.
///
/// # Errors
/// PostgreSQL errors.
pub async fn refresh_gauges(app: &App) -> Result<(), StoreError> {
    let client = app.pg.get().await?;
    let rows = client.query("SELECT state, count(*) FROM orders GROUP BY state", &[]).await?;
    for s in State::ALL {
        let n = rows.iter().find(|r| r.get::<_, &str>(0) == s.as_str()).map_or(0, |r| r.get::<_, i64>(1));
        app.metrics.orders.with_label_values(&[s.as_str()]).set(n);
    }
    Ok(())
}
