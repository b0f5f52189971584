//! Gateway configuration: a TOML file, `GATEWAY_*` environment variables over it, and
//! command-line flags over both. `gateway.default.toml` documents every key with its unit and
//! default and is compiled in, so `gateway --print-default-config` always matches the code.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

/// The documented default configuration, as shipped.
pub const DEFAULT_TOML: &str = include_str!("../gateway.default.toml");

/// A configuration that cannot be used (shared by the service binaries).
pub use service_kit::ConfigError;

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// The whole configuration of one gateway node. Field meanings, units and defaults are
/// documented in `gateway.default.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's id; empty means the host name.
    pub node_id: String,
    /// Prefix of every Redis key.
    pub key_prefix: String,
    /// Redis connection.
    pub redis: RedisConfig,
    /// Cabinet listeners and sessions.
    pub cabinet: CabinetConfig,
    /// Vehicle listeners and sessions.
    pub mqtt: MqttConfig,
    /// Forwarding to the device service.
    pub upstream: UpstreamConfig,
    /// The command stream.
    pub commands: CommandsConfig,
    /// Credential cache.
    pub auth: AuthConfig,
    /// Login flapping (clones).
    pub flapping: FlappingConfig,
    /// Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// Graceful shutdown.
    pub drain: DrainConfig,
}

/// `[redis]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Single Redis URL.
    pub url: String,
    /// Redis Cluster seeds; non-empty selects cluster mode.
    pub cluster_urls: Vec<String>,
    /// Liveness key TTL, ms.
    pub node_ttl_ms: u64,
}

/// `[cabinet]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CabinetConfig {
    /// Plain listener address; empty = off.
    pub listen: String,
    /// TLS listener address; empty = off.
    pub tls_listen: String,
    /// PEM certificate chain.
    pub tls_cert: String,
    /// PEM private key.
    pub tls_key: String,
    /// Connection limit.
    pub max_connections: usize,
    /// Accept pacing, connections per second.
    pub accept_rate_per_s: u32,
    /// Login deadline, ms.
    pub login_timeout_ms: u64,
    /// Heartbeat interval told to cabinets, s.
    pub heartbeat_interval_s: u16,
    /// Idle timeout, ms.
    pub idle_timeout_ms: u64,
    /// Allowed device clock skew at login, s.
    pub max_clock_skew_s: u64,
    /// Lowest login version accepted (1 or 2).
    pub min_login_version: u8,
    /// Per-device command queue length.
    pub command_queue_len: usize,
    /// Write timeout, ms.
    pub write_timeout_ms: u64,
    /// Frames one cabinet may have on their way to Redis, unacknowledged; past it `Busy`.
    pub max_unconfirmed: usize,
}

/// `[mqtt]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Plain listener address; empty = off.
    pub listen: String,
    /// TLS listener address; empty = off.
    pub tls_listen: String,
    /// PEM certificate chain.
    pub tls_cert: String,
    /// PEM private key.
    pub tls_key: String,
    /// PEM CA for client certificates; empty = none.
    pub tls_client_ca: String,
    /// Require client certificates.
    pub tls_client_cert_required: bool,
    /// Connection limit.
    pub max_connections: usize,
    /// Accept pacing, connections per second.
    pub accept_rate_per_s: u32,
    /// CONNECT deadline, ms.
    pub connect_timeout_ms: u64,
    /// Keep-alive for clients asking 0, s.
    pub default_keep_alive_s: u16,
    /// Largest accepted packet, bytes.
    pub max_packet_bytes: u32,
    /// QoS 1 downlinks in flight per vehicle.
    pub max_inflight: u16,
    /// Unacknowledged downlinks kept per persistent session.
    pub max_stored_downlinks: usize,
    /// QoS 1/2 publishes one vehicle may have on their way to Redis, unacknowledged (CONNACK
    /// Receive Maximum for 5.0); past it the gateway stops reading from the vehicle.
    pub receive_max: u16,
    /// Longest granted session expiry, s.
    pub max_session_expiry_s: u32,
    /// Subscription filters one connection may hold.
    pub max_subscriptions: usize,
    /// Per-device command queue length.
    pub command_queue_len: usize,
    /// Write timeout, ms.
    pub write_timeout_ms: u64,
}

