//! The stocktake at a restock (seed document 003, problem 3): an item swapped for one of the
//! same weight leaves the scales as they were, so no purchase can see it; the restocker can.
//!
//! When a restock finishes, the restocker reports per lane how many items of its product it
//! held when the door was opened (`found`; a swapped-in item of another product is not
//! counted) and how many after refilling (`stocked`). Two checks follow, each raising what an
//! operator must decide on:
//!
//! - **Loss** (`restock_loss`, or `restock_surplus`): the previous count's `stocked`, less the
//!   items charged by the orders settled on that door since, is what the lane should hold. A
//!   difference names the orders since the previous count as the candidates (with those still in
//!   review), for an operator to charge (an adjustment), refund, or write off.
//! - **Calibration** (notice `calibration`, and a `TARE` command to the lane): after the count
//!   the lane holds exactly `stocked` items, so its first stable weight afterwards must be
//!   `stocked` x the unit weight (0 g for an empty lane). A scale off by more than
//!   `purchases.calibration_drift_grams` is re-zeroed to that weight, so the next purchase is
//!   weighed on a true scale.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio_postgres::Transaction;

use super::anomalies::{self, NewAnomaly};
use super::outbox;
use super::reckon::Line;
use crate::app::{App, ms_of};
use crate::error::StoreError;

/// How often counted lanes wait for their scale check.
pub const SCALE_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// One lane as the restocker counted it.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LaneCount {
    /// Lane id (of the restocked door).
    pub lane_id: u8,
    /// Items of the lane's product it held when the door was opened (a swapped-in item of
    /// another product is not counted).
    pub found: i32,
    /// Items it holds after refilling.
    pub stocked: i32,
}

/// A `TARE` to send once its notice is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tare {
    /// Door.
    pub door_id: u8,
    /// Lane.
    pub lane_id: u8,
    /// What the lane holds now, grams.
    pub grams: i32,
}

/// The restock being finished.
#[derive(Debug)]
pub struct Restocked<'a> {
    /// Its id.
    pub id: &'a str,
    /// Cabinet.
    pub cabinet_id: &'a str,
    /// Door.
    pub door_id: u8,
    /// Who counted.
    pub operator: &'a str,
}

