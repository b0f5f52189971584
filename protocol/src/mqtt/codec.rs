//! The MQTT codec: version detection on CONNECT, size limits, the checks of
//! [`validate`](super::validate), and conversion between the wire crate's per-version packets and
//! [`Packet`].
//!
//! The wire format itself is `rmqtt-codec` 0.3.1 (see protocol/README.md for why). Its
//! `Codec::default()` means "no size limit", so this wrapper never builds one without a limit:
//! before CONNECT the limit is small ([`Limits::connect_max_bytes`]); after it, the session limit.

use std::num::{NonZeroU16, NonZeroU32};

use bytes::BytesMut;
use bytestring::ByteString;
use rmqtt_codec::types::{Protocol, QoS as WireQoS};
use rmqtt_codec::{v3, v5, version};
use tokio_util::codec::{Decoder, Encoder};

use super::error::MqttError;
use super::packet::{
    ConnAck, Connect, ConnectCode, Disconnect, DisconnectReason, Packet, Publish, QoS, SubAckResult, Version, Will,
};
use super::validate::{check_packet, v3_version};

/// Receive limits, in bytes of MQTT remaining length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest CONNECT accepted. Small, so an unauthenticated peer cannot make the server
    /// reserve a large buffer.
    pub connect_max_bytes: u32,
    /// Largest packet accepted after CONNECT.
    pub max_packet_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self { connect_max_bytes: 2048, max_packet_bytes: 16 * 1024 }
    }
}

#[derive(Debug)]
enum State {
    /// Server side, before CONNECT: only the protocol level is peeked.
    AwaitConnect,
    V3 {
        codec: v3::Codec,
        version: Version,
    },
    V5(v5::Codec),
}

/// MQTT packets over a byte stream, as a server sees them (or, built with
/// [`MqttCodec::connected`], as a client does).
#[derive(Debug)]
pub struct MqttCodec {
    state: State,
    limits: Limits,
    /// Set once CONNECT went through; a second one is a protocol violation.
    connected: bool,
}

impl MqttCodec {
    /// A server-side codec waiting for CONNECT.
    pub fn server(limits: Limits) -> Self {
        Self { state: State::AwaitConnect, limits, connected: false }
    }

    /// A codec for an already negotiated version: what a client (or a test) uses.
    pub fn connected(version: Version, limits: Limits) -> Self {
        let state = match version {
            Version::V5 => State::V5(v5::Codec::new(limits.max_packet_bytes, 0)),
            v3 => State::V3 { codec: v3::Codec::new(limits.max_packet_bytes), version: v3 },
        };
        Self { state, limits, connected: true }
    }

    /// The negotiated version, once CONNECT has been decoded.
    pub fn version(&self) -> Option<Version> {
        match &self.state {
            State::AwaitConnect => None,
            State::V3 { version, .. } => Some(*version),
            State::V5(_) => Some(Version::V5),
        }
    }

    /// Caps what this side sends, e.g. at the client's 5.0 Maximum Packet Size.
    pub fn set_max_outbound_bytes(&mut self, max: u32) {
        if let State::V5(codec) = &mut self.state {
            codec.set_max_outbound_size(max);
        }
    }

    fn decode_wire(&mut self, src: &mut BytesMut) -> Result<Option<Packet>, MqttError> {
        if matches!(self.state, State::AwaitConnect) {
            let Some(detected) = version::VersionCodec.decode(src).map_err(|e| match e {
                rmqtt_codec::error::DecodeError::UnsupportedPacketType => MqttError::FirstPacketNotConnect,
                other => other.into(),
            })?
            else {
                return Ok(None);
            };
            self.state = match detected {
                version::ProtocolVersion::MQTT5 => State::V5(v5::Codec::new(self.limits.connect_max_bytes, 0)),
                version::ProtocolVersion::MQTT3 => State::V3 {
                    codec: v3::Codec::new(self.limits.connect_max_bytes),
                    // Corrected from the CONNECT's protocol level once it is decoded.
                    version: Version::V3_1_1,
                },
            };
        }
        match &mut self.state {
            State::AwaitConnect => Ok(None),
            State::V3 { codec, version } => match codec.decode(src)? {
                None => Ok(None),
                Some((packet, _)) => {
                    if let v3::Packet::Connect(c) = &packet {
                        *version = v3_version(c.protocol.level());
                    }
                    from_v3(packet, *version).map(Some)
                }
            },
            State::V5(codec) => match codec.decode(src)? {
                None => Ok(None),
                Some((packet, _)) => from_v5(packet).map(Some),
            },
        }
    }

