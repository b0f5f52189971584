//! A Redis that lost its data heals at once (SPEC.md 3.1, `P bus:run`). The device service owns
//! two things in Redis that nothing else would write back: the credentials mirror the gateways
//! verify logins against, and the heartbeat deadlines of connected cabinets. Every second each
//! instance checks the run marker and the server's `run_id`; when the marker vanished or
//! changed, or Redis restarted (a host crash loses its last second; writes refused while it
//! was down were never made), the instance writes every
//! credential again and announces it on `P cred:changes` (gateways then drop their caches,
//! refusals included), and gives every connected cabinet that lost its heartbeat deadline a new
//! one. A deadline that survived is kept: moving every deadline at each restart would put off the judgement of a cabinet that went silent just before, and so every
//! order and door waiting on it (the money model found that). Gateways write back
//! the connection map themselves; the upstream streams' consumer groups are recreated by their
//! readers.

use std::sync::Arc;
use std::time::Duration;

use protocol::bus::CredentialEntry;
use redis_conn::run_marker::RunMarker;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::clock::now_ms;
use crate::error::StoreError;
use crate::offline::Detector;
use crate::registry;

/// How often the marker is checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Watches the run marker until `stop`.
pub async fn run(app: Arc<App>, detector: Arc<Detector>, stop: CancellationToken) {
    let marker = RunMarker::new(app.keys.bus_run(), format!("{}/{}", app.config.instance_id, now_ms()));
    let on_loss = || {
        app.metrics.redis_data_losses.inc();
        tracing::warn!("Redis lost its data or restarted: writing the credentials and heartbeat deadlines back");
    };
    let write_back = || async {
        rebuild(&app, &detector)
            .await
            .map_err(|e| tracing::warn!(error = %e, "failed to rebuild what Redis lost; retrying"))
            .is_ok()
    };
    marker.watch(app.redis.clone(), CHECK_EVERY, stop.cancelled(), on_loss, write_back).await;
}

async fn rebuild(app: &App, detector: &Detector) -> Result<(), StoreError> {
    let credentials = registry::mirror(app, None).await?;
    let () = redis::cmd("XADD")
        .arg(app.keys.credential_changes())
        .arg("MAXLEN")
        .arg("~")
        .arg(protocol::bus::CREDENTIAL_CHANGES_MAXLEN)
        .arg("*")
        .arg(CredentialEntry::rewritten_fields())
        .query_async(&mut app.redis.clone())
        .await?;
    let deadlines = detector.reseed().await?;
    tracing::info!(credentials, deadlines, "rebuilt what Redis lost");
    Ok(())
}
