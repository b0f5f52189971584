//! A worker process: simulates a slice of the fleet and reports to the orchestrator on stdout
//! (one JSON object per line: progress every second, QR ids its vehicles received, then a
//! final snapshot). It reads orders from stdin (one JSON [`Control`] per line) and stops when
//! its stdin closes, when the orchestrator dies, or after its time bound.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cabinet::{self, CabinetBehaviour, Target};
use crate::fleet_ids::{cabinet_id, cabinet_secret, vehicle_token, vin};
use crate::stats::{Snapshot, Stats};
use crate::tls::{TlsClient, TlsPlan};
use crate::vehicle::{self, Control, Links, VehicleBehaviour};

/// What one worker simulates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerPlan {
    /// Cabinet listeners; cabinet `i` uses `cabinet_addrs[i % len]`.
    pub cabinet_addrs: Vec<SocketAddr>,
    /// MQTT listeners; vehicle `i` uses `mqtt_addrs[i % len]`.
    pub mqtt_addrs: Vec<SocketAddr>,
    /// Cabinet numbers `[start, end)`.
    pub cabinets: (usize, usize),
    /// Vehicle numbers `[start, end)`.
    pub vehicles: (usize, usize),
    /// Local address cabinets bind to.
    pub source_ip: Option<IpAddr>,
    /// New connections per second.
    pub ramp_per_s: u32,
    /// Heartbeat interval, seconds.
    pub heartbeat_s: u64,
    /// How often a closed door's weights are reported, ms.
    #[serde(default = "default_closed_report_ms")]
    pub closed_report_ms: u64,
    /// Cabinet login version.
    #[serde(default = "default_login_version")]
    pub login_version: u8,
    /// QoS 1 uplinks per second per vehicle.
    pub publish_per_s: f64,
    /// Vehicles authenticate (false against a bare broker).
    pub credentials: bool,
    /// Time between two steps of a simulated upgrade, ms.
    #[serde(default = "default_ota_step_ms")]
    pub ota_step_ms: u64,
    /// How the vehicles download packages and fail installing them.
    #[serde(default)]
    pub ota_vehicles: OtaVehicles,
    /// Hard bound on the worker's life, seconds.
    pub max_duration_s: u64,
    /// Devices connect over TLS (to TLS listeners).
    #[serde(default)]
    pub tls: Option<TlsPlan>,
}

/// How simulated vehicles download stored packages and fail.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OtaVehicles {
    /// Probability that a download request is broken off at a random point (then resumed).
    pub cut_ratio: f64,
    /// Share of first attempts that fail installing (and roll back); re-pushed attempts succeed.
    pub failure_ratio: f64,
    /// Download progress reports, every this many ms.
    pub progress_ms: u64,
}

impl Default for OtaVehicles {
    fn default() -> Self {
        OtaVehicles { cut_ratio: 0.0, failure_ratio: 0.0, progress_ms: 10_000 }
    }
}

fn default_ota_step_ms() -> u64 {
    500
}

fn default_closed_report_ms() -> u64 {
    90_000
}

fn default_login_version() -> u8 {
    protocol::cabinet::LOGIN_V2
}

/// One line of worker output.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Report {
    /// Every second.
    Progress {
        /// Devices connected now.
        connected: u64,
        /// QoS 1 uplinks acknowledged so far.
        #[serde(default)]
        acked: u64,
    },
    /// A vehicle received a QR id (activation).
    Qr {
        /// The vehicle.
        vin: String,
        /// The id to scan.
        qr_id: String,
    },
    /// At the end.
    Final {
        /// Everything measured.
        snapshot: Snapshot,
    },
}

fn emit(report: &Report) {
    if let Ok(line) = serde_json::to_string(report) {
        #[allow(clippy::print_stdout)] // the worker's protocol with the orchestrator
        {
            println!("{line}");
        }
    }
}

