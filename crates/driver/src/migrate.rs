//! Live migration of a running VM from one host's driver to another's: the
//! contract (plain serde data the controller carries between the two hosts'
//! agents) and the pure checks both drivers share.
//!
//! # The exchange
//!
//! ```text
//!   controller            destination driver                 source driver
//!      │ IncomingRequest ──► vm_migrate_prepare(spec, req)
//!      │                      files, QEMU -incoming (paused),
//!      │                      NBD export of its disk
//!      │ ◄── IncomingReady ──┘
//!      │ MigrateRequest { ready, .. } ───────────────────► vm_migrate_send(id, req, progress)
//!      │                                                    mirror disk → NBD, migrate RAM,
//!      │                                                    cancel mirror, end QEMU, remove files
//!      │ ──► vm_migrate_finish(id)  (asked beside the send: waits until the
//!      │                            state is in; VM running here, NBD stopped)
//!      │ ◄── MigrateOutcome ───────────────────────────────┘
//!
//!   failure: vm_migrate_cancel(id) on the source (VM keeps running there),
//!            vm_migrate_abort_incoming(id) on the destination (nothing left).
//! ```
//!
//! The source knows the migration reached the destination through QEMU's
//! return path: with it, QEMU reports `completed` only after the destination
//! loaded the whole device state, so the source's files can go. The
//! destination starts the guest itself the moment the state is loaded (its
//! QEMU runs without `-S`), so the guest's pause is QEMU's `downtime` and
//! not the controller's round trip to `vm_migrate_finish`.
//!
//! # What is refused, and why
//!
//! - QEMU older than 8.0 under TCG ([`live_migration_refusal`]): QEMU 7.2
//!   corrupted guests that write memory hard during a TCG live migration
//!   (10 of 11 runs on our hosts); pause-and-migrate or a cold migration work.
//! - A destination whose QEMU is older than the source's, or whose machine
//!   type or accelerator differs ([`compatibility_problem`]): the device
//!   state would not load, or load wrong.
//! - A VM whose snapshots cover attached volumes: a volume's layers stay
//!   where they are ("delete the snapshots first").
//!
//! # Attached volumes and snapshot layers
//!
//! What the destination must rebuild that only the source's records say
//! (which volumes are attached, on which hot-plug port; which layers the
//! disk has), the controller first asks the source
//! (`vm_migrate_describe`, an [`OutgoingVm`]) and passes to the
//! destination in the [`IncomingRequest`].
//!
//! The destination plugs each volume into the same port (the device state
//! would not load into another PCI layout): a volume in a shared pool is
//! opened where it is; any other gets an empty standalone qcow2 of its size
//! in the destination's volume directory, exported on the same NBD server
//! as the disk, and the source mirrors it whole beside the disk (`sync:
//! full`: the destination has no copy of an image the volume may clone).
//! All mirrors are drained at the switch-over. Afterwards the source
//! removes its copies of the moved volumes; a failure removes the
//! destination's.
//!
//! A copied disk with snapshots ([`IncomingChain`]) is made at the
//! destination as the same files (same names, hence the same block node
//! names and snapshot records), each empty over the one below, the frozen
//! ones opened writable for this start only and exported too. Before the
//! mirrors start, the source copies each frozen layer's own data into its
//! twin (`blockdev-backup`, `sync: top`: frozen layers never change), one
//! at a time; then it mirrors the active layer (`sync: top`). The VM keeps
//! every snapshot: it can be merged or reverted to on its new host. A disk
//! in a shared pool keeps its chain where the destination opens it.
//!
//! A VM can also move between storage pools (or from a host's own
//! directory into a pool): the destination's spec names its pool, its
//! overlay is made there, and with [`MigrateRequest::same_base`] the source
//! mirrors only the VM's own writes although the destination's copy of the
//! base image sits at another path. The source's disk files go afterwards,
//! in its pool too: nothing is shared with the destination.
//!
//! # Cold migration (a stopped VM)
//!
//! ```text
//!   controller            source driver                        destination driver
//!      │ ExportRequest ───► vm_disk_export(id, req)
//!      │                     refuses unless stopped; qemu-nbd, read-only;
//!      │                     vm_start refused from now on
//!      │ ◄── DiskExport ────┘
//!      │ DiskExport ──────────────────────────────────────► vm_disk_import(spec, export, progress)
//!      │                                                     files as vm_create, disk.qcow2 by
//!      │                                                     qemu-img convert from the export
//!      │ ◄── ImportOutcome ─────────────────────────────────┘
//!      │ ──► vm_disk_export_stop(id), vm_destroy(id)  (source)
//!
//!   failure: vm_disk_export_stop(id) on the source (the VM is intact and
//!            can start again); the failed import left nothing behind.
//!
//!   shared pool (both hosts see spec.pool): nothing is copied:
//!      vm_adopt_from_pool(spec) on the destination, then vm_release(id) on
//!      the source (removes its own directory, not the pool's disk files).
//! ```
//!
//! What travels depends on [`ExportRequest::same_base`], which the
//! controller sets when the destination's copy of the VM's image has the
//! same content (same image id and SHA-256) as the source's:
//!
//! - same base ([`DiskExportKind::Layer`]): the source serves the *file* of
//!   the VM's own qcow2 layer, byte for byte; the destination opens it as a
//!   qcow2 over NBD with its own copy of the image as the backing file and
//!   converts it into an overlay of that image. Only the VM's own data
//!   crosses the network, and the persistent `stratus-backup-*` bitmaps
//!   stored in the layer come along (`qemu-img convert --bitmaps`), so
//!   incremental backups continue on the destination. A disk without a base
//!   image (restored from a backup) always travels this way.
//! - different base ([`DiskExportKind::Flat`]): the source serves the
//!   guest's disk as its chain reads it (image included); the destination
//!   writes a standalone qcow2. The bitmaps do not travel (NBD carries guest
//!   data, not qcow2 metadata): the next backup is a full one.
//!
//! Why not always serve the guest's view and convert with `-B <image>`:
//! over NBD every cluster the base image holds is reported as data, so
//! `qemu-img convert -B` copies the whole image again (measured: a 1 MiB
//! overlay of a 32 MiB image gave a 33 MiB "overlay").
//!
//! Refused, as for live migration: a VM with snapshots (the copy has one
//! layer; delete, i.e. merge, the snapshots first; a VM in a shared pool
//! keeps its snapshots by moving with `vm_adopt_from_pool`, which copies
//! nothing) and a VM with attached volumes (detach them first).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use stratus_common::VmId;

