//! A reference account service consumer: what the device service's money messages expect on
//! the other side (SPEC.md 3.5). The device service publishes each settlement, refund and extra
//! charge at least once, and again until it is answered; this consumer applies each `idem_key`
//! once, in a ledger of its own in PostgreSQL (so a Redis that lost data, or a message published
//! twice, never moves money twice), and only then answers it on `P account:confirmations`:
//! `paid`, or `failed` with a reason. A repeated message is answered with the result recorded
//! the first time.
//!
//! Funds: a user with a row in `account_funds` (per shop) is charged from that balance, and a
//! charge larger than the balance fails with `insufficient_funds`; a user without a row has no
//! limit. A failed charge is the account side's to retry: every `retry` it is tried again, and
//! once the balance covers it, it is paid and answered `paid` (which lifts the shop's "unpaid
//! order" block), unless the device service voided it (an operator waived the order: type
//! `void`, naming the charge in `voids`). The tests and the demo run it; a real account
//! service does the same steps against its own books.

use std::time::Duration;

use tokio::time::Instant;

use redis::streams::StreamId;
use redis_conn::RedisConn;
use tokio_util::sync::CancellationToken;

/// The stream money messages arrive on, under the deployment's key prefix.
pub const SETTLEMENTS: &str = "account:settlements";
/// The stream answers go to.
pub const CONFIRMATIONS: &str = "account:confirmations";
/// The consumer group this service reads settlements in.
pub const GROUP: &str = "account";
/// Longest idempotency key taken into the ledger.
const MAX_TEXT: usize = 256;
/// Entries a confirmation stream keeps, approximately; the device service reads it promptly.
const CONFIRMATIONS_MAXLEN: u64 = 1_000_000;

/// The ledger's tables, created if missing (and brought up to date).
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS account_ledger (
    idem_key     text PRIMARY KEY,
    order_id     text NOT NULL,
    amount_cents bigint NOT NULL,
    currency     text,
    payload      jsonb NOT NULL,
    applied_at   timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE account_ledger ADD COLUMN IF NOT EXISTS kind text NOT NULL DEFAULT 'settlement';
ALTER TABLE account_ledger ADD COLUMN IF NOT EXISTS tenant text NOT NULL DEFAULT '';
ALTER TABLE account_ledger ADD COLUMN IF NOT EXISTS user_id text NOT NULL DEFAULT '';
ALTER TABLE account_ledger ADD COLUMN IF NOT EXISTS state text NOT NULL DEFAULT 'paid';
ALTER TABLE account_ledger ADD COLUMN IF NOT EXISTS failure text;
CREATE INDEX IF NOT EXISTS account_ledger_failed ON account_ledger (applied_at) WHERE state = 'failed';
ALTER TABLE account_ledger ADD COLUMN IF NOT EXISTS answered boolean NOT NULL DEFAULT true;
CREATE INDEX IF NOT EXISTS account_ledger_unanswered ON account_ledger (applied_at) WHERE NOT answered;
CREATE TABLE IF NOT EXISTS account_funds (
    tenant        text NOT NULL,
    user_id       text NOT NULL,
    balance_cents bigint NOT NULL,
    PRIMARY KEY (tenant, user_id)
)";

/// What went wrong applying messages.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// Redis failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// PostgreSQL failed.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

/// What happened to one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The money moved (a charge taken, a refund given), now or the first time.
    Paid,
    /// It did not, and why (`insufficient_funds`); tried again every `retry`.
    Failed(String),
    /// Not a message this consumer understands: answered refused, never applied.
    Refused,
}

impl Applied {
    /// The answer's `result` field.
    pub fn label(&self) -> &'static str {
        match self {
            Applied::Paid => "paid",
            Applied::Failed(_) => "failed",
            Applied::Refused => "refused",
        }
    }

    fn reason(&self) -> &str {
        match self {
            Applied::Failed(why) => why,
            Applied::Refused => "unreadable",
            Applied::Paid => "",
        }
    }
}

/// The consumer: its ledger and where it reads.
#[derive(Debug)]
pub struct Consumer {
    pg: tokio::sync::Mutex<tokio_postgres::Client>,
    prefix: String,
    name: String,
    retry: Duration,
}

impl Consumer {
    /// A consumer named `name` (its name in the group) for keys under `prefix`, with its ledger
    /// in `pg` (created if missing); failed charges are retried every 5 s.
    ///
    /// # Errors
    /// PostgreSQL errors.
    pub async fn new(pg: tokio_postgres::Client, prefix: &str, name: &str) -> Result<Self, AccountError> {
        pg.batch_execute(SCHEMA).await?;
        Ok(Self {
            pg: tokio::sync::Mutex::new(pg),
            prefix: prefix.to_owned(),
            name: name.to_owned(),
            retry: Duration::from_secs(5),
        })
    }

