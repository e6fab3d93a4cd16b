//! The files of one VM under `data_dir/vms/<vm-id>/`, and the small records
//! (`vm.json`, `state.json`, `run/shutdown.json`) the driver keeps there so a
//! restarted agent knows what it had.
//!
//! ```text
//! vms/<vm-id>/
//!   vm.json            the VmSpec (written last by vm_create: its presence means "created")
//!   disks -> <pool>/vms/<vm-id>/   only for a VM in a shared storage pool: where
//!                      the four entries below live instead (see VmPaths::disks)
//!   disk.qcow2         copy-on-write overlay of the base image (the disk's first layer)
//!   disk.<id>.qcow2    further layers: one per snapshot (see snapshot.rs)
//!   snapshots.json     the snapshots and which layer is active (absent: just disk.qcow2)
//!   disk.qcow2.tmp     a disk being built (renamed into place when whole)
//!   state.json         last state the driver recorded: running/paused (with pid) or stopped/crashed
//!   volumes.json       the volumes attached to the VM, in attachment order, with their ports (see volume.rs)
//!   console.log        newest console output (bounded), console.offset: its first byte's offset
//!   run/qemu.pid       written and locked by QEMU, removed by QEMU when it exits cleanly
//!   run/qemu.log       QEMU's own messages (stderr, -D)
//!   run/qmp.sock       QMP, held open by the driver while the VM runs
//!   run/qga.sock       guest agent (virtio-serial org.qemu.guest_agent.0)
//!   run/console.sock   serial console, read by the driver into console.log
//!   run/stop-requested marker: the driver is ending this QEMU on purpose
//!   run/shutdown.json  the last QMP SHUTDOWN event (guest power-off, panic, signal, ...)
//!   export.json        a cold migration's export of the stopped VM's disk (request, qemu-nbd pid);
//!                      while it exists the VM does not start (see cold.rs)
//!   run/nbd.pid        that qemu-nbd's pidfile, run/nbd.log its messages
//!   import.json        the cold import that made this VM (request, later its outcome)
//!   incoming.json      an incoming live migration (see migrate.rs)
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use stratus_common::VmId;

use crate::{DriverError, VmRuntimeState};

/// Longest path a unix socket address can hold (`sun_path`, with its NUL).
pub(crate) const MAX_SOCKET_PATH: usize = 107;

/// Paths of one VM's files.
#[derive(Clone, Debug)]
pub(crate) struct VmPaths {
    pub dir: PathBuf,
    pub vm_json: PathBuf,
    /// The link to the disks' directory in a shared pool, if the VM has one.
    pub disks_link: PathBuf,
    pub state_json: PathBuf,
    pub volumes_json: PathBuf,
    pub console_log: PathBuf,
    pub console_offset: PathBuf,
    pub run: PathBuf,
    pub pidfile: PathBuf,
    pub qemu_log: PathBuf,
    pub qmp_sock: PathBuf,
    pub qga_sock: PathBuf,
    pub console_sock: PathBuf,
    pub stop_marker: PathBuf,
    pub shutdown_json: PathBuf,
}

impl VmPaths {
    pub fn new(vms_dir: &Path, id: VmId) -> Self {
        let dir = vms_dir.join(id.to_string());
        let run = dir.join("run");
        VmPaths {
            vm_json: dir.join("vm.json"),
            disks_link: dir.join("disks"),
            state_json: dir.join("state.json"),
            volumes_json: dir.join("volumes.json"),
            console_log: dir.join("console.log"),
            console_offset: dir.join("console.offset"),
            pidfile: run.join("qemu.pid"),
            qemu_log: run.join("qemu.log"),
            qmp_sock: run.join("qmp.sock"),
            qga_sock: run.join("qga.sock"),
            console_sock: run.join("console.sock"),
            stop_marker: run.join("stop-requested"),
            shutdown_json: run.join("shutdown.json"),
            run,
            dir,
        }
    }

    /// Where the disk's files (layers and their records) live: the pool
    /// directory `disks` links to for a VM in a shared storage pool, else
    /// the VM's own directory. Read from the link each time, so a record
    /// made before the link existed (the VM's creation) still finds them.
    /// The link's target is absolute and the same on every host that sees
    /// the pool, so file names recorded in the disks (backing files) are
    /// too.
    pub fn disks(&self) -> PathBuf {
        std::fs::read_link(&self.disks_link).unwrap_or_else(|_| self.dir.clone())
    }

