//! Real QEMU tests of live migration (see `stratus_driver::migrate`) between
//! two QEMU drivers with separate data directories on this machine, over
//! loopback: the destination prepares, the source sends, the destination
//! finishes. The guest writes a file (checksummed in the guest), prints a
//! counter to its console and rewrites a 64 MiB tmpfs file in a loop while
//! it moves. Each test runs two QEMUs (source and destination) at a time.
//! Figures are printed as `TIMING` lines (`--nocapture`).

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use stratus_common::VmId;
use stratus_driver::{
    BackupMode, BackupParent, BackupRequest, Driver, DriverError, IncomingDisk, IncomingReady,
    IncomingRequest, MigrateOutcome, MigratePhase, MigrateProgress, MigrateRequest, QemuDriver,
    SnapshotRequest, VmRuntimeState, VmSpec,
};

const FINISH_TIMEOUT: Duration = Duration::from_secs(60);

/// A 256 MiB guest (room for the 64 MiB tmpfs file the load writes).
fn big_spec(name: &str) -> VmSpec {
    let mut s = spec(&guest_image(), name);
    s.memory_bytes = 256 << 20;
    s
}

async fn boot(d: &QemuDriver, s: &VmSpec) {
    d.vm_create(s).await.expect("create");
    d.vm_start(s.id).await.expect("start");
    wait_ready(d, s.id, 1).await;
}

/// Starts the guest's console counter (`tick N` every 200 ms on ttyS0).
async fn start_counter(d: &QemuDriver, id: VmId) {
    sh(
        d,
        id,
        "setsid sh -c 'i=0; while :; do echo tick $i > /dev/ttyS0; i=$((i+1)); sleep 0.2; done' \
         </dev/null >/dev/null 2>&1 &",
    )
    .await;
}

/// Starts the memory load: a 64 MiB file in tmpfs rewritten from a random
/// 1 MiB block, over and over (random, so QEMU cannot send zero pages).
async fn start_memory_load(d: &QemuDriver, id: VmId) {
    sh(
        d,
        id,
        "mkdir -p /hammer && mount -t tmpfs -o size=80m tmpfs /hammer && \
         head -c 1048576 /dev/urandom > /hammer/r && \
         setsid sh -c 'while :; do for i in $(seq 64); do cat /hammer/r; done > /hammer/f; done' \
         </dev/null >/dev/null 2>&1 &",
    )
    .await;
}

/// The numbers of the `tick N` lines in a console text.
fn ticks(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("tick "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

fn pid_of_status(st: Option<stratus_driver::VmStatus>) -> u32 {
    st.expect("known").pid.expect("pid")
}

type Seen = Arc<Mutex<Vec<MigrateProgress>>>;

fn recorder() -> (Seen, impl Fn(MigrateProgress) + Send + Sync + 'static) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    (seen, move |p| {
        s.lock().unwrap_or_else(|e| e.into_inner()).push(p)
    })
}

fn print_outcome(what: &str, o: &MigrateOutcome) {
    println!(
        "TIMING {what}: total {} ms, downtime {} ms (mirror drain {} ms), setup {} ms (mirror {} ms), QEMU migration {} ms, \
         finish {} ms, memory {} KiB, disk {} KiB, passes {}, postcopy {}",
        o.total_ms,
        o.downtime_ms,
        o.mirror_drain_ms,
        o.setup_ms,
        o.mirror_ms,
        o.qemu_ms,
        o.finish_ms,
        o.memory_bytes >> 10,
        o.disk_bytes >> 10,
        o.passes,
        o.postcopy
    );
}

fn request(disk: IncomingDisk) -> IncomingRequest {
    IncomingRequest {
        request_id: uuid::Uuid::new_v4(),
        disk,
        volumes: vec![],
        chain: None,
        postcopy: false,
    }
}

fn migrate_req(ready: IncomingReady, max_bandwidth: Option<u64>) -> MigrateRequest {
    MigrateRequest {
        ready,
        max_bandwidth,
        auto_converge: true,
        postcopy_after_passes: None,
        downtime_limit_ms: None,
        same_base: false,
    }
}

/// Every file under `dir`, relative.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    out
}

