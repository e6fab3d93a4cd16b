//! Helpers shared by the real-QEMU test binaries: the test guest, a driver
//! on a data directory, waiting for boots and events, and killing a test's
//! QEMUs when it fails. Each binary compiles its own copy (so not every
//! binary uses every helper).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stratus_common::VmId;
use stratus_driver::{
    AccelChoice, BootSpec, Driver, ImageFormat, NicSpec, QemuConfig, QemuDriver, VmEvent,
    VmRuntimeState, VmSpec,
};
use tokio::sync::broadcast;

/// One guest at a time.
pub static QEMU_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub const BOOTED: &str = "stratus-guest: booted";

pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disk: PathBuf,
}

/// The test guest; fails (never skips) when it has not been built.
pub fn guest_image() -> GuestImage {
    let dir = match std::env::var_os("STRATUS_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/stratus/guest")
        }
    };
    let g = GuestImage {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        disk: dir.join("disk.qcow2"),
    };
    for f in [&g.kernel, &g.initrd, &g.disk, &dir.join("manifest.json")] {
        assert!(
            f.is_file(),
            "test guest image missing: {} does not exist. Run `bash scripts/build-guest-image.sh` \
             (or point STRATUS_GUEST_DIR at a built guest)",
            f.display()
        );
    }
    g
}

pub fn spec(g: &GuestImage, name: &str) -> VmSpec {
    VmSpec {
        id: VmId::new(),
        name: name.into(),
        vcpus: 1,
        memory_bytes: 128 << 20,
        disk_bytes: 64 << 20,
        image: g.disk.clone(),
        image_format: ImageFormat::Qcow2,
        restore_from: None,
        pool: None,
        boot: BootSpec::Kernel {
            kernel: g.kernel.clone(),
            initrd: Some(g.initrd.clone()),
            cmdline: "quiet".into(),
        },
        nic: NicSpec::User,
    }
}

pub async fn driver(data_dir: &Path) -> QemuDriver {
    let mut config = QemuConfig::new(data_dir);
    config.accel = AccelChoice::Tcg;
    QemuDriver::new(config).await.expect("QEMU driver starts")
}

/// Processes whose command line contains the VM id (any program).
pub fn processes_of(id: VmId) -> Vec<u32> {
    stratus_test_utils::live_processes_matching(&[&id.to_string()])
}

/// Kills every process of the VM when dropped, so a failing test leaves no
/// QEMU behind (they are daemonized and outlive the test process otherwise).
pub struct KillOnDrop(pub VmId);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in processes_of(self.0) {
            if let Some(pid) = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

pub async fn console_text(d: &dyn Driver, id: VmId) -> String {
    let chunk = d.console_read(id, 0, 4 << 20).await.expect("console_read");
    String::from_utf8_lossy(&chunk.data).into_owned()
}

/// Waits until the console shows `BOOTED` at least `count` times.
pub async fn wait_booted(d: &dyn Driver, id: VmId, count: usize, timeout: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let text = console_text(d, id).await;
        if text.matches(BOOTED).count() >= count {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < timeout,
            "console did not show {BOOTED:?} {count} time(s) within {timeout:?}; console:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn wait_event(
    rx: &mut broadcast::Receiver<VmEvent>,
    id: VmId,
    want: impl Fn(&VmRuntimeState) -> bool,
    timeout: Duration,
) -> VmEvent {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Ok(ev)) if ev.id == id && want(&ev.state) => return ev,
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => panic!("event channel: {e}"),
            Err(_) => panic!("no matching event for VM {id} within {timeout:?}"),
        }
    }
}

pub async fn state_of(d: &dyn Driver, id: VmId) -> VmRuntimeState {
    d.vm_status(id)
        .await
        .expect("vm_status")
        .expect("VM known")
        .state
}

/// Runs `sh -c script` in the guest; panics unless it exits 0. Its stdout.
pub async fn sh(d: &dyn Driver, id: VmId, script: &str) -> String {
    let out = d
        .guest_exec(
            id,
            &["sh".into(), "-c".into(), script.into()],
            Duration::from_secs(120),
        )
        .await
        .unwrap_or_else(|e| panic!("guest_exec of {script:?}: {e}"));
    assert_eq!(
        out.exit_code,
        0,
        "{script:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the VM has booted `boots` times and its guest agent runs
/// commands (the data disk is mounted by then).
pub async fn wait_ready(d: &dyn Driver, id: VmId, boots: usize) -> Duration {
    let t = Instant::now();
    wait_booted(d, id, boots, Duration::from_secs(120)).await;
    loop {
        if let Ok(out) = d
            .guest_exec(
                id,
                &[
                    "sh".into(),
                    "-c".into(),
                    "grep -q ' /mnt/disk ' /proc/mounts".into(),
                ],
                Duration::from_secs(10),
            )
            .await
        {
            assert_eq!(out.exit_code, 0, "/mnt/disk is not mounted in VM {id}");
            return t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "guest agent of VM {id} not answering"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Writes `mib` MiB of random data to /mnt/disk/`name` in the guest, flushed
/// to the disk; returns its SHA-256.
pub async fn write_file(d: &dyn Driver, id: VmId, name: &str, mib: u64) -> String {
    let out = sh(
        d,
        id,
        &format!(
            "dd if=/dev/urandom of=/mnt/disk/{name} bs=64k count={} 2>/dev/null && sync && \
             sha256sum /mnt/disk/{name}",
            mib * 16
        ),
    )
    .await;
    out.split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

/// The SHA-256 of each named file in /mnt/disk, or "absent".
pub async fn checksums(d: &dyn Driver, id: VmId, names: &[&str]) -> Vec<String> {
    let mut sums = Vec::new();
    for name in names {
        let out = sh(
            d,
            id,
            &format!(
                "if [ -e /mnt/disk/{name} ]; then sha256sum /mnt/disk/{name}; else echo absent; fi"
            ),
        )
        .await;
        sums.push(out.split_whitespace().next().unwrap_or("").to_string());
    }
    sums
}
