//! The admin HTTP API (JSON), `/metrics` and `/healthz`. `docs/api.md` lists every endpoint
//! with its request, answers, errors and the roles that may call it. The route table below is
//! the one place that says who may call what: the router is built from it and the guard
//! ([`guard`]) enforces it.
//!
//! Errors are JSON `{"error", "message", "field"?}`: 400 for bad input naming the field, 404
//! for an unknown id, 409 for a conflict, 503 when PostgreSQL or Redis cannot be reached.

mod console;
mod devices;
mod error;
mod extract;
mod guard;
mod keys;
mod lists;
mod observe;
mod openapi;
mod ops;
mod orders;
mod ota;
mod ota_packages;
mod send;
mod vehicles;
mod weights;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::Method;
use axum::routing::{MethodRouter, delete, get, patch, post, put};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub use error::ApiError;
pub use guard::Access;

use crate::app::App;
use crate::auth::Role;
use guard::Guard;
use openapi::{Doc, any, list_of, of, page_of};

/// One route: method, path pattern, who may call it.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    /// HTTP method.
    pub method: Method,
    /// Path pattern as axum matches it (`/v1/orders/{id}`).
    pub path: &'static str,
    /// Who may call it.
    pub access: Access,
}

const OPERATOR: &[Role] = &[Role::Operator];
const READERS: &[Role] = &[Role::Operator, Role::Viewer];
const SCRAPERS: &[Role] = &[Role::Metrics, Role::Operator, Role::Viewer];
const SHOP: &[Role] = &[Role::Shop];
const ORDER_READERS: &[Role] = &[Role::Shop, Role::Operator, Role::Viewer];
const OWNER_APP: &[Role] = &[Role::OwnerApp];
const ACTIVATION_READERS: &[Role] = &[Role::OwnerApp, Role::Operator, Role::Viewer];
const ANYONE_KEYED: &[Role] = &Role::ALL;

