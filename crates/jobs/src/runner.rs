//! The job runner: claims queued jobs and carries them out.
//!
//! One runner per controller. It wakes when the API queues a job (or every
//! `poll_interval`, which also catches jobs queued by other controllers),
//! requeues jobs whose owner's lease expired (a controller that died
//! mid-job), and runs claimed jobs concurrently up to `max_concurrent`.

use std::sync::Arc;
use std::time::Duration;

use stratus_api_types::agent::ObservedVmState;
use stratus_api_types::views::{VmDesiredState, VmState};
use stratus_common::time::now_micros;
use stratus_common::{Error, VmId};
use stratus_datastore::model::{JobRecord, VmRecord};
use stratus_datastore::{Datastore, JobOutcome, VmEffect};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::kinds::{JobKind, VmJobParams};
use crate::signals::Signals;

#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// This controller's name in job claims; unique among live controllers.
    pub owner: String,
    /// How long a claim holds without renewal.
    pub lease: Duration,
    /// How often to look for work nobody woke us for.
    pub poll_interval: Duration,
    pub max_concurrent: usize,
}

impl RunnerConfig {
    pub fn new(owner: impl Into<String>) -> Self {
        RunnerConfig {
            owner: owner.into(),
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(500),
            max_concurrent: 32,
        }
    }
}

/// A host that has not reported for this long is unreachable.
const HOST_TIMEOUT: Duration = Duration::from_secs(20);

pub struct JobRunner {
    ds: Datastore,
    config: RunnerConfig,
    wake: Arc<Notify>,
    signals: Arc<Signals>,
}

/// Controls a running [`JobRunner`].
pub struct RunnerHandle {
    wake: Arc<Notify>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunnerHandle {
    /// Tells the runner new work is queued.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// A waker to hand to the API layer.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Stops claiming new jobs and waits for the loop to end. Jobs in flight
    /// are abandoned with their lease, so the next start (or another
    /// controller) requeues and finishes them.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.wake.notify_one();
        let _ = self.task.await;
    }
}

/// Why a job did not succeed, as the job will record it.
struct Failure {
    code: &'static str,
    message: String,
    effect: Option<VmEffect>,
}

impl JobRunner {
    pub fn new(ds: Datastore, config: RunnerConfig, signals: Arc<Signals>) -> Self {
        JobRunner {
            ds,
            config,
            wake: Arc::new(Notify::new()),
            signals,
        }
    }

    pub fn start(self) -> RunnerHandle {
        let wake = self.wake.clone();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(self.run(stopped));
        RunnerHandle { wake, stop, task }
    }

