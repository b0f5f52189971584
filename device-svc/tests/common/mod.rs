//! The stack the device service's integration tests run against: a PostgreSQL database and a
//! Redis key prefix of the test's own, a real gateway node on port 0, device-service instances
//! (in-process, or as a child process to be killed), cabinets over real sockets, and a small
//! HTTP/1.1 client for the API.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use device_svc::DeviceService;
use device_svc::auth::Role;
use device_svc::auth::keys::{self, NewKey};
use futures_util::{SinkExt, StreamExt};
use gateway::Gateway;
use protocol::DeviceId;
use protocol::bus::Keys;
use protocol::cabinet::{Frame, Heartbeat, LaneWeight, LoginStatus, Message, WeightReport};
use redis_conn::{RedisConn, RedisTarget};
use serde_json::{Value, json};
use testkit::cabinet::Cabinet;
pub use testkit::http::{Api, Parties};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod buying;
pub mod car;
pub mod shop;

pub use testkit::WAIT;

/// Heartbeat interval the tests' gateway asks for and their cabinets keep, seconds.
pub const INTERVAL_S: u64 = 1;
/// Offline threshold of the tests' device service, seconds.
pub const OFFLINE_AFTER_S: u64 = 7;

/// Wall clock in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    device_svc::app::now_ms()
}

/// One test's PostgreSQL database, Redis prefix and gateway node.
pub struct Stack {
    pub db: testkit::TestDatabase,
    pub ns: testkit::RedisNamespace,
    pub keys: Keys,
    pub redis: RedisConn,
    pub gateway: Gateway,
    pub node: String,
    /// The API keys and payment secret of the flows' parties (in this test's database).
    pub parties: &'static Parties,
    /// The private Redis of a test that crashes it ([`Stack::new_private_redis`]).
    pub server: Option<std::sync::Mutex<testkit::redis_server::RedisServer>>,
    /// The Redis every part of the stack uses: the run's shared server, or the Redis Cluster
    /// named by `TEST_REDIS_CLUSTER` ([`cluster_seeds`]).
    pub target: RedisTarget,
}

/// Seed URLs of the Redis Cluster the stacks run on instead of one server, from
/// `TEST_REDIS_CLUSTER` (comma-separated; `scripts/test` starts a three-node cluster and runs
/// the flows' tests on it once more).
pub fn cluster_seeds() -> Option<Vec<String>> {
    let seeds = std::env::var("TEST_REDIS_CLUSTER").ok()?;
    let seeds: Vec<String> = seeds.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
    (!seeds.is_empty()).then_some(seeds)
}

/// The payment provider the tests' device services trust.
pub const PROVIDER: &str = "test-pay";
/// Its shared secret.
pub const PROVIDER_SECRET: &str = "test-provider-secret-0123456789";

impl Stack {
    /// A fresh database and prefix, and one gateway node.
    pub async fn new() -> Self {
        match cluster_seeds() {
            Some(seeds) => {
                // A fresh prefix on the cluster; its keys go with the cluster.
                let ns = testkit::RedisNamespace {
                    url: seeds[0].clone(),
                    prefix: format!("{}:", testkit::unique_name("ns")),
                };
                Self::with(ns, None, RedisTarget::Cluster(seeds)).await
            }
            None => {
                let ns = testkit::RedisNamespace::create();
                let target = RedisTarget::Single(ns.url.clone());
                Self::with(ns, None, target).await
            }
        }
    }

    /// As [`Stack::new`] on a private Redis with the append-only file (`appendfsync
    /// everysec`, as production runs it), for a test that kills and restarts it
    /// ([`Stack::crash_redis`]).
    pub async fn new_private_redis() -> Self {
        let server = tokio::task::spawn_blocking(testkit::redis_server::RedisServer::start_durable).await.unwrap();
        let ns = testkit::RedisNamespace { url: server.url(), prefix: "t:".into() };
        let target = RedisTarget::Single(ns.url.clone());
        Self::with(ns, Some(std::sync::Mutex::new(server)), target).await
    }

    /// Kills the private Redis with SIGKILL and starts it again from its append-only file.
    pub async fn crash_redis(&self) {
        let server = self.server.as_ref().expect("a stack on a private Redis");
        tokio::task::block_in_place(|| server.lock().unwrap().restart());
    }

