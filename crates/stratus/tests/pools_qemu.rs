//! Shared storage pools end to end with real QEMU (TCG), through the CLI:
//! two agents with their own data directories see one directory as the pool
//! `shared` (as two hosts would see one NFS export); a VM created in the
//! pool boots with its disk, its snapshot layers and its image there; the
//! scheduler counts the pool's capacity and places a pool's VMs only on
//! hosts that see it; deleting the VM gives everything back. A volume in the
//! pool is written by a VM on one host and read back by a VM on the other.

mod qemu_world;

use std::path::Path;
use std::time::{Duration, Instant};

use qemu_world::*;
use serde_json::Value;

fn pool(env: &Env, name: &str) -> Value {
    env.json(&["pool", "show", name, "-o", "json"])
}

/// Waits until `n` hosts report the pool usable; the pool as then shown.
fn wait_seen(env: &Env, name: &str, n: usize) -> Value {
    wait_until(
        &format!("{n} hosts to see pool {name}"),
        Duration::from_secs(30),
        || {
            let p = pool(env, name);
            let ok = p["hosts"]
                .as_array()
                .map(|h| h.iter().filter(|h| h["error"].is_null()).count())
                .unwrap_or(0);
            if ok == n && p["capacity_bytes"].as_u64().unwrap_or(0) > 0 {
                Ok(p)
            } else {
                Err(p.to_string())
            }
        },
    )
}

