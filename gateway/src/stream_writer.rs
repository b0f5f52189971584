//! A bounded buffer in front of Redis streams, drained by one task in batches: the group
//! commit behind every acknowledgement a device receives. Used for the upstream streams and for
//! command replies.
//!
//! - An entry may carry a [`Receipt`]: whoever waits on it (a session, to send the device its
//!   `ACK` or `PUBACK`) hears only once Redis has confirmed the write. An acknowledgement
//!   therefore never stands for an entry that exists only in this process's memory.
//! - Order per stream key is kept: one task writes, each key's entries in the order accepted.
//! - One transaction (`MULTI` ... `EXEC`) per key (one Redis Cluster slot) per round,
//!   transactions run concurrently; a round's writes to a key are one atomic step that also
//!   records the round's id beside the stream. A round tried again after an unknown outcome (a
//!   timeout while Redis was slow) goes as a script that checks that mark and writes in one
//!   step, so it is never written twice. Plain commands for first attempts, the script only for
//!   retries: Redis spends about a third less per entry in a transaction than in a script
//!   (BENCHMARKS.md, "Side by side with Mosquitto").
//! - A stream past its length cap is either trimmed (`MAXLEN ~`, for reply streams nobody may
//!   be reading) or, for the upstream streams, not written at all until its consumers catch up:
//!   entries wait here, sessions stop acknowledging and devices are slowed ([`StreamCap`]).
//! - While Redis is unreachable the batch in hand is retried with backoff and new entries wait
//!   in the buffer, up to its capacity; then [`StreamWriter::offer`] refuses (nothing accepted
//!   is ever dropped by the writer itself).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, IntGauge};
use protocol::bus::Fields;
use redis::{Cmd, Script};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use redis_conn::RedisConn;

/// One entry for one stream.
#[derive(Debug)]
pub struct Entry {
    /// The stream key (shared: the upstream's few keys are made once, not per entry).
    pub key: Arc<str>,
    /// The entry's fields.
    pub fields: Fields,
    /// Metric label of the entry's type.
    pub label: &'static str,
    /// Who hears when Redis has the entry; `None`: nobody waits.
    pub receipt: Option<Receipt>,
}

/// Something waiting to hear that its entries are in Redis: a session, which then acknowledges
/// them to its device.
pub trait Confirm: Send + Sync + std::fmt::Debug {
    /// Redis confirmed the write of the entry that carried `token`.
    fn confirmed(&self, token: u32);
}

/// Where the confirmation of one entry goes.
#[derive(Debug, Clone)]
pub struct Receipt {
    /// The waiter.
    pub to: Arc<dyn Confirm>,
    /// What the waiter gave to recognise the entry (a frame's seq, a packet id).
    pub token: u32,
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
    /// Rounds held back because a stream was at its cap ([`StreamCap::Hold`]).
    pub held: IntCounter,
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

/// What a stream at its length cap does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamCap {
    /// Trims its oldest entries (`XADD MAXLEN ~`): for streams whose reader may be gone for good
    /// (a command sender's replies).
    Trim(u64),
    /// Takes nothing more until its consumers have read enough for the device service to trim
    /// it: entries wait in the buffer, counted in `held`. For the upstream streams, where a
    /// lagging consumer must never lose an entry. Several writers (nodes) may together pass
    /// the cap by what each wrote since it last saw the stream's length.
    Hold(u64),
}

/// Settings of the writer task.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Most entries per round.
    pub batch_max: usize,
    /// How long a round waits after its first entry for more to join (zero: not at all).
    pub linger: Duration,
    /// The length cap per stream.
    pub cap: StreamCap,
    /// Unique to this writer in this process run (node and incarnation): names its rounds.
    pub writer_id: String,
}

/// How long Redis remembers a round beside its stream. A round is retried within seconds of
/// a failure (the backoff is at most 5 s), so a retry always finds the mark of a write that
/// did happen; rounds of a restarted node carry a new writer id.
const ROUND_MARK_TTL_MS: u64 = 600_000;

