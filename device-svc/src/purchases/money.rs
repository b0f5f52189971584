//! Money after the door closed (seed documents 002 and 003): the settlement, an operator's
//! refunds and extra charges, and the account service's answer to each.
//!
//! Every message that moves money is a row of `payments` with its own idempotency key, written
//! in the transaction that decided it together with its outbox message, and published until
//! the account service confirms it (`outbox`). The confirmation carries the result: `paid`, or
//! `failed` with a reason. A `failed` charge makes the order `unpaid`, which refuses the user's
//! next purchase until a later `paid` (the account side retries what failed for a transient
//! reason) or an operator's decision (`waive`, payment `waived`). An order's `payment`, `charged_cents` and
//! `refunded_cents` are recomputed from its rows in the transaction that records a result, so
//! they can never disagree with what the account side said.
//!
//! Refunds are bounded by what was paid: per lane and item (priced from the settlement's own
//! lines) or as an amount, never more in total than charged, counting refunds still pending.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_postgres::Transaction;

use super::outbox;
use super::reckon::Line;
use crate::app::{App, ms_of};
use crate::error::StoreError;

/// What a `payments` row asks of the account service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The order's charge, from the weights (or an operator's count).
    Settlement,
    /// Money back to the shopper.
    Refund,
    /// An extra charge an operator added.
    Charge,
    /// Stop retrying a failed charge (an operator waived it): names it in `voids`.
    Void,
}

impl Kind {
    /// The column value, the outbox message's `type` and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Settlement => "settlement",
            Kind::Refund => "refund",
            Kind::Charge => "charge",
            Kind::Void => "void",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "refund" => Kind::Refund,
            "charge" => Kind::Charge,
            "void" => Kind::Void,
            _ => Kind::Settlement,
        }
    }
}

/// One money message and its result, as stored and shown with its order.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Payment {
    /// Its idempotency key (also the outbox key).
    pub idem_key: String,
    /// Settlement, refund or charge.
    pub kind: Kind,
    /// Cents (always positive; the kind says which way).
    pub amount_cents: i64,
    /// Lanes and items, for a settlement and a refund by item.
    pub lines: Value,
    /// The operator's reason (refund, charge, waiver).
    pub reason: Option<String>,
    /// The operator who asked for it.
    pub operator: Option<String>,
    /// `pending`, `paid`, `failed` or `waived`.
    pub result: String,
    /// Why the account side failed it.
    pub failure: Option<String>,
    /// When it was written, ms since the Unix epoch.
    pub created_ms: u64,
    /// When its result arrived.
    pub result_ms: Option<u64>,
}

const PAYMENT_COLUMNS: &str =
    "idem_key, kind, amount_cents, lines, reason, operator, result, failure, created_at, result_at";

fn payment_of(r: &tokio_postgres::Row) -> Payment {
    Payment {
        idem_key: r.get(0),
        kind: Kind::parse(r.get(1)),
        amount_cents: r.get(2),
        lines: r.get(3),
        reason: r.get(4),
        operator: r.get(5),
        result: r.get(6),
        failure: r.get(7),
        created_ms: ms_of(r.get(8)),
        result_ms: r.get::<_, Option<std::time::SystemTime>>(9).map(ms_of),
    }
}

/// The money messages of order `id`, oldest first.
///
/// # Errors
/// PostgreSQL errors.
pub async fn of_order(app: &App, id: &str) -> Result<Vec<Payment>, StoreError> {
    let client = app.pg.get().await?;
    let rows = client
        .query(
            &format!("SELECT {PAYMENT_COLUMNS} FROM payments WHERE order_id = $1 ORDER BY created_at, idem_key"),
            &[&id],
        )
        .await?;
    Ok(rows.iter().map(payment_of).collect())
}

/// The order fields a money message names.
#[derive(Debug)]
pub struct OrderRef<'a> {
    /// Order id.
    pub id: &'a str,
    /// The shopper.
    pub user_id: &'a str,
    /// The shop.
    pub tenant: Option<&'a str>,
    /// The provider's reference of the authorisation.
    pub payment_id: Option<&'a str>,
    /// Currency.
    pub currency: &'a str,
    /// Cabinet.
    pub cabinet_id: &'a str,
    /// Door.
    pub door_id: u8,
}