fn fails_with(env: &Env, args: &[&str], needle: &str) {
    let out = env.cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "stratus {args:?} should fail");
    assert!(
        stderr.contains(needle),
        "stratus {args:?}: expected {needle:?} in: {stderr}"
    );
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[test]
fn real_qemu_a_shared_pool_holds_disks_both_hosts_see_and_caps_placement() {
    let w = world();
    let env = &w.env;
    let (_agent2, host2_dir) = w.add_host("host-2");

    // The pool: one directory, seen by both hosts.
    let shared = w.home.path().join("nfs-export");
    std::fs::create_dir_all(&shared).expect("mkdir");
    let shared_s = shared.display().to_string();
    fails_with(
        env,
        &["pool", "create", "local", "--path", &shared_s],
        "`local` names every host's own pool",
    );
    fails_with(
        env,
        &["pool", "create", "rel", "--path", "relative/dir"],
        "is not an absolute directory",
    );
    env.json(&[
        "pool", "create", "shared", "--path", &shared_s, "-o", "json",
    ]);
    let p = wait_seen(env, "shared", 2);
    println!(
        "MEASURED pool shared: capacity {} available {}",
        p["capacity_bytes"], p["available_bytes"]
    );
    assert_eq!(p["allocated_bytes"], 0);
    assert!(shared.join(".stratus-pool").is_file());
    for h in ["host-1", "host-2"] {
        let host = env.json(&["host", "show", h, "-o", "json"]);
        assert_eq!(host["pools"], serde_json::json!(["shared"]), "{host}");
    }

    // A pool no host sees: placement says why nothing fits.
    env.json(&[
        "pool",
        "create",
        "unmounted",
        "--path",
        &w.home.path().join("not-mounted").display().to_string(),
        "-o",
        "json",
    ]);
    wait_until(
        "both hosts to report the unmounted pool",
        Duration::from_secs(30),
        || {
            let p = pool(env, "unmounted");
            let failed = p["hosts"]
                .as_array()
                .map(|h| h.iter().filter(|h| !h["error"].is_null()).count())
                .unwrap_or(0);
            if failed == 2 {
                Ok(())
            } else {
                Err(p.to_string())
            }
        },
    );
    let p = pool(env, "unmounted");
    assert!(
        p["hosts"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("is not reachable")),
        "{p}"
    );
    fails_with(
        env,
        &[
            "vm",
            "create",
            "nowhere",
            "--flavor",
            "tiny",
            "--image",
            "guest",
            "--project",
            "p",
            "--pool",
            "unmounted",
        ],
        "required tag",
    );
    fails_with(
        env,
        &[
            "vm",
            "create",
            "typo",
            "--flavor",
            "tiny",
            "--image",
            "guest",
            "--project",
            "p",
            "--pool",
            "nope",
        ],
        "storage pool \"nope\" not found",
    );
    env.json(&["pool", "delete", "unmounted", "-o", "json"]);

    // A VM in the pool: its disk, snapshot layers and image live there.
    let vm = env.json(&[
        "vm",
        "create",
        "web",
        "--flavor",
        "tiny",
        "--image",
        "guest",
        "--project",
        "p",
        "--pool",
        "shared",
        "--wait",
        "-o",
        "json",
    ]);
    let id = vm["id"].as_str().expect("id").to_string();
    let _kill = KillVm(Some(id.clone()));
    let vm = env.vm("web");
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["placement"]["pool"], "shared", "{vm}");
    assert_eq!(vm["pool_id"], p_id(env, "shared"), "{vm}");
    wait_until("the guest agent to connect", BOOT, || {
        let v = env.vm("web");
        if v["guest"]["connected"] == true {
            Ok(())
        } else {
            Err(v["guest"].to_string())
        }
    });
    let disks = shared.join("vms").join(&id);
    assert!(
        disks.join("disk.qcow2").is_file(),
        "{:?}",
        files_under(&disks)
    );
    let images = files_under(&shared.join("images"));
    assert_eq!(images.len(), 1, "one image cached in the pool: {images:?}");
    let host_dir = if vm["host_id"] == host_id(env, "host-1") {
        w.agent_dir.clone()
    } else {
        host2_dir.clone()
    };
    // The host's own directory for the VM links to the pool's.
    let own = host_dir.join("qemu/vms").join(&id);
    let link = std::fs::read_link(own.join("disks")).expect("disks link");
    assert_eq!(
        link.canonicalize().expect("link target"),
        disks.canonicalize().expect("pool dir")
    );
    assert!(!own.join("disk.qcow2").exists());

    // Counted against the pool, not the host's own disk.
    let p = pool(env, "shared");
    assert_eq!(p["allocated_bytes"], 64u64 << 20, "{p}");
    let host = env.json(&[
        "host",
        "show",
        vm["host_id"].as_str().expect("host"),
        "-o",
        "json",
    ]);
    assert_eq!(host["allocated"]["disk_bytes"], 0, "{host}");

    // Snapshot layers follow the disk into the pool.
    env.json(&[
        "snapshot",
        "create",
        "web",
        "s1",
        "--project",
        "p",
        "--wait",
        "-o",
        "json",
    ]);
    let layers: Vec<String> = files_under(&disks)
        .into_iter()
        .filter(|f| f.starts_with("disk.") && f.ends_with(".qcow2") && f != "disk.qcow2")
        .collect();
    assert_eq!(layers.len(), 1, "{:?}", files_under(&disks));
    assert!(disks.join("snapshots.json").is_file());
    let up = env.cli(&["vm", "exec", "web", "--project", "p", "--", "true"]);
    assert!(up.status.success(), "the guest still answers");

    // The scheduler counts the pool's capacity: a disk larger than what is
    // left is refused, naming the pool.
    let cap = p["capacity_bytes"].as_u64().expect("capacity");
    let huge = format!("{}MiB", (cap >> 20) + 1);
    env.json(&[
        "flavor", "create", "huge", "--vcpus", "1", "--memory", "128MiB", "--disk", &huge, "-o",
        "json",
    ]);
    let big = [
        "vm",
        "create",
        "big",
        "--flavor",
        "huge",
        "--image",
        "guest",
        "--project",
        "p",
        "--pool",
        "shared",
    ];
    fails_with(env, &big, "storage pool shared has room for");
    // The dry run refuses it the same way, creating nothing.
    let dry = env.cli(&[&big[..], &["--dry-run"]].concat());
    let said = String::from_utf8_lossy(&dry.stdout);
    assert!(!dry.status.success(), "the dry run should refuse: {said}");
    assert!(
        said.contains("storage pool shared has room for"),
        "dry run said: {said}"
    );
    fails_with(env, &["pool", "delete", "shared"], "VM(s) keep their disks");

    // Deleting the VM gives the pool back and removes its files there.
    env.json(&[
        "vm",
        "delete",
        "web",
        "--project",
        "p",
        "--wait",
        "-o",
        "json",
    ]);
    assert_eq!(pool(env, "shared")["allocated_bytes"], 0);
    assert!(!disks.exists(), "{:?}", files_under(&disks));
    env.json(&["pool", "delete", "shared", "-o", "json"]);
}

