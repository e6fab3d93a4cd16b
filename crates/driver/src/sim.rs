//! A simulated driver: VMs are rows in a map, with the same state machine and
//! events as the QEMU driver, for tests of everything above the driver (agent,
//! scheduler, controller) without booting anything.
//!
//! Cost model: one `SimDriver` is a mutex, a hash map and a small broadcast
//! channel; a VM is one map entry. No task or thread exists per VM or per
//! driver, so one test process can hold 10,000 simulated hosts.
//!
//! The capacity a simulated host reports ([`SimConfig`]) is whatever it is
//! configured with (by default a realistic server: 64 vCPUs, 256 GiB of
//! memory, 4 TiB of disk); each lifecycle operation (create, start, stop,
//! reboot, destroy) takes the configured latency, zero by default.
//!
//! Differences from QEMU, on purpose: `guest_exec` is
//! [`DriverError::Unsupported`]; the console holds one synthetic line per
//! boot; the guest agent "answers" whenever the VM runs, with an address in
//! 10.0.0.0/16 derived from the VM id; [`SimDriver::crash`] injects a crash.
//!
//! Backups are modelled without files: each VM keeps the names of its
//! change-tracking bitmaps, and the driver the SHA-256 it handed out per
//! backup path. The full/incremental decision and its fallback reasons are
//! the QEMU driver's: a missing bitmap (a restored disk) or an inconsistent
//! one (after [`SimDriver::crash`], as after QEMU is killed) means a full
//! backup. A full backup "holds" the whole disk (`data_bytes` is the spec's
//! disk size), an incremental one nothing (0); the checksum is that of a
//! description of the backup, so it is stable and distinct per backup.
//! Every attached volume is backed up with the disk under the same rules,
//! with its own bitmaps (a volume the parent restore point does not cover
//! is full, and says so), into [`crate::volume_backup_file`].
//!
//! Snapshots are records in the VM's row with the QEMU driver's rules: names
//! unique per VM, at most [`crate::MAX_SNAPSHOTS`], revert only while
//! stopped (dropping the newer ones and the change-tracking bitmaps, as the
//! fresh disk layer QEMU gets has none), delete running or stopped. A
//! snapshot of a running VM is `quiesced` (the simulated guest agent always
//! answers); `bytes` is always 0 (no data is written).
//!
//! Volumes are modelled without files either: a map of volume id to its spec,
//! size and VM, with the QEMU driver's rules (one VM per volume, at most
//! [`crate::MAX_VOLUMES_PER_VM`] per VM, grow only, no delete while
//! attached, destroying a VM frees its volumes). Detaching always succeeds at
//! once (a simulated guest always releases the disk); `allocated_bytes` is 0
//! (nothing is ever written). A volume in a shared pool is recorded with its
//! pool (`volume_use_pool`, refused for a volume this host keeps locally or
//! in another pool); as for VMs, the simulated pool holds no files, so a
//! host the volume was not made on makes it afresh, and snapshots of a VM
//! with a pool volume attached are refused as the QEMU driver refuses them.
//!
//! Live migration (see [`crate::migrate`]) moves a VM's row from one
//! simulated driver to another in the same process: `vm_migrate_prepare`
//! adds a paused incoming VM and registers its `sim:` migration URI in a
//! process-wide table; `vm_migrate_send` finds the destination through that
//! URI, waits the configured latency (the window in which
//! `vm_migrate_cancel` or `vm_migrate_abort_incoming` make it fail), then
//! makes the destination's VM run (with the source's change-tracking bitmaps
//! and boot count) and removes the source's. Attached volumes move with it
//! (`vm_migrate_describe` lists them; the destination records them attached
//! when prepared, without their bitmaps). Refused: snapshots (the QEMU
//! driver copies their layers; the simulation does not model them), a
//! destination that does not wait for this request or was prepared for
//! other volumes.
//!
//! Cold migration works the same way: `vm_disk_export` marks the stopped VM
//! exported (its start is refused) and registers the export's name in a
//! process-wide table; `vm_disk_import` on another simulated driver finds
//! the source there, waits the configured latency (the window in which a
//! stopped export makes it fail, leaving nothing) and creates the VM
//! stopped, with the source's bitmaps when a layer travels. The simulated
//! pool holds no files: `vm_adopt_from_pool` creates the VM afresh (without
//! the source's snapshots and bitmaps) and `vm_release` forgets it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use stratus_common::VmId;
use tokio::sync::broadcast;

use sha2::{Digest, Sha256};

use crate::{
    bitmap_name, BackupCheck, BackupMode, BackupOutcome, BackupProgress, BackupRequest,
    ConsoleChunk, Driver, DriverError, ExecOutput, GuestInfo, HostFacts, ProgressFn, SnapshotInfo,
    SnapshotRequest, StopHow, VmEvent, VmRuntimeState, VmSpec, VmStatus, MAX_SNAPSHOTS,
};
use crate::{volume::check_resize, VolumeInfo, VolumeSpec, MAX_VOLUMES_PER_VM};
use crate::{DiskExport, DiskExportKind, ExportRequest, ImportOutcome};
use crate::{
    IncomingDisk, IncomingReady, IncomingRequest, IncomingVolume, MigrateOutcome, MigratePhase,
    MigrateProgress, MigrateProgressFn, MigrateRequest, NbdTarget, OutgoingVm, VolumeTarget,
};

/// Events a simulated driver buffers per subscriber. Small on purpose: 10,000
/// drivers in one process each allocate this many slots up front, and a
/// subscriber that falls behind re-reads `vm_list` anyway.
const SIM_EVENT_CAPACITY: usize = 16;

/// The capacity a simulated host reports, and how slow its operations are.
/// The default is a realistic two-socket server: 64 vCPUs, 256 GiB, 4 TiB,
/// instant operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    /// How long each lifecycle operation (create, start, stop, reboot,
    /// destroy) takes; zero: instant.
    pub latency: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            cpus: 64,
            memory_bytes: 256 << 30,
            disk_bytes: 4 << 40,
            latency: Duration::ZERO,
        }
    }
}

struct SimVm {
    spec: VmSpec,
    state: VmRuntimeState,
    since: DateTime<Utc>,
    /// Completed boots, for the synthetic console.
    boots: u32,
    last_contact: Option<DateTime<Utc>>,
    /// Change-tracking bitmaps of the disk: name -> inconsistent.
    bitmaps: HashMap<String, bool>,
    /// Snapshots of the disk, oldest first.
    snapshots: Vec<SnapshotInfo>,
    /// Set while the VM waits for an incoming migration: what prepare said.
    incoming: Option<IncomingReady>,
    /// Set while the VM's disk is exported for a cold migration.
    exported: Option<DiskExport>,
    /// How the cold import that made this VM went (its request id), so a
    /// retry returns it again.
    imported: Option<(uuid::Uuid, ImportOutcome)>,
}

/// Every simulated destination waiting for a migration, by migration URI.
type Endpoints = Mutex<HashMap<String, SimEndpoint>>;

/// A simulated destination, as the source finds it.
struct SimEndpoint {
    vms: Weak<Mutex<HashMap<VmId, SimVm>>>,
    events: broadcast::Sender<VmEvent>,
}

fn endpoints() -> &'static Endpoints {
    static ENDPOINTS: OnceLock<Endpoints> = OnceLock::new();
    ENDPOINTS.get_or_init(|| Mutex::new(HashMap::new()))
}

fn lock_endpoints() -> std::sync::MutexGuard<'static, HashMap<String, SimEndpoint>> {
    endpoints().lock().unwrap_or_else(|e| e.into_inner())
}

/// A simulated host's VM table, as another simulated host reaches it.
type SharedVms = Weak<Mutex<HashMap<VmId, SimVm>>>;

/// Every simulated disk export of a cold migration, by export name.
type ColdExports = Mutex<HashMap<String, SharedVms>>;

fn lock_cold_exports() -> std::sync::MutexGuard<'static, HashMap<String, SharedVms>> {
    static EXPORTS: OnceLock<ColdExports> = OnceLock::new();
    EXPORTS
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// The simulated driver. See the module docs.
pub struct SimDriver {
    config: SimConfig,
    /// Shared (weakly) with the endpoint table, so a source can reach it.
    vms: Arc<Mutex<HashMap<VmId, SimVm>>>,
    /// Names this driver's migration URIs.
    token: uuid::Uuid,
    /// Cancel flags of the migrations this driver sends.
    sending: Mutex<HashMap<VmId, Arc<AtomicBool>>>,
    events: broadcast::Sender<VmEvent>,
    /// SHA-256 of every backup this host took, by path.
    backups: Mutex<HashMap<PathBuf, String>>,
    /// Volumes, by id.
    volumes: Mutex<HashMap<uuid::Uuid, SimVolume>>,
    /// The shared pool of each volume in one (`volume_use_pool`).
    volume_pools: Mutex<HashMap<uuid::Uuid, PathBuf>>,
}

struct SimVolume {
    spec: VolumeSpec,
    size_bytes: u64,
    attached_to: Option<VmId>,
    /// Its change-tracking bitmaps (name → inconsistent), as a VM's.
    bitmaps: HashMap<String, bool>,
}

impl SimVolume {
    fn info(&self) -> VolumeInfo {
        VolumeInfo {
            volume_id: self.spec.volume_id,
            size_bytes: self.size_bytes,
            allocated_bytes: 0,
            attached_to: self.attached_to,
        }
    }
}

impl SimDriver {
    pub fn new(config: SimConfig) -> Self {
        let (events, _) = broadcast::channel(SIM_EVENT_CAPACITY);
        SimDriver {
            config,
            vms: Arc::new(Mutex::new(HashMap::new())),
            token: uuid::Uuid::new_v4(),
            sending: Mutex::new(HashMap::new()),
            events,
            backups: Mutex::new(HashMap::new()),
            volumes: Mutex::new(HashMap::new()),
            volume_pools: Mutex::new(HashMap::new()),
        }
    }

    fn lock_volume_pools(&self) -> std::sync::MutexGuard<'_, HashMap<uuid::Uuid, PathBuf>> {
        self.volume_pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_volumes(&self) -> std::sync::MutexGuard<'_, HashMap<uuid::Uuid, SimVolume>> {
        self.volumes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes a running (or paused) VM crash, as if its hypervisor died. Its
    /// change-tracking bitmaps become inconsistent, as QEMU's do when it is
    /// killed.
    pub fn crash(&self, id: VmId) -> Result<(), DriverError> {
        self.with_vm(id, |vm| {
            if !vm.state.is_active() {
                return Err(DriverError::InvalidState {
                    id,
                    operation: "crash",
                    state: vm.state.to_string(),
                });
            }
            for inconsistent in vm.bitmaps.values_mut() {
                *inconsistent = true;
            }
            for volume in self.lock_volumes().values_mut() {
                if volume.attached_to == Some(id) {
                    for inconsistent in volume.bitmaps.values_mut() {
                        *inconsistent = true;
                    }
                }
            }
            Ok(Some(VmRuntimeState::Crashed {
                reason: "simulated crash (injected)".into(),
            }))
        })
    }

