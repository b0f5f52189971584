//! A lean MQTT 3.1.1 probe for side-by-side benchmarks: the few packets it needs written by
//! hand on one thread, so that the load generator costs little and the same bytes go to any
//! broker. The fleet harness (rumqttc, worker processes) simulates vehicles faithfully; this
//! measures servers: CPU per operation of the given server processes, read from `/proc` over
//! the measured phase only, with the machine's idle share over the same phase.
//!
//! Three loads:
//! - `qos1`: `conns` connections each keep `inflight` QoS 1 publishes outstanding for
//!   `seconds` (or, with `rate`, offer that many a second in all, paced); CPU per acknowledged
//!   publish, PUBACKs per second and their latency.
//! - `churn`: `concurrency` workers connect, subscribe, disconnect and close, `total` times in
//!   all; CPU per connection and connections per second.
//! - `idle`: `conns` subscribed connections held for `seconds`; the servers' RSS growth per
//!   connection after the ramp and at the end.
//!
//! - `cabinet`: `conns` cabinets log in (version 2) and keep `inflight` weight reports
//!   asking for an `ACK` outstanding each for `seconds`; CPU per login and per acknowledged
//!   frame. `floor`: the same frames against `loadtest echo-server`, the cost of a frame in and
//!   an answer out with nothing done in between, on the same machine.
//!
//! Vehicle identities and tokens are the fleet's (`fleet_ids`), so a gateway authenticates the
//! probe with the credentials `--redis-url` provisions; a broker without authentication
//! ignores them.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{Buf, BufMut, BytesMut};
use protocol::bus::Keys;
use protocol::mqtt::topic::{UplinkKind, downlink_filter, uplink_topic};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::fleet_ids;
use crate::stats::{new_histogram, summarize};
use hdrhistogram::Histogram;

/// What the probe does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Load {
    /// QoS 1 publishes with a fixed window in flight per connection.
    Qos1,
    /// Connect, subscribe, disconnect, again and again.
    Churn,
    /// Subscribed connections held idle.
    Idle,
    /// Cabinets (SPEC.md part 1): log in (version 2), then keep `inflight` weight reports
    /// asking for an `ACK` outstanding each; CPU per login and per acknowledged frame.
    Cabinet,
    /// The same weight-report frames against a bare echo server (`loadtest echo-server`), no
    /// login: the machine's floor for one frame in and one answer out.
    Floor,
}

/// A probe run.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbePlan {
    /// The load.
    #[arg(long, value_enum)]
    pub load: Load,
    /// The broker's MQTT listener.
    #[arg(long)]
    pub addr: SocketAddr,
    /// Connections (qos1, idle).
    #[arg(long, default_value_t = 100)]
    pub conns: usize,
    /// Publishes outstanding per connection (qos1).
    #[arg(long, default_value_t = 10)]
    pub inflight: usize,
    /// Publishes per second offered in all (qos1; 0: each PUBACK is answered at once with the
    /// next publish, the most the window allows).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Payload bytes per publish (qos1).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Connections in all (churn).
    #[arg(long, default_value_t = 20_000)]
    pub total: usize,
    /// Concurrent connect-subscribe-disconnect workers (churn).
    #[arg(long, default_value_t = 50)]
    pub concurrency: usize,
    /// New connections per second while ramping (idle).
    #[arg(long, default_value_t = 5_000)]
    pub ramp_per_s: u32,
    /// Measured seconds (qos1), or the hold after the ramp (idle).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Server processes whose CPU and memory are counted (repeat: broker, its Redis).
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// Provision the vehicles' credentials in this Redis first (a gateway's; none for a broker
    /// without authentication).
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Key prefix of the gateway's Redis keys.
    #[arg(long, default_value = "iotgw:")]
    pub key_prefix: String,
    /// Vehicle numbers start here (several probes against one gateway use disjoint ranges).
    #[arg(long, default_value_t = 0)]
    pub first: usize,
}

/// CPU ticks (utime + stime) of `pid`.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("stat format")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    Ok(f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?)
}

