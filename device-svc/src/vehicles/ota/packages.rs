//! Packages the platform stores: uploaded by an operator as a stream, sealed chunk by chunk on
//! the way in ([`sealed`](super::sealed)), written to the package store
//! ([`storage`](super::storage)), checked against the digest the operator declared, and signed.
//!
//! An upload never holds the package in memory: one plaintext chunk (1 MiB), its sealed copy
//! and the store's parts in flight, whatever the package's size. Its length must be declared
//! (`Content-Length`), since the last chunk's authentication says it is the last. A package
//! becomes `ready` only after its digest matched; a failed upload leaves nothing behind (its
//! row and object are removed; a crash mid-upload leaves an `uploading` row, taken over by the
//! next upload of that id once it has been idle for `ota.packages.upload_idle_ms`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::keys::PackageKeys;
use super::parse_version;
use super::sealed::{CHUNK, MasterKeys, SealError, Sealer, WrappedKey};
use super::storage::{Storage, StorageError};
use crate::app::{App, ms_of};
use crate::error::StoreError;

/// Why an upload or a download could not be served.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// PostgreSQL, or a rule of the request.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The package store.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Sealing or opening.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// No master keys or signing key configured.
    #[error("OTA package storage is not configured (ota.packages master keys and signing key)")]
    NotConfigured,
    /// The upload is larger than allowed or than declared.
    #[error("the package is larger than {0} bytes")]
    TooLarge(u64),
    /// The upload ended before its declared length.
    #[error("the upload ended after {got} of {declared} bytes")]
    Truncated {
        /// Bytes received.
        got: u64,
        /// Bytes declared.
        declared: u64,
    },
    /// The bytes received are not the ones declared.
    #[error("the package's SHA-256 is {got}, not the declared {declared}")]
    DigestMismatch {
        /// Declared.
        declared: String,
        /// Computed.
        got: String,
    },
    /// Nothing arrived for `ota.packages.upload_idle_ms`, or the client went away.
    #[error("the upload stalled or broke off: {0}")]
    Broken(String),
}

impl From<tokio_postgres::Error> for PackageError {
    fn from(e: tokio_postgres::Error) -> Self {
        PackageError::Store(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for PackageError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        PackageError::Store(e.into())
    }
}

/// The package path's parts, built at start-up when keys are configured.
#[derive(Debug)]
pub struct Packages {
    /// Where sealed packages live.
    pub storage: Storage,
    /// Master, signing and URL keys.
    pub keys: PackageKeys,
    /// Downloads served at once by this instance.
    pub downloads: Arc<tokio::sync::Semaphore>,
    /// This instance's bandwidth for downloads (KiB cells), when limited.
    pub bandwidth: Option<governor::DefaultDirectRateLimiter>,
}

impl Packages {
    /// From the configuration: `None` when no keys are configured.
    ///
    /// # Errors
    /// Malformed keys, or a store that cannot be opened.
    pub fn from_config(c: &crate::config::OtaConfig) -> Result<Option<Self>, String> {
        let Some(keys) = PackageKeys::from_config(&c.packages).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let storage = Storage::open(&c.packages).map_err(|e| e.to_string())?;
        let max = usize::try_from(c.downloads.max_concurrent).unwrap_or(usize::MAX);
        let bandwidth = std::num::NonZeroU32::new(u32::try_from(c.downloads.bytes_per_s / 1024).unwrap_or(u32::MAX))
            .map(|kib| {
                // A burst of at least one chunk, or a chunk could never be sent.
                let burst = kib.max(std::num::NonZeroU32::new(1024).expect("non-zero"));
                governor::RateLimiter::direct(governor::Quota::per_second(kib).allow_burst(burst))
            });
        Ok(Some(Packages { storage, keys, downloads: Arc::new(tokio::sync::Semaphore::new(max)), bandwidth }))
    }
}

/// `full` or `delta`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The whole image.
    Full,
    /// Applies to one earlier version only.
    Delta,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Full => "full",
            Kind::Delta => "delta",
        }
    }
}

