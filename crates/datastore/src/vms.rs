//! VMs: the operator's intent (desired state) beside what was observed.
//!
//! **Invariant**: at most one job acts on a VM at a time. `active_job_id` is
//! set in the same transaction that records a new intent and its job, with a
//! condition that it was empty, and cleared in the transaction that records
//! the job's outcome. A second operation meanwhile gets `vm_busy`.

use std::collections::BTreeMap;

use stratus_api_types::views::{GroupPolicy, RestartPolicy, VmDesiredState, VmPlacement, VmState};
use stratus_common::time::now_micros;
use stratus_common::{
    Error, FlavorId, HostId, ImageId, JobId, ProjectId, ResourceKind, ServerGroupId, StoragePoolId,
    VmId,
};

use crate::db::{db_error, is_unique_violation};
use crate::jobs::insert_job;
use crate::model::{enum_str, i64_of, JobRecord, NewJob, VmRecord};
use crate::page::{ListQuery, Page, PageRequest};
use crate::Datastore;

pub(crate) const SELECT: &str = "SELECT id, project_id, name, flavor_id, image_id, vcpus, memory_bytes, disk_bytes, \
                      desired_state, state, state_reason, host_id, active_job_id, generation, reboot_generation, \
                      observed_state, observed_reason, observed_generation, observed_reboot_generation, \
                      observed_at, guest, observed_intent_generation, server_group_id, placement, \
                      restart_policy, auto_restarts, auto_restart_window_at, auto_restart_given_up_at, \
                      restore_from, pool_id, migration_target, migration_pool, created_at, updated_at FROM vms";

/// A VM to record.
#[derive(Debug, Clone)]
pub struct NewVm {
    pub id: VmId,
    pub project_id: ProjectId,
    pub name: String,
    pub flavor_id: FlavorId,
    pub image_id: ImageId,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub desired_state: VmDesiredState,
    pub server_group_id: Option<ServerGroupId>,
    pub placement: VmPlacement,
    pub restart_policy: RestartPolicy,
    /// Restored from a backup: the disk starts as this file (absolute).
    pub restore_from: Option<String>,
    /// The shared pool for the disk (claimed there, not on the host);
    /// `None`: the host's local pool.
    pub pool_id: Option<StoragePoolId>,
}

/// A VM to record with its create job and, once the scheduler chose one,
/// its host.
#[derive(Debug, Clone)]
pub struct VmToCreate {
    pub vm: NewVm,
    pub job: NewJob,
    pub host: Option<HostId>,
}

/// Why [`Datastore::vms_create`] recorded nothing.
#[derive(Debug)]
pub enum CreateError {
    /// A chosen host no longer has room (another controller or request took
    /// it, its cluster's ratios shrank, or it left service): refresh these
    /// hosts and choose again.
    HostsChanged(Vec<HostId>),
    /// The server group's members moved since the choice: refresh the group
    /// and choose again.
    GroupChanged(ServerGroupId),
    Other(Error),
}

impl From<Error> for CreateError {
    fn from(e: Error) -> Self {
        CreateError::Other(e)
    }
}

/// The crash-loop limit of automatic restarts: at most `max` restarts
/// within `window_micros` of the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartLimit {
    pub max: u32,
    pub window_micros: i64,
}

impl RestartLimit {
    /// The window for a person: `10 min`, `90 s`.
    fn window_text(&self) -> String {
        let secs = self.window_micros / 1_000_000;
        if secs >= 60 && secs % 60 == 0 {
            format!("{} min", secs / 60)
        } else {
            format!("{secs} s")
        }
    }
}

/// What [`Datastore::vm_auto_restart`] did.
#[derive(Debug, Clone)]
pub enum AutoRestart {
    /// The start (intent and job) is recorded; `attempt` counts the
    /// automatic restarts in the current window, this one included.
    Started {
        vm: Box<VmRecord>,
        job: Box<JobRecord>,
        attempt: i64,
    },
    /// Too many restarts within the window: left crashed, its reason saying
    /// so.
    GaveUp { vm: Box<VmRecord> },
    /// No longer a candidate (an operator or another controller acted on
    /// it, it is no longer crashed, its host went down, ...).
    NotEligible,
}

