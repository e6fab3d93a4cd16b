//! The agent protocol: what host agents and the controller say to each
//! other. Agents always connect in (so hosts need no open port):
//!
//! ```text
//!  agent                                   controller
//!  POST /v1/agent/enroll  (one-time token) ─► host record, host credential
//!  GET  /v1/agent/desired?since=R (long poll)◄─ VMs this host should run, and
//!                                               requests (exec) to carry out
//!  POST /v1/agent/report  (every 2 s, and   ─► heartbeat, facts, observed VM
//!                          on every change)     states with generations, and
//!                                               orphans (VMs running here the
//!                                               desired state does not mention)
//!                                               with what the agent did to them
//!  POST /v1/agent/requests/{id}/result      ─► a request's outcome
//!  PUT  /v1/agent/vms/{vm}/console          ─► new console output
//!  GET  /v1/agent/images/{id}/{part}        ◄─ image files, to cache
//! ```
//!
//! **Invariant**: the controller decides (desired state), the agent
//! converges and reports (observed state). Every observation carries a
//! generation that only grows; the controller ignores any observation not
//! newer than the last it applied for that VM.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use stratus_common::{HostId, ImageId, Name, StoragePoolId, VmId};
use utoipa::{IntoParams, ToSchema};

use crate::views::{BackupMode, HostState, ImageFormat, VmDesiredState};

/// What an agent knows about its host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostFacts {
    pub cpus: u32,
    pub memory_bytes: u64,
    /// Capacity of the file system holding the agent's data dir.
    pub disk_bytes: u64,
    pub qemu_version: Option<String>,
    /// The accelerator that works here (`kvm` or `tcg`).
    pub accel: Option<String>,
    /// `qemu` or `sim`.
    pub driver: String,
    /// Migration streams to and from this host are encrypted (the agent has
    /// `--migration-tls-dir`). Both ends of a migration must agree, so the
    /// scheduler only moves VMs between hosts with the same setting.
    #[serde(default)]
    pub migration_tls: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentEnroll {
    /// The one-time token from `stratus host enroll-token`.
    pub enroll_token: String,
    pub name: Name,
    /// Defaults to `default`.
    pub zone: Option<String>,
    /// Defaults to `default`.
    pub cluster: Option<String>,
    /// How operators and other hosts reach this host (informational here).
    pub address: String,
    pub facts: HostFacts,
    /// Tags the scheduler matches VMs' required and forbidden tags against
    /// (e.g. `ssd`, `gpu`); operators can change them later.
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentEnrolled {
    pub host_id: HostId,
    /// The host's own credential: kept by the agent, shown once.
    pub credential: String,
}

/// Observed state of one VM on a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ObservedVmState {
    Running,
    Stopped,
    /// The hypervisor process ended without being asked to.
    Crashed,
    /// The agent could not bring the VM to its desired state (reason says why).
    Failed,
    /// The host has nothing for this VM (destroyed, or never created).
    Absent,
}

/// What the guest agent inside a VM reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GuestAgentInfo {
    pub connected: bool,
    pub os_name: Option<String>,
    pub os_version: Option<String>,
    pub kernel: Option<String>,
    pub ip_addresses: Vec<String>,
    pub last_contact: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmObservation {
    pub vm_id: VmId,
    /// Grows with every observation of this VM by this host.
    pub generation: u64,
    pub state: ObservedVmState,
    pub reason: Option<String>,
    /// The last reboot request (see [`DesiredVm::reboot_generation`]) the
    /// agent has carried out.
    pub reboot_generation: u64,
    pub guest: Option<GuestAgentInfo>,
    /// The VM's intent generation (`DesiredVm::generation`) the agent had
    /// finished acting on when it made this observation; absent when it has
    /// not acted on any. Lets a job tell a report made after its intent was
    /// carried out from one made before.
    #[serde(default)]
    pub intent_generation: Option<u64>,
}

/// What an agent does with an orphan: a VM its host has that the
/// controller's desired state for the host does not mention (forgotten by
/// the controller, or placed elsewhere since, e.g. after the host was cut
/// off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OrphanAction {
    /// Destroyed, with its disks (the agent's default, `--orphans destroy`).
    Destroyed,
    /// Left untouched for the operator (`--orphans keep`).
    Kept,
}

/// An orphan found on the host, and what the agent did with it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OrphanReport {
    pub vm_id: VmId,
    pub action: OrphanAction,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentReport {
    pub facts: HostFacts,
    pub vms: Vec<VmObservation>,
    /// Orphans: kept ones in every report while they exist, destroyed ones
    /// in the few reports after their destruction. Absent from older agents.
    #[serde(default)]
    pub orphans: Vec<OrphanReport>,
    /// What the host finds of each shared storage pool the controller named
    /// in its last acknowledgement. Sent when it changes (and now and then
    /// to refresh the free space); absent means "unchanged".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pools: Option<Vec<PoolReport>>,
}

