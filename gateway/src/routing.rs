//! Downstream: this node's command stream (SPEC.md 3.3), read in consumer group `gateway`, each
//! command handed to the device's session or answered at once.
//!
//! A command never meets silence: a device not connected here gets `not_connected`, a full
//! device queue `busy`, a passed deadline `timed_out`. Entries are acknowledged after they were
//! handed over or answered; on start the node first re-reads what an earlier run read and never
//! acknowledged.

use std::sync::Arc;
use std::time::Duration;

use protocol::bus::{CommandBody, CommandRequest, DeviceKey, Outcome};
use redis::RedisResult;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::context::Ctx;
use crate::session::{Downlink, EndReason};
use redis_conn::RedisConn;

/// The consumer group every node reads its own command stream in.
pub const GROUP: &str = "gateway";

fn protocol_of(device: &DeviceKey) -> &'static str {
    match device {
        DeviceKey::Cabinet(_) => crate::cabinet::PROTOCOL,
        DeviceKey::Vehicle(_) => crate::mqtt::PROTOCOL,
    }
}

/// Hands one command to its session, or answers it.
pub fn dispatch(ctx: &Ctx, request: CommandRequest) {
    let protocol = protocol_of(&request.device);
    if let CommandBody::Kick { epoch } = request.body {
        if let Some(handle) = ctx.registry.get(&request.device)
            && handle.epoch < epoch
        {
            handle.end(EndReason::TakenOver);
        }
        return;
    }
    if request.deadline_ms <= now_ms() {
        ctx.reply(protocol, &request.request_id, &request.reply_to, &request.device, Outcome::TimedOut);
        return;
    }
    let Some(handle) = ctx.registry.get(&request.device) else {
        ctx.reply(protocol, &request.request_id, &request.reply_to, &request.device, Outcome::NotConnected);
        return;
    };
    let downlink = Downlink {
        request_id: request.request_id,
        reply_to: request.reply_to,
        deadline_ms: request.deadline_ms,
        received: Instant::now(),
        body: request.body,
    };
    if let Err((_, d)) = handle.push(downlink) {
        ctx.reply(protocol, &d.request_id, &d.reply_to, &request.device, Outcome::Busy);
    }
}

/// Reads this node's command stream until `stop`. `redis` must be a connection of its own:
/// the blocking read would hold up anything else multiplexed on it.
pub async fn run(ctx: Arc<Ctx>, mut redis: RedisConn, stop: CancellationToken) {
    let stream = ctx.keys.commands(ctx.node());
    let consumer = ctx.node().to_owned();
    let block_ms = ctx.config.commands.block_ms;
    // "0": first what an earlier run of this node read and did not acknowledge; then new.
    let mut cursor = "0";
    let mut group_ready = false;
    // At start the group begins at the stream's end; recreated after the stream vanished (Redis
    // lost it), at its beginning: a command added since was meant for this node's devices.
    let mut group_start = "$";
    let mut backoff = Duration::from_millis(100);
    while !stop.is_cancelled() {
        if !group_ready {
            match redis_conn::ensure_group(&mut redis, &stream, GROUP, group_start).await {
                Ok(()) => group_ready = true,
                Err(e) => {
                    ctx.metrics.redis_errors.with_label_values(&["commands"]).inc();
                    tracing::warn!(error = %e, "failed to create the command consumer group");
                    wait(&stop, &mut backoff).await;
                    continue;
                }
            }
        }
        let read = redis_conn::read_group(&mut redis, &stream, GROUP, &consumer, cursor, 256, block_ms).await;
        let entries = match read {
            Ok(r) => r,
            Err(e) => {
                ctx.metrics.redis_errors.with_label_values(&["commands"]).inc();
                if e.code() == Some("NOGROUP") {
                    // The stream was deleted (by an operator, or Redis lost it): recreate the group.
                    group_ready = false;
                    group_start = "0";
                }
                // A read whose reply was lost (Redis died, the connection broke) may have handed
                // entries to this consumer: they wait in its pending list, read from "0".
                cursor = "0";
                tracing::warn!(error = %e, "failed to read the command stream");
                wait(&stop, &mut backoff).await;
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        if entries.is_empty() {
            cursor = ">";
            continue;
        }
        let mut ids = Vec::with_capacity(entries.len());
        for entry in entries {
            let fields = redis_conn::bulk_fields(entry.map);
            match CommandRequest::from_fields(&fields) {
                Ok(request) => dispatch(&ctx, request),
                Err(e) => {
                    ctx.metrics.commands.with_label_values(&["unknown", "invalid"]).inc();
                    tracing::warn!(id = %entry.id, error = %e, "invalid command entry");
                }
            }
            ids.push(entry.id);
        }
        // Acknowledged and deleted at once: this node is the stream's only reader, and a
        // delivered command (a downlink may be 128 KiB) must not stay in Redis until MAXLEN
        // pushes it out.
        let done: RedisResult<()> = redis::pipe()
            .cmd("XACK")
            .arg(&stream)
            .arg(GROUP)
            .arg(&ids)
            .ignore()
            .cmd("XDEL")
            .arg(&stream)
            .arg(&ids)
            .ignore()
            .query_async(&mut redis)
            .await;
        if let Err(e) = done {
            ctx.metrics.redis_errors.with_label_values(&["commands"]).inc();
            tracing::warn!(error = %e, "failed to acknowledge commands");
        }
    }
}

async fn wait(stop: &CancellationToken, backoff: &mut Duration) {
    tokio::select! {
        () = tokio::time::sleep(*backoff) => {}
        () = stop.cancelled() => {}
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
}