/// Busy and total jiffies of the whole machine, from `/proc/stat`.
fn machine_jiffies() -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat")?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// CPU of the servers, the probe itself and the machine over a measured phase.
struct Meter {
    pids: Vec<u32>,
    servers: u64,
    own: u64,
    machine: (u64, u64),
    at: Instant,
}

impl Meter {
    fn start(pids: &[u32]) -> anyhow::Result<Self> {
        Ok(Self {
            pids: pids.to_vec(),
            servers: pids.iter().map(|p| cpu_ticks(*p)).sum::<anyhow::Result<u64>>()?,
            own: cpu_ticks(std::process::id())?,
            machine: machine_jiffies()?,
            at: Instant::now(),
        })
    }

    /// The phase's figures: server CPU seconds (each and in all), the probe's, and the share
    /// of the machine that was idle and that neither the servers nor the probe used.
    fn stop(&self) -> anyhow::Result<serde_json::Value> {
        let hz = 100.0; // USER_HZ on Linux
        let each: Vec<u64> = self.pids.iter().map(|p| cpu_ticks(*p)).collect::<anyhow::Result<_>>()?;
        let servers = each.iter().sum::<u64>() - self.servers;
        let own = cpu_ticks(std::process::id())? - self.own;
        let (busy, total) = machine_jiffies()?;
        let (busy, total) = ((busy - self.machine.0) as f64, (total - self.machine.1).max(1) as f64);
        let others = (busy - servers as f64 - own as f64).max(0.0);
        Ok(json!({
            "seconds": self.at.elapsed().as_secs_f64(),
            "server_cpu_s": servers as f64 / hz,
            "server_cpu_s_each": each.iter().map(|t| *t as f64 / hz).collect::<Vec<_>>(),
            "probe_cpu_s": own as f64 / hz,
            "machine_idle_share": 1.0 - busy / total,
            "other_processes_share": others / total,
        }))
    }
}

/// Microseconds since `t`, for a histogram.
fn micros(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Encodes a remaining length.
fn put_len(buf: &mut BytesMut, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        buf.put_u8(b);
        if n == 0 {
            break;
        }
    }
}

fn put_str(buf: &mut BytesMut, s: &[u8]) {
    buf.put_u16(s.len() as u16);
    buf.put_slice(s);
}

fn connect_packet(client_id: &str, user: &str, password: &str) -> BytesMut {
    let mut body = BytesMut::new();
    put_str(&mut body, b"MQTT");
    body.put_u8(4); // 3.1.1
    body.put_u8(0x80 | 0x40 | 0x02); // username, password, clean session
    body.put_u16(60);
    put_str(&mut body, client_id.as_bytes());
    put_str(&mut body, user.as_bytes());
    put_str(&mut body, password.as_bytes());
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(0x10);
    put_len(&mut out, body.len());
    out.put_slice(&body);
    out
}

fn subscribe_packet(filter: &str) -> BytesMut {
    let mut out = BytesMut::new();
    out.put_u8(0x82);
    put_len(&mut out, 2 + 2 + filter.len() + 1);
    out.put_u16(1);
    put_str(&mut out, filter.as_bytes());
    out.put_u8(1);
    out
}

/// A QoS 1 publish with packet id `id`, written into `out`.
fn put_publish(out: &mut BytesMut, topic: &[u8], id: u16, payload: &[u8]) {
    out.put_u8(0x32);
    put_len(out, 2 + topic.len() + 2 + payload.len());
    put_str(out, topic);
    out.put_u16(id);
    out.put_slice(payload);
}

/// One packet from `buf`, if whole: (first byte, body).
fn take_packet(buf: &mut BytesMut) -> anyhow::Result<Option<(u8, BytesMut)>> {
    let mut len = 0usize;
    let mut shift = 0;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else { return Ok(None) };
        len |= usize::from(b & 0x7f) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            bail!("bad remaining length");
        }
    }
    if buf.len() < i + len {
        return Ok(None);
    }
    let first = buf[0];
    buf.advance(i);
    Ok(Some((first, buf.split_to(len))))
}

