//! Scenarios driven through the device service's API while the fleet is held: a purchase
//! storm (many doors opened at once for orders), an activation wave (vehicles ask for QR ids,
//! the "owner's app" scans and confirms), and an OTA campaign over every vehicle. Each
//! measures its end-to-end times as the users would see them.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::api::Api;
use crate::cabinet::now_ms;
use crate::fleet_ids::{cabinet_id, vin};
use crate::stats::{Summary, new_histogram, summarize};

/// Orders one storm places, at most (each holds one HTTP poll loop); a larger storm is cut.
const STORM_MAX: usize = 5000;
/// How often the harness looks at a running order, at least; with many orders at once, less
/// often, so that polls come to at most [`POLLS_PER_S`] (the service's own transition times
/// give the durations, so the poll period does not change them).
const POLL: Duration = Duration::from_millis(500);
/// The storm's polls per second, at most.
const POLLS_PER_S: u32 = 500;
/// How long one order may take before the harness gives up on it.
const ORDER_LIMIT: Duration = Duration::from_secs(120);

/// What a purchase storm measured.
#[derive(Debug, Serialize)]
pub struct PurchaseStorm {
    /// Orders attempted.
    pub orders: usize,
    /// Final states reached (`settled`, `cancelled`, `abnormal`, or the harness's `gave_up`,
    /// `refused:<code>`).
    pub outcomes: BTreeMap<String, u64>,
    /// Order created -> settled, for settled orders.
    pub order_to_settled: Summary,
    /// Order created -> door reported open.
    pub order_to_door_open: Summary,
}

