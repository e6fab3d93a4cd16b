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
    BackupMode, BackupParent, BackupRequest, Driver, DriverError, ImageFormat, QemuDriver,
    SnapshotInfo, SnapshotRequest, VmRuntimeState, VolumeSpec, MAX_SNAPSHOTS,
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
        volume_parents: Vec::new(),
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
        volume_parents: Vec::new(),
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

/// The guest's block device of a volume (found by its serial: `/dev/vdX`
/// names follow probe order), waiting until the guest has it.
async fn volume_dev(d: &QemuDriver, id: VmId, volume: uuid::Uuid) -> String {
    let serial = stratus_driver::volume_serial(volume);
    let script = format!(
        "for b in /sys/block/vd*; do [ \"$(cat $b/serial 2>/dev/null)\" = {serial} ] && \
         echo /dev/${{b##*/}}; done; true"
    );
    let t = Instant::now();
    loop {
        let out = sh(d, id, &script).await;
        if let Some(dev) = out.split_whitespace().next() {
            return dev.to_string();
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the guest has no disk with serial {serial}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Writes `mib` MiB of random data at MiB `at` of a volume, flushed.
async fn volume_write(d: &QemuDriver, id: VmId, dev: &str, at: u64, mib: u64) {
    sh(
        d,
        id,
        &format!(
            "dd if=/dev/urandom of={dev} bs=64k seek={} count={} conv=notrunc 2>/dev/null && sync",
            at * 16,
            mib * 16
        ),
    )
    .await;
}

/// SHA-256 of the first `mib` MiB of a volume, read from the disk (the
/// guest's page cache dropped first).
async fn volume_sum(d: &QemuDriver, id: VmId, dev: &str, mib: u64) -> String {
    sh(
        d,
        id,
        &format!(
            "sync && echo 3 > /proc/sys/vm/drop_caches && \
             dd if={dev} bs=64k count={} 2>/dev/null | sha256sum",
            mib * 16
        ),
    )
    .await
    .split_whitespace()
    .next()
    .expect("sha256sum output")
    .to_string()
}

/// The guest-visible size of a volume, in bytes.
async fn volume_size(d: &QemuDriver, id: VmId, dev: &str) -> u64 {
    let name = dev.trim_start_matches("/dev/");
    sh(d, id, &format!("cat /sys/block/{name}/size"))
        .await
        .trim()
        .parse::<u64>()
        .expect("sectors")
        * 512
}

/// One snapshot covers the VM's disk and its attached volume (a clone of
/// the guest image, like the VM's disk): data written to both, snapshot,
/// more data, live merge keeps the newest data on both; the volume cannot
/// be detached while a snapshot covers it; a second snapshot, a volume
/// attached after it, a live grow, a stop and start that keep both chains;
/// a revert brings both covered disks back to the snapshot and leaves the
/// later volume alone; with the snapshots gone the volume detaches as one
/// file again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_snapshots_cover_attached_volumes() {
    let g = guest_image();
    let _one_at_a_time = QEMU_LOCK.lock().await;
    let base_sum = host_sha256(&g.disk);
    let data = tempfile::tempdir().expect("tempdir");
    let volumes_dir = data.path().join("driver/volumes");
    let d = driver(&data.path().join("driver")).await;
    let s = spec(&g, "snap-volumes");
    let id = s.id;
    let _cleanup = KillOnDrop(id);
    d.vm_create(&s).await.expect("create");
    let vol = VolumeSpec {
        volume_id: uuid::Uuid::new_v4(),
        // The guest image is 64 MiB: a clone is at least that large.
        size_bytes: 64 * MIB,
        image: Some(g.disk.clone()),
        image_format: Some(ImageFormat::Qcow2),
    };
    let v = vol.volume_id;
    d.volume_create(&vol).await.expect("volume");
    d.vm_volume_attach(id, v)
        .await
        .expect("attach while stopped");
    d.vm_start(id).await.expect("start");
    wait_ready(&d, id, 1).await;
    let pid = d
        .vm_status(id)
        .await
        .expect("status")
        .expect("known")
        .pid
        .expect("pid");
    let dev = volume_dev(&d, id, v).await;

    // Known data on both disks, then one snapshot of both.
    let sum_a = write_file(&d, id, "a", 1).await;
    volume_write(&d, id, &dev, 4, 1).await;
    let vol_at_s1 = volume_sum(&d, id, &dev, 8).await;
    let s1 = req("s1");
    let i1 = snapshot(&d, id, &s1).await;
    assert!(i1.quiesced);
    assert_eq!(i1.volumes, vec![v], "s1 covers the volume");
    assert!(i1.bytes >= MIB, "s1 froze a: {}", i1.bytes);
    let listed = d.vm_snapshot_list(id).await.expect("list");
    assert_eq!(listed[0].volumes, vec![v]);
    assert!(
        volumes_dir
            .join(format!("{v}.{}.qcow2", s1.snapshot_id))
            .exists(),
        "the volume got a layer"
    );

    // More data on both; the volume is held by s1.
    let sum_b = write_file(&d, id, "b", 1).await;
    volume_write(&d, id, &dev, 5, 1).await;
    let vol_now = volume_sum(&d, id, &dev, 8).await;
    assert_ne!(vol_now, vol_at_s1);
    match d.vm_volume_detach(id, v).await {
        Err(DriverError::VolumeConflict { reason, .. }) => {
            assert!(
                reason.contains("\"s1\"") && reason.contains("delete those snapshots first"),
                "{reason}"
            );
        }
        other => panic!("detach of a covered volume: {other:?}"),
    }

    // Live merge of s1 on both disks: the newest data stays.
    let t = Instant::now();
    d.vm_snapshot_delete(id, s1.snapshot_id)
        .await
        .expect("live delete of s1");
    println!(
        "TIMING live merge of s1 (disk + volume): {} ms",
        t.elapsed().as_millis()
    );
    assert_running(&d, id, pid, "after the live merge").await;
    assert_eq!(
        checksums(&d, id, &["a", "b"]).await,
        vec![sum_a.clone(), sum_b.clone()]
    );
    assert_eq!(
        volume_sum(&d, id, &dev, 8).await,
        vol_now,
        "volume after merge"
    );
    assert!(
        !volumes_dir.join(format!("{v}.qcow2")).exists(),
        "the volume's first layer was merged away"
    );
    let info = d.volume_info(v).await.expect("info").expect("exists");
    assert_eq!(info.attached_to, Some(id));
    assert_eq!(info.size_bytes, 64 * MIB);

    // s2, then more data, a second volume attached after s2, a live grow.
    let vol_at_s2 = vol_now;
    let s2 = req("s2");
    let i2 = snapshot(&d, id, &s2).await;
    assert_eq!(i2.volumes, vec![v]);
    let sum_c = write_file(&d, id, "c", 1).await;
    volume_write(&d, id, &dev, 0, 1).await;
    let vol_after_s2 = volume_sum(&d, id, &dev, 8).await;
    let later = VolumeSpec {
        volume_id: uuid::Uuid::new_v4(),
        size_bytes: 8 * MIB,
        image: None,
        image_format: None,
    };
    let w = later.volume_id;
    d.volume_create(&later).await.expect("second volume");
    d.vm_volume_attach(id, w).await.expect("hot-plug after s2");
    let wdev = volume_dev(&d, id, w).await;
    volume_write(&d, id, &wdev, 0, 2).await;
    let later_sum = volume_sum(&d, id, &wdev, 4).await;
    let grown = d.volume_resize(v, 80 * MIB).await.expect("live grow");
    assert_eq!(grown.size_bytes, 80 * MIB);
    let t = Instant::now();
    while volume_size(&d, id, &dev).await != 80 * MIB {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the guest sees the growth"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Both chains survive a stop and start.
    d.vm_stop(id, Duration::from_secs(30)).await.expect("stop");
    d.vm_start(id).await.expect("start");
    wait_ready(&d, id, 2).await;
    let dev = volume_dev(&d, id, v).await;
    let wdev = volume_dev(&d, id, w).await;
    assert_eq!(
        checksums(&d, id, &["a", "b", "c"]).await,
        vec![sum_a.clone(), sum_b.clone(), sum_c.clone()]
    );
    assert_eq!(volume_sum(&d, id, &dev, 8).await, vol_after_s2);
    assert_eq!(volume_sum(&d, id, &wdev, 4).await, later_sum);
    assert_eq!(volume_size(&d, id, &dev).await, 80 * MIB);

    // Revert to s2: the VM disk and the covered volume go back, the later
    // volume stays as it is, the grown volume keeps its size.
    d.vm_stop(id, Duration::from_secs(30)).await.expect("stop");
    let t = Instant::now();
    let dropped = d
        .vm_snapshot_revert(id, s2.snapshot_id)
        .await
        .expect("revert");
    println!(
        "TIMING revert to s2 (disk + volume): {} ms",
        t.elapsed().as_millis()
    );
    assert!(dropped.is_empty());
    d.vm_start(id).await.expect("start");
    wait_ready(&d, id, 3).await;
    let dev = volume_dev(&d, id, v).await;
    let wdev = volume_dev(&d, id, w).await;
    assert_eq!(
        checksums(&d, id, &["a", "b", "c"]).await,
        vec![sum_a.clone(), sum_b.clone(), "absent".into()]
    );
    assert_eq!(volume_sum(&d, id, &dev, 8).await, vol_at_s2, "volume at s2");
    assert_eq!(
        volume_sum(&d, id, &wdev, 4).await,
        later_sum,
        "the volume attached after s2 is untouched"
    );
    assert_eq!(volume_size(&d, id, &dev).await, 80 * MIB);

    // s2 merged live; then the volume detaches and is one file again.
    d.vm_snapshot_delete(id, s2.snapshot_id)
        .await
        .expect("live delete of s2");
    assert_eq!(volume_sum(&d, id, &dev, 8).await, vol_at_s2);
    d.vm_volume_detach(id, v)
        .await
        .expect("detach, uncovered now");
    let left: Vec<String> = std::fs::read_dir(&volumes_dir)
        .expect("ls")
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.starts_with(&v.to_string()) && n.ends_with(".qcow2"))
        .collect();
    assert_eq!(left, vec![format!("{v}.qcow2")], "one file again");
    assert_eq!(
        d.volume_info(v)
            .await
            .expect("info")
            .expect("exists")
            .attached_to,
        None
    );
    // The detached volume, attached again, still holds the data.
    d.vm_volume_attach(id, v).await.expect("attach again");
    let dev = volume_dev(&d, id, v).await;
    assert_eq!(
        volume_sum(&d, id, &dev, 8).await,
        vol_at_s2,
        "after re-attach"
    );

    assert_eq!(host_sha256(&g.disk), base_sum, "base image unchanged");
    d.vm_destroy(id).await.expect("destroy");
    for vol in [v, w] {
        assert!(
            d.volume_info(vol).await.expect("info").is_some(),
            "volumes outlive the VM"
        );
    }
}