/// The size in bytes of the guest's second disk, or `None` while it has none.
fn vdb_size(env: &Env, vm: &str) -> Option<u64> {
    sh(
        env,
        vm,
        "if [ -b /dev/vdb ]; then echo $(( $(cat /sys/block/vdb/size) * 512 )); else echo none; fi",
    )
    .trim()
    .parse()
    .ok()
}

fn wait_vdb(env: &Env, vm: &str, want: Option<u64>) {
    wait_until(&format!("{vm} to see its volume as expected"), BOOT, || {
        let got = vdb_size(env, vm);
        if got == want {
            Ok(())
        } else {
            Err(format!("{got:?}, want {want:?}"))
        }
    });
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

/// A volume in a shared pool through the CLI: a size beyond the pool's room
/// is refused (`409 pool_full`); the volume's size counts against the pool;
/// it is made in the pool by the first host it is attached on, written by a
/// VM there, detached, attached to a VM on the other host (which never had
/// it) and read back intact; a snapshot of a VM holding it is refused; the
/// pool cannot be deleted while it lives there; deleting it removes its file
/// from the pool and gives the room back.
#[test]
fn real_qemu_a_pool_volume_moves_between_hosts_with_its_data() {
    let w = world();
    let env = &w.env;
    let (_agent2, host2_dir) = w.add_host("host-2");
    let shared = w.home.path().join("nfs-export");
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
    let p = wait_seen(env, "shared", 2);
    // One VM on each host (tags pin them), booting side by side.
    for (host, tag, vm) in [("host-1", "a", "on-a"), ("host-2", "b", "on-b")] {
        env.json(&["host", "update", host, "--add-tag", tag, "-o", "json"]);
        env.json(&[
            "vm",
            "create",
            vm,
            "--flavor",
            "tiny",
            "--image",
            "guest",
            "--project",
            "p",
            "--require-tag",
            tag,
            "-o",
            "json",
        ]);
    }
    let _kill_a = KillVm(env.vm("on-a")["id"].as_str().map(str::to_string));
    let _kill_b = KillVm(env.vm("on-b")["id"].as_str().map(str::to_string));

    // Larger than the pool's room: refused, nothing recorded.
    let cap = p["capacity_bytes"].as_u64().expect("capacity");
    let huge = format!("{}MiB", (cap >> 20) + 1);
    let out = env.cli(&[
        "volume",
        "create",
        "huge",
        "--size",
        &huge,
        "--pool",
        "shared",
        "--project",
        "p",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a volume beyond the pool's room");
    assert!(
        err.contains("pool_full") && err.contains("storage pool shared has room for"),
        "{err}"
    );
    fails_with(
        env,
        &[
            "volume",
            "create",
            "typo",
            "--size",
            "16MiB",
            "--pool",
            "nope",
            "--project",
            "p",
        ],
        "storage pool \"nope\" not found",
    );
    let list = volume(env, &["list"]);
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0), "{list}");
    assert_eq!(pool(env, "shared")["allocated_bytes"], 0);

    let v = volume(
        env,
        &["create", "data", "--size", "16MiB", "--pool", "shared"],
    );
    let id = v["id"].as_str().expect("id").to_string();
    assert_eq!(v["pool"], "shared", "{v}");
    assert_eq!(pool(env, "shared")["allocated_bytes"], 16u64 << 20);
    let table = env.cli(&["volume", "list", "--project", "p"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("POOL") && table.contains("shared"),
        "{table}"
    );
    fails_with(env, &["pool", "delete", "shared"], "1 volume(s)");

    // Attached on host-1: made in the pool, linked from host-1's data dir.
    wait_guest(env, "on-a");
    let t = Instant::now();
    volume(env, &["attach", "data", "on-a", "--wait"]);
    println!(
        "MEASURED pool volume attach (made in the pool, hot-plug) on host-1: {:?}",
        t.elapsed()
    );
    wait_vdb(env, "on-a", Some(16 << 20));
    let file = shared.join("volumes").join(format!("{id}.qcow2"));
    assert!(file.is_file(), "{:?}", files_under(&shared.join("volumes")));
    let host1_volumes = w.agent_dir.join("qemu/volumes");
    assert!(
        !host1_volumes.join(format!("{id}.qcow2")).exists(),
        "{:?}",
        files_under(&host1_volumes)
    );
    assert!(host1_volumes.join(format!("{id}.pool")).is_symlink());
    let out = env.cli(&["volume", "attach", "data", "on-b", "--project", "p"]);
    assert!(!out.status.success(), "attached twice");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("volume_in_use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sum = sh(
        env,
        "on-a",
        "dd if=/dev/urandom of=/dev/vdb bs=1M count=1 conv=notrunc 2>/dev/null && sync",
    );
    assert!(sum.trim().is_empty(), "{sum}");
    let sum = vdb_sum(env, "on-a");
    assert_eq!(sum.len(), 64, "{sum}");
    fails_with(
        env,
        &["snapshot", "create", "on-a", "s1", "--project", "p"],
        "volume_in_pool",
    );
    volume(env, &["detach", "data", "--wait"]);
    wait_vdb(env, "on-a", None);

    // Attached on host-2, which never had it: the same file, the same data.
    wait_guest(env, "on-b");
    let t = Instant::now();
    let v = volume(env, &["attach", "data", "on-b", "--wait"]);
    println!(
        "MEASURED pool volume attach on the other host: {:?}",
        t.elapsed()
    );
    assert_eq!(v["status"], "attached", "{v}");
    assert_eq!(v["host_id"], host_id(env, "host-2"), "{v}");
    wait_vdb(env, "on-b", Some(16 << 20));
    assert_eq!(vdb_sum(env, "on-b"), sum, "the data written on host-1");
    let host2_volumes = host2_dir.join("qemu/volumes");
    assert!(host2_volumes.join(format!("{id}.pool")).is_symlink());
    assert!(!host2_volumes.join(format!("{id}.qcow2")).exists());

    // Deleting the VM on host-2 detaches the volume and leaves its file.
    env.json(&[
        "vm",
        "delete",
        "on-b",
        "--project",
        "p",
        "--wait",
        "-o",
        "json",
    ]);
    let v = volume(env, &["show", "data"]);
    assert_eq!(v["status"], "available", "{v}");
    assert!(file.is_file(), "the VM's delete left the pool volume");

    // Deleted: its file leaves the pool, its room comes back.
    let gone = volume(env, &["delete", "data"]);
    assert_eq!(gone["deleted"], "data", "{gone}");
    assert!(!file.exists(), "{:?}", files_under(&shared.join("volumes")));
    assert_eq!(pool(env, "shared")["allocated_bytes"], 0);
    env.json(&[
        "vm",
        "delete",
        "on-a",
        "--project",
        "p",
        "--wait",
        "-o",
        "json",
    ]);
    env.json(&["pool", "delete", "shared", "-o", "json"]);
}

fn p_id(env: &Env, name: &str) -> Value {
    pool(env, name)["id"].clone()
}

fn host_id(env: &Env, name: &str) -> Value {
    env.json(&["host", "show", name, "-o", "json"])["id"].clone()
}
