//! Jobs: durable records of operations, their step log, and the claims that
//! say which controller runs them.
//!
//! ```text
//!  queued ─claim─► running ─► succeeded
//!    │               │  └───► failed
//!    │               └─cancel─► cancelling ─► cancelled
//!    └─cancel (before any step ran)─────────► cancelled
//!  running, lease expired (controller died) ─► running under another
//!  controller, its saga resumed from the log (see `sagas.rs`)
//! ```
//!
//! **Invariant**: a job's outcome and its effect on its target (the VM's new
//! state, or the VM's removal) are written in one transaction
//! ([`Datastore::job_finish`]), so a VM never shows an outcome its job does
//! not, and the VM's `active_job_id` is released exactly then.

use sqlx::any::AnyRow;
use stratus_api_types::views::{JobState, VmDesiredState, VmState};
use stratus_common::time::now_micros;
use stratus_common::{Error, HostId, JobId, ProjectId, ResourceKind, VmId};

use crate::db::{db_error, is_unique_violation};
use crate::model::{enum_str, JobEventRecord, JobRecord, NewJob, RowExt};
use crate::page::{ListQuery, Page, PageRequest};
use crate::Datastore;

const SELECT: &str = "SELECT id, project_id, kind, target_kind, target_id, state, progress, current_step, \
                      error_code, error_message, params, idempotency_key, owner, lease_expires_at, \
                      cancel_requested_at, created_at, started_at, finished_at, updated_at FROM jobs";

/// Filters for [`Datastore::job_list`].
#[derive(Debug, Default)]
pub struct JobListFilter<'a> {
    pub project: Option<ProjectId>,
    pub state: Option<JobState>,
    pub kind: Option<&'a str>,
    pub target: Option<uuid::Uuid>,
}

/// What a finished job does to the VM it acted on, written with the outcome.
#[derive(Debug, Clone)]
pub enum VmEffect {
    /// Set the VM's observed state (and placement), release it.
    Update {
        vm_id: VmId,
        state: VmState,
        state_reason: Option<String>,
        host_id: Option<HostId>,
        /// Restores the operator's intent (when a job is cancelled).
        desired_state: Option<VmDesiredState>,
    },
    /// The VM is gone: remove its record.
    Remove { vm_id: VmId },
}

/// How a job ended.
#[derive(Debug, Clone)]
pub enum JobOutcome {
    Succeeded,
    Failed { code: String, message: String },
    Cancelled { message: String },
}

pub(crate) async fn insert_job(
    conn: &mut sqlx::AnyConnection,
    job: &NewJob,
    now: i64,
) -> Result<JobRecord, Error> {
    let params = job.params.to_string();
    sqlx::query(
        "INSERT INTO jobs (id, project_id, kind, target_kind, target_id, state, progress, params, \
         idempotency_key, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'queued', 0, $6, $7, $8, $8)",
    )
    .bind(job.id.to_string())
    .bind(job.project_id.map(|p| p.to_string()))
    .bind(&job.kind)
    .bind(job.target_kind)
    .bind(job.target_id.to_string())
    .bind(params)
    .bind(job.idempotency_key.clone())
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(|e| {
        if is_unique_violation(&e) {
            Error::conflict("idempotency_key_in_use", "this Idempotency-Key was already used for another request")
        } else {
            db_error("recording a job", e)
        }
    })?;
    insert_event(conn, job.id, now, "queued", "job accepted").await?;
    fetch_job(conn, job.id).await
}

async fn insert_event(
    conn: &mut sqlx::AnyConnection,
    job: JobId,
    at: i64,
    step: &str,
    message: &str,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO job_events (job_id, seq, at, step, message) \
         SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3, $4 FROM job_events WHERE job_id = $1",
    )
    .bind(job.to_string())
    .bind(at)
    .bind(step)
    .bind(message)
    .execute(&mut *conn)
    .await
    .map_err(|e| db_error("recording a job event", e))?;
    Ok(())
}

async fn fetch_job(conn: &mut sqlx::AnyConnection, id: JobId) -> Result<JobRecord, Error> {
    let row = sqlx::query(&format!("{SELECT} WHERE id = $1"))
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| db_error("reading a job", e))?;
    match row {
        Some(r) => JobRecord::from_row(&r),
        None => Err(Error::not_found(ResourceKind::Job, id)),
    }
}

fn event_from_row(r: &AnyRow) -> Result<JobEventRecord, Error> {
    Ok(JobEventRecord {
        seq: r.int("seq")?,
        at: r.int("at")?,
        step: r.text("step")?,
        message: r.text("message")?,
    })
}

impl Datastore {
    pub async fn job_get(&self, id: JobId) -> Result<JobRecord, Error> {
        let mut conn = self
            .read
            .acquire()
            .await
            .map_err(|e| db_error("reading a job", e))?;
        fetch_job(&mut conn, id).await
    }