/// [`OrderRef`]'s fields, read from the order's row.
#[derive(Debug)]
struct OrderFields {
    id: String,
    user_id: String,
    tenant: Option<String>,
    payment_id: Option<String>,
    currency: String,
    cabinet_id: String,
    door_id: u8,
}

impl OrderFields {
    async fn load(tx: &Transaction<'_>, id: &str) -> Result<Self, StoreError> {
        let r = tx
            .query_one(
                "SELECT user_id, tenant, payment_id, currency, cabinet_id, door_id FROM orders WHERE id = $1",
                &[&id],
            )
            .await?;
        Ok(Self {
            id: id.to_owned(),
            user_id: r.get(0),
            tenant: r.get(1),
            payment_id: r.get(2),
            currency: r.get(3),
            cabinet_id: r.get(4),
            door_id: u8::try_from(r.get::<_, i16>(5)).unwrap_or(0),
        })
    }

    fn as_ref(&self) -> OrderRef<'_> {
        OrderRef {
            id: &self.id,
            user_id: &self.user_id,
            tenant: self.tenant.as_deref(),
            payment_id: self.payment_id.as_deref(),
            currency: &self.currency,
            cabinet_id: &self.cabinet_id,
            door_id: self.door_id,
        }
    }
}

/// A money message to write.
#[derive(Debug)]
pub struct NewPayment<'a> {
    /// Its idempotency key.
    pub idem_key: &'a str,
    /// What it asks.
    pub kind: Kind,
    /// Cents.
    pub amount_cents: i64,
    /// Lanes and items.
    pub lines: &'a [Line],
    /// The operator's reason.
    pub reason: Option<&'a str>,
    /// The operator.
    pub operator: Option<&'a str>,
    /// Anomalies to name in the message (a settlement's `review`).
    pub review: &'a [String],
    /// For a void: the key of the charge it voids.
    pub voids: Option<&'a str>,
}

/// Writes a money message for `order` inside `tx`: its `payments` row and its outbox message
/// (stream `P account:settlements`, `type` = the kind), and recomputes the order's payment.
/// `Ok(false)`: a message with this key exists (nothing written).
///
/// # Errors
/// PostgreSQL errors.
pub async fn write(tx: &Transaction<'_>, order: &OrderRef<'_>, p: &NewPayment<'_>) -> Result<bool, StoreError> {
    let lines = serde_json::to_value(p.lines).map_err(|e| StoreError::invalid("lines", e.to_string()))?;
    let inserted = tx
        .execute(
            "INSERT INTO payments (idem_key, order_id, kind, amount_cents, lines, reason, operator)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (idem_key) DO NOTHING",
            &[&p.idem_key, &order.id, &p.kind.as_str(), &p.amount_cents, &lines, &p.reason, &p.operator],
        )
        .await?;
    if inserted == 0 {
        return Ok(false);
    }
    let message = json!({
        "type": p.kind.as_str(),
        "idem_key": p.idem_key,
        "order_id": order.id,
        "user_id": order.user_id,
        "tenant": order.tenant,
        "payment_id": order.payment_id,
        "currency": order.currency,
        "cabinet_id": order.cabinet_id,
        "door_id": order.door_id,
        "amount_cents": p.amount_cents,
        "lines": lines,
        "reason": p.reason,
        "review": p.review,
        "voids": p.voids,
    });
    outbox::enqueue(tx, outbox::SETTLEMENTS, p.idem_key, &message).await?;
    recompute(tx, &[order.id.to_owned()]).await?;
    Ok(true)
}

/// The account service's answer to one money message (a confirmation entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The message's key.
    pub idem_key: String,
    /// What it said.
    pub result: Outcome,
}

/// What the account service said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The money moved (for a refund: went back).
    Paid,
    /// It did not, and why (`insufficient_funds`, `no_contract`, ...; `refused` for a message
    /// the account service could not read).
    Failed(String),
}

