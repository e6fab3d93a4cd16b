//! Versioned schema migrations, applied at start.
//!
//! Each migration is portable SQL run in one transaction together with its
//! row in `schema_migrations`, so a crash mid-migration leaves the schema at
//! the previous version. On PostgreSQL an advisory lock serialises
//! controllers that start at the same moment.

use sqlx::{AnyPool, Executor};

use crate::db::{Backend, OpenError};

/// (version, name, SQL). Append only: never edit a released migration.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "initial", include_str!("../migrations/0001_initial.sql")),
    (2, "agents", include_str!("../migrations/0002_agents.sql")),
    (
        3,
        "intent_generation",
        include_str!("../migrations/0003_intent_generation.sql"),
    ),
    (
        4,
        "scheduling",
        include_str!("../migrations/0004_scheduling.sql"),
    ),
    (
        5,
        "desired_changed",
        include_str!("../migrations/0005_desired_changed.sql"),
    ),
    (6, "sagas", include_str!("../migrations/0006_sagas.sql")),
    (
        7,
        "reconcilers",
        include_str!("../migrations/0007_reconcilers.sql"),
    ),
    (8, "storage", include_str!("../migrations/0008_backups.sql")),
    (
        9,
        "storage pools",
        include_str!("../migrations/0009_pools.sql"),
    ),
    (
        10,
        "migrations",
        include_str!("../migrations/0010_moves.sql"),
    ),
    (
        11,
        "snapshot volumes",
        include_str!("../migrations/0011_snapshot_volumes.sql"),
    ),
    (
        12,
        "host migration transport",
        include_str!("../migrations/0012_host_migration_tls.sql"),
    ),
    (
        13,
        "snapshot policies",
        include_str!("../migrations/0013_snapshot_policies.sql"),
    ),
    (
        14,
        "backup volumes",
        include_str!("../migrations/0014_backup_volumes.sql"),
    ),
    (
        15,
        "pool volumes",
        include_str!("../migrations/0015_pool_volumes.sql"),
    ),
];

/// The schema version this binary expects: the last migration's.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// An arbitrary constant: the advisory lock id for migrations.
const PG_MIGRATION_LOCK: i64 = 0x5354_5241_5455_5301;

pub(crate) async fn apply(pool: &AnyPool, backend: Backend) -> Result<(), OpenError> {
    let mut conn = pool.acquire().await.map_err(OpenError::Connect)?;
    if backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(PG_MIGRATION_LOCK)
            .execute(&mut *conn)
            .await
            .map_err(OpenError::Connect)?;
    }
    let result = apply_locked(&mut conn).await;
    if backend == Backend::Postgres {
        // Released on disconnect anyway; an error here changes nothing.
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(PG_MIGRATION_LOCK)
            .execute(&mut *conn)
            .await;
    }
    result
}

async fn apply_locked(conn: &mut sqlx::AnyConnection) -> Result<(), OpenError> {
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (\
            version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
    )
    .await
    .map_err(OpenError::Connect)?;
    let current: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_migrations")
        .fetch_one(&mut *conn)
        .await
        .map_err(OpenError::Connect)?;
    let current = current.unwrap_or(0);
    if current > SCHEMA_VERSION {
        return Err(OpenError::SchemaTooNew {
            found: current,
            known: SCHEMA_VERSION,
        });
    }
    for &(version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        let err = |source| OpenError::Migrate {
            version,
            name,
            source,
        };
        let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(err)?;
        sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(err)?;
        sqlx::query(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
        )
        .bind(version)
        .bind(name)
        .bind(stratus_common::time::now_micros())
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        tx.commit().await.map_err(err)?;
        tracing::info!(version, name, "applied schema migration");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_one_by_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.0, i as i64 + 1, "migration {} is out of sequence", m.1);
        }
    }
}
