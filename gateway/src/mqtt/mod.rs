//! Vehicle connections over MQTT (SPEC.md part 2): the handshake ([`connect`]), the session
//! ([`session`]) and persistent session state ([`persist`]).

mod connect;
mod persist;
mod session;

use std::sync::Arc;
use std::time::Duration;

use protocol::Vin;
use protocol::mqtt::{Limits, MqttCodec, Packet};
use tokio_util::codec::Encoder;

use crate::context::Ctx;
use crate::server::ConnGuard;
use crate::transport::Conn;

/// The `protocol` metric label of everything here.
pub(crate) const PROTOCOL: &str = "mqtt";

/// Serves one vehicle connection from its first byte to its close. `cert_vin` is the VIN of a
/// verified client certificate, if the connection came with one.
pub async fn serve(mut conn: Conn, ctx: Arc<Ctx>, cert_vin: Option<Vin>, _guard: ConnGuard) {
    let limits = Limits { connect_max_bytes: 2048, max_packet_bytes: ctx.config.mqtt.max_packet_bytes };
    let mut codec = MqttCodec::server(limits);
    // Boxed: the handshake's futures are large and needed once.
    let Some(connected) = Box::pin(connect::connect(&mut conn, &mut codec, &ctx, cert_vin.as_ref())).await else {
        let _ = conn.flush(Duration::from_millis(ctx.config.mqtt.write_timeout_ms)).await;
        conn.close().await;
        return;
    };
    let (mut live, resend) = session::Live::new(connected);
    session::run(&mut conn, &mut codec, &ctx, &mut live, resend).await;
}

/// Encodes `packet` into the write buffer and counts it. Returns `false` if it could not be
/// encoded (for example, larger than the vehicle's Maximum Packet Size).
pub(crate) fn queue(conn: &mut Conn, codec: &mut MqttCodec, ctx: &Ctx, packet: Packet) -> bool {
    let label = packet.label();
    let start = conn.write_buf().len();
    match codec.encode(packet, conn.write_buf()) {
        Ok(()) => {
            ctx.metrics.mqtt.frame_out(label);
            true
        }
        Err(e) => {
            conn.write_buf().truncate(start);
            tracing::warn!(error = %e, packet = label, "failed to encode packet to vehicle");
            false
        }
    }
}
