//! `stratus bench migrate`: how long a live migration takes through the
//! product, and how much of it is the control plane's rather than QEMU's.
//!
//! A `stratus server` (SQLite, temporary store) and two real-QEMU
//! `stratus agent`s (`host-1`, `host-2`: own data dirs, one machine,
//! migration traffic over loopback) run as child processes. The loopback's
//! TCP bandwidth is measured once, in process. Then for each guest memory
//! size an idle test guest is booted and moved back and forth between the
//! hosts `--runs` times through `POST /v1/vms/{vm}/migrate`, and for each
//! move the benchmark records:
//!
//! ```text
//!  API call ─► job picked ─► prepare (destination QEMU listening) ─► send ─────────────────► job succeeded
//!  t0          created_at    "is preparing" .. "is waiting"           "sending" .. "moved to"   finished_at
//!                                                                      └ agent: setup, QEMU's migration Q, finish
//! ```
//!
//! - wall = finished_at − t0 (both on this machine's clock);
//! - T, downtime, Q: the job's `moved to host-X in T ms (downtime D ms,
//!   QEMU's migration Q ms; ...)` step message (crates/jobs/src/migrate.rs);
//! - overhead = wall − Q: everything that is not QEMU moving memory;
//!   the issue's target is ≤ 100 ms;
//! - floor = memory size / loopback bandwidth;
//! - where the overhead goes, from the job's step timestamps, the source
//!   agent's `live migration complete` log line (setup, mirror, finish) and
//!   the destination's `waiting for an incoming migration` line (disk, QEMU
//!   start, listening).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use stratus_api_types::views;
use stratus_common::ByteCount;

use crate::bench_support::{
    kill_qemus_of, start_controller, wait_hosts_up, AgentChild, AgentSpec, Api,
};

/// The issue's target for the control plane's share of a migration.
const OVERHEAD_TARGET_MS: f64 = 100.0;
const PROJECT: &str = "bench";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum AccelChoice {
    Tcg,
    Kvm,
}

impl AccelChoice {
    fn name(self) -> &'static str {
        match self {
            AccelChoice::Tcg => "tcg",
            AccelChoice::Kvm => "kvm",
        }
    }
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// Guest memory sizes, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "256MiB,1GiB,2GiB")]
    sizes: Vec<ByteCount>,
    /// Live migrations of each guest (alternating between the two hosts)
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The test guest (scripts/build-guest-image.sh)
    #[arg(long)]
    guest_dir: Option<PathBuf>,
    /// QEMU accelerator of both agents
    #[arg(long, value_enum, default_value_t = AccelChoice::Tcg)]
    accel: AccelChoice,
    /// Migration bandwidth limit passed to the API [default: none, QEMU's own]
    #[arg(long)]
    bandwidth: Option<ByteCount>,
    /// Bytes sent over loopback TCP to measure its bandwidth
    #[arg(long, default_value = "1GiB")]
    loopback_bytes: ByteCount,
    /// Keep the run directory (the children's logs, the store)
    #[arg(long)]
    keep: bool,
}

/// One live migration as measured.
struct Run {
    from: String,
    to: String,
    /// API call to the job's `finished_at`.
    wall_ms: f64,
    /// The agent's send, QEMU's downtime, QEMU's `total-time`.
    agent_ms: f64,
    downtime_ms: f64,
    qemu_ms: f64,
    /// API call to the job's first step (`prepare` begun).
    picked_ms: Option<f64>,
    /// API call to the destination's QEMU listening (end of `prepare`).
    prepared_ms: Option<f64>,
    /// The destination agent's own time for the prepare request (build the
    /// VM, fetch the image if new there, start QEMU listening).
    dest_prepare_ms: Option<f64>,
    /// Of it, from the destination driver's `waiting for an incoming
    /// migration` log line: making the disk, starting QEMU until its QMP
    /// answers, and listening (capabilities, `migrate-incoming`, the NBD
    /// export).
    dest_disk_ms: Option<f64>,
    dest_qemu_ms: Option<f64>,
    dest_listen_ms: Option<f64>,
    /// API call to the start of `send`.
    send_start_ms: Option<f64>,
    /// API call to the `moved to` step.
    moved_ms: Option<f64>,
    /// From the source agent's log (`MigrateOutcome`): before QEMU's `migrate` (checks, disk
    /// mirror), of it the mirror, and after QEMU's completion.
    setup_ms: Option<f64>,
    mirror_ms: Option<f64>,
    finish_ms: Option<f64>,
    /// Of the downtime, the paused guest's last disk writes draining to
    /// the destination.
    drain_ms: Option<f64>,
    /// Memory bytes QEMU sent.
    memory_bytes: Option<f64>,
}

