//! Cold migration for the QEMU driver (the contract, and why a layer
//! travels rather than the guest's view, are in [`crate::migrate`]).
//!
//! # Source (`export`, `export_stop`, `release`)
//!
//! `export` runs, under the VM's operation lock and only while the VM is
//! stopped, one `qemu-nbd --fork --read-only --persistent` on the first free
//! port of `QemuConfig::migration_ports` at `migration_address`:
//! `-f raw` of the active layer's file (a [`DiskExportKind::Layer`] export)
//! or `-f qcow2` of it, which follows the backing chain (a
//! [`DiskExportKind::Flat`] one). `export.json` in the VM directory records
//! the request and the server's pid, written before the server starts, so
//! that a restarted agent (or `vm_destroy`) finds and ends it, and
//! `vm_start`, `vm_restore` and the snapshot calls refuse while it exists:
//! nothing may write under the copy. `export_stop` ends the server and
//! removes the record.
//!
//! `release` forgets a stopped VM whose disks are in a shared pool and
//! removes its own directory, leaving the pool's files to the host that
//! adopted them (`vm_destroy` would delete them).
//!
//! # Destination (`import`, `adopt`)
//!
//! `import` writes `import.json` (the request) first, then makes the VM's
//! files as `vm_create` does (the run directory, the link into the pool),
//! builds `disk.qcow2.tmp` with `qemu-img convert -p` from the export and
//! renames it to `disk.qcow2`, then `vm.json`; `import.json` then also holds
//! the outcome, which a retry of a completed import returns. Any failure
//! removes the VM directory and its disk directory in the pool (which
//! `import` made: it refuses a pool that already holds disks of the VM). A
//! layer export is opened as a qcow2 over NBD whose backing file is this
//! host's copy of the image, converted with `-B <image>` (only the layer's
//! own clusters are written) and `--bitmaps`.
//!
//! `adopt` links the VM to its disks in the pool and records it stopped:
//! `vm_create` without making a disk.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::process::Signal;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use stratus_common::VmId;
use tokio::io::AsyncReadExt;

use super::layout::{read_json, remove_file_if_exists, write_json, VmPaths};
use super::{lock, pool_disk_dir, process, snapshot, Shared, VmEntry};
use crate::{
    BackupProgress, DiskExport, DiskExportKind, DriverError, ExportRequest, ImportOutcome,
    ProgressFn, QemuSaid, VmSpec,
};

/// The source's record of a disk export, in the VM directory.
const EXPORT_FILE: &str = "export.json";
/// The destination's record of an import, in the VM directory.
const IMPORT_FILE: &str = "import.json";
/// The TLS credentials object of `qemu-nbd` and `qemu-img`.
const TLS_ID: &str = "stratus-cold-tls";
/// How long `qemu-nbd` may take to listen (`--fork` returns then).
const NBD_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an ended `qemu-nbd` may take to go.
const NBD_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Clients the export serves at once: the importer's, plus a retry's while
/// a dead importer's connection is still being torn down.
const NBD_CLIENTS: u32 = 4;

/// What `export.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ExportRecord {
    request_id: uuid::Uuid,
    /// Set once the server runs.
    pid: Option<u32>,
    export: Option<DiskExport>,
}

/// What `import.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ImportRecord {
    request_id: uuid::Uuid,
    /// Set once the VM is complete.
    outcome: Option<ImportOutcome>,
}

fn export_path(paths: &VmPaths) -> PathBuf {
    paths.dir.join(EXPORT_FILE)
}

fn nbd_pidfile(paths: &VmPaths) -> PathBuf {
    paths.run.join("nbd.pid")
}

fn nbd_log(paths: &VmPaths) -> PathBuf {
    paths.run.join("nbd.log")
}

