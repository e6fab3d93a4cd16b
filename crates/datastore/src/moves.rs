//! VMs moving between hosts (live and cold migration).
//!
//! ```text
//!  vm_move_begin ──► moving ──► vm_move_commit   (the VM is on the target)
//!  (VM held, job,      │
//!   target claimed)    └──────► vm_move_abandon  (the target released)
//! ```
//!
//! **Invariant**: while a VM moves, both hosts carry its allocation (the
//! source because the VM still runs there, the target because it is about
//! to), so nothing can be placed into the room the move needs; exactly one
//! of commit and abandon releases one of them. The target's claim is the
//! same guarded `UPDATE` as a create's, so a move never overbooks either.

use std::collections::BTreeMap;

use stratus_api_types::views::{VmDesiredState, VmPlacement, VmState};
use stratus_common::time::now_micros;
use stratus_common::{Error, HostId, JobId, StoragePoolId, VmId};

use crate::db::db_error;
use crate::model::{i64_of, JobRecord, NewJob, VmRecord};
use crate::Datastore;

impl Datastore {
    /// Records a move of `vm_id` to `target` (its disk to be in `pool` there,
    /// `None` for the target's local pool) with the job carrying it out, in
    /// one transaction: the VM is held by the job, the target host's
    /// capacity (and the pool's, when the disk changes pool) is claimed.
    /// `no_host_available` when the target has no room any more.
    pub async fn vm_move_begin(
        &self,
        vm_id: VmId,
        desired: VmDesiredState,
        state: VmState,
        job: NewJob,
        target: HostId,
        pool: Option<StoragePoolId>,
    ) -> Result<(VmRecord, JobRecord), Error> {
        let ctx = "recording a VM move";
        let now = now_micros();
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        let job =
            crate::vms::begin_operation(&mut tx, vm_id, desired, state, false, &job, now).await?;
        let vm = read_vm(&mut tx, vm_id).await?;
        let Some(source) = vm.host_id else {
            return Err(Error::conflict(
                "vm_not_placed",
                format!("VM {:?} is not on a host", vm.name),
            ));
        };
        if source == target {
            return Err(Error::invalid(
                "host",
                format!("VM {:?} is already on that host", vm.name),
            ));
        }
        let disk = i64_of(vm.disk_bytes);
        let mut claim = BTreeMap::new();
        claim.insert(
            target,
            (
                i64::from(vm.vcpus),
                i64_of(vm.memory_bytes),
                if pool.is_none() { disk } else { 0 },
            ),
        );
        if !crate::vms::claim_hosts(&mut tx, &claim, now).await? {
            return Err(Error::NoCapacity {
                message: "the destination host no longer has room for the VM (another placement \
                          took it, or it left service); try again"
                    .into(),
                details: serde_json::Value::Null,
            });
        }
        if let Some(p) = pool.filter(|p| Some(*p) != vm.pool_id) {
            let per_pool = BTreeMap::from([(p, disk)]);
            if let Some((pool, wanted)) = crate::pools::claim_pools(&mut tx, &per_pool).await? {
                return Err(Error::NoCapacity {
                    message: format!(
                        "storage pool {} has room for {} more bytes of disks; the VM needs {wanted}",
                        pool.name,
                        pool.capacity_bytes.saturating_sub(pool.alloc_bytes)
                    ),
                    details: serde_json::Value::Null,
                });
            }
        }
        sqlx::query("UPDATE vms SET migration_target = $1, migration_pool = $2 WHERE id = $3")
            .bind(target.to_string())
            .bind(pool.map(|p| p.to_string()))
            .bind(vm_id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        crate::sagas::bump_host_revision(&mut tx, &source.to_string()).await?;
        let vm = read_vm(&mut tx, vm_id).await?;
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok((vm, job))
    }

    /// The move arrived: the VM is on its target (and in its new pool, its
    /// attached volumes on the target too unless in a shared pool), the
    /// source's allocation (and the old pool's) released, in one
    /// transaction. Returns false when `job` does not hold a moving VM (an
    /// earlier run committed it).
    pub async fn vm_move_commit(&self, vm_id: VmId, job: JobId) -> Result<bool, Error> {
        let ctx = "recording a VM's arrival";
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        let Some(vm) = held(&mut tx, vm_id, job).await? else {
            tx.commit().await.map_err(|e| db_error(ctx, e))?;
            return Ok(false);
        };
        let (Some(source), Some(target)) = (vm.host_id, vm.migration_target) else {
            tx.commit().await.map_err(|e| db_error(ctx, e))?;
            return Ok(false);
        };
        let disk = i64_of(vm.disk_bytes);
        let source_disk = if vm.pool_id.is_none() { disk } else { 0 };
        crate::scheduling::adjust_allocation(
            &mut tx,
            &source.to_string(),
            -i64::from(vm.vcpus),
            -i64_of(vm.memory_bytes),
            -source_disk,
        )
        .await?;
        if let Some(old) = vm.pool_id.filter(|p| Some(*p) != vm.migration_pool) {
            crate::pools::release_pool(&mut tx, &old.to_string(), disk).await?;
        }
        let placement = moved_placement(&mut tx, &vm, target).await?;
        let placement = serde_json::to_string(&placement)
            .map_err(|e| Error::internal(format!("encoding placement: {e}")))?;
        sqlx::query(
            "UPDATE vms SET host_id = migration_target, pool_id = migration_pool, \
             migration_target = NULL, migration_pool = NULL, updated_at = $2, placement = $3 \
             WHERE id = $1",
        )
        .bind(vm_id.to_string())
        .bind(now_micros())
        .bind(placement)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(ctx, e))?;
        // Its volumes in the host's own directory moved with it (a live
        // move mirrors them; pool volumes stay in the pool).
        sqlx::query(
            "UPDATE volumes SET host_id = $2, updated_at = $3 \
             WHERE vm_id = $1 AND pool_id IS NULL AND host_id IS NOT NULL",
        )
        .bind(vm_id.to_string())
        .bind(target.to_string())
        .bind(now_micros())
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(ctx, e))?;
        // Its console continues from the new host's first byte.
        sqlx::query("UPDATE vm_consoles SET rebase = 1 WHERE vm_id = $1")
            .bind(vm_id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        crate::sagas::bump_host_revision(&mut tx, &source.to_string()).await?;
        crate::sagas::bump_host_revision(&mut tx, &target.to_string()).await?;
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok(true)
    }

