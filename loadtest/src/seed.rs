//! Registers the simulated fleet with the device service (through its API, as an operator
//! would): one product, every cabinet with the doors and lanes the simulation has, stocked
//! with that product, and every vehicle ready for activation at software version 1.0.0. The
//! credentials are the fleet's own (derived from the device number, `fleet_ids`), given as
//! factory-provisioned keys. Registering again is harmless (existing devices are skipped).

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::api::Api;
use crate::cabinet::CabinetBehaviour;
use crate::fleet_ids::{cabinet_id, cabinet_secret, vehicle_token, vin};

/// The product every simulated lane holds.
pub const PRODUCT: &str = "lt-cola-330";
/// Its price, cents.
pub const PRICE_CENTS: i64 = 300;
/// The software version simulated vehicles start at.
pub const START_VERSION: &str = "1.0.0";
/// Calls in flight at once.
const CONCURRENCY: usize = 16;

/// How many devices were registered now and how many existed already.
#[derive(Debug, Default, serde::Serialize)]
pub struct Seeded {
    /// Newly registered.
    pub created: u64,
    /// Already there.
    pub existing: u64,
}

fn cabinet_body(n: usize, b: &CabinetBehaviour) -> Value {
    let id = cabinet_id(n);
    let doors: Vec<Value> = (1..=b.doors)
        .map(|d| {
            let lanes: Vec<Value> =
                (1..=b.lanes).map(|l| json!({"lane_id": l, "product_id": PRODUCT, "restock_threshold": 2})).collect();
            json!({"door_id": d, "lanes": lanes})
        })
        .collect();
    json!({"id": id.as_str(), "name": format!("load-test cabinet {n}"), "doors": doors,
           "secret": hex::encode(cabinet_secret(&id))})
}

/// The user a simulated vehicle is sold to (its `buyer_user_id`), who activates it.
pub fn owner_of(vin: &(impl std::fmt::Display + ?Sized)) -> String {
    format!("lt-owner-{vin}")
}

fn vehicle_body(n: usize) -> Value {
    let v = vin(n);
    json!({"vin": v.as_str(), "model": "LT", "state": "pending_activation", "sw_version": START_VERSION,
           "token": vehicle_token(&v), "buyer_user_id": owner_of(&v)})
}

/// Registers `cabinets` cabinets (laid out as `behaviour`) and `vehicles` vehicles.
///
/// # Errors
/// A call answered with anything but 201 or 409 (exists), or the API unreachable.
pub async fn run(api: Api, cabinets: usize, vehicles: usize, behaviour: &CabinetBehaviour) -> anyhow::Result<Seeded> {
    let unit_grams = behaviour.unit_grams;
    let product = json!({"id": PRODUCT, "name": "Cola 330 ml", "unit_grams": unit_grams, "price_cents": PRICE_CENTS});
    api.expect("POST", "/v1/products", Some(&product), &[201, 409]).await?;
    let calls = (0..cabinets)
        .map(|n| ("/v1/cabinets", cabinet_body(n, behaviour)))
        .chain((0..vehicles).map(|n| ("/v1/vehicles", vehicle_body(n))));
    let mut answers = futures_util::stream::iter(calls)
        .map(|(path, body)| async move { api.call("POST", path, Some(&body)).await })
        .buffer_unordered(CONCURRENCY);
    let mut seeded = Seeded::default();
    while let Some(answer) = answers.next().await {
        match answer? {
            (201, _) => seeded.created += 1,
            (409, _) => seeded.existing += 1,
            (status, body) => anyhow::bail!("registration answered {status}: {body}"),
        }
    }
    Ok(seeded)
}
