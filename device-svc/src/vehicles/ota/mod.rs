//! OTA campaigns (seed document 000): tasks validated vehicle by vehicle before any push, paced
//! upgrade notices, the vehicles' reports stored and folded into a per-vehicle state that only
//! moves forward, phase timeouts, failures for operators, and cancellation.
//!
//! ```text
//! pending --push acknowledged--> notified --> waiting --> downloading --> downloaded --> verifying
//!    |                                                                                     |
//!    +--task cancelled (not started)--> cancelled                upgrading <---------------+
//!                                                                    |
//!                      success (at the target version) / failed --> rolled_back / timed_out (silent)
//! ```
//!
//! - [`tasks`]: creating a task with its validation, reading it, cancelling it;
//! - [`lists`]: the blacklist and the same-version and downgrade whitelists;
//! - [`push`]: the driver: starts tasks, sends notices at the configured rate (fleet-wide),
//!   marks silent vehicles timed out, finishes tasks; every timer is a `due_at` in PostgreSQL
//!   claimed by one instance (`FOR UPDATE SKIP LOCKED`), as for purchases;
//! - [`reports`]: download progress, upgrade progress and status reports from the vehicles;
//! - [`sealed`]: packages at rest, encrypted in independently decryptable 1 MiB chunks under a
//!   per-package data key wrapped by a rotatable master key;
//! - [`keys`]: the master keys, the Ed25519 signing key and the download-URL keys, from
//!   configuration; [`storage`]: the package store (a directory, or S3);
//! - [`packages`]: uploads (streamed, sealed, digest-checked, signed), full and delta packages,
//!   master-key rotation; [`download`]: signed URLs and the ranged, decrypting reader;
//! - [`rollout`]: waves, thresholds, automatic pauses and the re-push compensation.

pub mod download;
pub mod keys;
pub mod lists;
pub mod packages;
pub mod push;
pub mod reports;
pub mod rollout;
pub mod sealed;
pub mod storage;
pub mod tasks;

use std::cmp::Ordering;

use protocol::vehicle::OtaStatus;

use crate::config::OtaConfig;

/// A vehicle's state within a task (`ota_task_vehicles.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VehicleState {
    /// Accepted; the notice is not acknowledged yet.
    Pending,
    /// The vehicle acknowledged the notice.
    Notified,
    /// A status the vehicle reported.
    Reported(OtaStatus),
    /// Silent past its phase's timeout.
    TimedOut,
    /// The task was cancelled before the vehicle started.
    Cancelled,
}

impl VehicleState {
    /// Every state, for gauges and views.
    pub const ALL: [VehicleState; 12] = [
        VehicleState::Pending,
        VehicleState::Notified,
        VehicleState::Reported(OtaStatus::Waiting),
        VehicleState::Reported(OtaStatus::Downloading),
        VehicleState::Reported(OtaStatus::Downloaded),
        VehicleState::Reported(OtaStatus::Verifying),
        VehicleState::Reported(OtaStatus::Upgrading),
        VehicleState::Reported(OtaStatus::Success),
        VehicleState::Reported(OtaStatus::Failed),
        VehicleState::Reported(OtaStatus::RolledBack),
        VehicleState::TimedOut,
        VehicleState::Cancelled,
    ];