/// The route table: every route with its roles, its description and its handler. The router
/// and the OpenAPI document are built from it, so a route cannot exist without an entry
/// (docs/api.md lists the same table).
fn table() -> Vec<(RouteSpec, Doc, MethodRouter<Arc<App>>)> {
    use crate::auth::audit::Entry;
    use crate::auth::keys::{IssuedKey, KeyInfo};
    use crate::dead_letters::DeadLetter;
    use crate::fleet::{CabinetRow, DeviceRow, VehicleRow};
    use crate::purchases::admin::{Decision, ForceClose};
    use crate::purchases::anomalies::Anomaly;
    use crate::purchases::contracts::{Contract, ContractEvent};
    use crate::purchases::money::{Adjustment, Payment, Waiver};
    use crate::purchases::orders::{Authorisation, NewOrder, Order};
    use crate::purchases::restock::Restock;
    use crate::registry::{Cabinet, DeviceView, HistoryEntry, Issued, LaneConfig, NewCabinet, Product};
    use crate::vehicles::activation::ActivationView;
    use crate::vehicles::ota::lists::ListEntry;
    use crate::vehicles::ota::packages::Package;
    use crate::vehicles::ota::tasks::{Created, Failure, NewTask, Rejection, Task, TaskVehicle};
    use crate::vehicles::profile::{NewVehicle, Profile, VehicleView};
    use crate::weights::Reading;
    use Access::{PaymentProvider, Public, Roles, VehicleUrl};
    let r = |method: Method, path: &'static str, access: Access, doc: Doc, handler: MethodRouter<Arc<App>>| {
        (RouteSpec { method, path, access }, doc, handler)
    };
    let (get_, post_, put_, patch_, delete_) = (Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE);
    const BUSY: &[&str] = &["door_busy"];
    vec![
        r(get_.clone(), "/healthz", Public, Doc::new("Whether PostgreSQL and Redis answer"), get(ops::healthz)),
        r(get_.clone(), "/metrics", Roles(SCRAPERS), Doc::new("Prometheus metrics"), get(ops::metrics)),
        r(
            get_.clone(),
            "/v1/openapi.json",
            Roles(ANYONE_KEYED),
            Doc::new("This document").answer(any),
            get(openapi_json),
        ),
        r(
            get_.clone(),
            "/v1/alerts",
            Roles(READERS),
            Doc::new("Open service alerts").answer(list_of::<ops::Alert>),
            get(ops::alerts),
        ),
        r(
            get_.clone(),
            "/v1/dead-letters",
            Roles(READERS),
            Doc::new("Upstream entries set aside").query(&["open", "before_id", "limit"]).answer(list_of::<DeadLetter>),
            get(ops::dead_letters),
        ),
        r(
            post_.clone(),
            "/v1/dead-letters/{id}/replay",
            Roles(OPERATOR),
            Doc::new("Append a dead letter to its stream again").answer(any).conflicts(&["already_replayed"]),
            post(ops::replay_dead_letter),
        ),
        r(
            post_.clone(),
            "/v1/keys",
            Roles(OPERATOR),
            Doc::new("Create an API key (shown once)").body(of::<keys::NewKeyBody>).created(of::<IssuedKey>),
            post(keys::create),
        ),
        r(
            get_.clone(),
            "/v1/keys",
            Roles(OPERATOR),
            Doc::new("Every API key").answer(list_of::<KeyInfo>),
            get(keys::list),
        ),
        r(
            post_.clone(),
            "/v1/keys/{id}/revoke",
            Roles(OPERATOR),
            Doc::new("Revoke an API key").answer(of::<KeyInfo>).conflicts(&["own_key"]),
            post(keys::revoke),
        ),
        r(
            get_.clone(),
            "/v1/audit",
            Roles(OPERATOR),
            Doc::new("The audit trail, newest first")
                .query(&["principal", "route", "target", "outcome", "since_ms", "before_id", "limit"])
                .answer(list_of::<Entry>),
            get(keys::audit),
        ),
        r(
            post_.clone(),
            "/v1/products",
            Roles(OPERATOR),
            Doc::new("Register a product").body(of::<Product>).created(of::<Product>).conflicts(&["conflict"]),
            post(devices::create_product),
        ),
        r(
            get_.clone(),
            "/v1/products/{id}",
            Roles(READERS),
            Doc::new("A product").answer(of::<Product>),
            get(devices::get_product),
        ),
        r(
            post_.clone(),
            "/v1/cabinets",
            Roles(OPERATOR),
            Doc::new("Register a cabinet (its key shown once)")
                .body(of::<NewCabinet>)
                .created(of::<Issued>)
                .conflicts(&["conflict"]),
            post(devices::create_cabinet),
        ),
        r(
            get_.clone(),
            "/v1/cabinets",
            Roles(READERS),
            Doc::new("Cabinets with doors and lanes, by id")
                .query(&["q", "status", "limit", "cursor"])
                .answer(page_of::<CabinetRow>),
            get(lists::cabinets),
        ),
        r(
            get_.clone(),
            "/v1/cabinets/{id}",
            Roles(READERS),
            Doc::new("A cabinet's configuration").answer(of::<Cabinet>),
            get(devices::get_cabinet),
        ),
        r(
            put_.clone(),
            "/v1/cabinets/{id}/doors/{door}/lanes/{lane}",
            Roles(OPERATOR),
            Doc::new("Configure a lane (product, price, restock threshold)")
                .body(of::<devices::LaneBody>)
                .answer(of::<LaneConfig>)
                .conflicts(BUSY),
            put(devices::configure_lane),
        ),
        r(
            get_.clone(),
            "/v1/cabinets/{id}/weights",
            Roles(READERS),
            Doc::new("Current stable lane weights").answer(of::<weights::Current>),
            get(weights::current),
        ),
        r(
            get_.clone(),
            "/v1/cabinets/{id}/doors/{door}/lanes/{lane}/readings",
            Roles(READERS),
            Doc::new("A lane's readings in a time range")
                .query(&["from_ms", "to_ms", "limit"])
                .answer(list_of::<Reading>),
            get(weights::history),
        ),
        r(
            post_.clone(),
            "/v1/vehicles",
            Roles(OPERATOR),
            Doc::new("Register a vehicle (its token shown once)")
                .body(of::<NewVehicle>)
                .created(of::<Issued>)
                .conflicts(&["conflict"]),
            post(devices::create_vehicle),
        ),
        r(
            get_.clone(),
            "/v1/vehicles",
            Roles(READERS),
            Doc::new("Vehicles by VIN")
                .query(&["q", "state", "sw_version", "owner", "limit", "cursor"])
                .answer(page_of::<VehicleRow>),
            get(lists::vehicles),
        ),
        r(
            get_.clone(),
            "/v1/vehicles/{vin}",
            Roles(READERS),
            Doc::new("A vehicle").answer(of::<VehicleView>),
            get(vehicles::get),
        ),
        r(
            patch_.clone(),
            "/v1/vehicles/{vin}",
            Roles(OPERATOR),
            Doc::new("Change a vehicle's profile").body(of::<Profile>).answer(of::<VehicleView>),
            patch(vehicles::update),
        ),
        r(
            get_.clone(),
            "/v1/activations/{qr_id}",
            Roles(ACTIVATION_READERS),
            Doc::new("An activation by its QR id").answer(of::<ActivationView>),
            get(vehicles::get_activation),
        ),
        r(
            post_.clone(),
            "/v1/activations/{qr_id}/scan",
            Roles(OWNER_APP),
            Doc::new("The owner scanned the QR code")
                .body(of::<vehicles::Owner>)
                .answer(of::<ActivationView>)
                .conflicts(ACTIVATION),
            post(vehicles::scan),
        ),
        r(
            post_.clone(),
            "/v1/activations/{qr_id}/confirm",
            Roles(OWNER_APP),
            Doc::new("The owner confirmed")
                .body(of::<vehicles::Owner>)
                .answer(of::<ActivationView>)
                .conflicts(ACTIVATION),
            post(vehicles::confirm),
        ),
        r(
            post_.clone(),
            "/v1/activations/{qr_id}/cancel",
            Roles(OWNER_APP),
            Doc::new("The owner cancelled")
                .body(of::<vehicles::Owner>)
                .answer(of::<ActivationView>)
                .conflicts(ACTIVATION),
            post(vehicles::cancel),
        ),
        r(
            post_.clone(),
            "/v1/ota/tasks",
            Roles(OPERATOR),
            Doc::new("Create an OTA task (validated before anything is pushed)")
                .body(of::<NewTask>)
                .created(of::<Created>),
            post(ota::create),
        ),
        r(
            get_.clone(),
            "/v1/ota/tasks",
            Roles(READERS),
            Doc::new("OTA tasks, newest first").query(&["limit"]).answer(list_of::<Task>),
            get(ota::list),
        ),
        r(
            get_.clone(),
            "/v1/ota/tasks/{id}",
            Roles(READERS),
            Doc::new("An OTA task and its progress").answer(of::<Task>),
            get(ota::get),
        ),
        r(
            get_.clone(),
            "/v1/ota/tasks/{id}/vehicles",
            Roles(READERS),
            Doc::new("A task's vehicles and their states, by VIN")
                .query(&["state", "after_vin", "limit"])
                .answer(list_of::<TaskVehicle>),
            get(ota::vehicles),
        ),
        r(
            get_.clone(),
            "/v1/ota/tasks/{id}/rejections",
            Roles(READERS),
            Doc::new("Vehicles refused at validation, with reasons").answer(list_of::<Rejection>),
            get(ota::rejections),
        ),
        r(
            get_.clone(),
            "/v1/ota/tasks/{id}/failures",
            Roles(READERS),
            Doc::new("Failed upgrades with ECU and error").answer(list_of::<Failure>),
            get(ota::failures),
        ),
        r(
            post_.clone(),
            "/v1/ota/tasks/{id}/cancel",
            Roles(OPERATOR),
            Doc::new("Cancel a task").answer(of::<Task>).conflicts(&["task_finished"]),
            post(ota::cancel),
        ),
        r(
            post_.clone(),
            "/v1/ota/tasks/{id}/pause",
            Roles(OPERATOR),
            Doc::new("Pause a task: nothing new is pushed").answer(of::<Task>).conflicts(&["not_running"]),
            post(ota::pause),
        ),
        r(
            post_.clone(),
            "/v1/ota/tasks/{id}/resume",
            Roles(OPERATOR),
            Doc::new("Resume a paused task (after an automatic pause: the next wave)")
                .answer(of::<Task>)
                .conflicts(&["not_paused"]),
            post(ota::resume),
        ),
        r(
            get_.clone(),
            "/v1/ota/packages",
            Roles(READERS),
            Doc::new("Stored OTA packages, newest first").query(&["version", "limit"]).answer(list_of::<Package>),
            get(ota_packages::list),
        ),
        r(
            put_.clone(),
            "/v1/ota/packages/{id}",
            Roles(OPERATOR),
            Doc::new("Upload a package (the body, with Content-Length): sealed, digest-checked, signed")
                .query(&["version", "kind", "from_version", "sha256", "created_by"])
                .created(of::<Package>)
                .conflicts(&["package_exists", "delta_exists"]),
            put(ota_packages::upload),
        ),
        r(
            get_.clone(),
            "/v1/ota/packages/{id}",
            Roles(READERS),
            Doc::new("A stored package").answer(of::<Package>),
            get(ota_packages::get),
        ),
        r(
            delete_.clone(),
            "/v1/ota/packages/{id}",
            Roles(OPERATOR),
            Doc::new("Remove a package no task refers to").no_content().conflicts(&["package_in_use"]),
            delete(ota_packages::delete),
        ),
        r(
            post_.clone(),
            "/v1/ota/packages/rewrap",
            Roles(OPERATOR),
            Doc::new("Wrap every package's data key under the current master key")
                .answer(of::<ota_packages::Rewrapped>),
            post(ota_packages::rewrap),
        ),
        r(
            get_.clone(),
            "/v1/ota/packages/{id}/download",
            VehicleUrl,
            Doc::new("A vehicle downloads a package (the signed URL of its notice; HTTP Range)")
                .query(&["vin", "task", "exp", "k", "sig"]),
            get(ota_packages::download),
        ),
        r(
            get_.clone(),
            "/v1/ota/signing-key",
            Public,
            Doc::new("The platform's Ed25519 package-signing public key").answer(of::<ota_packages::SigningKey>),
            get(ota_packages::signing_key),
        ),
        r(
            get_.clone(),
            "/v1/ota/lists/{list}",
            Roles(READERS),
            Doc::new("A VIN list").answer(list_of::<ListEntry>),
            get(ota::list_entries),
        ),
        r(
            put_.clone(),
            "/v1/ota/lists/{list}/{vin}",
            Roles(OPERATOR),
            Doc::new("Add a VIN to a list").body(of::<ota::Note>).no_content(),
            put(ota::add_to_list),
        ),
        r(
            delete_.clone(),
            "/v1/ota/lists/{list}/{vin}",
            Roles(OPERATOR),
            Doc::new("Remove a VIN from a list").no_content(),
            delete(ota::remove_from_list),
        ),
        r(
            get_.clone(),
            "/v1/devices",
            Roles(READERS),
            Doc::new("Devices by key or last change")
                .query(&[
                    "kind",
                    "status",
                    "node",
                    "enabled",
                    "q",
                    "changed_from_ms",
                    "changed_before_ms",
                    "sort",
                    "limit",
                    "cursor",
                ])
                .answer(page_of::<DeviceRow>),
            get(lists::devices),
        ),
        r(
            get_.clone(),
            "/v1/devices/{key}",
            Roles(READERS),
            Doc::new("A device's status").answer(of::<DeviceView>),
            get(devices::get_device),
        ),
        r(
            get_.clone(),
            "/v1/devices/{key}/history",
            Roles(READERS),
            Doc::new("A device's status changes, newest first").query(&["limit"]).answer(list_of::<HistoryEntry>),
            get(devices::history),
        ),
        r(
            post_.clone(),
            "/v1/devices/{key}/credentials",
            Roles(OPERATOR),
            Doc::new("Issue new credentials (shown once); the old stop working").answer(of::<Issued>),
            post(devices::rotate_credentials),
        ),
        r(
            put_.clone(),
            "/v1/devices/{key}/enabled",
            Roles(OPERATOR),
            Doc::new("Enable or disable a device's credentials").body(of::<devices::Enabled>).no_content(),
            put(devices::set_enabled),
        ),
        r(
            post_.clone(),
            "/v1/devices/{key}/commands",
            Roles(OPERATOR),
            Doc::new("Send a command and wait for the device's result")
                .body(of::<send::CommandInput>)
                .answer(of::<send::Answer>),
            post(send::send),
        ),
        r(
            post_.clone(),
            "/v1/orders",
            Roles(SHOP),
            Doc::new("Create an order").body(of::<NewOrder>).created(of::<orders::OrderView>).conflicts(&[
                "cabinet_offline",
                "door_out_of_sale",
                "door_busy",
                "unpaid_order",
                "no_active_contract",
                "idempotency_key_reused",
            ]),
            post(orders::create),
        ),
        r(
            get_.clone(),
            "/v1/orders",
            Roles(READERS),
            Doc::new("Orders, newest first")
                .query(&["state", "cabinet_id", "user_id", "payment", "review", "from_ms", "to_ms", "limit", "cursor"])
                .answer(page_of::<Order>),
            get(lists::orders),
        ),
        r(
            get_.clone(),
            "/v1/orders/{id}",
            Roles(ORDER_READERS),
            Doc::new("An order with its transitions and payments").answer(of::<orders::OrderView>),
            get(orders::get),
        ),
        r(
            post_.clone(),
            "/v1/orders/{id}/cancel",
            Roles(OPERATOR),
            Doc::new("Cancel an order whose door was not asked to open")
                .body(of::<Decision>)
                .answer(of::<orders::OrderView>)
                .conflicts(&["door_opening", "not_cancellable"]),
            post(orders::cancel),
        ),
        r(
            post_.clone(),
            "/v1/orders/{id}/force-close",
            Roles(OPERATOR),
            Doc::new("End an order whose door never reported closed, with the door state seen")
                .body(of::<ForceClose>)
                .answer(of::<orders::OrderView>)
                .conflicts(&["not_open"]),
            post(orders::force_close),
        ),
        r(
            post_.clone(),
            "/v1/orders/{id}/settle",
            Roles(OPERATOR),
            Doc::new("Settle an order in review with counted items")
                .body(of::<orders::OperatorSettlement>)
                .answer(of::<orders::OrderView>)
                .conflicts(&["not_abnormal"]),
            post(orders::settle),
        ),
        r(
            post_.clone(),
            "/v1/orders/{id}/refunds",
            Roles(OPERATOR),
            Doc::new("Refund a settled order, by items or amount")
                .body(of::<Adjustment>)
                .created(of::<Payment>)
                .conflicts(&["not_settled", "not_paid", "over_refund", "key_reused"]),
            post(orders::refund),
        ),
        r(
            post_.clone(),
            "/v1/orders/{id}/charges",
            Roles(OPERATOR),
            Doc::new("Add a charge to a settled order")
                .body(of::<Adjustment>)
                .created(of::<Payment>)
                .conflicts(&["not_settled", "key_reused"]),
            post(orders::charge),
        ),
        r(
            post_.clone(),
            "/v1/orders/{id}/waive",
            Roles(OPERATOR),
            Doc::new("Decide an unpaid order: its failed charges are waived")
                .body(of::<Waiver>)
                .answer(of::<orders::OrderView>)
                .conflicts(&["not_unpaid"]),
            post(orders::waive),
        ),
        r(
            post_.clone(),
            "/v1/payments/callback",
            PaymentProvider,
            Doc::new("The payment provider's signed authorisation")
                .body(of::<Authorisation>)
                .answer(of::<orders::OrderView>)
                .conflicts(&["replayed", "amount_mismatch", "order_cancelled"]),
            post(orders::payment_callback),
        ),
        r(
            post_.clone(),
            "/v1/contracts/callback",
            PaymentProvider,
            Doc::new("The payment provider's signed deduction-contract event")
                .body(of::<ContractEvent>)
                .answer(of::<Contract>)
                .conflicts(&["replayed"]),
            post(orders::contract_callback),
        ),
        r(
            get_.clone(),
            "/v1/anomalies",
            Roles(READERS),
            Doc::new("Anomalies, newest first")
                .query(&["order_id", "cabinet_id", "kind", "limit"])
                .answer(list_of::<Anomaly>),
            get(orders::list_anomalies),
        ),
        r(
            post_.clone(),
            "/v1/anomalies/{id}/resolve",
            Roles(OPERATOR),
            Doc::new("Close an anomaly").no_content(),
            post(orders::resolve_anomaly),
        ),
        r(
            post_.clone(),
            "/v1/cabinets/{id}/doors/{door}/restocks",
            Roles(OPERATOR),
            Doc::new("Start a restock of a door")
                .body(of::<orders::RestockBody>)
                .created(of::<Restock>)
                .conflicts(BUSY),
            post(orders::start_restock),
        ),
        r(
            post_.clone(),
            "/v1/restocks/{id}/finish",
            Roles(OPERATOR),
            Doc::new("Finish a restock, with the restocker's count")
                .body(of::<orders::FinishBody>)
                .answer(of::<Restock>),
            post(orders::finish_restock),
        ),
        r(
            get_,
            "/v1/restock-orders",
            Roles(READERS),
            Doc::new("Open restock orders").query(&["cabinet_id"]).answer(any),
            get(orders::restock_orders),
        ),
    ]
}

