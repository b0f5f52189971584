//! Device-service configuration: a TOML file, `DEVICE_SVC_*` environment variables over it, and
//! flags over both. `device-svc.default.toml` documents every key with its unit and default
//! and is compiled in (`device-svc --print-default-config`).

use serde::Deserialize;

use crate::secret::SecretText;

/// The documented default configuration, as shipped.
pub const DEFAULT_TOML: &str = include_str!("../device-svc.default.toml");

/// A configuration that cannot be used (shared by the service binaries).
pub use service_kit::ConfigError;

/// The whole configuration; meanings, units and defaults in `device-svc.default.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Instance name; empty = host name and pid.
    pub instance_id: String,
    /// Redis key prefix.
    pub key_prefix: String,
    /// HTTP API.
    pub http: HttpConfig,
    /// PostgreSQL.
    pub postgres: PostgresConfig,
    /// Redis.
    pub redis: RedisConfig,
    /// Upstream streams.
    pub streams: StreamsConfig,
    /// Heartbeats and offline detection.
    pub heartbeat: HeartbeatConfig,
    /// Weight readings.
    pub weights: WeightsConfig,
    /// Commands to devices.
    pub commands: CommandsConfig,
    /// Purchases.
    pub purchases: PurchasesConfig,
    /// Vehicle activation and downlinks.
    pub vehicles: VehiclesConfig,
    /// OTA campaigns.
    pub ota: OtaConfig,
    /// `[retention]`
    pub retention: RetentionConfig,
    /// `[auth]`
    pub auth: AuthConfig,
    /// `[payments]`
    pub payments: PaymentsConfig,
}

/// `[auth]`: API keys (see [`crate::auth`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Requests per second per API key (0: unlimited).
    pub rate_per_s: u32,
    /// Requests a key may send at once above its rate.
    pub burst: u32,
    /// How long a verified key is trusted without reading PostgreSQL again, ms.
    pub cache_ttl_ms: u64,
}

/// `[payments]`: the payment providers' signed callbacks.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PaymentsConfig {
    /// Each provider's shared secret (a name may appear twice while its secret is rotated).
    pub providers: Vec<PaymentProvider>,
    /// A callback signed further than this from now (either way) is refused, s.
    pub tolerance_s: u64,
}

/// One `[[payments.providers]]` entry.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentProvider {
    /// The name the provider sends in `X-Payment-Provider`.
    pub name: String,
    /// The shared HMAC secret (never printed: `Debug` redacts it).
    pub secret: String,
}

impl std::fmt::Debug for PaymentProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PaymentProvider").field("name", &self.name).field("secret", &"<redacted>").finish()
    }
}

impl PaymentProvider {
    /// Parses `name:secret,name:secret` (the `DEVICE_SVC_PAYMENT_PROVIDERS` form).
    pub fn parse_list(value: &str) -> Vec<Self> {
        value
            .split(',')
            .filter_map(|pair| pair.trim().split_once(':'))
            .map(|(name, secret)| Self { name: name.trim().to_owned(), secret: secret.trim().to_owned() })
            .collect()
    }
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address.
    pub listen: String,
    /// Connections held at once.
    pub max_connections: usize,
    /// Header read (and keep-alive idle) timeout, ms.
    pub header_timeout_ms: u64,
    /// Whole-request timeout, ms.
    pub request_timeout_ms: u64,
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// PEM certificate chain for TLS on the API (empty: plain HTTP).
    pub tls_cert: String,
    /// PEM private key for `tls_cert`.
    pub tls_key: String,
}

/// `[postgres]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection URL.
    pub url: String,
    /// Pool size.
    pub pool_size: usize,
    /// Server-side: a session idle inside a transaction this long is ended, ms.
    pub idle_in_transaction_timeout_ms: u64,
    /// Server-side: a wait for a lock longer than this fails, ms.
    pub lock_timeout_ms: u64,
    /// Server-side: a statement running longer than this is cancelled, ms.
    pub statement_timeout_ms: u64,
}

