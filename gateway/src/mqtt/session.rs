//! A connected vehicle: one task, one select loop, the only writer to the socket.
//!
//! Uplinks are checked against the vehicle's own topics (SPEC.md 2.2) and forwarded; a QoS 1
//! publish gets its PUBACK (QoS 2 its PUBREC) only once Redis has confirmed its entry, so an
//! acknowledgement survives a crash of this process. At most `mqtt.receive_max` publishes wait
//! for Redis at once; past that the session stops reading (backpressure).
//! Downlinks go out at QoS 1 (or the subscription's QoS 0), at most `max_inflight` at once;
//! a PUBACK completes the command. With a persistent session each QoS 1 downlink is stored
//! until acknowledged, so a reconnect (to any node) sends it again.

use std::collections::VecDeque;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use protocol::Vin;
use protocol::bus::{CommandBody, Outcome, UpEvent};
use protocol::mqtt::topic::{self, DownlinkKind};
use protocol::mqtt::{
    Disconnect, DisconnectReason, MqttCodec, Packet, Publish, QoS, REASON_NOT_AUTHORIZED,
    REASON_PAYLOAD_FORMAT_INVALID, REASON_SUCCESS, SubAckResult, Version,
};

use tokio::time::{Instant, sleep_until};
use tokio_util::codec::Decoder;

use super::connect::Connected;
use super::persist::{self, StoredDownlink};
use super::{PROTOCOL, queue};
use crate::clock::now_ms;
use crate::context::Ctx;
use crate::session::{CONFIRM_GRACE, Downlink, EndReason, ReleaseIfEmpty, SessionHandle, Wake, next_wake};
use crate::transport::{Conn, Event};

/// Bytes a vehicle may leave unread before it counts as a slow reader: several of the largest
/// downlinks (an OTA notification is a few hundred bytes; packets are capped at 16 KiB).
const MAX_PENDING_WRITE: usize = 256 * 1024;

/// How often a publish stalled by a full upstream buffer is offered again.
const STALL_RETRY: Duration = Duration::from_millis(20);
/// UNSUBACK reason 0x11: no subscription existed.
const REASON_NO_SUBSCRIPTION: u8 = 0x11;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    PeerDisconnect,
    PeerClosed,
    IdleTimeout,
    TakenOver,
    Revoked,
    Drain,
    ProtocolError(&'static str),
    AclDenied,
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
            End::Revoked => "revoked",
            End::Drain => "drain",
            End::ProtocolError(_) => "protocol_error",
            End::AclDenied => "acl_denied",
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
            End::AclDenied | End::Revoked => Some(DisconnectReason::NotAuthorized),
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

/// What a connected vehicle's session keeps. Owned by the connection's task (its future holds
/// it once) and lent to the loop, so nothing is copied from one nested future into the next.
#[derive(Debug)]
pub(super) struct Live {
    /// Identity, epoch and queue; `handle.device` is this vehicle's key.
    handle: Arc<SessionHandle>,
    vin: Vin,
    version: Version,
    session_expiry_s: u32,
    /// See [`Connected::stored_state`].
    stored_state: bool,
    subscriptions: Vec<(String, QoS)>,
    inflight: Vec<Inflight>,
    max_inflight: usize,
    /// Downlinks waiting for room in the in-flight window.
    waiting: VecDeque<Downlink>,
    next_packet_id: u16,
    /// Inbound QoS 2 packet ids between PUBREC and PUBREL (the publish is forwarded once).
    qos2_received: Vec<NonZeroU16>,
    /// Inbound QoS 1/2 publishes on their way to Redis, as [`ack_token`]s: acknowledged once
    /// confirmed; a retransmission of one of them is not forwarded again.
    awaiting: Vec<u32>,
    receive_max: usize,
    /// Set while written bytes wait for the socket: past it the reader is too slow.
    write_deadline: Option<Instant>,
    idle_timeout: Duration,
    /// A QoS 1/2 publish the upstream buffer could not take yet. While it waits the session
    /// reads nothing more (the vehicle's bytes wait in TCP) and retries every
    /// `STALL_RETRY`: backpressure instead of loss or a disconnect.
    stalled: Option<Box<Stalled>>,
}

/// The token a publish waits for Redis under: its packet id, with bit 16 set for QoS 2 (a
/// PUBREC is owed rather than a PUBACK).
fn ack_token(qos: QoS, packet_id: NonZeroU16) -> u32 {
    u32::from(packet_id.get()) | if qos == QoS::ExactlyOnce { 1 << 16 } else { 0 }
}

/// A publish waiting for room upstream.
#[derive(Debug)]
struct Stalled {
    /// What it will be acknowledged under ([`ack_token`]).
    token: u32,
    event: UpEvent,
}

impl Live {
    /// The live state of a vehicle that just connected, and the downlinks of its stored session
    /// to send again.
    pub(super) fn new(c: Connected) -> (Self, Vec<StoredDownlink>) {
        let live = Self {
            handle: c.handle,
            vin: c.vin,
            version: c.version,
            session_expiry_s: c.session_expiry_s,
            stored_state: c.stored_state,
            subscriptions: c.subscriptions,
            inflight: Vec::new(),
            max_inflight: usize::from(c.max_inflight),
            waiting: VecDeque::new(),
            next_packet_id: 1,
            qos2_received: Vec::new(),
            awaiting: Vec::new(),
            receive_max: c.receive_max,
            write_deadline: None,
            idle_timeout: c.idle_timeout,
            stalled: None,
        };
        (live, c.resend)
    }
}

struct Session<'a> {
    conn: &'a mut Conn,
    codec: &'a mut MqttCodec,
    ctx: &'a Ctx,
    live: &'a mut Live,
}

