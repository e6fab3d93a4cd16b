//! Backups: targets (directories every host sees), taking a backup (intent
//! first: the record, the job and the VM held in one transaction, then the
//! `vm_backup` saga), listing, verifying (the host reads the file back) and
//! restoring into a new VM or over the VM it was taken of.

use std::path::Path;
use std::time::Duration;

use stratus_api_types::agent::{
    AgentRequestKind, BackupChecked, BackupChildRef, VolumeBackupDelete,
};
use stratus_api_types::params::{
    BackupCreate, BackupFilter, BackupPolicySet, BackupRestore, BackupTargetCreate, PageParams,
    VmCreate,
};
use stratus_api_types::views::{
    Backup, BackupMode, BackupOperation, BackupPage, BackupPolicy, BackupStatus, BackupTarget,
    BackupVerification, HostState, VmDesiredState, VmOperation, VmState,
};
use stratus_common::{BackupId, Error, HostId, ResourceKind, VmId};
use stratus_datastore::model::VmRecord;
use stratus_datastore::{
    BackupListFilter, BackupPolicyRecord, BackupRecord, BackupTargetRecord, NewBackup, PageRequest,
    VolumeMerged,
};
use stratus_jobs::kinds::{RestoreParams, VmJobParams};
use stratus_jobs::JobKind;

use crate::app::{lookup, Actor, App};

/// Longest backup target path.
const MAX_PATH: usize = 1024;
/// How long a host may take over a verification or a delete (a merge).
const HOST_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

pub async fn backup_target_create(
    app: &App,
    actor: &Actor,
    p: BackupTargetCreate,
) -> Result<BackupTarget, Error> {
    actor.require_admin("create backup targets")?;
    let path = shared_dir_path(&p.path)?;
    Ok(app
        .ds
        .backup_target_create(p.name.as_str(), path)
        .await?
        .into_view())
}

pub async fn backup_target_list(app: &App) -> Result<Vec<BackupTarget>, Error> {
    Ok(app
        .ds
        .backup_target_list()
        .await?
        .into_iter()
        .map(BackupTargetRecord::into_view)
        .collect())
}

pub async fn backup_target_delete(app: &App, actor: &Actor, key: &str) -> Result<(), Error> {
    actor.require_admin("delete backup targets")?;
    let t = lookup::backup_target(app, key).await?;
    app.ds.backup_target_delete(t.id).await
}

/// A directory every host mounts at the same path (a backup target, a
/// storage pool), as given by the operator: absolute, bounded, no `..`;
/// without its trailing slashes.
pub(crate) fn shared_dir_path(raw: &str) -> Result<&str, Error> {
    let path = raw.trim_end_matches('/');
    let bad = |why: &str| Err(Error::invalid("path", format!("path {raw:?} {why}")));
    if path.is_empty() || !Path::new(path).is_absolute() {
        return bad("is not an absolute directory below /");
    }
    if path.len() > MAX_PATH {
        return bad(&format!("is longer than {MAX_PATH} bytes"));
    }
    if path.chars().any(char::is_control) || path.split('/').any(|c| c == "..") {
        return bad("contains control characters or `..`");
    }
    Ok(path)
}

/// The target a backup goes to: the one named, else the one the VM's last
/// backup went to, else the only one there is.
async fn choose_target(
    app: &App,
    vm: VmId,
    named: Option<&str>,
) -> Result<BackupTargetRecord, Error> {
    if let Some(key) = named {
        return lookup::backup_target(app, key).await.map_err(|e| match e {
            Error::NotFound { .. } => {
                Error::invalid("target", format!("backup target {key:?} not found"))
            }
            other => other,
        });
    }
    if let Some(last) = app.ds.backup_latest_succeeded(vm, None).await? {
        return app.ds.backup_target_get(last.target_id).await;
    }
    let mut all = app.ds.backup_target_list().await?;
    match all.len() {
        0 => Err(Error::conflict(
            "no_backup_target",
            "there is no backup target; an administrator creates one with \
             `stratus backup target create NAME PATH`",
        )),
        1 => Ok(all.remove(0)),
        n => Err(Error::invalid(
            "target",
            format!("there are {n} backup targets; name one"),
        )),
    }
}

/// Takes a backup of a running VM: incremental to its last restore point on
/// the same target unless `full` is asked or there is none.
pub async fn backup_create(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
    p: BackupCreate,
) -> Result<BackupOperation, Error> {
    let vm = lookup::vm(app, actor, key, scope).await?;
    actor.require_mutate()?;
    let target = p.target.as_deref();
    backup_start(app, &vm, p.full, target).await
}

