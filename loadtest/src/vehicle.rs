//! A simulated vehicle on rumqttc: it connects with its token, subscribes to its downlinks,
//! answers generic commands, runs activation when told (QR request, then the report with the
//! code it receives) and an OTA upgrade when notified (status, download and install progress,
//! success at the target version), optionally publishes uplinks at QoS 1 at a steady rate
//! (measuring each PUBACK), and reconnects with exponential backoff and full jitter.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use protocol::Vin;
use protocol::mqtt::topic::{DownlinkKind, UplinkKind, downlink_filter, uplink_topic};
use protocol::vehicle::{
    ActivationCode, ActivationOutcome, ActivationResult, OtaNotify, QrIssued, VehicleCommand, VehicleCommandResult,
    VehicleCommandStatus,
};
use rumqttc::{AsyncClient, ConnectionError, Event, Incoming, MqttOptions, Outgoing, QoS, TlsConfiguration, Transport};
use serde_json::json;
use tokio::sync::{broadcast, mpsc};
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

use crate::stats::Stats;

/// How vehicles behave.
#[derive(Debug, Clone)]
pub struct VehicleBehaviour {
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// QoS 1 uplinks per second per vehicle (0 = none).
    pub publish_per_s: f64,
    /// Authenticate with user name and token (a bare broker such as Mosquitto needs neither).
    pub credentials: bool,
    /// Time between two steps of a simulated upgrade (status changes and progress reports;
    /// real vehicles take minutes per step).
    pub ota_step: Duration,
    /// TLS to the gateway's MQTT TLS listener; `None`: plain TCP.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// An uplink not acknowledged this long after it was (last) sent counts as lost; younger
    /// ones at the end of a run were merely in flight.
    pub lost_after: Duration,
    /// Downloads of stored packages (an `http://` URL): how often a request is broken off.
    pub download_cuts: crate::download::Cuts,
    /// Download progress is reported this often (SPEC.md 2.3: about every 10 s).
    pub progress_every: Duration,
    /// Share of vehicles whose first upgrade attempt fails at installation (ECU `BCM`, then
    /// roll back), spread evenly over the fleet's numbers: for rollouts that must pause
    /// themselves and re-pushes that must succeed.
    pub install_failure_ratio: f64,
}

impl Default for VehicleBehaviour {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(60),
            publish_per_s: 0.0,
            credentials: true,
            ota_step: Duration::from_millis(500),
            tls: None,
            lost_after: Duration::from_secs(10),
            download_cuts: crate::download::Cuts { probability: 0.0, max_requests: 100 },
            progress_every: Duration::from_secs(10),
            install_failure_ratio: 0.0,
        }
    }
}

/// What the orchestrator tells a worker's vehicles.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "do", rename_all = "snake_case")]
pub enum Control {
    /// Vehicles numbered `from..to` start an activation.
    Activate {
        /// First vehicle number.
        from: usize,
        /// One past the last.
        to: usize,
    },
}

/// How a vehicle talks to the rest of its worker.
#[derive(Debug)]
pub struct Links {
    /// The vehicle's number in the fleet.
    pub number: usize,
    /// Orders from the orchestrator.
    pub control: broadcast::Receiver<Control>,
    /// QR ids received, for the orchestrator to scan and confirm as the owner's app would.
    pub qr_ids: mpsc::UnboundedSender<(String, String)>,
}

