//! What an agent is told when it starts: where the controller is, where its
//! files live, which driver runs its VMs, and how often to do things.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use stratus_driver::{AccelChoice, Driver};

/// Configuration of one agent. [`AgentConfig::new`] fills in the defaults.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The controller's API, e.g. `http://10.0.0.1:8480`; or several
    /// controllers on one database, separated by commas
    /// (`http://10.0.0.1:8480,http://10.0.0.2:8480`): calls go to one and
    /// fail over to the next when it is unreachable or failing.
    pub url: String,
    /// Credential, image cache, per-VM records and the QEMU driver's tree.
    /// Two agents on one machine need two data dirs.
    pub data_dir: PathBuf,
    /// The host's name at enrollment (default: the machine's host name, made
    /// into a valid name).
    pub name: Option<String>,
    pub zone: Option<String>,
    pub cluster: Option<String>,
    /// How operators reach this host (default: its name).
    pub address: Option<String>,
    /// Host tags sent at enrollment (e.g. `ssd`, `gpu`): the scheduler
    /// matches VMs' required and forbidden tags against them. Operators
    /// change them later through the API; a restarted agent does not resend
    /// them.
    pub tags: Vec<String>,
    /// Needed only until the host is enrolled (`data_dir/agent.json` exists).
    pub enroll_token: Option<String>,
    pub driver: DriverConfig,
    /// How often observations are reported when nothing changes (they are
    /// also reported right after every change). The controller marks a host
    /// that stays silent unreachable.
    pub report_interval: Duration,
    /// How long a guest gets to power off after the ACPI button before its
    /// hypervisor is ended.
    pub stop_timeout: Duration,
    /// How long one long poll for desired state may wait at the controller.
    pub desired_wait: Duration,
    /// How soon a VM whose convergence failed is tried again (it is also
    /// tried again on every change of desired state).
    pub retry_interval: Duration,
    /// What to do with orphans: VMs the host has that the controller does
    /// not place here. Either way they are reported.
    pub orphans: OrphanPolicy,
}

/// What an agent does with an orphan VM (see [`AgentConfig::orphans`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OrphanPolicy {
    /// Destroy it with its disks: nothing the controller forgot stays
    /// behind (and no second copy of a VM placed elsewhere keeps running).
    #[default]
    Destroy,
    /// Leave it untouched for the operator.
    Keep,
}

impl AgentConfig {
    /// Defaults for everything but the controller, the data dir and the
    /// driver: report every 2 s, 30 s ACPI grace, 20 s long polls, retries
    /// every 15 s.
    pub fn new(url: impl Into<String>, data_dir: impl Into<PathBuf>, driver: DriverConfig) -> Self {
        AgentConfig {
            url: url.into(),
            data_dir: data_dir.into(),
            name: None,
            zone: None,
            cluster: None,
            address: None,
            tags: Vec::new(),
            enroll_token: None,
            driver,
            report_interval: Duration::from_secs(2),
            stop_timeout: Duration::from_secs(30),
            desired_wait: Duration::from_secs(20),
            retry_interval: Duration::from_secs(15),
            orphans: OrphanPolicy::Destroy,
        }
    }
}

/// The QEMU driver's migration endpoint; `None` fields keep the driver's
/// defaults (127.0.0.1, ports 49152-49215, no TLS).
#[derive(Clone, Debug, Default)]
pub struct MigrationSettings {
    /// The address other hosts reach this one's migration ports at.
    pub address: Option<std::net::IpAddr>,
    pub ports: Option<std::ops::RangeInclusive<u16>>,
    /// QEMU `tls-creds-x509` files; with them, migration streams are TLS.
    pub tls_dir: Option<PathBuf>,
}

/// Which driver runs the host's VMs.
#[derive(Clone)]
pub enum DriverConfig {
    /// Real VMs: one QEMU process per VM, state under `data_dir/qemu`.
    Qemu {
        accel: AccelChoice,
        /// `qemu-system-x86_64` from `PATH` when `None`.
        qemu_binary: Option<PathBuf>,
        /// Most bytes per second a backup copies; unlimited when `None`.
        backup_bandwidth: Option<u64>,
        /// Where other hosts reach this one for migrations.
        migration: MigrationSettings,
    },
    /// A simulated host of this size (nothing boots).
    Sim {
        cpus: u32,
        memory_bytes: u64,
        disk_bytes: u64,
        /// Added to every lifecycle operation.
        latency: Duration,
    },
    /// A driver the caller built. Tests keep a `SimDriver` this way to
    /// inject crashes, and restart an agent on the same simulated host.
    Instance(Arc<dyn Driver>),
}

impl DriverConfig {
    /// A simulated host with the simulation's default size.
    pub fn sim() -> Self {
        let d = stratus_driver::SimConfig::default();
        DriverConfig::Sim {
            cpus: d.cpus,
            memory_bytes: d.memory_bytes,
            disk_bytes: d.disk_bytes,
            latency: d.latency,
        }
    }
}

impl fmt::Debug for DriverConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriverConfig::Qemu {
                accel,
                qemu_binary,
                backup_bandwidth,
                migration,
            } => f
                .debug_struct("Qemu")
                .field("accel", accel)
                .field("qemu_binary", qemu_binary)
                .field("backup_bandwidth", backup_bandwidth)
                .field("migration", migration)
                .finish(),
            DriverConfig::Sim {
                cpus,
                memory_bytes,
                disk_bytes,
                latency,
            } => f
                .debug_struct("Sim")
                .field("cpus", cpus)
                .field("memory_bytes", memory_bytes)
                .field("disk_bytes", disk_bytes)
                .field("latency", latency)
                .finish(),
            DriverConfig::Instance(d) => f.debug_tuple("Instance").field(&d.name()).finish(),
        }
    }
}
