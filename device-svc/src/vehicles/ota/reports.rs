//! Reports from vehicles (SPEC.md 2.3): download progress, upgrade progress, status changes.
//!
//! Every report is stored as received (`ota_reports`, keyed by its stream entry, so a
//! redelivered entry stores and changes nothing), then folded into the vehicle's row in the
//! same transaction, under the row's lock:
//! - progress only grows (`GREATEST`); the ECU being flashed follows the newest report by the
//!   car's clock; a progress report implies its phase (downloading, upgrading) if the vehicle
//!   is behind it;
//! - a status applies only if it ranks above the current state (`VehicleState::rank`), so a
//!   late or repeated report is stored and changes nothing (counted `stale`); after `failed`
//!   only `rolled_back` applies;
//! - `success` counts only with the target version; another version makes the upgrade
//!   `failed` with error `version_mismatch`;
//! - `failed`, `rolled_back` (and the driver's `timed_out`) record a failure row and an
//!   operator notice (stream `P notices`, type `ota_failure`);
//! - every applied report moves the silence deadline of the vehicle's phase.

use protocol::Vin;
use protocol::mqtt::topic::UplinkKind;
use protocol::vehicle::{OtaDownloadProgress, OtaStatus, OtaStatusReport, OtaUpgradeProgress};
use serde_json::Value;
use tokio_postgres::Transaction;

use super::{VehicleState, compare_versions, parse_version, push, status_str};
use crate::app::App;
use crate::error::StoreError;

/// A report, parsed.
#[derive(Debug)]
enum Report {
    Download(OtaDownloadProgress),
    Upgrade(OtaUpgradeProgress),
    Status(OtaStatusReport),
}

impl Report {
    fn parse(kind: UplinkKind, payload: &[u8]) -> Option<Self> {
        match kind {
            UplinkKind::OtaDownloadProgress => serde_json::from_slice(payload).ok().map(Report::Download),
            UplinkKind::OtaUpgradeProgress => serde_json::from_slice(payload).ok().map(Report::Upgrade),
            UplinkKind::OtaStatus => serde_json::from_slice(payload).ok().map(Report::Status),
            _ => None,
        }
        .filter(Report::in_range)
    }

    fn in_range(&self) -> bool {
        match self {
            Report::Download(d) => d.percent <= 100,
            Report::Upgrade(u) => u.percent <= 100 && u.ecu_percent <= 100,
            Report::Status(_) => true,
        }
    }

    fn task_id(&self) -> &str {
        match self {
            Report::Download(d) => &d.task_id,
            Report::Upgrade(u) => &u.task_id,
            Report::Status(s) => &s.task_id,
        }
    }
}

/// The vehicle's row as a report finds it.
struct Row {
    state: VehicleState,
    target: String,
}

/// One report as it came off an upstream stream.
#[derive(Debug, Clone)]
pub struct Uplink {
    /// Its upstream entry (`stream/id`, unique).
    pub entry: String,
    /// The vehicle.
    pub vin: Vin,
    /// Which report.
    pub kind: UplinkKind,
    /// The JSON as published.
    pub payload: bytes::Bytes,
}

/// Applies a batch of reports in one transaction (one commit for the batch: reports arrive by
/// the thousand during a campaign), in order. Returns each report's result, also counted by
/// kind: `applied`, `stale`, `duplicate`, `unknown_task` or `invalid`.
///
/// # Errors
/// Storage errors: nothing of the batch is stored, and the caller applies it again.
pub async fn apply_batch(app: &App, uplinks: &[Uplink]) -> Result<Vec<&'static str>, StoreError> {
    if uplinks.is_empty() {
        return Ok(Vec::new());
    }
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let mut results = Vec::with_capacity(uplinks.len());
    let mut failures = false;
    for u in uplinks {
        let (result, failed) = apply_one(app, &tx, u).await?;
        failures |= failed;
        results.push(result);
    }
    tx.commit().await?;
    for (u, result) in uplinks.iter().zip(&results) {
        app.metrics.ota_reports.with_label_values(&[u.kind.as_str(), result]).inc();
    }
    if failures {
        app.purchase_wakers.relay.notify_one();
    }
    Ok(results)
}