/// Takes a backup of `vm` (for the API, and for schedules).
pub(crate) async fn backup_start(
    app: &App,
    vm: &VmRecord,
    full: bool,
    target: Option<&str>,
) -> Result<BackupOperation, Error> {
    let (Some(host), VmState::Running) = (vm.host_id, vm.state) else {
        return Err(Error::conflict(
            "vm_not_running",
            format!(
                "VM {:?} is {}; backups are taken of running VMs (start it first)",
                vm.name,
                vm.state.as_str()
            ),
        ));
    };
    let target = choose_target(app, vm.id, target).await?;
    let parent = if full {
        None
    } else {
        app.ds
            .backup_latest_succeeded(vm.id, Some(target.id))
            .await?
    };
    let id = BackupId::new();
    let backup = NewBackup {
        id,
        project_id: vm.project_id,
        vm_id: vm.id,
        vm_name: vm.name.clone(),
        target_id: target.id,
        parent_id: parent.as_ref().map(|b| b.id),
        requested_mode: if parent.is_some() {
            BackupMode::Incremental
        } else {
            BackupMode::Full
        },
        file: format!("{}/{}/{}.qcow2", target.path, vm.id, id),
        host_id: Some(host),
        image_id: vm.image_id,
        flavor_id: vm.flavor_id,
        vcpus: vm.vcpus,
        memory_bytes: vm.memory_bytes,
        disk_bytes: vm.disk_bytes,
    };
    let job = crate::app::vms::vm_job(
        JobKind::VmBackup,
        vm,
        VmJobParams::from_vm(vm.state, vm.desired_state),
    )?;
    let (backup, job) = app.ds.backup_begin(&backup, &job).await?;
    app.job_waker.notify_one();
    Ok(BackupOperation {
        backup: backup.into_view(),
        job: job.into_view(vec![]),
    })
}

pub async fn backup_list(
    app: &App,
    actor: &Actor,
    f: BackupFilter,
    page: PageParams,
) -> Result<BackupPage, Error> {
    let page = PageRequest::parse(page.limit, page.cursor.as_deref())?;
    let project = lookup::project_filter(app, actor, f.project.as_deref()).await?;
    let vm = match f.vm.as_deref() {
        // A deleted VM's backups stay listable by its id.
        Some(key) => match uuid::Uuid::parse_str(key) {
            Ok(id) => Some(VmId(id)),
            Err(_) => Some(lookup::vm(app, actor, key, f.project.as_deref()).await?.id),
        },
        None => None,
    };
    let p = app
        .ds
        .backup_list(&BackupListFilter { project, vm }, &page)
        .await?;
    Ok(BackupPage {
        items: p
            .items
            .into_iter()
            .filter(|b| actor.can_see(b.project_id))
            .map(|b| b.into_view())
            .collect(),
        next_cursor: p.next_cursor,
    })
}

pub async fn backup_view(app: &App, actor: &Actor, key: &str) -> Result<Backup, Error> {
    Ok(lookup::backup(app, actor, key).await?.into_view())
}

/// Has a host read the backup back (checksum, `qemu-img check` over its
/// chain) and records the result.
pub async fn backup_verify(
    app: &App,
    actor: &Actor,
    key: &str,
) -> Result<BackupVerification, Error> {
    let b = lookup::backup(app, actor, key).await?;
    actor.require_mutate()?;
    let Some(recorded) = b
        .sha256
        .clone()
        .filter(|_| b.status == BackupStatus::Succeeded)
    else {
        return Err(Error::conflict(
            "backup_not_succeeded",
            "only a completed backup can be verified",
        ));
    };
    let host = backup_host(app, &b).await?;
    let request = AgentRequestKind::VerifyBackup {
        file: b.file.clone(),
        volume_files: b.volumes.iter().map(|v| v.file.clone()).collect(),
    };
    let answer = crate::app::agent::host_request(
        app,
        host,
        Some(b.vm_id),
        "verify_backup",
        &request,
        HOST_REQUEST_TIMEOUT,
    )
    .await
    .map_err(|e| match e {
        Error::Unprocessable { message, .. } => Error::unprocessable("verify_failed", message),
        other => other,
    })?;
    let checked: BackupChecked = answer
        .verified
        .ok_or_else(|| Error::internal("the host's verification could not be read"))?;
    let mut problems = checked.problems.clone();
    if checked.sha256 != recorded {
        problems.insert(
            0,
            format!(
                "the file's SHA-256 is {}, not the {} recorded when it was taken",
                checked.sha256, recorded
            ),
        );
    }
    // Every volume file of the restore point, alike.
    for v in &b.volumes {
        match checked.volumes.iter().find(|c| c.file == v.file) {
            Some(c) => {
                if c.sha256 != v.sha256 {
                    problems.push(format!(
                        "volume {:?}: the file {}'s SHA-256 is {}, not the {} recorded when it \
                         was taken",
                        v.volume_name, v.file, c.sha256, v.sha256
                    ));
                }
                problems.extend(
                    c.problems
                        .iter()
                        .map(|p| format!("volume {:?}: {p}", v.volume_name)),
                );
            }
            None => problems.push(format!(
                "volume {:?}: the host did not check its file {}",
                v.volume_name, v.file
            )),
        }
    }
    let ok = problems.is_empty();
    let b = app
        .ds
        .backup_record_verification(b.id, ok, &problems)
        .await?;
    Ok(BackupVerification {
        backup: b.into_view(),
        ok,
        sha256: checked.sha256,
        problems,
    })
}

