//! What the scheduler reads and writes besides VMs: clusters (overcommit
//! ratios and weigher), server groups, host tags, each host's allocation,
//! and the snapshot the controller's in-memory capacity index is built from.

use stratus_api_types::views::{GroupPolicy, Weigher};
use stratus_common::time::now_micros;
use stratus_common::{Error, HostId, ProjectId, ResourceKind, ServerGroupId};

use crate::db::{db_error, is_fk_violation, is_unique_violation};
use crate::model::{enum_str, ClusterRecord, HostRecord, ServerGroupRecord};
use crate::page::{ListQuery, Page, PageRequest};
use crate::Datastore;

/// Default overcommit, in thousandths: vCPUs 4.0, memory 1.0, disk 1.0.
pub const DEFAULT_RATIOS_MILLI: (u32, u32, u32) = (4000, 1000, 1000);

const CLUSTER_SELECT: &str = "SELECT name, cpu_ratio_milli, ram_ratio_milli, disk_ratio_milli, weigher, \
     created_at, updated_at, (SELECT COUNT(*) FROM hosts WHERE hosts.cluster = clusters.name) AS hosts \
     FROM clusters";

const GROUP_SELECT: &str = "SELECT id, project_id, name, policy, created_at, \
     (SELECT COUNT(*) FROM vms WHERE vms.server_group_id = server_groups.id) AS members FROM server_groups";

/// Changes to a cluster's policy; `None` keeps the current value.
#[derive(Debug, Default, Clone)]
pub struct ClusterChange {
    pub cpu_ratio_milli: Option<u32>,
    pub ram_ratio_milli: Option<u32>,
    pub disk_ratio_milli: Option<u32>,
    pub weigher: Option<Weigher>,
}

/// Everything the scheduler's index is built from, read in one go.
#[derive(Debug, Clone)]
pub struct SchedulerSnapshot {
    pub hosts: Vec<HostRecord>,
    pub clusters: Vec<ClusterRecord>,
    /// (group, host, members of the group on that host).
    pub group_members: Vec<(ServerGroupId, HostId, u32)>,
}

/// Records a cluster with the default policy unless it exists.
pub(crate) async fn ensure_cluster(
    conn: &mut sqlx::AnyConnection,
    name: &str,
    now: i64,
) -> Result<(), Error> {
    let (c, r, d) = DEFAULT_RATIOS_MILLI;
    sqlx::query(
        "INSERT INTO clusters (name, cpu_ratio_milli, ram_ratio_milli, disk_ratio_milli, weigher, created_at, \
         updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6) ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(i64::from(c))
    .bind(i64::from(r))
    .bind(i64::from(d))
    .bind(enum_str(&Weigher::default()))
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(|e| db_error("recording a cluster", e))?;
    Ok(())
}

/// What a VM held by a job takes: of its host (vCPUs, memory, and disk
/// unless the disk is in a shared pool) and of its shared pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VmShare {
    pub host: Option<String>,
    pub vcpus: i64,
    pub memory: i64,
    /// Disk on the host itself: 0 for a VM in a shared pool.
    pub host_disk: i64,
    pub pool: Option<String>,
    pub disk: i64,
}

/// A `vms` row as `vm_share` reads it.
type ShareRow = (Option<String>, i64, i64, Option<String>, i64);

/// The share of the VM `vm` while `job` holds it; `None` otherwise.
pub(crate) async fn vm_share(
    conn: &mut sqlx::AnyConnection,
    vm: &str,
    job: &str,
) -> Result<Option<VmShare>, Error> {
    let row: Option<ShareRow> = sqlx::query_as(
        "SELECT host_id, vcpus, memory_bytes, pool_id, disk_bytes FROM vms \
         WHERE id = $1 AND active_job_id = $2",
    )
    .bind(vm)
    .bind(job)
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| db_error("reading what a VM takes", e))?;
    Ok(row.map(|(host, vcpus, memory, pool, disk)| VmShare {
        host,
        vcpus,
        memory,
        host_disk: if pool.is_some() { 0 } else { disk },
        pool,
        disk,
    }))
}

