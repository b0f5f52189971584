//! The messages a cabinet and a gateway exchange, and their payload layouts (SPEC.md, "Messages").
//!
//! Every enumerated field has a Rust enum; a byte outside it is [`MessageError::OutOfRange`]
//! carrying the byte. Parsing reads the fields the spec defines and ignores any bytes after them
//! (SPEC.md, "Extensions"), so a newer peer can append fields without breaking an older one.

use bytes::{BufMut, Bytes, BytesMut};
use hmac::{KeyInit, Mac};

use super::error::{EncodeError, MessageError};
use super::wire::{Reader, put_str8, str8_len};
use crate::ids::{DEVICE_ID_MAX_LEN, DeviceId, ORDER_ID_MAX_LEN, OrderId};

/// Most lanes one weight report may carry.
pub const MAX_LANES_PER_REPORT: usize = 64;
/// Smallest weight a lane may report, in grams (tare drift makes small negatives normal).
pub const MIN_GRAMS: i32 = -1_000_000;
/// Largest weight a lane may report, in grams.
pub const MAX_GRAMS: i32 = 1_000_000;
/// Longest firmware version string, in bytes.
pub const FIRMWARE_VERSION_MAX_LEN: usize = 32;
/// Longest free text (notice text, error detail, notice host), in bytes.
pub const TEXT_MAX_LEN: usize = 255;
/// Length of the login authentication tag (HMAC-SHA256).
pub const LOGIN_TAG_LEN: usize = 32;
/// Length of the gateway's login challenge (SPEC.md, "CHALLENGE").
pub const NONCE_LEN: usize = 16;
/// The login versions (SPEC.md, "Login versions"): 1 signs the device time only, 2 also signs
/// the nonce of the connection's `CHALLENGE`, so a recorded login cannot be used again.
pub const LOGIN_V1: u8 = 1;
/// See [`LOGIN_V1`].
pub const LOGIN_V2: u8 = 2;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

