//! Lane weights (seed document 003): every reading is stored; only stable readings update the
//! cached weight of a lane, together with the time they were taken, so a settlement can tell
//! whether a weight is newer than a door-close event.
//!
//! Readings are stored one row per report (a door's lanes read at one time: `weight_reports`,
//! the lanes as arrays; the view `weight_readings` shows one row per lane), a batch of stream
//! entries in one binary `COPY`, idempotent by the report's primary key. One row and one key
//! per report instead of per lane is what carries 50,000 readings a second (BENCHMARKS.md). The
//! cache is a Redis hash per cabinet, `P w:{cabinet}`, field `door:lane` = `grams sample_ms`,
//! replaced only by a newer stable reading (Lua), so redelivered or reordered reports never
//! move it back. Retention: daily partitions, created ahead and dropped after
//! `retention_days` by [`maintain_partitions`].

use std::collections::HashMap;

use bytes::Bytes;
use dashmap::DashSet;
use protocol::DeviceId;
use protocol::bus::DeviceKey;
use protocol::cabinet::WeightReport;
use serde::Serialize;
use tokio_postgres::CopyInSink;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;

use crate::app::{App, checked_time, ms_of, now_ms, time_of};
use crate::error::StoreError;
use crate::status::{self, Event};

/// Sets each lane's cached weight if the reading is newer. ARGV: (field, grams, sample_ms)*.
const CACHE_STABLE: &str = r"
for i = 1, #ARGV, 3 do
  local prev = redis.call('HGET', KEYS[1], ARGV[i])
  local prev_ms = prev and tonumber(string.match(prev, ' (%d+)$')) or -1
  if tonumber(ARGV[i + 2]) > prev_ms then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1] .. ' ' .. ARGV[i + 2])
  end
end
return 1
";

/// A report as taken off a stream.
#[derive(Debug, Clone)]
pub struct Received {
    /// The cabinet.
    pub cabinet: DeviceId,
    /// The report.
    pub report: WeightReport,
    /// When the gateway received it, ms.
    pub at_ms: u64,
}

/// A lane's cached weight.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct LaneWeight {
    /// Door.
    pub door_id: u8,
    /// Lane.
    pub lane_id: u8,
    /// Last stable weight, grams.
    pub grams: i32,
    /// When that stable reading was taken, ms since the Unix epoch (cabinet clock).
    pub sample_ms: u64,
}

/// One stored reading.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Reading {
    /// Grams.
    pub grams: i32,
    /// Stable flag.
    pub stable: bool,
    /// Sample time, ms since the Unix epoch.
    pub sample_ms: u64,
}

fn cache_key(app: &App, cabinet: &str) -> String {
    format!("{}w:{{{cabinet}}}", app.keys.prefix())
}

/// The columns of `weight_reports` in the order [`write_reports`] sends them.
const COLUMNS: &str = "cabinet_id, door_id, sample_time, lane_ids, grams, stable, received_at";

