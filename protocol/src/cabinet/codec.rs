//! `tokio_util::codec` adapters over [`frame::decode`](super::frame::decode) and
//! [`frame::encode`](super::frame::encode), for `Framed` users such as the load generator.
//!
//! A `Framed` stream ends after its decoder's first error, so only fatal errors are errors here;
//! a rejected but intact frame is yielded as an `Err` *item* and the stream goes on.

use std::io;

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use super::error::{EncodeError, FrameError};
use super::frame::{self, Frame, MAX_PAYLOAD_LEN};

/// What the decoder yields: a frame, or an intact frame that was rejected
/// (always [`FrameError::Invalid`]) and should be answered with `ERROR`.
pub type Inbound = Result<Frame, FrameError>;

/// Why a cabinet stream must close.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The socket failed.
    #[error("failed to read or write cabinet stream: {0}")]
    Io(#[from] io::Error),
    /// Framing is lost (bad magic, unsupported version, too large, checksum).
    #[error(transparent)]
    Frame(FrameError),
    /// A frame to send broke the spec's limits.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// Cabinet frames over a byte stream.
#[derive(Debug, Clone, Copy)]
pub struct CabinetCodec {
    max_payload_len: usize,
}

impl CabinetCodec {
    /// A codec enforcing `max_payload_len` (clamped to the spec's 4096) on received frames.
    pub fn new(max_payload_len: usize) -> Self {
        Self { max_payload_len: max_payload_len.min(MAX_PAYLOAD_LEN) }
    }

    /// Changes the receive limit, e.g. from the small pre-login limit to the session limit.
    pub fn set_max_payload_len(&mut self, max_payload_len: usize) {
        self.max_payload_len = max_payload_len.min(MAX_PAYLOAD_LEN);
    }
}

impl Default for CabinetCodec {
    fn default() -> Self {
        Self::new(MAX_PAYLOAD_LEN)
    }
}

impl Decoder for CabinetCodec {
    type Item = Inbound;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, CodecError> {
        match frame::decode(src, self.max_payload_len) {
            Ok(Some(frame)) => Ok(Some(Ok(frame))),
            Ok(None) => Ok(None),
            Err(e) if e.is_fatal() => Err(CodecError::Frame(e)),
            Err(e) => Ok(Some(Err(e))),
        }
    }
}

impl Encoder<&Frame> for CabinetCodec {
    type Error = CodecError;

    fn encode(&mut self, item: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        Ok(frame::encode(item, dst)?)
    }
}

impl Encoder<Frame> for CabinetCodec {
    type Error = CodecError;

    fn encode(&mut self, item: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        Ok(frame::encode(&item, dst)?)
    }
}
