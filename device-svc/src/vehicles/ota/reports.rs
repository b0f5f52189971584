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
//!
//! A report about a task the vehicle is not in folds nothing: it is stored with the result
//! `unknown_task` in the same insert, with no update after it.

use std::collections::HashMap;

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

    /// The attempt the report is about (`None`: the current one).
    fn attempt(&self) -> Option<u32> {
        match self {
            Report::Download(d) => d.attempt,
            Report::Upgrade(u) => u.attempt,
            Report::Status(s) => s.attempt,
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
    attempt: i16,
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
/// The batch costs three statements plus one per report folded: the vehicles' rows are locked
/// by one select (in key order, so two instances never wait on each other crosswise), the
/// reports are stored by one multi-row insert, and the results are written back by one update.
/// A batch of reports about no task of theirs costs the select and the insert. Reports of one
/// vehicle fold in order, each seeing the state the previous one left.
///
/// # Errors
/// Storage errors: nothing of the batch is stored, and the caller applies it again.
pub async fn apply_batch(app: &App, uplinks: &[Uplink]) -> Result<Vec<&'static str>, StoreError> {
    if uplinks.is_empty() {
        return Ok(Vec::new());
    }
    let parsed: Vec<Option<Report>> = uplinks.iter().map(|u| Report::parse(u.kind, &u.payload)).collect();
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let keys: Vec<Option<(String, String)>> = uplinks
        .iter()
        .zip(&parsed)
        .map(|(u, report)| report.as_ref().map(|r| (r.task_id().to_owned(), u.vin.to_string())))
        .collect();
    let mut rows = lock_rows(&tx, &keys).await?;
    // A report about a task the vehicle is not in folds nothing: it is stored with that result
    // at once, and costs no update afterwards.
    let known: Vec<bool> = keys.iter().map(|k| k.as_ref().is_some_and(|k| rows.contains_key(k))).collect();
    let ids = store(&tx, uplinks, &parsed, &known).await?;
    let mut results = Vec::with_capacity(uplinks.len());
    let mut stored: Vec<(i64, &'static str)> = Vec::with_capacity(uplinks.len());
    let mut failures = false;
    for (((u, report), key), id) in uplinks.iter().zip(&parsed).zip(&keys).zip(&ids) {
        let (Some(report), Some(key)) = (report, key) else {
            tracing::info!(vin = %u.vin, kind = u.kind.as_str(), "invalid OTA report");
            results.push("invalid");
            continue;
        };
        let Some(id) = id else {
            results.push("duplicate");
            continue;
        };
        let Some(row) = rows.get_mut(key) else {
            results.push(UNKNOWN_TASK);
            continue;
        };
        let raw: Value = serde_json::from_slice(&u.payload).unwrap_or(Value::Null);
        let (result, now) = fold(app, &tx, &u.vin, report, row, &raw).await?;
        // Only a re-push (compensation) moves a vehicle back to pending: its attempt was
        // raised, and a later report of the old attempt in this batch is stale.
        if now == VehicleState::Pending && row.state != VehicleState::Pending {
            row.attempt += 1;
        }
        row.state = now;
        failures |= result == "applied" && matches!(report, Report::Status(s) if s.status >= OtaStatus::Success);
        stored.push((*id, result));
        results.push(result);
    }
    if !stored.is_empty() {
        let (ids, applied): (Vec<i64>, Vec<&str>) = stored.into_iter().unzip();
        tx.execute(
            "UPDATE ota_reports r SET applied = u.result FROM UNNEST($1::bigint[], $2::text[]) AS u(id, result)
              WHERE r.id = u.id",
            &[&ids, &applied],
        )
        .await?;
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

/// The result of a report about a task the vehicle is not in.
const UNKNOWN_TASK: &str = "unknown_task";

/// Stores every valid report as received, in one statement: a report of a `known` (task,
/// vehicle) pair with its result still to be written, any other with `unknown_task` already.
/// Returns each report's row id; `None` for an invalid report and for an entry stored before (a
/// redelivery, or the same entry earlier in the batch).
async fn store(
    tx: &Transaction<'_>,
    uplinks: &[Uplink],
    parsed: &[Option<Report>],
    known: &[bool],
) -> Result<Vec<Option<i64>>, StoreError> {
    let mut columns: [Vec<&str>; 6] = Default::default();
    for ((u, report), known) in uplinks.iter().zip(parsed).zip(known) {
        // A report that parsed is valid UTF-8 JSON.
        let (Some(report), Ok(payload)) = (report, std::str::from_utf8(&u.payload)) else { continue };
        let applied = if *known { "" } else { UNKNOWN_TASK };
        for (column, value) in
            columns.iter_mut().zip([&u.entry, report.task_id(), u.vin.as_str(), u.kind.as_str(), payload, applied])
        {
            column.push(value);
        }
    }
    let [entries, tasks, vins, kinds, payloads, applied] = &columns;
    let rows = tx
        .query(
            "INSERT INTO ota_reports (entry, task_id, vin, kind, payload, applied)
             SELECT e, t, v, k, p::jsonb, a
               FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) AS r(e, t, v, k, p, a)
             ON CONFLICT (entry) DO NOTHING RETURNING entry, id",
            &[entries, tasks, vins, kinds, payloads, applied],
        )
        .await?;
    // An entry twice in one batch is stored once: its first occurrence takes the id, a later one
    // is a duplicate like any redelivery.
    let mut ids: HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    Ok(uplinks.iter().zip(parsed).map(|(u, report)| report.as_ref().and_then(|_| ids.remove(&u.entry))).collect())
}

/// Locks the rows of every (task, vehicle) pair the batch's valid reports are about, in key
/// order; returns their state and target version. A pair without a row (a task the vehicle is
/// not in) is absent.
async fn lock_rows(
    tx: &Transaction<'_>,
    keys: &[Option<(String, String)>],
) -> Result<HashMap<(String, String), Row>, StoreError> {
    let (tasks, vins): (Vec<&str>, Vec<&str>) = keys.iter().flatten().map(|(t, v)| (t.as_str(), v.as_str())).unzip();
    if tasks.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = tx
        .query(
            "SELECT v.task_id, v.vin, v.state, t.version, v.attempt FROM ota_task_vehicles v JOIN ota_tasks t ON t.id = v.task_id
              WHERE (v.task_id, v.vin) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))
              ORDER BY v.task_id, v.vin FOR UPDATE OF v",
            &[&tasks, &vins],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let state = VehicleState::parse(r.get(2))?;
            Some(((r.get(0), r.get(1)), Row { state, target: r.get(3), attempt: r.get(4) }))
        })
        .collect())
}

