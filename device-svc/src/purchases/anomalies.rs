//! Anomalies: what the automation could not decide alone or what operators must see (the
//! documents' four "难点" and their kin). Each is stored with the goods snapshot, published to
//! the operators' notice stream through the outbox, counted by kind, and listed over HTTP.
//! Recording is idempotent by `source` (an event's stream entry, an order and a step), so a
//! redelivered event records nothing twice.

use serde::Serialize;
use serde_json::{Value, json};
use tokio_postgres::Transaction;

use super::orders::Order;
use super::outbox;
use crate::app::{App, ms_of};
use crate::error::StoreError;

/// Kinds, as stored and as the metric label.
pub mod kind {
    /// A door-closed event for an order that never reached "door open": settled from the
    /// weights and flagged (problem 2).
    pub const CLOSE_BEFORE_OPEN: &str = "close_before_open";
    /// A door event with no order behind it (and no restock running).
    pub const EVENT_WITHOUT_ORDER: &str = "event_without_order";
    /// A door event for an order that had already ended (cancelled after the cabinet stayed
    /// silent, yet the door did open): goods may have been taken.
    pub const EVENT_AFTER_END: &str = "event_after_end";
    /// A lane gained weight: an item put back into another lane (problem 4).
    pub const LANE_GAIN: &str = "lane_gain";
    /// A weight change that is not a whole number of items.
    pub const NOT_WHOLE_ITEMS: &str = "not_whole_items";
    /// A gain nothing explains while goods were taken: the charge is uncertain.
    pub const UNEXPLAINED_GAIN: &str = "unexplained_gain";
    /// No stable reading after the close within the wait.
    pub const WEIGHTS_NOT_STABLE: &str = "weights_not_stable";
    /// The cabinet never confirmed the door opened (problem 1).
    pub const CABINET_SILENT: &str = "cabinet_silent";
    /// The door stayed open longer than allowed.
    pub const DOOR_LEFT_OPEN: &str = "door_left_open";
    /// A door never reported closed: its order went to review and the door out of sale.
    pub const DOOR_NEVER_CLOSED: &str = "door_never_closed";
    /// The goods taken cost more than the payment provider authorised (the order's hold).
    pub const OVER_HOLD: &str = "over_hold";
    /// A restocker found fewer items in a lane than the previous count and the charges since
    /// say it should hold: an item swapped for one of the same weight (problem 3), or taken
    /// unseen. Names the candidate orders.
    pub const RESTOCK_LOSS: &str = "restock_loss";
    /// A restocker found more items than expected: an order may have been charged for goods
    /// that stayed. Names the candidate orders.
    pub const RESTOCK_SURPLUS: &str = "restock_surplus";
}

/// An anomaly to record.
#[derive(Debug, Clone)]
pub struct NewAnomaly<'a> {
    /// One of [`kind`].
    pub kind: &'static str,
    /// What makes it unique (recording the same source twice records once).
    pub source: String,
    /// The order, if any.
    pub order_id: Option<&'a str>,
    /// Cabinet.
    pub cabinet_id: &'a str,
    /// Door.
    pub door_id: u8,
    /// Details: the goods snapshot, the lanes involved, the event.
    pub detail: Value,
}

impl<'a> NewAnomaly<'a> {
    /// An anomaly of `order`, on its door, unique by `source`.
    pub fn of_order(kind: &'static str, source: String, order: &'a Order, detail: Value) -> Self {
        Self { kind, source, order_id: Some(&order.id), cabinet_id: &order.cabinet_id, door_id: order.door_id, detail }
    }
}

/// Records `a` inside `tx` with its notice. Returns whether it was new (then counted).
///
/// # Errors
/// PostgreSQL errors.
pub async fn record(app: &App, tx: &Transaction<'_>, a: &NewAnomaly<'_>) -> Result<bool, StoreError> {
    let row = tx
        .query_opt(
            "INSERT INTO anomalies (kind, source, order_id, cabinet_id, door_id, detail)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (source) DO NOTHING RETURNING id",
            &[&a.kind, &a.source, &a.order_id, &a.cabinet_id, &i16::from(a.door_id), &a.detail],
        )
        .await?;
    let Some(row) = row else { return Ok(false) };
    let id: i64 = row.get(0);
    let notice = json!({
        "type": "anomaly",
        "anomaly_id": id,
        "kind": a.kind,
        "order_id": a.order_id,
        "cabinet_id": a.cabinet_id,
        "door_id": a.door_id,
        "detail": a.detail,
    });
    outbox::enqueue(tx, outbox::NOTICES, &format!("anomaly:{id}"), &notice).await?;
    app.metrics.anomalies.with_label_values(&[a.kind]).inc();
    inspect(app, tx, a.cabinet_id).await?;
    tracing::info!(kind = a.kind, order = a.order_id, cabinet = a.cabinet_id, door = a.door_id, "anomaly recorded");
    Ok(true)
}

