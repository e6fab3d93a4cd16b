//! `stratus bench api`: the control plane end to end. A `stratus server`
//! child on a temporary store (SQLite, or the PostgreSQL named), thousands
//! of simulated hosts from this process (the real agent code with the sim
//! driver, enrolled over HTTP), and concurrent HTTP clients creating VMs.
//!
//! It measures, in order: creates per second (each answered `202` only
//! after the VM, its job and its host's claim are committed), their latency
//! percentiles, `GET /v1/vms?limit=500` latency and a full listing of one
//! project's VMs, and the controller's memory. Then it verifies what it
//! measured: every VM placed, no host over its capacity.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;
use stratus_agent::{SimFleet, SimFleetConfig};

use crate::bench_support::{start_controller, Api, BackendArg};

#[derive(Args, Debug)]
pub struct ApiArgs {
    /// The controller's store
    #[arg(long, value_enum, default_value_t = BackendArg::Sqlite)]
    backend: BackendArg,
    /// For --backend postgres: an empty database (it is migrated); see
    /// BENCHMARKS.md for a durable throw-away server
    #[arg(long, env = "STRATUS_BENCH_PG_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Simulated hosts
    #[arg(long, default_value_t = 10_000)]
    hosts: usize,
    /// VMs to create (spread over 4 projects and 4 flavors)
    #[arg(long, default_value_t = 100_000)]
    vms: usize,
    /// Concurrent HTTP clients
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// The simulated hosts' heartbeat period, seconds
    #[arg(long, default_value_t = 10)]
    report_interval: u64,
    /// After the creates, also wait until every VM runs (the job runner and
    /// the hosts catching up) and report how long it took
    #[arg(long)]
    wait_running: bool,
}

const PROJECTS: usize = 4;
/// (name, vCPUs, memory GiB, disk GiB)
const FLAVORS: [(&str, u64, u64, u64); 4] = [
    ("b1", 1, 2, 20),
    ("b2", 2, 4, 40),
    ("b4", 4, 8, 80),
    ("b8", 8, 16, 160),
];

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// The controller's resident memory (current and peak), in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .unwrap_or(0.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

