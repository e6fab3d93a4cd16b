//! A VM with attached volumes migrates live, end to end with real QEMU
//! (TCG) through the CLI: two hosts on one machine and a shared pool both
//! see. The VM has one volume in its host's own directory and one in the
//! pool. A cancelled migration leaves the VM and both volumes where they
//! were and nothing of them on the other host; the next one moves the VM
//! with the same boot, the local volume mirrored (same checksum, its file
//! now on the other host only, the store saying so) and the pool volume
//! opened where it is. The moved volume is written to and detached on its
//! new host; a stopped VM with a volume attached is refused a cold move.
//!
//! A VM with two snapshots moves live with them: each frozen layer copied
//! into the destination's file of the same name, the active one mirrored.
//! The guest keeps its boot and its files; on the new host one snapshot is
//! merged live and the VM reverted to the other: exactly its files. A cold
//! move of a VM with snapshots is refused before any job starts.

mod qemu_world;

use std::path::Path;
use std::time::{Duration, Instant};

use qemu_world::*;
use serde_json::Value;

/// The SHA-256 of the whole block device `dev` as the guest reads it.
fn device_sum(env: &Env, vm: &str, dev: &str) -> String {
    line(
        env,
        vm,
        &format!(
            "sync && echo 3 > /proc/sys/vm/drop_caches && dd if={dev} bs=1M 2>/dev/null | \
             sha256sum | cut -d' ' -f1"
        ),
    )
}

/// The guest's block device whose serial is the volume's (the first 20
/// hex digits of its id, what the driver passes as the virtio serial).
fn device_of(env: &Env, vm: &str, volume_id: &str) -> String {
    let serial: String = volume_id.chars().filter(|c| *c != '-').take(20).collect();
    wait_until("the guest to see the volume", BOOT, || {
        let out = line(
            env,
            vm,
            &format!(
                "for d in /sys/block/vd*; do [ \"$(cat $d/serial 2>/dev/null)\" = {serial} ] && \
                 echo /dev/${{d##*/}}; done; true"
            ),
        );
        if out.starts_with("/dev/vd") {
            Ok(out)
        } else {
            Err(out)
        }
    })
}

/// Migrates `vm` live to `target` and waits for the job to succeed; how
/// long it took and the job's last words before it ended.
fn migrate_to(env: &Env, vm: &str, target: &str) -> (Duration, String) {
    let t = Instant::now();
    let op = env.json(&[
        "vm",
        "migrate",
        vm,
        "--host",
        target,
        "--project",
        "p",
        "-o",
        "json",
    ]);
    let j = job_end(env, &op);
    assert_eq!(j["state"], "succeeded", "{j}");
    (t.elapsed(), last_message_before_end(&j))
}

fn volume_file(agent_dir: &Path, volume_id: &str) -> std::path::PathBuf {
    agent_dir
        .join("qemu/volumes")
        .join(format!("{volume_id}.qcow2"))
}

