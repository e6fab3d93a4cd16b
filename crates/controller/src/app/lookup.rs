//! Name-or-id resolution, scoped to what the actor can see.
//!
//! Names start with a letter and ids are UUIDs, so a key that parses as a
//! UUID is an id and anything else is a name. Whatever is not visible to the
//! actor is `not_found`, with the key the caller gave.

use stratus_common::{
    Error, FlavorId, HostId, ImageId, JobId, ProjectId, ResourceKind, ServerGroupId, VmId,
};
use stratus_datastore::model::{
    FlavorRecord, HostRecord, ImageRecord, JobRecord, ProjectRecord, ServerGroupRecord, VmRecord,
};
use stratus_datastore::ImageScope;
use uuid::Uuid;

use crate::app::{Actor, App};

fn as_id(key: &str) -> Option<Uuid> {
    Uuid::parse_str(key).ok()
}

/// Maps "not found by id" to "not found by the key the caller gave".
fn keyed<T>(r: Result<T, Error>, kind: ResourceKind, key: &str) -> Result<T, Error> {
    r.map_err(|e| match e {
        Error::NotFound { .. } => Error::not_found(kind, key),
        other => other,
    })
}

pub(crate) async fn project(app: &App, actor: &Actor, key: &str) -> Result<ProjectRecord, Error> {
    let p = match as_id(key) {
        Some(id) => keyed(
            app.ds.project_get(ProjectId(id)).await,
            ResourceKind::Project,
            key,
        )?,
        None => app.ds.project_get_by_name(key).await?,
    };
    if actor.can_see(p.id) {
        Ok(p)
    } else {
        Err(Error::not_found(ResourceKind::Project, key))
    }
}

/// The project a new resource goes in: the caller's own, or the one named
/// (which for non-admins must be their own).
pub(crate) async fn project_for_create(
    app: &App,
    actor: &Actor,
    given: Option<&str>,
) -> Result<ProjectId, Error> {
    match (actor.own_project(), given) {
        (Some(own), None) => Ok(own),
        (_, Some(key)) => {
            let p = project(app, actor, key).await.map_err(|e| match e {
                Error::NotFound { .. } => {
                    Error::invalid("project", format!("project {key:?} not found"))
                }
                other => other,
            })?;
            Ok(p.id)
        }
        (None, None) => Err(Error::invalid(
            "project",
            "admin tokens span projects, so `project` must name the project to create in",
        )),
    }
}

/// The project a list is confined to: the one named (if visible), else the
/// caller's own; `None` (all projects) only for admins naming none.
pub(crate) async fn project_filter(
    app: &App,
    actor: &Actor,
    given: Option<&str>,
) -> Result<Option<ProjectId>, Error> {
    match given {
        Some(key) => Ok(Some(project(app, actor, key).await?.id)),
        None => Ok(actor.own_project()),
    }
}

pub(crate) async fn vm(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
) -> Result<VmRecord, Error> {
    if let Some(id) = as_id(key) {
        let vm = keyed(app.ds.vm_get(VmId(id)).await, ResourceKind::Vm, key)?;
        return if actor.can_see(vm.project_id) {
            Ok(vm)
        } else {
            Err(Error::not_found(ResourceKind::Vm, key))
        };
    }
    let project = project_filter(app, actor, scope).await?;
    let mut found = app.ds.vm_find_by_name(project, key).await?;
    match found.len() {
        0 => Err(Error::not_found(ResourceKind::Vm, key)),
        1 => Ok(found.remove(0)),
        n => Err(Error::invalid(
            "project",
            format!(
                "{n} VMs in different projects are named {key:?}; name the project or use the id"
            ),
        )),
    }
}

pub(crate) async fn image(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
) -> Result<ImageRecord, Error> {
    let visible = |i: &ImageRecord| {
        actor.can_see(i.project_id)
            || i.visibility == stratus_api_types::views::ImageVisibility::Public
    };
    if let Some(id) = as_id(key) {
        let img = keyed(
            app.ds.image_get(ImageId(id)).await,
            ResourceKind::Image,
            key,
        )?;
        return if visible(&img) {
            Ok(img)
        } else {
            Err(Error::not_found(ResourceKind::Image, key))
        };
    }
    let scope = match scope {
        Some(p) => ImageScope::Project(project(app, actor, p).await?.id),
        None => match actor.own_project() {
            Some(p) => ImageScope::Project(p),
            None => ImageScope::All,
        },
    };
    let mut found = app.ds.image_find_by_name(scope, key).await?;
    if let ImageScope::Project(p) = scope {
        // An image of the project itself shadows public images of that name.
        if found.first().is_some_and(|i| i.project_id == p) {
            found.truncate(1);
        }
    }
    match found.len() {
        0 => Err(Error::not_found(ResourceKind::Image, key)),
        1 => Ok(found.remove(0)),
        n => Err(Error::invalid(
            "project",
            format!("{n} images in different projects are named {key:?}; name the project or use the id"),
        )),
    }
}

pub(crate) async fn flavor(app: &App, key: &str) -> Result<FlavorRecord, Error> {
    match as_id(key) {
        Some(id) => keyed(
            app.ds.flavor_get(FlavorId(id)).await,
            ResourceKind::Flavor,
            key,
        ),
        None => app.ds.flavor_get_by_name(key).await,
    }
}

