//! Migration end to end with real QEMU (TCG), through the CLI: two hosts on
//! one machine (two agents with their own data directories, migration
//! traffic over loopback). A guest printing a counter to its console while
//! rewriting a 64 MiB tmpfs file keeps counting across a live migration,
//! with its disk's data intact; a cancelled migration and one whose
//! destination QEMU dies leave the VM running where it was and nothing on
//! the other host; maintenance mode empties a host of three VMs.

mod qemu_world;

use std::path::Path;
use std::time::{Duration, Instant};

use qemu_world::*;
use serde_json::Value;

fn create_vm(env: &Env, name: &str, flavor: &str) -> KillVm {
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
    wait_until("the guest agent to connect", BOOT, || {
        let v = env.vm(name);
        if v["state"] == "running" && v["guest"]["connected"] == true {
            Ok(())
        } else {
            Err(format!("{} / {}", v["state"], v["guest"]))
        }
    });
    kill
}

fn sh(env: &Env, vm: &str, script: &str) -> String {
    let out = env.cli(&[
        "vm",
        "exec",
        vm,
        "--project",
        "p",
        "--timeout",
        "60",
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
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A console counter (`tick N` every 200 ms) and a memory load rewriting a
/// 64 MiB tmpfs file from random data, both detached from the exec.
fn start_load(env: &Env, vm: &str) {
    sh(
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

fn ticks(env: &Env, vm: &str) -> Vec<u64> {
    let out = env.cli(&["vm", "console", vm, "--project", "p"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tick ")?.trim().parse().ok())
        .collect()
}

fn host_of(env: &Env, vm: &str) -> String {
    let v = env.vm(vm);
    let id = v["host_id"].as_str().expect("placed").to_string();
    env.json(&["host", "show", &id, "-o", "json"])["name"]
        .as_str()
        .expect("name")
        .to_string()
}

/// The VM's QEMU processes run from `dir` (an agent's data directory).
fn qemus_under(vm_id: &str, dir: &Path) -> usize {
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

fn vm_dir_exists(agent_dir: &Path, vm_id: &str) -> bool {
    agent_dir.join("qemu/vms").join(vm_id).exists()
}

/// The job's latest step message (its progress in words).
fn last_message(j: &Value) -> String {
    j["events"]
        .as_array()
        .and_then(|e| e.last())
        .and_then(|e| e["message"].as_str())
        .unwrap_or_default()
        .to_string()
}

fn job_of(env: &Env, op: &Value) -> Value {
    let id = op["job"]["id"].as_str().expect("job id");
    env.json(&["job", "show", id, "-o", "json"])
}

#[test]
fn real_qemu_live_migration_keeps_the_guest_running_and_its_disk() {
    let w = world();
    let env = &w.env;
    let (_agent2, host2_dir) = w.add_host("host-2");
    env.json(&[
        "flavor", "create", "mig", "--vcpus", "1", "--memory", "256MiB", "--disk", "64MiB", "-o",
        "json",
    ]);
    // Host 2 out of service while the VM is placed, so it starts on host 1.
    env.json(&["host", "maintenance", "host-2", "on", "-o", "json"]);
    let _kill = create_vm(env, "mover", "mig");
    env.json(&["host", "maintenance", "host-2", "off", "-o", "json"]);
    let id = env.vm("mover")["id"].as_str().expect("id").to_string();
    assert_eq!(host_of(env, "mover"), "host-1");
    let boot_id = sh(env, "mover", "cat /proc/sys/kernel/random/boot_id");
    let sum = sh(
        env,
        "mover",
        "dd if=/dev/urandom of=/mnt/disk/keep bs=1M count=4 2>/dev/null && sync && \
         sha256sum /mnt/disk/keep | cut -d' ' -f1",
    );
    start_load(env, "mover");
    wait_until("the counter to tick", Duration::from_secs(20), || {
        let t = ticks(env, "mover");
        if t.len() >= 5 {
            Ok(())
        } else {
            Err(format!("{t:?}"))
        }
    });

    // Live, to the scheduler's choice (the only other host).
    let t = Instant::now();
    let op = env.json(&["vm", "migrate", "mover", "--project", "p", "-o", "json"]);
    assert_eq!(op["vm"]["state"], "migrating", "{op}");
    let job = wait_until("the migration to end", Duration::from_secs(120), || {
        let j = job_of(env, &op);
        match j["state"].as_str() {
            Some("succeeded") => Ok(j),
            Some("failed") | Some("cancelled") => panic!("migration failed: {j}"),
            _ => Err(j["current_step"].to_string()),
        }
    });
    println!(
        "MEASURED live migration through the API: {:?}; job says: {}",
        t.elapsed(),
        last_message(&job)
    );
    let steps: Vec<String> = job["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .collect();
    assert!(
        steps.iter().any(|m| m.starts_with("moved to host-2 in")),
        "{steps:#?}"
    );

    // The same boot, the same data, still counting, on host 2 only.
    let v = env.vm("mover");
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(host_of(env, "mover"), "host-2");
    assert_eq!(
        sh(env, "mover", "cat /proc/sys/kernel/random/boot_id"),
        boot_id
    );
    assert_eq!(
        sh(env, "mover", "sha256sum /mnt/disk/keep | cut -d' ' -f1"),
        sum
    );
    let before = ticks(env, "mover").last().copied().unwrap_or(0);
    wait_until(
        "the counter to go on after the move",
        Duration::from_secs(30),
        || {
            let t = ticks(env, "mover");
            match t.last() {
                Some(n) if *n > before + 5 => Ok(()),
                other => Err(format!("{other:?} (was {before})")),
            }
        },
    );
    let all = ticks(env, "mover");
    assert!(
        all.windows(2).all(|p| p[1] > p[0]),
        "the counter never restarted: {all:?}"
    );
    assert_eq!(qemus_under(&id, &w.agent_dir), 0, "no QEMU left on host 1");
    assert_eq!(qemus_under(&id, &host2_dir), 1, "one QEMU on host 2");
    assert!(!vm_dir_exists(&w.agent_dir, &id), "nothing left on host 1");
    let h1 = env.json(&["host", "show", "host-1", "-o", "json"]);
    assert_eq!(h1["allocated"]["vcpus"], 0, "{h1}");

    // A cancelled migration (1 MiB/s: it cannot finish first) leaves the VM
    // on host 2 and nothing on host 1.
    let op = env.json(&[
        "vm",
        "migrate",
        "mover",
        "--project",
        "p",
        "--bandwidth",
        "1MiB",
        "-o",
        "json",
    ]);
    wait_until(
        "the migration to send memory",
        Duration::from_secs(60),
        || {
            let j = job_of(env, &op);
            let step = last_message(&j);
            if step.contains("migrating memory") {
                Ok(())
            } else {
                Err(step)
            }
        },
    );
    let job_id = op["job"]["id"].as_str().expect("job id");
    env.json(&["job", "cancel", job_id, "-o", "json"]);
    let j = wait_until("the cancel to unwind", Duration::from_secs(90), || {
        let j = job_of(env, &op);
        match j["state"].as_str() {
            Some("cancelled") | Some("failed") | Some("succeeded") => Ok(j),
            _ => Err(j["current_step"].to_string()),
        }
    });
    assert_eq!(j["state"], "cancelled", "{j}");
    assert_eq!(host_of(env, "mover"), "host-2");
    assert_eq!(
        sh(env, "mover", "cat /proc/sys/kernel/random/boot_id"),
        boot_id
    );
    wait_until("host 1 to have nothing", Duration::from_secs(30), || {
        let q = qemus_under(&id, &w.agent_dir);
        if q == 0 && !vm_dir_exists(&w.agent_dir, &id) {
            Ok(())
        } else {
            Err(format!(
                "{q} QEMUs, dir {}",
                vm_dir_exists(&w.agent_dir, &id)
            ))
        }
    });
    let h1 = env.json(&["host", "show", "host-1", "-o", "json"]);
    assert_eq!(h1["allocated"]["vcpus"], 0, "the claim went: {h1}");

    // The destination's QEMU dies mid-migration: the job fails, the VM runs
    // on where it was, and the destination is cleaned.
    let op = env.json(&[
        "vm",
        "migrate",
        "mover",
        "--project",
        "p",
        "--bandwidth",
        "1MiB",
        "-o",
        "json",
    ]);
    let dest_pid = wait_until("the destination QEMU", Duration::from_secs(60), || {
        let pids: Vec<u32> = qemu_of(&id)
            .into_iter()
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| {
                        String::from_utf8_lossy(&c).contains(&w.agent_dir.display().to_string())
                    })
                    .unwrap_or(false)
            })
            .collect();
        let step = last_message(&job_of(env, &op));
        match pids.first() {
            Some(p) if step.contains("migrating memory") => Ok(*p),
            _ => Err(step),
        }
    });
    signal(dest_pid, "KILL");
    let j = wait_until("the failure to unwind", Duration::from_secs(90), || {
        let j = job_of(env, &op);
        match j["state"].as_str() {
            Some("cancelled") | Some("failed") | Some("succeeded") => Ok(j),
            _ => Err(j["current_step"].to_string()),
        }
    });
    assert_eq!(j["state"], "failed", "{j}");
    println!("MEASURED destination killed: job error {}", j["error"]);
    assert_eq!(host_of(env, "mover"), "host-2");
    assert_eq!(
        sh(env, "mover", "cat /proc/sys/kernel/random/boot_id"),
        boot_id
    );
    assert_eq!(
        sh(env, "mover", "sha256sum /mnt/disk/keep | cut -d' ' -f1"),
        sum
    );
    wait_until("host 1 to have nothing", Duration::from_secs(30), || {
        let q = qemus_under(&id, &w.agent_dir);
        if q == 0 && !vm_dir_exists(&w.agent_dir, &id) {
            Ok(())
        } else {
            Err(format!(
                "{q} QEMUs, dir {}",
                vm_dir_exists(&w.agent_dir, &id)
            ))
        }
    });
    let v = env.vm("mover");
    assert_eq!(v["state"], "running", "{v}");
}
