//! The `gateway` binary: configuration, logging, start, and a drain on SIGTERM or SIGINT.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use gateway::Gateway;
use gateway::config::{Config, DEFAULT_TOML, ENV_VARS};

/// Holds long-lived cabinet (binary TCP/TLS) and vehicle (MQTT) connections and routes
/// commands to them through the Redis connection map shared by all gateway nodes.
///
/// Settings come from the TOML file (`--print-default-config` shows every key with its unit
/// and default), then GATEWAY_* environment variables, then these flags.
#[derive(Debug, Parser)]
#[command(version, about, after_help = env_help())]
struct Args {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<String>,
    /// Print the default configuration (documented) and exit.
    #[arg(long)]
    print_default_config: bool,
    /// This node's id in the connection map (default: the host name).
    #[arg(long)]
    node_id: Option<String>,
    /// Redis URL, e.g. redis://127.0.0.1:6379/.
    #[arg(long)]
    redis_url: Option<String>,
    /// Cabinet listener, host:port ("" = off).
    #[arg(long)]
    cabinet_listen: Option<String>,
    /// MQTT listener, host:port ("" = off).
    #[arg(long)]
    mqtt_listen: Option<String>,
    /// Metrics listener, host:port ("" = off).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn env_help() -> String {
    service_kit::config::env_help(ENV_VARS)
}

fn load_config(args: &Args) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    config.apply_env(|name| std::env::var(name).ok());
    let flags = [
        (&args.node_id, &mut config.node_id),
        (&args.redis_url, &mut config.redis.url),
        (&args.cabinet_listen, &mut config.cabinet.listen),
        (&args.mqtt_listen, &mut config.mqtt.listen),
        (&args.metrics_listen, &mut config.metrics.listen),
    ];
    for (flag, target) in flags {
        if let Some(v) = flag {
            target.clone_from(v);
        }
    }
    Ok(config.validate()?)
}

async fn run(config: Config) -> anyhow::Result<()> {
    let gateway = Gateway::start(config).await.context("failed to start the gateway")?;
    let signal = service_kit::run::wait_for_signal().await?;
    tracing::info!(signal, "shutting down");
    gateway.stop().await;
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_default_config {
        #[allow(clippy::print_stdout)] // the binary's own output, not logging
        {
            print!("{DEFAULT_TOML}");
        }
        return ExitCode::SUCCESS;
    }
    service_kit::run::main("gateway", args.log_json, || load_config(&args), run)
}
