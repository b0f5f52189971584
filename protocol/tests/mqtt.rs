//! The MQTT codec: round trips in 3.1.1 and 5.0, and every check the wire crate leaves to the
//! server (protocol/README.md lists them), each a test that fails if the check is removed.

use std::num::NonZeroU16;

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use protocol::mqtt::{
    ConnAck, Connect, ConnectCode, Disconnect, DisconnectReason, Limits, MqttCodec, MqttError, Packet, Publish, QoS,
    SubAckResult, Version, Will,
};
use tokio_util::codec::{Decoder, Encoder};

fn pid(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).expect("non-zero")
}

fn decode_one(codec: &mut MqttCodec, bytes: &[u8]) -> Result<Option<Packet>, MqttError> {
    let mut buf = BytesMut::from(bytes);
    codec.decode(&mut buf)
}

fn encode_with(codec: &mut MqttCodec, packet: Packet) -> BytesMut {
    let mut buf = BytesMut::new();
    codec.encode(packet, &mut buf).expect("encodable");
    buf
}

fn connect(version: Version) -> Connect {
    Connect {
        version,
        client_id: "LSVAU2180N2183294".into(),
        clean_start: true,
        keep_alive_s: 60,
        username: Some("LSVAU2180N2183294".into()),
        password: Some(Bytes::from_static(b"token")),
        will: None,
        session_expiry_s: 0,
        receive_max: None,
        max_packet_size: None,
    }
}

/// A server codec that has seen `connect` (encoded by a client-side codec).
fn connected_server(version: Version) -> MqttCodec {
    let mut client = MqttCodec::connected(version, Limits::default());
    let wire = encode_with(&mut client, Packet::Connect(Box::new(connect(version))));
    let mut server = MqttCodec::server(Limits::default());
    let got = decode_one(&mut server, &wire).expect("connect decodes").expect("whole");
    assert!(matches!(got, Packet::Connect(_)));
    server
}

// === round trips ===

fn topic_name() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-zA-Z0-9_/ -]{1,40}").expect("regex")
}

fn topic_filter() -> impl Strategy<Value = String> {
    prop_oneof![
        topic_name(),
        topic_name().prop_map(|t| format!("{t}/#")),
        topic_name().prop_map(|t| format!("+/{t}")),
        Just("#".to_owned()),
    ]
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}

fn publish() -> impl Strategy<Value = Publish> {
    (any::<bool>(), qos(), any::<bool>(), topic_name(), 1u16.., proptest::collection::vec(any::<u8>(), 0..200))
        .prop_map(|(dup, qos, retain, topic, id, payload)| Publish {
            dup,
            qos,
            retain,
            topic,
            packet_id: (qos != QoS::AtMostOnce).then(|| pid(id)),
            payload: Bytes::from(payload),
        })
}

fn connect_packet(version: Version) -> impl Strategy<Value = Packet> {
    (
        "[A-Za-z0-9]{1,23}",
        any::<bool>(),
        any::<u16>(),
        proptest::option::of("[a-z]{1,10}"),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
        proptest::option::of((topic_name(), qos(), any::<bool>())),
        any::<u32>(),
        proptest::option::of(1u16..),
        proptest::option::of(1u32..),
    )
        .prop_map(move |(client_id, clean, keep_alive_s, username, password, will, expiry, rmax, mps)| {
            let v5 = version == Version::V5;
            // 3.1.x cannot carry a password without a user name.
            let password = if username.is_some() || v5 { password.map(Bytes::from) } else { None };
            Packet::Connect(Box::new(Connect {
                version,
                client_id,
                clean_start: clean,
                keep_alive_s,
                username,
                password,
                will: will.map(|(topic, qos, retain)| Will { topic, payload: Bytes::from_static(b"bye"), qos, retain }),
                session_expiry_s: if v5 {
                    expiry
                } else if clean {
                    0
                } else {
                    u32::MAX
                },
                receive_max: if v5 { rmax.map(pid) } else { None },
                max_packet_size: if v5 { mps } else { None },
            }))
        })
}

