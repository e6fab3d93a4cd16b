//! Storage end to end with real QEMU (TCG), through the CLI. Backups: a guest writes
//! known data (through its guest agent), a full backup is taken, the guest
//! writes more, an incremental one, the VM is stopped and started (its
//! change tracking must survive), another incremental; then every restore
//! point is restored into a new VM whose files must have exactly the
//! checksums written up to that point, and no later file. Interrupted
//! backups. Snapshots: taken live, deleted (merged) live, reverted, with the
//! guest's data checked after each, also across an attached volume.
//! Volumes: hot-plugged, grown, kept.

mod qemu_world;

use std::time::Instant;

use qemu_world::*;
use serde_json::Value;

/// Most a backup may hold beyond the data written in the guest: file-system
/// metadata (inode tables, journal, bitmaps), rounded up to the 64 KiB
/// granularity of the change tracking.
const METADATA_SLACK: u64 = 1024 * 1024;

/// Stops the VM and starts it again, each job waited for.
fn restart_vm(env: &Env, name: &str) {
    for verb in ["stop", "start"] {
        env.json(&["vm", verb, name, "--project", "p", "--wait", "-o", "json"]);
    }
}

/// The checksum of every file on the guest's data disk, by name.
fn checksums(env: &Env, vm: &str) -> Vec<(String, String)> {
    let out = sh(
        env,
        vm,
        "cd /mnt/disk && for f in a b c; do [ -f $f ] && sha256sum $f; done; true",
    );
    out.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((
                w.nth(1)?.to_string(),
                l.split_whitespace().next()?.to_string(),
            ))
        })
        .collect()
}

fn backup(env: &Env, vm: &str) -> Value {
    let t = Instant::now();
    let b = env.json(&[
        "backup",
        "create",
        vm,
        "--project",
        "p",
        "--wait",
        "-o",
        "json",
    ]);
    println!(
        "MEASURED backup {}: mode {} data {} file {} in {:?}",
        b["id"],
        b["mode"],
        b["data_bytes"],
        b["file_bytes"],
        t.elapsed()
    );
    assert_eq!(b["status"], "succeeded", "{b}");
    b
}

fn data_bytes(b: &Value) -> u64 {
    b["data_bytes"].as_u64().expect("data_bytes")
}

