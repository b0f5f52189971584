//! The OTA driver: every timer of a campaign is a row's `due_at` in PostgreSQL, claimed by one
//! instance at a time (`FOR UPDATE SKIP LOCKED`, pushed one lease ahead in the same statement),
//! so pushes and timeouts survive restarts and happen once. Each poll:
//!
//! 1. starts the scheduled tasks whose start time has come;
//! 2. sends upgrade notices (and cancel notices) that are due, at most `ota.push_rate_per_s`
//!    per second across every instance (a token bucket in Redis hands out the budget, so a
//!    burst never exceeds one second's worth, not even across the turn of a second);
//! 3. marks vehicles silent past their phase's limit `timed_out`, with a failure row and an
//!    operator notice;
//! 4. finishes running tasks with no vehicle left to follow.
//!
//! A notice's answer decides what happens next: acknowledged (PUBACK) -> `notified`, silence
//! deadline set; vehicle not connected -> no deadline, the row waits for the vehicle's next
//! connection ([`on_connected`]); not subscribed yet -> again shortly; no acknowledgement in
//! time -> again after `ota.push_retry_s`.

use std::sync::Arc;
use std::time::Duration;

use protocol::Vin;
use protocol::bus::Outcome;
use protocol::mqtt::topic::DownlinkKind;
use protocol::vehicle::{OtaCancel, OtaNotify, OtaPackage, UpgradeType};
use redis::Script;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::VehicleState;
use crate::app::App;
use crate::error::StoreError;
use crate::purchases::outbox;
use crate::vehicles::downlink;

/// The fleet-wide push budget: a token bucket in one Redis hash, refilled at `ARGV[2]` per
/// second on Redis's own clock (one clock for every instance) and holding at most one second's
/// worth. `ARGV[1]` > 0 takes up to that many whole tokens and returns how many it got;
/// `ARGV[1]` < 0 puts that many back (unused grants). Tokens are counted in thousandths so the
/// arithmetic stays in integers. A missing key (expired, or lost with Redis) is a full bucket.
const BUDGET: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate = tonumber(ARGV[2])
local full = rate * 1000
local b = redis.call('HMGET', KEYS[1], 'milli', 'at')
local milli = tonumber(b[1]) or full
local at = tonumber(b[2]) or now
if now > at then milli = math.min(full, milli + (now - at) * rate) end
local want = tonumber(ARGV[1])
local got = 0
if want > 0 then
  got = math.min(want, math.floor(milli / 1000))
  milli = milli - got * 1000
else
  milli = math.min(full, milli - want * 1000)
end
redis.call('HSET', KEYS[1], 'milli', milli, 'at', math.max(now, at))
redis.call('PEXPIRE', KEYS[1], 2000)
return got
";

/// Rows marked timed out per poll.
const TIMEOUT_BATCH: i64 = 500;
/// How long a claimed row is left to its instance before another may take it, seconds.
const LEASE_S: f64 = 60.0;

/// Runs the budget script: `delta` > 0 takes, < 0 gives back; returns the tokens granted.
async fn budget(app: &App, delta: i64) -> Result<u32, StoreError> {
    let mut con = app.redis.clone();
    let got: u32 = Script::new(BUDGET)
        .key(format!("{}ota:push:budget", app.keys.prefix()))
        .arg(delta)
        .arg(app.config.ota.push_rate_per_s)
        .invoke_async(&mut con)
        .await?;
    Ok(got)
}

/// Takes up to `want` pushes from the fleet-wide budget.
async fn take_budget(app: &App, want: u32) -> Result<u32, StoreError> {
    budget(app, i64::from(want)).await
}

/// Returns unused budget (claimed fewer rows than granted).
async fn give_back(app: &App, n: u32) -> Result<(), StoreError> {
    if n > 0 {
        budget(app, -i64::from(n)).await?;
    }
    Ok(())
}

/// A claimed row to notify (or to tell of a cancellation).
#[derive(Debug)]
struct Due {
    task_id: String,
    vin: String,
    state: String,
    version: String,
    upgrade_type: String,
    package: Value,
    /// A stored package the task installs (the full one; a delta may be chosen instead).
    package_id: Option<String>,
    from_version: Option<String>,
    attempt: i16,
}

