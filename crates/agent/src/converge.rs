//! Convergence: the supervisor that hands each VM to its own worker, and the
//! worker that makes the driver match the desired state of one VM (the state
//! machine is drawn in the crate docs).
//!
//! The supervisor wakes on every new desired revision, on every driver event
//! and every `retry_interval`. It
//! - sends each desired VM (with the revision) to the VM's worker, spawning
//!   one if needed;
//! - sends "orphan" to the worker of every VM the driver has but the latest
//!   desired state does not mention, which destroys it (nothing is left
//!   behind by a VM the controller forgot) or, under `OrphanPolicy::Keep`,
//!   leaves it be and notes it as kept (kept orphans get no worker again
//!   while they stay orphans); the reporter reports both kinds;
//! - starts exec requests not seen before (see `requests.rs`).
//!
//! A worker converges once per wake-up: on a new target, on a driver event
//! for its VM, and every `retry_interval` (which retries failures and
//! catches drift). One worker per VM means a slow VM (a 30 s graceful stop,
//! a large image download) never holds up the others.

use std::collections::HashMap;
use std::sync::Arc;

use stratus_client::types::{DesiredVm, VmDesiredState};
use stratus_common::VmId;
use stratus_driver::{BootSpec, DriverError, ImageFormat, NicSpec, VmRuntimeState, VmSpec};
use tokio::sync::{broadcast, watch, Notify};

use crate::agent::Shared;
use crate::config::OrphanPolicy;
use crate::error::{chain, ImageError};
use crate::state::{Failure, Snapshot, VmBook, VmRecord};

/// What a worker should make of its VM.
#[derive(Clone, Debug)]
enum Target {
    /// As the controller wants it, as of this desired revision.
    Desired { revision: u64, vm: Box<DesiredVm> },
    /// The controller does not mention it: destroy it.
    Orphan,
}

impl PartialEq for Target {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Target::Orphan, Target::Orphan) => true,
            (
                Target::Desired {
                    revision: r1,
                    vm: a,
                },
                Target::Desired {
                    revision: r2,
                    vm: b,
                },
            ) => r1 == r2 && same_desired(a, b),
            _ => false,
        }
    }
}

/// Whether two desired states of a VM ask for the same thing (the generated
/// client types have no `PartialEq`).
pub(crate) fn same_desired(a: &DesiredVm, b: &DesiredVm) -> bool {
    a.vm_id.0 == b.vm_id.0
        && a.desired_state == b.desired_state
        && a.reboot_generation == b.reboot_generation
        && a.name == b.name
        && a.vcpus == b.vcpus
        && a.memory_bytes == b.memory_bytes
        && a.disk_bytes == b.disk_bytes
        && a.image.id.0 == b.image.id.0
        && a.image.sha256 == b.image.sha256
        && a.image.kernel_sha256 == b.image.kernel_sha256
        && a.image.initrd_sha256 == b.image.initrd_sha256
        && a.image.cmdline == b.image.cmdline
        && a.migration == b.migration
        && a.pool.as_ref().map(|p| (p.id.0, &p.path)) == b.pool.as_ref().map(|p| (p.id.0, &p.path))
}

