//! API errors as JSON with the status code a client can act on.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::StoreError;

/// The `error` code of an answer, kept in the response's extensions for the audit trail.
#[derive(Debug, Clone, Copy)]
pub(super) struct ErrorCode(pub(super) &'static str);

/// An error answer: `{"error": code, "message": text, "field": name?}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
}

/// The body of every error answer (`Error` in the OpenAPI document).
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub(super) struct ErrorBody<'a> {
    /// Machine-readable code a client acts on (`invalid`, `not_found`, `door_busy`, ...).
    error: &'a str,
    /// For a person.
    message: &'a str,
    /// The offending input (`invalid`): a JSON path such as `doors[0].door_id`, a path segment
    /// or a query parameter.
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl ApiError {
    /// 400 naming the offending field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, code: "invalid", message: message.into(), field: Some(field.into()) }
    }

    /// 415: a body that does not say it is JSON.
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "unsupported_media_type",
            message: message.into(),
            field: Some("content-type".into()),
        }
    }

    /// 401: no valid API key.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self { status: StatusCode::UNAUTHORIZED, code: "unauthorized", message: message.into(), field: None }
    }

    /// 403: the caller's role may not call the route, or the target is not the caller's.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self { status: StatusCode::FORBIDDEN, code: "forbidden", message: message.into(), field: None }
    }

    /// 429: the key is above its rate.
    pub fn rate_limited(message: impl Into<String>) -> Self {
        Self { status: StatusCode::TOO_MANY_REQUESTS, code: "rate_limited", message: message.into(), field: None }
    }

    /// 409 with a machine-readable `code` a client acts on.
    pub fn rejected(code: &'static str, message: impl Into<String>) -> Self {
        Self { status: StatusCode::CONFLICT, code, message: message.into(), field: None }
    }

    /// Any status with its machine-readable `code` (413, 416, 422, 503, ...).
    pub fn status(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), field: None }
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self { status: StatusCode::NOT_FOUND, code: "not_found", message: message.into(), field: None }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{} ({field}): {}", self.code, self.message),
            None => write!(f, "{}: {}", self.code, self.message),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let (status, code, field) = match &e {
            StoreError::Invalid { field, .. } => (StatusCode::BAD_REQUEST, "invalid", Some((*field).to_owned())),
            StoreError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found", None),
            StoreError::Conflict(_) => (StatusCode::CONFLICT, "conflict", None),
            StoreError::Rejected { code, .. } => (StatusCode::CONFLICT, *code, None),
            StoreError::Postgres(_) | StoreError::Pool(_) | StoreError::Redis(_) => {
                tracing::warn!(error = %e, "API request failed on storage");
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable", None)
            }
        };
        let message = match &e {
            StoreError::Invalid { detail, .. } | StoreError::Rejected { detail, .. } => detail.clone(),
            _ => e.to_string(),
        };
        Self { status, code, message, field }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: self.code, message: &self.message, field: self.field.as_deref() };
        let mut response = (self.status, Json(body)).into_response();
        response.extensions_mut().insert(ErrorCode(self.code));
        response
    }
}
