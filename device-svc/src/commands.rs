//! Commands to devices (SPEC.md 3.3), the one internal API the purchase and vehicle flows and
//! the operators' HTTP endpoint all use: find the device's node in the connection map, add the
//! command to that node's stream, and wait for the reply on this instance's reply stream.
//!
//! The answer is always one of: the device's result, "not connected" (no map entry, or its node
//! is dead: at once, without waiting), or "timed out" (nothing by the deadline). Commands to
//! one cabinet door are serialised here, so two flows never race on the same lock.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use protocol::bus::{CommandBody, CommandReply, CommandRequest, DeviceKey, Keys, Outcome};
use protocol::cabinet::CommandAction;
use redis::streams::StreamReadReply;
use redis_conn::RedisConn;
use tokio::sync::{Mutex, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::error::StoreError;
use crate::metrics::Metrics;

/// Sends commands and matches their replies.
#[derive(Debug)]
pub struct Commander {
    redis: RedisConn,
    keys: Keys,
    instance: String,
    metrics: Metrics,
    /// Replies awaited, by request id.
    waiting: DashMap<String, oneshot::Sender<Outcome>>,
    /// One lock per cabinet door while commands to it run or wait: they go one at a time. An
    /// entry leaves with its last user ([`DoorTurn`]), so the map holds only doors in use, not
    /// every door ever named (a caller naming random cabinets must not grow it for good).
    doors: DashMap<(String, u8), Arc<Mutex<()>>>,
    /// [`ADD_COMMAND`], loaded once.
    add_command: redis::Script,
    /// Bytes a node's command stream may hold before commands to it are refused: a downlink may
    /// be 128 KiB, so the entry cap alone would let a node that stopped reading hold gigabytes.
    stream_max_bytes: u64,
}

/// Adds a command to a node's stream (`KEYS[1]`) unless the stream already holds `ARGV[2]`
/// bytes; trims it to about `ARGV[1]` entries. `ARGV[3..]` are the entry's fields. Returns the
/// entry id, or nil when refused.
const ADD_COMMAND: &str = r"
local used = redis.call('MEMORY', 'USAGE', KEYS[1]) or 0
if used >= tonumber(ARGV[2]) then return false end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3))
";

/// A command's turn at its door: removes the door's entry when nobody else holds or awaits it.
struct DoorTurn<'a> {
    doors: &'a DashMap<(String, u8), Arc<Mutex<()>>>,
    key: (String, u8),
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for DoorTurn<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        // Under the shard's lock, as the clone in `send_identified` is: a turn taken meanwhile
        // keeps the entry.
        self.doors.remove_if(&self.key, |_, lock| Arc::strong_count(lock) == 1);
    }
}

impl Commander {
    /// A commander for this instance; run [`Commander::run_replies`] alongside.
    pub fn new(redis: RedisConn, keys: Keys, instance: String, metrics: Metrics, stream_max_bytes: u64) -> Self {
        Self {
            redis,
            keys,
            instance,
            metrics,
            waiting: DashMap::new(),
            doors: DashMap::new(),
            add_command: redis::Script::new(ADD_COMMAND),
            stream_max_bytes,
        }
    }

    /// Cabinet doors with a command running or waiting now (the per-door map's size).
    pub fn doors_in_use(&self) -> usize {
        self.doors.len()
    }

    fn reply_stream(&self) -> String {
        self.keys.replies(&self.instance)
    }

    /// Sends `body` to `device` and waits for the outcome, at most `timeout`.
    ///
    /// # Errors
    /// Only Redis errors; every device-side outcome (including not connected and timed out)
    /// is an `Ok`.
    pub async fn send(&self, device: &DeviceKey, body: CommandBody, timeout: Duration) -> Result<Outcome, StoreError> {
        Ok(self.send_identified(device, body, timeout).await?.1)
    }

    /// [`Commander::send`], also returning the request id the command went out with (what an
    /// OTA push records as its message id).
    ///
    /// # Errors
    /// As [`Commander::send`].
    pub async fn send_identified(
        &self,
        device: &DeviceKey,
        body: CommandBody,
        timeout: Duration,
    ) -> Result<(String, Outcome), StoreError> {
        let _turn = match (&device, &body) {
            (DeviceKey::Cabinet(id), CommandBody::Cabinet(action)) => match door_of(action) {
                Some(door) => {
                    let key = (id.to_string(), door);
                    let lock = Arc::clone(&self.doors.entry(key.clone()).or_default());
                    // Built before the wait, so a cancelled wait still cleans up.
                    let mut turn = DoorTurn { doors: &self.doors, key, guard: None };
                    turn.guard = Some(lock.lock_owned().await);
                    Some(turn)
                }
                None => None,
            },
            _ => None,
        };
        let mut id = [0u8; 12];
        getrandom::fill(&mut id).map_err(|e| StoreError::invalid("random", e.to_string()))?;
        let request_id = format!("{}-{}", self.instance, hex::encode(id));
        let started = Instant::now();
        let outcome = self.send_unserialised(&request_id, device, body, timeout).await?;
        self.metrics.commands.with_label_values(&[outcome.label()]).inc();
        self.metrics.command_duration.with_label_values(&[outcome.label()]).observe(started.elapsed().as_secs_f64());
        Ok((request_id, outcome))
    }