/// What an upload declares (`PUT /v1/ota/packages/{id}?version=&kind=&from_version=&sha256=`).
#[derive(Debug, Clone)]
pub struct NewPackage {
    /// Id (1..=64 of `[A-Za-z0-9._-]`).
    pub id: String,
    /// The version it installs.
    pub version: String,
    /// Full or delta.
    pub kind: Kind,
    /// For a delta: the version it applies to.
    pub from_version: Option<String>,
    /// The SHA-256 of the package as the operator has it, hex.
    pub sha256: String,
    /// Its length (`Content-Length`).
    pub size_bytes: u64,
    /// Who uploaded it.
    pub created_by: String,
}

/// A stored package as operators (and, in notices, vehicles) see it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Package {
    /// Id.
    pub id: String,
    /// The version it installs.
    pub version: String,
    /// `full` or `delta`.
    pub kind: String,
    /// For a delta, the version it applies to.
    pub from_version: Option<String>,
    /// `uploading` or `ready`.
    pub state: String,
    /// Plaintext length.
    pub size_bytes: u64,
    /// SHA-256 of the plaintext, hex.
    pub sha256: String,
    /// Ed25519 signature of the digest's 32 bytes, base64.
    pub signature: String,
    /// The platform's public key that signature checks with, base64.
    pub public_key: String,
    /// The master key wrapping its data key.
    pub master_key: String,
    /// Who uploaded it.
    pub created_by: String,
    /// When, ms since the Unix epoch.
    pub created_ms: u64,
}

/// What serving a package needs, read from its row.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The view.
    pub package: Package,
    /// Its object in the store.
    pub object: String,
    /// Its wrapped data key.
    pub wrapped: WrappedKey,
    /// Its nonce prefix.
    pub prefix: [u8; 8],
    /// Plaintext bytes per chunk.
    pub chunk: u64,
}

impl Stored {
    /// The chunk cipher, its data key unwrapped by `master`.
    ///
    /// # Errors
    /// The master key is missing or the wrapped key does not authenticate.
    pub fn sealer(&self, master: &MasterKeys) -> Result<Sealer, SealError> {
        let key = master.unwrap_key(&self.wrapped)?;
        Ok(Sealer::new(&key, self.prefix, &self.package.id, self.package.size_bytes, self.chunk))
    }
}

const COLUMNS: &str = "id, version, kind, from_version, state, size_bytes, sha256, signature, public_key, created_by,
                       created_at, object, wrapped_key, nonce_prefix, chunk_bytes";

fn stored_of(r: &tokio_postgres::Row) -> Result<Stored, StoreError> {
    let wrapped: WrappedKey = serde_json::from_value(r.get(12))
        .map_err(|e| StoreError::invalid("wrapped_key", format!("unreadable: {e}")))?;
    let prefix: Vec<u8> = r.get(13);
    let package = Package {
        id: r.get(0),
        version: r.get(1),
        kind: r.get(2),
        from_version: r.get(3),
        state: r.get(4),
        size_bytes: u64::try_from(r.get::<_, i64>(5)).unwrap_or(0),
        sha256: r.get(6),
        signature: r.get(7),
        public_key: r.get(8),
        master_key: wrapped.master.clone(),
        created_by: r.get(9),
        created_ms: ms_of(r.get(10)),
    };
    Ok(Stored {
        package,
        object: r.get(11),
        wrapped,
        prefix: prefix.try_into().map_err(|_| StoreError::invalid("nonce_prefix", "not 8 bytes"))?,
        chunk: u64::try_from(r.get::<_, i32>(14)).unwrap_or(CHUNK),
    })
}

