//! Consuming the gateways' upstream streams (SPEC.md 3.2) in the consumer group `device-svc`:
//! several instances share the shards' entries; an entry is acknowledged only after its effect
//! is stored; entries an instance read and never acknowledged (it died) are taken over by the
//! others after `claim_idle_ms`; and every effect is idempotent (readings by primary key, status
//! by session epoch, heartbeat windows by entry id, deadlines only move forward), so a
//! redelivered entry changes nothing.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashSet;
use protocol::DeviceId;
use protocol::bus::{DeviceKey, UpEvent};
use protocol::cabinet::Message;
use redis::streams::StreamId;
use redis_conn::RedisConn;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::dead_letters;
use crate::error::StoreError;
use crate::offline::{Detector, Window};
use crate::purchases;
use crate::sessions::{SessionChange, SessionEntry};
use crate::vehicles;
use crate::vehicles::ota::reports as ota_reports;
use crate::weights::{self, Received};

/// The consumer group of every device-service instance.
pub const GROUP: &str = "device-svc";

pub use redis_conn::bulk_fields;

/// What applies the entries of a shard.
#[derive(Debug)]
pub struct Consumer {
    app: Arc<App>,
    detector: Arc<Detector>,
    /// Cabinets known to be initialised (no further checks needed).
    initialised: DashSet<DeviceId>,
}

impl Consumer {
    /// A consumer for `app`.
    pub fn new(app: Arc<App>, detector: Arc<Detector>) -> Self {
        Self { app, detector, initialised: DashSet::new() }
    }

    /// Applies a batch of entries of `stream`, in order for each device. Weight reports, OTA
    /// reports and session opens and closes are gathered, each kind applied as a set
    /// ([`crate::sessions`]); another entry waits for them only when it concerns a device with
    /// something gathered, or many devices at once (a heartbeat window). So a door event or
    /// command result of one cabinet does not cut the batch's readings or logins into small
    /// writes, while every device still sees its own entries in stream order (a device's
    /// gathered entries are all of one kind: gathering another kind applies them first).
    ///
    /// # Errors
    /// Any storage error: the caller acknowledges nothing and retries the batch.
    pub async fn apply(&self, stream: &str, entries: &[StreamId]) -> Result<(), StoreError> {
        let mut reports: Vec<Received> = Vec::new();
        // OTA reports of the batch, in order, applied in one transaction: only the order per
        // vehicle matters, and nothing else in a batch touches their rows.
        let mut ota: Vec<ota_reports::Uplink> = Vec::new();
        let mut sessions: Vec<SessionEntry> = Vec::new();
        for entry in entries {
            let fields = bulk_fields(entry.map.clone());
            let event = match UpEvent::from_fields(&fields) {
                Ok(e) => e,
                Err(e) => {
                    // A malformed entry is counted and skipped (acknowledged): retrying cannot fix it.
                    tracing::warn!(id = %entry.id, error = %e, "invalid upstream entry");
                    self.count("unknown", "invalid");
                    continue;
                }
            };
            if let UpEvent::Cabinet { at_ms, message: Message::WeightReport(_) | Message::DoorEvent(_), .. } = &event
                && device_time(&event)
                    .is_some_and(|t| t.abs_diff(*at_ms) > self.app.config.streams.max_clock_skew_s * 1000)
            {
                tracing::warn!(id = %entry.id, "cabinet time too far from the gateway's; entry not applied");
                self.count(event.label(), "clock_skew");
                continue;
            }
            if let Some(session) = session_entry(stream, &entry.id, &event) {
                if gathered_in(&session.device, &reports, &ota) {
                    self.flush_reports(&mut reports).await?;
                    self.flush_ota(&mut ota).await?;
                }
                sessions.push(session);
                continue;
            }
            if !sessions.is_empty()
                && let Some(device) = event.device()
                && sessions.iter().any(|s| s.device == device)
            {
                self.flush_sessions(&mut sessions).await?;
            }
            if let UpEvent::Cabinet { device, at_ms, message: Message::WeightReport(report), .. } = event {
                reports.push(Received { cabinet: device, report, at_ms });
                self.count("weight_report", "applied");
                continue;
            }
            if let UpEvent::Vehicle { vin, kind, payload, .. } = &event
                && vehicles::is_ota_report(*kind)
            {
                let entry = format!("{stream}/{}", entry.id);
                ota.push(ota_reports::Uplink { entry, vin: vin.clone(), kind: *kind, payload: payload.clone() });
                continue;
            }
            if waits_for_gathered(&event, &reports, &ota) {
                self.flush_sessions(&mut sessions).await?;
                self.flush_reports(&mut reports).await?;
                self.flush_ota(&mut ota).await?;
            }
            // Entry ids are unique within a stream only.
            self.apply_one(&format!("{stream}/{}", entry.id), event).await?;
        }
        self.flush_sessions(&mut sessions).await?;
        self.flush_reports(&mut reports).await?;
        self.flush_ota(&mut ota).await
    }

