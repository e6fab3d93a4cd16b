//! Reconcilers: background work that re-reads the world from the store and
//! converges it, instead of trusting that every event was seen. Whatever a
//! lost message or a dead controller missed, the next pass finds.
//!
//! ```text
//!  every `interval` (2 s), on every controller:
//!    take or renew the lease "reconciler" until now + `lease` (10 s)
//!      ├─ refused: another controller leads; nothing this pass
//!      └─ held: one pass, each part on its own (one failing skips no other)
//!           (a) hosts      silent for `host_timeout` (20 s) → unreachable
//!           (b) restarts   crashed VMs with restart policy on_crash, no job,
//!                          host up → the same vm_start an operator's start
//!                          records; past `restart_limit` (3 in 10 min) →
//!                          left crashed, "automatic restarts given up"
//!           (c) orphans    VMs hosts reported running without the
//!                          controller's say: kept ones the host stopped
//!                          reporting are forgotten, destroyed ones after a day
//!           (d) requests   host requests answered or expired a day ago
//!                          are forgotten
//!           (e) backups    scheduled backups and retention
//!                          (`backup_policies.rs`), in a task of its own
//!           (f) snapshots  scheduled snapshots and their rotation
//!                          (`snapshot_policies.rs`), in a task of its own
//!           (g) volumes    recorded for a restore whose VM was never
//!                          created (a controller died between the two
//!                          writes) are forgotten after 10 minutes
//! ```
//!
//! **Invariant**: the lease keeps the work on one controller (on PostgreSQL
//! every controller runs this loop, one acts; a dead leader is replaced
//! within one lease), but nothing depends on it for safety: every change a
//! pass makes is one guarded statement or transaction in the store (a VM is
//! restarted only if it is still crashed and no job holds it), so two
//! controllers that both believe they lead (a pass longer than the lease,
//! clocks apart) do nothing twice.
//!
//! **Boundary**: the reconciler decides *that* something is done; *how* is
//! the same code the API uses (`vms::vm_restart_after_crash` records the
//! same intent and job as `vm_action`'s start).

use std::sync::{Arc, Weak};
use std::time::Duration;

use stratus_common::time::now_micros;
use stratus_datastore::{AutoRestart, RestartLimit};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::app::App;

/// The name of the reconcilers' leader lease in the store.
pub const LEASE_NAME: &str = "reconciler";

/// How the reconcilers run. [`ReconcilerConfig::new`] fills in the defaults.
#[derive(Clone, Debug)]
pub struct ReconcilerConfig {
    /// This controller's name as the lease's holder (its controller id).
    pub holder: String,
    /// Time between passes.
    pub interval: Duration,
    /// How long the lease holds without renewal: how soon another
    /// controller takes over from a dead leader. Keep it several intervals.
    pub lease: Duration,
    /// A host silent this long is marked unreachable. Keep it well above
    /// the agents' report interval (2 s; 10 s for simulated fleets).
    pub host_timeout: Duration,
    /// Crash-loop protection: at most this many automatic restarts per VM
    /// within this window.
    pub restart_limit: RestartLimit,
    /// Most VMs restarted per pass (the rest wait for the next pass).
    pub restarts_per_pass: u32,
    /// A kept orphan is forgotten once its host has reported this long
    /// without it.
    pub orphan_gone_after: Duration,
    /// A destroyed orphan is listed on its host this long.
    pub orphan_destroyed_kept_for: Duration,
    /// A host request is kept this long after it was answered or expired
    /// (long enough for any saga step waiting on it to have read it).
    pub requests_kept_for: Duration,
}

impl ReconcilerConfig {
    /// Defaults: a pass every 2 s under a 10 s lease; hosts unreachable
    /// after 20 s of silence; at most 3 automatic restarts per VM within
    /// 10 minutes, 100 per pass; kept orphans forgotten 30 s after their
    /// host stops reporting them, destroyed ones listed for a day.
    pub fn new(holder: impl Into<String>) -> Self {
        ReconcilerConfig {
            holder: holder.into(),
            interval: Duration::from_secs(2),
            lease: Duration::from_secs(10),
            host_timeout: Duration::from_secs(20),
            restart_limit: RestartLimit {
                max: 3,
                window_micros: micros(Duration::from_secs(600)),
            },
            restarts_per_pass: 100,
            orphan_gone_after: Duration::from_secs(30),
            orphan_destroyed_kept_for: Duration::from_secs(24 * 3600),
            requests_kept_for: Duration::from_secs(24 * 3600),
        }
    }
}

/// Controls reconcilers started with [`start`].
pub struct ReconcilerHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl ReconcilerHandle {
    /// Ends the loop after the pass in progress, and gives up the lease if
    /// this controller held it (so another takes over at once).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Ends the loop at once without giving the lease up, as a controller
    /// that dies would (the lease then runs out): for fault tests.
    pub fn abort(self) {
        self.task.abort();
    }
}

/// Starts the reconcilers with `config`; stop them with the handle.
pub fn start(app: &Arc<App>, config: ReconcilerConfig) -> ReconcilerHandle {
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(run(Arc::downgrade(app), config, stopped));
    ReconcilerHandle { stop, task }
}

