//! What every session of a node shares: configuration, metrics, the registry, credentials,
//! the upstream and reply writers, and the drain signal.

use std::sync::Arc;

use protocol::bus::{CommandBody, CommandReply, CommandRequest, DeviceKey, Keys, Outcome};
use redis::RedisResult;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::config::Config;
use crate::credentials::Credentials;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::stream_writer::{Entry, StreamWriter};
use crate::upstream::Upstream;
use redis_conn::RedisConn;

/// Shared state of one gateway node.
#[derive(Debug)]
pub struct Ctx {
    /// The validated configuration.
    pub config: Config,
    /// Redis key layout.
    pub keys: Keys,
    /// Metrics.
    pub metrics: Metrics,
    /// Local sessions and the connection map.
    pub registry: Arc<Registry>,
    /// Credential cache.
    pub credentials: Credentials,
    /// Device traffic to the device service.
    pub upstream: Arc<Upstream>,
    /// Command replies.
    pub replies: StreamWriter,
    /// For the few direct Redis operations sessions make (kicks, MQTT session state).
    pub redis: RedisConn,
    /// Cancelled when the node starts draining: sessions move their devices away.
    pub drain: CancellationToken,
}

impl Ctx {
    /// This node's id.
    pub fn node(&self) -> &str {
        self.registry.node()
    }

    /// Sends a command reply to `reply_to` (no-op when empty) and counts the outcome.
    pub fn reply(
        &self,
        protocol: &'static str,
        request_id: &str,
        reply_to: &str,
        device: &DeviceKey,
        outcome: Outcome,
    ) {
        self.metrics.commands.with_label_values(&[protocol, outcome.label()]).inc();
        if reply_to.is_empty() {
            return;
        }
        let reply = CommandReply {
            request_id: request_id.to_owned(),
            device: device.clone(),
            node: self.node().to_owned(),
            outcome,
        };
        let entry = Entry { key: reply_to.to_owned(), fields: reply.to_fields(), label: reply.outcome.label() };
        if self.replies.offer(entry).is_err() {
            tracing::warn!(%device, request_id, "reply buffer full; reply dropped");
        }
    }

    /// Tells `node` to end `device`'s session there if it is older than `epoch` (the device
    /// logged in here).
    ///
    /// # Errors
    /// Any Redis error.
    pub async fn kick(&self, node: &str, device: &DeviceKey, epoch: u64) -> RedisResult<()> {
        let request = CommandRequest {
            request_id: format!("kick-{}-{epoch}", self.node()),
            device: device.clone(),
            deadline_ms: now_ms() + 60_000,
            reply_to: String::new(),
            body: CommandBody::Kick { epoch },
        };
        let Ok(fields) = request.to_fields() else { return Ok(()) };
        let mut con = self.redis.clone();
        redis::cmd("XADD")
            .arg(self.keys.commands(node))
            .arg("MAXLEN")
            .arg("~")
            .arg(protocol::bus::COMMAND_STREAM_MAXLEN)
            .arg("*")
            .arg(fields)
            .query_async::<()>(&mut con)
            .await
            .inspect_err(|_| self.metrics.redis_errors.with_label_values(&["kick"]).inc())
    }
}