/// The whole path: a guest writing memory hard, a disk mirrored over NBD
/// (only the guest's own writes: the base image is shared), a backup bitmap
/// that must arrive with the VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_live_migration_with_a_mirrored_disk_keeps_the_guest_running() {
    let _one_at_a_time = QEMU_LOCK.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = driver(&tmp.path().join("src")).await;
    let dst = driver(&tmp.path().join("dst")).await;
    let s = big_spec("mig-live");
    let id = s.id;
    let _cleanup = KillOnDrop(id);
    boot(&src, &s).await;
    let src_pid = pid_of_status(src.vm_status(id).await.expect("status"));

    let sum = write_file(&src, id, "keep", 4).await;
    let boot_id = sh(&src, id, "cat /proc/sys/kernel/random/boot_id").await;
    // A full backup leaves the persistent bitmap an incremental one needs.
    let backups = tmp.path().join("backups");
    std::fs::create_dir_all(&backups).expect("mkdir");
    let full = BackupRequest {
        backup_id: uuid::Uuid::new_v4(),
        volume_parents: Vec::new(),
        target: backups.join("full.qcow2"),
        parent: None,
    };
    let out = src
        .vm_backup(id, &full, &|_| {})
        .await
        .expect("full backup");
    assert_eq!(out.mode, BackupMode::Full);
    start_counter(&src, id).await;
    start_memory_load(&src, id).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let req = request(IncomingDisk::Overlay);
    let t = Instant::now();
    let ready = dst.vm_migrate_prepare(&s, &req).await.expect("prepare");
    println!("TIMING prepare: {} ms", t.elapsed().as_millis());
    assert_eq!(
        dst.vm_migrate_prepare(&s, &req).await.expect("again"),
        ready,
        "a retried prepare returns the same answer"
    );
    assert!(ready.nbd.is_some());
    assert_eq!(ready.disk_backing.as_deref(), Some(s.image.as_path()));
    assert_eq!(state_of(&dst, id).await, VmRuntimeState::Paused);
    assert!(
        matches!(
            dst.vm_start(id).await,
            Err(DriverError::InvalidState { .. })
        ),
        "an incoming VM is not started by hand"
    );
    let dst_pid = pid_of_status(dst.vm_status(id).await.expect("status"));
    let ticks_before = ticks(&console_text(&src, id).await);
    assert!(!ticks_before.is_empty(), "the counter runs on the source");

    let (seen, progress) = recorder();
    let mut dst_events = dst.subscribe();
    let outcome = src
        .vm_migrate_send(id, &migrate_req(ready, Some(1 << 30)), &progress)
        .await
        .unwrap_or_else(|e| panic!("send: {e} ({e:?})"));
    print_outcome("live migration, mirrored disk, 64 MiB tmpfs load", &outcome);
    dst.vm_migrate_finish(id, FINISH_TIMEOUT)
        .await
        .expect("finish");
    wait_event(
        &mut dst_events,
        id,
        |s| *s == VmRuntimeState::Running,
        Duration::from_secs(1),
    )
    .await;
    {
        let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        let phases: Vec<MigratePhase> = seen.iter().filter_map(|p| p.phase).collect();
        assert!(phases.contains(&MigratePhase::MirroringDisk), "{phases:?}");
        assert!(
            phases.contains(&MigratePhase::MigratingMemory),
            "{phases:?}"
        );
        let max_dirty = seen.iter().map(|p| p.dirty_rate_bytes_per_sec).max();
        println!(
            "TIMING progress reports: {}, highest dirty rate {:?} B/s",
            seen.len(),
            max_dirty
        );
    }
    assert!(outcome.memory_bytes > 0 && outcome.downtime_ms > 0);
    assert!(
        outcome.disk_bytes < 64 << 20,
        "only the guest's writes are mirrored, not the base image: {}",
        outcome.disk_bytes
    );

    // The VM runs on the destination, same QEMU as prepared, and is gone here.
    let st = dst.vm_status(id).await.expect("status").expect("known");
    assert_eq!(st.state, VmRuntimeState::Running);
    assert_eq!(st.pid, Some(dst_pid));
    assert!(src.vm_status(id).await.expect("status").is_none());
    assert!(src.vm_list().await.expect("list").is_empty());
    assert!(!src.vm_dir(id).exists(), "the source keeps no files");
    assert!(process_gone(src_pid).await, "the source QEMU ended");
    assert_eq!(
        processes_of(id),
        vec![dst_pid],
        "one QEMU of the VM, the destination's"
    );

    // The same guest: no reboot, the counter continued, the file is intact.
    assert_eq!(
        sh(&dst, id, "cat /proc/sys/kernel/random/boot_id").await,
        boot_id
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = ticks(&console_text(&dst, id).await);
    let last_before = *ticks_before.last().expect("ticks");
    assert!(
        after.first().is_some_and(|t| *t > last_before),
        "the counter goes on from {last_before} on the destination: {after:?}"
    );
    assert!(!console_text(&dst, id).await.contains(BOOTED), "no reboot");
    assert_eq!(checksums(&dst, id, &["keep"]).await, vec![sum]);
    assert!(
        sh(&dst, id, "ls -l /hammer/f").await.contains("hammer"),
        "the load's tmpfs came along"
    );

    // The backup bitmap came along: the next backup is incremental.
    let inc = BackupRequest {
        backup_id: uuid::Uuid::new_v4(),
        volume_parents: Vec::new(),
        target: backups.join("inc.qcow2"),
        parent: Some(BackupParent {
            backup_id: full.backup_id,
            file: full.target.clone(),
        }),
    };
    let out = dst
        .vm_backup(id, &inc, &|_| {})
        .await
        .expect("incremental backup on the destination");
    assert_eq!(
        (out.mode, out.fallback_reason.clone()),
        (BackupMode::Incremental, None),
        "the stratus-backup bitmap survived the migration"
    );

    dst.vm_stop(id, Duration::ZERO).await.expect("stop");
    dst.vm_destroy(id).await.expect("destroy");
}

