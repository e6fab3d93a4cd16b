//! Live and offline disk snapshots for the QEMU driver (the contract is in
//! [`crate::snapshot`]): an external qcow2 chain per disk of the VM (its own
//! disk in the VM's directory, each attached volume in the host's volume
//! directory), all recorded in one file.
//!
//! # The chain
//!
//! ```text
//!   base image ◄─ disk.qcow2 ◄─ disk.<S1>.qcow2 ◄─ disk.<S2>.qcow2   (active: the VM writes here)
//!   (shared, read-only,  │ frozen by S1      │ frozen by S2
//!    never written)      │                   │
//!   volume V (attached after S1):
//!   V's image ◄─ <V>.qcow2 ◄─ <V>.<S2>.qcow2                          (active)
//!                   │ frozen by S2
//!   snapshots.json: { active: "disk.<S2>.qcow2",
//!                     snapshots: [ {S1, file: "disk.qcow2"},
//!                                  {S2, file: "disk.<S1>.qcow2",
//!                                       volumes: [{V, file: "<V>.qcow2"}]} ],
//!                     volumes: { V: "<V>.<S2>.qcow2" } }
//! ```
//!
//! A volume's chain is the layers the snapshots that cover it froze, in
//! order, then its active layer (`volumes`, or its own file `<V>.qcow2`
//! when it has none). A snapshot covers the volumes attached when it was
//! taken; a volume it covers cannot be detached (`volume.rs` refuses), so
//! every later snapshot covers it too and the chain has no gaps. One record
//! for all disks is what makes "one operation across all the VM's disks"
//! crash-safe: it is written once, atomically, whatever the number of disks.
//!
//! Snapshot S_i freezes the layer written until then (its `file`) and puts a
//! new empty overlay `disk.<S_i>.qcow2` (backing file: the frozen layer) on
//! top, which becomes the active layer. The records in `snapshots.json`
//! (written atomically: temporary file, then rename) are the truth: the
//! command line opens exactly that chain at every start, each layer as a
//! `-blockdev` with an explicit node name (`disk0` for `disk.qcow2`,
//! `layer-<hash of the file name>` for the others, `base0` for the base
//! image, all read-only but the active layer), so the chain survives a stop,
//! a start and an agent restart, and every node a live operation addresses
//! has a name the driver knows. Without `snapshots.json` the chain is just
//! `disk.qcow2`, as before snapshots existed.
//!
//! # Taking a snapshot
//!
//! Running VM, for every disk (the VM's and each attached volume's):
//! `qemu-img create -u` the overlay (unsafe mode: the backing file is open
//! read-write in QEMU and cannot be opened again), `blockdev-add` it without
//! a backing file; then record the new chains, freeze the guest's file
//! systems through the guest agent if it answers (`guest-fsfreeze-freeze`),
//! and run ONE QMP `transaction`: per disk a `blockdev-snapshot` (the overlay
//! goes on top of the active node, which QEMU reopens read-only and stores
//! its persistent bitmaps in) plus, for every `stratus-backup-*` bitmap of
//! the old active node, a persistent `block-dirty-bitmap-add` of the same
//! name on the new node, so backup change tracking continues on the new
//! layer without missing a write; then thaw, whatever happened. The
//! transaction switches every disk or none. Recording the chains *before*
//! the switch is what makes a crash safe: an agent that dies in between
//! leaves a record whose active layers are empty overlays over the old
//! active ones, which read the same as the disks; the retried create (same
//! snapshot id) finds the record and runs the switch QEMU never saw
//! (`finish_switch`), so the frozen layers are never written again.
//!
//! Stopped VM: `qemu-img create` each overlay, `qemu-img bitmap --add` the
//! same bitmaps to it, record the chains.
//!
//! # Deleting a snapshot (merging its layer)
//!
//! Deleting S_i removes its frozen layer L_i in every disk it covers (one
//! stream per disk, one after the other; the record changes once, when all
//! are done): its data is pulled *up* into
//! the layer above it (the next snapshot's layer, or the active one) and that
//! layer's backing file becomes the layer below L_i (the previous snapshot's
//! layer, or the base image). Running: a `block-stream` job on the layer
//! above with `base-node` = the layer below, named explicitly (`base0` for the
//! first snapshot); stopped: `qemu-img rebase -b <below>` (safe mode: it copies
//! what L_i held). Not `block-commit`: a commit pushes data *down*, so
//! committing L_i would write into the previous snapshot's layer (changing
//! what that snapshot holds) or, for the first snapshot, into the shared base
//! image (the pitfall measured on our hosts: a `block-commit` without
//! `base-node` committed one VM's data into the base image). A stream never
//! writes below the layer it runs on. A chain whose bottom layer has no
//! backing file (a disk restored from a backup) has no base to name: the
//! stream then flattens everything below into the layer above.
//!
//! L_i may hold copies of backup bitmaps (the writes between the snapshot
//! before it and S_i): they are merged into the active layer's bitmaps of the
//! same name first, so the next incremental backup still sees those writes.
//!
//! The stream runs without the VM's operation lock (a large layer can take
//! long; a `vm_stop` must not wait for it); the records change only once it
//! is done. A VM that stops mid-stream fails the delete and keeps a valid
//! chain: the layer above points at L_i until the job completes.
//!
//! # Reverting (stopped VMs only)
//!
//! In every disk S covers, a fresh empty overlay on top of S's frozen layer
//! becomes the active layer (a volume's keeps the volume's current size: it
//! may have grown since); the layers of the snapshots taken after S, and the
//! old active layers, are dropped with their records. A volume S does not
//! cover was attached after S: it keeps its data, the layers the dropped
//! snapshots froze in it flattened into its active layer first (`qemu-img
//! rebase` onto its image). The new VM disk layer has no backup bitmaps, so
//! the next backup is a full one ("bitmap ... is missing ... reverted to a
//! snapshot").
//!
//! # Concurrency
//!
//! Snapshot operations hold the locks of the attached volumes (taken first,
//! as every volume operation takes its volume's lock before the VM's
//! operation lock: no attach, detach or resize meanwhile), the VM's backup
//! lock (refusing while a backup runs: both rearrange the same block graph)
//! and its operation lock, but for the streams' copy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use qapi::qmp as q;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use stratus_common::VmId;

use super::cmdline::{DiskLaunch, DiskLayer};
use super::image::{self, run_qemu_img};
use super::layout::{read_json, remove_file_if_exists, write_json, VmPaths};
use super::qga::QgaConn;
use super::qmp::{execute, QmpService};
use super::{process, volume, Shared, VmEntry, QMP_TIMEOUT};
use crate::snapshot::{limit_error, name_taken};
use crate::{DriverError, ImageFormat, QemuSaid, SnapshotInfo, SnapshotRequest, MAX_SNAPSHOTS};

/// The base image's node name.
pub(super) const BASE_NODE: &str = "base0";
/// The node name of `disk.qcow2` (the disk's first layer; the only one of a
/// VM without snapshots).
const FIRST_NODE: &str = "disk0";
/// The disk's first layer: `vm_create` makes it.
const FIRST_FILE: &str = "disk.qcow2";
/// Prefix of the driver's own backup bitmaps (see [`crate::bitmap_name`]).
const BITMAP_PREFIX: &str = "stratus-backup-";
/// Prefix of the merge (block-stream) jobs' ids.
const MERGE_JOB_PREFIX: &str = "stratus-merge-";
/// How long to wait for a guest agent before snapshotting unfrozen.
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a freeze or thaw may take.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a merge job is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long the poll tolerates QMP being unreachable while QEMU lives.
const QMP_GONE_GRACE: Duration = Duration::from_secs(30);

/// One snapshot in `snapshots.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SnapshotRecord {
    pub snapshot_id: uuid::Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub quiesced: bool,
    /// The file (in the VM directory) holding the layer this snapshot froze.
    pub file: String,
    /// Bytes allocated in its layers when last measured (reported when they
    /// cannot be measured again).
    pub bytes: u64,
    /// The layer it froze in each volume attached when it was taken (none
    /// in records from before snapshots covered volumes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeLayer>,
}

/// The layer a snapshot froze in one volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct VolumeLayer {
    pub volume_id: uuid::Uuid,
    /// The file, in the host's volume directory.
    pub file: String,
}

/// `snapshots.json`: the layers of every disk of the VM, bottom to top.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Chain {
    /// The file (in the VM directory) the VM writes to.
    pub active: String,
    /// Oldest first. `snapshots[0].file` is backed by the base image (or
    /// nothing), each next one by the previous one, `active` by the last.
    /// A volume's layers are the ones the snapshots that cover it froze, in
    /// the same order.
    pub snapshots: Vec<SnapshotRecord>,
    /// The active layer of each attached volume whose active layer is not
    /// its own file `<volume-id>.qcow2` (it has been snapshotted); a volume
    /// missing here writes to its own file.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volumes: BTreeMap<uuid::Uuid, String>,
}

impl Default for Chain {
    fn default() -> Self {
        Chain {
            active: FIRST_FILE.into(),
            snapshots: Vec::new(),
            volumes: BTreeMap::new(),
        }
    }
}

