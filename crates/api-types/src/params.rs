//! Request bodies and query parameters.

use serde::Deserialize;
use stratus_common::{Name, Role};
use utoipa::{IntoParams, ToSchema};

use crate::views::{
    GroupPolicy, HostState, ImageFormat, ImageState, ImageVisibility, JobState, RestartPolicy,
    VmState, Weigher,
};

/// Pagination shared by every list: at most `limit` items (default 100, at most
/// 1000) after the opaque `cursor` returned by the previous page.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Items per page, 1..=1000 (default 100).
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProjectCreate {
    pub name: Name,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ProjectFilter {
    /// Only the project with this name.
    pub name: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    pub name: Name,
    pub role: Role,
    /// Project (name or id) the token belongs to. Required for `member` and
    /// `reader`; must be absent for `admin`. Members may only create tokens
    /// for their own project and never `admin` tokens.
    pub project: Option<String>,
    /// Days until the token expires; never when absent.
    pub expires_in_days: Option<u32>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TokenFilter {
    /// Project name or id.
    pub project: Option<String>,
    pub role: Option<Role>,
    /// Include revoked tokens (default false).
    pub include_revoked: Option<bool>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HostFilter {
    pub name: Option<String>,
    pub state: Option<HostState>,
    pub zone: Option<String>,
    pub cluster: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentTokenCreate {
    /// Hours until the token expires (default 24, at most 720).
    pub expires_in_hours: Option<u32>,
    /// How many hosts may enroll with it (default 1, at most 100000): one
    /// token for a rack, or for a simulated fleet.
    pub uses: Option<u32>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageCreate {
    pub name: Name,
    /// Project (name or id); defaults to the caller's project. Admins must
    /// name one.
    pub project: Option<String>,
    /// `public` images are visible to every project; only admins may create
    /// them.
    pub visibility: Option<ImageVisibility>,
    /// A file on the controller host to copy into the image store
    /// (admin only, because it reads the controller's file system). Without
    /// it, the image waits for its data at `PUT /v1/images/{image}/data`.
    pub path: Option<String>,
    /// The format the file must have; refused if `qemu-img info` disagrees.
    pub format: Option<ImageFormat>,
    /// For direct kernel boot: a kernel file on the controller host (admin).
    pub kernel_path: Option<String>,
    /// Its initrd, on the controller host (admin).
    pub initrd_path: Option<String>,
    /// Kernel command line (`console=ttyS0` is added when missing).
    pub cmdline: Option<String>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ImageFilter {
    /// Project name or id.
    pub project: Option<String>,
    pub name: Option<String>,
    pub state: Option<ImageState>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlavorCreate {
    pub name: Name,
    /// Virtual CPUs, 1..=256.
    pub vcpus: u32,
    /// Memory in bytes (at least 64 MiB, a multiple of 1 MiB).
    pub memory_bytes: u64,
    /// Root disk in bytes (at least 1 MiB, a multiple of 1 MiB).
    pub disk_bytes: u64,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FlavorFilter {
    pub name: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmCreate {
    pub name: Name,
    /// Project (name or id); defaults to the caller's project. Admins must
    /// name one.
    pub project: Option<String>,
    /// Flavor name or id.
    pub flavor: String,
    /// Image name or id (the caller's project's images and public ones).
    pub image: String,
    /// Start the VM once created (default true).
    pub start: Option<bool>,
    /// Only hosts in this zone.
    pub zone: Option<String>,
    /// Only hosts in this cluster.
    pub cluster: Option<String>,
    /// Only hosts carrying every one of these tags.
    #[serde(default)]
    pub require_tags: Vec<Name>,
    /// Only hosts carrying none of these tags.
    #[serde(default)]
    pub forbid_tags: Vec<Name>,
    /// Server group (name or id, in the VM's project) whose affinity or
    /// anti-affinity policy the VM follows.
    pub group: Option<String>,
    /// What happens when the VM goes down by itself (default `never`).
    pub restart_policy: Option<RestartPolicy>,
    /// Storage pool (name or id) for the VM's disk: a shared pool, or
    /// `local` (the default), the chosen host's own data directory. A
    /// shared pool limits placement to the hosts that see it.
    pub pool: Option<String>,
}

/// Several VMs of one shape, placed in one scheduling pass: named
/// `NAME-1` … `NAME-COUNT`, all placed or none (members of an anti-affinity
/// group land on distinct hosts).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmBatchCreate {
    /// 1..=1000.
    pub count: u32,
    /// The shape of every VM; `name` is the prefix.
    pub vm: VmCreate,
}

/// Changes to a cluster's scheduling policy; absent fields stay as they are.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterUpdate {
    /// vCPU overcommit (0.1..=64, e.g. 4.0).
    pub cpu_ratio: Option<f64>,
    /// Memory overcommit (0.1..=64, e.g. 1.0).
    pub ram_ratio: Option<f64>,
    /// Disk overcommit (0.1..=64, e.g. 1.0).
    pub disk_ratio: Option<f64>,
    pub weigher: Option<Weigher>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerGroupCreate {
    pub name: Name,
    /// Project (name or id); defaults to the caller's project. Admins must
    /// name one.
    pub project: Option<String>,
    pub policy: GroupPolicy,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ServerGroupFilter {
    /// Project name or id.
    pub project: Option<String>,
}

/// Changes to a host; absent fields stay as they are.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostUpdate {
    /// Tags to add.
    #[serde(default)]
    pub add_tags: Vec<Name>,
    /// Tags to remove.
    #[serde(default)]
    pub remove_tags: Vec<Name>,
}

/// Changes to a VM that need nothing of its host; absent fields stay as
/// they are.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmUpdate {
    /// What happens when the VM goes down by itself. Setting it (even to
    /// the same value) also re-arms automatic restarts that were given up.
    pub restart_policy: Option<RestartPolicy>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VmFilter {
    /// Project name or id.
    pub project: Option<String>,
    pub name: Option<String>,
    pub state: Option<VmState>,
    /// Host name or id (admin only: hosts are not visible to projects).
    pub host: Option<String>,
}

/// Scopes a name lookup in a path: admins resolving a *name* across
/// projects pass the project here.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ProjectScope {
    /// Project name or id, for resolving names.
    pub project: Option<String>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobFilter {
    /// Project name or id.
    pub project: Option<String>,
    pub state: Option<JobState>,
    /// Job kind, e.g. `vm_create`.
    pub kind: Option<String>,
    /// Id of the resource the job acts on.
    pub target: Option<uuid::Uuid>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobWait {
    /// Seconds to wait for the job to end before answering with its current
    /// state (default 30, at most 300).
    pub timeout_secs: Option<u32>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConsoleQuery {
    /// Read from this byte offset (default: the newest `max` bytes).
    pub offset: Option<u64>,
    /// At most this many bytes (default 65536, at most 1048576).
    pub max: Option<u32>,
    /// Project name or id, for resolving a VM name.
    pub project: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmExec {
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// Seconds to wait for the command (default 60, at most 600).
    pub timeout_secs: Option<u32>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupTargetCreate {
    pub name: Name,
    /// An absolute directory, the same path on every host (e.g. an NFS
    /// mount). It must exist on the hosts; backups go in `<path>/<vm id>/`.
    pub path: String,
}

/// Take a host out of service or return it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostMaintenanceSet {
    /// `true`: no new VMs are placed on the host and every VM on it is
    /// migrated away (running ones live, stopped ones cold); `false`: the
    /// host takes VMs again.
    pub enabled: bool,
}

/// Move a VM to another host: live when it runs (it keeps running), cold
/// when it is stopped.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmMigrate {
    /// Destination host (name or id); still checked by the scheduler.
    /// Default: the scheduler's choice among the hosts other than the
    /// VM's, by its placement constraints and server group.
    pub host: Option<String>,
    /// Move it stopped (its disk copied). Refused for a running VM: stop it
    /// first. A stopped VM always moves cold.
    #[serde(default)]
    pub cold: bool,
    /// Most bytes per second the migration may use (memory and disk).
    pub bandwidth: Option<u64>,
    /// Let QEMU slow the guest's vCPUs down when its memory changes faster
    /// than it can be sent.
    #[serde(default)]
    pub auto_converge: bool,
    /// Switch to post-copy (the guest runs on the destination, fetching the
    /// memory still missing) after this many pre-copy passes.
    pub postcopy_after_passes: Option<u32>,
    /// Storage pool for the disk at the destination (name or id, or
    /// `local`): how a move across clusters maps the VM's pool. Default:
    /// the pool it is in.
    pub pool: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StoragePoolCreate {
    /// `local` is taken: it names every host's own pool.
    pub name: Name,
    /// An absolute directory, mounted at the same path on every host that
    /// should see the pool. Hosts report whether they do.
    pub path: String,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupCreate {
    /// Take a full backup even when an incremental one is possible.
    #[serde(default)]
    pub full: bool,
    /// Backup target (name or id). Defaults to the target of the VM's last
    /// backup, else to the only target there is.
    pub target: Option<String>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BackupFilter {
    /// Only backups of this VM (name or id; a deleted VM by id).
    pub vm: Option<String>,
    /// Project name or id (admins: any project; default: all visible).
    pub project: Option<String>,
}

/// Where to restore a backup: into a new VM (`as_vm`) or over the VM it was
/// taken of (`in_place`, which must be stopped). Exactly one.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupRestore {
    /// Name of the new VM, in the backup's project. It gets the backed-up
    /// VM's image, flavor and size.
    pub as_vm: Option<Name>,
    #[serde(default)]
    pub in_place: bool,
    /// Start the new VM once restored (default true; `as_vm` only).
    pub start: Option<bool>,
}

/// A VM's backup policy. Retention keeps the union of `keep_last`,
/// `keep_daily` and `keep_weekly`; all zero keeps everything.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupPolicySet {
    /// Take a backup at most this often, in seconds (at least 60); absent:
    /// no schedule.
    pub every_secs: Option<u64>,
    #[serde(default)]
    pub keep_last: u32,
    #[serde(default)]
    pub keep_daily: u32,
    #[serde(default)]
    pub keep_weekly: u32,
    /// Backup target (name or id) for scheduled backups.
    pub target: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotPolicySet {
    /// Take a snapshot at most this often, in seconds (at least 60);
    /// absent: no schedule (`policy run` takes one on demand).
    pub every_secs: Option<u64>,
    /// How many of the policy's own snapshots to keep (1 to 15: a VM holds
    /// at most 16 snapshots, and the policy needs room for the next one).
    pub keep: u32,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// Unique among the VM's snapshots; 1-128 characters, no control
    /// characters.
    pub name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeCreate {
    pub name: Name,
    /// Project (name or id); defaults to the caller's project.
    pub project: Option<String>,
    /// At least 1 MiB; at least the image's size when `image` is given.
    pub size_bytes: u64,
    /// Start as a copy-on-write clone of this image (name or id).
    pub image: Option<String>,
    /// Storage pool (name or id) for the volume's file: a shared pool (its
    /// size is claimed against the pool's capacity, and it can be attached
    /// to VMs on every host that sees the pool), or `local` (the default),
    /// the data directory of the host it is first attached on.
    pub pool: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeAttach {
    /// The VM (name or id, in the volume's project).
    pub vm: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeResize {
    /// The new size: volumes only grow.
    pub size_bytes: u64,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VolumeFilter {
    /// Project name or id.
    pub project: Option<String>,
}
