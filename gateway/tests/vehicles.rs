//! Vehicles against a real gateway with rumqttc (an MQTT client nobody here wrote): token
//! authentication, the topic access rule, downlinks with PUBACK, uplinks forwarded,
//! persistent sessions, keep-alive, takeover.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{Env, Vehicle, metric, payload, vehicle_options};
use protocol::bus::{CommandBody, DeviceKey, Outcome, UpEvent};
use protocol::mqtt::topic::{DownlinkKind, UplinkKind, uplink_topic};
use rumqttc::{ConnectReturnCode, Packet, QoS, SubscribeReasonCode};

const VIN: &str = "LSVAU2180N2183294";

#[tokio::test]
async fn downlink_and_uplink_round_trip() {
    let mut env = Env::single().await;
    let gw = env.start("gw-a").await;
    let (vin, token) = env.provision_vehicle(VIN).await;
    let mut car = Vehicle::connect(gw.addresses.mqtt.unwrap(), &vin, &token).await;
    car.subscribe_downlinks().await;
    let device = DeviceKey::Vehicle(vin.clone());

    let body = CommandBody::Vehicle { kind: DownlinkKind::QrId, payload: payload(r#"{"qr_id":"abc"}"#) };
    let (reply, publish) = tokio::join!(
        env.command(&device, body, Duration::from_secs(5)),
        car.wait_for("downlink", |p| matches!(p, Packet::Publish(_)))
    );
    let Packet::Publish(p) = publish else { unreachable!() };
    assert_eq!(p.topic, format!("vehicles/{VIN}/down/qr_id"));
    assert_eq!(p.qos, QoS::AtLeastOnce);
    assert_eq!(&p.payload[..], br#"{"qr_id":"abc"}"#);
    assert_eq!(reply.outcome, Outcome::Delivered, "PUBACK completes the command");
    // The node took the command: nothing of it is left in its stream.
    let left: usize =
        redis::cmd("XLEN").arg(env.keys.commands("gw-a")).query_async(&mut env.redis.clone()).await.unwrap();
    assert_eq!(left, 0, "a delivered command is deleted from the node's stream");

    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        let body = format!(r#"{{"request_id":"r-{}","seat":"driver"}}"#, qos as u8);
        car.client.publish(uplink_topic(&vin, UplinkKind::QrRequest), qos, false, body.clone()).await.unwrap();
        let forwarded = env
            .wait_upstream(
                "uplink",
                |e| matches!(e, UpEvent::Vehicle { payload, .. } if payload[..] == *body.as_bytes()),
            )
            .await;
        assert!(matches!(forwarded, UpEvent::Vehicle { kind: UplinkKind::QrRequest, epoch, .. } if epoch > 0));
    }
    car.wait_for("puback", |p| matches!(p, Packet::PubAck(_))).await;
    assert_eq!(metric(&gw, "gateway_logins_total", &[("protocol", "mqtt"), ("result", "accepted")]), 1.0);
    gw.stop().await;
}

#[tokio::test]
async fn wrong_token_and_unknown_vehicle_are_refused() {
    let env = Env::single().await;
    let gw = env.start("gw-a").await;
    let addr = gw.addresses.mqtt.unwrap();
    let (vin, _) = env.provision_vehicle(VIN).await;
    for (vin, token) in [(vin.clone(), "wrong"), (protocol::Vin::new("LSVAU2180N2183295").unwrap(), "x")] {
        let mut car = Vehicle::start(vehicle_options(addr, &vin, token), &vin);
        let err = car.incoming().await.expect_err("refused");
        assert!(err.contains("BadUserNamePassword"), "{err}");
    }
    assert_eq!(metric(&gw, "gateway_logins_total", &[("protocol", "mqtt"), ("result", "bad_credentials")]), 1.0);
    assert_eq!(metric(&gw, "gateway_logins_total", &[("protocol", "mqtt"), ("result", "unknown_device")]), 1.0);
    gw.stop().await;
}

#[tokio::test]
async fn foreign_topics_are_refused_and_counted() {
    let env = Env::single().await;
    let gw = env.start("gw-a").await;
    let (vin, token) = env.provision_vehicle(VIN).await;
    let mut car = Vehicle::connect(gw.addresses.mqtt.unwrap(), &vin, &token).await;

    // Subscribing to another vehicle's downlinks (or everyone's): failure code, connection kept.
    car.client
        .subscribe_many([
            rumqttc::SubscribeFilter::new("vehicles/+/down/#".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new(format!("vehicles/{VIN}/down/#"), QoS::AtLeastOnce),
        ])
        .await
        .unwrap();
    let ack = car.wait_for("suback", |p| matches!(p, Packet::SubAck(_))).await;
    let Packet::SubAck(ack) = ack else { unreachable!() };
    assert_eq!(ack.return_codes, [SubscribeReasonCode::Failure, SubscribeReasonCode::Success(QoS::AtLeastOnce)]);

    // Publishing as another vehicle: a 3.1.1 connection is closed.
    let foreign = "vehicles/LSVAU2180N2183295/up/ota_status";
    car.client.publish(foreign, QoS::AtLeastOnce, false, "{}").await.unwrap();
    let ended = loop {
        match car.incoming().await {
            Ok(Packet::PubAck(_)) => panic!("a foreign publish must not be acknowledged"),
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert!(!ended.is_empty());
    assert_eq!(metric(&gw, "gateway_mqtt_acl_denied_total", &[("action", "subscribe")]), 1.0);
    assert_eq!(metric(&gw, "gateway_mqtt_acl_denied_total", &[("action", "publish")]), 1.0);
    gw.stop().await;
}

#[tokio::test]
async fn subscriptions_are_capped_per_connection() {
    let env = Env::single().await;
    let mut config = env.config("gw-a");
    config.mqtt.max_subscriptions = 3;
    let gw = env.start_with(config).await;
    let (vin, token) = env.provision_vehicle(VIN).await;
    let mut car = Vehicle::connect(gw.addresses.mqtt.unwrap(), &vin, &token).await;
    let filter = |n: u32| rumqttc::SubscribeFilter::new(format!("vehicles/{VIN}/down/x{n}"), QoS::AtLeastOnce);

    // Four in one SUBSCRIBE: the fourth is over the quota.
    car.client.subscribe_many((1..=4).map(filter)).await.unwrap();
    let Packet::SubAck(ack) = car.wait_for("suback", |p| matches!(p, Packet::SubAck(_))).await else { unreachable!() };
    let granted = SubscribeReasonCode::Success(QoS::AtLeastOnce);
    assert_eq!(ack.return_codes, [granted, granted, granted, SubscribeReasonCode::Failure]);
    // One already held is replaced, not counted; a new one is still refused.
    car.client.subscribe_many([filter(2), filter(5)]).await.unwrap();
    let Packet::SubAck(ack) = car.wait_for("suback", |p| matches!(p, Packet::SubAck(_))).await else { unreachable!() };
    assert_eq!(ack.return_codes, [granted, SubscribeReasonCode::Failure]);
    assert_eq!(
        metric(&gw, "gateway_frames_rejected_total", &[("protocol", "mqtt"), ("reason", "subscription_quota")]),
        2.0
    );

    // A downlink over the payload cap is answered `invalid` and never sent.
    let huge = vec![b'x'; protocol::mqtt::topic::MAX_DOWNLINK_PAYLOAD + 1];
    let body = CommandBody::Vehicle { kind: DownlinkKind::Command, payload: huge.into() };
    let reply = env.command(&DeviceKey::Vehicle(vin.clone()), body, Duration::from_secs(5)).await;
    assert!(matches!(&reply.outcome, Outcome::Invalid(why) if why.contains("exceeds")), "{:?}", reply.outcome);
    gw.stop().await;
}

#[tokio::test]
async fn persistent_session_resends_unacknowledged_downlinks() {
    let env = Env::single().await;
    let gw = env.start("gw-a").await;
    let addr = gw.addresses.mqtt.unwrap();
    let (vin, token) = env.provision_vehicle(VIN).await;
    let device = DeviceKey::Vehicle(vin.clone());

    let persistent = || {
        let mut o = vehicle_options(addr, &vin, &token);
        o.set_clean_session(false);
        o.set_manual_acks(true);
        o
    };
    let mut car = Vehicle::connect_with(persistent(), &vin).await;
    car.subscribe_downlinks().await;
    // Received but never acknowledged: the command times out, the downlink stays stored.
    let body = CommandBody::Vehicle { kind: DownlinkKind::OtaNotify, payload: payload(r#"{"task_id":"t-1"}"#) };
    let (reply, first) = tokio::join!(
        env.command(&device, body, Duration::from_millis(500)),
        car.wait_for("downlink", |p| matches!(p, Packet::Publish(_)))
    );
    assert_eq!(reply.outcome, Outcome::TimedOut);
    let Packet::Publish(first) = first else { unreachable!() };
    assert!(!first.dup);
    drop(car);

    // Reconnect without subscribing again: the session is present and the downlink comes back.
    let mut car = Vehicle::start(persistent(), &vin);
    let ack = car.incoming().await.expect("connack");
    assert!(matches!(&ack, Packet::ConnAck(a) if a.code == ConnectReturnCode::Success && a.session_present), "{ack:?}");
    let again = car.wait_for("resent downlink", |p| matches!(p, Packet::Publish(_))).await;
    let Packet::Publish(again) = again else { unreachable!() };
    assert!(again.dup);
    assert_eq!(again.pkid, first.pkid);
    assert_eq!(again.payload, first.payload);
    car.client.ack(&again).await.unwrap();
    // Once acknowledged it is gone from the stored session.
    let mut con = env.redis.clone();
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let left: i64 = redis::cmd("LLEN").arg(env.keys.mqtt_inflight(&vin)).query_async(&mut con).await.unwrap();
        if left == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "stored downlink not removed");
        car.client.publish(uplink_topic(&vin, UplinkKind::OtaStatus), QoS::AtLeastOnce, false, "{}").await.unwrap();
        car.wait_for("puback", |p| matches!(p, Packet::PubAck(_))).await;
    }
    assert_eq!(metric(&gw, "gateway_mqtt_stored_downlinks_total", &[("action", "resent")]), 1.0);
    gw.stop().await;
}

#[tokio::test]
async fn keep_alive_closes_a_silent_vehicle() {
    let mut env = Env::single().await;
    let gw = env.start("gw-a").await;
    let (vin, token) = env.provision_vehicle(VIN).await;
    // A raw 3.1.1 CONNECT with keep-alive 1 s, then silence.
    let mut connect = vec![0x10, 0];
    connect.extend_from_slice(b"\x00\x04MQTT\x04\xC2\x00\x01");
    for s in [vin.as_str(), vin.as_str(), token.as_str()] {
        connect.extend_from_slice(&u16::try_from(s.len()).unwrap().to_be_bytes());
        connect.extend_from_slice(s.as_bytes());
    }
    connect[1] = u8::try_from(connect.len() - 2).unwrap();
    let mut tcp = tokio::net::TcpStream::connect(gw.addresses.mqtt.unwrap()).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(&connect).await.unwrap();
    let mut connack = [0u8; 4];
    tcp.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(common::WAIT, tcp.read_to_end(&mut rest)).await.expect("closed in time").unwrap();
    assert_eq!(n, 0, "3.1.1: closed without a DISCONNECT");
    assert!(started.elapsed() >= Duration::from_millis(1400), "1.5 x keep-alive");
    env.wait_upstream("close", |e| matches!(e, UpEvent::SessionClosed { reason, .. } if reason == "idle_timeout"))
        .await;
    gw.stop().await;
}

#[tokio::test]
async fn a_second_connection_takes_over() {
    let mut env = Env::single().await;
    let gw = env.start("gw-a").await;
    let addr = gw.addresses.mqtt.unwrap();
    let (vin, token) = env.provision_vehicle(VIN).await;
    let mut first = Vehicle::connect(addr, &vin, &token).await;
    let _second = Vehicle::connect(addr, &vin, &token).await;
    let ended = loop {
        if let Err(e) = first.incoming().await {
            break e;
        }
    };
    assert!(!ended.is_empty());
    let epochs: Vec<u64> = env
        .wait_upstream_count("both opens", 2, |e| matches!(e, UpEvent::SessionOpened { .. }))
        .await
        .iter()
        .map(|e| match e {
            UpEvent::SessionOpened { epoch, .. } => *epoch,
            _ => unreachable!(),
        })
        .collect();
    assert!(epochs[1] > epochs[0], "the second connection's epoch fences the first's: {epochs:?}");
    let entry = env.map_entry(&DeviceKey::Vehicle(vin)).await;
    assert_eq!(entry.get("epoch"), Some(&epochs[1].to_string()));
    assert_eq!(entry.get("node").map(String::as_str), Some("gw-a"));
    assert_eq!(metric(&gw, "gateway_takeovers_total", &[("protocol", "mqtt"), ("scope", "local")]), 1.0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_upstream_buffer_pauses_the_vehicle_and_loses_nothing() {
    let mut env = Env::private().await;
    let mut config = env.config("gw-a");
    config.upstream.buffer_max = 3;
    let gw = env.start_with(config).await;
    let (vin, token) = env.provision_vehicle(VIN).await;
    let mut car = Vehicle::connect(gw.addresses.mqtt.unwrap(), &vin, &token).await;
    // The session's own open event must be out of the buffer first, or it takes a place there.
    env.wait_upstream_count("the session opened", 1, |e| matches!(e, UpEvent::SessionOpened { .. })).await;

    // Redis goes away: the buffer fills after three events, then the gateway stops reading.
    tokio::task::block_in_place(|| env.server_mut().stop());
    for i in 0..10 {
        let body = format!(r#"{{"task_id":"t","status":"downloading","ts_ms":{i}}}"#);
        car.client.publish(uplink_topic(&vin, UplinkKind::OtaStatus), QoS::AtLeastOnce, false, body).await.unwrap();
    }
    // The first three wait in the buffer, unacknowledged (a PUBACK means stored), then the
    // fourth stalls and the gateway stops reading.
    let deadline = tokio::time::Instant::now() + testkit::WAIT;
    while metric(&gw, "gateway_backpressure_pauses_total", &[("protocol", "mqtt")]) < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "the vehicle was not paused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gw.metrics.upstream_buffer.get(), 3);
    let early =
        tokio::time::timeout(Duration::from_millis(500), car.wait_for("puback", |p| matches!(p, Packet::PubAck(_))))
            .await;
    assert!(early.is_err(), "no acknowledgement before Redis has the publish");

    // Redis is back: the buffer drains, the vehicle is read again, all ten are acknowledged
    // and everything arrives once.
    tokio::task::block_in_place(|| env.server_mut().restart());
    for _ in 0..10 {
        car.wait_for("puback", |p| matches!(p, Packet::PubAck(_))).await;
    }
    let events = env.wait_upstream_count("all ten", 10, |e| matches!(e, UpEvent::Vehicle { .. })).await;
    assert_eq!(events.len(), 10);
    assert_eq!(metric(&gw, "gateway_sessions_closed_total", &[("protocol", "mqtt"), ("reason", "io_error")]), 0.0);
    gw.stop().await;
}

#[tokio::test]
async fn a_vehicle_that_stops_reading_is_disconnected_as_a_slow_reader() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut env = Env::single().await;
    let mut config = env.config("gw-a");
    config.mqtt.write_timeout_ms = 500;
    let gw = env.start_with(config).await;
    let (vin, token) = env.provision_vehicle(VIN).await;

    // A raw 3.1.1 client with a tiny receive buffer: it connects, subscribes at QoS 0, then
    // never reads again.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = socket.connect(gw.addresses.mqtt.unwrap()).await.unwrap();
    let mut connect = vec![0x10, 0];
    connect.extend_from_slice(b"\x00\x04MQTT\x04\xC2\x00\x3c");
    for s in [vin.as_str(), vin.as_str(), token.as_str()] {
        connect.extend_from_slice(&u16::try_from(s.len()).unwrap().to_be_bytes());
        connect.extend_from_slice(s.as_bytes());
    }
    connect[1] = u8::try_from(connect.len() - 2).unwrap();
    tcp.write_all(&connect).await.unwrap();
    let mut connack = [0u8; 4];
    tcp.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    let filter = format!("vehicles/{VIN}/down/#");
    let mut subscribe = vec![0x82, 0, 0x00, 0x01];
    subscribe.extend_from_slice(&u16::try_from(filter.len()).unwrap().to_be_bytes());
    subscribe.extend_from_slice(filter.as_bytes());
    subscribe.push(0); // QoS 0: no in-flight window holds the gateway back
    subscribe[1] = u8::try_from(subscribe.len() - 2).unwrap();
    tcp.write_all(&subscribe).await.unwrap();
    let mut suback = [0u8; 5];
    tcp.read_exact(&mut suback).await.unwrap();
    assert_eq!(suback, [0x90, 0x03, 0x00, 0x01, 0x00]);

    // Downlinks of 8 KiB until the gateway gives up on it.
    let device = DeviceKey::Vehicle(vin);
    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(8 * 1024));
    let mut outcome = Outcome::Delivered;
    for _ in 0..2000 {
        let body = CommandBody::Vehicle { kind: DownlinkKind::Command, payload: payload(&big) };
        outcome = env.command_via("gw-a", &device, body, Duration::from_secs(5)).await.outcome;
        if outcome != Outcome::Delivered {
            break;
        }
    }
    assert_eq!(outcome, Outcome::NotConnected, "the session ended");
    env.wait_upstream("close", |e| matches!(e, UpEvent::SessionClosed { reason, .. } if reason == "slow_reader")).await;
    assert_eq!(metric(&gw, "gateway_sessions_closed_total", &[("protocol", "mqtt"), ("reason", "slow_reader")]), 1.0);
    drop(tcp);
    gw.stop().await;
}

#[tokio::test]
async fn a_payload_holding_a_nul_is_acknowledged_dropped_and_counted() {
    let mut env = Env::single().await;
    let gw = env.start("gw-a").await;
    let (vin, token) = env.provision_vehicle(VIN).await;
    let mut car = Vehicle::connect(gw.addresses.mqtt.unwrap(), &vin, &token).await;
    let topic = uplink_topic(&vin, UplinkKind::ActivationReport);
    // 3.1.1 cannot refuse a publish: it is acknowledged (or the car would resend it on every
    // reconnect) and not forwarded.
    car.client.publish(topic.clone(), QoS::AtLeastOnce, false, r#"{"qr_id":"q\u0000r","code":"1"}"#).await.unwrap();
    car.wait_for("puback", |p| matches!(p, Packet::PubAck(_))).await;
    car.client.publish(topic, QoS::AtLeastOnce, false, r#"{"qr_id":"qr","code":"1"}"#).await.unwrap();
    env.wait_upstream(
        "the clean report",
        |e| matches!(e, UpEvent::Vehicle { payload, .. } if payload.ends_with(b"\"1\"}")),
    )
    .await;
    let forwarded = env.upstream().await;
    assert!(
        !forwarded
            .iter()
            .any(|e| matches!(e, UpEvent::Vehicle { payload, .. } if payload.windows(6).any(|w| w == br"\u0000"))),
        "the NUL never travels on"
    );
    assert_eq!(metric(&gw, "gateway_frames_rejected_total", &[("protocol", "mqtt"), ("reason", "payload_nul")]), 1.0);
    gw.stop().await;
}
