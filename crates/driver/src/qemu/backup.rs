//! Backups, verification and restores for the QEMU driver (the contract is in
//! [`crate::backup`]).
//!
//! # A backup, step by step
//!
//! A backup copies every disk of the VM: its own disk and each volume
//! attached now (the volumes' locks held while the copies are set up, so no
//! attach, detach or resize meanwhile). Each disk is handled alike, with a
//! job (`stratus-backup-<id>`, a volume's suffixed with its serial), a target
//! node (`stratus-bk-<hash>`) and a file of its own (the disk's
//! `req.target`, a volume's [`crate::volume_backup_file`]).
//!
//! 1. Under the VM's operation lock: clear what an earlier, interrupted attempt
//!    left in QEMU (block jobs named `stratus-backup-*`, block nodes named
//!    `stratus-bk-*`) and at the targets; per disk: find its active layer
//!    (after a snapshot it is no longer the first one, see `snapshot.rs`) and
//!    read its dirty bitmaps with `query-block`, and the copies of them its
//!    older layers hold with `query-named-block-nodes` (only its own layers:
//!    every disk holds bitmaps of the same names); choose full or incremental
//!    (and say why a requested incremental fell back: for a volume also "no
//!    file in the parent restore point"); for an incremental, merge the
//!    older layers' copies of the parent's bitmap into the active layer's
//!    (see below); remove stray `stratus-backup-*` bitmaps; create the
//!    target qcow2 with `qemu-img` (an incremental's backing file is the
//!    parent's file of that disk); `blockdev-add` it (without opening its
//!    backing chain). Then, with the guest's file systems frozen through its
//!    agent when it answers (as for a snapshot), ONE QMP `transaction`: per
//!    disk, add the new persistent bitmap and start `blockdev-backup`
//!    (`sync: full`, or `sync: bitmap` over the parent's bitmap with
//!    `bitmap-mode: never`, so a failed copy leaves the parent's bitmap
//!    untouched). So every disk is captured at the same moment, and its new
//!    bitmap tracks the writes from exactly that moment.
//! 2. Without the operation lock: poll `query-jobs` every 200 ms, reporting
//!    the progress summed over the jobs, until all have concluded.
//! 3. Under the operation lock again: dismiss the jobs and `blockdev-del` the
//!    targets; on any failure (a job's, the VM's end) cancel every job,
//!    remove every new bitmap and every target file: no disk loses its
//!    parent's bitmap, none keeps a partial file.
//! 4. Without the lock: fsync each file, measure it (`qemu-img map` of its
//!    own layer, SHA-256); then remove each disk's parent bitmap, which the
//!    new one replaces.
//!
//! # Bitmaps across snapshots
//!
//! A snapshot freezes the active layer and adds, on the new layer, a copy of
//! each backup bitmap (same name, empty). The frozen layer's copy keeps the
//! writes made before the snapshot and stops changing; the new copy records
//! those after. So the writes since a backup are the union of its bitmap's
//! copies down the chain: before an incremental backup the driver merges the
//! older copies into the active layer's (`block-dirty-bitmap-merge` with
//! `{node, name}` sources). The older copies sit on read-only layers and
//! cannot be removed; they are never used again once the backup completes
//! (its successor's bitmap starts on the active layer). A copy on any layer
//! that is inconsistent means writes may be missing: full backup.
//!
//! # Locks: why the copy runs without the operation lock
//!
//! A copy can take hours; holding the operation lock for it would make a
//! `vm_stop` (host evacuation, operator) wait for the backup. So the lock is
//! held only while the driver changes QEMU's block graph, and a per-VM backup
//! lock keeps backups of one VM one at a time. A VM that stops while its copy
//! runs (`vm_stop`, the guest powering off, QEMU killed) ends the job; the
//! poll notices that QEMU pid is gone and fails the backup with "the VM
//! stopped during the backup", removing the target. The VM's state is
//! recorded by the monitor as for any other end. On a clean exit QEMU stores
//! the new bitmap too; the next backup removes it as a stray.
//!
//! A `vm_backup` future that is dropped mid-copy (agent shutting down) leaves
//! the jobs and target nodes in QEMU; the next attempt clears them (step 1).
//! The bandwidth limit (`backup_bandwidth`) is the backup's, shared evenly
//! among its disks' jobs.
//!
//! # Restores
//!
//! In place, a restore point's volumes are rewritten with the VM's disk:
//! each volume's new content is written beside its file first, then the
//! disk is replaced, then each volume file renamed over the old one, so a
//! failed copy leaves every disk as it was. A volume the VM no longer has,
//! or one whose layers a snapshot holds, is refused before anything is
//! written. Beside a new VM, [`volume_restore`] builds a volume from its
//! file alone.
//!
//! A restored disk is a standalone qcow2 written by `qemu-img convert` from
//! the backup file through its chain. Not an overlay of the base image with
//! `-B`: convert then consults only the top file's allocation and leaves
//! clusters that are unallocated there to the new backing file, so a restore
//! of an incremental showed the base image where the full backup had data
//! (measured with qemu-img 10.0.2: "Content mismatch"); and from a full
//! backup, which holds every allocated cluster, `-B` saves nothing.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qapi::qmp as q;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use stratus_common::VmId;

use super::image::run_qemu_img;
use super::layout::{read_json, remove_file_if_exists, VmPaths};
use super::qmp::{execute, QmpService};
use super::snapshot::{block_nodes, disk_block, read_chain, Disk, Freeze};
use super::{process, volume, Shared, VmEntry, QMP_TIMEOUT};
use crate::{
    bitmap_name, volume_backup_file, BackupCheck, BackupMode, BackupOutcome, BackupParent,
    BackupProgress, BackupRequest, DriverError, ProgressFn, QemuSaid, VmSpec, VolumeBackupOutcome,
    VolumeRestore,
};

/// Prefix of the bitmaps this driver owns (see [`bitmap_name`]).
const BITMAP_PREFIX: &str = "stratus-backup-";
/// Prefix of the backup block jobs' ids.
const JOB_PREFIX: &str = "stratus-backup-";
/// Prefix of the backup target nodes' names.
const NODE_PREFIX: &str = "stratus-bk-";
/// How often a running backup job is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How long the poll tolerates QMP being unreachable while QEMU lives (the
/// monitor reconnects after an event qapi cannot decode).
const QMP_GONE_GRACE: Duration = Duration::from_secs(30);
/// How long a cancelled job may take to conclude.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(30);

/// The QEMU block job id of a backup: valid across agent restarts, so a
/// retry finds the job of an interrupted attempt.
fn job_id(backup_id: uuid::Uuid) -> String {
    format!("{JOB_PREFIX}{backup_id}")
}

