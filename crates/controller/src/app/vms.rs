//! VMs: intent first. Each operation validates, then records the operator's
//! intent and a job in one transaction, wakes the job runner, and answers
//! `202 Accepted` with the VM and its job.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use stratus_api_types::agent::{AgentRequestKind, ExecResult};
use stratus_api_types::params::{
    ConsoleQuery, PageParams, VmBatchCreate, VmCreate, VmExec, VmFilter, VmUpdate,
};
use stratus_api_types::views::{
    GroupPolicy, ImageState, PlacementPreview, PlannedVm, RestartPolicy, Vm, VmBatch, VmConsole,
    VmDesiredState, VmOperation, VmPage, VmPlacement, VmState,
};
use stratus_common::time::now_micros;
use stratus_common::{Error, JobId, ProjectId, ServerGroupId, StoragePoolId, VmId};
use stratus_datastore::model::{FlavorRecord, ImageRecord, JobRecord, NewJob, VmRecord};
use stratus_datastore::{AutoRestart, NewVm, PageRequest, RestartLimit, VmListFilter};
use stratus_jobs::kinds::VmJobParams;
use stratus_jobs::JobKind;
use stratus_scheduler::PendingVm;

use crate::app::{lookup, Actor, App};

/// An operation on an existing VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmAction {
    Start,
    Stop,
    Reboot,
    Delete,
}

const MAX_IDEMPOTENCY_KEY: usize = 200;

fn new_job(kind: JobKind, vm: &VmRecord, previous: VmState, key: Option<String>) -> NewJob {
    NewJob {
        id: JobId::new(),
        project_id: Some(vm.project_id),
        kind: kind.as_str().to_string(),
        target_kind: "vm",
        target_id: vm.id.as_uuid(),
        params: serde_json::to_value(VmJobParams::from_vm(previous, vm.desired_state))
            .unwrap_or_default(),
        idempotency_key: key,
    }
}

/// The job of an operation on an existing VM, with its parameters (what
/// the storage and migration operations record beyond where the VM stood).
pub(crate) fn vm_job(kind: JobKind, vm: &VmRecord, params: VmJobParams) -> Result<NewJob, Error> {
    Ok(NewJob {
        id: JobId::new(),
        project_id: Some(vm.project_id),
        kind: kind.as_str().to_string(),
        target_kind: "vm",
        target_id: vm.id.as_uuid(),
        params: serde_json::to_value(params)
            .map_err(|e| Error::internal(format!("encoding job parameters: {e}")))?,
        idempotency_key: None,
    })
}

fn operation(vm: VmRecord, job: JobRecord) -> VmOperation {
    VmOperation {
        vm: vm.into_view(),
        job: job.into_view(vec![]),
    }
}

fn check_key(key: &Option<String>) -> Result<(), Error> {
    match key {
        Some(k) if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY || !k.is_ascii() => {
            Err(Error::invalid(
                "Idempotency-Key",
                format!("Idempotency-Key must be 1..={MAX_IDEMPOTENCY_KEY} ASCII characters"),
            ))
        }
        _ => Ok(()),
    }
}

pub async fn vm_create(
    app: &App,
    actor: &Actor,
    p: VmCreate,
    idempotency_key: Option<String>,
) -> Result<(bool, VmOperation), Error> {
    vm_create_from(app, actor, p, idempotency_key, None, &[]).await
}

