//! Backup targets and backups (restore points).
//!
//! ```text
//!  backup_begin ──► running ──► succeeded   (backup_succeed: a restore point)
//!  (record + job +     │
//!   VM held, one tx)   └──────► failed      (backup_fail: never a restore point)
//! ```
//!
//! Deleting a restore point (`deleting`, then gone) first merges it into
//! the restore point built on it (on a host), then records the child's new
//! parent and checksum and removes the row, in one transaction.
//!
//! A restore point covers the VM's disk and the volumes attached when it
//! was taken: one `backup_volumes` row per volume, written in the same
//! transaction that makes the backup a restore point, removed with it.
//!
//! **Invariant**: only a `succeeded` backup is ever offered as a parent or a
//! restore point, and a backup leaves `running` exactly once (both updates
//! are guarded by `status = 'running'`), so a late or repeated outcome never
//! turns a failed backup into a good one.

use stratus_api_types::agent::{BackupDone, BackupPruned, VolumePruned};
use stratus_api_types::views::{self, BackupMode, BackupStatus};
use stratus_common::time::{from_micros, now_micros};
use stratus_common::{
    BackupId, BackupTargetId, Error, FlavorId, HostId, ImageId, JobId, ProjectId, ResourceKind,
    VmId, VolumeId,
};

use crate::db::{db_error, is_fk_violation, is_unique_violation};
use crate::jobs::insert_job;
use crate::model::{
    enum_parse, enum_str, i64_of, opt_enum_parse, u64_of, JobRecord, NewJob, RowExt,
};
use crate::page::{ListQuery, Page, PageRequest};
use crate::Datastore;

const TARGET_SELECT: &str = "SELECT id, name, path, created_at FROM backup_targets";
const SELECT: &str =
    "SELECT id, project_id, vm_id, vm_name, target_id, parent_id, requested_mode, \
     mode, fallback_reason, status, error, file, host_id, job_id, image_id, flavor_id, vcpus, \
     memory_bytes, disk_bytes, data_bytes, file_bytes, sha256, created_at, finished_at, \
     verified_at, verify_ok, verify_problems FROM backups";

#[derive(Debug, Clone)]
pub struct BackupTargetRecord {
    pub id: BackupTargetId,
    pub name: String,
    pub path: String,
    pub created_at: i64,
}

impl BackupTargetRecord {
    fn from_row(r: &sqlx::any::AnyRow) -> Result<Self, Error> {
        Ok(BackupTargetRecord {
            id: r.parse("id")?,
            name: r.text("name")?,
            path: r.text("path")?,
            created_at: r.int("created_at")?,
        })
    }

    pub fn into_view(self) -> views::BackupTarget {
        views::BackupTarget {
            id: self.id,
            name: self.name,
            path: self.path,
            created_at: from_micros(self.created_at),
        }
    }
}

const VOLUME_SELECT: &str =
    "SELECT backup_id, volume_id, volume_name, file, mode, fallback_reason, disk_bytes, \
     data_bytes, file_bytes, sha256 FROM backup_volumes";

/// One volume's file in a restore point.
#[derive(Debug, Clone)]
pub struct BackupVolumeRecord {
    pub volume_id: VolumeId,
    pub volume_name: String,
    /// Absolute path of the file.
    pub file: String,
    pub mode: BackupMode,
    pub fallback_reason: Option<String>,
    pub disk_bytes: u64,
    pub data_bytes: u64,
    pub file_bytes: u64,
    pub sha256: String,
}

impl BackupVolumeRecord {
    fn from_row(r: &sqlx::any::AnyRow) -> Result<Self, Error> {
        Ok(BackupVolumeRecord {
            volume_id: r.parse("volume_id")?,
            volume_name: r.text("volume_name")?,
            file: r.text("file")?,
            mode: enum_parse(r, "mode")?,
            fallback_reason: r.opt_text("fallback_reason")?,
            disk_bytes: u64_of(r.int("disk_bytes")?),
            data_bytes: u64_of(r.int("data_bytes")?),
            file_bytes: u64_of(r.int("file_bytes")?),
            sha256: r.text("sha256")?,
        })
    }

    pub fn into_view(self) -> views::BackupVolume {
        views::BackupVolume {
            volume_id: self.volume_id,
            volume_name: self.volume_name,
            file: self.file,
            mode: self.mode,
            fallback_reason: self.fallback_reason,
            disk_bytes: self.disk_bytes,
            data_bytes: self.data_bytes,
            file_bytes: self.file_bytes,
            sha256: self.sha256,
        }
    }
}