macro_rules! byte_enum {
    ($(#[$doc:meta])* $name:ident, $field:literal { $($(#[$vdoc:meta])* $variant:ident = $value:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name {
            $($(#[$vdoc])* $variant = $value),+
        }

        impl $name {
            /// Every value, in wire order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// Reads the enum from its wire byte.
            ///
            /// # Errors
            /// [`MessageError::OutOfRange`] for a byte with no meaning.
            pub fn from_u8(b: u8) -> Result<Self, MessageError> {
                match b {
                    $($value => Ok($name::$variant),)+
                    other => Err(MessageError::OutOfRange { field: $field, value: u64::from(other) }),
                }
            }

            /// The wire byte.
            pub fn as_u8(self) -> u8 {
                self as u8
            }
        }
    };
}

byte_enum!(
    /// The type byte of a frame (SPEC.md, "Message types"). Uplink types are `0x01..=0x7F`,
    /// downlink types `0x81..=0xFE`, and `ERROR` (`0xFF`) goes either way.
    MessageType, "type" {
        /// Cabinet -> gateway: authenticate the connection.
        Login = 0x01,
        /// Cabinet -> gateway: still alive.
        Heartbeat = 0x02,
        /// Cabinet -> gateway: lane weights of one door.
        WeightReport = 0x03,
        /// Cabinet -> gateway: a door opened or closed.
        DoorEvent = 0x04,
        /// Cabinet -> gateway: the outcome of a command.
        CommandResult = 0x05,
        /// Cabinet -> gateway, before `LOGIN`: asks for a login challenge (login version 2).
        Hello = 0x06,
        /// Gateway -> cabinet: the answer to `LOGIN`.
        LoginResult = 0x81,
        /// Gateway -> cabinet: the answer to `HEARTBEAT`.
        HeartbeatAck = 0x82,
        /// Gateway -> cabinet: an uplink frame was accepted.
        Ack = 0x83,
        /// Gateway -> cabinet: do something.
        Command = 0x84,
        /// Gateway -> cabinet: something the cabinet should know (reconnect elsewhere, ...).
        Notice = 0x85,
        /// Gateway -> cabinet: the answer to `HELLO`, the nonce the login must sign.
        Challenge = 0x86,
        /// Either way: a frame was rejected.
        Error = 0xFF,
    }
);

impl MessageType {
    /// The metric label (`type="..."`).
    pub fn label(self) -> &'static str {
        match self {
            MessageType::Login => "login",
            MessageType::Heartbeat => "heartbeat",
            MessageType::WeightReport => "weight_report",
            MessageType::DoorEvent => "door_event",
            MessageType::CommandResult => "command_result",
            MessageType::Hello => "hello",
            MessageType::LoginResult => "login_result",
            MessageType::HeartbeatAck => "heartbeat_ack",
            MessageType::Ack => "ack",
            MessageType::Command => "command",
            MessageType::Notice => "notice",
            MessageType::Challenge => "challenge",
            MessageType::Error => "error",
        }
    }
}

byte_enum!(
    /// Outcome of a login.
    LoginStatus, "status" {
        /// Logged in; the session is live.
        Accepted = 0,
        /// The authentication tag does not match the device's secret.
        BadTag = 1,
        /// No device with this id is registered.
        UnknownDevice = 2,
        /// The device clock is too far from the server's; set it from `server_time_ms` and retry.
        ClockSkew = 3,
        /// The gateway is admitting too many connections; retry after `retry_after_s`.
        Busy = 4,
        /// The device is registered but disabled by an operator.
        Disabled = 5,
        /// The gateway cannot check credentials right now; retry after `retry_after_s`.
        Unavailable = 6,
        /// This gateway (or, after a version-2 login, this device) no longer accepts a
        /// version-1 login: send `HELLO` and log in with the challenge.
        LoginVersion = 7,
        /// The login was already used: a version-1 `device_time` not later than the last
        /// accepted login's, or a nonce that is not this connection's challenge.
        Replayed = 8,
    }
);

byte_enum!(
    /// A door's physical state as reported by an event.
    DoorState, "state" {
        /// The door is closed (and latched).
        Closed = 0,
        /// The door is open.
        Open = 1,
    }
);

byte_enum!(
    /// A door's state as reported in a command result: like [`DoorState`] plus "cannot tell".
    DoorStatus, "door_state" {
        /// Closed and latched.
        Closed = 0,
        /// Open.
        Open = 1,
        /// The lock sensor gives no reading (fault).
        Unknown = 2,
    }
);

byte_enum!(
    /// Outcome of a command on the cabinet.
    CommandStatus, "status" {
        /// Done (for open-door: the door is open, or was already open for the same order).
        Ok = 0,
        /// Tried and failed (lock jammed, ...).
        Failed = 1,
        /// The door is busy with another order or a restock.
        Busy = 2,
        /// The cabinet does not know this command kind.
        Unsupported = 3,
        /// `expires_at_ms` had passed when the command arrived; nothing was done.
        Expired = 4,
        /// No door with this id.
        InvalidDoor = 5,
    }
);

byte_enum!(
    /// What a notice asks of the cabinet.
    NoticeKind, "kind" {
        /// Close this connection and connect again (to `host:port` when given), after `delay_ms`.
        Reconnect = 1,
        /// Another connection logged in with this device id; this one is about to close.
        SessionReplaced = 2,
    }
);

byte_enum!(
    /// Why a frame was rejected.
    ErrorCode, "code" {
        /// CRC-32C mismatch.
        BadChecksum = 1,
        /// The version byte is not supported; the detail names the supported versions.
        UnsupportedVersion = 2,
        /// The type byte is unknown.
        UnknownType = 3,
        /// A field is truncated, out of range, or not valid text.
        Malformed = 4,
        /// The payload length exceeds the maximum.
        TooLarge = 5,
        /// The frame does not start with the magic bytes.
        BadMagic = 6,
        /// A frame other than `LOGIN` arrived before a successful login.
        NotLoggedIn = 7,
        /// A valid message that is not acceptable in this direction or state.
        Unexpected = 8,
        /// The receiver cannot take the frame now; retry later.
        Busy = 9,
    }
);

/// `LOGIN` (0x01): the first frame a cabinet sends on every connection.
///
/// The fields are read-only: the tag covers the exact bytes they were encoded from, kept in
/// `signed`, so a decoded login verifies against what was on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    device_id: DeviceId,
    firmware_version: String,
    device_time_ms: u64,
    /// Login version 2: the connection's challenge, the first extension of `LOGIN`.
    nonce: Option<[u8; NONCE_LEN]>,
    tag: [u8; LOGIN_TAG_LEN],
    /// The payload bytes before the tag: what the tag authenticates.
    signed: Bytes,
}

