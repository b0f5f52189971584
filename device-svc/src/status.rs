//! Device status. Cabinets: `registered` -> (first login) `pending_init` -> (initial lane
//! weights) `online`; later logins go straight to `online`; `offline` when the session closes or
//! its heartbeats stop (see [`offline`](crate::offline)). Vehicles have nothing to initialise
//! (they are registered `initialised`): `online` while they hold a session, `offline` when it
//! ends.
//!
//! Every change is fenced by the session epoch (the gateway's token, SPEC.md 3.1): an event
//! for an older session than the one the status already belongs to changes nothing, and so does
//! a repeated event, so late, reordered or redelivered entries can never flip a device back.
//! Each change is one transaction: the row is locked, the decision made, the row and a history
//! entry written together. A login wave brings thousands of session events a second, so the
//! consumer applies them in sets ([`apply_many`]): one transaction locks every row of the set
//! in key order, decides each event in stream order in memory, and writes the rows and the
//! history with one statement each, where one event at a time cost five round trips.

use protocol::bus::DeviceKey;

use crate::app::App;
use crate::error::StoreError;

/// Every status a device row can hold (the `devices.status` check constraint).
pub const ALL: [&str; 4] = ["registered", "pending_init", "online", "offline"];

/// Something that may change a device's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A login succeeded on `node`.
    Opened {
        /// The session's epoch.
        epoch: u64,
        /// The gateway node.
        node: String,
        /// Firmware or MQTT version.
        info: String,
    },
    /// A session ended.
    Closed {
        /// The session's epoch.
        epoch: u64,
        /// Why (`peer_closed`, `idle_timeout`, `drain`, ...).
        reason: String,
    },
    /// The session's heartbeats stopped while its node was healthy.
    HeartbeatTimeout {
        /// The epoch the heartbeats belonged to.
        epoch: u64,
        /// `heartbeat_timeout` or `node_down`.
        reason: &'static str,
    },
    /// The cabinet reported stable weights for every door.
    Initialised,
}

/// A change that was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Previous status.
    pub from: String,
    /// New status.
    pub to: String,
    /// Why.
    pub reason: String,
}

struct Current {
    status: String,
    epoch: u64,
    initialised: bool,
}

impl Current {
    fn from_row(row: &tokio_postgres::Row, first: usize) -> Self {
        Self {
            status: row.get(first),
            epoch: u64::try_from(row.get::<_, i64>(first + 1)).unwrap_or(0),
            initialised: row.get(first + 2),
        }
    }
}

/// Decides the new (status, epoch, reason), or `None` when the event changes nothing.
fn decide(cur: &Current, event: &Event) -> Option<(String, u64, String)> {
    let live = matches!(cur.status.as_str(), "online" | "pending_init");
    match event {
        Event::Opened { epoch, .. } => {
            if *epoch < cur.epoch || (*epoch == cur.epoch && live) {
                return None;
            }
            let to = if cur.initialised { "online" } else { "pending_init" };
            Some((to.into(), *epoch, "session_opened".into()))
        }
        Event::Closed { epoch, reason } => {
            if *epoch < cur.epoch || (*epoch == cur.epoch && !live) {
                return None;
            }
            Some(("offline".into(), *epoch, format!("session_closed:{reason}")))
        }
        Event::HeartbeatTimeout { epoch, reason } => {
            (*epoch == cur.epoch && live).then(|| ("offline".into(), cur.epoch, (*reason).into()))
        }
        Event::Initialised => {
            (cur.status == "pending_init").then(|| ("online".into(), cur.epoch, "initialised".into()))
        }
    }
}

/// Applies `event` to `device`. Returns the change made, if any.
///
/// # Errors
/// `NotFound` for an unregistered device, or a storage error.
pub async fn apply(app: &App, device: &DeviceKey, event: &Event) -> Result<Option<Change>, StoreError> {
    let key = device.to_string();
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_opt("SELECT status, status_epoch, initialised FROM devices WHERE key = $1 FOR UPDATE", &[&key])
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("device {key}")))?;
    let cur = Current::from_row(&row, 0);
    if *event == Event::Initialised && !cur.initialised {
        tx.execute("UPDATE devices SET initialised = true WHERE key = $1", &[&key]).await?;
    }
    let Some((to, epoch, reason)) = decide(&cur, event) else {
        tx.commit().await?;
        return Ok(None);
    };
    let epoch_i = i64::try_from(epoch).unwrap_or(i64::MAX);
    let (node, info) = match event {
        Event::Opened { node, info, .. } => (Some(node.as_str()), Some(info.as_str())),
        _ => (None, None),
    };
    tx.execute(
        "UPDATE devices SET status = $2, status_epoch = $3, status_reason = $4, status_changed_at = now(),
                node = COALESCE($5, node), info = COALESCE($6, info)
          WHERE key = $1",
        &[&key, &to, &epoch_i, &reason, &node, &info],
    )
    .await?;
    tx.execute(
        "INSERT INTO device_status_history (device_key, from_status, to_status, reason, epoch, node)
         SELECT $1, $2, $3, $4, $5, node FROM devices WHERE key = $1",
        &[&key, &cur.status, &to, &reason, &epoch_i],
    )
    .await?;
    tx.commit().await?;
    let change = Change { from: cur.status, to, reason };
    record(app, device, &change, epoch);
    Ok(Some(change))
}