/// Folds `report` into the vehicle's row; returns the result and the vehicle's state after it.
async fn fold(
    app: &App,
    tx: &Transaction<'_>,
    vin: &Vin,
    report: &Report,
    row: &Row,
    raw: &Value,
) -> Result<(&'static str, VehicleState), StoreError> {
    let (task, vin) = (report.task_id(), vin.as_str());
    // A report of an attempt before a re-push is about an upgrade that ended.
    if report.attempt().is_some_and(|a| i64::from(a) < i64::from(row.attempt)) {
        return Ok(("stale", row.state));
    }
    match report {
        Report::Download(d) => {
            if !row.state.is_active() {
                return Ok(("stale", row.state));
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
            moved_or_alive(app, tx, task, vin, row.state, n).await.map(|r| (r, if n > 0 { state } else { row.state }))
        }
        Report::Upgrade(u) => {
            // A report is ahead when its overall percent is, or equal and it is newer; only then
            // do its ECU fields replace the stored ones, so a late report (lower percent, even
            // with a newer timestamp) changes nothing whatever the batching (SPEC.md 2.3).
            if !row.state.is_active() {
                return Ok(("stale", row.state));
            }
            let state = at_least(row.state, OtaStatus::Upgrading);
            let ts = i64::try_from(u.ts_ms).unwrap_or(i64::MAX);
            let n = tx
                .execute(
                    "UPDATE ota_task_vehicles SET state = $3, rank = $4, due_at = now() + make_interval(secs => $5),
                            upgrade_percent = GREATEST(upgrade_percent, $6),
                            ecu = CASE WHEN ($6, $9) > (upgrade_percent, ecu_ts_ms) THEN $7 ELSE ecu END,
                            ecu_percent = CASE WHEN ($6, $9) > (upgrade_percent, ecu_ts_ms) THEN $8 ELSE ecu_percent END,
                            ecu_ts_ms = CASE WHEN ($6, $9) > (upgrade_percent, ecu_ts_ms) THEN $9 ELSE ecu_ts_ms END,
                            last_report = $10, last_report_at = now(), updated_at = now()
                      WHERE task_id = $1 AND vin = $2 AND (($6, $9) > (upgrade_percent, ecu_ts_ms) OR rank < $4)",
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
            moved_or_alive(app, tx, task, vin, row.state, n).await.map(|r| (r, if n > 0 { state } else { row.state }))
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
) -> Result<(&'static str, VehicleState), StoreError> {
    let task = s.task_id.as_str();
    let rolls_back_failure =
        row.state == VehicleState::Reported(OtaStatus::Failed) && s.status == OtaStatus::RolledBack;
    let mut new = VehicleState::Reported(s.status);
    if !(row.state.is_active() || rolls_back_failure) || new.rank() <= row.state.rank() {
        return Ok(("stale", row.state));
    }
    let mut error = s.error.clone();
    if s.status == OtaStatus::Success {
        let at_target = match (s.version.as_deref().and_then(parse_version), parse_version(&row.target)) {
            (Some(v), Some(t)) => compare_versions(&v, &t).is_eq(),
            _ => false,
        };
        if !at_target {
            new = VehicleState::Reported(OtaStatus::Failed);
            let reported = s.version.as_deref().unwrap_or("none");
            error = Some(format!("version_mismatch: reported {reported}, target {}", row.target));
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
            let attempt = row.attempt;
            push::record_failure(tx, task, vin, attempt, status_str(st), s.ecu.as_deref(), error.as_deref(), ts)
                .await?;
            tracing::info!(task, vin, status = status_str(st), ecu = ?s.ecu, error = ?error, "OTA upgrade failed");
            // A rolled-back failure was compensated at its `failed` already.
            if !rolls_back_failure {
                let reason = format!("{}: {}", status_str(st), error.as_deref().unwrap_or("no error given"));
                if super::rollout::compensate(app, tx, task, vin, attempt, &reason).await? {
                    return Ok(("applied", VehicleState::Pending));
                }
            }
        }
        _ => {}
    }
    Ok(("applied", new))
}