impl Login {
    /// Builds a login and signs it with the device's secret (SPEC.md, "LOGIN").
    ///
    /// # Errors
    /// [`EncodeError`] when the firmware version is longer than 32 bytes or not printable ASCII.
    pub fn sign(
        device_id: DeviceId,
        firmware_version: impl Into<String>,
        device_time_ms: u64,
        secret: &[u8],
    ) -> Result<Self, EncodeError> {
        Self::sign_with(device_id, firmware_version.into(), device_time_ms, None, secret)
    }

    /// Builds a version-2 login answering `nonce` (the connection's `CHALLENGE`) and signs it.
    ///
    /// # Errors
    /// As [`Login::sign`].
    pub fn sign_v2(
        device_id: DeviceId,
        firmware_version: impl Into<String>,
        device_time_ms: u64,
        nonce: [u8; NONCE_LEN],
        secret: &[u8],
    ) -> Result<Self, EncodeError> {
        Self::sign_with(device_id, firmware_version.into(), device_time_ms, Some(nonce), secret)
    }

    fn sign_with(
        device_id: DeviceId,
        firmware_version: String,
        device_time_ms: u64,
        nonce: Option<[u8; NONCE_LEN]>,
        secret: &[u8],
    ) -> Result<Self, EncodeError> {
        if !is_printable_ascii(&firmware_version) {
            return Err(EncodeError::OutOfRange { field: "firmware_version", value: -1 });
        }
        let mut signed =
            BytesMut::with_capacity(str8_len(device_id.as_str()) + str8_len(&firmware_version) + 8 + NONCE_LEN);
        put_str8(&mut signed, "device_id", device_id.as_str(), DEVICE_ID_MAX_LEN)?;
        put_str8(&mut signed, "firmware_version", &firmware_version, FIRMWARE_VERSION_MAX_LEN)?;
        signed.put_u64(device_time_ms);
        if let Some(nonce) = &nonce {
            signed.put_slice(nonce);
        }
        let signed = signed.freeze();
        let tag = login_tag(secret, &signed);
        Ok(Self { device_id, firmware_version, device_time_ms, nonce, tag, signed })
    }

    /// The nonce a version-2 login signs; `None` for version 1.
    pub fn nonce(&self) -> Option<&[u8; NONCE_LEN]> {
        self.nonce.as_ref()
    }

    /// [`LOGIN_V2`] when the login carries a nonce, else [`LOGIN_V1`].
    pub fn version(&self) -> u8 {
        if self.nonce.is_some() { LOGIN_V2 } else { LOGIN_V1 }
    }

    /// The cabinet's id.
    pub fn device_id(&self) -> &DeviceId {
        &self.device_id
    }

    /// Firmware version as the cabinet reports it.
    pub fn firmware_version(&self) -> &str {
        &self.firmware_version
    }

    /// The cabinet's clock at login, in milliseconds since the Unix epoch (UTC).
    pub fn device_time_ms(&self) -> u64 {
        self.device_time_ms
    }

    /// The HMAC-SHA256 tag as sent.
    pub fn tag(&self) -> &[u8; LOGIN_TAG_LEN] {
        &self.tag
    }

    /// Checks the tag against `secret` in constant time.
    pub fn verify(&self, secret: &[u8]) -> bool {
        let Ok(mut mac) = <HmacSha256 as KeyInit>::new_from_slice(secret) else {
            return false;
        };
        mac.update(&self.signed);
        mac.verify_slice(&self.tag).is_ok()
    }

