//! Restocking and lane changes, both under the door's lock so that no purchase runs on a shelf
//! being changed: a restock holds the lock from start to finish (its door events are expected
//! and raise nothing); a change of a lane's product or price takes it for the moment of the
//! change. After each settlement a lane left below its threshold gets one open restock order
//! (not one per purchase), with an operator notice; the next finished restock of the door
//! closes it, with the restocker's count of every lane ([`stocktake`]).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::json;
use tokio_postgres::Transaction;

use super::lock::{self, Door};
use super::orders::Order;
use super::outbox;
use super::reckon::GoodsLane;
use super::stocktake;
use crate::app::{App, ms_of};
use crate::error::StoreError;
use crate::registry::{self, LaneConfig};

/// A restock as stored.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Restock {
    /// Id.
    pub id: String,
    /// Cabinet.
    pub cabinet_id: String,
    /// Door.
    pub door_id: i16,
    /// Who.
    pub operator: String,
    /// Started, ms since the Unix epoch.
    pub started_ms: u64,
    /// Finished, if it is.
    pub finished_ms: Option<u64>,
    /// Restock orders it closed.
    pub closed_restock_orders: i64,
}

/// Starts a restock of a door: takes its lock (refused with `door_busy` while an order runs).
///
/// # Errors
/// `Invalid`, `NotFound` (door), `Rejected("door_busy")`, or storage errors.
pub async fn start(app: &App, cabinet: &str, door: u8, operator: &str) -> Result<Restock, StoreError> {
    if operator.is_empty() || operator.len() > 128 {
        return Err(StoreError::invalid("operator", "1 to 128 characters"));
    }
    let mut client = app.pg.get().await?;
    let exists = client
        .query_opt("SELECT 1 FROM doors WHERE cabinet_id = $1 AND door_id = $2", &[&cabinet, &i16::from(door)])
        .await?;
    if exists.is_none() {
        return Err(StoreError::NotFound(format!("door {door} of cabinet {cabinet}")));
    }
    let id = lock::token("r")?;
    let lock_door = Door { cabinet, door };
    if !lock::acquire(app, lock_door, &id).await? {
        return Err(StoreError::rejected("door_busy", "the door is in use by an order or another restock"));
    }
    let inserted = async {
        let tx = client.transaction().await?;
        let row = tx
            .query_one(
                "INSERT INTO restocks (id, cabinet_id, door_id, operator, lock_token) VALUES ($1, $2, $3, $4, $1)
                 RETURNING started_at",
                &[&id, &cabinet, &i16::from(door), &operator],
            )
            .await?;
        crate::auth::audit::commit(tx).await?;
        Ok::<_, StoreError>(row)
    };
    match inserted.await {
        Ok(row) => Ok(Restock {
            id,
            cabinet_id: cabinet.to_owned(),
            door_id: i16::from(door),
            operator: operator.to_owned(),
            started_ms: ms_of(row.get(0)),
            finished_ms: None,
            closed_restock_orders: 0,
        }),
        Err(e) => {
            lock::release_quietly(app, lock_door, &id).await;
            if e.is_unique_violation() {
                Err(StoreError::rejected("door_busy", "a restock of this door runs"))
            } else {
                Err(e)
            }
        }
    }
}