    /// Switches from the CONNECT limit to the session limit.
    fn open_session(&mut self) {
        self.connected = true;
        match &mut self.state {
            State::V3 { codec, .. } => codec.set_max_size(self.limits.max_packet_bytes),
            State::V5(codec) => codec.set_max_inbound_size(self.limits.max_packet_bytes),
            State::AwaitConnect => {}
        }
    }
}

impl Decoder for MqttCodec {
    type Item = Packet;
    type Error = MqttError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Packet>, MqttError> {
        let Some(packet) = self.decode_wire(src)? else {
            return Ok(None);
        };
        check_packet(&packet)?;
        if let Packet::Connect(_) = packet {
            if self.connected {
                return Err(MqttError::SecondConnect);
            }
            self.open_session();
        }
        Ok(Some(packet))
    }
}

impl Encoder<Packet> for MqttCodec {
    type Error = MqttError;

    fn encode(&mut self, item: Packet, dst: &mut BytesMut) -> Result<(), MqttError> {
        match &mut self.state {
            State::AwaitConnect => Err(MqttError::Encode { detail: "no protocol version negotiated yet".into() }),
            State::V3 { codec, version } => Ok(codec.encode(to_v3(item, *version)?, dst)?),
            State::V5(codec) => Ok(codec.encode(to_v5(item)?, dst)?),
        }
    }
}

// === QoS and strings ===

