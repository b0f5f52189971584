//! Several device-service instances: every offline check made by one of them, and the work of
//! an instance killed mid-batch taken over by another, nothing lost, nothing applied twice; a
//! frozen instance's row locks released by the server.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

use common::*;
use device_svc::DeviceService;
use protocol::bus::Keys;
use redis_conn::{RedisConn, RedisTarget};
use serde_json::json;

fn metrics_of(svc: &DeviceService) -> String {
    svc.app.metrics.render()
}

#[tokio::test]
async fn two_instances_judge_each_silent_cabinet_once() {
    let stack = Stack::new().await;
    let one = stack.service("svc-1").await;
    let two = stack.service("svc-2").await;
    let mut fleet = Vec::new();
    for n in 0..40 {
        let (id, secret) = register_cabinet(
            stack.api(if n % 2 == 0 { one.addr } else { two.addr }),
            &format!("cab-two-{n}"),
            &[(1, 1)],
        )
        .await;
        fleet.push(Beating::start(login(stack.cabinet_addr(), &id, &secret).await));
    }
    wait_until("a healthy node, seen by both", WAIT, || async {
        let healthy = |svc: &DeviceService| metric(&metrics_of(svc), "devsvc_node_healthy{node=\"gw-a\"}") == 1.0;
        (healthy(&one) && healthy(&two)).then_some(())
    })
    .await;

    let silent: Vec<String> = fleet.iter().step_by(10).map(|b| format!("cab:{}", b.id)).collect();
    for b in fleet.iter().step_by(10) {
        b.set_beating(false);
    }
    for key in &silent {
        let view = wait_status(stack.api(one.addr), key, "offline").await;
        assert_eq!(view["status_reason"], "heartbeat_timeout");
    }
    let checks = |svc: &DeviceService| metric(&metrics_of(svc), "devsvc_deadline_checks_total");
    let decisions = |svc: &DeviceService| metric(&metrics_of(svc), "devsvc_offline_decisions_total");
    assert_eq!(checks(&one) + checks(&two), silent.len() as f64, "each expired deadline is checked by one instance");
    assert_eq!(decisions(&one) + decisions(&two), silent.len() as f64);
    let rows = stack
        .pg()
        .await
        .query(
            "SELECT device_key, count(*) FROM device_status_history WHERE reason = 'heartbeat_timeout' GROUP BY device_key",
            &[],
        )
        .await
        .unwrap();
    let recorded: HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(recorded.len(), silent.len());
    assert!(recorded.values().all(|n| *n == 1), "{recorded:?}");
    for b in fleet {
        b.close().await;
    }
    one.stop().await;
    two.stop().await;
}

/// Entries read by `consumer` and not acknowledged, over every shard.
async fn pending_of(stack: &Stack, consumer: Option<&str>) -> i64 {
    let mut con = stack.redis.clone();
    let mut total = 0;
    for shard in 0..4 {
        let stream = stack.keys.upstream(shard);
        let mut cmd = redis::cmd("XPENDING");
        cmd.arg(&stream).arg("device-svc").arg("-").arg("+").arg(100_000);
        if let Some(c) = consumer {
            cmd.arg(c);
        }
        let reply: redis::RedisResult<redis::streams::StreamPendingCountReply> = cmd.query_async(&mut con).await;
        total += reply.map(|r| r.ids.len() as i64).unwrap_or(0);
    }
    total
}

#[tokio::test]
async fn an_instance_killed_mid_batch_has_its_entries_taken_over_once() {
    let stack = Stack::new().await;
    let dir = std::env::temp_dir().join(testkit::unique_name("devsvc"));
    std::fs::create_dir_all(&dir).unwrap();

    // B runs in this process; A in a child process that will be killed.
    let b = stack.service("svc-b").await;
    let mut cabinets = Vec::new();
    for n in 0..5 {
        let (id, secret) = register_cabinet(stack.api(b.addr), &format!("cab-kill-{n}"), &[(1, 4)]).await;
        cabinets.push((id, secret));
    }
    let a = spawn_process(&stack.svc_config("svc-a"), &dir);
    wait_until("A consuming every shard", WAIT, || async {
        let mut con = stack.redis.clone();
        let mut shards = 0;
        for shard in 0..4 {
            let consumers: redis::RedisResult<redis::streams::StreamInfoConsumersReply> = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(stack.keys.upstream(shard))
                .arg("device-svc")
                .query_async(&mut con)
                .await;
            if consumers.is_ok_and(|c| c.consumers.iter().any(|c| c.name == "svc-a")) {
                shards += 1;
            }
        }
        (shards == 4).then_some(())
    })
    .await;

    // Readings cannot be stored while this transaction holds the table: whoever reads them
    // is stuck mid-batch, its entries pending.
    let mut locker = stack.pg().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE weight_reports IN ACCESS EXCLUSIVE MODE").await.unwrap();

    let mut sessions = Vec::new();
    let reports_per_cabinet = 20u64;
    for (id, secret) in &cabinets {
        let mut cabinet = login(stack.cabinet_addr(), id, secret).await;
        for i in 0..reports_per_cabinet {
            cabinet.send(report(1, 4, 100 + i32::try_from(i).unwrap(), i % 5 == 0, now_ms() - 100_000 + i * 300)).await;
        }
        sessions.push(cabinet);
    }
    wait_until("A holding unacknowledged entries", WAIT, || async {
        (pending_of(&stack, Some("svc-a")).await > 0).then_some(())
    })
    .await;
    drop(a); // SIGKILL, mid-batch
    lock.rollback().await.unwrap();

    let expected = i64::try_from(cabinets.len() as u64 * reports_per_cabinet * 4).unwrap();
    let pg = stack.pg().await;
    wait_until("every reading stored and nothing pending", std::time::Duration::from_secs(30), || async {
        let n: i64 = pg.query_one("SELECT count(*) FROM weight_readings", &[]).await.unwrap().get(0);
        (n == expected && pending_of(&stack, None).await == 0).then_some(())
    })
    .await;
    assert!(metric(&metrics_of(&b), "devsvc_stream_claimed_entries_total") > 0.0, "B took over A's entries");
    // Each login was applied once, whoever applied it and however often it was delivered.
    let opened = pg
        .query("SELECT device_key, count(*) FROM device_status_history WHERE reason = 'session_opened' GROUP BY device_key", &[])
        .await
        .unwrap();
    assert_eq!(opened.len(), cabinets.len());
    assert!(opened.iter().all(|r| r.get::<_, i64>(1) == 1));
    let n: i64 = pg.query_one("SELECT count(*) FROM weight_readings", &[]).await.unwrap().get(0);
    assert_eq!(n, expected);
    drop(sessions);
    b.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_frozen_session_holding_row_locks_is_ended_by_the_server() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);
    register_cabinet(api, "cab-frozen", &[(1, 1)]).await;
    // An instance that froze inside a transaction (SIGSTOP, a paused VM): it locked a row and
    // says nothing more. Its sessions carry the same server-side limits as every instance's.
    let cfg = device_svc::config::PostgresConfig {
        url: stack.db.url.clone(),
        pool_size: 1,
        idle_in_transaction_timeout_ms: 500,
        ..Default::default()
    };
    let frozen_pool = device_svc::db::pool(&cfg).unwrap();
    let mut frozen = frozen_pool.get().await.unwrap();
    let tx = frozen.transaction().await.unwrap();
    tx.execute("SELECT 1 FROM devices WHERE key = 'cab:cab-frozen' FOR UPDATE", &[]).await.unwrap();
    // The healthy instance's change to that row waits only until the server ends the frozen
    // session (it would otherwise fail at its own lock timeout, 5 s, as a 503).
    expect(api, "PUT", "/v1/devices/cab:cab-frozen/enabled", Some(json!({"enabled": false})), 204).await;
    assert!(tx.execute("SELECT 1", &[]).await.is_err(), "the frozen session was ended");
    svc.stop().await;
}

