//! Snapshot policies: scheduled snapshots whose chain stays bounded by
//! itself. Run by the reconciler leader (`reconcile.rs` kicks a pass after
//! each of its own), in a task of its own, like backup policies.
//!
//! ```text
//!  each pass, for every policy whose VM has no job running:
//!    rotate    more of the policy's own ready snapshots than `keep`
//!              → delete (merge) the oldest of them          (one job, done)
//!    schedule  every_secs set, the policy's newest snapshot older than
//!              that (or none), the VM running or stopped
//!              → at the VM's snapshot limit: delete (merge) the policy's
//!                oldest snapshot first, the snapshot comes next pass
//!              → else a snapshot `auto-YYYYMMDD-HHMMSS.mmm` (UTC), quiesced
//!                like an operator's when the guest agent answers
//! ```
//!
//! A VM runs one job at a time, so a pass starts at most one job per VM;
//! the next pass (seconds later) does the next step.
//!
//! **Invariant**: a policy deletes only snapshots it took
//! ([`SnapshotOrigin::Policy`]); an operator's are never touched. With
//! `keep` at most [`MAX_KEEP`], the policy's snapshots alone never fill the
//! VM's limit.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use stratus_api_types::params::SnapshotPolicySet;
use stratus_api_types::views::{SnapshotOperation, SnapshotPolicy, SnapshotStatus, VmState};
use stratus_common::time::now_micros;
use stratus_common::{Error, ResourceKind, MAX_SNAPSHOTS_PER_VM};
use stratus_datastore::model::VmRecord;
use stratus_datastore::{SnapshotOrigin, SnapshotPolicyRecord, SnapshotRecord};

use crate::app::snapshots::{begin_delete, begin_snapshot};
use crate::app::{lookup, Actor, App};

/// Scheduled snapshots at most this often.
const MIN_EVERY_SECS: u64 = 60;

/// Most snapshots a policy keeps: one under the VM's limit, so the next
/// scheduled snapshot always has room once the oldest is merged.
pub const MAX_KEEP: u32 = (MAX_SNAPSHOTS_PER_VM - 1) as u32;

/// What a policy does next for its VM.
#[derive(Debug)]
pub enum Step<'a> {
    /// Merge away this snapshot of the policy's.
    Delete(&'a SnapshotRecord),
    /// Take a snapshot.
    Snapshot,
    /// Nothing now.
    Wait,
    /// Due, but the VM's limit is filled by an operator's snapshots: nothing
    /// the policy may delete.
    Full,
}

impl PartialEq for Step<'_> {
    /// Deletions are equal when they name the same snapshot.
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Step::Delete(a), Step::Delete(b)) => a.id == b.id,
            (a, b) => std::mem::discriminant(a) == std::mem::discriminant(b),
        }
    }
}

/// The policy's next step, given the VM's snapshots (any order) and the
/// time now (micros). Pure, so the rules are tested without a cloud.
pub fn next_step<'a>(p: &SnapshotPolicyRecord, snaps: &'a [SnapshotRecord], now: i64) -> Step<'a> {
    let mut own: Vec<&SnapshotRecord> = snaps
        .iter()
        .filter(|s| s.origin == SnapshotOrigin::Policy)
        .collect();
    own.sort_by_key(|s| (s.created_at, s.id));
    let ready: Vec<&SnapshotRecord> = own
        .iter()
        .copied()
        .filter(|s| s.status == SnapshotStatus::Ready)
        .collect();
    if ready.len() > p.keep as usize {
        return Step::Delete(ready[0]);
    }
    let Some(every) = p.every_secs else {
        return Step::Wait;
    };
    let every = i64::try_from(every)
        .unwrap_or(i64::MAX / 1_000_000)
        .saturating_mul(1_000_000);
    let due = own
        .last()
        .is_none_or(|newest| now.saturating_sub(newest.created_at) >= every);
    if !due {
        return Step::Wait;
    }
    if snaps.len() >= MAX_SNAPSHOTS_PER_VM {
        return match ready.first() {
            Some(oldest) => Step::Delete(oldest),
            None => Step::Full,
        };
    }
    Step::Snapshot
}

/// The name of a scheduled snapshot taken at `now` (micros); to the
/// millisecond, so two `policy run`s in one second do not collide.
fn auto_name(now: i64) -> String {
    let t = stratus_common::time::from_micros(now);
    format!("auto-{}", t.format("%Y%m%d-%H%M%S%.3f"))
}

