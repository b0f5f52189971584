//! Offline detection, answering the seed document's three questions.
//!
//! 1. *A periodic scan over 2,000 devices checks the 1,000th late.* There is no scan: every
//!    heartbeat moves its device's deadline (`last heartbeat + offline_after_s`) in a Redis
//!    sorted set, and the detector takes only the entries whose deadline has passed, earliest
//!    first. Cost is O(log n) per heartbeat and per expiry, whatever the fleet size, and each
//!    device is judged within `check_interval_ms` of its own deadline.
//! 2. *Which of several instances checks a device?* Exactly one: a Lua script moves a due
//!    entry from the deadline set to a "judging" set with a lease, atomically, so one instance
//!    wins it. An instance that dies mid-judgement leaves the lease behind; when it expires the
//!    entry goes back to the deadline set and another instance judges it.
//! 3. *Network jitter must not cause false offlines, and a service-side fault must not mark the
//!    fleet offline.* A device is marked offline only if its node is healthy: over the last
//!    `window_s` the node delivered at least `healthy_share` of the heartbeats its cabinet
//!    sessions should have sent. Each gateway window says how many heartbeats arrived and how
//!    many cabinet sessions the node held, so the expectation follows the fleet as it grows and
//!    shrinks (`sessions x window / interval` per window); a second for which no window arrived
//!    at all (a stalled gateway or stream) is expected at the last known session count, and a
//!    login counts as a sign of life, so a node whose cabinets just connected is not mistaken
//!    for a failing one. Below the share the decision is suppressed and retried every
//!    `recheck_s`, counted, and an alert is raised; when intake recovers devices are judged
//!    again. A start-up grace period lets the streams' backlog be read first.
//!
//! Keys (all of a shard under one hash tag, so a shard's script touches one Redis Cluster slot):
//! `P {hb:N}:deadline` (zset device -> deadline ms), `P {hb:N}:judging` (zset device -> lease
//! expiry), `P {hb:N}:seen` (hash device -> "at epoch node"); per node `P health:{node}` (hash,
//! per second of gateway clock: `r:<s>` heartbeats and logins received, `e:<s>` heartbeats
//! expected, `c:<s>` ms of that second covered by windows; and `sessions`, `window_ms`, and
//! `first`, the second of the node's first window).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::bus::{DeviceKey, HeartbeatSeen, Keys};
use redis::Script;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::app::{App, now_ms};
use crate::error::StoreError;
use crate::status::{self, Event};

/// A heartbeat window counts once, whoever processes it (and however often it is redelivered).
/// ARGV: second, heartbeats, expected heartbeats, window ms, sessions.
const APPLY_WINDOW: &str = r"
if not redis.call('SET', KEYS[2], 1, 'NX', 'EX', 3600) then return 0 end
redis.call('HINCRBY', KEYS[1], 'r:' .. ARGV[1], ARGV[2])
redis.call('HINCRBYFLOAT', KEYS[1], 'e:' .. ARGV[1], ARGV[3])
redis.call('HINCRBY', KEYS[1], 'c:' .. ARGV[1], ARGV[4])
redis.call('HSET', KEYS[1], 'window_ms', ARGV[4], 'sessions', ARGV[5])
redis.call('HSETNX', KEYS[1], 'first', ARGV[1])
redis.call('EXPIRE', KEYS[1], 86400)
return 1
";

/// Each login of one node counts once as a sign of life. KEYS: the node's health, then one
/// mark per login (its stream entry); ARGV: the second of each login.
const APPLY_LOGINS: &str = r"
local counted = 0
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], 1, 'NX', 'EX', 3600) then
    redis.call('HINCRBY', KEYS[1], 'r:' .. ARGV[i - 1], 1)
    counted = counted + 1
  end
end
return counted
";