    async fn with(
        ns: testkit::RedisNamespace,
        server: Option<std::sync::Mutex<testkit::redis_server::RedisServer>>,
        target: RedisTarget,
    ) -> Self {
        let db = testkit::TestDatabase::create().await;
        let keys = Keys::new(ns.prefix.clone());
        let redis = RedisConn::open(&target, None).await.unwrap();
        let node = "gw-a".to_owned();
        let gateway = Gateway::start(gateway_config(&ns, &target, &node).validate().unwrap()).await.unwrap();
        let parties = Box::leak(Box::new(parties(&db).await));
        Self { db, ns, keys, redis, gateway, node, parties, server, target }
    }

    /// A connection of its own to the stack's Redis, with a response timeout if given.
    pub async fn redis_connection(&self, timeout: Option<Duration>) -> RedisConn {
        RedisConn::open(&self.target, timeout).await.unwrap()
    }

    /// The API at `addr`, called by the flows' parties.
    pub fn api(&self, addr: SocketAddr) -> Api {
        Api { addr, caller: testkit::http::Caller::Parties(self.parties) }
    }

    /// A fresh key of `role` (and `tenant`).
    pub async fn key(&self, role: Role, tenant: Option<&str>) -> String {
        new_key(&self.db.client().await, role, tenant).await
    }

    /// The gateway's cabinet listener.
    pub fn cabinet_addr(&self) -> SocketAddr {
        self.gateway.addresses.cabinet.unwrap()
    }

    /// The gateway's MQTT listener.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.gateway.addresses.mqtt.unwrap()
    }

    /// A device-service configuration on this stack with short timers.
    pub fn svc_config(&self, instance: &str) -> device_svc::config::Config {
        let mut c = device_svc::config::Config {
            instance_id: instance.into(),
            key_prefix: self.ns.prefix.clone(),
            ..Default::default()
        };
        c.http.listen = "127.0.0.1:0".into();
        c.postgres.url.clone_from(&self.db.url);
        c.postgres.pool_size = 4;
        c.redis.url.clone_from(&self.ns.url);
        if let RedisTarget::Cluster(seeds) = &self.target {
            c.redis.cluster_urls.clone_from(seeds);
        }
        c.streams.block_ms = 200;
        c.streams.claim_idle_ms = 1000;
        c.streams.claim_interval_ms = 300;
        c.heartbeat.interval_s = INTERVAL_S;
        c.heartbeat.offline_after_s = OFFLINE_AFTER_S;
        c.heartbeat.window_s = 2;
        c.heartbeat.check_interval_ms = 50;
        c.heartbeat.startup_grace_s = 0;
        c.heartbeat.recheck_s = 1;
        c.commands.default_timeout_ms = 2000;
        c.vehicles.downlink_timeout_ms = 3000;
        c.vehicles.connect_send_retry_ms = 200;
        c.ota.poll_ms = 100;
        c.payments.providers =
            vec![device_svc::config::PaymentProvider { name: PROVIDER.into(), secret: PROVIDER_SECRET.into() }];
        // Contracts have tests of their own (tests/money.rs); elsewhere a user needs none.
        c.purchases.require_contract = false;
        // The tests' parties send bursts (a test's setup); rate limits have a test of their own.
        c.auth.rate_per_s = 0;
        // A failed upgrade is not notified again unless a test asks (tests/ota_rollout.rs).
        c.ota.repush_max = 0;
        // Stored OTA packages on, in a directory of this test's own.
        let p = &mut c.ota.packages;
        p.master_keys = device_svc::secret::SecretText(format!("test:{}", "42".repeat(32)));
        p.signing_key = device_svc::secret::SecretText("43".repeat(32));
        p.path = std::env::temp_dir()
            .join(format!("iotgw-ota-{}", self.ns.prefix.trim_end_matches(':')))
            .to_string_lossy()
            .into_owned();
        c
    }

    /// An in-process device service.
    pub async fn service(&self, instance: &str) -> DeviceService {
        self.service_with(self.svc_config(instance)).await
    }

    /// An in-process device service with `config`.
    pub async fn service_with(&self, config: device_svc::config::Config) -> DeviceService {
        DeviceService::start(config.validate().unwrap()).await.unwrap()
    }

    /// A client of this test's database.
    pub async fn pg(&self) -> tokio_postgres::Client {
        self.db.client().await
    }
}

async fn new_key(client: &tokio_postgres::Client, role: Role, tenant: Option<&str>) -> String {
    let new = NewKey { name: "test", role, tenant, created_by: "test" };
    keys::create(client, &new).await.unwrap().key
}

