//! What gateway nodes and device-service instances exchange through Redis (SPEC.md, part 3):
//! the key layout, the upstream stream entries, and commands with their replies.
//!
//! Defined once here and used by both sides, so the two can never disagree on a field name.
//! Every Redis operation the system makes touches one key, or keys sharing a hash tag, so the
//! same layout works on a single Redis and on Redis Cluster.

use std::collections::HashMap;
use std::fmt;

use bytes::{Bytes, BytesMut};

use crate::cabinet::{self, CommandAction, CommandResult, Message};
use crate::ids::{DeviceId, Vin};
use crate::mqtt::topic::{DownlinkKind, UplinkKind};
use crate::vehicle::VehicleCommandResult;

/// Why a bus entry could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// A required field is absent.
    #[error("failed to read bus entry: field {0} missing")]
    Missing(&'static str),
    /// A field is present but not valid.
    #[error("failed to read bus entry: field {field} invalid: {detail}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        detail: String,
    },
}

fn invalid(field: &'static str, detail: impl fmt::Display) -> BusError {
    BusError::Invalid { field, detail: detail.to_string() }
}

/// The two kinds of device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceKind {
    /// A vending cabinet (binary protocol).
    Cabinet,
    /// A vehicle (MQTT).
    Vehicle,
}

impl DeviceKind {
    /// `cab` or `veh`: the key segment and metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Cabinet => "cab",
            DeviceKind::Vehicle => "veh",
        }
    }
}

/// A device of either kind: what the connection map and the streams are keyed by.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceKey {
    /// A cabinet.
    Cabinet(DeviceId),
    /// A vehicle.
    Vehicle(Vin),
}

impl DeviceKey {
    /// The kind.
    pub fn kind(&self) -> DeviceKind {
        match self {
            DeviceKey::Cabinet(_) => DeviceKind::Cabinet,
            DeviceKey::Vehicle(_) => DeviceKind::Vehicle,
        }
    }

    /// The id without the kind.
    pub fn id(&self) -> &str {
        match self {
            DeviceKey::Cabinet(id) => id.as_str(),
            DeviceKey::Vehicle(vin) => vin.as_str(),
        }
    }

    /// The cabinet id, if this is a cabinet.
    pub fn cabinet_id(&self) -> Option<&DeviceId> {
        match self {
            DeviceKey::Cabinet(id) => Some(id),
            DeviceKey::Vehicle(_) => None,
        }
    }

    /// Parses `cab:ID` or `veh:VIN`.
    ///
    /// # Errors
    /// [`BusError::Invalid`] for another shape or an invalid id.
    pub fn parse(s: &str) -> Result<Self, BusError> {
        match s.split_once(':') {
            Some(("cab", id)) => DeviceId::new(id).map(DeviceKey::Cabinet).map_err(|e| invalid("device", e)),
            Some(("veh", vin)) => Vin::new(vin).map(DeviceKey::Vehicle).map_err(|e| invalid("device", e)),
            _ => Err(invalid("device", format!("{s:?} is not cab:ID or veh:VIN"))),
        }
    }

    /// Which upstream stream shard carries this device's events, out of `shards`. Stable across
    /// nodes and restarts, so a device's events always travel in one stream, in order.
    pub fn shard(&self, shards: u16) -> u16 {
        let shards = u32::from(shards.max(1));
        let hash = crc32c::crc32c(self.to_string().as_bytes());
        // The remainder is below `shards`, itself a u16.
        (hash % shards) as u16
    }
}

impl fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind().as_str(), self.id())
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

// === key layout ===

