//! The `device-svc` binary: device registry, status, weights, purchases and vehicles.

use clap::Parser;

/// Device registry and status, weight streams, purchases and vehicle flows behind an HTTP API.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    Ok(())
}