/// `[redis]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Single Redis URL.
    pub url: String,
    /// Cluster seeds.
    pub cluster_urls: Vec<String>,
}

/// `[streams]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamsConfig {
    /// Shards.
    pub shards: u16,
    /// Entries per read.
    pub batch: usize,
    /// Blocking read, ms.
    pub block_ms: u64,
    /// Take-over idle time, ms.
    pub claim_idle_ms: u64,
    /// Take-over scan interval, ms.
    pub claim_interval_ms: u64,
    /// A reader of a group holding nothing and silent this long is a departed instance, ms.
    pub departed_after_ms: u64,
    /// A cabinet time further than this from the gateway's receive time is not trusted, s.
    pub max_clock_skew_s: u64,
    /// PostgreSQL connections the shards' readers may hold at once; the rest of
    /// `postgres.pool_size` stays for the API and the background drivers. `None`: half the
    /// pool, at least one ([`Config::stream_pg_connections`]).
    pub pg_connections: Option<usize>,
}

/// `[heartbeat]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// Heartbeat interval, s.
    pub interval_s: u64,
    /// Offline threshold, s.
    pub offline_after_s: u64,
    /// Required share of expected heartbeats.
    pub healthy_share: f64,
    /// Window for the share, s.
    pub window_s: u64,
    /// Deadline poll interval, ms.
    pub check_interval_ms: u64,
    /// Start-up grace, s.
    pub startup_grace_s: u64,
    /// Recheck delay, s.
    pub recheck_s: u64,
    /// A node gone this long: the devices it held are marked offline (`node_down`), s.
    pub node_lost_s: u64,
}

/// `[weights]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WeightsConfig {
    /// Retention, days.
    pub retention_days: u32,
    /// Partitions created ahead, days.
    pub partitions_ahead_days: u32,
}

/// `[retention]`: how long operational logs are kept (0: forever).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Online/offline transitions, days.
    pub status_history_days: u32,
    /// Vehicles' OTA reports as received, days.
    pub ota_reports_days: u32,
    /// Outbox messages already relayed, days.
    pub outbox_published_days: u32,
    /// Audit rows, days (0 = forever).
    pub audit_days: u32,
    /// Dead letters, days (0 = forever).
    pub dead_letters_days: u32,
    /// Time between two sweeps, s.
    pub sweep_interval_s: u64,
    /// Rows deleted per statement.
    pub batch_rows: u32,
}

/// `[commands]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommandsConfig {
    /// Default deadline, ms.
    pub default_timeout_ms: u64,
    /// Bytes a node's command stream may hold before commands to it are answered busy.
    pub node_stream_max_bytes: u64,
}

/// `[purchases]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PurchasesConfig {
    /// Authorisation deadline, s.
    pub authorise_timeout_s: u64,
    /// Door lock TTL, s.
    pub lock_ttl_s: u64,
    /// Open-door command deadline, ms.
    pub open_timeout_ms: u64,
    /// Door queries after an unanswered open.
    pub door_queries: u32,
    /// Pause between queries, ms.
    pub query_interval_ms: u64,
    /// Wait for stable weights after the close, s.
    pub settle_wait_s: u64,
    /// Tolerance, fraction of a unit weight.
    pub tolerance: f64,
    /// Door open this long: anomaly, s.
    pub door_open_max_s: u64,
    /// Door open this long: the order goes to review and the door out of sale, s.
    pub door_never_closed_s: u64,
    /// Due-order poll, ms.
    pub poll_ms: u64,
    /// A settlement the account service has not confirmed this long after it was published is
    /// published again, s.
    pub settlement_resend_s: u64,
    /// Amount the provider must authorise per order (the most an order may charge), cents.
    pub hold_cents: i64,
    /// Currency of holds and charges (ISO 4217).
    pub currency: String,
    /// Refuse an order (409 `no_active_contract`) for a user without a signed password-free
    /// deduction contract.
    pub require_contract: bool,
    /// A lane whose stable weight differs from what the restocker counted by more than this
    /// many grams gets a `TARE` command and a calibration notice.
    pub calibration_drift_grams: i32,
    /// A cabinet with this many anomalies within `inspection_window_s` gets an inspection
    /// notice (0: never).
    pub inspection_anomalies: u32,
    /// The window of `inspection_anomalies`, s.
    pub inspection_window_s: u64,
}