#[test]
fn real_qemu_incremental_backups_survive_a_restart_and_restore_exactly() {
    let w = world();
    let env = &w.env;
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
    let _kill = running_vm(env, "web");

    // A full backup with one file.
    let a = write_file(env, "web", "a", 1);
    let full = backup(env, "web");
    assert_eq!(full["mode"], "full", "{full}");
    assert!(full["fallback_reason"].is_null(), "{full}");

    // An incremental one holds what changed: 2 MiB and a little metadata.
    let b = write_file(env, "web", "b", 2);
    let inc1 = backup(env, "web");
    assert_eq!(inc1["mode"], "incremental", "{inc1}");
    assert_eq!(inc1["parent_id"], full["id"], "{inc1}");
    let d = data_bytes(&inc1);
    assert!(
        (2 << 20..=(2 << 20) + METADATA_SLACK).contains(&d),
        "2 MiB written, {d} bytes backed up"
    );

    // Stop and start: the change tracking survives (persistent bitmap).
    restart_vm(env, "web");
    wait_guest(env, "web");
    let c = write_file(env, "web", "c", 1);
    let inc2 = backup(env, "web");
    assert_eq!(inc2["mode"], "incremental", "{inc2}");
    assert!(inc2["fallback_reason"].is_null(), "{inc2}");
    assert_eq!(inc2["parent_id"], inc1["id"], "{inc2}");
    let d = data_bytes(&inc2);
    assert!(
        (1 << 20..=(1 << 20) + METADATA_SLACK).contains(&d),
        "1 MiB written after a restart, {d} bytes backed up"
    );

    // The newest restore point reads back intact, chain included.
    let id2 = inc2["id"].as_str().expect("id");
    let v = env.json(&["backup", "verify", id2, "-o", "json"]);
    assert_eq!(v["ok"], true, "{v}");

    // Every restore point into a new VM: exactly the files of its time.
    let list = env.json(&["backup", "list", "web", "--project", "p", "-o", "json"]);
    assert_eq!(list["items"].as_array().map(Vec::len), Some(3), "{list}");
    let points = [
        (&full, "r-full", vec![("a", &a)]),
        (&inc1, "r-inc1", vec![("a", &a), ("b", &b)]),
        (&inc2, "r-inc2", vec![("a", &a), ("b", &b), ("c", &c)]),
    ];
    for (point, name, want) in points {
        let t = Instant::now();
        let id = point["id"].as_str().expect("id");
        let restored = env.json(&[
            "backup", "restore", id, "--as", name, "--wait", "-o", "json",
        ]);
        let _kill = KillVm(restored["id"].as_str().map(str::to_string));
        wait_guest(env, name);
        let got = checksums(env, name);
        let want: Vec<(String, String)> = want
            .into_iter()
            .map(|(f, s)| (f.to_string(), s.clone()))
            .collect();
        assert_eq!(got, want, "restore point {id} restored as {name}");
        println!(
            "MEASURED restore {name}: booted and checked in {:?}",
            t.elapsed()
        );
        env.json(&[
            "vm",
            "delete",
            name,
            "--project",
            "p",
            "--wait",
            "-o",
            "json",
        ]);
    }

    // Retention keeps the newest restore point only: the two before it are
    // merged into it, oldest first, and it becomes a whole (full) backup
    // that still restores exactly a, b and c.
    env.json(&[
        "backup",
        "policy",
        "set",
        "web",
        "--project",
        "p",
        "--keep-last",
        "1",
        "-o",
        "json",
    ]);
    let kept = wait_until("retention to delete the older restore points", BOOT, || {
        let list = env.json(&["backup", "list", "web", "--project", "p", "-o", "json"]);
        match list["items"].as_array().map(Vec::as_slice) {
            Some([one]) => Ok(one.clone()),
            _ => Err(list.to_string()),
        }
    });
    assert_eq!(kept["id"], inc2["id"], "{kept}");
    assert_eq!(kept["mode"], "full", "{kept}");
    assert!(kept["parent_id"].is_null(), "{kept}");
    assert!(!std::path::Path::new(full["file"].as_str().unwrap_or_default()).exists());
    assert!(!std::path::Path::new(inc1["file"].as_str().unwrap_or_default()).exists());
    let v = env.json(&["backup", "verify", id2, "-o", "json"]);
    assert_eq!(v["ok"], true, "{v}");
    let restored = env.json(&[
        "backup", "restore", id2, "--as", "r-kept", "--wait", "-o", "json",
    ]);
    let _kill = KillVm(restored["id"].as_str().map(str::to_string));
    wait_guest(env, "r-kept");
    let want: Vec<(String, String)> = [("a", &a), ("b", &b), ("c", &c)]
        .into_iter()
        .map(|(f, s)| (f.to_string(), s.clone()))
        .collect();
    assert_eq!(checksums(env, "r-kept"), want, "the merged restore point");
    // The VM's next backup builds on the kept one.
    let next = backup(env, "web");
    assert_eq!(next["mode"], "incremental", "{next}");
    assert_eq!(next["parent_id"], inc2["id"], "{next}");
}

/// Waits until the backup job is copying (its progress past the start).
fn wait_copying(env: &Env, job: &str) {
    wait_until("the backup to be copying", BOOT, || {
        let j = env.json(&["job", "show", job, "-o", "json"]);
        let p = j["progress"].as_u64().unwrap_or(0);
        if j["state"] == "running" && p > 10 && p < 95 {
            Ok(())
        } else {
            Err(format!("{} {}%: {}", j["state"], p, j["current_step"]))
        }
    });
}

fn job_state(env: &Env, job: &str) -> Value {
    wait_until("the job to end", BOOT * 2, || {
        let j = env.json(&["job", "show", job, "-o", "json"]);
        match j["state"].as_str() {
            Some("succeeded" | "failed" | "cancelled") => Ok(j),
            _ => Err(format!("{}: {}", j["state"], j["current_step"])),
        }
    })
}

