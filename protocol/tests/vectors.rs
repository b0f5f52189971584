//! SPEC.md and the codec agree byte for byte: every hex example in SPEC.md section 1.11 is read
//! from the document itself, decoded, compared with the frame built from its fields, and
//! re-encoded to the same bytes. The rejections the section describes are checked too.

mod support;

use bytes::BytesMut;
use protocol::cabinet::{self, Command, CommandAction, Frame, FrameError, MAX_PAYLOAD_LEN, Message, MessageError};
use support::spec_examples;

const SPEC: &str = include_str!("../SPEC.md");

/// The bytes of every fenced block in section 1.11: on each line, the leading tokens that are
/// two hex digits (annotations after them are skipped).
fn spec_example_blocks() -> Vec<Vec<u8>> {
    let section = SPEC.split("### 1.11 Examples").nth(1).expect("section 1.11 exists");
    let section = section.split("\n---").next().expect("section end");
    let mut blocks = Vec::new();
    let mut current: Option<Vec<u8>> = None;
    for line in section.lines() {
        if line.trim_start().starts_with("```") {
            match current.take() {
                Some(block) => blocks.push(block),
                None => current = Some(Vec::new()),
            }
            continue;
        }
        if let Some(block) = current.as_mut() {
            for token in line.split_whitespace() {
                let is_hex_byte = token.len() == 2 && token.chars().all(|c| c.is_ascii_hexdigit());
                if !is_hex_byte {
                    break;
                }
                block.push(u8::from_str_radix(token, 16).expect("hex"));
            }
        }
    }
    blocks
}

fn decode_all(bytes: &[u8]) -> Vec<Frame> {
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    while let Some(frame) = cabinet::decode(&mut buf, MAX_PAYLOAD_LEN).expect("spec example decodes") {
        frames.push(frame);
    }
    assert!(buf.is_empty(), "spec example has {} stray bytes", buf.len());
    frames
}

fn encode(frame: &Frame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    cabinet::encode(frame, &mut buf).expect("encodable");
    buf.to_vec()
}

#[test]
fn every_spec_example_decodes_to_its_fields_and_back() {
    let expected = spec_examples::frames().expect("example frames build");
    let blocks = spec_example_blocks();
    let decoded: Vec<Frame> = blocks.iter().flat_map(|b| decode_all(b)).collect();
    assert_eq!(decoded.len(), expected.len(), "SPEC.md has {} example frames", decoded.len());
    for ((name, want), got) in expected.iter().zip(&decoded) {
        assert_eq!(got, want, "example {name}");
        let wire = encode(want);
        let mut again = BytesMut::from(&wire[..]);
        assert_eq!(cabinet::decode(&mut again, MAX_PAYLOAD_LEN).expect("ok").as_ref(), Some(want), "{name}");
    }
    // Re-encoding the decoded frames reproduces the document's bytes exactly.
    let spec_bytes: Vec<u8> = blocks.concat();
    let reencoded: Vec<u8> = decoded.iter().flat_map(encode).collect();
    assert_eq!(reencoded, spec_bytes);
}

#[test]
fn spec_login_tag_verifies_with_the_example_secret_only() {
    let (_, frame) = spec_examples::frames().expect("frames").into_iter().next().expect("login first");
    let Message::Login(login) = frame.message else { panic!("first example is LOGIN") };
    assert!(login.verify(&spec_examples::secret()));
    let mut wrong = spec_examples::secret();
    wrong[31] ^= 1;
    assert!(!login.verify(&wrong));
    assert_eq!(login.device_id().as_str(), "CAB-000123");
    assert_eq!(login.firmware_version(), "1.4.2");
}

#[test]
fn spec_login_v2_signs_the_nonce() {
    let frames = spec_examples::frames().expect("frames");
    let (_, frame) = frames.iter().find(|(name, _)| *name == "login_v2").expect("login_v2 example");
    let Message::Login(login) = &frame.message else { panic!("login_v2 is a LOGIN") };
    assert_eq!(login.version(), 2);
    assert_eq!(login.nonce(), Some(&spec_examples::nonce()));
    assert!(login.verify(&spec_examples::secret()));
    // The version-1 example carries no nonce.
    let Message::Login(v1) = &frames[0].1.message else { panic!("first example is LOGIN") };
    assert_eq!((v1.version(), v1.nonce()), (1, None));
    // Another nonce in the same place breaks the tag: the nonce is signed.
    let mut wire = encode(frame);
    wire[11 + 25] ^= 0xFF;
    let body_len = wire.len() - 4;
    let crc = crc32c(&wire[..body_len]);
    wire[body_len..].copy_from_slice(&crc.to_be_bytes());
    let decoded = decode_all(&wire).remove(0);
    let Message::Login(forged) = decoded.message else { panic!("still a LOGIN") };
    assert!(!forged.verify(&spec_examples::secret()));
}

