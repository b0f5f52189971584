//! The gateway: holds long-lived cabinet and vehicle connections, keeps the connection map in
//! Redis, forwards device traffic upstream and delivers commands downstream.
//!
//! # Layout
//! - [`config`]: configuration (file, environment, flags) and its validation;
//! - [`server`]: accept loops, admission, TLS handshakes; [`tls`]: certificates;
//! - [`transport`]: a connection's bytes, with buffers allocated only while used;
//! - [`cabinet`], [`mqtt`]: the two protocols' logins and sessions;
//! - [`session`]: the handle through which the node reaches a live session;
//! - [`registry`]: local sessions and the connection map; [`credentials`]: device secrets,
//!   kept current by [`credential_watch`];
//! - [`upstream`], [`stream_writer`]: device traffic to the device service;
//! - [`routing`]: this node's command stream;
//! - [`metrics`]: Prometheus metrics and the `/metrics` endpoint;
//! - [`context`], [`clock`]: shared plumbing (Redis through the `redis-conn` crate).
//!
//! [`Gateway::start`] binds everything (ports may be 0) and returns the bound addresses;
//! [`Gateway::shutdown`] drains: stop accepting, move devices away, flush, exit.

pub mod cabinet;
pub mod clock;
pub mod config;
pub mod context;
pub mod credential_watch;
pub mod credentials;
pub mod metrics;
pub mod mqtt;
pub mod redis_loss;
pub mod registry;
pub mod routing;
pub mod server;
pub mod session;
pub mod stream_writer;
pub mod tls;
pub mod transport;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use protocol::bus::{Keys, UpEvent};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::context::Ctx;
use crate::credentials::Credentials;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::server::{Admission, Listener, Protocol};
use crate::session::EndReason;
use crate::stream_writer::{StreamCap, StreamWriter, WriterConfig, WriterMetrics};
use crate::upstream::Upstream;
use redis_conn::{RedisConn, RedisTarget};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("failed to bind {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TLS settings unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Redis unusable (invalid URL, or no cluster seed reachable).
    #[error("failed to open Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// The addresses a started gateway listens on.
#[derive(Debug, Clone, Default)]
pub struct Addresses {
    /// Cabinets, plain TCP.
    pub cabinet: Option<SocketAddr>,
    /// Cabinets, TLS.
    pub cabinet_tls: Option<SocketAddr>,
    /// Vehicles, plain TCP.
    pub mqtt: Option<SocketAddr>,
    /// Vehicles, TLS.
    pub mqtt_tls: Option<SocketAddr>,
    /// `/metrics` and `/healthz`.
    pub metrics: Option<SocketAddr>,
}

/// A running gateway node.
#[derive(Debug)]
pub struct Gateway {
    /// Where it listens.
    pub addresses: Addresses,
    /// Its metrics (tests read them directly).
    pub metrics: Metrics,
    /// Its context (tests inspect the registry).
    pub ctx: Arc<Ctx>,
    shutdown: CancellationToken,
    done: JoinHandle<()>,
}

async fn bind(what: &'static str, addr: &str) -> Result<Option<TcpListener>, StartError> {
    if addr.is_empty() {
        return Ok(None);
    }
    TcpListener::bind(addr).await.map(Some).map_err(|source| StartError::Bind { what, addr: addr.into(), source })
}

impl Gateway {
    /// Binds every configured listener, connects to Redis, and starts serving.
    ///
    /// # Errors
    /// [`StartError`] if a listener cannot be bound, TLS files are unusable, or Redis cannot be
    /// opened.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let metrics = Metrics::new();
        metrics.node_info.with_label_values(&[&config.node_id, env!("CARGO_PKG_VERSION")]).set(1);
        let keys = Keys::new(config.key_prefix.clone());
        let target = RedisTarget::from_config(&config.redis.url, &config.redis.cluster_urls);
        let redis = RedisConn::open(&target, None).await?;
        // The sessions' own calls (credentials, the map claim and release, kicks, MQTT session
        // state) are many, small and independent: sent together across sessions, a login wave
        // costs Redis and this node a write and a read per batch, not per call.
        let sessions_redis = redis.coalesced();
        // The blocking command read gets a connection of its own.
        let block = Duration::from_millis(config.commands.block_ms);
        let command_redis = RedisConn::open(&target, Some(block + Duration::from_secs(3))).await?;
        // So does the blocking read of credential changes.
        let watch_redis = RedisConn::open(&target, Some(block + Duration::from_secs(3))).await?;

        let cabinet_tls = if config.cabinet.tls_listen.is_empty() {
            None
        } else {
            Some(tls::acceptor(&config.cabinet.tls_cert, &config.cabinet.tls_key, None, false)?)
        };
        let mqtt_tls = if config.mqtt.tls_listen.is_empty() {
            None
        } else {
            let ca = (!config.mqtt.tls_client_ca.is_empty()).then_some(config.mqtt.tls_client_ca.as_str());
            Some(tls::acceptor(&config.mqtt.tls_cert, &config.mqtt.tls_key, ca, config.mqtt.tls_client_cert_required)?)
        };
        let cabinet_plain = bind("cabinet listener", &config.cabinet.listen).await?;
        let cabinet_secure = bind("cabinet TLS listener", &config.cabinet.tls_listen).await?;
        let mqtt_plain = bind("MQTT listener", &config.mqtt.listen).await?;
        let mqtt_secure = bind("MQTT TLS listener", &config.mqtt.tls_listen).await?;
        let metrics_listener = bind("metrics listener", &config.metrics.listen).await?;
        let addr = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
        let addresses = Addresses {
            cabinet: addr(&cabinet_plain),
            cabinet_tls: addr(&cabinet_secure),
            mqtt: addr(&mqtt_plain),
            mqtt_tls: addr(&mqtt_secure),
            metrics: addr(&metrics_listener),
        };

        let node = config.node_id.clone();
        let registry = Arc::new(Registry::new(
            sessions_redis.clone(),
            keys.clone(),
            node.clone(),
            Duration::from_millis(config.redis.node_ttl_ms),
            metrics.clone(),
        ));
        let writer_metrics = |depth: prometheus::IntGauge, written: prometheus::IntCounterVec, op| WriterMetrics {
            depth,
            written,
            errors: metrics.redis_errors.clone(),
            op,
            held: metrics.stream_cap_holds.with_label_values(&[op]),
        };
        let up_metrics = writer_metrics(metrics.upstream_buffer.clone(), metrics.upstream_events.clone(), "upstream");
        let (up_writer, up_rx) = StreamWriter::new(config.upstream.buffer_max, up_metrics.clone());
        let reply_metrics = writer_metrics(metrics.reply_buffer.clone(), metrics.replies_written.clone(), "replies");
        let (reply_writer, reply_rx) = StreamWriter::new(config.upstream.buffer_max, reply_metrics.clone());
        let upstream = Arc::new(Upstream::new(
            up_writer,
            keys.clone(),
            config.upstream.shards,
            Arc::clone(&registry),
            metrics.clone(),
        ));
        let credentials = Credentials::new(
            sessions_redis.clone(),
            keys.clone(),
            Duration::from_secs(config.auth.cache_ttl_s),
            Duration::from_secs(config.auth.negative_cache_ttl_s),
            metrics.clone(),
        );
        let shutdown = CancellationToken::new();
        let ctx = Arc::new(Ctx {
            keys: keys.clone(),
            metrics: metrics.clone(),
            registry: Arc::clone(&registry),
            credentials,
            upstream: Arc::clone(&upstream),
            replies: reply_writer,
            redis: sessions_redis.clone(),
            drain: shutdown.child_token(),
            config,
        });

        // Background work, stopped in order by the drain: first the writers (after the
        // sessions), then the services (liveness last).
        let flush = CancellationToken::new();
        let writers = TaskTracker::new();
        let services = TaskTracker::new();
        let writer_cfg = |cap, name: &str| WriterConfig {
            batch_max: ctx.config.upstream.batch_max,
            linger: Duration::from_micros(ctx.config.upstream.linger_us),
            cap,
            writer_id: format!("{}/{name}/", registry.incarnation_id()),
        };
        writers.spawn(stream_writer::run(
            up_rx,
            redis.clone(),
            writer_cfg(StreamCap::Hold(ctx.config.upstream.stream_maxlen), "up"),
            up_metrics,
            flush.clone(),
        ));
        writers.spawn(stream_writer::run(
            reply_rx,
            redis.clone(),
            writer_cfg(StreamCap::Trim(ctx.config.commands.reply_maxlen), "reply"),
            reply_metrics,
            flush.clone(),
        ));
        let windows_stop = CancellationToken::new();
        writers.spawn(
            Arc::clone(&upstream)
                .run_windows(Duration::from_millis(ctx.config.upstream.heartbeat_window_ms), windows_stop.clone()),
        );
        let commands_stop = CancellationToken::new();
        writers.spawn(routing::run(Arc::clone(&ctx), command_redis, commands_stop.clone()));
        let liveness_stop = CancellationToken::new();
        services.spawn(Arc::clone(&registry).run_liveness(liveness_stop.clone()));
        services.spawn(Arc::clone(&registry).run_janitor(liveness_stop.clone()));
        services.spawn(Arc::clone(&registry).run_node_set(liveness_stop.clone()));
        services.spawn(credential_watch::run(Arc::clone(&ctx), watch_redis, liveness_stop.clone()));
        services.spawn(redis_loss::run(Arc::clone(&ctx), liveness_stop.clone()));
        let sweeper = Arc::clone(&ctx);
        let sweep_stop = liveness_stop.clone();
        services.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => sweeper.credentials.sweep(),
                    () = sweep_stop.cancelled() => return,
                }
            }
        });
        if let Some(listener) = metrics_listener {
            services.spawn(metrics::serve(listener, metrics.clone(), liveness_stop.clone()));
        }
        clear_leftovers(&ctx).await;

        let sessions = TaskTracker::new();
        let listeners = TaskTracker::new();
        let cabinet_admission =
            Arc::new(Admission::new(ctx.config.cabinet.max_connections, ctx.config.cabinet.accept_rate_per_s));
        let mqtt_admission =
            Arc::new(Admission::new(ctx.config.mqtt.max_connections, ctx.config.mqtt.accept_rate_per_s));
        for (tcp, tls, protocol, admission) in [
            (cabinet_plain, None, Protocol::Cabinet, &cabinet_admission),
            (cabinet_secure, cabinet_tls, Protocol::Cabinet, &cabinet_admission),
            (mqtt_plain, None, Protocol::Mqtt, &mqtt_admission),
            (mqtt_secure, mqtt_tls, Protocol::Mqtt, &mqtt_admission),
        ] {
            if let Some(tcp) = tcp {
                let listener = Listener { tcp, tls, protocol, admission: Arc::clone(admission) };
                listeners.spawn(server::run(listener, Arc::clone(&ctx), sessions.clone(), shutdown.clone()));
            }
        }
        listeners.close();
        tracing::info!(node = %ctx.node(), ?addresses, "gateway started");

        let drain = Drain {
            ctx: Arc::clone(&ctx),
            shutdown: shutdown.clone(),
            listeners,
            sessions,
            commands_stop,
            windows_stop,
            flush,
            liveness_stop,
            writers,
            services,
        };
        let done = tokio::spawn(drain.run());
        Ok(Self { addresses, metrics, ctx, shutdown, done })
    }

    /// Starts the drain: stop accepting, tell devices to reconnect elsewhere, flush, exit.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until the gateway has drained and stopped.
    pub async fn wait(self) {
        let _ = self.done.await;
    }

    /// Drains and waits.
    pub async fn stop(self) {
        self.shutdown();
        self.wait().await;
    }
}