pub async fn api(a: ApiArgs) -> anyhow::Result<()> {
    if a.hosts == 0 || a.vms == 0 || a.clients == 0 {
        bail!("--hosts, --vms and --clients must be at least 1");
    }
    let dir = tempfile::Builder::new()
        .prefix("stratus-bench-api-")
        .tempdir()?;
    let database_url = match (a.backend, &a.database_url) {
        (BackendArg::Sqlite, _) => format!("sqlite://{}", dir.path().join("stratus.db").display()),
        (BackendArg::Postgres, Some(u)) => u.clone(),
        (BackendArg::Postgres, None) => {
            bail!("--backend postgres needs --database-url (an empty database)")
        }
    };
    println!(
        "bench api: backend {:?}, {} simulated hosts (64 vCPUs, 256 GiB, 4 TiB each; heartbeat every {} s), \
         {} VM creates over {} projects and {} flavors, {} concurrent HTTP clients",
        a.backend,
        a.hosts,
        a.report_interval,
        a.vms,
        PROJECTS,
        FLAVORS.len(),
        a.clients
    );
    let (controller, admin) = start_controller(dir.path(), &database_url).await?;
    let api = Api {
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(a.clients + 8)
            .build()?,
        url: controller.url.clone(),
    };

    // Set-up: projects with a member token each, flavors, an image.
    let mut members = Vec::new();
    for p in 0..PROJECTS {
        let name = format!("p{p}");
        api.post("/v1/projects", &admin, json!({ "name": name }))
            .await?;
        let t = api
            .post(
                "/v1/tokens",
                &admin,
                json!({"name": "bench", "role": "member", "project": name}),
            )
            .await?;
        members.push(t["secret"].as_str().context("token secret")?.to_string());
    }
    for (name, vcpus, mem, disk) in FLAVORS {
        api.post(
            "/v1/flavors",
            &admin,
            json!({"name": name, "vcpus": vcpus, "memory_bytes": mem << 30, "disk_bytes": disk << 30}),
        )
        .await?;
    }
    api.upload_test_image(&admin, dir.path(), "p0", "bench")
        .await?;

    // The fleet.
    let t = api
        .post(
            "/v1/host-enrollment-tokens",
            &admin,
            json!({"uses": a.hosts}),
        )
        .await?;
    let mut fc = SimFleetConfig::new(&api.url, dir.path().join("fleet"), a.hosts);
    fc.enroll_token = Some(t["token"].as_str().context("token")?.to_string());
    fc.name_prefix = Some("sim".into());
    fc.report_interval = Duration::from_secs(a.report_interval);
    let t0 = Instant::now();
    let fleet = SimFleet::start(fc).await.context("starting the fleet")?;
    let enroll_time = t0.elapsed();
    let cluster = api.get("/v1/clusters/default", &admin).await?;
    if cluster["hosts"].as_u64() != Some(a.hosts as u64) {
        bail!(
            "expected {} hosts, the controller has {}",
            a.hosts,
            cluster["hosts"]
        );
    }
    println!(
        "  {} hosts enrolled and running in {:.1} s",
        fleet.len(),
        enroll_time.as_secs_f64()
    );
    // Let the scheduler's index catch up (it also learns of new hosts at
    // enrollment; this covers its periodic rebuild).
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The creates.
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    let started = Instant::now();
    for _ in 0..a.clients {
        let (api, next, members) = (api.clone(), next.clone(), members.clone());
        let total = a.vms;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut refused: Vec<String> = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let (flavor, ..) = FLAVORS[i % FLAVORS.len()];
                let body = json!({"name": format!("vm-{i}"), "flavor": flavor, "image": "bench"});
                let t = Instant::now();
                let r = api
                    .http
                    .post(format!("{}/v1/vms", api.url))
                    .bearer_auth(&members[i % PROJECTS])
                    .json(&body)
                    .send()
                    .await;
                match r {
                    Ok(resp) if resp.status().as_u16() == 202 => {
                        let _ = resp.bytes().await;
                        lat.push(t.elapsed());
                    }
                    Ok(resp) => {
                        let s = resp.status();
                        refused.push(format!("{s}: {}", resp.text().await.unwrap_or_default()));
                    }
                    Err(e) => refused.push(e.to_string()),
                }
            }
            (lat, refused)
        }));
    }
    let mut lat = Vec::with_capacity(a.vms);
    let mut refused = Vec::new();
    for t in tasks {
        let (l, r) = t.await?;
        lat.extend(l);
        refused.extend(r);
    }
    let elapsed = started.elapsed();
    lat.sort();
    let rate = lat.len() as f64 / elapsed.as_secs_f64();
    println!(
        "  creates: {} accepted, {} refused in {:.2} s: {:.0}/s; latency p50 {}, p90 {}, p99 {}, max {}",
        lat.len(),
        refused.len(),
        elapsed.as_secs_f64(),
        rate,
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.9)),
        ms(percentile(&lat, 0.99)),
        ms(lat.last().copied().unwrap_or_default())
    );
    if let Some(first) = refused.first() {
        println!("  first refusal: {first}");
    }

    // Verification: every VM placed, no host over capacity.
    let vms = api.all("/v1/vms", &admin).await?;
    let unplaced = vms.iter().filter(|v| v["host_id"].is_null()).count();
    let hosts = api.all("/v1/hosts", &admin).await?;
    let mut over = 0;
    for h in &hosts {
        let cap = |f: &str| h[f].as_u64().unwrap_or(0);
        let used = |f: &str| h["allocated"][f].as_u64().unwrap_or(u64::MAX);
        if used("vcpus") > cap("cpus") * 4
            || used("memory_bytes") > cap("memory_bytes")
            || used("disk_bytes") > cap("disk_bytes")
        {
            over += 1;
        }
    }
    println!(
        "  verified: {} VMs stored, {} without a host, {} hosts over capacity",
        vms.len(),
        unplaced,
        over
    );

    let mut running_after = None;
    if a.wait_running {
        let t = Instant::now();
        let deadline = t + Duration::from_secs(900);
        loop {
            let left = api.get("/v1/jobs?state=queued&limit=1", &admin).await?["items"]
                .as_array()
                .map(|v| v.len())
                .unwrap_or(0)
                + api.get("/v1/jobs?state=running&limit=1", &admin).await?["items"]
                    .as_array()
                    .map(|v| v.len())
                    .unwrap_or(0);
            if left == 0 {
                running_after = Some(t.elapsed() + elapsed);
                break;
            }
            if Instant::now() > deadline {
                println!("  jobs still unfinished after 15 minutes");
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    // Lists, on a quiet controller: the fleet stops first (without it the
    // create jobs still queued wait, idle), so what is timed is the list
    // path, not the backlog. Pages of 500 through one project's VMs, and
    // full listings in pages of 1000.
    let (rss_busy, _) = rss_mib(controller.child.id());
    fleet.shutdown().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut page_lat = Vec::new();
    let mut full = Vec::new();
    let mut listed = 0;
    for round in 0..4 {
        let member = &members[round % PROJECTS];
        let t_full = Instant::now();
        let mut cursor: Option<String> = None;
        let mut n = 0;
        loop {
            let path = match &cursor {
                Some(c) => format!("/v1/vms?limit=500&cursor={c}"),
                None => "/v1/vms?limit=500".to_string(),
            };
            let t = Instant::now();
            let page = api.get(&path, member).await?;
            page_lat.push(t.elapsed());
            n += page["items"].as_array().map(|v| v.len()).unwrap_or(0);
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
        let t_full1000 = Instant::now();
        let all = api.all("/v1/vms", member).await?;
        full.push(t_full1000.elapsed());
        let _ = t_full;
        listed = n.max(all.len());
    }
    page_lat.sort();
    full.sort();
    println!(
        "  lists: GET /v1/vms?limit=500 x{}: p50 {}, p99 {}; full listing of one project's {} VMs \
         (pages of 1000): best {}, worst {}",
        page_lat.len(),
        ms(percentile(&page_lat, 0.5)),
        ms(percentile(&page_lat, 0.99)),
        listed,
        ms(full.first().copied().unwrap_or_default()),
        ms(full.last().copied().unwrap_or_default())
    );

    let (rss, peak) = rss_mib(controller.child.id());
    if let Some(t) = running_after {
        println!(
            "  every create job ended {:.1} s after the first create",
            t.as_secs_f64()
        );
    }
    println!(
        "api: backend={:?} hosts={} vms={} clients={} creates/s={:.0} create_p50={} create_p99={} \
         list500_p99={} list_full_{}={} controller_rss={:.0}MiB peak={:.0}MiB unplaced={} overbooked_hosts={} refused={}",
        a.backend,
        a.hosts,
        vms.len(),
        a.clients,
        rate,
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99)),
        ms(percentile(&page_lat, 0.99)),
        listed,
        ms(full.first().copied().unwrap_or_default()),
        rss,
        peak,
        unplaced,
        over,
        refused.len()
    );
    println!(
        "  controller RSS right after the creates, with every host connected: {rss_busy:.0} MiB"
    );
    drop(controller);
    if unplaced > 0 || over > 0 {
        bail!("{unplaced} VMs without a host, {over} hosts over capacity");
    }
    Ok(())
}
