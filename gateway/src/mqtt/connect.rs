//! The MQTT handshake (SPEC.md 2.1): CONNECT within the deadline, the VIN from the client
//! certificate or the user name, the token checked against its stored hash, the device claimed
//! in the connection map, the persistent session restored, CONNACK.

use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::Duration;

use protocol::Vin;
use protocol::bus::{DeviceKey, UpEvent};
use protocol::mqtt::{ConnAck, Connect, ConnectCode, MqttCodec, Packet, QoS, Version};
use tokio::time::Instant;
use tokio_util::codec::Decoder;

use super::persist::{self, StoredDownlink};
use super::{PROTOCOL, queue};
use crate::clock::now_ms;
use crate::context::{Ctx, SessionRefused};
use crate::credentials::Lookup;
use crate::registry::LoginFacts;
use crate::session::{EndReason, SessionHandle};
use crate::transport::{Conn, Event};

/// A connected vehicle.
#[derive(Debug)]
pub(super) struct Connected {
    pub(super) handle: Arc<SessionHandle>,
    pub(super) vin: Vin,
    pub(super) version: Version,
    /// Close the connection after this long without a packet (1.5 x keep-alive).
    pub(super) idle_timeout: Duration,
    /// Seconds the session outlives the connection; 0 = not persistent.
    pub(super) session_expiry_s: u32,
    /// Whether Redis may hold state of this session (it was resumed, or it is persistent): a
    /// clean, non-persistent session has nothing to delete when it ends.
    pub(super) stored_state: bool,
    pub(super) subscriptions: Vec<(String, QoS)>,
    /// Unacknowledged downlinks of the previous connection, to send again.
    pub(super) resend: Vec<StoredDownlink>,
    /// QoS 1 downlinks in flight at most (ours, and the vehicle's 5.0 Receive Maximum).
    pub(super) max_inflight: u16,
    /// Inbound QoS 1/2 publishes it may have on their way to Redis (`mqtt.receive_max`).
    pub(super) receive_max: usize,
}

fn count(ctx: &Ctx, result: &str) {
    ctx.metrics.logins.with_label_values(&[PROTOCOL, result]).inc();
}

/// Who the vehicle is: the VIN from its certificate, or its user name with a token.
fn identify(connect: &Connect, cert_vin: Option<&Vin>) -> Result<(Vin, bool), (ConnectCode, &'static str)> {
    let vin = match cert_vin {
        Some(vin) => vin.clone(),
        None => {
            let Some(user) = connect.username.as_deref() else {
                return Err((ConnectCode::BadCredentials, "no_username"));
            };
            Vin::new(user).map_err(|_| (ConnectCode::BadCredentials, "bad_username"))?
        }
    };
    // The client id is the VIN; an empty one is taken to mean it.
    if !connect.client_id.is_empty() && connect.client_id != vin.as_str() {
        return Err((ConnectCode::IdentifierRejected, "identifier_rejected"));
    }
    Ok((vin, cert_vin.is_some()))
}