async fn process_gone(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z"))
                .unwrap_or(true)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Both hosts see the VM's shared storage pool: nothing is mirrored, the
/// destination opens the chain in the pool (a snapshot layer included),
/// which stays where it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_live_migration_with_a_shared_disk() {
    let _one_at_a_time = QEMU_LOCK.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = driver(&tmp.path().join("src")).await;
    let dst = driver(&tmp.path().join("dst")).await;
    let pool = tmp.path().join("pool");
    std::fs::create_dir_all(&pool).expect("pool dir");
    let mut s = big_spec("mig-shared");
    s.pool = Some(pool.clone());
    let id = s.id;
    let _cleanup = KillOnDrop(id);
    boot(&src, &s).await;
    let sum = write_file(&src, id, "keep", 2).await;
    let snap = src
        .vm_snapshot_create(
            id,
            &stratus_driver::SnapshotRequest {
                snapshot_id: uuid::Uuid::new_v4(),
                name: "before-move".into(),
            },
        )
        .await
        .expect("snapshot");
    start_counter(&src, id).await;
    let disks = pool.join("vms").join(id.to_string());
    let disk = disks.join("disk.qcow2");
    assert!(disk.is_file(), "the disk is in the pool");
    let ready = dst
        .vm_migrate_prepare(&s, &request(IncomingDisk::Pool))
        .await
        .expect("prepare");
    assert!(ready.nbd.is_none());
    let outcome = src
        .vm_migrate_send(id, &migrate_req(ready, Some(1 << 30)), &|_| {})
        .await
        .unwrap_or_else(|e| panic!("send: {e} ({e:?})"));
    print_outcome("live migration, shared disk", &outcome);
    assert_eq!(outcome.disk_bytes, 0);
    dst.vm_migrate_finish(id, FINISH_TIMEOUT)
        .await
        .expect("finish");
    assert_eq!(state_of(&dst, id).await, VmRuntimeState::Running);
    assert_eq!(checksums(&dst, id, &["keep"]).await, vec![sum.clone()]);
    let sum2 = write_file(&dst, id, "after", 1).await;
    assert!(
        !src.vm_dir(id).exists(),
        "the source keeps nothing: {:?}",
        files_under(&src.vm_dir(id))
    );
    assert_eq!(
        dst.vm_snapshot_list(id).await.expect("snapshots")[0].snapshot_id,
        snap.snapshot_id,
        "the snapshot moved with the chain"
    );
    assert!(src.vm_status(id).await.expect("status").is_none());
    // A stop and start on the destination opens the shared file again.
    dst.vm_stop(id, Duration::ZERO).await.expect("stop");
    dst.vm_start(id).await.expect("start");
    wait_ready(&dst, id, 1).await;
    assert_eq!(
        checksums(&dst, id, &["keep", "after"]).await,
        vec![sum, sum2]
    );
    dst.vm_destroy(id).await.expect("destroy");
    assert!(
        !disks.exists(),
        "destroying the VM removes its disks from the pool"
    );
}

