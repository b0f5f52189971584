//! One packet model for MQTT 3.1, 3.1.1 and 5.0.
//!
//! The gateway handles vehicles the same way whatever version they speak; the differences
//! (reason codes, session expiry versus clean session, server-sent DISCONNECT) are settled when a
//! packet is converted to or from the wire in [`codec`](super::codec). Version 5 properties the
//! gateway neither uses nor offers are dropped on decode and absent on encode.

use std::num::NonZeroU16;

use bytes::Bytes;

/// The protocol level a client announced in CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// MQTT 3.1 (`MQIsdp`, level 3).
    V3_1,
    /// MQTT 3.1.1 (level 4).
    V3_1_1,
    /// MQTT 5.0 (level 5).
    V5,
}

impl Version {
    /// `true` for 3.1 and 3.1.1, which share one codec and one set of rules.
    pub fn is_v3(self) -> bool {
        !matches!(self, Version::V5)
    }

    /// The metric label (`version="..."`).
    pub fn label(self) -> &'static str {
        match self {
            Version::V3_1 => "3.1",
            Version::V3_1_1 => "3.1.1",
            Version::V5 => "5.0",
        }
    }
}

/// Quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    /// At most once: no acknowledgement.
    AtMostOnce = 0,
    /// At least once: PUBACK.
    AtLeastOnce = 1,
    /// Exactly once: PUBREC, PUBREL, PUBCOMP.
    ExactlyOnce = 2,
}

/// A last-will message (version 5 will properties are not kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
}

/// CONNECT.
#[derive(Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol level.
    pub version: Version,
    /// Client identifier (vehicles use their VIN).
    pub client_id: String,
    /// Clean session (3.1.x) / clean start (5.0).
    pub clean_start: bool,
    /// Keep-alive in seconds; 0 disables it.
    pub keep_alive_s: u16,
    /// User name.
    pub username: Option<String>,
    /// Password (the vehicle token). Never printed by `Debug`.
    pub password: Option<Bytes>,
    /// Last will.
    pub will: Option<Will>,
    /// How long the session outlives the connection, in seconds. Version 5 carries it; for
    /// 3.1.x it is 0 with a clean session and `u32::MAX` (until cleaned) without.
    pub session_expiry_s: u32,
    /// The most unacknowledged QoS 1/2 publishes the client accepts (5.0; `None` = 65,535).
    pub receive_max: Option<NonZeroU16>,
    /// The largest packet the client accepts, in bytes (5.0; `None` = no limit).
    pub max_packet_size: Option<u32>,
}

impl std::fmt::Debug for Connect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connect")
            .field("version", &self.version)
            .field("client_id", &self.client_id)
            .field("clean_start", &self.clean_start)
            .field("keep_alive_s", &self.keep_alive_s)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("will", &self.will)
            .field("session_expiry_s", &self.session_expiry_s)
            .field("receive_max", &self.receive_max)
            .field("max_packet_size", &self.max_packet_size)
            .finish()
    }
}

/// The outcome of a CONNECT. Codes that 3.1.x lacks are sent there as the nearest 3.1.x code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectCode {
    /// Accepted.
    Accepted,
    /// Unsupported protocol version.
    UnsupportedVersion,
    /// Client identifier not valid.
    IdentifierRejected,
    /// Server unavailable.
    ServerUnavailable,
    /// Bad user name or password.
    BadCredentials,
    /// Not authorised.
    NotAuthorized,
    /// Server busy (5.0; 3.1.x: server unavailable).
    ServerBusy,
    /// Banned (5.0; 3.1.x: not authorised).
    Banned,
    /// Connection rate exceeded (5.0; 3.1.x: server unavailable).
    ConnectionRateExceeded,
    /// Packet too large (5.0; 3.1.x: server unavailable).
    PacketTooLarge,
    /// Malformed packet (5.0; 3.1.x: server unavailable).
    MalformedPacket,
    /// Protocol error (5.0; 3.1.x: server unavailable).
    ProtocolError,
}

/// CONNACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    /// A stored session was resumed.
    pub session_present: bool,
    /// Outcome.
    pub code: ConnectCode,
    /// 5.0: the keep-alive the server imposes, in seconds.
    pub server_keepalive_s: Option<u16>,
    /// 5.0: the largest packet the server accepts, in bytes.
    pub max_packet_size: Option<u32>,
    /// 5.0: the most unacknowledged QoS 1 publishes the server accepts.
    pub receive_max: Option<NonZeroU16>,
    /// 5.0: the session expiry the server grants, in seconds, if it differs from the request.
    pub session_expiry_s: Option<u32>,
}

impl ConnAck {
    /// A CONNACK with only the code and session flag set.
    pub fn new(code: ConnectCode, session_present: bool) -> Self {
        Self {
            session_present,
            code,
            server_keepalive_s: None,
            max_packet_size: None,
            receive_max: None,
            session_expiry_s: None,
        }
    }
}

/// PUBLISH.
#[derive(Clone, PartialEq, Eq)]
pub struct Publish {
    /// Redelivery flag.
    pub dup: bool,
    /// QoS.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
    /// Topic name (never a filter: no `+` or `#`).
    pub topic: String,
    /// Packet identifier, present for QoS 1 and 2.
    pub packet_id: Option<NonZeroU16>,
    /// Payload.
    pub payload: Bytes,
}

