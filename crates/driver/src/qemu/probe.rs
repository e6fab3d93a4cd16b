//! What the host's QEMU can do: its version, whether `-sandbox` is built in,
//! and whether KVM really boots a guest here (see [`probe_accel`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::process::Command;

use super::config::Accel;

/// The outcome of [`probe_accel`]: the accelerator to use and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccelProbe {
    pub accel: Accel,
    pub reason: String,
}

/// What the kernel prints first once it runs in long mode (`start_kernel`).
const KERNEL_BANNER: &[u8] = b"Linux version";

/// Decides between KVM and TCG by booting a Linux kernel under KVM.
///
/// `/dev/kvm` opening (and even `KVM_CREATE_VM` working) is not enough: on
/// hosts with broken nested virtualization a KVM guest runs the kernel's
/// real-mode setup and then hangs. So the probe boots `kernel` (or the host's
/// own kernel) with `-accel kvm -cpu host`, no initrd and
/// `console=ttyS0 earlyprintk=serial`, and requires the kernel banner on the
/// serial port within `timeout`. A tiny firmware-level payload is not enough
/// either: a hand-made multiboot image that enters long mode and writes to the
/// serial port ran fine under KVM on a host where Linux hangs.
///
/// Never fails: every doubt is an answer of TCG with the reason, logged with
/// `tracing::warn!`.
pub async fn probe_accel(
    qemu_binary: &Path,
    kernel: Option<&Path>,
    timeout: Duration,
) -> AccelProbe {
    let probe = probe_kvm(qemu_binary, kernel, timeout).await;
    match &probe {
        Ok(reason) => {
            tracing::info!(%reason, "KVM works; VMs run with -accel kvm");
            AccelProbe {
                accel: Accel::Kvm,
                reason: reason.clone(),
            }
        }
        Err(reason) => {
            tracing::warn!(%reason, "KVM is not usable; VMs run with TCG (slow software emulation)");
            AccelProbe {
                accel: Accel::Tcg,
                reason: reason.clone(),
            }
        }
    }
}

async fn probe_kvm(
    qemu_binary: &Path,
    kernel: Option<&Path>,
    timeout: Duration,
) -> Result<String, String> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Err(format!("cannot open /dev/kvm: {e}"));
    }
    let kernel = match kernel {
        Some(k) => k.to_path_buf(),
        None => host_kernel().ok_or_else(|| {
            "no Linux kernel to probe KVM with (set the probe kernel; the host has no /boot/vmlinuz)".to_string()
        })?,
    };
    let started = Instant::now();
    let mut child = Command::new(qemu_binary)
        .args([
            "-machine", "q35", "-accel", "kvm", "-cpu", "host", "-m", "128",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-monitor", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&kernel)
        .args([
            "-append",
            "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", qemu_binary.display()))?;
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err("QEMU's output was not captured".into());
    };
    let stderr = tokio::spawn(async move {
        let mut text = Vec::new();
        let _ = (&mut stderr).take(64 * 1024).read_to_end(&mut text).await;
        String::from_utf8_lossy(&text).into_owned()
    });
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let outcome = tokio::time::timeout(timeout, async {
        loop {
            match stdout.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    seen.extend_from_slice(&buf[..n]);
                    if contains(&seen, KERNEL_BANNER) {
                        return true;
                    }
                }
            }
        }
    })
    .await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    let stderr = tokio::time::timeout(Duration::from_secs(2), stderr)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let said = stderr
        .lines()
        .rev()
        .find(|l| !l.contains("warning:"))
        .unwrap_or("")
        .trim()
        .to_string();
    match outcome {
        Ok(true) => Ok(format!(
            "a KVM guest printed the kernel banner after {:.1}s ({})",
            started.elapsed().as_secs_f64(),
            kernel.display()
        )),
        Ok(false) => Err(format!(
            "the KVM probe QEMU exited before the kernel printed its banner (QEMU said: {said:?}; serial output: {:?})",
            String::from_utf8_lossy(&seen).trim()
        )),
        Err(_) => Err(format!(
            "a KVM guest printed no kernel banner within {}s; it hangs (broken nested virtualization?); serial output: {:?}",
            timeout.as_secs(),
            String::from_utf8_lossy(&seen).trim()
        )),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The host's own kernel image, if it has one where distributions put it.
fn host_kernel() -> Option<PathBuf> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok();
    let mut candidates = Vec::new();
    if let Some(r) = release {
        candidates.push(PathBuf::from(format!("/boot/vmlinuz-{}", r.trim())));
    }
    candidates.push("/boot/vmlinuz".into());
    candidates.push("/vmlinuz".into());
    candidates
        .into_iter()
        .find(|p| std::fs::File::open(p).is_ok())
}

/// `QEMU emulator version 10.0.2 (...)` → `10.0.2`; `None` if QEMU cannot run.
pub(crate) async fn qemu_version(qemu_binary: &Path) -> Option<String> {
    let out = Command::new(qemu_binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_version(&String::from_utf8_lossy(&out.stdout))
}

fn parse_version(text: &str) -> Option<String> {
    let line = text.lines().next()?;
    let rest = line.split("version ").nth(1)?;
    rest.split_whitespace().next().map(str::to_string)
}

/// Whether QEMU accepts `-sandbox` (built with seccomp). QEMU checks the
/// option when it parses it, before acting on `-version`.
pub(crate) async fn sandbox_supported(qemu_binary: &Path) -> bool {
    Command::new(qemu_binary)
        .args(["-sandbox", "on", "-version"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A stand-in for QEMU that prints `serial` and then hangs.
    fn fake_qemu(dir: &Path, name: &str, serial: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho '{serial}'\nexec sleep 30\n"),
        )
        .expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    #[tokio::test]
    async fn probe_wants_the_kernel_banner_within_the_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hangs = fake_qemu(
            dir.path(),
            "hangs",
            "Probing EDD (edd=off to disable)... ok",
        );
        let boots = fake_qemu(dir.path(), "boots", "[    0.000000] Linux version 6.1.0");
        let kernel = hangs.clone(); // any readable file
        let t = Instant::now();
        let probe = probe_accel(&hangs, Some(&kernel), Duration::from_secs(1)).await;
        assert_eq!(probe.accel, Accel::Tcg);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "probe overran: {:?}",
            t.elapsed()
        );
        let probe_ok = probe_accel(&boots, Some(&kernel), Duration::from_secs(5)).await;
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
        {
            assert!(
                probe.reason.contains("no kernel banner within 1s"),
                "{}",
                probe.reason
            );
            assert_eq!(probe_ok.accel, Accel::Kvm, "{}", probe_ok.reason);
        } else {
            assert!(probe.reason.contains("/dev/kvm"), "{}", probe.reason);
            assert_eq!(probe_ok.accel, Accel::Tcg);
        }
    }

    #[test]
    fn version_line_parses() {
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)\nCopyright"),
            Some("10.0.2".into())
        );
        assert_eq!(parse_version("garbage"), None);
        assert!(contains(b"[ 0.0] Linux version 6.1", KERNEL_BANNER));
        assert!(!contains(b"Probing EDD", KERNEL_BANNER));
    }
}
