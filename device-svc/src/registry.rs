//! The device registry: products, cabinets with their doors and lanes, vehicles, and their
//! credentials, in PostgreSQL; credentials mirrored to Redis where the gateways verify logins.
//!
//! Secrets are generated here (32 random bytes for a cabinet's HMAC key, 16 for a vehicle's
//! token), returned once to the operator who registers the device, and never logged. A vehicle's
//! token is stored only as its SHA-256; a cabinet's key must be kept as is, since an HMAC cannot
//! be verified against a hash. The Redis mirror is rewritten from PostgreSQL at start-up and
//! periodically, so a failed Redis write at registration heals by itself.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use protocol::bus::{CredentialChange, CredentialChangeKind, DeviceKey, Keys};
use protocol::{DeviceId, Vin};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::app::{App, ms_of};
use crate::error::StoreError;

/// A product a lane can hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Product {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Weight of one item, grams.
    pub unit_grams: i32,
    /// Price of one item, cents.
    pub price_cents: i64,
}

/// A lane as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LaneConfig {
    /// Lane id, 1..=255.
    pub lane_id: u8,
    /// The product it holds, if any.
    #[serde(default)]
    pub product_id: Option<String>,
    /// A restock order is opened when the lane holds fewer items than this.
    #[serde(default)]
    pub restock_threshold: i32,
    /// The lane's own price per item, cents (the product's price when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_cents: Option<i64>,
}

/// A door and its lanes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DoorConfig {
    /// Door id, 1..=255.
    pub door_id: u8,
    /// Its lanes.
    #[serde(default)]
    pub lanes: Vec<LaneConfig>,
}

pub use crate::secret::SecretText;

/// A cabinet to register.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewCabinet {
    /// Device id (SPEC.md 1.2).
    pub id: String,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// Where it stands.
    #[serde(default)]
    pub location: String,
    /// Doors and lanes.
    pub doors: Vec<DoorConfig>,
    /// A secret provisioned at the factory (64 hex characters); generated if absent.
    #[serde(default, skip_serializing)]
    pub secret: Option<SecretText>,
}

/// A registered cabinet.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Cabinet {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Location.
    pub location: String,
    /// Doors and lanes.
    pub doors: Vec<DoorConfig>,
}

/// Freshly issued credentials: shown once.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Issued {
    /// The device.
    pub device: String,
    /// Cabinets: the HMAC key, 64 hex characters. Vehicles: the token (also in `token`).
    pub secret: String,
    /// Vehicles: the token, under the name `POST /v1/vehicles` takes it by.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// How many times the credentials were issued.
    pub generation: i32,
}

/// A device's status as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeviceView {
    /// `cab:ID` or `veh:VIN`.
    pub key: String,
    /// `cab` or `veh`.
    pub kind: String,
    /// `registered`, `pending_init`, `online` or `offline`.
    pub status: String,
    /// Why the status last changed.
    pub status_reason: String,
    /// When, ms since the Unix epoch.
    pub status_changed_ms: u64,
    /// The session epoch the status belongs to.
    pub epoch: i64,
    /// Whether the cabinet reported its initial lane weights.
    pub initialised: bool,
    /// Whether its credentials are enabled.
    pub enabled: bool,
    /// Firmware (cabinets) or MQTT version (vehicles) of the last session.
    pub info: Option<String>,
    /// Its last heartbeat, ms since the Unix epoch, if any.
    pub last_seen_ms: Option<u64>,
    /// The gateway node the connection map names, if any.
    pub node: Option<String>,
    /// Whether that node is alive (a map entry naming a dead node counts as offline).
    pub node_alive: bool,
}

/// One status change.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct HistoryEntry {
    /// Previous status.
    pub from: String,
    /// New status.
    pub to: String,
    /// Why.
    pub reason: String,
    /// Session epoch.
    pub epoch: i64,
    /// Gateway node.
    pub node: Option<String>,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
}

fn random_bytes(n: usize) -> Result<Vec<u8>, StoreError> {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).map_err(|e| StoreError::invalid("random", e.to_string()))?;
    Ok(buf)
}

fn parse_cabinet_id(id: &str) -> Result<DeviceId, StoreError> {
    DeviceId::new(id).map_err(|e| StoreError::invalid("id", e.to_string()))
}