/// `[vehicles]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VehiclesConfig {
    /// QR id life, s.
    pub qr_ttl_s: u64,
    /// Wrong codes before the activation is cancelled.
    pub code_attempts: u32,
    /// Deadline of one downlink, ms.
    pub downlink_timeout_ms: u64,
    /// Tries of a downlink sent at connect time.
    pub connect_send_attempts: u32,
    /// Pause between those tries, ms.
    pub connect_send_retry_ms: u64,
    /// Only a vehicle's registered buyer may scan its QR id; without one, nobody may.
    pub require_buyer: bool,
}

/// `[ota]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtaConfig {
    /// Pushes per second, fleet-wide.
    pub push_rate_per_s: u32,
    /// Retry of an unacknowledged push, s.
    pub push_retry_s: u64,
    /// Due-row poll, ms.
    pub poll_ms: u64,
    /// Silence limit while notified/waiting, s.
    pub waiting_timeout_s: u64,
    /// Silence limit while downloading, s.
    pub download_timeout_s: u64,
    /// Silence limit while downloaded/verifying, s.
    pub verify_timeout_s: u64,
    /// Silence limit while upgrading, s.
    pub upgrade_timeout_s: u64,
    /// Times a vehicle whose upgrade failed (failed, rolled back, timed out) is notified again
    /// before the task's publisher is told to act (the seed's compensation).
    pub repush_max: u32,
    /// Pause before such a new attempt, s.
    pub repush_delay_s: u64,
    /// `[ota.packages]`: stored packages.
    pub packages: OtaPackagesConfig,
    /// `[ota.downloads]`: vehicles downloading them.
    pub downloads: OtaDownloadsConfig,
}

/// `[ota.packages]`: where packages are kept and the keys that protect them.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtaPackagesConfig {
    /// `fs` (a directory of this machine) or `s3` (an S3-compatible store).
    pub storage: String,
    /// The directory, for `fs`.
    pub path: String,
    /// The bucket, for `s3`.
    pub s3_bucket: String,
    /// The access key id, for `s3` (empty: `AWS_ACCESS_KEY_ID` and the other `AWS_*`
    /// variables the AWS SDKs read).
    pub s3_access_key_id: String,
    /// Its secret (empty: `AWS_SECRET_ACCESS_KEY`).
    pub s3_secret_access_key: SecretText,
    /// The endpoint, for an S3-compatible store that is not AWS (empty: AWS's).
    pub s3_endpoint: String,
    /// The region, for `s3`.
    pub s3_region: String,
    /// Allow a plain-HTTP endpoint (a store on the same host or network only).
    pub s3_allow_http: bool,
    /// The largest package accepted, bytes.
    pub max_bytes: u64,
    /// An upload that sends nothing for this long is abandoned, ms.
    pub upload_idle_ms: u64,
    /// Master keys wrapping the packages' data keys, `id:64hex,id:64hex`
    /// (`DEVICE_SVC_OTA_MASTER_KEYS`, or `master_keys_file`).
    pub master_keys: SecretText,
    /// A file with the master keys, one `id:64hex` per line.
    pub master_keys_file: String,
    /// The id of the master key that wraps new data keys (`DEVICE_SVC_OTA_MASTER_KEY`); the
    /// others only unwrap until every package is rewrapped.
    pub master_key: String,
    /// The platform's Ed25519 signing key, 64 hex characters (`DEVICE_SVC_OTA_SIGNING_KEY`, or
    /// `signing_key_file`).
    pub signing_key: SecretText,
    /// A file holding the signing key.
    pub signing_key_file: String,
}