/// Runs one vehicle against `addr` until `stop`; after a connection fails or ends it tries the
/// next address of `all`, as a vehicle behind an L4 balancer reaches whichever node is up.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    vin: Vin,
    token: String,
    addr: SocketAddr,
    all: Arc<[SocketAddr]>,
    behaviour: Arc<VehicleBehaviour>,
    stats: Arc<Stats>,
    mut links: Links,
    stop: CancellationToken,
) {
    let options_for = |addr: SocketAddr| {
        let mut options = MqttOptions::new(vin.as_str(), addr.ip().to_string(), addr.port());
        if behaviour.credentials {
            options.set_credentials(vin.as_str(), token.as_str());
        }
        options.set_keep_alive(behaviour.keep_alive);
        options.set_inflight(32);
        if let Some(config) = &behaviour.tls {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::clone(config))));
        }
        options
    };
    let (client, mut eventloop) = AsyncClient::new(options_for(addr), 64);
    let mut backoff = Duration::from_secs(1);
    let mut connected = false;
    let mut started = Instant::now();
    let mut in_flight: HashMap<u16, Instant> = HashMap::new();
    let period = (behaviour.publish_per_s > 0.0).then(|| Duration::from_secs_f64(1.0 / behaviour.publish_per_s));
    let mut publish_tick = period.map(|p| tokio::time::interval_at(Instant::now() + p.mul_f64(fastrand::f64()), p));
    let uplink = uplink_topic(&vin, UplinkKind::OtaStatus);
    let mut activation_started: Option<Instant> = None;
    // When the connection was lost: the next CONNACK measures the reconnection.
    let mut lost: Option<Instant> = None;
    let mut upgrades: Vec<String> = Vec::new();
    loop {
        let publish_due = async {
            match publish_tick.as_mut() {
                Some(t) if connected => {
                    t.tick().await;
                }
                _ => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    connected = true;
                    backoff = Duration::from_secs(1);
                    stats.record("connect", started.elapsed());
                    if let Some(at) = lost.take() {
                        stats.record("reconnect", at.elapsed());
                    }
                    stats.add("vehicle_logins", 1);
                    stats.connected.fetch_add(1, Ordering::Relaxed);
                    let _ = client.try_subscribe(downlink_filter(&vin), QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    stats.add("downlinks_received", 1);
                    let kind = p.topic.rsplit('/').next().and_then(|k| k.parse::<DownlinkKind>().ok());
                    match kind {
                        Some(DownlinkKind::Command) => answer_command(&client, &vin, &p.payload),
                        Some(DownlinkKind::QrId) => {
                            if let Ok(q) = serde_json::from_slice::<QrIssued>(&p.payload) {
                                let _ = links.qr_ids.send((vin.to_string(), q.qr_id));
                            }
                        }
                        Some(DownlinkKind::ActivationCode) => {
                            if let Ok(c) = serde_json::from_slice::<ActivationCode>(&p.payload) {
                                let report = json!({"qr_id": c.qr_id, "code": c.code});
                                let _ = client.try_publish(uplink_topic(&vin, UplinkKind::ActivationReport), QoS::AtLeastOnce, false, report.to_string());
                            }
                        }
                        Some(DownlinkKind::ActivationResult) => {
                            if let Ok(r) = serde_json::from_slice::<ActivationResult>(&p.payload) {
                                if r.outcome == ActivationOutcome::Activated {
                                    stats.add("activations_ok", 1);
                                    if let Some(t) = activation_started.take() {
                                        stats.record("activation", t.elapsed());
                                    }
                                } else {
                                    stats.add("activations_rejected", 1);
                                }
                            }
                        }
                        Some(DownlinkKind::OtaNotify) => {
                            if let Ok(n) = serde_json::from_slice::<OtaNotify>(&p.payload) {
                                stats.add("ota_notices", 1);
                                // A notice may come twice: act on a task's attempt once.
                                let key = format!("{}#{}", n.task_id, n.attempt);
                                if !upgrades.contains(&key) {
                                    upgrades.push(key);
                                    tokio::spawn(upgrade(client.clone(), vin.clone(), links.number, n, Arc::clone(&behaviour), Arc::clone(&stats)));
                                }
                            }
                        }
                        Some(DownlinkKind::OtaCancel) => stats.add("ota_cancels", 1),
                        None => {}
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                    in_flight.insert(pkid, Instant::now());
                }
                Ok(Event::Incoming(Incoming::PubAck(ack))) => {
                    if let Some(sent) = in_flight.remove(&ack.pkid) {
                        stats.record("publish_ack", sent.elapsed());
                        stats.add("uplinks_acked", 1);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if connected {
                        stats.connected.fetch_sub(1, Ordering::Relaxed);
                        stats.add("vehicle_reconnects", 1);
                        connected = false;
                        lost = Some(Instant::now());
                    } else if matches!(e, ConnectionError::Tls(_)) {
                        stats.add("vehicle_tls_failures", 1);
                    } else {
                        stats.add("vehicle_connect_failures", 1);
                    }
                    // Its node may be gone: the next attempt goes to the next one.
                    let here = eventloop.mqtt_options.broker_address();
                    if let Some(i) = all.iter().position(|a| (a.ip().to_string(), a.port()) == here) {
                        eventloop.mqtt_options = options_for(all[(i + 1) % all.len()]);
                    }
                    // rumqttc sends unacknowledged publishes again after reconnecting: they stay
                    // in flight (their send time is renewed when they go out again).
                    let wait = Duration::from_millis(fastrand::u64(0..=u64::try_from(backoff.as_millis()).unwrap_or(1000)));
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                    tokio::select! {
                        () = sleep(wait) => {}
                        () = stop.cancelled() => break,
                    }
                    started = Instant::now();
                }
            },
            order = links.control.recv() => {
                if let Ok(Control::Activate { from, to }) = order
                    && (from..to).contains(&links.number)
                {
                    activation_started = Some(Instant::now());
                    stats.add("qr_requests", 1);
                    let request = json!({"request_id": format!("lt-{}", crate::cabinet::now_ms()), "seat": "driver"});
                    let _ = client.try_publish(uplink_topic(&vin, UplinkKind::QrRequest), QoS::AtLeastOnce, false, request.to_string());
                }
            }
            () = publish_due => {
                let body = format!(r#"{{"task_id":"lt","status":"downloading","ts_ms":{}}}"#, crate::cabinet::now_ms());
                if client.try_publish(uplink.clone(), QoS::AtLeastOnce, false, body).is_ok() {
                    stats.add("uplinks_sent", 1);
                }
            }
            () = stop.cancelled() => break,
        }
    }
    if connected {
        stats.connected.fetch_sub(1, Ordering::Relaxed);
    }
    let now = Instant::now();
    for sent in in_flight.values() {
        if now.duration_since(*sent) >= behaviour.lost_after {
            stats.add("uplinks_unacknowledged", 1);
        } else {
            stats.add("uplinks_in_flight_at_stop", 1);
        }
    }
    let _ = client.try_disconnect();
}

fn answer_command(client: &AsyncClient, vin: &Vin, payload: &[u8]) {
    let Ok(command) = serde_json::from_slice::<VehicleCommand>(payload) else { return };
    let result =
        VehicleCommandResult { request_id: command.request_id, status: VehicleCommandStatus::Ok, detail: None };
    if let Ok(body) = serde_json::to_vec(&result) {
        let _ = client.try_publish(uplink_topic(vin, UplinkKind::CommandResult), QoS::AtLeastOnce, false, body);
    }
}

/// Plays an upgrade as a head unit would: waiting, downloading with progress, downloaded,
/// verifying, upgrading with progress per ECU, success at the notified version; each step
/// `ota_step` apart, every report at QoS 1 and naming the notice's attempt. A stored package
/// (an `http://` URL) is really downloaded, with cuts and resumes, progress every
/// `progress_every`, then its digest and signature checked: a mismatch is reported `failed`
/// with ECU `TBOX`. Records the time from the notice to the end.
async fn upgrade(
    client: AsyncClient,
    vin: Vin,
    number: usize,
    notice: OtaNotify,
    behaviour: Arc<VehicleBehaviour>,
    stats: Arc<Stats>,
) {
    let started = Instant::now();
    let step = behaviour.ota_step;
    let (task, attempt) = (notice.task_id.as_str(), notice.attempt);
    let status_topic = uplink_topic(&vin, UplinkKind::OtaStatus);
    let progress_topic = uplink_topic(&vin, UplinkKind::OtaDownloadProgress);
    let now = crate::cabinet::now_ms;
    let status = |s: &str| json!({"task_id": task, "status": s, "attempt": attempt, "ts_ms": now()});
    let send = |topic: String, body: serde_json::Value| {
        let client = client.clone();
        let stats = Arc::clone(&stats);
        async move {
            let ok = client.publish(topic, QoS::AtLeastOnce, false, body.to_string()).await.is_ok();
            if ok {
                stats.add("ota_reports_sent", 1);
            } else {
                stats.add("ota_aborted", 1);
            }
            ok
        }
    };
    let size = notice.package.size_bytes;
    let progress = |done: u64| {
        let percent = (done * 100).checked_div(size).unwrap_or(100);
        json!({"task_id": task, "percent": percent, "bytes_done": done, "attempt": attempt, "ts_ms": now()})
    };
    for s in ["waiting", "downloading"] {
        sleep(step).await;
        if !send(status_topic.clone(), status(s)).await {
            return;
        }
    }
    let mut failure: Option<(&str, String)> = None;
    if notice.package.url.starts_with("http://") {
        // The download reports its progress through a channel; this task sends it on.
        let (tx, mut rx) = mpsc::unbounded_channel::<u64>();
        let url = notice.package.url.clone();
        let cuts = behaviour.download_cuts;
        let fetching = tokio::spawn(async move {
            crate::download::fetch(&url, size, cuts, |d| {
                let _ = tx.send(d);
            })
            .await
        });
        let mut last_sent = Instant::now();
        let mut done = 0;
        while let Some(d) = rx.recv().await {
            done = d;
            if last_sent.elapsed() >= behaviour.progress_every {
                last_sent = Instant::now();
                if !send(progress_topic.clone(), progress(done)).await {
                    return;
                }
            }
        }
        match fetching.await {
            Ok(Ok(got)) => {
                stats.add("ota_download_bytes", got.bytes);
                stats.add("ota_download_resumes", u64::from(got.resumes));
                stats.add("ota_downloads", 1);
                stats.record("ota_download", started.elapsed());
                if got.sha256 != notice.package.sha256 {
                    failure = Some(("TBOX", format!("digest_mismatch: got {}", got.sha256)));
                } else if !crate::download::signature_ok(
                    &got.sha256,
                    &notice.package.signature,
                    notice.package.public_key.as_deref().unwrap_or_default(),
                ) {
                    failure = Some(("TBOX", "bad_signature".into()));
                }
            }
            Ok(Err(crate::download::Failure::Refused(code))) => {
                failure = Some(("TBOX", format!("download_refused: {code}")))
            }
            Ok(Err(crate::download::Failure::GaveUp(why))) => {
                failure = Some(("TBOX", format!("download_failed: {why}")))
            }
            Err(_) => failure = Some(("TBOX", "download_failed".into())),
        }
        if failure.is_none() && !send(progress_topic.clone(), progress(size.max(done))).await {
            return;
        }
    } else {
        for p in [25u64, 50, 75, 100] {
            sleep(step).await;
            if !send(progress_topic.clone(), progress(size * p / 100)).await {
                return;
            }
        }
    }
    if let Some((ecu, error)) = failure {
        stats.add("ota_download_failures", 1);
        let mut body = status("failed");
        body["ecu"] = json!(ecu);
        body["error"] = json!(error);
        send(status_topic, body).await;
        return;
    }
    for s in ["downloaded", "verifying", "upgrading"] {
        sleep(step).await;
        if !send(status_topic.clone(), status(s)).await {
            return;
        }
    }
    // Only first attempts fail: the re-pushed one installs (a transient fault, as a flaky ECU).
    // Which vehicles fail is spread evenly over the fleet's numbers, so a run is repeatable.
    let r = behaviour.install_failure_ratio;
    let fails = attempt == 1 && ((number + 1) as f64 * r).floor() > (number as f64 * r).floor();
    for (p, ecu) in [(50u8, "BCM"), (100, "VCU")] {
        sleep(step).await;
        if fails {
            // Flashing the first ECU fails; the unit restores the previous version.
            for s in ["failed", "rolled_back"] {
                let mut body = status(s);
                body["ecu"] = json!(ecu);
                body["error"] = json!("E42 flash verify");
                if !send(status_topic.clone(), body).await {
                    return;
                }
            }
            stats.add("ota_install_failures", 1);
            return;
        }
        let body =
            json!({"task_id": task, "percent": p, "ecu": ecu, "ecu_percent": 100, "attempt": attempt, "ts_ms": now()});
        if !send(uplink_topic(&vin, UplinkKind::OtaUpgradeProgress), body).await {
            return;
        }
    }
    sleep(step).await;
    let body =
        json!({"task_id": task, "status": "success", "version": notice.version, "attempt": attempt, "ts_ms": now()});
    if send(status_topic, body).await {
        stats.add("ota_completed", 1);
        stats.record("ota_upgrade", started.elapsed());
    }
}
