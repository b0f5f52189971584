//! Dead letters: an upstream entry that PostgreSQL refuses for what it carries (a NUL in a
//! text, a time out of range, a value breaking a constraint) cannot succeed by being retried, and
//! retrying it would stop its whole shard. It is set aside here with its error, counted
//! (`devsvc_dead_letters_total{type}`, alert `UpstreamDeadLetters`), and the shard moves on.
//! Outages (no connection, a timeout, a conflict between transactions) are not dead letters:
//! those entries are retried until they apply, so nothing is set aside while PostgreSQL is down.
//!
//! An operator lists them (`GET /v1/dead-letters`) and replays one once its cause is fixed
//! (`POST /v1/dead-letters/{id}/replay`): the entry is appended to its stream again, byte for
//! byte, and applied like any other.

use std::collections::HashMap;

use serde::Serialize;
use tokio_postgres::error::SqlState;

use crate::app::App;
use crate::error::StoreError;

/// Whether `e` is about the entry itself (retrying cannot help) rather than an outage.
pub fn is_poison(e: &StoreError) -> bool {
    match e {
        StoreError::Invalid { .. } => true,
        StoreError::Postgres(pg) => pg.code().is_some_and(|c| {
            let class = &c.code()[..2];
            // 22: data exception (NUL, out of range, bad encoding); 23: integrity constraint
            // (a check or foreign key the entry breaks). Not 40 (serialization, deadlock): a retry
            // of those succeeds.
            (class == "22" || class == "23") && *c != SqlState::T_R_SERIALIZATION_FAILURE
        }),
        _ => false,
    }
}

/// Sets an entry aside (once per stream and id: a redelivery of the same entry adds nothing).
///
/// # Errors
/// Storage errors (the entry is then retried like any other).
pub async fn set_aside(
    app: &App,
    stream: &str,
    entry_id: &str,
    fields: &HashMap<String, Vec<u8>>,
    error: &StoreError,
) -> Result<(), StoreError> {
    let kind = protocol::bus::UpEvent::from_fields(fields).map_or("unknown", |e| e.label());
    let mut pairs: Vec<(&String, &Vec<u8>)> = fields.iter().collect();
    pairs.sort_unstable_by_key(|(name, _)| name.as_str());
    let names: Vec<&str> = pairs.iter().map(|(n, _)| n.as_str()).collect();
    let vals: Vec<&[u8]> = pairs.iter().map(|(_, v)| v.as_slice()).collect();
    let client = app.pg.get().await?;
    let added = client
        .execute(
            "INSERT INTO dead_letters (stream, entry_id, kind, names, vals, error) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (stream, entry_id) DO NOTHING",
            &[&stream, &entry_id, &kind, &names, &vals, &error.to_string()],
        )
        .await?;
    if added > 0 {
        app.metrics.dead_letters.with_label_values(&[&kind]).inc();
        tracing::error!(stream, entry = entry_id, kind, error = %error, "upstream entry set aside as a dead letter");
    }
    Ok(())
}

/// A dead letter as operators see it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeadLetter {
    /// Id.
    pub id: i64,
    /// The stream it came from.
    pub stream: String,
    /// Its entry id there.
    pub entry_id: String,
    /// Its type (`veh`, `weight_report`, `session_opened`, ...: the metric's label).
    pub kind: String,
    /// Its fields (values as text, lossily).
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// Why it could not be applied.
    pub error: String,
    /// When it was set aside, ms.
    pub created_ms: u64,
    /// When it was replayed, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replayed_ms: Option<u64>,
}

/// The newest dead letters (`open`: only those not replayed).
///
/// # Errors
/// Storage errors.
pub async fn list(app: &App, open: bool, before_id: Option<i64>, limit: i64) -> Result<Vec<DeadLetter>, StoreError> {
    let client = app.pg.get().await?;
    let rows = client
        .query(
            "SELECT id, stream, entry_id, kind, names, vals, error, created_at, replayed_at FROM dead_letters
              WHERE (NOT $1 OR replayed_at IS NULL) AND ($2::bigint IS NULL OR id < $2) ORDER BY id DESC LIMIT $3",
            &[&open, &before_id, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let names: Vec<String> = r.get(4);
            let vals: Vec<Vec<u8>> = r.get(5);
            let fields = names
                .into_iter()
                .zip(vals)
                .map(|(n, v)| (n, serde_json::Value::String(String::from_utf8_lossy(&v).into_owned())))
                .collect();
            DeadLetter {
                id: r.get(0),
                stream: r.get(1),
                entry_id: r.get(2),
                kind: r.get(3),
                fields,
                error: r.get(6),
                created_ms: crate::clock::ms_of(r.get(7)),
                replayed_ms: r.get::<_, Option<std::time::SystemTime>>(8).map(crate::clock::ms_of),
            }
        })
        .collect())
}

/// Appends dead letter `id` to its stream again (a new entry, the same fields), then marks it
/// replayed. Returns the new entry's id. Redis is never waited on inside the transaction; two
/// replays at once may both append, which the consumer applies idempotently.
///
/// # Errors
/// `NotFound`; `Rejected("already_replayed")`; storage errors.
pub async fn replay(app: &App, id: i64) -> Result<String, StoreError> {
    let mut client = app.pg.get().await?;
    let row = client
        .query_opt("SELECT stream, names, vals, replayed_at IS NOT NULL FROM dead_letters WHERE id = $1", &[&id])
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("dead letter {id}")))?;
    if row.get::<_, bool>(3) {
        return Err(StoreError::rejected("already_replayed", format!("dead letter {id} was replayed")));
    }
    let (stream, names, vals): (String, Vec<String>, Vec<Vec<u8>>) = (row.get(0), row.get(1), row.get(2));
    let fields: Vec<(String, Vec<u8>)> = names.into_iter().zip(vals).collect();
    let new_id: String =
        redis::cmd("XADD").arg(&stream).arg("*").arg(&fields).query_async(&mut app.redis.clone()).await?;
    let tx = client.transaction().await?;
    tx.execute("UPDATE dead_letters SET replayed_at = now() WHERE id = $1", &[&id]).await?;
    crate::auth::audit::commit(tx).await?;
    Ok(new_id)
}
