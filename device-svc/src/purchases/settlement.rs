//! Settlement: once the door has closed, the first stable reading of every lane newer than the
//! close event is compared with the snapshot taken before the door opened ([`reckon`]). The
//! order, the settlement, its outbox message for the account service, the anomalies and any
//! restock orders are written in one transaction, so that a crash leaves either all or none.
//! Only then is the door's lock released.
//!
//! A reading older than the close (or the pre-opening weight itself) is never used: until each
//! lane has a newer stable reading the order waits, woken by each weight report of its
//! cabinet, for at most `settle_wait_s`; past that it goes to review. The lock holds the door
//! shut for others meanwhile, so a later stable reading still shows the same shelf.

use std::collections::BTreeMap;

use serde_json::json;

use super::anomalies::{self, NewAnomaly, kind};
use super::orders::{self, COLUMNS, Changes, Order};
use super::reckon::{self, GoodsLane, Line, Reckoning};
use super::{State, lock, money, restock};
use crate::app::{App, now_ms};
use crate::error::StoreError;
use crate::weights;

/// The lanes' first stable weights newer than the close, or `None` while one is missing.
async fn weights_after(app: &App, order: &Order, goods: &[GoodsLane]) -> Result<Option<BTreeMap<u8, i32>>, StoreError> {
    let closed = u64::try_from(order.closed_ms.unwrap_or(i64::MAX)).unwrap_or(u64::MAX);
    let cached: BTreeMap<u8, (i32, u64)> = weights::current(app, &order.cabinet_id)
        .await?
        .into_iter()
        .filter(|w| w.door_id == order.door_id)
        .map(|w| (w.lane_id, (w.grams, w.sample_ms)))
        .collect();
    let mut after = BTreeMap::new();
    for lane in goods {
        match cached.get(&lane.lane_id) {
            Some((grams, sample_ms)) if *sample_ms > closed => {
                after.insert(lane.lane_id, *grams);
            }
            _ => return Ok(None),
        }
    }
    Ok(Some(after))
}

/// Settles order `id` if its door is closed and the weights are in. With `give_up` (the wait
/// is over) an order still without weights goes to review. Returns the state it ended in, or
/// `None` if it is still waiting (or was not waiting at all).
///
/// # Errors
/// Storage errors; nothing is written then and the next weight report or the driver retries.
pub async fn try_settle(app: &App, id: &str, give_up: bool) -> Result<Option<State>, StoreError> {
    let order = orders::get(app, id).await?;
    if order.state != State::DoorClosed {
        return Ok(None);
    }
    let goods: Option<Vec<GoodsLane>> = order.goods.clone().and_then(|g| serde_json::from_value(g).ok());
    let Some(goods) = goods else {
        return finish(app, &order, Verdict::Review("no_goods_snapshot", None, &[])).await.map(Some);
    };
    let Some(after) = weights_after(app, &order, &goods).await? else {
        if give_up {
            return finish(app, &order, Verdict::Review(kind::WEIGHTS_NOT_STABLE, None, &goods)).await.map(Some);
        }
        return Ok(None);
    };
    let r = reckon::reckon(&goods, &after, app.config.purchases.tolerance);
    let verdict = match r.review_reasons().first() {
        Some(reason) => Verdict::Review(reason, Some((&r, &after)), &goods),
        // Never charge more than was authorised: an operator settles it.
        None if r.amount_cents > order.hold_cents => Verdict::Review(kind::OVER_HOLD, Some((&r, &after)), &goods),
        None => Verdict::Charge(&r, &after, &goods),
    };
    finish(app, &order, verdict).await.map(Some)
}

enum Verdict<'a> {
    Charge(&'a Reckoning, &'a BTreeMap<u8, i32>, &'a [GoodsLane]),
    Review(&'static str, Option<(&'a Reckoning, &'a BTreeMap<u8, i32>)>, &'a [GoodsLane]),
}

