//! Who is connected: the node-local session table and this node's part of the connection map
//! in Redis (SPEC.md 3.1).
//!
//! Single live session per device, across nodes: a login *claims* the device's map entry,
//! which raises its epoch (the fencing token, never lower than the login time in ms, so it cannot go
//! back when Redis loses the entry) and names this node and session. The claim
//! returns the previous holder, which is told to end (locally, or through its node's command
//! stream). When a session ends it *releases* the entry only if the entry still names it, so a
//! late cleanup can never remove a newer session's entry.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use protocol::bus::{DeviceKey, Keys};
use redis::{RedisResult, Script};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::metrics::Metrics;
use crate::session::SessionHandle;
use redis_conn::RedisConn;

/// Admits a login, then claims the device for it. In order, each refusal leaving the entry as
/// it was: a device cooling down after flapping (`{4, 0, '', ms left}`); a version-1 login for a
/// device that has used version 2 (`{2}`); a version-1 login whose device time is not later than
/// the last accepted login's (`{1}`, a replay); a login that makes the device flap, which starts
/// a cool-down twice as long as the previous one (`{3, 0, '', ms}`). Otherwise raises the epoch
/// to the larger of the last one plus one and the login time in ms (so epochs never go back,
/// even when Redis lost the entry), names the new holder and returns `{0, epoch, previous node}`.
///
/// ARGV: node, session, now (ms), device time (ms, `''` = not given), login version (0 = none),
/// flap window (ms), logins allowed in it, first cool-down (ms), longest cool-down (ms).
const CLAIM: &str = r"
local now = tonumber(ARGV[3])
local f = redis.call('HMGET', KEYS[1], 'fu', 'fw', 'fc', 'fl', 'dt', 'lv', 'node', 'epoch')
local cool_until = tonumber(f[1]) or 0
if now < cool_until then return {4, 0, '', cool_until - now} end
local version = tonumber(ARGV[5])
local last_version = tonumber(f[6]) or 0
if version == 1 and last_version >= 2 then return {2, 0, '', 0} end
local device_time = tonumber(ARGV[4])
local last_time = tonumber(f[5])
if version == 1 and device_time and last_time and device_time <= last_time then return {1, 0, '', 0} end
local window_start = tonumber(f[2]) or 0
local count = tonumber(f[3]) or 0
if now - window_start >= tonumber(ARGV[6]) then
  window_start = now
  count = 0
end
count = count + 1
local level = tonumber(f[4]) or 0
if cool_until > 0 and now - cool_until > tonumber(ARGV[9]) then level = 0 end
if count > tonumber(ARGV[7]) then
  local cool = math.min(tonumber(ARGV[8]) * 2 ^ level, tonumber(ARGV[9]))
  redis.call('HSET', KEYS[1], 'fu', now + cool, 'fl', level + 1, 'fw', now, 'fc', 0)
  return {3, 0, '', cool}
end
-- Above the last epoch and at least the login time: if Redis lost the entry, the new epoch is
-- still above every epoch issued before (those were at most their login times).
local epoch = math.max((tonumber(f[8]) or 0) + 1, now)
local set = {'node', ARGV[1], 'session', ARGV[2], 'since_ms', ARGV[3], 'fw', window_start, 'fc', count, 'fl', level,
             'epoch', epoch}
if device_time and (not last_time or device_time > last_time) then
  set[#set + 1] = 'dt'
  set[#set + 1] = ARGV[4]
end
if version > last_version then
  set[#set + 1] = 'lv'
  set[#set + 1] = version
end
redis.call('HSET', KEYS[1], unpack(set))
return {0, epoch, f[7] or '', 0}
";

/// Compare-and-delete: clears the holder only if it is still `ARGV[1]`; the epoch stays.
const RELEASE: &str = r"
if redis.call('HGET', KEYS[1], 'session') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'node', 'session', 'since_ms')
  return 1
end
return 0
";

/// Clears an entry this node (`ARGV[1]`) wrote in an earlier incarnation (session not starting
/// with `ARGV[2]`). Returns the cleared session's epoch, or -1.
const CLEAR_LEFTOVER: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'node', 'session', 'epoch')
if cur[1] == ARGV[1] and cur[2] and string.sub(cur[2], 1, #ARGV[2]) ~= ARGV[2] then
  redis.call('HDEL', KEYS[1], 'node', 'session', 'since_ms')
  return tonumber(cur[3])
end
return -1
";

/// Writes a live session back into a device's map entry after Redis lost it: only if the entry
/// names no newer epoch (the device may have logged in elsewhere meanwhile). ARGV: node,
/// session, epoch, since (ms). Returns 1 if written.
const RESTORE: &str = r"
local cur = tonumber(redis.call('HGET', KEYS[1], 'epoch')) or 0
if cur > tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'session', ARGV[2], 'epoch', ARGV[3], 'since_ms', ARGV[4])
return 1
";

/// What a successful claim learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The new session's epoch.
    pub epoch: u64,
    /// The node that held the device before, if any.
    pub previous_node: Option<String>,
}

/// What a login proves besides its credentials, checked against the device's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoginFacts {
    /// The cabinet's clock in its `LOGIN` (ms); `None` for vehicles.
    pub device_time_ms: Option<u64>,
    /// The cabinet login version (SPEC.md 1.7); 0 for vehicles.
    pub version: u8,
}