impl Run {
    fn overhead_ms(&self) -> f64 {
        self.wall_ms - self.qemu_ms
    }
}

pub async fn migrate_bench(a: MigrateArgs) -> anyhow::Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if a.sizes.is_empty() {
        bail!("--sizes needs at least one size");
    }
    let guest = a
        .guest_dir
        .clone()
        .or_else(crate::demo::default_guest_dir)
        .context("no guest dir; pass --guest-dir")?;
    for f in ["disk.qcow2", "vmlinuz", "initrd.img"] {
        if !guest.join(f).is_file() {
            bail!(
                "{} is missing; run scripts/build-guest-image.sh",
                guest.join(f).display()
            );
        }
    }
    let cmdline = std::fs::read(guest.join("manifest.json"))
        .ok()
        .and_then(|m| serde_json::from_slice::<Value>(&m).ok())
        .and_then(|m| m["cmdline"].as_str().map(str::to_string))
        .unwrap_or_else(|| "console=ttyS0".into());
    let sizes: Vec<String> = a.sizes.iter().map(|s| s.human()).collect();
    println!(
        "bench migrate: guest {}, memory {}, {} live migrations each between two real-QEMU \
         agents on this machine (--accel {}), 1 vCPU, idle guest, bandwidth limit {}, \
         overhead target <= {OVERHEAD_TARGET_MS:.0} ms",
        guest.display(),
        sizes.join(","),
        a.runs,
        a.accel.name(),
        a.bandwidth
            .map(|b| format!("{}/s", b.human()))
            .unwrap_or_else(|| "none (QEMU's default)".into()),
    );

    let bytes = a.loopback_bytes.bytes();
    let bw = tokio::task::spawn_blocking(move || loopback_bandwidth(bytes)).await??;
    println!(
        "loopback TCP: {} in one stream at {:.0} MiB/s ({:.2} GB/s)",
        ByteCount(bytes).human(),
        bw / (1u64 << 20) as f64,
        bw / 1e9
    );

    let dir = tempfile::Builder::new()
        .prefix("stratus-bench-migrate-")
        .tempdir()?;
    let root = dir.path().to_path_buf();
    if a.keep {
        println!("run directory (kept): {}", root.display());
    }
    let database_url = format!("sqlite://{}", root.join("stratus.db").display());
    let (controller, admin) = start_controller(&root, &database_url).await?;
    let api = Api {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?,
        url: controller.url.clone(),
    };
    let mut vms: Vec<String> = Vec::new();
    let mut agents: Vec<AgentChild> = Vec::new();
    let result = measure(
        &a,
        &api,
        &admin,
        &root,
        &guest,
        &cmdline,
        bw,
        &mut agents,
        &mut vms,
    )
    .await;
    // Whatever happened: no VM outlives the benchmark.
    for id in &vms {
        if let Err(e) = delete_vm(&api, &admin, id).await {
            eprintln!("warning: deleting VM {id} through the API: {e:#}");
        }
        let killed = kill_qemus_of(id);
        if killed > 0 {
            eprintln!("warning: killed {killed} QEMU process(es) left for VM {id}");
        }
    }
    drop(agents);
    drop(controller);
    if a.keep {
        let _ = dir.keep();
    } else if result.is_err() {
        eprintln!(
            "(the children's logs went with {}; rerun with --keep to keep them)",
            root.display()
        );
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    a: &MigrateArgs,
    api: &Api,
    admin: &str,
    root: &Path,
    guest: &Path,
    cmdline: &str,
    bw: f64,
    agents: &mut Vec<AgentChild>,
    vms: &mut Vec<String>,
) -> anyhow::Result<()> {
    api.post("/v1/projects", admin, json!({"name": PROJECT}))
        .await?;
    let p = |f: &str| guest.join(f).display().to_string();
    api.post(
        "/v1/images",
        admin,
        json!({
            "name": "guest",
            "project": PROJECT,
            "path": p("disk.qcow2"),
            "format": "qcow2",
            "kernel_path": p("vmlinuz"),
            "initrd_path": p("initrd.img"),
            "cmdline": cmdline,
        }),
    )
    .await
    .context("registering the test guest image")?;
    let enroll = api
        .post("/v1/host-enrollment-tokens", admin, json!({"uses": 2}))
        .await?;
    let enroll = enroll["token"]
        .as_str()
        .context("no token in the enrollment answer")?
        .to_string();
    let mut logs = Vec::new();
    for name in ["host-1", "host-2"] {
        let spec = AgentSpec {
            url: api.url.clone(),
            name: name.to_string(),
            data_dir: root.join(name),
            enroll_token: enroll.clone(),
            driver: "qemu",
            accel: a.accel.name(),
            log: root.join(format!("agent-{name}.log")),
        };
        logs.push((name.to_string(), spec.log.clone()));
        agents.push(spec.spawn()?);
    }
    let hosts = wait_hosts_up(api, admin, agents, Duration::from_secs(90)).await?;
    for h in &hosts {
        println!(
            "host {}: QEMU {}, accelerator {}",
            h["name"].as_str().unwrap_or("?"),
            h["qemu_version"].as_str().unwrap_or("?"),
            h["accel"].as_str().unwrap_or("?")
        );
    }
    let host_name = |id: &str| -> String {
        hosts
            .iter()
            .find(|h| h["id"] == id)
            .and_then(|h| h["name"].as_str())
            .unwrap_or(id)
            .to_string()
    };
    let log_of = |name: &str| -> Option<PathBuf> {
        logs.iter().find(|(n, _)| n == name).map(|(_, p)| p.clone())
    };

    let mut summary = Vec::new();
    let mut warmed = false;
    for size in &a.sizes {
        let label = size.human();
        let flavor = format!("m{}", size.bytes() >> 20);
        api.post(
            "/v1/flavors",
            admin,
            json!({"name": flavor, "vcpus": 1, "memory_bytes": size.bytes(), "disk_bytes": 1u64 << 30}),
        )
        .await?;
        let name = format!("mig-{}", size.bytes() >> 20);
        let t = Instant::now();
        let op = api
            .post(
                "/v1/vms",
                admin,
                json!({"name": name, "project": PROJECT, "flavor": flavor, "image": "guest", "start": true}),
            )
            .await?;
        let id = op["vm"]["id"]
            .as_str()
            .context("no VM id in the create answer")?
            .to_string();
        vms.push(id.clone());
        let job = op["job"]["id"].as_str().context("no job id")?.to_string();
        let done = wait_job(api, admin, &job, Duration::from_secs(300)).await?;
        if done.state != views::JobState::Succeeded {
            bail!(
                "creating {name}: job {job} ended {:?}: {:?}",
                done.state,
                done.error
            );
        }
        wait_guest(api, admin, &id, None, Duration::from_secs(180)).await?;
        println!(
            "{label}: VM {name} booted, guest agent connected after {:.1} s",
            t.elapsed().as_secs_f64()
        );

        let mut runs = Vec::new();
        loop {
            let vm = api.get(&format!("/v1/vms/{id}"), admin).await?;
            let from_id = vm["host_id"].as_str().context("the VM has no host")?;
            let from = host_name(from_id);
            let to = hosts
                .iter()
                .filter_map(|h| h["name"].as_str())
                .find(|n| *n != from)
                .context("no other host")?
                .to_string();
            let logs = Logs::at(log_of(&from), log_of(&to));
            let mut body = json!({"host": to});
            if let Some(b) = a.bandwidth {
                body["bandwidth"] = json!(b.bytes());
            }
            // t0: just before the POST.
            let t0 = SystemTime::now();
            let op = api
                .post(&format!("/v1/vms/{id}/migrate"), admin, body)
                .await?;
            let job = op["job"]["id"]
                .as_str()
                .context("no job id in the migrate answer")?
                .to_string();
            let done = wait_job(api, admin, &job, Duration::from_secs(600)).await?;
            if done.state != views::JobState::Succeeded {
                bail!(
                    "migrating {name} from {from} to {to}: job {job} ended {:?}: {:?}",
                    done.state,
                    done.error
                );
            }
            let run = run_figures(&done, t0, &from, &to, &logs, &id)?;
            // The very first move to the other host fetches the image
            // there: a warm-up, not counted.
            if !warmed {
                print_run(
                    &label,
                    0,
                    &run,
                    " (warm-up: the image is fetched there; not counted)",
                );
                warmed = true;
            } else {
                print_run(&label, runs.len() + 1, &run, "");
                runs.push(run);
            }
            // The next move starts from a settled VM: running on its new
            // host with its guest agent seen there.
            let to_id = hosts
                .iter()
                .find(|h| h["name"] == to.as_str())
                .and_then(|h| h["id"].as_str())
                .context("host id")?
                .to_string();
            wait_guest(api, admin, &id, Some(&to_id), Duration::from_secs(60)).await?;
            if runs.len() == a.runs {
                break;
            }
        }
        delete_vm(api, admin, &id).await?;
        vms.retain(|v| v != &id);
        let floor = size.bytes() as f64 / bw * 1000.0;
        let line = size_line(&label, &runs, floor);
        println!("{line}");
        summary.push(line);
    }
    println!("migrate: {}", summary.join("; "));
    Ok(())
}

