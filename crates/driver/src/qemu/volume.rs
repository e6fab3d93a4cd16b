//! Data volumes for the QEMU driver (the contract is in [`crate::volume`]).
//!
//! # Files
//!
//! ```text
//! data_dir/volumes/<volume-id>.json        the VolumeSpec it was created with
//! data_dir/volumes/<volume-id>.qcow2       the volume (its presence means "exists")
//! data_dir/volumes/<volume-id>.qcow2.tmp   a creation in progress
//! data_dir/vms/<vm-id>/volumes.json        the VM's attachments: volume id and port, in order
//! ```
//!
//! The VM's `volumes.json` is the only record of an attachment: a volume's
//! VM is found by reading the records of the VMs that exist (those with a
//! `vm.json`). So destroying a VM frees its volumes by construction, and no
//! second record can disagree with the first after a crash.
//!
//! # Names in QEMU
//!
//! A volume is block node [`node_name`] (a hash of the id: node names hold
//! at most 31 characters) and device [`device_id`] (`vol-<id>`), plugged into
//! hot-plug port `hpN` (a PCIe root port, see `cmdline.rs`) recorded with the
//! attachment, so it keeps its PCI address across restarts of the VM. Both
//! names are stable, so an interrupted attach or detach is completed by the
//! next call from whatever QEMU shows (`query-named-block-nodes` for the
//! node, `qom-list /machine/peripheral` for the device).
//!
//! # Hot-plug, step by step
//!
//! ```text
//!  attach (VM running)                        detach (VM running)
//!  ───────────────────                        ───────────────────
//!  [op] record {volume, free port}            [op]  device_del vol-<id>
//!  [op] blockdev-add vol-<hash> ─┐                     │ QEMU: ACPI eject request
//!  [op] device_add virtio-blk-pci│                     ▼
//!         bus=hpN, drive=vol-<hash>,         [ ]   poll qom-list every 100 ms until
//!         serial=<20 chars of id>                   the device is gone (the guest
//!         │ QEMU: ACPI hot-plug                     acknowledged), ≤ DETACH_TIMEOUT
//!         ▼                                  [op]  blockdev-del vol-<hash>
//!       guest: /dev/vdX appears              [op]  remove from the record
//! ```
//!
//! `[op]`: under the VM's operation lock. The detach waits for the guest
//! without it, so a `vm_stop` is not held up by a guest that never answers
//! (a VM that stops meanwhile has released the disk with its QEMU). Each
//! volume has its own lock, held for a whole operation on it: a volume is
//! attached, detached, resized or deleted by one caller at a time.
//!
//! A failed hot-plug of a new attachment is undone (record and node), so the
//! call leaves nothing behind; a failed re-try keeps the record (the next
//! start plugs the volume) and reports the error.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qapi::qmp as q;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use stratus_common::VmId;

use super::cmdline::{self, hotplug_port_id, VolumeDisk};
use super::image::{self, run_qemu_img};
use super::layout::{read_json, remove_file_if_exists, write_json, VmPaths};
use super::qmp::{execute, QmpService};
use super::{lock, process, Shared, VmEntry, QMP_TIMEOUT};
use crate::volume::{check_resize, DETACH_TIMEOUT};
use crate::{volume_serial, DriverError, ImageFormat, VolumeInfo, VolumeSpec, MAX_VOLUMES_PER_VM};

/// Prefix of the volumes' block node names.
const NODE_PREFIX: &str = "vol-";
/// How often a detach checks whether the guest released the disk.
const UNPLUG_POLL: Duration = Duration::from_millis(100);
/// Where QEMU lists the devices that have an id.
const PERIPHERALS: &str = "/machine/peripheral";
/// How often a detach starts over when the VM restarted while it waited.
const DETACH_ATTEMPTS: usize = 3;

/// The volume's block node name: a hash of its id (QEMU allows 31
/// characters, too few for `vol-` and a UUID), stable across agent restarts.
pub(super) fn node_name(volume_id: uuid::Uuid) -> String {
    let digest = Sha256::digest(volume_id.as_bytes());
    let hex = format!("{digest:x}");
    format!("{NODE_PREFIX}{}", &hex[..24])
}