fn qos_from_wire(q: WireQoS) -> QoS {
    match q {
        WireQoS::AtMostOnce => QoS::AtMostOnce,
        WireQoS::AtLeastOnce => QoS::AtLeastOnce,
        WireQoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos_to_wire(q: QoS) -> WireQoS {
    match q {
        QoS::AtMostOnce => WireQoS::AtMostOnce,
        QoS::AtLeastOnce => WireQoS::AtLeastOnce,
        QoS::ExactlyOnce => WireQoS::ExactlyOnce,
    }
}

fn text(s: ByteString) -> String {
    String::from(&*s)
}

fn wire_text(s: String) -> ByteString {
    ByteString::from(s)
}

fn encode_err(detail: &str) -> MqttError {
    MqttError::Encode { detail: detail.to_owned() }
}

// === 3.1 / 3.1.1 ===

fn from_v3(packet: v3::Packet, version: Version) -> Result<Packet, MqttError> {
    use v3::Packet as P;
    Ok(match packet {
        P::Connect(c) => {
            let c = *c;
            Packet::Connect(Box::new(Connect {
                version,
                client_id: text(c.client_id),
                clean_start: c.clean_session,
                keep_alive_s: c.keep_alive,
                username: c.username.map(text),
                password: c.password,
                will: c.last_will.map(|w| Will {
                    topic: text(w.topic),
                    payload: w.message,
                    qos: qos_from_wire(w.qos),
                    retain: w.retain,
                }),
                session_expiry_s: if c.clean_session { 0 } else { u32::MAX },
                receive_max: None,
                max_packet_size: None,
            }))
        }
        P::ConnectAck(a) => {
            use v3::ConnectAckReason as R;
            let code = match a.return_code {
                R::ConnectionAccepted => ConnectCode::Accepted,
                R::UnacceptableProtocolVersion => ConnectCode::UnsupportedVersion,
                R::IdentifierRejected => ConnectCode::IdentifierRejected,
                R::ServiceUnavailable | R::Reserved => ConnectCode::ServerUnavailable,
                R::BadUserNameOrPassword => ConnectCode::BadCredentials,
                R::NotAuthorized => ConnectCode::NotAuthorized,
            };
            Packet::ConnAck(ConnAck::new(code, a.session_present))
        }
        P::Publish(p) => Packet::Publish(publish_from_wire(*p)),
        P::PublishAck { packet_id } => Packet::PubAck { packet_id, reason: 0 },
        P::PublishReceived { packet_id } => Packet::PubRec { packet_id, reason: 0 },
        P::PublishRelease { packet_id } => Packet::PubRel { packet_id, reason: 0 },
        P::PublishComplete { packet_id } => Packet::PubComp { packet_id, reason: 0 },
        P::Subscribe { packet_id, topic_filters } => Packet::Subscribe {
            packet_id,
            filters: topic_filters.into_iter().map(|(f, q)| (text(f), qos_from_wire(q))).collect(),
        },
        P::SubscribeAck { packet_id, status } => Packet::SubAck {
            packet_id,
            results: status
                .into_iter()
                .map(|s| match s {
                    v3::SubscribeReturnCode::Success(q) => SubAckResult::Granted(qos_from_wire(q)),
                    v3::SubscribeReturnCode::Failure => SubAckResult::Failure,
                })
                .collect(),
        },
        P::Unsubscribe { packet_id, topic_filters } => {
            Packet::Unsubscribe { packet_id, filters: topic_filters.into_iter().map(text).collect() }
        }
        P::UnsubscribeAck { packet_id } => Packet::UnsubAck { packet_id, reasons: Vec::new() },
        P::PingRequest => Packet::PingReq,
        P::PingResponse => Packet::PingResp,
        P::Disconnect => Packet::Disconnect(Disconnect::new(DisconnectReason::Normal)),
    })
}

fn to_v3(packet: Packet, version: Version) -> Result<v3::Packet, MqttError> {
    use v3::Packet as P;
    Ok(match packet {
        Packet::Connect(c) => {
            let c = *c;
            let level = if version == Version::V3_1 {
                rmqtt_codec::types::MQTT_LEVEL_31
            } else {
                rmqtt_codec::types::MQTT_LEVEL_311
            };
            P::Connect(Box::new(v3::Connect {
                protocol: Protocol(level),
                clean_session: c.clean_start,
                keep_alive: c.keep_alive_s,
                last_will: c.will.map(|w| v3::LastWill {
                    qos: qos_to_wire(w.qos),
                    retain: w.retain,
                    topic: wire_text(w.topic),
                    message: w.payload,
                }),
                client_id: wire_text(c.client_id),
                username: c.username.map(wire_text),
                password: c.password,
                cert: None,
            }))
        }
        Packet::ConnAck(a) => {
            use v3::ConnectAckReason as R;
            let return_code = match a.code {
                ConnectCode::Accepted => R::ConnectionAccepted,
                ConnectCode::UnsupportedVersion => R::UnacceptableProtocolVersion,
                ConnectCode::IdentifierRejected => R::IdentifierRejected,
                ConnectCode::BadCredentials => R::BadUserNameOrPassword,
                ConnectCode::NotAuthorized | ConnectCode::Banned => R::NotAuthorized,
                ConnectCode::ServerUnavailable
                | ConnectCode::ServerBusy
                | ConnectCode::ConnectionRateExceeded
                | ConnectCode::PacketTooLarge
                | ConnectCode::MalformedPacket
                | ConnectCode::ProtocolError => R::ServiceUnavailable,
            };
            // MQTT-3.2.2-4: a refusal never reports a session.
            let session_present = a.session_present && a.code == ConnectCode::Accepted;
            P::ConnectAck(v3::ConnectAck { return_code, session_present })
        }
        Packet::Publish(p) => P::Publish(Box::new(publish_to_wire(p))),
        Packet::PubAck { packet_id, .. } => P::PublishAck { packet_id },
        Packet::PubRec { packet_id, .. } => P::PublishReceived { packet_id },
        Packet::PubRel { packet_id, .. } => P::PublishRelease { packet_id },
        Packet::PubComp { packet_id, .. } => P::PublishComplete { packet_id },
        Packet::Subscribe { packet_id, filters } => P::Subscribe {
            packet_id,
            topic_filters: filters.into_iter().map(|(f, q)| (wire_text(f), qos_to_wire(q))).collect(),
        },
        Packet::SubAck { packet_id, results } => P::SubscribeAck {
            packet_id,
            status: results
                .into_iter()
                .map(|r| match r {
                    SubAckResult::Granted(q) => v3::SubscribeReturnCode::Success(qos_to_wire(q)),
                    _ => v3::SubscribeReturnCode::Failure,
                })
                .collect(),
        },
        Packet::Unsubscribe { packet_id, filters } => {
            P::Unsubscribe { packet_id, topic_filters: filters.into_iter().map(wire_text).collect() }
        }
        Packet::UnsubAck { packet_id, .. } => P::UnsubscribeAck { packet_id },
        Packet::PingReq => P::PingRequest,
        Packet::PingResp => P::PingResponse,
        Packet::Disconnect(_) => P::Disconnect,
        Packet::Auth { .. } => return Err(encode_err("AUTH does not exist in MQTT 3.1.x")),
    })
}

fn publish_from_wire(p: rmqtt_codec::types::Publish) -> Publish {
    Publish {
        dup: p.dup,
        qos: qos_from_wire(p.qos),
        retain: p.retain,
        topic: text(p.topic),
        packet_id: p.packet_id,
        payload: p.payload,
    }
}

fn publish_to_wire(p: Publish) -> rmqtt_codec::types::Publish {
    rmqtt_codec::types::Publish {
        dup: p.dup,
        retain: p.retain,
        qos: qos_to_wire(p.qos),
        topic: wire_text(p.topic),
        packet_id: p.packet_id,
        payload: p.payload,
        properties: None,
    }
}

// === 5.0 ===

fn from_v5(packet: v5::Packet) -> Result<Packet, MqttError> {
    use v5::Packet as P;
    Ok(match packet {
        P::Connect(c) => {
            let c = *c;
            Packet::Connect(Box::new(Connect {
                version: Version::V5,
                client_id: text(c.client_id),
                clean_start: c.clean_start,
                keep_alive_s: c.keep_alive,
                username: c.username.map(text),
                password: c.password,
                will: c.last_will.map(|w| Will {
                    topic: text(w.topic),
                    payload: w.message,
                    qos: qos_from_wire(w.qos),
                    retain: w.retain,
                }),
                session_expiry_s: c.session_expiry_interval_secs,
                receive_max: c.receive_max,
                max_packet_size: c.max_packet_size.map(NonZeroU32::get),
            }))
        }
        P::ConnectAck(a) => {
            use v5::ConnectAckReason as R;
            let code = match a.reason_code {
                R::Success => ConnectCode::Accepted,
                R::UnsupportedProtocolVersion => ConnectCode::UnsupportedVersion,
                R::ClientIdentifierNotValid => ConnectCode::IdentifierRejected,
                R::BadUserNameOrPassword | R::BadAuthenticationMethod => ConnectCode::BadCredentials,
                R::NotAuthorized => ConnectCode::NotAuthorized,
                R::ServerBusy => ConnectCode::ServerBusy,
                R::Banned => ConnectCode::Banned,
                R::ConnectionRateExceeded => ConnectCode::ConnectionRateExceeded,
                R::PacketTooLarge => ConnectCode::PacketTooLarge,
                R::MalformedPacket => ConnectCode::MalformedPacket,
                R::ProtocolError => ConnectCode::ProtocolError,
                _ => ConnectCode::ServerUnavailable,
            };
            Packet::ConnAck(ConnAck {
                session_present: a.session_present,
                code,
                server_keepalive_s: a.server_keepalive_sec,
                max_packet_size: a.max_packet_size,
                receive_max: Some(a.receive_max),
                session_expiry_s: a.session_expiry_interval_secs,
            })
        }
        P::Publish(p) => {
            let has_alias = p.properties.as_ref().is_some_and(|props| props.topic_alias.is_some());
            if has_alias {
                return Err(MqttError::TopicAlias);
            }
            Packet::Publish(publish_from_wire(*p))
        }
        P::PublishAck(a) => Packet::PubAck { packet_id: a.packet_id, reason: a.reason_code.into() },
        P::PublishReceived(a) => Packet::PubRec { packet_id: a.packet_id, reason: a.reason_code.into() },
        P::PublishRelease(a) => Packet::PubRel { packet_id: a.packet_id, reason: a.reason_code.into() },
        P::PublishComplete(a) => Packet::PubComp { packet_id: a.packet_id, reason: a.reason_code.into() },
        P::Subscribe(s) => Packet::Subscribe {
            packet_id: s.packet_id,
            filters: s.topic_filters.into_iter().map(|(f, o)| (text(f), qos_from_wire(o.qos))).collect(),
        },
        P::SubscribeAck(a) => Packet::SubAck {
            packet_id: a.packet_id,
            results: a
                .status
                .into_iter()
                .map(|s| {
                    use v5::SubscribeAckReason as R;
                    match s {
                        R::GrantedQos0 => SubAckResult::Granted(QoS::AtMostOnce),
                        R::GrantedQos1 => SubAckResult::Granted(QoS::AtLeastOnce),
                        R::GrantedQos2 => SubAckResult::Granted(QoS::ExactlyOnce),
                        R::NotAuthorized => SubAckResult::NotAuthorized,
                        R::TopicFilterInvalid => SubAckResult::TopicFilterInvalid,
                        R::QuotaExceeded => SubAckResult::QuotaExceeded,
                        _ => SubAckResult::Failure,
                    }
                })
                .collect(),
        },
        P::Unsubscribe(u) => {
            Packet::Unsubscribe { packet_id: u.packet_id, filters: u.topic_filters.into_iter().map(text).collect() }
        }
        P::UnsubscribeAck(a) => {
            Packet::UnsubAck { packet_id: a.packet_id, reasons: a.status.into_iter().map(u8::from).collect() }
        }
        P::PingRequest => Packet::PingReq,
        P::PingResponse => Packet::PingResp,
        P::Disconnect(d) => Packet::Disconnect(Disconnect {
            reason: reason_from_wire(d.reason_code.into()),
            server_reference: d.server_reference.map(text),
            session_expiry_s: d.session_expiry_interval_secs,
        }),
        P::Auth(a) => Packet::Auth { reason: a.reason_code.into() },
    })
}

fn wire_reason<T: TryFrom<u8>>(code: u8) -> Result<T, MqttError> {
    T::try_from(code).map_err(|_| MqttError::Encode { detail: format!("reason code {code:#04x} not valid here") })
}

fn to_v5(packet: Packet) -> Result<v5::Packet, MqttError> {
    use v5::Packet as P;
    Ok(match packet {
        Packet::Connect(c) => {
            let c = *c;
            P::Connect(Box::new(v5::Connect {
                clean_start: c.clean_start,
                keep_alive: c.keep_alive_s,
                session_expiry_interval_secs: c.session_expiry_s,
                receive_max: c.receive_max,
                max_packet_size: c.max_packet_size.and_then(NonZeroU32::new),
                last_will: c.will.map(|w| v5::LastWill {
                    qos: qos_to_wire(w.qos),
                    retain: w.retain,
                    topic: wire_text(w.topic),
                    message: w.payload,
                    will_delay_interval_sec: None,
                    correlation_data: None,
                    message_expiry_interval: None,
                    content_type: None,
                    user_properties: Vec::new(),
                    is_utf8_payload: None,
                    response_topic: None,
                }),
                client_id: wire_text(c.client_id),
                username: c.username.map(wire_text),
                password: c.password,
                ..v5::Connect::default()
            }))
        }
        Packet::ConnAck(a) => {
            use v5::ConnectAckReason as R;
            let reason_code = match a.code {
                ConnectCode::Accepted => R::Success,
                ConnectCode::UnsupportedVersion => R::UnsupportedProtocolVersion,
                ConnectCode::IdentifierRejected => R::ClientIdentifierNotValid,
                ConnectCode::ServerUnavailable => R::ServerUnavailable,
                ConnectCode::BadCredentials => R::BadUserNameOrPassword,
                ConnectCode::NotAuthorized => R::NotAuthorized,
                ConnectCode::ServerBusy => R::ServerBusy,
                ConnectCode::Banned => R::Banned,
                ConnectCode::ConnectionRateExceeded => R::ConnectionRateExceeded,
                ConnectCode::PacketTooLarge => R::PacketTooLarge,
                ConnectCode::MalformedPacket => R::MalformedPacket,
                ConnectCode::ProtocolError => R::ProtocolError,
            };
            P::ConnectAck(Box::new(v5::ConnectAck {
                session_present: a.session_present && a.code == ConnectCode::Accepted,
                reason_code,
                session_expiry_interval_secs: a.session_expiry_s,
                receive_max: a.receive_max.unwrap_or(NonZeroU16::MAX),
                // What the gateway offers a vehicle: QoS 1 at most, no retained messages, no
                // topic aliases, no shared subscriptions, no subscription identifiers.
                max_qos: WireQoS::AtLeastOnce,
                max_packet_size: a.max_packet_size,
                topic_alias_max: 0,
                retain_available: false,
                wildcard_subscription_available: true,
                subscription_identifiers_available: false,
                shared_subscription_available: false,
                server_keepalive_sec: a.server_keepalive_s,
                ..v5::ConnectAck::default()
            }))
        }
        Packet::Publish(p) => P::Publish(Box::new(publish_to_wire(p))),
        Packet::PubAck { packet_id, reason } => {
            P::PublishAck(v5::PublishAck { packet_id, reason_code: wire_reason(reason)?, ..v5::PublishAck::default() })
        }
        Packet::PubRec { packet_id, reason } => P::PublishReceived(v5::PublishAck {
            packet_id,
            reason_code: wire_reason(reason)?,
            ..v5::PublishAck::default()
        }),
        Packet::PubRel { packet_id, reason } => P::PublishRelease(v5::PublishAck2 {
            packet_id,
            reason_code: wire_reason(reason)?,
            ..v5::PublishAck2::default()
        }),
        Packet::PubComp { packet_id, reason } => P::PublishComplete(v5::PublishAck2 {
            packet_id,
            reason_code: wire_reason(reason)?,
            ..v5::PublishAck2::default()
        }),
        Packet::Subscribe { packet_id, filters } => P::Subscribe(v5::Subscribe {
            packet_id,
            id: None,
            user_properties: Vec::new(),
            topic_filters: filters
                .into_iter()
                .map(|(f, q)| (wire_text(f), v5::SubscriptionOptions { qos: qos_to_wire(q), ..Default::default() }))
                .collect(),
        }),
        Packet::SubAck { packet_id, results } => P::SubscribeAck(v5::SubscribeAck {
            packet_id,
            properties: Vec::new(),
            reason_string: None,
            status: results
                .into_iter()
                .map(|r| {
                    use v5::SubscribeAckReason as R;
                    match r {
                        SubAckResult::Granted(QoS::AtMostOnce) => R::GrantedQos0,
                        SubAckResult::Granted(QoS::AtLeastOnce) => R::GrantedQos1,
                        SubAckResult::Granted(QoS::ExactlyOnce) => R::GrantedQos2,
                        SubAckResult::NotAuthorized => R::NotAuthorized,
                        SubAckResult::TopicFilterInvalid => R::TopicFilterInvalid,
                        SubAckResult::QuotaExceeded => R::QuotaExceeded,
                        SubAckResult::Failure => R::UnspecifiedError,
                    }
                })
                .collect(),
        }),
        Packet::Unsubscribe { packet_id, filters } => P::Unsubscribe(v5::Unsubscribe {
            packet_id,
            user_properties: Vec::new(),
            topic_filters: filters.into_iter().map(wire_text).collect(),
        }),
        Packet::UnsubAck { packet_id, reasons } => P::UnsubscribeAck(v5::UnsubscribeAck {
            packet_id,
            properties: Vec::new(),
            reason_string: None,
            status: reasons.into_iter().map(wire_reason).collect::<Result<_, _>>()?,
        }),
        Packet::PingReq => P::PingRequest,
        Packet::PingResp => P::PingResponse,
        Packet::Disconnect(d) => P::Disconnect(v5::Disconnect {
            reason_code: wire_reason(reason_to_wire(d.reason))?,
            session_expiry_interval_secs: d.session_expiry_s,
            server_reference: d.server_reference.map(wire_text),
            ..v5::Disconnect::default()
        }),
        Packet::Auth { reason } => P::Auth(v5::Auth { reason_code: wire_reason(reason)?, ..v5::Auth::default() }),
    })
}

const DISCONNECT_CODES: &[(DisconnectReason, u8)] = &[
    (DisconnectReason::Normal, 0x00),
    (DisconnectReason::Unspecified, 0x80),
    (DisconnectReason::MalformedPacket, 0x81),
    (DisconnectReason::ProtocolError, 0x82),
    (DisconnectReason::NotAuthorized, 0x87),
    (DisconnectReason::ServerBusy, 0x89),
    (DisconnectReason::ServerShuttingDown, 0x8B),
    (DisconnectReason::KeepAliveTimeout, 0x8D),
    (DisconnectReason::SessionTakenOver, 0x8E),
    (DisconnectReason::TopicNameInvalid, 0x90),
    (DisconnectReason::ReceiveMaximumExceeded, 0x93),
    (DisconnectReason::PacketTooLarge, 0x95),
    (DisconnectReason::QuotaExceeded, 0x97),
    (DisconnectReason::QosNotSupported, 0x9B),
    (DisconnectReason::UseAnotherServer, 0x9C),
    (DisconnectReason::ServerMoved, 0x9D),
    (DisconnectReason::ConnectionRateExceeded, 0x9F),
];

fn reason_from_wire(code: u8) -> DisconnectReason {
    DISCONNECT_CODES.iter().find(|(_, c)| *c == code).map_or(DisconnectReason::Other(code), |(r, _)| *r)
}

fn reason_to_wire(reason: DisconnectReason) -> u8 {
    match reason {
        DisconnectReason::Other(code) => code,
        named => DISCONNECT_CODES.iter().find(|(r, _)| *r == named).map_or(0x80, |(_, c)| *c),
    }
}