/// Starts one pass in the background unless one is still running.
pub fn kick(app: &Arc<App>) {
    static RUNNING: AtomicBool = AtomicBool::new(false);
    super::backup_policies::spawn_alone(&RUNNING, app, |app| async move { pass(&app).await });
}

/// One pass over every policy.
pub async fn pass(app: &App) {
    let policies = match app.ds.snapshot_policy_list(None).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "could not read snapshot policies");
            return;
        }
    };
    for p in policies {
        if let Err(e) = apply(app, &p).await {
            tracing::warn!(vm = %p.vm_id, error = %e, "snapshot policy step not taken");
        }
    }
}

/// One step of one policy.
async fn apply(app: &App, p: &SnapshotPolicyRecord) -> Result<(), Error> {
    let vm = match app.ds.vm_get(p.vm_id).await {
        Ok(vm) => vm,
        Err(Error::NotFound { .. }) => {
            app.ds.snapshot_policy_delete(p.vm_id).await?;
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    if vm.active_job_id.is_some() || !matches!(vm.state, VmState::Running | VmState::Stopped) {
        return Ok(());
    }
    let snaps = app.ds.snapshot_list(vm.id).await?;
    match next_step(p, &snaps, now_micros()) {
        Step::Wait => Ok(()),
        Step::Full => {
            tracing::warn!(vm = %vm.id, name = %vm.name, held = snaps.len(), "scheduled snapshot skipped: the VM holds the most snapshots it may, none of them the policy's");
            Ok(())
        }
        Step::Delete(s) => {
            let op = begin_delete(app, &vm, s.clone()).await?;
            tracing::info!(vm = %vm.id, name = %vm.name, snapshot = %s.name, job = %op.job.id, "snapshot policy merging its oldest snapshot");
            Ok(())
        }
        Step::Snapshot => {
            let op = take(app, &vm).await?;
            tracing::info!(vm = %vm.id, name = %vm.name, snapshot = %op.snapshot.name, job = %op.job.id, "scheduled snapshot started");
            Ok(())
        }
    }
}

async fn take(app: &App, vm: &VmRecord) -> Result<SnapshotOperation, Error> {
    begin_snapshot(app, vm, &auto_name(now_micros()), SnapshotOrigin::Policy).await
}

pub async fn snapshot_policy_set(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
    p: SnapshotPolicySet,
) -> Result<SnapshotPolicy, Error> {
    let vm = lookup::vm(app, actor, key, scope).await?;
    actor.require_mutate()?;
    if p.every_secs.is_some_and(|s| s < MIN_EVERY_SECS) {
        return Err(Error::invalid(
            "every_secs",
            format!("snapshots are scheduled at most every {MIN_EVERY_SECS} s"),
        ));
    }
    if !(1..=MAX_KEEP).contains(&p.keep) {
        return Err(Error::invalid(
            "keep",
            format!(
                "keep must be between 1 and {MAX_KEEP} (a VM holds at most \
                 {MAX_SNAPSHOTS_PER_VM} snapshots and the policy needs room for its next one)"
            ),
        ));
    }
    let rec = SnapshotPolicyRecord {
        vm_id: vm.id,
        project_id: vm.project_id,
        every_secs: p.every_secs,
        keep: p.keep,
        created_at: 0,
        updated_at: 0,
    };
    Ok(app.ds.snapshot_policy_set(&rec).await?.into_view())
}

pub async fn snapshot_policy_view(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
) -> Result<SnapshotPolicy, Error> {
    let vm = lookup::vm(app, actor, key, scope).await?;
    app.ds
        .snapshot_policy_get(vm.id)
        .await?
        .map(SnapshotPolicyRecord::into_view)
        .ok_or_else(|| Error::not_found(ResourceKind::SnapshotPolicy, key))
}

pub async fn snapshot_policy_delete(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
) -> Result<(), Error> {
    let vm = lookup::vm(app, actor, key, scope).await?;
    actor.require_mutate()?;
    if app.ds.snapshot_policy_delete(vm.id).await? {
        Ok(())
    } else {
        Err(Error::not_found(ResourceKind::SnapshotPolicy, key))
    }
}

pub async fn snapshot_policy_list(
    app: &App,
    actor: &Actor,
    project: Option<&str>,
) -> Result<Vec<SnapshotPolicy>, Error> {
    let project = lookup::project_filter(app, actor, project).await?;
    Ok(app
        .ds
        .snapshot_policy_list(project)
        .await?
        .into_iter()
        .filter(|p| actor.can_see(p.project_id))
        .map(SnapshotPolicyRecord::into_view)
        .collect())
}

/// Takes the policy's snapshot now (before a risky change, say), whatever
/// its schedule; the policy's rotation then keeps its newest `keep` as
/// usual.
pub async fn snapshot_policy_run(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
) -> Result<SnapshotOperation, Error> {
    let vm = lookup::vm(app, actor, key, scope).await?;
    actor.require_mutate()?;
    if app.ds.snapshot_policy_get(vm.id).await?.is_none() {
        return Err(Error::not_found(ResourceKind::SnapshotPolicy, key));
    }
    if let Some(job) = vm.active_job_id {
        return Err(Error::conflict(
            "vm_busy",
            format!(
                "VM {:?} is busy with job {job}; wait for it or cancel it",
                vm.name
            ),
        ));
    }
    take(app, &vm).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use stratus_common::{JobId, ProjectId, SnapshotId, VmId};

    fn policy(every: Option<u64>, keep: u32) -> SnapshotPolicyRecord {
        SnapshotPolicyRecord {
            vm_id: VmId::new(),
            project_id: ProjectId::new(),
            every_secs: every,
            keep,
            created_at: 0,
            updated_at: 0,
        }
    }

    const S: i64 = 1_000_000;

    fn snap(origin: SnapshotOrigin, at_secs: i64, status: SnapshotStatus) -> SnapshotRecord {
        SnapshotRecord {
            id: SnapshotId::new(),
            vm_id: VmId::new(),
            project_id: ProjectId::new(),
            name: format!("s{at_secs}"),
            status,
            quiesced: Some(true),
            bytes: Some(0),
            volumes: vec![],
            job_id: JobId::new(),
            created_at: at_secs * S,
            origin,
        }
    }

    use SnapshotOrigin::{Operator, Policy};
    use SnapshotStatus::{Creating, Ready};

    #[test]
    fn first_snapshot_is_due_at_once_then_every_interval() {
        let p = policy(Some(3600), 3);
        assert_eq!(next_step(&p, &[], 100 * S), Step::Snapshot);
        let one = [snap(Policy, 100, Ready)];
        assert_eq!(next_step(&p, &one, 3699 * S), Step::Wait);
        assert_eq!(next_step(&p, &one, 3700 * S), Step::Snapshot);
        // A snapshot still being taken counts as the newest.
        let taking = [snap(Policy, 100, Ready), snap(Policy, 3700, Creating)];
        assert_eq!(next_step(&p, &taking, 3701 * S), Step::Wait);
        // No schedule: only rotation.
        assert_eq!(next_step(&policy(None, 3), &[], 100 * S), Step::Wait);
    }

    #[test]
    fn rotation_merges_the_policys_oldest_beyond_keep_never_an_operators() {
        let p = policy(Some(3600), 2);
        let snaps = [
            snap(Operator, 1, Ready),
            snap(Policy, 30, Ready),
            snap(Policy, 10, Ready),
            snap(Policy, 20, Ready),
        ];
        match next_step(&p, &snaps, 40 * S) {
            Step::Delete(s) => assert_eq!(s.created_at, 10 * S),
            other => panic!("{other:?}"),
        }
        // Exactly `keep` of its own, plus any number of an operator's: no
        // deletion.
        let snaps = [
            snap(Operator, 1, Ready),
            snap(Operator, 2, Ready),
            snap(Policy, 20, Ready),
            snap(Policy, 30, Ready),
        ];
        assert_eq!(next_step(&p, &snaps, 40 * S), Step::Wait);
    }

    #[test]
    fn at_the_vms_limit_the_policy_makes_room_or_waits() {
        let p = policy(Some(60), 3);
        let mut snaps: Vec<SnapshotRecord> = (0..13).map(|i| snap(Operator, i, Ready)).collect();
        snaps.extend((0..3).map(|i| snap(Policy, 100 + i, Ready)));
        assert_eq!(snaps.len(), MAX_SNAPSHOTS_PER_VM);
        match next_step(&p, &snaps, 1000 * S) {
            Step::Delete(s) => {
                assert_eq!(s.origin, Policy);
                assert_eq!(s.created_at, 100 * S);
            }
            other => panic!("{other:?}"),
        }
        let full: Vec<SnapshotRecord> = (0..16).map(|i| snap(Operator, i, Ready)).collect();
        assert_eq!(next_step(&p, &full, 1000 * S), Step::Full);
    }

    #[test]
    fn names_are_the_utc_time() {
        // 2026-12-07 23:30:05 UTC
        assert_eq!(
            auto_name(1_796_686_205 * S + 42_000),
            "auto-20261207-233005.042"
        );
    }
}
