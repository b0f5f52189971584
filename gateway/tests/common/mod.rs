//! Helpers for the gateway's integration tests: a Redis namespace (or a private cluster) per
//! test, gateways on port 0, provisioned devices, a cabinet client speaking SPEC.md part 1, a
//! command sender that uses the connection map as the device service does, and readers of the
//! upstream streams.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use gateway::Gateway;
use gateway::config::Config;
use protocol::bus::{CommandBody, CommandReply, CommandRequest, DeviceKey, Keys, UpEvent};
use protocol::{DeviceId, Vin};
use redis::streams::StreamReadReply;
use redis_conn::{RedisConn, RedisTarget};
use sha2::Digest;

/// How long a test waits for anything before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// Where a test's Redis state lives.
pub struct Env {
    pub target: RedisTarget,
    pub keys: Keys,
    pub redis: RedisConn,
    _ns: Option<testkit::RedisNamespace>,
    _cluster: Option<testkit::redis_server::RedisCluster>,
    _server: Option<testkit::redis_server::RedisServer>,
    /// Last id read per upstream shard, so waits see each entry once.
    cursors: HashMap<u16, String>,
    seen: Vec<UpEvent>,
    pub shards: u16,
}

use redis_conn::bulk_fields as bulk;

impl Env {
    /// The run's shared Redis, under a fresh key prefix.
    pub async fn single() -> Self {
        let ns = testkit::RedisNamespace::create();
        let target = RedisTarget::Single(ns.url.clone());
        let keys = Keys::new(ns.prefix.clone());
        Self::with(target, keys, Some(ns), None, None).await
    }

    /// A private three-node Redis Cluster.
    pub async fn cluster() -> Self {
        let cluster = tokio::task::spawn_blocking(|| testkit::redis_server::RedisCluster::start(3)).await.unwrap();
        let target = RedisTarget::Cluster(cluster.urls());
        Self::with(target, Keys::new("t:"), None, Some(cluster), None).await
    }

    /// A private single Redis, for tests that stop and restart it.
    pub async fn private() -> Self {
        Self::private_from(testkit::redis_server::RedisServer::start).await
    }

    /// A private single Redis with the append-only file, for tests that crash it.
    #[allow(dead_code)] // not every test binary crashes Redis
    pub async fn private_durable() -> Self {
        Self::private_from(testkit::redis_server::RedisServer::start_durable).await
    }

    async fn private_from(start: fn() -> testkit::redis_server::RedisServer) -> Self {
        let server = tokio::task::spawn_blocking(start).await.unwrap();
        let target = RedisTarget::Single(server.url());
        Self::with(target, Keys::new("t:"), None, None, Some(server)).await
    }

    async fn with(
        target: RedisTarget,
        keys: Keys,
        ns: Option<testkit::RedisNamespace>,
        cluster: Option<testkit::redis_server::RedisCluster>,
        server: Option<testkit::redis_server::RedisServer>,
    ) -> Self {
        let redis = RedisConn::open(&target, None).await.expect("redis reachable");
        Self {
            target,
            keys,
            redis,
            _ns: ns,
            _cluster: cluster,
            _server: server,
            cursors: HashMap::new(),
            seen: Vec::new(),
            shards: 4,
        }
    }

    pub fn server_mut(&mut self) -> &mut testkit::redis_server::RedisServer {
        self._server.as_mut().expect("a private server")
    }

    /// A configuration for node `node` with every port 0 and short timers.
    pub fn config(&self, node: &str) -> Config {
        let mut c = Config { node_id: node.into(), key_prefix: self.keys.prefix().into(), ..Config::default() };
        match &self.target {
            RedisTarget::Single(url) => c.redis.url.clone_from(url),
            RedisTarget::Cluster(urls) => c.redis.cluster_urls.clone_from(urls),
        }
        c.redis.node_ttl_ms = 2000;
        c.cabinet.listen = "127.0.0.1:0".into();
        c.mqtt.listen = "127.0.0.1:0".into();
        c.metrics.listen = "127.0.0.1:0".into();
        c.cabinet.login_timeout_ms = 1000;
        c.mqtt.connect_timeout_ms = 1000;
        c.upstream.shards = self.shards;
        c.upstream.heartbeat_window_ms = 200;
        c.commands.block_ms = 200;
        c.drain.spread_ms = 300;
        c.drain.grace_period_s = 5;
        c
    }

    pub async fn start(&self, node: &str) -> Gateway {
        self.start_with(self.config(node)).await
    }

    pub async fn start_with(&self, config: Config) -> Gateway {
        Gateway::start(config.validate().expect("valid test config")).await.expect("gateway starts")
    }

