//! Weight streams through a real gateway: every reading stored, only stable ones cached.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use protocol::cabinet::{LaneWeight, Message, WeightReport};
use serde_json::Value;

async fn cached(api: Api, cabinet: &str) -> Vec<(u64, u64, i64, u64)> {
    let v = expect(api, "GET", &format!("/v1/cabinets/{cabinet}/weights"), None, 200).await;
    v["lanes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let n = |k: &str| l[k].as_u64().unwrap();
            (n("door_id"), n("lane_id"), l["grams"].as_i64().unwrap(), n("sample_ms"))
        })
        .collect()
}

#[tokio::test]
async fn unstable_readings_never_move_the_cache_and_every_reading_is_stored() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);
    let (id, secret) = register_cabinet(api, "cab-w-1", &[(1, 4), (2, 4)]).await;
    let mut cabinet = login(stack.cabinet_addr(), &id, &secret).await;
    let t0 = now_ms() - 60_000;

    // One stable reading per door: the cache holds it, with its sample time.
    cabinet.send(report(1, 4, 1000, true, t0)).await;
    cabinet.send(report(2, 4, 2000, true, t0)).await;
    let mut sent = 8;
    // Then a door opens: readings swing while the scales settle; none of them is stable.
    for i in 1..=100u64 {
        let grams = 1000 - i32::try_from(i).unwrap() * 7;
        cabinet.send(report(1, 4, grams, false, t0 + i * 300)).await;
        sent += 4;
    }
    // A stable reading older than the cached one (a late, reordered report) is stored but
    // does not replace the newer one.
    cabinet.send(report(2, 4, 1, true, t0 - 10_000)).await;
    sent += 4;
    let pg = stack.pg().await;
    wait_until("every reading stored", WAIT, || async {
        let n: i64 = pg.query_one("SELECT count(*) FROM weight_readings", &[]).await.unwrap().get(0);
        (n == sent).then_some(())
    })
    .await;
    let lanes = cached(api, "cab-w-1").await;
    assert_eq!(lanes.len(), 8);
    for (door, _, grams, sample) in &lanes {
        assert_eq!(*grams, if *door == 1 { 1000 } else { 2000 });
        assert_eq!(*sample, t0);
    }

    // The door closes and the scales settle: the new stable weight replaces the cached one.
    cabinet.send(report(1, 4, 650, true, t0 + 31_000)).await;
    sent += 4;
    wait_until("the settled weight cached", WAIT, || async {
        let lanes = cached(api, "cab-w-1").await;
        lanes.iter().filter(|l| l.0 == 1).all(|l| l.2 == 650 && l.3 == t0 + 31_000).then_some(())
    })
    .await;
    let n: i64 = pg.query_one("SELECT count(*) FROM weight_readings", &[]).await.unwrap().get(0);
    assert_eq!(n, sent);
    let stable: i64 = pg.query_one("SELECT count(*) FROM weight_readings WHERE stable", &[]).await.unwrap().get(0);
    assert_eq!(stable, 16);

    // A lane's history over a time range, oldest first.
    let path = format!("/v1/cabinets/cab-w-1/doors/1/lanes/2/readings?from_ms={}&to_ms={}", t0 + 300, t0 + 3001);
    let history = expect(api, "GET", &path, None, 200).await;
    let grams: Vec<i64> = history.as_array().unwrap().iter().map(|r| r["grams"].as_i64().unwrap()).collect();
    assert_eq!(grams, (1..=10).map(|i| 1000 - i * 7).collect::<Vec<_>>());
    assert!(history.as_array().unwrap().iter().all(|r| r["stable"] == Value::Bool(false)));
    let e = expect(api, "GET", "/v1/cabinets/cab-w-1/doors/1/lanes/2/readings?from_ms=5&to_ms=4", None, 400).await;
    assert_eq!(e["field"], "from_ms");

    let metrics = metrics_text(api).await;
    assert_eq!(metric(&metrics, "devsvc_weight_readings_persisted_total"), sent as f64);
    svc.stop().await;
}

