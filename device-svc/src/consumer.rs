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
use protocol::bus::UpEvent;
use protocol::cabinet::Message;
use redis::streams::StreamId;
use redis_conn::RedisConn;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::dead_letters;
use crate::error::StoreError;
use crate::gather::{Gathered, Rank};
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
    /// The readers' share of the PostgreSQL pool: one permit per batch being applied, so
    /// however many shards are read, the API and the drivers keep the rest of the pool.
    pg_share: Semaphore,
}

impl Consumer {
    /// A consumer for `app`.
    pub fn new(app: Arc<App>, detector: Arc<Detector>) -> Self {
        let pg_share = Semaphore::new(app.config.stream_pg_connections());
        Self { app, detector, initialised: DashSet::new(), pg_share }
    }

    /// Applies a batch of entries of `stream`, in order for each device. Weight reports, OTA
    /// reports and session opens and closes are gathered and applied as sets, one statement or
    /// transaction per kind ([`crate::gather`] says when an entry waits for them). So a door
    /// event or command result of one cabinet does not cut the batch's readings or logins into
    /// small writes, while every device still sees its own entries in stream order.
    ///
    /// # Errors
    /// Any storage error: the caller acknowledges nothing and retries the batch.
    pub async fn apply(&self, stream: &str, entries: &[StreamId]) -> Result<(), StoreError> {
        let mut gathered = Gathered::default();
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
                if gathered.must_apply_before_gathering(&session.device, Rank::Session) {
                    self.apply_gathered(&mut gathered).await?;
                }
                gathered.push_session(session);
                continue;
            }
            if let UpEvent::Cabinet { device, at_ms, message: Message::WeightReport(report), .. } = event {
                // Reports rank last: they never wait for what is gathered.
                gathered.push_report(Received { cabinet: device, report, at_ms });
                self.count("weight_report", "applied");
                continue;
            }
            if let UpEvent::Vehicle { vin, kind, payload, .. } = &event
                && vehicles::is_ota_report(*kind)
            {
                let entry = format!("{stream}/{}", entry.id);
                gathered.push_ota(ota_reports::Uplink {
                    entry,
                    vin: vin.clone(),
                    kind: *kind,
                    payload: payload.clone(),
                });
                continue;
            }
            if gathered.must_apply_before(event.device().as_ref()) {
                self.apply_gathered(&mut gathered).await?;
            }
            // Entry ids are unique within a stream only.
            self.apply_one(&format!("{stream}/{}", entry.id), event).await?;
        }
        self.apply_gathered(&mut gathered).await
    }

    /// Applies what is gathered, in [`Rank`] order: sessions, then weight reports, then OTA
    /// reports.
    async fn apply_gathered(&self, gathered: &mut Gathered) -> Result<(), StoreError> {
        self.flush_sessions(&gathered.sessions).await?;
        self.flush_reports(&gathered.reports).await?;
        self.flush_ota(&gathered.ota).await?;
        gathered.clear();
        Ok(())
    }

    async fn flush_sessions(&self, sessions: &[SessionEntry]) -> Result<(), StoreError> {
        if sessions.is_empty() {
            return Ok(());
        }
        let results = crate::sessions::apply(&self.app, &self.detector, sessions).await?;
        for (s, result) in sessions.iter().zip(results) {
            self.count(s.change.label(), result);
        }
        self.set_applied("session", sessions.len());
        Ok(())
    }

    async fn flush_ota(&self, ota: &[ota_reports::Uplink]) -> Result<(), StoreError> {
        if ota.is_empty() {
            return Ok(());
        }
        for result in ota_reports::apply_batch(&self.app, ota).await? {
            self.count("veh", result);
        }
        self.set_applied("ota_report", ota.len());
        Ok(())
    }

    async fn flush_reports(&self, reports: &[Received]) -> Result<(), StoreError> {
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
        self.set_applied("weight_report", reports.len());
        Ok(())
    }

    fn count(&self, kind: &str, result: &str) {
        self.app.metrics.stream_entries.with_label_values(&[kind, result]).inc();
    }

    /// Waits for a connection of the readers' share of the pool (`streams.pg_connections`),
    /// counting the wait (`devsvc_stream_pg_wait_seconds_total`). `None` only if the share
    /// were closed, which it never is.
    async fn pg_turn(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        let waited = tokio::time::Instant::now();
        let permit = self.pg_share.acquire().await.ok();
        self.app.metrics.stream_pg_wait.inc_by(waited.elapsed().as_secs_f64());
        permit
    }

    /// Counts a set of `kind` applied (`devsvc_stream_set_entries`).
    fn set_applied(&self, kind: &str, entries: usize) {
        self.app.metrics.stream_sets.with_label_values(&[kind]).observe(entries as f64);
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
        let applied = {
            // Held for the attempt only, not through the pause after a failure.
            let Some(_share) = consumer.pg_turn().await else { return Applied::Stopped };
            consumer.apply(stream, entries).await
        };
        match applied {
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
/// (the batch is then not acknowledged: the entry is only acknowledged once it is stored). Each
/// attempt holds a connection of the readers' share, as an apply does.
async fn set_aside(
    consumer: &Consumer,
    stream: &str,
    entry: &StreamId,
    error: &StoreError,
    stop: &CancellationToken,
) -> bool {
    let fields = bulk_fields(entry.map.clone());
    let mut backoff = Duration::from_millis(100);
    loop {
        let stored = {
            let Some(_share) = consumer.pg_turn().await else { return false };
            dead_letters::set_aside(&consumer.app, stream, &entry.id, &fields, error).await
        };
        let Err(e) = stored else { return true };
        tracing::warn!(error = %e, "failed to set an upstream entry aside; retrying");
        if stop.is_cancelled() {
            return false;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
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

    use protocol::bus::DeviceKey;

    use super::*;

    #[test]
    fn a_gathered_session_is_counted_under_its_entrys_type() {
        let device = DeviceKey::Cabinet(DeviceId::new("cab-a").unwrap());
        let opened = UpEvent::SessionOpened {
            device: device.clone(),
            epoch: 1,
            node: "gw-1".into(),
            at_ms: 1,
            info: "fw".into(),
        };
        let closed =
            UpEvent::SessionClosed { device, epoch: 1, node: "gw-1".into(), at_ms: 2, reason: "peer_closed".into() };
        for event in [opened, closed] {
            let session = session_entry("up", "1-0", &event).unwrap();
            assert_eq!(session.change.label(), event.label());
            assert_eq!(session.entry, "up/1-0");
        }
    }
}
