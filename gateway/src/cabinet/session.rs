//! A logged-in cabinet: one task, one select loop, the only writer to the socket.
//!
//! The loop waits for bytes from the cabinet, downlinks, confirmations or an end request from
//! the handle, the earliest command deadline, the idle timeout, and the drain signal. Uplink
//! frames are forwarded; a frame the cabinet expects acknowledged gets its `ACK` only once Redis
//! has confirmed its entry (SPEC.md 1.4), so an `ACK` survives a crash of this process. Commands
//! get a sequence number and are matched with their `COMMAND_RESULT`.

use std::sync::Arc;
use std::time::Duration;

use protocol::bus::{CommandBody, DeviceKey, Outcome, UpEvent};
use protocol::cabinet::{self, Command, ErrorCode, Frame, HeartbeatAck, MAX_PAYLOAD_LEN, Message, Notice, NoticeKind};

use tokio::time::{Instant, sleep_until};

use super::login::LoggedIn;
use super::{PROTOCOL, error, error_frame, queue};
use crate::clock::now_ms;
use crate::context::Ctx;
use crate::session::{CONFIRM_GRACE, Downlink, EndReason, ReleaseIfEmpty, SessionHandle, Wake, next_wake};
use crate::transport::{Conn, Event};

/// Bytes a cabinet may leave unread before it counts as a slow reader: far above anything a
/// cabinet is sent in a burst (commands are tens of bytes).
const MAX_PENDING_WRITE: usize = 64 * 1024;

/// Why a session ended: the `reason` label of `gateway_sessions_closed_total` and of the
/// `close` upstream event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    PeerClosed,
    IdleTimeout,
    TakenOver,
    Revoked,
    Drain,
    ProtocolError(&'static str),
    SlowReader,
    Io,
}

impl End {
    fn label(self) -> &'static str {
        match self {
            End::PeerClosed => "peer_closed",
            End::IdleTimeout => "idle_timeout",
            End::TakenOver => "taken_over",
            End::Revoked => "revoked",
            End::Drain => "drain",
            End::ProtocolError(_) => "protocol_error",
            End::SlowReader => "slow_reader",
            End::Io => "io_error",
        }
    }
}

/// A command sent and not yet answered.
#[derive(Debug)]
struct Pending {
    seq: u32,
    request_id: String,
    reply_to: String,
    deadline: Instant,
    received: Instant,
}

/// What a logged-in cabinet's session keeps. Owned by the connection's task (its future holds
/// it once) and lent to the loop, so nothing is copied from one nested future into the next:
/// an idle connection's memory is mostly this, the socket and one timer (BENCHMARKS.md).
#[derive(Debug)]
pub(super) struct Live {
    /// Identity, epoch and queue; `handle.device` is this cabinet's key.
    handle: Arc<SessionHandle>,
    /// Sequence numbers of frames we originate (SPEC.md 1.6).
    next_seq: u32,
    pending: Vec<Pending>,
    /// Seqs of uplinks on their way to Redis, acknowledged when confirmed. A retransmission of
    /// one of them is not forwarded again: its `ACK` is already coming.
    awaiting: Vec<u32>,
    /// Set while written bytes wait for the socket: past it the reader is too slow.
    write_deadline: Option<Instant>,
}

impl Live {
    pub(super) fn new(login: LoggedIn) -> Self {
        Self { handle: login.handle, next_seq: 1, pending: Vec::new(), awaiting: Vec::new(), write_deadline: None }
    }
}

struct Session<'a> {
    conn: &'a mut Conn,
    ctx: &'a Ctx,
    live: &'a mut Live,
}

/// Serves a logged-in cabinet until its session ends, then cleans up.
pub(super) async fn run(conn: &mut Conn, ctx: &Ctx, live: &mut Live) {
    let mut s = Session { conn, ctx, live };
    // Frames the cabinet wrote right behind its LOGIN (one segment) are already in the read
    // buffer: serve them now, not when more bytes happen to arrive.
    let end = match s.on_bytes().and_then(|()| s.push_out()) {
        Ok(()) => s.serve().await,
        Err(end) => end,
    };
    // Boxed: the clean-up's Redis calls are large futures, needed once at the end; the loop that
    // lives for days should not carry their size.
    Box::pin(s.finish(end)).await;
}

