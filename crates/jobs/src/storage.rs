//! The steps of the storage sagas: `vm_backup` (the host copies the disk,
//! then the backup is recorded as a restore point) and `vm_restore` (the
//! host replaces a stopped VM's disk with a backup). Their graphs are in
//! [`crate::sagas`].
//!
//! **Invariant**: a backup becomes a restore point only in
//! [`backup_record`], after the host answered with the file's checksum;
//! every other way out of the saga marks it failed.

use steno::ActionError;
use stratus_api_types::agent::{
    AgentRequestKind, BackupDone, BackupParentRef, ObservedVmState, SnapshotTaken, VolumeFileRef,
    VolumeOnHost,
};
use stratus_api_types::views::{VmState, VolumeStatus};
use stratus_common::{ByteCount, JobId, SnapshotId, VmId, VolumeId};
use stratus_datastore::BackupRecord;

use crate::context::{retry_store, SagaContext, StepError};
use crate::requests::HostRequest;
use crate::sagas::{params, placed_host, shown, Ctx, Settled};

/// The backup a job takes.
async fn backup_of(sc: &SagaContext, job: JobId) -> Result<BackupRecord, StepError> {
    retry_store(|| sc.ds.backup_of_job(job))
        .await
        .map_err(|e| StepError::internal("reading the backup", e))?
        .ok_or_else(|| StepError::new("internal", "the job's backup record is missing"))
}

/// `copied 12 MiB of 1 GiB` as the job's progress, between 10 % and 95 %.
fn copy_progress(done: u64, total: u64) -> (u8, String) {
    let pct = (85 * done.min(total))
        .checked_div(total)
        .map_or(10, |p| 10 + p as u8);
    (
        pct,
        format!(
            "copying the disk: {} of {} ({done} of {total} bytes)",
            ByteCount(done),
            ByteCount(total)
        ),
    )
}

/// Hands the host the backup and waits for its outcome (with the file's
/// size and checksum).
pub(crate) async fn backup_copy(ctx: Ctx) -> Result<BackupDone, ActionError> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    let host = placed_host(sc, &p).await?;
    let backup = backup_of(sc, p.job_id).await?;
    let vm = retry_store(|| sc.ds.vm_get(p.vm_id))
        .await
        .map_err(|e| StepError::internal("reading the VM", e))?;
    if vm.observed_state != Some(ObservedVmState::Running) {
        return Err(StepError::new(
            "vm_not_running",
            format!(
                "VM {:?} is not running, so its disk cannot be backed up live",
                vm.name
            ),
        )
        .into());
    }
    // Each volume's file in the parent restore point: a volume attached
    // now is incremental to it (the host backs up every attached volume).
    let (parent, volume_parents) = match backup.parent_id {
        Some(id) => {
            let parent = retry_store(|| sc.ds.backup_get(id))
                .await
                .map_err(|e| StepError::internal("reading the parent backup", e))?;
            let volumes = parent
                .volumes
                .iter()
                .map(|v| VolumeFileRef {
                    volume_id: v.volume_id.as_uuid(),
                    file: v.file.clone(),
                })
                .collect();
            (
                Some(BackupParentRef {
                    backup_id: id.as_uuid(),
                    file: parent.file,
                }),
                volumes,
            )
        }
        None => (None, Vec::new()),
    };
    sc.step(
        p.job_id,
        "copy",
        10,
        "the host is copying the disk into the backup target",
    )
    .await?;
    let request = AgentRequestKind::Backup {
        vm_id: p.vm_id,
        backup_id: backup.id.as_uuid(),
        file: backup.file.clone(),
        parent,
        volume_parents,
    };
    let answer = sc
        .await_request(
            HostRequest {
                job: p.job_id,
                id: None,
                host,
                vm: Some(p.vm_id),
                kind: "backup",
                request: &request,
                timeout: sc.timing.backup,
                cleanup: false,
            },
            copy_progress,
        )
        .await?;
    let done = answer.backup.ok_or_else(|| {
        StepError::new(
            "internal",
            "the host answered the backup without its outcome",
        )
    })?;
    Ok(done)
}

