//! The real-QEMU world the end-to-end tests share: `stratus server` and one
//! `stratus agent` (QEMU driver, TCG) as child processes, driven through the
//! CLI, with a project `p`, a flavor `tiny` and the test guest image.

#![allow(dead_code)] // each test binary uses its own part

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_stratus");
pub const BOOT: Duration = Duration::from_secs(90);

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub what: &'static str,
    pub log: PathBuf,
}

impl Proc {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- {} log ----\n{}", self.what, self.log_text());
        }
    }
}

/// Kills the VM's processes when dropped: daemonized QEMUs outlive the test.
pub struct KillVm(pub Option<String>);

impl Drop for KillVm {
    fn drop(&mut self) {
        if let Some(id) = &self.0 {
            for pid in qemu_of(id) {
                signal(pid, "KILL");
            }
        }
    }
}

/// Live (not zombie) QEMU processes whose command line names the VM.
pub fn qemu_of(vm_id: &str) -> Vec<u32> {
    stratus_test_utils::live_processes_matching(&["qemu", vm_id])
}

pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

pub struct Env {
    pub home: PathBuf,
    pub url: String,
    pub token: String,
}

impl Env {
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", self.home.join("config"))
            .env("XDG_DATA_HOME", self.home.join("data"))
            .env("STRATUS_URL", &self.url)
            .env("STRATUS_TOKEN", &self.token)
            .env_remove("STRATUS_CONFIG")
            .env_remove("STRATUS_DATA_DIR")
            .env_remove("STRATUS_ENROLL_TOKEN");
        c
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run stratus")
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "stratus {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "stratus {args:?}: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    pub fn spawn(&self, what: &'static str, args: &[&str], log: PathBuf) -> Proc {
        let file = File::create(&log).expect("log file");
        let child = self
            .cmd()
            .args(args)
            .env("STRATUS_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn stratus");
        Proc { child, what, log }
    }

    pub fn vm(&self, name: &str) -> Value {
        self.json(&["vm", "show", name, "--project", "p", "-o", "json"])
    }
}

pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) => assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; last seen: {last}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn guest_dir() -> PathBuf {
    let dir = match std::env::var_os("STRATUS_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/stratus/guest")
        }
    };
    for f in ["disk.qcow2", "vmlinuz", "initrd.img", "manifest.json"] {
        assert!(
            dir.join(f).is_file(),
            "test guest image missing: {} does not exist. Run `bash scripts/build-guest-image.sh` \
             (or point STRATUS_GUEST_DIR at a built guest)",
            dir.join(f).display()
        );
    }
    dir
}

/// A controller on `port` over the store in `data` (started again after a
/// kill: same port, same database; the first admin token stays in its file).
pub fn start_server_on(home: &Path, data: &Path, port: u16, log: &str) -> (Proc, String, String) {
    let url = format!("http://127.0.0.1:{port}");
    let token_file = data.join("admin.token");
    let env = Env {
        home: home.to_path_buf(),
        url: url.clone(),
        token: String::new(),
    };
    let listen = format!("127.0.0.1:{port}");
    let server = env.spawn(
        "server",
        &[
            "server",
            "--listen",
            &listen,
            "--data-dir",
            data.to_str().expect("utf8"),
            "--bootstrap-token-file",
            token_file.to_str().expect("utf8"),
        ],
        home.join(log),
    );
    let token = wait_until("the controller to start", Duration::from_secs(30), || {
        let t = std::fs::read_to_string(&token_file).map_err(|e| e.to_string())?;
        std::net::TcpStream::connect(&listen).map_err(|e| e.to_string())?;
        Ok(t.trim().to_string())
    });
    (server, url, token)
}

pub fn agent_args<'a>(url: &'a str, data: &'a str, token: Option<&'a str>) -> Vec<&'a str> {
    let mut args = vec![
        "agent",
        "--url",
        url,
        "--data-dir",
        data,
        "--name",
        "host-1",
        "--driver",
        "qemu",
        "--accel",
        "tcg",
    ];
    if let Some(t) = token {
        args.extend(["--enroll-token", t]);
    }
    args
}

