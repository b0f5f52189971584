//! A connected vehicle: one task, one select loop, the only writer to the socket.
//!
//! Uplinks are checked against the vehicle's own topics (SPEC.md 2.2) and forwarded.
//! Downlinks go out at QoS 1 (or the subscription's QoS 0), at most `max_inflight` at once;
//! a PUBACK completes the command. With a persistent session each QoS 1 downlink is stored
//! until acknowledged, so a reconnect (to any node) sends it again.

use std::collections::VecDeque;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use protocol::Vin;
use protocol::bus::{CommandBody, DeviceKey, Outcome, UpEvent};
use protocol::mqtt::topic::{self, DownlinkKind};
use protocol::mqtt::{
    Disconnect, DisconnectReason, MqttCodec, Packet, Publish, QoS, REASON_NOT_AUTHORIZED, REASON_SUCCESS, SubAckResult,
    Version,
};
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::codec::Decoder;

use super::connect::Connected;
use super::persist::{self, StoredDownlink};
use super::{PROTOCOL, queue};
use crate::clock::now_ms;
use crate::context::Ctx;
use crate::session::{Downlink, EndReason, SessionHandle};
use crate::transport::{Conn, WriteError};

/// PUBACK reason 0x97: quota exceeded (the upstream buffer is full; retry later).
const REASON_QUOTA_EXCEEDED: u8 = 0x97;
/// UNSUBACK reason 0x11: no subscription existed.
const REASON_NO_SUBSCRIPTION: u8 = 0x11;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    PeerDisconnect,
    PeerClosed,
    IdleTimeout,
    TakenOver,
    Drain,
    ProtocolError(&'static str),
    AclDenied,
    UpstreamFull,
    SlowReader,
    Io,
}

impl End {
    fn label(self) -> &'static str {
        match self {
            End::PeerDisconnect => "peer_disconnect",
            End::PeerClosed => "peer_closed",
            End::IdleTimeout => "idle_timeout",
            End::TakenOver => "taken_over",
            End::Drain => "drain",
            End::ProtocolError(_) => "protocol_error",
            End::AclDenied => "acl_denied",
            End::UpstreamFull => "upstream_full",
            End::SlowReader => "slow_reader",
            End::Io => "io_error",
        }
    }

    /// What a 5.0 vehicle is told (3.1.x has no server DISCONNECT).
    fn disconnect_reason(self) -> Option<DisconnectReason> {
        match self {
            End::IdleTimeout => Some(DisconnectReason::KeepAliveTimeout),
            End::TakenOver => Some(DisconnectReason::SessionTakenOver),
            End::Drain => Some(DisconnectReason::UseAnotherServer),
            End::ProtocolError(_) => Some(DisconnectReason::ProtocolError),
            End::AclDenied => Some(DisconnectReason::NotAuthorized),
            End::UpstreamFull => Some(DisconnectReason::QuotaExceeded),
            End::PeerDisconnect | End::PeerClosed | End::SlowReader | End::Io => None,
        }
    }
}

/// A QoS 1 downlink waiting for its PUBACK.
#[derive(Debug)]
struct Inflight {
    packet_id: NonZeroU16,
    request_id: String,
    /// Emptied once a reply was sent (timed out), so the PUBACK does not reply twice.
    reply_to: String,
    received: Instant,
    deadline: Option<Instant>,
    /// The stored record, for a persistent session.
    stored: Option<Vec<u8>>,
}

struct Session {
    conn: Conn,
    codec: MqttCodec,
    ctx: Arc<Ctx>,
    handle: Arc<SessionHandle>,
    key: DeviceKey,
    vin: Vin,
    version: Version,
    session_expiry_s: u32,
    subscriptions: Vec<(String, QoS)>,
    inflight: Vec<Inflight>,
    max_inflight: usize,
    /// Downlinks waiting for room in the in-flight window.
    waiting: VecDeque<Downlink>,
    next_packet_id: u16,
    /// Inbound QoS 2 packet ids between PUBREC and PUBREL (the publish is forwarded once).
    qos2_received: Vec<NonZeroU16>,
}