/// What the controller asks of the destination host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingRequest {
    /// Identifies this attempt: a prepare retried with the same id returns
    /// the same [`IncomingReady`] (or prepares afresh if the first attempt's
    /// QEMU is gone); another id for a VM being prepared is a conflict.
    pub request_id: uuid::Uuid,
    /// Where the destination's disk comes from.
    pub disk: IncomingDisk,
    /// The VM's attached volumes, as the source described them (absent
    /// from controllers that predate volumes moving: none).
    #[serde(default)]
    pub volumes: Vec<IncomingVolume>,
    /// The disk's snapshot layers, as the source described them, for a disk
    /// that is copied ([`IncomingDisk::Overlay`] or `Standalone`: the
    /// bottom layer is made as that kind says). `None`: one layer.
    #[serde(default)]
    pub chain: Option<IncomingChain>,
    /// Whether the source may switch to post-copy: QEMU wants the
    /// `postcopy-ram` capability on both sides before the migration starts.
    #[serde(default)]
    pub postcopy: bool,
}

/// A volume attached to the VM, as the source describes it
/// ([`crate::Driver::vm_migrate_describe`]) and the destination rebuilds it:
/// on the same hot-plug port, so the guest finds the same device at the
/// same PCI address (the migrated device state would not load otherwise).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingVolume {
    pub volume_id: uuid::Uuid,
    /// The hot-plug port (`hpN`) the volume is plugged into.
    pub port: usize,
    /// Its guest-visible size: the destination's copy has exactly this size
    /// (a mirror needs source and target of one size).
    pub size_bytes: u64,
    /// The shared storage pool holding the volume's files (the pool's
    /// directory, the same on every host that sees it): the destination
    /// opens them where they are and nothing is copied. `None`: the volume
    /// is in the source host's own directory; the destination makes an
    /// empty standalone qcow2 that the source mirrors whole (`sync: full`,
    /// the image it may clone included).
    pub pool: Option<PathBuf>,
}