/// Makes the backup a restore point, with what the host measured.
pub(crate) async fn backup_record(ctx: Ctx) -> Result<Settled, ActionError> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    let done: BackupDone = ctx.lookup("copy")?;
    let backup = backup_of(sc, p.job_id).await?;
    let vm = retry_store(|| sc.ds.vm_get(p.vm_id))
        .await
        .map_err(|e| StepError::internal("reading the VM", e))?;
    let host = vm
        .host_id
        .ok_or_else(|| StepError::new("vm_not_placed", "the VM left its host"))?;
    let recorded = retry_store(|| sc.ds.backup_succeed(backup.id, host, &done))
        .await
        .map_err(|e| StepError::internal("recording the backup", e))?;
    // Recorded by an earlier run of this step: the same outcome.
    let already = !recorded
        && retry_store(|| sc.ds.backup_get(backup.id))
            .await
            .is_ok_and(|b| b.status == stratus_api_types::views::BackupStatus::Succeeded);
    if !recorded && !already {
        return Err(StepError::new(
            "backup_not_running",
            "the backup was marked failed before its outcome arrived",
        )
        .into());
    }
    let data: u64 = done.data_bytes + done.volumes.iter().map(|v| v.data_bytes).sum::<u64>();
    let file: u64 = done.file_bytes + done.volumes.iter().map(|v| v.file_bytes).sum::<u64>();
    let volumes = match done.volumes.len() {
        0 => String::new(),
        n => format!(" (the disk and {n} volume(s))"),
    };
    let full_volumes: Vec<String> = done
        .volumes
        .iter()
        .filter_map(|v| {
            v.fallback_reason
                .as_ref()
                .map(|why| format!("volume {} copied in full: {why}", v.volume_id))
        })
        .collect();
    let message = match (&done.mode, &done.fallback_reason) {
        (_, Some(why)) => format!(
            "full backup of {}{volumes} taken instead of an incremental one: {why}",
            ByteCount(data)
        ),
        (mode, None) => {
            let mut m = format!(
                "{} backup recorded{volumes}: {} of data, {} of files",
                serde_json::to_value(mode)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                ByteCount(data),
                ByteCount(file)
            );
            if !full_volumes.is_empty() {
                m = format!("{m}; {}", full_volumes.join("; "));
            }
            m
        }
    };
    sc.step(p.job_id, "recorded", 100, &message).await?;
    Ok(Settled {
        state: vm.observed_state.map(shown).unwrap_or(vm.state),
        host_id: Some(host),
        removed: false,
    })
}

/// Marks the job's backup failed (unless it succeeded) and withdraws its
/// request: the clean-up of a backup saga that did not complete. Run by the
/// undo and again, with the job's reason, when the saga has ended.
pub(crate) async fn backup_discard(
    sc: &SagaContext,
    job: JobId,
    reason: &str,
) -> Result<(), anyhow::Error> {
    let backup = backup_of(sc, job)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    retry_store(|| sc.ds.backup_fail(backup.id, reason))
        .await
        .map_err(|e| anyhow::anyhow!("marking the backup failed: {e}"))?;
    retry_store(|| sc.ds.host_request_withdraw(job.as_uuid()))
        .await
        .map_err(|e| anyhow::anyhow!("withdrawing the backup request: {e}"))?;
    Ok(())
}

/// Hands the host the restore of the stopped VM's disk and waits for it.
pub(crate) async fn restore_disk(ctx: Ctx) -> Result<(), ActionError> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    let host = placed_host(sc, &p).await?;
    let Some(restore) = p.previous.restore.clone() else {
        return Err(StepError::new("internal", "the restore job names no backup").into());
    };
    let vm = retry_store(|| sc.ds.vm_get(p.vm_id))
        .await
        .map_err(|e| StepError::internal("reading the VM", e))?;
    if vm.observed_state == Some(ObservedVmState::Running) {
        return Err(StepError::new(
            "vm_running",
            format!(
                "VM {:?} is running; stop it before restoring over it",
                vm.name
            ),
        )
        .into());
    }
    sc.step(
        p.job_id,
        "restore",
        20,
        &format!(
            "the host is replacing the disk with backup {}",
            restore.backup_id
        ),
    )
    .await?;
    // The volumes of the restore point, each still attached (checked by
    // the API, and by the host, which refuses one that is not).
    let backup = retry_store(|| sc.ds.backup_get(restore.backup_id))
        .await
        .map_err(|e| StepError::internal("reading the backup", e))?;
    let request = AgentRequestKind::Restore {
        vm_id: p.vm_id,
        file: restore.file.clone(),
        volumes: backup
            .volumes
            .iter()
            .map(|v| VolumeFileRef {
                volume_id: v.volume_id.as_uuid(),
                file: v.file.clone(),
            })
            .collect(),
    };
    sc.await_request(
        HostRequest {
            job: p.job_id,
            id: None,
            host,
            vm: Some(p.vm_id),
            kind: "restore",
            request: &request,
            timeout: sc.timing.backup,
            cleanup: false,
        },
        |done, total| (20, format!("restoring: {done} of {total} bytes")),
    )
    .await?;
    // The disk now has no base image: a migration must copy it whole.
    retry_store(|| sc.ds.vm_set_restored_from(p.vm_id, &restore.file))
        .await
        .map_err(|e| StepError::internal("recording the restore", e))?;
    Ok(())
}