/// The Redis key layout under a deployment's prefix (SPEC.md 3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// A layout under `prefix` (for example `iotgw:`; tests use a prefix per test).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Hash: the device's entry in the connection map (`node`, `session`, `epoch`, `since_ms`).
    /// The hash outlives sessions so that `epoch` only ever grows.
    pub fn conn(&self, device: &DeviceKey) -> String {
        format!("{}conn:{device}", self.prefix)
    }

    /// String with a TTL: present while the node is alive.
    pub fn node_alive(&self, node: &str) -> String {
        format!("{}node:{node}:alive", self.prefix)
    }

    /// Set of the devices whose map entries a node wrote, to clear them after a crash.
    pub fn node_conns(&self, node: &str) -> String {
        format!("{}node:{node}:conns", self.prefix)
    }

    /// Sorted set of known gateway nodes, scored by their last start time (ms).
    pub fn nodes(&self) -> String {
        format!("{}nodes", self.prefix)
    }

    /// Hash: a device's credentials as the gateways verify them (`secret` hex for cabinets,
    /// `token_sha256` hex for vehicles, `status` `enabled`/`disabled`).
    pub fn credentials(&self, device: &DeviceKey) -> String {
        format!("{}cred:{device}", self.prefix)
    }

    /// Stream: every change to a device's credentials or its enabled flag, read by every gateway
    /// node to drop its cached credentials and end revoked sessions (SPEC.md 3.1).
    pub fn credential_changes(&self) -> String {
        format!("{}cred:changes", self.prefix)
    }

    /// String: a value set by whichever process finds it missing; if it vanishes or changes,
    /// Redis lost its data and every process writes back what it owns (3.1).
    pub fn bus_run(&self) -> String {
        format!("{}bus:run", self.prefix)
    }

    /// Stream: upstream shard `n`.
    pub fn upstream(&self, shard: u16) -> String {
        format!("{}up:{shard}", self.prefix)
    }

    /// Stream: the commands for one gateway node.
    pub fn commands(&self, node: &str) -> String {
        format!("{}cmd:{node}", self.prefix)
    }

    /// Stream: replies for one command sender (a device-service instance).
    pub fn replies(&self, sender: &str) -> String {
        format!("{}reply:{sender}", self.prefix)
    }

    /// String with a TTL: where the result of a generic command to a vehicle goes (the sender's
    /// reply stream and its request id), by the `request_id` the vehicle will echo.
    pub fn vehicle_command(&self, vin: &Vin, request_id: &str) -> String {
        format!("{}vcmd:{{{vin}}}:{request_id}", self.prefix)
    }

    /// List: QoS 1 downlinks sent to a vehicle and not yet acknowledged (persistent sessions).
    pub fn mqtt_inflight(&self, vin: &Vin) -> String {
        format!("{}mqtt:{{{vin}}}:inflight", self.prefix)
    }

    /// Hash: a vehicle's persistent subscriptions (filter -> QoS) and session expiry.
    pub fn mqtt_session(&self, vin: &Vin) -> String {
        format!("{}mqtt:{{{vin}}}:session", self.prefix)
    }
}

// === stream entries ===

/// A Redis stream entry: field name and raw value.
pub type Fields = Vec<(&'static str, Vec<u8>)>;

/// One entry of an upstream stream, written by a gateway node, read by the device service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpEvent {
    /// A device logged in (`t=open`).
    SessionOpened {
        /// The device.
        device: DeviceKey,
        /// The session's fencing token: larger is newer.
        epoch: u64,
        /// The gateway node holding it.
        node: String,
        /// When, gateway clock.
        at_ms: u64,
        /// Firmware version (cabinets) or MQTT version (vehicles).
        info: String,
    },
    /// A session ended (`t=close`).
    SessionClosed {
        /// The device.
        device: DeviceKey,
        /// The epoch of the session that ended.
        epoch: u64,
        /// The node that held it.
        node: String,
        /// When, gateway clock.
        at_ms: u64,
        /// Why (`peer_closed`, `idle_timeout`, `taken_over`, `drain`, ...).
        reason: String,
    },
    /// Heartbeats a node received in one window, aggregated (`t=hb`).
    Heartbeats {
        /// The node.
        node: String,
        /// Window start, gateway clock, ms.
        window_start_ms: u64,
        /// Window length, ms.
        window_ms: u64,
        /// Heartbeats received in the window (all devices of the node, counted once each).
        count: u64,
        /// Cabinet sessions the node held at the end of the window: with the heartbeat
        /// interval, what the device service expects `count` to be.
        sessions: u64,
        /// Last heartbeat per device seen in the window, with its session epoch.
        devices: Vec<HeartbeatSeen>,
    },
    /// A cabinet frame for the device service (`t=cab`): weight reports and door events,
    /// carried as their validated payload so nothing is lost in translation.
    Cabinet {
        /// The cabinet.
        device: DeviceId,
        /// Its session epoch.
        epoch: u64,
        /// The node.
        node: String,
        /// When the gateway received it.
        at_ms: u64,
        /// The frame's sequence number.
        seq: u32,
        /// The cabinet message.
        message: Message,
    },
    /// A vehicle publish (`t=veh`): the JSON payload as published.
    Vehicle {
        /// The vehicle.
        vin: Vin,
        /// Its session epoch.
        epoch: u64,
        /// The node.
        node: String,
        /// When the gateway received it.
        at_ms: u64,
        /// Which uplink.
        kind: UplinkKind,
        /// The payload.
        payload: Bytes,
    },
}

