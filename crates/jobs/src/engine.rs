//! The saga engine: steno's saga execution coordinator, with its log kept in
//! our store, run per job.
//!
//! A job claimed from the queue gets a new saga (its graph written to the
//! job's row before anything runs); a job adopted from a controller that
//! died gets its saga resumed from the log: steps that finished are not run
//! again, a step that started and did not finish runs again (every action
//! is idempotent), an unwinding saga goes on unwinding. When the saga ends
//! the job's outcome and its effect on the VM are written in one
//! transaction.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::future::BoxFuture;
use newtype_uuid::GenericUuid;
use steno::{
    RepeatInjected, SagaCachedState, SagaCreateParams, SagaId, SagaNodeEvent, SagaResult,
    SecClient, SecStore,
};
use stratus_api_types::views::VmState;
use stratus_common::{Error, JobId, VmId};
use stratus_datastore::model::JobRecord;
use stratus_datastore::{Datastore, JobOutcome, VmEffect};
use tokio::sync::Notify;

use crate::context::{retry_store, SagaContext, StepError};
use crate::kinds::{JobKind, VmJobParams};
use crate::sagas::{self, Settled, StratusSaga, VmSagaParams};

/// A fault to inject into the next saga of a kind: how the generated saga
/// tests run every action twice, fail every step, and run every undo twice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Injection {
    /// Every action of the saga runs twice.
    RepeatActions,
    /// The named step fails before it runs (earlier steps are undone).
    Fail(&'static str),
    /// The named step fails, and every undo runs twice.
    FailRepeatingUndos(&'static str),
}

pub struct SagaEngine {
    sec: SecClient,
    registry: Arc<steno::ActionRegistry<StratusSaga>>,
    ctx: Arc<SagaContext>,
    store: Arc<LogStore>,
    injections: Mutex<Vec<(JobKind, Injection)>>,
}

impl SagaEngine {
    pub fn new(ctx: SagaContext) -> Self {
        let ctx = Arc::new(ctx);
        let store = Arc::new(LogStore {
            ds: ctx.ds.clone(),
            owner: ctx.owner.clone(),
            lost: Mutex::new(HashMap::new()),
        });
        let log = slog::Logger::root(ToTracing, slog::o!());
        SagaEngine {
            sec: steno::sec(log, store.clone()),
            registry: Arc::new(sagas::registry()),
            ctx,
            store,
            injections: Mutex::new(Vec::new()),
        }
    }

    /// Stops every step in progress here for good (see
    /// [`SagaContext::halted`]).
    pub fn halt(&self) {
        let _ = self.ctx.halted.send(true);
    }

    pub fn context(&self) -> &SagaContext {
        &self.ctx
    }

    /// Arms a fault for the next saga of `kind` this engine starts.
    pub fn inject(&self, kind: JobKind, injection: Injection) {
        self.injections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((kind, injection));
    }

    fn take_injection(&self, kind: JobKind) -> Option<Injection> {
        let mut all = self.injections.lock().unwrap_or_else(|p| p.into_inner());
        let i = all.iter().position(|(k, _)| *k == kind)?;
        Some(all.remove(i).1)
    }

    /// Runs a job's saga to its end and records the outcome. Returns early,
    /// recording nothing, if another controller takes the job over.
    pub async fn run(&self, job: JobRecord) {
        let id = job.id;
        let kind: JobKind = match job.kind.parse() {
            Ok(k) => k,
            Err(m) => {
                return self
                    .finish_failed(&job, StepError::new("unknown_job_kind", m))
                    .await
            }
        };
        let previous: VmJobParams = match serde_json::from_value(job.params.clone()) {
            Ok(p) => p,
            Err(e) => {
                return self
                    .finish_failed(
                        &job,
                        StepError::new(
                            "bad_job_params",
                            format!("the job's parameters cannot be read: {e}"),
                        ),
                    )
                    .await
            }
        };
        let lost = self.store.watch_lost(id);
        let saga_id = SagaId::from_untyped_uuid(id.as_uuid());
        let started = match retry_store(|| self.ctx.ds.saga_dag(id)).await {
            Ok(Some(dag)) => self.resume(&job, saga_id, &dag).await,
            Ok(None) => self.create(&job, kind, saga_id, previous.clone()).await,
            Err(e) => Err(StepError::internal("reading the job's saga", e)),
        };
        let future = match started {
            Ok(Some(f)) => f,
            Ok(None) => return self.finish_failed(&job, target_gone(&job)).await,
            Err(e) if e.code == "job_not_owned" => {
                tracing::info!(job = %id, "job taken over by another controller");
                return;
            }
            Err(e) => return self.finish_failed(&job, e).await,
        };
        if let Err(e) = self.sec.saga_start(saga_id).await {
            return self
                .finish_failed(
                    &job,
                    StepError::new("internal", format!("starting the saga: {e:#}")),
                )
                .await;
        }
        let result = tokio::select! {
            r = future => r,
            _ = lost.notified() => {
                tracing::warn!(job = %id, "lost this job's lease to another controller; leaving it to them");
                self.store.forget(id);
                return;
            }
        };
        self.store.forget(id);
        self.finish(&job, kind, &previous, result).await;
    }

    async fn create(
        &self,
        job: &JobRecord,
        kind: JobKind,
        saga_id: SagaId,
        previous: VmJobParams,
    ) -> Result<Option<BoxFuture<'static, SagaResult>>, StepError> {
        let vm = match retry_store(|| self.ctx.ds.vm_of_job(job.id)).await {
            Ok(Some(vm)) => vm,
            Ok(None) => return Ok(None),
            Err(e) => return Err(StepError::internal("reading the job's VM", e)),
        };
        let params = VmSagaParams {
            job_id: job.id,
            job_created_at: job.created_at,
            vm_id: vm.id,
            desired: vm.desired_state,
            reboot_generation: if kind == JobKind::VmReboot {
                u64::try_from(vm.reboot_generation).unwrap_or(0)
            } else {
                0
            },
            previous,
        };
        let dag = sagas::dag(kind, &params)?;
        let future = self
            .sec
            .saga_create(
                saga_id,
                self.ctx.clone(),
                dag.clone(),
                self.registry.clone(),
            )
            .await
            .map_err(|e| self.store_error("creating the saga", e))?;
        if let Some(injection) = self.take_injection(kind) {
            self.apply(saga_id, &dag, kind, injection).await?;
        }
        Ok(Some(future))
    }

    async fn resume(
        &self,
        job: &JobRecord,
        saga_id: SagaId,
        dag: &str,
    ) -> Result<Option<BoxFuture<'static, SagaResult>>, StepError> {
        let dag: serde_json::Value = serde_json::from_str(dag)
            .map_err(|e| StepError::new("internal", format!("reading the saga's graph: {e}")))?;
        let mut events = Vec::new();
        for e in retry_store(|| self.ctx.ds.saga_events(job.id))
            .await
            .map_err(|e| StepError::internal("reading the saga's log", e))?
        {
            let event: SagaNodeEvent = serde_json::from_str(&e)
                .map_err(|e| StepError::new("internal", format!("reading the saga's log: {e}")))?;
            events.push(event);
        }
        tracing::info!(job = %job.id, events = events.len(), "resuming saga");
        let future = self
            .sec
            .saga_resume(
                saga_id,
                self.ctx.clone(),
                dag,
                self.registry.clone(),
                events,
            )
            .await
            .map_err(|e| self.store_error("resuming the saga", e))?;
        Ok(Some(future))
    }

    fn store_error(&self, context: &str, e: anyhow::Error) -> StepError {
        let text = format!("{e:#}");
        // The store's refusal (another controller owns the job) comes
        // through steno's context wrapping as our own error.
        if e.downcast_ref::<Error>()
            .is_some_and(|inner| inner.error_code() == "job_not_owned")
        {
            return StepError::new("job_not_owned", text);
        }
        tracing::warn!(error = %text, context, "saga engine error");
        StepError::new("internal", format!("{context} failed: {text}"))
    }

    async fn apply(
        &self,
        saga_id: SagaId,
        dag: &steno::SagaDag,
        kind: JobKind,
        injection: Injection,
    ) -> Result<(), StepError> {
        let node = |name: &str| {
            dag.get_index(name)
                .map_err(|e| StepError::new("internal", format!("injecting a fault: {e}")))
        };
        let twice = NonZeroU32::new(2).unwrap_or(NonZeroU32::MIN);
        let once = NonZeroU32::MIN;
        let result = match injection {
            Injection::RepeatActions => {
                for name in sagas::node_names(kind) {
                    let r = RepeatInjected {
                        action: twice,
                        undo: once,
                    };
                    self.sec
                        .saga_inject_repeat(saga_id, node(name)?, r)
                        .await
                        .map_err(|e| StepError::new("internal", e.to_string()))?;
                }
                Ok(())
            }
            Injection::Fail(name) => self.sec.saga_inject_error(saga_id, node(name)?).await,
            Injection::FailRepeatingUndos(name) => {
                for n in sagas::node_names(kind) {
                    let r = RepeatInjected {
                        action: once,
                        undo: twice,
                    };
                    self.sec
                        .saga_inject_repeat(saga_id, node(n)?, r)
                        .await
                        .map_err(|e| StepError::new("internal", e.to_string()))?;
                }
                self.sec.saga_inject_error(saga_id, node(name)?).await
            }
        };
        result.map_err(|e| StepError::new("internal", e.to_string()))
    }

    /// Records how the saga ended, with its effect on the VM.
    async fn finish(&self, job: &JobRecord, kind: JobKind, previous: &VmJobParams, r: SagaResult) {
        let vm_id = VmId::from(job.target_id);
        match r.kind {
            Ok(ok) => {
                let settled: Settled = match ok.lookup_node_output(sagas::SETTLED) {
                    Ok(s) => s,
                    Err(e) => {
                        let f =
                            StepError::new("internal", format!("reading the saga's result: {e}"));
                        return self.finish_failed(job, f).await;
                    }
                };
                let effect = if settled.removed {
                    VmEffect::Remove { vm_id }
                } else {
                    VmEffect::Update {
                        vm_id,
                        state: settled.state,
                        state_reason: None,
                        host_id: settled.host_id,
                        desired_state: None,
                    }
                };
                self.record(job, JobOutcome::Succeeded, Some(effect)).await;
            }
            Err(e) => {
                let mut failure = match e.error_source.clone().convert::<StepError>() {
                    Ok(f) => f,
                    Err(steno::ActionError::InjectedError) => StepError::new(
                        "injected_error",
                        format!("fault injected at step {}", e.error_node_name.as_ref()),
                    ),
                    Err(other) => StepError::new(
                        "internal",
                        format!("step {} failed: {other}", e.error_node_name.as_ref()),
                    ),
                };
                if let Some((node, undo)) = &e.undo_failure {
                    failure = StepError::new(
                        "undo_failed",
                        format!(
                            "{} (and undoing step {} failed: {undo}; the VM needs attention)",
                            failure.message,
                            node.as_ref()
                        ),
                    );
                }
                // steno never undoes the step that failed; when that was the
                // first, what the API wrote with the job is taken back here.
                let first_failed = e.error_node_name.as_ref() == sagas::node_names(kind)[0];
                if first_failed {
                    // steno undoes only completed steps: take back what the
                    // API recorded with the job here.
                    let undone = match kind {
                        JobKind::VmSnapshotCreate => {
                            crate::storage::snapshot_discard(&self.ctx, job.id).await
                        }
                        JobKind::VmVolumeAttach => {
                            let vm = VmId::from(job.target_id);
                            crate::storage::volume_attach_discard(&self.ctx, job.id, vm, previous)
                                .await
                        }
                        JobKind::VmVolumeDetach => {
                            let vm = VmId::from(job.target_id);
                            crate::storage::volume_detach_discard(&self.ctx, vm, previous).await
                        }
                        JobKind::VmMigrate => {
                            let vm = VmId::from(job.target_id);
                            crate::migrate::discard(&self.ctx, job.id, vm).await
                        }
                        JobKind::VmSnapshotDelete => match previous.snapshot {
                            Some(id) => retry_store(|| self.ctx.ds.snapshot_undelete(id))
                                .await
                                .map_err(|e| anyhow::anyhow!("{e}")),
                            None => Ok(()),
                        },
                        _ => Ok(()),
                    };
                    if let Err(e) = undone {
                        tracing::warn!(job = %job.id, error = %e, "could not take back what the job recorded");
                    }
                }
                if kind == JobKind::VmBackup {
                    // Never a restore point; the reason is the job's.
                    if let Err(e) =
                        crate::storage::backup_discard(&self.ctx, job.id, &failure.message).await
                    {
                        tracing::warn!(job = %job.id, error = %e, "could not mark the backup failed");
                    }
                }
                let effect = self
                    .failure_effect(job, kind, previous, &failure, first_failed)
                    .await;
                let outcome = if failure.is_cancel() {
                    JobOutcome::Cancelled {
                        message: match kind {
                            JobKind::VmBackup => {
                                "cancelled on request; the backup was discarded".into()
                            }
                            JobKind::VmCreate => {
                                "cancelled on request; the VM was removed from its host".into()
                            }
                            JobKind::VmMigrate => {
                                "cancelled on request; the VM stays on its host".into()
                            }
                            _ => "cancelled on request; the previous desired state was restored"
                                .into(),
                        },
                    }
                } else {
                    JobOutcome::Failed {
                        code: failure.code.clone(),
                        message: failure.message.clone(),
                    }
                };
                self.record(job, outcome, effect).await;
            }
        }
    }

    /// What an unwound saga leaves on the VM. A create leaves nothing: its
    /// undo discarded the VM. Any other operation leaves the VM as its host
    /// last reported it, its undo having restored the operator's previous
    /// intent. When the first step failed (steno undoes only steps that
    /// completed), that first step's undo is done here. A VM whose undo
    /// failed is left `failed` with the reason, for the operator.
    async fn failure_effect(
        &self,
        job: &JobRecord,
        kind: JobKind,
        previous: &VmJobParams,
        failure: &StepError,
        first_failed: bool,
    ) -> Option<VmEffect> {
        let vm_id = VmId::from(job.target_id);
        let reason = (!failure.is_cancel()).then(|| failure.message.clone());
        let undo_failed = failure.code == "undo_failed";
        if kind == JobKind::VmCreate {
            let held = retry_store(|| self.ctx.ds.vm_get(vm_id))
                .await
                .is_ok_and(|v| v.active_job_id == Some(job.id));
            if !held {
                // The saga's undo discarded it.
                return None;
            }
            if first_failed && !undo_failed {
                match sagas::discard_create(&self.ctx, job.id, job.created_at, vm_id).await {
                    Ok(()) => return None,
                    Err(e) => {
                        tracing::warn!(job = %job.id, error = %e, "could not discard a failed create")
                    }
                }
            }
            let _ = self
                .ctx
                .set_desired(vm_id, stratus_api_types::views::VmDesiredState::Stopped)
                .await;
            let now = retry_store(|| self.ctx.ds.vm_get(vm_id)).await.ok()?;
            return Some(VmEffect::Update {
                vm_id,
                state: VmState::Failed,
                state_reason: reason,
                host_id: now.host_id,
                desired_state: Some(stratus_api_types::views::VmDesiredState::Stopped),
            });
        }
        if first_failed {
            if let Err(e) = self.ctx.set_desired(vm_id, previous.previous_desired).await {
                tracing::warn!(job = %job.id, error = %e.message, "could not restore the VM's intent");
            }
        }
        let now = retry_store(|| self.ctx.ds.vm_get(vm_id)).await.ok()?;
        Some(VmEffect::Update {
            vm_id,
            state: now
                .observed_state
                .map(sagas::shown)
                .unwrap_or(previous.previous_state),
            state_reason: reason.or(now.state_reason.clone()),
            host_id: now.host_id,
            desired_state: None,
        })
    }

    async fn finish_failed(&self, job: &JobRecord, f: StepError) {
        tracing::warn!(job = %job.id, code = %f.code, message = %f.message, "job failed before its saga ran");
        let outcome = JobOutcome::Failed {
            code: f.code,
            message: f.message,
        };
        self.record(job, outcome, None).await;
    }

    async fn record(&self, job: &JobRecord, outcome: JobOutcome, effect: Option<VmEffect>) {
        let owner = &self.ctx.owner;
        match retry_store(|| {
            self.ctx
                .ds
                .job_finish(job.id, owner, outcome.clone(), effect.clone())
        })
        .await
        {
            Ok(done) => {
                if let Some(VmEffect::Update { vm_id, .. } | VmEffect::Remove { vm_id }) = &effect {
                    self.ctx.signals.vm_observed(*vm_id);
                }
                tracing::info!(job = %job.id, state = ?done.state, "job ended")
            }
            Err(Error::Conflict { .. }) => {
                tracing::info!(job = %job.id, "job finished or taken over elsewhere")
            }
            Err(e) => {
                tracing::warn!(job = %job.id, error = %e, "could not record the job's outcome")
            }
        }
    }
}

