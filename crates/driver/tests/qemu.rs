//! Real QEMU tests of the QEMU driver, on the tiny test guest built by
//! `scripts/build-guest-image.sh` (Debian cloud kernel, busybox init, real
//! qemu-guest-agent). TCG only, except the probe test. The tests run one at a
//! time (a global lock) so at most one guest boots at once on a 2-core host.
//! Timings are printed as `TIMING` lines (`cargo test -- --nocapture`).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stratus_common::VmId;
use stratus_driver::{
    probe_accel, Accel, AccelChoice, BootSpec, Driver, DriverError, ImageFormat, NicSpec,
    QemuConfig, QemuDriver, StopHow, VmRuntimeState, VmSpec,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_guest_lifecycle() {
    let g = guest_image();
    let _one_at_a_time = QEMU_LOCK.lock().await;
    let data = tempfile::tempdir().expect("tempdir");
    let qemu = driver(data.path()).await;
    let d: Arc<dyn Driver> = Arc::new(qemu);
    let mut events = d.subscribe();
    let s = spec(&g, "lifecycle");
    let id = s.id;
    let _cleanup = KillOnDrop(id);

    let t = Instant::now();
    d.vm_create(&s).await.expect("create");
    println!("TIMING create (overlay) {} ms", t.elapsed().as_millis());
    d.vm_create(&s).await.expect("create again is a no-op");
    assert_eq!(state_of(&*d, id).await, VmRuntimeState::Stopped);

    // Boot.
    let t = Instant::now();
    d.vm_start(id).await.expect("start");
    println!(
        "TIMING vm_start returned after {:.2} s",
        t.elapsed().as_secs_f64()
    );
    wait_event(
        &mut events,
        id,
        |s| *s == VmRuntimeState::Running,
        Duration::from_secs(5),
    )
    .await;
    d.vm_start(id)
        .await
        .expect("start while running is a no-op");
    let status = d.vm_status(id).await.expect("status").expect("known");
    assert_eq!(status.state, VmRuntimeState::Running);
    let pid = status.pid.expect("pid while running");
    assert_eq!(processes_of(id), vec![pid], "exactly one QEMU for the VM");
    wait_booted(&*d, id, 1, Duration::from_secs(90)).await;
    println!(
        "TIMING start -> console booted {:.2} s",
        t.elapsed().as_secs_f64()
    );

    // Guest agent.
    let info = loop {
        let info = d.guest_info(id).await.expect("guest_info");
        if info.connected && info.ip_addresses.iter().any(|a| a == "10.0.2.15") {
            break info;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "guest agent not answering with 10.0.2.15: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!(
        "TIMING start -> guest agent connected with IP {:.2} s",
        t.elapsed().as_secs_f64()
    );
    println!("guest info: {info:?}");
    assert!(
        info.os_name.as_deref().is_some_and(|n| !n.is_empty()),
        "{info:?}"
    );
    assert!(info.kernel.is_some(), "{info:?}");
    assert!(info.last_contact.is_some());
    assert!(!info
        .ip_addresses
        .iter()
        .any(|a| a.starts_with("127.") || a == "::1"));

    let out = d
        .guest_exec(id, &["echo".into(), "hi".into()], Duration::from_secs(20))
        .await
        .expect("guest_exec");
    assert_eq!(out.exit_code, 0);
    assert_eq!(out.stdout, b"hi\n");
    let out = d
        .guest_exec(
            id,
            &["sh".into(), "-c".into(), "echo oops >&2; exit 3".into()],
            Duration::from_secs(20),
        )
        .await
        .expect("guest_exec");
    assert_eq!((out.exit_code, out.stderr.as_slice()), (3, &b"oops\n"[..]));

    // Reboot: a second boot shows on the console.
    let t = Instant::now();
    d.vm_reboot(id).await.expect("reboot");
    wait_booted(&*d, id, 2, Duration::from_secs(90)).await;
    println!(
        "TIMING reboot -> console booted again {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(state_of(&*d, id).await, VmRuntimeState::Running);

    // Stop.
    let t = Instant::now();
    let how = d.vm_stop(id, Duration::from_secs(30)).await.expect("stop");
    println!(
        "TIMING stop: {how:?} after {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert_ne!(how, StopHow::AlreadyStopped);
    assert_eq!(state_of(&*d, id).await, VmRuntimeState::Stopped);
    wait_event(
        &mut events,
        id,
        |s| *s == VmRuntimeState::Stopped,
        Duration::from_secs(5),
    )
    .await;
    assert!(processes_of(id).is_empty(), "QEMU gone after stop");
    assert_eq!(
        d.vm_stop(id, Duration::from_secs(1))
            .await
            .expect("stop again"),
        StopHow::AlreadyStopped
    );
    assert!(matches!(
        d.vm_reboot(id).await,
        Err(DriverError::InvalidState { .. })
    ));
    let info = d.guest_info(id).await.expect("guest_info while stopped");
    assert!(!info.connected && info.last_contact.is_some());

    // Start again, then kill QEMU behind the driver's back: a crash.
    d.vm_start(id).await.expect("start again");
    wait_booted(&*d, id, 3, Duration::from_secs(90)).await;
    let pid = d
        .vm_status(id)
        .await
        .expect("status")
        .expect("known")
        .pid
        .expect("pid");
    let t = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let ev = wait_event(
        &mut events,
        id,
        |s| matches!(s, VmRuntimeState::Crashed { .. }),
        Duration::from_secs(10),
    )
    .await;
    println!(
        "TIMING kill -9 -> Crashed event {:.2} s ({:?})",
        t.elapsed().as_secs_f64(),
        ev.state
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    match state_of(&*d, id).await {
        VmRuntimeState::Crashed { reason } => {
            assert!(reason.contains("QEMU exited unexpectedly"), "{reason}")
        }
        other => panic!("expected crashed, got {other:?}"),
    }

    // A restarted driver still says crashed.
    drop(d);
    let d: Arc<dyn Driver> = Arc::new(driver(data.path()).await);
    assert!(matches!(
        state_of(&*d, id).await,
        VmRuntimeState::Crashed { .. }
    ));

    // Destroy leaves nothing behind.
    let vm_dir = data.path().join("vms").join(id.to_string());
    assert!(vm_dir.join("disk.qcow2").exists());
    d.vm_destroy(id).await.expect("destroy");
    d.vm_destroy(id).await.expect("destroy again is a no-op");
    assert!(
        !vm_dir.exists(),
        "run dir, overlay, sockets and logs removed"
    );
    assert!(processes_of(id).is_empty());
    assert!(d.vm_status(id).await.expect("status").is_none());
    assert!(d.vm_list().await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agent_re_adopts_a_running_vm() {
    let g = guest_image();
    let _one_at_a_time = QEMU_LOCK.lock().await;
    let data = tempfile::tempdir().expect("tempdir");
    let s = spec(&g, "adopt");
    let id = s.id;
    let _cleanup = KillOnDrop(id);

    let first = driver(data.path()).await;
    first.vm_create(&s).await.expect("create");
    first.vm_start(id).await.expect("start");
    wait_booted(&first, id, 1, Duration::from_secs(90)).await;
    let pid = first
        .vm_status(id)
        .await
        .expect("status")
        .expect("known")
        .pid
        .expect("pid");
    // The agent dies: its tasks and sockets go, QEMU stays.
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(processes_of(id), vec![pid], "QEMU outlives the driver");

    // While no agent watches, someone pauses the VM over QMP.
    let qmp_sock = data
        .path()
        .join("vms")
        .join(id.to_string())
        .join("run/qmp.sock");
    let qmp = qapi::futures::QmpStreamTokio::open_uds(&qmp_sock)
        .await
        .expect("QMP free once the driver is gone")
        .negotiate()
        .await
        .expect("negotiate");
    let (service, events) = qmp.into_parts();
    let reader = events.spawn_tokio();
    service.execute(qapi::qmp::stop {}).await.expect("QMP stop");
    drop(service);
    reader.await.expect("QMP reader");

    // The new agent bounds the console at 8 KiB.
    let mut config = QemuConfig::new(data.path());
    config.accel = AccelChoice::Tcg;
    config.console_log_max = 8 * 1024;
    let second = QemuDriver::new(config).await.expect("second driver");
    let list = second.vm_list().await.expect("list");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].id, id);
    assert_eq!(list[0].pid, Some(pid), "same QEMU, re-adopted");
    // The adopting monitor asks QEMU (query-status) and learns it is paused.
    let t = Instant::now();
    while state_of(&second, id).await != VmRuntimeState::Paused {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "paused VM not reported paused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    second
        .vm_start(id)
        .await
        .expect("start of a paused adopted VM resumes it");
    assert_eq!(state_of(&second, id).await, VmRuntimeState::Running);
    second
        .vm_start(id)
        .await
        .expect("start of a running VM is a no-op");
    assert_eq!(processes_of(id), vec![pid], "still exactly one QEMU");

    // QMP and the console are attached again: a reboot shows on the console.
    second
        .vm_reboot(id)
        .await
        .expect("reboot via the new driver");
    wait_booted(&second, id, 2, Duration::from_secs(90)).await;
    let t = Instant::now();
    loop {
        if second.guest_info(id).await.expect("guest_info").connected {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "guest agent not answering after adoption"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // ~29,000 bytes through the serial port: the log keeps only the newest
    // 4-8 KiB, and offsets keep counting.
    let before = second
        .console_read(id, u64::MAX, 0)
        .await
        .expect("console end")
        .next_offset;
    let script = "i=0; while [ $i -lt 500 ]; do echo \"console-line-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"; i=$((i+1)); done > /dev/ttyS0";
    let out = second
        .guest_exec(
            id,
            &["sh".into(), "-c".into(), script.into()],
            Duration::from_secs(60),
        )
        .await
        .expect("write to the console");
    assert_eq!(out.exit_code, 0, "{out:?}");
    let t = Instant::now();
    loop {
        if console_text(&second, id)
            .await
            .contains("console-line-499-")
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the last console line never arrived"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let end = second
        .console_read(id, u64::MAX, 0)
        .await
        .expect("console end")
        .next_offset;
    assert!(
        end >= before + 500 * 55,
        "offsets count every byte: {before} -> {end}"
    );
    let log_size = std::fs::metadata(
        data.path()
            .join("vms")
            .join(id.to_string())
            .join("console.log"),
    )
    .expect("console.log")
    .len();
    assert!(log_size <= 8 * 1024, "console.log is {log_size} bytes");
    let all = second.console_read(id, 0, 1 << 20).await.expect("console");
    assert!(all.truncated_before, "the boot was rotated away");
    let text = String::from_utf8_lossy(&all.data);
    assert!(
        text.contains("console-line-499-"),
        "newest output kept: {text}"
    );
    assert!(!text.contains(BOOTED));

    // Stop without the power button: QMP quit. Still "stopped", not "crashed".
    let mut events = second.subscribe();
    let t = Instant::now();
    let how = second
        .vm_stop(id, Duration::ZERO)
        .await
        .expect("forced stop");
    println!("TIMING forced stop {:.2} s", t.elapsed().as_secs_f64());
    assert_eq!(how, StopHow::Forced);
    assert_eq!(state_of(&second, id).await, VmRuntimeState::Stopped);
    wait_event(
        &mut events,
        id,
        |s| *s == VmRuntimeState::Stopped,
        Duration::from_secs(2),
    )
    .await;

    second.vm_start(id).await.expect("start again");
    second.vm_destroy(id).await.expect("destroy");
    wait_event(
        &mut events,
        id,
        |s| *s == VmRuntimeState::Stopped,
        Duration::from_secs(2),
    )
    .await;
    assert!(processes_of(id).is_empty(), "no QEMU left");
    assert!(!data.path().join("vms").join(id.to_string()).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_refuses_missing_files_and_unknown_vms_are_not_found() {
    let g = guest_image();
    let data = tempfile::tempdir().expect("tempdir");
    let d = driver(data.path()).await;
    let mut config = QemuConfig::new(data.path());
    config.accel = AccelChoice::Tcg;
    assert!(
        matches!(QemuDriver::new(config).await, Err(DriverError::Config(_))),
        "one driver per data directory"
    );
    let mut s = spec(&g, "bad");
    s.image = data.path().join("no-such-image.qcow2");
    assert!(matches!(
        d.vm_create(&s).await,
        Err(DriverError::InvalidSpec { .. })
    ));
    s.image = PathBuf::from("relative.qcow2");
    assert!(matches!(
        d.vm_create(&s).await,
        Err(DriverError::InvalidSpec { .. })
    ));
    let unknown = VmId::new();
    assert!(matches!(
        d.vm_start(unknown).await,
        Err(DriverError::NotFound(_))
    ));
    assert!(matches!(
        d.console_read(unknown, 0, 10).await,
        Err(DriverError::NotFound(_))
    ));
    assert!(d.vm_status(unknown).await.expect("status").is_none());
    d.vm_destroy(unknown)
        .await
        .expect("destroying an unknown VM is fine");

    // A created VM that never ran: stopped, empty console, agent not connected.
    let s = spec(&g, "idle");
    d.vm_create(&s).await.expect("create");
    let mut other = s.clone();
    other.vcpus = 2;
    assert!(matches!(
        d.vm_create(&other).await,
        Err(DriverError::Conflict { .. })
    ));
    assert_eq!(state_of(&d, s.id).await, VmRuntimeState::Stopped);
    assert!(d
        .console_read(s.id, 0, 100)
        .await
        .expect("console")
        .data
        .is_empty());
    assert!(!d.guest_info(s.id).await.expect("info").connected);
    assert!(matches!(
        d.guest_exec(s.id, &["true".into()], Duration::from_secs(1))
            .await,
        Err(DriverError::InvalidState { .. })
    ));
    let facts = d.host_facts().await.expect("host facts");
    assert_eq!(facts.accel.as_deref(), Some("tcg"));
    assert!(
        facts.qemu_version.is_some()
            && facts.cpus > 0
            && facts.memory_bytes > 0
            && facts.disk_bytes > 0
    );
    d.vm_destroy(s.id).await.expect("destroy");
}

/// The KVM probe boots the guest kernel under KVM. On the hosts this project
/// builds on, KVM hangs at boot, so the probe must answer TCG; on a host with
/// working KVM set `STRATUS_EXPECT_ACCEL=kvm`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accel_probe_answers_within_its_time_bound() {
    let g = guest_image();
    let _one_at_a_time = QEMU_LOCK.lock().await;
    let expected = match std::env::var("STRATUS_EXPECT_ACCEL").as_deref() {
        Ok("kvm") => Accel::Kvm,
        _ => Accel::Tcg,
    };
    let t = Instant::now();
    let probe = probe_accel(
        Path::new("qemu-system-x86_64"),
        Some(&g.kernel),
        Duration::from_secs(10),
    )
    .await;
    println!(
        "TIMING accel probe {:.2} s: {probe:?}",
        t.elapsed().as_secs_f64()
    );
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "probe overran its bound"
    );
    assert_eq!(probe.accel, expected, "{}", probe.reason);
    assert!(!probe.reason.is_empty());
}

/// A 512-byte boot sector that writes a line to the first serial port and
/// halts: the smallest real disk the firmware (SeaBIOS) can boot, so the
/// firmware boot path is tested with a real boot, not just its command line.
fn serial_boot_sector(message: &str) -> Vec<u8> {
    #[rustfmt::skip]
    let code: [u8; 24] = [
        0x31, 0xC0,             // xor ax, ax
        0x8E, 0xD8,             // mov ds, ax
        0xFC,                   // cld
        0xBA, 0xF8, 0x03,       // mov dx, 0x3f8 (COM1)
        0xBE, 0x18, 0x7C,       // mov si, 0x7c18 (the message, below)
        0xAC,                   // loop: lodsb
        0x84, 0xC0,             // test al, al
        0x74, 0x03,             // jz done
        0xEE,                   // out dx, al
        0xEB, 0xF8,             // jmp loop
        0xF4,                   // done: hlt
        0xEB, 0xFD,             // jmp done
        0x90, 0x90,             // (pad to the message at offset 0x18)
    ];
    let mut sector = code.to_vec();
    sector.extend_from_slice(message.as_bytes());
    sector.push(0);
    assert!(sector.len() <= 510, "message too long for a boot sector");
    sector.resize(510, 0);
    sector.extend_from_slice(&[0x55, 0xAA]);
    // Pad to 1 MiB so the disk has a sensible size.
    sector.resize(1 << 20, 0);
    sector
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_boot_from_a_raw_disk() {
    let _serial = QEMU_LOCK.lock().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = dir.path().join("boot.raw");
    std::fs::write(&disk, serial_boot_sector("stratus-firmware-boot\r\n")).expect("write disk");
    let d = driver(&dir.path().join("data")).await;
    let id = VmId::new();
    let _kill = KillOnDrop(id);
    let spec = VmSpec {
        id,
        name: "fw".into(),
        vcpus: 1,
        memory_bytes: 128 << 20,
        disk_bytes: 16 << 20,
        image: disk,
        image_format: ImageFormat::Raw,
        restore_from: None,
        pool: None,
        boot: BootSpec::Firmware,
        nic: NicSpec::User,
    };
    d.vm_create(&spec).await.expect("create from a raw image");
    d.vm_start(id).await.expect("start");
    let t = Instant::now();
    loop {
        let text = console_text(&d, id).await;
        if text.contains("stratus-firmware-boot") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the firmware did not boot the disk within 60 s; console:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    d.vm_destroy(id).await.expect("destroy");
    assert!(processes_of(id).is_empty(), "no QEMU left");
}
