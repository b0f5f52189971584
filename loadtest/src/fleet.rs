//! The orchestrator: provisions the simulated fleet, spreads it over worker processes (each
//! under the 20,000-file limit) and local source addresses, follows their progress, measures
//! the servers' memory, sends commands, and writes the JSON report.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use protocol::bus::{DeviceKey, Keys};
use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::api::Api;
use crate::cabinet::CabinetBehaviour;
use crate::fleet_ids::{cabinet_id, provision_credentials, vin};
use crate::rss::rss_bytes;
use crate::stats::{Merged, summarize};
use crate::tls::{TlsClient, TlsPlan};
use crate::vehicle::Control;
use crate::worker::{Report, WorkerPlan};
use crate::{commander, scenarios, seed};

/// Most devices one worker process simulates: each is a socket, and a process may open 20,000
/// files at most.
pub const MAX_PER_WORKER: usize = 9_000;

/// What a fleet run does.
#[derive(Debug, Clone, Serialize)]
pub struct FleetPlan {
    /// A name for the report.
    pub label: String,
    /// Redis of the system under test (credentials, connection map, commands).
    pub redis_url: String,
    /// Its key prefix.
    pub key_prefix: String,
    /// Gateway cabinet listeners.
    pub cabinet_addrs: Vec<SocketAddr>,
    /// MQTT listeners (gateways, or a broker for comparison).
    pub mqtt_addrs: Vec<SocketAddr>,
    /// Cabinets to simulate.
    pub cabinets: usize,
    /// Vehicles to simulate.
    pub vehicles: usize,
    /// Worker processes (0 = as few as the file limit allows).
    pub workers: usize,
    /// Source addresses 127.0.0.2 .. 127.0.0.(1+n) for cabinets.
    pub source_ips: usize,
    /// New connections per second, whole fleet.
    pub ramp_per_s: u32,
    /// Cabinet heartbeat interval, s.
    pub heartbeat_s: u64,
    /// How often a closed door's weights are reported, ms.
    pub closed_report_ms: u64,
    /// Cabinet login version (SPEC.md 1.7): 2, or 1 for older firmware.
    pub login_version: u8,
    /// How long to hold the fleet after it is connected, s.
    pub hold_s: u64,
    /// Commands per second during the hold.
    pub commands_per_s: u32,
    /// Commands open doors for orders instead of querying them.
    #[serde(default)]
    pub open_doors: bool,
    /// QoS 1 uplinks per second per vehicle during the whole run.
    pub publish_per_s: f64,
    /// Processes whose memory is measured (gateways, broker).
    pub server_pids: Vec<u32>,
    /// Vehicles send user name and token (false for a bare broker).
    pub credentials: bool,
    /// Hard bound on the whole run, s.
    pub max_duration_s: u64,
    /// The device service's API, for seeding and the scenarios.
    #[serde(default)]
    pub api: Option<SocketAddr>,
    /// Register the fleet through the API first.
    #[serde(default)]
    pub seed: bool,
    /// Purchase storm: doors opened for orders at once when the hold starts.
    #[serde(default)]
    pub purchases: usize,
    /// Activation wave: vehicles that start an activation when the hold starts.
    #[serde(default)]
    pub activations: usize,
    /// OTA campaign over every vehicle when the hold starts.
    #[serde(default)]
    pub ota: bool,
    /// Time between two steps of a simulated upgrade, ms.
    #[serde(default)]
    pub ota_step_ms: u64,
    /// The campaign's package, waves and threshold.
    #[serde(default)]
    pub ota_options: crate::scenarios::OtaOptions,
    /// How the vehicles download and fail.
    #[serde(default)]
    pub ota_vehicles: crate::worker::OtaVehicles,
    /// Devices connect over TLS (the listeners above are TLS listeners).
    #[serde(default)]
    pub tls: Option<TlsPlan>,
}

struct Worker {
    child: Child,
    plan: WorkerPlan,
}

