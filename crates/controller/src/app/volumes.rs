//! Data volumes: created as a record (its file is made on its host at its
//! first attach, blank or as a copy-on-write clone of an image), attached
//! and detached by jobs that hold the VM (hot-plugged while it runs), grown
//! and deleted through the host that holds the file.
//!
//! A volume in a shared storage pool (`pool` at create) has its file in the
//! pool, so it is attached on any host that reports the pool usable, and
//! grown or deleted through any such host that is up. Its size is claimed
//! against the pool (in the store, with the record) before any file exists
//! or grows, so a pool is never promised beyond what a host reported.

use std::time::Duration;

use stratus_api_types::agent::{AgentRequestKind, PoolAssignment};
use stratus_api_types::params::{PageParams, VolumeAttach, VolumeCreate, VolumeResize};
use stratus_api_types::views::{
    HostState, ImageState, VmState, Volume, VolumeOperation, VolumePage, VolumeStatus,
};
use stratus_common::{ByteCount, Error, HostId, StoragePoolId, VolumeId};
use stratus_datastore::model::{NewJob, VmRecord};
use stratus_datastore::{PageRequest, VolumeRecord};
use stratus_jobs::kinds::VmJobParams;
use stratus_jobs::JobKind;

use crate::app::{lookup, Actor, App};

/// Smallest volume.
const MIN_SIZE: u64 = 1 << 20;
/// How long a host may take to grow or delete a volume's file.
const HOST_TIMEOUT: Duration = Duration::from_secs(120);

pub async fn volume_create(app: &App, actor: &Actor, p: VolumeCreate) -> Result<Volume, Error> {
    actor.require_mutate()?;
    let project = lookup::project_for_create(app, actor, p.project.as_deref()).await?;
    if p.size_bytes < MIN_SIZE {
        return Err(Error::invalid(
            "size_bytes",
            format!("a volume is at least {}", ByteCount(MIN_SIZE)),
        ));
    }
    let image = match &p.image {
        Some(key) => {
            let img = lookup::image_field(app, actor, key, p.project.as_deref()).await?;
            if img.state != ImageState::Ready {
                return Err(Error::conflict(
                    "image_not_ready",
                    format!("image {:?} has no data yet", img.name),
                ));
            }
            if let Some(v) = img.virtual_size.filter(|v| *v > p.size_bytes) {
                return Err(Error::invalid(
                    "size_bytes",
                    format!(
                        "image {:?} is {}; the volume must be at least that large",
                        img.name,
                        ByteCount(v)
                    ),
                ));
            }
            Some(img.id)
        }
        None => None,
    };
    let pool = crate::app::pools::pool_for_vm(app, p.pool.as_deref())
        .await?
        .map(|(id, _)| id);
    Ok(app
        .ds
        .volume_create(project, p.name.as_str(), p.size_bytes, image, pool)
        .await?
        .into_view())
}

pub async fn volume_list(
    app: &App,
    actor: &Actor,
    project: Option<&str>,
    page: PageParams,
) -> Result<VolumePage, Error> {
    let page = PageRequest::parse(page.limit, page.cursor.as_deref())?;
    let project = lookup::project_filter(app, actor, project).await?;
    let p = app.ds.volume_list(project, &page).await?;
    Ok(VolumePage {
        items: p
            .items
            .into_iter()
            .filter(|v| actor.can_see(v.project_id))
            .map(VolumeRecord::into_view)
            .collect(),
        next_cursor: p.next_cursor,
    })
}

pub async fn volume_view(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
) -> Result<Volume, Error> {
    Ok(lookup::volume(app, actor, key, scope).await?.into_view())
}

fn job(kind: JobKind, vm: &VmRecord, volume: VolumeId) -> Result<NewJob, Error> {
    let params = VmJobParams {
        volume: Some(volume),
        ..VmJobParams::from_vm(vm.state, vm.desired_state)
    };
    crate::app::vms::vm_job(kind, vm, params)
}