    /// The move is given up: the target's claim (and the new pool's) is
    /// released; the VM stays where it is. Running it again does nothing.
    pub async fn vm_move_abandon(&self, vm_id: VmId, job: JobId) -> Result<(), Error> {
        let ctx = "giving up a VM move";
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        let Some(vm) = held(&mut tx, vm_id, job).await? else {
            return tx.commit().await.map_err(|e| db_error(ctx, e));
        };
        let Some(target) = vm.migration_target else {
            return tx.commit().await.map_err(|e| db_error(ctx, e));
        };
        let disk = i64_of(vm.disk_bytes);
        crate::scheduling::adjust_allocation(
            &mut tx,
            &target.to_string(),
            -i64::from(vm.vcpus),
            -i64_of(vm.memory_bytes),
            if vm.migration_pool.is_none() {
                -disk
            } else {
                0
            },
        )
        .await?;
        if let Some(new) = vm.migration_pool.filter(|p| Some(*p) != vm.pool_id) {
            crate::pools::release_pool(&mut tx, &new.to_string(), disk).await?;
        }
        sqlx::query("UPDATE vms SET migration_target = NULL, migration_pool = NULL WHERE id = $1")
            .bind(vm_id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        crate::sagas::bump_host_revision(&mut tx, &target.to_string()).await?;
        if let Some(source) = vm.host_id {
            crate::sagas::bump_host_revision(&mut tx, &source.to_string()).await?;
        }
        tx.commit().await.map_err(|e| db_error(ctx, e))
    }
}

async fn read_vm(conn: &mut sqlx::AnyConnection, id: VmId) -> Result<VmRecord, Error> {
    let row = sqlx::query(&format!("{} WHERE id = $1", crate::vms::SELECT))
        .bind(id.to_string())
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| db_error("reading a VM", e))?;
    VmRecord::from_row(&row)
}

/// Where a VM that arrived on `target` may run from now on. A move to
/// another cluster or zone, or into another pool, is the operator moving
/// the VM there for good (retiring a cluster, say): the VM's placement
/// constraints follow it, so a later move chosen by the scheduler (a host
/// maintenance) or a restart elsewhere keeps it there instead of pulling it
/// back, or finding no host at all in a retired cluster. A constraint the
/// VM did not have (no zone asked for) is not added; its pool is always
/// the one its disk is in.
async fn moved_placement(
    conn: &mut sqlx::AnyConnection,
    vm: &VmRecord,
    target: HostId,
) -> Result<VmPlacement, Error> {
    let ctx = "reading where a moved VM arrived";
    let (zone, cluster): (String, String) =
        sqlx::query_as("SELECT zone, cluster FROM hosts WHERE id = $1")
            .bind(target.to_string())
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| db_error(ctx, e))?;
    let pool = match vm.migration_pool {
        Some(p) => sqlx::query_as::<_, (String,)>("SELECT name FROM storage_pools WHERE id = $1")
            .bind(p.to_string())
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| db_error(ctx, e))?
            .map(|(name,)| name),
        None => None,
    };
    let mut placement = vm.placement.clone();
    if placement.zone.is_some() {
        placement.zone = Some(zone);
    }
    if placement.cluster.is_some() {
        placement.cluster = Some(cluster);
    }
    placement.pool = pool;
    Ok(placement)
}

/// The VM while `job` holds it.
async fn held(
    conn: &mut sqlx::AnyConnection,
    id: VmId,
    job: JobId,
) -> Result<Option<VmRecord>, Error> {
    let row = sqlx::query(&format!(
        "{} WHERE id = $1 AND active_job_id = $2",
        crate::vms::SELECT
    ))
    .bind(id.to_string())
    .bind(job.to_string())
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| db_error("reading a moving VM", e))?;
    row.as_ref().map(VmRecord::from_row).transpose()
}

impl Datastore {
    /// Every VM placed on the host (a maintenance's evacuation list).
    pub async fn vms_on_host(&self, host: HostId) -> Result<Vec<VmRecord>, Error> {
        let rows = sqlx::query(&format!(
            "{} WHERE host_id = $1 ORDER BY name",
            crate::vms::SELECT
        ))
        .bind(host.to_string())
        .fetch_all(&self.read)
        .await
        .map_err(|e| db_error("listing a host's VMs", e))?;
        rows.iter().map(VmRecord::from_row).collect()
    }
}
