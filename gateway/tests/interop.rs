//! MQTT clients nobody here wrote, against the gateway, over TCP, TLS and TLS with client
//! certificates: Debian's `mosquitto_sub`/`mosquitto_pub` and `paho-mqtt` from PyPI. Each
//! connects, subscribes to its own downlinks, receives a command, and publishes uplinks at
//! QoS 0 and 1. `scripts/test` installs the clients when they are missing.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{Env, payload};
use gateway::Gateway;
use protocol::Vin;
use protocol::bus::{CommandBody, DeviceKey, Outcome, UpEvent};
use protocol::mqtt::topic::DownlinkKind;
use testkit::pki::Pki;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const VIN: &str = "LSVAU2180N2183294";

/// How a client reaches the gateway.
#[derive(Clone, Copy, Debug)]
enum Link {
    Tcp,
    Tls,
    /// TLS with a client certificate (CN = VIN) instead of a token.
    MutualTls,
}

async fn gateway_with_tls(env: &Env, pki: &Pki) -> Gateway {
    let mut config = env.config("gw-a");
    config.mqtt.tls_listen = "127.0.0.1:0".into();
    config.mqtt.tls_cert = pki.path("server.pem");
    config.mqtt.tls_key = pki.path("server.key");
    config.mqtt.tls_client_ca = pki.path("ca.pem");
    env.start_with(config).await
}

fn port(gw: &Gateway, link: Link) -> u16 {
    match link {
        Link::Tcp => gw.addresses.mqtt.unwrap().port(),
        Link::Tls | Link::MutualTls => gw.addresses.mqtt_tls.unwrap().port(),
    }
}

/// mosquitto client arguments for connecting as the vehicle over `link`.
fn mosquitto_args(gw: &Gateway, pki: &Pki, link: Link, vin: &Vin, token: &str, v5: bool) -> Vec<String> {
    let mut args: Vec<String> = vec!["-h".into(), "127.0.0.1".into(), "-p".into(), port(gw, link).to_string()];
    args.extend(["-i".into(), vin.to_string(), "-V".into(), if v5 { "mqttv5" } else { "mqttv311" }.into()]);
    match link {
        Link::Tcp => args.extend(["-u".into(), vin.to_string(), "-P".into(), token.into()]),
        Link::Tls => args.extend([
            "--cafile".into(),
            pki.path("ca.pem"),
            "-u".into(),
            vin.to_string(),
            "-P".into(),
            token.into(),
        ]),
        Link::MutualTls => args.extend([
            "--cafile".into(),
            pki.path("ca.pem"),
            "--cert".into(),
            pki.path("client.pem"),
            "--key".into(),
            pki.path("client.key"),
        ]),
    }
    args
}

async fn read_line_containing(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    what: &str,
) -> String {
    let wait = async {
        while let Some(line) = lines.next_line().await.expect("readable output") {
            if line.contains(what) {
                return line;
            }
        }
        panic!("output ended before a line containing {what:?}");
    };
    tokio::time::timeout(common::WAIT, wait).await.unwrap_or_else(|_| panic!("no line containing {what:?}"))
}

async fn finish(mut child: Child) {
    let status = tokio::time::timeout(common::WAIT, child.wait()).await.expect("client exits").expect("status");
    assert!(status.success(), "client failed: {status}");
}

