//! An acknowledgement means the data is in Redis (SPEC.md 1.4, 2.2): a gateway process killed
//! with `kill -9` mid-stream loses no acknowledged event, nor does a Redis killed with
//! `kill -9` that keeps its append-only file; a write round retried after Redis answered too
//! late is not stored twice; a stream at its cap holds writes instead of trimming them.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Env, metric};
use futures_util::{SinkExt, StreamExt};
use protocol::bus::UpEvent;
use protocol::cabinet::{DoorEvent, DoorState, Frame, LoginStatus, Message};
use testkit::cabinet::Cabinet;

/// Waits until `n` door events were acknowledged.
async fn until_acked(acked: &Mutex<Vec<u64>>, n: usize) {
    let deadline = tokio::time::Instant::now() + testkit::WAIT;
    while acked.lock().unwrap().len() < n {
        assert!(tokio::time::Instant::now() < deadline, "only {} of {n} acknowledged", acked.lock().unwrap().len());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Door events each cabinet keeps unacknowledged at most (below `cabinet.max_unconfirmed`).
const WINDOW: u64 = 8;

fn door_event(at_ms: u64) -> Message {
    Message::DoorEvent(DoorEvent { door_id: 1, state: DoorState::Closed, event_time_ms: at_ms, order_id: None })
}

/// The door event times in the upstream streams, with how often each was stored.
async fn stored_times(env: &mut Env) -> HashMap<u64, usize> {
    let mut times = HashMap::new();
    for e in env.upstream().await {
        if let UpEvent::Cabinet { message: Message::DoorEvent(d), .. } = e {
            *times.entry(d.event_time_ms).or_default() += 1;
        }
    }
    times
}

/// Sends door events `WINDOW` at a time and records the time of each one acknowledged, until
/// the connection ends or, after a whole window, `stop` is set.
async fn stream_door_events(mut cab: Cabinet, first_ms: u64, acked: Arc<Mutex<Vec<u64>>>, stop: Arc<AtomicBool>) {
    let mut sent: HashMap<u32, u64> = HashMap::new();
    for round in 0.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        for i in 0..WINDOW {
            let at = first_ms + round * WINDOW + i;
            let seq = cab.next_seq();
            if cab.framed.send(Frame::new(seq, door_event(at))).await.is_err() {
                return;
            }
            sent.insert(seq, at);
        }
        let mut answered = 0;
        while answered < WINDOW {
            match cab.framed.next().await {
                Some(Ok(Ok(Frame { seq, message: Message::Ack, .. }))) => {
                    acked.lock().unwrap().push(sent[&seq]);
                    answered += 1;
                }
                Some(Ok(Ok(_))) => {}
                _ => return,
            }
        }
    }
}

/// Twenty cabinets `NAME-00`.. logged in at `addr`, each streaming door events from its own
/// range of times after `t0` ([`stream_door_events`]).
async fn start_streaming(
    env: &Env,
    addr: SocketAddr,
    name: &str,
    t0: u64,
    acked: &Arc<Mutex<Vec<u64>>>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut fleet = Vec::new();
    for k in 0..20u64 {
        let (id, secret) = env.provision_cabinet(&format!("{name}-{k:02}")).await;
        let (cab, result) = Cabinet::login(addr, &id, &secret).await;
        assert_eq!(result.status, LoginStatus::Accepted);
        fleet.push(tokio::spawn(stream_door_events(cab, t0 + k * 10_000, Arc::clone(acked), Arc::clone(stop))));
    }
    fleet
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_event_is_lost_when_the_gateway_is_killed() {
    let mut env = Env::single().await;
    let config = env.config("gw-kill");
    let port = free_port();
    let dir = std::env::temp_dir().join(testkit::unique_name("gw-kill"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            "node_id = \"gw-kill\"\nkey_prefix = \"{}\"\n[redis]\nurl = \"{}\"\n[cabinet]\nlisten = \"127.0.0.1:{port}\"\n\
             [mqtt]\nlisten = \"\"\n[metrics]\nlisten = \"\"\n[upstream]\nshards = {}\n",
            config.key_prefix, config.redis.url, config.upstream.shards
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = tokio::time::Instant::now() + testkit::WAIT;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "the gateway did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Twenty cabinets stream door events, each with a window of them unacknowledged.
    let t0 = gateway::clock::now_ms();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let fleet = start_streaming(&env, addr, "CAB-KILL", t0, &acked, &Arc::new(AtomicBool::new(false))).await;
    // Mid-stream: once a few thousand were acknowledged, the process dies without a goodbye.
    until_acked(&acked, 2000).await;
    child.kill().unwrap();
    child.wait().unwrap();
    for cab in fleet {
        cab.await.unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);

    // Every acknowledged event is in Redis.
    let acked = acked.lock().unwrap().clone();
    let stored = stored_times(&mut env).await;
    let lost: Vec<u64> = acked.iter().copied().filter(|t| !stored.contains_key(t)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged events lost: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(acked.len() >= 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_retried_after_redis_answered_too_late_is_stored_once() {
    let mut env = Env::private().await;
    let gw = env.start("gw-a").await;
    let addr = gw.addresses.cabinet.unwrap();
    let (id, secret) = env.provision_cabinet("CAB-SLOW").await;
    let (mut cab, result) = Cabinet::login(addr, &id, &secret).await;
    assert_eq!(result.status, LoginStatus::Accepted);
    env.wait_upstream_count("the session opened", 1, |e| matches!(e, UpEvent::SessionOpened { .. })).await;

    // Redis holds every write for longer than the gateway waits for an answer (3 s): the round
    // times out, is retried, and the first attempt is carried out too once the pause ends.
    let url = env.server_mut().url();
    let mut admin = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(4500).arg("WRITE").query_async(&mut admin).await.unwrap();
    let t0 = gateway::clock::now_ms();
    let mut seqs = HashSet::new();
    for i in 0..20 {
        seqs.insert(cab.send(door_event(t0 + i)).await);
    }
    while !seqs.is_empty() {
        let frame = cab.recv_matching("ack", |f| matches!(f.message, Message::Ack)).await;
        assert!(seqs.remove(&frame.seq), "one ACK per event: {frame:?}");
    }
    assert!(
        metric(&gw, "gateway_redis_errors_total", &[("op", "upstream")]) >= 1.0,
        "the first attempt timed out (else this test shows nothing)"
    );
    let stored = stored_times(&mut env).await;
    let expected: HashMap<u64, usize> = (t0..t0 + 20).map(|t| (t, 1)).collect();
    assert_eq!(stored, expected, "each event stored exactly once");
    gw.stop().await;
}

#[tokio::test]
async fn a_stream_at_its_cap_holds_writes_instead_of_trimming_them() {
    let mut env = Env::single().await;
    let mut config = env.config("gw-a");
    config.upstream.stream_maxlen = 5;
    let gw = env.start_with(config).await;
    let (id, secret) = env.provision_cabinet("CAB-CAP").await;
    // The cabinet's shard is at its cap with entries its consumer has not read.
    let stream = env.keys.upstream(protocol::bus::DeviceKey::Cabinet(id.clone()).shard(env.shards));
    let mut redis = env.redis.clone();
    for n in 0..5 {
        let _: String =
            redis::cmd("XADD").arg(&stream).arg("*").arg("unread").arg(n).query_async(&mut redis).await.unwrap();
    }

    let (mut cab, result) = Cabinet::login(gw.addresses.cabinet.unwrap(), &id, &secret).await;
    assert_eq!(result.status, LoginStatus::Accepted);
    let t0 = gateway::clock::now_ms();
    let seq = cab.send(door_event(t0)).await;
    let deadline = tokio::time::Instant::now() + testkit::WAIT;
    while metric(&gw, "gateway_stream_cap_holds_total", &[("op", "upstream")]) < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "the write was not held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let early = tokio::time::timeout(Duration::from_millis(300), cab.recv()).await;
    assert!(early.is_err(), "no ACK while the event is held: {early:?}");
    let len: usize = redis::cmd("XLEN").arg(&stream).query_async(&mut redis).await.unwrap();
    assert_eq!(len, 5, "nothing unread was trimmed");

    // The consumer catches up and trims what it read: the held event is written and acknowledged.
    let _: i64 = redis::cmd("XTRIM").arg(&stream).arg("MAXLEN").arg(0).query_async(&mut redis).await.unwrap();
    let ack = cab.recv_matching("ack", |f| f.seq == seq).await;
    assert!(matches!(ack.message, Message::Ack), "{ack:?}");
    assert_eq!(stored_times(&mut env).await, HashMap::from([(t0, 1)]));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_event_is_lost_when_redis_is_killed_with_its_append_only_file() {
    let mut env = Env::private_durable().await;
    let mut config = env.config("gw-a");
    config.cabinet.accept_rate_per_s = 10_000;
    let gw = env.start_with(config).await;
    let addr = gw.addresses.cabinet.unwrap();
    let t0 = gateway::clock::now_ms();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let fleet = start_streaming(&env, addr, "CAB-AOF", t0, &acked, &stop).await;
    // Mid-stream, Redis dies without a goodbye and comes back from its append-only file.
    until_acked(&acked, 1000).await;
    tokio::task::block_in_place(|| env.server_mut().stop());
    let at_crash = acked.lock().unwrap().clone();
    tokio::task::block_in_place(|| env.server_mut().restart());
    // The fleet carries on; then it stops.
    until_acked(&acked, at_crash.len() + 1000).await;
    stop.store(true, Ordering::Relaxed);
    for cab in fleet {
        cab.await.unwrap();
    }

    let acked = acked.lock().unwrap().clone();
    let stored = stored_times(&mut env).await;
    let lost: Vec<u64> = acked.iter().copied().filter(|t| !stored.contains_key(t)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged events lost: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(at_crash.iter().all(|t| stored.contains_key(t)), "those acknowledged before the crash included");
    gw.stop().await;
}