/// After a crash, this node's previous run left map entries naming it; clear them and tell the
/// device service those sessions are gone.
async fn clear_leftovers(ctx: &Ctx) {
    match ctx.registry.clear_leftovers().await {
        Ok(cleared) => {
            for (device, epoch) in &cleared {
                ctx.upstream
                    .send(&UpEvent::SessionClosed {
                        device: device.clone(),
                        epoch: *epoch,
                        node: ctx.node().to_owned(),
                        at_ms: clock::now_ms(),
                        reason: "node_restart".into(),
                    })
                    .await;
            }
            if !cleared.is_empty() {
                tracing::info!(count = cleared.len(), "cleared connection map entries left by an earlier run");
            }
        }
        Err(e) => tracing::warn!(error = %e, "failed to clear connection map entries left by an earlier run"),
    }
}

struct Drain {
    ctx: Arc<Ctx>,
    shutdown: CancellationToken,
    listeners: TaskTracker,
    sessions: TaskTracker,
    commands_stop: CancellationToken,
    windows_stop: CancellationToken,
    flush: CancellationToken,
    liveness_stop: CancellationToken,
    writers: TaskTracker,
    services: TaskTracker,
}

impl Drain {
    /// The order matters: stop accepting; let sessions move their devices away (spread over
    /// `spread_ms`) while commands and upstream traffic still flow; then stop reading
    /// commands, close the last heartbeat window, flush the writers, and finally remove this
    /// node's liveness key. Everything is bounded by the grace period.
    async fn run(self) {
        self.shutdown.cancelled().await;
        let grace = Duration::from_secs(self.ctx.config.drain.grace_period_s);
        let deadline = tokio::time::Instant::now() + grace;
        tracing::info!(sessions = self.ctx.registry.len(), grace_s = grace.as_secs(), "draining");
        self.listeners.wait().await;
        // Sessions still logging in see the drain token when they start serving.
        for handle in self.ctx.registry.all() {
            handle.end(EndReason::Drain);
        }
        self.sessions.close();
        let session_budget = Duration::from_millis(self.ctx.config.drain.spread_ms + 2000).min(grace);
        if tokio::time::timeout(session_budget, self.sessions.wait()).await.is_err() {
            let left = self.ctx.registry.all();
            tracing::warn!(sessions = left.len(), "sessions still open after the spread; ending them");
            for handle in left {
                handle.end(EndReason::Close);
            }
            let _ = tokio::time::timeout_at(deadline, self.sessions.wait()).await;
        }
        self.commands_stop.cancel();
        self.windows_stop.cancel();
        self.flush.cancel();
        self.writers.close();
        if tokio::time::timeout_at(deadline, self.writers.wait()).await.is_err() {
            tracing::warn!(
                buffered = self.ctx.metrics.upstream_buffer.get(),
                "grace period over with events still buffered"
            );
        }
        // Liveness last: the node counts as alive until its state is flushed.
        self.liveness_stop.cancel();
        self.services.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.services.wait()).await;
        tracing::info!("gateway stopped");
    }
}
