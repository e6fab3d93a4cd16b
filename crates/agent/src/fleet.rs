//! Simulated hosts at scale: one process registers N simulated hosts, each a
//! real agent (the same loops as on a real host: long poll, VM workers,
//! reporter) over its own [`SimDriver`]. This is how benchmarks and fault
//! tests get 10,000 hosts on one machine.
//!
//! ```text
//!   SimFleet::start ── one enrollment token with N uses ──► controller
//!        │               (at most `enroll_concurrency` in flight)
//!        ├── host PREFIX-00001: agent loops + SimDriver, DATA_DIR/hosts/PREFIX-00001/
//!        ├── host PREFIX-00002: ...
//!        └── ...          all over one reqwest::Client (one connection pool),
//!                         short calls bounded by one semaphore, one tokio runtime
//! ```
//!
//! What a host costs, idle: one long poll (a connection held at the
//! controller), a report every `report_interval` (10 s by default, jittered,
//! so the controller sees `count / 10` reports a second spread evenly), and
//! the supervisor's retry tick. The guest poller and console shipper of a
//! host without VMs wait without a timer. Each host keeps its credential in
//! `DATA_DIR/hosts/NAME/agent.json`, so a restarted fleet reuses them and
//! enrolls only hosts it has never had; `DATA_DIR/agent.lock` keeps a second
//! fleet (or agent) off the same directory. The hosts share one image cache,
//! `DATA_DIR/images/`: an image is downloaded (by the first host that needs
//! it) and verified once, not once per host, so 10,000 VMs of one image
//! cost one copy.
//!
//! **Boundary**: VMs of a simulated host live in its driver's memory, so
//! they vanish with the process (a restarted fleet finds its hosts empty and
//! the controller's desired state recreates them).

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use stratus_common::HostId;
use stratus_driver::{SimConfig, SimDriver};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::agent::{lock_data_dir, prepare_fleet_dir, Agent, AgentHandle, Commons};
use crate::api::http_client;
use crate::config::{AgentConfig, DriverConfig, OrphanPolicy};
use crate::controllers::Controllers;
use crate::credentials::default_host_name;
use crate::error::AgentError;
use crate::images::ImageCache;

/// File descriptors kept free for everything but the hosts' connections.
const SPARE_FILES: u64 = 256;

/// A simulated fleet. [`SimFleetConfig::new`] fills in the defaults.
#[derive(Clone, Debug)]
pub struct SimFleetConfig {
    /// The controller's API, e.g. `http://127.0.0.1:8480`, or several
    /// controllers of one database separated by commas: the hosts share
    /// one failover among them (see `controllers.rs`).
    pub url: String,
    /// Holds `hosts/NAME/` for every host, and the fleet's lock.
    pub data_dir: PathBuf,
    /// Needed only while some host has no credential yet; must have a use
    /// left for each such host (`stratus host enroll-token --uses N`).
    pub enroll_token: Option<String>,
    /// How many hosts (at least 1).
    pub count: usize,
    /// Hosts are named `PREFIX-00001`, `PREFIX-00002`, ... (at least five
    /// digits); default: the machine's host name.
    pub name_prefix: Option<String>,
    pub zone: Option<String>,
    pub cluster: Option<String>,
    /// Tags every host enrolls with.
    pub tags: Vec<String>,
    /// The capacity each host reports.
    pub cpus: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    /// How long each VM operation (create, start, stop, reboot, destroy)
    /// takes on a simulated host; zero: instant.
    pub latency: Duration,
    /// Heartbeat (report) period of each host, jittered ±10 %. Keep it well
    /// under the controller's host timeout.
    pub report_interval: Duration,
    /// How long one long poll may wait at the controller (at most 60 s;
    /// each poll asks for a random 75-100 % of it).
    pub desired_wait: Duration,
    /// How soon a VM whose convergence failed is tried again.
    pub retry_interval: Duration,
    /// Enrollments (and host starts) in flight at once.
    pub enroll_concurrency: usize,
    /// Short calls (reports, enrollments, first polls, console, results)
    /// in flight at once across the fleet; long polls and image downloads
    /// are not counted.
    pub calls_in_flight: usize,
    /// What every host does with orphan VMs.
    pub orphans: OrphanPolicy,
}

impl SimFleetConfig {
    /// The default report period of a fleet's hosts: 10 s (a lone agent
    /// reports every 2 s). 10,000 hosts then send 1,000 reports a second.
    pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(10);

    /// Defaults: hosts of [`SimConfig::default`]'s size (64 vCPUs, 256 GiB,
    /// 4 TiB), instant operations, reports every 10 s, 50 s long polls,
    /// retries every 15 s, 32 enrollments and 64 short calls in flight.
    pub fn new(url: impl Into<String>, data_dir: impl Into<PathBuf>, count: usize) -> Self {
        let sim = SimConfig::default();
        SimFleetConfig {
            url: url.into(),
            data_dir: data_dir.into(),
            enroll_token: None,
            count,
            name_prefix: None,
            zone: None,
            cluster: None,
            tags: Vec::new(),
            cpus: sim.cpus,
            memory_bytes: sim.memory_bytes,
            disk_bytes: sim.disk_bytes,
            latency: sim.latency,
            report_interval: Self::DEFAULT_REPORT_INTERVAL,
            desired_wait: Duration::from_secs(50),
            retry_interval: Duration::from_secs(15),
            enroll_concurrency: 32,
            calls_in_flight: 64,
            orphans: OrphanPolicy::Destroy,
        }
    }

