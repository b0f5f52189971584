//! The console's pages (askama templates under `templates/console/`, escaped by the engine)
//! and its actions. Pages read through the same store functions as the JSON API; actions call
//! the same functions the API's handlers call, inside an audit scope naming the signed-in key,
//! so a decision made in the console is recorded exactly as one made with `curl`. Action forms
//! are rendered only for operators, and every action checks the role and the CSRF token again.

use std::collections::HashMap;
use std::sync::Arc;

use askama::Template;
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::session::{self, Session};
use crate::app::App;
use crate::auth::audit::{self, Context};
use crate::auth::{Principal, Role};
use crate::clock::now_ms;
use crate::error::StoreError;
use crate::fleet::{self, DeviceFilter};
use crate::http::send;
use crate::listing::Cursor;
use crate::purchases::admin::{self, Decision, DoorSeen, ForceClose};
use crate::purchases::lists::{self as order_lists, OrderFilter};
use crate::purchases::money::{self, Adjustment, Kind, RefundLine};
use crate::purchases::orders;
use crate::purchases::reckon::GoodsLane;
use crate::purchases::settlement::{self, Counted};

type Params = HashMap<String, String>;

/// `2026-11-30 02:15:07` (UTC) for ms since the Unix epoch.
pub(super) fn when(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = crate::clock::civil_date(days);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn money_text(cents: Option<i64>) -> String {
    cents.map(|c| format!("{}.{:02}", c / 100, (c % 100).abs())).unwrap_or_default()
}

/// A page, or the sign-in page when no session is open.
async fn signed_in(app: &App, headers: &HeaderMap) -> Result<Session, Response> {
    match session::current(app, headers).await {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(Redirect::to("/console/login").into_response()),
        Err(e) => Err(failure(&e)),
    }
}

fn failure(e: &StoreError) -> Response {
    let status = match e {
        StoreError::NotFound(_) => StatusCode::NOT_FOUND,
        StoreError::Invalid { .. } => StatusCode::BAD_REQUEST,
        StoreError::Rejected { .. } | StoreError::Conflict(_) => StatusCode::CONFLICT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, Html(format!("<!doctype html><title>{status}</title><p>{}</p>", escape(&e.to_string())))).into_response()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn render(t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "a console page failed to render");
            (StatusCode::INTERNAL_SERVER_ERROR, "the page failed to render").into_response()
        }
    }
}

/// An action's session: signed in, an operator, with this session's CSRF token.
async fn acting(app: &App, headers: &HeaderMap, csrf: &str) -> Result<Session, Response> {
    let s = signed_in(app, headers).await?;
    if !s.csrf_ok(csrf) {
        return Err((StatusCode::FORBIDDEN, "the form's token is missing or stale: reload the page").into_response());
    }
    if !s.may_act() {
        return Err((StatusCode::FORBIDDEN, "a viewer may not change anything").into_response());
    }
    Ok(s)
}

/// The audit context of a console action by `p` on `route` (a pattern) at `target`.
fn context(p: &Principal, route: &str, target: String) -> Arc<Context> {
    let mut id = [0u8; 8];
    let _ = getrandom::fill(&mut id);
    Arc::new(Context::new(hex::encode(id), p.audit_name(), p.role.as_str(), "POST".into(), route.into(), target))
}

#[derive(Template)]
#[template(path = "console/login.html")]
struct Login {
    error: Option<String>,
}

/// `GET /console/login`.
pub(super) async fn login_form() -> Response {
    render(&Login { error: None })
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    key: String,
}

/// `POST /console/login`: an operator or viewer key opens a session (303 to the fleet page);
/// anything else is the form again with the reason (401).
pub(super) async fn login(State(app): State<Arc<App>>, Form(f): Form<LoginForm>) -> Response {
    let count = |result: &str| app.metrics.api_auth.with_label_values(&[result]).inc();
    let refused = |why: &str| (StatusCode::UNAUTHORIZED, render(&Login { error: Some(why.into()) })).into_response();
    if f.key.len() > 256 {
        return refused("That is not an API key.");
    }
    let principal = match app.verifier.verify(&app.pg, Some(&format!("Bearer {}", f.key.trim()))).await {
        Ok(p) => p,
        Err(crate::auth::keys::AuthFailure::Storage(e)) => return failure(&e),
        Err(e) => {
            count(e.reason());
            return refused("That key is not valid.");
        }
    };
    if !matches!(principal.role, Role::Operator | Role::Viewer) {
        count("forbidden");
        return refused("The console is for operator and viewer keys.");
    }
    match session::open(&app, &principal).await {
        Ok(cookie) => {
            count("ok");
            ([(header::SET_COOKIE, cookie)], Redirect::to("/console")).into_response()
        }
        Err(e) => failure(&e),
    }
}

#[derive(Deserialize)]
pub(super) struct CsrfForm {
    csrf: String,
}

