//! The device service: the registry of cabinets and vehicles, their status with trustworthy
//! offline detection, lane weight streams, and commands to devices, behind an HTTP API.
//!
//! # Layout
//! - [`config`]: configuration (file, environment, flags) and its validation;
//! - [`db`]: the PostgreSQL pool and the migrations in `migrations/`;
//! - [`registry`]: products, cabinets, doors, lanes, vehicles, credentials;
//! - [`fleet`]: devices, cabinets and vehicles as filtered pages, by [`listing`]'s keyset cursors;
//! - [`status`]: epoch-fenced status changes and their history; [`sessions`]: logins and session
//!   ends applied in sets;
//! - [`offline`]: deadline-ordered, exactly-once offline detection guarded by node health;
//! - [`weights`]: readings into PostgreSQL, stable weights into the Redis cache;
//! - [`retention`]: operational logs deleted past their age;
//! - [`consumer`]: the consumer group over the gateways' upstream streams;
//! - [`commands`]: commands to devices through the connection map;
//! - [`purchases`]: orders from scan to settlement, door locks, anomalies, restocks;
//! - [`vehicles`]: activation by QR code and OTA campaigns over MQTT;
//! - [`http`]: the admin API, `/metrics` and `/healthz`; [`metrics`]: what `/metrics` shows;
//! - [`app`]: what every part shares.
//!
//! [`DeviceService::start`] applies the migrations, starts every background task and binds
//! the HTTP API (the port may be 0); [`DeviceService::stop`] ends them, leaving whatever was
//! read and not yet stored unacknowledged for the next instance.

pub mod app;
pub mod auth;
pub mod clock;
pub mod commands;
pub mod config;
pub mod consumer;
pub mod db;
pub mod dead_letters;
pub mod error;
pub mod fleet;
pub mod gather;
pub mod http;
pub mod listing;
pub mod metrics;
pub mod offline;
pub mod purchases;
pub mod redis_loss;
pub mod registry;
pub mod retention;
pub mod secret;
pub mod sessions;
pub mod status;
pub mod trim;
pub mod vehicles;
pub mod weights;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use protocol::bus::{DeviceKind, Keys};
use redis_conn::{RedisConn, RedisTarget};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::commands::Commander;
use crate::config::Config;
use crate::consumer::Consumer;
use crate::error::StoreError;
use crate::metrics::Metrics;
use crate::offline::Detector;

