//! The VM sagas: each operation as named steps, each step an idempotent
//! action with an undo that can safely run twice.
//!
//! ```text
//!  vm_create  accepted ──► settled        undo of accepted: the host destroys
//!             (the API      (the host      what it built, then the VM record
//!              placed and    booted it)    and its host claim are discarded
//!              claimed)
//!  vm_start   intent ────► settled        undo of intent: the operator's
//!  vm_stop    (the API       (the host     previous desired state is restored
//!  vm_reboot   recorded it)   converged)
//!  vm_delete  intent ────► settled        (same undo)
//!  vm_backup  accepted ──► copy ──► settled    undo of accepted: the backup
//!             (record,     (the host   (recorded  is marked failed, its
//!              VM held)     copies)     good)      request withdrawn
//!  vm_restore intent ────► restore ──► settled    (intent's undo)
//!  vm_snapshot_create  accepted ──► snapshot ──► settled   undo: the host
//!                       (record,      (the host    (ready)   deletes what it
//!                        VM held)      takes it)             took; record gone
//!  vm_snapshot_delete  accepted ──► merge ──► settled      undo: the
//!                                    (layer merged,          snapshot stays
//!                                     record gone: no        (if not merged)
//!                                     way back)
//!  vm_snapshot_revert  intent ────► revert ──► settled     (intent's undo;
//!                                     (newer ones forgotten) VM stopped)
//!  vm_volume_attach    accepted ──► attach ──► settled     undo: the host
//!                       (attaching,  (file made, (attached)  detaches it; the
//!                        VM held)     hot-plug)              volume available
//!  vm_migrate  accepted ──► prepare ──► send ──► settled   (see migrate.rs)
//!  vm_volume_detach    accepted ──► detach ──► settled     undo: still
//!                                    (available: no way      attached (if not
//!                                     back, re-attach)       detached)
//! ```
//!
//! The first step of each saga stands for what the API already wrote when it
//! accepted the request (the intent and the job in one transaction): its
//! action only confirms it, its undo takes it back. A step that fails never
//! has its own undo run (that is steno's contract), so every step that
//! waits on a host is preceded by the step whose undo cleans up after it.
//!
//! Adding an operation means writing its steps here and its [`JobKind`].

use std::sync::{Arc, LazyLock};

use serde::{Deserialize, Serialize};
use steno::{
    new_action_noop_undo, Action, ActionContext, ActionError, ActionFunc, ActionRegistry,
    DagBuilder, Node, SagaDag, SagaName,
};
use stratus_api_types::agent::ObservedVmState;
use stratus_api_types::views::{HostState, VmDesiredState, VmState};
use stratus_common::{HostId, JobId, VmId};

use crate::context::{retry_store, OnCancel, SagaContext, StepError, Wait};
use crate::kinds::{JobKind, VmJobParams};

/// The steno saga type: every action receives the [`SagaContext`].
#[derive(Debug)]
pub struct StratusSaga;

impl steno::SagaType for StratusSaga {
    type ExecContextType = SagaContext;
}

pub(crate) type Ctx = ActionContext<StratusSaga>;

/// Everything a VM saga needs that must not change when another controller
/// resumes it: stored in the saga's graph.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmSagaParams {
    pub job_id: JobId,
    pub job_created_at: i64,
    pub vm_id: VmId,
    /// What the operation asks of the VM (its desired state when the job
    /// began).
    pub desired: VmDesiredState,
    /// For a reboot: the reboot request to wait for.
    pub reboot_generation: u64,
    /// Where the VM stood before the operation: what undo restores.
    pub previous: VmJobParams,
}

/// What the last step of every VM saga saw: the VM settled.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Settled {
    pub state: VmState,
    pub host_id: Option<HostId>,
    /// The VM record is gone (a delete).
    pub removed: bool,
}

/// The node whose output is the saga's result.
pub const SETTLED: &str = "settled";

