//! Hosts and the one-time tokens agents enroll with.

use stratus_api_types::views::HostState;
use stratus_common::time::now_micros;
use stratus_common::{EnrollmentTokenId, Error, HostId, ResourceKind, TokenId};

use crate::db::db_error;
use crate::model::{enum_str, HostRecord};
use crate::page::{ListQuery, Page, PageRequest};
use crate::Datastore;

pub(crate) const SELECT: &str =
    "SELECT id, name, state, zone, cluster, address, cpus, memory_bytes, disk_bytes, \
                      qemu_version, accel, generation, desired_revision, driver, tags, pools, alloc_vcpus, \
                      alloc_memory_bytes, alloc_disk_bytes, created_at, last_heartbeat_at, migration_transport FROM hosts";

/// Filters for [`Datastore::host_list`].
#[derive(Debug, Default)]
pub struct HostListFilter<'a> {
    pub name: Option<&'a str>,
    pub state: Option<HostState>,
    pub zone: Option<&'a str>,
    pub cluster: Option<&'a str>,
}

impl Datastore {
    /// The desired revision (what agents long-poll on) of every host whose
    /// desired state changed at or after `since` (micros; 0 for all hosts).
    pub async fn host_revisions(&self, since: i64) -> Result<Vec<(HostId, i64)>, Error> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT id, desired_revision FROM hosts WHERE desired_changed_at >= $1")
                .bind(since)
                .fetch_all(&self.read)
                .await
                .map_err(|e| db_error("reading hosts' desired revisions", e))?;
        rows.into_iter()
            .map(|(id, rev)| {
                id.parse()
                    .map(|h| (h, rev))
                    .map_err(|_| Error::internal(format!("bad host id {id:?}")))
            })
            .collect()
    }

    pub async fn host_get(&self, id: HostId) -> Result<HostRecord, Error> {
        let row = sqlx::query(&format!("{SELECT} WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("reading a host", e))?;
        match row {
            Some(r) => HostRecord::from_row(&r),
            None => Err(Error::not_found(ResourceKind::Host, id)),
        }
    }

    pub async fn host_get_by_name(&self, name: &str) -> Result<HostRecord, Error> {
        let row = sqlx::query(&format!("{SELECT} WHERE name = $1"))
            .bind(name)
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("reading a host", e))?;
        match row {
            Some(r) => HostRecord::from_row(&r),
            None => Err(Error::not_found(ResourceKind::Host, name)),
        }
    }

    pub async fn host_list(
        &self,
        f: &HostListFilter<'_>,
        page: &PageRequest,
    ) -> Result<Page<HostRecord>, Error> {
        let mut q = ListQuery::new();
        if let Some(n) = f.name {
            q.eq("name", n);
        }
        if let Some(s) = f.state {
            q.eq("state", enum_str(&s));
        }
        if let Some(z) = f.zone {
            q.eq("zone", z);
        }
        if let Some(c) = f.cluster {
            q.eq("cluster", c);
        }
        q.fetch(&self.read, SELECT, page, HostRecord::from_row, |h| {
            h.id.to_string()
        })
        .await
    }

    /// Stores an enrollment token (its hash) created by `created_by`, good
    /// for `uses` hosts.
    pub async fn enrollment_token_create(
        &self,
        token_hash: &str,
        created_by: TokenId,
        expires_at: i64,
        uses: u32,
    ) -> Result<EnrollmentTokenId, Error> {
        let id = EnrollmentTokenId::new();
        sqlx::query(
            "INSERT INTO host_enrollment_tokens (id, token_hash, created_by, created_at, expires_at, \
             max_uses, use_count) VALUES ($1, $2, $3, $4, $5, $6, 0)",
        )
        .bind(id.to_string())
        .bind(token_hash)
        .bind(created_by.to_string())
        .bind(now_micros())
        .bind(expires_at)
        .bind(i64::from(uses))
        .execute(&self.write)
        .await
        .map_err(|e| db_error("creating an enrollment token", e))?;
        Ok(id)
    }
}

impl Datastore {
    /// Takes a host out of service (`maintenance`: nothing new is placed
    /// there, heartbeats keep it so) or returns it (`up`, only from
    /// maintenance: an unreachable host comes back by its heartbeats). The
    /// generation moves, so every scheduler index notices.
    pub async fn host_set_maintenance(&self, id: HostId, on: bool) -> Result<HostRecord, Error> {
        let sql = if on {
            "UPDATE hosts SET state = 'maintenance', generation = generation + 1 WHERE id = $1"
        } else {
            "UPDATE hosts SET state = 'up', generation = generation + 1 \
             WHERE id = $1 AND state = 'maintenance'"
        };
        sqlx::query(sql)
            .bind(id.to_string())
            .execute(&self.write)
            .await
            .map_err(|e| db_error("changing a host's maintenance mode", e))?;
        self.host_get(id).await
    }
}