/// Which end of a migration a host is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationRole {
    Outgoing,
    Incoming,
}

/// A shared storage pool as the controller hands it to agents: the host
/// checks whether it sees the directory and reports back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PoolAssignment {
    pub id: StoragePoolId,
    pub name: String,
    /// Absolute; the same path on every host.
    pub path: String,
}

/// One host's view of one shared storage pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PoolReport {
    pub pool_id: StoragePoolId,
    /// Why the host cannot use the pool (directory missing, not writable,
    /// marked as another pool's); `None` when it can.
    pub error: Option<String>,
    /// Size of the pool's file system.
    pub total_bytes: u64,
    /// Free space of the pool's file system.
    pub available_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentReportAck {
    pub host_id: HostId,
    pub host_state: HostState,
    /// Observations ignored because a newer one was already applied.
    pub stale: u32,
    /// Every shared storage pool: the host reports whether it sees each.
    #[serde(default)]
    pub pools: Vec<PoolAssignment>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DesiredQuery {
    /// The revision the agent already has; the answer waits until a newer one
    /// exists or `wait_secs` pass.
    pub since: Option<u64>,
    /// At most 60 (default 0: answer at once).
    pub wait_secs: Option<u32>,
}

/// One part of an image an agent may download.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImagePart {
    Disk,
    Kernel,
    Initrd,
}

/// An image as an agent needs it to build a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DesiredImage {
    pub id: ImageId,
    pub format: ImageFormat,
    pub sha256: String,
    pub file_size: u64,
    /// Direct kernel boot: the kernel's SHA-256 (download `kernel`).
    pub kernel_sha256: Option<String>,
    /// Its initrd's SHA-256 (download `initrd`).
    pub initrd_sha256: Option<String>,
    pub cmdline: Option<String>,
}

