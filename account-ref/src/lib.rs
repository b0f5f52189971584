//! A reference account service consumer: what the device service's settlements expect on the
//! other side (SPEC.md 3.5). The device service publishes each settlement at least once, and
//! again until it is confirmed; this consumer applies each `idem_key` once, in a ledger of its
//! own in PostgreSQL (so a Redis that lost data, or a settlement published twice, never charges
//! twice), and only then confirms it on `P account:confirmations`. The tests and the demo run
//! it; a real account service does the same three steps against its own books.

use redis::streams::StreamId;
use redis_conn::RedisConn;
use tokio_util::sync::CancellationToken;

/// The stream settlements arrive on, under the deployment's key prefix.
pub const SETTLEMENTS: &str = "account:settlements";
/// The stream confirmations go to.
pub const CONFIRMATIONS: &str = "account:confirmations";
/// The consumer group this service reads settlements in.
pub const GROUP: &str = "account";
/// Longest idempotency key taken into the ledger.
const MAX_TEXT: usize = 256;
/// Entries a confirmation stream keeps, approximately; the device service reads it promptly.
const CONFIRMATIONS_MAXLEN: u64 = 1_000_000;

/// The ledger's table, created if missing.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS account_ledger (
    idem_key     text PRIMARY KEY,
    order_id     text NOT NULL,
    amount_cents bigint NOT NULL,
    currency     text,
    payload      jsonb NOT NULL,
    applied_at   timestamptz NOT NULL DEFAULT now()
)";

/// What went wrong applying settlements.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// Redis failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// PostgreSQL failed.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

/// What happened to one settlement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Charged now.
    Charged,
    /// Its `idem_key` was charged before: nothing charged.
    Duplicate,
    /// Not a settlement this consumer understands: confirmed as refused, never charged.
    Refused,
}

impl Applied {
    /// The confirmation's `result` field.
    pub fn label(self) -> &'static str {
        match self {
            Applied::Charged => "charged",
            Applied::Duplicate => "duplicate",
            Applied::Refused => "refused",
        }
    }
}

/// The consumer: its ledger and where it reads.
#[derive(Debug)]
pub struct Consumer {
    pg: tokio_postgres::Client,
    prefix: String,
    name: String,
}

impl Consumer {
    /// A consumer named `name` (its name in the group) for keys under `prefix`, with its ledger
    /// in `pg` (created if missing).
    ///
    /// # Errors
    /// PostgreSQL errors.
    pub async fn new(pg: tokio_postgres::Client, prefix: &str, name: &str) -> Result<Self, AccountError> {
        pg.batch_execute(SCHEMA).await?;
        Ok(Self { pg, prefix: prefix.to_owned(), name: name.to_owned() })
    }

    /// Applies one settlement entry to the ledger, once per `idem_key`.
    ///
    /// # Errors
    /// PostgreSQL errors: nothing was applied, the entry is read again.
    pub async fn apply(&self, entry: &StreamId) -> Result<(Option<String>, Applied), AccountError> {
        let fields = redis_conn::bulk_fields(entry.map.clone());
        let text = |k: &str| fields.get(k).and_then(|v| String::from_utf8(v.clone()).ok());
        let (Some(key), Some(payload)) = (text("idem_key"), text("payload")) else {
            return Ok((None, Applied::Refused));
        };
        // Bounded before the ledger: PostgreSQL refuses a NUL in text and in jsonb (`\u0000`), and
        // an entry it refused would be read again for ever.
        if key.len() > MAX_TEXT || key.contains('\0') {
            return Ok((None, Applied::Refused));
        }
        if payload.contains("\\u0000") {
            return Ok((Some(key), Applied::Refused));
        }
        let Ok(payload) = serde_json::from_str::<serde_json::Value>(&payload) else {
            return Ok((Some(key), Applied::Refused));
        };
        let (Some(order), Some(amount)) = (
            payload.get("order_id").and_then(|v| v.as_str()),
            payload.get("amount_cents").and_then(serde_json::Value::as_i64),
        ) else {
            return Ok((Some(key), Applied::Refused));
        };
        let currency = payload.get("currency").and_then(|v| v.as_str());
        let inserted = self
            .pg
            .execute(
                "INSERT INTO account_ledger (idem_key, order_id, amount_cents, currency, payload)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (idem_key) DO NOTHING",
                &[&key, &order, &amount, &currency, &payload],
            )
            .await?;
        Ok((Some(key), if inserted == 1 { Applied::Charged } else { Applied::Duplicate }))
    }

    /// Reads settlements until `stop`: applies each, confirms it, then acknowledges it. Errors
    /// are retried: an entry is acknowledged only once its confirmation is written.
    pub async fn run(&self, mut redis: RedisConn, block_ms: u64, stop: CancellationToken) {
        let stream = format!("{}{SETTLEMENTS}", self.prefix);
        let mut group_ready = false;
        let mut cursor = "0";
        while !stop.is_cancelled() {
            if !group_ready {
                match redis_conn::ensure_group(&mut redis, &stream, GROUP, "0").await {
                    Ok(()) => group_ready = true,
                    Err(e) => {
                        tracing::warn!(error = %e, "failed to create the settlements group");
                        pause(&stop).await;
                        continue;
                    }
                }
            }
            let read = redis_conn::read_group(&mut redis, &stream, GROUP, &self.name, cursor, 200, block_ms).await;
            let entries = match read {
                Ok(entries) => entries,
                Err(e) => {
                    if e.code() == Some("NOGROUP") {
                        // Redis lost the stream: the device service publishes what is unconfirmed again.
                        group_ready = false;
                        cursor = "0";
                    }
                    tracing::warn!(error = %e, "failed to read settlements");
                    pause(&stop).await;
                    continue;
                }
            };
            if entries.is_empty() {
                cursor = ">";
                continue;
            }
            if let Err(e) = self.handle(&mut redis, &stream, &entries).await {
                tracing::warn!(error = %e, "failed to apply settlements; reading them again");
                cursor = "0";
                pause(&stop).await;
            }
        }
    }

    async fn handle(&self, redis: &mut RedisConn, stream: &str, entries: &[StreamId]) -> Result<(), AccountError> {
        let confirmations = format!("{}{CONFIRMATIONS}", self.prefix);
        let mut pipe = redis::pipe();
        for entry in entries {
            let (key, applied) = self.apply(entry).await?;
            tracing::debug!(id = %entry.id, key = key.as_deref().unwrap_or(""), result = applied.label(), "settlement");
            if let Some(key) = key {
                pipe.cmd("XADD")
                    .arg(&confirmations)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(CONFIRMATIONS_MAXLEN)
                    .arg("*")
                    .arg("idem_key")
                    .arg(key)
                    .arg("result")
                    .arg(applied.label())
                    .ignore();
            }
        }
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        pipe.cmd("XACK").arg(stream).arg(GROUP).arg(&ids).ignore();
        pipe.query_async::<()>(redis).await?;
        Ok(())
    }
}

async fn pause(stop: &CancellationToken) {
    tokio::select! {
        () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        () = stop.cancelled() => {}
    }
}
