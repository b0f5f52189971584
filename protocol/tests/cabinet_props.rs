//! Property tests of the cabinet codec: every message round-trips; a frame split at every byte
//! boundary decodes the same; trailing bytes stay in the buffer; corrupted or random bytes are
//! refused without a panic and never decode as the original frame.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use protocol::cabinet::{
    self, Command, CommandAction, CommandResult, CommandStatus, DoorEvent, DoorState, DoorStatus, ErrorCode,
    ErrorMessage, Flags, Frame, FrameError, Heartbeat, HeartbeatAck, LaneWeight, Login, LoginResult, LoginStatus,
    MAX_PAYLOAD_LEN, Message, Notice, NoticeKind, WeightReport,
};
use protocol::{DeviceId, OrderId};

fn id_string(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[A-Za-z0-9._-]{{1,{max}}}")).expect("regex")
}

fn device_id() -> impl Strategy<Value = DeviceId> {
    id_string(64).prop_map(|s| DeviceId::new(s).expect("generated valid"))
}

fn order_id() -> impl Strategy<Value = OrderId> {
    id_string(64).prop_map(|s| OrderId::new(s).expect("generated valid"))
}

fn text(max: usize) -> impl Strategy<Value = String> {
    // Any UTF-8, trimmed to at most `max` bytes on a character boundary.
    any::<String>().prop_map(move |s| {
        let mut end = s.len().min(max);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s[..end].to_owned()
    })
}

fn pick<T: Copy + std::fmt::Debug + 'static>(all: &'static [T]) -> impl Strategy<Value = T> {
    proptest::sample::select(all)
}

fn lane() -> impl Strategy<Value = LaneWeight> {
    (1u8..=255, cabinet::MIN_GRAMS..=cabinet::MAX_GRAMS, any::<bool>())
        .prop_map(|(lane_id, grams, stable)| LaneWeight { lane_id, grams, stable })
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (device_id(), proptest::string::string_regex("[ -~]{0,32}").expect("regex"), any::<u64>(), any::<[u8; 32]>())
            .prop_map(|(id, fw, t, secret)| Message::Login(Login::sign(id, fw, t, &secret).expect("valid"))),
        any::<u64>().prop_map(|t| Message::Heartbeat(Heartbeat { device_time_ms: t })),
        (1u8..=255, any::<u64>(), proptest::collection::vec(lane(), 1..=64)).prop_map(|(door_id, t, lanes)| {
            Message::WeightReport(WeightReport { door_id, sample_time_ms: t, lanes })
        }),
        (1u8..=255, pick(DoorState::ALL), any::<u64>(), proptest::option::of(order_id())).prop_map(
            |(door_id, state, t, order_id)| Message::DoorEvent(DoorEvent {
                door_id,
                state,
                event_time_ms: t,
                order_id
            })
        ),
        (pick(CommandStatus::ALL), any::<u8>(), pick(DoorStatus::ALL)).prop_map(|(status, door_id, door_state)| {
            Message::CommandResult(CommandResult { status, door_id, door_state })
        }),
        (pick(LoginStatus::ALL), any::<u64>(), any::<u16>(), any::<u16>()).prop_map(|(status, t, hb, retry)| {
            Message::LoginResult(LoginResult {
                status,
                server_time_ms: t,
                heartbeat_interval_s: hb,
                retry_after_s: retry,
            })
        }),
        any::<u64>().prop_map(|t| Message::HeartbeatAck(HeartbeatAck { server_time_ms: t })),
        Just(Message::Ack),
        (any::<u64>(), command_action())
            .prop_map(|(expires_at_ms, action)| Message::Command(Command { expires_at_ms, action })),
        (pick(NoticeKind::ALL), any::<u32>(), any::<u16>(), text(255), text(255)).prop_map(
            |(kind, delay_ms, port, host, text)| Message::Notice(Notice { kind, delay_ms, port, host, text })
        ),
        (pick(ErrorCode::ALL), text(255)).prop_map(|(code, detail)| Message::Error(ErrorMessage { code, detail })),
    ]
}

