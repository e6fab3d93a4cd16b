//! The agent with the real QEMU driver (TCG) on the tiny test guest built by
//! `scripts/build-guest-image.sh`, against a real controller in process: a
//! VM through its whole life, seen only through the API, then nothing left
//! behind. Timings are printed as `TIMING` lines (`-- --nocapture`).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{wait_for, Cloud};
use stratus_agent::{AccelChoice, Agent, AgentConfig, AgentHandle, DriverConfig};
use stratus_client::types::{Vm, VmState};
use stratus_common::VmId;

const BOOTED: &str = "stratus-guest: booted";
/// Generous bounds: boots take seconds under TCG on a loaded 2-core machine.
const BOOT: Duration = Duration::from_secs(90);
const JOB: Duration = Duration::from_secs(120);

struct Guest {
    disk: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    cmdline: String,
}

/// The test guest; fails (never skips) when it has not been built.
fn guest() -> Guest {
    let dir = match std::env::var_os("STRATUS_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/stratus/guest")
        }
    };
    let manifest = dir.join("manifest.json");
    let g = Guest {
        disk: dir.join("disk.qcow2"),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        cmdline: String::new(),
    };
    for f in [&g.disk, &g.kernel, &g.initrd, &manifest] {
        assert!(
            f.is_file(),
            "test guest image missing: {} does not exist. Run `bash scripts/build-guest-image.sh` \
             (or point STRATUS_GUEST_DIR at a built guest)",
            f.display()
        );
    }
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).expect("manifest")).expect("JSON");
    Guest {
        cmdline: m["cmdline"].as_str().unwrap_or("console=ttyS0").to_string(),
        ..g
    }
}

/// Live (not zombie) processes whose command line contains the VM id.
fn processes_of(id: VmId) -> Vec<u32> {
    stratus_test_utils::live_processes_matching(&[&id.to_string()])
}