/// Counts and logs a change that was stored.
fn record(app: &App, device: &DeviceKey, change: &Change, epoch: u64) {
    let reason_label = change.reason.split(':').next().unwrap_or("other");
    app.metrics.status_changes.with_label_values(&[device.kind().as_str(), &change.to, reason_label]).inc();
    tracing::info!(%device, from = %change.from, to = %change.to, reason = %change.reason, epoch, "device status changed");
}

/// What [`apply_many`] did with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The status changed.
    Changed(Change),
    /// Nothing to change (late, repeated, or already so).
    Unchanged,
    /// No such device (deleted from the registry after it logged in).
    UnknownDevice,
}

/// A device row's state while a set of events is decided.
struct Deciding {
    cur: Current,
    node: Option<String>,
    /// Any event of the set changed the row.
    changed: bool,
    /// Its `initialised` flag was set by the set.
    initialised_now: bool,
    last_epoch: u64,
    last_reason: String,
    info: Option<String>,
}

/// History entries of a set, a column each (for `unnest`).
#[derive(Default)]
struct HistoryColumns {
    device: Vec<String>,
    from: Vec<String>,
    to: Vec<String>,
    reason: Vec<String>,
    epoch: Vec<i64>,
    node: Vec<Option<String>>,
}

/// Device rows as a set leaves them, a column each (for `unnest`).
#[derive(Default)]
struct RowColumns<'a> {
    key: Vec<&'a str>,
    status: Vec<&'a str>,
    epoch: Vec<i64>,
    reason: Vec<&'a str>,
    node: Vec<Option<&'a str>>,
    info: Vec<Option<&'a str>>,
    initialised: Vec<bool>,
}

