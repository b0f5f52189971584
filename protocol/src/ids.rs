//! Identifiers that cross every boundary: cabinet device ids, vehicle VINs and order ids.
//!
//! They end up in Redis keys, MQTT topics, log fields and SQL rows, so each is validated once,
//! where it enters the system, and carried as a newtype afterwards. The rules are the ones
//! `SPEC.md` gives a device vendor.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Length outside the allowed range.
    #[error("failed to accept {kind}: length {len} outside {min}..={max}")]
    Length {
        /// Which identifier.
        kind: &'static str,
        /// The offending length in bytes.
        len: usize,
        /// Smallest allowed length.
        min: usize,
        /// Largest allowed length.
        max: usize,
    },
    /// A character outside the allowed alphabet.
    #[error("failed to accept {kind}: character {ch:?} not allowed")]
    Character {
        /// Which identifier.
        kind: &'static str,
        /// The first offending character.
        ch: char,
    },
}

/// `true` for the characters allowed in device and order ids: ASCII letters, digits, `-`, `_`, `.`.
///
/// No `:` (Redis key separator), no `/`, `+`, `#` (MQTT topic syntax), no `{`/`}` (Redis Cluster
/// hash tags), no spaces: an id can be pasted into any key, topic or log line as it is.
fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

fn check_id(kind: &'static str, s: &str, min: usize, max: usize) -> Result<(), IdError> {
    if !(min..=max).contains(&s.len()) {
        return Err(IdError::Length { kind, len: s.len(), min, max });
    }
    match s.chars().find(|c| !is_id_char(*c)) {
        Some(ch) => Err(IdError::Character { kind, ch }),
        None => Ok(()),
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates `s` and wraps it.
            ///
            /// # Errors
            /// [`IdError`] naming the first rule `s` breaks.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                let check: fn(&str) -> Result<(), IdError> = $check;
                check(&s)?;
                Ok(Self(s))
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", $kind, self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

/// Longest device id, in bytes (SPEC.md, "Text fields").
pub const DEVICE_ID_MAX_LEN: usize = 64;
/// Longest order id, in bytes (SPEC.md, "Text fields").
pub const ORDER_ID_MAX_LEN: usize = 64;

string_id!(
    /// A cabinet's id: 1 to 64 characters from `[A-Za-z0-9._-]`.
    DeviceId,
    "device_id",
    |s| check_id("device_id", s, 1, DEVICE_ID_MAX_LEN)
);

string_id!(
    /// An order id as the cabinet sees it: 1 to 64 characters from `[A-Za-z0-9._-]`.
    OrderId,
    "order_id",
    |s| check_id("order_id", s, 1, ORDER_ID_MAX_LEN)
);

string_id!(
    /// A vehicle identification number: 17 characters from `[A-HJ-NPR-Z0-9]` (ISO 3779:
    /// no `I`, `O` or `Q`). Upper case only, so that a VIN has exactly one topic.
    Vin,
    "vin",
    |s| {
        if s.len() != 17 {
            return Err(IdError::Length { kind: "vin", len: s.len(), min: 17, max: 17 });
        }
        match s
            .chars()
            .find(|c| !(c.is_ascii_digit() || (c.is_ascii_uppercase() && !matches!(c, 'I' | 'O' | 'Q'))))
        {
            Some(ch) => Err(IdError::Character { kind: "vin", ch }),
            None => Ok(()),
        }
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_rules() {
        assert!(DeviceId::new("CAB-0001.a_b").is_ok());
        assert_eq!(DeviceId::new(""), Err(IdError::Length { kind: "device_id", len: 0, min: 1, max: 64 }));
        assert!(DeviceId::new("a".repeat(64)).is_ok());
        assert!(matches!(DeviceId::new("a".repeat(65)), Err(IdError::Length { len: 65, .. })));
        assert_eq!(DeviceId::new("cab:1"), Err(IdError::Character { kind: "device_id", ch: ':' }));
        assert!(DeviceId::new("cab{1}").is_err());
        assert!(DeviceId::new("cab/1").is_err());
    }

    #[test]
    fn vin_rules() {
        assert!(Vin::new("LSVAU2180N2183294").is_ok());
        assert!(matches!(Vin::new("LSVAU2180N218329"), Err(IdError::Length { len: 16, .. })));
        assert_eq!(Vin::new("LSVAU2180N218329O"), Err(IdError::Character { kind: "vin", ch: 'O' }));
        assert!(Vin::new("lsvau2180n2183294").is_err());
    }

    #[test]
    fn serde_validates() {
        let ok: Result<Vin, _> = serde_json::from_str("\"LSVAU2180N2183294\"");
        assert!(ok.is_ok());
        let bad: Result<Vin, _> = serde_json::from_str("\"LSVAU2180N218329Q\"");
        assert!(bad.is_err());
    }
}
