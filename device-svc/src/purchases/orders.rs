//! Orders: creating one (the checks and the door's lock), the payment provider's callback,
//! reading one with its history, and the transition every other part goes through.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_postgres::Transaction;
use tokio_postgres::types::ToSql;

use super::State;
use super::lock::{self, Door};
use crate::app::{App, ms_of};
use crate::error::StoreError;

/// The columns [`Order::from_row`] reads, in order.
pub const COLUMNS: &str = "id, user_id, cabinet_id, door_id, state, door_state, reason, review, lock_token, goods, \
                           open_attempts, opened_ms, closed_ms, amount_cents, created_at, door_closed_at, \
                           authorised_at, tenant, hold_cents, currency, payment, charged_cents, refunded_cents";
/// How many columns [`COLUMNS`] names (a query may return more after them).
pub const COLUMN_COUNT: usize = 23;

/// An order as stored.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Order {
    /// Id (also the order id the cabinet sees).
    pub id: String,
    /// The shopper.
    pub user_id: String,
    /// Cabinet.
    pub cabinet_id: String,
    /// Door.
    pub door_id: u8,
    /// State.
    pub state: State,
    /// `closed`, `opening`, `open` or `abnormal` (the cabinet never confirmed).
    pub door_state: String,
    /// Why it was cancelled or went abnormal.
    pub reason: Option<String>,
    /// Anomalies an operator should review even though the order settled.
    pub review: Vec<String>,
    #[serde(skip)]
    pub(crate) lock_token: String,
    /// The lanes behind the door when it was opened (product, price, weight).
    pub goods: Option<serde_json::Value>,
    /// Open commands and door queries sent so far.
    pub open_attempts: i32,
    /// When the door opened, ms (cabinet clock).
    pub opened_ms: Option<i64>,
    /// When the door closed, ms (cabinet clock).
    pub closed_ms: Option<i64>,
    /// What was charged, cents.
    pub amount_cents: Option<i64>,
    /// The amount the payment provider must authorise (the most the order may charge), cents.
    pub hold_cents: i64,
    /// Currency of the hold and the charge.
    pub currency: String,
    /// `null` until settled, then `pending` (the account service has not answered), `paid`,
    /// `unpaid` (a charge failed: the user cannot buy until it is paid or waived), `waived` (an
    /// operator decided about the failed charge) or `refunded`.
    pub payment: Option<String>,
    /// Charges the account service reported paid (settlement and extra charges), cents.
    pub charged_cents: i64,
    /// Refunds the account service reported paid, cents.
    pub refunded_cents: i64,
    /// The shop (tenant) that created the order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// When the order was created, ms since the Unix epoch.
    pub created_ms: u64,
    #[serde(skip)]
    pub(crate) door_closed_ms: Option<u64>,
    #[serde(skip)]
    pub(crate) authorised_ms: Option<u64>,
}

impl Order {
    /// Reads the [`COLUMNS`] of a row.
    pub fn from_row(r: &tokio_postgres::Row) -> Self {
        Self {
            id: r.get(0),
            user_id: r.get(1),
            cabinet_id: r.get(2),
            door_id: u8::try_from(r.get::<_, i16>(3)).unwrap_or(0),
            state: State::parse(r.get(4)).unwrap_or(State::Abnormal),
            door_state: r.get(5),
            reason: r.get(6),
            review: r.get(7),
            lock_token: r.get(8),
            goods: r.get(9),
            open_attempts: r.get(10),
            opened_ms: r.get(11),
            closed_ms: r.get(12),
            amount_cents: r.get(13),
            created_ms: ms_of(r.get(14)),
            door_closed_ms: r.get::<_, Option<std::time::SystemTime>>(15).map(ms_of),
            authorised_ms: r.get::<_, Option<std::time::SystemTime>>(16).map(ms_of),
            tenant: r.get(17),
            hold_cents: r.get(18),
            currency: r.get(19),
            payment: r.get(20),
            charged_cents: r.get(21),
            refunded_cents: r.get(22),
        }
    }

    /// The door, as the lock names it.
    pub fn door(&self) -> Door<'_> {
        Door { cabinet: &self.cabinet_id, door: self.door_id }
    }
}

/// When an instance must next look at an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Leave as it is.
    Keep,
    /// Nothing to do until the cabinet says something.
    Never,
    /// After this long.
    In(Duration),
}