async fn mosquitto_round_trip(link: Link, v5: bool) {
    let mut env = Env::single().await;
    let pki = Pki::new(VIN);
    let gw = gateway_with_tls(&env, &pki).await;
    let (vin, token) = env.provision_vehicle(VIN).await;
    let device = DeviceKey::Vehicle(vin.clone());

    // mosquitto_sub -d prints its protocol exchange, so the SUBACK is an awaitable line
    // (line-buffered through stdbuf: its stdout is a pipe here).
    let mut sub = Command::new("stdbuf")
        .args(["-oL", "mosquitto_sub"])
        .args(mosquitto_args(&gw, &pki, link, &vin, &token, v5))
        .args(["-d", "-q", "1", "-t", &format!("vehicles/{VIN}/down/#"), "-C", "1", "-W", "15"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub installed (scripts/test installs mosquitto-clients)");
    let mut lines = BufReader::new(sub.stdout.take().unwrap()).lines();
    read_line_containing(&mut lines, "SUBACK").await;

    let body = CommandBody::Vehicle { kind: DownlinkKind::ActivationCode, payload: payload(r#"{"code":"483920"}"#) };
    let reply = env.command(&device, body, Duration::from_secs(5)).await;
    assert_eq!(reply.outcome, Outcome::Delivered);
    read_line_containing(&mut lines, r#"{"code":"483920"}"#).await;
    finish(sub).await;

    for qos in ["0", "1"] {
        let message = format!(r#"{{"task_id":"t-{qos}","status":"waiting","ts_ms":1}}"#);
        let status = Command::new("mosquitto_pub")
            .args(mosquitto_args(&gw, &pki, link, &vin, &token, v5))
            .args(["-q", qos, "-t", &format!("vehicles/{VIN}/up/ota_status"), "-m", &message])
            .status()
            .await
            .expect("mosquitto_pub installed");
        assert!(status.success(), "mosquitto_pub QoS {qos} over {link:?}");
        env.wait_upstream(
            "uplink",
            |e| matches!(e, UpEvent::Vehicle { payload, .. } if payload[..] == *message.as_bytes()),
        )
        .await;
    }
    gw.stop().await;
}

async fn paho_round_trip(link: Link, v5: bool) {
    let mut env = Env::single().await;
    let pki = Pki::new(VIN);
    let gw = gateway_with_tls(&env, &pki).await;
    let (vin, token) = env.provision_vehicle(VIN).await;
    let device = DeviceKey::Vehicle(vin.clone());
    let uplink = format!(r#"{{"task_id":"t-paho","status":"downloading","ts_ms":{}}}"#, u8::from(v5));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/paho_vehicle.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script).args(["--port", &port(&gw, link).to_string(), "--vin", VIN, "--uplink", &uplink]);
    if v5 {
        cmd.arg("--v5");
    }
    match link {
        Link::Tcp => {
            cmd.args(["--token", &token]);
        }
        Link::Tls => {
            cmd.args(["--token", &token, "--cafile", &pki.path("ca.pem")]);
        }
        Link::MutualTls => {
            cmd.args([
                "--cafile",
                &pki.path("ca.pem"),
                "--cert",
                &pki.path("client.pem"),
                "--key",
                &pki.path("client.key"),
            ]);
        }
    }
    let mut child = cmd.stdout(Stdio::piped()).kill_on_drop(true).spawn().expect("python3 available");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    read_line_containing(&mut lines, "ready").await;
    env.wait_upstream(
        "paho uplink",
        |e| matches!(e, UpEvent::Vehicle { payload, .. } if payload[..] == *uplink.as_bytes()),
    )
    .await;

    let body = CommandBody::Vehicle { kind: DownlinkKind::OtaNotify, payload: payload(r#"{"task_id":"t-9"}"#) };
    let reply = env.command(&device, body, Duration::from_secs(5)).await;
    assert_eq!(reply.outcome, Outcome::Delivered);
    let line = read_line_containing(&mut lines, "payload").await;
    let received: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(received["topic"], format!("vehicles/{VIN}/down/ota_notify"));
    assert_eq!(received["payload"], r#"{"task_id":"t-9"}"#);
    assert_eq!(received["qos"], 1);
    finish(child).await;
    gw.stop().await;
}

#[tokio::test]
async fn mosquitto_v311_over_tcp() {
    mosquitto_round_trip(Link::Tcp, false).await;
}

#[tokio::test]
async fn mosquitto_v5_over_tcp() {
    mosquitto_round_trip(Link::Tcp, true).await;
}

#[tokio::test]
async fn mosquitto_v311_over_tls() {
    mosquitto_round_trip(Link::Tls, false).await;
}

#[tokio::test]
async fn mosquitto_v5_over_tls_with_client_certificate() {
    mosquitto_round_trip(Link::MutualTls, true).await;
}

#[tokio::test]
async fn paho_v311_over_tcp() {
    paho_round_trip(Link::Tcp, false).await;
}

#[tokio::test]
async fn paho_v5_over_tls() {
    paho_round_trip(Link::Tls, true).await;
}

#[tokio::test]
async fn paho_v311_over_tls_with_client_certificate() {
    paho_round_trip(Link::MutualTls, false).await;
}