fn import_path(paths: &VmPaths) -> PathBuf {
    paths.dir.join(IMPORT_FILE)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Refuses `operation` while the VM's disk is exported for a cold
/// migration. Caller holds `vm.op`.
pub(super) fn refuse_if_exported(vm: &VmEntry, operation: &'static str) -> Result<(), DriverError> {
    if export_path(&vm.paths).exists() {
        return Err(DriverError::InvalidState {
            id: vm.id,
            operation,
            state: "exported for a cold migration (its disk is being copied; stop the export \
                    first with vm_disk_export_stop)"
                .into(),
        });
    }
    Ok(())
}

/// Whether `pid` is a live `qemu-nbd` serving a file of VM `id` (the VM
/// id is in its file and export names), not a recycled pid.
fn is_nbd_of(pid: u32, id: VmId) -> bool {
    if process::is_zombie_or_gone(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty());
    let Some(argv0) = args.next() else {
        return false;
    };
    let exe = argv0.rsplit(|b| *b == b'/').next().unwrap_or(argv0);
    if exe != b"qemu-nbd" {
        return false;
    }
    let id = id.to_string();
    let id = id.as_bytes();
    args.any(|a| a.windows(id.len()).any(|w| w == id))
}

/// The live export server of the VM, from the record or the pidfile.
fn live_nbd(paths: &VmPaths, id: VmId, rec: Option<&ExportRecord>) -> Option<u32> {
    [
        rec.and_then(|r| r.pid),
        process::read_pidfile(&nbd_pidfile(paths)),
    ]
    .into_iter()
    .flatten()
    .find(|pid| is_nbd_of(*pid, id))
}

/// Ends the VM's export server, if any, and removes its record. Caller
/// holds `vm.op`.
pub(super) async fn end_export(vm: &VmEntry) -> Result<(), DriverError> {
    let paths = &vm.paths;
    let rec = read_json::<ExportRecord>(&export_path(paths), "disk export record")
        .ok()
        .flatten();
    while let Some(pid) = live_nbd(paths, vm.id, rec.as_ref()) {
        tracing::info!(vm = %vm.id, pid, "ending the disk export");
        process::signal(pid, Signal::TERM).map_err(|e| {
            DriverError::io(
                format!("cannot end qemu-nbd pid {pid}"),
                nbd_pidfile(paths),
                e,
            )
        })?;
        let deadline = Instant::now() + NBD_STOP_TIMEOUT;
        while is_nbd_of(pid, vm.id) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if is_nbd_of(pid, vm.id) {
            let _ = process::signal(pid, Signal::KILL);
            tokio::time::sleep(Duration::from_millis(100)).await;
            if is_nbd_of(pid, vm.id) {
                return Err(DriverError::timeout(format!(
                    "waiting for qemu-nbd pid {pid} of VM {} to end",
                    vm.id
                )));
            }
        }
    }
    remove_file_if_exists(&nbd_pidfile(paths))?;
    remove_file_if_exists(&export_path(paths))
}

// ---- source ---------------------------------------------------------------

/// See [`crate::Driver::vm_disk_export`] and the module docs.
pub(super) async fn export(
    shared: &Arc<Shared>,
    id: VmId,
    req: &ExportRequest,
) -> Result<DiskExport, DriverError> {
    let vm = shared.existing(id)?;
    let _op = vm.op.lock().await;
    let paths = &vm.paths;
    let record_path = export_path(paths);
    if let Some(rec) = read_json::<ExportRecord>(&record_path, "disk export record")? {
        let live = live_nbd(paths, id, Some(&rec));
        match (&rec.export, live) {
            (Some(export), Some(_)) if rec.request_id == req.request_id => {
                return Ok(export.clone())
            }
            (_, Some(pid)) => {
                return Err(DriverError::Conflict {
                    id,
                    difference: format!(
                        "its disk is already exported for request {} (qemu-nbd pid {pid}); stop \
                         that export first",
                        rec.request_id
                    ),
                })
            }
            // The server of an earlier attempt is gone: start afresh.
            (_, None) => end_export(&vm).await?,
        }
    }
    if super::migrate::is_incoming(&vm) {
        return Err(DriverError::InvalidState {
            id,
            operation: "export the disk of",
            state: "waiting for an incoming live migration".into(),
        });
    }
    if shared.ensure_adopted(&vm)?.is_some() || !process::find_qemu_of(id).is_empty() {
        return Err(DriverError::InvalidState {
            id,
            operation: "export the disk of",
            state: format!(
                "{} (stop it first: a cold migration copies a stopped VM)",
                shared.read_record(&vm)?.state
            ),
        });
    }
    shared.reconcile_dead(&vm)?;
    let chain = snapshot::read_chain(paths)?;
    if !chain.snapshots.is_empty() {
        return Err(DriverError::MigrationRefused {
            id,
            reason: format!(
                "it has {} snapshot(s) whose layers would not move with it; delete (merge) the \
                 snapshots first{}",
                chain.snapshots.len(),
                if paths.disks_link.exists() {
                    ", or move it within its shared pool with vm_adopt_from_pool, which keeps them"
                } else {
                    ""
                }
            ),
        });
    }
    let attached = attached_volumes(paths)?;
    if attached > 0 {
        return Err(DriverError::MigrationRefused {
            id,
            reason: format!(
                "it has {attached} attached volume(s), which stay on this host; detach them first"
            ),
        });
    }
    let qemu_img = &shared.config.qemu_img;
    let top = paths.disks().join(&chain.active);
    let base = snapshot::backing_of(qemu_img, &top).await?;
    // A disk without a base is whole in its layer: the layer always travels.
    let kind = if req.same_base || base.is_none() {
        DiskExportKind::Layer
    } else {
        DiskExportKind::Flat
    };
    let virtual_size =
        super::image::virtual_size(qemu_img, &top, crate::ImageFormat::Qcow2).await?;
    let allocated_bytes = snapshot::layer_bytes(qemu_img, &top).await?;
    let tls = super::migrate::tls_dir(shared)?;

    write_json(
        &record_path,
        "disk export record",
        &ExportRecord {
            request_id: req.request_id,
            pid: None,
            export: None,
        },
    )?;
    let started = serve(shared, &vm, &top, kind, tls.as_deref()).await;
    let (pid, port, export_name) = match started {
        Ok(s) => s,
        Err(e) => {
            if let Err(undo) = end_export(&vm).await {
                tracing::warn!(vm = %id, error = %undo, "cannot remove the failed disk export");
            }
            return Err(e);
        }
    };
    let export = DiskExport {
        request_id: req.request_id,
        vm_id: id,
        host: shared.config.migration_address.to_string(),
        port,
        export: export_name,
        kind,
        virtual_size,
        base_image: base.map(|(path, _)| path),
        allocated_bytes,
        tls: tls.is_some(),
    };
    let recorded = write_json(
        &record_path,
        "disk export record",
        &ExportRecord {
            request_id: req.request_id,
            pid: Some(pid),
            export: Some(export.clone()),
        },
    );
    if let Err(e) = recorded {
        let _ = end_export(&vm).await;
        return Err(e);
    }
    tracing::info!(vm = %id, pid, port, ?kind, allocated_bytes, "disk exported for a cold migration");
    Ok(export)
}

/// The number of volumes `volumes.json` (volume.rs's record) lists.
fn attached_volumes(paths: &VmPaths) -> Result<usize, DriverError> {
    let volumes: Option<Value> = read_json(&paths.volumes_json, "VM's volume record")?;
    Ok(volumes
        .as_ref()
        .and_then(|v| v.get("volumes"))
        .and_then(Value::as_array)
        .map_or(0, Vec::len))
}

/// Starts `qemu-nbd` on the first free port that works; its pid, port and
/// export name.
async fn serve(
    shared: &Shared,
    vm: &VmEntry,
    top: &Path,
    kind: DiskExportKind,
    tls: Option<&str>,
) -> Result<(u32, u16, String), DriverError> {
    let paths = &vm.paths;
    std::fs::create_dir_all(&paths.run)
        .map_err(|e| DriverError::io("cannot create the VM run directory", &paths.run, e))?;
    let addr = shared.config.migration_address;
    let export = format!("stratus-cold-{}", vm.id);
    let pidfile = nbd_pidfile(paths);
    let log = nbd_log(paths);
    let mut last_error = None;
    for port in super::migrate::free_ports(addr, &shared.config.migration_ports) {
        remove_file_if_exists(&pidfile)?;
        let stderr = std::fs::File::create(&log)
            .map_err(|e| DriverError::io("cannot create the qemu-nbd log", &log, e))?;
        let mut cmd = tokio::process::Command::new(nbd_binary(&shared.config.qemu_img));
        cmd.arg("--fork")
            .arg("--pid-file")
            .arg(&pidfile)
            .arg("--read-only")
            .arg("--persistent")
            .arg(format!("--shared={NBD_CLIENTS}"))
            .args([
                "-f",
                if kind == DiskExportKind::Layer {
                    "raw"
                } else {
                    "qcow2"
                },
            ])
            .args(["-b", &addr.to_string()])
            .args(["-p", &port.to_string()])
            .args(["-x", &export]);
        if let Some(dir) = tls {
            cmd.arg("--object")
                .arg(format!(
                    "tls-creds-x509,id={TLS_ID},dir={},endpoint=server,verify-peer=on",
                    dir.replace(',', ",,")
                ))
                .arg(format!("--tls-creds={TLS_ID}"));
        }
        cmd.arg(top)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true);
        let status = tokio::time::timeout(NBD_START_TIMEOUT, cmd.status()).await;
        let status = match status {
            Ok(s) => s.map_err(|e| DriverError::io("cannot run qemu-nbd", top, e))?,
            Err(_) => {
                return Err(DriverError::timeout(format!(
                    "waiting {}s for qemu-nbd to serve the disk of VM {}",
                    NBD_START_TIMEOUT.as_secs(),
                    vm.id
                )))
            }
        };
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        if status.success() {
            if let Some(pid) = process::read_pidfile(&pidfile).filter(|pid| is_nbd_of(*pid, vm.id))
            {
                return Ok((pid, port, export));
            }
            return Err(DriverError::qemu(
                format!("qemu-nbd for VM {} started but wrote no pidfile", vm.id),
                QemuSaid(said),
            ));
        }
        // Most likely the port was taken since it was found free: next one.
        tracing::debug!(vm = %vm.id, port, said = %said.trim(), "qemu-nbd did not start");
        last_error = Some(DriverError::qemu(
            format!("qemu-nbd cannot serve the disk of VM {} ({status})", vm.id),
            QemuSaid(said),
        ));
    }
    Err(last_error.unwrap_or_else(|| {
        DriverError::Config(format!(
            "no free port in the migration port range {:?} on {addr}",
            shared.config.migration_ports
        ))
    }))
}

