//! Secrets never reach a log, at any level: both services run at `trace` (through the filter
//! the binaries use) while cabinets and a vehicle are registered, log in, are rotated and log in
//! again, and a purchase is ordered by the shop and authorised by the payment provider's signed
//! callback; then every secret, token, token hash, API key and the provider's secret used, in
//! every form a log could print it (hex, text, a byte list), is looked for in what was logged.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conformance::cabinet::now_ms;
use conformance::cabinet::{VendorCabinet, status};
use conformance::stack::Stack;
use conformance::vehicle::VendorCar;
use protocol::cabinet::{LaneWeight, Message, WeightReport};
use serde_json::json;
use sha2::{Digest, Sha256};
use testkit::http::expect;

/// Everything the process logged.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The forms a secret could take in a log line.
fn forms(bytes: &[u8]) -> Vec<String> {
    vec![hex::encode(bytes), hex::encode_upper(bytes), format!("{bytes:?}")]
}

#[tokio::test]
async fn no_secret_is_logged_even_at_trace() {
    let capture = Capture::default();
    let sink = capture.clone();
    tracing_subscriber::fmt()
        .with_env_filter(service_kit::run::log_filter(Some("trace")))
        .with_writer(move || sink.clone())
        .try_init()
        .unwrap();

    let stack = Stack::start(|_| {}).await;
    let first = stack.register_cabinet("CAB-SECRET").await;
    let mut cab = VendorCabinet::connect(stack.cabinet_addr(0), "CAB-SECRET").await;
    assert_eq!(cab.login_v1(&first).await.0, status::ACCEPTED);
    let second = hex::decode(stack.rotate("cab:CAB-SECRET").await).unwrap();
    let mut cab = VendorCabinet::connect(stack.cabinet_addr(1), "CAB-SECRET").await;
    assert_eq!(cab.login_v2(&second).await.0, status::ACCEPTED);

    let vin = "LSVAU2180N2183294";
    let token = stack.register_vehicle(vin).await;
    VendorCar::connect(stack.mqtt_addr(0), vin, &token).await.unwrap().leave().await;
    let rotated = stack.rotate(&format!("veh:{vin}")).await;
    VendorCar::connect(stack.mqtt_addr(1), vin, &rotated).await.unwrap().leave().await;

    // A purchase: the cabinet reports its lanes and goes online, the provider signs the
    // shopper's contract, the shop orders, the provider authorises with its signature.
    let shelf_secret = stack.register_cabinet("CAB-SHELF").await;
    let id = protocol::DeviceId::new("CAB-SHELF").unwrap();
    let (mut shelf, _) = testkit::cabinet::Cabinet::login(stack.cabinet_addr(0), &id, &shelf_secret).await;
    let lanes = (1..=2).map(|lane_id| LaneWeight { lane_id, grams: 1000, stable: true }).collect();
    shelf.send(Message::WeightReport(WeightReport { door_id: 1, sample_time_ms: now_ms(), lanes })).await;
    Stack::until("the cabinet is online", Duration::from_secs(10), || async {
        stack.get("/v1/devices/cab:CAB-SHELF").await["status"] == "online"
    })
    .await;
    let contract = json!({"tenant": "shop-1", "user_id": "u-secret", "contract_id": "ct-s", "state": "signed",
                          "event_ms": now_ms()});
    expect(stack.api(), "POST", "/v1/contracts/callback", Some(contract), 200).await;
    let order = json!({"user_id": "u-secret", "cabinet_id": "CAB-SHELF", "door_id": 1});
    let order = expect(stack.api(), "POST", "/v1/orders", Some(order), 201).await;
    let hold = order["hold_cents"].as_i64().unwrap();
    let paid = json!({"order_id": order["id"], "status": "authorised", "payment_id": "p-s", "amount_cents": hold, "currency": "CNY"});
    let paid = expect(stack.api(), "POST", "/v1/payments/callback", Some(paid), 200).await;
    assert_eq!(paid["state"], "authorised");

    tracing::trace!("marker: trace events are captured");
    let logged = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    assert!(logged.contains("cabinet logged in"), "the capture works: gateway logs are in it");
    assert!(logged.contains("marker: trace events are captured"), "trace level is on");
    let mut secrets = Vec::new();
    for secret in [&first, &second, &shelf_secret] {
        secrets.extend(forms(secret));
    }
    for token in [&token, &rotated] {
        secrets.push(token.clone());
        secrets.extend(forms(token.as_bytes()));
        secrets.extend(forms(&Sha256::digest(token.as_bytes())));
    }
    let parties = stack.parties;
    for key in [&parties.operator, &parties.viewer, &parties.shop, &parties.owner_app] {
        // The whole key and its secret half (the id alone is public: the audit trail names it).
        secrets.push(key.clone());
        secrets.push(key[22..].to_owned());
    }
    secrets.push(parties.provider_secret.clone());
    for secret in &secrets {
        assert!(!logged.contains(secret.as_str()), "a secret was logged: {secret}");
    }
}
