//! Real QEMU tests of cold migration (see `stratus_driver::migrate`)
//! between two QEMU drivers with separate data directories on this
//! machine, over loopback: the source exports the stopped VM's disk, the
//! destination imports it, the source is destroyed (or, in a shared pool,
//! released), the VM boots on the destination with its data. One guest
//! runs at a time. Figures are printed as `TIMING` lines (`--nocapture`).

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use stratus_driver::{
    AccelChoice, BackupProgress, DiskExportKind, Driver, DriverError, ExportRequest, QemuConfig,
    QemuDriver, SnapshotRequest, VmRuntimeState, VmSpec,
};

const BITMAP: &str = "stratus-backup-x";

async fn boot(d: &QemuDriver, s: &VmSpec) {
    d.vm_create(s).await.expect("create");
    d.vm_start(s.id).await.expect("start");
    wait_ready(d, s.id, 1).await;
}

fn export_req(same_base: bool) -> ExportRequest {
    ExportRequest {
        request_id: uuid::Uuid::new_v4(),
        same_base,
    }
}

/// `qemu-img info --output=json` of a file (its chain not opened).
fn img_info(file: &Path) -> serde_json::Value {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(file)
        .output()
        .expect("qemu-img info");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

fn bitmaps_of(file: &Path) -> Vec<String> {
    img_info(file)["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|b| b["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn add_bitmap(file: &Path, name: &str) {
    let st = std::process::Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(file)
        .arg(name)
        .status()
        .expect("qemu-img bitmap");
    assert!(st.success());
}

type Seen = Arc<Mutex<Vec<BackupProgress>>>;

fn recorder() -> (Seen, impl Fn(BackupProgress) + Send + Sync + 'static) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    (seen, move |p| {
        s.lock().unwrap_or_else(|e| e.into_inner()).push(p)
    })
}

/// The qemu-nbd processes serving a file of the VM.
fn nbd_of(id: stratus_common::VmId) -> Vec<u32> {
    processes_of(id)
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    c.split(|b| *b == 0)
                        .next()
                        .is_some_and(|a| a.ends_with(b"qemu-nbd"))
                })
                .unwrap_or(false)
        })
        .collect()
}

