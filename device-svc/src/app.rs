//! What every part of one device-service instance shares.

use std::sync::Arc;

use deadpool_postgres::Pool;
use protocol::bus::Keys;
use redis_conn::RedisConn;
use tokio::time::Instant;

use crate::commands::Commander;
use crate::config::Config;
use crate::metrics::Metrics;

/// Shared state of one instance.
#[derive(Debug)]
pub struct App {
    /// The validated configuration.
    pub config: Config,
    /// PostgreSQL.
    pub pg: Pool,
    /// Redis (single or cluster).
    pub redis: RedisConn,
    /// Redis key layout (shared with the gateways, `protocol::bus`).
    pub keys: Keys,
    /// Metrics.
    pub metrics: Metrics,
    /// Commands to devices.
    pub commander: Arc<Commander>,
    /// When the instance started (for the start-up grace of offline detection).
    pub started: Instant,
    /// Wake-ups of the purchase tasks.
    pub purchase_wakers: crate::purchases::Wakers,
    /// Wakes the OTA driver (a task created or cancelled, a vehicle connected).
    pub ota_waker: tokio::sync::Notify,
    /// Stored OTA packages (off when no keys are configured).
    pub ota_packages: Option<Arc<crate::vehicles::ota::packages::Packages>>,
    /// Set when a credential change failed to reach Redis (down, restarting, unreachable): the
    /// whole mirror is written again within a second, and again until it succeeds, rather
    /// than at the next minute's rewrite, so a device registered meanwhile can log in.
    pub mirror_due: std::sync::atomic::AtomicBool,
    /// Verifies the API's keys (with its bounded cache).
    pub verifier: crate::auth::keys::Verifier,
}

// The time helpers live in `clock`, below `commands` and everything else; these paths stay.
pub use crate::clock::{MAX_TIME_MS, checked_time, ms_of, now_ms, time_of};