/// Runs the plan until stdin closes or the time bound.
///
/// # Errors
/// The TLS settings cannot be used (the orchestrator checked them, so only if the CA file
/// changed in between).
pub async fn run(plan: WorkerPlan) -> anyhow::Result<()> {
    let tls = plan.tls.as_ref().map(TlsClient::new).transpose()?;
    let stats = Arc::new(Stats::default());
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let cab_behaviour = Arc::new(CabinetBehaviour {
        heartbeat: Duration::from_secs(plan.heartbeat_s),
        closed_report: Duration::from_millis(plan.closed_report_ms),
        login_version: plan.login_version,
        ..CabinetBehaviour::default()
    });
    let veh_behaviour = Arc::new(VehicleBehaviour {
        publish_per_s: plan.publish_per_s,
        credentials: plan.credentials,
        ota_step: Duration::from_millis(plan.ota_step_ms),
        tls: tls.as_ref().map(TlsClient::config),
        download_cuts: crate::download::Cuts { probability: plan.ota_vehicles.cut_ratio, max_requests: 200 },
        progress_every: Duration::from_millis(plan.ota_vehicles.progress_ms.max(100)),
        install_failure_ratio: plan.ota_vehicles.failure_ratio,
        ..VehicleBehaviour::default()
    });
    let (control, _) = broadcast::channel::<Control>(64);
    let (qr_tx, mut qr_rx) = mpsc::unbounded_channel::<(String, String)>();
    tokio::spawn(async move {
        while let Some((vin, qr_id)) = qr_rx.recv().await {
            emit(&Report::Qr { vin, qr_id });
        }
    });

    // Orders from the orchestrator; stop when it closes our stdin (or dies), or at the bound.
    let watch = stop.clone();
    let orders = control.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(order) = serde_json::from_str::<Control>(&line) {
                let _ = orders.send(order);
            }
        }
        watch.cancel();
    });
    let bound = stop.clone();
    let max = Duration::from_secs(plan.max_duration_s);
    tokio::spawn(async move {
        tokio::time::sleep(max).await;
        bound.cancel();
    });
    let progress_stats = Arc::clone(&stats);
    let progress_stop = stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => emit(&Report::Progress {
                    connected: progress_stats.connected.load(std::sync::atomic::Ordering::Relaxed),
                    acked: progress_stats.count("uplinks_acked"),
                }),
                () = progress_stop.cancelled() => return,
            }
        }
    });

    let gap = Duration::from_secs(1) / plan.ramp_per_s.max(1);
    let mut pace = tokio::time::interval(gap);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let spawn_list =
        (plan.cabinets.0..plan.cabinets.1).map(Some).chain((plan.vehicles.0..plan.vehicles.1).map(|_| None));
    let mut vehicle_n = plan.vehicles.0;
    let cabinet_addrs: Arc<[SocketAddr]> = plan.cabinet_addrs.clone().into();
    let mqtt_addrs: Arc<[SocketAddr]> = plan.mqtt_addrs.clone().into();
    for cabinet_n in spawn_list {
        tokio::select! {
            _ = pace.tick() => {}
            () = stop.cancelled() => break,
        }
        match cabinet_n {
            Some(n) if !plan.cabinet_addrs.is_empty() => {
                let id = cabinet_id(n);
                let secret = cabinet_secret(&id);
                let target = Target {
                    addr: plan.cabinet_addrs[n % plan.cabinet_addrs.len()],
                    all: Arc::clone(&cabinet_addrs),
                    source: plan.source_ip,
                    tls: tls.clone(),
                };
                tracker.spawn(cabinet::run(
                    id,
                    secret,
                    target,
                    Arc::clone(&cab_behaviour),
                    Arc::clone(&stats),
                    stop.clone(),
                ));
            }
            None if !plan.mqtt_addrs.is_empty() => {
                let n = vehicle_n;
                vehicle_n += 1;
                let v = vin(n);
                let token = vehicle_token(&v);
                let addr = plan.mqtt_addrs[n % plan.mqtt_addrs.len()];
                let links = Links { number: n, control: control.subscribe(), qr_ids: qr_tx.clone() };
                tracker.spawn(vehicle::run(
                    v,
                    token,
                    addr,
                    Arc::clone(&mqtt_addrs),
                    Arc::clone(&veh_behaviour),
                    Arc::clone(&stats),
                    links,
                    stop.clone(),
                ));
            }
            _ => {}
        }
    }
    stop.cancelled().await;
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    emit(&Report::Final { snapshot: stats.snapshot() });
    Ok(())
}
