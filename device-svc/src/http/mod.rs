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
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post, put};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
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
        .layer(axum::middleware::from_fn(refuse_nul))
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

/// Serves the API on `listener` until `stop`, bounded against hostile clients: at most
/// `http.max_connections` connections (more wait in the backlog, so idle sockets cannot take
/// the process to its file limit and `/healthz` keeps answering), a request head (and the idle
/// time before the next one on a kept-alive connection) within `http.header_timeout_ms`, a whole
/// request within `http.request_timeout_ms` (408), bodies up to `http.max_body_bytes`. On `stop`
/// no new connection is taken and those open finish their requests (10 s at most).
pub async fn serve(listener: TcpListener, app: Arc<App>, stop: CancellationToken) {
    let cfg = app.config.http.clone();
    let metrics = app.metrics.clone();
    let service = router(app).layer(axum::extract::DefaultBodyLimit::max(cfg.max_body_bytes)).layer(
        tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(cfg.request_timeout_ms),
        ),
    );
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1.timer(TokioTimer::new()).header_read_timeout(Duration::from_millis(cfg.header_timeout_ms));
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
        let conn = http1.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service.clone()));
        let conn = graceful.watch(conn);
        let open = metrics.http_connections_open.clone();
        open.inc();
        tokio::spawn(async move {
            // A peer that goes away or times out ends its connection; nothing to report.
            let _ = conn.await;
            open.dec();
            drop(permit);
        });
    }
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await.is_err() {
        tracing::warn!("API connections still open after 10 s; closing them");
    }
}
