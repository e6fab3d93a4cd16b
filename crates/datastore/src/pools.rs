//! Shared storage pools and what each host finds of them.
//!
//! A pool's `alloc_bytes` is the sum of the disks of the VMs in it and of
//! the volumes in it, claimed in the VM (or volume) create transaction by a
//! guarded `UPDATE` (never beyond the capacity a host last reported) and
//! released when the VM (or volume) is removed. A
//! host's `pools` column lists the pools it reported as usable, which the
//! scheduler reads like tags.

use stratus_api_types::agent::PoolReport;
use stratus_api_types::views;
use stratus_common::time::{from_micros, now_micros};
use stratus_common::{Error, HostId, ResourceKind, StoragePoolId};

use crate::db::{db_error, is_fk_violation, is_unique_violation};
use crate::model::{i64_of, tags_column, u64_of, RowExt};
use crate::Datastore;

const SELECT: &str = "SELECT id, name, path, capacity_bytes, available_bytes, alloc_bytes, \
                      created_at FROM storage_pools";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoragePoolRecord {
    pub id: StoragePoolId,
    pub name: String,
    pub path: String,
    pub capacity_bytes: u64,
    pub available_bytes: u64,
    pub alloc_bytes: u64,
    pub created_at: i64,
}

/// One host's last report on one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPoolRecord {
    pub host_id: HostId,
    pub host_name: String,
    pub error: Option<String>,
    pub reported_at: i64,
}

impl StoragePoolRecord {
    fn from_row(r: &sqlx::any::AnyRow) -> Result<Self, Error> {
        Ok(StoragePoolRecord {
            id: r.parse("id")?,
            name: r.text("name")?,
            path: r.text("path")?,
            capacity_bytes: u64_of(r.int("capacity_bytes")?),
            available_bytes: u64_of(r.int("available_bytes")?),
            alloc_bytes: u64_of(r.int("alloc_bytes")?),
            created_at: r.int("created_at")?,
        })
    }

    pub fn into_view(self, hosts: Vec<HostPoolRecord>) -> views::StoragePool {
        views::StoragePool {
            id: self.id,
            name: self.name,
            path: self.path,
            capacity_bytes: self.capacity_bytes,
            available_bytes: self.available_bytes,
            allocated_bytes: self.alloc_bytes,
            hosts: hosts
                .into_iter()
                .map(|h| views::PoolHost {
                    host_id: h.host_id,
                    host: h.host_name,
                    error: h.error,
                    reported_at: from_micros(h.reported_at),
                })
                .collect(),
            created_at: from_micros(self.created_at),
        }
    }
}

