//! Data volumes for the QEMU driver (the contract is in [`crate::volume`]).
//!
//! # Files
//!
//! ```text
//! data_dir/volumes/<volume-id>.json        the VolumeSpec it was created with
//! data_dir/volumes/<volume-id>.qcow2       the volume (its presence means "exists")
//! data_dir/volumes/<volume-id>.qcow2.tmp   a creation in progress
//! data_dir/volumes/<volume-id>.<id>.qcow2  a snapshot layer (see `snapshot.rs`)
//! data_dir/volumes/<volume-id>.pool        link to <pool>/volumes: the volume is in a shared pool
//! data_dir/vms/<vm-id>/volumes.json        the VM's attachments: volume id and port, in order
//! ```
//!
//! # Volumes in shared pools
//!
//! A volume in a shared storage pool keeps all of the files above (spec,
//! file, layers) in `<pool>/volumes/` instead of `data_dir/volumes/`; the
//! host finds them through the link `<volume-id>.pool`, made by
//! [`use_pool`] before anything else touches the volume on this host (like
//! a pool VM's `disks` link). Every host that sees the pool makes its own
//! link and finds the same files, so a volume made on one host is attached
//! on another as it is. Nothing but [`delete`] ever removes a pool
//! volume's file: [`release_all`] (a VM's destroy, also an orphan's) leaves
//! a pool volume's files alone, because another host may hold the volume
//! by now (see its doc).
//!
//! # Snapshot layers
//!
//! A snapshot of the VM covers its attached volumes: each becomes a chain
//! of layers recorded in the VM's `snapshots.json` with the VM disk's. Its
//! own file may then be merged away, so a volume is found through the
//! records of the VM it is attached to (`locate`). Such a volume starts with
//! its whole chain, each layer under a node name the driver chose, its
//! image too ([`base_node`], so a merge can name it); it is grown by growing
//! its active layer; it cannot be detached while a snapshot covers it (the
//! snapshot's revert needs its layers); and once none does, leaving the VM
//! (detach, destroy) makes it one file named `<volume-id>.qcow2` again. A
//! detached volume is always that one file.
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
use super::snapshot::{self, Disk};
use super::{lock, process, Shared, VmEntry, QMP_TIMEOUT};
use crate::volume::{check_resize, DETACH_TIMEOUT};
use crate::{
    volume_serial, DriverError, ImageFormat, IncomingVolume, VolumeInfo, VolumeSpec,
    MAX_VOLUMES_PER_VM,
};

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

/// The node name of the image a volume clones, opened read-only under a
/// name the driver chose, so a merge can name it as its base (QEMU's own
/// name for a backing file it opened by itself cannot tell apart two
/// disks cloning the same image).
pub(super) fn base_node(volume_id: uuid::Uuid) -> String {
    let digest = Sha256::digest(volume_id.as_bytes());
    let hex = format!("{digest:x}");
    format!("vbase-{}", &hex[..24])
}

/// The image the volume clones, as a `-blockdev` (or `blockdev-add`)
/// definition under [`base_node`]; `None` for a blank volume.
fn base_blockdev(
    shared: &Shared,
    volume_id: uuid::Uuid,
) -> Result<Option<(String, serde_json::Value)>, DriverError> {
    let spec: Option<VolumeSpec> = read_json(
        &VolumePaths::new(shared, volume_id).spec_json,
        "volume spec",
    )?;
    let Some((image, format)) = spec.and_then(|s| s.image.zip(s.image_format)) else {
        return Ok(None);
    };
    let filename = image.to_str().ok_or_else(|| {
        DriverError::Config(format!(
            "volume image path {} is not UTF-8",
            image.display()
        ))
    })?;
    let node = base_node(volume_id);
    let blockdev = serde_json::json!({
        "driver": format.as_qemu_str(),
        "node-name": node,
        "read-only": true,
        "file": { "driver": "file", "filename": filename },
    });
    Ok(Some((node, blockdev)))
}

