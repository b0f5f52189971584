//! Synthetic gateway nodes for measuring the device service's offline detection at fleet sizes
//! one machine cannot hold as real connections: each node writes what a real node writes for
//! its cabinets' heartbeats (SPEC.md 3.2): one `hb` window entry per second on upstream shard
//! 0, with its liveness key and its entry in the node set, so the device service does exactly
//! the work it does behind real gateways. After `silence_after_s`, `silent` devices stop
//! beating; their last heartbeat times are reported so their offline decisions can be timed.

use std::collections::BTreeMap;
use std::time::Duration;

use protocol::DeviceId;
use protocol::bus::{DeviceKey, HeartbeatSeen, Keys, UpEvent};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// What to simulate (also the `hb-feed` subcommand's flags).
#[derive(Debug, Clone, Serialize, Deserialize, clap::Args)]
pub struct HbFeedPlan {
    /// Redis of the system under test.
    #[arg(long, default_value = "redis://127.0.0.1:6379/")]
    pub redis_url: String,
    /// Key prefix of the system under test.
    #[arg(long, default_value = "iotgw:")]
    pub key_prefix: String,
    /// Devices (cabinets), spread evenly over the nodes.
    #[arg(long, default_value_t = 100_000)]
    pub devices: usize,
    /// Simulated gateway nodes.
    #[arg(long, default_value_t = 6)]
    pub nodes: usize,
    /// Heartbeat interval, seconds; each device beats once per interval, at its own phase.
    #[arg(long, default_value_t = 30)]
    pub interval_s: u64,
    /// How long to feed, seconds (at most 3600).
    #[arg(long, default_value_t = 240, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration_s: u64,
    /// Devices that stop beating after `silence_after_s` (the first ones by number).
    #[arg(long, default_value_t = 1000)]
    pub silent: usize,
    /// When they stop, seconds after the start.
    #[arg(long, default_value_t = 90)]
    pub silence_after_s: u64,
}

/// What was fed.
#[derive(Debug, Clone, Serialize)]
pub struct HbFeedResult {
    /// Window entries written.
    pub windows: u64,
    /// Heartbeats carried by them.
    pub heartbeats: u64,
    /// Seconds fed.
    pub seconds: f64,
    /// The silent devices' last heartbeat, ms since the Unix epoch, by device key.
    pub silent_last_ms: BTreeMap<String, u64>,
}

/// Device number `n`'s id in the feed.
pub fn device_id(n: usize) -> DeviceId {
    DeviceId::new(format!("HB-{n:06}")).expect("generated ids are valid")
}

fn now_ms() -> u64 {
    crate::cabinet::now_ms()
}

/// Feeds windows every second until `duration_s` has passed.
///
/// # Errors
/// Redis errors.
pub async fn run(plan: &HbFeedPlan) -> anyhow::Result<HbFeedResult> {
    anyhow::ensure!(plan.nodes > 0 && plan.interval_s > 0, "nodes and interval must be positive");
    let client = redis::Client::open(plan.redis_url.as_str())?;
    let mut con = client.get_multiplexed_async_connection().await?;
    let keys = Keys::new(plan.key_prefix.clone());
    let node_name = |k: usize| format!("hb-node-{k}");
    let sessions: Vec<u64> = (0..plan.nodes)
        .map(|k| (plan.devices / plan.nodes + usize::from(k < plan.devices % plan.nodes)) as u64)
        .collect();
    let keys_of: Vec<DeviceKey> = (0..plan.devices).map(|n| DeviceKey::Cabinet(device_id(n))).collect();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut result = HbFeedResult { windows: 0, heartbeats: 0, seconds: 0.0, silent_last_ms: BTreeMap::new() };
    let mut second: u64 = 0;
    let mut window_start = now_ms();
    while started.elapsed() < Duration::from_secs(plan.duration_s) {
        tick.tick().await;
        let now = now_ms();
        let silenced = second >= plan.silence_after_s;
        let phase = second % plan.interval_s;
        let mut per_node: Vec<Vec<HeartbeatSeen>> = vec![Vec::new(); plan.nodes];
        for (n, device) in keys_of.iter().enumerate() {
            if (n as u64) % plan.interval_s != phase || (silenced && n < plan.silent) {
                continue;
            }
            per_node[n % plan.nodes].push(HeartbeatSeen { device: device.clone(), at_ms: now, epoch: 1 });
            if n < plan.silent {
                result.silent_last_ms.insert(device.to_string(), now);
            }
        }
        let mut pipe = redis::pipe();
        for (k, devices) in per_node.into_iter().enumerate() {
            let node = node_name(k);
            pipe.cmd("SET").arg(keys.node_alive(&node)).arg(1).arg("PX").arg(10_000).ignore();
            pipe.cmd("ZADD").arg(keys.nodes()).arg("NX").arg(0).arg(&node).ignore();
            result.heartbeats += devices.len() as u64;
            let window = UpEvent::Heartbeats {
                node,
                window_start_ms: window_start,
                window_ms: now.saturating_sub(window_start),
                count: devices.len() as u64,
                sessions: sessions[k],
                devices,
            };
            let fields = window.to_fields().map_err(|e| anyhow::anyhow!("failed to encode a window: {e}"))?;
            pipe.cmd("XADD").arg(keys.upstream(0)).arg("MAXLEN").arg("~").arg(1_000_000).arg("*").arg(fields).ignore();
            result.windows += 1;
        }
        pipe.query_async::<()>(&mut con).await?;
        window_start = now;
        second += 1;
    }
    result.seconds = started.elapsed().as_secs_f64();
    Ok(result)
}