/// A round tried again, for one stream, once: `KEYS[1]` the stream, `KEYS[2]` its round mark.
/// `ARGV`: round id, cap, 1 to hold at the cap (0 to trim), mark TTL ms, entry count, then per
/// entry its field count and fields. Checks and writes in one step, so an earlier attempt whose
/// answer was lost, wherever it still is, can never be written beside this one. Returns the
/// stream's length after writing, -1 if this round was written already, -2 if the stream is at
/// its cap and nothing was written. Retries are rare (Redis failed or was too slow), so the
/// script's cost per entry is paid only then; first attempts go as a plain transaction.
const RETRY_ROUND: &str = r"
if redis.call('GET', KEYS[2]) == ARGV[1] then return -1 end
local cap = tonumber(ARGV[2])
local hold = ARGV[3] == '1'
if hold and redis.call('XLEN', KEYS[1]) >= cap then return -2 end
local n = tonumber(ARGV[5])
local i = 6
for _ = 1, n do
  local k = tonumber(ARGV[i])
  if hold then
    redis.call('XADD', KEYS[1], '*', unpack(ARGV, i + 1, i + 2 * k))
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', cap, '*', unpack(ARGV, i + 1, i + 2 * k))
  end
  i = i + 1 + 2 * k
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[4])
return redis.call('XLEN', KEYS[1])
";

/// Writes entries until `stop` is cancelled; then writes what is still buffered and returns.
/// The caller bounds that final flush with its grace period.
pub async fn run(intake: Intake, redis: RedisConn, cfg: WriterConfig, metrics: WriterMetrics, stop: CancellationToken) {
    let Intake { mut rx, room } = intake;
    // The length each held stream ([`StreamCap::Hold`]) had after this writer's last write or
    // check: a write that could reach the cap is checked first. (Only the upstream shards'
    // few streams are held.)
    let mut lengths: HashMap<String, u64> = HashMap::new();
    let mut batch: Vec<Entry> = Vec::with_capacity(cfg.batch_max);
    let mut stopping = false;
    let mut round: u64 = 0;
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
        if !stopping && !cfg.linger.is_zero() && !batch.is_empty() && batch.len() < cfg.batch_max {
            // The group commit's window: entries of other devices join this round instead of
            // each paying a Redis round of its own.
            let until = tokio::time::Instant::now() + cfg.linger;
            while batch.len() < cfg.batch_max {
                tokio::select! {
                    entry = rx.recv() => match entry {
                        Some(e) => batch.push(e),
                        None => { stopping = true; break }
                    },
                    () = tokio::time::sleep_until(until) => break,
                    () = stop.cancelled() => { stopping = true; break }
                }
            }
        }
        if batch.is_empty() {
            if stopping {
                return;
            }
            continue;
        }
        round += 1;
        let round_id = format!("{}{round}", cfg.writer_id);
        write_with_retry(&redis, &mut lengths, &cfg, &round_id, &metrics, &room, &mut batch).await;
    }
}

/// Why a stream's part of a round was not written.
enum NotWritten {
    /// Redis failed (or did not answer in time: the round may have been written, and its
    /// retry will find out).
    Error(redis::RedisError),
    /// The stream is at its cap ([`StreamCap::Hold`]).
    AtCap,
}

