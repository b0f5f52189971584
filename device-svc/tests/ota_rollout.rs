//! OTA rollouts against real MQTT vehicles: waves released by success, a task that pauses
//! itself at its error threshold (with its notice), a resume that releases the next wave, and
//! the seed's compensation (a failed upgrade notified again as a new attempt, then the
//! publisher told).

#![allow(clippy::unwrap_used)]

mod common;

use common::car::{Car, register_vehicle};
use common::*;
use protocol::mqtt::topic::{DownlinkKind, UplinkKind};
use serde_json::{Value, json};

fn vin(n: u32) -> String {
    format!("LSVAU2180N4{n:06}")
}

fn task(vins: &[String], rollout: Value) -> Value {
    json!({
        "name": "waves", "version": "2.0.0", "upgrade_type": "silent", "task_type": "normal",
        "package": {"id": "pkg-2.0.0", "size_bytes": 1000, "sha256": "ab".repeat(32), "signature": "c2ln",
                    "url": "https://ota.example/pkg-2.0.0"},
        "vins": vins, "rollout": rollout, "created_by": "publisher-7",
    })
}

async fn status(car: &mut Car, task: &str, attempt: u64, status: &str) {
    let mut body = json!({"task_id": task, "status": status, "attempt": attempt, "ts_ms": now_ms()});
    if status == "success" {
        body["version"] = json!("2.0.0");
    }
    if status == "failed" || status == "rolled_back" {
        body["ecu"] = json!("BCM");
        body["error"] = json!("E42 flash verify");
    }
    car.publish(UplinkKind::OtaStatus, body).await;
}

async fn row(api: Api, task: &str, vin: &str) -> Value {
    let list = expect(api, "GET", &format!("/v1/ota/tasks/{task}/vehicles"), None, 200).await;
    list.as_array().unwrap().iter().find(|v| v["vin"] == vin).unwrap().clone()
}

async fn wait_task(api: Api, task: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_until(what, WAIT, || async {
        let t = expect(api, "GET", &format!("/v1/ota/tasks/{task}"), None, 200).await;
        pred(&t).then_some(t)
    })
    .await
}

async fn notices(stack: &Stack, kind: &str) -> Vec<Value> {
    let rows = stack
        .pg()
        .await
        .query("SELECT payload FROM outbox WHERE payload->>'type' = $1 ORDER BY id", &[&kind])
        .await
        .unwrap();
    rows.iter().map(|r| r.get::<_, Value>(0)).collect()
}

#[tokio::test]
async fn a_rollout_releases_waves_pauses_at_its_error_threshold_and_resumes_with_the_next_wave() {
    let stack = Stack::new().await;
    // Failures count at once (the common configuration re-pushes nothing).
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);
    let vins: Vec<String> = (0..10).map(vin).collect();
    let mut cars = Vec::new();
    for v in &vins {
        let token = register_vehicle(api, v, json!({"sw_version": "1.0.0"})).await;
        cars.push(Car::connect(stack.mqtt_addr(), v, &token).await);
    }
    // A canary of 1, then up to half, then all; pause when over 20 % of released vehicles fail.
    let rollout = json!({"waves": [10, 50, 100], "success_threshold_pct": 100, "error_threshold_pct": 20});
    let created = expect(api, "POST", "/v1/ota/tasks", Some(task(&vins, rollout)), 201).await;
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["waves"], json!([10, 50, 100]));

    // The canary alone is notified.
    assert_eq!(cars[0].next(DownlinkKind::OtaNotify).await["task_id"], id.as_str());
    wait_until("the canary notified", WAIT, || async {
        (row(api, &id, &vins[0]).await["state"] == "notified").then_some(())
    })
    .await;
    for v in &vins[1..] {
        let r = row(api, &id, v).await;
        assert_eq!((r["state"].as_str(), r["push_count"].as_i64()), (Some("pending"), Some(0)), "{r}");
    }
    // Its success releases the next wave (vehicles 1..5).
    status(&mut cars[0], &id, 1, "success").await;
    let t = wait_task(api, &id, "wave 1 released", |t| t["current_wave"] == 1).await;
    assert_eq!(t["state"], "running");
    for car in &mut cars[1..5] {
        assert_eq!(car.next(DownlinkKind::OtaNotify).await["task_id"], id.as_str());
    }
    // Two of those five fail (2 of 5 released since the start: 40 % > 20 %): the task pauses.
    status(&mut cars[1], &id, 1, "failed").await;
    status(&mut cars[2], &id, 1, "failed").await;
    let t = wait_task(api, &id, "the task paused", |t| t["state"] == "paused").await;
    assert_eq!((t["paused_reason"].as_str(), t["current_wave"].as_i64()), (Some("error_threshold"), Some(1)));
    let paused = notices(&stack, "ota_task_paused").await;
    assert_eq!(paused.len(), 1);
    assert_eq!(
        (paused[0]["task_id"].as_str(), paused[0]["publisher"].as_str()),
        (Some(id.as_str()), Some("publisher-7"))
    );
    assert!(svc.app.metrics.render().contains("devsvc_ota_auto_pauses_total 1"));
    // While paused the rest of wave 1 still reports; nothing of wave 2 is pushed.
    status(&mut cars[3], &id, 1, "success").await;
    wait_until("a report while paused", WAIT, || async {
        (row(api, &id, &vins[3]).await["state"] == "success").then_some(())
    })
    .await;
    for v in &vins[5..] {
        assert_eq!(row(api, &id, v).await["push_count"], 0);
    }
    assert_eq!(expect(api, "POST", &format!("/v1/ota/tasks/{id}/pause"), None, 200).await["state"], "paused");

    // Resume: the failures so far are accepted and wave 2 goes out.
    let t = expect(api, "POST", &format!("/v1/ota/tasks/{id}/resume"), None, 200).await;
    assert_eq!((t["state"].as_str(), t["current_wave"].as_i64()), (Some("running"), Some(2)));
    for car in &mut cars[5..] {
        assert_eq!(car.next(DownlinkKind::OtaNotify).await["task_id"], id.as_str());
    }
    assert_eq!(expect(api, "POST", &format!("/v1/ota/tasks/{id}/resume"), None, 409).await["error"], "not_paused");
    // An operator's pause and resume: no wave skipped.
    expect(api, "POST", &format!("/v1/ota/tasks/{id}/pause"), None, 200).await;
    let t = expect(api, "POST", &format!("/v1/ota/tasks/{id}/resume"), None, 200).await;
    assert_eq!(t["current_wave"], 2);
    svc.stop().await;
}

