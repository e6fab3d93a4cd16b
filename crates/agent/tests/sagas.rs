//! Generated saga tests: for every saga (create, start, stop, reboot,
//! delete, backup, in-place restore, snapshot create, revert and delete,
//! volume attach and detach),
//! against a real controller and a real agent on the simulated
//! driver,
//! - every action runs twice and the operation ends exactly as it does
//!   once;
//! - a failure injected at each step unwinds to a clean slate: the store's
//!   rows (the VM and its state, intent and job), the host's allocation and
//!   what the host itself runs are as before the operation;
//! - the same with every undo run twice.
//!
//! Faults are injected through steno (`SagaEngine::inject`), so the real
//! actions and undos run, not stand-ins.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{cloud, sim, start_agent, wait_for, Cloud};
use stratus_agent::AgentHandle;
use stratus_client::types::{Allocation, Job, JobState, Vm, VmDesiredState, VmState};
use stratus_common::VmId;
use stratus_driver::{Driver, SimDriver, VmRuntimeState};
use stratus_jobs::{sagas::node_names, Injection, JobKind};

const JOB: Duration = Duration::from_secs(40);

struct Rig {
    cloud: Cloud,
    _files: tempfile::TempDir,
    _dir: tempfile::TempDir,
    agent: AgentHandle,
    sim: Arc<SimDriver>,
    host: String,
    /// For a migration: the destination host (its agent, driver and dir),
    /// kept in maintenance until the operation so the VM starts on `host`.
    second: Option<(AgentHandle, Arc<SimDriver>, tempfile::TempDir)>,
}

const SECOND: &str = "sim-sagas-2";

async fn rig() -> Rig {
    rig_for(JobKind::VmCreate).await
}