pub(crate) async fn host(app: &App, key: &str) -> Result<HostRecord, Error> {
    match as_id(key) {
        Some(id) => keyed(app.ds.host_get(HostId(id)).await, ResourceKind::Host, key),
        None => app.ds.host_get_by_name(key).await,
    }
}

pub(crate) async fn job(app: &App, actor: &Actor, key: &str) -> Result<JobRecord, Error> {
    let Some(id) = as_id(key) else {
        return Err(Error::invalid(
            "job",
            format!("{key:?} is not a job id (jobs have no names)"),
        ));
    };
    let job = keyed(app.ds.job_get(JobId(id)).await, ResourceKind::Job, key)?;
    let visible = match job.project_id {
        Some(p) => actor.can_see(p),
        None => actor.is_admin(),
    };
    if visible {
        Ok(job)
    } else {
        Err(Error::not_found(ResourceKind::Job, key))
    }
}

/// A server group by id, or by name within `project` (or, for admins with
/// no project, across projects when the name is unique).
pub(crate) async fn server_group(
    app: &App,
    actor: &Actor,
    key: &str,
    project: Option<ProjectId>,
) -> Result<ServerGroupRecord, Error> {
    if let Some(id) = as_id(key) {
        let g = keyed(
            app.ds.server_group_get(ServerGroupId(id)).await,
            ResourceKind::ServerGroup,
            key,
        )?;
        return if actor.can_see(g.project_id) {
            Ok(g)
        } else {
            Err(Error::not_found(ResourceKind::ServerGroup, key))
        };
    }
    let project = project.or(actor.own_project());
    let mut found = app.ds.server_group_find_by_name(project, key).await?;
    found.retain(|g| actor.can_see(g.project_id));
    match found.len() {
        0 => Err(Error::not_found(ResourceKind::ServerGroup, key)),
        1 => Ok(found.remove(0)),
        n => Err(Error::invalid(
            "project",
            format!(
                "{n} server groups in different projects are named {key:?}; name the project or use the id"
            ),
        )),
    }
}

/// A backup target by name or id (targets are shared by every project).
pub(crate) async fn backup_target(
    app: &App,
    key: &str,
) -> Result<stratus_datastore::BackupTargetRecord, Error> {
    match as_id(key) {
        Some(id) => keyed(
            app.ds
                .backup_target_get(stratus_common::BackupTargetId(id))
                .await,
            ResourceKind::BackupTarget,
            key,
        ),
        None => app
            .ds
            .backup_target_by_name(key)
            .await?
            .ok_or_else(|| Error::not_found(ResourceKind::BackupTarget, key)),
    }
}

/// A backup by id, if the actor can see its project.
pub(crate) async fn backup(
    app: &App,
    actor: &Actor,
    key: &str,
) -> Result<stratus_datastore::BackupRecord, Error> {
    let Some(id) = as_id(key) else {
        return Err(Error::invalid("backup", "a backup is named by its id"));
    };
    let b = keyed(
        app.ds.backup_get(stratus_common::BackupId(id)).await,
        ResourceKind::Backup,
        key,
    )?;
    if actor.can_see(b.project_id) {
        Ok(b)
    } else {
        Err(Error::not_found(ResourceKind::Backup, key))
    }
}

/// A volume by name or id, in the projects the actor can see.
pub(crate) async fn volume(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
) -> Result<stratus_datastore::VolumeRecord, Error> {
    if let Some(id) = as_id(key) {
        let v = keyed(
            app.ds.volume_get(stratus_common::VolumeId(id)).await,
            ResourceKind::Volume,
            key,
        )?;
        return if actor.can_see(v.project_id) {
            Ok(v)
        } else {
            Err(Error::not_found(ResourceKind::Volume, key))
        };
    }
    let project = project_filter(app, actor, scope).await?;
    let mut found = app.ds.volume_find_by_name(project, key).await?;
    found.retain(|v| actor.can_see(v.project_id));
    match found.len() {
        0 => Err(Error::not_found(ResourceKind::Volume, key)),
        1 => Ok(found.remove(0)),
        n => Err(Error::invalid(
            "project",
            format!("{n} volumes in different projects are named {key:?}; name the project or use the id"),
        )),
    }
}

/// An image named in a request body's `image` field: one the actor cannot
/// see is that field's fault (`400`), not a missing resource (`404`).
pub(crate) async fn image_field(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
) -> Result<ImageRecord, Error> {
    image(app, actor, key, scope).await.map_err(|e| match e {
        Error::NotFound { .. } => Error::invalid("image", format!("image {key:?} not found")),
        other => other,
    })
}

/// A shared storage pool by name or id (pools are shared by every project).
pub(crate) async fn pool(
    app: &App,
    key: &str,
) -> Result<stratus_datastore::StoragePoolRecord, Error> {
    match as_id(key) {
        Some(id) => keyed(
            app.ds.pool_get(stratus_common::StoragePoolId(id)).await,
            ResourceKind::StoragePool,
            key,
        ),
        None => app
            .ds
            .pool_by_name(key)
            .await?
            .ok_or_else(|| Error::not_found(ResourceKind::StoragePool, key)),
    }
}