pub async fn volume_attach(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
    p: VolumeAttach,
) -> Result<VolumeOperation, Error> {
    let vol = lookup::volume(app, actor, key, scope).await?;
    actor.require_mutate()?;
    let vm = lookup::vm(app, actor, &p.vm, Some(&vol.project_id.to_string())).await?;
    if vm.project_id != vol.project_id {
        return Err(Error::invalid(
            "vm",
            "the VM belongs to another project than the volume",
        ));
    }
    let Some(host) = vm.host_id else {
        return Err(Error::conflict(
            "vm_not_placed",
            format!("VM {:?} is not placed on a host yet", vm.name),
        ));
    };
    if !matches!(vm.state, VmState::Running | VmState::Stopped) {
        return Err(Error::conflict(
            "vm_not_ready",
            format!(
                "VM {:?} is {}; volumes attach to running or stopped VMs",
                vm.name,
                vm.state.as_str()
            ),
        ));
    }
    if let Some(pool) = vol.pool_id {
        // Any host that sees the pool can open the file; others cannot.
        let h = app.ds.host_get(host).await?;
        let pool_name = vol.pool_name.clone().unwrap_or_else(|| pool.to_string());
        if !h.pools.contains(&pool_name) {
            return Err(Error::conflict(
                "pool_not_on_host",
                format!(
                    "VM {:?} runs on host {:?}, which does not report storage pool {pool_name:?} \
                     usable; volume {:?} lives there: attach it to a VM on a host that sees \
                     the pool (`stratus pool show {pool_name}`)",
                    vm.name, h.name, vol.name
                ),
            ));
        }
    } else if let Some(h) = vol.host_id.filter(|h| *h != host) {
        return Err(Error::conflict(
            "volume_on_other_host",
            format!(
                "volume {:?} lives on host {h}; it can be attached only to VMs on that host",
                vol.name
            ),
        ));
    }
    let job = job(JobKind::VmVolumeAttach, &vm, vol.id)?;
    let job = app.ds.volume_attach_begin(vol.id, vm.id, &job).await?;
    app.job_waker.notify_one();
    Ok(VolumeOperation {
        volume: app.ds.volume_get(vol.id).await?.into_view(),
        job: job.into_view(vec![]),
    })
}

pub async fn volume_detach(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
) -> Result<VolumeOperation, Error> {
    let vol = lookup::volume(app, actor, key, scope).await?;
    actor.require_mutate()?;
    let (Some(vm), VolumeStatus::Attached) = (vol.vm_id, vol.status) else {
        return Err(Error::conflict(
            "volume_not_attached",
            format!("volume {:?} is {}", vol.name, status_text(vol.status)),
        ));
    };
    let vm = app.ds.vm_get(vm).await?;
    let job = job(JobKind::VmVolumeDetach, &vm, vol.id)?;
    let job = app.ds.volume_detach_begin(vol.id, vm.id, &job).await?;
    app.job_waker.notify_one();
    Ok(VolumeOperation {
        volume: app.ds.volume_get(vol.id).await?.into_view(),
        job: job.into_view(vec![]),
    })
}

/// Snapshots do not cover volumes in shared pools yet: their layers would
/// be pool files that only one host's records describe (the host refuses
/// too; refused here it is a clear 409 rather than a failed job).
pub(crate) async fn refuse_snapshot_of_pool_volumes(app: &App, vm: &VmRecord) -> Result<(), Error> {
    if let Some(v) = app
        .ds
        .volumes_of_vm(vm.id)
        .await?
        .into_iter()
        .find(|v| v.pool_id.is_some())
    {
        return Err(Error::conflict(
            "volume_in_pool",
            format!(
                "volume {:?} attached to VM {:?} is in storage pool {:?}; snapshots do not cover \
                 pool volumes yet: detach it, take the snapshot, attach it again",
                v.name,
                vm.name,
                v.pool_name.unwrap_or_default()
            ),
        ));
    }
    Ok(())
}

fn status_text(s: VolumeStatus) -> &'static str {
    match s {
        VolumeStatus::Available => "not attached",
        VolumeStatus::Attaching => "being attached",
        VolumeStatus::Attached => "attached",
        VolumeStatus::Detaching => "being detached",
    }
}

/// The host to reach the volume's file through, and the pool to tell it
/// of: `None` while the volume has no file. A local volume's file is on
/// its host, which must be up. A pool volume attached to a VM is reached
/// through the VM's host (it may have it open); a detached one through its
/// last host if that is up and sees the pool, else any host that does.
async fn file_host(
    app: &App,
    vol: &VolumeRecord,
) -> Result<Option<(HostId, Option<PoolAssignment>)>, Error> {
    let Some(last) = vol.host_id else {
        return Ok(None);
    };
    let Some(pool) = vol.pool_id else {
        return if app.ds.host_get(last).await?.state == HostState::Up {
            Ok(Some((last, None)))
        } else {
            Err(Error::conflict(
                "host_unavailable",
                "the host holding the volume's file is not up",
            ))
        };
    };
    let assignment = pool_assignment(app, pool).await?;
    if vol.vm_id.is_some() {
        return if app.ds.host_get(last).await?.state == HostState::Up {
            Ok(Some((last, Some(assignment))))
        } else {
            Err(Error::conflict(
                "host_unavailable",
                "the host of the VM the volume is attached to is not up",
            ))
        };
    }
    match pool_host(app, pool, Some(last)).await? {
        Some(h) => Ok(Some((h, Some(assignment)))),
        None => Err(Error::conflict(
            "pool_unreachable",
            format!(
                "no host that is up sees storage pool {:?}, which holds volume {:?}'s file \
                 (`stratus pool show {}` lists each host's view)",
                assignment.name, vol.name, assignment.name
            ),
        )),
    }
}