/// Polls `GET /v1/jobs/{id}/wait?timeout_secs=1` until the job ends.
async fn wait_job(
    api: &Api,
    token: &str,
    id: &str,
    patience: Duration,
) -> anyhow::Result<views::Job> {
    let t = Instant::now();
    loop {
        let v = api
            .get(&format!("/v1/jobs/{id}/wait?timeout_secs=1"), token)
            .await?;
        let job: views::Job =
            serde_json::from_value(v).with_context(|| format!("reading job {id}"))?;
        if job.state.is_terminal() {
            return Ok(job);
        }
        if t.elapsed() > patience {
            bail!(
                "job {id} did not end within {} s (at {:?}: {:?})",
                patience.as_secs(),
                job.state,
                job.current_step
            );
        }
    }
}

/// Waits until the VM runs (on `host` if given) with its guest agent
/// connected.
async fn wait_guest(
    api: &Api,
    token: &str,
    id: &str,
    host: Option<&str>,
    patience: Duration,
) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        let v = api.get(&format!("/v1/vms/{id}"), token).await?;
        let placed = host.is_none_or(|h| v["host_id"] == h);
        if placed && v["state"] == "running" && v["guest"]["connected"] == true {
            return Ok(());
        }
        if matches!(v["state"].as_str(), Some("failed" | "crashed")) {
            bail!("the VM {id} is {}: {}", v["state"], v["state_reason"]);
        }
        if t.elapsed() > patience {
            bail!(
                "the VM {id} was not running with its guest agent connected{} within {} s: \
                 state {}, guest {}",
                host.map(|h| format!(" on host {h}")).unwrap_or_default(),
                patience.as_secs(),
                v["state"],
                v["guest"]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn delete_vm(api: &Api, token: &str, id: &str) -> anyhow::Result<()> {
    let op = api
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/vms/{id}"),
            token,
            None,
        )
        .await?;
    let job = op["job"]["id"]
        .as_str()
        .context("no job id in the delete answer")?;
    let done = wait_job(api, token, job, Duration::from_secs(120)).await?;
    if done.state != views::JobState::Succeeded {
        bail!("deleting VM {id}: job {job} ended {:?}", done.state);
    }
    Ok(())
}

/// Milliseconds from `t0` to `at` (negative if `at` is earlier).
fn ms_since(t0: SystemTime, at: SystemTime) -> f64 {
    match at.duration_since(t0) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    }
}