    fn parse(payload: &Bytes) -> Result<Self, MessageError> {
        let Some(signed_len) = payload.len().checked_sub(LOGIN_TAG_LEN) else {
            return Err(MessageError::Truncated { field: "tag" });
        };
        let signed = payload.slice(..signed_len);
        let mut r = Reader::new(&signed);
        let device_id =
            DeviceId::new(r.str8("device_id")?).map_err(|_| MessageError::InvalidText { field: "device_id" })?;
        let firmware_version = r.str8("firmware_version")?;
        if firmware_version.len() > FIRMWARE_VERSION_MAX_LEN || !is_printable_ascii(firmware_version) {
            return Err(MessageError::InvalidText { field: "firmware_version" });
        }
        let firmware_version = firmware_version.to_owned();
        let device_time_ms = r.u64("device_time_ms")?;
        // The first extension is the nonce (login version 2); anything after it is ignored.
        let nonce = (r.remaining() >= NONCE_LEN).then(|| {
            let at = signed.len() - r.remaining();
            let mut nonce = [0u8; NONCE_LEN];
            nonce.copy_from_slice(&signed[at..at + NONCE_LEN]);
            nonce
        });
        let mut tag = [0u8; LOGIN_TAG_LEN];
        tag.copy_from_slice(&payload[signed_len..]);
        Ok(Self { device_id, firmware_version, device_time_ms, nonce, tag, signed })
    }

    fn write(&self, dst: &mut BytesMut) {
        dst.put_slice(&self.signed);
        dst.put_slice(&self.tag);
    }
}

/// HMAC-SHA256 of `signed` under `secret` (SPEC.md, "LOGIN").
fn login_tag(secret: &[u8], signed: &[u8]) -> [u8; LOGIN_TAG_LEN] {
    // HMAC accepts keys of any length, so this cannot fail; an empty tag would only fail to verify.
    let mut out = [0u8; LOGIN_TAG_LEN];
    if let Ok(mut mac) = <HmacSha256 as KeyInit>::new_from_slice(secret) {
        mac.update(signed);
        out.copy_from_slice(&mac.finalize().into_bytes());
    }
    out
}

fn is_printable_ascii(s: &str) -> bool {
    s.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// `LOGIN_RESULT` (0x81): the gateway's answer to `LOGIN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginResult {
    /// Accepted or why not.
    pub status: LoginStatus,
    /// The gateway's clock, in milliseconds since the Unix epoch (UTC).
    pub server_time_ms: u64,
    /// How often the cabinet must send `HEARTBEAT`, in seconds.
    pub heartbeat_interval_s: u16,
    /// For `Busy` and `Unavailable`: seconds to wait before trying again; otherwise 0.
    pub retry_after_s: u16,
}

/// `HEARTBEAT` (0x02).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// The cabinet's clock, in milliseconds since the Unix epoch (UTC).
    pub device_time_ms: u64,
}

/// `HEARTBEAT_ACK` (0x82).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatAck {
    /// The gateway's clock, in milliseconds since the Unix epoch (UTC).
    pub server_time_ms: u64,
}

/// `HELLO` (0x06): the first frame of a login-version-2 cabinet, asking for a challenge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The highest login version the cabinet speaks (2 or more).
    pub login_version: u8,
}

/// `CHALLENGE` (0x86): the gateway's answer to `HELLO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Challenge {
    /// The login version the gateway chose (2).
    pub login_version: u8,
    /// Random bytes, fresh for this connection, that the `LOGIN` tag must cover.
    pub nonce: [u8; NONCE_LEN],
    /// The gateway's clock, in milliseconds since the Unix epoch (UTC).
    pub server_time_ms: u64,
}

/// One lane's reading inside a [`WeightReport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneWeight {
    /// Lane id within the door, 1..=255.
    pub lane_id: u8,
    /// Net weight on the lane's scale, in grams, -1,000,000..=1,000,000.
    pub grams: i32,
    /// The scale had settled when it was read.
    pub stable: bool,
}

/// `WEIGHT_REPORT` (0x03): lane weights of one door at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightReport {
    /// Door id, 1..=255.
    pub door_id: u8,
    /// When the scales were read, milliseconds since the Unix epoch (UTC), cabinet clock.
    pub sample_time_ms: u64,
    /// 1 to 64 lanes.
    pub lanes: Vec<LaneWeight>,
}

