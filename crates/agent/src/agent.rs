//! Starting and stopping an agent: enrollment or the saved credential, the
//! driver, the shared state, the desired-state poller, and the tasks of the
//! other loops (see the crate docs for how they fit).
//!
//! A lone agent and each host of a simulated fleet (`fleet.rs`) start the
//! same way; what differs is [`Commons`], what the hosts of one process
//! share: the HTTP client (one connection pool), the controllers (and which
//! one calls go to), the bound on calls in flight, and the token that stops
//! them all.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use stratus_client::types::{AgentEnroll, HostFacts};
use stratus_common::HostId;
use stratus_driver::{Driver, QemuConfig, QemuDriver, SimConfig, SimDriver};
use tokio::sync::{watch, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{http_client, Api};
use crate::config::{AgentConfig, DriverConfig};
use crate::controllers::{same_list, Controllers};
use crate::credentials::{default_host_name, Credentials};
use crate::error::{chain, AgentError};
use crate::images::ImageCache;
use crate::state::{Book, Generations, Snapshot, VmRecords};

/// What every loop of one agent shares.
pub(crate) struct Shared {
    pub driver: Arc<dyn Driver>,
    pub api: Api,
    pub images: Arc<ImageCache>,
    pub records: VmRecords,
    pub book: Mutex<Book>,
    /// The shared storage pools: named by the controller, checked here.
    pub pools: Mutex<crate::pools::PoolBook>,
    /// The image caches of shared storage pools, by pool directory.
    pub pool_images: Mutex<std::collections::HashMap<std::path::PathBuf, Arc<ImageCache>>>,
    /// Asks the reporter to report now rather than at its next tick.
    pub report_now: Notify,
    /// Bumped by the reporter whenever the driver's list of VMs (ids or
    /// states) changes, for the loops that only have work while VMs exist
    /// (guest poller, console shipper): without VMs they wait here, so an
    /// idle simulated host costs no timer at all.
    pub vms_changed: watch::Sender<()>,
    /// Wakes the guest poller (a guest query finished).
    pub guest_wake: Notify,
    pub generations: Generations,
    pub facts: Mutex<HostFacts>,
    pub stop_timeout: Duration,
    pub report_interval: Duration,
    pub retry_interval: Duration,
    pub desired_wait: Duration,
    pub orphans: crate::config::OrphanPolicy,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Shared {
    /// The image cache of the shared pool at `dir`: `<dir>/images/`.
    pub fn pool_images(&self, dir: &std::path::Path) -> Arc<ImageCache> {
        let mut caches = self.pool_images.lock().unwrap_or_else(|e| e.into_inner());
        caches
            .entry(dir.to_path_buf())
            .or_insert_with(|| Arc::new(ImageCache::new(dir.join("images"))))
            .clone()
    }

    pub fn pools(&self) -> MutexGuard<'_, crate::pools::PoolBook> {
        // Every write replaces whole fields: a poisoned lock holds a usable book.
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn book(&self) -> MutexGuard<'_, Book> {
        // Every critical section leaves the book consistent; a panic in one
        // must not stop the agent.
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns a task of this agent. It ends (its future is dropped) when the
    /// agent shuts down, wherever it is: a driver call in flight is simply
    /// abandoned, as if the agent had been killed, which the drivers handle.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<()>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = fut => {}
            }
        })
    }

    /// The host's facts, refreshed from the driver (the last known ones if
    /// the driver cannot say right now).
    pub async fn refresh_facts(&self) -> HostFacts {
        match self.driver.host_facts().await {
            Ok(f) => {
                let facts = facts_of(self.driver.name(), f);
                *self.facts.lock().unwrap_or_else(|e| e.into_inner()) = facts.clone();
                facts
            }
            Err(e) => {
                tracing::debug!(error = %chain(&e), "host facts unavailable; reporting the last ones");
                self.facts.lock().unwrap_or_else(|e| e.into_inner()).clone()
            }
        }
    }
}

