//! Opening the store: backend choice, connection pools, the SQLite lock file,
//! and mapping driver errors to the public error type.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use fs4::fs_std::FileExt;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions, Executor};
use stratus_common::Error;

use crate::migrations;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Why the store could not be opened. These happen at start-up, before any
/// request, so they carry the whole story for the operator.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("unsupported database URL {0:?}: use sqlite:///path/to/file.db or postgres://...")]
    BadUrl(String),
    #[error(
        "the SQLite database {path} is already in use by another Stratus controller \
         (lock file {lock} is held). SQLite mode runs exactly one controller; stop the \
         other one, or use PostgreSQL to run several"
    )]
    Locked { path: PathBuf, lock: PathBuf },
    #[error("cannot create the data directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open lock file {path}")]
    LockFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to the database")]
    Connect(#[source] sqlx::Error),
    #[error("cannot apply schema migration {version} ({name})")]
    Migrate {
        version: i64,
        name: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "the database schema is at version {found}, newer than this binary knows ({known}); \
         run a newer Stratus"
    )]
    SchemaTooNew { found: i64, known: i64 },
}

/// The store. Cheap to clone (pools are shared).
#[derive(Clone)]
pub struct Datastore {
    /// Connections for reads (and, on PostgreSQL, for writes too).
    pub(crate) read: AnyPool,
    /// Connections for writing transactions. On SQLite exactly one, so a
    /// transaction never meets another writer mid-way (SQLite would answer
    /// SQLITE_BUSY instead of waiting when a read lock must be upgraded).
    pub(crate) write: AnyPool,
    backend: Backend,
    /// Group commit for VM creates (see `create_batch`).
    pub(crate) combiner: Option<std::sync::Arc<crate::create_batch::Combiner>>,
    /// SQLite: flushes the write-ahead log for [`Datastore::durable`].
    syncer: Option<std::sync::Arc<crate::wal_sync::WalSyncer>>,
    /// Held for the life of the store; dropping it releases the SQLite lock.
    _lock: Option<std::sync::Arc<File>>,
}

impl Datastore {
    /// Opens (creating if needed) the store at `url` and applies migrations.
    pub async fn open(url: &str) -> Result<Self, OpenError> {
        sqlx::any::install_default_drivers();
        if let Some(rest) = url.strip_prefix("sqlite://") {
            let path = PathBuf::from(rest.split('?').next().unwrap_or(rest));
            Self::open_sqlite(&path).await
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Self::open_postgres(url).await
        } else {
            Err(OpenError::BadUrl(url.to_string()))
        }
    }

    async fn open_sqlite(path: &Path) -> Result<Self, OpenError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let lock_path = PathBuf::from(format!("{}.lock", path.display()));
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| OpenError::LockFile {
                path: lock_path.clone(),
                source,
            })?;
        match lock.try_lock_exclusive() {
            Ok(true) => {}
            Ok(false) => {
                return Err(OpenError::Locked {
                    path: path.to_path_buf(),
                    lock: lock_path,
                })
            }
            Err(source) => {
                return Err(OpenError::LockFile {
                    path: lock_path,
                    source,
                })
            }
        }

        let url = format!("sqlite://{}?mode=rwc", path.display());
        let opts = AnyConnectOptions::from_str(&url)
            .map_err(OpenError::Connect)?
            .disable_statement_logging();
        let write = AnyPoolOptions::new()
            .max_connections(1)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    for pragma in [
                        "PRAGMA journal_mode = WAL",
                        // Commits only write the log; durability comes
                        // from the shared log flush (`durable`), one per
                        // group of commits instead of one per commit.
                        "PRAGMA synchronous = NORMAL",
                        "PRAGMA foreign_keys = ON",
                        "PRAGMA busy_timeout = 10000",
                    ] {
                        conn.execute(pragma).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(opts.clone())
            .await
            .map_err(OpenError::Connect)?;
        // Migrate before readers connect, so they see the final schema.
        migrations::apply(&write, Backend::Sqlite).await?;
        let read = AnyPoolOptions::new()
            .max_connections(4)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    // Reads map the database file (no read syscall per page)
                    // and keep 64 MiB of pages: a page of 500 VMs out of
                    // 100,000 touches hundreds of pages.
                    for pragma in [
                        "PRAGMA foreign_keys = ON",
                        "PRAGMA busy_timeout = 10000",
                        "PRAGMA mmap_size = 1073741824",
                        "PRAGMA cache_size = -65536",
                    ] {
                        conn.execute(pragma).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(opts)
            .await
            .map_err(OpenError::Connect)?;
        let combiner = Some(std::sync::Arc::new(crate::create_batch::Combiner::start(
            write.clone(),
            1,
        )));
        let syncer = Some(std::sync::Arc::new(crate::wal_sync::WalSyncer::start(
            PathBuf::from(format!("{}-wal", path.display())),
        )));
        Ok(Datastore {
            read,
            write,
            combiner,
            syncer,
            backend: Backend::Sqlite,
            _lock: Some(std::sync::Arc::new(lock)),
        })
    }

    async fn open_postgres(url: &str) -> Result<Self, OpenError> {
        let opts = AnyConnectOptions::from_str(url)
            .map_err(OpenError::Connect)?
            .disable_statement_logging();
        let pool = AnyPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(OpenError::Connect)?;
        migrations::apply(&pool, Backend::Postgres).await?;
        let combiner = Some(std::sync::Arc::new(crate::create_batch::Combiner::start(
            pool.clone(),
            4,
        )));
        Ok(Datastore {
            read: pool.clone(),
            write: pool,
            combiner,
            syncer: None,
            backend: Backend::Postgres,
            _lock: None,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Returns once everything committed before the call is on stable
    /// storage. Call it before acknowledging a change to anyone.
    ///
    /// PostgreSQL commits are durable when they return (and it groups
    /// concurrent commits' flushes itself), so this returns at once. SQLite
    /// commits write its log without flushing it (`synchronous = NORMAL`,
    /// which keeps the database consistent on any crash); this waits for
    /// the next flush of the log, which one background task makes for every
    /// commit waiting at that moment. One flush then costs each of N
    /// concurrent writers 1/N of a disk sync instead of a whole one, with
    /// the same guarantee as flushing at every commit: an acknowledged
    /// change survives a power loss.
    pub async fn durable(&self) -> Result<(), Error> {
        match &self.syncer {
            Some(s) => s.sync().await,
            None => Ok(()),
        }
    }

    /// Closes every connection (and, on SQLite, releases the lock when the
    /// last clone is dropped).
    pub async fn close(&self) {
        self.write.close().await;
        self.read.close().await;
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), Error> {
        sqlx::query("SELECT 1")
            .execute(&self.read)
            .await
            .map(|_| ())
            .map_err(|e| db_error("checking the database", e))
    }
}

/// Maps a driver error to the public error. Constraint violations are the
/// caller's business (they map them to conflicts with a good message); the
/// rest are internal, with the context kept for the log.
pub(crate) fn db_error(context: &str, e: sqlx::Error) -> Error {
    if matches!(e, sqlx::Error::PoolTimedOut) {
        return Error::Unavailable {
            message: "the database is busy or unreachable; retry shortly".into(),
        };
    }
    Error::internal_from(context, &e)
}

/// Whether the error is a unique-constraint violation.
pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => d.is_unique_violation(),
        _ => false,
    }
}

/// Whether the error is a foreign-key violation.
pub(crate) fn is_fk_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => d.is_foreign_key_violation(),
        _ => false,
    }
}
