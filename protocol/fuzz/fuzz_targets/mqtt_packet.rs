//! Feeds arbitrary bytes to the server-side MQTT codec as a stream, starting before CONNECT.
//! Oracle: no panic; a size refusal never reserves more than the limit; packets a client sends
//! re-encode to bytes that decode to the same packet.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use protocol::mqtt::{Limits, MqttCodec, MqttError, Packet};
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
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
});

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