    pub async fn job_events(&self, id: JobId) -> Result<Vec<JobEventRecord>, Error> {
        let rows = sqlx::query(
            "SELECT seq, at, step, message FROM job_events WHERE job_id = $1 ORDER BY seq",
        )
        .bind(id.to_string())
        .fetch_all(&self.read)
        .await
        .map_err(|e| db_error("reading job events", e))?;
        rows.iter().map(event_from_row).collect()
    }

    pub async fn job_list(
        &self,
        f: &JobListFilter<'_>,
        page: &PageRequest,
    ) -> Result<Page<JobRecord>, Error> {
        let mut q = ListQuery::new();
        if let Some(p) = f.project {
            q.eq("project_id", p.to_string());
        }
        if let Some(s) = f.state {
            q.eq("state", enum_str(&s));
        }
        if let Some(k) = f.kind {
            q.eq("kind", k);
        }
        if let Some(t) = f.target {
            q.eq("target_id", t.to_string());
        }
        q.fetch(&self.read, SELECT, page, JobRecord::from_row, |j| {
            j.id.to_string()
        })
        .await
    }

    /// The job created earlier with this idempotency key in this project.
    pub async fn job_by_idempotency_key(
        &self,
        project: Option<ProjectId>,
        key: &str,
    ) -> Result<Option<JobRecord>, Error> {
        let row = sqlx::query(&format!(
            "{SELECT} WHERE idempotency_key = $1 AND COALESCE(project_id, '') = $2"
        ))
        .bind(key)
        .bind(project.map(|p| p.to_string()).unwrap_or_default())
        .fetch_optional(&self.read)
        .await
        .map_err(|e| db_error("reading a job", e))?;
        row.as_ref().map(JobRecord::from_row).transpose()
    }

