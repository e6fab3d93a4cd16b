//! `stratus agent`: the host agent as a long-running process. It runs until
//! SIGINT or SIGTERM, then stops its loops but never its VMs (they outlive
//! the agent; the next start re-adopts them).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use stratus_agent::{AccelChoice, Agent, AgentConfig, Credentials, DriverConfig};
use stratus_cli::{config, GlobalOpts};

/// The controller's URL comes from the global `--url` (or `STRATUS_URL`);
/// without it, from `DATA_DIR/agent.json` once enrolled, else from the CLI
/// config file.
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// One-time enrollment token from `stratus host enroll-token`; needed only
    /// until this data dir holds the host's credential
    #[arg(long, env = "STRATUS_ENROLL_TOKEN", hide_env_values = true)]
    enroll_token: Option<String>,
    /// Where the agent keeps its credential, image cache and VM state
    /// [default: $XDG_DATA_HOME/stratus/agent]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The host's name at enrollment [default: the machine's host name]
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
    /// What runs the VMs: real QEMU, or a simulation (for tests and demos)
    #[arg(long, value_enum, default_value_t = DriverArg::Qemu)]
    driver: DriverArg,
    /// QEMU accelerator: auto probes whether KVM really works
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    accel: AccelArg,
    /// The QEMU binary [default: qemu-system-x86_64 from PATH]
    #[arg(long)]
    qemu_binary: Option<PathBuf>,
    /// Seconds a guest gets to power off after the ACPI button before QEMU
    /// is ended
    #[arg(long, default_value_t = 30)]
    stop_timeout: u64,
    /// Log as JSON lines instead of text
    #[arg(long)]
    log_json: bool,
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
    crate::daemon::init_logging(args.log_json);
    let signal = crate::daemon::shutdown_signal()?;
    let data_dir = match args.data_dir {
        Some(d) => d,
        None => dirs::data_dir()
            .map(|d| d.join("stratus").join("agent"))
            .context("cannot tell the user's data directory; pass --data-dir")?,
    };
    let url = match global.url {
        Some(u) => u,
        None => match Credentials::load(&data_dir)? {
            Some(c) => c.url,
            None => global
                .config
                .clone()
                .or_else(config::default_path)
                .and_then(|p| config::ConfigFile::load(&p).ok())
                .and_then(|c| c.url)
                .context("no controller URL: pass --url (or set STRATUS_URL)")?,
        },
    };
    let driver = match args.driver {
        DriverArg::Qemu => DriverConfig::Qemu {
            accel: match args.accel {
                AccelArg::Auto => AccelChoice::Auto,
                AccelArg::Kvm => AccelChoice::Kvm,
                AccelArg::Tcg => AccelChoice::Tcg,
            },
            qemu_binary: args.qemu_binary,
        },
        DriverArg::Sim => DriverConfig::sim(),
    };
    let mut config = AgentConfig::new(url, data_dir, driver);
    config.name = args.name;
    config.zone = args.zone;
    config.cluster = args.cluster;
    config.address = args.address;
    config.enroll_token = args.enroll_token;
    config.stop_timeout = Duration::from_secs(args.stop_timeout);

    let agent = Agent::start(config).await.context("starting the agent")?;
    tracing::info!(host = %agent.host_id(), data_dir = %agent.data_dir().display(), "agent running; stop with SIGINT or SIGTERM (VMs keep running)");
    let why = signal.await;
    tracing::info!(signal = why, "shutting down the agent; VMs keep running");
    agent.shutdown().await;
    Ok(())
}
