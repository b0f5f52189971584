//! Wall-clock time as the protocols carry it: milliseconds since the Unix epoch (UTC).
//! Deadlines inside the process use `tokio::time::Instant` instead, so paused-clock tests work.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
