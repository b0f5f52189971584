//! A logged-in cabinet: one task, one select loop, the only writer to the socket.
//!
//! The loop waits for bytes from the cabinet, downlinks or an end request from the handle,
//! the earliest command deadline, the idle timeout, and the drain signal. Uplink frames are
//! answered and forwarded; commands get a sequence number and are matched with their
//! `COMMAND_RESULT`.

use std::sync::Arc;
use std::time::Duration;

use protocol::DeviceId;
use protocol::bus::{CommandBody, DeviceKey, Outcome, UpEvent};
use protocol::cabinet::{self, Command, ErrorCode, Frame, HeartbeatAck, MAX_PAYLOAD_LEN, Message, Notice, NoticeKind};
use tokio::time::{Instant, sleep, sleep_until};

use super::login::LoggedIn;
use super::{PROTOCOL, error, error_frame, queue};
use crate::clock::now_ms;
use crate::context::Ctx;
use crate::session::{Downlink, EndReason, SessionHandle};
use crate::transport::{Conn, WriteError};

/// Why a session ended: the `reason` label of `gateway_sessions_closed_total` and of the
/// `close` upstream event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    PeerClosed,
    IdleTimeout,
    TakenOver,
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

struct Session {
    conn: Conn,
    ctx: Arc<Ctx>,
    handle: Arc<SessionHandle>,
    device: DeviceId,
    key: DeviceKey,
    /// Sequence numbers of frames we originate (SPEC.md 1.6).
    next_seq: u32,
    pending: Vec<Pending>,
}

pub(super) async fn run(conn: Conn, login: LoggedIn, ctx: Arc<Ctx>) {
    let key = login.handle.device.clone();
    let mut s =
        Session { conn, ctx, handle: login.handle, device: login.device, key, next_seq: 1, pending: Vec::new() };
    let end = match s.flush().await {
        Ok(()) => s.serve().await,
        Err(end) => end,
    };
    s.finish(end).await;
}

