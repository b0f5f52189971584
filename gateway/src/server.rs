//! Accept loops: admission (a connection limit and accept pacing), TLS handshakes, and one task
//! per connection, tracked so that the drain can wait for every session to finish.
//!
//! A reconnect storm (a node restarted, a network flap) must not starve the devices already
//! connected: the limit makes excess connections wait in the kernel backlog, and the pacing
//! spreads new logins (each costs a Redis round trip or two) over time.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::context::Ctx;
use crate::transport::{Conn, Stream};

/// Which protocol a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Cabinets (SPEC.md part 1).
    Cabinet,
    /// Vehicles (MQTT).
    Mqtt,
}

impl Protocol {
    /// The `protocol` metric label.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Cabinet => crate::cabinet::PROTOCOL,
            Protocol::Mqtt => crate::mqtt::PROTOCOL,
        }
    }
}

/// Admission control shared by the listeners of one protocol.
#[derive(Debug)]
pub struct Admission {
    limit: Arc<Semaphore>,
    /// Theoretical arrival time of the next accept (GCRA). A std mutex: a few arithmetic
    /// operations per accept, never held across an `.await`.
    next: Mutex<Instant>,
    interval: Duration,
    /// How far ahead of the rate a burst may run.
    burst: Duration,
}

impl Admission {
    /// At most `max_connections` at once and `rate_per_s` new ones per second (bursts of up to
    /// one second's worth).
    pub fn new(max_connections: usize, rate_per_s: u32) -> Self {
        Self {
            limit: Arc::new(Semaphore::new(max_connections)),
            next: Mutex::new(Instant::now()),
            interval: Duration::from_secs(1) / rate_per_s.max(1),
            burst: Duration::from_secs(1),
        }
    }

    /// How long to wait before the next accept to keep to the rate.
    fn pace(&self) -> Duration {
        let now = Instant::now();
        let mut next = self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let tat = (*next).max(now) + self.interval;
        *next = tat;
        tat.saturating_duration_since(now + self.burst)
    }
}

/// One listening socket.
pub struct Listener {
    /// The bound socket.
    pub tcp: TcpListener,
    /// TLS on this listener.
    pub tls: Option<TlsAcceptor>,
    /// What it speaks.
    pub protocol: Protocol,
    /// Limits shared with the other listener of the same protocol.
    pub admission: Arc<Admission>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("tcp", &self.tcp)
            .field("tls", &self.tls.is_some())
            .field("protocol", &self.protocol)
            .finish()
    }
}

/// Connection-level accept errors that concern one connection only (the peer gave up before we
/// took it): skip them without delay.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// Accepts connections until `stop` is cancelled, spawning each session on `tracker`.
pub async fn run(listener: Listener, ctx: Arc<Ctx>, tracker: TaskTracker, stop: CancellationToken) {
    let label = listener.protocol.label();
    loop {
        let permit = match Arc::clone(&listener.admission.limit).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                ctx.metrics.admission_delays.with_label_values(&[label, "connection_limit"]).inc();
                tokio::select! {
                    p = Arc::clone(&listener.admission.limit).acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                    () = stop.cancelled() => return,
                }
            }
        };
        let wait = listener.admission.pace();
        if !wait.is_zero() {
            ctx.metrics.admission_delays.with_label_values(&[label, "accept_rate"]).inc();
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => return,
            }
        }
        let (tcp, peer) = tokio::select! {
            accepted = listener.tcp.accept() => match accepted {
                Ok(a) => a,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // EMFILE/ENFILE and the like: log, back off, keep the loop alive.
                    ctx.metrics.accept_errors.with_label_values(&[label]).inc();
                    tracing::error!(error = %e, protocol = label, "accept failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let _ = tcp.set_nodelay(true);
        ctx.metrics.connections_accepted.with_label_values(&[label]).inc();
        let guard = ConnGuard::new(permit, ctx.metrics.connections_open.with_label_values(&[label]));
        let span = tracing::info_span!("conn", %peer, protocol = label, device_id = tracing::field::Empty);
        let ctx = Arc::clone(&ctx);
        match listener.tls.clone() {
            // Plain TCP: the session future is the task itself, with no wrapper around it, so an
            // idle connection costs one allocation of exactly its protocol's state.
            None => {
                let conn = Conn::new(Stream::Tcp(tcp));
                match listener.protocol {
                    Protocol::Cabinet => tracker.spawn(crate::cabinet::serve(conn, ctx, guard).instrument(span)),
                    Protocol::Mqtt => tracker.spawn(crate::mqtt::serve(conn, ctx, None, guard).instrument(span)),
                };
            }
            Some(acceptor) => {
                tracker.spawn(handshake(tcp, acceptor, listener.protocol, ctx, guard).instrument(span));
            }
        }
    }
}

/// Held by a connection's task for its whole life: its admission permit and its place in the
/// open-connections gauge, both given back on drop.
#[derive(Debug)]
pub struct ConnGuard {
    _permit: OwnedSemaphorePermit,
    open: IntGauge,
}

impl ConnGuard {
    fn new(permit: OwnedSemaphorePermit, open: IntGauge) -> Self {
        open.inc();
        Self { _permit: permit, open }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// A TLS connection: handshake within the login deadline, then the protocol's session.
async fn handshake(tcp: TcpStream, acceptor: TlsAcceptor, protocol: Protocol, ctx: Arc<Ctx>, guard: ConnGuard) {
    let limit = Duration::from_millis(match protocol {
        Protocol::Cabinet => ctx.config.cabinet.login_timeout_ms,
        Protocol::Mqtt => ctx.config.mqtt.connect_timeout_ms,
    });
    // Boxed: a handshake's state is large and needed once.
    let stream = match tokio::time::timeout(limit, Box::pin(acceptor.accept(tcp))).await {
        Ok(Ok(s)) => Stream::Tls(Box::new(s)),
        Ok(Err(e)) => {
            ctx.metrics.tls_failures.with_label_values(&[protocol.label()]).inc();
            tracing::debug!(error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            ctx.metrics.tls_failures.with_label_values(&[protocol.label()]).inc();
            tracing::debug!("TLS handshake timed out");
            return;
        }
    };
    let conn = Conn::new(stream);
    match protocol {
        Protocol::Cabinet => crate::cabinet::serve(conn, ctx, guard).await,
        Protocol::Mqtt => {
            let cert_vin = conn.tls().and_then(crate::tls::client_vin);
            crate::mqtt::serve(conn, ctx, cert_vin, guard).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pacing_allows_a_burst_then_the_rate() {
        let a = Admission::new(10, 100);
        // One second's worth (100) passes without waiting...
        for _ in 0..100 {
            assert!(a.pace().is_zero());
        }
        // ...then each further accept waits one interval more.
        assert_eq!(a.pace(), Duration::from_millis(10));
        assert_eq!(a.pace(), Duration::from_millis(20));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(a.pace().is_zero());
    }
}
