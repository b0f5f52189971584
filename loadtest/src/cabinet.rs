//! A simulated vending cabinet behaving as SPEC.md part 1 and the seed documents say: it logs
//! in with its secret, sends a heartbeat every interval, reports lane weights every 90 s with
//! its doors closed, every 300 ms while a door is open and for 8 s after it closes, answers
//! commands (opening a door for an order, after which a simulated shopper takes items and
//! closes it), retransmits door events until acknowledged, and reconnects with exponential
//! backoff and full jitter.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use protocol::cabinet::{
    CabinetCodec, Command, CommandAction, CommandResult, CommandStatus, DoorEvent, DoorState, DoorStatus, Flags, Frame,
    Heartbeat, Hello, LOGIN_V2, LaneWeight, Login, LoginStatus, Message, NoticeKind, WeightReport,
};
use protocol::{DeviceId, OrderId};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpSocket;
use tokio::time::{Instant, interval, sleep, timeout};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::stats::Stats;
use crate::tls::TlsClient;

/// How cabinets behave.
#[derive(Debug, Clone)]
pub struct CabinetBehaviour {
    /// Heartbeat interval (the gateway also says it at login).
    pub heartbeat: Duration,
    /// How often a closed door's weights are reported (seed document 003: 90 s).
    pub closed_report: Duration,
    /// Doors per cabinet.
    pub doors: u8,
    /// Lanes per door.
    pub lanes: u8,
    /// Weight of one item, grams (the same on every lane of the simulation).
    pub unit_grams: i32,
    /// Items per lane at start.
    pub items_per_lane: i32,
    /// How long a shopper keeps a door open.
    pub door_open: Duration,
    /// Items a shopper takes.
    pub items_taken: i32,
    /// The login version (SPEC.md 1.7): 2 answers the gateway's challenge, 1 is older firmware.
    pub login_version: u8,
}

impl Default for CabinetBehaviour {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(30),
            closed_report: Duration::from_secs(90),
            doors: 2,
            lanes: 4,
            unit_grams: 350,
            items_per_lane: 10,
            door_open: Duration::from_secs(3),
            items_taken: 2,
            login_version: 2,
        }
    }
}

/// Weight cadence while a door is open or settling (seed document 003).
const FAST_REPORT: Duration = Duration::from_millis(300);
const AFTER_CLOSE: Duration = Duration::from_secs(8);
/// Scales settle this long after something moved.
const SETTLE: Duration = Duration::from_millis(600);
const DOOR_EVENT_RETRY: Duration = Duration::from_secs(5);

struct Door {
    id: u8,
    grams: Vec<i32>,
    order: Option<OrderId>,
    opened_at: Option<Instant>,
    closed_at: Option<Instant>,
    took: bool,
    moving_until: Option<Instant>,
    last_report: Option<Instant>,
}

impl Door {
    fn state(&self) -> DoorStatus {
        if self.opened_at.is_some() { DoorStatus::Open } else { DoorStatus::Closed }
    }

    fn report_due(&self, now: Instant, closed_every: Duration) -> bool {
        let fast = self.opened_at.is_some() || self.closed_at.is_some_and(|c| now.duration_since(c) < AFTER_CLOSE);
        let every = if fast { FAST_REPORT } else { closed_every };
        self.last_report.is_none_or(|t| now.duration_since(t) >= every)
    }
}

/// Where and as whom a cabinet connects.
#[derive(Debug, Clone)]
pub struct Target {
    /// Gateway cabinet listener tried first.
    pub addr: SocketAddr,
    /// Every gateway cabinet listener: after a connection fails or ends badly the cabinet tries
    /// the next one, as a device behind an L4 balancer reaches whichever node is up.
    pub all: Arc<[SocketAddr]>,
    /// Source address to bind (127.0.0.x), to spread connections over more port space.
    pub source: Option<IpAddr>,
    /// TLS to the gateway's TLS listener; `None`: plain TCP.
    pub tls: Option<TlsClient>,
}