pub(crate) async fn restore_settled(ctx: Ctx) -> Result<Settled, ActionError> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    let vm = retry_store(|| sc.ds.vm_get(p.vm_id))
        .await
        .map_err(|e| StepError::internal("reading the VM", e))?;
    sc.step(p.job_id, "restored", 100, "the disk now holds the backup")
        .await?;
    Ok(Settled {
        state: VmState::Stopped,
        host_id: vm.host_id,
        removed: false,
    })
}

// ---- snapshots ------------------------------------------------------------

fn snapshot_of(p: &crate::sagas::VmSagaParams) -> Result<SnapshotId, StepError> {
    p.previous
        .snapshot
        .ok_or_else(|| StepError::new("internal", "the snapshot job names no snapshot"))
}

/// Hands the VM's host one request for this step (a snapshot or volume
/// change) and waits for the answer.
async fn vm_request(
    sc: &SagaContext,
    p: &crate::sagas::VmSagaParams,
    kind: &'static str,
    request: AgentRequestKind,
) -> Result<stratus_api_types::agent::AgentRequestResult, ActionError> {
    let host = placed_host(sc, p).await?;
    Ok(sc
        .await_request(
            HostRequest {
                job: p.job_id,
                id: None,
                host,
                vm: Some(p.vm_id),
                kind,
                request: &request,
                timeout: sc.timing.backup,
                cleanup: false,
            },
            |done, total| (30, format!("{kind}: {done} of {total} bytes")),
        )
        .await?)
}

/// The host takes the snapshot (freezing the guest's file systems for the
/// moment when its guest agent answers).
pub(crate) async fn snapshot_take(ctx: Ctx) -> Result<SnapshotTaken, ActionError> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    let id = snapshot_of(&p)?;
    let snap = retry_store(|| sc.ds.snapshot_get(id))
        .await
        .map_err(|e| StepError::internal("reading the snapshot", e))?;
    sc.step(p.job_id, "snapshot", 20, "the host is taking the snapshot")
        .await?;
    let answer = vm_request(
        sc,
        &p,
        "snapshot",
        AgentRequestKind::SnapshotCreate {
            vm_id: p.vm_id,
            snapshot_id: id.as_uuid(),
            name: snap.name,
        },
    )
    .await?;
    Ok(answer.snapshot.ok_or_else(|| {
        StepError::new(
            "internal",
            "the host answered the snapshot without its figures",
        )
    })?)
}

pub(crate) async fn snapshot_record(ctx: Ctx) -> Result<Settled, ActionError> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    let id = snapshot_of(&p)?;
    let taken: SnapshotTaken = ctx.lookup("snapshot")?;
    let volumes: Vec<VolumeId> = taken.volumes.iter().copied().map(VolumeId).collect();
    retry_store(|| {
        sc.ds
            .snapshot_ready(id, taken.quiesced, taken.bytes, &volumes)
    })
    .await
    .map_err(|e| StepError::internal("recording the snapshot", e))?;
    let message = if taken.quiesced {
        "snapshot taken with the guest's file systems frozen"
    } else {
        "snapshot taken (crash-consistent: the guest agent did not freeze the file systems)"
    };
    sc.step(p.job_id, "recorded", 100, message).await?;
    settled_as_is(sc, &p).await
}