/// What a transition changes besides the state.
#[derive(Debug, Default)]
pub struct Changes {
    /// New door state.
    pub door_state: Option<&'static str>,
    /// Why (cancelled, abnormal).
    pub reason: Option<String>,
    /// A review flag to add.
    pub review: Option<&'static str>,
    /// The goods snapshot.
    pub goods: Option<serde_json::Value>,
    /// Door opened at (cabinet clock, ms).
    pub opened_ms: Option<i64>,
    /// Door closed at (cabinet clock, ms).
    pub closed_ms: Option<i64>,
    /// Amount charged.
    pub amount_cents: Option<i64>,
    /// Next look.
    pub due: Option<Due>,
}

/// Moves order `id` to `to` if it is in one of `from`, with `changes`, recording the
/// transition and its `cause`, inside `tx`. `Ok(None)`: the order is elsewhere (someone else
/// moved it first) and nothing changed.
///
/// # Errors
/// `NotFound` for an unknown order, or PostgreSQL errors.
pub async fn transition(
    tx: &Transaction<'_>,
    id: &str,
    from: &[State],
    to: State,
    cause: &str,
    changes: Changes,
) -> Result<Option<Order>, StoreError> {
    let row = tx
        .query_opt("SELECT state FROM orders WHERE id = $1 FOR UPDATE", &[&id])
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("order {id}")))?;
    let current = State::parse(row.get(0)).unwrap_or(State::Abnormal);
    if !from.contains(&current) {
        return Ok(None);
    }
    // The timestamp column a state sets, from a fixed list.
    let stamp = match to {
        State::Authorised => ", authorised_at = now()",
        State::DoorOpen => ", door_open_at = now()",
        State::DoorClosed => ", door_closed_at = now()",
        State::Settled | State::Cancelled | State::Abnormal => ", finished_at = now()",
        State::Created | State::DoorOpening => "",
    };
    let (due_mode, due_ms): (&str, f64) =
        match changes.due.unwrap_or(if to.is_active() { Due::Keep } else { Due::Never }) {
            Due::Keep => ("keep", 0.0),
            Due::Never => ("never", 0.0),
            Due::In(d) => ("in", d.as_millis() as f64),
        };
    let sql = format!(
        "UPDATE orders SET state = $2,
                door_state = COALESCE($3, door_state),
                reason = COALESCE($4, reason),
                review = CASE WHEN $5::text IS NULL OR $5 = ANY(review) THEN review ELSE array_append(review, $5) END,
                goods = COALESCE($6, goods),
                opened_ms = COALESCE($7, opened_ms),
                closed_ms = COALESCE($8, closed_ms),
                amount_cents = COALESCE($9, amount_cents),
                due_at = CASE $11::text WHEN 'keep' THEN due_at WHEN 'never' THEN NULL
                              ELSE now() + make_interval(secs => $10::float8 / 1000) END
                {stamp}
          WHERE id = $1
          RETURNING {COLUMNS}"
    );
    let params: [&(dyn ToSql + Sync); 11] = [
        &id,
        &to.as_str(),
        &changes.door_state,
        &changes.reason,
        &changes.review,
        &changes.goods,
        &changes.opened_ms,
        &changes.closed_ms,
        &changes.amount_cents,
        &due_ms,
        &due_mode,
    ];
    let row = tx.query_one(&sql, &params).await?;
    tx.execute(
        "INSERT INTO order_transitions (order_id, from_state, to_state, cause) VALUES ($1, $2, $3, $4)",
        &[&id, &current.as_str(), &to.as_str(), &cause],
    )
    .await?;
    Ok(Some(Order::from_row(&row)))
}

/// Runs [`transition`] in a transaction of its own; counts it.
///
/// # Errors
/// As [`transition`].
pub async fn transition_now(
    app: &App,
    id: &str,
    from: &[State],
    to: State,
    cause: &str,
    changes: Changes,
) -> Result<Option<Order>, StoreError> {
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let moved = transition(&tx, id, from, to, cause, changes).await?;
    crate::auth::audit::commit(tx).await?;
    if moved.is_some() {
        app.metrics.order_transitions.with_label_values(&[to.as_str()]).inc();
    }
    Ok(moved)
}

/// Reads order `id`.
///
/// # Errors
/// `NotFound`, or PostgreSQL errors.
pub async fn get(app: &App, id: &str) -> Result<Order, StoreError> {
    let client = app.pg.get().await?;
    let row = client
        .query_opt(&format!("SELECT {COLUMNS} FROM orders WHERE id = $1"), &[&id])
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("order {id}")))?;
    Ok(Order::from_row(&row))
}

