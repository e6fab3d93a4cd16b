//! Response bodies.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use stratus_common::{
    BackupId, BackupTargetId, EnrollmentTokenId, FlavorId, HostId, ImageId, JobId, ProjectId, Role,
    ServerGroupId, SnapshotId, StoragePoolId, TokenId, VmId, VolumeId,
};
use utoipa::ToSchema;

use crate::agent::{GuestAgentInfo, OrphanAction};

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable code, e.g. `invalid_request`, `not_found`,
    /// `name_in_use`.
    pub error_code: String,
    /// What went wrong, for a person.
    pub message: String,
    /// The id of this request, also in the `x-request-id` header; quote it
    /// when reporting a problem.
    pub request_id: String,
    /// The offending field of the request, when one is to blame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Structured detail for some errors: for `no_host_available`, the
    /// scheduler's explanation (a [`PlacementExplanation`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
}

macro_rules! page {
    ($(#[$doc:meta])* $page:ident, $item:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
        pub struct $page {
            pub items: Vec<$item>,
            /// Pass as `cursor` to get the next page; absent on the last page.
            pub next_cursor: Option<String>,
        }
    };
}

page!(
    /// A page of projects.
    ProjectPage, Project);
page!(
    /// A page of API tokens.
    TokenPage, Token);
page!(
    /// A page of hosts.
    HostPage, Host);
page!(
    /// A page of images.
    ImagePage, Image);
page!(
    /// A page of flavors.
    FlavorPage, Flavor);
page!(
    /// A page of VMs.
    VmPage, Vm);
page!(
    /// A page of jobs.
    JobPage, Job);

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Project {
    pub id: ProjectId,
    pub name: String,
    pub description: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Token {
    pub id: TokenId,
    pub name: String,
    pub role: Role,
    /// Absent for admin tokens, which span projects.
    pub project_id: Option<ProjectId>,
    /// The first characters of the secret, to recognise it by.
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// A newly created token. `secret` is shown this once and never again.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenCreated {
    pub token: Token,
    pub secret: String,
}

/// Who the presented token is.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    pub token: Token,
    pub project: Option<Project>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Heartbeating and accepting VMs.
    Up,
    /// Missed its heartbeats.
    Unreachable,
    /// Accepting no new VMs (operator's choice).
    Maintenance,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Host {
    pub id: HostId,
    pub name: String,
    pub state: HostState,
    pub zone: String,
    pub cluster: String,
    pub address: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub qemu_version: Option<String>,
    /// The accelerator the agent found to work (`kvm` or `tcg`).
    pub accel: Option<String>,
    /// Live migrations to and from this host are encrypted (QEMU TLS); VMs
    /// move only between hosts with the same setting.
    pub migration_tls: bool,
    /// Tags VMs can require or forbid.
    pub tags: Vec<String>,
    /// The shared storage pools the host sees (by name); every host also
    /// has its own `local` pool.
    #[serde(default)]
    pub pools: Vec<String>,
    /// What the VMs placed here take (stopped VMs keep their share).
    pub allocated: Allocation,
    pub created_at: DateTime<Utc>,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    /// VMs the host's agent found that the controller does not place there,
    /// and what it did with them: kept ones while they exist, destroyed ones
    /// for a day (only in single-host answers, `GET /v1/hosts/{host}`).
    #[serde(default)]
    pub orphans: Vec<HostOrphan>,
}

/// A VM found on a host without the controller's say (see
/// [`OrphanAction`]).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostOrphan {
    /// The VM's id (unknown to the controller, or a VM placed elsewhere).
    pub vm_id: VmId,
    pub action: OrphanAction,
    pub first_seen_at: DateTime<Utc>,
    /// When the host last reported it.
    pub last_seen_at: DateTime<Utc>,
}

/// Resources allocated to VMs on a host.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema)]
pub struct Allocation {
    pub vcpus: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

/// How the scheduler ranks the hosts of a cluster that can take a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Weigher {
    /// The host with the most free memory: load spread evenly.
    #[default]
    Spread,
    /// The host with the least free memory that fits: hosts filled one by
    /// one, leaving others empty (for power saving or large VMs).
    Pack,
}

/// A cluster: hosts sharing a scheduling policy.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Cluster {
    pub name: String,
    /// vCPU overcommit: a host offers `cpus × cpu_ratio` vCPUs.
    pub cpu_ratio: f64,
    pub ram_ratio: f64,
    pub disk_ratio: f64,
    pub weigher: Weigher,
    /// Hosts enrolled in it.
    pub hosts: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClusterPage {
    pub items: Vec<Cluster>,
    pub next_cursor: Option<String>,
}

/// How members of a server group are placed relative to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupPolicy {
    /// All on one host; a VM that cannot join the others is refused.
    Affinity,
    /// Each on a different host; a VM that cannot is refused.
    AntiAffinity,
    /// Together where possible.
    SoftAffinity,
    /// Apart where possible.
    SoftAntiAffinity,
}