/// Creates a VM whose disk starts as `restore_from` (a backup file) when
/// given, else as an empty overlay of its image.
pub(crate) async fn vm_create_from(
    app: &App,
    actor: &Actor,
    p: VmCreate,
    idempotency_key: Option<String>,
    restore_from: Option<String>,
    restored_volumes: &[stratus_datastore::RestoredVolume],
) -> Result<(bool, VmOperation), Error> {
    actor.require_mutate()?;
    check_key(&idempotency_key)?;
    let project = lookup::project_for_create(app, actor, p.project.as_deref()).await?;
    if let Some(key) = &idempotency_key {
        if let Some(job) = app.ds.job_by_idempotency_key(Some(project), key).await? {
            let vm = app.ds.vm_get(VmId(job.target_id)).await.map_err(|_| {
                Error::conflict(
                    "idempotency_key_in_use",
                    "this Idempotency-Key belongs to an earlier request whose VM no longer exists",
                )
            })?;
            return Ok((false, operation(vm, job)));
        }
    }
    let mut shape = shape(app, actor, &p, project).await?;
    shape.restore_from = restore_from;
    let vm = shape.new_vm(p.name.as_str().to_string());
    let job = shape.create_job(&vm, idempotency_key);
    // Volumes restored beside it are recorded first, so its host never
    // starts it without them; a create that fails takes them back.
    let vm_id = vm.id;
    if !restored_volumes.is_empty() {
        app.ds
            .backup_restored_volumes_create(project, vm_id, restored_volumes)
            .await?;
    }
    let created = app
        .scheduler
        .create_vms(vec![PendingVm { vm, job }], shape.group)
        .await
        .map_err(|e| redact(actor, e));
    let mut done = match created {
        Ok(done) => done,
        Err(e) => {
            if !restored_volumes.is_empty() {
                app.ds.backup_restored_volumes_discard(vm_id).await?;
            }
            return Err(e);
        }
    };
    let (vm, job) = done
        .pop()
        .ok_or_else(|| Error::internal("the scheduler recorded no VM"))?;
    wake_host(app, vm.host_id);
    app.job_waker.notify_one();
    Ok((true, operation(vm, job)))
}

/// Wakes the long poll of the host whose desired state just changed.
fn wake_host(app: &App, host: Option<stratus_common::HostId>) {
    match host {
        Some(h) => app.signals.host_desired_changed(h),
        None => app.signals.desired_changed(),
    }
}

/// Most VMs one batch may create.
const MAX_BATCH: u32 = 1000;

/// Creates `count` VMs of one shape, named `NAME-1` … `NAME-COUNT`, placed in
/// one scheduling pass: all or none.
pub async fn vm_batch_create(app: &App, actor: &Actor, p: VmBatchCreate) -> Result<VmBatch, Error> {
    actor.require_mutate()?;
    let names = batch_names(&p)?;
    let project = lookup::project_for_create(app, actor, p.vm.project.as_deref()).await?;
    let shape = shape(app, actor, &p.vm, project).await?;
    let pending = names
        .into_iter()
        .map(|n| {
            let vm = shape.new_vm(n);
            let job = shape.create_job(&vm, None);
            PendingVm { vm, job }
        })
        .collect();
    let done = app
        .scheduler
        .create_vms(pending, shape.group)
        .await
        .map_err(|e| redact(actor, e))?;
    for (vm, _) in &done {
        wake_host(app, vm.host_id);
    }
    app.job_waker.notify_one();
    Ok(VmBatch {
        items: done.into_iter().map(|(v, j)| operation(v, j)).collect(),
    })
}

