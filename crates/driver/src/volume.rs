//! Data volumes: disks that live apart from any VM, are attached to at most
//! one VM at a time (hot-plugged while it runs) and outlive the VMs they were
//! attached to. What the agent hands a driver ([`VolumeSpec`]) and what it
//! gets back ([`VolumeInfo`]); the operations are on [`crate::Driver`].
//!
//! # Attach and detach
//!
//! An attachment is recorded in the VM's own driver state, so every later
//! start of the VM includes the volume (also after an agent restart); when
//! the VM runs, the volume is hot-plugged at once. Detaching asks the guest
//! to release the disk and waits (bounded) for it to do so.
//!
//! ```text
//!  attach                                  detach
//!  ──────                                  ──────
//!  record volume in the VM's state         device_del vol-<id> ──► guest (ACPI eject)
//!  VM running?                               │  wait until QEMU no longer lists the
//!   └─ blockdev-add  (qcow2 node)            │  device (the guest acknowledged);
//!   └─ device_add virtio-blk-pci             │  at most [`DETACH_TIMEOUT`]
//!        bus = a free hot-plug port          ▼
//!        serial = volume_serial(id)        blockdev-del (qcow2 node)
//!      ──► guest sees /dev/vdX             remove the volume from the VM's state
//! ```
//!
//! Every step is idempotent and the names QEMU knows the volume by derive
//! from its id, so a call interrupted half-way (agent killed) is finished or
//! undone by calling it again.
//!
//! # In the guest
//!
//! The guest finds a volume by its serial number, [`volume_serial`]: the
//! first 20 characters of the volume id without dashes (virtio-blk's serial
//! holds at most 20 bytes), in `/dev/disk/by-id/virtio-<serial>` (udev) or
//! `/sys/block/vdX/serial`. Its `/dev/vdX` name depends on probe order and
//! is not stable.
//!
//! # Limits
//!
//! A VM has [`MAX_VOLUMES_PER_VM`] hot-plug ports (PCIe root ports on q35),
//! so it holds at most that many volumes; attaching one more is refused.
//! Volumes only grow ([`crate::Driver::volume_resize`]).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use stratus_common::VmId;

use crate::{DriverError, ImageFormat};

/// How many volumes one VM can hold: the number of hot-plug ports every VM
/// is started with. Each port costs a PCIe root port on the VM's bus
/// (a few KiB of QEMU memory, one PCI bus number), whether used or not.
pub const MAX_VOLUMES_PER_VM: usize = 4;

/// How long a detach waits for the guest to release the disk. A guest that
/// is still booting, has no ACPI hot-plug support, or is paused does not
/// answer; the detach then fails with [`DriverError::Timeout`] and can be
/// retried (QEMU keeps the unplug request pending).
pub const DETACH_TIMEOUT: Duration = Duration::from_secs(30);

/// Volume sizes are whole 512-byte sectors (what virtio-blk exposes).
pub const VOLUME_SIZE_ALIGN: u64 = 512;

/// One volume to create.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub volume_id: uuid::Uuid,
    /// Guest-visible size. For a volume from an image, at least the image's
    /// size (a clone cannot be smaller than what it clones).
    pub size_bytes: u64,
    /// Base image the volume starts as a copy-on-write clone of; None: blank.
    /// Never written to; it must stay where it is while the volume exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    /// Format of `image`; required with it (formats are never probed: a raw
    /// image whose content looks like a qcow2 header must not be opened as one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_format: Option<ImageFormat>,
}

/// What a volume is now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub volume_id: uuid::Uuid,
    /// Guest-visible size.
    pub size_bytes: u64,
    /// bytes allocated on the host (the volume's own file; a base image it
    /// clones is shared and not counted)
    pub allocated_bytes: u64,
    /// the VM it is attached to
    pub attached_to: Option<VmId>,
}

/// The serial number the guest sees for the volume: the first 20 characters
/// of its id without dashes.
pub fn volume_serial(volume_id: uuid::Uuid) -> String {
    let mut s = volume_id.simple().to_string();
    s.truncate(20);
    s
}

