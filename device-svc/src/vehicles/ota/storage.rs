//! Where sealed packages live: the `object_store` crate (Apache Arrow's, used by DataFusion
//! and Delta Lake) behind one small type, so the same code writes to a directory of this
//! machine (the default: one host, no other server) or to an S3-compatible store (when a
//! deployment outgrows one machine) and reads byte ranges back from either.
//!
//! Writing is a multipart upload fed chunk by chunk ([`Writer`]): the store holds a few parts
//! in flight at most, so an upload of any size needs bounded memory. Reading is one ranged
//! `GET` per sealed chunk a download touches.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, WriteMultipart};

use crate::config::OtaPackagesConfig;

/// Parts of a multipart upload: 8 MiB (S3 wants at least 5 MiB for every part but the last).
const PART: usize = 8 << 20;
/// Parts sent at once by one upload.
const PARTS_IN_FLIGHT: usize = 2;

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[error("package storage: {0}")]
pub struct StorageError(#[from] object_store::Error);

/// The package store.
#[derive(Debug, Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    /// `fs` or `s3`, for logs and metrics.
    pub backend: &'static str,
}

impl Storage {
    /// The store `c` names. A directory is created if missing.
    ///
    /// # Errors
    /// A directory that cannot be created, or an S3 configuration the client refuses.
    pub fn open(c: &OtaPackagesConfig) -> Result<Self, StorageError> {
        if c.storage == "s3" {
            let mut b = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(&c.s3_bucket)
                .with_region(&c.s3_region)
                .with_allow_http(c.s3_allow_http);
            if !c.s3_endpoint.is_empty() {
                b = b.with_endpoint(&c.s3_endpoint);
            }
            if !c.s3_access_key_id.is_empty() {
                b = b.with_access_key_id(&c.s3_access_key_id).with_secret_access_key(&c.s3_secret_access_key.0);
            }
            return Ok(Storage { store: Arc::new(b.build()?), backend: "s3" });
        }
        std::fs::create_dir_all(&c.path)
            .map_err(|e| object_store::Error::Generic { store: "fs", source: Box::new(e) })?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(&c.path)?;
        Ok(Storage { store: Arc::new(fs), backend: "fs" })
    }

    /// Starts writing the object at `path`.
    ///
    /// # Errors
    /// The store refuses the upload.
    pub async fn writer(&self, path: &str) -> Result<Writer, StorageError> {
        let upload = self.store.put_multipart(&Path::from(path)).await?;
        Ok(Writer { inner: WriteMultipart::new_with_chunk_size(upload, PART) })
    }

    /// Bytes `range` of the object at `path`.
    ///
    /// # Errors
    /// A missing object, or the store failing.
    pub async fn read(&self, path: &str, range: Range<u64>) -> Result<Bytes, StorageError> {
        Ok(self.store.get_range(&Path::from(path), range).await?)
    }

    /// Removes the object at `path` (nothing if it is gone).
    ///
    /// # Errors
    /// The store failing.
    pub async fn delete(&self, path: &str) -> Result<(), StorageError> {
        match self.store.delete(&Path::from(path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// An object being written.
#[derive(Debug)]
pub struct Writer {
    inner: WriteMultipart,
}

impl Writer {
    /// Appends `bytes`, waiting while too many parts are in flight (the bound on memory).
    ///
    /// # Errors
    /// A part the store refused.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        self.inner.wait_for_capacity(PARTS_IN_FLIGHT).await?;
        self.inner.write(bytes);
        Ok(())
    }

    /// Completes the object.
    ///
    /// # Errors
    /// The store refused a part or the completion.
    pub async fn finish(self) -> Result<(), StorageError> {
        self.inner.finish().await?;
        Ok(())
    }

    /// Abandons the object (its parts are discarded).
    pub async fn abort(self) {
        if let Err(e) = self.inner.abort().await {
            tracing::warn!(error = %e, "failed to abort a package upload; the store may keep its parts");
        }
    }
}
