//! The `device-svc` binary: configuration, logging, start, and a clean stop on SIGTERM or SIGINT.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use device_svc::DeviceService;
use device_svc::config::{Config, DEFAULT_TOML, ENV_VARS};

/// Device registry and status, weight streams, commands to devices and purchases behind an
/// HTTP API; consumes the gateways' upstream streams in a consumer group shared by every
/// instance.
///
/// Settings come from the TOML file (`--print-default-config` shows every key with its unit
/// and default), then DEVICE_SVC_* environment variables, then these flags.
#[derive(Debug, Parser)]
#[command(version, about, after_help = env_help())]
struct Args {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<String>,
    /// Print the default configuration (documented) and exit.
    #[arg(long)]
    print_default_config: bool,
    /// This instance's name (consumer name and reply stream; default: host name and pid).
    #[arg(long)]
    instance_id: Option<String>,
    /// HTTP API listener, host:port.
    #[arg(long)]
    http_listen: Option<String>,
    /// PostgreSQL URL, e.g. postgres://postgres@127.0.0.1:5432/iotgw.
    #[arg(long)]
    database_url: Option<String>,
    /// Redis URL, e.g. redis://127.0.0.1:6379/.
    #[arg(long)]
    redis_url: Option<String>,
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
        (&args.instance_id, &mut config.instance_id),
        (&args.http_listen, &mut config.http.listen),
        (&args.database_url, &mut config.postgres.url),
        (&args.redis_url, &mut config.redis.url),
    ];
    for (flag, target) in flags {
        if let Some(v) = flag {
            target.clone_from(v);
        }
    }
    Ok(config.validate()?)
}

async fn run(config: Config) -> anyhow::Result<()> {
    let service = DeviceService::start(config).await.context("failed to start the device service")?;
    let signal = service_kit::run::wait_for_signal().await?;
    tracing::info!(signal, "shutting down");
    service.stop().await;
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
    service_kit::run::main("device-svc", args.log_json, || load_config(&args), run)
}