/// `DOOR_EVENT` (0x04): a door opened or closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoorEvent {
    /// Door id, 1..=255.
    pub door_id: u8,
    /// The new state.
    pub state: DoorState,
    /// When it happened, milliseconds since the Unix epoch (UTC), cabinet clock.
    pub event_time_ms: u64,
    /// The order the door was opened for, if it was opened by an `OPEN_DOOR` command.
    pub order_id: Option<OrderId>,
}

/// What a `COMMAND` asks the cabinet to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandAction {
    /// Kind 0x01: unlock and open a door for an order.
    OpenDoor {
        /// Door id, 1..=255.
        door_id: u8,
        /// The paid order; the cabinet repeats it in the following `DOOR_EVENT`s.
        order_id: OrderId,
    },
    /// Kind 0x02: report a door's state without changing it.
    QueryDoor {
        /// Door id, 1..=255.
        door_id: u8,
    },
    /// Kind 0x03: re-zero one lane's scale so that it reads `grams` for what it holds now
    /// (the weight the restocker's count says it holds).
    Tare {
        /// Door id, 1..=255.
        door_id: u8,
        /// Lane id, 1..=255.
        lane_id: u8,
        /// What the lane holds, grams (0 for an empty lane).
        grams: i32,
    },
    /// Any other kind: carried as raw parameters so a cabinet can answer `Unsupported`.
    Other {
        /// The kind byte.
        kind: u8,
        /// The parameters as received.
        params: Bytes,
    },
}

impl CommandAction {
    /// The kind byte on the wire.
    pub fn kind(&self) -> u8 {
        match self {
            CommandAction::OpenDoor { .. } => 0x01,
            CommandAction::QueryDoor { .. } => 0x02,
            CommandAction::Tare { .. } => 0x03,
            CommandAction::Other { kind, .. } => *kind,
        }
    }
}

/// `COMMAND` (0x84).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// After this instant (milliseconds since the Unix epoch, UTC) the cabinet must not act on
    /// the command and answers `Expired`: a late open-door must never open a door.
    pub expires_at_ms: u64,
    /// What to do.
    pub action: CommandAction,
}

/// `COMMAND_RESULT` (0x05): sent with the `seq` of the `COMMAND` it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandResult {
    /// Outcome.
    pub status: CommandStatus,
    /// The door the command was about (0 if it named none).
    pub door_id: u8,
    /// The door's state after the command.
    pub door_state: DoorStatus,
}

/// `NOTICE` (0x85).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// What is asked.
    pub kind: NoticeKind,
    /// Wait this long, in milliseconds, before acting (the gateway spreads reconnects).
    pub delay_ms: u32,
    /// Where to reconnect; 0 means the configured port.
    pub port: u16,
    /// Where to reconnect; empty means the configured host.
    pub host: String,
    /// Human-readable explanation, for logs; may be empty.
    pub text: String,
}

/// `ERROR` (0xFF): sent with the `seq` of the rejected frame, or 0 when its header was not
/// read (bad magic, unsupported version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMessage {
    /// Why.
    pub code: ErrorCode,
    /// Human-readable detail; may be empty.
    pub detail: String,
}

/// Every message of protocol version 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// 0x01
    Login(Login),
    /// 0x02
    Heartbeat(Heartbeat),
    /// 0x03
    WeightReport(WeightReport),
    /// 0x04
    DoorEvent(DoorEvent),
    /// 0x05
    CommandResult(CommandResult),
    /// 0x06
    Hello(Hello),
    /// 0x81
    LoginResult(LoginResult),
    /// 0x82
    HeartbeatAck(HeartbeatAck),
    /// 0x83: no payload.
    Ack,
    /// 0x84
    Command(Command),
    /// 0x85
    Notice(Notice),
    /// 0x86
    Challenge(Challenge),
    /// 0xFF
    Error(ErrorMessage),
}