/// Reads until one whole packet is in `buf`.
async fn read_packet(sock: &mut TcpStream, buf: &mut BytesMut) -> anyhow::Result<(u8, BytesMut)> {
    loop {
        if let Some(p) = take_packet(buf)? {
            return Ok(p);
        }
        if sock.read_buf(buf).await? == 0 {
            bail!("connection closed");
        }
    }
}

/// Connects vehicle `n` and subscribes to its downlinks.
async fn open(addr: SocketAddr, n: usize) -> anyhow::Result<(TcpStream, BytesMut)> {
    let vin = fleet_ids::vin(n);
    let mut sock = TcpStream::connect(addr).await?;
    sock.set_nodelay(true)?;
    let mut buf = BytesMut::with_capacity(256);
    let mut out = connect_packet(vin.as_str(), vin.as_str(), &fleet_ids::vehicle_token(&vin));
    out.extend_from_slice(&subscribe_packet(&downlink_filter(&vin)));
    sock.write_all(&out).await?;
    let (first, body) = read_packet(&mut sock, &mut buf).await?;
    if first != 0x20 || body.get(1) != Some(&0) {
        bail!("connect refused: {first:#x} {body:?}");
    }
    let (first, body) = read_packet(&mut sock, &mut buf).await?;
    if first != 0x90 || body.get(2).is_none_or(|rc| *rc > 2) {
        bail!("subscribe refused: {first:#x} {body:?}");
    }
    Ok((sock, buf))
}

/// Runs the plan and returns its report.
///
/// # Errors
/// If the broker cannot be reached, refuses the probe, or `/proc` cannot be read.
pub async fn run(plan: &ProbePlan) -> anyhow::Result<serde_json::Value> {
    let devices = match plan.load {
        Load::Churn => plan.total.min(100_000),
        _ => plan.conns,
    };
    if let Some(url) = &plan.redis_url {
        let client = redis::Client::open(url.as_str())?;
        let mut con = client.get_multiplexed_async_connection().await?;
        let keys = Keys::new(&plan.key_prefix);
        // Credentials of devices first..first+devices: provision writes 0..n.
        let (cabinets, vehicles) =
            if plan.load == Load::Cabinet { (plan.first + devices, 0) } else { (0, plan.first + devices) };
        fleet_ids::provision_credentials(&mut con, &keys, cabinets, vehicles).await?;
    }
    let report = match plan.load {
        Load::Qos1 => qos1(plan).await?,
        Load::Churn => churn(plan).await?,
        Load::Idle => idle(plan).await?,
        Load::Cabinet | Load::Floor => cabinets(plan).await?,
    };
    Ok(json!({ "load": format!("{:?}", plan.load).to_lowercase(), "addr": plan.addr.to_string(), "report": report }))
}

async fn qos1(plan: &ProbePlan) -> anyhow::Result<serde_json::Value> {
    let mut socks = Vec::with_capacity(plan.conns);
    for i in 0..plan.conns {
        socks.push((plan.first + i, open(plan.addr, plan.first + i).await?));
    }
    // The payload a vehicle might send: JSON, padded to the size asked.
    let mut payload = br#"{"state":"downloading","pad":""#.to_vec();
    while payload.len() + 2 < plan.payload {
        payload.push(b'x');
    }
    payload.extend_from_slice(b"\"}");
    let stop = Instant::now() + Duration::from_secs(plan.seconds);
    let meter = Meter::start(&plan.server_pids)?;
    let mut tasks = tokio::task::JoinSet::new();
    for (n, (sock, buf)) in socks {
        let topic = uplink_topic(&fleet_ids::vin(n), UplinkKind::OtaStatus).into_bytes();
        let payload = payload.clone();
        let inflight = plan.inflight;
        let period = (plan.rate > 0).then(|| Duration::from_secs_f64(plan.conns as f64 / plan.rate as f64));
        tasks.spawn(async move { publisher(sock, buf, topic, payload, inflight, period, stop).await });
    }
    let mut lat = new_histogram();
    let (mut acked, mut skipped) = (0u64, 0u64);
    while let Some(r) = tasks.join_next().await {
        let (n, k, h) = r??;
        acked += n;
        skipped += k;
        lat.add(&h)?;
    }
    let cpu = meter.stop()?;
    let cpu_s = cpu["server_cpu_s"].as_f64().unwrap_or(0.0);
    Ok(json!({
        "conns": plan.conns, "inflight": plan.inflight, "payload": plan.payload, "rate": plan.rate,
        "acked": acked,
        "skipped_window_full": skipped,
        "acked_per_s": acked as f64 / cpu["seconds"].as_f64().unwrap_or(1.0),
        "server_cpu_us_per_op": cpu_s * 1e6 / (acked.max(1) as f64),
        "puback": summarize(&lat),
        "cpu": cpu,
    }))
}