    /// Registers a cabinet's secret where gateways read it; returns the id and secret.
    pub async fn provision_cabinet(&self, id: &str) -> (DeviceId, Vec<u8>) {
        let id = DeviceId::new(id).unwrap();
        let secret: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
        let key = self.keys.credentials(&DeviceKey::Cabinet(id.clone()));
        let mut con = self.redis.clone();
        let _: () = redis::cmd("HSET")
            .arg(key)
            .arg("secret")
            .arg(hex::encode(&secret))
            .arg("status")
            .arg("enabled")
            .query_async(&mut con)
            .await
            .unwrap();
        (id, secret)
    }

    /// Registers a vehicle's token; returns the VIN and token.
    pub async fn provision_vehicle(&self, vin: &str) -> (Vin, String) {
        let vin = Vin::new(vin).unwrap();
        let token = format!("tok-{:016x}", fastrand::u64(..));
        let key = self.keys.credentials(&DeviceKey::Vehicle(vin.clone()));
        let mut con = self.redis.clone();
        let _: () = redis::cmd("HSET")
            .arg(key)
            .arg("token_sha256")
            .arg(hex::encode(sha2::Sha256::digest(token.as_bytes())))
            .arg("status")
            .arg("enabled")
            .query_async(&mut con)
            .await
            .unwrap();
        (vin, token)
    }

    /// The device's connection-map entry.
    pub async fn map_entry(&self, device: &DeviceKey) -> HashMap<String, String> {
        let mut con = self.redis.clone();
        redis::cmd("HGETALL").arg(self.keys.conn(device)).query_async(&mut con).await.unwrap()
    }

    /// Reads new upstream entries from every shard (blocking briefly on each).
    /// Reads what arrived since the last read, at most `READ_COUNT` entries per shard; returns
    /// whether a shard may hold more (it gave that many).
    async fn read_new(&mut self) -> bool {
        const READ_COUNT: usize = 1000;
        let mut more = false;
        for shard in 0..self.shards {
            let cursor = self.cursors.entry(shard).or_insert_with(|| "0".into()).clone();
            let mut con = self.redis.clone();
            let read: redis::RedisResult<Option<StreamReadReply>> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(READ_COUNT)
                .arg("BLOCK")
                .arg(50)
                .arg("STREAMS")
                .arg(self.keys.upstream(shard))
                .arg(&cursor)
                .query_async(&mut con)
                .await;
            // A Redis that was just restarted fails the first request; the next one reconnects.
            let Ok(reply) = read else { continue };
            for key in reply.map(|r| r.keys).unwrap_or_default() {
                more |= key.ids.len() >= READ_COUNT;
                for entry in key.ids {
                    self.cursors.insert(shard, entry.id.clone());
                    let event = UpEvent::from_fields(&bulk(entry.map)).expect("valid upstream entry");
                    self.seen.push(event);
                }
            }
        }
        more
    }

    /// Waits until an upstream entry matching `pred` has arrived, and returns it.
    pub async fn wait_upstream(&mut self, what: &str, pred: impl Fn(&UpEvent) -> bool) -> UpEvent {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(e) = self.seen.iter().find(|e| pred(e)) {
                return e.clone();
            }
            assert!(tokio::time::Instant::now() < deadline, "no upstream entry: {what}; saw {:?}", self.seen);
            self.read_new().await;
        }
    }

    /// Waits until `n` upstream entries match `pred`; returns them.
    pub async fn wait_upstream_count(&mut self, what: &str, n: usize, pred: impl Fn(&UpEvent) -> bool) -> Vec<UpEvent> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let found: Vec<UpEvent> = self.seen.iter().filter(|e| pred(e)).cloned().collect();
            if found.len() >= n {
                return found;
            }
            assert!(tokio::time::Instant::now() < deadline, "only {} of {n} upstream entries: {what}", found.len());
            self.read_new().await;
        }
    }

    /// Every upstream entry read so far plus everything there now.
    pub async fn upstream(&mut self) -> Vec<UpEvent> {
        while self.read_new().await {}
        self.seen.clone()
    }

    /// Sends a command the way the device service does (look up the node in the map, add to
    /// its stream) and waits for the reply.
    pub async fn command(&self, device: &DeviceKey, body: CommandBody, deadline: Duration) -> CommandReply {
        let node = self.map_entry(device).await.get("node").cloned().expect("device in the map");
        self.command_via(&node, device, body, deadline).await
    }

    /// Sends a command to a given node's stream and waits for the reply.
    pub async fn command_via(
        &self,
        node: &str,
        device: &DeviceKey,
        body: CommandBody,
        deadline: Duration,
    ) -> CommandReply {
        let request_id = format!("req-{:x}", fastrand::u64(..));
        let reply_to = self.keys.replies(&format!("test-{request_id}"));
        let deadline_ms = gateway::clock::now_ms() + u64::try_from(deadline.as_millis()).unwrap();
        let request = CommandRequest {
            request_id: request_id.clone(),
            device: device.clone(),
            deadline_ms,
            reply_to: reply_to.clone(),
            body,
        };
        let mut con = self.redis.clone();
        let _: String = redis::cmd("XADD")
            .arg(self.keys.commands(node))
            .arg("*")
            .arg(request.to_fields().unwrap())
            .query_async(&mut con)
            .await
            .unwrap();
        let reply = self.wait_reply(&reply_to, deadline + WAIT).await;
        assert_eq!(reply.request_id, request_id);
        reply
    }

    /// Waits for the first reply on `reply_to`.
    pub async fn wait_reply(&self, reply_to: &str, limit: Duration) -> CommandReply {
        let limit = tokio::time::Instant::now() + limit;
        let mut con = self.redis.clone();
        loop {
            assert!(tokio::time::Instant::now() < limit, "no reply on {reply_to}");
            let reply: Option<StreamReadReply> = redis::cmd("XREAD")
                .arg("BLOCK")
                .arg(500)
                .arg("STREAMS")
                .arg(reply_to)
                .arg("0")
                .query_async(&mut con)
                .await
                .unwrap();
            if let Some(entry) = reply.and_then(|r| r.keys.into_iter().next()).and_then(|k| k.ids.into_iter().next()) {
                return CommandReply::from_fields(&bulk(entry.map)).unwrap();
            }
        }
    }
}

