//! `stratus bench ...`: benchmarks that print their configuration and end
//! with one line of figures (see BENCHMARKS.md for method and results).
//!
//! `bench boot` measures the control plane's overhead on a VM's boot: the
//! time from `POST /v1/vms` to the VM's guest agent showing as connected
//! in `GET /v1/vms/{id}`, against a bare `qemu-system-x86_64` started by
//! hand with the very same command line (read from the Stratus-started
//! QEMU's /proc/PID/cmdline) until its guest agent answers a ping.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use stratus_client::types;

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Time from `vm create` to guest agent connected, against a bare QEMU boot
    Boot(BootArgs),
    /// The pure placement engine, in process, on one core
    Placement(PlacementArgs),
    /// End to end: a controller, simulated hosts and concurrent HTTP clients
    Api(crate::bench_api::ApiArgs),
    /// VM operations while controllers are SIGKILLed and restarted, then a
    /// check that every job ended and nothing is left inconsistent
    Chaos(crate::bench_chaos::ChaosArgs),
    /// Bytes an incremental backup copies against bytes the guest wrote
    Backup(crate::bench_backup::BackupArgs),
    /// Live migrations of an idle guest between two real-QEMU agents: total,
    /// downtime and the control plane's share against QEMU's own time
    Migrate(crate::bench_migrate::MigrateArgs),
}

#[derive(Args, Debug)]
pub struct PlacementArgs {
    /// Simulated hosts (a mix of sizes, zones, clusters and tags)
    #[arg(long, default_value_t = 10_000)]
    hosts: usize,
    /// VMs to place (a mix of 4 flavors)
    #[arg(long, default_value_t = 100_000)]
    vms: usize,
    /// Consecutive VMs form a hard anti-affinity group of this size
    #[arg(long, default_value_t = 10)]
    group_size: usize,
    /// Seed of the fleet and the request stream
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Compare every Nth choice with a full scan of all hosts (untimed; 0
    /// turns it off)
    #[arg(long, default_value_t = 1000)]
    check_every: usize,
}

#[derive(Args, Debug)]
pub struct BootArgs {
    /// Measured boots of each kind (after one warm-up boot through Stratus)
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// The test guest (scripts/build-guest-image.sh)
    #[arg(long)]
    guest_dir: Option<PathBuf>,
    /// Guest memory
    #[arg(long, default_value = "128MiB")]
    memory: stratus_common::ByteCount,
}

pub async fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Boot(a) => boot(a).await,
        BenchCmd::Placement(a) => placement(a).await,
        BenchCmd::Api(a) => crate::bench_api::api(a).await,
        BenchCmd::Chaos(a) => crate::bench_chaos::chaos(a).await,
        BenchCmd::Backup(a) => crate::bench_backup::backup_bench(a).await,
        BenchCmd::Migrate(a) => crate::bench_migrate::migrate_bench(a).await,
    }
}

/// Places the VMs with the engine on one thread, then verifies every
/// placement independently (capacity recomputed from the placements,
/// anti-affinity, and sampled choices against a full scan).
async fn placement(a: PlacementArgs) -> anyhow::Result<()> {
    let cfg = stratus_placement::bench::BenchConfig {
        hosts: a.hosts,
        vms: a.vms,
        group_size: a.group_size,
        seed: a.seed,
        check_every: a.check_every,
    };
    println!(
        "bench placement: {} hosts, {} VMs (4 flavors), hard anti-affinity groups of {}, seed {}, \
         exactness checked every {} placements; one thread",
        cfg.hosts, cfg.vms, cfg.group_size, cfg.seed, cfg.check_every
    );
    let report = tokio::task::spawn_blocking(move || stratus_placement::bench::run(&cfg)).await?;
    println!("{report}");
    if report.violations > 0 || report.exactness_mismatches > 0 {
        bail!(
            "{} constraint violations, {} inexact choices",
            report.violations,
            report.exactness_mismatches
        );
    }
    Ok(())
}

/// A `stratus up` child process on a temporary data dir.
pub(crate) struct Cloud {
    child: std::process::Child,
    pub(crate) url: String,
    pub(crate) token: String,
    _dir: tempfile::TempDir,
}

