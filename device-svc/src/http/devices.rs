//! Registry endpoints: products, cabinets and lanes, vehicles, device status and credentials.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{JsonBody, device_key, query_num, small_id};
use crate::app::App;
use crate::registry::{self, Cabinet, DeviceView, HistoryEntry, Issued, LaneConfig, NewCabinet, Product};

type Answer<T> = Result<T, ApiError>;

pub(super) async fn create_product(
    State(app): State<Arc<App>>,
    JsonBody(p): JsonBody<Product>,
) -> Answer<(StatusCode, Json<Product>)> {
    registry::create_product(&app, &p).await?;
    Ok((StatusCode::CREATED, Json(p)))
}

pub(super) async fn get_product(State(app): State<Arc<App>>, Path(id): Path<String>) -> Answer<Json<Product>> {
    Ok(Json(registry::get_product(&app, &id).await?))
}

pub(super) async fn create_cabinet(
    State(app): State<Arc<App>>,
    JsonBody(c): JsonBody<NewCabinet>,
) -> Answer<(StatusCode, Json<Issued>)> {
    Ok((StatusCode::CREATED, Json(registry::create_cabinet(&app, &c).await?)))
}

pub(super) async fn get_cabinet(State(app): State<Arc<App>>, Path(id): Path<String>) -> Answer<Json<Cabinet>> {
    Ok(Json(registry::get_cabinet(&app, &id).await?))
}

/// The body of `PUT .../lanes/{lane}`: the lane id comes from the path.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct LaneBody {
    #[serde(default)]
    product_id: Option<String>,
    #[serde(default)]
    restock_threshold: i32,
    #[serde(default)]
    price_cents: Option<i64>,
}

/// Under the door's lock: 409 `door_busy` while an order or a restock runs there.
pub(super) async fn configure_lane(
    State(app): State<Arc<App>>,
    Path((id, door, lane)): Path<(String, String, String)>,
    JsonBody(body): JsonBody<LaneBody>,
) -> Answer<Json<LaneConfig>> {
    let door = small_id("door", &door)?;
    let lane = LaneConfig {
        lane_id: small_id("lane", &lane)?,
        product_id: body.product_id,
        restock_threshold: body.restock_threshold,
        price_cents: body.price_cents,
    };
    crate::purchases::restock::configure_lane(&app, &id, door, &lane).await?;
    Ok(Json(lane))
}

pub(super) async fn create_vehicle(
    State(app): State<Arc<App>>,
    JsonBody(v): JsonBody<crate::vehicles::profile::NewVehicle>,
) -> Answer<(StatusCode, Json<Issued>)> {
    Ok((StatusCode::CREATED, Json(registry::create_vehicle(&app, &v).await?)))
}

pub(super) async fn get_device(State(app): State<Arc<App>>, Path(key): Path<String>) -> Answer<Json<DeviceView>> {
    Ok(Json(registry::get_device(&app, &device_key(&key)?).await?))
}

pub(super) async fn history(
    State(app): State<Arc<App>>,
    Path(key): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Answer<Json<Vec<HistoryEntry>>> {
    let limit = query_num::<i64>(&q, "limit")?.unwrap_or(100);
    Ok(Json(registry::history(&app, &device_key(&key)?, limit).await?))
}

pub(super) async fn rotate_credentials(State(app): State<Arc<App>>, Path(key): Path<String>) -> Answer<Json<Issued>> {
    Ok(Json(registry::rotate_credentials(&app, &device_key(&key)?).await?))
}

/// The body of `PUT /v1/devices/{key}/enabled`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Enabled {
    enabled: bool,
}

pub(super) async fn set_enabled(
    State(app): State<Arc<App>>,
    Path(key): Path<String>,
    JsonBody(body): JsonBody<Enabled>,
) -> Answer<StatusCode> {
    registry::set_enabled(&app, &device_key(&key)?, body.enabled).await?;
    Ok(StatusCode::NO_CONTENT)
}
