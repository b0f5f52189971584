//! The list routes: `GET /v1/devices`, `/v1/cabinets`, `/v1/vehicles` and `/v1/orders`, each
//! a keyset page (`{"items", "next_cursor"}`) filtered by query parameters. Every parameter is
//! checked against the values the column can hold and bounded in length; an unknown
//! parameter is refused (400 naming it) rather than ignored, so a misspelt filter cannot
//! silently list everything.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};

use super::error::ApiError;
use super::extract::query_num;
use crate::app::App;
use crate::fleet::{self, CabinetFilter, CabinetRow, DeviceFilter, DeviceRow, DeviceSort, VehicleFilter, VehicleRow};
use crate::listing::{self, Cursor, Page};
use crate::purchases::lists::{self as order_lists, OrderFilter};
use crate::purchases::orders::Order;

type Params = HashMap<String, String>;

/// The longest filter value taken (ids, users, versions, prefixes).
const MAX_VALUE: usize = 128;

const DEVICE_STATUSES: &[&str] = &["registered", "pending_init", "online", "offline"];
const ORDER_STATES: &[&str] =
    &["created", "authorised", "door_opening", "door_open", "door_closed", "settled", "cancelled", "abnormal"];
const PAYMENTS: &[&str] = &["pending", "paid", "unpaid", "waived", "refunded"];

/// Refuses a parameter outside `known` (the page parameters are always known).
fn only(q: &Params, known: &[&str]) -> Result<(), ApiError> {
    match q.keys().find(|k| !known.contains(&k.as_str()) && !matches!(k.as_str(), "limit" | "cursor")) {
        Some(k) => {
            Err(ApiError::invalid(k.clone(), format!("unknown parameter; this list takes {}", known.join(", "))))
        }
        None => Ok(()),
    }
}

/// A free-text value, bounded, without control characters.
fn text(q: &Params, name: &'static str) -> Result<Option<String>, ApiError> {
    let Some(v) = q.get(name) else { return Ok(None) };
    if v.is_empty() || v.len() > MAX_VALUE || v.chars().any(char::is_control) {
        return Err(ApiError::invalid(name, format!("1 to {MAX_VALUE} characters, no control characters")));
    }
    Ok(Some(v.clone()))
}

/// A value that must be one of `allowed`.
fn one_of(q: &Params, name: &'static str, allowed: &[&str]) -> Result<Option<String>, ApiError> {
    match q.get(name) {
        Some(v) if allowed.contains(&v.as_str()) => Ok(Some(v.clone())),
        Some(v) => Err(ApiError::invalid(name, format!("{v:?} is not one of {}", allowed.join(", ")))),
        None => Ok(None),
    }
}

fn flag(q: &Params, name: &'static str) -> Result<Option<bool>, ApiError> {
    one_of(q, name, &["true", "false"]).map(|v| v.map(|v| v == "true"))
}

fn time(q: &Params, name: &'static str) -> Result<Option<std::time::SystemTime>, ApiError> {
    Ok(query_num::<u64>(q, name)?.map(listing::time_of_ms))
}

/// The page parameters: the cursor (if any) and the size.
fn paging(q: &Params) -> Result<(Option<Cursor>, i64), ApiError> {
    let cursor = q.get("cursor").map(|c| Cursor::decode(c)).transpose()?;
    Ok((cursor, listing::limit(query_num::<i64>(q, "limit")?)?))
}

/// `GET /v1/devices?kind=&status=&node=&enabled=&q=&changed_from_ms=&changed_before_ms=&sort=key|changed&limit=&cursor=`
pub(super) async fn devices(
    State(app): State<Arc<App>>,
    Query(q): Query<Params>,
) -> Result<Json<Page<DeviceRow>>, ApiError> {
    only(&q, &["kind", "status", "node", "enabled", "q", "changed_from_ms", "changed_before_ms", "sort"])?;
    let filter = DeviceFilter {
        kind: one_of(&q, "kind", &["cab", "veh"])?,
        status: one_of(&q, "status", DEVICE_STATUSES)?,
        node: text(&q, "node")?,
        enabled: flag(&q, "enabled")?,
        key_prefix: text(&q, "q")?,
        changed_from: time(&q, "changed_from_ms")?,
        changed_before: time(&q, "changed_before_ms")?,
        sort: match one_of(&q, "sort", &["key", "changed"])?.as_deref() {
            Some("changed") => DeviceSort::Changed,
            _ => DeviceSort::Key,
        },
    };
    let (cursor, limit) = paging(&q)?;
    Ok(Json(fleet::devices(&app, &filter, cursor.as_ref(), limit).await?))
}

/// `GET /v1/cabinets?q=&status=&limit=&cursor=`: by id, with doors and lanes.
pub(super) async fn cabinets(
    State(app): State<Arc<App>>,
    Query(q): Query<Params>,
) -> Result<Json<Page<CabinetRow>>, ApiError> {
    only(&q, &["q", "status"])?;
    let filter = CabinetFilter { id_prefix: text(&q, "q")?, status: one_of(&q, "status", DEVICE_STATUSES)? };
    let (cursor, limit) = paging(&q)?;
    Ok(Json(fleet::cabinets(&app, &filter, cursor.as_ref(), limit).await?))
}

/// `GET /v1/vehicles?q=&state=&sw_version=&owner=&limit=&cursor=`: by VIN.
pub(super) async fn vehicles(
    State(app): State<Arc<App>>,
    Query(q): Query<Params>,
) -> Result<Json<Page<VehicleRow>>, ApiError> {
    only(&q, &["q", "state", "sw_version", "owner"])?;
    let filter = VehicleFilter {
        vin_prefix: text(&q, "q")?,
        state: one_of(&q, "state", &crate::vehicles::profile::STATES)?,
        sw_version: text(&q, "sw_version")?,
        owner_user_id: text(&q, "owner")?,
    };
    let (cursor, limit) = paging(&q)?;
    Ok(Json(fleet::vehicles(&app, &filter, cursor.as_ref(), limit).await?))
}

/// `GET /v1/orders?state=&cabinet_id=&user_id=&payment=&review=true&from_ms=&to_ms=&limit=&cursor=`:
/// newest first, without transitions and payments (`GET /v1/orders/{id}` has them).
pub(super) async fn orders(
    State(app): State<Arc<App>>,
    Query(q): Query<Params>,
) -> Result<Json<Page<Order>>, ApiError> {
    only(&q, &["state", "cabinet_id", "user_id", "payment", "review", "from_ms", "to_ms"])?;
    let filter = OrderFilter {
        state: one_of(&q, "state", ORDER_STATES)?,
        cabinet_id: text(&q, "cabinet_id")?,
        user_id: text(&q, "user_id")?,
        payment: one_of(&q, "payment", PAYMENTS)?,
        review: flag(&q, "review")?.unwrap_or(false),
        from: time(&q, "from_ms")?,
        to: time(&q, "to_ms")?,
    };
    let (cursor, limit) = paging(&q)?;
    Ok(Json(order_lists::orders(&app, &filter, cursor.as_ref(), limit).await?))
}
