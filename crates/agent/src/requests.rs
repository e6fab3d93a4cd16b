//! Requests the controller hands the agent with its desired state (today:
//! run a command in a guest). Each is carried out once, in its own task, and
//! its outcome posted back; the controller keeps delivering a request until
//! it is answered, so the agent remembers the ids it has handled (and for a
//! while after answering, in case a desired state fetched before the answer
//! arrives late).

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use stratus_client::types::{AgentRequest, AgentRequestKind, AgentRequestResult, ExecResult};
use stratus_common::VmId;

use crate::agent::{Backoff, Shared};
use crate::error::chain;
use crate::state::{RequestState, Snapshot};

/// How long an answered request id is remembered after it left the desired
/// state.
const REMEMBER: Duration = Duration::from_secs(120);
/// How long the agent keeps trying to post an outcome.
const POST_FOR: Duration = Duration::from_secs(120);
/// Beyond the command's own timeout, how long the guest agent may take.
const EXEC_SLACK: Duration = Duration::from_secs(15);

/// Starts every request of the snapshot not seen before; forgets answered
/// ones the controller no longer sends.
pub(crate) fn dispatch(shared: &Arc<Shared>, s: &Snapshot) {
    let mut new = Vec::new();
    {
        let mut book = shared.book();
        for r in &s.requests {
            if let std::collections::hash_map::Entry::Vacant(e) = book.requests.entry(r.id) {
                e.insert(RequestState::Running);
                new.push(r.clone());
            }
        }
        book.requests.retain(|id, st| match st {
            RequestState::Running => true,
            RequestState::Answered(at) => {
                s.requests.iter().any(|r| r.id == *id) || at.elapsed() < REMEMBER
            }
        });
    }
    for r in new {
        shared.spawn(carry_out(shared.clone(), r));
    }
}

async fn carry_out(shared: Arc<Shared>, r: AgentRequest) {
    let started = Instant::now();
    let answer = match &r.request {
        AgentRequestKind::Exec {
            vm_id,
            argv,
            timeout_secs,
        } => exec(&shared, VmId(vm_id.0), argv, *timeout_secs).await,
    };
    tracing::info!(
        request = %r.id,
        ok = answer.error.is_none(),
        ms = started.elapsed().as_millis() as u64,
        "request carried out"
    );
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    let posting = Instant::now();
    loop {
        match shared.api.request_result(r.id, answer.clone()).await {
            Ok(()) => break,
            Err(e) if e.is_permanent() => {
                // E.g. the request expired meanwhile: nobody waits for it.
                tracing::warn!(request = %r.id, error = %chain(&e), "the controller refused the request's outcome");
                break;
            }
            Err(e) if posting.elapsed() > POST_FOR => {
                tracing::warn!(request = %r.id, error = %chain(&e), "giving up posting the request's outcome");
                break;
            }
            Err(e) => {
                tracing::debug!(request = %r.id, error = %chain(&e), "cannot post the request's outcome yet");
                tokio::time::sleep(backoff.next_wait()).await;
            }
        }
    }
    shared
        .book()
        .requests
        .insert(r.id, RequestState::Answered(Instant::now()));
}

async fn exec(shared: &Shared, vm: VmId, argv: &[String], timeout_secs: u32) -> AgentRequestResult {
    let timeout = Duration::from_secs(u64::from(timeout_secs.max(1)));
    let run = shared.driver.guest_exec(vm, argv, timeout);
    match tokio::time::timeout(timeout + EXEC_SLACK, run).await {
        Ok(Ok(out)) => AgentRequestResult {
            result: Some(ExecResult {
                exit_code: out.exit_code,
                stdout_base64: STANDARD.encode(&out.stdout),
                stderr_base64: STANDARD.encode(&out.stderr),
            }),
            error: None,
        },
        Ok(Err(e)) => AgentRequestResult {
            result: None,
            error: Some(chain(&e)),
        },
        Err(_) => AgentRequestResult {
            result: None,
            error: Some(format!(
                "the guest agent of VM {vm} did not finish the command within {} s",
                (timeout + EXEC_SLACK).as_secs()
            )),
        },
    }
}
