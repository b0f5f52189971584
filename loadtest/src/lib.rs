//! The load-test harness: simulated cabinets and vehicles, spread over worker processes, with
//! latency histograms, server memory measurements and JSON reports.
//!
//! # Layout
//! - [`cabinet`], [`vehicle`]: one simulated device each, behaving as the documents say;
//!   [`download`]: a vehicle's resumable, checked package download;
//! - [`worker`]: a process simulating a slice of the fleet;
//! - [`fleet`]: the orchestrator (workers, progress, memory, report); [`compare`]: the same
//!   MQTT load against Mosquitto; [`probe`]: a lean one-thread MQTT probe for side-by-side
//!   CPU per operation;
//! - [`commander`]: commands through the connection map, with round-trip times;
//! - [`api`]: the device service's HTTP API; [`seed`]: the fleet registered through it;
//!   [`scenarios`]: purchase storm, activation wave, OTA campaign;
//! - [`hb_feed`]: synthetic gateway heartbeat windows for fleets beyond one machine's sockets;
//! - [`charts`]: PNG charts drawn from a report; [`summary`]: its few human lines;
//! - [`fleet_ids`]: identities and credentials; [`stats`]: histograms and counters; [`rss`]:
//!   process memory; [`tls`]: devices over TLS.

pub mod api;
pub mod cabinet;
pub mod charts;
pub mod commander;
pub mod compare;
pub mod download;
pub mod fleet;
pub mod fleet_ids;
pub mod hb_feed;
pub mod netfault;
pub mod probe;
pub mod rss;
pub mod scenarios;
pub mod seed;
pub mod stats;
pub mod summary;
pub mod tls;
pub mod vehicle;
pub mod worker;
