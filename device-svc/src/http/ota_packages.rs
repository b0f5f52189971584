//! OTA package endpoints: upload (streamed), list, read, delete, master-key rewrap, the public
//! signing key, and the vehicles' download with HTTP `Range` (RFC 9110: one range per request,
//! `If-Range` against the `ETag`, 416 with `Content-Range: bytes */len` past the end).
//!
//! Upload and download stream their bodies, so they run outside the API's request timeout; an
//! upload is bounded instead by `ota.packages.max_bytes` and `upload_idle_ms`, a download by
//! this instance's download slots (`ota.downloads.max_concurrent`, 503 with `Retry-After` when
//! full) and its bandwidth (`ota.downloads.bytes_per_s`).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::error::ApiError;
use super::extract::query_num;
use crate::app::App;
use crate::vehicles::ota::download::{self, Grant, Reader};
use crate::vehicles::ota::packages::{self, Kind, NewPackage, Package, PackageError, Packages};
use crate::vehicles::ota::sealed::SealError;

type Answer<T> = Result<T, ApiError>;

fn configured(app: &App) -> Answer<Arc<Packages>> {
    app.ota_packages.clone().ok_or_else(|| {
        ApiError::status(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_configured",
            "OTA package storage is off: configure ota.packages master keys and the signing key",
        )
    })
}

impl From<PackageError> for ApiError {
    fn from(e: PackageError) -> Self {
        match e {
            PackageError::Store(s) => s.into(),
            PackageError::NotConfigured => {
                ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "not_configured", e.to_string())
            }
            PackageError::TooLarge(_) => ApiError::status(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.to_string()),
            PackageError::Truncated { .. } => ApiError::invalid("body", e.to_string()),
            PackageError::DigestMismatch { .. } => {
                ApiError::status(StatusCode::UNPROCESSABLE_ENTITY, "digest_mismatch", e.to_string())
            }
            PackageError::Broken(_) => ApiError::status(StatusCode::BAD_REQUEST, "upload_broken", e.to_string()),
            PackageError::Seal(SealError::Tampered(_)) => {
                tracing::error!(error = %e, "an OTA package in the store does not authenticate");
                ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "package_corrupt", e.to_string())
            }
            PackageError::Seal(_) => {
                tracing::error!(error = %e, "an OTA package's data key cannot be unwrapped");
                ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "package_key_unavailable", e.to_string())
            }
            PackageError::Storage(_) => {
                tracing::error!(error = %e, "OTA package storage failed");
                ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", e.to_string())
            }
        }
    }
}

/// `PUT /v1/ota/packages/{id}?version=&kind=&from_version=&sha256=&created_by=`: the body is
/// the package (`Content-Length` required). 201 with the package, signed.
pub(super) async fn upload(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Answer<(StatusCode, Json<Package>)> {
    let pk = configured(&app)?;
    let known = ["version", "kind", "from_version", "sha256", "created_by"];
    if let Some(k) = q.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(ApiError::invalid(k.clone(), "unknown parameter"));
    }
    let need = |k: &'static str| q.get(k).cloned().ok_or_else(|| ApiError::invalid(k, "required"));
    let kind = match q.get("kind").map_or("full", String::as_str) {
        "full" => Kind::Full,
        "delta" => Kind::Delta,
        _ => return Err(ApiError::invalid("kind", "full or delta")),
    };
    let size = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| {
            ApiError::status(StatusCode::LENGTH_REQUIRED, "length_required", "send the package with Content-Length")
        })?;
    let new = NewPackage {
        id,
        version: need("version")?,
        kind,
        from_version: q.get("from_version").cloned(),
        sha256: need("sha256")?,
        size_bytes: size,
        created_by: q.get("created_by").cloned().unwrap_or_default(),
    };
    let stored = packages::upload(&app, &pk, new, body.into_data_stream()).await?;
    Ok((StatusCode::CREATED, Json(stored)))
}

