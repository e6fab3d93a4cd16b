//! The reporter (heartbeat, host facts and an observation of every VM, about
//! every `report_interval` and right after any change) and the guest poller
//! that keeps the guest-agent facts the reporter sends.
//!
//! A report never waits on a guest agent: guest facts are fetched by their
//! own tasks (every 5 s per running VM; until the guest agent first answers,
//! one query is always in flight) and cached; the reporter sends what is
//! cached.
//!
//! Scale: 10,000 simulated hosts run these loops in one process, so
//! - the period is jittered: the first wait is a random fraction of
//!   `report_interval`, each later one 90-110 % of it, so hosts started
//!   together (a fleet, a restart) report spread over the period rather than
//!   in lockstep, and no gap exceeds 110 % of the period;
//! - the guest poller has no tick: it sleeps until the next query falls due,
//!   and without running VMs it waits for the VM list to change.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stratus_client::types::{
    AgentReport, GuestAgentInfo, ObservedVmState, OrphanAction, OrphanReport, VmDesiredState,
    VmObservation,
};
use stratus_common::VmId;
use stratus_driver::{GuestInfo, VmRuntimeState, VmStatus};

use crate::agent::{jitter, Shared};
use crate::converge::{current_failure, observed_state};
use crate::error::chain;
use crate::state::Book;

/// How often a connected guest agent is asked again.
const GUEST_EVERY: Duration = Duration::from_secs(5);
/// How often a guest agent that has not answered yet is asked: at once again
/// (10 ms later, so a driver that fails fast is not asked in a busy loop).
/// A query waits (up to the driver's first-contact timeout, 8 s) on a
/// guest-sync the guest agent answers the moment it starts, so keeping one
/// always in flight is what makes "guest agent connected" show without a
/// polling delay.
const GUEST_EVERY_UNTIL_CONNECTED: Duration = Duration::from_millis(10);
/// How soon a running VM without a worker yet is looked at again.
const UNKNOWN_VM_RECHECK: Duration = Duration::from_millis(100);
/// Bound on one guest-agent query (the driver has its own, shorter one).
const GUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Reports asked for within this window are sent as one.
const COALESCE: Duration = Duration::from_millis(5);

/// Reports at once (unless `at_once` is false: then after the first,
/// random, wait), then about every `report_interval` and after changes.
pub(crate) async fn report_loop(shared: Arc<Shared>, at_once: bool) {
    let mut failing = false;
    // Whether the wait ahead is the first (a random fraction of the period).
    let mut first = at_once;
    if !at_once {
        tokio::select! {
            _ = shared.report_now.notified() => {}
            _ = tokio::time::sleep(jitter(shared.report_interval, 0.0, 1.0)) => {}
        }
    }
    loop {
        let mut report = build_report(&shared).await;
        let assigned = shared.pools().assigned.clone();
        let pools = crate::pools::check_all(&assigned).await;
        let sent_pools = shared.pools().worth_sending(&pools).then_some(pools);
        report.pools = sent_pools.clone();
        let sent: Vec<VmId> = report.vms.iter().map(|o| VmId(o.vm_id.0)).collect();
        match shared.api.report(report).await {
            Ok(ack) => {
                {
                    let mut pools = shared.pools();
                    if let Some(p) = sent_pools {
                        pools.sent = Some((p, Instant::now()));
                    }
                    if !crate::pools::same_pools(&pools.assigned, &ack.pools) {
                        // New or removed pools: check them and say so now.
                        pools.assigned = ack.pools.clone();
                        pools.sent = None;
                        shared.report_now.notify_one();
                    }
                }
                if failing {
                    tracing::info!("reports reach the controller again");
                    failing = false;
                }
                if ack.stale > 0 {
                    tracing::debug!(stale = ack.stale, "controller ignored stale observations");
                }
                let mut book = shared.book();
                book.destroyed.retain(|id, left| {
                    if sent.contains(id) {
                        *left = left.saturating_sub(1);
                    }
                    *left > 0
                });
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %chain(&e), "cannot report to the controller; will keep trying");
                    failing = true;
                } else {
                    tracing::debug!(error = %chain(&e), "still cannot report");
                }
            }
        }
        let wait = if first {
            first = false;
            jitter(shared.report_interval, 0.0, 1.0)
        } else {
            jitter(shared.report_interval, 0.9, 1.1)
        };
        tokio::select! {
            _ = shared.report_now.notified() => {
                tokio::time::sleep(COALESCE).await;
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The report as of now: facts, then an observation per VM.
async fn build_report(shared: &Shared) -> AgentReport {
    let facts = shared.refresh_facts().await;
    let list = match shared.driver.vm_list().await {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %chain(&e), "cannot list VMs; reporting host facts only");
            None
        }
    };
    let mut book = shared.book();
    let vms = match &list {
        Some(list) => observations(&book, list, || shared.generations.next()),
        None => Vec::new(),
    };
    let orphans = orphans(&book);
    if let Some(list) = list {
        // Guest facts belong to a boot: forget them for VMs not running.
        for st in &list {
            if !st.state.is_active() {
                if let Some(b) = book.vms.get_mut(&st.id) {
                    b.guest = None;
                    b.guest_fetched = None;
                }
            }
        }
        let changed = book.last_list.len() != list.len()
            || book
                .last_list
                .iter()
                .zip(&list)
                .any(|(a, b)| a.id != b.id || a.state != b.state);
        book.last_list = list;
        drop(book);
        if changed {
            shared.vms_changed.send_replace(());
        }
    }
    AgentReport {
        facts,
        vms,
        orphans,
        pools: None,
    }
}

