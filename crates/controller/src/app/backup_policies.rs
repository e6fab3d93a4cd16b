//! Backup policies at work: scheduled backups and retention, run by the
//! reconciler leader in a task of its own (a merge can take minutes; the
//! other reconcilers must not wait for it).
//!
//! ```text
//!  each pass, for every policy:
//!    schedule   every_secs set, the VM running and free, its newest
//!               backup (whatever its outcome) older than every_secs
//!               → the same backup an operator's `backup create` takes
//!    retention  restore points not kept by keep_last / keep_daily /
//!               keep_weekly → deleted oldest first, each merged into the
//!               restore point built on it, so every kept one stays whole
//! ```
//!
//! **Invariant**: retention only ever deletes through
//! [`super::backups::delete_backup`], which merges before it removes; a
//! backup being taken, or one another backup is being built on, is never
//! touched (the store refuses, `backup_busy`).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::{Datelike, TimeZone, Utc};
use stratus_api_types::views::{BackupStatus, VmState};
use stratus_common::time::now_micros;
use stratus_common::{BackupId, Error};
use stratus_datastore::{BackupListFilter, BackupPolicyRecord, BackupRecord, PageRequest};

use crate::app::App;

/// Which restore points a policy keeps, given `(id, created_at micros)` of
/// every restore point: the union of the newest `keep_last`, the newest of
/// each of the newest `keep_daily` days, and the newest of each of the
/// newest `keep_weekly` ISO weeks (UTC). A policy that keeps nothing by
/// any rule keeps everything (retention off).
pub fn keep_set(
    points: &[(BackupId, i64)],
    keep_last: u32,
    keep_daily: u32,
    keep_weekly: u32,
) -> BTreeSet<BackupId> {
    if keep_last == 0 && keep_daily == 0 && keep_weekly == 0 {
        return points.iter().map(|p| p.0).collect();
    }
    let mut newest_first: Vec<(BackupId, i64)> = points.to_vec();
    newest_first.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    let mut keep: BTreeSet<BackupId> = newest_first
        .iter()
        .take(keep_last as usize)
        .map(|p| p.0)
        .collect();
    let mut bucket = |limit: u32, key: &dyn Fn(i64) -> (i32, u32)| {
        let mut seen = BTreeSet::new();
        for (id, at) in &newest_first {
            if seen.len() >= limit as usize {
                break;
            }
            if seen.insert(key(*at)) {
                keep.insert(*id);
            }
        }
    };
    let day = |at: i64| {
        let t = Utc.timestamp_micros(at).single().unwrap_or_default();
        (t.year(), t.ordinal())
    };
    let week = |at: i64| {
        let w = Utc
            .timestamp_micros(at)
            .single()
            .unwrap_or_default()
            .iso_week();
        (w.year(), w.week())
    };
    bucket(keep_daily, &day);
    bucket(keep_weekly, &week);
    keep
}

/// Starts one pass in the background unless one is still running.
pub fn kick(app: &Arc<App>) {
    static RUNNING: AtomicBool = AtomicBool::new(false);
    spawn_alone(&RUNNING, app, |app| async move { pass(&app).await });
}

/// Runs `pass` in a task of its own unless the one `running` marks is
/// still at work: a pass slower than the reconciler's interval (a merge can
/// take minutes) is never run twice at once. Shared by the policy kinds.
pub(crate) fn spawn_alone<F, Fut>(running: &'static AtomicBool, app: &Arc<App>, pass: F)
where
    F: FnOnce(Arc<App>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    if running.swap(true, Ordering::AcqRel) {
        return;
    }
    let app = app.clone();
    tokio::spawn(async move {
        pass(app).await;
        running.store(false, Ordering::Release);
    });
}

/// One pass over every policy.
pub async fn pass(app: &App) {
    let policies = match app.ds.backup_policy_list(None).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "could not read backup policies");
            return;
        }
    };
    for p in policies {
        if let Err(e) = schedule(app, &p).await {
            tracing::warn!(vm = %p.vm_id, error = %e, "scheduled backup not taken");
        }
        if let Err(e) = retain(app, &p).await {
            tracing::warn!(vm = %p.vm_id, error = %e, "backup retention did not finish");
        }
    }
}