    /// Claims the oldest queued job for `owner` until `lease_until`. Safe
    /// against other controllers: the claim is a conditional update.
    pub async fn job_claim_next(
        &self,
        owner: &str,
        lease_until: i64,
    ) -> Result<Option<JobRecord>, Error> {
        let ctx = "claiming a job";
        for _ in 0..8 {
            let id: Option<String> = sqlx::query_scalar(
                "SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1",
            )
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error(ctx, e))?;
            let Some(id) = id else { return Ok(None) };
            let now = now_micros();
            let done = sqlx::query(
                "UPDATE jobs SET state = 'running', owner = $1, lease_expires_at = $2, \
                 started_at = COALESCE(started_at, $3), updated_at = $3 WHERE id = $4 AND state = 'queued'",
            )
            .bind(owner)
            .bind(lease_until)
            .bind(now)
            .bind(&id)
            .execute(&self.write)
            .await
            .map_err(|e| db_error(ctx, e))?;
            if done.rows_affected() == 1 {
                let id: JobId = id
                    .parse()
                    .map_err(|_| Error::internal(format!("job id {id:?} is not a UUID")))?;
                return self.job_get(id).await.map(Some);
            }
            // Another controller took it first; look again.
        }
        Ok(None)
    }

    /// Records that the job reached a step, with progress, in its log.
    /// Refused (conflict) if `owner` no longer holds the job.
    pub async fn job_step(
        &self,
        id: JobId,
        owner: &str,
        step: &str,
        progress: u8,
        message: &str,
        lease_until: i64,
    ) -> Result<JobRecord, Error> {
        let ctx = "recording job progress";
        let now = now_micros();
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        let done = sqlx::query(
            "UPDATE jobs SET current_step = $1, progress = $2, updated_at = $3, lease_expires_at = $4 \
             WHERE id = $5 AND owner = $6 AND state IN ('running', 'cancelling')",
        )
        .bind(step)
        .bind(i64::from(progress.min(100)))
        .bind(now)
        .bind(lease_until)
        .bind(id.to_string())
        .bind(owner)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(ctx, e))?;
        if done.rows_affected() == 0 {
            return Err(Error::conflict(
                "job_not_owned",
                format!("job {id} is no longer held by {owner}"),
            ));
        }
        insert_event(&mut tx, id, now, step, message).await?;
        let job = fetch_job(&mut tx, id).await?;
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok(job)
    }

    /// Ends a job and applies its effect on its VM in one transaction.
    pub async fn job_finish(
        &self,
        id: JobId,
        owner: &str,
        outcome: JobOutcome,
        effect: Option<VmEffect>,
    ) -> Result<JobRecord, Error> {
        let ctx = "recording a job outcome";
        let now = now_micros();
        let (state, code, message, event) = match &outcome {
            JobOutcome::Succeeded => (JobState::Succeeded, None, None, "job succeeded".to_string()),
            JobOutcome::Failed { code, message } => (
                JobState::Failed,
                Some(code.clone()),
                Some(message.clone()),
                format!("job failed: {message}"),
            ),
            JobOutcome::Cancelled { message } => (
                JobState::Cancelled,
                Some("cancelled".to_string()),
                Some(message.clone()),
                format!("job cancelled: {message}"),
            ),
        };
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        let done = sqlx::query(
            "UPDATE jobs SET state = $1, error_code = $2, error_message = $3, finished_at = $4, updated_at = $4, \
             progress = CASE WHEN $1 = 'succeeded' THEN 100 ELSE progress END, lease_expires_at = NULL \
             WHERE id = $5 AND owner = $6 AND state IN ('running', 'cancelling')",
        )
        .bind(enum_str(&state))
        .bind(code)
        .bind(message)
        .bind(now)
        .bind(id.to_string())
        .bind(owner)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(ctx, e))?;
        if done.rows_affected() == 0 {
            return Err(Error::conflict(
                "job_not_owned",
                format!("job {id} is no longer held by {owner}"),
            ));
        }
        insert_event(&mut tx, id, now, enum_str(&state).as_str(), &event).await?;
        // The VM's allocation follows its placement: released from a host it
        // leaves (or when it is removed), added to one it joins.
        let vm_id = match &effect {
            Some(VmEffect::Update { vm_id, .. }) | Some(VmEffect::Remove { vm_id }) => Some(*vm_id),
            None => None,
        };
        let before = match vm_id {
            Some(v) => {
                crate::scheduling::vm_share(&mut tx, &v.to_string(), &id.to_string()).await?
            }
            None => None,
        };
        if let Some(crate::scheduling::VmShare {
            host: old_host,
            vcpus: cpu,
            memory: mem,
            host_disk: disk,
            ..
        }) = &before
        {
            let new_host = match &effect {
                Some(VmEffect::Update { host_id, .. }) => host_id.map(|h| h.to_string()),
                _ => None,
            };
            if *old_host != new_host {
                if let Some(h) = old_host {
                    crate::scheduling::adjust_allocation(&mut tx, h, -cpu, -mem, -disk).await?;
                }
                if let Some(h) = &new_host {
                    crate::scheduling::adjust_allocation(&mut tx, h, *cpu, *mem, *disk).await?;
                }
            }
        }
        match effect {
            Some(VmEffect::Update {
                vm_id,
                state,
                state_reason,
                host_id,
                desired_state,
            }) => {
                sqlx::query(
                    "UPDATE vms SET state = $1, state_reason = $2, host_id = $3, active_job_id = NULL, \
                     generation = generation + 1, updated_at = $4, \
                     desired_state = COALESCE($7, desired_state) WHERE id = $5 AND active_job_id = $6",
                )
                .bind(enum_str(&state))
                .bind(state_reason)
                .bind(host_id.map(|h| h.to_string()))
                .bind(now)
                .bind(vm_id.to_string())
                .bind(id.to_string())
                .bind(desired_state.map(|d| enum_str(&d)))
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error(ctx, e))?;
            }
            Some(VmEffect::Remove { vm_id }) => {
                let gone = sqlx::query("DELETE FROM vms WHERE id = $1 AND active_job_id = $2")
                    .bind(vm_id.to_string())
                    .bind(id.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| db_error(ctx, e))?;
                if gone.rows_affected() == 1 {
                    if let Some(share) = &before {
                        if let Some(pool) = &share.pool {
                            crate::pools::release_pool(&mut tx, pool, share.disk).await?;
                        }
                    }
                    // Volumes outlive their VM: the host forgot the
                    // attachment with the VM.
                    sqlx::query(
                        "UPDATE volumes SET vm_id = NULL, status = 'available', updated_at = $2 \
                         WHERE vm_id = $1",
                    )
                    .bind(vm_id.to_string())
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| db_error(ctx, e))?;
                }
            }
            None => {}
        }
        let job = fetch_job(&mut tx, id).await?;
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok(job)
    }

    /// Asks a job to stop. Returns the job as it now stands; a job already
    /// ended is a conflict.
    pub async fn job_request_cancel(&self, id: JobId) -> Result<JobRecord, Error> {
        let ctx = "cancelling a job";
        let now = now_micros();
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        let job = fetch_job(&mut tx, id).await?;
        if job.state.is_terminal() {
            return Err(Error::conflict(
                "job_finished",
                format!("job {id} already ended ({})", enum_str(&job.state)),
            ));
        }
        if job.cancel_requested_at.is_none() {
            sqlx::query(
                "UPDATE jobs SET cancel_requested_at = $1, updated_at = $1, \
                 state = CASE WHEN state = 'running' THEN 'cancelling' ELSE state END WHERE id = $2",
            )
            .bind(now)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
            insert_event(&mut tx, id, now, "cancel", "cancellation requested").await?;
        }
        let job = fetch_job(&mut tx, id).await?;
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok(job)
    }
}
