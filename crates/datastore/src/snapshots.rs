//! Disk snapshots of VMs, as the controller records them (the layers
//! themselves are on the VM's host).
//!
//! ```text
//!  snapshot_begin ──► creating ──► ready ──► deleting ──► (row gone)
//!  (row + job + VM                    │
//!   held, one tx)                     └── dropped by a revert to an older one
//! ```
//!
//! A snapshot records the volumes it covers (attached when it was taken, as
//! the host reported); `volume_detach_begin` refuses a volume any snapshot
//! of its VM covers.

use stratus_api_types::views::{self, SnapshotStatus};
use stratus_common::time::{from_micros, now_micros};
use stratus_common::{Error, JobId, ProjectId, ResourceKind, SnapshotId, VmId, VolumeId};

use crate::db::{db_error, is_unique_violation};
use crate::jobs::insert_job;
use crate::model::{enum_parse, u64_of, JobRecord, NewJob, RowExt};
use crate::vms::hold_vm;
use crate::Datastore;

const SELECT: &str = "SELECT id, vm_id, project_id, name, status, quiesced, bytes, volumes, \
                      job_id, created_at, origin FROM snapshots";

#[derive(Debug, Clone)]
pub struct SnapshotRecord {
    pub id: SnapshotId,
    pub vm_id: VmId,
    pub project_id: ProjectId,
    pub name: String,
    pub status: SnapshotStatus,
    pub quiesced: Option<bool>,
    pub bytes: Option<u64>,
    /// The data volumes it covers (known once it is `ready`).
    pub volumes: Vec<VolumeId>,
    pub job_id: JobId,
    pub created_at: i64,
    /// Who asked for it: an operator, or the VM's snapshot policy (which
    /// deletes its own snapshots, never an operator's).
    pub origin: SnapshotOrigin,
}

/// Who took a snapshot (`snapshots.origin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotOrigin {
    Operator,
    Policy,
}

/// A VM's snapshot policy (see `controller/src/app/snapshot_policies.rs`).
#[derive(Debug, Clone)]
pub struct SnapshotPolicyRecord {
    pub vm_id: VmId,
    pub project_id: ProjectId,
    /// A snapshot at most this often; `None`: only when run by hand.
    pub every_secs: Option<u64>,
    /// How many of its own snapshots the policy keeps.
    pub keep: u32,
    pub created_at: i64,
    pub updated_at: i64,
}

impl SnapshotPolicyRecord {
    fn from_row(r: &sqlx::any::AnyRow) -> Result<Self, Error> {
        Ok(SnapshotPolicyRecord {
            vm_id: r.parse("vm_id")?,
            project_id: r.parse("project_id")?,
            every_secs: r.opt_int("every_secs")?.map(u64_of),
            keep: u32::try_from(r.int("keep")?).unwrap_or(u32::MAX),
            created_at: r.int("created_at")?,
            updated_at: r.int("updated_at")?,
        })
    }

    pub fn into_view(self) -> views::SnapshotPolicy {
        views::SnapshotPolicy {
            vm_id: self.vm_id,
            project_id: self.project_id,
            every_secs: self.every_secs,
            keep: self.keep,
            updated_at: from_micros(self.updated_at),
        }
    }
}

const POLICY_SELECT: &str =
    "SELECT vm_id, project_id, every_secs, keep, created_at, updated_at FROM snapshot_policies";

/// The `volumes` column: ids, comma-separated.
fn volumes_text(volumes: &[VolumeId]) -> String {
    volumes
        .iter()
        .map(VolumeId::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_volumes(text: &str) -> Result<Vec<VolumeId>, Error> {
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse().map_err(|_| {
                Error::internal(format!("snapshot record names a bad volume id {s:?}"))
            })
        })
        .collect()
}

impl SnapshotRecord {
    fn from_row(r: &sqlx::any::AnyRow) -> Result<Self, Error> {
        Ok(SnapshotRecord {
            id: r.parse("id")?,
            vm_id: r.parse("vm_id")?,
            project_id: r.parse("project_id")?,
            name: r.text("name")?,
            status: enum_parse(r, "status")?,
            quiesced: r.opt_int("quiesced")?.map(|q| q != 0),
            bytes: r.opt_int("bytes")?.map(u64_of),
            volumes: parse_volumes(&r.text("volumes")?)?,
            job_id: r.parse("job_id")?,
            created_at: r.int("created_at")?,
            origin: enum_parse(r, "origin")?,
        })
    }

