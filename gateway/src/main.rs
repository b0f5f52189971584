//! The `gateway` binary: holds cabinet (binary TCP) and vehicle (MQTT) connections.

use clap::Parser;

/// Holds long-lived cabinet and vehicle connections and routes commands to them through the
/// Redis connection map.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    Ok(())
}
