//! Moving VMs between hosts: `vm_migrate` (live while the VM runs, cold
//! when it is stopped) and host maintenance, which moves every VM off a
//! host. The destination is chosen (or, when named, checked) by the
//! scheduler and claimed in the transaction that records the job; the
//! `vm_migrate` saga (`stratus_jobs::migrate`) does the rest.

use stratus_api_types::params::VmMigrate;
use stratus_api_types::views::{Evacuation, HostMaintenance, HostState, VmOperation, VmState};
use stratus_common::{Error, VmId};
use stratus_datastore::model::VmRecord;
use stratus_jobs::kinds::{MigrationParams, VmJobParams};
use stratus_jobs::JobKind;

use crate::app::{lookup, pools, Actor, App};

/// Most bytes per second a migration may be limited to (and at least 1 MiB/s:
/// slower would never converge for any real guest).
const MIN_BANDWIDTH: u64 = 1 << 20;

pub async fn vm_migrate(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
    p: VmMigrate,
) -> Result<VmOperation, Error> {
    let vm = lookup::vm(app, actor, key, scope).await?;
    actor.require_admin("migrate VMs (choosing hosts is the operator's)")?;
    migrate(app, vm, p).await
}

async fn migrate(app: &App, vm: VmRecord, p: VmMigrate) -> Result<VmOperation, Error> {
    if let Some(b) = p.bandwidth {
        if b < MIN_BANDWIDTH {
            return Err(Error::invalid(
                "bandwidth",
                format!("bandwidth must be at least {MIN_BANDWIDTH} bytes per second"),
            ));
        }
    }
    if p.postcopy_after_passes == Some(0) {
        return Err(Error::invalid(
            "postcopy_after_passes",
            "postcopy_after_passes must be at least 1 (one pre-copy pass first)",
        ));
    }
    if let Some(job) = vm.active_job_id {
        return Err(Error::conflict(
            "vm_busy",
            format!(
                "VM {:?} is busy with job {job}; wait for it or cancel it",
                vm.name
            ),
        ));
    }
    let Some(source) = vm.host_id else {
        return Err(Error::conflict(
            "vm_not_placed",
            format!("VM {:?} is not on a host", vm.name),
        ));
    };
    let cold = match vm.state {
        VmState::Running if p.cold => {
            return Err(Error::conflict(
                "vm_running",
                format!(
                    "VM {:?} is running: stop it first for a cold migration, or migrate it live \
                     (without cold)",
                    vm.name
                ),
            ))
        }
        VmState::Running => false,
        VmState::Stopped => true,
        other => {
            return Err(Error::conflict(
                "invalid_vm_state",
                format!(
                    "VM {:?} is {}; only a running VM (live) or a stopped one (cold) can migrate",
                    vm.name,
                    other.as_str()
                ),
            ))
        }
    };
    // Attached volumes move with a running VM (the source says which, on
    // which ports, when the job starts); a cold move copies only the disk.
    let volumes = app.ds.volumes_of_vm(vm.id).await?;
    if cold && !volumes.is_empty() {
        let names: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
        return Err(Error::conflict(
            "volumes_attached",
            format!(
                "VM {:?} is stopped with volume(s) {names:?} attached, which a cold migration \
                 does not move: detach them first, or start the VM and migrate it live (its \
                 volumes move with it)",
                vm.name
            ),
        ));
    }
    // Volumes in a shared pool are opened where they are: the destination
    // must see their pools.
    let mut volume_pools: Vec<String> = volumes
        .iter()
        .filter_map(|v| {
            v.pool_id
                .map(|id| v.pool_name.clone().unwrap_or_else(|| id.to_string()))
        })
        .collect();
    volume_pools.sort();
    volume_pools.dedup();
    // The pool at the destination: the one named (a mapping across
    // clusters), else the one it is in.
    let target_pool = match p.pool.as_deref() {
        Some(k) => pools::pool_for_vm(app, Some(k)).await?,
        None => match vm.pool_id {
            Some(id) => {
                let rec = app.ds.pool_get(id).await?;
                Some((rec.id, rec.name))
            }
            None => None,
        },
    };
    // A live move copies each snapshot layer (the source describes them
    // first); a cold one copies the disk's active layer only, and the hosts
    // would refuse it after the job began: say so now (maintenance lists
    // the VM with this reason). In one shared pool the whole chain stays
    // where the destination opens it.
    let disk_stays = vm.pool_id.is_some() && target_pool.as_ref().map(|(id, _)| *id) == vm.pool_id;
    let snapshots = if disk_stays {
        0
    } else {
        app.ds.snapshot_list(vm.id).await?.len()
    };
    if cold && snapshots > 0 {
        return Err(Error::conflict(
            "vm_has_snapshots",
            format!(
                "VM {:?} is stopped with {snapshots} snapshot(s), whose layers a cold migration \
                 cannot carry yet: delete (merge) them first, or start the VM and migrate it \
                 live (its snapshots move with it)",
                vm.name
            ),
        ));
    }
    let group = match vm.server_group_id {
        Some(g) => {
            let rec = app.ds.server_group_get(g).await?;
            Some((g, rec.policy))
        }
        None => None,
    };
    let named = match p.host.as_deref() {
        Some(k) => {
            let h = lookup::host(app, k).await.map_err(|e| match e {
                Error::NotFound { .. } => Error::invalid("host", format!("host {k:?} not found")),
                other => other,
            })?;
            if h.id == source {
                return Err(Error::invalid(
                    "host",
                    format!("VM {:?} is already on host {}", vm.name, h.name),
                ));
            }
            Some(h)
        }
        None => None,
    };
    let target = app.scheduler.choose_move(
        &vm,
        group,
        target_pool.as_ref().map(|(_, n)| n.as_str()),
        &volume_pools,
        named.as_ref().map(|h| (h.id, h.name.as_str())),
    )?;
    let pool_dir = |id: Option<stratus_common::StoragePoolId>| async move {
        match id {
            Some(id) => app.ds.pool_get(id).await.map(|p| Some(p.path)),
            None => Ok(None),
        }
    };
    let params = MigrationParams {
        source,
        target,
        cold,
        bandwidth: p.bandwidth,
        auto_converge: p.auto_converge,
        postcopy_after_passes: p.postcopy_after_passes,
        source_pool: pool_dir(vm.pool_id).await?,
        target_pool: pool_dir(target_pool.as_ref().map(|(id, _)| *id)).await?,
        // A disk restored from a backup was converted from the backup's
        // chain: no base image under it, and its guest-visible size is the
        // flavor's (the create refuses images larger than that; a restore
        // grows a smaller backup to it).
        standalone_disk_bytes: vm.restore_from.is_some().then_some(vm.disk_bytes),
        volumes: !volumes.is_empty(),
        snapshots: snapshots > 0,
    };
    let params = VmJobParams {
        migration: Some(params),
        ..VmJobParams::from_vm(vm.state, vm.desired_state)
    };
    let job = crate::app::vms::vm_job(JobKind::VmMigrate, &vm, params)?;
    let (rec, job) = app
        .ds
        .vm_move_begin(
            vm.id,
            vm.desired_state,
            VmState::Migrating,
            job,
            target,
            target_pool.map(|(id, _)| id),
        )
        .await?;
    // The index counts the claim at once (the store already does).
    if let Ok(h) = app.ds.host_get(target).await {
        app.scheduler.host_changed(&h);
    }
    app.signals.host_desired_changed(source);
    app.signals.host_desired_changed(target);
    app.job_waker.notify_one();
    Ok(VmOperation {
        vm: rec.into_view(),
        job: job.into_view(vec![]),
    })
}