/// A volume a restore into a new VM creates from a restore point's file.
#[derive(Debug, Clone)]
pub struct RestoredVolume {
    pub id: VolumeId,
    pub name: String,
    pub size_bytes: u64,
    /// The backup file its content comes from (absolute).
    pub file: String,
}

/// A volume's file merged with the deleted restore point's: its new
/// figures, and whether it no longer builds on anything (the deleted one
/// was full).
#[derive(Debug, Clone)]
pub struct VolumeMerged {
    pub pruned: VolumePruned,
    pub now_full: bool,
}

#[derive(Debug, Clone)]
pub struct BackupRecord {
    pub id: BackupId,
    pub project_id: ProjectId,
    pub vm_id: VmId,
    pub vm_name: String,
    pub target_id: BackupTargetId,
    pub parent_id: Option<BackupId>,
    pub requested_mode: BackupMode,
    pub mode: Option<BackupMode>,
    pub fallback_reason: Option<String>,
    pub status: BackupStatus,
    pub error: Option<String>,
    /// Absolute path of the file.
    pub file: String,
    pub host_id: Option<HostId>,
    pub job_id: JobId,
    pub image_id: ImageId,
    pub flavor_id: FlavorId,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub data_bytes: Option<u64>,
    pub file_bytes: Option<u64>,
    pub sha256: Option<String>,
    pub created_at: i64,
    pub finished_at: Option<i64>,
    pub verified_at: Option<i64>,
    pub verify_ok: Option<bool>,
    pub verify_problems: Vec<String>,
    /// The volumes it covers, by volume id (filled by every read).
    pub volumes: Vec<BackupVolumeRecord>,
}

impl BackupRecord {
    fn from_row(r: &sqlx::any::AnyRow) -> Result<Self, Error> {
        Ok(BackupRecord {
            id: r.parse("id")?,
            project_id: r.parse("project_id")?,
            vm_id: r.parse("vm_id")?,
            vm_name: r.text("vm_name")?,
            target_id: r.parse("target_id")?,
            parent_id: r.opt_parse("parent_id")?,
            requested_mode: enum_parse(r, "requested_mode")?,
            mode: opt_enum_parse(r, "mode")?,
            fallback_reason: r.opt_text("fallback_reason")?,
            status: enum_parse(r, "status")?,
            error: r.opt_text("error")?,
            file: r.text("file")?,
            host_id: r.opt_parse("host_id")?,
            job_id: r.parse("job_id")?,
            image_id: r.parse("image_id")?,
            flavor_id: r.parse("flavor_id")?,
            vcpus: u32::try_from(r.int("vcpus")?).unwrap_or(0),
            memory_bytes: u64_of(r.int("memory_bytes")?),
            disk_bytes: u64_of(r.int("disk_bytes")?),
            data_bytes: r.opt_int("data_bytes")?.map(u64_of),
            file_bytes: r.opt_int("file_bytes")?.map(u64_of),
            sha256: r.opt_text("sha256")?,
            created_at: r.int("created_at")?,
            finished_at: r.opt_int("finished_at")?,
            verified_at: r.opt_int("verified_at")?,
            verify_ok: r.opt_int("verify_ok")?.map(|v| v != 0),
            verify_problems: match r.opt_text("verify_problems")? {
                Some(p) => serde_json::from_str(&p).unwrap_or_default(),
                None => Vec::new(),
            },
            volumes: Vec::new(),
        })
    }

    /// Its file of volume `id`, if it covers that volume.
    pub fn volume(&self, id: VolumeId) -> Option<&BackupVolumeRecord> {
        self.volumes.iter().find(|v| v.volume_id == id)
    }