/// Applies the migrations to the test's database and makes a key for each party.
async fn parties(db: &testkit::TestDatabase) -> Parties {
    let cfg = device_svc::config::PostgresConfig { url: db.url.clone(), pool_size: 1, ..Default::default() };
    let pool = device_svc::db::pool(&cfg).unwrap();
    device_svc::db::migrate(&pool).await.unwrap();
    let client = db.client().await;
    Parties::make(PROVIDER, PROVIDER_SECRET, |role, tenant| {
        let client = &client;
        async move { new_key(client, role.parse().unwrap(), tenant).await }
    })
    .await
}

fn gateway_config(ns: &testkit::RedisNamespace, target: &RedisTarget, node: &str) -> gateway::config::Config {
    let mut c = gateway::config::Config { node_id: node.into(), key_prefix: ns.prefix.clone(), ..Default::default() };
    c.redis.url.clone_from(&ns.url);
    if let RedisTarget::Cluster(seeds) = target {
        c.redis.cluster_urls.clone_from(seeds);
    }
    c.redis.node_ttl_ms = 2000;
    c.cabinet.listen = "127.0.0.1:0".into();
    c.mqtt.listen = "127.0.0.1:0".into();
    c.metrics.listen = String::new();
    c.cabinet.heartbeat_interval_s = u16::try_from(INTERVAL_S).unwrap();
    // The device service judges silence here, not the gateway's idle timeout.
    c.cabinet.idle_timeout_ms = 120_000;
    c.upstream.heartbeat_window_ms = 200;
    c.commands.block_ms = 200;
    c.auth.cache_ttl_s = 0;
    c.auth.negative_cache_ttl_s = 0;
    c.drain.spread_ms = 200;
    c.drain.grace_period_s = 3;
    c
}

pub use testkit::http::{call as http, expect};

/// Registers a cabinet with `doors` (door id, lane count); returns its id and secret.
pub async fn register_cabinet(api: Api, id: &str, doors: &[(u8, u8)]) -> (DeviceId, Vec<u8>) {
    let doors: Vec<Value> = doors
        .iter()
        .map(|(door, lanes)| json!({"door_id": door, "lanes": (1..=*lanes).map(|l| json!({"lane_id": l})).collect::<Vec<_>>()}))
        .collect();
    let issued = expect(api, "POST", "/v1/cabinets", Some(json!({"id": id, "doors": doors})), 201).await;
    let secret = hex::decode(issued["secret"].as_str().unwrap()).unwrap();
    (DeviceId::new(id).unwrap(), secret)
}

/// Logs a cabinet in and expects acceptance.
pub async fn login(addr: SocketAddr, id: &DeviceId, secret: &[u8]) -> Cabinet {
    let (cabinet, result) = Cabinet::login(addr, id, secret).await;
    assert_eq!(result.status, LoginStatus::Accepted, "{id} logs in");
    cabinet
}

/// Polls `probe` every 20 ms until it returns `Some`, failing the test after `within`.
pub async fn wait_until<T, F, Fut>(what: &str, within: Duration, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_until(what, within, Duration::from_millis(20), probe).await
}

/// Polls `probe` every `every` until it returns `Some`, failing the test after `within` (a
/// test running many cabinets at once polls less often).
pub async fn poll_until<T, F, Fut>(what: &str, within: Duration, every: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(every).await;
    }
}

/// Waits until `key`'s status is `status`; returns the device view.
pub async fn wait_status(api: Api, key: &str, status: &str) -> Value {
    wait_until(&format!("{key} {status}"), WAIT, || async {
        let (code, v) = http(api, "GET", &format!("/v1/devices/{key}"), None).await;
        (code == 200 && v["status"] == status).then_some(v)
    })
    .await
}

/// A weight report of `lanes` lanes of `door`, all with `grams` and `stable`.
pub fn report(door: u8, lanes: u8, grams: i32, stable: bool, sample_time_ms: u64) -> Message {
    Message::WeightReport(WeightReport {
        door_id: door,
        sample_time_ms,
        lanes: (1..=lanes).map(|lane_id| LaneWeight { lane_id, grams, stable }).collect(),
    })
}

