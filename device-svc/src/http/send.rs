//! `POST /v1/devices/{key}/commands`: an operator's command, through the same
//! [`Commander`](crate::commands::Commander) the purchase and vehicle flows use.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use bytes::Bytes;
use protocol::OrderId;
use protocol::bus::{CommandBody, DeviceKey, Outcome};
use protocol::cabinet::{CommandAction, CommandStatus, DoorStatus};
use protocol::mqtt::topic::{DownlinkKind, MAX_DOWNLINK_PAYLOAD};
use protocol::vehicle::{VehicleCommand, VehicleCommandStatus};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::error::ApiError;
use super::extract::{JsonBody, device_key};
use crate::app::App;
use crate::error::StoreError;

/// The longest deadline an operator may give.
const MAX_TIMEOUT_MS: u64 = 60_000;

/// What to do; `timeout_ms` defaults to `commands.default_timeout_ms`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub(super) enum CommandInput {
    /// Cabinets: unlock and open a door for an order.
    OpenDoor { door_id: u8, order_id: String, timeout_ms: Option<u64> },
    /// Cabinets: report a door's state.
    QueryDoor { door_id: u8, timeout_ms: Option<u64> },
    /// Cabinets: re-zero a lane's scale so that it reads `grams` (SPEC.md `TARE`).
    Tare { door_id: u8, lane_id: u8, grams: i32, timeout_ms: Option<u64> },
    /// Vehicles: publish a downlink at QoS 1 (answered on PUBACK).
    Downlink { kind: String, payload: serde_json::Value, timeout_ms: Option<u64> },
    /// Vehicles: a generic command (`down/command`), answered with the vehicle's own result.
    VehicleCommand {
        name: String,
        #[serde(default)]
        params: serde_json::Value,
        timeout_ms: Option<u64>,
    },
}

/// What is sent: a command through the command path, or a generic vehicle command, which
/// waits past its delivery for the vehicle's result.
enum Sending {
    Plain(CommandBody),
    Vehicle(VehicleCommand),
}

/// The device's answer as JSON.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct Answer {
    /// `answered`, `delivered`, `not_connected`, `timed_out`, `busy` or `invalid`.
    outcome: &'static str,
    /// For `answered`: the cabinet's or the vehicle's result.
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<ResultView>,
    /// For a generic vehicle command: whether the vehicle acknowledged it (PUBACK), so a
    /// `timed_out` tells a command never received from one received and not answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    delivered: Option<bool>,
    /// For `invalid`: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    /// Time from sending to the answer.
    elapsed_ms: u64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
enum ResultView {
    Cabinet(CabinetResult),
    Vehicle(VehicleResult),
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct VehicleResult {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

fn vehicle_status(s: VehicleCommandStatus) -> &'static str {
    match s {
        VehicleCommandStatus::Ok => "ok",
        VehicleCommandStatus::Failed => "failed",
        VehicleCommandStatus::Unsupported => "unsupported",
        VehicleCommandStatus::Expired => "expired",
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct CabinetResult {
    status: &'static str,
    door_id: u8,
    door_state: &'static str,
}

fn command_status(s: CommandStatus) -> &'static str {
    match s {
        CommandStatus::Ok => "ok",
        CommandStatus::Failed => "failed",
        CommandStatus::Busy => "busy",
        CommandStatus::Unsupported => "unsupported",
        CommandStatus::Expired => "expired",
        CommandStatus::InvalidDoor => "invalid_door",
    }
}

fn door_status(s: DoorStatus) -> &'static str {
    match s {
        DoorStatus::Closed => "closed",
        DoorStatus::Open => "open",
        DoorStatus::Unknown => "unknown",
    }
}

fn door(door_id: u8) -> Result<u8, ApiError> {
    if door_id == 0 { Err(ApiError::invalid("door_id", "1..=255")) } else { Ok(door_id) }
}

/// Checks the input against the device kind; returns what to send and the deadline.
fn body_of(app: &App, device: &DeviceKey, input: CommandInput) -> Result<(Sending, Duration), ApiError> {
    let timeout_of = |timeout_ms: Option<u64>| {
        let timeout_ms = timeout_ms.unwrap_or(app.config.commands.default_timeout_ms);
        if (1..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
            Ok(Duration::from_millis(timeout_ms))
        } else {
            Err(ApiError::invalid("timeout_ms", format!("1..={MAX_TIMEOUT_MS}")))
        }
    };
    if let (DeviceKey::Vehicle(_), CommandInput::VehicleCommand { name, params, timeout_ms }) = (device, &input) {
        if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ApiError::invalid("name", "1 to 64 visible ASCII characters"));
        }
        let timeout = timeout_of(*timeout_ms)?;
        let mut id = [0u8; 12];
        getrandom::fill(&mut id).map_err(|e| ApiError::invalid("random", e.to_string()))?;
        let command = VehicleCommand {
            request_id: format!("c-{}", hex::encode(id)),
            name: name.clone(),
            params: params.clone(),
            expires_at_ms: crate::clock::now_ms() + u64::try_from(timeout.as_millis()).unwrap_or(0),
        };
        if serde_json::to_vec(&command).map_or(usize::MAX, |p| p.len()) > MAX_DOWNLINK_PAYLOAD {
            return Err(ApiError::invalid("params", format!("the command exceeds {MAX_DOWNLINK_PAYLOAD} bytes")));
        }
        return Ok((Sending::Vehicle(command), timeout));
    }
    let (body, timeout_ms) = match (device, input) {
        (DeviceKey::Cabinet(_), CommandInput::OpenDoor { door_id, order_id, timeout_ms }) => {
            let order_id = OrderId::new(&order_id).map_err(|e| ApiError::invalid("order_id", e.to_string()))?;
            (CommandBody::Cabinet(CommandAction::OpenDoor { door_id: door(door_id)?, order_id }), timeout_ms)
        }
        (DeviceKey::Cabinet(_), CommandInput::QueryDoor { door_id, timeout_ms }) => {
            (CommandBody::Cabinet(CommandAction::QueryDoor { door_id: door(door_id)? }), timeout_ms)
        }
        (DeviceKey::Cabinet(_), CommandInput::Tare { door_id, lane_id, grams, timeout_ms }) => {
            if lane_id == 0 || !(0..=1_000_000).contains(&grams) {
                return Err(ApiError::invalid("lane_id", "lane_id 1..=255 and grams 0..=1000000"));
            }
            (CommandBody::Cabinet(CommandAction::Tare { door_id: door(door_id)?, lane_id, grams }), timeout_ms)
        }
        (DeviceKey::Vehicle(_), CommandInput::Downlink { kind, payload, timeout_ms }) => {
            let kind: DownlinkKind =
                kind.parse().map_err(|_| ApiError::invalid("kind", format!("unknown downlink {kind:?}")))?;
            if kind == DownlinkKind::Command {
                return Err(ApiError::invalid(
                    "kind",
                    "a generic command is the vehicle_command action (it waits for the result)",
                ));
            }
            let payload = serde_json::to_vec(&payload).map_err(|e| ApiError::invalid("payload", e.to_string()))?;
            if payload.len() > MAX_DOWNLINK_PAYLOAD {
                let max = MAX_DOWNLINK_PAYLOAD;
                return Err(ApiError::invalid("payload", format!("{} bytes; at most {max}", payload.len())));
            }
            (CommandBody::Vehicle { kind, payload: Bytes::from(payload) }, timeout_ms)
        }
        (DeviceKey::Cabinet(_), _) => {
            return Err(ApiError::invalid("action", "cabinets take open_door, query_door or tare"));
        }
        (DeviceKey::Vehicle(_), _) => {
            return Err(ApiError::invalid("action", "vehicles take downlink or vehicle_command"));
        }
    };
    Ok((Sending::Plain(body), timeout_of(timeout_ms)?))
}

