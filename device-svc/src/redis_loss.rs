//! A Redis that lost its data heals at once (SPEC.md 3.1, `P bus:run`). The device service owns
//! two things in Redis that nothing else would write back: the credentials mirror the gateways
//! verify logins against, and the heartbeat deadlines of connected cabinets. Every second each
//! instance checks the run marker; when it vanished or changed, the instance writes every
//! credential again and announces it on `P cred:changes` (gateways then drop their caches,
//! refusals included), and gives every connected cabinet a deadline again. Gateways write back
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
    let mut marker = RunMarker::new(app.keys.bus_run(), format!("{}/{}", app.config.instance_id, now_ms()));
    let mut redis = app.redis.clone();
    let mut rebuilding = false;
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        match marker.lost_since_last_check(&mut redis).await {
            Ok(true) => {
                app.metrics.redis_data_losses.inc();
                tracing::warn!("Redis lost its data: writing the credentials and heartbeat deadlines back");
                rebuilding = true;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(error = %e, "failed to check the run marker");
                continue;
            }
        }
        if rebuilding {
            match rebuild(&app, &detector).await {
                Ok(()) => rebuilding = false,
                Err(e) => tracing::warn!(error = %e, "failed to rebuild what Redis lost; retrying"),
            }
        }
    }
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
