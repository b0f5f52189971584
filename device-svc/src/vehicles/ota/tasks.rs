//! OTA tasks: creation with the per-vehicle validation of the seed ("车辆信息校验"), the task
//! view operators watch, and cancellation.
//!
//! Validation runs in the transaction that creates the task, with the vehicles' rows locked,
//! so two tasks created at once cannot both take a vehicle (the partial unique index
//! `ota_one_active_upgrade` backs this). Each refused VIN gets the first rule it breaks:
//!
//! | reason | rule |
//! |---|---|
//! | `invalid_vin` | not a VIN |
//! | `duplicate_vin` | listed earlier in the same request |
//! | `unknown_vehicle` | not registered |
//! | `blacklisted` | on the blacklist |
//! | `state_not_allowed` | factory tasks: only `assembled`, `line_ok`, `certified`; others: any state but `scrapped` |
//! | `sale_vehicle` | a test task may not target a vehicle whose purpose is `sale` |
//! | `unknown_version` | the vehicle's current version is not known (the seed's `00.000.000`) |
//! | `same_version` | current = target, and not on the same-version whitelist |
//! | `downgrade` | target < current, and not on the downgrade whitelist |
//! | `upgrade_in_progress` | an upgrade of another task is waiting or running on it |

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

use protocol::Vin;
use protocol::vehicle::{OtaPackage, UpgradeType};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::rollout::Rollout;
use super::{VehicleState, compare_versions, parse_version};
use crate::app::{App, checked_time, ms_of, now_ms};
use crate::error::StoreError;

/// Most VINs one task may list.
pub const MAX_VINS: usize = 10_000;

/// What a task is for (the seed's 任务类型).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskType {
    /// Engineering tests; never on vehicles sold to customers.
    Test,
    /// At the factory, before delivery.
    Factory,
    /// A normal campaign.
    Normal,
}

impl TaskType {
    fn as_str(self) -> &'static str {
        match self {
            TaskType::Test => "test",
            TaskType::Factory => "factory",
            TaskType::Normal => "normal",
        }
    }

    /// The vehicle states a task of this type may target.
    fn allows_state(self, state: &str) -> bool {
        match self {
            TaskType::Factory => ["assembled", "line_ok", "certified"].contains(&state),
            TaskType::Test | TaskType::Normal => state != "scrapped",
        }
    }
}

fn upgrade_type_str(u: UpgradeType) -> &'static str {
    match u {
        UpgradeType::Silent => "silent",
        UpgradeType::Prompted => "prompted",
        UpgradeType::Forced => "forced",
    }
}

/// The body of `POST /v1/ota/tasks`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTask {
    /// Display name.
    pub name: String,
    /// Target version (dotted numbers).
    pub version: String,
    /// How the vehicle applies it (SPEC.md 2.3: `silent`, `prompted`, `forced`).
    #[schema(value_type = String)]
    pub upgrade_type: UpgradeType,
    /// Test, factory or normal.
    pub task_type: TaskType,
    /// What to install, hosted elsewhere: the package descriptor of SPEC.md 2.3 (or
    /// `package_id`).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub package: Option<OtaPackage>,
    /// What to install, stored here: a `full` package of the task's version (`PUT
    /// /v1/ota/packages/{id}`); each vehicle gets a delta from its version when one is stored.
    #[serde(default)]
    pub package_id: Option<String>,
    /// Waves and thresholds (absent: one wave, never paused).
    #[serde(default)]
    pub rollout: Option<Rollout>,
    /// When pushing may begin, ms since the Unix epoch; now if absent.
    #[serde(default)]
    pub start_at_ms: Option<u64>,
    /// The vehicles.
    pub vins: Vec<String>,
    /// Who created it.
    #[serde(default)]
    pub created_by: String,
}

/// A refused VIN.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Rejection {
    /// As given.
    pub vin: String,
    /// Machine-readable reason (module doc).
    pub reason: &'static str,
    /// Detail for people.
    pub detail: String,
}

