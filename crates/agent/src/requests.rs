//! Requests the controller hands the agent with its desired state: run a
//! command in a guest, back up a VM's disk (posting progress as it goes),
//! restore a stopped VM's disk from a backup, read a backup back. Each is
//! carried out once, in its own task, and
//! its outcome posted back; the controller keeps delivering a request until
//! it is answered, so the agent remembers the ids it has handled (and for a
//! while after answering, in case a desired state fetched before the answer
//! arrives late).

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use stratus_client::types::{
    AgentRequest, AgentRequestKind, AgentRequestResult, BackupChecked, BackupDone, BackupParentRef,
    ExecResult, RequestProgress,
};
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
        AgentRequestKind::Backup {
            vm_id,
            backup_id,
            file,
            parent,
            volume_parents,
        } => {
            backup(
                &shared,
                r.id,
                VmId(vm_id.0),
                *backup_id,
                file,
                parent.as_ref(),
                volume_parents,
            )
            .await
        }
        AgentRequestKind::Restore {
            vm_id,
            file,
            volumes,
        } => restore(&shared, VmId(vm_id.0), file, volumes).await,
        AgentRequestKind::VolumeRestore {
            volume_id,
            size_bytes,
            file,
        } => {
            match shared
                .driver
                .volume_restore(*volume_id, *size_bytes, std::path::Path::new(file))
                .await
            {
                Ok(info) => AgentRequestResult {
                    volume: Some(stratus_client::types::VolumeOnHost {
                        size_bytes: info.size_bytes,
                        allocated_bytes: info.allocated_bytes,
                    }),
                    ..answered()
                },
                Err(e) => failed(chain(&e)),
            }
        }
        AgentRequestKind::MigrateDescribe { vm_id } => {
            crate::migrate::outgoing(&shared, VmId(vm_id.0)).await
        }
        AgentRequestKind::MigratePrepare { vm_id, incoming } => {
            crate::migrate::prepare(&shared, VmId(vm_id.0), incoming).await
        }
        AgentRequestKind::MigrateSend { vm_id, request } => {
            crate::migrate::send(&shared, r.id, VmId(vm_id.0), request).await
        }
        AgentRequestKind::MigrateFinish { vm_id } => {
            crate::migrate::finish(&shared, VmId(vm_id.0)).await
        }
        AgentRequestKind::MigrateCancel { vm_id } => {
            match shared.driver.vm_migrate_cancel(VmId(vm_id.0)).await {
                Ok(()) => answered(),
                Err(e) => failed(chain(&e)),
            }
        }
        AgentRequestKind::MigrateExport { vm_id, request } => {
            crate::migrate::export(&shared, VmId(vm_id.0), request).await
        }
        AgentRequestKind::MigrateExportStop { vm_id } => {
            match shared.driver.vm_disk_export_stop(VmId(vm_id.0)).await {
                Ok(()) => answered(),
                Err(e) => failed(chain(&e)),
            }
        }
        AgentRequestKind::MigrateImport { vm_id, export } => {
            crate::migrate::import(&shared, r.id, VmId(vm_id.0), export).await
        }
        AgentRequestKind::MigrateAdopt { vm_id } => {
            crate::migrate::adopt(&shared, VmId(vm_id.0)).await
        }
        AgentRequestKind::MigrateRelease { vm_id, keep_disks } => {
            match crate::migrate::forget(&shared, VmId(vm_id.0), *keep_disks).await {
                Ok(()) => answered(),
                Err(e) => failed(chain(&e)),
            }
        }
        AgentRequestKind::MigrateAbortIncoming { vm_id } => {
            match shared.driver.vm_migrate_abort_incoming(VmId(vm_id.0)).await {
                Ok(()) => answered(),
                Err(e) => failed(chain(&e)),
            }
        }
        AgentRequestKind::VerifyBackup { file, volume_files } => {
            verify(&shared, file, volume_files).await
        }
        AgentRequestKind::DeleteBackup {
            file,
            child,
            volumes,
        } => delete_backup(&shared, file, child.as_ref(), volumes).await,
        AgentRequestKind::VolumeAttach {
            vm_id,
            volume_id,
            size_bytes,
            image,
            pool,
        } => {
            volume_attach(
                &shared,
                VmId(vm_id.0),
                *volume_id,
                *size_bytes,
                image.as_ref(),
                pool.as_ref(),
            )
            .await
        }
        AgentRequestKind::VolumeDetach { vm_id, volume_id } => {
            match shared
                .driver
                .vm_volume_detach(VmId(vm_id.0), *volume_id)
                .await
            {
                Ok(()) => answered(),
                Err(e) => failed(chain(&e)),
            }
        }
        AgentRequestKind::VolumeResize {
            volume_id,
            size_bytes,
            pool,
        } => volume_resize(&shared, *volume_id, *size_bytes, pool.as_ref()).await,
        AgentRequestKind::VolumeDelete { volume_id, pool } => {
            volume_delete(&shared, *volume_id, pool.as_ref()).await
        }
        AgentRequestKind::SnapshotCreate {
            vm_id,
            snapshot_id,
            name,
        } => {
            let req = stratus_driver::SnapshotRequest {
                snapshot_id: *snapshot_id,
                name: name.clone(),
            };
            match shared.driver.vm_snapshot_create(VmId(vm_id.0), &req).await {
                Ok(info) => AgentRequestResult {
                    snapshot: Some(stratus_client::types::SnapshotTaken {
                        quiesced: info.quiesced,
                        bytes: info.bytes,
                        volumes: info.volumes,
                    }),
                    ..answered()
                },
                Err(e) => failed(chain(&e)),
            }
        }
        AgentRequestKind::SnapshotRevert { vm_id, snapshot_id } => match shared
            .driver
            .vm_snapshot_revert(VmId(vm_id.0), *snapshot_id)
            .await
        {
            Ok(dropped) => AgentRequestResult {
                dropped_snapshots: Some(dropped),
                ..answered()
            },
            Err(e) => failed(chain(&e)),
        },
        AgentRequestKind::SnapshotDelete { vm_id, snapshot_id } => match shared
            .driver
            .vm_snapshot_delete(VmId(vm_id.0), *snapshot_id)
            .await
        {
            // Gone already (a repeated or undone request): the outcome asked for.
            Ok(()) | Err(stratus_driver::DriverError::SnapshotNotFound { .. }) => answered(),
            Err(e) => failed(chain(&e)),
        },
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

