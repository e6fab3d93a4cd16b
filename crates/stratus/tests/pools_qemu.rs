//! Shared storage pools end to end with real QEMU (TCG), through the CLI:
//! two agents with their own data directories see one directory as the pool
//! `shared` (as two hosts would see one NFS export); a VM created in the
//! pool boots with its disk, its snapshot layers and its image there; the
//! scheduler counts the pool's capacity and places a pool's VMs only on
//! hosts that see it; deleting the VM gives everything back.

mod qemu_world;

use std::path::Path;
use std::time::Duration;

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
    fails_with(
        env,
        &["pool", "delete", "shared"],
        "VMs keep their disks in the storage pool",
    );

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

fn p_id(env: &Env, name: &str) -> Value {
    pool(env, name)["id"].clone()
}

fn host_id(env: &Env, name: &str) -> Value {
    env.json(&["host", "show", name, "-o", "json"])["id"].clone()
}