/// How often a device may log in before it counts as flapping, and how long it is then refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlapPolicy {
    /// The window logins are counted in.
    pub window: Duration,
    /// Logins allowed in one window; one more starts a cool-down.
    pub max_logins: u32,
    /// The first cool-down; each next one is twice as long.
    pub cooldown: Duration,
    /// The longest cool-down; a device quiet for this long after one starts again from the first.
    pub max_cooldown: Duration,
}

/// Why the connection map refused a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimRefusal {
    /// A version-1 login whose device time is not later than the last accepted one: a replay.
    Replayed,
    /// A version-1 login for a device that has logged in with version 2.
    Downgrade,
    /// The device logged in too often: refused for `retry_after`; `started` when this login
    /// began the cool-down.
    Flapping {
        /// Time left in the cool-down.
        retry_after: Duration,
        /// This login started it.
        started: bool,
    },
}

/// Outcome of adding a session to the local table.
#[derive(Debug)]
pub enum LocalInsert {
    /// No session for this device was here.
    Fresh,
    /// An older session was here; the caller ends it.
    Replaced(Arc<SessionHandle>),
    /// A newer session is already here (two logins raced): the new one must end.
    Stale,
}

/// A live session keyed by its own device, so the table stores each device key once (inside the
/// handle) rather than twice.
#[derive(Debug, Clone)]
struct ByDevice(Arc<SessionHandle>);

impl PartialEq for ByDevice {
    fn eq(&self, other: &Self) -> bool {
        self.0.device == other.0.device
    }
}

impl Eq for ByDevice {}

impl std::hash::Hash for ByDevice {
    // Must hash exactly like the `DeviceKey` it borrows as.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.device.hash(state);
    }
}

impl std::borrow::Borrow<DeviceKey> for ByDevice {
    fn borrow(&self) -> &DeviceKey {
        &self.0.device
    }
}

/// The local session table plus this node's Redis map operations.
#[derive(Debug)]
pub struct Registry {
    local: DashMap<ByDevice, ()>,
    redis: RedisConn,
    keys: Keys,
    node: String,
    /// Start time of this process (ms): distinguishes this run's sessions from a previous
    /// run's in the map.
    incarnation: u64,
    next_session: AtomicU64,
    /// Live cabinet sessions here, reported with every heartbeat window.
    cabinet_sessions: AtomicU64,
    node_ttl: Duration,
    claim: Script,
    release: Script,
    clear_leftover: Script,
    restore: Script,
    /// Changes to this node's member set not yet written (device -> `true` to add, `false` to
    /// remove; the last change wins), written by [`Registry::run_node_set`].
    node_set: std::sync::Mutex<HashMap<String, bool>>,
    node_set_changed: tokio::sync::Notify,
    /// Releases that failed (Redis down) and are retried by [`Registry::run_janitor`].
    retry_tx: mpsc::UnboundedSender<(DeviceKey, String)>,
    retry_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<(DeviceKey, String)>>>,
    metrics: Metrics,
}

