//! The QEMU driver: one daemonized QEMU process per VM, driven over QMP, with
//! all state in files under `data_dir/vms/<vm-id>/` (see `layout.rs` for the
//! tree) so that an agent that dies and restarts finds its VMs again.
//!
//! # Processes
//!
//! `vm_start` runs QEMU with `-daemonize -pidfile run/qemu.pid`: QEMU forks,
//! the child is re-parented to PID 1 and outlives the agent. QEMU starts
//! paused (`-S`); the driver attaches the console reader (see `console.rs`) and
//! a monitor task that holds the QMP connection, then sends `cont`. While a VM
//! runs, this driver instance keeps per VM: the QMP connection, the console
//! reader and the monitor task. Dropping the driver aborts those tasks and
//! closes the sockets; the QEMUs keep running. One driver per data directory:
//! `new` takes an exclusive `flock` on `data_dir/driver.lock`.
//!
//! **Invariant: never two QEMUs per VM.** Every lifecycle call on a VM holds
//! that VM's operation lock; `vm_start` first looks for a live QEMU of the VM
//! (pidfile, then a `/proc` scan for strays) and adopts it or refuses. QEMU
//! itself also locks its pidfile, so a second QEMU with the same pidfile fails
//! to start.
//!
//! # Adoption
//!
//! A pid is this VM's QEMU only if `/proc/<pid>` is alive (not a zombie) and
//! its command line names a `qemu` binary and contains the VM id (passed as
//! `-uuid`); a recycled pid is not mistaken for the VM. `QemuDriver::new`,
//! `vm_list` and `vm_status` adopt every live QEMU they find: reattach the
//! console and start a monitor.
//!
//! # Stopped or crashed
//!
//! The monitor notices QEMU's end within half a second (QMP EOF, and `/proc`
//! polled every 500 ms). Then, and also whenever a status call finds a VM
//! recorded as running whose QEMU is gone (the agent was down when it ended),
//! the end is classified from the files, not from memory:
//!
//! 1. `run/stop-requested` exists → **Stopped** (the driver ended it on purpose;
//!    written before `system_powerdown`, `quit` or SIGKILL);
//! 2. else `run/shutdown.json` says `guest-panic` → **Crashed** (guest panicked);
//! 3. else the pidfile is gone → **Stopped**: QEMU removes its pidfile when it
//!    exits through its own exit path (the guest powered off, `quit`, SIGTERM);
//! 4. else → **Crashed** ("QEMU exited unexpectedly (killed or crashed)"): a
//!    process that dies of SIGKILL, a segfault or the OOM killer cannot remove it.
//!
//! The outcome goes to `state.json` so later status calls, from this or a
//! restarted agent, still say crashed or stopped.

mod backup;
mod cmdline;
mod cold;
mod config;
mod console;
mod host;
mod image;
mod layout;
mod migrate;
mod probe;
mod process;
mod prune;
mod qga;
mod qmp;
mod snapshot;
mod volume;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use rustix::process::Signal;
use stratus_common::VmId;
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;

pub use config::{Accel, AccelChoice, QemuConfig};
pub use probe::{probe_accel, AccelProbe};

use self::cmdline::LaunchOptions;
use self::console::ConsoleLog;
use self::layout::{
    read_json, remove_file_if_exists, write_json, ShutdownRecord, StateRecord, VmPaths,
};
use self::qga::QgaConn;
use self::qmp::QmpService;
use crate::{
    BackupCheck, BackupOutcome, BackupRequest, BootSpec, ConsoleChunk, Driver, DriverError,
    ExecOutput, GuestInfo, HostFacts, ProgressFn, PruneChild, Pruned, QemuSaid, SnapshotInfo,
    SnapshotRequest, StopHow, VmEvent, VmRuntimeState, VmSpec, VmStatus,
};
use crate::{VolumeInfo, VolumeSpec};

/// Events buffered per subscriber.
const EVENT_CAPACITY: usize = 1024;
/// How often the monitor checks that QEMU is still alive.
const MONITOR_TICK: Duration = Duration::from_millis(500);
/// How long a QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `guest_info` waits for the guest agent.
const GUEST_INFO_TIMEOUT: Duration = Duration::from_secs(3);
/// The guest-sync timeout while waiting for a guest agent's first answer.
const GUEST_FIRST_CONTACT_TIMEOUT: Duration = Duration::from_secs(8);
/// The reason recorded when QEMU disappears without a clean exit.
pub const CRASH_REASON: &str = "QEMU exited unexpectedly (killed or crashed)";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks stays consistent at every await-free step;
    // a panic elsewhere must not wedge the driver.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The QEMU driver. See the module docs.
pub struct QemuDriver {
    shared: Arc<Shared>,
    /// `data_dir/driver.lock`, flock'ed: one driver per data directory (two
    /// would fight over each VM's single QMP and console connection).
    _data_dir_lock: std::fs::File,
}

struct Shared {
    config: QemuConfig,
    vms_dir: PathBuf,
    launch: LaunchOptions,
    accel_reason: String,
    qemu_version: String,
    vms: Mutex<HashMap<VmId, Arc<VmEntry>>>,
    events: broadcast::Sender<VmEvent>,
    /// One operation per data volume at a time (see `volume.rs`).
    volume_locks: volume::VolumeLocks,
    /// The live migrations this driver sends, so they can be cancelled.
    migrations: migrate::Sending,
    /// One incoming migration prepared at a time: a port is chosen free and
    /// then bound by QEMU, so two prepares at once could choose the same
    /// one (seen when maintenance sent several VMs to one host).
    incoming: tokio::sync::Mutex<()>,
}

/// What the driver keeps in memory per VM it has seen.
struct VmEntry {
    id: VmId,
    paths: VmPaths,
    console: ConsoleLog,
    /// Serializes lifecycle operations (create, start, stop, reboot, destroy,
    /// adoption) on this VM.
    op: tokio::sync::Mutex<()>,
    /// One backup of the VM at a time. Held for a whole backup, while `op` is
    /// held only around its changes to QEMU's block graph (see `backup.rs`).
    backup: tokio::sync::Mutex<()>,
    /// One guest agent client at a time (the chardev serves one).
    qga: tokio::sync::Mutex<()>,
    console_lock: Arc<Mutex<()>>,
    /// Serializes read-modify-write of `state.json`.
    record_lock: Mutex<()>,
    runtime: Mutex<Option<Runtime>>,
    last_contact: Mutex<Option<DateTime<Utc>>>,
    /// Counts the QMP events QEMU sent (the monitor bumps it as each
    /// arrives). Long operations that poll QEMU (a migration, its disk mirror)
    /// wait on it as well as on their poll interval, so they look again the
    /// moment QEMU reports a change (`MIGRATION`, `BLOCK_JOB_READY`, …)
    /// instead of up to one interval later: that delay was part of a
    /// migration's downtime and of the control plane's overhead.
    qmp_events: watch::Sender<u64>,
}

/// The tasks and connection this driver keeps for a running VM.
struct Runtime {
    pid: u32,
    qmp: watch::Receiver<Option<Arc<QmpService>>>,
    console: Option<JoinHandle<()>>,
    monitor: Option<JoinHandle<()>>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        for task in [&self.console, &self.monitor].into_iter().flatten() {
            task.abort();
        }
    }
}

impl Drop for QemuDriver {
    fn drop(&mut self) {
        // Detach from every VM (their QEMUs keep running): abort the monitor
        // and console tasks, which closes QMP and console sockets.
        let vms: Vec<Arc<VmEntry>> = lock(&self.shared.vms).values().cloned().collect();
        for vm in vms {
            drop(lock(&vm.runtime).take());
        }
    }
}