    async fn run(self, mut stopped: watch::Receiver<bool>) {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(this.config.max_concurrent));
        loop {
            if *stopped.borrow() {
                break;
            }
            if let Err(e) = this.ds.job_requeue_expired(now_micros()).await {
                tracing::warn!(error = %e, "could not requeue expired jobs");
            }
            // Hosts silent for longer than the timeout are unreachable (the
            // HA work acts on that; here it keeps them out of placement).
            match this
                .ds
                .host_mark_unreachable(now_micros() - micros(HOST_TIMEOUT))
                .await
            {
                Ok(0) => {}
                Ok(n) => {
                    tracing::warn!(hosts = n, "hosts stopped heartbeating; marked unreachable")
                }
                Err(e) => tracing::warn!(error = %e, "could not check host heartbeats"),
            }
            loop {
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    break;
                };
                let lease_until = now_micros() + micros(this.config.lease);
                match this
                    .ds
                    .job_claim_next(&this.config.owner, lease_until)
                    .await
                {
                    Ok(Some(job)) => {
                        let me = this.clone();
                        tokio::spawn(async move {
                            me.run_job(job).await;
                            drop(permit);
                        });
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not claim a job");
                        break;
                    }
                }
            }
            tokio::select! {
                _ = this.wake.notified() => {}
                _ = tokio::time::sleep(this.config.poll_interval) => {}
                _ = stopped.changed() => {}
            }
        }
    }

    async fn run_job(&self, job: JobRecord) {
        let id = job.id;
        tracing::info!(job = %id, kind = %job.kind, target = %job.target_id, "running job");
        let result = self.execute(&job).await;
        let (outcome, effect) = match result {
            Ok(effect) => (JobOutcome::Succeeded, effect),
            Err(f) if f.code == "cancelled" => {
                (JobOutcome::Cancelled { message: f.message }, f.effect)
            }
            Err(f) => (
                JobOutcome::Failed {
                    code: f.code.to_string(),
                    message: f.message,
                },
                f.effect,
            ),
        };
        match self
            .ds
            .job_finish(id, &self.config.owner, outcome, effect)
            .await
        {
            Ok(done) => tracing::info!(job = %id, state = ?done.state, "job ended"),
            Err(e) => tracing::warn!(job = %id, error = %e, "could not record the job's outcome"),
        }
    }

    /// Changes a VM's desired state and wakes agents waiting on this
    /// controller.
    async fn set_desired(&self, vm: VmId, desired: VmDesiredState) -> Result<(), Error> {
        match self.ds.vm_set_desired(vm, desired).await? {
            Some(host) => self.signals.host_desired_changed(host),
            None => self.signals.desired_changed(),
        }
        Ok(())
    }

    async fn step(
        &self,
        job: &JobRecord,
        step: &str,
        progress: u8,
        message: &str,
    ) -> Result<JobRecord, Failure> {
        let lease_until = now_micros() + micros(self.config.lease);
        self.ds
            .job_step(
                job.id,
                &self.config.owner,
                step,
                progress,
                message,
                lease_until,
            )
            .await
            .map_err(|e| internal("recording a step", e))
    }

    async fn execute(&self, job: &JobRecord) -> Result<Option<VmEffect>, Failure> {
        let kind: JobKind = job.kind.parse().map_err(|m: String| Failure {
            code: "unknown_job_kind",
            message: m,
            effect: None,
        })?;
        let vm = self
            .ds
            .vm_of_job(job.id)
            .await
            .map_err(|e| internal("reading the job's VM", e))?
            .ok_or_else(|| Failure {
                code: "target_gone",
                message: format!("the VM {} is no longer held by this job", job.target_id),
                effect: None,
            })?;
        let params: VmJobParams =
            serde_json::from_value(job.params.clone()).map_err(|e| Failure {
                code: "bad_job_params",
                message: format!("the job's parameters cannot be read: {e}"),
                effect: None,
            })?;
        if job.cancel_requested_at.is_some() {
            return Err(cancelled(kind, &vm, &params));
        }
        // Whatever fails, the VM is released: a failure that did not say what
        // becomes of the VM leaves it as the operation found it (or, for a
        // create, failed).
        self.execute_vm(job, kind, &vm, &params)
            .await
            .map_err(|mut f| {
                if f.effect.is_none() {
                    f.effect = Some(match kind {
                        JobKind::VmCreate => VmEffect::Update {
                            vm_id: vm.id,
                            state: VmState::Failed,
                            state_reason: Some(f.message.clone()),
                            host_id: vm.host_id,
                            desired_state: None,
                        },
                        _ => restore(&vm, &params),
                    });
                }
                f
            })
    }

    async fn execute_vm(
        &self,
        job: &JobRecord,
        kind: JobKind,
        vm: &VmRecord,
        params: &VmJobParams,
    ) -> Result<Option<VmEffect>, Failure> {
        let vm = vm.clone();
        match kind {
            JobKind::VmCreate => self.vm_create(job, &vm).await,
            JobKind::VmDelete => self.vm_delete(job, &vm, params).await,
            JobKind::VmStart | JobKind::VmStop | JobKind::VmReboot => {
                self.vm_power(job, kind, &vm, params).await
            }
        }
    }

    /// Creating a VM: choose a host, then have its agent build and boot it.
    async fn vm_create(&self, job: &JobRecord, vm: &VmRecord) -> Result<Option<VmEffect>, Failure> {
        // The scheduler placed the VM when the request was accepted (its
        // host's allocation was claimed in the same transaction).
        let Some(host) = vm.host_id else {
            return Err(Failure {
                code: "vm_not_placed",
                message: format!("VM {:?} was recorded without a host", vm.name),
                effect: None,
            });
        };
        let want = if vm.desired_state == VmDesiredState::Stopped {
            ObservedVmState::Stopped
        } else {
            ObservedVmState::Running
        };
        self.step(
            job,
            "provision",
            30,
            "waiting for the host to fetch the image, build and boot the VM",
        )
        .await?;
        match self
            .await_observation(job, vm.id, vm.generation, Wait::State(want), CREATE_TIMEOUT)
            .await
        {
            Ok(seen) => Ok(Some(VmEffect::Update {
                vm_id: vm.id,
                state: shown(want),
                state_reason: None,
                host_id: Some(seen.host_id.unwrap_or(host)),
                desired_state: None,
            })),
            Err(f) if f.code == "cancelled" => {
                // Undo: the host destroys what it built, then the VM is gone.
                self.undo_create(job, vm.id).await?;
                Err(Failure {
                    code: "cancelled",
                    message: "cancelled on request; the VM was removed from its host".into(),
                    effect: Some(VmEffect::Remove { vm_id: vm.id }),
                })
            }
            Err(mut f) => {
                // A failed VM stays, stopped, with the reason, for the
                // operator to retry (start) or delete; its host stops trying.
                if let Err(e) = self.set_desired(vm.id, VmDesiredState::Stopped).await {
                    tracing::warn!(vm = %vm.id, error = %e, "could not park a failed VM");
                }
                f.effect = Some(VmEffect::Update {
                    vm_id: vm.id,
                    state: VmState::Failed,
                    state_reason: Some(f.message.clone()),
                    host_id: Some(host),
                    desired_state: Some(VmDesiredState::Stopped),
                });
                Err(f)
            }
        }
    }

    async fn undo_create(&self, job: &JobRecord, vm: VmId) -> Result<(), Failure> {
        self.set_desired(vm, VmDesiredState::Deleted)
            .await
            .map_err(|e| internal("asking the host to remove the VM", e))?;
        self.step(job, "undo", 60, "waiting for the host to remove the VM")
            .await?;
        self.await_observation_uncancellable(
            job,
            vm,
            Wait::State(ObservedVmState::Absent),
            DELETE_TIMEOUT,
        )
        .await
        .map(|_| ())
    }

    /// Start, stop and reboot: the intent is already recorded (and the host
    /// told); wait for the host to report the result.
    async fn vm_power(
        &self,
        job: &JobRecord,
        kind: JobKind,
        vm: &VmRecord,
        params: &VmJobParams,
    ) -> Result<Option<VmEffect>, Failure> {
        let Some(host) = vm.host_id else {
            return Err(Failure {
                code: "vm_not_placed",
                message: format!(
                    "VM {:?} is not placed on a host, so it cannot be {}",
                    vm.name,
                    verb(kind)
                ),
                effect: Some(restore(vm, params)),
            });
        };
        let (wait, target, step) = match kind {
            JobKind::VmStart => (
                Wait::State(ObservedVmState::Running),
                VmState::Running,
                "waiting for the VM to boot",
            ),
            JobKind::VmStop => (
                Wait::State(ObservedVmState::Stopped),
                VmState::Stopped,
                "waiting for the guest to power off",
            ),
            _ => (
                Wait::Reboot(u64::try_from(vm.reboot_generation).unwrap_or(0)),
                VmState::Running,
                "waiting for the VM to reboot",
            ),
        };
        self.step(job, "converge", 30, step).await?;
        match self
            .await_observation(job, vm.id, vm.generation, wait, POWER_TIMEOUT)
            .await
        {
            Ok(_) => Ok(Some(VmEffect::Update {
                vm_id: vm.id,
                state: target,
                state_reason: None,
                host_id: Some(host),
                desired_state: None,
            })),
            Err(mut f) => {
                // Cancelled or failed: the operator's previous intent is
                // restored, so the host stops converging on this one.
                if let Err(e) = self.set_desired(vm.id, params.previous_desired).await {
                    tracing::warn!(vm = %vm.id, error = %e, "could not restore the VM's intent");
                }
                let now = self.ds.vm_get(vm.id).await.ok();
                let state = now
                    .as_ref()
                    .and_then(|v| v.observed_state)
                    .map(shown)
                    .unwrap_or(params.previous_state);
                f.effect = Some(VmEffect::Update {
                    vm_id: vm.id,
                    state,
                    state_reason: if f.code == "cancelled" {
                        None
                    } else {
                        Some(f.message.clone())
                    },
                    host_id: Some(host),
                    desired_state: Some(params.previous_desired),
                });
                Err(f)
            }
        }
    }

    /// Deleting a VM: have its host destroy it, then forget it.
    async fn vm_delete(
        &self,
        job: &JobRecord,
        vm: &VmRecord,
        params: &VmJobParams,
    ) -> Result<Option<VmEffect>, Failure> {
        if vm.host_id.is_none() {
            self.step(
                job,
                "forget",
                50,
                "the VM was never placed; removing its record",
            )
            .await?;
            return Ok(Some(VmEffect::Remove { vm_id: vm.id }));
        }
        self.step(
            job,
            "destroy",
            30,
            "waiting for the host to destroy the VM and its disks",
        )
        .await?;
        match self
            .await_observation(
                job,
                vm.id,
                vm.generation,
                Wait::State(ObservedVmState::Absent),
                DELETE_TIMEOUT,
            )
            .await
        {
            Ok(_) => Ok(Some(VmEffect::Remove { vm_id: vm.id })),
            Err(mut f) => {
                if let Err(e) = self.set_desired(vm.id, params.previous_desired).await {
                    tracing::warn!(vm = %vm.id, error = %e, "could not restore the VM's intent");
                }
                f.effect = Some(restore(vm, params));
                Err(f)
            }
        }
    }

    /// Waits until the host reports what the job waits for, the job is
    /// cancelled, the host reports a failure, or the time runs out. Renews
    /// the job's lease meanwhile.
    async fn await_observation(
        &self,
        job: &JobRecord,
        vm: VmId,
        intent: i64,
        wait: Wait,
        timeout: Duration,
    ) -> Result<VmRecord, Failure> {
        self.await_inner(job, vm, intent, wait, timeout, true).await
    }

    async fn await_observation_uncancellable(
        &self,
        job: &JobRecord,
        vm: VmId,
        wait: Wait,
        timeout: Duration,
    ) -> Result<VmRecord, Failure> {
        self.await_inner(job, vm, 0, wait, timeout, false).await
    }

    async fn await_inner(
        &self,
        job: &JobRecord,
        vm: VmId,
        intent: i64,
        wait: Wait,
        timeout: Duration,
        cancellable: bool,
    ) -> Result<VmRecord, Failure> {
        let started = tokio::time::Instant::now();
        let mut renewed = started;
        let mut observed = self.signals.watch_vm(vm);
        loop {
            observed.rx.borrow_and_update();
            let rec = self
                .ds
                .vm_get(vm)
                .await
                .map_err(|e| internal("reading the VM", e))?;
            // An observation made after the host acted on this job's intent
            // (and applied after the job began): only such a report can fail
            // the job, never one still in flight from before.
            let fresh = rec.observed_at.is_some_and(|t| t > job.created_at)
                && rec.observed_intent_generation >= intent;
            let done = match wait {
                Wait::State(s) => {
                    rec.observed_state == Some(s) && (fresh || s != ObservedVmState::Failed)
                }
                Wait::Reboot(g) => {
                    u64::try_from(rec.observed_reboot_generation).unwrap_or(0) >= g
                        && rec.observed_state == Some(ObservedVmState::Running)
                }
            };
            if done {
                return Ok(rec);
            }
            // A failure the host reported after this job began is this job's.
            if fresh
                && rec.observed_state == Some(ObservedVmState::Failed)
                && wait != Wait::State(ObservedVmState::Absent)
            {
                return Err(Failure {
                    code: "host_failed",
                    message: rec
                        .observed_reason
                        .unwrap_or_else(|| "the host could not carry it out".into()),
                    effect: None,
                });
            }
            // A VM that crashed while booting, after the host acted on this
            // create or start.
            if fresh
                && (job.kind == JobKind::VmCreate.as_str() || job.kind == JobKind::VmStart.as_str())
                && rec.observed_state == Some(ObservedVmState::Crashed)
            {
                return Err(Failure {
                    code: "vm_crashed",
                    message: format!(
                        "the VM crashed while booting: {}",
                        rec.observed_reason
                            .unwrap_or_else(|| "no reason given".into())
                    ),
                    effect: None,
                });
            }
            if cancellable {
                let current = self
                    .ds
                    .job_get(job.id)
                    .await
                    .map_err(|e| internal("reading the job", e))?;
                if current.cancel_requested_at.is_some() {
                    return Err(Failure {
                        code: "cancelled",
                        message: "cancelled on request".into(),
                        effect: None,
                    });
                }
            }
            if started.elapsed() > timeout {
                return Err(Failure {
                    code: "host_timeout",
                    message: format!(
                        "the host did not report the VM {} within {} s (is its agent running?)",
                        wait.describe(),
                        timeout.as_secs()
                    ),
                    effect: None,
                });
            }
            if renewed.elapsed() > self.config.lease / 3 {
                let until = now_micros() + micros(self.config.lease);
                match self
                    .ds
                    .job_renew_lease(job.id, &self.config.owner, until)
                    .await
                {
                    Ok(true) => renewed = tokio::time::Instant::now(),
                    Ok(false) => {
                        return Err(Failure {
                            code: "lease_lost",
                            message: "another controller took over this job".into(),
                            effect: None,
                        })
                    }
                    Err(e) => {
                        tracing::warn!(job = %job.id, error = %e, "could not renew the job lease")
                    }
                }
            }
            // Woken by a report this controller applied; the timer catches
            // reports applied by other controllers and cancellations.
            tokio::select! {
                _ = observed.rx.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }
}

const CREATE_TIMEOUT: Duration = Duration::from_secs(600);
const POWER_TIMEOUT: Duration = Duration::from_secs(300);
const DELETE_TIMEOUT: Duration = Duration::from_secs(300);

/// What a job waits for the host to report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    State(ObservedVmState),
    /// Running, having carried out this reboot request.
    Reboot(u64),
}

