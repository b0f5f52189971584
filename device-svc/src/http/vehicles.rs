//! Vehicle endpoints: the vehicle's profile, and activation for the owner's app (scan,
//! confirm, cancel, and the activation's state to poll).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde::Deserialize;

use super::error::ApiError;
use super::extract::JsonBody;
use crate::app::App;
use crate::vehicles::activation::{self, ActivationView};
use crate::vehicles::profile::{self, Profile, VehicleView};

type Answer<T> = Result<T, ApiError>;

/// `GET /v1/vehicles/{vin}`
pub(super) async fn get(State(app): State<Arc<App>>, Path(vin): Path<String>) -> Answer<Json<VehicleView>> {
    Ok(Json(profile::get(&app, &vin).await?))
}

/// `PATCH /v1/vehicles/{vin}`: model, state, purpose, software version.
pub(super) async fn update(
    State(app): State<Arc<App>>,
    Path(vin): Path<String>,
    JsonBody(p): JsonBody<Profile>,
) -> Answer<Json<VehicleView>> {
    Ok(Json(profile::update(&app, &vin, &p).await?))
}

/// The body of the owner's activation steps.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Owner {
    user_id: String,
}

fn owner(o: &Owner) -> Result<&str, ApiError> {
    if o.user_id.is_empty() || o.user_id.len() > 128 {
        return Err(ApiError::invalid("user_id", "must be 1..=128 characters"));
    }
    Ok(&o.user_id)
}

/// `GET /v1/activations/{qr_id}`
pub(super) async fn get_activation(
    State(app): State<Arc<App>>,
    Path(qr_id): Path<String>,
) -> Answer<Json<ActivationView>> {
    Ok(Json(activation::view(&app, &qr_id).await?))
}

/// `POST /v1/activations/{qr_id}/scan`
pub(super) async fn scan(
    State(app): State<Arc<App>>,
    Path(qr_id): Path<String>,
    JsonBody(o): JsonBody<Owner>,
) -> Answer<Json<ActivationView>> {
    Ok(Json(activation::scan(&app, &qr_id, owner(&o)?).await?))
}

/// `POST /v1/activations/{qr_id}/confirm`
pub(super) async fn confirm(
    State(app): State<Arc<App>>,
    Path(qr_id): Path<String>,
    JsonBody(o): JsonBody<Owner>,
) -> Answer<Json<ActivationView>> {
    Ok(Json(activation::confirm(&app, &qr_id, owner(&o)?).await?))
}

/// `POST /v1/activations/{qr_id}/cancel`
pub(super) async fn cancel(
    State(app): State<Arc<App>>,
    Path(qr_id): Path<String>,
    JsonBody(o): JsonBody<Owner>,
) -> Answer<Json<ActivationView>> {
    Ok(Json(activation::cancel(&app, &qr_id, owner(&o)?).await?))
}