/// The 409 codes of the activation steps.
const ACTIVATION: &[&str] = &[
    "not_the_buyer",
    "no_buyer",
    "already_activated",
    "already_scanned",
    "not_scanned",
    "expired",
    "cancelled",
    "already_reported",
];

/// `GET /v1/openapi.json`: the document generated from [`table`].
async fn openapi_json() -> axum::Json<serde_json::Value> {
    axum::Json(openapi())
}

/// The OpenAPI 3.1 document of every route.
pub fn openapi() -> serde_json::Value {
    let routes: Vec<(RouteSpec, Doc)> = table().into_iter().map(|(spec, doc, _)| (spec, doc)).collect();
    openapi::document(&routes)
}

/// Every route with who may call it (for the route-table test and the docs).
pub fn routes() -> Vec<RouteSpec> {
    table().into_iter().map(|(spec, _, _)| spec).collect()
}

/// Routes whose bodies stream (package upload and download): outside the request timeout,
/// bounded by `ota.packages.*` and `ota.downloads.*` instead.
const STREAMING: &[&str] = &["/v1/ota/packages/{id}", "/v1/ota/packages/{id}/download"];

/// Every route of the API, each behind the guard (authentication, the role table, the rate
/// limit, the audit context), with the body limit, the request timeout and the request
/// metrics around them all.
pub fn router(app: Arc<App>) -> Router {
    let (mut router, mut streaming) = (Router::new(), Router::new());
    let mut access = HashMap::new();
    for (spec, _, handler) in table() {
        access.insert((spec.method.clone(), spec.path), spec.access);
        if STREAMING.contains(&spec.path) {
            streaming = streaming.route(spec.path, handler);
        } else {
            router = router.route(spec.path, handler);
        }
    }
    let guard = Arc::new(Guard::new(Arc::clone(&app), access));
    let (max_body, timeout) = (app.config.http.max_body_bytes, app.config.http.request_timeout_ms);
    let streaming = streaming.route_layer(axum::middleware::from_fn_with_state(Arc::clone(&guard), guard::guard));
    router
        .route_layer(axum::middleware::from_fn_with_state(guard, guard::guard))
        // The console signs its users in with a session of its own (not the API key guard).
        .merge(console::router())
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(timeout),
        ))
        // Package uploads and downloads stream: bounded by their own limits, not the timeout.
        .merge(streaming)
        .layer(axum::middleware::from_fn(refuse_nul))
        // Outermost, so refusals (401, 403, 429, 400 NUL, 408, 413) are counted with the rest.
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&app), observe::record))
        .with_state(app)
}