/// The orphans to report: those destroyed lately, and those kept.
fn orphans(book: &Book) -> Vec<OrphanReport> {
    let destroyed = book
        .destroyed
        .keys()
        .map(|id| (id, OrphanAction::Destroyed));
    let kept = book.kept.iter().map(|id| (id, OrphanAction::Kept));
    let mut out: Vec<OrphanReport> = destroyed
        .chain(kept)
        .map(|(id, action)| OrphanReport {
            vm_id: stratus_client::types::VmId(id.0),
            action,
        })
        .collect();
    out.sort_by_key(|o| o.vm_id.0);
    out
}

/// Observations of every VM the driver lists, of desired VMs it does not
/// have (failed to create, or deleted: `absent`), and of orphans just
/// destroyed (`absent`).
fn observations(
    book: &Book,
    list: &[VmStatus],
    mut generation: impl FnMut() -> u64,
) -> Vec<VmObservation> {
    let mut out = Vec::with_capacity(list.len());
    let mut seen = HashSet::new();
    for st in list {
        seen.insert(st.id);
        if book.kept.contains(&st.id) {
            // A kept orphan is reported as such, not observed.
            continue;
        }
        let desired = book.desired_vm(st.id);
        let vb = book.vms.get(&st.id);
        let (mut state, mut reason) = observed_state(&st.state, desired);
        if let Some(f) = vb.and_then(|b| current_failure(b, desired)) {
            state = ObservedVmState::Failed;
            reason = Some(f.to_string());
        }
        let guest = match (&st.state, vb) {
            (VmRuntimeState::Running | VmRuntimeState::Paused, Some(b)) => b.guest.clone(),
            (_, b) => Some(GuestAgentInfo {
                connected: false,
                ip_addresses: Vec::new(),
                kernel: None,
                os_name: None,
                os_version: None,
                last_contact: b.and_then(|b| b.last_contact),
            }),
        };
        out.push(VmObservation {
            vm_id: stratus_client::types::VmId(st.id.0),
            generation: generation(),
            state,
            reason,
            reboot_generation: vb.map(|b| b.applied_reboot_generation).unwrap_or(0),
            guest,
            intent_generation: vb.map(|b| b.converged_generation),
        });
    }
    if let Some(s) = &book.desired {
        for d in &s.vms {
            let id = VmId(d.vm_id.0);
            if seen.contains(&id) {
                continue;
            }
            seen.insert(id);
            let vb = book.vms.get(&id);
            let (state, reason) = match vb.and_then(|b| current_failure(b, Some(d))) {
                Some(f) => (ObservedVmState::Failed, Some(f.to_string())),
                None if d.desired_state == VmDesiredState::Deleted => {
                    (ObservedVmState::Absent, None)
                }
                // Not created yet: nothing to say.
                None => continue,
            };
            out.push(VmObservation {
                vm_id: d.vm_id.clone(),
                generation: generation(),
                state,
                reason,
                reboot_generation: vb.map(|b| b.applied_reboot_generation).unwrap_or(0),
                guest: None,
                intent_generation: vb.map(|b| b.converged_generation),
            });
        }
    }
    for id in book.destroyed.keys() {
        if seen.insert(*id) {
            out.push(VmObservation {
                vm_id: stratus_client::types::VmId(id.0),
                generation: generation(),
                state: ObservedVmState::Absent,
                reason: None,
                reboot_generation: 0,
                guest: None,
                intent_generation: None,
            });
        }
    }
    out
}