/// Keeps up to `inflight` publishes outstanding until `stop`, then waits for the last PUBACKs.
/// With a `period`, one publish is due each period (skipped, and counted, while the window is
/// full); without, a PUBACK is answered at once with the next publish.
#[allow(clippy::too_many_arguments)]
async fn publisher(
    mut sock: TcpStream,
    mut buf: BytesMut,
    topic: Vec<u8>,
    payload: Vec<u8>,
    inflight: usize,
    period: Option<Duration>,
    stop: Instant,
) -> anyhow::Result<(u64, u64, Histogram<u64>)> {
    let mut lat = new_histogram();
    let mut sent_at = vec![None; 65_536];
    let mut next_id: u16 = 0;
    let mut out = BytesMut::with_capacity(inflight * (topic.len() + payload.len() + 8));
    let mut outstanding = 0usize;
    let (mut acked, mut skipped) = (0u64, 0u64);
    let mut send = |out: &mut BytesMut, sent_at: &mut Vec<Option<Instant>>| {
        next_id = next_id.wrapping_add(1).max(1);
        put_publish(out, &topic, next_id, &payload);
        sent_at[usize::from(next_id)] = Some(Instant::now());
    };
    // Paced: start at a random point of the period, so connections do not tick together.
    let mut tick = period.map(|p| tokio::time::interval_at(Instant::now() + p.mul_f64(fastrand::f64()), p));
    if tick.is_none() {
        for _ in 0..inflight {
            send(&mut out, &mut sent_at);
            outstanding += 1;
        }
    }
    loop {
        if !out.is_empty() {
            sock.write_all(&out).await?;
            out.clear();
        }
        let more = Instant::now() < stop;
        if !more && outstanding == 0 {
            break;
        }
        let due = async {
            match tick.as_mut() {
                Some(t) if more => t.tick().await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            read = sock.read_buf(&mut buf) => {
                if read? == 0 {
                    bail!("connection closed with {outstanding} publishes unacknowledged");
                }
                while let Some((first, body)) = take_packet(&mut buf)? {
                    if first >> 4 != 4 || body.len() < 2 {
                        continue;
                    }
                    let id = usize::from(u16::from_be_bytes([body[0], body[1]]));
                    if let Some(t) = sent_at[id].take() {
                        lat.saturating_record(micros(t));
                        acked += 1;
                        outstanding -= 1;
                        if more && tick.is_none() {
                            send(&mut out, &mut sent_at);
                            outstanding += 1;
                        }
                    }
                }
            }
            _ = due => {
                if outstanding < inflight {
                    send(&mut out, &mut sent_at);
                    outstanding += 1;
                } else {
                    skipped += 1;
                }
            }
        }
    }
    sock.write_all(&[0xe0, 0]).await?;
    Ok((acked, skipped, lat))
}

async fn churn(plan: &ProbePlan) -> anyhow::Result<serde_json::Value> {
    let meter = Meter::start(&plan.server_pids)?;
    let at = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..plan.concurrency {
        let next = next.clone();
        let (addr, total, first, ids) = (plan.addr, plan.total, plan.first, plan.total.min(100_000));
        tasks.spawn(async move {
            let mut lat = new_histogram();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return anyhow::Ok(lat);
                }
                let t = Instant::now();
                let (mut sock, _) = open(addr, first + i % ids).await?;
                lat.saturating_record(micros(t));
                sock.write_all(&[0xe0, 0]).await?;
                // Wait for the server to close, so the next connection of this identity is not
                // a takeover.
                let mut rest = [0u8; 64];
                while sock.read(&mut rest).await? > 0 {}
            }
        });
    }
    let mut lat = new_histogram();
    while let Some(r) = tasks.join_next().await {
        lat.add(&r??)?;
    }
    let elapsed = at.elapsed().as_secs_f64();
    let cpu = meter.stop()?;
    let cpu_s = cpu["server_cpu_s"].as_f64().unwrap_or(0.0);
    Ok(json!({
        "total": plan.total, "concurrency": plan.concurrency,
        "conns_per_s": plan.total as f64 / elapsed,
        "server_cpu_us_per_op": cpu_s * 1e6 / plan.total.max(1) as f64,
        "connect_subscribe": summarize(&lat),
        "cpu": cpu,
    }))
}

