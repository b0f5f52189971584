//! Activation by QR code (seed document 004, the final design after its "4.1" and "4.2").
//!
//! ```text
//! car: qr_request ──> issued ──scan(user)──> scanned ──confirm──> confirmed ──report(code)──> reported
//!                       │                       │                    │  (code sent down, QoS 1)     │
//!                       └──── expired / superseded by a new request, cancelled by the app ─┘   activated in PostgreSQL
//! ```
//!
//! - The QR id is a random UUID written as 32 hex characters (short, so the QR code stays
//!   sparse), cached in Redis with what it stands for (`P qr:{id}`: VIN, seat, state, user,
//!   code, expiry). A new request from the car supersedes the car's previous id.
//! - Confirming does **not** activate anything: it creates the activation security code and
//!   sends it to the car. The car activates locally and reports with the code; only that report
//!   makes the car active in PostgreSQL (seed 4.1: the cloud never claims an activation the car
//!   has not made). A car offline at confirmation gets the code when it connects, while the QR
//!   id lives.
//! - Every transition is one Lua script on the QR id's key, so a cancellation and a report
//!   cannot both win: once the car reported with the right code, the activation can only
//!   complete; before that, a cancellation makes every report refused. A repeated report gets
//!   the same answer (the PostgreSQL write is idempotent, and after the cache expired the
//!   `activations` row answers it).

use std::sync::{Arc, LazyLock};

use protocol::Vin;
use protocol::mqtt::topic::DownlinkKind;
use protocol::vehicle::{
    ActivationCode, ActivationOutcome, ActivationReport, ActivationResult, QrIssued, QrRequest, Seat,
};
use redis::Script;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::downlink;
use crate::app::{App, now_ms};
use crate::error::StoreError;

/// Reads the QR id's hash into `q` and works out its effective `state`: `unknown_qr_id` when
/// the key is gone, `expired` when superseded or past its expiry (unless already reported or
/// cancelled). `ARGV[1]` is the time now in ms.
const PRELUDE: &str = r"
local q = redis.call('HMGET', KEYS[1], 'state', 'exp', 'user', 'code', 'vin', 'seat', 'issued')
local now = tonumber(ARGV[1])
local state = q[1]
if not state then state = 'unknown_qr_id'
elseif state == 'superseded' then state = 'expired'
elseif state ~= 'reported' and state ~= 'cancelled' and now > tonumber(q[2]) then state = 'expired' end
";

/// `ARGV[2]` user.
const SCAN: &str = r"
if state == 'issued' then
  redis.call('HSET', KEYS[1], 'state', 'scanned', 'user', ARGV[2])
  return {'ok', 'scanned'}
end
if state == 'scanned' or state == 'confirmed' or state == 'reported' then
  if q[3] == ARGV[2] then return {'ok', state} end
  return {'already_scanned', state}
end
return {state, state}
";

/// `ARGV[2]` user, `ARGV[3]` a fresh code (used only on the first confirmation).
const CONFIRM: &str = r"
if state == 'issued' then return {'not_scanned', state} end
if state == 'scanned' or state == 'confirmed' or state == 'reported' then
  if q[3] ~= ARGV[2] then return {'already_scanned', state} end
  if state == 'scanned' then
    redis.call('HSET', KEYS[1], 'state', 'confirmed', 'code', ARGV[3])
    return {'ok', 'confirmed', ARGV[3], q[5], q[2]}
  end
  if state == 'confirmed' then return {'ok', state, q[4], q[5], q[2]} end
  return {'ok', state}
end
return {state, state}
";

/// `ARGV[2]` user.
const CANCEL: &str = r"
if state == 'reported' then return {'already_reported', state} end
if state == 'scanned' or state == 'confirmed' then
  if q[3] ~= ARGV[2] then return {'already_scanned', state} end
  redis.call('HSET', KEYS[1], 'state', 'cancelled')
  return {'ok', 'cancelled'}
end
if state == 'cancelled' then return {'ok', state} end
if state == 'issued' then return {'not_scanned', state} end
return {state, state}
";

