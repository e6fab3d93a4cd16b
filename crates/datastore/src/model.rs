//! Records as the store keeps them, and their conversion to API views.
//!
//! Records carry what views must not show (hashes, leases, generations);
//! `into_view` drops it.

use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::Row;
use stratus_api_types::views::{self, HostState, ImageFormat, ImageState, ImageVisibility};
use stratus_api_types::views::{JobState, VmDesiredState, VmState};
use stratus_common::time::from_micros;
use stratus_common::*;

pub(crate) trait RowExt {
    fn text(&self, col: &str) -> Result<String, Error>;
    fn opt_text(&self, col: &str) -> Result<Option<String>, Error>;
    fn int(&self, col: &str) -> Result<i64, Error>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>, Error>;
    fn parse<T: std::str::FromStr>(&self, col: &str) -> Result<T, Error>;
    fn opt_parse<T: std::str::FromStr>(&self, col: &str) -> Result<Option<T>, Error>;
}

fn column_error(col: &str, e: impl std::fmt::Display) -> Error {
    Error::internal(format!("reading column {col}: {e}"))
}

impl RowExt for AnyRow {
    fn text(&self, col: &str) -> Result<String, Error> {
        self.try_get::<String, _>(col)
            .map_err(|e| column_error(col, e))
    }
    fn opt_text(&self, col: &str) -> Result<Option<String>, Error> {
        self.try_get::<Option<String>, _>(col)
            .map_err(|e| column_error(col, e))
    }
    fn int(&self, col: &str) -> Result<i64, Error> {
        self.try_get::<i64, _>(col)
            .map_err(|e| column_error(col, e))
    }
    fn opt_int(&self, col: &str) -> Result<Option<i64>, Error> {
        self.try_get::<Option<i64>, _>(col)
            .map_err(|e| column_error(col, e))
    }
    fn parse<T: std::str::FromStr>(&self, col: &str) -> Result<T, Error> {
        let s = self.text(col)?;
        s.parse()
            .map_err(|_| column_error(col, format!("unexpected value {s:?}")))
    }
    fn opt_parse<T: std::str::FromStr>(&self, col: &str) -> Result<Option<T>, Error> {
        match self.opt_text(col)? {
            None => Ok(None),
            Some(s) => s
                .parse()
                .map(Some)
                .map_err(|_| column_error(col, format!("unexpected value {s:?}"))),
        }
    }
}

/// Enums stored as their serde snake_case names.
pub(crate) fn enum_str<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        _ => String::new(),
    }
}

pub(crate) fn enum_parse<T: serde::de::DeserializeOwned>(
    row: &AnyRow,
    col: &str,
) -> Result<T, Error> {
    let s = row.text(col)?;
    serde_json::from_value(Value::String(s.clone()))
        .map_err(|_| column_error(col, format!("unexpected value {s:?}")))
}

pub(crate) fn opt_enum_parse<T: serde::de::DeserializeOwned>(
    row: &AnyRow,
    col: &str,
) -> Result<Option<T>, Error> {
    match row.opt_text(col)? {
        None => Ok(None),
        Some(s) => serde_json::from_value(Value::String(s.clone()))
            .map(Some)
            .map_err(|_| column_error(col, format!("unexpected value {s:?}"))),
    }
}

pub(crate) fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Sizes go into BIGINT; anything past i64::MAX is refused by validation long
/// before it gets here, so saturating is only a guard.
pub(crate) fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[derive(Debug, Clone)]
pub struct ProjectRecord {
    pub id: ProjectId,
    pub name: String,
    pub description: String,
    pub created_at: i64,
}

