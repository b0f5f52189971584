//! Session opens and closes, applied in sets.
//!
//! A gateway writes one entry per login and per session end, and a login wave (a node's devices
//! reconnecting, a fleet coming back after an outage) brings thousands of them a second into the
//! same shards as the door events that money waits for. Applied one at a time, each cost a status
//! transaction of five round trips and two Redis scripts: a wave of 36,000 logins took 174 s to
//! apply, and a door event written behind it waited as long. The consumer gathers them instead,
//! like weight reports, and applies a set at once: every status change in one transaction
//! ([`status::apply_many`]), every login's deadline and sign of life in one script call per node
//! ([`Detector::opened`]), every connected vehicle's waiting notices in one statement
//! ([`vehicles::on_connected`]). Each device still sees its own entries in stream order: sets
//! are applied sessions first, then reports, and the consumer applies them before any entry that
//! would have to go before something of its device already gathered ([`crate::gather`]).

use std::sync::Arc;

use protocol::Vin;
use protocol::bus::{DeviceKey, HeartbeatSeen};

use crate::app::App;
use crate::error::StoreError;
use crate::offline::Detector;
use crate::status::{self, Event, Outcome};
use crate::vehicles;

/// One session entry, as the consumer gathered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEntry {
    /// `stream/id`, unique.
    pub entry: String,
    /// The device.
    pub device: DeviceKey,
    /// The session's epoch.
    pub epoch: u64,
    /// The gateway node.
    pub node: String,
    /// When, gateway clock, ms.
    pub at_ms: u64,
    /// What happened.
    pub change: SessionChange,
}

/// A session's start or end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionChange {
    /// A login succeeded; firmware or MQTT version.
    Opened {
        /// Firmware or MQTT version.
        info: String,
    },
    /// The session ended.
    Closed {
        /// Why (`peer_closed`, `idle_timeout`, ...).
        reason: String,
    },
}

impl SessionChange {
    /// The entry type's label in `devsvc_stream_entries_total`, as [`protocol::bus::UpEvent::label`]
    /// gives it for the entry this change came from.
    pub fn label(&self) -> &'static str {
        match self {
            SessionChange::Opened { .. } => "open",
            SessionChange::Closed { .. } => "close",
        }
    }
}

impl SessionEntry {
    fn seen(&self) -> HeartbeatSeen {
        HeartbeatSeen { device: self.device.clone(), at_ms: self.at_ms, epoch: self.epoch }
    }
}

/// Applies `sessions` in order and returns each one's result label for
/// `devsvc_stream_entries_total`: `applied`, `unchanged`, `unknown_device`, or `deferred` (an
/// idle close of a cabinet whose node is not delivering its share of heartbeats, left to the
/// offline detector).
///
/// # Errors
/// Any storage error: nothing is acknowledged and the set is applied again (every effect is
/// idempotent).
pub async fn apply(
    app: &Arc<App>,
    detector: &Detector,
    sessions: &[SessionEntry],
) -> Result<Vec<&'static str>, StoreError> {
    let mut results: Vec<Option<&'static str>> = vec![None; sessions.len()];
    let mut changes: Vec<(DeviceKey, Event)> = Vec::with_capacity(sessions.len());
    let mut changing: Vec<usize> = Vec::with_capacity(sessions.len());
    for (i, s) in sessions.iter().enumerate() {
        let event = match &s.change {
            SessionChange::Opened { info } => {
                Event::Opened { epoch: s.epoch, node: s.node.clone(), info: info.clone() }
            }
            SessionChange::Closed { reason } => {
                if reason == "idle_timeout"
                    && matches!(s.device, DeviceKey::Cabinet(_))
                    && !detector.idle_close_applies(&s.node, s.seen()).await?
                {
                    results[i] = Some("deferred");
                    continue;
                }
                Event::Closed { epoch: s.epoch, reason: reason.clone() }
            }
        };
        changes.push((s.device.clone(), event));
        changing.push(i);
    }
    let outcomes = status::apply_many(app, &changes).await?;
    for (i, outcome) in changing.into_iter().zip(outcomes) {
        results[i] = Some(match outcome {
            Outcome::Changed(_) => "applied",
            Outcome::Unchanged => "unchanged",
            Outcome::UnknownDevice => "unknown_device",
        });
    }
    let opened = |s: &SessionEntry, r: &Option<&str>| {
        matches!(s.change, SessionChange::Opened { .. }) && *r != Some("unknown_device")
    };
    let connected: Vec<&Vin> = sessions
        .iter()
        .zip(&results)
        .filter(|(s, r)| matches!(s.change, SessionChange::Opened { .. }) && **r == Some("applied"))
        .filter_map(|(s, _)| match &s.device {
            DeviceKey::Vehicle(vin) => Some(vin),
            DeviceKey::Cabinet(_) => None,
        })
        .collect();
    vehicles::on_connected(app, &connected).await?;
    let logins: Vec<(&str, &str, HeartbeatSeen)> = sessions
        .iter()
        .zip(&results)
        .filter(|(s, r)| opened(s, r))
        .map(|(s, _)| (s.entry.as_str(), s.node.as_str(), s.seen()))
        .collect();
    detector.opened(&logins).await?;
    Ok(results.into_iter().map(|r| r.unwrap_or("unchanged")).collect())
}
