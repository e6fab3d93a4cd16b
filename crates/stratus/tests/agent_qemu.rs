//! `stratus agent` as a real child process with real QEMU (TCG) on the tiny
//! test guest, against `stratus server`, driven through the CLI: the agent is
//! SIGKILLed while its VM runs and started again (the VM survives and is
//! adopted, not duplicated), QEMU is killed by hand (reported crashed), and
//! SIGTERM stops the agent cleanly without stopping VMs.

mod qemu_world;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qemu_world::*;
use serde_json::Value;

#[test]
fn real_qemu_vms_survive_agent_kill_and_crashes_are_reported() {
    let World {
        home,
        server: _server,
        env,
        agent,
        agent_dir,
        ..
    } = world();
    let url = env.url.clone();
    let agent_dir_s = agent_dir.display().to_string();

    // A VM, booted, with its guest agent answering.
    let t = Instant::now();
    let op = env.json(&[
        "vm",
        "create",
        "web",
        "--flavor",
        "tiny",
        "--image",
        "guest",
        "--project",
        "p",
        "-o",
        "json",
    ]);
    let vm_id = op["vm"]["id"].as_str().expect("vm id").to_string();
    let _cleanup = KillVm(Some(vm_id.clone()));
    let job_id = op["job"]["id"].as_str().expect("job id").to_string();
    let job = wait_until("the create job to end", BOOT, || {
        let j = env.json(&["job", "show", &job_id, "-o", "json"]);
        match j["state"].as_str() {
            Some("succeeded") => Ok(j),
            Some("failed") | Some("cancelled") => panic!("create failed: {j}"),
            s => Err(format!("{s:?}")),
        }
    });
    println!(
        "TIMING child agent: create -> running {:?} ({})",
        t.elapsed(),
        job["state"]
    );
    wait_until("the guest agent to connect", BOOT, || {
        let v = env.vm("web");
        if v["guest"]["connected"] == true {
            Ok(())
        } else {
            Err(v.to_string())
        }
    });
    let pids = qemu_of(&vm_id);
    assert_eq!(pids.len(), 1, "one QEMU for the VM: {pids:?}");
    let qemu = pids[0];
    let host_id = env.json(&["host", "list", "-o", "json"])["items"][0]["id"].clone();

    // SIGKILL the agent: the VM keeps running.
    let mut agent = agent;
    agent.child.kill().expect("SIGKILL the agent");
    agent.child.wait().expect("reap");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(qemu_of(&vm_id), vec![qemu], "QEMU outlives the agent");
    let before = env.vm("web")["observed_at"].clone();

    // Start it again, without a token: same host, the VM adopted (same QEMU,
    // no second one), reports flowing again.
    let agent = env.spawn(
        "agent (restarted)",
        &agent_args(&url, &agent_dir_s, None),
        home.path().join("agent-2.log"),
    );
    let t = Instant::now();
    wait_until(
        "reports from the restarted agent",
        Duration::from_secs(30),
        || {
            let v = env.vm("web");
            if v["observed_at"] != before && v["state"] == "running" {
                Ok(())
            } else {
                Err(v.to_string())
            }
        },
    );
    println!(
        "TIMING child agent restart -> first report: {:?}",
        t.elapsed()
    );
    let hosts = env.json(&["host", "list", "-o", "json"]);
    assert_eq!(hosts["items"].as_array().map(Vec::len), Some(1), "{hosts}");
    assert_eq!(hosts["items"][0]["id"], host_id, "same host after restart");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        qemu_of(&vm_id),
        vec![qemu],
        "adopted, not restarted or duplicated"
    );
    let v = env.vm("web");
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(
        v["guest"]["connected"], true,
        "guest agent reached again: {v}"
    );
    // The adopted VM still does what it is told.
    let out = env.cli(&[
        "vm",
        "exec",
        "web",
        "--project",
        "p",
        "--",
        "echo",
        "adopted",
    ]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("adopted"),
        "exec after adoption: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Kill QEMU by hand: crashed within 10 s, and left down.
    let t = Instant::now();
    signal(qemu, "KILL");
    let v = wait_until("the VM to show crashed", Duration::from_secs(10), || {
        let v = env.vm("web");
        if v["state"] == "crashed" {
            Ok(v)
        } else {
            Err(v.to_string())
        }
    });
    println!(
        "TIMING QEMU killed -> crashed at the controller: {:?}",
        t.elapsed()
    );
    assert!(
        v["state_reason"]
            .as_str()
            .is_some_and(|r| r.contains("unexpectedly")),
        "{v}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        qemu_of(&vm_id).is_empty(),
        "not restarted behind the operator's back"
    );

    // SIGTERM: the agent exits cleanly. Start the VM first to show a running
    // VM outlives a clean agent stop too.
    let out = env.cli(&["vm", "start", "web", "--project", "p", "--wait"]);
    assert!(
        out.status.success(),
        "vm start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let running = qemu_of(&vm_id);
    assert_eq!(running.len(), 1, "{running:?}");
    let mut agent = agent;
    signal(agent.child.id(), "TERM");
    let status = wait_until(
        "the agent to exit on SIGTERM",
        Duration::from_secs(15),
        || {
            agent
                .child
                .try_wait()
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "still running".to_string())
        },
    );
    assert!(
        status.success(),
        "agent exit status {status}: {}",
        agent.log_text()
    );
    assert_eq!(qemu_of(&vm_id), running, "SIGTERM does not stop VMs");
}