impl ProjectRecord {
    pub(crate) fn from_row(r: &AnyRow) -> Result<Self, Error> {
        Ok(ProjectRecord {
            id: r.parse("id")?,
            name: r.text("name")?,
            description: r.text("description")?,
            created_at: r.int("created_at")?,
        })
    }
    pub fn into_view(self) -> views::Project {
        views::Project {
            id: self.id,
            name: self.name,
            description: self.description,
            created_at: from_micros(self.created_at),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TokenRecord {
    pub id: TokenId,
    pub name: String,
    pub role: Role,
    pub project_id: Option<ProjectId>,
    pub token_hash: String,
    pub prefix: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
}

impl TokenRecord {
    pub(crate) fn from_row(r: &AnyRow) -> Result<Self, Error> {
        Ok(TokenRecord {
            id: r.parse("id")?,
            name: r.text("name")?,
            role: r.parse("role")?,
            project_id: r.opt_parse("project_id")?,
            token_hash: r.text("token_hash")?,
            prefix: r.text("prefix")?,
            created_at: r.int("created_at")?,
            expires_at: r.opt_int("expires_at")?,
            revoked_at: r.opt_int("revoked_at")?,
            last_used_at: r.opt_int("last_used_at")?,
        })
    }
    pub fn into_view(self) -> views::Token {
        views::Token {
            id: self.id,
            name: self.name,
            role: self.role,
            project_id: self.project_id,
            prefix: self.prefix,
            created_at: from_micros(self.created_at),
            expires_at: self.expires_at.map(from_micros),
            revoked_at: self.revoked_at.map(from_micros),
            last_used_at: self.last_used_at.map(from_micros),
        }
    }
}

#[derive(Debug, Clone)]
pub struct HostRecord {
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
    pub accel: Option<String>,
    /// Its migration streams are encrypted (stored as `migration_transport`
    /// `tls`, else `plain`).
    pub migration_tls: bool,
    pub generation: i64,
    pub desired_revision: i64,
    pub driver: Option<String>,
    pub tags: Vec<String>,
    /// The shared storage pools the host reported as usable, by name.
    pub pools: Vec<String>,
    pub alloc_vcpus: u64,
    pub alloc_memory_bytes: u64,
    pub alloc_disk_bytes: u64,
    pub created_at: i64,
    pub last_heartbeat_at: Option<i64>,
}

/// `hosts.migration_transport` of a host whose migrations use TLS.
pub(crate) const TRANSPORT_TLS: &str = "tls";

/// How [`HostRecord::migration_tls`] is stored.
pub(crate) fn transport_column(tls: bool) -> &'static str {
    if tls {
        TRANSPORT_TLS
    } else {
        "plain"
    }
}

/// Tags as stored: sorted, deduplicated, comma-separated.
pub(crate) fn tags_column(tags: &[String]) -> String {
    let set: std::collections::BTreeSet<&str> = tags.iter().map(String::as_str).collect();
    set.into_iter().collect::<Vec<_>>().join(",")
}

pub(crate) fn tags_of(col: &str) -> Vec<String> {
    col.split(',')
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

impl HostRecord {
    pub(crate) fn from_row(r: &AnyRow) -> Result<Self, Error> {
        Ok(HostRecord {
            id: r.parse("id")?,
            name: r.text("name")?,
            state: enum_parse(r, "state")?,
            zone: r.text("zone")?,
            cluster: r.text("cluster")?,
            address: r.text("address")?,
            cpus: u32::try_from(r.int("cpus")?).unwrap_or(0),
            memory_bytes: u64_of(r.int("memory_bytes")?),
            disk_bytes: u64_of(r.int("disk_bytes")?),
            qemu_version: r.opt_text("qemu_version")?,
            accel: r.opt_text("accel")?,
            migration_tls: r.text("migration_transport")? == TRANSPORT_TLS,
            generation: r.int("generation")?,
            desired_revision: r.int("desired_revision")?,
            driver: r.opt_text("driver")?,
            tags: tags_of(&r.text("tags")?),
            pools: tags_of(&r.text("pools")?),
            alloc_vcpus: u64_of(r.int("alloc_vcpus")?),
            alloc_memory_bytes: u64_of(r.int("alloc_memory_bytes")?),
            alloc_disk_bytes: u64_of(r.int("alloc_disk_bytes")?),
            created_at: r.int("created_at")?,
            last_heartbeat_at: r.opt_int("last_heartbeat_at")?,
        })
    }
    pub fn into_view(self) -> views::Host {
        views::Host {
            id: self.id,
            name: self.name,
            state: self.state,
            zone: self.zone,
            cluster: self.cluster,
            address: self.address,
            cpus: self.cpus,
            memory_bytes: self.memory_bytes,
            disk_bytes: self.disk_bytes,
            qemu_version: self.qemu_version,
            accel: self.accel,
            migration_tls: self.migration_tls,
            tags: self.tags,
            pools: self.pools,
            allocated: views::Allocation {
                vcpus: self.alloc_vcpus,
                memory_bytes: self.alloc_memory_bytes,
                disk_bytes: self.alloc_disk_bytes,
            },
            created_at: from_micros(self.created_at),
            last_heartbeat_at: self.last_heartbeat_at.map(from_micros),
            orphans: Vec::new(),
        }
    }
}

/// An orphan VM a host reported (see `orphans.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrphanRecord {
    pub host_id: HostId,
    pub vm_id: VmId,
    pub action: stratus_api_types::agent::OrphanAction,
    pub first_seen_at: i64,
    pub last_seen_at: i64,
}

impl OrphanRecord {
    pub(crate) fn from_row(r: &AnyRow) -> Result<Self, Error> {
        Ok(OrphanRecord {
            host_id: r.parse("host_id")?,
            vm_id: r.parse("vm_id")?,
            action: enum_parse(r, "action")?,
            first_seen_at: r.int("first_seen_at")?,
            last_seen_at: r.int("last_seen_at")?,
        })
    }
    pub fn into_view(self) -> views::HostOrphan {
        views::HostOrphan {
            vm_id: self.vm_id,
            action: self.action,
            first_seen_at: from_micros(self.first_seen_at),
            last_seen_at: from_micros(self.last_seen_at),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ImageRecord {
    pub id: ImageId,
    pub project_id: ProjectId,
    pub name: String,
    pub visibility: ImageVisibility,
    pub state: ImageState,
    pub format: Option<ImageFormat>,
    pub virtual_size: Option<u64>,
    pub file_size: Option<u64>,
    pub sha256: Option<String>,
    pub kernel_sha256: Option<String>,
    pub initrd_sha256: Option<String>,
    pub cmdline: Option<String>,
    pub created_at: i64,
}

impl ImageRecord {
    pub(crate) fn from_row(r: &AnyRow) -> Result<Self, Error> {
        Ok(ImageRecord {
            id: r.parse("id")?,
            project_id: r.parse("project_id")?,
            name: r.text("name")?,
            visibility: enum_parse(r, "visibility")?,
            state: enum_parse(r, "state")?,
            format: opt_enum_parse(r, "format")?,
            virtual_size: r.opt_int("virtual_size")?.map(u64_of),
            file_size: r.opt_int("file_size")?.map(u64_of),
            sha256: r.opt_text("sha256")?,
            kernel_sha256: r.opt_text("kernel_sha256")?,
            initrd_sha256: r.opt_text("initrd_sha256")?,
            cmdline: r.opt_text("cmdline")?,
            created_at: r.int("created_at")?,
        })
    }
    pub fn into_view(self) -> views::Image {
        views::Image {
            id: self.id,
            project_id: self.project_id,
            name: self.name,
            visibility: self.visibility,
            state: self.state,
            format: self.format,
            virtual_size: self.virtual_size,
            file_size: self.file_size,
            sha256: self.sha256,
            kernel_sha256: self.kernel_sha256,
            initrd_sha256: self.initrd_sha256,
            cmdline: self.cmdline,
            created_at: from_micros(self.created_at),
        }
    }
}

#[derive(Debug, Clone)]
pub struct FlavorRecord {
    pub id: FlavorId,
    pub name: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub created_at: i64,
}

impl FlavorRecord {
    pub(crate) fn from_row(r: &AnyRow) -> Result<Self, Error> {
        Ok(FlavorRecord {
            id: r.parse("id")?,
            name: r.text("name")?,
            vcpus: u32::try_from(r.int("vcpus")?).unwrap_or(0),
            memory_bytes: u64_of(r.int("memory_bytes")?),
            disk_bytes: u64_of(r.int("disk_bytes")?),
            created_at: r.int("created_at")?,
        })
    }
    pub fn into_view(self) -> views::Flavor {
        views::Flavor {
            id: self.id,
            name: self.name,
            vcpus: self.vcpus,
            memory_bytes: self.memory_bytes,
            disk_bytes: self.disk_bytes,
            created_at: from_micros(self.created_at),
        }
    }
}

#[derive(Debug, Clone)]
pub struct VmRecord {
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
    pub state_reason: Option<String>,
    pub host_id: Option<HostId>,
    pub active_job_id: Option<JobId>,
    pub generation: i64,
    pub reboot_generation: i64,
    pub observed_state: Option<stratus_api_types::agent::ObservedVmState>,
    pub observed_reason: Option<String>,
    pub observed_generation: i64,
    pub observed_reboot_generation: i64,
    pub observed_at: Option<i64>,
    pub guest: Option<stratus_api_types::agent::GuestAgentInfo>,
    pub observed_intent_generation: i64,
    pub server_group_id: Option<ServerGroupId>,
    pub placement: views::VmPlacement,
    pub restart_policy: views::RestartPolicy,
    /// Automatic restarts since `auto_restart_window_at`.
    pub auto_restarts: i64,
    /// When the first automatic restart counted in `auto_restarts` began.
    pub auto_restart_window_at: Option<i64>,
    /// When automatic restarts were given up (a crash loop), until the
    /// operator's next operation on the VM.
    pub auto_restart_given_up_at: Option<i64>,
    /// A VM restored from a backup: its disk starts as this file.
    pub restore_from: Option<String>,
    /// The shared pool holding its disk; `None`: its host's local pool.
    pub pool_id: Option<StoragePoolId>,
    /// While a migration job moves it: the host it goes to (claimed), and
    /// the pool its disk will be in there (`None`: that host's local pool).
    pub migration_target: Option<HostId>,
    pub migration_pool: Option<StoragePoolId>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl VmRecord {
    pub(crate) fn from_row(r: &AnyRow) -> Result<Self, Error> {
        Ok(VmRecord {
            id: r.parse("id")?,
            project_id: r.parse("project_id")?,
            name: r.text("name")?,
            flavor_id: r.parse("flavor_id")?,
            image_id: r.parse("image_id")?,
            vcpus: u32::try_from(r.int("vcpus")?).unwrap_or(0),
            memory_bytes: u64_of(r.int("memory_bytes")?),
            disk_bytes: u64_of(r.int("disk_bytes")?),
            desired_state: enum_parse(r, "desired_state")?,
            state: enum_parse(r, "state")?,
            state_reason: r.opt_text("state_reason")?,
            host_id: r.opt_parse("host_id")?,
            active_job_id: r.opt_parse("active_job_id")?,
            generation: r.int("generation")?,
            reboot_generation: r.int("reboot_generation")?,
            observed_state: opt_enum_parse(r, "observed_state")?,
            observed_reason: r.opt_text("observed_reason")?,
            observed_generation: r.int("observed_generation")?,
            observed_reboot_generation: r.int("observed_reboot_generation")?,
            observed_at: r.opt_int("observed_at")?,
            guest: match r.opt_text("guest")? {
                Some(g) => serde_json::from_str(&g).ok(),
                None => None,
            },
            observed_intent_generation: r.int("observed_intent_generation")?,
            server_group_id: r.opt_parse("server_group_id")?,
            placement: match r.opt_text("placement")? {
                Some(p) => serde_json::from_str(&p).map_err(|e| column_error("placement", e))?,
                None => views::VmPlacement::default(),
            },
            restart_policy: enum_parse(r, "restart_policy")?,
            auto_restarts: r.int("auto_restarts")?,
            auto_restart_window_at: r.opt_int("auto_restart_window_at")?,
            auto_restart_given_up_at: r.opt_int("auto_restart_given_up_at")?,
            restore_from: r.opt_text("restore_from")?,
            pool_id: r.opt_parse("pool_id")?,
            migration_target: r.opt_parse("migration_target")?,
            migration_pool: r.opt_parse("migration_pool")?,
            created_at: r.int("created_at")?,
            updated_at: r.int("updated_at")?,
        })
    }
    pub fn into_view(self) -> views::Vm {
        views::Vm {
            id: self.id,
            project_id: self.project_id,
            name: self.name,
            flavor_id: self.flavor_id,
            image_id: self.image_id,
            vcpus: self.vcpus,
            memory_bytes: self.memory_bytes,
            disk_bytes: self.disk_bytes,
            desired_state: self.desired_state,
            state: self.state,
            state_reason: self.state_reason,
            restart_policy: self.restart_policy,
            host_id: self.host_id,
            pool_id: self.pool_id,
            migration_target: self.migration_target,
            server_group_id: self.server_group_id,
            placement: self.placement,
            guest: self.guest,
            observed_at: self.observed_at.map(from_micros),
            created_at: from_micros(self.created_at),
            updated_at: from_micros(self.updated_at),
        }
    }
}

#[derive(Debug, Clone)]
pub struct JobRecord {
    pub id: JobId,
    pub project_id: Option<ProjectId>,
    pub kind: String,
    pub target_kind: String,
    pub target_id: uuid::Uuid,
    pub state: JobState,
    pub progress: u8,
    pub current_step: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub params: Value,
    pub idempotency_key: Option<String>,
    pub owner: Option<String>,
    pub lease_expires_at: Option<i64>,
    pub cancel_requested_at: Option<i64>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub updated_at: i64,
}

impl JobRecord {
    pub(crate) fn from_row(r: &AnyRow) -> Result<Self, Error> {
        let params = r.text("params")?;
        Ok(JobRecord {
            id: r.parse("id")?,
            project_id: r.opt_parse("project_id")?,
            kind: r.text("kind")?,
            target_kind: r.text("target_kind")?,
            target_id: r.parse("target_id")?,
            state: enum_parse(r, "state")?,
            progress: u8::try_from(r.int("progress")?.clamp(0, 100)).unwrap_or(0),
            current_step: r.opt_text("current_step")?,
            error_code: r.opt_text("error_code")?,
            error_message: r.opt_text("error_message")?,
            params: serde_json::from_str(&params).map_err(|e| column_error("params", e))?,
            idempotency_key: r.opt_text("idempotency_key")?,
            owner: r.opt_text("owner")?,
            lease_expires_at: r.opt_int("lease_expires_at")?,
            cancel_requested_at: r.opt_int("cancel_requested_at")?,
            created_at: r.int("created_at")?,
            started_at: r.opt_int("started_at")?,
            finished_at: r.opt_int("finished_at")?,
            updated_at: r.int("updated_at")?,
        })
    }

    pub fn into_view(self, events: Vec<JobEventRecord>) -> views::Job {
        let error = match (self.error_code, self.error_message) {
            (Some(code), Some(message)) => Some(views::JobError { code, message }),
            (Some(code), None) => Some(views::JobError {
                message: code.clone(),
                code,
            }),
            _ => None,
        };
        views::Job {
            id: self.id,
            project_id: self.project_id,
            kind: self.kind,
            target_kind: self.target_kind,
            target_id: self.target_id,
            state: self.state,
            progress: self.progress,
            current_step: self.current_step,
            error,
            created_at: from_micros(self.created_at),
            started_at: self.started_at.map(from_micros),
            finished_at: self.finished_at.map(from_micros),
            updated_at: from_micros(self.updated_at),
            events: events
                .into_iter()
                .map(|e| views::JobEvent {
                    at: from_micros(e.at),
                    step: e.step,
                    message: e.message,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct JobEventRecord {
    pub seq: i64,
    pub at: i64,
    pub step: String,
    pub message: String,
}

/// A job to be created together with the intent it carries out.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: JobId,
    pub project_id: Option<ProjectId>,
    pub kind: String,
    pub target_kind: &'static str,
    pub target_id: uuid::Uuid,
    pub params: Value,
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ClusterRecord {
    pub name: String,
    pub cpu_ratio_milli: u32,
    pub ram_ratio_milli: u32,
    pub disk_ratio_milli: u32,
    pub weigher: views::Weigher,
    pub hosts: u64,
    pub created_at: i64,
    pub updated_at: i64,
}

impl ClusterRecord {
    pub(crate) fn from_row(r: &AnyRow) -> Result<Self, Error> {
        let milli = |c: &str| -> Result<u32, Error> {
            u32::try_from(r.int(c)?).map_err(|e| column_error(c, e))
        };
        Ok(ClusterRecord {
            name: r.text("name")?,
            cpu_ratio_milli: milli("cpu_ratio_milli")?,
            ram_ratio_milli: milli("ram_ratio_milli")?,
            disk_ratio_milli: milli("disk_ratio_milli")?,
            weigher: enum_parse(r, "weigher")?,
            hosts: u64_of(r.int("hosts")?),
            created_at: r.int("created_at")?,
            updated_at: r.int("updated_at")?,
        })
    }
    pub fn into_view(self) -> views::Cluster {
        views::Cluster {
            name: self.name,
            cpu_ratio: f64::from(self.cpu_ratio_milli) / 1000.0,
            ram_ratio: f64::from(self.ram_ratio_milli) / 1000.0,
            disk_ratio: f64::from(self.disk_ratio_milli) / 1000.0,
            weigher: self.weigher,
            hosts: self.hosts,
            created_at: from_micros(self.created_at),
            updated_at: from_micros(self.updated_at),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerGroupRecord {
    pub id: ServerGroupId,
    pub project_id: ProjectId,
    pub name: String,
    pub policy: views::GroupPolicy,
    pub members: u64,
    pub created_at: i64,
}

impl ServerGroupRecord {
    pub(crate) fn from_row(r: &AnyRow) -> Result<Self, Error> {
        Ok(ServerGroupRecord {
            id: r.parse("id")?,
            project_id: r.parse("project_id")?,
            name: r.text("name")?,
            policy: enum_parse(r, "policy")?,
            members: u64_of(r.int("members")?),
            created_at: r.int("created_at")?,
        })
    }
    pub fn into_view(self) -> views::ServerGroup {
        views::ServerGroup {
            id: self.id,
            project_id: self.project_id,
            name: self.name,
            policy: self.policy,
            members: self.members,
            created_at: from_micros(self.created_at),
        }
    }
}

impl VmRecord {
    /// The record a create writes, without reading it back.
    pub(crate) fn created(
        vm: &crate::vms::NewVm,
        host: Option<HostId>,
        job: JobId,
        now: i64,
    ) -> Self {
        VmRecord {
            id: vm.id,
            project_id: vm.project_id,
            name: vm.name.clone(),
            flavor_id: vm.flavor_id,
            image_id: vm.image_id,
            vcpus: vm.vcpus,
            memory_bytes: vm.memory_bytes,
            disk_bytes: vm.disk_bytes,
            desired_state: vm.desired_state,
            state: VmState::Creating,
            state_reason: None,
            host_id: host,
            active_job_id: Some(job),
            generation: 1,
            reboot_generation: 0,
            observed_state: None,
            observed_reason: None,
            observed_generation: 0,
            observed_reboot_generation: 0,
            observed_at: None,
            guest: None,
            observed_intent_generation: 0,
            server_group_id: vm.server_group_id,
            placement: vm.placement.clone(),
            restart_policy: vm.restart_policy,
            auto_restarts: 0,
            auto_restart_window_at: None,
            auto_restart_given_up_at: None,
            restore_from: vm.restore_from.clone(),
            pool_id: vm.pool_id,
            migration_target: None,
            migration_pool: None,
            created_at: now,
            updated_at: now,
        }
    }
}

impl JobRecord {
    /// The record a new job is written as, without reading it back.
    pub(crate) fn queued(job: &NewJob, now: i64) -> Self {
        JobRecord {
            id: job.id,
            project_id: job.project_id,
            kind: job.kind.clone(),
            target_kind: job.target_kind.to_string(),
            target_id: job.target_id,
            state: JobState::Queued,
            progress: 0,
            current_step: None,
            error_code: None,
            error_message: None,
            params: job.params.clone(),
            idempotency_key: job.idempotency_key.clone(),
            owner: None,
            lease_expires_at: None,
            cancel_requested_at: None,
            created_at: now,
            started_at: None,
            finished_at: None,
            updated_at: now,
        }
    }
}