/// The volume's device id in QEMU.
pub(super) fn device_id(volume_id: uuid::Uuid) -> String {
    format!("vol-{volume_id}")
}

/// One attachment in a VM's `volumes.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Attachment {
    volume_id: uuid::Uuid,
    /// Hot-plug port index (`hpN`).
    port: usize,
}

/// A VM's `volumes.json`: its attachments in attachment order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct VolumesRecord {
    volumes: Vec<Attachment>,
}

impl VolumesRecord {
    fn find(&self, volume_id: uuid::Uuid) -> Option<&Attachment> {
        self.volumes.iter().find(|a| a.volume_id == volume_id)
    }

    /// The lowest port no attachment uses.
    fn free_port(&self) -> Option<usize> {
        (0..MAX_VOLUMES_PER_VM).find(|p| !self.volumes.iter().any(|a| a.port == *p))
    }
}

fn read_record(paths: &VmPaths) -> Result<VolumesRecord, DriverError> {
    Ok(read_json(&paths.volumes_json, "VM's volume record")?.unwrap_or_default())
}

fn write_record(paths: &VmPaths, rec: &VolumesRecord) -> Result<(), DriverError> {
    write_json(&paths.volumes_json, "VM's volume record", rec)
}

/// Removes the volume from the VM's record. Caller holds `vm.op`.
fn forget(vm: &VmEntry, volume_id: uuid::Uuid) -> Result<(), DriverError> {
    let mut rec = read_record(&vm.paths)?;
    let before = rec.volumes.len();
    rec.volumes.retain(|a| a.volume_id != volume_id);
    if rec.volumes.len() != before {
        write_record(&vm.paths, &rec)?;
    }
    Ok(())
}

/// One async lock per volume, created on first use (a few bytes each; never
/// removed, a host has few volumes).
#[derive(Default)]
pub(super) struct VolumeLocks(Mutex<HashMap<uuid::Uuid, Arc<tokio::sync::Mutex<()>>>>);

impl VolumeLocks {
    fn get(&self, volume_id: uuid::Uuid) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.0).entry(volume_id).or_default().clone()
    }
}

/// The files of one volume.
struct VolumePaths {
    file: PathBuf,
    spec_json: PathBuf,
    tmp: PathBuf,
}

impl VolumePaths {
    fn new(shared: &Shared, volume_id: uuid::Uuid) -> Self {
        let dir = volumes_dir(shared);
        VolumePaths {
            file: dir.join(format!("{volume_id}.qcow2")),
            spec_json: dir.join(format!("{volume_id}.json")),
            tmp: dir.join(format!("{volume_id}.qcow2.tmp")),
        }
    }
}

/// `data_dir/volumes`, absolute (a sibling of the canonical `vms` dir).
fn volumes_dir(shared: &Shared) -> PathBuf {
    shared.vms_dir.with_file_name("volumes")
}

fn volume_disk(shared: &Shared, a: &Attachment) -> VolumeDisk {
    VolumeDisk {
        node: node_name(a.volume_id),
        device: device_id(a.volume_id),
        port: a.port,
        serial: volume_serial(a.volume_id),
        file: VolumePaths::new(shared, a.volume_id).file,
    }
}

