//! Projects: the unit of tenancy.

use stratus_common::time::now_micros;
use stratus_common::{Error, ProjectId, ResourceKind};

use crate::db::{db_error, is_unique_violation};
use crate::model::ProjectRecord;
use crate::page::{ListQuery, Page, PageRequest};
use crate::Datastore;

const SELECT: &str = "SELECT id, name, description, created_at FROM projects";

impl Datastore {
    pub async fn project_create(
        &self,
        name: &str,
        description: &str,
    ) -> Result<ProjectRecord, Error> {
        let rec = ProjectRecord {
            id: ProjectId::new(),
            name: name.to_string(),
            description: description.to_string(),
            created_at: now_micros(),
        };
        sqlx::query(
            "INSERT INTO projects (id, name, description, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(rec.id.to_string())
        .bind(&rec.name)
        .bind(&rec.description)
        .bind(rec.created_at)
        .execute(&self.write)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                Error::conflict(
                    "name_in_use",
                    format!("a project named {name:?} already exists"),
                )
            } else {
                db_error("creating a project", e)
            }
        })?;
        Ok(rec)
    }

    pub async fn project_get(&self, id: ProjectId) -> Result<ProjectRecord, Error> {
        let row = sqlx::query(&format!("{SELECT} WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("reading a project", e))?;
        match row {
            Some(r) => ProjectRecord::from_row(&r),
            None => Err(Error::not_found(ResourceKind::Project, id)),
        }
    }

    pub async fn project_get_by_name(&self, name: &str) -> Result<ProjectRecord, Error> {
        let row = sqlx::query(&format!("{SELECT} WHERE name = $1"))
            .bind(name)
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("reading a project", e))?;
        match row {
            Some(r) => ProjectRecord::from_row(&r),
            None => Err(Error::not_found(ResourceKind::Project, name)),
        }
    }

    /// Lists projects; `only` restricts to one (a non-admin sees its own).
    pub async fn project_list(
        &self,
        only: Option<ProjectId>,
        name: Option<&str>,
        page: &PageRequest,
    ) -> Result<Page<ProjectRecord>, Error> {
        let mut q = ListQuery::new();
        if let Some(p) = only {
            q.eq("id", p.to_string());
        }
        if let Some(n) = name {
            q.eq("name", n);
        }
        q.fetch(&self.read, SELECT, page, ProjectRecord::from_row, |p| {
            p.id.to_string()
        })
        .await
    }

    /// Deletes a project that holds no VMs and no images. Its tokens, and its
    /// finished jobs' history, go with it, in one transaction.
    pub async fn project_delete(&self, id: ProjectId) -> Result<(), Error> {
        let ctx = "deleting a project";
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        let count =
            |table: &'static str| format!("SELECT COUNT(*) FROM {table} WHERE project_id = $1");
        let vms: i64 = sqlx::query_scalar(&count("vms"))
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        let images: i64 = sqlx::query_scalar(&count("images"))
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        if vms > 0 || images > 0 {
            return Err(Error::conflict(
                "project_not_empty",
                format!(
                    "the project still holds {vms} VM(s) and {images} image(s); delete them first"
                ),
            ));
        }
        let active: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs WHERE project_id = $1 AND state IN ('queued', 'running', 'cancelling')",
        )
        .bind(id.to_string())
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| db_error(ctx, e))?;
        if active > 0 {
            return Err(Error::conflict(
                "project_busy",
                format!("the project has {active} job(s) still running; wait for them"),
            ));
        }
        for sql in [
            "DELETE FROM job_events WHERE job_id IN (SELECT id FROM jobs WHERE project_id = $1)",
            "DELETE FROM saga_events WHERE job_id IN (SELECT id FROM jobs WHERE project_id = $1)",
            "DELETE FROM jobs WHERE project_id = $1",
            "DELETE FROM host_enrollment_tokens WHERE created_by IN (SELECT id FROM api_tokens WHERE project_id = $1)",
            "DELETE FROM api_tokens WHERE project_id = $1",
        ] {
            sqlx::query(sql)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error(ctx, e))?;
        }
        let done = sqlx::query("DELETE FROM projects WHERE id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found(ResourceKind::Project, id));
        }
        tx.commit().await.map_err(|e| db_error(ctx, e))
    }
}