/// `ARGV[2]` VIN, `ARGV[3]` code, `ARGV[4]` wrong codes allowed.
const REPORT: &str = r"
if state ~= 'unknown_qr_id' and q[5] ~= ARGV[2] then return {'unknown_qr_id'} end
if state == 'reported' or state == 'confirmed' then
  if q[4] == ARGV[3] then
    redis.call('HSET', KEYS[1], 'state', 'reported')
    return {'activate', q[3], q[6], q[7]}
  end
  if state == 'confirmed' then
    local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
    if n >= tonumber(ARGV[4]) then redis.call('HSET', KEYS[1], 'state', 'cancelled') end
  end
  return {'wrong_code'}
end
if state == 'issued' or state == 'scanned' then return {'wrong_code'} end
return {state}
";

/// Marks a QR id superseded if it has not been reported or cancelled.
const SUPERSEDE: &str = r"
local s = redis.call('HGET', KEYS[1], 'state')
if s == 'issued' or s == 'scanned' or s == 'confirmed' then redis.call('HSET', KEYS[1], 'state', 'superseded') end
return 0
";

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

static SCAN_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(SCAN));
static CONFIRM_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(CONFIRM));
static CANCEL_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(CANCEL));
static REPORT_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(REPORT));

/// Longest `request_id` a car may send (it is part of a Redis key).
const MAX_REQUEST_ID: usize = 64;

fn qr_key(app: &App, qr_id: &str) -> String {
    format!("{}qr:{{{qr_id}}}", app.keys.prefix())
}

fn current_key(app: &App, vin: &Vin) -> String {
    format!("{}qr:{{{vin}}}:current", app.keys.prefix())
}

fn request_key(app: &App, vin: &Vin, request_id: &str) -> String {
    format!("{}qr:{{{vin}}}:req:{request_id}", app.keys.prefix())
}

fn ttl_ms(app: &App) -> u64 {
    app.config.vehicles.qr_ttl_s * 1000
}

/// How long the cache keeps a QR id: twice its life, so that a late scan or report is told
/// "expired" rather than "unknown".
fn keep_ms(app: &App) -> u64 {
    ttl_ms(app) * 2
}

fn seat_str(seat: Seat) -> &'static str {
    match seat {
        Seat::Driver => "driver",
        Seat::Passenger => "passenger",
    }
}

fn random<const N: usize>() -> Result<[u8; N], StoreError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| StoreError::invalid("random", e.to_string()))?;
    Ok(b)
}

/// A random (version 4) UUID as 32 lowercase hex characters.
fn new_qr_id() -> Result<String, StoreError> {
    let mut b: [u8; 16] = random()?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Ok(hex::encode(b))
}

/// A 6-digit activation security code. Six digits suffice: it is accepted only from the car
/// the QR id names, over its authenticated session, within the QR id's life, and
/// `vehicles.code_attempts` wrong codes cancel the activation.
fn new_code() -> Result<String, StoreError> {
    let n = u64::from_le_bytes(random()?);
    Ok(format!("{:06}", n % 1_000_000))
}

fn step(app: &App, step: &str, result: &str) {
    app.metrics.activation_steps.with_label_values(&[step, result]).inc();
}

/// Answers a car's `qr_request`: issues a QR id (or, for a request id already answered, the
/// same one again) and sends it down in the background.
///
/// # Errors
/// Redis errors; a request id that is too long is `Invalid`.
pub async fn on_qr_request(app: &Arc<App>, vin: &Vin, request: QrRequest) -> Result<&'static str, StoreError> {
    if request.request_id.is_empty() || request.request_id.len() > MAX_REQUEST_ID {
        step(app, "qr_request", "invalid");
        return Ok("invalid");
    }
    let issued = issue(app, vin, &request).await?;
    step(app, "qr_request", "ok");
    downlink::send_in_background(app, vin.clone(), DownlinkKind::QrId, issued, 1);
    Ok("applied")
}