fn on_host(v: &stratus_driver::VolumeInfo) -> stratus_client::types::VolumeOnHost {
    stratus_client::types::VolumeOnHost {
        size_bytes: v.size_bytes,
        allocated_bytes: v.allocated_bytes,
    }
}

/// Grows a volume's file (in its pool, with `pool`).
async fn volume_resize(
    shared: &Arc<Shared>,
    volume_id: uuid::Uuid,
    size_bytes: u64,
    pool: Option<&stratus_client::types::PoolAssignment>,
) -> AgentRequestResult {
    if let Some(pool) = pool {
        if let Err(e) = crate::pools::use_volume_pool(shared, volume_id, pool).await {
            return failed(e);
        }
    }
    match shared.driver.volume_resize(volume_id, size_bytes).await {
        Ok(v) => AgentRequestResult {
            volume: Some(on_host(&v)),
            ..answered()
        },
        Err(e) => failed(chain(&e)),
    }
}

/// Deletes a volume's file (from its pool, with `pool`: any host that sees
/// the pool can, whether or not it ever had the volume attached).
async fn volume_delete(
    shared: &Arc<Shared>,
    volume_id: uuid::Uuid,
    pool: Option<&stratus_client::types::PoolAssignment>,
) -> AgentRequestResult {
    if let Some(pool) = pool {
        if let Err(e) = crate::pools::use_volume_pool(shared, volume_id, pool).await {
            return failed(e);
        }
    }
    match shared.driver.volume_delete(volume_id).await {
        Ok(()) => answered(),
        Err(e) => failed(chain(&e)),
    }
}

/// Makes the volume's file if it has none (caching its image first, as for
/// a VM) and attaches it to the VM. A pool volume's file is looked for (and
/// made) in its pool, so one made by another host is attached as it is.
async fn volume_attach(
    shared: &Arc<Shared>,
    vm: VmId,
    volume_id: uuid::Uuid,
    size_bytes: u64,
    image: Option<&stratus_client::types::DesiredImage>,
    pool: Option<&stratus_client::types::PoolAssignment>,
) -> AgentRequestResult {
    if let Some(pool) = pool {
        if let Err(e) = crate::pools::use_volume_pool(shared, volume_id, pool).await {
            return failed(e);
        }
    }
    // A volume that has its file already (attached before, perhaps grown
    // since) is attached as it is.
    let existing = match shared.driver.volume_info(volume_id).await {
        Ok(v) => v,
        Err(e) => return failed(chain(&e)),
    };
    let made = match existing {
        Some(v) => v,
        None => match make_volume(shared, volume_id, size_bytes, image, pool).await {
            Ok(v) => v,
            Err(e) => return failed(e),
        },
    };
    match shared.driver.vm_volume_attach(vm, volume_id).await {
        Ok(()) => AgentRequestResult {
            volume: Some(on_host(&made)),
            ..answered()
        },
        Err(e) => failed(chain(&e)),
    }
}

