//! Shared storage pools: directories several hosts mount, where VMs created
//! in them keep their disks. The controller names every pool to every agent
//! (in the acknowledgement of its report); each agent checks the directory
//! and reports whether it can use it; the scheduler then places a pool's
//! VMs only on hosts that can, and the create transaction claims the VMs'
//! disks against the pool's capacity.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use stratus_api_types::agent::PoolAssignment;
use stratus_api_types::params::StoragePoolCreate;
use stratus_api_types::views::StoragePool;
use stratus_common::{Error, StoragePoolId};

use crate::app::{backups::shared_dir_path, lookup, Actor, App};

/// The name of every host's own pool (its agent's data directory). Not a
/// row: its capacity is the host's disk.
pub const LOCAL_POOL: &str = "local";

/// How long agents may be told of a pool list read before: a pool created
/// through another controller reaches the agents within this.
const CACHE_TTL: Duration = Duration::from_secs(5);

/// The pools as agents are told of them, read from the store at most every
/// [`CACHE_TTL`] (every report of every host carries the list).
#[derive(Default)]
pub struct PoolCache {
    cached: Mutex<Option<(Instant, Vec<PoolAssignment>)>>,
}

impl PoolCache {
    pub async fn assignments(&self, app: &App) -> Result<Vec<PoolAssignment>, Error> {
        if let Some((at, list)) = self.lock().as_ref() {
            if at.elapsed() < CACHE_TTL {
                return Ok(list.clone());
            }
        }
        let list: Vec<PoolAssignment> = app
            .ds
            .pool_list()
            .await?
            .into_iter()
            .map(|p| PoolAssignment {
                id: p.id,
                name: p.name,
                path: p.path,
            })
            .collect();
        *self.lock() = Some((Instant::now(), list.clone()));
        Ok(list)
    }

    /// Forgets the list, after a change made through this controller.
    pub fn invalidate(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Instant, Vec<PoolAssignment>)>> {
        // Every write replaces the whole value: a poisoned lock holds a
        // usable one.
        self.cached.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub async fn pool_create(
    app: &App,
    actor: &Actor,
    p: StoragePoolCreate,
) -> Result<StoragePool, Error> {
    actor.require_admin("create storage pools")?;
    if p.name.as_str() == LOCAL_POOL {
        return Err(Error::invalid(
            "name",
            "`local` names every host's own pool (its data directory); choose another name",
        ));
    }
    let path = shared_dir_path(&p.path)?;
    let rec = app.ds.pool_create(p.name.as_str(), path).await?;
    app.pools.invalidate();
    Ok(rec.into_view(vec![]))
}

pub async fn pool_list(app: &App) -> Result<Vec<StoragePool>, Error> {
    let mut out = Vec::new();
    for p in app.ds.pool_list().await? {
        let hosts = app.ds.pool_hosts(p.id).await?;
        out.push(p.into_view(hosts));
    }
    Ok(out)
}

pub async fn pool_get(app: &App, key: &str) -> Result<StoragePool, Error> {
    let p = lookup::pool(app, key).await?;
    let hosts = app.ds.pool_hosts(p.id).await?;
    Ok(p.into_view(hosts))
}

pub async fn pool_delete(app: &App, actor: &Actor, key: &str) -> Result<(), Error> {
    actor.require_admin("delete storage pools")?;
    let p = lookup::pool(app, key).await?;
    app.ds.pool_delete(p.id).await?;
    app.pools.invalidate();
    Ok(())
}

/// The pool a new VM's disk goes to, from the request's `pool` (name or
/// id): `None` for the host's own pool (`local`, the default).
pub(crate) async fn pool_for_vm(
    app: &App,
    key: Option<&str>,
) -> Result<Option<(StoragePoolId, String)>, Error> {
    match key {
        None => Ok(None),
        Some(k) if k == LOCAL_POOL => Ok(None),
        Some(k) => match lookup::pool(app, k).await {
            Ok(p) => Ok(Some((p.id, p.name))),
            Err(Error::NotFound { .. }) => Err(Error::invalid(
                "pool",
                format!("storage pool {k:?} not found (`local` is every host's own pool)"),
            )),
            Err(e) => Err(e),
        },
    }
}