/// A cabinet's weight report of 4 lanes, asking for an `ACK`, as encoded bytes.
fn weight_frame(seq: u32) -> anyhow::Result<BytesMut> {
    use protocol::cabinet::{Flags, Frame, LaneWeight, Message, WeightReport};
    let lanes = (1..=4).map(|lane_id| LaneWeight { lane_id, grams: 1000 + i32::from(lane_id), stable: true }).collect();
    let report = WeightReport { door_id: 1, sample_time_ms: crate::cabinet::now_ms(), lanes };
    let frame = Frame { seq, flags: Flags(Flags::ACK_REQUESTED), message: Message::WeightReport(report) };
    let mut out = BytesMut::with_capacity(frame.encoded_len());
    protocol::cabinet::encode(&frame, &mut out)?;
    Ok(out)
}

/// Reads until one whole cabinet frame is in `buf`.
async fn next_frame(sock: &mut TcpStream, buf: &mut BytesMut) -> anyhow::Result<protocol::cabinet::Frame> {
    loop {
        if let Some(f) = protocol::cabinet::decode(buf, protocol::cabinet::MAX_PAYLOAD_LEN)? {
            return Ok(f);
        }
        if sock.read_buf(buf).await? == 0 {
            bail!("connection closed during login");
        }
    }
}

/// Logs cabinet `n` in with login version 2 (HELLO, CHALLENGE, LOGIN, LOGIN_RESULT).
async fn cabinet_login(addr: SocketAddr, n: usize) -> anyhow::Result<(TcpStream, BytesMut)> {
    use protocol::cabinet::{Frame, Hello, Login, LoginStatus, Message};
    let id = fleet_ids::cabinet_id(n);
    let secret = fleet_ids::cabinet_secret(&id);
    let mut sock = TcpStream::connect(addr).await?;
    sock.set_nodelay(true)?;
    let mut buf = BytesMut::with_capacity(256);
    let mut out = BytesMut::new();
    protocol::cabinet::encode(&Frame::new(1, Message::Hello(Hello { login_version: 2 })), &mut out)?;
    sock.write_all(&out).await?;
    let Message::Challenge(challenge) = next_frame(&mut sock, &mut buf).await?.message else { bail!("no CHALLENGE") };
    let login = Login::sign_v2(id, "probe-1.0", crate::cabinet::now_ms(), challenge.nonce, &secret)?;
    out.clear();
    protocol::cabinet::encode(&Frame::new(2, Message::Login(login)), &mut out)?;
    sock.write_all(&out).await?;
    match next_frame(&mut sock, &mut buf).await?.message {
        Message::LoginResult(r) if r.status == LoginStatus::Accepted => Ok((sock, buf)),
        other => bail!("login refused: {other:?}"),
    }
}