/// A cabinet that keeps its heartbeat in a task of its own (and reads and drops whatever the
/// gateway sends), until told to stop beating or to disconnect.
pub struct Beating {
    pub id: DeviceId,
    beating: Arc<AtomicBool>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Beating {
    pub fn start(mut cabinet: Cabinet) -> Self {
        let id = cabinet.id.clone();
        let beating = Arc::new(AtomicBool::new(true));
        let stop = CancellationToken::new();
        let (b, s) = (Arc::clone(&beating), stop.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(INTERVAL_S));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if b.load(Ordering::SeqCst) {
                            let seq = cabinet.next_seq();
                            let hb = Message::Heartbeat(Heartbeat { device_time_ms: now_ms() });
                            if cabinet.framed.send(Frame::new(seq, hb)).await.is_err() {
                                return;
                            }
                        }
                    }
                    frame = cabinet.framed.next() => if frame.is_none() { return },
                    () = s.cancelled() => return,
                }
            }
        });
        Self { id, beating, stop, task }
    }

    /// Stops (or resumes) the heartbeat; the connection stays open.
    pub fn set_beating(&self, on: bool) {
        self.beating.store(on, Ordering::SeqCst);
    }

    /// Closes the connection.
    pub async fn close(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// The service's `/metrics` text, read with the tests' metrics key.
///
/// # Panics
/// When `/metrics` does not answer 200 with text.
pub async fn metrics_text(api: Api) -> String {
    let (status, body) = http(api, "GET", "/metrics", None).await;
    assert_eq!(status, 200, "/metrics answered {body}");
    body.as_str().expect("/metrics is text").to_owned()
}

/// The value of a metric line `name{labels}` in `/metrics` output (summed over matches).
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name_and_labels))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// A device service in a child process of its own, killed (SIGKILL) on drop.
pub struct Process(std::process::Child);

impl Process {
    /// Kills it with SIGKILL (nothing handed back, as in a crash) and waits for it to exit.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts the `device-svc` binary with `c` (the settings the tests change, written as TOML
/// in `dir`, its log beside it).
pub fn spawn_process(c: &device_svc::config::Config, dir: &std::path::Path) -> Process {
    let providers: Vec<String> = c
        .payments
        .providers
        .iter()
        .map(|p| format!("{{ name = \"{}\", secret = \"{}\" }}", p.name, p.secret))
        .collect();
    let p = &c.purchases;
    let toml = format!(
        "instance_id = \"{}\"\nkey_prefix = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n\
         [postgres]\nurl = \"{}\"\npool_size = {}\n[redis]\nurl = \"{}\"\ncluster_urls = [{}]\n\
         [streams]\nblock_ms = {}\nclaim_idle_ms = {}\nclaim_interval_ms = {}\n\
         [heartbeat]\ninterval_s = {}\noffline_after_s = {}\nwindow_s = {}\ncheck_interval_ms = {}\n\
         startup_grace_s = {}\nrecheck_s = {}\n\
         [commands]\ndefault_timeout_ms = {}\n\
         [purchases]\nopen_timeout_ms = {}\nquery_interval_ms = {}\nsettle_wait_s = {}\nlock_ttl_s = {}\n\
         poll_ms = {}\nrequire_contract = {}\nsettlement_resend_s = {}\ninspection_anomalies = {}\n\
         [auth]\nrate_per_s = {}\n[payments]\nproviders = [{}]\n",
        c.instance_id,
        c.key_prefix,
        c.postgres.url,
        c.postgres.pool_size,
        c.redis.url,
        c.redis.cluster_urls.iter().map(|u| format!("\"{u}\"")).collect::<Vec<_>>().join(", "),
        c.streams.block_ms,
        c.streams.claim_idle_ms,
        c.streams.claim_interval_ms,
        c.heartbeat.interval_s,
        c.heartbeat.offline_after_s,
        c.heartbeat.window_s,
        c.heartbeat.check_interval_ms,
        c.heartbeat.startup_grace_s,
        c.heartbeat.recheck_s,
        c.commands.default_timeout_ms,
        p.open_timeout_ms,
        p.query_interval_ms,
        p.settle_wait_s,
        p.lock_ttl_s,
        p.poll_ms,
        p.require_contract,
        p.settlement_resend_s,
        p.inspection_anomalies,
        c.auth.rate_per_s,
        providers.join(", "),
    );
    let path = dir.join(format!("{}.toml", c.instance_id));
    std::fs::write(&path, toml).unwrap();
    let log = std::fs::File::create(dir.join(format!("{}.log", c.instance_id))).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_device-svc"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Process(child)
}
