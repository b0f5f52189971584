//! Request parsing that names the offending field in its 400 answers (axum's own extractors
//! answer 422 or plain text without one).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use protocol::bus::DeviceKey;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A JSON body; a body that does not fit `T` is a 400 naming the field's path.
#[derive(Debug)]
pub(super) struct JsonBody<T>(pub(super) T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| ApiError::invalid("body", e.body_text()))?;
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        match serde_path_to_error::deserialize(&mut de) {
            Ok(v) => Ok(Self(v)),
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
