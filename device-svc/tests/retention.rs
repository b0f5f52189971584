//! Retention sweeps against a real PostgreSQL: old operational logs go, recent ones and
//! messages not yet relayed stay, and a retention of 0 days keeps everything.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use device_svc::retention;

/// `n` rows in each swept log, `days` old; returns nothing (the tables are counted after).
async fn insert_logs(pg: &tokio_postgres::Client, tag: &str, n: i32, days: i32) {
    for i in 0..n {
        pg.execute(
            "INSERT INTO device_status_history (device_key, from_status, to_status, reason, epoch, at)
             VALUES ('cab:cab-r-1', 'online', 'offline', 'test', $1, now() - make_interval(days => $2))",
            &[&i64::from(i), &days],
        )
        .await
        .unwrap();
        pg.execute(
            "INSERT INTO ota_reports (entry, task_id, vin, kind, payload, applied, received_at)
             VALUES ($1, 't', 'LSVAU2180N2183294', 'status', '{}', 'applied', now() - make_interval(days => $2))",
            &[&format!("{tag}-{i}"), &days],
        )
        .await
        .unwrap();
        pg.execute(
            "INSERT INTO outbox (stream, idem_key, payload, created_at, published_at, done_at)
             VALUES ('notices', $1, '{}', now() - make_interval(days => $2), now() - make_interval(days => $2),
                     now() - make_interval(days => $2))",
            &[&format!("{tag}-{i}"), &days],
        )
        .await
        .unwrap();
    }
}

async fn count(pg: &tokio_postgres::Client, table: &str) -> i64 {
    pg.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.unwrap().get(0)
}

/// Rows in the three swept logs: status history, OTA reports, outbox.
async fn counts(pg: &tokio_postgres::Client) -> [i64; 3] {
    [count(pg, "device_status_history").await, count(pg, "ota_reports").await, count(pg, "outbox").await]
}

/// A device service keeping status history, OTA reports and relayed outbox messages this many
/// days, with the cabinet the history rows belong to registered.
async fn keeping(stack: &Stack, [history, reports, outbox]: [u32; 3], batch_rows: u32) -> device_svc::DeviceService {
    let mut config = stack.svc_config("svc-1");
    config.retention.status_history_days = history;
    config.retention.ota_reports_days = reports;
    config.retention.outbox_published_days = outbox;
    config.retention.batch_rows = batch_rows;
    let svc = stack.service_with(config).await;
    register_cabinet(stack.api(svc.addr), "cab-r-1", &[(1, 2)]).await;
    svc
}

#[tokio::test]
async fn logs_past_their_age_are_deleted_in_batches_and_the_rest_kept() {
    let stack = Stack::new().await;
    let svc = keeping(&stack, [30, 60, 7], 2).await;
    let pg = stack.pg().await;
    let before = counts(&pg).await;
    insert_logs(&pg, "old", 5, 90).await; // past every retention
    insert_logs(&pg, "mid", 3, 40).await; // past the history's and the outbox's, within the reports'
    insert_logs(&pg, "new", 2, 1).await; // within every retention
    // Created 100 days ago and not yet relayed: kept, as age counts from relaying (if the
    // running relay sends it first, it is relayed just now and kept as well).
    pg.execute(
        "INSERT INTO outbox (stream, idem_key, payload, created_at) VALUES ('notices', 'waiting', '{}', now() - interval '100 days')",
        &[],
    )
    .await
    .unwrap();
    // A settlement published 100 days ago and never confirmed: kept, as age counts from the
    // account service's confirmation (the running relay may publish it again meanwhile).
    pg.execute(
        "INSERT INTO outbox (stream, idem_key, payload, created_at, published_at)
         VALUES ('account:settlements', 'unconfirmed', '{}', now() - interval '100 days', now() - interval '100 days')",
        &[],
    )
    .await
    .unwrap();

    retention::sweep(&svc.app).await.unwrap();

    assert_eq!(count(&pg, "device_status_history").await, before[0] + 2);
    assert_eq!(count(&pg, "ota_reports").await, before[1] + 3 + 2);
    let outbox_left = count(&pg, "outbox").await;
    assert_eq!(outbox_left, before[2] + 2 + 2);
    let waiting: i64 =
        pg.query_one("SELECT count(*) FROM outbox WHERE idem_key = 'waiting'", &[]).await.unwrap().get(0);
    assert_eq!(waiting, 1);
    // Counted per table (the sweep at start-up may have taken part of the work: the totals hold).
    let text = svc.app.metrics.render();
    assert_eq!(metric(&text, r#"devsvc_retention_deleted_rows_total{table="device_status_history"}"#), 8.0);
    assert_eq!(metric(&text, r#"devsvc_retention_deleted_rows_total{table="ota_reports"}"#), 5.0);
    assert_eq!(metric(&text, r#"devsvc_retention_deleted_rows_total{table="outbox"}"#), 8.0);

    // Nothing left to delete: a second sweep deletes nothing.
    assert_eq!(retention::sweep(&svc.app).await.unwrap(), retention::Swept::default());
    svc.stop().await;
}

#[tokio::test]
async fn a_retention_of_zero_days_keeps_everything() {
    let stack = Stack::new().await;
    let svc = keeping(&stack, [0, 0, 0], 5000).await;
    let pg = stack.pg().await;
    let before = counts(&pg).await;
    insert_logs(&pg, "old", 3, 3650).await;
    assert_eq!(retention::sweep(&svc.app).await.unwrap(), retention::Swept::default());
    assert_eq!(counts(&pg).await, before.map(|n| n + 3));
    svc.stop().await;
}