/// `[upstream]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Number of upstream stream shards.
    pub shards: u16,
    /// Entries per pipeline.
    pub batch_max: usize,
    /// How long a write round waits, after its first entry, for more to join it (µs; 0: it
    /// leaves with whatever is there at once). The group commit's window: below saturation it
    /// turns one Redis round per uplink into one per many, for this much more latency.
    pub linger_us: u64,
    /// Buffer bound, entries.
    pub buffer_max: usize,
    /// Heartbeat window, ms.
    pub heartbeat_window_ms: u64,
    /// Length of an upstream stream past which this node writes nothing more to it until the
    /// device service has consumed and trimmed it (entries wait in the buffer: backpressure,
    /// never loss).
    pub stream_maxlen: u64,
}

/// `[commands]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommandsConfig {
    /// Blocking read duration, ms.
    pub block_ms: u64,
    /// Reply stream length cap.
    pub reply_maxlen: u64,
}

/// `[auth]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Positive cache TTL, s.
    pub cache_ttl_s: u64,
    /// Negative cache TTL, s.
    pub negative_cache_ttl_s: u64,
}

/// `[flapping]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlappingConfig {
    /// Window logins are counted in, s.
    pub window_s: u64,
    /// Logins allowed per device in one window.
    pub max_logins: u32,
    /// First cool-down, s.
    pub cooldown_s: u64,
    /// Longest cool-down, s.
    pub max_cooldown_s: u64,
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Listen address; empty = off.
    pub listen: String,
}

/// `[drain]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DrainConfig {
    /// Grace period, s.
    pub grace_period_s: u64,
    /// Reconnect spread, ms.
    pub spread_ms: u64,
}

// The hand-written defaults below must equal gateway.default.toml; a unit test checks it.

impl Default for Config {
    fn default() -> Self {
        Self {
            node_id: String::new(),
            key_prefix: "iotgw:".into(),
            redis: RedisConfig::default(),
            cabinet: CabinetConfig::default(),
            mqtt: MqttConfig::default(),
            upstream: UpstreamConfig::default(),
            commands: CommandsConfig::default(),
            auth: AuthConfig::default(),
            flapping: FlappingConfig::default(),
            metrics: MetricsConfig::default(),
            drain: DrainConfig::default(),
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self { url: "redis://127.0.0.1:6379/".into(), cluster_urls: Vec::new(), node_ttl_ms: 10_000 }
    }
}

impl Default for CabinetConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:7100".into(),
            tls_listen: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            max_connections: 19_000,
            accept_rate_per_s: 8000,
            login_timeout_ms: 10_000,
            heartbeat_interval_s: 30,
            idle_timeout_ms: 45_000,
            max_clock_skew_s: 300,
            min_login_version: 1,
            command_queue_len: 16,
            write_timeout_ms: 10_000,
            max_unconfirmed: 32,
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:1883".into(),
            tls_listen: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_client_ca: String::new(),
            tls_client_cert_required: false,
            max_connections: 19_000,
            accept_rate_per_s: 8000,
            connect_timeout_ms: 10_000,
            default_keep_alive_s: 60,
            max_packet_bytes: 16_384,
            max_inflight: 16,
            max_stored_downlinks: 100,
            receive_max: 100,
            max_session_expiry_s: 86_400,
            max_subscriptions: 50,
            command_queue_len: 16,
            write_timeout_ms: 10_000,
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            shards: 4,
            batch_max: 512,
            linger_us: 1000,
            buffer_max: 100_000,
            heartbeat_window_ms: 1000,
            stream_maxlen: 1_000_000,
        }
    }
}

impl Default for CommandsConfig {
    fn default() -> Self {
        Self { block_ms: 1000, reply_maxlen: 10_000 }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { cache_ttl_s: 10, negative_cache_ttl_s: 5 }
    }
}

impl Default for FlappingConfig {
    fn default() -> Self {
        Self { window_s: 60, max_logins: 10, cooldown_s: 30, max_cooldown_s: 1800 }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:9100".into() }
    }
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self { grace_period_s: 30, spread_ms: 10_000 }
    }
}

/// Environment variables the gateway reads, and the setting each overrides.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("GATEWAY_NODE_ID", "node_id"),
    ("GATEWAY_KEY_PREFIX", "key_prefix"),
    ("GATEWAY_REDIS_URL", "redis.url"),
    ("GATEWAY_REDIS_CLUSTER_URLS", "redis.cluster_urls (comma-separated)"),
    ("GATEWAY_CABINET_LISTEN", "cabinet.listen"),
    ("GATEWAY_CABINET_TLS_LISTEN", "cabinet.tls_listen"),
    ("GATEWAY_MQTT_LISTEN", "mqtt.listen"),
    ("GATEWAY_MQTT_TLS_LISTEN", "mqtt.tls_listen"),
    ("GATEWAY_METRICS_LISTEN", "metrics.listen"),
];

