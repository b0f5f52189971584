//! The cabinet protocol: binary frames over a long-lived TCP (or TLS) connection.
//!
//! `protocol/SPEC.md` is the normative description; this module is its reference
//! implementation. Layers, bottom up:
//! - [`wire`](self) (private): field readers and writers;
//! - [`message`]: the typed payload of each message type;
//! - [`frame`]: header, checksum, and the pure [`decode`]/[`encode`] functions;
//! - [`codec`]: `tokio_util::codec` adapters;
//! - [`error`]: every rejection, with its metric label.

pub mod codec;
pub mod error;
pub mod frame;
pub mod message;
mod wire;

pub use codec::{CabinetCodec, CodecError, Inbound};
pub use error::{EncodeError, FrameError, MessageError};
pub use frame::{Flags, Frame, MAX_FRAME_LEN, MAX_PAYLOAD_LEN, decode, encode};
pub use message::*;