impl Message {
    /// The type byte this message travels under.
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::Login(_) => MessageType::Login,
            Message::Heartbeat(_) => MessageType::Heartbeat,
            Message::WeightReport(_) => MessageType::WeightReport,
            Message::DoorEvent(_) => MessageType::DoorEvent,
            Message::CommandResult(_) => MessageType::CommandResult,
            Message::Hello(_) => MessageType::Hello,
            Message::LoginResult(_) => MessageType::LoginResult,
            Message::HeartbeatAck(_) => MessageType::HeartbeatAck,
            Message::Ack => MessageType::Ack,
            Message::Command(_) => MessageType::Command,
            Message::Notice(_) => MessageType::Notice,
            Message::Challenge(_) => MessageType::Challenge,
            Message::Error(_) => MessageType::Error,
        }
    }

    /// Parses a payload of the given type.
    ///
    /// # Errors
    /// [`MessageError`] naming the first field that is truncated, out of range or bad text;
    /// `UnknownType` for a type byte version 1 does not define.
    pub fn parse(type_byte: u8, payload: &Bytes) -> Result<Self, MessageError> {
        let msg_type = MessageType::from_u8(type_byte).map_err(|_| MessageError::UnknownType(type_byte))?;
        let mut r = Reader::new(payload);
        let msg = match msg_type {
            MessageType::Login => Message::Login(Login::parse(payload)?),
            MessageType::Heartbeat => Message::Heartbeat(Heartbeat { device_time_ms: r.u64("device_time_ms")? }),
            MessageType::HeartbeatAck => {
                Message::HeartbeatAck(HeartbeatAck { server_time_ms: r.u64("server_time_ms")? })
            }
            MessageType::LoginResult => Message::LoginResult(LoginResult {
                status: LoginStatus::from_u8(r.u8("status")?)?,
                server_time_ms: r.u64("server_time_ms")?,
                heartbeat_interval_s: r.u16("heartbeat_interval_s")?,
                retry_after_s: r.u16("retry_after_s")?,
            }),
            MessageType::WeightReport => Message::WeightReport(parse_weight_report(&mut r)?),
            MessageType::DoorEvent => Message::DoorEvent(DoorEvent {
                door_id: nonzero(r.u8("door_id")?, "door_id")?,
                state: DoorState::from_u8(r.u8("state")?)?,
                event_time_ms: r.u64("event_time_ms")?,
                order_id: optional_order_id(r.str8("order_id")?)?,
            }),
            MessageType::CommandResult => Message::CommandResult(CommandResult {
                status: CommandStatus::from_u8(r.u8("status")?)?,
                door_id: r.u8("door_id")?,
                door_state: DoorStatus::from_u8(r.u8("door_state")?)?,
            }),
            MessageType::Hello => Message::Hello(Hello { login_version: r.u8("login_version")? }),
            MessageType::Challenge => {
                let login_version = r.u8("login_version")?;
                let mut nonce = [0u8; NONCE_LEN];
                for b in &mut nonce {
                    *b = r.u8("nonce")?;
                }
                Message::Challenge(Challenge { login_version, nonce, server_time_ms: r.u64("server_time_ms")? })
            }
            MessageType::Ack => Message::Ack,
            MessageType::Command => Message::Command(parse_command(&mut r, payload)?),
            MessageType::Notice => Message::Notice(Notice {
                kind: NoticeKind::from_u8(r.u8("kind")?)?,
                delay_ms: r.u32("delay_ms")?,
                port: r.u16("port")?,
                host: r.str8("host")?.to_owned(),
                text: r.str8("text")?.to_owned(),
            }),
            MessageType::Error => Message::Error(ErrorMessage {
                code: ErrorCode::from_u8(r.u8("code")?)?,
                detail: r.str8("detail")?.to_owned(),
            }),
        };
        Ok(msg)
    }

    /// Appends the payload to `dst`.
    ///
    /// # Errors
    /// [`EncodeError`] for a field outside the spec's limits; `dst` may then hold a partial
    /// payload, which the caller discards.
    pub fn write(&self, dst: &mut BytesMut) -> Result<(), EncodeError> {
        match self {
            Message::Login(login) => login.write(dst),
            Message::Heartbeat(h) => dst.put_u64(h.device_time_ms),
            Message::HeartbeatAck(h) => dst.put_u64(h.server_time_ms),
            Message::LoginResult(l) => {
                dst.put_u8(l.status.as_u8());
                dst.put_u64(l.server_time_ms);
                dst.put_u16(l.heartbeat_interval_s);
                dst.put_u16(l.retry_after_s);
            }
            Message::WeightReport(w) => write_weight_report(w, dst)?,
            Message::DoorEvent(e) => {
                dst.put_u8(encode_nonzero(e.door_id, "door_id")?);
                dst.put_u8(e.state.as_u8());
                dst.put_u64(e.event_time_ms);
                let order = e.order_id.as_ref().map_or("", OrderId::as_str);
                put_str8(dst, "order_id", order, ORDER_ID_MAX_LEN)?;
            }
            Message::CommandResult(c) => {
                dst.put_u8(c.status.as_u8());
                dst.put_u8(c.door_id);
                dst.put_u8(c.door_state.as_u8());
            }
            Message::Hello(h) => dst.put_u8(h.login_version),
            Message::Challenge(c) => {
                dst.put_u8(c.login_version);
                dst.put_slice(&c.nonce);
                dst.put_u64(c.server_time_ms);
            }
            Message::Ack => {}
            Message::Command(c) => write_command(c, dst)?,
            Message::Notice(n) => {
                dst.put_u8(n.kind.as_u8());
                dst.put_u32(n.delay_ms);
                dst.put_u16(n.port);
                put_str8(dst, "host", &n.host, TEXT_MAX_LEN)?;
                put_str8(dst, "text", &n.text, TEXT_MAX_LEN)?;
            }
            Message::Error(e) => {
                dst.put_u8(e.code.as_u8());
                put_str8(dst, "detail", &e.detail, TEXT_MAX_LEN)?;
            }
        }
        Ok(())
    }

    /// Payload size in bytes, without writing it. Lets the encoder reserve exactly once.
    pub fn payload_len(&self) -> usize {
        match self {
            Message::Login(l) => l.signed.len() + LOGIN_TAG_LEN,
            Message::Heartbeat(_) | Message::HeartbeatAck(_) => 8,
            Message::LoginResult(_) => 13,
            Message::WeightReport(w) => 10 + 6 * w.lanes.len(),
            Message::DoorEvent(e) => 10 + str8_len(e.order_id.as_ref().map_or("", OrderId::as_str)),
            Message::CommandResult(_) => 3,
            Message::Hello(_) => 1,
            Message::Challenge(_) => 1 + NONCE_LEN + 8,
            Message::Ack => 0,
            Message::Command(c) => {
                9 + match &c.action {
                    CommandAction::OpenDoor { order_id, .. } => 1 + str8_len(order_id.as_str()),
                    CommandAction::QueryDoor { .. } => 1,
                    CommandAction::Tare { .. } => 6,
                    CommandAction::Other { params, .. } => params.len(),
                }
            }
            Message::Notice(n) => 7 + str8_len(&n.host) + str8_len(&n.text),
            Message::Error(e) => 1 + str8_len(&e.detail),
        }
    }
}