/// The nodes of each saga, in order (for tests that fail each one).
pub fn node_names(kind: JobKind) -> &'static [&'static str] {
    match kind {
        JobKind::VmCreate => &["accepted", SETTLED],
        JobKind::VmBackup => &["accepted", "copy", SETTLED],
        JobKind::VmRestore => &["intent", "restore", SETTLED],
        JobKind::VmSnapshotCreate => &["accepted", "snapshot", SETTLED],
        JobKind::VmSnapshotDelete => &["accepted", "merge", SETTLED],
        JobKind::VmSnapshotRevert => &["intent", "revert", SETTLED],
        JobKind::VmVolumeAttach => &["accepted", "attach", SETTLED],
        JobKind::VmVolumeDetach => &["accepted", "detach", SETTLED],
        JobKind::VmMigrate => &["accepted", "prepare", "send", SETTLED],
        _ => &["intent", SETTLED],
    }
}

static CREATE_ACCEPT: LazyLock<Arc<dyn Action<StratusSaga>>> =
    LazyLock::new(|| ActionFunc::new_action("vm_create.accept", create_accept, create_accept_undo));
static CREATE_BOOT: LazyLock<Arc<dyn Action<StratusSaga>>> =
    LazyLock::new(|| new_action_noop_undo("vm_create.boot", create_boot));
static POWER_INTENT: LazyLock<Arc<dyn Action<StratusSaga>>> =
    LazyLock::new(|| ActionFunc::new_action("vm_power.intent", intent, intent_undo));
static POWER_CONVERGE: LazyLock<Arc<dyn Action<StratusSaga>>> =
    LazyLock::new(|| new_action_noop_undo("vm_power.converge", power_converge));
static DELETE_INTENT: LazyLock<Arc<dyn Action<StratusSaga>>> =
    LazyLock::new(|| ActionFunc::new_action("vm_delete.intent", intent, intent_undo));
static DELETE_DESTROY: LazyLock<Arc<dyn Action<StratusSaga>>> =
    LazyLock::new(|| new_action_noop_undo("vm_delete.destroy", delete_destroy));
static BACKUP_ACCEPT: LazyLock<Arc<dyn Action<StratusSaga>>> =
    LazyLock::new(|| ActionFunc::new_action("vm_backup.accept", backup_accept, backup_accept_undo));
static BACKUP_COPY: LazyLock<Arc<dyn Action<StratusSaga>>> =
    LazyLock::new(|| new_action_noop_undo("vm_backup.copy", crate::storage::backup_copy));
static BACKUP_RECORD: LazyLock<Arc<dyn Action<StratusSaga>>> =
    LazyLock::new(|| new_action_noop_undo("vm_backup.record", crate::storage::backup_record));
static RESTORE_INTENT: LazyLock<Arc<dyn Action<StratusSaga>>> =
    LazyLock::new(|| ActionFunc::new_action("vm_restore.intent", intent, intent_undo));
static RESTORE_DISK: LazyLock<Arc<dyn Action<StratusSaga>>> =
    LazyLock::new(|| new_action_noop_undo("vm_restore.disk", crate::storage::restore_disk));