async fn cabinets(plan: &ProbePlan) -> anyhow::Result<serde_json::Value> {
    let meter = Meter::start(&plan.server_pids)?;
    let mut socks = Vec::with_capacity(plan.conns);
    let mut logging_in = tokio::task::JoinSet::new();
    for i in 0..plan.conns {
        let (addr, n) = (plan.addr, plan.first + i);
        if plan.load == Load::Floor {
            logging_in.spawn(async move {
                let sock = TcpStream::connect(addr).await?;
                sock.set_nodelay(true)?;
                anyhow::Ok((sock, BytesMut::new()))
            });
        } else {
            logging_in.spawn(async move { cabinet_login(addr, n).await });
        }
        while logging_in.len() >= 50 {
            if let Some(r) = logging_in.join_next().await {
                socks.push(r??);
            }
        }
    }
    while let Some(r) = logging_in.join_next().await {
        socks.push(r??);
    }
    let login_cpu = meter.stop()?;
    let frame_len = weight_frame(1)?.len();
    let stop = Instant::now() + Duration::from_secs(plan.seconds);
    let meter = Meter::start(&plan.server_pids)?;
    let mut tasks = tokio::task::JoinSet::new();
    for (sock, buf) in socks {
        let (inflight, echo) = (plan.inflight, plan.load == Load::Floor);
        tasks.spawn(async move { reporter(sock, buf, inflight, echo, frame_len, stop).await });
    }
    let mut lat = new_histogram();
    let mut acked = 0u64;
    while let Some(r) = tasks.join_next().await {
        let (n, h) = r??;
        acked += n;
        lat.add(&h)?;
    }
    let cpu = meter.stop()?;
    let cpu_s = cpu["server_cpu_s"].as_f64().unwrap_or(0.0);
    let n = plan.conns.max(1) as f64;
    Ok(json!({
        "conns": plan.conns, "inflight": plan.inflight, "frame_bytes": frame_len,
        "login_server_cpu_us_per_login": login_cpu["server_cpu_s"].as_f64().unwrap_or(0.0) * 1e6 / n,
        "acked": acked,
        "acked_per_s": acked as f64 / cpu["seconds"].as_f64().unwrap_or(1.0),
        "server_cpu_us_per_op": cpu_s * 1e6 / (acked.max(1) as f64),
        "frames_per_server_core_s": acked as f64 / cpu_s.max(1e-9),
        "ack": summarize(&lat),
        "cpu": cpu,
        "login_cpu": login_cpu,
    }))
}

/// Keeps `inflight` weight reports outstanding until `stop`: an `ACK` (or, against the echo
/// server, the frame's bytes coming back) lets the next one go.
async fn reporter(
    mut sock: TcpStream,
    mut buf: BytesMut,
    inflight: usize,
    echo: bool,
    frame_len: usize,
    stop: Instant,
) -> anyhow::Result<(u64, Histogram<u64>)> {
    use protocol::cabinet::{MAX_PAYLOAD_LEN, Message};
    let mut lat = new_histogram();
    let mut sent_at: std::collections::VecDeque<Instant> = std::collections::VecDeque::new();
    let mut seq: u32 = 10;
    let mut out = BytesMut::new();
    let mut acked = 0u64;
    for _ in 0..inflight {
        seq += 1;
        out.extend_from_slice(&weight_frame(seq)?);
        sent_at.push_back(Instant::now());
    }
    sock.write_all(&out).await?;
    out.clear();
    while !sent_at.is_empty() {
        if sock.read_buf(&mut buf).await? == 0 {
            bail!("connection closed with {} frames unacknowledged", sent_at.len());
        }
        let mut answered = 0;
        if echo {
            answered = buf.len() / frame_len;
            buf.advance(answered * frame_len);
        } else {
            while let Some(f) = protocol::cabinet::decode(&mut buf, MAX_PAYLOAD_LEN)? {
                if matches!(f.message, Message::Ack) {
                    answered += 1;
                }
            }
        }
        let more = Instant::now() < stop;
        for _ in 0..answered {
            if let Some(t) = sent_at.pop_front() {
                lat.saturating_record(micros(t));
                acked += 1;
            }
            if more {
                seq += 1;
                out.extend_from_slice(&weight_frame(seq)?);
                sent_at.push_back(Instant::now());
            }
        }
        if !out.is_empty() {
            sock.write_all(&out).await?;
            out.clear();
        }
    }
    Ok((acked, lat))
}