impl QemuDriver {
    /// Checks QEMU, picks the accelerator (probing KVM for
    /// [`AccelChoice::Auto`], which can take `probe_timeout`), and adopts every
    /// VM already running under `data_dir`.
    pub async fn new(config: QemuConfig) -> Result<Self, DriverError> {
        let vms_dir = config.data_dir.join("vms");
        std::fs::create_dir_all(&vms_dir)
            .map_err(|e| DriverError::io("cannot create the VM directory", &vms_dir, e))?;
        let data_dir_lock = lock_data_dir(&config.data_dir)?;
        let vms_dir = vms_dir
            .canonicalize()
            .map_err(|e| DriverError::io("cannot resolve the VM directory", &vms_dir, e))?;
        let longest = VmPaths::new(&vms_dir, VmId::new()).console_sock;
        if longest.as_os_str().len() > layout::MAX_SOCKET_PATH {
            return Err(DriverError::Config(format!(
                "data directory {} is too deep: socket paths like {} exceed {} bytes",
                config.data_dir.display(),
                longest.display(),
                layout::MAX_SOCKET_PATH
            )));
        }
        let qemu_version = probe::qemu_version(&config.qemu_binary)
            .await
            .ok_or_else(|| {
                DriverError::Config(format!(
                    "cannot run {} --version (is QEMU installed?)",
                    config.qemu_binary.display()
                ))
            })?;
        let sandbox = probe::sandbox_supported(&config.qemu_binary).await;
        let (accel, accel_reason) = match config.accel {
            AccelChoice::Kvm => (Accel::Kvm, "chosen by configuration".to_string()),
            AccelChoice::Tcg => (Accel::Tcg, "chosen by configuration".to_string()),
            AccelChoice::Auto => {
                let p = probe_accel(
                    &config.qemu_binary,
                    config.probe_kernel.as_deref(),
                    config.probe_timeout,
                )
                .await;
                (p.accel, p.reason)
            }
        };
        tracing::info!(qemu = %qemu_version, %accel, reason = %accel_reason, sandbox, "QEMU driver ready");
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let driver = QemuDriver {
            shared: Arc::new(Shared {
                config,
                vms_dir,
                launch: LaunchOptions { accel, sandbox },
                accel_reason,
                qemu_version,
                vms: Mutex::new(HashMap::new()),
                events,
                volume_locks: volume::VolumeLocks::default(),
                migrations: migrate::Sending::default(),
                incoming: tokio::sync::Mutex::new(()),
            }),
            _data_dir_lock: data_dir_lock,
        };
        let adopted = driver.vm_list().await?;
        for vm in adopted.iter().filter(|s| s.state.is_active()) {
            migrate::recover_interrupted(&driver.shared, vm.id).await;
        }
        let running = adopted.iter().filter(|s| s.state.is_active()).count();
        tracing::info!(
            vms = adopted.len(),
            running,
            "QEMU driver adopted existing VMs"
        );
        Ok(driver)
    }

    /// The accelerator VMs run with.
    pub fn accel(&self) -> Accel {
        self.shared.launch.accel
    }

    /// Why that accelerator was chosen (the probe's finding).
    pub fn accel_reason(&self) -> &str {
        &self.shared.accel_reason
    }

    /// The directory holding the VM's files (whether or not it exists).
    pub fn vm_dir(&self, id: VmId) -> PathBuf {
        VmPaths::new(&self.shared.vms_dir, id).dir
    }
}

impl Shared {
    fn entry(&self, id: VmId) -> Arc<VmEntry> {
        let mut vms = lock(&self.vms);
        vms.entry(id)
            .or_insert_with(|| {
                let paths = VmPaths::new(&self.vms_dir, id);
                Arc::new(VmEntry {
                    id,
                    console: ConsoleLog::new(
                        paths.console_log.clone(),
                        paths.console_offset.clone(),
                        self.config.console_log_max,
                    ),
                    paths,
                    op: tokio::sync::Mutex::new(()),
                    backup: tokio::sync::Mutex::new(()),
                    qga: tokio::sync::Mutex::new(()),
                    console_lock: Arc::new(Mutex::new(())),
                    record_lock: Mutex::new(()),
                    runtime: Mutex::new(None),
                    last_contact: Mutex::new(None),
                    qmp_events: watch::Sender::new(0),
                })
            })
            .clone()
    }

    /// The entry of a VM that exists on disk, else `NotFound`.
    fn existing(&self, id: VmId) -> Result<Arc<VmEntry>, DriverError> {
        let paths = VmPaths::new(&self.vms_dir, id);
        if !paths.vm_json.exists() {
            return Err(DriverError::NotFound(id));
        }
        Ok(self.entry(id))
    }

    fn emit(&self, id: VmId, state: VmRuntimeState) {
        tracing::info!(vm = %id, %state, "VM state changed");
        // No receiver is fine.
        let _ = self.events.send(VmEvent { id, state });
    }

    fn read_record(&self, vm: &VmEntry) -> Result<StateRecord, DriverError> {
        Ok(
            read_json::<StateRecord>(&vm.paths.state_json, "VM state record")?
                .unwrap_or_else(|| StateRecord::new(VmRuntimeState::Stopped, None)),
        )
    }

    /// Records that QEMU `pid` of the VM now runs in `state` (running or
    /// paused), emitting an event if that changes the record.
    fn record_active(
        &self,
        vm: &VmEntry,
        pid: u32,
        state: VmRuntimeState,
    ) -> Result<(), DriverError> {
        self.record_active_if(vm, pid, state, false)
    }

    /// As `record_active`; with `only_if_recorded`, only while the record
    /// already says this pid is active (for QMP events, which must not revive
    /// a VM whose end is recorded).
    fn record_active_if(
        &self,
        vm: &VmEntry,
        pid: u32,
        state: VmRuntimeState,
        only_if_recorded: bool,
    ) -> Result<(), DriverError> {
        let changed = {
            let _g = lock(&vm.record_lock);
            let rec = self.read_record(vm)?;
            let recorded = rec.pid == Some(pid) && rec.state.is_active();
            if (rec.pid == Some(pid) && rec.state == state) || (only_if_recorded && !recorded) {
                false
            } else {
                write_json(
                    &vm.paths.state_json,
                    "VM state record",
                    &StateRecord::new(state.clone(), Some(pid)),
                )?;
                true
            }
        };
        if changed {
            self.emit(vm.id, state);
        }
        Ok(())
    }

    /// Records the end of QEMU `pid` (which must be gone), classified as in
    /// the module docs, and cleans the run directory. Idempotent: a record
    /// that is not "active with this pid" is left alone.
    fn record_exit(&self, vm: &VmEntry, pid: Option<u32>) -> Result<StateRecord, DriverError> {
        let (rec, changed) = {
            let _g = lock(&vm.record_lock);
            let rec = self.read_record(vm)?;
            if !rec.state.is_active() || rec.pid != pid {
                (rec, false)
            } else {
                let state = classify_exit(&vm.paths);
                let rec = StateRecord::new(state, None);
                write_json(&vm.paths.state_json, "VM state record", &rec)?;
                for p in [&vm.paths.pidfile, &vm.paths.stop_marker] {
                    remove_file_if_exists(p)?;
                }
                for p in vm.paths.sockets() {
                    remove_file_if_exists(p)?;
                }
                (rec, true)
            }
        };
        if changed {
            if let VmRuntimeState::Crashed { reason } = &rec.state {
                tracing::warn!(vm = %vm.id, pid, %reason, "VM crashed");
            }
            self.emit(vm.id, rec.state.clone());
        }
        Ok(rec)
    }