/// One device's last heartbeat in a [`UpEvent::Heartbeats`] window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatSeen {
    /// The device.
    pub device: DeviceKey,
    /// When its last heartbeat arrived, gateway clock.
    pub at_ms: u64,
    /// Its session epoch.
    pub epoch: u64,
}

impl UpEvent {
    /// The device this event is about; `None` for a node-wide heartbeat batch.
    pub fn device(&self) -> Option<DeviceKey> {
        match self {
            UpEvent::SessionOpened { device, .. } | UpEvent::SessionClosed { device, .. } => Some(device.clone()),
            UpEvent::Cabinet { device, .. } => Some(DeviceKey::Cabinet(device.clone())),
            UpEvent::Vehicle { vin, .. } => Some(DeviceKey::Vehicle(vin.clone())),
            UpEvent::Heartbeats { .. } => None,
        }
    }

    /// The metric label (`type="..."`); a cabinet message is labelled by its own type
    /// (`weight_report`, `door_event`, ...), as the gateway counts its frames.
    pub fn label(&self) -> &'static str {
        match self {
            UpEvent::SessionOpened { .. } => "open",
            UpEvent::SessionClosed { .. } => "close",
            UpEvent::Heartbeats { .. } => "hb",
            UpEvent::Cabinet { message, .. } => message.message_type().label(),
            UpEvent::Vehicle { .. } => "veh",
        }
    }

    /// The stream entry's fields.
    ///
    /// # Errors
    /// Only if a cabinet message breaks the spec's limits (it was decoded, so it does not).
    pub fn to_fields(&self) -> Result<Fields, cabinet::EncodeError> {
        let s = |v: &str| v.as_bytes().to_vec();
        let n = |v: u64| v.to_string().into_bytes();
        Ok(match self {
            UpEvent::SessionOpened { device, epoch, node, at_ms, info } => vec![
                ("t", s("open")),
                ("dev", s(&device.to_string())),
                ("e", n(*epoch)),
                ("n", s(node)),
                ("at", n(*at_ms)),
                ("info", s(info)),
            ],
            UpEvent::SessionClosed { device, epoch, node, at_ms, reason } => vec![
                ("t", s("close")),
                ("dev", s(&device.to_string())),
                ("e", n(*epoch)),
                ("n", s(node)),
                ("at", n(*at_ms)),
                ("why", s(reason)),
            ],
            UpEvent::Heartbeats { node, window_start_ms, window_ms, count, sessions, devices } => {
                let mut list = String::with_capacity(devices.len() * 40);
                for d in devices {
                    use fmt::Write;
                    let _ = writeln!(list, "{} {} {}", d.device, d.at_ms, d.epoch);
                }
                vec![
                    ("t", s("hb")),
                    ("n", s(node)),
                    ("ws", n(*window_start_ms)),
                    ("wl", n(*window_ms)),
                    ("c", n(*count)),
                    ("s", n(*sessions)),
                    ("d", list.into_bytes()),
                ]
            }
            UpEvent::Cabinet { device, epoch, node, at_ms, seq, message } => {
                let mut payload = BytesMut::with_capacity(message.payload_len());
                message.write(&mut payload)?;
                vec![
                    ("t", s("cab")),
                    ("dev", s(device.as_str())),
                    ("e", n(*epoch)),
                    ("n", s(node)),
                    ("at", n(*at_ms)),
                    ("seq", n(u64::from(*seq))),
                    ("k", vec![message.message_type().as_u8()]),
                    ("p", payload.to_vec()),
                ]
            }
            UpEvent::Vehicle { vin, epoch, node, at_ms, kind, payload } => vec![
                ("t", s("veh")),
                ("dev", s(vin.as_str())),
                ("e", n(*epoch)),
                ("n", s(node)),
                ("at", n(*at_ms)),
                ("k", s(kind.as_str())),
                ("p", payload.to_vec()),
            ],
        })
    }

    /// Reads an entry back.
    ///
    /// # Errors
    /// [`BusError`] naming the missing or invalid field.
    pub fn from_fields(fields: &HashMap<String, Vec<u8>>) -> Result<Self, BusError> {
        let f = FieldReader(fields);
        Ok(match f.text("t")? {
            "open" => UpEvent::SessionOpened {
                device: DeviceKey::parse(f.text("dev")?)?,
                epoch: f.num("e")?,
                node: f.text("n")?.to_owned(),
                at_ms: f.num("at")?,
                info: f.text("info")?.to_owned(),
            },
            "close" => UpEvent::SessionClosed {
                device: DeviceKey::parse(f.text("dev")?)?,
                epoch: f.num("e")?,
                node: f.text("n")?.to_owned(),
                at_ms: f.num("at")?,
                reason: f.text("why")?.to_owned(),
            },
            "hb" => {
                let mut devices = Vec::new();
                for line in f.text("d")?.lines() {
                    let mut parts = line.split(' ');
                    let (Some(dev), Some(at), Some(epoch), None) =
                        (parts.next(), parts.next(), parts.next(), parts.next())
                    else {
                        return Err(invalid("d", format!("line {line:?}")));
                    };
                    devices.push(HeartbeatSeen {
                        device: DeviceKey::parse(dev)?,
                        at_ms: at.parse().map_err(|e| invalid("d", e))?,
                        epoch: epoch.parse().map_err(|e| invalid("d", e))?,
                    });
                }
                UpEvent::Heartbeats {
                    node: f.text("n")?.to_owned(),
                    window_start_ms: f.num("ws")?,
                    window_ms: f.num("wl")?,
                    count: f.num("c")?,
                    sessions: f.num("s")?,
                    devices,
                }
            }
            "cab" => {
                let kind = *f.bytes("k")?.first().ok_or(BusError::Missing("k"))?;
                let payload = Bytes::copy_from_slice(f.bytes("p")?);
                UpEvent::Cabinet {
                    device: DeviceId::new(f.text("dev")?).map_err(|e| invalid("dev", e))?,
                    epoch: f.num("e")?,
                    node: f.text("n")?.to_owned(),
                    at_ms: f.num("at")?,
                    seq: u32::try_from(f.num("seq")?).map_err(|e| invalid("seq", e))?,
                    message: Message::parse(kind, &payload).map_err(|e| invalid("p", e))?,
                }
            }
            "veh" => UpEvent::Vehicle {
                vin: Vin::new(f.text("dev")?).map_err(|e| invalid("dev", e))?,
                epoch: f.num("e")?,
                node: f.text("n")?.to_owned(),
                at_ms: f.num("at")?,
                kind: f.text("k")?.parse().map_err(|e| invalid("k", e))?,
                payload: Bytes::copy_from_slice(f.bytes("p")?),
            },
            other => return Err(invalid("t", format!("unknown type {other:?}"))),
        })
    }
}