/// A host that is up and reports the pool usable, `preferred` first.
async fn pool_host(
    app: &App,
    pool: StoragePoolId,
    preferred: Option<HostId>,
) -> Result<Option<HostId>, Error> {
    let seeing: Vec<HostId> = app
        .ds
        .pool_hosts(pool)
        .await?
        .into_iter()
        .filter(|h| h.error.is_none())
        .map(|h| h.host_id)
        .collect();
    let mut candidates = Vec::with_capacity(seeing.len());
    if let Some(p) = preferred.filter(|p| seeing.contains(p)) {
        candidates.push(p);
    }
    candidates.extend(seeing.iter().copied().filter(|h| Some(*h) != preferred));
    for h in candidates {
        if app.ds.host_get(h).await?.state == HostState::Up {
            return Ok(Some(h));
        }
    }
    Ok(None)
}

/// The pool as a host is told of it.
async fn pool_assignment(app: &App, pool: StoragePoolId) -> Result<PoolAssignment, Error> {
    let p = app.ds.pool_get(pool).await?;
    Ok(PoolAssignment {
        id: p.id,
        name: p.name,
        path: p.path,
    })
}

/// Grows a volume (live when attached to a running VM; the guest sees the
/// new size).
pub async fn volume_resize(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
    p: VolumeResize,
) -> Result<Volume, Error> {
    let vol = lookup::volume(app, actor, key, scope).await?;
    actor.require_mutate()?;
    if p.size_bytes < vol.size_bytes {
        return Err(Error::invalid(
            "size_bytes",
            format!(
                "volumes only grow: {:?} is {} already",
                vol.name,
                ByteCount(vol.size_bytes)
            ),
        ));
    }
    if matches!(
        vol.status,
        VolumeStatus::Attaching | VolumeStatus::Detaching
    ) {
        return Err(Error::conflict(
            "volume_busy",
            format!("volume {:?} is {}", vol.name, status_text(vol.status)),
        ));
    }
    let host = file_host(app, &vol).await?;
    // The growth is the pool's before the file grows: a full pool refuses
    // here, with the file as it was.
    if let Some(pool) = vol.pool_id {
        app.ds
            .volume_pool_claim(pool, vol.size_bytes, p.size_bytes)
            .await?;
    }
    let growth = p.size_bytes.saturating_sub(vol.size_bytes);
    if let Some((host, pool)) = host {
        let request = AgentRequestKind::VolumeResize {
            volume_id: vol.id.as_uuid(),
            size_bytes: p.size_bytes,
            pool,
        };
        if let Err(e) = crate::app::agent::host_request(
            app,
            host,
            vol.vm_id,
            "volume_resize",
            &request,
            HOST_TIMEOUT,
        )
        .await
        {
            give_back(app, &vol, growth).await;
            return Err(e);
        }
    }
    if let Err(e) = app.ds.volume_set_size(vol.id, p.size_bytes).await {
        give_back(app, &vol, growth).await;
        return Err(e);
    }
    Ok(app.ds.volume_get(vol.id).await?.into_view())
}

/// Gives a failed resize's claim back to the volume's pool (logged if even
/// that fails: the pool then shows more allocated than it holds, which
/// errs on the safe side).
async fn give_back(app: &App, vol: &VolumeRecord, growth: u64) {
    if let Some(pool) = vol.pool_id {
        if let Err(e) = app.ds.volume_pool_release(pool, growth).await {
            tracing::warn!(volume = %vol.id, error = %e, "cannot give a failed resize's claim back to the pool");
        }
    }
}

/// Deletes a volume that is not attached (its file on its host, or in its
/// pool, with it); a pool volume's size goes back to the pool.
pub async fn volume_delete(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
) -> Result<(), Error> {
    let vol = lookup::volume(app, actor, key, scope).await?;
    actor.require_mutate()?;
    if vol.vm_id.is_some() || vol.status != VolumeStatus::Available {
        return Err(Error::conflict(
            "volume_attached",
            format!(
                "volume {:?} is {}; detach it first",
                vol.name,
                status_text(vol.status)
            ),
        ));
    }
    let target = match (file_host(app, &vol).await?, vol.pool_id) {
        // No host on record, yet an attach that failed after its host made
        // the file leaves one in the pool: removed through any host that
        // sees the pool, if one is up (removing an absent file succeeds).
        (None, Some(pool)) => match pool_host(app, pool, None).await? {
            Some(h) => Some((h, Some(pool_assignment(app, pool).await?))),
            None => None,
        },
        (found, _) => found,
    };
    if let Some((host, pool)) = target {
        let request = AgentRequestKind::VolumeDelete {
            volume_id: vol.id.as_uuid(),
            pool,
        };
        crate::app::agent::host_request(app, host, None, "volume_delete", &request, HOST_TIMEOUT)
            .await?;
    }
    app.ds.volume_delete(vol.id).await
}