    async fn flush_sessions(&self, sessions: &mut Vec<SessionEntry>) -> Result<(), StoreError> {
        if sessions.is_empty() {
            return Ok(());
        }
        let results = crate::sessions::apply(&self.app, &self.detector, sessions).await?;
        for (s, result) in sessions.iter().zip(results) {
            let label = match s.change {
                SessionChange::Opened { .. } => "open",
                SessionChange::Closed { .. } => "close",
            };
            self.count(label, result);
        }
        sessions.clear();
        Ok(())
    }

    async fn flush_ota(&self, ota: &mut Vec<ota_reports::Uplink>) -> Result<(), StoreError> {
        for result in ota_reports::apply_batch(&self.app, ota).await? {
            self.count("veh", result);
        }
        ota.clear();
        Ok(())
    }

    async fn flush_reports(&self, reports: &mut Vec<Received>) -> Result<(), StoreError> {
        if reports.is_empty() {
            return Ok(());
        }
        weights::store(&self.app, reports).await?;
        weights::check_initialised(&self.app, reports, &self.initialised).await?;
        // Only a stable reading can settle an order: batches of open doors' readings cost no query.
        let mut cabinets: Vec<&str> =
            reports.iter().filter(|r| r.report.lanes.iter().any(|l| l.stable)).map(|r| r.cabinet.as_str()).collect();
        cabinets.sort_unstable();
        cabinets.dedup();
        purchases::settlement::weights_arrived(&self.app, &cabinets).await?;
        reports.clear();
        Ok(())
    }

    fn count(&self, kind: &str, result: &str) {
        self.app.metrics.stream_entries.with_label_values(&[kind, result]).inc();
    }

    /// Applies one entry other than a weight report; `entry` is `stream/id`, unique.
    async fn apply_one(&self, entry: &str, event: UpEvent) -> Result<(), StoreError> {
        let label = event.label();
        let result = match event {
            // Gathered and applied as sets (`flush_sessions`); never reaches here.
            UpEvent::SessionOpened { .. } | UpEvent::SessionClosed { .. } => "ignored",
            UpEvent::Heartbeats { node, window_start_ms, window_ms, count, sessions, devices } => {
                let window =
                    Window { node: &node, start_ms: window_start_ms, window_ms, count, sessions, devices: &devices };
                self.detector.record_window(entry, &window).await?;
                "applied"
            }
            UpEvent::Cabinet { device, message: Message::DoorEvent(event), .. } => {
                purchases::doors::on_door_event(&self.app, &device, &event).await?
            }
            UpEvent::Vehicle { vin, kind, payload, .. } => {
                vehicles::on_uplink(&self.app, entry, &vin, kind, &payload).await?
            }
            UpEvent::Cabinet { .. } => "ignored",
        };
        self.count(label, result);
        Ok(())
    }
}

/// Whether `event` must be applied after the weight and OTA reports gathered so far: the order
/// that matters is per device (a door closes after the readings before it are stored), and a
/// node-wide heartbeat window concerns every device.
fn waits_for_gathered(event: &UpEvent, reports: &[Received], ota: &[ota_reports::Uplink]) -> bool {
    event.device().is_none_or(|device| gathered_in(&device, reports, ota))
}

/// Whether `device` has weight or OTA reports among those gathered.
fn gathered_in(device: &DeviceKey, reports: &[Received], ota: &[ota_reports::Uplink]) -> bool {
    match device {
        DeviceKey::Cabinet(id) => reports.iter().any(|r| &r.cabinet == id),
        DeviceKey::Vehicle(vin) => ota.iter().any(|u| &u.vin == vin),
    }
}

/// The session open or close `event` is, gathered as such (`id` is its stream entry's).
fn session_entry(stream: &str, id: &str, event: &UpEvent) -> Option<SessionEntry> {
    let (device, epoch, node, at_ms, change) = match event {
        UpEvent::SessionOpened { device, epoch, node, at_ms, info } => {
            (device, epoch, node, at_ms, SessionChange::Opened { info: info.clone() })
        }
        UpEvent::SessionClosed { device, epoch, node, at_ms, reason } => {
            (device, epoch, node, at_ms, SessionChange::Closed { reason: reason.clone() })
        }
        _ => return None,
    };
    Some(SessionEntry {
        entry: format!("{stream}/{id}"),
        device: device.clone(),
        epoch: *epoch,
        node: node.clone(),
        at_ms: *at_ms,
        change,
    })
}