/// Asks the guest agent of each running VM, in its own task, when due.
/// Sleeps until the next query falls due, a query ends, or the VM list
/// changes; with no running VM, only the last two wake it.
pub(crate) async fn guest_loop(shared: Arc<Shared>) {
    let mut vms_changed = shared.vms_changed.subscribe();
    loop {
        let (due, next) = guest_queries_due(&shared);
        for id in due {
            shared.spawn(fetch_guest(shared.clone(), id));
        }
        let until_next = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = vms_changed.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = shared.guest_wake.notified() => {}
            _ = until_next => {}
        }
    }
}

/// The running VMs whose guest agent should be asked now (marked in
/// flight), and when the next one falls due.
fn guest_queries_due(shared: &Shared) -> (Vec<VmId>, Option<Instant>) {
    let now = Instant::now();
    let mut book = shared.book();
    let running: Vec<VmId> = book
        .last_list
        .iter()
        .filter(|s| s.state == VmRuntimeState::Running)
        .map(|s| s.id)
        .collect();
    let mut due = Vec::new();
    let mut next: Option<Instant> = None;
    for id in running {
        if book.kept.contains(&id) {
            // A kept orphan's guest is none of this agent's business.
            continue;
        }
        let Some(b) = book.vms.get_mut(&id) else {
            // Running but not yet known to a worker (an adopted VM before
            // the first desired state arrives): nothing else would wake this
            // loop when its worker appears, so look again shortly.
            let soon = now + UNKNOWN_VM_RECHECK;
            next = Some(next.map_or(soon, |n| n.min(soon)));
            continue;
        };
        if b.guest_in_flight {
            continue;
        }
        let every = if b.guest.as_ref().is_some_and(|g| g.connected) {
            GUEST_EVERY
        } else {
            GUEST_EVERY_UNTIL_CONNECTED
        };
        match b.guest_fetched.map(|t| t + every) {
            Some(at) if at > now => next = Some(next.map_or(at, |n| n.min(at))),
            _ => {
                b.guest_in_flight = true;
                due.push(id);
            }
        }
    }
    (due, next)
}

async fn fetch_guest(shared: Arc<Shared>, id: VmId) {
    let info = match tokio::time::timeout(GUEST_TIMEOUT, shared.driver.guest_info(id)).await {
        Ok(Ok(i)) => Some(i),
        Ok(Err(e)) => {
            tracing::debug!(vm = %id, error = %chain(&e), "guest agent query failed");
            None
        }
        Err(_) => {
            tracing::debug!(vm = %id, "guest agent query timed out");
            None
        }
    };
    let changed = {
        let mut book = shared.book();
        let Some(b) = book.vms.get_mut(&id) else {
            shared.guest_wake.notify_one();
            return;
        };
        b.guest_in_flight = false;
        b.guest_fetched = Some(Instant::now());
        let new = info.map(view_of).unwrap_or_else(|| GuestAgentInfo {
            connected: false,
            ip_addresses: Vec::new(),
            kernel: None,
            os_name: None,
            os_version: None,
            last_contact: b.last_contact,
        });
        if new.last_contact.is_some() {
            b.last_contact = new.last_contact;
        }
        let changed = b.guest.as_ref().is_none_or(|old| {
            old.connected != new.connected
                || old.ip_addresses != new.ip_addresses
                || old.os_name != new.os_name
                || old.kernel != new.kernel
        });
        b.guest = Some(new);
        changed
    };
    shared.guest_wake.notify_one();
    if changed {
        shared.report_now.notify_one();
    }
}

