//! Claims never overbook: many parallel creates against hosts with room for
//! exactly K VMs end with exactly K placed and the rest refused with an
//! explanation — on SQLite, on PostgreSQL, and with two controllers (two
//! stores, two schedulers with their own stale indexes) on one PostgreSQL.

use std::sync::Arc;

use stratus_api_types::agent::HostFacts;
use stratus_api_types::views::{GroupPolicy, VmDesiredState, VmPlacement, VmState};
use stratus_common::{Error, FlavorId, ImageId, JobId, ProjectId, Role, VmId};
use stratus_datastore::model::NewJob;
use stratus_datastore::{Datastore, NewHost, NewToken, NewVm};
use stratus_scheduler::{PendingVm, Scheduler};

const GIB: u64 = 1 << 30;

struct Fixture {
    project: ProjectId,
    flavor: FlavorId,
    image: ImageId,
}

/// Hosts with 2, 2 and 1 GiB of memory (and plenty of everything else):
/// room for exactly five 1 GiB VMs.
async fn fixture(ds: &Datastore) -> Fixture {
    let admin = ds
        .token_create(NewToken {
            name: "admin",
            role: Role::Admin,
            project_id: None,
            token_hash: &format!("hash-{}", uuid::Uuid::new_v4()),
            prefix: "x",
            expires_at: None,
        })
        .await
        .expect("token");
    let hash = format!("enroll-{}", uuid::Uuid::new_v4());
    ds.enrollment_token_create(&hash, admin.id, i64::MAX / 2, 10)
        .await
        .expect("enrollment token");
    for (i, mem) in [2 * GIB, 2 * GIB, GIB].into_iter().enumerate() {
        let facts = HostFacts {
            cpus: 16,
            memory_bytes: mem,
            disk_bytes: 1000 * GIB,
            qemu_version: None,
            accel: None,
            driver: "sim".into(),
            migration_tls: false,
        };
        ds.host_enroll(
            &hash,
            &NewHost {
                name: &format!("host-{i}"),
                zone: "z1",
                cluster: "default",
                address: "127.0.0.1",
                facts: &facts,
                tags: &[],
                credential_hash: &format!("cred-{}", uuid::Uuid::new_v4()),
            },
        )
        .await
        .expect("enroll");
    }
    let project = ds.project_create("proj", "").await.expect("project").id;
    let flavor = ds
        .flavor_create("one", 1, GIB, 10 * GIB)
        .await
        .expect("flavor")
        .id;
    let image = ds
        .image_create(
            ImageId::new(),
            project,
            "img",
            stratus_api_types::views::ImageVisibility::Private,
            None,
        )
        .await
        .expect("image")
        .id;
    Fixture {
        project,
        flavor,
        image,
    }
}

fn pending(fx: &Fixture, name: &str, group: Option<stratus_common::ServerGroupId>) -> PendingVm {
    let id = VmId::new();
    PendingVm {
        vm: NewVm {
            id,
            project_id: fx.project,
            name: name.to_string(),
            flavor_id: fx.flavor,
            image_id: fx.image,
            vcpus: 1,
            memory_bytes: GIB,
            disk_bytes: 10 * GIB,
            desired_state: VmDesiredState::Running,
            server_group_id: group,
            placement: VmPlacement::default(),
            restart_policy: Default::default(),
            restore_from: None,
            pool_id: None,
        },
        job: NewJob {
            id: JobId::new(),
            project_id: Some(fx.project),
            kind: "vm_create".into(),
            target_kind: "vm",
            target_id: id.as_uuid(),
            params: serde_json::json!({}),
            idempotency_key: None,
        },
    }
}

