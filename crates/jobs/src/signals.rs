//! In-process wake-ups, so nobody waits on a polling interval when the change
//! happened in this controller: the desired state of some host changed
//! (agents long-polling get their answer at once), or a host reported an
//! observation (jobs waiting for it move on at once).
//!
//! These are hints, never the truth: waiters always re-read the store, and
//! also re-check on a slow timer, which is what catches changes made by
//! *other* controllers on the same database.

use tokio::sync::watch;

#[derive(Debug)]
pub struct Signals {
    desired: watch::Sender<u64>,
    observed: watch::Sender<u64>,
}

impl Default for Signals {
    fn default() -> Self {
        Signals {
            desired: watch::channel(0).0,
            observed: watch::channel(0).0,
        }
    }
}

impl Signals {
    pub fn desired_changed(&self) {
        self.desired.send_modify(|n| *n = n.wrapping_add(1));
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
