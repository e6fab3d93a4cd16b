//! Controller start-up and shutdown.
//!
//! Order matters: the store is opened (and migrated, and on SQLite locked)
//! before anything listens; the job runner starts before the listener so a
//! job queued by the first request is picked up at once; on shutdown the
//! listener stops accepting first, in-flight requests finish, then the
//! runner stops (it hands its jobs' leases back, so the next controller resumes
//! their sagas at once).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use stratus_datastore::{Datastore, OpenError};
use stratus_jobs::{JobRunner, RunnerConfig, RunnerHandle, Signals};
use stratus_scheduler::Scheduler;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::app::image_store::{ImageStore, ImageStoreError};
use crate::app::{tokens, App};

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// `sqlite:///path` or `postgres://...`.
    pub database_url: String,
    pub listen: SocketAddr,
    /// Where the image store lives.
    pub data_dir: PathBuf,
    /// Where to write the first admin token, if one is created.
    pub bootstrap_token_file: Option<PathBuf>,
    /// This controller's name in job claims.
    pub controller_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot open the database")]
    Store(#[from] OpenError),
    #[error(transparent)]
    Images(#[from] ImageStoreError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the scheduler's index")]
    Scheduler(#[source] stratus_common::Error),
    #[error("cannot create the first admin token")]
    Bootstrap(#[source] stratus_common::Error),
    #[error("cannot write the admin token to {path}")]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A running controller.
pub struct Server {
    addr: SocketAddr,
    /// The first admin token, when this start created it.
    pub bootstrap_token: Option<String>,
    pub app: Arc<App>,
    stop: Option<oneshot::Sender<()>>,
    http: JoinHandle<()>,
    runner: Option<RunnerHandle>,
    refresher: JoinHandle<()>,
    revision_watch: JoinHandle<()>,
    heartbeats: JoinHandle<()>,
    reconciler: Option<crate::app::reconcile::ReconcilerHandle>,
}

/// How often the scheduler's index is rebuilt from the store (which is how
/// it learns of other controllers' placements and of removed VMs).
const SCHEDULER_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

impl Server {
    pub async fn start(config: ServerConfig) -> Result<Server, ServerError> {
        let ds = Datastore::open(&config.database_url).await?;
        let images = ImageStore::open(&config.data_dir.join("images"))?;
        let signals = Arc::new(Signals::default());
        let runner = JobRunner::new(
            ds.clone(),
            RunnerConfig::new(config.controller_id.clone()),
            signals.clone(),
        )
        .start();
        let scheduler = Scheduler::load(ds.clone())
            .await
            .map_err(ServerError::Scheduler)?;
        let refresher = scheduler.spawn_refresher(SCHEDULER_REFRESH);
        let app = Arc::new(App::new(ds, images, runner.waker(), signals, scheduler));
        let revision_watch =
            crate::app::agent::spawn_revision_watch(app.clone(), std::time::Duration::from_secs(1));
        let heartbeats =
            crate::app::agent::spawn_heartbeats(app.clone(), std::time::Duration::from_secs(1));
        let reconciler = crate::app::reconcile::start(
            &app,
            crate::app::reconcile::ReconcilerConfig::new(&config.controller_id),
        );

        let bootstrap_token = tokens::bootstrap_admin(&app)
            .await
            .map_err(ServerError::Bootstrap)?;
        if let (Some(secret), Some(path)) = (&bootstrap_token, &config.bootstrap_token_file) {
            write_secret_file(path, secret).map_err(|source| ServerError::TokenFile {
                path: path.clone(),
                source,
            })?;
        }

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServerError::Listen {
                addr: config.listen,
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ServerError::Listen {
                addr: config.listen,
                source,
            })?;
        let router = crate::http::router(app.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let http = tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
        tracing::info!(%addr, controller = %config.controller_id, "controller listening");
        Ok(Server {
            addr,
            bootstrap_token,
            app,
            stop: Some(stop),
            http,
            runner: Some(runner),
            refresher,
            revision_watch,
            heartbeats,
            reconciler: Some(reconciler),
        })
    }

    /// The saga engine running this controller's jobs (tests inject faults
    /// through it); `None` once shut down.
    pub fn saga_engine(&self) -> Option<&Arc<stratus_jobs::SagaEngine>> {
        self.runner.as_ref().map(|r| r.engine())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting requests, lets in-flight ones finish, stops the job
    /// runner and closes the store.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.http).await;
        if let Some(r) = self.runner.take() {
            r.shutdown().await;
        }
        // Gives up the leader lease so another controller takes over at once.
        if let Some(r) = self.reconciler.take() {
            r.shutdown().await;
        }
        self.refresher.abort();
        self.revision_watch.abort();
        self.heartbeats.abort();
        self.app.ds.close().await;
    }
}

/// Writes a secret to a file only its owner can read (mode 0600), created
/// that way so there is no moment it is readable by others.
pub fn write_secret_file(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}
