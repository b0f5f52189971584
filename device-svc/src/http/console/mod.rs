//! The operator console: HTML pages served by the device service itself (no other server to
//! run), for the people who run the fleet all day. Server-rendered with `askama` templates
//! (compiled into the binary and checked at build time; values escaped by the engine) and no
//! JavaScript: forms post back and the page shows the outcome, so it works with a keyboard and
//! a screen reader and needs no front-end build.
//!
//! Signed in with an operator or viewer API key ([`session`]: an `HttpOnly`, `SameSite=Strict`
//! cookie, `Secure` under TLS, a CSRF token in every form). Viewers see every page but no
//! action; actions are checked again on the server. Everything an action changes goes through
//! the store functions the JSON API uses, audited under the signed-in key.

mod pages;
mod session;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

use crate::app::App;

/// What every console answer says to the browser: run no script and load nothing from
/// elsewhere (the pages have no JavaScript), post forms only here, and never be framed by
/// another page (clickjacking an action button), nor cached.
async fn protect(mut response: axum::response::Response) -> axum::response::Response {
    use axum::http::{HeaderValue, header};
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The console's routes, under `/console`.
pub(super) fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/console", get(pages::fleet))
        .route("/console/login", get(pages::login_form).post(pages::login))
        .route("/console/logout", post(pages::logout))
        .route("/console/devices/{key}", get(pages::device))
        .route("/console/devices/{key}/commands", post(pages::command))
        .route("/console/orders", get(pages::orders_list))
        .route("/console/orders/{id}", get(pages::order))
        .route("/console/orders/{id}/{action}", post(pages::order_action))
        .route("/console/ota", get(pages::ota).post(pages::ota_submit))
        .route("/console/ota/{id}", get(pages::ota_task))
        .route("/console/ota/{id}/cancel", post(pages::ota_cancel))
        .route("/console/anomalies", get(pages::anomalies))
        .route("/console/alerts", get(pages::alerts))
        .route("/console/dead-letters", get(pages::dead_letters))
        .route("/console/dead-letters/{id}/replay", post(pages::replay))
        .route("/console/audit", get(pages::audit_log))
        .layer(axum::middleware::map_response(protect))
}