    /// The live QEMU pid of the VM, if any: the one this driver watches, the
    /// pidfile's, or the recorded one.
    fn live_pid(&self, vm: &VmEntry) -> Option<u32> {
        if let Some(rt) = lock(&vm.runtime).as_ref() {
            if process::is_qemu_of(rt.pid, vm.id) {
                return Some(rt.pid);
            }
        }
        let from_pidfile = process::read_pidfile(&vm.paths.pidfile);
        let recorded = read_json::<StateRecord>(&vm.paths.state_json, "VM state record")
            .ok()
            .flatten()
            .and_then(|r| r.pid);
        [from_pidfile, recorded]
            .into_iter()
            .flatten()
            .find(|pid| process::is_qemu_of(*pid, vm.id))
    }

    /// Makes sure a live QEMU of the VM is watched by this driver, and returns
    /// its pid; `None` if no QEMU of the VM runs. Caller holds `vm.op`.
    fn ensure_adopted(self: &Arc<Self>, vm: &Arc<VmEntry>) -> Result<Option<u32>, DriverError> {
        let Some(pid) = self.live_pid(vm) else {
            drop(lock(&vm.runtime).take());
            return Ok(None);
        };
        if lock(&vm.runtime).as_ref().is_some_and(|rt| rt.pid == pid) {
            return Ok(Some(pid));
        }
        tracing::info!(vm = %vm.id, pid, "adopting running QEMU");
        // A stop marker here was left by an agent that died mid-stop; the VM
        // still runs, so a later end must be classified afresh.
        remove_file_if_exists(&vm.paths.stop_marker)?;
        let rec = self.read_record(vm)?;
        if !(rec.state.is_active() && rec.pid == Some(pid)) {
            self.record_active(vm, pid, VmRuntimeState::Running)?;
        }
        let (attached, _) = oneshot::channel();
        self.attach(vm, pid, attached);
        Ok(Some(pid))
    }

    /// Starts the console reader and the monitor for QEMU `pid`.
    fn attach(
        self: &Arc<Self>,
        vm: &Arc<VmEntry>,
        pid: u32,
        console_attached: oneshot::Sender<bool>,
    ) {
        let (qmp_tx, qmp_rx) = watch::channel(None);
        let console = tokio::spawn(console::pump(
            vm.paths.console_sock.clone(),
            vm.console.clone(),
            vm.console_lock.clone(),
            console_attached,
        ));
        let monitor = tokio::spawn(monitor(self.clone(), vm.clone(), pid, qmp_tx));
        *lock(&vm.runtime) = Some(Runtime {
            pid,
            qmp: qmp_rx,
            console: Some(console),
            monitor: Some(monitor),
        });
    }

    /// The QMP connection of the running VM, waiting briefly for the monitor
    /// to (re)connect.
    async fn qmp(&self, vm: &VmEntry) -> Result<Arc<QmpService>, DriverError> {
        let rx = lock(&vm.runtime).as_ref().map(|rt| rt.qmp.clone());
        let Some(mut rx) = rx else {
            return Err(DriverError::InvalidState {
                id: vm.id,
                operation: "talk to QEMU of",
                state: "not running".into(),
            });
        };
        let waited = tokio::time::timeout(QMP_TIMEOUT, rx.wait_for(Option::is_some)).await;
        match waited {
            Ok(Ok(slot)) => slot
                .clone()
                .ok_or_else(|| DriverError::timeout("waiting for QMP")),
            _ => Err(DriverError::timeout(format!(
                "waiting {}s for the QMP connection to VM {}",
                QMP_TIMEOUT.as_secs(),
                vm.id
            ))),
        }
    }

    /// Status from the files, adopting or reconciling when no other
    /// operation on the VM is in flight.
    fn status(self: &Arc<Self>, vm: &Arc<VmEntry>) -> Result<VmStatus, DriverError> {
        if let Ok(_op) = vm.op.try_lock() {
            if self.ensure_adopted(vm)?.is_none() {
                self.reconcile_dead(vm)?;
            }
        }
        let rec = self.read_record(vm)?;
        Ok(VmStatus {
            id: vm.id,
            pid: if rec.state.is_active() { rec.pid } else { None },
            state: rec.state,
            since: rec.since,
        })
    }

    /// If the record says running but no QEMU of the VM lives, records how it ended.
    fn reconcile_dead(&self, vm: &VmEntry) -> Result<(), DriverError> {
        let rec = self.read_record(vm)?;
        if rec.state.is_active() {
            self.record_exit(vm, rec.pid)?;
        }
        Ok(())
    }

    /// Ends QEMU `pid` for good: marker, then `quit`, then SIGKILL. Caller holds `vm.op`.
    async fn kill(&self, vm: &VmEntry, pid: u32, try_quit: bool) -> Result<(), DriverError> {
        touch(&vm.paths.stop_marker)?;
        if try_quit {
            if let Ok(qmp) = self.qmp(vm).await {
                let _ =
                    qmp::execute(&qmp, qapi::qmp::quit {}, Duration::from_secs(2), "stop").await;
                if process::wait_gone(pid, vm.id, Duration::from_secs(3)).await {
                    return Ok(());
                }
            }
        }
        process::signal(pid, Signal::KILL).map_err(|e| {
            DriverError::io(format!("cannot kill QEMU pid {pid}"), &vm.paths.pidfile, e)
        })?;
        if process::wait_gone(pid, vm.id, Duration::from_secs(5)).await {
            Ok(())
        } else {
            Err(DriverError::timeout(format!(
                "waiting for QEMU pid {pid} of VM {} to die after SIGKILL",
                vm.id
            )))
        }
    }

    async fn start(self: &Arc<Self>, vm: &Arc<VmEntry>) -> Result<(), DriverError> {
        let paths = &vm.paths;
        let spec: VmSpec =
            read_json(&paths.vm_json, "VM spec")?.ok_or(DriverError::NotFound(vm.id))?;
        let disk = snapshot::launch_disk(&self.config.qemu_img, vm.id, paths).await?;
        let pid = self.launch(vm, &spec, &disk, None).await?;
        let resumed = async {
            let qmp = self.qmp(vm).await?;
            qmp::execute(&qmp, qapi::qmp::cont {}, QMP_TIMEOUT, "start").await
        }
        .await;
        if let Err(e) = resumed {
            tracing::warn!(vm = %vm.id, error = %e, "QEMU did not resume; ending it");
            let _ = self.kill(vm, pid, false).await;
            drop(lock(&vm.runtime).take());
            let _ = self.record_exit(vm, Some(pid));
            return Err(e);
        }
        self.record_active(vm, pid, VmRuntimeState::Running)
    }