async fn claim_pushes(app: &App, limit: u32) -> Result<Vec<Due>, StoreError> {
    let client = app.pg.get().await?;
    let rows = client
        .query(
            "UPDATE ota_task_vehicles v SET due_at = now() + make_interval(secs => $2)
               FROM ota_tasks t
              WHERE t.id = v.task_id
                AND (v.task_id, v.vin) IN (
                    SELECT d.task_id, d.vin FROM ota_task_vehicles d JOIN ota_tasks dt ON dt.id = d.task_id
                     WHERE d.due_at <= now()
                       AND ((d.state = 'pending' AND dt.state = 'running' AND d.wave <= dt.current_wave)
                            OR (d.state = 'cancelled' AND NOT d.cancel_sent))
                     ORDER BY d.due_at LIMIT $1 FOR UPDATE OF d SKIP LOCKED)
              RETURNING v.task_id, v.vin, v.state, t.version, t.upgrade_type, t.package, t.package_id,
                        v.from_version, v.attempt",
            &[&i64::from(limit), &LEASE_S],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Due {
            task_id: r.get(0),
            vin: r.get(1),
            state: r.get(2),
            version: r.get(3),
            upgrade_type: r.get(4),
            package: r.get(5),
            package_id: r.get(6),
            from_version: r.get(7),
            attempt: r.get(8),
        })
        .collect())
}

fn upgrade_type(s: &str) -> UpgradeType {
    match s {
        "silent" => UpgradeType::Silent,
        "forced" => UpgradeType::Forced,
        _ => UpgradeType::Prompted,
    }
}

/// Sends one claimed row's notice and records the answer.
async fn push_one(app: &App, due: Due) -> Result<(), StoreError> {
    let vin = Vin::new(&due.vin).map_err(|e| StoreError::invalid("vin", e.to_string()))?;
    let cancel = due.state == "cancelled";
    let (message_id, outcome) = if cancel {
        downlink::send(app, &vin, DownlinkKind::OtaCancel, &OtaCancel { task_id: due.task_id.clone() }).await?
    } else {
        let package = match &due.package_id {
            Some(full) => stored_package(app, &due, full).await?,
            None => serde_json::from_value(due.package).map_err(|e| StoreError::invalid("package", e.to_string()))?,
        };
        let notify = OtaNotify {
            task_id: due.task_id.clone(),
            version: due.version,
            upgrade_type: upgrade_type(&due.upgrade_type),
            package,
            attempt: u32::try_from(due.attempt).unwrap_or(1),
        };
        downlink::send(app, &vin, DownlinkKind::OtaNotify, &notify).await?
    };
    let kind = if cancel { "cancel" } else { "notify" };
    app.metrics.ota_pushes.with_label_values(&[kind, outcome.label()]).inc();
    let retry_s = match outcome {
        Outcome::Delivered => None,
        Outcome::NotConnected => Some(None),
        // Connected but not subscribed yet (it just connected): shortly.
        Outcome::Invalid(_) => Some(Some(app.config.vehicles.connect_send_retry_ms as f64 / 1000.0)),
        _ => Some(Some(app.config.ota.push_retry_s as f64)),
    };
    let client = app.pg.get().await?;
    let key: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&due.task_id, &due.vin];
    match (cancel, retry_s) {
        (false, None) => {
            let waiting = VehicleState::Notified.silence_limit_s(&app.config.ota).unwrap_or(0) as f64;
            // The vehicle may have reported already (its status overtook the PUBACK's reply),
            // or the task may have been cancelled meanwhile: then it needs the cancel notice.
            client
                .execute(
                    "UPDATE ota_task_vehicles SET pushed_at = now(), push_message_id = $3, push_count = push_count + 1,
                            state = CASE WHEN state = 'pending' THEN 'notified' ELSE state END,
                            rank = GREATEST(rank, 1),
                            due_at = CASE WHEN state = 'pending' THEN now() + make_interval(secs => $4)
                                          WHEN state = 'cancelled' THEN now() ELSE due_at END,
                            cancel_sent = CASE WHEN state = 'cancelled' THEN false ELSE cancel_sent END,
                            updated_at = now()
                      WHERE task_id = $1 AND vin = $2",
                    &[key[0], key[1], &message_id, &waiting],
                )
                .await?;
        }
        (true, None) => {
            client
                .execute(
                    "UPDATE ota_task_vehicles SET cancel_sent = true, due_at = NULL, updated_at = now()
                      WHERE task_id = $1 AND vin = $2 AND state = 'cancelled'",
                    &key,
                )
                .await?;
        }
        (_, Some(retry)) => {
            let expected = if cancel { "cancelled" } else { "pending" };
            client
                .execute(
                    "UPDATE ota_task_vehicles SET push_count = push_count + $4::int,
                            due_at = CASE WHEN $5::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => $5) END
                      WHERE task_id = $1 AND vin = $2 AND state = $3",
                    &[key[0], key[1], &expected, &i32::from(!cancel), &retry],
                )
                .await?;
        }
    }
    Ok(())
}