/// Ids of the entries `group` reads next (up to `count`), acknowledging the first `ack` of them.
async fn read_and_ack(redis: &mut RedisConn, stream: &str, group: &str, count: usize, ack: usize) {
    let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg("reader")
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(redis)
        .await
        .unwrap();
    let ids: Vec<String> = reply.keys.into_iter().flat_map(|k| k.ids).map(|e| e.id).take(ack).collect();
    if !ids.is_empty() {
        let _: i64 = redis::cmd("XACK").arg(stream).arg(group).arg(&ids).query_async(redis).await.unwrap();
    }
}

/// How many of `ids` are still in the stream.
async fn kept(redis: &mut RedisConn, stream: &str, ids: &[String]) -> usize {
    let range: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg(stream).arg(&ids[0]).arg(ids.last().unwrap()).query_async(redis).await.unwrap();
    range.ids.len()
}

#[tokio::test]
async fn upstream_streams_are_trimmed_only_below_what_every_group_acknowledged() {
    use device_svc::trim::trim_consumed;
    let ns = testkit::RedisNamespace::create();
    let mut redis = RedisConn::open(&RedisTarget::Single(ns.url.clone()), None).await.unwrap();
    let stream = Keys::new(ns.prefix.clone()).upstream(0);
    let mut pipe = redis::pipe();
    for n in 0..3000 {
        pipe.cmd("XADD").arg(&stream).arg("*").arg("n").arg(n);
    }
    let ids: Vec<String> = pipe.query_async(&mut redis).await.unwrap();

    // Nobody has read anything: nothing goes.
    assert_eq!(trim_consumed(&mut redis, &stream).await.unwrap(), 0);
    for group in ["device-svc", "audit"] {
        let _: () =
            redis::cmd("XGROUP").arg("CREATE").arg(&stream).arg(group).arg("0").query_async(&mut redis).await.unwrap();
    }
    // One group read 2,000 and acknowledged 1,500; the other read and acknowledged 1,000.
    read_and_ack(&mut redis, &stream, "device-svc", 2000, 1500).await;
    read_and_ack(&mut redis, &stream, "audit", 1000, 1000).await;
    let trimmed = trim_consumed(&mut redis, &stream).await.unwrap();
    assert!(trimmed > 0, "entries both groups acknowledged go");
    assert_eq!(kept(&mut redis, &stream, &ids[1000..]).await, 2000, "nothing the slower group still needs");

    // The slower group catches up: now the other's oldest unacknowledged entry is the floor.
    read_and_ack(&mut redis, &stream, "audit", 3000, 3000).await;
    trim_consumed(&mut redis, &stream).await.unwrap();
    assert_eq!(kept(&mut redis, &stream, &ids[1500..]).await, 1500, "nothing delivered and unacknowledged");
    assert!(kept(&mut redis, &stream, &ids).await < 1600);

    // Everything acknowledged by both: at most one internal node of entries stays.
    read_and_ack(&mut redis, &stream, "device-svc", 3000, 3000).await;
    let _: i64 =
        redis::cmd("XACK").arg(&stream).arg("device-svc").arg(&ids[1500..2000]).query_async(&mut redis).await.unwrap();
    trim_consumed(&mut redis, &stream).await.unwrap();
    let left: usize = redis::cmd("XLEN").arg(&stream).query_async(&mut redis).await.unwrap();
    assert!(left <= 100, "{left} entries left");
}
