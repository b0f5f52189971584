//! One device connection's bytes: a TCP or TLS stream with read and write buffers that exist
//! only while they hold something.
//!
//! An idle cabinet sends 23 bytes every 30 s; keeping a few kilobytes of buffer for it all the
//! time would dominate the gateway's memory per connection. So reads on plain TCP wait for
//! readiness first and only then reserve a buffer, and both buffers are released once empty.
//! (TLS streams keep rustls's own buffers regardless; their cost is in BENCHMARKS.md.)

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// Bytes reserved for one read.
const READ_CHUNK: usize = 1024;

/// The socket under a connection.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS over TCP (boxed: much larger than a `TcpStream`).
    Tls(Box<TlsStream<TcpStream>>),
}

/// Why a write did not complete.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The peer did not take the bytes within the write timeout: a slow reader.
    #[error("failed to write within {0:?}: slow reader")]
    Timeout(Duration),
    /// The socket failed.
    #[error("failed to write: {0}")]
    Io(#[from] io::Error),
}

/// A device connection with lazily allocated buffers.
#[derive(Debug)]
pub struct Conn {
    stream: Stream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    write_timeout: Duration,
}

impl Conn {
    /// Wraps a stream.
    pub fn new(stream: Stream, write_timeout: Duration) -> Self {
        Self { stream, rbuf: BytesMut::new(), wbuf: BytesMut::new(), write_timeout }
    }

    /// The peer's address.
    pub fn peer(&self) -> io::Result<SocketAddr> {
        match &self.stream {
            Stream::Tcp(s) => s.peer_addr(),
            Stream::Tls(s) => s.get_ref().0.peer_addr(),
        }
    }

    /// The TLS session, if this is a TLS connection.
    pub fn tls(&self) -> Option<&rustls::ServerConnection> {
        match &self.stream {
            Stream::Tcp(_) => None,
            Stream::Tls(s) => Some(s.get_ref().1),
        }
    }

    /// Reads more bytes into the read buffer.
    ///
    /// # Returns
    /// The number of bytes read; 0 means the peer closed the connection.
    ///
    /// # Cancel safety
    /// Cancel safe: bytes are either in the read buffer or still in the socket.
    pub async fn fill(&mut self) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Tcp(s) => loop {
                s.readable().await?;
                if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 2 {
                    self.rbuf.reserve(READ_CHUNK);
                }
                match s.try_read_buf(&mut self.rbuf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            },
            Stream::Tls(s) => {
                if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 2 {
                    self.rbuf.reserve(READ_CHUNK);
                }
                s.read_buf(&mut self.rbuf).await
            }
        }
    }

    /// The bytes read and not yet decoded.
    pub fn read_buf(&mut self) -> &mut BytesMut {
        &mut self.rbuf
    }

    /// Gives the read buffer's memory back when everything in it has been decoded.
    pub fn release_read_buf(&mut self) {
        if self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
            self.rbuf = BytesMut::new();
        }
    }

    /// Where outgoing frames are encoded; [`Conn::flush`] sends them.
    pub fn write_buf(&mut self) -> &mut BytesMut {
        &mut self.wbuf
    }

    /// Sends everything in the write buffer, then releases it.
    ///
    /// # Returns
    /// The number of bytes sent.
    ///
    /// # Errors
    /// [`WriteError::Timeout`] if the peer does not take the bytes within the write timeout,
    /// [`WriteError::Io`] if the socket fails. The connection should then be closed.
    pub async fn flush(&mut self) -> Result<usize, WriteError> {
        if self.wbuf.is_empty() {
            return Ok(0);
        }
        let n = self.wbuf.len();
        let write = async {
            match &mut self.stream {
                Stream::Tcp(s) => s.write_all(&self.wbuf).await,
                Stream::Tls(s) => {
                    s.write_all(&self.wbuf).await?;
                    s.flush().await
                }
            }
        };
        match tokio::time::timeout(self.write_timeout, write).await {
            Ok(Ok(())) => {
                self.wbuf = BytesMut::new();
                Ok(n)
            }
            Ok(Err(e)) => Err(WriteError::Io(e)),
            Err(_) => Err(WriteError::Timeout(self.write_timeout)),
        }
    }

    /// Closes the write side (TLS: sends close_notify), waiting at most a second.
    pub async fn close(&mut self) {
        let shutdown = async {
            match &mut self.stream {
                Stream::Tcp(s) => s.shutdown().await,
                Stream::Tls(s) => s.shutdown().await,
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), shutdown).await;
    }
}