/// The number right after `key` in `text` (`... in 812 ms` with key `in `).
fn number_after(text: &str, key: &str) -> Option<f64> {
    let rest = &text[text.find(key)? + key.len()..];
    let digits: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    digits.parse().ok()
}

/// The two agents' log files and their lengths before a migration: what
/// they write after it is about this one.
struct Logs {
    source: Option<(PathBuf, u64)>,
    dest: Option<(PathBuf, u64)>,
}

impl Logs {
    fn at(source: Option<PathBuf>, dest: Option<PathBuf>) -> Self {
        let with_len = |p: Option<PathBuf>| {
            p.map(|p| {
                let len = std::fs::metadata(&p).map_or(0, |m| m.len());
                (p, len)
            })
        };
        Logs {
            source: with_len(source),
            dest: with_len(dest),
        }
    }
}

/// The lines `log` gained after `offset`, newest first, that contain
/// every one of `needles`.
fn log_line(log: &Option<(PathBuf, u64)>, needles: &[&str]) -> Option<String> {
    let (path, offset) = log.as_ref()?;
    let mut f = std::fs::File::open(path).ok()?;
    let mut text = Vec::new();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(*offset)).ok()?;
    f.read_to_end(&mut text).ok()?;
    String::from_utf8_lossy(&text)
        .lines()
        .rev()
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
}

