//! The driver's error type: what went wrong, on which VM, in words an operator
//! can act on. Sources are chained, never interpolated into the message.

use std::fmt;
use std::io;
use std::path::PathBuf;

use stratus_common::VmId;

/// Boxed source error, for the variants whose cause can be of several kinds.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything a [`crate::Driver`] operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The VM has no run directory (QEMU) or is not in the table (sim).
    #[error("VM {0} is not known to this driver")]
    NotFound(VmId),

    /// The operation does not apply to the VM's current state.
    #[error("cannot {operation} VM {id} while it is {state}")]
    InvalidState {
        id: VmId,
        operation: &'static str,
        state: String,
    },

    /// The spec handed to `vm_create` cannot be run.
    #[error("invalid spec for VM {id}: {reason}")]
    InvalidSpec { id: VmId, reason: String },

    /// What was asked for clashes with what exists: `vm_create` for an id
    /// that exists with another spec, a snapshot name already taken.
    #[error("conflict on VM {id}: {difference}")]
    Conflict { id: VmId, difference: String },

    /// The VM has no snapshot with this id (never taken, deleted, or dropped
    /// by a revert to an older one).
    #[error("VM {id} has no snapshot {snapshot_id}")]
    SnapshotNotFound { id: VmId, snapshot_id: uuid::Uuid },

    /// QEMU (or qemu-img) refused, failed or answered with an error.
    #[error("{context}")]
    Qemu {
        context: String,
        #[source]
        source: BoxError,
    },

    /// A file or directory of the driver could not be read or written.
    #[error("{context} ({})", path.display())]
    Io {
        context: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The guest agent inside the VM did not answer or answered with an error.
    #[error("guest agent of VM {id}: {context}")]
    GuestAgent {
        id: VmId,
        context: String,
        #[source]
        source: Option<BoxError>,
    },

    /// Something did not happen within its time bound.
    #[error("timed out {what}")]
    Timeout { what: String },

    /// A backup failed while it ran: the target ran out of space, the VM
    /// stopped, QEMU's job failed. Nothing partial is left at the target and
    /// the parent's change tracking is intact, so the backup can be retried.
    #[error("backup of VM {id} failed: {reason}")]
    Backup {
        id: VmId,
        reason: String,
        #[source]
        source: Option<BoxError>,
    },

    /// The driver cannot do this at all (e.g. `guest_exec` on the simulation).
    #[error("not supported: {0}")]
    Unsupported(String),

    /// The driver's own configuration is unusable.
    #[error("driver configuration: {0}")]
    Config(String),

    /// Live migration of this VM is refused before anything is done: a
    /// QEMU/accelerator combination known to corrupt guests, incompatible
    /// hosts, snapshot layers, attached volumes. The reason names what to do
    /// instead.
    #[error("live migration of VM {id} refused: {reason}")]
    MigrationRefused { id: VmId, reason: String },

    /// A live migration failed while it ran. On the source the VM still runs
    /// there (resumed if QEMU had paused it); the destination's incoming VM
    /// must be removed with `vm_migrate_abort_incoming`.
    #[error("live migration of VM {id} failed: {reason}")]
    Migration {
        id: VmId,
        reason: String,
        #[source]
        source: Option<BoxError>,
    },

    /// The volume does not exist on this host (the volume analog of
    /// [`DriverError::NotFound`], which names a VM).
    #[error("volume {0} does not exist on this host")]
    VolumeNotFound(uuid::Uuid),

    /// A volume request that can never succeed as asked: a bad spec, a
    /// shrink (the volume analog of [`DriverError::InvalidSpec`]).
    #[error("invalid request for volume {id}: {reason}")]
    InvalidVolumeSpec { id: uuid::Uuid, reason: String },

    /// The volume's state forbids the request: attached to another VM,
    /// deleted while attached, created again with another spec (the volume
    /// analog of [`DriverError::Conflict`] and [`DriverError::InvalidState`]).
    /// Can succeed later, once the other party lets go.
    #[error("volume {id}: {reason}")]
    VolumeConflict { id: uuid::Uuid, reason: String },
}

impl DriverError {
    pub(crate) fn io(
        context: impl Into<String>,
        path: impl Into<PathBuf>,
        source: io::Error,
    ) -> Self {
        DriverError::Io {
            context: context.into(),
            path: path.into(),
            source,
        }
    }

    pub(crate) fn qemu(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        DriverError::Qemu {
            context: context.into(),
            source: source.into(),
        }
    }

    pub(crate) fn timeout(what: impl Into<String>) -> Self {
        DriverError::Timeout { what: what.into() }
    }
}

/// What a QEMU process printed when it failed: used as the source of a
/// [`DriverError::Qemu`] when there is no richer error to chain.
#[derive(Debug)]
pub struct QemuSaid(pub String);

impl fmt::Display for QemuSaid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.trim().is_empty() {
            f.write_str("QEMU printed nothing")
        } else {
            write!(f, "QEMU said: {}", self.0.trim())
        }
    }
}

impl std::error::Error for QemuSaid {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_vm_and_do_not_repeat_the_source() {
        let id = VmId::new();
        let e = DriverError::io(
            "cannot write the VM spec",
            "/data/vms/x/vm.json",
            io::Error::new(io::ErrorKind::PermissionDenied, "denied"),
        );
        assert_eq!(
            e.to_string(),
            "cannot write the VM spec (/data/vms/x/vm.json)"
        );
        assert!(std::error::Error::source(&e).is_some());
        let e = DriverError::InvalidState {
            id,
            operation: "reboot",
            state: "stopped".into(),
        };
        assert_eq!(
            e.to_string(),
            format!("cannot reboot VM {id} while it is stopped")
        );
        assert_eq!(QemuSaid(" ".into()).to_string(), "QEMU printed nothing");
    }
}
