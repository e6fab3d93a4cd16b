//! `stratus agent`: the host agent as a long-running process. It runs until
//! SIGINT or SIGTERM, then stops its loops but never its VMs (they outlive
//! the agent; the next start re-adopts them).
//!
//! With `--driver sim --hosts N` one process runs N simulated hosts (see
//! `stratus_agent::SimFleet`): how benchmarks and fault tests get thousands
//! of hosts on one machine.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use stratus_agent::{
    default_host_name, AccelChoice, Agent, AgentConfig, Credentials, DriverConfig, OrphanPolicy,
    SimFleet, SimFleetConfig,
};
use stratus_cli::{config, GlobalOpts};
use stratus_common::ByteCount;

/// The controller's URL comes from the global `--url` (or `STRATUS_URL`);
/// without it, from `DATA_DIR/agent.json` once enrolled, else from the CLI
/// config file. With several controllers on one database, `--url` takes
/// them all, separated by commas (`--url http://a:8480,http://b:8480`): the
/// agent talks to one and fails over to the next when it is down or
/// failing.
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Enrollment token from `stratus host enroll-token`; needed only until
    /// this data dir holds the host's credential. With --hosts N, one token
    /// with a use for every host not yet enrolled (`--uses N`)
    #[arg(long, env = "STRATUS_ENROLL_TOKEN", hide_env_values = true)]
    enroll_token: Option<String>,
    /// Where the agent keeps its credential, image cache and VM state; with
    /// --hosts, each host's under DATA_DIR/hosts/NAME/
    /// [default: $XDG_DATA_HOME/stratus/agent]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The host's name at enrollment; with --hosts, the prefix of the hosts'
    /// names (NAME-00001, NAME-00002, ...) [default: the machine's host name]
    #[arg(long)]
    name: Option<String>,
    /// Zone to enroll in [default: the controller's `default`]
    #[arg(long)]
    zone: Option<String>,
    /// Cluster to enroll in [default: the controller's `default`]
    #[arg(long)]
    cluster: Option<String>,
    /// How operators reach this host [default: its name]
    #[arg(long)]
    address: Option<String>,
    /// A host tag sent at enrollment, which VMs can require or forbid
    /// (repeatable: --tag ssd --tag gpu)
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// What runs the VMs: real QEMU, or a simulation (for tests and demos)
    #[arg(long, value_enum, default_value_t = DriverArg::Qemu)]
    driver: DriverArg,
    /// Run this many simulated hosts in this one process (needs --driver
    /// sim), each enrolled once and heartbeating on its own
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    hosts: Option<u32>,
    /// vCPUs a simulated host reports [default: 64]
    #[arg(long, value_name = "N")]
    sim_cpus: Option<u32>,
    /// Memory a simulated host reports, e.g. 256GiB [default: 256GiB]
    #[arg(long, value_name = "SIZE")]
    sim_memory: Option<ByteCount>,
    /// Disk a simulated host reports, e.g. 4TiB [default: 4TiB]
    #[arg(long, value_name = "SIZE")]
    sim_disk: Option<ByteCount>,
    /// How long each simulated VM operation (create, start, stop, reboot,
    /// delete) takes [default: 0, instant]
    #[arg(long, value_name = "MS")]
    sim_latency_ms: Option<u64>,
    /// Seconds between reports (the host's heartbeat) when nothing changes;
    /// each period is jittered by ±10 %. Keep it well under the controller's
    /// host timeout (20 s) [default: 2; with --hosts, 10]
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    report_interval: Option<u64>,
    /// QEMU accelerator: auto probes whether KVM really works
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    accel: AccelArg,
    /// The QEMU binary [default: qemu-system-x86_64 from PATH]
    #[arg(long)]
    qemu_binary: Option<PathBuf>,
    /// Most bytes per second a backup copies, e.g. 100MiB, so backups
    /// leave the guests disk bandwidth [default: unlimited]
    #[arg(long, value_name = "BYTES")]
    backup_bandwidth: Option<ByteCount>,
    /// The address other hosts reach this one at for live and cold
    /// migrations (QEMU and NBD listen there) [default: 127.0.0.1]
    #[arg(long, value_name = "IP")]
    migration_address: Option<std::net::IpAddr>,
    /// The ports migrations may listen on, FIRST-LAST [default: 49152-49215]
    #[arg(long, value_name = "FIRST-LAST", value_parser = parse_ports)]
    migration_ports: Option<std::ops::RangeInclusive<u16>>,
    /// A directory of QEMU x509 files (ca-cert.pem, server-cert.pem,
    /// server-key.pem, client-cert.pem, client-key.pem): migration streams
    /// are then TLS [default: plain TCP]
    #[arg(long, value_name = "DIR")]
    migration_tls_dir: Option<PathBuf>,
    /// Seconds a guest gets to power off after the ACPI button before QEMU
    /// is ended
    #[arg(long, default_value_t = 30)]
    stop_timeout: u64,
    /// What to do with orphans, VMs this host has that the controller does
    /// not place here: destroy them with their disks, or keep them
    /// untouched. Either way they are reported (`stratus host show`)
    #[arg(long, value_enum, default_value_t = OrphansArg::Destroy)]
    orphans: OrphansArg,
    /// Log as JSON lines instead of text
    #[arg(long)]
    log_json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OrphansArg {
    Destroy,
    Keep,
}