/// VMs placed together or apart.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServerGroup {
    pub id: ServerGroupId,
    pub project_id: ProjectId,
    pub name: String,
    pub policy: GroupPolicy,
    /// VMs in the group.
    pub members: u64,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServerGroupPage {
    pub items: Vec<ServerGroup>,
    pub next_cursor: Option<String>,
}

/// Where a VM may be placed, as asked at creation; kept so later moves
/// honour it too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmPlacement {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub require_tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forbid_tags: Vec<String>,
    /// The shared storage pool the VM's disk is in: only hosts that see it
    /// can run the VM. Absent: the host's own `local` pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

/// Hosts one scheduler filter ruled out.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FilterCount {
    /// `state`, `zone`, `cluster`, `required_tags`, `forbidden_tags`,
    /// `excluded`, `affinity`, `anti_affinity`, `vcpus`, `memory` or `disk`.
    pub filter: String,
    pub hosts: u64,
}

/// What a host lacked of one resource.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Shortfall {
    /// `vcpus`, `memory` or `disk`.
    pub resource: String,
    pub needed: u64,
    pub available: u64,
}

/// A host that failed only for lack of room.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NearMiss {
    pub host_id: HostId,
    pub host: String,
    pub lacking: Vec<Shortfall>,
}

/// Why the scheduler chose as it did, or why it could not: every host is
/// counted under the first filter that ruled it out.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PlacementExplanation {
    pub hosts_total: u64,
    /// Hosts that could take the VM.
    pub feasible: u64,
    pub eliminated: Vec<FilterCount>,
    /// The closest hosts that lacked room (at most three; shown to admins
    /// only).
    pub near_misses: Vec<NearMiss>,
}

/// One VM of a dry run and where it would go.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PlannedVm {
    pub name: String,
    /// The host (shown to admins only: hosts are the operator's).
    pub host_id: Option<HostId>,
    pub host: Option<String>,
}

/// The answer to "where would this go, and why not elsewhere", with nothing
/// created.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PlacementPreview {
    /// Whether every VM asked for would be placed.
    pub fits: bool,
    /// A person's summary.
    pub message: String,
    pub placements: Vec<PlannedVm>,
    /// For the first VM (or the first that would not fit).
    pub explanation: PlacementExplanation,
}

/// VMs created together.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmBatch {
    pub items: Vec<VmOperation>,
}

/// A token agents present to enroll their hosts (once each, up to `uses`
/// hosts). Shown once.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EnrollmentTokenCreated {
    pub id: EnrollmentTokenId,
    pub token: String,
    pub expires_at: DateTime<Utc>,
    /// How many hosts may enroll with it.
    pub uses: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageFormat {
    Qcow2,
    Raw,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageVisibility {
    Private,
    Public,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageState {
    /// Registered; waiting for its data to be uploaded.
    Pending,
    /// Validated and stored; usable by VMs.
    Ready,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Image {
    pub id: ImageId,
    pub project_id: ProjectId,
    pub name: String,
    pub visibility: ImageVisibility,
    pub state: ImageState,
    pub format: Option<ImageFormat>,
    /// The disk size the guest sees.
    pub virtual_size: Option<u64>,
    /// Bytes stored.
    pub file_size: Option<u64>,
    /// SHA-256 of the stored file, hex.
    pub sha256: Option<String>,
    /// For direct kernel boot: the kernel's SHA-256 (absent: firmware boot
    /// from the disk).
    pub kernel_sha256: Option<String>,
    pub initrd_sha256: Option<String>,
    /// Kernel command line for direct kernel boot.
    pub cmdline: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A slice of a VM's serial console.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmConsole {
    /// The bytes, base64 (the console is a byte stream).
    pub data_base64: String,
    /// Offset of the first byte returned.
    pub offset: u64,
    /// Pass as `offset` to read on from here (`--follow`).
    pub next_offset: u64,
    /// Output before `offset` was dropped to keep the log bounded.
    pub truncated_before: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Flavor {
    pub id: FlavorId,
    pub name: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub created_at: DateTime<Utc>,
}

/// What the operator asked the VM to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmDesiredState {
    Running,
    Stopped,
    Deleted,
}

/// What becomes of a VM that goes down by itself (its hypervisor process
/// ended without being asked to).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    /// It stays down (`crashed`) until someone starts it.
    #[default]
    Never,
    /// The controller starts it again, on its host, a few times; a VM that
    /// keeps crashing (by default a fourth crash within 10 minutes) is left
    /// down with a reason that says restarts were given up.
    OnCrash,
}

impl RestartPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Never => "never",
            RestartPolicy::OnCrash => "on_crash",
        }
    }
}