struct FieldReader<'a>(&'a HashMap<String, Vec<u8>>);

impl FieldReader<'_> {
    fn bytes(&self, name: &'static str) -> Result<&[u8], BusError> {
        self.0.get(name).map(Vec::as_slice).ok_or(BusError::Missing(name))
    }

    fn text(&self, name: &'static str) -> Result<&str, BusError> {
        std::str::from_utf8(self.bytes(name)?).map_err(|e| invalid(name, e))
    }

    fn num(&self, name: &'static str) -> Result<u64, BusError> {
        self.text(name)?.parse().map_err(|e| invalid(name, e))
    }
}

// === commands ===

/// What a command asks a gateway node to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandBody {
    /// Send a `COMMAND` frame to a cabinet; the reply carries its `COMMAND_RESULT`.
    Cabinet(CommandAction),
    /// Publish a downlink to a vehicle at QoS 1; the reply says `delivered` on PUBACK.
    Vehicle {
        /// Which downlink.
        kind: DownlinkKind,
        /// The JSON payload.
        payload: Bytes,
    },
    /// End the device's session on this node if its epoch is older than `epoch`: sent by the
    /// node where the device logged in again (single live session across nodes). No reply.
    Kick {
        /// The new session's epoch.
        epoch: u64,
    },
}

/// Entries a node's command stream keeps (approximately, `XADD … MAXLEN ~`): every sender
/// caps it the same way (SPEC.md 3.3), so a node that is down cannot make it grow unbounded.
pub const COMMAND_STREAM_MAXLEN: usize = 100_000;

