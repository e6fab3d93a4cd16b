//! The agent against a real controller (in process, SQLite, real socket and
//! job runner) with the simulated driver: enrollment, every VM job, crashes,
//! orphans, image verification, and restarts of either side.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{agent_config, cloud, sim, sim_state, start_agent, wait_for, Cloud};
use stratus_agent::{Agent, AgentConfig, DriverConfig};
use stratus_client::types::{HostState, JobState, Vm, VmState};
use stratus_common::VmId;
use stratus_driver::{
    BootSpec, ConsoleChunk, Driver, DriverError, ExecOutput, GuestInfo, HostFacts, ImageFormat,
    NicSpec, SimDriver, StopHow, VmEvent, VmRuntimeState, VmSpec, VmStatus,
};

const JOB: Duration = Duration::from_secs(30);

fn vm_id(vm: &Vm) -> VmId {
    VmId(vm.id.0)
}

async fn wait_vm_state(cloud: &Cloud, vm: &Vm, want: VmState, timeout: Duration) -> Vm {
    wait_for(&format!("VM {} to be {want}", vm.name), timeout, || async {
        let v = cloud.vm(&vm.id).await;
        if v.state == want {
            Ok(v)
        } else {
            Err(format!("{} ({:?})", v.state, v.state_reason))
        }
    })
    .await
}

async fn create_running(cloud: &Cloud, name: &str) -> Vm {
    let t = Instant::now();
    let (vm, job) = cloud.vm_create("p", name, "small", "img").await;
    cloud.job_succeeds(&job, JOB).await;
    println!("TIMING sim vm create -> job succeeded: {:?}", t.elapsed());
    let v = cloud.vm(&vm.id).await;
    assert_eq!(v.state, VmState::Running, "{v:?}");
    v
}