    /// The name of host `index` (0-based): `PREFIX-00001` for index 0.
    pub fn host_name(&self, prefix: &str, index: usize) -> String {
        let width = self.count.to_string().len().max(5);
        format!("{prefix}-{:0width$}", index + 1)
    }
}

/// One simulated host of a running fleet.
#[derive(Clone)]
pub struct SimHost {
    pub name: String,
    pub host_id: HostId,
    /// Its driver, e.g. to inject a crash ([`SimDriver::crash`]) or count
    /// its VMs.
    pub driver: Arc<SimDriver>,
    pub data_dir: PathBuf,
}

impl std::fmt::Debug for SimHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHost")
            .field("name", &self.name)
            .field("host_id", &self.host_id)
            .field("vms", &self.driver.vm_count())
            .finish()
    }
}

/// Starts simulated fleets. See the module docs.
pub struct SimFleet;

impl SimFleet {
    /// Raises the open-files limit, takes the data dir, then starts every
    /// host: those with a credential in `DATA_DIR/hosts/NAME/` reuse it,
    /// the others enroll (at most `enroll_concurrency` at once). Returns once
    /// every host runs; if any host cannot start, stops the others and says
    /// which host failed and why.
    pub async fn start(config: SimFleetConfig) -> Result<SimFleetHandle, AgentError> {
        if config.count == 0 {
            return Err(AgentError::FleetSize);
        }
        let limit = match raise_open_files_limit() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot raise the open-files limit");
                rustix::process::getrlimit(rustix::process::Resource::Nofile)
                    .current
                    .unwrap_or(u64::MAX)
            }
        };
        let needed = (config.count as u64).saturating_add(SPARE_FILES);
        if needed > limit {
            return Err(AgentError::OpenFilesLimit {
                hosts: config.count,
                limit,
            });
        }
        let data_dir = prepare_fleet_dir(&config.data_dir)?;
        let lock = lock_data_dir(&data_dir)?;
        let prefix = config.name_prefix.clone().unwrap_or_else(default_host_name);
        let commons = Commons {
            http: http_client()?,
            controllers: Arc::new(Controllers::parse(&config.url)?),
            limiter: Some(Arc::new(Semaphore::new(config.calls_in_flight.max(1)))),
            cancel: CancellationToken::new(),
            lock_data_dir: false,
            quiet: true,
            images: Some(Arc::new(ImageCache::new(data_dir.join("images")))),
        };
        let sim = SimConfig {
            cpus: config.cpus,
            memory_bytes: config.memory_bytes,
            disk_bytes: config.disk_bytes,
            latency: config.latency,
        };
        tracing::info!(
            hosts = config.count,
            url = %config.url,
            data_dir = %data_dir.display(),
            open_files_limit = limit,
            "starting a simulated fleet"
        );

        let started_at = Instant::now();
        let mut slots: Vec<Option<(SimHost, AgentHandle)>> = Vec::with_capacity(config.count);
        slots.resize_with(config.count, || None);
        let mut failure: Option<AgentError> = None;
        let mut next = 0usize;
        let mut done = 0usize;
        let mut in_flight = FuturesUnordered::new();
        loop {
            while failure.is_none()
                && next < config.count
                && in_flight.len() < config.enroll_concurrency.max(1)
            {
                let index = next;
                next += 1;
                let name = config.host_name(&prefix, index);
                let driver = Arc::new(SimDriver::new(sim.clone()));
                let host_config = host_config(&config, &data_dir, &name, driver.clone());
                let commons = &commons;
                in_flight.push(async move {
                    let r = Agent::start_in(host_config, commons).await;
                    (index, name, driver, r)
                });
            }
            let Some((index, name, driver, r)) = in_flight.next().await else {
                break;
            };
            match r {
                Ok(agent) => {
                    let host = SimHost {
                        name,
                        host_id: agent.host_id(),
                        driver,
                        data_dir: agent.data_dir().to_path_buf(),
                    };
                    slots[index] = Some((host, agent));
                    done += 1;
                    if done.is_multiple_of(1000) {
                        tracing::info!(
                            started = done,
                            of = config.count,
                            s = started_at.elapsed().as_secs_f64(),
                            "simulated hosts starting"
                        );
                    }
                }
                Err(e) => {
                    if failure.is_none() {
                        failure = Some(AgentError::FleetHost {
                            name,
                            source: Box::new(e),
                        });
                    }
                }
            }
        }

        let (hosts, agents): (Vec<SimHost>, Vec<AgentHandle>) = slots.into_iter().flatten().unzip();
        let fleet = SimFleetHandle {
            enrolled: agents.iter().filter(|a| a.enrolled_now()).count(),
            hosts,
            agents,
            cancel: commons.cancel.clone(),
            _lock: lock,
        };
        if let Some(e) = failure {
            fleet.shutdown().await;
            return Err(e);
        }
        tracing::info!(
            hosts = fleet.len(),
            enrolled_now = fleet.enrolled,
            reused_credentials = fleet.len() - fleet.enrolled,
            s = started_at.elapsed().as_secs_f64(),
            "simulated fleet running"
        );
        Ok(fleet)
    }
}

