//! Vehicles downloading packages: the signed URL a notice carries, who may use it, and the
//! reader that decrypts the chunks a byte range touches, one at a time.
//!
//! A URL names the package, the vehicle, the task, an expiry and the master key whose derived
//! key signed it (HMAC-SHA256, [`keys`](super::keys)); it reaches only that vehicle, in its own
//! notice over its authenticated MQTT session. A download is served only while the vehicle's
//! upgrade in that task is active and the task chose this package for it, so a URL that leaks
//! stops working when the upgrade ends, and at its expiry in any case.
//!
//! The reader holds one sealed chunk (1 MiB + 16) and its plaintext at a time, so memory per
//! download is bounded whatever the package's size; each chunk authenticates on its own
//! (tampered, moved or truncated data fails there), and a download of the whole package is
//! also checked against the recorded SHA-256 before its last bytes leave.

use std::num::NonZeroU32;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::packages::{PackageError, Packages, Stored};
use super::sealed::{SealError, Sealer};
use crate::app::{App, now_ms};
use crate::error::StoreError;
use crate::metrics::Metrics;

/// The query of a download URL.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The vehicle.
    pub vin: String,
    /// The task.
    pub task: String,
    /// Expiry, s since the Unix epoch.
    pub exp: u64,
    /// The master key whose derived key signed it.
    pub key: String,
    /// The signature, hex.
    pub sig: String,
}

/// The URL a notice carries for `vin` to download `package` in `task`.
pub fn url(app: &App, pk: &Packages, package: &str, vin: &str, task: &str) -> String {
    let exp = now_ms() / 1000 + app.config.ota.downloads.url_ttl_s;
    let exp_text = exp.to_string();
    let (key, sig) = pk.keys.sign_url(&[package, vin, task, &exp_text]);
    let base = app.config.ota.downloads.public_url.trim_end_matches('/');
    format!("{base}/v1/ota/packages/{package}/download?vin={vin}&task={task}&exp={exp}&k={key}&sig={sig}")
}

/// Why a download is refused (each counted as `devsvc_ota_download_refusals_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The signature does not check (or names a master key not configured).
    BadSignature,
    /// Past its expiry.
    Expired,
    /// The vehicle's upgrade in the task is not active, or got another package.
    NotInTask,
}

impl Refusal {
    /// The label and the `error` code.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::BadSignature => "bad_signature",
            Refusal::Expired => "expired",
            Refusal::NotInTask => "not_in_task",
        }
    }
}

/// Checks `grant` for `package`; the package when it may be served.
///
/// # Errors
/// `Ok(Err(refusal))` for a refused grant; `NotFound` for an unknown package; storage errors.
pub async fn authorise(
    app: &App,
    pk: &Packages,
    package: &str,
    grant: &Grant,
) -> Result<Result<Stored, Refusal>, StoreError> {
    let fields = [package, grant.vin.as_str(), grant.task.as_str(), &grant.exp.to_string()];
    if !pk.keys.check_url(&grant.key, &fields, &grant.sig) {
        return Ok(Err(Refusal::BadSignature));
    }
    if grant.exp < now_ms() / 1000 {
        return Ok(Err(Refusal::Expired));
    }
    let client = app.pg.get().await?;
    let member = client
        .query_opt(
            "SELECT 1 FROM ota_task_vehicles WHERE task_id = $1 AND vin = $2 AND package_id = $3 AND active",
            &[&grant.task, &grant.vin, &package],
        )
        .await?;
    drop(client);
    if member.is_none() {
        return Ok(Err(Refusal::NotInTask));
    }
    let stored = super::packages::get(app, package).await?;
    if stored.package.state != "ready" {
        return Err(StoreError::NotFound(format!("package {package}")));
    }
    Ok(Ok(stored))
}

/// Reads a byte range of a package, chunk by chunk.
pub struct Reader {
    pk: Arc<Packages>,
    metrics: Metrics,
    sealer: Sealer,
    object: String,
    range: Range<u64>,
    next: u64,
    end: u64,
    /// For a whole-package read: the digest so far and the recorded one.
    digest: Option<(Sha256, String)>,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _active: ActiveGuard,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").field("object", &self.object).field("range", &self.range).finish_non_exhaustive()
    }
}

/// Keeps `devsvc_ota_downloads_active` while a download runs.
struct ActiveGuard(prometheus::IntGauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Reader {
    /// A reader of `range` (plaintext bytes) of `stored`, holding `permit` (this instance's
    /// download concurrency) until it is dropped.
    ///
    /// # Errors
    /// The data key does not unwrap; the range is outside the package.
    pub fn new(
        app: &App,
        pk: Arc<Packages>,
        stored: &Stored,
        range: Range<u64>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<Self, PackageError> {
        let sealer = stored.sealer(&pk.keys.master)?;
        let chunks = if range.is_empty() { 0..0 } else { sealer.chunks_of(&range)? };
        let whole = range.start == 0 && range.end == stored.package.size_bytes;
        app.metrics.ota_downloads_active.inc();
        Ok(Reader {
            pk,
            metrics: app.metrics.clone(),
            sealer,
            object: stored.object.clone(),
            range,
            next: chunks.start,
            end: chunks.end,
            digest: whole.then(|| (Sha256::new(), stored.package.sha256.clone())),
            _permit: permit,
            _active: ActiveGuard(app.metrics.ota_downloads_active.clone()),
        })
    }

    /// The next piece of plaintext, `None` at the end.
    ///
    /// # Errors
    /// The store failing, a chunk that does not authenticate, or a whole package whose digest
    /// is not the recorded one (checked before its last piece is given out).
    pub async fn next_piece(&mut self) -> Result<Option<Bytes>, PackageError> {
        if self.next >= self.end {
            return Ok(None);
        }
        let index = self.next;
        let start = self.sealer.stored_offset(index);
        let len = self.sealer.chunk_len(index) + super::sealed::TAG;
        let sealed = self.pk.storage.read(&self.object, start..start + len).await?;
        let plain = self.sealer.open(index, &sealed).inspect_err(|_| {
            self.metrics.ota_download_refusals.with_label_values(&["tampered"]).inc();
        })?;
        self.next += 1;
        if let Some((hasher, _)) = &mut self.digest {
            hasher.update(&plain);
        }
        if self.next == self.end
            && let Some((hasher, expected)) = self.digest.take()
            && hex::encode(hasher.finalize()) != *expected
        {
            self.metrics.ota_download_refusals.with_label_values(&["digest_mismatch"]).inc();
            return Err(SealError::Tampered(index).into());
        }
        let piece = Bytes::copy_from_slice(self.sealer.slice(index, &plain, &self.range));
        if let Some(limiter) = &self.pk.bandwidth {
            let kib = u32::try_from(piece.len().div_ceil(1024)).unwrap_or(u32::MAX);
            if let Some(n) = NonZeroU32::new(kib) {
                // The burst is at least a chunk, so this always fits.
                let _ = limiter.until_n_ready(n).await;
            }
        }
        self.metrics.ota_download_bytes.inc_by(piece.len() as u64);
        Ok(Some(piece))
    }
}
