//! Device credentials as the gateways verify them, read from Redis (`P cred:{kind}:{id}`, kept
//! there by the device service) and cached for a short while, so a reconnect storm costs one
//! Redis read per device per cache period.
//!
//! Secrets never reach a log: [`Credential`] prints as `***`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use protocol::bus::{DeviceKey, Keys};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::metrics::Metrics;
use redis_conn::RedisConn;

/// What a device proves its identity with.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// Cabinets: the 32-byte HMAC key. Vehicles: SHA-256 of the token.
    material: Vec<u8>,
    /// Disabled by an operator.
    pub enabled: bool,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential").field("material", &"***").field("enabled", &self.enabled).finish()
    }
}

impl Credential {
    /// The cabinet's HMAC key.
    pub fn cabinet_secret(&self) -> &[u8] {
        &self.material
    }

    /// `true` if `token` hashes to the stored vehicle token hash (constant time).
    pub fn vehicle_token_matches(&self, token: &[u8]) -> bool {
        let digest = Sha256::digest(token);
        digest.len() == self.material.len()
            && digest.iter().zip(&self.material).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// Result of a lookup.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// Known device.
    Found(Arc<Credential>),
    /// No such device registered.
    Unknown,
    /// Redis could not be asked; refuse for now ("try later").
    Unavailable,
}

#[derive(Debug, Clone)]
struct Cached {
    at: Instant,
    value: Option<Arc<Credential>>,
}

/// The credential cache in front of Redis.
#[derive(Debug)]
pub struct Credentials {
    redis: RedisConn,
    keys: Keys,
    cache: DashMap<DeviceKey, Cached>,
    ttl: Duration,
    negative_ttl: Duration,
    /// Bumped by every change applied ([`Credentials::forget`], [`Credentials::clear`]): a login
    /// that verified before a change and registered after it checks again.
    changes: AtomicU64,
    metrics: Metrics,
}

impl Credentials {
    /// A cache with the given lifetimes for found and unknown devices.
    pub fn new(redis: RedisConn, keys: Keys, ttl: Duration, negative_ttl: Duration, metrics: Metrics) -> Self {
        Self { redis, keys, cache: DashMap::new(), ttl, negative_ttl, changes: AtomicU64::new(0), metrics }
    }

    /// How many changes were applied so far; read before a lookup, passed to
    /// [`Credentials::still_valid`] after the session is registered.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// Whether `verified` (what a login was checked against when `changes` was read) is still
    /// the device's enabled credential. Free unless a change was applied since: a rotation or a
    /// disable announced while the login was between its check and its registration would
    /// otherwise find no session to end, and leave one running.
    pub async fn still_valid(&self, device: &DeviceKey, changes: u64, verified: &Credential) -> bool {
        if self.changes() == changes {
            return true;
        }
        match self.lookup(device).await {
            Lookup::Found(now) => now.enabled && *now == *verified,
            Lookup::Unknown => false,
            // Not known either way: keep the session; the change stream ends it if it must.
            Lookup::Unavailable => true,
        }
    }

    /// The credentials of `device`.
    pub async fn lookup(&self, device: &DeviceKey) -> Lookup {
        if let Some(hit) = self.cache.get(device) {
            let fresh = match &hit.value {
                Some(_) => hit.at.elapsed() < self.ttl,
                None => hit.at.elapsed() < self.negative_ttl,
            };
            if fresh {
                return hit.value.clone().map_or(Lookup::Unknown, Lookup::Found);
            }
        }
        let mut con = self.redis.clone();
        let fields: redis::RedisResult<std::collections::HashMap<String, String>> =
            redis::cmd("HGETALL").arg(self.keys.credentials(device)).query_async(&mut con).await;
        let fields = match fields {
            Ok(f) => f,
            Err(e) => {
                self.metrics.redis_errors.with_label_values(&["credentials"]).inc();
                tracing::warn!(%device, error = %e, "failed to read credentials");
                return Lookup::Unavailable;
            }
        };
        let value = parse(device, &fields).map(Arc::new);
        self.cache.insert(device.clone(), Cached { at: Instant::now(), value: value.clone() });
        value.map_or(Lookup::Unknown, Lookup::Found)
    }

    /// Forgets what is cached for `device` (SPEC.md 3.1, `P cred:changes`): the next lookup
    /// reads Redis.
    pub fn forget(&self, device: &DeviceKey) {
        self.cache.remove(device);
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// Forgets everything cached.
    pub fn clear(&self) {
        self.cache.clear();
        self.cache.shrink_to_fit();
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// Drops expired cache entries and gives their memory back, so the cache holds only
    /// recently seen devices: after a login storm it shrinks to nothing.
    pub fn sweep(&self) {
        let ttl = self.ttl.max(self.negative_ttl);
        self.cache.retain(|_, c| c.at.elapsed() < ttl);
        self.cache.shrink_to_fit();
    }
}

fn parse(device: &DeviceKey, fields: &std::collections::HashMap<String, String>) -> Option<Credential> {
    let field = match device {
        DeviceKey::Cabinet(_) => "secret",
        DeviceKey::Vehicle(_) => "token_sha256",
    };
    let material = hex::decode(fields.get(field)?).ok()?;
    let enabled = fields.get("status").is_none_or(|s| s != "disabled");
    Some(Credential { material, enabled })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vehicle_token_check_and_masking() {
        let digest = Sha256::digest(b"tok-123");
        let c = Credential { material: digest.to_vec(), enabled: true };
        assert!(c.vehicle_token_matches(b"tok-123"));
        assert!(!c.vehicle_token_matches(b"tok-124"));
        assert!(!format!("{c:?}").contains(&hex::encode(digest)));
    }

    #[test]
    fn parse_fields() {
        let cab = DeviceKey::parse("cab:C1").expect("valid");
        let mut f = std::collections::HashMap::new();
        assert!(parse(&cab, &f).is_none());
        f.insert("secret".to_owned(), "00ff".to_owned());
        assert_eq!(parse(&cab, &f).map(|c| c.material), Some(vec![0, 255]));
        f.insert("status".to_owned(), "disabled".to_owned());
        assert_eq!(parse(&cab, &f).map(|c| c.enabled), Some(false));
        f.insert("secret".to_owned(), "zz".to_owned());
        assert!(parse(&cab, &f).is_none());
    }
}