/// One of the VM's disks: its own, or an attached data volume. Each has a
/// chain of layers recorded in the VM's `snapshots.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Disk {
    /// The VM's own disk (`disk*.qcow2` in its disk directory).
    Vm,
    /// A volume (`<volume-id>*.qcow2` in the host's volume directory).
    Volume(uuid::Uuid),
}

impl std::fmt::Display for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Disk::Vm => f.write_str("the VM's disk"),
            Disk::Volume(v) => write!(f, "volume {v}"),
        }
    }
}

impl Disk {
    /// The node name of one of its layer files.
    pub(super) fn node(self, file: &str) -> String {
        match self {
            Disk::Vm => node_name(file),
            Disk::Volume(v) => volume::layer_node(v, file),
        }
    }

    /// The file of the overlay snapshot (or revert) `id` puts on top.
    fn overlay(self, id: uuid::Uuid) -> String {
        match self {
            Disk::Vm => overlay_file(id),
            Disk::Volume(v) => volume::overlay_file(v, id),
        }
    }

    /// The directory its layer files are in.
    fn dir(self, shared: &Shared, paths: &VmPaths) -> PathBuf {
        match self {
            Disk::Vm => paths.disks(),
            Disk::Volume(v) => volume::volume_dir(shared, v),
        }
    }

    /// Its merge (block-stream) job's id for snapshot `id`: stable, so a
    /// retry finds the job an interrupted attempt left.
    fn merge_job(self, id: uuid::Uuid) -> String {
        match self {
            Disk::Vm => merge_job_id(id),
            Disk::Volume(v) => format!("{}-{}", merge_job_id(id), crate::volume_serial(v)),
        }
    }
}

impl Chain {
    /// The VM disk's layer files, bottom to top (the active one last).
    fn files(&self) -> Vec<&str> {
        self.snapshots
            .iter()
            .map(|s| s.file.as_str())
            .chain(std::iter::once(self.active.as_str()))
            .collect()
    }

    fn position(&self, snapshot_id: uuid::Uuid) -> Option<usize> {
        self.snapshots
            .iter()
            .position(|s| s.snapshot_id == snapshot_id)
    }

    /// The file the disk writes to.
    pub(super) fn active_of(&self, disk: Disk) -> String {
        match disk {
            Disk::Vm => self.active.clone(),
            Disk::Volume(v) => self
                .volumes
                .get(&v)
                .cloned()
                .unwrap_or_else(|| volume::own_file(v)),
        }
    }

    pub(super) fn set_active(&mut self, disk: Disk, file: String) {
        match disk {
            Disk::Vm => self.active = file,
            Disk::Volume(v) if file == volume::own_file(v) => {
                self.volumes.remove(&v);
            }
            Disk::Volume(v) => {
                self.volumes.insert(v, file);
            }
        }
    }

    /// The file snapshot `k` froze in the disk; `None` if it does not cover it.
    fn frozen(&self, k: usize, disk: Disk) -> Option<&str> {
        let s = self.snapshots.get(k)?;
        match disk {
            Disk::Vm => Some(s.file.as_str()),
            Disk::Volume(v) => s
                .volumes
                .iter()
                .find(|l| l.volume_id == v)
                .map(|l| l.file.as_str()),
        }
    }

    /// The disks snapshot `k` covers: the VM's, then its volumes.
    fn disks_of(&self, k: usize) -> Vec<Disk> {
        std::iter::once(Disk::Vm)
            .chain(
                self.snapshots
                    .get(k)
                    .into_iter()
                    .flat_map(|s| s.volumes.iter().map(|l| Disk::Volume(l.volume_id))),
            )
            .collect()
    }

    /// The disk's layer files, bottom to top (the active one last).
    pub(super) fn files_of(&self, disk: Disk) -> Vec<String> {
        (0..self.snapshots.len())
            .filter_map(|k| self.frozen(k, disk).map(str::to_string))
            .chain(std::iter::once(self.active_of(disk)))
            .collect()
    }

    /// The layer above snapshot `k`'s in the disk: the next snapshot's that
    /// covers it, or the active one.
    fn above(&self, k: usize, disk: Disk) -> String {
        (k + 1..self.snapshots.len())
            .find_map(|j| self.frozen(j, disk).map(str::to_string))
            .unwrap_or_else(|| self.active_of(disk))
    }

    /// The layer below snapshot `k`'s in the disk: the previous snapshot's
    /// that covers it; `None`: `k`'s is the disk's bottom layer.
    fn below(&self, k: usize, disk: Disk) -> Option<String> {
        (0..k)
            .rev()
            .find_map(|j| self.frozen(j, disk).map(str::to_string))
    }

    /// The names of the snapshots that cover the volume.
    pub(super) fn covering(&self, volume_id: uuid::Uuid) -> Vec<String> {
        self.snapshots
            .iter()
            .filter(|s| s.volumes.iter().any(|l| l.volume_id == volume_id))
            .map(|s| s.name.clone())
            .collect()
    }
}

impl SnapshotRecord {
    fn info(&self, bytes: u64) -> SnapshotInfo {
        SnapshotInfo {
            snapshot_id: self.snapshot_id,
            name: self.name.clone(),
            created_at: self.created_at,
            quiesced: self.quiesced,
            bytes,
            volumes: self.volumes.iter().map(|l| l.volume_id).collect(),
        }
    }
}

/// The node name of a layer file. QEMU allows 31 characters, too few for a
/// UUID: a hash of the file name instead, stable across starts.
pub(super) fn node_name(file: &str) -> String {
    if file == FIRST_FILE {
        return FIRST_NODE.into();
    }
    let hex = format!("{:x}", Sha256::digest(file.as_bytes()));
    format!("layer-{}", &hex[..20])
}

/// The file name of the overlay a snapshot (or a revert) puts on top.
fn overlay_file(id: uuid::Uuid) -> String {
    format!("disk.{id}.qcow2")
}

/// The block job id of a snapshot's merge: stable, so a retry finds the job
/// an interrupted attempt left.
fn merge_job_id(snapshot_id: uuid::Uuid) -> String {
    format!("{MERGE_JOB_PREFIX}{snapshot_id}")
}

/// The VM's chain; the default (just `disk.qcow2`) when it has no record.
pub(super) fn read_chain(paths: &VmPaths) -> Result<Chain, DriverError> {
    Ok(read_json::<Chain>(&paths.snapshots_json(), "snapshot records")?.unwrap_or_default())
}

pub(super) fn write_chain(paths: &VmPaths, chain: &Chain) -> Result<(), DriverError> {
    write_json(&paths.snapshots_json(), "snapshot records", chain)
}

/// Removes layer files (`disk*.qcow2`) of the VM directory the chain does not
/// name: what a crash between recording a chain and deleting the files it
/// dropped left behind. Caller holds `vm.op`.
fn remove_orphans(paths: &VmPaths, chain: &Chain) {
    let keep = chain.files();
    let Ok(entries) = std::fs::read_dir(paths.disks()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("disk") && name.ends_with(".qcow2") && !keep.contains(&name) {
            tracing::info!(file = %entry.path().display(), "removing a disk layer no snapshot record names");
            if let Err(e) = remove_file_if_exists(&entry.path()) {
                tracing::warn!(error = %e, "cannot remove an unused disk layer");
            }
        }
    }
}

/// Removes the layer files of the volumes the chain no longer names (see
/// [`volume::remove_layer_orphans`]). Caller holds `vm.op` and the volumes'
/// locks.
fn remove_volume_orphans(shared: &Shared, chain: &Chain, volumes: &[uuid::Uuid]) {
    for v in volumes {
        volume::remove_layer_orphans(shared, *v, &chain.files_of(Disk::Volume(*v)));
    }
}

/// Makes `file` the VM disk's only layer, dropping every snapshot (a disk
/// restored in place from a backup). Refused while a snapshot covers a
/// volume: dropping it would strand the volume's layers. Caller holds
/// `vm.op`, the VM is stopped.
pub(super) fn replace_chain(id: VmId, paths: &VmPaths, file: &str) -> Result<(), DriverError> {
    let old = read_chain(paths)?;
    if let Some(s) = old.snapshots.iter().find(|s| !s.volumes.is_empty()) {
        return Err(DriverError::Conflict {
            id,
            difference: format!(
                "its snapshot {:?} covers data volumes too, and restoring the disk in place \
                 drops every snapshot; delete the snapshots that cover volumes first",
                s.name
            ),
        });
    }
    let chain = Chain {
        active: file.into(),
        snapshots: Vec::new(),
        volumes: old.volumes,
    };
    write_chain(paths, &chain)?;
    remove_orphans(paths, &chain);
    Ok(())
}

/// What the command line opens: the recorded chain, and the base image the
/// bottom layer's header names (if any; a restored disk has none).
pub(super) async fn launch_disk(
    qemu_img: &Path,
    id: VmId,
    paths: &VmPaths,
) -> Result<DiskLaunch, DriverError> {
    let chain = read_chain(paths)?;
    let files = chain.files();
    let mut layers = Vec::with_capacity(files.len());
    for (i, file) in files.iter().enumerate() {
        let path = paths.disks().join(file);
        if !path.is_file() {
            return Err(DriverError::InvalidState {
                id,
                operation: "start",
                state: format!(
                    "missing its disk layer {} (create the VM again or restore a backup)",
                    path.display()
                ),
            });
        }
        layers.push(DiskLayer {
            node: node_name(file),
            path,
            active: i + 1 == files.len(),
        });
    }
    let base = match layers.first() {
        Some(bottom) => backing_of(qemu_img, &bottom.path).await?,
        None => None,
    };
    Ok(DiskLaunch {
        base: base.map(|(path, format)| (BASE_NODE.to_string(), path, format)),
        layers,
    })
}