/// `GET /v1/ota/packages?version=&limit=`
pub(super) async fn list(
    State(app): State<Arc<App>>,
    Query(q): Query<HashMap<String, String>>,
) -> Answer<Json<Vec<Package>>> {
    let limit = query_num::<i64>(&q, "limit")?.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid("limit", "1..=500"));
    }
    let version = q.get("version").map(String::as_str);
    if version.is_some_and(|v| v.len() > 64) {
        return Err(ApiError::invalid("version", "at most 64 characters"));
    }
    Ok(Json(packages::list(&app, version, limit).await?))
}

/// `GET /v1/ota/packages/{id}`
pub(super) async fn get(State(app): State<Arc<App>>, Path(id): Path<String>) -> Answer<Json<Package>> {
    Ok(Json(packages::get(&app, &id).await?.package))
}

/// `DELETE /v1/ota/packages/{id}`: 204; 409 `package_in_use`.
pub(super) async fn delete(State(app): State<Arc<App>>, Path(id): Path<String>) -> Answer<StatusCode> {
    let pk = configured(&app)?;
    packages::delete(&app, &pk, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The answer of a rewrap.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct Rewrapped {
    /// Packages whose data key was wrapped again under the current master key.
    rewrapped: u64,
}

/// `POST /v1/ota/packages/rewrap`: every package's data key under the current master key.
pub(super) async fn rewrap(State(app): State<Arc<App>>) -> Answer<Json<Rewrapped>> {
    let pk = configured(&app)?;
    Ok(Json(Rewrapped { rewrapped: packages::rewrap_all(&app, &pk).await? }))
}

/// The platform's package-signing key.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct SigningKey {
    /// `ed25519`.
    algorithm: &'static str,
    /// The public key, base64 of its 32 bytes.
    public_key: String,
    /// What is signed: the 32 bytes of the package's SHA-256 digest.
    message: &'static str,
}

/// `GET /v1/ota/signing-key`
pub(super) async fn signing_key(State(app): State<Arc<App>>) -> Answer<Json<SigningKey>> {
    let pk = configured(&app)?;
    Ok(Json(SigningKey { algorithm: "ed25519", public_key: pk.keys.public_key(), message: "sha256(package)" }))
}

/// What a `Range` header asks for, against a package of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
enum Wanted {
    /// The whole package (no range, an ignored one, or a stale `If-Range`).
    Whole,
    /// One satisfiable range.
    Part(std::ops::Range<u64>),
    /// A range that starts past the end.
    Unsatisfiable,
}

/// RFC 9110 14.2: one `bytes=` range; anything else (several ranges, other units, bad syntax)
/// is ignored and the whole representation sent.
fn wanted(range: Option<&str>, len: u64) -> Wanted {
    let Some(spec) = range.and_then(|r| r.trim().strip_prefix("bytes=")) else { return Wanted::Whole };
    if spec.contains(',') {
        return Wanted::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return Wanted::Whole };
    let (first, last) = (first.trim(), last.trim());
    let parsed = match (first.is_empty(), last.is_empty()) {
        (true, true) => return Wanted::Whole,
        // The last N bytes.
        (true, false) => match last.parse::<u64>() {
            Ok(0) => return Wanted::Unsatisfiable,
            Ok(n) => len.saturating_sub(n)..len,
            Err(_) => return Wanted::Whole,
        },
        (false, true) => match first.parse::<u64>() {
            Ok(a) => a..len,
            Err(_) => return Wanted::Whole,
        },
        (false, false) => match (first.parse::<u64>(), last.parse::<u64>()) {
            (Ok(a), Ok(b)) if a <= b => a..b.saturating_add(1).min(len),
            _ => return Wanted::Whole,
        },
    };
    if parsed.start >= len {
        return Wanted::Unsatisfiable;
    }
    Wanted::Part(parsed)
}

/// `GET /v1/ota/packages/{id}/download?vin=&task=&exp=&k=&sig=`: the signed URL of a notice.
pub(super) async fn download(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Answer<Response> {
    let pk = configured(&app)?;
    let refuse = |reason: &'static str, message: &str| {
        app.metrics.ota_download_refusals.with_label_values(&[reason]).inc();
        ApiError::status(StatusCode::FORBIDDEN, reason, message)
    };
    let field = |k: &str| q.get(k).cloned().unwrap_or_default();
    let grant = Grant {
        vin: field("vin"),
        task: field("task"),
        exp: q.get("exp").and_then(|e| e.parse().ok()).unwrap_or(0),
        key: field("k"),
        sig: field("sig"),
    };
    let stored = match download::authorise(&app, &pk, &id, &grant).await? {
        Ok(s) => s,
        Err(r) => return Err(refuse(r.as_str(), "this URL does not grant this download (now)")),
    };
    let len = stored.package.size_bytes;
    let etag = format!("\"{}\"", stored.package.sha256);
    let if_range_ok = headers.get(header::IF_RANGE).is_none_or(|v| v.as_bytes() == etag.as_bytes());
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).filter(|_| if_range_ok);
    let wanted = wanted(range, len);
    if wanted == Wanted::Unsatisfiable {
        app.metrics.ota_download_refusals.with_label_values(&["range_not_satisfiable"]).inc();
        let mut r =
            ApiError::status(StatusCode::RANGE_NOT_SATISFIABLE, "range_not_satisfiable", "the range is past the end")
                .into_response();
        r.headers_mut().insert(header::CONTENT_RANGE, value(&format!("bytes */{len}")));
        return Ok(r);
    }
    let Ok(permit) = Arc::clone(&pk.downloads).try_acquire_owned() else {
        app.metrics.ota_download_refusals.with_label_values(&["busy"]).inc();
        let mut r = ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "downloads_busy", "every download slot is taken")
            .into_response();
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return Ok(r);
    };
    let (status, bytes) = match wanted {
        Wanted::Part(r) => (StatusCode::PARTIAL_CONTENT, r),
        _ => (StatusCode::OK, 0..len),
    };
    app.metrics.ota_downloads.with_label_values(&[if status == StatusCode::OK { "full" } else { "range" }]).inc();
    if bytes.start > 0 {
        app.metrics.ota_download_resumes.inc();
    }
    let mut reader = Reader::new(&app, Arc::clone(&pk), &stored, bytes.clone(), permit)?;
    // The first piece before the answer: a package that cannot be read is an error status, not
    // a body cut short.
    let first = reader.next_piece().await?;
    let stream = futures_util::stream::try_unfold((first, reader), |(first, mut reader)| async move {
        let piece = match first {
            Some(piece) => Some(piece),
            None => reader.next_piece().await.map_err(std::io::Error::other)?,
        };
        Ok::<_, std::io::Error>(piece.map(|p| (p, (None, reader))))
    });
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::CONTENT_LENGTH, value(&(bytes.end - bytes.start).to_string()));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::ETAG, value(&etag));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(header::CONTENT_RANGE, value(&format!("bytes {}-{}/{len}", bytes.start, bytes.end - 1)));
    }
    Ok(response)
}

fn value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_rfc_9110() {
        assert_eq!(wanted(None, 100), Wanted::Whole);
        assert_eq!(wanted(Some("bytes=0-9"), 100), Wanted::Part(0..10));
        assert_eq!(wanted(Some("bytes=90-"), 100), Wanted::Part(90..100));
        assert_eq!(wanted(Some("bytes=-10"), 100), Wanted::Part(90..100));
        assert_eq!(wanted(Some("bytes=-500"), 100), Wanted::Part(0..100));
        assert_eq!(wanted(Some("bytes=50-5000"), 100), Wanted::Part(50..100));
        assert_eq!(wanted(Some("bytes=100-"), 100), Wanted::Unsatisfiable);
        assert_eq!(wanted(Some("bytes=-0"), 100), Wanted::Unsatisfiable);
        // Ignored: several ranges, other units, nonsense, an inverted range.
        assert_eq!(wanted(Some("bytes=0-1,5-6"), 100), Wanted::Whole);
        assert_eq!(wanted(Some("items=0-1"), 100), Wanted::Whole);
        assert_eq!(wanted(Some("bytes=x-y"), 100), Wanted::Whole);
        assert_eq!(wanted(Some("bytes=9-3"), 100), Wanted::Whole);
    }
}