/// Filters for [`Datastore::vm_list`].
#[derive(Debug, Default)]
pub struct VmListFilter<'a> {
    pub project: Option<ProjectId>,
    pub name: Option<&'a str>,
    pub state: Option<VmState>,
    pub host: Option<HostId>,
}

impl Datastore {
    /// Records a new, unplaced VM (state `creating`) and the job that will
    /// create it, in one transaction.
    pub async fn vm_create_with_job(
        &self,
        vm: NewVm,
        job: NewJob,
    ) -> Result<(VmRecord, JobRecord), Error> {
        let one = [VmToCreate {
            vm,
            job,
            host: None,
        }];
        match self.vms_create(&one, None).await {
            Ok(mut v) => v.pop().ok_or_else(|| Error::internal("no VM recorded")),
            Err(CreateError::Other(e)) => Err(e),
            Err(other) => Err(Error::internal(format!("unexpected {other:?}"))),
        }
    }

    /// Records new VMs with their jobs and claims their hosts, all in one
    /// transaction: every VM or none.
    ///
    /// **Claims never overbook.** The hosts' allocations grow by one guarded
    /// `UPDATE` ([`claim_hosts`]) whose condition re-checks, in the database, that the host is
    /// up and that the new allocation stays within its capacity times its
    /// cluster's ratios. Whatever the scheduler believed, two controllers (or
    /// two requests) cannot both take a host's last slot: the second guard
    /// fails, nothing is written, and the caller refreshes and chooses again.
    ///
    /// With a hard group policy, the group's row is locked first (an
    /// `UPDATE` of its generation) and its members' hosts re-read under that
    /// lock, so concurrent placements into one group are checked one after
    /// the other.
    pub async fn vms_create(
        &self,
        items: &[VmToCreate],
        group: Option<(ServerGroupId, GroupPolicy)>,
    ) -> Result<Vec<(VmRecord, JobRecord)>, CreateError> {
        let restores = items
            .iter()
            .any(|i| i.vm.restore_from.is_some() || i.vm.pool_id.is_some());
        match &self.combiner {
            // Restores and shared-pool VMs are rarer; the combined insert
            // carries neither their source nor their pool claim.
            Some(c) if !restores => c.submit(items.to_vec(), group).await,
            _ => create_one(&self.write, items, group).await,
        }
    }

    /// Records a new intent for an existing VM and the job that carries it
    /// out, provided no other job is acting on the VM. The operator taking
    /// charge also resets the VM's automatic-restart record (a VM whose
    /// restarts were given up restarts by itself again after its next crash).
    pub async fn vm_begin_operation(
        &self,
        vm_id: VmId,
        desired: VmDesiredState,
        state: VmState,
        bump_reboot: bool,
        job: NewJob,
    ) -> Result<(VmRecord, JobRecord), Error> {
        let ctx = "recording a VM operation";
        let now = now_micros();
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        let job = begin_operation(&mut tx, vm_id, desired, state, bump_reboot, &job, now).await?;
        sqlx::query(
            "UPDATE vms SET auto_restarts = 0, auto_restart_window_at = NULL, \
             auto_restart_given_up_at = NULL WHERE id = $1",
        )
        .bind(vm_id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(ctx, e))?;
        let vm = fetch_vm(&mut tx, vm_id).await?;
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok((vm, job))
    }

