//! The `loadtest` binary: simulated fleets of cabinets and vehicles against a running system,
//! spread over worker processes, with latency histograms and a JSON report.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args as ClapArgs, Parser, Subcommand};
use loadtest::{charts, compare, fleet, fleet_ids, hb_feed, summary, worker};
use serde_json::json;

/// Simulates fleets of cabinets (SPEC.md part 1) and vehicles (MQTT) against a running system
/// and reports connect, command and publish latencies and server memory. Every run is bounded
/// in time and count and stops by itself; targets must be local.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Connect a fleet, hold it, send commands; write a JSON report.
    Fleet(FleetArgs),
    /// The same MQTT fleet and publish load against Mosquitto and the gateway.
    MqttCompare {
        #[command(flatten)]
        fleet: FleetArgs,
        /// Port for the Mosquitto started for the comparison.
        #[arg(long, default_value_t = 18830)]
        mosquitto_port: u16,
    },
    /// Write the simulated fleet's credentials to Redis (fleet does this itself).
    Provision {
        #[arg(long, default_value = "redis://127.0.0.1:6379/")]
        redis_url: String,
        #[arg(long, default_value = "iotgw:")]
        key_prefix: String,
        #[arg(long, default_value_t = 0)]
        cabinets: usize,
        #[arg(long, default_value_t = 0)]
        vehicles: usize,
    },
    /// Write synthetic gateway heartbeat windows (SPEC.md 3.2) for a large fleet; report the
    /// silent devices' last heartbeats.
    HbFeed {
        #[command(flatten)]
        plan: hb_feed::HbFeedPlan,
        #[arg(long, default_value = "loadtest/results/hb-feed.json")]
        out: PathBuf,
    },
    /// A bad network in user space: relay TCP to a gateway with delay and stalls (the fault
    /// suite's stand-in for `tc netem`).
    NetFault(loadtest::netfault::NetFaultPlan),
    /// A lean single-threaded MQTT probe: CPU per operation of the given server processes
    /// (QoS 1 publishes, connect-subscribe-disconnect, idle connections); JSON on stdout.
    Probe(loadtest::probe::ProbePlan),
    /// A bare one-thread echo server, the floor `probe --load floor` measures against.
    EchoServer {
        /// Where to listen.
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Draw the PNG charts of an existing report again.
    Charts {
        /// The JSON report.
        report: PathBuf,
    },
    /// Internal: one worker process of a fleet.
    #[command(hide = true)]
    Worker {
        /// The worker's plan, JSON.
        plan: String,
    },
}