/// A bare echo server on one thread (`loadtest echo-server`): the floor a frame costs on this
/// machine when nothing is done with it. Runs until killed.
///
/// # Errors
/// If `listen` cannot be bound.
pub async fn echo_server(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let (mut sock, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = sock.read(&mut buf).await {
                if n == 0 || sock.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

fn rss_total(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| crate::rss::rss_bytes(*p)).sum()
}

async fn idle(plan: &ProbePlan) -> anyhow::Result<serde_json::Value> {
    let before: Vec<u64> = plan.server_pids.iter().map(|p| crate::rss::rss_bytes(*p).unwrap_or(0)).collect();
    let meter = Meter::start(&plan.server_pids)?;
    let gap = Duration::from_secs_f64(1.0 / f64::from(plan.ramp_per_s.max(1)));
    let mut tick = tokio::time::interval(gap);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut opening = tokio::task::JoinSet::new();
    let mut held = Vec::with_capacity(plan.conns);
    for i in 0..plan.conns {
        tick.tick().await;
        let (addr, n) = (plan.addr, plan.first + i);
        opening.spawn(async move { open(addr, n).await });
        // Keep the number of handshakes in progress bounded.
        while opening.len() > 500 {
            if let Some(r) = opening.join_next().await {
                held.push(r??);
            }
        }
    }
    while let Some(r) = opening.join_next().await {
        held.push(r??);
    }
    let ramp_cpu = meter.stop()?;
    // Settle, then memory after the ramp; hold, then memory again.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after_ramp: Vec<u64> = plan.server_pids.iter().map(|p| crate::rss::rss_bytes(*p).unwrap_or(0)).collect();
    tokio::time::sleep(Duration::from_secs(plan.seconds)).await;
    let after_hold = rss_total(&plan.server_pids);
    let n = plan.conns.max(1) as f64;
    let per = |after: u64| after.saturating_sub(before.iter().sum::<u64>()) as f64 / n;
    Ok(json!({
        "conns": plan.conns, "held": held.len(),
        "rss_before_each": before, "rss_after_ramp_each": after_ramp,
        "rss_per_conn_after_ramp": per(after_ramp.iter().sum()),
        "rss_per_conn_after_hold": per(after_hold),
        "rss_per_conn_each_after_ramp": after_ramp.iter().zip(&before).map(|(a, b)| a.saturating_sub(*b) as f64 / n).collect::<Vec<_>>(),
        "ramp_server_cpu_us_per_conn": ramp_cpu["server_cpu_s"].as_f64().unwrap_or(0.0) * 1e6 / n,
        "ramp_cpu": ramp_cpu,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn packets_round_trip_through_the_reader() {
        let mut buf = BytesMut::new();
        put_publish(&mut buf, b"vehicles/X/up/ota_status", 7, &[b'a'; 200]);
        buf.extend_from_slice(&[0x40, 2, 0, 7]);
        let (first, body) = take_packet(&mut buf).unwrap().unwrap();
        assert_eq!(first, 0x32);
        assert_eq!(body.len(), 2 + 24 + 2 + 200);
        let (first, body) = take_packet(&mut buf).unwrap().unwrap();
        assert_eq!((first, &body[..]), (0x40, &[0u8, 7][..]));
        assert!(take_packet(&mut buf).unwrap().is_none());
        // A partial packet waits.
        buf.extend_from_slice(&[0x40, 2, 0]);
        assert!(take_packet(&mut buf).unwrap().is_none());
    }

    #[test]
    fn reads_own_cpu() {
        assert!(cpu_ticks(std::process::id()).is_ok());
        let (busy, total) = machine_jiffies().unwrap();
        assert!(busy <= total && total > 0);
    }
}
