//! What the agent tests share: a real controller in process (SQLite in a
//! temp dir, a real socket, the real job runner) that can be restarted on
//! the same database and port, an admin client, and bounded waits.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stratus_agent::{Agent, AgentConfig, AgentHandle, DriverConfig};
use stratus_driver::{SimConfig, SimDriver};

use stratus_client::types::{self, Job, JobState, Vm};
use stratus_client::Client;
use stratus_controller::{Server, ServerConfig};

pub struct Cloud {
    pub server: Option<Server>,
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub url: String,
    pub admin_token: String,
    pub admin: Client,
}

fn config(dir: &Path, listen: SocketAddr) -> ServerConfig {
    ServerConfig {
        database_url: format!("sqlite://{}", dir.join("stratus.db").display()),
        listen,
        data_dir: dir.join("controller"),
        bootstrap_token_file: None,
        controller_id: format!("test-{}", uuid::Uuid::new_v4().simple()),
    }
}

pub fn client(url: &str, token: &str) -> Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
    );
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("http client");
    Client::new_with_client(url, http)
}

impl Cloud {
    pub async fn start() -> Cloud {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = Server::start(config(dir.path(), "127.0.0.1:0".parse().expect("addr")))
            .await
            .expect("controller starts");
        let addr = server.local_addr();
        let url = server.url();
        let admin_token = server.bootstrap_token.clone().expect("first admin token");
        let admin = client(&url, &admin_token);
        Cloud {
            server: Some(server),
            dir,
            addr,
            url,
            admin_token,
            admin,
        }
    }

    /// Stops the controller (its job runner too).
    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }

    /// Starts a controller again on the same database and port.
    pub async fn start_again(&mut self) {
        assert!(self.server.is_none(), "stop the controller first");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match Server::start(config(self.dir.path(), self.addr)).await {
                Ok(s) => {
                    self.server = Some(s);
                    return;
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("controller restart: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("controller does not start again: {e}"),
            }
        }
    }

    pub async fn enroll_token(&self) -> String {
        self.enroll_token_for(1).await
    }

    /// A token `uses` hosts can enroll with.
    pub async fn enroll_token_for(&self, uses: u32) -> String {
        self.admin
            .enrollment_token_create()
            .body(types::EnrollmentTokenCreate {
                expires_in_hours: None,
                uses: Some(uses),
            })
            .send()
            .await
            .expect("enrollment token")
            .into_inner()
            .token
    }

    pub async fn project(&self, name: &str) {
        self.admin
            .project_create()
            .body(types::ProjectCreate {
                name: name.parse().expect("name"),
                description: None,
            })
            .send()
            .await
            .expect("project_create");
    }

    pub async fn flavor(&self, name: &str, memory_mib: u64, disk_mib: u64) {
        self.admin
            .flavor_create()
            .body(types::FlavorCreate {
                name: name.parse().expect("name"),
                vcpus: 1,
                memory_bytes: memory_mib << 20,
                disk_bytes: disk_mib << 20,
            })
            .send()
            .await
            .expect("flavor_create");
    }

    pub async fn image(
        &self,
        project: &str,
        name: &str,
        disk: &Path,
        kernel: Option<&Path>,
        initrd: Option<&Path>,
        cmdline: Option<&str>,
    ) -> types::Image {
        self.admin
            .image_create()
            .body(types::ImageCreate {
                name: name.parse().expect("name"),
                project: Some(project.into()),
                path: Some(disk.display().to_string()),
                kernel_path: kernel.map(|k| k.display().to_string()),
                initrd_path: initrd.map(|k| k.display().to_string()),
                cmdline: cmdline.map(str::to_string),
                format: None,
                visibility: None,
            })
            .send()
            .await
            .expect("image_create")
            .into_inner()
    }

    pub async fn vm_create(
        &self,
        project: &str,
        name: &str,
        flavor: &str,
        image: &str,
    ) -> (Vm, Job) {
        let op = self
            .admin
            .vm_create()
            .body(types::VmCreate {
                name: name.parse().expect("name"),
                project: Some(project.into()),
                flavor: flavor.into(),
                image: image.into(),
                start: None,
                zone: None,
                cluster: None,
                group: None,
                require_tags: Vec::new(),
                forbid_tags: Vec::new(),
                restart_policy: None,
                pool: None,
            })
            .send()
            .await
            .expect("vm_create")
            .into_inner();
        (op.vm, op.job)
    }

    pub async fn vm(&self, id: &types::VmId) -> Vm {
        self.admin
            .vm_view()
            .vm(id.to_string())
            .send()
            .await
            .expect("vm_view")
            .into_inner()
    }

    /// Waits for a job to end; panics with its error unless it succeeded.
    pub async fn job_succeeds(&self, job: &Job, timeout: Duration) -> Job {
        let j = self.job_ends(job, timeout).await;
        assert_eq!(
            j.state,
            JobState::Succeeded,
            "job {} ({}) did not succeed: {:?}",
            j.id.0,
            j.kind,
            j.error
        );
        j
    }

    pub async fn job_ends(&self, job: &Job, timeout: Duration) -> Job {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let secs = left.as_secs().clamp(1, 30) as u32;
            let j = self
                .admin
                .job_wait()
                .job(job.id.0.to_string())
                .timeout_secs(secs)
                .send()
                .await
                .expect("job_wait")
                .into_inner();
            if matches!(
                j.state,
                JobState::Succeeded | JobState::Failed | JobState::Cancelled
            ) {
                return j;
            }
            assert!(
                Instant::now() < deadline,
                "job {} ({}) still {:?} after {timeout:?} (step {:?})",
                j.id.0,
                j.kind,
                j.state,
                j.current_step
            );
        }
    }
}