impl Datastore {
    pub async fn pool_create(&self, name: &str, path: &str) -> Result<StoragePoolRecord, Error> {
        let rec = StoragePoolRecord {
            id: StoragePoolId::new(),
            name: name.to_string(),
            path: path.to_string(),
            capacity_bytes: 0,
            available_bytes: 0,
            alloc_bytes: 0,
            created_at: now_micros(),
        };
        sqlx::query(
            "INSERT INTO storage_pools (id, name, path, created_at) VALUES ($1, $2, $3, $4)",
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
                    format!("a storage pool named {name:?} or at {path:?} already exists"),
                )
            } else {
                db_error("recording a storage pool", e)
            }
        })?;
        Ok(rec)
    }

    pub async fn pool_list(&self) -> Result<Vec<StoragePoolRecord>, Error> {
        let rows = sqlx::query(&format!("{SELECT} ORDER BY name"))
            .fetch_all(&self.read)
            .await
            .map_err(|e| db_error("reading storage pools", e))?;
        rows.iter().map(StoragePoolRecord::from_row).collect()
    }

    pub async fn pool_get(&self, id: StoragePoolId) -> Result<StoragePoolRecord, Error> {
        let row = sqlx::query(&format!("{SELECT} WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("reading a storage pool", e))?;
        match row {
            Some(r) => StoragePoolRecord::from_row(&r),
            None => Err(Error::not_found(ResourceKind::StoragePool, id)),
        }
    }

    pub async fn pool_by_name(&self, name: &str) -> Result<Option<StoragePoolRecord>, Error> {
        let row = sqlx::query(&format!("{SELECT} WHERE name = $1"))
            .bind(name)
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("reading a storage pool", e))?;
        row.as_ref().map(StoragePoolRecord::from_row).transpose()
    }

    /// The hosts' last reports on the pool, by host name.
    pub async fn pool_hosts(&self, id: StoragePoolId) -> Result<Vec<HostPoolRecord>, Error> {
        let rows: Vec<(String, String, Option<String>, i64)> = sqlx::query_as(
            "SELECT hp.host_id, h.name, hp.error, hp.reported_at FROM host_pools hp \
             JOIN hosts h ON h.id = hp.host_id WHERE hp.pool_id = $1 ORDER BY h.name",
        )
        .bind(id.to_string())
        .fetch_all(&self.read)
        .await
        .map_err(|e| db_error("reading a storage pool's hosts", e))?;
        rows.into_iter()
            .map(|(host, host_name, error, reported_at)| {
                Ok(HostPoolRecord {
                    host_id: host
                        .parse()
                        .map_err(|e| Error::internal(format!("bad host id {host:?}: {e}")))?,
                    host_name,
                    error,
                    reported_at,
                })
            })
            .collect()
    }

    /// Removes a pool no VM and no volume uses (their records keep it), with
    /// the hosts' reports on it; the hosts stop listing it at once.
    pub async fn pool_delete(&self, id: StoragePoolId) -> Result<(), Error> {
        let ctx = "removing a storage pool";
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        // Counted first for a message that says what to remove; the foreign
        // keys below still refuse anything that slips in.
        let (vms,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM vms WHERE pool_id = $1")
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        let (volumes,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM volumes WHERE pool_id = $1")
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        if vms > 0 || volumes > 0 {
            return Err(Error::conflict(
                "pool_in_use",
                format!(
                    "{vms} VM(s) keep their disks and {volumes} volume(s) their files in the \
                     storage pool; delete or move them first"
                ),
            ));
        }
        let affected: Vec<(String,)> =
            sqlx::query_as("SELECT host_id FROM host_pools WHERE pool_id = $1 AND error IS NULL")
                .bind(id.to_string())
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| db_error(ctx, e))?;
        sqlx::query("DELETE FROM host_pools WHERE pool_id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        let done = sqlx::query("DELETE FROM storage_pools WHERE id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                if is_fk_violation(&e) {
                    Error::conflict(
                        "pool_in_use",
                        "VMs or volumes keep their files in the storage pool; delete or move \
                         them first",
                    )
                } else {
                    db_error(ctx, e)
                }
            })?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found(ResourceKind::StoragePool, id));
        }
        for (host,) in affected {
            refresh_host_pools(&mut tx, &host).await?;
        }
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok(())
    }

    /// Records what a host found of the pools: its per-pool report, the
    /// host's list of usable pools (for the scheduler) and each pool's
    /// size and free space as this host sees them. Reports on pools that no
    /// longer exist are ignored. Returns whether the host's usable pools
    /// changed.
    pub async fn host_report_pools(
        &self,
        host: HostId,
        reports: &[PoolReport],
    ) -> Result<bool, Error> {
        let ctx = "recording a host's storage pools";
        let now = now_micros();
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        let before: Option<(String,)> = sqlx::query_as("SELECT pools FROM hosts WHERE id = $1")
            .bind(host.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        let Some((before,)) = before else {
            return Err(Error::not_found(ResourceKind::Host, host));
        };
        for r in reports {
            let exists: Option<(String,)> =
                sqlx::query_as("SELECT id FROM storage_pools WHERE id = $1")
                    .bind(r.pool_id.to_string())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|e| db_error(ctx, e))?;
            if exists.is_none() {
                continue;
            }
            sqlx::query(
                "INSERT INTO host_pools (host_id, pool_id, error, reported_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (host_id, pool_id) DO UPDATE SET error = $3, reported_at = $4",
            )
            .bind(host.to_string())
            .bind(r.pool_id.to_string())
            .bind(r.error.clone())
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
            if r.error.is_none() {
                sqlx::query(
                    "UPDATE storage_pools SET capacity_bytes = $1, available_bytes = $2 WHERE id = $3",
                )
                .bind(i64_of(r.total_bytes))
                .bind(i64_of(r.available_bytes))
                .bind(r.pool_id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error(ctx, e))?;
            }
        }
        let after = refresh_host_pools(&mut tx, &host.to_string()).await?;
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok(after != before)
    }
}

