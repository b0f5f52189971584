//! Vehicle flows over MQTT: activation by QR code ([`activation`]) and OTA campaigns
//! ([`ota`]), over the vehicle registry ([`profile`]). Vehicles' uplinks arrive through the gateways' upstream streams
//! ([`on_uplink`]); downlinks go through the command path ([`downlink`]). What must reach a
//! vehicle that is offline (an activation code, upgrade and cancel notices) is kept and sent
//! when it next connects ([`on_connected`]).

pub mod activation;
pub mod downlink;
pub mod ota;
pub mod profile;

use std::sync::Arc;

use protocol::Vin;
use protocol::mqtt::topic::UplinkKind;
use protocol::vehicle::VehicleCommandResult;

use crate::app::App;
use crate::commands;
use crate::error::StoreError;

/// Whether an uplink is an OTA report (the consumer batches those: [`ota::reports::apply_batch`]).
pub fn is_ota_report(kind: UplinkKind) -> bool {
    matches!(kind, UplinkKind::OtaDownloadProgress | UplinkKind::OtaUpgradeProgress | UplinkKind::OtaStatus)
}

/// Applies one vehicle uplink; `entry` is its upstream entry (`stream/id`, unique). Returns
/// the result label for `devsvc_stream_entries_total`.
///
/// # Errors
/// Storage errors: the entry is applied again (every effect is idempotent).
pub async fn on_uplink(
    app: &Arc<App>,
    entry: &str,
    vin: &Vin,
    kind: UplinkKind,
    payload: &[u8],
) -> Result<&'static str, StoreError> {
    match kind {
        UplinkKind::QrRequest => match serde_json::from_slice(payload) {
            Ok(request) => activation::on_qr_request(app, vin, request).await,
            Err(_) => Ok(invalid(app, "qr_request")),
        },
        UplinkKind::ActivationReport => match serde_json::from_slice(payload) {
            Ok(report) => activation::on_report(app, vin, report).await,
            Err(_) => Ok(invalid(app, "report")),
        },
        UplinkKind::OtaDownloadProgress | UplinkKind::OtaUpgradeProgress | UplinkKind::OtaStatus => {
            let uplink = ota::reports::Uplink {
                entry: entry.to_owned(),
                vin: vin.clone(),
                kind,
                payload: bytes::Bytes::copy_from_slice(payload),
            };
            Ok(ota::reports::apply_batch(app, std::slice::from_ref(&uplink))
                .await?
                .first()
                .copied()
                .unwrap_or("invalid"))
        }
        // Handed to the instance waiting for it; one nobody waits for (late, repeated, or for a
        // command never sent) is counted `ignored`.
        UplinkKind::CommandResult => match serde_json::from_slice::<VehicleCommandResult>(payload) {
            Ok(result)
                if valid_request_id(&result.request_id) && result.detail.as_ref().is_none_or(|d| d.len() <= 512) =>
            {
                let forwarded = commands::forward_vehicle_result(&app.redis, &app.keys, vin, result).await?;
                Ok(if forwarded { "applied" } else { "ignored" })
            }
            _ => Ok("invalid"),
        },
    }
}

/// A command's `request_id` as the device service issues them (SPEC.md 2.3): 1 to 64 visible
/// ASCII characters, so a vehicle cannot make a key of any size or shape.
fn valid_request_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

fn invalid(app: &App, step: &str) -> &'static str {
    app.metrics.activation_steps.with_label_values(&[step, "invalid"]).inc();
    "invalid"
}

/// Vehicles connected: sends each what waited for it.
///
/// # Errors
/// Storage errors.
pub async fn on_connected(app: &Arc<App>, vins: &[&Vin]) -> Result<(), StoreError> {
    if vins.is_empty() {
        return Ok(());
    }
    activation::on_connected(app, vins).await?;
    ota::push::on_connected(app, vins).await
}