/// Where VMs would be placed, and why not elsewhere, with nothing created.
pub async fn vm_placement_preview(
    app: &App,
    actor: &Actor,
    p: VmBatchCreate,
) -> Result<PlacementPreview, Error> {
    // A dry run creates nothing, but it answers what creating would: so it
    // asks the same right.
    actor.require_mutate()?;
    let names = batch_names(&p)?;
    let project = lookup::project_for_create(app, actor, p.vm.project.as_deref()).await?;
    let shape = shape(app, actor, &p.vm, project).await?;
    let vms: Vec<NewVm> = names.iter().map(|n| shape.new_vm(n.clone())).collect();
    let mut preview = app.scheduler.preview(&vms, shape.group);
    // A shared pool's room is claimed by the store with the create, not by
    // the scheduler's view of hosts: ask the same question here, so the dry
    // run refuses what the create would.
    if preview.refusal.is_none() {
        if let Some(pool_id) = vms.first().and_then(|v| v.pool_id) {
            let pool = app.ds.pool_get(pool_id).await?;
            let wanted: u64 = vms.iter().map(|v| v.disk_bytes).sum();
            let room = pool.capacity_bytes.saturating_sub(pool.alloc_bytes);
            if wanted > room {
                preview.placed.clear();
                preview.refusal = Some(format!(
                    "storage pool {} has room for {room} more bytes of disks ({} of {} \
                     allocated); {} need {wanted}",
                    pool.name,
                    pool.alloc_bytes,
                    pool.capacity_bytes,
                    if vms.len() == 1 {
                        "the VM would"
                    } else {
                        "these VMs would"
                    }
                ));
            }
        }
    }
    let fits = preview.refusal.is_none();
    let admin = actor.is_admin();
    let distinct: std::collections::BTreeSet<stratus_common::HostId> =
        preview.placed.iter().map(|(_, h, _)| *h).collect();
    let placements: Vec<PlannedVm> = preview
        .placed
        .into_iter()
        .map(|(i, host_id, host)| PlannedVm {
            name: names.get(i).cloned().unwrap_or_default(),
            host_id: admin.then_some(host_id),
            host: admin.then_some(host),
        })
        .collect();
    let message = match &preview.refusal {
        Some(why) if admin => why.clone(),
        Some(why) => without_host_names(why),
        None if placements.len() == 1 => format!(
            "{} would go on {} ({} of {} hosts could take it)",
            placements[0].name,
            placements[0]
                .host
                .as_ref()
                .map(|h| format!("host {h}"))
                .unwrap_or_else(|| "a host".into()),
            preview.explanation.feasible,
            preview.explanation.hosts_total
        ),
        None => format!(
            "all {} VMs would be placed, on {} distinct host(s)",
            placements.len(),
            distinct.len()
        ),
    };
    if !admin {
        preview.explanation.near_misses.clear();
    }
    Ok(PlacementPreview {
        fits,
        message,
        placements,
        explanation: preview.explanation,
    })
}

/// Hosts are the operator's: a refusal shown to a project keeps the
/// filter counts but not the names of the hosts that nearly fitted.
fn redact(actor: &Actor, e: Error) -> Error {
    match e {
        Error::NoCapacity {
            message,
            mut details,
        } if !actor.is_admin() => {
            if let Some(n) = details.get_mut("near_misses") {
                *n = serde_json::Value::Array(vec![]);
            }
            Error::NoCapacity {
                message: without_host_names(&message),
                details,
            }
        }
        other => other,
    }
}