/// What the source says about a VM about to move, before the destination
/// is prepared: what the destination must rebuild that only the source's
/// records hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutgoingVm {
    /// Attached volumes, in attachment order.
    pub volumes: Vec<IncomingVolume>,
    /// The disk's snapshot layers, when it has snapshots (see
    /// [`IncomingChain`]).
    #[serde(default)]
    pub chain: Option<IncomingChain>,
}

/// The layers of a disk with snapshots, for a destination that copies it:
/// it makes the same files (same names, so the same block node names and
/// the same snapshot records), each frozen layer an empty qcow2 over the
/// one below, which the source fills with that layer's own data before the
/// memory moves (a `blockdev-backup` with `sync: top` per layer, over NBD);
/// the active layer is mirrored as a disk without snapshots is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingChain {
    /// The frozen layers, bottom (over the base image, or standalone)
    /// first.
    pub frozen: Vec<IncomingLayer>,
    /// The layer the guest writes to.
    pub active: IncomingLayer,
    /// The source's snapshot records, as its driver keeps them (opaque
    /// here; the destination's driver of the same kind reads them).
    pub records: serde_json::Value,
}

/// One layer file of a disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingLayer {
    /// Its file name (relative to the VM's disk directory).
    pub file: String,
    /// Its guest-visible size (a resize after a snapshot grows only the
    /// layers above it).
    pub virtual_size: u64,
}

/// Where the source mirrors one volume: an export of the destination's
/// NBD server (the disk's, when the disk is mirrored too); `None` for a
/// volume in a shared pool, which is not copied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeTarget {
    pub volume_id: uuid::Uuid,
    pub nbd: Option<NbdTarget>,
}

/// The destination's disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum IncomingDisk {
    /// An empty qcow2 overlay of the spec's base image (the disk of a VM
    /// created from an image): only the guest's own writes are mirrored
    /// (`sync: top`), never the base image.
    Overlay,
    /// An empty standalone qcow2 of `virtual_size` bytes, for a disk that has
    /// no base image (restored from a backup): everything is mirrored. The
    /// controller asks for it when the VM's record names the backup its
    /// disk came from (`vm.restore_from`, also set by an in-place restore);
    /// the spec's `restore_from` plays no part here.
    Standalone { virtual_size: u64 },
    /// Nothing is copied: the disk is in the spec's shared storage pool
    /// (`VmSpec::pool`), which both hosts see. The destination links its
    /// VM directory to the disk's directory in the pool, so it opens the
    /// same chain, snapshot layers included; the files stay where they are
    /// and belong to the destination afterwards (the source removes only
    /// its own directory).
    Pool,
}