#[derive(Deserialize)]
struct ImgInfo {
    #[serde(rename = "full-backing-filename")]
    full_backing_filename: Option<String>,
    #[serde(rename = "backing-filename-format")]
    backing_filename_format: Option<String>,
    #[serde(rename = "format-specific")]
    format_specific: Option<FormatSpecific>,
}

#[derive(Deserialize)]
struct FormatSpecific {
    data: Option<FormatData>,
}

#[derive(Deserialize)]
struct FormatData {
    #[serde(default)]
    bitmaps: Vec<ImgBitmap>,
}

#[derive(Deserialize)]
struct ImgBitmap {
    name: String,
    #[serde(default)]
    flags: Vec<String>,
}

/// `qemu-img info` of one qcow2 file, its backing chain not opened (`-U`: it
/// may be open in QEMU).
async fn img_info(qemu_img: &Path, file: &Path) -> Result<ImgInfo, DriverError> {
    let context = format!("read the disk layer {}", file.display());
    let out = run_qemu_img(
        qemu_img,
        &[
            "info".as_ref(),
            "-U".as_ref(),
            "--output=json".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            file.as_os_str(),
        ],
        &context,
    )
    .await?;
    serde_json::from_slice(&out).map_err(|e| DriverError::qemu(format!("cannot {context}"), e))
}

/// The backing file a layer's header names, and its format.
pub(super) async fn backing_of(
    qemu_img: &Path,
    file: &Path,
) -> Result<Option<(PathBuf, String)>, DriverError> {
    // The header itself first (no qemu-img run: see `image`).
    if let Ok(header) = super::image::read_qcow2_header(file) {
        return Ok(header
            .backing
            .map(|(path, format)| (path, format.unwrap_or_else(|| "qcow2".to_string()))));
    }
    let info = img_info(qemu_img, file).await?;
    Ok(info.full_backing_filename.map(|b| {
        (
            PathBuf::from(b),
            info.backing_filename_format
                .unwrap_or_else(|| "qcow2".to_string()),
        )
    }))
}

/// The driver's backup bitmaps stored in a qcow2 file: name, in use
/// (inconsistent: QEMU did not close the file cleanly).
pub(super) async fn file_bitmaps(
    qemu_img: &Path,
    file: &Path,
) -> Result<Vec<(String, bool)>, DriverError> {
    let info = img_info(qemu_img, file).await?;
    Ok(info
        .format_specific
        .and_then(|f| f.data)
        .map(|d| d.bitmaps)
        .unwrap_or_default()
        .into_iter()
        .filter(|b| b.name.starts_with(BITMAP_PREFIX))
        .map(|b| {
            let in_use = b.flags.iter().any(|f| f == "in-use");
            (b.name, in_use)
        })
        .collect())
}

#[derive(Deserialize)]
struct MapEntry {
    length: u64,
    data: bool,
}

/// Bytes allocated in one layer (its backing chain not opened; `-U`: it may
/// be open in QEMU).
pub(super) async fn layer_bytes(qemu_img: &Path, file: &Path) -> Result<u64, DriverError> {
    let spec = super::backup::own_layer_spec(file)?;
    let context = format!("map the disk layer {}", file.display());
    let out = run_qemu_img(
        qemu_img,
        &[
            "map".as_ref(),
            "-U".as_ref(),
            "--output=json".as_ref(),
            spec.as_ref(),
        ],
        &context,
    )
    .await?;
    let entries: Vec<MapEntry> = serde_json::from_slice(&out)
        .map_err(|e| DriverError::qemu(format!("cannot {context}"), e))?;
    Ok(entries.iter().filter(|e| e.data).map(|e| e.length).sum())
}

/// `blockdev-add` options of a qcow2 file opened without its backing chain.
/// `"backing": null` must be set on the typed options: serde reads a JSON
/// null into `None`, which leaves the option out, and QEMU then opens the
/// backing file the header names (failing on a file QEMU has open
/// read-write: "Failed to get shared \"write\" lock").
pub(super) fn qcow2_without_backing(
    node: &str,
    filename: &str,
    discard: bool,
) -> Result<q::BlockdevOptions, DriverError> {
    let mut value = json!({
        "driver": "qcow2",
        "node-name": node,
        "file": { "driver": "file", "filename": filename },
    });
    if discard {
        value["discard"] = json!("unmap");
    }
    let mut options: q::BlockdevOptions = serde_json::from_value(value)
        .map_err(|e| DriverError::qemu("cannot build the blockdev-add options", e))?;
    if let q::BlockdevOptions::qcow2 { qcow2, .. } = &mut options {
        qcow2.base.backing = Some(q::BlockdevRefOrNull::null(()));
    }
    Ok(options)
}

/// The VM's disk as `query-block` reports it: the device's inserted medium,
/// whose node is the active layer (or a filter a block job put on top).
pub(super) async fn disk_device(qmp: &QmpService) -> Result<q::BlockDeviceInfo, DriverError> {
    let blocks = execute(qmp, q::query_block {}, QMP_TIMEOUT, "find the disk").await?;
    let mut inserted: Vec<(Option<String>, q::BlockDeviceInfo)> = blocks
        .into_iter()
        .filter_map(|b| b.inserted.map(|i| (b.qdev, i)))
        .collect();
    if let Some(i) = inserted
        .iter()
        .position(|(qdev, _)| qdev.as_deref().is_some_and(|q| q.contains("disk0-dev")))
    {
        return Ok(inserted.swap_remove(i).1);
    }
    if inserted.len() == 1 {
        if let Some((_, info)) = inserted.pop() {
            return Ok(info);
        }
    }
    Err(DriverError::qemu(
        "QMP query-block does not list the VM's disk",
        QemuSaid(format!(
            "{} block devices with a medium, none is disk0-dev",
            inserted.len()
        )),
    ))
}

/// The node name of the disk's active layer: after a snapshot it is no
/// longer `disk0`, so everything that addresses the disk asks here.
pub(crate) async fn active_node(qmp: &QmpService) -> Result<String, DriverError> {
    disk_device(qmp).await?.node_name.ok_or_else(|| {
        DriverError::qemu(
            "QMP query-block lists the VM's disk without a node name",
            QemuSaid(String::new()),
        )
    })
}

/// A named block node and its dirty bitmaps (name, inconsistent).
pub(super) struct BlockNode {
    pub name: String,
    pub file: String,
    pub drv: String,
    pub bitmaps: Vec<(String, bool)>,
}

/// Every named block node (layers, their file nodes, backup targets).
pub(super) async fn block_nodes(qmp: &QmpService) -> Result<Vec<BlockNode>, DriverError> {
    let nodes = execute(
        qmp,
        q::query_named_block_nodes { flat: Some(true) },
        QMP_TIMEOUT,
        "list the disk layers",
    )
    .await?;
    Ok(nodes
        .into_iter()
        .filter_map(|n| {
            Some(BlockNode {
                name: n.node_name?,
                file: n.file,
                drv: n.drv,
                bitmaps: n
                    .dirty_bitmaps
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|b| Some((b.name?, b.inconsistent.unwrap_or(false))))
                    .collect(),
            })
        })
        .collect())
}

/// The node of a layer: by the name this driver gives it, else (a chain a
/// QEMU started by an older driver opened by itself) the format node of the
/// file.
fn find_node<'a>(nodes: &'a [BlockNode], name: &str, path: &Path) -> Option<&'a BlockNode> {
    nodes.iter().find(|n| n.name == name).or_else(|| {
        nodes
            .iter()
            .find(|n| n.drv != "file" && Path::new(&n.file) == path)
    })
}

fn not_found(id: VmId, snapshot_id: uuid::Uuid) -> DriverError {
    DriverError::SnapshotNotFound { id, snapshot_id }
}

/// Takes the VM's backup lock (refusing while a backup runs) and operation
/// lock, and finds whether QEMU runs: `Some(pid)`.
async fn lock_vm<'a>(
    shared: &Arc<Shared>,
    vm: &'a Arc<VmEntry>,
    operation: &'static str,
) -> Result<
    (
        tokio::sync::MutexGuard<'a, ()>,
        tokio::sync::MutexGuard<'a, ()>,
        Option<u32>,
    ),
    DriverError,