/// A VM this host should hold, and in what state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DesiredVm {
    pub vm_id: VmId,
    pub name: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub image: DesiredImage,
    pub desired_state: VmDesiredState,
    /// Bumped by each reboot request; the agent reboots when this exceeds
    /// the last one it carried out.
    pub reboot_generation: u64,
    /// A VM restored from a backup: its disk is built from this backup file
    /// (absolute; read through its chain) instead of an empty overlay.
    #[serde(default)]
    pub restore_from: Option<String>,
    /// Volumes restored beside it from the same restore point: each built
    /// from its backup file (if not yet) and attached before the VM's first
    /// start. Listed until the VM's create job has seen it built.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restore_volumes: Vec<RestoreVolume>,
    /// The shared storage pool holding the VM's disk (its image is cached
    /// there too); `None`: the host's own data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolAssignment>,
    /// Set while the VM migrates to or from this host: the agent leaves it
    /// to the migration (no start, stop or create; not an orphan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationRole>,
    /// Grows with every new intent for this VM. A VM that went down by
    /// itself (crash, guest power-off) stays down until this grows: until
    /// the operator asks for something, not when anything else on the host
    /// changes.
    pub generation: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AgentRequestKind {
    /// Run a command in a VM through its guest agent.
    Exec {
        vm_id: VmId,
        argv: Vec<String>,
        timeout_secs: u32,
    },
    /// Back up the running VM's disk into `file` (absolute), incrementally to
    /// the parent restore point when there is one and its change tracking
    /// is intact. Progress is posted to `/v1/agent/requests/{id}/progress`.
    /// Every data volume attached when it starts is backed up with the disk
    /// (one moment for all), into `<file stem>.vol-<volume-id>.qcow2`,
    /// incremental to its file in the parent restore point
    /// (`volume_parents`) when there is one.
    Backup {
        vm_id: VmId,
        backup_id: uuid::Uuid,
        file: String,
        parent: Option<BackupParentRef>,
        #[serde(default)]
        volume_parents: Vec<VolumeFileRef>,
    },
    /// Replace the stopped VM's disk with the content of a backup file, and
    /// each of `volumes` (attached to the VM) with its file.
    Restore {
        vm_id: VmId,
        file: String,
        #[serde(default)]
        volumes: Vec<VolumeFileRef>,
    },
    /// Make the volume (created if it does not exist, attached to no VM)
    /// hold the content of a backup file.
    VolumeRestore {
        volume_id: uuid::Uuid,
        size_bytes: u64,
        file: String,
    },
    /// Read a backup file and its chain back: checksum and consistency;
    /// and each of `volume_files` (the restore point's volume files) alike.
    VerifyBackup {
        file: String,
        #[serde(default)]
        volume_files: Vec<String>,
    },
    /// Create the volume's file if it has none (blank, or a copy-on-write
    /// clone of `image`, which the host caches like a VM's) and attach it
    /// to the VM (hot-plugged when it runs). With `pool`, the file is (or
    /// is made) in that shared pool and the image cached in the pool's own
    /// cache.
    VolumeAttach {
        vm_id: VmId,
        volume_id: uuid::Uuid,
        size_bytes: u64,
        image: Option<DesiredImage>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool: Option<PoolAssignment>,
    },
    /// Detach the volume from the VM (hot-unplugged when it runs).
    VolumeDetach { vm_id: VmId, volume_id: uuid::Uuid },
    /// Grow the volume (live when attached to a running VM).
    VolumeResize {
        volume_id: uuid::Uuid,
        size_bytes: u64,
        /// The shared pool holding the volume's file, if it is in one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool: Option<PoolAssignment>,
    },
    /// Delete the volume's file (from its shared pool, with `pool`).
    VolumeDelete {
        volume_id: uuid::Uuid,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool: Option<PoolAssignment>,
    },
    /// Snapshot the VM's disk and its attached volumes (live when it runs).
    SnapshotCreate {
        vm_id: VmId,
        snapshot_id: uuid::Uuid,
        name: String,
    },
    /// Make the stopped VM's disk what it was at the snapshot.
    SnapshotRevert {
        vm_id: VmId,
        snapshot_id: uuid::Uuid,
    },
    /// Delete a snapshot, merging its layer (live when the VM runs).
    SnapshotDelete {
        vm_id: VmId,
        snapshot_id: uuid::Uuid,
    },
    /// Source of a live migration, before the destination is prepared:
    /// what only this host's records say about the VM (its attached volumes
    /// and their hot-plug ports). The answer's `migration` is the driver's
    /// `OutgoingVm`. Changes nothing.
    MigrateDescribe { vm_id: VmId },
    /// Destination of a live migration: build the VM (as this host's
    /// desired state shows it, marked incoming) and wait for its state with
    /// QEMU listening on the host's migration address. `incoming` is the
    /// driver's `IncomingRequest`; the answer's `migration` its
    /// `IncomingReady`.
    MigratePrepare {
        vm_id: VmId,
        incoming: serde_json::Value,
    },
    /// Source of a live migration: send the running VM to the destination
    /// (`request` is the driver's `MigrateRequest`), posting progress. The
    /// answer's `migration` is the driver's `MigrateOutcome`.
    MigrateSend {
        vm_id: VmId,
        request: serde_json::Value,
    },
    /// Destination: the VM arrived; record it as running here.
    MigrateFinish { vm_id: VmId },
    /// Source: stop a migration in progress (the VM keeps running here).
    MigrateCancel { vm_id: VmId },
    /// Destination: end the waiting (or half-arrived) VM and remove
    /// everything made for it.
    MigrateAbortIncoming { vm_id: VmId },
    /// Source of a cold migration: serve the stopped VM's disk read-only
    /// (`request` is the driver's `ExportRequest`; the answer's `migration`
    /// its `DiskExport`).
    MigrateExport {
        vm_id: VmId,
        request: serde_json::Value,
    },
    /// Source: stop serving the disk.
    MigrateExportStop { vm_id: VmId },
    /// Destination of a cold migration: build the VM (as this host's
    /// desired state shows it, incoming) with its disk copied from the
    /// source's `export` (the driver's `DiskExport`), posting progress.
    MigrateImport {
        vm_id: VmId,
        export: serde_json::Value,
    },
    /// Destination of a cold move within one shared pool: take the VM over,
    /// its disks where they are.
    MigrateAdopt { vm_id: VmId },
    /// Forget the stopped VM here: with `keep_disks`, its disks in a shared
    /// pool stay (another host has them now), else they go too.
    MigrateRelease { vm_id: VmId, keep_disks: bool },
    /// Delete a backup file, first merging it into `child` (the restore
    /// point built on it) so the child stays whole.
    /// `volumes`: the restore point's volume files, each merged into its
    /// child's file of the same volume, or just removed.
    DeleteBackup {
        file: String,
        child: Option<BackupChildRef>,
        #[serde(default)]
        volumes: Vec<VolumeBackupDelete>,
    },
}

/// A volume's file on its host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VolumeOnHost {
    pub size_bytes: u64,
    pub allocated_bytes: u64,
}