/// The host that reads and writes a backup's files: the one that took it,
/// if it is up (every host sees the target; that one surely does).
async fn backup_host(app: &App, b: &BackupRecord) -> Result<HostId, Error> {
    match b.host_id {
        Some(h) if app.ds.host_get(h).await?.state == HostState::Up => Ok(h),
        _ => Err(Error::conflict(
            "host_unavailable",
            "the host that took the backup is not up, so it cannot reach its file",
        )),
    }
}

pub async fn backup_delete(app: &App, actor: &Actor, key: &str) -> Result<(), Error> {
    let b = lookup::backup(app, actor, key).await?;
    actor.require_mutate()?;
    delete_backup(app, b).await
}

/// Deletes a backup: a restore point is first merged into the restore
/// point built on it (so that one stays whole, see `qemu/prune.rs`); a
/// failed backup has no data and just goes.
pub(crate) async fn delete_backup(app: &App, b: BackupRecord) -> Result<(), Error> {
    let was = b.status;
    if was == BackupStatus::Running {
        return Err(Error::conflict(
            "backup_busy",
            "the backup is still being taken; cancel its job first",
        ));
    }
    let b = app.ds.backup_delete_begin(b.id).await?;
    if was == BackupStatus::Failed {
        return app
            .ds
            .backup_delete_finish(b.id, None, &[], b.parent_id)
            .await;
    }
    let outcome = async {
        let children: Vec<BackupRecord> = app
            .ds
            .backup_children(b.id)
            .await?
            .into_iter()
            .filter(|c| c.status == BackupStatus::Succeeded)
            .collect();
        if children.len() > 1 {
            return Err(Error::conflict(
                "backup_busy",
                "several restore points are built on this backup; delete the newer ones first",
            ));
        }
        let child = children.into_iter().next();
        let parent = match b.parent_id {
            Some(p) => Some(app.ds.backup_get(p).await?),
            None => None,
        };
        let host = backup_host(app, &b).await?;
        let volumes = volume_deletes(&b, child.as_ref(), parent.as_ref());
        let request = AgentRequestKind::DeleteBackup {
            file: b.file.clone(),
            child: child.as_ref().map(|c| BackupChildRef {
                file: c.file.clone(),
                new_backing: parent.as_ref().map(|p| p.file.clone()),
            }),
            volumes: volumes.clone(),
        };
        let answer = crate::app::agent::host_request(
            app,
            host,
            Some(b.vm_id),
            "delete_backup",
            &request,
            HOST_REQUEST_TIMEOUT,
        )
        .await?;
        let merged = match (&child, answer.pruned) {
            (Some(c), Some(figures)) => Some((c.id, figures)),
            (Some(_), None) => {
                return Err(Error::internal(
                    "the host merged the backup without its figures",
                ))
            }
            (None, _) => None,
        };
        // Each volume file merged into the child's: its new figures.
        let pruned = answer.pruned_volumes.unwrap_or_default();
        let mut child_volumes = Vec::new();
        for v in volumes.iter().filter(|v| v.child.is_some()) {
            let figures = pruned
                .iter()
                .find(|p| p.volume_id == v.volume_id)
                .ok_or_else(|| {
                    Error::internal("the host merged a volume's backup without its figures")
                })?;
            child_volumes.push(VolumeMerged {
                pruned: figures.clone(),
                now_full: v.child.as_ref().is_some_and(|c| c.new_backing.is_none()),
            });
        }
        app.ds
            .backup_delete_finish(
                b.id,
                merged.as_ref().map(|(id, f)| (*id, f)),
                &child_volumes,
                b.parent_id,
            )
            .await
    }
    .await;
    if outcome.is_err() {
        app.ds.backup_delete_abort(b.id, was).await?;
    }
    outcome
}

