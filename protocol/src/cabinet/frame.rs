//! The cabinet frame: header, payload, CRC-32C trailer (SPEC.md, "Frame layout"), and the pure
//! functions that cut frames out of a byte buffer and write them into one.
//!
//! ```text
//! 0      2        3      4       5     9        11          11+len
//! +------+--------+------+-------+-----+--------+-----------+---------+
//! | CA B1| version| type | flags | seq | length | payload   | CRC-32C |
//! +------+--------+------+-------+-----+--------+-----------+---------+
//!   u16     u8      u8     u8     u32    u16     length B     u32
//! ```
//!
//! [`decode`] checks, in this order and before anything else is buffered or parsed: magic,
//! version, declared length against the limit, then (once the whole frame is in) the checksum,
//! then the type and fields. Only a whole frame is ever removed from the buffer.

use bytes::{Buf, BufMut, BytesMut};

use super::error::{EncodeError, FrameError};
use super::message::Message;

/// The two sync bytes every frame starts with.
pub const MAGIC: u16 = 0xCAB1;
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Bytes before the payload: magic, version, type, flags, seq, length.
pub const HEADER_LEN: usize = 11;
/// Bytes after the payload: the CRC-32C.
pub const TRAILER_LEN: usize = 4;
/// The largest payload the spec allows, in bytes. A receiver may enforce a smaller limit.
pub const MAX_PAYLOAD_LEN: usize = 4096;
/// The largest frame the spec allows, in bytes.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_PAYLOAD_LEN + TRAILER_LEN;

/// The flags byte. Bits other than those named here are reserved: senders write 0, receivers
/// ignore them (SPEC.md, "Flags").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Flags(pub u8);

impl Flags {
    /// Bit 0: the sender asks for an `ACK` carrying this frame's `seq`.
    pub const ACK_REQUESTED: u8 = 0x01;

    /// No flags set.
    pub const NONE: Flags = Flags(0);

    /// `true` if the sender asked for an `ACK`.
    pub fn ack_requested(self) -> bool {
        self.0 & Self::ACK_REQUESTED != 0
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The sender's sequence number, or for an answer, the `seq` of the frame it answers.
    pub seq: u32,
    /// The flags byte as received.
    pub flags: Flags,
    /// The typed payload.
    pub message: Message,
}

impl Frame {
    /// A frame without flags.
    pub fn new(seq: u32, message: Message) -> Self {
        Self { seq, flags: Flags::NONE, message }
    }

    /// Encoded length of this frame in bytes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.message.payload_len() + TRAILER_LEN
    }
}

/// Cuts the next frame off the front of `src`.
///
/// # Returns
/// - `Ok(Some(frame))`: a frame was decoded and removed from `src`;
/// - `Ok(None)`: `src` holds only part of a frame; more bytes are needed (capacity for the rest
///   has been reserved once the header was seen);
/// - `Err(e)` with `e.is_fatal()`: framing is lost, nothing was removed; close the connection;
/// - `Err(FrameError::Invalid { .. })`: an intact frame was removed but its type or payload is
///   not acceptable; answer `ERROR` and carry on.
///
/// `max_payload_len` is the receiver's limit, at most [`MAX_PAYLOAD_LEN`].
///
/// # Errors
/// See above; never panics on any input.
pub fn decode(src: &mut BytesMut, max_payload_len: usize) -> Result<Option<Frame>, FrameError> {
    let max_payload_len = max_payload_len.min(MAX_PAYLOAD_LEN);
    // Reject garbage as soon as two bytes are in, rather than waiting for a full header.
    if src.len() >= 2 {
        let magic = u16::from_be_bytes([src[0], src[1]]);
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
    }
    if src.len() >= 3 && src[2] != VERSION {
        return Err(FrameError::UnsupportedVersion(src[2]));
    }
    if src.len() < HEADER_LEN {
        return Ok(None);
    }
    let payload_len = usize::from(u16::from_be_bytes([src[9], src[10]]));
    let header_seq = u32::from_be_bytes([src[5], src[6], src[7], src[8]]);
    if payload_len > max_payload_len {
        // Don't let a rogue peer make us buffer a body we will refuse anyway.
        return Err(FrameError::TooLarge { seq: header_seq, len: payload_len, max: max_payload_len });
    }
    let frame_len = HEADER_LEN + payload_len + TRAILER_LEN;
    if src.len() < frame_len {
        src.reserve(frame_len - src.len());
        return Ok(None);
    }
    let body_len = HEADER_LEN + payload_len;
    let expected = crc32c::crc32c(&src[..body_len]);
    let actual = u32::from_be_bytes([src[body_len], src[body_len + 1], src[body_len + 2], src[body_len + 3]]);
    if expected != actual {
        return Err(FrameError::BadChecksum { seq: header_seq, expected, actual });
    }

    // The frame is intact: from here on it leaves the buffer whatever its content.
    let mut frame = src.split_to(frame_len).freeze();
    frame.advance(3);
    let msg_type = frame.get_u8();
    let flags = Flags(frame.get_u8());
    let seq = frame.get_u32();
    frame.advance(2);
    let payload = frame.slice(..payload_len);
    let message = Message::parse(msg_type, &payload).map_err(|reason| FrameError::Invalid { seq, msg_type, reason })?;
    Ok(Some(Frame { seq, flags, message }))
}

/// Appends `frame` to `dst`.
///
/// # Errors
/// [`EncodeError`] if a field breaks the spec's limits or the payload would exceed
/// [`MAX_PAYLOAD_LEN`]; `dst` is then left as it was.
pub fn encode(frame: &Frame, dst: &mut BytesMut) -> Result<(), EncodeError> {
    let start = dst.len();
    dst.reserve(frame.encoded_len());
    dst.put_u16(MAGIC);
    dst.put_u8(VERSION);
    dst.put_u8(frame.message.message_type().as_u8());
    dst.put_u8(frame.flags.0);
    dst.put_u32(frame.seq);
    dst.put_u16(0); // length, patched below once the payload is written
    if let Err(e) = frame.message.write(dst) {
        dst.truncate(start);
        return Err(e);
    }
    let payload_len = dst.len() - start - HEADER_LEN;
    let Some(len) = u16::try_from(payload_len).ok().filter(|l| usize::from(*l) <= MAX_PAYLOAD_LEN) else {
        dst.truncate(start);
        return Err(EncodeError::TooLong { field: "payload", len: payload_len, max: MAX_PAYLOAD_LEN });
    };
    dst[start + 9..start + 11].copy_from_slice(&len.to_be_bytes());
    let crc = crc32c::crc32c(&dst[start..]);
    dst.put_u32(crc);
    Ok(())
}
