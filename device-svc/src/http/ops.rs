//! Operations endpoints: health, metrics, open alerts, dead letters.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::error::ApiError;
use super::extract::query_num;
use crate::app::{App, ms_of};
use crate::dead_letters::{self, DeadLetter};
use crate::error::StoreError;

/// 200 when PostgreSQL and Redis answer, 503 naming the one that does not.
pub(super) async fn healthz(State(app): State<Arc<App>>) -> Response {
    let pg = async {
        let client = app.pg.get().await?;
        client.execute("SELECT 1", &[]).await?;
        Ok::<_, StoreError>(())
    };
    if let Err(e) = pg.await {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("postgres: {e}\n")).into_response();
    }
    let mut con = app.redis.clone();
    if let Err(e) = redis::cmd("PING").query_async::<String>(&mut con).await {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("redis: {e}\n")).into_response();
    }
    (StatusCode::OK, "ok\n").into_response()
}

pub(super) async fn metrics(State(app): State<Arc<App>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

/// An open service alert.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct Alert {
    kind: String,
    node: String,
    detail: String,
    started_ms: u64,
}

/// Service alerts still open (a node's heartbeat intake below its share, ...).
pub(super) async fn alerts(State(app): State<Arc<App>>) -> Result<Json<Vec<Alert>>, ApiError> {
    let client = app.pg.get().await.map_err(StoreError::from)?;
    let rows = client
        .query(
            "SELECT kind, node, detail, started_at FROM service_alerts WHERE ended_at IS NULL ORDER BY started_at",
            &[],
        )
        .await
        .map_err(StoreError::from)?;
    Ok(Json(
        rows.iter()
            .map(|r| Alert { kind: r.get(0), node: r.get(1), detail: r.get(2), started_ms: ms_of(r.get(3)) })
            .collect(),
    ))
}

/// `GET /v1/dead-letters?open=&before_id=&limit=`: newest first, paged back by id.
pub(super) async fn dead_letters(
    State(app): State<Arc<App>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<DeadLetter>>, ApiError> {
    let limit = query_num::<i64>(&q, "limit")?.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit", "1..=1000"));
    }
    let open = match q.get("open").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(ApiError::invalid("open", format!("{other:?}: true or false"))),
    };
    Ok(Json(dead_letters::list(&app, open, query_num::<i64>(&q, "before_id")?, limit).await?))
}

/// `POST /v1/dead-letters/{id}/replay`: `{"entry_id": "..."}` of the entry appended again.
pub(super) async fn replay_dead_letter(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id: i64 = id.parse().map_err(|_| ApiError::invalid("id", format!("{id:?} is not a number")))?;
    let entry_id = dead_letters::replay(&app, id).await?;
    Ok(Json(serde_json::json!({ "entry_id": entry_id })))
}
