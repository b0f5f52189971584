//! Running a service binary: logging, the configuration's verdict, the runtime, the stop.

use std::future::Future;
use std::process::ExitCode;

use anyhow::Context;

/// Exit code for an unusable configuration (sysexits `EX_CONFIG`): a supervisor must not
/// restart in a loop on it.
pub const EX_CONFIG: u8 = 78;

/// Logs through `tracing`: `RUST_LOG` filters (default `info`); JSON lines when asked (for
/// log collectors), text otherwise.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Waits for SIGTERM (what Kubernetes and systemd send for a rolling release) or SIGINT;
/// returns which.
///
/// # Errors
/// The handlers could not be installed.
pub async fn wait_for_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("failed to install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("failed to install the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Runs binary `name`: starts logging, loads the configuration (exit 78 if it is unusable),
/// builds a multi-threaded runtime and runs `serve` on it; a failure is logged and exits 1.
pub fn main<C, F, Fut>(name: &str, log_json: bool, load: impl FnOnce() -> anyhow::Result<C>, serve: F) -> ExitCode
where
    F: FnOnce(C) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    init_logging(log_json);
    let config = match load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: failed to start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "{name} failed");
            ExitCode::FAILURE
        }
    }
}