/// steno logs through slog; its warnings and errors go to our tracing log
/// (its routine chatter, one line per saga event, is dropped).
struct ToTracing;

impl slog::Drain for ToTracing {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, r: &slog::Record<'_>, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
        match r.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "steno", "{}", r.msg())
            }
            slog::Level::Warning => tracing::warn!(target: "steno", "{}", r.msg()),
            _ => {}
        }
        Ok(())
    }
}

fn target_gone(job: &JobRecord) -> StepError {
    StepError::new(
        "target_gone",
        format!("the VM {} is no longer held by this job", job.target_id),
    )
}

/// steno's log, kept in the jobs' rows and `saga_events`. Writes are made
/// only while this controller owns the job; a refused write means another
/// controller took the job over, and this saga stops where it is.
struct LogStore {
    ds: Datastore,
    owner: String,
    lost: Mutex<HashMap<JobId, Arc<Notify>>>,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl LogStore {
    fn watch_lost(&self, job: JobId) -> Arc<Notify> {
        self.lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(job)
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    fn forget(&self, job: JobId) {
        self.lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&job);
    }

    fn job_of(saga: SagaId) -> JobId {
        JobId::from(saga.into_untyped_uuid())
    }
}

#[async_trait]
impl SecStore for LogStore {
    async fn saga_create(&self, p: SagaCreateParams) -> Result<(), anyhow::Error> {
        let dag = serde_json::to_string(&p.dag)?;
        let job = Self::job_of(p.id);
        retry_store(|| self.ds.saga_create(job, &self.owner, &dag))
            .await
            .map_err(anyhow::Error::from)
    }