    /// The column value.
    pub fn as_str(self) -> &'static str {
        match self {
            VehicleState::Pending => "pending",
            VehicleState::Notified => "notified",
            VehicleState::Reported(s) => status_str(s),
            VehicleState::TimedOut => "timed_out",
            VehicleState::Cancelled => "cancelled",
        }
    }

    /// From the column value.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Order along the upgrade: a report moves the state only to a higher rank. Final states
    /// share the top ranks; `rolled_back` is above `failed` because it follows it.
    pub fn rank(self) -> i16 {
        match self {
            VehicleState::Pending => 0,
            VehicleState::Notified => 1,
            VehicleState::Reported(OtaStatus::Waiting) => 2,
            VehicleState::Reported(OtaStatus::Downloading) => 3,
            VehicleState::Reported(OtaStatus::Downloaded) => 4,
            VehicleState::Reported(OtaStatus::Verifying) => 5,
            VehicleState::Reported(OtaStatus::Upgrading) => 6,
            VehicleState::Reported(OtaStatus::Success | OtaStatus::Failed)
            | VehicleState::TimedOut
            | VehicleState::Cancelled => 7,
            VehicleState::Reported(OtaStatus::RolledBack) => 8,
        }
    }

    /// Whether the upgrade still runs (counts as "waiting or running" for validation).
    pub fn is_active(self) -> bool {
        self.rank() < 7
    }

    /// How long the vehicle may stay silent in this state before it is marked timed out
    /// (`None` for states no silence ends: pending waits for the push, final states).
    pub fn silence_limit_s(self, c: &OtaConfig) -> Option<u64> {
        match self {
            VehicleState::Notified | VehicleState::Reported(OtaStatus::Waiting) => Some(c.waiting_timeout_s),
            VehicleState::Reported(OtaStatus::Downloading) => Some(c.download_timeout_s),
            VehicleState::Reported(OtaStatus::Downloaded | OtaStatus::Verifying) => Some(c.verify_timeout_s),
            VehicleState::Reported(OtaStatus::Upgrading) => Some(c.upgrade_timeout_s),
            _ => None,
        }
    }
}

/// The wire name of a status (SPEC.md 2.3).
pub fn status_str(s: OtaStatus) -> &'static str {
    match s {
        OtaStatus::Waiting => "waiting",
        OtaStatus::Downloading => "downloading",
        OtaStatus::Downloaded => "downloaded",
        OtaStatus::Verifying => "verifying",
        OtaStatus::Upgrading => "upgrading",
        OtaStatus::Success => "success",
        OtaStatus::Failed => "failed",
        OtaStatus::RolledBack => "rolled_back",
    }
}

/// A dotted numeric version (`2.3.0`, `01.002.010`): compared part by part as numbers, missing
/// parts counting as 0. `None` for anything else, and for the seed's "unknown" `00.000.000`.
pub fn parse_version(v: &str) -> Option<Vec<u64>> {
    let parts: Option<Vec<u64>> = v.split('.').map(|p| p.parse::<u64>().ok()).collect();
    parts.filter(|p| !p.is_empty() && p.len() <= 8 && p.iter().any(|n| *n > 0))
}

/// Compares two parsed versions.
pub fn compare_versions(a: &[u64], b: &[u64]) -> Ordering {
    let len = a.len().max(b.len());
    (0..len)
        .map(|i| a.get(i).copied().unwrap_or(0).cmp(&b.get(i).copied().unwrap_or(0)))
        .find(|o| o.is_ne())
        .unwrap_or(Ordering::Equal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_as_numbers() {
        let v = |s| parse_version(s).expect(s);
        assert_eq!(compare_versions(&v("2.10.0"), &v("2.9.9")), Ordering::Greater);
        assert_eq!(compare_versions(&v("2.3"), &v("2.3.0")), Ordering::Equal);
        assert_eq!(compare_versions(&v("01.002.010"), &v("1.2.10")), Ordering::Equal);
        assert_eq!(compare_versions(&v("1.0.0"), &v("1.0.1")), Ordering::Less);
        assert!(parse_version("00.000.000").is_none());
        assert!(parse_version("2.x").is_none());
        assert!(parse_version("").is_none());
    }

    #[test]
    fn states_round_trip_and_rank_forward() {
        for s in VehicleState::ALL {
            assert_eq!(VehicleState::parse(s.as_str()), Some(s));
        }
        let ranks: Vec<i16> = VehicleState::ALL[..8].iter().map(|s| s.rank()).collect();
        assert!(ranks.windows(2).all(|w| w[0] < w[1]), "{ranks:?}");
        assert!(!VehicleState::TimedOut.is_active() && VehicleState::Reported(OtaStatus::Upgrading).is_active());
    }
}
