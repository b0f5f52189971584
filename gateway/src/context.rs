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
use crate::registry::{ClaimRefusal, LocalInsert, LoginFacts, Registry};
use crate::session::{EndReason, SessionHandle};
use crate::stream_writer::{Entry, StreamWriter};
use crate::upstream::Upstream;
use redis_conn::RedisConn;

/// Why a logged-in device could not get a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionRefused {
    /// The connection map could not be written (Redis down).
    Unavailable,
    /// A newer login of the same device won the race on this node; this one yields.
    Superseded,
    /// The map refused the login: a replay, a login-version downgrade, or a flapping device.
    Refused(ClaimRefusal),
}

impl SessionRefused {
    /// The `result` label of `gateway_logins_total`.
    pub fn label(self) -> &'static str {
        match self {
            SessionRefused::Unavailable => "unavailable",
            SessionRefused::Superseded => "superseded",
            SessionRefused::Refused(ClaimRefusal::Replayed) => "replayed",
            SessionRefused::Refused(ClaimRefusal::Downgrade) => "login_version",
            SessionRefused::Refused(ClaimRefusal::Flapping { .. }) => "flapping",
        }
    }
}

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
    /// For the few direct Redis operations sessions make (kicks, MQTT session state); calls
    /// made by many sessions at once leave together (`RedisConn::coalesced`).
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
        let entry =
            Entry { key: Arc::from(reply_to), fields: reply.to_fields(), label: reply.outcome.label(), receipt: None };
        if self.replies.offer(entry).is_err() {
            tracing::warn!(%device, request_id, "reply buffer full; reply dropped");
        }
    }

    /// Opens an authenticated device's session, the same for every protocol: admits the login
    /// and claims the device in the connection map (a new epoch; `facts` are checked there
    /// against replays, downgrades and flapping), puts the session in the local table (ending
    /// an older local one), and tells the node that held it before, if another, to end its
    /// session. Returns the handle and the epoch.
    ///
    /// # Errors
    /// [`SessionRefused`]; the caller answers with its protocol's refusal.
    pub async fn open_session(
        &self,
        protocol: &'static str,
        device: &DeviceKey,
        queue_len: usize,
        facts: LoginFacts,
    ) -> Result<(Arc<SessionHandle>, u64), SessionRefused> {
        let session = self.registry.new_session();
        let claim = self
            .registry
            .claim(device, session, facts, &self.config.flap_policy())
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "failed to claim the device in the connection map");
                SessionRefused::Unavailable
            })?
            .map_err(|refusal| {
                if let ClaimRefusal::Flapping { started: true, retry_after } = refusal {
                    self.metrics.flapping_cooldowns.with_label_values(&[protocol]).inc();
                    tracing::warn!(
                        cooldown_s = retry_after.as_secs(),
                        "device flapping; logins refused for a cool-down"
                    );
                }
                SessionRefused::Refused(refusal)
            })?;
        let handle = Arc::new(SessionHandle::new(device.clone(), claim.epoch, session, queue_len));
        match self.registry.insert_local(Arc::clone(&handle)) {
            LocalInsert::Fresh => {}
            LocalInsert::Replaced(old) => {
                self.metrics.takeovers.with_label_values(&[protocol, "local"]).inc();
                old.end(EndReason::TakenOver);
            }
            LocalInsert::Stale => return Err(SessionRefused::Superseded),
        }
        if let Some(previous) = claim.previous_node.as_deref().filter(|n| *n != self.node()) {
            self.metrics.takeovers.with_label_values(&[protocol, "remote"]).inc();
            if let Err(e) = self.kick(previous, device, claim.epoch).await {
                tracing::warn!(node = previous, error = %e, "failed to tell the previous node to end its session");
            }
        }
        Ok((handle, claim.epoch))
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