/// A byte stream to the gateway, plain or TLS: sessions do not care which.
trait Link: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Link for T {}

type Connection = Framed<Box<dyn Link>, CabinetCodec>;

/// Longest TLS handshake a cabinet waits for.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects, and shakes hands when TLS is on; on failure, names the counter to bump.
async fn connect(target: &Target) -> Result<Box<dyn Link>, &'static str> {
    let tcp = async {
        let socket = TcpSocket::new_v4()?;
        if let Some(ip) = target.source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        socket.set_nodelay(true)?;
        socket.connect(target.addr).await
    };
    let tcp = tcp.await.map_err(|_| "cabinet_connect_failures")?;
    match &target.tls {
        None => Ok(Box::new(tcp)),
        Some(tls) => match timeout(HANDSHAKE_TIMEOUT, tls.connect(tcp)).await {
            Ok(Ok(stream)) => Ok(Box::new(stream)),
            _ => Err("cabinet_tls_failures"),
        },
    }
}

/// Runs one cabinet until `stop`.
pub async fn run(
    id: DeviceId,
    secret: Vec<u8>,
    mut target: Target,
    behaviour: Arc<CabinetBehaviour>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let mut doors: Vec<Door> = (1..=behaviour.doors)
        .map(|d| Door {
            id: d,
            grams: vec![behaviour.unit_grams * behaviour.items_per_lane; usize::from(behaviour.lanes)],
            order: None,
            opened_at: None,
            closed_at: None,
            took: false,
            moving_until: None,
            last_report: None,
        })
        .collect();
    // Door events not yet acknowledged survive reconnects (SPEC.md 1.10).
    let mut unacked: Vec<DoorEvent> = Vec::new();
    let mut backoff = Duration::from_secs(1);
    // When the last session was lost: the next login measures the reconnection.
    let mut lost: Option<Instant> = None;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let started = Instant::now();
        let ended =
            session(&id, &secret, &target, &behaviour, &stats, &stop, &mut doors, &mut unacked, started, &mut lost)
                .await;
        if stop.is_cancelled() {
            stats.add("door_events_unacknowledged_at_stop", unacked.len() as u64);
            return;
        }
        stats.add("cabinet_reconnects", 1);
        let wait = match ended {
            Ended::Reconnect(delay) => delay,
            Ended::Retry(after) => {
                after.max(Duration::from_millis(fastrand::u64(0..=u64::try_from(backoff.as_millis()).unwrap_or(1000))))
            }
            Ended::Backoff => {
                Duration::from_millis(fastrand::u64(0..=u64::try_from(backoff.as_millis()).unwrap_or(1000)))
            }
        };
        if matches!(ended, Ended::Backoff) {
            backoff = (backoff * 2).min(Duration::from_secs(60));
            // Its node may be gone: the next attempt goes to the next one.
            if let Some(i) = target.all.iter().position(|a| *a == target.addr) {
                target.addr = target.all[(i + 1) % target.all.len()];
            }
        } else {
            backoff = Duration::from_secs(1);
        }
        tokio::select! {
            () = sleep(wait) => {}
            () = stop.cancelled() => {
                stats.add("door_events_unacknowledged_at_stop", unacked.len() as u64);
                return;
            }
        }
    }
}

enum Ended {
    /// Told to reconnect (drain) after this delay.
    Reconnect(Duration),
    /// Refused with a retry-after.
    Retry(Duration),
    /// Anything else: exponential backoff with full jitter.
    Backoff,
}

