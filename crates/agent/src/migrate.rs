//! The agent's side of a live migration: each step is one request from the
//! controller (see `stratus_jobs::migrate`), carried out through the
//! driver, which holds the mechanics (`stratus_driver::migrate`).
//!
//! The destination builds the VM from its own desired state (where the
//! controller lists the VM as incoming, with the pool its disk goes to), so
//! the spec is the one this host will converge on once the VM is its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use stratus_client::types::{AgentRequestResult, RequestProgress};
use stratus_common::{ByteCount, VmId};
use stratus_driver::{IncomingRequest, MigratePhase, MigrateProgress, MigrateRequest};

use crate::agent::Shared;
use crate::error::chain;
use crate::requests::{answered, failed};

/// How long the destination waits for the desired state that lists the
/// incoming VM (it comes with the request; a slow fetch can lag).
const DESIRED_WAIT: Duration = Duration::from_secs(10);
/// How long the destination waits for the arrived VM to run.
const FINISH_WAIT: Duration = Duration::from_secs(60);
/// How often migration progress is posted at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

pub(crate) async fn prepare(
    shared: &Arc<Shared>,
    id: VmId,
    incoming: &serde_json::Value,
) -> AgentRequestResult {
    let req: IncomingRequest = match serde_json::from_value(incoming.clone()) {
        Ok(r) => r,
        Err(e) => return failed(format!("cannot read the migration request: {e}")),
    };
    let deadline = Instant::now() + DESIRED_WAIT;
    let desired = loop {
        if let Some(vm) = shared.book().desired_vm(id).cloned() {
            break vm;
        }
        if Instant::now() > deadline {
            return failed(format!(
                "VM {id} is not in this host's desired state as incoming; cannot build it"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let spec = match crate::converge::spec_for(shared, id, &desired).await {
        Ok(s) => s,
        Err(e) => return failed(chain(&e)),
    };
    match shared.driver.vm_migrate_prepare(&spec, &req).await {
        Ok(ready) => match serde_json::to_value(&ready) {
            Ok(v) => AgentRequestResult {
                migration: Some(v),
                ..answered()
            },
            Err(e) => failed(format!("cannot encode the destination's answer: {e}")),
        },
        Err(e) => failed(chain(&e)),
    }
}

pub(crate) async fn send(
    shared: &Arc<Shared>,
    request: uuid::Uuid,
    id: VmId,
    body: &serde_json::Value,
) -> AgentRequestResult {
    let req: MigrateRequest = match serde_json::from_value(body.clone()) {
        Ok(r) => r,
        Err(e) => return failed(format!("cannot read the migration request: {e}")),
    };
    // The newest progress is posted by a task of its own, at most every
    // PROGRESS_EVERY, so a slow controller never slows the migration.
    let (tx, mut rx) = tokio::sync::watch::channel(None::<MigrateProgress>);
    let poster = {
        let shared = shared.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let Some(p) = rx.borrow_and_update().clone() else {
                    continue;
                };
                let body = RequestProgress {
                    done_bytes: p.memory_transferred_bytes + p.disk_done_bytes,
                    total_bytes: p.memory_total_bytes.max(p.memory_transferred_bytes)
                        + p.disk_total_bytes,
                    message: Some(describe(&p)),
                };
                if let Err(e) = shared.api.request_progress(request, body).await {
                    tracing::debug!(request = %request, error = %chain(&e), "cannot post migration progress");
                }
                tokio::time::sleep(PROGRESS_EVERY).await;
            }
        })
    };
    let progress = move |p: MigrateProgress| {
        let _ = tx.send(Some(p));
    };
    let outcome = shared.driver.vm_migrate_send(id, &req, &progress).await;
    poster.abort();
    match outcome {
        Ok(o) => {
            tracing::info!(vm = %id, total_ms = o.total_ms, downtime_ms = o.downtime_ms, "VM migrated away");
            match serde_json::to_value(&o) {
                Ok(v) => AgentRequestResult {
                    migration: Some(v),
                    ..answered()
                },
                Err(e) => failed(format!("cannot encode the migration's outcome: {e}")),
            }
        }
        Err(e) => failed(chain(&e)),
    }
}

pub(crate) async fn finish(shared: &Arc<Shared>, id: VmId) -> AgentRequestResult {
    match shared.driver.vm_migrate_finish(id, FINISH_WAIT).await {
        Ok(()) => {
            tracing::info!(vm = %id, "migrated VM arrived and runs here");
            shared.report_now.notify_one();
            answered()
        }
        Err(e) => failed(chain(&e)),
    }
}

/// The job's message for a progress report: phase, amounts, rates and the
/// expected downtime.
fn describe(p: &MigrateProgress) -> String {
    let phase = match p.phase {
        Some(MigratePhase::MirroringDisk) => "copying the disk",
        Some(MigratePhase::MigratingMemory) | None => "migrating memory",
        Some(MigratePhase::Postcopy) => "post-copy (running on the destination)",
        Some(MigratePhase::Completing) => "switching over",
    };
    let mut s = format!(
        "{phase}: memory {} of {} sent, {} remaining, dirty rate {}/s, pass {}",
        ByteCount(p.memory_transferred_bytes),
        ByteCount(p.memory_total_bytes),
        ByteCount(p.memory_remaining_bytes),
        ByteCount(p.dirty_rate_bytes_per_sec),
        p.passes
    );
    if p.disk_total_bytes > 0 {
        s.push_str(&format!(
            "; disk {} of {}",
            ByteCount(p.disk_done_bytes),
            ByteCount(p.disk_total_bytes)
        ));
    }
    if let Some(ms) = p.expected_downtime_ms {
        s.push_str(&format!("; expected downtime {ms} ms"));
    }
    s
}