/// The scheduler's message up to its list of near-misses (which names
/// hosts).
fn without_host_names(message: &str) -> String {
    match message.find("; closest:") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

fn batch_names(p: &VmBatchCreate) -> Result<Vec<String>, Error> {
    if !(1..=MAX_BATCH).contains(&p.count) {
        return Err(Error::invalid(
            "count",
            format!("count must be 1..={MAX_BATCH}, got {}", p.count),
        ));
    }
    if p.count == 1 {
        return Ok(vec![p.vm.name.as_str().to_string()]);
    }
    (1..=p.count)
        .map(|i| {
            let n = format!("{}-{i}", p.vm.name.as_str());
            n.parse::<stratus_common::Name>()
                .map(|n| n.as_str().to_string())
                .map_err(|e| {
                    Error::invalid("vm.name", format!("{n:?} (name with its number): {e}"))
                })
        })
        .collect()
}

/// What every VM of a create request shares, resolved and validated.
struct Shape {
    project: ProjectId,
    flavor: FlavorRecord,
    image: ImageRecord,
    desired: VmDesiredState,
    placement: VmPlacement,
    group: Option<(ServerGroupId, GroupPolicy)>,
    restart_policy: RestartPolicy,
    restore_from: Option<String>,
    /// The shared storage pool for the disks; `None`: each host's own.
    pool: Option<StoragePoolId>,
}

impl Shape {
    fn new_vm(&self, name: String) -> NewVm {
        NewVm {
            id: VmId::new(),
            project_id: self.project,
            name,
            flavor_id: self.flavor.id,
            image_id: self.image.id,
            vcpus: self.flavor.vcpus,
            memory_bytes: self.flavor.memory_bytes,
            disk_bytes: self.flavor.disk_bytes,
            desired_state: self.desired,
            server_group_id: self.group.map(|g| g.0),
            placement: self.placement.clone(),
            restart_policy: self.restart_policy,
            restore_from: self.restore_from.clone(),
            pool_id: self.pool,
        }
    }

    fn create_job(&self, vm: &NewVm, idempotency_key: Option<String>) -> NewJob {
        NewJob {
            id: JobId::new(),
            project_id: Some(self.project),
            kind: JobKind::VmCreate.as_str().to_string(),
            target_kind: "vm",
            target_id: vm.id.as_uuid(),
            params: serde_json::to_value(VmJobParams::from_vm(VmState::Creating, self.desired))
                .unwrap_or_default(),
            idempotency_key,
        }
    }
}

fn check_location(field: &str, v: &Option<String>) -> Result<(), Error> {
    match v {
        Some(s) if s.is_empty() || s.len() > 63 => Err(Error::invalid(
            field,
            format!("{field} must be 1-63 characters"),
        )),
        _ => Ok(()),
    }
}

async fn shape(app: &App, actor: &Actor, p: &VmCreate, project: ProjectId) -> Result<Shape, Error> {
    check_location("zone", &p.zone)?;
    check_location("cluster", &p.cluster)?;
    for (field, tags) in [
        ("require_tags", &p.require_tags),
        ("forbid_tags", &p.forbid_tags),
    ] {
        if tags.len() > super::MAX_TAGS {
            return Err(Error::invalid(
                field,
                format!("at most {} {field}", super::MAX_TAGS),
            ));
        }
    }
    if let Some(t) = p.require_tags.iter().find(|t| p.forbid_tags.contains(t)) {
        return Err(Error::invalid(
            "forbid_tags",
            format!("tag {:?} is both required and forbidden", t.as_str()),
        ));
    }
    let flavor = lookup::flavor(app, &p.flavor).await.map_err(|e| match e {
        Error::NotFound { .. } => {
            Error::invalid("flavor", format!("flavor {:?} not found", p.flavor))
        }
        other => other,
    })?;
    let image = lookup::image_field(app, actor, &p.image, p.project.as_deref()).await?;
    if image.state != ImageState::Ready {
        return Err(Error::conflict(
            "image_not_ready",
            format!("image {:?} has no data yet; upload it first", image.name),
        ));
    }
    if let Some(vsize) = image.virtual_size.filter(|v| *v > flavor.disk_bytes) {
        return Err(Error::unprocessable(
            "disk_too_small",
            format!(
                "flavor {:?} has a {} disk, smaller than image {:?} ({})",
                flavor.name,
                stratus_common::ByteCount(flavor.disk_bytes),
                image.name,
                stratus_common::ByteCount(vsize)
            ),
        ));
    }
    let group = match &p.group {
        Some(key) => {
            let g = lookup::server_group(app, actor, key, Some(project))
                .await
                .map_err(|e| match e {
                    Error::NotFound { .. } => {
                        Error::invalid("group", format!("server group {key:?} not found"))
                    }
                    other => other,
                })?;
            if g.project_id != project {
                return Err(Error::invalid(
                    "group",
                    format!("server group {key:?} belongs to another project"),
                ));
            }
            Some((g.id, g.policy))
        }
        None => None,
    };
    let desired = if p.start.unwrap_or(true) {
        VmDesiredState::Running
    } else {
        VmDesiredState::Stopped
    };
    let pool = crate::app::pools::pool_for_vm(app, p.pool.as_deref()).await?;
    let sorted = |tags: &[stratus_common::Name]| -> Vec<String> {
        let set: std::collections::BTreeSet<String> =
            tags.iter().map(|t| t.as_str().to_string()).collect();
        set.into_iter().collect()
    };
    Ok(Shape {
        project,
        flavor,
        image,
        desired,
        placement: VmPlacement {
            zone: p.zone.clone(),
            cluster: p.cluster.clone(),
            require_tags: sorted(&p.require_tags),
            forbid_tags: sorted(&p.forbid_tags),
            pool: pool.as_ref().map(|(_, name)| name.clone()),
        },
        group,
        restart_policy: p.restart_policy.unwrap_or_default(),
        restore_from: None,
        pool: pool.map(|(id, _)| id),
    })
}

pub async fn vm_list(
    app: &App,
    actor: &Actor,
    f: VmFilter,
    page: PageParams,
) -> Result<VmPage, Error> {
    let page = PageRequest::parse(page.limit, page.cursor.as_deref())?;
    let project = lookup::project_filter(app, actor, f.project.as_deref()).await?;
    let host = match f.host.as_deref() {
        Some(h) => {
            actor.require_admin("filter VMs by host")?;
            Some(lookup::host(app, h).await?.id)
        }
        None => None,
    };
    let filter = VmListFilter {
        project,
        name: f.name.as_deref(),
        state: f.state,
        host,
    };
    let p = app.ds.vm_list(&filter, &page).await?;
    Ok(VmPage {
        items: p.items.into_iter().map(|r| r.into_view()).collect(),
        next_cursor: p.next_cursor,
    })
}

pub async fn vm_view(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
) -> Result<Vm, Error> {
    Ok(lookup::vm(app, actor, key, scope).await?.into_view())
}

/// Changes what needs nothing of the VM's host: recorded at once, no job.
pub async fn vm_update(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
    p: VmUpdate,
) -> Result<Vm, Error> {
    let vm = lookup::vm(app, actor, key, scope).await?;
    actor.require_mutate()?;
    let vm = match p.restart_policy {
        Some(policy) => app.ds.vm_set_restart_policy(vm.id, policy).await?,
        None => vm,
    };
    Ok(vm.into_view())
}

pub async fn vm_action(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
    action: VmAction,
    idempotency_key: Option<String>,
) -> Result<VmOperation, Error> {
    check_key(&idempotency_key)?;
    let vm = lookup::vm(app, actor, key, scope).await?;
    actor.require_mutate()?;
    let (kind, desired, transitional) = match action {
        VmAction::Start => (JobKind::VmStart, VmDesiredState::Running, VmState::Starting),
        VmAction::Stop => (JobKind::VmStop, VmDesiredState::Stopped, VmState::Stopping),
        VmAction::Reboot => (
            JobKind::VmReboot,
            VmDesiredState::Running,
            VmState::Rebooting,
        ),
        VmAction::Delete => (
            JobKind::VmDelete,
            VmDesiredState::Deleted,
            VmState::Deleting,
        ),
    };
    // The same request again (its answer was lost): the same job.
    if let Some(k) = &idempotency_key {
        if let Some(job) = app
            .ds
            .job_by_idempotency_key(Some(vm.project_id), k)
            .await?
        {
            if job.kind != kind.as_str() || job.target_id != vm.id.as_uuid() {
                return Err(Error::conflict(
                    "idempotency_key_in_use",
                    "this Idempotency-Key was already used for another request",
                ));
            }
            return Ok(operation(vm, job));
        }
    }
    if action != VmAction::Delete {
        if vm.active_job_id.is_none() && vm.host_id.is_none() {
            return Err(Error::conflict(
                "vm_not_placed",
                format!(
                    "VM {:?} is not placed on a host (state {}), so it cannot be {}; delete it and create it again",
                    vm.name,
                    vm.state.as_str(),
                    match action {
                        VmAction::Start => "started",
                        VmAction::Stop => "stopped",
                        _ => "rebooted",
                    }
                ),
            ));
        }
        let allowed = match action {
            VmAction::Start => matches!(
                vm.state,
                VmState::Stopped | VmState::Crashed | VmState::Failed
            ),
            VmAction::Stop => matches!(vm.state, VmState::Running | VmState::Crashed),
            VmAction::Reboot => vm.state == VmState::Running,
            VmAction::Delete => true,
        };
        if vm.active_job_id.is_none() && !allowed {
            return Err(Error::conflict(
                "invalid_vm_state",
                format!(
                    "VM {:?} is {}; that does not allow this",
                    vm.name,
                    vm.state.as_str()
                ),
            ));
        }
    }
    let job = new_job(kind, &vm, vm.state, idempotency_key);
    let (vm, job) = app
        .ds
        .vm_begin_operation(
            vm.id,
            desired,
            transitional,
            action == VmAction::Reboot,
            job,
        )
        .await?;
    wake_host(app, vm.host_id);
    app.job_waker.notify_one();
    Ok(operation(vm, job))
}

/// Starts a crashed VM again without an operator (the reconciler's doing,
/// for VMs with restart policy `on_crash`): the same intent and the same
/// `vm_start` job as [`vm_action`]'s start, recorded by the store only if
/// the VM is still crashed, unheld and under its crash-loop `limit` (else it
/// is left crashed and marked given up).
pub(crate) async fn vm_restart_after_crash(
    app: &App,
    vm: &VmRecord,
    limit: RestartLimit,
) -> Result<AutoRestart, Error> {
    let job = new_job(JobKind::VmStart, vm, vm.state, None);
    let done = app
        .ds
        .vm_auto_restart(vm.id, limit, now_micros(), job)
        .await?;
    if let AutoRestart::Started { vm, .. } = &done {
        wake_host(app, vm.host_id);
        app.job_waker.notify_one();
    }
    Ok(done)
}

const CONSOLE_DEFAULT: u32 = 64 * 1024;
const CONSOLE_MAX: u32 = 1 << 20;

pub async fn vm_console(
    app: &App,
    actor: &Actor,
    key: &str,
    q: ConsoleQuery,
) -> Result<VmConsole, Error> {
    let vm = lookup::vm(app, actor, key, q.project.as_deref()).await?;
    let max = q.max.unwrap_or(CONSOLE_DEFAULT);
    if !(1..=CONSOLE_MAX).contains(&max) {
        return Err(Error::invalid(
            "max",
            format!("max must be 1..={CONSOLE_MAX}"),
        ));
    }
    let (data, offset, next, truncated) = app
        .ds
        .vm_console_read(vm.id, q.offset, max as usize)
        .await?;
    Ok(VmConsole {
        data_base64: STANDARD.encode(data),
        offset,
        next_offset: next,
        truncated_before: truncated,
    })
}

/// Runs a command in the guest through its host's agent and the guest
/// agent, and answers with its exit code and output.
pub async fn vm_exec(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
    p: VmExec,
) -> Result<ExecResult, Error> {
    let vm = lookup::vm(app, actor, key, scope).await?;
    actor.require_mutate()?;
    if p.argv.is_empty() || p.argv[0].is_empty() {
        return Err(Error::invalid("argv", "argv must name a program"));
    }
    if p.argv.len() > 256 || p.argv.iter().map(String::len).sum::<usize>() > 64 * 1024 {
        return Err(Error::invalid(
            "argv",
            "argv is too long (256 arguments, 64 KiB)",
        ));
    }
    let timeout = p.timeout_secs.unwrap_or(60);
    if !(1..=600).contains(&timeout) {
        return Err(Error::invalid(
            "timeout_secs",
            "timeout_secs must be 1..=600",
        ));
    }
    let (Some(host), VmState::Running) = (vm.host_id, vm.state) else {
        return Err(Error::conflict(
            "vm_not_running",
            format!(
                "VM {:?} is {}; commands run only in running VMs",
                vm.name,
                vm.state.as_str()
            ),
        ));
    };
    if !vm.guest.as_ref().is_some_and(|g| g.connected) {
        return Err(Error::conflict(
            "guest_agent_not_connected",
            format!(
                "the guest agent in VM {:?} is not connected, so commands cannot run in it",
                vm.name
            ),
        ));
    }
    let kind = AgentRequestKind::Exec {
        vm_id: vm.id,
        argv: p.argv,
        timeout_secs: timeout,
    };
    // The agent gets the request within its long-poll; allow for it and the
    // command itself.
    let budget = Duration::from_secs(u64::from(timeout) + 30);
    let answer = super::agent::host_request(app, host, Some(vm.id), "exec", &kind, budget)
        .await
        .map_err(|e| match e {
            Error::Unprocessable { message, .. } => Error::unprocessable("exec_failed", message),
            Error::Unavailable { .. } => Error::Unavailable {
                message: format!("the host of VM {:?} did not answer in time", vm.name),
            },
            other => other,
        })?;
    answer
        .result
        .ok_or_else(|| Error::internal("the agent's exec result could not be read"))
}