    pub fn into_view(self) -> views::Backup {
        views::Backup {
            id: self.id,
            project_id: self.project_id,
            vm_id: self.vm_id,
            vm_name: self.vm_name,
            target_id: self.target_id,
            parent_id: self.parent_id,
            requested_mode: self.requested_mode,
            mode: self.mode,
            fallback_reason: self.fallback_reason,
            status: self.status,
            error: self.error,
            file: self.file,
            job_id: self.job_id,
            disk_bytes: self.disk_bytes,
            data_bytes: self.data_bytes,
            file_bytes: self.file_bytes,
            sha256: self.sha256,
            duration_ms: self
                .finished_at
                .filter(|_| self.status == BackupStatus::Succeeded)
                .map(|f| u64_of((f - self.created_at) / 1000)),
            created_at: from_micros(self.created_at),
            finished_at: self.finished_at.map(from_micros),
            verified_at: self.verified_at.map(from_micros),
            verify_ok: self.verify_ok,
            volumes: self
                .volumes
                .into_iter()
                .map(BackupVolumeRecord::into_view)
                .collect(),
        }
    }
}

/// A backup to record with its job.
#[derive(Debug, Clone)]
pub struct NewBackup {
    pub id: BackupId,
    pub project_id: ProjectId,
    pub vm_id: VmId,
    pub vm_name: String,
    pub target_id: BackupTargetId,
    pub parent_id: Option<BackupId>,
    pub requested_mode: BackupMode,
    pub file: String,
    pub host_id: Option<HostId>,
    pub image_id: ImageId,
    pub flavor_id: FlavorId,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

/// Filters for [`Datastore::backup_list`].
#[derive(Debug, Default)]
pub struct BackupListFilter {
    pub project: Option<ProjectId>,
    pub vm: Option<VmId>,
}

impl Datastore {
    /// Reads the volume rows of each record: one query per 500 records.
    async fn backup_volumes_fill(&self, recs: &mut [BackupRecord]) -> Result<(), Error> {
        for chunk in recs.chunks_mut(500) {
            let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "{VOLUME_SELECT} WHERE backup_id IN ({}) ORDER BY volume_id",
                placeholders.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for rec in chunk.iter() {
                q = q.bind(rec.id.to_string());
            }
            let rows = q
                .fetch_all(&self.read)
                .await
                .map_err(|e| db_error("reading backups' volumes", e))?;
            for row in &rows {
                let backup: BackupId = row.parse("backup_id")?;
                let volume = BackupVolumeRecord::from_row(row)?;
                if let Some(rec) = chunk.iter_mut().find(|r| r.id == backup) {
                    rec.volumes.push(volume);
                }
            }
        }
        Ok(())
    }

    /// One record read by `row`, with its volumes.
    async fn backup_filled(
        &self,
        row: Option<sqlx::any::AnyRow>,
    ) -> Result<Option<BackupRecord>, Error> {
        let Some(row) = row else { return Ok(None) };
        let mut recs = [BackupRecord::from_row(&row)?];
        self.backup_volumes_fill(&mut recs).await?;
        let [rec] = recs;
        Ok(Some(rec))
    }

