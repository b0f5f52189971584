//! Purchases over HTTP: orders for the shopping app, the payment provider's signed callbacks
//! (authorisations, deduction contracts), and for operators: cancelling, force-closing and
//! settling orders, refunds, charges and waivers, anomalies, restocks and restock orders.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use protocol::payment;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{JsonBody, decode, query_num, require_json, small_id};
use super::guard::RequestId;
use crate::app::App;
use crate::auth::audit;
use crate::auth::{Principal, Role};
use crate::error::StoreError;
use crate::purchases::admin::{self, Decision, ForceClose};
use crate::purchases::anomalies::{self, Anomaly};
use crate::purchases::contracts::{self, Contract, ContractEvent};
use crate::purchases::money::{self, Adjustment, Payment, Waiver};
use crate::purchases::orders::{self, Authorisation, NewOrder, Order, Signed, Transition};
use crate::purchases::restock::{self, Restock};
use crate::purchases::{settlement, stocktake};

/// An order with its history and its money messages.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct OrderView {
    #[serde(flatten)]
    order: Order,
    transitions: Vec<Transition>,
    payments: Vec<Payment>,
}

async fn view(app: &App, order: Order) -> Result<Json<OrderView>, ApiError> {
    let transitions = orders::transitions(app, &order.id).await?;
    let payments = money::of_order(app, &order.id).await?;
    Ok(Json(OrderView { order, transitions, payments }))
}

/// `POST /v1/orders` (a `shop` key; the order belongs to the key's tenant): 201, or 409
/// `cabinet_offline` / `unpaid_order` / `door_busy`.
pub(super) async fn create(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Principal>,
    JsonBody(new): JsonBody<NewOrder>,
) -> Result<(StatusCode, Json<OrderView>), ApiError> {
    // The role table admits only shop keys here, and every shop key has a tenant.
    let tenant = caller.tenant.as_deref().ok_or_else(|| ApiError::forbidden("only a shop key creates orders"))?;
    let order = orders::create(&app, &new, tenant).await?;
    Ok((StatusCode::CREATED, view(&app, order).await?))
}

