//! What the registry knows of a vehicle beyond its credentials: model, life-cycle state,
//! purpose and software version (read by OTA validation, written by operators and factory
//! systems, by activation and by a successful upgrade), the buyer the sales side names (the
//! only user who may activate it), and its owner once activated.

use serde::{Deserialize, Serialize};

use super::ota::parse_version;
use crate::app::{App, ms_of};
use crate::error::StoreError;

/// Life-cycle states (module doc of `ota::tasks` says which tasks each allows).
pub const STATES: [&str; 7] =
    ["assembled", "line_ok", "certified", "delivered", "pending_activation", "activated", "scrapped"];
/// Purposes: `sale` (sold to customers), `test` (engineering), `internal` (fleet, demo).
pub const PURPOSES: [&str; 3] = ["sale", "test", "internal"];

/// The settable part of a vehicle; absent fields are left as they are (defaults on creation:
/// state `delivered`, purpose `sale`, version unknown).
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Model name.
    #[serde(default)]
    pub model: Option<String>,
    /// One of [`STATES`].
    #[serde(default)]
    pub state: Option<String>,
    /// One of [`PURPOSES`].
    #[serde(default)]
    pub purpose: Option<String>,
    /// The installed software version (dotted numbers).
    #[serde(default)]
    pub sw_version: Option<String>,
    /// The user the vehicle was sold to: the only one who may activate it (set by the sales side).
    #[serde(default)]
    pub buyer_user_id: Option<String>,
}

impl Profile {
    /// Checks the values given.
    ///
    /// # Errors
    /// `Invalid` naming the field.
    pub fn check(&self) -> Result<(), StoreError> {
        if let Some(s) = &self.state
            && !STATES.contains(&s.as_str())
        {
            return Err(StoreError::invalid("state", format!("{s:?} is not one of {}", STATES.join(", "))));
        }
        if let Some(p) = &self.purpose
            && !PURPOSES.contains(&p.as_str())
        {
            return Err(StoreError::invalid("purpose", format!("{p:?} is not one of {}", PURPOSES.join(", "))));
        }
        if let Some(v) = &self.sw_version
            && parse_version(v).is_none()
        {
            return Err(StoreError::invalid("sw_version", format!("{v:?} is not a dotted numeric version")));
        }
        if let Some(b) = &self.buyer_user_id
            && (b.is_empty() || b.len() > 128)
        {
            return Err(StoreError::invalid("buyer_user_id", "must be 1..=128 characters"));
        }
        Ok(())
    }
}

/// The body of `POST /v1/vehicles`: the VIN and a [`Profile`].
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewVehicle {
    /// The VIN.
    pub vin: String,
    /// [`Profile::model`].
    #[serde(default)]
    pub model: Option<String>,
    /// [`Profile::state`].
    #[serde(default)]
    pub state: Option<String>,
    /// [`Profile::purpose`].
    #[serde(default)]
    pub purpose: Option<String>,
    /// [`Profile::sw_version`].
    #[serde(default)]
    pub sw_version: Option<String>,
    /// [`Profile::buyer_user_id`].
    #[serde(default)]
    pub buyer_user_id: Option<String>,
    /// A token provisioned at the factory (16..=128 printable characters); generated if absent.
    #[serde(default)]
    pub token: Option<crate::registry::SecretText>,
}

impl NewVehicle {
    /// The profile part.
    pub fn profile(&self) -> Profile {
        Profile {
            model: self.model.clone(),
            state: self.state.clone(),
            purpose: self.purpose.clone(),
            sw_version: self.sw_version.clone(),
            buyer_user_id: self.buyer_user_id.clone(),
        }
    }
}

/// A vehicle as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct VehicleView {
    /// The VIN.
    pub vin: String,
    /// Model.
    pub model: String,
    /// Life-cycle state.
    pub state: String,
    /// Purpose.
    pub purpose: String,
    /// Installed software version, if known.
    pub sw_version: Option<String>,
    /// The user it was sold to: the only one who may activate it.
    pub buyer_user_id: Option<String>,
    /// The owner who activated it.
    pub owner_user_id: Option<String>,
    /// When, ms since the Unix epoch.
    pub activated_ms: Option<u64>,
    /// The QR id it was activated with.
    pub activation_qr: Option<String>,
}

/// Reads a vehicle.
///
/// # Errors
/// `NotFound`; storage errors.
pub async fn get(app: &App, vin: &str) -> Result<VehicleView, StoreError> {
    let client = app.pg.get().await?;
    let r = client
        .query_opt(
            "SELECT vin, model, state, purpose, sw_version, owner_user_id, activated_at, activation_qr, buyer_user_id
               FROM vehicles WHERE vin = $1",
            &[&vin],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("vehicle {vin}")))?;
    Ok(VehicleView {
        vin: r.get(0),
        model: r.get(1),
        state: r.get(2),
        purpose: r.get(3),
        sw_version: r.get(4),
        buyer_user_id: r.get(8),
        owner_user_id: r.get(5),
        activated_ms: r.get::<_, Option<std::time::SystemTime>>(6).map(ms_of),
        activation_qr: r.get(7),
    })
}

/// Changes the fields given.
///
/// # Errors
/// `Invalid`, `NotFound`; storage errors.
pub async fn update(app: &App, vin: &str, p: &Profile) -> Result<VehicleView, StoreError> {
    p.check()?;
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let n = tx
        .execute(
            "UPDATE vehicles SET model = COALESCE($2, model), state = COALESCE($3, state),
                    purpose = COALESCE($4, purpose), sw_version = COALESCE($5, sw_version),
                    buyer_user_id = COALESCE($6, buyer_user_id)
              WHERE vin = $1",
            &[&vin, &p.model, &p.state, &p.purpose, &p.sw_version, &p.buyer_user_id],
        )
        .await?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("vehicle {vin}")));
    }
    crate::auth::audit::commit(tx).await?;
    drop(client);
    get(app, vin).await
}
