//! What the agent remembers: per-VM records on disk (`data_dir/vms/<id>.json`,
//! so a restarted agent neither reboots a VM twice nor restarts one that went
//! down by itself), the in-memory [`Book`] its loops share, and the
//! generation counter of observations.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use stratus_client::types::{DesiredVm, GuestAgentInfo};
use stratus_common::VmId;
use stratus_driver::VmStatus;

/// What the agent keeps on disk about one VM it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct VmRecord {
    /// The last reboot request (desired `reboot_generation`) carried out; a
    /// fresh boot counts as carrying out every request before it.
    pub applied_reboot_generation: u64,
    /// The agent started the VM (or found it running as desired) and nobody
    /// asked it to stop: if it is found down, it went down by itself.
    pub expect_running: bool,
    /// The VM went down by itself while the host's desired revision was
    /// this: it is left down (and reported so) until a newer revision still
    /// wants it running, i.e. the operator asked again.
    pub hold_revision: Option<u64>,
}

/// The per-VM records under `data_dir/vms`.
#[derive(Clone, Debug)]
pub(crate) struct VmRecords {
    dir: PathBuf,
}

impl VmRecords {
    pub fn new(dir: PathBuf) -> Self {
        VmRecords { dir }
    }

    fn path(&self, id: VmId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// The record, or `None` when there is none (or it is unreadable, which
    /// is logged: the agent then starts over from what the driver says).
    pub fn load(&self, id: VmId) -> Option<VmRecord> {
        let path = self.path(id);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(vm = %id, path = %path.display(), error = %e, "cannot read the VM record");
                return None;
            }
        };
        match serde_json::from_str(&text) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(vm = %id, path = %path.display(), error = %e, "damaged VM record ignored");
                None
            }
        }
    }

    /// Writes the record atomically (temp file, then rename).
    pub fn save(&self, id: VmId, record: &VmRecord) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(id);
        let tmp = self.dir.join(format!(".{id}.json.tmp"));
        let json = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, &path)
    }

    pub fn remove(&self, id: VmId) {
        match std::fs::remove_file(self.path(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(vm = %id, error = %e, "cannot remove the VM record"),
        }
    }

    /// The VMs with a record.
    pub fn list(&self) -> Vec<VmId> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| {
                let name = e.ok()?.file_name();
                let name = name.to_str()?;
                name.strip_suffix(".json")?.parse().ok()
            })
            .collect()
    }

    #[cfg(test)]
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }
}

/// The latest desired state fetched from the controller.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub revision: u64,
    pub vms: Vec<DesiredVm>,
    pub requests: Vec<stratus_client::types::AgentRequest>,
}

impl Snapshot {
    pub fn vm(&self, id: VmId) -> Option<&DesiredVm> {
        self.vms.iter().find(|v| v.vm_id.0 == id.0)
    }
}

/// A failure to converge a VM, and the desired state it happened under: it
/// is reported only while that is still what the controller wants.
#[derive(Clone, Debug)]
pub(crate) struct Failure {
    pub reason: String,
    pub desired: DesiredVm,
}

/// What the loops share about one VM.
#[derive(Clone, Debug, Default)]
pub(crate) struct VmBook {
    pub applied_reboot_generation: u64,
    /// The intent generation (`DesiredVm::generation`) of the last
    /// convergence this agent finished for the VM, successful or not.
    /// Observations carry it so the controller can tell a report made after
    /// acting on an intent from one made before.
    pub converged_generation: u64,
    pub failure: Option<Failure>,
    /// The last guest agent answer while the VM runs (cleared when it stops).
    pub guest: Option<GuestAgentInfo>,
    pub guest_fetched: Option<Instant>,
    pub guest_in_flight: bool,
    /// Last time the guest agent answered, kept across stops.
    pub last_contact: Option<chrono::DateTime<chrono::Utc>>,
}

/// An exec request's progress, to carry each out once.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RequestState {
    Running,
    /// The result was posted at this time.
    Answered(Instant),
}

/// The agent's shared memory.
#[derive(Debug, Default)]
pub(crate) struct Book {
    pub desired: Option<Arc<Snapshot>>,
    pub vms: HashMap<VmId, VmBook>,
    /// VMs destroyed because the controller no longer mentions them, with
    /// how many more reports should say `absent` (and list them as
    /// destroyed orphans).
    pub destroyed: HashMap<VmId, u32>,
    /// Orphans left untouched (`OrphanPolicy::Keep`) that the driver still
    /// has: reported as kept in every report, not observed, not polled.
    pub kept: HashSet<VmId>,
    pub requests: HashMap<uuid::Uuid, RequestState>,
    /// What the driver listed at the last report.
    pub last_list: Vec<VmStatus>,
}

impl Book {
    /// The desired state of a VM in the latest snapshot.
    pub fn desired_vm(&self, id: VmId) -> Option<&DesiredVm> {
        self.desired.as_ref().and_then(|s| s.vm(id))
    }
}

/// Observation generations: strictly growing for the agent's whole life and
/// across restarts, as long as the clock does not jump back by more than the
/// downtime (each is the current time in microseconds, or one more than the
/// last if that is later).
#[derive(Debug, Default)]
pub(crate) struct Generations {
    last: AtomicU64,
}

impl Generations {
    pub fn next(&self) -> u64 {
        let now = u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or(0);
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = now.max(last.saturating_add(1));
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_strictly_grow_and_track_the_clock() {
        let g = Generations::default();
        let first = g.next();
        let now = u64::try_from(chrono::Utc::now().timestamp_micros()).expect("after 1970");
        assert!(first <= now && now - first < 10_000_000, "{first} vs {now}");
        let mut last = first;
        for _ in 0..10_000 {
            let n = g.next();
            assert!(n > last);
            last = n;
        }
        // A restarted agent (a new counter) still starts above the old one.
        let restarted = Generations::default();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(restarted.next() > first);
    }

    #[test]
    fn records_round_trip_and_list() {
        let dir = tempfile::tempdir().expect("tempdir");
        let records = VmRecords::new(dir.path().join("vms"));
        let id = VmId::new();
        assert_eq!(records.load(id), None);
        assert!(records.list().is_empty());
        let r = VmRecord {
            applied_reboot_generation: 3,
            expect_running: true,
            hold_revision: Some(7),
        };
        records.save(id, &r).expect("save");
        assert_eq!(records.load(id), Some(r));
        assert_eq!(records.list(), vec![id]);
        std::fs::write(records.dir().join(format!("{id}.json")), "nonsense").expect("write");
        assert_eq!(records.load(id), None, "a damaged record is ignored");
        records.remove(id);
        records.remove(id);
        assert!(records.list().is_empty());
    }
}
