//! The door lock: one holder per cabinet door at a time (an order, a restock, a price change),
//! across every device-service instance. A Redis key `P lock:{cabinet}:door:N` holds the
//! holder's token with a TTL; only the holder releases or renews it (compare-and-delete,
//! compare-and-expire), so an expired and re-taken lock is never released by its former holder.
//! Orders and restocks keep their token in PostgreSQL, and [`renew_all`] renews every running
//! one's lock while it runs (from any instance: renewal is idempotent).

use redis::Script;

use crate::app::App;
use crate::error::StoreError;

/// Deletes the key only if it holds the token.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Extends the TTL if the key holds the token; takes the lock again if it is free (it expired
/// or Redis lost it); 0 if someone else holds it.
const RENEW: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
";

/// A door, as the lock names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Door<'a> {
    /// Cabinet id.
    pub cabinet: &'a str,
    /// Door id.
    pub door: u8,
}

fn key(app: &App, door: Door<'_>) -> String {
    format!("{}lock:{{{}}}:door:{}", app.keys.prefix(), door.cabinet, door.door)
}

fn ttl_ms(app: &App) -> u64 {
    app.config.purchases.lock_ttl_s * 1000
}

/// A fresh random token with a `kind` prefix (`o`, `r`, `p`), also usable as an id.
///
/// # Errors
/// The system's random source failed.
pub fn token(kind: &str) -> Result<String, StoreError> {
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes).map_err(|e| StoreError::invalid("random", e.to_string()))?;
    Ok(format!("{kind}{}", hex::encode(bytes)))
}

/// Takes the door's lock for `token`. `Ok(false)`: someone else holds it (counted).
///
/// # Errors
/// Redis errors.
pub async fn acquire(app: &App, door: Door<'_>, token: &str) -> Result<bool, StoreError> {
    let mut con = app.redis.clone();
    let set: Option<String> = redis::cmd("SET")
        .arg(key(app, door))
        .arg(token)
        .arg("NX")
        .arg("PX")
        .arg(ttl_ms(app))
        .query_async(&mut con)
        .await?;
    let got = set.is_some();
    app.metrics.door_locks.with_label_values(&[if got { "acquired" } else { "busy" }]).inc();
    Ok(got)
}

/// Releases the door's lock if `token` still holds it.
///
/// # Errors
/// Redis errors (the lock then expires by its TTL).
pub async fn release(app: &App, door: Door<'_>, token: &str) -> Result<bool, StoreError> {
    let mut con = app.redis.clone();
    let n: i64 = Script::new(RELEASE).key(key(app, door)).arg(token).invoke_async(&mut con).await?;
    Ok(n == 1)
}

/// Releases and logs instead of failing: the lock's TTL is the fallback.
pub async fn release_quietly(app: &App, door: Door<'_>, token: &str) {
    if let Err(e) = release(app, door, token).await {
        tracing::warn!(cabinet = door.cabinet, door = door.door, error = %e, "failed to release a door lock; it expires by itself");
    }
}

/// Renews the lock of every running order and restock. Returns how many locks were found
/// held by someone else (each logged and counted: two holders of one door must be looked at).
///
/// # Errors
/// PostgreSQL or Redis errors.
pub async fn renew_all(app: &App) -> Result<u64, StoreError> {
    let client = app.pg.get().await?;
    let rows = client
        .query(
            "SELECT cabinet_id, door_id, lock_token FROM orders
              WHERE state IN ('created', 'authorised', 'door_opening', 'door_open', 'door_closed')
             UNION ALL
             SELECT cabinet_id, door_id, lock_token FROM restocks WHERE finished_at IS NULL",
            &[],
        )
        .await?;
    let mut con = app.redis.clone();
    let script = Script::new(RENEW);
    let mut lost = 0;
    for row in rows {
        let (cabinet, door, token): (String, i16, String) = (row.get(0), row.get(1), row.get(2));
        let door = Door { cabinet: &cabinet, door: u8::try_from(door).unwrap_or(0) };
        let n: i64 = script.key(key(app, door)).arg(&token).arg(ttl_ms(app)).invoke_async(&mut con).await?;
        if n == 0 {
            lost += 1;
            app.metrics.door_locks.with_label_values(&["lost"]).inc();
            tracing::warn!(cabinet = %cabinet, door = door.door, "a running order's door lock is held by someone else");
        }
    }
    Ok(lost)
}
