//! Data volumes: created as a record (its file is made on its host at its
//! first attach, blank or as a copy-on-write clone of an image), attached
//! and detached by jobs that hold the VM (hot-plugged while it runs), grown
//! and deleted through the host that holds the file.

use std::time::Duration;

use stratus_api_types::agent::AgentRequestKind;
use stratus_api_types::params::{PageParams, VolumeAttach, VolumeCreate, VolumeResize};
use stratus_api_types::views::{
    HostState, ImageState, VmState, Volume, VolumeOperation, VolumePage, VolumeStatus,
};
use stratus_common::{ByteCount, Error, HostId, VolumeId};
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
    Ok(app
        .ds
        .volume_create(project, p.name.as_str(), p.size_bytes, image)
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
    if let Some(h) = vol.host_id.filter(|h| *h != host) {
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

fn status_text(s: VolumeStatus) -> &'static str {
    match s {
        VolumeStatus::Available => "not attached",
        VolumeStatus::Attaching => "being attached",
        VolumeStatus::Attached => "attached",
        VolumeStatus::Detaching => "being detached",
    }
}

/// The host holding the volume's file, if it has one and is up.
async fn file_host(app: &App, vol: &VolumeRecord) -> Result<Option<HostId>, Error> {
    match vol.host_id {
        None => Ok(None),
        Some(h) if app.ds.host_get(h).await?.state == HostState::Up => Ok(Some(h)),
        Some(_) => Err(Error::conflict(
            "host_unavailable",
            "the host holding the volume's file is not up",
        )),
    }
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
    if let Some(host) = file_host(app, &vol).await? {
        let request = AgentRequestKind::VolumeResize {
            volume_id: vol.id.as_uuid(),
            size_bytes: p.size_bytes,
        };
        crate::app::agent::host_request(
            app,
            host,
            vol.vm_id,
            "volume_resize",
            &request,
            HOST_TIMEOUT,
        )
        .await?;
    }
    app.ds.volume_set_size(vol.id, p.size_bytes).await?;
    Ok(app.ds.volume_get(vol.id).await?.into_view())
}

/// Deletes a volume that is not attached (its file on its host with it).
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
    if let Some(host) = file_host(app, &vol).await? {
        let request = AgentRequestKind::VolumeDelete {
            volume_id: vol.id.as_uuid(),
        };
        crate::app::agent::host_request(app, host, None, "volume_delete", &request, HOST_TIMEOUT)
            .await?;
    }
    app.ds.volume_delete(vol.id).await
}
