//! The example frames of SPEC.md section 1.11, built from their fields. Shared by
//! `tests/vectors.rs` (which checks them against the hex in SPEC.md) and
//! `examples/spec_frames.rs` (which prints them).

use protocol::cabinet::{
    Challenge, Command, CommandAction, CommandResult, CommandStatus, DoorEvent, DoorState, DoorStatus, ErrorCode,
    ErrorMessage, Flags, Frame, Heartbeat, HeartbeatAck, Hello, LaneWeight, Login, LoginResult, LoginStatus, Message,
    Notice, NoticeKind, WeightReport,
};
use protocol::{DeviceId, OrderId};

/// The example challenge nonce: bytes 0xA0, 0xA1, ..., 0xAF.
pub(crate) fn nonce() -> [u8; 16] {
    std::array::from_fn(|i| 0xA0 + i as u8)
}

/// The example device secret: bytes 0x00, 0x01, ..., 0x1f.
pub(crate) fn secret() -> Vec<u8> {
    (0u8..32).collect()
}

pub(crate) fn frames() -> Result<Vec<(&'static str, Frame)>, Box<dyn std::error::Error>> {
    let device = DeviceId::new("CAB-000123")?;
    let device_v2 = device.clone();
    let order = OrderId::new("ORD-20231114-0001")?;
    Ok(vec![
        ("login", Frame::new(1, Message::Login(Login::sign(device, "1.4.2", 1_700_000_000_000, &secret())?))),
        (
            "login_result",
            Frame::new(
                1,
                Message::LoginResult(LoginResult {
                    status: LoginStatus::Accepted,
                    server_time_ms: 1_700_000_000_250,
                    heartbeat_interval_s: 30,
                    retry_after_s: 0,
                }),
            ),
        ),
        ("heartbeat", Frame::new(2, Message::Heartbeat(Heartbeat { device_time_ms: 1_700_000_030_000 }))),
        ("heartbeat_ack", Frame::new(2, Message::HeartbeatAck(HeartbeatAck { server_time_ms: 1_700_000_030_010 }))),
        (
            "weight_report",
            Frame::new(
                3,
                Message::WeightReport(WeightReport {
                    door_id: 1,
                    sample_time_ms: 1_700_000_090_000,
                    lanes: vec![
                        LaneWeight { lane_id: 1, grams: 1250, stable: true },
                        LaneWeight { lane_id: 2, grams: -3, stable: true },
                        LaneWeight { lane_id: 3, grams: 830, stable: false },
                    ],
                }),
            ),
        ),
        (
            "door_event",
            Frame {
                seq: 7,
                flags: Flags(Flags::ACK_REQUESTED),
                message: Message::DoorEvent(DoorEvent {
                    door_id: 1,
                    state: DoorState::Open,
                    event_time_ms: 1_700_000_101_500,
                    order_id: Some(order.clone()),
                }),
            },
        ),
        ("ack", Frame::new(7, Message::Ack)),
        (
            "command_open_door",
            Frame::new(
                1,
                Message::Command(Command {
                    expires_at_ms: 1_700_000_110_000,
                    action: CommandAction::OpenDoor { door_id: 1, order_id: order },
                }),
            ),
        ),
        (
            "command_result",
            Frame::new(
                1,
                Message::CommandResult(CommandResult {
                    status: CommandStatus::Ok,
                    door_id: 1,
                    door_state: DoorStatus::Open,
                }),
            ),
        ),
        (
            "command_query_door",
            Frame::new(
                2,
                Message::Command(Command {
                    expires_at_ms: 1_700_000_120_000,
                    action: CommandAction::QueryDoor { door_id: 1 },
                }),
            ),
        ),
        (
            "notice_reconnect",
            Frame::new(
                3,
                Message::Notice(Notice {
                    kind: NoticeKind::Reconnect,
                    delay_ms: 1500,
                    port: 0,
                    host: String::new(),
                    text: "draining".into(),
                }),
            ),
        ),
        (
            "error_not_logged_in",
            Frame::new(5, Message::Error(ErrorMessage { code: ErrorCode::NotLoggedIn, detail: "login first".into() })),
        ),
        ("hello", Frame::new(1, Message::Hello(Hello { login_version: 2 }))),
        (
            "challenge",
            Frame::new(
                1,
                Message::Challenge(Challenge { login_version: 2, nonce: nonce(), server_time_ms: 1_700_000_000_100 }),
            ),
        ),
        (
            "login_v2",
            Frame::new(2, Message::Login(Login::sign_v2(device_v2, "1.4.2", 1_700_000_000_000, nonce(), &secret())?)),
        ),
    ])
}