const V5_PUBACK_REASONS: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const V5_PUBREL_REASONS: &[u8] = &[0x00, 0x92];

/// Packets a client sends to a server.
fn server_bound(version: Version) -> impl Strategy<Value = Packet> {
    let v5 = version == Version::V5;
    let ack_reason = if v5 { proptest::sample::select(V5_PUBACK_REASONS).boxed() } else { Just(0u8).boxed() };
    let rel_reason = if v5 { proptest::sample::select(V5_PUBREL_REASONS).boxed() } else { Just(0u8).boxed() };
    prop_oneof![
        publish().prop_map(Packet::Publish),
        (1u16.., ack_reason.clone()).prop_map(|(id, reason)| Packet::PubAck { packet_id: pid(id), reason }),
        (1u16.., ack_reason).prop_map(|(id, reason)| Packet::PubRec { packet_id: pid(id), reason }),
        (1u16.., rel_reason.clone()).prop_map(|(id, reason)| Packet::PubRel { packet_id: pid(id), reason }),
        (1u16.., rel_reason).prop_map(|(id, reason)| Packet::PubComp { packet_id: pid(id), reason }),
        (1u16.., proptest::collection::vec((topic_filter(), qos()), 1..5))
            .prop_map(|(id, filters)| Packet::Subscribe { packet_id: pid(id), filters }),
        (1u16.., proptest::collection::vec(topic_filter(), 1..5))
            .prop_map(|(id, filters)| Packet::Unsubscribe { packet_id: pid(id), filters }),
        Just(Packet::PingReq),
        Just(Packet::Disconnect(Disconnect::new(DisconnectReason::Normal))),
    ]
}

/// Packets a server sends to a client.
fn client_bound(version: Version) -> impl Strategy<Value = Packet> {
    let v5 = version == Version::V5;
    let codes: &'static [ConnectCode] = if v5 {
        &[
            ConnectCode::Accepted,
            ConnectCode::UnsupportedVersion,
            ConnectCode::IdentifierRejected,
            ConnectCode::ServerUnavailable,
            ConnectCode::BadCredentials,
            ConnectCode::NotAuthorized,
            ConnectCode::ServerBusy,
            ConnectCode::Banned,
            ConnectCode::ConnectionRateExceeded,
            ConnectCode::PacketTooLarge,
        ]
    } else {
        &[
            ConnectCode::Accepted,
            ConnectCode::UnsupportedVersion,
            ConnectCode::IdentifierRejected,
            ConnectCode::ServerUnavailable,
            ConnectCode::BadCredentials,
            ConnectCode::NotAuthorized,
        ]
    };
    let sub_results: &'static [SubAckResult] = if v5 {
        &[
            SubAckResult::Granted(QoS::AtMostOnce),
            SubAckResult::Granted(QoS::AtLeastOnce),
            SubAckResult::NotAuthorized,
            SubAckResult::TopicFilterInvalid,
            SubAckResult::QuotaExceeded,
        ]
    } else {
        &[SubAckResult::Granted(QoS::AtMostOnce), SubAckResult::Granted(QoS::AtLeastOnce), SubAckResult::Failure]
    };
    let disconnect: &'static [DisconnectReason] = if v5 {
        &[DisconnectReason::SessionTakenOver, DisconnectReason::ServerShuttingDown, DisconnectReason::KeepAliveTimeout]
    } else {
        &[DisconnectReason::Normal]
    };
    prop_oneof![
        (proptest::sample::select(codes), any::<bool>(), proptest::option::of(any::<u16>()), 1u16..).prop_map(
            move |(code, present, keepalive, rmax)| {
                let session_present = present && code == ConnectCode::Accepted;
                let mut ack = ConnAck::new(code, session_present);
                if v5 {
                    ack.server_keepalive_s = keepalive;
                    ack.receive_max = Some(pid(rmax));
                    ack.max_packet_size = Some(16 * 1024);
                }
                Packet::ConnAck(ack)
            }
        ),
        publish().prop_map(Packet::Publish),
        (1u16..).prop_map(|id| Packet::PubAck { packet_id: pid(id), reason: 0 }),
        (1u16.., proptest::collection::vec(proptest::sample::select(sub_results), 1..5))
            .prop_map(|(id, results)| Packet::SubAck { packet_id: pid(id), results }),
        (1u16.., 1usize..4).prop_map(move |(id, n)| Packet::UnsubAck {
            packet_id: pid(id),
            reasons: if v5 { vec![0; n] } else { Vec::new() },
        }),
        Just(Packet::PingResp),
        proptest::sample::select(disconnect).prop_map(|r| Packet::Disconnect(Disconnect::new(r))),
    ]
}