    pub async fn backup_target_create(
        &self,
        name: &str,
        path: &str,
    ) -> Result<BackupTargetRecord, Error> {
        let rec = BackupTargetRecord {
            id: BackupTargetId::new(),
            name: name.to_string(),
            path: path.to_string(),
            created_at: now_micros(),
        };
        sqlx::query(
            "INSERT INTO backup_targets (id, name, path, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(rec.id.to_string())
        .bind(&rec.name)
        .bind(&rec.path)
        .bind(rec.created_at)
        .execute(&self.write)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                Error::conflict(
                    "name_in_use",
                    format!("a backup target named {name:?} already exists"),
                )
            } else {
                db_error("recording a backup target", e)
            }
        })?;
        Ok(rec)
    }

    pub async fn backup_target_list(&self) -> Result<Vec<BackupTargetRecord>, Error> {
        let rows = sqlx::query(&format!("{TARGET_SELECT} ORDER BY name"))
            .fetch_all(&self.read)
            .await
            .map_err(|e| db_error("reading backup targets", e))?;
        rows.iter().map(BackupTargetRecord::from_row).collect()
    }

    pub async fn backup_target_get(&self, id: BackupTargetId) -> Result<BackupTargetRecord, Error> {
        let row = sqlx::query(&format!("{TARGET_SELECT} WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("reading a backup target", e))?;
        match row {
            Some(r) => BackupTargetRecord::from_row(&r),
            None => Err(Error::not_found(ResourceKind::BackupTarget, id)),
        }
    }

    pub async fn backup_target_by_name(
        &self,
        name: &str,
    ) -> Result<Option<BackupTargetRecord>, Error> {
        let row = sqlx::query(&format!("{TARGET_SELECT} WHERE name = $1"))
            .bind(name)
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("reading a backup target", e))?;
        row.as_ref().map(BackupTargetRecord::from_row).transpose()
    }

    /// Removes a target that holds no backups (their records keep it).
    pub async fn backup_target_delete(&self, id: BackupTargetId) -> Result<(), Error> {
        let done = sqlx::query("DELETE FROM backup_targets WHERE id = $1")
            .bind(id.to_string())
            .execute(&self.write)
            .await
            .map_err(|e| {
                if is_fk_violation(&e) {
                    Error::conflict(
                        "target_in_use",
                        "the backup target still holds backups; delete them first",
                    )
                } else {
                    db_error("removing a backup target", e)
                }
            })?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found(ResourceKind::BackupTarget, id));
        }
        Ok(())
    }

    /// Records a backup (`running`) and the job that takes it, and makes the
    /// job the VM's one active job, all in one transaction; `vm_busy` if
    /// another job holds the VM.
    pub async fn backup_begin(
        &self,
        b: &NewBackup,
        job: &NewJob,
    ) -> Result<(BackupRecord, JobRecord), Error> {
        let ctx = "recording a backup";
        let now = now_micros();
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        crate::vms::hold_vm(&mut tx, b.vm_id, job.id, now).await?;
        sqlx::query(
            "INSERT INTO backups (id, project_id, vm_id, vm_name, target_id, parent_id, requested_mode, \
             status, file, host_id, job_id, image_id, flavor_id, vcpus, memory_bytes, disk_bytes, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'running', $8, $9, $10, $11, $12, $13, $14, $15, $16)",
        )
        .bind(b.id.to_string())
        .bind(b.project_id.to_string())
        .bind(b.vm_id.to_string())
        .bind(&b.vm_name)
        .bind(b.target_id.to_string())
        .bind(b.parent_id.map(|p| p.to_string()))
        .bind(enum_str(&b.requested_mode))
        .bind(&b.file)
        .bind(b.host_id.map(|h| h.to_string()))
        .bind(job.id.to_string())
        .bind(b.image_id.to_string())
        .bind(b.flavor_id.to_string())
        .bind(i64::from(b.vcpus))
        .bind(i64_of(b.memory_bytes))
        .bind(i64_of(b.disk_bytes))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(ctx, e))?;
        let job = insert_job(&mut tx, job, now).await?;
        let row = sqlx::query(&format!("{SELECT} WHERE id = $1"))
            .bind(b.id.to_string())
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        let backup = BackupRecord::from_row(&row)?;
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok((backup, job))
    }

    pub async fn backup_get(&self, id: BackupId) -> Result<BackupRecord, Error> {
        let row = sqlx::query(&format!("{SELECT} WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("reading a backup", e))?;
        self.backup_filled(row)
            .await?
            .ok_or_else(|| Error::not_found(ResourceKind::Backup, id))
    }

    /// The backup a job takes.
    pub async fn backup_of_job(&self, job: JobId) -> Result<Option<BackupRecord>, Error> {
        let row = sqlx::query(&format!("{SELECT} WHERE job_id = $1"))
            .bind(job.to_string())
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("reading a backup", e))?;
        self.backup_filled(row).await
    }

    /// Backups, newest first within the page order of ids (ids grow with
    /// time, so the list reads oldest first).
    pub async fn backup_list(
        &self,
        f: &BackupListFilter,
        page: &PageRequest,
    ) -> Result<Page<BackupRecord>, Error> {
        let mut q = ListQuery::new();
        if let Some(p) = f.project {
            q.eq("project_id", p.to_string());
        }
        if let Some(v) = f.vm {
            q.eq("vm_id", v.to_string());
        }
        let mut p = q
            .fetch(&self.read, SELECT, page, BackupRecord::from_row, |b| {
                b.id.to_string()
            })
            .await?;
        self.backup_volumes_fill(&mut p.items).await?;
        Ok(p)
    }

    /// The VM's newest restore point (on `target`, when given): the parent
    /// of its next incremental backup.
    pub async fn backup_latest_succeeded(
        &self,
        vm: VmId,
        target: Option<BackupTargetId>,
    ) -> Result<Option<BackupRecord>, Error> {
        let newest = format!("{SELECT} WHERE vm_id = $1 AND status = 'succeeded'");
        let row = match target {
            Some(t) => {
                sqlx::query(&format!(
                    "{newest} AND target_id = $2 ORDER BY id DESC LIMIT 1"
                ))
                .bind(vm.to_string())
                .bind(t.to_string())
                .fetch_optional(&self.read)
                .await
            }
            None => {
                sqlx::query(&format!("{newest} ORDER BY id DESC LIMIT 1"))
                    .bind(vm.to_string())
                    .fetch_optional(&self.read)
                    .await
            }
        }
        .map_err(|e| db_error("reading backups", e))?;
        self.backup_filled(row).await
    }

    /// Makes a running backup a restore point, with a row per volume it
    /// covers, in one transaction. `false` if it was no longer running (it
    /// failed meanwhile): the outcome is then not recorded. The restore
    /// point's fallback reason is the disk's, then each volume's that was
    /// copied in full in an incremental restore point.
    pub async fn backup_succeed(
        &self,
        id: BackupId,
        host: HostId,
        done: &BackupDone,
    ) -> Result<bool, Error> {
        let ctx = "recording a backup's outcome";
        let mut reasons: Vec<String> = done.fallback_reason.iter().cloned().collect();
        reasons.extend(done.volumes.iter().filter_map(|v| {
            v.fallback_reason
                .as_ref()
                .map(|r| format!("volume {}: {r}", v.volume_id))
        }));
        let fallback_reason = (!reasons.is_empty()).then(|| reasons.join("; "));
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        let r = sqlx::query(
            "UPDATE backups SET status = 'succeeded', mode = $1, fallback_reason = $2, data_bytes = $3, \
             file_bytes = $4, sha256 = $5, host_id = $6, finished_at = $7, \
             parent_id = CASE WHEN $1 = 'full' THEN NULL ELSE parent_id END \
             WHERE id = $8 AND status = 'running'",
        )
        .bind(enum_str(&done.mode))
        .bind(fallback_reason)
        .bind(i64_of(done.data_bytes))
        .bind(i64_of(done.file_bytes))
        .bind(&done.sha256)
        .bind(host.to_string())
        .bind(now_micros())
        .bind(id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(ctx, e))?;
        if r.rows_affected() != 1 {
            return Ok(false);
        }
        for v in &done.volumes {
            sqlx::query(
                "INSERT INTO backup_volumes (backup_id, volume_id, volume_name, file, mode, \
                 fallback_reason, disk_bytes, data_bytes, file_bytes, sha256) VALUES ($1, $2, \
                 COALESCE((SELECT name FROM volumes WHERE id = $2), $2), $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(id.to_string())
            .bind(v.volume_id.to_string())
            .bind(&v.file)
            .bind(enum_str(&v.mode))
            .bind(v.fallback_reason.clone())
            .bind(i64_of(v.disk_bytes))
            .bind(i64_of(v.data_bytes))
            .bind(i64_of(v.file_bytes))
            .bind(&v.sha256)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        }
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok(true)
    }

    /// Marks a running backup failed, or gives a failed one a better reason
    /// (the job's own, known only once the saga has unwound); a backup that
    /// succeeded is left as it is.
    pub async fn backup_fail(&self, id: BackupId, error: &str) -> Result<(), Error> {
        sqlx::query(
            "UPDATE backups SET status = 'failed', error = $1, \
             finished_at = COALESCE(finished_at, $2) \
             WHERE id = $3 AND status IN ('running', 'failed')",
        )
        .bind(error)
        .bind(now_micros())
        .bind(id.to_string())
        .execute(&self.write)
        .await
        .map_err(|e| db_error("recording a failed backup", e))?;
        Ok(())
    }

    pub async fn backup_record_verification(
        &self,
        id: BackupId,
        ok: bool,
        problems: &[String],
    ) -> Result<BackupRecord, Error> {
        let problems = serde_json::to_string(problems)
            .map_err(|e| Error::internal(format!("encoding problems: {e}")))?;
        sqlx::query(
            "UPDATE backups SET verified_at = $1, verify_ok = $2, verify_problems = $3 WHERE id = $4",
        )
        .bind(now_micros())
        .bind(i64::from(ok))
        .bind(problems)
        .bind(id.to_string())
        .execute(&self.write)
        .await
        .map_err(|e| db_error("recording a backup verification", e))?;
        self.backup_get(id).await
    }

    /// The VM's newest backup, whatever its outcome (when a schedule last
    /// tried).
    pub async fn backup_latest(&self, vm: VmId) -> Result<Option<BackupRecord>, Error> {
        let row = sqlx::query(&format!(
            "{SELECT} WHERE vm_id = $1 ORDER BY id DESC LIMIT 1"
        ))
        .bind(vm.to_string())
        .fetch_optional(&self.read)
        .await
        .map_err(|e| db_error("reading backups", e))?;
        self.backup_filled(row).await
    }

    /// The backups built on `id` (its children in the chain).
    pub async fn backup_children(&self, id: BackupId) -> Result<Vec<BackupRecord>, Error> {
        let rows = sqlx::query(&format!("{SELECT} WHERE parent_id = $1 ORDER BY id"))
            .bind(id.to_string())
            .fetch_all(&self.read)
            .await
            .map_err(|e| db_error("reading backups", e))?;
        let mut recs: Vec<BackupRecord> = rows
            .iter()
            .map(BackupRecord::from_row)
            .collect::<Result<_, _>>()?;
        self.backup_volumes_fill(&mut recs).await?;
        Ok(recs)
    }

    /// Marks a finished backup `deleting`, unless a backup built on it is
    /// still running or being deleted (`backup_busy`). From then on it is
    /// nobody's parent-to-be.
    pub async fn backup_delete_begin(&self, id: BackupId) -> Result<BackupRecord, Error> {
        let done = sqlx::query(
            "UPDATE backups SET status = 'deleting' WHERE id = $1 \
             AND status IN ('succeeded', 'failed') AND NOT EXISTS (\
             SELECT 1 FROM backups c WHERE c.parent_id = $1 AND c.status IN ('running', 'deleting'))",
        )
        .bind(id.to_string())
        .execute(&self.write)
        .await
        .map_err(|e| db_error("deleting a backup", e))?;
        let b = self.backup_get(id).await?;
        if done.rows_affected() == 0 && b.status != BackupStatus::Deleting {
            return Err(Error::conflict(
                "backup_busy",
                "the backup is being taken, or a backup built on it is; try again when it ended",
            ));
        }
        Ok(b)
    }

    /// Takes a delete back (the host could not merge): the backup is what it
    /// was.
    pub async fn backup_delete_abort(&self, id: BackupId, was: BackupStatus) -> Result<(), Error> {
        sqlx::query("UPDATE backups SET status = $1 WHERE id = $2 AND status = 'deleting'")
            .bind(enum_str(&was))
            .bind(id.to_string())
            .execute(&self.write)
            .await
            .map_err(|e| db_error("restoring a backup", e))?;
        Ok(())
    }

    /// Ends a delete: the child (if any) now builds on `new_parent` with
    /// these figures, and the backup's row goes, in one transaction.
    pub async fn backup_delete_finish(
        &self,
        id: BackupId,
        child: Option<(BackupId, &BackupPruned)>,
        child_volumes: &[VolumeMerged],
        new_parent: Option<BackupId>,
    ) -> Result<(), Error> {
        let ctx = "deleting a backup";
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        // Failed backups that named it as parent (they hold no data) now
        // name its parent.
        sqlx::query("UPDATE backups SET parent_id = $1 WHERE parent_id = $2 AND status = 'failed'")
            .bind(new_parent.map(|p| p.to_string()))
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        if let Some((child, figures)) = child {
            let parent = new_parent;
            sqlx::query(
                "UPDATE backups SET parent_id = $1, data_bytes = $2, file_bytes = $3, sha256 = $4, \
                 mode = CASE WHEN $1 IS NULL THEN 'full' ELSE mode END, \
                 verified_at = NULL, verify_ok = NULL, verify_problems = NULL WHERE id = $5",
            )
            .bind(parent.map(|p| p.to_string()))
            .bind(i64_of(figures.data_bytes))
            .bind(i64_of(figures.file_bytes))
            .bind(&figures.sha256)
            .bind(child.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
            for m in child_volumes {
                sqlx::query(
                    "UPDATE backup_volumes SET data_bytes = $1, file_bytes = $2, sha256 = $3, \
                     mode = CASE WHEN $4 = 1 THEN 'full' ELSE mode END \
                     WHERE backup_id = $5 AND volume_id = $6",
                )
                .bind(i64_of(m.pruned.data_bytes))
                .bind(i64_of(m.pruned.file_bytes))
                .bind(&m.pruned.sha256)
                .bind(i64::from(m.now_full))
                .bind(child.to_string())
                .bind(m.pruned.volume_id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error(ctx, e))?;
            }
        }
        sqlx::query(
            "DELETE FROM backup_volumes WHERE backup_id = $1 AND EXISTS (\
             SELECT 1 FROM backups WHERE id = $1 AND status = 'deleting')",
        )
        .bind(id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(ctx, e))?;
        sqlx::query("DELETE FROM backups WHERE id = $1 AND status = 'deleting'")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok(())
    }

    /// Records the volumes a restore into a new VM creates (`attaching` to
    /// VM `vm`, not yet on a host, each with the backup file its content
    /// comes from), all or none; `name_in_use` if a name is taken. Written
    /// before the VM, so its host never starts it without them.
    pub async fn backup_restored_volumes_create(
        &self,
        project: ProjectId,
        vm: VmId,
        volumes: &[RestoredVolume],
    ) -> Result<(), Error> {
        let ctx = "recording restored volumes";
        let now = now_micros();
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        for v in volumes {
            sqlx::query(
                "INSERT INTO volumes (id, project_id, name, size_bytes, image_id, status, host_id, \
                 vm_id, created_at, updated_at, restore_from) \
                 VALUES ($1, $2, $3, $4, NULL, 'attaching', NULL, $5, $6, $6, $7)",
            )
            .bind(v.id.to_string())
            .bind(project.to_string())
            .bind(&v.name)
            .bind(i64_of(v.size_bytes))
            .bind(vm.to_string())
            .bind(now)
            .bind(&v.file)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    Error::conflict(
                        "name_in_use",
                        format!("a volume named {:?} already exists in this project", v.name),
                    )
                } else {
                    db_error(ctx, e)
                }
            })?;
        }
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok(())
    }

    /// The volumes still to be built from a backup for VM `vm` (its
    /// host's desired state lists them until its create job attached them).
    pub async fn backup_restored_volumes_of_vm(
        &self,
        vm: VmId,
    ) -> Result<Vec<RestoredVolume>, Error> {
        let rows = sqlx::query(
            "SELECT id, name, size_bytes, restore_from FROM volumes \
             WHERE vm_id = $1 AND restore_from IS NOT NULL ORDER BY id",
        )
        .bind(vm.to_string())
        .fetch_all(&self.read)
        .await
        .map_err(|e| db_error("reading restored volumes", e))?;
        rows.iter()
            .map(|r| {
                Ok(RestoredVolume {
                    id: r.parse("id")?,
                    name: r.text("name")?,
                    size_bytes: u64_of(r.int("size_bytes")?),
                    file: r.text("restore_from")?,
                })
            })
            .collect()
    }

    /// The create job of VM `vm` completed: its restored volumes are
    /// attached on `host`, built from their backups once and for all.
    pub async fn backup_restored_volumes_settle(
        &self,
        vm: VmId,
        host: HostId,
    ) -> Result<(), Error> {
        sqlx::query(
            "UPDATE volumes SET status = 'attached', host_id = $1, restore_from = NULL, \
             updated_at = $2 WHERE vm_id = $3 AND restore_from IS NOT NULL",
        )
        .bind(host.to_string())
        .bind(now_micros())
        .bind(vm.to_string())
        .execute(&self.write)
        .await
        .map_err(|e| db_error("recording restored volumes", e))?;
        Ok(())
    }

    /// The create of VM `vm` was taken back (or never written): the volumes
    /// meant to be restored beside it go too.
    pub async fn backup_restored_volumes_discard(&self, vm: VmId) -> Result<(), Error> {
        sqlx::query("DELETE FROM volumes WHERE vm_id = $1 AND restore_from IS NOT NULL")
            .bind(vm.to_string())
            .execute(&self.write)
            .await
            .map_err(|e| db_error("removing restored volumes", e))?;
        Ok(())
    }

    /// Forgets volumes recorded for a `backup restore --as` whose VM was
    /// never created (the controller died between the two writes) and that
    /// were recorded before `before` (micros): no host ever built them, as
    /// hosts build them only for their VM. How many went.
    pub async fn backup_restored_volumes_forget_unborn(&self, before: i64) -> Result<u64, Error> {
        let done = sqlx::query(
            "DELETE FROM volumes WHERE restore_from IS NOT NULL AND status = 'attaching' \
             AND host_id IS NULL AND created_at < $1 \
             AND NOT EXISTS (SELECT 1 FROM vms WHERE vms.id = volumes.vm_id)",
        )
        .bind(before)
        .execute(&self.write)
        .await
        .map_err(|e| db_error("forgetting volumes of VMs never created", e))?;
        Ok(done.rows_affected())
    }

    /// Sets (creates or replaces) a VM's backup policy.
    pub async fn backup_policy_set(
        &self,
        p: &BackupPolicyRecord,
    ) -> Result<BackupPolicyRecord, Error> {
        let now = now_micros();
        sqlx::query(
            "INSERT INTO backup_policies (vm_id, project_id, target_id, every_secs, keep_last, \
             keep_daily, keep_weekly, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) \
             ON CONFLICT (vm_id) DO UPDATE SET target_id = $3, every_secs = $4, keep_last = $5, \
             keep_daily = $6, keep_weekly = $7, updated_at = $8",
        )
        .bind(p.vm_id.to_string())
        .bind(p.project_id.to_string())
        .bind(p.target_id.map(|t| t.to_string()))
        .bind(p.every_secs.map(i64_of))
        .bind(i64::from(p.keep_last))
        .bind(i64::from(p.keep_daily))
        .bind(i64::from(p.keep_weekly))
        .bind(now)
        .execute(&self.write)
        .await
        .map_err(|e| db_error("recording a backup policy", e))?;
        self.backup_policy_get(p.vm_id)
            .await?
            .ok_or_else(|| Error::internal("the backup policy vanished"))
    }

    pub async fn backup_policy_get(&self, vm: VmId) -> Result<Option<BackupPolicyRecord>, Error> {
        let row = sqlx::query(&format!("{POLICY_SELECT} WHERE vm_id = $1"))
            .bind(vm.to_string())
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("reading a backup policy", e))?;
        row.as_ref().map(BackupPolicyRecord::from_row).transpose()
    }

    /// Every policy (of one project, when given), by VM id.
    pub async fn backup_policy_list(
        &self,
        project: Option<ProjectId>,
    ) -> Result<Vec<BackupPolicyRecord>, Error> {
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
        .map_err(|e| db_error("reading backup policies", e))?;
        rows.iter().map(BackupPolicyRecord::from_row).collect()
    }

    /// Removes a VM's policy; whether there was one.
    pub async fn backup_policy_delete(&self, vm: VmId) -> Result<bool, Error> {
        let done = sqlx::query("DELETE FROM backup_policies WHERE vm_id = $1")
            .bind(vm.to_string())
            .execute(&self.write)
            .await
            .map_err(|e| db_error("removing a backup policy", e))?;
        Ok(done.rows_affected() > 0)
    }
}

