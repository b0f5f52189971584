//! Device traffic on its way to the device service (SPEC.md 3.2).
//!
//! Sessions hand events to [`Upstream`], which puts each on its device's shard stream through
//! a [`StreamWriter`]: order per device is kept (one device, one shard, one writer), and
//! while Redis is away accepted events wait in the bounded buffer. An event the device expects
//! acknowledged is offered with the session's handle and a token; the session hears back once
//! Redis has the entry, and only then acknowledges it. Heartbeats are aggregated:
//! each window becomes one `hb` entry with the node's count and each device's last heartbeat,
//! instead of one entry per heartbeat.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::bus::{DeviceKey, HeartbeatSeen, Keys, UpEvent};
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::metrics::Metrics;
use crate::session::SessionHandle;
use crate::stream_writer::{Entry, Receipt, StreamWriter};

fn receipt(confirm: Option<(&Arc<SessionHandle>, u32)>) -> Option<Receipt> {
    confirm.map(|(handle, token)| Receipt { to: Arc::clone(handle) as Arc<dyn crate::stream_writer::Confirm>, token })
}

/// The buffer is full; the event was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferFull;

#[derive(Debug, Default)]
struct HeartbeatWindow {
    start_ms: u64,
    count: u64,
    last: HashMap<DeviceKey, (u64, u64)>,
}

/// The sessions' side of the upstream path.
#[derive(Debug)]
pub struct Upstream {
    writer: StreamWriter,
    /// The shards' stream keys, made once.
    streams: Vec<Arc<str>>,
    shards: u16,
    node: String,
    /// Where the live cabinet session count comes from.
    registry: Arc<crate::registry::Registry>,
    /// The current heartbeat window. A std mutex: one insert per heartbeat, never held across
    /// an `.await`.
    window: Mutex<HeartbeatWindow>,
    metrics: Metrics,
}

impl Upstream {
    /// The upstream of `node`, writing through `writer`.
    pub fn new(
        writer: StreamWriter,
        keys: Keys,
        shards: u16,
        registry: Arc<crate::registry::Registry>,
        metrics: Metrics,
    ) -> Self {
        let window = Mutex::new(HeartbeatWindow { start_ms: now_ms(), ..HeartbeatWindow::default() });
        let node = registry.node().to_owned();
        let streams = (0..shards.max(1)).map(|s| Arc::from(keys.upstream(s))).collect();
        Self { writer, streams, shards, node, registry, window, metrics }
    }

    /// This node's id, as events carry it.
    pub fn node(&self) -> &str {
        &self.node
    }

    fn entry(&self, event: &UpEvent, receipt: Option<Receipt>) -> Option<Entry> {
        // Heartbeat windows are node-wide; they travel on shard 0.
        let shard = event.device().map_or(0, |d| d.shard(self.shards));
        match event.to_fields() {
            Ok(fields) => Some(Entry {
                key: Arc::clone(&self.streams[usize::from(shard) % self.streams.len()]),
                fields,
                label: event.label(),
                receipt,
            }),
            Err(e) => {
                tracing::error!(error = %e, event = event.label(), "failed to encode upstream event");
                None
            }
        }
    }

    /// Accepts an event for forwarding.
    ///
    /// # Errors
    /// [`BufferFull`] if the buffer is full; nothing was accepted and the drop is counted.
    pub fn offer(&self, event: &UpEvent) -> Result<(), BufferFull> {
        self.offer_confirmed(event, None)
    }

    /// Like [`Upstream::offer`]; once Redis has the entry, `session` is told `token`
    /// ([`crate::stream_writer::Confirm`]). A refused event is never confirmed.
    ///
    /// # Errors
    /// [`BufferFull`] if the buffer is full; nothing was accepted and the drop is counted.
    pub fn offer_confirmed(
        &self,
        event: &UpEvent,
        confirm: Option<(&Arc<SessionHandle>, u32)>,
    ) -> Result<(), BufferFull> {
        let Some(entry) = self.entry(event, receipt(confirm)) else { return Err(BufferFull) };
        self.writer.offer(entry).map_err(|_| {
            self.metrics.upstream_dropped.with_label_values(&[event.label()]).inc();
            BufferFull
        })
    }

    /// Like [`Upstream::offer`], without counting a refusal: for retries of an event whose
    /// first refusal was counted already.
    ///
    /// # Errors
    /// [`BufferFull`] if the buffer is still full.
    pub fn offer_quietly(
        &self,
        event: &UpEvent,
        confirm: Option<(&Arc<SessionHandle>, u32)>,
    ) -> Result<(), BufferFull> {
        let Some(entry) = self.entry(event, receipt(confirm)) else { return Err(BufferFull) };
        self.writer.offer(entry).map_err(|_| BufferFull)
    }

    /// Accepts an event, waiting for room in the buffer: for session open and close events,
    /// which must not be dropped, from tasks that can afford to wait.
    pub async fn send(&self, event: &UpEvent) {
        if let Some(entry) = self.entry(event, None) {
            self.writer.send(entry).await;
        }
    }

    /// Records a heartbeat of `device` in the current window.
    pub fn heartbeat(&self, device: &DeviceKey, epoch: u64) {
        self.metrics.heartbeats.inc();
        let now = now_ms();
        let mut w = self.window.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        w.count += 1;
        match w.last.get_mut(device) {
            Some(slot) => *slot = (now, epoch),
            None => {
                w.last.insert(device.clone(), (now, epoch));
            }
        }
    }

    /// Closes the current window. Empty windows are sent too: a window without heartbeats is
    /// exactly what the device service must see when a node's cabinets go quiet.
    fn take_window(&self) -> UpEvent {
        let now = now_ms();
        let w = {
            let mut w = self.window.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            std::mem::replace(&mut *w, HeartbeatWindow { start_ms: now, ..HeartbeatWindow::default() })
        };
        let devices =
            w.last.into_iter().map(|(device, (at_ms, epoch))| HeartbeatSeen { device, at_ms, epoch }).collect();
        UpEvent::Heartbeats {
            node: self.node.clone(),
            window_start_ms: w.start_ms,
            window_ms: now.saturating_sub(w.start_ms),
            count: w.count,
            sessions: self.registry.cabinet_sessions(),
            devices,
        }
    }

    /// Closes a heartbeat window every `window` until `stop`, then closes the last one.
    /// Windows wait for room in the buffer rather than being refused: while Redis is away a
    /// window is late, never lost.
    pub async fn run_windows(self: Arc<Self>, window: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(window);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                () = stop.cancelled() => true,
            };
            let event = self.take_window();
            if let Some(entry) = self.entry(&event, None) {
                self.writer.send(entry).await;
            }
            if stopping {
                return;
            }
        }
    }
}