/// The outcome of a run, as written to the report.
#[derive(Debug, Serialize)]
pub struct FleetResult {
    /// Devices connected at the end of the ramp.
    pub connected: u64,
    /// Seconds from the first connection to all connected (or to the ramp timeout).
    pub ramp_s: f64,
    /// Logins per second over the ramp.
    pub login_rate_per_s: f64,
    /// Memory of each measured process before the fleet, bytes.
    pub rss_before: Vec<u64>,
    /// ... with the fleet connected and idle, bytes.
    pub rss_connected: Vec<u64>,
    /// ... at the end of the hold, bytes.
    pub rss_end: Vec<u64>,
    /// Memory per connection over all measured processes, right after the ramp:
    /// (connected - before) / devices.
    pub rss_per_connection_bytes: f64,
    /// The same at the end of the hold: the steady state of an idle fleet.
    pub rss_per_connection_end_bytes: f64,
    /// Everything else measured.
    pub details: serde_json::Value,
}

fn split(total: usize, parts: usize, i: usize) -> (usize, usize) {
    let base = total / parts;
    let extra = total % parts;
    let start = i * base + i.min(extra);
    (start, start + base + usize::from(i < extra))
}

async fn spawn_workers(
    plan: &FleetPlan,
    reports: mpsc::UnboundedSender<(usize, Report)>,
) -> anyhow::Result<Vec<Worker>> {
    let devices = plan.cabinets + plan.vehicles;
    let workers = if plan.workers == 0 { devices.div_ceil(MAX_PER_WORKER).max(1) } else { plan.workers };
    let exe = std::env::current_exe().context("failed to find the loadtest binary")?;
    let mut out = Vec::with_capacity(workers);
    for w in 0..workers {
        let source_ip = (plan.source_ips > 0).then(|| {
            let last = u8::try_from(2 + w % plan.source_ips).unwrap_or(2);
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
        });
        let wp = WorkerPlan {
            cabinet_addrs: plan.cabinet_addrs.clone(),
            mqtt_addrs: plan.mqtt_addrs.clone(),
            cabinets: split(plan.cabinets, workers, w),
            vehicles: split(plan.vehicles, workers, w),
            source_ip,
            ramp_per_s: (plan.ramp_per_s / u32::try_from(workers).unwrap_or(1)).max(1),
            heartbeat_s: plan.heartbeat_s,
            closed_report_ms: plan.closed_report_ms,
            login_version: plan.login_version,
            publish_per_s: plan.publish_per_s,
            credentials: plan.credentials,
            max_duration_s: plan.max_duration_s + 30,
            ota_step_ms: plan.ota_step_ms.max(1),
            ota_vehicles: plan.ota_vehicles.clone(),
            tls: plan.tls.clone(),
        };
        let mut child = Command::new(&exe)
            .arg("worker")
            .arg(serde_json::to_string(&wp)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("failed to start a worker process")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let tx = reports.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(report) = serde_json::from_str::<Report>(&line) {
                    let _ = tx.send((w, report));
                }
            }
        });
        out.push(Worker { child, plan: wp });
    }
    Ok(out)
}

/// One point of the run's timeline (for the charts).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sample {
    /// Seconds since the workers started.
    pub t_s: f64,
    /// Devices connected.
    pub connected: u64,
    /// QoS 1 uplinks acknowledged so far.
    pub acked: u64,
}

impl Sample {
    fn now(started: Instant, connected: &[u64], acked: &[u64]) -> Self {
        Self { t_s: started.elapsed().as_secs_f64(), connected: connected.iter().sum(), acked: acked.iter().sum() }
    }
}

/// After the ramp: the deepest drop of the connected count below the whole fleet, and how
/// long after the first sample below it the fleet was whole again (to the second: the
/// progress samples' resolution; the per-device `reconnect` latencies are exact).
fn deepest_dip(timeline: &[Sample], target: u64, ramp_s: f64) -> Option<serde_json::Value> {
    let after: Vec<&Sample> = timeline.iter().filter(|s| s.t_s > ramp_s).collect();
    let first_below = after.iter().position(|s| s.connected < target)?;
    let lowest = after[first_below..].iter().map(|s| s.connected).min().unwrap_or(target);
    let recovered = after[first_below..].iter().find(|s| s.connected >= target).map(|s| s.t_s);
    let began = after[first_below].t_s;
    Some(json!({
        "first_below_at_s": began,
        "lowest_connected": lowest,
        "devices_dropped": target - lowest,
        "whole_again_after_s": recovered.map(|t| t - began),
    }))
}

