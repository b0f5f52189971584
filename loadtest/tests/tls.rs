//! The harness over TLS against a real gateway's TLS listeners (and a real Redis): a whole
//! `loadtest fleet` run with `--tls-ca`, and simulated devices refusing a gateway they cannot
//! verify.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use gateway::Gateway;
use gateway::config::Config;
use loadtest::cabinet::{self, CabinetBehaviour, Target};
use loadtest::fleet_ids::{cabinet_id, cabinet_secret, provision_credentials, vehicle_token, vin};
use loadtest::stats::Stats;
use loadtest::tls::{TlsClient, TlsPlan};
use loadtest::vehicle::{self, Links, VehicleBehaviour};
use protocol::bus::Keys;
use testkit::RedisNamespace;
use testkit::pki::Pki;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// A gateway with plain and TLS listeners for both protocols, every port chosen by the system.
async fn gateway(ns: &RedisNamespace, pki: &Pki) -> Gateway {
    let mut c = Config { node_id: "gw-tls".into(), key_prefix: ns.prefix.clone(), ..Config::default() };
    c.redis.url.clone_from(&ns.url);
    c.metrics.listen = "127.0.0.1:0".into();
    c.cabinet.listen = "127.0.0.1:0".into();
    c.cabinet.tls_listen = "127.0.0.1:0".into();
    c.cabinet.tls_cert = pki.path("server.pem");
    c.cabinet.tls_key = pki.path("server.key");
    c.mqtt.listen = "127.0.0.1:0".into();
    c.mqtt.tls_listen = "127.0.0.1:0".into();
    c.mqtt.tls_cert = pki.path("server.pem");
    c.mqtt.tls_key = pki.path("server.key");
    Gateway::start(c.validate().unwrap()).await.unwrap()
}

