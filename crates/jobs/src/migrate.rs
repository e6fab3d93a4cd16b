//! The steps of `vm_migrate`: a VM moves to another host while it runs.
//!
//! ```text
//!  accepted ──► prepare ──────────► send ──────────────────────► settled
//!  (VM held,    (the destination     (the source sends memory,
//!   target       builds the VM and    disk if not shared; then the
//!   claimed)     waits, QEMU          destination confirms and the
//!                listening)           VM's host becomes the target)
//!  undo: the    undo: the
//!  claim goes   destination removes
//!               all it made
//! ```
//!
//! **Why the move is recorded inside `send`.** Once the source's QEMU has
//! handed the guest over, the only copy of the VM runs on the destination:
//! nothing may undo that. So the step that sends also records the arrival
//! (retrying the store until it can), and `prepare`'s undo never removes a
//! VM that has arrived. Every failure before the hand-over leaves the VM
//! running on the source (the driver resumes it) and, through the undos,
//! nothing on the destination: no QEMU, no disk, no claim.
//!
//! The host requests of one job have ids derived from the job's
//! ([`step_request_id`]), so a resumed step finds the request it sent.

use std::time::Duration;

use steno::ActionError;
use stratus_api_types::agent::AgentRequestKind;
use stratus_api_types::views::VmState;
use stratus_common::{ByteCount, HostId, JobId, VmId};

use crate::context::{retry_store, SagaContext, StepError};
use crate::kinds::MigrationParams;
use crate::requests::{step_request_id, HostRequest};
use crate::sagas::{params, Ctx, Settled, VmSagaParams};

const PREPARE: u8 = 1;
const SEND: u8 = 2;
const FINISH: u8 = 3;
const CANCEL: u8 = 4;
const ABORT: u8 = 5;
const EXPORT_STOP: u8 = 6;
const RELEASE: u8 = 7;
const DESCRIBE: u8 = 8;

/// How long a destination may take to build the VM and listen.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a destination may take to confirm or clean up.
const SHORT_TIMEOUT: Duration = Duration::from_secs(120);

/// The disk stays in one shared pool that both hosts see: nothing moves
/// but the VM.
fn same_pool(m: &MigrationParams) -> bool {
    m.source_pool.is_some() && m.source_pool == m.target_pool
}

fn migration(p: &VmSagaParams) -> Result<MigrationParams, StepError> {
    p.previous
        .migration
        .clone()
        .ok_or_else(|| StepError::new("internal", "the migration job has no parameters"))
}

async fn host_name(sc: &SagaContext, id: HostId) -> String {
    retry_store(|| sc.ds.host_get(id))
        .await
        .map(|h| h.name)
        .unwrap_or_else(|_| id.to_string())
}

/// Takes back what accepting the migration recorded: the destination's
/// claim. The VM stays where it is. (Also the engine's clean-up when this
/// first step itself failed.)
pub(crate) async fn discard(sc: &SagaContext, job: JobId, vm: VmId) -> Result<(), anyhow::Error> {
    retry_store(|| sc.ds.vm_move_abandon(vm, job))
        .await
        .map_err(|e| anyhow::anyhow!("releasing the destination's claim: {e}"))
}

pub(crate) async fn accept_undo(ctx: Ctx) -> Result<(), anyhow::Error> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    sc.step(p.job_id, "undo", 95, "releasing the destination's claim")
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    discard(sc, p.job_id, p.vm_id).await
}