/// Adds (or, with negative amounts, releases) allocation on a host, never
/// below zero.
pub(crate) async fn adjust_allocation(
    conn: &mut sqlx::AnyConnection,
    host: &str,
    vcpus: i64,
    memory: i64,
    disk: i64,
) -> Result<(), Error> {
    sqlx::query(
        "UPDATE hosts SET \
         alloc_vcpus = CASE WHEN alloc_vcpus + $1 < 0 THEN 0 ELSE alloc_vcpus + $1 END, \
         alloc_memory_bytes = CASE WHEN alloc_memory_bytes + $2 < 0 THEN 0 ELSE alloc_memory_bytes + $2 END, \
         alloc_disk_bytes = CASE WHEN alloc_disk_bytes + $3 < 0 THEN 0 ELSE alloc_disk_bytes + $3 END, \
         generation = generation + 1 WHERE id = $4",
    )
    .bind(vcpus)
    .bind(memory)
    .bind(disk)
    .bind(host)
    .execute(&mut *conn)
    .await
    .map_err(|e| db_error("adjusting a host's allocation", e))?;
    Ok(())
}

impl Datastore {
    pub async fn cluster_list(&self) -> Result<Vec<ClusterRecord>, Error> {
        let rows = sqlx::query(&format!("{CLUSTER_SELECT} ORDER BY name"))
            .fetch_all(&self.read)
            .await
            .map_err(|e| db_error("listing clusters", e))?;
        rows.iter().map(ClusterRecord::from_row).collect()
    }

