//! The outbox: messages for other services are written in the same transaction as the
//! decision they announce (a settlement, an anomaly, a restock order), then a relay publishes
//! them to Redis streams. Publishing is at least once: the relay marks rows published only
//! after `XADD` succeeded, so a relay that dies in between publishes those rows again, each
//! time with the same `idem_key`, which consumers use to drop the repeat (SPEC.md 3.5).
//!
//! A settlement is delivered only once the account service confirms it on
//! `P account:confirmations`: Redis holding the message is not enough, since a Redis that loses
//! data (or trims a stream its reader fell behind on) would lose the charge. Until confirmed, a
//! settlement is published again every `purchases.settlement_resend_s`.

use std::sync::Arc;
use std::time::Duration;

use redis_conn::RedisConn;
use serde_json::Value;
use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;

use super::money;
use crate::app::App;
use crate::error::StoreError;

/// Settlements for the account service (stream `P account:settlements`); confirmed on
/// [`CONFIRMATIONS`].
pub const SETTLEMENTS: &str = "account:settlements";
/// The account service's answers, one entry per money message it applied: `idem_key`,
/// `result` (`paid`, `failed`, `refused`) and `reason` (stream `P account:confirmations`).
pub const CONFIRMATIONS: &str = "account:confirmations";
/// The consumer group the device service reads confirmations in.
const GROUP: &str = "device-svc";
/// Longest idempotency key the outbox writes (`settlement:<order id>` and the like).
const MAX_IDEM_KEY: usize = 256;
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

/// Publishes up to a batch of each kind of row: those never published, and settlements
/// published more than `purchases.settlement_resend_s` ago and still unconfirmed. Returns how
/// many were published.
///
/// The batch is claimed for [`LEASE`] in one short statement, published with no transaction
/// open (Redis is never waited on while PostgreSQL rows are locked), then marked published. A
/// relay that stops or freezes in between holds nothing; its rows are claimed again once their
/// lease has run out and published again, with the same `idem_key`. A relay that Redis refused
/// hands its claim back at once.
///
/// # Errors
/// PostgreSQL or Redis errors; the rows stay unpublished and are tried again.
pub async fn relay_once(app: &App) -> Result<usize, StoreError> {
    let client = app.pg.get().await?;
    #[allow(clippy::cast_precision_loss)] // seconds of a setting
    let resend_s = app.config.purchases.settlement_resend_s as f64;
    let mut rows = client
        .query(
            // Two claims, each on its own partial index, so each is an ordered index scan that
            // stops at the batch and marks the dead entries it passes: the rows published since
            // the last vacuum are skipped for free afterwards. (One claim with an OR became a
            // bitmap scan visiting every dead row of the unpublished index on every poll.)
            "WITH fresh AS (SELECT id FROM outbox
                             WHERE published_at IS NULL AND (relay_until IS NULL OR relay_until < now())
                             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED),
                  unconfirmed AS (SELECT id FROM outbox
                                   WHERE done_at IS NULL AND published_at < now() - make_interval(secs => $3)
                                     AND (relay_until IS NULL OR relay_until < now())
                                   ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
             UPDATE outbox SET relay_until = now() + make_interval(secs => $2)
              WHERE id IN (SELECT id FROM fresh UNION ALL SELECT id FROM unconfirmed)
              RETURNING id, stream, idem_key, payload, sends",
            &[&BATCH, &LEASE.as_secs_f64(), &resend_s],
        )
        .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    rows.sort_unstable_by_key(|r| r.get::<_, i64>(0));
    let mut cmds = Vec::with_capacity(rows.len());
    let mut ids = Vec::with_capacity(rows.len());
    let mut streams = Vec::with_capacity(rows.len());
    for row in &rows {
        let (id, stream, key, payload): (i64, String, String, Value) = (row.get(0), row.get(1), row.get(2), row.get(3));
        let kind = payload.get("type").and_then(Value::as_str).unwrap_or("message").to_owned();
        let mut xadd = redis::cmd("XADD");
        xadd.arg(format!("{}{stream}", app.keys.prefix()))
            .arg("MAXLEN")
            .arg("~")
            .arg(MAXLEN)
            .arg("*")
            .arg("idem_key")
            .arg(&key)
            .arg("type")
            .arg(kind)
            .arg("payload")
            .arg(payload.to_string());
        cmds.push(xadd);
        ids.push(id);
        streams.push(stream);
    }
    let mut con = app.redis.clone();
    // The streams may lie in different Redis Cluster slots.
    if let Err(e) = con.query_each(cmds).await {
        // Redis refused the batch (it restarts, say): hand the claim back so that the next
        // round tries again at once, instead of the whole lease later; with Redis failing
        // again within every lease, a held claim would hold the money messages for minutes.
        // (Some entries may have been added: they are sent again with the same `idem_key`.)
        client.execute("UPDATE outbox SET relay_until = NULL WHERE id = ANY($1)", &[&ids]).await?;
        return Err(e.into());
    }
    // A settlement stays not done until confirmed (unless it was confirmed meanwhile); any other
    // message is done once published.
    client
        .execute(
            "UPDATE outbox SET published_at = now(), sends = sends + 1, relay_until = NULL,
                    done_at = CASE WHEN confirmed_at IS NOT NULL THEN done_at
                                   WHEN stream = $2 THEN NULL ELSE now() END
              WHERE id = ANY($1)",
            &[&ids, &SETTLEMENTS],
        )
        .await?;
    for (stream, row) in streams.iter().zip(&rows) {
        app.metrics.outbox_published.with_label_values(&[stream]).inc();
        if row.get::<_, i32>(4) > 0 {
            app.metrics.outbox_resent.with_label_values(&[stream]).inc();
        }
    }
    Ok(ids.len())
}