    /// Sets what happens when the VM goes down by itself, and re-arms its
    /// automatic restarts (the record of past ones is reset).
    pub async fn vm_set_restart_policy(
        &self,
        vm_id: VmId,
        policy: RestartPolicy,
    ) -> Result<VmRecord, Error> {
        let ctx = "setting a VM's restart policy";
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        let done = sqlx::query(
            "UPDATE vms SET restart_policy = $1, auto_restarts = 0, auto_restart_window_at = NULL, \
             auto_restart_given_up_at = NULL, updated_at = $2 WHERE id = $3",
        )
        .bind(enum_str(&policy))
        .bind(now_micros())
        .bind(vm_id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(ctx, e))?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found(ResourceKind::Vm, vm_id));
        }
        let vm = fetch_vm(&mut tx, vm_id).await?;
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok(vm)
    }

    /// VMs to restart after a crash: restart policy `on_crash`, shown
    /// `crashed` while still wanted running, no job acting on them,
    /// restarts not given up, on a host that is up. At most `limit`, oldest
    /// first.
    pub async fn vm_restart_candidates(&self, limit: u32) -> Result<Vec<VmRecord>, Error> {
        let rows = sqlx::query(&format!(
            "{SELECT} WHERE {RESTARTABLE} ORDER BY id LIMIT $1"
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await
        .map_err(|e| db_error("reading VMs to restart", e))?;
        rows.iter().map(VmRecord::from_row).collect()
    }

    /// Restarts a crashed VM by itself (the reconciler's doing), through the
    /// same intent-and-job path as an operator's start, unless it has been
    /// restarted `limit.max` times within `limit.window_micros` already:
    /// then it is left crashed, with a reason saying restarts were given up,
    /// until the operator acts on it. Everything is re-checked in the
    /// transaction (a controller racing for the same VM, an operator acting
    /// meanwhile), so of two callers at most one restarts the VM.
    pub async fn vm_auto_restart(
        &self,
        vm_id: VmId,
        limit: RestartLimit,
        now: i64,
        job: NewJob,
    ) -> Result<AutoRestart, Error> {
        let ctx = "restarting a crashed VM";
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        let before = match fetch_vm(&mut tx, vm_id).await {
            Ok(v) => v,
            Err(Error::NotFound { .. }) => return Ok(AutoRestart::NotEligible),
            Err(e) => return Err(e),
        };
        let crash = before
            .state_reason
            .clone()
            .unwrap_or_else(|| "no reason given".into());
        let window_start = now - limit.window_micros;
        // A window that began before `window_start` is over: this restart
        // opens a new one.
        let counted = sqlx::query(&format!(
            "UPDATE vms SET \
             auto_restarts = CASE WHEN auto_restart_window_at IS NULL OR auto_restart_window_at <= $1 \
             THEN 1 ELSE auto_restarts + 1 END, \
             auto_restart_window_at = CASE WHEN auto_restart_window_at IS NULL OR auto_restart_window_at <= $1 \
             THEN $2 ELSE auto_restart_window_at END \
             WHERE id = $3 AND {RESTARTABLE} AND (auto_restart_window_at IS NULL \
             OR auto_restart_window_at <= $1 OR auto_restarts < $4)"
        ))
        .bind(window_start)
        .bind(now)
        .bind(vm_id.to_string())
        .bind(i64::from(limit.max))
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(ctx, e))?;
        if counted.rows_affected() == 1 {
            let job = begin_operation(
                &mut tx,
                vm_id,
                VmDesiredState::Running,
                VmState::Starting,
                false,
                &job,
                now,
            )
            .await?;
            let attempt: i64 = sqlx::query_scalar("SELECT auto_restarts FROM vms WHERE id = $1")
                .bind(vm_id.to_string())
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| db_error(ctx, e))?;
            sqlx::query("UPDATE vms SET state_reason = $1 WHERE id = $2")
                .bind(format!(
                    "restarting by itself after a crash (restart policy on_crash; automatic restart \
                     {attempt} of at most {} within {}): {crash}",
                    limit.max,
                    limit.window_text()
                ))
                .bind(vm_id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error(ctx, e))?;
            let vm = fetch_vm(&mut tx, vm_id).await?;
            tx.commit().await.map_err(|e| db_error(ctx, e))?;
            return Ok(AutoRestart::Started {
                vm: Box::new(vm),
                job: Box::new(job),
                attempt,
            });
        }
        let gave_up = sqlx::query(&format!(
            "UPDATE vms SET auto_restart_given_up_at = $1, state_reason = $2, updated_at = $1 \
             WHERE id = $3 AND {RESTARTABLE} AND auto_restart_window_at > $4 AND auto_restarts >= $5"
        ))
        .bind(now)
        .bind(format!(
            "automatic restarts given up: it crashed again after {} automatic restarts within {}; \
             start it to try again (last crash: {crash})",
            before.auto_restarts,
            limit.window_text()
        ))
        .bind(vm_id.to_string())
        .bind(window_start)
        .bind(i64::from(limit.max))
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(ctx, e))?;
        if gave_up.rows_affected() == 0 {
            return Ok(AutoRestart::NotEligible);
        }
        let vm = fetch_vm(&mut tx, vm_id).await?;
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok(AutoRestart::GaveUp { vm: Box::new(vm) })
    }

    /// Records that the VM's disk was just replaced by the backup `file`
    /// (an in-place restore): like a VM created from a backup, its disk now
    /// has no base image, which a migration must know to copy it whole.
    pub async fn vm_set_restored_from(&self, id: VmId, file: &str) -> Result<(), Error> {
        sqlx::query("UPDATE vms SET restore_from = $1 WHERE id = $2")
            .bind(file)
            .bind(id.to_string())
            .execute(&self.write)
            .await
            .map_err(|e| db_error("recording a VM's restore", e))?;
        Ok(())
    }

    pub async fn vm_get(&self, id: VmId) -> Result<VmRecord, Error> {
        let mut conn = self
            .read
            .acquire()
            .await
            .map_err(|e| db_error("reading a VM", e))?;
        fetch_vm(&mut conn, id).await
    }

    /// VMs named `name`, in one project or (for admins) in any.
    pub async fn vm_find_by_name(
        &self,
        project: Option<ProjectId>,
        name: &str,
    ) -> Result<Vec<VmRecord>, Error> {
        let rows = match project {
            Some(p) => {
                sqlx::query(&format!("{SELECT} WHERE project_id = $1 AND name = $2"))
                    .bind(p.to_string())
                    .bind(name)
                    .fetch_all(&self.read)
                    .await
            }
            None => {
                sqlx::query(&format!("{SELECT} WHERE name = $1 ORDER BY id"))
                    .bind(name)
                    .fetch_all(&self.read)
                    .await
            }
        }
        .map_err(|e| db_error("reading VMs", e))?;
        rows.iter().map(VmRecord::from_row).collect()
    }

    pub async fn vm_list(
        &self,
        f: &VmListFilter<'_>,
        page: &PageRequest,
    ) -> Result<Page<VmRecord>, Error> {
        let mut q = ListQuery::new();
        if let Some(p) = f.project {
            q.eq("project_id", p.to_string());
        }
        if let Some(n) = f.name {
            q.eq("name", n);
        }
        if let Some(s) = f.state {
            q.eq("state", enum_str(&s));
        }
        if let Some(h) = f.host {
            q.eq("host_id", h.to_string());
        }
        q.fetch(&self.read, SELECT, page, VmRecord::from_row, |v| {
            v.id.to_string()
        })
        .await
    }

    /// The VM an active job is acting on, if it still holds the VM.
    pub async fn vm_of_job(&self, job: JobId) -> Result<Option<VmRecord>, Error> {
        let row = sqlx::query(&format!("{SELECT} WHERE active_job_id = $1"))
            .bind(job.to_string())
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("reading a VM", e))?;
        row.as_ref().map(VmRecord::from_row).transpose()
    }
}

