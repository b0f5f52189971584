//! Persistent MQTT sessions (SPEC.md 2.1): a vehicle that connects with clean session 0
//! (3.1.1) or a session expiry (5.0) keeps its subscriptions and its unacknowledged QoS 1
//! downlinks across a reconnect, on whichever node it reconnects to.
//!
//! The state lives in Redis under the VIN's hash tag (`P mqtt:{VIN}:session`, `P
//! mqtt:{VIN}:inflight`), so both keys sit in one Redis Cluster slot and change together in
//! one transaction. The list is bounded by `max_stored_downlinks`.

use bytes::Bytes;
use protocol::Vin;
use protocol::mqtt::QoS;
use protocol::mqtt::topic::DownlinkKind;
use redis::RedisResult;
use serde::{Deserialize, Serialize};

use crate::context::Ctx;

/// A downlink sent at QoS 1 and not yet acknowledged, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StoredDownlink {
    /// Its packet id (resent with the same id, DUP set).
    pub(super) packet_id: u16,
    /// Which downlink.
    pub(super) kind: DownlinkKind,
    /// The command's request id.
    pub(super) request_id: String,
    /// The payload.
    pub(super) payload: Bytes,
}

#[derive(Serialize, Deserialize)]
struct Wire {
    pid: u16,
    kind: String,
    rid: String,
    /// Hex: payloads are bytes, even if they are JSON in practice.
    hex: String,
}

impl StoredDownlink {
    /// The exact bytes stored in the list (also what removal matches on).
    pub(super) fn to_bytes(&self) -> Vec<u8> {
        let wire = Wire {
            pid: self.packet_id,
            kind: self.kind.as_str().to_owned(),
            rid: self.request_id.clone(),
            hex: hex::encode(&self.payload),
        };
        serde_json::to_vec(&wire).unwrap_or_default()
    }

    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let wire: Wire = serde_json::from_slice(bytes).ok()?;
        Some(Self {
            packet_id: wire.pid,
            kind: wire.kind.parse().ok()?,
            request_id: wire.rid,
            payload: Bytes::from(hex::decode(wire.hex).ok()?),
        })
    }
}

/// A persistent session as found at connect.
#[derive(Debug, Default)]
pub(super) struct Stored {
    /// Subscriptions and their granted QoS.
    pub(super) subscriptions: Vec<(String, QoS)>,
    /// Downlinks to send again, oldest first.
    pub(super) inflight: Vec<StoredDownlink>,
}

fn qos_from(n: u8) -> QoS {
    if n == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce }
}

/// Loads the session of `vin` and stops its expiry; `None` if there is none.
///
/// # Errors
/// Any Redis error.
pub(super) async fn load(ctx: &Ctx, vin: &Vin) -> RedisResult<Option<Stored>> {
    let mut con = ctx.redis.clone();
    let (subs, inflight, _, _): (Option<String>, Vec<Vec<u8>>, i64, i64) = redis::pipe()
        .atomic()
        .cmd("HGET")
        .arg(ctx.keys.mqtt_session(vin))
        .arg("subs")
        .cmd("LRANGE")
        .arg(ctx.keys.mqtt_inflight(vin))
        .arg(0)
        .arg(-1)
        .cmd("PERSIST")
        .arg(ctx.keys.mqtt_session(vin))
        .cmd("PERSIST")
        .arg(ctx.keys.mqtt_inflight(vin))
        .query_async(&mut con)
        .await?;
    let Some(subs) = subs else { return Ok(None) };
    let subscriptions: Vec<(String, u8)> = serde_json::from_str(&subs).unwrap_or_default();
    Ok(Some(Stored {
        subscriptions: subscriptions.into_iter().map(|(f, q)| (f, qos_from(q))).collect(),
        inflight: inflight.iter().filter_map(|b| StoredDownlink::from_bytes(b)).collect(),
    }))
}