const HEARTBEAT: [u8; 23] = [
    0xCA, 0xB1, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x08, 0x00, 0x00, 0x01, 0x8B, 0xCF, 0xE5, 0xDD, 0x30,
    0x8A, 0x15, 0xC6, 0x47,
];

#[test]
fn spec_rejection_bad_checksum() {
    let mut bytes = HEARTBEAT;
    bytes[22] = 0x48;
    let mut buf = BytesMut::from(&bytes[..]);
    let err = cabinet::decode(&mut buf, MAX_PAYLOAD_LEN).expect_err("bad crc");
    assert_eq!(err, FrameError::BadChecksum { seq: 2, expected: 0x8A15_C647, actual: 0x8A15_C648 });
    assert!(err.is_fatal());
    assert_eq!(err.label(), "bad_checksum");
    assert_eq!(buf.len(), 23, "nothing consumed on a framing error");
}

#[test]
fn spec_rejection_unsupported_version_before_anything_else() {
    let mut bytes = HEARTBEAT;
    bytes[2] = 0x02;
    // Even three bytes are enough to refuse.
    let mut buf = BytesMut::from(&bytes[..3]);
    assert_eq!(cabinet::decode(&mut buf, MAX_PAYLOAD_LEN), Err(FrameError::UnsupportedVersion(2)));
}

#[test]
fn spec_rejection_too_large_before_the_payload() {
    let header = [0xCA, 0xB1, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x10, 0x01];
    let mut buf = BytesMut::from(&header[..]);
    let err = cabinet::decode(&mut buf, MAX_PAYLOAD_LEN).expect_err("too large");
    assert_eq!(err, FrameError::TooLarge { seq: 2, len: 4097, max: 4096 });
    assert!(buf.capacity() < 4096, "the body was not reserved");
}

#[test]
fn spec_rejection_unknown_type_keeps_the_stream() {
    // A valid frame of type 0x07 followed by the spec's heartbeat.
    let mut frame = vec![0xCA, 0xB1, 0x01, 0x07, 0x00, 0x00, 0x00, 0x00, 0x09, 0x00, 0x00];
    let crc = crc32c(&frame);
    frame.extend_from_slice(&crc.to_be_bytes());
    frame.extend_from_slice(&HEARTBEAT);
    let mut buf = BytesMut::from(&frame[..]);
    let err = cabinet::decode(&mut buf, MAX_PAYLOAD_LEN).expect_err("unknown type");
    assert_eq!(err, FrameError::Invalid { seq: 9, msg_type: 0x07, reason: MessageError::UnknownType(0x07) });
    assert!(!err.is_fatal());
    assert_eq!(err.label(), "unknown_type");
    let next = cabinet::decode(&mut buf, MAX_PAYLOAD_LEN).expect("next frame").expect("whole");
    assert_eq!(next.seq, 2);
    assert!(buf.is_empty());
}

/// CRC-32C written out from SPEC.md 1.3, bit by bit, independent of the crate under test.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn crc_check_value_from_the_spec() {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c(&HEARTBEAT[..19]), 0x8A15_C647);
}

#[test]
fn spec_tare_payload_example() {
    let frame = Frame::new(
        7,
        Message::Command(Command {
            expires_at_ms: 1_795_400_005_000,
            action: CommandAction::Tare { door_id: 2, lane_id: 1, grams: 4500 },
        }),
    );
    let wire = encode(&frame);
    // Header 11 bytes, then the payload SPEC.md 1.7 shows for TARE, then the CRC.
    let at = SPEC.find("`TARE` (0x03)").expect("TARE in SPEC.md");
    let shown = SPEC[at..].split("payload\n  `").nth(1).and_then(|t| t.split('`').next()).expect("the example payload");
    let payload: Vec<u8> = shown.split(' ').map(|h| u8::from_str_radix(h, 16).expect("hex byte")).collect();
    assert_eq!(&wire[11..wire.len() - 4], payload.as_slice());
    let mut again = BytesMut::from(&wire[..]);
    assert_eq!(cabinet::decode(&mut again, MAX_PAYLOAD_LEN).expect("ok"), Some(frame));
}