    /// Runs QEMU for the VM, paused (`-S`; or, `incoming`, waiting for a
    /// live migration: `-incoming defer`, without `-S` so the guest runs the
    /// moment the state is in), records it as paused and attaches the
    /// console and monitor. Returns QEMU's pid. Caller holds `vm.op`.
    async fn launch(
        self: &Arc<Self>,
        vm: &Arc<VmEntry>,
        spec: &VmSpec,
        disk: &cmdline::DiskLaunch,
        incoming: Option<cmdline::Incoming>,
    ) -> Result<u32, DriverError> {
        let paths = &vm.paths;
        std::fs::create_dir_all(&paths.run)
            .map_err(|e| DriverError::io("cannot create the VM run directory", &paths.run, e))?;
        for p in [&paths.pidfile, &paths.stop_marker, &paths.shutdown_json] {
            remove_file_if_exists(p)?;
        }
        for p in paths.sockets() {
            remove_file_if_exists(p)?;
        }
        // Truncated per start, then opened for appending: QEMU reopens it for -D.
        let qemu_log = std::fs::File::create(&paths.qemu_log)
            .and_then(|_| {
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&paths.qemu_log)
            })
            .map_err(|e| DriverError::io("cannot create the QEMU log", &paths.qemu_log, e))?;
        let mut args = cmdline::qemu_args(spec, paths, disk, self.launch)?;
        args.extend(volume::boot_args(self, vm)?);
        if let Some(incoming) = incoming {
            cmdline::make_incoming(&mut args, &incoming);
        }
        tracing::debug!(vm = %vm.id, ?args, "starting QEMU");
        let status = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(&self.config.qemu_binary)
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(qemu_log)
                .kill_on_drop(true)
                .status(),
        )
        .await;
        let status = match status {
            Ok(status) => status
                .map_err(|e| DriverError::io("cannot run QEMU", &self.config.qemu_binary, e))?,
            Err(_) => {
                // The launcher was killed on drop; its daemon child may live.
                for pid in process::find_qemu_of(vm.id) {
                    let _ = self.kill(vm, pid, false).await;
                }
                return Err(DriverError::timeout(format!(
                    "waiting for QEMU of VM {} to daemonize",
                    vm.id
                )));
            }
        };
        if !status.success() {
            return Err(DriverError::qemu(
                format!("QEMU refused to start VM {} ({status})", vm.id),
                QemuSaid(log_tail(&paths.qemu_log)),
            ));
        }
        let pid = process::read_pidfile(&paths.pidfile).ok_or_else(|| {
            DriverError::qemu(
                format!("QEMU of VM {} daemonized but wrote no pidfile", vm.id),
                QemuSaid(log_tail(&paths.qemu_log)),
            )
        })?;
        // Prelaunch: paused until the console is attached.
        {
            let _g = lock(&vm.record_lock);
            write_json(
                &paths.state_json,
                "VM state record",
                &StateRecord::new(VmRuntimeState::Paused, Some(pid)),
            )?;
        }
        let (attached_tx, attached_rx) = oneshot::channel();
        self.attach(vm, pid, attached_tx);
        if !matches!(attached_rx.await, Ok(true)) {
            tracing::warn!(vm = %vm.id, "starting without the console attached");
        }
        Ok(pid)
    }

    /// Kills the VM if it runs and removes everything the driver keeps for
    /// it (see `vm_destroy`). Caller holds `vm.op`.
    async fn destroy(&self, vm: &VmEntry) -> Result<(), DriverError> {
        drop(lock(&vm.runtime).take());
        // A cold migration's export of the disk about to go.
        cold::end_export(vm).await?;
        let mut pids = process::find_qemu_of(vm.id);
        if let Some(pid) = process::read_pidfile(&vm.paths.pidfile) {
            if process::is_qemu_of(pid, vm.id) && !pids.contains(&pid) {
                pids.push(pid);
            }
        }
        let was_active = !pids.is_empty()
            || read_json::<StateRecord>(&vm.paths.state_json, "VM state record")
                .ok()
                .flatten()
                .is_some_and(|r| r.state.is_active());
        if vm.paths.dir.exists() {
            for pid in &pids {
                self.kill(vm, *pid, false).await?;
            }
        } else {
            for pid in &pids {
                process::signal(*pid, Signal::KILL).map_err(|e| {
                    DriverError::io(format!("cannot kill QEMU pid {pid}"), &vm.paths.dir, e)
                })?;
            }
        }
        // Volumes outlive the VM: each becomes one file again (snapshot
        // layers flattened), then its attachment is forgotten, so even a
        // directory removal that fails half-way leaves them free.
        volume::release_all(self, vm).await?;
        remove_file_if_exists(&vm.paths.volumes_json)?;
        // A VM in a shared pool: its disks first (the link is how they are
        // found, so it goes last).
        if let Ok(disks) = std::fs::read_link(&vm.paths.disks_link) {
            match std::fs::remove_dir_all(&disks) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(DriverError::io(
                        "cannot remove the VM's disks from its storage pool",
                        &disks,
                        e,
                    ))
                }
            }
        }
        match std::fs::remove_dir_all(&vm.paths.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(DriverError::io(
                    "cannot remove the VM directory",
                    &vm.paths.dir,
                    e,
                ))
            }
        }
        lock(&self.vms).remove(&vm.id);
        if was_active {
            self.emit(vm.id, VmRuntimeState::Stopped);
        }
        Ok(())
    }

    async fn guest_info(&self, vm: &VmEntry) -> GuestInfo {
        let last = *lock(&vm.last_contact);
        let _g = vm.qga.lock().await;
        // Waiting for a guest agent's first answer (a VM booting), one
        // guest-sync waits long: it sits in the virtio-serial buffer and
        // qemu-ga answers it the moment it starts. Reconnecting often instead
        // would queue one sync per attempt, which qemu-ga then answers one by
        // one as stale replies, delaying the first real answer by seconds.
        let recent = last.is_some_and(|t| chrono::Utc::now() - t < chrono::Duration::seconds(30));
        let sync_timeout = if recent {
            GUEST_INFO_TIMEOUT
        } else {
            GUEST_FIRST_CONTACT_TIMEOUT
        };
        let conn = match QgaConn::connect(&vm.paths.qga_sock, sync_timeout).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(vm = %vm.id, error = %e, "guest agent not answering");
                return GuestInfo {
                    last_contact: last,
                    ..GuestInfo::default()
                };
            }
        };
        let t = GUEST_INFO_TIMEOUT;
        let mut info = GuestInfo {
            connected: true,
            ..GuestInfo::default()
        };
        if let Ok(agent) = conn.run(qapi::qga::guest_info {}, t).await {
            info.agent_version = Some(agent.version);
        }
        // guest-get-osinfo is missing from old agents and from Windows ones
        // without WMI: leave the OS fields empty then.
        if let Ok(os) = conn.run(qapi::qga::guest_get_osinfo {}, t).await {
            info.os_name = os.name.or(os.pretty_name);
            info.os_version = os.version.or(os.version_id);
            info.kernel = os.kernel_release;
        }
        if let Ok(ifaces) = conn
            .run(qapi::qga::guest_network_get_interfaces {}, t)
            .await
        {
            info.ip_addresses = ifaces
                .into_iter()
                .flat_map(|i| i.ip_addresses.unwrap_or_default())
                .map(|a| a.ip_address)
                .filter(|a| is_reportable_address(a))
                .collect();
        }
        let now = Utc::now();
        *lock(&vm.last_contact) = Some(now);
        info.last_contact = Some(now);
        info
    }

    async fn guest_exec(
        &self,
        vm: &VmEntry,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, DriverError> {
        let agent_err =
            |context: String, source: Option<crate::error::BoxError>| DriverError::GuestAgent {
                id: vm.id,
                context,
                source,
            };
        let (path, args) = argv
            .split_first()
            .ok_or_else(|| agent_err("guest_exec needs a command".into(), None))?;
        let deadline = tokio::time::Instant::now() + timeout;
        let _g = vm.qga.lock().await;
        let conn = QgaConn::connect(&vm.paths.qga_sock, timeout.min(Duration::from_secs(10)))
            .await
            .map_err(|e| agent_err("the guest agent is not answering".into(), Some(e)))?;
        *lock(&vm.last_contact) = Some(Utc::now());
        let started = conn
            .run(
                qapi::qga::guest_exec {
                    path: path.clone(),
                    arg: Some(args.to_vec()),
                    env: None,
                    input_data: None,
                    capture_output: Some(qapi::qga::GuestExecCaptureOutput::flag(true)),
                },
                QMP_TIMEOUT,
            )
            .await
            .map_err(|e| agent_err(format!("guest-exec of {path:?} failed"), Some(e)))?;
        loop {
            let status = conn
                .run(
                    qapi::qga::guest_exec_status { pid: started.pid },
                    QMP_TIMEOUT,
                )
                .await
                .map_err(|e| agent_err(format!("guest-exec-status of {path:?} failed"), Some(e)))?;
            if status.exited {
                let exit_code = match (status.exitcode, status.signal) {
                    (Some(code), _) => i32::try_from(code).unwrap_or(i32::MAX),
                    (None, Some(sig)) => 128 + i32::try_from(sig).unwrap_or(0),
                    (None, None) => -1,
                };
                return Ok(ExecOutput {
                    exit_code,
                    stdout: status.out_data.unwrap_or_default(),
                    stderr: status.err_data.unwrap_or_default(),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(DriverError::timeout(format!(
                    "after {}s waiting for {path:?} (guest pid {}) in VM {}",
                    timeout.as_secs(),
                    started.pid,
                    vm.id
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Where the disks of VM `id` live in the shared pool at `pool`.
pub(crate) fn pool_disk_dir(pool: &Path, id: VmId) -> PathBuf {
    pool.join("vms").join(id.to_string())
}

/// Makes the VM's disk directory in a shared pool, `<pool>/vms/<vm-id>/`,
/// and links the VM's `disks` to it (see `layout.rs`). Idempotent; a link
/// to another directory is replaced (a create that started over with
/// another pool).
pub(crate) fn link_pool_disks(paths: &VmPaths, pool: &Path, id: VmId) -> Result<(), DriverError> {
    let target = pool_disk_dir(pool, id);
    std::fs::create_dir_all(&target).map_err(|e| {
        DriverError::io(
            "cannot create the VM's directory in the storage pool",
            &target,
            e,
        )
    })?;
    match std::fs::read_link(&paths.disks_link) {
        Ok(current) if current == target => return Ok(()),
        Ok(_) => remove_file_if_exists(&paths.disks_link)?,
        Err(_) => {}
    }
    std::os::unix::fs::symlink(&target, &paths.disks_link).map_err(|e| {
        DriverError::io(
            "cannot link the VM to its storage pool",
            &paths.disks_link,
            e,
        )
    })
}

/// The checks `vm_create` makes of a spec before touching anything: it can
/// run, and the files it names exist here.
pub(crate) fn check_spec_files(spec: &VmSpec) -> Result<(), DriverError> {
    check_files_of(spec, spec.restore_from.as_deref())
}

/// [`check_spec_files`] for a VM that comes to this host with its disk (a
/// cold import, an adoption from a pool): the backup its disk was once
/// restored from plays no part (it may be long deleted).
pub(crate) fn check_moved_spec_files(spec: &VmSpec) -> Result<(), DriverError> {
    check_files_of(spec, None)
}

fn check_files_of(spec: &VmSpec, restore_from: Option<&Path>) -> Result<(), DriverError> {
    spec.validate()?;
    let invalid = |reason: String| DriverError::InvalidSpec {
        id: spec.id,
        reason,
    };
    let mut files = vec![("image", spec.image.as_path())];
    if let Some(backup) = restore_from {
        files.push(("backup to restore", backup));
    }
    if let BootSpec::Kernel { kernel, initrd, .. } = &spec.boot {
        files.push(("kernel", kernel.as_path()));
        if let Some(initrd) = initrd {
            files.push(("initrd", initrd));
        }
    }
    for (what, path) in files {
        if !path.is_absolute() {
            return Err(invalid(format!(
                "{what} path {} is not absolute",
                path.display()
            )));
        }
        if !path.is_file() {
            return Err(invalid(format!("{what} {} does not exist", path.display())));
        }
    }
    if let Some(pool) = &spec.pool {
        if !pool.is_absolute() || !pool.is_dir() {
            return Err(invalid(format!(
                "storage pool directory {} does not exist on this host",
                pool.display()
            )));
        }
    }
    Ok(())
}

/// The first steps of making a VM's files, shared by `vm_create`, the cold
/// import and the adoption from a pool: the run directory and, for a VM in
/// a shared pool, the link to its disk directory there. `fresh_chain`
/// drops a chain record left by an earlier attempt (not for an adoption,
/// whose chain is the one in the pool). The disk is the caller's; then
/// [`finish_vm_files`]. Caller holds `vm.op`.
pub(crate) fn begin_vm_files(
    paths: &VmPaths,
    spec: &VmSpec,
    fresh_chain: bool,
) -> Result<(), DriverError> {
    std::fs::create_dir_all(&paths.run)
        .map_err(|e| DriverError::io("cannot create the VM run directory", &paths.run, e))?;
    if let Some(pool) = &spec.pool {
        link_pool_disks(paths, pool, spec.id)?;
    }
    if fresh_chain {
        remove_file_if_exists(&paths.snapshots_json())?;
    }
    Ok(())
}

/// The last step of making a VM's files: recorded stopped, then `vm.json`,
/// whose presence means "created". Caller holds `vm.op`.
fn finish_vm_files(vm: &VmEntry, spec: &VmSpec) -> Result<(), DriverError> {
    {
        let _g = lock(&vm.record_lock);
        write_json(
            &vm.paths.state_json,
            "VM state record",
            &StateRecord::new(VmRuntimeState::Stopped, None),
        )?;
    }
    write_json(&vm.paths.vm_json, "VM spec", spec)
}

/// Takes the data directory's driver lock, or says who holds it.
fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File, DriverError> {
    let path = data_dir.join("driver.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| DriverError::io("cannot open the driver lock", &path, e))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(DriverError::Config(format!(
            "another QEMU driver already uses the data directory {} (it holds {})",
            data_dir.display(),
            path.display()
        ))),
        Err(e) => Err(DriverError::io(
            "cannot lock the driver lock",
            &path,
            e.into(),
        )),
    }
}

/// The classification of the module docs, from the run directory's files.
fn classify_exit(paths: &VmPaths) -> VmRuntimeState {
    if paths.stop_marker.exists() {
        return VmRuntimeState::Stopped;
    }
    let shutdown: Option<ShutdownRecord> = read_json(&paths.shutdown_json, "shutdown record")
        .ok()
        .flatten();
    if shutdown.as_ref().is_some_and(|s| s.reason == "guest-panic") {
        return VmRuntimeState::Crashed {
            reason: "the guest kernel panicked".into(),
        };
    }
    if !paths.pidfile.exists() {
        return VmRuntimeState::Stopped;
    }
    let tail = log_tail(&paths.qemu_log);
    let last = tail.lines().last().unwrap_or("").trim();
    VmRuntimeState::Crashed {
        reason: if last.is_empty() {
            CRASH_REASON.to_string()
        } else {
            format!("{CRASH_REASON}; last QEMU message: {last}")
        },
    }
}

/// The last lines of QEMU's log (its stderr), for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

fn touch(path: &Path) -> Result<(), DriverError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| DriverError::io("cannot create the VM run directory", dir, e))?;
    }
    std::fs::write(path, b"").map_err(|e| DriverError::io("cannot write the stop marker", path, e))
}

/// Whether a guest address is worth reporting: not loopback, not IPv6 link-local.
fn is_reportable_address(addr: &str) -> bool {
    match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(a)) => !a.is_loopback(),
        Ok(std::net::IpAddr::V6(a)) => !a.is_loopback() && (a.segments()[0] & 0xffc0) != 0xfe80,
        Err(_) => false,
    }
}

/// Watches one QEMU: holds its QMP connection (reconnecting if it breaks while
/// QEMU lives), records STOP/RESUME/SHUTDOWN, and records QEMU's end.
async fn monitor(
    shared: Arc<Shared>,
    vm: Arc<VmEntry>,
    pid: u32,
    qmp_slot: watch::Sender<Option<Arc<QmpService>>>,
) {
    let mut tick = tokio::time::interval(MONITOR_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'watch: while process::is_qemu_of(pid, vm.id) {
        let (service, mut events) = match qmp::connect(&vm.paths.qmp_sock, QMP_TIMEOUT).await {
            Ok(connection) => connection,
            Err(e) => {
                tracing::debug!(vm = %vm.id, error = %e, "cannot connect QMP; retrying");
                tick.tick().await;
                continue;
            }
        };
        // Learn whether the vCPUs run (the VM may have been paused while no
        // driver watched) before anyone else may send commands, so no later
        // `cont` can race this answer.
        let service = Arc::new(service);
        let status = {
            let query = qmp::execute(&service, qapi::qmp::query_status {}, QMP_TIMEOUT, "status");
            tokio::pin!(query);
            loop {
                tokio::select! {
                    status = &mut query => break status.ok(),
                    event = events.next() => match event {
                        Some(Ok(event)) => on_qmp_event(&shared, &vm, pid, event),
                        _ => break None,
                    },
                }
            }
        };
        let Some(status) = status else {
            tracing::debug!(vm = %vm.id, "QMP closed during query-status; reconnecting");
            drop(events);
            tick.tick().await;
            continue;
        };
        let state = if status.running {
            VmRuntimeState::Running
        } else {
            VmRuntimeState::Paused
        };
        if let Err(e) = shared.record_active_if(&vm, pid, state, true) {
            tracing::warn!(vm = %vm.id, error = %e, "cannot record the VM state");
        }
        qmp_slot.send_replace(Some(service));
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(Ok(event)) => on_qmp_event(&shared, &vm, pid, event),
                    Some(Err(e)) => {
                        tracing::warn!(vm = %vm.id, error = %e, "QMP stream failed; reconnecting");
                        break;
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    if !process::is_qemu_of(pid, vm.id) {
                        break 'watch;
                    }
                }
            }
        }
        qmp_slot.send_replace(None);
        drop(events);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    qmp_slot.send_replace(None);
    if let Err(e) = shared.record_exit(&vm, Some(pid)) {
        tracing::error!(vm = %vm.id, error = %e, "cannot record the end of QEMU");
    }
    let mut runtime = lock(&vm.runtime);
    if runtime.as_ref().is_some_and(|rt| rt.pid == pid) {
        if let Some(mut rt) = runtime.take() {
            // Detach this very task instead of aborting it; the console
            // reader is aborted as the runtime drops.
            drop(rt.monitor.take());
        }
    }
}

