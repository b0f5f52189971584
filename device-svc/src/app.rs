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
}

/// Wall clock in ms since the Unix epoch, as the bus carries it.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

/// The latest time the API takes, ms since the Unix epoch: 9999-12-31T23:59:59.999Z, within
/// what PostgreSQL's `timestamptz` and every client's clock arithmetic hold.
pub const MAX_TIME_MS: u64 = 253_402_300_799_999;

/// A caller-given time as a `SystemTime`, refused (naming `field`) past [`MAX_TIME_MS`], so
/// `u64::MAX` can never wrap into 1969 or fail in PostgreSQL as a false outage.
///
/// # Errors
/// `Invalid` naming `field`.
pub fn checked_time(field: &'static str, ms: u64) -> Result<std::time::SystemTime, crate::error::StoreError> {
    if ms > MAX_TIME_MS {
        return Err(crate::error::StoreError::invalid(field, format!("{ms} is past {MAX_TIME_MS} (year 9999)")));
    }
    Ok(time_of(ms))
}

/// A `SystemTime` from ms since the Unix epoch.
pub fn time_of(ms: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)
}

/// Ms since the Unix epoch of a `SystemTime` (0 before the epoch).
pub fn ms_of(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}