impl Registry {
    /// A registry for `node`, talking to Redis through `redis`.
    pub fn new(redis: RedisConn, keys: Keys, node: String, node_ttl: Duration, metrics: Metrics) -> Self {
        let (retry_tx, retry_rx) = mpsc::unbounded_channel();
        Self {
            local: DashMap::new(),
            redis,
            keys,
            node,
            incarnation: now_ms(),
            next_session: AtomicU64::new(1),
            cabinet_sessions: AtomicU64::new(0),
            node_ttl,
            claim: Script::new(CLAIM),
            release: Script::new(RELEASE),
            clear_leftover: Script::new(CLEAR_LEFTOVER),
            restore: Script::new(RESTORE),
            node_set: std::sync::Mutex::new(HashMap::new()),
            node_set_changed: tokio::sync::Notify::new(),
            retry_tx,
            retry_rx: std::sync::Mutex::new(Some(retry_rx)),
            metrics,
        }
    }

    /// Notes that `device` joined (`true`) or left this node's member set.
    fn note_member(&self, device: String, member: bool) {
        self.node_set.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(device, member);
        self.node_set_changed.notify_one();
    }

    /// Writes this node's member set (`P node:{node}:conns`, read after a crash by
    /// [`Registry::clear_leftovers`]) off the login path: each round takes every change noted
    /// since the last one and writes them as one `SADD` and one `SREM`, so a storm of logins
    /// costs a few commands rather than one per login. A failed round is merged back (newer
    /// changes win) and tried again a second later. Runs until `shutdown`, then writes once
    /// more.
    pub async fn run_node_set(self: Arc<Self>, shutdown: CancellationToken) {
        let key = self.keys.node_conns(&self.node);
        loop {
            let stopping = tokio::select! {
                () = self.node_set_changed.notified() => false,
                () = shutdown.cancelled() => true,
            };
            let changes = std::mem::take(&mut *self.node_set.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
            if !changes.is_empty() {
                let (add, remove): (Vec<_>, Vec<_>) = changes.iter().partition(|(_, member)| **member);
                let mut pipe = redis::pipe();
                if !add.is_empty() {
                    pipe.cmd("SADD").arg(&key).arg(add.iter().map(|(d, _)| d.as_str()).collect::<Vec<_>>()).ignore();
                }
                if !remove.is_empty() {
                    pipe.cmd("SREM").arg(&key).arg(remove.iter().map(|(d, _)| d.as_str()).collect::<Vec<_>>()).ignore();
                }
                let mut con = self.redis.clone();
                if let Err(e) = pipe.query_async::<()>(&mut con).await {
                    self.metrics.redis_errors.with_label_values(&["node_set"]).inc();
                    tracing::warn!(error = %e, changes = changes.len(), "failed to write the node's member set; retrying");
                    {
                        let mut pending = self.node_set.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        for (device, member) in changes {
                            pending.entry(device).or_insert(member);
                        }
                    }
                    if !stopping {
                        self.node_set_changed.notify_one();
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                            () = shutdown.cancelled() => {}
                        }
                    }
                }
            }
            if stopping {
                return;
            }
        }
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    fn session_prefix(&self) -> String {
        format!("{}/", self.incarnation_id())
    }

    /// This run of this node: `node/incarnation`, unique across nodes and restarts.
    pub fn incarnation_id(&self) -> String {
        format!("{}/{}", self.node, self.incarnation)
    }

    /// A new session number; [`Registry::session_id`] makes it unique across nodes and runs.
    pub fn new_session(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// The id the map entry names for session `n` of this run: `node/incarnation/n`. Built when
    /// needed rather than stored, to keep each live session small.
    pub fn session_id(&self, n: u64) -> String {
        format!("{}{n}", self.session_prefix())
    }

    /// Admits a login of `device` and claims the device for session `session` in the
    /// connection map, in one script on the device's entry (see [`ClaimRefusal`]).
    ///
    /// # Errors
    /// Any Redis error; the login is then refused as "unavailable".
    pub async fn claim(
        &self,
        device: &DeviceKey,
        session: u64,
        facts: LoginFacts,
        flap: &FlapPolicy,
    ) -> RedisResult<Result<Claim, ClaimRefusal>> {
        let mut con = self.redis.clone();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let (status, epoch, prev_node, wait_ms): (u8, u64, String, u64) = self
            .claim
            .key(self.keys.conn(device))
            .arg(&self.node)
            .arg(self.session_id(session))
            .arg(now_ms())
            .arg(facts.device_time_ms.map(|t| t.to_string()).unwrap_or_default())
            .arg(facts.version)
            .arg(ms(flap.window))
            .arg(flap.max_logins)
            .arg(ms(flap.cooldown))
            .arg(ms(flap.max_cooldown))
            .invoke_async(&mut con)
            .await
            .inspect_err(|_| self.metrics.redis_errors.with_label_values(&["claim"]).inc())?;
        let retry_after = Duration::from_millis(wait_ms);
        match status {
            0 => {}
            1 => return Ok(Err(ClaimRefusal::Replayed)),
            2 => return Ok(Err(ClaimRefusal::Downgrade)),
            3 => return Ok(Err(ClaimRefusal::Flapping { retry_after, started: true })),
            _ => return Ok(Err(ClaimRefusal::Flapping { retry_after, started: false })),
        }
        // Remembered so that a restart of this node can clear what a crash left behind.
        self.note_member(device.to_string(), true);
        Ok(Ok(Claim { epoch, previous_node: (!prev_node.is_empty()).then_some(prev_node) }))
    }

    /// Releases `device` if the map still names session `session`. On a Redis error the
    /// release is queued and retried until it succeeds.
    pub async fn release(&self, device: &DeviceKey, session: u64) {
        let session_id = self.session_id(session);
        if self.try_release(device, &session_id).await.is_err() {
            let _ = self.retry_tx.send((device.clone(), session_id));
        }
    }

    async fn try_release(&self, device: &DeviceKey, session_id: &str) -> RedisResult<bool> {
        let mut con = self.redis.clone();
        let released: i64 = self
            .release
            .key(self.keys.conn(device))
            .arg(session_id)
            .invoke_async(&mut con)
            .await
            .inspect_err(|_| self.metrics.redis_errors.with_label_values(&["release"]).inc())?;
        if released == 1 {
            self.note_member(device.to_string(), false);
        }
        Ok(released == 1)
    }

    /// Retries failed releases every second until `shutdown`, then once more.
    pub async fn run_janitor(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(mut rx) = self.retry_rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() else {
            return;
        };
        let mut pending: Vec<(DeviceKey, String)> = Vec::new();
        loop {
            tokio::select! {
                item = rx.recv() => match item {
                    Some(item) => pending.push(item),
                    None => break,
                },
                () = tokio::time::sleep(Duration::from_secs(1)), if !pending.is_empty() => {
                    let mut still = Vec::new();
                    for (device, session) in pending.drain(..) {
                        if self.try_release(&device, &session).await.is_err() {
                            still.push((device, session));
                        }
                    }
                    pending = still;
                }
                () = shutdown.cancelled() => break,
            }
        }
        while let Ok(item) = rx.try_recv() {
            pending.push(item);
        }
        for (device, session) in pending {
            let _ = self.try_release(&device, &session).await;
        }
    }

    /// Adds a session that has claimed its device. Sessions of one device on one node are
    /// ordered by epoch: the newer one stays.
    pub fn insert_local(&self, handle: Arc<SessionHandle>) -> LocalInsert {
        let epoch = handle.epoch;
        let cabinet = handle.device.kind() == protocol::bus::DeviceKind::Cabinet;
        match self.local.entry(ByDevice(handle)) {
            Entry::Vacant(v) => {
                v.insert(());
                if cabinet {
                    self.cabinet_sessions.fetch_add(1, Ordering::Relaxed);
                }
                LocalInsert::Fresh
            }
            Entry::Occupied(o) => {
                if o.key().0.epoch > epoch {
                    LocalInsert::Stale
                } else {
                    // Replaces the stored key, which is the handle itself.
                    let (old, ()) = o.replace_entry(());
                    LocalInsert::Replaced(old.0)
                }
            }
        }
    }

    /// Removes a session from the local table, only if the entry is this very session.
    pub fn remove_local(&self, handle: &SessionHandle) {
        let removed = self.local.remove_if(&handle.device, |k, ()| k.0.session == handle.session);
        if removed.is_some() && handle.device.kind() == protocol::bus::DeviceKind::Cabinet {
            self.cabinet_sessions.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Live cabinet sessions on this node.
    pub fn cabinet_sessions(&self) -> u64 {
        self.cabinet_sessions.load(Ordering::Relaxed)
    }

    /// The live local session of `device`.
    pub fn get(&self, device: &DeviceKey) -> Option<Arc<SessionHandle>> {
        self.local.get(device).map(|e| Arc::clone(&e.key().0))
    }

    /// Every live local session (for the drain).
    pub fn all(&self) -> Vec<Arc<SessionHandle>> {
        self.local.iter().map(|e| Arc::clone(&e.key().0)).collect()
    }

    /// Number of live local sessions.
    pub fn len(&self) -> usize {
        self.local.len()
    }

    /// `true` when no session is live here.
    pub fn is_empty(&self) -> bool {
        self.local.is_empty()
    }

    /// Refreshes this node's liveness key.
    ///
    /// # Errors
    /// Any Redis error.
    pub async fn refresh_alive(&self) -> RedisResult<()> {
        let mut con = self.redis.clone();
        let ttl_ms = u64::try_from(self.node_ttl.as_millis()).unwrap_or(u64::MAX);
        redis::cmd("SET")
            .arg(self.keys.node_alive(&self.node))
            .arg(self.incarnation)
            .arg("PX")
            .arg(ttl_ms)
            .query_async::<()>(&mut con)
            .await
            .inspect_err(|_| self.metrics.redis_errors.with_label_values(&["node_alive"]).inc())
    }

    /// Keeps the liveness key fresh until `shutdown`, then deletes it.
    pub async fn run_liveness(self: Arc<Self>, shutdown: CancellationToken) {
        let mut con = self.redis.clone();
        let _: RedisResult<()> =
            redis::cmd("ZADD").arg(self.keys.nodes()).arg(self.incarnation).arg(&self.node).query_async(&mut con).await;
        let mut tick = tokio::time::interval(self.node_ttl / 3);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = self.refresh_alive().await {
                        tracing::warn!(error = %e, "failed to refresh node liveness");
                    }
                }
                () = shutdown.cancelled() => break,
            }
        }
        let _: RedisResult<()> = redis::cmd("DEL").arg(self.keys.node_alive(&self.node)).query_async(&mut con).await;
    }

    /// Writes this node back into Redis after Redis lost its data: the node list, its liveness
    /// key, and every live session's map entry (with its epoch, unless the device logged in
    /// elsewhere since) and membership of the node's set. Returns how many entries were
    /// written; sessions are written 256 at a time.
    ///
    /// # Errors
    /// The first Redis error; the caller tries again at its next check.
    pub async fn restore_all(&self) -> RedisResult<usize> {
        let mut con = self.redis.clone();
        let () = redis::cmd("ZADD")
            .arg(self.keys.nodes())
            .arg(self.incarnation)
            .arg(&self.node)
            .query_async(&mut con)
            .await?;
        self.refresh_alive().await?;
        let since = now_ms();
        let mut restored = 0;
        for chunk in self.all().chunks(256) {
            let writes = chunk.iter().map(|h| {
                let mut con = self.redis.clone();
                let device = h.device.to_string();
                let (entry, set) = (self.keys.conn(&h.device), self.keys.node_conns(&self.node));
                let session = self.session_id(h.session);
                async move {
                    let written: i64 = self
                        .restore
                        .key(entry)
                        .arg(&self.node)
                        .arg(session)
                        .arg(h.epoch)
                        .arg(since)
                        .invoke_async(&mut con)
                        .await?;
                    let () = redis::cmd("SADD").arg(set).arg(device).query_async(&mut con).await?;
                    RedisResult::Ok(written)
                }
            });
            for written in futures_util::future::join_all(writes).await {
                restored += usize::try_from(written?).unwrap_or(0);
            }
        }
        Ok(restored)
    }

    /// Clears the map entries an earlier run of this node left behind (a crash skips the
    /// releases). Returns each cleared device with the epoch of the dead session.
    ///
    /// # Errors
    /// Any Redis error.
    pub async fn clear_leftovers(&self) -> RedisResult<Vec<(DeviceKey, u64)>> {
        let mut con = self.redis.clone();
        let set = self.keys.node_conns(&self.node);
        let members: Vec<String> = redis::cmd("SMEMBERS").arg(&set).query_async(&mut con).await?;
        let prefix = self.session_prefix();
        let mut cleared = Vec::new();
        for member in members {
            let Ok(device) = DeviceKey::parse(&member) else { continue };
            let epoch: i64 = self
                .clear_leftover
                .key(self.keys.conn(&device))
                .arg(&self.node)
                .arg(&prefix)
                .invoke_async(&mut con)
                .await?;
            if self.local.get(&device).is_none() {
                let _: () = redis::cmd("SREM").arg(&set).arg(&member).query_async(&mut con).await?;
            }
            if let Ok(epoch) = u64::try_from(epoch) {
                cleared.push((device, epoch));
            }
        }
        Ok(cleared)
    }
}
