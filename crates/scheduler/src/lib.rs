//! The scheduler as the controller runs it: the pure placement engine
//! (`stratus-placement`) over an in-memory capacity index of every host,
//! and claims written through the store.
//!
//! **Why an index and a guard.** Choosing a host must be fast at 10,000
//! hosts, so choices are made in memory, in microseconds. Memory is not the
//! truth, though: another controller may have placed VMs a moment ago. So
//! every choice is *claimed* by [`Datastore::vms_create`], whose guarded
//! `UPDATE` re-checks capacity in the database in the same transaction that
//! records the VMs. A claim the database refuses refreshes the hosts
//! concerned and chooses again, transparently; the caller only ever sees a
//! placement or a reasoned refusal.
//!
//! The index is rebuilt from the store at start and every few seconds (which
//! also catches other controllers' placements and removals), and updated in
//! place by this controller's own claims.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use stratus_api_types::views::{
    self, FilterCount, GroupPolicy as ApiGroupPolicy, HostState, NearMiss as ApiNearMiss,
    PlacementExplanation, Shortfall as ApiShortfall,
};
use stratus_common::{Error, HostId, ServerGroupId};
use stratus_datastore::model::{ClusterRecord, HostRecord, JobRecord, VmRecord};
use stratus_datastore::{CreateError, Datastore, NewVm, VmToCreate};
use stratus_placement::{
    BatchNoFit, ClusterPolicy, Engine, GroupPolicy, HostCondition, HostSnapshot, NoFit, Ratios,
    Request, Resources, Weigher,
};

/// How many times a claim refused by the store is retried with a fresh view
/// before the request gives up (each retry follows a real change by someone
/// else, so this is only reached under extreme contention).
const CLAIM_ATTEMPTS: usize = 12;

/// A VM to create, before the scheduler chose its host.
#[derive(Debug, Clone)]
pub struct PendingVm {
    pub vm: NewVm,
    pub job: stratus_datastore::model::NewJob,
}

/// Where a dry run would put each VM, or why it could not.
#[derive(Debug, Clone)]
pub struct Preview {
    /// (VM index, host, host name) for every VM that would be placed.
    pub placed: Vec<(usize, HostId, String)>,
    pub explanation: PlacementExplanation,
    /// Set when not every VM fits.
    pub refusal: Option<String>,
}

pub struct Scheduler {
    ds: Datastore,
    engine: Mutex<Engine>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").finish_non_exhaustive()
    }
}

impl Scheduler {
    /// Builds the index from the store.
    pub async fn load(ds: Datastore) -> Result<Arc<Self>, Error> {
        let engine = build_engine(&ds).await?;
        Ok(Arc::new(Scheduler {
            ds,
            engine: Mutex::new(engine),
        }))
    }

    fn engine(&self) -> MutexGuard<'_, Engine> {
        // A panic while holding the lock leaves a usable engine (every
        // operation on it is a complete update), so poisoning is ignored.
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rebuilds the index from the store.
    pub async fn refresh(&self) -> Result<(), Error> {
        let fresh = build_engine(&self.ds).await?;
        *self.engine() = fresh;
        Ok(())
    }