#[derive(Debug, Clone, ClapArgs)]
struct FleetArgs {
    /// Name of the run, recorded in the report.
    #[arg(long, default_value = "fleet")]
    label: String,
    /// Redis of the system under test.
    #[arg(long, default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,
    /// Key prefix of the system under test.
    #[arg(long, default_value = "iotgw:")]
    key_prefix: String,
    /// Gateway cabinet listener (repeat for several nodes).
    #[arg(long = "cabinet-addr")]
    cabinet_addrs: Vec<SocketAddr>,
    /// Gateway MQTT listener (repeat for several nodes).
    #[arg(long = "mqtt-addr")]
    mqtt_addrs: Vec<SocketAddr>,
    /// Cabinets to simulate.
    #[arg(long, default_value_t = 0)]
    cabinets: usize,
    /// Vehicles to simulate.
    #[arg(long, default_value_t = 0)]
    vehicles: usize,
    /// Worker processes (0: as few as the 20,000-file limit allows, 9,000 devices each).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Local source addresses for cabinets: 127.0.0.2 .. 127.0.0.(1+N).
    #[arg(long, default_value_t = 4)]
    source_ips: usize,
    /// New connections per second, whole fleet.
    #[arg(long, default_value_t = 2000)]
    ramp_per_s: u32,
    /// Cabinet heartbeat interval, seconds.
    #[arg(long, default_value_t = 30)]
    heartbeat_s: u64,
    /// How often a cabinet reports a closed door's weights, ms (the seed's 90 s; shorter turns
    /// the fleet into a steady stream of stable readings with no door traffic).
    #[arg(long, default_value_t = 90_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    closed_report_ms: u64,
    /// Cabinet login version (SPEC.md 1.7): 2 answers the gateway's challenge; 1 simulates
    /// firmware that signs only its clock.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    login_version: u8,
    /// Seconds to hold the connected fleet.
    #[arg(long, default_value_t = 30)]
    hold_s: u64,
    /// Commands per second during the hold.
    #[arg(long, default_value_t = 0)]
    commands_per_s: u32,
    /// Commands open a door for an order (shoppers take items; weights every 300 ms while
    /// open) instead of querying it.
    #[arg(long)]
    open_doors: bool,
    /// QoS 1 uplinks per second per vehicle.
    #[arg(long, default_value_t = 0.0)]
    publish_per_s: f64,
    /// Server process whose memory is measured (repeat).
    #[arg(long = "server-pid")]
    server_pids: Vec<u32>,
    /// Hard bound on the run, seconds (at most 14,400: a one-hour soak with its ramp and drain
    /// fits, a forgotten run still ends).
    #[arg(long, default_value_t = 600)]
    max_duration_s: u64,
    /// Where the JSON report goes.
    #[arg(long, default_value = "loadtest/results/fleet.json")]
    out: PathBuf,
    /// The device service's API (host:port), for --seed and the scenarios.
    #[arg(long)]
    api: Option<SocketAddr>,
    /// Register the fleet (products, cabinets with doors and lanes, vehicles) through the API.
    #[arg(long)]
    seed: bool,
    /// Purchase storm: open this many doors for orders at once when the hold starts.
    #[arg(long, default_value_t = 0)]
    purchases: usize,
    /// Activation wave: this many vehicles activate when the hold starts.
    #[arg(long, default_value_t = 0)]
    activations: usize,
    /// OTA campaign over every vehicle when the hold starts.
    #[arg(long)]
    ota: bool,
    /// Time between two steps of a simulated upgrade, ms.
    #[arg(long, default_value_t = 500)]
    ota_step_ms: u64,
    /// The campaign uploads a package of this many MiB and the vehicles really download it
    /// (0: an external descriptor, nothing downloaded).
    #[arg(long, default_value_t = 0)]
    ota_package_mib: u64,
    /// The campaign installs this stored package (uploaded beforehand) instead.
    #[arg(long)]
    ota_package_id: Option<String>,
    /// The campaign's waves, cumulative percentages (`5,50,100`).
    #[arg(long, value_delimiter = ',', default_value = "100")]
    ota_waves: Vec<u8>,
    /// The campaign pauses itself above this failure percentage (and is resumed by the harness).
    #[arg(long, default_value_t = 100)]
    ota_error_threshold: u8,
    /// Probability that a vehicle's download request is broken off at a random point.
    #[arg(long, default_value_t = 0.0)]
    ota_cut_ratio: f64,
    /// Share of vehicles whose first attempt fails installing (re-pushed attempts succeed).
    #[arg(long, default_value_t = 0.0)]
    ota_failure_ratio: f64,
    /// Download progress reports every this many ms (SPEC.md 2.3: about 10 s).
    #[arg(long, default_value_t = 10_000)]
    ota_progress_ms: u64,
    /// Connect over TLS, verifying the gateway against this PEM CA file; --cabinet-addr and
    /// --mqtt-addr are then the gateway's TLS listeners.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// The name the gateway's certificate must carry, whatever address is dialled.
    #[arg(long, default_value = "localhost", requires = "tls_ca")]
    tls_server_name: String,
}