/// Creates (or replaces) the session record with no subscriptions and no downlinks.
///
/// # Errors
/// Any Redis error.
pub(super) async fn create(ctx: &Ctx, vin: &Vin) -> RedisResult<()> {
    let mut con = ctx.redis.clone();
    redis::pipe()
        .atomic()
        .cmd("DEL")
        .arg(ctx.keys.mqtt_inflight(vin))
        .ignore()
        .cmd("HSET")
        .arg(ctx.keys.mqtt_session(vin))
        .arg("subs")
        .arg("[]")
        .ignore()
        .query_async(&mut con)
        .await
}

/// Deletes the session of `vin` (clean start, or a non-persistent session ending).
///
/// # Errors
/// Any Redis error.
pub(super) async fn delete(ctx: &Ctx, vin: &Vin) -> RedisResult<()> {
    let mut con = ctx.redis.clone();
    redis::cmd("DEL").arg(ctx.keys.mqtt_session(vin)).arg(ctx.keys.mqtt_inflight(vin)).query_async(&mut con).await
}

/// Saves the subscriptions.
///
/// # Errors
/// Any Redis error.
pub(super) async fn save_subscriptions(ctx: &Ctx, vin: &Vin, subs: &[(String, QoS)]) -> RedisResult<()> {
    let list: Vec<(&str, u8)> = subs.iter().map(|(f, q)| (f.as_str(), *q as u8)).collect();
    let json = serde_json::to_string(&list).unwrap_or_else(|_| "[]".into());
    let mut con = ctx.redis.clone();
    redis::cmd("HSET").arg(ctx.keys.mqtt_session(vin)).arg("subs").arg(json).query_async(&mut con).await
}

/// Appends a downlink, keeping at most `max` (the oldest are dropped).
///
/// # Errors
/// Any Redis error.
pub(super) async fn push(ctx: &Ctx, vin: &Vin, stored: &[u8], max: usize) -> RedisResult<()> {
    let max = i64::try_from(max).unwrap_or(i64::MAX);
    let mut con = ctx.redis.clone();
    redis::pipe()
        .atomic()
        .cmd("RPUSH")
        .arg(ctx.keys.mqtt_inflight(vin))
        .arg(stored)
        .ignore()
        .cmd("LTRIM")
        .arg(ctx.keys.mqtt_inflight(vin))
        .arg(-max)
        .arg(-1)
        .ignore()
        .query_async(&mut con)
        .await
}

/// Removes an acknowledged downlink.
///
/// # Errors
/// Any Redis error.
pub(super) async fn remove(ctx: &Ctx, vin: &Vin, stored: &[u8]) -> RedisResult<()> {
    let mut con = ctx.redis.clone();
    redis::cmd("LREM").arg(ctx.keys.mqtt_inflight(vin)).arg(1).arg(stored).query_async(&mut con).await
}

/// Starts the expiry clock of a session whose connection ended.
///
/// # Errors
/// Any Redis error.
pub(super) async fn expire(ctx: &Ctx, vin: &Vin, seconds: u32) -> RedisResult<()> {
    let mut con = ctx.redis.clone();
    redis::pipe()
        .atomic()
        .cmd("EXPIRE")
        .arg(ctx.keys.mqtt_session(vin))
        .arg(seconds)
        .ignore()
        .cmd("EXPIRE")
        .arg(ctx.keys.mqtt_inflight(vin))
        .arg(seconds)
        .ignore()
        .query_async(&mut con)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_downlink_round_trips() {
        let d = StoredDownlink {
            packet_id: 7,
            kind: DownlinkKind::OtaNotify,
            request_id: "r-1".into(),
            payload: Bytes::from_static(b"{\"x\":1}\n\xff"),
        };
        assert_eq!(StoredDownlink::from_bytes(&d.to_bytes()), Some(d));
        assert_eq!(StoredDownlink::from_bytes(b"nope"), None);
    }
}
