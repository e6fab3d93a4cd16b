//! Images: registration by path (admins) or upload, listing, deletion.

use std::collections::HashSet;
use std::ops::Not;
use std::path::Path;
use std::sync::Mutex;

use bytes::Bytes;
use futures::Stream;
use stratus_api_types::agent::ImagePart;
use stratus_api_types::params::{ImageCreate, ImageFilter, PageParams};
use stratus_api_types::views::{Image, ImagePage, ImageState, ImageVisibility};
use stratus_common::{Error, ImageId};
use stratus_datastore::{ImageScope, PageRequest};

use crate::app::{lookup, Actor, App};

/// Images with an upload in progress in this controller: a second upload to
/// the same image meanwhile is refused rather than raced.
static UPLOADING: Mutex<Option<HashSet<ImageId>>> = Mutex::new(None);

struct UploadGuard(ImageId);

impl UploadGuard {
    fn take(id: ImageId) -> Result<Self, Error> {
        let mut set = UPLOADING.lock().unwrap_or_else(|p| p.into_inner());
        if !set.get_or_insert_with(HashSet::new).insert(id) {
            return Err(Error::conflict(
                "upload_in_progress",
                "another upload to this image is in progress",
            ));
        }
        Ok(UploadGuard(id))
    }
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        let mut set = UPLOADING.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = set.as_mut() {
            s.remove(&self.0);
        }
    }
}

pub async fn image_create(app: &App, actor: &Actor, p: ImageCreate) -> Result<Image, Error> {
    actor.require_mutate()?;
    let project = lookup::project_for_create(app, actor, p.project.as_deref()).await?;
    let visibility = p.visibility.unwrap_or(ImageVisibility::Private);
    if visibility == ImageVisibility::Public {
        actor.require_admin("create public images")?;
    }
    let id = ImageId::new();
    let boot_files = p.kernel_path.is_some() || p.initrd_path.is_some();
    if boot_files && p.path.is_none() {
        return Err(Error::invalid(
            "kernel_path",
            "kernel boot files are registered together with the disk (`path`)",
        ));
    }
    if p.initrd_path.is_some() && p.kernel_path.is_none() {
        return Err(Error::invalid(
            "initrd_path",
            "an initrd needs a kernel (`kernel_path`)",
        ));
    }
    if p.cmdline.as_ref().is_some_and(|c| c.len() > 4096) {
        return Err(Error::invalid(
            "cmdline",
            "cmdline is limited to 4096 bytes",
        ));
    }
    let Some(path) = p.path else {
        return Ok(app
            .ds
            .image_create(id, project, p.name.as_str(), visibility, None)
            .await?
            .into_view());
    };
    actor.require_admin("register images from a path on the controller host")?;
    // Refuse a taken name before copying gigabytes; the insert below still
    // guards against a race.
    if app
        .ds
        .image_list(
            ImageScope::All,
            Some(project),
            Some(p.name.as_str()),
            None,
            &PageRequest::first(1),
        )
        .await?
        .items
        .is_empty()
        .not()
    {
        return Err(Error::conflict(
            "name_in_use",
            format!(
                "an image named {:?} already exists in this project",
                p.name.as_str()
            ),
        ));
    }
    let result = async {
        let data = app
            .images
            .import_path(id, Path::new(&path), p.format)
            .await?;
        let kernel = match &p.kernel_path {
            Some(k) => Some(
                app.images
                    .import_boot_file(id, ImagePart::Kernel, Path::new(k), "kernel_path")
                    .await?,
            ),
            None => None,
        };
        let initrd = match &p.initrd_path {
            Some(i) => Some(
                app.images
                    .import_boot_file(id, ImagePart::Initrd, Path::new(i), "initrd_path")
                    .await?,
            ),
            None => None,
        };
        let cmdline = kernel.as_ref().map(|_| {
            let c = p.cmdline.clone().unwrap_or_default();
            if c.split_whitespace().any(|w| w.starts_with("console=")) {
                c
            } else {
                format!("console=ttyS0 {c}").trim().to_string()
            }
        });
        app.ds
            .image_create(id, project, p.name.as_str(), visibility, Some(&data))
            .await?;
        if kernel.is_some() {
            app.ds
                .image_set_boot(id, kernel.as_deref(), initrd.as_deref(), cmdline.as_deref())
                .await?;
        }
        app.ds.image_get(id).await
    }
    .await;
    match result {
        Ok(rec) => Ok(rec.into_view()),
        Err(e) => {
            // Nothing half-registered: the row (if any) and every file go.
            if !matches!(
                e,
                Error::Conflict {
                    code: "name_in_use",
                    ..
                }
            ) {
                let _ = app.ds.image_delete(id).await;
            }
            app.images.remove(id);
            Err(e)
        }
    }
}

pub async fn image_upload<S, E>(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
    body: S,
) -> Result<Image, Error>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let img = lookup::image(app, actor, key, scope).await?;
    actor.require_mutate()?;
    if !actor.can_see(img.project_id) {
        return Err(Error::forbidden("the image belongs to another project"));
    }
    if img.state != ImageState::Pending {
        return Err(Error::conflict(
            "image_not_pending",
            "the image already has its data",
        ));
    }
    let _guard = UploadGuard::take(img.id)?;
    let data = app.images.import_stream(img.id, body, None).await?;
    match app.ds.image_set_ready(img.id, &data).await {
        Ok(rec) => Ok(rec.into_view()),
        Err(e) => {
            app.images.remove(img.id);
            Err(e)
        }
    }
}

pub async fn image_list(
    app: &App,
    actor: &Actor,
    f: ImageFilter,
    page: PageParams,
) -> Result<ImagePage, Error> {
    let page = PageRequest::parse(page.limit, page.cursor.as_deref())?;
    let project = match f.project.as_deref() {
        Some(k) => Some(lookup::project(app, actor, k).await?.id),
        None => None,
    };
    let scope = match actor.own_project() {
        Some(p) => ImageScope::Project(p),
        None => ImageScope::All,
    };
    let p = app
        .ds
        .image_list(scope, project, f.name.as_deref(), f.state, &page)
        .await?;
    Ok(ImagePage {
        items: p.items.into_iter().map(|r| r.into_view()).collect(),
        next_cursor: p.next_cursor,
    })
}

pub async fn image_view(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
) -> Result<Image, Error> {
    Ok(lookup::image(app, actor, key, scope).await?.into_view())
}

pub async fn image_delete(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
) -> Result<(), Error> {
    let img = lookup::image(app, actor, key, scope).await?;
    actor.require_mutate()?;
    if !actor.can_see(img.project_id) {
        return Err(Error::forbidden("the image belongs to another project"));
    }
    app.ds.image_delete(img.id).await?;
    app.images.remove(img.id);
    Ok(())
}