async fn finish(app: &App, order: &Order, verdict: Verdict<'_>) -> Result<State, StoreError> {
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let (to, cause, changes) = match &verdict {
        Verdict::Charge(r, ..) => {
            (State::Settled, "settled", Changes { amount_cents: Some(r.amount_cents), ..Changes::default() })
        }
        Verdict::Review(reason, ..) => {
            (State::Abnormal, *reason, Changes { reason: Some((*reason).to_owned()), ..Changes::default() })
        }
    };
    let Some(done) = orders::transition(&tx, &order.id, &[State::DoorClosed], to, cause, changes).await? else {
        // Another instance settled it first.
        let state = orders::get(app, &order.id).await?.state;
        return Ok(state);
    };
    let anomaly = |kind: &'static str, step: &str, detail: serde_json::Value| {
        NewAnomaly::of_order(kind, format!("{step}:{}", order.id), order, detail)
    };
    match verdict {
        Verdict::Charge(r, after, goods) => {
            record_settlement(&tx, &done, &r.lines, r.amount_cents).await?;
            if !r.gained_lanes.is_empty() {
                let detail = json!({"gained_lanes": r.gained_lanes, "moves": r.moves,
                                    "unexplained_gain_lanes": r.unexplained_gain_lanes,
                                    "before": goods, "after": after});
                anomalies::record(app, &tx, &anomaly(kind::LANE_GAIN, "gain", detail)).await?;
            }
            restock::check_lanes(app, &tx, order, goods, after).await?;
        }
        Verdict::Review(reason, reckoning, goods) => {
            let detail = json!({
                "before": goods,
                "after": reckoning.map(|(_, a)| a),
                "reckoning": reckoning.map(|(r, _)| r),
                "closed_ms": order.closed_ms,
            });
            let k = match reason {
                kind::NOT_WHOLE_ITEMS => kind::NOT_WHOLE_ITEMS,
                kind::UNEXPLAINED_GAIN => kind::UNEXPLAINED_GAIN,
                _ => kind::WEIGHTS_NOT_STABLE,
            };
            anomalies::record(app, &tx, &anomaly(k, "review", detail)).await?;
        }
    }
    tx.commit().await?;
    app.metrics.order_transitions.with_label_values(&[to.as_str()]).inc();
    if let Some(closed) = order.door_closed_ms {
        app.metrics.settlement_seconds.observe(now_ms().saturating_sub(closed) as f64 / 1000.0);
    }
    lock::release_quietly(app, order.door(), &order.lock_token).await;
    app.purchase_wakers.relay.notify_one();
    tracing::info!(order = %order.id, state = to.as_str(), amount_cents = done.amount_cents, "order finished");
    Ok(to)
}

/// Writes the settlement of `order` (already moved to `settled` in `tx`) and its money message
/// for the account service (`money::write`, key `settlement:<order id>`).
async fn record_settlement(
    tx: &tokio_postgres::Transaction<'_>,
    order: &Order,
    lines: &[Line],
    amount_cents: i64,
) -> Result<(), StoreError> {
    let stored = serde_json::to_value(lines).map_err(|e| StoreError::invalid("lines", e.to_string()))?;
    tx.execute(
        "INSERT INTO settlements (order_id, amount_cents, lines) VALUES ($1, $2, $3)",
        &[&order.id, &amount_cents, &stored],
    )
    .await?;
    let payment_id: Option<String> =
        tx.query_one("SELECT payment_id FROM orders WHERE id = $1", &[&order.id]).await?.get(0);
    let key = format!("settlement:{}", order.id);
    let target = money::OrderRef {
        id: &order.id,
        user_id: &order.user_id,
        tenant: order.tenant.as_deref(),
        payment_id: payment_id.as_deref(),
        currency: &order.currency,
        cabinet_id: &order.cabinet_id,
        door_id: order.door_id,
    };
    let message = money::NewPayment {
        idem_key: &key,
        kind: money::Kind::Settlement,
        amount_cents,
        lines,
        reason: None,
        operator: None,
        review: &order.review,
        voids: None,
    };
    money::write(tx, &target, &message).await?;
    Ok(())
}