/// `[ota.downloads]`: the vehicles' download endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtaDownloadsConfig {
    /// The API's address as vehicles reach it, for the URLs in notices (empty:
    /// `http://` + `http.listen`).
    pub public_url: String,
    /// How long a download URL in a notice stays valid, s.
    pub url_ttl_s: u64,
    /// Downloads served at once by one instance; more are answered 503 with `Retry-After`.
    pub max_concurrent: u32,
    /// Bytes per second one instance sends, all downloads together (0: no limit).
    pub bytes_per_s: u64,
}

// The hand-written defaults must equal device-svc.default.toml; a unit test checks it.

impl Default for Config {
    fn default() -> Self {
        Self {
            instance_id: String::new(),
            key_prefix: "iotgw:".into(),
            http: HttpConfig {
                listen: "127.0.0.1:8080".into(),
                max_connections: 4096,
                header_timeout_ms: 10_000,
                request_timeout_ms: 30_000,
                max_body_bytes: 1 << 20,
                tls_cert: String::new(),
                tls_key: String::new(),
            },
            postgres: PostgresConfig {
                url: "postgres://postgres@127.0.0.1:5432/iotgw".into(),
                pool_size: 16,
                idle_in_transaction_timeout_ms: 15_000,
                lock_timeout_ms: 5000,
                statement_timeout_ms: 30_000,
            },
            redis: RedisConfig { url: "redis://127.0.0.1:6379/".into(), cluster_urls: Vec::new() },
            streams: StreamsConfig::default(),
            heartbeat: HeartbeatConfig::default(),
            weights: WeightsConfig { retention_days: 30, partitions_ahead_days: 3 },
            commands: CommandsConfig { default_timeout_ms: 5000, node_stream_max_bytes: 64 * 1024 * 1024 },
            purchases: PurchasesConfig {
                authorise_timeout_s: 120,
                lock_ttl_s: 60,
                open_timeout_ms: 5000,
                door_queries: 5,
                query_interval_ms: 2000,
                settle_wait_s: 20,
                tolerance: 0.3,
                door_open_max_s: 600,
                door_never_closed_s: 3600,
                poll_ms: 200,
                settlement_resend_s: 30,
                hold_cents: 20_000,
                currency: "CNY".into(),
                require_contract: true,
                calibration_drift_grams: 30,
                inspection_anomalies: 5,
                inspection_window_s: 86_400,
            },
            vehicles: VehiclesConfig {
                qr_ttl_s: 300,
                code_attempts: 5,
                downlink_timeout_ms: 10_000,
                connect_send_attempts: 5,
                connect_send_retry_ms: 1000,
                require_buyer: true,
            },
            ota: OtaConfig {
                push_rate_per_s: 50,
                push_retry_s: 30,
                poll_ms: 500,
                waiting_timeout_s: 604_800,
                download_timeout_s: 120,
                verify_timeout_s: 600,
                upgrade_timeout_s: 120,
                repush_max: 2,
                repush_delay_s: 30,
                packages: OtaPackagesConfig {
                    storage: "fs".into(),
                    path: "var/ota-packages".into(),
                    s3_bucket: String::new(),
                    s3_access_key_id: String::new(),
                    s3_secret_access_key: SecretText::default(),
                    s3_endpoint: String::new(),
                    s3_region: "us-east-1".into(),
                    s3_allow_http: false,
                    max_bytes: 8 << 30,
                    upload_idle_ms: 30_000,
                    master_keys: SecretText::default(),
                    master_keys_file: String::new(),
                    master_key: String::new(),
                    signing_key: SecretText::default(),
                    signing_key_file: String::new(),
                },
                downloads: OtaDownloadsConfig {
                    public_url: String::new(),
                    url_ttl_s: 86_400,
                    max_concurrent: 256,
                    bytes_per_s: 0,
                },
            },
            retention: RetentionConfig {
                status_history_days: 90,
                ota_reports_days: 90,
                outbox_published_days: 7,
                audit_days: 365,
                dead_letters_days: 90,
                sweep_interval_s: 3600,
                batch_rows: 5000,
            },
            auth: AuthConfig { rate_per_s: 200, burst: 400, cache_ttl_ms: 5000 },
            payments: PaymentsConfig { providers: Vec::new(), tolerance_s: 300 },
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Config::default().http
    }
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Config::default().postgres
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Config::default().redis
    }
}