/// A controller, a project `p` with flavor `tiny` and image `guest`, and one
/// real-QEMU agent `host-1`, up.
pub struct World {
    pub home: tempfile::TempDir,
    pub data: PathBuf,
    pub port: u16,
    pub server: Proc,
    pub env: Env,
    pub agent: Proc,
    pub agent_dir: PathBuf,
}

pub fn world() -> World {
    let guest = guest_dir();
    let home = tempfile::tempdir().expect("home");
    let data = home.path().join("cloud");
    std::fs::create_dir_all(&data).expect("mkdir");
    let port = free_port();
    let (server, url, token) = start_server_on(home.path(), &data, port, "server.log");
    let env = Env {
        home: home.path().to_path_buf(),
        url: url.clone(),
        token,
    };

    env.json(&["project", "create", "p", "-o", "json"]);
    env.json(&[
        "flavor", "create", "tiny", "--vcpus", "1", "--memory", "128MiB", "--disk", "64MiB", "-o",
        "json",
    ]);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(guest.join("manifest.json")).expect("manifest"))
            .expect("JSON");
    let cmdline = manifest["cmdline"].as_str().unwrap_or("console=ttyS0");
    let p = |f: &str| guest.join(f).display().to_string();
    env.json(&[
        "image",
        "register",
        "guest",
        "--project",
        "p",
        "--path",
        &p("disk.qcow2"),
        "--kernel-path",
        &p("vmlinuz"),
        "--initrd-path",
        &p("initrd.img"),
        "--cmdline",
        cmdline,
        "-o",
        "json",
    ]);
    let enroll = env.json(&["host", "enroll-token", "-o", "json"]);
    let enroll = enroll["token"].as_str().expect("token").to_string();

    let agent_dir = home.path().join("agent");
    let agent_dir_s = agent_dir.display().to_string();
    let agent = env.spawn(
        "agent",
        &agent_args(&url, &agent_dir_s, Some(&enroll)),
        home.path().join("agent-1.log"),
    );

    let t = Instant::now();
    wait_until(
        "the host to enroll and be up",
        Duration::from_secs(60),
        || {
            let hosts = env.json(&["host", "list", "-o", "json"]);
            if hosts["items"][0]["state"] == "up" {
                Ok(())
            } else {
                Err(hosts.to_string())
            }
        },
    );
    println!("TIMING child agent: start -> host up {:?}", t.elapsed());
    World {
        home,
        data,
        port,
        server,
        env,
        agent,
        agent_dir,
    }
}

impl World {
    /// Enrolls another real-QEMU agent, `name`, with its own data directory
    /// (`home/<name>`), and waits until its host is up. Its processes are
    /// the caller's to keep (dropping the `Proc` kills the agent).
    pub fn add_host(&self, name: &str) -> (Proc, PathBuf) {
        self.add_host_with(name, &[])
    }

    /// Starts the agent of an enrolled host again (after a kill), on its
    /// data directory.
    pub fn restart_host(&self, name: &str, dir: &Path) -> Proc {
        let dir_s = dir.display().to_string();
        let mut args = agent_args(&self.env.url, &dir_s, None);
        if let Some(n) = args.iter().position(|a| *a == "host-1") {
            args[n] = name;
        }
        self.env.spawn(
            "agent",
            &args,
            self.home.path().join(format!("agent-{name}-again.log")),
        )
    }

    /// [`World::add_host`] with more agent arguments (`--cluster east`).
    pub fn add_host_with(&self, name: &str, extra: &[&str]) -> (Proc, PathBuf) {
        let enroll = self.env.json(&["host", "enroll-token", "-o", "json"]);
        let enroll = enroll["token"].as_str().expect("token").to_string();
        let dir = self.home.path().join(name);
        let dir_s = dir.display().to_string();
        let mut args = agent_args(&self.env.url, &dir_s, Some(&enroll));
        if let Some(n) = args.iter().position(|a| *a == "host-1") {
            args[n] = name;
        }
        args.extend_from_slice(extra);
        let agent = self.env.spawn(
            "agent",
            &args,
            self.home.path().join(format!("agent-{name}.log")),
        );
        wait_until(
            &format!("host {name} to enroll and be up"),
            Duration::from_secs(60),
            || {
                let h = self.env.cli(&["host", "show", name, "-o", "json"]);
                let v: Value = serde_json::from_slice(&h.stdout).unwrap_or_default();
                if v["state"] == "up" {
                    Ok(())
                } else {
                    Err(String::from_utf8_lossy(&h.stderr).into_owned())
                }
            },
        );
        (agent, dir)
    }
}

