//! What the gateway and the device service do the same way at their edges, kept in one place
//! so that operators meet one behaviour: TOML configuration with unknown keys refused,
//! environment overrides listed in `--help`, logs through `tracing` (text or JSON lines), a
//! clean stop on SIGTERM or SIGINT, and exit code 78 (sysexits `EX_CONFIG`) for a
//! configuration that cannot be used.
//!
//! - [`config`]: reading configuration files and values;
//! - [`run`]: running a service binary from parsed flags to exit code;
//! - [`tls`]: TLS server configuration from PEM files.

pub mod config;
pub mod run;
pub mod tls;

pub use config::ConfigError;