    /// The same consumer retrying failed charges every `retry`.
    #[must_use]
    pub fn with_retry(mut self, retry: Duration) -> Self {
        self.retry = retry;
        self
    }

    /// Applies one message entry to the ledger, once per `idem_key`.
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
        let str_of = |k: &str| payload.get(k).and_then(|v| v.as_str());
        let (Some(order), Some(amount), Some(kind)) =
            (str_of("order_id"), payload.get("amount_cents").and_then(serde_json::Value::as_i64), str_of("type"))
        else {
            return Ok((Some(key), Applied::Refused));
        };
        if !matches!(kind, "settlement" | "charge" | "refund" | "void") || amount < 0 {
            return Ok((Some(key), Applied::Refused));
        }
        let voids = str_of("voids").filter(|v| v.len() <= MAX_TEXT && !v.contains('\0')).map(str::to_owned);
        if kind == "void" && voids.is_none() {
            return Ok((Some(key), Applied::Refused));
        }
        let (tenant, user) = (str_of("tenant").unwrap_or(""), str_of("user_id").unwrap_or(""));
        let currency = str_of("currency");
        let mut pg = self.pg.lock().await;
        let tx = pg.transaction().await?;
        let new = tx
            .execute(
                "INSERT INTO account_ledger (idem_key, order_id, amount_cents, currency, payload, kind, tenant, user_id, state)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending') ON CONFLICT (idem_key) DO NOTHING",
                &[&key, &order, &amount, &currency, &payload, &kind, &tenant, &user],
            )
            .await?
            == 1;
        let applied = if new && kind == "void" {
            let applied = void(&tx, voids.as_deref().unwrap_or_default(), order).await?;
            set_state(&tx, &key, &applied).await?;
            applied
        } else if new {
            let applied = move_money(&tx, kind, tenant, user, amount).await?;
            set_state(&tx, &key, &applied).await?;
            applied
        } else {
            let row = tx.query_one("SELECT state, failure FROM account_ledger WHERE idem_key = $1", &[&key]).await?;
            match row.get::<_, String>(0).as_str() {
                "failed" => Applied::Failed(row.get::<_, Option<String>>(1).unwrap_or_default()),
                "voided" => Applied::Failed("voided".into()),
                _ => Applied::Paid,
            }
        };
        tx.commit().await?;
        Ok((Some(key), applied))
    }

    /// Tries every failed charge again; returns the answers to send for those now paid.
    ///
    /// # Errors
    /// PostgreSQL errors.
    pub async fn retry_failed(&self) -> Result<Vec<String>, AccountError> {
        let mut pg = self.pg.lock().await;
        let tx = pg.transaction().await?;
        let rows = tx
            .query(
                "SELECT idem_key, kind, tenant, user_id, amount_cents FROM account_ledger
                  WHERE state = 'failed' ORDER BY applied_at LIMIT 500 FOR UPDATE",
                &[],
            )
            .await?;
        let mut paid = Vec::new();
        for r in &rows {
            let (key, kind, tenant, user, amount): (String, String, String, String, i64) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            let applied = move_money(&tx, &kind, &tenant, &user, amount).await?;
            if applied == Applied::Paid {
                set_state(&tx, &key, &applied).await?;
                // Answered only once the answer is in Redis (`answer_retries`): a Redis that
                // fails in between must not leave the device service waiting forever.
                tx.execute("UPDATE account_ledger SET answered = false WHERE idem_key = $1", &[&key]).await?;
                paid.push(key);
            }
        }
        tx.commit().await?;
        Ok(paid)
    }

    /// Reads settlements until `stop`: applies each, confirms it, then acknowledges it. Errors
    /// are retried: an entry is acknowledged only once its confirmation is written.
    pub async fn run(&self, mut redis: RedisConn, block_ms: u64, stop: CancellationToken) {
        let stream = format!("{}{SETTLEMENTS}", self.prefix);
        let mut group_ready = false;
        let mut cursor = "0";
        let mut last_retry = Instant::now();
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
                    }
                    // A read whose reply was lost may have handed entries to this consumer: they
                    // wait in its pending list.
                    cursor = "0";
                    tracing::warn!(error = %e, "failed to read settlements");
                    pause(&stop).await;
                    continue;
                }
            };
            tracing::trace!(cursor, entries = entries.len(), "settlements read");
            if last_retry.elapsed() >= self.retry {
                last_retry = Instant::now();
                if let Err(e) = self.answer_retries(&mut redis).await {
                    tracing::warn!(error = %e, "failed to retry failed charges");
                }
            }
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
        let mut cmds = Vec::with_capacity(entries.len() + 1);
        for entry in entries {
            let (key, applied) = self.apply(entry).await?;
            tracing::debug!(id = %entry.id, key = key.as_deref().unwrap_or(""), result = applied.label(), "money message");
            if let Some(key) = key {
                cmds.push(self.answer(&key, &applied));
            }
        }
        // Answers first: an entry acknowledged is never read again.
        redis.query_each(cmds).await?;
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        redis::cmd("XACK").arg(stream).arg(GROUP).arg(&ids).query_async::<()>(redis).await?;
        Ok(())
    }

    /// Retries the failed charges, then answers every charge paid on a retry and not answered
    /// yet (this round's, and any whose answer Redis refused before).
    async fn answer_retries(&self, redis: &mut RedisConn) -> Result<(), AccountError> {
        let paid = self.retry_failed().await?;
        if !paid.is_empty() {
            tracing::info!(paid = paid.len(), "failed charges paid on retry");
        }
        let unanswered: Vec<String> = {
            let pg = self.pg.lock().await;
            let rows = pg
                .query("SELECT idem_key FROM account_ledger WHERE NOT answered ORDER BY applied_at LIMIT 500", &[])
                .await?;
            rows.iter().map(|r| r.get(0)).collect()
        };
        if unanswered.is_empty() {
            return Ok(());
        }
        redis.query_each(unanswered.iter().map(|key| self.answer(key, &Applied::Paid)).collect()).await?;
        let pg = self.pg.lock().await;
        pg.execute("UPDATE account_ledger SET answered = true WHERE idem_key = ANY($1)", &[&unanswered]).await?;
        Ok(())
    }

    /// The confirmation of `key`'s outcome, for the device service.
    fn answer(&self, key: &str, applied: &Applied) -> redis::Cmd {
        let mut xadd = redis::cmd("XADD");
        xadd.arg(format!("{}{CONFIRMATIONS}", self.prefix))
            .arg("MAXLEN")
            .arg("~")
            .arg(CONFIRMATIONS_MAXLEN)
            .arg("*")
            .arg("idem_key")
            .arg(key)
            .arg("result")
            .arg(applied.label())
            .arg("reason")
            .arg(applied.reason());
        xadd
    }
}

