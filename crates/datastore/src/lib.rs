//! The store: the only place Stratus writes SQL.
//!
//! One [`Datastore`] over either backend, chosen at start by URL:
//! - `sqlite:///path/stratus.db` — the embedded default. WAL mode, one writer
//!   connection (so transactions never deadlock on lock upgrades), several
//!   readers, and an exclusive lock file beside the database so a second
//!   controller on the same file refuses to start.
//! - `postgres://...` — several controllers on one database.
//!
//! The SQL is portable (see `migrations/`), so every function runs unchanged
//! on both backends, and every function is tested on both
//! (`tests/datastore.rs`).
//!
//! **Invariant**: the database is the source of truth. Every multi-row change
//! (an intent plus its job, a job outcome plus the VM it settles) happens in
//! one transaction.

mod create_batch;
mod db;
mod migrations;
pub mod model;
mod page;
mod wal_sync;

mod agents;
mod backups;
mod flavors;
mod hosts;
mod images;
mod jobs;
mod leases;
mod moves;
mod orphans;
mod pools;
mod projects;
mod sagas;
mod scheduling;
mod snapshots;
mod tokens;
mod vms;
mod volumes;

pub use db::{Backend, Datastore, OpenError};
pub use page::{Page, PageRequest};

pub use agents::{HostRequestRecord, NewHost, CONSOLE_KEEP};
pub use backups::{
    BackupListFilter, BackupPolicyRecord, BackupRecord, BackupTargetRecord, BackupVolumeRecord,
    NewBackup, RestoredVolume, VolumeMerged,
};
pub use hosts::HostListFilter;
pub use images::{ImageData, ImageScope};
pub use jobs::{JobListFilter, JobOutcome, VmEffect};
pub use leases::LeaseRecord;
pub use pools::{HostPoolRecord, StoragePoolRecord};
pub use sagas::Adopt;
pub use scheduling::{ClusterChange, SchedulerSnapshot, DEFAULT_RATIOS_MILLI};
pub use snapshots::{SnapshotOrigin, SnapshotPolicyRecord, SnapshotRecord};
pub use tokens::NewToken;
pub use vms::{AutoRestart, CreateError, NewVm, RestartLimit, VmListFilter, VmToCreate};
pub use volumes::VolumeRecord;
