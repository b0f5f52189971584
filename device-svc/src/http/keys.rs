//! Operators' routes for API keys (`/v1/keys`) and the audit trail (`/v1/audit`).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{JsonBody, query_num};
use crate::app::App;
use crate::auth::audit::{self, Entry, Filter};
use crate::auth::keys::{self, IssuedKey, KeyInfo, NewKey};
use crate::auth::{Principal, Role};
use crate::error::StoreError;

type Answer<T> = Result<T, ApiError>;

/// The body of `POST /v1/keys`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewKeyBody {
    name: String,
    role: String,
    #[serde(default)]
    tenant: Option<String>,
}

/// `POST /v1/keys`: 201 with the whole key, shown this once.
pub(super) async fn create(
    State(app): State<Arc<App>>,
    Extension(by): Extension<Principal>,
    JsonBody(body): JsonBody<NewKeyBody>,
) -> Answer<(StatusCode, Json<IssuedKey>)> {
    let role: Role = body.role.parse().map_err(|e: String| ApiError::invalid("role", e))?;
    let created_by = by.audit_name();
    let new = NewKey { name: &body.name, role, tenant: body.tenant.as_deref(), created_by: &created_by };
    let mut client = app.pg.get().await.map_err(StoreError::from)?;
    let tx = client.transaction().await.map_err(StoreError::from)?;
    let issued = keys::create(&*tx, &new).await?;
    audit::record(&tx).await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok((StatusCode::CREATED, Json(issued)))
}

/// `GET /v1/keys`: every key, never a secret.
pub(super) async fn list(State(app): State<Arc<App>>) -> Answer<Json<Vec<KeyInfo>>> {
    let client = app.pg.get().await.map_err(StoreError::from)?;
    Ok(Json(keys::list(&**client).await?))
}

/// `POST /v1/keys/{id}/revoke`: idempotent; refused for the caller's own key (an operator
/// cannot lock every operator out by accident; another operator, or the CLI, can).
pub(super) async fn revoke(
    State(app): State<Arc<App>>,
    Extension(by): Extension<Principal>,
    Path(id): Path<String>,
) -> Answer<Json<KeyInfo>> {
    if id == by.key_id {
        return Err(ApiError::rejected("own_key", "a key cannot revoke itself; use another operator key or the CLI"));
    }
    let mut client = app.pg.get().await.map_err(StoreError::from)?;
    let tx = client.transaction().await.map_err(StoreError::from)?;
    let info = keys::revoke(&*tx, &id).await?;
    audit::record(&tx).await?;
    tx.commit().await.map_err(StoreError::from)?;
    app.verifier.forget(&id);
    Ok(Json(info))
}

/// `GET /v1/audit?principal=&route=&target=&outcome=&since_ms=&before_id=&limit=`
pub(super) async fn audit(
    State(app): State<Arc<App>>,
    Query(q): Query<HashMap<String, String>>,
) -> Answer<Json<Vec<Entry>>> {
    let limit = query_num::<i64>(&q, "limit")?.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit", "1..=1000"));
    }
    let since_ms = query_num::<u64>(&q, "since_ms")?;
    if let Some(ms) = since_ms {
        crate::clock::checked_time("since_ms", ms)?;
    }
    let filter = Filter {
        principal: q.get("principal").map(String::as_str),
        route: q.get("route").map(String::as_str),
        target_prefix: q.get("target").map(String::as_str),
        outcome: q.get("outcome").map(String::as_str),
        before_id: query_num::<i64>(&q, "before_id")?,
        since_ms,
        limit,
    };
    Ok(Json(audit::list(&app, &filter).await?))
}