/// Stores the reports of `batch` (one row each) and updates the cache with their stable
/// readings. Returns how many lane readings were new.
///
/// The batch goes in one binary `COPY`. A report already stored (a redelivered entry, a
/// resent frame) makes that `COPY` fail on the primary key as a whole; the batch then goes
/// again through a session-local staging table and `INSERT ... ON CONFLICT DO NOTHING`, which
/// stores the new reports and counts the others (`devsvc_weight_reports_duplicate_total`).
/// Duplicates are rare, so nearly every batch costs one `COPY`.
///
/// # Errors
/// Any storage error; nothing is acknowledged then, and a retry is harmless.
pub async fn store(app: &App, batch: &[Received]) -> Result<u64, StoreError> {
    if batch.is_empty() {
        return Ok(0);
    }
    let mut client = app.pg.get().await?;
    let copied = async {
        let sink = client.copy_in(&format!("COPY weight_reports ({COLUMNS}) FROM STDIN (FORMAT binary)")).await?;
        write_reports(sink, batch).await
    }
    .await;
    let inserted = match copied {
        Ok(_) => batch.iter().map(|r| r.report.lanes.len() as u64).sum(),
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            let tx = client.transaction().await?;
            tx.batch_execute(
                "CREATE TEMP TABLE IF NOT EXISTS weight_reports_in (LIKE weight_reports) ON COMMIT DELETE ROWS",
            )
            .await?;
            let sink = tx.copy_in(&format!("COPY weight_reports_in ({COLUMNS}) FROM STDIN (FORMAT binary)")).await?;
            write_reports(sink, batch).await?;
            let rows = tx
                .query(
                    &format!(
                        "INSERT INTO weight_reports ({COLUMNS}) SELECT {COLUMNS} FROM weight_reports_in
                         ON CONFLICT DO NOTHING RETURNING cardinality(lane_ids)"
                    ),
                    &[],
                )
                .await?;
            tx.commit().await?;
            app.metrics.reports_duplicate.inc_by((batch.len() - rows.len()) as u64);
            rows.iter().map(|r| u64::try_from(r.get::<_, i32>(0)).unwrap_or(0)).sum()
        }
        Err(e) => return Err(e.into()),
    };
    drop(client);
    app.metrics.readings_persisted.inc_by(inserted);
    cache_stable(app, batch).await?;
    Ok(inserted)
}

/// Writes `batch` into a binary `COPY` of [`COLUMNS`] and ends it. Returns the rows written.
async fn write_reports(sink: CopyInSink<Bytes>, batch: &[Received]) -> Result<u64, tokio_postgres::Error> {
    let types = [
        Type::TEXT,
        Type::INT2,
        Type::TIMESTAMPTZ,
        Type::INT2_ARRAY,
        Type::INT4_ARRAY,
        Type::BOOL_ARRAY,
        Type::TIMESTAMPTZ,
    ];
    let mut writer = std::pin::pin!(BinaryCopyInWriter::new(sink, &types));
    for r in batch {
        let lanes = &r.report.lanes;
        let lane_ids: Vec<i16> = lanes.iter().map(|l| i16::from(l.lane_id)).collect();
        let grams: Vec<i32> = lanes.iter().map(|l| l.grams).collect();
        let stable: Vec<bool> = lanes.iter().map(|l| l.stable).collect();
        writer
            .as_mut()
            .write(&[
                &r.cabinet.as_str(),
                &i16::from(r.report.door_id),
                &time_of(r.report.sample_time_ms),
                &lane_ids,
                &grams,
                &stable,
                &time_of(r.at_ms),
            ])
            .await?;
    }
    writer.finish().await
}

/// The stable readings of `batch` into the cache, newest wins: one script call per cabinet,
/// all in one round trip.
async fn cache_stable(app: &App, batch: &[Received]) -> Result<(), StoreError> {
    let mut by_cabinet: HashMap<&str, Vec<String>> = HashMap::new();
    for r in batch {
        for l in r.report.lanes.iter().filter(|l| l.stable) {
            let args = by_cabinet.entry(r.cabinet.as_str()).or_default();
            args.push(format!("{}:{}", r.report.door_id, l.lane_id));
            args.push(l.grams.to_string());
            args.push(r.report.sample_time_ms.to_string());
        }
    }
    let calls = by_cabinet
        .iter()
        .map(|(cabinet, args)| {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(CACHE_STABLE).arg(1).arg(cache_key(app, cabinet)).arg(args);
            cmd
        })
        .collect();
    app.redis.clone().query_each(calls).await?;
    Ok(())
}