    /// The capacity and latency this simulated host was configured with.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// How many VMs this simulated host holds.
    pub fn vm_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, SimVm>> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.vms.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn delay(&self) {
        if !self.config.latency.is_zero() {
            tokio::time::sleep(self.config.latency).await;
        }
    }

    /// Runs `f` on the VM; when it returns a new state, records it and sends
    /// the event (only if the state changed).
    fn with_vm<T>(
        &self,
        id: VmId,
        f: impl FnOnce(&mut SimVm) -> Result<T, DriverError>,
    ) -> Result<(), DriverError>
    where
        T: Into<Option<VmRuntimeState>>,
    {
        let mut vms = self.lock();
        let vm = vms.get_mut(&id).ok_or(DriverError::NotFound(id))?;
        if let Some(new) = f(vm)?.into() {
            if new != vm.state {
                if new == VmRuntimeState::Running && !vm.state.is_active() {
                    vm.boots += 1;
                }
                vm.state = new.clone();
                vm.since = Utc::now();
                // No receiver is fine: nobody listens yet.
                let _ = self.events.send(VmEvent { id, state: new });
            }
        }
        Ok(())
    }

    fn status_of(id: VmId, vm: &SimVm) -> VmStatus {
        VmStatus {
            id,
            state: vm.state.clone(),
            pid: None,
            since: vm.since,
        }
    }

    /// The fake address of a VM's NIC: 10.0.x.y from the id's random bits.
    fn guest_ip(id: VmId) -> String {
        let b = id.as_uuid().into_bytes();
        format!("10.0.{}.{}", b[14], b[15].clamp(2, 254))
    }
}