/// What the destination says once it waits for the migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingReady {
    pub request_id: uuid::Uuid,
    pub vm_id: VmId,
    /// Where the source's QEMU sends the state, e.g. `tcp:10.0.0.2:49152`.
    pub migration_uri: String,
    /// Where the source mirrors the disk; `None` for a shared disk.
    pub nbd: Option<NbdTarget>,
    /// The destination's QEMU version, e.g. `10.0.2`.
    pub qemu_version: String,
    /// The versioned machine type the destination runs, e.g. `pc-q35-10.0`.
    pub machine: String,
    /// `kvm` or `tcg` (or `sim`).
    pub accel: String,
    /// The guest-visible size of the destination's disk.
    pub disk_virtual_size: u64,
    /// The base image under the destination's disk (`None`: standalone or
    /// shared). The source refuses to mirror `sync: top` onto a disk whose
    /// base is not its own.
    pub disk_backing: Option<PathBuf>,
    /// The disk file the destination opened in the shared pool (the source
    /// leaves it in place); `None` when the disk is mirrored.
    pub shared_disk: Option<PathBuf>,
    /// Whether the destination expects TLS (both sides must agree).
    pub tls: bool,
    /// Where each of [`IncomingRequest::volumes`] goes.
    #[serde(default)]
    pub volumes: Vec<VolumeTarget>,
    /// Where each frozen layer of [`IncomingRequest::chain`] is copied, in
    /// the same order.
    #[serde(default)]
    pub layers: Vec<NbdTarget>,
}

/// An NBD export the source mirrors the disk into.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdTarget {
    pub host: String,
    pub port: u16,
    pub export: String,
}

/// What the controller asks of the source host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// The destination's answer to `vm_migrate_prepare`.
    pub ready: IncomingReady,
    /// Most bytes per second the memory transfer uses (QEMU's
    /// `max-bandwidth`, and `max-postcopy-bandwidth` once in post-copy); the
    /// disk mirror gets the same limit. `None`: QEMU's default for memory
    /// (128 MiB/s in 10.0), no limit for post-copy or the mirror.
    pub max_bandwidth: Option<u64>,
    /// Lets QEMU throttle the guest's vCPUs when memory is dirtied faster
    /// than it is sent (`auto-converge`).
    pub auto_converge: bool,
    /// Switch to post-copy (`migrate-start-postcopy`) once this many passes
    /// over memory have not converged. Needs `postcopy` in the
    /// [`IncomingRequest`]. `None`: pre-copy only.
    pub postcopy_after_passes: Option<u32>,
    /// The longest pause QEMU may plan for the switch-over
    /// (`downtime-limit`), in milliseconds. `None`: QEMU's 300 ms.
    pub downtime_limit_ms: Option<u64>,
    /// The controller vouches that the destination's base image
    /// ([`IncomingReady::disk_backing`]) has the same content as the
    /// source's (same image id and SHA-256), though at another path: a VM
    /// moving between storage pools, or from a host's own directory into a
    /// pool, finds its image cached under each pool's own directory. The
    /// source then mirrors `sync: top` (only the VM's own writes) although
    /// the paths differ. Without it, differing paths are refused: a `top`
    /// mirror onto another base would give the guest a disk mixing two
    /// images.
    #[serde(default)]
    pub same_base: bool,
}

/// Where a migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigratePhase {
    /// Copying the disk to the destination until the mirror is in sync.
    MirroringDisk,
    /// Sending memory, pass after pass, while the guest runs.
    MigratingMemory,
    /// Post-copy: the guest runs on the destination, pages follow.
    Postcopy,
    /// The guest is paused for the switch-over, or the source is finishing.
    Completing,
}

/// One progress report of `vm_migrate_send`, about every 100 ms.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateProgress {
    pub phase: Option<MigratePhase>,
    pub memory_transferred_bytes: u64,
    pub memory_remaining_bytes: u64,
    pub memory_total_bytes: u64,
    /// Pages dirtied per second × page size.
    pub dirty_rate_bytes_per_sec: u64,
    /// QEMU's estimate of the pause, in milliseconds.
    pub expected_downtime_ms: Option<u64>,
    /// Passes over memory so far (QEMU's `dirty-sync-count`).
    pub passes: u64,
    pub disk_done_bytes: u64,
    pub disk_total_bytes: u64,
}

