//! Weight endpoints: a cabinet's current lane weights, a lane's readings over time.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use serde::Serialize;

use super::error::ApiError;
use super::extract::{query_num, small_id};
use crate::app::{App, now_ms};
use crate::weights::{self, LaneWeight, Reading};

/// `GET /v1/cabinets/{id}/weights`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct Current {
    cabinet_id: String,
    lanes: Vec<LaneWeight>,
}

pub(super) async fn current(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<Current>, ApiError> {
    // An unknown cabinet is a 404, not an empty list.
    crate::registry::get_cabinet(&app, &id).await?;
    let lanes = weights::current(&app, &id).await?;
    Ok(Json(Current { cabinet_id: id, lanes }))
}

/// How far back `readings` looks when no `from_ms` is given.
const DEFAULT_SPAN_MS: u64 = 3_600_000;

pub(super) async fn history(
    State(app): State<Arc<App>>,
    Path((id, door, lane)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<Reading>>, ApiError> {
    let door = small_id("door", &door)?;
    let lane = small_id("lane", &lane)?;
    let to_ms = query_num::<u64>(&q, "to_ms")?.unwrap_or_else(|| now_ms() + 1);
    let from_ms = query_num::<u64>(&q, "from_ms")?.unwrap_or(to_ms.saturating_sub(DEFAULT_SPAN_MS));
    if from_ms >= to_ms {
        return Err(ApiError::invalid("from_ms", "must be before to_ms"));
    }
    let limit = query_num::<i64>(&q, "limit")?.unwrap_or(1000);
    crate::registry::get_cabinet(&app, &id).await?;
    Ok(Json(weights::history(&app, &id, door, lane, from_ms, to_ms, limit).await?))
}