/// A stored package.
///
/// # Errors
/// `NotFound`; storage errors.
pub async fn get(app: &App, id: &str) -> Result<Stored, StoreError> {
    let client = app.pg.get().await?;
    let row = client
        .query_opt(&format!("SELECT {COLUMNS} FROM ota_packages WHERE id = $1"), &[&id])
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("package {id}")))?;
    stored_of(&row)
}

/// The newest packages, at most `limit`, optionally of one version.
///
/// # Errors
/// Storage errors.
pub async fn list(app: &App, version: Option<&str>, limit: i64) -> Result<Vec<Package>, StoreError> {
    let client = app.pg.get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM ota_packages WHERE ($1::text IS NULL OR version = $1)
                  ORDER BY created_at DESC, id LIMIT $2"
            ),
            &[&version, &limit.clamp(1, 500)],
        )
        .await?;
    rows.iter().map(|r| stored_of(r).map(|s| s.package)).collect()
}

/// The package a vehicle at `from` gets for a task installing `full`: a ready delta from
/// `from` to `full`'s version if one exists, else `full` itself.
///
/// # Errors
/// `NotFound` when `full` is gone; storage errors.
pub async fn choose(app: &App, full: &str, from: Option<&str>) -> Result<Stored, StoreError> {
    let client = app.pg.get().await?;
    let row = client
        .query_opt(
            &format!(
                "SELECT {COLUMNS} FROM ota_packages p
                  WHERE p.state = 'ready' AND (p.id = $1 OR (p.kind = 'delta' AND p.from_version = $2
                        AND p.version = (SELECT version FROM ota_packages WHERE id = $1)))
                  ORDER BY p.kind = 'delta' DESC LIMIT 1"
            ),
            &[&full, &from],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("package {full}")))?;
    stored_of(&row)
}

fn check(p: &NewPackage, max: u64) -> Result<(), PackageError> {
    let id_ok = (1..=64).contains(&p.id.len())
        && p.id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if !id_ok {
        return Err(StoreError::invalid("id", "1..=64 of [A-Za-z0-9._-]").into());
    }
    if parse_version(&p.version).is_none() {
        return Err(StoreError::invalid("version", "a dotted numeric version").into());
    }
    match (p.kind, p.from_version.as_deref()) {
        (Kind::Full, None) => {}
        (Kind::Delta, Some(from)) if parse_version(from).is_some() && from != p.version => {}
        (Kind::Full, Some(_)) => return Err(StoreError::invalid("from_version", "only for a delta").into()),
        (Kind::Delta, _) => {
            return Err(StoreError::invalid("from_version", "a delta names the version it applies to").into());
        }
    }
    if p.sha256.len() != 64 || !p.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(StoreError::invalid("sha256", "64 hex characters").into());
    }
    if p.created_by.len() > 128 {
        return Err(StoreError::invalid("created_by", "at most 128 characters").into());
    }
    if p.size_bytes > max {
        return Err(PackageError::TooLarge(max));
    }
    Ok(())
}