/// Moves deadlines forward (never back) and records the last heartbeat of each device.
/// ARGV: offline_after_ms, then (device, at, epoch, node) per device.
const SEEN: &str = r"
local after = tonumber(ARGV[1])
for i = 2, #ARGV, 4 do
  local dev, at = ARGV[i], tonumber(ARGV[i + 1])
  local prev = redis.call('HGET', KEYS[2], dev)
  local prev_at = prev and tonumber(string.match(prev, '^(%d+)')) or 0
  if at >= prev_at then
    redis.call('HSET', KEYS[2], dev, ARGV[i + 1] .. ' ' .. ARGV[i + 2] .. ' ' .. ARGV[i + 3])
    redis.call('ZADD', KEYS[1], 'GT', at + after, dev)
  end
end
return 1
";

/// Gives a deadline to each device that has none and is not being judged, as if it had just
/// been seen; a device that still has one keeps it. After Redis lost everything that is every
/// connected cabinet; after a restart that lost only some writes, only those.
/// ARGV: offline_after_ms, then (device, at, epoch, node) per device. Returns how many.
const RESEED: &str = r"
local after = tonumber(ARGV[1])
local added = 0
for i = 2, #ARGV, 4 do
  local dev, at = ARGV[i], tonumber(ARGV[i + 1])
  if not redis.call('ZSCORE', KEYS[1], dev) and not redis.call('ZSCORE', KEYS[3], dev) then
    local prev = redis.call('HGET', KEYS[2], dev)
    local prev_at = prev and tonumber(string.match(prev, '^(%d+)')) or 0
    if at >= prev_at then
      redis.call('HSET', KEYS[2], dev, ARGV[i + 1] .. ' ' .. ARGV[i + 2] .. ' ' .. ARGV[i + 3])
    end
    redis.call('ZADD', KEYS[1], at + after, dev)
    added = added + 1
  end
end
return added
";

/// Returns expired leases to the deadline set, then moves up to ARGV[3] due entries to the
/// judging set with a lease until ARGV[2]. The returned entries are this caller's alone.
const CLAIM: &str = r"
local now = ARGV[1]
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('ZREM', KEYS[2], m)
  redis.call('ZADD', KEYS[1], 'GT', now, m)
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[3])
for _, m in ipairs(due) do
  redis.call('ZREM', KEYS[1], m)
  redis.call('ZADD', KEYS[2], ARGV[2], m)
end
return due
";

/// Ends a judgement; with ARGV[2] set, the device is due again at that time (unless a newer
/// heartbeat already moved it later).
const FINISH: &str = r"
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[2] ~= '' then redis.call('ZADD', KEYS[1], 'GT', ARGV[2], ARGV[1]) end
return 1
";

fn shard_key(keys: &Keys, shard: u16, what: &str) -> String {
    format!("{}{{hb:{shard}}}:{what}", keys.prefix())
}

/// A device's last heartbeat (ms since the Unix epoch), if any.
///
/// # Errors
/// Any Redis error.
pub async fn last_seen(app: &App, device: &DeviceKey) -> Result<Option<u64>, StoreError> {
    let key = shard_key(&app.keys, device.shard(app.config.streams.shards), "seen");
    let mut con = app.redis.clone();
    let seen: Option<String> = redis::cmd("HGET").arg(key).arg(device.to_string()).query_async(&mut con).await?;
    Ok(seen.and_then(|s| s.split(' ').next().and_then(|at| at.parse().ok())))
}

/// The last heartbeat of each of `devices` that has one, by key, in one round trip.
///
/// # Errors
/// Any Redis error.
pub async fn last_seen_many(
    app: &App,
    devices: &[DeviceKey],
) -> Result<std::collections::HashMap<String, u64>, StoreError> {
    if devices.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    let cmds = devices
        .iter()
        .map(|d| {
            let mut hget = redis::cmd("HGET");
            hget.arg(shard_key(&app.keys, d.shard(app.config.streams.shards), "seen")).arg(d.to_string());
            hget
        })
        .collect();
    let mut con = app.redis.clone();
    // The shards' keys lie in different Redis Cluster slots.
    let seen: Vec<Option<String>> = con.query_each_as(cmds).await?;
    Ok(devices
        .iter()
        .zip(seen)
        .filter_map(|(d, s)| Some((d.to_string(), s?.split(' ').next()?.parse().ok()?)))
        .collect())
}