fn host_config(
    config: &SimFleetConfig,
    data_dir: &std::path::Path,
    name: &str,
    driver: Arc<SimDriver>,
) -> AgentConfig {
    let mut c = AgentConfig::new(
        config.url.clone(),
        data_dir.join("hosts").join(name),
        DriverConfig::Instance(driver),
    );
    c.name = Some(name.to_string());
    c.zone = config.zone.clone();
    c.cluster = config.cluster.clone();
    c.tags = config.tags.clone();
    c.enroll_token = config.enroll_token.clone();
    c.report_interval = config.report_interval;
    c.desired_wait = config.desired_wait;
    c.retry_interval = config.retry_interval;
    c.orphans = config.orphans;
    c
}

/// A running fleet. [`SimFleetHandle::shutdown`] stops every host's loops
/// (and waits for them); dropping the handle stops them without waiting.
pub struct SimFleetHandle {
    hosts: Vec<SimHost>,
    agents: Vec<AgentHandle>,
    /// How many hosts enrolled at this start.
    enrolled: usize,
    cancel: CancellationToken,
    _lock: File,
}

impl SimFleetHandle {
    /// The hosts, in name order.
    pub fn hosts(&self) -> &[SimHost] {
        &self.hosts
    }

    /// The hosts' ids, in name order.
    pub fn host_ids(&self) -> Vec<HostId> {
        self.hosts.iter().map(|h| h.host_id).collect()
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// How many hosts enrolled at this start; the others reused the
    /// credential in their data dir.
    pub fn enrolled_now(&self) -> usize {
        self.enrolled
    }

    /// Stops every host's loops and waits until they have ended. The
    /// controller marks the hosts unreachable once they stay silent.
    pub async fn shutdown(mut self) {
        let t = Instant::now();
        self.cancel.cancel();
        let agents = std::mem::take(&mut self.agents);
        let n = agents.len();
        futures::future::join_all(agents.into_iter().map(AgentHandle::shutdown)).await;
        tracing::info!(
            hosts = n,
            ms = t.elapsed().as_millis() as u64,
            "simulated fleet stopped"
        );
    }
}

impl Drop for SimFleetHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Raises this process's soft limit on open files to its hard limit (each
/// simulated host holds a connection); returns the limit now in force.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    if now.current != now.maximum {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: now.maximum,
                maximum: now.maximum,
            },
        )?;
        tracing::debug!(from = ?now.current, to = ?now.maximum, "open-files limit raised");
    }
    Ok(getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_numbered_from_one_with_at_least_five_digits() {
        let c = SimFleetConfig::new("http://127.0.0.1:9", "/nonexistent", 200);
        assert_eq!(c.host_name("rack", 0), "rack-00001");
        assert_eq!(c.host_name("rack", 199), "rack-00200");
        let c = SimFleetConfig::new("http://127.0.0.1:9", "/nonexistent", 123_456);
        assert_eq!(c.host_name("r", 0), "r-000001");
    }

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        let limit = raise_open_files_limit().expect("raise");
        let now = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        assert_eq!(now.current, now.maximum);
        assert_eq!(Some(limit), now.current);
    }

    #[tokio::test]
    async fn a_fleet_needs_hosts_and_a_token_for_new_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err =
            match SimFleet::start(SimFleetConfig::new("http://127.0.0.1:9", dir.path(), 0)).await {
                Ok(_) => panic!("an empty fleet started"),
                Err(e) => e,
            };
        assert!(matches!(err, AgentError::FleetSize), "{err}");

        let mut c = SimFleetConfig::new("http://127.0.0.1:9", dir.path(), 3);
        c.name_prefix = Some("t".into());
        let err = match SimFleet::start(c).await {
            Ok(_) => panic!("a fleet without credentials or token started"),
            Err(e) => e,
        };
        assert!(
            matches!(&err, AgentError::FleetHost { source, .. } if matches!(**source, AgentError::NotEnrolled { .. })),
            "{err}"
        );
        assert!(
            err.to_string().starts_with("simulated host t-0000"),
            "{err}"
        );
        // The fleet released its lock: a second attempt gets as far.
        let c = SimFleetConfig::new("http://127.0.0.1:9", dir.path(), 1);
        assert!(matches!(
            SimFleet::start(c).await,
            Err(AgentError::FleetHost { .. })
        ));
    }
}