/// Applies `events` as [`apply`] would one after the other, in one transaction: each device's
/// events in their order, every row locked (in key order, so two sets never wait on each other)
/// before any is decided. Returns one outcome per event, in order.
///
/// # Errors
/// A storage error: nothing of the set is stored.
pub async fn apply_many(app: &App, events: &[(DeviceKey, Event)]) -> Result<Vec<Outcome>, StoreError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let mut keys: Vec<String> = events.iter().map(|(d, _)| d.to_string()).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let rows = tx
        .query(
            "SELECT key, status, status_epoch, initialised, node FROM devices
              WHERE key = ANY($1) ORDER BY key FOR UPDATE",
            &[&keys],
        )
        .await?;
    let mut devices: std::collections::HashMap<String, Deciding> = rows
        .iter()
        .map(|row| {
            let cur = Current::from_row(row, 1);
            let deciding = Deciding {
                last_epoch: cur.epoch,
                cur,
                node: row.get(4),
                changed: false,
                initialised_now: false,
                last_reason: String::new(),
                info: None,
            };
            (row.get::<_, String>(0), deciding)
        })
        .collect();
    let mut outcomes = Vec::with_capacity(events.len());
    let mut history = HistoryColumns::default();
    for (device, event) in events {
        let key = device.to_string();
        let Some(d) = devices.get_mut(&key) else {
            outcomes.push(Outcome::UnknownDevice);
            continue;
        };
        if *event == Event::Initialised && !d.cur.initialised {
            d.cur.initialised = true;
            d.initialised_now = true;
        }
        let Some((to, epoch, reason)) = decide(&d.cur, event) else {
            outcomes.push(Outcome::Unchanged);
            continue;
        };
        if let Event::Opened { node, info, .. } = event {
            d.node = Some(node.clone());
            d.info = Some(info.clone());
        }
        history.device.push(key);
        history.from.push(d.cur.status.clone());
        history.to.push(to.clone());
        history.reason.push(reason.clone());
        history.epoch.push(i64::try_from(epoch).unwrap_or(i64::MAX));
        history.node.push(d.node.clone());
        let from = std::mem::replace(&mut d.cur.status, to.clone());
        d.cur.epoch = epoch;
        d.changed = true;
        d.last_epoch = epoch;
        d.last_reason.clone_from(&reason);
        outcomes.push(Outcome::Changed(Change { from, to, reason }));
    }
    // A row whose status changes takes its `initialised` flag in the same update (a first
    // login's initialisation is one new row version, not two); the rare other one on its own.
    let initialised: Vec<&String> =
        devices.iter().filter(|(_, d)| d.initialised_now && !d.changed).map(|(k, _)| k).collect();
    if !initialised.is_empty() {
        tx.execute("UPDATE devices SET initialised = true WHERE key = ANY($1)", &[&initialised]).await?;
    }
    // The rows as the set leaves them.
    let mut rows = RowColumns::default();
    for (key, d) in devices.iter().filter(|(_, d)| d.changed) {
        rows.key.push(key);
        rows.status.push(&d.cur.status);
        rows.epoch.push(i64::try_from(d.last_epoch).unwrap_or(i64::MAX));
        rows.reason.push(&d.last_reason);
        rows.node.push(d.node.as_deref());
        rows.info.push(d.info.as_deref());
        rows.initialised.push(d.initialised_now);
    }
    if !rows.key.is_empty() {
        tx.execute(
            "UPDATE devices d SET status = u.status, status_epoch = u.epoch, status_reason = u.reason,
                    status_changed_at = now(), node = COALESCE(u.node, d.node), info = COALESCE(u.info, d.info),
                    initialised = d.initialised OR u.initialised
               FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::text[], $7::bool[])
                    AS u(key, status, epoch, reason, node, info, initialised)
              WHERE d.key = u.key",
            &[&rows.key, &rows.status, &rows.epoch, &rows.reason, &rows.node, &rows.info, &rows.initialised],
        )
        .await?;
        tx.execute(
            "INSERT INTO device_status_history (device_key, from_status, to_status, reason, epoch, node)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::text[])",
            &[&history.device, &history.from, &history.to, &history.reason, &history.epoch, &history.node],
        )
        .await?;
    }
    tx.commit().await?;
    for ((device, _), outcome) in events.iter().zip(&outcomes) {
        if let Outcome::Changed(change) = outcome {
            let epoch = devices.get(&device.to_string()).map_or(0, |d| d.last_epoch);
            record(app, device, change, epoch);
        }
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cur(status: &str, epoch: u64, initialised: bool) -> Current {
        Current { status: status.into(), epoch, initialised }
    }

    fn opened(epoch: u64) -> Event {
        Event::Opened { epoch, node: "n".into(), info: String::new() }
    }

    fn closed(epoch: u64) -> Event {
        Event::Closed { epoch, reason: "peer_closed".into() }
    }

    #[test]
    fn first_login_waits_for_initial_weights() {
        assert_eq!(decide(&cur("registered", 0, false), &opened(1)).map(|d| d.0), Some("pending_init".into()));
        assert_eq!(decide(&cur("pending_init", 1, false), &Event::Initialised).map(|d| d.0), Some("online".into()));
        assert_eq!(decide(&cur("offline", 1, true), &opened(2)).map(|d| d.0), Some("online".into()));
    }

    #[test]
    fn an_initialised_device_goes_online_at_its_first_login() {
        // Vehicles are registered initialised: a session makes them online at once.
        assert_eq!(decide(&cur("registered", 0, true), &opened(1)).map(|d| d.0), Some("online".into()));
        assert_eq!(decide(&cur("online", 1, true), &closed(1)).map(|d| d.0), Some("offline".into()));
    }

    #[test]
    fn epochs_fence_late_and_repeated_events() {
        // A late close of the replaced session does not take the new one offline.
        assert_eq!(decide(&cur("online", 5, true), &closed(4)), None);
        // Repeats change nothing.
        assert_eq!(decide(&cur("online", 5, true), &opened(5)), None);
        assert_eq!(decide(&cur("offline", 5, true), &closed(5)), None);
        // A late open of an older session after a newer close changes nothing either.
        assert_eq!(decide(&cur("offline", 6, true), &opened(5)), None);
        // A heartbeat timeout only concerns the current session.
        let timeout = |epoch| Event::HeartbeatTimeout { epoch, reason: "heartbeat_timeout" };
        assert_eq!(decide(&cur("online", 6, true), &timeout(5)), None);
        assert_eq!(decide(&cur("online", 6, true), &timeout(6)).map(|d| d.0), Some("offline".into()));
        assert_eq!(decide(&cur("offline", 6, true), &timeout(6)), None);
    }

    #[test]
    fn a_close_with_a_newer_epoch_still_applies() {
        // The open of that session was lost or is still in flight: the device is offline now.
        assert_eq!(decide(&cur("online", 5, true), &closed(6)).map(|d| (d.0, d.1)), Some(("offline".into(), 6)));
    }
}