/// The condition (on `vms`) for a VM the reconciler restarts after a crash.
const RESTARTABLE: &str = "restart_policy = 'on_crash' AND state = 'crashed' \
     AND desired_state = 'running' AND active_job_id IS NULL AND auto_restart_given_up_at IS NULL \
     AND host_id IN (SELECT id FROM hosts WHERE state = 'up')";

/// Records a new intent for a VM and its job, in the caller's transaction,
/// provided no other job holds the VM (else `vm_busy`, and the caller rolls
/// back); the VM's host is told (its desired revision grows).
pub(crate) async fn begin_operation(
    tx: &mut sqlx::AnyConnection,
    vm_id: VmId,
    desired: VmDesiredState,
    state: VmState,
    bump_reboot: bool,
    job: &NewJob,
    now: i64,
) -> Result<JobRecord, Error> {
    let ctx = "recording a VM operation";
    let done = sqlx::query(
        "UPDATE vms SET desired_state = $1, active_job_id = $2, generation = generation + 1, \
         updated_at = $3, state = $4, state_reason = NULL WHERE id = $5 AND active_job_id IS NULL",
    )
    .bind(enum_str(&desired))
    .bind(job.id.to_string())
    .bind(now)
    .bind(enum_str(&state))
    .bind(vm_id.to_string())
    .execute(&mut *tx)
    .await
    .map_err(|e| db_error(ctx, e))?;
    if done.rows_affected() == 0 {
        return Err(busy(tx, vm_id).await);
    }
    if bump_reboot {
        sqlx::query("UPDATE vms SET reboot_generation = reboot_generation + 1 WHERE id = $1")
            .bind(vm_id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
    }
    // The VM's host must hear of the new intent.
    sqlx::query(
        "UPDATE hosts SET desired_revision = desired_revision + 1, desired_changed_at = $2 \
         WHERE id = (SELECT host_id FROM vms WHERE id = $1)",
    )
    .bind(vm_id.to_string())
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(|e| db_error(ctx, e))?;
    insert_job(tx, job, now).await
}

/// `vm_busy`, naming the job that holds the VM.
async fn busy(tx: &mut sqlx::AnyConnection, vm_id: VmId) -> Error {
    match fetch_vm(tx, vm_id).await {
        Ok(current) => Error::conflict(
            "vm_busy",
            format!(
                "VM {:?} is busy with job {}; wait for it or cancel it",
                current.name,
                current
                    .active_job_id
                    .map(|j| j.to_string())
                    .unwrap_or_default()
            ),
        ),
        Err(e) => e,
    }
}

/// Makes `job` the VM's one active job without changing its intent (a
/// backup, a snapshot, a volume change), in the caller's transaction;
/// `vm_busy` if another job holds it.
pub(crate) async fn hold_vm(
    tx: &mut sqlx::AnyConnection,
    vm: VmId,
    job: JobId,
    now: i64,
) -> Result<(), Error> {
    let held = sqlx::query(
        "UPDATE vms SET active_job_id = $1, updated_at = $2 WHERE id = $3 AND active_job_id IS NULL",
    )
    .bind(job.to_string())
    .bind(now)
    .bind(vm.to_string())
    .execute(&mut *tx)
    .await
    .map_err(|e| db_error("holding a VM", e))?;
    if held.rows_affected() == 0 {
        return Err(busy(tx, vm).await);
    }
    Ok(())
}

pub(crate) async fn fetch_vm(conn: &mut sqlx::AnyConnection, id: VmId) -> Result<VmRecord, Error> {
    let row = sqlx::query(&format!("{SELECT} WHERE id = $1"))
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| db_error("reading a VM", e))?;
    match row {
        Some(r) => VmRecord::from_row(&r),
        None => Err(Error::not_found(ResourceKind::Vm, id)),
    }
}

