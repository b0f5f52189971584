//! Password-free deduction contracts (seed document 002, "免密支付"): a purchase charges the
//! shopper without asking, which the provider allows only under a signed contract. The
//! contract service stays outside; this module mirrors what purchases need from it, fed by the
//! provider's signed callbacks (`POST /v1/contracts/callback`, the signature scheme of the
//! payment callback): a contract `signed`, `suspended` or `terminated`, per shop and user.
//!
//! Events are ordered by the provider's `event_ms`: an event older than the one applied is
//! answered with the contract as it is and changes nothing, so a late or repeated delivery
//! cannot bring a terminated contract back. Only order creation looks at the contract: one
//! terminated while an order runs does not strand that order; its settlement still goes out
//! and the account service's result decides.

use serde::{Deserialize, Serialize};

use super::orders::Signed;
use crate::app::App;
use crate::error::StoreError;

/// The provider's contract event (the body of its signed callback).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContractEvent {
    /// The shop (tenant) whose user signed.
    pub tenant: String,
    /// The shopper, as the shop names them.
    pub user_id: String,
    /// The provider's contract id.
    pub contract_id: String,
    /// `signed`, `suspended` or `terminated`.
    pub state: String,
    /// When the provider decided, ms since the Unix epoch (orders the events).
    pub event_ms: i64,
}

/// A contract as mirrored.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Contract {
    /// The shop.
    pub tenant: String,
    /// The shopper.
    pub user_id: String,
    /// The provider's contract id.
    pub contract_id: String,
    /// `signed`, `suspended` or `terminated`.
    pub state: String,
    /// The event applied last.
    pub event_ms: i64,
    /// Whether this callback changed it (`false`: older than, or the same as, the one applied).
    pub applied: bool,
}

const STATES: [&str; 3] = ["signed", "suspended", "terminated"];

fn bounded(field: &'static str, v: &str) -> Result<(), StoreError> {
    if v.is_empty() || v.len() > 128 || v.contains('\0') {
        return Err(StoreError::invalid(field, "1 to 128 characters"));
    }
    Ok(())
}

/// Applies a signed contract event, in one transaction with the record of its signature (a
/// replay of the same signed request is refused with `Rejected("replayed")`).
///
/// # Errors
/// `Invalid`, `Rejected("replayed")`, or storage errors.
pub async fn apply(app: &App, e: &ContractEvent, signed: Signed<'_>) -> Result<Contract, StoreError> {
    bounded("tenant", &e.tenant)?;
    bounded("user_id", &e.user_id)?;
    bounded("contract_id", &e.contract_id)?;
    if !STATES.contains(&e.state.as_str()) {
        return Err(StoreError::invalid("state", "signed, suspended or terminated"));
    }
    if e.event_ms <= 0 {
        return Err(StoreError::invalid("event_ms", "ms since the Unix epoch"));
    }
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    signed.record(&tx, &format!("contract:{}:{}", e.tenant, e.user_id)).await?;
    let applied = tx
        .execute(
            "INSERT INTO deduction_contracts (tenant, user_id, contract_id, state, provider, event_ms)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (tenant, user_id) DO UPDATE
                SET contract_id = EXCLUDED.contract_id, state = EXCLUDED.state, provider = EXCLUDED.provider,
                    event_ms = EXCLUDED.event_ms, updated_at = now()
              WHERE deduction_contracts.event_ms < EXCLUDED.event_ms",
            &[&e.tenant, &e.user_id, &e.contract_id, &e.state, &signed.provider, &e.event_ms],
        )
        .await?
        == 1;
    let row = tx
        .query_one(
            "SELECT contract_id, state, event_ms FROM deduction_contracts WHERE tenant = $1 AND user_id = $2",
            &[&e.tenant, &e.user_id],
        )
        .await?;
    crate::auth::audit::commit(tx).await?;
    let contract = Contract {
        tenant: e.tenant.clone(),
        user_id: e.user_id.clone(),
        contract_id: row.get(0),
        state: row.get(1),
        event_ms: row.get(2),
        applied,
    };
    app.metrics.contract_events.with_label_values(&[if applied { e.state.as_str() } else { "stale" }]).inc();
    Ok(contract)
}

/// Whether `user` of `tenant` has a signed contract.
///
/// # Errors
/// PostgreSQL errors.
pub async fn is_active(
    client: &impl tokio_postgres::GenericClient,
    tenant: &str,
    user: &str,
) -> Result<bool, StoreError> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM deduction_contracts WHERE tenant = $1 AND user_id = $2 AND state = 'signed'",
            &[&tenant, &user],
        )
        .await?
        .is_some())
}
