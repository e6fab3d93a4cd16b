//! What every saga action can use: the store, the wake-up signals, this
//! controller's identity, and the waits and retries the VM sagas share.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use stratus_api_types::agent::ObservedVmState;
use stratus_api_types::views::VmDesiredState;
use stratus_common::time::now_micros;
use stratus_common::{Error, JobId, VmId};
use stratus_datastore::model::VmRecord;
use stratus_datastore::Datastore;
use tokio::sync::watch;

use crate::signals::Signals;

/// Why a step failed, as the job records it (`code` is machine-readable).
/// Carried through the saga log, so it survives a controller restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepError {
    pub code: String,
    pub message: String,
}

impl StepError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        StepError {
            code: code.to_string(),
            message: message.into(),
        }
    }

    pub fn cancelled() -> Self {
        StepError::new("cancelled", "cancelled on request")
    }

    pub fn is_cancel(&self) -> bool {
        self.code == "cancelled"
    }

    /// A store error, logged in full; the job says where it happened.
    pub fn internal(context: &str, e: Error) -> Self {
        tracing::warn!(error = %e, context, "job step failed");
        StepError::new(
            "internal",
            format!("{context} failed; see the controller log"),
        )
    }
}

impl From<StepError> for steno::ActionError {
    fn from(e: StepError) -> Self {
        steno::ActionError::action_failed(e)
    }
}

/// The controller-side state shared by every running saga.
pub struct SagaContext {
    pub ds: Datastore,
    pub signals: Arc<Signals>,
    /// This controller's name in job leases.
    pub owner: String,
    /// How long to wait for hosts, and how hard to retry them.
    pub timing: Timing,
    /// Set when this controller's runner shuts down: every step in progress
    /// stops at its next store access or wait and never resumes here (the
    /// job's next owner runs it again).
    pub halted: watch::Sender<bool>,
}

impl std::fmt::Debug for SagaContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaContext")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// Time limits and retry policy of the VM sagas.
#[derive(Clone, Debug)]
pub struct Timing {
    pub create: Duration,
    pub power: Duration,
    pub delete: Duration,
    /// A backup's copy, or a restore, on the host.
    pub backup: Duration,
    /// Attempts (the first included) when the host reports a failure,
    /// before the job fails.
    pub attempts: u32,
    /// Wait before the second attempt; doubled for each further one.
    pub backoff: Duration,
    /// How often a waiting step re-reads the store when nothing woke it
    /// (reports applied by other controllers, cancellations made there).
    pub recheck: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            create: Duration::from_secs(600),
            power: Duration::from_secs(300),
            delete: Duration::from_secs(300),
            backup: Duration::from_secs(6 * 3600),
            attempts: 3,
            backoff: Duration::from_secs(1),
            recheck: Duration::from_millis(1000),
        }
    }
}

/// What a step waits for the host to report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
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

/// How a wait ends early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnCancel {
    /// The job's cancellation ends the wait (the step fails, the saga
    /// unwinds).
    Stop,
    /// Undo steps finish what they started whatever is asked.
    Ignore,
}

impl SagaContext {
    /// Parks the calling step for good once the runner has shut down.
    async fn unless_halted(&self) {
        if *self.halted.borrow() {
            std::future::pending::<()>().await;
        }
    }

    /// Resolves never; parks forever once halted (for steps outside this
    /// module).
    pub(crate) async fn halted_wait(&self) {
        self.halt_signal().await
    }

    /// Resolves never; parks forever once halted.
    async fn halt_signal(&self) {
        let mut rx = self.halted.subscribe();
        let _ = rx.wait_for(|h| *h).await;
        std::future::pending::<()>().await;
    }

    /// Records that the job reached a step (its log, progress and lease).
    pub async fn step(
        &self,
        job: JobId,
        step: &str,
        progress: u8,
        message: &str,
    ) -> Result<(), StepError> {
        self.unless_halted().await;
        let until = now_micros() + micros(crate::runner::LEASE);
        self.ds
            .job_step(job, &self.owner, step, progress, message, until)
            .await
            .map(|_| ())
            .map_err(|e| StepError::internal("recording a step", e))
    }

    /// Whether someone asked to cancel the job.
    pub async fn cancel_requested(&self, job: JobId) -> Result<bool, StepError> {
        let j = self
            .ds
            .job_get(job)
            .await
            .map_err(|e| StepError::internal("reading the job", e))?;
        Ok(j.cancel_requested_at.is_some())
    }

    /// Changes a VM's desired state and wakes agents waiting on this
    /// controller. Unchanged intent is no change (so running this twice is
    /// running it once).
    pub async fn set_desired(&self, vm: VmId, desired: VmDesiredState) -> Result<(), StepError> {
        self.unless_halted().await;
        match retry_store(|| self.ds.vm_set_desired(vm, desired)).await {
            Ok(Some(host)) => self.signals.host_desired_changed(host),
            Ok(None) => {}
            Err(e) => return Err(StepError::internal("changing the VM's desired state", e)),
        }
        Ok(())
    }

