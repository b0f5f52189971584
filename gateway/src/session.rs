//! What the rest of the node knows about a live session: its identity and epoch, a bounded
//! queue of downlinks for it, and a way to end it. The session's own task is the only writer
//! to its socket; everyone else goes through this handle.
//!
//! The handle is deliberately small (no channel, no per-session timer): an idle session costs
//! an `Arc`, a `Notify` and an empty queue, which allocates nothing until a command arrives.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};

use protocol::bus::{CommandBody, DeviceKey};
use tokio::sync::Notify;
use tokio::time::Instant;

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

/// Why a session is being ended from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EndReason {
    /// Not being ended.
    None = 0,
    /// The device logged in again (here or on another node).
    TakenOver = 1,
    /// The node is draining.
    Drain = 2,
}

impl EndReason {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => EndReason::TakenOver,
            2 => EndReason::Drain,
            _ => EndReason::None,
        }
    }
}

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
    /// Unique across nodes and restarts (`node/incarnation/n`): what the map entry names.
    pub session_id: String,
    /// Downlinks waiting for the session task. A std mutex: held for a push or a drain, never
    /// across an `.await`.
    queue: Mutex<VecDeque<Downlink>>,
    queue_max: usize,
    /// Wakes the session task for a downlink or an end request.
    notify: Notify,
    end: AtomicU8,
}

impl SessionHandle {
    /// A handle for a session that just logged in.
    pub fn new(device: DeviceKey, epoch: u64, session_id: String, queue_max: usize) -> Self {
        Self {
            device,
            epoch,
            session_id,
            queue: Mutex::new(VecDeque::new()),
            queue_max,
            notify: Notify::new(),
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
        self.notify.notify_one();
        Ok(())
    }

    /// Takes every waiting downlink.
    pub fn take_all(&self) -> VecDeque<Downlink> {
        let mut queue = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::take(&mut *queue)
    }

    /// Asks the session to end. The first reason wins.
    pub fn end(&self, reason: EndReason) {
        let _ = self.end.compare_exchange(EndReason::None as u8, reason as u8, Ordering::AcqRel, Ordering::Acquire);
        self.notify.notify_one();
    }

    /// Whether (and why) the session was asked to end.
    pub fn end_reason(&self) -> EndReason {
        EndReason::from_u8(self.end.load(Ordering::Acquire))
    }

    /// Completes when a downlink or an end request arrives.
    ///
    /// # Cancel safety
    /// Cancel safe: a wake-up that arrives while nobody waits is kept as a permit.
    pub async fn wakeup(&self) {
        self.notify.notified().await;
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
        SessionHandle::new(device, 1, "n/1/1".into(), max)
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
    async fn first_end_reason_wins() {
        let h = handle(1);
        assert_eq!(h.end_reason(), EndReason::None);
        h.end(EndReason::TakenOver);
        h.end(EndReason::Drain);
        h.wakeup().await;
        assert_eq!(h.end_reason(), EndReason::TakenOver);
    }
}
