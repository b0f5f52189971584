//! What the consumer gathers from a batch of upstream entries to apply as sets, and the rule
//! that keeps every device's entries in stream order while it does.
//!
//! Three kinds are gathered: session opens and closes ([`crate::sessions`]), cabinets' weight
//! reports and vehicles' OTA reports. What is gathered is applied in one fixed order: sessions
//! first, then the reports ([`Rank`]). So an entry can join the sets whenever nothing of its
//! device that is already gathered would have to go after it. A login followed by its first
//! weight reports, which is what every cabinet sends, gathers without a cut. Before, a device's
//! gathered entries had to be of one kind, and each cabinet's first report applied the logins
//! gathered so far: in a login wave with reports the sets shrank to one or two logins, and each
//! login paid a transaction of its own again.
//!
//! What is gathered is applied first when:
//! - a session entry comes for a device with reports gathered (the session must go after them);
//! - an entry applied on its own (a door event, a command result) comes for a device with
//!   anything gathered;
//! - a node-wide heartbeat window comes (it concerns every device).

use std::collections::HashSet;

use protocol::bus::DeviceKey;

use crate::sessions::SessionEntry;
use crate::vehicles::ota::reports as ota_reports;
use crate::weights::Received;

/// Where a gathered kind goes in the order sets are applied: lower first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rank {
    /// Session opens and closes.
    Session,
    /// Weight reports and OTA reports (one is a cabinet's, the other a vehicle's: they never
    /// share a device).
    Report,
}

/// The entries of a batch gathered so far, by kind, with the devices they concern.
#[derive(Debug, Default)]
pub struct Gathered {
    /// Session opens and closes, in stream order.
    pub sessions: Vec<SessionEntry>,
    /// Weight reports, in stream order.
    pub reports: Vec<Received>,
    /// OTA reports, in stream order.
    pub ota: Vec<ota_reports::Uplink>,
    /// Devices with a session entry gathered.
    in_sessions: HashSet<DeviceKey>,
    /// Devices with a weight or OTA report gathered.
    in_reports: HashSet<DeviceKey>,
}

impl Gathered {
    /// Whether what is gathered must be applied before an entry of `rank` for `device` joins
    /// it: when something of `device` already gathered would be applied after it.
    pub fn must_apply_before_gathering(&self, device: &DeviceKey, rank: Rank) -> bool {
        match rank {
            Rank::Session => self.in_reports.contains(device),
            Rank::Report => false,
        }
    }

    /// Whether what is gathered must be applied before an entry applied on its own: one of
    /// `device` when it has anything gathered, or a node-wide entry (`None`) when anything is.
    pub fn must_apply_before(&self, device: Option<&DeviceKey>) -> bool {
        match device {
            Some(d) => self.in_sessions.contains(d) || self.in_reports.contains(d),
            None => !self.is_empty(),
        }
    }

    /// Gathers a session entry.
    pub fn push_session(&mut self, session: SessionEntry) {
        self.in_sessions.insert(session.device.clone());
        self.sessions.push(session);
    }

    /// Gathers a weight report.
    pub fn push_report(&mut self, report: Received) {
        self.in_reports.insert(DeviceKey::Cabinet(report.cabinet.clone()));
        self.reports.push(report);
    }

    /// Gathers an OTA report.
    pub fn push_ota(&mut self, uplink: ota_reports::Uplink) {
        self.in_reports.insert(DeviceKey::Vehicle(uplink.vin.clone()));
        self.ota.push(uplink);
    }

    /// Whether nothing is gathered.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty() && self.reports.is_empty() && self.ota.is_empty()
    }

    /// Forgets what was gathered, once it is applied.
    pub fn clear(&mut self) {
        self.sessions.clear();
        self.reports.clear();
        self.ota.clear();
        self.in_sessions.clear();
        self.in_reports.clear();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use protocol::DeviceId;
    use protocol::cabinet::{LaneWeight, WeightReport};

    use super::*;
    use crate::sessions::SessionChange;

    fn cabinet(id: &str) -> DeviceKey {
        DeviceKey::Cabinet(DeviceId::new(id).unwrap())
    }

    fn session(id: &str) -> SessionEntry {
        SessionEntry {
            entry: format!("up/{id}"),
            device: cabinet(id),
            epoch: 1,
            node: "gw-1".into(),
            at_ms: 1_000,
            change: SessionChange::Opened { info: "fw-1".into() },
        }
    }

    fn report(id: &str) -> Received {
        Received {
            cabinet: DeviceId::new(id).unwrap(),
            report: WeightReport {
                door_id: 1,
                sample_time_ms: 900,
                lanes: vec![LaneWeight { lane_id: 1, grams: 5, stable: true }],
            },
            at_ms: 900,
        }
    }

    #[test]
    fn a_login_and_its_reports_gather_together_a_session_after_reports_does_not() {
        let mut g = Gathered::default();
        g.push_session(session("cab-a"));
        assert!(!g.must_apply_before_gathering(&cabinet("cab-a"), Rank::Report), "reports go after sessions");
        g.push_report(report("cab-a"));
        g.push_session(session("cab-b"));
        assert!(g.must_apply_before_gathering(&cabinet("cab-a"), Rank::Session), "a's close would jump its reports");
        assert!(!g.must_apply_before_gathering(&cabinet("cab-b"), Rank::Session), "b has only sessions gathered");
        assert!(!g.must_apply_before_gathering(&cabinet("cab-c"), Rank::Session), "c has nothing gathered");
    }

    #[test]
    fn an_entry_on_its_own_waits_only_for_its_own_device_or_for_all_when_node_wide() {
        let mut g = Gathered::default();
        assert!(!g.must_apply_before(None), "nothing gathered, nothing to apply first");
        g.push_session(session("cab-a"));
        g.push_report(report("cab-b"));
        assert!(g.must_apply_before(Some(&cabinet("cab-a"))), "a session of a is gathered");
        assert!(g.must_apply_before(Some(&cabinet("cab-b"))), "a report of b is gathered");
        assert!(!g.must_apply_before(Some(&cabinet("cab-c"))));
        assert!(g.must_apply_before(None), "a heartbeat window concerns every device");
        g.clear();
        assert!(g.is_empty());
        assert!(!g.must_apply_before(Some(&cabinet("cab-a"))), "cleared with what it gathered");
    }
}