fn nonzero(v: u8, field: &'static str) -> Result<u8, MessageError> {
    if v == 0 { Err(MessageError::OutOfRange { field, value: 0 }) } else { Ok(v) }
}

fn encode_nonzero(v: u8, field: &'static str) -> Result<u8, EncodeError> {
    if v == 0 { Err(EncodeError::OutOfRange { field, value: 0 }) } else { Ok(v) }
}

fn optional_order_id(s: &str) -> Result<Option<OrderId>, MessageError> {
    if s.is_empty() {
        return Ok(None);
    }
    OrderId::new(s).map(Some).map_err(|_| MessageError::InvalidText { field: "order_id" })
}

fn parse_weight_report(r: &mut Reader<'_>) -> Result<WeightReport, MessageError> {
    let door_id = nonzero(r.u8("door_id")?, "door_id")?;
    let sample_time_ms = r.u64("sample_time_ms")?;
    let count = r.u8("lane_count")?;
    if count == 0 || usize::from(count) > MAX_LANES_PER_REPORT {
        return Err(MessageError::OutOfRange { field: "lane_count", value: u64::from(count) });
    }
    let mut lanes = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let lane_id = nonzero(r.u8("lane_id")?, "lane_id")?;
        let grams = r.i32("grams")?;
        if !(MIN_GRAMS..=MAX_GRAMS).contains(&grams) {
            // Two's-complement bits, so a negative reading is still recognisable in a log.
            return Err(MessageError::OutOfRange { field: "grams", value: u64::from(grams as u32) });
        }
        let stable = match r.u8("stable")? {
            0 => false,
            1 => true,
            other => return Err(MessageError::OutOfRange { field: "stable", value: u64::from(other) }),
        };
        lanes.push(LaneWeight { lane_id, grams, stable });
    }
    Ok(WeightReport { door_id, sample_time_ms, lanes })
}