/// Registers a product.
///
/// # Errors
/// `Invalid` for a bad field, `Conflict` if the id exists.
pub async fn create_product(app: &App, p: &Product) -> Result<(), StoreError> {
    if p.id.is_empty() || p.id.len() > 64 {
        return Err(StoreError::invalid("id", "1 to 64 characters"));
    }
    if p.unit_grams <= 0 {
        return Err(StoreError::invalid("unit_grams", "must be positive"));
    }
    check_price(Some(p.price_cents))?;
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let result = tx
        .execute(
            "INSERT INTO products (id, name, unit_grams, price_cents) VALUES ($1, $2, $3, $4)",
            &[&p.id, &p.name, &p.unit_grams, &p.price_cents],
        )
        .await;
    match result.map_err(StoreError::from) {
        Err(e) if e.is_unique_violation() => Err(StoreError::Conflict(format!("product {}", p.id))),
        Err(e) => Err(e),
        Ok(_) => crate::auth::audit::commit(tx).await,
    }
}

/// A product by id.
///
/// # Errors
/// `NotFound`, or a storage error.
pub async fn get_product(app: &App, id: &str) -> Result<Product, StoreError> {
    let client = app.pg.get().await?;
    let row = client
        .query_opt("SELECT id, name, unit_grams, price_cents FROM products WHERE id = $1", &[&id])
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("product {id}")))?;
    Ok(Product { id: row.get(0), name: row.get(1), unit_grams: row.get(2), price_cents: row.get(3) })
}

/// The highest price a product or lane may have, in cents (1,000,000.00): far above any vending
/// item, far below what would overflow a settlement.
pub const MAX_PRICE_CENTS: i64 = 100_000_000;

fn check_price(cents: Option<i64>) -> Result<(), StoreError> {
    match cents {
        Some(c) if !(0..=MAX_PRICE_CENTS).contains(&c) => {
            Err(StoreError::invalid("price_cents", format!("{c}: within 0..={MAX_PRICE_CENTS}")))
        }
        _ => Ok(()),
    }
}

fn check_layout(doors: &[DoorConfig]) -> Result<(), StoreError> {
    if doors.is_empty() {
        return Err(StoreError::invalid("doors", "at least one door"));
    }
    let mut seen = std::collections::HashSet::new();
    for d in doors {
        if d.door_id == 0 || !seen.insert(d.door_id) {
            return Err(StoreError::invalid("doors", format!("door_id {} is 0 or repeated", d.door_id)));
        }
        let mut lanes = std::collections::HashSet::new();
        for l in &d.lanes {
            if l.lane_id == 0 || !lanes.insert(l.lane_id) {
                return Err(StoreError::invalid("lanes", format!("lane_id {} is 0 or repeated", l.lane_id)));
            }
            if l.restock_threshold < 0 {
                return Err(StoreError::invalid("restock_threshold", "must not be negative"));
            }
            check_price(l.price_cents)?;
        }
        if d.lanes.len() > protocol::cabinet::MAX_LANES_PER_REPORT {
            return Err(StoreError::invalid("lanes", "at most 64 lanes per door"));
        }
    }
    Ok(())
}