/// Makes a volume's file: blank, or a clone of its image (cached first; a
/// pool volume's in the pool's own cache, so every host that sees the pool
/// can open its backing file).
async fn make_volume(
    shared: &Arc<Shared>,
    volume_id: uuid::Uuid,
    size_bytes: u64,
    image: Option<&stratus_client::types::DesiredImage>,
    pool: Option<&stratus_client::types::PoolAssignment>,
) -> Result<stratus_driver::VolumeInfo, String> {
    let cache = match pool {
        Some(p) => shared.pool_images(std::path::Path::new(&p.path)),
        None => shared.images.clone(),
    };
    let (image, image_format) = match image {
        Some(img) => match cache.ensure(&shared.api, img).await {
            Ok(cached) => (
                Some(cached.disk),
                Some(match img.format {
                    stratus_client::types::ImageFormat::Qcow2 => stratus_driver::ImageFormat::Qcow2,
                    stratus_client::types::ImageFormat::Raw => stratus_driver::ImageFormat::Raw,
                }),
            ),
            Err(e) => return Err(format!("cannot fetch the volume's image: {}", chain(&e))),
        },
        None => (None, None),
    };
    let spec = stratus_driver::VolumeSpec {
        volume_id,
        size_bytes,
        image,
        image_format,
    };
    shared
        .driver
        .volume_create(&spec)
        .await
        .map_err(|e| chain(&e))
}

/// A successful answer with nothing in it (fields are filled in by the
/// caller).
pub(crate) fn answered() -> AgentRequestResult {
    AgentRequestResult {
        result: None,
        backup: None,
        verified: None,
        pruned: None,
        pruned_volumes: None,
        snapshot: None,
        dropped_snapshots: None,
        volume: None,
        migration: None,
        error: None,
    }
}

/// An answer that carries only an error.
pub(crate) fn failed(error: String) -> AgentRequestResult {
    AgentRequestResult {
        error: Some(error),
        ..answered()
    }
}

/// How often backup progress is posted at most.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Posts a long request's progress from a task of its own: the newest
/// report the driver gave, at most once per `every`, so a slow controller
/// never slows the work. Dropping it stops the task.
pub(crate) struct Poster<P> {
    tx: tokio::sync::watch::Sender<Option<P>>,
    task: tokio::task::JoinHandle<()>,
}

impl<P: Clone + Send + Sync + 'static> Poster<P> {
    pub fn start(
        shared: &Arc<Shared>,
        request: uuid::Uuid,
        every: Duration,
        body: impl Fn(&P) -> RequestProgress + Send + 'static,
    ) -> Self {
        let (tx, mut rx) = tokio::sync::watch::channel(None::<P>);
        let shared = shared.clone();
        let task = tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let Some(p) = rx.borrow_and_update().clone() else {
                    continue;
                };
                if let Err(e) = shared.api.request_progress(request, body(&p)).await {
                    tracing::debug!(request = %request, error = %chain(&e), "cannot post a request's progress");
                }
                tokio::time::sleep(every).await;
            }
        });
        Poster { tx, task }
    }

    /// What the driver calls with its progress: the newest replaces any
    /// report not posted yet.
    pub fn reporter(&self) -> impl Fn(P) + Send + Sync + 'static {
        let tx = self.tx.clone();
        move |p| {
            let _ = tx.send(Some(p));
        }
    }
}

impl<P> Drop for Poster<P> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn backup(
    shared: &Arc<Shared>,
    request: uuid::Uuid,
    vm: VmId,
    backup_id: uuid::Uuid,
    file: &str,
    parent: Option<&BackupParentRef>,
    volume_parents: &[stratus_client::types::VolumeFileRef],
) -> AgentRequestResult {
    let target = std::path::PathBuf::from(file);
    if let Some(dir) = target.parent() {
        if let Err(e) = std::fs::create_dir_all(dir) {
            return failed(format!(
                "cannot create the backup directory {}: {e}",
                dir.display()
            ));
        }
    }
    let req = stratus_driver::BackupRequest {
        backup_id,
        target,
        parent: parent.map(|p| stratus_driver::BackupParent {
            backup_id: p.backup_id,
            file: p.file.clone().into(),
        }),
        volume_parents: volume_parents
            .iter()
            .map(|v| stratus_driver::VolumeBackupParent {
                volume_id: v.volume_id,
                file: v.file.clone().into(),
            })
            .collect(),
    };
    let poster = Poster::start(
        shared,
        request,
        PROGRESS_EVERY,
        |p: &stratus_driver::BackupProgress| RequestProgress {
            done_bytes: p.done_bytes,
            total_bytes: p.total_bytes,
            message: None,
        },
    );
    let started = Instant::now();
    let progress = poster.reporter();
    let outcome = shared.driver.vm_backup(vm, &req, &progress).await;
    drop(poster);
    let mode_of = |m: stratus_driver::BackupMode| match m {
        stratus_driver::BackupMode::Full => stratus_client::types::BackupMode::Full,
        stratus_driver::BackupMode::Incremental => stratus_client::types::BackupMode::Incremental,
    };
    match outcome {
        Ok(o) => AgentRequestResult {
            backup: Some(BackupDone {
                mode: mode_of(o.mode),
                volumes: o
                    .volumes
                    .into_iter()
                    .map(|v| stratus_client::types::VolumeBackupDone {
                        volume_id: v.volume_id,
                        file: v.file.display().to_string(),
                        mode: mode_of(v.mode),
                        fallback_reason: v.fallback_reason,
                        data_bytes: v.data_bytes,
                        file_bytes: v.file_bytes,
                        disk_bytes: v.disk_bytes,
                        sha256: v.sha256,
                    })
                    .collect(),
                fallback_reason: o.fallback_reason,
                data_bytes: o.data_bytes,
                file_bytes: o.file_bytes,
                disk_bytes: o.disk_bytes,
                sha256: o.sha256,
                duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            }),
            ..answered()
        },
        Err(e) => failed(chain(&e)),
    }
}