/// The whole path: data written in the guest, a backup bitmap on the disk,
/// only the VM's own layer copied, the VM booting on the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_cold_migration_copies_only_the_vms_layer_and_its_bitmaps() {
    let _one_at_a_time = QEMU_LOCK.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = driver(&tmp.path().join("src")).await;
    let dst = driver(&tmp.path().join("dst")).await;
    let flat = driver(&tmp.path().join("flat")).await;
    let s = spec(&guest_image(), "cold");
    let id = s.id;
    let _cleanup = KillOnDrop(id);
    boot(&src, &s).await;
    let sum = write_file(&src, id, "keep", 8).await;
    src.vm_stop(id, Duration::from_secs(30))
        .await
        .expect("stop");
    let src_disk = src.vm_dir(id).join("disk.qcow2");
    add_bitmap(&src_disk, BITMAP);

    let running = export_req(true);
    let req = export_req(true);
    let t = Instant::now();
    let export = src.vm_disk_export(id, &req).await.expect("export");
    println!(
        "TIMING export: {} ms, {} KiB of the VM's own data",
        t.elapsed().as_millis(),
        export.allocated_bytes >> 10
    );
    assert_eq!(export.kind, DiskExportKind::Layer);
    assert_eq!(export.base_image.as_deref(), Some(s.image.as_path()));
    assert!(
        export.allocated_bytes >= 8 << 20,
        "{}",
        export.allocated_bytes
    );
    assert_eq!(
        src.vm_disk_export(id, &req).await.expect("again"),
        export,
        "a retried export returns the same server"
    );
    assert_eq!(nbd_of(id).len(), 1, "one qemu-nbd");
    assert!(
        matches!(
            src.vm_disk_export(id, &running).await,
            Err(DriverError::Conflict { .. })
        ),
        "another request while exported is a conflict"
    );
    match src.vm_start(id).await {
        Err(DriverError::InvalidState { state, .. }) => {
            assert!(state.contains("exported for a cold migration"), "{state}")
        }
        other => panic!("start while exported: {other:?}"),
    }

    let (seen, progress) = recorder();
    let outcome = dst
        .vm_disk_import(&s, &export, &progress)
        .await
        .unwrap_or_else(|e| panic!("import: {e} ({e:?})"));
    println!(
        "TIMING cold import (layer): {} ms, {} KiB copied, progress reports {}",
        outcome.duration_ms,
        outcome.bytes_copied >> 10,
        seen.lock().map(|v| v.len()).unwrap_or(0)
    );
    {
        let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        let last = seen.last().expect("progress reported");
        assert_eq!(last.done_bytes, last.total_bytes);
        assert_eq!(last.total_bytes, export.allocated_bytes);
    }
    assert_eq!(outcome.bitmaps, vec![BITMAP.to_string()]);
    assert_eq!(
        dst.vm_disk_import(&s, &export, &|_| {})
            .await
            .expect("again"),
        outcome,
        "a completed import returns its outcome again"
    );
    let dst_disk = dst.vm_dir(id).join("disk.qcow2");
    let info = img_info(&dst_disk);
    assert_eq!(
        info["full-backing-filename"].as_str(),
        s.image.to_str(),
        "the new disk is an overlay of the destination's image"
    );
    assert!(bitmaps_of(&dst_disk).contains(&BITMAP.to_string()));
    assert!(
        !dst.vm_dir(id).join("disk.qcow2.tmp").exists(),
        "no temporary file left"
    );

    // For comparison: a flat copy (different base) into a third host
    // copies the image's data too, and no bitmaps.
    let flat_req = export_req(false);
    src.vm_disk_export_stop(id).await.expect("stop the export");
    assert!(nbd_of(id).is_empty(), "qemu-nbd ended");
    let flat_export = src.vm_disk_export(id, &flat_req).await.expect("export");
    assert_eq!(flat_export.kind, DiskExportKind::Flat);
    let flat_outcome = flat
        .vm_disk_import(&s, &flat_export, &|_| {})
        .await
        .expect("flat import");
    println!(
        "TIMING cold import (flat): {} ms, {} KiB copied",
        flat_outcome.duration_ms,
        flat_outcome.bytes_copied >> 10
    );
    assert!(flat_outcome.bitmaps.is_empty());
    assert!(
        outcome.bytes_copied < flat_outcome.bytes_copied,
        "the layer copy ({}) skips the base image's data the flat copy ({}) holds",
        outcome.bytes_copied,
        flat_outcome.bytes_copied
    );
    assert!(img_info(&flat.vm_dir(id).join("disk.qcow2"))["backing-filename"].is_null());
    flat.vm_destroy(id).await.expect("destroy the flat copy");

    src.vm_disk_export_stop(id).await.expect("stop the export");
    src.vm_disk_export_stop(id)
        .await
        .expect("stopping twice is fine");
    src.vm_destroy(id).await.expect("destroy the source");
    assert!(!src.vm_dir(id).exists());

    let t = Instant::now();
    dst.vm_start(id).await.expect("start on the destination");
    wait_ready(&dst, id, 1).await;
    println!(
        "TIMING boot on the destination: {} ms",
        t.elapsed().as_millis()
    );
    assert_eq!(checksums(&dst, id, &["keep"]).await, vec![sum]);
    dst.vm_stop(id, Duration::ZERO).await.expect("stop");
    assert!(
        bitmaps_of(&dst_disk).contains(&BITMAP.to_string()),
        "the bitmap is still on the disk after a run"
    );
    dst.vm_destroy(id).await.expect("destroy");
}