/// What the VM is, as last observed.
///
/// ```text
///  create ─► creating ─► stopped ◄──► starting ─► running ─► stopping ─┐
///               │           ▲                       │  ▲               │
///               ▼           └───────────────────────┼──┴─ rebooting    │
///             failed                  crashed ◄─────┘                  │
///  delete (any state) ─► deleting ─► (gone)          stopped ◄─────────┘
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Creating,
    Starting,
    Running,
    Stopping,
    Stopped,
    Rebooting,
    Crashed,
    Failed,
    Deleting,
    /// Moving to another host (live: it keeps running).
    Migrating,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Rebooting => "rebooting",
            VmState::Crashed => "crashed",
            VmState::Failed => "failed",
            VmState::Deleting => "deleting",
            VmState::Migrating => "migrating",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    pub id: VmId,
    pub project_id: ProjectId,
    pub name: String,
    pub flavor_id: FlavorId,
    pub image_id: ImageId,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub desired_state: VmDesiredState,
    pub state: VmState,
    /// Why the VM is in its state, when that needs saying (a failure, a
    /// crash, an automatic restart, restarts given up).
    pub state_reason: Option<String>,
    /// What happens when the VM goes down by itself.
    pub restart_policy: RestartPolicy,
    /// The host the VM is placed on, once placed.
    pub host_id: Option<HostId>,
    /// The shared storage pool holding the VM's disk; `None`: the host's
    /// own `local` pool.
    #[serde(default)]
    pub pool_id: Option<StoragePoolId>,
    /// While the VM migrates: the host it is moving to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_target: Option<HostId>,
    /// The server group the VM belongs to.
    pub server_group_id: Option<ServerGroupId>,
    /// The placement constraints it was created with.
    pub placement: VmPlacement,
    /// What the guest agent inside the VM last reported.
    pub guest: Option<GuestAgentInfo>,
    /// When the host last reported on this VM.
    pub observed_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// An accepted VM operation: the VM as recorded and the job carrying it out.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmOperation {
    pub vm: Vm,
    pub job: Job,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    /// Cancellation requested; the job is unwinding.
    Cancelling,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobError {
    pub code: String,
    pub message: String,
}

/// One line of a job's step log.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobEvent {
    pub at: DateTime<Utc>,
    pub step: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub id: JobId,
    /// Absent for jobs that belong to no project (host operations).
    pub project_id: Option<ProjectId>,
    /// What the job does, e.g. `vm_create`.
    pub kind: String,
    /// The kind of resource acted on, e.g. `vm`.
    pub target_kind: String,
    pub target_id: uuid::Uuid,
    pub state: JobState,
    /// 0..=100.
    pub progress: u8,
    pub current_step: Option<String>,
    pub error: Option<JobError>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// The step log, oldest first (only in single-job answers).
    #[serde(default)]
    pub events: Vec<JobEvent>,
}

/// What turning maintenance on or off did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostMaintenance {
    pub host: Host,
    /// One entry per VM that was on the host when maintenance was turned
    /// on: the job moving it, or why it cannot move.
    pub vms: Vec<Evacuation>,
}

