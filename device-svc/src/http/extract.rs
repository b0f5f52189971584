//! Request parsing that names the offending field in its 400 answers (axum's own extractors
//! answer 422 or plain text without one), and bounds every value a caller sends before any of
//! it reaches storage: a body must say it is JSON (a form or `text/plain` post from a web page
//! is refused, 415), no text may hold a NUL or exceed [`MAX_TEXT_BYTES`], no number may exceed
//! what PostgreSQL's `bigint` holds. PostgreSQL would refuse each of these as an error that
//! looks like an outage (5xx); here they are the caller's 400 naming the field.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, header};
use protocol::bus::DeviceKey;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;

/// The longest text value the API takes, in bytes (names, notes, ids, and every text inside a
/// vehicle downlink's payload, which is also bounded as a whole: SPEC.md 2.2).
pub(super) const MAX_TEXT_BYTES: usize = 4096;

/// A JSON body; a body that does not fit `T` is a 400 naming the field's path.
#[derive(Debug)]
pub(super) struct JsonBody<T>(pub(super) T);

/// The first value in `v` that breaks a rule of the module header, as (path, why).
fn out_of_bounds(v: &Value, path: &mut Vec<String>) -> Option<(String, String)> {
    let here = |path: &[String]| if path.is_empty() { "body".to_owned() } else { path.join(".") };
    match v {
        Value::String(s) if s.contains('\0') => Some((here(path), "must not contain NUL".into())),
        Value::String(s) if s.len() > MAX_TEXT_BYTES => {
            Some((here(path), format!("{} bytes; at most {MAX_TEXT_BYTES}", s.len())))
        }
        Value::Number(n) if n.as_i64().is_none() && n.as_u64().is_some() => {
            Some((here(path), format!("{n} is larger than {}", i64::MAX)))
        }
        Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            path.push(format!("[{i}]"));
            let found = out_of_bounds(item, path);
            path.pop();
            found
        }),
        Value::Object(fields) => fields.iter().find_map(|(k, item)| {
            path.push(k.clone());
            let found = out_of_bounds(item, path);
            path.pop();
            found
        }),
        _ => None,
    }
}

/// 415 unless the request says its body is `application/json`.
pub(super) fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if json { Ok(()) } else { Err(ApiError::unsupported_media_type("send the body as Content-Type: application/json")) }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        require_json(req.headers())?;
        let bytes = Bytes::from_request(req, state).await.map_err(|e| ApiError::invalid("body", e.body_text()))?;
        decode(&bytes).map(Self)
    }
}

/// Parses and bounds a JSON body (the rules of the module header), naming the offending field.
pub(super) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| ApiError::invalid("body", e.to_string()))?;
        if let Some((field, why)) = out_of_bounds(&value, &mut Vec::new()) {
            return Err(ApiError::invalid(field, why));
        }
        match serde_path_to_error::deserialize(value) {
            Ok(v) => Ok(v),
            Err(e) => {
                let inner = e.inner().to_string();
                let path = e.path().to_string();
                // "missing field `x`" is reported at the parent's path: name the field itself.
                let field = match inner.strip_prefix("missing field `").and_then(|s| s.split('`').next()) {
                    Some(name) if path == "." => name.to_owned(),
                    Some(name) => format!("{path}.{name}"),
                    None if path == "." => "body".to_owned(),
                    None => path,
                };
                Err(ApiError::invalid(field, inner))
            }
        }
    }
}

/// A device key from the path (`cab:ID` or `veh:VIN`).
pub(super) fn device_key(s: &str) -> Result<DeviceKey, ApiError> {
    DeviceKey::parse(s).map_err(|e| ApiError::invalid("key", e.to_string()))
}

/// A door or lane id from the path.
pub(super) fn small_id(field: &'static str, s: &str) -> Result<u8, ApiError> {
    s.parse::<u8>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| ApiError::invalid(field, format!("{s:?} is not within 1..=255")))
}

/// An optional numeric query parameter.
pub(super) fn query_num<T: std::str::FromStr>(
    query: &std::collections::HashMap<String, String>,
    name: &'static str,
) -> Result<Option<T>, ApiError> {
    query
        .get(name)
        .map(|v| v.parse::<T>().map_err(|_| ApiError::invalid(name, format!("{v:?} is not a number"))))
        .transpose()
}
