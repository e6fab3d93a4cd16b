//! Real QEMU tests of disk snapshots (see `stratus_driver::snapshot`) on the
//! tiny test guest: files written in the guest with `dd`, their checksums
//! taken there and compared after merges, reverts and restarts; the shared
//! base image's checksum compared throughout. Durations are printed as
//! `TIMING` lines (`--nocapture`).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use stratus_common::VmId;
use stratus_driver::{
    BackupMode, BackupParent, BackupRequest, Driver, DriverError, QemuDriver, SnapshotInfo,
    SnapshotRequest, VmRuntimeState, MAX_SNAPSHOTS,
};

const MIB: u64 = 1 << 20;
/// What ext4 may add to the data a test writes: metadata, journal, directory.
const METADATA_SLACK: u64 = 512 * 1024;

fn req(name: &str) -> SnapshotRequest {
    SnapshotRequest {
        snapshot_id: uuid::Uuid::new_v4(),
        name: name.into(),
    }
}

/// SHA-256 of a host file, by `sha256sum`.
fn host_sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sum")
        .to_string()
}

async fn snapshot(d: &QemuDriver, id: VmId, r: &SnapshotRequest) -> SnapshotInfo {
    let t = Instant::now();
    let info = d
        .vm_snapshot_create(id, r)
        .await
        .unwrap_or_else(|e| panic!("snapshot {}: {e} ({e:?})", r.name));
    println!(
        "TIMING snapshot {} create: {} ms, quiesced {}, frozen layer {} bytes",
        r.name,
        t.elapsed().as_millis(),
        info.quiesced,
        info.bytes
    );
    info
}

async fn names(d: &QemuDriver, id: VmId) -> Vec<String> {
    d.vm_snapshot_list(id)
        .await
        .expect("list")
        .into_iter()
        .map(|s| s.name)
        .collect()
}

async fn assert_running(d: &QemuDriver, id: VmId, pid: u32, what: &str) {
    let st = d.vm_status(id).await.expect("status").expect("known");
    assert_eq!(st.state, VmRuntimeState::Running, "{what}");
    assert_eq!(st.pid, Some(pid), "{what}: the same QEMU still runs");
}