impl From<OrphansArg> for OrphanPolicy {
    fn from(a: OrphansArg) -> Self {
        match a {
            OrphansArg::Destroy => OrphanPolicy::Destroy,
            OrphansArg::Keep => OrphanPolicy::Keep,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DriverArg {
    Qemu,
    Sim,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

pub async fn run(args: AgentArgs, global: GlobalOpts) -> anyhow::Result<()> {
    check_sim_args(&args)?;
    crate::daemon::init_logging(args.log_json);
    let signal = crate::daemon::shutdown_signal()?;
    let data_dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => dirs::data_dir()
            .map(|d| d.join("stratus").join("agent"))
            .context("cannot tell the user's data directory; pass --data-dir")?,
    };
    if let Some(hosts) = args.hosts {
        return run_fleet(args, global, data_dir, hosts, signal).await;
    }
    let url = controller_url(&global, &data_dir)?;
    let driver = match args.driver {
        DriverArg::Qemu => DriverConfig::Qemu {
            accel: match args.accel {
                AccelArg::Auto => AccelChoice::Auto,
                AccelArg::Kvm => AccelChoice::Kvm,
                AccelArg::Tcg => AccelChoice::Tcg,
            },
            qemu_binary: args.qemu_binary,
            backup_bandwidth: args.backup_bandwidth.map(|b| b.0),
            migration: stratus_agent::MigrationSettings {
                address: args.migration_address,
                ports: args.migration_ports.clone(),
                tls_dir: args.migration_tls_dir.clone(),
            },
        },
        DriverArg::Sim => {
            let mut d = stratus_agent::SimConfig::default();
            apply_sim_args(&args_sim(&args), &mut d);
            DriverConfig::Sim {
                cpus: d.cpus,
                memory_bytes: d.memory_bytes,
                disk_bytes: d.disk_bytes,
                latency: d.latency,
            }
        }
    };
    let mut config = AgentConfig::new(url, data_dir, driver);
    config.name = args.name;
    config.zone = args.zone;
    config.cluster = args.cluster;
    config.address = args.address;
    config.tags = args.tags;
    config.enroll_token = args.enroll_token;
    config.stop_timeout = Duration::from_secs(args.stop_timeout);
    config.orphans = args.orphans.into();
    if let Some(secs) = args.report_interval {
        config.report_interval = Duration::from_secs(secs);
    }

    let agent = Agent::start(config).await.context("starting the agent")?;
    tracing::info!(host = %agent.host_id(), data_dir = %agent.data_dir().display(), "agent running; stop with SIGINT or SIGTERM (VMs keep running)");
    let why = signal.await;
    tracing::info!(signal = why, "shutting down the agent; VMs keep running");
    agent.shutdown().await;
    Ok(())
}

/// `--hosts N`: a simulated fleet in this process.
async fn run_fleet(
    args: AgentArgs,
    global: GlobalOpts,
    data_dir: PathBuf,
    hosts: u32,
    signal: impl std::future::Future<Output = &'static str>,
) -> anyhow::Result<()> {
    let mut config = SimFleetConfig::new(String::new(), data_dir, hosts as usize);
    let prefix = args.name.clone().unwrap_or_else(default_host_name);
    // Once enrolled, the first host's credential knows the controller.
    let first = config
        .data_dir
        .join("hosts")
        .join(config.host_name(&prefix, 0));
    config.url = controller_url(&global, &first)?;
    config.name_prefix = Some(prefix);
    config.enroll_token = args.enroll_token.clone();
    config.zone = args.zone.clone();
    config.cluster = args.cluster.clone();
    config.tags = args.tags.clone();
    config.orphans = args.orphans.into();
    let mut sim = stratus_agent::SimConfig::default();
    apply_sim_args(&args_sim(&args), &mut sim);
    config.cpus = sim.cpus;
    config.memory_bytes = sim.memory_bytes;
    config.disk_bytes = sim.disk_bytes;
    config.latency = sim.latency;
    if let Some(secs) = args.report_interval {
        config.report_interval = Duration::from_secs(secs);
    }

    let fleet = SimFleet::start(config)
        .await
        .context("starting the simulated hosts")?;
    tracing::info!(
        hosts = fleet.len(),
        enrolled_now = fleet.enrolled_now(),
        "simulated hosts running; stop with SIGINT or SIGTERM"
    );
    let why = signal.await;
    tracing::info!(signal = why, "shutting down the simulated hosts");
    fleet.shutdown().await;
    Ok(())
}

/// The global `--url`, else the one the host enrolled with (its credential
/// in `host_dir`), else the CLI config file's. Any of them may be a
/// comma-separated list of controllers.
fn controller_url(global: &GlobalOpts, host_dir: &Path) -> anyhow::Result<String> {
    if let Some(u) = &global.url {
        return Ok(u.clone());
    }
    if let Some(c) = Credentials::load(host_dir)? {
        return Ok(c.url);
    }
    global
        .config
        .clone()
        .or_else(config::default_path)
        .and_then(|p| config::ConfigFile::load(&p).ok())
        .and_then(|c| c.url)
        .context("no controller URL: pass --url (or set STRATUS_URL)")
}

/// The simulation's flags, as given.
#[derive(Debug, Default)]
struct SimArgs {
    cpus: Option<u32>,
    memory: Option<ByteCount>,
    disk: Option<ByteCount>,
    latency_ms: Option<u64>,
}

fn args_sim(args: &AgentArgs) -> SimArgs {
    SimArgs {
        cpus: args.sim_cpus,
        memory: args.sim_memory,
        disk: args.sim_disk,
        latency_ms: args.sim_latency_ms,
    }
}

fn apply_sim_args(a: &SimArgs, sim: &mut stratus_agent::SimConfig) {
    if let Some(n) = a.cpus {
        sim.cpus = n;
    }
    if let Some(m) = a.memory {
        sim.memory_bytes = m.bytes();
    }
    if let Some(d) = a.disk {
        sim.disk_bytes = d.bytes();
    }
    if let Some(ms) = a.latency_ms {
        sim.latency = Duration::from_millis(ms);
    }
}

/// The simulation's flags make sense only with `--driver sim`, and a fleet
/// names its hosts' addresses itself.
fn check_sim_args(args: &AgentArgs) -> anyhow::Result<()> {
    if matches!(args.driver, DriverArg::Qemu) {
        if args.hosts.is_some() {
            anyhow::bail!(
                "--hosts needs --driver sim: a real host runs one agent (with QEMU, run `stratus agent` on each host)"
            );
        }
        let sim = args_sim(args);
        for (flag, given) in [
            ("--sim-cpus", sim.cpus.is_some()),
            ("--sim-memory", sim.memory.is_some()),
            ("--sim-disk", sim.disk.is_some()),
            ("--sim-latency-ms", sim.latency_ms.is_some()),
        ] {
            if given {
                anyhow::bail!("{flag} needs --driver sim (a QEMU host reports its real capacity)");
            }
        }
    }
    if args.hosts.is_some() && args.address.is_some() {
        anyhow::bail!("--address names one host; with --hosts, each host's address is its name");
    }
    if args.sim_cpus == Some(0) {
        anyhow::bail!("--sim-cpus must be at least 1");
    }
    Ok(())
}

/// `49152-49215`: a non-empty inclusive range of ports.
fn parse_ports(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not FIRST-LAST"))?;
    let a: u16 = a.trim().parse().map_err(|e| format!("{a:?}: {e}"))?;
    let b: u16 = b.trim().parse().map_err(|e| format!("{b:?}: {e}"))?;
    if a == 0 || a > b {
        return Err(format!(
            "{s:?} is not a range of ports (1 <= FIRST <= LAST)"
        ));
    }
    Ok(a..=b)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    fn parse(argv: &[&str]) -> Result<AgentArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("agent").chain(argv.iter().copied())).map(|c| c.agent)
    }

    #[test]
    fn hosts_and_sim_flags_need_the_sim_driver() {
        let a = parse(&["--hosts", "10"]).expect("parses");
        let err = check_sim_args(&a).expect_err("qemu fleets are refused");
        assert!(
            err.to_string().contains("--hosts needs --driver sim"),
            "{err}"
        );
        let a = parse(&["--sim-memory", "8GiB"]).expect("parses");
        assert!(check_sim_args(&a).is_err());
        assert!(
            parse(&["--driver", "sim", "--hosts", "0"]).is_err(),
            "N >= 1"
        );
        let a = parse(&["--driver", "sim", "--hosts", "3", "--address", "x"]).expect("parses");
        assert!(check_sim_args(&a).is_err());
    }

    #[test]
    fn sim_flags_set_the_simulated_capacity() {
        let a = parse(&[
            "--driver",
            "sim",
            "--hosts",
            "10000",
            "--sim-cpus",
            "32",
            "--sim-memory",
            "128GiB",
            "--sim-disk",
            "2TiB",
            "--sim-latency-ms",
            "250",
            "--tag",
            "ssd",
            "--tag",
            "gpu",
            "--report-interval",
            "15",
        ])
        .expect("parses");
        check_sim_args(&a).expect("valid");
        assert_eq!(a.hosts, Some(10_000));
        assert_eq!(a.tags, ["ssd", "gpu"]);
        assert_eq!(a.report_interval, Some(15));
        let mut sim = stratus_agent::SimConfig::default();
        apply_sim_args(&args_sim(&a), &mut sim);
        assert_eq!(sim.cpus, 32);
        assert_eq!(sim.memory_bytes, 128 << 30);
        assert_eq!(sim.disk_bytes, 2 << 40);
        assert_eq!(sim.latency, Duration::from_millis(250));
        assert!(parse(&["--driver", "sim", "--sim-memory", "lots"]).is_err());
    }

    #[test]
    fn port_ranges_are_checked() {
        assert_eq!(parse_ports("49152-49215"), Ok(49152..=49215));
        assert_eq!(parse_ports("5000-5000"), Ok(5000..=5000));
        assert!(parse_ports("5001-5000").is_err());
        assert!(parse_ports("0-10").is_err());
        assert!(parse_ports("5000").is_err());
        assert!(parse_ports("a-b").is_err());
    }
}
