//! The keys of the package path, from configuration: the master keys that wrap each package's
//! data key ([`MasterKeys`]), the platform's Ed25519 signing key, and the keys that sign
//! download URLs.
//!
//! - Master keys come as `id:64hex` pairs (`ota.packages.master_keys`, the environment variable
//!   `DEVICE_SVC_OTA_MASTER_KEYS`, or a file of one pair per line); `ota.packages.master_key`
//!   names the one that wraps new packages (with a single key it may be left out).
//! - The signing key (`ed25519-dalek`, RustCrypto's audited Ed25519) signs the SHA-256 digest of
//!   every package: the 32 raw digest bytes are the message, the signature is base64. Vehicles
//!   check it with the public key the notice and `GET /v1/ota/signing-key` carry.
//! - Download URLs are signed with HMAC-SHA256 under a key derived from a master key (so every
//!   instance holding the master keys can check a URL another signed) and name that master
//!   key, so a URL signed before a rotation stays valid while its master key is configured.

use std::collections::HashMap;

use base64::Engine as _;
use ed25519_dalek::Signer as _;
use hmac::Mac as _;
use sha2::Sha256;

use super::sealed::{MasterKeys, SealError};
use crate::config::OtaPackagesConfig;

type HmacSha256 = hmac::Hmac<Sha256>;

/// What the configuration's keys lack.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file that cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Malformed key material (the message names the setting, never the key).
    #[error("{0}")]
    Invalid(String),
    /// The master keys themselves.
    #[error(transparent)]
    Seal(#[from] SealError),
}

/// The keys of the package path.
pub struct PackageKeys {
    /// Wrap and unwrap the packages' data keys.
    pub master: MasterKeys,
    signer: ed25519_dalek::SigningKey,
    url_keys: HashMap<String, [u8; 32]>,
    current: String,
}

impl std::fmt::Debug for PackageKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackageKeys").field("master", &self.master).field("public_key", &self.public_key()).finish()
    }
}

fn read(inline: &str, file: &str) -> Result<String, KeyError> {
    if !inline.trim().is_empty() || file.is_empty() {
        return Ok(inline.trim().to_owned());
    }
    std::fs::read_to_string(file)
        .map(|s| s.trim().to_owned())
        .map_err(|source| KeyError::Read { path: file.to_owned(), source })
}

fn hex32(text: &str, what: &str) -> Result<[u8; 32], KeyError> {
    hex::decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| KeyError::Invalid(format!("{what} must be 64 hex characters")))
}