fn on_qmp_event(shared: &Shared, vm: &VmEntry, pid: u32, event: qapi::qmp::Event) {
    use qapi::qmp::Event;
    // Waiters look at QEMU itself, not at the records written below: wake
    // them first.
    vm.qmp_events.send_modify(|n| *n = n.wrapping_add(1));
    let result = match event {
        Event::SHUTDOWN { data, .. } => {
            let reason = serde_json::to_value(data.reason)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            tracing::info!(vm = %vm.id, guest = data.guest, %reason, "QEMU reports shutdown");
            write_json(
                &vm.paths.shutdown_json,
                "shutdown record",
                &ShutdownRecord {
                    guest: data.guest,
                    reason,
                },
            )
        }
        Event::STOP { .. } => shared.record_active_if(vm, pid, VmRuntimeState::Paused, true),
        Event::RESUME { .. } => shared.record_active_if(vm, pid, VmRuntimeState::Running, true),
        Event::RESET { data, .. } => {
            tracing::info!(vm = %vm.id, guest = data.guest, "VM reset");
            Ok(())
        }
        other => {
            tracing::trace!(vm = %vm.id, event = ?other, "QMP event");
            Ok(())
        }
    };
    if let Err(e) = result {
        tracing::warn!(vm = %vm.id, error = %e, "cannot record a QMP event");
    }
}

