//! Data volumes: records of qcow2 files on a host, attached to at most one
//! VM at a time.
//!
//! ```text
//!  volume_create ──► available ──attach job──► attaching ──► attached
//!                        ▲                                       │
//!                        └────────── detaching ◄──detach job─────┘
//! ```
//!
//! A volume gets its file (and its host, `host_id`) on its first attach;
//! from then on it can be attached only to VMs on that host.
//! **Invariant**: `vm_id` is set exactly while attaching, attached or
//! detaching, and only by a transaction that also makes the job the VM's one
//! active job.

use stratus_api_types::views::{self, VolumeStatus};
use stratus_common::time::{from_micros, now_micros};
use stratus_common::{Error, HostId, ImageId, ProjectId, ResourceKind, VmId, VolumeId};

use crate::db::{db_error, is_unique_violation};
use crate::jobs::insert_job;
use crate::model::{enum_parse, enum_str, i64_of, u64_of, JobRecord, NewJob, RowExt};
use crate::page::{ListQuery, Page, PageRequest};
use crate::vms::hold_vm;
use crate::Datastore;

const SELECT: &str = "SELECT id, project_id, name, size_bytes, image_id, status, host_id, vm_id, \
     created_at, updated_at FROM volumes";

#[derive(Debug, Clone)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub project_id: ProjectId,
    pub name: String,
    pub size_bytes: u64,
    pub image_id: Option<ImageId>,
    pub status: VolumeStatus,
    pub host_id: Option<HostId>,
    pub vm_id: Option<VmId>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl VolumeRecord {
    fn from_row(r: &sqlx::any::AnyRow) -> Result<Self, Error> {
        Ok(VolumeRecord {
            id: r.parse("id")?,
            project_id: r.parse("project_id")?,
            name: r.text("name")?,
            size_bytes: u64_of(r.int("size_bytes")?),
            image_id: r.opt_parse("image_id")?,
            status: enum_parse(r, "status")?,
            host_id: r.opt_parse("host_id")?,
            vm_id: r.opt_parse("vm_id")?,
            created_at: r.int("created_at")?,
            updated_at: r.int("updated_at")?,
        })
    }

    pub fn into_view(self) -> views::Volume {
        views::Volume {
            id: self.id,
            project_id: self.project_id,
            name: self.name,
            size_bytes: self.size_bytes,
            image_id: self.image_id,
            status: self.status,
            host_id: self.host_id,
            vm_id: self.vm_id,
            created_at: from_micros(self.created_at),
        }
    }
}