fn view_of(g: GuestInfo) -> GuestAgentInfo {
    GuestAgentInfo {
        connected: g.connected,
        os_name: g.os_name,
        os_version: g.os_version,
        kernel: g.kernel,
        ip_addresses: g.ip_addresses,
        last_contact: g.last_contact,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::Utc;
    use stratus_client::types::{DesiredImage, DesiredVm, ImageFormat};

    use super::*;
    use crate::state::{Failure, Snapshot, VmBook};

    fn desired(id: VmId, state: VmDesiredState) -> DesiredVm {
        DesiredVm {
            vm_id: stratus_client::types::VmId(id.0),
            name: "web".into(),
            vcpus: 1,
            memory_bytes: 128 << 20,
            disk_bytes: 1 << 30,
            image: DesiredImage {
                id: stratus_client::types::ImageId(uuid::Uuid::now_v7()),
                format: ImageFormat::Qcow2,
                sha256: "00".into(),
                file_size: 1,
                kernel_sha256: None,
                initrd_sha256: None,
                cmdline: None,
            },
            desired_state: state,
            reboot_generation: 0,
            generation: 1,
            restore_from: None,
            restore_volumes: Vec::new(),
            pool: None,
            migration: None,
        }
    }

    fn status(id: VmId, state: VmRuntimeState) -> VmStatus {
        VmStatus {
            id,
            state,
            pid: None,
            since: Utc::now(),
        }
    }

    fn counter() -> impl FnMut() -> u64 {
        let mut n = 0;
        move || {
            n += 1;
            n
        }
    }

    #[test]
    fn states_map_to_observations() {
        let (running, crashed, stopped_crash, deleted, pending, orphan) = (
            VmId::new(),
            VmId::new(),
            VmId::new(),
            VmId::new(),
            VmId::new(),
            VmId::new(),
        );
        let mut book = Book {
            desired: Some(Arc::new(Snapshot {
                revision: 4,
                vms: vec![
                    desired(running, VmDesiredState::Running),
                    desired(crashed, VmDesiredState::Running),
                    desired(stopped_crash, VmDesiredState::Stopped),
                    desired(deleted, VmDesiredState::Deleted),
                    desired(pending, VmDesiredState::Running),
                ],
                requests: Vec::new(),
            })),
            ..Book::default()
        };
        book.vms.insert(
            running,
            VmBook {
                applied_reboot_generation: 2,
                ..VmBook::default()
            },
        );
        book.destroyed.insert(orphan, 3);
        let crash = VmRuntimeState::Crashed {
            reason: "QEMU exited unexpectedly".into(),
        };
        let list = vec![
            status(running, VmRuntimeState::Running),
            status(crashed, crash.clone()),
            status(stopped_crash, crash),
        ];
        let obs = observations(&book, &list, counter());
        let find = |id: VmId| obs.iter().find(|o| o.vm_id.0 == id.0);
        let o = find(running).expect("running");
        assert_eq!(o.state, ObservedVmState::Running);
        assert_eq!(o.reboot_generation, 2);
        let o = find(crashed).expect("crashed");
        assert_eq!(o.state, ObservedVmState::Crashed);
        assert_eq!(o.reason.as_deref(), Some("QEMU exited unexpectedly"));
        assert!(o.guest.as_ref().is_some_and(|g| !g.connected));
        assert_eq!(
            find(stopped_crash).expect("stopped").state,
            ObservedVmState::Stopped
        );
        assert_eq!(
            find(deleted).expect("deleted").state,
            ObservedVmState::Absent
        );
        assert!(find(pending).is_none(), "nothing to say before creation");
        assert_eq!(find(orphan).expect("orphan").state, ObservedVmState::Absent);
        let mut gens: Vec<u64> = obs.iter().map(|o| o.generation).collect();
        gens.dedup();
        assert_eq!(
            gens.len(),
            obs.len(),
            "every observation has its own generation"
        );
    }

    #[test]
    fn a_failure_is_reported_only_while_its_desired_state_stands() {
        let id = VmId::new();
        let want = desired(id, VmDesiredState::Running);
        let mut book = Book {
            desired: Some(Arc::new(Snapshot {
                revision: 1,
                vms: vec![want.clone()],
                requests: Vec::new(),
            })),
            ..Book::default()
        };
        book.vms.insert(
            id,
            VmBook {
                failure: Some(Failure {
                    reason: "cannot fetch the VM's image: boom".into(),
                    desired: want.clone(),
                }),
                ..VmBook::default()
            },
        );
        let obs = observations(&book, &[], counter());
        assert_eq!(obs.len(), 1);
        assert_eq!(obs[0].state, ObservedVmState::Failed);
        assert_eq!(
            obs[0].reason.as_deref(),
            Some("cannot fetch the VM's image: boom")
        );
        // The operator asked for something else: the old failure is not news.
        let mut stop = want;
        stop.desired_state = VmDesiredState::Stopped;
        book.desired = Some(Arc::new(Snapshot {
            revision: 2,
            vms: vec![stop],
            requests: Vec::new(),
        }));
        let obs = observations(&book, &[status(id, VmRuntimeState::Stopped)], counter());
        assert_eq!(obs[0].state, ObservedVmState::Stopped);
    }
}