> {
    let backup = vm
        .backup
        .try_lock()
        .map_err(|_| DriverError::InvalidState {
            id: vm.id,
            operation,
            state: "being backed up (try again when the backup is done)".into(),
        })?;
    let op = vm.op.lock().await;
    super::cold::refuse_if_exported(vm, operation)?;
    let pid = shared.ensure_adopted(vm)?;
    if pid.is_none() {
        shared.reconcile_dead(vm)?;
        let strays = process::find_qemu_of(vm.id);
        if !strays.is_empty() {
            return Err(DriverError::InvalidState {
                id: vm.id,
                operation,
                state: format!("running in QEMU pid {strays:?} that has no pidfile"),
            });
        }
    }
    Ok((backup, op, pid))
}
/// The block device of one of the VM's disks as `query-block` reports it;
/// its node is the disk's active layer. A volume recorded as attached but
/// not plugged into the running QEMU (a hot-plug that failed on a retry)
/// is an error: its layers cannot be switched.
pub(super) async fn disk_block(
    qmp: &QmpService,
    id: VmId,
    disk: Disk,
) -> Result<q::BlockDeviceInfo, DriverError> {
    let Disk::Volume(v) = disk else {
        return disk_device(qmp).await;
    };
    let device = volume::device_id(v);
    let blocks = execute(qmp, q::query_block {}, QMP_TIMEOUT, "find a volume").await?;
    blocks
        .into_iter()
        .find(|b| b.qdev.as_deref().is_some_and(|q| q.contains(&device)))
        .and_then(|b| b.inserted)
        .ok_or_else(|| {
            DriverError::qemu(
                format!("volume {v} is attached to VM {id} but not plugged into its QEMU"),
                QemuSaid("attach the volume again, or stop and start the VM".into()),
            )
        })
}

/// One disk's part in taking a snapshot: the layer it freezes and the new
/// overlay that goes on top.
struct Step {
    disk: Disk,
    dir: PathBuf,
    frozen: String,
    new: String,
}

impl Step {
    fn frozen_path(&self) -> PathBuf {
        self.dir.join(&self.frozen)
    }

    fn new_path(&self) -> PathBuf {
        self.dir.join(&self.new)
    }
}

/// Takes snapshot `req` of VM `id`: of its disk and of every volume attached
/// now, in one operation. See the module docs.
pub(super) async fn create(
    shared: &Arc<Shared>,
    id: VmId,
    req: &SnapshotRequest,
) -> Result<SnapshotInfo, DriverError> {
    let vm = shared.existing(id)?;
    let (attached, _volume_locks) = volume::lock_attached(shared, &vm).await?;
    let (_backup, _op, pid) = lock_vm(shared, &vm, "snapshot").await?;
    let mut chain = read_chain(&vm.paths)?;
    if let Some(k) = chain.position(req.snapshot_id) {
        if pid.is_some() {
            // An earlier attempt recorded the snapshot; make sure QEMU was
            // switched to the new layers too (it may have died in between).
            let qmp = shared.qmp(&vm).await?;
            finish_switch(shared, &vm, &qmp, &chain, k).await?;
        }
        let rec = &chain.snapshots[k];
        return Ok(rec.info(rec.bytes));
    }
    req.validate(id)?;
    if let Some(taken) = chain.snapshots.iter().find(|s| s.name == req.name) {
        return Err(name_taken(id, &req.name, taken.snapshot_id));
    }
    if chain.snapshots.len() >= MAX_SNAPSHOTS {
        return Err(limit_error(id));
    }
    volume::refuse_pool_volumes(shared, id, &attached)?;
    let started = Instant::now();
    let steps: Vec<Step> = std::iter::once(Disk::Vm)
        .chain(attached.iter().map(|v| Disk::Volume(*v)))
        .map(|disk| Step {
            disk,
            dir: disk.dir(shared, &vm.paths),
            frozen: chain.active_of(disk),
            new: disk.overlay(req.snapshot_id),
        })
        .collect();
    for step in &steps {
        if !step.frozen_path().is_file() {
            return Err(DriverError::InvalidState {
                id,
                operation: "snapshot",
                state: format!(
                    "missing the layer {} of {}",
                    step.frozen_path().display(),
                    step.disk
                ),
            });
        }
        remove_file_if_exists(&step.new_path())?;
    }
    let mut record = SnapshotRecord {
        snapshot_id: req.snapshot_id,
        name: req.name.clone(),
        created_at: Utc::now(),
        quiesced: false,
        file: chain.active.clone(),
        bytes: 0,
        volumes: steps
            .iter()
            .filter_map(|s| match s.disk {
                Disk::Volume(volume_id) => Some(VolumeLayer {
                    volume_id,
                    file: s.frozen.clone(),
                }),
                Disk::Vm => None,
            })
            .collect(),
    };
    let qemu_img = &shared.config.qemu_img;
    match pid {
        Some(_) => {
            let qmp = shared.qmp(&vm).await?;
            record.quiesced =
                switch_live(shared, &vm, &qmp, &mut chain, record.clone(), &steps).await?;
        }
        None => {
            let created = async {
                for step in &steps {
                    create_overlay(qemu_img, &step.frozen_path(), &step.new_path(), None).await?;
                    copy_bitmaps_offline(qemu_img, &step.frozen_path(), &step.new_path()).await?;
                }
                Ok::<_, DriverError>(())
            }
            .await;
            let old_chain = chain.clone();
            chain.snapshots.push(record.clone());
            for step in &steps {
                chain.set_active(step.disk, step.new.clone());
            }
            if let Err(e) = created.and_then(|()| write_chain(&vm.paths, &chain)) {
                for step in &steps {
                    let _ = remove_file_if_exists(&step.new_path());
                }
                let _ = write_chain(&vm.paths, &old_chain);
                return Err(e);
            }
        }
    }
    let mut bytes = 0;
    for step in &steps {
        match layer_bytes(qemu_img, &step.frozen_path()).await {
            Ok(b) => bytes += b,
            Err(e) => {
                tracing::warn!(vm = %id, disk = %step.disk, error = %e, "cannot measure a frozen layer")
            }
        }
    }
    record.bytes = bytes;
    if let Some(last) = chain.snapshots.last_mut() {
        *last = record.clone();
    }
    write_chain(&vm.paths, &chain)?;
    remove_orphans(&vm.paths, &chain);
    remove_volume_orphans(shared, &chain, &attached);
    tracing::info!(
        vm = %id,
        snapshot = %req.snapshot_id,
        name = %req.name,
        live = pid.is_some(),
        quiesced = record.quiesced,
        volumes = attached.len(),
        bytes = record.bytes,
        ms = started.elapsed().as_millis() as u64,
        "snapshot taken"
    );
    Ok(record.info(record.bytes))
}

/// `qemu-img bitmap --add` to `new` of the backup bitmaps `frozen` holds,
/// so change tracking goes on in the new layer (the offline counterpart of
/// the bitmap adds in the live switch).
async fn copy_bitmaps_offline(
    qemu_img: &Path,
    frozen: &Path,
    new: &Path,
) -> Result<(), DriverError> {
    for (name, _) in file_bitmaps(qemu_img, frozen).await? {
        run_qemu_img(
            qemu_img,
            &[
                "bitmap".as_ref(),
                "--add".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                new.as_os_str(),
                name.as_ref(),
            ],
            &format!("add the backup bitmap {name} to the new disk layer"),
        )
        .await?;
    }
    Ok(())
}

/// `qemu-img create` of an overlay backed by `backing` (qcow2). With `size`,
/// in unsafe mode (`-u`): the backing file is not opened, as it must not be
/// while QEMU has it open read-write.
async fn create_overlay(
    qemu_img: &Path,
    backing: &Path,
    overlay: &Path,
    size: Option<u64>,
) -> Result<(), DriverError> {
    let size = size.map(|s| s.to_string());
    let mut args: Vec<&std::ffi::OsStr> = vec!["create".as_ref(), "-q".as_ref()];
    if size.is_some() {
        args.push("-u".as_ref());
    }
    args.extend::<[&std::ffi::OsStr; 7]>([
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-F".as_ref(),
        "qcow2".as_ref(),
        "-b".as_ref(),
        backing.as_os_str(),
        overlay.as_os_str(),
    ]);
    if let Some(size) = &size {
        args.push(size.as_ref());
    }
    run_qemu_img(
        qemu_img,
        &args,
        &format!("create the disk layer {}", overlay.display()),
    )
    .await?;
    Ok(())
}

/// One disk's switch in the snapshot's transaction: the overlay node goes
/// on top of the active node, and the backup bitmaps carry over.
struct Switch {
    disk: Disk,
    old_node: String,
    new_node: String,
    new_path: PathBuf,
    bitmaps: Vec<String>,
    /// The overlay node was added by this call (removed again on failure).
    added: bool,
}

/// The `stratus-backup-*` bitmaps of a block device.
fn backup_bitmaps(device: &q::BlockDeviceInfo) -> Vec<String> {
    device
        .dirty_bitmaps
        .iter()
        .flatten()
        .filter_map(|b| b.name.clone())
        .filter(|n| n.starts_with(BITMAP_PREFIX))
        .collect()
}

/// Takes back what [`prepare_switch`] did for the switches that never
/// happened: their nodes and overlay files.
async fn undo_switches(qmp: &QmpService, id: VmId, switches: &[Switch]) {
    for s in switches {
        if s.added {
            drop_node(qmp, id, &s.new_node).await;
        }
        let _ = remove_file_if_exists(&s.new_path);
    }
}

