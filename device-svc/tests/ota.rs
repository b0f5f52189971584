//! OTA campaigns end to end: tasks through the API, validation, notices to real MQTT clients
//! through a real gateway, reports folded into PostgreSQL, timeouts, failures and cancellation.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::car::{Car, register_vehicle};
use common::*;
use protocol::mqtt::topic::{DownlinkKind, UplinkKind};
use serde_json::{Value, json};

/// VINs for the tests: 17 characters, no I, O or Q.
fn vin(n: u32) -> String {
    format!("LSVAU2180N2{n:06}")
}

fn task(version: &str, task_type: &str, vins: &[String]) -> Value {
    json!({
        "name": format!("campaign {version}"),
        "version": version,
        "upgrade_type": "prompted",
        "task_type": task_type,
        "package": {"id": format!("pkg-{version}"), "size_bytes": 734_003_200u64, "sha256": "9a".repeat(32),
                    "signature": "MEUCIQ", "url": format!("https://ota.example/pkg-{version}")},
        "vins": vins,
        "created_by": "op-1",
    })
}

async fn create(api: Api, body: Value) -> Value {
    expect(api, "POST", "/v1/ota/tasks", Some(body), 201).await
}

async fn vehicles(api: Api, task: &str) -> HashMap<String, Value> {
    let list = expect(api, "GET", &format!("/v1/ota/tasks/{task}/vehicles"), None, 200).await;
    list.as_array().unwrap().iter().map(|v| (v["vin"].as_str().unwrap().to_owned(), v.clone())).collect()
}

async fn wait_vehicle_state(api: Api, task: &str, vin: &str, state: &str) -> Value {
    wait_until(&format!("{vin} {state} in {task}"), WAIT, || async {
        let v = vehicles(api, task).await.remove(vin)?;
        (v["state"] == state).then_some(v)
    })
    .await
}

async fn status(car: &mut Car, task: &str, status: &str, extra: Value) {
    let mut body = json!({"task_id": task, "status": status, "ts_ms": now_ms()});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    car.publish(UplinkKind::OtaStatus, body).await;
}

/// Waits until every report published so far is applied (they are applied in order per vehicle).
async fn reports_applied(stack: &Stack, n: i64) {
    wait_until(&format!("{n} OTA reports applied"), WAIT, || async {
        let row =
            stack.pg().await.query_one("SELECT count(*) FROM ota_reports WHERE applied <> ''", &[]).await.unwrap();
        (row.get::<_, i64>(0) >= n).then_some(())
    })
    .await;
}

