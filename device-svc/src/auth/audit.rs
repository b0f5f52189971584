//! The audit trail: one row per API call that changed something (or was refused to a caller
//! who proved who they are), naming the caller, the role, the route, the target (the request
//! path: ids, never bodies, so never a secret), the outcome, the time and the request id, and
//! for a change that takes one, the reason the operator gave ([`note_reason`]).
//!
//! A change and its row commit together: the API's guard runs every request inside
//! [`scope`], and each store function that changes something calls [`record`] with its own
//! transaction just before committing (outside a request, from a background task, it does
//! nothing). A change that is not a PostgreSQL write (a command sent to a device) is recorded by
//! [`record_now`] before it is made. Refusals are recorded by the guard once the answer is known
//! ([`record_outcome`]), since no transaction of theirs commits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use serde::Serialize;
use tokio_postgres::GenericClient;

use crate::app::App;
use crate::error::StoreError;

const NONE: u8 = 0;
const IN_TRANSACTION: u8 = 1;
const BEFORE_CHANGE: u8 = 2;
const AFTER: u8 = 3;

tokio::task_local! {
    static CURRENT: Arc<Context>;
}

/// The request being served, as the audit trail names it.
#[derive(Debug)]
pub struct Context {
    /// Random per request; also sent back as `X-Request-Id`.
    pub request_id: String,
    /// `key:<id>` or `provider:<name>`.
    pub principal: String,
    /// The caller's role (`payment_provider` for a signed callback).
    pub role: &'static str,
    /// HTTP method.
    pub method: String,
    /// The route's pattern (`/v1/orders/{id}`).
    pub route: String,
    /// The request path.
    pub target: String,
    /// The reason the caller gave for the change, if it takes one ([`note_reason`]).
    reason: std::sync::Mutex<Option<String>>,
    written: AtomicU8,
}

impl Context {
    /// A context for a request.
    pub fn new(
        request_id: String,
        principal: String,
        role: &'static str,
        method: String,
        route: String,
        target: String,
    ) -> Self {
        Self {
            request_id,
            principal,
            role,
            method,
            route,
            target,
            reason: std::sync::Mutex::new(None),
            written: AtomicU8::new(NONE),
        }
    }

    /// Whether a row for this request was written.
    pub fn written(&self) -> bool {
        self.written.load(Ordering::Relaxed) != NONE
    }

    /// How this request's row was written, as the `written` label of `devsvc_audit_rows_total`.
    pub fn written_how(&self) -> Option<&'static str> {
        match self.written.load(Ordering::Relaxed) {
            IN_TRANSACTION => Some("in_transaction"),
            BEFORE_CHANGE => Some("before_change"),
            AFTER => Some("after"),
            _ => None,
        }
    }
}

/// Runs `f` as the request `ctx`.
pub async fn scope<F: std::future::Future>(ctx: Arc<Context>, f: F) -> F::Output {
    CURRENT.scope(ctx, f).await
}

/// The request being served, if any.
pub fn current() -> Option<Arc<Context>> {
    CURRENT.try_with(Arc::clone).ok()
}

/// Keeps `reason` (the operator's own words for the change, bounded by the caller) for the
/// current request's audit row. Outside a request: nothing.
pub fn note_reason(reason: &str) {
    if let Some(ctx) = current() {
        *ctx.reason.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(reason.to_owned());
    }
}

async fn insert(client: &impl GenericClient, ctx: &Context, outcome: &str, how: u8) -> Result<(), StoreError> {
    let reason = ctx.reason.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    client
        .execute(
            "INSERT INTO audit_log (request_id, principal, role, method, route, target, outcome, reason)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[&ctx.request_id, &ctx.principal, &ctx.role, &ctx.method, &ctx.route, &ctx.target, &outcome, &reason],
        )
        .await?;
    ctx.written.store(how, Ordering::Relaxed);
    Ok(())
}