impl VolumeSpec {
    /// Refuses specs no driver can create. Paths are checked for existence by
    /// the QEMU driver only.
    pub fn validate(&self) -> Result<(), DriverError> {
        let bad = |reason: String| DriverError::InvalidVolumeSpec {
            id: self.volume_id,
            reason,
        };
        if self.size_bytes == 0 {
            return Err(bad("size is 0 bytes".into()));
        }
        if !self.size_bytes.is_multiple_of(VOLUME_SIZE_ALIGN) {
            return Err(bad(format!(
                "size {} bytes is not a multiple of {VOLUME_SIZE_ALIGN}",
                self.size_bytes
            )));
        }
        if i64::try_from(self.size_bytes).is_err() {
            return Err(bad(format!("size {} bytes is too large", self.size_bytes)));
        }
        match (&self.image, self.image_format) {
            (Some(image), _) if !image.is_absolute() => Err(bad(format!(
                "image path {} is not absolute",
                image.display()
            ))),
            (Some(_), None) => Err(bad("an image needs its image_format".into())),
            (None, Some(_)) => Err(bad("image_format given without an image".into())),
            _ => Ok(()),
        }
    }
}

/// Refuses a resize to `size_bytes` of a volume now `current` bytes large:
/// volumes never shrink (the guest's file system would lose its end).
pub fn check_resize(
    volume_id: uuid::Uuid,
    current: u64,
    size_bytes: u64,
) -> Result<(), DriverError> {
    let bad = |reason: String| DriverError::InvalidVolumeSpec {
        id: volume_id,
        reason,
    };
    if size_bytes < current {
        return Err(bad(format!(
            "cannot shrink it from {current} to {size_bytes} bytes (volumes only grow)"
        )));
    }
    if !size_bytes.is_multiple_of(VOLUME_SIZE_ALIGN) {
        return Err(bad(format!(
            "size {size_bytes} bytes is not a multiple of {VOLUME_SIZE_ALIGN}"
        )));
    }
    if i64::try_from(size_bytes).is_err() {
        return Err(bad(format!("size {size_bytes} bytes is too large")));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn blank(size_bytes: u64) -> VolumeSpec {
        VolumeSpec {
            volume_id: uuid::Uuid::new_v4(),
            size_bytes,
            image: None,
            image_format: None,
        }
    }

    #[test]
    fn serial_is_the_first_20_characters_without_dashes() {
        let id: uuid::Uuid = "0190f3c2-8a1b-7c3d-9e4f-0123456789ab"
            .parse()
            .expect("uuid");
        assert_eq!(volume_serial(id), "0190f3c28a1b7c3d9e4f");
    }

    #[test]
    fn validate_refuses_what_cannot_be_created() {
        assert!(blank(16 << 20).validate().is_ok());
        for size in [0, 1000, u64::MAX - 511] {
            assert!(
                matches!(
                    blank(size).validate(),
                    Err(DriverError::InvalidVolumeSpec { .. })
                ),
                "{size}"
            );
        }
        let mut s = blank(1 << 20);
        s.image = Some("/images/base.qcow2".into());
        assert!(s.validate().is_err(), "image without format");
        s.image_format = Some(ImageFormat::Qcow2);
        assert!(s.validate().is_ok());
        s.image = Some("relative.qcow2".into());
        assert!(s.validate().is_err());
        s.image = None;
        assert!(s.validate().is_err(), "format without image");
    }

    #[test]
    fn resize_only_grows() {
        let id = uuid::Uuid::new_v4();
        assert!(check_resize(id, 1 << 20, 2 << 20).is_ok());
        assert!(check_resize(id, 1 << 20, 1 << 20).is_ok());
        let e = check_resize(id, 2 << 20, 1 << 20).expect_err("shrink");
        assert!(e.to_string().contains("cannot shrink"), "{e}");
        assert!(check_resize(id, 1 << 20, (2 << 20) + 1).is_err());
    }

    #[test]
    fn spec_round_trips_through_json() {
        let mut s = blank(1 << 20);
        let json = serde_json::to_string(&s).expect("json");
        assert!(!json.contains("image"), "{json}");
        assert_eq!(serde_json::from_str::<VolumeSpec>(&json).expect("parse"), s);
        s.image = Some("/i.qcow2".into());
        s.image_format = Some(ImageFormat::Qcow2);
        let json = serde_json::to_string(&s).expect("json");
        assert_eq!(serde_json::from_str::<VolumeSpec>(&json).expect("parse"), s);
    }
}
