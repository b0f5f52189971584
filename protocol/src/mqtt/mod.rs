//! MQTT for vehicles: a server-side codec over `rmqtt-codec`, the checks it leaves to the
//! server, and the vehicle topic scheme.
//!
//! - [`packet`]: one packet model for 3.1, 3.1.1 and 5.0;
//! - [`codec`]: version detection, size limits, conversion to and from the wire;
//! - [`validate`]: topic, filter and string rules the wire crate does not enforce;
//! - [`topic`]: `vehicles/{VIN}/up|down/{kind}` and who may use which;
//! - [`error`]: every rejection, with its metric label.

pub mod codec;
pub mod error;
pub mod packet;
pub mod topic;
pub mod validate;

pub use codec::{Limits, MqttCodec};
pub use error::MqttError;
pub use packet::*;
