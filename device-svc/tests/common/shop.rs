//! A cabinet with shelves, for purchase tests: it keeps its heartbeat, reports its lanes'
//! weights at the documented cadence (stable at start, every 300 ms while a door is open and
//! for a while after it closes: unstable while the door moves, then stable), answers commands
//! as told, and lets the test take items, move them, and close the door.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use protocol::cabinet::{
    CommandAction, CommandResult, CommandStatus, DoorEvent, DoorState, DoorStatus, Frame, Heartbeat, LaneWeight,
    Message, WeightReport,
};
use protocol::{DeviceId, OrderId};
use testkit::cabinet::Cabinet;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{INTERVAL_S, now_ms};

/// How the cabinet answers commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Opens the door and answers.
    Normal,
    /// Never answers a command (and opens nothing).
    Mute,
    /// Opens the door when told to but its answer and its open event are lost.
    OpensSilently,
}

/// After a close: how the scales report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settling {
    /// Two unstable readings, then stable ones.
    Normal,
    /// Unstable readings only.
    NeverStable,
}

/// Door-event faults, for the money model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Every door event is sent twice (a resend: same door, time and state, a new seq).
    pub duplicate_events: bool,
    /// The open event is held back and sent after the close event.
    pub late_open: bool,
}

enum Ctl {
    Faults(Faults),
    Mode(Mode),
    Settling(Settling),
    Take { door: u8, lane: u8, grams: i32 },
    Close { door: u8, event: bool },
}

/// What the cabinet saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Commands received before their expiry (acted on or answered), in order.
    pub commands: Vec<CommandAction>,
    /// Commands that arrived past their expiry (answered `Expired`, not acted on): the host or
    /// the network delayed them, a fault the cabinet itself observes.
    pub expired: Vec<CommandAction>,
}

/// A running shop cabinet.
pub struct Shop {
    pub id: DeviceId,
    ctl: mpsc::UnboundedSender<Ctl>,
    pub seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

/// Reports every 300 ms while open and for this long after the close (seed document 003 says
/// 8 s; shorter here so a test's cabinet goes quiet sooner).
const AFTER_CLOSE: Duration = Duration::from_secs(3);
const REPORT_EVERY: Duration = Duration::from_millis(300);
/// With the door closed and settled: every 90 s in the field, every second here.
const CLOSED_EVERY_TICKS: u32 = 3;

struct DoorNow {
    open: bool,
    order: Option<OrderId>,
    /// Reports left after a close (unstable ones first).
    settling: Option<(tokio::time::Instant, u32)>,
}

impl Shop {
    /// Starts the cabinet on a logged-in connection with `lanes` ((door, lane) -> grams); it
    /// reports every door's weights, stable, at once.
    pub fn start(cabinet: Cabinet, lanes: BTreeMap<(u8, u8), i32>) -> Self {
        let id = cabinet.id.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let task = tokio::spawn(run(cabinet, lanes, rx, Arc::clone(&seen)));
        Self { id, ctl: tx, seen, task }
    }

    pub fn set_mode(&self, mode: Mode) {
        let _ = self.ctl.send(Ctl::Mode(mode));
    }

    pub fn set_faults(&self, f: Faults) {
        let _ = self.ctl.send(Ctl::Faults(f));
    }

    pub fn set_settling(&self, s: Settling) {
        let _ = self.ctl.send(Ctl::Settling(s));
    }

    /// Takes `items` of `unit_grams` from a lane (negative: puts them in).
    pub fn take(&self, door: u8, lane: u8, items: i32, unit_grams: i32) {
        let _ = self.ctl.send(Ctl::Take { door, lane, grams: items * unit_grams });
    }

    /// Closes the door (sends the close event with its order id, then settles).
    pub fn close(&self, door: u8) {
        let _ = self.ctl.send(Ctl::Close { door, event: true });
    }

    /// Closes the door but its close event is lost (a broken sensor): the shelf settles.
    pub fn close_silently(&self, door: u8) {
        let _ = self.ctl.send(Ctl::Close { door, event: false });
    }