/// One VM leaving a host in maintenance.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Evacuation {
    pub vm_id: VmId,
    pub name: String,
    /// Where the scheduler sends it.
    pub target_host_id: Option<HostId>,
    /// The `vm_migrate` job moving it.
    pub job_id: Option<JobId>,
    /// Why it stays (no capacity elsewhere, busy with another job, ...).
    pub error: Option<String>,
}

/// A shared storage pool: one directory that several hosts mount (NFS, a
/// cluster file system). VMs created in it keep their disks there, so any
/// host that sees the pool can run them and live migration moves memory
/// only. Every host also has its own pool, `local` (the agent's data
/// directory), whose capacity is the host's `disk_bytes`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StoragePool {
    pub id: StoragePoolId,
    pub name: String,
    /// Absolute; the same path on every host.
    pub path: String,
    /// Size of the pool's file system, as last reported by a host that sees
    /// it (0 until one has).
    pub capacity_bytes: u64,
    /// Free space of the file system, as last reported.
    pub available_bytes: u64,
    /// The disks of the VMs placed in the pool, as the scheduler counts
    /// them: a VM is placed only if this plus its disk fits the capacity.
    pub allocated_bytes: u64,
    /// Hosts that checked the pool: those that see it and those that could
    /// not, with why.
    #[serde(default)]
    pub hosts: Vec<PoolHost>,
    pub created_at: DateTime<Utc>,
}

/// One host's view of a shared storage pool.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PoolHost {
    pub host_id: HostId,
    pub host: String,
    /// Why the host cannot use the pool; `None` when it can.
    pub error: Option<String>,
    pub reported_at: DateTime<Utc>,
}

/// A directory backups are written to. Every host that runs VMs to back up,
/// or restores them, must see it at the same path (e.g. an NFS mount).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BackupTarget {
    pub id: BackupTargetId,
    pub name: String,
    pub path: String,
    pub created_at: DateTime<Utc>,
}

/// Full or incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackupMode {
    /// The whole disk.
    Full,
    /// Only what changed since the parent restore point.
    Incremental,
}

/// Where a backup stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackupStatus {
    Running,
    /// Complete: a restore point.
    Succeeded,
    /// Never a restore point; `error` says why.
    Failed,
    /// Being deleted (merged into the restore point built on it).
    Deleting,
}

/// One backup of a VM's disk: a restore point once `succeeded`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Backup {
    pub id: BackupId,
    pub project_id: ProjectId,
    /// The VM backed up (it may have been deleted since).
    pub vm_id: VmId,
    pub vm_name: String,
    pub target_id: BackupTargetId,
    /// The restore point this one is incremental to.
    pub parent_id: Option<BackupId>,
    pub requested_mode: BackupMode,
    /// What was taken (an incremental whose change tracking was lost is
    /// taken as full; `fallback_reason` says why).
    pub mode: Option<BackupMode>,
    pub fallback_reason: Option<String>,
    pub status: BackupStatus,
    pub error: Option<String>,
    /// The file, absolute (target path + name).
    pub file: String,
    pub job_id: JobId,
    /// Size of the disk backed up.
    pub disk_bytes: u64,
    /// Guest data this backup holds (for an incremental: what changed).
    pub data_bytes: Option<u64>,
    pub file_bytes: Option<u64>,
    /// SHA-256 of the file, recorded when the backup completed.
    pub sha256: Option<String>,
    /// How long the copy took.
    pub duration_ms: Option<u64>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The last verification: when, and whether the file and its chain were
    /// intact.
    pub verified_at: Option<DateTime<Utc>>,
    pub verify_ok: Option<bool>,
    /// The data volumes this restore point covers (attached when it was
    /// taken), each with a file of its own.
    pub volumes: Vec<BackupVolume>,
}

/// One data volume in a restore point.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BackupVolume {
    pub volume_id: VolumeId,
    /// Its name when the backup was taken (the volume may be gone since).
    pub volume_name: String,
    /// Its file, absolute: `<target>/<vm-id>/<backup-id>.vol-<volume-id>.qcow2`.
    pub file: String,
    /// Full or incremental (to its file in the parent restore point).
    pub mode: BackupMode,
    /// Why it was copied in full in an incremental restore point (attached
    /// since the parent, change tracking lost).
    pub fallback_reason: Option<String>,
    /// The volume's size.
    pub disk_bytes: u64,
    /// Guest data this file holds (for an incremental: what changed).
    pub data_bytes: u64,
    pub file_bytes: u64,
    pub sha256: String,
}