fn facts_of(driver: &str, f: stratus_driver::HostFacts) -> HostFacts {
    HostFacts {
        cpus: f.cpus,
        memory_bytes: f.memory_bytes,
        disk_bytes: f.disk_bytes,
        qemu_version: f.qemu_version,
        accel: f.accel,
        driver: driver.to_string(),
        // Optional on the wire: agents from before it said nothing (plain).
        migration_tls: Some(f.migration_tls),
    }
}

/// What the hosts of one process share. A lone agent has its own; every
/// host of a simulated fleet gets a clone of the fleet's.
#[derive(Clone)]
pub(crate) struct Commons {
    /// One connection pool for every host.
    pub http: reqwest::Client,
    /// The controllers, and which one calls go to (one failover for all).
    pub controllers: Arc<Controllers>,
    /// Bounds the short calls in flight (see `api.rs`); `None`: unbounded.
    pub limiter: Option<Arc<Semaphore>>,
    /// Each host's loops stop on a child of this token.
    pub cancel: CancellationToken,
    /// Whether each host flocks its own data dir (a fleet flocks its top
    /// directory once instead).
    pub lock_data_dir: bool,
    /// Per-host start, enrollment and stop lines at debug level (a fleet
    /// logs a summary instead of 10,000 lines).
    pub quiet: bool,
    /// The fleet's one image cache; `None`: each host keeps its own in
    /// `data_dir/images`.
    pub images: Option<Arc<ImageCache>>,
}

impl Commons {
    fn lone(url: &str) -> Result<Commons, AgentError> {
        Ok(Commons {
            http: http_client()?,
            controllers: Arc::new(Controllers::parse(url)?),
            limiter: None,
            cancel: CancellationToken::new(),
            lock_data_dir: true,
            quiet: false,
            images: None,
        })
    }
}

/// Logs at info, or at debug for a quiet (fleet) host.
macro_rules! host_log {
    ($quiet:expr, $($arg:tt)+) => {
        if $quiet {
            tracing::debug!($($arg)+)
        } else {
            tracing::info!($($arg)+)
        }
    };
}

/// The host agent. See the crate docs.
pub struct Agent;

impl Agent {
    /// Starts an agent: takes the data dir, starts the driver (which adopts
    /// VMs still running from a previous agent), enrolls if this data dir has
    /// no credential yet, and spawns the loops. Returns once they run; the
    /// controller need not be reachable unless the host must enroll.
    pub async fn start(config: AgentConfig) -> Result<AgentHandle, AgentError> {
        let commons = Commons::lone(&config.url)?;
        Self::start_in(config, &commons).await
    }

