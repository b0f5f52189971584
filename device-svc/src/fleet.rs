//! The fleet as lists an operator pages through: devices by status, kind, node and last change;
//! cabinets with their doors and lanes; vehicles by state, version and owner. Each list is a
//! keyset [`Page`] (see [`crate::listing`]); the last heartbeat of the devices on a page is read
//! from Redis in one round trip, everything else from PostgreSQL.
//!
//! Ids are ordered and searched by prefix byte by byte (`COLLATE "C"`): one index then serves
//! both the order and a prefix search (`LIKE 'cab:A1%'`), which under the database's own
//! collation would need two and could not be read in order.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use protocol::bus::DeviceKey;
use serde::Serialize;

use crate::app::App;
use crate::clock::ms_of;
use crate::error::StoreError;
use crate::listing::{self, Cursor, Page, Params, Select};
use crate::registry::{Cabinet, DoorConfig, LaneConfig};

/// The order of a device list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSort {
    /// By key, ascending (the default).
    #[default]
    Key,
    /// By the last status change, newest first (with `status=offline`: longest silent last).
    Changed,
}

/// What a device list is filtered by; `None` is "any".
#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    /// `cab` or `veh`.
    pub kind: Option<String>,
    /// `registered`, `pending_init`, `online` or `offline`.
    pub status: Option<String>,
    /// The gateway node recorded with the last status change.
    pub node: Option<String>,
    /// Credentials enabled or disabled.
    pub enabled: Option<bool>,
    /// Keys starting with this (`cab:A1`, `veh:LSV`).
    pub key_prefix: Option<String>,
    /// Status changed at or after this time.
    pub changed_from: Option<SystemTime>,
    /// Status changed before this time (with `status=offline`: silent since before it).
    pub changed_before: Option<SystemTime>,
    /// Order.
    pub sort: DeviceSort,
}

/// A device in a list.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeviceRow {
    /// `cab:ID` or `veh:VIN`.
    pub key: String,
    /// `cab` or `veh`.
    pub kind: String,
    /// Status.
    pub status: String,
    /// Why it last changed.
    pub status_reason: String,
    /// When, ms since the Unix epoch.
    pub status_changed_ms: u64,
    /// The gateway node of the last session, if any.
    pub node: Option<String>,
    /// Whether its credentials are enabled.
    pub enabled: bool,
    /// Firmware or MQTT version of the last session.
    pub info: Option<String>,
    /// Its last heartbeat, ms since the Unix epoch, if Redis holds one.
    pub last_seen_ms: Option<u64>,
    #[serde(skip)]
    changed_at: SystemTime,
}

const DEVICE_COLUMNS: &str = "key, kind, status, status_reason, status_changed_at, node, enabled, info";

