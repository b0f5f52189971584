//! A simulated vehicle on rumqttc: it connects with its token, subscribes to its downlinks,
//! answers generic commands, optionally publishes uplinks at QoS 1 at a steady rate (measuring
//! each PUBACK), and reconnects with exponential backoff and full jitter.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use protocol::Vin;
use protocol::mqtt::topic::{DownlinkKind, UplinkKind, downlink_filter, uplink_topic};
use protocol::vehicle::{VehicleCommand, VehicleCommandResult, VehicleCommandStatus};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, Outgoing, QoS};
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
}

impl Default for VehicleBehaviour {
    fn default() -> Self {
        Self { keep_alive: Duration::from_secs(60), publish_per_s: 0.0, credentials: true }
    }
}

/// Runs one vehicle against `addr` until `stop`.
pub async fn run(
    vin: Vin,
    token: String,
    addr: SocketAddr,
    behaviour: Arc<VehicleBehaviour>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let mut options = MqttOptions::new(vin.as_str(), addr.ip().to_string(), addr.port());
    if behaviour.credentials {
        options.set_credentials(vin.as_str(), token);
    }
    options.set_keep_alive(behaviour.keep_alive);
    options.set_inflight(32);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let mut backoff = Duration::from_secs(1);
    let mut connected = false;
    let mut started = Instant::now();
    let mut in_flight: HashMap<u16, Instant> = HashMap::new();
    let period = (behaviour.publish_per_s > 0.0).then(|| Duration::from_secs_f64(1.0 / behaviour.publish_per_s));
    let mut publish_tick = period.map(|p| tokio::time::interval_at(Instant::now() + p.mul_f64(fastrand::f64()), p));
    let uplink = uplink_topic(&vin, UplinkKind::OtaStatus);
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
                    stats.add("vehicle_logins", 1);
                    stats.connected.fetch_add(1, Ordering::Relaxed);
                    let _ = client.try_subscribe(downlink_filter(&vin), QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    stats.add("downlinks_received", 1);
                    if p.topic.ends_with(DownlinkKind::Command.as_str()) {
                        answer_command(&client, &vin, &p.payload);
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
                Err(_) => {
                    if connected {
                        stats.connected.fetch_sub(1, Ordering::Relaxed);
                        stats.add("vehicle_reconnects", 1);
                        connected = false;
                    } else {
                        stats.add("vehicle_connect_failures", 1);
                    }
                    in_flight.clear();
                    let wait = Duration::from_millis(fastrand::u64(0..=u64::try_from(backoff.as_millis()).unwrap_or(1000)));
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                    tokio::select! {
                        () = sleep(wait) => {}
                        () = stop.cancelled() => break,
                    }
                    started = Instant::now();
                }
            },
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