async fn console_text(cloud: &Cloud, vm: &Vm) -> String {
    use base64::Engine;
    let c = cloud
        .admin
        .vm_console()
        .vm(vm.id.to_string())
        .offset(0u64)
        .send()
        .await
        .expect("vm_console")
        .into_inner();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(c.data_base64)
        .expect("base64");
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test]
async fn sim_host_enrolls_and_runs_a_vm_through_every_job() {
    let (cloud, _files) = cloud().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = sim();
    let agent = start_agent(&cloud, dir.path(), "sim-1", sim.clone()).await;

    // Enrolled, up, with the simulated host's facts.
    let host = wait_for("the host to be up", Duration::from_secs(10), || async {
        let h = cloud
            .admin
            .host_view()
            .host(agent.host_id().to_string())
            .send()
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        if h.state == HostState::Up && h.last_heartbeat_at.is_some() {
            Ok(h)
        } else {
            Err(format!("{:?}", h.state))
        }
    })
    .await;
    assert_eq!(host.name, "sim-1");
    assert_eq!(host.cpus, 8);
    assert_eq!(host.memory_bytes, 16 << 30);
    assert_eq!(host.accel.as_deref(), Some("sim"));
    let creds = dir.path().join("agent.json");
    let mode = std::fs::metadata(&creds)
        .expect("agent.json")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the credential file is private");

    // Create: placed on this host, running, guest agent answering.
    let vm = create_running(&cloud, "web-1").await;
    assert_eq!(vm.host_id.as_ref().map(|h| h.0), Some(agent.host_id().0));
    let id = vm_id(&vm);
    assert_eq!(sim_state(&sim, id).await, Some(VmRuntimeState::Running));
    let v = wait_for(
        "the guest agent to connect",
        Duration::from_secs(10),
        || async {
            let v = cloud.vm(&vm.id).await;
            match &v.guest {
                Some(g) if g.connected && !g.ip_addresses.is_empty() => Ok(v),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert_eq!(
        v.guest.as_ref().and_then(|g| g.os_name.as_deref()),
        Some("Stratus simulated guest")
    );
    // The image is cached and verified on the host.
    let cached = dir.path().join("images").join(vm.image_id.to_string());
    assert!(cached.join("disk").is_file(), "{}", cached.display());
    assert!(cached.join("disk.sha256").is_file());
    // The console reaches the controller.
    wait_for("console output", Duration::from_secs(10), || async {
        let text = console_text(&cloud, &vm).await;
        if text.contains("stratus-sim: booted web-1 (boot 1)") {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await;
    // Exec reaches the driver (which cannot run commands) and the reason
    // comes back.
    let err = cloud
        .admin
        .vm_exec()
        .vm(vm.id.to_string())
        .body(stratus_client::types::VmExec {
            argv: vec!["true".into()],
            timeout_secs: Some(5),
        })
        .send()
        .await
        .expect_err("the simulation cannot exec");
    assert!(
        err.to_string().contains("cannot run commands"),
        "exec error: {err}"
    );

    // Stop.
    let op = cloud
        .admin
        .vm_stop()
        .vm(vm.id.to_string())
        .send()
        .await
        .expect("vm_stop")
        .into_inner();
    cloud.job_succeeds(&op.job, JOB).await;
    let v = cloud.vm(&vm.id).await;
    assert_eq!(v.state, VmState::Stopped);
    assert_eq!(sim_state(&sim, id).await, Some(VmRuntimeState::Stopped));
    wait_for(
        "the guest agent to show disconnected",
        Duration::from_secs(10),
        || async {
            let v = cloud.vm(&vm.id).await;
            match &v.guest {
                Some(g) if !g.connected => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    // Start.
    let op = cloud
        .admin
        .vm_start()
        .vm(vm.id.to_string())
        .send()
        .await
        .expect("vm_start")
        .into_inner();
    cloud.job_succeeds(&op.job, JOB).await;
    assert_eq!(cloud.vm(&vm.id).await.state, VmState::Running);
    assert_eq!(sim_state(&sim, id).await, Some(VmRuntimeState::Running));

    // Reboot: a third boot on the console.
    let op = cloud
        .admin
        .vm_reboot()
        .vm(vm.id.to_string())
        .send()
        .await
        .expect("vm_reboot")
        .into_inner();
    cloud.job_succeeds(&op.job, JOB).await;
    assert_eq!(cloud.vm(&vm.id).await.state, VmState::Running);
    wait_for(
        "the reboot on the console",
        Duration::from_secs(10),
        || async {
            let text = console_text(&cloud, &vm).await;
            if text.contains("(boot 3)") {
                Ok(())
            } else {
                Err(text)
            }
        },
    )
    .await;
    let record = dir.path().join("vms").join(format!("{id}.json"));
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).expect("VM record")).expect("JSON");
    assert_eq!(rec["applied_reboot_generation"], 1, "{rec}");

    // Delete: gone from the controller, the driver and the agent's records.
    let op = cloud
        .admin
        .vm_delete()
        .vm(vm.id.to_string())
        .send()
        .await
        .expect("vm_delete")
        .into_inner();
    cloud.job_succeeds(&op.job, JOB).await;
    let gone = cloud.admin.vm_view().vm(vm.id.to_string()).send().await;
    assert_eq!(
        gone.expect_err("deleted").status().map(|s| s.as_u16()),
        Some(404)
    );
    assert_eq!(sim.vm_count(), 0);
    assert!(!record.exists(), "the VM record is removed");

    agent.shutdown().await;
}

#[tokio::test]
async fn sim_crash_is_reported_and_held_until_started_again() {
    let (cloud, _files) = cloud().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = sim();
    let agent = start_agent(&cloud, dir.path(), "sim-crash", sim.clone()).await;
    let vm = create_running(&cloud, "web-1").await;
    let id = vm_id(&vm);

    let t = Instant::now();
    sim.crash(id).expect("crash");
    let v = wait_vm_state(&cloud, &vm, VmState::Crashed, Duration::from_secs(5)).await;
    println!(
        "TIMING sim crash -> crashed at the controller: {:?}",
        t.elapsed()
    );
    assert!(
        v.state_reason
            .as_deref()
            .is_some_and(|r| r.contains("simulated crash")),
        "{:?}",
        v.state_reason
    );
    // Not restarted behind the operator's back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(matches!(
        sim_state(&sim, id).await,
        Some(VmRuntimeState::Crashed { .. })
    ));
    assert_eq!(cloud.vm(&vm.id).await.state, VmState::Crashed);

    // Started again on request.
    let op = cloud
        .admin
        .vm_start()
        .vm(vm.id.to_string())
        .send()
        .await
        .expect("vm_start")
        .into_inner();
    cloud.job_succeeds(&op.job, JOB).await;
    assert_eq!(sim_state(&sim, id).await, Some(VmRuntimeState::Running));

    // A crashed VM can also be stopped (it is reported stopped then).
    sim.crash(id).expect("crash");
    wait_vm_state(&cloud, &vm, VmState::Crashed, Duration::from_secs(5)).await;
    let op = cloud
        .admin
        .vm_stop()
        .vm(vm.id.to_string())
        .send()
        .await
        .expect("vm_stop")
        .into_inner();
    cloud.job_succeeds(&op.job, JOB).await;
    assert_eq!(cloud.vm(&vm.id).await.state, VmState::Stopped);

    agent.shutdown().await;
}

#[tokio::test]
async fn sim_agent_rides_out_a_controller_restart() {
    let (mut cloud, _files) = cloud().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = sim();
    let agent = start_agent(&cloud, dir.path(), "sim-restart", sim.clone()).await;
    let vm = create_running(&cloud, "web-1").await;
    let id = vm_id(&vm);

    let t = Instant::now();
    cloud.stop().await;
    println!(
        "TIMING controller shutdown with an agent long-polling: {:?}",
        t.elapsed()
    );
    // While the controller is away the VM keeps running, then crashes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sim_state(&sim, id).await, Some(VmRuntimeState::Running));
    sim.crash(id).expect("crash");
    tokio::time::sleep(Duration::from_secs(2)).await;

    cloud.start_again().await;
    let t = Instant::now();
    wait_vm_state(&cloud, &vm, VmState::Crashed, Duration::from_secs(20)).await;
    println!(
        "TIMING controller back -> crash reported: {:?}",
        t.elapsed()
    );
    let host = cloud
        .admin
        .host_view()
        .host(agent.host_id().to_string())
        .send()
        .await
        .expect("host_view")
        .into_inner();
    assert_eq!(host.state, HostState::Up);

    // The desired-state poller is back too: new work arrives and converges.
    let op = cloud
        .admin
        .vm_start()
        .vm(vm.id.to_string())
        .send()
        .await
        .expect("vm_start")
        .into_inner();
    cloud.job_succeeds(&op.job, JOB).await;
    assert_eq!(sim_state(&sim, id).await, Some(VmRuntimeState::Running));
    let vm2 = create_running(&cloud, "web-2").await;
    assert_eq!(vm2.host_id.as_ref().map(|h| h.0), Some(agent.host_id().0));

    agent.shutdown().await;
    cloud.stop().await;
}

#[tokio::test]
async fn sim_agent_restart_keeps_its_identity_and_its_vms() {
    let (cloud, _files) = cloud().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = sim();
    let agent = start_agent(&cloud, dir.path(), "sim-again", sim.clone()).await;
    let host_id = agent.host_id();
    let vm = create_running(&cloud, "web-1").await;
    let id = vm_id(&vm);
    let since = sim
        .vm_status(id)
        .await
        .expect("status")
        .expect("known")
        .since;
    agent.shutdown().await;

    // No token this time: the saved credential is used.
    let again = Agent::start(agent_config(&cloud, dir.path(), "sim-again", sim.clone()))
        .await
        .expect("agent starts again without a token");
    assert_eq!(again.host_id(), host_id);
    let hosts = cloud
        .admin
        .host_list()
        .send()
        .await
        .expect("host_list")
        .into_inner();
    assert_eq!(
        hosts.items.len(),
        1,
        "no second enrollment: {:?}",
        hosts.items
    );

    // The VM was left alone (not restarted, not rebooted) and is still run.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let st = sim.vm_status(id).await.expect("status").expect("known");
    assert_eq!(st.state, VmRuntimeState::Running);
    assert_eq!(st.since, since, "the VM was not restarted");
    let op = cloud
        .admin
        .vm_stop()
        .vm(vm.id.to_string())
        .send()
        .await
        .expect("vm_stop")
        .into_inner();
    cloud.job_succeeds(&op.job, JOB).await;
    assert_eq!(sim_state(&sim, id).await, Some(VmRuntimeState::Stopped));

    // A second agent on the same data dir is refused while this one runs.
    let err = match Agent::start(agent_config(&cloud, dir.path(), "x", sim.clone())).await {
        Ok(_) => panic!("two agents on one data dir"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("another agent"), "{err}");
    again.shutdown().await;
}

#[tokio::test]
async fn sim_orphans_are_destroyed_and_two_agents_share_a_machine() {
    let (cloud, _files) = cloud().await;
    let (dir1, dir2) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let (sim1, sim2) = (sim(), sim());
    let a1 = start_agent(&cloud, dir1.path(), "host-a", sim1.clone()).await;
    let a2 = start_agent(&cloud, dir2.path(), "host-b", sim2.clone()).await;
    assert_ne!(a1.host_id(), a2.host_id());
    let hosts = wait_for("both hosts up", Duration::from_secs(10), || async {
        let hosts = cloud
            .admin
            .host_list()
            .send()
            .await
            .map_err(|e| e.to_string())?
            .into_inner()
            .items;
        if hosts.len() == 2 && hosts.iter().all(|h| h.state == HostState::Up) {
            Ok(hosts)
        } else {
            Err(format!("{hosts:?}"))
        }
    })
    .await;
    assert_eq!(hosts.len(), 2);

    // A VM the controller never heard of, on host-b.
    let orphan = VmSpec {
        id: VmId::new(),
        name: "stray".into(),
        vcpus: 1,
        memory_bytes: 128 << 20,
        disk_bytes: 1 << 30,
        image: "/nowhere.qcow2".into(),
        image_format: ImageFormat::Qcow2,
        restore_from: None,
        pool: None,
        boot: BootSpec::Firmware,
        nic: NicSpec::User,
    };
    sim2.vm_create(&orphan).await.expect("create");
    sim2.vm_start(orphan.id).await.expect("start");
    let t = Instant::now();
    wait_for(
        "the orphan to be destroyed",
        Duration::from_secs(10),
        || async {
            match sim_state(&sim2, orphan.id).await {
                None => Ok(()),
                Some(s) => Err(s.to_string()),
            }
        },
    )
    .await;
    println!("TIMING orphan destroyed after {:?}", t.elapsed());

    // Both hosts take VMs.
    let v1 = create_running(&cloud, "web-1").await;
    let v2 = create_running(&cloud, "web-2").await;
    assert_eq!(sim1.vm_count() + sim2.vm_count(), 2);
    assert!(v1.host_id.is_some() && v2.host_id.is_some());

    a1.shutdown().await;
    a2.shutdown().await;
}

#[tokio::test]
async fn sim_image_with_a_wrong_checksum_fails_the_job_with_the_reason() {
    let (cloud, files) = cloud().await;
    let disk = files.path().join("other.qcow2");
    std::fs::copy(common::small_qcow2(files.path()), &disk).expect("copy");
    let image = cloud.image("p", "bad", &disk, None, None, None).await;
    // Damage the controller's copy after it was hashed.
    let stored = cloud.server.as_ref().expect("server").app.images.part_path(
        stratus_common::ImageId(image.id.0),
        stratus_api_types::agent::ImagePart::Disk,
    );
    let len = std::fs::metadata(&stored).expect("stored image").len();
    std::fs::write(&stored, vec![0u8; len as usize]).expect("damage");

    let dir = tempfile::tempdir().expect("tempdir");
    let agent = start_agent(&cloud, dir.path(), "sim-bad", sim()).await;
    let (vm, job) = cloud.vm_create("p", "web-1", "small", "bad").await;
    let j = cloud.job_ends(&job, JOB).await;
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    let message = j
        .error
        .as_ref()
        .map(|e| e.message.clone())
        .unwrap_or_default();
    assert!(message.contains("SHA-256"), "{message}");
    // The host's failure was retried (with backoff) before the job failed.
    let retries: Vec<&str> = j
        .events
        .iter()
        .filter(|e| e.step == "retry")
        .map(|e| e.message.as_str())
        .collect();
    assert_eq!(retries.len(), 2, "{:?}", j.events);
    assert!(retries[0].contains("attempt 2 of 3"), "{retries:?}");
    // A create that failed leaves nothing: the saga's undo removed the VM
    // from its host and discarded its record and its host's claim.
    let gone = cloud.admin.vm_view().vm(vm.id.to_string()).send().await;
    assert_eq!(
        gone.err().and_then(|e| e.status()).map(|s| s.as_u16()),
        Some(404),
        "the failed VM's record should be gone"
    );
    // Nothing half-downloaded is left in the cache.
    let cached = dir.path().join("images").join(image.id.to_string());
    let left: Vec<String> = std::fs::read_dir(&cached)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "left in the cache: {left:?}");
    agent.shutdown().await;
}

/// The simulation, but stopping VMs named `slow-*` takes 20 s (a guest that
/// ignores the power button until the grace period ends).
struct SlowStops {
    sim: Arc<SimDriver>,
}

#[async_trait::async_trait]
impl Driver for SlowStops {
    fn name(&self) -> &'static str {
        "sim"
    }
    async fn vm_backup(
        &self,
        id: VmId,
        req: &stratus_driver::BackupRequest,
        p: &stratus_driver::ProgressFn,
    ) -> Result<stratus_driver::BackupOutcome, DriverError> {
        self.sim.vm_backup(id, req, p).await
    }
    async fn backup_verify(
        &self,
        f: &std::path::Path,
    ) -> Result<stratus_driver::BackupCheck, DriverError> {
        self.sim.backup_verify(f).await
    }
    async fn vm_restore(
        &self,
        id: VmId,
        f: &std::path::Path,
        volumes: &[stratus_driver::VolumeRestore],
    ) -> Result<(), DriverError> {
        self.sim.vm_restore(id, f, volumes).await
    }
    async fn volume_restore(
        &self,
        volume_id: uuid::Uuid,
        size_bytes: u64,
        f: &std::path::Path,
    ) -> Result<stratus_driver::VolumeInfo, DriverError> {
        self.sim.volume_restore(volume_id, size_bytes, f).await
    }
    async fn backup_delete(
        &self,
        f: &std::path::Path,
        c: Option<&stratus_driver::PruneChild>,
    ) -> Result<Option<stratus_driver::Pruned>, DriverError> {
        self.sim.backup_delete(f, c).await
    }

    async fn vm_snapshot_create(
        &self,
        id: VmId,
        req: &stratus_driver::SnapshotRequest,
    ) -> Result<stratus_driver::SnapshotInfo, DriverError> {
        self.sim.vm_snapshot_create(id, req).await
    }
    async fn vm_snapshot_list(
        &self,
        id: VmId,
    ) -> Result<Vec<stratus_driver::SnapshotInfo>, DriverError> {
        self.sim.vm_snapshot_list(id).await
    }
    async fn vm_snapshot_revert(
        &self,
        id: VmId,
        snapshot_id: uuid::Uuid,
    ) -> Result<Vec<uuid::Uuid>, DriverError> {
        self.sim.vm_snapshot_revert(id, snapshot_id).await
    }
    async fn vm_snapshot_delete(
        &self,
        id: VmId,
        snapshot_id: uuid::Uuid,
    ) -> Result<(), DriverError> {
        self.sim.vm_snapshot_delete(id, snapshot_id).await
    }
    async fn host_facts(&self) -> Result<HostFacts, DriverError> {
        self.sim.host_facts().await
    }
    async fn vm_create(&self, spec: &VmSpec) -> Result<(), DriverError> {
        self.sim.vm_create(spec).await
    }
    async fn vm_start(&self, id: VmId) -> Result<(), DriverError> {
        self.sim.vm_start(id).await
    }
    async fn vm_stop(&self, id: VmId, graceful: Duration) -> Result<StopHow, DriverError> {
        let console = self.sim.console_read(id, 0, 4096).await?;
        if String::from_utf8_lossy(&console.data).contains("booted slow-") {
            tokio::time::sleep(Duration::from_secs(20)).await;
        }
        self.sim.vm_stop(id, graceful).await
    }
    async fn vm_reboot(&self, id: VmId) -> Result<(), DriverError> {
        self.sim.vm_reboot(id).await
    }
    async fn vm_destroy(&self, id: VmId) -> Result<(), DriverError> {
        self.sim.vm_destroy(id).await
    }
    async fn vm_status(&self, id: VmId) -> Result<Option<VmStatus>, DriverError> {
        self.sim.vm_status(id).await
    }
    async fn vm_list(&self) -> Result<Vec<VmStatus>, DriverError> {
        self.sim.vm_list().await
    }
    async fn console_read(
        &self,
        id: VmId,
        offset: u64,
        max: usize,
    ) -> Result<ConsoleChunk, DriverError> {
        self.sim.console_read(id, offset, max).await
    }
    async fn guest_info(&self, id: VmId) -> Result<GuestInfo, DriverError> {
        self.sim.guest_info(id).await
    }
    async fn guest_exec(
        &self,
        id: VmId,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, DriverError> {
        self.sim.guest_exec(id, argv, timeout).await
    }
    async fn volume_create(
        &self,
        spec: &stratus_driver::VolumeSpec,
    ) -> Result<stratus_driver::VolumeInfo, DriverError> {
        self.sim.volume_create(spec).await
    }
    async fn vm_volume_attach(&self, vm: VmId, volume: uuid::Uuid) -> Result<(), DriverError> {
        self.sim.vm_volume_attach(vm, volume).await
    }
    async fn vm_volume_detach(&self, vm: VmId, volume: uuid::Uuid) -> Result<(), DriverError> {
        self.sim.vm_volume_detach(vm, volume).await
    }
    async fn volume_resize(
        &self,
        volume: uuid::Uuid,
        size_bytes: u64,
    ) -> Result<stratus_driver::VolumeInfo, DriverError> {
        self.sim.volume_resize(volume, size_bytes).await
    }
    async fn volume_delete(&self, volume: uuid::Uuid) -> Result<(), DriverError> {
        self.sim.volume_delete(volume).await
    }
    async fn volume_info(
        &self,
        volume: uuid::Uuid,
    ) -> Result<Option<stratus_driver::VolumeInfo>, DriverError> {
        self.sim.volume_info(volume).await
    }
    async fn volume_use_pool(
        &self,
        volume: uuid::Uuid,
        pool: &std::path::Path,
    ) -> Result<(), DriverError> {
        self.sim.volume_use_pool(volume, pool).await
    }
    async fn vm_migrate_describe(
        &self,
        id: VmId,
    ) -> Result<stratus_driver::OutgoingVm, DriverError> {
        self.sim.vm_migrate_describe(id).await
    }
    async fn vm_migrate_prepare(
        &self,
        spec: &VmSpec,
        req: &stratus_driver::IncomingRequest,
    ) -> Result<stratus_driver::IncomingReady, DriverError> {
        self.sim.vm_migrate_prepare(spec, req).await
    }
    async fn vm_migrate_send(
        &self,
        id: VmId,
        req: &stratus_driver::MigrateRequest,
        p: &stratus_driver::MigrateProgressFn,
    ) -> Result<stratus_driver::MigrateOutcome, DriverError> {
        self.sim.vm_migrate_send(id, req, p).await
    }
    async fn vm_migrate_finish(&self, id: VmId, timeout: Duration) -> Result<(), DriverError> {
        self.sim.vm_migrate_finish(id, timeout).await
    }
    async fn vm_migrate_cancel(&self, id: VmId) -> Result<(), DriverError> {
        self.sim.vm_migrate_cancel(id).await
    }
    async fn vm_migrate_abort_incoming(&self, id: VmId) -> Result<(), DriverError> {
        self.sim.vm_migrate_abort_incoming(id).await
    }
    async fn vm_disk_export(
        &self,
        id: VmId,
        req: &stratus_driver::ExportRequest,
    ) -> Result<stratus_driver::DiskExport, DriverError> {
        self.sim.vm_disk_export(id, req).await
    }
    async fn vm_disk_export_stop(&self, id: VmId) -> Result<(), DriverError> {
        self.sim.vm_disk_export_stop(id).await
    }
    async fn vm_disk_import(
        &self,
        spec: &VmSpec,
        from: &stratus_driver::DiskExport,
        p: &stratus_driver::ProgressFn,
    ) -> Result<stratus_driver::ImportOutcome, DriverError> {
        self.sim.vm_disk_import(spec, from, p).await
    }
    async fn vm_adopt_from_pool(&self, spec: &VmSpec) -> Result<(), DriverError> {
        self.sim.vm_adopt_from_pool(spec).await
    }
    async fn vm_release(&self, id: VmId) -> Result<(), DriverError> {
        self.sim.vm_release(id).await
    }
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<VmEvent> {
        self.sim.subscribe()
    }
}

#[tokio::test]
async fn sim_one_slow_vm_does_not_hold_up_the_others() {
    let (cloud, _files) = cloud().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = sim();
    let mut c = AgentConfig::new(
        &cloud.url,
        dir.path(),
        DriverConfig::Instance(Arc::new(SlowStops { sim: sim.clone() })),
    );
    c.name = Some("sim-slow".into());
    c.desired_wait = Duration::from_secs(3);
    c.enroll_token = Some(cloud.enroll_token().await);
    let agent = Agent::start(c).await.expect("agent starts");
    let slow = create_running(&cloud, "slow-1").await;
    let quick = create_running(&cloud, "quick-1").await;

    let t = Instant::now();
    let slow_stop = cloud
        .admin
        .vm_stop()
        .vm(slow.id.to_string())
        .send()
        .await
        .expect("vm_stop")
        .into_inner();
    // While the slow VM's stop hangs, the other VM stops and reports.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let quick_stop = cloud
        .admin
        .vm_stop()
        .vm(quick.id.to_string())
        .send()
        .await
        .expect("vm_stop")
        .into_inner();
    cloud.job_succeeds(&quick_stop.job, JOB).await;
    let quick_done = t.elapsed();
    assert!(
        quick_done < Duration::from_secs(10),
        "the quick VM waited for the slow one: {quick_done:?}"
    );
    assert_eq!(cloud.vm(&slow.id).await.state, VmState::Stopping);
    cloud.job_succeeds(&slow_stop.job, JOB).await;
    assert!(t.elapsed() >= Duration::from_secs(20));
    println!(
        "TIMING quick stop {quick_done:?} while a slow stop took {:?}",
        t.elapsed()
    );
    agent.shutdown().await;
}