/// `[ 12.0s] [##########..........]  7500/15000 connected, +812/s, 0 uplinks/s`
fn progress_line(now: &Sample, target: u64, before: Option<&Sample>) -> String {
    const WIDTH: u64 = 20;
    let filled = (now.connected * WIDTH).checked_div(target).map_or(WIDTH, |f| f.min(WIDTH));
    let bar: String = (0..WIDTH).map(|i| if i < filled { '#' } else { '.' }).collect();
    let (conn_rate, ack_rate) = before.map_or((0.0, 0.0), |b| {
        let dt = (now.t_s - b.t_s).max(0.001);
        ((now.connected as f64 - b.connected as f64) / dt, now.acked.saturating_sub(b.acked) as f64 / dt)
    });
    format!(
        "[{:>6.1}s] [{bar}] {:>6}/{target} connected, {conn_rate:+.0}/s, {ack_rate:.0} uplinks/s",
        now.t_s, now.connected
    )
}

fn rss_all(pids: &[u32]) -> Vec<u64> {
    pids.iter().map(|p| rss_bytes(*p).unwrap_or(0)).collect()
}

/// Runs the plan; returns the result (also printed as it goes).
///
/// # Errors
/// Redis unreachable, or workers that cannot be started.
pub async fn run(plan: &FleetPlan) -> anyhow::Result<FleetResult> {
    let deadline = Instant::now() + Duration::from_secs(plan.max_duration_s);
    // Refuse unusable TLS settings here rather than in every worker.
    if let Some(tls) = &plan.tls {
        TlsClient::new(tls)?;
    }
    let keys = Keys::new(plan.key_prefix.clone());
    if plan.credentials {
        let client = redis::Client::open(plan.redis_url.as_str())?;
        let mut con = client.get_multiplexed_async_connection().await.context("failed to reach Redis")?;
        provision_credentials(&mut con, &keys, plan.cabinets, plan.vehicles).await?;
    }
    let api = plan.api.map(Api::new);
    if let (Some(api), true) = (api, plan.seed) {
        let seeded = seed::run(api, plan.cabinets, plan.vehicles, &CabinetBehaviour::default()).await?;
        eprintln!("registered through the API: {} new, {} already there", seeded.created, seeded.existing);
    }
    let rss_before = rss_all(&plan.server_pids);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut workers = spawn_workers(plan, tx).await?;
    let target = (plan.cabinets + plan.vehicles) as u64;
    let mut connected = vec![0u64; workers.len()];
    let mut acked = vec![0u64; workers.len()];
    let started = Instant::now();
    let ramp_limit = started + Duration::from_secs_f64(target as f64 / f64::from(plan.ramp_per_s.max(1)) + 60.0);
    let mut last_print = Instant::now();
    let mut timeline: Vec<Sample> = Vec::new();
    let ramp_s = loop {
        let total: u64 = connected.iter().sum();
        if total >= target || Instant::now() >= ramp_limit.min(deadline) {
            break started.elapsed().as_secs_f64();
        }
        tokio::select! {
            Some((w, report)) = rx.recv() => {
                if let Report::Progress { connected: c, acked: a } = report {
                    connected[w] = c;
                    acked[w] = a;
                }
            }
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            let sample = Sample::now(started, &connected, &acked);
            eprintln!(
                "{} rss {:?} MiB",
                progress_line(&sample, target, timeline.last()),
                rss_all(&plan.server_pids).iter().map(|b| b / (1 << 20)).collect::<Vec<_>>()
            );
            timeline.push(sample);
        }
    };
    let connected_total: u64 = connected.iter().sum();
    eprintln!("ramp done: {connected_total}/{target} in {ramp_s:.1}s");
    // Let allocations from the ramp settle (login buffers freed, first heartbeats answered).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_connected = rss_all(&plan.server_pids);

    let targets: Vec<DeviceKey> = (0..plan.cabinets)
        .map(|i| DeviceKey::Cabinet(cabinet_id(i)))
        .chain((0..plan.vehicles).map(|i| DeviceKey::Vehicle(vin(i))))
        .collect();
    let hold = Duration::from_secs(plan.hold_s).min(deadline.saturating_duration_since(Instant::now()));
    let stop = CancellationToken::new();
    let timer = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(hold).await;
        timer.cancel();
    });
    // Keep following progress during the hold: the uplinks acknowledged within it give the
    // publish throughput.
    let hold_started = Instant::now();
    let acked_at_start: u64 = acked.iter().sum();
    let qr_seen = Arc::new(AtomicU64::new(0));
    let qr_failed = Arc::new(AtomicU64::new(0));
    let (seen, failed) = (Arc::clone(&qr_seen), Arc::clone(&qr_failed));
    let drain = tokio::spawn(async move {
        let mut last = Vec::new();
        let mut print = Instant::now();
        while let Some((w, r)) = rx.recv().await {
            match &r {
                Report::Progress { connected: c, acked: a } => {
                    connected[w] = *c;
                    // Per worker: its acknowledged count as last reported within the hold.
                    if hold_started.elapsed() <= hold {
                        acked[w] = *a;
                    }
                }
                Report::Qr { vin, qr_id } => {
                    // The owner's app: scan and confirm what the vehicle shows.
                    seen.fetch_add(1, Ordering::Relaxed);
                    if let Some(api) = api {
                        let (vin, qr_id, failed) = (vin.clone(), qr_id.clone(), Arc::clone(&failed));
                        tokio::spawn(async move {
                            if scenarios::scan_and_confirm(api, &vin, &qr_id).await.is_err() {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        });
                    }
                }
                Report::Final { .. } => {}
            }
            if print.elapsed() >= Duration::from_secs(1) {
                print = Instant::now();
                let sample = Sample::now(started, &connected, &acked);
                eprintln!("{}", progress_line(&sample, target, timeline.last()));
                timeline.push(sample);
            }
            last.push((w, r));
        }
        (last, acked, timeline)
    });
    let scenario_until = hold_started + hold;
    let storm = match (api, plan.purchases) {
        (Some(api), n) if n > 0 => {
            let doors = CabinetBehaviour::default().doors;
            Some(tokio::spawn(scenarios::purchase_storm(api, plan.cabinets, doors, n)))
        }
        _ => None,
    };
    if plan.activations > 0 {
        let order = serde_json::to_string(&Control::Activate { from: 0, to: plan.activations })? + "\n";
        for w in &mut workers {
            if let Some(stdin) = w.child.stdin.as_mut() {
                let _ = stdin.write_all(order.as_bytes()).await;
            }
        }
    }
    let campaign = match api {
        Some(api) if plan.ota && plan.vehicles > 0 => {
            Some(tokio::spawn(scenarios::ota_campaign(api, plan.vehicles, scenario_until, plan.ota_options.clone())))
        }
        _ => None,
    };
    let commands = if plan.commands_per_s > 0 && plan.credentials {
        Some(
            commander::run(&plan.redis_url, &keys, &targets, plan.commands_per_s, plan.open_doors, stop.clone())
                .await?,
        )
    } else {
        stop.cancelled().await;
        None
    };
    let rss_end = rss_all(&plan.server_pids);
    let hold_s = hold_started.elapsed().as_secs_f64().min(hold.as_secs_f64()).max(0.001);

    // Stop the workers: closing stdin makes each emit its final snapshot and exit.
    for w in &mut workers {
        if let Some(mut stdin) = w.child.stdin.take() {
            let _ = stdin.shutdown().await;
        }
    }
    for w in &mut workers {
        let _ = tokio::time::timeout(Duration::from_secs(20), w.child.wait()).await;
    }
    let (reports, acked, timeline) =
        tokio::time::timeout(Duration::from_secs(5), drain).await.ok().and_then(Result::ok).unwrap_or_default();
    let mut merged = Merged::default();
    for (_, r) in &reports {
        if let Report::Final { snapshot } = r {
            merged.add(snapshot);
        }
    }
    let acked_in_hold = acked.iter().sum::<u64>().saturating_sub(acked_at_start);
    let mut details = json!({
        "hold_s": hold_s,
        "uplinks_acked_per_s_in_hold": acked_in_hold as f64 / hold_s,
        "counters": merged.counters,
        "latency": merged.summaries(),
        "workers": workers.iter().map(|w| json!({"cabinets": w.plan.cabinets, "vehicles": w.plan.vehicles, "source_ip": w.plan.source_ip})).collect::<Vec<_>>(),
    });
    if let Some(dip) = deepest_dip(&timeline, target, ramp_s) {
        details["reconnect_storm"] = dip;
    }
    details["timeline"] = serde_json::to_value(&timeline)?;
    if let Some(storm) = storm {
        details["purchase_storm"] = serde_json::to_value(storm.await?)?;
    }
    if let Some(campaign) = campaign {
        details["ota_campaign"] = match campaign.await? {
            Ok(c) => serde_json::to_value(c)?,
            Err(e) => json!({"error": e.to_string()}),
        };
    }
    if plan.activations > 0 {
        details["activation_wave"] = json!({
            "vehicles": plan.activations,
            "qr_ids_received": qr_seen.load(Ordering::Relaxed),
            "app_calls_failed": qr_failed.load(Ordering::Relaxed),
            "activated": merged.counters.get("activations_ok").copied().unwrap_or(0),
            "rejected": merged.counters.get("activations_rejected").copied().unwrap_or(0),
        });
    }
    details["lost"] = losses(&merged, commands.as_ref());
    if let Some(c) = &commands {
        details["commands"] = json!({
            "sent": c.sent,
            "unmapped": c.unmapped,
            "outcomes": c.outcomes,
            "round_trip": summarize(&c.rtt),
        });
    }
    let growth: u64 = rss_connected.iter().zip(&rss_before).map(|(a, b)| a.saturating_sub(*b)).sum();
    let growth_end: u64 = rss_end.iter().zip(&rss_before).map(|(a, b)| a.saturating_sub(*b)).sum();
    let result = FleetResult {
        connected: connected_total,
        ramp_s,
        login_rate_per_s: connected_total as f64 / ramp_s.max(0.001),
        rss_per_connection_bytes: if connected_total > 0 { growth as f64 / connected_total as f64 } else { 0.0 },
        rss_per_connection_end_bytes: if connected_total > 0 {
            growth_end as f64 / connected_total as f64
        } else {
            0.0
        },
        rss_before,
        rss_connected,
        rss_end,
        details,
    };
    Ok(result)
}

