//! Configuration of the QEMU driver and the accelerator vocabulary.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which accelerator the operator asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// KVM if a probe boot shows it works, else TCG (with a warning).
    #[default]
    Auto,
    /// KVM, unprobed.
    Kvm,
    /// TCG (software emulation), unprobed.
    Tcg,
}

/// The accelerator VMs actually run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// Where the QEMU driver keeps its state and which binaries it runs.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    /// Root of the driver's state: `vms/<vm-id>/` per VM.
    pub data_dir: PathBuf,
    /// `qemu-system-x86_64`, found on `PATH` unless absolute.
    pub qemu_binary: PathBuf,
    /// `qemu-img`, found on `PATH` unless absolute.
    pub qemu_img: PathBuf,
    pub accel: AccelChoice,
    /// Most bytes of console output kept per VM; older output is dropped in
    /// halves (see `console`).
    pub console_log_max: u64,
    /// Linux kernel the KVM probe boots. `None`: the host's own kernel
    /// (`/boot/vmlinuz-$(uname -r)`, `/boot/vmlinuz`, `/vmlinuz`), if any.
    pub probe_kernel: Option<PathBuf>,
    /// How long the KVM probe boot may take to print the kernel banner.
    pub probe_timeout: Duration,
    /// Most bytes per second a backup copies (QEMU's block job `speed`), so
    /// backups do not starve the guests' own disk I/O. `None`: unlimited.
    pub backup_bandwidth: Option<u64>,
    /// The address a destination of a live migration listens on (the
    /// migration stream and the NBD export of its disk): the host's address
    /// on the migration network.
    pub migration_address: IpAddr,
    /// The ports it may listen on; the first free ones are taken (one for
    /// the migration, one for NBD per incoming VM). A firewall opens these.
    pub migration_ports: RangeInclusive<u16>,
    /// When set, live migrations are encrypted: a directory with
    /// `ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`
    /// and `client-key.pem` (QEMU's `tls-creds-x509` layout), the same CA on
    /// every host; both the migration stream and the NBD disk mirror use it.
    pub migration_tls_dir: Option<PathBuf>,
    /// Most bytes per second the destination of a cold migration reads
    /// (`qemu-img convert -r`), so a disk copy does not starve the
    /// migration network. `None`: unlimited.
    pub cold_migration_bandwidth: Option<u64>,
}

impl QemuConfig {
    /// Defaults for everything but the data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        QemuConfig {
            data_dir: data_dir.into(),
            qemu_binary: "qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            accel: AccelChoice::Auto,
            console_log_max: 1024 * 1024,
            probe_kernel: None,
            probe_timeout: Duration::from_secs(15),
            backup_bandwidth: None,
            migration_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            migration_ports: 49152..=49215,
            migration_tls_dir: None,
            cold_migration_bandwidth: None,
        }
    }
}
