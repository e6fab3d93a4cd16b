//! `stratus bench chaos`: VM operations while controllers are SIGKILLed,
//! then a check that nothing was lost or left half-done.
//!
//! ```text
//!   stratus server ×N (child processes, one store; SQLite: N = 1) ◄── killer: SIGKILL one at
//!        ▲   ▲                                                        random moments, restart it
//!        │   │  HTTP, each request to a random controller,            on the same port and store
//!        │   │  retried on the next one when it gets no answer        after a short pause
//!        │   └──── C clients: create / start / stop / reboot / delete / cancel, --ops in all
//!        └──────── stratus agent --driver sim --hosts H --url A,B,C (a child; fails over)
//!
//!   then: killing stops, every controller is up, every job must end (bounded wait), and
//!   the invariants are checked through the API and, with the controllers stopped, in the
//!   store itself
//! ```
//!
//! A create whose answer was lost (the controller died after reading the
//! request) is retried with the same `Idempotency-Key`, so it cannot create
//! a second VM. Other operations have no key: a lost answer is retried
//! as is, and the repeat is usually refused (`409 vm_busy`), which counts
//! as a refusal like any other (VM busy, name taken, no capacity, job
//! already ended).
//!
//! Anomalies, each printed (the first 20) and counted:
//! - a job not `succeeded`, `failed` or `cancelled` once the wait is over;
//! - a VM in a transitional state (`creating`, `starting`, `stopping`,
//!   `rebooting`, `deleting`), or (in the store) still held by a job;
//! - a VM `stopped` while desired `running`, or the reverse, or desired
//!   `deleted` yet still there (every job has ended, and simulated guests
//!   never power off by themselves, so its host was never told what is
//!   wanted);
//! - a host whose allocation (as the host API shows it) differs from the sum
//!   of the VMs placed on it; a host not `up` (its agent never stopped);
//! - two VMs of one name in one project;
//! - (in the store) a VM shown `running` whose host last reported it
//!   otherwise, or shown `stopped` while its host reports it running.
//!
//! Also counted, not as anomalies: VMs a host had that no controller knew
//! of (the API cannot show them; their agent destroys them and logs it,
//! e.g. after a create cancelled while its host was building the VM).
//!
//! The run is seeded (`--seed`: every operation and every kill is drawn
//! from it) but not deterministic: timing decides what each kill
//! interrupts.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use stratus_api_types::agent::ObservedVmState;
use stratus_api_types::views::VmState;
use tokio::sync::watch;

use crate::bench_support::{free_port, wait_healthy, Api, BackendArg, Controller, ControllerSpec};

#[derive(Args, Debug)]
pub struct ChaosArgs {
    /// The controllers' store
    #[arg(long, value_enum, default_value_t = BackendArg::Sqlite)]
    backend: BackendArg,
    /// For --backend postgres: an empty database (it is migrated)
    #[arg(long, env = "STRATUS_BENCH_PG_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Controllers on the one database, each on its own loopback port
    /// [default: 3 on PostgreSQL; SQLite has exactly 1]
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    controllers: Option<u16>,
    /// Simulated hosts (one `stratus agent --driver sim` process)
    #[arg(long, default_value_t = 20)]
    hosts: usize,
    /// VM operations to send, in all
    #[arg(long, default_value_t = 2000)]
    ops: usize,
    /// Concurrent clients sending them
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Operations sent per second, in all: operation i is due i/RATE
    /// seconds after the start (a client late on its schedule sends at
    /// once), so the operations span the kills rather than finishing
    /// between two of them
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Time between kills, a range in milliseconds (MIN..MAX, drawn anew each time)
    #[arg(long, default_value = "1500..4000", value_name = "MIN..MAX")]
    kill_every_ms: MsRange,
    /// How long a killed controller stays down, in milliseconds
    #[arg(long, default_value = "200..1000", value_name = "MIN..MAX")]
    down_ms: MsRange,
    /// Keep killing (after the operations if need be) until this many kills
    #[arg(long, default_value_t = 0)]
    min_kills: usize,
    /// How long each simulated VM operation takes on a host
    #[arg(long, default_value_t = 400)]
    sim_latency_ms: u64,
    /// How long a client waits for the job of an operation it waits on
    /// (about 60 % of them; the others are left running, so later
    /// operations meet VMs busy and jobs in flight to cancel)
    #[arg(long, default_value_t = 3)]
    job_wait_secs: u32,
    /// Seed of the operations and of the kills
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// After the last kill, how long every job gets to end before the ones
    /// still going count as anomalies
    #[arg(long, default_value_t = 120)]
    settle_secs: u64,
    /// Keep the run's directory (every process's log, the SQLite store)
    #[arg(long)]
    keep: bool,
}

/// `MIN..MAX` (or one number) in milliseconds.
#[derive(Clone, Copy, Debug)]
pub struct MsRange {
    min: u64,
    max: u64,
}