#[tokio::test]
async fn a_report_delivered_twice_is_stored_once_and_a_split_door_is_stored_whole() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);
    let (id, secret) = register_cabinet(api, "cab-w-3", &[(1, 4)]).await;
    let mut cabinet = login(stack.cabinet_addr(), &id, &secret).await;
    let t0 = now_ms() - 30_000;
    let pg = stack.pg().await;
    let stored = || async {
        let n: i64 = stack.pg().await.query_one("SELECT count(*) FROM weight_readings", &[]).await.unwrap().get(0);
        n
    };

    cabinet.send(report(1, 4, 500, true, t0)).await;
    wait_until("the first report stored", WAIT, || async { (stored().await == 4).then_some(()) }).await;
    // The same report again (a cabinet resending it), beside a new one: the new one is stored,
    // the repeated one is counted and not stored twice.
    cabinet.send(report(1, 4, 500, true, t0)).await;
    cabinet.send(report(1, 4, 480, true, t0 + 300)).await;
    // A door whose lanes come in two reports read at the same time: both are kept.
    let part = |lanes: std::ops::RangeInclusive<u8>, grams| {
        Message::WeightReport(WeightReport {
            door_id: 1,
            sample_time_ms: t0 + 600,
            lanes: lanes.map(|lane_id| LaneWeight { lane_id, grams, stable: true }).collect(),
        })
    };
    cabinet.send(part(1..=2, 470)).await;
    cabinet.send(part(3..=4, 460)).await;
    wait_until("every new reading stored", WAIT, || async { (stored().await == 12).then_some(()) }).await;
    // Counted right after the rows are committed: awaited, not assumed.
    wait_until("the repeated report counted, the new readings counted once", WAIT, || async {
        let text = &metrics_text(api).await;
        (metric(text, "devsvc_weight_reports_duplicate_total") == 1.0
            && metric(text, "devsvc_weight_readings_persisted_total") == 12.0)
            .then_some(())
    })
    .await;
    let reports: i64 = pg.query_one("SELECT count(*) FROM weight_reports", &[]).await.unwrap().get(0);
    assert_eq!(reports, 4, "one row per report");
    let lanes = cached(api, "cab-w-3").await;
    assert_eq!(lanes.iter().map(|l| l.2).collect::<Vec<_>>(), vec![470, 470, 460, 460]);
    // A lane's history reads the lane out of each report.
    let path = format!("/v1/cabinets/cab-w-3/doors/1/lanes/3/readings?from_ms={t0}&to_ms={}", t0 + 601);
    let history = expect(api, "GET", &path, None, 200).await;
    let grams: Vec<i64> = history.as_array().unwrap().iter().map(|r| r["grams"].as_i64().unwrap()).collect();
    assert_eq!(grams, vec![500, 480, 460]);
    svc.stop().await;
}

#[tokio::test]
async fn readings_of_a_day_without_a_partition_are_kept_and_moved_when_it_is_created() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);
    register_cabinet(api, "cab-w-2", &[(1, 2)]).await;
    // Ten days ahead: no partition yet, so the default partition takes it. (Stored directly: a
    // gateway refuses a cabinet time that far from its clock, SPEC.md 1.7.)
    let pg = stack.pg().await;
    pg.batch_execute(
        "INSERT INTO weight_reports (cabinet_id, door_id, sample_time, lane_ids, grams, stable, received_at)
         VALUES ('cab-w-2', 1, now() + interval '10 days', '{1,2}', '{42,42}', '{t,t}', now())",
    )
    .await
    .unwrap();
    let n: i64 = pg.query_one("SELECT count(*) FROM weight_reports_default", &[]).await.unwrap().get(0);
    assert_eq!(n, 1, "the default partition took the report");
    svc.stop().await;

    // A partition past the retention period (30 days by default).
    let old_day = now_ms() / 86_400_000 - 40;
    pg.batch_execute(&format!(
        "CREATE TABLE weight_reports_d{old_day} PARTITION OF weight_reports
           FOR VALUES FROM (to_timestamp({old_day} * 86400)) TO (to_timestamp({} * 86400))",
        old_day + 1
    ))
    .await
    .unwrap();

    // An instance configured to create partitions further ahead moves the readings into theirs,
    // and drops the expired one.
    let mut config = stack.svc_config("svc-2");
    config.weights.partitions_ahead_days = 12;
    let svc = stack.service_with(config).await;
    let in_default: i64 = pg.query_one("SELECT count(*) FROM weight_reports_default", &[]).await.unwrap().get(0);
    let total: i64 = pg.query_one("SELECT count(*) FROM weight_readings", &[]).await.unwrap().get(0);
    assert_eq!((in_default, total), (0, 2));
    let partitions: i64 = pg
        .query_one("SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhparent WHERE c.relname = 'weight_reports'", &[])
        .await
        .unwrap()
        .get(0);
    // Yesterday to 12 days ahead, plus the default partition; the expired one is gone.
    assert_eq!(partitions, 15);
    let expired = pg
        .query_opt("SELECT 1 FROM pg_class WHERE relname = $1", &[&format!("weight_reports_d{old_day}")])
        .await
        .unwrap();
    assert!(expired.is_none());
    svc.stop().await;
}

