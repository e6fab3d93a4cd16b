//! Disk snapshots of a VM: take (running or stopped; live, with the guest's
//! file systems frozen when its guest agent answers), list, revert (VM
//! stopped; later snapshots are dropped), delete (the layer is merged,
//! live when the VM runs). Each change is a job on the VM (see
//! `jobs/src/storage.rs`), recorded with its intent in one transaction.

use stratus_api_types::params::SnapshotCreate;
use stratus_api_types::views::{
    Snapshot, SnapshotOperation, SnapshotStatus, VmDesiredState, VmOperation, VmState,
};
use stratus_common::{Error, ResourceKind, SnapshotId, MAX_SNAPSHOTS_PER_VM};
use stratus_datastore::model::{NewJob, VmRecord};
use stratus_datastore::{SnapshotOrigin, SnapshotRecord};
use stratus_jobs::kinds::VmJobParams;
use stratus_jobs::JobKind;

use crate::app::{lookup, Actor, App};

/// Longest snapshot name.
const MAX_NAME: usize = 128;

fn job(kind: JobKind, vm: &VmRecord, snapshot: SnapshotId) -> Result<NewJob, Error> {
    let params = VmJobParams {
        snapshot: Some(snapshot),
        ..VmJobParams::from_vm(vm.state, vm.desired_state)
    };
    crate::app::vms::vm_job(kind, vm, params)
}

async fn find(app: &App, vm: &VmRecord, key: &str) -> Result<SnapshotRecord, Error> {
    app.ds
        .snapshot_find(vm.id, key)
        .await?
        .ok_or_else(|| Error::not_found(ResourceKind::Snapshot, key))
}

pub async fn snapshot_create(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
    p: SnapshotCreate,
) -> Result<SnapshotOperation, Error> {
    let vm = lookup::vm(app, actor, key, scope).await?;
    actor.require_mutate()?;
    begin_snapshot(app, &vm, &p.name, SnapshotOrigin::Operator).await
}

/// Records a snapshot of `vm` and the job that takes it (an operator's, or
/// its policy's).
pub(crate) async fn begin_snapshot(
    app: &App,
    vm: &VmRecord,
    name: &str,
    origin: SnapshotOrigin,
) -> Result<SnapshotOperation, Error> {
    let name = name.trim();
    if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(Error::invalid(
            "name",
            format!("a snapshot name is 1-{MAX_NAME} characters, without control characters"),
        ));
    }
    if vm.host_id.is_none() || !matches!(vm.state, VmState::Running | VmState::Stopped) {
        return Err(Error::conflict(
            "vm_not_ready",
            format!(
                "VM {:?} is {}; snapshots are taken of running or stopped VMs",
                vm.name,
                vm.state.as_str()
            ),
        ));
    }
    // The host refuses a snapshot beyond the limit too; refusing here
    // spares a failed job and says what to do.
    let held = app.ds.snapshot_list(vm.id).await?.len();
    if held >= MAX_SNAPSHOTS_PER_VM {
        return Err(Error::conflict(
            "snapshot_limit",
            format!(
                "VM {:?} holds {held} snapshots, the most a VM may hold; delete one first \
                 (deleting merges its layer, the other snapshots keep their content)",
                vm.name
            ),
        ));
    }
    crate::app::volumes::refuse_snapshot_of_pool_volumes(app, vm).await?;
    let id = SnapshotId::new();
    let job = job(JobKind::VmSnapshotCreate, vm, id)?;
    let (snap, job) = app
        .ds
        .snapshot_begin(id, vm.id, vm.project_id, name, origin, &job)
        .await?;
    app.job_waker.notify_one();
    Ok(SnapshotOperation {
        snapshot: snap.into_view(),
        job: job.into_view(vec![]),
    })
}

pub async fn snapshot_list(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
) -> Result<Vec<Snapshot>, Error> {
    let vm = lookup::vm(app, actor, key, scope).await?;
    Ok(app
        .ds
        .snapshot_list(vm.id)
        .await?
        .into_iter()
        .map(SnapshotRecord::into_view)
        .collect())
}

pub async fn snapshot_delete(
    app: &App,
    actor: &Actor,
    key: &str,
    snapshot: &str,
    scope: Option<&str>,
) -> Result<SnapshotOperation, Error> {
    let vm = lookup::vm(app, actor, key, scope).await?;
    actor.require_mutate()?;
    let snap = find(app, &vm, snapshot).await?;
    begin_delete(app, &vm, snap).await
}

/// Records the delete (merge) of a ready snapshot and its job.
pub(crate) async fn begin_delete(
    app: &App,
    vm: &VmRecord,
    snap: SnapshotRecord,
) -> Result<SnapshotOperation, Error> {
    if snap.status != SnapshotStatus::Ready {
        return Err(Error::conflict(
            "snapshot_not_ready",
            "the snapshot is being taken or deleted",
        ));
    }
    let job = job(JobKind::VmSnapshotDelete, vm, snap.id)?;
    let job = app.ds.snapshot_delete_begin(snap.id, vm.id, &job).await?;
    app.job_waker.notify_one();
    let snap = app.ds.snapshot_get(snap.id).await?;
    Ok(SnapshotOperation {
        snapshot: snap.into_view(),
        job: job.into_view(vec![]),
    })
}

pub async fn snapshot_revert(
    app: &App,
    actor: &Actor,
    key: &str,
    snapshot: &str,
    scope: Option<&str>,
) -> Result<VmOperation, Error> {
    let vm = lookup::vm(app, actor, key, scope).await?;
    actor.require_mutate()?;
    let snap = find(app, &vm, snapshot).await?;
    if snap.status != SnapshotStatus::Ready {
        return Err(Error::conflict(
            "snapshot_not_ready",
            "the snapshot is being taken or deleted",
        ));
    }
    if vm.state != VmState::Stopped || vm.desired_state != VmDesiredState::Stopped {
        return Err(Error::conflict(
            "vm_not_stopped",
            format!(
                "VM {:?} is {}; stop it before reverting its disk",
                vm.name,
                vm.state.as_str()
            ),
        ));
    }
    let job = job(JobKind::VmSnapshotRevert, &vm, snap.id)?;
    let (vm, job) = app
        .ds
        .vm_begin_operation(vm.id, VmDesiredState::Stopped, VmState::Stopped, false, job)
        .await?;
    app.job_waker.notify_one();
    Ok(VmOperation {
        vm: vm.into_view(),
        job: job.into_view(vec![]),
    })
}