fn start_backup(env: &Env, vm: &str) -> (String, String) {
    let op = env.json(&["backup", "create", vm, "--project", "p", "-o", "json"]);
    (
        op["backup"]["id"].as_str().expect("backup id").to_string(),
        op["job"]["id"].as_str().expect("job id").to_string(),
    )
}

/// An agent killed in the middle of a backup: the host is handed the
/// backup again when its agent is back and takes it from the start; the
/// restore point is good. A guest that powers off in the middle of a
/// backup: the backup fails, is never a restore point, and the next one is
/// incremental to the last good one and holds everything since.
#[test]
fn real_qemu_interrupted_backups_resume_or_fail_cleanly() {
    let World {
        home,
        server: _server,
        env,
        agent,
        agent_dir,
        ..
    } = world();
    let targets = home.path().join("backups");
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
    let _kill = running_vm(&env, "web");
    let a = write_file(&env, "web", "a", 1);
    let full = backup(&env, "web");

    // From here backups are slowed to 512 KiB/s (the full one above copied
    // the whole disk, zeros included, at full speed), so they last seconds
    // and can be interrupted. VMs outlive their agent.
    drop(agent);
    let agent_dir_s = agent_dir.display().to_string();
    let mut args = agent_args(&env.url, &agent_dir_s, None);
    args.extend(["--backup-bandwidth", "512KiB"]);
    let agent = env.spawn("agent", &args, home.path().join("agent-2.log"));

    // The agent SIGKILLed mid-copy, then started again.
    let b = write_file(&env, "web", "b", 3);
    let (inc_id, job) = start_backup(&env, "web");
    wait_copying(&env, &job);
    drop(agent);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let agent = env.spawn("agent", &args, home.path().join("agent-3.log"));
    let j = job_state(&env, &job);
    assert_eq!(j["state"], "succeeded", "{j}");
    let inc = env.json(&["backup", "show", &inc_id, "-o", "json"]);
    assert_eq!(inc["mode"], "incremental", "{inc}");
    assert_eq!(inc["parent_id"], full["id"], "{inc}");
    assert!(data_bytes(&inc) >= 3 << 20, "{inc}");
    let v = env.json(&["backup", "verify", &inc_id, "-o", "json"]);
    assert_eq!(v["ok"], true, "{v}");
    println!("MEASURED backup resumed after an agent kill: {inc}");

    // The guest powers off mid-copy: the backup fails and is no restore point.
    let c = write_file(&env, "web", "c", 3);
    let (bad_id, job) = start_backup(&env, "web");
    wait_copying(&env, &job);
    let _ = env.cli(&[
        "vm",
        "exec",
        "web",
        "--project",
        "p",
        "--timeout",
        "5",
        "--",
        "sh",
        "-c",
        "sync; poweroff -f",
    ]);
    let j = job_state(&env, &job);
    assert_eq!(j["state"], "failed", "{j}");
    let bad = env.json(&["backup", "show", &bad_id, "-o", "json"]);
    assert_eq!(bad["status"], "failed", "{bad}");
    assert!(bad["sha256"].is_null(), "{bad}");
    println!(
        "MEASURED backup failed as the guest powered off: {}",
        bad["error"]
    );
    assert!(
        !std::path::Path::new(bad["file"].as_str().unwrap_or_default()).exists(),
        "the failed backup's file is left: {bad}"
    );

    // The next backup builds on the last good one and holds c.
    wait_until("the VM to be seen stopped", BOOT, || {
        let v = env.vm("web");
        if v["state"] == "stopped" {
            Ok(())
        } else {
            Err(v["state"].to_string())
        }
    });
    env.json(&[
        "vm",
        "start",
        "web",
        "--project",
        "p",
        "--wait",
        "-o",
        "json",
    ]);
    wait_guest(&env, "web");
    let next = backup(&env, "web");
    assert_eq!(next["mode"], "incremental", "{next}");
    assert_eq!(next["parent_id"], inc["id"], "{next}");
    assert!(data_bytes(&next) >= 3 << 20, "{next}");
    let id = next["id"].as_str().expect("id");
    let restored = env.json(&[
        "backup", "restore", id, "--as", "back", "--wait", "-o", "json",
    ]);
    let _kill2 = KillVm(restored["id"].as_str().map(str::to_string));
    wait_guest(&env, "back");
    let want: Vec<(String, String)> = [("a", a), ("b", b), ("c", c)]
        .into_iter()
        .map(|(f, s)| (f.to_string(), s))
        .collect();
    assert_eq!(checksums(&env, "back"), want);
    drop(agent);
}

