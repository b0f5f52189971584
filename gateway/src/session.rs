//! What the rest of the node knows about a live session: its identity and epoch, a bounded
//! queue of downlinks for it, and a way to end it. The session's own task is the only writer
//! to its socket; everyone else goes through this handle.
//!
//! The handle is deliberately small (no channel, no per-session timer): an idle session costs
//! an `Arc`, a `Notify` and two empty queues, which allocate nothing until a command arrives or
//! an uplink waits for Redis.
//!
//! The handle is also how the upstream writer tells a session that its uplinks are stored
//! ([`Confirm`]): the session acknowledges them to the device only then.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use protocol::bus::{CommandBody, DeviceKey};
use tokio::time::{Instant, Sleep};

use crate::stream_writer::Confirm;
use crate::transport::{Conn, Event};

/// A command on its way to one device.
#[derive(Debug)]
pub struct Downlink {
    /// The sender's request id.
    pub request_id: String,
    /// Where the reply goes (empty: nowhere).
    pub reply_to: String,
    /// Deadline, ms since the Unix epoch: also the cabinet command's `expires_at`.
    pub deadline_ms: u64,
    /// When the node read it, for the latency histogram.
    pub received: Instant,
    /// What to send.
    pub body: CommandBody,
}

/// What the node asks of a session from outside. Requests only escalate: a later, stronger
/// request replaces a weaker one, never the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum EndReason {
    /// Nothing asked.
    None = 0,
    /// The node is draining: tell the device to reconnect elsewhere and leave after a delay.
    Drain = 1,
    /// The device logged in again (here or on another node): end now.
    TakenOver = 2,
    /// The device's credentials were rotated or it was disabled: end now.
    Revoked = 3,
    /// The drain's grace is running out: end now.
    Close = 4,
}

impl EndReason {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => EndReason::Drain,
            2 => EndReason::TakenOver,
            3 => EndReason::Revoked,
            4 => EndReason::Close,
            _ => EndReason::None,
        }
    }
}

/// Gives an empty collection's memory back. Per-session queues are empty almost all the time;
/// keeping the capacity of the last burst would cost every idle session that burst's size.
pub trait ReleaseIfEmpty {
    /// Frees the allocation if there are no elements.
    fn release_if_empty(&mut self);
}

impl<T> ReleaseIfEmpty for Vec<T> {
    fn release_if_empty(&mut self) {
        if self.is_empty() && self.capacity() > 0 {
            *self = Vec::new();
        }
    }
}

impl<T> ReleaseIfEmpty for VecDeque<T> {
    fn release_if_empty(&mut self) {
        if self.is_empty() && self.capacity() > 0 {
            *self = VecDeque::new();
        }
    }
}

/// How long a closing session waits for its uplinks still on their way to Redis, to
/// acknowledge them before the device is gone: a Redis round trip is milliseconds; past this
/// the device sends them again after its reconnect (SPEC.md 1.10, 2.2), harmlessly.
pub const CONFIRM_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The queue was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

/// The shared side of one session.
#[derive(Debug)]
pub struct SessionHandle {
    /// The device.
    pub device: DeviceKey,
    /// The session's fencing token from the connection map.
    pub epoch: u64,
    /// This node's number for the session; with the node and its incarnation it forms the id
    /// the map entry names (`node/incarnation/n`, see [`Registry::session_id`](crate::registry::Registry::session_id)).
    pub session: u64,
    /// Downlinks waiting for the session task. A std mutex: held for a push or a drain, never
    /// across an `.await`.
    queue: Mutex<VecDeque<Downlink>>,
    queue_max: usize,
    /// Tokens of uplinks Redis has confirmed, for the session to acknowledge. Bounded by the
    /// session itself: it has at most its own limit of uplinks on the way.
    confirmed: Mutex<Vec<u32>>,
    /// Wakes the session task for a downlink or an end request: a flag plus the task's waker,
    /// polled by the session loop without any per-wait state.
    woken: AtomicBool,
    waker: AtomicWaker,
    end: AtomicU8,
}

impl SessionHandle {
    /// A handle for a session that just logged in.
    pub fn new(device: DeviceKey, epoch: u64, session: u64, queue_max: usize) -> Self {
        Self {
            device,
            epoch,
            session,
            queue: Mutex::new(VecDeque::new()),
            queue_max,
            confirmed: Mutex::new(Vec::new()),
            woken: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            end: AtomicU8::new(EndReason::None as u8),
        }
    }

    /// Queues a downlink and wakes the session.
    ///
    /// # Errors
    /// [`QueueFull`] when `queue_max` downlinks are already waiting: the caller answers "busy".
    pub fn push(&self, downlink: Downlink) -> Result<(), (QueueFull, Downlink)> {
        {
            let mut queue = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if queue.len() >= self.queue_max {
                return Err((QueueFull, downlink));
            }
            queue.push_back(downlink);
        }
        self.wake();
        Ok(())
    }