fn round_trip(encoder: &mut MqttCodec, decoder: &mut MqttCodec, packet: Packet) -> Result<(), TestCaseError> {
    let mut wire = encode_with(encoder, packet.clone());
    wire.put_slice(b"\xC0"); // the first byte of a following PINGREQ stays in the buffer
    let decoded = decoder.decode(&mut wire).expect("decodes");
    prop_assert_eq!(decoded, Some(packet));
    prop_assert_eq!(&wire[..], b"\xC0");
    Ok(())
}

proptest! {
    #[test]
    fn connect_round_trips((v, packet) in prop_oneof![Just(Version::V3_1_1), Just(Version::V5)]
        .prop_flat_map(|v| connect_packet(v).prop_map(move |p| (v, p)))) {
        let mut client = MqttCodec::connected(v, Limits::default());
        let mut server = MqttCodec::server(Limits::default());
        round_trip(&mut client, &mut server, packet)?;
        prop_assert_eq!(server.version(), Some(v));
    }

    #[test]
    fn v311_server_bound_round_trips(p in server_bound(Version::V3_1_1)) {
        let mut client = MqttCodec::connected(Version::V3_1_1, Limits::default());
        round_trip(&mut client, &mut connected_server(Version::V3_1_1), p)?;
    }

    #[test]
    fn v5_server_bound_round_trips(p in server_bound(Version::V5)) {
        let mut client = MqttCodec::connected(Version::V5, Limits::default());
        round_trip(&mut client, &mut connected_server(Version::V5), p)?;
    }

    #[test]
    fn v311_client_bound_round_trips(p in client_bound(Version::V3_1_1)) {
        let mut client = MqttCodec::connected(Version::V3_1_1, Limits::default());
        round_trip(&mut connected_server(Version::V3_1_1), &mut client, p)?;
    }

    #[test]
    fn v5_client_bound_round_trips(p in client_bound(Version::V5)) {
        let mut client = MqttCodec::connected(Version::V5, Limits::default());
        round_trip(&mut connected_server(Version::V5), &mut client, p)?;
    }

    #[test]
    fn every_split_point_decodes_the_same(p in server_bound(Version::V5)) {
        let mut client = MqttCodec::connected(Version::V5, Limits::default());
        let wire = encode_with(&mut client, p.clone());
        for split in 0..wire.len() {
            let mut server = connected_server(Version::V5);
            let mut buf = BytesMut::from(&wire[..split]);
            prop_assert_eq!(server.decode(&mut buf).expect("partial is fine"), None);
            buf.extend_from_slice(&wire[split..]);
            prop_assert_eq!(server.decode(&mut buf).expect("whole"), Some(p.clone()));
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        for mut codec in [MqttCodec::server(Limits::default()), connected_server(Version::V3_1_1), connected_server(Version::V5)] {
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..bytes.len() + 1 {
                match codec.decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}

// === the checks a server must make itself ===

#[test]
fn hostile_size_before_connect_is_refused_without_reserving_it() {
    // CONNECT claiming 268,435,455 bytes.
    let mut buf = BytesMut::from(&b"\x10\xFF\xFF\xFF\x7F\x00\x04MQTT\x04\x02\x00\x3c"[..]);
    let mut server = MqttCodec::server(Limits::default());
    let err = server.decode(&mut buf).expect_err("too large");
    assert!(matches!(err, MqttError::TooLarge { size: 268_435_455, max: 2048 }), "{err:?}");
    assert_eq!(err.label(), "too_large");
    assert!(buf.capacity() < 4096, "capacity {} was reserved", buf.capacity());
}

#[test]
fn session_limit_applies_after_connect() {
    let limits = Limits { connect_max_bytes: 2048, max_packet_bytes: 100 };
    let mut client = MqttCodec::connected(Version::V3_1_1, limits);
    let mut server = MqttCodec::server(limits);
    let wire = encode_with(&mut client, Packet::Connect(Box::new(connect(Version::V3_1_1))));
    decode_one(&mut server, &wire).expect("connect").expect("whole");
    let big = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "t".into(),
        packet_id: None,
        payload: Bytes::from(vec![0u8; 200]),
    });
    let wire = encode_with(&mut client, big);
    assert!(matches!(decode_one(&mut server, &wire), Err(MqttError::TooLarge { max: 100, .. })));
}

fn v311_publish(topic: &[u8]) -> Vec<u8> {
    let mut p =
        vec![0x30, u8::try_from(2 + topic.len() + 2).expect("small"), 0, u8::try_from(topic.len()).expect("small")];
    p.extend_from_slice(topic);
    p.extend_from_slice(b"hi");
    p
}

#[test]
fn wildcards_in_publish_topics_are_refused() {
    for topic in [&b"a/+"[..], b"a/#", b"+", b"#", b"a+b"] {
        let mut server = connected_server(Version::V3_1_1);
        let err = decode_one(&mut server, &v311_publish(topic)).expect_err("wildcard topic");
        assert!(matches!(err, MqttError::InvalidTopic(_)), "{err:?}");
        assert_eq!(err.label(), "invalid_topic");
    }
    let mut server = connected_server(Version::V3_1_1);
    assert!(decode_one(&mut server, &v311_publish(b"a/b")).expect("plain topic").is_some());
}

#[test]
fn nul_in_strings_is_refused() {
    let mut server = connected_server(Version::V3_1_1);
    let err = decode_one(&mut server, &v311_publish(b"a\0b")).expect_err("nul");
    assert!(matches!(err, MqttError::NulInString { field: "topic" }), "{err:?}");

    // CONNECT with client id "a\0".
    let connect = b"\x10\x0E\x00\x04MQTT\x04\x02\x00\x3c\x00\x02a\x00";
    let err = decode_one(&mut MqttCodec::server(Limits::default()), connect).expect_err("nul client id");
    assert!(matches!(err, MqttError::NulInString { field: "client_id" }), "{err:?}");
}

fn v311_subscribe(filter: &[u8]) -> Vec<u8> {
    let len = 2 + 2 + filter.len() + 1;
    let mut p = vec![0x82, u8::try_from(len).expect("small"), 0, 1, 0, u8::try_from(filter.len()).expect("small")];
    p.extend_from_slice(filter);
    p.push(1);
    p
}

#[test]
fn invalid_filters_are_refused() {
    for filter in [&b"a/#/b"[..], b"a+", b"a/b#", b"#/a", b"a/+b"] {
        let mut server = connected_server(Version::V3_1_1);
        let err = decode_one(&mut server, &v311_subscribe(filter)).expect_err("bad filter");
        assert!(matches!(err, MqttError::InvalidFilter(_)), "{filter:?}: {err:?}");
    }
    let mut server = connected_server(Version::V3_1_1);
    let ok = decode_one(&mut server, &v311_subscribe(b"vehicles/+/down/#")).expect("valid filter");
    assert!(matches!(ok, Some(Packet::Subscribe { .. })));
}

#[test]
fn password_without_username_is_refused_in_311_only() {
    // Flags 0x42: password + clean session, no user name.
    let v311 = b"\x10\x13\x00\x04MQTT\x04\x42\x00\x3c\x00\x01c\x00\x04pass";
    let err = decode_one(&mut MqttCodec::server(Limits::default()), v311).expect_err("refused");
    assert!(matches!(err, MqttError::PasswordWithoutUsername), "{err:?}");

    let v5 = b"\x10\x14\x00\x04MQTT\x05\x42\x00\x3c\x00\x00\x01c\x00\x04pass";
    let ok = decode_one(&mut MqttCodec::server(Limits::default()), v5).expect("5.0 allows it");
    assert!(matches!(ok, Some(Packet::Connect(c)) if c.username.is_none() && c.password.is_some()));
}

#[test]
fn plain_disconnect_decodes_in_both_versions() {
    for v in [Version::V3_1_1, Version::V5] {
        let mut server = connected_server(v);
        let got = decode_one(&mut server, b"\xE0\x00").expect("E0 00 is a valid DISCONNECT");
        assert_eq!(got, Some(Packet::Disconnect(Disconnect::new(DisconnectReason::Normal))));
    }
}

#[test]
fn auth_decodes_in_v5() {
    let mut server = connected_server(Version::V5);
    // AUTH, reason 0x18 continue authentication, no properties.
    let got = decode_one(&mut server, b"\xF0\x02\x18\x00").expect("AUTH decodes");
    assert_eq!(got, Some(Packet::Auth { reason: 0x18 }));
}

#[test]
fn first_packet_must_be_connect() {
    let err = decode_one(&mut MqttCodec::server(Limits::default()), b"\xC0\x00").expect_err("PINGREQ first");
    assert!(matches!(err, MqttError::FirstPacketNotConnect), "{err:?}");
}

#[test]
fn second_connect_is_refused() {
    let mut server = connected_server(Version::V3_1_1);
    let mut client = MqttCodec::connected(Version::V3_1_1, Limits::default());
    let wire = encode_with(&mut client, Packet::Connect(Box::new(connect(Version::V3_1_1))));
    assert!(matches!(decode_one(&mut server, &wire), Err(MqttError::SecondConnect)));
}

#[test]
fn mqtt_3_1_connect_is_recognised() {
    // The wire crate's encoder writes level 4 after "MQIsdp", so 3.1 is checked from bytes:
    // protocol name "MQIsdp", level 3, clean session, keep-alive 60, client id "c".
    let connect = b"\x10\x0F\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x01c";
    let mut server = MqttCodec::server(Limits::default());
    let got = decode_one(&mut server, connect).expect("3.1 connect").expect("whole");
    assert!(matches!(got, Packet::Connect(c) if c.version == Version::V3_1 && c.client_id == "c"));
    assert_eq!(server.version(), Some(Version::V3_1));
}

#[test]
fn unknown_protocol_level_is_refused() {
    let connect = b"\x10\x0D\x00\x04MQTT\x06\x02\x00\x3c\x00\x01c";
    let err = decode_one(&mut MqttCodec::server(Limits::default()), connect).expect_err("level 6");
    assert!(matches!(err, MqttError::UnsupportedProtocol), "{err:?}");
}

#[test]
fn topic_alias_is_refused_in_v5() {
    let mut server = connected_server(Version::V5);
    // PUBLISH QoS 0, topic "t", properties: topic alias (0x23) = 1.
    let got = decode_one(&mut server, b"\x30\x08\x00\x01t\x03\x23\x00\x01X");
    assert!(matches!(got, Err(MqttError::TopicAlias)), "{got:?}");
}

#[test]
fn empty_subscribe_is_refused() {
    let mut server = connected_server(Version::V3_1_1);
    assert!(decode_one(&mut server, b"\x82\x02\x00\x01").is_err());
}

#[test]
fn v311_connack_downgrades_v5_only_codes() {
    let mut server = connected_server(Version::V3_1_1);
    let wire = encode_with(&mut server, Packet::ConnAck(ConnAck::new(ConnectCode::ServerBusy, true)));
    // Return code 3 (server unavailable), and no session on a refusal.
    assert_eq!(&wire[..], b"\x20\x02\x00\x03");
}

#[test]
fn v5_connack_advertises_what_the_gateway_offers() {
    let mut server = connected_server(Version::V5);
    let wire = encode_with(&mut server, Packet::ConnAck(ConnAck::new(ConnectCode::Accepted, false)));
    let mut client = MqttCodec::connected(Version::V5, Limits::default());
    let mut buf = wire.clone();
    assert!(matches!(client.decode(&mut buf), Ok(Some(Packet::ConnAck(_)))));
    // Maximum QoS (0x24) = 1, retain available (0x25) = 0, shared subscriptions (0x2A) = 0.
    let props = &wire[..];
    assert!(props.windows(2).any(|w| w == [0x24, 0x01]));
    assert!(props.windows(2).any(|w| w == [0x25, 0x00]));
    assert!(props.windows(2).any(|w| w == [0x2A, 0x00]));
}

#[test]
fn auth_cannot_be_encoded_for_311() {
    let mut server = connected_server(Version::V3_1_1);
    let mut buf = BytesMut::new();
    assert!(server.encode(Packet::Auth { reason: 0 }, &mut buf).is_err());
}

#[test]
fn password_is_not_printed() {
    let text = format!("{:?}", connect(Version::V3_1_1));
    assert!(!text.contains("token"), "{text}");
    assert!(text.contains("***"));
}

// === bytes from a client nobody here wrote ===

/// Every packet of a byte stream captured from a real client, decoded by a server codec.
fn decode_stream(bytes: &[u8]) -> Vec<Packet> {
    let mut server = MqttCodec::server(Limits::default());
    let mut buf = BytesMut::from(bytes);
    let mut packets = Vec::new();
    while let Some(p) = server.decode(&mut buf).expect("real client bytes decode") {
        packets.push(p);
    }
    assert!(buf.is_empty());
    packets
}

const VIN: &str = "LSVAU2180N2183294";

#[test]
fn mosquitto_pub_captures_decode() {
    // Captured from Debian's mosquitto_pub 2.0 (`-q 1`), kept as fuzz seeds.
    for (bytes, version, kind) in [
        (&include_bytes!("../fuzz/seeds/mqtt_packet/mosquitto_pub_v311_qos1")[..], Version::V3_1_1, "ota_status"),
        (&include_bytes!("../fuzz/seeds/mqtt_packet/mosquitto_pub_v5_qos1")[..], Version::V5, "qr_request"),
    ] {
        let packets = decode_stream(bytes);
        let [Packet::Connect(c), Packet::Publish(p), Packet::Disconnect(_)] = &packets[..] else {
            panic!("unexpected packets {packets:?}");
        };
        assert_eq!(c.version, version);
        assert_eq!(c.client_id, VIN);
        assert_eq!(c.username.as_deref(), Some(VIN));
        assert_eq!(c.password.as_deref(), Some(&b"tok"[..]));
        assert_eq!(p.topic, format!("vehicles/{VIN}/up/{kind}"));
        assert_eq!(p.qos, QoS::AtLeastOnce);
        assert!(p.packet_id.is_some());
        assert!(serde_json::from_slice::<serde_json::Value>(&p.payload).is_ok());
    }
}

#[test]
fn mosquitto_sub_captures_decode() {
    for (bytes, version) in [
        (&include_bytes!("../fuzz/seeds/mqtt_packet/mosquitto_sub_v311")[..], Version::V3_1_1),
        (&include_bytes!("../fuzz/seeds/mqtt_packet/mosquitto_sub_v5")[..], Version::V5),
    ] {
        let packets = decode_stream(bytes);
        let Some(Packet::Connect(c)) = packets.first() else { panic!("CONNECT first: {packets:?}") };
        assert_eq!(c.version, version);
        assert!(c.session_expiry_s > 0, "persistent session requested");
        let subscribed = packets.iter().any(|p| {
            matches!(p, Packet::Subscribe { filters, .. }
                if filters == &vec![(format!("vehicles/{VIN}/down/#"), QoS::AtLeastOnce)])
        });
        assert!(subscribed, "{packets:?}");
    }
}