async fn issue(app: &App, vin: &Vin, request: &QrRequest) -> Result<QrIssued, StoreError> {
    let mut con = app.redis.clone();
    let now = now_ms();
    let exp = now + ttl_ms(app);
    let qr_id = new_qr_id()?;
    let key = qr_key(app, &qr_id);
    redis::pipe()
        .cmd("HSET")
        .arg(&key)
        .arg(&[
            ("vin", vin.as_str()),
            ("seat", seat_str(request.seat)),
            ("state", "issued"),
            ("exp", &exp.to_string()),
            ("issued", &now.to_string()),
        ])
        .ignore()
        .cmd("PEXPIRE")
        .arg(&key)
        .arg(keep_ms(app))
        .ignore()
        .query_async::<()>(&mut con)
        .await?;
    // One id per request id: a repeated request (or a redelivered entry) gets the same one.
    let claimed: Option<String> = redis::cmd("SET")
        .arg(request_key(app, vin, &request.request_id))
        .arg(&qr_id)
        .arg("NX")
        .arg("PX")
        .arg(ttl_ms(app))
        .query_async(&mut con)
        .await?;
    if claimed.is_none() {
        let _: i64 = redis::cmd("DEL").arg(&key).query_async(&mut con).await?;
        let earlier: Option<String> =
            redis::cmd("GET").arg(request_key(app, vin, &request.request_id)).query_async(&mut con).await?;
        let earlier = earlier.unwrap_or_default();
        let exp: Option<u64> = redis::cmd("HGET").arg(qr_key(app, &earlier)).arg("exp").query_async(&mut con).await?;
        return Ok(QrIssued {
            request_id: request.request_id.clone(),
            qr_id: earlier,
            expires_at_ms: exp.unwrap_or(0),
        });
    }
    let previous: Option<String> = redis::cmd("SET")
        .arg(current_key(app, vin))
        .arg(&qr_id)
        .arg("PX")
        .arg(keep_ms(app))
        .arg("GET")
        .query_async(&mut con)
        .await?;
    if let Some(previous) = previous.filter(|p| *p != qr_id) {
        let _: i64 = Script::new(SUPERSEDE).key(qr_key(app, &previous)).invoke_async(&mut con).await?;
    }
    Ok(QrIssued { request_id: request.request_id.clone(), qr_id, expires_at_ms: exp })
}

/// An activation as the owner's app sees it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ActivationView {
    /// The QR id.
    pub qr_id: String,
    /// `issued`, `scanned`, `confirmed`, `reported`, `activated`, `cancelled`, `expired`.
    pub state: String,
    /// The vehicle.
    pub vin: Option<String>,
    /// The seat the code was shown for.
    pub seat: Option<String>,
    /// The user who scanned it.
    pub user_id: Option<String>,
    /// When the QR id expires, ms since the Unix epoch.
    pub expires_at_ms: Option<u64>,
    /// For a confirmation: whether the car acknowledged the code (false: it gets it when it
    /// connects, while the QR id lives).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code_delivered: Option<bool>,
}

/// A QR id's cached state, expiry, user, VIN and seat.
type Cached = (Option<String>, Option<u64>, Option<String>, Option<String>, Option<String>);

/// Reads an activation: from PostgreSQL once activated, else from the cache.
///
/// # Errors
/// `NotFound` for an id neither knows; storage errors.
pub async fn view(app: &App, qr_id: &str) -> Result<ActivationView, StoreError> {
    let client = app.pg.get().await?;
    if let Some(row) =
        client.query_opt("SELECT vin, seat, user_id FROM activations WHERE qr_id = $1", &[&qr_id]).await?
    {
        return Ok(ActivationView {
            qr_id: qr_id.to_owned(),
            state: "activated".into(),
            vin: Some(row.get(0)),
            seat: Some(row.get(1)),
            user_id: Some(row.get(2)),
            expires_at_ms: None,
            code_delivered: None,
        });
    }
    let mut con = app.redis.clone();
    let q: Cached = redis::cmd("HMGET")
        .arg(qr_key(app, qr_id))
        .arg(&["state", "exp", "user", "vin", "seat"])
        .query_async(&mut con)
        .await?;
    let (Some(mut state), exp, user_id, vin, seat) = q else {
        return Err(StoreError::NotFound(format!("activation {qr_id}")));
    };
    if state == "superseded" || (!["reported", "cancelled"].contains(&state.as_str()) && exp < Some(now_ms())) {
        state = "expired".into();
    }
    Ok(ActivationView { qr_id: qr_id.to_owned(), state, vin, seat, user_id, expires_at_ms: exp, code_delivered: None })
}