/// Snapshots of a running VM, a live merge of the first snapshot (whose base
/// is the shared base image), a revert, another live merge, an offline merge
/// and restarts in between: the guest's files are right at every step and
/// the base image is never written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_live_snapshots_merge_revert_and_survive_restarts() {
    let g = guest_image();
    let _one_at_a_time = QEMU_LOCK.lock().await;
    let base_sum = host_sha256(&g.disk);
    let data = tempfile::tempdir().expect("tempdir");
    let d = driver(&data.path().join("driver")).await;
    let s = spec(&g, "snap-live");
    let id = s.id;
    let _cleanup = KillOnDrop(id);
    d.vm_create(&s).await.expect("create");
    d.vm_start(id).await.expect("start");
    wait_ready(&d, id, 1).await;
    let pid = d
        .vm_status(id)
        .await
        .expect("status")
        .expect("known")
        .pid
        .expect("pid");
    let dir = d.vm_dir(id);

    let sum_a = write_file(&d, id, "a", 1).await;
    let s1 = req("s1");
    let i1 = snapshot(&d, id, &s1).await;
    assert!(i1.quiesced, "the guest agent answers: frozen");
    assert!(i1.bytes >= MIB, "the frozen layer holds a: {}", i1.bytes);
    let sum_b = write_file(&d, id, "b", 1).await;
    let s2 = req("s2");
    let i2 = snapshot(&d, id, &s2).await;
    assert!(
        i2.bytes >= MIB && i2.bytes <= MIB + METADATA_SLACK,
        "s2's layer holds b: {}",
        i2.bytes
    );
    let sum_c = write_file(&d, id, "c", 1).await;
    assert_eq!(names(&d, id).await, ["s1", "s2"]);
    assert_eq!(
        d.vm_snapshot_create(id, &s1).await.expect("again"),
        i1,
        "the same id returns the snapshot"
    );
    assert!(matches!(
        d.vm_snapshot_create(id, &req("s1")).await,
        Err(DriverError::Conflict { .. })
    ));
    assert!(matches!(
        d.vm_snapshot_revert(id, s1.snapshot_id).await,
        Err(DriverError::InvalidState { .. })
    ));

    // Delete s1 live: its layer is disk.qcow2, the base image is below it.
    assert!(dir.join("disk.qcow2").exists());
    let t = Instant::now();
    d.vm_snapshot_delete(id, s1.snapshot_id)
        .await
        .expect("live delete of s1");
    println!("TIMING live merge of s1: {} ms", t.elapsed().as_millis());
    assert!(!dir.join("disk.qcow2").exists(), "s1's layer file is gone");
    assert_running(&d, id, pid, "after the live merge").await;
    assert_eq!(
        checksums(&d, id, &["a", "b", "c"]).await,
        vec![sum_a.clone(), sum_b.clone(), sum_c.clone()]
    );
    assert_eq!(names(&d, id).await, ["s2"]);
    assert!(matches!(
        d.vm_snapshot_delete(id, s1.snapshot_id).await,
        Err(DriverError::SnapshotNotFound { .. })
    ));
    assert_eq!(host_sha256(&g.disk), base_sum, "base image unchanged");

    // Revert to s2: a and b, no c.
    d.vm_stop(id, Duration::from_secs(30)).await.expect("stop");
    let t = Instant::now();
    let dropped = d
        .vm_snapshot_revert(id, s2.snapshot_id)
        .await
        .expect("revert");
    println!("TIMING revert to s2: {} ms", t.elapsed().as_millis());
    assert!(dropped.is_empty(), "nothing newer than s2: {dropped:?}");
    d.vm_start(id).await.expect("start");
    wait_ready(&d, id, 2).await;
    assert_eq!(
        checksums(&d, id, &["a", "b", "c"]).await,
        vec![sum_a.clone(), sum_b.clone(), "absent".into()]
    );

    // s3, then d, then merge s2 live (its layer is between two layers).
    let pid = d
        .vm_status(id)
        .await
        .expect("status")
        .expect("known")
        .pid
        .expect("pid");
    let s3 = req("s3");
    snapshot(&d, id, &s3).await;
    let sum_d = write_file(&d, id, "d", 1).await;
    let t = Instant::now();
    d.vm_snapshot_delete(id, s2.snapshot_id)
        .await
        .expect("live delete of s2");
    println!("TIMING live merge of s2: {} ms", t.elapsed().as_millis());
    assert_running(&d, id, pid, "after the second live merge").await;
    assert_eq!(names(&d, id).await, ["s3"]);
    let want = vec![sum_a.clone(), sum_b.clone(), "absent".into(), sum_d.clone()];
    assert_eq!(checksums(&d, id, &["a", "b", "c", "d"]).await, want);

    // The chain survives a stop and start; then s3 is merged offline.
    d.vm_stop(id, Duration::from_secs(30)).await.expect("stop");
    d.vm_start(id).await.expect("start");
    wait_ready(&d, id, 3).await;
    assert_eq!(checksums(&d, id, &["a", "b", "c", "d"]).await, want);
    d.vm_stop(id, Duration::from_secs(30)).await.expect("stop");
    let t = Instant::now();
    d.vm_snapshot_delete(id, s3.snapshot_id)
        .await
        .expect("offline delete of s3");
    println!("TIMING offline merge of s3: {} ms", t.elapsed().as_millis());
    assert!(names(&d, id).await.is_empty());
    let layers: Vec<String> = std::fs::read_dir(&dir)
        .expect("ls")
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.ends_with(".qcow2"))
        .collect();
    assert_eq!(layers.len(), 1, "one layer left: {layers:?}");
    d.vm_start(id).await.expect("start");
    wait_ready(&d, id, 4).await;
    assert_eq!(checksums(&d, id, &["a", "b", "c", "d"]).await, want);

    assert_eq!(host_sha256(&g.disk), base_sum, "base image unchanged");
    d.vm_destroy(id).await.expect("destroy");
    assert!(!dir.exists(), "every layer went with the VM directory");
}