/// One recorded transition.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Transition {
    /// Previous state (`null` at creation).
    pub from: Option<String>,
    /// New state.
    pub to: String,
    /// Why.
    pub cause: String,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
}

/// Order `id`'s transitions, oldest first.
///
/// # Errors
/// PostgreSQL errors.
pub async fn transitions(app: &App, id: &str) -> Result<Vec<Transition>, StoreError> {
    let client = app.pg.get().await?;
    let rows = client
        .query("SELECT from_state, to_state, cause, at FROM order_transitions WHERE order_id = $1 ORDER BY id", &[&id])
        .await?;
    Ok(rows
        .iter()
        .map(|r| Transition { from: r.get(0), to: r.get(1), cause: r.get(2), at_ms: ms_of(r.get(3)) })
        .collect())
}

/// What the shopping app asks for.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    /// The shopper.
    pub user_id: String,
    /// Cabinet.
    pub cabinet_id: String,
    /// Door.
    pub door_id: u8,
    /// The shop's name for this creation (1 to 64 visible ASCII characters): a retry with the
    /// same key gets the order the first call created, whatever that call's answer was.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// Creates an order: the user has a signed deduction contract (unless
/// `purchases.require_contract` is off) and no order still running or unpaid, the cabinet and
/// door exist, the cabinet is online, and the door's lock is free (taken here, with the order
/// id as token). The user's rules come first: a user who may not buy is told so whatever the
/// cabinet.
///
/// # Errors
/// `Invalid`, `Rejected` (`no_active_contract`, `unpaid_order`), `NotFound` (cabinet or door),
/// `Rejected` (`cabinet_offline`, `door_out_of_sale`, `door_busy`), or storage errors.
pub async fn create(app: &App, new: &NewOrder, tenant: &str) -> Result<Order, StoreError> {
    if new.user_id.is_empty() || new.user_id.len() > 128 {
        return Err(StoreError::invalid("user_id", "1 to 128 characters"));
    }
    if new.door_id == 0 {
        return Err(StoreError::invalid("door_id", "1..=255"));
    }
    let key = new.idempotency_key.as_deref();
    if key.is_some_and(|k| !(1..=64).contains(&k.len()) || !k.bytes().all(|b| b.is_ascii_graphic())) {
        return Err(StoreError::invalid("idempotency_key", "1 to 64 visible ASCII characters"));
    }
    let mut client = app.pg.get().await?;
    // A retry: the order the key already names, before any rule (the user's own order would
    // otherwise be the running one that refuses it).
    if let Some(key) = key
        && let Some(order) = by_idempotency_key(&client, tenant, key, new).await?
    {
        return Ok(order);
    }
    if app.config.purchases.require_contract && !super::contracts::is_active(&**client, tenant, &new.user_id).await? {
        return Err(StoreError::rejected(
            "no_active_contract",
            format!("user {} has no signed deduction contract with the payment provider", new.user_id),
        ));
    }
    // Seed 003's "no unpaid order": one still running, or one whose charge failed.
    let unpaid = client
        .query_opt(
            "SELECT id, payment = 'unpaid' FROM orders WHERE user_id = $1 AND coalesce(tenant, '') = $2
                AND (state IN ('created', 'authorised', 'door_opening', 'door_open', 'door_closed')
                     OR payment = 'unpaid')
              LIMIT 1",
            &[&new.user_id, &tenant],
        )
        .await?;
    if let Some(r) = unpaid {
        let (id, failed): (String, bool) = (r.get(0), r.get::<_, Option<bool>>(1).unwrap_or(false));
        let why = if failed { "was not paid (the deduction failed)" } else { "is not finished" };
        return Err(StoreError::rejected("unpaid_order", format!("the user's order {id} {why}")));
    }
    let door = i16::from(new.door_id);
    let row = client
        .query_opt(
            "SELECT d.status, EXISTS (SELECT 1 FROM doors WHERE cabinet_id = c.id AND door_id = $2),
                    (SELECT out_of_sale FROM doors WHERE cabinet_id = c.id AND door_id = $2)
               FROM cabinets c JOIN devices d ON d.key = c.device_key WHERE c.id = $1",
            &[&new.cabinet_id, &door],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("cabinet {}", new.cabinet_id)))?;
    let (status, door_exists): (String, bool) = (row.get(0), row.get(1));
    if !door_exists {
        return Err(StoreError::NotFound(format!("door {} of cabinet {}", new.door_id, new.cabinet_id)));
    }
    if status != "online" {
        return Err(StoreError::rejected("cabinet_offline", format!("cabinet {} is {status}", new.cabinet_id)));
    }
    if let Some(why) = row.get::<_, Option<String>>(2) {
        return Err(StoreError::rejected(
            "door_out_of_sale",
            format!("the door is out of sale ({why}) until restocked"),
        ));
    }
    let id = lock::token("o")?;
    let lock_door = Door { cabinet: &new.cabinet_id, door: new.door_id };
    if !lock::acquire(app, lock_door, &id).await? {
        return Err(StoreError::rejected("door_busy", "the door is in use by another order or a restock"));
    }
    let authorise_ms = app.config.purchases.authorise_timeout_s as f64 * 1000.0;
    let inserted = async {
        let tx = client.transaction().await?;
        let row = tx
            .query_one(
                &format!(
                    "INSERT INTO orders (id, user_id, cabinet_id, door_id, state, lock_token, due_at, tenant,
                                         hold_cents, currency, idempotency_key)
                     VALUES ($1, $2, $3, $4, 'created', $1, now() + make_interval(secs => $5::float8 / 1000), $6,
                             $7, $8, $9)
                     RETURNING {COLUMNS}"
                ),
                &[
                    &id,
                    &new.user_id,
                    &new.cabinet_id,
                    &door,
                    &authorise_ms,
                    &tenant,
                    &app.config.purchases.hold_cents,
                    &app.config.purchases.currency,
                    &key,
                ],
            )
            .await?;
        tx.execute(
            "INSERT INTO order_transitions (order_id, from_state, to_state, cause) VALUES ($1, NULL, 'created', 'created')",
            &[&id],
        )
        .await?;
        crate::auth::audit::commit(tx).await?;
        Ok::<_, StoreError>(Order::from_row(&row))
    }
    .await;
    match inserted {
        Ok(order) => {
            app.metrics.order_transitions.with_label_values(&["created"]).inc();
            Ok(order)
        }
        Err(e) => {
            lock::release_quietly(app, lock_door, &id).await;
            // The same key raced in twice: the other call's order is this one's answer.
            if e.is_unique_violation()
                && let Some(key) = key
                && let Some(order) = by_idempotency_key(&client, tenant, key, new).await?
            {
                return Ok(order);
            }
            if e.is_unique_violation() {
                // Another request of the same user (or for the same door) won the race.
                Err(StoreError::rejected("unpaid_order", "the user or the door has an order running"))
            } else {
                Err(e)
            }
        }
    }
}

