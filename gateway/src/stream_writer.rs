//! A bounded buffer in front of Redis streams, drained by one task in pipelined batches.
//! Used for the upstream streams and for command replies.
//!
//! - Order per stream key is kept: one task writes, each key's entries in the order accepted.
//! - One pipeline per key (one Redis Cluster slot), pipelines run concurrently.
//! - While Redis is unreachable the batch in hand is retried with backoff and new entries wait
//!   in the buffer, up to its capacity; then [`StreamWriter::offer`] refuses (nothing accepted
//!   is ever dropped by the writer itself).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge};
use protocol::bus::Fields;
use redis::Pipeline;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use redis_conn::RedisConn;

/// One entry for one stream.
#[derive(Debug)]
pub struct Entry {
    /// The stream key.
    pub key: String,
    /// The entry's fields.
    pub fields: Fields,
    /// Metric label of the entry's type.
    pub label: &'static str,
}

/// The buffer is full; the entry was not accepted.
#[derive(Debug)]
pub struct BufferFull(pub Entry);

/// Counters a writer reports to.
#[derive(Debug, Clone)]
pub struct WriterMetrics {
    /// Entries accepted and not yet written.
    pub depth: IntGauge,
    /// Entries written, by label.
    pub written: IntCounterVec,
    /// Redis errors, by operation; this writer uses `op`.
    pub errors: IntCounterVec,
    /// The operation label for errors.
    pub op: &'static str,
}

/// The accepting side; cheap to clone.
///
/// The bound is exact: every accepted entry holds one of `capacity` permits until Redis has
/// taken it, whether it waits in the channel or in the batch being retried.
#[derive(Debug, Clone)]
pub struct StreamWriter {
    tx: mpsc::UnboundedSender<Entry>,
    room: Arc<Semaphore>,
    metrics: WriterMetrics,
}

/// The writer task's side: entries, and the permits to give back once they are written.
#[derive(Debug)]
pub struct Intake {
    rx: mpsc::UnboundedReceiver<Entry>,
    room: Arc<Semaphore>,
}

impl StreamWriter {
    /// A writer holding up to `capacity` entries not yet in Redis; run the intake with [`run`].
    pub fn new(capacity: usize, metrics: WriterMetrics) -> (Self, Intake) {
        let (tx, rx) = mpsc::unbounded_channel();
        let room = Arc::new(Semaphore::new(capacity));
        (Self { tx, room: Arc::clone(&room), metrics }, Intake { rx, room })
    }

    fn accept(&self, permit: tokio::sync::SemaphorePermit<'_>, entry: Entry) -> Result<(), BufferFull> {
        match self.tx.send(entry) {
            Ok(()) => {
                // The permit is given back by the writer, after Redis took the entry.
                permit.forget();
                self.metrics.depth.inc();
                Ok(())
            }
            Err(mpsc::error::SendError(e)) => Err(BufferFull(e)),
        }
    }

    /// Accepts an entry without waiting.
    ///
    /// # Errors
    /// [`BufferFull`] with the entry, when `capacity` entries are not yet written.
    pub fn offer(&self, entry: Entry) -> Result<(), BufferFull> {
        match self.room.try_acquire() {
            Ok(permit) => self.accept(permit, entry),
            Err(_) => Err(BufferFull(entry)),
        }
    }

    /// Accepts an entry, waiting for room. For entries that must not be refused (heartbeat
    /// windows, session events), from tasks that can afford to wait.
    pub async fn send(&self, entry: Entry) {
        if let Ok(permit) = self.room.acquire().await {
            let _ = self.accept(permit, entry);
        }
    }
}

/// Settings of the writer task.
#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    /// Most entries per round.
    pub batch_max: usize,
    /// `XADD MAXLEN ~` cap per stream.
    pub maxlen: u64,
}

/// Writes entries until `stop` is cancelled; then writes what is still buffered and returns.
/// The caller bounds that final flush with its grace period.
pub async fn run(intake: Intake, redis: RedisConn, cfg: WriterConfig, metrics: WriterMetrics, stop: CancellationToken) {
    let Intake { mut rx, room } = intake;
    let mut batch: Vec<Entry> = Vec::with_capacity(cfg.batch_max);
    let mut stopping = false;
    loop {
        if !stopping {
            tokio::select! {
                entry = rx.recv() => match entry {
                    Some(e) => batch.push(e),
                    None => stopping = true,
                },
                () = stop.cancelled() => stopping = true,
            }
        }
        while batch.len() < cfg.batch_max {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            if stopping {
                return;
            }
            continue;
        }
        write_with_retry(&redis, cfg, &metrics, &room, &mut batch).await;
    }
}

async fn write_with_retry(
    redis: &RedisConn,
    cfg: WriterConfig,
    metrics: &WriterMetrics,
    room: &Semaphore,
    batch: &mut Vec<Entry>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let failed = write_batch(redis, cfg, batch).await;
        let before = batch.len();
        // Entries of streams that took their pipeline are done; only the others are retried,
        // so a partial failure does not write the successful streams twice.
        batch.retain(|e| {
            let done = !failed.contains_key(e.key.as_str());
            if done {
                metrics.written.with_label_values(&[e.label]).inc();
                metrics.depth.dec();
            }
            !done
        });
        // Room for new entries as soon as Redis has these.
        room.add_permits(before - batch.len());
        let Some(error) = failed.into_values().next() else { return };
        metrics.errors.with_label_values(&[metrics.op]).inc();
        tracing::warn!(%error, entries = batch.len(), retry_in_ms = backoff.as_millis(), op = metrics.op, "failed to write streams");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Writes one pipeline per stream key (one Redis Cluster slot each), concurrently. Returns the
/// keys whose pipeline failed, with the error.
async fn write_batch(redis: &RedisConn, cfg: WriterConfig, batch: &[Entry]) -> HashMap<String, redis::RedisError> {
    let mut pipes: HashMap<&str, Pipeline> = HashMap::new();
    for e in batch {
        pipes
            .entry(e.key.as_str())
            .or_insert_with(redis::pipe)
            .cmd("XADD")
            .arg(&e.key)
            .arg("MAXLEN")
            .arg("~")
            .arg(cfg.maxlen)
            .arg("*")
            .arg(&e.fields)
            .ignore();
    }
    let writes = pipes.into_iter().map(|(key, pipe)| {
        let mut con = redis.clone();
        async move { (key, pipe.query_async::<()>(&mut con).await) }
    });
    futures_util::future::join_all(writes)
        .await
        .into_iter()
        .filter_map(|(key, result)| result.err().map(|e| (key.to_owned(), e)))
        .collect()
}