/// Registers a cabinet with its doors and lanes and issues its secret.
///
/// # Errors
/// `Invalid` (naming the field), `Conflict` if it exists, or a storage error.
pub async fn create_cabinet(app: &App, c: &NewCabinet) -> Result<Issued, StoreError> {
    let id = parse_cabinet_id(&c.id)?;
    check_layout(&c.doors)?;
    let key = DeviceKey::Cabinet(id.clone()).to_string();
    let secret = match &c.secret {
        Some(SecretText(hex_secret)) => hex::decode(hex_secret)
            .ok()
            .filter(|s| s.len() == 32)
            .ok_or_else(|| StoreError::invalid("secret", "must be 64 hex characters"))?,
        None => random_bytes(32)?,
    };
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let inserted =
        tx.execute("INSERT INTO devices (key, kind) VALUES ($1, 'cab') ON CONFLICT DO NOTHING", &[&key]).await?;
    if inserted == 0 {
        return Err(StoreError::Conflict(format!("cabinet {id}")));
    }
    tx.execute(
        "INSERT INTO cabinets (id, device_key, name, location) VALUES ($1, $2, $3, $4)",
        &[&id.as_str(), &key, &c.name, &c.location],
    )
    .await?;
    // Doors and lanes in one statement each: a fleet registered through the API (80,000
    // cabinets of 8 lanes) spent most of its database time on one INSERT per lane.
    let doors: Vec<i16> = c.doors.iter().map(|d| i16::from(d.door_id)).collect();
    tx.execute(
        "INSERT INTO doors (cabinet_id, door_id) SELECT $1, d FROM unnest($2::int2[]) AS d",
        &[&id.as_str(), &doors],
    )
    .await?;
    let lanes: Vec<(i16, &LaneConfig)> =
        c.doors.iter().flat_map(|d| d.lanes.iter().map(|l| (i16::from(d.door_id), l))).collect();
    let lane_doors: Vec<i16> = lanes.iter().map(|(d, _)| *d).collect();
    let lane_ids: Vec<i16> = lanes.iter().map(|(_, l)| i16::from(l.lane_id)).collect();
    let products: Vec<Option<&str>> = lanes.iter().map(|(_, l)| l.product_id.as_deref()).collect();
    let thresholds: Vec<i32> = lanes.iter().map(|(_, l)| l.restock_threshold).collect();
    let prices: Vec<Option<i64>> = lanes.iter().map(|(_, l)| l.price_cents).collect();
    let inserted = tx
        .execute(
            "INSERT INTO lanes (cabinet_id, door_id, lane_id, product_id, restock_threshold, price_cents)
             SELECT $1, d, l, p, t, c FROM unnest($2::int2[], $3::int2[], $4::text[], $5::int4[], $6::int8[])
                                        AS u(d, l, p, t, c)",
            &[&id.as_str(), &lane_doors, &lane_ids, &products, &thresholds, &prices],
        )
        .await;
    if let Err(e) = inserted {
        if e.code() == Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION) {
            drop(tx);
            return Err(unknown_product(&client, &products).await);
        }
        return Err(e.into());
    }
    tx.execute("INSERT INTO device_credentials (device_key, secret) VALUES ($1, $2)", &[&key, &secret]).await?;
    crate::auth::audit::commit(tx).await?;
    // A second connection is taken for the mirror: never hold one while waiting for another.
    drop(client);
    mirror_one(app, &key, CredentialChangeKind::Registered).await;
    Ok(Issued { device: key, secret: hex::encode(&secret), token: None, generation: 1 })
}

/// The error naming the first of `products` that is not in the catalogue (a lane insert broke
/// the foreign key: the transaction is gone, so this asks on its own).
async fn unknown_product(client: &tokio_postgres::Client, products: &[Option<&str>]) -> StoreError {
    let unknown = client
        .query_opt(
            "SELECT p FROM unnest($1::text[]) WITH ORDINALITY AS u(p, n)
              WHERE p IS NOT NULL AND NOT EXISTS (SELECT 1 FROM products WHERE id = p) ORDER BY n LIMIT 1",
            &[&products],
        )
        .await;
    match unknown {
        Ok(row) => {
            let name: Option<String> = row.map(|r| r.get(0));
            StoreError::invalid("product_id", format!("unknown product {name:?}"))
        }
        Err(e) => e.into(),
    }
}

/// A cabinet's configuration.
///
/// # Errors
/// `NotFound`, or a storage error.
pub async fn get_cabinet(app: &App, id: &str) -> Result<Cabinet, StoreError> {
    let client = app.pg.get().await?;
    let row = client
        .query_opt("SELECT name, location FROM cabinets WHERE id = $1", &[&id])
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("cabinet {id}")))?;
    let lanes = client
        .query(
            "SELECT d.door_id, l.lane_id, l.product_id, l.restock_threshold, l.price_cents
               FROM doors d LEFT JOIN lanes l ON l.cabinet_id = d.cabinet_id AND l.door_id = d.door_id
              WHERE d.cabinet_id = $1 ORDER BY d.door_id, l.lane_id",
            &[&id],
        )
        .await?;
    let mut doors: BTreeMap<u8, DoorConfig> = BTreeMap::new();
    for r in lanes {
        let door_id = u8::try_from(r.get::<_, i16>(0)).unwrap_or(0);
        let door = doors.entry(door_id).or_insert_with(|| DoorConfig { door_id, lanes: Vec::new() });
        if let Some(lane) = r.get::<_, Option<i16>>(1) {
            door.lanes.push(LaneConfig {
                lane_id: u8::try_from(lane).unwrap_or(0),
                product_id: r.get(2),
                restock_threshold: r.get(3),
                price_cents: r.get(4),
            });
        }
    }
    Ok(Cabinet { id: id.to_owned(), name: row.get(0), location: row.get(1), doors: doors.into_values().collect() })
}