/// Runs the handshake. On success CONNACK (and any resent downlinks) are queued, not yet
/// flushed; on failure a refusal CONNACK may be queued and `None` is returned.
pub(super) async fn connect(
    conn: &mut Conn,
    codec: &mut MqttCodec,
    ctx: &Ctx,
    cert_vin: Option<&Vin>,
) -> Option<Connected> {
    let cfg = &ctx.config.mqtt;
    let deadline = Instant::now() + Duration::from_millis(cfg.connect_timeout_ms);
    let connect = loop {
        match codec.decode(conn.read_buf()) {
            Ok(Some(Packet::Connect(c))) => break c,
            Ok(Some(other)) => {
                // The codec only lets CONNECT through first; anything else is a bug upstream.
                tracing::warn!(packet = other.label(), "unexpected first packet");
                count(ctx, "protocol_error");
                return None;
            }
            Ok(None) => {}
            Err(e) => {
                ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, e.label()]).inc();
                count(ctx, "protocol_error");
                tracing::debug!(error = %e, "connect rejected");
                return None;
            }
        }
        match tokio::time::timeout_at(deadline, conn.wait(false)).await {
            Err(_) => {
                count(ctx, "timeout");
                return None;
            }
            Ok(Ok(Event::Read(0) | Event::Writable)) | Ok(Err(_)) => {
                count(ctx, "peer_closed");
                return None;
            }
            Ok(Ok(Event::Read(n))) => ctx.metrics.mqtt.bytes_in(n),
        }
    };
    ctx.metrics.mqtt.frame_in("connect");
    let version = connect.version;
    let refuse = |conn: &mut Conn, codec: &mut MqttCodec, code: ConnectCode, result: &str| {
        count(ctx, result);
        queue(conn, codec, ctx, Packet::ConnAck(ConnAck::new(code, false)));
        tracing::info!(result, "vehicle connect refused");
    };

    let (vin, by_certificate) = match identify(&connect, cert_vin) {
        Ok(v) => v,
        Err((code, result)) => {
            refuse(conn, codec, code, result);
            return None;
        }
    };
    tracing::Span::current().record("device_id", vin.as_str());
    let device = DeviceKey::Vehicle(vin.clone());
    let changes = ctx.credentials.changes();
    let credential = match ctx.credentials.lookup(&device).await {
        Lookup::Found(c) => c,
        Lookup::Unknown => {
            refuse(conn, codec, ConnectCode::BadCredentials, "unknown_device");
            return None;
        }
        Lookup::Unavailable => {
            refuse(conn, codec, ConnectCode::ServerUnavailable, "unavailable");
            return None;
        }
    };
    if !by_certificate {
        let token = connect.password.as_deref().unwrap_or_default();
        if !credential.vehicle_token_matches(token) {
            refuse(conn, codec, ConnectCode::BadCredentials, "bad_credentials");
            return None;
        }
    }
    if !credential.enabled {
        refuse(conn, codec, ConnectCode::NotAuthorized, "disabled");
        return None;
    }

    let (handle, epoch) = match ctx.open_session(PROTOCOL, &device, cfg.command_queue_len, LoginFacts::default()).await
    {
        Ok(opened) => opened,
        Err(refused) => {
            let code = match refused {
                SessionRefused::Unavailable => ConnectCode::ServerUnavailable,
                // A vehicle's login carries no version or clock: only flapping can be refused.
                SessionRefused::Refused(_) => ConnectCode::ConnectionRateExceeded,
                SessionRefused::Superseded => ConnectCode::ServerBusy,
            };
            refuse(conn, codec, code, refused.label());
            return None;
        }
    };

    if !ctx.credentials.still_valid(&device, changes, &credential).await {
        // Rotated or disabled while this connect was being checked: the session ends at once.
        handle.end(EndReason::Revoked);
    }

    // Session state: a clean start discards what was stored; a persistent session resumes it.
    let session_expiry_s = connect.session_expiry_s.min(cfg.max_session_expiry_s);
    let mut session_present = false;
    let mut stored = persist::Stored::default();
    if connect.clean_start {
        if let Err(e) = persist::delete(ctx, &vin).await {
            tracing::warn!(error = %e, "failed to clear the stored session");
        }
    } else {
        match persist::load(ctx, &vin).await {
            Ok(Some(s)) => {
                session_present = true;
                stored = s;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "failed to load the stored session; starting clean"),
        }
    }
    if session_expiry_s > 0
        && !session_present
        && let Err(e) = persist::create(ctx, &vin).await
    {
        tracing::warn!(error = %e, "failed to create the stored session");
    }

    let keep_alive_s = if connect.keep_alive_s == 0 { cfg.default_keep_alive_s } else { connect.keep_alive_s };
    let mut ack = ConnAck::new(ConnectCode::Accepted, session_present);
    if version == Version::V5 {
        ack.max_packet_size = Some(cfg.max_packet_bytes);
        // Publishes it may have unacknowledged: each waits for Redis before its PUBACK.
        ack.receive_max = NonZeroU16::new(cfg.receive_max);
        if connect.keep_alive_s == 0 {
            ack.server_keepalive_s = Some(keep_alive_s);
        }
        if session_expiry_s != connect.session_expiry_s {
            ack.session_expiry_s = Some(session_expiry_s);
        }
        if let Some(max) = connect.max_packet_size {
            codec.set_max_outbound_bytes(max);
        }
    }
    count(ctx, "accepted");
    queue(conn, codec, ctx, Packet::ConnAck(ack));
    ctx.upstream
        .send(&UpEvent::SessionOpened {
            device,
            epoch,
            node: ctx.node().to_owned(),
            at_ms: now_ms(),
            info: format!("mqtt {}", version.label()),
        })
        .await;
    tracing::info!(epoch, version = version.label(), session_present, "vehicle connected");
    let max_inflight = connect.receive_max.map_or(cfg.max_inflight, NonZeroU16::get).min(cfg.max_inflight);
    Some(Connected {
        handle,
        vin,
        version,
        idle_timeout: Duration::from_millis(u64::from(keep_alive_s) * 1500),
        session_expiry_s,
        stored_state: !connect.clean_start || session_expiry_s > 0,
        subscriptions: stored.subscriptions,
        resend: stored.inflight,
        max_inflight,
        receive_max: usize::from(cfg.receive_max),
    })
}
