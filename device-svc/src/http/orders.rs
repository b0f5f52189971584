//! Purchases over HTTP: orders for the shopping app, the payment provider's callback,
//! anomalies, restocks and restock orders for operators.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{JsonBody, query_num, small_id};
use crate::app::App;
use crate::purchases::anomalies::{self, Anomaly};
use crate::purchases::orders::{self, Authorisation, NewOrder, Order, Transition};
use crate::purchases::restock::{self, Restock};
use crate::purchases::settlement;

/// An order with its history.
#[derive(Debug, Serialize)]
pub(super) struct OrderView {
    #[serde(flatten)]
    order: Order,
    transitions: Vec<Transition>,
}

async fn view(app: &App, order: Order) -> Result<Json<OrderView>, ApiError> {
    let transitions = orders::transitions(app, &order.id).await?;
    Ok(Json(OrderView { order, transitions }))
}

/// `POST /v1/orders`: 201, or 409 `cabinet_offline` / `unpaid_order` / `door_busy`.
pub(super) async fn create(
    State(app): State<Arc<App>>,
    JsonBody(new): JsonBody<NewOrder>,
) -> Result<(StatusCode, Json<OrderView>), ApiError> {
    let order = orders::create(&app, &new).await?;
    Ok((StatusCode::CREATED, view(&app, order).await?))
}

/// `GET /v1/orders/{id}`
pub(super) async fn get(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<OrderView>, ApiError> {
    let order = orders::get(&app, &id).await?;
    view(&app, order).await
}

/// `POST /v1/payments/callback`: idempotent; 409 `order_cancelled` for a late authorisation.
pub(super) async fn payment_callback(
    State(app): State<Arc<App>>,
    JsonBody(a): JsonBody<Authorisation>,
) -> Result<Json<OrderView>, ApiError> {
    let order = orders::authorise(&app, &a).await?;
    view(&app, order).await
}

/// The body of `POST /v1/orders/{id}/settle`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OperatorSettlement {
    operator: String,
    items: Vec<settlement::Counted>,
}

/// `POST /v1/orders/{id}/settle`: an operator settles an order in review; 409 `not_abnormal`.
pub(super) async fn settle(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<OperatorSettlement>,
) -> Result<Json<OrderView>, ApiError> {
    let order = settlement::settle_by_operator(&app, &id, &body.operator, &body.items).await?;
    view(&app, order).await
}

/// `GET /v1/anomalies?order_id=&cabinet_id=&kind=&limit=`
pub(super) async fn list_anomalies(
    State(app): State<Arc<App>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<Anomaly>>, ApiError> {
    let limit = query_num::<i64>(&q, "limit")?.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit", "1..=1000"));
    }
    let list = anomalies::list(
        &app,
        q.get("order_id").map(String::as_str),
        q.get("cabinet_id").map(String::as_str),
        q.get("kind").map(String::as_str),
        limit,
    )
    .await?;
    Ok(Json(list))
}

/// `POST /v1/anomalies/{id}/resolve`: 204.
pub(super) async fn resolve_anomaly(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id: i64 = id.parse().map_err(|_| ApiError::invalid("id", format!("{id:?} is not a number")))?;
    anomalies::resolve(&app, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The body of `POST /v1/cabinets/{id}/doors/{door}/restocks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RestockBody {
    operator: String,
}

/// `POST /v1/cabinets/{id}/doors/{door}/restocks`: 201, or 409 `door_busy`.
pub(super) async fn start_restock(
    State(app): State<Arc<App>>,
    Path((id, door)): Path<(String, String)>,
    JsonBody(body): JsonBody<RestockBody>,
) -> Result<(StatusCode, Json<Restock>), ApiError> {
    let door = small_id("door", &door)?;
    Ok((StatusCode::CREATED, Json(restock::start(&app, &id, door, &body.operator).await?)))
}

/// `POST /v1/restocks/{id}/finish`
pub(super) async fn finish_restock(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Restock>, ApiError> {
    Ok(Json(restock::finish(&app, &id).await?))
}

/// `GET /v1/restock-orders?cabinet_id=`: the open ones.
pub(super) async fn restock_orders(
    State(app): State<Arc<App>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    Ok(Json(restock::open_orders(&app, q.get("cabinet_id").map(String::as_str)).await?))
}
