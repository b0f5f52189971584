//! The coalesced connection against a real Redis: every call gets its own reply, and calls
//! made by many tasks at once reach Redis in a few writes, not one each. A counting relay
//! between the client and Redis sees the writes.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use redis_conn::{RedisConn, RedisTarget};

/// A relay to Redis on its own threads, counting the reads that brought client bytes (each is
/// at least one write of the client's, fewer when writes were merged in transit).
struct Relay {
    url: String,
    client_reads: Arc<AtomicUsize>,
}

fn relay_to(redis_url: &str) -> Relay {
    let target = redis_url.trim_start_matches("redis://").trim_end_matches('/').to_owned();
    let (host_port, db) = match target.split_once('/') {
        Some((hp, db)) => (hp.to_owned(), format!("/{db}")),
        None => (target, String::new()),
    };
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
    let url = format!("redis://{}{db}", listener.local_addr().expect("relay address"));
    let client_reads = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&client_reads);
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let Ok(mut server) = TcpStream::connect(&host_port) else { return };
            let (mut client_in, mut server_out) =
                (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
            let counter = Arc::clone(&counter);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = client_in.read(&mut buf) {
                    if n == 0 || server_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                let _ = server_out.shutdown(Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut server, &mut client);
                let _ = client.shutdown(Shutdown::Write);
            });
        }
    });
    Relay { url, client_reads }
}

/// `tasks` tasks, each setting and reading back its own key once, all started together; returns
/// how many reads the relay counted for them.
async fn set_and_get_from_tasks(redis: &RedisConn, relay: &Relay, tasks: usize) -> usize {
    let prefix = testkit::unique_name("coalesce");
    // One call first, so the connection is up before the counted ones.
    let mut warm = redis.clone();
    let _: () = redis::cmd("SET").arg(format!("{prefix}:warm")).arg(1).query_async(&mut warm).await.expect("SET");
    let before = relay.client_reads.load(Ordering::SeqCst);
    let gate = Arc::new(tokio::sync::Barrier::new(tasks));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..tasks {
        let (mut con, gate, key) = (redis.clone(), Arc::clone(&gate), format!("{prefix}:{i}"));
        set.spawn(async move {
            gate.wait().await;
            let (_, value): ((), String) = redis::pipe()
                .cmd("SET")
                .arg(&key)
                .arg(format!("value {i}"))
                .arg("EX")
                .arg(60)
                .cmd("GET")
                .arg(&key)
                .query_async(&mut con)
                .await
                .expect("SET and GET");
            assert_eq!(value, format!("value {i}"), "each task gets its own reply");
            let back: String = redis::cmd("GET").arg(&key).query_async(&mut con).await.expect("GET");
            assert_eq!(back, format!("value {i}"));
        });
    }
    while let Some(done) = set.join_next().await {
        done.expect("task");
    }
    relay.client_reads.load(Ordering::SeqCst) - before
}

// One worker, as a gateway pinned to one core runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn calls_from_many_tasks_leave_together_and_each_gets_its_reply() {
    const TASKS: usize = 200;
    let relay = relay_to(&testkit::redis_url());
    let plain = RedisConn::open(&RedisTarget::Single(relay.url.clone()), None).await.expect("open");
    let coalesced = plain.coalesced();
    let together = set_and_get_from_tasks(&coalesced, &relay, TASKS).await;
    // Two calls per task, in two rounds: a handful of writes, where one per call would be 400.
    assert!(together <= 20, "{TASKS} tasks' calls reached Redis in {together} reads");

    // The same calls made from each task directly: the relay sees them arrive far more apart
    // (the comparison shows the relay can tell the difference).
    let apart = set_and_get_from_tasks(&plain, &relay, TASKS).await;
    assert!(apart > together, "direct calls: {apart} reads, coalesced: {together}");
}

#[tokio::test]
async fn errors_and_scripts_pass_through() {
    let redis = RedisConn::open(&RedisTarget::Single(testkit::redis_url()), None).await.expect("open").coalesced();
    let mut con = redis.clone();
    let key = testkit::unique_name("coalesce-err");
    let _: () = redis::cmd("SET").arg(&key).arg("text").arg("EX").arg(60).query_async(&mut con).await.expect("SET");
    let wrong: redis::RedisResult<i64> = redis::cmd("INCR").arg(&key).query_async(&mut con).await;
    assert!(wrong.is_err(), "a command's error comes back to its caller: {wrong:?}");
    // A script not loaded yet: EVALSHA fails with NOSCRIPT, and the invocation loads it and
    // tries again, both through the funnel.
    let script = redis::Script::new(&format!("return redis.call('GET', KEYS[1]) .. '{key}'"));
    let got: String = script.key(&key).invoke_async(&mut con).await.expect("script");
    assert_eq!(got, format!("text{key}"));
    assert!(!redis.is_cluster());
}
