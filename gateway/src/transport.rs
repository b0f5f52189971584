//! One device connection's bytes: a TCP or TLS stream with read and write buffers that exist
//! only while they hold something.
//!
//! An idle cabinet sends 23 bytes every 30 s; keeping a few kilobytes of buffer for it all the
//! time would dominate the gateway's memory per connection. So reads on plain TCP wait for
//! readiness first and only then reserve a buffer, and both buffers are released once empty.
//! (TLS streams keep rustls's own buffers regardless; their cost is in BENCHMARKS.md, "TLS".)

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// Bytes reserved for one read.
const READ_CHUNK: usize = 1024;

/// What [`Conn::wait`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// This many bytes were read; 0 means the peer closed the connection.
    Read(usize),
    /// The socket can take queued bytes.
    Writable,
}

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
}

impl Conn {
    /// Wraps a stream.
    pub fn new(stream: Stream) -> Self {
        Self { stream, rbuf: BytesMut::new(), wbuf: BytesMut::new() }
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

    /// Whether bytes from the peer wait in the kernel, unread: asked of the socket itself
    /// (a non-blocking peek), not of the runtime's readiness, which after this process was
    /// paused may not have caught up yet (a `SIGSTOP`/`SIGCONT` interrupts the poll that would
    /// report it). For the idle check: bytes that arrived while this node was paused or starved
    /// are not silence.
    pub fn bytes_waiting(&self) -> bool {
        let tcp = match &self.stream {
            Stream::Tcp(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        };
        let mut one = [std::mem::MaybeUninit::<u8>::uninit()];
        matches!(socket2::SockRef::from(tcp).peek(&mut one), Ok(n) if n > 0)
    }

    /// Polls for bytes to arrive (and reads them into the read buffer) when `want_read`, or,
    /// when `want_write`, for the socket to take queued bytes again. Not reading is how a
    /// session applies backpressure: the peer's bytes wait in TCP.
    ///
    /// A poll function rather than an `async fn`: it keeps no state between polls (readiness
    /// wakers live in the socket's registration), so a session loop waiting on it carries no
    /// future for it at all (BENCHMARKS.md, memory).
    ///
    /// # Returns
    /// [`Event::Read`] with the number of bytes read (0: the peer closed), or
    /// [`Event::Writable`].
    pub fn poll_wait(&mut self, cx: &mut Context<'_>, want_read: bool, want_write: bool) -> Poll<io::Result<Event>> {
        match &mut self.stream {
            Stream::Tcp(s) => {
                if want_write && s.poll_write_ready(cx)?.is_ready() {
                    return Poll::Ready(Ok(Event::Writable));
                }
                if !want_read {
                    return Poll::Pending;
                }
                // Readiness first, so that an idle connection holds no read buffer while it waits.
                if s.poll_read_ready(cx)?.is_pending() {
                    if self.rbuf.is_empty() {
                        self.rbuf = BytesMut::new();
                    }
                    return Poll::Pending;
                }
                if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 2 {
                    self.rbuf.reserve(READ_CHUNK);
                }
                // A read through `AsyncRead` clears the readiness when it comes back short of the
                // buffer, so the next wait goes to the reactor rather than to a second `recv`
                // that would only say "nothing more": one system call per arrival, not two.
                let read = tokio_util::io::poll_read_buf(Pin::new(s), cx, &mut self.rbuf);
                // Readiness was stale: give the buffer back before waiting, or every idle
                // connection keeps one.
                if read.is_pending() && self.rbuf.is_empty() {
                    self.rbuf = BytesMut::new();
                }
                read.map_ok(Event::Read)
            }
            Stream::Tls(s) => {
                if want_write && s.get_ref().0.poll_write_ready(cx)?.is_ready() {
                    return Poll::Ready(Ok(Event::Writable));
                }
                if !want_read {
                    return Poll::Pending;
                }
                if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 2 {
                    self.rbuf.reserve(READ_CHUNK);
                }
                let read = tokio_util::io::poll_read_buf(Pin::new(&mut **s), cx, &mut self.rbuf);
                // Nothing arrived: as on TCP, an idle connection keeps no read buffer of its own.
                if read.is_pending() && self.rbuf.is_empty() {
                    self.rbuf = BytesMut::new();
                }
                read.map_ok(Event::Read)
            }
        }
    }

    /// [`Conn::poll_wait`] as a future, for the login phase.
    ///
    /// # Cancel safety
    /// Cancel safe: bytes are either in the read buffer or still in the socket.
    pub async fn wait(&mut self, want_write: bool) -> io::Result<Event> {
        std::future::poll_fn(|cx| self.poll_wait(cx, true, want_write)).await
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

    /// Where outgoing frames are encoded; [`Conn::try_flush`] or [`Conn::flush`] sends them.
    pub fn write_buf(&mut self) -> &mut BytesMut {
        &mut self.wbuf
    }

    /// Bytes queued and not yet taken by the socket (TLS: not yet past rustls either).
    pub fn pending_write(&self) -> usize {
        match &self.stream {
            Stream::Tcp(_) => self.wbuf.len(),
            // rustls may hold records it could not yet write to the socket.
            Stream::Tls(s) => self.wbuf.len() + usize::from(s.get_ref().1.wants_write()),
        }
    }

    /// Writes as much of the queue as the socket takes now, without waiting. What it does not
    /// take stays queued; the caller waits for [`Conn::writable`] and bounds how long and how
    /// much (a slow reader is disconnected, never buffered without limit).
    ///
    /// # Returns
    /// The number of bytes the socket took.
    ///
    /// # Errors
    /// The socket failed; close the connection.
    pub fn try_flush(&mut self) -> io::Result<usize> {
        use futures_util::FutureExt;
        let mut written = 0;
        match &mut self.stream {
            Stream::Tcp(s) => {
                while !self.wbuf.is_empty() {
                    match s.try_write(&self.wbuf) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(n) => {
                            written += n;
                            bytes::Buf::advance(&mut self.wbuf, n);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
            }
            Stream::Tls(s) => {
                // One poll each: whatever rustls takes is its to deliver; a pending write is
                // retried when the socket becomes writable.
                while !self.wbuf.is_empty() {
                    match s.write(&self.wbuf).now_or_never() {
                        Some(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                        Some(Ok(n)) => {
                            written += n;
                            bytes::Buf::advance(&mut self.wbuf, n);
                        }
                        Some(Err(e)) => return Err(e),
                        None => break,
                    }
                }
                if let Some(Err(e)) = s.flush().now_or_never() {
                    return Err(e);
                }
            }
        }
        if self.wbuf.is_empty() && self.wbuf.capacity() > 0 {
            self.wbuf = BytesMut::new();
        }
        Ok(written)
    }

    /// Sends everything in the write buffer within `limit`, then releases it. For the login and
    /// the end of a session; the session loop uses [`Conn::try_flush`] instead.
    ///
    /// # Returns
    /// The number of bytes sent.
    ///
    /// # Errors
    /// [`WriteError::Timeout`] if the peer does not take the bytes within `limit`,
    /// [`WriteError::Io`] if the socket fails. The connection should then be closed.
    pub async fn flush(&mut self, limit: Duration) -> Result<usize, WriteError> {
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
        match tokio::time::timeout(limit, write).await {
            Ok(Ok(())) => {
                self.wbuf = BytesMut::new();
                Ok(n)
            }
            Ok(Err(e)) => Err(WriteError::Io(e)),
            Err(_) => Err(WriteError::Timeout(limit)),
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::{Conn, Event, Stream};

    /// A connected pair: the client's stream and the server side as the gateway holds it.
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        (client, listener.accept().await.unwrap().0)
    }

    /// Polls once: the connection is idle, so the wait is pending.
    fn poll_idle(conn: &mut Conn) {
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(conn.poll_wait(&mut cx, true, false).is_pending());
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_read_buffer_after_traffic() {
        let (mut client, server) = tcp_pair().await;
        let mut conn = Conn::new(Stream::Tcp(server));
        client.write_all(b"hello").await.unwrap();
        assert_eq!(conn.wait(false).await.unwrap(), Event::Read(5));
        conn.read_buf().clear();
        poll_idle(&mut conn);
        assert_eq!(conn.read_buf().capacity(), 0);
    }

    #[tokio::test]
    async fn an_idle_tls_connection_holds_no_read_buffer_after_traffic() {
        let pki = testkit::pki::Pki::new("unused");
        let acceptor = crate::tls::acceptor(&pki.path("server.pem"), &pki.path("server.key"), None, false).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(pki.path("ca.pem")).unwrap()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (client, server) = tcp_pair().await;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = ServerName::try_from("localhost").unwrap();
        let (client, server) = tokio::join!(connector.connect(name, client), acceptor.accept(server));
        let (mut client, server) = (client.unwrap(), server.unwrap());
        let mut conn = Conn::new(Stream::Tls(Box::new(server)));
        client.write_all(b"hello").await.unwrap();
        client.flush().await.unwrap();
        assert_eq!(conn.wait(false).await.unwrap(), Event::Read(5));
        conn.read_buf().clear();
        poll_idle(&mut conn);
        assert_eq!(conn.read_buf().capacity(), 0);
    }
}