impl Outcome {
    /// From a confirmation's `result` and `reason` fields. `None`: not an answer this service
    /// knows (counted and dropped by the reader).
    pub fn parse(result: &str, reason: Option<&str>) -> Option<Self> {
        let reason =
            || reason.filter(|r| !r.is_empty() && r.len() <= 128 && !r.contains('\0')).unwrap_or("unspecified");
        match result {
            "paid" => Some(Outcome::Paid),
            "failed" => Some(Outcome::Failed(reason().to_owned())),
            "refused" => Some(Outcome::Failed(format!("refused:{}", reason()))),
            _ => None,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Outcome::Paid => "paid",
            Outcome::Failed(_) => "failed",
        }
    }
}

/// Records answers, in one transaction: the outbox rows confirmed (not sent again), each
/// payment's result (`paid` is final; `failed` may become `paid`), and the payment of every
/// order concerned. Returns how many outbox rows were confirmed now.
///
/// # Errors
/// PostgreSQL errors: nothing is recorded; the answers are read again.
pub async fn record_answers(app: &App, answers: &[Answer]) -> Result<u64, StoreError> {
    if answers.is_empty() {
        return Ok(0);
    }
    let keys: Vec<&str> = answers.iter().map(|a| a.idem_key.as_str()).collect();
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let confirmed = tx
        .execute(
            "UPDATE outbox SET confirmed_at = now(), done_at = now()
              WHERE idem_key = ANY($1) AND confirmed_at IS NULL",
            &[&keys],
        )
        .await?;
    let mut orders = Vec::new();
    let mut counted = Vec::new();
    for a in answers {
        let (result, failure) = match &a.result {
            Outcome::Paid => ("paid", None),
            Outcome::Failed(why) => ("failed", Some(why.as_str())),
        };
        // `paid` is final; a repeated or late `failed` never undoes it.
        let row = tx
            .query_opt(
                "UPDATE payments SET result = $2, failure = $3, result_at = now()
                  WHERE idem_key = $1 AND (result IN ('pending', 'failed') OR (result = 'waived' AND $2 = 'paid'))
                    AND NOT (result = 'failed' AND $2 = 'failed' AND failure IS NOT DISTINCT FROM $3)
                  RETURNING order_id, kind",
                &[&a.idem_key, &result, &failure],
            )
            .await?;
        if let Some(r) = row {
            orders.push(r.get::<_, String>(0));
            counted.push((r.get::<_, String>(1), a.result.label()));
        }
    }
    orders.sort_unstable();
    orders.dedup();
    let unpaid_now = recompute(&tx, &orders).await?;
    tx.commit().await?;
    for (kind, result) in counted {
        app.metrics.payment_results.with_label_values(&[&kind, result]).inc();
    }
    for (id, payment) in unpaid_now {
        tracing::info!(order = %id, payment = %payment, "order payment changed");
    }
    Ok(confirmed)
}

/// Recomputes the payment, charged and refunded sums of `orders` from their rows; returns the
/// orders whose payment changed, with the new value.
async fn recompute(tx: &Transaction<'_>, orders: &[String]) -> Result<Vec<(String, String)>, StoreError> {
    if orders.is_empty() {
        return Ok(Vec::new());
    }
    let rows = tx
        .query(
            "WITH s AS (
               SELECT order_id,
                      coalesce(sum(amount_cents) FILTER (WHERE kind IN ('settlement', 'charge') AND result = 'paid'), 0) AS charged,
                      coalesce(sum(amount_cents) FILTER (WHERE kind = 'refund' AND result = 'paid'), 0) AS refunded,
                      count(*) FILTER (WHERE kind IN ('settlement', 'charge') AND result = 'failed') AS failed,
                      count(*) FILTER (WHERE kind IN ('settlement', 'charge') AND result = 'pending') AS pending,
                      count(*) FILTER (WHERE kind IN ('settlement', 'charge') AND result = 'waived') AS waived
                 FROM payments WHERE order_id = ANY($1) GROUP BY order_id),
             old AS (SELECT id, payment FROM orders WHERE id = ANY($1) FOR UPDATE)
             UPDATE orders o SET charged_cents = s.charged, refunded_cents = s.refunded,
                    payment = CASE WHEN s.failed > 0 THEN 'unpaid'
                                   WHEN s.pending > 0 THEN 'pending'
                                   WHEN s.charged > 0 AND s.refunded >= s.charged THEN 'refunded'
                                   WHEN s.waived > 0 THEN 'waived'
                                   ELSE 'paid' END
               FROM s, old WHERE o.id = s.order_id AND old.id = o.id
             RETURNING o.id, o.payment, old.payment",
            &[&orders],
        )
        .await?;
    Ok(rows
        .iter()
        .filter(|r| r.get::<_, Option<String>>(1) != r.get::<_, Option<String>>(2))
        .map(|r| (r.get(0), r.get::<_, Option<String>>(1).unwrap_or_default()))
        .collect())
}

