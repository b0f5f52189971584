//! Two cabinets with one identity, reconnecting the instant they are replaced (ignoring
//! `retry_after_s`: the worst a clone can do), against two gateway nodes and a device service,
//! while a well-behaved cabinet on the same upstream shard sends door events. Prints the
//! takeovers per second, the clone's status-history rows, and how long the bystander's events
//! took to reach the device service (the shard's lag).
//!
//! ```text
//! cargo run --release -p conformance --example clone_fight -- SECONDS [MAX_LOGINS]
//! ```
//! `MAX_LOGINS` sets `flapping.max_logins` (default 10, the shipped value; 1000000000 turns the
//! cool-down off, which is how the gateway behaved before it had one). Uses `DATABASE_URL` and
//! `REDIS_URL` like the tests, or the local servers.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use conformance::cabinet::{ACK_REQUESTED, VendorCabinet, door_event, frame, kind, login_payload, now_ms, status};
use conformance::stack::Stack;

const SHARDS: u32 = 4;

fn shard(id: &str) -> u32 {
    crc32c::crc32c(format!("cab:{id}").as_bytes()) % SHARDS
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(30);
    let max_logins: u32 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10);
    let stack = Arc::new(Stack::start(|c| c.flapping.max_logins = max_logins).await);
    let clone_id = "CAB-CLONE";
    let bystander_id = (0..).map(|n| format!("CAB-NEIGHBOUR-{n}")).find(|id| shard(id) == shard(clone_id)).unwrap();
    let secret = stack.register_cabinet(clone_id).await;
    let bystander_secret = stack.register_cabinet(&bystander_id).await;

    let stop = tokio::time::Instant::now() + Duration::from_secs(seconds);
    // One clock for both clones, so that no login is refused as a replay of the other's.
    let clock = Arc::new(AtomicU64::new(0));
    let mut clones = Vec::new();
    for node in 0..2 {
        let (stack, secret, clock) = (Arc::clone(&stack), secret.clone(), Arc::clone(&clock));
        clones.push(tokio::spawn(async move {
            let (mut accepted, mut refused) = (0u64, 0u64);
            while tokio::time::Instant::now() < stop {
                let mut cab = VendorCabinet::connect(stack.cabinet_addr(node), clone_id).await;
                let t = clock.fetch_max(now_ms(), Ordering::SeqCst).max(now_ms()) + 1;
                clock.fetch_max(t, Ordering::SeqCst);
                let seq = cab.next_seq();
                cab.send_raw(&frame(kind::LOGIN, 0, seq, &login_payload(clone_id, t, None, &secret))).await;
                match cab.recv_within(Duration::from_secs(10)).await {
                    Ok(Some(r)) if r.payload.first() == Some(&status::ACCEPTED) => {
                        accepted += 1;
                        // Until replaced (or the run ends), then at once again.
                        let left = stop.saturating_duration_since(tokio::time::Instant::now());
                        let _ = cab.closed_within(left).await;
                    }
                    _ => refused += 1,
                }
            }
            (accepted, refused)
        }));
    }

    // The bystander: a door event every 500 ms, each timed until the device service has it.
    let mut cab = VendorCabinet::connect(stack.cabinet_addr(0), &bystander_id).await;
    assert_eq!(cab.login_v1(&bystander_secret).await.0, status::ACCEPTED);
    let mut lags = Vec::new();
    let path = format!("/v1/anomalies?cabinet_id={bystander_id}&kind=event_without_order&limit=5");
    while tokio::time::Instant::now() < stop {
        let at = now_ms();
        cab.send(kind::DOOR_EVENT, ACK_REQUESTED, &door_event(1, false, at, "")).await;
        let started = tokio::time::Instant::now();
        let seen = |list: &serde_json::Value| {
            list.as_array().unwrap().iter().any(|a| a["detail"]["event"]["event_time_ms"].as_u64() == Some(at))
        };
        while !seen(&stack.get(&path).await) && started.elapsed() < Duration::from_secs(300) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        lags.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (mut accepted, mut refused) = (0, 0);
    for c in clones {
        let (a, r) = c.await.unwrap();
        accepted += a;
        refused += r;
    }
    let takeovers: f64 = (0..2)
        .flat_map(|n| ["local", "remote"].map(move |s| (n, s)))
        .map(|(n, scope)| stack.metric(n, &format!(r#"gateway_takeovers_total{{protocol="cabinet",scope="{scope}"}}"#)))
        .sum();
    let cooldowns: f64 =
        (0..2).map(|n| stack.metric(n, r#"gateway_flapping_cooldowns_total{protocol="cabinet"}"#)).sum();
    let rows: i64 = stack
        .db
        .client()
        .await
        .query_one("SELECT count(*) FROM device_status_history WHERE device_key = $1", &[&format!("cab:{clone_id}")])
        .await
        .unwrap()
        .get(0);
    lags.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "max_logins={max_logins} seconds={seconds} clone logins accepted={accepted} refused={refused} \
         takeovers={takeovers} ({:.1}/s) cooldowns={cooldowns} status rows={rows} \
         bystander events={} lag p50={:.0} ms max={:.0} ms",
        takeovers / seconds as f64,
        lags.len(),
        ms(lags[lags.len() / 2]),
        ms(*lags.last().unwrap()),
    );
}