/// Marks cabinets initialised once every configured door has a stable weight cached (the
/// seed's "first connection -> pending initialisation -> online after the initial weights").
/// `known` remembers the cabinets already initialised, so the check costs nothing afterwards.
/// A batch's cabinets are checked together (one query, one Redis round trip, one status
/// transaction), as a login wave brings thousands of first reports a second.
///
/// # Errors
/// Any storage error.
pub async fn check_initialised(app: &App, batch: &[Received], known: &DashSet<DeviceId>) -> Result<(), StoreError> {
    let mut candidates: Vec<&DeviceId> = batch.iter().map(|r| &r.cabinet).filter(|c| !known.contains(*c)).collect();
    candidates.sort();
    candidates.dedup();
    if candidates.is_empty() {
        return Ok(());
    }
    let keys: Vec<String> = candidates.iter().map(|c| DeviceKey::Cabinet((*c).clone()).to_string()).collect();
    let ids: Vec<&str> = candidates.iter().map(|c| c.as_str()).collect();
    let rows = app
        .pg
        .get()
        .await?
        .query(
            "SELECT u.id, d.initialised, (SELECT array_agg(door_id) FROM doors WHERE cabinet_id = u.id)
               FROM unnest($1::text[], $2::text[]) AS u(key, id) JOIN devices d ON d.key = u.key",
            &[&keys, &ids],
        )
        .await?;
    let by_id: HashMap<&str, &DeviceId> = candidates.iter().map(|c| (c.as_str(), *c)).collect();
    // Cabinets not initialised yet, with their doors.
    let mut pending: Vec<(&DeviceId, Vec<i16>)> = Vec::new();
    for row in &rows {
        let Some(&cabinet) = by_id.get(row.get::<_, &str>(0)) else { continue };
        if row.get::<_, bool>(1) {
            known.insert(cabinet.clone());
        } else {
            pending.push((cabinet, row.get::<_, Option<Vec<i16>>>(2).unwrap_or_default()));
        }
    }
    let reads = pending
        .iter()
        .map(|(cabinet, _)| {
            let mut read = redis::cmd("HGETALL");
            read.arg(cache_key(app, cabinet.as_str()));
            read
        })
        .collect();
    let cached: Vec<HashMap<String, String>> = app.redis.clone().query_each_as(reads).await?;
    let complete: Vec<&DeviceId> = pending
        .iter()
        .zip(&cached)
        .filter(|((_, doors), fields)| {
            let cached = lanes_of(fields);
            !doors.is_empty() && doors.iter().all(|d| cached.iter().any(|w| i16::from(w.door_id) == *d))
        })
        .map(|((cabinet, _), _)| *cabinet)
        .collect();
    let events: Vec<(DeviceKey, Event)> =
        complete.iter().map(|c| (DeviceKey::Cabinet((*c).clone()), Event::Initialised)).collect();
    status::apply_many(app, &events).await?;
    for cabinet in complete {
        known.insert(cabinet.clone());
    }
    Ok(())
}

/// The cached weight of every lane of `cabinet`.
///
/// # Errors
/// Any Redis error.
pub async fn current(app: &App, cabinet: &str) -> Result<Vec<LaneWeight>, StoreError> {
    let mut con = app.redis.clone();
    let fields: HashMap<String, String> =
        redis::cmd("HGETALL").arg(cache_key(app, cabinet)).query_async(&mut con).await?;
    Ok(lanes_of(&fields))
}

/// The lanes of a cabinet's cache hash (`door:lane` -> `grams sample_ms`), by door and lane.
fn lanes_of(fields: &HashMap<String, String>) -> Vec<LaneWeight> {
    let mut lanes: Vec<LaneWeight> = fields
        .iter()
        .filter_map(|(field, value)| {
            let (door, lane) = field.split_once(':')?;
            let (grams, sample) = value.split_once(' ')?;
            Some(LaneWeight {
                door_id: door.parse().ok()?,
                lane_id: lane.parse().ok()?,
                grams: grams.parse().ok()?,
                sample_ms: sample.parse().ok()?,
            })
        })
        .collect();
    lanes.sort_by_key(|l| (l.door_id, l.lane_id));
    lanes
}