/// Stores an uploaded package from `body`: sealed as it arrives, its digest checked, signed.
///
/// # Errors
/// `Store` (`Invalid` for the declaration, `Rejected` `package_exists`), `TooLarge`,
/// `Truncated`, `DigestMismatch`, `Broken`, `Storage`; nothing is kept after any of them.
pub async fn upload<S, E>(app: &App, pk: &Packages, p: NewPackage, body: S) -> Result<Package, PackageError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let max = app.config.ota.packages.max_bytes;
    check(&p, max)?;
    let (data_key, wrapped) = pk.keys.master.new_data_key()?;
    let prefix = Sealer::new_prefix()?;
    let object = format!("packages/{}/{}", p.id, crate::purchases::lock::token("u")?);
    let idle = app.config.ota.packages.upload_idle_ms;
    {
        let client = app.pg.get().await?;
        let wrapped_json =
            serde_json::to_value(&wrapped).map_err(|e| StoreError::invalid("wrapped_key", e.to_string()))?;
        let chunk = i32::try_from(CHUNK).unwrap_or(i32::MAX);
        // A crashed upload's row is taken over once idle; a ready package never is.
        let n = client
            .execute(
                "INSERT INTO ota_packages (id, version, kind, from_version, object, wrapped_key, nonce_prefix, chunk_bytes, created_by)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT (id) DO UPDATE SET version = $2, kind = $3, from_version = $4, object = $5, wrapped_key = $6,
                        nonce_prefix = $7, chunk_bytes = $8, created_by = $9, created_at = now()
                  WHERE ota_packages.state = 'uploading'
                    AND ota_packages.created_at < now() - make_interval(secs => $10)",
                &[
                    &p.id,
                    &p.version,
                    &p.kind.as_str(),
                    &p.from_version,
                    &object,
                    &wrapped_json,
                    &prefix.as_slice(),
                    &chunk,
                    &p.created_by,
                    &(idle as f64 / 1000.0),
                ],
            )
            .await?;
        if n == 0 {
            return Err(StoreError::rejected(
                "package_exists",
                format!("package {} exists or is being uploaded", p.id),
            )
            .into());
        }
    }
    let sealer = Sealer::new(&data_key, prefix, &p.id, p.size_bytes, CHUNK);
    let mut writer = pk.storage.writer(&object).await?;
    let received = receive(&sealer, &mut writer, p.size_bytes, body, Duration::from_millis(idle)).await;
    let outcome = match received {
        Ok(digest) if hex::encode(digest) == p.sha256.to_ascii_lowercase() => match writer.finish().await {
            Ok(()) => Ok(digest),
            Err(e) => Err(e.into()),
        },
        Ok(digest) => {
            writer.abort().await;
            Err(PackageError::DigestMismatch { declared: p.sha256.to_ascii_lowercase(), got: hex::encode(digest) })
        }
        Err(e) => {
            writer.abort().await;
            Err(e)
        }
    };
    let client = app.pg.get().await?;
    let digest = match outcome {
        Ok(d) => d,
        Err(e) => {
            client.execute("DELETE FROM ota_packages WHERE id = $1 AND object = $2", &[&p.id, &object]).await?;
            if let Err(d) = pk.storage.delete(&object).await {
                tracing::warn!(package = %p.id, error = %d, "failed to remove a refused upload's object");
            }
            app.metrics.ota_uploads.with_label_values(&[upload_result(&e)]).inc();
            return Err(e);
        }
    };
    let signature = pk.keys.sign_digest(&digest);
    client
        .execute(
            "UPDATE ota_packages SET state = 'ready', size_bytes = $3, sha256 = $4, signature = $5, public_key = $6
              WHERE id = $1 AND object = $2",
            &[
                &p.id,
                &object,
                &i64::try_from(p.size_bytes).unwrap_or(i64::MAX),
                &hex::encode(digest),
                &signature,
                &pk.keys.public_key(),
            ],
        )
        .await
        .map_err(|e| {
            // The only conflict left: another ready delta between the same versions.
            if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
                StoreError::rejected("delta_exists", "a delta between these versions exists")
            } else {
                e.into()
            }
        })?;
    app.metrics.ota_uploads.with_label_values(&["stored"]).inc();
    app.metrics.ota_upload_bytes.inc_by(p.size_bytes);
    tracing::info!(package = %p.id, version = %p.version, kind = p.kind.as_str(), bytes = p.size_bytes,
                   backend = pk.storage.backend, "OTA package stored");
    Ok(get(app, &p.id).await?.package)
}

fn upload_result(e: &PackageError) -> &'static str {
    match e {
        PackageError::TooLarge(_) => "too_large",
        PackageError::Truncated { .. } => "truncated",
        PackageError::DigestMismatch { .. } => "digest_mismatch",
        PackageError::Broken(_) => "broken",
        PackageError::Storage(_) => "storage",
        _ => "refused",
    }
}

