//! JSON payloads on the vehicle topics (SPEC.md, "Vehicle payloads").
//!
//! JSON rather than a binary layout: vehicle messages are few and small (an activation, a
//! progress report every 5 to 10 s), they change with the OTA and activation products, and the
//! vehicle's head unit and every MQTT tool can produce and read them. Unknown fields are
//! ignored, so either side may add fields without breaking the other. Times are milliseconds
//! since the Unix epoch (UTC).

use serde::{Deserialize, Serialize};

/// Where in the car the activating owner sits (cached under the QR id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Seat {
    /// Driver's seat.
    Driver,
    /// Front passenger's seat.
    Passenger,
}

/// `up/qr_request`: the car asks for a QR id to display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QrRequest {
    /// Chosen by the car; echoed in [`QrIssued`] so the car can match the answer.
    pub request_id: String,
    /// Which screen/seat the code is shown for.
    pub seat: Seat,
}

/// `down/qr_id`: a fresh QR id (32 lowercase hex characters, a UUID without dashes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QrIssued {
    /// Echo of [`QrRequest::request_id`].
    pub request_id: String,
    /// The id to encode in the QR code.
    pub qr_id: String,
    /// After this the id is refused; the car asks for a new one.
    pub expires_at_ms: u64,
}

/// `down/activation_code`: sent after the owner confirmed in the app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivationCode {
    /// The QR id the owner scanned.
    pub qr_id: String,
    /// The activation security code the car must report back.
    pub code: String,
    /// After this the code is refused.
    pub expires_at_ms: u64,
}

/// `up/activation_report`: the car activated locally and proves it with the code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivationReport {
    /// The QR id of the activation.
    pub qr_id: String,
    /// The code from [`ActivationCode`].
    pub code: String,
}

/// The cloud's verdict on an activation report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivationOutcome {
    /// The car is now active (or already was, through this same activation).
    Activated,
    /// Refused; `reason` says why. The car shows a new QR code.
    Rejected,
}

/// `down/activation_result`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivationResult {
    /// The QR id of the activation.
    pub qr_id: String,
    /// Verdict.
    pub outcome: ActivationOutcome,
    /// For a refusal: `wrong_code`, `expired`, `cancelled`, `unknown_qr_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// How an OTA upgrade is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpgradeType {
    /// Installed without asking, when the car is parked.
    Silent,
    /// The driver is asked to accept.
    Prompted,
    /// Installed at the next safe opportunity, no choice.
    Forced,
}

/// The package an upgrade installs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtaPackage {
    /// Package id.
    pub id: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// SHA-256 of the package, lowercase hex.
    pub sha256: String,
    /// Signature over the package, base64, checked by the car before installing.
    pub signature: String,
    /// Where to download it.
    pub url: String,
    /// `full` or `delta` (a package the platform stores; absent for an external one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// For a delta: the version it applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_version: Option<String>,
    /// The Ed25519 public key `signature` checks with, base64 (a package the platform stores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
}

/// `down/ota_notify`: an upgrade is waiting for this car.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtaNotify {
    /// The OTA task.
    pub task_id: String,
    /// Target version.
    pub version: String,
    /// How to apply it.
    pub upgrade_type: UpgradeType,
    /// What to download.
    pub package: OtaPackage,
    /// Which attempt this is: 1, then one more for each re-push after a failure. Reports echo
    /// it; a vehicle acts on a (`task_id`, `attempt`) once.
    #[serde(default = "first_attempt")]
    pub attempt: u32,
}

fn first_attempt() -> u32 {
    1
}

/// `down/ota_cancel`: the task was cancelled; a car that has not started must not start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtaCancel {
    /// The OTA task.
    pub task_id: String,
}

/// `up/ota_download_progress`, about every 10 s while downloading.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtaDownloadProgress {
    /// The OTA task.
    pub task_id: String,
    /// 0..=100.
    pub percent: u8,
    /// Bytes downloaded so far.
    pub bytes_done: u64,
    /// The notice's `attempt` (absent: the current one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// When measured, car clock.
    pub ts_ms: u64,
}

/// `up/ota_upgrade_progress`, about every 5 s while installing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtaUpgradeProgress {
    /// The OTA task.
    pub task_id: String,
    /// Overall progress, 0..=100.
    pub percent: u8,
    /// The ECU being flashed.
    pub ecu: String,
    /// That ECU's progress, 0..=100.
    pub ecu_percent: u8,
    /// The notice's `attempt` (absent: the current one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// When measured, car clock.
    pub ts_ms: u64,
}

/// The states of an upgrade on a car, in their normal order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OtaStatus {
    /// Notified, not started.
    Waiting,
    /// Downloading the package.
    Downloading,
    /// Package downloaded.
    Downloaded,
    /// Checking hash and signature.
    Verifying,
    /// Flashing ECUs.
    Upgrading,
    /// Installed; `version` must be the target.
    Success,
    /// Failed; `ecu` and `error` say where and why.
    Failed,
    /// Failed and restored the previous version.
    RolledBack,
}

/// `up/ota_status`: a status transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtaStatusReport {
    /// The OTA task.
    pub task_id: String,
    /// New status.
    pub status: OtaStatus,
    /// The version now installed (required with `success`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The failing ECU (with `failed` / `rolled_back`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecu: Option<String>,
    /// The error (with `failed` / `rolled_back`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The notice's `attempt` (absent: the current one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// When it happened, car clock.
    pub ts_ms: u64,
}

/// `down/command`: a generic command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VehicleCommand {
    /// Echoed in the result.
    pub request_id: String,
    /// What to do (`locate`, `lock`, ...).
    pub name: String,
    /// Command parameters.
    #[serde(default)]
    pub params: serde_json::Value,
    /// After this the car must not act and answers `expired`.
    pub expires_at_ms: u64,
}

/// Outcome of a generic command on the car.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VehicleCommandStatus {
    /// Done.
    Ok,
    /// Tried and failed.
    Failed,
    /// Unknown command name.
    Unsupported,
    /// Arrived after `expires_at_ms`.
    Expired,
}

/// `up/command_result`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VehicleCommandResult {
    /// The command's `request_id`.
    pub request_id: String,
    /// Outcome.
    pub status: VehicleCommandStatus,
    /// Free-form detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}