/// Full backup, write, snapshot, write, incremental backup: the incremental
/// holds both writes (the bitmap's copy on the frozen layer is merged in),
/// and restores with both files. Then the snapshot limit, offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_incremental_backup_across_a_snapshot() {
    let g = guest_image();
    let _one_at_a_time = QEMU_LOCK.lock().await;
    let base_sum = host_sha256(&g.disk);
    let data = tempfile::tempdir().expect("tempdir");
    let backups = data.path().join("backups");
    std::fs::create_dir_all(&backups).expect("mkdir");
    let d = driver(&data.path().join("driver")).await;
    let s = spec(&g, "snap-backup");
    let id = s.id;
    let _cleanup = KillOnDrop(id);
    d.vm_create(&s).await.expect("create");
    d.vm_start(id).await.expect("start");
    wait_ready(&d, id, 1).await;

    sh(&d, id, "sync").await;
    let full = BackupRequest {
        backup_id: uuid::Uuid::new_v4(),
        target: backups.join("full.qcow2"),
        parent: None,
    };
    let f = d.vm_backup(id, &full, &|_| {}).await.expect("full backup");
    assert_eq!(f.mode, BackupMode::Full);
    let sum_x = write_file(&d, id, "x", 1).await;
    snapshot(&d, id, &req("between")).await;
    let sum_y = write_file(&d, id, "y", 2).await;
    let inc = BackupRequest {
        backup_id: uuid::Uuid::new_v4(),
        target: backups.join("inc.qcow2"),
        parent: Some(BackupParent {
            backup_id: full.backup_id,
            file: full.target.clone(),
        }),
    };
    let i = d.vm_backup(id, &inc, &|_| {}).await.expect("incremental");
    assert_eq!(i.mode, BackupMode::Incremental, "{:?}", i.fallback_reason);
    println!(
        "MEASURE incremental across a snapshot: wrote {} bytes, backup holds {} bytes",
        3 * MIB,
        i.data_bytes
    );
    assert!(
        i.data_bytes >= 3 * MIB && i.data_bytes <= 3 * MIB + METADATA_SLACK,
        "the incremental holds both writes: {}",
        i.data_bytes
    );

    let mut r = spec(&g, "snap-restored");
    r.restore_from = Some(inc.target.clone());
    let rid = r.id;
    let _cleanup_restored = KillOnDrop(rid);
    d.vm_create(&r).await.expect("create from the backup");
    d.vm_start(rid).await.expect("start restored");
    wait_ready(&d, rid, 1).await;
    assert_eq!(
        checksums(&d, rid, &["x", "y"]).await,
        vec![sum_x, sum_y],
        "the restored VM has both files"
    );
    d.vm_destroy(rid).await.expect("destroy restored");

    // The limit, on the stopped VM (offline snapshots).
    d.vm_stop(id, Duration::from_secs(30)).await.expect("stop");
    let t = Instant::now();
    for n in 1..MAX_SNAPSHOTS {
        let info = d
            .vm_snapshot_create(id, &req(&format!("offline-{n}")))
            .await
            .expect("offline snapshot");
        assert!(!info.quiesced);
    }
    println!(
        "TIMING {} offline snapshots: {} ms",
        MAX_SNAPSHOTS - 1,
        t.elapsed().as_millis()
    );
    let e = d
        .vm_snapshot_create(id, &req("one too many"))
        .await
        .expect_err("the limit");
    assert!(
        e.to_string().contains("limit of 16") && e.to_string().contains("merges"),
        "{e}"
    );
    assert_eq!(d.vm_snapshot_list(id).await.expect("list").len(), 16);
    assert_eq!(host_sha256(&g.disk), base_sum, "base image unchanged");
    d.vm_destroy(id).await.expect("destroy");
}
