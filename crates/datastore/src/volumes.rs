//! Data volumes: records of qcow2 files on a host, attached to at most one
//! VM at a time.
//!
//! ```text
//!  volume_create ──► available ──attach job──► attaching ──► attached
//!                        ▲                                       │
//!                        └────────── detaching ◄──detach job─────┘
//! ```
//!
//! A volume gets its file (and its host, `host_id`) on its first attach.
//! A local volume (no `pool_id`) can from then on be attached only to VMs on
//! that host. A pool volume's file is in its shared storage pool, so it can
//! be attached on any host that sees the pool; its size is claimed against
//! the pool's capacity in the create transaction (and in a resize's, for
//! the growth) and given back by the delete transaction, so a pool's
//! `alloc_bytes` is always the sum of its VMs' disks and its volumes.
//! **Invariant**: `vm_id` is set exactly while attaching, attached or
//! detaching, and only by a transaction that also makes the job the VM's one
//! active job.

use stratus_api_types::views::{self, VolumeStatus};
use stratus_common::time::{from_micros, now_micros};
use stratus_common::{
    ByteCount, Error, HostId, ImageId, ProjectId, ResourceKind, StoragePoolId, VmId, VolumeId,
};

use crate::db::{db_error, is_fk_violation, is_unique_violation};
use crate::jobs::insert_job;
use crate::model::{enum_parse, enum_str, i64_of, u64_of, JobRecord, NewJob, RowExt};
use crate::page::{ListQuery, Page, PageRequest};
use crate::vms::hold_vm;
use crate::Datastore;

/// The pool's name comes from a subquery rather than a join, so list
/// filters can name the volume's columns unqualified.
const SELECT: &str = "SELECT id, project_id, name, size_bytes, image_id, status, host_id, vm_id, \
     created_at, updated_at, pool_id, \
     (SELECT p.name FROM storage_pools p WHERE p.id = volumes.pool_id) AS pool_name \
     FROM volumes";

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
    /// The shared storage pool holding its file; `None`: a host's own.
    pub pool_id: Option<StoragePoolId>,
    pub pool_name: Option<String>,
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
            pool_id: r.opt_parse("pool_id")?,
            pool_name: r.opt_text("pool_name")?,
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
            pool_id: self.pool_id,
            pool: self.pool_name,
            created_at: from_micros(self.created_at),
        }
    }
}

impl Datastore {
    /// Records a volume. A pool volume's size is claimed against its
    /// pool in the same transaction: a pool without room refuses it
    /// (`409 pool_full`, naming the pool and its room) and nothing is
    /// written.
    pub async fn volume_create(
        &self,
        project: ProjectId,
        name: &str,
        size_bytes: u64,
        image: Option<ImageId>,
        pool: Option<StoragePoolId>,
    ) -> Result<VolumeRecord, Error> {
        let ctx = "recording a volume";
        let id = VolumeId::new();
        let now = now_micros();
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        sqlx::query(
            "INSERT INTO volumes (id, project_id, name, size_bytes, image_id, status, pool_id, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'available', $6, $7, $7)",
        )
        .bind(id.to_string())
        .bind(project.to_string())
        .bind(name)
        .bind(i64_of(size_bytes))
        .bind(image.map(|i| i.to_string()))
        .bind(pool.map(|p| p.to_string()))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                Error::conflict(
                    "name_in_use",
                    format!("a volume named {name:?} already exists in this project"),
                )
            } else if is_fk_violation(&e) {
                Error::conflict("pool_gone", "the storage pool was deleted meanwhile")
            } else {
                db_error(ctx, e)
            }
        })?;
        if let Some(pool) = pool {
            claim_pool_for_volume(&mut tx, pool, size_bytes, "the volume needs").await?;
        }
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
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

    /// Claims a pool volume's growth from `from` to `to` bytes against its
    /// pool, before its host grows the file (so a full pool refuses the
    /// resize with `409 pool_full` and the file stays as it is). The caller
    /// gives it back with [`Datastore::volume_pool_release`] if the host
    /// fails. Nothing to claim for a local volume or no growth.
    pub async fn volume_pool_claim(
        &self,
        pool: StoragePoolId,
        from: u64,
        to: u64,
    ) -> Result<(), Error> {
        let ctx = "claiming a volume's growth";
        let Some(growth) = to.checked_sub(from).filter(|g| *g > 0) else {
            return Ok(());
        };
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        claim_pool_for_volume(&mut tx, pool, growth, "growing the volume needs").await?;
        tx.commit().await.map_err(|e| db_error(ctx, e))
    }

    /// Gives back bytes claimed by [`Datastore::volume_pool_claim`].
    pub async fn volume_pool_release(&self, pool: StoragePoolId, bytes: u64) -> Result<(), Error> {
        let mut conn = self
            .write
            .acquire()
            .await
            .map_err(|e| db_error("releasing a volume's claim", e))?;
        crate::pools::release_pool(&mut conn, &pool.to_string(), i64_of(bytes)).await
    }

    /// Removes a volume record that no VM holds; a pool volume's size goes
    /// back to its pool in the same transaction.
    pub async fn volume_delete(&self, id: VolumeId) -> Result<(), Error> {
        let ctx = "deleting a volume";
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        let row: Option<(Option<String>, i64)> =
            sqlx::query_as("SELECT pool_id, size_bytes FROM volumes WHERE id = $1")
                .bind(id.to_string())
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| db_error(ctx, e))?;
        let Some((pool, size)) = row else {
            return Err(Error::not_found(ResourceKind::Volume, id));
        };
        let done = sqlx::query(
            "DELETE FROM volumes WHERE id = $1 AND vm_id IS NULL AND status = 'available'",
        )
        .bind(id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(ctx, e))?;
        if done.rows_affected() == 0 {
            return Err(Error::conflict(
                "volume_attached",
                "the volume is attached to a VM; detach it first",
            ));
        }
        if let Some(pool) = pool {
            crate::pools::release_pool(&mut tx, &pool, size).await?;
        }
        tx.commit().await.map_err(|e| db_error(ctx, e))
    }
}

/// Claims `bytes` of `pool` for a volume (guarded: never beyond the pool's
/// reported capacity); the error names the pool and its room.
async fn claim_pool_for_volume(
    conn: &mut sqlx::AnyConnection,
    pool: StoragePoolId,
    bytes: u64,
    what: &str,
) -> Result<(), Error> {
    let per_pool = std::collections::BTreeMap::from([(pool, i64_of(bytes))]);
    match crate::pools::claim_pools(conn, &per_pool).await? {
        None => Ok(()),
        Some((p, wanted)) => Err(Error::conflict(
            "pool_full",
            format!(
                "storage pool {} has room for {} more ({} of {} allocated); {what} {}",
                p.name,
                ByteCount(p.capacity_bytes.saturating_sub(p.alloc_bytes)).human(),
                ByteCount(p.alloc_bytes).human(),
                ByteCount(p.capacity_bytes).human(),
                ByteCount(wanted).human()
            ),
        )),
    }
}