    async fn send_unserialised(
        &self,
        request_id: &str,
        device: &DeviceKey,
        body: CommandBody,
        timeout: Duration,
    ) -> Result<Outcome, StoreError> {
        let mut con = self.redis.clone();
        let node: Option<String> =
            redis::cmd("HGET").arg(self.keys.conn(device)).arg("node").query_async(&mut con).await?;
        let Some(node) = node else { return Ok(Outcome::NotConnected) };
        let alive: bool = redis::cmd("EXISTS").arg(self.keys.node_alive(&node)).query_async(&mut con).await?;
        if !alive {
            // The map names a dead node: the device is not reachable there.
            return Ok(Outcome::NotConnected);
        }
        let request = CommandRequest {
            request_id: request_id.to_owned(),
            device: device.clone(),
            deadline_ms: now_ms() + u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            reply_to: self.reply_stream(),
            body,
        };
        let fields = request.to_fields().map_err(|e| StoreError::invalid("command", e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        self.waiting.insert(request_id.to_owned(), tx);
        let added: redis::RedisResult<Option<String>> = self
            .add_command
            .key(self.keys.commands(&node))
            .arg(protocol::bus::COMMAND_STREAM_MAXLEN)
            .arg(self.stream_max_bytes)
            .arg(fields)
            .invoke_async(&mut con)
            .await;
        match added {
            Ok(Some(_)) => {}
            Ok(None) => {
                // The node is not reading its stream (stuck, or gone without its map entries
                // expiring yet): no more bytes pile up there.
                self.waiting.remove(request_id);
                tracing::warn!(node, "command stream at its byte cap; command refused");
                return Ok(Outcome::Busy);
            }
            Err(e) => {
                self.waiting.remove(request_id);
                return Err(e.into());
            }
        }
        // The gateway answers by the deadline itself; the slack covers the reply's trip back.
        let outcome = match tokio::time::timeout(timeout + Duration::from_secs(1), rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) | Err(_) => Outcome::TimedOut,
        };
        self.waiting.remove(request_id);
        Ok(outcome)
    }

    /// Reads this instance's reply stream and hands each reply to its waiter, until `stop`.
    /// `redis` must be a connection of its own (the read blocks).
    pub async fn run_replies(self: Arc<Self>, mut redis: RedisConn, stop: CancellationToken) {
        let stream = self.reply_stream();
        // From the start of the stream: a cursor of "$" would miss replies landing between two
        // reads. Old replies find no waiter and are trimmed as the reader passes them.
        let mut cursor = "0-0".to_owned();
        while !stop.is_cancelled() {
            let read: redis::RedisResult<Option<StreamReadReply>> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(500)
                .arg("BLOCK")
                .arg(500)
                .arg("STREAMS")
                .arg(&stream)
                .arg(&cursor)
                .query_async(&mut redis)
                .await;
            let entries = match read {
                Ok(r) => r.map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect::<Vec<_>>()).unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(error = %e, "failed to read replies");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let mut last = None;
            for entry in entries {
                last = Some(entry.id.clone());
                let fields = redis_conn::bulk_fields(entry.map);
                match CommandReply::from_fields(&fields) {
                    Ok(reply) => {
                        if let Some((_, waiter)) = self.waiting.remove(&reply.request_id) {
                            let _ = waiter.send(reply.outcome);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "invalid reply entry"),
                }
            }
            if let Some(id) = last {
                // Trim what was read: replies are for this instance only.
                let _: redis::RedisResult<i64> =
                    redis::cmd("XTRIM").arg(&stream).arg("MINID").arg(&id).query_async(&mut redis).await;
                cursor = id;
            }
        }
    }
}

fn door_of(action: &CommandAction) -> Option<u8> {
    match action {
        CommandAction::OpenDoor { door_id, .. }
        | CommandAction::QueryDoor { door_id }
        | CommandAction::Tare { door_id, .. } => Some(*door_id),
        CommandAction::Other { .. } => None,
    }
}