async fn schedule(app: &App, p: &BackupPolicyRecord) -> Result<(), Error> {
    let Some(every) = p.every_secs else {
        return Ok(());
    };
    let due = match app.ds.backup_latest(p.vm_id).await? {
        Some(last) => {
            now_micros() - last.created_at >= i64::try_from(every).unwrap_or(i64::MAX) * 1_000_000
        }
        None => true,
    };
    if !due {
        return Ok(());
    }
    let vm = match app.ds.vm_get(p.vm_id).await {
        Ok(vm) => vm,
        Err(Error::NotFound { .. }) => {
            app.ds.backup_policy_delete(p.vm_id).await?;
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    if vm.state != VmState::Running || vm.active_job_id.is_some() {
        return Ok(());
    }
    let target = p.target_id.map(|t| t.to_string());
    let op = super::backups::backup_start(app, &vm, false, target.as_deref()).await?;
    app.job_waker.notify_one();
    tracing::info!(vm = %vm.id, name = %vm.name, backup = %op.backup.id, "scheduled backup started");
    Ok(())
}

async fn retain(app: &App, p: &BackupPolicyRecord) -> Result<(), Error> {
    let mut points: Vec<BackupRecord> = Vec::new();
    let mut page = PageRequest::first(1000);
    loop {
        let got = app
            .ds
            .backup_list(
                &BackupListFilter {
                    project: None,
                    vm: Some(p.vm_id),
                },
                &page,
            )
            .await?;
        points.extend(
            got.items
                .into_iter()
                .filter(|b| b.status == BackupStatus::Succeeded),
        );
        match got.next_cursor {
            Some(c) => page = PageRequest::parse(Some(1000), Some(&c))?,
            None => break,
        }
    }
    let ids: Vec<(BackupId, i64)> = points.iter().map(|b| (b.id, b.created_at)).collect();
    let keep = keep_set(&ids, p.keep_last, p.keep_daily, p.keep_weekly);
    // Oldest first: each merge then moves the least data forward.
    for b in points.into_iter().filter(|b| !keep.contains(&b.id)) {
        let id = b.id;
        super::backups::delete_backup(app, b).await?;
        tracing::info!(vm = %p.vm_id, backup = %id, "restore point deleted by retention");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000_000;

    fn points(ats: &[i64]) -> Vec<(BackupId, i64)> {
        ats.iter().map(|at| (BackupId::new(), *at)).collect()
    }

    #[test]
    fn no_rule_keeps_everything() {
        let p = points(&[1, 2, 3]);
        assert_eq!(keep_set(&p, 0, 0, 0).len(), 3);
    }

    #[test]
    fn keep_last_keeps_the_newest() {
        let p = points(&[10, 30, 20, 40]);
        let k = keep_set(&p, 2, 0, 0);
        assert_eq!(k, [p[1].0, p[3].0].into_iter().collect());
    }

    #[test]
    fn daily_keeps_the_newest_of_each_recent_day() {
        // Two backups on each of three days.
        let p = points(&[DAY, DAY + 5, 2 * DAY, 2 * DAY + 5, 3 * DAY, 3 * DAY + 5]);
        let k = keep_set(&p, 0, 2, 0);
        assert_eq!(k, [p[3].0, p[5].0].into_iter().collect());
    }

    #[test]
    fn weekly_and_last_combine() {
        // One backup a day for three weeks from a Monday (1970-01-05).
        let monday = 4 * DAY;
        let ats: Vec<i64> = (0..21).map(|d| monday + d * DAY).collect();
        let p = points(&ats);
        let k = keep_set(&p, 1, 0, 3);
        // The newest of each week (Sundays) and the newest overall.
        assert_eq!(k, [p[6].0, p[13].0, p[20].0].into_iter().collect());
    }
}
