//! `account-consumer`: the reference account service consumer as a process (see the crate's
//! documentation). Runs until SIGTERM or SIGINT.

use anyhow::Context;
use clap::Parser;
use redis_conn::{RedisConn, RedisTarget};
use tokio_util::sync::CancellationToken;

/// Applies settlements, refunds and charges once each, in its own PostgreSQL ledger, and
/// answers each (`paid`, or `failed` with a reason).
#[derive(Debug, Parser)]
struct Args {
    /// Redis the device service publishes to.
    #[arg(long, env = "ACCOUNT_REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,
    /// The deployment's key prefix.
    #[arg(long, env = "ACCOUNT_KEY_PREFIX", default_value = "iotgw:")]
    key_prefix: String,
    /// PostgreSQL holding the ledger (table `account_ledger`, created if missing).
    #[arg(long, env = "ACCOUNT_DATABASE_URL")]
    database_url: String,
    /// This consumer's name in the group.
    #[arg(long, default_value = "account-1")]
    name: String,
    /// How often charges that failed (`insufficient_funds`) are tried again, ms.
    #[arg(long, env = "ACCOUNT_RETRY_MS", default_value_t = 5000)]
    retry_ms: u64,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let (pg, connection) = tokio_postgres::connect(&args.database_url, tokio_postgres::NoTls)
            .await
            .context("connecting to PostgreSQL")?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::error!(error = %e, "PostgreSQL connection ended");
            }
        });
        let redis =
            RedisConn::open(&RedisTarget::Single(args.redis_url.clone()), Some(std::time::Duration::from_secs(5)))
                .await
                .context("connecting to Redis")?;
        let consumer = account_ref::Consumer::new(pg, &args.key_prefix, &args.name)
            .await?
            .with_retry(std::time::Duration::from_millis(args.retry_ms));
        let stop = CancellationToken::new();
        let signal = stop.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            signal.cancel();
        });
        tracing::info!(prefix = %args.key_prefix, "account consumer running");
        consumer.run(redis, 1000, stop).await;
        anyhow::Ok(())
    })
}