static SNAPSHOT_ACCEPT: LazyLock<Arc<dyn Action<StratusSaga>>> = LazyLock::new(|| {
    ActionFunc::new_action("vm_snapshot_create.accept", confirm, snapshot_accept_undo)
});
static SNAPSHOT_TAKE: LazyLock<Arc<dyn Action<StratusSaga>>> = LazyLock::new(|| {
    new_action_noop_undo("vm_snapshot_create.take", crate::storage::snapshot_take)
});
static SNAPSHOT_RECORD: LazyLock<Arc<dyn Action<StratusSaga>>> = LazyLock::new(|| {
    new_action_noop_undo("vm_snapshot_create.record", crate::storage::snapshot_record)
});
static SNAPSHOT_DELETE_ACCEPT: LazyLock<Arc<dyn Action<StratusSaga>>> = LazyLock::new(|| {
    ActionFunc::new_action(
        "vm_snapshot_delete.accept",
        confirm,
        crate::storage::snapshot_delete_undo,
    )
});
static SNAPSHOT_MERGE: LazyLock<Arc<dyn Action<StratusSaga>>> = LazyLock::new(|| {
    new_action_noop_undo("vm_snapshot_delete.merge", crate::storage::snapshot_merge)
});
static SNAPSHOT_FORGET: LazyLock<Arc<dyn Action<StratusSaga>>> = LazyLock::new(|| {
    new_action_noop_undo("vm_snapshot_delete.forget", crate::storage::snapshot_forget)
});
static REVERT_INTENT: LazyLock<Arc<dyn Action<StratusSaga>>> =
    LazyLock::new(|| ActionFunc::new_action("vm_snapshot_revert.intent", intent, intent_undo));
static REVERT_DISK: LazyLock<Arc<dyn Action<StratusSaga>>> = LazyLock::new(|| {
    new_action_noop_undo("vm_snapshot_revert.disk", crate::storage::snapshot_revert)
});
static REVERT_SETTLED: LazyLock<Arc<dyn Action<StratusSaga>>> = LazyLock::new(|| {
    new_action_noop_undo(
        "vm_snapshot_revert.settled",
        crate::storage::snapshot_reverted,
    )
});
static VOLUME_ATTACH_ACCEPT: LazyLock<Arc<dyn Action<StratusSaga>>> = LazyLock::new(|| {
    ActionFunc::new_action(
        "vm_volume_attach.accept",
        confirm,
        crate::storage::volume_attach_undo,
    )
});
static VOLUME_ATTACH: LazyLock<Arc<dyn Action<StratusSaga>>> = LazyLock::new(|| {
    new_action_noop_undo("vm_volume_attach.attach", crate::storage::volume_attach)
});
static VOLUME_ATTACHED: LazyLock<Arc<dyn Action<StratusSaga>>> = LazyLock::new(|| {
    new_action_noop_undo("vm_volume_attach.settled", crate::storage::volume_attached)
});
static VOLUME_DETACH_ACCEPT: LazyLock<Arc<dyn Action<StratusSaga>>> = LazyLock::new(|| {
    ActionFunc::new_action(
        "vm_volume_detach.accept",
        confirm,
        crate::storage::volume_detach_undo,
    )
});
static VOLUME_DETACH: LazyLock<Arc<dyn Action<StratusSaga>>> = LazyLock::new(|| {
    new_action_noop_undo("vm_volume_detach.detach", crate::storage::volume_detach)
});
static VOLUME_DETACHED: LazyLock<Arc<dyn Action<StratusSaga>>> = LazyLock::new(|| {
    new_action_noop_undo("vm_volume_detach.settled", crate::storage::volume_detached)
});
static MIGRATE_ACCEPT: LazyLock<Arc<dyn Action<StratusSaga>>> = LazyLock::new(|| {
    ActionFunc::new_action("vm_migrate.accept", confirm, crate::migrate::accept_undo)
});
static MIGRATE_PREPARE: LazyLock<Arc<dyn Action<StratusSaga>>> = LazyLock::new(|| {
    ActionFunc::new_action(
        "vm_migrate.prepare",
        crate::migrate::prepare,
        crate::migrate::prepare_undo,
    )
});
static MIGRATE_SEND: LazyLock<Arc<dyn Action<StratusSaga>>> =
    LazyLock::new(|| new_action_noop_undo("vm_migrate.send", crate::migrate::send));
static MIGRATE_SETTLED: LazyLock<Arc<dyn Action<StratusSaga>>> =
    LazyLock::new(|| new_action_noop_undo("vm_migrate.settled", crate::migrate::settled));
static RESTORE_SETTLED: LazyLock<Arc<dyn Action<StratusSaga>>> =
    LazyLock::new(|| new_action_noop_undo("vm_restore.settled", crate::storage::restore_settled));

