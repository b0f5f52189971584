//! Why a cabinet frame was rejected, and why one could not be written.
//!
//! Each variant carries the bad value and maps to exactly one metric label ([`FrameError::label`]),
//! so a rejection is logged and counted by the same type that describes it.

/// A frame the decoder refused.
///
/// Two families, told apart by [`FrameError::is_fatal`]:
/// - *framing errors* (bad magic, unsupported version, too large, checksum mismatch): the byte
///   stream can no longer be trusted to be at a frame boundary, so the connection must close
///   (SPEC.md, "Error handling");
/// - *message errors* ([`FrameError::Invalid`]): the frame was intact and has been consumed from
///   the buffer; the peer answers with an `ERROR` frame and keeps the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first two bytes are not the magic `CA B1`.
    #[error("failed to decode frame: bad magic {0:#06x}")]
    BadMagic(u16),
    /// The version byte is not one this decoder speaks.
    #[error("failed to decode frame: unsupported version {0}")]
    UnsupportedVersion(u8),
    /// The declared payload length exceeds the limit; nothing of the body was buffered.
    #[error("failed to decode frame: payload length {len} exceeds the limit {max}")]
    TooLarge {
        /// The frame's sequence number as read from its header.
        seq: u32,
        /// Declared payload length in bytes.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The CRC-32C trailer does not match the header and payload.
    #[error("failed to decode frame: checksum {actual:#010x} does not match computed {expected:#010x}")]
    BadChecksum {
        /// The frame's sequence number as read from its (unverified) header.
        seq: u32,
        /// CRC-32C computed over the received header and payload.
        expected: u32,
        /// The trailer as received.
        actual: u32,
    },
    /// An intact frame whose type or payload is not acceptable.
    #[error("failed to decode frame seq {seq} type {msg_type:#04x}: {reason}")]
    Invalid {
        /// The frame's sequence number, to put in the `ERROR` answer.
        seq: u32,
        /// The frame's type byte.
        msg_type: u8,
        /// What is wrong with it.
        reason: MessageError,
    },
}

impl FrameError {
    /// `true` when the stream has lost its framing and the connection must be closed.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, FrameError::Invalid { .. })
    }

    /// The `seq` an `ERROR` about this rejection carries (SPEC.md 1.6): the frame's own once
    /// its 11-byte header was read, 0 for a frame refused by its first three bytes.
    pub fn seq(&self) -> u32 {
        match self {
            FrameError::BadMagic(_) | FrameError::UnsupportedVersion(_) => 0,
            FrameError::TooLarge { seq, .. }
            | FrameError::BadChecksum { seq, .. }
            | FrameError::Invalid { seq, .. } => *seq,
        }
    }

    /// The metric label of this rejection (`reason="..."`).
    pub fn label(&self) -> &'static str {
        match self {
            FrameError::BadMagic(_) => "bad_magic",
            FrameError::UnsupportedVersion(_) => "unsupported_version",
            FrameError::TooLarge { .. } => "too_large",
            FrameError::BadChecksum { .. } => "bad_checksum",
            FrameError::Invalid { reason, .. } => reason.label(),
        }
    }
}

/// What is wrong with an intact frame's type or payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// The type byte names no message of this version.
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    /// The payload ended inside a field.
    #[error("payload truncated in field {field}")]
    Truncated {
        /// The field being read when the bytes ran out.
        field: &'static str,
    },
    /// A field holds a value outside its range.
    #[error("field {field} out of range: {value}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The value received (signed values are shown as their two's-complement bits).
        value: u64,
    },
    /// A text field is not valid UTF-8 or breaks its alphabet.
    #[error("field {field} is not valid text")]
    InvalidText {
        /// The field.
        field: &'static str,
    },
}

impl MessageError {
    /// The metric label of this rejection.
    pub fn label(&self) -> &'static str {
        match self {
            MessageError::UnknownType(_) => "unknown_type",
            MessageError::Truncated { .. } => "truncated",
            MessageError::OutOfRange { .. } => "out_of_range",
            MessageError::InvalidText { .. } => "invalid_text",
        }
    }
}

/// A message that cannot be written because a field breaks the spec's limits.
///
/// Only a bug on the sending side produces one; it is an error rather than a panic so that one
/// bad command cannot take a gateway down.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A text or list field is longer than its length prefix or the spec allows.
    #[error("failed to encode field {field}: length {len} exceeds {max}")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A numeric field is outside its range.
    #[error("failed to encode field {field}: value {value} out of range")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// Its value.
        value: i64,
    },
}