    async fn record_event(&self, event: SagaNodeEvent) {
        let job = Self::job_of(event.saga_id);
        let node = i64::from(u32::from(event.node_id));
        let kind = event.event_type.label();
        let text = match serde_json::to_string(&event) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(job = %job, error = %e, "cannot serialize a saga event");
                return;
            }
        };
        // The engine cannot go on until the event is recorded: keep trying.
        let mut pause = std::time::Duration::from_millis(100);
        loop {
            match self
                .ds
                .saga_record(job, &self.owner, node, kind, &text)
                .await
            {
                Ok(true) => return,
                Ok(false) => {
                    // Another controller owns the job now: stop here for
                    // good (the saga's task waits forever; `run` returns).
                    if let Some(n) = self
                        .lost
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&job)
                    {
                        n.notify_one();
                    }
                    std::future::pending::<()>().await;
                }
                Err(e) => {
                    tracing::warn!(job = %job, error = %e, "could not record a saga event; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(5));
                }
            }
        }
    }

    async fn saga_update(&self, id: SagaId, update: SagaCachedState) {
        let job = Self::job_of(id);
        let state: &str = (&update).into();
        if let Err(e) = self.ds.saga_set_state(job, &self.owner, state).await {
            tracing::warn!(job = %job, error = %e, "could not record a saga's state");
        }
    }
}