impl Session {
    async fn serve(&mut self) -> End {
        let idle_timeout = Duration::from_millis(self.ctx.config.cabinet.idle_timeout_ms);
        let idle = sleep(idle_timeout);
        tokio::pin!(idle);
        let mut drain_deadline: Option<Instant> = None;
        let drain = self.ctx.drain.clone();
        loop {
            let next_deadline = self.pending.iter().map(|p| p.deadline).min();
            tokio::select! {
                read = self.conn.fill() => match read {
                    Ok(0) => return End::PeerClosed,
                    Ok(n) => {
                        self.ctx.metrics.bytes_in.with_label_values(&[PROTOCOL]).inc_by(n as u64);
                        idle.as_mut().reset(Instant::now() + idle_timeout);
                        if let Err(end) = self.on_bytes() {
                            let _ = self.flush().await;
                            return end;
                        }
                        if let Err(end) = self.flush().await {
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
                    self.send_downlinks();
                    if let Err(end) = self.flush().await {
                        return end;
                    }
                }
                () = sleep_until(next_deadline.unwrap_or_else(Instant::now)), if next_deadline.is_some() => {
                    self.expire_pending();
                }
                () = &mut idle => return End::IdleTimeout,
                () = drain.cancelled(), if drain_deadline.is_none() => {
                    let delay_ms = fastrand::u64(0..self.ctx.config.drain.spread_ms.max(1));
                    self.send_notice(NoticeKind::Reconnect, delay_ms, "gateway draining");
                    if let Err(end) = self.flush().await {
                        return end;
                    }
                    // Keep serving until the cabinet leaves, a moment after its delay.
                    drain_deadline = Some(Instant::now() + Duration::from_millis(delay_ms + 1000));
                }
                () = sleep_until(drain_deadline.unwrap_or_else(Instant::now)), if drain_deadline.is_some() => {
                    return End::Drain;
                }
            }
        }
    }

    fn seq(&mut self) -> u32 {
        let seq = self.next_seq;
        self.next_seq = if self.next_seq == u32::MAX { 1 } else { self.next_seq + 1 };
        seq
    }

    fn send(&mut self, frame: &Frame) {
        queue(&mut self.conn, &self.ctx, frame);
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
        self.ctx.metrics.frames_in.with_label_values(&[PROTOCOL, kind.label()]).inc();
        let seq = frame.seq;
        match frame.message {
            Message::Heartbeat(_) => {
                self.ctx.upstream.heartbeat(&self.key, self.handle.epoch);
                let ack = HeartbeatAck { server_time_ms: now_ms() };
                self.send(&Frame::new(seq, Message::HeartbeatAck(ack)));
            }
            message @ (Message::WeightReport(_) | Message::DoorEvent(_)) => {
                // Door events are always acknowledged (SPEC.md 1.4); reports when asked.
                let must_ack = frame.flags.ack_requested() || matches!(message, Message::DoorEvent(_));
                let event = UpEvent::Cabinet {
                    device: self.device.clone(),
                    epoch: self.handle.epoch,
                    node: self.ctx.node().to_owned(),
                    at_ms: now_ms(),
                    seq,
                    message,
                };
                let accepted = self.ctx.upstream.offer(&event).is_ok();
                if must_ack {
                    let answer = if accepted {
                        Frame::new(seq, Message::Ack)
                    } else {
                        error(seq, ErrorCode::Busy, "gateway buffer full; retry")
                    };
                    self.send(&answer);
                }
            }
            Message::CommandResult(result) => match self.pending.iter().position(|p| p.seq == seq) {
                Some(i) => {
                    let p = self.pending.swap_remove(i);
                    self.ctx
                        .metrics
                        .command_duration
                        .with_label_values(&[PROTOCOL])
                        .observe(p.received.elapsed().as_secs_f64());
                    self.ctx.reply(PROTOCOL, &p.request_id, &p.reply_to, &self.key, Outcome::Cabinet(result));
                }
                None => {
                    // Late (after its deadline) or never asked for.
                    self.ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, "unmatched_result"]).inc();
                }
            },
            Message::Error(e) => tracing::debug!(code = ?e.code, detail = %e.detail, seq, "cabinet reported an error"),
            Message::Login(_) => {
                self.ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, "unexpected"]).inc();
                self.send(&error(seq, ErrorCode::Unexpected, "already logged in"));
            }
            Message::LoginResult(_)
            | Message::HeartbeatAck(_)
            | Message::Ack
            | Message::Command(_)
            | Message::Notice(_) => {
                self.ctx.metrics.frames_rejected.with_label_values(&[PROTOCOL, "unexpected"]).inc();
                self.send(&error(seq, ErrorCode::Unexpected, "downlink type sent by a cabinet"));
            }
        }
    }

    fn send_downlinks(&mut self) {
        let now = now_ms();
        for d in self.handle.take_all() {
            let Downlink { request_id, reply_to, deadline_ms, received, body } = d;
            if deadline_ms <= now {
                self.ctx.reply(PROTOCOL, &request_id, &reply_to, &self.key, Outcome::TimedOut);
                continue;
            }
            let CommandBody::Cabinet(action) = body else {
                self.ctx.reply(
                    PROTOCOL,
                    &request_id,
                    &reply_to,
                    &self.key,
                    Outcome::Invalid("not a cabinet command".into()),
                );
                continue;
            };
            let seq = self.seq();
            self.send(&Frame::new(seq, Message::Command(Command { expires_at_ms: deadline_ms, action })));
            let deadline = Instant::now() + Duration::from_millis(deadline_ms - now);
            self.pending.push(Pending { seq, request_id, reply_to, deadline, received });
        }
    }

    fn expire_pending(&mut self) {
        let now = Instant::now();
        let (expired, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.pending).into_iter().partition(|p| p.deadline <= now);
        self.pending = kept;
        for p in expired {
            self.ctx.reply(PROTOCOL, &p.request_id, &p.reply_to, &self.key, Outcome::TimedOut);
        }
    }

    /// Answers what is still open, tells the cabinet why it is being closed, and removes the
    /// session from the node and the map.
    async fn finish(mut self, end: End) {
        if end == End::TakenOver {
            self.send_notice(NoticeKind::SessionReplaced, 0, "another connection logged in with this device id");
        }
        if !matches!(end, End::SlowReader | End::Io | End::PeerClosed) {
            let _ = self.flush().await;
            self.conn.close().await;
        }
        // The device can no longer answer; senders learn it now rather than at their deadline.
        for p in std::mem::take(&mut self.pending) {
            self.ctx.reply(PROTOCOL, &p.request_id, &p.reply_to, &self.key, Outcome::NotConnected);
        }
        for d in self.handle.take_all() {
            self.ctx.reply(PROTOCOL, &d.request_id, &d.reply_to, &self.key, Outcome::NotConnected);
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
            End::ProtocolError(why) => tracing::info!(reason = end.label(), why, "cabinet session ended"),
            _ => tracing::info!(reason = end.label(), "cabinet session ended"),
        }
    }
}