fn command_action() -> impl Strategy<Value = CommandAction> {
    prop_oneof![
        (1u8..=255, order_id()).prop_map(|(door_id, order_id)| CommandAction::OpenDoor { door_id, order_id }),
        (1u8..=255).prop_map(|door_id| CommandAction::QueryDoor { door_id }),
        (1u8..=255, 1u8..=255, any::<i32>()).prop_map(|(door_id, lane_id, grams)| CommandAction::Tare {
            door_id,
            lane_id,
            grams
        }),
        (4u8..=255, proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(kind, params)| CommandAction::Other { kind, params: Bytes::from(params) }),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    (any::<u32>(), any::<u8>(), message()).prop_map(|(seq, flags, message)| Frame { seq, flags: Flags(flags), message })
}

fn encode(frame: &Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    cabinet::encode(frame, &mut buf).expect("generated frames are encodable");
    buf
}

proptest! {
    #[test]
    fn round_trip(f in frame()) {
        let mut buf = encode(&f);
        prop_assert_eq!(buf.len(), f.encoded_len());
        let decoded = cabinet::decode(&mut buf, MAX_PAYLOAD_LEN).expect("decodes");
        prop_assert_eq!(decoded, Some(f));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn every_split_point_decodes_the_same(f in frame()) {
        let wire = encode(&f);
        for split in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..split]);
            prop_assert_eq!(cabinet::decode(&mut buf, MAX_PAYLOAD_LEN).expect("partial is not an error"), None);
            prop_assert_eq!(buf.len(), split, "a partial frame is not consumed");
            buf.extend_from_slice(&wire[split..]);
            prop_assert_eq!(cabinet::decode(&mut buf, MAX_PAYLOAD_LEN).expect("decodes"), Some(f.clone()));
        }
    }

    #[test]
    fn trailing_bytes_stay_in_the_buffer(f in frame(), g in frame(), extra in proptest::collection::vec(any::<u8>(), 0..20)) {
        let mut buf = encode(&f);
        let second = encode(&g);
        buf.extend_from_slice(&second);
        buf.extend_from_slice(&extra);
        prop_assert_eq!(cabinet::decode(&mut buf, MAX_PAYLOAD_LEN).expect("first"), Some(f));
        let mut rest = second.to_vec();
        rest.extend_from_slice(&extra);
        prop_assert_eq!(&buf[..], &rest[..]);
        prop_assert_eq!(cabinet::decode(&mut buf, MAX_PAYLOAD_LEN).expect("second"), Some(g));
        prop_assert_eq!(&buf[..], &extra[..]);
    }

    #[test]
    fn a_corrupted_byte_never_yields_the_original(f in frame(), index in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let mut wire = encode(&f);
        let i = index.index(wire.len());
        wire[i] ^= flip;
        if let Ok(Some(decoded)) = cabinet::decode(&mut wire, MAX_PAYLOAD_LEN) {
            prop_assert_ne!(decoded, f);
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), max in 0usize..5000) {
        let mut buf = BytesMut::from(&bytes[..]);
        // Decode until the buffer is exhausted or framing is lost; every step must return.
        for _ in 0..bytes.len() + 1 {
            match cabinet::decode(&mut buf, max) {
                Ok(Some(_)) | Err(FrameError::Invalid { .. }) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    }

    #[test]
    fn random_payloads_of_valid_frames_never_panic(ty in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut wire = vec![0xCA, 0xB1, 0x01, ty, 0, 0, 0, 0, 1];
        wire.extend_from_slice(&u16::try_from(payload.len()).expect("small").to_be_bytes());
        wire.extend_from_slice(&payload);
        let crc = crc32c::crc32c(&wire);
        wire.extend_from_slice(&crc.to_be_bytes());
        let mut buf = BytesMut::from(&wire[..]);
        match cabinet::decode(&mut buf, MAX_PAYLOAD_LEN) {
            Ok(Some(frame)) => {
                // Whatever decoded re-encodes and decodes to itself.
                let mut again = encode(&frame);
                prop_assert_eq!(cabinet::decode(&mut again, MAX_PAYLOAD_LEN).expect("re-decodes"), Some(frame));
            }
            Ok(None) => prop_assert!(false, "a whole frame is never partial"),
            Err(e) => prop_assert!(!e.is_fatal(), "an intact frame only fails on its content: {e}"),
        }
        prop_assert!(buf.is_empty(), "an intact frame is always consumed");
    }
}

#[test]
fn encoder_refuses_what_the_decoder_would_refuse() {
    let too_many = (0..65).map(|i| LaneWeight { lane_id: (i % 255) + 1, grams: 0, stable: true }).collect();
    let report = Frame::new(1, Message::WeightReport(WeightReport { door_id: 1, sample_time_ms: 0, lanes: too_many }));
    let mut buf = BytesMut::new();
    assert!(cabinet::encode(&report, &mut buf).is_err());
    assert!(buf.is_empty(), "nothing written on error");

    let heavy = Frame::new(
        1,
        Message::WeightReport(WeightReport {
            door_id: 1,
            sample_time_ms: 0,
            lanes: vec![LaneWeight { lane_id: 1, grams: cabinet::MAX_GRAMS + 1, stable: true }],
        }),
    );
    assert!(cabinet::encode(&heavy, &mut buf).is_err());
    let door_zero =
        Frame::new(1, Message::Command(Command { expires_at_ms: 0, action: CommandAction::QueryDoor { door_id: 0 } }));
    assert!(cabinet::encode(&door_zero, &mut buf).is_err());
    let long_text = Frame::new(1, Message::Error(ErrorMessage { code: ErrorCode::Busy, detail: "x".repeat(256) }));
    assert!(cabinet::encode(&long_text, &mut buf).is_err());
    assert!(buf.is_empty());
}

#[test]
fn out_of_range_fields_name_the_field_and_value() {
    // WEIGHT_REPORT with stable = 2.
    let mut payload = vec![1u8, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 10, 2];
    let err = decode_payload(0x03, &payload);
    assert_eq!(err, Some(protocol::cabinet::MessageError::OutOfRange { field: "stable", value: 2 }));
    // lane_count = 0
    payload = vec![1u8, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(
        decode_payload(0x03, &payload),
        Some(protocol::cabinet::MessageError::OutOfRange { field: "lane_count", value: 0 })
    );
    // DOOR_EVENT truncated in event_time
    assert_eq!(
        decode_payload(0x04, &[1, 1, 0, 0]),
        Some(protocol::cabinet::MessageError::Truncated { field: "event_time_ms" })
    );
    // LOGIN with a ':' in the device id
    let mut login = vec![3u8, b'a', b':', b'b', 0];
    login.extend_from_slice(&[0; 8]);
    login.extend_from_slice(&[0; 32]);
    assert_eq!(decode_payload(0x01, &login), Some(protocol::cabinet::MessageError::InvalidText { field: "device_id" }));
}

fn decode_payload(ty: u8, payload: &[u8]) -> Option<protocol::cabinet::MessageError> {
    let mut wire = vec![0xCA, 0xB1, 0x01, ty, 0, 0, 0, 0, 1];
    wire.extend_from_slice(&u16::try_from(payload.len()).expect("small").to_be_bytes());
    wire.extend_from_slice(payload);
    let crc = crc32c::crc32c(&wire);
    wire.extend_from_slice(&crc.to_be_bytes());
    match cabinet::decode(&mut BytesMut::from(&wire[..]), MAX_PAYLOAD_LEN) {
        Err(FrameError::Invalid { reason, .. }) => Some(reason),
        _ => None,
    }
}