impl VmEntry {
    /// Waits until QEMU sends a QMP event `events` has not seen, or `poll`
    /// passes, whichever comes first. Callers mark the counter seen
    /// (`borrow_and_update`) *before* they query QEMU, so an event that
    /// arrives between the query and this wait is not missed.
    async fn next_look(events: &mut watch::Receiver<u64>, poll: Duration) {
        if tokio::time::timeout(poll, events.changed())
            .await
            .is_ok_and(|r| r.is_err())
        {
            // The entry went away (cannot happen while it is borrowed, but
            // a closed channel would otherwise make this a busy loop).
            tokio::time::sleep(poll).await;
        }
    }
}

#[async_trait]
impl Driver for QemuDriver {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn host_facts(&self) -> Result<HostFacts, DriverError> {
        let (disk_bytes, disk_free_bytes) = host::disk_bytes(&self.shared.vms_dir)?;
        Ok(HostFacts {
            cpus: host::cpus(),
            memory_bytes: host::memory_bytes()?,
            disk_bytes,
            disk_free_bytes,
            qemu_version: Some(self.shared.qemu_version.clone()),
            accel: Some(self.shared.launch.accel.to_string()),
            migration_tls: self.shared.config.migration_tls_dir.is_some(),
        })
    }

    async fn vm_create(&self, spec: &VmSpec) -> Result<(), DriverError> {
        check_spec_files(spec)?;
        let shared = &self.shared;
        let vm = shared.entry(spec.id);
        let _op = vm.op.lock().await;
        let paths = &vm.paths;
        if let Some(existing) = read_json::<VmSpec>(&paths.vm_json, "VM spec")? {
            if existing == *spec {
                return Ok(());
            }
            return Err(DriverError::Conflict {
                id: spec.id,
                difference: format!(
                    "it already exists with a different spec ({})",
                    spec_difference(&existing, spec)
                ),
            });
        }
        // No vm.json: new, or a create that failed half-way. Start over.
        begin_vm_files(paths, spec, true)?;
        if let Some(backup) = &spec.restore_from {
            backup::build_restored_disk(shared, spec, backup, paths, &paths.overlay()).await?;
        } else {
            let image_size =
                image::virtual_size(&shared.config.qemu_img, &spec.image, spec.image_format)
                    .await?;
            let size = (spec.disk_bytes > image_size).then_some(spec.disk_bytes);
            let tmp = paths.disks().join("disk.qcow2.tmp");
            remove_file_if_exists(&tmp)?;
            let started = std::time::Instant::now();
            image::create_overlay(
                &shared.config.qemu_img,
                &spec.image,
                spec.image_format,
                &tmp,
                size,
            )
            .await?;
            std::fs::rename(&tmp, paths.overlay()).map_err(|e| {
                DriverError::io(
                    "cannot move the new disk overlay into place",
                    paths.overlay(),
                    e,
                )
            })?;
            tracing::info!(
                vm = %spec.id,
                ms = started.elapsed().as_millis() as u64,
                image = %spec.image.display(),
                "disk overlay created"
            );
        }
        finish_vm_files(&vm, spec)
    }