impl Default for StreamsConfig {
    fn default() -> Self {
        Self {
            shards: 4,
            batch: 500,
            block_ms: 1000,
            claim_idle_ms: 15_000,
            claim_interval_ms: 5000,
            departed_after_ms: 3_600_000,
            max_clock_skew_s: 300,
            pg_connections: None,
        }
    }
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        Self {
            interval_s: 30,
            offline_after_s: 75,
            healthy_share: 0.8,
            window_s: 60,
            check_interval_ms: 200,
            startup_grace_s: 90,
            recheck_s: 10,
            node_lost_s: 300,
        }
    }
}

impl Default for WeightsConfig {
    fn default() -> Self {
        Config::default().weights
    }
}

impl Default for PurchasesConfig {
    fn default() -> Self {
        Config::default().purchases
    }
}

impl Default for VehiclesConfig {
    fn default() -> Self {
        Config::default().vehicles
    }
}

impl Default for OtaConfig {
    fn default() -> Self {
        Config::default().ota
    }
}

impl Default for OtaPackagesConfig {
    fn default() -> Self {
        Config::default().ota.packages
    }
}

impl Default for OtaDownloadsConfig {
    fn default() -> Self {
        Config::default().ota.downloads
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Config::default().retention
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Config::default().auth
    }
}

impl Default for PaymentsConfig {
    fn default() -> Self {
        Config::default().payments
    }
}

impl Default for CommandsConfig {
    fn default() -> Self {
        Config::default().commands
    }
}

/// How late a node's heartbeat intake is known, at most, in seconds: windows still on their way
/// (2 s, see `offline`), a window's length (1 s by default), whole-second accounting (1 s) and
/// the health cache (1 s).
pub const HEALTH_DELAY_S: u64 = 5;

/// Environment variables the device service reads, and the setting each overrides.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("DEVICE_SVC_INSTANCE_ID", "instance_id"),
    ("DEVICE_SVC_KEY_PREFIX", "key_prefix"),
    ("DEVICE_SVC_HTTP_LISTEN", "http.listen"),
    ("DEVICE_SVC_HTTP_TLS_CERT", "http.tls_cert"),
    ("DEVICE_SVC_HTTP_TLS_KEY", "http.tls_key"),
    ("DEVICE_SVC_DATABASE_URL", "postgres.url"),
    ("DEVICE_SVC_REDIS_URL", "redis.url"),
    ("DEVICE_SVC_REDIS_CLUSTER_URLS", "redis.cluster_urls (comma-separated)"),
    ("DEVICE_SVC_PAYMENT_PROVIDERS", "payments.providers (name:secret,...)"),
    ("DEVICE_SVC_OTA_MASTER_KEYS", "ota.packages.master_keys (id:hex,...)"),
    ("DEVICE_SVC_OTA_MASTER_KEY", "ota.packages.master_key"),
    ("DEVICE_SVC_OTA_SIGNING_KEY", "ota.packages.signing_key"),
    ("DEVICE_SVC_OTA_PUBLIC_URL", "ota.downloads.public_url"),
    ("DEVICE_SVC_OTA_PACKAGES_PATH", "ota.packages.path"),
    ("DEVICE_SVC_OTA_REPUSH_DELAY_S", "ota.repush_delay_s"),
];

impl Config {
    /// Parses TOML (unknown keys are an error).
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