/// Finishes restock `id`: records the restocker's `counts` (the stocktake: losses found,
/// scales re-zeroed), closes the door's open restock orders and releases the lock. Finishing
/// twice answers the same.
///
/// # Errors
/// `NotFound`, `Invalid` (counts), or storage errors.
pub async fn finish(app: &App, id: &str, counts: &[stocktake::LaneCount]) -> Result<Restock, StoreError> {
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            "SELECT cabinet_id, door_id, operator, lock_token, started_at, finished_at FROM restocks WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("restock {id}")))?;
    let (cabinet, door, operator, token): (String, i16, String, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let already: Option<std::time::SystemTime> = row.get(5);
    let mut closed = 0;
    let finished = match already {
        Some(t) => t,
        None => {
            let restocked = stocktake::Restocked {
                id,
                cabinet_id: &cabinet,
                door_id: u8::try_from(door).unwrap_or(0),
                operator: &operator,
            };
            stocktake::record(app, &tx, &restocked, counts).await?;
            closed = i64::try_from(
                tx.execute(
                    "UPDATE restock_orders SET closed_at = now() WHERE cabinet_id = $1 AND door_id = $2 AND closed_at IS NULL",
                    &[&cabinet, &door],
                )
                .await?,
            )
            .unwrap_or(0);
            // An operator has been at the door: a door taken out of sale is back on sale.
            tx.execute(
                "UPDATE doors SET out_of_sale = NULL WHERE cabinet_id = $1 AND door_id = $2",
                &[&cabinet, &door],
            )
            .await?;
            tx.query_one("UPDATE restocks SET finished_at = now() WHERE id = $1 RETURNING finished_at", &[&id])
                .await?
                .get(0)
        }
    };
    crate::auth::audit::commit(tx).await?;
    app.purchase_wakers.relay.notify_one();
    lock::release_quietly(app, Door { cabinet: &cabinet, door: u8::try_from(door).unwrap_or(0) }, &token).await;
    Ok(Restock {
        id: id.to_owned(),
        cabinet_id: cabinet,
        door_id: door,
        operator,
        started_ms: ms_of(row.get(4)),
        finished_ms: Some(ms_of(finished)),
        closed_restock_orders: closed,
    })
}

/// Whether a restock of the door is running (its door events are expected).
///
/// # Errors
/// PostgreSQL errors.
pub async fn is_running(app: &App, cabinet: &str, door: u8) -> Result<bool, StoreError> {
    let client = app.pg.get().await?;
    Ok(client
        .query_opt(
            "SELECT 1 FROM restocks WHERE cabinet_id = $1 AND door_id = $2 AND finished_at IS NULL",
            &[&cabinet, &i16::from(door)],
        )
        .await?
        .is_some())
}

/// Changes a lane's product, price or threshold under the door's lock (refused with
/// `door_busy` while an order or a restock holds it: a running purchase keeps the shelf and
/// prices it started with).
///
/// # Errors
/// As [`registry::configure_lane`], plus `Rejected("door_busy")`.
pub async fn configure_lane(app: &App, cabinet: &str, door: u8, lane: &LaneConfig) -> Result<(), StoreError> {
    let token = lock::token("p")?;
    let lock_door = Door { cabinet, door };
    if !lock::acquire(app, lock_door, &token).await? {
        return Err(StoreError::rejected(
            "door_busy",
            "the door is in use by an order or a restock; try again after it",
        ));
    }
    let result = registry::configure_lane(app, cabinet, door, lane).await;
    lock::release_quietly(app, lock_door, &token).await;
    result
}

/// Opens a restock order for each lane of the settled door left below its threshold (items
/// left = weight / unit weight, rounded down), unless one is open; inside the settlement's
/// transaction.
///
/// # Errors
/// PostgreSQL errors.
pub async fn check_lanes(
    app: &App,
    tx: &Transaction<'_>,
    order: &Order,
    goods: &[GoodsLane],
    after: &BTreeMap<u8, i32>,
) -> Result<(), StoreError> {
    let rows = tx
        .query(
            "SELECT lane_id, restock_threshold FROM lanes WHERE cabinet_id = $1 AND door_id = $2 AND restock_threshold > 0",
            &[&order.cabinet_id, &i16::from(order.door_id)],
        )
        .await?;
    for row in rows {
        let (lane_id, threshold): (i16, i32) = (row.get(0), row.get(1));
        let Some(lane) = goods.iter().find(|g| i16::from(g.lane_id) == lane_id) else { continue };
        let Some(grams) = after.get(&lane.lane_id) else { continue };
        let left = (*grams).max(0) / lane.unit_grams.max(1);
        if left >= threshold {
            continue;
        }
        let opened = tx
            .query_opt(
                "INSERT INTO restock_orders (cabinet_id, door_id, lane_id, items_left, threshold, order_id)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING id",
                &[&order.cabinet_id, &i16::from(order.door_id), &lane_id, &left, &threshold, &order.id],
            )
            .await?;
        if let Some(r) = opened {
            let id: i64 = r.get(0);
            let notice = json!({
                "type": "restock_order",
                "restock_order_id": id,
                "cabinet_id": order.cabinet_id,
                "door_id": order.door_id,
                "lane_id": lane_id,
                "product_id": lane.product_id,
                "items_left": left,
                "threshold": threshold,
            });
            outbox::enqueue(tx, outbox::NOTICES, &format!("restock_order:{id}"), &notice).await?;
            app.metrics.restock_orders.inc();
        }
    }
    Ok(())
}

/// Open restock orders, oldest first, optionally of one cabinet.
///
/// # Errors
/// PostgreSQL errors.
pub async fn open_orders(app: &App, cabinet: Option<&str>) -> Result<Vec<serde_json::Value>, StoreError> {
    let client = app.pg.get().await?;
    let rows = client
        .query(
            "SELECT id, cabinet_id, door_id, lane_id, items_left, threshold, created_at FROM restock_orders
              WHERE closed_at IS NULL AND ($1::text IS NULL OR cabinet_id = $1) ORDER BY id",
            &[&cabinet],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            json!({
                "id": r.get::<_, i64>(0),
                "cabinet_id": r.get::<_, String>(1),
                "door_id": r.get::<_, i16>(2),
                "lane_id": r.get::<_, i16>(3),
                "items_left": r.get::<_, i32>(4),
                "threshold": r.get::<_, i32>(5),
                "created_ms": ms_of(r.get(6)),
            })
        })
        .collect())
}
