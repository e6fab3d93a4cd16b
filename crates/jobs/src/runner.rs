//! The job runner: claims queued jobs and carries them out.
//!
//! One runner per controller. It wakes when the API queues a job (or every
//! `poll_interval`, which also catches jobs queued by other controllers),
//! requeues jobs whose owner's lease expired (a controller that died
//! mid-job), and runs claimed jobs concurrently up to `max_concurrent`.

use std::sync::Arc;
use std::time::Duration;

use stratus_api_types::views::{HostState, VmState};
use stratus_common::time::now_micros;
use stratus_common::Error;
use stratus_datastore::model::{JobRecord, VmRecord};
use stratus_datastore::{Datastore, JobOutcome, VmEffect};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::kinds::{JobKind, VmJobParams};

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

pub struct JobRunner {
    ds: Datastore,
    config: RunnerConfig,
    wake: Arc<Notify>,
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
    pub fn new(ds: Datastore, config: RunnerConfig) -> Self {
        JobRunner {
            ds,
            config,
            wake: Arc::new(Notify::new()),
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
            JobKind::VmDelete => self.vm_delete(job, &vm).await,
            JobKind::VmStart | JobKind::VmStop | JobKind::VmReboot => Err(Failure {
                code: "vm_not_placed",
                message: format!(
                    "VM {:?} is not placed on a host, so it cannot be {}",
                    vm.name,
                    verb(kind)
                ),
                effect: Some(restore(&vm, params)),
            }),
        }
    }

    /// Creating a VM: choose a host, then have its agent build and boot it.
    async fn vm_create(&self, job: &JobRecord, vm: &VmRecord) -> Result<Option<VmEffect>, Failure> {
        self.step(job, "schedule", 10, "looking for a host with room")
            .await?;
        let counts = self
            .ds
            .host_count_by_state()
            .await
            .map_err(|e| internal("counting hosts", e))?;
        let total: i64 = counts.iter().map(|(_, n)| n).sum();
        let up: i64 = counts
            .iter()
            .filter(|(s, _)| *s == HostState::Up)
            .map(|(_, n)| n)
            .sum();
        let why = if total == 0 {
            "no host can run this VM: no hosts are enrolled (run `stratus agent` on a host to add one)"
                .to_string()
        } else if up == 0 {
            format!("no host can run this VM: none of the {total} enrolled host(s) is up")
        } else {
            format!(
                "no host can run this VM: {up} host(s) are up but this controller cannot yet hand VMs to \
                 host agents"
            )
        };
        Err(Failure {
            code: "no_host_available",
            message: why.clone(),
            effect: Some(VmEffect::Update {
                vm_id: vm.id,
                state: VmState::Failed,
                state_reason: Some(why),
                host_id: None,
                desired_state: None,
            }),
        })
    }

    /// Deleting a VM: have its host destroy it, then forget it.
    async fn vm_delete(&self, job: &JobRecord, vm: &VmRecord) -> Result<Option<VmEffect>, Failure> {
        if let Some(host) = vm.host_id {
            return Err(Failure {
                code: "host_unavailable",
                message: format!(
                    "VM {:?} is on host {host}, which this controller cannot reach",
                    vm.name
                ),
                effect: Some(VmEffect::Update {
                    vm_id: vm.id,
                    state: vm.state,
                    state_reason: Some("delete failed: host unreachable".into()),
                    host_id: Some(host),
                    desired_state: None,
                }),
            });
        }
        self.step(
            job,
            "forget",
            50,
            "the VM was never placed; removing its record",
        )
        .await?;
        Ok(Some(VmEffect::Remove { vm_id: vm.id }))
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