/// Every action of every saga, for the engine (and for resuming a saga
/// another controller began).
pub fn registry() -> ActionRegistry<StratusSaga> {
    let mut r = ActionRegistry::new();
    for a in [
        &CREATE_ACCEPT,
        &CREATE_BOOT,
        &POWER_INTENT,
        &POWER_CONVERGE,
        &DELETE_INTENT,
        &DELETE_DESTROY,
        &BACKUP_ACCEPT,
        &BACKUP_COPY,
        &BACKUP_RECORD,
        &RESTORE_INTENT,
        &RESTORE_DISK,
        &RESTORE_SETTLED,
        &SNAPSHOT_ACCEPT,
        &SNAPSHOT_TAKE,
        &SNAPSHOT_RECORD,
        &SNAPSHOT_DELETE_ACCEPT,
        &SNAPSHOT_MERGE,
        &SNAPSHOT_FORGET,
        &REVERT_INTENT,
        &REVERT_DISK,
        &REVERT_SETTLED,
        &VOLUME_ATTACH_ACCEPT,
        &VOLUME_ATTACH,
        &VOLUME_ATTACHED,
        &VOLUME_DETACH_ACCEPT,
        &VOLUME_DETACH,
        &VOLUME_DETACHED,
        &MIGRATE_ACCEPT,
        &MIGRATE_PREPARE,
        &MIGRATE_SEND,
        &MIGRATE_SETTLED,
    ] {
        r.register(Arc::clone(a));
    }
    r
}

/// The saga graph of one job.
pub fn dag(kind: JobKind, params: &VmSagaParams) -> Result<Arc<SagaDag>, StepError> {
    let mut b = DagBuilder::new(SagaName::new(kind.as_str()));
    let actions: Vec<&dyn Action<StratusSaga>> = match kind {
        JobKind::VmCreate => vec![CREATE_ACCEPT.as_ref(), CREATE_BOOT.as_ref()],
        JobKind::VmStart | JobKind::VmStop | JobKind::VmReboot => {
            vec![POWER_INTENT.as_ref(), POWER_CONVERGE.as_ref()]
        }
        JobKind::VmDelete => vec![DELETE_INTENT.as_ref(), DELETE_DESTROY.as_ref()],
        JobKind::VmBackup => vec![
            BACKUP_ACCEPT.as_ref(),
            BACKUP_COPY.as_ref(),
            BACKUP_RECORD.as_ref(),
        ],
        JobKind::VmRestore => vec![
            RESTORE_INTENT.as_ref(),
            RESTORE_DISK.as_ref(),
            RESTORE_SETTLED.as_ref(),
        ],
        JobKind::VmSnapshotCreate => vec![
            SNAPSHOT_ACCEPT.as_ref(),
            SNAPSHOT_TAKE.as_ref(),
            SNAPSHOT_RECORD.as_ref(),
        ],
        JobKind::VmSnapshotDelete => vec![
            SNAPSHOT_DELETE_ACCEPT.as_ref(),
            SNAPSHOT_MERGE.as_ref(),
            SNAPSHOT_FORGET.as_ref(),
        ],
        JobKind::VmSnapshotRevert => vec![
            REVERT_INTENT.as_ref(),
            REVERT_DISK.as_ref(),
            REVERT_SETTLED.as_ref(),
        ],
        JobKind::VmVolumeAttach => vec![
            VOLUME_ATTACH_ACCEPT.as_ref(),
            VOLUME_ATTACH.as_ref(),
            VOLUME_ATTACHED.as_ref(),
        ],
        JobKind::VmVolumeDetach => vec![
            VOLUME_DETACH_ACCEPT.as_ref(),
            VOLUME_DETACH.as_ref(),
            VOLUME_DETACHED.as_ref(),
        ],
        JobKind::VmMigrate => vec![
            MIGRATE_ACCEPT.as_ref(),
            MIGRATE_PREPARE.as_ref(),
            MIGRATE_SEND.as_ref(),
            MIGRATE_SETTLED.as_ref(),
        ],
    };
    for (name, action) in node_names(kind).iter().zip(actions) {
        b.append(Node::action(*name, *name, action));
    }
    let frag = b
        .build()
        .map_err(|e| StepError::new("internal", format!("building the saga: {e}")))?;
    let params = serde_json::to_value(params)
        .map_err(|e| StepError::new("internal", format!("storing the saga's parameters: {e}")))?;
    Ok(Arc::new(SagaDag::new(frag, params)))
}