/// The block node name of a backup's target. QEMU allows at most 31
/// characters, too few for a UUID: a hash of it instead.
fn node_name(backup_id: uuid::Uuid) -> String {
    let digest = Sha256::digest(backup_id.as_bytes());
    let hex = format!("{digest:x}");
    format!("{NODE_PREFIX}{}", &hex[..20])
}

/// A dirty bitmap of the disk, as `query-block` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Bitmap {
    name: String,
    inconsistent: bool,
}

/// A copy of a backup bitmap on an older (backing) layer of the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
struct OlderCopy {
    node: String,
    bitmap: Bitmap,
}

/// What the driver needs to know about the disk before a backup.
struct DiskState {
    /// The active layer's node.
    node: String,
    virtual_size: u64,
    /// The active layer's bitmaps.
    bitmaps: Vec<Bitmap>,
    /// Our bitmaps' copies on the other layers.
    older: Vec<OlderCopy>,
}

/// Full or incremental, and why an incremental was not possible.
fn choose_mode(
    parent: Option<&BackupParent>,
    bitmaps: &[Bitmap],
    older: &[OlderCopy],
) -> (BackupMode, Option<String>) {
    let Some(parent) = parent else {
        return (BackupMode::Full, None);
    };
    let name = bitmap_name(parent.backup_id);
    let older_inconsistent = older
        .iter()
        .any(|c| c.bitmap.name == name && c.bitmap.inconsistent);
    let reason = match bitmaps.iter().find(|b| b.name == name) {
        None => format!(
            "the change-tracking bitmap of backup {} is missing (the disk was restored, \
             replaced or reverted to a snapshot, or QEMU ended without storing it)",
            parent.backup_id
        ),
        Some(b) if b.inconsistent => format!(
            "the change-tracking bitmap of backup {} is inconsistent (QEMU did not close the \
             disk cleanly)",
            parent.backup_id
        ),
        Some(_) if older_inconsistent => format!(
            "the change-tracking bitmap of backup {} is inconsistent in a disk layer a snapshot \
             froze (QEMU did not close the disk cleanly before that snapshot)",
            parent.backup_id
        ),
        Some(_) if !parent.file.is_file() => format!(
            "the file of backup {} ({}) does not exist",
            parent.backup_id,
            parent.file.display()
        ),
        Some(_) => return (BackupMode::Incremental, None),
    };
    (BackupMode::Full, Some(reason))
}

/// The bitmaps to remove before a backup: every `stratus-backup-*` bitmap but
/// the parent's when the backup is incremental over it.
fn stray_bitmaps(bitmaps: &[Bitmap], keep: Option<&str>) -> Vec<String> {
    bitmaps
        .iter()
        .filter(|b| b.name.starts_with(BITMAP_PREFIX) && Some(b.name.as_str()) != keep)
        .map(|b| b.name.clone())
        .collect()
}

fn utf8<'a>(id: VmId, what: &str, p: &'a Path) -> Result<&'a str, DriverError> {
    p.to_str().ok_or_else(|| DriverError::Backup {
        id,
        reason: format!("the {what} path {} is not UTF-8", p.display()),
        source: None,
    })
}

fn backup_error(id: VmId, reason: impl Into<String>) -> DriverError {
    DriverError::Backup {
        id,
        reason: reason.into(),
        source: None,
    }
}

/// The live QEMU pid of a VM that must be running or paused, else
/// [`DriverError::InvalidState`]. Caller holds `vm.op`.
fn running_pid(
    shared: &Arc<Shared>,
    vm: &Arc<VmEntry>,
    operation: &'static str,
) -> Result<u32, DriverError> {
    match shared.ensure_adopted(vm)? {
        Some(pid) => Ok(pid),
        None => {
            shared.reconcile_dead(vm)?;
            Err(DriverError::InvalidState {
                id: vm.id,
                operation,
                state: shared.read_record(vm)?.state.to_string(),
            })
        }
    }
}

/// One disk's part in a backup: the VM's own disk or an attached volume.
struct DiskCopy {
    disk: Disk,
    /// Its file on the target.
    target: PathBuf,
    /// The parent restore point's file of this disk (and the bitmap of that
    /// restore point, in this disk); `None`: full.
    parent: Option<BackupParent>,
    /// A volume the backup is incremental for, but that the parent restore
    /// point did not cover (attached since).
    new_in_parent: bool,
    job: String,
    node: String,
    // Known once QEMU was asked (step 1).
    source: String,
    virtual_size: u64,
    mode: BackupMode,
    fallback_reason: Option<String>,
}

impl DiskCopy {
    fn new(req: &BackupRequest, disk: Disk) -> DiskCopy {
        let (target, parent, new_in_parent) = match disk {
            Disk::Vm => (req.target.clone(), req.parent.clone(), false),
            Disk::Volume(v) => {
                let file = req
                    .volume_parents
                    .iter()
                    .find(|p| p.volume_id == v)
                    .map(|p| p.file.clone());
                let parent = req.parent.as_ref().and_then(|p| {
                    file.clone().map(|file| BackupParent {
                        backup_id: p.backup_id,
                        file,
                    })
                });
                (
                    volume_backup_file(&req.target, v),
                    parent,
                    req.parent.is_some() && file.is_none(),
                )
            }
        };
        DiskCopy {
            disk,
            target,
            parent,
            new_in_parent,
            job: copy_job_id(req.backup_id, disk),
            node: copy_node_name(req.backup_id, disk),
            source: String::new(),
            virtual_size: 0,
            mode: BackupMode::Full,
            fallback_reason: None,
        }
    }

    fn parent_bitmap(&self) -> Option<String> {
        match (self.mode, &self.parent) {
            (BackupMode::Incremental, Some(p)) => Some(bitmap_name(p.backup_id)),
            _ => None,
        }
    }
}

/// The block job id of one disk's copy (see [`job_id`]).
fn copy_job_id(backup_id: uuid::Uuid, disk: Disk) -> String {
    match disk {
        Disk::Vm => job_id(backup_id),
        Disk::Volume(v) => format!("{}-{}", job_id(backup_id), crate::volume_serial(v)),
    }
}

/// The target node name of one disk's copy (see [`node_name`]).
fn copy_node_name(backup_id: uuid::Uuid, disk: Disk) -> String {
    match disk {
        Disk::Vm => node_name(backup_id),
        Disk::Volume(v) => {
            let mut h = Sha256::new();
            h.update(backup_id.as_bytes());
            h.update(v.as_bytes());
            let hex = format!("{:x}", h.finalize());
            format!("{NODE_PREFIX}{}", &hex[..20])
        }
    }
}