/// Kills every process of the VM when dropped, so a failing test leaves no
/// daemonized QEMU behind.
struct KillOnDrop(Option<VmId>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let Some(id) = self.0 else { return };
        for pid in processes_of(id) {
            if let Some(pid) = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

async fn console_text(cloud: &Cloud, vm: &Vm) -> String {
    let c = cloud
        .admin
        .vm_console()
        .vm(vm.id.to_string())
        .offset(0u64)
        .max(1u32 << 20)
        .send()
        .await
        .expect("vm_console")
        .into_inner();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(c.data_base64)
        .expect("base64");
    String::from_utf8_lossy(&bytes).into_owned()
}

async fn wait_booted(cloud: &Cloud, vm: &Vm, count: usize) -> Duration {
    let t = Instant::now();
    wait_for(
        &format!("{BOOTED:?} {count} time(s) on the console"),
        BOOT,
        || async {
            let text = console_text(cloud, vm).await;
            if text.matches(BOOTED).count() >= count {
                Ok(())
            } else {
                Err(text
                    .chars()
                    .rev()
                    .take(400)
                    .collect::<String>()
                    .chars()
                    .rev()
                    .collect())
            }
        },
    )
    .await;
    t.elapsed()
}

/// A controller with project `p`, flavor `tiny` and the test guest as image
/// `guest`, and one real-QEMU (TCG) agent `qemu-1` whose data dir is the
/// returned temp dir.
async fn qemu_cloud() -> (Cloud, tempfile::TempDir, AgentHandle) {
    common::logging();
    let g = guest();
    let cloud = Cloud::start().await;
    cloud.project("p").await;
    cloud.flavor("tiny", 128, 64).await;
    cloud
        .image(
            "p",
            "guest",
            &g.disk,
            Some(&g.kernel),
            Some(&g.initrd),
            Some(&g.cmdline),
        )
        .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = AgentConfig::new(
        &cloud.url,
        dir.path(),
        DriverConfig::Qemu {
            accel: AccelChoice::Tcg,
            qemu_binary: None,
            backup_bandwidth: None,
            migration: Default::default(),
        },
    );
    config.name = Some("qemu-1".into());
    config.enroll_token = Some(cloud.enroll_token().await);
    config.desired_wait = Duration::from_secs(5);
    let agent = Agent::start(config).await.expect("agent starts");
    (cloud, dir, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_vm_lives_and_dies_through_the_agent() {
    let (cloud, dir, agent) = qemu_cloud().await;
    let mut guard = KillOnDrop(None);

    // Create: the job ends when the agent reports the VM running.
    let t = Instant::now();
    let (vm, job) = cloud.vm_create("p", "web-1", "tiny", "guest").await;
    let id = VmId(vm.id.0);
    guard.0 = Some(id);
    cloud.job_succeeds(&job, JOB).await;
    let to_running = t.elapsed();
    println!("TIMING vm create -> job succeeded (running): {to_running:?}");
    let v = cloud.vm(&vm.id).await;
    assert_eq!(v.state, VmState::Running, "{v:?}");
    assert_eq!(v.host_id.as_ref().map(|h| h.0), Some(agent.host_id().0));
    assert_eq!(processes_of(id).len(), 1, "one QEMU for the VM");

    let booted = wait_booted(&cloud, &vm, 1).await;
    println!(
        "TIMING vm create -> {BOOTED:?} at the controller: {:?}",
        to_running + booted
    );
    let v = wait_for("the guest agent to report OS and IP", BOOT, || async {
        let v = cloud.vm(&vm.id).await;
        match &v.guest {
            Some(gi)
                if gi.connected
                    && gi.os_name.is_some()
                    && gi.ip_addresses.iter().any(|a| a == "10.0.2.15") =>
            {
                Ok(v)
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    println!(
        "TIMING vm create -> guest agent connected with IP: {:?}",
        t.elapsed()
    );
    println!("guest: {:?}", v.guest);

    // Exec, through controller, agent and guest agent.
    let t = Instant::now();
    let out = cloud
        .admin
        .vm_exec()
        .vm(vm.id.to_string())
        .body(stratus_client::types::VmExec {
            argv: vec!["echo".into(), "hi".into()],
            timeout_secs: Some(30),
        })
        .send()
        .await
        .expect("vm_exec")
        .into_inner();
    println!("TIMING exec round trip: {:?}", t.elapsed());
    assert_eq!(out.exit_code, 0);
    let stdout = base64::engine::general_purpose::STANDARD
        .decode(&out.stdout_base64)
        .expect("base64");
    assert_eq!(String::from_utf8_lossy(&stdout), "hi\n");

    // Stop (ACPI power button; the guest runs acpid).
    let t = Instant::now();
    let op = cloud
        .admin
        .vm_stop()
        .vm(vm.id.to_string())
        .send()
        .await
        .expect("vm_stop")
        .into_inner();
    cloud.job_succeeds(&op.job, JOB).await;
    println!("TIMING stop: {:?}", t.elapsed());
    assert_eq!(cloud.vm(&vm.id).await.state, VmState::Stopped);
    assert!(processes_of(id).is_empty(), "QEMU ended");

    // Start.
    let t = Instant::now();
    let op = cloud
        .admin
        .vm_start()
        .vm(vm.id.to_string())
        .send()
        .await
        .expect("vm_start")
        .into_inner();
    cloud.job_succeeds(&op.job, JOB).await;
    println!("TIMING start: {:?}", t.elapsed());
    assert_eq!(cloud.vm(&vm.id).await.state, VmState::Running);
    wait_booted(&cloud, &vm, 2).await;

    // Reboot: the same QEMU, one more boot.
    let pids = processes_of(id);
    let t = Instant::now();
    let op = cloud
        .admin
        .vm_reboot()
        .vm(vm.id.to_string())
        .send()
        .await
        .expect("vm_reboot")
        .into_inner();
    cloud.job_succeeds(&op.job, JOB).await;
    wait_booted(&cloud, &vm, 3).await;
    println!("TIMING reboot -> booted again: {:?}", t.elapsed());
    assert_eq!(processes_of(id), pids, "a reboot keeps the QEMU process");
    assert_eq!(cloud.vm(&vm.id).await.state, VmState::Running);

    // Delete: nothing left.
    let t = Instant::now();
    let op = cloud
        .admin
        .vm_delete()
        .vm(vm.id.to_string())
        .send()
        .await
        .expect("vm_delete")
        .into_inner();
    cloud.job_succeeds(&op.job, JOB).await;
    println!("TIMING delete: {:?}", t.elapsed());
    assert!(processes_of(id).is_empty(), "no QEMU left");
    let vm_dir = dir.path().join("qemu").join("vms").join(id.to_string());
    assert!(!vm_dir.exists(), "VM directory left: {}", vm_dir.display());
    assert!(
        !dir.path().join("vms").join(format!("{id}.json")).exists(),
        "agent record left"
    );
    let gone = cloud.admin.vm_view().vm(vm.id.to_string()).send().await;
    assert_eq!(
        gone.expect_err("deleted").status().map(|s| s.as_u16()),
        Some(404)
    );
    agent.shutdown().await;
}

/// A real QEMU killed with SIGKILL: the agent reports the VM crashed, and
/// with restart policy `on_crash` the controller's reconciler starts it
/// again, a new QEMU that boots the guest once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_killed_with_restart_policy_on_crash_is_started_again() {
    let (cloud, _dir, agent) = qemu_cloud().await;
    let mut guard = KillOnDrop(None);

    let (vm, job) = cloud.vm_create("p", "web-1", "tiny", "guest").await;
    let id = VmId(vm.id.0);
    guard.0 = Some(id);
    cloud.job_succeeds(&job, JOB).await;
    let v = cloud
        .admin
        .vm_update()
        .vm(vm.id.to_string())
        .body(stratus_client::types::VmUpdate {
            restart_policy: Some(stratus_client::types::RestartPolicy::OnCrash),
        })
        .send()
        .await
        .expect("vm_update")
        .into_inner();
    assert_eq!(
        v.restart_policy,
        stratus_client::types::RestartPolicy::OnCrash
    );
    wait_booted(&cloud, &vm, 1).await;
    let before = processes_of(id);
    assert_eq!(before.len(), 1, "one QEMU for the VM");

    let t = Instant::now();
    for pid in &before {
        let pid = i32::try_from(*pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill QEMU");
    }
    wait_booted(&cloud, &vm, 2).await;
    println!(
        "TIMING QEMU killed -> booted again by the reconciler: {:?}",
        t.elapsed()
    );
    let v = wait_for("the VM running again", JOB, || async {
        let v = cloud.vm(&vm.id).await;
        match v.state {
            VmState::Running => Ok(v),
            s => Err(format!("{s} ({:?})", v.state_reason)),
        }
    })
    .await;
    assert!(v.state_reason.is_none(), "{:?}", v.state_reason);
    let after = processes_of(id);
    assert_eq!(after.len(), 1, "one QEMU again: {after:?}");
    assert_ne!(after, before, "a new QEMU");
    let starts = cloud
        .admin
        .job_list()
        .target(vm.id.0)
        .kind("vm_start")
        .send()
        .await
        .expect("job_list")
        .into_inner()
        .items;
    assert_eq!(starts.len(), 1, "one automatic start: {starts:?}");
    assert_eq!(starts[0].state, stratus_client::types::JobState::Succeeded);

    let op = cloud
        .admin
        .vm_delete()
        .vm(vm.id.to_string())
        .send()
        .await
        .expect("vm_delete")
        .into_inner();
    cloud.job_succeeds(&op.job, JOB).await;
    assert!(processes_of(id).is_empty(), "no QEMU left");
    agent.shutdown().await;
}