/// Called with each [`MigrateProgress`].
pub type MigrateProgressFn = dyn Fn(MigrateProgress) + Send + Sync;

/// What the controller asks of the source host of a cold migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRequest {
    /// Identifies this attempt: an export retried with the same id returns
    /// the same [`DiskExport`] while its server still runs; another id for
    /// a VM being exported is a conflict (stop the export first).
    pub request_id: uuid::Uuid,
    /// The destination's copy of the VM's base image has the same content
    /// (same image id and SHA-256): only the VM's own layer needs to travel
    /// (see the module docs).
    pub same_base: bool,
}

/// What the source serves (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskExportKind {
    /// The file of the VM's own qcow2 layer, byte for byte (with its
    /// bitmaps); its backing file is the destination's copy of the image.
    Layer,
    /// The guest's disk as the whole chain reads it.
    Flat,
}

/// The source's answer to `vm_disk_export`: where the destination reads
/// the disk from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskExport {
    pub request_id: uuid::Uuid,
    pub vm_id: VmId,
    /// The NBD server (the source's migration address and a port of its
    /// migration port range).
    pub host: String,
    pub port: u16,
    /// The NBD export name.
    pub export: String,
    pub kind: DiskExportKind,
    /// The guest-visible size of the disk.
    pub virtual_size: u64,
    /// The base image under the source's chain (its path on the source),
    /// `None` for a standalone disk.
    pub base_image: Option<PathBuf>,
    /// Bytes of guest data in the VM's own layers: what a
    /// [`DiskExportKind::Layer`] copy moves, the total for progress.
    pub allocated_bytes: u64,
    /// Whether the server wants TLS (the source's
    /// `QemuConfig::migration_tls_dir`; the destination must use one with
    /// the same CA).
    pub tls: bool,
}

/// How a completed `vm_disk_import` went.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportOutcome {
    /// Guest data written into the new disk's own layer (for a
    /// [`DiskExportKind::Layer`] copy: what crossed the network, less the
    /// qcow2 metadata).
    pub bytes_copied: u64,
    /// From the call to the disk in place.
    pub duration_ms: u64,
    /// The backup bitmaps the new disk carries (see the module docs).
    pub bitmaps: Vec<String>,
}

/// How a completed migration went.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateOutcome {
    /// From the call to its return.
    pub total_ms: u64,
    /// How long the guest was paused (QEMU's `downtime`).
    pub downtime_ms: u64,
    /// From the call to QEMU's `migrate` command: checks, disk mirror.
    pub setup_ms: u64,
    /// Of which the disk mirror reaching sync.
    pub mirror_ms: u64,
    /// How long the paused guest waited at the switch-over for its last
    /// disk writes to reach the destination (part of `downtime_ms`).
    pub mirror_drain_ms: u64,
    /// QEMU's own migration time (`total-time`).
    pub qemu_ms: u64,
    /// From QEMU's completion to the return: mirror cancel, source cleanup.
    pub finish_ms: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    /// Whether the migration switched to post-copy.
    pub postcopy: bool,
    pub passes: u64,
    /// Whether the memory stream and the disk mirror ran over TLS (the
    /// source's `migration_tls_dir`; the destination had to agree). Carried
    /// so the job's log can tell an operator the move was encrypted; absent
    /// (false) in outcomes from agents that predate it.
    #[serde(default)]
    pub tls: bool,
}

impl IncomingRequest {
    /// The volumes the destination makes a copy of (not in a shared pool).
    pub fn copied_volumes(&self) -> impl Iterator<Item = uuid::Uuid> + '_ {
        self.volumes
            .iter()
            .filter(|v| v.pool.is_none())
            .map(|v| v.volume_id)
    }
}

