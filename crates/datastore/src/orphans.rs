//! Orphans hosts report: VMs a host has that the controller does not place
//! there, with what the host's agent did about them (destroyed or kept),
//! recorded so an operator sees them on the host.
//!
//! ```text
//!  agent report lists it ──► recorded (first seen kept, last seen now)
//!   kept:      reported again each report while it exists; forgotten once
//!              its host has heartbeated for a grace period without it
//!   destroyed: reported a few times; listed for a day, then forgotten
//! ```
//!
//! A report without orphans writes nothing here (the common case, on the
//! path every host's heartbeat takes); forgetting is the reconciler's work
//! ([`Datastore::host_orphans_prune`]).

use stratus_api_types::agent::OrphanAction;
use stratus_common::{Error, HostId, VmId};

use crate::db::db_error;
use crate::model::{enum_str, OrphanRecord};
use crate::Datastore;

impl Datastore {
    /// Records the orphans a host just reported, at `now`. Returns those
    /// not recorded on this host before (new news, for the log).
    pub async fn host_orphans_seen(
        &self,
        host: HostId,
        orphans: &[(VmId, OrphanAction)],
        now: i64,
    ) -> Result<Vec<VmId>, Error> {
        let ctx = "recording orphan VMs";
        if orphans.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        let known: Vec<(String,)> =
            sqlx::query_as("SELECT vm_id FROM host_orphans WHERE host_id = $1")
                .bind(host.to_string())
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| db_error(ctx, e))?;
        let known: std::collections::HashSet<String> = known.into_iter().map(|r| r.0).collect();
        let mut new = Vec::new();
        for (vm, action) in orphans {
            sqlx::query(
                "INSERT INTO host_orphans (host_id, vm_id, action, first_seen_at, last_seen_at) \
                 VALUES ($1, $2, $3, $4, $4) ON CONFLICT (host_id, vm_id) DO UPDATE \
                 SET action = excluded.action, last_seen_at = excluded.last_seen_at",
            )
            .bind(host.to_string())
            .bind(vm.to_string())
            .bind(enum_str(action))
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
            if !known.contains(&vm.to_string()) && !new.contains(vm) {
                new.push(*vm);
            }
        }
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok(new)
    }

    /// The orphans recorded on a host, first seen first.
    pub async fn host_orphans(&self, host: HostId) -> Result<Vec<OrphanRecord>, Error> {
        let rows = sqlx::query(
            "SELECT host_id, vm_id, action, first_seen_at, last_seen_at FROM host_orphans \
             WHERE host_id = $1 ORDER BY first_seen_at, vm_id",
        )
        .bind(host.to_string())
        .fetch_all(&self.read)
        .await
        .map_err(|e| db_error("reading a host's orphan VMs", e))?;
        rows.iter().map(OrphanRecord::from_row).collect()
    }

    /// Forgets orphans that are no longer news: kept ones last reported more
    /// than `gone_after` (micros) before their host's latest heartbeat (the
    /// host kept reporting without them, so they are gone; a silent host's
    /// are kept, since nothing is known), and destroyed ones last reported
    /// before `destroyed_before`. Returns how many.
    pub async fn host_orphans_prune(
        &self,
        gone_after: i64,
        destroyed_before: i64,
    ) -> Result<u64, Error> {
        let done = sqlx::query(
            "DELETE FROM host_orphans WHERE (action = 'kept' AND last_seen_at < \
             (SELECT last_heartbeat_at FROM hosts WHERE hosts.id = host_orphans.host_id) - $1) \
             OR (action = 'destroyed' AND last_seen_at < $2)",
        )
        .bind(gone_after)
        .bind(destroyed_before)
        .execute(&self.write)
        .await
        .map_err(|e| db_error("forgetting orphan VMs", e))?;
        Ok(done.rows_affected())
    }
}
