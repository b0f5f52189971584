//! The admin HTTP API (JSON), `/metrics` and `/healthz`. `docs/api.md` lists every endpoint
//! with its request, answers, errors and the roles that may call it. The route table below is
//! the one place that says who may call what: the router is built from it and the guard
//! ([`guard`]) enforces it.
//!
//! Errors are JSON `{"error", "message", "field"?}`: 400 for bad input naming the field, 404
//! for an unknown id, 409 for a conflict, 503 when PostgreSQL or Redis cannot be reached.

mod devices;
mod error;
mod extract;
mod guard;
mod keys;
mod lists;
mod observe;
mod ops;
mod orders;
mod ota;
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

/// The route table: every route with its roles and handler. The router is built from it, so a
/// route cannot exist without an entry (docs/api.md lists the same table).
fn table() -> Vec<(RouteSpec, MethodRouter<Arc<App>>)> {
    use Access::{PaymentProvider, Public, Roles};
    let r = |method: Method, path: &'static str, access: Access, handler: MethodRouter<Arc<App>>| {
        (RouteSpec { method, path, access }, handler)
    };
    let (get_, post_, put_, patch_, delete_) = (Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE);
    vec![
        r(get_.clone(), "/healthz", Public, get(ops::healthz)),
        r(get_.clone(), "/metrics", Roles(SCRAPERS), get(ops::metrics)),
        r(get_.clone(), "/v1/alerts", Roles(READERS), get(ops::alerts)),
        r(get_.clone(), "/v1/dead-letters", Roles(READERS), get(ops::dead_letters)),
        r(post_.clone(), "/v1/dead-letters/{id}/replay", Roles(OPERATOR), post(ops::replay_dead_letter)),
        r(post_.clone(), "/v1/keys", Roles(OPERATOR), post(keys::create)),
        r(get_.clone(), "/v1/keys", Roles(OPERATOR), get(keys::list)),
        r(post_.clone(), "/v1/keys/{id}/revoke", Roles(OPERATOR), post(keys::revoke)),
        r(get_.clone(), "/v1/audit", Roles(OPERATOR), get(keys::audit)),
        r(post_.clone(), "/v1/products", Roles(OPERATOR), post(devices::create_product)),
        r(get_.clone(), "/v1/products/{id}", Roles(READERS), get(devices::get_product)),
        r(post_.clone(), "/v1/cabinets", Roles(OPERATOR), post(devices::create_cabinet)),
        r(get_.clone(), "/v1/cabinets", Roles(READERS), get(lists::cabinets)),
        r(get_.clone(), "/v1/cabinets/{id}", Roles(READERS), get(devices::get_cabinet)),
        r(put_.clone(), "/v1/cabinets/{id}/doors/{door}/lanes/{lane}", Roles(OPERATOR), put(devices::configure_lane)),
        r(get_.clone(), "/v1/cabinets/{id}/weights", Roles(READERS), get(weights::current)),
        r(get_.clone(), "/v1/cabinets/{id}/doors/{door}/lanes/{lane}/readings", Roles(READERS), get(weights::history)),
        r(post_.clone(), "/v1/vehicles", Roles(OPERATOR), post(devices::create_vehicle)),
        r(get_.clone(), "/v1/vehicles", Roles(READERS), get(lists::vehicles)),
        r(get_.clone(), "/v1/vehicles/{vin}", Roles(READERS), get(vehicles::get)),
        r(patch_.clone(), "/v1/vehicles/{vin}", Roles(OPERATOR), patch(vehicles::update)),
        r(get_.clone(), "/v1/activations/{qr_id}", Roles(ACTIVATION_READERS), get(vehicles::get_activation)),
        r(post_.clone(), "/v1/activations/{qr_id}/scan", Roles(OWNER_APP), post(vehicles::scan)),
        r(post_.clone(), "/v1/activations/{qr_id}/confirm", Roles(OWNER_APP), post(vehicles::confirm)),
        r(post_.clone(), "/v1/activations/{qr_id}/cancel", Roles(OWNER_APP), post(vehicles::cancel)),
        r(post_.clone(), "/v1/ota/tasks", Roles(OPERATOR), post(ota::create)),
        r(get_.clone(), "/v1/ota/tasks", Roles(READERS), get(ota::list)),
        r(get_.clone(), "/v1/ota/tasks/{id}", Roles(READERS), get(ota::get)),
        r(get_.clone(), "/v1/ota/tasks/{id}/vehicles", Roles(READERS), get(ota::vehicles)),
        r(get_.clone(), "/v1/ota/tasks/{id}/rejections", Roles(READERS), get(ota::rejections)),
        r(get_.clone(), "/v1/ota/tasks/{id}/failures", Roles(READERS), get(ota::failures)),
        r(post_.clone(), "/v1/ota/tasks/{id}/cancel", Roles(OPERATOR), post(ota::cancel)),
        r(get_.clone(), "/v1/ota/lists/{list}", Roles(READERS), get(ota::list_entries)),
        r(put_.clone(), "/v1/ota/lists/{list}/{vin}", Roles(OPERATOR), put(ota::add_to_list)),
        r(delete_.clone(), "/v1/ota/lists/{list}/{vin}", Roles(OPERATOR), delete(ota::remove_from_list)),
        r(get_.clone(), "/v1/devices", Roles(READERS), get(lists::devices)),
        r(get_.clone(), "/v1/devices/{key}", Roles(READERS), get(devices::get_device)),
        r(get_.clone(), "/v1/devices/{key}/history", Roles(READERS), get(devices::history)),
        r(post_.clone(), "/v1/devices/{key}/credentials", Roles(OPERATOR), post(devices::rotate_credentials)),
        r(put_.clone(), "/v1/devices/{key}/enabled", Roles(OPERATOR), put(devices::set_enabled)),
        r(post_.clone(), "/v1/devices/{key}/commands", Roles(OPERATOR), post(send::send)),
        r(post_.clone(), "/v1/orders", Roles(SHOP), post(orders::create)),
        r(get_.clone(), "/v1/orders", Roles(READERS), get(lists::orders)),
        r(get_.clone(), "/v1/orders/{id}", Roles(ORDER_READERS), get(orders::get)),
        r(post_.clone(), "/v1/orders/{id}/cancel", Roles(OPERATOR), post(orders::cancel)),
        r(post_.clone(), "/v1/orders/{id}/force-close", Roles(OPERATOR), post(orders::force_close)),
        r(post_.clone(), "/v1/orders/{id}/settle", Roles(OPERATOR), post(orders::settle)),
        r(post_.clone(), "/v1/orders/{id}/refunds", Roles(OPERATOR), post(orders::refund)),
        r(post_.clone(), "/v1/orders/{id}/charges", Roles(OPERATOR), post(orders::charge)),
        r(post_.clone(), "/v1/orders/{id}/waive", Roles(OPERATOR), post(orders::waive)),
        r(post_.clone(), "/v1/payments/callback", PaymentProvider, post(orders::payment_callback)),
        r(post_.clone(), "/v1/contracts/callback", PaymentProvider, post(orders::contract_callback)),
        r(get_.clone(), "/v1/anomalies", Roles(READERS), get(orders::list_anomalies)),
        r(post_.clone(), "/v1/anomalies/{id}/resolve", Roles(OPERATOR), post(orders::resolve_anomaly)),
        r(post_.clone(), "/v1/cabinets/{id}/doors/{door}/restocks", Roles(OPERATOR), post(orders::start_restock)),
        r(post_.clone(), "/v1/restocks/{id}/finish", Roles(OPERATOR), post(orders::finish_restock)),
        r(get_, "/v1/restock-orders", Roles(READERS), get(orders::restock_orders)),
    ]
}

/// Every route with who may call it (for the route-table test and the docs).
pub fn routes() -> Vec<RouteSpec> {
    table().into_iter().map(|(spec, _)| spec).collect()
}

/// Every route of the API, each behind the guard (authentication, the role table, the rate
/// limit, the audit context), with the body limit, the request timeout and the request
/// metrics around them all.
pub fn router(app: Arc<App>) -> Router {
    let mut router = Router::new();
    let mut access = HashMap::new();
    for (spec, handler) in table() {
        access.insert((spec.method.clone(), spec.path), spec.access);
        router = router.route(spec.path, handler);
    }
    let guard = Arc::new(Guard::new(Arc::clone(&app), access));
    let (max_body, timeout) = (app.config.http.max_body_bytes, app.config.http.request_timeout_ms);
    router
        .route_layer(axum::middleware::from_fn_with_state(guard, guard::guard))
        .layer(axum::middleware::from_fn(refuse_nul))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(timeout),
        ))
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
