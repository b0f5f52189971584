//! The outbox: messages for other services are written in the same transaction as the
//! decision they announce (a settlement, an anomaly, a restock order), then a relay publishes
//! them to Redis streams. Publishing is at least once: the relay marks rows published only
//! after `XADD` succeeded, so a relay that dies in between publishes those rows again, each
//! time with the same `idem_key`, which consumers use to drop the repeat (SPEC.md 3.5).

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::error::StoreError;

/// Settlements for the account service (stream `P account:settlements`).
pub const SETTLEMENTS: &str = "account:settlements";
/// Notices for operators: anomalies, restock orders (stream `P notices`).
pub const NOTICES: &str = "notices";

/// Rows published per relay round.
const BATCH: i64 = 200;
/// How long a relay owns the rows it claimed before another may take them over.
const LEASE: Duration = Duration::from_secs(30);
/// Entries kept per stream (approximately); consumers are expected to keep up.
const MAXLEN: usize = 1_000_000;

/// Adds a message to the outbox inside `tx`. `Ok(false)`: a message with this key exists.
///
/// # Errors
/// PostgreSQL errors.
pub async fn enqueue(tx: &Transaction<'_>, stream: &str, idem_key: &str, payload: &Value) -> Result<bool, StoreError> {
    let n = tx
        .execute(
            "INSERT INTO outbox (stream, idem_key, payload) VALUES ($1, $2, $3) ON CONFLICT (idem_key) DO NOTHING",
            &[&stream, &idem_key, payload],
        )
        .await?;
    Ok(n == 1)
}

/// Publishes up to one batch of unpublished rows. Returns how many were published.
///
/// The batch is claimed for [`LEASE`] in one short statement, published with no transaction
/// open (Redis is never waited on while PostgreSQL rows are locked), then marked published. A
/// relay that stops or freezes in between holds nothing; its rows are claimed again once their
/// lease has run out and published again, with the same `idem_key`.
///
/// # Errors
/// PostgreSQL or Redis errors; the rows stay unpublished and are tried again.
pub async fn relay_once(app: &App) -> Result<usize, StoreError> {
    let client = app.pg.get().await?;
    let mut rows = client
        .query(
            "UPDATE outbox SET relay_until = now() + make_interval(secs => $2)
              WHERE id IN (SELECT id FROM outbox
                            WHERE published_at IS NULL AND (relay_until IS NULL OR relay_until < now())
                            ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
              RETURNING id, stream, idem_key, payload",
            &[&BATCH, &LEASE.as_secs_f64()],
        )
        .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    rows.sort_unstable_by_key(|r| r.get::<_, i64>(0));
    let mut pipe = redis::pipe();
    let mut ids = Vec::with_capacity(rows.len());
    let mut streams = Vec::with_capacity(rows.len());
    for row in &rows {
        let (id, stream, key, payload): (i64, String, String, Value) = (row.get(0), row.get(1), row.get(2), row.get(3));
        let kind = payload.get("type").and_then(Value::as_str).unwrap_or("message").to_owned();
        pipe.cmd("XADD")
            .arg(format!("{}{stream}", app.keys.prefix()))
            .arg("MAXLEN")
            .arg("~")
            .arg(MAXLEN)
            .arg("*")
            .arg("idem_key")
            .arg(&key)
            .arg("type")
            .arg(kind)
            .arg("payload")
            .arg(payload.to_string())
            .ignore();
        ids.push(id);
        streams.push(stream);
    }
    let mut con = app.redis.clone();
    pipe.query_async::<()>(&mut con).await?;
    client.execute("UPDATE outbox SET published_at = now() WHERE id = ANY($1)", &[&ids]).await?;
    for stream in &streams {
        app.metrics.outbox_published.with_label_values(&[stream]).inc();
    }
    Ok(ids.len())
}

/// Relays until `stop`: at once when woken, otherwise every poll interval.
pub async fn run_relay(app: Arc<App>, stop: CancellationToken) {
    let poll = Duration::from_millis(app.config.purchases.poll_ms);
    loop {
        let published = match relay_once(&app).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "failed to relay the outbox; retrying");
                0
            }
        };
        if published > 0 {
            continue;
        }
        tokio::select! {
            () = app.purchase_wakers.relay.notified() => {}
            () = tokio::time::sleep(poll) => {}
            () = stop.cancelled() => return,
        }
    }
}