/// Rewrites a host's `pools` column from its reports (bumping its
/// generation when it changes, so every scheduler index notices) and
/// returns the new value.
async fn refresh_host_pools(conn: &mut sqlx::AnyConnection, host: &str) -> Result<String, Error> {
    let ctx = "listing a host's storage pools";
    let names: Vec<(String,)> = sqlx::query_as(
        "SELECT p.name FROM host_pools hp JOIN storage_pools p ON p.id = hp.pool_id \
         WHERE hp.host_id = $1 AND hp.error IS NULL",
    )
    .bind(host)
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| db_error(ctx, e))?;
    let names: Vec<String> = names.into_iter().map(|(n,)| n).collect();
    let col = tags_column(&names);
    sqlx::query(
        "UPDATE hosts SET pools = $1, generation = generation + 1 WHERE id = $2 AND pools <> $1",
    )
    .bind(&col)
    .bind(host)
    .execute(&mut *conn)
    .await
    .map_err(|e| db_error(ctx, e))?;
    Ok(col)
}

/// Claims each pool's share of new VMs' disks: every pool's allocation
/// grows only if it stays within the capacity last reported. Returns the
/// first pool that has no room, with its figures, or `None` when all were
/// claimed (the caller rolls back otherwise).
pub(crate) async fn claim_pools(
    conn: &mut sqlx::AnyConnection,
    per_pool: &std::collections::BTreeMap<StoragePoolId, i64>,
) -> Result<Option<(StoragePoolRecord, u64)>, Error> {
    let ctx = "claiming storage pools";
    for (pool, bytes) in per_pool {
        let done = sqlx::query(
            "UPDATE storage_pools SET alloc_bytes = alloc_bytes + $1 \
             WHERE id = $2 AND alloc_bytes + $1 <= capacity_bytes",
        )
        .bind(*bytes)
        .bind(pool.to_string())
        .execute(&mut *conn)
        .await
        .map_err(|e| db_error(ctx, e))?;
        if done.rows_affected() == 0 {
            let row = sqlx::query(&format!("{SELECT} WHERE id = $1"))
                .bind(pool.to_string())
                .fetch_optional(&mut *conn)
                .await
                .map_err(|e| db_error(ctx, e))?;
            return match row {
                Some(r) => Ok(Some((StoragePoolRecord::from_row(&r)?, u64_of(*bytes)))),
                None => Err(Error::not_found(ResourceKind::StoragePool, pool)),
            };
        }
    }
    Ok(None)
}

/// Gives back a removed VM's share of its pool.
pub(crate) async fn release_pool(
    conn: &mut sqlx::AnyConnection,
    pool: &str,
    bytes: i64,
) -> Result<(), Error> {
    sqlx::query(
        "UPDATE storage_pools SET alloc_bytes = CASE WHEN alloc_bytes - $1 < 0 THEN 0 \
         ELSE alloc_bytes - $1 END WHERE id = $2",
    )
    .bind(bytes)
    .bind(pool)
    .execute(&mut *conn)
    .await
    .map_err(|e| db_error("releasing a storage pool's allocation", e))?;
    Ok(())
}
