//! A vehicle as a car maker writes it from SPEC.md part 2: rumqttc (an MQTT 3.1.1 client nobody
//! here wrote), topic strings and JSON, nothing from the `protocol` crate.

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

use crate::cabinet::WAIT;

/// A connected vehicle: its client and what its event loop saw.
#[derive(Debug)]
pub struct VendorCar {
    /// The VIN.
    pub vin: String,
    client: AsyncClient,
    events: testkit::mqtt::Events,
}

#[allow(clippy::unwrap_used, clippy::missing_panics_doc)] // a test client: a failure is the test's
impl VendorCar {
    /// Connects with a clean session and subscribes to `vehicles/{VIN}/down/#`. `Err` is the
    /// client's refusal (a `CONNACK` return code, or the connection closing).
    pub async fn connect(addr: SocketAddr, vin: &str, token: &str) -> Result<Self, ConnectionError> {
        let mut o = MqttOptions::new(vin, addr.ip().to_string(), addr.port());
        o.set_credentials(vin, token);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(o, 32);
        loop {
            match tokio::time::timeout(WAIT, eventloop.poll()).await.expect("CONNACK in time") {
                Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        let events = testkit::mqtt::forward(eventloop);
        let car = Self { vin: vin.to_owned(), client, events };
        car.client.subscribe(format!("vehicles/{vin}/down/#"), QoS::AtLeastOnce).await.unwrap();
        Ok(car)
    }

    /// Publishes `payload` to `vehicles/{VIN}/up/{kind}` at QoS 1.
    pub async fn publish(&self, kind: &str, payload: &Value) {
        let topic = format!("vehicles/{}/up/{kind}", self.vin);
        self.client.publish(topic, QoS::AtLeastOnce, false, payload.to_string()).await.unwrap();
    }

    /// The next downlink of `kind` (others are skipped).
    pub async fn downlink(&mut self, kind: &str) -> Value {
        let topic = format!("vehicles/{}/down/{kind}", self.vin);
        loop {
            let event = tokio::time::timeout(WAIT, self.events.recv()).await.expect("a downlink in time");
            match event.expect("event loop running") {
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topic => {
                    return serde_json::from_slice(&p.payload).unwrap();
                }
                Ok(_) => {}
                Err(e) => panic!("connection ended while waiting for {kind}: {e}"),
            }
        }
    }

    /// `true` once the gateway ended the connection within `within`.
    pub async fn dropped_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return false,
                Ok(None | Some(Err(_))) => return true,
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Disconnects cleanly (MQTT DISCONNECT).
    pub async fn leave(mut self) {
        self.client.disconnect().await.unwrap();
        let _ = self.dropped_within(WAIT).await;
    }
}