/// `qemu-nbd` beside the configured `qemu-img` (same installation), else
/// from `PATH`.
fn nbd_binary(qemu_img: &Path) -> PathBuf {
    match qemu_img.parent() {
        Some(dir) if qemu_img.is_absolute() => dir.join("qemu-nbd"),
        _ => PathBuf::from("qemu-nbd"),
    }
}

/// See [`crate::Driver::vm_disk_export_stop`].
pub(super) async fn export_stop(shared: &Arc<Shared>, id: VmId) -> Result<(), DriverError> {
    let vm = shared.entry(id);
    let _op = vm.op.lock().await;
    if !vm.paths.dir.exists() {
        lock(&shared.vms).remove(&id);
        return Ok(());
    }
    end_export(&vm).await
}

/// See [`crate::Driver::vm_release`] and the module docs.
pub(super) async fn release(shared: &Arc<Shared>, id: VmId) -> Result<(), DriverError> {
    let vm = shared.entry(id);
    let _op = vm.op.lock().await;
    let paths = &vm.paths;
    if !paths.dir.exists() {
        lock(&shared.vms).remove(&id);
        return Ok(());
    }
    let refuse = |state: String| DriverError::InvalidState {
        id,
        operation: "release",
        state,
    };
    if paths.vm_json.exists() {
        if std::fs::read_link(&paths.disks_link).is_err() {
            return Err(refuse(
                "keeping its disk in its own directory, not in a shared pool (releasing would \
                 delete the disk: destroy it once it was imported elsewhere)"
                    .into(),
            ));
        }
        refuse_if_exported(&vm, "release")?;
        if super::migrate::is_incoming(&vm) {
            return Err(refuse("waiting for an incoming live migration".into()));
        }
        if shared.ensure_adopted(&vm)?.is_some() || !process::find_qemu_of(id).is_empty() {
            return Err(refuse(format!(
                "{} (stop it first)",
                shared.read_record(&vm)?.state
            )));
        }
        let attached = attached_volumes(paths)?;
        if attached > 0 {
            return Err(refuse(format!(
                "attached to {attached} volume(s) of this host (detach them first)"
            )));
        }
    }
    // `remove_dir_all` removes the `disks` link, never what it points to.
    match std::fs::remove_dir_all(&paths.dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(DriverError::io(
                "cannot remove the VM directory",
                &paths.dir,
                e,
            ))
        }
    }
    lock(&shared.vms).remove(&id);
    tracing::info!(vm = %id, "VM released; its disks stay in the shared pool");
    Ok(())
}

