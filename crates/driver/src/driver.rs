//! The [`Driver`] trait: the one interface the host agent uses to run VMs,
//! implemented by [`crate::QemuDriver`] and [`crate::SimDriver`].

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use stratus_common::VmId;
use tokio::sync::broadcast;

use crate::{
    BackupCheck, BackupOutcome, BackupRequest, ConsoleChunk, DriverError, ExecOutput, GuestInfo,
    HostFacts, ProgressFn, PruneChild, Pruned, SnapshotInfo, SnapshotRequest, StopHow, VmEvent,
    VmSpec, VmStatus,
};
use crate::{DiskExport, ExportRequest, ImportOutcome};
use crate::{IncomingReady, IncomingRequest, MigrateOutcome, MigrateProgressFn, MigrateRequest};
use crate::{VolumeInfo, VolumeRestore, VolumeSpec};

/// Runs VMs on one host. Object-safe: the agent holds an `Arc<dyn Driver>`.
///
/// Every lifecycle call is idempotent where the name suggests it: creating an
/// existing VM with the same spec, starting a running VM, stopping a stopped
/// one and destroying an absent one all succeed without doing anything.
#[async_trait]
pub trait Driver: Send + Sync {
    /// `"qemu"` or `"sim"`.
    fn name(&self) -> &'static str;

    /// CPUs, memory and disk of the host, and the hypervisor in use.
    async fn host_facts(&self) -> Result<HostFacts, DriverError>;

    /// Prepares the VM (run directory, disk overlay) without starting it.
    /// Idempotent for the same spec; a different spec for an existing id is a
    /// [`DriverError::Conflict`].
    async fn vm_create(&self, spec: &VmSpec) -> Result<(), DriverError>;

    /// Boots the VM. Starting a running VM succeeds and does nothing.
    async fn vm_start(&self, id: VmId) -> Result<(), DriverError>;

    /// Presses the ACPI power button, waits up to `graceful_timeout` for the
    /// guest to power off, then ends the hypervisor. A zero timeout skips the
    /// button.
    async fn vm_stop(&self, id: VmId, graceful_timeout: Duration) -> Result<StopHow, DriverError>;

    /// Resets the running VM (a hard reset, like the reset button).
    async fn vm_reboot(&self, id: VmId) -> Result<(), DriverError>;

    /// Kills the VM if it runs and removes everything the driver keeps for it.
    /// Destroying an unknown VM succeeds.
    async fn vm_destroy(&self, id: VmId) -> Result<(), DriverError>;

    /// The VM's state; `None` when the driver does not know the VM.
    async fn vm_status(&self, id: VmId) -> Result<Option<VmStatus>, DriverError>;

    /// Every VM the driver knows, running or not. After an agent restart this
    /// is how it finds (and the QEMU driver re-adopts) its VMs.
    async fn vm_list(&self) -> Result<Vec<VmStatus>, DriverError>;

    /// Up to `max` bytes of the VM's console log from `offset` (see
    /// [`ConsoleChunk`] for the offset rules).
    async fn console_read(
        &self,
        id: VmId,
        offset: u64,
        max: usize,
    ) -> Result<ConsoleChunk, DriverError>;

    /// Asks the guest agent about the guest, with a short timeout;
    /// `connected: false` when it does not answer.
    async fn guest_info(&self, id: VmId) -> Result<GuestInfo, DriverError>;