/// `POST /console/logout`.
pub(super) async fn logout(State(app): State<Arc<App>>, headers: HeaderMap, Form(f): Form<CsrfForm>) -> Response {
    if let Ok(s) = signed_in(&app, &headers).await
        && s.csrf_ok(&f.csrf)
        && let Err(e) = session::close(&app, &headers).await
    {
        return failure(&e);
    }
    ([(header::SET_COOKIE, session::cleared(&app))], Redirect::to("/console/login")).into_response()
}

struct DeviceLine {
    key: String,
    status: String,
    since: String,
    node: String,
    seen: String,
    enabled: bool,
}

#[derive(Template)]
#[template(path = "console/fleet.html")]
struct Fleet {
    who: String,
    role: &'static str,
    csrf: String,
    counts: Vec<(String, i64)>,
    unreachable: Vec<String>,
    statuses: Vec<(&'static str, bool)>,
    q: String,
    node: String,
    devices: Vec<DeviceLine>,
    next: Option<String>,
}

fn param(q: &Params, name: &str) -> String {
    q.get(name).map(|v| v.chars().filter(|c| !c.is_control()).take(128).collect()).unwrap_or_default()
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.:~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

const STATUSES: [&str; 4] = ["online", "offline", "pending_init", "registered"];

/// `GET /console`: devices by status and node, unreachable nodes, search by id.
pub(super) async fn fleet(State(app): State<Arc<App>>, headers: HeaderMap, Query(q): Query<Params>) -> Response {
    let s = match signed_in(&app, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let (qs, status, node) = (param(&q, "q"), param(&q, "status"), param(&q, "node"));
    let filter = DeviceFilter {
        key_prefix: (!qs.is_empty()).then(|| qs.clone()),
        status: STATUSES.contains(&status.as_str()).then(|| status.clone()),
        node: (!node.is_empty()).then(|| node.clone()),
        ..DeviceFilter::default()
    };
    let cursor = q.get("cursor").and_then(|c| Cursor::decode(c).ok());
    let page = match fleet::devices(&app, &filter, cursor.as_ref(), 50).await {
        Ok(p) => p,
        Err(e) => return failure(&e),
    };
    let counts = match status_counts(&app).await {
        Ok(c) => c,
        Err(e) => return failure(&e),
    };
    let unreachable = match open_alerts(&app).await {
        Ok(a) => a,
        Err(e) => return failure(&e),
    };
    let next = page.next_cursor.map(|c| {
        format!("/console?q={}&status={}&node={}&cursor={c}", url_encode(&qs), url_encode(&status), url_encode(&node))
    });
    let devices = page
        .items
        .into_iter()
        .map(|d| DeviceLine {
            since: when(d.status_changed_ms),
            seen: d.last_seen_ms.map(when).unwrap_or_default(),
            node: d.node.unwrap_or_default(),
            key: d.key,
            status: d.status,
            enabled: d.enabled,
        })
        .collect();
    render(&Fleet {
        who: s.principal.name.clone(),
        role: s.principal.role.as_str(),
        csrf: s.csrf.clone(),
        counts,
        unreachable,
        statuses: STATUSES.iter().map(|s| (*s, *s == status)).collect(),
        q: qs,
        node,
        devices,
        next,
    })
}

/// The service alerts still open (a node down, a node's heartbeats missing), as lines.
async fn open_alerts(app: &App) -> Result<Vec<String>, StoreError> {
    let client = app.pg.get().await?;
    let rows = client
        .query(
            "SELECT kind, node, detail, started_at FROM service_alerts WHERE ended_at IS NULL ORDER BY started_at",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let (kind, node, detail): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            format!("{node}: {kind} since {} ({detail})", when(crate::clock::ms_of(r.get(3))))
        })
        .collect())
}

/// Devices by status. Served by `devices_status_key` (an index-only count per status).
async fn status_counts(app: &App) -> Result<Vec<(String, i64)>, StoreError> {
    let client = app.pg.get().await?;
    let rows = client.query("SELECT status, count(*) FROM devices GROUP BY status ORDER BY status", &[]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

struct LaneLine {
    door: u8,
    lane: u8,
    grams: i32,
    at: String,
}

struct HistoryLine {
    at: String,
    from: String,
    to: String,
    reason: String,
    node: String,
}

struct CommandLine {
    at: String,
    by: String,
    outcome: String,
    reason: String,
}

struct Chart {
    door: u8,
    lane: u8,
    hours: u64,
    points: String,
    min: i32,
    max: i32,
}

#[derive(Template)]
#[template(path = "console/device.html")]
struct DevicePage {
    who: String,
    role: &'static str,
    csrf: String,
    may_act: bool,
    key: String,
    is_cabinet: bool,
    status: String,
    reason: String,
    since: String,
    node: String,
    seen: String,
    enabled: &'static str,
    lanes: Vec<LaneLine>,
    chart: Option<Chart>,
    history: Vec<HistoryLine>,
    commands: Vec<CommandLine>,
    result: Option<String>,
    error: Option<String>,
}

/// Scales readings into an 800 x 200 polyline.
fn chart(readings: &[crate::weights::Reading], from_ms: u64, to_ms: u64) -> (String, i32, i32) {
    let min = readings.iter().map(|r| r.grams).min().unwrap_or(0);
    let max = readings.iter().map(|r| r.grams).max().unwrap_or(0);
    let span_g = f64::from((max - min).max(1));
    let span_t = (to_ms.saturating_sub(from_ms)).max(1) as f64;
    let points = readings
        .iter()
        .map(|r| {
            let x = (r.sample_ms.saturating_sub(from_ms)) as f64 / span_t * 800.0;
            let y = 190.0 - f64::from(r.grams - min) / span_g * 170.0;
            format!("{x:.1},{y:.1}")
        })
        .collect::<Vec<_>>()
        .join(" ");
    (points, min, max)
}

async fn device_page(
    app: &App,
    s: &Session,
    key: &str,
    q: &Params,
    result: Option<String>,
    error: Option<String>,
) -> Result<DevicePage, StoreError> {
    let device = protocol::bus::DeviceKey::parse(key).map_err(|e| StoreError::invalid("key", e.to_string()))?;
    let view = crate::registry::get_device(app, &device).await?;
    let history = crate::registry::history(app, &device, 20).await?;
    let is_cabinet = matches!(device, protocol::bus::DeviceKey::Cabinet(_));
    let mut lanes = Vec::new();
    let mut chart_of = None;
    if is_cabinet {
        for l in crate::weights::current(app, device.id()).await? {
            lanes.push(LaneLine { door: l.door_id, lane: l.lane_id, grams: l.grams, at: when(l.sample_ms) });
        }
        let door = q.get("door").and_then(|v| v.parse::<u8>().ok());
        let lane = q.get("lane").and_then(|v| v.parse::<u8>().ok());
        if let (Some(door), Some(lane)) = (door, lane) {
            let hours = q.get("hours").and_then(|v| v.parse::<u64>().ok()).unwrap_or(1).clamp(1, 168);
            let to_ms = now_ms() + 1;
            let from_ms = to_ms.saturating_sub(hours * 3_600_000);
            let readings = crate::weights::history(app, device.id(), door, lane, from_ms, to_ms, 2000).await?;
            let (points, min, max) = chart(&readings, from_ms, to_ms);
            chart_of = Some(Chart { door, lane, hours, points, min, max });
        }
    }
    let commands = audit::list(
        app,
        &audit::Filter {
            target_prefix: Some(&format!("/console/devices/{key}/commands")),
            limit: 10,
            ..audit::Filter::default()
        },
    )
    .await?
    .into_iter()
    .chain(
        audit::list(
            app,
            &audit::Filter {
                target_prefix: Some(&format!("/v1/devices/{key}/commands")),
                limit: 10,
                ..audit::Filter::default()
            },
        )
        .await?,
    )
    .map(|e| CommandLine {
        at: when(e.at_ms),
        by: e.principal,
        outcome: e.outcome,
        reason: e.reason.unwrap_or_default(),
    })
    .collect();
    Ok(DevicePage {
        who: s.principal.name.clone(),
        role: s.principal.role.as_str(),
        csrf: s.csrf.clone(),
        may_act: s.may_act(),
        key: key.to_owned(),
        is_cabinet,
        status: view.status,
        reason: view.status_reason,
        since: when(view.status_changed_ms),
        node: view.node.unwrap_or_default(),
        seen: view.last_seen_ms.map(when).unwrap_or_default(),
        enabled: if view.enabled { "enabled" } else { "disabled" },
        lanes,
        chart: chart_of,
        history: history
            .into_iter()
            .map(|h| HistoryLine {
                at: when(h.at_ms),
                from: h.from,
                to: h.to,
                reason: h.reason,
                node: h.node.unwrap_or_default(),
            })
            .collect(),
        commands,
        result,
        error,
    })
}

/// `GET /console/devices/{key}?door=&lane=&hours=`: status, history, lane weights and a lane's
/// readings as a chart, the last commands, and (operators) the command form.
pub(super) async fn device(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(key): Path<String>,
    Query(q): Query<Params>,
) -> Response {
    let s = match signed_in(&app, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    match device_page(&app, &s, &key, &q, None, None).await {
        Ok(p) => render(&p),
        Err(e) => failure(&e),
    }
}

#[derive(Deserialize)]
pub(super) struct CommandForm {
    csrf: String,
    action: String,
    door_id: u8,
    #[serde(default)]
    reason: String,
}

/// `POST /console/devices/{key}/commands`: query a door, or open it with a reason; the page
/// again with the cabinet's result.
pub(super) async fn command(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(key): Path<String>,
    Form(f): Form<CommandForm>,
) -> Response {
    let s = match acting(&app, &headers, &f.csrf).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let input = match f.action.as_str() {
        "query_door" => send::CommandInput::QueryDoor { door_id: f.door_id, timeout_ms: None },
        "open_door" => {
            let reason = f.reason.trim();
            if reason.is_empty() || reason.len() > 256 {
                let none = Params::new();
                let page =
                    device_page(&app, &s, &key, &none, None, Some("Opening a door needs a reason.".into())).await;
                return page.map_or_else(|e| failure(&e), |p| (StatusCode::BAD_REQUEST, render(&p)).into_response());
            }
            let mut id = [0u8; 6];
            let _ = getrandom::fill(&mut id);
            send::CommandInput::OpenDoor {
                door_id: f.door_id,
                order_id: format!("ops-{}", hex::encode(id)),
                timeout_ms: None,
            }
        }
        _ => return (StatusCode::BAD_REQUEST, "unknown action").into_response(),
    };
    let ctx = context(&s.principal, "/console/devices/{key}/commands", format!("/console/devices/{key}/commands"));
    if f.action == "open_door" {
        let reason = format!("{}: {}", s.principal.name, f.reason.trim());
        audit::scope(Arc::clone(&ctx), async { audit::note_reason(&reason) }).await;
    }
    let answer = audit::scope(ctx, send::execute(&app, &key, input)).await;
    let (result, error) = match answer {
        Ok(a) => (Some(serde_json::to_string_pretty(&a).unwrap_or_default()), None),
        Err(e) => (None, Some(e.to_string())),
    };
    match device_page(&app, &s, &key, &Params::new(), result, error).await {
        Ok(p) => render(&p),
        Err(e) => failure(&e),
    }
}

struct OrderLine {
    id: String,
    created: String,
    state: String,
    cabinet: String,
    door: u8,
    user: String,
    amount: String,
    payment: String,
    review: String,
}

#[derive(Template)]
#[template(path = "console/orders.html")]
struct OrdersPage {
    who: String,
    role: &'static str,
    csrf: String,
    states: Vec<(&'static str, bool)>,
    cabinet_id: String,
    user_id: String,
    review: bool,
    orders: Vec<OrderLine>,
    next: Option<String>,
}

const ORDER_STATES: [&str; 8] =
    ["created", "authorised", "door_opening", "door_open", "door_closed", "settled", "cancelled", "abnormal"];

/// `GET /console/orders?state=&cabinet_id=&user_id=&review=true&cursor=`.
pub(super) async fn orders_list(State(app): State<Arc<App>>, headers: HeaderMap, Query(q): Query<Params>) -> Response {
    let s = match signed_in(&app, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let (state, cabinet_id, user_id) = (param(&q, "state"), param(&q, "cabinet_id"), param(&q, "user_id"));
    let review = q.get("review").is_some_and(|v| v == "true");
    let filter = OrderFilter {
        state: ORDER_STATES.contains(&state.as_str()).then(|| state.clone()),
        cabinet_id: (!cabinet_id.is_empty()).then(|| cabinet_id.clone()),
        user_id: (!user_id.is_empty()).then(|| user_id.clone()),
        review,
        ..OrderFilter::default()
    };
    let cursor = q.get("cursor").and_then(|c| Cursor::decode(c).ok());
    let page = match order_lists::orders(&app, &filter, cursor.as_ref(), 50).await {
        Ok(p) => p,
        Err(e) => return failure(&e),
    };
    let next = page.next_cursor.map(|c| {
        format!(
            "/console/orders?state={}&cabinet_id={}&user_id={}&review={review}&cursor={c}",
            url_encode(&state),
            url_encode(&cabinet_id),
            url_encode(&user_id)
        )
    });
    let orders = page
        .items
        .into_iter()
        .map(|o| OrderLine {
            created: when(o.created_ms),
            state: o.state.as_str().to_owned(),
            cabinet: o.cabinet_id,
            door: o.door_id,
            user: o.user_id,
            amount: money_text(o.amount_cents),
            payment: o.payment.unwrap_or_default(),
            review: o.review.join(", "),
            id: o.id,
        })
        .collect();
    render(&OrdersPage {
        who: s.principal.name.clone(),
        role: s.principal.role.as_str(),
        csrf: s.csrf.clone(),
        states: ORDER_STATES.iter().map(|s| (*s, *s == state)).collect(),
        cabinet_id,
        user_id,
        review,
        orders,
        next,
    })
}

struct GoodsLine {
    lane: u8,
    product: String,
    price: String,
    unit_grams: i32,
}

struct TransitionLine {
    at: String,
    from: String,
    to: String,
    cause: String,
}

#[derive(Template)]
#[template(path = "console/order.html")]
struct OrderPage {
    who: String,
    role: &'static str,
    csrf: String,
    may_act: bool,
    id: String,
    state: String,
    reason: String,
    door_state: String,
    cabinet: String,
    door: u8,
    user: String,
    charged: String,
    refunded: String,
    payment: String,
    review: String,
    goods: Vec<GoodsLine>,
    transitions: Vec<TransitionLine>,
    payments: String,
    /// A fresh idempotency key per rendered refund form: the same form sent twice (a double
    /// click, a reload) is one refund.
    refund_key: String,
    message: Option<String>,
    error: Option<String>,
}

async fn order_page(
    app: &App,
    s: &Session,
    id: &str,
    message: Option<String>,
    error: Option<String>,
) -> Result<OrderPage, StoreError> {
    let o = orders::get(app, id).await?;
    let transitions = orders::transitions(app, id).await?;
    let payments = money::of_order(app, id).await?;
    let goods: Vec<GoodsLane> = o.goods.clone().and_then(|g| serde_json::from_value(g).ok()).unwrap_or_default();
    Ok(OrderPage {
        who: s.principal.name.clone(),
        role: s.principal.role.as_str(),
        csrf: s.csrf.clone(),
        may_act: s.may_act(),
        id: o.id.clone(),
        state: o.state.as_str().to_owned(),
        reason: o.reason.clone().unwrap_or_default(),
        door_state: o.door_state.clone(),
        cabinet: o.cabinet_id.clone(),
        door: o.door_id,
        user: o.user_id.clone(),
        charged: money_text(Some(o.charged_cents)),
        refunded: money_text(Some(o.refunded_cents)),
        payment: o.payment.clone().unwrap_or_else(|| "none".into()),
        review: if o.review.is_empty() { "nothing".into() } else { o.review.join(", ") },
        goods: goods
            .iter()
            .map(|g| GoodsLine {
                lane: g.lane_id,
                product: g.product_id.clone(),
                price: money_text(Some(g.price_cents)),
                unit_grams: g.unit_grams,
            })
            .collect(),
        transitions: transitions
            .into_iter()
            .map(|t| TransitionLine { at: when(t.at_ms), from: t.from.unwrap_or_default(), to: t.to, cause: t.cause })
            .collect(),
        payments: serde_json::to_string_pretty(&payments).unwrap_or_default(),
        refund_key: {
            let mut k = [0u8; 12];
            let _ = getrandom::fill(&mut k);
            format!("console-{}", hex::encode(k))
        },
        message,
        error,
    })
}

/// `GET /console/orders/{id}`: transitions, goods, payments and (operators) the actions the
/// order's state allows.
pub(super) async fn order(State(app): State<Arc<App>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let s = match signed_in(&app, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    match order_page(&app, &s, &id, None, None).await {
        Ok(p) => render(&p),
        Err(e) => failure(&e),
    }
}

/// `POST /console/orders/{id}/{action}`: `settle` (items per lane), `cancel`, `force-close`
/// (the door seen), `refund` (items per lane); the order's page again with the outcome.
pub(super) async fn order_action(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    Form(f): Form<Params>,
) -> Response {
    let s = match acting(&app, &headers, f.get("csrf").map_or("", String::as_str)).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let operator = s.principal.name.clone();
    let reason = f.get("reason").cloned().unwrap_or_default();
    let lanes: Vec<(u8, i64)> =
        f.iter().filter_map(|(k, v)| Some((k.strip_prefix("lane_")?.parse().ok()?, v.trim().parse().ok()?))).collect();
    let route = format!("/console/orders/{{id}}/{action}");
    let ctx = context(&s.principal, &route, format!("/console/orders/{id}/{action}"));
    let outcome: Result<String, StoreError> = audit::scope(ctx, async {
        match action.as_str() {
            "settle" => {
                let counted: Vec<Counted> = lanes.iter().map(|&(lane_id, items)| Counted { lane_id, items }).collect();
                let o = settlement::settle_by_operator(&app, &id, &operator, &counted).await?;
                Ok(format!("Settled: {}.", money_text(o.amount_cents)))
            }
            "cancel" => {
                admin::cancel(&app, &id, &Decision { operator, reason }).await?;
                Ok("Cancelled.".into())
            }
            "force-close" => {
                let door =
                    if f.get("door").map(String::as_str) == Some("open") { DoorSeen::Open } else { DoorSeen::Closed };
                let o = admin::force_close(&app, &id, &ForceClose { decision: Decision { operator, reason }, door })
                    .await?;
                Ok(format!("Force-closed: the order is {}.", o.state.as_str()))
            }
            "refund" => {
                let lines: Vec<RefundLine> = lanes
                    .iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|&(lane_id, items)| RefundLine { lane_id, items })
                    .collect();
                let key = f.get("key").cloned();
                let a = Adjustment { operator, reason, amount_cents: None, lines: Some(lines), key };
                let p = money::adjust(&app, &id, Kind::Refund, &a).await?;
                Ok(format!("Refund {} sent to the account service.", money_text(Some(p.amount_cents))))
            }
            _ => Err(StoreError::invalid("action", "settle, cancel, force-close or refund")),
        }
    })
    .await;
    let (message, error) = match outcome {
        Ok(m) => (Some(m), None),
        Err(e) => (None, Some(e.to_string())),
    };
    match order_page(&app, &s, &id, message, error).await {
        Ok(p) => render(&p),
        Err(e) => failure(&e),
    }
}

#[derive(Template)]
#[template(path = "console/rows.html")]
struct Rows {
    who: String,
    role: &'static str,
    csrf: String,
    title: &'static str,
    head: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

/// `GET /console/audit`: the newest 200 rows of the audit trail.
pub(super) async fn audit_log(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let s = match signed_in(&app, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let rows = match audit::list(&app, &audit::Filter { limit: 200, ..audit::Filter::default() }).await {
        Ok(r) => r,
        Err(e) => return failure(&e),
    };
    let rows = rows
        .into_iter()
        .map(|e| {
            vec![
                when(e.at_ms),
                e.principal,
                e.role,
                format!("{} {}", e.method, e.target),
                e.outcome,
                e.reason.unwrap_or_default(),
            ]
        })
        .collect();
    render(&Rows {
        who: s.principal.name.clone(),
        role: s.principal.role.as_str(),
        csrf: s.csrf.clone(),
        title: "Audit log",
        head: vec!["When", "Who", "Role", "Request", "Outcome", "Reason"],
        rows,
    })
}

/// `GET /console/anomalies`: the newest 200.
pub(super) async fn anomalies(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let s = match signed_in(&app, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let list = match crate::purchases::anomalies::list(&app, &crate::purchases::anomalies::Filter::default(), 200).await
    {
        Ok(l) => l,
        Err(e) => return failure(&e),
    };
    let rows = list
        .into_iter()
        .map(|a| {
            vec![
                when(a.created_ms),
                a.kind,
                a.order_id.unwrap_or_default(),
                format!("{} / {}", a.cabinet_id, a.door_id),
                if a.resolved { "resolved".into() } else { "open".into() },
                a.detail.to_string(),
            ]
        })
        .collect();
    render(&Rows {
        who: s.principal.name.clone(),
        role: s.principal.role.as_str(),
        csrf: s.csrf.clone(),
        title: "Anomalies",
        head: vec!["When", "Kind", "Order", "Cabinet / door", "State", "Detail"],
        rows,
    })
}

struct TaskLine {
    id: String,
    name: String,
    version: String,
    state: String,
    start: String,
    counts: String,
}

struct Validation {
    accepted: usize,
    rejected: Vec<(String, String)>,
}

/// The new-task form's values, given back after a validation.
#[derive(Default)]
struct TaskForm {
    name: String,
    version: String,
    upgrade_types: Vec<(&'static str, bool)>,
    task_types: Vec<(&'static str, bool)>,
    package_id: String,
    size_bytes: String,
    sha256: String,
    signature: String,
    url: String,
    vins: String,
}

const UPGRADE_TYPES: [&str; 3] = ["silent", "prompted", "forced"];
const TASK_TYPES: [&str; 3] = ["normal", "test", "factory"];

impl TaskForm {
    fn from(f: &Params) -> Self {
        let v = |k: &str| f.get(k).cloned().unwrap_or_default();
        let (upgrade, task) = (v("upgrade_type"), v("task_type"));
        TaskForm {
            name: v("name"),
            version: v("version"),
            upgrade_types: UPGRADE_TYPES.iter().map(|t| (*t, *t == upgrade)).collect(),
            task_types: TASK_TYPES.iter().map(|t| (*t, *t == task)).collect(),
            package_id: v("package_id"),
            size_bytes: v("size_bytes"),
            sha256: v("sha256"),
            signature: v("signature"),
            url: v("url"),
            vins: v("vins"),
        }
    }

    fn empty() -> Self {
        Self::from(&Params::new())
    }

    /// The task the form describes, created by the signed-in `by`.
    fn task(&self, by: &str) -> Result<crate::vehicles::ota::tasks::NewTask, StoreError> {
        let pick = |list: &[(&'static str, bool)]| list.iter().find(|(_, s)| *s).map_or(list[0].0, |(v, _)| *v);
        let body = serde_json::json!({
            "name": self.name.trim(),
            "version": self.version.trim(),
            "upgrade_type": pick(&self.upgrade_types),
            "task_type": pick(&self.task_types),
            "package": {
                "id": self.package_id.trim(),
                "size_bytes": self.size_bytes.trim().parse::<u64>().map_err(|_| StoreError::invalid("size_bytes", "a whole number of bytes"))?,
                "sha256": self.sha256.trim(),
                "signature": self.signature.trim(),
                "url": self.url.trim(),
            },
            "vins": self.vins.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>(),
            "created_by": by,
        });
        serde_json::from_value(body).map_err(|e| StoreError::invalid("task", e.to_string()))
    }
}

#[derive(Template)]
#[template(path = "console/ota.html")]
struct OtaPage {
    who: String,
    role: &'static str,
    csrf: String,
    may_act: bool,
    tasks: Vec<TaskLine>,
    form: TaskForm,
    validation: Option<Validation>,
    error: Option<String>,
}

async fn ota_page(
    app: &App,
    s: &Session,
    form: TaskForm,
    validation: Option<Validation>,
    error: Option<String>,
) -> Result<OtaPage, StoreError> {
    let tasks = crate::vehicles::ota::tasks::list(app, 100)
        .await?
        .into_iter()
        .map(|t| {
            let mut counts: Vec<String> = t.counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
            counts.sort();
            TaskLine {
                id: t.id,
                name: t.name,
                version: t.version,
                state: t.state,
                start: when(t.start_at_ms),
                counts: counts.join(", "),
            }
        })
        .collect();
    Ok(OtaPage {
        who: s.principal.name.clone(),
        role: s.principal.role.as_str(),
        csrf: s.csrf.clone(),
        may_act: s.may_act(),
        tasks,
        form,
        validation,
        error,
    })
}

/// `GET /console/ota`: the tasks and (operators) the new-task form.
pub(super) async fn ota(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let s = match signed_in(&app, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    match ota_page(&app, &s, TaskForm::empty(), None, None).await {
        Ok(p) => render(&p),
        Err(e) => failure(&e),
    }
}

/// `POST /console/ota`: `step=validate` shows what validation says (nothing is stored or
/// pushed); `step=create` creates the task and opens its page.
pub(super) async fn ota_submit(State(app): State<Arc<App>>, headers: HeaderMap, Form(f): Form<Params>) -> Response {
    let s = match acting(&app, &headers, f.get("csrf").map_or("", String::as_str)).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let form = TaskForm::from(&f);
    let task = match form.task(&s.principal.name) {
        Ok(t) => t,
        Err(e) => {
            return ota_page(&app, &s, form, None, Some(e.to_string()))
                .await
                .map_or_else(|e| failure(&e), |p| render(&p));
        }
    };
    if f.get("step").map(String::as_str) == Some("create") {
        let ctx = context(&s.principal, "/console/ota", "/console/ota".into());
        return match audit::scope(ctx, crate::vehicles::ota::tasks::create(&app, &task)).await {
            Ok(created) => Redirect::to(&format!("/console/ota/{}", created.task.id)).into_response(),
            Err(e) => {
                ota_page(&app, &s, form, None, Some(e.to_string())).await.map_or_else(|e| failure(&e), |p| render(&p))
            }
        };
    }
    let (validation, error) = match crate::vehicles::ota::tasks::validate(&app, &task).await {
        Ok((accepted, rejected)) => (
            Some(Validation {
                accepted: accepted.len(),
                rejected: rejected
                    .into_iter()
                    .map(|r| {
                        (
                            r.vin,
                            if r.detail.is_empty() {
                                r.reason.to_owned()
                            } else {
                                format!("{}: {}", r.reason, r.detail)
                            },
                        )
                    })
                    .collect(),
            }),
            None,
        ),
        Err(e) => (None, Some(e.to_string())),
    };
    ota_page(&app, &s, form, validation, error).await.map_or_else(|e| failure(&e), |p| render(&p))
}

#[derive(Template)]
#[template(path = "console/ota_task.html")]
struct OtaTaskPage {
    who: String,
    role: &'static str,
    csrf: String,
    may_act: bool,
    id: String,
    name: String,
    version: String,
    upgrade_type: String,
    task_type: String,
    state: String,
    start: String,
    created_by: String,
    counts: Vec<(String, i64)>,
    vehicles: Vec<(String, String, String, String)>,
    rejections: Vec<(String, String)>,
    message: Option<String>,
    error: Option<String>,
}

async fn ota_task_page(
    app: &App,
    s: &Session,
    id: &str,
    message: Option<String>,
    error: Option<String>,
) -> Result<OtaTaskPage, StoreError> {
    use crate::vehicles::ota::tasks;
    let t = tasks::get(app, id).await?;
    let mut counts: Vec<(String, i64)> = t.counts.into_iter().collect();
    counts.sort();
    let vehicles = tasks::vehicles(app, id, None, None, 500)
        .await?
        .into_iter()
        .map(|v| {
            let detail = match (&v.ecu, v.ecu_percent) {
                (Some(ecu), Some(p)) => format!("{ecu} {p}%"),
                _ => format!("download {}%, upgrade {}%", v.download_percent, v.upgrade_percent),
            };
            (v.vin, v.state, v.from_version.unwrap_or_default(), detail)
        })
        .collect();
    let rejections = tasks::rejections(app, id).await?.into_iter().map(|r| (r.vin, r.reason.to_owned())).collect();
    Ok(OtaTaskPage {
        who: s.principal.name.clone(),
        role: s.principal.role.as_str(),
        csrf: s.csrf.clone(),
        may_act: s.may_act(),
        id: t.id,
        name: t.name,
        version: t.version,
        upgrade_type: t.upgrade_type,
        task_type: t.task_type,
        state: t.state,
        start: when(t.start_at_ms),
        created_by: t.created_by,
        counts,
        vehicles,
        rejections,
        message,
        error,
    })
}

/// `GET /console/ota/{id}`: a task's progress per state, its vehicles and refusals.
pub(super) async fn ota_task(State(app): State<Arc<App>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let s = match signed_in(&app, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    match ota_task_page(&app, &s, &id, None, None).await {
        Ok(p) => render(&p),
        Err(e) => failure(&e),
    }
}

/// `POST /console/ota/{id}/cancel`.
pub(super) async fn ota_cancel(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    let s = match acting(&app, &headers, &f.csrf).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let ctx = context(&s.principal, "/console/ota/{id}/cancel", format!("/console/ota/{id}/cancel"));
    let (message, error) = match audit::scope(ctx, crate::vehicles::ota::tasks::cancel(&app, &id)).await {
        Ok(_) => (Some("Cancelled.".to_owned()), None),
        Err(e) => (None, Some(e.to_string())),
    };
    match ota_task_page(&app, &s, &id, message, error).await {
        Ok(p) => render(&p),
        Err(e) => failure(&e),
    }
}

#[derive(Template)]
#[template(path = "console/dead_letters.html")]
struct DeadLettersPage {
    who: String,
    role: &'static str,
    csrf: String,
    may_act: bool,
    letters: Vec<(i64, String, String, String, String, String)>,
    message: Option<String>,
    error: Option<String>,
}

async fn dead_letters_page(
    app: &App,
    s: &Session,
    message: Option<String>,
    error: Option<String>,
) -> Result<DeadLettersPage, StoreError> {
    let letters = crate::dead_letters::list(app, false, None, 200)
        .await?
        .into_iter()
        .map(|d| {
            let replayed = d.replayed_ms.map(when).unwrap_or_default();
            (d.id, when(d.created_ms), format!("{} {}", d.stream, d.entry_id), d.kind, d.error, replayed)
        })
        .collect();
    Ok(DeadLettersPage {
        who: s.principal.name.clone(),
        role: s.principal.role.as_str(),
        csrf: s.csrf.clone(),
        may_act: s.may_act(),
        letters,
        message,
        error,
    })
}

/// `GET /console/dead-letters`: upstream entries set aside, newest first.
pub(super) async fn dead_letters(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let s = match signed_in(&app, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    dead_letters_page(&app, &s, None, None).await.map_or_else(|e| failure(&e), |p| render(&p))
}

/// `POST /console/dead-letters/{id}/replay`: the entry appended to its stream again.
pub(super) async fn replay(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Form(f): Form<CsrfForm>,
) -> Response {
    let s = match acting(&app, &headers, &f.csrf).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let ctx = context(&s.principal, "/console/dead-letters/{id}/replay", format!("/console/dead-letters/{id}/replay"));
    let (message, error) = match audit::scope(ctx, crate::dead_letters::replay(&app, id)).await {
        Ok(entry) => (Some(format!("Appended again as {entry}.")), None),
        Err(e) => (None, Some(e.to_string())),
    };
    dead_letters_page(&app, &s, message, error).await.map_or_else(|e| failure(&e), |p| render(&p))
}

/// `GET /console/alerts`: open service alerts, and the newest notices (restock orders,
/// anomalies, inspections, calibrations, OTA failures) from the `notices` stream.
pub(super) async fn alerts(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let s = match signed_in(&app, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let alerts = match open_alerts(&app).await {
        Ok(a) => a,
        Err(e) => return failure(&e),
    };
    let mut con = app.redis.clone();
    let stream = format!("{}{}", app.keys.prefix(), crate::purchases::outbox::NOTICES);
    let notices: redis::streams::StreamRangeReply = match redis::cmd("XREVRANGE")
        .arg(&stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(100)
        .query_async(&mut con)
        .await
    {
        Ok(n) => n,
        Err(e) => return failure(&StoreError::from(e)),
    };
    let mut rows: Vec<Vec<String>> = alerts.into_iter().map(|a| vec!["alert".into(), String::new(), a]).collect();
    for entry in notices.ids {
        let at = entry.id.split('-').next().and_then(|ms| ms.parse().ok()).map(when).unwrap_or_default();
        let payload = match entry.map.get("payload") {
            Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            _ => String::new(),
        };
        rows.push(vec!["notice".into(), at, payload]);
    }
    render(&Rows {
        who: s.principal.name.clone(),
        role: s.principal.role.as_str(),
        csrf: s.csrf.clone(),
        title: "Alerts and notices",
        head: vec!["What", "When", "Detail"],
        rows,
    })
}