    /// Commands received so far.
    pub fn commands(&self) -> Vec<CommandAction> {
        self.seen.lock().unwrap().commands.clone()
    }

    /// Commands that arrived past their expiry so far.
    pub fn expired(&self) -> Vec<CommandAction> {
        self.seen.lock().unwrap().expired.clone()
    }

    /// Disconnects.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

fn report(lanes: &BTreeMap<(u8, u8), i32>, door: u8, stable: bool, jitter: i32) -> Message {
    Message::WeightReport(WeightReport {
        door_id: door,
        sample_time_ms: now_ms(),
        lanes: lanes
            .iter()
            .filter(|((d, _), _)| *d == door)
            .map(|((_, lane_id), grams)| LaneWeight { lane_id: *lane_id, grams: grams + jitter, stable })
            .collect(),
    })
}

async fn run(
    mut cabinet: Cabinet,
    mut lanes: BTreeMap<(u8, u8), i32>,
    mut rx: mpsc::UnboundedReceiver<Ctl>,
    seen: Arc<Mutex<Seen>>,
) {
    let mut mode = Mode::Normal;
    let mut faults = Faults::default();
    let mut held_open: Option<DoorEvent> = None;
    let mut settling_mode = Settling::Normal;
    let mut doors: BTreeMap<u8, DoorNow> = BTreeMap::new();
    for (door, _) in lanes.keys() {
        doors.entry(*door).or_insert(DoorNow { open: false, order: None, settling: None });
    }
    for door in doors.keys().copied().collect::<Vec<_>>() {
        let m = report(&lanes, door, true, 0);
        let seq = cabinet.next_seq();
        if cabinet.framed.send(Frame::new(seq, m)).await.is_err() {
            return;
        }
    }
    let mut heartbeat = tokio::time::interval(Duration::from_secs(INTERVAL_S));
    let mut reports = tokio::time::interval(REPORT_EVERY);
    let mut tick: u32 = 0;
    loop {
        let mut out: Vec<Frame> = Vec::new();
        tokio::select! {
            _ = heartbeat.tick() => {
                let seq = cabinet.next_seq();
                out.push(Frame::new(seq, Message::Heartbeat(Heartbeat { device_time_ms: now_ms() })));
            }
            _ = reports.tick() => {
                tick += 1;
                for (door, d) in doors.iter_mut() {
                    if d.open {
                        // The shelf moves under the shopper's hand: never stable.
                        let jitter = if tick.is_multiple_of(2) { 37 } else { -41 };
                        let seq = cabinet.next_seq();
                        out.push(Frame::new(seq, report(&lanes, *door, false, jitter)));
                    } else if let Some((until, unstable_left)) = d.settling {
                        let stable = unstable_left == 0 && settling_mode == Settling::Normal;
                        let seq = cabinet.next_seq();
                        out.push(Frame::new(seq, report(&lanes, *door, stable, if stable { 0 } else { 23 })));
                        d.settling = (tokio::time::Instant::now() < until).then_some((until, unstable_left.saturating_sub(1)));
                    } else if tick.is_multiple_of(CLOSED_EVERY_TICKS) && settling_mode == Settling::Normal {
                        let seq = cabinet.next_seq();
                        out.push(Frame::new(seq, report(&lanes, *door, true, 0)));
                    }
                }
            }
            ctl = rx.recv() => match ctl {
                None => return,
                Some(Ctl::Faults(f)) => faults = f,
                Some(Ctl::Mode(m)) => mode = m,
                Some(Ctl::Settling(s)) => settling_mode = s,
                Some(Ctl::Take { door, lane, grams }) => {
                    if let Some(g) = lanes.get_mut(&(door, lane)) {
                        *g -= grams;
                    }
                }
                Some(Ctl::Close { door, event }) => {
                    let d = doors.entry(door).or_insert(DoorNow { open: false, order: None, settling: None });
                    d.open = false;
                    d.settling = Some((tokio::time::Instant::now() + AFTER_CLOSE, 2));
                    if !event {
                        d.order = None;
                        continue;
                    }
                    let event = DoorEvent { door_id: door, state: DoorState::Closed, event_time_ms: now_ms(), order_id: d.order.take() };
                    let seq = cabinet.next_seq();
                    out.push(Frame::new(seq, Message::DoorEvent(event)));
                    if let Some(open) = held_open.take() {
                        let seq = cabinet.next_seq();
                        out.push(Frame::new(seq, Message::DoorEvent(open)));
                    }
                }
            },
            frame = cabinet.framed.next() => {
                let Some(Ok(Ok(frame))) = frame else { return };
                let Message::Command(command) = frame.message else { continue };
                // A command past its expiry is answered `Expired` and not acted on (SPEC.md
                // 1.7): a late open-door must never open a door.
                let expired = command.expires_at_ms <= now_ms();
                if expired {
                    seen.lock().unwrap().expired.push(command.action.clone());
                } else {
                    seen.lock().unwrap().commands.push(command.action.clone());
                }
                match (&command.action, mode) {
                    (_, Mode::Mute) => {}
                    (_, _) if expired => {
                        let result = CommandResult { status: CommandStatus::Expired, door_id: 0, door_state: DoorStatus::Unknown };
                        out.push(Frame::new(frame.seq, Message::CommandResult(result)));
                    }
                    // The same order again is answered Ok without acting (SPEC.md 1.7).
                    (CommandAction::OpenDoor { door_id, order_id }, Mode::Normal)
                        if doors.get(door_id).is_some_and(|d| d.open && d.order.as_ref() == Some(order_id)) =>
                    {
                        let result = CommandResult { status: CommandStatus::Ok, door_id: *door_id, door_state: DoorStatus::Open };
                        out.push(Frame::new(frame.seq, Message::CommandResult(result)));
                    }
                    (CommandAction::OpenDoor { door_id, order_id }, _)
                        if doors.get(door_id).is_some_and(|d| d.open && d.order.as_ref() == Some(order_id)) => {}
                    (CommandAction::OpenDoor { door_id, order_id }, _) => {
                        let d = doors.entry(*door_id).or_insert(DoorNow { open: false, order: None, settling: None });
                        d.open = true;
                        d.order = Some(order_id.clone());
                        if mode == Mode::Normal {
                            let result = CommandResult { status: CommandStatus::Ok, door_id: *door_id, door_state: DoorStatus::Open };
                            out.push(Frame::new(frame.seq, Message::CommandResult(result)));
                            let event = DoorEvent { door_id: *door_id, state: DoorState::Open, event_time_ms: now_ms(), order_id: Some(order_id.clone()) };
                            if faults.late_open {
                                held_open = Some(event);
                            } else {
                                let seq = cabinet.next_seq();
                                out.push(Frame::new(seq, Message::DoorEvent(event)));
                            }
                        }
                    }
                    (CommandAction::Tare { door_id, .. }, Mode::Normal) => {
                        let result = CommandResult { status: CommandStatus::Ok, door_id: *door_id, door_state: DoorStatus::Closed };
                        out.push(Frame::new(frame.seq, Message::CommandResult(result)));
                    }
                    (CommandAction::QueryDoor { door_id }, Mode::Normal) => {
                        let open = doors.get(door_id).is_some_and(|d| d.open);
                        let state = if open { DoorStatus::Open } else { DoorStatus::Closed };
                        let result = CommandResult { status: CommandStatus::Ok, door_id: *door_id, door_state: state };
                        out.push(Frame::new(frame.seq, Message::CommandResult(result)));
                    }
                    _ => {}
                }
            }
        }
        if faults.duplicate_events {
            let again: Vec<Message> =
                out.iter().filter(|f| matches!(f.message, Message::DoorEvent(_))).map(|f| f.message.clone()).collect();
            for m in again {
                let seq = cabinet.next_seq();
                out.push(Frame::new(seq, m));
            }
        }
        for f in out {
            if cabinet.framed.send(f).await.is_err() {
                return;
            }
        }
    }
}