/// Records the current request's change (outcome `ok`) in `tx`, the transaction that makes it
/// (each attempt of a retried transaction writes its own row; only the committed one stays).
/// Outside a request: nothing.
///
/// # Errors
/// Storage errors (the transaction then does not commit, and neither does the change).
pub async fn record(tx: &tokio_postgres::Transaction<'_>) -> Result<(), StoreError> {
    match current() {
        Some(ctx) => insert(tx, &ctx, "ok", IN_TRANSACTION).await,
        None => Ok(()),
    }
}

/// Records the current request's change in `tx` ([`record`]) and commits both.
///
/// # Errors
/// Storage errors (then neither is committed).
pub async fn commit(tx: deadpool_postgres::Transaction<'_>) -> Result<(), StoreError> {
    record(&tx).await?;
    tx.commit().await?;
    Ok(())
}

/// Records the current request (outcome `requested`) before a change that is not a PostgreSQL
/// write is made. Outside a request: nothing.
///
/// # Errors
/// Storage errors (the change is then not made).
pub async fn record_now(app: &App) -> Result<(), StoreError> {
    match current() {
        Some(ctx) if !ctx.written() => insert(&**app.pg.get().await?, &ctx, "requested", BEFORE_CHANGE).await,
        _ => Ok(()),
    }
}

/// Records a request's outcome when no change of its recorded it (refusals, failures).
///
/// # Errors
/// Storage errors.
pub async fn record_outcome(app: &App, ctx: &Context, outcome: &str) -> Result<(), StoreError> {
    insert(&**app.pg.get().await?, ctx, outcome, AFTER).await
}

/// One row of the trail.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Entry {
    /// Row id (ascending with time).
    pub id: i64,
    /// When, ms since the epoch.
    pub at_ms: u64,
    /// Request id.
    pub request_id: String,
    /// `key:<id>` or `provider:<name>`.
    pub principal: String,
    /// Role.
    pub role: String,
    /// Method.
    pub method: String,
    /// Route pattern.
    pub route: String,
    /// Request path.
    pub target: String,
    /// `ok`, `requested`, or the refusal (`forbidden`, `409 door_busy`, ...).
    pub outcome: String,
    /// The reason the operator gave, for a change that takes one.
    pub reason: Option<String>,
}

/// Filters of [`list`]; every one optional.
#[derive(Debug, Default)]
pub struct Filter<'a> {
    /// Exact principal.
    pub principal: Option<&'a str>,
    /// Exact route pattern.
    pub route: Option<&'a str>,
    /// Target prefix.
    pub target_prefix: Option<&'a str>,
    /// Exact outcome.
    pub outcome: Option<&'a str>,
    /// Rows with a smaller id (paging backwards).
    pub before_id: Option<i64>,
    /// Rows at or after, ms.
    pub since_ms: Option<u64>,
    /// At most this many.
    pub limit: i64,
}

/// The newest rows matching `f`.
///
/// # Errors
/// Storage errors.
pub async fn list(app: &App, f: &Filter<'_>) -> Result<Vec<Entry>, StoreError> {
    let client = app.pg.get().await?;
    let since = f.since_ms.map(crate::clock::time_of);
    let prefix =
        f.target_prefix.map(|p| format!("{}%", p.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")));
    let rows = client
        .query(
            "SELECT id, at, request_id, principal, role, method, route, target, outcome, reason FROM audit_log
              WHERE ($1::text IS NULL OR principal = $1)
                AND ($2::text IS NULL OR route = $2)
                AND ($3::text IS NULL OR target LIKE $3)
                AND ($4::text IS NULL OR outcome = $4)
                AND ($5::bigint IS NULL OR id < $5)
                AND ($6::timestamptz IS NULL OR at >= $6)
              ORDER BY id DESC LIMIT $7",
            &[&f.principal, &f.route, &prefix, &f.outcome, &f.before_id, &since, &f.limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Entry {
            id: r.get(0),
            at_ms: crate::clock::ms_of(r.get(1)),
            request_id: r.get(2),
            principal: r.get(3),
            role: r.get(4),
            method: r.get(5),
            route: r.get(6),
            target: r.get(7),
            outcome: r.get(8),
            reason: r.get(9),
        })
        .collect())
}