async fn write_with_retry(
    redis: &RedisConn,
    lengths: &mut HashMap<String, u64>,
    cfg: &WriterConfig,
    round_id: &str,
    metrics: &WriterMetrics,
    room: &Semaphore,
    batch: &mut Vec<Entry>,
) {
    let mut backoff = Duration::from_millis(100);
    // After a failed attempt the outcome may be unknown: the next one goes as the checking
    // script ([`RETRY_ROUND`]).
    let mut retry = false;
    loop {
        let failed = write_round(redis, lengths, cfg, round_id, batch, retry).await;
        retry = true;
        let before = batch.len();
        // Entries of streams that took their part are done, and their waiters told; only the
        // others are retried, with the same round id. Counted per label once per round.
        let mut written: Vec<(&'static str, u64)> = Vec::new();
        batch.retain_mut(|e| {
            let done = !failed.contains_key(&*e.key);
            if done {
                match written.iter_mut().find(|(label, _)| *label == e.label) {
                    Some((_, n)) => *n += 1,
                    None => written.push((e.label, 1)),
                }
                if let Some(r) = e.receipt.take() {
                    r.to.confirmed(r.token);
                }
            }
            !done
        });
        for (label, n) in written {
            metrics.written.with_label_values(&[label]).inc_by(n);
        }
        metrics.depth.sub(i64::try_from(before - batch.len()).unwrap_or(i64::MAX));
        // Room for new entries as soon as Redis has these.
        room.add_permits(before - batch.len());
        let Some(reason) = failed.into_values().next() else { return };
        match reason {
            NotWritten::Error(error) => {
                metrics.errors.with_label_values(&[metrics.op]).inc();
                tracing::warn!(%error, entries = batch.len(), retry_in_ms = backoff.as_millis(), op = metrics.op, "failed to write streams");
            }
            NotWritten::AtCap => {
                metrics.held.inc();
                tracing::warn!(
                    entries = batch.len(),
                    retry_in_ms = backoff.as_millis(),
                    op = metrics.op,
                    "a stream is at its cap; holding entries until its consumers catch up"
                );
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The mark of `writer`'s last round beside `stream`, in the stream's Redis Cluster slot.
fn round_mark(stream: &str, writer_id: &str) -> String {
    format!("{{{stream}}}:round:{writer_id}")
}

/// Writes one transaction per stream key (one Redis Cluster slot each), concurrently; when
/// `retry` (the last attempt's outcome may be unknown), one [`RETRY_ROUND`] script per key
/// instead. Returns the keys not written, with the reason. A held stream whose room for the
/// round this writer does not know has its length read first: so one writer never writes past
/// the cap, and several pass it by at most what they wrote between two of their own writes.
async fn write_round(
    redis: &RedisConn,
    lengths: &mut HashMap<String, u64>,
    cfg: &WriterConfig,
    round_id: &str,
    batch: &[Entry],
    retry: bool,
) -> HashMap<String, NotWritten> {
    let mut per_key: HashMap<&str, Vec<&Entry>> = HashMap::new();
    for e in batch {
        per_key.entry(&*e.key).or_default().push(e);
    }
    let (cap, hold) = match cfg.cap {
        StreamCap::Trim(n) => (n, false),
        StreamCap::Hold(n) => (n, true),
    };
    let known = &*lengths;
    let retry_script = retry.then(|| Script::new(RETRY_ROUND));
    let writes = per_key.into_iter().map(|(key, entries)| {
        let mark = round_mark(key, &cfg.writer_id);
        let room = |len: u64| len.saturating_add(entries.len() as u64) <= cap;
        // A first attempt near the cap (or at a stream this writer has not seen) reads the
        // length first; a retry is checked inside its script.
        let check = !retry && hold && !known.get(key).is_some_and(|len| room(*len));
        let script = retry_script.as_ref();
        let mut con = redis.clone();
        async move {
            if let Some(script) = script {
                let mut call = script.key(key);
                call.key(&mark).arg(round_id).arg(cap).arg(u8::from(hold)).arg(ROUND_MARK_TTL_MS).arg(entries.len());
                for e in &entries {
                    call.arg(e.fields.len());
                    for (name, value) in &e.fields {
                        call.arg(*name).arg(value.as_slice());
                    }
                }
                let written = call.invoke_async::<i64>(&mut con).await.map(|n| match n {
                    -1 => Written::Already,
                    -2 => Written::Full,
                    len => Written::Now { len: u64::try_from(len).unwrap_or(0) },
                });
                return (key, written);
            }
            if check {
                match redis::cmd("XLEN").arg(key).query_async::<u64>(&mut con).await {
                    Ok(len) if len >= cap => return (key, Ok(Written::FullAt { len })),
                    Ok(_) => {}
                    Err(e) => return (key, Err(e)),
                }
            }
            let mut pipe = redis::Pipeline::with_capacity(entries.len() + 2);
            pipe.atomic();
            let maxlen = (!hold).then(|| cap.to_string());
            for e in entries {
                pipe.add_command(xadd(key, maxlen.as_deref(), &e.fields));
            }
            pipe.cmd("SET").arg(&mark).arg(round_id).arg("PX").arg(ROUND_MARK_TTL_MS);
            pipe.cmd("XLEN").arg(key);
            // The replies are the entries' ids, `OK` and the length: only the length is used
            // (not marking the others ignored saves a set insertion per entry).
            let written: redis::RedisResult<Vec<redis::Value>> = pipe.query_async(&mut con).await;
            let len = written.and_then(|replies| match replies.last() {
                Some(redis::Value::Int(len)) => Ok(u64::try_from(*len).unwrap_or(0)),
                other => {
                    Err((redis::ErrorKind::UnexpectedReturnType, "XLEN gave no number", format!("{other:?}")).into())
                }
            });
            (key, len.map(|len| Written::Now { len }))
        }
    });
    let results = futures_util::future::join_all(writes).await;
    let mut failed = HashMap::new();
    for (key, result) in results {
        let len = match result {
            Ok(Written::Now { len }) => Some(len),
            // The script does not say the length: the next first attempt reads it.
            Ok(Written::Already) => None,
            Ok(Written::Full) => {
                failed.insert(key.to_owned(), NotWritten::AtCap);
                None
            }
            Ok(Written::FullAt { len }) => {
                failed.insert(key.to_owned(), NotWritten::AtCap);
                Some(len)
            }
            Err(e) => {
                failed.insert(key.to_owned(), NotWritten::Error(e));
                None
            }
        };
        if hold {
            match len {
                Some(len) => lengths.insert(key.to_owned(), len),
                None => lengths.remove(key),
            };
        }
    }
    failed
}

/// One `XADD` of `fields` to `key` (trimmed to about `maxlen` if given), its buffers sized once:
/// a round builds one per entry, and growing them argument by argument cost a reallocation each.
fn xadd(key: &str, maxlen: Option<&str>, fields: &Fields) -> Cmd {
    let (args, data) = xadd_size(key, maxlen, fields);
    let mut cmd = Cmd::with_capacity(args, data);
    cmd.arg("XADD").arg(key);
    if let Some(maxlen) = maxlen {
        cmd.arg("MAXLEN").arg("~").arg(maxlen);
    }
    cmd.arg("*");
    for (name, value) in fields {
        cmd.arg(*name).arg(value.as_slice());
    }
    cmd
}

/// The arguments of [`xadd`]'s command and their bytes.
fn xadd_size(key: &str, maxlen: Option<&str>, fields: &Fields) -> (usize, usize) {
    let fields_len: usize = fields.iter().map(|(name, value)| name.len() + value.len()).sum();
    let (trim_args, trim_len) = maxlen.map_or((0, 0), |m| (3, "MAXLEN".len() + "~".len() + m.len()));
    (3 + trim_args + 2 * fields.len(), "XADD".len() + key.len() + "*".len() + trim_len + fields_len)
}

/// What became of one stream's part of a round.
enum Written {
    /// Written now; the stream's length after it.
    Now { len: u64 },
    /// An earlier attempt of this round was written (its reply was lost).
    Already,
    /// The stream is at its cap: nothing written.
    Full,
    /// The stream is at its cap (its length, read first): nothing written.
    FullAt { len: u64 },
}

#[cfg(test)]
mod tests {
    use redis::Arg;

    use super::*;

    fn args(cmd: &Cmd) -> Vec<Vec<u8>> {
        cmd.args_iter()
            .map(|a| match a {
                Arg::Simple(bytes) => bytes.to_vec(),
                _ => b"<not an argument>".to_vec(),
            })
            .collect()
    }

    #[test]
    fn an_xadd_is_sized_exactly_and_carries_every_field() {
        let fields: Fields =
            vec![("t", b"veh".to_vec()), ("dev", b"LSVAB4BR5JN000001".to_vec()), ("p", vec![0, 255, 7])];
        for maxlen in [None, Some("100000")] {
            let cmd = xadd("iotgw:up:3", maxlen, &fields);
            let got = args(&cmd);
            let mut want: Vec<Vec<u8>> = vec![b"XADD".to_vec(), b"iotgw:up:3".to_vec()];
            if let Some(m) = maxlen {
                want.extend([b"MAXLEN".to_vec(), b"~".to_vec(), m.as_bytes().to_vec()]);
            }
            want.push(b"*".to_vec());
            for (name, value) in &fields {
                want.extend([name.as_bytes().to_vec(), value.clone()]);
            }
            assert_eq!(got, want);
            // The sizes the buffers were made with are exactly what the command holds.
            let (n, bytes) = xadd_size("iotgw:up:3", maxlen, &fields);
            assert_eq!((n, bytes), (got.len(), got.iter().map(Vec::len).sum::<usize>()));
        }
    }
}
