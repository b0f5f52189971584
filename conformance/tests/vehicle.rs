//! SPEC.md part 2 as a car maker meets it, with rumqttc: status follows the session, revoked
//! credentials end it, a flapping VIN is cooled down, the owner's cancellation reaches the car.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use conformance::stack::Stack;
use conformance::vehicle::VendorCar;
use rumqttc::{ConnectReturnCode, ConnectionError};
use serde_json::json;

const VIN: &str = "LSVAU2180N2183294";

fn refused(r: Result<VendorCar, ConnectionError>) -> ConnectReturnCode {
    match r {
        Err(ConnectionError::ConnectionRefused(code)) => code,
        Err(e) => panic!("expected a CONNACK refusal, got {e}"),
        Ok(_) => panic!("expected a CONNACK refusal, got a session"),
    }
}

async fn status(stack: &Stack) -> (String, bool) {
    let v = stack.get(&format!("/v1/devices/veh:{VIN}")).await;
    (v["status"].as_str().unwrap().to_owned(), v["initialised"].as_bool().unwrap())
}

#[tokio::test]
async fn a_connected_vehicle_is_online_and_offline_once_it_leaves() {
    let stack = Stack::start(|_| {}).await;
    let token = stack.register_vehicle(VIN).await;
    assert_eq!(status(&stack).await, ("registered".to_owned(), true));
    let car = VendorCar::connect(stack.mqtt_addr(0), VIN, &token).await.unwrap();
    Stack::until("online", testkit::WAIT, || async { status(&stack).await.0 == "online" }).await;
    car.leave().await;
    Stack::until("offline", testkit::WAIT, || async { status(&stack).await.0 == "offline" }).await;
    let history = stack.get(&format!("/v1/devices/veh:{VIN}/history")).await;
    let reasons: Vec<&str> = history.as_array().unwrap().iter().filter_map(|h| h["reason"].as_str()).collect();
    assert!(reasons.contains(&"session_closed:peer_disconnect"), "{reasons:?}");
}

#[tokio::test]
async fn rotation_and_disable_end_a_vehicle_session_at_once() {
    let stack = Stack::start(|_| {}).await;
    let old = stack.register_vehicle(VIN).await;
    let mut car = VendorCar::connect(stack.mqtt_addr(0), VIN, &old).await.unwrap();
    let new = stack.rotate(&format!("veh:{VIN}")).await;
    assert!(car.dropped_within(Duration::from_secs(1)).await, "the session ends at the rotation");
    assert_eq!(
        refused(VendorCar::connect(stack.mqtt_addr(1), VIN, &old).await),
        ConnectReturnCode::BadUserNamePassword
    );
    let car = VendorCar::connect(stack.mqtt_addr(1), VIN, &new).await.unwrap();

    let mut car = car;
    stack.set_enabled(&format!("veh:{VIN}"), false).await;
    assert!(car.dropped_within(Duration::from_secs(1)).await, "a disabled vehicle keeps no session");
    assert_eq!(refused(VendorCar::connect(stack.mqtt_addr(0), VIN, &new).await), ConnectReturnCode::NotAuthorized);
    stack.set_enabled(&format!("veh:{VIN}"), true).await;
    Stack::until("a connect after enabling", Duration::from_secs(1), || async {
        VendorCar::connect(stack.mqtt_addr(0), VIN, &new).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn a_vin_used_twice_is_cooled_down() {
    let stack = Stack::start(|c| {
        c.flapping.max_logins = 3;
        c.flapping.cooldown_s = 30;
    })
    .await;
    let token = stack.register_vehicle(VIN).await;
    let mut cars = Vec::new();
    for n in 0..3 {
        cars.push(VendorCar::connect(stack.mqtt_addr(n % 2), VIN, &token).await.unwrap());
    }
    // 3.1.1 has no "connection rate exceeded": the refusal is "server unavailable".
    assert_eq!(
        refused(VendorCar::connect(stack.mqtt_addr(0), VIN, &token).await),
        ConnectReturnCode::ServiceUnavailable
    );
    assert_eq!(stack.metric(0, r#"gateway_flapping_cooldowns_total{protocol="mqtt"}"#), 1.0);
    assert_eq!(
        refused(VendorCar::connect(stack.mqtt_addr(1), VIN, &token).await),
        ConnectReturnCode::ServiceUnavailable
    );
    assert_eq!(stack.metric(1, r#"gateway_logins_total{protocol="mqtt",result="flapping"}"#), 1.0);
    // The last session is still served.
    let mut last = cars.pop().unwrap();
    assert!(!last.dropped_within(Duration::from_millis(300)).await);
}

#[tokio::test]
async fn the_car_is_told_when_the_owner_cancels() {
    let stack = Stack::start(|_| {}).await;
    let token = stack.register_vehicle(VIN).await;
    let mut car = VendorCar::connect(stack.mqtt_addr(0), VIN, &token).await.unwrap();
    car.publish("qr_request", &json!({"request_id": "r-1", "seat": "driver"})).await;
    let qr = car.downlink("qr_id").await["qr_id"].as_str().unwrap().to_owned();
    let api = stack.api();
    let owner = json!({"user_id": "u-1"});
    testkit::http::expect(api, "POST", &format!("/v1/activations/{qr}/scan"), Some(owner.clone()), 200).await;
    testkit::http::expect(api, "POST", &format!("/v1/activations/{qr}/cancel"), Some(owner), 200).await;
    let told = car.downlink("activation_result").await;
    assert_eq!(told, json!({"qr_id": qr, "outcome": "rejected", "reason": "cancelled"}));
}