/// Backs up the disk of VM `id` and every volume attached to it. See the
/// module docs.
pub(super) async fn backup(
    shared: &Arc<Shared>,
    id: VmId,
    req: &BackupRequest,
    progress: &ProgressFn,
) -> Result<BackupOutcome, DriverError> {
    if !req.target.is_absolute() {
        return Err(backup_error(
            id,
            format!("the target path {} is not absolute", req.target.display()),
        ));
    }
    utf8(id, "target", &req.target)?;
    let vm = shared.existing(id)?;
    let _one_backup = vm.backup.lock().await;
    let started = Instant::now();
    let new_bitmap = bitmap_name(req.backup_id);

    // Step 1: set up and start the jobs, every disk in one transaction.
    let (pid, mut copies) = {
        // No attach, detach or resize while the disks are set up.
        let (attached, _volume_locks) = volume::lock_attached(shared, &vm).await?;
        let _op = vm.op.lock().await;
        let pid = running_pid(shared, &vm, "back up")?;
        let qmp = shared.qmp(&vm).await?;
        clear_leftovers(&qmp, id).await?;
        let chain = read_chain(&vm.paths)?;
        let mut copies: Vec<DiskCopy> = std::iter::once(Disk::Vm)
            .chain(attached.iter().map(|v| Disk::Volume(*v)))
            .map(|disk| DiskCopy::new(req, disk))
            .collect();
        let prepared = async {
            for c in &mut copies {
                utf8(id, "target", &c.target)?;
                remove_file_if_exists(&c.target)?;
                let layers: Vec<String> = chain
                    .files_of(c.disk)
                    .iter()
                    .map(|f| c.disk.node(f))
                    .collect();
                let disk = disk_state(&qmp, id, c.disk, &layers).await?;
                let (mode, reason) = if c.new_in_parent {
                    (
                        BackupMode::Full,
                        Some(format!(
                            "{} has no file in the parent restore point (attached since)",
                            c.disk
                        )),
                    )
                } else {
                    choose_mode(c.parent.as_ref(), &disk.bitmaps, &disk.older)
                };
                c.mode = mode;
                c.fallback_reason = reason;
                c.source = disk.node.clone();
                c.virtual_size = disk.virtual_size;
                let parent_bitmap = c.parent_bitmap();
                for stray in stray_bitmaps(&disk.bitmaps, parent_bitmap.as_deref()) {
                    tracing::info!(vm = %id, disk = %c.disk, bitmap = %stray, "removing a stray backup bitmap");
                    remove_bitmap(&qmp, &disk.node, &stray).await?;
                }
                if let Some(parent) = &parent_bitmap {
                    merge_older_copies(&qmp, id, &disk, parent).await?;
                }
                if let Some(reason) = &c.fallback_reason {
                    tracing::warn!(vm = %id, disk = %c.disk, backup = %req.backup_id, %reason, "taking a full copy instead of an incremental one");
                }
                let parent_file = match c.mode {
                    BackupMode::Incremental => c.parent.as_ref().map(|p| p.file.as_path()),
                    BackupMode::Full => None,
                };
                create_target(shared, &c.target, parent_file, c.virtual_size).await?;
            }
            Ok::<_, DriverError>(())
        }
        .await;
        if let Err(e) = prepared {
            for c in &copies {
                let _ = remove_file_if_exists(&c.target);
            }
            return Err(e);
        }
        if let Err(e) = start_jobs(
            &vm,
            &qmp,
            &copies,
            &new_bitmap,
            shared.config.backup_bandwidth,
        )
        .await
        {
            abandon(shared, &vm, pid, &copies, None).await;
            return Err(e);
        }
        (pid, copies)
    };
    tracing::info!(vm = %id, backup = %req.backup_id, disks = copies.len(), target = %req.target.display(), "backup started");

    // Step 2: wait for the copies.
    let jobs: Vec<(String, PathBuf)> = copies
        .iter()
        .map(|c| (c.job.clone(), c.target.clone()))
        .collect();
    let polled = poll_jobs(shared, &vm, pid, &jobs, progress).await;

    // Step 3: tear down the jobs and the target nodes.
    {
        let _op = vm.op.lock().await;
        let failure = match polled {
            Ok(None) => None,
            Ok(Some((target, job_error))) => Some(job_failure(id, &target, job_error)),
            Err(e) => Some(e),
        };
        if let Some(e) = failure {
            abandon(shared, &vm, pid, &copies, Some(&new_bitmap)).await;
            return Err(e);
        }
        let teardown = async {
            let qmp = shared.qmp(&vm).await?;
            for c in &copies {
                execute(
                    &qmp,
                    q::job_dismiss { id: c.job.clone() },
                    QMP_TIMEOUT,
                    "backup",
                )
                .await?;
                execute(
                    &qmp,
                    q::blockdev_del {
                        node_name: c.node.clone(),
                    },
                    QMP_TIMEOUT,
                    "backup",
                )
                .await?;
            }
            Ok::<_, DriverError>(())
        }
        .await;
        if let Err(e) = teardown {
            let e = if process::is_qemu_of(pid, id) {
                e
            } else {
                backup_error(id, "the VM stopped during the backup")
            };
            abandon(shared, &vm, pid, &copies, Some(&new_bitmap)).await;
            return Err(e);
        }
    }

    // Step 4: make the files durable and measure them.
    let mut measured = Vec::with_capacity(copies.len());
    for c in &copies {
        let m = async {
            fsync_file_and_dir(&c.target)?;
            let data_bytes = data_bytes(&shared.config.qemu_img, &c.target).await?;
            let file_bytes = std::fs::metadata(&c.target)
                .map_err(|e| DriverError::io("cannot read the backup file's size", &c.target, e))?
                .len();
            let sha256 = sha256_file(&c.target).await?;
            Ok::<_, DriverError>((data_bytes, file_bytes, sha256))
        }
        .await;
        match m {
            Ok(m) => measured.push(m),
            Err(e) => {
                // The copies are complete, but a backup the driver cannot
                // vouch for is no restore point. The parents' bitmaps are
                // still there: a retry is incremental again. The new
                // bitmaps go as strays.
                for c in &copies {
                    let _ = remove_file_if_exists(&c.target);
                }
                return Err(e);
            }
        }
    }
    // The new bitmaps track changes from this point; the parents' are no
    // longer needed. If this fails they are removed as strays next time.
    {
        let _op = vm.op.lock().await;
        let qmp = shared.qmp(&vm).await;
        for c in copies.iter_mut() {
            let Some(name) = c.parent_bitmap() else {
                continue;
            };
            let removed = async {
                let qmp = qmp.as_ref().map_err(|e| backup_error(id, e.to_string()))?;
                let node = disk_block(qmp, id, c.disk)
                    .await?
                    .node_name
                    .unwrap_or_default();
                remove_bitmap(qmp, &node, &name).await
            }
            .await;
            if let Err(e) = removed {
                tracing::warn!(vm = %id, disk = %c.disk, bitmap = %name, error = %e, "cannot remove the parent's bitmap; the next backup will");
            }
        }
    }
    let mut outcome = None;
    let mut volumes = Vec::new();
    for (c, (data_bytes, file_bytes, sha256)) in copies.into_iter().zip(measured) {
        tracing::info!(
            vm = %id,
            backup = %req.backup_id,
            disk = %c.disk,
            mode = ?c.mode,
            data_bytes,
            file_bytes,
            "disk backed up"
        );
        match c.disk {
            Disk::Vm => {
                outcome = Some(BackupOutcome {
                    mode: c.mode,
                    fallback_reason: c.fallback_reason,
                    data_bytes,
                    file_bytes,
                    disk_bytes: c.virtual_size,
                    sha256,
                    volumes: Vec::new(),
                })
            }
            Disk::Volume(volume_id) => volumes.push(VolumeBackupOutcome {
                volume_id,
                file: c.target,
                mode: c.mode,
                fallback_reason: c.fallback_reason,
                data_bytes,
                file_bytes,
                disk_bytes: c.virtual_size,
                sha256,
            }),
        }
    }
    let mut outcome = outcome.ok_or_else(|| backup_error(id, "the VM's disk was not copied"))?;
    outcome.volumes = volumes;
    tracing::info!(
        vm = %id,
        backup = %req.backup_id,
        mode = ?outcome.mode,
        volumes = outcome.volumes.len(),
        ms = started.elapsed().as_millis() as u64,
        "backup complete"
    );
    Ok(outcome)
}