fn write_weight_report(w: &WeightReport, dst: &mut BytesMut) -> Result<(), EncodeError> {
    if w.lanes.is_empty() || w.lanes.len() > MAX_LANES_PER_REPORT {
        return Err(EncodeError::TooLong { field: "lanes", len: w.lanes.len(), max: MAX_LANES_PER_REPORT });
    }
    dst.put_u8(encode_nonzero(w.door_id, "door_id")?);
    dst.put_u64(w.sample_time_ms);
    // Checked above: 1..=64 fits a byte.
    dst.put_u8(w.lanes.len() as u8);
    for lane in &w.lanes {
        dst.put_u8(encode_nonzero(lane.lane_id, "lane_id")?);
        if !(MIN_GRAMS..=MAX_GRAMS).contains(&lane.grams) {
            return Err(EncodeError::OutOfRange { field: "grams", value: i64::from(lane.grams) });
        }
        dst.put_i32(lane.grams);
        dst.put_u8(u8::from(lane.stable));
    }
    Ok(())
}

fn parse_command(r: &mut Reader<'_>, payload: &Bytes) -> Result<Command, MessageError> {
    let kind = r.u8("kind")?;
    let expires_at_ms = r.u64("expires_at_ms")?;
    let action = match kind {
        0x01 => {
            let door_id = nonzero(r.u8("door_id")?, "door_id")?;
            let order_id =
                OrderId::new(r.str8("order_id")?).map_err(|_| MessageError::InvalidText { field: "order_id" })?;
            CommandAction::OpenDoor { door_id, order_id }
        }
        0x02 => CommandAction::QueryDoor { door_id: nonzero(r.u8("door_id")?, "door_id")? },
        0x03 => CommandAction::Tare {
            door_id: nonzero(r.u8("door_id")?, "door_id")?,
            lane_id: nonzero(r.u8("lane_id")?, "lane_id")?,
            grams: r.i32("grams")?,
        },
        other => {
            let start = payload.len() - r.remaining();
            CommandAction::Other { kind: other, params: payload.slice(start..) }
        }
    };
    Ok(Command { expires_at_ms, action })
}

fn write_command(c: &Command, dst: &mut BytesMut) -> Result<(), EncodeError> {
    dst.put_u8(c.action.kind());
    dst.put_u64(c.expires_at_ms);
    match &c.action {
        CommandAction::OpenDoor { door_id, order_id } => {
            dst.put_u8(encode_nonzero(*door_id, "door_id")?);
            put_str8(dst, "order_id", order_id.as_str(), ORDER_ID_MAX_LEN)?;
        }
        CommandAction::QueryDoor { door_id } => dst.put_u8(encode_nonzero(*door_id, "door_id")?),
        CommandAction::Tare { door_id, lane_id, grams } => {
            dst.put_u8(encode_nonzero(*door_id, "door_id")?);
            dst.put_u8(encode_nonzero(*lane_id, "lane_id")?);
            dst.put_i32(*grams);
        }
        CommandAction::Other { kind, params } => {
            if matches!(kind, 0x01..=0x03) {
                return Err(EncodeError::OutOfRange { field: "kind", value: i64::from(*kind) });
            }
            dst.put_slice(params);
        }
    }
    Ok(())
}