/// Refuses a path or query holding a NUL (`%00`: a request line cannot carry a raw one) before
/// any handler passes it to PostgreSQL, which would refuse it as an error that looks like an
/// outage.
async fn refuse_nul(request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    use axum::response::IntoResponse;
    let uri = request.uri();
    let has_nul = |s: &str| s.as_bytes().windows(3).any(|w| w.eq_ignore_ascii_case(b"%00"));
    if has_nul(uri.path()) {
        return ApiError::invalid("path", "must not contain NUL (%00)").into_response();
    }
    if uri.query().is_some_and(has_nul) {
        return ApiError::invalid("query", "must not contain NUL (%00)").into_response();
    }
    next.run(request).await
}

/// Serves the API on `listener` until `stop`, over TLS when `tls` is given, bounded against
/// hostile clients: at most `http.max_connections` connections (more wait in the backlog, so
/// idle sockets cannot take the process to its file limit and `/healthz` keeps answering), the
/// TLS handshake and a request head (and the idle time before the next one on a kept-alive
/// connection) each within `http.header_timeout_ms`, a whole request within
/// `http.request_timeout_ms` (408), bodies up to `http.max_body_bytes`. On `stop` no new
/// connection is taken and those open finish their requests (10 s at most).
pub async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, app: Arc<App>, stop: CancellationToken) {
    let cfg = app.config.http.clone();
    let metrics = app.metrics.clone();
    let service = router(app);
    let header_timeout = Duration::from_millis(cfg.header_timeout_ms);
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let limit = Arc::new(Semaphore::new(cfg.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&limit).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = stop.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Per-connection failures (reset before accept) are the peer's; anything
                    // else (EMFILE) gets a pause rather than a spin.
                    if !matches!(e.kind(), std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset) {
                        tracing::warn!(error = %e, "failed to accept an API connection");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let (http1, service, watcher, tls) = (http1.clone(), service.clone(), graceful.watcher(), tls.clone());
        let open = metrics.http_connections_open.clone();
        open.inc();
        tokio::spawn(async move {
            // A peer that goes away, fails its handshake or times out ends its connection;
            // nothing to report.
            match tls {
                None => {
                    let conn = http1.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
                    let _ = watcher.watch(conn).await;
                }
                Some(tls) => {
                    if let Ok(Ok(stream)) = tokio::time::timeout(header_timeout, tls.accept(stream)).await {
                        let conn = http1.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
                        let _ = watcher.watch(conn).await;
                    }
                }
            }
            open.dec();
            drop(permit);
        });
    }
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await.is_err() {
        tracing::warn!("API connections still open after 10 s; closing them");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/api.md's route table, as `(method path, roles)` lines.
    fn documented() -> Vec<(String, String)> {
        let doc = include_str!("../../../docs/api.md");
        let table = doc
            .split("<!-- route-table: begin -->")
            .nth(1)
            .and_then(|rest| rest.split("<!-- route-table: end -->").next())
            .expect("docs/api.md has the route table");
        table
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let route = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
                Some((route.to_owned(), (*cells.get(2)?).to_owned()))
            })
            .collect()
    }

    fn roles_text(access: Access) -> String {
        match access {
            Access::Public => "anyone".into(),
            Access::PaymentProvider => "the payment provider's signature".into(),
            Access::VehicleUrl => "the vehicle's signed URL".into(),
            Access::Roles(roles) => roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", "),
        }
    }

    #[test]
    fn the_documented_route_table_is_the_one_served() {
        let served: Vec<(String, String)> =
            routes().into_iter().map(|r| (format!("{} {}", r.method, r.path), roles_text(r.access))).collect();
        assert_eq!(documented(), served, "docs/api.md's route table and http::table() must agree, in order");
    }
}