/// Changes a lane's product, price or restock threshold (creating the lane if the door
/// exists). The HTTP API goes through [`crate::purchases::restock::configure_lane`], which
/// holds the door's lock around this.
///
/// # Errors
/// `NotFound` for an unknown door, `Invalid` for an unknown product.
pub async fn configure_lane(app: &App, cabinet: &str, door: u8, lane: &LaneConfig) -> Result<(), StoreError> {
    if lane.lane_id == 0 {
        return Err(StoreError::invalid("lane_id", "1..=255"));
    }
    if lane.restock_threshold < 0 {
        return Err(StoreError::invalid("restock_threshold", "must not be negative"));
    }
    check_price(lane.price_cents)?;
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let result = tx
        .execute(
            "INSERT INTO lanes (cabinet_id, door_id, lane_id, product_id, restock_threshold, price_cents)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (cabinet_id, door_id, lane_id)
             DO UPDATE SET product_id = EXCLUDED.product_id, restock_threshold = EXCLUDED.restock_threshold,
                           price_cents = EXCLUDED.price_cents",
            &[
                &cabinet,
                &i16::from(door),
                &i16::from(lane.lane_id),
                &lane.product_id,
                &lane.restock_threshold,
                &lane.price_cents,
            ],
        )
        .await;
    match result {
        Ok(_) => crate::auth::audit::commit(tx).await,
        Err(e) => match e.code() {
            Some(c) if *c == tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION => {
                drop(tx);
                if get_product_opt(app, lane.product_id.as_deref()).await? {
                    Err(StoreError::NotFound(format!("door {door} of cabinet {cabinet}")))
                } else {
                    Err(StoreError::invalid("product_id", format!("unknown product {:?}", lane.product_id)))
                }
            }
            _ => Err(e.into()),
        },
    }
}

async fn get_product_opt(app: &App, id: Option<&str>) -> Result<bool, StoreError> {
    let Some(id) = id else { return Ok(true) };
    let client = app.pg.get().await?;
    Ok(client.query_opt("SELECT 1 FROM products WHERE id = $1", &[&id]).await?.is_some())
}

/// Registers a vehicle (with its life-cycle state, purpose and software version, which OTA
/// validation reads) and issues its token.
///
/// # Errors
/// `Invalid` for a bad VIN, state, purpose or version; `Conflict` if it exists; storage errors.
pub async fn create_vehicle(app: &App, v: &crate::vehicles::profile::NewVehicle) -> Result<Issued, StoreError> {
    let vin = Vin::new(&v.vin).map_err(|e| StoreError::invalid("vin", e.to_string()))?;
    let p = v.profile();
    p.check()?;
    let key = DeviceKey::Vehicle(vin.clone()).to_string();
    let token = match &v.token {
        Some(SecretText(t)) if (16..=128).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_graphic()) => t.clone(),
        Some(_) => return Err(StoreError::invalid("token", "must be 16..=128 printable ASCII characters")),
        None => hex::encode(random_bytes(16)?),
    };
    let hash = Sha256::digest(token.as_bytes()).to_vec();
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let inserted = tx
        .execute(
            "INSERT INTO devices (key, kind, initialised) VALUES ($1, 'veh', true) ON CONFLICT DO NOTHING",
            &[&key],
        )
        .await?;
    if inserted == 0 {
        return Err(StoreError::Conflict(format!("vehicle {vin}")));
    }
    tx.execute(
        "INSERT INTO vehicles (vin, device_key, model, state, purpose, sw_version, buyer_user_id)
         VALUES ($1, $2, $3, COALESCE($4, 'delivered'), COALESCE($5, 'sale'), $6, $7)",
        &[
            &vin.as_str(),
            &key,
            &p.model.clone().unwrap_or_default(),
            &p.state,
            &p.purpose,
            &p.sw_version,
            &p.buyer_user_id,
        ],
    )
    .await?;
    tx.execute("INSERT INTO device_credentials (device_key, token_sha256) VALUES ($1, $2)", &[&key, &hash]).await?;
    crate::auth::audit::commit(tx).await?;
    // A second connection is taken for the mirror: never hold one while waiting for another.
    drop(client);
    mirror_one(app, &key, CredentialChangeKind::Registered).await;
    Ok(Issued { device: key, token: Some(token.clone()), secret: token, generation: 1 })
}