    pub fn into_view(self) -> views::Snapshot {
        views::Snapshot {
            id: self.id,
            vm_id: self.vm_id,
            name: self.name,
            status: self.status,
            quiesced: self.quiesced,
            bytes: self.bytes,
            volumes: self.volumes,
            job_id: self.job_id,
            created_at: from_micros(self.created_at),
            scheduled: self.origin == SnapshotOrigin::Policy,
        }
    }
}

impl Datastore {
    /// Records a snapshot (`creating`) and the job that takes it, and makes
    /// the job the VM's one active job, in one transaction.
    pub async fn snapshot_begin(
        &self,
        id: SnapshotId,
        vm: VmId,
        project: ProjectId,
        name: &str,
        origin: SnapshotOrigin,
        job: &NewJob,
    ) -> Result<(SnapshotRecord, JobRecord), Error> {
        let ctx = "recording a snapshot";
        let now = now_micros();
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        hold_vm(&mut tx, vm, job.id, now).await?;
        sqlx::query(
            "INSERT INTO snapshots (id, vm_id, project_id, name, status, job_id, created_at, origin) \
             VALUES ($1, $2, $3, $4, 'creating', $5, $6, $7)",
        )
        .bind(id.to_string())
        .bind(vm.to_string())
        .bind(project.to_string())
        .bind(name)
        .bind(job.id.to_string())
        .bind(now)
        .bind(crate::model::enum_str(&origin))
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                Error::conflict(
                    "name_in_use",
                    format!("the VM already has a snapshot named {name:?}"),
                )
            } else {
                db_error(ctx, e)
            }
        })?;
        let job = insert_job(&mut tx, job, now).await?;
        let row = sqlx::query(&format!("{SELECT} WHERE id = $1"))
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        let snap = SnapshotRecord::from_row(&row)?;
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok((snap, job))
    }

    /// Records a delete of a ready snapshot (`deleting`) and its job, the
    /// VM held, in one transaction.
    pub async fn snapshot_delete_begin(
        &self,
        id: SnapshotId,
        vm: VmId,
        job: &NewJob,
    ) -> Result<JobRecord, Error> {
        let ctx = "recording a snapshot delete";
        let now = now_micros();
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        hold_vm(&mut tx, vm, job.id, now).await?;
        let done = sqlx::query(
            "UPDATE snapshots SET status = 'deleting', job_id = $1 WHERE id = $2 AND status = 'ready'",
        )
        .bind(job.id.to_string())
        .bind(id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(ctx, e))?;
        if done.rows_affected() == 0 {
            return Err(Error::conflict(
                "snapshot_not_ready",
                "the snapshot is being taken or deleted",
            ));
        }
        let job = insert_job(&mut tx, job, now).await?;
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok(job)
    }

    pub async fn snapshot_get(&self, id: SnapshotId) -> Result<SnapshotRecord, Error> {
        let row = sqlx::query(&format!("{SELECT} WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("reading a snapshot", e))?;
        match row {
            Some(r) => SnapshotRecord::from_row(&r),
            None => Err(Error::not_found(ResourceKind::Snapshot, id)),
        }
    }

    /// A VM's snapshot by name or id.
    pub async fn snapshot_find(
        &self,
        vm: VmId,
        key: &str,
    ) -> Result<Option<SnapshotRecord>, Error> {
        let row = sqlx::query(&format!(
            "{SELECT} WHERE vm_id = $1 AND (name = $2 OR id = $2)"
        ))
        .bind(vm.to_string())
        .bind(key)
        .fetch_optional(&self.read)
        .await
        .map_err(|e| db_error("reading a snapshot", e))?;
        row.as_ref().map(SnapshotRecord::from_row).transpose()
    }

    /// A VM's snapshots, oldest first.
    pub async fn snapshot_list(&self, vm: VmId) -> Result<Vec<SnapshotRecord>, Error> {
        let rows = sqlx::query(&format!("{SELECT} WHERE vm_id = $1 ORDER BY id"))
            .bind(vm.to_string())
            .fetch_all(&self.read)
            .await
            .map_err(|e| db_error("reading snapshots", e))?;
        rows.iter().map(SnapshotRecord::from_row).collect()
    }

    /// A snapshot the host took: `ready`, with what it measured and the
    /// volumes it covers.
    pub async fn snapshot_ready(
        &self,
        id: SnapshotId,
        quiesced: bool,
        bytes: u64,
        volumes: &[VolumeId],
    ) -> Result<(), Error> {
        sqlx::query(
            "UPDATE snapshots SET status = 'ready', quiesced = $1, bytes = $2, volumes = $3 \
             WHERE id = $4",
        )
        .bind(i64::from(quiesced))
        .bind(i64::try_from(bytes).unwrap_or(i64::MAX))
        .bind(volumes_text(volumes))
        .bind(id.to_string())
        .execute(&self.write)
        .await
        .map_err(|e| db_error("recording a snapshot", e))?;
        Ok(())
    }

    /// Puts a snapshot whose delete was taken back to `ready`.
    pub async fn snapshot_undelete(&self, id: SnapshotId) -> Result<(), Error> {
        sqlx::query("UPDATE snapshots SET status = 'ready' WHERE id = $1 AND status = 'deleting'")
            .bind(id.to_string())
            .execute(&self.write)
            .await
            .map_err(|e| db_error("restoring a snapshot record", e))?;
        Ok(())
    }

    /// Sets (creates or replaces) a VM's snapshot policy.
    pub async fn snapshot_policy_set(
        &self,
        p: &SnapshotPolicyRecord,
    ) -> Result<SnapshotPolicyRecord, Error> {
        let now = now_micros();
        sqlx::query(
            "INSERT INTO snapshot_policies (vm_id, project_id, every_secs, keep, created_at, \
             updated_at) VALUES ($1, $2, $3, $4, $5, $5) \
             ON CONFLICT (vm_id) DO UPDATE SET every_secs = $3, keep = $4, updated_at = $5",
        )
        .bind(p.vm_id.to_string())
        .bind(p.project_id.to_string())
        .bind(p.every_secs.map(|s| i64::try_from(s).unwrap_or(i64::MAX)))
        .bind(i64::from(p.keep))
        .bind(now)
        .execute(&self.write)
        .await
        .map_err(|e| db_error("recording a snapshot policy", e))?;
        self.snapshot_policy_get(p.vm_id)
            .await?
            .ok_or_else(|| Error::internal("the snapshot policy vanished"))
    }

    pub async fn snapshot_policy_get(
        &self,
        vm: VmId,
    ) -> Result<Option<SnapshotPolicyRecord>, Error> {
        let row = sqlx::query(&format!("{POLICY_SELECT} WHERE vm_id = $1"))
            .bind(vm.to_string())
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("reading a snapshot policy", e))?;
        row.as_ref().map(SnapshotPolicyRecord::from_row).transpose()
    }

    /// Every policy (of one project, when given), by VM id.
    pub async fn snapshot_policy_list(
        &self,
        project: Option<ProjectId>,
    ) -> Result<Vec<SnapshotPolicyRecord>, Error> {
        let rows = match project {
            Some(p) => {
                sqlx::query(&format!(
                    "{POLICY_SELECT} WHERE project_id = $1 ORDER BY vm_id"
                ))
                .bind(p.to_string())
                .fetch_all(&self.read)
                .await
            }
            None => {
                sqlx::query(&format!("{POLICY_SELECT} ORDER BY vm_id"))
                    .fetch_all(&self.read)
                    .await
            }
        }
        .map_err(|e| db_error("reading snapshot policies", e))?;
        rows.iter().map(SnapshotPolicyRecord::from_row).collect()
    }

    /// Removes a VM's snapshot policy (its snapshots stay); whether there
    /// was one.
    pub async fn snapshot_policy_delete(&self, vm: VmId) -> Result<bool, Error> {
        let done = sqlx::query("DELETE FROM snapshot_policies WHERE vm_id = $1")
            .bind(vm.to_string())
            .execute(&self.write)
            .await
            .map_err(|e| db_error("removing a snapshot policy", e))?;
        Ok(done.rows_affected() > 0)
    }

    /// Forgets snapshots (deleted, dropped by a revert, or never taken).
    pub async fn snapshot_forget(&self, ids: &[SnapshotId]) -> Result<(), Error> {
        for id in ids {
            sqlx::query("DELETE FROM snapshots WHERE id = $1")
                .bind(id.to_string())
                .execute(&self.write)
                .await
                .map_err(|e| db_error("forgetting a snapshot", e))?;
        }
        Ok(())
    }
}

/// The names of the VM's snapshots that cover the volume, oldest first.
pub(crate) async fn snapshots_covering(
    tx: &mut sqlx::AnyConnection,
    vm: VmId,
    volume: VolumeId,
) -> Result<Vec<String>, Error> {
    let rows =
        sqlx::query("SELECT name FROM snapshots WHERE vm_id = $1 AND volumes LIKE $2 ORDER BY id")
            .bind(vm.to_string())
            .bind(format!("%{volume}%"))
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| db_error("reading the snapshots that cover a volume", e))?;
    rows.iter().map(|r| r.text("name")).collect()
}