/// A task as operators see it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Task {
    /// Id (`t…`).
    pub id: String,
    /// Name.
    pub name: String,
    /// Target version.
    pub version: String,
    /// `silent`, `prompted`, `forced`.
    pub upgrade_type: String,
    /// `test`, `factory`, `normal`.
    pub task_type: String,
    /// The package (for a stored one: its descriptor without a URL; each vehicle's notice
    /// carries its own).
    pub package: Value,
    /// The stored package, if the task installs one.
    pub package_id: Option<String>,
    /// Cumulative percentages of the vehicles, wave by wave.
    pub waves: Vec<i16>,
    /// The last wave released (0-based).
    pub current_wave: i16,
    /// Success threshold of a wave, %.
    pub success_threshold_pct: i16,
    /// Error threshold of the released vehicles, %.
    pub error_threshold_pct: i16,
    /// Why a paused task paused: `operator` or `error_threshold`.
    pub paused_reason: Option<String>,
    /// When pushing may begin.
    pub start_at_ms: u64,
    /// `scheduled`, `running`, `paused`, `finished`, `cancelled`.
    pub state: String,
    /// Who created it.
    pub created_by: String,
    /// When it finished or was cancelled.
    pub ended_at_ms: Option<u64>,
    /// Vehicles by state.
    pub counts: HashMap<String, i64>,
}

/// The answer to a creation: the task and the VINs refused.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Created {
    /// The task.
    #[serde(flatten)]
    pub task: Task,
    /// Accepted VINs, in request order.
    pub accepted: Vec<String>,
    /// Refused VINs with their reasons, in request order.
    pub rejected: Vec<Rejection>,
}

fn check_request(t: &NewTask) -> Result<Vec<u64>, StoreError> {
    if t.name.trim().is_empty() {
        return Err(StoreError::invalid("name", "must not be empty"));
    }
    let target = parse_version(&t.version)
        .ok_or_else(|| StoreError::invalid("version", format!("{:?} is not a dotted numeric version", t.version)))?;
    match (&t.package, &t.package_id) {
        (Some(p), None) => {
            if p.id.is_empty() || p.url.is_empty() || p.signature.is_empty() {
                return Err(StoreError::invalid("package", "id, url and signature must not be empty"));
            }
            if p.size_bytes == 0 {
                return Err(StoreError::invalid("package.size_bytes", "must be positive"));
            }
            if p.sha256.len() != 64 || !p.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(StoreError::invalid("package.sha256", "must be 64 hex characters"));
            }
        }
        (None, Some(id)) if !id.is_empty() && id.len() <= 64 => {}
        _ => return Err(StoreError::invalid("package", "give a package descriptor or a stored package_id, not both")),
    }
    if let Some(r) = &t.rollout {
        r.check()?;
    }
    if t.vins.is_empty() || t.vins.len() > MAX_VINS {
        return Err(StoreError::invalid("vins", format!("must list 1..={MAX_VINS} vehicles")));
    }
    Ok(target)
}

/// What validation needs to know about one vehicle.
struct Candidate {
    state: String,
    purpose: String,
    sw_version: Option<String>,
    lists: Vec<String>,
    active_task: Option<String>,
}

fn judge(t: &NewTask, target: &[u64], c: &Candidate) -> Result<(), (&'static str, String)> {
    if c.lists.iter().any(|l| l == "blacklist") {
        return Err(("blacklisted", String::new()));
    }
    if !t.task_type.allows_state(&c.state) {
        return Err(("state_not_allowed", format!("{} task, vehicle {}", t.task_type.as_str(), c.state)));
    }
    if t.task_type == TaskType::Test && c.purpose == "sale" {
        return Err(("sale_vehicle", "test tasks may not target vehicles sold to customers".into()));
    }
    let Some(current) = c.sw_version.as_deref().and_then(parse_version) else {
        let detail = match c.sw_version.as_deref() {
            Some(v) => format!("current version {v:?} is not a dotted numeric version"),
            None => "current version not known".to_owned(),
        };
        return Err(("unknown_version", detail));
    };
    let current_text = c.sw_version.clone().unwrap_or_default();
    match compare_versions(target, &current) {
        Ordering::Equal if !c.lists.iter().any(|l| l == "same_version") => {
            return Err(("same_version", format!("already at {current_text}")));
        }
        Ordering::Less if !c.lists.iter().any(|l| l == "downgrade") => {
            return Err(("downgrade", format!("{} is below {current_text}", t.version)));
        }
        _ => {}
    }
    if let Some(task) = &c.active_task {
        return Err(("upgrade_in_progress", format!("task {task}")));
    }
    Ok(())
}