/// Reads the account service's confirmations until `stop` and marks each confirmed settlement
/// done; every `streams.claim_interval_ms` it also takes over what another instance read and
/// left unacknowledged for `claim_idle_ms` (an instance killed mid-batch), as the upstream
/// readers do. `redis` must be a connection of its own (the read blocks).
pub async fn run_confirmations(app: Arc<App>, mut redis: RedisConn, stop: CancellationToken) {
    let stream = format!("{}{CONFIRMATIONS}", app.keys.prefix());
    let me = app.config.instance_id.clone();
    let streams = app.config.streams.clone();
    let mut group_ready = false;
    let mut cursor = "0";
    let mut last_claim = tokio::time::Instant::now();
    while !stop.is_cancelled() {
        if !group_ready {
            match redis_conn::ensure_group(&mut redis, &stream, GROUP, "0").await {
                Ok(()) => group_ready = true,
                Err(e) => {
                    tracing::warn!(error = %e, "failed to create the confirmations group");
                    pause(&stop).await;
                    continue;
                }
            }
        }
        let read = redis_conn::read_group(&mut redis, &stream, GROUP, &me, cursor, 500, streams.block_ms).await;
        match read {
            Ok(entries) if entries.is_empty() => cursor = ">",
            Ok(entries) => {
                if !record(&app, &mut redis, &stream, entries).await {
                    pause(&stop).await;
                    continue;
                }
            }
            Err(e) => {
                if e.code() == Some("NOGROUP") {
                    // Redis lost the stream: confirmations from now on are read from its start.
                    group_ready = false;
                }
                // A read whose reply was lost may have handed entries to this consumer: they
                // wait in its pending list.
                cursor = "0";
                tracing::warn!(error = %e, "failed to read confirmations");
                pause(&stop).await;
                continue;
            }
        }
        if last_claim.elapsed() >= Duration::from_millis(streams.claim_interval_ms) {
            last_claim = tokio::time::Instant::now();
            take_over(&app, &mut redis, &stream, &me).await;
        }
    }
}