/// Every file or directory under `dir` whose path names the VM (its disks,
/// its run directory).
fn files_of(dir: &Path, vm_id: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.to_string_lossy().contains(vm_id) {
                found.push(path.clone());
            }
            if path.is_dir() {
                todo.push(path);
            }
        }
    }
    found
}

impl World {
    /// SIGKILLs the controller and starts it again on the same port and
    /// database.
    fn kill_and_restart_controller(&mut self, log: &str) {
        self.server.child.kill().expect("SIGKILL the controller");
        self.server.child.wait().expect("reap");
        let (server, _, _) = start_server_on(self.home.path(), &self.data, self.port, log);
        self.server = server;
    }

    fn job_ends(&self, job: &str) -> Value {
        wait_until("the job to end", BOOT, || {
            let j = self.env.json(&["job", "show", job, "-o", "json"]);
            match j["state"].as_str() {
                Some("succeeded" | "failed" | "cancelled") => Ok(j),
                s => Err(format!("{s:?}: {j}")),
            }
        })
    }

    fn vm_gone(&self, name: &str) -> bool {
        let out = self
            .env
            .cli(&["vm", "show", name, "--project", "p", "-o", "json"]);
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not found")
    }

    fn allocated_vcpus(&self) -> u64 {
        let hosts = self.env.json(&["host", "list", "-o", "json"]);
        hosts["items"][0]["allocated"]["vcpus"]
            .as_u64()
            .expect("allocated vcpus")
    }
}

/// Issue 5's kill test with the real driver: a VM create interrupted by a
/// controller SIGKILL ends as a running VM or as nothing, never as a
/// leftover; a cancelled create whose controller is killed mid-undo is
/// finished by the next controller, leaving no QEMU and no disk.
#[test]
fn real_qemu_create_interrupted_by_a_controller_kill_ends_running_or_as_nothing() {
    let mut w = world();
    let create = |w: &World, name: &str| -> (String, String) {
        let op = w.env.json(&[
            "vm",
            "create",
            name,
            "--flavor",
            "tiny",
            "--image",
            "guest",
            "--project",
            "p",
            "-o",
            "json",
        ]);
        (
            op["vm"]["id"].as_str().expect("vm id").to_string(),
            op["job"]["id"].as_str().expect("job id").to_string(),
        )
    };

    // 1. Killed right after the create was accepted.
    let (a, a_job) = create(&w, "a");
    let _kill_a = KillVm(Some(a.clone()));
    w.kill_and_restart_controller("server-2.log");
    let j = w.job_ends(&a_job);
    let a_running = match j["state"].as_str() {
        Some("succeeded") => {
            let v = w.env.vm("a");
            assert_eq!(v["state"], "running", "{v}");
            assert_eq!(qemu_of(&a).len(), 1, "exactly one QEMU for a");
            true
        }
        _ => {
            assert!(w.vm_gone("a"), "a failed create leaves no record: {j}");
            wait_until(
                "a's QEMU to go",
                Duration::from_secs(30),
                || match qemu_of(&a).as_slice() {
                    [] => Ok(()),
                    p => Err(format!("{p:?}")),
                },
            );
            assert!(files_of(&w.agent_dir, &a).is_empty());
            false
        }
    };
    println!("kill test: create killed at once -> {}", j["state"]);

    // 2. Cancelled while its saga waits on the host, the controller killed right
    //    after accepting the cancel: the next controller runs the undo. The
    //    host must not finish the create before the cancel lands (a fast
    //    one did, and the create then rightly succeeded): its agent is
    //    paused from before the create until the next controller runs.
    let agent_pid = w.agent.child.id();
    signal(agent_pid, "STOP");
    let (b, b_job) = create(&w, "b");
    let _kill_b = KillVm(Some(b.clone()));
    wait_until("b's saga to wait on its host", BOOT, || {
        let j = w.env.json(&["job", "show", &b_job, "-o", "json"]);
        if j["current_step"] == "provision" {
            Ok(())
        } else {
            Err(j.to_string())
        }
    });
    w.env.json(&["job", "cancel", &b_job, "-o", "json"]);
    w.kill_and_restart_controller("server-3.log");
    signal(agent_pid, "CONT");
    let j = w.job_ends(&b_job);
    assert_eq!(j["state"], "cancelled", "{j}");
    assert!(
        j["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["step"] == "undo")),
        "the undo ran: {j}"
    );
    assert!(w.vm_gone("b"), "a cancelled create leaves no record");
    wait_until("b's QEMU and disks to go", Duration::from_secs(30), || {
        let procs = qemu_of(&b);
        let files = files_of(&w.agent_dir, &b);
        if procs.is_empty() && files.is_empty() {
            Ok(())
        } else {
            Err(format!("QEMU {procs:?}, files {files:?}"))
        }
    });
    // The host's claim follows the VMs that exist.
    assert_eq!(w.allocated_vcpus(), u64::from(a_running));
    drop(w.agent);
}
