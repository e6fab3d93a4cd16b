//! Backups that cover a VM's attached volume, end to end with real QEMU (TCG)
//! through the real binary and the CLI: a full and an incremental restore
//! point of a VM with a data volume (each disk its own chain of files, the
//! volume's incremental holding just what the guest wrote to it), shown and
//! listed with their volume, verified; restored into a new VM that boots
//! with a new volume holding the volume's data at that point; restored in
//! place (refused while the backed-up volume is detached, naming it); and a
//! deleted restore point merged into the next one, volume file included.

mod qemu_world;

use std::time::Instant;

use qemu_world::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// Writes `mib` MiB of random data to the volume (/dev/vdb) at `at_mib`,
/// flushed.
fn write_volume(env: &Env, vm: &str, at_mib: u32, mib: u32) {
    sh(
        env,
        vm,
        &format!(
            "dd if=/dev/urandom of=/dev/vdb bs=1M seek={at_mib} count={mib} conv=fsync \
             2>/dev/null && sync"
        ),
    );
}

/// The SHA-256 of the whole volume as the guest reads it (caches dropped).
fn volume_sum(env: &Env, vm: &str) -> String {
    sh(
        env,
        vm,
        "sync && echo 3 > /proc/sys/vm/drop_caches && dd if=/dev/vdb bs=1M 2>/dev/null | sha256sum",
    )
    .split_whitespace()
    .next()
    .unwrap_or_default()
    .to_string()
}

/// The files on the VM's own disk, with their checksums.
fn files(env: &Env, vm: &str) -> String {
    sh(
        env,
        vm,
        "cd /mnt/disk && for f in a b; do [ -f $f ] && sha256sum $f; done; true",
    )
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
        "MEASURED backup {}: mode {} disk data {} volumes {} in {:?}",
        b["id"],
        b["mode"],
        b["data_bytes"],
        b["volumes"],
        t.elapsed()
    );
    assert_eq!(b["status"], "succeeded", "{b}");
    b
}

fn wait_vdb(env: &Env, vm: &str) {
    wait_until("the guest to see its volume", BOOT, || {
        let out = sh(env, vm, "[ -b /dev/vdb ] && echo yes || echo no");
        if out.trim() == "yes" {
            Ok(())
        } else {
            Err(out)
        }
    });
}

#[test]
fn real_qemu_backups_cover_the_attached_volume_and_restore_it() {
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
    let v = volume(env, &["create", "data", "--size", "16MiB"]);
    let volume_id = v["id"].as_str().unwrap_or_default().to_string();
    volume(env, &["attach", "data", "web", "--wait"]);
    wait_vdb(env, "web");

    // Full: the disk and the volume, one restore point.
    let a = write_file(env, "web", "a", 1);
    write_volume(env, "web", 0, 1);
    let vol_full = volume_sum(env, "web");
    let full = backup(env, "web");
    assert_eq!(full["mode"], "full", "{full}");
    let fv = &full["volumes"][0];
    assert_eq!(full["volumes"].as_array().map(Vec::len), Some(1), "{full}");
    assert_eq!(
        (
            fv["volume_id"].as_str(),
            fv["volume_name"].as_str(),
            fv["mode"].as_str()
        ),
        (Some(volume_id.as_str()), Some("data"), Some("full")),
        "{full}"
    );
    let full_id = full["id"].as_str().expect("id").to_string();
    let full_vol_file = fv["file"].as_str().unwrap_or_default().to_string();
    assert!(
        full_vol_file.ends_with(&format!("{full_id}.vol-{volume_id}.qcow2")),
        "{full_vol_file}"
    );

    // Incremental: the volume's file holds just the 2 MiB written to it.
    write_volume(env, "web", 4, 2);
    let b = write_file(env, "web", "b", 1);
    let vol_inc1 = volume_sum(env, "web");
    let files_inc1 = files(env, "web");
    let inc1 = backup(env, "web");
    assert_eq!(inc1["mode"], "incremental", "{inc1}");
    assert!(inc1["fallback_reason"].is_null(), "{inc1}");
    let iv = &inc1["volumes"][0];
    assert_eq!(iv["mode"], "incremental", "{inc1}");
    println!(
        "MEASURED volume incremental: wrote {} bytes, its file holds {} data bytes ({} file bytes)",
        2 * MIB,
        iv["data_bytes"],
        iv["file_bytes"]
    );
    assert_eq!(iv["data_bytes"].as_u64(), Some(2 * MIB), "{inc1}");
    let inc1_id = inc1["id"].as_str().expect("id").to_string();

    // Shown and listed with the volume; verified, every file.
    let show = env.cli(&["backup", "show", &inc1_id]);
    let show = String::from_utf8_lossy(&show.stdout).into_owned();
    assert!(show.contains("volume") && show.contains("data ("), "{show}");
    let list = env.cli(&["backup", "list", "web", "--project", "p"]);
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(
        list.contains("VOLUMES") && list.contains(" data "),
        "{list}"
    );
    let verified = env.json(&["backup", "verify", &inc1_id, "-o", "json"]);
    assert_eq!(verified["ok"], true, "{verified}");

    // Into a new VM: it boots with a new volume holding the volume's data.
    let t = Instant::now();
    let restored = env.json(&[
        "backup", "restore", &inc1_id, "--as", "r1", "--wait", "-o", "json",
    ]);
    let _kill_r1 = KillVm(restored["id"].as_str().map(str::to_string));
    wait_guest(env, "r1");
    println!(
        "MEASURED restore with a volume into a new VM: booted in {:?}",
        t.elapsed()
    );
    let rv = volume(env, &["show", "r1-data"]);
    assert_eq!(rv["status"], "attached", "{rv}");
    assert_eq!(rv["size_bytes"].as_u64(), Some(16 * MIB), "{rv}");
    assert_eq!(volume_sum(env, "r1"), vol_inc1, "restored volume");
    assert_eq!(files(env, "r1"), files_inc1, "restored disk");
    assert!(files_inc1.contains(&a) && files_inc1.contains(&b));
    env.json(&[
        "vm",
        "delete",
        "r1",
        "--project",
        "p",
        "--wait",
        "-o",
        "json",
    ]);

    // In place: refused while the backed-up volume is detached, naming it.
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
    volume(env, &["detach", "data", "--wait"]);
    let out = env.cli(&["backup", "restore", &full_id, "--in-place"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "restore without its volume must fail"
    );
    assert!(
        err.contains("volume_not_attached") && err.contains("\"data\""),
        "{err}"
    );
    volume(env, &["attach", "data", "web", "--wait"]);
    env.json(&[
        "backup",
        "restore",
        &full_id,
        "--in-place",
        "--wait",
        "-o",
        "json",
    ]);
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
    assert_eq!(volume_sum(env, "web"), vol_full, "volume restored in place");
    assert!(
        !files(env, "web").contains(&b),
        "the disk is back at the full"
    );

    // Deleting the full merges each of its files into inc1's, which stands
    // alone and still verifies; the full's volume file is gone.
    env.json(&["backup", "delete", &full_id, "-o", "json"]);
    let now = env.json(&["backup", "show", &inc1_id, "-o", "json"]);
    assert_eq!(now["mode"], "full", "{now}");
    assert_eq!(now["volumes"][0]["mode"], "full", "{now}");
    assert!(!std::path::Path::new(&full_vol_file).exists());
    let verified = env.json(&["backup", "verify", &inc1_id, "-o", "json"]);
    assert_eq!(verified["ok"], true, "{verified}");
}