/// The statement of a device list (public for the plan test).
///
/// # Errors
/// `Invalid` for a cursor of another sort.
pub fn devices_query(f: &DeviceFilter, after: Option<&Cursor>, limit: i64) -> Result<(String, Params), StoreError> {
    let mut s = Select::new(format!("SELECT {DEVICE_COLUMNS} FROM devices"));
    if let Some(v) = &f.kind {
        s.bind("kind = $", v.clone());
    }
    if let Some(v) = &f.status {
        s.bind("status = $", v.clone());
    }
    if let Some(v) = &f.node {
        s.bind("node = $", v.clone());
    }
    match f.enabled {
        // The partial index `devices_disabled` has this predicate.
        Some(false) => s.and("NOT enabled"),
        Some(true) => s.and("enabled"),
        None => &mut s,
    };
    if let Some(v) = &f.key_prefix {
        s.bind(r#"key COLLATE "C" LIKE $"#, listing::prefix_pattern(v));
    }
    if let Some(v) = f.changed_from {
        s.bind("status_changed_at >= $", v);
    }
    if let Some(v) = f.changed_before {
        s.bind("status_changed_at < $", v);
    }
    let tail = match f.sort {
        DeviceSort::Key => {
            if let Some(c) = after {
                s.bind(r#"key COLLATE "C" > $"#, c.id.clone());
            }
            r#"ORDER BY key COLLATE "C""#
        }
        DeviceSort::Changed => {
            if let Some(c) = after {
                s.bind2(r#"(status_changed_at, key COLLATE "C") < ($a, $b)"#, c.time()?, c.id.clone());
            }
            r#"ORDER BY status_changed_at DESC, key COLLATE "C" DESC"#
        }
    };
    Ok(s.finish(tail, limit))
}

/// A page of devices.
///
/// # Errors
/// `Invalid` for a bad cursor; storage errors.
pub async fn devices(
    app: &App,
    f: &DeviceFilter,
    after: Option<&Cursor>,
    limit: i64,
) -> Result<Page<DeviceRow>, StoreError> {
    let (sql, params) = devices_query(f, after, limit)?;
    let client = app.pg.get().await?;
    let rows = client.query(&sql, &listing::refs(&params)).await?;
    drop(client);
    let mut items: Vec<DeviceRow> = rows
        .iter()
        .map(|r| DeviceRow {
            key: r.get(0),
            kind: r.get(1),
            status: r.get(2),
            status_reason: r.get(3),
            status_changed_ms: ms_of(r.get(4)),
            changed_at: r.get(4),
            node: r.get(5),
            enabled: r.get(6),
            info: r.get(7),
            last_seen_ms: None,
        })
        .collect();
    let keys: Vec<DeviceKey> = items.iter().filter_map(|d| DeviceKey::parse(&d.key).ok()).collect();
    let seen = crate::offline::last_seen_many(app, &keys).await?;
    for d in &mut items {
        d.last_seen_ms = seen.get(&d.key).copied();
    }
    let sort = f.sort;
    Ok(listing::page(items, limit, |d| match sort {
        DeviceSort::Key => Cursor::after(None, d.key.clone()),
        DeviceSort::Changed => Cursor::after(Some(d.changed_at), d.key.clone()),
    }))
}

/// What a cabinet list is filtered by.
#[derive(Debug, Clone, Default)]
pub struct CabinetFilter {
    /// Ids starting with this.
    pub id_prefix: Option<String>,
    /// The cabinet's device status.
    pub status: Option<String>,
}

/// A cabinet in a list: its configuration and its device's status.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CabinetRow {
    /// Configuration (id, name, location, doors and lanes).
    #[serde(flatten)]
    pub cabinet: Cabinet,
    /// The device's status.
    pub status: String,
    /// The gateway node of its last session.
    pub node: Option<String>,
}

/// The statement of a cabinet list, by id (public for the plan test).
pub fn cabinets_query(f: &CabinetFilter, after: Option<&Cursor>, limit: i64) -> (String, Params) {
    let mut s = Select::new(
        "SELECT c.id, c.name, c.location, d.status, d.node FROM cabinets c JOIN devices d ON d.key = c.device_key",
    );
    if let Some(v) = &f.id_prefix {
        s.bind(r#"c.id COLLATE "C" LIKE $"#, listing::prefix_pattern(v));
    }
    if let Some(v) = &f.status {
        s.bind("d.status = $", v.clone());
    }
    if let Some(c) = after {
        s.bind(r#"c.id COLLATE "C" > $"#, c.id.clone());
    }
    s.finish(r#"ORDER BY c.id COLLATE "C""#, limit)
}

/// A page of cabinets with their doors and lanes.
///
/// # Errors
/// Storage errors.
pub async fn cabinets(
    app: &App,
    f: &CabinetFilter,
    after: Option<&Cursor>,
    limit: i64,
) -> Result<Page<CabinetRow>, StoreError> {
    let (sql, params) = cabinets_query(f, after, limit);
    let client = app.pg.get().await?;
    let rows = client.query(&sql, &listing::refs(&params)).await?;
    let ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let lanes = client
        .query(
            "SELECT d.cabinet_id, d.door_id, l.lane_id, l.product_id, l.restock_threshold, l.price_cents
               FROM doors d LEFT JOIN lanes l ON l.cabinet_id = d.cabinet_id AND l.door_id = d.door_id
              WHERE d.cabinet_id = ANY($1) ORDER BY d.cabinet_id, d.door_id, l.lane_id",
            &[&ids],
        )
        .await?;
    let mut doors: HashMap<String, BTreeMap<u8, DoorConfig>> = HashMap::new();
    for r in lanes {
        let door_id = u8::try_from(r.get::<_, i16>(1)).unwrap_or(0);
        let door = doors
            .entry(r.get(0))
            .or_default()
            .entry(door_id)
            .or_insert_with(|| DoorConfig { door_id, lanes: Vec::new() });
        if let Some(lane) = r.get::<_, Option<i16>>(2) {
            door.lanes.push(LaneConfig {
                lane_id: u8::try_from(lane).unwrap_or(0),
                product_id: r.get(3),
                restock_threshold: r.get(4),
                price_cents: r.get(5),
            });
        }
    }
    let items = rows
        .iter()
        .map(|r| {
            let id: String = r.get(0);
            let doors = doors.remove(&id).map(|d| d.into_values().collect()).unwrap_or_default();
            CabinetRow {
                cabinet: Cabinet { id, name: r.get(1), location: r.get(2), doors },
                status: r.get(3),
                node: r.get(4),
            }
        })
        .collect();
    Ok(listing::page(items, limit, |c| Cursor::after(None, c.cabinet.id.clone())))
}

/// What a vehicle list is filtered by.
#[derive(Debug, Clone, Default)]
pub struct VehicleFilter {
    /// VINs starting with this.
    pub vin_prefix: Option<String>,
    /// Life-cycle state (`delivered`, `activated`, ...).
    pub state: Option<String>,
    /// Installed software version.
    pub sw_version: Option<String>,
    /// The owner who activated it.
    pub owner_user_id: Option<String>,
}

/// A vehicle in a list.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct VehicleRow {
    /// VIN.
    pub vin: String,
    /// Model.
    pub model: String,
    /// Life-cycle state.
    pub state: String,
    /// Purpose.
    pub purpose: String,
    /// Installed software version.
    pub sw_version: Option<String>,
    /// The owner who activated it.
    pub owner_user_id: Option<String>,
    /// The device's connection status.
    pub status: String,
}

/// The statement of a vehicle list, by VIN (public for the plan test).
pub fn vehicles_query(f: &VehicleFilter, after: Option<&Cursor>, limit: i64) -> (String, Params) {
    let mut s = Select::new(
        "SELECT v.vin, v.model, v.state, v.purpose, v.sw_version, v.owner_user_id, d.status
           FROM vehicles v JOIN devices d ON d.key = v.device_key",
    );
    if let Some(v) = &f.vin_prefix {
        s.bind(r#"v.vin COLLATE "C" LIKE $"#, listing::prefix_pattern(v));
    }
    if let Some(v) = &f.state {
        s.bind("v.state = $", v.clone());
    }
    if let Some(v) = &f.sw_version {
        s.bind("v.sw_version = $", v.clone());
    }
    if let Some(v) = &f.owner_user_id {
        s.bind("v.owner_user_id = $", v.clone());
    }
    if let Some(c) = after {
        s.bind(r#"v.vin COLLATE "C" > $"#, c.id.clone());
    }
    s.finish(r#"ORDER BY v.vin COLLATE "C""#, limit)
}

/// A page of vehicles.
///
/// # Errors
/// Storage errors.
pub async fn vehicles(
    app: &App,
    f: &VehicleFilter,
    after: Option<&Cursor>,
    limit: i64,
) -> Result<Page<VehicleRow>, StoreError> {
    let (sql, params) = vehicles_query(f, after, limit);
    let client = app.pg.get().await?;
    let rows = client.query(&sql, &listing::refs(&params)).await?;
    let items = rows
        .iter()
        .map(|r| VehicleRow {
            vin: r.get(0),
            model: r.get(1),
            state: r.get(2),
            purpose: r.get(3),
            sw_version: r.get(4),
            owner_user_id: r.get(5),
            status: r.get(6),
        })
        .collect();
    Ok(listing::page(items, limit, |v| Cursor::after(None, v.vin.clone())))
}