impl std::fmt::Debug for Publish {
    // Payloads may carry activation codes; logs get the size only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publish")
            .field("topic", &self.topic)
            .field("qos", &self.qos)
            .field("packet_id", &self.packet_id)
            .field("dup", &self.dup)
            .field("retain", &self.retain)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// One answer in a SUBACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubAckResult {
    /// Subscribed at this maximum QoS.
    Granted(QoS),
    /// Refused: not authorised (3.1.1: failure `0x80`).
    NotAuthorized,
    /// Refused: invalid filter (3.1.1: failure `0x80`).
    TopicFilterInvalid,
    /// Refused: the connection holds as many subscriptions as it may (5.0 `0x97` quota
    /// exceeded; 3.1.1: failure `0x80`).
    QuotaExceeded,
    /// Refused for another reason (3.1.1: failure `0x80`).
    Failure,
}

/// Reason code `0x00`, success, in the 5.0 acknowledgements.
pub const REASON_SUCCESS: u8 = 0x00;
/// Reason code `0x87`, not authorised.
pub const REASON_NOT_AUTHORIZED: u8 = 0x87;
/// Reason code `0x99`, payload format invalid.
pub const REASON_PAYLOAD_FORMAT_INVALID: u8 = 0x99;

/// Why the server closes a connection (5.0 DISCONNECT reason codes the gateway uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DisconnectReason {
    /// 0x00
    Normal,
    /// 0x80
    Unspecified,
    /// 0x81
    MalformedPacket,
    /// 0x82
    ProtocolError,
    /// 0x87
    NotAuthorized,
    /// 0x89
    ServerBusy,
    /// 0x8B
    ServerShuttingDown,
    /// 0x8D
    KeepAliveTimeout,
    /// 0x8E
    SessionTakenOver,
    /// 0x90
    TopicNameInvalid,
    /// 0x93
    ReceiveMaximumExceeded,
    /// 0x95
    PacketTooLarge,
    /// 0x97
    QuotaExceeded,
    /// 0x9B
    QosNotSupported,
    /// 0x9C
    UseAnotherServer,
    /// 0x9D
    ServerMoved,
    /// 0x9F
    ConnectionRateExceeded,
    /// Any other code, as received.
    Other(u8),
}

/// DISCONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    /// Reason (3.1.x has none on the wire: always `Normal` there).
    pub reason: DisconnectReason,
    /// 5.0: where to connect instead (with `UseAnotherServer` / `ServerMoved`).
    pub server_reference: Option<String>,
    /// 5.0, client to server: a new session expiry.
    pub session_expiry_s: Option<u32>,
}

impl Disconnect {
    /// A DISCONNECT with a reason and nothing else.
    pub fn new(reason: DisconnectReason) -> Self {
        Self { reason, server_reference: None, session_expiry_s: None }
    }
}

/// Every MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNECT (boxed: by far the largest variant).
    Connect(Box<Connect>),
    /// CONNACK
    ConnAck(ConnAck),
    /// PUBLISH
    Publish(Publish),
    /// PUBACK (`reason` is 5.0's; 3.1.x carries none and decodes as success).
    PubAck {
        /// Packet identifier.
        packet_id: NonZeroU16,
        /// Reason code.
        reason: u8,
    },
    /// PUBREC
    PubRec {
        /// Packet identifier.
        packet_id: NonZeroU16,
        /// Reason code.
        reason: u8,
    },
    /// PUBREL
    PubRel {
        /// Packet identifier.
        packet_id: NonZeroU16,
        /// Reason code.
        reason: u8,
    },
    /// PUBCOMP
    PubComp {
        /// Packet identifier.
        packet_id: NonZeroU16,
        /// Reason code.
        reason: u8,
    },
    /// SUBSCRIBE (5.0 subscription options other than QoS are not kept).
    Subscribe {
        /// Packet identifier.
        packet_id: NonZeroU16,
        /// Filters and requested QoS.
        filters: Vec<(String, QoS)>,
    },
    /// SUBACK
    SubAck {
        /// Packet identifier.
        packet_id: NonZeroU16,
        /// One result per filter, in order.
        results: Vec<SubAckResult>,
    },
    /// UNSUBSCRIBE
    Unsubscribe {
        /// Packet identifier.
        packet_id: NonZeroU16,
        /// Filters.
        filters: Vec<String>,
    },
    /// UNSUBACK (`reasons` is 5.0's, one per filter; 3.1.x carries none).
    UnsubAck {
        /// Packet identifier.
        packet_id: NonZeroU16,
        /// Reason codes.
        reasons: Vec<u8>,
    },
    /// PINGREQ
    PingReq,
    /// PINGRESP
    PingResp,
    /// DISCONNECT
    Disconnect(Disconnect),
    /// AUTH (5.0 enhanced authentication; the gateway does not offer it).
    Auth {
        /// Reason code.
        reason: u8,
    },
}

impl Packet {
    /// The metric label of the packet type (`type="..."`).
    pub fn label(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "connect",
            Packet::ConnAck(_) => "connack",
            Packet::Publish(_) => "publish",
            Packet::PubAck { .. } => "puback",
            Packet::PubRec { .. } => "pubrec",
            Packet::PubRel { .. } => "pubrel",
            Packet::PubComp { .. } => "pubcomp",
            Packet::Subscribe { .. } => "subscribe",
            Packet::SubAck { .. } => "suback",
            Packet::Unsubscribe { .. } => "unsubscribe",
            Packet::UnsubAck { .. } => "unsuback",
            Packet::PingReq => "pingreq",
            Packet::PingResp => "pingresp",
            Packet::Disconnect(_) => "disconnect",
            Packet::Auth { .. } => "auth",
        }
    }
}
