//! OTA packages at rest: encrypted in independently decryptable chunks, so that a download
//! resumed at any byte (HTTP `Range`) decrypts only the chunks it touches and memory stays
//! bounded whatever the package's size (seed document 000: "decrypt 1 MB at a time while
//! reading").
//!
//! Each package has its own random 256-bit data key; the data key is kept with the package
//! record only wrapped by a master key from configuration ([`MasterKeys`]), so rotating the
//! master key rewraps the small data keys and never touches the packages. A chunk is
//! AES-256-GCM (RustCrypto's `aes-gcm`, audited and constant-time) over at most
//! [`CHUNK`] bytes of plaintext, with:
//!
//! - a nonce of its own: the package's random 8-byte prefix and the chunk's 4-byte index, so no
//!   nonce repeats under a key;
//! - associated data naming the package, the chunk's index and whether it is the last, so a
//!   chunk moved to another place or package, or a package cut short, fails authentication
//!   instead of decrypting to something else.
//!
//! The stored object is the chunks one after the other, each `len + 16` bytes (the tag); the
//! plaintext length, the nonce prefix and the wrapped key are in the package record.

use std::collections::HashMap;
use std::ops::Range;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use serde::{Deserialize, Serialize};

/// Plaintext bytes per chunk: 1 MiB.
pub const CHUNK: u64 = 1 << 20;
/// The authentication tag each chunk carries.
pub const TAG: u64 = 16;

/// What can go wrong sealing or opening.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    /// A chunk does not authenticate: tampered, moved, from another package, or cut short.
    #[error("chunk {0} does not authenticate (tampered, moved or truncated)")]
    Tampered(u64),
    /// The wrapped data key names a master key this configuration does not hold.
    #[error("master key {0:?} is not configured")]
    UnknownMasterKey(String),
    /// The wrapped data key does not authenticate under its master key.
    #[error("the data key does not unwrap under master key {0:?}")]
    BadWrappedKey(String),
    /// A master key that is not 32 bytes of hex, or a malformed wrapped key.
    #[error("invalid key material: {0}")]
    Invalid(&'static str),
    /// A byte range outside the package.
    #[error("range {start}..{end} is outside a package of {len} bytes")]
    OutOfRange {
        /// First byte asked for.
        start: u64,
        /// One past the last.
        end: u64,
        /// The package's length.
        len: u64,
    },
}

fn random<const N: usize>() -> Result<[u8; N], SealError> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(|_| SealError::Invalid("no randomness"))?;
    Ok(buf)
}

/// A package's data key wrapped by a master key: what the package record keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    /// The master key's id.
    pub master: String,
    /// The wrapping's nonce, hex.
    pub nonce: String,
    /// The data key encrypted and authenticated, hex.
    pub sealed: String,
}

/// The master keys a configuration holds, by id; one of them wraps new data keys.
#[derive(Clone)]
pub struct MasterKeys {
    keys: HashMap<String, Aes256Gcm>,
    current: String,
}

impl std::fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        f.debug_struct("MasterKeys")
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .field("current", &self.current)
            .finish()
    }
}

