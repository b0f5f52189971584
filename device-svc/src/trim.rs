//! Upstream streams are trimmed here, and only below what every consumer group has
//! acknowledged: an entry leaves Redis once it is applied, never because a stream grew long.
//! Gateways do not trim upstream streams at all; at their length cap they hold new writes
//! (backpressure) until this trimming makes room (SPEC.md 3.2).

use std::collections::HashMap;

use redis::Value;
use redis::streams::StreamPendingReply;
use redis_conn::RedisConn;

/// A stream entry id, `ms-seq`, as numbers (ordered as Redis orders them).
type EntryId = (u64, u64);

fn parse_id(id: &str) -> Option<EntryId> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// The lowest id any consumer group of `stream` still needs: its oldest entry delivered and not
/// acknowledged, or else the one after the last delivered. `None` when the stream has no group
/// (nothing may be trimmed: nobody has read anything yet).
async fn lowest_needed(redis: &mut RedisConn, stream: &str) -> redis::RedisResult<Option<EntryId>> {
    let groups: Vec<HashMap<String, Value>> = redis::cmd("XINFO").arg("GROUPS").arg(stream).query_async(redis).await?;
    let mut lowest: Option<EntryId> = None;
    for g in &groups {
        let (Some(name), Some(last)) = (text(g.get("name")), text(g.get("last-delivered-id"))) else { return Ok(None) };
        let Some(last) = parse_id(&last) else { return Ok(None) };
        let pending = matches!(g.get("pending"), Some(Value::Int(n)) if *n > 0);
        let needed = if pending {
            let reply: StreamPendingReply = redis::cmd("XPENDING").arg(stream).arg(&name).query_async(redis).await?;
            match reply {
                StreamPendingReply::Data(d) => match parse_id(&d.start_id) {
                    Some(id) => id,
                    None => return Ok(None),
                },
                // Acknowledged in between: everything delivered is done.
                _ => (last.0, last.1.saturating_add(1)),
            }
        } else {
            (last.0, last.1.saturating_add(1))
        };
        lowest = Some(lowest.map_or(needed, |l| l.min(needed)));
    }
    Ok(lowest)
}

/// Removes the entries of `stream` every consumer group has acknowledged (`XTRIM MINID ~`:
/// whole internal nodes only, so a few such entries may stay until the next call). Returns how
/// many were removed.
///
/// # Errors
/// Redis errors; nothing is trimmed then.
pub async fn trim_consumed(redis: &mut RedisConn, stream: &str) -> redis::RedisResult<u64> {
    let Some((ms, seq)) = lowest_needed(redis, stream).await? else { return Ok(0) };
    redis::cmd("XTRIM").arg(stream).arg("MINID").arg("~").arg(format!("{ms}-{seq}")).query_async(redis).await
}

#[cfg(test)]
mod tests {
    use super::parse_id;

    #[test]
    fn ids_order_as_redis_orders_them() {
        assert_eq!(parse_id("1700000000000-3"), Some((1_700_000_000_000, 3)));
        assert!(parse_id("9-10") > parse_id("9-9"));
        assert!(parse_id("10-0") > parse_id("9-99"));
        assert_eq!(parse_id("bad"), None);
    }
}
