//! Why an MQTT packet was refused or could not be written.
//!
//! The wire codec underneath reports its own errors; they are folded into [`MqttError`] so that a
//! gateway counts every MQTT rejection with one label set ([`MqttError::label`]), whichever layer
//! found it. In MQTT every such error closes the connection.

use std::io;

/// An MQTT packet the server refuses, or a failure to read or write one.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// The socket failed.
    #[error("failed to read or write mqtt stream: {0}")]
    Io(#[from] io::Error),
    /// The declared packet size exceeds the limit; the body was not buffered.
    #[error("failed to decode mqtt packet: size {size} exceeds the limit {max}")]
    TooLarge {
        /// Declared remaining length.
        size: u32,
        /// The limit in force.
        max: u32,
    },
    /// The bytes are not a well-formed packet of the negotiated version.
    #[error("failed to decode mqtt packet: {detail}")]
    Malformed {
        /// What the wire codec reported.
        detail: String,
    },
    /// The protocol name or level in CONNECT is not MQTT 3.1, 3.1.1 or 5.0.
    #[error("failed to decode mqtt packet: unsupported protocol name or level")]
    UnsupportedProtocol,
    /// The first packet was not CONNECT.
    #[error("failed to decode mqtt packet: first packet is not CONNECT")]
    FirstPacketNotConnect,
    /// A second CONNECT on a connected session.
    #[error("failed to decode mqtt packet: second CONNECT")]
    SecondConnect,
    /// A string contains U+0000, which MQTT forbids.
    #[error("failed to decode mqtt packet: U+0000 in {field}")]
    NulInString {
        /// Which string.
        field: &'static str,
    },
    /// A PUBLISH (or will) topic that is empty or contains `+` or `#`.
    #[error("failed to decode mqtt packet: invalid topic name {0:?}")]
    InvalidTopic(String),
    /// A topic filter that breaks the wildcard rules (`a/#/b`, `a+`, ...).
    #[error("failed to decode mqtt packet: invalid topic filter {0:?}")]
    InvalidFilter(String),
    /// SUBSCRIBE or UNSUBSCRIBE without any filter.
    #[error("failed to decode mqtt packet: no topic filter")]
    NoFilter,
    /// 3.1.x CONNECT with a password but no user name.
    #[error("failed to decode mqtt packet: password without user name")]
    PasswordWithoutUsername,
    /// 5.0 PUBLISH using a topic alias, which the server does not grant.
    #[error("failed to decode mqtt packet: topic alias not granted")]
    TopicAlias,
    /// A packet that cannot be written for the negotiated version or the peer's limits.
    #[error("failed to encode mqtt packet: {detail}")]
    Encode {
        /// What went wrong.
        detail: String,
    },
}

impl MqttError {
    /// The metric label of this rejection (`reason="..."`).
    pub fn label(&self) -> &'static str {
        match self {
            MqttError::Io(_) => "io",
            MqttError::TooLarge { .. } => "too_large",
            MqttError::Malformed { .. } => "malformed",
            MqttError::UnsupportedProtocol => "unsupported_protocol",
            MqttError::FirstPacketNotConnect => "first_packet_not_connect",
            MqttError::SecondConnect => "second_connect",
            MqttError::NulInString { .. } => "nul_in_string",
            MqttError::InvalidTopic(_) => "invalid_topic",
            MqttError::InvalidFilter(_) => "invalid_filter",
            MqttError::NoFilter => "no_filter",
            MqttError::PasswordWithoutUsername => "password_without_username",
            MqttError::TopicAlias => "topic_alias",
            MqttError::Encode { .. } => "encode",
        }
    }
}

impl From<rmqtt_codec::error::DecodeError> for MqttError {
    fn from(e: rmqtt_codec::error::DecodeError) -> Self {
        use rmqtt_codec::error::DecodeError as D;
        match e {
            D::MaxSizeExceeded { size, max } => MqttError::TooLarge { size, max },
            D::InvalidProtocol | D::UnsupportedProtocolLevel => MqttError::UnsupportedProtocol,
            D::UnsupportedPacketType => MqttError::Malformed { detail: "unsupported packet type".into() },
            D::Io(detail) => MqttError::Io(io::Error::other(detail.to_string())),
            other => MqttError::Malformed { detail: other.to_string() },
        }
    }
}

impl From<rmqtt_codec::error::EncodeError> for MqttError {
    fn from(e: rmqtt_codec::error::EncodeError) -> Self {
        MqttError::Encode { detail: e.to_string() }
    }
}
