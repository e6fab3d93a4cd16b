//! In-process wake-ups, so nobody waits on a polling interval when the change
//! happened in this controller: the desired state of some host changed
//! (agents long-polling get their answer at once), or a host reported an
//! observation (jobs waiting for it move on at once).
//!
//! These are hints, never the truth: waiters always re-read the store, and
//! also re-check on a slow timer, which is what catches changes made by
//! *other* controllers on the same database.

use std::collections::HashMap;
use std::sync::Mutex;

use stratus_common::HostId;
use tokio::sync::watch;

/// Per-host channels, so a change to one host's desired state wakes that
/// host's long poll only: with 10,000 hosts polling, a global wake-up per
/// change would be 10,000 database reads.
#[derive(Debug)]
pub struct Signals {
    desired: watch::Sender<u64>,
    observed: watch::Sender<u64>,
    hosts: Mutex<HashMap<HostId, watch::Sender<u64>>>,
}

impl Default for Signals {
    fn default() -> Self {
        Signals {
            desired: watch::channel(0).0,
            observed: watch::channel(0).0,
            hosts: Mutex::new(HashMap::new()),
        }
    }
}

impl Signals {
    /// Some host's desired state changed, which one is not known here: the
    /// controller's revision poller re-reads every host's revision at once.
    pub fn desired_changed(&self) {
        self.desired.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// `host`'s desired state changed: its long poll answers now.
    pub fn host_desired_changed(&self, host: HostId) {
        let hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = hosts.get(&host) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Subscribe *before* reading the host's revision, then wait on the
    /// receiver.
    pub fn watch_host(&self, host: HostId) -> watch::Receiver<u64> {
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        hosts
            .entry(host)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    pub fn observed_changed(&self) {
        self.observed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Subscribe *before* reading the store, then wait on the receiver: a
    /// change between the two is not missed.
    pub fn watch_desired(&self) -> watch::Receiver<u64> {
        self.desired.subscribe()
    }

    pub fn watch_observed(&self) -> watch::Receiver<u64> {
        self.observed.subscribe()
    }
}