// ---- destination ----------------------------------------------------------

/// See [`crate::Driver::vm_adopt_from_pool`] and the module docs.
pub(super) async fn adopt(shared: &Arc<Shared>, spec: &VmSpec) -> Result<(), DriverError> {
    super::check_moved_spec_files(spec)?;
    let invalid = |reason: String| DriverError::InvalidSpec {
        id: spec.id,
        reason,
    };
    let Some(pool) = &spec.pool else {
        return Err(invalid(
            "adopting from a pool needs the VM's pool (spec.pool)".into(),
        ));
    };
    let disks = pool_disk_dir(pool, spec.id);
    let chain: snapshot::Chain =
        read_json(&disks.join("snapshots.json"), "snapshot records")?.unwrap_or_default();
    let active = disks.join(&chain.active);
    if !active.is_file() {
        return Err(invalid(format!(
            "the pool holds no disk of the VM ({} does not exist on this host)",
            active.display()
        )));
    }
    let vm = shared.entry(spec.id);
    let _op = vm.op.lock().await;
    let paths = &vm.paths;
    if let Some(existing) = read_json::<VmSpec>(&paths.vm_json, "VM spec")? {
        if existing == *spec {
            return Ok(());
        }
        return Err(DriverError::Conflict {
            id: spec.id,
            difference: "it already exists on this host with another spec".into(),
        });
    }
    if super::migrate::is_incoming(&vm) {
        return Err(DriverError::Conflict {
            id: spec.id,
            difference: "it waits for an incoming live migration".into(),
        });
    }
    let made =
        super::begin_vm_files(paths, spec, false).and_then(|()| super::finish_vm_files(&vm, spec));
    if let Err(e) = made {
        // Only this host's directory: the disks are the pool's.
        let _ = std::fs::remove_dir_all(&paths.dir);
        lock(&shared.vms).remove(&spec.id);
        return Err(e);
    }
    tracing::info!(vm = %spec.id, pool = %pool.display(), snapshots = chain.snapshots.len(), "VM adopted from its shared pool");
    Ok(())
}

