//! Activation by QR code end to end: a real MQTT client as the car, a real gateway, the device
//! service with PostgreSQL and Redis, the owner's app as HTTP calls. Every interleaving of the
//! seed's problem 4.1 must leave the cloud and the car agreeing. And a report PostgreSQL
//! refuses (a NUL in its QR id) is set aside as a dead letter without stopping its shard.

#![allow(clippy::unwrap_used)]

mod common;

use common::car::{Car, register_vehicle};
use common::*;
use device_svc::DeviceService;
use protocol::mqtt::topic::{DownlinkKind, UplinkKind};
use serde_json::{Value, json};

const VIN: &str = "LSVAU2180N2183294";

/// The car asks for a QR id and returns it (checking its shape and expiry).
async fn request_qr(car: &mut Car, request_id: &str) -> String {
    car.publish(UplinkKind::QrRequest, json!({"request_id": request_id, "seat": "driver"})).await;
    let issued = car.next(DownlinkKind::QrId).await;
    assert_eq!(issued["request_id"], request_id);
    let qr = issued["qr_id"].as_str().unwrap().to_owned();
    assert_eq!(qr.len(), 32, "{qr}");
    assert!(qr.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{qr}");
    assert!(issued["expires_at_ms"].as_u64().unwrap() > now_ms());
    qr
}

async fn step(api: Api, qr: &str, what: &str, user: &str, status: u16) -> Value {
    expect(api, "POST", &format!("/v1/activations/{qr}/{what}"), Some(json!({"user_id": user})), status).await
}

/// The car reports `code` and returns the cloud's answer.
async fn report(car: &mut Car, qr: &str, code: &str) -> Value {
    car.publish(UplinkKind::ActivationReport, json!({"qr_id": qr, "code": code})).await;
    let result = car.next(DownlinkKind::ActivationResult).await;
    assert_eq!(result["qr_id"], qr);
    result
}

/// A stack, a device service (with a QR id life of `qr_ttl_s` if given), a registered vehicle's
/// token and the vehicle connected.
async fn setup(qr_ttl_s: Option<u64>) -> (Stack, DeviceService, String, Car) {
    let stack = Stack::new().await;
    let mut config = stack.svc_config("svc-1");
    if let Some(ttl) = qr_ttl_s {
        config.vehicles.qr_ttl_s = ttl;
    }
    let svc = stack.service_with(config).await;
    let token = register_vehicle(stack.api(svc.addr), VIN, json!({"buyer_user_id": "u-1"})).await;
    let car = Car::connect(stack.mqtt_addr(), VIN, &token).await;
    (stack, svc, token, car)
}

async fn vehicle(api: Api) -> Value {
    expect(api, "GET", &format!("/v1/vehicles/{VIN}"), None, 200).await
}

async fn activations_stored(stack: &Stack) -> i64 {
    stack.pg().await.query_one("SELECT count(*) FROM activations", &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn the_happy_path_with_a_second_scanner_a_wrong_code_and_repeated_reports() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);
    let token = register_vehicle(api, VIN, json!({"state": "pending_activation", "buyer_user_id": "u-1"})).await;
    let mut car = Car::connect(stack.mqtt_addr(), VIN, &token).await;

    let qr = request_qr(&mut car, "r-1").await;
    let view = expect(api, "GET", &format!("/v1/activations/{qr}"), None, 200).await;
    assert_eq!(
        (view["state"].as_str(), view["vin"].as_str(), view["seat"].as_str()),
        (Some("issued"), Some(VIN), Some("driver"))
    );
    // The same request again (a retry) gets the same id.
    assert_eq!(request_qr(&mut car, "r-1").await, qr);

    assert_eq!(step(api, &qr, "confirm", "u-1", 409).await["error"], "not_scanned");
    assert_eq!(step(api, &qr, "scan", "u-1", 200).await["state"], "scanned");
    assert_eq!(step(api, &qr, "scan", "u-1", 200).await["state"], "scanned", "scanning again is harmless");
    assert_eq!(step(api, &qr, "scan", "u-2", 409).await["error"], "not_the_buyer", "only the buyer scans");
    assert_eq!(step(api, &qr, "confirm", "u-2", 409).await["error"], "already_scanned");

    let confirmed = step(api, &qr, "confirm", "u-1", 200).await;
    assert_eq!((confirmed["state"].as_str(), confirmed["code_delivered"].as_bool()), (Some("confirmed"), Some(true)));
    let code = car.next(DownlinkKind::ActivationCode).await;
    assert_eq!(code["qr_id"], qr.as_str());
    let code = code["code"].as_str().unwrap().to_owned();
    assert_eq!(code.len(), 6);
    assert_eq!(vehicle(api).await["state"], "pending_activation", "confirming activates nothing");
    // The app's confirmation answer was lost and it confirms again: the same code goes down.
    step(api, &qr, "confirm", "u-1", 200).await;
    assert_eq!(car.next(DownlinkKind::ActivationCode).await["code"], code.as_str());

    let wrong = if code == "000000" { "000001" } else { "000000" };
    let refused = report(&mut car, &qr, wrong).await;
    assert_eq!((refused["outcome"].as_str(), refused["reason"].as_str()), (Some("rejected"), Some("wrong_code")));
    assert_eq!(vehicle(api).await["state"], "pending_activation");

    let accepted = report(&mut car, &qr, &code).await;
    assert_eq!(accepted["outcome"], "activated");
    assert!(accepted.get("reason").is_none(), "{accepted}");
    let v = vehicle(api).await;
    assert_eq!(
        (v["state"].as_str(), v["owner_user_id"].as_str(), v["activation_qr"].as_str()),
        (Some("activated"), Some("u-1"), Some(qr.as_str()))
    );

    // The result may have been lost: the car repeats, and gets the same answer.
    assert_eq!(report(&mut car, &qr, &code).await["outcome"], "activated");
    assert_eq!(activations_stored(&stack).await, 1);
    assert_eq!(step(api, &qr, "cancel", "u-1", 409).await["error"], "already_reported");
    assert_eq!(expect(api, "GET", &format!("/v1/activations/{qr}"), None, 200).await["state"], "activated");
    let text = &metrics_text(api).await;
    assert_eq!(metric(text, "devsvc_activation_seconds_count"), 1.0);
    assert_eq!(metric(text, "devsvc_activation_steps_total{result=\"wrong_code\",step=\"report\"}"), 1.0);
    svc.stop().await;
}

#[tokio::test]
async fn a_car_offline_at_confirmation_gets_the_code_when_it_connects_and_a_lost_result_is_answered_again() {
    let (stack, svc, token, mut car) = setup(None).await;
    let api = stack.api(svc.addr);
    let qr = request_qr(&mut car, "r-1").await;
    car.disconnect().await;
    wait_status(api, &format!("veh:{VIN}"), "offline").await;

    step(api, &qr, "scan", "u-1", 200).await;
    let confirmed = step(api, &qr, "confirm", "u-1", 200).await;
    assert_eq!(confirmed["code_delivered"], false, "the car is offline");

    let mut car = Car::connect(stack.mqtt_addr(), VIN, &token).await;
    let code = car.next(DownlinkKind::ActivationCode).await["code"].as_str().unwrap().to_owned();
    // The car activates and reports, then loses its connection before the result arrives.
    car.publish(UplinkKind::ActivationReport, json!({"qr_id": qr, "code": code})).await;
    car.disconnect().await;
    wait_until("the activation stored", WAIT, || async { (activations_stored(&stack).await == 1).then_some(()) }).await;

    // Reconnected, it repeats the report: same answer, nothing recorded twice.
    let mut car = Car::connect(stack.mqtt_addr(), VIN, &token).await;
    assert_eq!(report(&mut car, &qr, &code).await["outcome"], "activated");
    // Even once the QR id's cache entry is gone, the stored activation answers.
    let _: i64 = redis::cmd("DEL")
        .arg(format!("{}qr:{{{qr}}}", stack.ns.prefix))
        .query_async(&mut stack.redis.clone())
        .await
        .unwrap();
    assert_eq!(report(&mut car, &qr, &code).await["outcome"], "activated");
    assert_eq!(activations_stored(&stack).await, 1);
    assert_eq!(vehicle(api).await["owner_user_id"], "u-1");
    svc.stop().await;
}

#[tokio::test]
async fn a_cancelled_activation_refuses_the_report_and_too_many_wrong_codes_cancel() {
    let (stack, svc, _token, mut car) = setup(None).await;
    let api = stack.api(svc.addr);

    // Cancelled by the owner after the code went down, before the car reported.
    let qr = request_qr(&mut car, "r-1").await;
    step(api, &qr, "scan", "u-1", 200).await;
    step(api, &qr, "confirm", "u-1", 200).await;
    let code = car.next(DownlinkKind::ActivationCode).await["code"].as_str().unwrap().to_owned();
    assert_eq!(step(api, &qr, "cancel", "u-2", 409).await["error"], "already_scanned", "only the owner cancels");
    assert_eq!(step(api, &qr, "cancel", "u-1", 200).await["state"], "cancelled");
    // The car is told without having to report first.
    let told = car.next(DownlinkKind::ActivationResult).await;
    assert_eq!(
        (told["qr_id"].as_str(), told["outcome"].as_str(), told["reason"].as_str()),
        (Some(qr.as_str()), Some("rejected"), Some("cancelled"))
    );
    let refused = report(&mut car, &qr, &code).await;
    assert_eq!((refused["outcome"].as_str(), refused["reason"].as_str()), (Some("rejected"), Some("cancelled")));
    assert_eq!(vehicle(api).await["state"], "delivered");

    // Five wrong codes: the activation is cancelled, the right code comes too late.
    let qr = request_qr(&mut car, "r-2").await;
    step(api, &qr, "scan", "u-1", 200).await;
    step(api, &qr, "confirm", "u-1", 200).await;
    let code = car.next(DownlinkKind::ActivationCode).await["code"].as_str().unwrap().to_owned();
    let wrong = if code == "000000" { "000001" } else { "000000" };
    for _ in 0..5 {
        assert_eq!(report(&mut car, &qr, wrong).await["reason"], "wrong_code");
    }
    assert_eq!(report(&mut car, &qr, &code).await["reason"], "cancelled");
    assert_eq!(vehicle(api).await["state"], "delivered");
    assert_eq!(activations_stored(&stack).await, 0);

    // An id nobody issued, and another car's id.
    assert_eq!(report(&mut car, &"0".repeat(32), "123456").await["reason"], "unknown_qr_id");
    assert_eq!(step(api, &"f".repeat(32), "scan", "u-1", 404).await["error"], "not_found");
    svc.stop().await;
}

#[tokio::test]
async fn expired_and_superseded_ids_are_refused() {
    let (stack, svc, _token, mut car) = setup(Some(2)).await;
    let api = stack.api(svc.addr);

    // A new request kills the previous id.
    let old = request_qr(&mut car, "r-1").await;
    let new = request_qr(&mut car, "r-2").await;
    assert_ne!(old, new);
    assert_eq!(step(api, &old, "scan", "u-1", 409).await["error"], "expired");

    // A confirmed code past the id's life.
    step(api, &new, "scan", "u-1", 200).await;
    let code_msg = {
        step(api, &new, "confirm", "u-1", 200).await;
        car.next(DownlinkKind::ActivationCode).await
    };
    let expires = code_msg["expires_at_ms"].as_u64().unwrap();
    // The expiry is a point in time: wait for the clock to pass it.
    tokio::time::sleep(std::time::Duration::from_millis(expires.saturating_sub(now_ms()) + 50)).await;
    let refused = report(&mut car, &new, code_msg["code"].as_str().unwrap()).await;
    assert_eq!((refused["outcome"].as_str(), refused["reason"].as_str()), (Some("rejected"), Some("expired")));
    assert_eq!(expect(api, "GET", &format!("/v1/activations/{new}"), None, 200).await["state"], "expired");
    assert_eq!(step(api, &new, "scan", "u-1", 409).await["error"], "expired");
    assert_eq!(vehicle(api).await["state"], "delivered");
    svc.stop().await;
}

#[tokio::test]
async fn only_the_buyer_activates_and_an_active_car_keeps_its_owner() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);
    // Sold, but the sales side has not named the buyer yet: nobody may activate it.
    let token = register_vehicle(api, VIN, json!({"state": "pending_activation"})).await;
    let mut car = Car::connect(stack.mqtt_addr(), VIN, &token).await;
    let qr = request_qr(&mut car, "r-1").await;
    assert_eq!(step(api, &qr, "scan", "u-1", 409).await["error"], "no_buyer");
    expect(api, "PATCH", &format!("/v1/vehicles/{VIN}"), Some(json!({"buyer_user_id": "u-1"})), 200).await;
    assert_eq!(step(api, &qr, "scan", "u-9", 409).await["error"], "not_the_buyer");
    step(api, &qr, "scan", "u-1", 200).await;
    step(api, &qr, "confirm", "u-1", 200).await;
    let code = car.next(DownlinkKind::ActivationCode).await["code"].as_str().unwrap().to_owned();
    assert_eq!(report(&mut car, &qr, &code).await["outcome"], "activated");
    assert_eq!(vehicle(api).await["owner_user_id"], "u-1");

    // The car shows a code again (a reset head unit, a second seat): another user gets nowhere.
    let again = request_qr(&mut car, "r-2").await;
    assert_eq!(step(api, &again, "scan", "u-9", 409).await["error"], "already_activated");
    assert_eq!(vehicle(api).await["owner_user_id"], "u-1");
    svc.stop().await;
}