/// What validation says of a request: the vehicles it would push to and those it refuses,
/// each refusal with its position in the request. Locks the vehicles (`FOR UPDATE`): a
/// concurrent creation over the same vehicles waits for this transaction.
async fn judge_all(
    tx: &tokio_postgres::Transaction<'_>,
    t: &NewTask,
    target: &[u64],
) -> Result<(Vec<String>, Vec<(i32, Rejection)>), StoreError> {
    let valid: Vec<String> = t.vins.iter().filter(|v| Vin::new(v.as_str()).is_ok()).cloned().collect();
    let rows = tx
        .query(
            "SELECT v.vin, v.state, v.purpose, v.sw_version,
                    COALESCE((SELECT array_agg(list) FROM ota_lists l WHERE l.vin = v.vin), '{}'),
                    (SELECT task_id FROM ota_task_vehicles a WHERE a.vin = v.vin AND a.active LIMIT 1)
               FROM vehicles v WHERE v.vin = ANY($1) ORDER BY v.vin FOR UPDATE OF v",
            &[&valid],
        )
        .await?;
    let known: HashMap<String, Candidate> = rows
        .iter()
        .map(|r| {
            let c = Candidate {
                state: r.get(1),
                purpose: r.get(2),
                sw_version: r.get(3),
                lists: r.get(4),
                active_task: r.get(5),
            };
            (r.get::<_, String>(0), c)
        })
        .collect();
    let mut seen = HashSet::new();
    let mut accepted = Vec::new();
    let mut rejected: Vec<(i32, Rejection)> = Vec::new();
    for (at, vin) in (0i32..).zip(&t.vins) {
        let verdict = if Vin::new(vin.as_str()).is_err() {
            Err(("invalid_vin", String::new()))
        } else if !seen.insert(vin.as_str()) {
            Err(("duplicate_vin", String::new()))
        } else {
            match known.get(vin) {
                None => Err(("unknown_vehicle", String::new())),
                Some(c) => judge(t, target, c),
            }
        };
        match verdict {
            Ok(()) => accepted.push(vin.clone()),
            Err((reason, detail)) => rejected.push((at, Rejection { vin: vin.clone(), reason, detail })),
        }
    }
    Ok((accepted, rejected))
}

/// The validation of `t` without creating anything (the console shows it before an operator
/// creates the task): the vehicles it would push to and the refusals with their reasons.
///
/// # Errors
/// `Invalid` for a malformed request; storage errors.
pub async fn validate(app: &App, t: &NewTask) -> Result<(Vec<String>, Vec<Rejection>), StoreError> {
    let target = check_request(t)?;
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let (accepted, rejected) = judge_all(&tx, t, &target).await?;
    tx.rollback().await?;
    Ok((accepted, rejected.into_iter().map(|(_, r)| r).collect()))
}