/// Cancels and dismisses every backup job and deletes every backup target
/// node this driver (or an earlier instance of it) left in QEMU. Only one
/// backup of a VM runs at a time, so all of them are leftovers.
async fn clear_leftovers(qmp: &QmpService, id: VmId) -> Result<(), DriverError> {
    let jobs = execute(qmp, q::query_jobs {}, QMP_TIMEOUT, "backup").await?;
    for job in jobs.into_iter().filter(|j| j.id.starts_with(JOB_PREFIX)) {
        tracing::info!(vm = %id, job = %job.id, status = ?job.status, "clearing a block job left by an earlier backup attempt");
        finish_job(qmp, &job.id).await?;
    }
    let nodes = execute(
        qmp,
        q::query_named_block_nodes { flat: Some(true) },
        QMP_TIMEOUT,
        "backup",
    )
    .await?;
    for name in nodes
        .into_iter()
        .filter_map(|n| n.node_name)
        .filter(|n| n.starts_with(NODE_PREFIX))
    {
        tracing::info!(vm = %id, node = %name, "removing a block node left by an earlier backup attempt");
        execute(
            qmp,
            q::blockdev_del { node_name: name },
            QMP_TIMEOUT,
            "backup",
        )
        .await?;
    }
    Ok(())
}

/// Cancels job `id` unless it has concluded, waits for it to conclude and
/// dismisses it. A job that does not exist is fine.
async fn finish_job(qmp: &QmpService, id: &str) -> Result<(), DriverError> {
    let deadline = Instant::now() + CANCEL_TIMEOUT;
    let mut cancelled = false;
    loop {
        let jobs = execute(qmp, q::query_jobs {}, QMP_TIMEOUT, "backup").await?;
        let Some(job) = jobs.into_iter().find(|j| j.id == id) else {
            return Ok(());
        };
        match job.status {
            q::JobStatus::concluded => {
                execute(qmp, q::job_dismiss { id: id.into() }, QMP_TIMEOUT, "backup").await?;
                return Ok(());
            }
            q::JobStatus::null => return Ok(()),
            _ if !cancelled => {
                // The job may conclude between the query and the cancel.
                let _ = execute(qmp, q::job_cancel { id: id.into() }, QMP_TIMEOUT, "backup").await;
                cancelled = true;
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(DriverError::timeout(format!(
                "waiting {}s for the cancelled block job {id} to end",
                CANCEL_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One disk's active node, size and dirty bitmaps, and the copies of our
/// bitmaps on its other layers (`layers`: the node names of its recorded
/// chain; other disks' nodes carry bitmaps of the same names, which must
/// not be merged into this one's).
async fn disk_state(
    qmp: &QmpService,
    id: VmId,
    disk: Disk,
    layers: &[String],
) -> Result<DiskState, DriverError> {
    let device = disk_block(qmp, id, disk).await?;
    let node = device.node_name.clone().ok_or_else(|| {
        DriverError::qemu(
            format!("QMP query-block lists {disk} without a node name"),
            QemuSaid(String::new()),
        )
    })?;
    let older = block_nodes(qmp)
        .await?
        .into_iter()
        .filter(|n| n.name != node && layers.contains(&n.name))
        .flat_map(|n| {
            let node = n.name;
            n.bitmaps
                .into_iter()
                .filter(|(name, _)| name.starts_with(BITMAP_PREFIX))
                .map(move |(name, inconsistent)| OlderCopy {
                    node: node.clone(),
                    bitmap: Bitmap { name, inconsistent },
                })
        })
        .collect();
    let virtual_size = u64::try_from(device.image.base.virtual_size)
        .map_err(|e| DriverError::qemu("QMP query-block reports a negative disk size", e))?;
    let bitmaps = device
        .dirty_bitmaps
        .unwrap_or_default()
        .into_iter()
        .filter_map(|b| {
            Some(Bitmap {
                name: b.name?,
                inconsistent: b.inconsistent.unwrap_or(false),
            })
        })
        .collect();
    Ok(DiskState {
        node,
        virtual_size,
        bitmaps,
        older,
    })
}

/// Makes the active layer's copy of the parent's bitmap the union of all its
/// copies down the chain (see the module docs).
async fn merge_older_copies(
    qmp: &QmpService,
    id: VmId,
    disk: &DiskState,
    parent_bitmap: &str,
) -> Result<(), DriverError> {
    let sources: Vec<q::BlockDirtyBitmapOrStr> = disk
        .older
        .iter()
        .filter(|c| c.bitmap.name == parent_bitmap)
        .map(|c| {
            q::BlockDirtyBitmapOrStr::external(q::BlockDirtyBitmap {
                node: c.node.clone(),
                name: c.bitmap.name.clone(),
            })
        })
        .collect();
    if sources.is_empty() {
        return Ok(());
    }
    tracing::info!(vm = %id, bitmap = %parent_bitmap, layers = sources.len(), "merging the copies older disk layers hold into the active layer's bitmap");
    execute(
        qmp,
        q::block_dirty_bitmap_merge(q::BlockDirtyBitmapMerge {
            node: disk.node.clone(),
            target: parent_bitmap.into(),
            bitmaps: sources,
        }),
        QMP_TIMEOUT,
        "backup",
    )
    .await?;
    Ok(())
}

async fn remove_bitmap(qmp: &QmpService, node: &str, name: &str) -> Result<(), DriverError> {
    execute(
        qmp,
        q::block_dirty_bitmap_remove(q::BlockDirtyBitmap {
            node: node.into(),
            name: name.into(),
        }),
        QMP_TIMEOUT,
        "backup",
    )
    .await?;
    Ok(())
}

/// Creates the target file: a standalone qcow2 of the disk's size, or for an
/// incremental one whose backing file is the parent's file.
async fn create_target(
    shared: &Shared,
    target: &Path,
    parent_file: Option<&Path>,
    size: u64,
) -> Result<(), DriverError> {
    let size = size.to_string();
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
    ];
    if let Some(parent) = parent_file {
        args.extend([
            "-F".as_ref(),
            "qcow2".as_ref(),
            "-b".as_ref(),
            parent.as_os_str(),
        ]);
    }
    args.extend([target.as_os_str(), size.as_ref()]);
    run_qemu_img(
        &shared.config.qemu_img,
        &args,
        &format!("create the backup file {}", target.display()),
    )
    .await?;
    Ok(())
}

/// Opens every target in QEMU and starts all the copies in one
/// transaction, each with its disk's new bitmap, with the guest's file
/// systems frozen meanwhile when its agent answers. Caller holds `vm.op`.
async fn start_jobs(
    vm: &VmEntry,
    qmp: &QmpService,
    copies: &[DiskCopy],
    new_bitmap: &str,
    speed: Option<u64>,
) -> Result<(), DriverError> {
    // The bandwidth limit is the backup's: shared among its disks' jobs.
    let jobs = u64::try_from(copies.len()).unwrap_or(1).max(1);
    let speed = speed.map(|s| (s / jobs).max(1));
    let mut actions = Vec::with_capacity(copies.len() * 2);
    for c in copies {
        // The backing chain is not opened: the job writes only this file's layer.
        let target = utf8(vm.id, "target", &c.target)?;
        let options = super::snapshot::qcow2_without_backing(&c.node, target, false)?;
        execute(qmp, q::blockdev_add(options), QMP_TIMEOUT, "backup").await?;
        let (sync, bitmap, bitmap_mode) = match c.parent_bitmap() {
            Some(parent) => (
                q::MirrorSyncMode::bitmap,
                Some(parent),
                Some(q::BitmapSyncMode::never),
            ),
            None => (q::MirrorSyncMode::full, None, None),
        };
        actions.push(q::TransactionAction::block_dirty_bitmap_add(
            q::BlockDirtyBitmapAdd {
                node: c.source.clone(),
                name: new_bitmap.into(),
                persistent: Some(true),
                disabled: None,
                granularity: None,
            }
            .into(),
        ));
        actions.push(q::TransactionAction::blockdev_backup(
            q::BlockdevBackup {
                target: c.node.clone(),
                base: q::BackupCommon {
                    device: c.source.clone(),
                    sync,
                    bitmap,
                    bitmap_mode,
                    job_id: Some(c.job.clone()),
                    // Kept after it ends, so its outcome can be read even
                    // when the poll misses the moment.
                    auto_dismiss: Some(false),
                    auto_finalize: Some(true),
                    compress: None,
                    discard_source: None,
                    filter_node_name: None,
                    on_source_error: None,
                    on_target_error: None,
                    speed: speed.and_then(|s| i64::try_from(s).ok()),
                    x_perf: None,
                },
            }
            .into(),
        ));
    }
    let freeze = Freeze::begin(vm).await;
    let started = execute(
        qmp,
        q::transaction {
            actions,
            properties: None,
        },
        QMP_TIMEOUT,
        "backup",
    )
    .await;
    let quiesced = freeze.end(vm.id).await;
    started?;
    tracing::debug!(vm = %vm.id, quiesced, disks = copies.len(), "backup jobs started in one transaction");
    Ok(())
}

/// Polls the jobs until all have concluded: `Ok(None)` when all succeeded,
/// `Ok(Some((target, error)))` with the first failed one's target and
/// QEMU's error, `Err` when QEMU went away or could not be asked. Progress
/// is the sum over the jobs.
async fn poll_jobs(
    shared: &Arc<Shared>,
    vm: &Arc<VmEntry>,
    pid: u32,
    jobs: &[(String, PathBuf)],
    progress: &ProgressFn,
) -> Result<Option<(PathBuf, String)>, DriverError> {
    let id = vm.id;
    let gone = || backup_error(id, "the VM stopped during the backup");
    let mut unreachable_since: Option<Instant> = None;
    loop {
        if !process::is_qemu_of(pid, id) {
            return Err(gone());
        }
        let asked = async {
            let qmp = shared.qmp(vm).await?;
            execute(&qmp, q::query_jobs {}, QMP_TIMEOUT, "backup").await
        }
        .await;
        let all = match asked {
            Ok(all) => {
                unreachable_since = None;
                all
            }
            Err(e) => {
                if !process::is_qemu_of(pid, id) {
                    return Err(gone());
                }
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > QMP_GONE_GRACE {
                    return Err(e);
                }
                tracing::debug!(vm = %id, error = %e, "cannot poll the backup jobs; retrying");
                tokio::time::sleep(POLL_INTERVAL).await;
                continue;
            }
        };
        let mut sum = BackupProgress::default();
        let mut concluded = 0;
        for (job, target) in jobs {
            let Some(info) = all.iter().find(|j| &j.id == job) else {
                return Err(backup_error(
                    id,
                    format!("QEMU's block job {job} disappeared before it ended"),
                ));
            };
            sum.done_bytes += u64::try_from(info.current_progress).unwrap_or(0);
            sum.total_bytes += u64::try_from(info.total_progress).unwrap_or(0);
            if info.status == q::JobStatus::concluded {
                if let Some(error) = &info.error {
                    return Ok(Some((target.clone(), error.clone())));
                }
                concluded += 1;
            }
        }
        progress(sum);
        if concluded == jobs.len() {
            return Ok(None);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The error of a job that concluded with `error`, in words an operator can
/// act on.
fn job_failure(id: VmId, target: &Path, error: String) -> DriverError {
    let reason = if error.contains("No space left on device") {
        format!(
            "the backup target ran out of space (writing {})",
            target.display()
        )
    } else if error.to_ascii_lowercase().contains("cancel") {
        "QEMU's backup job was cancelled".to_string()
    } else {
        "QEMU's backup job failed".to_string()
    };
    DriverError::Backup {
        id,
        reason,
        source: Some(Box::new(QemuSaid(error))),
    }
}

/// Undoes a failed backup, best effort, for every disk: cancels and
/// dismisses its job, removes its target node and the new bitmap (while
/// QEMU still runs) and its target file. The parents' bitmaps stay, so no
/// disk loses its change tracking. Caller holds `vm.op`.
async fn abandon(
    shared: &Arc<Shared>,
    vm: &Arc<VmEntry>,
    pid: u32,
    copies: &[DiskCopy],
    new_bitmap: Option<&str>,
) {
    let id = vm.id;
    if process::is_qemu_of(pid, id) {
        match shared.qmp(vm).await {
            Ok(qmp) => {
                for c in copies {
                    if let Err(e) = finish_job(&qmp, &c.job).await {
                        tracing::warn!(vm = %id, job = %c.job, error = %e, "cannot end the failed backup job; the next backup will");
                    }
                    let deleted = execute(
                        &qmp,
                        q::blockdev_del {
                            node_name: c.node.clone(),
                        },
                        QMP_TIMEOUT,
                        "backup",
                    )
                    .await;
                    if let Err(e) = deleted {
                        tracing::debug!(vm = %id, node = %c.node, error = %e, "backup target node not removed");
                    }
                    if let Some(bitmap) = new_bitmap {
                        let removed = async {
                            let node = disk_block(&qmp, id, c.disk)
                                .await?
                                .node_name
                                .unwrap_or_default();
                            remove_bitmap(&qmp, &node, bitmap).await
                        }
                        .await;
                        if let Err(e) = removed {
                            tracing::debug!(vm = %id, disk = %c.disk, %bitmap, error = %e, "new bitmap not removed");
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(vm = %id, error = %e, "no QMP to clean up after the failed backup")
            }
        }
    }
    for c in copies {
        if let Err(e) = remove_file_if_exists(&c.target) {
            tracing::warn!(vm = %id, error = %e, "cannot remove the failed backup's file");
        }
    }
}

/// Flushes a file and the directory entry naming it to stable storage.
fn fsync_file_and_dir(path: &Path) -> Result<(), DriverError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| DriverError::io("cannot flush the file to disk", path, e))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(|e| DriverError::io("cannot flush the directory to disk", dir, e))?;
    }
    Ok(())
}

/// A `json:` image name that opens `file` as qcow2 without its backing chain.
pub(super) fn own_layer_spec(file: &Path) -> Result<String, DriverError> {
    let name = file.to_str().ok_or_else(|| {
        DriverError::io(
            "the path is not UTF-8",
            file,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not UTF-8"),
        )
    })?;
    Ok(format!(
        "json:{}",
        json!({
            "driver": "qcow2",
            "backing": null,
            "file": { "driver": "file", "filename": name },
        })
    ))
}

#[derive(Deserialize)]
struct MapEntry {
    length: u64,
    data: bool,
}

/// Guest data held in the file's own layer: the clusters `qemu-img map`
/// reports as data when the backing chain is not opened. Zero clusters (the
/// copy of a zeroed area) hold no data.
pub(super) async fn data_bytes(qemu_img: &Path, file: &Path) -> Result<u64, DriverError> {
    let spec = own_layer_spec(file)?;
    let context = format!("map the backup file {}", file.display());
    let out = run_qemu_img(
        qemu_img,
        &["map".as_ref(), "--output=json".as_ref(), spec.as_ref()],
        &context,
    )
    .await?;
    let entries: Vec<MapEntry> = serde_json::from_slice(&out)
        .map_err(|e| DriverError::qemu(format!("cannot {context}"), e))?;
    Ok(entries.iter().filter(|e| e.data).map(|e| e.length).sum())
}

/// SHA-256 of a file, hex, streamed (backups are large).
pub(super) async fn sha256_file(path: &Path) -> Result<String, DriverError> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&p)
            .map_err(|e| DriverError::io("cannot open the file to hash it", &p, e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| DriverError::io("cannot read the file to hash it", &p, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(format!("{:x}", hasher.finalize()))
    })
    .await
    .map_err(|e| DriverError::io("the hashing task failed", path, std::io::Error::other(e)))?
}

#[derive(Deserialize)]
struct InfoOut {
    format: String,
    #[serde(rename = "full-backing-filename")]
    full_backing_filename: Option<String>,
}

#[derive(Deserialize, Default)]
struct CheckOut {
    #[serde(rename = "check-errors", default)]
    check_errors: u64,
    #[serde(default)]
    corruptions: u64,
    #[serde(default)]
    leaks: u64,
}

/// Hashes `file` and checks it and every file of its backing chain.
pub(super) async fn verify(qemu_img: &Path, file: &Path) -> Result<BackupCheck, DriverError> {
    let sha256 = sha256_file(file).await?;
    let mut problems = Vec::new();
    let mut seen = HashSet::new();
    let mut current = file.to_path_buf();
    loop {
        if !seen.insert(current.clone()) {
            problems.push(format!(
                "{} appears twice in its own backing chain",
                current.display()
            ));
            break;
        }
        // -U: a file of the chain may be open in QEMU (read-only) meanwhile.
        let out = tokio::process::Command::new(qemu_img)
            .args(["info", "-U", "--output=json", "-f", "qcow2"])
            .arg(&current)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| DriverError::io("cannot run qemu-img to verify a backup", qemu_img, e))?;
        if !out.status.success() {
            problems.push(format!(
                "{} cannot be read as qcow2: {}",
                current.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            break;
        }
        let info: InfoOut = serde_json::from_slice(&out.stdout).map_err(|e| {
            DriverError::qemu(
                format!("cannot read qemu-img info of {}", current.display()),
                e,
            )
        })?;
        if info.format != "qcow2" {
            problems.push(format!(
                "{} is {}, not qcow2",
                current.display(),
                info.format
            ));
        }
        problems.extend(check_one(qemu_img, &current).await?);
        let Some(backing) = info.full_backing_filename else {
            break;
        };
        let backing = PathBuf::from(backing);
        if !backing.is_file() {
            problems.push(format!(
                "the backing file {} of {} is missing",
                backing.display(),
                current.display()
            ));
            break;
        }
        current = backing;
    }
    Ok(BackupCheck { sha256, problems })
}

/// What `qemu-img check` finds in one file of a chain (opened alone).
async fn check_one(qemu_img: &Path, file: &Path) -> Result<Vec<String>, DriverError> {
    let spec = own_layer_spec(file)?;
    let out = tokio::process::Command::new(qemu_img)
        .args(["check", "-U", "--output=json"])
        .arg(&spec)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| DriverError::io("cannot run qemu-img to verify a backup", qemu_img, e))?;
    // Exit codes: 0 clean, 1 check failed to run, 2 corruptions, 3 leaks.
    let parsed: Option<CheckOut> = serde_json::from_slice(&out.stdout).ok();
    let shown = file.display();
    let mut problems = Vec::new();
    match parsed {
        Some(c) => {
            if c.corruptions > 0 {
                problems.push(format!("{shown}: {} corruptions", c.corruptions));
            }
            if c.leaks > 0 {
                problems.push(format!("{shown}: {} leaked clusters", c.leaks));
            }
            if c.check_errors > 0 {
                problems.push(format!("{shown}: {} errors while checking", c.check_errors));
            }
            if problems.is_empty() && !out.status.success() {
                problems.push(format!(
                    "{shown}: qemu-img check failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        None => problems.push(format!(
            "{shown}: qemu-img check failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
    Ok(problems)
}

/// Replaces the disk of the stopped VM `id` with the content of `file`,
/// and each volume in `volumes` with its file. Every volume's new content is
/// written beside it first; then the disk is replaced; then each volume's
/// file is renamed over the old one. A failure while copying leaves every
/// disk as it was.
pub(super) async fn restore(
    shared: &Arc<Shared>,
    id: VmId,
    file: &Path,
    volumes: &[VolumeRestore],
) -> Result<(), DriverError> {
    let vm = shared.existing(id)?;
    check_restore_source(id, file)?;
    for v in volumes {
        check_restore_source(id, &v.file)?;
    }
    let (attached, _volume_locks) = volume::lock_attached(shared, &vm).await?;
    let _op = vm.op.lock().await;
    super::cold::refuse_if_exported(&vm, "restore")?;
    let strays = process::find_qemu_of(id);
    if shared.ensure_adopted(&vm)?.is_some() || !strays.is_empty() {
        return Err(DriverError::InvalidState {
            id,
            operation: "restore",
            state: shared.read_record(&vm)?.state.to_string(),
        });
    }
    let spec: VmSpec = read_json(&vm.paths.vm_json, "VM spec")?.ok_or(DriverError::NotFound(id))?;
    let chain = super::snapshot::read_chain(&vm.paths)?;
    for v in volumes {
        let disk = Disk::Volume(v.volume_id);
        if !attached.contains(&v.volume_id) {
            return Err(DriverError::Conflict {
                id,
                difference: format!(
                    "volume {} is in the backup but no longer attached to the VM; attach it \
                     again, or restore the backup into a new VM",
                    v.volume_id
                ),
            });
        }
        let covering = chain.covering(v.volume_id);
        if !covering.is_empty() || chain.active_of(disk) != volume::own_file(v.volume_id) {
            return Err(DriverError::Conflict {
                id,
                difference: format!(
                    "snapshots {covering:?} cover volume {}, and restoring it in place would \
                     strand their layers; delete those snapshots first",
                    v.volume_id
                ),
            });
        }
    }
    // Each volume's new content, beside its file (in its shared pool, for
    // a pool volume).
    let mut built: Vec<(PathBuf, PathBuf)> = Vec::with_capacity(volumes.len());
    let qemu_img = &shared.config.qemu_img;
    for v in volumes {
        let dir = volume::volume_dir(shared, v.volume_id);
        let dest = dir.join(volume::own_file(v.volume_id));
        let tmp = dir.join(format!("{}.restore.tmp", v.volume_id));
        let written = async {
            let size =
                super::image::virtual_size(qemu_img, &dest, crate::ImageFormat::Qcow2).await?;
            write_from_backup(qemu_img, &v.file, &tmp, size).await
        }
        .await;
        if let Err(e) = written {
            let _ = remove_file_if_exists(&tmp);
            for (t, _) in &built {
                let _ = remove_file_if_exists(t);
            }
            return Err(e);
        }
        built.push((tmp, dest));
    }
    let disk_done = async {
        if chain == super::snapshot::Chain::default() {
            build_restored_disk(shared, &spec, file, &vm.paths, &vm.paths.overlay()).await?;
        } else {
            // The disk has snapshots: its layers are replaced wholesale. Written
            // beside them, then recorded as the only layer (which drops the
            // others), so a failure leaves the old chain intact.
            let layer = format!("disk.{}.qcow2", uuid::Uuid::new_v4());
            build_restored_disk(
                shared,
                &spec,
                file,
                &vm.paths,
                &vm.paths.disks().join(&layer),
            )
            .await?;
            super::snapshot::replace_chain(id, &vm.paths, &layer)?;
            tracing::info!(vm = %id, snapshots = chain.snapshots.len(), "restoring in place dropped the VM's snapshots");
        }
        Ok::<_, DriverError>(())
    }
    .await;
    if let Err(e) = disk_done {
        for (t, _) in &built {
            let _ = remove_file_if_exists(t);
        }
        return Err(e);
    }
    for (tmp, dest) in &built {
        std::fs::rename(tmp, dest)
            .map_err(|e| DriverError::io("cannot move the restored volume into place", dest, e))?;
        fsync_file_and_dir(dest)?;
    }
    tracing::info!(vm = %id, from = %file.display(), volumes = volumes.len(), "disks restored from a backup");
    Ok(())
}

/// Makes volume `volume_id` hold the content of the backup `file`: see
/// [`crate::Driver::volume_restore`]. The volume's spec is written as a
/// blank volume of `size_bytes` (its content no longer clones an image), so
/// the attach that follows finds the volume it expects.
pub(super) async fn volume_restore(
    shared: &Arc<Shared>,
    volume_id: uuid::Uuid,
    size_bytes: u64,
    file: &Path,
) -> Result<crate::VolumeInfo, DriverError> {
    let spec = crate::VolumeSpec {
        volume_id,
        size_bytes,
        image: None,
        image_format: None,
    };
    spec.validate()?;
    let invalid = |reason: String| DriverError::InvalidVolumeSpec {
        id: volume_id,
        reason,
    };
    if !file.is_absolute() || !file.is_file() {
        return Err(invalid(format!(
            "backup {} is not an existing absolute path",
            file.display()
        )));
    }
    let lock = shared.volume_locks.get(volume_id);
    let _one_at_a_time = lock.lock().await;
    if let Some(vm) = volume::locate(shared, volume_id)?.and_then(|l| l.vm) {
        return Err(DriverError::VolumeConflict {
            id: volume_id,
            reason: format!("it is attached to VM {vm}; restore it in place with that VM"),
        });
    }
    let dir = volume::volume_dir(shared, volume_id);
    std::fs::create_dir_all(&dir)
        .map_err(|e| DriverError::io("cannot create the volume directory", &dir, e))?;
    let dest = dir.join(volume::own_file(volume_id));
    let tmp = dir.join(format!("{volume_id}.restore.tmp"));
    if let Err(e) = write_from_backup(&shared.config.qemu_img, file, &tmp, size_bytes).await {
        let _ = remove_file_if_exists(&tmp);
        return Err(e);
    }
    super::layout::write_json(&dir.join(format!("{volume_id}.json")), "volume spec", &spec)?;
    std::fs::rename(&tmp, &dest)
        .map_err(|e| DriverError::io("cannot move the restored volume into place", &dest, e))?;
    fsync_file_and_dir(&dest)?;
    tracing::info!(volume = %volume_id, from = %file.display(), "volume written from a backup");
    volume::info(shared, volume_id)
        .await?
        .ok_or(DriverError::VolumeNotFound(volume_id))
}

/// A backup to restore must be an absolute path to an existing file.
pub(super) fn check_restore_source(id: VmId, file: &Path) -> Result<(), DriverError> {
    if !file.is_absolute() {
        return Err(DriverError::InvalidSpec {
            id,
            reason: format!("backup path {} is not absolute", file.display()),
        });
    }
    if !file.is_file() {
        return Err(DriverError::InvalidSpec {
            id,
            reason: format!("backup {} does not exist", file.display()),
        });
    }
    Ok(())
}

/// Writes `tmp`, a standalone qcow2, from the backup `file` read through its
/// chain, grown to `min_size` if smaller, and flushed. The caller renames it
/// into place (or removes it on failure).
async fn write_from_backup(
    qemu_img: &Path,
    file: &Path,
    tmp: &Path,
    min_size: u64,
) -> Result<(), DriverError> {
    remove_file_if_exists(tmp)?;
    run_qemu_img(
        qemu_img,
        &[
            "convert".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            file.as_os_str(),
            tmp.as_os_str(),
        ],
        &format!("restore {} into a disk", file.display()),
    )
    .await?;
    let size = super::image::virtual_size(qemu_img, tmp, crate::ImageFormat::Qcow2).await?;
    if min_size > size {
        let grow = min_size.to_string();
        run_qemu_img(
            qemu_img,
            &[
                "resize".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                tmp.as_os_str(),
                grow.as_ref(),
            ],
            &format!("grow the restored disk to {min_size} bytes"),
        )
        .await?;
    }
    std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| DriverError::io("cannot flush the restored disk", tmp, e))
}

/// Writes the VM's disk from `file` (read through its chain) into a
/// temporary file, grows it to the spec's size, and renames it to `disk`
/// (a layer file in the VM directory): a crash leaves either the old disk or
/// the new one. Caller holds `vm.op`.
pub(super) async fn build_restored_disk(
    shared: &Shared,
    spec: &VmSpec,
    file: &Path,
    paths: &VmPaths,
    disk: &Path,
) -> Result<(), DriverError> {
    let started = Instant::now();
    let qemu_img = &shared.config.qemu_img;
    let tmp = paths.disks().join("disk.qcow2.tmp");
    remove_file_if_exists(&tmp)?;
    let converted = write_from_backup(qemu_img, file, &tmp, spec.disk_bytes).await;
    if let Err(e) = converted {
        let _ = remove_file_if_exists(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, disk)
        .map_err(|e| DriverError::io("cannot move the restored disk into place", disk, e))?;
    fsync_file_and_dir(disk)?;
    tracing::info!(
        vm = %spec.id,
        ms = started.elapsed().as_millis() as u64,
        from = %file.display(),
        "disk written from a backup"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parent(dir: &Path) -> BackupParent {
        let file = dir.join("parent.qcow2");
        std::fs::write(&file, b"x").expect("write");
        BackupParent {
            backup_id: uuid::Uuid::new_v4(),
            file,
        }
    }

    fn bitmap(name: String, inconsistent: bool) -> Bitmap {
        Bitmap { name, inconsistent }
    }

    #[test]
    fn mode_follows_the_parent_bitmap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = parent(dir.path());
        assert_eq!(choose_mode(None, &[], &[]), (BackupMode::Full, None));
        let (mode, reason) = choose_mode(Some(&p), &[], &[]);
        assert_eq!(mode, BackupMode::Full);
        assert!(reason.expect("reason").contains("is missing"));
        let ok = [bitmap(bitmap_name(p.backup_id), false)];
        assert_eq!(
            choose_mode(Some(&p), &ok, &[]),
            (BackupMode::Incremental, None)
        );
        // Copies on older layers: consistent ones are merged, an
        // inconsistent one means writes may be missing.
        let copy = |inconsistent| OlderCopy {
            node: "disk0".into(),
            bitmap: bitmap(bitmap_name(p.backup_id), inconsistent),
        };
        assert_eq!(
            choose_mode(Some(&p), &ok, &[copy(false)]),
            (BackupMode::Incremental, None)
        );
        let (mode, reason) = choose_mode(Some(&p), &ok, &[copy(false), copy(true)]);
        assert_eq!(mode, BackupMode::Full);
        assert!(reason
            .expect("reason")
            .contains("inconsistent in a disk layer a snapshot froze"));
        // Only an active copy counts: after a revert the older one is no use.
        let (mode, reason) = choose_mode(Some(&p), &[], &[copy(false)]);
        assert_eq!(mode, BackupMode::Full);
        assert!(reason.expect("reason").contains("reverted to a snapshot"));
        let bad = [bitmap(bitmap_name(p.backup_id), true)];
        let (mode, reason) = choose_mode(Some(&p), &bad, &[]);
        assert_eq!(mode, BackupMode::Full);
        assert!(reason
            .expect("reason")
            .contains("inconsistent (QEMU did not close the disk cleanly)"));
        let mut gone = p.clone();
        gone.file = dir.path().join("gone.qcow2");
        let (mode, reason) = choose_mode(Some(&gone), &ok, &[]);
        assert_eq!(mode, BackupMode::Full);
        assert!(reason.expect("reason").contains("does not exist"));
    }

    #[test]
    fn strays_are_ours_but_the_kept_parent() {
        let keep = bitmap_name(uuid::Uuid::new_v4());
        let other = bitmap_name(uuid::Uuid::new_v4());
        let bitmaps = [
            bitmap(keep.clone(), false),
            bitmap(other.clone(), true),
            bitmap("someone-elses".into(), false),
        ];
        assert_eq!(stray_bitmaps(&bitmaps, Some(&keep)), vec![other.clone()]);
        assert_eq!(stray_bitmaps(&bitmaps, None), vec![keep, other]);
    }

    #[test]
    fn names_fit_qemu() {
        let id = uuid::Uuid::new_v4();
        let node = node_name(id);
        assert!(node.len() <= 31, "{node}");
        assert_eq!(node, node_name(id), "stable across attempts");
        assert_ne!(node, node_name(uuid::Uuid::new_v4()));
        assert!(job_id(id).ends_with(&id.to_string()));
    }

    #[test]
    fn job_errors_are_worded_for_operators() {
        let id = VmId::new();
        let e = job_failure(
            id,
            Path::new("/b/x.qcow2"),
            "No space left on device".into(),
        );
        assert!(e.to_string().contains("ran out of space"), "{e}");
        let e = job_failure(id, Path::new("/b/x.qcow2"), "Input/output error".into());
        assert!(e.to_string().contains("backup job failed"), "{e}");
    }

    #[test]
    fn own_layer_spec_is_json_without_backing() {
        let spec = own_layer_spec(Path::new("/b/a \"q\".qcow2")).expect("spec");
        let v: serde_json::Value =
            serde_json::from_str(spec.strip_prefix("json:").expect("prefix")).expect("json");
        assert_eq!(v["backing"], serde_json::Value::Null);
        assert_eq!(v["file"]["filename"], "/b/a \"q\".qcow2");
    }
}