/// A cancel and a destination that dies mid-migration both leave the VM
/// running on the source with its guest answering, and the destination
/// empty after `vm_migrate_abort_incoming`. Refusals come before anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_failed_and_cancelled_migrations_leave_the_vm_on_the_source() {
    let _one_at_a_time = QEMU_LOCK.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = Arc::new(driver(&tmp.path().join("src")).await);
    let dst = driver(&tmp.path().join("dst")).await;
    let s = big_spec("mig-fail");
    let id = s.id;
    let _cleanup = KillOnDrop(id);
    boot(&src, &s).await;
    let src_pid = pid_of_status(src.vm_status(id).await.expect("status"));
    let sum = write_file(&*src, id, "keep", 2).await;
    start_memory_load(&src, id).await;

    for how in ["cancel", "kill the destination"] {
        let ready = dst
            .vm_migrate_prepare(&s, &request(IncomingDisk::Overlay))
            .await
            .expect("prepare");
        let dst_pid = pid_of_status(dst.vm_status(id).await.expect("status"));
        let (seen, progress) = recorder();
        // 4 MiB/s: the 64 MiB the load keeps dirty take many seconds.
        let req = migrate_req(ready, Some(4 << 20));
        let sender = src.clone();
        let send = tokio::spawn(async move { sender.vm_migrate_send(id, &req, &progress).await });
        let t = Instant::now();
        loop {
            let memory = seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|p| {
                    p.phase == Some(MigratePhase::MigratingMemory) && p.memory_transferred_bytes > 0
                });
            if memory {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{how}: memory migration did not start"
            );
            assert!(!send.is_finished(), "{how}: the send ended early");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if how == "cancel" {
            src.vm_migrate_cancel(id).await.expect("cancel");
        } else {
            rustix::process::kill_process(
                rustix::process::Pid::from_raw(i32::try_from(dst_pid).expect("pid")).expect("pid"),
                rustix::process::Signal::KILL,
            )
            .expect("kill the destination QEMU");
        }
        let result = tokio::time::timeout(Duration::from_secs(90), send)
            .await
            .expect("the send ends")
            .expect("task");
        let err = result.expect_err("the migration must fail");
        println!("{how}: send failed with: {err} ({err:?})");
        assert!(matches!(err, DriverError::Migration { .. }), "{err:?}");

        let st = src.vm_status(id).await.expect("status").expect("known");
        assert_eq!(
            st.state,
            VmRuntimeState::Running,
            "{how}: the VM runs on the source"
        );
        assert_eq!(st.pid, Some(src_pid), "{how}: in the same QEMU");
        assert_eq!(sh(&*src, id, "echo alive").await.trim(), "alive");
        assert_eq!(checksums(&*src, id, &["keep"]).await, vec![sum.clone()]);

        dst.vm_migrate_abort_incoming(id).await.expect("abort");
        dst.vm_migrate_abort_incoming(id)
            .await
            .expect("abort is idempotent");
        assert_eq!(
            processes_of(id),
            vec![src_pid],
            "{how}: no destination QEMU"
        );
        assert!(!dst.vm_dir(id).exists(), "{how}: no destination files");
        assert!(dst.vm_list().await.expect("list").is_empty());
    }

    // Refusals come before anything changes.
    let ready = dst
        .vm_migrate_prepare(&s, &request(IncomingDisk::Overlay))
        .await
        .expect("prepare");
    let mut wrong = ready.clone();
    wrong.machine = "pc-q35-2.0".into();
    let err = src
        .vm_migrate_send(id, &migrate_req(wrong, None), &|_| {})
        .await
        .expect_err("refused");
    assert!(
        matches!(&err, DriverError::MigrationRefused { reason, .. } if reason.contains("machine type")),
        "{err}"
    );
    src.vm_snapshot_create(
        id,
        &SnapshotRequest {
            snapshot_id: uuid::Uuid::new_v4(),
            name: "s1".into(),
        },
    )
    .await
    .expect("snapshot");
    let err = src
        .vm_migrate_send(id, &migrate_req(ready, None), &|_| {})
        .await
        .expect_err("refused");
    assert!(
        // The destination was prepared without the disk's layers (a
        // snapshot taken since): nothing moves, the VM stays.
        matches!(&err, DriverError::MigrationRefused { reason, .. } if reason.contains("prepared for 0 layer(s)")),
        "{err}"
    );
    assert_eq!(state_of(&*src, id).await, VmRuntimeState::Running);
    dst.vm_migrate_abort_incoming(id).await.expect("abort");
    src.vm_destroy(id).await.expect("destroy");
}