/// A command, as written to a node's command stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRequest {
    /// Chosen by the sender; echoed in the reply.
    pub request_id: String,
    /// The target device.
    pub device: DeviceKey,
    /// After this (ms since the epoch) the command must not be delivered; it is also the
    /// cabinet `COMMAND`'s `expires_at`.
    pub deadline_ms: u64,
    /// The stream to write the reply to; empty for no reply.
    pub reply_to: String,
    /// What to do.
    pub body: CommandBody,
}

impl CommandRequest {
    /// The stream entry's fields.
    ///
    /// # Errors
    /// If the cabinet action breaks the spec's limits.
    pub fn to_fields(&self) -> Result<Fields, cabinet::EncodeError> {
        let mut fields: Fields = vec![
            ("id", self.request_id.as_bytes().to_vec()),
            ("dev", self.device.to_string().into_bytes()),
            ("dl", self.deadline_ms.to_string().into_bytes()),
            ("rt", self.reply_to.as_bytes().to_vec()),
        ];
        match &self.body {
            CommandBody::Cabinet(action) => {
                let message =
                    Message::Command(cabinet::Command { expires_at_ms: self.deadline_ms, action: action.clone() });
                let mut p = BytesMut::with_capacity(message.payload_len());
                message.write(&mut p)?;
                fields.push(("t", b"cab".to_vec()));
                fields.push(("p", p.to_vec()));
            }
            CommandBody::Vehicle { kind, payload } => {
                fields.push(("t", b"veh".to_vec()));
                fields.push(("k", kind.as_str().as_bytes().to_vec()));
                fields.push(("p", payload.to_vec()));
            }
            CommandBody::Kick { epoch } => {
                fields.push(("t", b"kick".to_vec()));
                fields.push(("e", epoch.to_string().into_bytes()));
            }
        }
        Ok(fields)
    }

    /// Reads a command entry back.
    ///
    /// # Errors
    /// [`BusError`] naming the missing or invalid field.
    pub fn from_fields(fields: &HashMap<String, Vec<u8>>) -> Result<Self, BusError> {
        let f = FieldReader(fields);
        let body = match f.text("t")? {
            "cab" => {
                let payload = Bytes::copy_from_slice(f.bytes("p")?);
                match Message::parse(cabinet::MessageType::Command.as_u8(), &payload).map_err(|e| invalid("p", e))? {
                    Message::Command(c) => CommandBody::Cabinet(c.action),
                    _ => return Err(invalid("p", "not a command")),
                }
            }
            "veh" => CommandBody::Vehicle {
                kind: f.text("k")?.parse().map_err(|e| invalid("k", e))?,
                payload: Bytes::copy_from_slice(f.bytes("p")?),
            },
            "kick" => CommandBody::Kick { epoch: f.num("e")? },
            other => return Err(invalid("t", format!("unknown type {other:?}"))),
        };
        Ok(Self {
            request_id: f.text("id")?.to_owned(),
            device: DeviceKey::parse(f.text("dev")?)?,
            deadline_ms: f.num("dl")?,
            reply_to: f.text("rt")?.to_owned(),
            body,
        })
    }
}

/// How a command ended, as the gateway reports it (or, for a vehicle's own result to a generic
/// command, the device service that consumed its `command_result`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The cabinet answered.
    Cabinet(CommandResult),
    /// The vehicle answered a generic command (`up/command_result`), after its delivery.
    Vehicle(VehicleCommandResult),
    /// The vehicle acknowledged the downlink (PUBACK).
    Delivered,
    /// The device has no session on this node (it moved or is gone).
    NotConnected,
    /// The device did not answer before the deadline, or the deadline had passed on arrival.
    TimedOut,
    /// The device's command queue is full; try later.
    Busy,
    /// The command cannot be delivered as given.
    Invalid(String),
}

impl Outcome {
    /// The metric label (`outcome="..."`).
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Cabinet(_) | Outcome::Vehicle(_) => "answered",
            Outcome::Delivered => "delivered",
            Outcome::NotConnected => "not_connected",
            Outcome::TimedOut => "timed_out",
            Outcome::Busy => "busy",
            Outcome::Invalid(_) => "invalid",
        }
    }
}

/// A reply, as written to the sender's reply stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandReply {
    /// The command's `request_id`.
    pub request_id: String,
    /// The device.
    pub device: DeviceKey,
    /// The node that handled it.
    pub node: String,
    /// How it ended.
    pub outcome: Outcome,
}

