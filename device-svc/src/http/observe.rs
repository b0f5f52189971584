//! Request metrics for the API: every answer counted by route, method and status, and timed,
//! so an operator sees which routes are called, refused or slow. The labels stay bounded
//! whatever a client sends: the route is the matched pattern from the route table
//! (`/v1/orders/{id}`, never the raw path, which the caller chooses), `unmatched` for a path no
//! route has, and a method outside the five the API uses is `other`.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use tokio::time::Instant;

use crate::app::App;

/// Counts and times one request (`devsvc_http_requests_total`,
/// `devsvc_http_request_duration_seconds`).
pub(super) async fn record(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str).to_owned();
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    let m = &app.metrics;
    m.http_requests.with_label_values(&[route.as_str(), method, response.status().as_str()]).inc();
    m.http_duration.with_label_values(&[route.as_str(), method]).observe(started.elapsed().as_secs_f64());
    response
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        _ => "other",
    }
}