pub(crate) fn params(ctx: &Ctx) -> Result<VmSagaParams, ActionError> {
    ctx.saga_params::<VmSagaParams>()
}

/// Fails the step if the job was cancelled: checked before a step acts.
async fn not_cancelled(sc: &SagaContext, job: JobId) -> Result<(), ActionError> {
    if sc.cancel_requested(job).await? {
        return Err(StepError::cancelled().into());
    }
    Ok(())
}

/// The VM's host, once the job is known not to be cancelled: the start of
/// every step that waits on a host.
pub(crate) async fn placed_host(sc: &SagaContext, p: &VmSagaParams) -> Result<HostId, ActionError> {
    not_cancelled(sc, p.job_id).await?;
    let vm = retry_store(|| sc.ds.vm_get(p.vm_id))
        .await
        .map_err(|e| StepError::internal("reading the VM", e))?;
    vm.host_id.ok_or_else(|| {
        StepError::new(
            "vm_not_placed",
            format!("VM {:?} is not placed on a host", vm.name),
        )
        .into()
    })
}

// ---- vm_create --------------------------------------------------------

/// The API placed the VM and claimed its host's capacity when it accepted
/// the request; this step only records that, so its undo can take it back.
async fn create_accept(ctx: Ctx) -> Result<(), ActionError> {
    let p = params(&ctx)?;
    ctx.user_data()
        .step(p.job_id, "accepted", 10, "VM recorded and placed")
        .await?;
    Ok(())
}

/// Takes a create back: the host destroys what it built (waited for while
/// the host is reachable), then the VM record and its host claim go in one
/// transaction. Running it twice finds nothing left the second time.
async fn create_accept_undo(ctx: Ctx) -> Result<(), anyhow::Error> {
    let p = params(&ctx)?;
    discard_create(ctx.user_data(), p.job_id, p.job_created_at, p.vm_id).await
}

/// The clean-up of a create that did not complete, shared by the undo and
/// by a saga that failed before its first step could be undone.
pub(crate) async fn discard_create(
    sc: &SagaContext,
    job: JobId,
    job_created_at: i64,
    vm_id: VmId,
) -> Result<(), anyhow::Error> {
    sc.step(job, "undo", 60, "removing the VM from its host")
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let vm = match retry_store(|| sc.ds.vm_get(vm_id)).await {
        Ok(vm) => vm,
        Err(stratus_common::Error::NotFound { .. }) => {
            return discard_restored_volumes(sc, vm_id).await;
        }
        Err(e) => return Err(anyhow::anyhow!("reading the VM: {e}")),
    };
    if vm.active_job_id != Some(job) {
        // Already discarded (and the name perhaps reused): nothing of ours.
        return Ok(());
    }
    sc.set_desired(vm_id, VmDesiredState::Deleted)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    // Wait for the host only if it has reported the VM (it built something)
    // and is reachable. A host that never reported it, or comes back
    // later, finds the VM gone from its desired state and destroys it as an
    // orphan.
    if let (Some(host), Some(_)) = (vm.host_id, vm.observed_state) {
        let reachable = match retry_store(|| sc.ds.host_get(host)).await {
            Ok(h) => h.state == HostState::Up,
            Err(_) => false,
        };
        if reachable {
            if let Err(e) = sc
                .await_host(
                    job,
                    job_created_at,
                    vm_id,
                    Wait::State(ObservedVmState::Absent),
                    sc.timing.delete,
                    OnCancel::Ignore,
                )
                .await
            {
                // The record goes regardless: a host that still has the VM
                // finds it unknown and treats it as an orphan.
                tracing::warn!(vm = %vm_id, error = %e.message,
                    "the host did not confirm removing the VM; discarding its record");
            }
        }
    }
    // Volumes restored beside it: their files go from the host too (the
    // VM is gone there, so they are detached), best effort.
    if let Some(host) = vm.host_id {
        let restored = retry_store(|| sc.ds.backup_restored_volumes_of_vm(vm_id))
            .await
            .unwrap_or_default();
        for v in restored {
            // Restored volumes are made in the host's own directory.
            let request = stratus_api_types::agent::AgentRequestKind::VolumeDelete {
                volume_id: v.id.as_uuid(),
                pool: None,
            };
            crate::storage::best_effort_request(sc, host, vm_id, "volume_delete", &request).await;
        }
    }
    retry_store(|| sc.ds.vm_discard(vm_id, job))
        .await
        .map_err(|e| anyhow::anyhow!("discarding the VM record: {e}"))?;
    discard_restored_volumes(sc, vm_id).await
}

