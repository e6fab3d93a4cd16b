//! The job runner: finds work and hands each job to the saga engine.
//!
//! One runner per controller. It wakes when the API queues a job (or every
//! `poll_interval`, which also catches jobs queued by other controllers),
//! claims queued jobs, and adopts running jobs whose owner stopped renewing
//! its lease (a controller that died: its sagas resume here). A separate
//! task renews the leases of every job this controller runs in one
//! statement. On SQLite, where the lock file admits one controller, the
//! runner adopts every running job at start instead of waiting for leases
//! to run out.

use std::sync::Arc;
use std::time::Duration;

use stratus_common::time::now_micros;
use stratus_datastore::{Adopt, Backend, Datastore};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::context::{micros, SagaContext, Timing};
use crate::engine::SagaEngine;
use crate::signals::Signals;

/// How long a controller's hold on a job lasts without renewal: after this,
/// another controller adopts the job.
pub const LEASE: Duration = Duration::from_secs(8);

#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// This controller's name; unique among live controllers (the default
    /// includes the process id and a random part). Job leases are held as
    /// `NAME#INCARNATION`, so a controller restarted under the same name
    /// is a new holder, and it adopts its earlier life's jobs at once.
    pub controller: String,
    /// How often to look for work nobody woke us for.
    pub poll_interval: Duration,
    /// Jobs run at once. A job waiting on a host costs a task and a few
    /// hundred bytes, so this is high.
    pub max_concurrent: usize,
    pub timing: Timing,
}

impl RunnerConfig {
    pub fn new(controller: impl Into<String>) -> Self {
        RunnerConfig {
            controller: controller.into(),
            poll_interval: Duration::from_millis(500),
            max_concurrent: 1024,
            timing: Timing::default(),
        }
    }
}

pub struct JobRunner {
    ds: Datastore,
    config: RunnerConfig,
    /// `CONTROLLER#INCARNATION`: this process's name in job leases.
    owner: String,
    wake: Arc<Notify>,
    engine: Arc<SagaEngine>,
}

/// Controls a running [`JobRunner`].
pub struct RunnerHandle {
    wake: Arc<Notify>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    renew: JoinHandle<()>,
    engine: Arc<SagaEngine>,
    ds: Datastore,
    owner: String,
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

    /// The saga engine (tests inject faults through it).
    pub fn engine(&self) -> &Arc<SagaEngine> {
        &self.engine
    }

    /// Stops claiming new jobs and hands the jobs in flight back: their
    /// leases end now, so the next controller (this one restarted, or
    /// another) resumes their sagas from the log at once. A saga step in
    /// progress here simply stops; it is idempotent and runs again there.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.wake.notify_one();
        let _ = self.task.await;
        self.renew.abort();
        self.engine.halt();
        if let Err(e) = self.ds.job_release_all(&self.owner).await {
            tracing::warn!(error = %e, "could not release job leases; they expire on their own");
        }
    }
}

impl JobRunner {
    pub fn new(ds: Datastore, config: RunnerConfig, signals: Arc<Signals>) -> Self {
        let owner = format!(
            "{}#{}",
            config.controller,
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let engine = Arc::new(SagaEngine::new(SagaContext {
            ds: ds.clone(),
            signals,
            owner: owner.clone(),
            timing: config.timing.clone(),
            halted: watch::channel(false).0,
        }));
        JobRunner {
            ds,
            config,
            owner,
            wake: Arc::new(Notify::new()),
            engine,
        }
    }

    pub fn start(self) -> RunnerHandle {
        let wake = self.wake.clone();
        let (stop, stopped) = watch::channel(false);
        let engine = self.engine.clone();
        let ds = self.ds.clone();
        let owner = self.owner.clone();
        let renew = tokio::spawn(renew_leases(ds.clone(), owner.clone()));
        let task = tokio::spawn(self.run(stopped));
        RunnerHandle {
            wake,
            stop,
            task,
            renew,
            engine,
            ds,
            owner,
        }
    }

    async fn run(self, mut stopped: watch::Receiver<bool>) {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(this.config.max_concurrent));
        // At start, on SQLite no other controller can be alive (the lock
        // file), so whatever is running was this store's previous
        // controller's; on PostgreSQL, jobs of this controller's earlier
        // lives (same name, another incarnation) are taken at once.
        let mut first = true;
        let mut last_adopt = tokio::time::Instant::now() - Duration::from_secs(60);
        loop {
            if *stopped.borrow() {
                break;
            }
            if last_adopt.elapsed() >= Duration::from_secs(1) {
                last_adopt = tokio::time::Instant::now();
                let room = i64::try_from(slots.available_permits()).unwrap_or(i64::MAX);
                let now = now_micros();
                let also = match (first, this.ds.backend()) {
                    (false, _) => Adopt::Expired,
                    (true, Backend::Sqlite) => Adopt::Everything,
                    (true, _) => Adopt::EarlierLivesOf(&this.config.controller),
                };
                match this
                    .ds
                    .job_adopt(&this.owner, now, now + micros(LEASE), also, room)
                    .await
                {
                    Ok(jobs) => {
                        first = false;
                        for job in jobs {
                            tracing::info!(job = %job.id, kind = %job.kind, "adopted a job");
                            let Ok(permit) = slots.clone().try_acquire_owned() else {
                                break;
                            };
                            let engine = this.engine.clone();
                            tokio::spawn(async move {
                                engine.run(job).await;
                                drop(permit);
                            });
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "could not look for jobs to adopt"),
                }
            }
            loop {
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    break;
                };
                let lease_until = now_micros() + micros(LEASE);
                match this.ds.job_claim_next(&this.owner, lease_until).await {
                    Ok(Some(job)) => {
                        tracing::info!(job = %job.id, kind = %job.kind, target = %job.target_id, "running job");
                        let engine = this.engine.clone();
                        tokio::spawn(async move {
                            engine.run(job).await;
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
}

/// Renews every lease this controller holds, four times per lease period.
async fn renew_leases(ds: Datastore, owner: String) {
    let mut tick = tokio::time::interval(LEASE / 4);
    loop {
        tick.tick().await;
        if let Err(e) = ds
            .job_renew_leases(&owner, now_micros() + micros(LEASE))
            .await
        {
            tracing::warn!(error = %e, "could not renew job leases");
        }
    }
}
