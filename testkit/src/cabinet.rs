//! A cabinet speaking SPEC.md part 1 through the protocol crate's codec, for tests that need
//! to control every frame (the load harness has an autonomous one).

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use protocol::DeviceId;
use protocol::cabinet::{CabinetCodec, Flags, Frame, Login, LoginResult, Message};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

/// A cabinet speaking SPEC.md part 1 through the protocol crate's codec.
#[derive(Debug)]
pub struct Cabinet {
    /// The framed connection, for tests that need raw access.
    pub framed: Framed<TcpStream, CabinetCodec>,
    /// Its device id.
    pub id: DeviceId,
    seq: u32,
}

#[allow(clippy::unwrap_used, missing_docs)] // a test helper: a failure is the test's failure
impl Cabinet {
    /// Connects without logging in.
    pub async fn connect(addr: SocketAddr, id: &DeviceId) -> Self {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        Self { framed: Framed::new(tcp, CabinetCodec::default()), id: id.clone(), seq: 0 }
    }

    /// Connects and logs in; returns the client and the gateway's answer.
    pub async fn login(addr: SocketAddr, id: &DeviceId, secret: &[u8]) -> (Self, LoginResult) {
        let mut c = Self::connect(addr, id).await;
        let login = Login::sign(id.clone(), "1.0.0", crate::login_time_ms(), secret).unwrap();
        let seq = c.send(Message::Login(login)).await;
        let frame = c.recv().await.expect("login answered");
        assert_eq!(frame.seq, seq);
        let Message::LoginResult(r) = frame.message else { panic!("expected LOGIN_RESULT, got {frame:?}") };
        (c, r)
    }

    /// The next sequence number this cabinet originates.
    pub fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    /// Sends a message in a frame of its own; returns the frame's seq.
    pub async fn send(&mut self, message: Message) -> u32 {
        let seq = self.next_seq();
        self.send_frame(Frame::new(seq, message)).await;
        seq
    }

    /// Sends a message with `ACK_REQUESTED` set; returns the frame's seq.
    pub async fn send_frame_ack(&mut self, message: Message) -> u32 {
        let seq = self.next_seq();
        self.send_frame(Frame { seq, flags: Flags(Flags::ACK_REQUESTED), message }).await;
        seq
    }

    /// Sends a frame as given.
    pub async fn send_frame(&mut self, frame: Frame) {
        self.framed.send(frame).await.expect("send");
    }

    /// Sends raw bytes.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.framed.get_mut().write_all(bytes).await.expect("send raw");
    }

    /// The next frame, or `None` when the gateway closed the connection.
    pub async fn recv(&mut self) -> Option<Frame> {
        match tokio::time::timeout(crate::WAIT, self.framed.next()).await.expect("gateway answered in time") {
            Some(Ok(Ok(frame))) => Some(frame),
            Some(Ok(Err(e))) => panic!("gateway sent an invalid frame: {e}"),
            Some(Err(_)) | None => None,
        }
    }

    /// The next frame matching `pred`, skipping others.
    pub async fn recv_matching(&mut self, what: &str, pred: impl Fn(&Frame) -> bool) -> Frame {
        loop {
            let frame = self.recv().await.unwrap_or_else(|| panic!("closed while waiting for {what}"));
            if pred(&frame) {
                return frame;
            }
        }
    }

    /// Waits until the gateway closes the connection; returns every frame received meanwhile.
    pub async fn until_closed(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(f) = self.recv().await {
            frames.push(f);
        }
        frames
    }
}