/// Items refunded from one lane.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefundLine {
    /// Lane id (of the order's door).
    pub lane_id: u8,
    /// Items whose price goes back.
    pub items: i64,
}

/// An operator's refund or extra charge (`POST /v1/orders/{id}/refunds`, `.../charges`).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Adjustment {
    /// Who decided.
    pub operator: String,
    /// Why (shown to the account side and kept with the row).
    pub reason: String,
    /// An amount, cents (a charge; or a refund not by item).
    #[serde(default)]
    pub amount_cents: Option<i64>,
    /// A refund by lane and item, priced from the settlement's lines.
    #[serde(default)]
    pub lines: Option<Vec<RefundLine>>,
    /// The caller's key for this adjustment (1..=64 of `A-Za-z0-9_-`): the same key again
    /// answers the adjustment already made instead of making another.
    #[serde(default)]
    pub key: Option<String>,
}

/// Most cents one adjustment may move.
const MAX_ADJUSTMENT_CENTS: i64 = 10_000_000;

/// Refunds part or all of a paid order (by item or amount) or adds a charge to a settled one.
/// Returns the payment row (the existing one for a repeated `key`).
///
/// # Errors
/// `Invalid` (fields, an unknown lane, more items than were charged), `NotFound`, `Rejected`:
/// `not_settled`, `not_paid` (a refund before the charge was paid), `over_refund` (more than
/// was paid, counting pending refunds), `key_reused` (the key names another adjustment);
/// storage errors.
pub async fn adjust(app: &App, order_id: &str, kind: Kind, a: &Adjustment) -> Result<Payment, StoreError> {
    if a.operator.is_empty() || a.operator.len() > 128 {
        return Err(StoreError::invalid("operator", "1 to 128 characters"));
    }
    if a.reason.is_empty() || a.reason.len() > 256 {
        return Err(StoreError::invalid("reason", "1 to 256 characters"));
    }
    crate::auth::audit::note_reason(&format!("{}: {}", a.operator, a.reason));
    if let Some(k) = &a.key
        && (k.is_empty() || k.len() > 64 || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
    {
        return Err(StoreError::invalid("key", "1 to 64 of A-Z a-z 0-9 _ -"));
    }
    match (kind, &a.amount_cents, &a.lines) {
        (Kind::Charge, Some(_), None) | (Kind::Refund, Some(_), None) | (Kind::Refund, None, Some(_)) => {}
        (Kind::Charge, ..) => return Err(StoreError::invalid("amount_cents", "a charge names amount_cents only")),
        _ => return Err(StoreError::invalid("amount_cents", "a refund names amount_cents or lines, not both")),
    }
    if let Some(c) = a.amount_cents
        && !(1..=MAX_ADJUSTMENT_CENTS).contains(&c)
    {
        return Err(StoreError::invalid("amount_cents", format!("1..={MAX_ADJUSTMENT_CENTS}")));
    }
    let key = match &a.key {
        Some(k) => format!("{}:{order_id}:{k}", kind.as_str()),
        None => format!("{}:{order_id}:{}", kind.as_str(), super::lock::token("k")?),
    };
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_opt("SELECT state, payment, charged_cents FROM orders WHERE id = $1 FOR UPDATE", &[&order_id])
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("order {order_id}")))?;
    if let Some(existing) =
        tx.query_opt(&format!("SELECT {PAYMENT_COLUMNS}, order_id FROM payments WHERE idem_key = $1"), &[&key]).await?
    {
        let p = payment_of(&existing);
        let same = existing.get::<_, String>(10) == order_id
            && p.kind == kind
            && p.reason.as_deref() == Some(a.reason.as_str())
            && a.amount_cents.is_none_or(|c| c == p.amount_cents);
        return if same { Ok(p) } else { Err(StoreError::rejected("key_reused", "the key names another adjustment")) };
    }
    let (state, payment): (String, Option<String>) = (row.get(0), row.get(1));
    if state != "settled" {
        return Err(StoreError::rejected("not_settled", format!("order {order_id} is {state}, not settled")));
    }
    let mut lines = Vec::new();
    let amount = if kind == Kind::Refund {
        if !matches!(payment.as_deref(), Some("paid" | "refunded")) {
            return Err(StoreError::rejected(
                "not_paid",
                format!(
                    "order {order_id}'s payment is {}; only paid money is refunded",
                    payment.as_deref().unwrap_or("none")
                ),
            ));
        }
        let charged: i64 = row.get(2);
        let open = tx
            .query_one(
                "SELECT coalesce(sum(amount_cents), 0)::bigint FROM payments
                  WHERE order_id = $1 AND kind = 'refund' AND result IN ('pending', 'paid')",
                &[&order_id],
            )
            .await?
            .get::<_, i64>(0);
        let amount = match &a.lines {
            Some(asked) => {
                lines = refund_lines(&tx, order_id, asked).await?;
                lines.iter().map(|l| l.amount_cents).sum()
            }
            None => a.amount_cents.unwrap_or(0),
        };
        if amount > charged - open {
            return Err(StoreError::rejected(
                "over_refund",
                format!("{amount} cents asked; {} of the {charged} paid are left to refund", charged - open),
            ));
        }
        amount
    } else {
        a.amount_cents.unwrap_or(0)
    };
    let order = OrderFields::load(&tx, order_id).await?;
    let new = NewPayment {
        idem_key: &key,
        kind,
        amount_cents: amount,
        lines: &lines,
        reason: Some(&a.reason),
        operator: Some(&a.operator),
        review: &[],
        voids: None,
    };
    write(&tx, &order.as_ref(), &new).await?;
    let written = tx.query_one(&format!("SELECT {PAYMENT_COLUMNS} FROM payments WHERE idem_key = $1"), &[&key]).await?;
    crate::auth::audit::commit(tx).await?;
    app.metrics.payment_adjustments.with_label_values(&[kind.as_str()]).inc();
    app.purchase_wakers.relay.notify_one();
    tracing::info!(order = %order_id, kind = kind.as_str(), amount_cents = amount, operator = %a.operator, "adjustment");
    Ok(payment_of(&written))
}