/// Both hosts see the pool: nothing is copied, the snapshot stays, the
/// source lets go of its directory without deleting the disks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_cold_move_within_a_shared_pool_copies_nothing() {
    let _one_at_a_time = QEMU_LOCK.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = driver(&tmp.path().join("src")).await;
    let dst = driver(&tmp.path().join("dst")).await;
    let pool = tmp.path().join("pool");
    std::fs::create_dir_all(&pool).expect("pool");
    let mut s = spec(&guest_image(), "cold-pool");
    s.pool = Some(pool.clone());
    let id = s.id;
    let _cleanup = KillOnDrop(id);
    boot(&src, &s).await;
    let sum = write_file(&src, id, "keep", 2).await;
    let snap = src
        .vm_snapshot_create(
            id,
            &SnapshotRequest {
                snapshot_id: uuid::Uuid::new_v4(),
                name: "before-move".into(),
            },
        )
        .await
        .expect("snapshot");
    src.vm_stop(id, Duration::from_secs(30))
        .await
        .expect("stop");
    match src.vm_disk_export(id, &export_req(true)).await {
        Err(DriverError::MigrationRefused { reason, .. }) => {
            assert!(
                reason.contains("delete (merge) the snapshots first"),
                "{reason}"
            );
            assert!(reason.contains("vm_adopt_from_pool"), "{reason}");
        }
        other => panic!("export of a VM with snapshots: {other:?}"),
    }
    let disks = pool.join("vms").join(id.to_string());
    let before: Vec<_> = std::fs::read_dir(&disks)
        .expect("pool disks")
        .flatten()
        .map(|e| e.file_name())
        .collect();

    let t = Instant::now();
    dst.vm_adopt_from_pool(&s).await.expect("adopt");
    dst.vm_adopt_from_pool(&s)
        .await
        .expect("adopting twice is fine");
    src.vm_release(id).await.expect("release");
    src.vm_release(id).await.expect("releasing twice is fine");
    println!(
        "TIMING cold move in a shared pool: {} ms",
        t.elapsed().as_millis()
    );
    assert!(!src.vm_dir(id).exists(), "the source keeps nothing");
    assert!(src.vm_status(id).await.expect("status").is_none());
    let after: Vec<_> = std::fs::read_dir(&disks)
        .expect("pool disks")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(before.len(), after.len(), "the pool's files stay");

    assert_eq!(state_of(&dst, id).await, VmRuntimeState::Stopped);
    assert_eq!(
        dst.vm_snapshot_list(id).await.expect("snapshots")[0].snapshot_id,
        snap.snapshot_id,
        "the snapshot moved with the chain"
    );
    dst.vm_start(id).await.expect("start");
    wait_ready(&dst, id, 1).await;
    assert_eq!(checksums(&dst, id, &["keep"]).await, vec![sum]);
    dst.vm_stop(id, Duration::ZERO).await.expect("stop");
    dst.vm_destroy(id).await.expect("destroy");
    assert!(!disks.exists(), "destroying removes the pool's disks");
}

/// The source's export ends mid-copy: the import fails and leaves nothing
/// on the destination; the source VM is intact and starts again. A VM
/// that keeps its disk in its own directory is not released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_cold_import_cut_midway_leaves_nothing_behind() {
    let _one_at_a_time = QEMU_LOCK.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = driver(&tmp.path().join("src")).await;
    let mut config = QemuConfig::new(tmp.path().join("dst"));
    config.accel = AccelChoice::Tcg;
    // 4 MiB/s: the 24 MiB copy takes seconds, time to cut it.
    config.cold_migration_bandwidth = Some(4 << 20);
    let dst = Arc::new(QemuDriver::new(config).await.expect("driver"));
    let pool = tmp.path().join("dst-pool");
    std::fs::create_dir_all(&pool).expect("pool");
    let s = spec(&guest_image(), "cold-cut");
    let id = s.id;
    let _cleanup = KillOnDrop(id);
    boot(&src, &s).await;
    let sum = write_file(&src, id, "keep", 24).await;
    src.vm_stop(id, Duration::from_secs(30))
        .await
        .expect("stop");
    match src.vm_release(id).await {
        Err(DriverError::InvalidState { state, .. }) => {
            assert!(state.contains("not in a shared pool"), "{state}")
        }
        other => panic!("release of a VM outside a pool: {other:?}"),
    }
    let export = src
        .vm_disk_export(id, &export_req(true))
        .await
        .expect("export");

    // The destination puts the VM into its own pool.
    let mut dst_spec = s.clone();
    dst_spec.pool = Some(pool.clone());
    let (seen, progress) = recorder();
    let importer = {
        let dst = dst.clone();
        let export = export.clone();
        tokio::spawn(async move { dst.vm_disk_import(&dst_spec, &export, &progress).await })
    };
    let t = Instant::now();
    loop {
        let done = seen
            .lock()
            .map(|v| v.iter().map(|p| p.done_bytes).max().unwrap_or(0))
            .unwrap_or(0);
        if done > 0 || t.elapsed() > Duration::from_secs(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        dst.vm_dir(id).join("disks").exists(),
        "the import is under way in the pool"
    );
    src.vm_disk_export_stop(id).await.expect("stop the export");
    let result = importer.await.expect("join");
    let cut_after = t.elapsed();
    match result {
        Err(e) => println!(
            "TIMING cold import cut after {} ms: {e}",
            cut_after.as_millis()
        ),
        Ok(o) => panic!("the import survived its source: {o:?}"),
    }
    assert!(!dst.vm_dir(id).exists(), "no VM directory left");
    assert!(
        !pool.join("vms").join(id.to_string()).exists(),
        "no disk left in the pool"
    );
    assert!(dst.vm_status(id).await.expect("status").is_none());

    src.vm_start(id).await.expect("the source starts again");
    wait_ready(&src, id, 2).await;
    assert_eq!(checksums(&src, id, &["keep"]).await, vec![sum]);
    src.vm_stop(id, Duration::ZERO).await.expect("stop");
    src.vm_destroy(id).await.expect("destroy");
}