const POLICY_SELECT: &str =
    "SELECT vm_id, project_id, target_id, every_secs, keep_last, keep_daily, \
     keep_weekly, created_at, updated_at FROM backup_policies";

/// When a VM is backed up by itself, and which restore points are kept.
#[derive(Debug, Clone)]
pub struct BackupPolicyRecord {
    pub vm_id: VmId,
    pub project_id: ProjectId,
    pub target_id: Option<BackupTargetId>,
    pub every_secs: Option<u64>,
    pub keep_last: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub created_at: i64,
    pub updated_at: i64,
}

impl BackupPolicyRecord {
    fn from_row(r: &sqlx::any::AnyRow) -> Result<Self, Error> {
        let count = |c: &str| -> Result<u32, Error> { Ok(u32::try_from(r.int(c)?).unwrap_or(0)) };
        Ok(BackupPolicyRecord {
            vm_id: r.parse("vm_id")?,
            project_id: r.parse("project_id")?,
            target_id: r.opt_parse("target_id")?,
            every_secs: r.opt_int("every_secs")?.map(u64_of),
            keep_last: count("keep_last")?,
            keep_daily: count("keep_daily")?,
            keep_weekly: count("keep_weekly")?,
            created_at: r.int("created_at")?,
            updated_at: r.int("updated_at")?,
        })
    }

    pub fn into_view(self) -> views::BackupPolicy {
        views::BackupPolicy {
            vm_id: self.vm_id,
            project_id: self.project_id,
            target_id: self.target_id,
            every_secs: self.every_secs,
            keep_last: self.keep_last,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            updated_at: from_micros(self.updated_at),
        }
    }
}