fn run_figures(
    job: &views::Job,
    t0: SystemTime,
    from: &str,
    to: &str,
    logs: &Logs,
    vm_id: &str,
) -> anyhow::Result<Run> {
    let finished: SystemTime = job
        .finished_at
        .context("the finished job has no finished_at")?
        .into();
    let moved = job
        .events
        .iter()
        .rev()
        .find(|e| e.step == "send" && e.message.starts_with("moved to "))
        .with_context(|| {
            format!(
                "job {} has no `moved to` step: {:?}",
                job.id,
                job.events.iter().map(|e| &e.message).collect::<Vec<_>>()
            )
        })?;
    let msg = &moved.message;
    let parse =
        |key: &str| number_after(msg, key).with_context(|| format!("no {key:?} number in {msg:?}"));
    let at = |pred: &dyn Fn(&views::JobEvent) -> bool| {
        job.events
            .iter()
            .find(|e| pred(e))
            .map(|e| ms_since(t0, e.at.into()))
    };
    // The source's `MigrateOutcome`, with the setup, mirror and finish
    // times the job's message leaves out.
    let outcome = log_line(&logs.source, &["live migration complete", vm_id]);
    let field = |k: &str| outcome.as_deref().and_then(|o| number_after(o, k));
    // The destination's answer to the prepare request: the saga's first
    // request (crates/jobs/src/requests.rs, `step_request_id`).
    let prepare_id = uuid::Uuid::from_u128(job.id.as_uuid().as_u128() ^ (1u128 << 64)).to_string();
    let dest_prepare_ms = log_line(
        &logs.dest,
        &["request carried out", &format!("request={prepare_id}")],
    )
    .and_then(|l| number_after(&l, " ms="));
    let listening = log_line(&logs.dest, &["waiting for an incoming migration", vm_id]);
    let dest_field = |k: &str| listening.as_deref().and_then(|l| number_after(l, k));
    Ok(Run {
        from: from.to_string(),
        to: to.to_string(),
        wall_ms: ms_since(t0, finished),
        agent_ms: parse(" in ")?,
        downtime_ms: parse("(downtime ")?,
        qemu_ms: parse("QEMU's migration ")?,
        picked_ms: at(&|e| e.step == "prepare"),
        dest_prepare_ms,
        dest_disk_ms: dest_field("disk_ms="),
        dest_qemu_ms: dest_field("qemu_ms="),
        dest_listen_ms: dest_field("listen_ms="),
        prepared_ms: at(&|e| e.step == "prepare" && e.message.contains("is waiting for the VM")),
        send_start_ms: at(&|e| e.step == "send" && e.message.starts_with("sending the VM")),
        moved_ms: Some(ms_since(t0, moved.at.into())),
        setup_ms: field("setup_ms: "),
        mirror_ms: field("mirror_ms: "),
        finish_ms: field("finish_ms: "),
        drain_ms: field("mirror_drain_ms: "),
        memory_bytes: field("memory_bytes: "),
    })
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "?".into(), |v| format!("{v:.0}"))
}

