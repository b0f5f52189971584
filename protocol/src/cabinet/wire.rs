//! Field-level reading and writing of cabinet payloads (SPEC.md, "Field types").
//!
//! [`Reader`] walks a payload and names the field it was reading when something is wrong, so a
//! rejection says which field, not just "malformed". [`put_str8`] and friends check limits before
//! writing, so an encoder can never emit a frame that a conforming decoder rejects.

use bytes::{BufMut, BytesMut};

use super::error::{EncodeError, MessageError};

/// A cursor over a payload. Never panics: every read checks the remaining length first.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], MessageError> {
        if self.buf.len() < n {
            return Err(MessageError::Truncated { field });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], MessageError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, MessageError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, MessageError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, MessageError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn i32(&mut self, field: &'static str) -> Result<i32, MessageError> {
        Ok(i32::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, MessageError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    /// A `str8`: one length byte, then that many bytes of UTF-8.
    pub(crate) fn str8(&mut self, field: &'static str) -> Result<&'a str, MessageError> {
        let len = usize::from(self.u8(field)?);
        let raw = self.take(len, field)?;
        std::str::from_utf8(raw).map_err(|_| MessageError::InvalidText { field })
    }

    /// How many bytes have not been read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }
}

/// Writes a `str8`, refusing text longer than `max` (itself at most 255).
pub(crate) fn put_str8(dst: &mut BytesMut, field: &'static str, s: &str, max: usize) -> Result<(), EncodeError> {
    let max = max.min(usize::from(u8::MAX));
    let len = u8::try_from(s.len()).ok().filter(|l| usize::from(*l) <= max).ok_or(EncodeError::TooLong {
        field,
        len: s.len(),
        max,
    })?;
    dst.put_u8(len);
    dst.put_slice(s.as_bytes());
    Ok(())
}

/// Encoded size of a `str8` holding `s`.
pub(crate) fn str8_len(s: &str) -> usize {
    1 + s.len()
}
