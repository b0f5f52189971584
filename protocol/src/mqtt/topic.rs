//! The vehicle topic scheme (SPEC.md, "Vehicles over MQTT") and its access rule.
//!
//! ```text
//! vehicles/{VIN}/up/{kind}     vehicle -> cloud   (the vehicle publishes)
//! vehicles/{VIN}/down/{kind}   cloud -> vehicle   (the vehicle subscribes to vehicles/{VIN}/down/#)
//! ```
//!
//! One level per meaning, the VIN in a fixed position: routing a downlink is a string format,
//! and access control is a prefix comparison, never a scan over subscriptions.

use std::fmt;
use std::str::FromStr;

use crate::ids::Vin;

/// First level of every vehicle topic.
pub const ROOT: &str = "vehicles";

/// The largest downlink payload, in bytes (SPEC.md 2.2, "Limits"): the device service refuses
/// a larger one and a gateway answers it `invalid` without sending it.
pub const MAX_DOWNLINK_PAYLOAD: usize = 128 * 1024;

macro_rules! kinds {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every kind.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The topic's last level, also the metric label.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl FromStr for $name {
            type Err = TopicError;
            fn from_str(s: &str) -> Result<Self, TopicError> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(TopicError::UnknownKind),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

kinds!(
    /// What a vehicle publishes (`vehicles/{VIN}/up/{kind}`).
    UplinkKind {
        /// Ask for a QR id to show on the screen.
        QrRequest = "qr_request",
        /// Report local activation, carrying the activation security code.
        ActivationReport = "activation_report",
        /// OTA package download progress.
        OtaDownloadProgress = "ota_download_progress",
        /// OTA installation progress.
        OtaUpgradeProgress = "ota_upgrade_progress",
        /// OTA status transition.
        OtaStatus = "ota_status",
        /// The result of a generic command.
        CommandResult = "command_result",
    }
);

kinds!(
    /// What the cloud sends a vehicle (`vehicles/{VIN}/down/{kind}`).
    DownlinkKind {
        /// A QR id to display.
        QrId = "qr_id",
        /// The activation security code, after the owner confirmed.
        ActivationCode = "activation_code",
        /// The outcome of an activation report.
        ActivationResult = "activation_result",
        /// An OTA upgrade notification.
        OtaNotify = "ota_notify",
        /// An OTA task was cancelled.
        OtaCancel = "ota_cancel",
        /// A generic command.
        Command = "command",
    }
);

/// Why a topic is not a vehicle topic the gateway accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Not of the form `vehicles/{VIN}/up/{kind}`.
    #[error("failed to parse vehicle topic: not of the form vehicles/{{VIN}}/up/{{kind}}")]
    Shape,
    /// The VIN level is not the publishing vehicle's VIN.
    #[error("failed to accept vehicle topic: another vehicle's VIN")]
    ForeignVin,
    /// The last level names no known kind.
    #[error("failed to parse vehicle topic: unknown kind")]
    UnknownKind,
}

impl TopicError {
    /// The metric label (`reason="..."`).
    pub fn label(self) -> &'static str {
        match self {
            TopicError::Shape => "topic_shape",
            TopicError::ForeignVin => "foreign_vin",
            TopicError::UnknownKind => "unknown_kind",
        }
    }
}

/// Why an uplink payload is refused before it travels on (SPEC.md 2.2): a NUL, raw or escaped
/// (`\u0000`) inside a JSON string, is text no store takes, and would stop whatever consumed it.
/// The scan costs one pass over the bytes and parses nothing. Returns the metric label.
pub fn payload_problem(payload: &[u8]) -> Option<&'static str> {
    let mut i = 0;
    while let Some(&b) = payload.get(i) {
        match b {
            0 => return Some("payload_nul"),
            // An escape: `\u0000` is a NUL; `\\` is a backslash, whose next byte is not an escape.
            b'\\' => {
                if payload[i + 1..].starts_with(b"u0000") {
                    return Some("payload_nul");
                }
                i += 2;
            }
            _ => i += 1,
        }
    }
    None
}

/// The topic a vehicle publishes `kind` on.
pub fn uplink_topic(vin: &Vin, kind: UplinkKind) -> String {
    format!("{ROOT}/{vin}/up/{kind}")
}

/// The topic the cloud sends `kind` to `vin` on.
pub fn downlink_topic(vin: &Vin, kind: DownlinkKind) -> String {
    format!("{ROOT}/{vin}/down/{kind}")
}

/// The filter a vehicle subscribes to for all its downlinks.
pub fn downlink_filter(vin: &Vin) -> String {
    format!("{ROOT}/{vin}/down/#")
}