    /// [`Agent::start`] for one host among others sharing `commons` (whose
    /// controllers are the ones `config.url` names).
    pub(crate) async fn start_in(
        config: AgentConfig,
        commons: &Commons,
    ) -> Result<AgentHandle, AgentError> {
        let quiet = commons.quiet;
        let data_dir = prepare_data_dir(&config.data_dir)?;
        let lock = if commons.lock_data_dir {
            Some(lock_data_dir(&data_dir)?)
        } else {
            None
        };
        let driver = build_driver(&config.driver, &data_dir).await?;
        let facts = facts_of(
            driver.name(),
            driver.host_facts().await.map_err(AgentError::Facts)?,
        );

        let (creds, enrolled) = match Credentials::load(&data_dir)? {
            Some(c) => {
                if !same_list(&c.url, &config.url) {
                    host_log!(quiet, enrolled_with = %c.url, url = %config.url, "using the configured controller URL, not the one the host enrolled with");
                }
                if config.enroll_token.is_some() {
                    host_log!(quiet, host = %c.host_id, "already enrolled; the enrollment token is not needed");
                }
                (c, false)
            }
            None => (
                enroll(&config, commons, &data_dir, facts.clone()).await?,
                true,
            ),
        };
        host_log!(quiet, host = %creds.host_id, url = %config.url, driver = driver.name(), data_dir = %data_dir.display(), "agent starting");

        let api = Api::new(
            commons.http.clone(),
            commons.controllers.clone(),
            Some(&creds.credential),
            commons.limiter.clone(),
        )?;
        let shared = Arc::new(Shared {
            driver,
            images: commons
                .images
                .clone()
                .unwrap_or_else(|| Arc::new(ImageCache::new(data_dir.join("images")))),
            api,
            records: VmRecords::new(data_dir.join("vms")),
            book: Mutex::new(Book::default()),
            pools: Mutex::new(crate::pools::PoolBook::default()),
            pool_images: Mutex::new(std::collections::HashMap::new()),
            report_now: Notify::new(),
            vms_changed: watch::Sender::new(()),
            guest_wake: Notify::new(),
            generations: Generations::default(),
            facts: Mutex::new(facts),
            stop_timeout: config.stop_timeout,
            report_interval: config.report_interval,
            retry_interval: config.retry_interval,
            desired_wait: config.desired_wait,
            orphans: config.orphans,
            cancel: commons.cancel.child_token(),
            tasks: TaskTracker::new(),
        });

        let (desired_tx, desired_rx) = watch::channel(None);
        shared.spawn(poll_desired(shared.clone(), desired_tx));
        shared.spawn(crate::converge::supervise(shared.clone(), desired_rx));
        // A host that just enrolled is up with its facts already (the
        // enrollment said it all): its first report can wait for its turn,
        // which spares the controller a third of a fleet's start-up calls.
        shared.spawn(crate::report::report_loop(shared.clone(), !enrolled));
        shared.spawn(crate::report::guest_loop(shared.clone()));
        shared.spawn(crate::console::console_loop(shared.clone()));

        Ok(AgentHandle {
            host_id: creds.host_id,
            data_dir,
            driver: shared.driver.clone(),
            shared: Some(shared),
            enrolled,
            quiet,
            _lock: lock,
        })
    }
}

/// A running agent. [`AgentHandle::shutdown`] stops it cleanly; dropping the
/// handle stops its loops too, without waiting. Neither stops a VM.
pub struct AgentHandle {
    host_id: HostId,
    data_dir: PathBuf,
    driver: Arc<dyn Driver>,
    /// `None` once stopping.
    shared: Option<Arc<Shared>>,
    /// Whether this start enrolled the host (rather than reusing its
    /// credential).
    enrolled: bool,
    quiet: bool,
    /// `None` when the data dir is locked by someone else on the agent's
    /// behalf (a fleet locks its top directory).
    _lock: Option<File>,
}

impl AgentHandle {
    /// The host this agent runs as.
    pub fn host_id(&self) -> HostId {
        self.host_id
    }

    /// The data dir, as resolved at start.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The driver the agent runs VMs with.
    pub fn driver(&self) -> Arc<dyn Driver> {
        self.driver.clone()
    }

    /// Whether this start enrolled the host, rather than reusing the
    /// credential in its data dir.
    pub fn enrolled_now(&self) -> bool {
        self.enrolled
    }

    /// Stops every loop and waits until they have ended and the driver is
    /// released (so a new agent can take the data dir at once). VMs keep
    /// running.
    pub async fn shutdown(mut self) {
        if let Some(shared) = self.shared.take() {
            shared.cancel.cancel();
            shared.tasks.close();
            shared.tasks.wait().await;
            host_log!(self.quiet, host = %self.host_id, "agent stopped; its VMs keep running");
        }
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.cancel.cancel();
            shared.tasks.close();
        }
    }
}

fn prepare_data_dir(dir: &Path) -> Result<PathBuf, AgentError> {
    let err = |source| AgentError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let dir = dir.canonicalize().map_err(err)?;
    for sub in ["images", "vms"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|source| AgentError::DataDir {
            path: dir.join(sub),
            source,
        })?;
    }
    Ok(dir)
}

/// A fleet's top directory (see `fleet.rs`): created and made absolute; its
/// hosts' data dirs are prepared as they start.
pub(crate) fn prepare_fleet_dir(dir: &Path) -> Result<PathBuf, AgentError> {
    let err = |source| AgentError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir.join("hosts")).map_err(err)?;
    dir.canonicalize().map_err(err)
}

