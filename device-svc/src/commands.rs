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
use protocol::Vin;
use protocol::bus::{CommandBody, CommandReply, CommandRequest, DeviceKey, Keys, Outcome};
use protocol::cabinet::CommandAction;
use protocol::mqtt::topic::DownlinkKind;
use protocol::vehicle::{VehicleCommand, VehicleCommandResult};
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
    /// Vehicles' own results to generic commands awaited, by request id: they come after the
    /// delivery, from whichever instance consumed the vehicle's `command_result`.
    results: DashMap<String, oneshot::Sender<Outcome>>,
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
            results: DashMap::new(),
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
        let request_id = self.new_request_id()?;
        let started = Instant::now();
        let outcome = self.send_unserialised(&request_id, device, body, timeout).await?;
        self.metrics.commands.with_label_values(&[outcome.label()]).inc();
        self.metrics.command_duration.with_label_values(&[outcome.label()]).observe(started.elapsed().as_secs_f64());
        Ok((request_id, outcome))
    }

    /// Sends a generic command to a vehicle (`down/command`) and waits, at most `timeout`, for
    /// its delivery (PUBACK) and then for the vehicle's own result (`up/command_result`, matched
    /// by `command.request_id`), which reaches this instance through the reply stream whichever
    /// instance consumed it ([`forward_vehicle_result`]).
    ///
    /// # Errors
    /// Only Redis errors.
    pub async fn send_vehicle_command(
        &self,
        vin: &Vin,
        command: &VehicleCommand,
        timeout: Duration,
    ) -> Result<VehicleCommandEnd, StoreError> {
        let payload = serde_json::to_vec(command).map_err(|e| StoreError::invalid("command", e.to_string()))?;
        let request_id = self.new_request_id()?;
        let started = Instant::now();
        let (tx, mut result) = oneshot::channel();
        self.results.insert(request_id.clone(), tx);
        let route = self.keys.vehicle_command(vin, &command.request_id);
        let mut con = self.redis.clone();
        // Kept a little past the deadline, for a result on its way when the wait ends.
        let ttl_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX).saturating_add(RESULT_SLACK_MS);
        let routed: redis::RedisResult<()> = redis::cmd("SET")
            .arg(&route)
            .arg(format!("{}\n{request_id}", self.reply_stream()))
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut con)
            .await;
        if let Err(e) = routed {
            self.results.remove(&request_id);
            return Err(e.into());
        }
        let body = CommandBody::Vehicle { kind: DownlinkKind::Command, payload: payload.into() };
        let sent = self.send_unserialised(&request_id, &DeviceKey::Vehicle(vin.clone()), body, timeout).await;
        let end = match sent {
            // Delivered: the vehicle's result may still come, until the deadline.
            Ok(Outcome::Delivered) => {
                let left = timeout.saturating_sub(started.elapsed()) + Duration::from_millis(RESULT_SLACK_MS);
                let outcome = match tokio::time::timeout(left, &mut result).await {
                    Ok(Ok(outcome)) => outcome,
                    Ok(Err(_)) | Err(_) => Outcome::TimedOut,
                };
                Ok(VehicleCommandEnd { outcome, delivered: true })
            }
            // The result overtook the delivery's reply, or came before a late timeout.
            Ok(other) => Ok(match result.try_recv() {
                Ok(outcome) => VehicleCommandEnd { outcome, delivered: true },
                Err(_) => VehicleCommandEnd { outcome: other, delivered: false },
            }),
            Err(e) => Err(e),
        };
        self.results.remove(&request_id);
        let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(&route).query_async(&mut con).await;
        if let Ok(end) = &end {
            let label = end.outcome.label();
            self.metrics.commands.with_label_values(&[label]).inc();
            self.metrics.command_duration.with_label_values(&[label]).observe(started.elapsed().as_secs_f64());
        }
        end
    }

    fn new_request_id(&self) -> Result<String, StoreError> {
        let mut id = [0u8; 12];
        getrandom::fill(&mut id).map_err(|e| StoreError::invalid("random", e.to_string()))?;
        Ok(format!("{}-{}", self.instance, hex::encode(id)))
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
                        let waiters =
                            if matches!(reply.outcome, Outcome::Vehicle(_)) { &self.results } else { &self.waiting };
                        if let Some((_, waiter)) = waiters.remove(&reply.request_id) {
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

/// How long a vehicle's result may trail its command's deadline and still be awaited.
const RESULT_SLACK_MS: u64 = 1000;

/// Approximate length cap of a reply stream, as the gateways keep it (`commands.reply_maxlen`).
const REPLY_STREAM_MAXLEN: u64 = 10_000;

/// How a generic command to a vehicle ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VehicleCommandEnd {
    /// The vehicle's result ([`Outcome::Vehicle`]), or why there is none.
    pub outcome: Outcome,
    /// Whether the vehicle acknowledged the command (PUBACK), result or not.
    pub delivered: bool,
}

/// Hands a vehicle's `command_result` to the instance that sent the command: the route the
/// sender left under the command's `request_id` names its reply stream, and is taken in the
/// same step (`GETDEL`), so a result repeated, late (past the deadline and its slack) or for a
/// command nobody sent goes nowhere. Returns whether it was handed on.
///
/// # Errors
/// Redis errors: the uplink is applied again.
pub async fn forward_vehicle_result(
    redis: &RedisConn,
    keys: &Keys,
    vin: &Vin,
    result: VehicleCommandResult,
) -> Result<bool, StoreError> {
    let mut con = redis.clone();
    let route: Option<String> =
        redis::cmd("GETDEL").arg(keys.vehicle_command(vin, &result.request_id)).query_async(&mut con).await?;
    let Some((reply_to, request_id)) = route.as_deref().and_then(|r| r.split_once('\n')) else { return Ok(false) };
    let reply = CommandReply {
        request_id: request_id.to_owned(),
        device: DeviceKey::Vehicle(vin.clone()),
        node: String::new(),
        outcome: Outcome::Vehicle(result),
    };
    let () = redis::cmd("XADD")
        .arg(reply_to)
        .arg("MAXLEN")
        .arg("~")
        .arg(REPLY_STREAM_MAXLEN)
        .arg("*")
        .arg(reply.to_fields())
        .query_async(&mut con)
        .await?;
    Ok(true)
}

fn door_of(action: &CommandAction) -> Option<u8> {
    match action {
        CommandAction::OpenDoor { door_id, .. }
        | CommandAction::QueryDoor { door_id }
        | CommandAction::Tare { door_id, .. } => Some(*door_id),
        CommandAction::Other { .. } => None,
    }
}
