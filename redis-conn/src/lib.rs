//! One Redis handle for a single server or a Redis Cluster, so the services write each
//! operation once, whichever a deployment runs.
//!
//! Both variants reconnect by themselves: a Redis restart costs failed operations (which the
//! callers retry or buffer), never a process restart. Connections are made lazily, so a service
//! starts and holds connections while Redis is still down.

pub mod coalesce;
pub mod run_marker;

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// Creates consumer group `group` on `stream` (and the stream, if missing), its cursor at
/// `start` (`0`: the stream's beginning, `$`: its end); a group that exists already is left as
/// it is.
///
/// # Errors
/// Any Redis error but "the group exists".
pub async fn ensure_group(redis: &mut RedisConn, stream: &str, group: &str, start: &str) -> RedisResult<()> {
    let created: RedisResult<()> =
        redis::cmd("XGROUP").arg("CREATE").arg(stream).arg(group).arg(start).arg("MKSTREAM").query_async(redis).await;
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// Reads up to `count` entries of `stream` as `consumer` of `group` (`XREADGROUP`), blocking
/// up to `block_ms`: from `cursor` (`>`: new ones; `0`: this consumer's unacknowledged ones).
/// Nothing within the block is an empty list.
///
/// # Errors
/// Any Redis error (`NOGROUP` when the stream or its group is gone).
pub async fn read_group(
    redis: &mut RedisConn,
    stream: &str,
    group: &str,
    consumer: &str,
    cursor: &str,
    count: usize,
    block_ms: u64,
) -> RedisResult<Vec<redis::streams::StreamId>> {
    let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("BLOCK")
        .arg(block_ms)
        .arg("STREAMS")
        .arg(stream)
        .arg(cursor)
        .query_async(redis)
        .await?;
    Ok(reply.map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect()).unwrap_or_default())
}

/// Takes over, for `consumer`, up to `count` entries of `group` that another consumer read and
/// has not acknowledged for `idle_ms` (`XAUTOCLAIM` from `start`): what a stopped or killed
/// instance of a reader had in hand. Returns the cursor to go on from (`0-0`: the scan is
/// complete) and the entries taken.
///
/// # Errors
/// Any Redis error.
pub async fn claim_idle(
    redis: &mut RedisConn,
    stream: &str,
    group: &str,
    consumer: &str,
    idle_ms: u64,
    start: &str,
    count: usize,
) -> RedisResult<(String, Vec<redis::streams::StreamId>)> {
    let reply: redis::streams::StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
        .arg(stream)
        .arg(group)
        .arg(consumer)
        .arg(idle_ms)
        .arg(start)
        .arg("COUNT")
        .arg(count)
        .query_async(redis)
        .await?;
    Ok((reply.next_stream_id, reply.claimed))
}

/// Removes from `group` the consumers other than `me` that hold no unacknowledged entry and
/// have not read for `idle_ms`: the names of instances that are gone (an instance's name is
/// new on every start), which Redis would otherwise keep forever. A live consumer removed by
/// mistake is recreated by its next read, having lost nothing. Returns how many were removed.
///
/// # Errors
/// Any Redis error.
pub async fn forget_departed(
    redis: &mut RedisConn,
    stream: &str,
    group: &str,
    me: &str,
    idle_ms: u64,
) -> RedisResult<usize> {
    let consumers: redis::streams::StreamInfoConsumersReply =
        redis::cmd("XINFO").arg("CONSUMERS").arg(stream).arg(group).query_async(redis).await?;
    let mut removed = 0;
    for c in consumers.consumers {
        if c.name != me && c.pending == 0 && u64::try_from(c.idle).unwrap_or(u64::MAX) >= idle_ms {
            let _: i64 =
                redis::cmd("XGROUP").arg("DELCONSUMER").arg(stream).arg(group).arg(&c.name).query_async(redis).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// How far `group` is behind on its stream: entries read and not acknowledged, and entries not
/// read yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// Entries delivered to a consumer and not acknowledged (`XINFO GROUPS` `pending`).
    pub pending: i64,
    /// Entries not delivered yet; `None` when Redis cannot tell (entries deleted past the
    /// group's cursor).
    pub unread: Option<i64>,
}

/// The backlog of `group` on `stream`; `None` when the stream or the group does not exist.
///
/// Redis's own `lag` counts from the group's `entries-read`, which a restart from the
/// append-only file can leave behind the truth (Redis 7.0 does not log it with every read): a
/// group that read everything was seen reporting a lag of 11 for ever. So a group whose cursor
/// is at the stream's last entry is taken as having read everything, whatever `lag` says.
///
/// # Errors
/// Any Redis error but a missing stream.
pub async fn group_backlog(redis: &mut RedisConn, stream: &str, group: &str) -> RedisResult<Option<Backlog>> {
    let groups: RedisResult<Vec<std::collections::HashMap<String, Value>>> =
        redis::cmd("XINFO").arg("GROUPS").arg(stream).query_async(redis).await;
    let groups = match groups {
        Err(e) if e.to_string().contains("no such key") => {
            return Ok(None);
        }
        other => other?,
    };
    let text = |v: Option<&Value>| match v {
        Some(Value::BulkString(b)) => String::from_utf8(b.clone()).ok(),
        Some(Value::SimpleString(s)) => Some(s.clone()),
        _ => None,
    };
    let int = |v: Option<&Value>| match v {
        Some(Value::Int(n)) => Some(*n),
        _ => None,
    };
    let Some(g) = groups.iter().find(|g| text(g.get("name")).as_deref() == Some(group)) else { return Ok(None) };
    let pending = int(g.get("pending")).unwrap_or(0);
    let cursor = text(g.get("last-delivered-id")).unwrap_or_default();
    let last: redis::streams::StreamRangeReply =
        redis::cmd("XREVRANGE").arg(stream).arg("+").arg("-").arg("COUNT").arg(1).query_async(redis).await?;
    let at_end = last.ids.first().is_none_or(|e| entry_id(&e.id) <= entry_id(&cursor));
    let unread = if at_end { Some(0) } else { int(g.get("lag")) };
    Ok(Some(Backlog { pending, unread }))
}

/// A stream entry id as numbers, for ordering (`0-0` for one that does not parse).
fn entry_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// A stream entry's fields as byte strings, as the bus readers take them (`protocol::bus`);
/// values of other types are left out.
pub fn bulk_fields(map: std::collections::HashMap<String, Value>) -> std::collections::HashMap<String, Vec<u8>> {
    map.into_iter()
        .filter_map(|(k, v)| match v {
            Value::BulkString(b) => Some((k, b)),
            Value::SimpleString(s) => Some((k, s.into_bytes())),
            _ => None,
        })
        .collect()
}

/// A multiplexed connection to Redis or Redis Cluster. Cheap to clone; clones share the socket.
#[derive(Clone)]
pub enum RedisConn {
    /// A single Redis server.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
    /// Either of the above, its calls from many tasks sent together ([`coalesce`]).
    Coalesced(Box<coalesce::Coalesced>),
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RedisConn::Single(_) => "RedisConn::Single",
            RedisConn::Cluster(_) => "RedisConn::Cluster",
            RedisConn::Coalesced(_) => "RedisConn::Coalesced",
        })
    }
}