/// Applies one report inside `tx`; also says whether it recorded a failure (a notice to relay).
async fn apply_one(app: &App, tx: &Transaction<'_>, u: &Uplink) -> Result<(&'static str, bool), StoreError> {
    let (vin, kind) = (&u.vin, u.kind);
    let Some(report) = Report::parse(kind, &u.payload) else {
        tracing::info!(%vin, kind = kind.as_str(), "invalid OTA report");
        return Ok(("invalid", false));
    };
    let raw: Value = serde_json::from_slice(&u.payload).unwrap_or(Value::Null);
    let stored = tx
        .query_opt(
            "INSERT INTO ota_reports (entry, task_id, vin, kind, payload, applied) VALUES ($1, $2, $3, $4, $5, '')
             ON CONFLICT (entry) DO NOTHING RETURNING id",
            &[&u.entry, &report.task_id(), &vin.as_str(), &kind.as_str(), &raw],
        )
        .await?;
    let Some(stored) = stored else { return Ok(("duplicate", false)) };
    let report_id: i64 = stored.get(0);
    let row = tx
        .query_opt(
            "SELECT v.state, t.version FROM ota_task_vehicles v JOIN ota_tasks t ON t.id = v.task_id
              WHERE v.task_id = $1 AND v.vin = $2 FOR UPDATE OF v",
            &[&report.task_id(), &vin.as_str()],
        )
        .await?
        .and_then(|r| VehicleState::parse(r.get(0)).map(|state| Row { state, target: r.get(1) }));
    let result = match row {
        None => "unknown_task",
        Some(row) => fold(app, tx, vin, &report, &row, &raw).await?,
    };
    tx.execute("UPDATE ota_reports SET applied = $2 WHERE id = $1", &[&report_id, &result]).await?;
    let failed = result == "applied" && matches!(&report, Report::Status(s) if s.status >= OtaStatus::Success);
    Ok((result, failed))
}

/// Folds `report` into the vehicle's row.
async fn fold(
    app: &App,
    tx: &Transaction<'_>,
    vin: &Vin,
    report: &Report,
    row: &Row,
    raw: &Value,
) -> Result<&'static str, StoreError> {
    let (task, vin) = (report.task_id(), vin.as_str());
    match report {
        Report::Download(d) => {
            if !row.state.is_active() {
                return Ok("stale");
            }
            let state = at_least(row.state, OtaStatus::Downloading);
            let n = tx
                .execute(
                    "UPDATE ota_task_vehicles SET state = $3, rank = $4, due_at = now() + make_interval(secs => $5),
                            download_percent = GREATEST(download_percent, $6), bytes_done = GREATEST(bytes_done, $7),
                            last_report = $8, last_report_at = now(), updated_at = now()
                      WHERE task_id = $1 AND vin = $2 AND (download_percent < $6 OR rank < $4)",
                    &[
                        &task,
                        &vin,
                        &state.as_str(),
                        &state.rank(),
                        &silence(app, state),
                        &i16::from(d.percent),
                        &i64::try_from(d.bytes_done).unwrap_or(i64::MAX),
                        raw,
                    ],
                )
                .await?;
            moved_or_alive(app, tx, task, vin, row.state, n).await
        }
        Report::Upgrade(u) => {
            if !row.state.is_active() {
                return Ok("stale");
            }
            let state = at_least(row.state, OtaStatus::Upgrading);
            let ts = i64::try_from(u.ts_ms).unwrap_or(i64::MAX);
            let n = tx
                .execute(
                    "UPDATE ota_task_vehicles SET state = $3, rank = $4, due_at = now() + make_interval(secs => $5),
                            upgrade_percent = GREATEST(upgrade_percent, $6),
                            ecu = CASE WHEN $9 > ecu_ts_ms THEN $7 ELSE ecu END,
                            ecu_percent = CASE WHEN $9 > ecu_ts_ms THEN $8 ELSE ecu_percent END,
                            ecu_ts_ms = GREATEST(ecu_ts_ms, $9),
                            last_report = $10, last_report_at = now(), updated_at = now()
                      WHERE task_id = $1 AND vin = $2 AND (upgrade_percent < $6 OR rank < $4 OR ecu_ts_ms < $9)",
                    &[
                        &task,
                        &vin,
                        &state.as_str(),
                        &state.rank(),
                        &silence(app, state),
                        &i16::from(u.percent),
                        &u.ecu,
                        &i16::from(u.ecu_percent),
                        &ts,
                        raw,
                    ],
                )
                .await?;
            moved_or_alive(app, tx, task, vin, row.state, n).await
        }
        Report::Status(s) => fold_status(app, tx, vin, s, row, raw).await,
    }
}