pub(super) async fn run(conn: Conn, codec: MqttCodec, c: Connected, ctx: Arc<Ctx>) {
    let key = c.handle.device.clone();
    let mut s = Session {
        conn,
        codec,
        ctx,
        handle: c.handle,
        key,
        vin: c.vin,
        version: c.version,
        session_expiry_s: c.session_expiry_s,
        subscriptions: c.subscriptions,
        inflight: Vec::new(),
        max_inflight: usize::from(c.max_inflight),
        waiting: VecDeque::new(),
        next_packet_id: 1,
        qos2_received: Vec::new(),
    };
    s.resend(c.resend);
    let end = match s.flush().await {
        Ok(()) => s.serve(c.idle_timeout).await,
        Err(end) => end,
    };
    s.finish(end).await;
}

impl Session {
    async fn serve(&mut self, idle_timeout: Duration) -> End {
        let idle = sleep(idle_timeout);
        tokio::pin!(idle);
        let drain = self.ctx.drain.clone();
        let mut drain_deadline: Option<Instant> = None;
        loop {
            let next_deadline = self.inflight.iter().filter_map(|i| i.deadline).min();
            tokio::select! {
                read = self.conn.fill() => match read {
                    Ok(0) => return End::PeerClosed,
                    Ok(n) => {
                        self.ctx.metrics.bytes_in.with_label_values(&[PROTOCOL]).inc_by(n as u64);
                        idle.as_mut().reset(Instant::now() + idle_timeout);
                        let result = self.on_bytes().await;
                        let flushed = self.flush().await;
                        if let Err(end) = result.and(flushed) {
                            return end;
                        }
                    }
                    Err(_) => return End::Io,
                },
                () = self.handle.wakeup() => {
                    match self.handle.end_reason() {
                        EndReason::TakenOver => return End::TakenOver,
                        EndReason::Drain => return End::Drain,
                        EndReason::None => {}
                    }
                    self.waiting.extend(self.handle.take_all());
                    self.pump().await;
                    if let Err(end) = self.flush().await {
                        return end;
                    }
                }
                () = sleep_until(next_deadline.unwrap_or_else(Instant::now)), if next_deadline.is_some() => {
                    self.expire_inflight();
                }
                () = &mut idle => return End::IdleTimeout,
                () = drain.cancelled(), if drain_deadline.is_none() => {
                    let delay_ms = fastrand::u64(0..self.ctx.config.drain.spread_ms.max(1));
                    drain_deadline = Some(Instant::now() + Duration::from_millis(delay_ms));
                }
                () = sleep_until(drain_deadline.unwrap_or_else(Instant::now)), if drain_deadline.is_some() => {
                    return End::Drain;
                }
            }
        }
    }

    fn send(&mut self, packet: Packet) -> bool {
        queue(&mut self.conn, &mut self.codec, &self.ctx, packet)
    }

    async fn flush(&mut self) -> Result<(), End> {
        match self.conn.flush().await {
            Ok(n) => {
                self.ctx.metrics.bytes_out.with_label_values(&[PROTOCOL]).inc_by(n as u64);
                Ok(())
            }
            Err(WriteError::Timeout(_)) => Err(End::SlowReader),
            Err(WriteError::Io(_)) => Err(End::Io),
        }
    }

