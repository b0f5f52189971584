//! Rollouts that stop themselves (hawkBit's groups and thresholds, AWS IoT Jobs' abort
//! criteria) and the seed's compensation.
//!
//! A task's accepted vehicles are split into waves at creation: cumulative percentages in
//! request order (`[5, 50, 100]`: the first 5 % are the canary, then up to half, then the rest).
//! Only released waves are pushed. On every poll of the driver, for each running task:
//!
//! - **pause**: if more than `error_threshold` % of the vehicles released since the last
//!   resume have failed at least once (failed, rolled back or timed out, any attempt), the task
//!   is paused (`paused_reason` = `error_threshold`), with an `ota_task_paused` notice and a
//!   counted metric the alert rules watch. Nothing new is pushed while paused; vehicles already
//!   upgrading carry on and keep reporting;
//! - **release**: otherwise, once `success_threshold` % of the current wave succeeded, or none
//!   of it is still running, the next wave is released.
//!
//! Operators pause, resume and abort (abort is the task's cancel). A resume after an automatic
//! pause accepts the failures seen so far and releases the next wave.
//!
//! **Compensation** (seed document 000): a vehicle whose upgrade failed is notified again,
//! `ota.repush_delay_s` later, as a new attempt (the notice's `attempt`; reports of an earlier
//! attempt change nothing), at most `ota.repush_max` times; after that the task's publisher gets
//! an `ota_gave_up` notice naming the vehicle and the reason.

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_postgres::Transaction;

use crate::app::App;
use crate::error::StoreError;
use crate::purchases::outbox;

/// Most waves a task may have.
pub const MAX_WAVES: usize = 20;

/// How a task rolls out (the body's `rollout`; absent: one wave, never paused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// Cumulative percentages of the accepted vehicles, increasing, the last 100.
    pub waves: Vec<u8>,
    /// A wave is followed by the next once this percentage of it succeeded (or none of it is
    /// still running).
    #[serde(default = "hundred")]
    pub success_threshold_pct: u8,
    /// The task pauses itself when more than this percentage of the released vehicles failed.
    #[serde(default = "hundred")]
    pub error_threshold_pct: u8,
}

fn hundred() -> u8 {
    100
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout { waves: vec![100], success_threshold_pct: 100, error_threshold_pct: 100 }
    }
}

impl Rollout {
    /// Checks the rollout.
    ///
    /// # Errors
    /// `Invalid` naming the field.
    pub fn check(&self) -> Result<(), StoreError> {
        if self.waves.is_empty() || self.waves.len() > MAX_WAVES {
            return Err(StoreError::invalid("rollout.waves", format!("1..={MAX_WAVES} waves")));
        }
        if !self.waves.windows(2).all(|w| w[0] < w[1]) || self.waves[0] == 0 || self.waves.last() != Some(&100) {
            return Err(StoreError::invalid("rollout.waves", "increasing percentages in 1..=100, the last 100"));
        }
        if self.success_threshold_pct > 100 || self.error_threshold_pct > 100 {
            return Err(StoreError::invalid("rollout", "thresholds are percentages, 0..=100"));
        }
        Ok(())
    }

    /// The wave of each of `n` vehicles, in order: vehicle `k` is in the first wave whose
    /// share, rounded up, is above `k`.
    pub fn assign(&self, n: usize) -> Vec<i16> {
        (0..n)
            .map(|k| {
                let wave = self.waves.iter().position(|pct| k < (usize::from(*pct) * n).div_ceil(100));
                i16::try_from(wave.unwrap_or(self.waves.len() - 1)).unwrap_or(i16::MAX)
            })
            .collect()
    }
}