/// Prices a refund by item from the lines charged (the settlement's and any earlier refund's):
/// at most the items charged per lane, less those refunded or being refunded.
async fn refund_lines(tx: &Transaction<'_>, order_id: &str, asked: &[RefundLine]) -> Result<Vec<Line>, StoreError> {
    if asked.is_empty() || asked.len() > 64 {
        return Err(StoreError::invalid("lines", "1 to 64 lines"));
    }
    let rows = tx
        .query(
            "SELECT kind, lines FROM payments WHERE order_id = $1
                AND ((kind = 'settlement' AND result = 'paid') OR (kind = 'refund' AND result IN ('pending', 'paid')))",
            &[&order_id],
        )
        .await?;
    // lane -> (product, unit price, items left to refund)
    let mut left: BTreeMap<u8, (String, i64, i64)> = BTreeMap::new();
    for r in &rows {
        let refund = r.get::<_, String>(0) == "refund";
        let lines: Vec<Line> = serde_json::from_value(r.get(1)).unwrap_or_default();
        for l in lines {
            let e = left.entry(l.lane_id).or_insert_with(|| (l.product_id.clone(), l.unit_price_cents, 0));
            e.2 += if refund { -l.items } else { l.items };
        }
    }
    let mut out: Vec<Line> = Vec::new();
    for a in asked {
        let Some((product, price, items_left)) = left.get_mut(&a.lane_id) else {
            return Err(StoreError::invalid("lines.lane_id", format!("nothing was charged from lane {}", a.lane_id)));
        };
        if a.items < 1 || a.items > *items_left {
            return Err(StoreError::invalid(
                "lines.items",
                format!("lane {}: 1..={} items left to refund", a.lane_id, *items_left),
            ));
        }
        *items_left -= a.items;
        out.push(Line {
            lane_id: a.lane_id,
            product_id: product.clone(),
            items: a.items,
            unit_price_cents: *price,
            amount_cents: a.items.saturating_mul(*price),
        });
    }
    Ok(out)
}

