//! Migration end to end with real QEMU (TCG), through the CLI: two hosts on
//! one machine (two agents with their own data directories, migration
//! traffic over loopback). A guest printing a counter to its console while
//! rewriting a 64 MiB tmpfs file keeps counting across a live migration,
//! with its disk's data intact; a cancelled migration and one whose
//! destination QEMU dies leave the VM running where it was and nothing on
//! the other host; maintenance mode empties a host of three VMs.

mod qemu_world;

use std::time::{Duration, Instant};

use qemu_world::*;
use serde_json::Value;

/// Starts a migration of `vm` at 1 MiB/s (it cannot finish for a while)
/// and waits until it sends memory; the operation.
fn slow_migration(env: &Env, vm: &str) -> Value {
    let op = slow_migration_started(env, vm);
    wait_until(
        "the migration to send memory",
        Duration::from_secs(60),
        || {
            let step = last_message(&job_of(env, &op));
            if step.contains("migrating memory") {
                Ok(())
            } else {
                Err(step)
            }
        },
    );
    op
}

fn slow_migration_started(env: &Env, vm: &str) -> Value {
    env.json(&[
        "vm",
        "migrate",
        vm,
        "--project",
        "p",
        "--bandwidth",
        "1MiB",
        "-o",
        "json",
    ])
}