fn print_run(label: &str, n: usize, r: &Run, note: &str) {
    let verdict = if r.overhead_ms() <= OVERHEAD_TARGET_MS {
        "meets"
    } else {
        "misses"
    };
    println!(
        "  {label} run {n} {}->{}: wall {:.0} ms, agent {:.0} ms, QEMU {:.0} ms, downtime {:.0} ms \
         (disk drain {} ms), {} MiB of memory sent, overhead {:.0} ms ({verdict} <= \
         {OVERHEAD_TARGET_MS:.0} ms){note}",
        r.from,
        r.to,
        r.wall_ms,
        r.agent_ms,
        r.qemu_ms,
        r.downtime_ms,
        opt(r.drain_ms),
        opt(r.memory_bytes.map(|b| b / f64::from(1u32 << 20))),
        r.overhead_ms(),
    );
    // Where the overhead went: the job's step times (from the API call)
    // and the source agent's own split of its send.
    let delivery = match (r.send_start_ms, r.moved_ms) {
        (Some(s), Some(m)) => Some(m - s - r.agent_ms),
        _ => None,
    };
    println!(
        "    prepare begun at +{} ms, destination listening at +{} ms (its agent: {} ms; disk {}, \
         QEMU start {}, listening {}), send step at +{} ms; source agent: setup {} ms (disk mirror {}), QEMU {:.0}, finish {} ms, \
         rest {} ms; send step beyond the agent's {} ms; `moved to` -> job succeeded {} ms",
        opt(r.picked_ms),
        opt(r.prepared_ms),
        opt(r.dest_prepare_ms),
        opt(r.dest_disk_ms),
        opt(r.dest_qemu_ms),
        opt(r.dest_listen_ms),
        opt(r.send_start_ms),
        opt(r.setup_ms),
        opt(r.mirror_ms),
        r.qemu_ms,
        opt(r.finish_ms),
        opt(match (r.setup_ms, r.finish_ms) {
            (Some(s), Some(f)) => Some(r.agent_ms - s - r.qemu_ms - f),
            _ => None,
        }),
        opt(delivery),
        opt(r.moved_ms.map(|m| r.wall_ms - m)),
    );
}

/// p50 (upper median) and max.
fn p50_max(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let max = v.last().copied().unwrap_or(f64::NAN);
    let p50 = v.get(v.len() / 2).copied().unwrap_or(f64::NAN);
    (p50, max)
}

fn size_line(label: &str, runs: &[Run], floor_ms: f64) -> String {
    let (wall, _) = p50_max(runs.iter().map(|r| r.wall_ms).collect());
    let (down, _) = p50_max(runs.iter().map(|r| r.downtime_ms).collect());
    let (qemu, _) = p50_max(runs.iter().map(|r| r.qemu_ms).collect());
    let (over, over_max) = p50_max(runs.iter().map(Run::overhead_ms).collect());
    let met = runs
        .iter()
        .filter(|r| r.overhead_ms() <= OVERHEAD_TARGET_MS)
        .count();
    format!(
        "{label} total p50 {wall:.0} ms downtime p50 {down:.0} ms qemu p50 {qemu:.0} ms \
         floor {floor_ms:.0} ms overhead p50 {over:.0} ms max {over_max:.0} ms \
         (<= {OVERHEAD_TARGET_MS:.0} ms in {met}/{})",
        runs.len()
    )
}

/// Bytes per second through one loopback TCP stream: `bytes` written in
/// 1 MiB chunks by one thread and read by another.
fn loopback_bandwidth(bytes: u64) -> anyhow::Result<f64> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut s = std::net::TcpStream::connect(addr)?;
        let buf = vec![0x5au8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            s.write_all(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    });
    let (mut conn, _) = listener.accept()?;
    let t = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    match writer.join() {
        Ok(r) => r.context("writing to the loopback socket")?,
        Err(_) => bail!("the loopback writer thread panicked"),
    }
    if got != bytes {
        bail!("the loopback transfer carried {got} bytes, not {bytes}");
    }
    Ok(bytes as f64 / secs.max(1e-9))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_moved_message_parses() {
        let m = "moved to host-2 in 812 ms (downtime 27 ms, QEMU's migration 640 ms; \
                 256MiB of memory, 1MiB of disk sent)";
        assert_eq!(number_after(m, " in "), Some(812.0));
        assert_eq!(number_after(m, "(downtime "), Some(27.0));
        assert_eq!(number_after(m, "QEMU's migration "), Some(640.0));
        assert_eq!(number_after(m, "nothing "), None);
    }

    #[test]
    fn p50_is_the_upper_median() {
        assert_eq!(p50_max(vec![3.0, 1.0, 2.0]), (2.0, 3.0));
        assert_eq!(p50_max(vec![4.0, 1.0]), (4.0, 4.0));
    }
}