/// Refuses a command to a device that is not registered (404) or to a door its cabinet does not
/// have (400), before anything is sent: only a registered target can be `not_connected`.
async fn check_target(app: &App, device: &DeviceKey, sending: &Sending) -> Result<(), ApiError> {
    let client = app.pg.get().await.map_err(StoreError::from)?;
    let key = device.to_string();
    let registered =
        client.query_opt("SELECT 1 FROM devices WHERE key = $1", &[&key]).await.map_err(StoreError::from)?;
    if registered.is_none() {
        return Err(StoreError::NotFound(format!("device {key}")).into());
    }
    let door_id = match sending {
        Sending::Plain(CommandBody::Cabinet(
            CommandAction::OpenDoor { door_id, .. }
            | CommandAction::QueryDoor { door_id }
            | CommandAction::Tare { door_id, .. },
        )) => *door_id,
        _ => return Ok(()),
    };
    let exists = client
        .query_opt("SELECT 1 FROM doors WHERE cabinet_id = $1 AND door_id = $2", &[&device.id(), &i16::from(door_id)])
        .await
        .map_err(StoreError::from)?;
    if exists.is_none() {
        return Err(ApiError::invalid("door_id", format!("cabinet {} has no door {door_id}", device.id())));
    }
    Ok(())
}

pub(super) async fn send(
    State(app): State<Arc<App>>,
    Path(key): Path<String>,
    JsonBody(input): JsonBody<CommandInput>,
) -> Result<Json<Answer>, ApiError> {
    Ok(Json(execute(&app, &key, input).await?))
}

/// Checks and sends `input` to device `key` and waits for its answer (the API's route and the
/// console's command form), its audit row written first under the current audit scope.
pub(super) async fn execute(app: &App, key: &str, input: CommandInput) -> Result<Answer, ApiError> {
    let device = device_key(key)?;
    let (sending, timeout) = body_of(app, &device, input)?;
    check_target(app, &device, &sending).await?;
    // A command changes a device, not a row: its audit row is written before it is sent.
    crate::auth::audit::record_now(app).await?;
    let started = Instant::now();
    let (outcome, delivered) = match (sending, &device) {
        (Sending::Vehicle(command), DeviceKey::Vehicle(vin)) => {
            let end = app.commander.send_vehicle_command(vin, &command, timeout).await?;
            (end.outcome, Some(end.delivered))
        }
        (Sending::Plain(body), _) => (app.commander.send(&device, body, timeout).await?, None),
        (Sending::Vehicle(_), DeviceKey::Cabinet(_)) => return Err(ApiError::invalid("action", "not for cabinets")),
    };
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let (result, detail) = match &outcome {
        Outcome::Cabinet(r) => (
            Some(ResultView::Cabinet(CabinetResult {
                status: command_status(r.status),
                door_id: r.door_id,
                door_state: door_status(r.door_state),
            })),
            None,
        ),
        Outcome::Vehicle(r) => (
            Some(ResultView::Vehicle(VehicleResult { status: vehicle_status(r.status), detail: r.detail.clone() })),
            None,
        ),
        Outcome::Invalid(why) => (None, Some(why.clone())),
        _ => (None, None),
    };
    Ok(Answer { outcome: outcome.label(), result, delivered, detail, elapsed_ms })
}