/// One agent (or fleet) per data dir: `agent.lock`, flock'ed for its life.
pub(crate) fn lock_data_dir(dir: &Path) -> Result<File, AgentError> {
    let path = dir.join("agent.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| AgentError::DataDir {
            path: path.clone(),
            source,
        })?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(AgentError::DataDirInUse {
            path: dir.to_path_buf(),
        }),
        Err(e) => Err(AgentError::DataDir {
            path,
            source: e.into(),
        }),
    }
}

async fn build_driver(
    config: &DriverConfig,
    data_dir: &Path,
) -> Result<Arc<dyn Driver>, AgentError> {
    Ok(match config {
        DriverConfig::Qemu {
            accel,
            qemu_binary,
            backup_bandwidth,
            migration,
        } => {
            let mut qc = QemuConfig::new(data_dir.join("qemu"));
            qc.accel = *accel;
            qc.backup_bandwidth = *backup_bandwidth;
            if let Some(a) = migration.address {
                qc.migration_address = a;
            }
            if let Some(p) = &migration.ports {
                qc.migration_ports = p.clone();
            }
            qc.migration_tls_dir = migration.tls_dir.clone();
            if let Some(b) = qemu_binary {
                qc.qemu_binary = b.clone();
            }
            let d = QemuDriver::new(qc)
                .await
                .map_err(|source| AgentError::Driver {
                    driver: "qemu",
                    source,
                })?;
            Arc::new(d)
        }
        DriverConfig::Sim {
            cpus,
            memory_bytes,
            disk_bytes,
            latency,
        } => Arc::new(SimDriver::new(SimConfig {
            cpus: *cpus,
            memory_bytes: *memory_bytes,
            disk_bytes: *disk_bytes,
            latency: *latency,
        })),
        DriverConfig::Instance(d) => d.clone(),
    })
}

async fn enroll(
    config: &AgentConfig,
    commons: &Commons,
    data_dir: &Path,
    facts: HostFacts,
) -> Result<Credentials, AgentError> {
    let Some(token) = config.enroll_token.clone() else {
        return Err(AgentError::NotEnrolled {
            path: Credentials::path(data_dir),
        });
    };
    let name_text = config.name.clone().unwrap_or_else(default_host_name);
    let name = name_text
        .parse::<stratus_client::types::Name>()
        .map_err(|e| AgentError::InvalidName {
            name: name_text.clone(),
            reason: e.to_string(),
        })?;
    let body = AgentEnroll {
        enroll_token: token.trim().to_string(),
        name,
        zone: config.zone.clone(),
        cluster: config.cluster.clone(),
        address: config.address.clone().unwrap_or_else(|| name_text.clone()),
        facts,
        tags: config.tags.clone(),
    };
    // A controller that is still starting is waited for a little; a refusal
    // (bad or spent token, name taken) is final.
    let api = Api::new(
        commons.http.clone(),
        commons.controllers.clone(),
        None,
        commons.limiter.clone(),
    )?;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
    let deadline = std::time::Instant::now() + ENROLL_PATIENCE;
    let enrolled = loop {
        match api.enroll(body.clone()).await {
            Ok(e) => break e,
            Err(e) if !e.is_permanent() && std::time::Instant::now() < deadline => {
                tracing::warn!(error = %chain(&e), "cannot enroll yet; retrying");
                tokio::time::sleep(backoff.next_wait()).await;
            }
            Err(source) => {
                return Err(AgentError::Enroll {
                    url: config.url.clone(),
                    source,
                })
            }
        }
    };
    let creds = Credentials {
        url: config.url.clone(),
        host_id: HostId(enrolled.host_id.0),
        credential: enrolled.credential,
    };
    // Off the async workers: saving ends with an fsync, and a fleet saves
    // thousands of credentials.
    let (saved, creds) = {
        let dir = data_dir.to_path_buf();
        tokio::task::spawn_blocking(move || (creds.save(&dir), creds))
            .await
            .map_err(|e| AgentError::CredentialWrite {
                path: Credentials::path(data_dir),
                source: std::io::Error::other(e),
            })?
    };
    saved?;
    host_log!(commons.quiet, host = %creds.host_id, name = %name_text, "host enrolled");
    Ok(creds)
}