/// Reads `body` into sealed chunks written to `writer`; returns the plaintext's SHA-256.
async fn receive<S, E>(
    sealer: &Sealer,
    writer: &mut super::storage::Writer,
    declared: u64,
    mut body: S,
    idle: Duration,
) -> Result<[u8; 32], PackageError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut hasher = Sha256::new();
    let mut chunk = Vec::with_capacity(usize::try_from(CHUNK).unwrap_or(1 << 20));
    let (mut index, mut got) = (0u64, 0u64);
    loop {
        let frame = match tokio::time::timeout(idle, body.next()).await {
            Err(_) => return Err(PackageError::Broken(format!("nothing for {} ms", idle.as_millis()))),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(PackageError::Broken(e.to_string())),
            Ok(Some(Ok(frame))) => frame,
        };
        got += frame.len() as u64;
        if got > declared {
            return Err(PackageError::TooLarge(declared));
        }
        hasher.update(&frame);
        let mut rest = &frame[..];
        while !rest.is_empty() {
            let want = usize::try_from(sealer.chunk_len(index)).unwrap_or(0) - chunk.len();
            let take = want.min(rest.len());
            chunk.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if chunk.len() as u64 == sealer.chunk_len(index) {
                writer.write(&sealer.seal(index, &chunk)?).await?;
                chunk.clear();
                index += 1;
            }
        }
    }
    if got < declared {
        return Err(PackageError::Truncated { got, declared });
    }
    if declared == 0 {
        // The one (empty) chunk of an empty package.
        writer.write(&sealer.seal(0, &[])?).await?;
    }
    Ok(hasher.finalize().into())
}

/// Wraps every package's data key under the current master key (after a rotation); returns
/// how many were rewrapped. The packages' bytes are not touched; once this has run on the new
/// configuration, the old master key can be removed from it.
///
/// # Errors
/// A package whose key cannot be unwrapped (its master key is not configured); storage errors.
pub async fn rewrap_all(app: &App, pk: &Packages) -> Result<u64, PackageError> {
    let client = app.pg.get().await?;
    let rows = client.query("SELECT id, wrapped_key FROM ota_packages ORDER BY id", &[]).await?;
    let mut n = 0;
    for r in &rows {
        let (id, value): (String, serde_json::Value) = (r.get(0), r.get(1));
        let old: WrappedKey =
            serde_json::from_value(value.clone()).map_err(|e| StoreError::invalid("wrapped_key", e.to_string()))?;
        let new = pk.keys.master.rewrap(&old)?;
        if new == old {
            continue;
        }
        let new = serde_json::to_value(&new).map_err(|e| StoreError::invalid("wrapped_key", e.to_string()))?;
        // Only if unchanged meanwhile (another instance rewrapping too).
        n += client
            .execute(
                "UPDATE ota_packages SET wrapped_key = $2 WHERE id = $1 AND wrapped_key = $3",
                &[&id, &new, &value],
            )
            .await?;
    }
    tracing::info!(rewrapped = n, "OTA package keys rewrapped under the current master key");
    Ok(n)
}

/// Removes a package no task refers to (a task's history keeps its package).
///
/// # Errors
/// `NotFound`; `Rejected` (`package_in_use`); storage errors.
pub async fn delete(app: &App, pk: &Packages, id: &str) -> Result<(), PackageError> {
    let stored = get(app, id).await?;
    let client = app.pg.get().await?;
    let in_use = client
        .query_opt(
            "SELECT id FROM ota_tasks WHERE package_id = $1
             UNION ALL SELECT task_id FROM ota_task_vehicles WHERE package_id = $1 LIMIT 1",
            &[&id],
        )
        .await?;
    if let Some(r) = in_use {
        let task: String = r.get(0);
        return Err(StoreError::rejected("package_in_use", format!("task {task} refers to package {id}")).into());
    }
    client.execute("DELETE FROM ota_packages WHERE id = $1", &[&id]).await?;
    pk.storage.delete(&stored.object).await?;
    Ok(())
}