/// Serves a connected vehicle until its session ends, then cleans up.
pub(super) async fn run(
    conn: &mut Conn,
    codec: &mut MqttCodec,
    ctx: &Ctx,
    live: &mut Live,
    resend: Vec<StoredDownlink>,
) {
    let mut s = Session { conn, codec, ctx, live };
    s.resend(resend);
    // Packets the vehicle wrote right behind its CONNECT are already in the read buffer: serve
    // them now, not when more bytes happen to arrive.
    let end = match s.on_bytes().await.and_then(|()| s.push_out()) {
        Ok(()) => s.serve().await,
        Err(end) => end,
    };
    // Boxed: the clean-up's Redis calls are large futures, needed once at the end; the loop that
    // lives for days should not carry their size.
    Box::pin(s.finish(end)).await;
}

impl Session<'_> {
    /// The loop. One timer serves the keep-alive, downlink deadlines, the write deadline and
    /// the drain delay. Writes never block the loop: what the socket does not take waits,
    /// bounded in time and size.
    async fn serve(&mut self) -> End {
        let idle_timeout = self.live.idle_timeout;
        let mut idle_deadline = Instant::now() + idle_timeout;
        let mut drain_deadline: Option<Instant> = None;
        if self.ctx.drain.is_cancelled() {
            self.live.handle.end(EndReason::Drain);
        }
        let timer = sleep_until(idle_deadline);
        tokio::pin!(timer);
        loop {
            let next_deadline = self.live.inflight.iter().filter_map(|i| i.deadline).min();
            let retry = self.live.stalled.as_ref().map(|_| Instant::now() + STALL_RETRY);
            let wake = [Some(idle_deadline), drain_deadline, self.live.write_deadline, next_deadline, retry]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(idle_deadline);
            if timer.deadline() != wake {
                timer.as_mut().reset(wake);
            }
            let waiting_to_write = self.conn.pending_write() > 0;
            let step =
                match next_wake(&self.live.handle, timer.as_mut(), self.conn, self.reading(), waiting_to_write).await {
                    Wake::Handle => {
                        // Stored uplinks are acknowledged first, whatever else is asked.
                        let was_full = !self.reading();
                        self.send_confirmed();
                        match self.live.handle.end_reason() {
                            EndReason::TakenOver => Err(End::TakenOver),
                            EndReason::Revoked => Err(End::Revoked),
                            EndReason::Close => Err(End::Drain),
                            reason => {
                                if reason == EndReason::Drain && drain_deadline.is_none() {
                                    // Spread the vehicles' reconnects over the drain's spread.
                                    let delay_ms = fastrand::u64(0..self.ctx.config.drain.spread_ms.max(1));
                                    drain_deadline = Some(Instant::now() + Duration::from_millis(delay_ms));
                                }
                                self.live.waiting.extend(self.live.handle.take_all());
                                Box::pin(self.pump()).await;
                                // Room again: what the vehicle sent meanwhile is in the read buffer.
                                if was_full && self.reading() { Box::pin(self.on_bytes()).await } else { Ok(()) }
                            }
                        }
                    }
                    Wake::Timer => {
                        let now = Instant::now();
                        if !self.reading() {
                            // Not idle: we are the ones not reading.
                            idle_deadline = now + idle_timeout;
                        }
                        if now >= idle_deadline {
                            // Silent, unless bytes wait unread (this node was paused or starved):
                            // they are read once the runtime sees them.
                            if self.conn.bytes_waiting() {
                                idle_deadline = now + idle_timeout;
                                Ok(())
                            } else {
                                Err(End::IdleTimeout)
                            }
                        } else if drain_deadline.is_some_and(|d| now >= d) {
                            Err(End::Drain)
                        } else if self.live.write_deadline.is_some_and(|d| now >= d) {
                            Err(End::SlowReader)
                        } else {
                            self.expire_inflight();
                            if self.retry_stalled() { Box::pin(self.on_bytes()).await } else { Ok(()) }
                        }
                    }
                    Wake::Io(Ok(Event::Read(0))) => Err(End::PeerClosed),
                    Wake::Io(Ok(Event::Read(n))) => {
                        self.ctx.metrics.mqtt.bytes_in(n);
                        idle_deadline = Instant::now() + idle_timeout;
                        Box::pin(self.on_bytes()).await
                    }
                    Wake::Io(Ok(Event::Writable)) => Ok(()),
                    Wake::Io(Err(_)) => Err(End::Io),
                };
            let pushed = self.push_out();
            self.live.inflight.release_if_empty();
            self.live.waiting.release_if_empty();
            self.live.qos2_received.release_if_empty();
            self.live.awaiting.release_if_empty();
            if let Err(end) = step.and(pushed) {
                return end;
            }
        }
    }

    fn send(&mut self, packet: Packet) -> bool {
        queue(self.conn, self.codec, self.ctx, packet)
    }

    /// Writes what the socket takes now. Bytes left waiting arm the write deadline; more than
    /// `MAX_PENDING_WRITE` of them, or the deadline passing, means a reader too slow to keep.
    fn push_out(&mut self) -> Result<(), End> {
        match self.conn.try_flush() {
            Ok(n) => self.ctx.metrics.mqtt.bytes_out(n),
            Err(_) => return Err(End::Io),
        }
        let waiting = self.conn.pending_write();
        if waiting == 0 {
            self.live.write_deadline = None;
        } else if waiting > MAX_PENDING_WRITE {
            return Err(End::SlowReader);
        } else if self.live.write_deadline.is_none() {
            self.live.write_deadline =
                Some(Instant::now() + Duration::from_millis(self.ctx.config.mqtt.write_timeout_ms));
        }
        Ok(())
    }

    async fn on_bytes(&mut self) -> Result<(), End> {
        // A stalled publish, or a full window of publishes waiting for Redis, stops decoding:
        // what follows waits in the read buffer.
        while self.reading() {
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
        self.ctx.metrics.mqtt.frame_in(packet.label());
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
                self.live.qos2_received.retain(|id| *id != packet_id);
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
                    let before = self.live.subscriptions.len();
                    self.live.subscriptions.retain(|(s, _)| s != f);
                    reasons.push(if self.live.subscriptions.len() < before {
                        REASON_SUCCESS
                    } else {
                        REASON_NO_SUBSCRIPTION
                    });
                }
                self.save_subscriptions().await;
                if self.live.version.is_v3() {
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
                if let Some(expiry) = d.session_expiry_s.filter(|_| self.live.session_expiry_s > 0) {
                    self.live.session_expiry_s = expiry.min(self.ctx.config.mqtt.max_session_expiry_s);
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
        let kind = match topic::parse_uplink(&self.live.vin, &p.topic) {
            Ok(kind) => kind,
            Err(e) => {
                self.ctx.metrics.acl_denied.with_label_values(&["publish"]).inc();
                self.ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, e.label()]).inc();
                tracing::info!(topic = %p.topic, reason = e.label(), "publish refused");
                // 3.1.1 cannot refuse a publish except by closing; 5.0 answers with a reason.
                if self.live.version.is_v3() {
                    return Err(End::AclDenied);
                }
                self.ack(&p, REASON_NOT_AUTHORIZED);
                return Ok(());
            }
        };
        if let Some(reason) = topic::payload_problem(&p.payload) {
            // Refused, not forwarded: 5.0 says why; 3.1.1 cannot refuse a publish except by
            // closing, and a closed car would send it again on reconnect, so it is acknowledged
            // and dropped (SPEC.md 2.2). Counted either way.
            self.ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, reason]).inc();
            tracing::info!(topic = %p.topic, reason, "publish refused");
            let code = if self.live.version.is_v3() { REASON_SUCCESS } else { REASON_PAYLOAD_FORMAT_INVALID };
            self.ack(&p, code);
            return Ok(());
        }
        let token = match (p.qos, p.packet_id) {
            (QoS::AtMostOnce, _) | (_, None) => None,
            (qos, Some(id)) => Some(ack_token(qos, id)),
        };
        if token.is_some_and(|t| self.live.awaiting.contains(&t)) {
            // A retransmission of a publish still on its way to Redis: its acknowledgement follows.
            self.ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, "awaiting_store"]).inc();
            return Ok(());
        }
        if let (QoS::ExactlyOnce, Some(id)) = (p.qos, p.packet_id)
            && self.live.qos2_received.contains(&id)
        {
            // A retransmission before PUBREL: already forwarded once.
            self.send(Packet::PubRec { packet_id: id, reason: REASON_SUCCESS });
            return Ok(());
        }
        let event = UpEvent::Vehicle {
            vin: self.live.vin.clone(),
            epoch: self.live.handle.epoch,
            node: self.ctx.node().to_owned(),
            at_ms: now_ms(),
            kind,
            payload: p.payload.clone(),
        };
        if self.ctx.upstream.offer_confirmed(&event, token.map(|t| (&self.live.handle, t))).is_err() {
            // QoS 0 may be dropped (and is counted); QoS 1 and 2 wait for room.
            if let Some(token) = token {
                self.ctx.metrics.backpressure.with_label_values(&[PROTOCOL]).inc();
                self.live.stalled = Some(Box::new(Stalled { token, event }));
            }
            return Ok(());
        }
        // Acknowledged once Redis has it (send_confirmed).
        self.live.awaiting.extend(token);
        Ok(())
    }

    /// Whether the session takes more packets from the vehicle: not while a publish waits for
    /// room upstream, nor while `receive_max` publishes wait for Redis.
    fn reading(&self) -> bool {
        self.live.stalled.is_none() && self.live.awaiting.len() < self.live.receive_max
    }

    /// Acknowledges every publish Redis has confirmed since the last call: PUBACK for QoS 1,
    /// PUBREC for QoS 2 (its PUBREL then completes it).
    fn send_confirmed(&mut self) {
        for token in self.live.handle.take_confirmed() {
            self.live.awaiting.retain(|t| *t != token);
            let Some(packet_id) = u16::try_from(token & 0xFFFF).ok().and_then(NonZeroU16::new) else { continue };
            if token & (1 << 16) == 0 {
                self.send(Packet::PubAck { packet_id, reason: REASON_SUCCESS });
            } else {
                self.live.qos2_received.push(packet_id);
                self.send(Packet::PubRec { packet_id, reason: REASON_SUCCESS });
            }
        }
    }

    /// Offers the stalled publish again; on success acknowledges it. Returns `true` if the
    /// session may read again.
    fn retry_stalled(&mut self) -> bool {
        let Some(stalled) = self.live.stalled.take() else { return true };
        if self.ctx.upstream.offer_quietly(&stalled.event, Some((&self.live.handle, stalled.token))).is_err() {
            self.live.stalled = Some(stalled);
            return false;
        }
        self.live.awaiting.push(stalled.token);
        self.reading()
    }

    fn ack(&mut self, p: &Publish, reason: u8) {
        match (p.qos, p.packet_id) {
            (QoS::AtLeastOnce, Some(packet_id)) => {
                self.send(Packet::PubAck { packet_id, reason });
            }
            (QoS::ExactlyOnce, Some(packet_id)) => {
                if reason == REASON_SUCCESS {
                    self.live.qos2_received.push(packet_id);
                }
                self.send(Packet::PubRec { packet_id, reason });
            }
            _ => {}
        }
    }

    async fn on_subscribe(&mut self, packet_id: NonZeroU16, filters: Vec<(String, QoS)>) {
        let mut results = Vec::with_capacity(filters.len());
        for (filter, qos) in filters {
            let held = self.live.subscriptions.iter().any(|(f, _)| *f == filter);
            if !held && self.live.subscriptions.len() >= self.ctx.config.mqtt.max_subscriptions {
                // Each filter is stored and matched against every downlink (SPEC.md 2.2, "Limits").
                self.ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, "subscription_quota"]).inc();
                results.push(SubAckResult::QuotaExceeded);
            } else if topic::may_subscribe(&self.live.vin, &filter) {
                // QoS 1 at most (SPEC.md 2.1).
                let granted = qos.min(QoS::AtLeastOnce);
                self.live.subscriptions.retain(|(f, _)| *f != filter);
                self.live.subscriptions.push((filter, granted));
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
        if self.live.session_expiry_s > 0
            && let Err(e) = persist::save_subscriptions(self.ctx, &self.live.vin, &self.live.subscriptions).await
        {
            self.ctx.metrics.redis_errors.with_label_values(&["mqtt_session"]).inc();
            tracing::warn!(error = %e, "failed to store subscriptions");
        }
    }

    /// The QoS a downlink on `topic` goes out with: the highest granted by a matching
    /// subscription, or `None` if the vehicle is not subscribed.
    fn granted_qos(&self, topic_name: &str) -> Option<QoS> {
        self.live.subscriptions.iter().filter(|(f, _)| topic::matches(f, topic_name)).map(|(_, q)| *q).max()
    }

    fn packet_id(&mut self) -> NonZeroU16 {
        loop {
            let id = NonZeroU16::new(self.live.next_packet_id).unwrap_or(NonZeroU16::MIN);
            self.live.next_packet_id = self.live.next_packet_id.checked_add(1).unwrap_or(1);
            if !self.live.inflight.iter().any(|i| i.packet_id == id) {
                return id;
            }
        }
    }

    /// Sends waiting downlinks while the in-flight window has room.
    async fn pump(&mut self) {
        let now = now_ms();
        while self.live.inflight.len() < self.live.max_inflight {
            let Some(d) = self.live.waiting.pop_front() else { break };
            let Downlink { request_id, reply_to, deadline_ms, received, body } = d;
            if deadline_ms <= now {
                self.ctx.reply(PROTOCOL, &request_id, &reply_to, &self.live.handle.device, Outcome::TimedOut);
                continue;
            }
            let CommandBody::Vehicle { kind, payload } = body else {
                self.ctx.reply(
                    PROTOCOL,
                    &request_id,
                    &reply_to,
                    &self.live.handle.device,
                    Outcome::Invalid("not a vehicle command".into()),
                );
                continue;
            };
            if payload.len() > topic::MAX_DOWNLINK_PAYLOAD {
                let why = format!("downlink of {} bytes exceeds {}", payload.len(), topic::MAX_DOWNLINK_PAYLOAD);
                self.ctx.reply(PROTOCOL, &request_id, &reply_to, &self.live.handle.device, Outcome::Invalid(why));
                continue;
            }
            let topic_name = topic::downlink_topic(&self.live.vin, kind);
            let Some(qos) = self.granted_qos(&topic_name) else {
                self.ctx.reply(
                    PROTOCOL,
                    &request_id,
                    &reply_to,
                    &self.live.handle.device,
                    Outcome::Invalid(format!("vehicle not subscribed to {topic_name}")),
                );
                continue;
            };
            if qos == QoS::AtMostOnce {
                let sent = self.publish(topic_name, None, payload, false);
                let outcome =
                    if sent { Outcome::Delivered } else { Outcome::Invalid("too large for the vehicle".into()) };
                self.ctx.reply(PROTOCOL, &request_id, &reply_to, &self.live.handle.device, outcome);
                continue;
            }
            let packet_id = self.packet_id();
            if !self.publish(topic_name, Some(packet_id), payload.clone(), false) {
                self.ctx.reply(
                    PROTOCOL,
                    &request_id,
                    &reply_to,
                    &self.live.handle.device,
                    Outcome::Invalid("too large for the vehicle".into()),
                );
                continue;
            }
            let stored = if self.live.session_expiry_s > 0 {
                Some(self.store(packet_id, kind, &request_id, payload).await)
            } else {
                None
            };
            let deadline = Instant::now() + Duration::from_millis(deadline_ms - now);
            self.live.inflight.push(Inflight {
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
        match persist::push(self.ctx, &self.live.vin, &record, self.ctx.config.mqtt.max_stored_downlinks).await {
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
            let topic_name = topic::downlink_topic(&self.live.vin, d.kind);
            if self.publish(topic_name, Some(packet_id), d.payload, true) {
                self.ctx.metrics.stored_downlinks.with_label_values(&["resent"]).inc();
                self.live.next_packet_id = self.live.next_packet_id.max(packet_id.get().saturating_add(1));
                self.live.inflight.push(Inflight {
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
        let Some(i) = self.live.inflight.iter().position(|f| f.packet_id == packet_id) else {
            self.ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, "unmatched_puback"]).inc();
            return;
        };
        let done = self.live.inflight.swap_remove(i);
        if let Some(record) = &done.stored
            && let Err(e) = persist::remove(self.ctx, &self.live.vin, record).await
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
            self.ctx.reply(PROTOCOL, &done.request_id, &done.reply_to, &self.live.handle.device, Outcome::Delivered);
        }
        self.pump().await;
    }

    /// Replies "timed out" for downlinks past their deadline; they stay in flight (a late
    /// PUBACK still completes them, silently).
    fn expire_inflight(&mut self) {
        let now = Instant::now();
        for i in &mut self.live.inflight {
            if i.deadline.is_some_and(|d| d <= now) {
                i.deadline = None;
                let reply_to = std::mem::take(&mut i.reply_to);
                self.ctx.reply(PROTOCOL, &i.request_id, &reply_to, &self.live.handle.device, Outcome::TimedOut);
            }
        }
    }

    async fn finish(mut self, end: End) {
        if !matches!(end, End::SlowReader | End::Io | End::PeerClosed | End::PeerDisconnect) {
            // Publishes still on their way to Redis are acknowledged before the goodbye.
            let deadline = Instant::now() + CONFIRM_GRACE;
            self.send_confirmed();
            while !self.live.awaiting.is_empty() && self.live.handle.wakeup_before(deadline).await {
                self.send_confirmed();
            }
        }
        if let (Version::V5, Some(reason)) = (self.live.version, end.disconnect_reason()) {
            self.send(Packet::Disconnect(Disconnect::new(reason)));
        }
        if !matches!(end, End::SlowReader | End::Io | End::PeerClosed) {
            if let Ok(n) = self.conn.flush(Duration::from_millis(self.ctx.config.mqtt.write_timeout_ms)).await {
                self.ctx.metrics.mqtt.bytes_out(n);
            }
            self.conn.close().await;
        }
        for i in std::mem::take(&mut self.live.inflight) {
            if i.deadline.is_some() {
                self.ctx.reply(PROTOCOL, &i.request_id, &i.reply_to, &self.live.handle.device, Outcome::NotConnected);
            }
        }
        let waiting: Vec<Downlink> = self.live.waiting.drain(..).chain(self.live.handle.take_all()).collect();
        for d in waiting {
            self.ctx.reply(PROTOCOL, &d.request_id, &d.reply_to, &self.live.handle.device, Outcome::NotConnected);
        }
        let state = if self.live.session_expiry_s > 0 {
            persist::expire(self.ctx, &self.live.vin, self.live.session_expiry_s).await
        } else if self.live.stored_state {
            persist::delete(self.ctx, &self.live.vin).await
        } else {
            // Cleared at connect and nothing stored since: nothing to delete.
            Ok(())
        };
        if let Err(e) = state {
            self.ctx.metrics.redis_errors.with_label_values(&["mqtt_session"]).inc();
            tracing::warn!(error = %e, "failed to update the stored session");
        }
        // Counted before the close event goes upstream, so whoever sees the event sees the count.
        self.ctx.metrics.sessions_closed.with_label_values(&[PROTOCOL, end.label()]).inc();
        self.ctx.registry.remove_local(&self.live.handle);
        self.ctx.registry.release(&self.live.handle.device, self.live.handle.session).await;
        self.ctx
            .upstream
            .send(&UpEvent::SessionClosed {
                device: self.live.handle.device.clone(),
                epoch: self.live.handle.epoch,
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

impl std::fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("vin", &self.live.vin).field("epoch", &self.live.handle.epoch).finish()
    }
}