fn health_key(keys: &Keys, node: &str) -> String {
    format!("{}health:{{{node}}}", keys.prefix())
}

/// One gateway heartbeat window, as the upstream entry carries it.
#[derive(Debug, Clone, Copy)]
pub struct Window<'a> {
    /// The gateway node.
    pub node: &'a str,
    /// Window start, gateway clock, ms.
    pub start_ms: u64,
    /// Window length, ms.
    pub window_ms: u64,
    /// Heartbeats received in it.
    pub count: u64,
    /// Cabinet sessions the node held at its end.
    pub sessions: u64,
    /// Each device's last heartbeat in it.
    pub devices: &'a [HeartbeatSeen],
}

/// How a node is doing, over the health window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Health {
    /// Heartbeats received.
    pub received: f64,
    /// Heartbeats expected.
    pub expected: f64,
    /// Whether received reaches the share of expected.
    pub healthy: bool,
    /// Whether the node's liveness key exists.
    pub alive: bool,
}

/// The detector: records heartbeat windows and judges expired deadlines.
#[derive(Debug)]
pub struct Detector {
    app: Arc<App>,
    apply_window: Script,
    apply_logins: Script,
    seen: Script,
    reseed: Script,
    claim: Script,
    finish: Script,
    /// Health per node, recomputed at most once a second. A std mutex: never held across
    /// an `.await`.
    health_cache: Mutex<HashMap<String, (Instant, Health)>>,
    /// When each node was first seen without its liveness key.
    dead_since: Mutex<HashMap<String, Instant>>,
}

/// How long a claimed entry may be judged before another instance takes it over.
const JUDGE_LEASE_MS: u64 = 10_000;

/// Recent windows may still be on their way: the share is measured up to this long (plus one
/// window) before now.
const WINDOW_LAG_S: u64 = 2;

impl Detector {
    /// A detector for `app`.
    pub fn new(app: Arc<App>) -> Self {
        Self {
            app,
            apply_window: Script::new(APPLY_WINDOW),
            apply_logins: Script::new(APPLY_LOGINS),
            seen: Script::new(SEEN),
            reseed: Script::new(RESEED),
            claim: Script::new(CLAIM),
            finish: Script::new(FINISH),
            health_cache: Mutex::new(HashMap::new()),
            dead_since: Mutex::new(HashMap::new()),
        }
    }

    fn shards(&self) -> u16 {
        self.app.config.streams.shards
    }

    fn offline_after_ms(&self) -> u64 {
        self.app.config.heartbeat.offline_after_s * 1000
    }

    /// Records one node's heartbeat window: the node's intake and expectation (once per stream
    /// entry, however often it is delivered) and each device's last heartbeat and new deadline.
    ///
    /// # Errors
    /// Any Redis error; the caller retries the entry.
    pub async fn record_window(&self, entry_id: &str, window: &Window<'_>) -> Result<(), StoreError> {
        let mut con = self.app.redis.clone();
        let health = health_key(&self.app.keys, window.node);
        let dedup = format!("{health}:entry:{entry_id}");
        let interval_ms = self.app.config.heartbeat.interval_s as f64 * 1000.0;
        let expected = window.sessions as f64 * window.window_ms as f64 / interval_ms;
        let _: i64 = self
            .apply_window
            .key(&health)
            .key(&dedup)
            .arg(window.start_ms / 1000)
            .arg(window.count)
            .arg(format!("{expected:.3}"))
            .arg(window.window_ms)
            .arg(window.sessions)
            .invoke_async(&mut con)
            .await?;
        self.record_seen(window.node, window.devices).await
    }