/// Issues new credentials to a device; the old ones stop working at once.
///
/// # Errors
/// `NotFound`, or a storage error.
pub async fn rotate_credentials(app: &App, key: &DeviceKey) -> Result<Issued, StoreError> {
    let k = key.to_string();
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let (secret, stored_secret, stored_hash) = match key {
        DeviceKey::Cabinet(_) => {
            let s = random_bytes(32)?;
            (hex::encode(&s), Some(s), None)
        }
        DeviceKey::Vehicle(_) => {
            let t = hex::encode(random_bytes(16)?);
            let h = Sha256::digest(t.as_bytes()).to_vec();
            (t, None, Some(h))
        }
    };
    let row = tx
        .query_opt(
            "UPDATE device_credentials SET secret = $2, token_sha256 = $3, generation = generation + 1, rotated_at = now()
              WHERE device_key = $1 RETURNING generation",
            &[&k, &stored_secret, &stored_hash],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("device {k}")))?;
    crate::auth::audit::commit(tx).await?;
    drop(client);
    mirror_one(app, &k, CredentialChangeKind::Rotated).await;
    let token = matches!(key, DeviceKey::Vehicle(_)).then(|| secret.clone());
    Ok(Issued { device: k, secret, token, generation: row.get(0) })
}

/// Enables or disables a device's logins.
///
/// # Errors
/// `NotFound`, or a storage error.
pub async fn set_enabled(app: &App, key: &DeviceKey, enabled: bool) -> Result<(), StoreError> {
    let k = key.to_string();
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let n = tx.execute("UPDATE devices SET enabled = $2 WHERE key = $1", &[&k, &enabled]).await?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("device {k}")));
    }
    crate::auth::audit::commit(tx).await?;
    drop(client);
    let change = if enabled { CredentialChangeKind::Enabled } else { CredentialChangeKind::Disabled };
    mirror_one(app, &k, change).await;
    Ok(())
}

/// Writes one device's credentials to Redis, then announces the change on `P cred:changes`, so
/// every gateway node drops its cached copy and ends a revoked session at once (SPEC.md 3.1).
/// A failure is logged; the periodic mirror repairs the credentials and the gateways' cache
/// lifetime bounds how long a missed announcement matters.
async fn mirror_one(app: &App, key: &str, change: CredentialChangeKind) {
    if let Err(e) = mirror(app, Some(key)).await {
        app.mirror_due.store(true, Ordering::Relaxed);
        tracing::warn!(device = key, error = %e, "failed to mirror credentials to Redis; retrying within a second");
    }
    let Ok(device) = DeviceKey::parse(key) else { return };
    let entry = CredentialChange { device, kind: change };
    let announced: redis::RedisResult<()> = redis::cmd("XADD")
        .arg(app.keys.credential_changes())
        .arg("MAXLEN")
        .arg("~")
        .arg(protocol::bus::CREDENTIAL_CHANGES_MAXLEN)
        .arg("*")
        .arg(entry.to_fields())
        .query_async(&mut app.redis.clone())
        .await;
    if let Err(e) = announced {
        tracing::warn!(device = key, error = %e, "failed to announce a credential change; gateways see it when their cache expires");
    }
}

/// Rewrites the whole credentials mirror every `period`, and within a second of a change that
/// failed to reach Redis ([`App::mirror_due`](crate::app::App)), again each second until it
/// succeeds, until `stop`.
pub async fn run_mirror(app: Arc<App>, period: Duration, stop: CancellationToken) {
    let mut last = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let due = app.mirror_due.swap(false, Ordering::Relaxed);
        if !due && last.elapsed() < period {
            continue;
        }
        // While Redis is away, a ping keeps the retries from reading every credential each second.
        let written = match redis::cmd("PING").query_async::<()>(&mut app.redis.clone()).await {
            Ok(()) => mirror(&app, None).await,
            Err(e) => Err(e.into()),
        };
        match written {
            Ok(n) => {
                last = tokio::time::Instant::now();
                if due {
                    tracing::info!(credentials = n, "credentials mirror written again after a failed change");
                }
            }
            Err(e) => {
                if due {
                    app.mirror_due.store(true, Ordering::Relaxed);
                }
                tracing::warn!(error = %e, due, "failed to rewrite the credentials mirror; retrying");
            }
        }
    }
}