/// One create (of one or more VMs) in its own transaction: see
/// [`Datastore::vms_create`].
pub(crate) async fn create_one(
    pool: &sqlx::AnyPool,
    items: &[VmToCreate],
    group: Option<(ServerGroupId, GroupPolicy)>,
) -> Result<Vec<(VmRecord, JobRecord)>, CreateError> {
    let ctx = "recording new VMs";
    let now = now_micros();
    let mut tx = pool.begin().await.map_err(|e| db_error(ctx, e))?;
    if let Some((gid, policy)) = group {
        let locked =
            sqlx::query("UPDATE server_groups SET generation = generation + 1 WHERE id = $1")
                .bind(gid.to_string())
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error(ctx, e))?;
        if locked.rows_affected() == 0 {
            return Err(Error::not_found(ResourceKind::ServerGroup, gid).into());
        }
        if matches!(policy, GroupPolicy::Affinity | GroupPolicy::AntiAffinity) {
            let rows: Vec<(String,)> = sqlx::query_as(
                "SELECT DISTINCT host_id FROM vms WHERE server_group_id = $1 AND host_id IS NOT NULL",
            )
            .bind(gid.to_string())
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
            let used: std::collections::BTreeSet<String> = rows.into_iter().map(|r| r.0).collect();
            let chosen: Vec<String> = items
                .iter()
                .filter_map(|i| i.host.map(|h| h.to_string()))
                .collect();
            let ok = match policy {
                GroupPolicy::AntiAffinity => {
                    let distinct: std::collections::BTreeSet<&String> = chosen.iter().collect();
                    distinct.len() == chosen.len() && chosen.iter().all(|h| !used.contains(h))
                }
                _ => {
                    let all: std::collections::BTreeSet<&String> =
                        used.iter().chain(chosen.iter()).collect();
                    all.len() <= 1
                }
            };
            if !ok {
                return Err(CreateError::GroupChanged(gid));
            }
        }
    }
    let per_host = claims_of(items.iter());
    if !claim_hosts(&mut tx, &per_host, now).await? {
        return Err(CreateError::HostsChanged(per_host.into_keys().collect()));
    }
    let mut per_pool: BTreeMap<StoragePoolId, i64> = BTreeMap::new();
    for i in items {
        if let Some(p) = i.vm.pool_id {
            *per_pool.entry(p).or_default() += i64_of(i.vm.disk_bytes);
        }
    }
    if let Some((pool, wanted)) = crate::pools::claim_pools(&mut tx, &per_pool).await? {
        return Err(CreateError::Other(Error::NoCapacity {
            message: format!(
                "storage pool {} has room for {} more bytes of disks ({} of {} allocated); \
                 these VMs need {wanted}",
                pool.name,
                pool.capacity_bytes.saturating_sub(pool.alloc_bytes),
                pool.alloc_bytes,
                pool.capacity_bytes
            ),
            details: serde_json::Value::Null,
        }));
    }
    let mut out = Vec::with_capacity(items.len());
    for i in items {
        let vm = &i.vm;
        let q = sqlx::query(
            "INSERT INTO vms (id, project_id, name, flavor_id, image_id, vcpus, memory_bytes, disk_bytes, \
             desired_state, state, active_job_id, generation, created_at, updated_at, host_id, \
             server_group_id, placement, restart_policy) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'creating', $10, 1, $11, $11, $12, $13, $14, $15)",
        );
        bind_vm(q, i, now)?.execute(&mut *tx).await.map_err(|e| {
            if is_unique_violation(&e) {
                Error::conflict(
                    "name_in_use",
                    format!("a VM named {:?} already exists in this project", vm.name),
                )
            } else {
                db_error(ctx, e)
            }
        })?;
        if let Some(pool) = vm.pool_id {
            sqlx::query("UPDATE vms SET pool_id = $1 WHERE id = $2")
                .bind(pool.to_string())
                .bind(vm.id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error(ctx, e))?;
        }
        if let Some(from) = &vm.restore_from {
            sqlx::query("UPDATE vms SET restore_from = $1 WHERE id = $2")
                .bind(from.clone())
                .bind(vm.id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error(ctx, e))?;
        }
        let job = insert_job(&mut tx, &i.job, now).await?;
        out.push((VmRecord::created(vm, i.host, i.job.id, now), job));
    }
    tx.commit().await.map_err(|e| db_error(ctx, e))?;
    Ok(out)
}