/// Polls `f` every 100 ms until it returns `Some`, or fails the test after
/// `timeout` with `what` and the last value seen.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(last) => {
                assert!(
                    Instant::now() < deadline,
                    "timed out after {timeout:?} waiting for {what}; last seen: {last}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A small qcow2 made with qemu-img (the controller checks images with it).
pub fn small_qcow2(dir: &Path) -> PathBuf {
    let path = dir.join("small.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("16M")
        .output()
        .expect("qemu-img runs (install qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// Log output for a test run (`STRATUS_LOG=debug cargo test -- --nocapture`).
pub fn logging() {
    let filter = tracing_subscriber_filter();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

fn tracing_subscriber_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_env("STRATUS_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "warn,stratus_agent=info,stratus_jobs=info,stratus_driver=info",
        )
    })
}

// ---- the simulated host most agent tests use ----

pub fn sim() -> Arc<SimDriver> {
    Arc::new(SimDriver::new(SimConfig {
        cpus: 8,
        memory_bytes: 16 << 30,
        disk_bytes: 100 << 30,
        latency: Duration::ZERO,
    }))
}

pub fn agent_config(cloud: &Cloud, dir: &Path, name: &str, driver: Arc<SimDriver>) -> AgentConfig {
    let mut c = AgentConfig::new(&cloud.url, dir, DriverConfig::Instance(driver));
    c.name = Some(name.into());
    // Short long polls: a controller shutdown waits for them.
    c.desired_wait = Duration::from_secs(3);
    c.retry_interval = Duration::from_secs(2);
    c
}

pub async fn start_agent(
    cloud: &Cloud,
    dir: &Path,
    name: &str,
    driver: Arc<SimDriver>,
) -> AgentHandle {
    let mut c = agent_config(cloud, dir, name, driver);
    c.enroll_token = Some(cloud.enroll_token().await);
    Agent::start(c).await.expect("agent starts")
}

/// A cloud with project `p`, flavor `small` and image `img`.
pub async fn cloud() -> (Cloud, tempfile::TempDir) {
    logging();
    let cloud = Cloud::start().await;
    let files = tempfile::tempdir().expect("tempdir");
    cloud.project("p").await;
    cloud.flavor("small", 128, 64).await;
    let disk = small_qcow2(files.path());
    cloud.image("p", "img", &disk, None, None, None).await;
    (cloud, files)
}

/// What the simulated host runs for a VM.
pub async fn sim_state(
    sim: &SimDriver,
    id: stratus_common::VmId,
) -> Option<stratus_driver::VmRuntimeState> {
    use stratus_driver::Driver;
    sim.vm_status(id).await.expect("vm_status").map(|s| s.state)
}
