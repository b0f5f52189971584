//! The payment provider's signed callback (`docs/api.md`, "Payment callbacks"): the contract
//! between a provider and the device service, so both sides (and the load harness, which plays
//! the provider) compute the same bytes.
//!
//! The scheme is the one payment providers use for webhooks: the provider names itself in
//! `X-Payment-Provider` and sends `X-Payment-Signature: t=<unix seconds>,v1=<hex>`, where the
//! hex is HMAC-SHA256 under the provider's shared secret over `"<t>." + the raw body`. The
//! timestamp bounds how long a captured request stays usable; the service also refuses the same
//! signature twice, so a captured request cannot be replayed within that window either. Several
//! `v1=` values may be sent while a secret is being rotated; one matching is enough.

use hmac::{KeyInit, Mac};
use thiserror::Error;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The header naming the provider.
pub const PROVIDER_HEADER: &str = "x-payment-provider";
/// The header carrying the timestamp and signature(s).
pub const SIGNATURE_HEADER: &str = "x-payment-signature";

/// The `v1` signature of `body` sent at `t` (unix seconds), as lower-case hex.
pub fn sign(secret: &[u8], t: u64, body: &[u8]) -> String {
    hex::encode(mac(secret, t, body).finalize().into_bytes())
}

/// The whole `X-Payment-Signature` value for `body` sent at `t`.
pub fn header(secret: &[u8], t: u64, body: &[u8]) -> String {
    format!("t={t},v1={}", sign(secret, t, body))
}

fn mac(secret: &[u8], t: u64, body: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length; this cannot fail.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// A parsed `X-Payment-Signature`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// When the provider signed, unix seconds.
    pub t: u64,
    /// The `v1` values, decoded (32 bytes each).
    pub v1: Vec<[u8; 32]>,
}

/// Why a callback's signature was refused (each is counted by its [`reason`](Refusal::reason)).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    /// No provider or signature header, or one that does not parse.
    #[error("missing or malformed X-Payment-Provider / X-Payment-Signature")]
    Unsigned,
    /// The provider named is not configured.
    #[error("unknown payment provider")]
    UnknownProvider,
    /// `t` is outside the tolerance window.
    #[error("signature timestamp outside the tolerance window")]
    Stale,
    /// No `v1` value matches any secret of the provider.
    #[error("signature does not match")]
    BadSignature,
}

impl Refusal {
    /// The metric label and the error code of the answer.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Unsigned => "unsigned",
            Refusal::UnknownProvider => "unknown_provider",
            Refusal::Stale => "stale",
            Refusal::BadSignature => "bad_signature",
        }
    }
}

impl Signature {
    /// Parses `t=<digits>,v1=<64 hex>[,v1=...]`; other keys are ignored (later schemes).
    ///
    /// # Errors
    /// [`Refusal::Unsigned`] when `t` or every `v1` is missing or malformed.
    pub fn parse(value: &str) -> Result<Self, Refusal> {
        if value.len() > 1024 {
            return Err(Refusal::Unsigned);
        }
        let mut t = None;
        let mut v1 = Vec::new();
        for part in value.split(',') {
            match part.trim().split_once('=') {
                Some(("t", digits)) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
                    t = Some(digits.parse().map_err(|_| Refusal::Unsigned)?);
                }
                Some(("v1", h)) => {
                    let mut raw = [0u8; 32];
                    hex::decode_to_slice(h, &mut raw).map_err(|_| Refusal::Unsigned)?;
                    v1.push(raw);
                }
                _ => {}
            }
        }
        match t {
            Some(t) if !v1.is_empty() => Ok(Self { t, v1 }),
            _ => Err(Refusal::Unsigned),
        }
    }

    /// Checks the signature over `body` against `secrets` (any may match, for rotation) and `t`
    /// against `now` within `tolerance_s` either side. Returns the matching signature, which the
    /// service records to refuse a replay.
    ///
    /// # Errors
    /// [`Refusal::Stale`] or [`Refusal::BadSignature`].
    pub fn verify(&self, secrets: &[&[u8]], body: &[u8], now: u64, tolerance_s: u64) -> Result<[u8; 32], Refusal> {
        if self.t.abs_diff(now) > tolerance_s {
            return Err(Refusal::Stale);
        }
        for secret in secrets {
            for candidate in &self.v1 {
                // verify_slice compares in constant time.
                if mac(secret, self.t, body).verify_slice(candidate).is_ok() {
                    return Ok(*candidate);
                }
            }
        }
        Err(Refusal::BadSignature)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec-test";
    const BODY: &[u8] =
        br#"{"order_id":"o-1","status":"authorised","payment_id":"p-1","amount_cents":2000,"currency":"CNY"}"#;

    #[test]
    fn the_documented_example_signs_as_written() {
        // docs/api.md, "Payment callbacks": the same secret, time and body give this value.
        // (Computed independently: Python's hmac.new(secret, b"1796000000." + body, sha256).)
        assert_eq!(
            header(SECRET, 1_796_000_000, BODY),
            "t=1796000000,v1=3dcde13f78fc262e60ce9cfa66e523ad032262b6e37bbb0c251f1f5890b8cd61"
        );
        let sig = Signature::parse(&header(SECRET, 1_796_000_000, BODY)).unwrap();
        assert_eq!(sig.t, 1_796_000_000);
        assert!(sig.verify(&[SECRET], BODY, 1_796_000_100, 300).is_ok());
    }

    #[test]
    fn a_changed_body_a_wrong_secret_or_an_old_time_is_refused() {
        let sig = Signature::parse(&header(SECRET, 1000, BODY)).unwrap();
        let mut forged = BODY.to_vec();
        forged[20] ^= 1;
        assert_eq!(sig.verify(&[SECRET], &forged, 1000, 300), Err(Refusal::BadSignature));
        assert_eq!(sig.verify(&[b"other"], BODY, 1000, 300), Err(Refusal::BadSignature));
        assert_eq!(sig.verify(&[SECRET], BODY, 1301, 300), Err(Refusal::Stale));
        assert_eq!(sig.verify(&[SECRET], BODY, 699, 300), Err(Refusal::Stale));
        assert!(sig.verify(&[b"old", SECRET], BODY, 1300, 300).is_ok(), "any secret of a rotation matches");
    }

    #[test]
    fn malformed_headers_are_unsigned() {
        for bad in ["", "t=1", "v1=00", "t=x,v1=00", "t=1,v1=zz", &format!("t=1,v1={}", "0".repeat(62))] {
            assert_eq!(Signature::parse(bad), Err(Refusal::Unsigned), "{bad:?}");
        }
        let two = format!("t=5,v1={},v1={}", "00".repeat(32), "11".repeat(32));
        assert_eq!(Signature::parse(&two).unwrap().v1.len(), 2);
    }
}
