//! Images: registered disk images in the controller's image store.

use stratus_api_types::views::{ImageFormat, ImageState, ImageVisibility};
use stratus_common::time::now_micros;
use stratus_common::{Error, ImageId, ProjectId, ResourceKind};

use crate::db::{db_error, is_unique_violation};
use crate::model::{enum_str, i64_of, ImageRecord};
use crate::page::{ListQuery, Page, PageRequest};
use crate::Datastore;

pub(crate) const SELECT: &str =
    "SELECT id, project_id, name, visibility, state, format, virtual_size, file_size, \
                      sha256, kernel_sha256, initrd_sha256, cmdline, created_at FROM images";

/// What `qemu-img info` and the copy established about an image's file.
#[derive(Debug, Clone)]
pub struct ImageData {
    pub format: ImageFormat,
    pub virtual_size: u64,
    pub file_size: u64,
    pub sha256: String,
}

/// Which images a caller may see.
#[derive(Debug, Clone, Copy)]
pub enum ImageScope {
    /// Every image (admins).
    All,
    /// This project's images and public ones.
    Project(ProjectId),
}

impl Datastore {
    /// Records an image: `pending` without data, `ready` with it.
    pub async fn image_create(
        &self,
        id: ImageId,
        project_id: ProjectId,
        name: &str,
        visibility: ImageVisibility,
        data: Option<&ImageData>,
    ) -> Result<ImageRecord, Error> {
        let rec = ImageRecord {
            id,
            project_id,
            name: name.to_string(),
            visibility,
            state: if data.is_some() {
                ImageState::Ready
            } else {
                ImageState::Pending
            },
            format: data.map(|d| d.format),
            virtual_size: data.map(|d| d.virtual_size),
            file_size: data.map(|d| d.file_size),
            sha256: data.map(|d| d.sha256.clone()),
            kernel_sha256: None,
            initrd_sha256: None,
            cmdline: None,
            created_at: now_micros(),
        };
        sqlx::query(
            "INSERT INTO images (id, project_id, name, visibility, state, format, virtual_size, file_size, \
             sha256, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(rec.id.to_string())
        .bind(rec.project_id.to_string())
        .bind(&rec.name)
        .bind(enum_str(&rec.visibility))
        .bind(enum_str(&rec.state))
        .bind(rec.format.map(|f| f.as_str().to_string()))
        .bind(rec.virtual_size.map(i64_of))
        .bind(rec.file_size.map(i64_of))
        .bind(rec.sha256.clone())
        .bind(rec.created_at)
        .execute(&self.write)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                Error::conflict("name_in_use", format!("an image named {name:?} already exists in this project"))
            } else {
                db_error("creating an image", e)
            }
        })?;
        Ok(rec)
    }

    /// Marks a pending image ready with its data. Fails with a conflict if the
    /// image is not pending (a second upload).
    pub async fn image_set_ready(
        &self,
        id: ImageId,
        data: &ImageData,
    ) -> Result<ImageRecord, Error> {
        let done = sqlx::query(
            "UPDATE images SET state = 'ready', format = $1, virtual_size = $2, file_size = $3, sha256 = $4 \
             WHERE id = $5 AND state = 'pending'",
        )
        .bind(data.format.as_str())
        .bind(i64_of(data.virtual_size))
        .bind(i64_of(data.file_size))
        .bind(&data.sha256)
        .bind(id.to_string())
        .execute(&self.write)
        .await
        .map_err(|e| db_error("recording image data", e))?;
        if done.rows_affected() == 0 {
            return Err(Error::conflict(
                "image_not_pending",
                "the image already has its data",
            ));
        }
        self.image_get(id).await
    }

    pub async fn image_get(&self, id: ImageId) -> Result<ImageRecord, Error> {
        let row = sqlx::query(&format!("{SELECT} WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("reading an image", e))?;
        match row {
            Some(r) => ImageRecord::from_row(&r),
            None => Err(Error::not_found(ResourceKind::Image, id)),
        }
    }

    /// Images named `name` visible in `scope` (own project first, then public).
    pub async fn image_find_by_name(
        &self,
        scope: ImageScope,
        name: &str,
    ) -> Result<Vec<ImageRecord>, Error> {
        let rows = match scope {
            ImageScope::All => sqlx::query(&format!("{SELECT} WHERE name = $1 ORDER BY id"))
                .bind(name)
                .fetch_all(&self.read)
                .await,
            ImageScope::Project(p) => sqlx::query(&format!(
                "{SELECT} WHERE name = $1 AND (project_id = $2 OR visibility = 'public') ORDER BY id"
            ))
            .bind(name)
            .bind(p.to_string())
            .fetch_all(&self.read)
            .await,
        }
        .map_err(|e| db_error("reading images", e))?;
        let mut found = rows
            .iter()
            .map(ImageRecord::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        if let ImageScope::Project(p) = scope {
            found.sort_by_key(|i| i.project_id != p);
        }
        Ok(found)
    }

    pub async fn image_list(
        &self,
        scope: ImageScope,
        project: Option<ProjectId>,
        name: Option<&str>,
        state: Option<ImageState>,
        page: &PageRequest,
    ) -> Result<Page<ImageRecord>, Error> {
        let mut q = ListQuery::new();
        if let ImageScope::Project(p) = scope {
            let ph = q.bind(crate::page::Arg::Text(p.to_string()));
            q.cond(format!("(project_id = {ph} OR visibility = 'public')"));
        }
        if let Some(p) = project {
            q.eq("project_id", p.to_string());
        }
        if let Some(n) = name {
            q.eq("name", n);
        }
        if let Some(s) = state {
            q.eq("state", enum_str(&s));
        }
        q.fetch(&self.read, SELECT, page, ImageRecord::from_row, |i| {
            i.id.to_string()
        })
        .await
    }

    /// Deletes an image no VM was created from.
    pub async fn image_delete(&self, id: ImageId) -> Result<(), Error> {
        let ctx = "deleting an image";
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        let used: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM vms WHERE image_id = $1")
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        if used > 0 {
            return Err(Error::conflict(
                "image_in_use",
                format!("{used} VM(s) were created from this image; delete them first"),
            ));
        }
        let done = sqlx::query("DELETE FROM images WHERE id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found(ResourceKind::Image, id));
        }
        tx.commit().await.map_err(|e| db_error(ctx, e))
    }
}