    async fn vm_start(&self, id: VmId) -> Result<(), DriverError> {
        let shared = &self.shared;
        let vm = shared.existing(id)?;
        let _op = vm.op.lock().await;
        // The disk is being copied by a cold migration: a guest writing
        // under the copy would be lost (or corrupt it).
        cold::refuse_if_exported(&vm, "start")?;
        if migrate::is_incoming(&vm) {
            // QEMU would take a `cont` now as "run once the state is in".
            return Err(DriverError::InvalidState {
                id,
                operation: "start",
                state: "waiting for an incoming migration (finish or abort it)".into(),
            });
        }
        if let Some(pid) = shared.ensure_adopted(&vm)? {
            if shared.read_record(&vm)?.state == VmRuntimeState::Paused {
                // E.g. an agent that died between launching QEMU and `cont`.
                tracing::info!(vm = %id, pid, "resuming a paused VM");
                let qmp = shared.qmp(&vm).await?;
                qmp::execute(&qmp, qapi::qmp::cont {}, QMP_TIMEOUT, "start").await?;
                shared.record_active(&vm, pid, VmRuntimeState::Running)?;
            } else {
                tracing::debug!(vm = %id, pid, "already running");
            }
            return Ok(());
        }
        let strays = process::find_qemu_of(id);
        if !strays.is_empty() {
            return Err(DriverError::InvalidState {
                id,
                operation: "start",
                state: format!("already running in QEMU pid {strays:?} that has no pidfile (stop or destroy it first)"),
            });
        }
        shared.reconcile_dead(&vm)?;
        shared.start(&vm).await
    }

    async fn vm_stop(&self, id: VmId, graceful_timeout: Duration) -> Result<StopHow, DriverError> {
        let shared = &self.shared;
        let vm = shared.existing(id)?;
        let _op = vm.op.lock().await;
        let Some(pid) = shared.ensure_adopted(&vm)? else {
            for stray in process::find_qemu_of(id) {
                tracing::warn!(vm = %id, pid = stray, "killing a QEMU of this VM that has no pidfile");
                shared.kill(&vm, stray, false).await?;
            }
            shared.reconcile_dead(&vm)?;
            return Ok(StopHow::AlreadyStopped);
        };
        touch(&vm.paths.stop_marker)?;
        let mut how = StopHow::Forced;
        if !graceful_timeout.is_zero() {
            match shared.qmp(&vm).await {
                Ok(qmp) => {
                    match qmp::execute(&qmp, qapi::qmp::system_powerdown {}, QMP_TIMEOUT, "stop")
                        .await
                    {
                        Ok(_) => {
                            if process::wait_gone(pid, id, graceful_timeout).await {
                                how = StopHow::Graceful;
                            }
                        }
                        Err(e) => tracing::warn!(vm = %id, error = %e, "power button not pressed"),
                    }
                }
                Err(e) => tracing::warn!(vm = %id, error = %e, "no QMP to press the power button"),
            }
        }
        if how == StopHow::Forced {
            tracing::info!(vm = %id, pid, "guest did not power off in time; ending QEMU");
            shared.kill(&vm, pid, true).await?;
        }
        drop(lock(&vm.runtime).take());
        shared.record_exit(&vm, Some(pid))?;
        Ok(how)
    }

    async fn vm_reboot(&self, id: VmId) -> Result<(), DriverError> {
        let shared = &self.shared;
        let vm = shared.existing(id)?;
        let _op = vm.op.lock().await;
        if shared.ensure_adopted(&vm)?.is_none() {
            shared.reconcile_dead(&vm)?;
            return Err(DriverError::InvalidState {
                id,
                operation: "reboot",
                state: shared.read_record(&vm)?.state.to_string(),
            });
        }
        let qmp = shared.qmp(&vm).await?;
        qmp::execute(&qmp, qapi::qmp::system_reset {}, QMP_TIMEOUT, "reboot").await?;
        Ok(())
    }

    async fn vm_destroy(&self, id: VmId) -> Result<(), DriverError> {
        let shared = &self.shared;
        let vm = shared.entry(id);
        let _op = vm.op.lock().await;
        shared.destroy(&vm).await
    }

    async fn vm_status(&self, id: VmId) -> Result<Option<VmStatus>, DriverError> {
        let shared = &self.shared;
        match shared.existing(id) {
            Ok(vm) => shared.status(&vm).map(Some),
            Err(DriverError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn vm_list(&self) -> Result<Vec<VmStatus>, DriverError> {
        let shared = &self.shared;
        let entries = std::fs::read_dir(&shared.vms_dir)
            .map_err(|e| DriverError::io("cannot list the VM directory", &shared.vms_dir, e))?;
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry
                .map_err(|e| DriverError::io("cannot list the VM directory", &shared.vms_dir, e))?;
            match entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<VmId>().ok())
            {
                Some(id) => ids.push(id),
                None => {
                    tracing::warn!(path = %entry.path().display(), "not a VM directory; ignored")
                }
            }
        }
        ids.sort();
        let mut list = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(status) = self.vm_status(id).await? {
                list.push(status);
            }
        }
        Ok(list)
    }

    async fn console_read(
        &self,
        id: VmId,
        offset: u64,
        max: usize,
    ) -> Result<ConsoleChunk, DriverError> {
        let vm = self.shared.existing(id)?;
        let _g = lock(&vm.console_lock);
        vm.console.read(offset, max)
    }

    async fn guest_info(&self, id: VmId) -> Result<GuestInfo, DriverError> {
        let shared = &self.shared;
        let vm = shared.existing(id)?;
        if shared.live_pid(&vm).is_none() {
            return Ok(GuestInfo {
                last_contact: *lock(&vm.last_contact),
                ..GuestInfo::default()
            });
        }
        Ok(shared.guest_info(&vm).await)
    }