/// Runs a script and maps its verdict: `ok` is success, anything else a refusal with that code.
async fn run(
    app: &App,
    script: &Script,
    step_name: &str,
    qr_id: &str,
    args: &[&str],
) -> Result<Vec<String>, StoreError> {
    if qr_id.len() != 32 || !qr_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        step(app, step_name, "unknown_qr_id");
        return Err(StoreError::NotFound(format!("activation {qr_id}")));
    }
    let mut con = app.redis.clone();
    let mut invocation = script.key(qr_key(app, qr_id));
    invocation.arg(now_ms());
    for a in args {
        invocation.arg(*a);
    }
    let out: Vec<String> = invocation.invoke_async(&mut con).await?;
    let verdict = out.first().cloned().unwrap_or_default();
    step(app, step_name, &verdict);
    match verdict.as_str() {
        "ok" => Ok(out),
        "unknown_qr_id" => Err(StoreError::NotFound(format!("activation {qr_id}"))),
        code => Err(StoreError::rejected(
            refusal(code),
            format!("activation {qr_id} is {}", out.get(1).map_or("", String::as_str)),
        )),
    }
}

/// The static refusal code for the API.
fn refusal(code: &str) -> &'static str {
    match code {
        "expired" => "expired",
        "cancelled" => "cancelled",
        "already_scanned" => "already_scanned",
        "not_scanned" => "not_scanned",
        "already_reported" => "already_reported",
        _ => "refused",
    }
}

/// The app scanned the code: binds `user` to it, if `user` is the vehicle's buyer (seed 004:
/// the QR content binds the car to the user it was sold to). Scanning again by the same user is
/// harmless; another user is refused.
///
/// # Errors
/// `NotFound`, `Rejected` (`not_the_buyer`, `no_buyer` while `vehicles.require_buyer` and the
/// vehicle has none, `already_activated` for another user than its owner, `expired`,
/// `cancelled`, `already_scanned`), storage errors.
pub async fn scan(app: &App, qr_id: &str, user: &str) -> Result<ActivationView, StoreError> {
    check_buyer(app, qr_id, user).await?;
    // The step is a Redis script: its audit row is written before it runs.
    crate::auth::audit::record_now(app).await?;
    run(app, &SCAN_SCRIPT, "scan", qr_id, &[user]).await?;
    view(app, qr_id).await
}

/// Refuses `user` for the vehicle behind `qr_id` unless it is the vehicle's buyer (or, once
/// activated, its owner). An id this service never issued is left to the scan script (404).
async fn check_buyer(app: &App, qr_id: &str, user: &str) -> Result<(), StoreError> {
    let vin: Option<String> =
        redis::cmd("HGET").arg(qr_key(app, qr_id)).arg("vin").query_async(&mut app.redis.clone()).await?;
    let Some(vin) = vin else { return Ok(()) };
    let client = app.pg.get().await?;
    let Some(row) =
        client.query_opt("SELECT buyer_user_id, owner_user_id FROM vehicles WHERE vin = $1", &[&vin]).await?
    else {
        return Ok(());
    };
    let (buyer, owner): (Option<String>, Option<String>) = (row.get(0), row.get(1));
    if owner.as_deref().is_some_and(|o| o != user) {
        return Err(StoreError::rejected("already_activated", "the vehicle is activated by another user"));
    }
    match buyer.as_deref() {
        Some(b) if b != user => Err(StoreError::rejected("not_the_buyer", "only the vehicle's buyer may activate it")),
        None if owner.is_none() && app.config.vehicles.require_buyer => Err(StoreError::rejected(
            "no_buyer",
            "the vehicle has no buyer registered; the sales side sets buyer_user_id",
        )),
        _ => Ok(()),
    }
}