    /// Starts the clock of each cabinet that just logged in, so that one that never sends a
    /// heartbeat is judged too, and counts each login as a sign of life of its node (once per
    /// stream entry, however often it is delivered). `logins` are (entry, node, login); vehicles
    /// among them are skipped (they send no heartbeats: MQTT keep-alive is the gateway's to
    /// enforce, and its end arrives as a session close). One script call per node and one per
    /// deadline shard, whatever the number of logins.
    ///
    /// # Errors
    /// Any Redis error; the caller retries the entries.
    pub async fn opened(&self, logins: &[(&str, &str, HeartbeatSeen)]) -> Result<(), StoreError> {
        let mut by_node: HashMap<&str, Vec<(&str, &HeartbeatSeen)>> = HashMap::new();
        for (entry, node, seen) in logins {
            if matches!(seen.device, DeviceKey::Cabinet(_)) {
                by_node.entry(node).or_default().push((entry, seen));
            }
        }
        let mut con = self.app.redis.clone();
        for (node, logins) in by_node {
            let health = health_key(&self.app.keys, node);
            let mut inv = self.apply_logins.prepare_invoke();
            inv.key(&health);
            for (entry, seen) in &logins {
                inv.key(format!("{health}:entry:{entry}")).arg(seen.at_ms / 1000);
            }
            let _: i64 = inv.invoke_async(&mut con).await?;
            let seen: Vec<HeartbeatSeen> = logins.into_iter().map(|(_, s)| s.clone()).collect();
            self.record_seen(node, &seen).await?;
        }
        Ok(())
    }

    /// Gives every cabinet PostgreSQL holds connected a deadline again if it has none, as if it
    /// had just been seen: after Redis lost the deadline sets (or, in a crash, some writes
    /// to them), a cabinet that died in the gap would otherwise never be judged. A deadline that
    /// survived is kept: moving it would put off the judgement of a cabinet that went silent
    /// before the loss, and with it every order waiting on that cabinet. Returns how many
    /// cabinets were given one.
    ///
    /// # Errors
    /// Any storage error.
    pub async fn reseed(&self) -> Result<usize, StoreError> {
        let client = self.app.pg.get().await?;
        let rows = client
            .query(
                "SELECT key, status_epoch, coalesce(node, '') FROM devices
                  WHERE kind = 'cab' AND status IN ('online', 'pending_init')",
                &[],
            )
            .await?;
        drop(client);
        let now = now_ms();
        let mut by_shard: HashMap<u16, Vec<(DeviceKey, u64, String)>> = HashMap::new();
        for r in &rows {
            let Ok(device) = DeviceKey::parse(r.get::<_, &str>(0)) else { continue };
            let epoch = u64::try_from(r.get::<_, i64>(1)).unwrap_or(0);
            by_shard.entry(device.shard(self.shards())).or_default().push((device, epoch, r.get::<_, String>(2)));
        }
        let mut con = self.app.redis.clone();
        let mut added = 0;
        for (shard, devices) in &by_shard {
            for chunk in devices.chunks(500) {
                let mut inv = self.reseed.prepare_invoke();
                inv.key(shard_key(&self.app.keys, *shard, "deadline"))
                    .key(shard_key(&self.app.keys, *shard, "seen"))
                    .key(shard_key(&self.app.keys, *shard, "judging"))
                    .arg(self.offline_after_ms());
                for (device, epoch, node) in chunk {
                    inv.arg(device.to_string()).arg(now).arg(*epoch).arg(node);
                }
                let n: usize = inv.invoke_async(&mut con).await?;
                added += n;
            }
        }
        Ok(added)
    }

    /// Whether a gateway's close of a silent cabinet (`idle_timeout`) may mark it offline now:
    /// only if its node is healthy. Otherwise the silence may be the node's or the network's
    /// (a paused node, loss on the way), so the close is not applied: the cabinet keeps a
    /// deadline from the close (`seen`), and is judged there under the same fleet-health rule
    /// as a heartbeat timeout; a login since (a newer epoch) makes that judgement change
    /// nothing. Counted as suppressed.
    ///
    /// # Errors
    /// Any Redis error; the caller retries the entry.
    pub async fn idle_close_applies(&self, node: &str, seen: HeartbeatSeen) -> Result<bool, StoreError> {
        if self.health(node).await?.healthy {
            return Ok(true);
        }
        self.app.metrics.offline_suppressed.with_label_values(&[node]).inc();
        tracing::debug!(device = %seen.device, node, "idle close of a cabinet deferred: its node's intake is below its share");
        self.record_seen(node, &[seen]).await?;
        Ok(false)
    }

