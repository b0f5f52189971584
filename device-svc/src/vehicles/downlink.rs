//! Downlinks to vehicles: JSON on `vehicles/{VIN}/down/{kind}` (SPEC.md 2.2), sent through the
//! [`Commander`](crate::commands::Commander) like any command, so the answer says whether the
//! vehicle acknowledged it (QoS 1 PUBACK), is not connected, or did not answer in time.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use protocol::Vin;
use protocol::bus::{CommandBody, DeviceKey, Outcome};
use protocol::mqtt::topic::DownlinkKind;
use serde::Serialize;

use crate::app::App;
use crate::error::StoreError;

/// Sends `payload` to `vin` on the `kind` topic; returns the message (request) id and the
/// outcome. Counted by kind and outcome.
///
/// # Errors
/// Redis errors; every vehicle-side outcome is an `Ok`.
pub async fn send<T: Serialize>(
    app: &App,
    vin: &Vin,
    kind: DownlinkKind,
    payload: &T,
) -> Result<(String, Outcome), StoreError> {
    let json = serde_json::to_vec(payload).map_err(|e| StoreError::invalid("payload", e.to_string()))?;
    let body = CommandBody::Vehicle { kind, payload: Bytes::from(json) };
    let timeout = Duration::from_millis(app.config.vehicles.downlink_timeout_ms);
    let (id, outcome) = app.commander.send_identified(&DeviceKey::Vehicle(vin.clone()), body, timeout).await?;
    app.metrics.vehicle_downlinks.with_label_values(&[kind.as_str(), outcome.label()]).inc();
    Ok((id, outcome))
}

/// Sends in a task of its own, so that the caller (a stream consumer) never waits for a
/// vehicle. A vehicle that is connected but has not subscribed yet (it just connected), or did
/// not acknowledge, is tried again up to `attempts` times; one that is not connected is left:
/// every flow that needs it resends when the vehicle next connects or asks again.
pub fn send_in_background<T: Serialize + Send + Sync + 'static>(
    app: &Arc<App>,
    vin: Vin,
    kind: DownlinkKind,
    payload: T,
    attempts: u32,
) {
    let app = Arc::clone(app);
    tokio::spawn(async move {
        let pause = Duration::from_millis(app.config.vehicles.connect_send_retry_ms);
        for attempt in 1..=attempts {
            match send(&app, &vin, kind, &payload).await {
                Ok((_, Outcome::Delivered | Outcome::NotConnected)) => return,
                Ok((_, outcome)) => {
                    tracing::debug!(%vin, kind = kind.as_str(), attempt, outcome = outcome.label(), "downlink not delivered");
                }
                Err(e) => tracing::warn!(%vin, kind = kind.as_str(), error = %e, "failed to send a downlink"),
            }
            if attempt < attempts {
                tokio::time::sleep(pause).await;
            }
        }
    });
}