impl MasterKeys {
    /// The keys `(id, 64 hex characters)`; `current` wraps new data keys (the others only
    /// unwrap, until every package is rewrapped: see [`MasterKeys::rewrap`]).
    ///
    /// # Errors
    /// `Invalid` for a key that is not 32 bytes of hex, or a `current` not among them.
    pub fn new<'a>(keys: impl IntoIterator<Item = (&'a str, &'a str)>, current: &str) -> Result<Self, SealError> {
        let mut map = HashMap::new();
        for (id, hex_key) in keys {
            let bytes = hex::decode(hex_key).map_err(|_| SealError::Invalid("a master key is 64 hex characters"))?;
            if bytes.len() != 32 {
                return Err(SealError::Invalid("a master key is 64 hex characters"));
            }
            map.insert(id.to_owned(), Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&bytes)));
        }
        if !map.contains_key(current) {
            return Err(SealError::Invalid("the current master key is not among the keys"));
        }
        Ok(MasterKeys { keys: map, current: current.to_owned() })
    }

    /// A fresh data key and its wrapping under the current master key.
    ///
    /// # Errors
    /// `Invalid` when no randomness is available.
    pub fn new_data_key(&self) -> Result<([u8; 32], WrappedKey), SealError> {
        let key = random::<32>()?;
        Ok((key, self.wrap(&key)?))
    }

    fn wrap(&self, key: &[u8; 32]) -> Result<WrappedKey, SealError> {
        let nonce = random::<12>()?;
        let cipher = &self.keys[&self.current];
        let aad = self.current.as_bytes();
        let sealed = cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: key, aad })
            .map_err(|_| SealError::Invalid("wrapping failed"))?;
        Ok(WrappedKey { master: self.current.clone(), nonce: hex::encode(nonce), sealed: hex::encode(sealed) })
    }

    /// The data key inside `w`.
    ///
    /// # Errors
    /// `UnknownMasterKey`, `BadWrappedKey`, or `Invalid` for malformed hex.
    pub fn unwrap_key(&self, w: &WrappedKey) -> Result<[u8; 32], SealError> {
        let cipher = self.keys.get(&w.master).ok_or_else(|| SealError::UnknownMasterKey(w.master.clone()))?;
        let nonce = hex::decode(&w.nonce).map_err(|_| SealError::Invalid("wrapped key nonce"))?;
        let sealed = hex::decode(&w.sealed).map_err(|_| SealError::Invalid("wrapped key"))?;
        if nonce.len() != 12 {
            return Err(SealError::Invalid("wrapped key nonce"));
        }
        let key = cipher
            .decrypt(Nonce::from_slice(&nonce), Payload { msg: &sealed, aad: w.master.as_bytes() })
            .map_err(|_| SealError::BadWrappedKey(w.master.clone()))?;
        key.try_into().map_err(|_| SealError::BadWrappedKey(w.master.clone()))
    }

    /// `w` wrapped again under the current master key (rotation: the package's chunks are
    /// untouched; once every record is rewrapped the old master key can be dropped).
    ///
    /// # Errors
    /// As [`MasterKeys::unwrap_key`].
    pub fn rewrap(&self, w: &WrappedKey) -> Result<WrappedKey, SealError> {
        if w.master == self.current {
            return Ok(w.clone());
        }
        self.wrap(&self.unwrap_key(w)?)
    }
}

/// The chunk cipher of one package.
pub struct Sealer {
    cipher: Aes256Gcm,
    prefix: [u8; 8],
    package: String,
    len: u64,
    chunk: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("package", &self.package).field("len", &self.len).finish_non_exhaustive()
    }
}