/// Why the destination, prepared for `ready.volumes`, cannot take a VM
/// with `attached` volumes (one was attached or detached since the source
/// described them), or `None` when both name the same volumes.
pub fn volumes_mismatch(attached: &[uuid::Uuid], ready: &IncomingReady) -> Option<String> {
    let theirs: Vec<uuid::Uuid> = ready.volumes.iter().map(|v| v.volume_id).collect();
    let (mut a, mut b) = (attached.to_vec(), theirs.clone());
    a.sort();
    b.sort();
    (a != b).then(|| {
        format!(
            "the destination was prepared for the volumes {theirs:?}, but the VM has {attached:?} \
             attached (attached or detached since): migrate it again"
        )
    })
}

/// The oldest QEMU that migrates a memory-hungry TCG guest intact.
pub const MIN_TCG_LIVE_MIGRATION_QEMU: (u32, u32) = (8, 0);

/// `10.0.2` → `(10, 0, 2)`; missing parts are 0; `None` if not a version.
pub fn parse_qemu_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut parts = v.trim().split(['.', '-', '+', ' ']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let micro = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    Some((major, minor, micro))
}

/// Why live migration with this QEMU and accelerator must be refused, or
/// `None` when it is safe. The reason names the alternative.
pub fn live_migration_refusal(qemu_version: &str, accel: &str) -> Option<String> {
    if accel != "tcg" {
        return None;
    }
    let alternative = "stop the VM and migrate it cold, or pause it during the migration";
    match parse_qemu_version(qemu_version) {
        Some((major, minor, _)) if (major, minor) >= MIN_TCG_LIVE_MIGRATION_QEMU => None,
        Some(_) => Some(format!(
            "QEMU {qemu_version} under TCG corrupts guests that write memory during a live \
             migration (QEMU {}.{} or newer does not); {alternative}",
            MIN_TCG_LIVE_MIGRATION_QEMU.0, MIN_TCG_LIVE_MIGRATION_QEMU.1
        )),
        None => Some(format!(
            "cannot tell whether QEMU version {qemu_version:?} migrates TCG guests safely; \
             {alternative}"
        )),
    }
}