/// See [`crate::Driver::vm_disk_import`] and the module docs.
pub(super) async fn import(
    shared: &Arc<Shared>,
    spec: &VmSpec,
    from: &DiskExport,
    progress: &ProgressFn,
) -> Result<ImportOutcome, DriverError> {
    let started = Instant::now();
    super::check_moved_spec_files(spec)?;
    let invalid = |reason: String| DriverError::InvalidSpec {
        id: spec.id,
        reason,
    };
    if from.vm_id != spec.id {
        return Err(invalid(format!(
            "the export serves the disk of VM {}, not this one",
            from.vm_id
        )));
    }
    let vm = shared.entry(spec.id);
    let _op = vm.op.lock().await;
    let paths = &vm.paths;
    let record_path = import_path(paths);
    let record = read_json::<ImportRecord>(&record_path, "import record")?;
    if paths.vm_json.exists() {
        let existing = read_json::<VmSpec>(&paths.vm_json, "VM spec")?;
        return match record {
            Some(ImportRecord {
                request_id,
                outcome: Some(outcome),
            }) if request_id == from.request_id && existing.as_ref() == Some(spec) => Ok(outcome),
            _ => Err(DriverError::Conflict {
                id: spec.id,
                difference: "it already exists on this host".into(),
            }),
        };
    }
    if super::migrate::is_incoming(&vm) {
        return Err(DriverError::Conflict {
            id: spec.id,
            difference: "it waits for an incoming live migration".into(),
        });
    }
    if record.is_some() {
        tracing::info!(vm = %spec.id, "removing what an interrupted import left");
        remove_import(shared, &vm);
    }
    if let Some(pool) = &spec.pool {
        let disks = pool_disk_dir(pool, spec.id);
        let occupied = std::fs::read_dir(&disks).is_ok_and(|mut d| d.next().is_some());
        if occupied {
            return Err(DriverError::Conflict {
                id: spec.id,
                difference: format!(
                    "the pool already holds disks of this VM in {} (if the source shares this \
                     pool, move the VM with vm_adopt_from_pool instead of copying it)",
                    disks.display()
                ),
            });
        }
    }
    std::fs::create_dir_all(&paths.dir)
        .map_err(|e| DriverError::io("cannot create the VM directory", &paths.dir, e))?;
    write_json(
        &record_path,
        "import record",
        &ImportRecord {
            request_id: from.request_id,
            outcome: None,
        },
    )?;
    let built = async {
        super::begin_vm_files(paths, spec, true)?;
        let bytes_copied = copy_disk(shared, spec, paths, from, progress).await?;
        let bitmaps = snapshot::file_bitmaps(&shared.config.qemu_img, &paths.overlay())
            .await?
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        super::finish_vm_files(&vm, spec)?;
        let outcome = ImportOutcome {
            bytes_copied,
            duration_ms: ms(started.elapsed()),
            bitmaps,
        };
        write_json(
            &record_path,
            "import record",
            &ImportRecord {
                request_id: from.request_id,
                outcome: Some(outcome.clone()),
            },
        )?;
        Ok::<_, DriverError>(outcome)
    }
    .await;
    match built {
        Ok(outcome) => {
            tracing::info!(vm = %spec.id, ?outcome, "disk imported from a cold migration");
            Ok(outcome)
        }
        Err(e) => {
            tracing::warn!(vm = %spec.id, error = %e, "cold import failed; removing what it made");
            remove_import(shared, &vm);
            Err(e)
        }
    }
}

