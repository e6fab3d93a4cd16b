//! What the end-to-end benchmarks (`bench api`, `bench chaos`, `bench
//! migrate`) share: `stratus server` and `stratus agent` child processes on
//! loopback ports, a small JSON client for set-up and checks, the test image
//! they upload, and a last-resort kill of a VM's QEMU.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::ValueEnum;
use serde_json::{json, Value};

/// A benchmark's store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum BackendArg {
    Sqlite,
    Postgres,
}

impl BackendArg {
    pub fn name(self) -> &'static str {
        match self {
            BackendArg::Sqlite => "sqlite",
            BackendArg::Postgres => "postgres",
        }
    }
}

/// A free loopback port (free when asked; a controller binds it soon after).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// How to start one `stratus server` child, again and again on the same
/// port and store (`bench chaos` kills and restarts it).
#[derive(Clone, Debug)]
pub(crate) struct ControllerSpec {
    pub port: u16,
    pub database_url: String,
    /// Its image store; controllers of one database share it.
    pub data_dir: PathBuf,
    /// Where the first start writes the admin token.
    pub token_file: PathBuf,
    /// Its name in job claims; `None`: the server's default (new per start).
    pub controller_id: Option<String>,
    /// Where its stderr goes (appended); `None`: this process's stderr.
    pub log: Option<PathBuf>,
}

impl ControllerSpec {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the child (without waiting for it to answer). Its log level is
    /// `STRATUS_BENCH_LOG`, else `warn`.
    pub fn spawn(&self) -> anyhow::Result<std::process::Child> {
        let exe = std::env::current_exe().context("finding the stratus binary")?;
        let mut cmd = Command::new(exe);
        cmd.args(["server", "--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--database-url", &self.database_url])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--bootstrap-token-file")
            .arg(&self.token_file)
            .env(
                "STRATUS_LOG",
                std::env::var("STRATUS_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(id) = &self.controller_id {
            cmd.args(["--controller-id", id]);
        }
        match &self.log {
            Some(path) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                cmd.stderr(f);
            }
            None => {
                cmd.stderr(Stdio::inherit());
            }
        }
        cmd.spawn().context("starting stratus server")
    }
}

/// A controller child process; SIGTERM then SIGKILL on drop.
pub(crate) struct Controller {
    pub child: std::process::Child,
    pub url: String,
}

impl Drop for Controller {
    fn drop(&mut self) {
        crate::bench::stop_child(&mut self.child);
    }
}

/// Waits until the controller at `url` answers `/healthz` (and, the first
/// time, has written its admin token to `token_file`); fails after
/// `patience`, or at once if `child` has ended.
pub(crate) async fn wait_healthy(
    url: &str,
    token_file: &Path,
    child: &mut std::process::Child,
    patience: Duration,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let deadline = Instant::now() + patience;
    loop {
        if let Ok(r) = http.get(format!("{url}/healthz")).send().await {
            if r.status().is_success() && token_file.exists() {
                return Ok(());
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("the controller at {url} exited ({status}) before answering");
        }
        if Instant::now() > deadline {
            bail!(
                "the controller at {url} did not answer /healthz within {} s",
                patience.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One controller on `database_url`, its data in `dir`: started, answering,
/// and its admin token.
pub(crate) async fn start_controller(
    dir: &Path,
    database_url: &str,
) -> anyhow::Result<(Controller, String)> {
    let spec = ControllerSpec {
        port: free_port()?,
        database_url: database_url.to_string(),
        data_dir: dir.join("controller"),
        token_file: dir.join("admin.token"),
        controller_id: None,
        log: None,
    };
    let mut c = Controller {
        child: spec.spawn()?,
        url: spec.url(),
    };
    wait_healthy(
        &c.url,
        &spec.token_file,
        &mut c.child,
        Duration::from_secs(60),
    )
    .await?;
    let token = std::fs::read_to_string(&spec.token_file)?
        .trim()
        .to_string();
    Ok((c, token))
}

/// A small JSON client for set-up and checks.
#[derive(Clone)]
pub(crate) struct Api {
    pub http: reqwest::Client,
    pub url: String,
}

impl Api {
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut r = self
            .http
            .request(method.clone(), format!("{}{path}", self.url))
            .bearer_auth(token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("{method} {path}: {status}: {text}");
        }
        Ok(if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)?
        })
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, path, token, Some(body))
            .await
    }

    pub async fn get(&self, path: &str, token: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, token, None).await
    }

    /// Every item of a list, page by page (1000 at a time).
    pub async fn all(&self, path: &str, token: &str) -> anyhow::Result<Vec<Value>> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let sep = if path.contains('?') { '&' } else { '?' };
            let p = match &cursor {
                Some(c) => format!("{path}{sep}limit=1000&cursor={c}"),
                None => format!("{path}{sep}limit=1000"),
            };
            let page = self.get(&p, token).await?;
            if let Some(a) = page["items"].as_array() {
                items.extend(a.iter().cloned());
            }
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return Ok(items),
            }
        }
    }

    /// Registers a public image `name` in `project` and uploads an empty
    /// 1 GiB qcow2 made in `dir` (simulated hosts never read it; they only
    /// fetch and verify it).
    pub async fn upload_test_image(
        &self,
        admin: &str,
        dir: &Path,
        project: &str,
        name: &str,
    ) -> anyhow::Result<()> {
        let img_path = dir.join(format!("{name}.qcow2"));
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img_path)
            .arg("1G")
            .status()
            .context("running qemu-img (scripts/setup-host.sh installs it)")?;
        if !st.success() {
            bail!("qemu-img create failed");
        }
        let data = std::fs::read(&img_path)?;
        let img = self
            .post(
                "/v1/images",
                admin,
                json!({"name": name, "project": project, "visibility": "public"}),
            )
            .await?;
        let img_id = img["id"].as_str().context("image id")?;
        let r = self
            .http
            .put(format!("{}/v1/images/{img_id}/data", self.url))
            .bearer_auth(admin)
            .header("content-type", "application/octet-stream")
            .body(data)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("uploading the image: {}", r.text().await?);
        }
        Ok(())
    }
}

