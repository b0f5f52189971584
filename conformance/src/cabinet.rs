//! A cabinet as a vendor writes it from SPEC.md part 1: frames built and read by hand.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{KeyInit, Mac};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long the cabinet waits for an answer before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// Message types (SPEC.md 1.5).
pub mod kind {
    /// `LOGIN`
    pub const LOGIN: u8 = 0x01;
    /// `HEARTBEAT`
    pub const HEARTBEAT: u8 = 0x02;
    /// `WEIGHT_REPORT`
    pub const WEIGHT_REPORT: u8 = 0x03;
    /// `DOOR_EVENT`
    pub const DOOR_EVENT: u8 = 0x04;
    /// `HELLO`
    pub const HELLO: u8 = 0x06;
    /// `LOGIN_RESULT`
    pub const LOGIN_RESULT: u8 = 0x81;
    /// `HEARTBEAT_ACK`
    pub const HEARTBEAT_ACK: u8 = 0x82;
    /// `ACK`
    pub const ACK: u8 = 0x83;
    /// `COMMAND`
    pub const COMMAND: u8 = 0x84;
    /// `NOTICE`
    pub const NOTICE: u8 = 0x85;
    /// `CHALLENGE`
    pub const CHALLENGE: u8 = 0x86;
    /// `ERROR`
    pub const ERROR: u8 = 0xFF;
}

/// `LOGIN_RESULT` statuses (SPEC.md 1.7).
pub mod status {
    /// `Accepted`
    pub const ACCEPTED: u8 = 0;
    /// `BadTag`
    pub const BAD_TAG: u8 = 1;
    /// `UnknownDevice`
    pub const UNKNOWN_DEVICE: u8 = 2;
    /// `Busy`
    pub const BUSY: u8 = 4;
    /// `Disabled`
    pub const DISABLED: u8 = 5;
    /// `LoginVersion`
    pub const LOGIN_VERSION: u8 = 7;
    /// `Replayed`
    pub const REPLAYED: u8 = 8;
}

/// Flag bit 0 (SPEC.md 1.4).
pub const ACK_REQUESTED: u8 = 0x01;

/// Wall clock in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

/// One frame as read off the wire (SPEC.md 1.3), CRC already checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// The type byte.
    pub kind: u8,
    /// The flags byte.
    pub flags: u8,
    /// The sequence number.
    pub seq: u32,
    /// The payload.
    pub payload: Vec<u8>,
}

/// Builds a frame: header, payload, CRC-32C over both, all big-endian.
pub fn frame(kind: u8, flags: u8, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0xCA, 0xB1, 0x01, kind, flags];
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&u16::try_from(payload.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// A `str8` field.
pub fn str8(s: &str) -> Vec<u8> {
    let mut out = vec![u8::try_from(s.len()).unwrap_or(u8::MAX)];
    out.extend_from_slice(s.as_bytes());
    out
}

/// A `LOGIN` payload: device id, firmware, device time, the nonce for login version 2, and the
/// HMAC-SHA256 tag under the 32 decoded secret bytes.
pub fn login_payload(id: &str, device_time_ms: u64, nonce: Option<&[u8]>, secret: &[u8]) -> Vec<u8> {
    let mut signed = str8(id);
    signed.extend(str8("9.9.9"));
    signed.extend_from_slice(&device_time_ms.to_be_bytes());
    if let Some(nonce) = nonce {
        signed.extend_from_slice(nonce);
    }
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret).expect("any key length");
    mac.update(&signed);
    signed.extend_from_slice(&mac.finalize().into_bytes());
    signed
}

/// A `DOOR_EVENT` payload.
pub fn door_event(door: u8, open: bool, event_time_ms: u64, order: &str) -> Vec<u8> {
    let mut p = vec![door, u8::from(open)];
    p.extend_from_slice(&event_time_ms.to_be_bytes());
    p.extend(str8(order));
    p
}

/// A cabinet's connection.
#[derive(Debug)]
pub struct VendorCabinet {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Its device id.
    pub id: String,
    seq: u32,
}