/// Items an operator counted in one lane.
#[derive(Debug, Clone, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Counted {
    /// Lane id (of the order's door).
    pub lane_id: u8,
    /// Items taken from it.
    pub items: i64,
}

/// Settles an order that went to review with the item counts an operator decided on (from the
/// anomaly's weights, a camera, the customer), priced from the order's own goods snapshot:
/// an operator decides what was taken, never a price. The settlement is published like any
/// other, its `review` naming `operator_settled`.
///
/// # Errors
/// `Invalid` (unknown lane, negative count, empty operator), `NotFound`,
/// `Rejected("not_abnormal")` for an order not waiting for review (unless an operator already
/// settled it at the same amount: then the order as it is), or storage errors.
pub async fn settle_by_operator(app: &App, id: &str, operator: &str, counted: &[Counted]) -> Result<Order, StoreError> {
    if operator.is_empty() || operator.len() > 128 {
        return Err(StoreError::invalid("operator", "1 to 128 characters"));
    }
    let order = orders::get(app, id).await?;
    let goods: Vec<GoodsLane> = order.goods.clone().and_then(|g| serde_json::from_value(g).ok()).unwrap_or_default();
    let mut lines = Vec::new();
    for c in counted {
        let lane = goods.iter().find(|g| g.lane_id == c.lane_id).ok_or_else(|| {
            StoreError::invalid("items.lane_id", format!("lane {} is not behind the order's door", c.lane_id))
        })?;
        if !(0..=10_000).contains(&c.items) {
            return Err(StoreError::invalid("items.items", "0..=10000"));
        }
        if c.items > 0 {
            let amount_cents = c.items.saturating_mul(lane.price_cents);
            lines.push(Line {
                lane_id: c.lane_id,
                product_id: lane.product_id.clone(),
                items: c.items,
                unit_price_cents: lane.price_cents,
                amount_cents,
            });
        }
    }
    let amount: i64 = lines.iter().map(|l| l.amount_cents).sum();
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let changes = Changes { amount_cents: Some(amount), review: Some("operator_settled"), ..Changes::default() };
    let cause = format!("operator:{operator}");
    let Some(done) = orders::transition(&tx, id, &[State::Abnormal], State::Settled, &cause, changes).await? else {
        drop(tx);
        drop(client);
        // The same decision again (an operator's retry after an answer lost or a 503 that came
        // after the commit) is answered with the order as it is; a different one is refused.
        let now = orders::get(app, id).await?;
        if now.state == State::Settled
            && now.review.iter().any(|r| r == "operator_settled")
            && now.amount_cents == Some(amount)
        {
            return Ok(now);
        }
        return Err(StoreError::rejected(
            "not_abnormal",
            format!("order {id} is {:?}, not waiting for review", now.state),
        ));
    };
    record_settlement(&tx, &done, &lines, amount).await?;
    crate::auth::audit::commit(tx).await?;
    app.metrics.order_transitions.with_label_values(&[State::Settled.as_str()]).inc();
    app.purchase_wakers.relay.notify_one();
    tracing::info!(order = %id, operator, amount_cents = amount, "order settled by an operator");
    Ok(done)
}

/// Tries to settle every order waiting on `cabinets` (called after their weights were stored).
///
/// # Errors
/// Storage errors.
pub async fn weights_arrived(app: &App, cabinets: &[&str]) -> Result<(), StoreError> {
    if cabinets.is_empty() {
        return Ok(());
    }
    let client = app.pg.get().await?;
    let rows = client
        .query(
            &format!("SELECT {COLUMNS} FROM orders WHERE state = 'door_closed' AND cabinet_id = ANY($1)"),
            &[&cabinets],
        )
        .await?;
    drop(client);
    for row in rows {
        let order = Order::from_row(&row);
        try_settle(app, &order.id, false).await?;
    }
    Ok(())
}