/// What the host measured of a snapshot it took.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotTaken {
    pub quiesced: bool,
    pub bytes: u64,
    /// The volumes it covers (absent from agents older than that).
    #[serde(default)]
    pub volumes: Vec<uuid::Uuid>,
}

/// A volume to build from a backup file and attach to a new VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RestoreVolume {
    pub volume_id: uuid::Uuid,
    pub size_bytes: u64,
    pub file: String,
}

/// One volume's file of a restore point, by volume.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VolumeFileRef {
    pub volume_id: uuid::Uuid,
    pub file: String,
}

/// One volume's file of a restore point being deleted, and its child's file
/// of the same volume (absent: no later restore point builds on it).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VolumeBackupDelete {
    pub volume_id: uuid::Uuid,
    pub file: String,
    pub child: Option<BackupChildRef>,
}

/// A volume's child file after a merge.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VolumePruned {
    pub volume_id: uuid::Uuid,
    pub data_bytes: u64,
    pub file_bytes: u64,
    pub sha256: String,
}

/// What a backup request produced of one volume.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VolumeBackupDone {
    pub volume_id: uuid::Uuid,
    pub file: String,
    pub mode: BackupMode,
    pub fallback_reason: Option<String>,
    pub data_bytes: u64,
    pub file_bytes: u64,
    pub disk_bytes: u64,
    pub sha256: String,
}

/// What a verify request found in one volume's file.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VolumeChecked {
    pub file: String,
    pub sha256: String,
    pub problems: Vec<String>,
}

/// The restore point built on one being deleted.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BackupChildRef {
    pub file: String,
    /// Its new backing file (the deleted one's parent); absent: it becomes
    /// a full backup.
    pub new_backing: Option<String>,
}

/// The child's figures after a merge.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BackupPruned {
    pub data_bytes: u64,
    pub file_bytes: u64,
    pub sha256: String,
}

/// The restore point an incremental backup builds on.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BackupParentRef {
    pub backup_id: uuid::Uuid,
    pub file: String,
}

/// What a backup request produced.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BackupDone {
    pub mode: BackupMode,
    pub fallback_reason: Option<String>,
    pub data_bytes: u64,
    pub file_bytes: u64,
    pub disk_bytes: u64,
    pub sha256: String,
    pub duration_ms: u64,
    /// Each volume attached when it was taken.
    #[serde(default)]
    pub volumes: Vec<VolumeBackupDone>,
}

/// What a verify request found.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BackupChecked {
    pub sha256: String,
    pub problems: Vec<String>,
    /// The volume files asked for, in the order asked.
    #[serde(default)]
    pub volumes: Vec<VolumeChecked>,
}

/// How far a long request has come.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// The host's words on it (a migration's phase, dirty rate, expected
    /// downtime), shown as the job's message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentRequest {
    pub id: uuid::Uuid,
    pub request: AgentRequestKind,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentDesired {
    pub host_id: HostId,
    /// Changes whenever anything below does.
    pub revision: u64,
    pub vms: Vec<DesiredVm>,
    /// Requests not yet answered (each is delivered until answered).
    pub requests: Vec<AgentRequest>,
}

/// The output of a command run in a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecResult {
    pub exit_code: i32,
    /// Standard output, base64.
    pub stdout_base64: String,
    /// Standard error, base64.
    pub stderr_base64: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentRequestResult {
    /// An exec's output.
    pub result: Option<ExecResult>,
    /// A backup's outcome.
    #[serde(default)]
    pub backup: Option<BackupDone>,
    /// A verification's findings.
    #[serde(default)]
    pub verified: Option<BackupChecked>,
    /// A deleted backup's child, merged.
    #[serde(default)]
    pub pruned: Option<BackupPruned>,
    /// A deleted backup's volume files merged into the child's.
    #[serde(default)]
    pub pruned_volumes: Option<Vec<VolumePruned>>,
    /// A snapshot taken.
    #[serde(default)]
    pub snapshot: Option<SnapshotTaken>,
    /// Snapshots a revert dropped (those taken after the one reverted to).
    #[serde(default)]
    pub dropped_snapshots: Option<Vec<uuid::Uuid>>,
    /// A volume as the host has it now.
    #[serde(default)]
    pub volume: Option<VolumeOnHost>,
    /// A migration step's answer (the driver's `IncomingReady` or
    /// `MigrateOutcome`).
    #[serde(default)]
    pub migration: Option<serde_json::Value>,
    /// Why the request could not be carried out.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsoleAppend {
    /// The byte offset of `data` in the VM's console stream as the agent
    /// counts it; the controller ignores what it already has.
    pub offset: u64,
    /// The bytes, base64.
    pub data_base64: String,
}