    /// Applies `DEVICE_SVC_*` overrides read through `lookup`.
    pub fn apply_env(&mut self, lookup: impl Fn(&str) -> Option<String>) {
        let set = |target: &mut String, name: &str| {
            if let Some(v) = lookup(name) {
                *target = v;
            }
        };
        set(&mut self.instance_id, "DEVICE_SVC_INSTANCE_ID");
        set(&mut self.key_prefix, "DEVICE_SVC_KEY_PREFIX");
        set(&mut self.http.listen, "DEVICE_SVC_HTTP_LISTEN");
        set(&mut self.http.tls_cert, "DEVICE_SVC_HTTP_TLS_CERT");
        set(&mut self.http.tls_key, "DEVICE_SVC_HTTP_TLS_KEY");
        set(&mut self.postgres.url, "DEVICE_SVC_DATABASE_URL");
        set(&mut self.redis.url, "DEVICE_SVC_REDIS_URL");
        if let Some(v) = lookup("DEVICE_SVC_REDIS_CLUSTER_URLS") {
            self.redis.cluster_urls = service_kit::config::url_list(&v);
        }
        if let Some(v) = lookup("DEVICE_SVC_PAYMENT_PROVIDERS") {
            self.payments.providers = PaymentProvider::parse_list(&v);
        }
        let o = &mut self.ota;
        if let Some(v) = lookup("DEVICE_SVC_OTA_MASTER_KEYS") {
            o.packages.master_keys = SecretText(v);
        }
        set(&mut o.packages.master_key, "DEVICE_SVC_OTA_MASTER_KEY");
        if let Some(v) = lookup("DEVICE_SVC_OTA_SIGNING_KEY") {
            o.packages.signing_key = SecretText(v);
        }
        set(&mut o.downloads.public_url, "DEVICE_SVC_OTA_PUBLIC_URL");
        set(&mut o.packages.path, "DEVICE_SVC_OTA_PACKAGES_PATH");
        if let Some(v) = lookup("DEVICE_SVC_OTA_REPUSH_DELAY_S").and_then(|v| v.parse().ok()) {
            o.repush_delay_s = v;
        }
    }

