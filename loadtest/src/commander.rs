//! Sends commands to simulated devices the way the device service does (SPEC.md 3.3): look up
//! the device's node in the connection map, add the command to that node's stream, read the
//! reply from an own reply stream. Measures the round trip sender -> Redis -> gateway ->
//! device -> gateway -> Redis -> sender.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use protocol::OrderId;
use protocol::bus::{CommandBody, CommandReply, CommandRequest, DeviceKey, Keys, Outcome};
use protocol::cabinet::CommandAction;
use protocol::mqtt::topic::DownlinkKind;
use redis::streams::StreamReadReply;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::stats::new_histogram;

/// Outcome counts and the round-trip histogram.
#[derive(Debug)]
pub struct CommandStats {
    /// Round trips of answered commands, µs.
    pub rtt: Histogram<u64>,
    /// Replies by outcome.
    pub outcomes: HashMap<&'static str, u64>,
    /// Commands sent.
    pub sent: u64,
    /// Devices not found in the map.
    pub unmapped: u64,
}

/// Sends `rate_per_s` commands per second to random `targets` until `stop`, then waits a few
/// seconds for the last replies. Cabinets get `QUERY_DOOR`, or with `open_doors` an
/// `OPEN_DOOR` for a fresh order (the simulated shopper then takes items and closes the door,
/// and the cabinet reports weights every 300 ms meanwhile).
///
/// # Errors
/// Redis errors opening connections.
pub async fn run(
    redis_url: &str,
    keys: &Keys,
    targets: &[DeviceKey],
    rate_per_s: u32,
    open_doors: bool,
    stop: CancellationToken,
) -> redis::RedisResult<CommandStats> {
    // Handles that reconnect: the chaos scenarios restart Redis under the commander.
    let target = redis_conn::RedisTarget::Single(redis_url.to_owned());
    let mut con = redis_conn::RedisConn::open(&target, None).await?;
    let reader = redis_conn::RedisConn::open(&target, None).await?;
    let sender = format!("loadtest-{}-{:x}", std::process::id(), fastrand::u32(..));
    let reply_stream = keys.replies(&sender);
    let pending: Arc<Mutex<HashMap<String, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let results: Results = Arc::new(Mutex::new((new_histogram(), HashMap::new())));
    let read_stop = CancellationToken::new();
    let reading = tokio::spawn(read_replies(
        reader,
        reply_stream.clone(),
        Arc::clone(&pending),
        Arc::clone(&results),
        read_stop.clone(),
    ));

    let mut stats = CommandStats { rtt: new_histogram(), outcomes: HashMap::new(), sent: 0, unmapped: 0 };
    if !targets.is_empty() && rate_per_s > 0 {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / rate_per_s);
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => break,
            }
            let device = &targets[fastrand::usize(..targets.len())];
            let node: Option<String> =
                redis::cmd("HGET").arg(keys.conn(device)).arg("node").query_async(&mut con).await.unwrap_or(None);
            let Some(node) = node else {
                stats.unmapped += 1;
                continue;
            };
            n += 1;
            let request_id = format!("{sender}-{n}");
            let body = match device {
                DeviceKey::Cabinet(_) if open_doors => {
                    let Ok(order_id) = OrderId::new(format!("{sender}-{n}")) else { continue };
                    let door_id = 1 + u8::try_from(n % 2).unwrap_or(0);
                    CommandBody::Cabinet(CommandAction::OpenDoor { door_id, order_id })
                }
                DeviceKey::Cabinet(_) => CommandBody::Cabinet(CommandAction::QueryDoor { door_id: 1 }),
                DeviceKey::Vehicle(_) => CommandBody::Vehicle {
                    kind: DownlinkKind::Command,
                    payload: Bytes::from(format!(
                        r#"{{"request_id":"{request_id}","name":"locate","params":{{}},"expires_at_ms":0}}"#
                    )),
                },
            };
            let request = CommandRequest {
                request_id: request_id.clone(),
                device: device.clone(),
                deadline_ms: crate::cabinet::now_ms() + 5000,
                reply_to: reply_stream.clone(),
                body,
            };
            let Ok(fields) = request.to_fields() else { continue };
            pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(request_id, Instant::now());
            let added: redis::RedisResult<String> = redis::cmd("XADD")
                .arg(keys.commands(&node))
                .arg("MAXLEN")
                .arg("~")
                .arg(protocol::bus::COMMAND_STREAM_MAXLEN)
                .arg("*")
                .arg(fields)
                .query_async(&mut con)
                .await;
            if added.is_ok() {
                stats.sent += 1;
            }
        }
    }
    // Replies still on their way (deadline 5 s).
    let grace = Instant::now() + Duration::from_secs(6);
    while Instant::now() < grace && !pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_empty() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    read_stop.cancel();
    let _ = reading.await;
    let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&reply_stream).query_async(&mut con).await;
    let (rtt, outcomes) = std::mem::replace(
        &mut *results.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
        (new_histogram(), HashMap::new()),
    );
    stats.rtt = rtt;
    stats.outcomes = outcomes;
    Ok(stats)
}

type Results = Arc<Mutex<(Histogram<u64>, HashMap<&'static str, u64>)>>;

async fn read_replies(
    mut con: redis_conn::RedisConn,
    stream: String,
    pending: Arc<Mutex<HashMap<String, Instant>>>,
    results: Results,
    stop: CancellationToken,
) {
    let mut cursor = "0".to_owned();
    while !stop.is_cancelled() {
        let reply: redis::RedisResult<Option<StreamReadReply>> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1000)
            .arg("BLOCK")
            .arg(200)
            .arg("STREAMS")
            .arg(&stream)
            .arg(&cursor)
            .query_async(&mut con)
            .await;
        let reply = match reply {
            Ok(Some(reply)) => reply,
            Ok(None) => continue,
            // Redis away (a chaos scenario restarts it): a pause, not a spin that would starve
            // the runtime's other tasks.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        for entry in reply.keys.into_iter().flat_map(|k| k.ids) {
            cursor.clone_from(&entry.id);
            let fields = redis_conn::bulk_fields(entry.map);
            let Ok(reply) = CommandReply::from_fields(&fields) else { continue };
            let sent = pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&reply.request_id);
            let mut r = results.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            *r.1.entry(reply.outcome.label()).or_default() += 1;
            if let (Some(sent), Outcome::Cabinet(_) | Outcome::Delivered) = (sent, &reply.outcome) {
                let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX).clamp(1, 600_000_000);
                let _ = r.0.record(micros);
            }
        }
    }
}