/// Why the device service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The HTTP listener could not be bound.
    #[error("failed to bind the HTTP listener on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// PostgreSQL unusable, or a migration failed.
    #[error("failed to prepare PostgreSQL: {0}")]
    Store(#[from] StoreError),
    /// Redis unusable (invalid URL, or no cluster seed reachable).
    #[error("failed to open Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The API's TLS certificate or key cannot be used.
    #[error("API TLS: {0}")]
    Tls(#[from] service_kit::tls::TlsError),
    /// The OTA package keys or store cannot be used.
    #[error("OTA packages: {0}")]
    Packages(String),
}

/// A running device-service instance.
#[derive(Debug)]
pub struct DeviceService {
    /// Where the HTTP API listens.
    pub addr: SocketAddr,
    /// Shared state (tests read metrics and send commands through it).
    pub app: Arc<App>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// How often the credentials mirror in Redis is rewritten from PostgreSQL.
const MIRROR_EVERY: Duration = Duration::from_secs(60);
/// How often the weight partitions are created ahead and expired.
const PARTITIONS_EVERY: Duration = Duration::from_secs(3600);
/// How often the devices-by-status gauge is refreshed.
const GAUGES_EVERY: Duration = Duration::from_secs(5);

impl DeviceService {
    /// Applies the migrations, starts consuming, detecting and answering, binds the API.
    ///
    /// # Errors
    /// [`StartError`] if PostgreSQL or Redis cannot be used or the listener cannot be bound.
    pub async fn start(mut config: Config) -> Result<Self, StartError> {
        let started = Instant::now();
        let pg = db::pool(&config.postgres)?;
        let applied = db::migrate(&pg).await?;
        let target = RedisTarget::from_config(&config.redis.url, &config.redis.cluster_urls);
        let redis = RedisConn::open(&target, None).await?;
        let listener = TcpListener::bind(&config.http.listen)
            .await
            .map_err(|source| StartError::Bind { addr: config.http.listen.clone(), source })?;
        let addr =
            listener.local_addr().map_err(|source| StartError::Bind { addr: config.http.listen.clone(), source })?;

        if config.ota.downloads.public_url.is_empty() {
            let scheme = if config.http.tls_cert.is_empty() { "http" } else { "https" };
            config.ota.downloads.public_url = format!("{scheme}://{addr}");
        }
        let ota_packages =
            vehicles::ota::packages::Packages::from_config(&config.ota).map_err(StartError::Packages)?.map(Arc::new);
        if ota_packages.is_none() {
            tracing::info!("OTA package storage off: no master keys and signing key configured");
        }
        let metrics = Metrics::new();
        let keys = Keys::new(config.key_prefix.clone());
        let commander = Arc::new(Commander::new(
            redis.clone(),
            keys.clone(),
            config.instance_id.clone(),
            metrics.clone(),
            config.commands.node_stream_max_bytes,
        ));
        let verifier = auth::keys::Verifier::new(Duration::from_millis(config.auth.cache_ttl_ms));
        let app = Arc::new(App {
            config,
            pg,
            redis: redis.clone(),
            keys,
            metrics,
            commander,
            started,
            purchase_wakers: purchases::Wakers::default(),
            ota_waker: tokio::sync::Notify::new(),
            ota_packages,
            mirror_due: std::sync::atomic::AtomicBool::new(false),
            verifier,
        });
        weights::maintain_partitions(&app).await?;

        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        // Blocking reads get connections of their own, with a timeout longer than the block.
        let blocking = Some(Duration::from_millis(app.config.streams.block_ms) + Duration::from_secs(3));
        let detector = Arc::new(Detector::new(Arc::clone(&app)));
        let consumer = Arc::new(Consumer::new(Arc::clone(&app), Arc::clone(&detector)));
        for shard in 0..app.config.streams.shards {
            let con = RedisConn::open(&target, blocking).await?;
            tasks.spawn(consumer::run_shard(Arc::clone(&consumer), con, shard, stop.clone()));
        }
        let confirmations_con = RedisConn::open(&target, blocking).await?;
        tasks.spawn(purchases::outbox::run_confirmations(Arc::clone(&app), confirmations_con, stop.clone()));
        let reply_con = RedisConn::open(&target, blocking).await?;
        tasks.spawn(Arc::clone(&app.commander).run_replies(reply_con, stop.clone()));
        tasks.spawn(Arc::clone(&detector).run(stop.clone()));
        tasks.spawn(redis_loss::run(Arc::clone(&app), Arc::clone(&detector), stop.clone()));
        tasks.spawn(purchases::driver::run(Arc::clone(&app), stop.clone()));
        tasks.spawn(purchases::outbox::run_relay(Arc::clone(&app), stop.clone()));
        tasks.spawn(vehicles::ota::push::run(Arc::clone(&app), stop.clone()));
        tasks.spawn(registry::run_mirror(Arc::clone(&app), MIRROR_EVERY, stop.clone()));
        tasks.spawn(every(PARTITIONS_EVERY, stop.clone(), Arc::clone(&app), |app| async move {
            weights::maintain_partitions(&app).await
        }));
        let sweep_every = Duration::from_secs(app.config.retention.sweep_interval_s);
        tasks.spawn(every(sweep_every, stop.clone(), Arc::clone(&app), |app| async move {
            retention::sweep(&app).await.map(|_| ())
        }));
        tasks.spawn(every(purchases::stocktake::SCALE_CHECK_EVERY, stop.clone(), Arc::clone(&app), |app| async move {
            purchases::stocktake::check_scales(&app).await
        }));
        tasks.spawn(every(GAUGES_EVERY, stop.clone(), Arc::clone(&app), |app| async move {
            refresh_device_gauges(&app).await?;
            purchases::driver::refresh_gauges(&app).await?;
            purchases::outbox::refresh_gauges(&app).await?;
            purchases::money::refresh_gauges(&app).await?;
            vehicles::ota::push::refresh_gauges(&app).await
        }));
        let tls = (!app.config.http.tls_cert.is_empty())
            .then(|| service_kit::tls::acceptor(&app.config.http.tls_cert, &app.config.http.tls_key, None, false))
            .transpose()?;
        tasks.spawn(http::serve(listener, tls, Arc::clone(&app), stop.clone()));
        tasks.close();
        tracing::info!(%addr, instance = %app.config.instance_id, migrations_applied = applied, "device service started");
        Ok(Self { addr, app, stop, tasks })
    }

    /// Stops every task and waits for them: batches being applied finish, and anything read
    /// but not stored stays unacknowledged for another instance to take over.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.wait().await;
        tracing::info!("device service stopped");
    }
}

/// Runs `job` now and then every `period` until `stop`, logging failures (the next run retries).
async fn every<F, Fut>(period: Duration, stop: CancellationToken, app: Arc<App>, job: F)
where
    F: Fn(Arc<App>) -> Fut,
    Fut: std::future::Future<Output = Result<(), StoreError>>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        if let Err(e) = job(Arc::clone(&app)).await {
            tracing::warn!(error = %e, period_s = period.as_secs(), "periodic task failed; retrying next period");
        }
    }
}

/// Sets `devsvc_devices{kind,status}` from PostgreSQL (every instance reports the same
/// fleet-wide figures: aggregate with `max`, not `sum`).
async fn refresh_device_gauges(app: &App) -> Result<(), StoreError> {
    let client = app.pg.get().await?;
    let rows = client.query("SELECT kind, status, count(*) FROM devices GROUP BY kind, status", &[]).await?;
    // Every pair is reported, zero when no device is in it: a series that vanished when the
    // last device left a status would read as "no data", not as 0, on a dashboard or in an alert.
    for kind in [DeviceKind::Cabinet, DeviceKind::Vehicle] {
        for status in status::ALL {
            app.metrics.devices.with_label_values(&[kind.as_str(), status]).set(0);
        }
    }
    for r in rows {
        let (kind, status, n): (String, String, i64) = (r.get(0), r.get(1), r.get(2));
        app.metrics.devices.with_label_values(&[&kind, &status]).set(n);
    }
    Ok(())
}
