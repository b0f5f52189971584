//! The wire of the IoT device gateway: what cabinets, vehicles, gateways and the device service
//! say to each other, and nothing else. Pure code over `bytes`: no sockets, no runtime.
//!
//! # Layout
//! - [`ids`]: device ids, VINs and order ids, validated once where they enter;
//! - [`cabinet`]: the binary cabinet protocol of `SPEC.md` (frames, messages, codec);
//! - [`mqtt`]: the server-side MQTT codec, its extra checks, and the vehicle topic scheme;
//! - [`vehicle`]: the JSON payloads carried on the vehicle topics;
//! - [`bus`]: what gateway nodes and the device service exchange through Redis;
//! - [`payment`]: the payment provider's signed callback.

pub mod bus;
pub mod cabinet;
pub mod ids;
pub mod mqtt;
pub mod payment;
pub mod vehicle;

pub use ids::{DeviceId, IdError, OrderId, Vin};