/// Pauses tasks past their error threshold and releases waves; returns how many tasks changed.
///
/// # Errors
/// PostgreSQL errors.
pub async fn advance(app: &App) -> Result<usize, StoreError> {
    let client = app.pg.get().await?;
    let rows = client
        .query(
            "SELECT t.id, t.created_by, cardinality(t.waves), t.current_wave, t.accepted_wave,
                    t.success_threshold, t.error_threshold,
                    count(*) FILTER (WHERE v.wave = t.current_wave),
                    count(*) FILTER (WHERE v.wave = t.current_wave AND v.state = 'success'),
                    count(*) FILTER (WHERE v.wave = t.current_wave AND v.active),
                    count(*) FILTER (WHERE v.wave > t.accepted_wave AND v.wave <= t.current_wave),
                    count(*) FILTER (WHERE v.wave > t.accepted_wave AND v.wave <= t.current_wave
                                       AND EXISTS (SELECT 1 FROM ota_failures f WHERE f.task_id = v.task_id AND f.vin = v.vin))
               FROM ota_tasks t JOIN ota_task_vehicles v ON v.task_id = t.id
              WHERE t.state = 'running' AND (cardinality(t.waves) > 1 OR t.error_threshold < 100)
              GROUP BY t.id",
            &[],
        )
        .await?;
    let mut changed = 0;
    for r in &rows {
        let (id, publisher): (String, String) = (r.get(0), r.get(1));
        let (waves, current): (i32, i16) = (r.get(2), r.get(3));
        let (success_pct, error_pct): (i16, i16) = (r.get(5), r.get(6));
        let (size, ok, running, released, failed): (i64, i64, i64, i64, i64) =
            (r.get(7), r.get(8), r.get(9), r.get(10), r.get(11));
        if released > 0 && failed * 100 > i64::from(error_pct) * released {
            // The pause and its notice in one transaction: both or neither.
            let mut pg = app.pg.get().await?;
            let tx = pg.transaction().await?;
            let n = tx
                .execute(
                    "UPDATE ota_tasks SET state = 'paused', paused_reason = 'error_threshold'
                      WHERE id = $1 AND state = 'running'",
                    &[&id],
                )
                .await?;
            if n == 1 {
                let notice = json!({"type": "ota_task_paused", "task_id": id, "wave": current, "failed": failed,
                                    "released": released, "error_threshold_pct": error_pct, "publisher": publisher});
                outbox::enqueue(&tx, outbox::NOTICES, &format!("ota_task_paused:{id}:{current}"), &notice).await?;
            }
            tx.commit().await?;
            if n == 1 {
                changed += 1;
                app.metrics.ota_auto_pauses.inc();
                app.purchase_wakers.relay.notify_one();
                tracing::warn!(task = %id, wave = current, failed, released, "OTA task paused: error threshold crossed");
            }
            continue;
        }
        let wave_done = size == 0 || ok * 100 >= i64::from(success_pct) * size || running == 0;
        if wave_done && i32::from(current) + 1 < waves {
            let n = client
                .execute(
                    "UPDATE ota_tasks SET current_wave = current_wave + 1 WHERE id = $1 AND state = 'running'
                        AND current_wave = $2",
                    &[&id, &current],
                )
                .await?;
            if n == 1 {
                changed += 1;
                app.metrics.ota_waves_released.inc();
                tracing::info!(task = %id, wave = current + 1, "OTA wave released");
            }
        }
    }
    if changed > 0 {
        app.ota_waker.notify_one();
    }
    Ok(changed)
}

/// Pauses a running task (an operator's decision): nothing new is pushed.
///
/// # Errors
/// `NotFound`; `Rejected` (`not_running`); storage errors.
pub async fn pause(app: &App, id: &str) -> Result<(), StoreError> {
    let client = app.pg.get().await?;
    let state: Option<String> =
        client.query_opt("SELECT state FROM ota_tasks WHERE id = $1", &[&id]).await?.map(|r| r.get(0));
    match state.as_deref() {
        None => Err(StoreError::NotFound(format!("task {id}"))),
        Some("paused") => Ok(()),
        Some("running" | "scheduled") => {
            client
                .execute(
                    "UPDATE ota_tasks SET state = 'paused', paused_reason = 'operator'
                      WHERE id = $1 AND state IN ('running', 'scheduled')",
                    &[&id],
                )
                .await?;
            Ok(())
        }
        Some(s) => Err(StoreError::rejected("not_running", format!("task {id} is {s}"))),
    }
}

