//! QEMU processes as seen through `/proc`: is this pid still the QEMU of that
//! VM (and not a recycled pid), which QEMUs exist for a VM, and ending them.

use std::path::Path;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use stratus_common::VmId;

/// Reads QEMU's pidfile; `None` when absent or garbled.
pub(crate) fn read_pidfile(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether `pid` is a live (not zombie) QEMU process of VM `id`: its command
/// line names a `qemu` binary and contains the VM id (`-uuid <id>` and the run
/// directory paths do). A recycled pid fails the check.
pub(crate) fn is_qemu_of(pid: u32, id: VmId) -> bool {
    if is_zombie_or_gone(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    cmdline_is_qemu_of(&cmdline, id)
}

fn cmdline_is_qemu_of(cmdline: &[u8], id: VmId) -> bool {
    let mut args = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty());
    let Some(argv0) = args.next() else {
        return false;
    };
    let exe = argv0.rsplit(|b| *b == b'/').next().unwrap_or(argv0);
    if !exe.windows(4).any(|w| w == b"qemu") {
        return false;
    }
    // QEMU's tools name the VM's files (and so its id) too: a `qemu-nbd`
    // serving the disk of a stopped VM is not the VM running.
    if [
        &b"qemu-nbd"[..],
        b"qemu-img",
        b"qemu-io",
        b"qemu-storage-daemon",
    ]
    .contains(&exe)
    {
        return false;
    }
    let id = id.to_string();
    let id = id.as_bytes();
    args.any(|a| a.windows(id.len()).any(|w| w == id))
}

/// Dead processes linger as zombies until their parent (PID 1 for a
/// daemonized QEMU) reaps them; they count as gone.
pub(crate) fn is_zombie_or_gone(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    // "pid (comm) S ...": comm may contain spaces and parentheses.
    match stat.rfind(')') {
        Some(i) => matches!(
            stat[i + 1..].split_whitespace().next(),
            Some("Z") | Some("X") | None
        ),
        None => true,
    }
}

/// Every live QEMU process of VM `id`, found by scanning `/proc` (for strays
/// whose pidfile is gone).
pub(crate) fn find_qemu_of(id: VmId) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| is_qemu_of(*pid, id))
        .collect();
    pids.sort_unstable();
    pids
}

/// Sends `signal` to `pid`; a process that is already gone is fine.
pub(crate) fn signal(pid: u32, signal: Signal) -> std::io::Result<()> {
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return Ok(());
    };
    match rustix::process::kill_process(pid, signal) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Polls until `pid` is no longer the QEMU of `id`, or `timeout` passes.
/// Returns whether it is gone. The first looks come quickly (1 ms, then
/// doubling up to 50 ms): a QEMU told to `quit` is usually gone within a
/// few milliseconds, and a migration's source waits for exactly that
/// before it reports the move done.
pub(crate) async fn wait_gone(pid: u32, id: VmId, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if !is_qemu_of(pid, id) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_check_wants_qemu_and_the_vm_id() {
        let id = VmId::new();
        let other = VmId::new();
        let cmd = |argv: &[&str]| argv.join("\0").into_bytes();
        let ours = cmd(&["/usr/bin/qemu-system-x86_64", "-uuid", &id.to_string()]);
        assert!(cmdline_is_qemu_of(&ours, id));
        assert!(!cmdline_is_qemu_of(&ours, other));
        let nbd = cmd(&["/usr/bin/qemu-nbd", &format!("/vms/{id}/disk.qcow2")]);
        assert!(!cmdline_is_qemu_of(&nbd, id), "a tool is not the VM");
        let not_qemu = cmd(&["/bin/sleep", &id.to_string()]);
        assert!(!cmdline_is_qemu_of(&not_qemu, id));
        assert!(!cmdline_is_qemu_of(b"", id));
    }

    #[test]
    fn own_process_is_alive_but_not_a_qemu() {
        let me = std::process::id();
        assert!(!is_zombie_or_gone(me));
        assert!(!is_qemu_of(me, VmId::new()));
        assert!(is_zombie_or_gone(u32::MAX - 1));
        assert!(
            signal(u32::MAX - 1, Signal::KILL).is_ok(),
            "absent pid is fine"
        );
    }

    #[test]
    fn pidfile_parses_or_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("qemu.pid");
        assert_eq!(read_pidfile(&p), None);
        std::fs::write(&p, "1234\n").expect("write");
        assert_eq!(read_pidfile(&p), Some(1234));
        std::fs::write(&p, "x").expect("write");
        assert_eq!(read_pidfile(&p), None);
    }
}