impl CommandReply {
    /// The stream entry's fields.
    pub fn to_fields(&self) -> Fields {
        let mut fields: Fields = vec![
            ("id", self.request_id.as_bytes().to_vec()),
            ("dev", self.device.to_string().into_bytes()),
            ("n", self.node.as_bytes().to_vec()),
            ("o", self.outcome.label().as_bytes().to_vec()),
        ];
        match &self.outcome {
            Outcome::Cabinet(r) => fields.push(("p", vec![r.status.as_u8(), r.door_id, r.door_state.as_u8()])),
            // JSON as the vehicle sent it (the struct serialises infallibly).
            Outcome::Vehicle(r) => fields.push(("v", serde_json::to_vec(r).unwrap_or_default())),
            Outcome::Invalid(why) => fields.push(("why", why.as_bytes().to_vec())),
            _ => {}
        }
        fields
    }

    /// Reads a reply entry back.
    ///
    /// # Errors
    /// [`BusError`] naming the missing or invalid field.
    pub fn from_fields(fields: &HashMap<String, Vec<u8>>) -> Result<Self, BusError> {
        let f = FieldReader(fields);
        let outcome = match f.text("o")? {
            "answered" if fields.contains_key("v") => {
                Outcome::Vehicle(serde_json::from_slice(f.bytes("v")?).map_err(|e| invalid("v", e))?)
            }
            "answered" => {
                let p = Bytes::copy_from_slice(f.bytes("p")?);
                match Message::parse(cabinet::MessageType::CommandResult.as_u8(), &p).map_err(|e| invalid("p", e))? {
                    Message::CommandResult(r) => Outcome::Cabinet(r),
                    _ => return Err(invalid("p", "not a command result")),
                }
            }
            "delivered" => Outcome::Delivered,
            "not_connected" => Outcome::NotConnected,
            "timed_out" => Outcome::TimedOut,
            "busy" => Outcome::Busy,
            "invalid" => Outcome::Invalid(f.text("why")?.to_owned()),
            other => return Err(invalid("o", format!("unknown outcome {other:?}"))),
        };
        Ok(Self {
            request_id: f.text("id")?.to_owned(),
            device: DeviceKey::parse(f.text("dev")?)?,
            node: f.text("n")?.to_owned(),
            outcome,
        })
    }
}

// === credential changes ===

/// Approximate length cap of the credential-change stream: far more changes than a gateway can
/// miss while it reconnects to Redis; one that falls behind it clears its whole cache.
pub const CREDENTIAL_CHANGES_MAXLEN: usize = 10_000;

/// What happened to a device's credentials (SPEC.md 3.1, `P cred:changes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialChangeKind {
    /// The device was registered: forget that it was unknown.
    Registered,
    /// New credentials were issued: the old ones stop working and live sessions end.
    Rotated,
    /// Logins were disabled: live sessions end.
    Disabled,
    /// Logins were enabled again.
    Enabled,
}

impl CredentialChangeKind {
    /// The wire name (`why` field) and metric label.
    pub fn label(self) -> &'static str {
        match self {
            CredentialChangeKind::Registered => "registered",
            CredentialChangeKind::Rotated => "rotated",
            CredentialChangeKind::Disabled => "disabled",
            CredentialChangeKind::Enabled => "enabled",
        }
    }

    /// Whether a session logged in with the previous credentials must end.
    pub fn revokes_sessions(self) -> bool {
        matches!(self, CredentialChangeKind::Rotated | CredentialChangeKind::Disabled)
    }
}

/// One entry of `P cred:changes`: `dev`, `why`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialChange {
    /// The device.
    pub device: DeviceKey,
    /// What changed.
    pub kind: CredentialChangeKind,
}

impl CredentialChange {
    /// The stream entry's fields.
    pub fn to_fields(&self) -> Fields {
        vec![("dev", self.device.to_string().into_bytes()), ("why", self.kind.label().as_bytes().to_vec())]
    }