    /// Runs `argv` in the guest through the guest agent and waits up to
    /// `timeout` for it to finish.
    async fn guest_exec(
        &self,
        id: VmId,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, DriverError>;

    /// Backs up the disk of the running VM `id` and every data volume
    /// attached to it, at one moment (see [`crate::backup`]), calling
    /// `progress` as the copy advances. A VM that is not running is
    /// [`DriverError::InvalidState`]; a VM that stops during the backup fails
    /// it, and nothing partial is left at `req.target` or the volumes' files.
    async fn vm_backup(
        &self,
        id: VmId,
        req: &BackupRequest,
        progress: &ProgressFn,
    ) -> Result<BackupOutcome, DriverError>;

    /// Reads a backup file and its chain back: its SHA-256 and what
    /// `qemu-img check` says of each file in the chain.
    async fn backup_verify(&self, file: &Path) -> Result<BackupCheck, DriverError>;

    /// Replaces the disk of the stopped VM `id` with the content of the
    /// backup `file` (read through its chain), and each volume in `volumes`
    /// (which must be attached to the VM, without snapshot layers) with its
    /// file. Every new file is written before any replaces a disk, so a
    /// failure while copying leaves every disk as it was. Change tracking
    /// starts afresh: the next backup is a full one.
    async fn vm_restore(
        &self,
        id: VmId,
        file: &Path,
        volumes: &[VolumeRestore],
    ) -> Result<(), DriverError>;

    /// Makes volume `volume_id` (`size_bytes` large, or its backup's size if
    /// larger) hold the content of the backup `file`: created when it does
    /// not exist (a volume restored beside a new VM), rewritten when it
    /// exists and is attached to no VM. The volume can then be attached.
    async fn volume_restore(
        &self,
        volume_id: uuid::Uuid,
        size_bytes: u64,
        file: &Path,
    ) -> Result<VolumeInfo, DriverError>;

    /// Deletes the backup `file`, first merging its data into `child` (the
    /// restore point built on it) so the child stays whole; returns the
    /// child's new figures. Running it again after a crash finishes the job.
    async fn backup_delete(
        &self,
        file: &Path,
        child: Option<&PruneChild>,
    ) -> Result<Option<Pruned>, DriverError>;

    /// Snapshots the disk of VM `id`, running (live: the VM keeps running;
    /// its file systems are frozen through the guest agent for the moment
    /// if it answers) or stopped (see [`crate::snapshot`]). Names are unique
    /// per VM ([`DriverError::Conflict`]); a request whose `snapshot_id`
    /// exists already returns that snapshot. A VM holding
    /// [`crate::MAX_SNAPSHOTS`] is refused.
    async fn vm_snapshot_create(
        &self,
        id: VmId,
        req: &SnapshotRequest,
    ) -> Result<SnapshotInfo, DriverError>;

    /// The VM's snapshots, oldest first.
    async fn vm_snapshot_list(&self, id: VmId) -> Result<Vec<SnapshotInfo>, DriverError>;

    /// Makes the disk of the stopped VM `id` what it was when the snapshot
    /// was taken (a running VM is [`DriverError::InvalidState`]). The
    /// snapshot stays; the ones taken after it are dropped: their ids are
    /// returned. The disk's backup change tracking starts afresh (the next
    /// backup is full).
    async fn vm_snapshot_revert(
        &self,
        id: VmId,
        snapshot_id: uuid::Uuid,
    ) -> Result<Vec<uuid::Uuid>, DriverError>;

    /// Deletes a snapshot of VM `id`, running (live: the VM keeps running)
    /// or stopped. Its layer is merged into the next one up, so the chain
    /// gets one shorter and every other snapshot keeps its content.
    async fn vm_snapshot_delete(
        &self,
        id: VmId,
        snapshot_id: uuid::Uuid,
    ) -> Result<(), DriverError>;

    /// Creates the volume's file (a qcow2 in the driver's data directory,
    /// written under a temporary name and then renamed, so a crash never
    /// leaves a half-made volume that looks whole). Idempotent for the same
    /// spec; another spec for an existing id is
    /// [`DriverError::VolumeConflict`]. See [`crate::volume`].
    async fn volume_create(&self, spec: &VolumeSpec) -> Result<VolumeInfo, DriverError>;

    /// Attaches the volume to the VM: recorded in the VM's driver state (so
    /// every later start of the VM includes it, after agent restarts too)
    /// and, if the VM runs, hot-plugged now (the guest finds it by
    /// [`crate::volume_serial`]). Idempotent. A volume is attached to at most
    /// one VM ([`DriverError::VolumeConflict`] otherwise); a VM holds at most
    /// [`crate::MAX_VOLUMES_PER_VM`] ([`DriverError::InvalidState`] beyond).
    async fn vm_volume_attach(&self, vm: VmId, volume_id: uuid::Uuid) -> Result<(), DriverError>;

    /// Detaches the volume from the VM: if the VM runs, asks the guest to
    /// release the disk and waits for it, at most
    /// [`crate::volume::DETACH_TIMEOUT`] ([`DriverError::Timeout`] if the
    /// guest does not; retrying continues the wait); then removes it from
    /// the VM's record. Idempotent.
    async fn vm_volume_detach(&self, vm: VmId, volume_id: uuid::Uuid) -> Result<(), DriverError>;

    /// Grows the volume to `size_bytes`, live when it is attached to a
    /// running VM (the guest sees the new capacity at once). Never shrinks
    /// ([`DriverError::InvalidVolumeSpec`]).
    async fn volume_resize(
        &self,
        volume_id: uuid::Uuid,
        size_bytes: u64,
    ) -> Result<VolumeInfo, DriverError>;

    /// Deletes the volume's file; refused ([`DriverError::VolumeConflict`])
    /// while it is attached to a VM, running or not. Deleting an absent
    /// volume succeeds.
    async fn volume_delete(&self, volume_id: uuid::Uuid) -> Result<(), DriverError>;

    /// The volume's size, host allocation and attachment; `None` when it
    /// does not exist.
    async fn volume_info(&self, volume_id: uuid::Uuid) -> Result<Option<VolumeInfo>, DriverError>;

    /// Records that the volume's files are in the shared storage pool whose
    /// directory (the same path on every host that sees it) is `pool`: in
    /// `<pool>/volumes/`. Called before any other volume call on a pool
    /// volume, on every host that handles it, so a volume made by one host
    /// is found (not made again) by the next. Idempotent; a volume this
    /// host keeps elsewhere is [`DriverError::VolumeConflict`]. Files in a
    /// pool are removed only by [`Driver::volume_delete`], never by a VM's
    /// destroy (nor an orphan's).
    async fn volume_use_pool(
        &self,
        volume_id: uuid::Uuid,
        pool: &std::path::Path,
    ) -> Result<(), DriverError>;

    /// Source side, before the destination is prepared: what the
    /// destination must rebuild that only this host's records say (the
    /// attached volumes and their hot-plug ports). Changes nothing.
    async fn vm_migrate_describe(&self, id: VmId) -> Result<crate::OutgoingVm, DriverError>;

    /// Destination side of a live migration (see [`crate::migrate`]):
    /// creates the VM's files (a disk to mirror into, unless the disk is
    /// shared), starts the hypervisor waiting for the incoming state (paused,
    /// same devices as the source, since the command line comes from the
    /// same spec) and, unless the disk is shared, an NBD export of its disk.
    /// Idempotent for the same `req.request_id`. A VM this host already runs
    /// is a [`DriverError::Conflict`].
    async fn vm_migrate_prepare(
        &self,
        spec: &VmSpec,
        req: &IncomingRequest,
    ) -> Result<IncomingReady, DriverError>;

    /// Source side: moves the running VM `id` to the destination that
    /// answered `req.ready`, calling `progress` about every 100 ms. On
    /// success the VM runs on the destination and nothing of it is left
    /// here (but a shared disk file). Every failure leaves the VM running
    /// here, except one after a switch to post-copy (the guest's memory is
    /// then split between the hosts: it stays paused, and the error says
    /// so); refusals ([`DriverError::MigrationRefused`]) happen before
    /// anything changes. A VM with snapshots is refused (delete them
    /// first: the mirror copies only the active layer of each disk); its
    /// attached volumes move with it (mirrored into the destination's
    /// copies, or left in their shared pool), and the destination must have
    /// been prepared with exactly them. Lifecycle, snapshot and volume
    /// calls on the VM wait for the migration; `vm_migrate_cancel` does not.
    async fn vm_migrate_send(
        &self,
        id: VmId,
        req: &MigrateRequest,
        progress: &MigrateProgressFn,
    ) -> Result<MigrateOutcome, DriverError>;

    /// Destination side, while or after the source's `vm_migrate_send`
    /// runs: waits up to `timeout` for the incoming migration to complete
    /// and the VM to run, stops the NBD export and makes the VM an ordinary
    /// VM of this host (running in `vm_status`). Fails at once when the
    /// incoming migration fails or its QEMU ends (an abort).
    async fn vm_migrate_finish(&self, id: VmId, timeout: Duration) -> Result<(), DriverError>;

    /// Source side: cancels the migration of `id` in progress (the VM keeps
    /// running here) and waits for `vm_migrate_send` to have cleaned up.
    /// Without a migration in progress it succeeds and does nothing.
    async fn vm_migrate_cancel(&self, id: VmId) -> Result<(), DriverError>;

    /// Destination side: ends the incoming VM and removes every file it
    /// made. Idempotent; refused ([`DriverError::InvalidState`]) once the
    /// incoming VM runs (the migration completed: the VM lives here now).
    async fn vm_migrate_abort_incoming(&self, id: VmId) -> Result<(), DriverError>;

    /// Source side of a cold migration (see [`crate::migrate`]): serves the
    /// disk of the stopped VM `id` read-only over NBD for
    /// `vm_disk_import` on the destination. A VM that is not stopped is
    /// [`DriverError::InvalidState`]; one with snapshots or attached
    /// volumes is [`DriverError::MigrationRefused`] (merge the snapshots,
    /// detach the volumes first). While exported, `vm_start`, `vm_restore`
    /// and snapshot changes are refused, so nothing writes under the copy.
    /// Idempotent for the same `req.request_id`; the server survives an
    /// agent restart and is found again through the VM's directory.
    async fn vm_disk_export(
        &self,
        id: VmId,
        req: &ExportRequest,
    ) -> Result<DiskExport, DriverError>;

    /// Stops the VM's disk export (the VM can start again). Idempotent; a
    /// VM without an export, or unknown, succeeds.
    async fn vm_disk_export_stop(&self, id: VmId) -> Result<(), DriverError>;

    /// Destination side of a cold migration: creates the VM from `spec` as
    /// `vm_create` does (in `spec.pool` if set), its disk copied from the
    /// source's export `from` instead of an empty overlay, calling
    /// `progress` as the copy advances. A failure leaves nothing of the VM
    /// here; an import that completed returns its outcome again. A VM this
    /// host already has otherwise is a [`DriverError::Conflict`].
    async fn vm_disk_import(
        &self,
        spec: &VmSpec,
        from: &DiskExport,
        progress: &ProgressFn,
    ) -> Result<ImportOutcome, DriverError>;

    /// Destination side of a cold move within a shared storage pool that
    /// both hosts see: makes the stopped VM of `spec` known here, its disks
    /// (snapshot layers included) those already in `spec.pool`. Nothing is
    /// copied. The source must be stopped; afterwards it calls
    /// `vm_release`, not `vm_destroy` (which would delete the disks).
    /// Idempotent for the same spec.
    async fn vm_adopt_from_pool(&self, spec: &VmSpec) -> Result<(), DriverError>;

    /// Source side of a cold move within a shared pool: forgets the stopped
    /// VM `id` and removes its own directory here, but not its disks in the
    /// pool, which now belong to the host that adopted it. Refused
    /// ([`DriverError::InvalidState`]) while the VM runs or is exported,
    /// and for a VM whose disk is not in a pool (that is `vm_destroy`).
    /// Releasing an unknown VM succeeds.
    async fn vm_release(&self, id: VmId) -> Result<(), DriverError>;

    /// Every state change the driver notices from now on. A receiver that
    /// falls behind loses the oldest events (`RecvError::Lagged`) and should
    /// re-read `vm_list`.
    fn subscribe(&self) -> broadcast::Receiver<VmEvent>;
}