    async fn on_bytes(&mut self) -> Result<(), End> {
        loop {
            match self.codec.decode(self.conn.read_buf()) {
                Ok(Some(packet)) => self.on_packet(packet).await?,
                Ok(None) => break,
                Err(e) => {
                    self.ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, e.label()]).inc();
                    tracing::debug!(error = %e, "packet rejected");
                    return Err(End::ProtocolError(e.label()));
                }
            }
        }
        self.conn.release_read_buf();
        Ok(())
    }

    async fn on_packet(&mut self, packet: Packet) -> Result<(), End> {
        self.ctx.metrics.frames_in.with_label_values(&[PROTOCOL, packet.label()]).inc();
        match packet {
            Packet::Publish(p) => self.on_publish(p),
            Packet::PubAck { packet_id, .. } => {
                self.on_puback(packet_id).await;
                Ok(())
            }
            Packet::PubRec { packet_id, .. } => {
                // We never send QoS 2; complete the exchange anyway.
                self.send(Packet::PubRel { packet_id, reason: REASON_SUCCESS });
                Ok(())
            }
            Packet::PubRel { packet_id, .. } => {
                self.qos2_received.retain(|id| *id != packet_id);
                self.send(Packet::PubComp { packet_id, reason: REASON_SUCCESS });
                Ok(())
            }
            Packet::PubComp { .. } => Ok(()),
            Packet::Subscribe { packet_id, filters } => {
                self.on_subscribe(packet_id, filters).await;
                Ok(())
            }
            Packet::Unsubscribe { packet_id, filters } => {
                let mut reasons = Vec::with_capacity(filters.len());
                for f in &filters {
                    let before = self.subscriptions.len();
                    self.subscriptions.retain(|(s, _)| s != f);
                    reasons.push(if self.subscriptions.len() < before {
                        REASON_SUCCESS
                    } else {
                        REASON_NO_SUBSCRIPTION
                    });
                }
                self.save_subscriptions().await;
                if self.version.is_v3() {
                    reasons.clear();
                }
                self.send(Packet::UnsubAck { packet_id, reasons });
                Ok(())
            }
            Packet::PingReq => {
                self.send(Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(d) => {
                if let Some(expiry) = d.session_expiry_s.filter(|_| self.session_expiry_s > 0) {
                    self.session_expiry_s = expiry.min(self.ctx.config.mqtt.max_session_expiry_s);
                }
                Err(End::PeerDisconnect)
            }
            Packet::Auth { .. } => Err(End::ProtocolError("auth_not_supported")),
            Packet::Connect(_)
            | Packet::ConnAck(_)
            | Packet::SubAck { .. }
            | Packet::UnsubAck { .. }
            | Packet::PingResp => {
                self.ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, "unexpected"]).inc();
                Err(End::ProtocolError("unexpected_packet"))
            }
        }
    }

    fn on_publish(&mut self, p: Publish) -> Result<(), End> {
        let kind = match topic::parse_uplink(&self.vin, &p.topic) {
            Ok(kind) => kind,
            Err(e) => {
                self.ctx.metrics.acl_denied.with_label_values(&["publish"]).inc();
                self.ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, e.label()]).inc();
                tracing::info!(topic = %p.topic, reason = e.label(), "publish refused");
                // 3.1.1 cannot refuse a publish except by closing; 5.0 answers with a reason.
                if self.version.is_v3() {
                    return Err(End::AclDenied);
                }
                self.ack(&p, REASON_NOT_AUTHORIZED);
                return Ok(());
            }
        };
        if let (QoS::ExactlyOnce, Some(id)) = (p.qos, p.packet_id)
            && self.qos2_received.contains(&id)
        {
            // A retransmission before PUBREL: already forwarded once.
            self.send(Packet::PubRec { packet_id: id, reason: REASON_SUCCESS });
            return Ok(());
        }
        let event = UpEvent::Vehicle {
            vin: self.vin.clone(),
            epoch: self.handle.epoch,
            node: self.ctx.node().to_owned(),
            at_ms: now_ms(),
            kind,
            payload: p.payload.clone(),
        };
        if self.ctx.upstream.offer(&event).is_err() {
            return match (p.qos, self.version.is_v3()) {
                (QoS::AtMostOnce, _) => Ok(()),
                // Without a PUBACK a 3.1.1 client resends only after a reconnect.
                (_, true) => Err(End::UpstreamFull),
                (_, false) => {
                    self.ack(&p, REASON_QUOTA_EXCEEDED);
                    Ok(())
                }
            };
        }
        self.ack(&p, REASON_SUCCESS);
        Ok(())
    }

    fn ack(&mut self, p: &Publish, reason: u8) {
        match (p.qos, p.packet_id) {
            (QoS::AtLeastOnce, Some(packet_id)) => {
                self.send(Packet::PubAck { packet_id, reason });
            }
            (QoS::ExactlyOnce, Some(packet_id)) => {
                if reason == REASON_SUCCESS {
                    self.qos2_received.push(packet_id);
                }
                self.send(Packet::PubRec { packet_id, reason });
            }
            _ => {}
        }
    }

    async fn on_subscribe(&mut self, packet_id: NonZeroU16, filters: Vec<(String, QoS)>) {
        let mut results = Vec::with_capacity(filters.len());
        for (filter, qos) in filters {
            if topic::may_subscribe(&self.vin, &filter) {
                // QoS 1 at most (SPEC.md 2.1).
                let granted = qos.min(QoS::AtLeastOnce);
                self.subscriptions.retain(|(f, _)| *f != filter);
                self.subscriptions.push((filter, granted));
                results.push(SubAckResult::Granted(granted));
            } else {
                self.ctx.metrics.acl_denied.with_label_values(&["subscribe"]).inc();
                tracing::info!(%filter, "subscription refused");
                results.push(SubAckResult::NotAuthorized);
            }
        }
        self.save_subscriptions().await;
        self.send(Packet::SubAck { packet_id, results });
        // Downlinks that waited for a subscription may go now.
        self.pump().await;
    }

    async fn save_subscriptions(&mut self) {
        if self.session_expiry_s > 0
            && let Err(e) = persist::save_subscriptions(&self.ctx, &self.vin, &self.subscriptions).await
        {
            self.ctx.metrics.redis_errors.with_label_values(&["mqtt_session"]).inc();
            tracing::warn!(error = %e, "failed to store subscriptions");
        }
    }

    /// The QoS a downlink on `topic` goes out with: the highest granted by a matching
    /// subscription, or `None` if the vehicle is not subscribed.
    fn granted_qos(&self, topic_name: &str) -> Option<QoS> {
        self.subscriptions.iter().filter(|(f, _)| topic::matches(f, topic_name)).map(|(_, q)| *q).max()
    }

    fn packet_id(&mut self) -> NonZeroU16 {
        loop {
            let id = NonZeroU16::new(self.next_packet_id).unwrap_or(NonZeroU16::MIN);
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if !self.inflight.iter().any(|i| i.packet_id == id) {
                return id;
            }
        }
    }

    /// Sends waiting downlinks while the in-flight window has room.
    async fn pump(&mut self) {
        let now = now_ms();
        while self.inflight.len() < self.max_inflight {
            let Some(d) = self.waiting.pop_front() else { break };
            let Downlink { request_id, reply_to, deadline_ms, received, body } = d;
            if deadline_ms <= now {
                self.ctx.reply(PROTOCOL, &request_id, &reply_to, &self.key, Outcome::TimedOut);
                continue;
            }
            let CommandBody::Vehicle { kind, payload } = body else {
                self.ctx.reply(
                    PROTOCOL,
                    &request_id,
                    &reply_to,
                    &self.key,
                    Outcome::Invalid("not a vehicle command".into()),
                );
                continue;
            };
            let topic_name = topic::downlink_topic(&self.vin, kind);
            let Some(qos) = self.granted_qos(&topic_name) else {
                self.ctx.reply(
                    PROTOCOL,
                    &request_id,
                    &reply_to,
                    &self.key,
                    Outcome::Invalid(format!("vehicle not subscribed to {topic_name}")),
                );
                continue;
            };
            if qos == QoS::AtMostOnce {
                let sent = self.publish(topic_name, None, payload, false);
                let outcome =
                    if sent { Outcome::Delivered } else { Outcome::Invalid("too large for the vehicle".into()) };
                self.ctx.reply(PROTOCOL, &request_id, &reply_to, &self.key, outcome);
                continue;
            }
            let packet_id = self.packet_id();
            if !self.publish(topic_name, Some(packet_id), payload.clone(), false) {
                self.ctx.reply(
                    PROTOCOL,
                    &request_id,
                    &reply_to,
                    &self.key,
                    Outcome::Invalid("too large for the vehicle".into()),
                );
                continue;
            }
            let stored = if self.session_expiry_s > 0 {
                Some(self.store(packet_id, kind, &request_id, payload).await)
            } else {
                None
            };
            let deadline = Instant::now() + Duration::from_millis(deadline_ms - now);
            self.inflight.push(Inflight {
                packet_id,
                request_id,
                reply_to,
                received,
                deadline: Some(deadline),
                stored,
            });
        }
    }

    async fn store(&mut self, packet_id: NonZeroU16, kind: DownlinkKind, request_id: &str, payload: Bytes) -> Vec<u8> {
        let record =
            StoredDownlink { packet_id: packet_id.get(), kind, request_id: request_id.to_owned(), payload }.to_bytes();
        match persist::push(&self.ctx, &self.vin, &record, self.ctx.config.mqtt.max_stored_downlinks).await {
            Ok(()) => self.ctx.metrics.stored_downlinks.with_label_values(&["stored"]).inc(),
            Err(e) => {
                self.ctx.metrics.redis_errors.with_label_values(&["mqtt_session"]).inc();
                tracing::warn!(error = %e, "failed to store a downlink for the persistent session");
            }
        }
        record
    }

    fn publish(&mut self, topic_name: String, packet_id: Option<NonZeroU16>, payload: Bytes, dup: bool) -> bool {
        let qos = if packet_id.is_some() { QoS::AtLeastOnce } else { QoS::AtMostOnce };
        self.send(Packet::Publish(Publish { dup, qos, retain: false, topic: topic_name, packet_id, payload }))
    }

    /// Sends the previous connection's unacknowledged downlinks again, in order, DUP set.
    /// Nobody waits for their replies any more: the sender already had its answer.
    fn resend(&mut self, stored: Vec<StoredDownlink>) {
        for d in stored {
            let Some(packet_id) = NonZeroU16::new(d.packet_id) else { continue };
            let record = d.to_bytes();
            let topic_name = topic::downlink_topic(&self.vin, d.kind);
            if self.publish(topic_name, Some(packet_id), d.payload, true) {
                self.ctx.metrics.stored_downlinks.with_label_values(&["resent"]).inc();
                self.next_packet_id = self.next_packet_id.max(packet_id.get().saturating_add(1));
                self.inflight.push(Inflight {
                    packet_id,
                    request_id: d.request_id,
                    reply_to: String::new(),
                    received: Instant::now(),
                    deadline: None,
                    stored: Some(record),
                });
            }
        }
    }

    async fn on_puback(&mut self, packet_id: NonZeroU16) {
        let Some(i) = self.inflight.iter().position(|f| f.packet_id == packet_id) else {
            self.ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, "unmatched_puback"]).inc();
            return;
        };
        let done = self.inflight.swap_remove(i);
        if let Some(record) = &done.stored
            && let Err(e) = persist::remove(&self.ctx, &self.vin, record).await
        {
            self.ctx.metrics.redis_errors.with_label_values(&["mqtt_session"]).inc();
            tracing::warn!(error = %e, "failed to remove an acknowledged downlink");
        }
        if done.deadline.is_some() {
            self.ctx
                .metrics
                .command_duration
                .with_label_values(&[PROTOCOL])
                .observe(done.received.elapsed().as_secs_f64());
            self.ctx.reply(PROTOCOL, &done.request_id, &done.reply_to, &self.key, Outcome::Delivered);
        }
        self.pump().await;
    }

    /// Replies "timed out" for downlinks past their deadline; they stay in flight (a late
    /// PUBACK still completes them, silently).
    fn expire_inflight(&mut self) {
        let now = Instant::now();
        for i in &mut self.inflight {
            if i.deadline.is_some_and(|d| d <= now) {
                i.deadline = None;
                let reply_to = std::mem::take(&mut i.reply_to);
                self.ctx.reply(PROTOCOL, &i.request_id, &reply_to, &self.key, Outcome::TimedOut);
            }
        }
    }

    async fn finish(mut self, end: End) {
        if let (Version::V5, Some(reason)) = (self.version, end.disconnect_reason()) {
            self.send(Packet::Disconnect(Disconnect::new(reason)));
        }
        if !matches!(end, End::SlowReader | End::Io | End::PeerClosed) {
            let _ = self.flush().await;
            self.conn.close().await;
        }
        for i in std::mem::take(&mut self.inflight) {
            if i.deadline.is_some() {
                self.ctx.reply(PROTOCOL, &i.request_id, &i.reply_to, &self.key, Outcome::NotConnected);
            }
        }
        let waiting: Vec<Downlink> = self.waiting.drain(..).chain(self.handle.take_all()).collect();
        for d in waiting {
            self.ctx.reply(PROTOCOL, &d.request_id, &d.reply_to, &self.key, Outcome::NotConnected);
        }
        let state = if self.session_expiry_s > 0 {
            persist::expire(&self.ctx, &self.vin, self.session_expiry_s).await
        } else {
            persist::delete(&self.ctx, &self.vin).await
        };
        if let Err(e) = state {
            self.ctx.metrics.redis_errors.with_label_values(&["mqtt_session"]).inc();
            tracing::warn!(error = %e, "failed to update the stored session");
        }
        // Counted before the close event goes upstream, so whoever sees the event sees the count.
        self.ctx.metrics.sessions_closed.with_label_values(&[PROTOCOL, end.label()]).inc();
        self.ctx.registry.remove_local(&self.handle);
        self.ctx.registry.release(&self.key, &self.handle.session_id).await;
        self.ctx
            .upstream
            .send(&UpEvent::SessionClosed {
                device: self.key.clone(),
                epoch: self.handle.epoch,
                node: self.ctx.node().to_owned(),
                at_ms: now_ms(),
                reason: end.label().to_owned(),
            })
            .await;
        match end {
            End::ProtocolError(why) => tracing::info!(reason = end.label(), why, "vehicle session ended"),
            _ => tracing::info!(reason = end.label(), "vehicle session ended"),
        }
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("vin", &self.vin).field("epoch", &self.handle.epoch).finish()
    }
}