    /// Reads an entry back.
    ///
    /// # Errors
    /// [`BusError`] naming the missing or invalid field.
    pub fn from_fields(fields: &HashMap<String, Vec<u8>>) -> Result<Self, BusError> {
        let f = FieldReader(fields);
        let kind = match f.text("why")? {
            "registered" => CredentialChangeKind::Registered,
            "rotated" => CredentialChangeKind::Rotated,
            "disabled" => CredentialChangeKind::Disabled,
            "enabled" => CredentialChangeKind::Enabled,
            other => return Err(invalid("why", format!("unknown change {other:?}"))),
        };
        Ok(Self { device: DeviceKey::parse(f.text("dev")?)?, kind })
    }
}

/// What an entry of `P cred:changes` says: one device's change, or that the whole mirror was
/// written again (after Redis lost its data), so every cached credential must go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialEntry {
    /// `dev`, `why`.
    Change(CredentialChange),
    /// `why` = `rewritten` (no `dev`).
    Rewritten,
}

impl CredentialEntry {
    /// The fields of a [`CredentialEntry::Rewritten`] entry.
    pub fn rewritten_fields() -> Fields {
        vec![("why", b"rewritten".to_vec())]
    }

    /// Reads an entry.
    ///
    /// # Errors
    /// As [`CredentialChange::from_fields`].
    pub fn from_fields(fields: &HashMap<String, Vec<u8>>) -> Result<Self, BusError> {
        if fields.get("why").is_some_and(|w| w == b"rewritten") {
            return Ok(Self::Rewritten);
        }
        CredentialChange::from_fields(fields).map(Self::Change)
    }
}