/// Records the counts of restock `r` inside `tx` and raises the loss anomalies they call for;
/// the scales are checked when their next stable weights arrive ([`check_scales`]).
///
/// # Errors
/// `Invalid` (a lane not behind the door, a negative or repeated count), or PostgreSQL errors.
pub async fn record(
    app: &App,
    tx: &Transaction<'_>,
    r: &Restocked<'_>,
    counts: &[LaneCount],
) -> Result<(), StoreError> {
    if counts.len() > 255 {
        return Err(StoreError::invalid("lanes", "at most 255 lanes"));
    }
    let lanes: HashMap<u8, (String, i32)> = tx
        .query(
            "SELECT l.lane_id, l.product_id, p.unit_grams FROM lanes l JOIN products p ON p.id = l.product_id
              WHERE l.cabinet_id = $1 AND l.door_id = $2",
            &[&r.cabinet_id, &i16::from(r.door_id)],
        )
        .await?
        .iter()
        .map(|row| (u8::try_from(row.get::<_, i16>(0)).unwrap_or(0), (row.get(1), row.get(2))))
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for c in counts {
        if !(0..=100_000).contains(&c.found) || !(0..=100_000).contains(&c.stocked) {
            return Err(StoreError::invalid("lanes.found", "found and stocked 0..=100000"));
        }
        if !seen.insert(c.lane_id) {
            return Err(StoreError::invalid("lanes.lane_id", format!("lane {} counted twice", c.lane_id)));
        }
        if !lanes.contains_key(&c.lane_id) {
            return Err(StoreError::invalid("lanes.lane_id", format!("lane {} is not behind the door", c.lane_id)));
        }
    }
    let door = i16::from(r.door_id);
    for c in counts {
        let lane = i16::from(c.lane_id);
        let (product, unit_grams) = &lanes[&c.lane_id];
        let previous = tx
            .query_opt(
                "SELECT stocked, counted_at FROM lane_counts
                  WHERE cabinet_id = $1 AND door_id = $2 AND lane_id = $3 AND restock_id <> $4
                  ORDER BY counted_at DESC LIMIT 1",
                &[&r.cabinet_id, &door, &lane, &r.id],
            )
            .await?;
        let mut expected = None;
        if let Some(prev) = previous {
            let (stocked, since): (i32, std::time::SystemTime) = (prev.get(0), prev.get(1));
            let orders = orders_since(tx, r.cabinet_id, door, since).await?;
            let sold: i64 = orders.iter().map(|o| o.items_from(c.lane_id)).sum();
            let should = i64::from(stocked) - sold;
            expected = Some(i32::try_from(should).unwrap_or(i32::MIN));
            if should != i64::from(c.found) {
                let kind = if i64::from(c.found) < should {
                    anomalies::kind::RESTOCK_LOSS
                } else {
                    anomalies::kind::RESTOCK_SURPLUS
                };
                let detail = json!({
                    "restock_id": r.id,
                    "lane_id": c.lane_id,
                    "product_id": product,
                    "expected": should,
                    "found": c.found,
                    "difference": i64::from(c.found) - should,
                    "counted_by": r.operator,
                    "since_ms": ms_of(since),
                    "candidates": orders.iter().map(|o| json!({"order_id": o.id, "state": o.state,
                        "items": o.items_from(c.lane_id)})).collect::<Vec<_>>(),
                });
                let anomaly = NewAnomaly {
                    kind,
                    source: format!("stocktake:{}:{}", r.id, c.lane_id),
                    order_id: None,
                    cabinet_id: r.cabinet_id,
                    door_id: r.door_id,
                    detail,
                };
                anomalies::record(app, tx, &anomaly).await?;
            }
        }
        tx.execute(
            "INSERT INTO lane_counts (restock_id, cabinet_id, door_id, lane_id, found, stocked, expected, product_id,
                                      unit_grams)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
            &[&r.id, &r.cabinet_id, &door, &lane, &c.found, &c.stocked, &expected, product, unit_grams],
        )
        .await?;
    }
    Ok(())
}