/// Records the answers `entries` carry, then acknowledges them; `false` (logged) when they
/// could not be recorded and must be read again.
async fn record(app: &App, redis: &mut RedisConn, stream: &str, entries: Vec<redis::streams::StreamId>) -> bool {
    let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
    let answers: Vec<money::Answer> = entries.into_iter().filter_map(|e| answer(app, e)).collect();
    match money::record_answers(app, &answers).await {
        Ok(n) => app.metrics.outbox_confirmed.inc_by(n),
        Err(e) => {
            tracing::warn!(error = %e, "failed to record confirmations; they are read again");
            return false;
        }
    }
    let _: redis::RedisResult<i64> = redis::cmd("XACK").arg(stream).arg(GROUP).arg(&ids).query_async(redis).await;
    true
}

/// Takes over and records the confirmations other instances left unacknowledged, then removes
/// the readers that are gone from the group.
async fn take_over(app: &App, redis: &mut RedisConn, stream: &str, me: &str) {
    let streams = &app.config.streams;
    let mut start = "0-0".to_owned();
    loop {
        match redis_conn::claim_idle(redis, stream, GROUP, me, streams.claim_idle_ms, &start, 500).await {
            Ok((next, entries)) => {
                if !entries.is_empty() {
                    app.metrics.claimed.inc_by(entries.len() as u64);
                    tracing::info!(entries = entries.len(), "took over confirmations of a stopped instance");
                    if !record(app, redis, stream, entries).await {
                        return;
                    }
                }
                if next == "0-0" {
                    break;
                }
                start = next;
            }
            Err(e) => {
                tracing::warn!(error = %e, "failed to claim idle confirmations");
                return;
            }
        }
    }
    if let Err(e) = redis_conn::forget_departed(redis, stream, GROUP, me, streams.departed_after_ms).await {
        tracing::warn!(error = %e, "failed to list the confirmation readers");
    }
}

/// Sets `devsvc_outbox_unconfirmed`.
///
/// # Errors
/// PostgreSQL errors.
pub async fn refresh_gauges(app: &App) -> Result<(), StoreError> {
    let client = app.pg.get().await?;
    let n: i64 = client
        .query_one("SELECT count(*) FROM outbox WHERE done_at IS NULL AND published_at IS NOT NULL", &[])
        .await?
        .get(0);
    app.metrics.outbox_unconfirmed.set(n);
    Ok(())
}

/// The answer a confirmation entry carries, or `None` (counted) for one that names no outbox
/// row of ours or says something this service does not know.
fn answer(app: &App, entry: redis::streams::StreamId) -> Option<money::Answer> {
    let fields = redis_conn::bulk_fields(entry.map);
    let text = |k: &str| fields.get(k).and_then(|v| std::str::from_utf8(v).ok());
    // An outbox key is ours: short and free of NUL. Anything else names no row, and must not
    // reach PostgreSQL (which refuses a NUL, and the batch would be read forever).
    let key = text("idem_key").filter(|k| k.len() <= MAX_IDEM_KEY && !k.contains('\0'));
    let outcome = text("result").and_then(|r| money::Outcome::parse(r, text("reason")));
    match (key, outcome) {
        (Some(key), Some(result)) => Some(money::Answer { idem_key: key.to_owned(), result }),
        _ => {
            app.metrics.payment_results.with_label_values(&["unknown", "unreadable"]).inc();
            tracing::warn!(id = %entry.id, "a confirmation without a key or result this service knows; dropped");
            None
        }
    }
}

async fn pause(stop: &CancellationToken) {
    tokio::select! {
        () = tokio::time::sleep(Duration::from_millis(500)) => {}
        () = stop.cancelled() => {}
    }
}

/// Relays until `stop`: at once when woken, otherwise every poll interval.
pub async fn run_relay(app: Arc<App>, stop: CancellationToken) {
    let poll = Duration::from_millis(app.config.purchases.poll_ms);
    loop {
        let published = match relay_once(&app).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "failed to relay the outbox; retrying");
                app.metrics.outbox_relay_failures.inc();
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