/// The destination builds the VM and waits for it; its answer says where
/// to send it (the driver's `IncomingReady`).
pub(crate) async fn prepare(ctx: Ctx) -> Result<serde_json::Value, ActionError> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    if sc.cancel_requested(p.job_id).await? {
        return Err(StepError::cancelled().into());
    }
    let m = migration(&p)?;
    if m.cold {
        return cold_prepare(sc, &p, &m).await;
    }
    let target = host_name(sc, m.target).await;
    let (volumes, chain) = if m.volumes || m.snapshots {
        let outgoing = describe(sc, &p, &m).await?;
        (
            outgoing
                .get("volumes")
                .cloned()
                .unwrap_or_else(|| serde_json::json!([])),
            // Only a disk that is copied needs its layers made.
            if same_pool(&m) {
                serde_json::Value::Null
            } else {
                outgoing
                    .get("chain")
                    .cloned()
                    .unwrap_or(serde_json::Value::Null)
            },
        )
    } else {
        (serde_json::json!([]), serde_json::Value::Null)
    };
    sc.step(
        p.job_id,
        "prepare",
        10,
        &format!("host {target} is preparing to receive the VM"),
    )
    .await?;
    // A disk in one shared pool on both ends is opened there, not copied.
    let disk = if m.source_pool.is_some() && m.source_pool == m.target_pool {
        serde_json::json!({"kind": "pool"})
    } else if let Some(size) = m.standalone_disk_bytes {
        serde_json::json!({"kind": "standalone", "virtual_size": size})
    } else {
        serde_json::json!({"kind": "overlay"})
    };
    let incoming = serde_json::json!({
        "request_id": step_request_id(p.job_id, PREPARE),
        "disk": disk,
        "volumes": volumes,
        "chain": chain,
        "postcopy": m.postcopy_after_passes.is_some(),
    });
    let request = AgentRequestKind::MigratePrepare {
        vm_id: p.vm_id,
        incoming,
    };
    let answer = sc
        .await_request(
            HostRequest {
                job: p.job_id,
                id: Some(step_request_id(p.job_id, PREPARE)),
                host: m.target,
                vm: Some(p.vm_id),
                kind: "migration prepare",
                request: &request,
                timeout: PREPARE_TIMEOUT,
                cleanup: false,
            },
            |_, _| (10, format!("host {target} is preparing to receive the VM")),
        )
        .await?;
    let ready = answer.migration.ok_or_else(|| {
        StepError::new(
            "internal",
            "the destination answered without saying where to send the VM",
        )
    })?;
    sc.step(
        p.job_id,
        "prepare",
        15,
        &format!(
            "host {target} is waiting for the VM (QEMU {} at {})",
            ready["qemu_version"].as_str().unwrap_or("?"),
            ready["migration_uri"].as_str().unwrap_or("?")
        ),
    )
    .await?;
    Ok(ready)
}

/// What only the source knows (the driver's `OutgoingVm`): the VM's
/// attached volumes with the hot-plug port each is plugged into (the
/// destination plugs them into the same ports) and its disk's snapshot
/// layers (the destination makes the same files).
async fn describe(
    sc: &SagaContext,
    p: &VmSagaParams,
    m: &MigrationParams,
) -> Result<serde_json::Value, StepError> {
    let source = host_name(sc, m.source).await;
    sc.step(
        p.job_id,
        "prepare",
        5,
        &format!("host {source} is describing the VM's volumes and snapshot layers"),
    )
    .await?;
    let request = AgentRequestKind::MigrateDescribe { vm_id: p.vm_id };
    let answer = sc
        .await_request(
            HostRequest {
                job: p.job_id,
                id: Some(step_request_id(p.job_id, DESCRIBE)),
                host: m.source,
                vm: Some(p.vm_id),
                kind: "migration describe",
                request: &request,
                timeout: SHORT_TIMEOUT,
                cleanup: false,
            },
            |_, _| {
                (
                    5,
                    format!("host {source} is describing the VM's volumes and snapshot layers"),
                )
            },
        )
        .await?;
    answer
        .migration
        .ok_or_else(|| StepError::new("internal", "the source answered without describing the VM"))
}

/// Removes what the destination made, unless the VM arrived there (then it
/// is the VM, and stays).
pub(crate) async fn prepare_undo(ctx: Ctx) -> Result<(), anyhow::Error> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    let m = migration(&p).map_err(|e| anyhow::anyhow!(e.message))?;
    let vm = retry_store(|| sc.ds.vm_get(p.vm_id))
        .await
        .map_err(|e| anyhow::anyhow!("reading the VM: {e}"))?;
    if vm.host_id == Some(m.target) {
        return Ok(());
    }
    sc.step(
        p.job_id,
        "undo",
        90,
        "removing what the destination prepared",
    )
    .await
    .map_err(|e| anyhow::anyhow!(e.message))?;
    if m.cold {
        return cold_prepare_undo(sc, &p, &m).await;
    }
    let request = AgentRequestKind::MigrateAbortIncoming { vm_id: p.vm_id };
    sc.await_request(
        HostRequest {
            job: p.job_id,
            id: Some(step_request_id(p.job_id, ABORT)),
            host: m.target,
            vm: Some(p.vm_id),
            kind: "migration abort",
            request: &request,
            timeout: SHORT_TIMEOUT,
            cleanup: true,
        },
        |_, _| (90, "removing what the destination prepared".into()),
    )
    .await
    .map_err(|e| anyhow::anyhow!("the destination could not clean up: {}", e.message))?;
    Ok(())
}