/// The order `tenant` created under `key`, if any; 409 `idempotency_key_reused` if that order
/// is not for the same user, cabinet and door (a key names one creation).
async fn by_idempotency_key(
    client: &tokio_postgres::Client,
    tenant: &str,
    key: &str,
    new: &NewOrder,
) -> Result<Option<Order>, StoreError> {
    let row = client
        .query_opt(
            &format!("SELECT {COLUMNS} FROM orders WHERE coalesce(tenant, '') = $1 AND idempotency_key = $2"),
            &[&tenant, &key],
        )
        .await?;
    let Some(order) = row.map(|r| Order::from_row(&r)) else { return Ok(None) };
    if order.user_id != new.user_id || order.cabinet_id != new.cabinet_id || order.door_id != new.door_id {
        return Err(StoreError::rejected(
            "idempotency_key_reused",
            format!("key {key} created order {} for another user, cabinet or door", order.id),
        ));
    }
    Ok(Some(order))
}

/// The payment provider's verdict (the body of its signed callback, docs/api.md).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Authorisation {
    /// The order.
    pub order_id: String,
    /// `authorised` or `refused`.
    pub status: String,
    /// The provider's reference.
    #[serde(default)]
    pub payment_id: Option<String>,
    /// The amount authorised, cents: must equal the order's `hold_cents` (for `authorised`).
    #[serde(default)]
    pub amount_cents: Option<i64>,
    /// The currency authorised: must equal the order's (for `authorised`).
    #[serde(default)]
    pub currency: Option<String>,
}

/// Who signed a callback, and the signature accepted (recorded so it is accepted once).
#[derive(Debug, Clone, Copy)]
pub struct Signed<'a> {
    /// The provider's configured name.
    pub provider: &'a str,
    /// The matching `v1` signature.
    pub signature: &'a [u8; 32],
}

