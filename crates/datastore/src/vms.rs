//! VMs: the operator's intent (desired state) beside what was observed.
//!
//! **Invariant**: at most one job acts on a VM at a time. `active_job_id` is
//! set in the same transaction that records a new intent and its job, with a
//! condition that it was empty, and cleared in the transaction that records
//! the job's outcome. A second operation meanwhile gets `vm_busy`.

use stratus_api_types::views::{VmDesiredState, VmState};
use stratus_common::time::now_micros;
use stratus_common::{Error, FlavorId, HostId, ImageId, JobId, ProjectId, ResourceKind, VmId};

use crate::db::{db_error, is_unique_violation};
use crate::jobs::insert_job;
use crate::model::{enum_str, i64_of, JobRecord, NewJob, VmRecord};
use crate::page::{ListQuery, Page, PageRequest};
use crate::Datastore;

const SELECT: &str = "SELECT id, project_id, name, flavor_id, image_id, vcpus, memory_bytes, disk_bytes, \
                      desired_state, state, state_reason, host_id, active_job_id, generation, reboot_generation, \
                      observed_state, observed_reason, observed_generation, observed_reboot_generation, \
                      observed_at, guest, observed_intent_generation, created_at, updated_at FROM vms";

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
    /// Records a new VM (state `creating`) and the job that will create it,
    /// in one transaction.
    pub async fn vm_create_with_job(
        &self,
        vm: NewVm,
        job: NewJob,
    ) -> Result<(VmRecord, JobRecord), Error> {
        let ctx = "recording a new VM";
        let now = now_micros();
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        sqlx::query(
            "INSERT INTO vms (id, project_id, name, flavor_id, image_id, vcpus, memory_bytes, disk_bytes, \
             desired_state, state, active_job_id, generation, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'creating', $10, 1, $11, $11)",
        )
        .bind(vm.id.to_string())
        .bind(vm.project_id.to_string())
        .bind(&vm.name)
        .bind(vm.flavor_id.to_string())
        .bind(vm.image_id.to_string())
        .bind(i64::from(vm.vcpus))
        .bind(i64_of(vm.memory_bytes))
        .bind(i64_of(vm.disk_bytes))
        .bind(enum_str(&vm.desired_state))
        .bind(job.id.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                Error::conflict(
                    "name_in_use",
                    format!("a VM named {:?} already exists in this project", vm.name),
                )
            } else {
                db_error(ctx, e)
            }
        })?;
        let job = insert_job(&mut tx, &job, now).await?;
        let vm_rec = fetch_vm(&mut tx, vm.id).await?;
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok((vm_rec, job))
    }

    /// Records a new intent for an existing VM and the job that carries it
    /// out, provided no other job is acting on the VM.
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
        let q = sqlx::query(
            "UPDATE vms SET desired_state = $1, active_job_id = $2, generation = generation + 1, \
             updated_at = $3, state = $4, state_reason = NULL WHERE id = $5 AND active_job_id IS NULL",
        )
        .bind(enum_str(&desired))
        .bind(job.id.to_string())
        .bind(now)
        .bind(enum_str(&state))
        .bind(vm_id.to_string());
        let done = q.execute(&mut *tx).await.map_err(|e| db_error(ctx, e))?;
        if done.rows_affected() == 1 {
            if bump_reboot {
                sqlx::query(
                    "UPDATE vms SET reboot_generation = reboot_generation + 1 WHERE id = $1",
                )
                .bind(vm_id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error(ctx, e))?;
            }
            // The VM's host must hear of the new intent.
            sqlx::query(
                "UPDATE hosts SET desired_revision = desired_revision + 1 \
                 WHERE id = (SELECT host_id FROM vms WHERE id = $1)",
            )
            .bind(vm_id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        }
        if done.rows_affected() == 0 {
            let current = fetch_vm(&mut tx, vm_id).await?;
            return Err(Error::conflict(
                "vm_busy",
                format!(
                    "VM {:?} is busy with job {}; wait for it or cancel it",
                    current.name,
                    current
                        .active_job_id
                        .map(|j| j.to_string())
                        .unwrap_or_default()
                ),
            ));
        }
        let job = insert_job(&mut tx, &job, now).await?;
        let vm = fetch_vm(&mut tx, vm_id).await?;
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok((vm, job))
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
