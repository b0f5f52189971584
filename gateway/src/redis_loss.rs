//! A Redis that lost its data heals at once (SPEC.md 3.1, `P bus:run`). Connections survive a
//! Redis restart, but without persistence (or after a failover to a replica that had not caught
//! up) the connection map, the node list and the credentials mirror are gone: commands would
//! find no device, and logins no credentials. Every second this node checks the run marker and
//! the server's `run_id`; when the marker vanished or changed, or Redis restarted (a host
//! crash under `appendfsync everysec` loses the last second; writes refused while it was down
//! were never made), the node writes back everything it owns (its node entries and every live
//! session's map entry, epochs kept) and drops its credential cache. The device
//! service, watching the same marker, writes the credentials back and announces it.

use std::sync::Arc;
use std::time::Duration;

use redis_conn::run_marker::RunMarker;
use tokio_util::sync::CancellationToken;

use crate::context::Ctx;

/// How often the marker is checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Watches the run marker until `stop`.
pub async fn run(ctx: Arc<Ctx>, stop: CancellationToken) {
    let marker = RunMarker::new(ctx.keys.bus_run(), ctx.registry.incarnation_id());
    let on_loss = || {
        ctx.metrics.redis_data_losses.inc();
        tracing::warn!(
            "Redis lost its data or restarted: writing back this node's sessions and dropping cached credentials"
        );
    };
    let rebuild = || async {
        ctx.credentials.clear();
        match ctx.registry.restore_all().await {
            Ok(n) => {
                tracing::info!(sessions = n, "connection map rebuilt");
                true
            }
            Err(e) => {
                ctx.metrics.redis_errors.with_label_values(&["restore"]).inc();
                tracing::warn!(error = %e, "failed to rebuild the connection map; retrying");
                false
            }
        }
    };
    marker.watch(ctx.redis.clone(), CHECK_EVERY, stop.cancelled(), on_loss, rebuild).await;
}