impl Sealer {
    /// The cipher of package `package` of `len` plaintext bytes under `data_key`, with the
    /// package's nonce `prefix` (random, kept with the record: [`Sealer::new_prefix`]), in
    /// chunks of `chunk` bytes ([`CHUNK`] for stored packages).
    pub fn new(data_key: &[u8; 32], prefix: [u8; 8], package: &str, len: u64, chunk: u64) -> Self {
        let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(data_key));
        Sealer { cipher, prefix, package: package.to_owned(), len, chunk: chunk.max(1) }
    }

    /// How many chunks the package has (an empty one has one, empty).
    pub fn chunks(&self) -> u64 {
        self.len.div_ceil(self.chunk).max(1)
    }

    /// Where chunk `index` starts in the stored object.
    pub fn stored_offset(&self, index: u64) -> u64 {
        index * (self.chunk + TAG)
    }

    /// The stored size of the package.
    pub fn stored_len(&self) -> u64 {
        self.len + self.chunks() * TAG
    }

    /// A fresh nonce prefix for a new package.
    ///
    /// # Errors
    /// `Invalid` when no randomness is available.
    pub fn new_prefix() -> Result<[u8; 8], SealError> {
        random::<8>()
    }

    fn nonce(&self, index: u64) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..8].copy_from_slice(&self.prefix);
        // A package holds at most 2^32 chunks (4 PiB).
        n[8..].copy_from_slice(&u32::try_from(index).unwrap_or(u32::MAX).to_be_bytes());
        n
    }

    fn aad(&self, index: u64) -> Vec<u8> {
        let last = index + 1 == self.chunks();
        let mut aad = Vec::with_capacity(self.package.len() + 9);
        aad.extend_from_slice(self.package.as_bytes());
        aad.extend_from_slice(&index.to_be_bytes());
        aad.push(u8::from(last));
        aad
    }

    /// Chunk `index` of the plaintext, sealed (its length plus [`TAG`]).
    ///
    /// # Errors
    /// `Invalid` if `plaintext` is not the chunk's length.
    pub fn seal(&self, index: u64, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        if plaintext.len() as u64 != self.chunk_len(index) {
            return Err(SealError::Invalid("a chunk is the chunk size, the last one the rest"));
        }
        self.cipher
            .encrypt(Nonce::from_slice(&self.nonce(index)), Payload { msg: plaintext, aad: &self.aad(index) })
            .map_err(|_| SealError::Invalid("sealing failed"))
    }

    /// The plaintext of sealed chunk `index`.
    ///
    /// # Errors
    /// `Tampered` for anything but that chunk as [`Sealer::seal`] wrote it.
    pub fn open(&self, index: u64, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() as u64 != self.chunk_len(index) + TAG {
            return Err(SealError::Tampered(index));
        }
        self.cipher
            .decrypt(Nonce::from_slice(&self.nonce(index)), Payload { msg: sealed, aad: &self.aad(index) })
            .map_err(|_| SealError::Tampered(index))
    }

    /// The plaintext length of chunk `index`.
    pub fn chunk_len(&self, index: u64) -> u64 {
        let start = index * self.chunk;
        self.len.saturating_sub(start).min(self.chunk)
    }

    /// The chunks a plaintext byte range touches.
    ///
    /// # Errors
    /// `OutOfRange` for an empty range or one past the end.
    pub fn chunks_of(&self, bytes: &Range<u64>) -> Result<Range<u64>, SealError> {
        if bytes.start >= bytes.end || bytes.end > self.len {
            return Err(SealError::OutOfRange { start: bytes.start, end: bytes.end, len: self.len });
        }
        Ok(bytes.start / self.chunk..(bytes.end - 1) / self.chunk + 1)
    }

    /// The part of chunk `index`'s plaintext that falls in `bytes`.
    pub fn slice<'a>(&self, index: u64, plaintext: &'a [u8], bytes: &Range<u64>) -> &'a [u8] {
        let start = index * self.chunk;
        let from = usize::try_from(bytes.start.saturating_sub(start)).unwrap_or(usize::MAX).min(plaintext.len());
        let to = usize::try_from(bytes.end.saturating_sub(start)).unwrap_or(usize::MAX).min(plaintext.len());
        &plaintext[from..to.max(from)]
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const OLD: &str = "0000000000000000000000000000000000000000000000000000000000000001";
    const NEW: &str = "0000000000000000000000000000000000000000000000000000000000000002";

    /// Small chunks in the tests: many borders in little data.
    const TEST_CHUNK: u64 = 4096;

    fn seal_all(s: &Sealer, data: &[u8]) -> Vec<Vec<u8>> {
        (0..s.chunks())
            .map(|i| {
                let start = usize::try_from(i * s.chunk).unwrap();
                let end = (start + usize::try_from(s.chunk).unwrap()).min(data.len());
                s.seal(i, &data[start..end]).unwrap()
            })
            .collect()
    }

    fn read(s: &Sealer, stored: &[Vec<u8>], bytes: Range<u64>) -> Result<Vec<u8>, SealError> {
        let mut out = Vec::new();
        for i in s.chunks_of(&bytes)? {
            let plain = s.open(i, &stored[usize::try_from(i).unwrap()])?;
            out.extend_from_slice(s.slice(i, &plain, &bytes));
        }
        Ok(out)
    }

    /// `len` bytes of a 251-byte pattern (prime, so no chunk border falls on a repeat).
    fn data(len: usize, seed: u8) -> Vec<u8> {
        let pattern: Vec<u8> = (0..251u8).map(|i| i.wrapping_mul(31).wrapping_add(seed)).collect();
        let mut out = Vec::with_capacity(len + 251);
        while out.len() < len {
            out.extend_from_slice(&pattern);
        }
        out.truncate(len);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any byte range, across chunk borders or not, reads back exactly that plaintext.
        #[test]
        fn any_range_decrypts_to_its_plaintext(len in 1usize..(20 * 4096 + 7), a in 0.0f64..1.0, b in 0.0f64..1.0) {
            let plain = data(len, 7);
            let s = Sealer::new(&[9; 32], [1; 8], "pkg-1", len as u64, TEST_CHUNK);
            let stored = seal_all(&s, &plain);
            prop_assert_eq!(stored.iter().map(|c| c.len() as u64).sum::<u64>(), s.stored_len());
            prop_assert_eq!(s.stored_offset(s.chunks()), s.chunks() * (TEST_CHUNK + TAG));
            let (x, y) = ((a * len as f64) as u64, (b * len as f64) as u64);
            let range = x.min(y)..(x.max(y) + 1).min(len as u64);
            let got = read(&s, &stored, range.clone()).unwrap();
            prop_assert_eq!(&got[..], &plain[usize::try_from(range.start).unwrap()..usize::try_from(range.end).unwrap()]);
        }
    }

    #[test]
    fn a_flipped_byte_a_moved_chunk_another_package_or_a_cut_are_refused() {
        let len = 2 * TEST_CHUNK + 100;
        let plain = data(usize::try_from(len).unwrap(), 3);
        let s = Sealer::new(&[5; 32], [2; 8], "pkg-a", len, TEST_CHUNK);
        let stored = seal_all(&s, &plain);
        // A flipped byte.
        let mut bad = stored[1].clone();
        bad[1000] ^= 1;
        assert_eq!(s.open(1, &bad), Err(SealError::Tampered(1)));
        // Chunk 0 served as chunk 1 (same length).
        assert_eq!(s.open(1, &stored[0]), Err(SealError::Tampered(1)));
        // The same bytes under another package's name.
        let other = Sealer::new(&[5; 32], [2; 8], "pkg-b", len, TEST_CHUNK);
        assert_eq!(other.open(0, &stored[0]), Err(SealError::Tampered(0)));
        // Cut after two whole chunks: the second is not the last, so the shorter package's
        // reader refuses it.
        let cut = Sealer::new(&[5; 32], [2; 8], "pkg-a", 2 * TEST_CHUNK, TEST_CHUNK);
        assert_eq!(cut.open(1, &stored[1]), Err(SealError::Tampered(1)));
        // Out of range.
        assert!(matches!(s.chunks_of(&(len..len + 1)), Err(SealError::OutOfRange { .. })));
        assert!(matches!(s.chunks_of(&(5..5)), Err(SealError::OutOfRange { .. })));
    }

    #[test]
    fn a_rotated_master_key_rewraps_the_data_key_and_the_package_still_opens() {
        let old = MasterKeys::new([("m1", OLD)], "m1").unwrap();
        let (key, wrapped) = old.new_data_key().unwrap();
        assert_eq!(wrapped.master, "m1");
        let plain = data(5000, 1);
        let s = Sealer::new(&key, [3; 8], "pkg-r", 5000, TEST_CHUNK);
        let stored = seal_all(&s, &plain);

        // Both keys configured, the new one current: old records unwrap, and are rewrapped.
        let both = MasterKeys::new([("m1", OLD), ("m2", NEW)], "m2").unwrap();
        let rewrapped = both.rewrap(&wrapped).unwrap();
        assert_eq!(rewrapped.master, "m2");
        assert_ne!(rewrapped.sealed, wrapped.sealed);
        // Once every record is rewrapped the old key can go.
        let new_only = MasterKeys::new([("m2", NEW)], "m2").unwrap();
        let key2 = new_only.unwrap_key(&rewrapped).unwrap();
        assert_eq!(read(&Sealer::new(&key2, [3; 8], "pkg-r", 5000, TEST_CHUNK), &stored, 0..5000).unwrap(), plain);
        assert_eq!(new_only.unwrap_key(&wrapped), Err(SealError::UnknownMasterKey("m1".into())));
        // A wrapped key altered, or claimed by another master key, is refused.
        let mut forged = rewrapped.clone();
        forged.master = "m1".into();
        assert_eq!(both.unwrap_key(&forged), Err(SealError::BadWrappedKey("m1".into())));
        assert!(MasterKeys::new([("m1", "abcd")], "m1").is_err());
        assert!(MasterKeys::new([("m1", OLD)], "m9").is_err());
        assert!(!format!("{both:?}").contains(OLD), "Debug never shows a key");
    }

    #[test]
    fn two_packages_never_share_a_nonce() {
        let a = Sealer::new_prefix().unwrap();
        let b = Sealer::new_prefix().unwrap();
        assert_ne!(a, b);
        let s = Sealer::new(&[1; 32], a, "p", 3 * CHUNK, CHUNK);
        assert_ne!(s.nonce(0), s.nonce(1));
    }
}