/// The descriptor of the stored package `due`'s vehicle gets (a delta from its version, or the
/// full package), with a download URL signed for it; records the choice on its row, which the
/// download endpoint checks.
async fn stored_package(app: &App, due: &Due, full: &str) -> Result<OtaPackage, StoreError> {
    let Some(pk) = app.ota_packages.as_deref() else {
        return Err(StoreError::rejected("not_configured", "a stored package, but no package keys configured"));
    };
    let chosen = super::packages::choose(app, full, due.from_version.as_deref()).await?;
    let p = chosen.package;
    let client = app.pg.get().await?;
    client
        .execute(
            "UPDATE ota_task_vehicles SET package_id = $3 WHERE task_id = $1 AND vin = $2",
            &[&due.task_id, &due.vin, &p.id],
        )
        .await?;
    Ok(OtaPackage {
        url: super::download::url(app, pk, &p.id, &due.vin, &due.task_id),
        id: p.id,
        size_bytes: p.size_bytes,
        sha256: p.sha256,
        signature: p.signature,
        kind: Some(p.kind),
        from_version: p.from_version,
        public_key: Some(p.public_key),
    })
}

/// Marks the rows silent past their phase's limit timed out, with a failure and a notice each.
async fn time_out(app: &App) -> Result<usize, StoreError> {
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let rows = tx
        .query(
            "WITH due AS (
                 SELECT task_id, vin, state FROM ota_task_vehicles
                  WHERE due_at <= now() AND active AND state <> 'pending'
                  ORDER BY due_at LIMIT $1 FOR UPDATE SKIP LOCKED)
             UPDATE ota_task_vehicles v SET state = 'timed_out', rank = 7, active = false, due_at = NULL,
                    fail_error = 'timed_out', updated_at = now()
               FROM due WHERE v.task_id = due.task_id AND v.vin = due.vin
             RETURNING v.task_id, v.vin, due.state, v.attempt",
            &[&TIMEOUT_BATCH],
        )
        .await?;
    for r in &rows {
        let (task, vin, phase, attempt): (String, String, String, i16) = (r.get(0), r.get(1), r.get(2), r.get(3));
        let detail = format!("silent in {phase}");
        record_failure(&tx, &task, &vin, attempt, "timed_out", None, Some(&detail), None).await?;
        super::rollout::compensate(app, &tx, &task, &vin, attempt, &detail).await?;
        app.metrics.ota_timeouts.with_label_values(&[&phase]).inc();
        tracing::info!(task = %task, %vin, phase = %phase, "OTA vehicle timed out");
    }
    tx.commit().await?;
    if !rows.is_empty() {
        app.purchase_wakers.relay.notify_one();
    }
    Ok(rows.len())
}

/// Records a failed upgrade (once per task, vehicle, attempt and status) and its operator
/// notice, inside `tx`.
///
/// # Errors
/// PostgreSQL errors.
#[allow(clippy::too_many_arguments)]
pub async fn record_failure(
    tx: &tokio_postgres::Transaction<'_>,
    task: &str,
    vin: &str,
    attempt: i16,
    status: &str,
    ecu: Option<&str>,
    error: Option<&str>,
    reported_ms: Option<i64>,
) -> Result<(), StoreError> {
    let inserted = tx
        .execute(
            "INSERT INTO ota_failures (task_id, vin, status, ecu, error, reported_ms, attempt)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (task_id, vin, status, attempt) DO NOTHING",
            &[&task, &vin, &status, &ecu, &error, &reported_ms, &attempt],
        )
        .await?;
    if inserted == 1 {
        let notice = json!({"type": "ota_failure", "task_id": task, "vin": vin, "status": status, "ecu": ecu,
                            "error": error, "attempt": attempt});
        let key = if attempt == 1 {
            format!("ota_failure:{task}:{vin}:{status}")
        } else {
            format!("ota_failure:{task}:{vin}:{status}:{attempt}")
        };
        outbox::enqueue(tx, outbox::NOTICES, &key, &notice).await?;
    }
    Ok(())
}