/// Takes a snapshot back: the host deletes it if it took it (a snapshot it
/// never took is not an error), then the record goes.
pub(crate) async fn snapshot_discard(sc: &SagaContext, job: JobId) -> Result<(), anyhow::Error> {
    let Ok(j) = retry_store(|| sc.ds.job_get(job)).await else {
        return Ok(());
    };
    let vm = retry_store(|| sc.ds.vm_get(VmId(j.target_id))).await.ok();
    let params: crate::kinds::VmJobParams = match serde_json::from_value(j.params.clone()) {
        Ok(p) => p,
        Err(_) => return Ok(()),
    };
    let Some(id) = params.snapshot else {
        return Ok(());
    };
    let _ = retry_store(|| sc.ds.host_request_withdraw(job.as_uuid())).await;
    if let Some((vm_id, host)) = vm.and_then(|v| Some((v.id, v.host_id?))) {
        // The host deletes what it may have made (a snapshot it never took
        // is not an error).
        let request = AgentRequestKind::SnapshotDelete {
            vm_id,
            snapshot_id: id.as_uuid(),
        };
        best_effort_request(sc, host, vm_id, "snapshot_discard", &request).await;
    }
    retry_store(|| sc.ds.snapshot_forget(std::slice::from_ref(&id)))
        .await
        .map_err(|e| anyhow::anyhow!("forgetting the snapshot: {e}"))?;
    Ok(())
}

/// The host merges the snapshot's layer away (live when the VM runs), and
/// the record goes with it: a merge cannot be taken back, so from here on
/// the snapshot is deleted whatever happens to the rest of the saga.
pub(crate) async fn snapshot_merge(ctx: Ctx) -> Result<(), ActionError> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    let id = snapshot_of(&p)?;
    sc.step(
        p.job_id,
        "merge",
        20,
        "the host is merging the snapshot's layer into the next one",
    )
    .await?;
    vm_request(
        sc,
        &p,
        "merge",
        AgentRequestKind::SnapshotDelete {
            vm_id: p.vm_id,
            snapshot_id: id.as_uuid(),
        },
    )
    .await?;
    retry_store(|| sc.ds.snapshot_forget(std::slice::from_ref(&id)))
        .await
        .map_err(|e| StepError::internal("forgetting the snapshot", e))?;
    Ok(())
}

pub(crate) async fn snapshot_forget(ctx: Ctx) -> Result<Settled, ActionError> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    sc.step(
        p.job_id,
        "merged",
        100,
        "snapshot deleted; its layer merged",
    )
    .await?;
    settled_as_is(sc, &p).await
}

/// A delete that did not complete leaves the snapshot as it was.
pub(crate) async fn snapshot_delete_undo(ctx: Ctx) -> Result<(), anyhow::Error> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    sc.step(p.job_id, "undo", 60, "keeping the snapshot")
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let id = snapshot_of(&p).map_err(|e| anyhow::anyhow!(e.message))?;
    retry_store(|| sc.ds.snapshot_undelete(id))
        .await
        .map_err(|e| anyhow::anyhow!("restoring the snapshot record: {e}"))
}

/// The host makes the stopped VM's disk what it was at the snapshot.
pub(crate) async fn snapshot_revert(ctx: Ctx) -> Result<Vec<uuid::Uuid>, ActionError> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    let id = snapshot_of(&p)?;
    let vm = retry_store(|| sc.ds.vm_get(p.vm_id))
        .await
        .map_err(|e| StepError::internal("reading the VM", e))?;
    if vm.observed_state == Some(ObservedVmState::Running) {
        return Err(StepError::new(
            "vm_running",
            format!("VM {:?} is running; stop it before reverting", vm.name),
        )
        .into());
    }
    sc.step(p.job_id, "revert", 20, "the host is reverting the disk")
        .await?;
    let answer = vm_request(
        sc,
        &p,
        "revert",
        AgentRequestKind::SnapshotRevert {
            vm_id: p.vm_id,
            snapshot_id: id.as_uuid(),
        },
    )
    .await?;
    Ok(answer.dropped_snapshots.unwrap_or_default())
}

pub(crate) async fn snapshot_reverted(ctx: Ctx) -> Result<Settled, ActionError> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    let dropped: Vec<uuid::Uuid> = ctx.lookup("revert")?;
    let ids: Vec<SnapshotId> = dropped.into_iter().map(SnapshotId).collect();
    retry_store(|| sc.ds.snapshot_forget(&ids))
        .await
        .map_err(|e| StepError::internal("forgetting dropped snapshots", e))?;
    let message = if ids.is_empty() {
        "the disk is as it was at the snapshot".to_string()
    } else {
        format!(
            "the disk is as it was at the snapshot; {} later snapshot(s) dropped",
            ids.len()
        )
    };
    sc.step(p.job_id, "reverted", 100, &message).await?;
    let vm = retry_store(|| sc.ds.vm_get(p.vm_id))
        .await
        .map_err(|e| StepError::internal("reading the VM", e))?;
    Ok(Settled {
        state: VmState::Stopped,
        host_id: vm.host_id,
        removed: false,
    })
}