/// Creates a task: validates every VIN, stores the task, the accepted vehicles (pending, due
/// at the start time) and the refusals, all in one transaction.
///
/// # Errors
/// `Invalid` naming the field for a malformed request; storage errors.
pub async fn create(app: &App, t: &NewTask) -> Result<Created, StoreError> {
    let target = check_request(t)?;
    let id = crate::purchases::lock::token("t")?;
    let start = checked_time("start_at_ms", t.start_at_ms.unwrap_or_else(now_ms))?;
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let (accepted, rejected) = judge_all(&tx, t, &target).await?;
    let package = match (&t.package, &t.package_id) {
        (Some(p), _) => serde_json::to_value(p).map_err(|e| StoreError::invalid("package", e.to_string()))?,
        (None, Some(pid)) => stored_descriptor(&tx, pid, &t.version).await?,
        (None, None) => return Err(StoreError::invalid("package", "required")),
    };
    let rollout = t.rollout.clone().unwrap_or_default();
    let waves: Vec<i16> = rollout.waves.iter().map(|w| i16::from(*w)).collect();
    tx.execute(
        "INSERT INTO ota_tasks (id, name, version, upgrade_type, task_type, package, start_at, created_by, package_id,
                                waves, success_threshold, error_threshold)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        &[
            &id,
            &t.name,
            &t.version,
            &upgrade_type_str(t.upgrade_type),
            &t.task_type.as_str(),
            &package,
            &start,
            &t.created_by,
            &t.package_id,
            &waves,
            &i16::from(rollout.success_threshold_pct),
            &i16::from(rollout.error_threshold_pct),
        ],
    )
    .await?;
    let wave_of = rollout.assign(accepted.len());
    tx.execute(
        "INSERT INTO ota_task_vehicles (task_id, vin, from_version, due_at, wave)
         SELECT $1, v.vin, v.sw_version, $3, a.wave
           FROM unnest($2::text[], $4::smallint[]) AS a(vin, wave) JOIN vehicles v ON v.vin = a.vin",
        &[&id, &accepted, &start, &wave_of],
    )
    .await?;
    let positions: Vec<i32> = rejected.iter().map(|(at, _)| *at).collect();
    let vins: Vec<&str> = rejected.iter().map(|(_, r)| r.vin.as_str()).collect();
    let reasons: Vec<&str> = rejected.iter().map(|(_, r)| r.reason).collect();
    let details: Vec<&str> = rejected.iter().map(|(_, r)| r.detail.as_str()).collect();
    tx.execute(
        "INSERT INTO ota_rejections (task_id, position, vin, reason, detail)
         SELECT $1, * FROM unnest($2::int[], $3::text[], $4::text[], $5::text[])",
        &[&id, &positions, &vins, &reasons, &details],
    )
    .await?;
    crate::auth::audit::commit(tx).await?;
    drop(client);
    let rejected: Vec<Rejection> = rejected.into_iter().map(|(_, r)| r).collect();
    for r in &rejected {
        app.metrics.ota_rejections.with_label_values(&[r.reason]).inc();
    }
    tracing::info!(task = %id, accepted = accepted.len(), rejected = rejected.len(), version = %t.version, "OTA task created");
    Ok(Created { task: get(app, &id).await?, accepted, rejected })
}

/// The descriptor a task keeps of the stored package `id` (no URL: each vehicle's notice gets
/// its own), after checking it is a ready full package of `version`.
async fn stored_descriptor(tx: &tokio_postgres::Transaction<'_>, id: &str, version: &str) -> Result<Value, StoreError> {
    let row = tx
        .query_opt("SELECT version, kind, state, size_bytes, sha256, signature FROM ota_packages WHERE id = $1", &[&id])
        .await?
        .ok_or_else(|| StoreError::invalid("package_id", format!("no package {id}")))?;
    let (v, kind, state): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    if state != "ready" || kind != "full" || v != version {
        return Err(StoreError::invalid(
            "package_id",
            format!(
                "package {id} is a {state} {kind} package of {v}; the task needs a ready full package of {version}"
            ),
        ));
    }
    Ok(serde_json::json!({"id": id, "size_bytes": row.get::<_, i64>(3), "sha256": row.get::<_, String>(4),
                          "signature": row.get::<_, String>(5), "kind": "full"}))
}

const TASK_COLUMNS: &str = "id, name, version, upgrade_type, task_type, package, start_at, state, created_by, ended_at,
                            package_id, waves, current_wave, success_threshold, error_threshold, paused_reason";

fn task_of(r: &tokio_postgres::Row, counts: HashMap<String, i64>) -> Task {
    Task {
        id: r.get(0),
        name: r.get(1),
        version: r.get(2),
        upgrade_type: r.get(3),
        task_type: r.get(4),
        package: r.get(5),
        start_at_ms: ms_of(r.get(6)),
        state: r.get(7),
        created_by: r.get(8),
        ended_at_ms: r.get::<_, Option<std::time::SystemTime>>(9).map(ms_of),
        package_id: r.get(10),
        waves: r.get(11),
        current_wave: r.get(12),
        success_threshold_pct: r.get(13),
        error_threshold_pct: r.get(14),
        paused_reason: r.get(15),
        counts,
    }
}