/// What becomes of each volume file of restore point `b` when it is
/// deleted. A file the child builds on (the child's file of the same volume
/// is incremental) is merged into it: the child's file then builds on the
/// parent's file of that volume if `b`'s was incremental to one, else stands
/// alone. A file nothing builds on (no child, the volume not in the child, or
/// the child's copy of it full) is just removed: a volume's file is only
/// ever the parent of the next restore point's file of that volume.
fn volume_deletes(
    b: &BackupRecord,
    child: Option<&BackupRecord>,
    parent: Option<&BackupRecord>,
) -> Vec<VolumeBackupDelete> {
    b.volumes
        .iter()
        .map(|v| {
            let child_file = child
                .and_then(|c| c.volume(v.volume_id))
                .filter(|c| c.mode == BackupMode::Incremental);
            let new_backing = match v.mode {
                BackupMode::Incremental => parent
                    .and_then(|p| p.volume(v.volume_id))
                    .map(|p| p.file.clone()),
                BackupMode::Full => None,
            };
            VolumeBackupDelete {
                volume_id: v.volume_id.as_uuid(),
                file: v.file.clone(),
                child: child_file.map(|c| BackupChildRef {
                    file: c.file.clone(),
                    new_backing,
                }),
            }
        })
        .collect()
}

const MIN_EVERY_SECS: u64 = 60;

pub async fn backup_policy_set(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
    p: BackupPolicySet,
) -> Result<BackupPolicy, Error> {
    let vm = lookup::vm(app, actor, key, scope).await?;
    actor.require_mutate()?;
    if p.every_secs.is_some_and(|s| s < MIN_EVERY_SECS) {
        return Err(Error::invalid(
            "every_secs",
            format!("backups are scheduled at most every {MIN_EVERY_SECS} s"),
        ));
    }
    let target = match p.target.as_deref() {
        Some(t) => Some(choose_target(app, vm.id, Some(t)).await?.id),
        None => None,
    };
    let rec = BackupPolicyRecord {
        vm_id: vm.id,
        project_id: vm.project_id,
        target_id: target,
        every_secs: p.every_secs,
        keep_last: p.keep_last,
        keep_daily: p.keep_daily,
        keep_weekly: p.keep_weekly,
        created_at: 0,
        updated_at: 0,
    };
    Ok(app.ds.backup_policy_set(&rec).await?.into_view())
}

pub async fn backup_policy_view(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
) -> Result<BackupPolicy, Error> {
    let vm = lookup::vm(app, actor, key, scope).await?;
    app.ds
        .backup_policy_get(vm.id)
        .await?
        .map(BackupPolicyRecord::into_view)
        .ok_or_else(|| Error::not_found(ResourceKind::BackupPolicy, key))
}

pub async fn backup_policy_delete(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
) -> Result<(), Error> {
    let vm = lookup::vm(app, actor, key, scope).await?;
    actor.require_mutate()?;
    if app.ds.backup_policy_delete(vm.id).await? {
        Ok(())
    } else {
        Err(Error::not_found(ResourceKind::BackupPolicy, key))
    }
}

pub async fn backup_policy_list(
    app: &App,
    actor: &Actor,
    project: Option<&str>,
) -> Result<Vec<BackupPolicy>, Error> {
    let project = lookup::project_filter(app, actor, project).await?;
    Ok(app
        .ds
        .backup_policy_list(project)
        .await?
        .into_iter()
        .filter(|p| actor.can_see(p.project_id))
        .map(BackupPolicyRecord::into_view)
        .collect())
}