/// Creates each disk's overlay and adds it to QEMU without a backing file
/// (`blockdev-snapshot` attaches the active node as its backing). On
/// failure, whatever was made is removed again.
async fn prepare_switch(
    shared: &Arc<Shared>,
    vm: &VmEntry,
    qmp: &QmpService,
    steps: &[Step],
) -> Result<Vec<Switch>, DriverError> {
    let id = vm.id;
    let mut switches = Vec::with_capacity(steps.len());
    for step in steps {
        let made = async {
            let device = disk_block(qmp, id, step.disk).await?;
            let old_node = device.node_name.clone().unwrap_or_default();
            let expected = step.disk.node(&step.frozen);
            if old_node != expected {
                return Err(DriverError::qemu(
                    format!(
                        "QEMU's active layer of {} of VM {id} is not the recorded one ({})",
                        step.disk, step.frozen
                    ),
                    QemuSaid(format!(
                        "active node {old_node}, expected {expected}; stop and start the VM to \
                         reopen the recorded chain"
                    )),
                ));
            }
            let size = u64::try_from(device.image.base.virtual_size).map_err(|e| {
                DriverError::qemu("QMP query-block reports a negative disk size", e)
            })?;
            let new_path = step.new_path();
            let new_path_str = utf8(&new_path)?;
            create_overlay(
                &shared.config.qemu_img,
                &step.frozen_path(),
                &new_path,
                Some(size),
            )
            .await?;
            let new_node = step.disk.node(&step.new);
            let options = qcow2_without_backing(&new_node, new_path_str, true)?;
            if let Err(e) = execute(qmp, q::blockdev_add(options), QMP_TIMEOUT, "snapshot").await {
                let _ = remove_file_if_exists(&new_path);
                return Err(e);
            }
            Ok(Switch {
                disk: step.disk,
                old_node,
                new_node,
                new_path,
                bitmaps: backup_bitmaps(&device),
                added: true,
            })
        }
        .await;
        match made {
            Ok(s) => switches.push(s),
            Err(e) => {
                undo_switches(qmp, id, &switches).await;
                return Err(e);
            }
        }
    }
    Ok(switches)
}

/// Freezes the guest, switches every disk in one QMP `transaction`, thaws.
/// Returns whether the guest was frozen.
async fn run_switch(
    vm: &VmEntry,
    qmp: &QmpService,
    switches: &[Switch],
) -> Result<bool, DriverError> {
    let mut actions = Vec::new();
    for s in switches {
        actions.push(q::TransactionAction::blockdev_snapshot(
            q::BlockdevSnapshot {
                node: s.old_node.clone(),
                overlay: s.new_node.clone(),
            }
            .into(),
        ));
        for name in &s.bitmaps {
            actions.push(q::TransactionAction::block_dirty_bitmap_add(
                q::BlockDirtyBitmapAdd {
                    node: s.new_node.clone(),
                    name: name.clone(),
                    persistent: Some(true),
                    disabled: None,
                    granularity: None,
                }
                .into(),
            ));
        }
    }
    let freeze = Freeze::begin(vm).await;
    let switched = execute(
        qmp,
        q::transaction {
            actions,
            properties: None,
        },
        QMP_TIMEOUT,
        "snapshot",
    )
    .await;
    let quiesced = freeze.end(vm.id).await;
    switched?;
    for s in switches {
        tracing::debug!(vm = %vm.id, disk = %s.disk, from = %s.old_node, to = %s.new_node, bitmaps = s.bitmaps.len(), "active layer switched");
    }
    Ok(quiesced)
}

/// The live part of a snapshot: new overlays, recorded chain, freeze, one
/// switch of every disk, thaw. Returns whether the guest was frozen. On
/// failure the chain record and QEMU are as before. Caller holds `vm.op`.
async fn switch_live(
    shared: &Arc<Shared>,
    vm: &Arc<VmEntry>,
    qmp: &QmpService,
    chain: &mut Chain,
    record: SnapshotRecord,
    steps: &[Step],
) -> Result<bool, DriverError> {
    let id = vm.id;
    let switches = prepare_switch(shared, vm, qmp, steps).await?;
    let old_chain = chain.clone();
    chain.snapshots.push(record);
    for step in steps {
        chain.set_active(step.disk, step.new.clone());
    }
    // Recorded before the switch: see the module docs.
    if let Err(e) = write_chain(&vm.paths, chain) {
        *chain = old_chain;
        undo_switches(qmp, id, &switches).await;
        return Err(e);
    }
    match run_switch(vm, qmp, &switches).await {
        Ok(quiesced) => Ok(quiesced),
        Err(e) => {
            *chain = old_chain;
            undo_switches(qmp, id, &switches).await;
            write_chain(&vm.paths, chain)?;
            Err(e)
        }
    }
}

/// Completes the switch of a snapshot recorded by an attempt that did not
/// get to run it (the agent died between recording and switching): each
/// disk QEMU still writes to the layer the record says is frozen is
/// switched now, frozen again if the guest agent answers. Caller holds
/// `vm.op`.
async fn finish_switch(
    shared: &Arc<Shared>,
    vm: &VmEntry,
    qmp: &QmpService,
    chain: &Chain,
    k: usize,
) -> Result<(), DriverError> {
    let id = vm.id;
    let mut pending = Vec::new();
    for disk in chain.disks_of(k) {
        let Some(frozen) = chain.frozen(k, disk) else {
            continue;
        };
        let device = disk_block(qmp, id, disk).await?;
        let node = device.node_name.clone().unwrap_or_default();
        if node != disk.node(frozen) {
            continue;
        }
        let above = chain.above(k, disk);
        if above != chain.active_of(disk) {
            return Err(DriverError::qemu(
                format!(
                    "QEMU of VM {id} still writes to a layer of {disk} that a later snapshot's record shows frozen"
                ),
                QemuSaid("stop and start the VM to reopen the recorded chain".into()),
            ));
        }
        let new_path = disk.dir(shared, &vm.paths).join(&above);
        let new_node = disk.node(&above);
        let nodes = block_nodes(qmp).await?;
        let added = if nodes.iter().any(|n| n.name == new_node) {
            false
        } else {
            if !new_path.is_file() {
                let size = u64::try_from(device.image.base.virtual_size).map_err(|e| {
                    DriverError::qemu("QMP query-block reports a negative disk size", e)
                })?;
                create_overlay(
                    &shared.config.qemu_img,
                    &disk.dir(shared, &vm.paths).join(frozen),
                    &new_path,
                    Some(size),
                )
                .await?;
            }
            let options = qcow2_without_backing(&new_node, utf8(&new_path)?, true)?;
            execute(qmp, q::blockdev_add(options), QMP_TIMEOUT, "snapshot").await?;
            true
        };
        pending.push(Switch {
            disk,
            old_node: node,
            new_node,
            new_path,
            bitmaps: backup_bitmaps(&device),
            added,
        });
    }
    if pending.is_empty() {
        return Ok(());
    }
    tracing::info!(vm = %id, disks = pending.len(), "finishing the switch of a snapshot an earlier attempt recorded");
    if let Err(e) = run_switch(vm, qmp, &pending).await {
        // The record stays: the next attempt tries again. Only the nodes go.
        for s in pending.iter().filter(|s| s.added) {
            drop_node(qmp, id, &s.new_node).await;
        }
        return Err(e);
    }
    Ok(())
}

/// The path as QMP needs it.
fn utf8(path: &Path) -> Result<&str, DriverError> {
    path.to_str().ok_or_else(|| {
        DriverError::io(
            "the disk layer path is not UTF-8",
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not UTF-8"),
        )
    })
}

/// Removes a block node the driver added, best effort.
async fn drop_node(qmp: &QmpService, id: VmId, node: &str) {
    let deleted = execute(
        qmp,
        q::blockdev_del {
            node_name: node.to_string(),
        },
        QMP_TIMEOUT,
        "snapshot",
    )
    .await;
    if let Err(e) = deleted {
        tracing::warn!(vm = %id, %node, error = %e, "cannot remove an unused block node");
    }
}

/// The guest's file systems frozen through its agent for the time of a
/// snapshot's switch (or a backup's start, `backup.rs`), holding the VM's guest agent lock so no other client talks to
/// the agent meanwhile.
pub(super) struct Freeze<'a> {
    _agent: tokio::sync::MutexGuard<'a, ()>,
    conn: Option<QgaConn>,
    frozen: bool,
    path: PathBuf,
}