/// How many values [`bind_vm`] binds.
pub(crate) const VM_INSERT_VALUES: usize = 15;

/// Binds the [`VM_INSERT_VALUES`] values a VM's `INSERT` takes, in the order
/// both the single and the combined create write them: id, project, name,
/// flavor, image, vCPUs, memory, disk, desired state, job, time, host, group,
/// placement, restart policy.
pub(crate) fn bind_vm<'q>(
    q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    i: &VmToCreate,
    now: i64,
) -> Result<sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>, Error> {
    let vm = &i.vm;
    let placement = serde_json::to_string(&vm.placement)
        .map_err(|e| Error::internal(format!("encoding placement: {e}")))?;
    Ok(q.bind(vm.id.to_string())
        .bind(vm.project_id.to_string())
        .bind(vm.name.clone())
        .bind(vm.flavor_id.to_string())
        .bind(vm.image_id.to_string())
        .bind(i64::from(vm.vcpus))
        .bind(i64_of(vm.memory_bytes))
        .bind(i64_of(vm.disk_bytes))
        .bind(enum_str(&vm.desired_state))
        .bind(i.job.id.to_string())
        .bind(now)
        .bind(i.host.map(|h| h.to_string()))
        .bind(vm.server_group_id.map(|g| g.to_string()))
        .bind(placement)
        .bind(enum_str(&vm.restart_policy)))
}

