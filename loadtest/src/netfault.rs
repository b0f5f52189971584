//! A bad network in user space: a TCP relay that delays everything it forwards and, now and
//! then, forwards nothing for a while. The fault suite puts it between devices and a gateway
//! node where `tc netem` is not available (a kernel without `sch_netem`). Packet loss on a TCP
//! link shows up to both ends as added delay and stalls (the segment is sent again), which is
//! what this relay produces; it never drops bytes of a connection it keeps.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the relay does.
#[derive(Debug, Clone, Args)]
pub struct NetFaultPlan {
    /// Where devices connect (repeat; each pairs with the `--upstream` in the same position).
    #[arg(long = "listen", required = true)]
    pub listen: Vec<SocketAddr>,
    /// Where the relay forwards to.
    #[arg(long = "upstream", required = true)]
    pub upstream: Vec<SocketAddr>,
    /// Added to every chunk, each way, ms.
    #[arg(long, default_value_t = 150)]
    pub delay_ms: u64,
    /// Up to this much more, at random, ms (chunks still arrive in order).
    #[arg(long, default_value_t = 100)]
    pub jitter_ms: u64,
    /// Time between two stalls, s (0: none).
    #[arg(long, default_value_t = 15)]
    pub stall_every_s: u64,
    /// How long a stall lasts, ms: nothing is forwarded either way meanwhile.
    #[arg(long, default_value_t = 4000)]
    pub stall_ms: u64,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub max_duration_s: u64,
}

/// Relays until `stop` or `max_duration_s`.
///
/// # Errors
/// If a listener cannot be bound, or `--listen` and `--upstream` differ in number.
pub async fn run(plan: NetFaultPlan, stop: CancellationToken) -> anyhow::Result<()> {
    anyhow::ensure!(plan.listen.len() == plan.upstream.len(), "one --upstream per --listen");
    let stalled = Arc::new(AtomicBool::new(false));
    let plan = Arc::new(plan);
    let mut listeners = Vec::new();
    for (listen, upstream) in plan.listen.iter().zip(&plan.upstream) {
        let listener = TcpListener::bind(listen).await?;
        listeners.push(tokio::spawn(accept(
            listener,
            *upstream,
            Arc::clone(&plan),
            Arc::clone(&stalled),
            stop.clone(),
        )));
    }
    let stalls = tokio::spawn(toggle_stalls(Arc::clone(&plan), Arc::clone(&stalled), stop.clone()));
    tokio::select! {
        () = stop.cancelled() => {}
        () = tokio::time::sleep(Duration::from_secs(plan.max_duration_s)) => stop.cancel(),
    }
    stalls.abort();
    for l in listeners {
        l.abort();
    }
    Ok(())
}

async fn toggle_stalls(plan: Arc<NetFaultPlan>, stalled: Arc<AtomicBool>, stop: CancellationToken) {
    if plan.stall_every_s == 0 {
        return;
    }
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(plan.stall_every_s)) => {}
            () = stop.cancelled() => return,
        }
        stalled.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(plan.stall_ms)).await;
        stalled.store(false, Ordering::Relaxed);
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    plan: Arc<NetFaultPlan>,
    stalled: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    loop {
        let Ok((device, _)) = listener.accept().await else { continue };
        let Ok(server) = TcpStream::connect(upstream).await else { continue };
        let _ = device.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (dr, dw) = device.into_split();
        let (sr, sw) = server.into_split();
        let conn = stop.child_token();
        tokio::spawn(direction(dr, sw, Arc::clone(&plan), Arc::clone(&stalled), conn.clone()));
        tokio::spawn(direction(sr, dw, Arc::clone(&plan), Arc::clone(&stalled), conn));
    }
}

/// Forwards one direction: each chunk read is due `delay + jitter` later, and waits out any
/// stall; order is kept. Either side closing ends both directions.
async fn direction(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    plan: Arc<NetFaultPlan>,
    stalled: Arc<AtomicBool>,
    conn: CancellationToken,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Bytes)>();
    let writer = {
        let conn = conn.clone();
        tokio::spawn(async move {
            let mut last_due = Instant::now();
            while let Some((due, chunk)) = rx.recv().await {
                // Never before the previous chunk: in order, like TCP.
                last_due = last_due.max(due);
                tokio::time::sleep_until(last_due).await;
                while stalled.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if to.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            let _ = to.shutdown().await;
            conn.cancel();
        })
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
            () = conn.cancelled() => break,
        };
        let jitter = if plan.jitter_ms > 0 { fastrand::u64(0..=plan.jitter_ms) } else { 0 };
        let due = Instant::now() + Duration::from_millis(plan.delay_ms + jitter);
        if tx.send((due, Bytes::copy_from_slice(&buf[..n]))).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}