impl Datastore {
    pub async fn volume_create(
        &self,
        project: ProjectId,
        name: &str,
        size_bytes: u64,
        image: Option<ImageId>,
    ) -> Result<VolumeRecord, Error> {
        let id = VolumeId::new();
        let now = now_micros();
        sqlx::query(
            "INSERT INTO volumes (id, project_id, name, size_bytes, image_id, status, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, 'available', $6, $6)",
        )
        .bind(id.to_string())
        .bind(project.to_string())
        .bind(name)
        .bind(i64_of(size_bytes))
        .bind(image.map(|i| i.to_string()))
        .bind(now)
        .execute(&self.write)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                Error::conflict(
                    "name_in_use",
                    format!("a volume named {name:?} already exists in this project"),
                )
            } else {
                db_error("recording a volume", e)
            }
        })?;
        self.volume_get(id).await
    }

    pub async fn volume_get(&self, id: VolumeId) -> Result<VolumeRecord, Error> {
        let row = sqlx::query(&format!("{SELECT} WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("reading a volume", e))?;
        match row {
            Some(r) => VolumeRecord::from_row(&r),
            None => Err(Error::not_found(ResourceKind::Volume, id)),
        }
    }

    pub async fn volume_find_by_name(
        &self,
        project: Option<ProjectId>,
        name: &str,
    ) -> Result<Vec<VolumeRecord>, Error> {
        let rows = match project {
            Some(p) => {
                sqlx::query(&format!("{SELECT} WHERE project_id = $1 AND name = $2"))
                    .bind(p.to_string())
                    .bind(name)
                    .fetch_all(&self.read)
                    .await
            }
            None => {
                sqlx::query(&format!("{SELECT} WHERE name = $1"))
                    .bind(name)
                    .fetch_all(&self.read)
                    .await
            }
        }
        .map_err(|e| db_error("reading volumes", e))?;
        rows.iter().map(VolumeRecord::from_row).collect()
    }

    pub async fn volume_list(
        &self,
        project: Option<ProjectId>,
        page: &PageRequest,
    ) -> Result<Page<VolumeRecord>, Error> {
        let mut q = ListQuery::new();
        if let Some(p) = project {
            q.eq("project_id", p.to_string());
        }
        q.fetch(&self.read, SELECT, page, VolumeRecord::from_row, |v| {
            v.id.to_string()
        })
        .await
    }

    /// The volumes attached (or being attached or detached) to a VM.
    pub async fn volumes_of_vm(&self, vm: VmId) -> Result<Vec<VolumeRecord>, Error> {
        let rows = sqlx::query(&format!("{SELECT} WHERE vm_id = $1 ORDER BY id"))
            .bind(vm.to_string())
            .fetch_all(&self.read)
            .await
            .map_err(|e| db_error("reading volumes", e))?;
        rows.iter().map(VolumeRecord::from_row).collect()
    }

    /// Starts an attach: the volume (available) becomes `attaching` to the
    /// VM, the job is recorded and holds the VM, in one transaction.
    pub async fn volume_attach_begin(
        &self,
        id: VolumeId,
        vm: VmId,
        job: &NewJob,
    ) -> Result<JobRecord, Error> {
        let ctx = "recording a volume attach";
        let now = now_micros();
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        hold_vm(&mut tx, vm, job.id, now).await?;
        let done = sqlx::query(
            "UPDATE volumes SET status = 'attaching', vm_id = $1, updated_at = $2 \
             WHERE id = $3 AND status = 'available' AND vm_id IS NULL",
        )
        .bind(vm.to_string())
        .bind(now)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(ctx, e))?;
        if done.rows_affected() == 0 {
            return Err(Error::conflict(
                "volume_in_use",
                "the volume is attached to a VM (or being attached or detached)",
            ));
        }
        let job = insert_job(&mut tx, job, now).await?;
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok(job)
    }

    /// Starts a detach: the attached volume becomes `detaching`, the job is
    /// recorded and holds its VM, in one transaction.
    pub async fn volume_detach_begin(
        &self,
        id: VolumeId,
        vm: VmId,
        job: &NewJob,
    ) -> Result<JobRecord, Error> {
        let ctx = "recording a volume detach";
        let now = now_micros();
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        hold_vm(&mut tx, vm, job.id, now).await?;
        // The volume's layers belong to the VM's snapshot chain while a
        // snapshot covers it (the host refuses too; refused here it is a
        // clear 409 rather than a failed job).
        let covering = crate::snapshots::snapshots_covering(&mut tx, vm, id).await?;
        if !covering.is_empty() {
            let names: Vec<String> = covering.iter().map(|n| format!("{n:?}")).collect();
            return Err(Error::conflict(
                "volume_in_snapshot",
                format!(
                    "the VM's snapshot(s) {} cover the volume; delete those snapshots first \
                     (reverting to one of them needs the volume's layers), then detach it",
                    names.join(", ")
                ),
            ));
        }
        let done = sqlx::query(
            "UPDATE volumes SET status = 'detaching', updated_at = $1 \
             WHERE id = $2 AND status = 'attached' AND vm_id = $3",
        )
        .bind(now)
        .bind(id.to_string())
        .bind(vm.to_string())
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(ctx, e))?;
        if done.rows_affected() == 0 {
            return Err(Error::conflict(
                "volume_not_attached",
                "the volume is not attached (or is being attached or detached)",
            ));
        }
        let job = insert_job(&mut tx, job, now).await?;
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok(job)
    }

    /// Sets where a volume stands after its host acted (or an undo).
    pub async fn volume_settle(
        &self,
        id: VolumeId,
        status: VolumeStatus,
        vm: Option<VmId>,
        host: Option<HostId>,
    ) -> Result<(), Error> {
        sqlx::query(
            "UPDATE volumes SET status = $1, vm_id = $2, host_id = COALESCE($3, host_id), \
             updated_at = $4 WHERE id = $5",
        )
        .bind(enum_str(&status))
        .bind(vm.map(|v| v.to_string()))
        .bind(host.map(|h| h.to_string()))
        .bind(now_micros())
        .bind(id.to_string())
        .execute(&self.write)
        .await
        .map_err(|e| db_error("recording a volume", e))?;
        Ok(())
    }

    pub async fn volume_set_size(&self, id: VolumeId, size_bytes: u64) -> Result<(), Error> {
        sqlx::query("UPDATE volumes SET size_bytes = $1, updated_at = $2 WHERE id = $3")
            .bind(i64_of(size_bytes))
            .bind(now_micros())
            .bind(id.to_string())
            .execute(&self.write)
            .await
            .map_err(|e| db_error("recording a volume's size", e))?;
        Ok(())
    }

    /// Removes a volume record that no VM holds.
    pub async fn volume_delete(&self, id: VolumeId) -> Result<(), Error> {
        let done = sqlx::query(
            "DELETE FROM volumes WHERE id = $1 AND vm_id IS NULL AND status = 'available'",
        )
        .bind(id.to_string())
        .execute(&self.write)
        .await
        .map_err(|e| db_error("deleting a volume", e))?;
        if done.rows_affected() == 0 {
            return Err(Error::conflict(
                "volume_attached",
                "the volume is attached to a VM; detach it first",
            ));
        }
        Ok(())
    }
}