/// The cabinet's own time in a weight report or door event.
fn device_time(event: &UpEvent) -> Option<u64> {
    match event {
        UpEvent::Cabinet { message: Message::WeightReport(r), .. } => Some(r.sample_time_ms),
        UpEvent::Cabinet { message: Message::DoorEvent(e), .. } => Some(e.event_time_ms),
        _ => None,
    }
}

/// Applies `entries`, then acknowledges them. An outage is retried until it passes; a batch
/// that PostgreSQL refuses for what it carries is applied again entry by entry (every effect is
/// idempotent), and the entry it refuses is set aside as a dead letter ([`crate::dead_letters`]),
/// so one bad entry never stops its shard.
async fn apply_and_ack(
    consumer: &Consumer,
    redis: &mut RedisConn,
    stream: &str,
    entries: &[StreamId],
    stop: &CancellationToken,
) {
    match apply_retrying(consumer, stream, entries, stop).await {
        Applied::Yes => {}
        Applied::Stopped => return,
        Applied::Poison(_) if entries.len() > 1 => {
            for entry in entries {
                match apply_retrying(consumer, stream, std::slice::from_ref(entry), stop).await {
                    Applied::Yes => {}
                    Applied::Stopped => return,
                    Applied::Poison(e) => {
                        if !set_aside(consumer, stream, entry, &e, stop).await {
                            return;
                        }
                    }
                }
            }
        }
        Applied::Poison(e) => {
            if !set_aside(consumer, stream, &entries[0], &e, stop).await {
                return;
            }
        }
    }
    let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
    let acked: redis::RedisResult<i64> = redis::cmd("XACK").arg(stream).arg(GROUP).arg(&ids).query_async(redis).await;
    if let Err(e) = acked {
        tracing::warn!(error = %e, "failed to acknowledge upstream entries (they will be applied again, harmlessly)");
    }
}

enum Applied {
    Yes,
    /// Stopping before it applied: not acknowledged, taken over later.
    Stopped,
    /// Refused for what it carries.
    Poison(StoreError),
}