/// The VM as its host last showed it.
async fn settled_as_is(
    sc: &SagaContext,
    p: &crate::sagas::VmSagaParams,
) -> Result<Settled, ActionError> {
    let vm = retry_store(|| sc.ds.vm_get(p.vm_id))
        .await
        .map_err(|e| StepError::internal("reading the VM", e))?;
    Ok(Settled {
        state: vm.observed_state.map(shown).unwrap_or(vm.state),
        host_id: vm.host_id,
        removed: false,
    })
}

// ---- volumes --------------------------------------------------------------

fn volume_of(p: &crate::sagas::VmSagaParams) -> Result<VolumeId, StepError> {
    volume_in(&p.previous)
}

fn volume_in(params: &crate::kinds::VmJobParams) -> Result<VolumeId, StepError> {
    params
        .volume
        .ok_or_else(|| StepError::new("internal", "the volume job names no volume"))
}

/// Sends a request of its own (not the step's) and waits up to a minute for
/// it: the clean-up an undo owes, done when the host is there to do it.
pub(crate) async fn best_effort_request(
    sc: &SagaContext,
    host: stratus_common::HostId,
    vm: VmId,
    kind: &str,
    request: &AgentRequestKind,
) {
    let Ok(payload) = serde_json::to_value(request) else {
        return;
    };
    let rid = uuid::Uuid::new_v4();
    let expires = stratus_common::time::now_micros() + 60_000_000;
    if retry_store(|| {
        sc.ds
            .host_request_ensure(rid, host, Some(vm), kind, &payload, expires)
    })
    .await
    .is_err()
    {
        return;
    }
    sc.signals.host_desired_changed(host);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        match sc.ds.host_request_get(rid).await {
            Ok(r) if r.answered_at.is_some() => {
                if let Some(e) = r.error {
                    tracing::warn!(vm = %vm, kind, error = %e, "the host could not clean up");
                }
                return;
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
        }
    }
    tracing::warn!(vm = %vm, kind, "the host did not clean up within 60 s");
}

/// The image a volume starts from, as a host needs it to cache it.
async fn desired_image(
    sc: &SagaContext,
    image: stratus_common::ImageId,
) -> Result<stratus_api_types::agent::DesiredImage, StepError> {
    let img = retry_store(|| sc.ds.image_get(image))
        .await
        .map_err(|e| StepError::internal("reading the volume's image", e))?;
    let (Some(format), Some(sha256), Some(file_size)) = (img.format, img.sha256, img.file_size)
    else {
        return Err(StepError::new(
            "image_not_ready",
            "the volume's image has no data",
        ));
    };
    Ok(stratus_api_types::agent::DesiredImage {
        id: img.id,
        format,
        sha256,
        file_size,
        kernel_sha256: img.kernel_sha256,
        initrd_sha256: img.initrd_sha256,
        cmdline: img.cmdline,
    })
}

/// The host makes the volume's file if it has none, and attaches it
/// (hot-plugged when the VM runs).
pub(crate) async fn volume_attach(ctx: Ctx) -> Result<VolumeOnHost, ActionError> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    let id = volume_of(&p)?;
    let vol = retry_store(|| sc.ds.volume_get(id))
        .await
        .map_err(|e| StepError::internal("reading the volume", e))?;
    let image = match vol.image_id {
        Some(i) => Some(desired_image(sc, i).await?),
        None => None,
    };
    // A pool volume's file is in the pool, wherever the VM runs.
    let pool = match vol.pool_id {
        Some(pool) => {
            let rec = retry_store(|| sc.ds.pool_get(pool))
                .await
                .map_err(|e| StepError::internal("reading the volume's storage pool", e))?;
            Some(stratus_api_types::agent::PoolAssignment {
                id: rec.id,
                name: rec.name,
                path: rec.path,
            })
        }
        None => None,
    };
    sc.step(p.job_id, "attach", 20, "the host is attaching the volume")
        .await?;
    let answer = vm_request(
        sc,
        &p,
        "attach",
        AgentRequestKind::VolumeAttach {
            vm_id: p.vm_id,
            volume_id: id.as_uuid(),
            size_bytes: vol.size_bytes,
            image,
            pool,
        },
    )
    .await?;
    Ok(answer.volume.ok_or_else(|| {
        StepError::new(
            "internal",
            "the host answered the attach without the volume",
        )
    })?)
}