impl Config {
    /// Parses a TOML document (unknown keys are an error: a typo must not pass silently).
    ///
    /// # Errors
    /// [`ConfigError::Parse`].
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        service_kit::config::from_toml(text)
    }

    /// Reads a TOML file.
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Parse`].
    pub fn from_file(path: &str) -> Result<Self, ConfigError> {
        service_kit::config::from_file(path)
    }

    /// Applies `GATEWAY_*` overrides read through `lookup` (tests pass a map, `main` the
    /// process environment).
    pub fn apply_env(&mut self, lookup: impl Fn(&str) -> Option<String>) {
        let set = |target: &mut String, name: &str| {
            if let Some(v) = lookup(name) {
                *target = v;
            }
        };
        set(&mut self.node_id, "GATEWAY_NODE_ID");
        set(&mut self.key_prefix, "GATEWAY_KEY_PREFIX");
        set(&mut self.redis.url, "GATEWAY_REDIS_URL");
        set(&mut self.cabinet.listen, "GATEWAY_CABINET_LISTEN");
        set(&mut self.cabinet.tls_listen, "GATEWAY_CABINET_TLS_LISTEN");
        set(&mut self.mqtt.listen, "GATEWAY_MQTT_LISTEN");
        set(&mut self.mqtt.tls_listen, "GATEWAY_MQTT_TLS_LISTEN");
        set(&mut self.metrics.listen, "GATEWAY_METRICS_LISTEN");
        if let Some(v) = lookup("GATEWAY_REDIS_CLUSTER_URLS") {
            self.redis.cluster_urls = service_kit::config::url_list(&v);
        }
    }

    /// Checks ranges and consistency, and fills the node id from the host name if empty.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the setting.
    pub fn validate(mut self) -> Result<Self, ConfigError> {
        if self.node_id.is_empty() {
            self.node_id = service_kit::config::host_name();
        }
        if self.node_id.is_empty() || !self.node_id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(invalid(format!("node_id {:?}: use 1 or more of [A-Za-z0-9._-]", self.node_id)));
        }
        if self.key_prefix.contains(['{', '}', ' ']) {
            return Err(invalid("key_prefix must not contain braces or spaces (Redis Cluster hash tags)"));
        }
        if self.redis.cluster_urls.is_empty() && self.redis.url.is_empty() {
            return Err(invalid("redis.url or redis.cluster_urls is required"));
        }
        if self.redis.node_ttl_ms < 1000 {
            return Err(invalid("redis.node_ttl_ms must be at least 1000"));
        }
        for (name, addr) in self.listen_addresses() {
            if !addr.is_empty() && addr.parse::<SocketAddr>().is_err() {
                return Err(invalid(format!("{name} {addr:?} is not a socket address (host:port)")));
            }
        }
        let c = &self.cabinet;
        if !c.tls_listen.is_empty() && (c.tls_cert.is_empty() || c.tls_key.is_empty()) {
            return Err(invalid("cabinet.tls_listen needs cabinet.tls_cert and cabinet.tls_key"));
        }
        if c.heartbeat_interval_s == 0 || c.idle_timeout_ms < u64::from(c.heartbeat_interval_s) * 1000 {
            return Err(invalid("cabinet.idle_timeout_ms must be at least one heartbeat interval"));
        }
        if !(1..=2).contains(&c.min_login_version) {
            return Err(invalid("cabinet.min_login_version must be 1 or 2"));
        }
        let f = &self.flapping;
        if f.window_s == 0 || f.max_logins == 0 || f.cooldown_s == 0 || f.max_cooldown_s < f.cooldown_s {
            return Err(invalid(
                "flapping.window_s, max_logins and cooldown_s must be positive, max_cooldown_s at least cooldown_s",
            ));
        }
        let m = &self.mqtt;
        if !m.tls_listen.is_empty() && (m.tls_cert.is_empty() || m.tls_key.is_empty()) {
            return Err(invalid("mqtt.tls_listen needs mqtt.tls_cert and mqtt.tls_key"));
        }
        if m.tls_client_cert_required && m.tls_client_ca.is_empty() {
            return Err(invalid("mqtt.tls_client_cert_required needs mqtt.tls_client_ca"));
        }
        if !(128..=268_435_455).contains(&m.max_packet_bytes) {
            return Err(invalid("mqtt.max_packet_bytes must be within 128..=268435455"));
        }
        if m.max_inflight == 0 || m.default_keep_alive_s == 0 || m.receive_max == 0 {
            return Err(invalid("mqtt.max_inflight, mqtt.receive_max and mqtt.default_keep_alive_s must be positive"));
        }
        for (name, v) in [
            ("cabinet.max_connections", c.max_connections),
            ("mqtt.max_connections", m.max_connections),
            ("cabinet.command_queue_len", c.command_queue_len),
            ("cabinet.max_unconfirmed", c.max_unconfirmed),
            ("mqtt.command_queue_len", m.command_queue_len),
            ("mqtt.max_subscriptions", m.max_subscriptions),
            ("upstream.batch_max", self.upstream.batch_max),
            ("upstream.buffer_max", self.upstream.buffer_max),
        ] {
            if v == 0 {
                return Err(invalid(format!("{name} must be positive")));
            }
        }
        if c.accept_rate_per_s == 0 || m.accept_rate_per_s == 0 {
            return Err(invalid("accept_rate_per_s must be positive"));
        }
        if !(1..=1024).contains(&self.upstream.shards) {
            return Err(invalid("upstream.shards must be within 1..=1024"));
        }
        if self.upstream.linger_us > 100_000 {
            return Err(invalid("upstream.linger_us must be at most 100000 (100 ms)"));
        }
        if self.upstream.heartbeat_window_ms < 100 {
            return Err(invalid("upstream.heartbeat_window_ms must be at least 100"));
        }
        if self.drain.spread_ms / 1000 >= self.drain.grace_period_s {
            return Err(invalid("drain.spread_ms must be shorter than drain.grace_period_s"));
        }
        Ok(self)
    }

    fn listen_addresses(&self) -> [(&'static str, &str); 5] {
        [
            ("cabinet.listen", &self.cabinet.listen),
            ("cabinet.tls_listen", &self.cabinet.tls_listen),
            ("mqtt.listen", &self.mqtt.listen),
            ("mqtt.tls_listen", &self.mqtt.tls_listen),
            ("metrics.listen", &self.metrics.listen),
        ]
    }

    /// The flapping rule as the connection map applies it.
    pub fn flap_policy(&self) -> crate::registry::FlapPolicy {
        let f = &self.flapping;
        crate::registry::FlapPolicy {
            window: Duration::from_secs(f.window_s),
            max_logins: f.max_logins,
            cooldown: Duration::from_secs(f.cooldown_s),
            max_cooldown: Duration::from_secs(f.max_cooldown_s),
        }
    }

    /// Cabinet login deadline.
    pub fn login_timeout(&self) -> Duration {
        Duration::from_millis(self.cabinet.login_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn shipped_file_equals_the_code_defaults() {
        let file = Config::from_toml(DEFAULT_TOML).expect("default file parses");
        let code = Config::default();
        assert_eq!(format!("{file:?}"), format!("{code:?}"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(matches!(Config::from_toml("[cabinet]\nlisen = \"x\""), Err(ConfigError::Parse(_))));
    }

    #[test]
    fn env_overrides_apply() {
        let env: HashMap<&str, &str> = [
            ("GATEWAY_NODE_ID", "gw-7"),
            ("GATEWAY_REDIS_CLUSTER_URLS", "redis://a:1, redis://b:2,"),
            ("GATEWAY_MQTT_LISTEN", ""),
        ]
        .into();
        let mut c = Config::default();
        c.apply_env(|k| env.get(k).map(|v| (*v).to_owned()));
        assert_eq!(c.node_id, "gw-7");
        assert_eq!(c.redis.cluster_urls, vec!["redis://a:1", "redis://b:2"]);
        assert_eq!(c.mqtt.listen, "");
        assert_eq!(c.cabinet.listen, "0.0.0.0:7100");
    }

    #[test]
    fn validation_names_the_setting() {
        let mut c = Config { node_id: "n".into(), ..Config::default() };
        c.cabinet.tls_listen = "0.0.0.0:7101".into();
        let err = c.validate().expect_err("tls without cert");
        assert!(err.to_string().contains("cabinet.tls_cert"), "{err}");

        let mut c = Config { node_id: "bad id".into(), ..Config::default() };
        assert!(c.clone().validate().is_err());
        c.node_id = "ok".into();
        c.mqtt.listen = "nowhere".into();
        assert!(c.validate().expect_err("bad address").to_string().contains("mqtt.listen"));

        let c = Config { node_id: "n".into(), key_prefix: "{x}".into(), ..Config::default() };
        assert!(c.validate().is_err());
        assert!(Config { node_id: "n".into(), ..Config::default() }.validate().is_ok());
    }
}
