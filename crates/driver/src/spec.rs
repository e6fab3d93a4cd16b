//! What a VM is made of, as the agent hands it to a driver: [`VmSpec`] and its
//! parts. Plain data (serde), validated once by [`VmSpec::validate`].

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use stratus_common::VmId;

use crate::DriverError;

/// Smallest memory a VM may be given. The Debian cloud kernel needs about
/// 80 MiB; below 32 MiB nothing useful boots.
pub const MIN_MEMORY_BYTES: u64 = 32 * 1024 * 1024;
/// Most vCPUs one VM may have (QEMU's q35 limit is far higher; this is a sanity bound).
pub const MAX_VCPUS: u32 = 256;

/// Everything needed to create and boot one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub id: VmId,
    /// Human name, shown by QEMU (`-name`) and in logs. Not unique.
    pub name: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// Size of the VM's disk. The disk is a copy-on-write overlay of `image`;
    /// it is grown to this size when that is larger than the image.
    pub disk_bytes: u64,
    /// Base image cached on the host; never written to.
    pub image: PathBuf,
    pub image_format: ImageFormat,
    /// When set, the disk starts as a copy of this backup file (read through
    /// its backing chain) instead of an empty overlay of `image`; `image`
    /// still provides the boot files. How a backup is restored into a new VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_from: Option<PathBuf>,
    /// The directory of the shared storage pool holding the disk (the same
    /// path on every host that sees it): the disk and its snapshot layers
    /// live in `<pool>/vms/<vm-id>/`, so another host can open them.
    /// `None`: the host's own data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PathBuf>,
    pub boot: BootSpec,
    pub nic: NicSpec,
}

/// On-disk format of a base image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Qcow2,
    Raw,
}

impl ImageFormat {
    /// The name QEMU and qemu-img use for the format.
    pub fn as_qemu_str(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_qemu_str())
    }
}

/// How the VM boots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BootSpec {
    /// Firmware (SeaBIOS) boots from the disk.
    Firmware,
    /// Direct kernel boot. `console=ttyS0` is added to `cmdline` when it names
    /// no console, so the serial console always shows the boot.
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
}

/// The VM's network interface. A seam: only QEMU user-mode networking exists
/// today; a `Tap { bridge, .. }` variant comes with host networking.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NicSpec {
    /// QEMU user-mode network (slirp): the guest gets 10.0.2.15 by DHCP and
    /// can reach out; nothing can reach in.
    User,
}

impl VmSpec {
    /// Refuses specs no driver can run. Paths are checked for existence by the
    /// QEMU driver only (the simulation has no files).
    pub fn validate(&self) -> Result<(), DriverError> {
        let bad = |reason: String| DriverError::InvalidSpec {
            id: self.id,
            reason,
        };
        if self.name.trim().is_empty() {
            return Err(bad("name is empty".into()));
        }
        if self.name.chars().any(char::is_control) {
            return Err(bad("name contains control characters".into()));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(bad(format!(
                "vcpus is {}; it must be between 1 and {MAX_VCPUS}",
                self.vcpus
            )));
        }
        if self.memory_bytes < MIN_MEMORY_BYTES {
            return Err(bad(format!(
                "memory is {} bytes; at least {} MiB is needed",
                self.memory_bytes,
                MIN_MEMORY_BYTES >> 20
            )));
        }
        if let BootSpec::Kernel { cmdline, .. } = &self.boot {
            if cmdline.contains('\n') || cmdline.contains('\0') {
                return Err(bad("kernel command line contains a newline or NUL".into()));
            }
        }
        Ok(())
    }

    /// Memory in whole MiB, rounded up (QEMU's `-m` unit).
    pub fn memory_mib(&self) -> u64 {
        self.memory_bytes.div_ceil(1024 * 1024)
    }

    /// A stable locally administered MAC address derived from the VM id, in
    /// QEMU's 52:54:00 prefix, so the guest keeps its MAC across restarts.
    pub fn mac_address(&self) -> String {
        let b = self.id.as_uuid().into_bytes();
        // The id is UUIDv7: its first bytes are a timestamp, the last ones random.
        format!("52:54:00:{:02x}:{:02x}:{:02x}", b[13], b[14], b[15])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn spec() -> VmSpec {
        VmSpec {
            id: VmId::new(),
            name: "web-1".into(),
            vcpus: 1,
            memory_bytes: 128 << 20,
            disk_bytes: 1 << 30,
            image: "/images/base.qcow2".into(),
            image_format: ImageFormat::Qcow2,
            restore_from: None,
            pool: None,
            boot: BootSpec::Firmware,
            nic: NicSpec::User,
        }
    }

    #[test]
    fn validate_refuses_what_cannot_run() {
        assert!(spec().validate().is_ok());
        let mut s = spec();
        s.vcpus = 0;
        assert!(matches!(s.validate(), Err(DriverError::InvalidSpec { .. })));
        let mut s = spec();
        s.memory_bytes = 1 << 20;
        assert!(s.validate().is_err());
        let mut s = spec();
        s.name = " ".into();
        assert!(s.validate().is_err());
        let mut s = spec();
        s.boot = BootSpec::Kernel {
            kernel: "/k".into(),
            initrd: None,
            cmdline: "a\nb".into(),
        };
        assert!(s.validate().is_err());
    }

    #[test]
    fn spec_round_trips_through_json() {
        let mut s = spec();
        s.boot = BootSpec::Kernel {
            kernel: "/k".into(),
            initrd: Some("/i".into()),
            cmdline: "quiet".into(),
        };
        let json = serde_json::to_string(&s).expect("serializes");
        assert!(json.contains(r#""kind":"kernel""#), "{json}");
        let back: VmSpec = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, s);
    }

    #[test]
    fn memory_rounds_up_and_mac_is_stable() {
        let mut s = spec();
        s.memory_bytes = (128 << 20) + 1;
        assert_eq!(s.memory_mib(), 129);
        assert_eq!(s.mac_address(), s.mac_address());
        assert!(s.mac_address().starts_with("52:54:00:"));
        assert_eq!(s.mac_address().len(), 17);
    }
}