/// The volumes a restore meant to build beside the VM go with its record
/// (`backup restore --as`; none for any other VM). Their files were asked
/// off the host first; one a host out of reach built stays in its volume
/// directory, unattached and unrecorded.
async fn discard_restored_volumes(sc: &SagaContext, vm_id: VmId) -> Result<(), anyhow::Error> {
    retry_store(|| sc.ds.backup_restored_volumes_discard(vm_id))
        .await
        .map_err(|e| anyhow::anyhow!("discarding the restored volumes: {e}"))
}

/// Waits for the host to build and boot the VM (or leave it stopped when
/// it was created stopped).
async fn create_boot(ctx: Ctx) -> Result<Settled, ActionError> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    let host = placed_host(sc, &p).await?;
    let want = if p.desired == VmDesiredState::Stopped {
        ObservedVmState::Stopped
    } else {
        ObservedVmState::Running
    };
    sc.step(
        p.job_id,
        "provision",
        30,
        "waiting for the host to fetch the image, build and boot the VM",
    )
    .await?;
    let seen = sc
        .await_host(
            p.job_id,
            p.job_created_at,
            p.vm_id,
            Wait::State(want),
            sc.timing.create,
            OnCancel::Stop,
        )
        .await?;
    let host = seen.host_id.unwrap_or(host);
    // Volumes restored beside it (`backup restore --as`): the host built and
    // attached them before the VM came up; from now on they are ordinary
    // attached volumes.
    let restored = retry_store(|| sc.ds.backup_restored_volumes_of_vm(p.vm_id))
        .await
        .map_err(|e| StepError::internal("reading the restored volumes", e))?;
    if !restored.is_empty() {
        retry_store(|| sc.ds.backup_restored_volumes_settle(p.vm_id, host))
            .await
            .map_err(|e| StepError::internal("recording the restored volumes", e))?;
    }
    Ok(Settled {
        state: shown(want),
        host_id: Some(host),
        removed: false,
    })
}

// ---- vm_backup -----------------------------------------------------------

/// The API recorded the backup (`running`) and held the VM with the job;
/// this step only confirms it, so its undo can take it back.
async fn backup_accept(ctx: Ctx) -> Result<(), ActionError> {
    let p = params(&ctx)?;
    ctx.user_data()
        .step(p.job_id, "accepted", 5, "backup recorded")
        .await?;
    Ok(())
}

/// A backup that did not complete is never a restore point: marked failed
/// (a backup already failed or succeeded is left alone), and its request
/// withdrawn so the host stops being handed it.
async fn backup_accept_undo(ctx: Ctx) -> Result<(), anyhow::Error> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    sc.step(p.job_id, "undo", 60, "discarding the backup")
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    crate::storage::backup_discard(sc, p.job_id, "the backup was undone").await
}