impl FleetArgs {
    fn plan(&self) -> anyhow::Result<fleet::FleetPlan> {
        for addr in self.cabinet_addrs.iter().chain(&self.mqtt_addrs).chain(&self.api) {
            anyhow::ensure!(addr.ip().is_loopback(), "load tests target loopback only, not {addr}");
        }
        anyhow::ensure!(self.max_duration_s <= 14_400, "--max-duration-s is capped at 14400");
        Ok(fleet::FleetPlan {
            label: self.label.clone(),
            redis_url: self.redis_url.clone(),
            key_prefix: self.key_prefix.clone(),
            cabinet_addrs: self.cabinet_addrs.clone(),
            mqtt_addrs: self.mqtt_addrs.clone(),
            cabinets: self.cabinets,
            vehicles: self.vehicles,
            workers: self.workers,
            source_ips: self.source_ips,
            ramp_per_s: self.ramp_per_s,
            heartbeat_s: self.heartbeat_s,
            closed_report_ms: self.closed_report_ms,
            login_version: self.login_version,
            hold_s: self.hold_s,
            commands_per_s: self.commands_per_s,
            open_doors: self.open_doors,
            publish_per_s: self.publish_per_s,
            server_pids: self.server_pids.clone(),
            credentials: true,
            max_duration_s: self.max_duration_s,
            api: self.api,
            seed: self.seed,
            purchases: self.purchases,
            activations: self.activations,
            ota: self.ota,
            ota_step_ms: self.ota_step_ms,
            ota_options: loadtest::scenarios::OtaOptions {
                package_mib: self.ota_package_mib,
                package_id: self.ota_package_id.clone(),
                waves: self.ota_waves.clone(),
                error_threshold_pct: self.ota_error_threshold,
                resume_after_pause: true,
            },
            ota_vehicles: loadtest::worker::OtaVehicles {
                cut_ratio: self.ota_cut_ratio,
                failure_ratio: self.ota_failure_ratio,
                progress_ms: self.ota_progress_ms,
            },
            tls: self
                .tls_ca
                .clone()
                .map(|ca_file| loadtest::tls::TlsPlan { ca_file, server_name: self.tls_server_name.clone() }),
        })
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Cmd::EchoServer { listen } = &cli.command {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        return runtime.block_on(loadtest::probe::echo_server(*listen));
    }
    if let Cmd::Probe(plan) = &cli.command {
        // One thread, so that the probe costs one core at most and its own CPU is one figure.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let report = runtime.block_on(loadtest::probe::run(plan))?;
        // The report is the command's output, for the bench script to read.
        #[allow(clippy::print_stdout)]
        {
            println!("{report}");
        }
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Cmd::Worker { plan } => {
                let plan: worker::WorkerPlan = serde_json::from_str(&plan).context("invalid worker plan")?;
                worker::run(plan).await?;
            }
            Cmd::NetFault(plan) => {
                let stop = tokio_util::sync::CancellationToken::new();
                let signal = stop.clone();
                tokio::spawn(async move {
                    let _ = tokio::signal::ctrl_c().await;
                    signal.cancel();
                });
                loadtest::netfault::run(plan, stop).await?;
            }
            Cmd::Provision { redis_url, key_prefix, cabinets, vehicles } => {
                let client = redis::Client::open(redis_url)?;
                let mut con = client.get_multiplexed_async_connection().await?;
                fleet_ids::provision_credentials(&mut con, &protocol::bus::Keys::new(key_prefix), cabinets, vehicles)
                    .await?;
            }
            Cmd::HbFeed { plan, out } => {
                let result = hb_feed::run(&plan).await?;
                std::fs::write(&out, serde_json::to_string_pretty(&json!({"plan": plan, "result": result}))?)?;
                eprintln!(
                    "fed {} heartbeats in {} windows; report: {}",
                    result.heartbeats,
                    result.windows,
                    out.display()
                );
            }
            Cmd::Probe(_) | Cmd::EchoServer { .. } => unreachable!("run above"),
            Cmd::Charts { report } => {
                let text =
                    std::fs::read_to_string(&report).with_context(|| format!("failed to read {}", report.display()))?;
                let value: serde_json::Value = serde_json::from_str(&text)?;
                for p in charts::write(&report, &value["results"]["details"])? {
                    eprintln!("chart: {}", p.display());
                }
            }
            Cmd::Fleet(args) => {
                let plan = args.plan()?;
                let result = fleet::run(&plan).await?;
                let results = serde_json::to_value(&result)?;
                fleet::write_report(&args.out, &serde_json::to_value(&plan)?, &results)?;
                for line in summary::lines(&results) {
                    eprintln!("{line}");
                }
                eprintln!("report: {}", args.out.display());
                match charts::write(&args.out, &results["details"]) {
                    Ok(paths) => paths.iter().for_each(|p| eprintln!("chart: {}", p.display())),
                    Err(e) => eprintln!("no charts: {e:#}"),
                }
            }
            Cmd::MqttCompare { fleet: args, mosquitto_port } => {
                anyhow::ensure!(
                    args.tls_ca.is_none(),
                    "mqtt-compare runs plain MQTT: the Mosquitto it starts has no TLS"
                );
                let plan = args.plan()?;
                let gateway_mqtt = *args.mqtt_addrs.first().context("--mqtt-addr of the gateway is required")?;
                let pid = *args.server_pids.first().context("--server-pid of the gateway is required")?;
                let results = compare::run(&plan, mosquitto_port, gateway_mqtt, pid).await?;
                fleet::write_report(&args.out, &json!({"fleet": plan, "mosquitto_port": mosquitto_port}), &results)?;
                eprintln!("{}", serde_json::to_string_pretty(&results["ratios"])?);
                eprintln!("report: {}", args.out.display());
            }
        }
        Ok(())
    })
}