async fn restore(
    shared: &Shared,
    vm: VmId,
    file: &str,
    volumes: &[stratus_client::types::VolumeFileRef],
) -> AgentRequestResult {
    let volumes: Vec<stratus_driver::VolumeRestore> = volumes
        .iter()
        .map(|v| stratus_driver::VolumeRestore {
            volume_id: v.volume_id,
            file: v.file.clone().into(),
        })
        .collect();
    match shared
        .driver
        .vm_restore(vm, std::path::Path::new(file), &volumes)
        .await
    {
        Ok(()) => answered(),
        Err(e) => failed(chain(&e)),
    }
}

/// Checks the disk's file and each volume file of a restore point.
async fn verify(shared: &Shared, file: &str, volume_files: &[String]) -> AgentRequestResult {
    let c = match shared
        .driver
        .backup_verify(std::path::Path::new(file))
        .await
    {
        Ok(c) => c,
        Err(e) => return failed(chain(&e)),
    };
    let mut volumes = Vec::with_capacity(volume_files.len());
    for f in volume_files {
        match shared.driver.backup_verify(std::path::Path::new(f)).await {
            Ok(v) => volumes.push(stratus_client::types::VolumeChecked {
                file: f.clone(),
                sha256: v.sha256,
                problems: v.problems,
            }),
            // A missing or unreadable file is a finding, not a failed check.
            Err(e) => volumes.push(stratus_client::types::VolumeChecked {
                file: f.clone(),
                sha256: String::new(),
                problems: vec![format!("{f}: {}", chain(&e))],
            }),
        }
    }
    AgentRequestResult {
        verified: Some(BackupChecked {
            sha256: c.sha256,
            problems: c.problems,
            volumes,
        }),
        ..answered()
    }
}

async fn delete_backup(
    shared: &Shared,
    file: &str,
    child: Option<&stratus_client::types::BackupChildRef>,
    volumes: &[stratus_client::types::VolumeBackupDelete],
) -> AgentRequestResult {
    // The volumes' files first: each merged into its child's or removed.
    // Every step is safe to run again, so a failure is retried whole.
    let mut pruned_volumes = Vec::new();
    for v in volumes {
        let child = v.child.as_ref().map(|c| stratus_driver::PruneChild {
            file: c.file.clone().into(),
            new_backing: c.new_backing.clone().map(Into::into),
        });
        match shared
            .driver
            .backup_delete(std::path::Path::new(&v.file), child.as_ref())
            .await
        {
            Ok(Some(p)) => pruned_volumes.push(stratus_client::types::VolumePruned {
                volume_id: v.volume_id,
                data_bytes: p.data_bytes,
                file_bytes: p.file_bytes,
                sha256: p.sha256,
            }),
            Ok(None) => {}
            Err(e) => return failed(chain(&e)),
        }
    }
    let child = child.map(|c| stratus_driver::PruneChild {
        file: c.file.clone().into(),
        new_backing: c.new_backing.clone().map(Into::into),
    });
    match shared
        .driver
        .backup_delete(std::path::Path::new(file), child.as_ref())
        .await
    {
        Ok(p) => AgentRequestResult {
            pruned: p.map(|p| stratus_client::types::BackupPruned {
                data_bytes: p.data_bytes,
                file_bytes: p.file_bytes,
                sha256: p.sha256,
            }),
            pruned_volumes: Some(pruned_volumes),
            ..answered()
        },
        Err(e) => failed(chain(&e)),
    }
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
            ..answered()
        },
        Ok(Err(e)) => failed(chain(&e)),
        Err(_) => failed(format!(
            "the guest agent of VM {vm} did not finish the command within {} s",
            (timeout + EXEC_SLACK).as_secs()
        )),
    }
}
