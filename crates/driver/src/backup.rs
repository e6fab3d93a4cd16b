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

use std::path::PathBuf;

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
