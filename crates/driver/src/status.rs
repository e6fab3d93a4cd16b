//! What a driver reports back: VM states and events, stop outcomes, guest agent
//! facts, command output, console chunks and host facts.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use stratus_common::VmId;

/// The runtime state of one VM as the driver sees it (see the state machine in
/// the crate docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum VmRuntimeState {
    /// The hypervisor process runs and the vCPUs run.
    Running,
    /// The hypervisor process runs but the vCPUs are stopped (e.g. while
    /// starting, before the console is attached).
    Paused,
    /// No hypervisor process: clean shutdown, stopped by the driver, or never
    /// started.
    Stopped,
    /// No hypervisor process, and it did not end cleanly.
    Crashed { reason: String },
}

impl VmRuntimeState {
    /// Whether a hypervisor process exists in this state.
    pub fn is_active(&self) -> bool {
        matches!(self, VmRuntimeState::Running | VmRuntimeState::Paused)
    }
}

impl fmt::Display for VmRuntimeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmRuntimeState::Running => f.write_str("running"),
            VmRuntimeState::Paused => f.write_str("paused"),
            VmRuntimeState::Stopped => f.write_str("stopped"),
            VmRuntimeState::Crashed { reason } => write!(f, "crashed ({reason})"),
        }
    }
}

/// One VM's state, as of `since`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub id: VmId,
    pub state: VmRuntimeState,
    /// The hypervisor process, while there is one (QEMU only).
    pub pid: Option<u32>,
    /// When the VM entered `state` (as far as the driver knows).
    pub since: DateTime<Utc>,
}

/// A state change the driver noticed: start, stop, pause, resume, crash,
/// destroy (reported as `Stopped`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEvent {
    pub id: VmId,
    pub state: VmRuntimeState,
}

/// How `vm_stop` ended the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopHow {
    /// The guest shut down after the ACPI power button, within the timeout.
    Graceful,
    /// The guest did not; the hypervisor was ended (QMP `quit`, then SIGKILL).
    Forced,
    /// Nothing was running.
    AlreadyStopped,
}

/// What the guest agent inside a VM says about the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInfo {
    /// Whether the agent answered this time.
    pub connected: bool,
    pub agent_version: Option<String>,
    pub os_name: Option<String>,
    pub os_version: Option<String>,
    /// Kernel release (`uname -r`).
    pub kernel: Option<String>,
    /// Addresses of the guest's interfaces, without loopback and IPv6
    /// link-local addresses.
    pub ip_addresses: Vec<String>,
    /// Last time the agent answered (this driver instance's memory).
    pub last_contact: Option<DateTime<Utc>>,
}

/// Result of a command run in the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutput {
    /// The exit status; `128 + n` when the command was killed by signal `n`.
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Bytes of a VM's console log. Offsets count every byte the console ever
/// produced, so a reader can resume with `next_offset` across log rotation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleChunk {
    pub data: Vec<u8>,
    /// Offset to ask for next.
    pub next_offset: u64,
    /// The requested offset was older than the oldest byte kept: `data`
    /// starts at the oldest byte kept instead.
    pub truncated_before: bool,
}

/// The capacity of the host a driver runs VMs on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    pub cpus: u32,
    pub memory_bytes: u64,
    /// Size of the file system holding the driver's data directory.
    pub disk_bytes: u64,
    /// Space left on it for the driver's user.
    pub disk_free_bytes: u64,
    pub qemu_version: Option<String>,
    /// `kvm`, `tcg` or `sim`.
    pub accel: Option<String>,
    /// Migration streams are encrypted (the driver has TLS credentials for
    /// them).
    pub migration_tls: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_serialize_with_a_tag_and_print_for_operators() {
        let s = VmRuntimeState::Crashed {
            reason: "QEMU exited unexpectedly".into(),
        };
        let json = serde_json::to_string(&s).expect("serializes");
        assert_eq!(
            json,
            r#"{"state":"crashed","reason":"QEMU exited unexpectedly"}"#
        );
        assert_eq!(
            serde_json::from_str::<VmRuntimeState>(&json).expect("parses"),
            s
        );
        assert_eq!(s.to_string(), "crashed (QEMU exited unexpectedly)");
        assert!(VmRuntimeState::Paused.is_active());
        assert!(!s.is_active());
    }
}