/// A task with its vehicles counted by state.
///
/// # Errors
/// `NotFound`; storage errors.
pub async fn get(app: &App, id: &str) -> Result<Task, StoreError> {
    let client = app.pg.get().await?;
    let row = client
        .query_opt(&format!("SELECT {TASK_COLUMNS} FROM ota_tasks WHERE id = $1"), &[&id])
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("task {id}")))?;
    let counts = client
        .query("SELECT state, count(*) FROM ota_task_vehicles WHERE task_id = $1 GROUP BY state", &[&id])
        .await?
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect();
    Ok(task_of(&row, counts))
}

/// The newest tasks, without counts.
///
/// # Errors
/// Storage errors.
pub async fn list(app: &App, limit: i64) -> Result<Vec<Task>, StoreError> {
    let client = app.pg.get().await?;
    let rows = client
        .query(
            &format!("SELECT {TASK_COLUMNS} FROM ota_tasks ORDER BY created_at DESC LIMIT $1"),
            &[&limit.clamp(1, 1000)],
        )
        .await?;
    Ok(rows.iter().map(|r| task_of(r, HashMap::new())).collect())
}

/// One vehicle of a task.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TaskVehicle {
    /// The vehicle.
    pub vin: String,
    /// Its state in this task.
    pub state: String,
    /// Its version when the task was created.
    pub from_version: Option<String>,
    /// Notices sent (acknowledged or not).
    pub push_count: i32,
    /// When the notice was acknowledged.
    pub pushed_ms: Option<u64>,
    /// The notice's message id.
    pub push_message_id: Option<String>,
    /// Download progress, 0..=100.
    pub download_percent: i16,
    /// Bytes downloaded.
    pub bytes_done: i64,
    /// Installation progress, 0..=100.
    pub upgrade_percent: i16,
    /// The ECU being flashed, and its progress.
    pub ecu: Option<String>,
    /// That ECU's progress.
    pub ecu_percent: Option<i16>,
    /// The version reported with `success` (or a wrong one).
    pub reported_version: Option<String>,
    /// Where and why it failed.
    pub fail_ecu: Option<String>,
    /// The error.
    pub fail_error: Option<String>,
    /// The last report, as sent.
    pub last_report: Option<Value>,
    /// When it arrived.
    pub last_report_ms: Option<u64>,
    /// Its wave (0-based).
    pub wave: i16,
    /// Its attempt (1, then one more per re-push after a failure).
    pub attempt: i16,
    /// The stored package its notice named (a delta or the full one).
    pub package_id: Option<String>,
}

/// A task's vehicles (optionally in one state), by VIN.
///
/// # Errors
/// `NotFound`; storage errors.
pub async fn vehicles(
    app: &App,
    id: &str,
    state: Option<&str>,
    after_vin: Option<&str>,
    limit: i64,
) -> Result<Vec<TaskVehicle>, StoreError> {
    get(app, id).await?;
    let client = app.pg.get().await?;
    // Read in the primary key's order (task_id, vin) from `after_vin` on: a page of a task with
    // 10,000 vehicles costs what a page of a small one does.
    let rows = client
        .query(
            "SELECT vin, state, from_version, push_count, pushed_at, push_message_id, download_percent, bytes_done,
                    upgrade_percent, ecu, ecu_percent, reported_version, fail_ecu, fail_error, last_report, last_report_at,
                    wave, attempt, package_id
               FROM ota_task_vehicles WHERE task_id = $1 AND ($2::text IS NULL OR state = $2)
                AND ($3::text IS NULL OR vin > $3) ORDER BY vin LIMIT $4",
            &[&id, &state, &after_vin, &limit.clamp(1, i64::try_from(MAX_VINS).unwrap_or(i64::MAX))],
        )
        .await?;
    let ms = |r: &tokio_postgres::Row, i: usize| r.get::<_, Option<std::time::SystemTime>>(i).map(ms_of);
    Ok(rows
        .iter()
        .map(|r| TaskVehicle {
            vin: r.get(0),
            state: r.get(1),
            from_version: r.get(2),
            push_count: r.get(3),
            pushed_ms: ms(r, 4),
            push_message_id: r.get(5),
            download_percent: r.get(6),
            bytes_done: r.get(7),
            upgrade_percent: r.get(8),
            ecu: r.get(9),
            ecu_percent: r.get(10),
            reported_version: r.get(11),
            fail_ecu: r.get(12),
            fail_error: r.get(13),
            last_report: r.get(14),
            last_report_ms: ms(r, 15),
            wave: r.get(16),
            attempt: r.get(17),
            package_id: r.get(18),
        })
        .collect())
}