    /// Checks ranges and fills the instance id if empty.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the setting.
    pub fn validate(mut self) -> Result<Self, ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        let h = &self.http;
        if h.max_connections == 0 || h.header_timeout_ms == 0 || h.request_timeout_ms == 0 || h.max_body_bytes == 0 {
            return bad(
                "http.max_connections, header_timeout_ms, request_timeout_ms and max_body_bytes must be positive",
            );
        }
        if h.tls_cert.is_empty() != h.tls_key.is_empty() {
            return bad("http.tls_cert and http.tls_key go together");
        }
        if self.instance_id.is_empty() {
            self.instance_id = format!("{}-{}", service_kit::config::host_name(), std::process::id());
        }
        if !self.instance_id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return bad("instance_id: use [A-Za-z0-9._-]");
        }
        if self.key_prefix.contains(['{', '}', ' ']) {
            return bad("key_prefix must not contain braces or spaces");
        }
        if !(1..=1024).contains(&self.streams.shards) || self.streams.batch == 0 {
            return bad("streams.shards must be within 1..=1024 and streams.batch positive");
        }
        if self.streams.departed_after_ms <= self.streams.claim_idle_ms.max(self.streams.block_ms) {
            return bad("streams.departed_after_ms must be longer than claim_idle_ms and block_ms");
        }
        let h = &self.heartbeat;
        if h.interval_s == 0 || h.offline_after_s < h.interval_s {
            return bad("heartbeat.offline_after_s must be at least heartbeat.interval_s (and that positive)");
        }
        if !(0.0..=1.0).contains(&h.healthy_share) {
            return bad("heartbeat.healthy_share must be within 0..=1");
        }
        if h.window_s < h.interval_s || h.check_interval_ms == 0 || h.recheck_s == 0 {
            return bad("heartbeat.window_s must cover an interval; check_interval_ms and recheck_s positive");
        }
        // A stalled node must look unhealthy before the first deadline it causes expires (one
        // interval after the stall began, at the earliest): the stall is seen `HEALTH_DELAY_S`
        // late and must fill (1 - share) of the window to count.
        let needed = h.interval_s as f64 + HEALTH_DELAY_S as f64 + (1.0 - h.healthy_share) * h.window_s as f64;
        if (h.offline_after_s as f64) < needed {
            return Err(ConfigError::Invalid(format!(
                "heartbeat.offline_after_s must be at least interval_s + {HEALTH_DELAY_S} + (1 - healthy_share) x window_s \
                 = {needed:.1} s, or a stalled node could get its devices marked offline before its intake looks low"
            )));
        }
        let p = &self.purchases;
        if p.authorise_timeout_s == 0 || p.lock_ttl_s < 3 || p.open_timeout_ms == 0 || p.poll_ms == 0 {
            return bad("purchases: authorise_timeout_s, open_timeout_ms and poll_ms positive, lock_ttl_s at least 3");
        }
        if p.calibration_drift_grams <= 0 || p.inspection_window_s == 0 {
            return bad("purchases: calibration_drift_grams and inspection_window_s positive");
        }
        if p.hold_cents <= 0 || p.currency.len() != 3 || !p.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return bad("purchases: hold_cents positive, currency an ISO 4217 code (three capitals)");
        }
        if p.door_never_closed_s <= p.door_open_max_s {
            return bad("purchases.door_never_closed_s must be longer than door_open_max_s");
        }
        if !(0.0..0.5).contains(&p.tolerance) {
            return bad("purchases.tolerance must be within 0..0.5 of a unit weight (or two counts would fit)");
        }
        let v = &self.vehicles;
        if v.qr_ttl_s == 0 || v.code_attempts == 0 || v.downlink_timeout_ms == 0 || v.connect_send_attempts == 0 {
            return bad("vehicles: qr_ttl_s, code_attempts, downlink_timeout_ms and connect_send_attempts positive");
        }
        let o = &self.ota;
        if o.push_rate_per_s == 0 || o.poll_ms == 0 || o.push_retry_s == 0 {
            return bad("ota: push_rate_per_s, push_retry_s and poll_ms positive");
        }
        if [o.waiting_timeout_s, o.download_timeout_s, o.verify_timeout_s, o.upgrade_timeout_s].contains(&0) {
            return bad("ota: every phase timeout must be positive");
        }
        let pk = &o.packages;
        if !["fs", "s3"].contains(&pk.storage.as_str()) {
            return bad("ota.packages.storage must be fs or s3");
        }
        if (pk.storage == "fs" && pk.path.is_empty()) || (pk.storage == "s3" && pk.s3_bucket.is_empty()) {
            return bad("ota.packages: fs needs path, s3 needs s3_bucket");
        }
        if pk.max_bytes == 0 || pk.upload_idle_ms == 0 {
            return bad("ota.packages: max_bytes and upload_idle_ms positive");
        }
        let d = &o.downloads;
        if d.url_ttl_s == 0 || d.max_concurrent == 0 {
            return bad("ota.downloads: url_ttl_s and max_concurrent positive");
        }
        // The limiter counts KiB: less than one would round to no limit at all.
        if d.bytes_per_s != 0 && d.bytes_per_s < 1024 {
            return bad("ota.downloads.bytes_per_s: 0 (no limit) or at least 1024");
        }
        if self.retention.sweep_interval_s == 0 || self.retention.batch_rows == 0 {
            return bad("retention: sweep_interval_s and batch_rows positive");
        }
        if self.auth.rate_per_s > 0 && self.auth.burst == 0 {
            return bad("auth.burst must be positive when auth.rate_per_s is");
        }
        if !(1..=3600).contains(&self.payments.tolerance_s) {
            return bad("payments.tolerance_s must be within 1..=3600");
        }
        for provider in &self.payments.providers {
            if provider.name.is_empty() || provider.name.len() > 64 || provider.secret.len() < 16 {
                return bad("payments.providers: a name of 1..=64 characters and a secret of at least 16");
            }
        }
        let pg = &self.postgres;
        if [pg.idle_in_transaction_timeout_ms, pg.lock_timeout_ms, pg.statement_timeout_ms].contains(&0) {
            return bad("postgres: idle_in_transaction_timeout_ms, lock_timeout_ms and statement_timeout_ms positive");
        }
        if self.weights.retention_days == 0 || self.postgres.pool_size == 0 {
            return bad("weights.retention_days and postgres.pool_size must be positive");
        }
        if self.streams.pg_connections.is_some_and(|n| n == 0 || n >= self.postgres.pool_size) {
            return bad("streams.pg_connections must be positive and below postgres.pool_size");
        }
        Ok(self)
    }

    /// How many PostgreSQL connections the stream readers may hold at once:
    /// `streams.pg_connections`, or half of `postgres.pool_size` (at least one). However many
    /// shards an instance reads, the API and the drivers keep the rest of the pool.
    #[must_use]
    pub fn stream_pg_connections(&self) -> usize {
        self.streams.pg_connections.unwrap_or(self.postgres.pool_size / 2).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_file_equals_the_code_defaults() {
        let file = Config::from_toml(DEFAULT_TOML).expect("default file parses");
        assert_eq!(format!("{file:?}"), format!("{:?}", Config::default()));
    }

    #[test]
    fn validation_and_env() {
        let mut c = Config::default();
        c.apply_env(|k| (k == "DEVICE_SVC_INSTANCE_ID").then(|| "svc-1".to_owned()));
        assert_eq!(c.clone().validate().expect("valid").instance_id, "svc-1");
        c.heartbeat.offline_after_s = 10;
        assert!(c.clone().validate().is_err());
        assert!(Config::from_toml("[heartbeat]\nintervall_s = 3").is_err());
    }

    #[test]
    fn stream_readers_leave_part_of_the_pool_to_the_api() {
        let mut c = Config { instance_id: "svc-1".into(), ..Config::default() };
        c.streams.shards = 64;
        assert_eq!(c.clone().validate().expect("valid").stream_pg_connections(), 8, "half of 16");
        c.postgres.pool_size = 1;
        assert_eq!(c.stream_pg_connections(), 1, "at least one");
        c.postgres.pool_size = 16;
        c.streams.pg_connections = Some(16);
        assert!(c.clone().validate().is_err(), "the whole pool");
        c.streams.pg_connections = Some(0);
        assert!(c.clone().validate().is_err());
        c.streams.pg_connections = Some(15);
        assert_eq!(c.validate().expect("valid").stream_pg_connections(), 15);
    }

    #[test]
    fn ota_settings_are_bounded_and_read_from_the_environment() {
        let mut c = Config::default();
        c.ota.downloads.bytes_per_s = 500; // below the limiter's KiB: would mean no limit
        assert!(c.clone().validate().is_err());
        c.ota.downloads.bytes_per_s = 1 << 20;
        c.ota.packages.storage = "s3".into();
        assert!(c.clone().validate().is_err(), "s3 needs a bucket");
        c.ota.packages.s3_bucket = "ota".into();
        c.apply_env(|k| match k {
            "DEVICE_SVC_OTA_MASTER_KEYS" => Some("k1:ab".into()),
            "DEVICE_SVC_OTA_REPUSH_DELAY_S" => Some("7".into()),
            _ => None,
        });
        assert_eq!((c.ota.packages.master_keys.0.as_str(), c.ota.repush_delay_s), ("k1:ab", 7));
        assert!(!format!("{c:?}").contains("k1:ab"), "a key never shows in Debug");
        assert!(c.validate().is_ok());
    }
}