/// Starts due tasks and finishes running ones with nothing left to follow.
async fn start_and_finish(app: &App) -> Result<(), StoreError> {
    let client = app.pg.get().await?;
    let started = client
        .execute("UPDATE ota_tasks SET state = 'running' WHERE state = 'scheduled' AND start_at <= now()", &[])
        .await?;
    let finished = client
        .execute(
            "UPDATE ota_tasks t SET state = 'finished', ended_at = now()
              WHERE state = 'running' AND NOT EXISTS (
                    SELECT 1 FROM ota_task_vehicles v WHERE v.task_id = t.id AND (v.active OR NOT v.cancel_sent))",
            &[],
        )
        .await?;
    if started + finished > 0 {
        tracing::info!(started, finished, "OTA tasks started or finished");
    }
    Ok(())
}

/// One poll: returns whether the push budget ran out with work left (poll again soon).
async fn poll(app: &Arc<App>, sends: &mut JoinSet<()>) -> Result<bool, StoreError> {
    start_and_finish(app).await?;
    super::rollout::advance(app).await?;
    let granted = take_budget(app, app.config.ota.push_rate_per_s).await?;
    let due = if granted > 0 { claim_pushes(app, granted).await? } else { Vec::new() };
    let claimed = u32::try_from(due.len()).unwrap_or(u32::MAX);
    give_back(app, granted.saturating_sub(claimed)).await?;
    for d in due {
        let app = Arc::clone(app);
        sends.spawn(async move {
            let (task, vin) = (d.task_id.clone(), d.vin.clone());
            if let Err(e) = push_one(&app, d).await {
                tracing::warn!(task = %task, %vin, error = %e, "failed to push an OTA notice; retried after its lease");
            }
        });
    }
    time_out(app).await?;
    Ok(granted == 0 || claimed == granted)
}

/// Runs until `stop`, every `ota.poll_ms` or at once when woken (a task created or cancelled,
/// a vehicle connected).
pub async fn run(app: Arc<App>, stop: CancellationToken) {
    let poll_every = Duration::from_millis(app.config.ota.poll_ms);
    let mut sends = JoinSet::new();
    while !stop.is_cancelled() {
        let busy = match poll(&app, &mut sends).await {
            Ok(busy) => busy,
            Err(e) => {
                tracing::warn!(error = %e, "OTA driver poll failed");
                false
            }
        };
        while sends.try_join_next().is_some() {}
        // A full budget used: the next second's budget is what limits; otherwise wait.
        let pause = if busy { poll_every.min(Duration::from_millis(200)) } else { poll_every };
        tokio::select! {
            () = app.ota_waker.notified() => {}
            () = tokio::time::sleep(pause) => {}
            () = stop.cancelled() => {}
        }
    }
    sends.abort_all();
    while sends.join_next().await.is_some() {}
}

/// Vehicles connected: their notices waiting for a connection become due now (one statement
/// for all of them).
///
/// # Errors
/// PostgreSQL errors.
pub async fn on_connected(app: &App, vins: &[&Vin]) -> Result<(), StoreError> {
    let vins: Vec<&str> = vins.iter().map(|v| v.as_str()).collect();
    let client = app.pg.get().await?;
    let n = client
        .execute(
            "UPDATE ota_task_vehicles SET due_at = now()
              WHERE vin = ANY($1) AND due_at IS NULL AND (state = 'pending' OR (state = 'cancelled' AND NOT cancel_sent))",
            &[&vins],
        )
        .await?;
    if n > 0 {
        app.ota_waker.notify_one();
    }
    Ok(())
}

/// Sets `devsvc_ota_tasks{state}` and `devsvc_ota_vehicles{state}` from PostgreSQL.
///
/// # Errors
/// PostgreSQL errors.
pub async fn refresh_gauges(app: &App) -> Result<(), StoreError> {
    let client = app.pg.get().await?;
    let tasks = client.query("SELECT state, count(*) FROM ota_tasks GROUP BY state", &[]).await?;
    for s in ["scheduled", "running", "paused", "finished", "cancelled"] {
        let n = tasks.iter().find(|r| r.get::<_, &str>(0) == s).map_or(0, |r| r.get::<_, i64>(1));
        app.metrics.ota_tasks.with_label_values(&[s]).set(n);
    }
    let vehicles = client
        .query(
            "SELECT v.state, count(*) FROM ota_task_vehicles v JOIN ota_tasks t ON t.id = v.task_id
              WHERE t.state IN ('scheduled', 'running', 'paused') GROUP BY v.state",
            &[],
        )
        .await?;
    for s in VehicleState::ALL {
        let n = vehicles.iter().find(|r| r.get::<_, &str>(0) == s.as_str()).map_or(0, |r| r.get::<_, i64>(1));
        app.metrics.ota_vehicles.with_label_values(&[s.as_str()]).set(n);
    }
    Ok(())
}