/// The owner confirmed: creates the activation code (once; a repeated confirmation sends the
/// same code again) and sends it to the car. Nothing is activated here.
///
/// # Errors
/// `NotFound`, `Rejected` (`not_scanned`, `already_scanned`, `expired`, `cancelled`), Redis errors.
pub async fn confirm(app: &App, qr_id: &str, user: &str) -> Result<ActivationView, StoreError> {
    let fresh = new_code()?;
    crate::auth::audit::record_now(app).await?;
    let out = run(app, &CONFIRM_SCRIPT, "confirm", qr_id, &[user, &fresh]).await?;
    let mut view = view(app, qr_id).await?;
    if let [_, _, code, vin, exp] = out.as_slice() {
        let vin = Vin::new(vin).map_err(|e| StoreError::invalid("vin", e.to_string()))?;
        let payload =
            ActivationCode { qr_id: qr_id.to_owned(), code: code.clone(), expires_at_ms: exp.parse().unwrap_or(0) };
        let (_, outcome) = downlink::send(app, &vin, DownlinkKind::ActivationCode, &payload).await?;
        view.code_delivered = Some(outcome == protocol::bus::Outcome::Delivered);
    }
    Ok(view)
}

/// The owner cancelled before the car reported: every later report is refused (`cancelled`), and
/// the car is sent `activation_result` rejected/cancelled.
///
/// # Errors
/// `NotFound`, `Rejected` (`already_reported`, `already_scanned`, `not_scanned`, `expired`), Redis errors.
pub async fn cancel(app: &Arc<App>, qr_id: &str, user: &str) -> Result<ActivationView, StoreError> {
    crate::auth::audit::record_now(app).await?;
    run(app, &CANCEL_SCRIPT, "cancel", qr_id, &[user]).await?;
    let view = view(app, qr_id).await?;
    // The car may be showing the code or holding an activation code: tell it, as it would be
    // told in answer to a report (SPEC.md 2.3), so it shows a new QR code without waiting.
    if let Some(vin) = view.vin.as_deref().and_then(|v| Vin::new(v).ok()) {
        let result = ActivationResult {
            qr_id: qr_id.to_owned(),
            outcome: ActivationOutcome::Rejected,
            reason: Some("cancelled".to_owned()),
        };
        downlink::send_in_background(app, vin, DownlinkKind::ActivationResult, result, 1);
    }
    Ok(view)
}

/// The car reported its local activation: checks the code, makes the car active in PostgreSQL
/// (if it is not yet) and sends the result down. A repeated report gets the same result.
///
/// # Errors
/// Storage errors (the entry is then applied again: every step is idempotent).
pub async fn on_report(app: &Arc<App>, vin: &Vin, report: ActivationReport) -> Result<&'static str, StoreError> {
    let outcome = judge(app, vin, &report).await?;
    let reason = match &outcome {
        Ok(()) => "ok",
        Err(reason) => reason,
    };
    step(app, "report", reason);
    let result = ActivationResult {
        qr_id: report.qr_id,
        outcome: if outcome.is_ok() { ActivationOutcome::Activated } else { ActivationOutcome::Rejected },
        reason: outcome.err().map(str::to_owned),
    };
    downlink::send_in_background(app, vin.clone(), DownlinkKind::ActivationResult, result, 1);
    Ok("applied")
}