async fn run(app: Weak<App>, config: ReconcilerConfig, mut stopped: watch::Receiver<bool>) {
    let mut leading = false;
    loop {
        let Some(a) = app.upgrade() else {
            return;
        };
        leading = lead_and_pass(&a, &config, leading).await;
        drop(a);
        tokio::select! {
            _ = stopped.changed() => break,
            _ = tokio::time::sleep(config.interval) => {}
        }
    }
    if leading {
        if let Some(a) = app.upgrade() {
            match a.ds.lease_release(LEASE_NAME, &config.holder).await {
                Ok(_) => tracing::info!(holder = %config.holder, "reconciler lease given up"),
                Err(e) => tracing::warn!(error = %e, "could not give up the reconciler lease"),
            }
        }
    }
}

/// Takes or renews the lease and, if held, runs one pass. Returns whether
/// this controller leads now.
async fn lead_and_pass(app: &Arc<App>, config: &ReconcilerConfig, was_leading: bool) -> bool {
    let now = now_micros();
    let leading = match app
        .ds
        .lease_acquire(LEASE_NAME, &config.holder, now, now + micros(config.lease))
        .await
    {
        Ok(held) => held,
        Err(e) => {
            tracing::warn!(error = %e, "could not take the reconciler lease; skipping this pass");
            false
        }
    };
    if leading != was_leading {
        if leading {
            tracing::info!(holder = %config.holder, "this controller now runs the reconcilers");
        } else {
            tracing::info!(holder = %config.holder, "another controller runs the reconcilers now");
        }
    }
    if leading {
        pass(app, config).await;
        super::backup_policies::kick(app);
        super::snapshot_policies::kick(app);
    }
    leading
}

/// One pass of every reconciler.
pub async fn pass(app: &App, config: &ReconcilerConfig) {
    mark_silent_hosts(app, config).await;
    restart_crashed_vms(app, config).await;
    forget_old_orphans(app, config).await;
    forget_old_requests(app, config).await;
    forget_unborn_volumes(app).await;
}

/// How long volumes recorded for a restore may wait for their VM's record:
/// both are written within one API call, so anything older is a leftover
/// of a controller that died between them.
const UNBORN_VOLUME_GRACE: Duration = Duration::from_secs(600);

/// (g) Volumes recorded for a `backup restore --as` whose VM never came.
async fn forget_unborn_volumes(app: &App) {
    let before = now_micros() - micros(UNBORN_VOLUME_GRACE);
    match app.ds.backup_restored_volumes_forget_unborn(before).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            volumes = n,
            "forgot volumes recorded for restored VMs never created"
        ),
        Err(e) => tracing::warn!(error = %e, "could not forget volumes of VMs never created"),
    }
}

/// (d) Host requests nobody will read again.
async fn forget_old_requests(app: &App, config: &ReconcilerConfig) {
    let before = now_micros() - micros(config.requests_kept_for);
    match app.ds.host_requests_prune(before, before).await {
        Ok(0) => {}
        Ok(n) => tracing::debug!(requests = n, "forgot old host requests"),
        Err(e) => tracing::warn!(error = %e, "could not prune host requests"),
    }
}

/// (a) Hosts silent for longer than the timeout are unreachable: kept out of
/// placement now, and the HA work acts on them.
async fn mark_silent_hosts(app: &App, config: &ReconcilerConfig) {
    match app
        .ds
        .host_mark_unreachable(now_micros() - micros(config.host_timeout))
        .await
    {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            hosts = n,
            timeout_s = config.host_timeout.as_secs(),
            "hosts stopped heartbeating; marked unreachable"
        ),
        Err(e) => tracing::warn!(error = %e, "could not check host heartbeats"),
    }
}

/// (b) Crashed VMs whose policy says so are started again, within the
/// crash-loop limit.
async fn restart_crashed_vms(app: &App, config: &ReconcilerConfig) {
    let candidates = match app.ds.vm_restart_candidates(config.restarts_per_pass).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "could not look for crashed VMs to restart");
            return;
        }
    };
    for vm in candidates {
        match super::vms::vm_restart_after_crash(app, &vm, config.restart_limit).await {
            Ok(AutoRestart::Started { vm, job, attempt }) => tracing::info!(
                vm = %vm.id,
                name = %vm.name,
                job = %job.id,
                attempt,
                max = config.restart_limit.max,
                "VM crashed; restarting it (restart policy on_crash)"
            ),
            Ok(AutoRestart::GaveUp { vm }) => tracing::warn!(
                vm = %vm.id,
                name = %vm.name,
                max = config.restart_limit.max,
                window_s = config.restart_limit.window_micros / 1_000_000,
                "VM keeps crashing; automatic restarts given up until it is started by hand"
            ),
            Ok(AutoRestart::NotEligible) => {
                tracing::debug!(vm = %vm.id, "crashed VM changed meanwhile; not restarted")
            }
            Err(e) => tracing::warn!(vm = %vm.id, error = %e, "could not restart a crashed VM"),
        }
    }
}

/// (c) Orphan records that are no longer news.
async fn forget_old_orphans(app: &App, config: &ReconcilerConfig) {
    let now = now_micros();
    match app
        .ds
        .host_orphans_prune(
            micros(config.orphan_gone_after),
            now - micros(config.orphan_destroyed_kept_for),
        )
        .await
    {
        Ok(0) => {}
        Ok(n) => tracing::debug!(orphans = n, "forgot orphan records"),
        Err(e) => tracing::warn!(error = %e, "could not prune orphan records"),
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}