#[tokio::test]
async fn every_validation_rule_refuses_with_its_reason_and_the_lists_are_managed() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);
    let at = |v: &str| json!({"sw_version": v});
    register_vehicle(api, &vin(1), at("1.0.0")).await; // accepted
    register_vehicle(api, &vin(2), at("1.0.0")).await; // blacklisted
    register_vehicle(api, &vin(3), json!({"sw_version": "1.0.0", "state": "scrapped"})).await;
    register_vehicle(api, &vin(4), json!({})).await; // version unknown
    register_vehicle(api, &vin(5), at("2.0.0")).await; // same version
    register_vehicle(api, &vin(6), at("2.0.0")).await; // same version, whitelisted
    register_vehicle(api, &vin(7), at("3.1.0")).await; // newer: a downgrade
    register_vehicle(api, &vin(8), at("3.1.0")).await; // downgrade, whitelisted
    register_vehicle(api, &vin(9), json!({"sw_version": "1.0.0", "purpose": "test", "state": "line_ok"})).await;
    for (list, v) in [("blacklist", 2), ("same_version", 6), ("downgrade", 8)] {
        let path = format!("/v1/ota/lists/{list}/{}", vin(v));
        expect(api, "PUT", &path, Some(json!({"note": "test"})), 204).await;
    }
    assert_eq!(
        expect(api, "PUT", &format!("/v1/ota/lists/greylist/{}", vin(1)), Some(json!({})), 400).await["field"],
        "list"
    );
    let listed = expect(api, "GET", "/v1/ota/lists/blacklist", None, 200).await;
    assert_eq!(listed[0]["vin"], vin(2));

    let mut vins: Vec<String> = (1..=8).map(vin).collect();
    vins.extend([vin(1), vin(99), "NOT-A-VIN".into()]);
    let created = create(api, task("2.0.0", "normal", &vins)).await;
    let id = created["id"].as_str().unwrap().to_owned();
    let accepted: Vec<&str> = created["accepted"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(accepted, [vin(1), vin(6), vin(8)]);
    let expected = [
        (vin(2), "blacklisted"),
        (vin(3), "state_not_allowed"),
        (vin(4), "unknown_version"),
        (vin(5), "same_version"),
        (vin(7), "downgrade"),
        (vin(1), "duplicate_vin"),
        (vin(99), "unknown_vehicle"),
        ("NOT-A-VIN".into(), "invalid_vin"),
    ];
    let reasons = |v: &Value| -> Vec<(String, String)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| (r["vin"].as_str().unwrap().to_owned(), r["reason"].as_str().unwrap().to_owned()))
            .collect()
    };
    let want: Vec<(String, String)> = expected.iter().map(|(v, r)| (v.clone(), (*r).to_owned())).collect();
    assert_eq!(reasons(&created["rejected"]), want);
    // Stored, in request order.
    let stored = expect(api, "GET", &format!("/v1/ota/tasks/{id}/rejections"), None, 200).await;
    assert_eq!(reasons(&stored), want);

    // An upgrade waiting on a vehicle blocks another task; task types restrict states and purposes.
    let second = create(api, task("2.1.0", "normal", &[vin(1)])).await;
    assert_eq!(second["rejected"][0]["reason"], "upgrade_in_progress");
    let factory = create(api, task("2.1.0", "factory", &[vin(9), vin(5)])).await;
    assert_eq!(factory["accepted"], json!([vin(9)]));
    assert_eq!(factory["rejected"][0]["reason"], "state_not_allowed");
    expect(
        api,
        "PATCH",
        &format!("/v1/vehicles/{}", vin(5)),
        Some(json!({"purpose": "sale", "state": "delivered"})),
        200,
    )
    .await;
    let test_task = create(api, task("2.1.0", "test", &[vin(5)])).await;
    assert_eq!(test_task["rejected"][0]["reason"], "sale_vehicle");

    // Malformed requests name the field.
    let mut bad = task("2.x", "normal", &[vin(1)]);
    assert_eq!(expect(api, "POST", "/v1/ota/tasks", Some(bad.clone()), 400).await["field"], "version");
    bad["version"] = json!("2.2.0");
    bad["package"]["sha256"] = json!("abc");
    assert_eq!(expect(api, "POST", "/v1/ota/tasks", Some(bad), 400).await["field"], "package.sha256");

    expect(api, "DELETE", &format!("/v1/ota/lists/blacklist/{}", vin(2)), None, 204).await;
    expect(api, "DELETE", &format!("/v1/ota/lists/blacklist/{}", vin(2)), None, 404).await;
    let metrics = metrics_text(api).await;
    assert_eq!(metric(&metrics, "devsvc_ota_validation_rejections_total{reason=\"blacklisted\"}"), 1.0);
    svc.stop().await;
}