impl Signed<'_> {
    /// Records the signature inside `tx` (the transaction of what the callback changes), naming
    /// its `subject`; the same signed request again is `Rejected("replayed")`.
    ///
    /// # Errors
    /// `Rejected("replayed")`, or PostgreSQL errors.
    pub async fn record(&self, tx: &Transaction<'_>, subject: &str) -> Result<(), StoreError> {
        let first = tx
            .execute(
                "INSERT INTO payment_callbacks (provider, signature, order_id) VALUES ($1, $2, $3)
                 ON CONFLICT (provider, signature) DO NOTHING",
                &[&self.provider, &self.signature.as_slice(), &subject],
            )
            .await?;
        if first == 0 {
            return Err(StoreError::rejected("replayed", "this signed callback was already received"));
        }
        Ok(())
    }
}

/// Applies the provider's signed callback, in one transaction with the record of its signature:
/// a replay of the same signed request is refused (`Rejected("replayed")`) and changes nothing;
/// an authorisation for another amount or currency than the order's hold is refused
/// (`Rejected("amount_mismatch")`). A new callback for an order already moved answers the order
/// as it is now (the provider retries with a fresh signature). An authorisation that arrives
/// after the order was cancelled is refused with `Rejected("order_cancelled")` so the provider
/// releases the funds.
///
/// # Errors
/// `Invalid`, `NotFound`, `Rejected`, or storage errors.
pub async fn authorise(app: &App, a: &Authorisation, signed: Signed<'_>) -> Result<Order, StoreError> {
    let authorised = match a.status.as_str() {
        "authorised" => true,
        "refused" => false,
        other => return Err(StoreError::invalid("status", format!("{other:?}: authorised or refused"))),
    };
    if authorised && (a.amount_cents.is_none() || a.currency.is_none()) {
        return Err(StoreError::invalid("amount_cents", "an authorisation names amount_cents and currency"));
    }
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    signed.record(&tx, &a.order_id).await?;
    let held = tx
        .query_opt("SELECT hold_cents, currency FROM orders WHERE id = $1 FOR UPDATE", &[&a.order_id])
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("order {}", a.order_id)))?;
    let (hold, currency): (i64, String) = (held.get(0), held.get(1));
    if authorised && (a.amount_cents != Some(hold) || a.currency.as_deref() != Some(currency.as_str())) {
        return Err(StoreError::rejected(
            "amount_mismatch",
            format!("the order's hold is {hold} {currency}; the callback authorised another amount or currency"),
        ));
    }
    let moved = if authorised {
        let changes = Changes { due: Some(Due::In(Duration::ZERO)), ..Changes::default() };
        let moved =
            transition(&tx, &a.order_id, &[State::Created], State::Authorised, "payment_authorised", changes).await?;
        if moved.is_some() {
            tx.execute("UPDATE orders SET payment_id = $2 WHERE id = $1", &[&a.order_id, &a.payment_id]).await?;
        }
        moved
    } else {
        let changes = Changes { reason: Some("payment_refused".into()), ..Changes::default() };
        transition(&tx, &a.order_id, &[State::Created], State::Cancelled, "payment_refused", changes).await?
    };
    crate::auth::audit::commit(tx).await?;
    drop(client);
    if let Some(order) = &moved {
        app.metrics.order_transitions.with_label_values(&[order.state.as_str()]).inc();
        if authorised {
            app.purchase_wakers.driver.notify_one();
        } else {
            lock::release_quietly(app, order.door(), &order.lock_token).await;
        }
    }
    let order = match moved {
        Some(o) => o,
        None => get(app, &a.order_id).await?,
    };
    if authorised && order.state == State::Cancelled {
        return Err(StoreError::rejected("order_cancelled", format!("order {} was cancelled", order.id)));
    }
    Ok(order)
}

/// Cancels an order that was not authorised in time (the delayed cancellation).
///
/// # Errors
/// Storage errors.
pub async fn expire_unauthorised(app: &App, id: &str) -> Result<bool, StoreError> {
    let changes = Changes { reason: Some("not_authorised_in_time".into()), ..Changes::default() };
    let moved = transition_now(app, id, &[State::Created], State::Cancelled, "authorisation_timeout", changes).await?;
    if let Some(order) = &moved {
        lock::release_quietly(app, order.door(), &order.lock_token).await;
    }
    Ok(moved.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_count_is_the_number_of_columns_named() {
        assert_eq!(COLUMNS.split(',').count(), COLUMN_COUNT);
    }
}