page!(
    /// A page of backups.
    BackupPage, Backup);

/// What reading a backup back found.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BackupVerification {
    pub backup: Backup,
    /// The file's SHA-256 equals the one recorded, and `qemu-img check`
    /// found nothing wrong in it or its chain.
    pub ok: bool,
    pub sha256: String,
    pub problems: Vec<String>,
}

/// A backup accepted: its record and the job that takes it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BackupOperation {
    pub backup: Backup,
    pub job: Job,
}

/// When a VM is backed up by itself, and which of its restore points are
/// kept (the others are deleted, merged into the ones built on them).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BackupPolicy {
    pub vm_id: VmId,
    pub project_id: ProjectId,
    /// Where scheduled backups go (absent: the VM's usual target).
    pub target_id: Option<BackupTargetId>,
    /// A backup at most this often (absent: no schedule, retention only).
    pub every_secs: Option<u64>,
    /// Keep the newest N restore points.
    pub keep_last: u32,
    /// Keep the newest restore point of each of the last N days (UTC).
    pub keep_daily: u32,
    /// Keep the newest restore point of each of the last N weeks (UTC).
    pub keep_weekly: u32,
    pub updated_at: DateTime<Utc>,
}

/// Where a snapshot stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotStatus {
    Creating,
    Ready,
    Deleting,
}

/// A disk snapshot of a VM: its disk, and the data volumes attached then,
/// as they were at `created_at`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    pub id: SnapshotId,
    pub vm_id: VmId,
    pub name: String,
    pub status: SnapshotStatus,
    /// The guest's file systems were frozen (through its guest agent) while
    /// it was taken, so it is consistent; `false`: crash-consistent only.
    pub quiesced: Option<bool>,
    /// Bytes its layers hold on the host.
    pub bytes: Option<u64>,
    /// The data volumes it covers (attached when it was taken; known once it
    /// is ready). A reverted VM gets these volumes back as they were; a
    /// volume a snapshot covers cannot be detached.
    #[serde(default)]
    pub volumes: Vec<VolumeId>,
    /// The job that took (or deletes) it.
    pub job_id: JobId,
    pub created_at: DateTime<Utc>,
    /// Taken by the VM's snapshot policy, which deletes it (merging its
    /// layer) once it is older than the policy's newest `keep`; an
    /// operator's snapshots are never deleted automatically.
    pub scheduled: bool,
}

/// A VM's snapshot policy: a snapshot at most every `every_secs`, and the
/// policy's own snapshots kept to the newest `keep` (older ones are merged
/// away, so the VM's chain stays bounded without anyone deleting by hand).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotPolicy {
    pub vm_id: VmId,
    pub project_id: ProjectId,
    /// A snapshot at most this often (absent: only `policy run`).
    pub every_secs: Option<u64>,
    /// The policy's snapshots kept, newest first.
    pub keep: u32,
    pub updated_at: DateTime<Utc>,
}

/// A snapshot operation accepted: the snapshot and the job carrying it out.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotOperation {
    pub snapshot: Snapshot,
    pub job: Job,
}

/// Where a volume stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VolumeStatus {
    Available,
    Attaching,
    Attached,
    Detaching,
}

/// A data volume: a disk of its own, attached to at most one VM at a time
/// (hot-plugged while the VM runs).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Volume {
    pub id: VolumeId,
    pub project_id: ProjectId,
    pub name: String,
    pub size_bytes: u64,
    /// The image it started as a copy-on-write clone of (absent: blank).
    pub image_id: Option<ImageId>,
    pub status: VolumeStatus,
    /// The host holding its file (from its first attach on; a local
    /// volume can be attached only to VMs there). For a volume in a shared
    /// pool: the host it was last attached on.
    pub host_id: Option<HostId>,
    pub vm_id: Option<VmId>,
    /// The shared storage pool holding its file. Absent: the `local` pool
    /// of the host it is first attached on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_id: Option<StoragePoolId>,
    /// The name of that pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    pub created_at: DateTime<Utc>,
}

page!(
    /// A page of volumes.
    VolumePage, Volume);

/// A volume change accepted: the volume and the job carrying it out.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VolumeOperation {
    pub volume: Volume,
    pub job: Job,
}