/// Everything sent and never answered, by kind: uplinks without PUBACK within
/// [`VehicleBehaviour::lost_after`](crate::vehicle::VehicleBehaviour::lost_after) (resent across reconnects until then), heartbeats unanswered when
/// the next was due or the connection dropped, door events still unacknowledged when the run
/// stopped (they are retried until then), commands without any reply, and commands not
/// delivered (replies other than answered or delivered: timed out, busy, not connected,
/// invalid; and devices not found in the connection map).
fn losses(merged: &Merged, commands: Option<&commander::CommandStats>) -> serde_json::Value {
    let count = |k: &str| merged.counters.get(k).copied().unwrap_or(0);
    let (without_reply, failed) = commands.map_or((0, 0), |c| {
        let replies: u64 = c.outcomes.values().sum();
        let failed: u64 =
            c.outcomes.iter().filter(|(k, _)| !matches!(**k, "answered" | "delivered")).map(|(_, v)| v).sum();
        (c.sent.saturating_sub(replies), failed + c.unmapped)
    });
    json!({
        "uplinks_unacknowledged": count("uplinks_unacknowledged"),
        "uplinks_in_flight_at_stop": count("uplinks_in_flight_at_stop"),
        "heartbeats_unanswered": count("heartbeats_unanswered"),
        "door_events_unacknowledged_at_stop": count("door_events_unacknowledged_at_stop"),
        "commands_without_reply": without_reply,
        "commands_not_delivered": failed,
    })
}

/// Where the report goes and what it records besides the results.
pub fn write_report(path: &PathBuf, plan: &serde_json::Value, results: &serde_json::Value) -> anyhow::Result<()> {
    let report = json!({
        "commit": git_commit(),
        "date": date_utc(),
        "machine": machine(),
        "parameters": plan,
        "results": results,
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    Ok(())
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

fn date_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    json!({"cpu": model, "cores": cores, "memory_gib": mem_kib / (1 << 20), "kernel": kernel})
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn splits_cover_everything_once() {
        let parts: Vec<_> = (0..3).map(|i| split(10, 3, i)).collect();
        assert_eq!(parts, [(0, 4), (4, 7), (7, 10)]);
        assert_eq!(split(0, 2, 1), (0, 0));
    }
}