/// `current`, or the phase `status` if the vehicle is behind it.
fn at_least(current: VehicleState, status: OtaStatus) -> VehicleState {
    let phase = VehicleState::Reported(status);
    if current.rank() < phase.rank() { phase } else { current }
}

fn silence(app: &App, state: VehicleState) -> f64 {
    state.silence_limit_s(&app.config.ota).unwrap_or(0) as f64
}

/// A progress report that moved nothing is stale; it still shows the vehicle is alive, so the
/// silence deadline moves on.
async fn moved_or_alive(
    app: &App,
    tx: &Transaction<'_>,
    task: &str,
    vin: &str,
    state: VehicleState,
    updated: u64,
) -> Result<&'static str, StoreError> {
    if updated > 0 {
        return Ok("applied");
    }
    tx.execute(
        "UPDATE ota_task_vehicles SET due_at = now() + make_interval(secs => $3) WHERE task_id = $1 AND vin = $2 AND active",
        &[&task, &vin, &silence(app, state)],
    )
    .await?;
    Ok("stale")
}

async fn fold_status(
    app: &App,
    tx: &Transaction<'_>,
    vin: &str,
    s: &OtaStatusReport,
    row: &Row,
    raw: &Value,
) -> Result<&'static str, StoreError> {
    let task = s.task_id.as_str();
    let rolls_back_failure =
        row.state == VehicleState::Reported(OtaStatus::Failed) && s.status == OtaStatus::RolledBack;
    let mut new = VehicleState::Reported(s.status);
    if !(row.state.is_active() || rolls_back_failure) || new.rank() <= row.state.rank() {
        return Ok("stale");
    }
    let mut error = s.error.clone();
    if s.status == OtaStatus::Success {
        let at_target = match (s.version.as_deref().and_then(parse_version), parse_version(&row.target)) {
            (Some(v), Some(t)) => compare_versions(&v, &t).is_eq(),
            _ => false,
        };
        if !at_target {
            new = VehicleState::Reported(OtaStatus::Failed);
            error = Some(format!("version_mismatch: reported {:?}, target {}", s.version, row.target));
        }
    }
    let ts = i64::try_from(s.ts_ms).ok();
    let deadline = new.silence_limit_s(&app.config.ota).map(|s| s as f64);
    tx.execute(
        "UPDATE ota_task_vehicles SET state = $3, rank = $4, active = $5,
                due_at = CASE WHEN $6::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => $6) END,
                reported_version = COALESCE($7, reported_version),
                fail_ecu = COALESCE($8, fail_ecu), fail_error = COALESCE($9, fail_error),
                last_report = $10, last_report_at = now(), updated_at = now()
          WHERE task_id = $1 AND vin = $2",
        &[&task, &vin, &new.as_str(), &new.rank(), &new.is_active(), &deadline, &s.version, &s.ecu, &error, raw],
    )
    .await?;
    match new {
        VehicleState::Reported(OtaStatus::Success) => {
            tx.execute("UPDATE vehicles SET sw_version = $2 WHERE vin = $1", &[&vin, &row.target]).await?;
            tracing::info!(task, vin, version = %row.target, "OTA upgrade succeeded");
        }
        VehicleState::Reported(st @ (OtaStatus::Failed | OtaStatus::RolledBack)) => {
            push::record_failure(tx, task, vin, status_str(st), s.ecu.as_deref(), error.as_deref(), ts).await?;
            tracing::info!(task, vin, status = status_str(st), ecu = ?s.ecu, error = ?error, "OTA upgrade failed");
        }
        _ => {}
    }
    Ok("applied")
}