impl Drop for Cloud {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// SIGTERM, so a child `stratus` stops cleanly (a local agent's VMs are not
/// orphaned mid-operation); SIGKILL if it has not ended within 20 s.
pub(crate) fn stop_child(child: &mut std::process::Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub(crate) fn start_cloud() -> anyhow::Result<Cloud> {
    let dir = tempfile::Builder::new()
        .prefix("stratus-bench-")
        .tempdir()?;
    let exe = std::env::current_exe().context("finding the stratus binary")?;
    let mut child = Command::new(exe)
        .args(["up", "--no-demo", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .env("STRATUS_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting stratus up")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut url = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(u) = line.strip_prefix("Stratus is up at ") {
            url = Some(u.trim().to_string());
        }
        if line.starts_with("Stop with") {
            break;
        }
    }
    let url = url.context("stratus up did not print its URL")?;
    let token = std::fs::read_to_string(dir.path().join("data/admin.token"))?
        .trim()
        .to_string();
    Ok(Cloud {
        child,
        url,
        token,
        _dir: dir,
    })
}

pub(crate) fn client(url: &str, token: &str) -> anyhow::Result<stratus_client::Client> {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse()?,
    );
    Ok(stratus_client::Client::new_with_client(
        url,
        reqwest::Client::builder().default_headers(h).build()?,
    ))
}

/// One boot through Stratus.
struct Managed {
    /// `POST /v1/vms` to guest agent connected in `GET /v1/vms/{id}`.
    total: Duration,
    /// `POST /v1/vms` to the VM's QEMU process existing: the control plane's
    /// share before the hypervisor starts.
    to_qemu: Duration,
    id: String,
}

/// Creates a VM and polls (every 2 ms) until its guest agent shows as
/// connected, while a watcher notes (every 1 ms) when its QEMU appears.
async fn stratus_boot(c: &stratus_client::Client, name: &str) -> anyhow::Result<Managed> {
    let t0 = Instant::now();
    let op = c
        .vm_create()
        .body(types::VmCreate {
            name: name.parse().map_err(|e| anyhow::anyhow!("{e}"))?,
            project: Some("bench".into()),
            flavor: "bench".into(),
            image: "guest".into(),
            start: Some(true),
            zone: None,
            cluster: None,
            require_tags: vec![],
            forbid_tags: vec![],
            group: None,
            restart_policy: None,
            pool: None,
        })
        .send()
        .await?
        .into_inner();
    let id = op.vm.id.to_string();
    let watch_id = id.clone();
    let watcher = tokio::task::spawn_blocking(move || {
        while t0.elapsed() < Duration::from_secs(60) {
            if qemu_argv(&watch_id).is_ok() {
                return Some(t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    });
    loop {
        let vm = c.vm_view().vm(id.clone()).send().await?.into_inner();
        if vm.guest.as_ref().is_some_and(|g| g.connected) {
            let total = t0.elapsed();
            let to_qemu = watcher.await?.context("the VM's QEMU was never seen")?;
            return Ok(Managed { total, to_qemu, id });
        }
        if matches!(vm.state, types::VmState::Failed | types::VmState::Crashed) {
            bail!("the VM {name} ended {:?}: {:?}", vm.state, vm.state_reason);
        }
        if t0.elapsed() > Duration::from_secs(180) {
            bail!("the VM {name} did not report its guest agent within 180 s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn delete_vm(c: &stratus_client::Client, id: &str) -> anyhow::Result<()> {
    let op = c.vm_delete().vm(id.to_string()).send().await?.into_inner();
    let job = c
        .job_wait()
        .job(op.job.id.to_string())
        .timeout_secs(120u32)
        .send()
        .await?
        .into_inner();
    if job.state != types::JobState::Succeeded {
        bail!("deleting {id}: job {:?}", job.state);
    }
    Ok(())
}

/// The command line of the QEMU running the VM.
fn qemu_argv(vm_id: &str) -> anyhow::Result<Vec<String>> {
    for entry in std::fs::read_dir("/proc")? {
        let path = entry?.path();
        let Ok(raw) = std::fs::read(path.join("cmdline")) else {
            continue;
        };
        let argv: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if argv.first().is_some_and(|a| a.contains("qemu-system"))
            && argv.iter().any(|a| a.contains(vm_id))
        {
            return Ok(argv);
        }
    }
    bail!("no QEMU process found for VM {vm_id}")
}

/// Boots the same command line by hand: the VM directory swapped for a
/// scratch copy (a fresh overlay on the same base), started running rather
/// than paused, timed until its guest agent answers.
async fn bare_boot(argv: &[String], vm_dir: &str, scratch: &Path) -> anyhow::Result<Duration> {
    if scratch.exists() {
        std::fs::remove_dir_all(scratch)?;
    }
    std::fs::create_dir_all(scratch.join("run"))?;
    let new_dir = scratch.to_string_lossy().to_string();
    let mut args: Vec<String> = argv[1..]
        .iter()
        .filter(|a| a.as_str() != "-S")
        .map(|a| a.replace(vm_dir, &new_dir))
        .collect();
    // -uuid must differ from the live VM's so nothing mistakes the copy.
    if let Some(i) = args.iter().position(|a| a == "-uuid") {
        if let Some(v) = args.get_mut(i + 1) {
            *v = uuid::Uuid::new_v4().to_string();
        }
    }
    // The disk is a -blockdev given as JSON: {"file": {"filename": ...}}.
    let overlay = args
        .iter()
        .filter(|a| a.starts_with('{'))
        .filter_map(|a| serde_json::from_str::<serde_json::Value>(a).ok())
        .find_map(|v| v["file"]["filename"].as_str().map(str::to_string))
        .context("no disk in the QEMU command line")?;
    // A fresh overlay on the same base (the live VM's may be mid-write).
    let live = Path::new(vm_dir).join(
        Path::new(&overlay)
            .strip_prefix(&new_dir)
            .unwrap_or(Path::new(&overlay)),
    );
    let info = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(&live)
        .output()?;
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).context("qemu-img info")?;
    let backing = info["full-backing-filename"]
        .as_str()
        .or(info["backing-filename"].as_str())
        .context("the VM's disk has no backing image")?;
    let size = info["virtual-size"].as_u64().unwrap_or(1 << 30).to_string();
    let fmt = info["backing-filename-format"].as_str().unwrap_or("qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", fmt, "-b", backing])
        .arg(&overlay)
        .arg(&size)
        .status()?;
    if !st.success() {
        bail!("creating a scratch overlay");
    }
    let qga = args
        .iter()
        .find(|a| a.contains("qga") && a.contains("path="))
        .and_then(|a| {
            a.split(',')
                .find_map(|kv| kv.strip_prefix("path=").map(PathBuf::from))
        })
        .context("no guest agent socket in the QEMU command line")?;
    let pidfile = args
        .iter()
        .position(|a| a == "-pidfile")
        .and_then(|i| args.get(i + 1).cloned())
        .map(PathBuf::from);
    let t0 = Instant::now();
    let st = Command::new(&argv[0])
        .args(&args)
        .stdin(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("bare QEMU did not start ({st})");
    }
    let took = stratus_driver::guest_agent_wait(&qga, Duration::from_secs(180)).await;
    let elapsed = t0.elapsed();
    if let Some(pf) = pidfile {
        if let Ok(pid) = std::fs::read_to_string(&pf) {
            let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        }
    }
    took?;
    Ok(elapsed)
}

fn stats(v: &mut [Duration]) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = ms(v[v.len() / 2]);
    (ms(v[0]), median, ms(v[v.len() - 1]))
}

async fn boot(a: BootArgs) -> anyhow::Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let guest = a
        .guest_dir
        .or_else(crate::demo::default_guest_dir)
        .context("no guest dir; pass --guest-dir")?;
    for f in ["disk.qcow2", "vmlinuz", "initrd.img"] {
        if !guest.join(f).exists() {
            bail!(
                "{} is missing; run scripts/build-guest-image.sh",
                guest.join(f).display()
            );
        }
    }
    println!(
        "bench boot: {} runs each, guest {}, memory {}, 1 vCPU",
        a.runs,
        guest.display(),
        a.memory
    );
    let cloud = start_cloud()?;
    let c = client(&cloud.url, &cloud.token)?;
    c.project_create()
        .body(types::ProjectCreate {
            name: "bench".parse().map_err(|e| anyhow::anyhow!("{e}"))?,
            description: None,
        })
        .send()
        .await?;
    c.flavor_create()
        .body(types::FlavorCreate {
            name: "bench".parse().map_err(|e| anyhow::anyhow!("{e}"))?,
            vcpus: 1,
            memory_bytes: a.memory.bytes(),
            disk_bytes: 1 << 30,
        })
        .send()
        .await?;
    c.image_create()
        .body(types::ImageCreate {
            name: "guest".parse().map_err(|e| anyhow::anyhow!("{e}"))?,
            project: Some("bench".into()),
            visibility: None,
            path: Some(guest.join("disk.qcow2").display().to_string()),
            format: Some(types::ImageFormat::Qcow2),
            kernel_path: Some(guest.join("vmlinuz").display().to_string()),
            initrd_path: Some(guest.join("initrd.img").display().to_string()),
            cmdline: Some("console=ttyS0 quiet".into()),
        })
        .send()
        .await?;
    let host = c.host_list().send().await?.into_inner();
    let accel = host
        .items
        .first()
        .and_then(|h| h.accel.clone())
        .unwrap_or_else(|| "?".into());
    println!("host accelerator: {accel}");

    // Warm-up: the host fetches and caches the image once.
    let warm = stratus_boot(&c, "warm-up").await?;
    let warm_id = warm.id.clone();
    println!(
        "warm-up boot (includes the image download): {:.0} ms",
        warm.total.as_secs_f64() * 1000.0
    );
    let dir_of = |argv: &[String], id: &str| -> anyhow::Result<String> {
        let needle = format!("/{id}");
        argv.iter()
            .find_map(|a| {
                let i = a.find(&needle)?;
                let end = i + needle.len();
                let start = a[..i].rfind(['=', ',']).map(|p| p + 1).unwrap_or(0);
                Some(a[start..end].to_string())
            })
            .context("cannot find the VM directory in the QEMU command line")
    };
    delete_vm(&c, &warm_id).await?;

    // Bare boots use the command line of a Stratus-started QEMU; keep one
    // such VM while they run. Runs alternate so drift in the machine's speed
    // hits both kinds alike.
    let keeper = stratus_boot(&c, "keeper").await?;
    let keep_argv = qemu_argv(&keeper.id)?;
    let keep_dir = dir_of(&keep_argv, &keeper.id)?;
    let scratch = tempfile::Builder::new().prefix("stratus-bare-").tempdir()?;
    let mut managed = Vec::new();
    let mut pre = Vec::new();
    let mut bare = Vec::new();
    for i in 0..a.runs {
        let m = stratus_boot(&c, &format!("b{i}")).await?;
        delete_vm(&c, &m.id).await?;
        let d = bare_boot(&keep_argv, &keep_dir, &scratch.path().join(format!("r{i}"))).await?;
        println!(
            "  run {i}: stratus {:.0} ms (QEMU started after {:.0} ms), bare {:.0} ms",
            m.total.as_secs_f64() * 1000.0,
            m.to_qemu.as_secs_f64() * 1000.0,
            d.as_secs_f64() * 1000.0
        );
        managed.push(m.total);
        pre.push(m.to_qemu);
        bare.push(d);
    }
    delete_vm(&c, &keeper.id).await?;
    let (smin, smed, smax) = stats(&mut managed);
    let (bmin, bmed, bmax) = stats(&mut bare);
    let (pmin, pmed, pmax) = stats(&mut pre);
    println!(
        "boot: stratus create->guest-agent median {smed:.0} ms (min {smin:.0}, max {smax:.0}); \
         bare qemu median {bmed:.0} ms (min {bmin:.0}, max {bmax:.0}); overhead median {:.0} ms; \
         create->QEMU started median {pmed:.0} ms (min {pmin:.0}, max {pmax:.0})",
        smed - bmed
    );
    Ok(())
}
