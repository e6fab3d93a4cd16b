//! Steps that hand a host one request (a backup, a restore, ...) and wait
//! for its answer, reporting the host's progress into the job.
//!
//! The request's id is the job's id, so a step that runs again (the saga
//! resumed by this or another controller) finds the request it already sent
//! instead of sending a second one; a host that restarted meanwhile is
//! handed the unanswered request again and carries it out from the start.

use std::time::Duration;

use stratus_api_types::agent::{AgentRequestKind, AgentRequestResult};
use stratus_api_types::views::HostState;
use stratus_common::time::now_micros;
use stratus_common::{HostId, JobId, VmId};

use crate::context::{micros, retry_store, SagaContext, StepError};

/// How long a host may stay unreachable during a request before the step
/// gives up on it.
const UNREACHABLE_GRACE: Duration = Duration::from_secs(60);

/// One request for a step to send and wait on.
pub struct HostRequest<'a> {
    pub job: JobId,
    /// The request's id; `None`: the job's own (one request per job). A
    /// saga that hands out several derives one per step with
    /// [`step_request_id`], so each is still sent once.
    pub id: Option<uuid::Uuid>,
    pub host: HostId,
    pub vm: Option<VmId>,
    /// What it is, for the request's `kind` column and messages: `backup`.
    pub kind: &'static str,
    pub request: &'a AgentRequestKind,
    pub timeout: Duration,
    /// A clean-up (an undo's request): carried on when the job is being
    /// cancelled, which is when it is needed.
    pub cleanup: bool,
}

impl SagaContext {
    /// Sends `r` (once) and waits for the host's answer. While waiting,
    /// `progress(done, total)` turns the host's progress reports into the
    /// job's (percent, message). Fails on the host's error, on cancellation
    /// (the request is withdrawn), when the host stays unreachable, or at
    /// the timeout.
    pub async fn await_request(
        &self,
        r: HostRequest<'_>,
        progress: impl Fn(u64, u64) -> (u8, String),
    ) -> Result<AgentRequestResult, StepError> {
        let id = r.id.unwrap_or_else(|| r.job.as_uuid());
        let payload = serde_json::to_value(r.request)
            .map_err(|e| StepError::new("internal", format!("encoding the request: {e}")))?;
        let expires = now_micros() + micros(r.timeout);
        retry_store(|| {
            self.ds
                .host_request_ensure(id, r.host, r.vm, r.kind, &payload, expires)
        })
        .await
        .map_err(|e| StepError::internal("sending the request to the host", e))?;
        self.signals.host_desired_changed(r.host);
        let started = tokio::time::Instant::now();
        let mut answers = self.signals.watch_observed();
        let mut shown = None;
        let mut unreachable_since: Option<tokio::time::Instant> = None;
        loop {
            let req = retry_store(|| self.ds.host_request_get(id))
                .await
                .map_err(|e| StepError::internal("reading the request", e))?;
            if req.answered_at.is_some() {
                if let Some(e) = req.error {
                    return Err(StepError::new("host_failed", e));
                }
                // Every part of an answer is optional: none at all is an
                // answer with nothing in it.
                let v = req.result.unwrap_or_else(|| serde_json::json!({}));
                return serde_json::from_value(v).map_err(|e| {
                    StepError::new("internal", format!("reading the host's answer: {e}"))
                });
            }
            if let Some((done, total)) = req.progress {
                let now = Some((done, total, req.progress_message.clone()));
                if shown != now {
                    let (pct, mut message) = progress(done, total);
                    if let Some(m) = &req.progress_message {
                        message = m.clone();
                    }
                    shown = now;
                    self.step(r.job, r.kind, pct, &message).await?;
                }
            }
            if !r.cleanup && self.cancel_requested(r.job).await? {
                let _ = retry_store(|| self.ds.host_request_withdraw(id)).await;
                return Err(StepError::cancelled());
            }
            let host = retry_store(|| self.ds.host_get(r.host))
                .await
                .map_err(|e| StepError::internal("reading the host", e))?;
            if host.state == HostState::Up {
                unreachable_since = None;
            } else {
                let since = *unreachable_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() > UNREACHABLE_GRACE {
                    let _ = retry_store(|| self.ds.host_request_withdraw(id)).await;
                    return Err(StepError::new(
                        "host_unreachable",
                        format!(
                            "host {:?} is {} and did not finish the {}",
                            host.name,
                            serde_json::to_value(host.state)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_string))
                                .unwrap_or_default(),
                            r.kind
                        ),
                    ));
                }
            }
            if started.elapsed() > r.timeout {
                let _ = retry_store(|| self.ds.host_request_withdraw(id)).await;
                return Err(StepError::new(
                    "host_timeout",
                    format!(
                        "the host did not finish the {} within {} s",
                        r.kind,
                        r.timeout.as_secs()
                    ),
                ));
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = answers.changed() => {}
                _ = self.halted_wait() => {}
            }
        }
    }
}

/// The id of a saga's `step`-th request (1, 2, ...), derived from its job's
/// id: stable across resumptions, distinct from the job's own and from its
/// other steps'.
pub fn step_request_id(job: JobId, step: u8) -> uuid::Uuid {
    uuid::Uuid::from_u128(job.as_uuid().as_u128() ^ (u128::from(step) << 64))
}