    /// Refreshes the index every `every` until the task is aborted.
    pub fn spawn_refresher(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = me.refresh().await {
                    tracing::warn!(error = %e, "could not refresh the scheduler's index");
                }
            }
        })
    }

    /// A host enrolled or changed: the index follows at once.
    pub fn host_changed(&self, host: &HostRecord) {
        self.engine().upsert_host(snapshot_of(host));
    }

    /// A cluster's policy changed.
    pub fn cluster_changed(&self, cluster: &ClusterRecord) {
        self.engine()
            .set_cluster_policy(&cluster.name, policy_of(cluster));
    }

    /// Places `vms` (all or none) and records them with their jobs, claiming
    /// their hosts in the same transaction. `group` is the server group they
    /// all join, if any.
    pub async fn create_vms(
        &self,
        vms: Vec<PendingVm>,
        group: Option<(ServerGroupId, ApiGroupPolicy)>,
    ) -> Result<Vec<(VmRecord, JobRecord)>, Error> {
        let reqs: Vec<Request> = vms.iter().map(|p| request_of(&p.vm, group)).collect();
        for _ in 0..CLAIM_ATTEMPTS {
            let hosts = {
                let mut engine = self.engine();
                engine
                    .place_batch(&reqs)
                    .map_err(|e| no_fit_error(&e, reqs.len()))?
            };
            let items: Vec<VmToCreate> = vms
                .iter()
                .zip(&hosts)
                .map(|(p, h)| VmToCreate {
                    vm: p.vm.clone(),
                    job: p.job.clone(),
                    host: Some(*h),
                })
                .collect();
            let outcome = self.ds.vms_create(&items, group).await;
            if outcome.is_err() {
                // Nothing was written: take back what the index reserved.
                let mut engine = self.engine();
                for (r, h) in reqs.iter().zip(&hosts) {
                    engine.release(*h, r.resources, r.group.map(|g| g.0));
                }
            }
            match outcome {
                Ok(done) => return Ok(done),
                Err(CreateError::Other(e)) => return Err(e),
                Err(CreateError::HostsChanged(changed)) => {
                    tracing::debug!(hosts = changed.len(), "claim refused; refreshing hosts");
                    for h in changed {
                        match self.ds.host_get(h).await {
                            Ok(rec) => self.host_changed(&rec),
                            Err(Error::NotFound { .. }) => self.engine().remove_host(h),
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(CreateError::GroupChanged(g)) => {
                    tracing::debug!(group = %g, "group changed under a claim; refreshing");
                    self.refresh().await?;
                }
            }
        }
        Err(Error::Unavailable {
            message: "placement kept conflicting with concurrent placements; retry".into(),
        })
    }

    /// Where a VM leaving its host should go: `named` if the operator named
    /// a host (still checked by every filter but zone and cluster, which a
    /// move across clusters leaves behind on purpose), else the scheduler's
    /// choice among the other hosts. `pool` is the shared pool its disk will
    /// be in there (`None`: the host's own), so only hosts that see it
    /// qualify; so must the pools of its attached volumes (`volume_pools`),
    /// which it opens where they are. Nothing is claimed here: the store's
    /// guarded claim (in the move's transaction) is the truth.
    pub fn choose_move(
        &self,
        vm: &VmRecord,
        group: Option<(ServerGroupId, ApiGroupPolicy)>,
        pool: Option<&str>,
        volume_pools: &[String],
        named: Option<(HostId, &str)>,
    ) -> Result<HostId, Error> {
        let source = vm.host_id;
        let engine = self.engine();
        // The transport the source uses: the destination must use the same.
        let source_tls = source.is_some_and(|s| uses_migration_tls(&engine, s));
        let (tls_required, tls_forbidden) = if source_tls {
            (Some(MIGRATION_TLS_TAG.to_string()), None)
        } else {
            (None, Some(MIGRATION_TLS_TAG.to_string()))
        };
        let req = Request {
            resources: Resources {
                vcpus: u64::from(vm.vcpus),
                memory_bytes: vm.memory_bytes,
                disk_bytes: if pool.is_some() { 0 } else { vm.disk_bytes },
            },
            zone: named.is_none().then(|| vm.placement.zone.clone()).flatten(),
            cluster: named
                .is_none()
                .then(|| vm.placement.cluster.clone())
                .flatten(),
            require_tags: vm
                .placement
                .require_tags
                .iter()
                .cloned()
                .chain(pool.map(pool_tag))
                .chain(volume_pools.iter().map(|p| pool_tag(p)))
                .chain(tls_required)
                .collect(),
            forbid_tags: vm
                .placement
                .forbid_tags
                .iter()
                .cloned()
                .chain(tls_forbidden)
                .collect(),
            group: group.map(|(g, p)| (g, group_policy(p))),
            exclude_hosts: source.into_iter().collect(),
        };
        match named {
            Some((host, name)) => {
                if uses_migration_tls(&engine, host) != source_tls {
                    let (this, other) = if source_tls {
                        ("uses TLS", "does not")
                    } else {
                        ("does not use TLS", "does")
                    };
                    return Err(Error::NoCapacity {
                        message: format!(
                            "host {name} cannot take the VM: the VM's host {this} for migrations and \
                             {name} {other}; both ends of a migration must use the same setting \
                             (the agents' --migration-tls-dir)"
                        ),
                        details: serde_json::Value::Null,
                    });
                }
                engine
                    .check_host(host, &req)
                    .map(|()| host)
                    .map_err(|f| Error::NoCapacity {
                        message: format!(
                            "host {name} cannot take the VM: it fails the {} filter",
                            f.as_str()
                        ),
                        details: serde_json::Value::Null,
                    })
            }
            None => engine.choose(&req).map_err(|e| {
                let details = serde_json::to_value(explanation_of(&e)).unwrap_or_default();
                // Tag filters that eliminated hosts may be the transport's
                // doing: say so, since the operator never set that tag.
                let by_tags = e.eliminated.iter().any(|x| {
                    matches!(
                        x.filter,
                        stratus_placement::Filter::RequiredTags
                            | stratus_placement::Filter::ForbiddenTags
                    ) && x.hosts > 0
                });
                let hint = if by_tags {
                    let transport = if source_tls { "TLS" } else { "plain" };
                    format!(
                        " (a VM moves only between hosts with the same migration transport, \
                         here {transport}; hosts using TLS carry the tag {MIGRATION_TLS_TAG})"
                    )
                } else {
                    String::new()
                };
                Error::NoCapacity {
                    message: format!("no other host can take the VM: {e}{hint}"),
                    details,
                }
            }),
        }
    }

    /// Where `vms` would go, and why not elsewhere, without creating
    /// anything.
    pub fn preview(
        &self,
        vms: &[NewVm],
        group: Option<(ServerGroupId, ApiGroupPolicy)>,
    ) -> Preview {
        let reqs: Vec<Request> = vms.iter().map(|v| request_of(v, group)).collect();
        let mut engine = self.engine();
        let Some(first) = reqs.first() else {
            return Preview {
                placed: vec![],
                explanation: PlacementExplanation {
                    hosts_total: 0,
                    feasible: 0,
                    eliminated: vec![],
                    near_misses: vec![],
                },
                refusal: None,
            };
        };
        let explained = engine.explain(first);
        let mut explanation = PlacementExplanation {
            hosts_total: explained.hosts_total as u64,
            feasible: explained.feasible as u64,
            eliminated: counts(&explained.eliminated),
            near_misses: explained.near_misses.iter().map(near_miss).collect(),
        };
        // The lock is held across the trial batch and its release, so no
        // other request sees the trial reservations.
        match engine.place_batch(&reqs) {
            Ok(hosts) => {
                let placed = hosts
                    .iter()
                    .enumerate()
                    .map(|(i, h)| {
                        let name = engine.host(*h).map(|s| s.name).unwrap_or_default();
                        (i, *h, name)
                    })
                    .collect();
                for (r, h) in reqs.iter().zip(&hosts) {
                    engine.release(*h, r.resources, r.group.map(|g| g.0));
                }
                Preview {
                    placed,
                    explanation,
                    refusal: None,
                }
            }
            Err(e) => {
                if e.index > 0 {
                    explanation = explanation_of(&e.reason);
                }
                Preview {
                    placed: vec![],
                    explanation,
                    refusal: Some(batch_message(&e, reqs.len())),
                }
            }
        }
    }
}

async fn build_engine(ds: &Datastore) -> Result<Engine, Error> {
    let snap = ds.scheduler_snapshot().await?;
    let mut engine = Engine::new();
    for c in &snap.clusters {
        engine.set_cluster_policy(&c.name, policy_of(c));
    }
    for h in &snap.hosts {
        engine.upsert_host(snapshot_of(h));
    }
    for (g, h, n) in &snap.group_members {
        engine.set_group_member_count(*g, *h, *n);
    }
    Ok(engine)
}

fn policy_of(c: &ClusterRecord) -> ClusterPolicy {
    ClusterPolicy {
        ratios: Ratios {
            cpu_milli: c.cpu_ratio_milli,
            ram_milli: c.ram_ratio_milli,
            disk_milli: c.disk_ratio_milli,
        },
        weigher: match c.weigher {
            views::Weigher::Spread => Weigher::Spread,
            views::Weigher::Pack => Weigher::Pack,
        },
    }
}

/// The tag a host whose migrations use TLS carries in the engine's index.
/// A move from such a host requires it and a move from a plain host forbids
/// it: QEMU's two ends must agree on the transport, so a host with the other
/// setting could only fail the migration. Operator tags are DNS labels, so
/// none can look like it.
pub const MIGRATION_TLS_TAG: &str = "migration:tls";

/// Whether the index knows `host` to use TLS for migrations.
fn uses_migration_tls(engine: &Engine, host: HostId) -> bool {
    engine
        .host(host)
        .is_some_and(|h| h.tags.iter().any(|t| t == MIGRATION_TLS_TAG))
}

/// The tag a host carries in the engine's index while it sees the shared
/// storage pool `name`, and that a VM in the pool requires. Operator tags
/// are DNS labels, so none can look like one; explanations count hosts
/// without the pool under the required-tags filter.
pub fn pool_tag(name: &str) -> String {
    format!("pool:{name}")
}

fn snapshot_of(h: &HostRecord) -> HostSnapshot {
    HostSnapshot {
        id: h.id,
        name: h.name.clone(),
        zone: h.zone.clone(),
        cluster: h.cluster.clone(),
        condition: match h.state {
            HostState::Up => HostCondition::Up,
            HostState::Unreachable => HostCondition::Unreachable,
            HostState::Maintenance => HostCondition::Maintenance,
        },
        tags: h
            .tags
            .iter()
            .cloned()
            .chain(h.pools.iter().map(|p| pool_tag(p)))
            .chain(h.migration_tls.then(|| MIGRATION_TLS_TAG.to_string()))
            .collect(),
        capacity: Resources {
            vcpus: u64::from(h.cpus),
            memory_bytes: h.memory_bytes,
            disk_bytes: h.disk_bytes,
        },
        allocated: Resources {
            vcpus: h.alloc_vcpus,
            memory_bytes: h.alloc_memory_bytes,
            disk_bytes: h.alloc_disk_bytes,
        },
    }
}

fn group_policy(p: ApiGroupPolicy) -> GroupPolicy {
    match p {
        ApiGroupPolicy::Affinity => GroupPolicy::Affinity,
        ApiGroupPolicy::AntiAffinity => GroupPolicy::AntiAffinity,
        ApiGroupPolicy::SoftAffinity => GroupPolicy::SoftAffinity,
        ApiGroupPolicy::SoftAntiAffinity => GroupPolicy::SoftAntiAffinity,
    }
}

fn request_of(vm: &NewVm, group: Option<(ServerGroupId, ApiGroupPolicy)>) -> Request {
    Request {
        resources: Resources {
            vcpus: u64::from(vm.vcpus),
            memory_bytes: vm.memory_bytes,
            // A shared pool's disk takes nothing of the host's own.
            disk_bytes: if vm.pool_id.is_some() {
                0
            } else {
                vm.disk_bytes
            },
        },
        zone: vm.placement.zone.clone(),
        cluster: vm.placement.cluster.clone(),
        require_tags: vm
            .placement
            .require_tags
            .iter()
            .cloned()
            .chain(vm.placement.pool.as_deref().map(pool_tag))
            .collect(),
        forbid_tags: vm.placement.forbid_tags.clone(),
        group: group.map(|(g, p)| (g, group_policy(p))),
        exclude_hosts: vec![],
    }
}

fn near_miss(n: &stratus_placement::NearMiss) -> ApiNearMiss {
    ApiNearMiss {
        host_id: n.host,
        host: n.name.clone(),
        lacking: n
            .lacking
            .iter()
            .map(|s| ApiShortfall {
                resource: s.resource.to_string(),
                needed: s.needed,
                available: s.available,
            })
            .collect(),
    }
}

fn explanation_of(n: &NoFit) -> PlacementExplanation {
    PlacementExplanation {
        hosts_total: n.hosts_total as u64,
        feasible: 0,
        eliminated: counts(&n.eliminated),
        near_misses: n.near_misses.iter().map(near_miss).collect(),
    }
}

fn counts(eliminated: &[stratus_placement::Elimination]) -> Vec<FilterCount> {
    eliminated
        .iter()
        .map(|e| FilterCount {
            filter: e.filter.as_str().to_string(),
            hosts: e.hosts as u64,
        })
        .collect()
}

fn batch_message(e: &BatchNoFit, total: usize) -> String {
    if total == 1 {
        e.reason.to_string()
    } else {
        format!(
            "only {} of {total} VMs could be placed, so none were: {}",
            e.index, e.reason
        )
    }
}

fn no_fit_error(e: &BatchNoFit, total: usize) -> Error {
    let details = serde_json::to_value(explanation_of(&e.reason)).unwrap_or_default();
    Error::NoCapacity {
        message: batch_message(e, total),
        details,
    }
}