pub(crate) async fn volume_attached(ctx: Ctx) -> Result<Settled, ActionError> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    let id = volume_of(&p)?;
    let host = placed_host(sc, &p).await?;
    retry_store(|| {
        sc.ds
            .volume_settle(id, VolumeStatus::Attached, Some(p.vm_id), Some(host))
    })
    .await
    .map_err(|e| StepError::internal("recording the volume", e))?;
    sc.step(p.job_id, "attached", 100, "the volume is attached")
        .await?;
    settled_as_is(sc, &p).await
}

/// Takes an attach back: the host detaches the volume if it attached it,
/// then the volume is available again.
pub(crate) async fn volume_attach_undo(ctx: Ctx) -> Result<(), anyhow::Error> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    sc.step(p.job_id, "undo", 60, "detaching the volume again")
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    volume_attach_discard(sc, p.job_id, p.vm_id, &p.previous).await
}

/// The clean-up of an attach that did not complete, shared by its undo and
/// by a saga whose first step failed.
pub(crate) async fn volume_attach_discard(
    sc: &SagaContext,
    job: JobId,
    vm: VmId,
    params: &crate::kinds::VmJobParams,
) -> Result<(), anyhow::Error> {
    let id = volume_in(params).map_err(|e| anyhow::anyhow!(e.message))?;
    let _ = retry_store(|| sc.ds.host_request_withdraw(job.as_uuid())).await;
    if let Some(host) = retry_store(|| sc.ds.vm_get(vm))
        .await
        .ok()
        .and_then(|v| v.host_id)
    {
        let request = AgentRequestKind::VolumeDetach {
            vm_id: vm,
            volume_id: id.as_uuid(),
        };
        best_effort_request(sc, host, vm, "volume_detach", &request).await;
    }
    retry_store(|| sc.ds.volume_settle(id, VolumeStatus::Available, None, None))
        .await
        .map_err(|e| anyhow::anyhow!("recording the volume: {e}"))
}

/// The host detaches the volume; from then on it is available (a detach is
/// not taken back: the volume can simply be attached again).
pub(crate) async fn volume_detach(ctx: Ctx) -> Result<(), ActionError> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    let id = volume_of(&p)?;
    sc.step(p.job_id, "detach", 20, "the host is detaching the volume")
        .await?;
    vm_request(
        sc,
        &p,
        "detach",
        AgentRequestKind::VolumeDetach {
            vm_id: p.vm_id,
            volume_id: id.as_uuid(),
        },
    )
    .await?;
    retry_store(|| sc.ds.volume_settle(id, VolumeStatus::Available, None, None))
        .await
        .map_err(|e| StepError::internal("recording the volume", e))?;
    Ok(())
}

pub(crate) async fn volume_detached(ctx: Ctx) -> Result<Settled, ActionError> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    sc.step(p.job_id, "detached", 100, "the volume is detached")
        .await?;
    settled_as_is(sc, &p).await
}

/// A detach that did not happen leaves the volume attached.
pub(crate) async fn volume_detach_undo(ctx: Ctx) -> Result<(), anyhow::Error> {
    let p = params(&ctx)?;
    let sc = ctx.user_data();
    sc.step(p.job_id, "undo", 60, "keeping the volume attached")
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    volume_detach_discard(sc, p.vm_id, &p.previous).await
}

/// The clean-up of a detach that did not reach the host: still attached.
pub(crate) async fn volume_detach_discard(
    sc: &SagaContext,
    vm: VmId,
    params: &crate::kinds::VmJobParams,
) -> Result<(), anyhow::Error> {
    let id = volume_in(params).map_err(|e| anyhow::anyhow!(e.message))?;
    let vol = retry_store(|| sc.ds.volume_get(id))
        .await
        .map_err(|e| anyhow::anyhow!("reading the volume: {e}"))?;
    if vol.status == VolumeStatus::Detaching {
        retry_store(|| {
            sc.ds
                .volume_settle(id, VolumeStatus::Attached, Some(vm), None)
        })
        .await
        .map_err(|e| anyhow::anyhow!("recording the volume: {e}"))?;
    }
    Ok(())
}
