//! Leader leases: named, time-bounded claims that let cluster-wide
//! background work (the reconcilers) run on one controller at a time.
//!
//! ```text
//!  free ──acquire──► held by A until T ──A renews (acquire again)──► held by A until T'
//!   ▲                   │        │
//!   └──A releases───────┘        └──T passes, B acquires──► held by B
//! ```
//!
//! **Invariant**: at any moment at most one holder has a lease that has not
//! expired. Taking one is a single conditional upsert, so two controllers
//! racing for a free or expired lease cannot both win, on either backend
//! (SQLite serialises writers; PostgreSQL locks the conflicting row and
//! re-checks the condition on its newest version).
//!
//! **Boundary**: expiry is judged by the clock of the controller that asks
//! (`now`), so controllers' clocks must agree to within a small part of a
//! lease (NTP). A lease avoids duplicate work; it is not what keeps work
//! safe: everything run under one is guarded in SQL on its own.

use stratus_common::Error;

use crate::db::db_error;
use crate::model::RowExt;
use crate::Datastore;

/// A lease as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    pub name: String,
    pub holder: String,
    /// Micros since the epoch.
    pub expires_at: i64,
}

impl Datastore {
    /// Takes (or renews) the lease `name` for `holder` until `until`, if it
    /// is free, expired at `now`, or already `holder`'s. Returns whether
    /// `holder` now holds it.
    pub async fn lease_acquire(
        &self,
        name: &str,
        holder: &str,
        now: i64,
        until: i64,
    ) -> Result<bool, Error> {
        let done = sqlx::query(
            "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $4) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
             WHERE leases.holder = excluded.holder OR leases.expires_at <= $3",
        )
        .bind(name)
        .bind(holder)
        .bind(now)
        .bind(until)
        .execute(&self.write)
        .await
        .map_err(|e| db_error("taking a lease", e))?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives the lease up, if `holder` has it (so another controller need
    /// not wait for it to expire). Returns whether it was `holder`'s.
    pub async fn lease_release(&self, name: &str, holder: &str) -> Result<bool, Error> {
        let done = sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.write)
            .await
            .map_err(|e| db_error("releasing a lease", e))?;
        Ok(done.rows_affected() == 1)
    }

    /// Who holds the lease and until when (possibly already expired), or
    /// `None` when nobody ever took it or it was released.
    pub async fn lease_holder(&self, name: &str) -> Result<Option<LeaseRecord>, Error> {
        let row = sqlx::query("SELECT name, holder, expires_at FROM leases WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("reading a lease", e))?;
        row.map(|r| {
            Ok(LeaseRecord {
                name: r.text("name")?,
                holder: r.text("holder")?,
                expires_at: r.int("expires_at")?,
            })
        })
        .transpose()
    }
}
