//! The `loadtest` binary: simulated fleets of cabinets and vehicles.

use clap::Parser;

/// Simulates fleets of cabinets and vehicles against a running system and reports latencies.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    Ok(())
}
