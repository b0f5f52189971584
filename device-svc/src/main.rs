//! The `device-svc` binary: configuration, logging, start, and a clean stop on SIGTERM or SIGINT.

use std::io::Write;
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
    /// Without a command: run the service.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// API keys, straight in PostgreSQL (the first operator key is made here; later ones too, or
    /// with POST /v1/keys). Applies pending migrations first.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, clap::Subcommand)]
enum KeysCommand {
    /// Creates a key and prints it on stdout (the only time it is shown).
    Create {
        /// operator, viewer, shop, owner_app or metrics.
        #[arg(long)]
        role: String,
        /// A name for people, e.g. shop-backend-prod.
        #[arg(long)]
        name: String,
        /// The tenant of a shop key.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Lists every key (never a secret) as JSON lines.
    List,
    /// Revokes a key by its id.
    Revoke {
        /// The key's id (the 16 hex characters after `iotk_`).
        id: String,
    },
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

/// `device-svc keys ...`: what it prints on stdout is the key itself (create) or JSON lines.
async fn keys(config: Config, command: &KeysCommand) -> anyhow::Result<()> {
    use device_svc::auth::keys::{self, NewKey};
    let pool = device_svc::db::pool(&device_svc::config::PostgresConfig { pool_size: 1, ..config.postgres.clone() })?;
    device_svc::db::migrate(&pool).await.context("failed to prepare the database")?;
    let client = pool.get().await.context("failed to connect to PostgreSQL")?;
    let mut out = std::io::stdout().lock();
    match command {
        KeysCommand::Create { role, name, tenant } => {
            let role = role.parse().map_err(|e: String| anyhow::anyhow!(e))?;
            let new = NewKey { name, role, tenant: tenant.as_deref(), created_by: "cli" };
            let issued = keys::create(&**client, &new).await?;
            tracing::info!(id = %issued.info.id, role = %role, "API key created");
            writeln!(out, "{}", issued.key)?;
        }
        KeysCommand::List => {
            for key in keys::list(&**client).await? {
                writeln!(out, "{}", serde_json::to_string(&key)?)?;
            }
        }
        KeysCommand::Revoke { id } => {
            let info = keys::revoke(&**client, id).await?;
            writeln!(out, "{}", serde_json::to_string(&info)?)?;
        }
    }
    Ok(())
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
    match &args.command {
        Some(Command::Keys(command)) => {
            service_kit::run::main("device-svc", args.log_json, || load_config(&args), |c| keys(c, command))
        }
        None => service_kit::run::main("device-svc", args.log_json, || load_config(&args), run),
    }
}