#[test]
fn real_qemu_a_vm_migrates_live_with_its_volumes() {
    let started = Instant::now();
    let w = world();
    let env = &w.env;
    let (_agent2, host2_dir) = w.add_host("host-2");
    let shared = w.home.path().join("shared-pool");
    std::fs::create_dir_all(&shared).expect("mkdir");
    env.json(&[
        "pool",
        "create",
        "shared",
        "--path",
        shared.to_str().expect("utf8"),
        "-o",
        "json",
    ]);
    wait_pool_seen(env, "shared", 2);

    let _kill = running_vm(env, "vv");
    let vm_id = env.vm("vv")["id"].as_str().expect("vm id").to_string();
    let source = host_of(env, "vv");
    let (target, source_dir, target_dir) = if source == "host-1" {
        ("host-2", w.agent_dir.clone(), host2_dir.clone())
    } else {
        ("host-1", host2_dir.clone(), w.agent_dir.clone())
    };
    let local = volume(env, &["create", "data", "--size", "16MiB"]);
    let local_id = local["id"].as_str().expect("volume id").to_string();
    let pooled = volume(
        env,
        &["create", "pdata", "--size", "8MiB", "--pool", "shared"],
    );
    let pooled_id = pooled["id"].as_str().expect("volume id").to_string();
    volume(env, &["attach", "data", "vv", "--wait"]);
    volume(env, &["attach", "pdata", "vv", "--wait"]);
    let local_dev = device_of(env, "vv", &local_id);
    let pooled_dev = device_of(env, "vv", &pooled_id);
    sh(
        env,
        "vv",
        &format!(
            "dd if=/dev/urandom of={local_dev} bs=1M count=12 conv=fsync 2>/dev/null && \
             dd if=/dev/urandom of={pooled_dev} bs=1M seek=2 count=4 conv=fsync 2>/dev/null && sync"
        ),
    );
    let local_sum = device_sum(env, "vv", &local_dev);
    let pooled_sum = device_sum(env, "vv", &pooled_dev);
    let disk_sum = write_file(env, "vv", "keep", 2);
    let boot_id = line(env, "vv", "cat /proc/sys/kernel/random/boot_id");
    assert!(volume_file(&source_dir, &local_id).is_file());

    // Cancelled midway (1 MiB/s cannot finish first): everything stays.
    let op = env.json(&[
        "vm",
        "migrate",
        "vv",
        "--host",
        target,
        "--project",
        "p",
        "--bandwidth",
        "1MiB",
        "-o",
        "json",
    ]);
    wait_until(
        "the migration to copy the volumes",
        Duration::from_secs(60),
        || {
            let j = job_of(env, &op);
            let m = last_message(&j);
            if m.contains("migrating") || m.contains("mirror") || m.contains("copying") {
                Ok(())
            } else if j["state"] != "running" && j["state"] != "queued" {
                panic!("the migration ended early: {j}")
            } else {
                Err(m)
            }
        },
    );
    assert!(
        volume_file(&target_dir, &local_id).is_file(),
        "the destination made its copy of the local volume to mirror into"
    );
    let job_id = op["job"]["id"].as_str().expect("job id");
    env.json(&["job", "cancel", job_id, "-o", "json"]);
    let j = job_end(env, &op);
    assert_eq!(j["state"], "cancelled", "{j}");
    assert_eq!(host_of(env, "vv"), source);
    wait_nothing_on(&vm_id, &target_dir);
    assert!(
        !volume_file(&target_dir, &local_id).exists(),
        "the cancelled attempt's copy of the volume is gone"
    );
    assert!(volume_file(&source_dir, &local_id).is_file());
    assert_eq!(device_sum(env, "vv", &local_dev), local_sum);

    // Live, with both volumes.
    let (took, said) = migrate_to(env, "vv", target);
    println!("MEASURED live migration with a 16 MiB local and an 8 MiB pool volume: {took:?}; job says: {said}");
    wait_guest(env, "vv");
    assert_eq!(host_of(env, "vv"), target);
    assert_eq!(
        line(env, "vv", "cat /proc/sys/kernel/random/boot_id"),
        boot_id,
        "the same boot"
    );
    // The devices keep their names: same PCI slots on the destination.
    assert_eq!(device_of(env, "vv", &local_id), local_dev);
    assert_eq!(device_of(env, "vv", &pooled_id), pooled_dev);
    assert_eq!(device_sum(env, "vv", &local_dev), local_sum, "local volume");
    assert_eq!(
        device_sum(env, "vv", &pooled_dev),
        pooled_sum,
        "pool volume"
    );
    assert_eq!(
        line(env, "vv", "sha256sum /mnt/disk/keep | cut -d' ' -f1"),
        disk_sum
    );
    wait_nothing_on(&vm_id, &source_dir);
    assert!(
        !volume_file(&source_dir, &local_id).exists(),
        "the local volume left the source"
    );
    assert!(volume_file(&target_dir, &local_id).is_file());
    let shown = volume(env, &["show", "data"]);
    let target_id = env.json(&["host", "show", target, "-o", "json"])["id"].clone();
    assert_eq!(shown["host_id"], target_id, "{shown}");
    assert_eq!(shown["status"], "attached", "{shown}");

    // The moved volume is the VM's on its new host: written, detached.
    sh(
        env,
        "vv",
        &format!("dd if=/dev/urandom of={local_dev} bs=1M count=1 conv=fsync 2>/dev/null"),
    );
    volume(env, &["detach", "data", "--wait"]);
    let shown = volume(env, &["show", "data"]);
    assert_eq!(shown["status"], "available", "{shown}");

    // Cold with a volume attached: refused before anything moves.
    env.json(&["vm", "stop", "vv", "--project", "p", "--wait", "-o", "json"]);
    let out = env.cli(&["vm", "migrate", "vv", "--host", &source, "--project", "p"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a cold move with a volume attached");
    assert!(stderr.contains("volumes_attached"), "{stderr}");
    println!("MEASURED whole test: {:?}", started.elapsed());
}

fn snapshot(env: &Env, args: &[&str]) -> Value {
    let mut all = vec!["snapshot"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--project", "p", "--wait", "-o", "json"]);
    env.json(&all)
}

/// `checksum  name` of each of the files a, b, c on the VM's own disk.
fn files(env: &Env, vm: &str) -> String {
    sh(
        env,
        vm,
        "cd /mnt/disk && for f in a b c; do [ -f $f ] && sha256sum $f; done; true",
    )
}

#[test]
fn real_qemu_a_vm_migrates_live_with_its_snapshots() {
    let started = Instant::now();
    let w = world();
    let env = &w.env;
    let (_agent2, host2_dir) = w.add_host("host-2");
    let _kill = running_vm(env, "sn");
    let vm_id = env.vm("sn")["id"].as_str().expect("vm id").to_string();
    let source = host_of(env, "sn");
    let (target, source_dir, target_dir) = if source == "host-1" {
        ("host-2", w.agent_dir.clone(), host2_dir.clone())
    } else {
        ("host-1", host2_dir.clone(), w.agent_dir.clone())
    };
    let a = write_file(env, "sn", "a", 2);
    snapshot(env, &["create", "sn", "s1"]);
    let b = write_file(env, "sn", "b", 2);
    snapshot(env, &["create", "sn", "s2"]);
    let c = write_file(env, "sn", "c", 2);
    let all = files(env, "sn");
    for sum in [&a, &b, &c] {
        assert!(all.contains(sum.as_str()), "{all}");
    }
    let boot_id = line(env, "sn", "cat /proc/sys/kernel/random/boot_id");

    let (took, said) = migrate_to(env, "sn", target);
    println!(
        "MEASURED live migration with 2 snapshots (2 MiB each layer): {took:?}; job says: {said}"
    );
    wait_guest(env, "sn");
    assert_eq!(host_of(env, "sn"), target);
    assert_eq!(
        line(env, "sn", "cat /proc/sys/kernel/random/boot_id"),
        boot_id,
        "the same boot"
    );
    assert_eq!(files(env, "sn"), all, "the files came along");
    wait_nothing_on(&vm_id, &source_dir);
    let layers = std::fs::read_dir(target_dir.join("qemu/vms").join(&vm_id))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.starts_with("disk") && n.ends_with(".qcow2")
                })
                .count()
        })
        .unwrap_or(0);
    assert_eq!(layers, 3, "the bottom layer, s2's layer and the active one");
    let names: Vec<String> = env.json(&["snapshot", "list", "sn", "--project", "p", "-o", "json"])
        ["items"]
        .as_array()
        .map(|v| {
            v.iter()
                .map(|s| s["name"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(names, vec!["s1", "s2"]);

    // On the new host: s1 merged live, then a revert to s2 gives exactly
    // a and b.
    let gone = snapshot(env, &["delete", "sn", "s1"]);
    assert_eq!(gone["deleted"], "s1", "{gone}");
    assert_eq!(files(env, "sn"), all, "after the live merge");
    env.json(&["vm", "stop", "sn", "--project", "p", "--wait", "-o", "json"]);
    let out = env.cli(&["vm", "migrate", "sn", "--host", &source, "--project", "p"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a cold move with a snapshot");
    assert!(stderr.contains("vm_has_snapshots"), "{stderr}");
    snapshot(env, &["revert", "sn", "s2"]);
    env.json(&[
        "vm",
        "start",
        "sn",
        "--project",
        "p",
        "--wait",
        "-o",
        "json",
    ]);
    wait_guest(env, "sn");
    let reverted = files(env, "sn");
    assert!(
        reverted.contains(a.as_str())
            && reverted.contains(b.as_str())
            && !reverted.contains(c.as_str()),
        "s2 holds a and b only: {reverted}"
    );
    println!("MEASURED whole test: {:?}", started.elapsed());
}