#[allow(clippy::too_many_arguments)]
async fn session(
    id: &DeviceId,
    secret: &[u8],
    target: &Target,
    behaviour: &CabinetBehaviour,
    stats: &Stats,
    stop: &CancellationToken,
    doors: &mut [Door],
    unacked: &mut Vec<DoorEvent>,
    started: Instant,
    lost: &mut Option<Instant>,
) -> Ended {
    let link = match connect(target).await {
        Ok(link) => link,
        Err(counter) => {
            stats.add(counter, 1);
            return Ended::Backoff;
        }
    };
    let mut framed = Framed::new(link, CabinetCodec::default());
    let mut seq: u32 = 0;
    let mut next = || {
        seq = seq.wrapping_add(1).max(1);
        seq
    };
    let nonce = if behaviour.login_version >= LOGIN_V2 {
        // Version 2: the login signs the nonce of this connection's CHALLENGE.
        let hello = Message::Hello(Hello { login_version: LOGIN_V2 });
        if framed.send(Frame::new(next(), hello)).await.is_err() {
            return Ended::Backoff;
        }
        let answer = timeout(Duration::from_secs(10), framed.next()).await;
        let Ok(Some(Ok(Ok(Frame { message: Message::Challenge(challenge), .. })))) = answer else {
            stats.add("cabinet_login_failures", 1);
            return Ended::Backoff;
        };
        Some(challenge.nonce)
    } else {
        None
    };
    let signed = match nonce {
        Some(nonce) => Login::sign_v2(id.clone(), "loadtest-1.0", now_ms(), nonce, secret),
        None => Login::sign(id.clone(), "loadtest-1.0", now_ms(), secret),
    };
    let Ok(login) = signed else { return Ended::Backoff };
    if framed.send(Frame::new(next(), Message::Login(login))).await.is_err() {
        return Ended::Backoff;
    }
    let answer = timeout(Duration::from_secs(10), framed.next()).await;
    let Ok(Some(Ok(Ok(Frame { message: Message::LoginResult(result), .. })))) = answer else {
        stats.add("cabinet_login_failures", 1);
        return Ended::Backoff;
    };
    if result.status != LoginStatus::Accepted {
        stats.add("cabinet_login_refused", 1);
        return Ended::Retry(Duration::from_secs(u64::from(result.retry_after_s)));
    }
    stats.record("connect", started.elapsed());
    if let Some(at) = lost.take() {
        stats.record("reconnect", at.elapsed());
    }
    stats.add("cabinet_logins", 1);
    stats.connected.fetch_add(1, Ordering::Relaxed);
    let ended = serve(&mut framed, &mut next, behaviour, stats, stop, doors, unacked).await;
    stats.connected.fetch_sub(1, Ordering::Relaxed);
    *lost = Some(Instant::now());
    ended
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    framed: &mut Connection,
    next: &mut impl FnMut() -> u32,
    behaviour: &CabinetBehaviour,
    stats: &Stats,
    stop: &CancellationToken,
    doors: &mut [Door],
    unacked: &mut Vec<DoorEvent>,
) -> Ended {
    // Heartbeats of a fleet start spread over one interval, as real cabinets boot at random times.
    let offset = Duration::from_millis(fastrand::u64(
        0..u64::try_from(behaviour.heartbeat.as_millis()).unwrap_or(30_000).max(1),
    ));
    let mut heartbeat = tokio::time::interval_at(Instant::now() + offset, behaviour.heartbeat);
    let mut tick = interval(FAST_REPORT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: HashMap<u32, (DoorEvent, Instant)> = HashMap::new();
    let mut heartbeat_sent: Option<Instant> = None;
    for e in std::mem::take(unacked) {
        let seq = next();
        if send(
            framed,
            stats,
            Frame { seq, flags: Flags(Flags::ACK_REQUESTED), message: Message::DoorEvent(e.clone()) },
        )
        .await
        .is_err()
        {
            unacked.push(e);
            return Ended::Backoff;
        }
        pending.insert(seq, (e, Instant::now()));
    }
    let result = loop {
        tokio::select! {
            frame = framed.next() => {
                let frame = match frame {
                    Some(Ok(Ok(f))) => f,
                    Some(Ok(Err(_))) => continue,
                    Some(Err(_)) | None => break Ended::Backoff,
                };
                match frame.message {
                    Message::Command(c) => {
                        stats.add("commands_received", 1);
                        let (result, events) = on_command(c, doors, now_ms());
                        if send(framed, stats, Frame::new(frame.seq, Message::CommandResult(result))).await.is_err() {
                            break Ended::Backoff;
                        }
                        for e in events {
                            let seq = next();
                            let f = Frame { seq, flags: Flags(Flags::ACK_REQUESTED), message: Message::DoorEvent(e.clone()) };
                            if send(framed, stats, f).await.is_err() {
                                unacked.push(e);
                                break;
                            }
                            pending.insert(seq, (e, Instant::now()));
                        }
                    }
                    Message::Ack if pending.remove(&frame.seq).is_some() => stats.add("door_event_acks", 1),
                    Message::HeartbeatAck(_) => {
                        stats.add("heartbeat_acks", 1);
                        if let Some(sent) = heartbeat_sent.take() {
                            stats.record("heartbeat_ack", sent.elapsed());
                        }
                    }
                    Message::Notice(n) if n.kind == NoticeKind::Reconnect => {
                        stats.add("reconnect_notices", 1);
                        break Ended::Reconnect(Duration::from_millis(u64::from(n.delay_ms)));
                    }
                    Message::Notice(_) => stats.add("notices", 1),
                    Message::Error(_) => stats.add("errors_received", 1),
                    _ => {}
                }
            }
            _ = heartbeat.tick() => {
                // The previous heartbeat was never answered: lost (the next one replaces it).
                if heartbeat_sent.is_some() {
                    stats.add("heartbeats_unanswered", 1);
                }
                let hb = Frame::new(next(), Message::Heartbeat(Heartbeat { device_time_ms: now_ms() }));
                if send(framed, stats, hb).await.is_err() {
                    break Ended::Backoff;
                }
                heartbeat_sent = Some(Instant::now());
                stats.add("heartbeats_sent", 1);
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let events = advance_shoppers(doors, behaviour, now);
                for e in events {
                    let seq = next();
                    let f = Frame { seq, flags: Flags(Flags::ACK_REQUESTED), message: Message::DoorEvent(e.clone()) };
                    if send(framed, stats, f).await.is_err() {
                        unacked.push(e);
                        break;
                    }
                    pending.insert(seq, (e, now));
                }
                for door in doors.iter_mut() {
                    if door.report_due(now, behaviour.closed_report) {
                        door.last_report = Some(now);
                        let stable = door.moving_until.is_none_or(|m| now >= m);
                        let lanes = door.grams.iter().enumerate().map(|(i, g)| LaneWeight {
                            lane_id: u8::try_from(i + 1).unwrap_or(u8::MAX),
                            grams: if stable { *g } else { *g + fastrand::i32(-40..40) },
                            stable,
                        }).collect();
                        let report = WeightReport { door_id: door.id, sample_time_ms: now_ms(), lanes };
                        if send(framed, stats, Frame::new(next(), Message::WeightReport(report))).await.is_err() {
                            break;
                        }
                        stats.add("weight_reports", 1);
                    }
                }
                let stale: Vec<u32> = pending.iter().filter(|(_, (_, t))| now.duration_since(*t) >= DOOR_EVENT_RETRY).map(|(s, _)| *s).collect();
                for seq in stale {
                    if let Some((e, _)) = pending.remove(&seq) {
                        let f = Frame { seq, flags: Flags(Flags::ACK_REQUESTED), message: Message::DoorEvent(e.clone()) };
                        stats.add("door_event_retries", 1);
                        if send(framed, stats, f).await.is_ok() {
                            pending.insert(seq, (e, now));
                        } else {
                            unacked.push(e);
                        }
                    }
                }
            }
            () = stop.cancelled() => break Ended::Backoff,
        }
    };
    unacked.extend(pending.into_values().map(|(e, _)| e));
    // A heartbeat outstanding when the connection is lost was never answered; one outstanding
    // when the run stops was merely in flight.
    if heartbeat_sent.is_some() && !stop.is_cancelled() {
        stats.add("heartbeats_unanswered", 1);
    }
    result
}

async fn send(framed: &mut Connection, stats: &Stats, frame: Frame) -> Result<(), ()> {
    framed.send(frame).await.map_err(|_| stats.add("send_failures", 1))
}

/// Answers a command and returns the door events it causes.
fn on_command(c: Command, doors: &mut [Door], now: u64) -> (CommandResult, Vec<DoorEvent>) {
    let door_of = |doors: &mut [Door], id: u8| doors.iter_mut().position(|d| d.id == id);
    if c.expires_at_ms <= now {
        return (CommandResult { status: CommandStatus::Expired, door_id: 0, door_state: DoorStatus::Unknown }, vec![]);
    }
    match c.action {
        CommandAction::OpenDoor { door_id, order_id } => {
            let Some(i) = door_of(doors, door_id) else {
                return (
                    CommandResult { status: CommandStatus::InvalidDoor, door_id, door_state: DoorStatus::Unknown },
                    vec![],
                );
            };
            let door = &mut doors[i];
            if door.opened_at.is_some() {
                // The same order again is answered Ok without acting (SPEC.md 1.7).
                let status =
                    if door.order.as_ref() == Some(&order_id) { CommandStatus::Ok } else { CommandStatus::Busy };
                return (CommandResult { status, door_id, door_state: DoorStatus::Open }, vec![]);
            }
            door.opened_at = Some(Instant::now());
            door.closed_at = None;
            door.took = false;
            door.order = Some(order_id.clone());
            door.moving_until = Some(Instant::now() + SETTLE);
            let event = DoorEvent { door_id, state: DoorState::Open, event_time_ms: now, order_id: Some(order_id) };
            (CommandResult { status: CommandStatus::Ok, door_id, door_state: DoorStatus::Open }, vec![event])
        }
        CommandAction::QueryDoor { door_id } => match door_of(doors, door_id) {
            Some(i) => (CommandResult { status: CommandStatus::Ok, door_id, door_state: doors[i].state() }, vec![]),
            None => {
                (CommandResult { status: CommandStatus::InvalidDoor, door_id, door_state: DoorStatus::Unknown }, vec![])
            }
        },
        CommandAction::Tare { door_id, .. } => match door_of(doors, door_id) {
            Some(i) => (CommandResult { status: CommandStatus::Ok, door_id, door_state: doors[i].state() }, vec![]),
            None => {
                (CommandResult { status: CommandStatus::InvalidDoor, door_id, door_state: DoorStatus::Unknown }, vec![])
            }
        },
        CommandAction::Other { .. } => {
            (CommandResult { status: CommandStatus::Unsupported, door_id: 0, door_state: DoorStatus::Unknown }, vec![])
        }
    }
}

/// Moves simulated shoppers along: halfway through the opening they take items from lane 1
/// (and the scales wobble), at the end they close the door.
fn advance_shoppers(doors: &mut [Door], b: &CabinetBehaviour, now: Instant) -> Vec<DoorEvent> {
    let mut events = Vec::new();
    for door in doors.iter_mut() {
        let Some(opened) = door.opened_at else { continue };
        let open_for = now.duration_since(opened);
        if !door.took && open_for >= b.door_open / 2 {
            door.took = true;
            let lane = &mut door.grams[0];
            let taken = b.items_taken.min(*lane / b.unit_grams.max(1));
            *lane -= taken * b.unit_grams;
            door.moving_until = Some(now + SETTLE);
        }
        if open_for >= b.door_open {
            door.opened_at = None;
            door.closed_at = Some(now);
            door.moving_until = Some(now + SETTLE);
            events.push(DoorEvent {
                door_id: door.id,
                state: DoorState::Closed,
                event_time_ms: now_ms(),
                order_id: door.order.take(),
            });
        }
    }
    events
}

/// Wall clock, ms since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}
