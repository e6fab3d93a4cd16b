//! VMs: intent first. Each operation validates, then records the operator's
//! intent and a job in one transaction, wakes the job runner, and answers
//! `202 Accepted` with the VM and its job.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use stratus_api_types::agent::{AgentRequestKind, ExecResult};
use stratus_api_types::params::{ConsoleQuery, PageParams, VmCreate, VmExec, VmFilter};
use stratus_api_types::views::{
    ImageState, Vm, VmConsole, VmDesiredState, VmOperation, VmPage, VmState,
};
use stratus_common::time::now_micros;
use stratus_common::{Error, JobId, VmId};
use stratus_datastore::model::{JobRecord, NewJob, VmRecord};
use stratus_datastore::{NewVm, PageRequest, VmListFilter};
use stratus_jobs::kinds::VmJobParams;
use stratus_jobs::JobKind;

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
        params: serde_json::to_value(VmJobParams {
            previous_state: previous,
            previous_desired: vm.desired_state,
        })
        .unwrap_or_default(),
        idempotency_key: key,
    }
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
    let flavor = lookup::flavor(app, &p.flavor).await.map_err(|e| match e {
        Error::NotFound { .. } => {
            Error::invalid("flavor", format!("flavor {:?} not found", p.flavor))
        }
        other => other,
    })?;
    let image = lookup::image(app, actor, &p.image, p.project.as_deref())
        .await
        .map_err(|e| match e {
            Error::NotFound { .. } => {
                Error::invalid("image", format!("image {:?} not found", p.image))
            }
            other => other,
        })?;
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
    let desired = if p.start.unwrap_or(true) {
        VmDesiredState::Running
    } else {
        VmDesiredState::Stopped
    };
    let vm = NewVm {
        id: VmId::new(),
        project_id: project,
        name: p.name.as_str().to_string(),
        flavor_id: flavor.id,
        image_id: image.id,
        vcpus: flavor.vcpus,
        memory_bytes: flavor.memory_bytes,
        disk_bytes: flavor.disk_bytes,
        desired_state: desired,
    };
    let job = NewJob {
        id: JobId::new(),
        project_id: Some(project),
        kind: JobKind::VmCreate.as_str().to_string(),
        target_kind: "vm",
        target_id: vm.id.as_uuid(),
        params: serde_json::to_value(VmJobParams {
            previous_state: VmState::Creating,
            previous_desired: desired,
        })
        .unwrap_or_default(),
        idempotency_key,
    };
    let (vm, job) = app.ds.vm_create_with_job(vm, job).await?;
    app.job_waker.notify_one();
    Ok((true, operation(vm, job)))
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

pub async fn vm_action(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
    action: VmAction,
) -> Result<VmOperation, Error> {
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
    let job = new_job(kind, &vm, vm.state, None);
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
    app.signals.desired_changed();
    app.job_waker.notify_one();
    Ok(operation(vm, job))
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
    let payload = serde_json::to_value(&kind)
        .map_err(|e| Error::internal(format!("encoding a request: {e}")))?;
    // The agent gets the request within its long-poll; allow for it and the
    // command itself.
    let budget = Duration::from_secs(u64::from(timeout) + 30);
    let expires = now_micros() + i64::try_from(budget.as_micros()).unwrap_or(i64::MAX);
    let id = app
        .ds
        .host_request_create(host, Some(vm.id), "exec", &payload, expires)
        .await?;
    app.signals.desired_changed();
    let deadline = tokio::time::Instant::now() + budget;
    loop {
        let r = app.ds.host_request_get(id).await?;
        if r.answered_at.is_some() {
            if let Some(e) = r.error {
                return Err(Error::unprocessable("exec_failed", e));
            }
            return r
                .result
                .and_then(|v| serde_json::from_value(v).ok())
                .ok_or_else(|| Error::internal("the agent's exec result could not be read"));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Unavailable {
                message: format!("the host of VM {:?} did not answer in time", vm.name),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