/// How to start one `stratus agent` child: its own data dir, enrolling with
/// `enroll_token` on the first start.
#[derive(Clone, Debug)]
pub(crate) struct AgentSpec {
    /// The controller's URL.
    pub url: String,
    pub name: String,
    pub data_dir: PathBuf,
    pub enroll_token: String,
    /// `qemu` or `sim`.
    pub driver: &'static str,
    /// `tcg`, `kvm` or `auto` (QEMU driver).
    pub accel: &'static str,
    /// Where its stderr goes (truncated). Its log level is
    /// `STRATUS_BENCH_LOG`, else `info` (benchmarks read its figures there).
    pub log: PathBuf,
}

/// An agent child process; SIGTERM then SIGKILL on drop. Its VMs outlive
/// it (as in production): delete them first.
pub(crate) struct AgentChild {
    pub child: std::process::Child,
    pub name: String,
}

impl Drop for AgentChild {
    fn drop(&mut self) {
        crate::bench::stop_child(&mut self.child);
    }
}

impl AgentSpec {
    pub fn spawn(&self) -> anyhow::Result<AgentChild> {
        let exe = std::env::current_exe().context("finding the stratus binary")?;
        let log = std::fs::File::create(&self.log)
            .with_context(|| format!("creating {}", self.log.display()))?;
        let config_home = self.data_dir.with_extension("config");
        let child = Command::new(exe)
            .args(["agent", "--url", &self.url, "--name", &self.name])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--driver", self.driver, "--accel", self.accel])
            .env("STRATUS_ENROLL_TOKEN", &self.enroll_token)
            .env("XDG_CONFIG_HOME", &config_home)
            .env_remove("STRATUS_CONFIG")
            .env_remove("STRATUS_DATA_DIR")
            .env_remove("STRATUS_URL")
            .env_remove("STRATUS_TOKEN")
            .env(
                "STRATUS_LOG",
                std::env::var("STRATUS_BENCH_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting stratus agent {}", self.name))?;
        Ok(AgentChild {
            child,
            name: self.name.clone(),
        })
    }
}

/// Waits until every host in `names` shows `up` in `GET /v1/hosts`; fails
/// after `patience`, or at once if one of `agents` has ended.
pub(crate) async fn wait_hosts_up(
    api: &Api,
    token: &str,
    agents: &mut [AgentChild],
    patience: Duration,
) -> anyhow::Result<Vec<Value>> {
    let deadline = Instant::now() + patience;
    loop {
        let hosts = api.all("/v1/hosts", token).await?;
        let up: Vec<Value> = agents
            .iter()
            .filter_map(|a| {
                hosts
                    .iter()
                    .find(|h| h["name"] == a.name.as_str() && h["state"] == "up")
                    .cloned()
            })
            .collect();
        if up.len() == agents.len() {
            return Ok(up);
        }
        for a in agents.iter_mut() {
            if let Ok(Some(status)) = a.child.try_wait() {
                bail!(
                    "the agent {} exited ({status}) before its host was up",
                    a.name
                );
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the hosts were not all up within {} s: {}",
                patience.as_secs(),
                Value::Array(hosts)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Live QEMU processes whose command line names `vm_id`.
pub(crate) fn qemu_pids_of(vm_id: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let raw = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&raw);
            (cmd.contains("qemu-system") && cmd.contains(vm_id)).then_some(pid)
        })
        .collect()
}

/// SIGKILLs what [`qemu_pids_of`] finds: the last resort when a VM could
/// not be deleted through the API (its QEMU is daemonized and outlives
/// every benchmark process).
pub(crate) fn kill_qemus_of(vm_id: &str) -> usize {
    let pids = qemu_pids_of(vm_id);
    for pid in &pids {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    pids.len()
}