impl FromStr for MsRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let num = |t: &str| {
            t.trim()
                .parse::<u64>()
                .map_err(|_| format!("{t:?} is not a number of milliseconds"))
        };
        let (min, max) = match s.split_once("..") {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let v = num(s)?;
                (v, v)
            }
        };
        if min > max {
            return Err(format!("{min}..{max}: the minimum exceeds the maximum"));
        }
        Ok(MsRange { min, max })
    }
}

impl MsRange {
    fn draw(&self, rng: &mut StdRng) -> Duration {
        Duration::from_millis(rng.random_range(self.min..=self.max))
    }
}

impl std::fmt::Display for MsRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..{} ms", self.min, self.max)
    }
}

const PROJECT: &str = "chaos";
/// (name, vCPUs, memory GiB, disk GiB)
const FLAVORS: [(&str, u64, u64, u64); 3] = [("c1", 1, 1, 10), ("c2", 2, 2, 20), ("c4", 4, 4, 40)];
/// Each simulated host: small enough that creates meet full hosts.
const SIM_CPUS: &str = "8";
const SIM_MEMORY: &str = "12GiB";
const SIM_DISK: &str = "400GiB";
/// Heartbeat of the simulated hosts, seconds.
const REPORT_SECS: u64 = 2;
/// How long one request keeps trying controllers before it gives up.
const REQUEST_PATIENCE: Duration = Duration::from_secs(60);
/// How many anomalies are printed.
const SHOWN: usize = 20;

/// Every op drawn from the seed and its index: its own random stream.
fn op_rng(seed: u64, i: usize) -> StdRng {
    StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64))
}