/// Creates the VM `name` (flavor tiny, the test guest) and waits for its
/// guest agent; its QEMU is killed when the guard drops.
pub fn running_vm(env: &Env, name: &str) -> KillVm {
    running_vm_of(env, name, "tiny")
}

/// [`running_vm`] with another flavor.
pub fn running_vm_of(env: &Env, name: &str, flavor: &str) -> KillVm {
    let vm = env.json(&[
        "vm",
        "create",
        name,
        "--flavor",
        flavor,
        "--image",
        "guest",
        "--project",
        "p",
        "--wait",
        "-o",
        "json",
    ]);
    let kill = KillVm(vm["id"].as_str().map(str::to_string));
    wait_guest(env, name);
    kill
}

pub fn wait_guest(env: &Env, vm: &str) {
    wait_until("the guest agent to connect", BOOT, || {
        let v = env.vm(vm);
        if v["state"] == "running" && v["guest"]["connected"] == true {
            Ok(())
        } else {
            Err(format!("{} / {}", v["state"], v["guest"]))
        }
    });
}

/// Runs a shell script in the guest; its standard output.
pub fn sh(env: &Env, vm: &str, script: &str) -> String {
    let out = env.cli(&[
        "vm",
        "exec",
        vm,
        "--project",
        "p",
        "--timeout",
        "120",
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert!(
        out.status.success(),
        "exec {script:?} in {vm}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---- migrations ------------------------------------------------------------
//
// What the migration tests share. (`migrate_qemu.rs` keeps its own copies of
// some of these, from before they moved here; its local ones shadow these.)

/// The guest's answer to `script`, trimmed.
pub fn line(env: &Env, vm: &str, script: &str) -> String {
    sh(env, vm, script).trim().to_string()
}

/// A console counter (`tick N` every 200 ms) and a memory load rewriting a
/// 64 MiB tmpfs file from random data (so QEMU cannot send zero pages),
/// both detached from the exec. Needs a guest with 256 MiB.
pub fn start_load(env: &Env, vm: &str) {
    line(
        env,
        vm,
        "setsid sh -c 'i=0; while :; do echo tick $i > /dev/ttyS0; i=$((i+1)); sleep 0.2; done' \
         </dev/null >/dev/null 2>&1 & \
         mkdir -p /hammer && mount -t tmpfs -o size=80m tmpfs /hammer && \
         head -c 1048576 /dev/urandom > /hammer/r && \
         setsid sh -c 'while :; do for i in $(seq 64); do cat /hammer/r; done > /hammer/f; done' \
         </dev/null >/dev/null 2>&1 &",
    );
}

/// The numbers of the console's `tick N` lines, in order.
pub fn ticks(env: &Env, vm: &str) -> Vec<u64> {
    let out = env.cli(&["vm", "console", vm, "--project", "p"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tick ")?.trim().parse().ok())
        .collect()
}

/// After a live migration: the guest has the same boot (`boot_id`), its
/// file `/mnt/disk/keep` the same SHA-256 (`sum`), and its console counter
/// (see [`start_load`]) goes on and never restarted.
pub fn same_guest_still_counting(env: &Env, vm: &str, boot_id: &str, sum: &str) {
    assert_eq!(
        line(env, vm, "cat /proc/sys/kernel/random/boot_id"),
        boot_id
    );
    assert_eq!(
        line(env, vm, "sha256sum /mnt/disk/keep | cut -d' ' -f1"),
        sum
    );
    let before = ticks(env, vm).last().copied().unwrap_or(0);
    wait_until(
        "the counter to go on after the move",
        Duration::from_secs(30),
        || {
            let t = ticks(env, vm);
            match t.last() {
                Some(n) if *n > before + 5 => Ok(()),
                other => Err(format!("{other:?} (was {before})")),
            }
        },
    );
    let all = ticks(env, vm);
    assert!(
        all.windows(2).all(|p| p[1] > p[0]),
        "the counter never restarted: {all:?}"
    );
}

/// The name of the host the VM is placed on.
pub fn host_of(env: &Env, vm: &str) -> String {
    let v = env.vm(vm);
    let id = v["host_id"].as_str().expect("placed").to_string();
    env.json(&["host", "show", &id, "-o", "json"])["name"]
        .as_str()
        .expect("name")
        .to_string()
}

/// How many of the VM's QEMU processes run from `dir` (an agent's data
/// directory): which host a QEMU belongs to, on a machine that runs them all.
pub fn qemus_under(vm_id: &str, dir: &Path) -> usize {
    let dir = dir.display().to_string();
    qemu_of(vm_id)
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&dir))
                .unwrap_or(false)
        })
        .count()
}

/// Whether the agent working in `agent_dir` keeps a directory for the VM.
pub fn vm_dir_exists(agent_dir: &Path, vm_id: &str) -> bool {
    agent_dir.join("qemu/vms").join(vm_id).exists()
}

/// Waits until the host whose agent works in `dir` runs nothing of the VM
/// and keeps no directory for it.
pub fn wait_nothing_on(vm_id: &str, dir: &Path) {
    wait_until(
        "the host to hold nothing of the VM",
        Duration::from_secs(30),
        || {
            let q = qemus_under(vm_id, dir);
            if q == 0 && !vm_dir_exists(dir, vm_id) {
                Ok(())
            } else {
                Err(format!("{q} QEMUs, dir {}", vm_dir_exists(dir, vm_id)))
            }
        },
    );
}

/// The step messages of a job (`job show -o json`), oldest first.
pub fn job_messages(job: &Value) -> Vec<String> {
    job["events"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter_map(|e| e["message"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Writes `mib` MiB of random data to /mnt/disk/NAME (the VM's own disk),
/// flushed; its SHA-256.
pub fn write_file(env: &Env, vm: &str, name: &str, mib: u32) -> String {
    let out = sh(
        env,
        vm,
        &format!(
            "dd if=/dev/urandom of=/mnt/disk/{name} bs=1M count={mib} 2>/dev/null && sync && \
             sha256sum /mnt/disk/{name}"
        ),
    );
    out.split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("no checksum in {out:?}"))
        .to_string()
}

/// `stratus volume ARGS --project p -o json`.
pub fn volume(env: &Env, args: &[&str]) -> Value {
    let mut all = vec!["volume"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--project", "p", "-o", "json"]);
    env.json(&all)
}

/// The job's latest step message (its progress in words).
pub fn last_message(j: &Value) -> String {
    j["events"]
        .as_array()
        .and_then(|e| e.last())
        .and_then(|e| e["message"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// The last step message before the job's end ("job succeeded").
pub fn last_message_before_end(j: &Value) -> String {
    j["events"]
        .as_array()
        .and_then(|e| e.iter().rev().nth(1))
        .and_then(|e| e["message"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// The job of operation `op` (an answer with `job.id`), as it is now.
pub fn job_of(env: &Env, op: &Value) -> Value {
    let id = op["job"]["id"].as_str().expect("job id");
    env.json(&["job", "show", id, "-o", "json"])
}

/// Waits for the job of `op` to end; the job as it ended.
pub fn job_end(env: &Env, op: &Value) -> Value {
    wait_until("the job to end", Duration::from_secs(180), || {
        let j = job_of(env, op);
        match j["state"].as_str() {
            Some("cancelled") | Some("failed") | Some("succeeded") => Ok(j),
            _ => Err(last_message(&j)),
        }
    })
}

/// Waits until `n` hosts report storage pool `name` usable.
pub fn wait_pool_seen(env: &Env, name: &str, n: usize) {
    wait_until(
        &format!("{n} hosts to see pool {name}"),
        Duration::from_secs(30),
        || {
            let p = env.json(&["pool", "show", name, "-o", "json"]);
            let ok = p["hosts"]
                .as_array()
                .map(|h| h.iter().filter(|h| h["error"].is_null()).count())
                .unwrap_or(0);
            if ok == n {
                Ok(())
            } else {
                Err(p.to_string())
            }
        },
    );
}
