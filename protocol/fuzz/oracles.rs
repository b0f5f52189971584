//! The checks both fuzz targets run on each input, shared with `tests/fuzz_corpus.rs` so the
//! committed corpus is replayed by every test run.

use bytes::BytesMut;
use protocol::cabinet::{self, MAX_PAYLOAD_LEN};
use protocol::mqtt::{Limits, MqttCodec, MqttError, Packet};
use tokio_util::codec::{Decoder, Encoder};

/// Cabinet frames as a stream: decode until the buffer is exhausted or framing is lost.
/// No panic; a framing error consumes nothing; a rejected intact frame is consumed; every
/// decoded frame re-encodes to bytes that decode to the same frame.
pub fn cabinet_stream(data: &[u8]) {
    // The first byte picks the receive limit, so the small pre-login limit is exercised too.
    let Some((&limit, data)) = data.split_first() else { return };
    let max = if limit < 128 { 256 } else { MAX_PAYLOAD_LEN };
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match cabinet::decode(&mut buf, max) {
            Ok(Some(frame)) => {
                let mut wire = BytesMut::new();
                cabinet::encode(&frame, &mut wire).expect("a decoded frame re-encodes");
                let again = cabinet::decode(&mut wire, MAX_PAYLOAD_LEN).expect("re-decodes");
                assert_eq!(again.as_ref(), Some(&frame));
                assert!(wire.is_empty());
            }
            Ok(None) => break,
            Err(e) if e.is_fatal() => {
                assert_eq!(buf.len(), before, "a framing error consumes nothing");
                break;
            }
            Err(_) => assert!(buf.len() < before, "a rejected frame is consumed"),
        }
    }
}

/// MQTT packets as a stream into a server codec, starting before CONNECT. No panic; a size
/// refusal reserves nothing beyond the limit; packets a client sends re-encode to bytes that
/// decode to the same packet.
pub fn mqtt_stream(data: &[u8]) {
    let limits = Limits { connect_max_bytes: 2048, max_packet_bytes: 16 * 1024 };
    let mut codec = MqttCodec::server(limits);
    let mut buf = BytesMut::from(data);
    loop {
        match codec.decode(&mut buf) {
            Ok(Some(packet)) => check_round_trip(&codec, packet, limits),
            Ok(None) => break,
            Err(MqttError::TooLarge { .. }) => {
                assert!(buf.capacity() <= data.len().max(64) + 16 * 1024 + 8, "over-reserved");
                break;
            }
            Err(_) => break,
        }
    }
}

fn check_round_trip(codec: &MqttCodec, packet: Packet, limits: Limits) {
    let client_sent = matches!(
        packet,
        Packet::Publish(_)
            | Packet::PubAck { .. }
            | Packet::PubRec { .. }
            | Packet::PubRel { .. }
            | Packet::PubComp { .. }
            | Packet::Subscribe { .. }
            | Packet::Unsubscribe { .. }
            | Packet::PingReq
    );
    let Some(version) = codec.version() else { return };
    if !client_sent {
        return;
    }
    let mut peer = MqttCodec::connected(version, limits);
    let mut wire = BytesMut::new();
    peer.encode(packet.clone(), &mut wire).expect("a decoded packet re-encodes");
    let again = peer.decode(&mut wire).expect("re-decodes");
    assert_eq!(again, Some(packet));
}
