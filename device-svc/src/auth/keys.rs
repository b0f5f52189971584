//! API keys: `iotk_<id>_<secret>`, 16 hex characters of public id and 64 of secret (32 random
//! bytes from the OS). PostgreSQL keeps the id, name, role, tenant and SHA-256 of the secret;
//! the whole key exists only in the answer that created it.
//!
//! [`Verifier`] checks a presented key: the row is read once and kept for
//! `auth.cache_ttl_ms` (bounded to [`CACHE_CAP`] entries), so a request costs one SHA-256 and a
//! map lookup, not a query. A revocation drops the entry at once on the instance that revoked;
//! other instances stop accepting the key within the TTL.

use std::time::Duration;

use dashmap::DashMap;
use deadpool_postgres::Pool;
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::time::Instant;
use tokio_postgres::GenericClient;

use super::{Principal, Role};
use crate::error::StoreError;

/// Every key starts with this (secret scanners can recognise a leaked one).
pub const TOKEN_PREFIX: &str = "iotk_";
/// Keys kept verified in memory at most; past it the cache starts over.
pub const CACHE_CAP: usize = 10_000;
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;

/// A key as listed (never its secret).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct KeyInfo {
    /// Public id.
    pub id: String,
    /// Name given at creation.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Tenant of a `shop` key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Who created it (`key:<id>`, or `cli` for `device-svc keys create`).
    pub created_by: String,
    /// Creation time, ms since the epoch.
    pub created_at_ms: u64,
    /// Revocation time, if revoked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<u64>,
}

/// A key just created: its description and the whole key, shown this once.
#[derive(Clone, Serialize, utoipa::ToSchema)]
pub struct IssuedKey {
    /// The key's description.
    #[serde(flatten)]
    pub info: KeyInfo,
    /// `iotk_<id>_<secret>`: what the caller sends as `Authorization: Bearer ...`.
    pub key: String,
}

impl std::fmt::Debug for IssuedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedKey").field("info", &self.info).field("key", &"<redacted>").finish()
    }
}

/// A key to create.
#[derive(Debug, Clone)]
pub struct NewKey<'a> {
    /// A name for people (`shop-backend-prod`).
    pub name: &'a str,
    /// Its role.
    pub role: Role,
    /// Required for `shop`, refused for other roles.
    pub tenant: Option<&'a str>,
    /// Who creates it.
    pub created_by: &'a str,
}

fn text_ok(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:@".contains(c))
}

/// Creates a key.
///
/// # Errors
/// `Invalid` (name, tenant), storage errors.
pub async fn create(client: &impl GenericClient, new: &NewKey<'_>) -> Result<IssuedKey, StoreError> {
    if !text_ok(new.name) {
        return Err(StoreError::invalid("name", "1..=128 characters of [A-Za-z0-9-_.:@]"));
    }
    match (new.role, new.tenant) {
        (Role::Shop, Some(t)) if text_ok(t) => {}
        (Role::Shop, _) => return Err(StoreError::invalid("tenant", "a shop key names its tenant ([A-Za-z0-9-_.:@])")),
        (_, Some(_)) => return Err(StoreError::invalid("tenant", "only shop keys have a tenant")),
        (_, None) => {}
    }
    let mut raw = [0u8; ID_BYTES + SECRET_BYTES];
    getrandom::fill(&mut raw).map_err(|e| StoreError::invalid("random", e.to_string()))?;
    let (id, secret) = (hex::encode(&raw[..ID_BYTES]), hex::encode(&raw[ID_BYTES..]));
    let hash = Sha256::digest(secret.as_bytes()).to_vec();
    let row = client
        .query_one(
            "INSERT INTO api_keys (id, name, role, tenant, secret_hash, created_by) VALUES ($1, $2, $3, $4, $5, $6)
             RETURNING created_at",
            &[&id, &new.name, &new.role.as_str(), &new.tenant, &hash, &new.created_by],
        )
        .await?;
    let info = KeyInfo {
        id: id.clone(),
        name: new.name.to_owned(),
        role: new.role,
        tenant: new.tenant.map(str::to_owned),
        created_by: new.created_by.to_owned(),
        created_at_ms: crate::clock::ms_of(row.get(0)),
        revoked_at_ms: None,
    };
    Ok(IssuedKey { info, key: format!("{TOKEN_PREFIX}{id}_{secret}") })
}

fn info_of(r: &tokio_postgres::Row) -> KeyInfo {
    let role: String = r.get("role");
    KeyInfo {
        id: r.get("id"),
        name: r.get("name"),
        // The column's check constraint admits only the roles' names.
        role: role.parse().unwrap_or(Role::Viewer),
        tenant: r.get("tenant"),
        created_by: r.get("created_by"),
        created_at_ms: crate::clock::ms_of(r.get("created_at")),
        revoked_at_ms: r.get::<_, Option<std::time::SystemTime>>("revoked_at").map(crate::clock::ms_of),
    }
}