impl<'a> Freeze<'a> {
    /// Freezes if the agent answers; a snapshot without it is still
    /// crash-consistent, so failing to freeze is a warning, not an error.
    pub(super) async fn begin(vm: &'a VmEntry) -> Freeze<'a> {
        let agent = vm.qga.lock().await;
        let path = vm.paths.qga_sock.clone();
        let conn = match QgaConn::connect(&path, AGENT_CONNECT_TIMEOUT).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(vm = %vm.id, error = %e, "guest agent not answering: disks captured (snapshot or backup) without freezing the guest's file systems (crash-consistent only)");
                return Freeze {
                    _agent: agent,
                    conn: None,
                    frozen: false,
                    path,
                };
            }
        };
        let frozen = match conn
            .run(qapi::qga::guest_fsfreeze_freeze {}, FREEZE_TIMEOUT)
            .await
        {
            Ok(n) => {
                tracing::debug!(vm = %vm.id, file_systems = n, "guest file systems frozen");
                true
            }
            Err(e) => {
                tracing::warn!(vm = %vm.id, error = %e, "guest file systems not frozen: disks captured (snapshot or backup) unfrozen (crash-consistent only)");
                false
            }
        };
        Freeze {
            _agent: agent,
            conn: Some(conn),
            frozen,
            path,
        }
    }

    /// Thaws, always (a failed or timed-out freeze may have frozen some file
    /// systems), retrying with a new connection; returns whether the freeze
    /// had succeeded.
    pub(super) async fn end(mut self, id: VmId) -> bool {
        let Some(mut conn) = self.conn.take() else {
            return false;
        };
        for attempt in 1..=3 {
            match conn
                .run(qapi::qga::guest_fsfreeze_thaw {}, FREEZE_TIMEOUT)
                .await
            {
                Ok(_) => return self.frozen,
                Err(e) => {
                    tracing::warn!(vm = %id, attempt, error = %e, "cannot thaw the guest's file systems; retrying");
                    match QgaConn::connect(&self.path, FREEZE_TIMEOUT).await {
                        Ok(c) => conn = c,
                        Err(e) => {
                            tracing::warn!(vm = %id, error = %e, "guest agent not answering");
                        }
                    }
                }
            }
        }
        tracing::error!(vm = %id, "the guest's file systems may still be frozen: thaw failed three times (guest-fsfreeze-thaw through the guest agent)");
        self.frozen
    }
}

/// The VM's snapshots, oldest first, each one's layers measured now.
pub(super) async fn list(shared: &Arc<Shared>, id: VmId) -> Result<Vec<SnapshotInfo>, DriverError> {
    let vm = shared.existing(id)?;
    let chain = read_chain(&vm.paths)?;
    let mut out = Vec::with_capacity(chain.snapshots.len());
    for (k, rec) in chain.snapshots.iter().enumerate() {
        let mut bytes = Some(0);
        for disk in chain.disks_of(k) {
            let Some(file) = chain.frozen(k, disk) else {
                continue;
            };
            let path = disk.dir(shared, &vm.paths).join(file);
            match layer_bytes(&shared.config.qemu_img, &path).await {
                Ok(b) => bytes = bytes.map(|sum| sum + b),
                Err(e) => {
                    tracing::debug!(vm = %id, %disk, error = %e, "cannot measure a snapshot's layer; reporting the last measure");
                    bytes = None;
                }
            }
        }
        out.push(rec.info(bytes.unwrap_or(rec.bytes)));
    }
    Ok(out)
}

/// Reverts the stopped VM `id` to a snapshot: every disk it covers gets a
/// fresh layer on top of the one it froze; a volume attached after it keeps
/// its content (its layers from the dropped snapshots are flattened into
/// its active one). See the module docs.
pub(super) async fn revert(
    shared: &Arc<Shared>,
    id: VmId,
    snapshot_id: uuid::Uuid,
) -> Result<Vec<uuid::Uuid>, DriverError> {
    let vm = shared.existing(id)?;
    let (attached, _volume_locks) = volume::lock_attached(shared, &vm).await?;
    let (_backup, _op, pid) = lock_vm(shared, &vm, "revert to a snapshot").await?;
    if pid.is_some() {
        return Err(DriverError::InvalidState {
            id,
            operation: "revert to a snapshot",
            state: shared.read_record(&vm)?.state.to_string(),
        });
    }
    let chain = read_chain(&vm.paths)?;
    let k = chain
        .position(snapshot_id)
        .ok_or_else(|| not_found(id, snapshot_id))?;
    let qemu_img = &shared.config.qemu_img;
    let revert_id = uuid::Uuid::new_v4();
    let mut next = chain.clone();
    next.snapshots.truncate(k + 1);
    let mut made: Vec<PathBuf> = Vec::new();
    let prepared = async {
        for disk in chain.disks_of(k) {
            if let Disk::Volume(v) = disk {
                if !attached.contains(&v) {
                    tracing::warn!(vm = %id, volume = %v, "a snapshot covers a volume no longer attached; leaving the volume alone");
                    continue;
                }
            }
            let Some(frozen) = chain.frozen(k, disk) else {
                continue;
            };
            let dir = disk.dir(shared, &vm.paths);
            let new_file = disk.overlay(revert_id);
            let new_path = dir.join(&new_file);
            // A volume keeps the size it has now: volumes only grow, and
            // the controller records the size the operator asked for.
            let size = match disk {
                Disk::Vm => None,
                Disk::Volume(_) => Some(
                    image::virtual_size(
                        qemu_img,
                        &dir.join(chain.active_of(disk)),
                        ImageFormat::Qcow2,
                    )
                    .await?,
                ),
            };
            made.push(new_path.clone());
            create_overlay(qemu_img, &dir.join(frozen), &new_path, size).await?;
            next.set_active(disk, new_file);
        }
        // Volumes the snapshot does not cover were attached after it: only
        // the dropped snapshots froze layers of theirs. Their data stays, in
        // their active layer alone.
        for v in &attached {
            let disk = Disk::Volume(*v);
            if chain.frozen(k, disk).is_some() {
                continue;
            }
            let files = chain.files_of(disk);
            if files.len() > 1 {
                flatten_offline(qemu_img, &disk.dir(shared, &vm.paths), &files).await?;
            }
        }
        write_chain(&vm.paths, &next)
    }
    .await;
    if let Err(e) = prepared {
        for p in &made {
            let _ = remove_file_if_exists(p);
        }
        return Err(e);
    }
    let dropped: Vec<uuid::Uuid> = chain.snapshots[k + 1..]
        .iter()
        .map(|s| s.snapshot_id)
        .collect();
    // The dropped layers and the old active layers.
    remove_orphans(&vm.paths, &next);
    remove_volume_orphans(shared, &next, &attached);
    tracing::info!(vm = %id, snapshot = %snapshot_id, dropped = dropped.len(), volumes = chain.snapshots[k].volumes.len(), "disks reverted to a snapshot");
    Ok(dropped)
}

/// Makes the top of `files` (a disk's layers, bottom to top, in `dir`) hold
/// everything the layers below it hold above the bottom's own backing file
/// (a volume's image; none for a blank one): `qemu-img rebase` in safe mode,
/// which copies what differs. The disk reads the same before and after;
/// only the layers below the top are no longer needed. VM stopped.
pub(super) async fn flatten_offline(
    qemu_img: &Path,
    dir: &Path,
    files: &[String],
) -> Result<(), DriverError> {
    let (Some(bottom), Some(top)) = (files.first(), files.last()) else {
        return Ok(());
    };
    if bottom == top {
        return Ok(());
    }
    let base = backing_of(qemu_img, &dir.join(bottom)).await?;
    let top_path = dir.join(top);
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "rebase".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
    ];
    match &base {
        Some((path, format)) => {
            args.extend::<[&std::ffi::OsStr; 4]>([
                "-b".as_ref(),
                path.as_os_str(),
                "-F".as_ref(),
                format.as_ref(),
            ]);
        }
        None => args.extend::<[&std::ffi::OsStr; 2]>(["-b".as_ref(), "".as_ref()]),
    }
    args.push(top_path.as_os_str());
    run_qemu_img(
        qemu_img,
        &args,
        &format!("flatten the layers below {}", top_path.display()),
    )
    .await?;
    Ok(())
}

/// One disk's part in deleting a snapshot: its layer, merged into the one
/// above, which is then backed by the one below.
struct Merge {
    disk: Disk,
    layer: String,
    layer_path: PathBuf,
    above: String,
    above_path: PathBuf,
    /// The file the disk writes to.
    active: String,
    /// Node name, path and format of the layer below: the previous
    /// snapshot's layer, or the base image the bottom layer's header names;
    /// `None` for a bottom layer without a backing file.
    below: Option<(String, PathBuf, String)>,
}

