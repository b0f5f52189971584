//! OTA endpoints for operators: tasks (create with validation, read, vehicles, refusals,
//! failures, cancel) and the blacklist and whitelists.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{JsonBody, query_num};
use crate::app::App;
use crate::vehicles::ota::lists::{self, ListEntry};
use crate::vehicles::ota::rollout;
use crate::vehicles::ota::tasks::{self, Created, NewTask, Rejection, Task, TaskVehicle};

type Answer<T> = Result<T, ApiError>;

/// `POST /v1/ota/tasks`: 201 with the accepted and refused VINs.
pub(super) async fn create(
    State(app): State<Arc<App>>,
    JsonBody(t): JsonBody<NewTask>,
) -> Answer<(StatusCode, Json<Created>)> {
    let created = tasks::create(&app, &t).await?;
    app.ota_waker.notify_one();
    Ok((StatusCode::CREATED, Json(created)))
}

/// `GET /v1/ota/tasks?limit=`
pub(super) async fn list(
    State(app): State<Arc<App>>,
    Query(q): Query<HashMap<String, String>>,
) -> Answer<Json<Vec<Task>>> {
    let limit = query_num::<i64>(&q, "limit")?.unwrap_or(100);
    Ok(Json(tasks::list(&app, limit).await?))
}

/// `GET /v1/ota/tasks/{id}`: the task with its vehicles counted by state.
pub(super) async fn get(State(app): State<Arc<App>>, Path(id): Path<String>) -> Answer<Json<Task>> {
    Ok(Json(tasks::get(&app, &id).await?))
}

/// `GET /v1/ota/tasks/{id}/vehicles?state=`
pub(super) async fn vehicles(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Answer<Json<Vec<TaskVehicle>>> {
    // Without a limit every vehicle of the task (at most 10,000, the most a task holds).
    let limit = query_num::<i64>(&q, "limit")?.unwrap_or(10_000);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::invalid("limit", "1..=10000"));
    }
    let (state, after) = (q.get("state").map(String::as_str), q.get("after_vin").map(String::as_str));
    Ok(Json(tasks::vehicles(&app, &id, state, after, limit).await?))
}

/// `GET /v1/ota/tasks/{id}/rejections`
pub(super) async fn rejections(State(app): State<Arc<App>>, Path(id): Path<String>) -> Answer<Json<Vec<Rejection>>> {
    Ok(Json(tasks::rejections(&app, &id).await?))
}

/// `GET /v1/ota/tasks/{id}/failures`
pub(super) async fn failures(State(app): State<Arc<App>>, Path(id): Path<String>) -> Answer<Json<Vec<tasks::Failure>>> {
    Ok(Json(tasks::failures(&app, &id).await?))
}

/// `POST /v1/ota/tasks/{id}/cancel`: 409 `task_finished`.
pub(super) async fn cancel(State(app): State<Arc<App>>, Path(id): Path<String>) -> Answer<Json<Task>> {
    Ok(Json(tasks::cancel(&app, &id).await?))
}

/// `POST /v1/ota/tasks/{id}/pause`
pub(super) async fn pause(State(app): State<Arc<App>>, Path(id): Path<String>) -> Answer<Json<Task>> {
    rollout::pause(&app, &id).await?;
    Ok(Json(tasks::get(&app, &id).await?))
}

/// `POST /v1/ota/tasks/{id}/resume`
pub(super) async fn resume(State(app): State<Arc<App>>, Path(id): Path<String>) -> Answer<Json<Task>> {
    rollout::resume(&app, &id).await?;
    Ok(Json(tasks::get(&app, &id).await?))
}

/// `GET /v1/ota/lists/{list}`
pub(super) async fn list_entries(
    State(app): State<Arc<App>>,
    Path(list): Path<String>,
) -> Answer<Json<Vec<ListEntry>>> {
    Ok(Json(lists::entries(&app, &list).await?))
}

/// The body of `PUT /v1/ota/lists/{list}/{vin}`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Note {
    #[serde(default)]
    note: String,
}

/// `PUT /v1/ota/lists/{list}/{vin}`: 204.
pub(super) async fn add_to_list(
    State(app): State<Arc<App>>,
    Path((list, vin)): Path<(String, String)>,
    JsonBody(n): JsonBody<Note>,
) -> Answer<StatusCode> {
    lists::add(&app, &list, &vin, &n.note).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /v1/ota/lists/{list}/{vin}`: 204.
pub(super) async fn remove_from_list(
    State(app): State<Arc<App>>,
    Path((list, vin)): Path<(String, String)>,
) -> Answer<StatusCode> {
    lists::remove(&app, &list, &vin).await?;
    Ok(StatusCode::NO_CONTENT)
}