/// Converts stream fields as a Redis client returns them into the map the readers take.
pub fn field_map<'a>(fields: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> HashMap<String, Vec<u8>> {
    fields.into_iter().map(|(k, v)| (k.to_owned(), v.to_vec())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cabinet::{CommandStatus, DoorEvent, DoorState, DoorStatus};

    fn map(fields: Fields) -> HashMap<String, Vec<u8>> {
        fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    fn cab(id: &str) -> DeviceKey {
        DeviceKey::Cabinet(DeviceId::new(id).expect("valid"))
    }

    #[test]
    fn a_rewritten_mirror_is_its_own_entry() {
        assert_eq!(
            CredentialEntry::from_fields(&map(CredentialEntry::rewritten_fields())),
            Ok(CredentialEntry::Rewritten)
        );
        let change = CredentialChange { device: cab("C1"), kind: CredentialChangeKind::Rotated };
        assert_eq!(CredentialEntry::from_fields(&map(change.to_fields())), Ok(CredentialEntry::Change(change)));
    }

    #[test]
    fn credential_changes_round_trip() {
        for kind in [
            CredentialChangeKind::Registered,
            CredentialChangeKind::Rotated,
            CredentialChangeKind::Disabled,
            CredentialChangeKind::Enabled,
        ] {
            let change = CredentialChange { device: cab("C-1"), kind };
            assert_eq!(CredentialChange::from_fields(&map(change.to_fields())), Ok(change));
        }
        let bad = map(vec![("dev", b"cab:C-1".to_vec()), ("why", b"stolen".to_vec())]);
        assert!(matches!(CredentialChange::from_fields(&bad), Err(BusError::Invalid { field: "why", .. })));
    }

    fn veh() -> DeviceKey {
        DeviceKey::Vehicle(Vin::new("LSVAU2180N2183294").expect("valid"))
    }

    #[test]
    fn device_keys_round_trip_and_shard_stably() {
        for key in [cab("CAB-1"), veh()] {
            assert_eq!(DeviceKey::parse(&key.to_string()), Ok(key.clone()));
            assert_eq!(key.shard(8), key.shard(8));
            assert!(key.shard(8) < 8);
            assert_eq!(key.shard(1), 0);
            assert_eq!(key.shard(0), 0);
        }
        assert!(DeviceKey::parse("cab:a:b").is_err());
        assert!(DeviceKey::parse("x:CAB").is_err());
        assert!(DeviceKey::parse("veh:SHORT").is_err());
    }

    #[test]
    fn key_layout() {
        let k = Keys::new("p:");
        assert_eq!(k.conn(&cab("C1")), "p:conn:cab:C1");
        assert_eq!(k.upstream(3), "p:up:3");
        assert_eq!(k.commands("gw-a"), "p:cmd:gw-a");
        let vin = Vin::new("LSVAU2180N2183294").expect("valid");
        assert_eq!(k.mqtt_inflight(&vin), "p:mqtt:{LSVAU2180N2183294}:inflight");
        assert_eq!(k.mqtt_session(&vin), "p:mqtt:{LSVAU2180N2183294}:session");
    }

    #[test]
    fn up_events_round_trip() {
        let events = vec![
            UpEvent::SessionOpened { device: cab("C1"), epoch: 7, node: "gw-a".into(), at_ms: 5, info: "1.4.2".into() },
            UpEvent::SessionClosed {
                device: veh(),
                epoch: 8,
                node: "gw-b".into(),
                at_ms: 6,
                reason: "idle_timeout".into(),
            },
            UpEvent::Heartbeats {
                node: "gw-a".into(),
                window_start_ms: 1000,
                window_ms: 1000,
                count: 3,
                sessions: 2,
                devices: vec![
                    HeartbeatSeen { device: cab("C1"), at_ms: 1500, epoch: 7 },
                    HeartbeatSeen { device: cab("C2"), at_ms: 1600, epoch: 1 },
                ],
            },
            UpEvent::Heartbeats {
                node: "gw-a".into(),
                window_start_ms: 0,
                window_ms: 1000,
                count: 0,
                sessions: 0,
                devices: vec![],
            },
            UpEvent::Cabinet {
                device: DeviceId::new("C1").expect("valid"),
                epoch: 7,
                node: "gw-a".into(),
                at_ms: 9,
                seq: 12,
                message: Message::DoorEvent(DoorEvent {
                    door_id: 2,
                    state: DoorState::Closed,
                    event_time_ms: 8,
                    order_id: None,
                }),
            },
            UpEvent::Vehicle {
                vin: Vin::new("LSVAU2180N2183294").expect("valid"),
                epoch: 2,
                node: "gw-b".into(),
                at_ms: 10,
                kind: UplinkKind::OtaStatus,
                payload: Bytes::from_static(br#"{"task_id":"t","status":"waiting","ts_ms":1}"#),
            },
        ];
        for e in events {
            let back = UpEvent::from_fields(&map(e.to_fields().expect("encodable"))).expect("decodes");
            assert_eq!(back, e);
        }
    }

    #[test]
    fn commands_and_replies_round_trip() {
        let commands = vec![
            CommandRequest {
                request_id: "r1".into(),
                device: cab("C1"),
                deadline_ms: 99,
                reply_to: "p:reply:svc-1".into(),
                body: CommandBody::Cabinet(CommandAction::QueryDoor { door_id: 1 }),
            },
            CommandRequest {
                request_id: "r2".into(),
                device: veh(),
                deadline_ms: 100,
                reply_to: String::new(),
                body: CommandBody::Vehicle { kind: DownlinkKind::OtaNotify, payload: Bytes::from_static(b"{}") },
            },
            CommandRequest {
                request_id: "k".into(),
                device: veh(),
                deadline_ms: 100,
                reply_to: String::new(),
                body: CommandBody::Kick { epoch: 4 },
            },
        ];
        for c in commands {
            assert_eq!(CommandRequest::from_fields(&map(c.to_fields().expect("encodable"))), Ok(c.clone()));
        }
        let outcomes = [
            Outcome::Cabinet(CommandResult { status: CommandStatus::Ok, door_id: 1, door_state: DoorStatus::Open }),
            Outcome::Vehicle(crate::vehicle::VehicleCommandResult {
                request_id: "c-1".into(),
                status: crate::vehicle::VehicleCommandStatus::Failed,
                detail: Some("door ajar".into()),
            }),
            Outcome::Delivered,
            Outcome::NotConnected,
            Outcome::TimedOut,
            Outcome::Busy,
            Outcome::Invalid("bad".into()),
        ];
        for outcome in outcomes {
            let r = CommandReply { request_id: "r".into(), device: cab("C1"), node: "gw".into(), outcome };
            assert_eq!(CommandReply::from_fields(&map(r.to_fields())), Ok(r.clone()));
        }
    }

    #[test]
    fn bad_entries_name_the_field() {
        assert_eq!(UpEvent::from_fields(&HashMap::new()), Err(BusError::Missing("t")));
        let mut m = map(vec![("t", b"open".to_vec()), ("dev", b"cab:C1".to_vec()), ("e", b"x".to_vec())]);
        assert!(matches!(UpEvent::from_fields(&m), Err(BusError::Invalid { field: "e", .. })));
        m.insert("t".into(), b"nope".to_vec());
        assert!(matches!(UpEvent::from_fields(&m), Err(BusError::Invalid { field: "t", .. })));
    }
}