/// Applies `entries`, retrying outages with a growing pause until they apply or `stop`.
async fn apply_retrying(consumer: &Consumer, stream: &str, entries: &[StreamId], stop: &CancellationToken) -> Applied {
    let mut backoff = Duration::from_millis(100);
    loop {
        match consumer.apply(stream, entries).await {
            Ok(()) => return Applied::Yes,
            Err(e) if dead_letters::is_poison(&e) => return Applied::Poison(e),
            Err(e) => {
                tracing::warn!(error = %e, entries = entries.len(), retry_in_ms = backoff.as_millis(), "failed to apply upstream entries");
                if stop.is_cancelled() {
                    // Not acknowledged: another instance (or our next start) takes them over.
                    return Applied::Stopped;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Sets one entry aside, retrying while PostgreSQL cannot take it; `false` when stopping first
/// (the batch is then not acknowledged: the entry is only acknowledged once it is stored).
async fn set_aside(
    consumer: &Consumer,
    stream: &str,
    entry: &StreamId,
    error: &StoreError,
    stop: &CancellationToken,
) -> bool {
    let fields = bulk_fields(entry.map.clone());
    let mut backoff = Duration::from_millis(100);
    while let Err(e) = dead_letters::set_aside(&consumer.app, stream, &entry.id, &fields, error).await {
        tracing::warn!(error = %e, "failed to set an upstream entry aside; retrying");
        if stop.is_cancelled() {
            return false;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    true
}

/// Consumes shard `shard` until `stop`: first this instance's own unacknowledged entries (a
/// restart), then new ones; every `claim_interval_ms` it also takes over entries another
/// instance left unacknowledged for `claim_idle_ms`. `redis` must be a connection of its own.
pub async fn run_shard(consumer: Arc<Consumer>, mut redis: RedisConn, shard: u16, stop: CancellationToken) {
    let app = Arc::clone(&consumer.app);
    let cfg = app.config.streams.clone();
    let stream = app.keys.upstream(shard);
    let me = app.config.instance_id.clone();
    let mut cursor = "0";
    let mut group_ready = false;
    let mut last_claim = tokio::time::Instant::now();
    while !stop.is_cancelled() {
        if !group_ready {
            if let Err(e) = redis_conn::ensure_group(&mut redis, &stream, GROUP, "0").await {
                tracing::warn!(shard, error = %e, "failed to create the consumer group");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            group_ready = true;
        }
        match redis_conn::read_group(&mut redis, &stream, GROUP, &me, cursor, cfg.batch, cfg.block_ms).await {
            Ok(entries) => {
                if entries.is_empty() {
                    cursor = ">";
                } else {
                    apply_and_ack(&consumer, &mut redis, &stream, &entries, &stop).await;
                }
            }
            Err(e) => {
                if e.code() == Some("NOGROUP") {
                    group_ready = false;
                }
                // A read whose reply was lost may have handed entries to this consumer: they
                // wait in its pending list.
                cursor = "0";
                tracing::warn!(shard, error = %e, "failed to read the upstream stream");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        if last_claim.elapsed() >= Duration::from_millis(cfg.claim_interval_ms) {
            last_claim = tokio::time::Instant::now();
            claim(&consumer, &mut redis, &stream, &me, cfg.claim_idle_ms, cfg.batch, &stop).await;
            match redis_conn::forget_departed(&mut redis, &stream, GROUP, &me, cfg.departed_after_ms).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(shard, readers = n, "removed departed readers from the group"),
                Err(e) => tracing::warn!(shard, error = %e, "failed to list the group's readers"),
            }
            report_lag(&app, &mut redis, &stream, shard).await;
            match crate::trim::trim_consumed(&mut redis, &stream).await {
                Ok(n) => app.metrics.trimmed.inc_by(n),
                Err(e) => tracing::warn!(shard, error = %e, "failed to trim the upstream stream"),
            }
        }
    }
}

/// Takes over entries idle for `idle_ms` in other consumers' pending lists, and applies them.
async fn claim(
    consumer: &Consumer,
    redis: &mut RedisConn,
    stream: &str,
    me: &str,
    idle_ms: u64,
    count: usize,
    stop: &CancellationToken,
) {
    let mut start = "0-0".to_owned();
    loop {
        let reply = redis_conn::claim_idle(redis, stream, GROUP, me, idle_ms, &start, count).await;
        let (next, entries) = match reply {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "failed to claim idle entries");
                return;
            }
        };
        if !entries.is_empty() {
            consumer.app.metrics.claimed.inc_by(entries.len() as u64);
            tracing::info!(stream, entries = entries.len(), "took over entries of a stopped instance");
            apply_and_ack(consumer, redis, stream, &entries, stop).await;
        }
        if next == "0-0" || stop.is_cancelled() {
            return;
        }
        start = next;
    }
}

async fn report_lag(app: &App, redis: &mut RedisConn, stream: &str, shard: u16) {
    let Ok(Some(backlog)) = redis_conn::group_backlog(redis, stream, GROUP).await else { return };
    let shard = shard.to_string();
    // Unknown (entries deleted past the cursor, which this service never does): shown as 0,
    // while `pending` still shows entries in hand.
    app.metrics.stream_lag.with_label_values(&[&shard]).set(backlog.unread.unwrap_or(0));
    app.metrics.stream_pending.with_label_values(&[&shard]).set(backlog.pending);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use protocol::cabinet::{DoorEvent, DoorState, LaneWeight, WeightReport};

    use super::*;

    fn door_closed(cabinet: &str) -> UpEvent {
        UpEvent::Cabinet {
            device: DeviceId::new(cabinet).unwrap(),
            epoch: 1,
            node: "gw-1".into(),
            at_ms: 1_000,
            seq: 1,
            message: Message::DoorEvent(DoorEvent {
                door_id: 1,
                state: DoorState::Closed,
                event_time_ms: 1_000,
                order_id: None,
            }),
        }
    }

    fn gathered(cabinet: &str) -> Received {
        Received {
            cabinet: DeviceId::new(cabinet).unwrap(),
            report: WeightReport {
                door_id: 1,
                sample_time_ms: 900,
                lanes: vec![LaneWeight { lane_id: 1, grams: 5, stable: true }],
            },
            at_ms: 900,
        }
    }

    #[test]
    fn an_event_waits_only_for_its_own_devices_reports_or_for_all_when_node_wide() {
        let reports = vec![gathered("cab-a"), gathered("cab-b")];
        assert!(waits_for_gathered(&door_closed("cab-a"), &reports, &[]));
        assert!(!waits_for_gathered(&door_closed("cab-c"), &reports, &[]));
        let closed = |device| UpEvent::SessionClosed {
            device,
            epoch: 1,
            node: "gw-1".into(),
            at_ms: 1_000,
            reason: "peer_closed".into(),
        };
        assert!(waits_for_gathered(&closed(DeviceKey::Cabinet(DeviceId::new("cab-b").unwrap())), &reports, &[]));
        assert!(!waits_for_gathered(&closed(DeviceKey::Cabinet(DeviceId::new("cab-z").unwrap())), &reports, &[]));
        let window = UpEvent::Heartbeats {
            node: "gw-1".into(),
            window_start_ms: 0,
            window_ms: 1_000,
            count: 0,
            sessions: 0,
            devices: Vec::new(),
        };
        assert!(waits_for_gathered(&window, &reports, &[]));
    }
}
