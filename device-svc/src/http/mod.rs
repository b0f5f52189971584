//! The admin HTTP API (JSON), `/metrics` and `/healthz`. `docs/api.md` lists every endpoint
//! with its request, answers and errors.
//!
//! Errors are JSON `{"error", "message", "field"?}`: 400 for bad input naming the field, 404
//! for an unknown id, 409 for a conflict, 503 when PostgreSQL or Redis cannot be reached.

mod devices;
mod error;
mod extract;
mod ops;
mod orders;
mod ota;
mod send;
mod vehicles;
mod weights;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post, put};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::ApiError;

use crate::app::App;

/// Every route of the API.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/metrics", get(ops::metrics))
        .route("/v1/alerts", get(ops::alerts))
        .route("/v1/products", post(devices::create_product))
        .route("/v1/products/{id}", get(devices::get_product))
        .route("/v1/cabinets", post(devices::create_cabinet))
        .route("/v1/cabinets/{id}", get(devices::get_cabinet))
        .route("/v1/cabinets/{id}/doors/{door}/lanes/{lane}", put(devices::configure_lane))
        .route("/v1/cabinets/{id}/weights", get(weights::current))
        .route("/v1/cabinets/{id}/doors/{door}/lanes/{lane}/readings", get(weights::history))
        .route("/v1/vehicles", post(devices::create_vehicle))
        .route("/v1/vehicles/{vin}", get(vehicles::get).patch(vehicles::update))
        .route("/v1/activations/{qr_id}", get(vehicles::get_activation))
        .route("/v1/activations/{qr_id}/scan", post(vehicles::scan))
        .route("/v1/activations/{qr_id}/confirm", post(vehicles::confirm))
        .route("/v1/activations/{qr_id}/cancel", post(vehicles::cancel))
        .route("/v1/ota/tasks", post(ota::create).get(ota::list))
        .route("/v1/ota/tasks/{id}", get(ota::get))
        .route("/v1/ota/tasks/{id}/vehicles", get(ota::vehicles))
        .route("/v1/ota/tasks/{id}/rejections", get(ota::rejections))
        .route("/v1/ota/tasks/{id}/failures", get(ota::failures))
        .route("/v1/ota/tasks/{id}/cancel", post(ota::cancel))
        .route("/v1/ota/lists/{list}", get(ota::list_entries))
        .route("/v1/ota/lists/{list}/{vin}", put(ota::add_to_list).delete(ota::remove_from_list))
        .route("/v1/devices/{key}", get(devices::get_device))
        .route("/v1/devices/{key}/history", get(devices::history))
        .route("/v1/devices/{key}/credentials", post(devices::rotate_credentials))
        .route("/v1/devices/{key}/enabled", put(devices::set_enabled))
        .route("/v1/devices/{key}/commands", post(send::send))
        .route("/v1/orders", post(orders::create))
        .route("/v1/orders/{id}", get(orders::get))
        .route("/v1/orders/{id}/settle", post(orders::settle))
        .route("/v1/payments/callback", post(orders::payment_callback))
        .route("/v1/anomalies", get(orders::list_anomalies))
        .route("/v1/anomalies/{id}/resolve", post(orders::resolve_anomaly))
        .route("/v1/cabinets/{id}/doors/{door}/restocks", post(orders::start_restock))
        .route("/v1/restocks/{id}/finish", post(orders::finish_restock))
        .route("/v1/restock-orders", get(orders::restock_orders))
        .with_state(app)
}

/// Serves the API on `listener` until `stop`.
pub async fn serve(listener: TcpListener, app: Arc<App>, stop: CancellationToken) {
    let result = axum::serve(listener, router(app)).with_graceful_shutdown(stop.cancelled_owned()).await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "HTTP API stopped");
    }
}
