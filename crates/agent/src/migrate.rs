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
use stratus_driver::{
    DiskExport, DriverError, ExportRequest, IncomingRequest, MigratePhase, MigrateProgress,
    MigrateRequest, VmSpec,
};

use crate::agent::Shared;
use crate::error::chain;
use crate::requests::{answered, failed, Poster};

/// How long the destination waits for the desired state that lists the
/// incoming VM (it comes with the request; a slow fetch can lag).
const DESIRED_WAIT: Duration = Duration::from_secs(10);
/// How long the destination waits for the arrived VM to run. The
/// controller asks for the finish as the source starts sending (so its
/// round trip is not added after QEMU's completion), so this covers a
/// whole migration: as long as the controller waits for the send (6 h). A
/// migration that fails ends it sooner: the incoming QEMU exits when its
/// load fails, and the controller's undo aborts the incoming VM.
const FINISH_WAIT: Duration = Duration::from_secs(6 * 3600);
/// How often migration progress is posted at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// The spec of a VM this host's desired state lists as incoming: what it
/// will converge on once the VM is its own.
async fn incoming_spec(shared: &Arc<Shared>, id: VmId) -> Result<VmSpec, String> {
    let deadline = Instant::now() + DESIRED_WAIT;
    let desired = loop {
        if let Some(vm) = shared.book().desired_vm(id).cloned() {
            break vm;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "VM {id} is not in this host's desired state as incoming; cannot build it"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    crate::converge::spec_for(shared, id, &desired)
        .await
        .map_err(|e| chain(&e))
}

/// Encodes a driver's answer as the request's `migration`.
fn with_migration<T: serde::Serialize>(value: &T) -> AgentRequestResult {
    match serde_json::to_value(value) {
        Ok(v) => AgentRequestResult {
            migration: Some(v),
            ..answered()
        },
        Err(e) => failed(format!("cannot encode the host's answer: {e}")),
    }
}

/// Source of a live migration: what the destination must rebuild.
pub(crate) async fn outgoing(shared: &Arc<Shared>, id: VmId) -> AgentRequestResult {
    match shared.driver.vm_migrate_describe(id).await {
        Ok(outgoing) => with_migration(&outgoing),
        Err(e) => failed(chain(&e)),
    }
}

pub(crate) async fn prepare(
    shared: &Arc<Shared>,
    id: VmId,
    incoming: &serde_json::Value,
) -> AgentRequestResult {
    let req: IncomingRequest = match serde_json::from_value(incoming.clone()) {
        Ok(r) => r,
        Err(e) => return failed(format!("cannot read the migration request: {e}")),
    };
    let spec = match incoming_spec(shared, id).await {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    match shared.driver.vm_migrate_prepare(&spec, &req).await {
        Ok(ready) => with_migration(&ready),
        Err(e) => failed(chain(&e)),
    }
}

/// Source of a cold migration: serve the stopped VM's disk.
pub(crate) async fn export(
    shared: &Arc<Shared>,
    id: VmId,
    request: &serde_json::Value,
) -> AgentRequestResult {
    let req: ExportRequest = match serde_json::from_value(request.clone()) {
        Ok(r) => r,
        Err(e) => return failed(format!("cannot read the export request: {e}")),
    };
    match shared.driver.vm_disk_export(id, &req).await {
        Ok(x) => with_migration(&x),
        Err(e) => failed(chain(&e)),
    }
}

/// Destination of a cold migration: copy the disk from the source's
/// export, posting progress.
pub(crate) async fn import(
    shared: &Arc<Shared>,
    request: uuid::Uuid,
    id: VmId,
    export: &serde_json::Value,
) -> AgentRequestResult {
    let from: DiskExport = match serde_json::from_value(export.clone()) {
        Ok(r) => r,
        Err(e) => return failed(format!("cannot read the source's export: {e}")),
    };
    let spec = match incoming_spec(shared, id).await {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    let poster = Poster::start(
        shared,
        request,
        PROGRESS_EVERY,
        |p: &stratus_driver::BackupProgress| RequestProgress {
            done_bytes: p.done_bytes,
            total_bytes: p.total_bytes,
            message: Some(format!(
                "copying the disk: {} of {}",
                ByteCount(p.done_bytes).approx(),
                ByteCount(p.total_bytes).approx()
            )),
        },
    );
    let progress = poster.reporter();
    let outcome = shared.driver.vm_disk_import(&spec, &from, &progress).await;
    drop(poster);
    match outcome {
        Ok(o) => {
            tracing::info!(vm = %id, bytes = o.bytes_copied, ms = o.duration_ms, "VM's disk copied here");
            with_migration(&o)
        }
        Err(e) => failed(chain(&e)),
    }
}

/// Destination of a cold move within one shared pool: take the VM over.
pub(crate) async fn adopt(shared: &Arc<Shared>, id: VmId) -> AgentRequestResult {
    let spec = match incoming_spec(shared, id).await {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    match shared.driver.vm_adopt_from_pool(&spec).await {
        Ok(()) => answered(),
        Err(e) => failed(chain(&e)),
    }
}

/// Forgets a VM on this host. With `keep_disks`, disks in a shared pool
/// stay (another host may run the VM from them now): the VM is stopped if
/// it runs, then released; a VM with its disk in this host's own directory
/// is destroyed either way. Without, everything goes.
pub(crate) async fn forget(
    shared: &Arc<Shared>,
    id: VmId,
    keep_disks: bool,
) -> Result<(), DriverError> {
    let driver = &shared.driver;
    if !keep_disks {
        return driver.vm_destroy(id).await;
    }
    if let Some(st) = driver.vm_status(id).await? {
        if st.state.is_active() {
            driver.vm_stop(id, Duration::ZERO).await?;
        }
    }
    driver.vm_disk_export_stop(id).await?;
    match driver.vm_release(id).await {
        Ok(()) => Ok(()),
        // Not in a pool: its disk is this host's own.
        Err(DriverError::InvalidState { .. }) => driver.vm_destroy(id).await,
        Err(e) => Err(e),
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
    let poster = Poster::start(shared, request, PROGRESS_EVERY, |p: &MigrateProgress| {
        RequestProgress {
            done_bytes: p.memory_transferred_bytes + p.disk_done_bytes,
            total_bytes: p.memory_total_bytes.max(p.memory_transferred_bytes) + p.disk_total_bytes,
            message: Some(describe(p)),
        }
    });
    let progress = poster.reporter();
    let outcome = shared.driver.vm_migrate_send(id, &req, &progress).await;
    drop(poster);
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
        ByteCount(p.memory_transferred_bytes).approx(),
        ByteCount(p.memory_total_bytes).approx(),
        ByteCount(p.memory_remaining_bytes).approx(),
        ByteCount(p.dirty_rate_bytes_per_sec).approx(),
        p.passes
    );
    if p.disk_total_bytes > 0 {
        s.push_str(&format!(
            "; disk {} of {}",
            ByteCount(p.disk_done_bytes).approx(),
            ByteCount(p.disk_total_bytes).approx()
        ));
    }
    if let Some(ms) = p.expected_downtime_ms {
        s.push_str(&format!("; expected downtime {ms} ms"));
    }
    s
}