fn snapshot(env: &Env, args: &[&str]) -> Value {
    let mut all = vec!["snapshot"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--project", "p", "--wait", "-o", "json"]);
    env.json(&all)
}

/// Snapshots on a running real VM: taken live with the guest's file
/// systems frozen, the oldest deleted live (its layer merged while the VM
/// runs: no reboot, data intact), then the VM stopped and reverted to the
/// newer one: exactly the files of that moment.
#[test]
fn real_qemu_snapshots_live_take_merge_and_revert_keep_the_data() {
    let w = world();
    let env = &w.env;
    let _kill = running_vm(env, "web");
    let boots = |env: &Env| {
        sh(env, "web", "cat /proc/uptime")
            .split('.')
            .next()
            .unwrap_or("0")
            .parse::<u64>()
            .unwrap_or(0)
    };

    let a = write_file(env, "web", "a", 1);
    let s1 = snapshot(env, &["create", "web", "s1"]);
    assert_eq!(s1["status"], "ready", "{s1}");
    assert_eq!(
        s1["quiesced"], true,
        "the guest agent froze the file systems: {s1}"
    );
    let b = write_file(env, "web", "b", 1);
    let s2 = snapshot(env, &["create", "web", "s2"]);
    assert_eq!(s2["status"], "ready", "{s2}");
    let c = write_file(env, "web", "c", 1);

    // Live delete: the VM keeps running (its uptime keeps growing) and its
    // data is whole.
    let up_before = boots(env);
    let t = Instant::now();
    let gone = snapshot(env, &["delete", "web", "s1"]);
    println!(
        "MEASURED live snapshot delete (merge) through the API: {:?}",
        t.elapsed()
    );
    assert_eq!(gone["deleted"], "s1", "{gone}");
    assert_eq!(env.vm("web")["state"], "running");
    assert!(
        boots(env) >= up_before,
        "the guest rebooted during the merge"
    );
    let all: Vec<(String, String)> = [("a", &a), ("b", &b), ("c", &c)]
        .into_iter()
        .map(|(f, s)| (f.to_string(), s.clone()))
        .collect();
    assert_eq!(checksums(env, "web"), all, "after the live merge");
    let list = env.json(&["snapshot", "list", "web", "--project", "p", "-o", "json"]);
    let names: Vec<&str> = list["items"]
        .as_array()
        .map(|v| v.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, vec!["s2"], "{list}");

    // Revert (stopped) to s2: a and b, not c.
    env.json(&[
        "vm",
        "stop",
        "web",
        "--project",
        "p",
        "--wait",
        "-o",
        "json",
    ]);
    let reverted = snapshot(env, &["revert", "web", "s2"]);
    assert_eq!(reverted["state"], "stopped", "{reverted}");
    env.json(&[
        "vm",
        "start",
        "web",
        "--project",
        "p",
        "--wait",
        "-o",
        "json",
    ]);
    wait_guest(env, "web");
    let at_s2: Vec<(String, String)> = [("a", &a), ("b", &b)]
        .into_iter()
        .map(|(f, s)| (f.to_string(), s.clone()))
        .collect();
    assert_eq!(checksums(env, "web"), at_s2, "after reverting to s2");

    // A revert of a running VM is refused with a clear error.
    let out = env.cli(&["snapshot", "revert", "web", "s2", "--project", "p"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vm_not_stopped"), "{err}");
}

/// The VM's snapshots as (name, scheduled, status), oldest first.
fn snapshot_names(env: &Env, vm: &str) -> Vec<(String, bool, String)> {
    let list = env.json(&["snapshot", "list", vm, "--project", "p", "-o", "json"]);
    list["items"]
        .as_array()
        .map(|v| {
            v.iter()
                .map(|s| {
                    (
                        s["name"].as_str().unwrap_or_default().to_string(),
                        s["scheduled"] == true,
                        s["status"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A snapshot policy on a running real VM: its first snapshot comes at
/// once, `policy run` takes more, and once it holds more than `keep` the
/// controller merges its oldest away by itself (live), never the
/// operator's; the merged chain still reverts to the exact data of a kept
/// snapshot.
#[test]
fn real_qemu_a_snapshot_policy_takes_and_rotates_its_own_snapshots() {
    let w = world();
    let env = &w.env;
    let _kill = running_vm(env, "web");
    let a = write_file(env, "web", "a", 1);
    snapshot(env, &["create", "web", "mine"]);

    let t = Instant::now();
    let p = env.json(&[
        "snapshot",
        "policy",
        "set",
        "web",
        "--every",
        "60s",
        "--keep",
        "2",
        "--project",
        "p",
        "-o",
        "json",
    ]);
    assert_eq!(
        (p["every_secs"].as_u64(), p["keep"].as_u64()),
        (Some(60), Some(2)),
        "{p}"
    );
    let first = wait_until("the first scheduled snapshot", BOOT, || {
        let names = snapshot_names(env, "web");
        match names.iter().find(|(_, auto, st)| *auto && st == "ready") {
            Some((n, _, _)) => Ok(n.clone()),
            None => Err(format!("{names:?}")),
        }
    });
    println!(
        "MEASURED first scheduled snapshot ready {:?} after the policy",
        t.elapsed()
    );
    assert!(first.starts_with("auto-"), "{first}");

    let b = write_file(env, "web", "b", 1);
    let second = snapshot(env, &["policy", "run", "web"]);
    assert_eq!(second["scheduled"], true, "{second}");
    let second = second["name"].as_str().expect("name").to_string();
    let c = write_file(env, "web", "c", 1);
    let third = snapshot(env, &["policy", "run", "web"]);
    let third = third["name"].as_str().expect("name").to_string();

    // Three of its own, keep 2: the oldest goes, merged live; `mine` stays.
    let t = Instant::now();
    let want = vec![
        ("mine".to_string(), false, "ready".to_string()),
        (second.clone(), true, "ready".to_string()),
        (third.clone(), true, "ready".to_string()),
    ];
    wait_until("the policy to merge its oldest snapshot", BOOT, || {
        let names = snapshot_names(env, "web");
        if names == want {
            Ok(())
        } else {
            Err(format!("{names:?}"))
        }
    });
    println!(
        "MEASURED rotation: the oldest merged away within {:?}",
        t.elapsed()
    );
    assert_eq!(env.vm("web")["state"], "running");
    let files = |pairs: &[(&str, &String)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(f, s)| (f.to_string(), (*s).clone()))
            .collect()
    };
    assert_eq!(
        checksums(env, "web"),
        files(&[("a", &a), ("b", &b), ("c", &c)]),
        "after the merge"
    );
    // Keep is checked: 0 and more than the limit allows are refused.
    let out = env.cli(&[
        "snapshot",
        "policy",
        "set",
        "web",
        "--keep",
        "16",
        "--project",
        "p",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("keep must be between 1 and 15"));

    // The merged chain reverts to the kept snapshot's exact data; the policy
    // goes and its snapshots stay.
    env.json(&[
        "snapshot",
        "policy",
        "delete",
        "web",
        "--project",
        "p",
        "-o",
        "json",
    ]);
    env.json(&[
        "vm",
        "stop",
        "web",
        "--project",
        "p",
        "--wait",
        "-o",
        "json",
    ]);
    snapshot(env, &["revert", "web", &second]);
    env.json(&[
        "vm",
        "start",
        "web",
        "--project",
        "p",
        "--wait",
        "-o",
        "json",
    ]);
    wait_guest(env, "web");
    assert_eq!(
        checksums(env, "web"),
        files(&[("a", &a), ("b", &b)]),
        "reverted to {second}"
    );
}

/// Writes 1 MiB of random data at the start of the guest's /dev/vdb.
fn vdb_write(env: &Env, vm: &str) {
    sh(
        env,
        vm,
        "dd if=/dev/urandom of=/dev/vdb bs=1M count=1 conv=notrunc 2>/dev/null && sync",
    );
}

/// SHA-256 of the first MiB of the guest's /dev/vdb, read from the disk
/// (the guest's page cache dropped first).
fn vdb_sum(env: &Env, vm: &str) -> String {
    sh(
        env,
        vm,
        "sync && echo 3 > /proc/sys/vm/drop_caches && \
         dd if=/dev/vdb bs=1M count=1 2>/dev/null | sha256sum",
    )
    .split_whitespace()
    .next()
    .unwrap_or_default()
    .to_string()
}

/// A snapshot covers the VM's disk and its attached volume, through the
/// CLI: `snapshot list` names the volume, a detach is refused with `409
/// volume_in_snapshot` while a snapshot covers it, a live delete (merge)
/// keeps the newest data on both disks, a revert brings both back to the
/// snapshot, and once no snapshot covers it the volume detaches.
#[test]
fn real_qemu_snapshots_cover_the_attached_volume() {
    let w = world();
    let env = &w.env;
    let _kill = running_vm(env, "web");
    let v = volume(env, &["create", "data", "--size", "16MiB"]);
    let volume_id = v["id"].as_str().unwrap_or_default().to_string();
    volume(env, &["attach", "data", "web", "--wait"]);
    wait_vdb(env, "web", Some(16 << 20));

    let a = write_file(env, "web", "a", 1);
    vdb_write(env, "web");
    let s1 = snapshot(env, &["create", "web", "s1"]);
    assert_eq!(s1["status"], "ready", "{s1}");
    assert_eq!(s1["volumes"], serde_json::json!([volume_id]), "{s1}");
    let list = env.json(&["snapshot", "list", "web", "--project", "p", "-o", "json"]);
    assert_eq!(
        list["items"][0]["volumes"],
        serde_json::json!([volume_id]),
        "{list}"
    );

    let b = write_file(env, "web", "b", 1);
    vdb_write(env, "web");
    let vol_now = vdb_sum(env, "web");
    let out = env.cli(&["volume", "detach", "data", "--project", "p"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a covered volume must not detach");
    assert!(
        err.contains("volume_in_snapshot") && err.contains("\"s1\""),
        "{err}"
    );
    assert_eq!(volume(env, &["show", "data"])["status"], "attached");

    let t = Instant::now();
    snapshot(env, &["delete", "web", "s1"]);
    println!(
        "MEASURED live snapshot delete (merge) of the disk and a volume through the API: {:?}",
        t.elapsed()
    );
    assert_eq!(env.vm("web")["state"], "running");
    let ab: Vec<(String, String)> = [("a", &a), ("b", &b)]
        .into_iter()
        .map(|(f, s)| (f.to_string(), s.clone()))
        .collect();
    assert_eq!(checksums(env, "web"), ab, "VM disk after the live merge");
    assert_eq!(vdb_sum(env, "web"), vol_now, "volume after the live merge");

    let s2 = snapshot(env, &["create", "web", "s2"]);
    assert_eq!(s2["volumes"], serde_json::json!([volume_id]), "{s2}");
    write_file(env, "web", "c", 1);
    vdb_write(env, "web");
    assert_ne!(vdb_sum(env, "web"), vol_now);

    env.json(&[
        "vm",
        "stop",
        "web",
        "--project",
        "p",
        "--wait",
        "-o",
        "json",
    ]);
    snapshot(env, &["revert", "web", "s2"]);
    env.json(&[
        "vm",
        "start",
        "web",
        "--project",
        "p",
        "--wait",
        "-o",
        "json",
    ]);
    wait_guest(env, "web");
    wait_vdb(env, "web", Some(16 << 20));
    assert_eq!(checksums(env, "web"), ab, "VM disk at s2");
    assert_eq!(vdb_sum(env, "web"), vol_now, "volume at s2");

    snapshot(env, &["delete", "web", "s2"]);
    let v = volume(env, &["detach", "data", "--wait"]);
    assert_eq!(v["status"], "available", "{v}");
    wait_vdb(env, "web", None);
}

/// The guest's view of its second disk: its size in bytes, or `None` while
/// it has none.
fn vdb_size(env: &Env, vm: &str) -> Option<u64> {
    let out = sh(
        env,
        vm,
        "if [ -b /dev/vdb ]; then echo $(( $(cat /sys/block/vdb/size) * 512 )); else echo none; fi",
    );
    out.trim().parse().ok()
}

fn wait_vdb(env: &Env, vm: &str, want: Option<u64>) {
    wait_until("the guest to see its volume as expected", BOOT, || {
        let got = vdb_size(env, vm);
        if got == want {
            Ok(())
        } else {
            Err(format!("{got:?}, want {want:?}"))
        }
    });
}

/// A data volume on a running real VM: hot-plugged (the guest sees a new
/// disk of the right size), written, grown live, refused deletion while
/// attached, hot-unplugged, attached again with its data, kept across a
/// VM restart, then deleted.
#[test]
fn real_qemu_volumes_hot_plug_grow_and_keep_their_data() {
    let w = world();
    let env = &w.env;
    let _kill = running_vm(env, "web");

    let v = volume(env, &["create", "data", "--size", "16MiB"]);
    assert_eq!(v["status"], "available", "{v}");
    let t = Instant::now();
    let v = volume(env, &["attach", "data", "web", "--wait"]);
    println!(
        "MEASURED volume attach (hot-plug) through the API: {:?}",
        t.elapsed()
    );
    assert_eq!(v["status"], "attached", "{v}");
    wait_vdb(env, "web", Some(16 << 20));
    let serial = sh(env, "web", "cat /sys/block/vdb/serial");
    let id: String = v["id"].as_str().unwrap_or_default().replace('-', "");
    assert!(
        id.starts_with(serial.trim()),
        "serial {serial:?} of volume {id}"
    );

    let sum = sh(
        env,
        "web",
        "dd if=/dev/urandom of=/dev/vdb bs=1M count=1 2>/dev/null && sync && \
         dd if=/dev/vdb bs=1M count=1 2>/dev/null | sha256sum",
    );
    let read_back = |env: &Env| {
        sh(
            env,
            "web",
            "dd if=/dev/vdb bs=1M count=1 2>/dev/null | sha256sum",
        )
    };

    let v = volume(env, &["resize", "data", "--size", "32MiB"]);
    assert_eq!(v["size_bytes"], 32u64 << 20, "{v}");
    wait_vdb(env, "web", Some(32 << 20));

    let out = env.cli(&["volume", "delete", "data", "--project", "p"]);
    assert!(
        !out.status.success(),
        "deleting an attached volume must fail"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("volume_attached"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let t = Instant::now();
    let v = volume(env, &["detach", "data", "--wait"]);
    println!(
        "MEASURED volume detach (hot-unplug) through the API: {:?}",
        t.elapsed()
    );
    assert_eq!(v["status"], "available", "{v}");
    wait_vdb(env, "web", None);

    volume(env, &["attach", "data", "web", "--wait"]);
    wait_vdb(env, "web", Some(32 << 20));
    assert_eq!(
        read_back(env),
        sum,
        "the data after detaching and attaching again"
    );

    restart_vm(env, "web");
    wait_guest(env, "web");
    wait_vdb(env, "web", Some(32 << 20));
    assert_eq!(read_back(env), sum, "the data after a VM restart");

    volume(env, &["detach", "data", "--wait"]);
    let gone = volume(env, &["delete", "data"]);
    assert_eq!(gone["deleted"], "data", "{gone}");
    let list = volume(env, &["list"]);
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0), "{list}");
}