/// `Ok(Ok(()))`: activated; `Ok(Err(reason))`: refused.
async fn judge(app: &App, vin: &Vin, report: &ActivationReport) -> Result<Result<(), &'static str>, StoreError> {
    let code_hash = Sha256::digest(report.code.as_bytes()).to_vec();
    let client = app.pg.get().await?;
    if let Some(row) =
        client.query_opt("SELECT vin, code_sha256 FROM activations WHERE qr_id = $1", &[&report.qr_id]).await?
    {
        let (v, hash): (String, Vec<u8>) = (row.get(0), row.get(1));
        return Ok(if v != vin.as_str() {
            Err("unknown_qr_id")
        } else if hash == code_hash {
            Ok(())
        } else {
            Err("wrong_code")
        });
    }
    drop(client);
    if report.qr_id.len() != 32 || !report.qr_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(Err("unknown_qr_id"));
    }
    let mut con = app.redis.clone();
    let attempts = app.config.vehicles.code_attempts.to_string();
    let out: Vec<String> = REPORT_SCRIPT
        .key(qr_key(app, &report.qr_id))
        .arg(now_ms())
        .arg(vin.as_str())
        .arg(&report.code)
        .arg(&attempts)
        .invoke_async(&mut con)
        .await?;
    match out.as_slice() {
        [verdict, user, seat, issued] if verdict == "activate" => {
            let fresh = activate(app, vin, &report.qr_id, user, seat, &code_hash).await?;
            if fresh && let Ok(issued) = issued.parse::<u64>() {
                app.metrics.activation_seconds.observe(now_ms().saturating_sub(issued) as f64 / 1000.0);
            }
            Ok(Ok(()))
        }
        [verdict, ..] => Ok(Err(match verdict.as_str() {
            "wrong_code" => "wrong_code",
            "expired" => "expired",
            "cancelled" => "cancelled",
            _ => "unknown_qr_id",
        })),
        [] => Ok(Err("unknown_qr_id")),
    }
}

/// Records the activation and makes the car active if it is not yet, in one transaction.
/// Returns whether this call recorded it (false: a repeat).
async fn activate(
    app: &App,
    vin: &Vin,
    qr_id: &str,
    user: &str,
    seat: &str,
    code_hash: &[u8],
) -> Result<bool, StoreError> {
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let inserted = tx
        .query_opt(
            "INSERT INTO activations (qr_id, vin, user_id, seat, code_sha256, already_active)
             SELECT $1, vin, $3, $4, $5, state = 'activated' FROM vehicles WHERE vin = $2
             ON CONFLICT (qr_id) DO NOTHING RETURNING already_active",
            &[&qr_id, &vin.as_str(), &user, &seat, &code_hash],
        )
        .await?;
    if inserted.is_some() {
        tx.execute(
            "UPDATE vehicles SET state = 'activated', owner_user_id = $3, activated_at = now(), activation_qr = $1
              WHERE vin = $2 AND state <> 'activated'",
            &[&qr_id, &vin.as_str(), &user],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(inserted.is_some())
}

/// Cars connected: for each whose current QR id was confirmed and still lives, the code goes
/// down again (it may have missed it while offline; a second copy is harmless). The current QR
/// ids of all of them are read in one round trip.
///
/// # Errors
/// Redis errors.
pub async fn on_connected(app: &Arc<App>, vins: &[&Vin]) -> Result<(), StoreError> {
    let mut con = app.redis.clone();
    let reads = vins
        .iter()
        .map(|vin| {
            let mut get = redis::cmd("GET");
            get.arg(current_key(app, vin));
            get
        })
        .collect();
    let current: Vec<Option<String>> = con.query_each_as(reads).await?;
    for (vin, qr_id) in vins.iter().zip(current) {
        let Some(qr_id) = qr_id else { continue };
        let (state, code, exp): (Option<String>, Option<String>, Option<u64>) =
            redis::cmd("HMGET").arg(qr_key(app, &qr_id)).arg(&["state", "code", "exp"]).query_async(&mut con).await?;
        if let (Some("confirmed"), Some(code), Some(exp)) = (state.as_deref(), code, exp)
            && exp > now_ms()
        {
            let attempts = app.config.vehicles.connect_send_attempts;
            let payload = ActivationCode { qr_id, code, expires_at_ms: exp };
            downlink::send_in_background(app, (*vin).clone(), DownlinkKind::ActivationCode, payload, attempts);
        }
    }
    Ok(())
}
