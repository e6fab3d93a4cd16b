//! Disk backups as a driver takes them: what the agent asks for
//! ([`BackupRequest`]) and what it gets back ([`BackupOutcome`]).
//!
//! # Incremental forever, with one bitmap per restore point
//!
//! Every backup adds a persistent dirty bitmap named
//! [`bitmap_name`]`(backup_id)` to the VM's disk, atomically with the start of
//! the copy (one QMP `transaction`), so the bitmap records exactly the writes
//! made after the point the backup captures. An incremental backup copies the
//! clusters set in its *parent's* bitmap (`sync: bitmap`, `bitmap-mode:
//! never`) into a qcow2 file whose backing file is the parent's file; the
//! parent's bitmap is removed only once the new backup is complete. So a
//! backup that fails, or whose success never reaches the controller, leaves
//! the previous restore point's change tracking intact.
//!
//! The bitmaps are stored in the qcow2 (`persistent: true`) when QEMU closes
//! the disk cleanly, so change tracking survives a VM stop and start. When
//! the parent's bitmap is missing (disk restored, never backed up here) or
//! inconsistent (QEMU killed while the bitmap was in use), the driver takes a
//! full backup instead and says why in [`BackupOutcome::fallback_reason`].
//! Stray `stratus-backup-*` bitmaps (from failed backups) are removed by the
//! next backup.
//!
//! ```text
//!  full.qcow2 ◄── backing ── inc1.qcow2 ◄── backing ── inc2.qcow2
//!  (whole disk)              (clusters dirty          (clusters dirty
//!                             since full)               since inc1)
//! ```
//! Restoring a restore point reads its file through the chain.
//!
//! # Every disk of the VM, at one moment
//!
//! A restore point covers the VM's own disk and every data volume attached
//! when it is taken: each disk's copy starts in the same QMP `transaction`
//! (with the guest's file systems frozen through its agent when it
//! answers), so the disks are consistent with each other. Each disk keeps
//! its own bitmap per restore point (same name, in its own qcow2) and its
//! own chain of files on the target, so each is incremental on its own: a
//! volume the parent restore point did not cover (attached since), or
//! whose bitmap is missing or inconsistent, is copied in full while the
//! others stay incremental ([`VolumeBackupOutcome::fallback_reason`]).
//!
//! ```text
//!  <id1>.qcow2 ◄── <id2>.qcow2 ◄── <id3>.qcow2                      the VM's disk
//!  <id1>.vol-V.qcow2 ◄── <id2>.vol-V.qcow2 ◄── <id3>.vol-V.qcow2   volume V
//!                        <id2>.vol-W.qcow2 ◄── <id3>.vol-W.qcow2   volume W (attached after id1: full in id2)
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The dirty bitmap that tracks writes made after the backup `backup_id`.
pub fn bitmap_name(backup_id: uuid::Uuid) -> String {
    format!("stratus-backup-{backup_id}")
}

/// One backup to take of a running VM's disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRequest {
    /// The restore point's id; names its bitmap ([`bitmap_name`]).
    pub backup_id: uuid::Uuid,
    /// The qcow2 file to write (absolute). A file left there by an earlier,
    /// interrupted attempt at the same backup is replaced.
    pub target: PathBuf,
    /// The restore point this one is incremental to; `None` for a full backup.
    pub parent: Option<BackupParent>,
    /// The files the parent restore point holds of the volumes it covered:
    /// a volume attached now is incremental to its file here (bitmap
    /// [`bitmap_name`]`(parent.backup_id)` in the volume), full when it has
    /// none. Ignored without `parent`. Every volume attached when the
    /// backup starts is backed up, into [`volume_backup_file`]`(target, id)`.
    #[serde(default)]
    pub volume_parents: Vec<VolumeBackupParent>,
}

/// A volume's file in the parent restore point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeBackupParent {
    pub volume_id: uuid::Uuid,
    pub file: PathBuf,
}

/// The file a volume's backup goes to, beside the VM disk's file
/// `DIR/<backup-id>.qcow2`: `DIR/<backup-id>.vol-<volume-id>.qcow2`. One
/// name per (restore point, volume), so a retried backup finds its own
/// files and a volume's chain is readable off the directory.
pub fn volume_backup_file(disk_file: &Path, volume_id: uuid::Uuid) -> PathBuf {
    let stem = disk_file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    disk_file.with_file_name(format!("{stem}.vol-{volume_id}.qcow2"))
}

/// The previous restore point of an incremental backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupParent {
    pub backup_id: uuid::Uuid,
    /// Its file: becomes the new file's backing file.
    pub file: PathBuf,
}

/// Full or incremental.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupMode {
    Full,
    Incremental,
}

/// What a finished backup holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupOutcome {
    /// What was actually taken (an incremental that fell back is `Full`).
    pub mode: BackupMode,
    /// Why an incremental backup was taken as a full one.
    pub fallback_reason: Option<String>,
    /// Guest data the backup holds: bytes allocated in the file's own layer
    /// (for an incremental, the dirty clusters copied).
    pub data_bytes: u64,
    /// Size of the file.
    pub file_bytes: u64,
    /// The disk's guest-visible size.
    pub disk_bytes: u64,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// Each data volume attached when the backup was taken, in attachment
    /// order. Empty for a VM without volumes (and from older agents).
    #[serde(default)]
    pub volumes: Vec<VolumeBackupOutcome>,
}

/// What a finished backup holds of one volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeBackupOutcome {
    pub volume_id: uuid::Uuid,
    /// Its file ([`volume_backup_file`]).
    pub file: PathBuf,
    pub mode: BackupMode,
    /// Why this volume was copied in full although the backup is
    /// incremental (no file in the parent restore point, bitmap missing or
    /// inconsistent).
    pub fallback_reason: Option<String>,
    pub data_bytes: u64,
    pub file_bytes: u64,
    /// The volume's guest-visible size.
    pub disk_bytes: u64,
    pub sha256: String,
}

/// A volume to rewrite from its file in a restore point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRestore {
    pub volume_id: uuid::Uuid,
    /// The volume's backup file (absolute; read through its chain).
    pub file: PathBuf,
}

/// Progress of a running backup, as QEMU's block job reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// What [`crate::Driver::backup_verify`] found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupCheck {
    /// SHA-256 of the file as it is now.
    pub sha256: String,
    /// Problems `qemu-img check` found in the file or its chain (empty: none).
    pub problems: Vec<String>,
}

/// Called with progress while a backup runs.
pub type ProgressFn = dyn Fn(BackupProgress) + Send + Sync;

/// The restore point that follows one being deleted, whose data must stop
/// depending on the deleted file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneChild {
    pub file: PathBuf,
    /// Its new backing file: the deleted one's parent. `None`: the deleted
    /// one was a full backup, and the child becomes one (standalone).
    pub new_backing: Option<PathBuf>,
}

/// The child's figures once the deleted restore point was merged into it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pruned {
    pub data_bytes: u64,
    pub file_bytes: u64,
    pub sha256: String,
}
