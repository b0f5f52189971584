//! The operators' lists OTA validation consults: `blacklist` (never upgraded), `same_version`
//! (may be flashed again with the version it runs) and `downgrade` (may get a lower version).

use serde::Serialize;

use crate::app::{App, ms_of};
use crate::error::StoreError;

/// The lists' names, as in the API path and the `ota_lists.list` column.
pub const LISTS: [&str; 3] = ["blacklist", "same_version", "downgrade"];

/// One entry of a list.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ListEntry {
    /// The vehicle.
    pub vin: String,
    /// Why it is listed.
    pub note: String,
    /// When it was added, ms since the Unix epoch.
    pub added_ms: u64,
}

fn list_name(list: &str) -> Result<&'static str, StoreError> {
    LISTS
        .into_iter()
        .find(|l| *l == list)
        .ok_or_else(|| StoreError::invalid("list", format!("{list:?} is not one of {}", LISTS.join(", "))))
}

/// Adds (or re-notes) `vin` on `list`.
///
/// # Errors
/// `Invalid` for an unknown list or a bad VIN; storage errors.
pub async fn add(app: &App, list: &str, vin: &str, note: &str) -> Result<(), StoreError> {
    let list = list_name(list)?;
    let vin = protocol::Vin::new(vin).map_err(|e| StoreError::invalid("vin", e.to_string()))?;
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO ota_lists (list, vin, note) VALUES ($1, $2, $3)
         ON CONFLICT (list, vin) DO UPDATE SET note = EXCLUDED.note",
        &[&list, &vin.as_str(), &note],
    )
    .await?;
    crate::auth::audit::commit(tx).await
}

/// Removes `vin` from `list`.
///
/// # Errors
/// `NotFound` if it is not listed; `Invalid` for an unknown list; storage errors.
pub async fn remove(app: &App, list: &str, vin: &str) -> Result<(), StoreError> {
    let list = list_name(list)?;
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let n = tx.execute("DELETE FROM ota_lists WHERE list = $1 AND vin = $2", &[&list, &vin]).await?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("{vin} on the {list}")));
    }
    crate::auth::audit::commit(tx).await
}

/// Every entry of `list`, by VIN.
///
/// # Errors
/// `Invalid` for an unknown list; storage errors.
pub async fn entries(app: &App, list: &str) -> Result<Vec<ListEntry>, StoreError> {
    let list = list_name(list)?;
    let client = app.pg.get().await?;
    let rows = client.query("SELECT vin, note, added_at FROM ota_lists WHERE list = $1 ORDER BY vin", &[&list]).await?;
    Ok(rows.iter().map(|r| ListEntry { vin: r.get(0), note: r.get(1), added_ms: ms_of(r.get(2)) }).collect())
}