/// Removes everything a failed import made: its disk directory in the
/// pool (the import refuses to start in an occupied one, so it is the
/// import's own) and the VM directory. Best effort, logged. Caller holds
/// `vm.op`.
fn remove_import(shared: &Shared, vm: &VmEntry) {
    if let Ok(disks) = std::fs::read_link(&vm.paths.disks_link) {
        match std::fs::remove_dir_all(&disks) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(vm = %vm.id, path = %disks.display(), error = %e, "cannot remove a failed import's disks")
            }
        }
    }
    match std::fs::remove_dir_all(&vm.paths.dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(vm = %vm.id, path = %vm.paths.dir.display(), error = %e, "cannot remove a failed import's directory")
        }
    }
    lock(&shared.vms).remove(&vm.id);
}

/// The NBD client options of the export (`file` of a `json:` filename).
fn nbd_node(from: &DiskExport) -> Value {
    let mut node = json!({
        "driver": "nbd",
        "server": {"type": "inet", "host": from.host, "port": from.port.to_string()},
        "export": from.export,
    });
    if from.tls {
        node["tls-creds"] = json!(TLS_ID);
    }
    node
}

/// What `qemu-img convert` reads: the layer as a qcow2 over NBD backed by
/// this host's copy of the image (or by nothing), or the guest's view.
fn convert_source(spec: &VmSpec, from: &DiskExport) -> Result<String, DriverError> {
    let node = match from.kind {
        DiskExportKind::Layer => {
            let backing = match &from.base_image {
                Some(_) => {
                    let image = spec
                        .image
                        .to_str()
                        .ok_or_else(|| DriverError::InvalidSpec {
                            id: spec.id,
                            reason: format!("image path {} is not UTF-8", spec.image.display()),
                        })?;
                    json!({
                        "driver": spec.image_format.as_qemu_str(),
                        "file": {"driver": "file", "filename": image},
                    })
                }
                None => Value::Null,
            };
            json!({"driver": "qcow2", "file": nbd_node(from), "backing": backing})
        }
        DiskExportKind::Flat => json!({"driver": "raw", "file": nbd_node(from)}),
    };
    Ok(format!("json:{node}"))
}