/// Voids the charge `key` (the device service's operator waived it): a failed charge is not
/// retried any more (`paid`: voided); one collected meanwhile cannot be (`failed`,
/// `already_paid`); one never seen is recorded voided, so it is never charged if it arrives.
async fn void(tx: &tokio_postgres::Transaction<'_>, key: &str, order: &str) -> Result<Applied, AccountError> {
    let placeholder = serde_json::json!({});
    tx.execute(
        "INSERT INTO account_ledger (idem_key, order_id, amount_cents, payload, kind, state, failure)
         VALUES ($1, $2, 0, $3, 'settlement', 'voided', 'voided') ON CONFLICT (idem_key) DO NOTHING",
        &[&key, &order, &placeholder],
    )
    .await?;
    let state: String =
        tx.query_one("SELECT state FROM account_ledger WHERE idem_key = $1 FOR UPDATE", &[&key]).await?.get(0);
    if state == "paid" {
        return Ok(Applied::Failed("already_paid".into()));
    }
    tx.execute("UPDATE account_ledger SET state = 'voided', failure = 'voided' WHERE idem_key = $1", &[&key]).await?;
    Ok(Applied::Paid)
}

/// Takes a charge from (or gives a refund to) the user's balance, if the user has one.
async fn move_money(
    tx: &tokio_postgres::Transaction<'_>,
    kind: &str,
    tenant: &str,
    user: &str,
    amount: i64,
) -> Result<Applied, AccountError> {
    let balance = tx
        .query_opt(
            "SELECT balance_cents FROM account_funds WHERE tenant = $1 AND user_id = $2 FOR UPDATE",
            &[&tenant, &user],
        )
        .await?
        .map(|r| r.get::<_, i64>(0));
    if kind == "void" {
        return Ok(Applied::Paid);
    }
    let Some(balance) = balance else { return Ok(Applied::Paid) };
    let delta = if kind == "refund" { amount } else { -amount };
    if balance + delta < 0 {
        return Ok(Applied::Failed("insufficient_funds".into()));
    }
    tx.execute(
        "UPDATE account_funds SET balance_cents = balance_cents + $3 WHERE tenant = $1 AND user_id = $2",
        &[&tenant, &user, &delta],
    )
    .await?;
    Ok(Applied::Paid)
}

async fn set_state(tx: &tokio_postgres::Transaction<'_>, key: &str, applied: &Applied) -> Result<(), AccountError> {
    let failure = match applied {
        Applied::Failed(why) => Some(why.as_str()),
        _ => None,
    };
    tx.execute(
        "UPDATE account_ledger SET state = $2, failure = $3 WHERE idem_key = $1",
        &[&key, &if failure.is_some() { "failed" } else { "paid" }, &failure],
    )
    .await?;
    Ok(())
}

async fn pause(stop: &CancellationToken) {
    tokio::select! {
        () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        () = stop.cancelled() => {}
    }
}
