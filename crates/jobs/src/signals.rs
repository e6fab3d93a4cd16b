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

use stratus_common::{HostId, VmId};
use tokio::sync::watch;

/// Per-host channels, so a change to one host's desired state wakes that
/// host's long poll only: with 10,000 hosts polling, a global wake-up per
/// change would be 10,000 database reads.
#[derive(Debug)]
pub struct Signals {
    desired: watch::Sender<u64>,
    observed: watch::Sender<u64>,
    hosts: Mutex<HashMap<HostId, watch::Sender<u64>>>,
    /// Per-VM channels for jobs waiting on a VM's observed state: a report
    /// wakes the jobs of the VMs it changed, not every waiting job.
    vms: Mutex<HashMap<VmId, watch::Sender<u64>>>,
}

impl Default for Signals {
    fn default() -> Self {
        Signals {
            desired: watch::channel(0).0,
            observed: watch::channel(0).0,
            hosts: Mutex::new(HashMap::new()),
            vms: Mutex::new(HashMap::new()),
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

    /// A report changed what is observed of `vm`.
    pub fn vm_observed(&self, vm: VmId) {
        let vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = vms.get(&vm) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Subscribe before reading the VM; drop the [`VmWatch`] when done.
    pub fn watch_vm(&self, vm: VmId) -> VmWatch<'_> {
        let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        let rx = vms
            .entry(vm)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        VmWatch {
            signals: self,
            vm,
            rx,
        }
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

/// A subscription to one VM's observations; the channel is dropped with its
/// last subscriber.
pub struct VmWatch<'a> {
    signals: &'a Signals,
    vm: VmId,
    pub rx: watch::Receiver<u64>,
}

impl Drop for VmWatch<'_> {
    fn drop(&mut self) {
        let mut vms = self.signals.vms.lock().unwrap_or_else(|p| p.into_inner());
        // This subscriber still counts until it is dropped, after this.
        if vms.get(&self.vm).is_some_and(|tx| tx.receiver_count() <= 1) {
            vms.remove(&self.vm);
        }
    }
}