/// `sent 120 MiB of 256 MiB` as the job's progress, between 15 % and 95 %
/// (the host's own words, with rates and expected downtime, replace the
/// message when it sends them).
fn send_progress(done: u64, total: u64) -> (u8, String) {
    let pct = (80 * done.min(total))
        .checked_div(total)
        .map_or(15, |p| 15 + p as u8);
    (
        pct,
        format!(
            "migrating: {} of {}",
            ByteCount(done).approx(),
            ByteCount(total).approx()
        ),
    )
}

/// The source sends the VM; once the destination has it, the move is
/// recorded (see the module doc: nothing after this can fail the job back).
pub(crate) async fn send(ctx: Ctx) -> Result<serde_json::Value, ActionError> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    let m = migration(&p)?;
    let ready: serde_json::Value = ctx.lookup("prepare")?;
    if m.cold {
        return cold_move(sc, &p, &m, ready).await;
    }
    let target = host_name(sc, m.target).await;
    let request = AgentRequestKind::MigrateSend {
        vm_id: p.vm_id,
        request: serde_json::json!({
            "ready": ready,
            "max_bandwidth": m.bandwidth,
            "auto_converge": m.auto_converge,
            "postcopy_after_passes": m.postcopy_after_passes,
            "downtime_limit_ms": null,
            // Both hosts cache the VM's image by its id and SHA-256: the
            // same content, wherever each keeps it.
            "same_base": true,
        }),
    };
    sc.step(p.job_id, "send", 15, &format!("sending the VM to {target}"))
        .await?;
    // The destination is asked to take the VM over at once, beside the
    // send: it waits on its own until the state is in and the guest runs
    // (or its incoming QEMU ends: the undo's abort, a failed load). So its
    // round trip is not added after QEMU's completion, where it was part
    // of the control plane's overhead. It is a clean-up kind of request
    // (not withdrawn on cancel): once the guest is over there, the
    // destination must be seen through.
    let finish = AgentRequestKind::MigrateFinish { vm_id: p.vm_id };
    let sending = sc.await_request(
        HostRequest {
            job: p.job_id,
            id: Some(step_request_id(p.job_id, SEND)),
            host: m.source,
            vm: Some(p.vm_id),
            kind: "migration",
            request: &request,
            timeout: sc.timing.backup,
            cleanup: false,
        },
        send_progress,
    );
    let finishing = sc.await_request(
        HostRequest {
            job: p.job_id,
            id: Some(step_request_id(p.job_id, FINISH)),
            host: m.target,
            vm: Some(p.vm_id),
            kind: "migration finish",
            request: &finish,
            timeout: sc.timing.backup,
            cleanup: true,
        },
        |_, _| (96, "the destination is taking the VM over".into()),
    );
    tokio::pin!(sending, finishing);
    let mut finished = None;
    let sent = loop {
        tokio::select! {
            sent = &mut sending => break sent,
            done = &mut finishing, if finished.is_none() => finished = Some(done),
        }
    };
    let answer = match sent {
        Ok(a) => a,
        Err(e) => {
            if e.is_cancel() {
                // The request was withdrawn; the source's QEMU may still be
                // sending: stop it, so the VM stays where it is.
                cancel_on_source(sc, &p, &m).await;
            }
            return Err(e.into());
        }
    };
    let outcome = answer.migration.unwrap_or_default();
    // The destination has the VM: its driver records it running there
    // (usually done by now), then the store records it.
    let finished = match finished {
        Some(done) => done,
        None => finishing.await,
    };
    if let Err(e) = finished {
        tracing::warn!(job = %p.job_id, vm = %p.vm_id, error = %e.message, "the destination did not confirm the migrated VM; it runs there all the same");
    }
    commit(sc, &p, &m).await;
    sc.step(
        p.job_id,
        "send",
        98,
        &format!(
            "moved to {target} in {} ms (downtime {} ms, QEMU's migration {} ms; {} of memory, \
             {} of disk sent{}{})",
            outcome["total_ms"].as_u64().unwrap_or(0),
            outcome["downtime_ms"].as_u64().unwrap_or(0),
            outcome["qemu_ms"].as_u64().unwrap_or(0),
            ByteCount(outcome["memory_bytes"].as_u64().unwrap_or(0)).approx(),
            ByteCount(outcome["disk_bytes"].as_u64().unwrap_or(0)).approx(),
            // How it moved, for the operator who asked for post-copy or
            // configured TLS: the log shows whether either applied.
            if outcome["postcopy"] == true {
                // `passes` counts every pass, the one at the switch too.
                format!(
                    "; switched to post-copy, {} pass(es) over memory",
                    outcome["passes"].as_u64().unwrap_or(0)
                )
            } else {
                String::new()
            },
            if outcome["tls"] == true {
                "; encrypted (TLS)"
            } else {
                ""
            },
        ),
    )
    .await?;
    Ok(outcome)
}