/// Restores a backup into a new VM (`as_vm`) or over its own, stopped, VM
/// (`in_place`).
pub async fn backup_restore(
    app: &App,
    actor: &Actor,
    key: &str,
    p: BackupRestore,
) -> Result<VmOperation, Error> {
    let b = lookup::backup(app, actor, key).await?;
    actor.require_mutate()?;
    if b.status != BackupStatus::Succeeded {
        return Err(Error::conflict(
            "backup_not_succeeded",
            "only a completed backup is a restore point",
        ));
    }
    match (p.as_vm, p.in_place) {
        (Some(name), false) => {
            let create = VmCreate {
                name,
                project: Some(b.project_id.to_string()),
                flavor: b.flavor_id.to_string(),
                image: b.image_id.to_string(),
                start: p.start,
                zone: None,
                cluster: None,
                require_tags: vec![],
                forbid_tags: vec![],
                group: None,
                restart_policy: None,
                pool: None,
            };
            let volumes = restored_volumes(&b, create.name.as_str())?;
            let (_, op) = crate::app::vms::vm_create_from(
                app,
                actor,
                create,
                None,
                Some(b.file.clone()),
                &volumes,
            )
            .await?;
            Ok(op)
        }
        (None, true) => {
            if p.start.is_some() {
                return Err(Error::invalid(
                    "start",
                    "start applies to a new VM only; start the VM after an in-place restore",
                ));
            }
            restore_in_place(app, b).await
        }
        _ => Err(Error::invalid(
            "as_vm",
            "give exactly one of as_vm (a new VM's name) and in_place",
        )),
    }
}

/// The new volumes a restore into the new VM `vm_name` creates: one per
/// volume of the restore point, named `<vm_name>-<volume name>`, of the
/// volume's size, built from its file. A name that is no valid name (too
/// long) is refused before anything is written.
fn restored_volumes(
    b: &BackupRecord,
    vm_name: &str,
) -> Result<Vec<stratus_datastore::RestoredVolume>, Error> {
    b.volumes
        .iter()
        .map(|v| {
            let name = format!("{vm_name}-{}", v.volume_name);
            let name: stratus_common::Name = name.parse().map_err(|e| {
                Error::invalid(
                    "as_vm",
                    format!(
                        "the restored volume {:?} would be named {name:?}, which is no valid \
                         name ({e}); choose a shorter VM name",
                        v.volume_name
                    ),
                )
            })?;
            Ok(stratus_datastore::RestoredVolume {
                id: stratus_common::VolumeId::new(),
                name: name.as_str().to_string(),
                size_bytes: v.disk_bytes,
                file: v.file.clone(),
            })
        })
        .collect()
}