/// The body of `POST /v1/orders/{id}/waive`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Waiver {
    /// Who decided.
    pub operator: String,
    /// Why (paid another way, written off).
    pub reason: String,
}

/// An operator's decision about an unpaid order: its failed charges are waived (paid another
/// way, or written off), its payment becomes `waived` and the user may buy again. A later `paid` from the account side still
/// records the money.
///
/// # Errors
/// `Invalid`, `NotFound`, `Rejected("not_unpaid")` (an order already `waived` is no error: the
/// decision stands and nothing more is done), or storage errors.
pub async fn waive(app: &App, order_id: &str, w: &Waiver) -> Result<(), StoreError> {
    if w.operator.is_empty() || w.operator.len() > 128 {
        return Err(StoreError::invalid("operator", "1 to 128 characters"));
    }
    if w.reason.is_empty() || w.reason.len() > 256 {
        return Err(StoreError::invalid("reason", "1 to 256 characters"));
    }
    crate::auth::audit::note_reason(&format!("{}: {}", w.operator, w.reason));
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let payment: Option<String> = tx
        .query_opt("SELECT payment FROM orders WHERE id = $1 FOR UPDATE", &[&order_id])
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("order {order_id}")))?
        .get(0);
    if payment.as_deref() == Some("waived") {
        // Already decided: an operator's retry (after an answer lost, or a 503 that came after
        // the commit) gets the same answer, and nothing is voided twice.
        return Ok(());
    }
    if payment.as_deref() != Some("unpaid") {
        return Err(StoreError::rejected(
            "not_unpaid",
            format!("order {order_id}'s payment is {}", payment.as_deref().unwrap_or("none")),
        ));
    }
    let waived: Vec<String> = tx
        .query(
            "UPDATE payments SET result = 'waived', result_at = now(),
                    reason = coalesce(reason || '; ', '') || 'waived by ' || $2 || ': ' || $3
              WHERE order_id = $1 AND kind IN ('settlement', 'charge') AND result = 'failed'
              RETURNING idem_key",
            &[&order_id, &w.operator, &w.reason],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // The account side retries a failed charge on its own: tell it to stop, or a shopper who
    // paid another way would be charged again.
    let target = OrderFields::load(&tx, order_id).await?;
    for key in &waived {
        let void_key = format!("void:{key}");
        let void = NewPayment {
            idem_key: &void_key,
            kind: Kind::Void,
            amount_cents: 0,
            lines: &[],
            reason: Some(&w.reason),
            operator: Some(&w.operator),
            review: &[],
            voids: Some(key),
        };
        write(&tx, &target.as_ref(), &void).await?;
    }
    recompute(&tx, &[order_id.to_owned()]).await?;
    crate::auth::audit::commit(tx).await?;
    app.metrics.payment_adjustments.with_label_values(&["waiver"]).inc();
    app.purchase_wakers.relay.notify_one();
    tracing::info!(order = %order_id, operator = %w.operator, "unpaid order waived");
    Ok(())
}

/// Sets `devsvc_orders_unpaid`.
///
/// # Errors
/// PostgreSQL errors.
pub async fn refresh_gauges(app: &App) -> Result<(), StoreError> {
    let client = app.pg.get().await?;
    let n: i64 = client.query_one("SELECT count(*) FROM orders WHERE payment = 'unpaid'", &[]).await?.get(0);
    app.metrics.orders_unpaid.set(n);
    Ok(())
}