/// `GET /v1/orders/{id}`: a shop key sees its own tenant's orders only (another's is 404, as if
/// it did not exist).
pub(super) async fn get(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<OrderView>, ApiError> {
    let order = orders::get(&app, &id).await?;
    if caller.role == Role::Shop && order.tenant != caller.tenant {
        return Err(ApiError::not_found(format!("not found: order {id}")));
    }
    view(&app, order).await
}

/// `POST /v1/payments/callback`, authenticated by the provider's signature
/// (`protocol::payment`): refused with 401 (`unsigned`, `unknown_provider`, `stale`,
/// `bad_signature`) before the body is even parsed, 409 `replayed` / `amount_mismatch` /
/// `order_cancelled`; each refusal counted in `devsvc_payment_callbacks_total`.
pub(super) async fn payment_callback(
    State(app): State<Arc<App>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<OrderView>, ApiError> {
    let route = "/v1/payments/callback";
    let count = |result: &str| app.metrics.payment_callbacks.with_label_values(&[result]).inc();
    let (provider, signature, a) = signed_body::<Authorisation>(&app, &headers, &body, &count)?;
    let ctx = callback_context(request_id, &provider, route, &a.order_id);
    let outcome = audit::scope(
        Arc::clone(&ctx),
        orders::authorise(&app, &a, Signed { provider: &provider, signature: &signature }),
    )
    .await;
    match outcome {
        Ok(order) => {
            count(a.status.as_str());
            view(&app, order).await
        }
        Err(e) => Err(refused(&app, &ctx, e, &count).await),
    }
}

/// `POST /v1/contracts/callback`: the provider's deduction contract events, signed as the
/// payment callback is (the same 401 refusals; 409 `replayed`); an event older than the one
/// applied answers the contract as it is (`applied: false`). Counted in
/// `devsvc_payment_callbacks_total` (refusals) and `devsvc_contract_events_total`.
pub(super) async fn contract_callback(
    State(app): State<Arc<App>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Contract>, ApiError> {
    let route = "/v1/contracts/callback";
    let count = |result: &str| app.metrics.payment_callbacks.with_label_values(&[result]).inc();
    let (provider, signature, e) = signed_body::<ContractEvent>(&app, &headers, &body, &count)?;
    let ctx = callback_context(request_id, &provider, route, &format!("{}/{}", e.tenant, e.user_id));
    let outcome = audit::scope(
        Arc::clone(&ctx),
        contracts::apply(&app, &e, Signed { provider: &provider, signature: &signature }),
    )
    .await;
    match outcome {
        Ok(contract) => {
            count("contract");
            Ok(Json(contract))
        }
        Err(err) => Err(refused(&app, &ctx, err, &count).await),
    }
}

/// The provider, its matching signature and the parsed body of a signed callback; a refusal is
/// counted and answered 401 (signature) or 400 (body).
fn signed_body<T: serde::de::DeserializeOwned>(
    app: &App,
    headers: &HeaderMap,
    body: &[u8],
    count: &(dyn Fn(&str) + Sync),
) -> Result<(String, [u8; 32], T), ApiError> {
    let (provider, signature) = verify_signature(app, headers, body).map_err(|refusal| {
        count(refusal.reason());
        tracing::warn!(reason = refusal.reason(), "signed callback refused");
        ApiError::unauthorized(refusal.to_string())
    })?;
    let parsed = require_json(headers).and_then(|()| decode::<T>(body)).inspect_err(|_| count("invalid"))?;
    Ok((provider, signature, parsed))
}

fn callback_context(request_id: String, provider: &str, route: &str, target: &str) -> Arc<audit::Context> {
    Arc::new(audit::Context::new(
        request_id,
        format!("provider:{provider}"),
        "payment_provider",
        "POST".into(),
        route.into(),
        format!("{route}#{target}"),
    ))
}

/// Counts a callback the store refused and writes its audit row; the error to answer.
async fn refused(app: &App, ctx: &audit::Context, e: StoreError, count: &(dyn Fn(&str) + Sync)) -> ApiError {
    let code = match &e {
        StoreError::Rejected { code, .. } => code,
        StoreError::NotFound(_) => "not_found",
        StoreError::Invalid { .. } => "invalid",
        _ => "unavailable",
    };
    count(code);
    if let Err(write) = audit::record_outcome(app, ctx, code).await {
        tracing::warn!(error = %write, "failed to write an audit row");
    }
    e.into()
}

/// The provider and the matching signature of a callback, or why it is refused.
fn verify_signature(app: &App, headers: &HeaderMap, body: &[u8]) -> Result<(String, [u8; 32]), payment::Refusal> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let provider = text(payment::PROVIDER_HEADER).ok_or(payment::Refusal::Unsigned)?;
    let signature = payment::Signature::parse(text(payment::SIGNATURE_HEADER).ok_or(payment::Refusal::Unsigned)?)?;
    let secrets: Vec<&[u8]> =
        app.config.payments.providers.iter().filter(|p| p.name == provider).map(|p| p.secret.as_bytes()).collect();
    if secrets.is_empty() {
        return Err(payment::Refusal::UnknownProvider);
    }
    let now = crate::clock::now_ms() / 1000;
    let matched = signature.verify(&secrets, body, now, app.config.payments.tolerance_s)?;
    Ok((provider.to_owned(), matched))
}

/// The body of `POST /v1/orders/{id}/settle`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
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

/// `POST /v1/orders/{id}/cancel`: an order whose door was not asked to open; 409
/// `door_opening` / `not_cancellable`.
pub(super) async fn cancel(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<Decision>,
) -> Result<Json<OrderView>, ApiError> {
    let order = admin::cancel(&app, &id, &body).await?;
    view(&app, order).await
}

/// `POST /v1/orders/{id}/force-close`: an order whose door never reported closed, with the
/// door state the operator saw; 409 `not_open`.
pub(super) async fn force_close(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ForceClose>,
) -> Result<Json<OrderView>, ApiError> {
    let order = admin::force_close(&app, &id, &body).await?;
    view(&app, order).await
}

/// `GET /v1/anomalies?order_id=&cabinet_id=&kind=&resolved=&before_id=&limit=`: newest first.
pub(super) async fn list_anomalies(
    State(app): State<Arc<App>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<Anomaly>>, ApiError> {
    let limit = query_num::<i64>(&q, "limit")?.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit", "1..=1000"));
    }
    let resolved = match q.get("resolved").map(String::as_str) {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(other) => return Err(ApiError::invalid("resolved", format!("{other:?}: true or false"))),
    };
    let filter = anomalies::Filter {
        order_id: q.get("order_id").cloned(),
        cabinet_id: q.get("cabinet_id").cloned(),
        kind: q.get("kind").cloned(),
        resolved,
        before_id: query_num::<i64>(&q, "before_id")?,
    };
    Ok(Json(anomalies::list(&app, &filter, limit).await?))
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
#[derive(Debug, Deserialize, utoipa::ToSchema)]
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

/// The body of `POST /v1/restocks/{id}/finish` (optional): the restocker's count.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct FinishBody {
    #[serde(default)]
    lanes: Vec<stocktake::LaneCount>,
}

/// `POST /v1/restocks/{id}/finish`, with or without the restocker's count of each lane.
pub(super) async fn finish_restock(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Restock>, ApiError> {
    let counted = if body.is_empty() {
        FinishBody::default()
    } else {
        require_json(&headers)?;
        decode::<FinishBody>(&body)?
    };
    Ok(Json(restock::finish(&app, &id, &counted.lanes).await?))
}

/// `POST /v1/orders/{id}/refunds`: 201 with the refund (by `lines` or `amount_cents`); 409
/// `not_settled`, `not_paid`, `over_refund`, `key_reused`.
pub(super) async fn refund(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<Adjustment>,
) -> Result<(StatusCode, Json<Payment>), ApiError> {
    Ok((StatusCode::CREATED, Json(money::adjust(&app, &id, money::Kind::Refund, &body).await?)))
}

/// `POST /v1/orders/{id}/charges`: 201 with the extra charge; 409 `not_settled`, `key_reused`.
pub(super) async fn charge(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<Adjustment>,
) -> Result<(StatusCode, Json<Payment>), ApiError> {
    Ok((StatusCode::CREATED, Json(money::adjust(&app, &id, money::Kind::Charge, &body).await?)))
}

/// `POST /v1/orders/{id}/waive`: an operator's decision on an unpaid order; 409 `not_unpaid`.
pub(super) async fn waive(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<Waiver>,
) -> Result<Json<OrderView>, ApiError> {
    money::waive(&app, &id, &body).await?;
    view(&app, orders::get(&app, &id).await?).await
}

/// `GET /v1/restock-orders?cabinet_id=`: the open ones.
pub(super) async fn restock_orders(
    State(app): State<Arc<App>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    Ok(Json(restock::open_orders(&app, q.get("cabinet_id").map(String::as_str)).await?))
}
