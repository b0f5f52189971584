//! The gateway is the core tier: Redis restarted under 1,000 connected cabinets drops no
//! connection; door events sent during the outage wait in the buffer unacknowledged (an ACK
//! means stored), and once Redis is back each is stored once and only then acknowledged.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{Cabinet, Env, metric};
use futures_util::future::join_all;
use protocol::bus::UpEvent;
use protocol::cabinet::{DoorEvent, DoorState, Frame, Heartbeat, LoginStatus, Message};

const CABINETS: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_drops_no_connection_and_loses_nothing() {
    let mut env = Env::private().await;
    let mut config = env.config("gw-a");
    config.cabinet.accept_rate_per_s = 10_000;
    let gw = env.start_with(config).await;
    let addr = gw.addresses.cabinet.unwrap();

    let mut devices = Vec::with_capacity(CABINETS);
    for i in 0..CABINETS {
        devices.push(env.provision_cabinet(&format!("CAB-{i:04}")).await);
    }
    let mut cabinets: Vec<Cabinet> = Vec::with_capacity(CABINETS);
    for chunk in devices.chunks(100) {
        for (cab, result) in join_all(chunk.iter().map(|(id, secret)| Cabinet::login(addr, id, secret))).await {
            assert_eq!(result.status, LoginStatus::Accepted);
            cabinets.push(cab);
        }
    }
    assert_eq!(metric(&gw, "gateway_connections_open", &[("protocol", "cabinet")]), CABINETS as f64);

    // Redis goes away (a crash: no persistence, it comes back empty).
    tokio::task::block_in_place(|| env.server_mut().stop());

    // Every cabinet keeps being served with Redis down: its heartbeat is answered at once. Its
    // door event, sent first, is not acknowledged: it is only in this process's memory.
    let t0 = gateway::clock::now_ms();
    let door_seqs = join_all(cabinets.iter_mut().enumerate().map(|(i, cab)| async move {
        let event = DoorEvent { door_id: 1, state: DoorState::Closed, event_time_ms: t0 + i as u64, order_id: None };
        let door_seq = cab.send(Message::DoorEvent(event)).await;
        let seq = cab.send(Message::Heartbeat(Heartbeat { device_time_ms: 0 })).await;
        let next = cab.recv().await.expect("an answer");
        assert!(matches!(next, Frame { message: Message::HeartbeatAck(_), .. }) && next.seq == seq, "{next:?}");
        door_seq
    }))
    .await;
    // The writer notices the outage on its next attempt.
    let deadline = tokio::time::Instant::now() + testkit::WAIT;
    while metric(&gw, "gateway_redis_errors_total", &[("op", "upstream")]) < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "the outage was not noticed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(gw.metrics.upstream_buffer.get() >= CABINETS as i64, "events wait in the buffer");

    tokio::task::block_in_place(|| env.server_mut().restart());

    // Back: every door event is acknowledged now, and each arrived once.
    join_all(cabinets.iter_mut().zip(&door_seqs).map(|(cab, seq)| async move {
        let ack = cab.recv_matching("ack", |f| f.seq == *seq).await;
        assert!(matches!(ack.message, Message::Ack), "{ack:?}");
    }))
    .await;
    let events = env
        .wait_upstream_count("door events", CABINETS, |e| {
            matches!(e, UpEvent::Cabinet { message: Message::DoorEvent(_), .. })
        })
        .await;
    let mut times: Vec<u64> = events
        .iter()
        .map(|e| match e {
            UpEvent::Cabinet { message: Message::DoorEvent(d), .. } => d.event_time_ms,
            _ => unreachable!(),
        })
        .collect();
    times.sort_unstable();
    assert_eq!(times, (t0..t0 + CABINETS as u64).collect::<Vec<_>>());
    assert_eq!(metric(&gw, "gateway_connections_open", &[("protocol", "cabinet")]), CABINETS as f64);
    assert_eq!(metric(&gw, "gateway_sessions_closed_total", &[("protocol", "cabinet"), ("reason", "io_error")]), 0.0);

    // And still served.
    let cab = &mut cabinets[0];
    let seq = cab.send(Message::Heartbeat(Heartbeat { device_time_ms: 0 })).await;
    cab.recv_matching("heartbeat ack", |f| f.seq == seq).await;
    drop(cabinets);
    gw.stop().await;
}