    async fn record_seen(&self, node: &str, devices: &[HeartbeatSeen]) -> Result<(), StoreError> {
        let mut con = self.app.redis.clone();
        let mut by_shard: HashMap<u16, Vec<&HeartbeatSeen>> = HashMap::new();
        for d in devices {
            by_shard.entry(d.device.shard(self.shards())).or_default().push(d);
        }
        for (shard, seen) in by_shard {
            let mut inv = self.seen.prepare_invoke();
            inv.key(shard_key(&self.app.keys, shard, "deadline"))
                .key(shard_key(&self.app.keys, shard, "seen"))
                .arg(self.offline_after_ms());
            for d in seen {
                inv.arg(d.device.to_string()).arg(d.at_ms).arg(d.epoch).arg(node);
            }
            let _: i64 = inv.invoke_async(&mut con).await?;
        }
        Ok(())
    }

    /// The health of `node` over the last window (cached for a second).
    ///
    /// # Errors
    /// Any Redis error.
    pub async fn health(&self, node: &str) -> Result<Health, StoreError> {
        if let Some((at, h)) = self.health_cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(node)
            && at.elapsed() < Duration::from_secs(1)
        {
            return Ok(*h);
        }
        let cfg = &self.app.config.heartbeat;
        let mut con = self.app.redis.clone();
        let key = health_key(&self.app.keys, node);
        let fields: HashMap<String, String> = redis::cmd("HGETALL").arg(&key).query_async(&mut con).await?;
        let alive: bool = redis::cmd("EXISTS").arg(self.app.keys.node_alive(node)).query_async(&mut con).await?;
        let num = |name: &str| fields.get(name).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let sessions = num("sessions");
        let lag_s = WINDOW_LAG_S + (num("window_ms") / 1000.0).ceil() as u64;
        let now_s = now_ms() / 1000;
        // Not before the node's first window: a new node is not behind on what it never had.
        let first = fields.get("first").and_then(|v| v.parse::<u64>().ok()).unwrap_or(u64::MAX);
        let (from, to) = (now_s.saturating_sub(cfg.window_s + lag_s).max(first), now_s.saturating_sub(lag_s));
        let (mut received, mut expected) = (0.0, 0.0);
        for sec in from..to {
            received += num(&format!("r:{sec}"));
            // A second no window covered (a stalled gateway or stream) is expected at the last
            // known session count.
            let uncovered = (1.0 - num(&format!("c:{sec}")) / 1000.0).max(0.0);
            expected += num(&format!("e:{sec}")) + uncovered * sessions / cfg.interval_s as f64;
        }
        let stale: Vec<&String> = fields
            .keys()
            .filter(|f| {
                let sec = f.get(2..).and_then(|s| s.parse::<u64>().ok());
                f.as_bytes().get(1) == Some(&b':') && sec.is_some_and(|s| s + 4 * cfg.window_s < now_s)
            })
            .collect();
        if !stale.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("HDEL").arg(&key).arg(&stale).query_async(&mut con).await;
        }
        let healthy = alive && (expected < 1.0 || received >= cfg.healthy_share * expected);
        let h = Health { received, expected, healthy, alive };
        self.health_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(node.to_owned(), (Instant::now(), h));
        let m = &self.app.metrics;
        m.node_received.with_label_values(&[node]).set(received);
        m.node_expected.with_label_values(&[node]).set(expected);
        m.node_healthy.with_label_values(&[node]).set(i64::from(healthy));
        let mut dead = self.dead_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if alive {
            dead.remove(node);
        } else {
            dead.entry(node.to_owned()).or_insert_with(Instant::now);
        }
        Ok(h)
    }

    fn dead_long_enough(&self, node: &str) -> bool {
        self.dead_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(node)
            .is_some_and(|since| since.elapsed() >= Duration::from_secs(self.app.config.heartbeat.node_lost_s))
    }

    /// Judges every entry of `shard` whose deadline has passed. Returns how many were judged.
    ///
    /// # Errors
    /// Any storage error; unfinished judgements are retried after their lease.
    pub async fn judge_shard(&self, shard: u16) -> Result<usize, StoreError> {
        let deadline_key = shard_key(&self.app.keys, shard, "deadline");
        let judging_key = shard_key(&self.app.keys, shard, "judging");
        let seen_key = shard_key(&self.app.keys, shard, "seen");
        let now = now_ms();
        let mut con = self.app.redis.clone();
        let due: Vec<String> = self
            .claim
            .key(&deadline_key)
            .key(&judging_key)
            .arg(now)
            .arg(now + JUDGE_LEASE_MS)
            .arg(200)
            .invoke_async(&mut con)
            .await?;
        self.app.metrics.deadline_checks.inc_by(due.len() as u64);
        let cfg = &self.app.config.heartbeat;
        let grace_ends = self.app.started + Duration::from_secs(cfg.startup_grace_s);
        for member in &due {
            let seen: Option<String> = redis::cmd("HGET").arg(&seen_key).arg(member).query_async(&mut con).await?;
            let mut parts = seen.as_deref().unwrap_or("").split(' ');
            let at: u64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
            let epoch: u64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
            let node = parts.next().unwrap_or("").to_owned();
            let again_at = if at + self.offline_after_ms() > now {
                // A heartbeat arrived since the entry fell due: nothing to judge.
                None
            } else if Instant::now() < grace_ends {
                Some(now + u64::try_from(grace_ends.duration_since(Instant::now()).as_millis()).unwrap_or(0))
            } else {
                self.judge(member, epoch, &node).await?
            };
            let _: i64 = self
                .finish
                .key(&deadline_key)
                .key(&judging_key)
                .arg(member)
                .arg(again_at.map(|t| t.to_string()).unwrap_or_default())
                .invoke_async(&mut con)
                .await?;
        }
        Ok(due.len())
    }

    /// Decides one silent device. Returns when to look again, if the decision was suppressed.
    async fn judge(&self, member: &str, epoch: u64, node: &str) -> Result<Option<u64>, StoreError> {
        let Ok(device) = DeviceKey::parse(member) else { return Ok(None) };
        let health = self.health(node).await?;
        let reason = if health.healthy {
            "heartbeat_timeout"
        } else if !health.alive && self.dead_long_enough(node) {
            "node_down"
        } else {
            self.app.metrics.offline_suppressed.with_label_values(&[node]).inc();
            tracing::debug!(%device, node, received = health.received, expected = health.expected, "offline decision suppressed");
            return Ok(Some(now_ms() + self.app.config.heartbeat.recheck_s * 1000));
        };
        match status::apply(&self.app, &device, &Event::HeartbeatTimeout { epoch, reason }).await {
            Ok(Some(_)) => self.app.metrics.offline_decisions.with_label_values(&[device.kind().as_str()]).inc(),
            Ok(None) | Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        Ok(None)
    }

    /// Polls every shard's deadlines every `check_interval_ms` and evaluates node health (and
    /// its alerts) every second, until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.app.config.heartbeat.check_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_health = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let in_grace = self.app.started.elapsed() < Duration::from_secs(self.app.config.heartbeat.startup_grace_s);
            self.app.metrics.grace.set(if in_grace { 1.0 } else { 0.0 });
            for shard in 0..self.shards() {
                if let Err(e) = self.judge_shard(shard).await {
                    tracing::warn!(shard, error = %e, "failed to judge expired heartbeats");
                }
            }
            if last_health.elapsed() >= Duration::from_secs(1) {
                last_health = Instant::now();
                if let Err(e) = self.evaluate_nodes().await {
                    tracing::warn!(error = %e, "failed to evaluate node health");
                }
            }
        }
    }

    /// A node without its liveness key: while it still holds devices, alert `node_down` names it;
    /// once it has been gone `heartbeat.node_lost_s`, every device it still holds, vehicles
    /// included (they have no heartbeat deadline), is marked offline with reason `node_down`
    /// (fenced by each device's epoch: one that reconnected elsewhere is not touched). The alert
    /// closes when the node holds nothing any more or comes back.
    async fn node_gone(&self, node: &str) -> Result<(), StoreError> {
        let client = self.app.pg.get().await?;
        let held = client
            .query(
                "SELECT key, status_epoch FROM devices WHERE node = $1 AND status IN ('online', 'pending_init')",
                &[&node],
            )
            .await?;
        if held.is_empty() {
            client
                .execute(
                    "UPDATE service_alerts SET ended_at = now() WHERE kind = 'node_down' AND node = $1 AND ended_at IS NULL",
                    &[&node],
                )
                .await?;
            return Ok(());
        }
        let detail = format!("gone; still holds {} devices", held.len());
        let opened = client
            .execute(
                "INSERT INTO service_alerts (kind, node, detail) VALUES ('node_down', $1, $2)
                 ON CONFLICT (kind, node) WHERE ended_at IS NULL DO NOTHING",
                &[&node, &detail],
            )
            .await?;
        if opened > 0 {
            tracing::warn!(node, %detail, "gateway node gone");
        }
        drop(client);
        if !self.dead_long_enough(node) {
            return Ok(());
        }
        for row in held {
            let (key, epoch): (String, i64) = (row.get(0), row.get(1));
            let (Ok(device), Ok(epoch)) = (DeviceKey::parse(&key), u64::try_from(epoch)) else { continue };
            let event = Event::HeartbeatTimeout { epoch, reason: "node_down" };
            if status::apply(&self.app, &device, &event).await?.is_some() {
                self.app.metrics.offline_decisions.with_label_values(&[device.kind().as_str()]).inc();
            }
        }
        Ok(())
    }

    /// Recomputes every known node's health, and opens or closes its intake alert.
    async fn evaluate_nodes(&self) -> Result<(), StoreError> {
        let mut con = self.app.redis.clone();
        let nodes: Vec<String> =
            redis::cmd("ZRANGE").arg(self.app.keys.nodes()).arg(0).arg(-1).query_async(&mut con).await?;
        for node in nodes {
            let h = self.health(&node).await?;
            let client = self.app.pg.get().await?;
            if h.alive {
                client
                    .execute(
                        "UPDATE service_alerts SET ended_at = now() WHERE kind = 'node_down' AND node = $1 AND ended_at IS NULL",
                        &[&node],
                    )
                    .await?;
            } else {
                self.node_gone(&node).await?;
            }
            if h.healthy || h.expected < 1.0 {
                let closed = client
                    .execute(
                        "UPDATE service_alerts SET ended_at = now()
                          WHERE kind = 'heartbeat_intake_low' AND node = $1 AND ended_at IS NULL",
                        &[&node],
                    )
                    .await?;
                if closed > 0 {
                    tracing::info!(node, "heartbeat intake recovered; devices are judged again");
                }
            } else {
                let detail =
                    format!("received {:.0} of {:.0} expected heartbeats (alive: {})", h.received, h.expected, h.alive);
                let opened = client
                    .execute(
                        "INSERT INTO service_alerts (kind, node, detail) VALUES ('heartbeat_intake_low', $1, $2)
                         ON CONFLICT (kind, node) WHERE ended_at IS NULL DO NOTHING",
                        &[&node, &detail],
                    )
                    .await?;
                if opened > 0 {
                    tracing::warn!(node, %detail, "heartbeat intake below its share: offline decisions suppressed");
                }
            }
        }
        Ok(())
    }
}