#[allow(clippy::unwrap_used, clippy::missing_panics_doc)] // a test client: a failure is the test's
impl VendorCabinet {
    /// Connects without sending anything.
    pub async fn connect(addr: SocketAddr, id: &str) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Self { stream, buf: Vec::new(), id: id.to_owned(), seq: 0 }
    }

    /// The next sequence number this cabinet originates.
    pub fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    /// Writes bytes as they are, in one write.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Sends one frame with a new seq; returns the seq.
    pub async fn send(&mut self, kind: u8, flags: u8, payload: &[u8]) -> u32 {
        let seq = self.next_seq();
        self.send_raw(&frame(kind, flags, seq, payload)).await;
        seq
    }

    /// The next frame, `None` once the gateway closed; `Err` after `within` without either.
    pub async fn recv_within(&mut self, within: Duration) -> Result<Option<RawFrame>, tokio::time::error::Elapsed> {
        tokio::time::timeout(within, self.read_frame()).await
    }

    /// The next frame, or `None` once the gateway closed; fails the test after [`WAIT`].
    pub async fn recv(&mut self) -> Option<RawFrame> {
        self.recv_within(WAIT).await.expect("the gateway answers")
    }

    /// The next frame of `kind`, skipping others (heartbeat answers, notices); fails the test
    /// if the connection closes first.
    pub async fn recv_kind(&mut self, kind: u8) -> RawFrame {
        loop {
            let f = self.recv().await.unwrap_or_else(|| panic!("closed while waiting for type {kind:#04x}"));
            if f.kind == kind {
                return f;
            }
        }
    }

    /// `true` once the gateway closed the connection within `within` (frames before are skipped).
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.read_frame()).await {
                Ok(None) => return true,
                Ok(Some(_)) => {}
                Err(_) => return false,
            }
        }
    }

    async fn read_frame(&mut self) -> Option<RawFrame> {
        loop {
            if self.buf.len() >= 11 {
                let len = usize::from(u16::from_be_bytes([self.buf[9], self.buf[10]]));
                if self.buf.len() >= 15 + len {
                    let whole: Vec<u8> = self.buf.drain(..15 + len).collect();
                    assert_eq!(&whole[..3], &[0xCA, 0xB1, 0x01], "magic and version");
                    let crc = u32::from_be_bytes(whole[11 + len..].try_into().unwrap());
                    assert_eq!(crc, crc32c::crc32c(&whole[..11 + len]), "CRC of a gateway frame");
                    return Some(RawFrame {
                        kind: whole[3],
                        flags: whole[4],
                        seq: u32::from_be_bytes(whole[5..9].try_into().unwrap()),
                        payload: whole[11..11 + len].to_vec(),
                    });
                }
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Sends a version-1 `LOGIN` stamped `device_time_ms`; returns the `LOGIN_RESULT` status
    /// and the frame's bytes (what an eavesdropper records).
    pub async fn login_v1_at(&mut self, secret: &[u8], device_time_ms: u64) -> (u8, Vec<u8>) {
        let seq = self.next_seq();
        let bytes = frame(kind::LOGIN, 0, seq, &login_payload(&self.id.clone(), device_time_ms, None, secret));
        self.send_raw(&bytes).await;
        (self.login_status(seq).await, bytes)
    }

    /// [`VendorCabinet::login_v1_at`] with the current time (later than any login before it in
    /// this process, as a real cabinet's clock would be).
    pub async fn login_v1(&mut self, secret: &[u8]) -> (u8, Vec<u8>) {
        self.login_v1_at(secret, testkit::login_time_ms()).await
    }

    /// `HELLO`; returns the `CHALLENGE`'s nonce.
    pub async fn hello(&mut self) -> [u8; 16] {
        let seq = self.send(kind::HELLO, 0, &[2]).await;
        let c = self.recv().await.expect("CHALLENGE");
        assert_eq!((c.kind, c.seq, c.payload.len()), (kind::CHALLENGE, seq, 25), "CHALLENGE answers HELLO");
        assert_eq!(c.payload[0], 2, "login version 2 chosen");
        c.payload[1..17].try_into().unwrap()
    }

    /// A version-2 login: `HELLO`, `CHALLENGE`, `LOGIN` with the nonce. Returns the status and
    /// the `LOGIN` frame's bytes.
    pub async fn login_v2(&mut self, secret: &[u8]) -> (u8, Vec<u8>) {
        let nonce = self.hello().await;
        let seq = self.next_seq();
        let bytes = frame(kind::LOGIN, 0, seq, &login_payload(&self.id.clone(), now_ms(), Some(&nonce), secret));
        self.send_raw(&bytes).await;
        (self.login_status(seq).await, bytes)
    }

    /// The status of the `LOGIN_RESULT` answering `seq`.
    pub async fn login_status(&mut self, seq: u32) -> u8 {
        let r = self.recv().await.expect("LOGIN_RESULT");
        assert_eq!((r.kind, r.seq, r.payload.len()), (kind::LOGIN_RESULT, seq, 13), "LOGIN_RESULT answers LOGIN");
        r.payload[0]
    }

    /// `retry_after_s` of a `LOGIN_RESULT` payload.
    pub fn retry_after_s(login_result: &RawFrame) -> u16 {
        u16::from_be_bytes([login_result.payload[11], login_result.payload[12]])
    }
}
