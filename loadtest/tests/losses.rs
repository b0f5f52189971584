//! The harness counts what it sent and never saw answered: a cabinet against a server that
//! accepts its login and then answers nothing.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use loadtest::cabinet::{self, CabinetBehaviour, Target};
use loadtest::fleet_ids::{cabinet_id, cabinet_secret};
use loadtest::stats::Stats;
use protocol::OrderId;
use protocol::cabinet::{CabinetCodec, Command, CommandAction, DoorState, Frame, LoginResult, LoginStatus, Message};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

/// Accepts one cabinet, accepts its login, asks it to open door 1, then only listens: every
/// frame it receives goes to `seen`.
async fn silent_gateway(listener: TcpListener, seen: mpsc::UnboundedSender<Message>) {
    let (tcp, _) = listener.accept().await.unwrap();
    let mut framed = Framed::new(tcp, CabinetCodec::default());
    let login = framed.next().await.unwrap().unwrap().unwrap();
    assert!(matches!(login.message, Message::Login(_)));
    let accepted = LoginResult {
        status: LoginStatus::Accepted,
        server_time_ms: cabinet::now_ms(),
        heartbeat_interval_s: 1,
        retry_after_s: 0,
    };
    framed.send(Frame::new(login.seq, Message::LoginResult(accepted))).await.unwrap();
    let open = Command {
        expires_at_ms: cabinet::now_ms() + 60_000,
        action: CommandAction::OpenDoor { door_id: 1, order_id: OrderId::new("ORDER-1").unwrap() },
    };
    framed.send(Frame::new(1, Message::Command(open))).await.unwrap();
    while let Some(Ok(Ok(frame))) = framed.next().await {
        if seen.send(frame.message).is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn unanswered_heartbeats_and_unacknowledged_door_events_are_counted() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let server = tokio::spawn(silent_gateway(listener, seen_tx));

    let stats = Arc::new(Stats::default());
    let stop = CancellationToken::new();
    // Heartbeats every 200 ms; the shopper keeps the door open past the end of the test.
    // The stub answers a version-1 login only.
    let behaviour = CabinetBehaviour {
        login_version: 1,
        heartbeat: Duration::from_millis(200),
        door_open: Duration::from_secs(60),
        ..CabinetBehaviour::default()
    };
    let id = cabinet_id(0);
    let secret = cabinet_secret(&id);
    let device = tokio::spawn(cabinet::run(
        id,
        secret,
        Target { addr, all: Arc::new([addr]), source: None, tls: None },
        Arc::new(behaviour),
        Arc::clone(&stats),
        stop.clone(),
    ));

    let (mut heartbeats, mut door_opened) = (0, false);
    let waited = tokio::time::timeout(testkit::WAIT, async {
        while heartbeats < 3 || !door_opened {
            match seen.recv().await.unwrap() {
                Message::Heartbeat(_) => heartbeats += 1,
                Message::DoorEvent(e) if e.state == DoorState::Open => door_opened = true,
                _ => {}
            }
        }
    })
    .await;
    assert!(waited.is_ok(), "the cabinet sent 3 heartbeats and opened its door");
    stop.cancel();
    device.await.unwrap();
    server.abort();

    // The first two heartbeats were overtaken by the next unanswered; the third was in flight.
    assert_eq!(stats.count("heartbeats_sent"), 3);
    assert_eq!(stats.count("heartbeats_unanswered"), 2);
    assert_eq!(stats.count("heartbeat_acks"), 0);
    // The door event was never acknowledged (it would have been retried until it was).
    assert_eq!(stats.count("door_events_unacknowledged_at_stop"), 1);
}

/// Accepts one MQTT client, answers its CONNECT with CONNACK (MQTT 3.1.1, accepted), then
/// reads and discards everything: no SUBACK, no PUBACK.
async fn silent_broker(listener: TcpListener) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut tcp, _) = listener.accept().await.unwrap();
    let mut buf = vec![0u8; 4096];
    // The CONNECT fits one read.
    assert!(tcp.read(&mut buf).await.unwrap() > 0);
    tcp.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
    while tcp.read(&mut buf).await.is_ok_and(|n| n > 0) {}
}

#[tokio::test]
async fn uplinks_never_acknowledged_are_counted_lost() {
    use loadtest::vehicle::{self, Links, VehicleBehaviour};
    use tokio::sync::broadcast;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(silent_broker(listener));
    let stats = Arc::new(Stats::default());
    let stop = CancellationToken::new();
    let lost_after = Duration::from_millis(300);
    let behaviour = VehicleBehaviour { publish_per_s: 20.0, lost_after, ..VehicleBehaviour::default() };
    let (control, _) = broadcast::channel(1);
    let (qr_ids, _qr_rx) = mpsc::unbounded_channel();
    let links = Links { number: 0, control: control.subscribe(), qr_ids };
    let v = loadtest::fleet_ids::vin(0);
    let token = loadtest::fleet_ids::vehicle_token(&v);
    let device = tokio::spawn(vehicle::run(
        v,
        token,
        addr,
        Arc::new([addr]),
        Arc::new(behaviour),
        Arc::clone(&stats),
        links,
        stop.clone(),
    ));

    let waited = tokio::time::timeout(testkit::WAIT, async {
        while stats.count("uplinks_sent") < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "the vehicle published");
    // Let the first uplinks age past the limit (a point in time, not an event).
    tokio::time::sleep(lost_after * 2).await;
    stop.cancel();
    device.await.unwrap();
    server.abort();

    assert_eq!(stats.count("uplinks_acked"), 0);
    let (lost, in_flight) = (stats.count("uplinks_unacknowledged"), stats.count("uplinks_in_flight_at_stop"));
    assert!(lost >= 3, "at least the first three uplinks are lost: {lost} lost, {in_flight} in flight");
    assert_eq!(lost + in_flight, stats.count("uplinks_sent").min(32), "each unacknowledged uplink counted once");
}
