//! Retention of operational logs: rows that only grow with traffic (online/offline
//! transitions, OTA reports as received, relayed outbox messages, the audit trail, payment
//! callback signatures seen, dead letters) are deleted once older than
//! their configured age, so a fleet's database does not grow without bound. Weight readings
//! have their own, partition-based retention ([`crate::weights::maintain_partitions`]); orders,
//! settlements, anomalies and registry data are business records and are never swept.
//!
//! Deletes go oldest first in batches of `retention.batch_rows`, each its own short statement,
//! so a sweep never holds many row locks at once nor blocks the writers. Several instances may
//! sweep at the same time: a row deleted by one is simply not found by the other.

use crate::app::App;
use crate::error::StoreError;

/// One swept log: its table and the column whose age decides.
#[derive(Debug, Clone, Copy)]
struct Log {
    table: &'static str,
    age_column: &'static str,
}

const STATUS_HISTORY: Log = Log { table: "device_status_history", age_column: "at" };
const OTA_REPORTS: Log = Log { table: "ota_reports", age_column: "received_at" };
// From when a row is done with: published (a message nobody confirms) or confirmed (a
// settlement). A row not yet done (`done_at` NULL) never compares as old, so it is kept however
// long it waits to go out or to be confirmed.
const OUTBOX: Log = Log { table: "outbox", age_column: "done_at" };
const AUDIT: Log = Log { table: "audit_log", age_column: "at" };
const DEAD_LETTERS: Log = Log { table: "dead_letters", age_column: "created_at" };
// A signature older than the tolerance window is refused as stale anyway: its row is no longer
// needed to refuse a replay.
const PAYMENT_CALLBACKS: Log = Log { table: "payment_callbacks", age_column: "received_at" };

/// Rows deleted by one sweep, per table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// `device_status_history` rows.
    pub status_history: u64,
    /// `ota_reports` rows.
    pub ota_reports: u64,
    /// `outbox` rows (relayed ones only).
    pub outbox: u64,
    /// `audit_log` rows.
    pub audit: u64,
    /// `dead_letters` rows.
    pub dead_letters: u64,
    /// `payment_callbacks` rows (signatures seen).
    pub payment_callbacks: u64,
}

/// Deletes every row past its retention (a table with 0 days is kept forever).
///
/// # Errors
/// Any storage error; what was deleted before it stays deleted, the next sweep goes on.
pub async fn sweep(app: &App) -> Result<Swept, StoreError> {
    let cfg = &app.config.retention;
    let swept = Swept {
        status_history: sweep_log(app, STATUS_HISTORY, cfg.status_history_days).await?,
        ota_reports: sweep_log(app, OTA_REPORTS, cfg.ota_reports_days).await?,
        outbox: sweep_log(app, OUTBOX, cfg.outbox_published_days).await?,
        audit: sweep_log(app, AUDIT, cfg.audit_days).await?,
        dead_letters: sweep_log(app, DEAD_LETTERS, cfg.dead_letters_days).await?,
        // A day is far beyond any tolerance window (at most an hour, config validation).
        payment_callbacks: sweep_log(app, PAYMENT_CALLBACKS, 1).await?,
    };
    if swept != Swept::default() {
        tracing::info!(
            status_history = swept.status_history,
            ota_reports = swept.ota_reports,
            outbox = swept.outbox,
            audit = swept.audit,
            dead_letters = swept.dead_letters,
            payment_callbacks = swept.payment_callbacks,
            "deleted operational logs past retention"
        );
    }
    Ok(swept)
}

async fn sweep_log(app: &App, log: Log, days: u32) -> Result<u64, StoreError> {
    if days == 0 {
        return Ok(0);
    }
    let batch = i64::from(app.config.retention.batch_rows);
    let days = i32::try_from(days).unwrap_or(i32::MAX);
    // The identifiers are constants of this module, never input.
    let statement = format!(
        "DELETE FROM {table} WHERE id IN (
           SELECT id FROM {table}
            WHERE {age} < now() - make_interval(days => $1)
            ORDER BY {age} LIMIT $2)",
        table = log.table,
        age = log.age_column,
    );
    let client = app.pg.get().await?;
    let mut total = 0;
    loop {
        let deleted = client.execute(&statement, &[&days, &batch]).await?;
        total += deleted;
        app.metrics.retention_deleted.with_label_values(&[log.table]).inc_by(deleted);
        if deleted < u64::try_from(batch).unwrap_or(u64::MAX) {
            return Ok(total);
        }
    }
}