/// Checks the scales of lanes counted at a restock against their first stable weight since
/// (every [`SCALE_CHECK_EVERY`], off the weight path; an instance's check is cheap while no
/// count waits): a drift beyond `purchases.calibration_drift_grams` raises a calibration notice
/// and sends the lane a `TARE`. Each count is checked once; counts older than an hour without
/// a reading are dropped from the check.
///
/// # Errors
/// Storage errors (the next check tries again).
pub async fn check_scales(app: &App) -> Result<(), StoreError> {
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    // Locked until this check commits: two instances never check (and tare) one count twice.
    let rows = tx
        .query(
            "SELECT restock_id, cabinet_id, door_id, lane_id, stocked, unit_grams, product_id, counted_at
               FROM lane_counts WHERE scale_checked_at IS NULL ORDER BY counted_at LIMIT 100 FOR UPDATE SKIP LOCKED",
            &[],
        )
        .await?;
    if rows.is_empty() {
        return Ok(());
    }
    let mut tares: Vec<(String, Tare)> = Vec::new();
    for row in &rows {
        let (restock, cabinet, door, lane): (String, String, i16, i16) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let (stocked, unit, product): (i32, i32, Option<String>) = (row.get(4), row.get(5), row.get(6));
        let counted_ms = ms_of(row.get(7));
        let door_id = u8::try_from(door).unwrap_or(0);
        let lane_id = u8::try_from(lane).unwrap_or(0);
        let reading = crate::weights::current(app, &cabinet)
            .await?
            .into_iter()
            .find(|w| w.door_id == door_id && w.lane_id == lane_id && w.sample_ms > counted_ms);
        let Some(reading) = reading else {
            if crate::clock::now_ms().saturating_sub(counted_ms) > 3_600_000 {
                tx.execute(
                    "UPDATE lane_counts SET scale_checked_at = now() WHERE restock_id = $1 AND lane_id = $2",
                    &[&restock, &lane],
                )
                .await?;
            }
            continue;
        };
        tx.execute(
            "UPDATE lane_counts SET scale_checked_at = now(), scale_grams = $3 WHERE restock_id = $1 AND lane_id = $2",
            &[&restock, &lane, &reading.grams],
        )
        .await?;
        let should = stocked.saturating_mul(unit);
        if (reading.grams - should).abs() <= app.config.purchases.calibration_drift_grams {
            continue;
        }
        let notice = json!({
            "type": "calibration",
            "cabinet_id": cabinet,
            "door_id": door_id,
            "lane_id": lane_id,
            "product_id": product,
            "stocked": stocked,
            "scale_grams": reading.grams,
            "expected_grams": should,
            "drift_grams": reading.grams - should,
            "restock_id": restock,
        });
        if outbox::enqueue(&tx, outbox::NOTICES, &format!("calibration:{restock}:{lane_id}"), &notice).await? {
            app.metrics.operator_notices.with_label_values(&["calibration"]).inc();
            tares.push((cabinet, Tare { door_id, lane_id, grams: should }));
        }
    }
    tx.commit().await?;
    drop(client);
    if !tares.is_empty() {
        app.purchase_wakers.relay.notify_one();
    }
    for (cabinet, tare) in tares {
        send_tare(app, &cabinet, tare).await;
    }
    Ok(())
}

/// An order on the door since the previous count, with the items it was charged per lane.
struct Since {
    id: String,
    state: String,
    lines: Vec<Line>,
}

impl Since {
    fn items_from(&self, lane: u8) -> i64 {
        self.lines.iter().filter(|l| l.lane_id == lane).map(|l| l.items).sum()
    }
}

async fn orders_since(
    tx: &Transaction<'_>,
    cabinet: &str,
    door: i16,
    since: std::time::SystemTime,
) -> Result<Vec<Since>, StoreError> {
    let rows = tx
        .query(
            "SELECT o.id, o.state, s.lines FROM orders o LEFT JOIN settlements s ON s.order_id = o.id
              WHERE o.cabinet_id = $1 AND o.door_id = $2 AND o.created_at > $3 AND o.state IN ('settled', 'abnormal')
              ORDER BY o.created_at LIMIT 1000",
            &[&cabinet, &door, &since],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Since {
            id: r.get(0),
            state: r.get(1),
            lines: r.get::<_, Option<Value>>(2).and_then(|v| serde_json::from_value(v).ok()).unwrap_or_default(),
        })
        .collect())
}

/// Sends a `TARE`; a cabinet that does not answer keeps the notice, which names the drift, for
/// an operator.
async fn send_tare(app: &App, cabinet: &str, t: Tare) {
    let Ok(id) = protocol::DeviceId::new(cabinet) else { return };
    let device = protocol::bus::DeviceKey::Cabinet(id);
    let action = protocol::cabinet::CommandAction::Tare { door_id: t.door_id, lane_id: t.lane_id, grams: t.grams };
    let timeout = std::time::Duration::from_millis(app.config.commands.default_timeout_ms);
    match app.commander.send(&device, protocol::bus::CommandBody::Cabinet(action), timeout).await {
        Ok(outcome) => tracing::info!(
            cabinet,
            door = t.door_id,
            lane = t.lane_id,
            grams = t.grams,
            outcome = outcome.label(),
            "tare sent"
        ),
        Err(e) => tracing::warn!(cabinet, door = t.door_id, lane = t.lane_id, error = %e, "failed to send a tare"),
    }
}