/// Where Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server.
    Single(String),
    /// Cluster seed nodes.
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// From the configuration: cluster seeds win when given.
    pub fn from_config(url: &str, cluster_urls: &[String]) -> Self {
        if cluster_urls.is_empty() {
            RedisTarget::Single(url.to_owned())
        } else {
            RedisTarget::Cluster(cluster_urls.to_vec())
        }
    }
}

/// Per-operation response timeout: an operation against a dead Redis fails within this time
/// instead of hanging a session.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

impl RedisConn {
    /// Opens a handle. For a single server nothing is dialled yet; for a cluster the slot map
    /// is fetched now.
    ///
    /// `response_timeout` bounds each operation; use a longer one for blocking reads.
    ///
    /// # Errors
    /// An invalid URL, or (cluster) no seed reachable.
    pub async fn open(target: &RedisTarget, response_timeout: Option<Duration>) -> RedisResult<Self> {
        let response_timeout = response_timeout.unwrap_or(RESPONSE_TIMEOUT);
        match target {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str())?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(response_timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_secs(1));
                Ok(RedisConn::Single(ConnectionManager::new_lazy_with_config(client, config)?))
            }
            RedisTarget::Cluster(urls) => {
                let client = ClusterClient::builder(urls.clone())
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(response_timeout)
                    .retries(2)
                    .build()?;
                Ok(RedisConn::Cluster(client.get_async_connection().await?))
            }
        }
    }
}

impl RedisConn {
    /// This connection with its calls from many tasks sent together ([`coalesce`]): for
    /// many small independent calls, such as those of logins. Starts the funnel task on the
    /// current Tokio runtime.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    #[must_use]
    pub fn coalesced(&self) -> Self {
        RedisConn::Coalesced(Box::new(coalesce::Coalesced::new(self.clone())))
    }

    /// Whether this is a Redis Cluster connection.
    pub fn is_cluster(&self) -> bool {
        match self {
            RedisConn::Single(_) => false,
            RedisConn::Cluster(_) => true,
            RedisConn::Coalesced(c) => c.inner().is_cluster(),
        }
    }

    /// Runs `cmds`, whose keys may lie in several Redis Cluster slots, in one round trip: one
    /// pipeline on a single server; on a cluster, every command at once on the multiplexed
    /// connection (a cluster pipeline must keep to one slot). Not atomic on either; the replies
    /// come in the commands' order.
    ///
    /// # Errors
    /// The first Redis error; on a cluster the other commands may have been applied.
    pub async fn query_each(&mut self, cmds: Vec<Cmd>) -> RedisResult<Vec<Value>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            RedisConn::Single(c) => {
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                pipe.query_async(c).await
            }
            RedisConn::Cluster(c) => {
                let replies = futures_util::future::join_all(cmds.iter().map(|cmd| {
                    let mut c = c.clone();
                    async move { cmd.query_async::<Value>(&mut c).await }
                }))
                .await;
                replies.into_iter().collect()
            }
            // A batch already: no need to wait for others.
            RedisConn::Coalesced(c) => Box::pin(c.inner().clone().query_each(cmds)).await,
        }
    }

    /// [`query_each`](Self::query_each), each reply converted to `T`.
    ///
    /// # Errors
    /// The first Redis error, or a reply that is not a `T`.
    pub async fn query_each_as<T: redis::FromRedisValue>(&mut self, cmds: Vec<Cmd>) -> RedisResult<Vec<T>> {
        self.query_each(cmds)
            .await?
            .into_iter()
            .map(|v| redis::from_redis_value(v).map_err(redis::RedisError::from))
            .collect()
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
            RedisConn::Coalesced(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Coalesced(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
            RedisConn::Coalesced(c) => c.get_db(),
        }
    }
}
