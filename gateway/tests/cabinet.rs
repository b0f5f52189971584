//! Cabinets against a real gateway over real sockets, with a real Redis: login and its
//! refusals, every kind of bad input, idle timeout, forwarding, commands and the drain.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{Cabinet, Env, metric};
use protocol::bus::{CommandBody, DeviceKey, Outcome, UpEvent};
use protocol::cabinet::{
    CommandAction, CommandResult, CommandStatus, DoorEvent, DoorState, DoorStatus, ErrorCode, Frame, Heartbeat,
    LaneWeight, Login, LoginStatus, Message, NoticeKind, WeightReport,
};
use protocol::{DeviceId, OrderId};

fn key(id: &DeviceId) -> DeviceKey {
    DeviceKey::Cabinet(id.clone())
}

#[tokio::test]
async fn login_heartbeat_and_the_map() {
    let mut env = Env::single().await;
    let gw = env.start("gw-a").await;
    let (id, secret) = env.provision_cabinet("CAB-1").await;
    let (mut cab, result) = Cabinet::login(gw.addresses.cabinet.unwrap(), &id, &secret).await;
    assert_eq!(result.status, LoginStatus::Accepted);
    assert_eq!(result.heartbeat_interval_s, 30);

    let seq = cab.send(Message::Heartbeat(Heartbeat { device_time_ms: 1 })).await;
    let ack = cab.recv().await.expect("heartbeat ack");
    assert_eq!(ack.seq, seq);
    assert!(matches!(ack.message, Message::HeartbeatAck(_)));

    let entry = env.map_entry(&key(&id)).await;
    assert_eq!(entry.get("node").map(String::as_str), Some("gw-a"));
    let epoch: u64 = entry.get("epoch").unwrap().parse().unwrap();
    assert!(epoch.abs_diff(gateway::clock::now_ms()) < 60_000, "the first epoch is the login time in ms: {epoch}");
    let opened = env.wait_upstream("open", |e| matches!(e, UpEvent::SessionOpened { .. })).await;
    assert!(matches!(opened, UpEvent::SessionOpened { epoch: e, ref info, .. } if info == "1.0.0" && e == epoch));
    // Heartbeats arrive aggregated, one window entry naming the device.
    let window = env
        .wait_upstream("heartbeat window", |e| matches!(e, UpEvent::Heartbeats { devices, .. } if !devices.is_empty()))
        .await;
    let UpEvent::Heartbeats { node, count, devices, .. } = window else { unreachable!() };
    assert_eq!(node, "gw-a");
    assert_eq!(count, 1);
    assert_eq!(devices[0].device, key(&id));
    assert_eq!(devices[0].epoch, epoch);
    assert_eq!(metric(&gw, "gateway_logins_total", &[("protocol", "cabinet"), ("result", "accepted")]), 1.0);
    assert_eq!(metric(&gw, "gateway_connections_open", &[("protocol", "cabinet")]), 1.0);
    gw.stop().await;
}

