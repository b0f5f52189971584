//! The conformance suite's parts: a cabinet written from `protocol/SPEC.md` part 1 alone, and a
//! stack of two gateway nodes and a device service on the test's own PostgreSQL database and
//! Redis prefix.
//!
//! The cabinet ([`cabinet`]) speaks bytes: it builds and reads frames with nothing but the
//! layouts, CRC-32C and HMAC-SHA256 the spec names, never the `protocol` crate's types, so a
//! test passes only when the gateway does what the document says, byte for byte. Vehicles use
//! rumqttc, an MQTT client nobody here wrote. The tests in `tests/` are the cases a device
//! vendor or a car maker met when they built against the spec.

pub mod cabinet;
pub mod stack;
pub mod vehicle;