impl Wait {
    fn describe(self) -> String {
        match self {
            Wait::State(s) => format!(
                "as {}",
                serde_json::to_value(s)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            ),
            Wait::Reboot(_) => "rebooted".into(),
        }
    }
}

/// How an observed state shows on the VM.
fn shown(s: ObservedVmState) -> VmState {
    match s {
        ObservedVmState::Running => VmState::Running,
        ObservedVmState::Stopped | ObservedVmState::Absent => VmState::Stopped,
        ObservedVmState::Crashed => VmState::Crashed,
        ObservedVmState::Failed => VmState::Failed,
    }
}

/// What cancelling a job before it acted leaves behind: a create leaves
/// nothing; any other operation restores the VM as it was.
fn cancelled(kind: JobKind, vm: &VmRecord, params: &VmJobParams) -> Failure {
    let effect = match kind {
        JobKind::VmCreate => VmEffect::Remove { vm_id: vm.id },
        _ => restore(vm, params),
    };
    Failure {
        code: "cancelled",
        message: "cancelled on request before any change was made".into(),
        effect: Some(effect),
    }
}

fn restore(vm: &VmRecord, params: &VmJobParams) -> VmEffect {
    VmEffect::Update {
        vm_id: vm.id,
        state: params.previous_state,
        state_reason: vm.state_reason.clone(),
        host_id: vm.host_id,
        desired_state: Some(params.previous_desired),
    }
}

fn verb(kind: JobKind) -> &'static str {
    match kind {
        JobKind::VmStart => "started",
        JobKind::VmStop => "stopped",
        JobKind::VmReboot => "rebooted",
        JobKind::VmCreate => "created",
        JobKind::VmDelete => "deleted",
    }
}

fn internal(context: &str, e: Error) -> Failure {
    tracing::warn!(error = %e, context, "job step failed");
    Failure {
        code: "internal",
        message: format!("{context} failed; see the controller log"),
        effect: None,
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}