/// The refusals stored for a task, in request order.
///
/// # Errors
/// `NotFound`; storage errors.
pub async fn rejections(app: &App, id: &str) -> Result<Vec<Rejection>, StoreError> {
    get(app, id).await?;
    let client = app.pg.get().await?;
    let rows = client
        .query("SELECT vin, reason, detail FROM ota_rejections WHERE task_id = $1 ORDER BY position", &[&id])
        .await?;
    Ok(rows.iter().map(|r| Rejection { vin: r.get(0), reason: reason_static(r.get(1)), detail: r.get(2) }).collect())
}

fn reason_static(s: &str) -> &'static str {
    const ALL: [&str; 10] = [
        "invalid_vin",
        "duplicate_vin",
        "unknown_vehicle",
        "blacklisted",
        "state_not_allowed",
        "sale_vehicle",
        "unknown_version",
        "same_version",
        "downgrade",
        "upgrade_in_progress",
    ];
    ALL.into_iter().find(|r| *r == s).unwrap_or("other")
}

/// A failed upgrade (failed, rolled back or timed out).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Failure {
    /// The vehicle.
    pub vin: String,
    /// `failed`, `rolled_back` or `timed_out`.
    pub status: String,
    /// The failing ECU, if reported.
    pub ecu: Option<String>,
    /// The error, if reported.
    pub error: Option<String>,
    /// When it was recorded, ms since the Unix epoch.
    pub recorded_ms: u64,
    /// The attempt that failed.
    pub attempt: i16,
}

/// A task's failures, oldest first.
///
/// # Errors
/// `NotFound`; storage errors.
pub async fn failures(app: &App, id: &str) -> Result<Vec<Failure>, StoreError> {
    get(app, id).await?;
    let client = app.pg.get().await?;
    let rows = client
        .query(
            "SELECT vin, status, ecu, error, recorded_at, attempt FROM ota_failures WHERE task_id = $1 ORDER BY id",
            &[&id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Failure {
            vin: r.get(0),
            status: r.get(1),
            ecu: r.get(2),
            error: r.get(3),
            recorded_ms: ms_of(r.get(4)),
            attempt: r.get(5),
        })
        .collect())
}

/// Cancels a task: vehicles that have not started (pending, notified, waiting) are cancelled,
/// and those that were sent the notice get a cancel notice (through the paced driver, also
/// when they next connect); vehicles already downloading or installing carry on and keep
/// reporting. Cancelling a cancelled task changes nothing.
///
/// # Errors
/// `NotFound`; `Rejected` (`task_finished`); storage errors.
pub async fn cancel(app: &App, id: &str) -> Result<Task, StoreError> {
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let state: Option<String> =
        tx.query_opt("SELECT state FROM ota_tasks WHERE id = $1 FOR UPDATE", &[&id]).await?.map(|r| r.get(0));
    match state.as_deref() {
        None => return Err(StoreError::NotFound(format!("task {id}"))),
        Some("finished") => return Err(StoreError::rejected("task_finished", format!("task {id} has finished"))),
        Some("cancelled") => {}
        Some(_) => {
            tx.execute("UPDATE ota_tasks SET state = 'cancelled', ended_at = now() WHERE id = $1", &[&id]).await?;
            let not_started: Vec<&str> = [VehicleState::Pending, VehicleState::Notified]
                .into_iter()
                .map(VehicleState::as_str)
                .chain(["waiting"])
                .collect();
            tx.execute(
                "UPDATE ota_task_vehicles SET state = 'cancelled', rank = 7, active = false, updated_at = now(),
                        cancel_sent = pushed_at IS NULL,
                        due_at = CASE WHEN pushed_at IS NULL THEN NULL ELSE now() END
                  WHERE task_id = $1 AND state = ANY($2)",
                &[&id, &not_started],
            )
            .await?;
        }
    }
    crate::auth::audit::commit(tx).await?;
    drop(client);
    app.ota_waker.notify_one();
    get(app, id).await
}