// ---- snapshots -------------------------------------------------------------

/// The API recorded what the job acts on with the job; this step only
/// confirms it, so its undo can take it back.
async fn confirm(ctx: Ctx) -> Result<(), ActionError> {
    let p = params(&ctx)?;
    ctx.user_data()
        .step(p.job_id, "accepted", 5, "recorded")
        .await?;
    Ok(())
}

async fn snapshot_accept_undo(ctx: Ctx) -> Result<(), anyhow::Error> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    sc.step(p.job_id, "undo", 60, "removing the snapshot")
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    crate::storage::snapshot_discard(sc, p.job_id).await
}

// ---- vm_start, vm_stop, vm_reboot, vm_delete ----------------------------

/// The API recorded the new intent with the job; this step only records
/// that, so its undo can restore the previous one.
async fn intent(ctx: Ctx) -> Result<(), ActionError> {
    let p = params(&ctx)?;
    ctx.user_data()
        .step(p.job_id, "intent", 10, "intent recorded; the host was told")
        .await?;
    Ok(())
}

/// Restores the operator's previous intent, so the host stops converging
/// on this one. Setting the same intent twice is one change.
async fn intent_undo(ctx: Ctx) -> Result<(), anyhow::Error> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    sc.step(p.job_id, "undo", 60, "restoring the previous desired state")
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    sc.set_desired(p.vm_id, p.previous.previous_desired)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))
}

async fn power_converge(ctx: Ctx) -> Result<Settled, ActionError> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    let host = placed_host(sc, &p).await?;
    let (wait, target, message) = match p.desired {
        VmDesiredState::Running if p.reboot_generation > 0 => (
            Wait::Reboot(p.reboot_generation),
            VmState::Running,
            "waiting for the VM to reboot",
        ),
        VmDesiredState::Running => (
            Wait::State(ObservedVmState::Running),
            VmState::Running,
            "waiting for the VM to boot",
        ),
        _ => (
            Wait::State(ObservedVmState::Stopped),
            VmState::Stopped,
            "waiting for the guest to power off",
        ),
    };
    sc.step(p.job_id, "converge", 30, message).await?;
    sc.await_host(
        p.job_id,
        p.job_created_at,
        p.vm_id,
        wait,
        sc.timing.power,
        OnCancel::Stop,
    )
    .await?;
    Ok(Settled {
        state: target,
        host_id: Some(host),
        removed: false,
    })
}

async fn delete_destroy(ctx: Ctx) -> Result<Settled, ActionError> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    not_cancelled(sc, p.job_id).await?;
    let vm = retry_store(|| sc.ds.vm_get(p.vm_id))
        .await
        .map_err(|e| StepError::internal("reading the VM", e))?;
    if vm.host_id.is_some() {
        sc.step(
            p.job_id,
            "destroy",
            30,
            "waiting for the host to destroy the VM and its disks",
        )
        .await?;
        sc.await_host(
            p.job_id,
            p.job_created_at,
            p.vm_id,
            Wait::State(ObservedVmState::Absent),
            sc.timing.delete,
            OnCancel::Stop,
        )
        .await?;
    } else {
        sc.step(
            p.job_id,
            "forget",
            50,
            "the VM was never placed; removing its record",
        )
        .await?;
    }
    Ok(Settled {
        state: VmState::Stopped,
        host_id: None,
        removed: true,
    })
}

/// How an observed state shows on the VM.
pub fn shown(s: ObservedVmState) -> VmState {
    match s {
        ObservedVmState::Running => VmState::Running,
        ObservedVmState::Stopped | ObservedVmState::Absent => VmState::Stopped,
        ObservedVmState::Crashed => VmState::Crashed,
        ObservedVmState::Failed => VmState::Failed,
    }
}
