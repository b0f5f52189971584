//! Credential changes reach every node at once: the device service appends each registration,
//! rotation, disable and enable to `P cred:changes` (SPEC.md 3.1), and every node reads the whole
//! stream (no consumer group: each node needs every entry). A change drops the device's cached
//! credentials, positive or negative, so the next login reads Redis; a rotation or a disable also
//! ends the device's live session on this node, so a revoked identity keeps no connection.
//!
//! The cache lifetimes stay as a backstop. A node that could not read the stream for a while
//! (Redis down, entries trimmed past what it had read) clears its whole cache when it can again,
//! since it cannot know what it missed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use protocol::bus::{CredentialChange, CredentialEntry};
use redis::streams::StreamReadReply;
use redis::{RedisResult, Value};
use tokio_util::sync::CancellationToken;

use crate::context::Ctx;
use crate::session::EndReason;
use redis_conn::RedisConn;

/// A stream entry id, compared numerically (`ms-seq`).
fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// Applies one change on this node.
pub fn apply(ctx: &Ctx, change: &CredentialChange) {
    ctx.credentials.forget(&change.device);
    ctx.metrics.credential_changes.with_label_values(&[change.kind.label()]).inc();
    if change.kind.revokes_sessions()
        && let Some(handle) = ctx.registry.get(&change.device)
    {
        tracing::info!(device = %change.device, change = change.kind.label(), "ending a revoked session");
        handle.end(EndReason::Revoked);
    }
}

/// The id of the newest entry, or `0-0` for an empty or missing stream.
async fn newest_id(redis: &mut RedisConn, key: &str) -> RedisResult<String> {
    let newest: Vec<(String, HashMap<String, Value>)> =
        redis::cmd("XREVRANGE").arg(key).arg("+").arg("-").arg("COUNT").arg(1).query_async(redis).await?;
    Ok(newest.into_iter().next().map_or_else(|| "0-0".to_owned(), |(id, _)| id))
}

/// `true` when entries after `last` may have been trimmed before this node read them.
async fn missed_entries(redis: &mut RedisConn, key: &str, last: &str) -> RedisResult<bool> {
    let oldest: Vec<(String, HashMap<String, Value>)> =
        redis::cmd("XRANGE").arg(key).arg("-").arg("+").arg("COUNT").arg(1).query_async(redis).await?;
    let Some((oldest, _)) = oldest.into_iter().next() else { return Ok(false) };
    Ok(parse_id(&oldest) > parse_id(last) && parse_id(last) != Some((0, 0)))
}

/// Reads the change stream until `stop`. `redis` must be a connection of its own: the blocking
/// read would hold up anything else multiplexed on it.
pub async fn run(ctx: Arc<Ctx>, mut redis: RedisConn, stop: CancellationToken) {
    let key = ctx.keys.credential_changes();
    let block_ms = ctx.config.commands.block_ms;
    let mut last: Option<String> = None;
    // Set after a failed read: whatever happened meanwhile is unknown.
    let mut resync = false;
    let mut backoff = Duration::from_millis(100);
    while !stop.is_cancelled() {
        let cursor = match &last {
            Some(id) => id.clone(),
            None => match newest_id(&mut redis, &key).await {
                Ok(id) => id,
                Err(e) => {
                    fail(&ctx, &stop, &mut backoff, &e).await;
                    continue;
                }
            },
        };
        if resync {
            if let Ok(true) = missed_entries(&mut redis, &key, &cursor).await {
                tracing::warn!("credential changes were missed; clearing the credential cache");
            }
            // Entries still in the stream are read below; the cache goes either way, since a
            // Redis that restarted may have lost both the stream and the credentials.
            ctx.credentials.clear();
            ctx.metrics.credential_changes.with_label_values(&["resync"]).inc();
            resync = false;
        }
        let read: RedisResult<Option<StreamReadReply>> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(256)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(&key)
            .arg(&cursor)
            .query_async(&mut redis)
            .await;
        let reply = match read {
            Ok(r) => r,
            Err(e) => {
                last = Some(cursor);
                resync = true;
                fail(&ctx, &stop, &mut backoff, &e).await;
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let mut newest = cursor;
        for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            let fields = redis_conn::bulk_fields(entry.map);
            match CredentialEntry::from_fields(&fields) {
                Ok(CredentialEntry::Change(change)) => apply(&ctx, &change),
                Ok(CredentialEntry::Rewritten) => {
                    // The device service wrote every credential again (Redis had lost them):
                    // whatever this node cached, refusals included, may be stale.
                    ctx.credentials.clear();
                    ctx.metrics.credential_changes.with_label_values(&["rewritten"]).inc();
                }
                Err(e) => tracing::warn!(id = %entry.id, error = %e, "invalid credential change entry"),
            }
            newest = entry.id;
        }
        last = Some(newest);
    }
}

async fn fail(ctx: &Ctx, stop: &CancellationToken, backoff: &mut Duration, e: &redis::RedisError) {
    ctx.metrics.redis_errors.with_label_values(&["credential_changes"]).inc();
    tracing::warn!(error = %e, "failed to read the credential change stream");
    tokio::select! {
        () = tokio::time::sleep(*backoff) => {}
        () = stop.cancelled() => {}
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::bus::CredentialChangeKind;

    #[test]
    fn ids_compare_numerically() {
        assert!(parse_id("10-0") > parse_id("9-5"));
        assert!(parse_id("10-10") > parse_id("10-9"));
        assert_eq!(parse_id("x"), None);
        assert!(CredentialChangeKind::Rotated.revokes_sessions());
        assert!(!CredentialChangeKind::Registered.revokes_sessions());
    }
}