async fn tls_driver(data_dir: &Path, tls: Option<&Path>) -> QemuDriver {
    let mut config = stratus_driver::QemuConfig::new(data_dir);
    config.accel = stratus_driver::AccelChoice::Tcg;
    config.migration_tls_dir = tls.map(Path::to_path_buf);
    QemuDriver::new(config).await.expect("QEMU driver starts")
}

/// Both hosts encrypt: the memory stream and the NBD disk mirror run over
/// TLS with certificates from one CA; a host without TLS is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_live_migration_over_tls() {
    let _one_at_a_time = QEMU_LOCK.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let certs = tmp.path().join("certs");
    std::fs::create_dir_all(&certs).expect("mkdir");
    stratus_test_utils::migration_tls_certificates(&certs);
    let src = tls_driver(&tmp.path().join("src"), Some(&certs)).await;
    let plain = tls_driver(&tmp.path().join("plain"), None).await;
    let dst = tls_driver(&tmp.path().join("dst"), Some(&certs)).await;
    // What the agents report, so the scheduler pairs hosts alike.
    assert!(src.host_facts().await.expect("facts").migration_tls);
    assert!(!plain.host_facts().await.expect("facts").migration_tls);
    let s = big_spec("mig-tls");
    let id = s.id;
    let _cleanup = KillOnDrop(id);
    boot(&src, &s).await;
    let sum = write_file(&src, id, "keep", 2).await;
    start_counter(&src, id).await;

    let ready = plain
        .vm_migrate_prepare(&s, &request(IncomingDisk::Overlay))
        .await
        .expect("prepare without TLS");
    assert!(!ready.tls);
    let err = src
        .vm_migrate_send(id, &migrate_req(ready, None), &|_| {})
        .await
        .expect_err("refused");
    assert!(
        matches!(&err, DriverError::MigrationRefused { reason, .. } if reason.contains("TLS")),
        "{err}"
    );
    plain.vm_migrate_abort_incoming(id).await.expect("abort");

    let ready = dst
        .vm_migrate_prepare(&s, &request(IncomingDisk::Overlay))
        .await
        .expect("prepare");
    assert!(ready.tls);
    let outcome = src
        .vm_migrate_send(id, &migrate_req(ready, Some(1 << 30)), &|_| {})
        .await
        .unwrap_or_else(|e| panic!("send: {e} ({e:?})"));
    print_outcome("live migration over TLS, mirrored disk", &outcome);
    dst.vm_migrate_finish(id, FINISH_TIMEOUT)
        .await
        .expect("finish");
    assert_eq!(state_of(&dst, id).await, VmRuntimeState::Running);
    assert_eq!(checksums(&dst, id, &["keep"]).await, vec![sum]);
    assert!(!src.vm_dir(id).exists());
    dst.vm_destroy(id).await.expect("destroy");
}

/// A guest that dirties memory faster than the bandwidth limit lets QEMU
/// send it never converges in pre-copy: after two passes the source
/// switches to post-copy and the guest finishes its move on the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_postcopy_when_precopy_does_not_converge() {
    let _one_at_a_time = QEMU_LOCK.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = driver(&tmp.path().join("src")).await;
    let dst = driver(&tmp.path().join("dst")).await;
    let s = big_spec("mig-postcopy");
    let id = s.id;
    let _cleanup = KillOnDrop(id);
    boot(&src, &s).await;
    let sum = write_file(&src, id, "keep", 2).await;
    let boot_id = sh(&src, id, "cat /proc/sys/kernel/random/boot_id").await;
    start_memory_load(&src, id).await;
    let mut req = request(IncomingDisk::Overlay);
    req.postcopy = true;
    let ready = dst.vm_migrate_prepare(&s, &req).await.expect("prepare");
    let mut mreq = migrate_req(ready, Some(32 << 20));
    mreq.auto_converge = false;
    mreq.postcopy_after_passes = Some(2);
    mreq.downtime_limit_ms = Some(10);
    let outcome = src
        .vm_migrate_send(id, &mreq, &|_| {})
        .await
        .unwrap_or_else(|e| panic!("send: {e} ({e:?})"));
    print_outcome(
        "post-copy migration, mirrored disk, 64 MiB tmpfs load",
        &outcome,
    );
    assert!(outcome.postcopy, "the migration switched to post-copy");
    dst.vm_migrate_finish(id, FINISH_TIMEOUT)
        .await
        .expect("finish");
    assert_eq!(state_of(&dst, id).await, VmRuntimeState::Running);
    assert_eq!(
        sh(&dst, id, "cat /proc/sys/kernel/random/boot_id").await,
        boot_id
    );
    assert_eq!(checksums(&dst, id, &["keep"]).await, vec![sum]);
    assert!(!src.vm_dir(id).exists());
    dst.vm_destroy(id).await.expect("destroy");
}