#[tokio::test]
async fn bad_tag_unknown_device_and_clock_skew_are_refused_and_counted() {
    let env = Env::single().await;
    let gw = env.start("gw-a").await;
    let addr = gw.addresses.cabinet.unwrap();
    let (id, secret) = env.provision_cabinet("CAB-2").await;

    let mut wrong = secret.clone();
    wrong[0] ^= 1;
    let (mut cab, result) = Cabinet::login(addr, &id, &wrong).await;
    assert_eq!(result.status, LoginStatus::BadTag);
    assert!(cab.until_closed().await.is_empty(), "closed after the refusal");

    let stranger = DeviceId::new("CAB-NOBODY").unwrap();
    let (_, result) = Cabinet::login(addr, &stranger, &secret).await;
    assert_eq!(result.status, LoginStatus::UnknownDevice);

    let mut cab = Cabinet::connect(addr, &id).await;
    let skewed = Login::sign(id.clone(), "1.0.0", gateway::clock::now_ms() - 3_600_000, &secret).unwrap();
    cab.send(Message::Login(skewed)).await;
    let Some(Frame { message: Message::LoginResult(r), .. }) = cab.recv().await else { panic!("answer expected") };
    assert_eq!(r.status, LoginStatus::ClockSkew);
    assert!(r.server_time_ms.abs_diff(gateway::clock::now_ms()) < 60_000, "server time lets the cabinet fix its clock");

    for result in ["bad_tag", "unknown_device", "clock_skew"] {
        assert_eq!(
            metric(&gw, "gateway_logins_total", &[("protocol", "cabinet"), ("result", result)]),
            1.0,
            "{result}"
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn login_deadline_and_frames_before_login() {
    let env = Env::single().await;
    let gw = env.start("gw-a").await;
    let addr = gw.addresses.cabinet.unwrap();
    let (id, _) = env.provision_cabinet("CAB-3").await;

    // Silent connection: closed at the 1 s login deadline.
    let mut silent = Cabinet::connect(addr, &id).await;
    assert!(silent.until_closed().await.is_empty());
    assert_eq!(metric(&gw, "gateway_logins_total", &[("protocol", "cabinet"), ("result", "timeout")]), 1.0);

    // A heartbeat first: ERROR NotLoggedIn with its seq, then close.
    let mut eager = Cabinet::connect(addr, &id).await;
    let seq = eager.send(Message::Heartbeat(Heartbeat { device_time_ms: 0 })).await;
    let frames = eager.until_closed().await;
    assert!(
        matches!(&frames[..], [Frame { seq: s, message: Message::Error(e), .. }] if *s == seq && e.code == ErrorCode::NotLoggedIn),
        "{frames:?}"
    );
    gw.stop().await;
}

/// Logs a fresh cabinet in and returns it ready for abuse.
async fn logged_in(env: &Env, gw: &gateway::Gateway, id: &str) -> Cabinet {
    let (id, secret) = env.provision_cabinet(id).await;
    let (cab, result) = Cabinet::login(gw.addresses.cabinet.unwrap(), &id, &secret).await;
    assert_eq!(result.status, LoginStatus::Accepted);
    cab
}

#[tokio::test]
async fn oversize_bad_checksum_and_garbage_close_the_connection() {
    let mut env = Env::single().await;
    let gw = env.start("gw-a").await;

    // A header declaring 4097 payload bytes: refused before the body is read.
    let mut cab = logged_in(&env, &gw, "CAB-4").await;
    cab.send_raw(&[0xCA, 0xB1, 0x01, 0x03, 0x00, 0, 0, 0, 9, 0x10, 0x01]).await;
    let frames = cab.until_closed().await;
    assert!(
        matches!(&frames[..], [Frame { message: Message::Error(e), .. }] if e.code == ErrorCode::TooLarge),
        "{frames:?}"
    );

    // The spec's heartbeat with its CRC broken.
    let mut cab = logged_in(&env, &gw, "CAB-5").await;
    let mut hb = hex_frame("CA B1 01 02 00 00 00 00 02 00 08 00 00 01 8B CF E5 DD 30 8A 15 C6 47");
    hb[22] ^= 0xFF;
    cab.send_raw(&hb).await;
    let frames = cab.until_closed().await;
    assert!(matches!(&frames[..], [Frame { message: Message::Error(e), .. }] if e.code == ErrorCode::BadChecksum));

    let mut cab = logged_in(&env, &gw, "CAB-6").await;
    cab.send_raw(b"GET / HTTP/1.1\r\n\r\n").await;
    let frames = cab.until_closed().await;
    assert!(matches!(&frames[..], [Frame { message: Message::Error(e), .. }] if e.code == ErrorCode::BadMagic));
    env.wait_upstream_count("three closes", 3, |e| matches!(e, UpEvent::SessionClosed { .. })).await;

    for reason in ["too_large", "bad_checksum", "bad_magic"] {
        let labels = [("protocol", "cabinet"), ("reason", reason)];
        assert_eq!(metric(&gw, "gateway_frames_rejected_total", &labels), 1.0, "{reason}");
    }
    assert_eq!(
        metric(&gw, "gateway_sessions_closed_total", &[("protocol", "cabinet"), ("reason", "protocol_error")]),
        3.0
    );
    gw.stop().await;
}

fn hex_frame(hex: &str) -> Vec<u8> {
    hex.split_whitespace().map(|b| u8::from_str_radix(b, 16).unwrap()).collect()
}

#[tokio::test]
async fn unknown_type_and_bad_fields_are_answered_and_the_connection_stays() {
    let env = Env::single().await;
    let gw = env.start("gw-a").await;
    let mut cab = logged_in(&env, &gw, "CAB-7").await;

    // Type 0x07, seq 9, empty payload, valid CRC.
    let mut frame = vec![0xCA, 0xB1, 0x01, 0x07, 0x00, 0, 0, 0, 9, 0, 0];
    frame.extend_from_slice(&crc32c::crc32c(&frame).to_be_bytes());
    cab.send_raw(&frame).await;
    let answer = cab.recv().await.expect("answered");
    assert!(matches!(&answer, Frame { seq: 9, message: Message::Error(e), .. } if e.code == ErrorCode::UnknownType));

    // A weight report whose stable flag is 2.
    let mut frame =
        vec![0xCA, 0xB1, 0x01, 0x03, 0x00, 0, 0, 0, 10, 0, 16, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 10, 2];
    frame.extend_from_slice(&crc32c::crc32c(&frame).to_be_bytes());
    cab.send_raw(&frame).await;
    let answer = cab.recv().await.expect("answered");
    assert!(matches!(&answer, Frame { seq: 10, message: Message::Error(e), .. } if e.code == ErrorCode::Malformed));

    // A downlink type from a cabinet.
    let seq = cab.send(Message::Ack).await;
    let answer = cab.recv().await.expect("answered");
    assert!(
        matches!(&answer, Frame { seq: s, message: Message::Error(e), .. } if *s == seq && e.code == ErrorCode::Unexpected)
    );

    // Still served.
    let seq = cab.send(Message::Heartbeat(Heartbeat { device_time_ms: 1 })).await;
    assert!(matches!(cab.recv().await, Some(Frame { seq: s, message: Message::HeartbeatAck(_), .. }) if s == seq));
    assert_eq!(
        metric(&gw, "gateway_frames_rejected_total", &[("protocol", "cabinet"), ("reason", "unknown_type")]),
        1.0
    );
    assert_eq!(
        metric(&gw, "gateway_frames_rejected_total", &[("protocol", "cabinet"), ("reason", "out_of_range")]),
        1.0
    );
    gw.stop().await;
}

#[tokio::test]
async fn idle_session_is_closed_and_its_entry_removed() {
    let mut env = Env::single().await;
    let mut config = env.config("gw-a");
    config.cabinet.heartbeat_interval_s = 1;
    config.cabinet.idle_timeout_ms = 1500;
    let gw = env.start_with(config).await;
    let (id, secret) = env.provision_cabinet("CAB-8").await;
    let (mut cab, _) = Cabinet::login(gw.addresses.cabinet.unwrap(), &id, &secret).await;
    assert!(cab.until_closed().await.is_empty());
    let opened = env.wait_upstream("open", |e| matches!(e, UpEvent::SessionOpened { .. })).await;
    let UpEvent::SessionOpened { epoch, .. } = opened else { unreachable!() };
    let closed = env.wait_upstream("close", |e| matches!(e, UpEvent::SessionClosed { .. })).await;
    assert!(
        matches!(closed, UpEvent::SessionClosed { ref reason, epoch: e, .. } if reason == "idle_timeout" && e == epoch)
    );
    let entry = env.map_entry(&key(&id)).await;
    assert_eq!(entry.get("node"), None, "entry released");
    assert_eq!(entry.get("epoch"), Some(&epoch.to_string()), "epoch kept");
    assert_eq!(
        metric(&gw, "gateway_sessions_closed_total", &[("protocol", "cabinet"), ("reason", "idle_timeout")]),
        1.0
    );
    gw.stop().await;
}

#[tokio::test]
async fn door_events_and_weights_are_acknowledged_and_forwarded_in_order() {
    let mut env = Env::single().await;
    let gw = env.start("gw-a").await;
    let mut cab = logged_in(&env, &gw, "CAB-9").await;
    let order = OrderId::new("ORD-1").unwrap();
    let t0 = gateway::clock::now_ms();
    let open = DoorEvent { door_id: 1, state: DoorState::Open, event_time_ms: t0 + 100, order_id: Some(order) };
    let seq = cab.send_frame_ack(Message::DoorEvent(open.clone())).await;
    assert!(matches!(cab.recv().await, Some(Frame { seq: s, message: Message::Ack, .. }) if s == seq));
    for i in 0..20 {
        let report = WeightReport {
            door_id: 1,
            sample_time_ms: t0 + 200 + i,
            lanes: vec![LaneWeight { lane_id: 1, grams: 1000 - i32::try_from(i).unwrap(), stable: i % 2 == 0 }],
        };
        cab.send(Message::WeightReport(report)).await;
    }
    let close = DoorEvent { door_id: 1, state: DoorState::Closed, event_time_ms: t0 + 300, order_id: None };
    let seq = cab.send(Message::DoorEvent(close)).await;
    assert!(matches!(cab.recv().await, Some(Frame { seq: s, message: Message::Ack, .. }) if s == seq), "always acked");

    env.wait_upstream(
        "closing door event",
        |e| matches!(e, UpEvent::Cabinet { message: Message::DoorEvent(d), .. } if d.state == DoorState::Closed),
    )
    .await;
    let cabinet_events: Vec<Message> = env
        .upstream()
        .await
        .into_iter()
        .filter_map(|e| match e {
            UpEvent::Cabinet { message, .. } => Some(message),
            _ => None,
        })
        .collect();
    assert_eq!(cabinet_events.len(), 22);
    assert_eq!(cabinet_events[0], Message::DoorEvent(open));
    let times: Vec<u64> = cabinet_events[1..21]
        .iter()
        .map(|m| match m {
            Message::WeightReport(w) => w.sample_time_ms,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(times, (t0 + 200..t0 + 220).collect::<Vec<_>>(), "order kept");
    gw.stop().await;
}

/// Answers the next command like a well-behaved cabinet.
async fn answer_command(cab: &mut Cabinet, status: CommandStatus) -> CommandAction {
    let frame = cab.recv_matching("command", |f| matches!(f.message, Message::Command(_))).await;
    let Message::Command(command) = frame.message else { unreachable!() };
    let result = CommandResult { status, door_id: 1, door_state: DoorStatus::Open };
    cab.send_frame(Frame::new(frame.seq, Message::CommandResult(result))).await;
    command.action
}

#[tokio::test]
async fn commands_reach_the_cabinet_and_results_come_back() {
    let env = Env::single().await;
    let gw = env.start("gw-a").await;
    let mut cab = logged_in(&env, &gw, "CAB-10").await;
    let device = key(&cab.id);
    let order = OrderId::new("ORD-7").unwrap();
    let body = CommandBody::Cabinet(CommandAction::OpenDoor { door_id: 1, order_id: order.clone() });
    let (reply, action) =
        tokio::join!(env.command(&device, body, Duration::from_secs(5)), answer_command(&mut cab, CommandStatus::Ok));
    assert_eq!(action, CommandAction::OpenDoor { door_id: 1, order_id: order });
    assert_eq!(
        reply.outcome,
        Outcome::Cabinet(CommandResult { status: CommandStatus::Ok, door_id: 1, door_state: DoorStatus::Open })
    );
    assert_eq!(reply.node, "gw-a");
    assert_eq!(metric(&gw, "gateway_commands_total", &[("protocol", "cabinet"), ("outcome", "answered")]), 1.0);
    gw.stop().await;
}

#[tokio::test]
async fn not_connected_and_timed_out_are_explicit() {
    let env = Env::single().await;
    let gw = env.start("gw-a").await;
    let query = CommandBody::Cabinet(CommandAction::QueryDoor { door_id: 1 });

    // Not connected here: answered at once, long before the 30 s deadline.
    let absent = DeviceKey::Cabinet(DeviceId::new("CAB-ABSENT").unwrap());
    let started = tokio::time::Instant::now();
    let reply = env.command_via("gw-a", &absent, query.clone(), Duration::from_secs(30)).await;
    assert_eq!(reply.outcome, Outcome::NotConnected);
    assert!(started.elapsed() < Duration::from_secs(5));

    // Connected but mute: timed out at the deadline.
    let mut cab = logged_in(&env, &gw, "CAB-11").await;
    let device = key(&cab.id);
    let started = tokio::time::Instant::now();
    let (reply, frame) = tokio::join!(
        env.command(&device, query, Duration::from_millis(800)),
        cab.recv_matching("command", |f| matches!(f.message, Message::Command(_)))
    );
    assert_eq!(reply.outcome, Outcome::TimedOut);
    assert!(started.elapsed() >= Duration::from_millis(800));
    // A late answer is counted, not forwarded.
    let late = CommandResult { status: CommandStatus::Ok, door_id: 1, door_state: DoorStatus::Closed };
    cab.send_frame(Frame::new(frame.seq, Message::CommandResult(late))).await;
    let seq = cab.send(Message::Heartbeat(Heartbeat { device_time_ms: 1 })).await;
    cab.recv_matching("heartbeat ack", |f| f.seq == seq).await;
    assert_eq!(
        metric(&gw, "gateway_frames_rejected_total", &[("protocol", "cabinet"), ("reason", "unmatched_result")]),
        1.0
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_full_command_queue_answers_busy() {
    let env = Env::single().await;
    let mut config = env.config("gw-a");
    config.cabinet.command_queue_len = 1;
    let gw = env.start_with(config).await;
    let cab = logged_in(&env, &gw, "CAB-12").await;
    let device = key(&cab.id);
    let handle = gw.ctx.registry.get(&device).expect("session registered");
    let query = CommandBody::Cabinet(CommandAction::QueryDoor { door_id: 1 });
    // On this single-threaded test runtime the session cannot run between these lines, so the
    // first command fills its queue and the second meets a full one.
    let first = gateway::session::Downlink {
        request_id: "first".into(),
        reply_to: String::new(),
        deadline_ms: gateway::clock::now_ms() + 5000,
        received: tokio::time::Instant::now(),
        body: query.clone(),
    };
    assert!(handle.push(first).is_ok());
    let reply_to = env.keys.replies("busy-test");
    gateway::routing::dispatch(
        &gw.ctx,
        protocol::bus::CommandRequest {
            request_id: "second".into(),
            device: device.clone(),
            deadline_ms: gateway::clock::now_ms() + 5000,
            reply_to: reply_to.clone(),
            body: query,
        },
    );
    let reply = env.wait_reply(&reply_to, common::WAIT).await;
    assert_eq!(reply.request_id, "second");
    assert_eq!(reply.outcome, Outcome::Busy);
    assert_eq!(metric(&gw, "gateway_commands_total", &[("protocol", "cabinet"), ("outcome", "busy")]), 1.0);
    drop(cab);
    gw.stop().await;
}

#[tokio::test]
async fn drain_moves_cabinets_away_and_loses_nothing() {
    let mut env = Env::single().await;
    let gw = env.start("gw-a").await;
    let mut cab = logged_in(&env, &gw, "CAB-13").await;
    let id = cab.id.clone();
    let event =
        DoorEvent { door_id: 2, state: DoorState::Closed, event_time_ms: gateway::clock::now_ms(), order_id: None };
    let seq = cab.send(Message::DoorEvent(event.clone())).await;
    assert!(matches!(cab.recv().await, Some(Frame { seq: s, message: Message::Ack, .. }) if s == seq));

    gw.shutdown();
    let notice = cab.recv_matching("notice", |f| matches!(f.message, Message::Notice(_))).await;
    let Message::Notice(n) = notice.message else { unreachable!() };
    assert_eq!(n.kind, NoticeKind::Reconnect);
    assert!(n.delay_ms < 300);
    assert!(cab.until_closed().await.is_empty());
    gw.wait().await;

    // The acknowledged event and the close are upstream; the map no longer names the node.
    env.wait_upstream(
        "door event",
        |e| matches!(e, UpEvent::Cabinet { message: Message::DoorEvent(d), .. } if *d == event),
    )
    .await;
    env.wait_upstream("close", |e| matches!(e, UpEvent::SessionClosed { reason, .. } if reason == "drain")).await;
    assert_eq!(env.map_entry(&key(&id)).await.get("node"), None);
    let mut con = env.redis.clone();
    let alive: bool = redis::cmd("EXISTS").arg(env.keys.node_alive("gw-a")).query_async(&mut con).await.unwrap();
    assert!(!alive, "liveness key removed");
}

#[tokio::test]
async fn metrics_endpoint_serves_prometheus_text() {
    let env = Env::single().await;
    let gw = env.start("gw-a").await;
    let _cab = logged_in(&env, &gw, "CAB-14").await;
    let addr = gw.addresses.metrics.unwrap();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut body = String::new();
    tcp.read_to_string(&mut body).await.unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("gateway_connections_open{protocol=\"cabinet\"} 1"), "{body}");
    assert!(body.contains("# HELP gateway_connections_open"));
    let info = format!("gateway_node_info{{node=\"gw-a\",version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    assert!(body.contains(&info), "{body}");
    gw.stop().await;
}

#[tokio::test]
async fn cabinets_log_in_over_tls() {
    use futures_util::{SinkExt, StreamExt};
    use rustls_pki_types::pem::PemObject;

    let env = Env::single().await;
    let pki = testkit::pki::Pki::new("unused");
    let mut config = env.config("gw-a");
    config.cabinet.tls_listen = "127.0.0.1:0".into();
    config.cabinet.tls_cert = pki.path("server.pem");
    config.cabinet.tls_key = pki.path("server.key");
    let gw = env.start_with(config).await;
    let (id, secret) = env.provision_cabinet("CAB-TLS").await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from_pem_file(pki.path("ca.pem")).unwrap()).unwrap();
    let client =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(gw.addresses.cabinet_tls.unwrap()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let mut framed = tokio_util::codec::Framed::new(tls, protocol::cabinet::CabinetCodec::default());

    let login = Login::sign(id, "2.0.0", gateway::clock::now_ms(), &secret).unwrap();
    framed.send(Frame::new(1, Message::Login(login))).await.unwrap();
    let answer = framed.next().await.expect("answer").expect("valid").expect("frame");
    assert!(matches!(answer.message, Message::LoginResult(r) if r.status == LoginStatus::Accepted));
    framed.send(Frame::new(2, Message::Heartbeat(Heartbeat { device_time_ms: 0 }))).await.unwrap();
    let ack = framed.next().await.expect("answer").expect("valid").expect("frame");
    assert_eq!(ack.seq, 2);
    assert!(matches!(ack.message, Message::HeartbeatAck(_)));

    // A plain-TCP client on the TLS port never gets a session.
    let mut plain = Cabinet::connect(gw.addresses.cabinet_tls.unwrap(), &DeviceId::new("CAB-TLS").unwrap()).await;
    plain.send(Message::Heartbeat(Heartbeat { device_time_ms: 0 })).await;
    assert!(plain.until_closed().await.is_empty());
    assert_eq!(metric(&gw, "gateway_tls_handshake_failures_total", &[("protocol", "cabinet")]), 1.0);
    gw.stop().await;
}

#[tokio::test]
async fn the_connection_limit_holds_excess_connections_back() {
    let env = Env::single().await;
    let mut config = env.config("gw-a");
    config.cabinet.max_connections = 1;
    let gw = env.start_with(config).await;
    let first = logged_in(&env, &gw, "CAB-L1").await;
    let (id, secret) = env.provision_cabinet("CAB-L2").await;

    // The second connection waits in the backlog: its login is not read while the first lives.
    let mut second = Cabinet::connect(gw.addresses.cabinet.unwrap(), &id).await;
    let login = Login::sign(id.clone(), "1.0.0", gateway::clock::now_ms(), &secret).unwrap();
    second.send(Message::Login(login)).await;
    let early = tokio::time::timeout(Duration::from_millis(300), second.recv()).await;
    assert!(early.is_err(), "no answer while the limit is reached");
    assert!(
        metric(&gw, "gateway_admission_delays_total", &[("protocol", "cabinet"), ("reason", "connection_limit")])
            >= 1.0
    );

    // Room again: the waiting connection is taken and served.
    drop(first);
    let answer = second.recv().await.expect("answered once admitted");
    assert!(matches!(answer.message, Message::LoginResult(r) if r.status == LoginStatus::Accepted));
    gw.stop().await;
}

#[tokio::test]
async fn a_device_time_far_from_the_gateways_clock_is_refused_and_counted() {
    let mut env = Env::single().await;
    let gw = env.start("gw-a").await;
    let mut cab = logged_in(&env, &gw, "CAB-CLOCK").await;
    let now = gateway::clock::now_ms();
    // Around the year 2106: a reading that would win every "newest" comparison downstream.
    let far = WeightReport {
        door_id: 1,
        sample_time_ms: 4_300_000_000_000,
        lanes: vec![LaneWeight { lane_id: 1, grams: 1000, stable: true }],
    };
    let seq = cab.send_frame_ack(Message::WeightReport(far)).await;
    let answer = cab.recv_matching("error", |f| f.seq == seq).await;
    assert!(matches!(&answer.message, Message::Error(e) if e.code == ErrorCode::Malformed), "{answer:?}");
    let late = DoorEvent { door_id: 1, state: DoorState::Closed, event_time_ms: now - 3_600_000, order_id: None };
    let seq = cab.send(Message::DoorEvent(late)).await;
    let answer = cab.recv_matching("error", |f| f.seq == seq).await;
    assert!(matches!(&answer.message, Message::Error(e) if e.code == ErrorCode::Malformed), "{answer:?}");
    // The session goes on: a reading on time is acknowledged and forwarded.
    let fine = WeightReport {
        door_id: 1,
        sample_time_ms: now,
        lanes: vec![LaneWeight { lane_id: 1, grams: 990, stable: true }],
    };
    let seq = cab.send_frame_ack(Message::WeightReport(fine)).await;
    assert!(matches!(cab.recv_matching("ack", |f| f.seq == seq).await.message, Message::Ack));
    env.wait_upstream("the reading on time", |e| {
        matches!(e, UpEvent::Cabinet { message: Message::WeightReport(_), .. })
    })
    .await;
    let cabinet_events = env.upstream().await.into_iter().filter(|e| matches!(e, UpEvent::Cabinet { .. })).count();
    assert_eq!(cabinet_events, 1, "neither refused frame travelled on");
    assert_eq!(metric(&gw, "gateway_frames_rejected_total", &[("protocol", "cabinet"), ("reason", "clock_skew")]), 2.0);
    gw.stop().await;
}

#[tokio::test]
async fn an_epoch_does_not_go_back_when_redis_lost_the_connection_map() {
    let mut env = Env::single().await;
    let gw = env.start("gw-a").await;
    let (id, secret) = env.provision_cabinet("CAB-EPOCH").await;
    let (cab, _) = Cabinet::login(gw.addresses.cabinet.unwrap(), &id, &secret).await;
    let first: u64 = env.map_entry(&key(&id)).await.get("epoch").unwrap().parse().unwrap();
    drop(cab);
    env.wait_upstream("the close", |e| matches!(e, UpEvent::SessionClosed { .. })).await;
    // Redis restarted empty: the entry, with its epoch, is gone.
    let _: () = redis::cmd("DEL").arg(env.keys.conn(&key(&id))).query_async(&mut env.redis.clone()).await.unwrap();
    let (_cab, result) = Cabinet::login(gw.addresses.cabinet.unwrap(), &id, &secret).await;
    assert_eq!(result.status, LoginStatus::Accepted);
    let second: u64 = env.map_entry(&key(&id)).await.get("epoch").unwrap().parse().unwrap();
    assert!(second > first, "the new session's epoch is above the lost one: {second} > {first}");
    gw.stop().await;
}