async fn rig_for(kind: JobKind) -> Rig {
    let mut rig = first_host().await;
    if kind == JobKind::VmMigrate {
        let dir = tempfile::tempdir().expect("tempdir");
        let sim2 = sim();
        let agent2 = start_agent(&rig.cloud, dir.path(), SECOND, sim2.clone()).await;
        wait_for("the second host to enroll", JOB, || async {
            rig.cloud
                .admin
                .host_view()
                .host(SECOND)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await;
        rig.maintenance(SECOND, true).await;
        rig.second = Some((agent2, sim2, dir));
    }
    rig
}

async fn first_host() -> Rig {
    let (cloud, files) = cloud().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = sim();
    let agent = start_agent(&cloud, dir.path(), "sim-sagas", sim.clone()).await;
    wait_for("the host to enroll", JOB, || async {
        let hosts = cloud
            .admin
            .host_list()
            .send()
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        if hosts.items.is_empty() {
            Err("no host yet".to_string())
        } else {
            Ok(())
        }
    })
    .await;
    Rig {
        cloud,
        _files: files,
        _dir: dir,
        agent,
        sim,
        host: "sim-sagas".into(),
        second: None,
    }
}

impl Rig {
    async fn shutdown(self) {
        if let Some((agent2, _, _)) = self.second {
            agent2.shutdown().await;
        }
        self.agent.shutdown().await;
    }

    async fn maintenance(&self, host: &str, on: bool) {
        self.cloud
            .admin
            .host_maintenance()
            .host(host)
            .body(stratus_client::types::HostMaintenanceSet { enabled: on })
            .send()
            .await
            .expect("host_maintenance");
    }

    /// What the migration's destination runs of the VM.
    async fn second_state(&self, vm: &Vm) -> Option<VmRuntimeState> {
        let (_, sim2, _) = self.second.as_ref().expect("a second host");
        sim2.vm_status(VmId(vm.id.0))
            .await
            .expect("vm_status")
            .map(|s| s.state)
    }

    async fn allocated(&self) -> (u64, u64, u64) {
        self.allocated_on(&self.host).await
    }

    async fn allocated_on(&self, host: &str) -> (u64, u64, u64) {
        let a = self
            .cloud
            .admin
            .host_view()
            .host(host)
            .send()
            .await
            .expect("host_view")
            .into_inner()
            .allocated;
        let Allocation {
            vcpus,
            memory_bytes,
            disk_bytes,
        } = a;
        (vcpus, memory_bytes, disk_bytes)
    }

    async fn sim_state(&self, vm: &Vm) -> Option<VmRuntimeState> {
        self.sim
            .vm_status(VmId(vm.id.0))
            .await
            .expect("vm_status")
            .map(|s| s.state)
    }

    async fn find(&self, vm: &Vm) -> Option<Vm> {
        match self
            .cloud
            .admin
            .vm_view()
            .vm(vm.id.to_string())
            .send()
            .await
        {
            Ok(v) => Some(v.into_inner()),
            Err(e) if e.status().map(|s| s.as_u16()) == Some(404) => None,
            Err(e) => panic!("vm_view: {e}"),
        }
    }

    /// A VM in the state the operation starts from.
    async fn precondition(&self, kind: JobKind) -> Option<Vm> {
        if kind == JobKind::VmCreate {
            return None;
        }
        let (vm, job) = self.cloud.vm_create("p", "web", "small", "img").await;
        self.cloud.job_succeeds(&job, JOB).await;
        if matches!(kind, JobKind::VmBackup | JobKind::VmRestore) {
            let dir = self._dir.path().join("backups");
            std::fs::create_dir_all(&dir).expect("backup dir");
            self.cloud
                .admin
                .backup_target_create()
                .body(stratus_client::types::BackupTargetCreate {
                    name: "t".parse().expect("name"),
                    path: dir.to_string_lossy().into_owned(),
                })
                .send()
                .await
                .expect("backup target");
        }
        if kind == JobKind::VmRestore {
            // A restore point to restore.
            let op = self
                .cloud
                .admin
                .backup_create()
                .vm(vm.id.to_string())
                .body(stratus_client::types::BackupCreate {
                    full: Some(false),
                    target: None,
                })
                .send()
                .await
                .expect("backup_create")
                .into_inner();
            self.cloud.job_succeeds(&op.job, JOB).await;
        }
        if matches!(kind, JobKind::VmVolumeAttach | JobKind::VmVolumeDetach) {
            self.cloud
                .admin
                .volume_create()
                .body(stratus_client::types::VolumeCreate {
                    name: "v1".parse().expect("name"),
                    project: Some("p".into()),
                    size_bytes: 16 << 20,
                    image: None,
                    pool: None,
                })
                .send()
                .await
                .expect("volume_create");
        }
        if kind == JobKind::VmVolumeDetach {
            let op = self
                .cloud
                .admin
                .volume_attach()
                .volume("v1")
                .project("p")
                .body(stratus_client::types::VolumeAttach {
                    vm: vm.id.to_string(),
                })
                .send()
                .await
                .expect("volume_attach")
                .into_inner();
            self.cloud.job_succeeds(&op.job, JOB).await;
        }
        if matches!(kind, JobKind::VmSnapshotDelete | JobKind::VmSnapshotRevert) {
            let op = self
                .cloud
                .admin
                .snapshot_create()
                .vm(vm.id.to_string())
                .body(stratus_client::types::SnapshotCreate { name: "s1".into() })
                .send()
                .await
                .expect("snapshot_create")
                .into_inner();
            self.cloud.job_succeeds(&op.job, JOB).await;
        }
        if matches!(
            kind,
            JobKind::VmStart | JobKind::VmRestore | JobKind::VmSnapshotRevert
        ) {
            let op = self
                .cloud
                .admin
                .vm_stop()
                .vm(vm.id.to_string())
                .send()
                .await
                .expect("vm_stop")
                .into_inner();
            self.cloud.job_succeeds(&op.job, JOB).await;
        }
        Some(self.cloud.vm(&vm.id).await)
    }

    /// Runs the operation; returns the VM it acted on and its job.
    async fn operate(&self, kind: JobKind, vm: Option<&Vm>) -> (Vm, Job) {
        let a = &self.cloud.admin;
        let id = || vm.expect("a VM").id.to_string();
        let op = match kind {
            JobKind::VmCreate => {
                let (vm, job) = self.cloud.vm_create("p", "web", "small", "img").await;
                return (vm, job);
            }
            JobKind::VmStart => a.vm_start().vm(id()).send().await,
            JobKind::VmStop => a.vm_stop().vm(id()).send().await,
            JobKind::VmReboot => a.vm_reboot().vm(id()).send().await,
            JobKind::VmDelete => a.vm_delete().vm(id()).send().await,
            JobKind::VmBackup => {
                let op = a
                    .backup_create()
                    .vm(id())
                    .body(stratus_client::types::BackupCreate {
                        full: Some(false),
                        target: None,
                    })
                    .send()
                    .await
                    .expect("backup accepted")
                    .into_inner();
                return (self.cloud.vm(&op.backup.vm_id).await, op.job);
            }
            JobKind::VmSnapshotCreate | JobKind::VmSnapshotDelete => {
                let op = if kind == JobKind::VmSnapshotCreate {
                    a.snapshot_create()
                        .vm(id())
                        .body(stratus_client::types::SnapshotCreate { name: "s2".into() })
                        .send()
                        .await
                } else {
                    a.snapshot_delete().vm(id()).snapshot("s1").send().await
                }
                .expect("snapshot operation accepted")
                .into_inner();
                return (self.cloud.vm(&op.snapshot.vm_id).await, op.job);
            }
            JobKind::VmSnapshotRevert => a.snapshot_revert().vm(id()).snapshot("s1").send().await,
            JobKind::VmMigrate => {
                self.maintenance(SECOND, false).await;
                a.vm_migrate()
                    .vm(id())
                    .body(stratus_client::types::VmMigrate {
                        host: Some(SECOND.into()),
                        cold: None,
                        bandwidth: None,
                        auto_converge: None,
                        postcopy_after_passes: None,
                        pool: None,
                    })
                    .send()
                    .await
            }
            JobKind::VmVolumeAttach | JobKind::VmVolumeDetach => {
                let op = if kind == JobKind::VmVolumeAttach {
                    a.volume_attach()
                        .volume("v1")
                        .project("p")
                        .body(stratus_client::types::VolumeAttach { vm: id() })
                        .send()
                        .await
                } else {
                    a.volume_detach().volume("v1").project("p").send().await
                }
                .expect("volume operation accepted")
                .into_inner();
                let vm = vm.expect("a VM");
                return (self.cloud.vm(&vm.id).await, op.job);
            }
            JobKind::VmRestore => {
                let backups = a
                    .backup_list()
                    .vm(id())
                    .send()
                    .await
                    .expect("backup_list")
                    .into_inner();
                let last = backups.items.last().expect("a backup");
                a.backup_restore()
                    .backup(last.id.to_string())
                    .body(stratus_client::types::BackupRestore {
                        as_vm: None,
                        in_place: Some(true),
                        start: None,
                    })
                    .send()
                    .await
            }
        }
        .expect("operation accepted")
        .into_inner();
        (op.vm, op.job)
    }
}

/// What the host runs for a VM in this state.
fn runtime(state: VmState) -> Option<VmRuntimeState> {
    match state {
        VmState::Running => Some(VmRuntimeState::Running),
        VmState::Stopped => Some(VmRuntimeState::Stopped),
        _ => None,
    }
}

/// Every action twice: the operation ends as it does with each once.
async fn repeat_actions(kind: JobKind) {
    let rig = rig_for(kind).await;
    let before = rig.precondition(kind).await;
    rig.cloud
        .server
        .as_ref()
        .and_then(|s| s.saga_engine())
        .expect("engine")
        .inject(kind, Injection::RepeatActions);
    let (vm, job) = rig.operate(kind, before.as_ref()).await;
    let j = rig.cloud.job_succeeds(&job, JOB).await;
    let (want, desired) = match kind {
        JobKind::VmStop | JobKind::VmRestore | JobKind::VmSnapshotRevert => {
            (Some(VmState::Stopped), VmDesiredState::Stopped)
        }
        JobKind::VmDelete => (None, VmDesiredState::Deleted),
        _ => (Some(VmState::Running), VmDesiredState::Running),
    };
    let now = rig.find(&vm).await;
    if kind == JobKind::VmMigrate {
        // On the destination, running; nothing left on the source.
        let now = now.expect("the VM exists");
        assert_eq!(now.state, VmState::Running, "{now:?}");
        let second = rig.cloud.admin.host_view().host(SECOND).send().await;
        let second = second.expect("host_view").into_inner();
        assert_eq!(
            now.host_id.as_ref().map(|h| h.0),
            Some(second.id.0),
            "{now:?}"
        );
        assert!(now.migration_target.is_none(), "{now:?}");
        assert_eq!(rig.second_state(&now).await, Some(VmRuntimeState::Running));
        assert_eq!(rig.sim_state(&now).await, None, "the source still has it");
        assert_eq!(rig.allocated().await, (0, 0, 0));
        assert_eq!(rig.allocated_on(SECOND).await.0, u64::from(now.vcpus));
    } else {
        match want {
            Some(state) => {
                let now = now.expect("the VM exists");
                assert_eq!(now.state, state, "{now:?}");
                assert_eq!(now.desired_state, desired, "{now:?}");
                assert_eq!(rig.sim_state(&now).await, runtime(state));
                assert_eq!(rig.allocated().await.0, u64::from(now.vcpus));
            }
            None => {
                assert!(now.is_none(), "deleted VM still listed: {now:?}");
                assert_eq!(rig.sim_state(&vm).await, None, "the host still has it");
                assert_eq!(rig.allocated().await.0, 0);
            }
        }
    }
    // The steps really ran twice (each records its step in the job's log).
    let first = node_names(kind)[0];
    let runs = j.events.iter().filter(|e| e.step == first).count();
    assert_eq!(
        runs, 2,
        "step {first} should have run twice: {:?}",
        j.events
    );
    rig.shutdown().await;
}

/// A failure at `node` (with every undo run `undos` times): the job fails
/// and nothing of the operation is left.
async fn fail_at(kind: JobKind, node: &'static str, repeat_undos: bool) {
    let rig = rig_for(kind).await;
    let before = rig.precondition(kind).await;
    let alloc_before = rig.allocated().await;
    let sim_before = match &before {
        Some(v) => rig.sim_state(v).await,
        None => None,
    };
    let injection = if repeat_undos {
        Injection::FailRepeatingUndos(node)
    } else {
        Injection::Fail(node)
    };
    rig.cloud
        .server
        .as_ref()
        .and_then(|s| s.saga_engine())
        .expect("engine")
        .inject(kind, injection);
    let (vm, job) = rig.operate(kind, before.as_ref()).await;
    let j = rig.cloud.job_ends(&job, JOB).await;
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    assert_eq!(
        j.error.as_ref().map(|e| e.code.as_str()),
        Some("injected_error"),
        "{j:?}"
    );
    // Undo ran for every step before the failed one, twice when asked.
    let undos = j.events.iter().filter(|e| e.step == "undo").count();
    let failed_first = node == node_names(kind)[0];
    let expected = match (failed_first, repeat_undos) {
        // Nothing before it to undo; a create still discards its VM once.
        (true, _) => usize::from(kind == JobKind::VmCreate),
        (false, false) => 1,
        (false, true) => 2,
    };
    assert_eq!(undos, expected, "undo steps: {:?}", j.events);
    if matches!(kind, JobKind::VmSnapshotCreate | JobKind::VmSnapshotDelete) {
        // A failed take leaves no snapshot (recorded or on the host); a
        // failed delete leaves it as it was.
        let names: Vec<String> = rig
            .cloud
            .admin
            .snapshot_list()
            .vm(vm.id.to_string())
            .send()
            .await
            .expect("snapshot_list")
            .into_inner()
            .into_iter()
            .map(|s| format!("{}:{}", s.name, s.status))
            .collect();
        let on_host: Vec<String> = rig
            .sim
            .vm_snapshot_list(VmId(vm.id.0))
            .await
            .expect("sim snapshots")
            .into_iter()
            .map(|s| s.name)
            .collect();
        if kind == JobKind::VmSnapshotCreate {
            assert!(names.is_empty(), "{names:?}");
            wait_for("the host to drop the snapshot", JOB, || async {
                let n = rig
                    .sim
                    .vm_snapshot_list(VmId(vm.id.0))
                    .await
                    .map(|v| v.len())
                    .unwrap_or(0);
                if n == 0 {
                    Ok(())
                } else {
                    Err(format!("{n} left"))
                }
            })
            .await;
        } else if node == node_names(kind)[2] {
            // Past the merge there is no way back: deleted on both sides.
            assert!(names.is_empty(), "{names:?}");
            assert!(on_host.is_empty(), "{on_host:?}");
        } else {
            assert_eq!(names, vec!["s1:ready".to_string()]);
            assert_eq!(on_host, vec!["s1".to_string()]);
        }
    }
    if matches!(kind, JobKind::VmVolumeAttach | JobKind::VmVolumeDetach) {
        // A failed attach leaves the volume available and attached nowhere;
        // a failed detach leaves it attached, unless it failed past the
        // host's detach (no way back; it is then available).
        let v = rig
            .cloud
            .admin
            .volume_view()
            .volume("v1")
            .project("p")
            .send()
            .await
            .expect("volume_view")
            .into_inner();
        let want_attached = kind == JobKind::VmVolumeDetach && node != node_names(kind)[2];
        let expected = if want_attached {
            stratus_client::types::VolumeStatus::Attached
        } else {
            stratus_client::types::VolumeStatus::Available
        };
        assert_eq!(v.status, expected, "{v:?}");
        let id = v.id.0;
        wait_for("the host to agree on the attachment", JOB, || async {
            let on_host = rig
                .sim
                .volume_info(id)
                .await
                .expect("volume_info")
                .and_then(|i| i.attached_to);
            if on_host.is_some() == want_attached {
                Ok(())
            } else {
                Err(format!("{on_host:?}"))
            }
        })
        .await;
    }
    if kind == JobKind::VmMigrate && node == node_names(kind)[3] {
        // Past the hand-over there is no way back: the VM runs on the
        // destination, which is where the store says it is, and nothing
        // of it is left on the source (its claim included).
        let now = rig.find(&vm).await.expect("the VM exists");
        let second = rig.cloud.admin.host_view().host(SECOND).send().await;
        let second = second.expect("host_view").into_inner();
        assert_eq!(
            now.host_id.as_ref().map(|h| h.0),
            Some(second.id.0),
            "{now:?}"
        );
        assert!(now.migration_target.is_none(), "{now:?}");
        assert_eq!(rig.second_state(&now).await, Some(VmRuntimeState::Running));
        assert_eq!(rig.sim_state(&now).await, None);
        assert_eq!(rig.allocated().await, (0, 0, 0));
        assert_eq!(rig.allocated_on(SECOND).await.0, u64::from(now.vcpus));
        rig.shutdown().await;
        return;
    }
    if kind == JobKind::VmBackup {
        // Never a restore point.
        let backups = rig
            .cloud
            .admin
            .backup_list()
            .vm(vm.id.to_string())
            .send()
            .await
            .expect("backup_list")
            .into_inner();
        let last = backups.items.last().expect("the backup's record");
        assert_eq!(
            last.status,
            stratus_client::types::BackupStatus::Failed,
            "{last:?}"
        );
    }

    match before {
        None => {
            // A create: no record, no claim, nothing on the host.
            assert!(rig.find(&vm).await.is_none(), "the VM record is left");
            assert_eq!(rig.allocated().await, alloc_before);
            wait_for("the host to drop the VM", JOB, || async {
                match rig.sim_state(&vm).await {
                    None => Ok(()),
                    Some(s) => Err(format!("{s:?}")),
                }
            })
            .await;
        }
        Some(before) => {
            // The VM as it was: its intent, its state (once the host
            // converged back), its allocation, what the host runs.
            let now = wait_for("the VM to be as before", JOB, || async {
                let v = rig.find(&before).await.expect("the VM exists");
                if v.state == before.state && v.desired_state == before.desired_state {
                    Ok(v)
                } else {
                    Err(format!("{} / {}", v.state, v.desired_state))
                }
            })
            .await;
            assert_eq!(
                now.host_id.as_ref().map(|h| h.to_string()),
                before.host_id.as_ref().map(|h| h.to_string())
            );
            assert_eq!(rig.allocated().await, alloc_before);
            if kind == JobKind::VmMigrate {
                // Nothing on the destination: no claim, no VM.
                assert!(now.migration_target.is_none(), "{now:?}");
                assert_eq!(rig.allocated_on(SECOND).await, (0, 0, 0));
                wait_for("the destination to have nothing", JOB, || async {
                    match rig.second_state(&before).await {
                        None => Ok(()),
                        Some(s) => Err(format!("{s:?}")),
                    }
                })
                .await;
            }
            wait_for("the host to run the VM as before", JOB, || async {
                let s = rig.sim_state(&before).await;
                if s == sim_before {
                    Ok(())
                } else {
                    Err(format!("{s:?}, want {sim_before:?}"))
                }
            })
            .await;
            // The VM is free for the next operation.
            let next = if now.state == VmState::Running {
                JobKind::VmReboot
            } else {
                JobKind::VmStart
            };
            let (_, job) = rig.operate(next, Some(&now)).await;
            rig.cloud.job_succeeds(&job, JOB).await;
        }
    }
    rig.shutdown().await;
}

macro_rules! saga_tests {
    ($($name:ident: $kind:expr;)*) => {
        $(
            mod $name {
                use super::*;

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn every_action_twice() {
                    repeat_actions($kind).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn fail_first_step() {
                    fail_at($kind, node_names($kind)[0], false).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn fail_second_step() {
                    fail_at($kind, node_names($kind)[1], false).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn fail_last_step_every_undo_twice() {
                    let last = node_names($kind).last().copied().unwrap_or_default();
                    fail_at($kind, last, true).await;
                }
            }
        )*
    };
}

saga_tests! {
    vm_create: JobKind::VmCreate;
    vm_start: JobKind::VmStart;
    vm_stop: JobKind::VmStop;
    vm_reboot: JobKind::VmReboot;
    vm_delete: JobKind::VmDelete;
    vm_backup: JobKind::VmBackup;
    vm_restore: JobKind::VmRestore;
    vm_snapshot_create: JobKind::VmSnapshotCreate;
    vm_snapshot_revert: JobKind::VmSnapshotRevert;
    vm_snapshot_delete: JobKind::VmSnapshotDelete;
    vm_volume_attach: JobKind::VmVolumeAttach;
    vm_volume_detach: JobKind::VmVolumeDetach;
    vm_migrate: JobKind::VmMigrate;
}

#[test]
fn every_saga_has_generated_tests() {
    // A new JobKind must be added to `saga_tests!` above.
    assert_eq!(JobKind::ALL.len(), 13);
    for kind in JobKind::ALL {
        assert!(node_names(kind).len() >= 2, "{kind}");
    }
}

/// `Idempotency-Key` on an operation: a retry (its answer lost) gets the
/// first request's job, not a second operation; the key on another
/// operation is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_honour_idempotency_keys() {
    let rig = rig().await;
    let vm = rig.precondition(JobKind::VmStop).await.expect("a VM");
    let http = reqwest::Client::new();
    let post = |path: String, key: &'static str| {
        http.post(format!("{}{path}", rig.cloud.url))
            .bearer_auth(&rig.cloud.admin_token)
            .header("idempotency-key", key)
            .send()
    };
    let stop = format!("/v1/vms/{}/stop", vm.id);
    let first = post(stop.clone(), "stop-1").await.expect("stop");
    assert_eq!(first.status().as_u16(), 202);
    let first: serde_json::Value = first.json().await.expect("json");
    let job_id = first["job"]["id"].as_str().expect("job id").to_string();
    let again = post(stop.clone(), "stop-1").await.expect("stop again");
    assert_eq!(again.status().as_u16(), 202);
    let again: serde_json::Value = again.json().await.expect("json");
    assert_eq!(again["job"]["id"], job_id.as_str(), "the same job");
    let jobs = rig
        .cloud
        .admin
        .job_list()
        .kind("vm_stop")
        .send()
        .await
        .expect("jobs")
        .into_inner();
    assert_eq!(jobs.items.len(), 1, "one stop, not two");
    // After the job ended, still the same job.
    let stopped = wait_for("the stop to end", JOB, || async {
        let v = rig.find(&vm).await.expect("vm");
        if v.state == VmState::Stopped {
            Ok(v)
        } else {
            Err(v.state.to_string())
        }
    })
    .await;
    let late = post(stop, "stop-1").await.expect("stop late");
    assert_eq!(late.status().as_u16(), 202);
    let late: serde_json::Value = late.json().await.expect("json");
    assert_eq!(late["job"]["id"], job_id.as_str());
    // The key on a different operation is a conflict.
    let start = post(format!("/v1/vms/{}/start", stopped.id), "stop-1")
        .await
        .expect("start");
    assert_eq!(start.status().as_u16(), 409);
    let body: serde_json::Value = start.json().await.expect("json");
    assert_eq!(body["error_code"], "idempotency_key_in_use", "{body}");
    rig.agent.shutdown().await;
}