/// What these VMs claim on each of their hosts: (vCPUs, memory, disk).
pub(crate) fn claims_of<'a>(
    items: impl Iterator<Item = &'a VmToCreate>,
) -> BTreeMap<HostId, (i64, i64, i64)> {
    let mut per_host: BTreeMap<HostId, (i64, i64, i64)> = BTreeMap::new();
    for i in items {
        if let Some(h) = i.host {
            let e = per_host.entry(h).or_default();
            e.0 += i64::from(i.vm.vcpus);
            e.1 += i64_of(i.vm.memory_bytes);
            // A shared pool's disk takes nothing of the host's own.
            if i.vm.pool_id.is_none() {
                e.2 += i64_of(i.vm.disk_bytes);
            }
        }
    }
    per_host
}

/// Claims every host at once with one guarded `UPDATE`: each host's
/// allocation grows only if the host is up and the result stays within its
/// capacity × its cluster's ratios, checked in the database. Returns whether
/// every host was claimed; if not, the caller rolls the transaction back.
/// The one definition of "a claim never overbooks", for every create path.
pub(crate) async fn claim_hosts(
    conn: &mut sqlx::AnyConnection,
    per_host: &BTreeMap<HostId, (i64, i64, i64)>,
    now: i64,
) -> Result<bool, Error> {
    if per_host.is_empty() {
        return Ok(true);
    }
    let values: Vec<String> = (0..per_host.len())
        .map(|n| {
            let b = n * 4;
            format!(
                "(${}, CAST(${} AS BIGINT), CAST(${} AS BIGINT), CAST(${} AS BIGINT))",
                b + 1,
                b + 2,
                b + 3,
                b + 4
            )
        })
        .collect();
    let sql = format!(
        "WITH d(hid, c, m, k) AS (VALUES {}) \
         UPDATE hosts SET \
         alloc_vcpus = alloc_vcpus + (SELECT c FROM d WHERE d.hid = hosts.id), \
         alloc_memory_bytes = alloc_memory_bytes + (SELECT m FROM d WHERE d.hid = hosts.id), \
         alloc_disk_bytes = alloc_disk_bytes + (SELECT k FROM d WHERE d.hid = hosts.id), \
         generation = generation + 1, desired_revision = desired_revision + 1, \
         desired_changed_at = ${} \
         WHERE id IN (SELECT hid FROM d) AND state = 'up' AND EXISTS (\
         SELECT 1 FROM clusters cl, d WHERE cl.name = hosts.cluster AND d.hid = hosts.id \
         AND (hosts.alloc_vcpus + d.c) * 1000 <= hosts.cpus * cl.cpu_ratio_milli \
         AND (hosts.alloc_memory_bytes + d.m) * 1000 <= hosts.memory_bytes * cl.ram_ratio_milli \
         AND (hosts.alloc_disk_bytes + d.k) * 1000 <= hosts.disk_bytes * cl.disk_ratio_milli)",
        values.join(", "),
        per_host.len() * 4 + 1
    );
    let mut q = sqlx::query(&sql);
    for (h, (c, m, k)) in per_host {
        q = q.bind(h.to_string()).bind(*c).bind(*m).bind(*k);
    }
    let done = q
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(|e| db_error("claiming hosts", e))?;
    Ok(done.rows_affected() == per_host.len() as u64)
}