/// The VM the volume is attached to: the one existing VM whose record lists
/// it. An unreadable record fails the lookup rather than risk attaching a
/// volume twice.
fn owner(shared: &Shared, volume_id: uuid::Uuid) -> Result<Option<VmId>, DriverError> {
    let dir = &shared.vms_dir;
    let entries = std::fs::read_dir(dir)
        .map_err(|e| DriverError::io("cannot list the VM directory", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| DriverError::io("cannot list the VM directory", dir, e))?;
        let Some(id) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<VmId>().ok())
        else {
            continue;
        };
        let paths = VmPaths::new(dir, id);
        if !paths.vm_json.exists() {
            continue;
        }
        if read_record(&paths)?.find(volume_id).is_some() {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

/// The `-blockdev`/`-device` arguments of the volumes attached to the VM,
/// for its start. Caller holds `vm.op`.
pub(super) fn boot_args(shared: &Shared, vm: &VmEntry) -> Result<Vec<String>, DriverError> {
    let rec = read_record(&vm.paths)?;
    let mut disks = Vec::with_capacity(rec.volumes.len());
    for a in &rec.volumes {
        let disk = volume_disk(shared, a);
        if !disk.file.is_file() {
            return Err(DriverError::InvalidState {
                id: vm.id,
                operation: "start",
                state: format!(
                    "attached to volume {} whose file {} is missing (detach the volume)",
                    a.volume_id,
                    disk.file.display()
                ),
            });
        }
        disks.push(disk);
    }
    if !disks.is_empty() {
        tracing::info!(vm = %vm.id, volumes = disks.len(), "starting with attached volumes");
    }
    cmdline::volume_args(&disks)
}

/// Creates a volume. See [`crate::Driver::volume_create`].
pub(super) async fn create(
    shared: &Arc<Shared>,
    spec: &VolumeSpec,
) -> Result<VolumeInfo, DriverError> {
    spec.validate()?;
    let id = spec.volume_id;
    let invalid = |reason: String| DriverError::InvalidVolumeSpec { id, reason };
    if let Some(image) = &spec.image {
        if !image.is_file() {
            return Err(invalid(format!("image {} does not exist", image.display())));
        }
    }
    let volume_lock = shared.volume_locks.get(id);
    let _one_at_a_time = volume_lock.lock().await;
    let paths = VolumePaths::new(shared, id);
    let dir = volumes_dir(shared);
    std::fs::create_dir_all(&dir)
        .map_err(|e| DriverError::io("cannot create the volume directory", &dir, e))?;
    if paths.file.exists() {
        return match read_json::<VolumeSpec>(&paths.spec_json, "volume spec")? {
            Some(existing) if existing == *spec => info(shared, id)
                .await?
                .ok_or(DriverError::VolumeNotFound(id)),
            Some(existing) => Err(DriverError::VolumeConflict {
                id,
                reason: format!(
                    "already exists with a different spec ({})",
                    spec_difference(&existing, spec)
                ),
            }),
            None => Err(DriverError::VolumeConflict {
                id,
                reason: format!(
                    "its file {} exists without the spec it was created with ({}); \
                     delete the volume first",
                    paths.file.display(),
                    paths.spec_json.display()
                ),
            }),
        };
    }
    // The size check needs the image's size: before anything is written.
    let image_size = match (&spec.image, spec.image_format) {
        (Some(image), Some(format)) => {
            let size = image::virtual_size(&shared.config.qemu_img, image, format).await?;
            if spec.size_bytes < size {
                return Err(invalid(format!(
                    "size {} bytes is smaller than its image {} ({size} bytes)",
                    spec.size_bytes,
                    image.display()
                )));
            }
            Some(size)
        }
        _ => None,
    };
    let started = Instant::now();
    // The spec first, the file last: the renamed file is the commit point.
    write_json(&paths.spec_json, "volume spec", spec)?;
    remove_file_if_exists(&paths.tmp)?;
    let made = async {
        match (&spec.image, spec.image_format, image_size) {
            (Some(image), Some(format), Some(size)) => {
                let grow = (spec.size_bytes > size).then_some(spec.size_bytes);
                image::create_overlay(&shared.config.qemu_img, image, format, &paths.tmp, grow)
                    .await?;
            }
            _ => {
                let size = spec.size_bytes.to_string();
                run_qemu_img(
                    &shared.config.qemu_img,
                    &[
                        "create".as_ref(),
                        "-q".as_ref(),
                        "-f".as_ref(),
                        "qcow2".as_ref(),
                        paths.tmp.as_os_str(),
                        size.as_ref(),
                    ],
                    &format!("create volume {id}"),
                )
                .await?;
            }
        }
        std::fs::File::open(&paths.tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| DriverError::io("cannot flush the new volume", &paths.tmp, e))
    }
    .await;
    if let Err(e) = made {
        let _ = remove_file_if_exists(&paths.tmp);
        return Err(e);
    }
    std::fs::rename(&paths.tmp, &paths.file)
        .map_err(|e| DriverError::io("cannot move the new volume into place", &paths.file, e))?;
    tracing::info!(
        volume = %id,
        size = spec.size_bytes,
        image = ?spec.image,
        ms = started.elapsed().as_millis() as u64,
        "volume created"
    );
    info(shared, id)
        .await?
        .ok_or(DriverError::VolumeNotFound(id))
}

/// Names the fields two specs of the same volume differ in.
fn spec_difference(a: &VolumeSpec, b: &VolumeSpec) -> String {
    let mut fields = Vec::new();
    if a.size_bytes != b.size_bytes {
        fields.push("size");
    }
    if a.image != b.image || a.image_format != b.image_format {
        fields.push("image");
    }
    format!("differs in {}", fields.join(", "))
}

/// The volume's size, allocation and VM; `None` if it does not exist.
pub(super) async fn info(
    shared: &Arc<Shared>,
    volume_id: uuid::Uuid,
) -> Result<Option<VolumeInfo>, DriverError> {
    let paths = VolumePaths::new(shared, volume_id);
    if !paths.file.exists() {
        return Ok(None);
    }
    let size_bytes =
        match image::virtual_size(&shared.config.qemu_img, &paths.file, ImageFormat::Qcow2).await {
            Ok(size) => size,
            // Deleted meanwhile.
            Err(_) if !paths.file.exists() => return Ok(None),
            Err(e) => return Err(e),
        };
    let allocated_bytes = match std::fs::metadata(&paths.file) {
        Ok(m) => m.blocks() * 512,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(DriverError::io(
                "cannot read the volume's allocation",
                &paths.file,
                e,
            ))
        }
    };
    Ok(Some(VolumeInfo {
        volume_id,
        size_bytes,
        allocated_bytes,
        attached_to: owner(shared, volume_id)?,
    }))
}

/// Attaches a volume. See [`crate::Driver::vm_volume_attach`] and the module docs.
pub(super) async fn attach(
    shared: &Arc<Shared>,
    vm_id: VmId,
    volume_id: uuid::Uuid,
) -> Result<(), DriverError> {
    let volume_lock = shared.volume_locks.get(volume_id);
    let _one_at_a_time = volume_lock.lock().await;
    if !VolumePaths::new(shared, volume_id).file.exists() {
        return Err(DriverError::VolumeNotFound(volume_id));
    }
    let vm = shared.existing(vm_id)?;
    if let Some(other) = owner(shared, volume_id)? {
        if other != vm_id {
            return Err(DriverError::VolumeConflict {
                id: volume_id,
                reason: format!(
                    "cannot attach it to VM {vm_id}: it is attached to VM {other} (detach it there first)"
                ),
            });
        }
    }
    let _op = vm.op.lock().await;
    if !vm.paths.vm_json.exists() {
        // Destroyed while this call waited for the lock.
        return Err(DriverError::NotFound(vm_id));
    }
    let mut rec = read_record(&vm.paths)?;
    let (attachment, new) = match rec.find(volume_id) {
        Some(a) => (a.clone(), false),
        None => {
            let port = rec.free_port().ok_or_else(|| DriverError::InvalidState {
                id: vm_id,
                operation: "attach another volume to",
                state: format!(
                    "holding {} volumes, the most a VM can (one per hot-plug port)",
                    MAX_VOLUMES_PER_VM
                ),
            })?;
            let a = Attachment { volume_id, port };
            rec.volumes.push(a.clone());
            write_record(&vm.paths, &rec)?;
            (a, true)
        }
    };
    if shared.ensure_adopted(&vm)?.is_none() {
        shared.reconcile_dead(&vm)?;
        tracing::info!(vm = %vm_id, volume = %volume_id, port = attachment.port, "volume attached; plugged in at the next start");
        return Ok(());
    }
    let started = Instant::now();
    let disk = volume_disk(shared, &attachment);
    match plug(shared, &vm, &disk).await {
        Ok(()) => {
            tracing::info!(
                vm = %vm_id,
                volume = %volume_id,
                port = attachment.port,
                ms = started.elapsed().as_millis() as u64,
                "volume hot-plugged"
            );
            Ok(())
        }
        Err(e) => {
            if new {
                if let Err(undo) = forget(&vm, volume_id) {
                    tracing::warn!(vm = %vm_id, volume = %volume_id, error = %undo, "cannot undo the record of a failed attach");
                }
            }
            Err(e)
        }
    }
}

/// Adds whatever of the volume's node and device QEMU lacks. A node added
/// here is removed again when the device cannot be added.
async fn plug(shared: &Arc<Shared>, vm: &VmEntry, disk: &VolumeDisk) -> Result<(), DriverError> {
    let qmp = shared.qmp(vm).await?;
    let mut added_node = false;
    if !has_node(&qmp, &disk.node).await? {
        let options: q::BlockdevOptions =
            serde_json::from_value(cmdline::volume_blockdev(disk)?)
                .map_err(|e| DriverError::qemu("cannot build the blockdev-add options", e))?;
        execute(
            &qmp,
            q::blockdev_add(options),
            QMP_TIMEOUT,
            "attach a volume",
        )
        .await?;
        added_node = true;
    }
    if has_device(&qmp, &disk.device).await? {
        return Ok(());
    }
    let added = execute(
        &qmp,
        q::device_add::new(
            "virtio-blk-pci",
            Some(disk.device.clone()),
            Some(hotplug_port_id(disk.port)),
            [
                ("drive".to_string(), serde_json::json!(disk.node)),
                ("serial".to_string(), serde_json::json!(disk.serial)),
            ],
        ),
        QMP_TIMEOUT,
        "attach a volume",
    )
    .await;
    if let Err(e) = added {
        if added_node {
            let _ = del_node(&qmp, &disk.node).await;
        }
        return Err(e);
    }
    Ok(())
}

/// Detaches a volume. See [`crate::Driver::vm_volume_detach`] and the module docs.
pub(super) async fn detach(
    shared: &Arc<Shared>,
    vm_id: VmId,
    volume_id: uuid::Uuid,
) -> Result<(), DriverError> {
    let volume_lock = shared.volume_locks.get(volume_id);
    let _one_at_a_time = volume_lock.lock().await;
    let vm = match shared.existing(vm_id) {
        Ok(vm) => vm,
        // No VM, no attachment.
        Err(DriverError::NotFound(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    let node = node_name(volume_id);
    let device = device_id(volume_id);
    let started = Instant::now();
    for _ in 0..DETACH_ATTEMPTS {
        // Ask the guest to release the disk.
        let pid = {
            let _op = vm.op.lock().await;
            match shared.ensure_adopted(&vm)? {
                None => {
                    shared.reconcile_dead(&vm)?;
                    forget(&vm, volume_id)?;
                    return Ok(());
                }
                Some(pid) => {
                    let qmp = shared.qmp(&vm).await?;
                    if has_device(&qmp, &device).await? {
                        request_unplug(&qmp, &device).await?;
                    }
                    pid
                }
            }
        };
        wait_released(shared, &vm, pid, &device, volume_id).await?;
        // Remove the node and the record.
        let _op = vm.op.lock().await;
        if let Some(now) = shared.ensure_adopted(&vm)? {
            let qmp = shared.qmp(&vm).await?;
            if now != pid && has_device(&qmp, &device).await? {
                // The VM restarted while the guest was asked, and plugged the
                // volume in again at boot: ask the new guest.
                tracing::info!(vm = %vm_id, volume = %volume_id, "VM restarted during the detach; asking again");
                continue;
            }
            if has_node(&qmp, &node).await? {
                del_node(&qmp, &node).await?;
            }
        } else {
            shared.reconcile_dead(&vm)?;
        }
        forget(&vm, volume_id)?;
        tracing::info!(
            vm = %vm_id,
            volume = %volume_id,
            ms = started.elapsed().as_millis() as u64,
            "volume detached"
        );
        return Ok(());
    }
    Err(DriverError::VolumeConflict {
        id: volume_id,
        reason: format!(
            "VM {vm_id} restarted {DETACH_ATTEMPTS} times while the volume was being detached"
        ),
    })
}

/// `device_del`; a request already pending (an earlier detach that timed
/// out) is fine: the guest may still answer it.
async fn request_unplug(qmp: &QmpService, device: &str) -> Result<(), DriverError> {
    match execute(
        qmp,
        q::device_del { id: device.into() },
        QMP_TIMEOUT,
        "detach a volume",
    )
    .await
    {
        Ok(_) => Ok(()),
        Err(DriverError::Qemu { source, .. })
            if source.to_string().contains("in the process of unplug") =>
        {
            tracing::debug!(%device, "unplug already requested");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Waits until QEMU no longer lists the device (the guest released it) or
/// QEMU `pid` ended, for at most [`DETACH_TIMEOUT`].
async fn wait_released(
    shared: &Arc<Shared>,
    vm: &VmEntry,
    pid: u32,
    device: &str,
    volume_id: uuid::Uuid,
) -> Result<(), DriverError> {
    let deadline = Instant::now() + DETACH_TIMEOUT;
    loop {
        if !process::is_qemu_of(pid, vm.id) {
            return Ok(());
        }
        let asked = async {
            let qmp = shared.qmp(vm).await?;
            has_device(&qmp, device).await
        }
        .await;
        match asked {
            Ok(false) => return Ok(()),
            Ok(true) => {}
            // The monitor may be reconnecting QMP; keep asking until the deadline.
            Err(e) => tracing::debug!(vm = %vm.id, error = %e, "cannot ask QEMU for the device"),
        }
        if Instant::now() >= deadline {
            return Err(DriverError::timeout(format!(
                "after {}s waiting for the guest of VM {} to release volume {volume_id}: QEMU \
                 asked it to unplug the disk and it did not (a guest that is still booting, \
                 paused, or without ACPI PCI hot-plug does not answer); the request stays \
                 pending, detach again to keep waiting",
                DETACH_TIMEOUT.as_secs(),
                vm.id
            )));
        }
        tokio::time::sleep(UNPLUG_POLL).await;
    }
}

/// Resizes a volume. See [`crate::Driver::volume_resize`].
pub(super) async fn resize(
    shared: &Arc<Shared>,
    volume_id: uuid::Uuid,
    size_bytes: u64,
) -> Result<VolumeInfo, DriverError> {
    let volume_lock = shared.volume_locks.get(volume_id);
    let _one_at_a_time = volume_lock.lock().await;
    let paths = VolumePaths::new(shared, volume_id);
    if !paths.file.exists() {
        return Err(DriverError::VolumeNotFound(volume_id));
    }
    let current =
        image::virtual_size(&shared.config.qemu_img, &paths.file, ImageFormat::Qcow2).await?;
    check_resize(volume_id, current, size_bytes)?;
    if size_bytes != current {
        let started = Instant::now();
        let live = match owner(shared, volume_id)? {
            Some(vm_id) => {
                let vm = shared.existing(vm_id)?;
                // Held across the offline resize too, so the VM cannot start
                // (and open the file) half-way through it.
                let _op = vm.op.lock().await;
                match shared.ensure_adopted(&vm)? {
                    Some(_) => {
                        let qmp = shared.qmp(&vm).await?;
                        let node = node_name(volume_id);
                        if has_node(&qmp, &node).await? {
                            resize_live(&qmp, &node, size_bytes).await?;
                            true
                        } else {
                            resize_file(shared, &paths.file, size_bytes).await?;
                            false
                        }
                    }
                    None => {
                        shared.reconcile_dead(&vm)?;
                        resize_file(shared, &paths.file, size_bytes).await?;
                        false
                    }
                }
            }
            None => {
                resize_file(shared, &paths.file, size_bytes).await?;
                false
            }
        };
        tracing::info!(
            volume = %volume_id,
            from = current,
            to = size_bytes,
            live,
            ms = started.elapsed().as_millis() as u64,
            "volume resized"
        );
    }
    info(shared, volume_id)
        .await?
        .ok_or(DriverError::VolumeNotFound(volume_id))
}

async fn resize_live(qmp: &QmpService, node: &str, size_bytes: u64) -> Result<(), DriverError> {
    let size = i64::try_from(size_bytes)
        .map_err(|e| DriverError::qemu("the new volume size does not fit QMP", e))?;
    execute(
        qmp,
        q::block_resize {
            device: None,
            node_name: Some(node.into()),
            size,
        },
        QMP_TIMEOUT,
        "resize a volume",
    )
    .await?;
    Ok(())
}

async fn resize_file(shared: &Shared, file: &Path, size_bytes: u64) -> Result<(), DriverError> {
    let size = size_bytes.to_string();
    run_qemu_img(
        &shared.config.qemu_img,
        &[
            "resize".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            file.as_os_str(),
            size.as_ref(),
        ],
        &format!("grow {} to {size_bytes} bytes", file.display()),
    )
    .await?;
    Ok(())
}

/// Deletes a volume. See [`crate::Driver::volume_delete`].
pub(super) async fn delete(shared: &Arc<Shared>, volume_id: uuid::Uuid) -> Result<(), DriverError> {
    let volume_lock = shared.volume_locks.get(volume_id);
    let _one_at_a_time = volume_lock.lock().await;
    if let Some(vm) = owner(shared, volume_id)? {
        return Err(DriverError::VolumeConflict {
            id: volume_id,
            reason: format!("cannot delete it while it is attached to VM {vm} (detach it first)"),
        });
    }
    let paths = VolumePaths::new(shared, volume_id);
    let existed = paths.file.exists();
    // The file first: without it the volume no longer exists, whatever else remains.
    for p in [&paths.file, &paths.tmp, &paths.spec_json] {
        remove_file_if_exists(p)?;
    }
    if existed {
        tracing::info!(volume = %volume_id, "volume deleted");
    }
    Ok(())
}

async fn has_node(qmp: &QmpService, node: &str) -> Result<bool, DriverError> {
    let nodes = execute(
        qmp,
        q::query_named_block_nodes { flat: Some(true) },
        QMP_TIMEOUT,
        "volume",
    )
    .await?;
    Ok(nodes.iter().any(|n| n.node_name.as_deref() == Some(node)))
}

async fn has_device(qmp: &QmpService, device: &str) -> Result<bool, DriverError> {
    let props = execute(
        qmp,
        q::qom_list {
            path: PERIPHERALS.into(),
        },
        QMP_TIMEOUT,
        "volume",
    )
    .await?;
    Ok(props.iter().any(|p| p.name == device))
}

async fn del_node(qmp: &QmpService, node: &str) -> Result<(), DriverError> {
    execute(
        qmp,
        q::blockdev_del {
            node_name: node.into(),
        },
        QMP_TIMEOUT,
        "detach a volume",
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_qemu_and_are_stable() {
        let id = uuid::Uuid::new_v4();
        let node = node_name(id);
        assert!(node.len() <= 31, "{node}");
        assert_eq!(node, node_name(id));
        assert_ne!(node, node_name(uuid::Uuid::new_v4()));
        assert_eq!(device_id(id), format!("vol-{id}"));
    }

    #[test]
    fn ports_are_reused_lowest_first_and_bounded() {
        let mut rec = VolumesRecord::default();
        for expected in 0..MAX_VOLUMES_PER_VM {
            let port = rec.free_port().expect("a free port");
            assert_eq!(port, expected);
            rec.volumes.push(Attachment {
                volume_id: uuid::Uuid::new_v4(),
                port,
            });
        }
        assert_eq!(rec.free_port(), None);
        let second = rec.volumes.remove(1);
        assert_eq!(rec.free_port(), Some(second.port));
        assert!(rec.find(second.volume_id).is_none());
        assert!(rec.find(rec.volumes[0].volume_id).is_some());
    }

    #[test]
    fn record_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = VmPaths::new(dir.path(), VmId::new());
        std::fs::create_dir_all(&paths.dir).expect("mkdir");
        assert_eq!(read_record(&paths).expect("read"), VolumesRecord::default());
        let rec = VolumesRecord {
            volumes: vec![Attachment {
                volume_id: uuid::Uuid::new_v4(),
                port: 2,
            }],
        };
        write_record(&paths, &rec).expect("write");
        assert_eq!(read_record(&paths).expect("read"), rec);
    }
}
