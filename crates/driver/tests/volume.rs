//! Real QEMU tests of data volumes (see `stratus_driver::volume`) on the tiny
//! test guest: hot-plug into a running VM, live resize, detach, re-attach,
//! attachment across a stop and start, a volume cloned from an image, and
//! the refusals (attached elsewhere, delete while attached, shrink, one
//! volume too many). The guest's view (`/dev/vdb`, `/sys/block/vdb/size`,
//! its serial) is read with `guest_exec`. Durations are printed as `TIMING`
//! lines (`--nocapture`).

mod common;

use std::time::{Duration, Instant};

use common::*;
use stratus_common::VmId;
use stratus_driver::{
    volume_serial, Driver, DriverError, ImageFormat, QemuDriver, StopHow, VolumeSpec,
    MAX_VOLUMES_PER_VM,
};

const MIB: u64 = 1 << 20;
/// How long the guest may take to notice a hot-plug, resize or unplug.
const GUEST_NOTICES: Duration = Duration::from_secs(30);

fn blank(size_bytes: u64) -> VolumeSpec {
    VolumeSpec {
        volume_id: uuid::Uuid::new_v4(),
        size_bytes,
        image: None,
        image_format: None,
    }
}

/// Runs `sh -c script` in the guest until it exits 0; its stdout, and how
/// long that took.
async fn guest_until(d: &dyn Driver, id: VmId, script: &str, what: &str) -> (String, Duration) {
    let t = Instant::now();
    loop {
        let out = d
            .guest_exec(
                id,
                &["sh".into(), "-c".into(), script.into()],
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|e| panic!("guest_exec of {script:?}: {e}"));
        if out.exit_code == 0 {
            return (
                String::from_utf8_lossy(&out.stdout).into_owned(),
                t.elapsed(),
            );
        }
        assert!(
            t.elapsed() < GUEST_NOTICES,
            "the guest did not see {what} within {GUEST_NOTICES:?}: {script:?} printed {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the guest has /dev/vdb of `bytes` with the volume's serial.
async fn guest_sees_vdb(d: &dyn Driver, id: VmId, volume: uuid::Uuid, bytes: u64) -> Duration {
    let sectors = bytes / 512;
    let serial = volume_serial(volume);
    let (_, took) = guest_until(
        d,
        id,
        &format!(
            "[ -b /dev/vdb ] && [ \"$(cat /sys/block/vdb/size)\" = {sectors} ] && \
             [ \"$(cat /sys/block/vdb/serial)\" = {serial} ]"
        ),
        &format!("/dev/vdb of {bytes} bytes with serial {serial}"),
    )
    .await;
    took
}

/// SHA-256 of the first MiB of /dev/vdb, read in the guest.
async fn vdb_checksum(d: &dyn Driver, id: VmId) -> String {
    sh(
        d,
        id,
        "dd if=/dev/vdb bs=64k count=16 2>/dev/null | sha256sum",
    )
    .await
    .split_whitespace()
    .next()
    .expect("sha256sum output")
    .to_string()
}

fn volume_file(data: &std::path::Path, volume: uuid::Uuid) -> std::path::PathBuf {
    data.join("driver/volumes").join(format!("{volume}.qcow2"))
}

async fn timed<T>(label: &str, f: impl std::future::Future<Output = T>) -> T {
    let t = Instant::now();
    let out = f.await;
    println!("TIMING {label}: {} ms", t.elapsed().as_millis());
    out
}

/// One running VM: a blank volume is hot-plugged, written, grown live,
/// unplugged, plugged again with its data, kept across a stop and start, and
/// finally detached and deleted. On the side, a stopped VM shows the
/// refusals: attached elsewhere, one volume too many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_volume_hotplug_resize_detach_and_restart() {
    let g = guest_image();
    let _one_at_a_time = QEMU_LOCK.lock().await;
    let data = tempfile::tempdir().expect("tempdir");
    let mut d = driver(&data.path().join("driver")).await;
    let s = spec(&g, "vol-hotplug");
    let id = s.id;
    let _cleanup = KillOnDrop(id);
    d.vm_create(&s).await.expect("create");
    d.vm_start(id).await.expect("start");
    let boot = wait_ready(&d, id, 1).await;
    println!("TIMING boot to guest agent {:.2} s", boot.as_secs_f64());
    assert_eq!(
        sh(&d, id, "ls /dev/vdb 2>/dev/null; true").await.trim(),
        "",
        "no /dev/vdb before any attach"
    );

    let v = blank(16 * MIB);
    let vid = v.volume_id;
    let info = timed("volume_create 16 MiB", d.volume_create(&v))
        .await
        .expect("create volume");
    assert_eq!((info.size_bytes, info.attached_to), (16 * MIB, None));
    assert!(info.allocated_bytes < MIB, "{info:?}");
    assert_eq!(
        d.volume_create(&v).await.expect("create is idempotent"),
        info
    );
    assert!(volume_file(data.path(), vid).is_file());

    // Hot-plug.
    timed("attach (hot-plug, QMP)", d.vm_volume_attach(id, vid))
        .await
        .expect("attach");
    let seen = guest_sees_vdb(&d, id, vid, 16 * MIB).await;
    println!(
        "TIMING attach -> guest sees /dev/vdb: {} ms",
        seen.as_millis()
    );
    d.vm_volume_attach(id, vid)
        .await
        .expect("attach is idempotent");
    let info = d.volume_info(vid).await.expect("info").expect("exists");
    assert_eq!(info.attached_to, Some(id));

    // Data.
    let written = sh(
        &d,
        id,
        "dd if=/dev/urandom of=/dev/vdb bs=64k count=16 conv=fsync 2>/dev/null && sync && \
         dd if=/dev/vdb bs=64k count=16 2>/dev/null | sha256sum",
    )
    .await;
    let sum = written
        .split_whitespace()
        .next()
        .expect("sha256sum")
        .to_string();
    let info = d.volume_info(vid).await.expect("info").expect("exists");
    assert!(info.allocated_bytes >= MIB, "{info:?}");

    // Live resize.
    let grown = timed(
        "resize live 16 -> 32 MiB (block_resize)",
        d.volume_resize(vid, 32 * MIB),
    )
    .await
    .expect("grow");
    assert_eq!(grown.size_bytes, 32 * MIB);
    let seen = guest_sees_vdb(&d, id, vid, 32 * MIB).await;
    println!(
        "TIMING resize -> guest sees 32 MiB: {} ms",
        seen.as_millis()
    );
    assert!(matches!(
        d.volume_resize(vid, 16 * MIB).await,
        Err(DriverError::InvalidVolumeSpec { .. })
    ));

    // Hot-unplug.
    timed(
        "detach (device_del until released, blockdev-del)",
        d.vm_volume_detach(id, vid),
    )
    .await
    .expect("detach");
    guest_until(&d, id, "! [ -e /dev/vdb ]", "/dev/vdb disappear").await;
    assert_eq!(
        d.volume_info(vid)
            .await
            .expect("info")
            .expect("exists")
            .attached_to,
        None
    );
    d.vm_volume_detach(id, vid)
        .await
        .expect("detach is idempotent");

    // Plugged again: the same data.
    timed("attach again (hot-plug)", d.vm_volume_attach(id, vid))
        .await
        .expect("attach again");
    guest_sees_vdb(&d, id, vid, 32 * MIB).await;
    assert_eq!(vdb_checksum(&d, id).await, sum);

    // An agent restart: a new driver finds the attachment in the VM's
    // record, and attaching again finds node and device already in QEMU.
    drop(d);
    d = driver(&data.path().join("driver")).await;
    let info = d.volume_info(vid).await.expect("info").expect("exists");
    assert_eq!(info.attached_to, Some(id));
    timed(
        "attach after an agent restart (already plugged)",
        d.vm_volume_attach(id, vid),
    )
    .await
    .expect("attach after restart");
    assert_eq!(vdb_checksum(&d, id).await, sum);

    // Refusals, on a second VM that is never started.
    let other = spec(&g, "vol-other");
    let _cleanup_other = KillOnDrop(other.id);
    d.vm_create(&other).await.expect("create other");
    match d.vm_volume_attach(other.id, vid).await {
        Err(DriverError::VolumeConflict { reason, .. }) => {
            assert!(reason.contains(&id.to_string()), "{reason}")
        }
        r => panic!("attach elsewhere: {r:?}"),
    }
    let mut extra = Vec::new();
    for _ in 0..MAX_VOLUMES_PER_VM {
        let x = blank(MIB);
        d.volume_create(&x).await.expect("create");
        d.vm_volume_attach(other.id, x.volume_id)
            .await
            .expect("attach to a stopped VM");
        extra.push(x.volume_id);
    }
    let x = blank(MIB);
    d.volume_create(&x).await.expect("create");
    let e = d
        .vm_volume_attach(other.id, x.volume_id)
        .await
        .expect_err("one volume too many");
    assert!(
        matches!(e, DriverError::InvalidState { .. })
            && e.to_string().contains("the most a VM can"),
        "{e}"
    );
    // Destroying the VM frees its volumes; their files stay.
    d.vm_destroy(other.id).await.expect("destroy other");
    for v in extra.iter().chain([&x.volume_id]) {
        let info = d
            .volume_info(*v)
            .await
            .expect("info")
            .expect("outlives the VM");
        assert_eq!(info.attached_to, None);
        d.volume_delete(*v).await.expect("delete");
        assert!(!volume_file(data.path(), *v).exists());
    }

    // Attached at boot: the volume comes back with the VM.
    let how = timed("stop", d.vm_stop(id, Duration::from_secs(30)))
        .await
        .expect("stop");
    assert_eq!(how, StopHow::Graceful);
    d.vm_start(id).await.expect("start again");
    wait_ready(&d, id, 2).await;
    guest_sees_vdb(&d, id, vid, 32 * MIB).await;
    assert_eq!(
        vdb_checksum(&d, id).await,
        sum,
        "data kept across the restart"
    );
    let mounted_root = sh(&d, id, "grep ' /mnt/disk ' /proc/mounts").await;
    assert!(
        mounted_root.starts_with("/dev/vda "),
        "the VM still boots from its own disk: {mounted_root}"
    );

    // No delete while attached; detach, then delete.
    match d.volume_delete(vid).await {
        Err(DriverError::VolumeConflict { reason, .. }) => {
            assert!(reason.contains("attached to VM"), "{reason}")
        }
        r => panic!("delete while attached: {r:?}"),
    }
    assert!(volume_file(data.path(), vid).is_file());
    timed("detach after restart", d.vm_volume_detach(id, vid))
        .await
        .expect("detach");
    guest_until(&d, id, "! [ -e /dev/vdb ]", "/dev/vdb disappear").await;
    d.volume_delete(vid).await.expect("delete");
    assert!(!volume_file(data.path(), vid).exists());
    assert!(d.volume_info(vid).await.expect("info").is_none());
    d.volume_delete(vid).await.expect("delete is idempotent");
    d.vm_destroy(id).await.expect("destroy");
}

/// A volume cloned from the test guest's own disk image (ext4), grown on
/// creation and again offline, attached to a stopped VM: the guest sees it at
/// boot at its full size and can mount it. It outlives the VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_volume_from_image_attached_at_boot() {
    let g = guest_image();
    let _one_at_a_time = QEMU_LOCK.lock().await;
    let data = tempfile::tempdir().expect("tempdir");
    let d: QemuDriver = driver(&data.path().join("driver")).await;
    let s = spec(&g, "vol-image");
    let id = s.id;
    let _cleanup = KillOnDrop(id);
    d.vm_create(&s).await.expect("create");

    let image = VolumeSpec {
        volume_id: uuid::Uuid::new_v4(),
        size_bytes: 96 * MIB,
        image: Some(g.disk.clone()),
        image_format: Some(ImageFormat::Qcow2),
    };
    let vid = image.volume_id;
    let info = timed("volume_create from image", d.volume_create(&image))
        .await
        .expect("create from image");
    assert_eq!(info.size_bytes, 96 * MIB);
    let mut too_small = image.clone();
    too_small.volume_id = uuid::Uuid::new_v4();
    too_small.size_bytes = MIB;
    assert!(matches!(
        d.volume_create(&too_small).await,
        Err(DriverError::InvalidVolumeSpec { .. })
    ));
    let mut changed = image.clone();
    changed.size_bytes = 128 * MIB;
    assert!(matches!(
        d.volume_create(&changed).await,
        Err(DriverError::VolumeConflict { .. })
    ));

    d.vm_volume_attach(id, vid)
        .await
        .expect("attach to a stopped VM");
    let grown = timed(
        "resize offline 96 -> 112 MiB (qemu-img)",
        d.volume_resize(vid, 112 * MIB),
    )
    .await
    .expect("grow offline");
    assert_eq!((grown.size_bytes, grown.attached_to), (112 * MIB, Some(id)));

    d.vm_start(id).await.expect("start");
    wait_ready(&d, id, 1).await;
    guest_sees_vdb(&d, id, vid, 112 * MIB).await;
    let listing = sh(
        &d,
        id,
        "mkdir -p /mnt/vol && mount -t ext4 -o ro /dev/vdb /mnt/vol && ls -a /mnt/vol && \
         umount /mnt/vol",
    )
    .await;
    assert!(listing.contains("lost+found"), "{listing}");

    // The VM goes; the volume stays, free for another VM.
    d.vm_destroy(id).await.expect("destroy");
    let info = d
        .volume_info(vid)
        .await
        .expect("info")
        .expect("outlives the VM");
    assert_eq!((info.size_bytes, info.attached_to), (112 * MIB, None));
    d.volume_delete(vid).await.expect("delete");
    assert!(!volume_file(data.path(), vid).exists());
}
