//! The same MQTT fleet and QoS 1 publish load against Mosquitto (Debian's package, started
//! here on its own port) and against the gateway, in one run, with the ratios.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio::process::Command;

use crate::fleet::{self, FleetPlan};

/// Starts `mosquitto` on `port` without persistence or authentication; killed on drop.
///
/// # Errors
/// If the binary is missing or does not start listening.
pub async fn start_mosquitto(port: u16) -> anyhow::Result<(tokio::process::Child, u32)> {
    let dir = std::env::temp_dir().join(format!("loadtest-mosquitto-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("mosquitto.conf");
    // Quiet, as in production: logging every connection would slow it down.
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\n\
             max_inflight_messages 32\nlog_dest none\n"
        ),
    )?;
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .kill_on_drop(true)
        .spawn()
        .context("failed to start mosquitto (apt install mosquitto)")?;
    let pid = child.id().context("mosquitto pid")?;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok((child, pid));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("mosquitto did not listen on {port}")
}

/// Runs `base` against Mosquitto and against the gateway and returns both results and ratios.
///
/// # Errors
/// As [`fleet::run`].
pub async fn run(
    base: &FleetPlan,
    mosquitto_port: u16,
    gateway_mqtt: SocketAddr,
    gateway_pid: u32,
) -> anyhow::Result<serde_json::Value> {
    let (_mosquitto, pid) = start_mosquitto(mosquitto_port).await?;
    let broker = FleetPlan {
        label: format!("{} (mosquitto)", base.label),
        mqtt_addrs: vec![SocketAddr::from(([127, 0, 0, 1], mosquitto_port))],
        server_pids: vec![pid],
        credentials: false,
        commands_per_s: 0,
        ..base.clone()
    };
    eprintln!("== mosquitto");
    let m = fleet::run(&broker).await?;
    let gateway = FleetPlan {
        label: format!("{} (gateway)", base.label),
        mqtt_addrs: vec![gateway_mqtt],
        server_pids: vec![gateway_pid],
        credentials: true,
        commands_per_s: 0,
        ..base.clone()
    };
    eprintln!("== gateway");
    let g = fleet::run(&gateway).await?;
    let throughput = |r: &fleet::FleetResult| r.details["uplinks_acked_per_s_in_hold"].as_f64().unwrap_or(0.0);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    Ok(json!({
        "mosquitto": m,
        "gateway": g,
        "ratios": {
            "rss_per_connection_gateway_over_mosquitto": ratio(g.rss_per_connection_bytes, m.rss_per_connection_bytes),
            "publish_acked_per_s_gateway_over_mosquitto": ratio(throughput(&g), throughput(&m)),
            "login_rate_gateway_over_mosquitto": ratio(g.login_rate_per_s, m.login_rate_per_s),
        },
        "publish_acked_per_s": {"mosquitto": throughput(&m), "gateway": throughput(&g)},
    }))
}