#[tokio::test]
async fn a_failed_upgrade_is_notified_again_as_a_new_attempt_then_its_publisher_is_told() {
    let stack = Stack::new().await;
    let mut c = stack.svc_config("svc-1");
    c.ota.repush_max = 1;
    c.ota.repush_delay_s = 0;
    let svc = stack.service_with(c).await;
    let api = stack.api(svc.addr);
    let v = vin(50);
    let token = register_vehicle(api, &v, json!({"sw_version": "1.0.0"})).await;
    let mut car = Car::connect(stack.mqtt_addr(), &v, &token).await;
    let created =
        expect(api, "POST", "/v1/ota/tasks", Some(task(std::slice::from_ref(&v), json!({"waves": [100]}))), 201).await;
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(car.next(DownlinkKind::OtaNotify).await["attempt"], 1);
    status(&mut car, &id, 1, "upgrading").await;
    status(&mut car, &id, 1, "failed").await;
    // Attempt 2 comes; the first attempt's late roll-back changes nothing.
    let again = car.next(DownlinkKind::OtaNotify).await;
    assert_eq!((again["task_id"].as_str(), again["attempt"].as_u64()), (Some(id.as_str()), Some(2)));
    status(&mut car, &id, 1, "rolled_back").await;
    wait_until("attempt 2 notified", WAIT, || async {
        let r = row(api, &id, &v).await;
        (r["attempt"] == 2 && r["state"] == "notified").then_some(())
    })
    .await;
    status(&mut car, &id, 2, "failed").await;
    wait_until("the second failure", WAIT, || async { (row(api, &id, &v).await["state"] == "failed").then_some(()) })
        .await;
    let gave_up = wait_until("the publisher told", WAIT, || async {
        let n = notices(&stack, "ota_gave_up").await;
        (!n.is_empty()).then_some(n)
    })
    .await;
    assert_eq!(gave_up.len(), 1);
    assert_eq!(
        (gave_up[0]["vin"].as_str(), gave_up[0]["attempts"].as_i64(), gave_up[0]["publisher"].as_str()),
        (Some(v.as_str()), Some(2), Some("publisher-7"))
    );
    assert!(gave_up[0]["reason"].as_str().unwrap().contains("E42"), "{}", gave_up[0]);
    let failures = expect(api, "GET", &format!("/v1/ota/tasks/{id}/failures"), None, 200).await;
    let attempts: Vec<i64> = failures.as_array().unwrap().iter().map(|f| f["attempt"].as_i64().unwrap()).collect();
    assert_eq!(attempts, [1, 2], "{failures}");
    wait_task(api, &id, "the task finished", |t| t["state"] == "finished").await;
    svc.stop().await;
}

#[tokio::test]
async fn a_failure_and_its_roll_back_in_one_batch_re_push_once() {
    use device_svc::vehicles::ota::reports::{Uplink, apply_batch};

    let stack = Stack::new().await;
    let mut c = stack.svc_config("svc-1");
    c.ota.repush_max = 1;
    c.ota.repush_delay_s = 3600; // the re-push waits: the rows stay as the batch left them
    let svc = stack.service_with(c).await;
    let api = stack.api(svc.addr);
    let v = vin(60);
    register_vehicle(api, &v, json!({"sw_version": "1.0.0"})).await;
    let created =
        expect(api, "POST", "/v1/ota/tasks", Some(task(std::slice::from_ref(&v), json!({"waves": [100]}))), 201).await;
    let id = created["id"].as_str().unwrap().to_owned();
    let vin_of = protocol::Vin::new(v.clone()).unwrap();
    let uplink = |n: u32, s: &str, attempt: Option<u32>| {
        let mut body = json!({"task_id": id, "status": s, "ecu": "BCM", "error": "E42", "ts_ms": now_ms()});
        if let Some(a) = attempt {
            body["attempt"] = json!(a);
        }
        Uplink {
            entry: format!("up:0/1-{n}"),
            vin: vin_of.clone(),
            kind: UplinkKind::OtaStatus,
            payload: body.to_string().into(),
        }
    };
    // The failure re-pushes; its roll-back (attempt 1) right behind it in the batch is stale.
    let batch = [uplink(1, "upgrading", Some(1)), uplink(2, "failed", Some(1)), uplink(3, "rolled_back", Some(1))];
    let results = apply_batch(&svc.app, &batch).await.unwrap();
    assert_eq!(results, ["applied", "applied", "stale"]);
    let r = row(api, &id, &v).await;
    assert_eq!((r["state"].as_str(), r["attempt"].as_i64()), (Some("pending"), Some(2)), "{r}");
    let failures = expect(api, "GET", &format!("/v1/ota/tasks/{id}/failures"), None, 200).await;
    assert_eq!(failures.as_array().unwrap().len(), 1, "{failures}");
    svc.stop().await;
}