/// Opens `orders` doors at once (cabinet `i % cabinets`, door `1 + i / cabinets`; at most
/// [`STORM_MAX`]), each for a different shopper: sign the shopper's deduction contract, create,
/// authorise, then follow the order to its end. Every order is placed at the start, so none
/// waits for an earlier one to finish.
pub async fn purchase_storm(api: Api, cabinets: usize, doors: u8, orders: usize) -> PurchaseStorm {
    let doors = usize::from(doors.max(1));
    let n = orders.min(cabinets * doors).min(STORM_MAX);
    let poll = POLL.max(Duration::from_secs(1) * u32::try_from(n).unwrap_or(u32::MAX) / POLLS_PER_S);
    let mut settled = new_histogram();
    let mut opened = new_histogram();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut runs = futures_util::stream::iter(0..n)
        .map(|i| async move { one_order(api, i, cabinets, poll).await })
        .buffer_unordered(n.max(1));
    while let Some((outcome, to_open, to_end)) = runs.next().await {
        if let Some(d) = to_open {
            let _ = opened.record(micros(d));
        }
        if outcome == "settled"
            && let Some(d) = to_end
        {
            let _ = settled.record(micros(d));
        }
        *outcomes.entry(outcome).or_default() += 1;
    }
    PurchaseStorm { orders: n, outcomes, order_to_settled: summarize(&settled), order_to_door_open: summarize(&opened) }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

async fn one_order(
    api: Api,
    i: usize,
    cabinets: usize,
    poll: Duration,
) -> (String, Option<Duration>, Option<Duration>) {
    let cabinet = cabinet_id(i % cabinets);
    let door = 1 + i / cabinets;
    let user = format!("lt-shopper-{i}-{}", now_ms());
    // A purchase needs the shopper's password-free deduction contract, signed by the provider.
    let signed = json!({"tenant": api.shop_tenant(), "user_id": user, "contract_id": format!("lt-ct-{user}"),
                        "state": "signed", "event_ms": now_ms()});
    match api.call("POST", "/v1/contracts/callback", Some(&signed)).await {
        Ok((200, _)) => {}
        Ok((_, e)) => return (format!("contract_refused:{}", e["error"].as_str().unwrap_or("unknown")), None, None),
        Err(_) => return ("api_error".into(), None, None),
    }
    let body = json!({"user_id": user, "cabinet_id": cabinet.as_str(), "door_id": door});
    let started = Instant::now();
    let order = match api.call("POST", "/v1/orders", Some(&body)).await {
        Ok((201, order)) => order,
        Ok((_, e)) => return (format!("refused:{}", e["error"].as_str().unwrap_or("unknown")), None, None),
        Err(_) => return ("api_error".into(), None, None),
    };
    let id = order["id"].as_str().unwrap_or_default().to_owned();
    let payment = json!({"order_id": id, "status": "authorised", "payment_id": format!("lt-pay-{id}"),
                         "amount_cents": order["hold_cents"], "currency": order["currency"]});
    match api.call("POST", "/v1/payments/callback", Some(&payment)).await {
        Ok((200, _)) => {}
        Ok((_, e)) => return (format!("payment_refused:{}", e["error"].as_str().unwrap_or("unknown")), None, None),
        Err(_) => return ("api_error".into(), None, None),
    }
    // Follow the order; its own transition times (the service's clock) give the durations, so
    // how often the harness looks does not change them.
    while started.elapsed() < ORDER_LIMIT {
        tokio::time::sleep(poll).await;
        let Ok((200, o)) = api.call("GET", &format!("/v1/orders/{id}"), None).await else { continue };
        let state = o["state"].as_str().unwrap_or_default();
        if ["settled", "cancelled", "abnormal"].contains(&state) {
            let created = o["created_ms"].as_u64().unwrap_or(0);
            let at = |to: &str| {
                o["transitions"]
                    .as_array()
                    .and_then(|t| t.iter().find(|x| x["to"] == to))
                    .and_then(|x| x["at_ms"].as_u64())
            };
            let since = |ms: u64| Duration::from_millis(ms.saturating_sub(created));
            return (state.to_owned(), at("door_open").map(since), at(state).map(since));
        }
    }
    ("gave_up".into(), None, None)
}

/// The owner's app for one QR id: scan, then confirm (the vehicle does the rest).
pub async fn scan_and_confirm(api: Api, vin: &str, qr_id: &str) -> anyhow::Result<()> {
    let owner = json!({"user_id": crate::seed::owner_of(vin)});
    api.expect("POST", &format!("/v1/activations/{qr_id}/scan"), Some(&owner), &[200]).await?;
    api.expect("POST", &format!("/v1/activations/{qr_id}/confirm"), Some(&owner), &[200]).await?;
    Ok(())
}

/// How an OTA campaign runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OtaOptions {
    /// Upload a package of this many MiB and install it (0: an external descriptor, nothing
    /// downloaded).
    pub package_mib: u64,
    /// Install this stored package instead (its version is the task's).
    #[serde(default)]
    pub package_id: Option<String>,
    /// Waves, cumulative percentages.
    pub waves: Vec<u8>,
    /// The task pauses itself above this failure percentage.
    pub error_threshold_pct: u8,
    /// Resume a task that paused itself (after `resume_after`), as an operator who looked would.
    pub resume_after_pause: bool,
}

impl Default for OtaOptions {
    fn default() -> Self {
        OtaOptions {
            package_mib: 0,
            package_id: None,
            waves: vec![100],
            error_threshold_pct: 100,
            resume_after_pause: true,
        }
    }
}

/// What an OTA campaign measured.
#[derive(Debug, Serialize)]
pub struct OtaCampaign {
    /// The task.
    pub task_id: String,
    /// Vehicles accepted and refused by validation.
    pub accepted: usize,
    /// Refused.
    pub rejected: usize,
    /// Vehicles per state when the campaign ended or the hold did.
    pub counts: Value,
    /// Task creation -> every vehicle final, if that happened within the hold.
    pub finished_after_s: Option<f64>,
    /// The stored package's size, bytes (0: an external one).
    pub package_bytes: u64,
    /// Seconds the upload took.
    pub upload_s: Option<f64>,
    /// The last wave released (0-based) and how many there are.
    pub waves: (i64, usize),
    /// Times the task paused itself at its error threshold (each resumed if asked).
    pub automatic_pauses: u32,
}

/// A package of `mib` MiB of deterministic pseudo-random bytes: its SHA-256, then the same
/// bytes again to send (never all in memory).
fn package_bytes(seed: u64) -> impl FnMut(&mut [u8]) {
    let mut rng = fastrand::Rng::with_seed(seed);
    move |buf: &mut [u8]| rng.fill(buf)
}