/// Raises an inspection notice (seed 003: a cabinet that keeps raising anomalies needs a
/// visit) once a cabinet has `purchases.inspection_anomalies` within the window: at most one
/// per cabinet per window (its key names the window).
async fn inspect(app: &App, tx: &Transaction<'_>, cabinet: &str) -> Result<(), StoreError> {
    let p = &app.config.purchases;
    if p.inspection_anomalies == 0 {
        return Ok(());
    }
    #[allow(clippy::cast_precision_loss)] // seconds of a setting
    let window_s = p.inspection_window_s as f64;
    let n: i64 = tx
        .query_one(
            "SELECT count(*) FROM anomalies WHERE cabinet_id = $1 AND created_at > now() - make_interval(secs => $2)",
            &[&cabinet, &window_s],
        )
        .await?
        .get(0);
    if n < i64::from(p.inspection_anomalies) {
        return Ok(());
    }
    let window = crate::clock::now_ms() / 1000 / p.inspection_window_s.max(1);
    let kinds: Vec<String> = tx
        .query(
            "SELECT kind FROM anomalies WHERE cabinet_id = $1 AND created_at > now() - make_interval(secs => $2)
              GROUP BY kind ORDER BY count(*) DESC, kind",
            &[&cabinet, &window_s],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let notice = json!({"type": "inspection", "cabinet_id": cabinet, "anomalies": n, "kinds": kinds,
                        "window_s": p.inspection_window_s});
    if outbox::enqueue(tx, outbox::NOTICES, &format!("inspection:{cabinet}:{window}"), &notice).await? {
        app.metrics.operator_notices.with_label_values(&["inspection"]).inc();
        tracing::info!(cabinet, anomalies = n, "inspection notice");
    }
    Ok(())
}

/// [`record`] in a transaction of its own.
///
/// # Errors
/// PostgreSQL errors.
pub async fn record_now(app: &App, a: &NewAnomaly<'_>) -> Result<bool, StoreError> {
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let new = record(app, &tx, a).await?;
    tx.commit().await?;
    if new {
        app.purchase_wakers.relay.notify_one();
    }
    Ok(new)
}

/// A recorded anomaly.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Anomaly {
    /// Id.
    pub id: i64,
    /// Kind.
    pub kind: String,
    /// Order.
    pub order_id: Option<String>,
    /// Cabinet.
    pub cabinet_id: String,
    /// Door.
    pub door_id: i16,
    /// Details.
    pub detail: Value,
    /// When, ms since the Unix epoch.
    pub created_ms: u64,
    /// Whether an operator closed it.
    pub resolved: bool,
}

/// What an anomaly list is filtered by; `None` is "any".
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// One order's.
    pub order_id: Option<String>,
    /// One cabinet's.
    pub cabinet_id: Option<String>,
    /// One kind.
    pub kind: Option<String>,
    /// Resolved (`true`) or still open (`false`).
    pub resolved: Option<bool>,
    /// Older than this id (the previous page's last): pages backwards.
    pub before_id: Option<i64>,
}

/// The statement of an anomaly list, newest first (public for the plan test): each filter
/// alone is served by an index ending in `id DESC` (migration 0019).
pub fn query(f: &Filter, limit: i64) -> (String, crate::listing::Params) {
    let mut s = crate::listing::Select::new(
        "SELECT id, kind, order_id, cabinet_id, door_id, detail, created_at, resolved_at IS NOT NULL FROM anomalies",
    );
    if let Some(v) = &f.order_id {
        s.bind("order_id = $", v.clone());
    }
    if let Some(v) = &f.cabinet_id {
        s.bind("cabinet_id = $", v.clone());
    }
    if let Some(v) = &f.kind {
        s.bind("kind = $", v.clone());
    }
    match f.resolved {
        // The partial index `anomalies_open` has this predicate.
        Some(false) => s.and("resolved_at IS NULL"),
        Some(true) => s.and("resolved_at IS NOT NULL"),
        None => &mut s,
    };
    if let Some(v) = f.before_id {
        s.bind("id < $", v);
    }
    // `finish` asks for one row more than the page; the list keeps `limit`.
    s.finish("ORDER BY id DESC", limit - 1)
}

/// Anomalies, newest first, filtered by `f`.
///
/// # Errors
/// PostgreSQL errors.
pub async fn list(app: &App, f: &Filter, limit: i64) -> Result<Vec<Anomaly>, StoreError> {
    let (sql, params) = query(f, limit);
    let client = app.pg.get().await?;
    let rows = client.query(&sql, &crate::listing::refs(&params)).await?;
    Ok(rows
        .iter()
        .map(|r| Anomaly {
            id: r.get(0),
            kind: r.get(1),
            order_id: r.get(2),
            cabinet_id: r.get(3),
            door_id: r.get(4),
            detail: r.get(5),
            created_ms: ms_of(r.get(6)),
            resolved: r.get(7),
        })
        .collect())
}

/// Marks anomaly `id` resolved by an operator.
///
/// # Errors
/// `NotFound`, or PostgreSQL errors.
pub async fn resolve(app: &App, id: i64) -> Result<(), StoreError> {
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let n = tx.execute("UPDATE anomalies SET resolved_at = COALESCE(resolved_at, now()) WHERE id = $1", &[&id]).await?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("anomaly {id}")));
    }
    crate::auth::audit::commit(tx).await
}