/// Turns maintenance on (no new VMs; every VM moved away, each by its own
/// job, targets chosen by the scheduler) or off.
pub async fn host_maintenance(
    app: &App,
    actor: &Actor,
    key: &str,
    enabled: bool,
) -> Result<HostMaintenance, Error> {
    actor.require_admin("put hosts in maintenance")?;
    let host = lookup::host(app, key).await?;
    let host = app.ds.host_set_maintenance(host.id, enabled).await?;
    app.scheduler.host_changed(&host);
    let mut vms = Vec::new();
    if enabled {
        if host.state != HostState::Maintenance {
            return Err(Error::internal("the host did not enter maintenance"));
        }
        for vm in app.ds.vms_on_host(host.id).await? {
            vms.push(evacuate(app, vm).await);
        }
        tracing::info!(host = %host.id, name = %host.name, vms = vms.len(), moving = vms.iter().filter(|v| v.job_id.is_some()).count(), "host in maintenance; moving its VMs away");
    } else {
        tracing::info!(host = %host.id, name = %host.name, "host back in service");
    }
    Ok(HostMaintenance {
        host: host.into_view(),
        vms,
    })
}

async fn evacuate(app: &App, vm: VmRecord) -> Evacuation {
    let (vm_id, name): (VmId, String) = (vm.id, vm.name.clone());
    match migrate(app, vm, VmMigrate::default()).await {
        Ok(op) => Evacuation {
            vm_id,
            name,
            target_host_id: op.vm.migration_target,
            job_id: Some(op.job.id),
            error: None,
        },
        Err(e) => Evacuation {
            vm_id,
            name,
            target_host_id: None,
            job_id: None,
            error: Some(e.to_string()),
        },
    }
}