struct Worker {
    target: watch::Sender<Target>,
    nudge: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

/// The supervisor loop. Ends when the desired-state channel closes.
pub(crate) async fn supervise(
    shared: Arc<Shared>,
    mut desired: watch::Receiver<Option<Arc<Snapshot>>>,
) {
    let mut events = shared.driver.subscribe();
    let mut workers: HashMap<VmId, Worker> = HashMap::new();
    let mut tick = tokio::time::interval(shared.retry_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = desired.changed() => {
                if changed.is_err() {
                    return;
                }
                let snapshot = desired.borrow_and_update().clone();
                if let Some(s) = snapshot {
                    dispatch(&shared, &mut workers, &s).await;
                }
            }
            event = events.recv() => {
                match event {
                    Ok(ev) => {
                        tracing::debug!(vm = %ev.id, state = %ev.state, "driver event");
                        if let Some(w) = workers.get(&ev.id) {
                            w.nudge.notify_one();
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(missed = n, "driver events missed; re-checking every VM");
                        for w in workers.values() {
                            w.nudge.notify_one();
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        // Cannot happen while the driver lives; don't spin if it does.
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        events = shared.driver.subscribe();
                    }
                }
                shared.report_now.notify_one();
            }
            _ = tick.tick() => {
                let snapshot = desired.borrow().clone();
                if let Some(s) = snapshot {
                    dispatch(&shared, &mut workers, &s).await;
                }
            }
        }
    }
}

/// Hands out the latest desired state: targets to workers, orphans to
/// destroy, requests to run.
async fn dispatch(shared: &Arc<Shared>, workers: &mut HashMap<VmId, Worker>, s: &Arc<Snapshot>) {
    workers.retain(|_, w| !w.task.is_finished());
    {
        let mut book = shared.book();
        for vm in &s.vms {
            let id = VmId(vm.vm_id.0);
            book.vms.entry(id).or_insert_with(|| VmBook {
                applied_reboot_generation: shared
                    .records
                    .load(id)
                    .map(|r| r.applied_reboot_generation)
                    .unwrap_or(0),
                ..VmBook::default()
            });
        }
    }
    for vm in &s.vms {
        let id = VmId(vm.vm_id.0);
        let target = Target::Desired {
            revision: s.revision,
            vm: Box::new(vm.clone()),
        };
        send(shared, workers, id, target);
    }
    // Orphans: what the driver has (or this agent still tracks) that the
    // controller does not mention.
    let mut orphans: Vec<VmId> = workers
        .keys()
        .copied()
        .filter(|id| s.vm(*id).is_none())
        .collect();
    match shared.driver.vm_list().await {
        Ok(list) => {
            // Kept orphans stay kept while the driver has them and the
            // controller does not want them.
            shared
                .book()
                .kept
                .retain(|id| s.vm(*id).is_none() && list.iter().any(|st| st.id == *id));
            for st in list {
                if s.vm(st.id).is_none() && !orphans.contains(&st.id) {
                    orphans.push(st.id);
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %chain(&e), "cannot list the driver's VMs to find orphans")
        }
    }
    for id in orphans {
        if !workers.contains_key(&id) {
            if shared.book().kept.contains(&id) {
                continue;
            }
            match shared.orphans {
                OrphanPolicy::Destroy => {
                    tracing::warn!(vm = %id, "the controller does not know this VM; destroying it")
                }
                OrphanPolicy::Keep => {
                    tracing::debug!(vm = %id, "the controller does not know this VM; looking at it")
                }
            }
        }
        send(shared, workers, id, Target::Orphan);
    }
    // Records of VMs that exist nowhere any more.
    for id in shared.records.list() {
        if s.vm(id).is_none() && !workers.contains_key(&id) {
            shared.records.remove(id);
        }
    }
    crate::requests::dispatch(shared, s);
}

fn send(shared: &Arc<Shared>, workers: &mut HashMap<VmId, Worker>, id: VmId, target: Target) {
    if let Some(w) = workers.get(&id) {
        w.target.send_if_modified(|cur| {
            if *cur == target {
                false
            } else {
                *cur = target.clone();
                true
            }
        });
        return;
    }
    let (tx, rx) = watch::channel(target);
    let nudge = Arc::new(Notify::new());
    let task = shared.spawn(run_worker(shared.clone(), id, rx, nudge.clone()));
    workers.insert(
        id,
        Worker {
            target: tx,
            nudge,
            task,
        },
    );
}

/// What one convergence step ended with.
enum Step {
    /// The VM is as desired (or held down on purpose).
    Converged,
    /// An orphan was destroyed: the worker is done.
    Gone,
}

async fn run_worker(
    shared: Arc<Shared>,
    id: VmId,
    mut target: watch::Receiver<Target>,
    nudge: Arc<Notify>,
) {
    let mut record: Option<VmRecord> = None;
    loop {
        let t = target.borrow_and_update().clone();
        let outcome = match &t {
            Target::Desired { vm, .. } => converge(&shared, id, vm, &mut record)
                .await
                .map(|()| Step::Converged)
                .map_err(|e| (e, Some(vm.as_ref().clone()))),
            Target::Orphan => destroy_orphan(&shared, id)
                .await
                .map(|()| Step::Gone)
                .map_err(|e| (e, None)),
        };
        shared.report_now.notify_one();
        match outcome {
            Ok(Step::Gone) => return,
            Ok(Step::Converged) => {
                if let Some(b) = shared.book().vms.get_mut(&id) {
                    b.failure = None;
                }
            }
            Err((e, desired)) => {
                let reason = e.reason();
                tracing::warn!(vm = %id, error = %reason, retry_s = shared.retry_interval.as_secs(), "cannot converge the VM; will retry");
                if let Some(desired) = desired {
                    shared.book().vms.entry(id).or_default().failure =
                        Some(Failure { reason, desired });
                }
            }
        }
        tokio::select! {
            changed = target.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = nudge.notified() => {}
            _ = tokio::time::sleep(shared.retry_interval) => {}
        }
    }
}

/// Why a VM could not be converged.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConvergeError {
    #[error("cannot fetch the VM's image")]
    Image(#[source] ImageError),
    #[error("cannot {action} the VM")]
    Driver {
        action: &'static str,
        #[source]
        source: DriverError,
    },
    #[error("cannot write the VM's record")]
    Record(#[source] std::io::Error),
}

impl ConvergeError {
    /// The reason reported to the controller (and shown to the operator).
    fn reason(&self) -> String {
        chain(self)
    }
}

fn driver_err(action: &'static str) -> impl FnOnce(DriverError) -> ConvergeError {
    move |source| ConvergeError::Driver { action, source }
}

/// One convergence step for a desired VM.
async fn converge(
    shared: &Arc<Shared>,
    id: VmId,
    vm: &DesiredVm,
    record: &mut Option<VmRecord>,
) -> Result<(), ConvergeError> {
    if vm.migration.is_some() {
        // Moving to or from this host: the migration's requests do the
        // work; converging here would start a second copy or stop the one
        // being sent.
        *record = None;
        return Ok(());
    }
    let driver = &shared.driver;
    let status = driver.vm_status(id).await.map_err(driver_err("look up"))?;
    if vm.desired_state == VmDesiredState::Deleted {
        if status.is_some() {
            driver.vm_destroy(id).await.map_err(driver_err("destroy"))?;
            tracing::info!(vm = %id, "VM destroyed");
        }
        shared.records.remove(id);
        *record = None;
        return Ok(());
    }
    let active = status.as_ref().map(|s| s.state.is_active());
    // The record: in memory, else on disk, else made from what is seen now
    // (a VM created by an agent that died before writing it, or an upgrade).
    let (mut rec, fresh) = match record.take().or_else(|| shared.records.load(id)) {
        Some(r) => (r, false),
        None => (
            VmRecord {
                applied_reboot_generation: vm.reboot_generation,
                expect_running: active == Some(true),
                hold_revision: None,
            },
            true,
        ),
    };
    let before = rec.clone();
    // Holds are keyed on the VM's own intent generation, so activity on other
    // VMs of the host never restarts a VM that went down by itself.
    let result = converge_with(
        shared,
        id,
        vm.generation,
        vm,
        status.is_some(),
        active,
        &mut rec,
    )
    .await;
    let saved = if fresh || rec != before {
        shared.records.save(id, &rec).map_err(ConvergeError::Record)
    } else {
        Ok(())
    };
    {
        // The entry may not exist yet (a VM whose very first step failed);
        // its failure report must still say which intent it answers.
        let mut book = shared.book();
        let b = book.vms.entry(id).or_default();
        b.applied_reboot_generation = rec.applied_reboot_generation;
        b.converged_generation = b.converged_generation.max(vm.generation);
    }
    *record = Some(rec);
    result.and(saved)
}

async fn converge_with(
    shared: &Arc<Shared>,
    id: VmId,
    intent: u64,
    vm: &DesiredVm,
    exists: bool,
    active: Option<bool>,
    rec: &mut VmRecord,
) -> Result<(), ConvergeError> {
    let driver = &shared.driver;
    if !exists {
        let spec = spec_for(shared, id, vm).await?;
        let t = std::time::Instant::now();
        driver
            .vm_create(&spec)
            .await
            .map_err(driver_err("create"))?;
        tracing::info!(vm = %id, name = %vm.name, ms = t.elapsed().as_millis() as u64, "VM created");
        restore_volumes(shared, id, vm).await?;
        rec.applied_reboot_generation = vm.reboot_generation;
        rec.expect_running = false;
        rec.hold_revision = None;
        shared.report_now.notify_one();
    }
    let active = active.unwrap_or(false);
    if exists && !active && !vm.restore_volumes.is_empty() {
        // Created by an earlier round that ended before its volumes were.
        restore_volumes(shared, id, vm).await?;
    }
    match vm.desired_state {
        VmDesiredState::Stopped | VmDesiredState::Deleted => {
            rec.hold_revision = None;
            if active {
                let t = std::time::Instant::now();
                let how = driver
                    .vm_stop(id, shared.stop_timeout)
                    .await
                    .map_err(driver_err("stop"))?;
                tracing::info!(vm = %id, how = ?how, ms = t.elapsed().as_millis() as u64, "VM stopped");
            }
            rec.expect_running = false;
        }
        VmDesiredState::Running => {
            if active {
                rec.expect_running = true;
                rec.hold_revision = None;
                if vm.reboot_generation > rec.applied_reboot_generation {
                    driver.vm_reboot(id).await.map_err(driver_err("reboot"))?;
                    tracing::info!(vm = %id, reboot_generation = vm.reboot_generation, "VM rebooted");
                    rec.applied_reboot_generation = vm.reboot_generation;
                }
            } else if rec.expect_running {
                // Down without being asked: crashed, or the guest powered
                // off. Leave it for the operator (reported as it is).
                rec.expect_running = false;
                rec.hold_revision = Some(intent);
                tracing::warn!(vm = %id, intent, "VM went down by itself; leaving it down until it is started again");
            } else if rec.hold_revision.is_some_and(|h| intent <= h) {
                // Still held: nothing new was asked.
            } else {
                let t = std::time::Instant::now();
                driver.vm_start(id).await.map_err(driver_err("start"))?;
                tracing::info!(vm = %id, ms = t.elapsed().as_millis() as u64, "VM started");
                rec.expect_running = true;
                rec.hold_revision = None;
                // A fresh boot carries out every reboot asked for so far.
                rec.applied_reboot_generation =
                    rec.applied_reboot_generation.max(vm.reboot_generation);
            }
        }
    }
    Ok(())
}

/// Builds each volume restored beside a new VM from its backup file (unless
/// an earlier round did: building it again would be harmless only until
/// the guest writes) and attaches it, before the VM first starts. Once
/// the create job saw the VM up, the controller no longer lists them.
async fn restore_volumes(
    shared: &Arc<Shared>,
    id: VmId,
    vm: &DesiredVm,
) -> Result<(), ConvergeError> {
    let driver = &shared.driver;
    for rv in &vm.restore_volumes {
        let info = driver
            .volume_info(rv.volume_id)
            .await
            .map_err(driver_err("read a restored volume"))?;
        match info {
            Some(i) if i.attached_to == Some(id) => continue,
            Some(_) => {}
            None => {
                let t = std::time::Instant::now();
                driver
                    .volume_restore(rv.volume_id, rv.size_bytes, std::path::Path::new(&rv.file))
                    .await
                    .map_err(driver_err("restore a volume"))?;
                tracing::info!(vm = %id, volume = %rv.volume_id, from = %rv.file, ms = t.elapsed().as_millis() as u64, "volume restored from a backup");
            }
        }
        driver
            .vm_volume_attach(id, rv.volume_id)
            .await
            .map_err(driver_err("attach a restored volume"))?;
    }
    Ok(())
}

/// The driver's spec for a desired VM, caching its image first.
///
/// A VM in a shared storage pool gets its image from the pool's own cache
/// (`<pool>/images/`, filled once for every host that sees the pool), so
/// its disk's backing file is one every such host can open.
pub(crate) async fn spec_for(
    shared: &Arc<Shared>,
    id: VmId,
    vm: &DesiredVm,
) -> Result<VmSpec, ConvergeError> {
    let pool = vm.pool.as_ref().map(|p| std::path::PathBuf::from(&p.path));
    let cache = match &pool {
        Some(dir) => shared.pool_images(dir),
        None => shared.images.clone(),
    };
    let cached = cache
        .ensure(&shared.api, &vm.image)
        .await
        .map_err(ConvergeError::Image)?;
    let boot = match cached.kernel {
        Some(kernel) => BootSpec::Kernel {
            kernel,
            initrd: cached.initrd,
            cmdline: vm.image.cmdline.clone().unwrap_or_default(),
        },
        None => BootSpec::Firmware,
    };
    Ok(VmSpec {
        id,
        name: vm.name.clone(),
        vcpus: vm.vcpus,
        memory_bytes: vm.memory_bytes,
        disk_bytes: vm.disk_bytes,
        image: cached.disk,
        image_format: match vm.image.format {
            stratus_client::types::ImageFormat::Qcow2 => ImageFormat::Qcow2,
            stratus_client::types::ImageFormat::Raw => ImageFormat::Raw,
        },
        restore_from: vm.restore_from.as_ref().map(std::path::PathBuf::from),
        pool,
        boot,
        nic: NicSpec::User,
    })
}

/// An orphan's worker: destroys the VM (or, under `OrphanPolicy::Keep`,
/// notes it as kept and leaves it be) and forgets what this agent knew of
/// it.
async fn destroy_orphan(shared: &Arc<Shared>, id: VmId) -> Result<(), ConvergeError> {
    let known = shared
        .driver
        .vm_status(id)
        .await
        .map_err(driver_err("look up"))?
        .is_some();
    if known && shared.orphans == OrphanPolicy::Keep {
        shared.records.remove(id);
        let mut book = shared.book();
        book.vms.remove(&id);
        if book.kept.insert(id) {
            tracing::warn!(vm = %id, "orphan VM kept (the controller does not know it; --orphans keep)");
        }
        return Ok(());
    }
    if known {
        // Disks in a shared pool stay: the VM may run from them on another
        // host now (it moved while this host was away, or a migration left
        // this host behind). Everything else of it here goes.
        crate::migrate::forget(shared, id, true)
            .await
            .map_err(driver_err("destroy"))?;
        tracing::warn!(vm = %id, "orphan VM destroyed (the controller does not know it; disks in a shared pool, if any, kept)");
    }
    shared.records.remove(id);
    let mut book = shared.book();
    book.vms.remove(&id);
    if known {
        book.destroyed.insert(id, 3);
    }
    Ok(())
}

/// How a VM the driver knows is reported, given what is desired of it.
pub(crate) fn observed_state(
    state: &VmRuntimeState,
    desired: Option<&DesiredVm>,
) -> (stratus_client::types::ObservedVmState, Option<String>) {
    use stratus_client::types::ObservedVmState as O;
    match state {
        VmRuntimeState::Running => (O::Running, None),
        VmRuntimeState::Paused => (O::Running, Some("paused".into())),
        VmRuntimeState::Stopped => (O::Stopped, None),
        VmRuntimeState::Crashed { reason } => {
            // Asked to stop, a crashed VM is as stopped as it gets.
            if desired.is_some_and(|d| d.desired_state != VmDesiredState::Running) {
                (O::Stopped, None)
            } else {
                (O::Crashed, Some(reason.clone()))
            }
        }
    }
}

/// Whether the book says this VM's last convergence failed under what is
/// still desired (else the failure is old news and not reported).
pub(crate) fn current_failure<'a>(b: &'a VmBook, desired: Option<&DesiredVm>) -> Option<&'a str> {
    let f = b.failure.as_ref()?;
    desired
        .is_some_and(|d| same_desired(&f.desired, d))
        .then_some(f.reason.as_str())
}