/// Resumes a paused task. After an automatic pause the failures seen so far are accepted and
/// the next wave is released.
///
/// # Errors
/// `NotFound`; `Rejected` (`not_paused`); storage errors.
pub async fn resume(app: &App, id: &str) -> Result<(), StoreError> {
    let client = app.pg.get().await?;
    let n = client
        .execute(
            "UPDATE ota_tasks SET state = 'running',
                    accepted_wave = CASE WHEN paused_reason = 'error_threshold' THEN current_wave ELSE accepted_wave END,
                    current_wave = CASE WHEN paused_reason = 'error_threshold'
                                        THEN LEAST(current_wave + 1, cardinality(waves) - 1) ELSE current_wave END,
                    paused_reason = NULL
              WHERE id = $1 AND state = 'paused'",
            &[&id],
        )
        .await?;
    if n == 0 {
        let state: Option<String> =
            client.query_opt("SELECT state FROM ota_tasks WHERE id = $1", &[&id]).await?.map(|r| r.get(0));
        return match state {
            None => Err(StoreError::NotFound(format!("task {id}"))),
            Some(s) => Err(StoreError::rejected("not_paused", format!("task {id} is {s}"))),
        };
    }
    app.ota_waker.notify_one();
    Ok(())
}

/// After a failure of `attempt` (recorded in `tx`): the vehicle is notified again later as a
/// new attempt, or, past `ota.repush_max`, the publisher is told. Returns whether it will be
/// notified again.
///
/// # Errors
/// PostgreSQL errors.
pub async fn compensate(
    app: &App,
    tx: &Transaction<'_>,
    task: &str,
    vin: &str,
    attempt: i16,
    reason: &str,
) -> Result<bool, StoreError> {
    let max = i16::try_from(app.config.ota.repush_max).unwrap_or(i16::MAX);
    if attempt <= max {
        // Not if the task ended meanwhile, nor if another task holds the vehicle now.
        let n = tx
            .execute(
                "UPDATE ota_task_vehicles v SET state = 'pending', rank = 0, active = true, attempt = attempt + 1,
                        due_at = now() + make_interval(secs => $4), download_percent = 0, bytes_done = 0,
                        upgrade_percent = 0, ecu = NULL, ecu_percent = NULL, ecu_ts_ms = 0, pushed_at = NULL,
                        push_message_id = NULL, package_id = NULL, updated_at = now()
                  WHERE task_id = $1 AND vin = $2 AND attempt = $3
                    AND (SELECT state FROM ota_tasks WHERE id = $1) IN ('running', 'paused')
                    AND NOT EXISTS (SELECT 1 FROM ota_task_vehicles o WHERE o.vin = $2 AND o.active AND o.task_id <> $1)",
                &[&task, &vin, &attempt, &(app.config.ota.repush_delay_s as f64)],
            )
            .await?;
        if n == 1 {
            app.metrics.ota_repushes.inc();
            tracing::info!(task, vin, attempt = attempt + 1, reason, "OTA upgrade failed; notifying again");
            return Ok(true);
        }
        return Ok(false);
    }
    let publisher: Option<String> =
        tx.query_opt("SELECT created_by FROM ota_tasks WHERE id = $1", &[&task]).await?.map(|r| r.get(0));
    let notice = json!({"type": "ota_gave_up", "task_id": task, "vin": vin, "attempts": attempt, "reason": reason,
                        "publisher": publisher});
    outbox::enqueue(tx, outbox::NOTICES, &format!("ota_gave_up:{task}:{vin}"), &notice).await?;
    app.metrics.ota_gave_up.inc();
    tracing::warn!(task, vin, attempts = attempt, reason, "OTA upgrade failed for good; publisher notified");
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_split_in_order_with_a_canary() {
        let r = Rollout { waves: vec![10, 50, 100], ..Default::default() };
        let w = r.assign(20);
        assert_eq!(w.iter().filter(|x| **x == 0).count(), 2);
        assert_eq!(w.iter().filter(|x| **x == 1).count(), 8);
        assert_eq!(w.iter().filter(|x| **x == 2).count(), 10);
        assert!(w.windows(2).all(|p| p[0] <= p[1]));
        // A small task still gets a canary of one.
        assert_eq!(Rollout { waves: vec![5, 100], ..Default::default() }.assign(3), [0, 1, 1]);
        assert_eq!(Rollout::default().assign(4), [0, 0, 0, 0]);
        assert!(Rollout { waves: vec![50, 40, 100], ..Default::default() }.check().is_err());
        assert!(Rollout { waves: vec![50], ..Default::default() }.check().is_err());
        assert!(Rollout { waves: vec![0, 100], ..Default::default() }.check().is_err());
        assert!(Rollout { waves: vec![1, 100], error_threshold_pct: 101, ..Default::default() }.check().is_err());
    }
}
