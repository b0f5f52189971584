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
//! entry written together.

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
    let cur = Current {
        status: row.get(0),
        epoch: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
        initialised: row.get(2),
    };
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
    let reason_label = reason.split(':').next().unwrap_or("other");
    app.metrics.status_changes.with_label_values(&[device.kind().as_str(), &to, reason_label]).inc();
    tracing::info!(%device, from = %cur.status, %to, %reason, epoch, "device status changed");
    Ok(Some(Change { from: cur.status, to, reason }))
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