/// Deletes a snapshot, merging its layer into the one above in every disk
/// it covers. See the module docs.
pub(super) async fn delete(
    shared: &Arc<Shared>,
    id: VmId,
    snapshot_id: uuid::Uuid,
) -> Result<(), DriverError> {
    let vm = shared.existing(id)?;
    let (attached, _volume_locks) = volume::lock_attached(shared, &vm).await?;
    let (_backup, op, pid) = lock_vm(shared, &vm, "delete a snapshot of").await?;
    let chain = read_chain(&vm.paths)?;
    let k = chain
        .position(snapshot_id)
        .ok_or_else(|| not_found(id, snapshot_id))?;
    let started = Instant::now();
    let qemu_img = &shared.config.qemu_img;
    let mut merges = Vec::new();
    for disk in chain.disks_of(k) {
        let Some(layer) = chain.frozen(k, disk) else {
            continue;
        };
        let dir = disk.dir(shared, &vm.paths);
        let layer_path = dir.join(layer);
        let above = chain.above(k, disk);
        // The layer below: the previous snapshot's, or what the bottom
        // layer's header names (the base image; none for a restored disk or
        // a blank volume).
        let below = match chain.below(k, disk) {
            Some(file) => Some((disk.node(&file), dir.join(&file), "qcow2".to_string())),
            None => backing_of(qemu_img, &layer_path)
                .await?
                .map(|(path, format)| {
                    let name = match disk {
                        Disk::Vm => BASE_NODE.to_string(),
                        Disk::Volume(v) => volume::base_node(v),
                    };
                    (name, path, format)
                }),
        };
        merges.push(Merge {
            disk,
            layer: layer.to_string(),
            layer_path,
            above_path: dir.join(&above),
            above,
            active: chain.active_of(disk),
            below,
        });
    }
    match pid {
        Some(pid) => {
            let mut op = op;
            let mut merged_nodes = Vec::new();
            for m in &merges {
                if !process::is_qemu_of(pid, id) {
                    return Err(vm_gone_mid_merge(id));
                }
                let qmp = shared.qmp(&vm).await?;
                let job = m.disk.merge_job(snapshot_id);
                let layer_node = start_stream(&qmp, id, m, &job).await?;
                drop(op);
                let polled = poll_stream(shared, &vm, pid, &job).await;
                op = vm.op.lock().await;
                polled?;
                let qmp = shared.qmp(&vm).await?;
                execute(
                    &qmp,
                    q::job_dismiss { id: job.clone() },
                    QMP_TIMEOUT,
                    "merge",
                )
                .await?;
                merged_nodes.extend(layer_node);
            }
            let qmp = shared.qmp(&vm).await?;
            for node in merged_nodes {
                // A node the command line or blockdev-add opened stays open
                // until deleted; one QEMU opened itself went with the chain.
                if let Err(e) = execute(
                    &qmp,
                    q::blockdev_del {
                        node_name: node.clone(),
                    },
                    QMP_TIMEOUT,
                    "merge",
                )
                .await
                {
                    tracing::debug!(vm = %id, %node, error = %e, "merged layer's node not deleted");
                }
            }
            finish_delete(shared, &vm, snapshot_id, &merges, &attached)?;
            drop(op);
        }
        None => {
            for m in &merges {
                let active_path = m.above_path.with_file_name(&m.active);
                merge_bitmaps_offline(qemu_img, &m.layer_path, &active_path).await?;
                let (backing, format) = match &m.below {
                    Some((_, path, format)) => (path.as_os_str(), format.as_str()),
                    None => ("".as_ref(), "qcow2"),
                };
                let mut args: Vec<&std::ffi::OsStr> = vec![
                    "rebase".as_ref(),
                    "-q".as_ref(),
                    "-f".as_ref(),
                    "qcow2".as_ref(),
                    "-b".as_ref(),
                    backing,
                ];
                if m.below.is_some() {
                    args.extend::<[&std::ffi::OsStr; 2]>(["-F".as_ref(), format.as_ref()]);
                }
                args.push(m.above_path.as_os_str());
                run_qemu_img(
                    qemu_img,
                    &args,
                    &format!("merge the layer {} of {} into {}", m.layer, m.disk, m.above),
                )
                .await?;
            }
            finish_delete(shared, &vm, snapshot_id, &merges, &attached)?;
            drop(op);
        }
    }
    tracing::info!(
        vm = %id,
        snapshot = %snapshot_id,
        live = pid.is_some(),
        disks = merges.len(),
        ms = started.elapsed().as_millis() as u64,
        "snapshot deleted (layers merged)"
    );
    Ok(())
}

fn vm_gone_mid_merge(id: VmId) -> DriverError {
    DriverError::qemu(
        format!("the VM {id} stopped while a snapshot's layer was merged"),
        QemuSaid("the chain is intact; delete the snapshot again".into()),
    )
}

/// Drops the snapshot's record and then its layer files. Every layer above
/// one of them no longer needs it (the merges are done), so the record may
/// change only now, in one write: a delete interrupted before leaves the
/// snapshot recorded and every chain readable. Caller holds `vm.op`.
fn finish_delete(
    shared: &Shared,
    vm: &VmEntry,
    snapshot_id: uuid::Uuid,
    merges: &[Merge],
    attached: &[uuid::Uuid],
) -> Result<(), DriverError> {
    // Read again: the records may have changed while a stream ran without
    // the operation lock (not by snapshot operations: the backup lock is held).
    let mut chain = read_chain(&vm.paths)?;
    if let Some(k) = chain.position(snapshot_id) {
        chain.snapshots.remove(k);
    }
    write_chain(&vm.paths, &chain)?;
    for m in merges {
        remove_file_if_exists(&m.layer_path)?;
    }
    remove_orphans(&vm.paths, &chain);
    remove_volume_orphans(shared, &chain, attached);
    Ok(())
}

/// Merges the backup bitmaps of the layer to delete into the active node's
/// bitmaps of the same name (an inconsistent copy makes the active one
/// useless: it is removed, so the next backup is full), then starts the
/// stream on the layer above with the layer below as its base, named
/// explicitly. Returns the node of the layer to delete, when QEMU has one.
async fn start_stream(
    qmp: &QmpService,
    id: VmId,
    m: &Merge,
    job: &str,
) -> Result<Option<String>, DriverError> {
    let jobs = execute(qmp, q::query_jobs {}, QMP_TIMEOUT, "merge").await?;
    let nodes = block_nodes(qmp).await?;
    let layer_node = find_node(&nodes, &m.disk.node(&m.layer), &m.layer_path);
    if jobs.iter().any(|j| j.id == job) {
        // An interrupted attempt's job: wait for it rather than start another.
        tracing::info!(vm = %id, %job, "resuming the wait for an earlier merge job");
        return Ok(layer_node.map(|n| n.name.clone()));
    }
    let missing = |what: &str| {
        DriverError::qemu(
            format!(
                "cannot find the {what} of {} in QEMU's block graph of VM {id}",
                m.disk
            ),
            QemuSaid("stop and start the VM, or delete the snapshot while it is stopped".into()),
        )
    };
    let active = disk_block(qmp, id, m.disk)
        .await?
        .node_name
        .ok_or_else(|| missing("active layer's node name"))?;
    let above_node = if m.above == m.active {
        active.clone()
    } else {
        find_node(&nodes, &m.disk.node(&m.above), &m.above_path)
            .ok_or_else(|| missing("layer above the snapshot's"))?
            .name
            .clone()
    };
    let below_node = match &m.below {
        Some((name, path, _)) => Some(
            find_node(&nodes, name, path)
                .ok_or_else(|| missing("layer below the snapshot's"))?
                .name
                .clone(),
        ),
        None => None,
    };
    if let (Some(layer_node), Some(active_node)) =
        (layer_node, nodes.iter().find(|n| n.name == active))
    {
        for (name, inconsistent) in layer_node
            .bitmaps
            .iter()
            .filter(|(n, _)| n.starts_with(BITMAP_PREFIX))
        {
            let Some((_, active_inconsistent)) =
                active_node.bitmaps.iter().find(|(n, _)| n == name)
            else {
                continue;
            };
            if *inconsistent {
                tracing::info!(vm = %id, bitmap = %name, "a merged layer's copy of a backup bitmap is inconsistent; removing the active one (next backup is full)");
                execute(
                    qmp,
                    q::block_dirty_bitmap_remove(q::BlockDirtyBitmap {
                        node: active.clone(),
                        name: name.clone(),
                    }),
                    QMP_TIMEOUT,
                    "merge",
                )
                .await?;
            } else if !active_inconsistent {
                execute(
                    qmp,
                    q::block_dirty_bitmap_merge(q::BlockDirtyBitmapMerge {
                        node: active.clone(),
                        target: name.clone(),
                        bitmaps: vec![q::BlockDirtyBitmapOrStr::external(q::BlockDirtyBitmap {
                            node: layer_node.name.clone(),
                            name: name.clone(),
                        })],
                    }),
                    QMP_TIMEOUT,
                    "merge",
                )
                .await?;
            }
        }
    }
    let backing_file = match &m.below {
        Some((_, path, _)) => Some(utf8(path)?.to_string()),
        None => None,
    };
    tracing::debug!(vm = %id, disk = %m.disk, device = %above_node, base = ?below_node, "starting the merge stream");
    execute(
        qmp,
        q::block_stream {
            auto_dismiss: Some(false),
            auto_finalize: Some(true),
            backing_file,
            backing_mask_protocol: None,
            // Never omitted when there is a base: see the module docs.
            base_node: below_node,
            base: None,
            bottom: None,
            filter_node_name: None,
            job_id: Some(job.to_string()),
            on_error: None,
            speed: None,
            device: above_node,
        },
        QMP_TIMEOUT,
        "merge",
    )
    .await?;
    Ok(layer_node.map(|n| n.name.clone()))
}