/// Asks the source to stop sending; a failure is logged (the undo of
/// `prepare` ends the destination, which fails the send anyway).
async fn cancel_on_source(sc: &SagaContext, p: &VmSagaParams, m: &MigrationParams) {
    let request = AgentRequestKind::MigrateCancel { vm_id: p.vm_id };
    if let Err(e) = sc
        .await_request(
            HostRequest {
                job: p.job_id,
                id: Some(step_request_id(p.job_id, CANCEL)),
                host: m.source,
                vm: Some(p.vm_id),
                kind: "migration cancel",
                request: &request,
                timeout: SHORT_TIMEOUT,
                cleanup: true,
            },
            |_, _| (90, "stopping the migration".into()),
        )
        .await
    {
        tracing::warn!(job = %p.job_id, error = %e.message, "the source could not cancel the migration");
    }
}

/// The VM runs on its new host.
pub(crate) async fn settled(ctx: Ctx) -> Result<Settled, ActionError> {
    let p = params(&ctx)?;
    let m = migration(&p)?;
    Ok(Settled {
        state: if m.cold {
            VmState::Stopped
        } else {
            VmState::Running
        },
        host_id: Some(m.target),
        removed: false,
    })
}

/// Records the arrival, retrying the store until it can: the VM is on the
/// destination and nothing may take that back.
async fn commit(sc: &SagaContext, p: &VmSagaParams, m: &MigrationParams) {
    loop {
        match sc.ds.vm_move_commit(p.vm_id, p.job_id).await {
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(job = %p.job_id, error = %e, "cannot record the VM's arrival yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    sc.signals.host_desired_changed(m.source);
    sc.signals.host_desired_changed(m.target);
}

/// One request of a cold move, waited for.
async fn cold_request(
    sc: &SagaContext,
    p: &VmSagaParams,
    host: HostId,
    step: u8,
    kind: &'static str,
    request: AgentRequestKind,
    cleanup: bool,
) -> Result<stratus_api_types::agent::AgentRequestResult, StepError> {
    sc.await_request(
        HostRequest {
            job: p.job_id,
            id: Some(step_request_id(p.job_id, step)),
            host,
            vm: Some(p.vm_id),
            kind,
            request: &request,
            timeout: sc.timing.backup,
            cleanup,
        },
        |done, total| {
            let pct = (80 * done.min(total))
                .checked_div(total)
                .map_or(15, |p| 15 + p as u8);
            (
                pct,
                format!(
                    "copying the disk: {} of {}",
                    ByteCount(done).approx(),
                    ByteCount(total).approx()
                ),
            )
        },
    )
    .await
}

/// Cold: the source serves the stopped VM's disk (nothing to serve when it
/// stays in one shared pool).
async fn cold_prepare(
    sc: &SagaContext,
    p: &VmSagaParams,
    m: &MigrationParams,
) -> Result<serde_json::Value, ActionError> {
    if same_pool(m) {
        sc.step(
            p.job_id,
            "prepare",
            10,
            "the disk stays in its shared pool: nothing to copy",
        )
        .await?;
        return Ok(serde_json::json!({"kind": "pool"}));
    }
    let source = host_name(sc, m.source).await;
    sc.step(
        p.job_id,
        "prepare",
        10,
        &format!("host {source} is serving the VM's disk"),
    )
    .await?;
    let answer = cold_request(
        sc,
        p,
        m.source,
        PREPARE,
        "disk export",
        AgentRequestKind::MigrateExport {
            vm_id: p.vm_id,
            request: serde_json::json!({
                "request_id": step_request_id(p.job_id, PREPARE),
                // Both hosts cache the image by id and SHA-256.
                "same_base": true,
            }),
        },
        false,
    )
    .await?;
    answer.migration.ok_or_else(|| {
        StepError::new(
            "internal",
            "the source answered without saying where its disk is served",
        )
        .into()
    })
}

/// Cold: the destination forgets what it built (keeping disks that are the
/// source's, in a shared pool), the source stops serving.
async fn cold_prepare_undo(
    sc: &SagaContext,
    p: &VmSagaParams,
    m: &MigrationParams,
) -> Result<(), anyhow::Error> {
    cold_request(
        sc,
        p,
        m.target,
        ABORT,
        "migration abort",
        AgentRequestKind::MigrateRelease {
            vm_id: p.vm_id,
            keep_disks: same_pool(m),
        },
        true,
    )
    .await
    .map_err(|e| anyhow::anyhow!("the destination could not clean up: {}", e.message))?;
    if !same_pool(m) {
        cold_request(
            sc,
            p,
            m.source,
            EXPORT_STOP,
            "disk export stop",
            AgentRequestKind::MigrateExportStop { vm_id: p.vm_id },
            true,
        )
        .await
        .map_err(|e| anyhow::anyhow!("the source could not stop serving: {}", e.message))?;
    }
    Ok(())
}

/// Cold: the destination copies the disk (or takes over the one in the
/// shared pool); the move is recorded; then the source lets go of its copy.
/// Recording before the source lets go means a VM is never without a whole
/// disk somewhere the store points at; a source that cannot let go leaves
/// an orphan its agent removes (keeping disks in a shared pool).
async fn cold_move(
    sc: &SagaContext,
    p: &VmSagaParams,
    m: &MigrationParams,
    export: serde_json::Value,
) -> Result<serde_json::Value, ActionError> {
    let target = host_name(sc, m.target).await;
    let shared = same_pool(m);
    let request = if shared {
        AgentRequestKind::MigrateAdopt { vm_id: p.vm_id }
    } else {
        AgentRequestKind::MigrateImport {
            vm_id: p.vm_id,
            export,
        }
    };
    sc.step(
        p.job_id,
        "send",
        15,
        &format!("host {target} is taking the VM's disk"),
    )
    .await?;
    let answer = cold_request(sc, p, m.target, SEND, "disk copy", request, false).await?;
    let outcome = answer.migration.unwrap_or_default();
    commit(sc, p, m).await;
    if !shared {
        let _ = cold_request(
            sc,
            p,
            m.source,
            EXPORT_STOP,
            "disk export stop",
            AgentRequestKind::MigrateExportStop { vm_id: p.vm_id },
            true,
        )
        .await;
    }
    if let Err(e) = cold_request(
        sc,
        p,
        m.source,
        RELEASE,
        "release",
        AgentRequestKind::MigrateRelease {
            vm_id: p.vm_id,
            keep_disks: shared,
        },
        true,
    )
    .await
    {
        tracing::warn!(job = %p.job_id, error = %e.message, "the source could not let go of the moved VM; its agent will as an orphan");
    }
    sc.step(
        p.job_id,
        "send",
        98,
        &if shared {
            format!("moved to {target} (cold, its disk left in the shared pool)")
        } else {
            format!(
                "moved to {target} (cold: {} of the VM's disk copied in {} ms)",
                ByteCount(outcome["bytes_copied"].as_u64().unwrap_or(0)).approx(),
                outcome["duration_ms"].as_u64().unwrap_or(0)
            )
        },
    )
    .await?;
    Ok(outcome)
}