pub async fn chaos(a: ChaosArgs) -> anyhow::Result<()> {
    let controllers = match (a.backend, a.controllers) {
        (BackendArg::Sqlite, None | Some(1)) => 1,
        (BackendArg::Sqlite, Some(_)) => {
            bail!("SQLite has one controller (a second refuses the store); use --backend postgres")
        }
        (BackendArg::Postgres, n) => usize::from(n.unwrap_or(3)),
    };
    if a.hosts == 0 || a.clients == 0 {
        bail!("--hosts and --clients must be at least 1");
    }
    if a.rate.is_nan() || a.rate <= 0.0 {
        bail!("--rate must be above 0");
    }
    let dir = tempfile::Builder::new()
        .prefix("stratus-bench-chaos-")
        .tempdir()?;
    let root = dir.path().to_path_buf();
    let _keep = if a.keep { Some(dir.keep()) } else { None };
    let database_url = match (a.backend, &a.database_url) {
        (BackendArg::Sqlite, _) => format!("sqlite://{}", root.join("stratus.db").display()),
        (BackendArg::Postgres, Some(u)) => u.clone(),
        (BackendArg::Postgres, None) => {
            bail!("--backend postgres needs --database-url (an empty database)")
        }
    };
    println!(
        "bench chaos: backend {}, {controllers} controller(s), {} simulated hosts ({SIM_CPUS} vCPUs, \
         {SIM_MEMORY}, {SIM_DISK} each; {} ms per VM operation), {} operations from {} clients \
         at {}/s, a controller SIGKILLed every {} and down {}{}, seed {}",
        a.backend.name(),
        a.hosts,
        a.sim_latency_ms,
        a.ops,
        a.clients,
        a.rate,
        a.kill_every_ms,
        a.down_ms,
        if a.min_kills > 0 {
            format!(" (at least {} kills)", a.min_kills)
        } else {
            String::new()
        },
        a.seed
    );
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs)?;
    println!(
        "  run directory {}{}",
        root.display(),
        if a.keep {
            " (kept)"
        } else {
            " (removed at the end; --keep keeps it)"
        }
    );

    // The controllers: the first creates the admin token, then the others.
    let token_file = root.join("admin.token");
    let mut nodes = Vec::new();
    for n in 1..=controllers {
        let spec = ControllerSpec {
            port: free_port()?,
            database_url: database_url.clone(),
            data_dir: root.join("controller"),
            token_file: token_file.clone(),
            controller_id: Some(format!("chaos-c{n}")),
            log: Some(logs.join(format!("controller-{n}.log"))),
        };
        let mut node = Node {
            controller: Controller {
                child: spec.spawn()?,
                url: spec.url(),
            },
            spec,
        };
        node.wait_up().await?;
        nodes.push(node);
    }
    let urls: Vec<String> = nodes.iter().map(|n| n.controller.url.clone()).collect();
    let admin = std::fs::read_to_string(&token_file)?.trim().to_string();
    let setup = Api {
        http: reqwest::Client::new(),
        url: urls[0].clone(),
    };
    setup
        .post("/v1/projects", &admin, json!({ "name": PROJECT }))
        .await?;
    for (name, vcpus, mem, disk) in FLAVORS {
        setup
            .post(
                "/v1/flavors",
                &admin,
                json!({"name": name, "vcpus": vcpus, "memory_bytes": mem << 30, "disk_bytes": disk << 30}),
            )
            .await?;
    }
    setup
        .upload_test_image(&admin, &root, PROJECT, "chaos")
        .await?;
    let t = setup
        .post(
            "/v1/host-enrollment-tokens",
            &admin,
            json!({"uses": a.hosts}),
        )
        .await?;
    let enroll = t["token"].as_str().context("enrollment token")?.to_string();
    let fleet = start_fleet(&a, &root, &urls.join(","), &enroll, &logs)?;
    wait_hosts_up(&setup, &admin, a.hosts).await?;
    for url in &urls {
        let api = Api {
            http: setup.http.clone(),
            url: url.clone(),
        };
        wait_scheduler_knows(&api, &admin, a.hosts).await?;
    }
    println!(
        "  {} controller(s) at {}; {} hosts up",
        controllers,
        urls.join(", "),
        a.hosts
    );

    // The chaos.
    let started = Instant::now();
    let ctx = Arc::new(Ctx {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(u64::from(a.job_wait_secs) + 20))
            .pool_max_idle_per_host(a.clients + 4)
            .build()?,
        urls: urls.clone(),
        admin: admin.clone(),
        seed: a.seed,
        ops: a.ops,
        rate: a.rate,
        started: Instant::now(),
        job_wait_secs: a.job_wait_secs,
        next: AtomicUsize::new(0),
        world: Mutex::new(World::default()),
        tally: Mutex::new(Tally::default()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let kills = Arc::new(AtomicUsize::new(0));
    let killer = tokio::spawn(kill_loop(
        nodes,
        KillPlan {
            every: a.kill_every_ms,
            down: a.down_ms,
            min_kills: a.min_kills,
            seed: a.seed,
        },
        stop_rx,
        kills.clone(),
    ));
    let clients: Vec<_> = (0..a.clients)
        .map(|_| tokio::spawn(client_loop(ctx.clone())))
        .collect();
    // The killer is always stopped and awaited (it owns the controllers,
    // which stop when dropped) before any error goes up.
    let mut failed = None;
    for c in clients {
        if let Err(e) = c.await {
            failed.get_or_insert(e);
        }
    }
    let ops_time = started.elapsed();
    let _ = stop_tx.send(true);
    let mut nodes = killer.await??;
    if let Some(e) = failed {
        bail!("a client task failed: {e}");
    }
    let kills = kills.load(Ordering::Relaxed);
    println!(
        "  {} operations in {:.1} s, {} kills",
        a.ops,
        ops_time.as_secs_f64(),
        kills
    );
    for n in &mut nodes {
        n.ensure_up().await?;
    }

    // Every job must end.
    let t_settle = Instant::now();
    let settled = wait_jobs_end(&setup, &admin, Duration::from_secs(a.settle_secs)).await?;
    let settle_time = t_settle.elapsed();
    println!(
        "  {} {:.1} s after the last kill",
        if settled {
            "every job ended"
        } else {
            "jobs still unfinished"
        },
        settle_time.as_secs_f64()
    );
    // Observations made after the last job ended reach the store.
    tokio::time::sleep(Duration::from_secs(2 * REPORT_SECS + 1)).await;

    let mut found = Anomalies::default();
    let jobs = check_api(&setup, &admin, &mut found).await?;
    // The store, with nothing moving: the fleet first (so controllers stop
    // without waiting on long polls), then the controllers.
    drop(fleet);
    drop(nodes);
    audit_store(&database_url, &mut found).await?;
    // VMs a host had that the controller had no record of: the API does
    // not show them, their agent destroys them and says so in its log.
    let orphans = std::fs::read_to_string(logs.join("fleet.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("orphan VM destroyed"))
        .count();

    let tally = ctx.tally.lock().unwrap_or_else(|e| e.into_inner()).clone();
    print_tally(&tally);
    println!(
        "  VMs the hosts had but the controllers had no record of (destroyed by their agent; \
         counted from fleet.log): {orphans}"
    );
    for line in found.lines.iter().take(SHOWN) {
        println!("  ANOMALY {line}");
    }
    if found.lines.len() > SHOWN {
        println!("  ... and {} more", found.lines.len() - SHOWN);
    }
    let count = |s: &str| jobs.get(s).copied().unwrap_or(0);
    println!(
        "chaos: backend={} controllers={} hosts={} ops={} kills={} jobs={} succeeded={} failed={} \
         cancelled={} refused={} lost_answers={} server_errors={} anomalies={} settle={:.1}s elapsed={:.1}s",
        a.backend.name(),
        controllers,
        a.hosts,
        a.ops,
        kills,
        jobs.values().sum::<u64>(),
        count("succeeded"),
        count("failed"),
        count("cancelled"),
        tally.refused.values().sum::<u64>(),
        tally.lost_answers,
        tally.server_errors,
        found.lines.len(),
        settle_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    if !found.lines.is_empty() {
        bail!("{} anomalies", found.lines.len());
    }
    Ok(())
}

/// One controller slot: how to start it, and the process now in it.
struct Node {
    spec: ControllerSpec,
    controller: Controller,
}

impl Node {
    async fn wait_up(&mut self) -> anyhow::Result<()> {
        wait_healthy(
            &self.controller.url,
            &self.spec.token_file,
            &mut self.controller.child,
            Duration::from_secs(60),
        )
        .await
    }

    /// Starts the slot's controller again (the old process has ended) and
    /// waits until it answers; a start that fails (the port not yet free,
    /// say) is tried again.
    async fn restart(&mut self) -> anyhow::Result<()> {
        let mut last = None;
        for _ in 0..5 {
            self.controller.child = self.spec.spawn()?;
            match self.wait_up().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last = Some(e);
                    let _ = self.controller.child.kill();
                    let _ = self.controller.child.wait();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no start attempted")))
            .with_context(|| format!("restarting the controller at {}", self.controller.url))
    }

    /// Running and answering; started again if it has ended.
    async fn ensure_up(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(_)) = self.controller.child.try_wait() {
            return self.restart().await;
        }
        self.wait_up().await
    }

    /// SIGKILL, and reap it.
    async fn kill(&mut self) {
        let _ = self.controller.child.kill();
        for _ in 0..200 {
            if let Ok(Some(_)) = self.controller.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct KillPlan {
    every: MsRange,
    down: MsRange,
    min_kills: usize,
    seed: u64,
}

/// Kills one controller at a time, chosen at random, at random moments,
/// and restarts it after a random pause, until told to stop and at least
/// `min_kills` kills are done. Hands the controllers back, all running.
async fn kill_loop(
    mut nodes: Vec<Node>,
    plan: KillPlan,
    mut stop: watch::Receiver<bool>,
    kills: Arc<AtomicUsize>,
) -> anyhow::Result<Vec<Node>> {
    let mut rng = StdRng::seed_from_u64(plan.seed ^ 0x6b69_6c6c);
    loop {
        let wait = plan.every.draw(&mut rng);
        let stopping = *stop.borrow();
        if stopping {
            if kills.load(Ordering::Relaxed) >= plan.min_kills {
                return Ok(nodes);
            }
            tokio::time::sleep(wait).await;
        } else {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => continue,
            }
        }
        let i = rng.random_range(0..nodes.len());
        nodes[i].kill().await;
        kills.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(plan.down.draw(&mut rng)).await;
        nodes[i].restart().await?;
    }
}

/// The simulated fleet as a child process, stopped (SIGTERM) on drop.
struct Fleet {
    child: Child,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        crate::bench::stop_child(&mut self.child);
    }
}

fn start_fleet(
    a: &ChaosArgs,
    root: &Path,
    urls: &str,
    token: &str,
    logs: &Path,
) -> anyhow::Result<Fleet> {
    let exe = std::env::current_exe().context("finding the stratus binary")?;
    let log = std::fs::File::create(logs.join("fleet.log"))?;
    let child = Command::new(exe)
        .args(["agent", "--driver", "sim", "--name", "chaos", "--url", urls])
        .args(["--hosts", &a.hosts.to_string()])
        .args(["--sim-cpus", SIM_CPUS, "--sim-memory", SIM_MEMORY])
        .args(["--sim-disk", SIM_DISK])
        .args(["--sim-latency-ms", &a.sim_latency_ms.to_string()])
        .args(["--report-interval", &REPORT_SECS.to_string()])
        .arg("--data-dir")
        .arg(root.join("fleet"))
        .env("STRATUS_ENROLL_TOKEN", token)
        .env(
            "STRATUS_LOG",
            std::env::var("STRATUS_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env("NO_COLOR", "1")
        .env_remove("STRATUS_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting the simulated fleet")?;
    Ok(Fleet { child })
}

async fn wait_hosts_up(api: &Api, admin: &str, hosts: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = api
            .all("/v1/hosts", admin)
            .await?
            .iter()
            .filter(|h| h["state"] == "up")
            .count();
        if up >= hosts {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {up} of {hosts} simulated hosts came up within 60 s (see fleet.log)");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the scheduler of the controller behind `api` places on all
/// `hosts` (it learns of hosts enrolled through another controller at its
/// next index rebuild, every 5 s): a dry run of one VM counts the hosts it
/// considered.
async fn wait_scheduler_knows(api: &Api, admin: &str, hosts: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = json!({"count": 1, "vm": {"name": "probe", "project": PROJECT,
        "flavor": FLAVORS[0].0, "image": "chaos"}});
    loop {
        let p = api.post("/v1/vm-placements", admin, body.clone()).await?;
        let known = p["explanation"]["hosts_total"].as_u64().unwrap_or(0);
        if known >= hosts as u64 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the scheduler at {} knows {known} of {hosts} hosts after 30 s",
                api.url
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What the clients share.
struct Ctx {
    http: reqwest::Client,
    urls: Vec<String>,
    admin: String,
    seed: u64,
    ops: usize,
    /// Operations per second, and when operation 0 was due.
    rate: f64,
    started: Instant,
    job_wait_secs: u32,
    next: AtomicUsize,
    world: Mutex<World>,
    tally: Mutex<Tally>,
}

impl Ctx {
    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the clients know of the cloud: VMs to act on, jobs to cancel.
#[derive(Default)]
struct World {
    /// (id, name) of VMs believed to exist.
    vms: Vec<(String, String)>,
    /// Recently accepted jobs, possibly still running.
    jobs: VecDeque<String>,
}

impl World {
    fn forget_vm(&mut self, id: &str) {
        self.vms.retain(|(v, _)| v != id);
    }
}

/// What the operations met.
#[derive(Clone, Debug, Default)]
struct Tally {
    /// Per operation: accepted.
    accepted: BTreeMap<&'static str, u64>,
    /// Per error code: refused (409, 422: normal outcomes under load).
    refused: BTreeMap<String, u64>,
    /// The first message of each refusal code.
    refusal_samples: BTreeMap<String, String>,
    /// 404: the VM went meanwhile (another client deleted it).
    gone: u64,
    /// Requests whose answer was lost (sent, then the connection broke or
    /// timed out), each retried on another controller.
    lost_answers: u64,
    /// Tries that found a controller not listening.
    refused_connections: u64,
    /// Answers 5xx (retried on another controller), with the first few.
    server_errors: u64,
    server_error_samples: Vec<String>,
    /// Requests that got no answer from any controller in time.
    gave_up: u64,
    /// Other 4xx answers (a bug in the benchmark or the API), first few.
    unexpected: Vec<String>,
    /// Jobs waited on, by how they ended ("unfinished": still going at the
    /// end of the client's wait).
    waited: BTreeMap<String, u64>,
}

#[derive(Clone, Debug)]
enum Op {
    Create { name: String, flavor: &'static str },
    Start(String),
    Stop(String),
    Reboot(String),
    Delete(String),
    Cancel(String),
}

impl Op {
    fn label(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Start(_) => "start",
            Op::Stop(_) => "stop",
            Op::Reboot(_) => "reboot",
            Op::Delete(_) => "delete",
            Op::Cancel(_) => "cancel",
        }
    }
}

/// Draws operation `i`: creates while there are few VMs, else a mix.
fn draw_op(rng: &mut StdRng, i: usize, world: &World) -> Op {
    let create = |rng: &mut StdRng| {
        // Now and then a name already taken (a 409, or a race between two
        // controllers the store must settle).
        let name = match world.vms.len() {
            n if n > 0 && rng.random_bool(0.1) => world.vms[rng.random_range(0..n)].1.clone(),
            _ => format!("vm-{i}"),
        };
        Op::Create {
            name,
            flavor: FLAVORS[rng.random_range(0..FLAVORS.len())].0,
        }
    };
    if world.vms.len() < 4 {
        return create(rng);
    }
    let vm = world.vms[rng.random_range(0..world.vms.len())].0.clone();
    match rng.random_range(0..100) {
        0..25 => create(rng),
        25..40 => Op::Start(vm),
        40..55 => Op::Stop(vm),
        55..70 => Op::Reboot(vm),
        70..88 => Op::Delete(vm),
        _ => match world.jobs.len() {
            0 => Op::Reboot(vm),
            n => Op::Cancel(world.jobs[rng.random_range(0..n)].clone()),
        },
    }
}

/// An answer, or why there is none.
enum Reply {
    Answer { status: u16, body: Value },
    GaveUp(String),
}

async fn client_loop(ctx: Arc<Ctx>) {
    loop {
        let i = ctx.next.fetch_add(1, Ordering::Relaxed);
        if i >= ctx.ops {
            return;
        }
        let due = ctx.started + Duration::from_secs_f64(i as f64 / ctx.rate);
        tokio::time::sleep_until(due.into()).await;
        let mut rng = op_rng(ctx.seed, i);
        let op = draw_op(&mut rng, i, &ctx.world());
        let wait = rng.random_bool(0.6);
        run_op(&ctx, &mut rng, i, &op, wait).await;
    }
}

async fn run_op(ctx: &Ctx, rng: &mut StdRng, i: usize, op: &Op, wait: bool) {
    let (method, path, body, key) = match op {
        Op::Create { name, flavor } => (
            reqwest::Method::POST,
            "/v1/vms".to_string(),
            Some(json!({"name": name, "project": PROJECT, "flavor": flavor, "image": "chaos"})),
            Some(format!("chaos-{}-{i}", ctx.seed)),
        ),
        Op::Start(vm) => (
            reqwest::Method::POST,
            format!("/v1/vms/{vm}/start"),
            None,
            None,
        ),
        Op::Stop(vm) => (
            reqwest::Method::POST,
            format!("/v1/vms/{vm}/stop"),
            None,
            None,
        ),
        Op::Reboot(vm) => (
            reqwest::Method::POST,
            format!("/v1/vms/{vm}/reboot"),
            None,
            None,
        ),
        Op::Delete(vm) => (reqwest::Method::DELETE, format!("/v1/vms/{vm}"), None, None),
        Op::Cancel(job) => (
            reqwest::Method::POST,
            format!("/v1/jobs/{job}/cancel"),
            None,
            None,
        ),
    };
    let reply = send(ctx, rng, method, &path, body.as_ref(), key.as_deref()).await;
    let (status, body) = match reply {
        Reply::Answer { status, body } => (status, body),
        Reply::GaveUp(why) => {
            let mut t = ctx.tally();
            t.gave_up += 1;
            if t.unexpected.len() < 5 {
                t.unexpected
                    .push(format!("{} {path}: no answer: {why}", op.label()));
            }
            return;
        }
    };
    match status {
        200..=299 => {
            *ctx.tally().accepted.entry(op.label()).or_default() += 1;
            let job = match op {
                Op::Cancel(_) => None,
                _ => body["job"]["id"].as_str().map(str::to_string),
            };
            {
                let mut w = ctx.world();
                if let (Op::Create { .. }, Some(id), Some(name)) =
                    (op, body["vm"]["id"].as_str(), body["vm"]["name"].as_str())
                {
                    if !w.vms.iter().any(|(v, _)| v == id) {
                        w.vms.push((id.to_string(), name.to_string()));
                    }
                }
                if let Some(j) = &job {
                    w.jobs.push_back(j.clone());
                    if w.jobs.len() > 64 {
                        w.jobs.pop_front();
                    }
                }
            }
            if let (true, Some(job)) = (wait, job) {
                let state = wait_job(ctx, rng, &job).await;
                let mut w = ctx.world();
                w.jobs.retain(|j| j != &job);
                if let (Op::Delete(vm), "succeeded") = (op, state.as_str()) {
                    w.forget_vm(vm);
                }
                drop(w);
                *ctx.tally().waited.entry(state).or_default() += 1;
            }
        }
        404 => {
            ctx.tally().gone += 1;
            match op {
                Op::Cancel(job) => ctx.world().jobs.retain(|j| j != job),
                Op::Start(vm) | Op::Stop(vm) | Op::Reboot(vm) | Op::Delete(vm) => {
                    ctx.world().forget_vm(vm)
                }
                Op::Create { .. } => {}
            }
        }
        409 | 422 => {
            let code = body["error_code"]
                .as_str()
                .unwrap_or("(no error code)")
                .to_string();
            if let Op::Cancel(job) = op {
                ctx.world().jobs.retain(|j| j != job);
            }
            let mut t = ctx.tally();
            let key = format!("{}:{code}", op.label());
            *t.refused.entry(key.clone()).or_default() += 1;
            t.refusal_samples
                .entry(key)
                .or_insert_with(|| body["message"].as_str().unwrap_or("").to_string());
        }
        _ => {
            let mut t = ctx.tally();
            if t.unexpected.len() < 5 {
                t.unexpected
                    .push(format!("{} {path}: HTTP {status}: {body}", op.label()));
            }
        }
    }
}

/// Waits (at most `job_wait_secs` in all, across controllers) for a job
/// to end; its state then.
async fn wait_job(ctx: &Ctx, rng: &mut StdRng, job: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(u64::from(ctx.job_wait_secs));
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return "unfinished".to_string();
        }
        let secs = left.as_secs().max(1);
        let path = format!("/v1/jobs/{job}/wait?timeout_secs={secs}");
        match send(ctx, rng, reqwest::Method::GET, &path, None, None).await {
            Reply::Answer { status: 200, body } => {
                if let Some(s @ ("succeeded" | "failed" | "cancelled")) = body["state"].as_str() {
                    return s.to_string();
                }
            }
            Reply::Answer { status, .. } => return format!("unreadable (HTTP {status})"),
            Reply::GaveUp(_) => return "unreadable (no answer)".to_string(),
        }
    }
}

/// Sends a request to a random controller; when it gets no answer (not
/// listening, connection broken, timeout) or a 5xx, tries the next
/// controller, pausing after each round of all of them (50 ms doubling to
/// 1 s), for up to [`REQUEST_PATIENCE`]. `key` goes as `Idempotency-Key`,
/// the same on every try.
async fn send(
    ctx: &Ctx,
    rng: &mut StdRng,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
    key: Option<&str>,
) -> Reply {
    let n = ctx.urls.len();
    let start = rng.random_range(0..n);
    let deadline = Instant::now() + REQUEST_PATIENCE;
    let mut pause = Duration::from_millis(50);
    let mut last = String::new();
    for attempt in 0.. {
        if attempt > 0 && attempt % n == 0 {
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
        let url = &ctx.urls[(start + attempt) % n];
        let mut r = ctx
            .http
            .request(method.clone(), format!("{url}{path}"))
            .bearer_auth(&ctx.admin);
        if let Some(b) = body {
            r = r.json(b);
        }
        if let Some(k) = key {
            r = r.header("Idempotency-Key", k);
        }
        let resp = match r.send().await {
            Ok(resp) => resp,
            Err(e) => {
                let mut t = ctx.tally();
                if e.is_connect() {
                    t.refused_connections += 1;
                } else {
                    t.lost_answers += 1;
                }
                last = format!("{url}: {e}");
                continue;
            }
        };
        let status = resp.status().as_u16();
        let text = match resp.text().await {
            Ok(t) => t,
            Err(e) => {
                ctx.tally().lost_answers += 1;
                last = format!("{url}: {e}");
                continue;
            }
        };
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status >= 500 {
            let mut t = ctx.tally();
            t.server_errors += 1;
            if t.server_error_samples.len() < 5 {
                t.server_error_samples
                    .push(format!("{method} {path} at {url}: HTTP {status}: {body}"));
            }
            last = format!("{url}: HTTP {status}");
            continue;
        }
        return Reply::Answer { status, body };
    }
    Reply::GaveUp(last)
}

/// Waits until no job is queued, running or cancelling; false if some
/// still are after `patience`.
async fn wait_jobs_end(api: &Api, admin: &str, patience: Duration) -> anyhow::Result<bool> {
    let deadline = Instant::now() + patience;
    loop {
        let mut left = 0;
        for state in ["queued", "running", "cancelling"] {
            left += api
                .get(&format!("/v1/jobs?state={state}&limit=1"), admin)
                .await?["items"]
                .as_array()
                .map(|v| v.len())
                .unwrap_or(0);
        }
        if left == 0 {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[derive(Default)]
struct Anomalies {
    lines: Vec<String>,
}

impl Anomalies {
    fn add(&mut self, line: String) {
        self.lines.push(line);
    }
}

const TRANSITIONAL: [&str; 5] = ["creating", "starting", "stopping", "rebooting", "deleting"];

/// Checks through the API: jobs, VMs, hosts. Returns the jobs counted by
/// state.
async fn check_api(
    api: &Api,
    admin: &str,
    found: &mut Anomalies,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let jobs = api.all("/v1/jobs", admin).await?;
    let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
    for j in &jobs {
        let state = j["state"].as_str().unwrap_or("?").to_string();
        if !matches!(state.as_str(), "succeeded" | "failed" | "cancelled") {
            found.add(format!(
                "job {} ({} of {} {}) is still {} (step {}, updated {})",
                j["id"].as_str().unwrap_or("?"),
                j["kind"].as_str().unwrap_or("?"),
                j["target_kind"].as_str().unwrap_or("?"),
                j["target_id"].as_str().unwrap_or("?"),
                state,
                j["current_step"].as_str().unwrap_or("-"),
                j["updated_at"].as_str().unwrap_or("?"),
            ));
        }
        *by_state.entry(state).or_default() += 1;
    }

    let vms = api.all("/v1/vms", admin).await?;
    let mut names: HashMap<(String, String), u32> = HashMap::new();
    // Per host: (vCPUs, memory, disk) of the VMs placed on it.
    let mut placed: HashMap<String, [u64; 3]> = HashMap::new();
    for v in &vms {
        let id = v["id"].as_str().unwrap_or("?");
        let name = v["name"].as_str().unwrap_or("?");
        let state = v["state"].as_str().unwrap_or("?");
        let desired = v["desired_state"].as_str().unwrap_or("?");
        if TRANSITIONAL.contains(&state) {
            found.add(format!(
                "VM {name} ({id}) is still {state} (desired {desired})"
            ));
        } else if matches!(
            (desired, state),
            ("running", "stopped") | ("stopped", "running") | ("deleted", _)
        ) {
            // Nothing acts on it any more, and simulated guests never power
            // off by themselves: its host was not told what is wanted.
            found.add(format!(
                "VM {name} ({id}) is {state} but desired {desired}, with every job ended"
            ));
        }
        *names
            .entry((
                v["project_id"].as_str().unwrap_or("?").to_string(),
                name.to_string(),
            ))
            .or_default() += 1;
        if let Some(h) = v["host_id"].as_str() {
            let sum = placed.entry(h.to_string()).or_default();
            sum[0] += v["vcpus"].as_u64().unwrap_or(0);
            sum[1] += v["memory_bytes"].as_u64().unwrap_or(0);
            sum[2] += v["disk_bytes"].as_u64().unwrap_or(0);
        }
    }
    let mut dups: Vec<_> = names.into_iter().filter(|(_, n)| *n > 1).collect();
    dups.sort();
    for ((project, name), n) in dups {
        found.add(format!("{n} VMs are named {name:?} in project {project}"));
    }

    let hosts = api.all("/v1/hosts", admin).await?;
    for h in &hosts {
        let id = h["id"].as_str().unwrap_or("?");
        let name = h["name"].as_str().unwrap_or("?");
        if h["state"] != "up" {
            found.add(format!(
                "host {name} is {} although its agent ran throughout",
                h["state"].as_str().unwrap_or("?")
            ));
        }
        let alloc = &h["allocated"];
        let shown = [
            alloc["vcpus"].as_u64().unwrap_or(0),
            alloc["memory_bytes"].as_u64().unwrap_or(0),
            alloc["disk_bytes"].as_u64().unwrap_or(0),
        ];
        let sum = placed.remove(id).unwrap_or_default();
        if shown != sum {
            found.add(format!(
                "host {name} shows {} vCPUs, {} MiB, {} GiB allocated, but its VMs add up to \
                 {} vCPUs, {} MiB, {} GiB",
                shown[0],
                shown[1] >> 20,
                shown[2] >> 30,
                sum[0],
                sum[1] >> 20,
                sum[2] >> 30
            ));
        }
    }
    for (host, sum) in placed {
        found.add(format!(
            "VMs ({} vCPUs in all) are placed on host {host}, which the host list does not show",
            sum[0]
        ));
    }
    Ok(by_state)
}

/// Checks in the store itself (every controller stopped), for what the API
/// does not show: a VM still held by a job, and what its host last
/// observed against what the VM shows.
async fn audit_store(database_url: &str, found: &mut Anomalies) -> anyhow::Result<()> {
    let ds = stratus_datastore::Datastore::open(database_url)
        .await
        .context("opening the store for the audit")?;
    let filter = stratus_datastore::VmListFilter {
        project: None,
        name: None,
        state: None,
        host: None,
    };
    let mut cursor: Option<String> = None;
    loop {
        let page = stratus_datastore::PageRequest::parse(Some(1000), cursor.as_deref())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let vms = ds
            .vm_list(&filter, &page)
            .await
            .map_err(|e| anyhow::anyhow!("listing VMs in the store: {e}"))?;
        for v in &vms.items {
            if let Some(job) = v.active_job_id {
                found.add(format!(
                    "VM {} ({}) is still held by job {job} (state {})",
                    v.name,
                    v.id,
                    v.state.as_str()
                ));
            }
            let observed = v.observed_state;
            let mismatch = match v.state {
                VmState::Running => observed != Some(ObservedVmState::Running),
                VmState::Stopped => observed == Some(ObservedVmState::Running),
                _ => false,
            };
            if mismatch {
                found.add(format!(
                    "VM {} ({}) is shown {} but its host last reported it {}",
                    v.name,
                    v.id,
                    v.state.as_str(),
                    observed
                        .map(|o| format!("{o:?}").to_lowercase())
                        .unwrap_or_else(|| "nothing".into())
                ));
            }
        }
        match vms.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    ds.close().await;
    Ok(())
}

fn print_tally(t: &Tally) {
    let list = |m: &BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "  accepted: {}",
        t.accepted
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  refused: {}",
        if t.refused.is_empty() {
            "none".to_string()
        } else {
            list(&t.refused)
        }
    );
    println!(
        "  VM gone meanwhile (404): {}; jobs waited on: {}",
        t.gone,
        list(&t.waited)
    );
    println!(
        "  tries on a controller not listening: {}; answers lost (retried elsewhere): {}; \
         5xx answers: {}; requests no controller answered: {}",
        t.refused_connections, t.lost_answers, t.server_errors, t.gave_up
    );
    for (code, message) in &t.refusal_samples {
        println!("  e.g. {code}: {message}");
    }
    for s in &t.server_error_samples {
        println!("  5xx: {s}");
    }
    for s in &t.unexpected {
        println!("  unexpected: {s}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse() {
        let r: MsRange = "1500..4000".parse().expect("range");
        assert_eq!((r.min, r.max), (1500, 4000));
        let r: MsRange = "300".parse().expect("one value");
        assert_eq!((r.min, r.max), (300, 300));
        assert!("4000..1500".parse::<MsRange>().is_err());
        assert!("a..b".parse::<MsRange>().is_err());
        let mut rng = StdRng::seed_from_u64(1);
        let r: MsRange = "10..20".parse().expect("range");
        for _ in 0..100 {
            let d = r.draw(&mut rng);
            assert!(d >= Duration::from_millis(10) && d <= Duration::from_millis(20));
        }
    }

    #[test]
    fn operations_are_drawn_from_the_seed() {
        let mut world = World::default();
        for i in 0..8 {
            world.vms.push((format!("id-{i}"), format!("vm-{i}")));
        }
        world.jobs.push_back("job-1".into());
        let draw = |seed| {
            (0..200)
                .map(|i| format!("{:?}", draw_op(&mut op_rng(seed, i), i, &world)))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let ops = draw(7);
        for kind in ["Create", "Start", "Stop", "Reboot", "Delete", "Cancel"] {
            assert!(ops.iter().any(|o| o.starts_with(kind)), "no {kind} in 200");
        }
        // With few VMs, it creates.
        let empty = World::default();
        assert!(matches!(
            draw_op(&mut op_rng(1, 0), 0, &empty),
            Op::Create { .. }
        ));
    }
}