#[async_trait]
impl Driver for SimDriver {
    fn name(&self) -> &'static str {
        "sim"
    }

    async fn host_facts(&self) -> Result<HostFacts, DriverError> {
        let used: u64 = self.lock().values().map(|vm| vm.spec.disk_bytes).sum();
        Ok(HostFacts {
            cpus: self.config.cpus,
            memory_bytes: self.config.memory_bytes,
            disk_bytes: self.config.disk_bytes,
            disk_free_bytes: self.config.disk_bytes.saturating_sub(used),
            qemu_version: None,
            accel: Some("sim".into()),
            migration_tls: false,
        })
    }

    async fn vm_create(&self, spec: &VmSpec) -> Result<(), DriverError> {
        spec.validate()?;
        self.delay().await;
        let mut vms = self.lock();
        if let Some(existing) = vms.get(&spec.id) {
            if existing.spec != *spec {
                return Err(DriverError::Conflict {
                    id: spec.id,
                    difference: "it already exists with a different spec (the simulated VM \
                                 was created with another spec)"
                        .into(),
                });
            }
            return Ok(());
        }
        vms.insert(
            spec.id,
            SimVm {
                spec: spec.clone(),
                state: VmRuntimeState::Stopped,
                since: Utc::now(),
                boots: 0,
                last_contact: None,
                bitmaps: HashMap::new(),
                snapshots: Vec::new(),
                incoming: None,
                exported: None,
                imported: None,
            },
        );
        Ok(())
    }

    async fn vm_start(&self, id: VmId) -> Result<(), DriverError> {
        self.delay().await;
        self.with_vm(id, |vm| {
            if vm.incoming.is_some() {
                return Err(DriverError::InvalidState {
                    id,
                    operation: "start",
                    state: "waiting for an incoming migration".into(),
                });
            }
            if vm.exported.is_some() {
                return Err(DriverError::InvalidState {
                    id,
                    operation: "start",
                    state: "exported for a cold migration (stop the export first)".into(),
                });
            }
            Ok(VmRuntimeState::Running)
        })
    }

    async fn vm_stop(&self, id: VmId, _graceful_timeout: Duration) -> Result<StopHow, DriverError> {
        self.delay().await;
        let mut how = StopHow::AlreadyStopped;
        self.with_vm(id, |vm| {
            Ok(if vm.state.is_active() {
                how = StopHow::Graceful;
                Some(VmRuntimeState::Stopped)
            } else {
                None
            })
        })?;
        Ok(how)
    }

    async fn vm_reboot(&self, id: VmId) -> Result<(), DriverError> {
        self.delay().await;
        self.with_vm(id, |vm| {
            if vm.state != VmRuntimeState::Running {
                return Err(DriverError::InvalidState {
                    id,
                    operation: "reboot",
                    state: vm.state.to_string(),
                });
            }
            vm.boots += 1;
            Ok(None)
        })
    }

    async fn vm_destroy(&self, id: VmId) -> Result<(), DriverError> {
        self.delay().await;
        let removed = self.lock().remove(&id);
        if let Some(export) = removed.as_ref().and_then(|vm| vm.exported.as_ref()) {
            lock_cold_exports().remove(&export.export);
        }
        // Volumes outlive their VM.
        for volume in self.lock_volumes().values_mut() {
            if volume.attached_to == Some(id) {
                volume.attached_to = None;
            }
        }
        if let Some(vm) = removed {
            if vm.state.is_active() {
                let _ = self.events.send(VmEvent {
                    id,
                    state: VmRuntimeState::Stopped,
                });
            }
        }
        Ok(())
    }

    async fn vm_status(&self, id: VmId) -> Result<Option<VmStatus>, DriverError> {
        Ok(self.lock().get(&id).map(|vm| Self::status_of(id, vm)))
    }

    async fn vm_list(&self) -> Result<Vec<VmStatus>, DriverError> {
        let mut list: Vec<VmStatus> = self
            .lock()
            .iter()
            .map(|(id, vm)| Self::status_of(*id, vm))
            .collect();
        list.sort_by_key(|s| s.id);
        Ok(list)
    }

    async fn console_read(
        &self,
        id: VmId,
        offset: u64,
        max: usize,
    ) -> Result<ConsoleChunk, DriverError> {
        let text = {
            let vms = self.lock();
            let vm = vms.get(&id).ok_or(DriverError::NotFound(id))?;
            (1..=vm.boots)
                .map(|n| format!("stratus-sim: booted {} (boot {n})\n", vm.spec.name))
                .collect::<String>()
        };
        let bytes = text.into_bytes();
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let end = start.saturating_add(max).min(bytes.len());
        Ok(ConsoleChunk {
            data: bytes[start..end].to_vec(),
            next_offset: end as u64,
            truncated_before: false,
        })
    }

    async fn guest_info(&self, id: VmId) -> Result<GuestInfo, DriverError> {
        let mut vms = self.lock();
        let vm = vms.get_mut(&id).ok_or(DriverError::NotFound(id))?;
        if vm.state != VmRuntimeState::Running {
            return Ok(GuestInfo {
                last_contact: vm.last_contact,
                ..GuestInfo::default()
            });
        }
        let now = Utc::now();
        vm.last_contact = Some(now);
        Ok(GuestInfo {
            connected: true,
            agent_version: Some("sim".into()),
            os_name: Some("Stratus simulated guest".into()),
            os_version: Some("1".into()),
            kernel: Some("sim".into()),
            ip_addresses: vec![Self::guest_ip(id)],
            last_contact: Some(now),
        })
    }

    async fn guest_exec(
        &self,
        id: VmId,
        _argv: &[String],
        _timeout: Duration,
    ) -> Result<ExecOutput, DriverError> {
        if !self.lock().contains_key(&id) {
            return Err(DriverError::NotFound(id));
        }
        Err(DriverError::Unsupported(
            "the simulated driver cannot run commands in a guest".into(),
        ))
    }

    async fn vm_backup(
        &self,
        id: VmId,
        req: &BackupRequest,
        progress: &ProgressFn,
    ) -> Result<BackupOutcome, DriverError> {
        self.delay().await;
        let outcome = {
            let mut vms = self.lock();
            let vm = vms.get_mut(&id).ok_or(DriverError::NotFound(id))?;
            if !vm.state.is_active() {
                return Err(DriverError::InvalidState {
                    id,
                    operation: "back up",
                    state: vm.state.to_string(),
                });
            }
            let (mode, fallback_reason) = sim_backup_mode(req.parent.as_ref(), &vm.bitmaps);
            // As in QEMU: only the new bitmap remains (the parent's is
            // replaced, strays are removed).
            vm.bitmaps.clear();
            vm.bitmaps.insert(bitmap_name(req.backup_id), false);
            // Every attached volume, each incremental on its own.
            let mut attached: Vec<(&uuid::Uuid, &mut SimVolume)> = Vec::new();
            let mut all = self.lock_volumes();
            attached.extend(all.iter_mut().filter(|(_, v)| v.attached_to == Some(id)));
            attached.sort_by_key(|(v, _)| **v);
            let mut volumes = Vec::new();
            for (volume_id, volume) in attached {
                let in_parent = req.volume_parents.iter().any(|p| p.volume_id == *volume_id);
                let (mode, fallback_reason) = match &req.parent {
                    Some(_) if !in_parent => (
                        BackupMode::Full,
                        Some(format!(
                            "volume {volume_id} has no file in the parent restore point (attached since)"
                        )),
                    ),
                    parent => sim_backup_mode(parent.as_ref(), &volume.bitmaps),
                };
                volume.bitmaps.clear();
                volume.bitmaps.insert(bitmap_name(req.backup_id), false);
                let data_bytes = match mode {
                    BackupMode::Full => volume.size_bytes,
                    BackupMode::Incremental => 0,
                };
                let file = crate::volume_backup_file(&req.target, *volume_id);
                let description = format!(
                    "stratus-sim backup {} of volume {volume_id} ({mode:?}, {data_bytes} bytes) at {}",
                    req.backup_id,
                    file.display()
                );
                volumes.push(crate::VolumeBackupOutcome {
                    volume_id: *volume_id,
                    file,
                    mode,
                    fallback_reason,
                    data_bytes,
                    file_bytes: data_bytes,
                    disk_bytes: volume.size_bytes,
                    sha256: format!("{:x}", Sha256::digest(description.as_bytes())),
                });
            }
            let data_bytes = match mode {
                BackupMode::Full => vm.spec.disk_bytes,
                BackupMode::Incremental => 0,
            };
            let description = format!(
                "stratus-sim backup {} of VM {id} ({mode:?}, {data_bytes} bytes) at {}",
                req.backup_id,
                req.target.display()
            );
            BackupOutcome {
                mode,
                fallback_reason,
                data_bytes,
                file_bytes: data_bytes,
                disk_bytes: vm.spec.disk_bytes,
                sha256: format!("{:x}", Sha256::digest(description.as_bytes())),
                volumes,
            }
        };
        progress(BackupProgress {
            done_bytes: outcome.data_bytes,
            total_bytes: outcome.data_bytes,
        });
        let mut backups = self.backups.lock().unwrap_or_else(|e| e.into_inner());
        backups.insert(req.target.clone(), outcome.sha256.clone());
        for v in &outcome.volumes {
            backups.insert(v.file.clone(), v.sha256.clone());
        }
        drop(backups);
        Ok(outcome)
    }

    async fn backup_verify(&self, file: &Path) -> Result<BackupCheck, DriverError> {
        let known = self
            .backups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(file)
            .cloned();
        match known {
            Some(sha256) => Ok(BackupCheck {
                sha256,
                problems: Vec::new(),
            }),
            None => Err(DriverError::Io {
                context: "not a backup this simulated host took".into(),
                path: file.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "unknown backup"),
            }),
        }
    }

    async fn vm_restore(
        &self,
        id: VmId,
        _file: &Path,
        restores: &[crate::VolumeRestore],
    ) -> Result<(), DriverError> {
        self.delay().await;
        let mut vms = self.lock();
        let vm = vms.get_mut(&id).ok_or(DriverError::NotFound(id))?;
        if vm.state.is_active() {
            return Err(DriverError::InvalidState {
                id,
                operation: "restore",
                state: vm.state.to_string(),
            });
        }
        let mut volumes = self.lock_volumes();
        if let Some(r) = restores
            .iter()
            .find(|r| volumes.get(&r.volume_id).and_then(|v| v.attached_to) != Some(id))
        {
            return Err(DriverError::Conflict {
                id,
                difference: format!(
                    "volume {} is in the backup but no longer attached to the VM; attach it \
                     again, or restore the backup into a new VM",
                    r.volume_id
                ),
            });
        }
        // New disks: no change tracking until the next (full) backup.
        vm.bitmaps.clear();
        for r in restores {
            if let Some(v) = volumes.get_mut(&r.volume_id) {
                v.bitmaps.clear();
            }
        }
        Ok(())
    }

    async fn volume_restore(
        &self,
        volume_id: uuid::Uuid,
        size_bytes: u64,
        _file: &Path,
    ) -> Result<VolumeInfo, DriverError> {
        self.delay().await;
        let spec = VolumeSpec {
            volume_id,
            size_bytes,
            image: None,
            image_format: None,
        };
        spec.validate()?;
        let mut volumes = self.lock_volumes();
        if let Some(vm) = volumes.get(&volume_id).and_then(|v| v.attached_to) {
            return Err(DriverError::VolumeConflict {
                id: volume_id,
                reason: format!("it is attached to VM {vm}; restore it in place with that VM"),
            });
        }
        let volume = SimVolume {
            spec,
            size_bytes,
            attached_to: None,
            bitmaps: HashMap::new(),
        };
        let info = volume.info();
        volumes.insert(volume_id, volume);
        Ok(info)
    }

    /// The simulated merge: the child gets a new checksum (its content is
    /// unchanged, its file is not), the deleted backup is forgotten.
    async fn backup_delete(
        &self,
        file: &Path,
        child: Option<&crate::PruneChild>,
    ) -> Result<Option<crate::Pruned>, DriverError> {
        let mut backups = self.backups.lock().unwrap_or_else(|e| e.into_inner());
        backups.remove(file);
        Ok(child.map(|c| {
            let sha256 = format!(
                "{:064x}",
                c.file.display().to_string().len() as u64 + backups.len() as u64
            );
            backups.insert(c.file.clone(), sha256.clone());
            crate::Pruned {
                data_bytes: 0,
                file_bytes: 0,
                sha256,
            }
        }))
    }

    async fn vm_snapshot_create(
        &self,
        id: VmId,
        req: &SnapshotRequest,
    ) -> Result<SnapshotInfo, DriverError> {
        self.delay().await;
        let mut vms = self.lock();
        let vm = vms.get_mut(&id).ok_or(DriverError::NotFound(id))?;
        if let Some(existing) = vm
            .snapshots
            .iter()
            .find(|s| s.snapshot_id == req.snapshot_id)
        {
            return Ok(existing.clone());
        }
        req.validate(id)?;
        if let Some(taken) = vm.snapshots.iter().find(|s| s.name == req.name) {
            return Err(crate::snapshot::name_taken(
                id,
                &req.name,
                taken.snapshot_id,
            ));
        }
        if vm.snapshots.len() >= MAX_SNAPSHOTS {
            return Err(crate::snapshot::limit_error(id));
        }
        // Like the QEMU driver's, the snapshot covers every volume attached now.
        let mut volumes: Vec<uuid::Uuid> = self
            .lock_volumes()
            .values()
            .filter(|v| v.attached_to == Some(id))
            .map(|v| v.spec.volume_id)
            .collect();
        volumes.sort();
        if let Some(v) = volumes
            .iter()
            .find(|v| self.lock_volume_pools().contains_key(v))
        {
            return Err(DriverError::InvalidState {
                id,
                operation: "snapshot",
                state: format!(
                    "attached to volume {v}, which is in a shared storage pool (snapshots do not \
                     cover pool volumes yet: detach it first)"
                ),
            });
        }
        let info = SnapshotInfo {
            snapshot_id: req.snapshot_id,
            name: req.name.clone(),
            created_at: Utc::now(),
            quiesced: vm.state == VmRuntimeState::Running,
            bytes: 0,
            volumes,
        };
        vm.snapshots.push(info.clone());
        Ok(info)
    }

    async fn vm_snapshot_list(&self, id: VmId) -> Result<Vec<SnapshotInfo>, DriverError> {
        let vms = self.lock();
        let vm = vms.get(&id).ok_or(DriverError::NotFound(id))?;
        Ok(vm.snapshots.clone())
    }

    async fn vm_snapshot_revert(
        &self,
        id: VmId,
        snapshot_id: uuid::Uuid,
    ) -> Result<Vec<uuid::Uuid>, DriverError> {
        self.delay().await;
        let mut vms = self.lock();
        let vm = vms.get_mut(&id).ok_or(DriverError::NotFound(id))?;
        if vm.state.is_active() {
            return Err(DriverError::InvalidState {
                id,
                operation: "revert to a snapshot",
                state: vm.state.to_string(),
            });
        }
        let at = vm
            .snapshots
            .iter()
            .position(|s| s.snapshot_id == snapshot_id)
            .ok_or(DriverError::SnapshotNotFound { id, snapshot_id })?;
        let dropped = vm
            .snapshots
            .split_off(at + 1)
            .into_iter()
            .map(|s| s.snapshot_id)
            .collect();
        // The disk gets a fresh layer without change tracking.
        vm.bitmaps.clear();
        Ok(dropped)
    }

    async fn vm_snapshot_delete(
        &self,
        id: VmId,
        snapshot_id: uuid::Uuid,
    ) -> Result<(), DriverError> {
        self.delay().await;
        let mut vms = self.lock();
        let vm = vms.get_mut(&id).ok_or(DriverError::NotFound(id))?;
        let at = vm
            .snapshots
            .iter()
            .position(|s| s.snapshot_id == snapshot_id)
            .ok_or(DriverError::SnapshotNotFound { id, snapshot_id })?;
        vm.snapshots.remove(at);
        Ok(())
    }

    async fn volume_create(&self, spec: &VolumeSpec) -> Result<VolumeInfo, DriverError> {
        spec.validate()?;
        self.delay().await;
        let mut volumes = self.lock_volumes();
        if let Some(existing) = volumes.get(&spec.volume_id) {
            if existing.spec != *spec {
                return Err(DriverError::VolumeConflict {
                    id: spec.volume_id,
                    reason: "already exists with a different spec".into(),
                });
            }
            return Ok(existing.info());
        }
        let volume = SimVolume {
            spec: spec.clone(),
            size_bytes: spec.size_bytes,
            attached_to: None,
            bitmaps: HashMap::new(),
        };
        let info = volume.info();
        volumes.insert(spec.volume_id, volume);
        Ok(info)
    }

    async fn vm_volume_attach(&self, vm: VmId, volume_id: uuid::Uuid) -> Result<(), DriverError> {
        self.delay().await;
        // The VM table stays locked so a concurrent destroy cannot slip in.
        let vms = self.lock();
        if !vms.contains_key(&vm) {
            return Err(DriverError::NotFound(vm));
        }
        let mut volumes = self.lock_volumes();
        let held = volumes
            .values()
            .filter(|v| v.attached_to == Some(vm))
            .count();
        let volume = volumes
            .get_mut(&volume_id)
            .ok_or(DriverError::VolumeNotFound(volume_id))?;
        match volume.attached_to {
            Some(other) if other == vm => Ok(()),
            Some(other) => Err(DriverError::VolumeConflict {
                id: volume_id,
                reason: format!(
                    "cannot attach it to VM {vm}: it is attached to VM {other} (detach it there first)"
                ),
            }),
            None if held >= MAX_VOLUMES_PER_VM => Err(DriverError::InvalidState {
                id: vm,
                operation: "attach another volume to",
                state: format!(
                    "holding {MAX_VOLUMES_PER_VM} volumes, the most a VM can (one per hot-plug port)"
                ),
            }),
            None => {
                volume.attached_to = Some(vm);
                Ok(())
            }
        }
    }

    async fn vm_volume_detach(&self, vm: VmId, volume_id: uuid::Uuid) -> Result<(), DriverError> {
        self.delay().await;
        // The VM table stays locked so no snapshot is taken meanwhile.
        let vms = self.lock();
        if let Some(owner) = vms.get(&vm) {
            let covering: Vec<String> = owner
                .snapshots
                .iter()
                .filter(|s| s.volumes.contains(&volume_id))
                .map(|s| format!("{:?}", s.name))
                .collect();
            if !covering.is_empty() {
                return Err(DriverError::VolumeConflict {
                    id: volume_id,
                    reason: format!(
                        "cannot detach it from VM {vm}: the VM's snapshot(s) {} cover it; delete \
                         those snapshots first (reverting to one of them needs the volume's layers)",
                        covering.join(", ")
                    ),
                });
            }
        }
        if let Some(volume) = self.lock_volumes().get_mut(&volume_id) {
            if volume.attached_to == Some(vm) {
                volume.attached_to = None;
            }
        }
        Ok(())
    }

    async fn volume_resize(
        &self,
        volume_id: uuid::Uuid,
        size_bytes: u64,
    ) -> Result<VolumeInfo, DriverError> {
        self.delay().await;
        let mut volumes = self.lock_volumes();
        let volume = volumes
            .get_mut(&volume_id)
            .ok_or(DriverError::VolumeNotFound(volume_id))?;
        check_resize(volume_id, volume.size_bytes, size_bytes)?;
        volume.size_bytes = size_bytes;
        Ok(volume.info())
    }

    async fn volume_delete(&self, volume_id: uuid::Uuid) -> Result<(), DriverError> {
        self.delay().await;
        let mut volumes = self.lock_volumes();
        if let Some(vm) = volumes.get(&volume_id).and_then(|v| v.attached_to) {
            return Err(DriverError::VolumeConflict {
                id: volume_id,
                reason: format!(
                    "cannot delete it while it is attached to VM {vm} (detach it first)"
                ),
            });
        }
        volumes.remove(&volume_id);
        self.lock_volume_pools().remove(&volume_id);
        Ok(())
    }

    async fn volume_info(&self, volume_id: uuid::Uuid) -> Result<Option<VolumeInfo>, DriverError> {
        Ok(self.lock_volumes().get(&volume_id).map(SimVolume::info))
    }

    async fn volume_use_pool(
        &self,
        volume_id: uuid::Uuid,
        pool: &std::path::Path,
    ) -> Result<(), DriverError> {
        if !pool.is_absolute() {
            return Err(DriverError::InvalidVolumeSpec {
                id: volume_id,
                reason: format!("pool path {} is not absolute", pool.display()),
            });
        }
        let volumes = self.lock_volumes();
        let mut pools = self.lock_volume_pools();
        match pools.get(&volume_id) {
            Some(p) if p == pool => Ok(()),
            Some(p) => Err(DriverError::VolumeConflict {
                id: volume_id,
                reason: format!(
                    "its files are in pool {} on this host, not in {}",
                    p.display(),
                    pool.display()
                ),
            }),
            None if volumes.contains_key(&volume_id) => Err(DriverError::VolumeConflict {
                id: volume_id,
                reason: "this host keeps it in its own data directory".into(),
            }),
            None => {
                pools.insert(volume_id, pool.to_path_buf());
                Ok(())
            }
        }
    }

    async fn vm_migrate_describe(&self, id: VmId) -> Result<OutgoingVm, DriverError> {
        if !self.lock().contains_key(&id) {
            return Err(DriverError::NotFound(id));
        }
        Ok(self.outgoing(id))
    }

    async fn vm_migrate_prepare(
        &self,
        spec: &VmSpec,
        req: &IncomingRequest,
    ) -> Result<IncomingReady, DriverError> {
        self.migrate_prepare(spec, req).await
    }

    async fn vm_migrate_send(
        &self,
        id: VmId,
        req: &MigrateRequest,
        progress: &MigrateProgressFn,
    ) -> Result<MigrateOutcome, DriverError> {
        let cancel = Arc::new(AtomicBool::new(false));
        self.lock_sending().insert(id, cancel.clone());
        let result = self.migrate_send(id, req, progress, &cancel).await;
        self.lock_sending().remove(&id);
        result
    }

    async fn vm_migrate_finish(&self, id: VmId, timeout: Duration) -> Result<(), DriverError> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let vms = self.lock();
                let vm = vms.get(&id).ok_or(DriverError::NotFound(id))?;
                if vm.incoming.is_none() {
                    return if vm.state.is_active() {
                        Ok(())
                    } else {
                        Err(DriverError::InvalidState {
                            id,
                            operation: "finish the migration of",
                            state: vm.state.to_string(),
                        })
                    };
                }
            }
            if Instant::now() >= deadline {
                return Err(DriverError::timeout(format!(
                    "waiting {}s for the incoming migration of VM {id} to complete",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn vm_migrate_cancel(&self, id: VmId) -> Result<(), DriverError> {
        let flag = self.lock_sending().get(&id).cloned();
        if let Some(flag) = flag {
            flag.store(true, Ordering::SeqCst);
            // Returns once the send has undone its work.
            let deadline = Instant::now() + Duration::from_secs(30);
            while self.lock_sending().contains_key(&id) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        Ok(())
    }

    async fn vm_migrate_abort_incoming(&self, id: VmId) -> Result<(), DriverError> {
        let removed = {
            let mut vms = self.lock();
            match vms.get(&id) {
                None => return Ok(()),
                Some(vm) if vm.incoming.is_none() => {
                    return Err(DriverError::InvalidState {
                        id,
                        operation: "abort the incoming migration of",
                        state: format!(
                        "{} (the migration completed: the VM lives here now; destroy it instead)",
                        vm.state
                    ),
                    })
                }
                Some(_) => vms.remove(&id),
            }
        };
        if let Some(ready) = removed.and_then(|vm| vm.incoming) {
            lock_endpoints().remove(&ready.migration_uri);
            // The volumes the attempt brought (the source still has them).
            self.lock_volumes().retain(|_, v| v.attached_to != Some(id));
            let _ = self.events.send(VmEvent {
                id,
                state: VmRuntimeState::Stopped,
            });
        }
        Ok(())
    }

    async fn vm_disk_export(
        &self,
        id: VmId,
        req: &ExportRequest,
    ) -> Result<DiskExport, DriverError> {
        self.delay().await;
        let attached = self
            .lock_volumes()
            .values()
            .filter(|v| v.attached_to == Some(id))
            .count();
        let mut vms = self.lock();
        let vm = vms.get_mut(&id).ok_or(DriverError::NotFound(id))?;
        if let Some(export) = &vm.exported {
            if export.request_id == req.request_id {
                return Ok(export.clone());
            }
            return Err(DriverError::Conflict {
                id,
                difference: format!(
                    "its disk is already exported for request {}; stop that export first",
                    export.request_id
                ),
            });
        }
        if vm.state.is_active() || vm.incoming.is_some() {
            return Err(DriverError::InvalidState {
                id,
                operation: "export the disk of",
                state: format!("{} (stop it first)", vm.state),
            });
        }
        if !vm.snapshots.is_empty() {
            return Err(DriverError::MigrationRefused {
                id,
                reason: format!(
                    "it has {} snapshot(s) whose layers would not move with it; delete (merge) \
                     the snapshots first",
                    vm.snapshots.len()
                ),
            });
        }
        if attached > 0 {
            return Err(DriverError::MigrationRefused {
                id,
                reason: format!(
                    "it has {attached} attached volume(s), which stay on this host; detach them \
                     first"
                ),
            });
        }
        let export = DiskExport {
            request_id: req.request_id,
            vm_id: id,
            host: "sim".into(),
            port: 0,
            export: format!("sim:{}/{id}", self.token),
            kind: if req.same_base {
                DiskExportKind::Layer
            } else {
                DiskExportKind::Flat
            },
            virtual_size: vm.spec.disk_bytes,
            base_image: Some(vm.spec.image.clone()),
            allocated_bytes: 0,
            tls: false,
        };
        vm.exported = Some(export.clone());
        lock_cold_exports().insert(export.export.clone(), Arc::downgrade(&self.vms));
        Ok(export)
    }

    async fn vm_disk_export_stop(&self, id: VmId) -> Result<(), DriverError> {
        let export = self.lock().get_mut(&id).and_then(|vm| vm.exported.take());
        if let Some(export) = export {
            lock_cold_exports().remove(&export.export);
        }
        Ok(())
    }

    async fn vm_disk_import(
        &self,
        spec: &VmSpec,
        from: &DiskExport,
        progress: &ProgressFn,
    ) -> Result<ImportOutcome, DriverError> {
        spec.validate()?;
        let started = Instant::now();
        if let Some(vm) = self.lock().get(&spec.id) {
            return match &vm.imported {
                Some((request, outcome)) if *request == from.request_id && vm.spec == *spec => {
                    Ok(outcome.clone())
                }
                _ => Err(DriverError::Conflict {
                    id: spec.id,
                    difference: "it already exists on this host".into(),
                }),
            };
        }
        progress(BackupProgress {
            done_bytes: 0,
            total_bytes: from.allocated_bytes,
        });
        // The copy: the window in which the source's export can go away.
        self.delay().await;
        let source = lock_cold_exports()
            .get(&from.export)
            .and_then(Weak::upgrade);
        let bitmaps = source.and_then(|vms| {
            let vms = vms.lock().unwrap_or_else(|e| e.into_inner());
            let vm = vms.get(&spec.id)?;
            let exported = vm.exported.as_ref()?;
            (exported.request_id == from.request_id).then(|| vm.bitmaps.clone())
        });
        let Some(bitmaps) = bitmaps else {
            return Err(DriverError::Migration {
                id: spec.id,
                reason: format!(
                    "the source no longer serves the disk ({} is gone); nothing was kept here",
                    from.export
                ),
                source: None,
            });
        };
        // Only a layer carries the qcow2 bitmaps (see crate::migrate).
        let bitmaps = match from.kind {
            DiskExportKind::Layer => bitmaps,
            DiskExportKind::Flat => HashMap::new(),
        };
        let mut names: Vec<String> = bitmaps.keys().cloned().collect();
        names.sort();
        let outcome = ImportOutcome {
            bytes_copied: from.allocated_bytes,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            bitmaps: names,
        };
        let mut vms = self.lock();
        if vms.contains_key(&spec.id) {
            return Err(DriverError::Conflict {
                id: spec.id,
                difference: "it was created on this host during the import".into(),
            });
        }
        vms.insert(
            spec.id,
            SimVm {
                spec: spec.clone(),
                state: VmRuntimeState::Stopped,
                since: Utc::now(),
                boots: 0,
                last_contact: None,
                bitmaps,
                snapshots: Vec::new(),
                incoming: None,
                exported: None,
                imported: Some((from.request_id, outcome.clone())),
            },
        );
        progress(BackupProgress {
            done_bytes: from.allocated_bytes,
            total_bytes: from.allocated_bytes,
        });
        Ok(outcome)
    }

    async fn vm_adopt_from_pool(&self, spec: &VmSpec) -> Result<(), DriverError> {
        if spec.pool.is_none() {
            return Err(DriverError::InvalidSpec {
                id: spec.id,
                reason: "adopting from a pool needs the VM's pool (spec.pool)".into(),
            });
        }
        self.vm_create(spec).await
    }

    async fn vm_release(&self, id: VmId) -> Result<(), DriverError> {
        let attached = self
            .lock_volumes()
            .values()
            .any(|v| v.attached_to == Some(id));
        let mut vms = self.lock();
        let Some(vm) = vms.get(&id) else {
            return Ok(());
        };
        let state = if vm.spec.pool.is_none() {
            Some("keeping its disk on this host, not in a shared pool (destroy it instead)".into())
        } else if vm.state.is_active() || vm.incoming.is_some() {
            Some(format!("{} (stop it first)", vm.state))
        } else if vm.exported.is_some() {
            Some("exported for a cold migration (stop the export first)".into())
        } else if attached {
            Some("attached to volumes of this host (detach them first)".into())
        } else {
            None
        };
        if let Some(state) = state {
            return Err(DriverError::InvalidState {
                id,
                operation: "release",
                state,
            });
        }
        vms.remove(&id);
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<VmEvent> {
        self.events.subscribe()
    }
}

impl SimDriver {
    fn lock_sending(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, Arc<AtomicBool>>> {
        self.sending.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn migrate_prepare(
        &self,
        spec: &VmSpec,
        req: &IncomingRequest,
    ) -> Result<IncomingReady, DriverError> {
        spec.validate()?;
        self.delay().await;
        let mut vms = self.lock();
        if let Some(existing) = vms.get(&spec.id) {
            return match &existing.incoming {
                Some(ready) if ready.request_id == req.request_id => Ok(ready.clone()),
                Some(ready) => Err(DriverError::Conflict {
                    id: spec.id,
                    difference: format!(
                        "it is already waiting for migration request {}",
                        ready.request_id
                    ),
                }),
                None => Err(DriverError::Conflict {
                    id: spec.id,
                    difference: "it already exists on this host".into(),
                }),
            };
        }
        let migration_uri = format!("sim:{}/{}", self.token, spec.id);
        let ready = IncomingReady {
            request_id: req.request_id,
            vm_id: spec.id,
            migration_uri: migration_uri.clone(),
            nbd: match req.disk {
                IncomingDisk::Pool => None,
                _ => Some(NbdTarget {
                    host: "sim".into(),
                    port: 0,
                    export: format!("stratus-{}", spec.id),
                }),
            },
            qemu_version: "sim".into(),
            machine: "sim".into(),
            accel: "sim".into(),
            disk_virtual_size: match req.disk {
                IncomingDisk::Standalone { virtual_size } => virtual_size,
                _ => spec.disk_bytes,
            },
            disk_backing: match req.disk {
                IncomingDisk::Overlay => Some(spec.image.clone()),
                _ => None,
            },
            shared_disk: match (&req.disk, &spec.pool) {
                (IncomingDisk::Pool, Some(pool)) => Some(
                    pool.join("vms")
                        .join(spec.id.to_string())
                        .join("disk.qcow2"),
                ),
                _ => None,
            },
            tls: false,
            volumes: req
                .volumes
                .iter()
                .map(|v| VolumeTarget {
                    volume_id: v.volume_id,
                    nbd: v.pool.is_none().then(|| NbdTarget {
                        host: "sim".into(),
                        port: 0,
                        export: format!("stratus-vol-{}", v.volume_id),
                    }),
                })
                .collect(),
            layers: Vec::new(),
        };
        vms.insert(
            spec.id,
            SimVm {
                spec: spec.clone(),
                state: VmRuntimeState::Paused,
                since: Utc::now(),
                boots: 0,
                last_contact: None,
                bitmaps: HashMap::new(),
                snapshots: Vec::new(),
                incoming: Some(ready.clone()),
                exported: None,
                imported: None,
            },
        );
        drop(vms);
        // The moving VM's volumes, attached here on arrival's terms (their
        // bitmaps do not travel in the simulation: the next backup of each
        // is a full one).
        {
            let mut volumes = self.lock_volumes();
            for v in &req.volumes {
                volumes.insert(
                    v.volume_id,
                    SimVolume {
                        spec: VolumeSpec {
                            volume_id: v.volume_id,
                            size_bytes: v.size_bytes,
                            image: None,
                            image_format: None,
                        },
                        size_bytes: v.size_bytes,
                        attached_to: Some(spec.id),
                        bitmaps: HashMap::new(),
                    },
                );
            }
        }
        {
            let mut pools = self.lock_volume_pools();
            for v in &req.volumes {
                if let Some(pool) = &v.pool {
                    pools.insert(v.volume_id, pool.clone());
                }
            }
        }
        lock_endpoints().insert(
            migration_uri,
            SimEndpoint {
                vms: Arc::downgrade(&self.vms),
                events: self.events.clone(),
            },
        );
        Ok(ready)
    }

    /// The volumes attached to `id`, as a migration's destination rebuilds
    /// them (ports in attachment-id order: the simulation has no PCI).
    fn outgoing(&self, id: VmId) -> OutgoingVm {
        let pools = self.lock_volume_pools().clone();
        let mut attached: Vec<(uuid::Uuid, u64)> = self
            .lock_volumes()
            .values()
            .filter(|v| v.attached_to == Some(id))
            .map(|v| (v.spec.volume_id, v.size_bytes))
            .collect();
        attached.sort();
        OutgoingVm {
            volumes: attached
                .into_iter()
                .enumerate()
                .map(|(port, (volume_id, size_bytes))| IncomingVolume {
                    volume_id,
                    port,
                    size_bytes,
                    pool: pools.get(&volume_id).cloned(),
                })
                .collect(),
            // A simulated VM with snapshots does not move (see the module
            // docs): its layers are not described.
            chain: None,
        }
    }

    async fn migrate_send(
        &self,
        id: VmId,
        req: &MigrateRequest,
        progress: &MigrateProgressFn,
        cancel: &AtomicBool,
    ) -> Result<MigrateOutcome, DriverError> {
        let started = Instant::now();
        let refused = |reason: String| DriverError::MigrationRefused { id, reason };
        let failed = |reason: String| DriverError::Migration {
            id,
            reason,
            source: None,
        };
        let (bitmaps, boots, disk_bytes) = {
            let vms = self.lock();
            let vm = vms.get(&id).ok_or(DriverError::NotFound(id))?;
            if !vm.state.is_active() || vm.incoming.is_some() {
                return Err(DriverError::InvalidState {
                    id,
                    operation: "live-migrate",
                    state: vm.state.to_string(),
                });
            }
            if !vm.snapshots.is_empty() {
                return Err(refused(format!(
                    "it has {} snapshot(s); delete or merge the snapshots first",
                    vm.snapshots.len()
                )));
            }
            (vm.bitmaps.clone(), vm.boots, vm.spec.disk_bytes)
        };
        let attached: Vec<uuid::Uuid> = self
            .outgoing(id)
            .volumes
            .iter()
            .map(|v| v.volume_id)
            .collect();
        if let Some(problem) = crate::volumes_mismatch(&attached, &req.ready) {
            return Err(refused(problem));
        }
        if req.ready.accel != "sim" {
            return Err(refused(format!(
                "the destination runs {} VMs; a simulated VM moves only to a simulated host",
                req.ready.accel
            )));
        }
        let find_destination = || {
            let endpoints = lock_endpoints();
            let endpoint = endpoints.get(&req.ready.migration_uri);
            endpoint.and_then(|e| Some((e.vms.upgrade()?, e.events.clone())))
        };
        let waiting = |dest: &HashMap<VmId, SimVm>| {
            dest.get(&id)
                .and_then(|vm| vm.incoming.as_ref())
                .is_some_and(|r| r.request_id == req.ready.request_id)
        };
        progress(MigrateProgress {
            phase: Some(MigratePhase::MigratingMemory),
            disk_total_bytes: disk_bytes,
            ..MigrateProgress::default()
        });
        // The window in which a migration can be cancelled or lose its
        // destination.
        self.delay().await;
        if cancel.load(Ordering::SeqCst) {
            return Err(failed("cancelled".into()));
        }
        let Some((dest_vms, dest_events)) = find_destination() else {
            return Err(failed(format!(
                "no destination listens at {}",
                req.ready.migration_uri
            )));
        };
        {
            let mut dest = dest_vms.lock().unwrap_or_else(|e| e.into_inner());
            if !waiting(&dest) {
                return Err(failed(
                    "the destination no longer waits for this migration".into(),
                ));
            }
            if let Some(vm) = dest.get_mut(&id) {
                vm.incoming = None;
                vm.bitmaps = bitmaps;
                vm.boots = boots;
                vm.state = VmRuntimeState::Running;
                vm.since = Utc::now();
            }
        }
        lock_endpoints().remove(&req.ready.migration_uri);
        let _ = dest_events.send(VmEvent {
            id,
            state: VmRuntimeState::Running,
        });
        if self.lock().remove(&id).is_some() {
            let _ = self.events.send(VmEvent {
                id,
                state: VmRuntimeState::Stopped,
            });
        }
        // Its volumes went with it.
        self.lock_volumes().retain(|_, v| v.attached_to != Some(id));
        progress(MigrateProgress {
            phase: Some(MigratePhase::Completing),
            disk_done_bytes: disk_bytes,
            disk_total_bytes: disk_bytes,
            ..MigrateProgress::default()
        });
        let total_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        Ok(MigrateOutcome {
            total_ms,
            downtime_ms: 0,
            setup_ms: 0,
            mirror_ms: 0,
            mirror_drain_ms: 0,
            qemu_ms: total_ms,
            finish_ms: 0,
            memory_bytes: 0,
            disk_bytes: 0,
            postcopy: false,
            passes: 1,
            // Nothing crosses a network between simulated hosts.
            tls: false,
        })
    }
}

/// Full or incremental for one simulated disk, and why an incremental fell
/// back: the QEMU driver's rules over the disk's bitmaps.
fn sim_backup_mode(
    parent: Option<&crate::BackupParent>,
    bitmaps: &HashMap<String, bool>,
) -> (BackupMode, Option<String>) {
    let Some(parent) = parent else {
        return (BackupMode::Full, None);
    };
    match bitmaps.get(&bitmap_name(parent.backup_id)) {
        None => (
            BackupMode::Full,
            Some(format!(
                "the change-tracking bitmap of backup {} is missing (the disk was \
                 restored, replaced or reverted to a snapshot, or QEMU ended \
                 without storing it)",
                parent.backup_id
            )),
        ),
        Some(true) => (
            BackupMode::Full,
            Some(format!(
                "the change-tracking bitmap of backup {} is inconsistent (QEMU did \
                 not close the disk cleanly)",
                parent.backup_id
            )),
        ),
        Some(false) => (BackupMode::Incremental, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::tests::spec;

    fn sim() -> SimDriver {
        SimDriver::new(SimConfig::default())
    }

    #[tokio::test]
    async fn lifecycle_follows_the_state_machine_and_sends_events() {
        let d = sim();
        let mut events = d.subscribe();
        let s = spec();
        d.vm_create(&s).await.expect("create");
        d.vm_create(&s).await.expect("create is idempotent");
        let st = d.vm_status(s.id).await.expect("status").expect("known");
        assert_eq!(st.state, VmRuntimeState::Stopped);

        d.vm_start(s.id).await.expect("start");
        d.vm_start(s.id).await.expect("start is idempotent");
        assert_eq!(
            events.recv().await.expect("event"),
            VmEvent {
                id: s.id,
                state: VmRuntimeState::Running
            }
        );

        d.vm_reboot(s.id).await.expect("reboot");
        let console = d.console_read(s.id, 0, 4096).await.expect("console");
        let text = String::from_utf8(console.data).expect("utf8");
        assert_eq!(text.matches("booted web-1").count(), 2, "{text}");

        assert_eq!(
            d.vm_stop(s.id, Duration::from_secs(1)).await.expect("stop"),
            StopHow::Graceful
        );
        assert_eq!(
            d.vm_stop(s.id, Duration::from_secs(1)).await.expect("stop"),
            StopHow::AlreadyStopped
        );
        assert_eq!(
            events.recv().await.expect("event").state,
            VmRuntimeState::Stopped
        );
        assert!(matches!(
            d.vm_reboot(s.id).await,
            Err(DriverError::InvalidState { .. })
        ));

        d.vm_destroy(s.id).await.expect("destroy");
        d.vm_destroy(s.id).await.expect("destroy is idempotent");
        assert!(d.vm_status(s.id).await.expect("status").is_none());
        assert!(matches!(
            d.vm_start(s.id).await,
            Err(DriverError::NotFound(_))
        ));
        assert!(
            events.try_recv().is_err(),
            "no event for destroying a stopped VM"
        );
    }

    #[tokio::test]
    async fn injected_crash_is_reported_and_start_recovers() {
        let d = sim();
        let s = spec();
        d.vm_create(&s).await.expect("create");
        assert!(d.crash(s.id).is_err(), "a stopped VM cannot crash");
        d.vm_start(s.id).await.expect("start");
        let mut events = d.subscribe();
        d.crash(s.id).expect("crash");
        let ev = events.recv().await.expect("event");
        assert!(matches!(ev.state, VmRuntimeState::Crashed { .. }), "{ev:?}");
        assert!(!d.guest_info(s.id).await.expect("info").connected);
        assert_eq!(
            d.vm_stop(s.id, Duration::ZERO).await.expect("stop"),
            StopHow::AlreadyStopped
        );
        d.vm_start(s.id).await.expect("start after crash");
        assert_eq!(
            events.recv().await.expect("event").state,
            VmRuntimeState::Running
        );
    }

    #[tokio::test]
    async fn guest_agent_answers_while_running_and_exec_is_unsupported() {
        let d = sim();
        let s = spec();
        d.vm_create(&s).await.expect("create");
        assert!(!d.guest_info(s.id).await.expect("info").connected);
        d.vm_start(s.id).await.expect("start");
        let info = d.guest_info(s.id).await.expect("info");
        assert!(info.connected);
        assert!(info.last_contact.is_some());
        assert_eq!(info.ip_addresses.len(), 1);
        assert!(info.ip_addresses[0].starts_with("10.0."), "{info:?}");
        assert!(matches!(
            d.guest_exec(s.id, &["true".into()], Duration::from_secs(1))
                .await,
            Err(DriverError::Unsupported(_))
        ));
    }

    #[tokio::test]
    async fn create_refuses_bad_and_conflicting_specs() {
        let d = sim();
        let mut s = spec();
        s.vcpus = 0;
        assert!(matches!(
            d.vm_create(&s).await,
            Err(DriverError::InvalidSpec { .. })
        ));
        let s = spec();
        d.vm_create(&s).await.expect("create");
        let mut other = s.clone();
        other.memory_bytes *= 2;
        assert!(matches!(
            d.vm_create(&other).await,
            Err(DriverError::Conflict { .. })
        ));
    }

    #[tokio::test]
    async fn console_offsets_resume_where_the_reader_left() {
        let d = sim();
        let s = spec();
        d.vm_create(&s).await.expect("create");
        d.vm_start(s.id).await.expect("start");
        let a = d.console_read(s.id, 0, 5).await.expect("read");
        assert_eq!(a.data, b"strat");
        let b = d
            .console_read(s.id, a.next_offset, 4096)
            .await
            .expect("read");
        assert!(b.data.ends_with(b"(boot 1)\n"));
        let c = d
            .console_read(s.id, b.next_offset, 4096)
            .await
            .expect("read");
        assert!(c.data.is_empty());
        assert_eq!(c.next_offset, b.next_offset);
    }

    #[tokio::test]
    async fn latency_is_applied_to_every_lifecycle_operation() {
        let latency = Duration::from_millis(30);
        let d = SimDriver::new(SimConfig {
            latency,
            ..SimConfig::default()
        });
        let s = spec();
        let timed = |t: std::time::Instant, op: &str| {
            assert!(t.elapsed() >= latency, "{op} took {:?}", t.elapsed());
        };
        let t = std::time::Instant::now();
        d.vm_create(&s).await.expect("create");
        timed(t, "create");
        let t = std::time::Instant::now();
        d.vm_start(s.id).await.expect("start");
        timed(t, "start");
        let t = std::time::Instant::now();
        d.vm_stop(s.id, Duration::ZERO).await.expect("stop");
        timed(t, "stop");
        let t = std::time::Instant::now();
        d.vm_destroy(s.id).await.expect("destroy");
        timed(t, "destroy");
        // Queries are never slowed down.
        let t = std::time::Instant::now();
        d.vm_list().await.expect("list");
        d.host_facts().await.expect("facts");
        assert!(t.elapsed() < latency);
    }

    #[tokio::test]
    async fn facts_are_the_configured_capacity() {
        let d = sim();
        let f = d.host_facts().await.expect("facts");
        assert_eq!(
            (f.cpus, f.memory_bytes, f.disk_bytes),
            (64, 256 << 30, 4 << 40),
            "a realistic server by default"
        );
        let d = SimDriver::new(SimConfig {
            cpus: 8,
            memory_bytes: 32 << 30,
            disk_bytes: 500 << 30,
            latency: Duration::ZERO,
        });
        let s = spec();
        d.vm_create(&s).await.expect("create");
        let f = d.host_facts().await.expect("facts");
        assert_eq!(
            (f.cpus, f.memory_bytes, f.disk_bytes),
            (8, 32 << 30, 500 << 30)
        );
        assert_eq!(f.disk_free_bytes, (500 << 30) - s.disk_bytes);
        assert_eq!(f.accel.as_deref(), Some("sim"));
    }

    fn backup_req(dir: &str, parent: Option<&BackupRequest>) -> BackupRequest {
        BackupRequest {
            backup_id: uuid::Uuid::new_v4(),
            volume_parents: Vec::new(),
            target: PathBuf::from(format!("/backups/{dir}/{}.qcow2", uuid::Uuid::new_v4())),
            parent: parent.map(|p| crate::BackupParent {
                backup_id: p.backup_id,
                file: p.target.clone(),
            }),
        }
    }

    fn incoming(disk: IncomingDisk) -> IncomingRequest {
        IncomingRequest {
            request_id: uuid::Uuid::new_v4(),
            disk,
            volumes: vec![],
            chain: None,
            postcopy: false,
        }
    }

    fn migrate_req(ready: IncomingReady) -> MigrateRequest {
        MigrateRequest {
            ready,
            max_bandwidth: None,
            auto_converge: true,
            postcopy_after_passes: None,
            downtime_limit_ms: None,
            same_base: false,
        }
    }

    async fn running(d: &SimDriver) -> VmSpec {
        let s = spec();
        d.vm_create(&s).await.expect("create");
        d.vm_start(s.id).await.expect("start");
        s
    }

    #[tokio::test]
    async fn migration_moves_the_vm_with_its_bitmaps() {
        let src = sim();
        let dst = sim();
        let s = running(&src).await;
        let full = backup_req("m", None);
        src.vm_backup(s.id, &full, &|_| {}).await.expect("backup");
        let req = incoming(IncomingDisk::Overlay);
        let ready = dst.vm_migrate_prepare(&s, &req).await.expect("prepare");
        assert_eq!(
            dst.vm_migrate_prepare(&s, &req).await.expect("again"),
            ready,
            "a retried prepare answers the same"
        );
        assert!(matches!(
            dst.vm_migrate_prepare(&s, &incoming(IncomingDisk::Overlay))
                .await,
            Err(DriverError::Conflict { .. })
        ));
        assert_eq!(
            dst.vm_status(s.id)
                .await
                .expect("status")
                .expect("known")
                .state,
            VmRuntimeState::Paused
        );
        assert!(
            matches!(
                dst.vm_start(s.id).await,
                Err(DriverError::InvalidState { .. })
            ),
            "an incoming VM is not started by hand"
        );
        let mut src_events = src.subscribe();
        let mut dst_events = dst.subscribe();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let outcome = src
            .vm_migrate_send(s.id, &migrate_req(ready), &move |p| {
                record.lock().expect("lock").push(p)
            })
            .await
            .expect("send");
        assert_eq!(outcome.passes, 1);
        assert!(!seen.lock().expect("lock").is_empty());
        dst.vm_migrate_finish(s.id, Duration::from_secs(1))
            .await
            .expect("finish");
        dst.vm_migrate_finish(s.id, Duration::from_secs(1))
            .await
            .expect("finish is idempotent");
        assert!(src.vm_status(s.id).await.expect("status").is_none());
        assert_eq!(
            dst.vm_status(s.id)
                .await
                .expect("status")
                .expect("known")
                .state,
            VmRuntimeState::Running
        );
        assert_eq!(
            src_events.try_recv().expect("event").state,
            VmRuntimeState::Stopped
        );
        assert_eq!(
            dst_events.try_recv().expect("event").state,
            VmRuntimeState::Running
        );
        // The bitmap came along: the next backup there is incremental.
        let inc = backup_req("m", Some(&full));
        let out = dst.vm_backup(s.id, &inc, &|_| {}).await.expect("backup");
        assert_eq!(out.mode, BackupMode::Incremental);
        assert!(
            matches!(
                dst.vm_migrate_abort_incoming(s.id).await,
                Err(DriverError::InvalidState { .. })
            ),
            "a VM that arrived cannot be aborted away"
        );
    }

    #[tokio::test]
    async fn cancel_and_a_lost_destination_leave_the_vm_on_the_source() {
        let src = Arc::new(SimDriver::new(SimConfig {
            latency: Duration::from_millis(200),
            ..SimConfig::default()
        }));
        let dst = sim();
        let s = running(&src).await;

        // Cancelled mid-way.
        let ready = dst
            .vm_migrate_prepare(&s, &incoming(IncomingDisk::Overlay))
            .await
            .expect("prepare");
        let sender = src.clone();
        let req = migrate_req(ready);
        let send = tokio::spawn(async move { sender.vm_migrate_send(s.id, &req, &|_| {}).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        src.vm_migrate_cancel(s.id).await.expect("cancel");
        let err = send.await.expect("task").expect_err("cancelled");
        assert!(matches!(err, DriverError::Migration { .. }), "{err}");
        assert_eq!(
            src.vm_status(s.id)
                .await
                .expect("status")
                .expect("known")
                .state,
            VmRuntimeState::Running
        );
        dst.vm_migrate_abort_incoming(s.id).await.expect("abort");
        dst.vm_migrate_abort_incoming(s.id)
            .await
            .expect("abort again");
        assert_eq!(dst.vm_count(), 0);

        // The destination goes away mid-way.
        let ready = dst
            .vm_migrate_prepare(&s, &incoming(IncomingDisk::Overlay))
            .await
            .expect("prepare");
        let sender = src.clone();
        let req = migrate_req(ready.clone());
        let send = tokio::spawn(async move { sender.vm_migrate_send(s.id, &req, &|_| {}).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        dst.vm_migrate_abort_incoming(s.id).await.expect("abort");
        let err = send.await.expect("task").expect_err("destination gone");
        assert!(matches!(err, DriverError::Migration { .. }), "{err}");
        assert_eq!(
            src.vm_status(s.id)
                .await
                .expect("status")
                .expect("known")
                .state,
            VmRuntimeState::Running
        );
        assert_eq!(dst.vm_count(), 0);
        // A dropped destination driver is gone too.
        let gone = sim();
        let ready = gone
            .vm_migrate_prepare(&s, &incoming(IncomingDisk::Overlay))
            .await
            .expect("prepare");
        drop(gone);
        let err = src
            .vm_migrate_send(s.id, &migrate_req(ready), &|_| {})
            .await
            .expect_err("no destination");
        assert!(matches!(err, DriverError::Migration { .. }), "{err}");
    }

    #[tokio::test]
    async fn cold_migration_moves_a_stopped_vm_with_its_bitmaps() {
        let (src, dst) = (sim(), sim());
        let s = running(&src).await;
        let full = backup_req("a", None);
        src.vm_backup(s.id, &full, &|_| {}).await.expect("backup");
        let req = ExportRequest {
            request_id: uuid::Uuid::new_v4(),
            same_base: true,
        };
        assert!(
            matches!(
                src.vm_disk_export(s.id, &req).await,
                Err(DriverError::InvalidState { .. })
            ),
            "a running VM is not exported"
        );
        src.vm_stop(s.id, Duration::ZERO).await.expect("stop");
        let export = src.vm_disk_export(s.id, &req).await.expect("export");
        assert_eq!(src.vm_disk_export(s.id, &req).await.expect("again"), export);
        assert!(matches!(
            src.vm_start(s.id).await,
            Err(DriverError::InvalidState { .. })
        ));
        let outcome = dst
            .vm_disk_import(&s, &export, &|_| {})
            .await
            .expect("import");
        assert_eq!(outcome.bitmaps, vec![bitmap_name(full.backup_id)]);
        assert_eq!(
            dst.vm_disk_import(&s, &export, &|_| {})
                .await
                .expect("again"),
            outcome
        );
        src.vm_disk_export_stop(s.id).await.expect("stop export");
        src.vm_destroy(s.id).await.expect("destroy source");
        dst.vm_start(s.id).await.expect("start on the destination");

        // An export stopped before the copy: the import fails, nothing stays.
        let t = sim();
        let s2 = running(&src).await;
        src.vm_stop(s2.id, Duration::ZERO).await.expect("stop");
        let export = src
            .vm_disk_export(
                s2.id,
                &ExportRequest {
                    request_id: uuid::Uuid::new_v4(),
                    same_base: false,
                },
            )
            .await
            .expect("export");
        src.vm_disk_export_stop(s2.id).await.expect("stop export");
        assert!(matches!(
            t.vm_disk_import(&s2, &export, &|_| {}).await,
            Err(DriverError::Migration { .. })
        ));
        assert_eq!(t.vm_count(), 0);
        src.vm_start(s2.id).await.expect("the source starts again");
        // Outside a pool there is nothing to release.
        src.vm_stop(s2.id, Duration::ZERO).await.expect("stop");
        assert!(matches!(
            src.vm_release(s2.id).await,
            Err(DriverError::InvalidState { .. })
        ));
    }

    #[tokio::test]
    async fn migration_refusals_follow_the_qemu_rules() {
        let src = sim();
        let dst = sim();
        let s = running(&src).await;
        let ready = dst
            .vm_migrate_prepare(&s, &incoming(IncomingDisk::Overlay))
            .await
            .expect("prepare");
        let mut qemu = ready.clone();
        qemu.accel = "tcg".into();
        assert!(matches!(
            src.vm_migrate_send(s.id, &migrate_req(qemu), &|_| {}).await,
            Err(DriverError::MigrationRefused { .. })
        ));
        src.vm_snapshot_create(
            s.id,
            &SnapshotRequest {
                snapshot_id: uuid::Uuid::new_v4(),
                name: "s".into(),
            },
        )
        .await
        .expect("snapshot");
        match src
            .vm_migrate_send(s.id, &migrate_req(ready.clone()), &|_| {})
            .await
        {
            Err(DriverError::MigrationRefused { reason, .. }) => {
                assert!(reason.contains("snapshots first"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let stopped = spec();
        src.vm_create(&stopped).await.expect("create");
        assert!(matches!(
            src.vm_migrate_send(stopped.id, &migrate_req(ready), &|_| {})
                .await,
            Err(DriverError::InvalidState { .. })
        ));
        assert_eq!(
            src.vm_status(s.id)
                .await
                .expect("status")
                .expect("known")
                .state,
            VmRuntimeState::Running
        );
    }

    #[tokio::test]
    async fn backups_chain_and_fall_back_like_qemu() {
        let d = sim();
        let s = spec();
        d.vm_create(&s).await.expect("create");
        let quiet = |_: BackupProgress| {};
        let full = backup_req("a", None);
        assert!(matches!(
            d.vm_backup(s.id, &full, &quiet).await,
            Err(DriverError::InvalidState { .. })
        ));
        d.vm_start(s.id).await.expect("start");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = {
            let seen = seen.clone();
            move |p: BackupProgress| seen.lock().expect("lock").push(p)
        };
        let f = d.vm_backup(s.id, &full, &record).await.expect("full");
        assert_eq!(
            (f.mode, f.fallback_reason.as_deref()),
            (BackupMode::Full, None)
        );
        assert_eq!((f.data_bytes, f.disk_bytes), (s.disk_bytes, s.disk_bytes));
        assert_eq!(seen.lock().expect("lock").len(), 1);

        // The bitmap survives a stop and start: incremental.
        d.vm_stop(s.id, Duration::ZERO).await.expect("stop");
        d.vm_start(s.id).await.expect("start");
        let inc = backup_req("a", Some(&full));
        let i = d.vm_backup(s.id, &inc, &quiet).await.expect("incremental");
        assert_eq!((i.mode, i.data_bytes), (BackupMode::Incremental, 0));
        assert_ne!(i.sha256, f.sha256);

        // The parent's bitmap was replaced: an incremental over the full
        // backup again falls back.
        let again = backup_req("a", Some(&full));
        let a = d.vm_backup(s.id, &again, &quiet).await.expect("backup");
        assert_eq!(a.mode, BackupMode::Full);
        assert!(a.fallback_reason.expect("reason").contains("is missing"));

        // A crash makes the bitmap inconsistent.
        d.crash(s.id).expect("crash");
        d.vm_start(s.id).await.expect("start");
        let after_crash = backup_req("a", Some(&again));
        let c = d
            .vm_backup(s.id, &after_crash, &quiet)
            .await
            .expect("backup");
        assert_eq!(c.mode, BackupMode::Full);
        assert!(c.fallback_reason.expect("reason").contains("inconsistent"));
        let next = backup_req("a", Some(&after_crash));
        assert_eq!(
            d.vm_backup(s.id, &next, &quiet).await.expect("backup").mode,
            BackupMode::Incremental
        );

        // Verify knows what this host took, and only that.
        let check = d.backup_verify(&inc.target).await.expect("verify");
        assert_eq!((check.sha256, check.problems.len()), (i.sha256, 0));
        let unknown = d
            .backup_verify(Path::new("/backups/elsewhere.qcow2"))
            .await
            .expect_err("unknown file");
        assert!(unknown
            .to_string()
            .contains("not a backup this simulated host took"));

        // Restore needs a stopped VM and starts change tracking afresh.
        assert!(matches!(
            d.vm_restore(s.id, &inc.target, &[]).await,
            Err(DriverError::InvalidState { .. })
        ));
        d.vm_stop(s.id, Duration::ZERO).await.expect("stop");
        d.vm_restore(s.id, &inc.target, &[]).await.expect("restore");
        d.vm_start(s.id).await.expect("start");
        let after_restore = backup_req("a", Some(&next));
        let r = d
            .vm_backup(s.id, &after_restore, &quiet)
            .await
            .expect("backup");
        assert_eq!(r.mode, BackupMode::Full);
        assert!(r.fallback_reason.expect("reason").contains("is missing"));
    }

    /// Attached volumes are backed up with the disk, each incremental on
    /// its own: one attached since the parent is full and says why, a crash
    /// loses every disk's tracking, a restore in place needs the volume
    /// attached, and a volume can be built from a backup beside a new VM.
    #[tokio::test]
    async fn volumes_are_backed_up_like_the_disk() {
        let d = sim();
        let s = spec();
        let quiet = |_: BackupProgress| {};
        d.vm_create(&s).await.expect("create");
        let v = crate::volume::tests::blank(1 << 20);
        d.volume_create(&v).await.expect("volume");
        d.vm_volume_attach(s.id, v.volume_id).await.expect("attach");
        d.vm_start(s.id).await.expect("start");
        let full = backup_req("v", None);
        let f = d.vm_backup(s.id, &full, &quiet).await.expect("full");
        assert_eq!(f.volumes.len(), 1);
        assert_eq!(f.volumes[0].mode, BackupMode::Full);
        assert_eq!(
            f.volumes[0].file,
            crate::volume_backup_file(&full.target, v.volume_id)
        );
        let w = crate::volume::tests::blank(1 << 20);
        d.volume_create(&w).await.expect("volume w");
        d.vm_volume_attach(s.id, w.volume_id)
            .await
            .expect("attach w");
        let mut inc = backup_req("v", Some(&full));
        inc.volume_parents = f
            .volumes
            .iter()
            .map(|x| crate::VolumeBackupParent {
                volume_id: x.volume_id,
                file: x.file.clone(),
            })
            .collect();
        let i = d.vm_backup(s.id, &inc, &quiet).await.expect("inc");
        assert_eq!(i.mode, BackupMode::Incremental);
        let of = |id: uuid::Uuid| {
            i.volumes
                .iter()
                .find(|x| x.volume_id == id)
                .expect("volume backed up")
                .clone()
        };
        assert_eq!(of(v.volume_id).mode, BackupMode::Incremental);
        let newer = of(w.volume_id);
        assert_eq!(newer.mode, BackupMode::Full);
        assert!(newer
            .fallback_reason
            .expect("reason")
            .contains("no file in the parent restore point"));
        let check = d.backup_verify(&newer.file).await.expect("verify");
        assert_eq!(check.sha256, newer.sha256);

        // A crash: every disk's bitmaps are inconsistent.
        d.crash(s.id).expect("crash");
        d.vm_start(s.id).await.expect("start");
        let mut after = backup_req("v", Some(&inc));
        after.volume_parents = i
            .volumes
            .iter()
            .map(|x| crate::VolumeBackupParent {
                volume_id: x.volume_id,
                file: x.file.clone(),
            })
            .collect();
        let a = d.vm_backup(s.id, &after, &quiet).await.expect("after");
        assert!(a.volumes.iter().all(|x| x.mode == BackupMode::Full
            && x.fallback_reason
                .as_deref()
                .is_some_and(|r| r.contains("inconsistent"))));

        // In place: only volumes still attached.
        d.vm_stop(s.id, Duration::ZERO).await.expect("stop");
        let gone = crate::VolumeRestore {
            volume_id: uuid::Uuid::new_v4(),
            file: newer.file.clone(),
        };
        assert!(matches!(
            d.vm_restore(s.id, &inc.target, std::slice::from_ref(&gone))
                .await,
            Err(DriverError::Conflict { .. })
        ));
        let back = crate::VolumeRestore {
            volume_id: v.volume_id,
            file: of(v.volume_id).file,
        };
        d.vm_restore(s.id, &inc.target, &[back])
            .await
            .expect("restore");

        // Beside a new VM: built, then attachable; an attached one is refused.
        let fresh = uuid::Uuid::new_v4();
        let info = d
            .volume_restore(fresh, 1 << 20, &newer.file)
            .await
            .expect("volume restore");
        assert_eq!((info.size_bytes, info.attached_to), (1 << 20, None));
        assert!(matches!(
            d.volume_restore(v.volume_id, 1 << 20, &newer.file).await,
            Err(DriverError::VolumeConflict { .. })
        ));
    }

    #[tokio::test]
    async fn snapshots_follow_the_qemu_rules() {
        let d = sim();
        let s = spec();
        d.vm_create(&s).await.expect("create");
        d.vm_start(s.id).await.expect("start");
        let req = |name: &str| SnapshotRequest {
            snapshot_id: uuid::Uuid::new_v4(),
            name: name.into(),
        };
        let s1 = req("s1");
        let i1 = d.vm_snapshot_create(s.id, &s1).await.expect("s1");
        assert!(i1.quiesced, "a running VM's agent answers");
        assert_eq!(
            d.vm_snapshot_create(s.id, &s1).await.expect("again"),
            i1,
            "idempotent by id"
        );
        assert!(matches!(
            d.vm_snapshot_create(s.id, &req("s1")).await,
            Err(DriverError::Conflict { .. })
        ));
        let s2 = req("s2");
        d.vm_snapshot_create(s.id, &s2).await.expect("s2");
        let s3 = req("s3");
        d.vm_snapshot_create(s.id, &s3).await.expect("s3");
        assert!(matches!(
            d.vm_snapshot_revert(s.id, s1.snapshot_id).await,
            Err(DriverError::InvalidState { .. })
        ));
        // Delete works running.
        d.vm_snapshot_delete(s.id, s2.snapshot_id)
            .await
            .expect("delete s2");
        assert!(matches!(
            d.vm_snapshot_delete(s.id, s2.snapshot_id).await,
            Err(DriverError::SnapshotNotFound { .. })
        ));
        let names: Vec<String> = d
            .vm_snapshot_list(s.id)
            .await
            .expect("list")
            .into_iter()
            .map(|i| i.name)
            .collect();
        assert_eq!(names, ["s1", "s3"]);

        d.vm_stop(s.id, Duration::ZERO).await.expect("stop");
        assert_eq!(
            d.vm_snapshot_revert(s.id, s1.snapshot_id)
                .await
                .expect("revert"),
            vec![s3.snapshot_id]
        );
        assert_eq!(d.vm_snapshot_list(s.id).await.expect("list").len(), 1);
        let stopped = d
            .vm_snapshot_create(s.id, &req("stopped"))
            .await
            .expect("snapshot of a stopped VM");
        assert!(!stopped.quiesced);

        // The limit.
        for n in 2..MAX_SNAPSHOTS {
            d.vm_snapshot_create(s.id, &req(&format!("n{n}")))
                .await
                .expect("below the limit");
        }
        let e = d
            .vm_snapshot_create(s.id, &req("one too many"))
            .await
            .expect_err("limit");
        assert!(e.to_string().contains("limit of 16"), "{e}");
        d.vm_snapshot_delete(s.id, stopped.snapshot_id)
            .await
            .expect("delete while stopped");
        d.vm_snapshot_create(s.id, &req("one too many"))
            .await
            .expect("room again");
    }

    #[tokio::test]
    async fn volumes_follow_the_qemu_rules() {
        use crate::volume::tests::blank;
        let d = sim();
        let a = spec();
        let b = spec();
        d.vm_create(&a).await.expect("create");
        d.vm_create(&b).await.expect("create");
        let v = blank(16 << 20);
        let info = d.volume_create(&v).await.expect("volume");
        assert_eq!((info.size_bytes, info.attached_to), (16 << 20, None));
        assert_eq!(d.volume_create(&v).await.expect("idempotent"), info);
        let mut other = v.clone();
        other.size_bytes *= 2;
        assert!(matches!(
            d.volume_create(&other).await,
            Err(DriverError::VolumeConflict { .. })
        ));
        assert!(matches!(
            d.volume_create(&blank(0)).await,
            Err(DriverError::InvalidVolumeSpec { .. })
        ));

        d.vm_volume_attach(a.id, v.volume_id).await.expect("attach");
        d.vm_volume_attach(a.id, v.volume_id)
            .await
            .expect("attach is idempotent");
        assert!(matches!(
            d.vm_volume_attach(b.id, v.volume_id).await,
            Err(DriverError::VolumeConflict { .. })
        ));
        assert!(matches!(
            d.vm_volume_attach(VmId::new(), v.volume_id).await,
            Err(DriverError::NotFound(_))
        ));
        assert!(matches!(
            d.vm_volume_attach(a.id, uuid::Uuid::new_v4()).await,
            Err(DriverError::VolumeNotFound(_))
        ));
        assert!(matches!(
            d.volume_delete(v.volume_id).await,
            Err(DriverError::VolumeConflict { .. })
        ));
        let grown = d.volume_resize(v.volume_id, 32 << 20).await.expect("grow");
        assert_eq!(grown.size_bytes, 32 << 20);
        assert!(matches!(
            d.volume_resize(v.volume_id, 16 << 20).await,
            Err(DriverError::InvalidVolumeSpec { .. })
        ));

        // At most MAX_VOLUMES_PER_VM per VM.
        for _ in 1..MAX_VOLUMES_PER_VM {
            let extra = blank(1 << 20);
            d.volume_create(&extra).await.expect("volume");
            d.vm_volume_attach(a.id, extra.volume_id)
                .await
                .expect("attach");
        }
        let one_too_many = blank(1 << 20);
        d.volume_create(&one_too_many).await.expect("volume");
        let e = d
            .vm_volume_attach(a.id, one_too_many.volume_id)
            .await
            .expect_err("full");
        assert!(e.to_string().contains("the most a VM can"), "{e}");

        // Destroying the VM frees its volumes, which survive it.
        d.vm_destroy(a.id).await.expect("destroy");
        let info = d
            .volume_info(v.volume_id)
            .await
            .expect("info")
            .expect("still there");
        assert_eq!((info.size_bytes, info.attached_to), (32 << 20, None));
        d.vm_volume_attach(b.id, v.volume_id)
            .await
            .expect("attach elsewhere");
        d.vm_volume_detach(b.id, v.volume_id).await.expect("detach");
        d.vm_volume_detach(b.id, v.volume_id)
            .await
            .expect("detach is idempotent");
        d.volume_delete(v.volume_id).await.expect("delete");
        d.volume_delete(v.volume_id)
            .await
            .expect("delete is idempotent");
        assert!(d.volume_info(v.volume_id).await.expect("info").is_none());
    }

    #[tokio::test]
    async fn pool_volumes_follow_the_qemu_rules() {
        use crate::volume::tests::blank;
        let d = sim();
        let a = spec();
        d.vm_create(&a).await.expect("create");
        let pool = std::path::Path::new("/srv/pool");
        let v = blank(16 << 20);
        d.volume_use_pool(v.volume_id, pool)
            .await
            .expect("use pool");
        d.volume_use_pool(v.volume_id, pool)
            .await
            .expect("use pool is idempotent");
        assert!(matches!(
            d.volume_use_pool(v.volume_id, std::path::Path::new("/srv/other"))
                .await,
            Err(DriverError::VolumeConflict { .. })
        ));
        assert!(matches!(
            d.volume_use_pool(v.volume_id, std::path::Path::new("relative"))
                .await,
            Err(DriverError::InvalidVolumeSpec { .. })
        ));
        let local = blank(1 << 20);
        d.volume_create(&local).await.expect("local volume");
        assert!(matches!(
            d.volume_use_pool(local.volume_id, pool).await,
            Err(DriverError::VolumeConflict { .. })
        ));

        d.volume_create(&v).await.expect("volume");
        d.vm_volume_attach(a.id, v.volume_id).await.expect("attach");
        let e = d
            .vm_snapshot_create(
                a.id,
                &crate::SnapshotRequest {
                    snapshot_id: uuid::Uuid::new_v4(),
                    name: "s".into(),
                },
            )
            .await
            .expect_err("a pool volume is attached");
        assert!(e.to_string().contains("shared storage pool"), "{e}");
        // The VM goes; the volume stays, in its pool.
        d.vm_destroy(a.id).await.expect("destroy");
        assert!(d.volume_info(v.volume_id).await.expect("info").is_some());
        d.volume_delete(v.volume_id).await.expect("delete");
        assert!(d.volume_info(v.volume_id).await.expect("info").is_none());
        // Forgotten with its pool: it may be made anew anywhere.
        d.volume_use_pool(v.volume_id, std::path::Path::new("/srv/other"))
            .await
            .expect("a deleted volume's pool is forgotten");
    }

    #[tokio::test]
    async fn ten_thousand_hosts_fit_in_one_process() {
        let t = std::time::Instant::now();
        let hosts: Vec<Arc<dyn Driver>> = (0..10_000)
            .map(|_| Arc::new(sim()) as Arc<dyn Driver>)
            .collect();
        for host in &hosts {
            for _ in 0..2 {
                let s = spec();
                host.vm_create(&s).await.expect("create");
                host.vm_start(s.id).await.expect("start");
            }
        }
        let mut running = 0;
        for host in &hosts {
            running += host.vm_list().await.expect("list").len();
        }
        assert_eq!(running, 20_000);
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "10,000 simulated hosts took {:?}",
            t.elapsed()
        );
    }
}