/// How long enrollment waits for an unreachable controller.
const ENROLL_PATIENCE: Duration = Duration::from_secs(30);

/// `d` scaled by a random factor between `low` and `high`: spreads the
/// periodic work of many hosts so they never act in lockstep.
pub(crate) fn jitter(d: Duration, low: f64, high: f64) -> Duration {
    d.mul_f64(low + rand::random::<f64>() * (high - low))
}

/// Exponential backoff with jitter: 0.5 s doubling to 10 s, each wait
/// between half and all of the current step.
#[derive(Debug)]
pub(crate) struct Backoff {
    step: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            step: min,
            min,
            max,
        }
    }

    pub fn next_wait(&mut self) -> Duration {
        let wait = self.step.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        self.step = (self.step * 2).min(self.max);
        wait
    }

    pub fn reset(&mut self) {
        self.step = self.min;
    }
}

/// The desired-state poller: long polls forever, publishing each new
/// revision; on any error waits (backoff) and polls again. Each poll asks to
/// wait a random 75-100 % of `desired_wait`, so polls begun together (a
/// fleet's start, a controller's restart) soon end apart.
async fn poll_desired(shared: Arc<Shared>, tx: watch::Sender<Option<Arc<Snapshot>>>) {
    let mut since: Option<u64> = None;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    let mut failing_since: Option<std::time::Instant> = None;
    loop {
        let wait = jitter(shared.desired_wait, 0.75, 1.0).max(Duration::from_secs(1));
        match shared.api.desired(since, wait).await {
            Ok(d) => {
                backoff.reset();
                if let Some(t) = failing_since.take() {
                    tracing::info!(
                        after_s = t.elapsed().as_secs(),
                        "controller reachable again"
                    );
                }
                since = Some(d.revision);
                let snapshot = Arc::new(Snapshot {
                    revision: d.revision,
                    vms: d.vms,
                    requests: d.requests,
                });
                shared.book().desired = Some(snapshot.clone());
                tx.send_if_modified(|cur| {
                    if cur
                        .as_ref()
                        .is_some_and(|c| c.revision == snapshot.revision)
                    {
                        false
                    } else {
                        *cur = Some(snapshot);
                        true
                    }
                });
            }
            Err(e) => {
                let wait = backoff.next_wait();
                if failing_since.is_none() {
                    failing_since = Some(std::time::Instant::now());
                    tracing::warn!(error = %chain(&e), "cannot fetch desired state; retrying with backoff (VMs keep running)");
                } else {
                    tracing::debug!(error = %chain(&e), wait_ms = wait.as_millis() as u64, "still cannot fetch desired state");
                }
                if e.status() == Some(401) {
                    tracing::error!("the controller does not accept this host's credential (was the host removed?)");
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        let first = b.next_wait();
        assert!(first >= Duration::from_millis(250) && first <= Duration::from_millis(500));
        let waits: Vec<Duration> = (0..10).map(|_| b.next_wait()).collect();
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(10)));
        assert!(waits[9] >= Duration::from_secs(5), "{waits:?}");
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(500));
    }

    #[tokio::test]
    async fn a_second_agent_on_one_data_dir_is_refused_and_an_unenrolled_one_says_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = lock_data_dir(dir.path()).expect("first lock");
        assert!(matches!(
            lock_data_dir(dir.path()),
            Err(AgentError::DataDirInUse { .. })
        ));
        drop(first);
        let config = AgentConfig::new("http://127.0.0.1:9", dir.path(), DriverConfig::sim());
        let err = match Agent::start(config).await {
            Ok(_) => panic!("an agent without credential or token started"),
            Err(e) => e,
        };
        assert!(matches!(err, AgentError::NotEnrolled { .. }), "{err}");
        assert!(err.to_string().contains("--enroll-token"), "{err}");
    }
}
