//! Noticing that Redis lost its data. A restart without persistence, a failover to a replica
//! that had not caught up, or a `FLUSHALL` all look the same from outside: keys that should be
//! there are not. Every process sets one marker key if it is missing and remembers the value it
//! saw; a marker that vanished or changed since means Redis forgot what the processes had
//! written, and each process must write back what it owns (SPEC.md 3.1, `P bus:run`).
//!
//! A restart may lose less and still lose: after a crash of the host under `appendfsync
//! everysec` (or with snapshots only) the writes of the last moments are gone while the marker,
//! written long before, is not; and writes refused while Redis was down or loading were never
//! made. Neither shows in the marker. So a restart (a new `run_id` in `INFO server`) counts as
//! a loss too: the write-back is idempotent, and cheap next to a device refused its login.

use std::future::Future;
use std::time::Duration;

use redis::RedisResult;

use crate::RedisConn;

/// One process's view of the marker key.
#[derive(Debug)]
pub struct RunMarker {
    key: String,
    /// What this process writes when the marker is missing, with the check's number: a value
    /// nobody wrote before, so a marker this process set and Redis then lost is not mistaken
    /// for the same one set again.
    candidate: String,
    checks: u64,
    seen: Option<String>,
    /// The `run_id` of the Redis server seen at the previous check (none through a cluster).
    server: Option<String>,
}

impl RunMarker {
    /// A watcher of marker `key`; `candidate` must be unique to this process run.
    pub fn new(key: String, candidate: String) -> Self {
        Self { key, candidate, checks: 0, seen: None, server: None }
    }

    /// Sets the marker if it is missing, in one command (`SET NX GET`), and reads the server's
    /// `run_id`. Returns `true` when the marker is not the one seen at the previous check, or
    /// the server restarted since: Redis lost data in between. The first check only learns.
    ///
    /// # Errors
    /// Any Redis error; nothing is learned then.
    pub async fn lost_since_last_check(&mut self, redis: &mut RedisConn) -> RedisResult<bool> {
        self.checks += 1;
        let candidate = format!("{}/{}", self.candidate, self.checks);
        let previous: Option<String> =
            redis::cmd("SET").arg(&self.key).arg(&candidate).arg("NX").arg("GET").query_async(redis).await?;
        // Through a cluster `INFO` has no one server to answer for; the marker alone decides.
        let server = if redis.is_cluster() {
            None
        } else {
            let info: String = redis::cmd("INFO").arg("server").query_async(redis).await?;
            run_id(&info)
        };
        let now = previous.unwrap_or(candidate);
        let marker_changed = self.seen.replace(now.clone()).is_some_and(|before| before != now);
        let restarted = match (self.server.as_ref(), server.as_ref()) {
            (Some(before), Some(now)) => before != now,
            _ => false,
        };
        if server.is_some() {
            self.server = server;
        }
        Ok(marker_changed || restarted)
    }

    /// Checks every `every` until `stop` completes. Each loss found is reported to `on_loss`;
    /// from then on `rebuild` runs at every check until it returns `true` (a rebuild that
    /// failed, with Redis still away, is tried again). A failed check learns nothing and waits
    /// for the next.
    pub async fn watch<F, Fut>(
        mut self,
        mut redis: RedisConn,
        every: Duration,
        stop: impl Future<Output = ()>,
        mut on_loss: impl FnMut(),
        mut rebuild: F,
    ) where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop = std::pin::pin!(stop);
        let mut rebuilding = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = &mut stop => return,
            }
            match self.lost_since_last_check(&mut redis).await {
                Ok(true) => {
                    on_loss();
                    rebuilding = true;
                }
                Ok(false) => {}
                Err(_) => continue,
            }
            if rebuilding {
                rebuilding = !rebuild().await;
            }
        }
    }
}

/// The `run_id` line of an `INFO server` reply.
fn run_id(info: &str) -> Option<String> {
    info.lines().find_map(|l| l.strip_prefix("run_id:")).map(|v| v.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::run_id;

    #[test]
    fn the_run_id_is_read_from_the_server_section() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:4f1c9d\r\ntcp_port:6379\r\n";
        assert_eq!(run_id(info).as_deref(), Some("4f1c9d"));
        assert_eq!(run_id("# Server\r\nredis_version:7.0.15\r\n"), None);
    }
}
