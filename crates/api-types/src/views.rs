//! Response bodies.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use stratus_common::{
    EnrollmentTokenId, FlavorId, HostId, ImageId, JobId, ProjectId, Role, TokenId, VmId,
};
use utoipa::ToSchema;

use crate::agent::GuestAgentInfo;

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
    pub created_at: DateTime<Utc>,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
}

/// A one-time token an agent presents to enroll its host. Shown once.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EnrollmentTokenCreated {
    pub id: EnrollmentTokenId,
    pub token: String,
    pub expires_at: DateTime<Utc>,
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
    /// Why the VM is in its state, when that needs saying (a failure, a crash).
    pub state_reason: Option<String>,
    /// The host the VM is placed on, once placed.
    pub host_id: Option<HostId>,
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