    /// The disk's first layer (the copy-on-write overlay of the image).
    pub fn overlay(&self) -> PathBuf {
        self.disks().join("disk.qcow2")
    }

    /// The snapshot chain's record (see `snapshot.rs`).
    pub fn snapshots_json(&self) -> PathBuf {
        self.disks().join("snapshots.json")
    }

    /// The sockets, for cleanup.
    pub fn sockets(&self) -> [&Path; 3] {
        [&self.qmp_sock, &self.qga_sock, &self.console_sock]
    }
}

/// What `state.json` holds: the last state the driver recorded for the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StateRecord {
    #[serde(flatten)]
    pub state: VmRuntimeState,
    pub since: DateTime<Utc>,
    /// The QEMU process while `state` is running or paused.
    pub pid: Option<u32>,
}

impl StateRecord {
    pub fn new(state: VmRuntimeState, pid: Option<u32>) -> Self {
        StateRecord {
            state,
            since: Utc::now(),
            pid,
        }
    }
}

/// The last QMP `SHUTDOWN` event, as recorded by the monitor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ShutdownRecord {
    /// Whether the guest asked for it (power-off, reset, panic).
    pub guest: bool,
    /// QEMU's `ShutdownCause`, e.g. `guest-shutdown`, `host-signal`, `guest-panic`.
    pub reason: String,
}

/// Reads a JSON record; `Ok(None)` when the file does not exist.
pub(crate) fn read_json<T: DeserializeOwned>(
    path: &Path,
    what: &str,
) -> Result<Option<T>, DriverError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            DriverError::io(
                format!("cannot parse the {what}"),
                path,
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(DriverError::io(format!("cannot read the {what}"), path, e)),
    }
}

/// Writes a JSON record atomically (temporary file, then rename), so a crash
/// mid-write leaves the old record rather than half a new one.
pub(crate) fn write_json<T: Serialize>(
    path: &Path,
    what: &str,
    value: &T,
) -> Result<(), DriverError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| {
        DriverError::io(
            format!("cannot encode the {what}"),
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        )
    })?;
    write_atomic(path, &bytes)
        .map_err(|e| DriverError::io(format!("cannot write the {what}"), path, e))
}

/// Replaces `path` with `bytes` atomically.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
    }
    std::fs::rename(&tmp, path)
}

/// Removes a file; absent is fine.
pub(crate) fn remove_file_if_exists(path: &Path) -> Result<(), DriverError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DriverError::io("cannot remove a stale file", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_missing_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("state.json");
        assert_eq!(read_json::<StateRecord>(&p, "state").expect("read"), None);
        let rec = StateRecord::new(
            VmRuntimeState::Crashed {
                reason: "gone".into(),
            },
            None,
        );
        write_json(&p, "state", &rec).expect("write");
        assert_eq!(
            read_json::<StateRecord>(&p, "state").expect("read"),
            Some(rec)
        );
        std::fs::write(&p, b"{not json").expect("write");
        assert!(read_json::<StateRecord>(&p, "state").is_err());
    }

    #[test]
    fn disks_follow_the_pool_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = VmId::new();
        let p = VmPaths::new(&dir.path().join("vms"), id);
        assert_eq!(p.overlay(), p.dir.join("disk.qcow2"));
        let pool = dir.path().join("pool/vms").join(id.to_string());
        std::fs::create_dir_all(&pool).expect("mkdir");
        std::fs::create_dir_all(&p.dir).expect("mkdir");
        std::os::unix::fs::symlink(&pool, &p.disks_link).expect("link");
        assert_eq!(p.overlay(), pool.join("disk.qcow2"));
        assert_eq!(p.snapshots_json(), pool.join("snapshots.json"));
    }

    #[test]
    fn socket_paths_sit_in_the_run_dir() {
        let id = VmId::new();
        let p = VmPaths::new(Path::new("/var/lib/stratus/vms"), id);
        assert!(p.qmp_sock.starts_with(&p.run));
        assert!(p.dir.ends_with(id.to_string()));
        assert!(p.console_sock.as_os_str().len() <= MAX_SOCKET_PATH);
    }
}