/// Builds `disk.qcow2` from the export (into `disk.qcow2.tmp`, renamed when
/// whole), reporting progress; the guest data bytes written.
async fn copy_disk(
    shared: &Shared,
    spec: &VmSpec,
    paths: &VmPaths,
    from: &DiskExport,
    progress: &ProgressFn,
) -> Result<u64, DriverError> {
    let qemu_img = &shared.config.qemu_img;
    let tmp = paths.disks().join("disk.qcow2.tmp");
    remove_file_if_exists(&tmp)?;
    let mut args: Vec<std::ffi::OsString> = vec!["convert".into(), "-p".into()];
    let tls = if from.tls {
        super::migrate::tls_dir(shared)?.ok_or_else(|| {
            DriverError::Config(
                "the source serves the disk over TLS, but this host has no migration TLS \
                 directory"
                    .into(),
            )
        })?
    } else {
        String::new()
    };
    if from.tls {
        args.push("--object".into());
        args.push(
            format!(
                "tls-creds-x509,id={TLS_ID},dir={},endpoint=client",
                tls.replace(',', ",,")
            )
            .into(),
        );
    }
    if let Some(rate) = shared.config.cold_migration_bandwidth {
        args.push("-r".into());
        args.push(rate.to_string().into());
    }
    args.extend(["-O".into(), "qcow2".into()]);
    let total = match from.kind {
        DiskExportKind::Layer => {
            // qcow2 metadata: the bitmaps travel with the layer. An
            // inconsistent one (QEMU was killed) is left behind: the next
            // backup on the destination is then a full one, as it would
            // have been here.
            args.push("--bitmaps".into());
            args.push("--skip-broken-bitmaps".into());
            if from.base_image.is_some() {
                args.extend([
                    "-B".into(),
                    spec.image.clone().into_os_string(),
                    "-F".into(),
                    spec.image_format.as_qemu_str().into(),
                ]);
            }
            from.allocated_bytes
        }
        DiskExportKind::Flat => from.virtual_size,
    };
    args.push(convert_source(spec, from)?.into());
    args.push(tmp.clone().into_os_string());
    tracing::debug!(vm = %spec.id, ?args, "copying the disk of a cold migration");
    let converted = run_convert(qemu_img, &args, total, progress).await;
    let finished = converted.and_then(|()| {
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| DriverError::io("cannot flush the imported disk", &tmp, e))?;
        std::fs::rename(&tmp, paths.overlay()).map_err(|e| {
            DriverError::io(
                "cannot move the imported disk into place",
                paths.overlay(),
                e,
            )
        })
    });
    if let Err(e) = finished {
        let _ = remove_file_if_exists(&tmp);
        return Err(e);
    }
    snapshot::layer_bytes(qemu_img, &paths.overlay()).await
}