    pub async fn cluster_get(&self, name: &str) -> Result<ClusterRecord, Error> {
        let row = sqlx::query(&format!("{CLUSTER_SELECT} WHERE name = $1"))
            .bind(name)
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("reading a cluster", e))?;
        match row {
            Some(r) => ClusterRecord::from_row(&r),
            None => Err(Error::not_found(ResourceKind::Cluster, name)),
        }
    }

    /// Changes a cluster's policy. Lowering a ratio below what is allocated
    /// is allowed (VMs already placed stay); the hosts simply take no more
    /// until they are back under it.
    pub async fn cluster_update(
        &self,
        name: &str,
        change: &ClusterChange,
    ) -> Result<ClusterRecord, Error> {
        let done = sqlx::query(
            "UPDATE clusters SET cpu_ratio_milli = COALESCE($1, cpu_ratio_milli), \
             ram_ratio_milli = COALESCE($2, ram_ratio_milli), disk_ratio_milli = COALESCE($3, disk_ratio_milli), \
             weigher = COALESCE($4, weigher), updated_at = $5 WHERE name = $6",
        )
        .bind(change.cpu_ratio_milli.map(i64::from))
        .bind(change.ram_ratio_milli.map(i64::from))
        .bind(change.disk_ratio_milli.map(i64::from))
        .bind(change.weigher.map(|w| enum_str(&w)))
        .bind(now_micros())
        .bind(name)
        .execute(&self.write)
        .await
        .map_err(|e| db_error("updating a cluster", e))?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found(ResourceKind::Cluster, name));
        }
        self.cluster_get(name).await
    }

    pub async fn server_group_create(
        &self,
        project: ProjectId,
        name: &str,
        policy: GroupPolicy,
    ) -> Result<ServerGroupRecord, Error> {
        let id = ServerGroupId::new();
        sqlx::query(
            "INSERT INTO server_groups (id, project_id, name, policy, generation, created_at) \
             VALUES ($1, $2, $3, $4, 1, $5)",
        )
        .bind(id.to_string())
        .bind(project.to_string())
        .bind(name)
        .bind(enum_str(&policy))
        .bind(now_micros())
        .execute(&self.write)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                Error::conflict(
                    "name_in_use",
                    format!("a server group named {name:?} already exists in this project"),
                )
            } else {
                db_error("creating a server group", e)
            }
        })?;
        self.server_group_get(id).await
    }

    pub async fn server_group_get(&self, id: ServerGroupId) -> Result<ServerGroupRecord, Error> {
        let row = sqlx::query(&format!("{GROUP_SELECT} WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("reading a server group", e))?;
        match row {
            Some(r) => ServerGroupRecord::from_row(&r),
            None => Err(Error::not_found(ResourceKind::ServerGroup, id)),
        }
    }

    /// Groups named `name`, in one project or (for admins) in any.
    pub async fn server_group_find_by_name(
        &self,
        project: Option<ProjectId>,
        name: &str,
    ) -> Result<Vec<ServerGroupRecord>, Error> {
        let rows = match project {
            Some(p) => {
                sqlx::query(&format!(
                    "{GROUP_SELECT} WHERE project_id = $1 AND name = $2"
                ))
                .bind(p.to_string())
                .bind(name)
                .fetch_all(&self.read)
                .await
            }
            None => {
                sqlx::query(&format!("{GROUP_SELECT} WHERE name = $1 ORDER BY id"))
                    .bind(name)
                    .fetch_all(&self.read)
                    .await
            }
        }
        .map_err(|e| db_error("reading server groups", e))?;
        rows.iter().map(ServerGroupRecord::from_row).collect()
    }

    pub async fn server_group_list(
        &self,
        project: Option<ProjectId>,
        page: &PageRequest,
    ) -> Result<Page<ServerGroupRecord>, Error> {
        let mut q = ListQuery::new();
        if let Some(p) = project {
            q.eq("project_id", p.to_string());
        }
        q.fetch(
            &self.read,
            GROUP_SELECT,
            page,
            ServerGroupRecord::from_row,
            |g| g.id.to_string(),
        )
        .await
    }

    /// Deletes an empty server group; one with members is refused.
    pub async fn server_group_delete(&self, id: ServerGroupId) -> Result<(), Error> {
        let group = self.server_group_get(id).await?;
        if group.members > 0 {
            return Err(Error::conflict(
                "group_in_use",
                format!(
                    "server group {:?} still has {} VM(s); delete them first",
                    group.name, group.members
                ),
            ));
        }
        sqlx::query("DELETE FROM server_groups WHERE id = $1")
            .bind(id.to_string())
            .execute(&self.write)
            .await
            .map_err(|e| {
                if is_fk_violation(&e) {
                    Error::conflict(
                        "group_in_use",
                        format!(
                            "server group {:?} gained a member; delete it first",
                            group.name
                        ),
                    )
                } else {
                    db_error("deleting a server group", e)
                }
            })?;
        Ok(())
    }

    /// Replaces a host's tags.
    pub async fn host_set_tags(&self, id: HostId, tags: &[String]) -> Result<HostRecord, Error> {
        let done =
            sqlx::query("UPDATE hosts SET tags = $1, generation = generation + 1 WHERE id = $2")
                .bind(crate::model::tags_column(tags))
                .bind(id.to_string())
                .execute(&self.write)
                .await
                .map_err(|e| db_error("updating a host's tags", e))?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found(ResourceKind::Host, id));
        }
        self.host_get(id).await
    }

    /// Every host, cluster and group membership: the scheduler's index is
    /// rebuilt from this at start and refreshed from it periodically.
    pub async fn scheduler_snapshot(&self) -> Result<SchedulerSnapshot, Error> {
        let ctx = "reading the scheduler's snapshot";
        let rows = sqlx::query(&format!("{} ORDER BY id", crate::hosts::SELECT))
            .fetch_all(&self.read)
            .await
            .map_err(|e| db_error(ctx, e))?;
        let hosts = rows
            .iter()
            .map(HostRecord::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let clusters = self.cluster_list().await?;
        let members: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT server_group_id, host_id, COUNT(*) FROM vms \
             WHERE server_group_id IS NOT NULL AND host_id IS NOT NULL GROUP BY server_group_id, host_id",
        )
        .fetch_all(&self.read)
        .await
        .map_err(|e| db_error(ctx, e))?;
        let mut group_members = Vec::with_capacity(members.len());
        for (g, h, n) in members {
            let g = g
                .parse()
                .map_err(|_| Error::internal(format!("bad group id {g:?}")))?;
            let h = h
                .parse()
                .map_err(|_| Error::internal(format!("bad host id {h:?}")))?;
            group_members.push((g, h, u32::try_from(n).unwrap_or(u32::MAX)));
        }
        Ok(SchedulerSnapshot {
            hosts,
            clusters,
            group_members,
        })
    }

    /// Members of one group per host (after a claim conflicted on it).
    pub async fn server_group_members(
        &self,
        group: ServerGroupId,
    ) -> Result<Vec<(HostId, u32)>, Error> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT host_id, COUNT(*) FROM vms WHERE server_group_id = $1 AND host_id IS NOT NULL \
             GROUP BY host_id",
        )
        .bind(group.to_string())
        .fetch_all(&self.read)
        .await
        .map_err(|e| db_error("reading a server group's members", e))?;
        rows.into_iter()
            .map(|(h, n)| {
                let h = h
                    .parse()
                    .map_err(|_| Error::internal(format!("bad host id {h:?}")))?;
                Ok((h, u32::try_from(n).unwrap_or(u32::MAX)))
            })
            .collect()
    }
}