/// Fires `n` creates per scheduler at once; returns (placed, refused).
async fn race(schedulers: &[Arc<Scheduler>], fx: &Arc<Fixture>, n: usize) -> (usize, usize) {
    let mut tasks = Vec::new();
    for (s_i, s) in schedulers.iter().enumerate() {
        for i in 0..n {
            let (s, fx) = (s.clone(), fx.clone());
            tasks.push(tokio::spawn(async move {
                s.create_vms(vec![pending(&fx, &format!("vm-{s_i}-{i}"), None)], None)
                    .await
            }));
        }
    }
    let (mut placed, mut refused) = (0, 0);
    for t in tasks {
        match t.await.expect("task") {
            Ok(v) => {
                assert_eq!(v.len(), 1);
                assert!(v[0].0.host_id.is_some(), "a created VM has its host");
                placed += 1;
            }
            Err(Error::NoCapacity { message, details }) => {
                assert!(
                    message.contains("memory"),
                    "explains the refusal: {message}"
                );
                assert_eq!(details["feasible"], 0, "{details}");
                assert!(
                    details["eliminated"]
                        .as_array()
                        .is_some_and(|a| !a.is_empty()),
                    "{details}"
                );
                refused += 1;
            }
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
    (placed, refused)
}

/// Every host's stored allocation equals the sum of its VMs, within its
/// capacity.
async fn check_allocations(ds: &Datastore) {
    let snap = ds.scheduler_snapshot().await.expect("snapshot");
    for h in &snap.hosts {
        let (cpu, mem, disk) = ds.host_allocated(h.id).await.expect("sum");
        assert_eq!(
            (h.alloc_vcpus, h.alloc_memory_bytes, h.alloc_disk_bytes),
            (cpu, mem, disk),
            "host {} allocation matches its VMs",
            h.name
        );
        assert!(mem <= h.memory_bytes, "host {} not overbooked", h.name);
    }
}

async fn exactly_k_placed(dss: Vec<Datastore>) {
    let fx = Arc::new(fixture(&dss[0]).await);
    let mut schedulers = Vec::new();
    for ds in &dss {
        schedulers.push(Scheduler::load(ds.clone()).await.expect("scheduler"));
    }
    let per = 24 / dss.len();
    let (placed, refused) = race(&schedulers, &fx, per).await;
    assert_eq!(placed, 5, "exactly the five slots are taken");
    assert_eq!(refused, per * dss.len() - 5);
    check_allocations(&dss[0]).await;
    let creating = dss[0]
        .vm_list(
            &stratus_datastore::VmListFilter {
                state: Some(VmState::Creating),
                ..Default::default()
            },
            &stratus_datastore::PageRequest::first(100),
        )
        .await
        .expect("list");
    assert_eq!(creating.items.len(), 5, "no VM row without its claim");
}

#[tokio::test]
async fn sqlite_parallel_creates_take_exactly_the_room_there_is() {
    let dir = tempfile::tempdir().expect("dir");
    let ds = Datastore::open(&stratus_test_utils::sqlite_url(dir.path()))
        .await
        .expect("open");
    exactly_k_placed(vec![ds]).await;
}

#[tokio::test]
async fn postgres_parallel_creates_take_exactly_the_room_there_is() {
    let url = stratus_test_utils::postgres_url().await;
    let ds = Datastore::open(&url).await.expect("open");
    exactly_k_placed(vec![ds]).await;
}

#[tokio::test]
async fn two_controllers_on_one_postgres_never_overbook() {
    let url = stratus_test_utils::postgres_url().await;
    let a = Datastore::open(&url).await.expect("open a");
    let b = Datastore::open(&url).await.expect("open b");
    exactly_k_placed(vec![a, b]).await;
}

/// Hard anti-affinity across two controllers: members of one group never
/// share a host, even though each controller's index is stale about the
/// other's placements.
#[tokio::test]
async fn two_controllers_honour_hard_anti_affinity() {
    let url = stratus_test_utils::postgres_url().await;
    let a = Datastore::open(&url).await.expect("open a");
    let b = Datastore::open(&url).await.expect("open b");
    let fx = Arc::new(fixture(&a).await);
    let group = a
        .server_group_create(fx.project, "spread", GroupPolicy::AntiAffinity)
        .await
        .expect("group")
        .id;
    let sa = Scheduler::load(a.clone()).await.expect("a");
    let sb = Scheduler::load(b.clone()).await.expect("b");
    let mut tasks = Vec::new();
    for i in 0..6 {
        let s = if i % 2 == 0 { sa.clone() } else { sb.clone() };
        let fx = fx.clone();
        tasks.push(tokio::spawn(async move {
            s.create_vms(
                vec![pending(&fx, &format!("m-{i}"), Some(group))],
                Some((group, GroupPolicy::AntiAffinity)),
            )
            .await
        }));
    }
    let mut hosts = Vec::new();
    for t in tasks {
        if let Ok(v) = t.await.expect("task") {
            hosts.push(v[0].0.host_id.expect("placed"));
        }
    }
    let distinct: std::collections::BTreeSet<_> = hosts.iter().collect();
    assert_eq!(hosts.len(), 3, "one member per host, three hosts");
    assert_eq!(distinct.len(), hosts.len(), "no two members share a host");
    check_allocations(&a).await;
}

/// A batch is all or nothing: six VMs do not fit in five slots, so none is
/// recorded and nothing stays claimed.
#[tokio::test]
async fn a_batch_that_does_not_fit_leaves_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let ds = Datastore::open(&stratus_test_utils::sqlite_url(dir.path()))
        .await
        .expect("open");
    let fx = fixture(&ds).await;
    let s = Scheduler::load(ds.clone()).await.expect("scheduler");
    let six = (0..6)
        .map(|i| pending(&fx, &format!("b-{i}"), None))
        .collect();
    let e = s.create_vms(six, None).await.expect_err("does not fit");
    assert_eq!(e.error_code(), "no_host_available");
    assert!(e.to_string().contains("5 of 6"), "{e}");
    check_allocations(&ds).await;
    let five = (0..5)
        .map(|i| pending(&fx, &format!("c-{i}"), None))
        .collect();
    assert_eq!(s.create_vms(five, None).await.expect("fits").len(), 5);
    check_allocations(&ds).await;
}

/// The revision watch's incremental read: a claim marks its host's desired
/// state as changed now, so a read since just before finds that host and
/// only hosts changed since then.
#[tokio::test]
async fn a_claim_marks_its_host_desired_state_changed() {
    let dir = tempfile::tempdir().expect("dir");
    let ds = Datastore::open(&stratus_test_utils::sqlite_url(dir.path()))
        .await
        .expect("open");
    let fx = fixture(&ds).await;
    let s = Scheduler::load(ds.clone()).await.expect("scheduler");
    assert_eq!(ds.host_revisions(0).await.expect("all").len(), 3);
    let before = stratus_common::time::now_micros();
    assert!(ds.host_revisions(before).await.expect("since").is_empty());
    let made = s
        .create_vms(vec![pending(&fx, "one", None)], None)
        .await
        .expect("placed");
    let host = made[0].0.host_id.expect("host");
    let changed = ds.host_revisions(before).await.expect("since");
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert_eq!(changed[0].0, host);
}

/// A move goes only to a host with the source's migration transport: QEMU's
/// two ends must agree on TLS, so any other host could only fail the
/// migration. A named host with the other setting is refused up front,
/// naming TLS.
#[tokio::test]
async fn moves_stay_between_hosts_with_the_same_migration_transport() {
    let dir = tempfile::tempdir().expect("dir");
    let ds = Datastore::open(&stratus_test_utils::sqlite_url(dir.path()))
        .await
        .expect("open");
    let fx = fixture(&ds).await;
    let s = Scheduler::load(ds.clone()).await.expect("scheduler");
    let made = s
        .create_vms(vec![pending(&fx, "mover", None)], None)
        .await
        .expect("placed");
    let vm = ds.vm_get(made[0].0.id).await.expect("vm");
    let source = vm.host_id.expect("placed");
    let hosts = ds
        .host_list(
            &stratus_datastore::HostListFilter::default(),
            &stratus_datastore::PageRequest::first(10),
        )
        .await
        .expect("hosts")
        .items;
    let others: Vec<_> = hosts.iter().filter(|h| h.id != source).collect();
    let (tls_peer, plain_peer) = (others[0], others[1]);
    let set_tls = |id, tls| {
        let ds = ds.clone();
        let s = &s;
        async move {
            let h = ds.host_get(id).await.expect("host");
            let facts = HostFacts {
                cpus: h.cpus,
                memory_bytes: h.memory_bytes,
                disk_bytes: h.disk_bytes,
                qemu_version: None,
                accel: None,
                driver: "sim".into(),
                migration_tls: tls,
            };
            let h = ds.host_heartbeat(id, &facts).await.expect("heartbeat");
            assert_eq!(h.migration_tls, tls, "stored");
            s.host_changed(&h);
        }
    };
    set_tls(source, true).await;
    set_tls(tls_peer.id, true).await;
    // From a TLS host: only the other TLS host, whichever is emptier.
    assert_eq!(
        s.choose_move(&vm, None, None, &[], None)
            .expect("a TLS host"),
        tls_peer.id
    );
    let e = s
        .choose_move(
            &vm,
            None,
            None,
            &[],
            Some((plain_peer.id, &plain_peer.name)),
        )
        .expect_err("a plain host named");
    assert_eq!(e.error_code(), "no_host_available");
    assert!(
        e.to_string()
            .contains("the VM's host uses TLS for migrations and"),
        "{e}"
    );
    // From a plain host: only the plain one.
    set_tls(source, false).await;
    assert_eq!(
        s.choose_move(&vm, None, None, &[], None)
            .expect("a plain host"),
        plain_peer.id
    );
    let e = s
        .choose_move(&vm, None, None, &[], Some((tls_peer.id, &tls_peer.name)))
        .expect_err("a TLS host named");
    assert!(
        e.to_string().contains("does not use TLS for migrations"),
        "{e}"
    );
    // With no host of its kind left, the refusal explains by the tag.
    set_tls(plain_peer.id, true).await;
    let e = s
        .choose_move(&vm, None, None, &[], None)
        .expect_err("none left");
    assert!(
        e.to_string().contains("no other host can take the VM"),
        "{e}"
    );
    assert!(
        e.to_string().contains("2 carry a forbidden tag")
            && e.to_string().contains("migration transport, here plain"),
        "{e}"
    );
}