/// The value of one series of the gateway's metrics (0 when absent).
fn metric(gw: &Gateway, series: &str) -> f64 {
    gw.metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Waits until `done` holds, checking every 20 ms (the counters have no change events).
async fn until(what: &str, done: impl Fn() -> bool) {
    let waited = tokio::time::timeout(testkit::WAIT, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting for {what}");
}

#[tokio::test]
async fn a_fleet_runs_over_tls_with_commands_and_uplinks() {
    let ns = RedisNamespace::create();
    let pki = Pki::new("unused");
    let gw = gateway(&ns, &pki).await;
    let out = std::env::temp_dir().join(testkit::unique_name("tls-report")).join("fleet.json");
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(["fleet", "--label", "tls", "--redis-url", &ns.url, "--key-prefix", &ns.prefix])
        .args(["--cabinet-addr", &gw.addresses.cabinet_tls.unwrap().to_string()])
        .args(["--mqtt-addr", &gw.addresses.mqtt_tls.unwrap().to_string()])
        .args(["--tls-ca", &pki.path("ca.pem"), "--tls-server-name", "localhost"])
        .args(["--cabinets", "10", "--vehicles", "10", "--workers", "2", "--source-ips", "2"])
        .args(["--hold-s", "3", "--commands-per-s", "20", "--publish-per-s", "2", "--max-duration-s", "60"])
        .arg("--out")
        .arg(&out)
        .kill_on_drop(true)
        .status()
        .await
        .unwrap();
    assert!(status.success(), "loadtest fleet failed: {status}");

    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let results = &report["results"];
    assert_eq!(results["connected"], 20, "every device logged in over TLS: {results}");
    let counters = &results["details"]["counters"];
    assert!(counters["cabinet_logins"].as_u64().unwrap() >= 10, "{counters}");
    assert!(counters["vehicle_logins"].as_u64().unwrap() >= 10, "{counters}");
    assert!(counters.get("cabinet_tls_failures").is_none() && counters.get("vehicle_tls_failures").is_none());
    assert!(counters["uplinks_acked"].as_u64().unwrap() > 0, "QoS 1 uplinks acknowledged over TLS: {counters}");
    let commands = &results["details"]["commands"];
    let sent = commands["sent"].as_u64().unwrap();
    let outcomes = commands["outcomes"].as_object().unwrap();
    let answered = outcomes.get("answered").and_then(serde_json::Value::as_u64).unwrap_or(0);
    let delivered = outcomes.get("delivered").and_then(serde_json::Value::as_u64).unwrap_or(0);
    assert!(sent > 0 && answered > 0 && delivered > 0, "commands reached both kinds: {commands}");
    assert_eq!(answered + delivered, sent, "every command answered or delivered: {commands}");
    let lost = &results["details"]["lost"];
    for kind in ["uplinks_unacknowledged", "heartbeats_unanswered", "commands_without_reply", "commands_not_delivered"]
    {
        assert_eq!(lost[kind], 0, "nothing lost: {lost}");
    }
    assert_eq!(report["parameters"]["tls"]["server_name"], "localhost");
    assert_eq!(metric(&gw, r#"gateway_tls_handshake_failures_total{protocol="cabinet"}"#), 0.0);
    assert_eq!(metric(&gw, r#"gateway_tls_handshake_failures_total{protocol="mqtt"}"#), 0.0);
    let _ = std::fs::remove_dir_all(out.parent().unwrap());
    gw.stop().await;
}

/// Runs one cabinet and one vehicle with `tls` until `done` holds for their counters.
async fn devices_until(gw: &Gateway, tls: &TlsClient, what: &str, done: impl Fn(&Stats) -> bool) -> Arc<Stats> {
    let stats = Arc::new(Stats::default());
    let stop = CancellationToken::new();
    let id = cabinet_id(0);
    let secret = cabinet_secret(&id);
    let addr = gw.addresses.cabinet_tls.unwrap();
    let target = Target { addr, all: Arc::new([addr]), source: None, tls: Some(tls.clone()) };
    let cab = tokio::spawn(cabinet::run(
        id,
        secret,
        target,
        Arc::new(CabinetBehaviour::default()),
        Arc::clone(&stats),
        stop.clone(),
    ));
    let (control, _) = broadcast::channel(1);
    let (qr_ids, _qr_rx) = mpsc::unbounded_channel();
    let v = vin(0);
    let token = vehicle_token(&v);
    let behaviour = VehicleBehaviour { tls: Some(tls.config()), ..VehicleBehaviour::default() };
    let links = Links { number: 0, control: control.subscribe(), qr_ids };
    let veh = tokio::spawn(vehicle::run(
        v,
        token,
        gw.addresses.mqtt_tls.unwrap(),
        Arc::new([gw.addresses.mqtt_tls.unwrap()]),
        Arc::new(behaviour),
        Arc::clone(&stats),
        links,
        stop.clone(),
    ));
    until(what, || done(&stats)).await;
    stop.cancel();
    cab.await.unwrap();
    veh.await.unwrap();
    stats
}

async fn provisioned() -> (RedisNamespace, Pki) {
    let ns = RedisNamespace::create();
    let client = redis::Client::open(ns.url.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    provision_credentials(&mut con, &Keys::new(ns.prefix.clone()), 1, 1).await.unwrap();
    (ns, Pki::new("unused"))
}

#[tokio::test]
async fn devices_verify_the_name_given_and_accept_an_ip_address_name() {
    let (ns, pki) = provisioned().await;
    let gw = gateway(&ns, &pki).await;
    // The certificate names localhost and 127.0.0.1; either passes, whatever address is dialled.
    let by_ip =
        TlsClient::new(&TlsPlan { ca_file: pki.path("ca.pem").into(), server_name: "127.0.0.1".into() }).unwrap();
    let stats = devices_until(&gw, &by_ip, "both devices logged in", |s| {
        s.count("cabinet_logins") >= 1 && s.count("vehicle_logins") >= 1
    })
    .await;
    assert_eq!(stats.count("cabinet_tls_failures") + stats.count("vehicle_tls_failures"), 0);

    // A name the certificate does not carry is refused by both kinds of device.
    let wrong =
        TlsClient::new(&TlsPlan { ca_file: pki.path("ca.pem").into(), server_name: "gw.example".into() }).unwrap();
    let stats = devices_until(&gw, &wrong, "both devices refusing the name", |s| {
        s.count("cabinet_tls_failures") >= 1 && s.count("vehicle_tls_failures") >= 1
    })
    .await;
    assert_eq!(stats.count("cabinet_logins") + stats.count("vehicle_logins"), 0);
    gw.stop().await;
}

#[tokio::test]
async fn devices_refuse_a_gateway_signed_by_another_ca() {
    let (ns, pki) = provisioned().await;
    let gw = gateway(&ns, &pki).await;
    let stranger = Pki::new("unused");
    let tls =
        TlsClient::new(&TlsPlan { ca_file: stranger.path("ca.pem").into(), server_name: "localhost".into() }).unwrap();
    let stats = devices_until(&gw, &tls, "both devices refusing the certificate", |s| {
        s.count("cabinet_tls_failures") >= 1 && s.count("vehicle_tls_failures") >= 1
    })
    .await;
    assert_eq!(stats.count("cabinet_logins") + stats.count("vehicle_logins"), 0);
    assert_eq!(stats.connected.load(std::sync::atomic::Ordering::Relaxed), 0);
    // The gateway saw the handshakes fail (the clients hung up on its certificate).
    until("the gateway counting failed handshakes", || {
        metric(&gw, r#"gateway_tls_handshake_failures_total{protocol="cabinet"}"#) >= 1.0
            && metric(&gw, r#"gateway_tls_handshake_failures_total{protocol="mqtt"}"#) >= 1.0
    })
    .await;
    gw.stop().await;
}

#[test]
fn unusable_tls_settings_are_refused_with_the_reason() {
    let pki = Pki::new("unused");
    let missing = TlsClient::new(&TlsPlan { ca_file: "/nonexistent/ca.pem".into(), server_name: "localhost".into() });
    assert!(format!("{:#}", missing.unwrap_err()).contains("/nonexistent/ca.pem"));
    let not_pem = TlsClient::new(&TlsPlan { ca_file: pki.path("server.key").into(), server_name: "localhost".into() });
    assert!(format!("{:#}", not_pem.unwrap_err()).contains("no certificate in the CA file"));
    let bad_name = TlsClient::new(&TlsPlan { ca_file: pki.path("ca.pem").into(), server_name: "not a name".into() });
    assert!(format!("{:#}", bad_name.unwrap_err()).contains("--tls-server-name"));
}