    async fn guest_exec(
        &self,
        id: VmId,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, DriverError> {
        let shared = &self.shared;
        let vm = shared.existing(id)?;
        if shared.live_pid(&vm).is_none() {
            return Err(DriverError::InvalidState {
                id,
                operation: "run a command in",
                state: shared.read_record(&vm)?.state.to_string(),
            });
        }
        shared.guest_exec(&vm, argv, timeout).await
    }

    async fn vm_backup(
        &self,
        id: VmId,
        req: &BackupRequest,
        progress: &ProgressFn,
    ) -> Result<BackupOutcome, DriverError> {
        backup::backup(&self.shared, id, req, progress).await
    }

    async fn backup_verify(&self, file: &Path) -> Result<BackupCheck, DriverError> {
        backup::verify(&self.shared.config.qemu_img, file).await
    }

    async fn vm_restore(
        &self,
        id: VmId,
        file: &Path,
        volumes: &[crate::VolumeRestore],
    ) -> Result<(), DriverError> {
        backup::restore(&self.shared, id, file, volumes).await
    }

    async fn volume_restore(
        &self,
        volume_id: uuid::Uuid,
        size_bytes: u64,
        file: &Path,
    ) -> Result<crate::VolumeInfo, DriverError> {
        backup::volume_restore(&self.shared, volume_id, size_bytes, file).await
    }

    async fn backup_delete(
        &self,
        file: &Path,
        child: Option<&PruneChild>,
    ) -> Result<Option<Pruned>, DriverError> {
        prune::delete(&self.shared.config.qemu_img, file, child).await
    }

    async fn vm_snapshot_create(
        &self,
        id: VmId,
        req: &SnapshotRequest,
    ) -> Result<SnapshotInfo, DriverError> {
        snapshot::create(&self.shared, id, req).await
    }

    async fn vm_snapshot_list(&self, id: VmId) -> Result<Vec<SnapshotInfo>, DriverError> {
        snapshot::list(&self.shared, id).await
    }

    async fn vm_snapshot_revert(
        &self,
        id: VmId,
        snapshot_id: uuid::Uuid,
    ) -> Result<Vec<uuid::Uuid>, DriverError> {
        snapshot::revert(&self.shared, id, snapshot_id).await
    }

    async fn vm_snapshot_delete(
        &self,
        id: VmId,
        snapshot_id: uuid::Uuid,
    ) -> Result<(), DriverError> {
        snapshot::delete(&self.shared, id, snapshot_id).await
    }

    async fn volume_create(&self, spec: &VolumeSpec) -> Result<VolumeInfo, DriverError> {
        volume::create(&self.shared, spec).await
    }

    async fn vm_volume_attach(&self, vm: VmId, volume_id: uuid::Uuid) -> Result<(), DriverError> {
        volume::attach(&self.shared, vm, volume_id).await
    }

    async fn vm_volume_detach(&self, vm: VmId, volume_id: uuid::Uuid) -> Result<(), DriverError> {
        volume::detach(&self.shared, vm, volume_id).await
    }

    async fn volume_resize(
        &self,
        volume_id: uuid::Uuid,
        size_bytes: u64,
    ) -> Result<VolumeInfo, DriverError> {
        volume::resize(&self.shared, volume_id, size_bytes).await
    }

    async fn volume_delete(&self, volume_id: uuid::Uuid) -> Result<(), DriverError> {
        volume::delete(&self.shared, volume_id).await
    }

    async fn volume_info(&self, volume_id: uuid::Uuid) -> Result<Option<VolumeInfo>, DriverError> {
        volume::info(&self.shared, volume_id).await
    }

    async fn volume_use_pool(
        &self,
        volume_id: uuid::Uuid,
        pool: &std::path::Path,
    ) -> Result<(), DriverError> {
        volume::use_pool(&self.shared, volume_id, pool).await
    }

    async fn vm_migrate_describe(&self, id: VmId) -> Result<crate::OutgoingVm, DriverError> {
        migrate::describe(&self.shared, id).await
    }

    async fn vm_migrate_prepare(
        &self,
        spec: &VmSpec,
        req: &crate::IncomingRequest,
    ) -> Result<crate::IncomingReady, DriverError> {
        migrate::prepare(&self.shared, spec, req).await
    }

    async fn vm_migrate_send(
        &self,
        id: VmId,
        req: &crate::MigrateRequest,
        progress: &crate::MigrateProgressFn,
    ) -> Result<crate::MigrateOutcome, DriverError> {
        migrate::send(&self.shared, id, req, progress).await
    }

    async fn vm_migrate_finish(&self, id: VmId, timeout: Duration) -> Result<(), DriverError> {
        migrate::finish(&self.shared, id, timeout).await
    }

    async fn vm_migrate_cancel(&self, id: VmId) -> Result<(), DriverError> {
        migrate::cancel(&self.shared, id).await
    }

    async fn vm_migrate_abort_incoming(&self, id: VmId) -> Result<(), DriverError> {
        migrate::abort_incoming(&self.shared, id).await
    }

    async fn vm_disk_export(
        &self,
        id: VmId,
        req: &crate::ExportRequest,
    ) -> Result<crate::DiskExport, DriverError> {
        cold::export(&self.shared, id, req).await
    }

    async fn vm_disk_export_stop(&self, id: VmId) -> Result<(), DriverError> {
        cold::export_stop(&self.shared, id).await
    }

    async fn vm_disk_import(
        &self,
        spec: &VmSpec,
        from: &crate::DiskExport,
        progress: &ProgressFn,
    ) -> Result<crate::ImportOutcome, DriverError> {
        cold::import(&self.shared, spec, from, progress).await
    }

    async fn vm_adopt_from_pool(&self, spec: &VmSpec) -> Result<(), DriverError> {
        cold::adopt(&self.shared, spec).await
    }

    async fn vm_release(&self, id: VmId) -> Result<(), DriverError> {
        cold::release(&self.shared, id).await
    }

    fn subscribe(&self) -> broadcast::Receiver<VmEvent> {
        self.shared.events.subscribe()
    }
}

/// Names the fields two specs of the same VM differ in.
fn spec_difference(a: &VmSpec, b: &VmSpec) -> String {
    let mut fields = Vec::new();
    if a.name != b.name {
        fields.push("name");
    }
    if a.vcpus != b.vcpus {
        fields.push("vcpus");
    }
    if a.memory_bytes != b.memory_bytes {
        fields.push("memory");
    }
    if a.disk_bytes != b.disk_bytes {
        fields.push("disk size");
    }
    if a.image != b.image || a.image_format != b.image_format {
        fields.push("image");
    }
    if a.restore_from != b.restore_from {
        fields.push("backup to restore");
    }
    if a.boot != b.boot {
        fields.push("boot");
    }
    if a.nic != b.nic {
        fields.push("nic");
    }
    format!("differs in {}", fields.join(", "))
}

/// Waits until the guest agent behind a QEMU guest-agent socket answers
/// `guest-sync` and `guest-ping`, for at most `timeout`; returns how long it
/// took. For benchmarks and diagnostics of QEMU processes the driver did not
/// start itself (the driver's own calls go through [`QemuDriver`]).
pub async fn guest_agent_wait(
    socket: &std::path::Path,
    timeout: std::time::Duration,
) -> Result<std::time::Duration, DriverError> {
    let started = std::time::Instant::now();
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(DriverError::Timeout {
                what: format!("the guest agent at {}", socket.display()),
            });
        }
        match qga::QgaConn::connect(socket, left).await {
            Ok(conn) => {
                if conn.run(qapi::qga::guest_ping {}, left).await.is_ok() {
                    return Ok(started.elapsed());
                }
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::tests::spec;

    #[test]
    fn exit_classification_follows_the_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = VmPaths::new(dir.path(), VmId::new());
        std::fs::create_dir_all(&paths.run).expect("mkdir");
        // Pidfile left behind, no marker: killed.
        std::fs::write(&paths.pidfile, "1").expect("write");
        assert_eq!(
            classify_exit(&paths),
            VmRuntimeState::Crashed {
                reason: CRASH_REASON.into()
            }
        );
        std::fs::write(&paths.qemu_log, "x\nqemu: fatal: boom\n").expect("write");
        match classify_exit(&paths) {
            VmRuntimeState::Crashed { reason } => assert!(
                reason.ends_with("last QEMU message: qemu: fatal: boom"),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
        // QEMU removed its pidfile: clean exit.
        std::fs::remove_file(&paths.pidfile).expect("rm");
        assert_eq!(classify_exit(&paths), VmRuntimeState::Stopped);
        // The guest panicked.
        write_json(
            &paths.shutdown_json,
            "shutdown",
            &ShutdownRecord {
                guest: true,
                reason: "guest-panic".into(),
            },
        )
        .expect("write");
        assert!(matches!(
            classify_exit(&paths),
            VmRuntimeState::Crashed { .. }
        ));
        // The driver asked for it.
        std::fs::write(&paths.pidfile, "1").expect("write");
        touch(&paths.stop_marker).expect("touch");
        assert_eq!(classify_exit(&paths), VmRuntimeState::Stopped);
    }

    #[test]
    fn only_useful_addresses_are_reported() {
        assert!(is_reportable_address("10.0.2.15"));
        assert!(is_reportable_address("2001:db8::1"));
        assert!(!is_reportable_address("127.0.0.1"));
        assert!(!is_reportable_address("::1"));
        assert!(!is_reportable_address("fe80::5054:ff:fe12:3456"));
        assert!(!is_reportable_address("garbage"));
    }

    #[test]
    fn spec_difference_names_fields() {
        let a = spec();
        let mut b = a.clone();
        b.vcpus = 4;
        b.name = "other".into();
        assert_eq!(spec_difference(&a, &b), "differs in name, vcpus");
    }
}