/// Every key, newest first (revoked ones too, marked).
///
/// # Errors
/// Storage errors.
pub async fn list(client: &impl GenericClient) -> Result<Vec<KeyInfo>, StoreError> {
    let rows = client
        .query(
            "SELECT id, name, role, tenant, created_by, created_at, revoked_at FROM api_keys ORDER BY created_at DESC",
            &[],
        )
        .await?;
    Ok(rows.iter().map(info_of).collect())
}

/// Revokes a key (idempotent); the verifier of this instance forgets it at once.
///
/// # Errors
/// `NotFound`, storage errors.
pub async fn revoke(client: &impl GenericClient, id: &str) -> Result<KeyInfo, StoreError> {
    let row = client
        .query_opt(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1
             RETURNING id, name, role, tenant, created_by, created_at, revoked_at",
            &[&id],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("API key {id}")))?;
    Ok(info_of(&row))
}

/// Why a presented key was not accepted (the `result` label of `devsvc_api_auth_total`).
#[derive(Debug, thiserror::Error)]
pub enum AuthFailure {
    /// No `Authorization: Bearer` header.
    #[error("send an API key as Authorization: Bearer iotk_...")]
    Missing,
    /// Not a key of this service, an unknown id, a wrong secret or a revoked key: told apart
    /// only in metrics, never to the caller.
    #[error("the API key is not valid")]
    Invalid(&'static str),
    /// The keys could not be read.
    #[error(transparent)]
    Storage(#[from] StoreError),
}

impl AuthFailure {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Invalid(why) => why,
            AuthFailure::Storage(_) => "unavailable",
        }
    }
}

struct Cached {
    principal: Principal,
    hash: [u8; 32],
    revoked: bool,
    at: Instant,
}

/// Verifies presented keys (see the module header).
pub struct Verifier {
    cache: DashMap<String, Cached>,
    ttl: Duration,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("cached", &self.cache.len()).field("ttl", &self.ttl).finish()
    }
}

/// Splits `iotk_<16 hex>_<64 hex>` into id and secret.
fn split(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.strip_prefix(TOKEN_PREFIX)?.split_once('_')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, ID_BYTES * 2) && hex(secret, SECRET_BYTES * 2)).then_some((id, secret))
}

impl Verifier {
    /// A verifier trusting what it read for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self { cache: DashMap::new(), ttl }
    }

    /// Keys held in memory now.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Drops a key from the cache (after a revocation here).
    pub fn forget(&self, id: &str) {
        self.cache.remove(id);
    }

    /// The principal of `authorization` (the header's value).
    ///
    /// # Errors
    /// [`AuthFailure`].
    pub async fn verify(&self, pg: &Pool, authorization: Option<&str>) -> Result<Principal, AuthFailure> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .ok_or(AuthFailure::Missing)?;
        let (id, secret) = split(token.trim()).ok_or(AuthFailure::Invalid("malformed"))?;
        let presented: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let fresh =
            self.cache.get(id).filter(|c| c.at.elapsed() < self.ttl).map(|c| (c.principal.clone(), c.hash, c.revoked));
        let (principal, hash, revoked) = match fresh {
            Some(hit) => hit,
            None => {
                let client = pg.get().await.map_err(StoreError::from)?;
                let row = client
                    .query_opt(
                        "SELECT name, role, tenant, secret_hash, revoked_at IS NOT NULL FROM api_keys WHERE id = $1",
                        &[&id],
                    )
                    .await
                    .map_err(StoreError::from)?
                    .ok_or(AuthFailure::Invalid("unknown"))?;
                let role: String = row.get(1);
                let stored: Vec<u8> = row.get(3);
                let principal = Principal {
                    key_id: id.to_owned(),
                    name: row.get(0),
                    role: role.parse().map_err(|_| AuthFailure::Invalid("unknown"))?,
                    tenant: row.get(2),
                };
                let hash: [u8; 32] = stored.try_into().map_err(|_| AuthFailure::Invalid("unknown"))?;
                let revoked: bool = row.get(4);
                if self.cache.len() >= CACHE_CAP {
                    self.cache.clear();
                }
                self.cache
                    .insert(id.to_owned(), Cached { principal: principal.clone(), hash, revoked, at: Instant::now() });
                (principal, hash, revoked)
            }
        };
        if !bool::from(presented.ct_eq(&hash)) {
            return Err(AuthFailure::Invalid("wrong_secret"));
        }
        if revoked {
            return Err(AuthFailure::Invalid("revoked"));
        }
        Ok(principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_keys_split() {
        let id = "0123456789abcdef";
        let secret = "ab".repeat(32);
        assert_eq!(split(&format!("iotk_{id}_{secret}")), Some((id, secret.as_str())));
        for bad in [
            format!("iotk_{id}{secret}"),
            format!("iotk_{id}_{}", &secret[1..]),
            format!("xxxx_{id}_{secret}"),
            format!("iotk_{}_{secret}", "z".repeat(16)),
            String::new(),
        ] {
            assert_eq!(split(&bad), None, "{bad}");
        }
    }

    #[test]
    fn roles_round_trip_by_name() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!("root".parse::<Role>().is_err());
    }
}
