//! The guard every request passes before its handler: which route it is (the route table of
//! [`super::routes`]), who calls (an API key, [`crate::auth::keys`]), whether that role may
//! call this route, whether the key is within its rate, and the audit context the handler's
//! changes are recorded under ([`crate::auth::audit`]).
//!
//! Answers of its own: 401 (no or no valid key; `WWW-Authenticate: Bearer`), 429
//! `rate_limited` with `Retry-After` (checked before the role, so refused calls spend the key's
//! budget too), 403 `forbidden` (a role the route does not list, recorded in the audit trail),
//! 503 when the keys cannot be read. Every answer carries `X-Request-Id`, the id
//! the audit trail records.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::error::{ApiError, ErrorCode};
use crate::app::App;
use crate::auth::audit::{self, Context};
use crate::auth::{Principal, Role};

/// The id of the request being served (answered as `X-Request-Id`, recorded in the audit trail).
#[derive(Debug, Clone)]
pub(super) struct RequestId(pub(super) String);

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (`/healthz` only).
    Public,
    /// A key of one of these roles.
    Roles(&'static [Role]),
    /// The payment provider, authenticated by its callback's signature in the handler.
    PaymentProvider,
    /// A vehicle, authenticated by the signed download URL its notice carried (checked in the
    /// handler: signature, expiry, and an active upgrade of that vehicle with that package).
    VehicleUrl,
}

/// What the guard needs: the service, the route table, the per-key rate limiter.
pub(super) struct Guard {
    pub(super) app: Arc<App>,
    pub(super) table: HashMap<(Method, &'static str), Access>,
    limiter: Option<DefaultKeyedRateLimiter<String>>,
}

impl Guard {
    pub(super) fn new(app: Arc<App>, table: HashMap<(Method, &'static str), Access>) -> Self {
        let auth = &app.config.auth;
        // The limiter's map holds one entry per key that passed verification, so it is bounded
        // by the keys in PostgreSQL, not by what anonymous callers send.
        let limiter = NonZeroU32::new(auth.rate_per_s).map(|rate| {
            let burst = NonZeroU32::new(auth.burst).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Self { app, table, limiter }
    }
}

fn request_id() -> String {
    let mut raw = [0u8; 12];
    // Falls back to zeros if the OS has no randomness: an id, not a secret.
    let _ = getrandom::fill(&mut raw);
    hex::encode(raw)
}

fn with_id(mut response: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

fn is_change(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The middleware (installed with `route_layer`, so the matched route is known).
pub(super) async fn guard(State(g): State<Arc<Guard>>, mut request: Request, next: Next) -> Response {
    let id = request_id();
    // The handler of a route without a key (the payment callback) audits under this id too.
    request.extensions_mut().insert(RequestId(id.clone()));
    let route = request.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned()).unwrap_or_default();
    let access = g.table.get(&(request.method().clone(), route.as_str())).copied();
    let roles = match access {
        Some(Access::Public | Access::PaymentProvider | Access::VehicleUrl) => {
            return with_id(next.run(request).await, &id);
        }
        Some(Access::Roles(roles)) => roles,
        // A route without an entry is refused to everyone (the table is the router's source,
        // so this is a defect, not a caller's error).
        None => &[],
    };
    let app = &g.app;
    let count = |result: &str| app.metrics.api_auth.with_label_values(&[result]).inc();
    let authorization = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let principal: Principal = match app.verifier.verify(&app.pg, authorization).await {
        Ok(p) => p,
        Err(e) => {
            count(e.reason());
            let answer = match e {
                crate::auth::keys::AuthFailure::Storage(s) => ApiError::from(s).into_response(),
                other => {
                    let mut r = ApiError::unauthorized(other.to_string()).into_response();
                    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                    r
                }
            };
            return with_id(answer, &id);
        }
    };
    let ctx = Arc::new(Context::new(
        id.clone(),
        principal.audit_name(),
        principal.role.as_str(),
        request.method().to_string(),
        route.clone(),
        request.uri().path().to_owned(),
    ));
    // The rate first: a key's refused calls spend its budget too, so probing routes it may not
    // call cannot flood the audit trail.
    if let Some(limiter) = &g.limiter
        && let Err(not_until) = limiter.check_key(&principal.key_id)
    {
        count("rate_limited");
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        let mut r = ApiError::rate_limited("this key is above its request rate (auth.rate_per_s)").into_response();
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        return with_id(r, &id);
    }
    if !roles.contains(&principal.role) {
        count("forbidden");
        write_outcome(app, &ctx, "forbidden").await;
        let message = format!("a {} key may not call {} {route}", principal.role, request.method());
        return with_id(ApiError::forbidden(message).into_response(), &id);
    }
    count("ok");
    let change = is_change(request.method());
    request.extensions_mut().insert(principal);
    if !change {
        return with_id(next.run(request).await, &id);
    }
    let response = audit::scope(Arc::clone(&ctx), next.run(request)).await;
    let status = response.status();
    if status.is_success() {
        if !ctx.written() {
            write_outcome(app, &ctx, "ok").await;
        }
    } else {
        let code = response.extensions().get::<ErrorCode>().map_or("", |c| c.0);
        write_outcome(app, &ctx, format!("{} {code}", status.as_u16()).trim_end()).await;
    }
    if let Some(how) = ctx.written_how() {
        app.metrics.audit_rows.with_label_values(&[how]).inc();
    }
    with_id(response, &id)
}

/// Records an outcome no transaction recorded; a failure to write it is logged, and the answer
/// (already decided) goes out all the same.
async fn write_outcome(app: &App, ctx: &Context, outcome: &str) {
    if let Err(e) = audit::record_outcome(app, ctx, outcome).await {
        tracing::warn!(error = %e, request_id = %ctx.request_id, "failed to write an audit row");
    }
}
