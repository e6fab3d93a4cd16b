//! Disk snapshots as a driver takes them: what the agent asks for
//! ([`SnapshotRequest`]) and what it gets back ([`SnapshotInfo`]).
//!
//! A snapshot freezes every disk of the VM at one moment (its own disk and
//! each data volume attached then, in one operation, so they are consistent
//! with each other) so it can be reverted to later. Snapshots are *external*: each one turns the disk layer written
//! until then into a read-only layer and puts a new, empty layer on top, so
//! taking one costs the same whatever the disk's size. Every snapshot adds a
//! layer every read may have to look through, which is why a VM may hold at
//! most [`MAX_SNAPSHOTS`]; deleting a snapshot merges its layer into the one
//! above, so the chain gets one shorter while the other snapshots keep their
//! content. How the QEMU driver keeps the chain is in
//! `crate::qemu::snapshot` (private module; see its docs).
//!
//! ```text
//!  base image ◄── S1's layer ◄── S2's layer ◄── active layer (the VM writes here)
//!  (shared,        (frozen)        (frozen)
//!   never written)
//!  volume V   ◄── S1's layer ◄── S2's layer ◄── active layer   (each attached volume alike)
//! ```
//!
//! A volume attached after a snapshot is not in it ([`SnapshotInfo::volumes`]
//! says which are): reverting to that snapshot leaves such a volume as it
//! is. A volume some snapshot covers cannot be detached (its layers belong
//! to the VM's snapshots until they are deleted).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use stratus_common::VmId;

use crate::DriverError;

/// Most snapshots one VM may hold. Each is a layer of the disk's backing
/// chain: reads of data the guest has not rewritten since walk down the
/// chain, so a long chain slows the disk down; QEMU's own limit is far higher.
pub const MAX_SNAPSHOTS: usize = stratus_common::MAX_SNAPSHOTS_PER_VM;

/// Longest snapshot name, in characters.
pub const MAX_SNAPSHOT_NAME: usize = 128;

/// One snapshot to take.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRequest {
    /// Chosen by the caller, so a retried request finds the snapshot an
    /// earlier attempt took (creating it again returns it).
    pub snapshot_id: uuid::Uuid,
    /// Unique per VM.
    pub name: String,
}

/// A snapshot of a VM's disks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub snapshot_id: uuid::Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
    /// The guest's file systems were frozen through the guest agent while
    /// the snapshot was taken, so they are consistent in it (not merely
    /// crash-consistent). Always false for a snapshot of a stopped VM: no
    /// guest ran to freeze (a VM stopped gracefully left its disk clean).
    pub quiesced: bool,
    /// Bytes allocated in the layers this snapshot froze (the VM's disk and
    /// its volumes): the data written between the previous snapshot and this
    /// one (plus what merging deleted snapshots below brought in).
    pub bytes: u64,
    /// The data volumes attached when the snapshot was taken, whose layers
    /// it froze too. Empty in records from before snapshots covered volumes.
    #[serde(default)]
    pub volumes: Vec<uuid::Uuid>,
}

impl SnapshotRequest {
    /// Refuses names no driver should record: empty, too long, or with
    /// control characters.
    pub fn validate(&self, id: VmId) -> Result<(), DriverError> {
        let bad = |reason: String| DriverError::InvalidSpec { id, reason };
        if self.name.trim().is_empty() {
            return Err(bad("snapshot name is empty".into()));
        }
        if self.name.chars().count() > MAX_SNAPSHOT_NAME {
            return Err(bad(format!(
                "snapshot name is longer than {MAX_SNAPSHOT_NAME} characters"
            )));
        }
        if self.name.chars().any(char::is_control) {
            return Err(bad("snapshot name contains control characters".into()));
        }
        Ok(())
    }
}

/// The error for a snapshot beyond [`MAX_SNAPSHOTS`].
pub(crate) fn limit_error(id: VmId) -> DriverError {
    DriverError::InvalidState {
        id,
        operation: "snapshot",
        state: format!(
            "at the limit of {MAX_SNAPSHOTS} snapshots (delete one first: deleting a snapshot \
             merges its layer into the next one and keeps the other snapshots' content)"
        ),
    }
}

/// The error for a second snapshot with a taken name.
pub(crate) fn name_taken(id: VmId, name: &str, existing: uuid::Uuid) -> DriverError {
    DriverError::Conflict {
        id,
        difference: format!("a snapshot named {name:?} already exists ({existing})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        let id = VmId::new();
        let req = |name: &str| SnapshotRequest {
            snapshot_id: uuid::Uuid::new_v4(),
            name: name.into(),
        };
        assert!(req("before upgrade").validate(id).is_ok());
        assert!(req(" ").validate(id).is_err());
        assert!(req("a\nb").validate(id).is_err());
        assert!(req(&"x".repeat(MAX_SNAPSHOT_NAME + 1))
            .validate(id)
            .is_err());
        let e = limit_error(id).to_string();
        assert!(e.contains("16 snapshots") && e.contains("merges"), "{e}");
        let e = name_taken(id, "a", uuid::Uuid::nil()).to_string();
        assert!(e.contains("a snapshot named \"a\" already exists"), "{e}");
    }
}