/// Checks that `vin` may publish on `topic`, and which uplink it is.
///
/// # Errors
/// [`TopicError`] when the topic is not `vehicles/{vin}/up/{kind}` for this VIN and a known kind.
pub fn parse_uplink(vin: &Vin, topic: &str) -> Result<UplinkKind, TopicError> {
    let mut levels = topic.split('/');
    let (Some(root), Some(topic_vin), Some(dir), Some(kind), None) =
        (levels.next(), levels.next(), levels.next(), levels.next(), levels.next())
    else {
        return Err(TopicError::Shape);
    };
    if root != ROOT || dir != "up" {
        return Err(TopicError::Shape);
    }
    if topic_vin != vin.as_str() {
        return Err(TopicError::ForeignVin);
    }
    kind.parse()
}

/// `true` if `vin` may subscribe to `filter`: the filter must name this VIN literally in its
/// second level, so that it can match no other vehicle's topics. What it matches below that is
/// the vehicle's own business (it only ever receives its own downlinks).
///
/// `filter` must already be a valid filter ([`check_topic_filter`](super::validate::check_topic_filter)).
pub fn may_subscribe(vin: &Vin, filter: &str) -> bool {
    let mut levels = filter.split('/');
    levels.next() == Some(ROOT) && levels.next() == Some(vin.as_str())
}

/// `true` if the topic name `topic` matches the topic filter `filter` (MQTT 3.1.1 §4.7):
/// `+` matches one level, a final `#` matches the parent level and everything below it.
/// Topics starting with `$` are not matched by a filter starting with a wildcard.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn payloads_with_a_nul_are_refused_and_escaped_backslashes_are_not_mistaken_for_one() {
        assert_eq!(payload_problem(br#"{"qr_id":"a\u0000b"}"#), Some("payload_nul"));
        assert_eq!(payload_problem(b"{\"qr_id\":\"a\0b\"}"), Some("payload_nul"));
        assert_eq!(payload_problem(br#"{"path":"C:\\u0000"}"#), None, "a backslash, then the text u0000");
        assert_eq!(payload_problem(br#"{"path":"C:\\\u0000"}"#), Some("payload_nul"));
        assert_eq!(payload_problem(br#"{"status":"ok","ts":1}"#), None);
        assert_eq!(payload_problem(br#"trailing\"#), None);
    }

    use super::*;

    fn vin() -> Vin {
        Vin::new("LSVAU2180N2183294").expect("valid vin")
    }

    #[test]
    fn uplink_round_trip() {
        for kind in UplinkKind::ALL {
            assert_eq!(parse_uplink(&vin(), &uplink_topic(&vin(), *kind)), Ok(*kind));
        }
    }

    #[test]
    fn uplink_refusals() {
        let v = vin();
        assert_eq!(parse_uplink(&v, "vehicles/LSVAU2180N2183295/up/ota_status"), Err(TopicError::ForeignVin));
        assert_eq!(parse_uplink(&v, "vehicles/LSVAU2180N2183294/down/command"), Err(TopicError::Shape));
        assert_eq!(parse_uplink(&v, "vehicles/LSVAU2180N2183294/up/nope"), Err(TopicError::UnknownKind));
        assert_eq!(parse_uplink(&v, "vehicles/LSVAU2180N2183294/up/ota_status/x"), Err(TopicError::Shape));
        assert_eq!(parse_uplink(&v, "cars/LSVAU2180N2183294/up/ota_status"), Err(TopicError::Shape));
        assert_eq!(parse_uplink(&v, "vehicles/LSVAU2180N2183294/up"), Err(TopicError::Shape));
    }

    #[test]
    fn filter_matching() {
        for (filter, topic) in [
            ("vehicles/V/down/#", "vehicles/V/down/command"),
            ("vehicles/V/down/#", "vehicles/V/down"),
            ("vehicles/V/#", "vehicles/V/down/qr_id"),
            ("vehicles/+/down/+", "vehicles/V/down/qr_id"),
            ("#", "a/b"),
            ("a/b", "a/b"),
            ("+/+", "/x"),
        ] {
            assert!(matches(filter, topic), "{filter} should match {topic}");
        }
        for (filter, topic) in [
            ("vehicles/V/down/+", "vehicles/V/down/a/b"),
            ("vehicles/V/down/command", "vehicles/V/down/qr_id"),
            ("a/b", "a/b/c"),
            ("a/b/c", "a/b"),
            ("#", "$SYS/x"),
            ("+/x", "$SYS/x"),
        ] {
            assert!(!matches(filter, topic), "{filter} should not match {topic}");
        }
    }

    #[test]
    fn subscribe_rule() {
        let v = vin();
        assert!(may_subscribe(&v, &downlink_filter(&v)));
        assert!(may_subscribe(&v, "vehicles/LSVAU2180N2183294/down/command"));
        assert!(may_subscribe(&v, "vehicles/LSVAU2180N2183294/#"));
        assert!(!may_subscribe(&v, "vehicles/+/down/#"));
        assert!(!may_subscribe(&v, "vehicles/#"));
        assert!(!may_subscribe(&v, "#"));
        assert!(!may_subscribe(&v, "vehicles/LSVAU2180N2183295/down/#"));
        assert!(!may_subscribe(&v, "$share/g/vehicles/LSVAU2180N2183294/down/#"));
    }
}