/// A VM moves from pool A to pool B, each with its own copy of the image
/// (same content, another path): refused unless the controller vouches
/// for the same base, then only the VM's writes are mirrored into an
/// overlay made in B, and nothing of the VM is left in A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_live_migration_into_another_pool() {
    let _one_at_a_time = QEMU_LOCK.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = driver(&tmp.path().join("src")).await;
    let dst = driver(&tmp.path().join("dst")).await;
    let g = guest_image();
    let mut pools = Vec::new();
    for name in ["pool-a", "pool-b"] {
        let pool = tmp.path().join(name);
        std::fs::create_dir_all(pool.join("images")).expect("pool");
        std::fs::copy(&g.disk, pool.join("images/guest.qcow2")).expect("image cache");
        pools.push(pool);
    }
    let (pool_a, pool_b) = (pools[0].clone(), pools[1].clone());
    let mut s = big_spec("mig-pools");
    s.pool = Some(pool_a.clone());
    s.image = pool_a.join("images/guest.qcow2");
    let mut dst_spec = s.clone();
    dst_spec.pool = Some(pool_b.clone());
    dst_spec.image = pool_b.join("images/guest.qcow2");
    let id = s.id;
    let _cleanup = KillOnDrop(id);
    boot(&src, &s).await;
    let sum = write_file(&src, id, "keep", 4).await;
    start_counter(&src, id).await;
    let a_disks = pool_a.join("vms").join(id.to_string());
    let b_disks = pool_b.join("vms").join(id.to_string());
    assert!(a_disks.join("disk.qcow2").is_file());

    // Without same_base: refused, nothing changes.
    let ready = dst
        .vm_migrate_prepare(&dst_spec, &request(IncomingDisk::Overlay))
        .await
        .expect("prepare");
    assert!(
        b_disks.join("disk.qcow2").is_file(),
        "the overlay is made in B"
    );
    assert_eq!(
        ready.disk_backing.as_deref(),
        Some(dst_spec.image.as_path())
    );
    match src
        .vm_migrate_send(id, &migrate_req(ready.clone(), Some(1 << 30)), &|_| {})
        .await
    {
        Err(DriverError::MigrationRefused { reason, .. }) => {
            assert!(reason.contains("same_base"), "{reason}")
        }
        other => panic!("another base path without same_base: {other:?}"),
    }
    assert_eq!(state_of(&src, id).await, VmRuntimeState::Running);

    let mut req = migrate_req(ready, Some(1 << 30));
    req.same_base = true;
    let outcome = src
        .vm_migrate_send(id, &req, &|_| {})
        .await
        .unwrap_or_else(|e| panic!("send: {e} ({e:?})"));
    print_outcome("live migration, pool A to pool B", &outcome);
    assert!(
        outcome.disk_bytes < 32 << 20,
        "only the VM's writes are mirrored: {}",
        outcome.disk_bytes
    );
    dst.vm_migrate_finish(id, FINISH_TIMEOUT)
        .await
        .expect("finish");
    assert_eq!(checksums(&dst, id, &["keep"]).await, vec![sum.clone()]);
    assert!(!src.vm_dir(id).exists(), "the source keeps nothing");
    assert!(
        !a_disks.exists(),
        "the VM left pool A: {:?}",
        files_under(&a_disks)
    );
    assert_eq!(
        std::fs::read_link(dst.vm_dir(id).join("disks")).expect("disks link"),
        b_disks
    );
    assert!(b_disks.join("disk.qcow2").is_file());
    // A restart opens the overlay in B over B's image.
    dst.vm_stop(id, Duration::ZERO).await.expect("stop");
    dst.vm_start(id).await.expect("start");
    wait_ready(&dst, id, 1).await;
    assert_eq!(checksums(&dst, id, &["keep"]).await, vec![sum]);
    dst.vm_stop(id, Duration::ZERO).await.expect("stop");
    dst.vm_destroy(id).await.expect("destroy");
    assert!(!b_disks.exists());
}