    /// Takes every waiting downlink.
    pub fn take_all(&self) -> VecDeque<Downlink> {
        let mut queue = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::take(&mut *queue)
    }

    /// Takes the tokens of every uplink confirmed since the last call, in the order Redis
    /// confirmed them.
    pub fn take_confirmed(&self) -> Vec<u32> {
        let mut confirmed = self.confirmed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::take(&mut *confirmed)
    }

    /// Asks something of the session (see [`EndReason`]); the strongest request stands.
    pub fn end(&self, reason: EndReason) {
        self.end.fetch_max(reason as u8, Ordering::AcqRel);
        self.wake();
    }

    /// Whether (and why) the session was asked to end.
    pub fn end_reason(&self) -> EndReason {
        EndReason::from_u8(self.end.load(Ordering::Acquire))
    }

    fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Ready once a downlink or an end request arrived since the last time it was ready. A
    /// wake-up that arrives while nobody polls is kept.
    pub fn poll_wakeup(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.woken.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // A wake between the check and the registration must not be lost.
        if self.woken.swap(false, Ordering::AcqRel) { Poll::Ready(()) } else { Poll::Pending }
    }

    /// [`SessionHandle::poll_wakeup`] as a future.
    pub async fn wakeup(&self) {
        std::future::poll_fn(|cx| self.poll_wakeup(cx)).await;
    }

    /// [`SessionHandle::wakeup`], giving up at `deadline`: `false` if it passed first.
    pub async fn wakeup_before(&self, deadline: Instant) -> bool {
        tokio::time::timeout_at(deadline, self.wakeup()).await.is_ok()
    }
}

impl Confirm for SessionHandle {
    fn confirmed(&self, token: u32) {
        self.confirmed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(token);
        self.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn downlink(id: &str) -> Downlink {
        Downlink {
            request_id: id.into(),
            reply_to: String::new(),
            deadline_ms: 0,
            received: Instant::now(),
            body: CommandBody::Kick { epoch: 1 },
        }
    }

    fn handle(max: usize) -> SessionHandle {
        let device = DeviceKey::parse("cab:C1").expect("valid");
        SessionHandle::new(device, 1, 1, max)
    }

    #[tokio::test]
    async fn queue_is_bounded_and_wakes() {
        let h = handle(2);
        assert!(h.push(downlink("a")).is_ok());
        assert!(h.push(downlink("b")).is_ok());
        let Err((QueueFull, back)) = h.push(downlink("c")) else { panic!("third push must fail") };
        assert_eq!(back.request_id, "c");
        // The permit from the pushes is kept: this completes at once.
        h.wakeup().await;
        let ids: Vec<_> = h.take_all().into_iter().map(|d| d.request_id).collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(h.take_all().is_empty());
    }

    #[tokio::test]
    async fn requests_only_escalate() {
        let h = handle(1);
        assert_eq!(h.end_reason(), EndReason::None);
        h.end(EndReason::Drain);
        h.wakeup().await;
        assert_eq!(h.end_reason(), EndReason::Drain);
        h.end(EndReason::TakenOver);
        h.end(EndReason::Drain);
        assert_eq!(h.end_reason(), EndReason::TakenOver);
        h.end(EndReason::Revoked);
        assert_eq!(h.end_reason(), EndReason::Revoked);
        h.end(EndReason::TakenOver);
        assert_eq!(h.end_reason(), EndReason::Revoked);
        h.end(EndReason::Close);
        assert_eq!(h.end_reason(), EndReason::Close);
    }
}

/// What woke a session's task.
#[derive(Debug)]
pub enum Wake {
    /// A downlink, a confirmation or an end request.
    Handle,
    /// The earliest deadline passed.
    Timer,
    /// The socket: bytes read, or room to write.
    Io(std::io::Result<Event>),
}

/// Waits for a session's next thing to do: its handle (downlinks, end requests) first, then
/// its timer, then its socket, so a device flooding bytes cannot starve its own commands.
/// Poll functions throughout: the wait itself keeps no state (BENCHMARKS.md, memory).
/// `want_read` false stops reading (backpressure) while the rest still wakes the session.
pub async fn next_wake(
    handle: &SessionHandle,
    mut timer: Pin<&mut Sleep>,
    conn: &mut Conn,
    want_read: bool,
    want_write: bool,
) -> Wake {
    std::future::poll_fn(|cx| {
        if handle.poll_wakeup(cx).is_ready() {
            return Poll::Ready(Wake::Handle);
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Wake::Timer);
        }
        conn.poll_wait(cx, want_read, want_write).map(Wake::Io)
    })
    .await
}