#[tokio::test]
async fn a_poison_entry_is_set_aside_and_its_shard_moves_on() {
    let stack = Stack::new().await;
    let svc = stack.service("svc-1").await;
    let api = stack.api(svc.addr);
    let vin = protocol::Vin::new("LSVAU2180N2183294").unwrap();
    let device = protocol::bus::DeviceKey::Vehicle(vin.clone());
    register_vehicle(api, vin.as_str(), json!({})).await;
    let shard = device.shard(device_svc::config::Config::default().streams.shards);
    let stream = stack.keys.upstream(shard);
    // What a gateway without edge checks would pass on: an activation report whose QR id holds a
    // NUL, which PostgreSQL refuses; then, behind it on the same shard, the car's session.
    let poison = protocol::bus::UpEvent::Vehicle {
        vin: vin.clone(),
        epoch: 1,
        node: "gw-x".into(),
        at_ms: now_ms(),
        kind: UplinkKind::ActivationReport,
        payload: bytes::Bytes::from(json!({"qr_id": "q\u{0}r", "code": "123456"}).to_string()),
    };
    let opened = protocol::bus::UpEvent::SessionOpened {
        device: device.clone(),
        epoch: 1,
        node: "gw-x".into(),
        info: "test".into(),
        at_ms: now_ms(),
    };
    let mut redis = stack.redis.clone();
    for event in [poison, opened] {
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg(event.to_fields().unwrap())
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    // The entry behind the poison is applied: the shard did not stop.
    wait_status(api, &format!("veh:{}", vin.as_str()), "online").await;
    let letters = expect(api, "GET", "/v1/dead-letters", None, 200).await;
    let letters = letters.as_array().unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let older = format!("/v1/dead-letters?before_id={}", letters[0]["id"]);
    assert_eq!(expect(api, "GET", &older, None, 200).await, serde_json::json!([]), "paged back past the only one");
    assert_eq!(letters[0]["kind"], "veh");
    assert!(letters[0]["error"].as_str().unwrap().contains("PostgreSQL"), "{}", letters[0]);
    let metrics = metrics_text(api).await;
    assert_eq!(metric(&metrics, "devsvc_dead_letters_total{type=\"veh\"}"), 1.0);

    // Replayed, it is appended again and, still poison, set aside again as a new entry; the first
    // is marked replayed and cannot be replayed twice.
    let id = letters[0]["id"].as_i64().unwrap();
    expect(api, "POST", &format!("/v1/dead-letters/{id}/replay"), None, 200).await;
    assert_eq!(http(api, "POST", &format!("/v1/dead-letters/{id}/replay"), None).await.0, 409);
    let again = wait_until("the replayed entry set aside again", WAIT, || async {
        let open = expect(api, "GET", "/v1/dead-letters?open=true", None, 200).await;
        let open = open.as_array().unwrap().clone();
        (open.len() == 1 && open[0]["id"].as_i64() != Some(id)).then_some(open)
    })
    .await;
    assert_eq!(again[0]["fields"]["payload"], letters[0]["fields"]["payload"], "the same bytes");
    svc.stop().await;
}