/// The volume's device id in QEMU.
pub(super) fn device_id(volume_id: uuid::Uuid) -> String {
    format!("vol-{volume_id}")
}

/// The volume's own file name: its only layer until a snapshot covers it.
pub(super) fn own_file(volume_id: uuid::Uuid) -> String {
    format!("{volume_id}.qcow2")
}

/// The file name of the layer snapshot (or revert) `id` puts on top of the
/// volume.
pub(super) fn overlay_file(volume_id: uuid::Uuid, id: uuid::Uuid) -> String {
    format!("{volume_id}.{id}.qcow2")
}

/// The node name of one of the volume's layer files: [`node_name`] for its
/// own file (what the volume was before snapshots covered volumes, so a
/// VM started then still matches), a hash of the file name for the others.
pub(super) fn layer_node(volume_id: uuid::Uuid, file: &str) -> String {
    if file == own_file(volume_id) {
        node_name(volume_id)
    } else {
        snapshot::node_name(file)
    }
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

/// The volumes attached to the VM, in attachment order.
pub(super) fn attached(paths: &VmPaths) -> Result<Vec<uuid::Uuid>, DriverError> {
    Ok(read_record(paths)?
        .volumes
        .iter()
        .map(|a| a.volume_id)
        .collect())
}

/// Takes the locks of every volume attached to the VM (in id order, before
/// the VM's operation lock, as every volume operation does), so no attach,
/// detach or resize changes the volumes while a snapshot operation
/// rearranges their layers. Returns the attached volumes, in attachment
/// order, and the guards.
pub(super) async fn lock_attached(
    shared: &Shared,
    vm: &VmEntry,
) -> Result<(Vec<uuid::Uuid>, Vec<tokio::sync::OwnedMutexGuard<()>>), DriverError> {
    // An attach may slip in between the read and the locks: read again.
    for _ in 0..DETACH_ATTEMPTS {
        let ids = attached(&vm.paths)?;
        let mut sorted = ids.clone();
        sorted.sort();
        let mut guards = Vec::with_capacity(sorted.len());
        for id in &sorted {
            guards.push(shared.volume_locks.get(*id).lock_owned().await);
        }
        if attached(&vm.paths)? == ids {
            return Ok((ids, guards));
        }
    }
    Err(DriverError::InvalidState {
        id: vm.id,
        operation: "lock the volumes of",
        state: "having volumes attached and detached all the time (try again)".into(),
    })
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
    pub(super) fn get(&self, volume_id: uuid::Uuid) -> Arc<tokio::sync::Mutex<()>> {
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
        let dir = volume_dir(shared, volume_id);
        VolumePaths {
            file: dir.join(format!("{volume_id}.qcow2")),
            spec_json: dir.join(format!("{volume_id}.json")),
            tmp: dir.join(format!("{volume_id}.qcow2.tmp")),
        }
    }
}

/// `data_dir/volumes`, absolute (a sibling of the canonical `vms` dir).
pub(super) fn volumes_dir(shared: &Shared) -> PathBuf {
    shared.vms_dir.with_file_name("volumes")
}

/// The link that says the volume's files are in a shared pool.
fn pool_link(shared: &Shared, volume_id: uuid::Uuid) -> PathBuf {
    volumes_dir(shared).join(format!("{volume_id}.pool"))
}

/// The directory holding the volume's files: its pool's `volumes/` when
/// [`use_pool`] linked it, else `data_dir/volumes`.
pub(super) fn volume_dir(shared: &Shared, volume_id: uuid::Uuid) -> PathBuf {
    std::fs::read_link(pool_link(shared, volume_id)).unwrap_or_else(|_| volumes_dir(shared))
}

/// Whether the volume's files are in a shared pool.
fn in_pool(shared: &Shared, volume_id: uuid::Uuid) -> bool {
    pool_link(shared, volume_id).symlink_metadata().is_ok()
}

/// Refuses a snapshot of VM `vm` while a volume in a shared pool is
/// attached to it: its layers would be files in the pool that only this
/// host's records describe, which another host attaching the volume later
/// (or this host's orphan clean-up) could not tell from garbage.
pub(super) fn refuse_pool_volumes(
    shared: &Shared,
    vm: VmId,
    attached: &[uuid::Uuid],
) -> Result<(), DriverError> {
    match attached.iter().find(|v| in_pool(shared, **v)) {
        Some(v) => Err(DriverError::InvalidState {
            id: vm,
            operation: "snapshot",
            state: format!(
                "attached to volume {v}, which is in a shared storage pool (snapshots do not \
                 cover pool volumes yet: detach it first)"
            ),
        }),
        None => Ok(()),
    }
}

/// Records that the volume's files are in the shared pool at `pool` (its
/// `volumes/` subdirectory, made if missing). Idempotent; refused for a
/// volume this host already keeps elsewhere (its own data directory, or
/// another pool). See [`crate::Driver::volume_use_pool`].
pub(super) async fn use_pool(
    shared: &Shared,
    volume_id: uuid::Uuid,
    pool: &Path,
) -> Result<(), DriverError> {
    let conflict = |reason: String| DriverError::VolumeConflict {
        id: volume_id,
        reason,
    };
    if !pool.is_absolute() {
        return Err(DriverError::InvalidVolumeSpec {
            id: volume_id,
            reason: format!("pool path {} is not absolute", pool.display()),
        });
    }
    let volume_lock = shared.volume_locks.get(volume_id);
    let _one_at_a_time = volume_lock.lock().await;
    let target = pool.join("volumes");
    let link = pool_link(shared, volume_id);
    match std::fs::read_link(&link) {
        Ok(t) if t == target => return Ok(()),
        Ok(t) => {
            return Err(conflict(format!(
                "its files are in {} on this host, not in {}",
                t.display(),
                target.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(DriverError::io(
                "cannot read the volume's pool link",
                &link,
                e,
            ))
        }
    }
    let local = volumes_dir(shared).join(own_file(volume_id));
    if local.exists() {
        return Err(conflict(format!(
            "this host keeps it in its own data directory ({})",
            local.display()
        )));
    }
    std::fs::create_dir_all(&target)
        .map_err(|e| DriverError::io("cannot create the pool's volume directory", &target, e))?;
    let dir = volumes_dir(shared);
    std::fs::create_dir_all(&dir)
        .map_err(|e| DriverError::io("cannot create the volume directory", &dir, e))?;
    std::os::unix::fs::symlink(&target, &link)
        .map_err(|e| DriverError::io("cannot link the volume to its pool", &link, e))?;
    tracing::info!(volume = %volume_id, pool = %pool.display(), "volume's files are in a shared pool");
    Ok(())
}

/// The volume as the command line or a hot-plug opens it: its own file,
/// for a volume without snapshot layers.
fn volume_disk(shared: &Shared, a: &Attachment) -> VolumeDisk {
    VolumeDisk {
        node: node_name(a.volume_id),
        device: device_id(a.volume_id),
        port: a.port,
        serial: volume_serial(a.volume_id),
        file: VolumePaths::new(shared, a.volume_id).file,
        backing: None,
    }
}

/// Where a volume's data is: its layer files, bottom to top (the active one
/// last), and the VM it is attached to.
pub(super) struct Located {
    pub(super) layers: Vec<PathBuf>,
    pub(super) vm: Option<VmId>,
}

impl Located {
    fn active(&self) -> &Path {
        self.layers.last().map_or(Path::new(""), PathBuf::as_path)
    }
}

/// Finds the volume's layers: from the snapshot records of the VM it is
/// attached to (a snapshot may have put layers on it, and merging them
/// may have removed its own file), else its own file. `None`: the volume
/// does not exist.
pub(super) fn locate(
    shared: &Shared,
    volume_id: uuid::Uuid,
) -> Result<Option<Located>, DriverError> {
    let dir = volume_dir(shared, volume_id);
    let vm = owner(shared, volume_id)?;
    let files = match vm {
        Some(vm_id) => snapshot::read_chain(&VmPaths::new(&shared.vms_dir, vm_id))?
            .files_of(Disk::Volume(volume_id)),
        None => vec![own_file(volume_id)],
    };
    let layers: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    if !layers.last().is_some_and(|p| p.is_file()) {
        return Ok(None);
    }
    Ok(Some(Located { layers, vm }))
}

/// Removes the volume's layer files (`<id>.qcow2`, `<id>.<uuid>.qcow2`) that
/// `keep` does not name: layers merged or dropped by snapshot operations
/// whose removal a crash interrupted. Does nothing unless every file in
/// `keep` exists (a record that does not match the files is left for an
/// operator rather than trusted). Caller holds the volume's lock or the
/// owning VM's operation lock.
pub(super) fn remove_layer_orphans(shared: &Shared, volume_id: uuid::Uuid, keep: &[String]) {
    let dir = volume_dir(shared, volume_id);
    if !keep.iter().all(|f| dir.join(f).is_file()) {
        tracing::warn!(volume = %volume_id, ?keep, "the volume's recorded layers are not all there; removing none of its files");
        return;
    }
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    let prefix = format!("{volume_id}.");
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(middle) = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix("qcow2"))
        else {
            continue;
        };
        let is_layer = middle.is_empty()
            || middle
                .strip_suffix('.')
                .is_some_and(|id| id.parse::<uuid::Uuid>().is_ok());
        if is_layer && !keep.iter().any(|k| k == name) {
            tracing::info!(file = %entry.path().display(), "removing a volume layer no record names");
            if let Err(e) = remove_file_if_exists(&entry.path()) {
                tracing::warn!(error = %e, "cannot remove an unused volume layer");
            }
        }
    }
}

/// Makes the volume's active layer its own file again, for a volume about
/// to leave the VM (detach, destroy) that no snapshot covers any more: a
/// hard link under the volume's own name, the record, then the old name
/// goes, so every step leaves the record naming a file that exists. QEMU
/// must not hold the volume. Caller holds `vm.op`.
fn normalize(shared: &Shared, vm: &VmEntry, volume_id: uuid::Uuid) -> Result<(), DriverError> {
    let mut chain = snapshot::read_chain(&vm.paths)?;
    let disk = Disk::Volume(volume_id);
    let active = chain.active_of(disk);
    let own = own_file(volume_id);
    if active == own {
        return Ok(());
    }
    let dir = volume_dir(shared, volume_id);
    let (from, to) = (dir.join(&active), dir.join(&own));
    match std::fs::hard_link(&from, &to) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && same_file(&from, &to) => {}
        Err(e) => {
            return Err(DriverError::io(
                "cannot give the volume's active layer the volume's own name",
                &to,
                e,
            ))
        }
    }
    if let Err(e) = std::fs::File::open(&dir).and_then(|d| d.sync_all()) {
        tracing::warn!(error = %e, "cannot flush the volume directory");
    }
    chain.set_active(disk, own);
    snapshot::write_chain(&vm.paths, &chain)?;
    remove_file_if_exists(&from)?;
    tracing::info!(vm = %vm.id, volume = %volume_id, from = %active, "volume's active layer renamed to the volume's own file");
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Makes every attached volume a single file again, with its current
/// content, before the VM's records go (`vm_destroy`): each volume's layers
/// are flattened into its active one, which takes the volume's own name.
/// The VM's snapshots die with it. QEMU has ended. Caller holds `vm.op`.
///
/// A volume in a shared pool is left as it is: this may be an orphan's
/// destroy (the VM was deleted while this host was away) and another host
/// may have attached the volume since, so this host must not rewrite or
/// remove its files. Such a volume has no layers anyway: snapshots of a VM
/// with a pool volume attached are refused (`snapshot.rs`), so it is
/// always its one file.
pub(super) async fn release_all(shared: &Shared, vm: &VmEntry) -> Result<(), DriverError> {
    if !vm.paths.volumes_json.exists() {
        return Ok(());
    }
    for volume_id in attached(&vm.paths)? {
        let dir = volume_dir(shared, volume_id);
        let disk = Disk::Volume(volume_id);
        let mut chain = snapshot::read_chain(&vm.paths)?;
        let files = chain.files_of(disk);
        if files == [own_file(volume_id)] {
            continue;
        }
        if in_pool(shared, volume_id) {
            tracing::warn!(vm = %vm.id, volume = %volume_id, ?files, "volume in a shared pool has layers recorded by this VM; leaving its files as they are");
            continue;
        }
        snapshot::flatten_offline(&shared.config.qemu_img, &dir, &files).await?;
        for s in &mut chain.snapshots {
            s.volumes.retain(|l| l.volume_id != volume_id);
        }
        snapshot::write_chain(&vm.paths, &chain)?;
        remove_layer_orphans(shared, volume_id, &chain.files_of(disk));
        normalize(shared, vm, volume_id)?;
        tracing::info!(vm = %vm.id, volume = %volume_id, layers = files.len(), "volume's layers flattened as its VM goes");
    }
    Ok(())
}

/// The attached volumes as the destination of a live migration rebuilds
/// them (see `crate::migrate`): port, size, and the shared pool holding
/// the files, if any. A volume with snapshot layers is refused: only its
/// one file moves. Caller holds `vm.op`.
pub(super) fn outgoing(shared: &Shared, vm: &VmEntry) -> Result<Vec<IncomingVolume>, DriverError> {
    let rec = read_record(&vm.paths)?;
    let chain = snapshot::read_chain(&vm.paths)?;
    let mut out = Vec::with_capacity(rec.volumes.len());
    for a in &rec.volumes {
        let v = a.volume_id;
        let files = chain.files_of(Disk::Volume(v));
        if files != [own_file(v)] {
            return Err(DriverError::MigrationRefused {
                id: vm.id,
                reason: format!(
                    "its volume {v} has {} snapshot layer(s) that would not move with it; \
                     delete (merge) the VM's snapshots first",
                    files.len().saturating_sub(1)
                ),
            });
        }
        let file = VolumePaths::new(shared, v).file;
        let header = image::read_qcow2_header(&file)
            .map_err(|e| DriverError::io("cannot read the volume's qcow2 header", &file, e))?;
        let pool = if in_pool(shared, v) {
            std::fs::read_link(pool_link(shared, v))
                .ok()
                .and_then(|t| t.parent().map(Path::to_path_buf))
        } else {
            None
        };
        out.push(IncomingVolume {
            volume_id: v,
            port: a.port,
            size_bytes: header.virtual_size,
            pool,
        });
    }
    Ok(out)
}

/// Destination of a live migration: makes each volume openable here (an
/// empty standalone file of its size, which the source mirrors into, or a
/// link to its shared pool) and records the VM's attachments on the
/// source's ports, so the command line plugs them where the guest had
/// them. A volume this host already keeps a file of is a conflict (the
/// abort would remove what this attempt did not make). Caller holds
/// `vm.op`; `vm.json` is written (the volumes' owner is found through it).
pub(super) async fn make_incoming(
    shared: &Arc<Shared>,
    vm: &VmEntry,
    volumes: &[IncomingVolume],
) -> Result<(), DriverError> {
    let mut rec = VolumesRecord::default();
    for v in volumes {
        if v.port >= MAX_VOLUMES_PER_VM || rec.volumes.iter().any(|a| a.port == v.port) {
            return Err(DriverError::InvalidSpec {
                id: vm.id,
                reason: format!(
                    "volume {} is to be plugged into hot-plug port {}, which is taken or beyond \
                     the VM's {MAX_VOLUMES_PER_VM}",
                    v.volume_id, v.port
                ),
            });
        }
        match &v.pool {
            Some(pool) => use_pool(shared, v.volume_id, pool).await?,
            None => {
                let paths = VolumePaths::new(shared, v.volume_id);
                if paths.file.exists() || in_pool(shared, v.volume_id) {
                    return Err(DriverError::VolumeConflict {
                        id: v.volume_id,
                        reason: format!(
                            "this host already keeps a copy of it ({}); it cannot receive the \
                             volume of a migrating VM",
                            paths.file.display()
                        ),
                    });
                }
                create(
                    shared,
                    &VolumeSpec {
                        volume_id: v.volume_id,
                        size_bytes: v.size_bytes,
                        image: None,
                        image_format: None,
                    },
                )
                .await?;
            }
        }
        rec.volumes.push(Attachment {
            volume_id: v.volume_id,
            port: v.port,
        });
    }
    if !rec.volumes.is_empty() {
        write_record(&vm.paths, &rec)?;
    }
    Ok(())
}

/// Removes the files of a volume that moved to another host with its VM,
/// or that an aborted incoming migration made: its own file and spec here.
/// A volume in a shared pool keeps its files (the other host opens them).
pub(super) fn remove_moved(shared: &Shared, volume_id: uuid::Uuid) -> Result<(), DriverError> {
    if in_pool(shared, volume_id) {
        return Ok(());
    }
    let paths = VolumePaths::new(shared, volume_id);
    for p in [&paths.file, &paths.tmp, &paths.spec_json] {
        remove_file_if_exists(p)?;
    }
    Ok(())
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
///
/// A volume with snapshot layers is opened as its whole recorded chain,
/// each layer a `-blockdev` with the node name the snapshot code expects,
/// the lower ones read-only and each naming the one below as its backing
/// (the bottom one's base image, if any, is what its header names).
pub(super) fn boot_args(shared: &Shared, vm: &VmEntry) -> Result<Vec<String>, DriverError> {
    let rec = read_record(&vm.paths)?;
    let chain = snapshot::read_chain(&vm.paths)?;
    let mut args = Vec::new();
    let mut disks = Vec::with_capacity(rec.volumes.len());
    for a in &rec.volumes {
        let v = a.volume_id;
        let dir = volume_dir(shared, v);
        let files = chain.files_of(Disk::Volume(v));
        for f in &files {
            let path = dir.join(f);
            if !path.is_file() {
                return Err(DriverError::InvalidState {
                    id: vm.id,
                    operation: "start",
                    state: format!(
                        "attached to volume {v} whose layer {} is missing (detach the volume)",
                        path.display()
                    ),
                });
            }
        }
        let Some((top, lower)) = files.split_last() else {
            continue;
        };
        let mut below: Option<String> = None;
        if let Some((node, blockdev)) = base_blockdev(shared, v)? {
            args.push("-blockdev".to_string());
            args.push(blockdev.to_string());
            below = Some(node);
        }
        for f in lower {
            let path = dir.join(f);
            let filename = path.to_str().ok_or_else(|| {
                DriverError::Config(format!("volume layer path {} is not UTF-8", path.display()))
            })?;
            let mut blockdev = serde_json::json!({
                "driver": "qcow2",
                "node-name": layer_node(v, f),
                "read-only": true,
                "file": { "driver": "file", "filename": filename },
            });
            if let Some(node) = &below {
                blockdev["backing"] = serde_json::json!(node);
            }
            args.push("-blockdev".to_string());
            args.push(blockdev.to_string());
            below = Some(layer_node(v, f));
        }
        disks.push(VolumeDisk {
            node: layer_node(v, top),
            file: dir.join(top),
            backing: below,
            ..volume_disk(shared, a)
        });
    }
    if !disks.is_empty() {
        tracing::info!(vm = %vm.id, volumes = disks.len(), "starting with attached volumes");
    }
    args.extend(cmdline::volume_args(&disks)?);
    Ok(args)
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
    let dir = volume_dir(shared, id);
    std::fs::create_dir_all(&dir)
        .map_err(|e| DriverError::io("cannot create the volume directory", &dir, e))?;
    if paths.file.exists() || locate(shared, id)?.is_some() {
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
    let Some(located) = locate(shared, volume_id)? else {
        return Ok(None);
    };
    let active = located.active();
    let size_bytes =
        match image::virtual_size(&shared.config.qemu_img, active, ImageFormat::Qcow2).await {
            Ok(size) => size,
            // Deleted (or merged by a snapshot delete) meanwhile.
            Err(_) if !active.exists() => return Ok(None),
            Err(e) => return Err(e),
        };
    // Every layer is the volume's own (a base image it clones is shared and
    // not counted).
    let mut allocated_bytes = 0;
    for layer in &located.layers {
        match std::fs::metadata(layer) {
            Ok(m) => allocated_bytes += m.blocks() * 512,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(DriverError::io(
                    "cannot read the volume's allocation",
                    layer,
                    e,
                ))
            }
        }
    }
    Ok(Some(VolumeInfo {
        volume_id,
        size_bytes,
        allocated_bytes,
        attached_to: located.vm,
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
    if locate(shared, volume_id)?.is_none() {
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
    if snapshot::read_chain(&vm.paths)?.files_of(Disk::Volume(volume_id)) != [own_file(volume_id)] {
        // Attached already, with snapshot layers: plugged in with them at
        // every start, never hot-plugged (see `boot_args`).
        let qmp = shared.qmp(&vm).await?;
        if has_device(&qmp, &device_id(volume_id)).await? {
            return Ok(());
        }
        return Err(DriverError::InvalidState {
            id: vm_id,
            operation: "plug volume into",
            state: format!(
                "running without volume {volume_id}, whose snapshot layers are recorded (stop \
                 and start the VM to plug it in with them)"
            ),
        });
    }
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
    let mut added_base: Option<String> = None;
    if !has_node(&qmp, &disk.node).await? {
        let volume_id = disk_volume_id(disk)?;
        let mut disk = disk.clone();
        if let Some((node, blockdev)) = base_blockdev(shared, volume_id)? {
            if !has_node(&qmp, &node).await? {
                let options: q::BlockdevOptions = serde_json::from_value(blockdev)
                    .map_err(|e| DriverError::qemu("cannot build the blockdev-add options", e))?;
                execute(
                    &qmp,
                    q::blockdev_add(options),
                    QMP_TIMEOUT,
                    "attach a volume",
                )
                .await?;
                added_base = Some(node.clone());
            }
            disk.backing = Some(node);
        }
        let added = async {
            let options: q::BlockdevOptions =
                serde_json::from_value(cmdline::volume_blockdev(&disk)?)
                    .map_err(|e| DriverError::qemu("cannot build the blockdev-add options", e))?;
            execute(
                &qmp,
                q::blockdev_add(options),
                QMP_TIMEOUT,
                "attach a volume",
            )
            .await
        }
        .await;
        if let Err(e) = added {
            if let Some(base) = &added_base {
                let _ = del_node(&qmp, base).await;
            }
            return Err(e);
        }
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
        if let Some(base) = &added_base {
            let _ = del_node(&qmp, base).await;
        }
        return Err(e);
    }
    Ok(())
}

/// The volume a [`VolumeDisk`] opens, from its device id (`vol-<id>`).
fn disk_volume_id(disk: &VolumeDisk) -> Result<uuid::Uuid, DriverError> {
    disk.device
        .strip_prefix("vol-")
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| DriverError::Config(format!("{} is not a volume's device id", disk.device)))
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
    let device = device_id(volume_id);
    let started = Instant::now();
    for _ in 0..DETACH_ATTEMPTS {
        // Ask the guest to release the disk.
        let pid = {
            let _op = vm.op.lock().await;
            refuse_if_covered(&vm, volume_id)?;
            match shared.ensure_adopted(&vm)? {
                None => {
                    shared.reconcile_dead(&vm)?;
                    normalize(shared, &vm, volume_id)?;
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
            // The active layer: the volume's own node, or the overlay a
            // snapshot put on top (no snapshot covers the volume, so it is
            // the only layer left).
            let active = snapshot::read_chain(&vm.paths)?.active_of(Disk::Volume(volume_id));
            let node = layer_node(volume_id, &active);
            if has_node(&qmp, &node).await? {
                del_node(&qmp, &node).await?;
            }
            let base = base_node(volume_id);
            if has_node(&qmp, &base).await? {
                del_node(&qmp, &base).await?;
            }
        } else {
            shared.reconcile_dead(&vm)?;
        }
        normalize(shared, &vm, volume_id)?;
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

/// Refuses to detach a volume a snapshot of the VM covers: the snapshot's
/// layers of the volume are part of the VM's chain, and a revert to it
/// would need them. Caller holds `vm.op`.
fn refuse_if_covered(vm: &VmEntry, volume_id: uuid::Uuid) -> Result<(), DriverError> {
    let covering = snapshot::read_chain(&vm.paths)?.covering(volume_id);
    if covering.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = covering.iter().map(|n| format!("{n:?}")).collect();
    Err(DriverError::VolumeConflict {
        id: volume_id,
        reason: format!(
            "cannot detach it from VM {}: the VM's snapshot(s) {} cover it; delete those \
             snapshots first (reverting to one of them needs the volume's layers)",
            vm.id,
            names.join(", ")
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
    // Snapshot operations hold this lock too: the layers stay put.
    let located = locate(shared, volume_id)?.ok_or(DriverError::VolumeNotFound(volume_id))?;
    let active = located.active().to_path_buf();
    let current = image::virtual_size(&shared.config.qemu_img, &active, ImageFormat::Qcow2).await?;
    check_resize(volume_id, current, size_bytes)?;
    if size_bytes != current {
        let started = Instant::now();
        // Only the active layer grows: the layers below keep the size they
        // had at their snapshot, and reads past their end are zeros.
        let live = match located.vm {
            Some(vm_id) => {
                let vm = shared.existing(vm_id)?;
                // Held across the offline resize too, so the VM cannot start
                // (and open the file) half-way through it.
                let _op = vm.op.lock().await;
                match shared.ensure_adopted(&vm)? {
                    Some(_) => {
                        let qmp = shared.qmp(&vm).await?;
                        let file = active
                            .file_name()
                            .and_then(|f| f.to_str())
                            .unwrap_or_default();
                        let node = layer_node(volume_id, file);
                        if has_node(&qmp, &node).await? {
                            resize_live(&qmp, &node, size_bytes).await?;
                            true
                        } else {
                            resize_file(shared, &active, size_bytes).await?;
                            false
                        }
                    }
                    None => {
                        shared.reconcile_dead(&vm)?;
                        resize_file(shared, &active, size_bytes).await?;
                        false
                    }
                }
            }
            None => {
                resize_file(shared, &active, size_bytes).await?;
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
    // Snapshot layers a crash left behind (a detached volume has none).
    remove_layer_orphans(shared, volume_id, &[]);
    // The pool link last: it is how the files above were found.
    let link = pool_link(shared, volume_id);
    let pooled = in_pool(shared, volume_id);
    remove_file_if_exists(&link)?;
    if existed {
        tracing::info!(volume = %volume_id, pooled, "volume deleted");
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

/// Deletes a volume's block node. The unplugged device leaves QEMU's
/// device tree (what `wait_released` watches) a moment before it lets go
/// of its block backend, so `blockdev-del` may find the node still "in
/// use" for a few milliseconds (seen once in CI): it is asked again until
/// [`NODE_RELEASE_TIMEOUT`].
async fn del_node(qmp: &QmpService, node: &str) -> Result<(), DriverError> {
    let deadline = Instant::now() + NODE_RELEASE_TIMEOUT;
    loop {
        let deleted = execute(
            qmp,
            q::blockdev_del {
                node_name: node.into(),
            },
            QMP_TIMEOUT,
            "detach a volume",
        )
        .await;
        match deleted {
            Err(e) if format!("{e:?}").contains("is in use") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other.map(|_| ()),
        }
    }
}

/// How long a just-unplugged device may hold on to its block node.
const NODE_RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

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