impl Session<'_> {
    fn key(&self) -> &DeviceKey {
        &self.live.handle.device
    }

    /// The loop. One timer serves the idle timeout, command deadlines, the write deadline and
    /// the drain delay, so an idle session carries one timer entry, not four. Writes never
    /// block the loop: what the socket does not take waits, bounded in time and size.
    async fn serve(&mut self) -> End {
        let idle_timeout = Duration::from_millis(self.ctx.config.cabinet.idle_timeout_ms);
        let mut idle_deadline = Instant::now() + idle_timeout;
        let mut drain_deadline: Option<Instant> = None;
        if self.ctx.drain.is_cancelled() {
            // Logged in while the node started draining.
            self.live.handle.end(EndReason::Drain);
        }
        let timer = sleep_until(idle_deadline);
        tokio::pin!(timer);
        loop {
            let wake = [
                Some(idle_deadline),
                drain_deadline,
                self.live.write_deadline,
                self.live.pending.iter().map(|p| p.deadline).min(),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(idle_deadline);
            if timer.deadline() != wake {
                timer.as_mut().reset(wake);
            }
            let waiting_to_write = self.conn.pending_write() > 0;
            let step = match next_wake(&self.live.handle, timer.as_mut(), self.conn, true, waiting_to_write).await {
                Wake::Handle => {
                    // Stored uplinks are acknowledged first, whatever else is asked.
                    self.send_confirmed();
                    match self.live.handle.end_reason() {
                        EndReason::TakenOver => Err(End::TakenOver),
                        EndReason::Revoked => Err(End::Revoked),
                        EndReason::Close => Err(End::Drain),
                        reason => {
                            if reason == EndReason::Drain && drain_deadline.is_none() {
                                let delay_ms = fastrand::u64(0..self.ctx.config.drain.spread_ms.max(1));
                                self.send_notice(NoticeKind::Reconnect, delay_ms, "gateway draining");
                                // Keep serving until the cabinet leaves, a moment after its delay.
                                drain_deadline = Some(Instant::now() + Duration::from_millis(delay_ms + 1000));
                            }
                            self.send_downlinks();
                            Ok(())
                        }
                    }
                }
                Wake::Timer => {
                    let now = Instant::now();
                    if now >= idle_deadline {
                        // Silent, unless bytes wait unread: a node that was paused or starved
                        // (its timers fire late) must not blame its cabinets for its own stall.
                        // They are read once the runtime sees them.
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
                        self.expire_pending();
                        Ok(())
                    }
                }
                Wake::Io(Ok(Event::Read(0))) => Err(End::PeerClosed),
                Wake::Io(Ok(Event::Read(n))) => {
                    self.ctx.metrics.cabinet.bytes_in(n);
                    idle_deadline = Instant::now() + idle_timeout;
                    self.on_bytes()
                }
                // Room again: push_out below sends what waited.
                Wake::Io(Ok(Event::Writable)) => Ok(()),
                Wake::Io(Err(_)) => Err(End::Io),
            };
            // Whatever the step queued (answers, an ERROR before a close) goes out now.
            let pushed = self.push_out();
            self.live.pending.release_if_empty();
            self.live.awaiting.release_if_empty();
            if let Err(end) = step.and(pushed) {
                return end;
            }
        }
    }

    fn seq(&mut self) -> u32 {
        let seq = self.live.next_seq;
        self.live.next_seq = if self.live.next_seq == u32::MAX { 1 } else { self.live.next_seq + 1 };
        seq
    }

    fn send(&mut self, frame: &Frame) {
        queue(self.conn, self.ctx, frame);
    }

    fn send_notice(&mut self, kind: NoticeKind, delay_ms: u64, text: &str) {
        let seq = self.seq();
        let notice = Notice {
            kind,
            delay_ms: u32::try_from(delay_ms).unwrap_or(u32::MAX),
            port: 0,
            host: String::new(),
            text: text.to_owned(),
        };
        self.send(&Frame::new(seq, Message::Notice(notice)));
    }

    /// Writes what the socket takes now. Bytes left waiting arm the write deadline; more than
    /// `MAX_PENDING_WRITE` of them, or the deadline passing, means a reader too slow to keep.
    fn push_out(&mut self) -> Result<(), End> {
        match self.conn.try_flush() {
            Ok(n) => self.ctx.metrics.cabinet.bytes_out(n),
            Err(_) => return Err(End::Io),
        }
        let waiting = self.conn.pending_write();
        if waiting == 0 {
            self.live.write_deadline = None;
        } else if waiting > MAX_PENDING_WRITE {
            return Err(End::SlowReader);
        } else if self.live.write_deadline.is_none() {
            self.live.write_deadline =
                Some(Instant::now() + Duration::from_millis(self.ctx.config.cabinet.write_timeout_ms));
        }
        Ok(())
    }

    /// Decodes and handles every whole frame in the read buffer.
    fn on_bytes(&mut self) -> Result<(), End> {
        loop {
            match cabinet::decode(self.conn.read_buf(), MAX_PAYLOAD_LEN) {
                Ok(Some(frame)) => self.on_frame(frame),
                Ok(None) => break,
                Err(e) => {
                    self.ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, e.label()]).inc();
                    tracing::debug!(error = %e, "frame rejected");
                    self.send(&error_frame(&e));
                    if e.is_fatal() {
                        return Err(End::ProtocolError(e.label()));
                    }
                }
            }
        }
        self.conn.release_read_buf();
        Ok(())
    }

    fn on_frame(&mut self, frame: Frame) {
        let kind = frame.message.message_type();
        self.ctx.metrics.cabinet.frame_in(kind.label());
        let seq = frame.seq;
        match frame.message {
            Message::Heartbeat(_) => {
                self.ctx.upstream.heartbeat(self.key(), self.live.handle.epoch);
                let ack = HeartbeatAck { server_time_ms: now_ms() };
                self.send(&Frame::new(seq, Message::HeartbeatAck(ack)));
            }
            message @ (Message::WeightReport(_) | Message::DoorEvent(_)) => {
                // Door events are always acknowledged (SPEC.md 1.4); reports when asked.
                let must_ack = frame.flags.ack_requested() || matches!(message, Message::DoorEvent(_));
                // A cabinet session's key is always a cabinet's.
                let Some(device) = self.key().cabinet_id().cloned() else { return };
                // A device time is trusted only as far as the login's clock check goes: a reading
                // stamped far ahead would otherwise win every "newest" comparison downstream, and
                // one far back would settle against the wrong shelf (SPEC.md 1.6).
                let at_ms = now_ms();
                let device_ms = match &message {
                    Message::WeightReport(r) => r.sample_time_ms,
                    Message::DoorEvent(e) => e.event_time_ms,
                    _ => at_ms,
                };
                let skew_ms = self.ctx.config.cabinet.max_clock_skew_s.saturating_mul(1000);
                if device_ms.abs_diff(at_ms) > skew_ms {
                    self.ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, "clock_skew"]).inc();
                    let detail =
                        format!("device time {device_ms} is more than {skew_ms} ms from the gateway's {at_ms}");
                    self.send(&error(seq, ErrorCode::Malformed, &detail));
                    return;
                }
                if must_ack && self.live.awaiting.contains(&seq) {
                    // A retransmission of a frame still on its way to Redis: its ACK follows.
                    self.ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, "awaiting_store"]).inc();
                    return;
                }
                if must_ack && self.live.awaiting.len() >= self.ctx.config.cabinet.max_unconfirmed {
                    self.ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, "unconfirmed_limit"]).inc();
                    self.send(&error(seq, ErrorCode::Busy, "too many frames waiting to be stored; retry"));
                    return;
                }
                let event = UpEvent::Cabinet {
                    device,
                    epoch: self.live.handle.epoch,
                    node: self.ctx.node().to_owned(),
                    at_ms,
                    seq,
                    message,
                };
                let confirm = must_ack.then_some((&self.live.handle, seq));
                match self.ctx.upstream.offer_confirmed(&event, confirm) {
                    Ok(()) if must_ack => self.live.awaiting.push(seq),
                    Ok(()) => {}
                    Err(_) if must_ack => self.send(&error(seq, ErrorCode::Busy, "gateway buffer full; retry")),
                    Err(_) => {}
                }
            }
            Message::CommandResult(result) => match self.live.pending.iter().position(|p| p.seq == seq) {
                Some(i) => {
                    let p = self.live.pending.swap_remove(i);
                    self.ctx
                        .metrics
                        .command_duration
                        .with_label_values(&[PROTOCOL])
                        .observe(p.received.elapsed().as_secs_f64());
                    self.ctx.reply(PROTOCOL, &p.request_id, &p.reply_to, self.key(), Outcome::Cabinet(result));
                }
                None => {
                    // Late (after its deadline) or never asked for.
                    self.ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, "unmatched_result"]).inc();
                }
            },
            Message::Error(e) => tracing::debug!(code = ?e.code, detail = %e.detail, seq, "cabinet reported an error"),
            Message::Login(_) | Message::Hello(_) => {
                self.ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, "unexpected"]).inc();
                self.send(&error(seq, ErrorCode::Unexpected, "already logged in"));
            }
            Message::LoginResult(_)
            | Message::Challenge(_)
            | Message::HeartbeatAck(_)
            | Message::Ack
            | Message::Command(_)
            | Message::Notice(_) => {
                self.ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, "unexpected"]).inc();
                self.send(&error(seq, ErrorCode::Unexpected, "downlink type sent by a cabinet"));
            }
        }
    }

    /// Before a close the cabinet can still hear: waits (at most [`CONFIRM_GRACE`]) for the
    /// uplinks still on their way to Redis, acknowledging each, so a drained cabinet does not
    /// send them again elsewhere.
    async fn await_confirmations(&mut self) {
        let deadline = Instant::now() + CONFIRM_GRACE;
        self.send_confirmed();
        while !self.live.awaiting.is_empty() && self.live.handle.wakeup_before(deadline).await {
            self.send_confirmed();
        }
    }

    /// Acknowledges every uplink Redis has confirmed since the last call.
    fn send_confirmed(&mut self) {
        for seq in self.live.handle.take_confirmed() {
            self.live.awaiting.retain(|s| *s != seq);
            self.send(&Frame::new(seq, Message::Ack));
        }
    }

    fn send_downlinks(&mut self) {
        let now = now_ms();
        for d in self.live.handle.take_all() {
            let Downlink { request_id, reply_to, deadline_ms, received, body } = d;
            if deadline_ms <= now {
                self.ctx.reply(PROTOCOL, &request_id, &reply_to, self.key(), Outcome::TimedOut);
                continue;
            }
            let CommandBody::Cabinet(action) = body else {
                self.ctx.reply(
                    PROTOCOL,
                    &request_id,
                    &reply_to,
                    self.key(),
                    Outcome::Invalid("not a cabinet command".into()),
                );
                continue;
            };
            let seq = self.seq();
            self.send(&Frame::new(seq, Message::Command(Command { expires_at_ms: deadline_ms, action })));
            let deadline = Instant::now() + Duration::from_millis(deadline_ms - now);
            self.live.pending.push(Pending { seq, request_id, reply_to, deadline, received });
        }
    }

    fn expire_pending(&mut self) {
        let now = Instant::now();
        let (expired, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.live.pending).into_iter().partition(|p| p.deadline <= now);
        self.live.pending = kept;
        for p in expired {
            self.ctx.reply(PROTOCOL, &p.request_id, &p.reply_to, self.key(), Outcome::TimedOut);
        }
    }

    /// Answers what is still open, tells the cabinet why it is being closed, and removes the
    /// session from the node and the map.
    async fn finish(mut self, end: End) {
        if end == End::TakenOver {
            self.send_notice(NoticeKind::SessionReplaced, 0, "another connection logged in with this device id");
        }
        if !matches!(end, End::SlowReader | End::Io | End::PeerClosed) {
            self.await_confirmations().await;
            if let Ok(n) = self.conn.flush(Duration::from_millis(self.ctx.config.cabinet.write_timeout_ms)).await {
                self.ctx.metrics.cabinet.bytes_out(n);
            }
            self.conn.close().await;
        }
        // The device can no longer answer; senders learn it now rather than at their deadline.
        for p in std::mem::take(&mut self.live.pending) {
            self.ctx.reply(PROTOCOL, &p.request_id, &p.reply_to, self.key(), Outcome::NotConnected);
        }
        for d in self.live.handle.take_all() {
            self.ctx.reply(PROTOCOL, &d.request_id, &d.reply_to, self.key(), Outcome::NotConnected);
        }
        // Counted before the close event goes upstream, so whoever sees the event sees the count.
        self.ctx.metrics.sessions_closed.with_label_values(&[PROTOCOL, end.label()]).inc();
        self.ctx.registry.remove_local(&self.live.handle);
        self.ctx.registry.release(self.key(), self.live.handle.session).await;
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
            End::ProtocolError(why) => tracing::info!(reason = end.label(), why, "cabinet session ended"),
            _ => tracing::info!(reason = end.label(), "cabinet session ended"),
        }
    }
}