/// Writes credentials from PostgreSQL to Redis (`P cred:*`): one device, or all of them.
/// Returns how many were written.
///
/// # Errors
/// Any storage error.
pub async fn mirror(app: &App, only: Option<&str>) -> Result<usize, StoreError> {
    let client = app.pg.get().await?;
    let rows = client
        .query(
            "SELECT c.device_key, c.secret, c.token_sha256, d.enabled
               FROM device_credentials c JOIN devices d ON d.key = c.device_key
              WHERE $1::text IS NULL OR c.device_key = $1",
            &[&only],
        )
        .await?;
    let keys = Keys::new(app.keys.prefix());
    let mut con = app.redis.clone();
    let mut written = 0;
    for chunk in rows.chunks(500) {
        let mut cmds = Vec::with_capacity(chunk.len());
        for r in chunk {
            let key: String = r.get(0);
            let Ok(device) = DeviceKey::parse(&key) else { continue };
            let status = if r.get::<_, bool>(3) { "enabled" } else { "disabled" };
            let (field, value) = match r.get::<_, Option<Vec<u8>>>(1) {
                Some(secret) => ("secret", hex::encode(secret)),
                None => ("token_sha256", hex::encode(r.get::<_, Option<Vec<u8>>>(2).unwrap_or_default())),
            };
            let mut hset = redis::cmd("HSET");
            hset.arg(keys.credentials(&device)).arg(field).arg(value).arg("status").arg(status);
            cmds.push(hset);
            written += 1;
        }
        // One key per device: many Redis Cluster slots.
        con.query_each(cmds).await?;
    }
    Ok(written)
}

/// A device's status, last heartbeat and connection.
///
/// # Errors
/// `NotFound`, or a storage error.
pub async fn get_device(app: &App, key: &DeviceKey) -> Result<DeviceView, StoreError> {
    let k = key.to_string();
    let client = app.pg.get().await?;
    let row = client
        .query_opt(
            "SELECT kind, status, status_reason, status_changed_at, status_epoch, initialised, enabled, info
               FROM devices WHERE key = $1",
            &[&k],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("device {k}")))?;
    let seen = crate::offline::last_seen(app, key).await?;
    let mut con = app.redis.clone();
    let node: Option<String> = redis::cmd("HGET").arg(app.keys.conn(key)).arg("node").query_async(&mut con).await?;
    let node_alive = match &node {
        Some(n) => redis::cmd("EXISTS").arg(app.keys.node_alive(n)).query_async::<bool>(&mut con).await?,
        None => false,
    };
    Ok(DeviceView {
        key: k,
        kind: row.get(0),
        status: row.get(1),
        status_reason: row.get(2),
        status_changed_ms: ms_of(row.get(3)),
        epoch: row.get(4),
        initialised: row.get(5),
        enabled: row.get(6),
        info: row.get(7),
        last_seen_ms: seen,
        node,
        node_alive,
    })
}

/// A device's status changes, newest first.
///
/// # Errors
/// `NotFound`, or a storage error.
pub async fn history(app: &App, key: &DeviceKey, limit: i64) -> Result<Vec<HistoryEntry>, StoreError> {
    let k = key.to_string();
    let client = app.pg.get().await?;
    if client.query_opt("SELECT 1 FROM devices WHERE key = $1", &[&k]).await?.is_none() {
        return Err(StoreError::NotFound(format!("device {k}")));
    }
    let rows = client
        .query(
            "SELECT from_status, to_status, reason, epoch, node, at FROM device_status_history
              WHERE device_key = $1 ORDER BY at DESC, id DESC LIMIT $2",
            &[&k, &limit.clamp(1, 1000)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| HistoryEntry {
            from: r.get(0),
            to: r.get(1),
            reason: r.get(2),
            epoch: r.get(3),
            node: r.get(4),
            at_ms: ms_of(r.get(5)),
        })
        .collect())
}