impl PackageKeys {
    /// The keys `c` configures; `None` when it configures neither master keys nor a signing
    /// key (the package path is then off: uploads and downloads answer 503 `not_configured`).
    ///
    /// # Errors
    /// One configured without the other, unreadable files, malformed keys.
    pub fn from_config(c: &OtaPackagesConfig) -> Result<Option<Self>, KeyError> {
        let masters = read(&c.master_keys.0, &c.master_keys_file)?;
        let signing = read(&c.signing_key.0, &c.signing_key_file)?;
        if masters.is_empty() && signing.is_empty() {
            return Ok(None);
        }
        if masters.is_empty() || signing.is_empty() {
            return Err(KeyError::Invalid("ota.packages: master keys and the signing key go together".into()));
        }
        let mut pairs = Vec::new();
        for item in masters.split([',', '\n']).map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (id, key) = item
                .split_once(':')
                .ok_or_else(|| KeyError::Invalid("ota.packages.master_keys: id:64hex pairs".into()))?;
            let id = id.trim();
            if id.is_empty()
                || id.len() > 32
                || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(KeyError::Invalid("ota.packages.master_keys: an id is 1..=32 of [A-Za-z0-9_-]".into()));
            }
            pairs.push((id.to_owned(), hex32(key, "a master key")?));
        }
        let current = match (c.master_key.as_str(), pairs.as_slice()) {
            ("", [(id, _)]) => id.clone(),
            ("", _) => {
                return Err(KeyError::Invalid("ota.packages.master_key must name the current key of several".into()));
            }
            (id, _) => id.to_owned(),
        };
        let hexes: Vec<(String, String)> = pairs.iter().map(|(id, k)| (id.clone(), hex::encode(k))).collect();
        let master = MasterKeys::new(hexes.iter().map(|(id, k)| (id.as_str(), k.as_str())), &current)?;
        let url_keys = pairs
            .iter()
            .map(|(id, k)| {
                let mut mac = <HmacSha256 as hmac::KeyInit>::new_from_slice(k).expect("HMAC takes any key length");
                mac.update(b"iotgw ota download url v1");
                (id.clone(), mac.finalize().into_bytes().into())
            })
            .collect();
        let signer = ed25519_dalek::SigningKey::from_bytes(&hex32(&signing, "ota.packages.signing_key")?);
        Ok(Some(PackageKeys { master, signer, url_keys, current }))
    }

    /// The Ed25519 signature of a package's SHA-256 digest, base64 (standard alphabet).
    pub fn sign_digest(&self, digest: &[u8; 32]) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.signer.sign(digest).to_bytes())
    }

    /// The public key vehicles check signatures with, base64 of its 32 bytes.
    pub fn public_key(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.signer.verifying_key().to_bytes())
    }

    fn mac(key: &[u8; 32], fields: &[&str]) -> HmacSha256 {
        let mut mac = <HmacSha256 as hmac::KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
        for f in fields {
            mac.update(f.as_bytes());
            mac.update(b"\n");
        }
        mac
    }

    /// Signs `fields` for a URL: the master key's id and the signature, hex.
    pub fn sign_url(&self, fields: &[&str]) -> (String, String) {
        let mac = Self::mac(&self.url_keys[&self.current], fields);
        (self.current.clone(), hex::encode(mac.finalize().into_bytes()))
    }

    /// Whether `signature` (hex) signs `fields` under master key `key_id` (in constant time).
    pub fn check_url(&self, key_id: &str, fields: &[&str], signature: &str) -> bool {
        let (Some(key), Ok(sig)) = (self.url_keys.get(key_id), hex::decode(signature)) else {
            return false;
        };
        Self::mac(key, fields).verify_slice(&sig).is_ok()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use ed25519_dalek::Verifier as _;

    use super::*;
    use crate::secret::SecretText;

    fn config(masters: &str, current: &str) -> OtaPackagesConfig {
        OtaPackagesConfig {
            master_keys: SecretText(masters.into()),
            master_key: current.into(),
            signing_key: SecretText("11".repeat(32)),
            ..Default::default()
        }
    }

    #[test]
    fn keys_load_sign_and_check_urls_across_a_rotation() {
        let old = PackageKeys::from_config(&config(&format!("k1:{}", "01".repeat(32)), "")).unwrap().unwrap();
        let both = format!("k1:{},k2:{}", "01".repeat(32), "02".repeat(32));
        let new = PackageKeys::from_config(&config(&both, "k2")).unwrap().unwrap();
        let fields = ["pkg", "VIN", "t1", "1700000000"];
        let (id, sig) = old.sign_url(&fields);
        assert_eq!(id, "k1");
        assert!(new.check_url(&id, &fields, &sig), "a URL signed before the rotation still checks");
        assert!(!new.check_url(&id, &["pkg", "OTHER", "t1", "1700000000"], &sig));
        assert!(!new.check_url("k9", &fields, &sig));
        let (id2, _) = new.sign_url(&fields);
        assert_eq!(id2, "k2");

        let digest = [7u8; 32];
        let sig = base64::engine::general_purpose::STANDARD.decode(new.sign_digest(&digest)).unwrap();
        let public = base64::engine::general_purpose::STANDARD.decode(new.public_key()).unwrap();
        let vk = ed25519_dalek::VerifyingKey::from_bytes(&public.try_into().unwrap()).unwrap();
        vk.verify(&digest, &ed25519_dalek::Signature::from_slice(&sig).unwrap()).unwrap();
    }

    #[test]
    fn incomplete_or_malformed_keys_are_refused_without_showing_them() {
        assert!(PackageKeys::from_config(&OtaPackagesConfig::default()).unwrap().is_none());
        let mut only_master = config(&format!("k1:{}", "01".repeat(32)), "");
        only_master.signing_key = SecretText::default();
        assert!(PackageKeys::from_config(&only_master).is_err());
        let both = format!("k1:{},k2:{}", "01".repeat(32), "02".repeat(32));
        assert!(PackageKeys::from_config(&config(&both, "")).is_err(), "several keys need a current one");
        let err = PackageKeys::from_config(&config("k1:abcd", "")).unwrap_err().to_string();
        assert!(!err.contains("abcd"), "{err}");
        assert!(PackageKeys::from_config(&config(&format!("k1:{}", "01".repeat(32)), "k3")).is_err());
    }
}
