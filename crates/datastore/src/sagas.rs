//! The saga log and job ownership: what lets another controller (or the
//! same one, restarted) resume an operation where it stopped.
//!
//! A job is owned by one controller under a lease (`jobs.owner`,
//! `jobs.lease_expires_at`). The owner renews all its leases at once
//! ([`Datastore::job_renew_leases`]); a controller that stops renewing loses
//! its jobs to whichever controller adopts them first
//! ([`Datastore::job_adopt`]). Every saga event is written only while the
//! writer still owns the job ([`Datastore::saga_record`]), so a controller
//! that lost its lease (paused, cut off from the database) can never append
//! to a log another controller now drives.

use stratus_common::time::now_micros;
use stratus_common::{Error, HostId, JobId, VmId};

use crate::db::db_error;
use crate::model::JobRecord;
use crate::Datastore;

/// Which running jobs [`Datastore::job_adopt`] takes besides those whose
/// lease ran out.
#[derive(Clone, Copy, Debug)]
pub enum Adopt<'a> {
    /// Only expired leases.
    Expired,
    /// Also jobs held by earlier lives of the controller with this name (it
    /// restarted: they are dead). Controller names must be unique among
    /// live controllers.
    EarlierLivesOf(&'a str),
    /// Every running job: only when no other controller can be alive
    /// (SQLite, whose lock file admits one).
    Everything,
}

/// States in which a job has an owner and a saga in progress.
const ACTIVE: &str = "state IN ('running', 'cancelling')";