/// The value of metric `name` with exactly these labels (in any order), or 0 if absent.
pub fn metric(gw: &Gateway, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    want.sort();
    for line in gw.metrics.render().lines() {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (metric_name, label_text) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric_name != name {
            continue;
        }
        let mut have: Vec<String> = label_text.split(',').filter(|l| !l.is_empty()).map(str::to_owned).collect();
        have.sort();
        if have == want {
            return value.parse().unwrap_or(0.0);
        }
    }
    0.0
}

#[allow(unused_imports)] // not every test crate drives cabinets
pub use testkit::cabinet::Cabinet;

pub fn payload(json: &str) -> Bytes {
    Bytes::copy_from_slice(json.as_bytes())
}

/// A vehicle driven by rumqttc (an MQTT client nobody here wrote).
pub struct Vehicle {
    pub client: rumqttc::AsyncClient,
    events: tokio::sync::mpsc::UnboundedReceiver<Result<rumqttc::Event, String>>,
    pub vin: Vin,
}

/// Options for a vehicle with its token.
pub fn vehicle_options(addr: SocketAddr, vin: &Vin, token: &str) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(vin.as_str(), addr.ip().to_string(), addr.port());
    o.set_credentials(vin.as_str(), token);
    o.set_keep_alive(Duration::from_secs(30));
    o
}

impl Vehicle {
    /// Starts the client's event loop; it stops at the first error (no reconnect).
    pub fn start(options: rumqttc::MqttOptions, vin: &Vin) -> Self {
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 16);
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(e) => {
                        if tx.send(Ok(e)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        Self { client, events, vin: vin.clone() }
    }

    /// The next incoming packet (outgoing events are skipped); `Err` when the connection ended.
    pub async fn incoming(&mut self) -> Result<rumqttc::Packet, String> {
        loop {
            match tokio::time::timeout(WAIT, self.events.recv()).await.expect("vehicle event in time") {
                Some(Ok(rumqttc::Event::Incoming(p))) => return Ok(p),
                Some(Ok(rumqttc::Event::Outgoing(_))) => {}
                Some(Err(e)) => return Err(e),
                None => return Err("event loop gone".into()),
            }
        }
    }

    /// The next incoming packet matching `pred`.
    pub async fn wait_for(&mut self, what: &str, pred: impl Fn(&rumqttc::Packet) -> bool) -> rumqttc::Packet {
        loop {
            let p = self.incoming().await.unwrap_or_else(|e| panic!("connection ended waiting for {what}: {e}"));
            if pred(&p) {
                return p;
            }
        }
    }

    /// Connects and expects the CONNACK to accept.
    pub async fn connect(addr: SocketAddr, vin: &Vin, token: &str) -> Self {
        Self::connect_with(vehicle_options(addr, vin, token), vin).await
    }

    pub async fn connect_with(options: rumqttc::MqttOptions, vin: &Vin) -> Self {
        let mut v = Self::start(options, vin);
        let ack = v.incoming().await.expect("connack");
        assert!(
            matches!(&ack, rumqttc::Packet::ConnAck(a) if a.code == rumqttc::ConnectReturnCode::Success),
            "{ack:?}"
        );
        v
    }

    /// Subscribes to its own downlinks and waits for the SUBACK.
    pub async fn subscribe_downlinks(&mut self) {
        let filter = protocol::mqtt::topic::downlink_filter(&self.vin);
        self.client.subscribe(filter, rumqttc::QoS::AtLeastOnce).await.unwrap();
        let ack = self.wait_for("suback", |p| matches!(p, rumqttc::Packet::SubAck(_))).await;
        assert!(
            matches!(&ack, rumqttc::Packet::SubAck(s) if s.return_codes == [rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce)]),
            "{ack:?}"
        );
    }
}