async fn upload_package(api: Api, id: &str, version: &str, mib: u64) -> anyhow::Result<f64> {
    let len = mib << 20;
    let seed = now_ms();
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut fill = package_bytes(seed);
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        fill(&mut buf);
        sha2::Digest::update(&mut hasher, &buf);
    }
    let sha = hex::encode(sha2::Digest::finalize(hasher));
    let started = Instant::now();
    let path = format!("/v1/ota/packages/{id}?version={version}&sha256={sha}&created_by=loadtest");
    let (status, body) = api.put_stream(&path, len, package_bytes(seed)).await?;
    anyhow::ensure!(status == 201, "package upload answered {status}: {body}");
    Ok(started.elapsed().as_secs_f64())
}

/// Creates a task upgrading vehicles `0..vehicles` to a version above any earlier run's (with a
/// stored package of `o.package_mib` MiB, in `o.waves`), and follows it until it finishes or
/// `until`, resuming it after each automatic pause when `o.resume_after_pause`.
///
/// # Errors
/// The package or the task could not be created.
pub async fn ota_campaign(api: Api, vehicles: usize, until: Instant, o: OtaOptions) -> anyhow::Result<OtaCampaign> {
    let mut package_bytes = o.package_mib << 20;
    let version = match &o.package_id {
        Some(id) => {
            let p = api.expect("GET", &format!("/v1/ota/packages/{id}"), None, &[200]).await?;
            package_bytes = p["size_bytes"].as_u64().unwrap_or(0);
            p["version"].as_str().unwrap_or_default().to_owned()
        }
        None => format!("1.{}.0", now_ms() / 1000),
    };
    let vins: Vec<String> = (0..vehicles).map(|n| vin(n).to_string()).collect();
    let mut body = json!({
        "name": format!("load test {version}"), "version": version, "upgrade_type": "silent", "task_type": "normal",
        "vins": vins, "created_by": "loadtest",
        "rollout": {"waves": o.waves, "success_threshold_pct": 90, "error_threshold_pct": o.error_threshold_pct},
    });
    let mut upload_s = None;
    if let Some(id) = &o.package_id {
        body["package_id"] = json!(id);
    } else if o.package_mib > 0 {
        let id = format!("lt-{version}");
        upload_s = Some(upload_package(api, &id, &version, o.package_mib).await?);
        body["package_id"] = json!(id);
    } else {
        body["package"] = json!({"id": format!("lt-{version}"), "size_bytes": 524_288_000u64, "sha256": "ab".repeat(32),
                                 "signature": "bG9hZHRlc3Q=", "url": format!("https://ota.invalid/lt-{version}")});
    }
    let started = Instant::now();
    let created = api.expect("POST", "/v1/ota/tasks", Some(&body), &[201]).await?;
    let task_id = created["id"].as_str().unwrap_or_default().to_owned();
    let count = |k: &str| created[k].as_array().map_or(0, Vec::len);
    let (accepted, rejected) = (count("accepted"), count("rejected"));
    let mut finished_after_s = None;
    let mut counts = Value::Null;
    let (mut wave, mut automatic_pauses) = (0, 0);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Ok((200, t)) = api.call("GET", &format!("/v1/ota/tasks/{task_id}"), None).await {
            counts = t["counts"].clone();
            wave = t["current_wave"].as_i64().unwrap_or(0);
            if t["state"] == "finished" {
                finished_after_s = Some(started.elapsed().as_secs_f64());
                break;
            }
            if t["state"] == "paused" && t["paused_reason"] == "error_threshold" {
                automatic_pauses += 1;
                eprintln!("OTA task {task_id} paused itself at wave {wave}: {counts}");
                if o.resume_after_pause {
                    api.expect("POST", &format!("/v1/ota/tasks/{task_id}/resume"), None, &[200]).await?;
                }
            }
        }
    }
    Ok(OtaCampaign {
        task_id,
        accepted,
        rejected,
        counts,
        finished_after_s,
        package_bytes,
        upload_s,
        waves: (wave, o.waves.len()),
        automatic_pauses,
    })
}