/// What the source (its QEMU version, machine type and accelerator) and the
/// destination's [`IncomingReady`] disagree on, or `None`.
pub fn compatibility_problem(
    source_qemu: &str,
    source_machine: &str,
    source_accel: &str,
    dest: &IncomingReady,
) -> Option<String> {
    if source_accel != dest.accel {
        return Some(format!(
            "the source runs the VM with {source_accel}, the destination with {}",
            dest.accel
        ));
    }
    match (
        parse_qemu_version(source_qemu),
        parse_qemu_version(&dest.qemu_version),
    ) {
        (Some(s), Some(d)) if d < s => {
            return Some(format!(
                "the destination's QEMU {} is older than the source's {source_qemu}",
                dest.qemu_version
            ))
        }
        (Some(_), Some(_)) => {}
        _ => {
            return Some(format!(
                "cannot compare QEMU versions {source_qemu:?} and {:?}",
                dest.qemu_version
            ))
        }
    }
    if source_machine != dest.machine {
        return Some(format!(
            "the source runs machine type {source_machine}, the destination {}",
            dest.machine
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(qemu: &str, machine: &str, accel: &str) -> IncomingReady {
        IncomingReady {
            request_id: uuid::Uuid::new_v4(),
            vm_id: VmId::new(),
            migration_uri: "tcp:127.0.0.1:49152".into(),
            nbd: None,
            qemu_version: qemu.into(),
            machine: machine.into(),
            accel: accel.into(),
            disk_virtual_size: 1 << 30,
            disk_backing: None,
            shared_disk: None,
            tls: false,
            volumes: vec![],
            layers: vec![],
        }
    }

    #[test]
    fn old_qemu_under_tcg_is_refused_with_the_alternative() {
        let r = live_migration_refusal("7.2.19", "tcg").expect("refused");
        assert!(r.contains("QEMU 7.2.19 under TCG corrupts"), "{r}");
        assert!(r.contains("migrate it cold, or pause it"), "{r}");
        assert!(live_migration_refusal("7.2.19", "kvm").is_none());
        assert!(live_migration_refusal("8.0.0", "tcg").is_none());
        assert!(live_migration_refusal("10.0.2", "tcg").is_none());
        assert!(live_migration_refusal("6.2", "tcg").is_some());
        assert!(live_migration_refusal("garbage", "tcg").is_some());
        assert!(live_migration_refusal("garbage", "kvm").is_none());
    }

    #[test]
    fn versions_parse() {
        assert_eq!(parse_qemu_version("10.0.2"), Some((10, 0, 2)));
        assert_eq!(parse_qemu_version("8.1"), Some((8, 1, 0)));
        assert_eq!(parse_qemu_version("7.2.19+dfsg"), Some((7, 2, 19)));
        assert_eq!(parse_qemu_version(""), None);
        assert_eq!(parse_qemu_version("x.1"), None);
    }

    #[test]
    fn incompatible_destinations_are_named() {
        let ok = ready("10.0.2", "pc-q35-10.0", "tcg");
        assert_eq!(
            compatibility_problem("10.0.2", "pc-q35-10.0", "tcg", &ok),
            None
        );
        let newer = ready("10.1.0", "pc-q35-10.0", "tcg");
        assert_eq!(
            compatibility_problem("10.0.2", "pc-q35-10.0", "tcg", &newer),
            None
        );
        let older = ready("9.2.0", "pc-q35-10.0", "tcg");
        let p = compatibility_problem("10.0.2", "pc-q35-10.0", "tcg", &older).expect("older");
        assert!(p.contains("older than the source's 10.0.2"), "{p}");
        let machine = ready("10.0.2", "pc-q35-9.2", "tcg");
        let p = compatibility_problem("10.0.2", "pc-q35-10.0", "tcg", &machine).expect("machine");
        assert!(p.contains("machine type pc-q35-10.0"), "{p}");
        let accel = ready("10.0.2", "pc-q35-10.0", "kvm");
        let p = compatibility_problem("10.0.2", "pc-q35-10.0", "tcg", &accel).expect("accel");
        assert!(p.contains("with tcg, the destination with kvm"), "{p}");
    }

    #[test]
    fn volumes_must_be_the_ones_the_destination_was_prepared_for() {
        let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let mut r = ready("10.0.2", "pc-q35-10.0", "tcg");
        r.volumes = [b, a]
            .into_iter()
            .map(|volume_id| VolumeTarget {
                volume_id,
                nbd: None,
            })
            .collect();
        assert_eq!(volumes_mismatch(&[a, b], &r), None, "order does not matter");
        let problem = volumes_mismatch(&[a], &r).expect("one was detached since");
        assert!(problem.contains("migrate it again"), "{problem}");
        assert!(volumes_mismatch(&[a, b, uuid::Uuid::new_v4()], &r).is_some());
    }

    #[test]
    fn requests_round_trip_as_plain_data() {
        let req = IncomingRequest {
            request_id: uuid::Uuid::new_v4(),
            disk: IncomingDisk::Pool,
            volumes: vec![],
            chain: None,
            postcopy: false,
        };
        let json = serde_json::to_string(&req).expect("json");
        assert!(json.contains(r#""kind":"pool""#), "{json}");
        assert_eq!(
            serde_json::from_str::<IncomingRequest>(&json).expect("parse"),
            req
        );
        let m = MigrateRequest {
            ready: ready("10.0.2", "pc-q35-10.0", "tcg"),
            max_bandwidth: Some(1 << 20),
            auto_converge: true,
            postcopy_after_passes: None,
            downtime_limit_ms: None,
            same_base: true,
        };
        let json = serde_json::to_string(&m).expect("json");
        assert_eq!(
            serde_json::from_str::<MigrateRequest>(&json).expect("parse"),
            m
        );
    }
}
