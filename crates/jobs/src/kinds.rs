//! The kinds of jobs and the parameters each carries.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use stratus_api_types::views::{VmDesiredState, VmState};

/// What a job does. Stored as its snake_case name in `jobs.kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobKind {
    VmCreate,
    VmStart,
    VmStop,
    VmReboot,
    VmDelete,
    /// Back up a running VM's disk (full or incremental).
    VmBackup,
    /// Replace a stopped VM's disk with a backup.
    VmRestore,
    /// Snapshot a VM's disk (live when it runs).
    VmSnapshotCreate,
    /// Make a stopped VM's disk what it was at a snapshot.
    VmSnapshotRevert,
    /// Delete a snapshot, merging its layer (live when the VM runs).
    VmSnapshotDelete,
    /// Attach a volume to a VM (hot-plug when it runs).
    VmVolumeAttach,
    /// Detach a volume from a VM (hot-unplug when it runs).
    VmVolumeDetach,
    /// Move a VM to another host (live while it runs, cold when stopped).
    VmMigrate,
}

impl JobKind {
    pub const ALL: [JobKind; 13] = [
        JobKind::VmCreate,
        JobKind::VmStart,
        JobKind::VmStop,
        JobKind::VmReboot,
        JobKind::VmDelete,
        JobKind::VmBackup,
        JobKind::VmRestore,
        JobKind::VmSnapshotCreate,
        JobKind::VmSnapshotRevert,
        JobKind::VmSnapshotDelete,
        JobKind::VmVolumeAttach,
        JobKind::VmVolumeDetach,
        JobKind::VmMigrate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::VmCreate => "vm_create",
            JobKind::VmStart => "vm_start",
            JobKind::VmStop => "vm_stop",
            JobKind::VmReboot => "vm_reboot",
            JobKind::VmDelete => "vm_delete",
            JobKind::VmBackup => "vm_backup",
            JobKind::VmRestore => "vm_restore",
            JobKind::VmSnapshotCreate => "vm_snapshot_create",
            JobKind::VmSnapshotRevert => "vm_snapshot_revert",
            JobKind::VmSnapshotDelete => "vm_snapshot_delete",
            JobKind::VmVolumeAttach => "vm_volume_attach",
            JobKind::VmVolumeDetach => "vm_volume_detach",
            JobKind::VmMigrate => "vm_migrate",
        }
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        JobKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown job kind {s:?}"))
    }
}

/// Parameters of a VM operation, stored with the job so that whichever
/// controller runs it, and any undo, knows where the VM started from.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmJobParams {
    /// The VM's observed state when the operation was accepted.
    pub previous_state: VmState,
    /// What the operator had asked for before this operation.
    pub previous_desired: VmDesiredState,
    /// For a restore: the backup whose file becomes the VM's disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreParams>,
    /// For a snapshot job: the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<stratus_common::SnapshotId>,
    /// For a volume job: the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<stratus_common::VolumeId>,
    /// For a migration: where to and how.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationParams>,
}

impl VmJobParams {
    /// A VM operation's parameters: where the VM stood, nothing more (the
    /// operations that need more set their field).
    pub fn from_vm(previous_state: VmState, previous_desired: VmDesiredState) -> Self {
        VmJobParams {
            previous_state,
            previous_desired,
            restore: None,
            snapshot: None,
            volume: None,
            migration: None,
        }
    }
}

/// What a `vm_migrate` job does. The destination is claimed when the job is
/// accepted; these are the rest of the operator's choices.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MigrationParams {
    pub source: stratus_common::HostId,
    pub target: stratus_common::HostId,
    /// The VM was stopped: its disk is copied, no memory moves.
    pub cold: bool,
    /// Most bytes per second the migration may use.
    #[serde(default)]
    pub bandwidth: Option<u64>,
    #[serde(default)]
    pub auto_converge: bool,
    #[serde(default)]
    pub postcopy_after_passes: Option<u32>,
    /// The disk's pool now, and at the destination (by directory; `None`:
    /// the host's own): equal when the disk stays in one shared pool, so
    /// nothing is copied.
    #[serde(default)]
    pub source_pool: Option<String>,
    #[serde(default)]
    pub target_pool: Option<String>,
    /// The VM's disk has no base image (it was restored from a backup): the
    /// destination makes an empty disk of this many bytes and the whole
    /// disk is mirrored, not just what the guest wrote over the image.
    #[serde(default)]
    pub standalone_disk_bytes: Option<u64>,
    /// Volumes are attached: the source first says which, on which ports
    /// (only its records know), and they move with the VM.
    #[serde(default)]
    pub volumes: bool,
    /// The disk has snapshot layers and is copied: the source describes
    /// them first, and they move with the VM.
    #[serde(default)]
    pub snapshots: bool,
}

/// What a `vm_restore` job restores.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreParams {
    pub backup_id: stratus_common::BackupId,
    /// The backup's file (absolute).
    pub file: String,
}