/// Runs `qemu-img convert -p`, turning its `(p/100%)` lines into progress
/// reports of `total` bytes.
async fn run_convert(
    qemu_img: &Path,
    args: &[std::ffi::OsString],
    total: u64,
    progress: &ProgressFn,
) -> Result<(), DriverError> {
    let mut child = tokio::process::Command::new(qemu_img)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| DriverError::io("cannot run qemu-img to copy the disk", qemu_img, e))?;
    let mut stderr = child.stderr.take();
    let stderr_task = tokio::spawn(async move {
        let mut text = String::new();
        if let Some(err) = stderr.as_mut() {
            let _ = err.read_to_string(&mut text).await;
        }
        text
    });
    progress(BackupProgress {
        done_bytes: 0,
        total_bytes: total,
    });
    if let Some(mut out) = child.stdout.take() {
        let mut pending = String::new();
        let mut buf = [0u8; 512];
        loop {
            let n = out.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            pending.push_str(&String::from_utf8_lossy(&buf[..n]));
            while let Some(end) = pending.find(['\r', '\n']) {
                let line: String = pending.drain(..=end).collect();
                if let Some(pct) = parse_percent(&line) {
                    progress(BackupProgress {
                        done_bytes: (total as f64 * pct / 100.0) as u64,
                        total_bytes: total,
                    });
                }
            }
        }
    }
    let status = child
        .wait()
        .await
        .map_err(|e| DriverError::io("cannot wait for qemu-img", qemu_img, e))?;
    let said = stderr_task.await.unwrap_or_default();
    if !status.success() {
        return Err(DriverError::qemu(
            format!("qemu-img failed to copy the disk from the source ({status})"),
            QemuSaid(said),
        ));
    }
    progress(BackupProgress {
        done_bytes: total,
        total_bytes: total,
    });
    Ok(())
}

/// `    (12.50/100%)` → 12.5.
fn parse_percent(line: &str) -> Option<f64> {
    let inner = line.trim().strip_prefix('(')?.strip_suffix("/100%)")?;
    inner
        .parse::<f64>()
        .ok()
        .filter(|p| (0.0..=100.0).contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::tests::spec;

    #[test]
    fn progress_lines_parse() {
        assert_eq!(parse_percent("    (12.50/100%)\r"), Some(12.5));
        assert_eq!(parse_percent("(100.00/100%)"), Some(100.0));
        assert_eq!(parse_percent("garbage"), None);
        assert_eq!(parse_percent("(250/100%)"), None);
    }

    fn export(kind: DiskExportKind, base: Option<&str>) -> DiskExport {
        DiskExport {
            request_id: uuid::Uuid::new_v4(),
            vm_id: VmId::new(),
            host: "10.0.0.1".into(),
            port: 49152,
            export: "stratus-cold-x".into(),
            kind,
            virtual_size: 1 << 30,
            base_image: base.map(PathBuf::from),
            allocated_bytes: 1 << 20,
            tls: true,
        }
    }

    fn source_json(s: &str) -> Value {
        serde_json::from_str(s.strip_prefix("json:").expect("json: prefix")).expect("json")
    }

    #[test]
    fn a_layer_is_opened_over_this_hosts_image() {
        let s = spec();
        let v = source_json(
            &convert_source(&s, &export(DiskExportKind::Layer, Some("/src/img"))).expect("src"),
        );
        assert_eq!(v["driver"], "qcow2");
        assert_eq!(v["file"]["driver"], "nbd");
        assert_eq!(v["file"]["server"]["port"], "49152");
        assert_eq!(v["file"]["tls-creds"], TLS_ID);
        assert_eq!(v["backing"]["file"]["filename"], "/images/base.qcow2");
        let v =
            source_json(&convert_source(&s, &export(DiskExportKind::Layer, None)).expect("src"));
        assert_eq!(
            v["backing"],
            Value::Null,
            "a standalone layer has no backing"
        );
        let v = source_json(
            &convert_source(&s, &export(DiskExportKind::Flat, Some("/src/img"))).expect("src"),
        );
        assert_eq!(v["driver"], "raw");
    }

    #[test]
    fn only_qemu_nbd_is_taken_for_the_export_server() {
        assert!(!is_nbd_of(std::process::id(), VmId::new()));
        assert_eq!(
            nbd_binary(Path::new("/opt/q/bin/qemu-img")),
            Path::new("/opt/q/bin/qemu-nbd")
        );
        assert_eq!(nbd_binary(Path::new("qemu-img")), Path::new("qemu-nbd"));
    }
}