/// A lane's readings between `from_ms` and `to_ms`, oldest first, at most `limit`.
///
/// # Errors
/// Any storage error.
pub async fn history(
    app: &App,
    cabinet: &str,
    door: u8,
    lane: u8,
    from_ms: u64,
    to_ms: u64,
    limit: i64,
) -> Result<Vec<Reading>, StoreError> {
    let client = app.pg.get().await?;
    let rows = client
        .query(
            "SELECT l.grams, l.stable, r.sample_time
               FROM weight_reports r CROSS JOIN LATERAL unnest(r.lane_ids, r.grams, r.stable) AS l (lane_id, grams, stable)
              WHERE r.cabinet_id = $1 AND r.door_id = $2 AND l.lane_id = $3 AND r.sample_time >= $4 AND r.sample_time < $5
              ORDER BY r.sample_time LIMIT $6",
            &[
                &cabinet,
                &i16::from(door),
                &i16::from(lane),
                &checked_time("from_ms", from_ms)?,
                &checked_time("to_ms", to_ms)?,
                &limit.clamp(1, 10_000),
            ],
        )
        .await?;
    Ok(rows.iter().map(|r| Reading { grams: r.get(0), stable: r.get(1), sample_ms: ms_of(r.get(2)) }).collect())
}

/// Creates the daily partitions of `weight_reports` from yesterday to `ahead` days from now
/// and drops those older than `retention_days`. Safe to run from several instances at once.
///
/// # Errors
/// Any storage error.
pub async fn maintain_partitions(app: &App) -> Result<(), StoreError> {
    const DAY_MS: u64 = 86_400_000;
    let cfg = &app.config.weights;
    let today = now_ms() / DAY_MS;
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(1070677700002)", &[]).await?;
    for day in today.saturating_sub(1)..=today + u64::from(cfg.partitions_ahead_days) {
        let name = partition_name(day);
        if tx.query_opt("SELECT 1 FROM pg_class WHERE relname = $1", &[&name]).await?.is_some() {
            continue;
        }
        let (from, to) = (date_of(day), date_of(day + 1));
        // Readings of that day that fell into the default partition (no partition existed yet)
        // would block the new one: move them out, create it, move them back in.
        tx.batch_execute(&format!(
            "CREATE TEMP TABLE moved_reports ON COMMIT DROP AS
               WITH moved AS (DELETE FROM weight_reports_default
                               WHERE sample_time >= '{from}' AND sample_time < '{to}' RETURNING *)
               SELECT * FROM moved;
             CREATE TABLE {name} PARTITION OF weight_reports FOR VALUES FROM ('{from}') TO ('{to}');
             INSERT INTO weight_reports SELECT * FROM moved_reports;
             DROP TABLE moved_reports;"
        ))
        .await?;
        tracing::info!(partition = %name, "created weight readings partition");
    }
    let oldest_kept = today.saturating_sub(u64::from(cfg.retention_days));
    let rows = tx
        .query(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
               JOIN pg_class p ON p.oid = i.inhparent
              WHERE p.relname = 'weight_reports' AND c.relname ~ '^weight_reports_d[0-9]+$'",
            &[],
        )
        .await?;
    for r in rows {
        let name: String = r.get(0);
        let day: Option<u64> = name.strip_prefix("weight_reports_d").and_then(|d| d.parse().ok());
        if day.is_some_and(|d| d < oldest_kept) {
            tx.batch_execute(&format!("DROP TABLE {name}")).await?;
            tracing::info!(partition = %name, "dropped weight readings past retention");
        }
    }
    tx.commit().await?;
    Ok(())
}

/// `weight_reports_d<days since the epoch>`: stable, sortable, and safe as an identifier.
fn partition_name(day: u64) -> String {
    format!("weight_reports_d{day}")
}

/// `YYYY-MM-DD 00:00:00+00` of a day counted from 1970-01-01.
fn date_of(day: u64) -> String {
    let (y, m, d) = crate::clock::civil_date(day);
    format!("{y:04}-{m:02}-{d:02} 00:00:00+00")
}

#[cfg(test)]
mod tests {
    use super::date_of;

    #[test]
    fn dates_of_days() {
        assert_eq!(date_of(0), "1970-01-01 00:00:00+00");
        assert_eq!(date_of(19_675), "2023-11-14 00:00:00+00");
        assert_eq!(date_of(11_016), "2000-02-29 00:00:00+00");
        assert_eq!(date_of(20_780), "2026-11-23 00:00:00+00");
    }
}