/// Polls the merge job until it concludes, without the operation lock.
async fn poll_stream(
    shared: &Arc<Shared>,
    vm: &Arc<VmEntry>,
    pid: u32,
    job: &str,
) -> Result<(), DriverError> {
    let id = vm.id;
    let gone = || {
        DriverError::qemu(
            format!("the VM {id} stopped while a snapshot's layer was merged"),
            QemuSaid("the chain is intact; delete the snapshot again".into()),
        )
    };
    let mut unreachable_since: Option<Instant> = None;
    loop {
        if !process::is_qemu_of(pid, id) {
            return Err(gone());
        }
        let asked = async {
            let qmp = shared.qmp(vm).await?;
            execute(&qmp, q::query_jobs {}, QMP_TIMEOUT, "merge").await
        }
        .await;
        let jobs = match asked {
            Ok(jobs) => {
                unreachable_since = None;
                jobs
            }
            Err(e) => {
                if !process::is_qemu_of(pid, id) {
                    return Err(gone());
                }
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > QMP_GONE_GRACE {
                    return Err(e);
                }
                tokio::time::sleep(POLL_INTERVAL).await;
                continue;
            }
        };
        let Some(info) = jobs.into_iter().find(|j| j.id == job) else {
            return Err(DriverError::qemu(
                format!("the merge job of VM {id} disappeared before it ended"),
                QemuSaid(job.to_string()),
            ));
        };
        if info.status == q::JobStatus::concluded {
            return match info.error {
                None => Ok(()),
                Some(error) => {
                    if let Ok(qmp) = shared.qmp(vm).await {
                        let _ = execute(
                            &qmp,
                            q::job_dismiss { id: job.into() },
                            QMP_TIMEOUT,
                            "merge",
                        )
                        .await;
                    }
                    Err(DriverError::qemu(
                        format!("merging a snapshot's layer of VM {id} failed"),
                        QemuSaid(error),
                    ))
                }
            };
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The stopped counterpart of the live bitmap merge: `qemu-img bitmap
/// --merge` of the deleted layer's backup bitmaps into the active file's.
async fn merge_bitmaps_offline(
    qemu_img: &Path,
    layer: &Path,
    active: &Path,
) -> Result<(), DriverError> {
    let theirs = file_bitmaps(qemu_img, layer).await?;
    if theirs.is_empty() {
        return Ok(());
    }
    let ours = file_bitmaps(qemu_img, active).await?;
    for (name, inconsistent) in theirs {
        let Some((_, active_inconsistent)) = ours.iter().find(|(n, _)| *n == name) else {
            continue;
        };
        let args: Vec<&std::ffi::OsStr> = if inconsistent {
            vec![
                "bitmap".as_ref(),
                "--remove".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                active.as_os_str(),
                name.as_ref(),
            ]
        } else if !active_inconsistent {
            vec![
                "bitmap".as_ref(),
                "--merge".as_ref(),
                name.as_ref(),
                "-b".as_ref(),
                layer.as_os_str(),
                "-F".as_ref(),
                "qcow2".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                active.as_os_str(),
                name.as_ref(),
            ]
        } else {
            continue;
        };
        run_qemu_img(
            qemu_img,
            &args,
            &format!("carry the backup bitmap {name} over to the active disk layer"),
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(file: &str) -> SnapshotRecord {
        SnapshotRecord {
            snapshot_id: uuid::Uuid::new_v4(),
            name: file.into(),
            created_at: Utc::now(),
            quiesced: false,
            file: file.into(),
            bytes: 0,
            volumes: Vec::new(),
        }
    }

    #[test]
    fn node_names_fit_qemu_and_are_stable() {
        assert_eq!(node_name("disk.qcow2"), "disk0");
        let f = overlay_file(uuid::Uuid::new_v4());
        let n = node_name(&f);
        assert!(n.len() <= 31, "{n}");
        assert_eq!(n, node_name(&f));
        assert_ne!(n, node_name(&overlay_file(uuid::Uuid::new_v4())));
        assert_ne!(n, BASE_NODE);
    }

    #[test]
    fn chain_records_round_trip_and_orphans_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = VmPaths::new(dir.path(), VmId::new());
        std::fs::create_dir_all(&paths.dir).expect("mkdir");
        assert_eq!(read_chain(&paths).expect("read"), Chain::default());
        let a = rec("disk.qcow2");
        let b = rec(&overlay_file(a.snapshot_id));
        let chain = Chain {
            active: overlay_file(b.snapshot_id),
            snapshots: vec![a.clone(), b.clone()],
            volumes: BTreeMap::new(),
        };
        write_chain(&paths, &chain).expect("write");
        assert_eq!(read_chain(&paths).expect("read"), chain);
        assert_eq!(
            chain.files(),
            vec![a.file.as_str(), b.file.as_str(), chain.active.as_str()]
        );
        assert_eq!(chain.above(0, Disk::Vm), b.file);
        assert_eq!(chain.above(1, Disk::Vm), chain.active);
        for f in chain.files() {
            std::fs::write(paths.disks().join(f), b"x").expect("write");
        }
        let orphan = paths.disks().join("disk.dropped.qcow2");
        std::fs::write(&orphan, b"x").expect("write");
        let tmp = paths.disks().join("disk.qcow2.tmp");
        std::fs::write(&tmp, b"x").expect("write");
        remove_orphans(&paths, &chain);
        assert!(!orphan.exists());
        assert!(tmp.exists(), "not a layer");
        for f in chain.files() {
            assert!(paths.disks().join(f).exists(), "{f}");
        }
    }

    /// Three snapshots; volume `v` attached before the second, `w` before
    /// the third: each volume's chain is the layers of the snapshots that
    /// cover it, and merging or reverting walks those alone.
    #[test]
    fn volume_chains_follow_the_snapshots_that_cover_them() {
        let (v, w) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let (vd, wd) = (Disk::Volume(v), Disk::Volume(w));
        let s1 = rec("disk.qcow2");
        let mut s2 = rec(&overlay_file(s1.snapshot_id));
        s2.volumes = vec![VolumeLayer {
            volume_id: v,
            file: volume::own_file(v),
        }];
        let mut s3 = rec(&overlay_file(s2.snapshot_id));
        s3.volumes = vec![
            VolumeLayer {
                volume_id: v,
                file: volume::overlay_file(v, s2.snapshot_id),
            },
            VolumeLayer {
                volume_id: w,
                file: volume::own_file(w),
            },
        ];
        let mut chain = Chain {
            active: overlay_file(s3.snapshot_id),
            snapshots: vec![s1, s2.clone(), s3.clone()],
            volumes: BTreeMap::new(),
        };
        chain.set_active(vd, volume::overlay_file(v, s3.snapshot_id));
        chain.set_active(wd, volume::overlay_file(w, s3.snapshot_id));
        assert_eq!(
            chain.files_of(vd),
            vec![
                volume::own_file(v),
                volume::overlay_file(v, s2.snapshot_id),
                volume::overlay_file(v, s3.snapshot_id)
            ]
        );
        assert_eq!(chain.files_of(wd).len(), 2);
        assert_eq!(chain.disks_of(0), vec![Disk::Vm]);
        assert_eq!(chain.disks_of(2), vec![Disk::Vm, vd, wd]);
        assert_eq!(chain.frozen(0, vd), None);
        assert_eq!(chain.above(1, vd), volume::overlay_file(v, s2.snapshot_id));
        assert_eq!(chain.below(1, vd), None, "s2's layer is v's bottom");
        assert_eq!(chain.below(2, vd), Some(volume::own_file(v)));
        assert_eq!(chain.above(2, wd), chain.active_of(wd));
        assert_eq!(chain.covering(v), vec![s2.name.clone(), s3.name.clone()]);
        assert_eq!(chain.covering(w), vec![s3.name.clone()]);
        assert!(chain.covering(uuid::Uuid::new_v4()).is_empty());
        // Back to its own file: the record forgets the volume.
        chain.set_active(wd, volume::own_file(w));
        assert!(!chain.volumes.contains_key(&w));
        assert_eq!(chain.active_of(wd), volume::own_file(w));
        // Distinct node and job names per disk.
        assert_eq!(vd.node(&volume::own_file(v)), volume::node_name(v));
        assert_ne!(vd.node(&chain.active_of(vd)), wd.node(&chain.active_of(wd)));
        assert_ne!(
            Disk::Vm.merge_job(s2.snapshot_id),
            vd.merge_job(s2.snapshot_id)
        );
        // Records from before volumes were covered still read.
        let old = r#"{"active":"disk.qcow2","snapshots":[{"snapshot_id":"0190f3c2-8a1b-7c3d-9e4f-0123456789ab","name":"a","created_at":"2026-01-01T00:00:00Z","quiesced":true,"file":"disk.qcow2","bytes":1}]}"#;
        let parsed: Chain = serde_json::from_str(old).expect("old record");
        assert!(parsed.volumes.is_empty() && parsed.snapshots[0].volumes.is_empty());
        assert_eq!(
            parsed.snapshots[0].info(1).volumes,
            Vec::<uuid::Uuid>::new()
        );
    }

    #[test]
    fn blockdev_options_keep_the_null_backing() {
        let options = qcow2_without_backing("layer-x", "/d/disk.x.qcow2", true).expect("options");
        let v = serde_json::to_value(&options).expect("json");
        assert_eq!(v["backing"], serde_json::Value::Null);
        assert!(
            v.as_object().expect("object").contains_key("backing"),
            "{v}"
        );
        assert_eq!(v["node-name"], "layer-x");
        assert_eq!(v["discard"], "unmap");
    }

    #[test]
    fn merge_jobs_are_named_after_the_snapshot() {
        let id = uuid::Uuid::new_v4();
        assert!(merge_job_id(id).ends_with(&id.to_string()));
        assert!(merge_job_id(id).starts_with(MERGE_JOB_PREFIX));
    }
}