    /// Waits until the host reports what the step waits for. A failure the
    /// host reports for this job's intent (it could not download, build or
    /// start) is retried (a fresh intent
    /// generation, with backoff) up to `timing.attempts` times; then, or on
    /// cancellation (`OnCancel::Stop`), timeout or a crash while booting,
    /// the step fails.
    pub async fn await_host(
        &self,
        job: JobId,
        job_created_at: i64,
        vm: VmId,
        wait: Wait,
        timeout: Duration,
        on_cancel: OnCancel,
    ) -> Result<VmRecord, StepError> {
        let started = tokio::time::Instant::now();
        let mut observed = self.signals.watch_vm(vm);
        let mut attempt = 1;
        // The intent this wait is about: the VM's generation when it began
        // (the job's intent, or the latest retry of it).
        let mut intent = self
            .ds
            .vm_get(vm)
            .await
            .map_err(|e| StepError::internal("reading the VM", e))?
            .generation;
        let mut since = job_created_at;
        loop {
            observed.rx.borrow_and_update();
            let rec = match self.ds.vm_get(vm).await {
                Ok(r) => r,
                Err(Error::NotFound { .. }) if wait == Wait::State(ObservedVmState::Absent) => {
                    return Err(StepError::new("target_gone", "the VM record is gone"));
                }
                Err(e) => return Err(StepError::internal("reading the VM", e)),
            };
            // A report made after the host acted on this intent (and
            // applied after the job began): only such a report can fail the
            // step, never one still in flight from before.
            let fresh = rec.observed_at.is_some_and(|t| t > since)
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
            let failure = if fresh && wait != Wait::State(ObservedVmState::Absent) {
                match rec.observed_state {
                    Some(ObservedVmState::Failed) => Some(StepError::new(
                        "host_failed",
                        rec.observed_reason
                            .clone()
                            .unwrap_or_else(|| "the host could not carry it out".into()),
                    )),
                    Some(ObservedVmState::Crashed)
                        if wait == Wait::State(ObservedVmState::Running) =>
                    {
                        Some(StepError::new(
                            "vm_crashed",
                            format!(
                                "the VM crashed while booting: {}",
                                rec.observed_reason
                                    .clone()
                                    .unwrap_or_else(|| "no reason given".into())
                            ),
                        ))
                    }
                    _ => None,
                }
            } else {
                None
            };
            if let Some(f) = failure {
                // A VM that crashed while booting would crash again; only
                // the host's own failures are retried.
                if attempt >= self.timing.attempts || f.code == "vm_crashed" {
                    return Err(f);
                }
                // Transient host failures (a download cut short, a busy
                // host) deserve another go before the operator is told.
                let pause = self.timing.backoff * 2u32.saturating_pow(attempt - 1);
                attempt += 1;
                self.step(
                    job,
                    "retry",
                    40,
                    &format!(
                        "the host reported: {}; trying again in {} ms (attempt {attempt} of {})",
                        f.message,
                        pause.as_millis(),
                        self.timing.attempts
                    ),
                )
                .await?;
                tokio::time::sleep(pause).await;
                self.unless_halted().await;
                let (host, generation) = retry_store(|| self.ds.vm_retry_intent(vm))
                    .await
                    .map_err(|e| StepError::internal("asking the host to retry", e))?;
                if let Some(h) = host {
                    self.signals.host_desired_changed(h);
                }
                intent = generation;
                since = now_micros();
                continue;
            }
            if on_cancel == OnCancel::Stop && self.cancel_requested(job).await? {
                return Err(StepError::cancelled());
            }
            if started.elapsed() > timeout {
                return Err(StepError::new(
                    "host_timeout",
                    format!(
                        "the host did not report the VM {} within {} s (is its agent running?)",
                        wait.describe(),
                        timeout.as_secs()
                    ),
                ));
            }
            // Woken by a report (or cancellation) this controller applied;
            // the timer catches those applied by other controllers.
            tokio::select! {
                _ = observed.rx.changed() => {}
                _ = tokio::time::sleep(self.timing.recheck) => {}
                _ = self.halt_signal() => {}
            }
        }
    }
}

/// Runs a store call again on failure (a busy database, a dropped
/// connection), three times over about a second, before giving up.
pub async fn retry_store<T, F, Fut>(mut f: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let mut pause = Duration::from_millis(100);
    let mut tries = 0;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            // Only a failing store is worth a retry; conflicts and missing
            // rows are answers.
            Err(e @ (Error::Internal { .. } | Error::Unavailable { .. })) if tries < 3 => {
                tracing::debug!(error = %e, "store call failed; retrying");
                tries += 1;
                tokio::time::sleep(pause).await;
                pause *= 3;
            }
            Err(e) => return Err(e),
        }
    }
}

pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}