#[tokio::test]
async fn a_reading_stamped_far_from_the_gateways_clock_never_reaches_the_cache() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);
    register_cabinet(api, "cab-w-9", &[(1, 1)]).await;
    let device = protocol::DeviceId::new("cab-w-9").unwrap();
    let stream = stack.keys.upstream(protocol::bus::DeviceKey::Cabinet(device.clone()).shard(4));
    let now = now_ms();
    // As a gateway without the edge check would pass them on: a stable reading stamped around
    // the year 2106 (it would win every "newest" comparison), then one on time.
    let mut redis = stack.redis.clone();
    for (grams, sample) in [(5, 4_300_000_000_000), (990, now)] {
        let event = protocol::bus::UpEvent::Cabinet {
            device: device.clone(),
            epoch: 1,
            node: "gw-x".into(),
            at_ms: now,
            seq: 1,
            message: report(1, 1, grams, true, sample),
        };
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg(event.to_fields().unwrap())
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    let lanes = wait_until("the reading on time cached", WAIT, || async {
        let lanes = cached(api, "cab-w-9").await;
        (!lanes.is_empty()).then_some(lanes)
    })
    .await;
    assert_eq!(lanes, vec![(1, 1, 990, now)], "the far reading was neither cached nor allowed to shadow the cache");
    let stored: i64 = stack.pg().await.query_one("SELECT count(*) FROM weight_readings", &[]).await.unwrap().get(0);
    assert_eq!(stored, 1);
    let metrics = metrics_text(api).await;
    let counted = metric(&metrics, "devsvc_stream_entries_total{result=\"clock_skew\",type=\"weight_report\"}");
    assert_eq!(counted, 1.0);
    svc.stop().await;
}

#[tokio::test]
async fn readings_stored_before_the_upgrade_become_one_row_per_report() {
    let db = testkit::TestDatabase::create().await;
    let cfg = device_svc::config::PostgresConfig { url: db.url.clone(), pool_size: 1, ..Default::default() };
    let pool = device_svc::db::pool(&cfg).unwrap();
    // The schema before readings were stored one row per report, with a day partition and a
    // reading that fell into the default one.
    device_svc::db::migrate_to(&pool, 20).await.unwrap();
    let pg = db.client().await;
    pg.batch_execute(
        "CREATE TABLE weight_readings_d20788 PARTITION OF weight_readings
           FOR VALUES FROM ('2026-12-02 00:00:00+00') TO ('2026-12-03 00:00:00+00');
         INSERT INTO weight_readings
           SELECT 'cab-u', 1, lane, 100 * lane, lane % 2 = 0, '2026-12-02 10:00:00+00', now() FROM generate_series(4, 1, -1) lane;
         INSERT INTO weight_readings VALUES ('cab-u', 2, 1, 7, true, '2026-12-02 10:00:00.3+00', now());
         INSERT INTO weight_readings VALUES ('cab-u', 1, 1, 5, true, '2031-01-01 00:00:00+00', now());",
    )
    .await
    .unwrap();

    assert_eq!(device_svc::db::migrate(&pool).await.unwrap(), device_svc::db::MIGRATION_COUNT - 20);
    let rows = pg
        .query(
            "SELECT tableoid::regclass::text, door_id, lane_ids, grams, stable FROM weight_reports
              ORDER BY sample_time, door_id",
            &[],
        )
        .await
        .unwrap();
    // (partition, door, lanes, grams, stable)
    type Report = (String, i16, Vec<i16>, Vec<i32>, Vec<bool>);
    let reports: Vec<Report> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))).collect();
    assert_eq!(
        reports,
        vec![
            (
                "weight_reports_d20788".into(),
                1,
                vec![1, 2, 3, 4],
                vec![100, 200, 300, 400],
                vec![false, true, false, true]
            ),
            ("weight_reports_d20788".into(), 2, vec![1], vec![7], vec![true]),
            ("weight_reports_default".into(), 1, vec![1], vec![5], vec![true]),
        ]
    );
    // One row per lane reading, as before, through the view.
    let lanes: i64 = pg.query_one("SELECT count(*) FROM weight_readings", &[]).await.unwrap().get(0);
    assert_eq!(lanes, 6);
}