#[test]
fn real_qemu_live_migration_keeps_the_guest_running_and_its_disk() {
    let w = world();
    let env = &w.env;
    let (agent2, host2_dir) = w.add_host("host-2");
    env.json(&[
        "flavor", "create", "mig", "--vcpus", "1", "--memory", "256MiB", "--disk", "64MiB", "-o",
        "json",
    ]);
    // Host 2 out of service while the VM is placed, so it starts on host 1.
    env.json(&["host", "maintenance", "host-2", "on", "-o", "json"]);
    let _kill = running_vm_of(env, "mover", "mig");
    env.json(&["host", "maintenance", "host-2", "off", "-o", "json"]);
    let id = env.vm("mover")["id"].as_str().expect("id").to_string();
    assert_eq!(host_of(env, "mover"), "host-1");
    let boot_id = line(env, "mover", "cat /proc/sys/kernel/random/boot_id");
    let sum = line(
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

    // The same boot, the same data, still counting, on host 2 only (its
    // guest agent reached again from there).
    wait_guest(env, "mover");
    let v = env.vm("mover");
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(host_of(env, "mover"), "host-2");
    same_guest_still_counting(env, "mover", &boot_id, &sum);
    assert_eq!(qemus_under(&id, &w.agent_dir), 0, "no QEMU left on host 1");
    assert_eq!(qemus_under(&id, &host2_dir), 1, "one QEMU on host 2");
    assert!(!vm_dir_exists(&w.agent_dir, &id), "nothing left on host 1");
    let h1 = env.json(&["host", "show", "host-1", "-o", "json"]);
    assert_eq!(h1["allocated"]["vcpus"], 0, "{h1}");

    // A cancelled migration (1 MiB/s: it cannot finish first) leaves the VM
    // on host 2 and nothing on host 1.
    let op = slow_migration(env, "mover");
    let job_id = op["job"]["id"].as_str().expect("job id");
    env.json(&["job", "cancel", job_id, "-o", "json"]);
    let j = job_end(env, &op);
    assert_eq!(j["state"], "cancelled", "{j}");
    assert_eq!(host_of(env, "mover"), "host-2");
    wait_guest(env, "mover");
    assert_eq!(
        line(env, "mover", "cat /proc/sys/kernel/random/boot_id"),
        boot_id
    );
    wait_nothing_on(&id, &w.agent_dir);
    let h1 = env.json(&["host", "show", "host-1", "-o", "json"]);
    assert_eq!(h1["allocated"]["vcpus"], 0, "the claim went: {h1}");

    // The destination's QEMU dies mid-migration: the job fails, the VM runs
    // on where it was, and the destination is cleaned.
    let op = slow_migration_started(env, "mover");
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
    let j = job_end(env, &op);
    assert_eq!(j["state"], "failed", "{j}");
    println!("MEASURED destination killed: job error {}", j["error"]);
    assert_eq!(host_of(env, "mover"), "host-2");
    wait_guest(env, "mover");
    assert_eq!(
        line(env, "mover", "cat /proc/sys/kernel/random/boot_id"),
        boot_id
    );
    assert_eq!(
        line(env, "mover", "sha256sum /mnt/disk/keep | cut -d' ' -f1"),
        sum
    );
    wait_nothing_on(&id, &w.agent_dir);
    let v = env.vm("mover");
    assert_eq!(v["state"], "running", "{v}");

    // The source's agent is killed mid-migration and comes back: the VM
    // ends up running on exactly one host, the same boot, its data intact,
    // and the other host holds nothing of it.
    let op = slow_migration(env, "mover");
    drop(agent2);
    let _agent2 = w.restart_host("host-2", &host2_dir);
    let j = job_end(env, &op);
    println!(
        "MEASURED source agent killed mid-migration: job {} ({})",
        j["state"],
        if j["state"] == "succeeded" {
            last_message_before_end(&j)
        } else {
            j["error"].to_string()
        }
    );
    let on = host_of(env, "mover");
    let (here, other) = if on == "host-1" {
        (w.agent_dir.clone(), host2_dir.clone())
    } else {
        (host2_dir.clone(), w.agent_dir.clone())
    };
    wait_until(
        "the VM to run on one host only",
        Duration::from_secs(60),
        || {
            let v = env.vm("mover");
            let (a, b) = (qemus_under(&id, &here), qemus_under(&id, &other));
            if v["state"] == "running" && a == 1 && b == 0 && !vm_dir_exists(&other, &id) {
                Ok(())
            } else {
                Err(format!("{} on {on}: {a} here, {b} there", v["state"]))
            }
        },
    );
    wait_guest(env, "mover");
    assert_eq!(
        line(env, "mover", "cat /proc/sys/kernel/random/boot_id"),
        boot_id
    );
    assert_eq!(
        line(env, "mover", "sha256sum /mnt/disk/keep | cut -d' ' -f1"),
        sum
    );
}

fn migrate_wait(env: &Env, args: &[&str]) -> Value {
    let mut all = vec!["vm", "migrate"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--project", "p", "-o", "json"]);
    let op = env.json(&all);
    let job = wait_until("the migration to end", Duration::from_secs(180), || {
        let j = job_of(env, &op);
        match j["state"].as_str() {
            Some("succeeded") => Ok(j),
            Some("failed") | Some("cancelled") => panic!("migration {args:?} failed: {j}"),
            _ => Err(last_message(&j)),
        }
    });
    println!(
        "MEASURED migrate {args:?}: {}",
        last_message_before_end(&job)
    );
    if let Some(vm) = args.first() {
        if env.vm(vm)["state"] == "running" {
            wait_guest(env, vm);
        }
    }
    job
}

#[test]
fn real_qemu_cold_cross_cluster_pool_mapping_and_maintenance() {
    let w = world();
    let env = &w.env;
    // Host 2 is in another cluster, out of service while VMs are placed.
    let (_agent2, host2_dir) = w.add_host_with("host-2", &["--cluster", "east"]);
    env.json(&["host", "maintenance", "host-2", "on", "-o", "json"]);
    let shared = w.home.path().join("nfs");
    std::fs::create_dir_all(&shared).expect("mkdir");
    env.json(&[
        "pool",
        "create",
        "shared",
        "--path",
        &shared.display().to_string(),
        "-o",
        "json",
    ]);
    wait_pool_seen(env, "shared", 2);
    let _c1 = running_vm_of(env, "c1", "tiny");
    let _p1 = running_vm_of(env, "p1", "tiny");
    let mut keep = vec![];
    for n in ["m1", "m2", "m3"] {
        keep.push(running_vm_of(env, n, "tiny"));
    }
    env.json(&["host", "maintenance", "host-2", "off", "-o", "json"]);
    let write = |vm: &str| {
        line(
            env,
            vm,
            "dd if=/dev/urandom of=/mnt/disk/keep bs=1M count=2 2>/dev/null && sync && \
             sha256sum /mnt/disk/keep | cut -d' ' -f1",
        )
    };
    let read = |vm: &str| line(env, vm, "sha256sum /mnt/disk/keep | cut -d' ' -f1");

    // Cold, across clusters: stopped on host 1, its disk copied, started on
    // host 2 with the same data.
    let c1_sum = write("c1");
    let c1_id = env.vm("c1")["id"].as_str().expect("id").to_string();
    env.json(&["vm", "stop", "c1", "--project", "p", "--wait", "-o", "json"]);
    let j = migrate_wait(env, &["c1", "--host", "host-2"]);
    assert!(
        last_message_before_end(&j).contains("cold"),
        "{}",
        last_message_before_end(&j)
    );
    assert_eq!(env.vm("c1")["state"], "stopped");
    assert_eq!(host_of(env, "c1"), "host-2");
    assert!(!vm_dir_exists(&w.agent_dir, &c1_id), "host 1 let go of it");
    env.json(&[
        "vm",
        "start",
        "c1",
        "--project",
        "p",
        "--wait",
        "-o",
        "json",
    ]);
    wait_until("c1's guest agent", BOOT, || {
        let v = env.vm("c1");
        if v["guest"]["connected"] == true {
            Ok(())
        } else {
            Err(v["guest"].to_string())
        }
    });
    assert_eq!(read("c1"), c1_sum, "the cold copy has the data");
    assert_eq!(qemus_under(&c1_id, &host2_dir), 1);

    // Live, across clusters, into the shared pool (the pool mapping): the
    // disk is mirrored into the pool; then back within the pool, where
    // nothing but memory moves.
    let p1_sum = write("p1");
    let p1_id = env.vm("p1")["id"].as_str().expect("id").to_string();
    migrate_wait(env, &["p1", "--host", "host-2", "--pool", "shared"]);
    let v = env.vm("p1");
    assert_eq!(host_of(env, "p1"), "host-2");
    assert!(v["pool_id"].is_string(), "in the shared pool now: {v}");
    assert!(shared.join("vms").join(&p1_id).join("disk.qcow2").is_file());
    assert_eq!(read("p1"), p1_sum);
    let j = migrate_wait(env, &["p1", "--host", "host-1"]);
    assert!(
        last_message_before_end(&j).contains(" 0B of disk sent"),
        "nothing but memory moved within the pool: {}",
        last_message_before_end(&j)
    );
    assert_eq!(host_of(env, "p1"), "host-1");
    assert_eq!(read("p1"), p1_sum);
    assert!(shared.join("vms").join(&p1_id).join("disk.qcow2").is_file());

    // Maintenance empties host 1 of its three (and p1), each moved live by
    // the scheduler; host 1 then holds nothing and takes no new VM.
    let out = env.cli(&["host", "maintenance", "host-1", "on", "--wait"]);
    assert!(
        out.status.success(),
        "maintenance: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "MEASURED maintenance:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for n in ["m1", "m2", "m3", "p1"] {
        assert_eq!(host_of(env, n), "host-2", "{n}");
        assert_eq!(env.vm(n)["state"], "running", "{n}");
    }
    wait_guest(env, "p1");
    assert_eq!(read("p1"), p1_sum);
    let h1 = env.json(&["host", "show", "host-1", "-o", "json"]);
    assert_eq!(h1["state"], "maintenance");
    assert_eq!(h1["allocated"]["vcpus"], 0, "{h1}");
    let out = env.cli(&[
        "vm",
        "create",
        "late",
        "--flavor",
        "tiny",
        "--image",
        "guest",
        "--project",
        "p",
        "--cluster",
        "default",
    ]);
    assert!(
        !out.status.success(),
        "nothing new lands on a host in maintenance"
    );
    env.json(&["host", "maintenance", "host-1", "off", "-o", "json"]);
    let h1 = env.json(&["host", "show", "host-1", "-o", "json"]);
    assert_eq!(h1["state"], "up");
}

/// A VM restored from a backup has no image under its disk: it moves live
/// (the destination makes a standalone disk and the whole disk is mirrored)
/// and cold (its one file travels) like any other, even once the backup it
/// came from is deleted.
#[test]
fn real_qemu_a_vm_restored_from_a_backup_migrates_live_and_cold() {
    let started = Instant::now();
    let w = world();
    let env = &w.env;
    let (_agent2, host2_dir) = w.add_host("host-2");
    let targets = w.home.path().join("backups");
    std::fs::create_dir_all(&targets).expect("mkdir");
    env.json(&[
        "backup",
        "target",
        "create",
        "t",
        targets.to_str().expect("utf8"),
        "-o",
        "json",
    ]);
    // Both VMs on host 1 (host 2 out of service meanwhile).
    env.json(&["host", "maintenance", "host-2", "on", "-o", "json"]);
    let _kill_orig = running_vm(env, "orig");
    let sum = line(
        env,
        "orig",
        "dd if=/dev/urandom of=/mnt/disk/keep bs=1M count=4 2>/dev/null && sync && \
         sha256sum /mnt/disk/keep | cut -d' ' -f1",
    );
    let b = env.json(&[
        "backup",
        "create",
        "orig",
        "--project",
        "p",
        "--wait",
        "-o",
        "json",
    ]);
    assert_eq!(b["status"], "succeeded", "{b}");
    let backup_id = b["id"].as_str().expect("backup id").to_string();
    let restored = env.json(&[
        "backup", "restore", &backup_id, "--as", "copy", "--wait", "-o", "json",
    ]);
    let copy_id = restored["id"].as_str().expect("VM id").to_string();
    let _kill_copy = KillVm(Some(copy_id.clone()));
    env.json(&["host", "maintenance", "host-2", "off", "-o", "json"]);
    wait_guest(env, "copy");
    assert_eq!(host_of(env, "copy"), "host-1");
    let read = || line(env, "copy", "sha256sum /mnt/disk/keep | cut -d' ' -f1");
    assert_eq!(read(), sum, "the restore holds the data");
    let boot_id = line(env, "copy", "cat /proc/sys/kernel/random/boot_id");
    // `orig` restored in place: its disk is standalone now too.
    env.json(&[
        "vm",
        "stop",
        "orig",
        "--project",
        "p",
        "--wait",
        "-o",
        "json",
    ]);
    env.json(&[
        "backup",
        "restore",
        &backup_id,
        "--in-place",
        "--wait",
        "-o",
        "json",
    ]);
    env.json(&[
        "vm",
        "start",
        "orig",
        "--project",
        "p",
        "--wait",
        "-o",
        "json",
    ]);
    wait_guest(env, "orig");
    // The backup goes: moving the VMs must not need it.
    env.json(&["backup", "delete", &backup_id, "-o", "json"]);
    let file = targets
        .join(b["vm_id"].as_str().expect("vm_id"))
        .join(format!("{backup_id}.qcow2"));
    assert!(!file.exists(), "{} is gone", file.display());

    // Live: the whole standalone disk is mirrored.
    let t = Instant::now();
    let j = migrate_wait(env, &["copy", "--host", "host-2"]);
    println!(
        "MEASURED live migration of a restored VM: {:?}; job says: {}",
        t.elapsed(),
        last_message_before_end(&j)
    );
    wait_guest(env, "copy");
    assert_eq!(host_of(env, "copy"), "host-2");
    assert_eq!(
        line(env, "copy", "cat /proc/sys/kernel/random/boot_id"),
        boot_id,
        "the same boot"
    );
    assert_eq!(read(), sum, "the data came along");
    wait_nothing_on(&copy_id, &w.agent_dir);
    migrate_wait(env, &["orig", "--host", "host-2"]);
    assert_eq!(host_of(env, "orig"), "host-2");
    assert_eq!(
        line(env, "orig", "sha256sum /mnt/disk/keep | cut -d' ' -f1"),
        sum,
        "the VM restored in place moved with its data"
    );

    // Cold, back to host 1: its one file travels.
    env.json(&[
        "vm",
        "stop",
        "copy",
        "--project",
        "p",
        "--wait",
        "-o",
        "json",
    ]);
    let t = Instant::now();
    let j = migrate_wait(env, &["copy", "--host", "host-1"]);
    println!(
        "MEASURED cold migration of a restored VM: {:?}; job says: {}",
        t.elapsed(),
        last_message_before_end(&j)
    );
    assert_eq!(host_of(env, "copy"), "host-1");
    assert!(!vm_dir_exists(&host2_dir, &copy_id), "host 2 let go of it");
    env.json(&[
        "vm",
        "start",
        "copy",
        "--project",
        "p",
        "--wait",
        "-o",
        "json",
    ]);
    wait_guest(env, "copy");
    assert_eq!(read(), sum, "the cold copy has the data");
    println!("MEASURED whole test: {:?}", started.elapsed());
}
