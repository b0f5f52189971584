//! A vehicle for the tests: a real MQTT client (rumqttc) with the vehicle's token, subscribed
//! to its downlinks, publishing JSON uplinks as SPEC.md part 2 describes.

use std::collections::VecDeque;
use std::net::SocketAddr;

use testkit::http::Api;

use protocol::Vin;
use protocol::mqtt::topic::{self, DownlinkKind, UplinkKind};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

use super::{WAIT, expect};

/// Registers a vehicle with `profile` fields (state, purpose, sw_version, model); returns its token.
pub async fn register_vehicle(api: Api, vin: &str, profile: Value) -> String {
    let mut body = json!({"vin": vin});
    if let (Some(b), Some(p)) = (body.as_object_mut(), profile.as_object()) {
        b.extend(p.clone());
    }
    let issued = expect(api, "POST", "/v1/vehicles", Some(body), 201).await;
    issued["secret"].as_str().unwrap().to_owned()
}

/// A connected vehicle.
pub struct Car {
    pub vin: Vin,
    client: AsyncClient,
    events: testkit::mqtt::Events,
    /// Downlinks received while waiting for another kind.
    held: VecDeque<(DownlinkKind, Value)>,
}

impl Car {
    /// Connects (clean session), subscribes to `vehicles/{VIN}/down/#` at QoS 1 and waits for
    /// the SUBACK.
    pub async fn connect(addr: SocketAddr, vin: &str, token: &str) -> Self {
        let vin = Vin::new(vin).unwrap();
        let mut o = MqttOptions::new(vin.as_str(), addr.ip().to_string(), addr.port());
        o.set_credentials(vin.as_str(), token);
        o.set_keep_alive(std::time::Duration::from_secs(30));
        let (client, eventloop) = AsyncClient::new(o, 32);
        let events = testkit::mqtt::forward(eventloop);
        let mut car = Self { vin, client, events, held: VecDeque::new() };
        car.wait_packet("connack", |p| matches!(p, Packet::ConnAck(_))).await;
        car.client.subscribe(topic::downlink_filter(&car.vin), QoS::AtLeastOnce).await.unwrap();
        car.wait_packet("suback", |p| matches!(p, Packet::SubAck(_))).await;
        car
    }

    async fn next_packet(&mut self) -> Packet {
        loop {
            match tokio::time::timeout(WAIT, self.events.recv()).await.expect("vehicle event in time") {
                Some(Ok(Event::Incoming(p))) => return p,
                Some(Ok(Event::Outgoing(_))) => {}
                Some(Err(e)) => panic!("vehicle {} connection failed: {e}", self.vin),
                None => panic!("vehicle {} event loop gone", self.vin),
            }
        }
    }

    async fn wait_packet(&mut self, what: &str, pred: impl Fn(&Packet) -> bool) {
        loop {
            let p = self.next_packet().await;
            if pred(&p) {
                return;
            }
            if let Some(d) = self.downlink_of(&p) {
                self.held.push_back(d);
                continue;
            }
            assert!(matches!(p, Packet::PingResp | Packet::PubAck(_)), "unexpected {p:?} waiting for {what}");
        }
    }

    fn downlink_of(&self, p: &Packet) -> Option<(DownlinkKind, Value)> {
        let Packet::Publish(publish) = p else { return None };
        let prefix = format!("vehicles/{}/down/", self.vin);
        let kind: DownlinkKind = publish.topic.strip_prefix(&prefix)?.parse().ok()?;
        Some((kind, serde_json::from_slice(&publish.payload).expect("downlink is JSON")))
    }

    /// Publishes an uplink at QoS 1 and waits for its PUBACK.
    pub async fn publish(&mut self, kind: UplinkKind, body: Value) {
        let t = topic::uplink_topic(&self.vin, kind);
        self.client.publish(t, QoS::AtLeastOnce, false, body.to_string()).await.unwrap();
        self.wait_packet("puback", |p| matches!(p, Packet::PubAck(_))).await;
    }

    /// The next downlink of `kind` (others are held for later calls).
    pub async fn next(&mut self, kind: DownlinkKind) -> Value {
        if let Some(at) = self.held.iter().position(|(k, _)| *k == kind) {
            return self.held.remove(at).unwrap().1;
        }
        loop {
            let p = self.next_packet().await;
            match self.downlink_of(&p) {
                Some((k, v)) if k == kind => return v,
                Some(other) => self.held.push_back(other),
                None => {}
            }
        }
    }

    /// Disconnects cleanly.
    pub async fn disconnect(mut self) {
        let _ = self.client.disconnect().await;
        while let Ok(Some(e)) = tokio::time::timeout(WAIT, self.events.recv()).await {
            if e.is_err() {
                return;
            }
        }
    }
}
