//! Secrets never reach a log, at any level: both services run at `trace` (through the filter
//! the binaries use) while cabinets and a vehicle are registered, log in, are rotated and log in
//! again; then every secret, token and token hash used, in every form a log could print it
//! (hex, text, a byte list), is looked for in what was logged.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};

use conformance::cabinet::{VendorCabinet, status};
use conformance::stack::Stack;
use conformance::vehicle::VendorCar;
use sha2::{Digest, Sha256};

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

    tracing::trace!("marker: trace events are captured");
    let logged = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    assert!(logged.contains("cabinet logged in"), "the capture works: gateway logs are in it");
    assert!(logged.contains("marker: trace events are captured"), "trace level is on");
    let mut secrets = Vec::new();
    for secret in [&first, &second] {
        secrets.extend(forms(secret));
    }
    for token in [&token, &rotated] {
        secrets.push(token.clone());
        secrets.extend(forms(token.as_bytes()));
        secrets.extend(forms(&Sha256::digest(token.as_bytes())));
    }
    for secret in &secrets {
        assert!(!logged.contains(secret.as_str()), "a secret was logged: {secret}");
    }
}
