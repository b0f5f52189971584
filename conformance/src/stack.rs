//! Two gateway nodes and a device service on the test's own database and Redis prefix, with
//! the shipped defaults where the cases depend on them (the gateways' credential caches keep
//! their 10 s and 5 s lifetimes: what must be at once has to be at once despite them).

use std::net::SocketAddr;
use std::time::Duration;

use device_svc::DeviceService;
use device_svc::auth::Role;
use device_svc::auth::keys::{self, NewKey};
use gateway::Gateway;
use serde_json::{Value, json};
use testkit::http::{Api, Parties, expect};

/// One test's stack.
#[derive(Debug)]
pub struct Stack {
    /// The test's database.
    pub db: testkit::TestDatabase,
    /// The test's Redis prefix.
    pub ns: testkit::RedisNamespace,
    /// Nodes `gw-a` and `gw-b`.
    pub gateways: Vec<Gateway>,
    /// The device service.
    pub svc: DeviceService,
    /// The keys and payment secret of the flows' parties.
    pub parties: &'static Parties,
}

/// The payment provider the stack's device service trusts.
pub const PROVIDER: &str = "conformance-pay";
/// Its shared secret.
pub const PROVIDER_SECRET: &str = "conformance-provider-secret-0123";

#[allow(clippy::unwrap_used, clippy::missing_panics_doc)] // a test fixture: a failure is the test's
impl Stack {
    /// Starts everything; `tune` adjusts both gateways' configuration.
    pub async fn start(tune: impl Fn(&mut gateway::config::Config)) -> Self {
        let db = testkit::TestDatabase::create().await;
        let ns = testkit::RedisNamespace::create();
        let mut gateways = Vec::new();
        for node in ["gw-a", "gw-b"] {
            let mut c =
                gateway::config::Config { node_id: node.into(), key_prefix: ns.prefix.clone(), ..Default::default() };
            c.redis.url.clone_from(&ns.url);
            c.redis.node_ttl_ms = 2000;
            c.cabinet.listen = "127.0.0.1:0".into();
            c.mqtt.listen = "127.0.0.1:0".into();
            c.metrics.listen = String::new();
            c.commands.block_ms = 200;
            c.upstream.heartbeat_window_ms = 200;
            c.drain.spread_ms = 200;
            c.drain.grace_period_s = 3;
            tune(&mut c);
            gateways.push(Gateway::start(c.validate().unwrap()).await.unwrap());
        }
        let mut c = device_svc::config::Config {
            instance_id: "svc-1".into(),
            key_prefix: ns.prefix.clone(),
            ..Default::default()
        };
        c.http.listen = "127.0.0.1:0".into();
        c.postgres.url.clone_from(&db.url);
        c.postgres.pool_size = 4;
        c.redis.url.clone_from(&ns.url);
        c.streams.block_ms = 200;
        c.heartbeat.startup_grace_s = 0;
        c.commands.default_timeout_ms = 2000;
        c.vehicles.connect_send_retry_ms = 200;
        c.payments.providers =
            vec![device_svc::config::PaymentProvider { name: PROVIDER.into(), secret: PROVIDER_SECRET.into() }];
        let svc = DeviceService::start(c.validate().unwrap()).await.unwrap();
        let client = db.client().await;
        let parties = Parties::make(PROVIDER, PROVIDER_SECRET, |role, tenant| {
            let client = &client;
            async move {
                let role: Role = role.parse().unwrap();
                let new = NewKey { name: "conformance", role, tenant, created_by: "conformance" };
                keys::create(client, &new).await.unwrap().key
            }
        })
        .await;
        drop(client);
        Self { db, ns, gateways, svc, parties: Box::leak(Box::new(parties)) }
    }

    /// The API, called by the flows' parties.
    pub fn api(&self) -> Api {
        Api { addr: self.svc.addr, caller: testkit::http::Caller::Parties(self.parties) }
    }

    /// Node `i`'s cabinet listener.
    pub fn cabinet_addr(&self, i: usize) -> SocketAddr {
        self.gateways[i].addresses.cabinet.unwrap()
    }

    /// Node `i`'s MQTT listener.
    pub fn mqtt_addr(&self, i: usize) -> SocketAddr {
        self.gateways[i].addresses.mqtt.unwrap()
    }

    /// The value of the series `name{labels}` on node `i` (0 when absent).
    pub fn metric(&self, i: usize, series: &str) -> f64 {
        self.gateways[i]
            .metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.parse().ok()))
            .unwrap_or(0.0)
    }

    /// Registers a cabinet with one door of two lanes; returns its secret's 32 bytes.
    pub async fn register_cabinet(&self, id: &str) -> Vec<u8> {
        let body = json!({"id": id, "doors": [{"door_id": 1, "lanes": [{"lane_id": 1}, {"lane_id": 2}]}]});
        let issued = expect(self.api(), "POST", "/v1/cabinets", Some(body), 201).await;
        hex::decode(issued["secret"].as_str().unwrap()).unwrap()
    }

    /// Registers a vehicle at software 1.0.0, sold to user `u-1`; returns its token.
    pub async fn register_vehicle(&self, vin: &str) -> String {
        let body = json!({"vin": vin, "sw_version": "1.0.0", "buyer_user_id": "u-1"});
        let issued = expect(self.api(), "POST", "/v1/vehicles", Some(body), 201).await;
        issued["token"].as_str().or(issued["secret"].as_str()).unwrap().to_owned()
    }

    /// Issues new credentials; returns them (secret bytes for cabinets, the token for vehicles).
    pub async fn rotate(&self, key: &str) -> String {
        let issued = expect(self.api(), "POST", &format!("/v1/devices/{key}/credentials"), None, 200).await;
        issued["secret"].as_str().unwrap().to_owned()
    }

    /// Disables or enables a device.
    pub async fn set_enabled(&self, key: &str, enabled: bool) {
        let body = json!({ "enabled": enabled });
        expect(self.api(), "PUT", &format!("/v1/devices/{key}/enabled"), Some(body), 204).await;
    }

    /// `GET path`, expecting 200.
    pub async fn get(&self, path: &str) -> Value {
        expect(self.api(), "GET", path, None, 200).await
    }

    /// Polls `probe` every 20 ms until it holds, failing the test after `within`. Returns how
    /// long it took.
    pub async fn until<F, Fut>(what: &str, within: Duration, mut probe: F) -> Duration
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let started = tokio::time::Instant::now();
        loop {
            if probe().await {
                return started.elapsed();
            }
            assert!(started.elapsed() < within, "timed out after {within:?} waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