impl Datastore {
    /// Takes over running jobs: those whose owner stopped renewing its lease
    /// (`lease_expires_at < now`), plus, per `also`, those of this
    /// controller's earlier lives (or, on SQLite, every running job). Each
    /// takeover is a conditional update, so two controllers never adopt one
    /// job.
    pub async fn job_adopt(
        &self,
        owner: &str,
        now: i64,
        lease_until: i64,
        also: Adopt<'_>,
        limit: i64,
    ) -> Result<Vec<JobRecord>, Error> {
        let ctx = "adopting jobs";
        let expired = match also {
            Adopt::Everything => "COALESCE(owner, '') <> $1".to_string(),
            Adopt::Expired => "(lease_expires_at IS NULL OR lease_expires_at < $2)".to_string(),
            // `owner` is `CONTROLLER#INCARNATION`: a restarted controller
            // keeps its name, so jobs under that name and another
            // incarnation were its own, left when it died.
            Adopt::EarlierLivesOf(name) => {
                let prefix = format!("{name}#");
                format!(
                    "(lease_expires_at IS NULL OR lease_expires_at < $2 OR \
                     (owner <> $1 AND substr(owner, 1, {}) = '{}'))",
                    prefix.chars().count(),
                    prefix.replace('\'', "''")
                )
            }
        };
        let ids: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT id FROM jobs WHERE {ACTIVE} AND {expired} ORDER BY id LIMIT $3"
        ))
        .bind(owner)
        .bind(now)
        .bind(limit)
        .fetch_all(&self.read)
        .await
        .map_err(|e| db_error(ctx, e))?;
        let mut adopted = Vec::new();
        for id in ids {
            let done = sqlx::query(&format!(
                "UPDATE jobs SET owner = $1, lease_expires_at = $3, updated_at = $2 \
                 WHERE id = $4 AND {ACTIVE} AND {expired}"
            ))
            .bind(owner)
            .bind(now)
            .bind(lease_until)
            .bind(&id)
            .execute(&self.write)
            .await
            .map_err(|e| db_error(ctx, e))?;
            if done.rows_affected() == 1 {
                let id: JobId = id
                    .parse()
                    .map_err(|_| Error::internal(format!("job id {id:?} is not a UUID")))?;
                adopted.push(self.job_get(id).await?);
            }
        }
        Ok(adopted)
    }

    /// Extends the lease of every job `owner` runs; returns how many. One
    /// statement per controller per renewal period, however many jobs it
    /// runs.
    pub async fn job_renew_leases(&self, owner: &str, lease_until: i64) -> Result<u64, Error> {
        let done = sqlx::query(&format!(
            "UPDATE jobs SET lease_expires_at = $1 WHERE owner = $2 AND {ACTIVE}"
        ))
        .bind(lease_until)
        .bind(owner)
        .execute(&self.write)
        .await
        .map_err(|e| db_error("renewing job leases", e))?;
        Ok(done.rows_affected())
    }

    /// Ends every lease `owner` holds now (a controller shutting down), so
    /// the next controller adopts its jobs without waiting.
    pub async fn job_release_all(&self, owner: &str) -> Result<u64, Error> {
        let done = sqlx::query(&format!(
            "UPDATE jobs SET lease_expires_at = 0 WHERE owner = $1 AND {ACTIVE}"
        ))
        .bind(owner)
        .execute(&self.write)
        .await
        .map_err(|e| db_error("releasing job leases", e))?;
        Ok(done.rows_affected())
    }

    /// Whether `owner` still holds the job.
    pub async fn job_owned_by(&self, job: JobId, owner: &str) -> Result<bool, Error> {
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM jobs WHERE id = $1 AND owner = $2 AND {ACTIVE}"
        ))
        .bind(job.to_string())
        .bind(owner)
        .fetch_one(&self.write)
        .await
        .map_err(|e| db_error("reading a job's owner", e))?;
        Ok(n == 1)
    }

    /// Records the saga's graph when its saga is created. Refused (conflict)
    /// if `owner` no longer holds the job.
    pub async fn saga_create(&self, job: JobId, owner: &str, dag: &str) -> Result<(), Error> {
        let done = sqlx::query(&format!(
            "UPDATE jobs SET saga_dag = $1, saga_state = 'running' WHERE id = $2 AND owner = $3 AND {ACTIVE}"
        ))
        .bind(dag)
        .bind(job.to_string())
        .bind(owner)
        .execute(&self.write)
        .await
        .map_err(|e| db_error("recording a saga", e))?;
        if done.rows_affected() == 0 {
            return Err(not_owned(job, owner));
        }
        Ok(())
    }

    /// The saga's graph, if its saga was created.
    pub async fn saga_dag(&self, job: JobId) -> Result<Option<String>, Error> {
        let dag: Option<Option<String>> =
            sqlx::query_scalar("SELECT saga_dag FROM jobs WHERE id = $1")
                .bind(job.to_string())
                .fetch_optional(&self.write)
                .await
                .map_err(|e| db_error("reading a saga", e))?;
        Ok(dag.flatten())
    }

    /// Appends one event to the saga's log, once: recording the same
    /// (node, event type) again changes nothing. Returns false, writing
    /// nothing, if `owner` no longer holds the job.
    pub async fn saga_record(
        &self,
        job: JobId,
        owner: &str,
        node_id: i64,
        event_type: &str,
        event: &str,
    ) -> Result<bool, Error> {
        let ctx = "recording a saga event";
        let done = sqlx::query(&format!(
            "INSERT INTO saga_events (job_id, node_id, event_type, event, at) \
             SELECT $1, $2, $3, $4, $5 WHERE EXISTS \
             (SELECT 1 FROM jobs WHERE id = $1 AND owner = $6 AND {ACTIVE}) \
             ON CONFLICT (job_id, node_id, event_type) DO NOTHING"
        ))
        .bind(job.to_string())
        .bind(node_id)
        .bind(event_type)
        .bind(event)
        .bind(now_micros())
        .bind(owner)
        .execute(&self.write)
        .await
        .map_err(|e| db_error(ctx, e))?;
        if done.rows_affected() == 1 {
            return Ok(true);
        }
        // Nothing written: a repeat of an event already recorded, or the job
        // is no longer ours.
        self.job_owned_by(job, owner).await
    }

    /// Records the saga's coarse state (running, unwinding, done).
    pub async fn saga_set_state(&self, job: JobId, owner: &str, state: &str) -> Result<(), Error> {
        sqlx::query("UPDATE jobs SET saga_state = $1 WHERE id = $2 AND owner = $3")
            .bind(state)
            .bind(job.to_string())
            .bind(owner)
            .execute(&self.write)
            .await
            .map_err(|e| db_error("recording a saga's state", e))?;
        Ok(())
    }

    /// The saga's log, as recorded (serialized events).
    pub async fn saga_events(&self, job: JobId) -> Result<Vec<String>, Error> {
        sqlx::query_scalar("SELECT event FROM saga_events WHERE job_id = $1 ORDER BY at, node_id")
            .bind(job.to_string())
            .fetch_all(&self.write)
            .await
            .map_err(|e| db_error("reading a saga's log", e))
    }

    /// Removes a VM that `job` holds and releases its host's allocation, in
    /// one transaction: the undo of accepting a create. Returns whether the
    /// VM was there; running it again changes nothing.
    pub async fn vm_discard(&self, vm: VmId, job: JobId) -> Result<bool, Error> {
        let ctx = "discarding a VM";
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        let share = crate::scheduling::vm_share(&mut tx, &vm.to_string(), &job.to_string()).await?;
        let Some(share) = share else {
            tx.commit().await.map_err(|e| db_error(ctx, e))?;
            return Ok(false);
        };
        if let Some(h) = &share.host {
            crate::scheduling::adjust_allocation(
                &mut tx,
                h,
                -share.vcpus,
                -share.memory,
                -share.host_disk,
            )
            .await?;
            bump_host_revision(&mut tx, h).await?;
        }
        if let Some(p) = &share.pool {
            crate::pools::release_pool(&mut tx, p, share.disk).await?;
        }
        sqlx::query("DELETE FROM vms WHERE id = $1 AND active_job_id = $2")
            .bind(vm.to_string())
            .bind(job.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok(true)
    }

    /// Asks the VM's host to try the current intent again (a new intent
    /// generation, same desired state): how a job retries after its host
    /// reported a failure. Returns the VM's host and new generation.
    pub async fn vm_retry_intent(&self, vm: VmId) -> Result<(Option<HostId>, i64), Error> {
        let ctx = "asking a host to retry";
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        sqlx::query("UPDATE vms SET generation = generation + 1, updated_at = $2 WHERE id = $1")
            .bind(vm.to_string())
            .bind(now_micros())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        let row: Option<(Option<String>, i64)> =
            sqlx::query_as("SELECT host_id, generation FROM vms WHERE id = $1")
                .bind(vm.to_string())
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| db_error(ctx, e))?;
        let Some((host, generation)) = row else {
            return Err(Error::not_found(stratus_common::ResourceKind::Vm, vm));
        };
        if let Some(h) = &host {
            bump_host_revision(&mut tx, h).await?;
        }
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok((host.and_then(|h| h.parse().ok()), generation))
    }
}

/// Tells the host's long poll (here and on other controllers) that its
/// desired state changed.
pub(crate) async fn bump_host_revision(
    conn: &mut sqlx::AnyConnection,
    host: &str,
) -> Result<(), Error> {
    sqlx::query(
        "UPDATE hosts SET desired_revision = desired_revision + 1, desired_changed_at = $2 WHERE id = $1",
    )
    .bind(host)
    .bind(now_micros())
    .execute(&mut *conn)
    .await
    .map_err(|e| db_error("recording a host's new desired state", e))?;
    Ok(())
}

fn not_owned(job: JobId, owner: &str) -> Error {
    Error::conflict(
        "job_not_owned",
        format!("job {job} is no longer held by {owner}"),
    )
}
