//! The VM driver: one [`Driver`] trait through which the host agent creates,
//! boots, stops and watches virtual machines, with two implementations:
//!
//! - [`QemuDriver`] runs one real QEMU process per VM (see [`qemu`] for the
//!   files, processes and sockets it keeps and how it re-adopts VMs after an
//!   agent restart);
//! - [`SimDriver`] keeps VMs in memory with the same state machine and events,
//!   cheap enough for thousands of simulated hosts in one test process.
//!
//! # The VM state machine
//!
//! Both drivers follow it; [`VmEvent`]s are sent on every arrow.
//!
//! ```text
//!            vm_create
//!                │
//!                ▼          vm_start            QMP cont / RESUME
//!   ┌────────► Stopped ─────────────► (Paused) ──────────────────► Running
//!   │            ▲ ▲                     prelaunch                 │  ▲  │
//!   │            │ └──── guest powers off, vm_stop, QEMU ends ─────┘  │  │
//!   │            │       cleanly (SIGTERM, quit)                       │  │
//!   │            │                                      QMP STOP/RESUME  │
//!   │  vm_stop   │                                      ⇄ Paused         │
//!   │ (nothing   │                                                       │
//!   │  to do)  Crashed ◄─── QEMU gone without a clean exit (SIGKILL, ────┘
//!   │            │          segfault, OOM killer); the guest panicked
//!   │            │ vm_start
//!   │            └──────────────────────────────────────► Running
//!   │
//!   └── vm_destroy from any state removes the VM (reported as Stopped)
//! ```
//!
//! `vm_reboot` resets a running VM without leaving `Running`.
//!
//! # QMP and the guest agent
//!
//! QEMU is driven through the `qapi` crate (typed QMP and guest agent
//! commands and events, generated from QEMU's schema). Checked against QEMU
//! 10.0.2 and qemu-ga 7.2: capability negotiation, `query-status`,
//! `system_powerdown`, `system_reset`, `quit`, `cont` and the
//! `SHUTDOWN`/`STOP`/`RESUME` events; `guest-sync`, `guest-ping`,
//! `guest-info`, `guest-get-osinfo`, `guest-network-get-interfaces`,
//! `guest-exec` and `guest-exec-status`. One caveat: qapi's schema predates
//! QEMU 10, and an event it does not know ends its event stream with a decode
//! error; the QEMU driver then reconnects QMP (see [`qemu`]).

pub mod backup;
pub mod driver;
pub mod error;
pub mod migrate;
pub mod qemu;
pub mod sim;
pub mod snapshot;
pub mod spec;
pub mod status;
pub mod volume;

pub use backup::{
    bitmap_name, volume_backup_file, BackupCheck, BackupMode, BackupOutcome, BackupParent,
    BackupProgress, BackupRequest, ProgressFn, PruneChild, Pruned, VolumeBackupOutcome,
    VolumeBackupParent, VolumeRestore,
};
pub use driver::Driver;
pub use error::{DriverError, QemuSaid};
pub use migrate::{
    compatibility_problem, live_migration_refusal, volumes_mismatch, DiskExport, DiskExportKind,
    ExportRequest, ImportOutcome, IncomingChain, IncomingDisk, IncomingLayer, IncomingReady,
    IncomingRequest, IncomingVolume, MigrateOutcome, MigratePhase, MigrateProgress,
    MigrateProgressFn, MigrateRequest, NbdTarget, OutgoingVm, VolumeTarget,
};
pub use qemu::{
    guest_agent_wait, probe_accel, Accel, AccelChoice, AccelProbe, QemuConfig, QemuDriver,
};
pub use sim::{SimConfig, SimDriver};
pub use snapshot::{SnapshotInfo, SnapshotRequest, MAX_SNAPSHOTS};
pub use spec::{BootSpec, ImageFormat, NicSpec, VmSpec};
pub use status::{
    ConsoleChunk, ExecOutput, GuestInfo, HostFacts, StopHow, VmEvent, VmRuntimeState, VmStatus,
};
pub use volume::{volume_serial, VolumeInfo, VolumeSpec, MAX_VOLUMES_PER_VM};
