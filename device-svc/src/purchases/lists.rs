//! Orders as a list an operator pages through: by state, cabinet, user, payment, creation time
//! and the review queue, newest first, in keyset pages ([`crate::listing`]). Every filter
//! alone is served by an index ending in `(created_at DESC, id DESC)`, so a page is read in
//! index order and stops after `limit` rows whatever the table's size.

use std::time::SystemTime;

use super::orders::{COLUMNS, Order};
use crate::app::App;
use crate::error::StoreError;
use crate::listing::{self, Cursor, Page, Params, Select};

/// What an order list is filtered by; `None` is "any".
#[derive(Debug, Clone, Default)]
pub struct OrderFilter {
    /// One of the states (`created` ... `abnormal`).
    pub state: Option<String>,
    /// The cabinet.
    pub cabinet_id: Option<String>,
    /// The shopper.
    pub user_id: Option<String>,
    /// `pending`, `paid`, `unpaid`, `waived` or `refunded`.
    pub payment: Option<String>,
    /// Only orders with something to review (`review` not empty, or `abnormal`).
    pub review: bool,
    /// Created at or after.
    pub from: Option<SystemTime>,
    /// Created before.
    pub to: Option<SystemTime>,
}

/// The statement of an order list (public for the plan test).
///
/// # Errors
/// `Invalid` for a cursor without a time.
pub fn query(f: &OrderFilter, after: Option<&Cursor>, limit: i64) -> Result<(String, Params), StoreError> {
    let mut s = Select::new(format!("SELECT {COLUMNS} FROM orders"));
    if let Some(v) = &f.state {
        s.bind("state = $", v.clone());
    }
    if let Some(v) = &f.cabinet_id {
        s.bind("cabinet_id = $", v.clone());
    }
    if let Some(v) = &f.user_id {
        s.bind("user_id = $", v.clone());
    }
    if let Some(v) = &f.payment {
        s.bind("payment = $", v.clone());
    }
    if f.review {
        // The partial index `orders_to_review` has exactly this predicate.
        s.and("(review <> '{}' OR state = 'abnormal')");
    }
    if let Some(v) = f.from {
        s.bind("created_at >= $", v);
    }
    if let Some(v) = f.to {
        s.bind("created_at < $", v);
    }
    if let Some(c) = after {
        s.bind2("(created_at, id) < ($a, $b)", c.time()?, c.id.clone());
    }
    Ok(s.finish("ORDER BY created_at DESC, id DESC", limit))
}

/// A page of orders, newest first.
///
/// # Errors
/// `Invalid` for a bad cursor; storage errors.
pub async fn orders(app: &App, f: &OrderFilter, after: Option<&Cursor>, limit: i64) -> Result<Page<Order>, StoreError> {
    let (sql, params) = query(f, after, limit)?;
    let client = app.pg.get().await?;
    let rows = client.query(&sql, &listing::refs(&params)).await?;
    let items: Vec<(Order, SystemTime)> = rows.iter().map(|r| (Order::from_row(r), r.get(14))).collect();
    let page = listing::page(items, limit, |(o, at)| Cursor::after(Some(*at), o.id.clone()));
    Ok(Page { items: page.items.into_iter().map(|(o, _)| o).collect(), next_cursor: page.next_cursor })
}
