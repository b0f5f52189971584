//! Running a service binary: logging, the configuration's verdict, the runtime, the stop.

use std::future::Future;
use std::process::ExitCode;

use anyhow::Context;

/// Exit code for an unusable configuration (sysexits `EX_CONFIG`): a supervisor must not
/// restart in a loop on it.
pub const EX_CONFIG: u8 = 78;

/// Log targets held at `info` whatever the filter asks, because below it they print what must
/// never reach a log: the PostgreSQL client's `debug` lines carry every statement's parameters
/// (device keys, token hashes), whose values no masking in our own code can reach.
const SECRET_BEARING_TARGETS: &[&str] = &["tokio_postgres=info", "postgres_protocol=info"];

/// The log filter: `spec` (`RUST_LOG` syntax; `None`: `RUST_LOG`, else `info`) with the targets
/// of [`SECRET_BEARING_TARGETS`] held at `info`, so no level set by an operator logs a secret.
pub fn log_filter(spec: Option<&str>) -> tracing_subscriber::EnvFilter {
    let spec = spec.map(str::to_owned).or_else(|| std::env::var("RUST_LOG").ok()).unwrap_or_else(|| "info".into());
    let with_holds = std::iter::once(spec.as_str()).chain(SECRET_BEARING_TARGETS.iter().copied()).collect::<Vec<_>>();
    tracing_subscriber::EnvFilter::try_new(with_holds.join(","))
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(format!("info,{}", SECRET_BEARING_TARGETS.join(","))))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
}

/// Logs through `tracing` (and `log` records, bridged): `RUST_LOG` filters (default `info`),
/// through [`log_filter`]; JSON lines when asked (for log collectors), text otherwise; on stderr.
pub fn init_logging(json: bool) {
    // Logs go to stderr: stdout is a command's output (`device-svc keys create` prints a key).
    let builder = tracing_subscriber::fmt().with_env_filter(log_filter(None)).with_writer(std::io::stderr);
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn no_filter_lets_the_postgres_client_log_below_info() {
        for spec in ["trace", "debug,tokio_postgres=trace", "tokio_postgres=trace,postgres_protocol=debug"] {
            let capture = Capture::default();
            let sink = capture.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter(log_filter(Some(spec)))
                .with_writer(move || sink.clone())
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                tracing::debug!(target: "tokio_postgres::query", "executing statement s1 with parameters: [secret]");
                tracing::debug!(target: "postgres_protocol", "secret too");
                tracing::info!(target: "tokio_postgres", "connection closed");
                tracing::debug!(target: "gateway", "ours at debug");
            });
            let logged = String::from_utf8_lossy(&capture.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
                .into_owned();
            assert!(!logged.contains("secret"), "{spec}: {logged}");
            assert!(logged.contains("connection closed"), "{spec}: info still passes");
            assert_eq!(
                logged.contains("ours at debug"),
                spec.starts_with("trace") || spec.starts_with("debug"),
                "{spec}"
            );
        }
    }
}