async fn restore_in_place(
    app: &App,
    b: stratus_datastore::BackupRecord,
) -> Result<VmOperation, Error> {
    let vm = app.ds.vm_get(b.vm_id).await.map_err(|e| match e {
        Error::NotFound { .. } => Error::conflict(
            "vm_gone",
            format!(
                "VM {:?} no longer exists; restore the backup into a new VM instead",
                b.vm_name
            ),
        ),
        other => other,
    })?;
    if vm.state != VmState::Stopped || vm.desired_state != VmDesiredState::Stopped {
        return Err(Error::conflict(
            "vm_not_stopped",
            format!(
                "VM {:?} is {}; stop it before restoring over its disk",
                vm.name,
                vm.state.as_str()
            ),
        ));
    }
    if vm.host_id.is_none() {
        return Err(Error::not_found(ResourceKind::Host, "of the VM"));
    }
    // Every volume of the restore point is rewritten with the disk: each
    // must still be attached to the VM.
    let attached = app.ds.volumes_of_vm(vm.id).await?;
    let gone: Vec<String> = b
        .volumes
        .iter()
        .filter(|v| !attached.iter().any(|a| a.id == v.volume_id))
        .map(|v| format!("{:?} ({})", v.volume_name, v.volume_id))
        .collect();
    if !gone.is_empty() {
        return Err(Error::conflict(
            "volume_not_attached",
            format!(
                "the backup covers volume(s) {} no longer attached to VM {:?}; attach them \
                 again, or restore the backup into a new VM with --as",
                gone.join(", "),
                vm.name
            ),
        ));
    }
    let params = VmJobParams {
        restore: Some(RestoreParams {
            backup_id: b.id,
            file: b.file.clone(),
        }),
        ..VmJobParams::from_vm(vm.state, vm.desired_state)
    };
    let job = crate::app::vms::vm_job(JobKind::VmRestore, &vm, params)?;
    let (vm, job) = app
        .ds
        .vm_begin_operation(vm.id, VmDesiredState::Stopped, VmState::Stopped, false, job)
        .await?;
    app.job_waker.notify_one();
    Ok(VmOperation {
        vm: vm.into_view(),
        job: job.into_view(vec![]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use stratus_common::{BackupTargetId, FlavorId, ImageId, JobId, ProjectId, VolumeId};
    use stratus_datastore::BackupVolumeRecord;

    fn point(
        id: BackupId,
        parent: Option<BackupId>,
        volumes: &[(VolumeId, BackupMode)],
    ) -> BackupRecord {
        BackupRecord {
            id,
            project_id: ProjectId::new(),
            vm_id: VmId::new(),
            vm_name: "web".into(),
            target_id: BackupTargetId::new(),
            parent_id: parent,
            requested_mode: BackupMode::Incremental,
            mode: Some(BackupMode::Incremental),
            fallback_reason: None,
            status: BackupStatus::Succeeded,
            error: None,
            file: format!("/b/{id}.qcow2"),
            host_id: None,
            job_id: JobId::new(),
            image_id: ImageId::new(),
            flavor_id: FlavorId::new(),
            vcpus: 1,
            memory_bytes: 1,
            disk_bytes: 1,
            data_bytes: Some(1),
            file_bytes: Some(1),
            sha256: Some("x".into()),
            created_at: 0,
            finished_at: None,
            verified_at: None,
            verify_ok: None,
            verify_problems: vec![],
            volumes: volumes
                .iter()
                .map(|(v, mode)| BackupVolumeRecord {
                    volume_id: *v,
                    volume_name: format!("vol-{v}"),
                    file: format!("/b/{id}.vol-{v}.qcow2"),
                    mode: *mode,
                    fallback_reason: None,
                    disk_bytes: 1,
                    data_bytes: 1,
                    file_bytes: 1,
                    sha256: "y".into(),
                })
                .collect(),
        }
    }

    /// Each volume file of a deleted restore point: merged into the child's
    /// file of that volume when the child builds on it (onto the parent's
    /// file when the deleted one was incremental, else standing alone),
    /// just removed when nothing builds on it.
    #[test]
    fn volume_files_merge_into_the_child_that_builds_on_them() {
        use BackupMode::{Full, Incremental};
        let (kept, attached_since, gone_in_child, refilled) = (
            VolumeId::new(),
            VolumeId::new(),
            VolumeId::new(),
            VolumeId::new(),
        );
        let (p, d, c) = (BackupId::new(), BackupId::new(), BackupId::new());
        let parent = point(
            p,
            None,
            &[(kept, Full), (gone_in_child, Full), (refilled, Full)],
        );
        let deleted = point(
            d,
            Some(p),
            &[
                (kept, Incremental),
                (attached_since, Full),
                (gone_in_child, Incremental),
                (refilled, Incremental),
            ],
        );
        // The child: `refilled` copied in full (its tracking was lost).
        let child = point(
            c,
            Some(d),
            &[
                (kept, Incremental),
                (attached_since, Incremental),
                (refilled, Full),
            ],
        );
        let plan = volume_deletes(&deleted, Some(&child), Some(&parent));
        let of = |v: VolumeId| {
            plan.iter()
                .find(|x| x.volume_id == v.as_uuid())
                .expect("every volume file of the deleted point is handled")
        };
        assert_eq!(plan.len(), 4);
        let k = of(kept).child.as_ref().expect("merged");
        assert_eq!(k.file, format!("/b/{c}.vol-{kept}.qcow2"));
        assert_eq!(k.new_backing, Some(format!("/b/{p}.vol-{kept}.qcow2")));
        let a = of(attached_since).child.as_ref().expect("merged");
        assert_eq!(
            a.new_backing, None,
            "the deleted file was full: the child stands alone"
        );
        assert!(
            of(gone_in_child).child.is_none(),
            "not in the child: removed"
        );
        assert!(
            of(refilled).child.is_none(),
            "the child's copy is full: removed"
        );
        assert_eq!(of(kept).file, format!("/b/{d}.vol-{kept}.qcow2"));
        // No child: every file just goes.
        assert!(volume_deletes(&deleted, None, Some(&parent))
            .iter()
            .all(|x| x.child.is_none()));
    }

    #[test]
    fn restored_volume_names_are_checked_before_anything_is_written() {
        let v = VolumeId::new();
        let b = point(BackupId::new(), None, &[(v, BackupMode::Full)]);
        let made = restored_volumes(&b, "new").expect("names");
        assert_eq!(made[0].name, format!("new-vol-{v}"));
        assert_eq!(made[0].file, b.volumes[0].file);
        let long = "x".repeat(40);
        let e = restored_volumes(&b, &long).expect_err("too long");
        assert_eq!(e.error_code(), "invalid_request");
    }
}