#[tokio::test]
async fn notices_reach_online_and_reconnecting_vehicles_and_reports_only_move_forward() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);
    let (a, b) = (vin(1), vin(2));
    let token_a = register_vehicle(api, &a, json!({"sw_version": "1.0.0"})).await;
    let token_b = register_vehicle(api, &b, json!({"sw_version": "1.0.0"})).await;
    let mut car_a = Car::connect(stack.mqtt_addr(), &a, &token_a).await;

    let created = create(api, task("2.0.0", "normal", &[a.clone(), b.clone()])).await;
    let id = created["id"].as_str().unwrap().to_owned();
    // The task's vehicles page by VIN.
    let first = expect(api, "GET", &format!("/v1/ota/tasks/{id}/vehicles?limit=1"), None, 200).await;
    let path = format!("/v1/ota/tasks/{id}/vehicles?limit=1&after_vin={}", first[0]["vin"].as_str().unwrap());
    let second = expect(api, "GET", &path, None, 200).await;
    assert_eq!((first[0]["vin"].as_str(), second[0]["vin"].as_str()), (Some(a.as_str()), Some(b.as_str())));
    let path = format!("/v1/ota/tasks/{id}/vehicles?limit=1&after_vin={b}");
    assert_eq!(expect(api, "GET", &path, None, 200).await, json!([]));

    // Online: notified at once, with everything it needs.
    let notice = car_a.next(DownlinkKind::OtaNotify).await;
    assert_eq!((notice["task_id"].as_str(), notice["version"].as_str()), (Some(id.as_str()), Some("2.0.0")));
    assert_eq!(notice["upgrade_type"], "prompted");
    assert_eq!(notice["package"]["sha256"], "9a".repeat(32));
    let row = wait_vehicle_state(api, &id, &a, "notified").await;
    assert!(
        row["push_message_id"].as_str().is_some_and(|m| !m.is_empty()) && row["pushed_ms"].as_u64().is_some(),
        "{row}"
    );
    // Offline: waits, and gets it when it connects.
    assert_eq!(vehicles(api, &id).await[&b]["state"], "pending");
    let mut car_b = Car::connect(stack.mqtt_addr(), &b, &token_b).await;
    assert_eq!(car_b.next(DownlinkKind::OtaNotify).await["task_id"], id.as_str());
    wait_vehicle_state(api, &id, &b, "notified").await;

    // Vehicle A: progress, some of it late or repeated.
    status(&mut car_a, &id, "waiting", json!({})).await;
    status(&mut car_a, &id, "downloading", json!({})).await;
    let progress =
        |p: u8| json!({"task_id": id, "percent": p, "bytes_done": u64::from(p) * 7_340_032, "ts_ms": now_ms()});
    car_a.publish(UplinkKind::OtaDownloadProgress, progress(40)).await;
    car_a.publish(UplinkKind::OtaDownloadProgress, progress(20)).await; // out of order
    car_a.publish(UplinkKind::OtaDownloadProgress, progress(40)).await; // repeated
    status(&mut car_a, &id, "waiting", json!({})).await; // late
    reports_applied(&stack, 6).await;
    let row = vehicles(api, &id).await.remove(&a).unwrap();
    assert_eq!((row["state"].as_str(), row["download_percent"].as_i64()), (Some("downloading"), Some(40)), "{row}");
    assert_eq!(row["bytes_done"], 40 * 7_340_032);

    for s in ["downloaded", "verifying", "upgrading"] {
        status(&mut car_a, &id, s, json!({})).await;
    }
    let t0 = now_ms();
    let upgrade =
        |p: u8, ecu: &str, ts: u64| json!({"task_id": id, "percent": p, "ecu": ecu, "ecu_percent": 70, "ts_ms": ts});
    car_a.publish(UplinkKind::OtaUpgradeProgress, upgrade(55, "BCM", t0)).await;
    car_a.publish(UplinkKind::OtaUpgradeProgress, upgrade(30, "VCU", t0 - 5000)).await; // older
    reports_applied(&stack, 11).await;
    // Newer but behind (a lower percent): a late report changes nothing, its ECU fields
    // included, in a batch of its own as in one with the others (SPEC.md 2.3).
    car_a.publish(UplinkKind::OtaUpgradeProgress, upgrade(20, "VCU", t0 + 1000)).await;
    reports_applied(&stack, 12).await;
    let row = vehicles(api, &id).await.remove(&a).unwrap();
    assert_eq!(
        (row["upgrade_percent"].as_i64(), row["ecu"].as_str(), row["ecu_percent"].as_i64()),
        (Some(55), Some("BCM"), Some(70)),
        "{row}"
    );
    status(&mut car_a, &id, "success", json!({"version": "2.0.0"})).await;
    wait_vehicle_state(api, &id, &a, "success").await;
    status(&mut car_a, &id, "upgrading", json!({})).await; // after the end
    reports_applied(&stack, 14).await;
    assert_eq!(vehicles(api, &id).await[&a]["state"], "success");
    assert_eq!(expect(api, "GET", &format!("/v1/vehicles/{a}"), None, 200).await["sw_version"], "2.0.0");

    // Vehicle B fails on an ECU, then rolls back: both recorded, operators told.
    status(&mut car_b, &id, "upgrading", json!({})).await;
    status(&mut car_b, &id, "failed", json!({"ecu": "ADAS", "error": "E42 flash verify"})).await;
    wait_vehicle_state(api, &id, &b, "failed").await;
    status(&mut car_b, &id, "rolled_back", json!({"ecu": "ADAS", "error": "E42 flash verify"})).await;
    let row = wait_vehicle_state(api, &id, &b, "rolled_back").await;
    assert_eq!((row["fail_ecu"].as_str(), row["fail_error"].as_str()), (Some("ADAS"), Some("E42 flash verify")));
    let failures = expect(api, "GET", &format!("/v1/ota/tasks/{id}/failures"), None, 200).await;
    let statuses: Vec<&str> = failures.as_array().unwrap().iter().map(|f| f["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["failed", "rolled_back"]);
    let notices = wait_until("failure notices", WAIT, || async {
        let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
            .arg(format!("{}notices", stack.ns.prefix))
            .arg("-")
            .arg("+")
            .query_async(&mut stack.redis.clone())
            .await
            .unwrap();
        let ota: Vec<HashMap<String, String>> =
            entries.into_iter().map(|(_, f)| f).filter(|f| f.get("type").is_some_and(|t| t == "ota_failure")).collect();
        (ota.len() == 2).then_some(ota)
    })
    .await;
    let payload: Value = serde_json::from_str(&notices[0]["payload"]).unwrap();
    assert_eq!((payload["vin"].as_str(), payload["ecu"].as_str()), (Some(b.as_str()), Some("ADAS")));

    // Every vehicle done: the task finishes, with its counts.
    let t = wait_until("task finished", WAIT, || async {
        let t = expect(api, "GET", &format!("/v1/ota/tasks/{id}"), None, 200).await;
        (t["state"] == "finished").then_some(t)
    })
    .await;
    assert_eq!(t["counts"], json!({"success": 1, "rolled_back": 1}));

    // Nonsense is counted and stored nowhere; a report for a task the vehicle is not in is
    // stored with its result, `unknown_task`.
    car_b.publish(UplinkKind::OtaStatus, json!({"task_id": 5, "status": "exploded"})).await;
    car_b
        .publish(UplinkKind::OtaDownloadProgress, json!({"task_id": id, "percent": 140, "bytes_done": 1, "ts_ms": 1}))
        .await;
    status(&mut car_b, "t-unknown", "waiting", json!({})).await;
    reports_applied(&stack, 18).await;
    let unknown: String = stack
        .pg()
        .await
        .query_one("SELECT applied FROM ota_reports WHERE task_id = 't-unknown'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(unknown, "unknown_task");
    let text = &metrics_text(api).await;
    assert_eq!(metric(text, "devsvc_ota_reports_total{kind=\"ota_status\",result=\"invalid\"}"), 1.0);
    assert_eq!(metric(text, "devsvc_ota_reports_total{kind=\"ota_download_progress\",result=\"invalid\"}"), 1.0);
    assert_eq!(metric(text, "devsvc_ota_reports_total{kind=\"ota_status\",result=\"unknown_task\"}"), 1.0);
    assert_eq!(metric(text, "devsvc_ota_reports_total{kind=\"ota_download_progress\",result=\"stale\"}"), 2.0);
    svc.stop().await;
}

#[tokio::test]
async fn silent_vehicles_time_out_wrong_versions_fail_and_cancel_spares_started_upgrades() {
    let stack = Stack::new().await;
    let mut config = stack.svc_config("svc-1");
    config.ota.download_timeout_s = 1;
    let svc = stack.service_with(config).await;
    let api = stack.api(svc.addr);
    let vins: Vec<String> = (1..=5).map(vin).collect();
    let mut tokens = Vec::new();
    for v in &vins {
        tokens.push(register_vehicle(api, v, json!({"sw_version": "1.0.0"})).await);
    }
    let mut cars = Vec::new();
    for (n, (v, t)) in vins.iter().zip(&tokens).enumerate() {
        // Vehicle 4 stays offline.
        if n != 3 {
            cars.push(Car::connect(stack.mqtt_addr(), v, t).await);
        }
    }
    let created = create(api, task("2.0.0", "normal", &vins)).await;
    let id = created["id"].as_str().unwrap().to_owned();
    for car in &mut cars {
        assert_eq!(car.next(DownlinkKind::OtaNotify).await["task_id"], id.as_str());
    }

    // Car 1 starts downloading, then falls silent past the phase's limit.
    status(&mut cars[0], &id, "downloading", json!({})).await;
    let row = wait_vehicle_state(api, &id, &vins[0], "timed_out").await;
    assert_eq!(row["fail_error"], "timed_out");
    // Car 2 claims success at a version that is not the target.
    status(&mut cars[1], &id, "success", json!({"version": "1.9.0"})).await;
    let row = wait_vehicle_state(api, &id, &vins[1], "failed").await;
    assert!(row["fail_error"].as_str().unwrap().starts_with("version_mismatch"), "{row}");
    assert_eq!(expect(api, "GET", &format!("/v1/vehicles/{}", vins[1]), None, 200).await["sw_version"], "1.0.0");

    // Car 5 is installing; car 3 was notified and has not started; vehicle 4 is offline
    // (never notified). Cancel.
    status(&mut cars[3], &id, "upgrading", json!({})).await;
    wait_vehicle_state(api, &id, &vins[4], "upgrading").await;
    wait_vehicle_state(api, &id, &vins[2], "notified").await;
    let t = expect(api, "POST", &format!("/v1/ota/tasks/{id}/cancel"), None, 200).await;
    assert_eq!(t["state"], "cancelled");
    assert_eq!(cars[2].next(DownlinkKind::OtaCancel).await["task_id"], id.as_str());
    let rows = vehicles(api, &id).await;
    assert_eq!(
        (rows[&vins[2]]["state"].as_str(), rows[&vins[3]]["state"].as_str()),
        (Some("cancelled"), Some("cancelled"))
    );
    wait_until("cancel notice acknowledged", WAIT, || async {
        let row = stack
            .pg()
            .await
            .query_one("SELECT cancel_sent FROM ota_task_vehicles WHERE vin = $1", &[&vins[2]])
            .await
            .unwrap();
        row.get::<_, bool>(0).then_some(())
    })
    .await;
    // The started upgrade carries on and its success counts.
    assert_eq!(rows[&vins[4]]["state"], "upgrading");
    status(&mut cars[3], &id, "success", json!({"version": "2.0.0"})).await;
    wait_vehicle_state(api, &id, &vins[4], "success").await;
    let failures = expect(api, "GET", &format!("/v1/ota/tasks/{id}/failures"), None, 200).await;
    assert_eq!(failures.as_array().unwrap().len(), 2, "{failures}");
    expect(api, "POST", &format!("/v1/ota/tasks/{id}/cancel"), None, 200).await;
    let text = &metrics_text(api).await;
    assert_eq!(metric(text, "devsvc_ota_timeouts_total{phase=\"downloading\"}"), 1.0);
    assert_eq!(metric(text, "devsvc_ota_pushes_total{kind=\"cancel\",outcome=\"delivered\"}"), 1.0);
    svc.stop().await;
}

#[tokio::test]
async fn pushes_are_paced_fleet_wide_and_sent_once_by_two_instances() {
    let stack = Stack::new().await;
    let mut config = stack.svc_config("svc-1");
    config.ota.push_rate_per_s = 2;
    let svc = stack.service_with(config.clone()).await;
    config.instance_id = "svc-2".into();
    let other = stack.service_with(config).await;
    let api = stack.api(svc.addr);
    let vins: Vec<String> = (1..=6).map(vin).collect();
    let mut cars = Vec::new();
    for v in &vins {
        let token = register_vehicle(api, v, json!({"sw_version": "1.0.0"})).await;
        cars.push(Car::connect(stack.mqtt_addr(), v, &token).await);
    }
    let created = create(api, task("2.0.0", "normal", &vins)).await;
    let id = created["id"].as_str().unwrap().to_owned();
    for car in &mut cars {
        car.next(DownlinkKind::OtaNotify).await;
    }
    // Six notices at two per second: the bucket holds two, the other four come one per 500 ms,
    // so the last is sent at least two seconds after the first. The recorded times are the
    // PUBACKs', which may lag their sends; a second of that leeway stays. A vehicle holds its
    // notice before the service records the PUBACK, so wait for every row's record.
    let rows = poll_until("every push recorded", Duration::from_secs(10), Duration::from_millis(50), || async {
        let rows = vehicles(api, &id).await;
        rows.values().all(|r| r["pushed_ms"].is_u64()).then_some(rows)
    })
    .await;
    let times: Vec<u64> = rows.values().map(|r| r["pushed_ms"].as_u64().unwrap()).collect();
    let spread = times.iter().max().unwrap() - times.iter().min().unwrap();
    assert!(spread >= 1000, "six pushes within {spread} ms at 2 per second");
    assert!(rows.values().all(|r| r["push_count"] == 1), "{rows:?}");
    other.stop().await;
    svc.stop().await;
}

#[tokio::test]
async fn a_batch_folds_in_order_each_report_seeing_the_state_the_previous_left() {
    use device_svc::vehicles::ota::reports::{Uplink, apply_batch};

    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);
    let v = vin(7);
    register_vehicle(api, &v, json!({"sw_version": "1.0.0"})).await;
    let id = create(api, task("2.0.0", "normal", std::slice::from_ref(&v))).await["id"].as_str().unwrap().to_owned();
    let vin_of = protocol::Vin::new(v.clone()).unwrap();
    let uplink = |n: u32, kind: UplinkKind, body: Value| Uplink {
        entry: format!("up:0/1-{n}"),
        vin: vin_of.clone(),
        kind,
        payload: body.to_string().into(),
    };
    let progress = |p: u8| json!({"task_id": id, "percent": p, "bytes_done": u64::from(p) * 1000, "ts_ms": now_ms()});
    let status = |s: &str| json!({"task_id": id, "status": s, "version": "2.0.0", "ts_ms": now_ms()});
    let mut batch = vec![
        uplink(1, UplinkKind::OtaStatus, status("downloading")),
        uplink(2, UplinkKind::OtaDownloadProgress, progress(50)),
        uplink(3, UplinkKind::OtaDownloadProgress, progress(30)),
        uplink(4, UplinkKind::OtaStatus, status("success")),
        // After the success in the same batch: must not move the finished upgrade back.
        uplink(5, UplinkKind::OtaDownloadProgress, progress(80)),
        uplink(1, UplinkKind::OtaStatus, status("downloading")),
        uplink(6, UplinkKind::OtaStatus, json!({"task_id": id})),
        uplink(7, UplinkKind::OtaStatus, json!({"task_id": "no-such-task", "status": "waiting", "ts_ms": 1})),
    ];
    batch[6].payload = bytes::Bytes::from_static(b"{not json");
    let results = apply_batch(&svc.app, &batch).await.unwrap();
    assert_eq!(
        results,
        ["applied", "applied", "stale", "applied", "stale", "duplicate", "invalid", "unknown_task"],
        "each report's result, in order"
    );
    let row = vehicles(api, &id).await.remove(&v).unwrap();
    assert_eq!((row["state"].as_str(), row["download_percent"].as_i64()), (Some("success"), Some(50)), "{row}");
    let vehicle = expect(api, "GET", &format!("/v1/vehicles/{v}"), None, 200).await;
    assert_eq!(vehicle["sw_version"], "2.0.0");
    let stored: Vec<(String, String)> = stack
        .pg()
        .await
        .query("SELECT entry, applied FROM ota_reports ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected = [(1, "applied"), (2, "applied"), (3, "stale"), (4, "applied"), (5, "stale"), (7, "unknown_task")];
    let expected: Vec<(String, String)> =
        expected.iter().map(|(n, a)| (format!("up:0/1-{n}"), (*a).to_owned())).collect();
    assert_eq!(stored, expected, "stored once each, with its result");

    // The whole batch redelivered: nothing is stored or changed twice.
    let again = apply_batch(&svc.app, &batch).await.unwrap();
    assert_eq!(
        again,
        ["duplicate", "duplicate", "duplicate", "duplicate", "duplicate", "duplicate", "invalid", "duplicate"]
    );
    svc.stop().await;
}
