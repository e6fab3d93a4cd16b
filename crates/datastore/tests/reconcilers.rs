//! What the reconcilers read and write, on both backends: leader leases
//! (including races between controllers), restart policies and automatic
//! restarts with their crash-loop limit, and orphan VMs reported by hosts.

use stratus_api_types::agent::{
    HostFacts, ObservedVmState, OrphanAction, PoolReport, VmObservation,
};
use stratus_api_types::views::{
    HostState, ImageVisibility, JobState, RestartPolicy, VmDesiredState, VmPlacement, VmState,
    VolumeStatus,
};
use stratus_common::time::now_micros;
use stratus_common::{HostId, ImageId, JobId, Role, VmId};
use stratus_datastore::model::{NewJob, VmRecord};
use stratus_datastore::*;

async fn sqlite() -> (Datastore, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let ds = Datastore::open(&stratus_test_utils::sqlite_url(dir.path()))
        .await
        .expect("open sqlite");
    (ds, dir)
}

async fn postgres() -> (Datastore, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let ds = Datastore::open(&stratus_test_utils::postgres_url().await)
        .await
        .expect("open postgres");
    (ds, dir)
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[tokio::test] async fn $name() { super::$name(&super::sqlite().await.0).await; })*
        }
        mod on_postgres {
            $(#[tokio::test] async fn $name() { super::$name(&super::postgres().await.0).await; })*
        }
    };
}

both_backends!(
    leases_are_held_by_one_holder_at_a_time,
    concurrent_acquirers_of_a_lease_have_one_winner,
    restart_policy_is_recorded_at_create_and_changed_later,
    crashed_vms_are_restarted_within_their_limit_then_given_up,
    a_new_window_and_the_operator_rearm_automatic_restarts,
    only_crashed_on_crash_vms_on_up_hosts_are_restarted,
    concurrent_restarts_of_one_vm_start_it_once,
    orphans_are_recorded_listed_and_forgotten,
    old_host_requests_are_forgotten,
    shared_pools_are_seen_claimed_and_released,
    pool_volumes_claim_their_size_and_give_it_back,
    moves_claim_the_target_and_release_exactly_one_host,
);

const SEC: i64 = 1_000_000;

async fn leases_are_held_by_one_holder_at_a_time(ds: &Datastore) {
    let now = now_micros();
    assert_eq!(ds.lease_holder("r").await.expect("holder"), None);
    assert!(ds
        .lease_acquire("r", "a", now, now + 10 * SEC)
        .await
        .expect("a takes"));
    let held = ds.lease_holder("r").await.expect("holder").expect("held");
    assert_eq!(
        held,
        LeaseRecord {
            name: "r".into(),
            holder: "a".into(),
            expires_at: now + 10 * SEC
        }
    );
    // Another holder is refused while it lasts, and changes nothing.
    assert!(!ds
        .lease_acquire("r", "b", now + SEC, now + 11 * SEC)
        .await
        .expect("b tries"));
    assert_eq!(ds.lease_holder("r").await.expect("h").expect("held"), held);
    // The holder renews.
    assert!(ds
        .lease_acquire("r", "a", now + 2 * SEC, now + 12 * SEC)
        .await
        .expect("a renews"));
    assert_eq!(
        ds.lease_holder("r")
            .await
            .expect("h")
            .expect("held")
            .expires_at,
        now + 12 * SEC
    );
    // Other names are other leases.
    assert!(ds
        .lease_acquire("other", "b", now, now + SEC)
        .await
        .expect("b takes another"));
    // Expired: anyone may take it.
    assert!(!ds
        .lease_acquire("r", "b", now + 12 * SEC - 1, now + 20 * SEC)
        .await
        .expect("not yet"));
    assert!(ds
        .lease_acquire("r", "b", now + 12 * SEC, now + 22 * SEC)
        .await
        .expect("b takes the expired lease"));
    assert_eq!(
        ds.lease_holder("r").await.expect("h").expect("held").holder,
        "b"
    );
    // Only the holder releases; then it is free at once.
    assert!(!ds
        .lease_release("r", "a")
        .await
        .expect("a is not the holder"));
    assert!(ds.lease_release("r", "b").await.expect("b releases"));
    assert!(!ds.lease_release("r", "b").await.expect("twice"));
    assert_eq!(ds.lease_holder("r").await.expect("holder"), None);
    assert!(ds
        .lease_acquire("r", "a", now + 13 * SEC, now + 23 * SEC)
        .await
        .expect("a takes the released lease"));
}

/// Many acquirers at once, for a free lease and then for an expired one:
/// exactly one wins each time.
async fn concurrent_acquirers_of_a_lease_have_one_winner(ds: &Datastore) {
    race(&vec![ds.clone(); 24], "free").await;
    let now = now_micros();
    assert!(ds
        .lease_acquire("expired", "old", now - 2 * SEC, now - SEC)
        .await
        .expect("old lease"));
    race(&vec![ds.clone(); 24], "expired").await;
}

/// Every store in `stores` (several controllers, or several tasks of one)
/// asks for `name` at once as a holder of its own; asserts one winner.
async fn race(stores: &[Datastore], name: &str) {
    let now = now_micros();
    let mut set = tokio::task::JoinSet::new();
    for (i, ds) in stores.iter().enumerate() {
        let ds = ds.clone();
        let name = name.to_string();
        set.spawn(async move {
            let holder = format!("c{i}");
            let won = ds
                .lease_acquire(&name, &holder, now, now + 10 * SEC)
                .await
                .expect("acquire");
            (holder, won)
        });
    }
    let mut winners = Vec::new();
    while let Some(r) = set.join_next().await {
        let (holder, won) = r.expect("task");
        if won {
            winners.push(holder);
        }
    }
    assert_eq!(winners.len(), 1, "winners for {name}: {winners:?}");
    let held = stores[0]
        .lease_holder(name)
        .await
        .expect("holder")
        .expect("held");
    assert_eq!(held.holder, winners[0]);
}

/// Three controllers (three pools) on one PostgreSQL race for one lease.
#[tokio::test]
async fn controllers_on_postgres_race_for_a_lease_and_one_wins() {
    let url = stratus_test_utils::postgres_url().await;
    let mut stores = Vec::new();
    for _ in 0..3 {
        stores.push(Datastore::open(&url).await.expect("open"));
    }
    for round in 0..5 {
        let many: Vec<Datastore> = stores.iter().cycle().take(30).cloned().collect();
        race(&many, &format!("round-{round}")).await;
    }
}

// ---- restart policy and automatic restarts ----

struct World {
    project: stratus_common::ProjectId,
    flavor: stratus_common::FlavorId,
    image: ImageId,
    host: HostId,
}

/// A project, flavor, image, and one host that is up.
async fn world(ds: &Datastore) -> World {
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
    let facts = HostFacts {
        cpus: 16,
        memory_bytes: 64 << 30,
        disk_bytes: 1 << 40,
        qemu_version: None,
        accel: None,
        driver: "sim".into(),
        migration_tls: false,
    };
    let host = ds
        .host_enroll(
            &hash,
            &NewHost {
                name: "h1",
                zone: "z",
                cluster: "default",
                address: "127.0.0.1",
                facts: &facts,
                tags: &[],
                credential_hash: &format!("cred-{}", uuid::Uuid::new_v4()),
            },
        )
        .await
        .expect("enroll")
        .id;
    let project = ds.project_create("p", "").await.expect("project").id;
    let flavor = ds
        .flavor_create("small", 1, 128 << 20, 1 << 30)
        .await
        .expect("flavor")
        .id;
    let image = ds
        .image_create(
            ImageId::new(),
            project,
            "img",
            ImageVisibility::Private,
            None,
        )
        .await
        .expect("image")
        .id;
    World {
        project,
        flavor,
        image,
        host,
    }
}

fn job(w: &World, kind: &str, vm: VmId) -> NewJob {
    NewJob {
        id: JobId::new(),
        project_id: Some(w.project),
        kind: kind.to_string(),
        target_kind: "vm",
        target_id: vm.as_uuid(),
        params: serde_json::json!({}),
        idempotency_key: None,
    }
}

fn to_create(w: &World, name: &str, policy: RestartPolicy) -> VmToCreate {
    let id = VmId::new();
    VmToCreate {
        vm: NewVm {
            id,
            project_id: w.project,
            name: name.into(),
            flavor_id: w.flavor,
            image_id: w.image,
            vcpus: 1,
            memory_bytes: 128 << 20,
            disk_bytes: 1 << 30,
            desired_state: VmDesiredState::Running,
            server_group_id: None,
            placement: VmPlacement::default(),
            restart_policy: policy,
            restore_from: None,
            pool_id: None,
        },
        job: job(w, "vm_create", id),
        host: Some(w.host),
    }
}

/// Finishes the job holding `vm` (as a runner would): the VM is running.
async fn finish_running(ds: &Datastore, vm: VmId) {
    let held = ds.vm_get(vm).await.expect("vm");
    let job = held.active_job_id.expect("a job holds the VM");
    let claimed = ds
        .job_claim_next("runner", now_micros() + 60 * SEC)
        .await
        .expect("claim")
        .expect("a queued job");
    assert_eq!(claimed.id, job);
    ds.job_finish(
        job,
        "runner",
        JobOutcome::Succeeded,
        Some(VmEffect::Update {
            vm_id: vm,
            state: VmState::Running,
            state_reason: None,
            host_id: held.host_id,
            desired_state: None,
        }),
    )
    .await
    .expect("finish");
}

/// A running VM with `policy`, its create job done.
async fn running_vm(ds: &Datastore, w: &World, name: &str, policy: RestartPolicy) -> VmRecord {
    let c = to_create(w, name, policy);
    let id = c.vm.id;
    ds.vms_create(&[c], None).await.expect("create");
    finish_running(ds, id).await;
    ds.vm_get(id).await.expect("vm")
}

/// The host reports the VM crashed (each call a newer observation).
async fn crash(ds: &Datastore, w: &World, vm: VmId, reason: &str) {
    let applied = ds
        .vm_apply_observation(
            w.host,
            &VmObservation {
                vm_id: vm,
                generation: u64::try_from(now_micros()).expect("positive"),
                state: ObservedVmState::Crashed,
                reason: Some(reason.into()),
                reboot_generation: 0,
                guest: None,
                intent_generation: None,
            },
        )
        .await
        .expect("observation");
    assert!(applied);
}

const LIMIT: RestartLimit = RestartLimit {
    max: 2,
    window_micros: 600 * SEC,
};

async fn auto_restart(ds: &Datastore, w: &World, vm: VmId, now: i64) -> AutoRestart {
    ds.vm_auto_restart(vm, LIMIT, now, job(w, "vm_start", vm))
        .await
        .expect("auto restart")
}

fn started(r: AutoRestart) -> (VmRecord, i64) {
    match r {
        AutoRestart::Started { vm, job, attempt } => {
            assert_eq!(job.kind, "vm_start");
            assert_eq!(job.state, JobState::Queued);
            assert_eq!(vm.active_job_id, Some(job.id));
            (*vm, attempt)
        }
        other => panic!("expected a restart, got {other:?}"),
    }
}

async fn candidates(ds: &Datastore) -> Vec<VmId> {
    ds.vm_restart_candidates(100)
        .await
        .expect("candidates")
        .into_iter()
        .map(|v| v.id)
        .collect()
}

async fn restart_policy_is_recorded_at_create_and_changed_later(ds: &Datastore) {
    let w = world(ds).await;
    // One create alone, and two combined (the group-commit path).
    let one = to_create(&w, "one", RestartPolicy::OnCrash);
    let (v, _) = ds
        .vm_create_with_job(one.vm.clone(), one.job.clone())
        .await
        .expect("create");
    assert_eq!(v.restart_policy, RestartPolicy::OnCrash);
    assert_eq!(
        ds.vm_get(v.id).await.expect("vm").restart_policy,
        RestartPolicy::OnCrash
    );
    let items = [
        to_create(&w, "two", RestartPolicy::OnCrash),
        to_create(&w, "three", RestartPolicy::Never),
    ];
    let done = ds.vms_create(&items, None).await.expect("batch");
    assert_eq!(done.len(), 2);
    for (i, want) in [RestartPolicy::OnCrash, RestartPolicy::Never]
        .into_iter()
        .enumerate()
    {
        assert_eq!(done[i].0.restart_policy, want);
        assert_eq!(
            ds.vm_get(items[i].vm.id).await.expect("vm").restart_policy,
            want
        );
    }
    let changed = ds
        .vm_set_restart_policy(items[1].vm.id, RestartPolicy::OnCrash)
        .await
        .expect("set");
    assert_eq!(changed.restart_policy, RestartPolicy::OnCrash);
    assert_eq!(
        ds.vm_set_restart_policy(VmId::new(), RestartPolicy::Never)
            .await
            .expect_err("unknown VM")
            .error_code(),
        "not_found"
    );
}

async fn crashed_vms_are_restarted_within_their_limit_then_given_up(ds: &Datastore) {
    let w = world(ds).await;
    let vm = running_vm(ds, &w, "web", RestartPolicy::OnCrash).await;
    assert!(candidates(ds).await.is_empty(), "running: nothing to do");
    let revision = ds.host_get(w.host).await.expect("host").desired_revision;

    let t0 = now_micros();
    crash(ds, &w, vm.id, "QEMU exited").await;
    assert_eq!(candidates(ds).await, vec![vm.id]);
    let (after, attempt) = started(auto_restart(ds, &w, vm.id, t0).await);
    assert_eq!(attempt, 1);
    assert_eq!(after.state, VmState::Starting);
    assert_eq!(after.desired_state, VmDesiredState::Running);
    assert!(
        after.generation > vm.generation,
        "a new intent for the host"
    );
    let reason = after.state_reason.clone().expect("reason");
    assert!(
        reason.contains("automatic restart 1 of at most 2 within 10 min")
            && reason.contains("QEMU exited"),
        "{reason}"
    );
    assert!(
        ds.host_get(w.host).await.expect("host").desired_revision > revision,
        "the host hears of it"
    );
    // Held by its job: not a candidate, and a second try does nothing.
    assert!(candidates(ds).await.is_empty());
    assert!(matches!(
        auto_restart(ds, &w, vm.id, t0).await,
        AutoRestart::NotEligible
    ));

    // Second crash within the window: the second (last) restart.
    finish_running(ds, vm.id).await;
    crash(ds, &w, vm.id, "QEMU exited again").await;
    let (_, attempt) = started(auto_restart(ds, &w, vm.id, t0 + 60 * SEC).await);
    assert_eq!(attempt, 2);

    // Third crash within the window: given up, with the reason, for good.
    finish_running(ds, vm.id).await;
    crash(ds, &w, vm.id, "QEMU exited a third time").await;
    let gave_up = match auto_restart(ds, &w, vm.id, t0 + 120 * SEC).await {
        AutoRestart::GaveUp { vm } => *vm,
        other => panic!("expected to give up, got {other:?}"),
    };
    assert_eq!(gave_up.state, VmState::Crashed);
    assert!(gave_up.active_job_id.is_none());
    assert!(gave_up.auto_restart_given_up_at.is_some());
    let reason = gave_up.state_reason.clone().expect("reason");
    assert!(
        reason.contains("automatic restarts given up") && reason.contains("a third time"),
        "{reason}"
    );
    assert!(candidates(ds).await.is_empty());
    assert!(matches!(
        auto_restart(ds, &w, vm.id, t0 + 3600 * SEC).await,
        AutoRestart::NotEligible
    ));
    // Later reports of the same crash keep the reason that says so.
    crash(ds, &w, vm.id, "still down").await;
    let shown = ds.vm_get(vm.id).await.expect("vm");
    assert_eq!(shown.state, VmState::Crashed);
    assert_eq!(shown.state_reason, Some(reason));
}

async fn a_new_window_and_the_operator_rearm_automatic_restarts(ds: &Datastore) {
    let w = world(ds).await;
    let vm = running_vm(ds, &w, "web", RestartPolicy::OnCrash).await;
    let t0 = now_micros();
    // Two restarts (the limit) ...
    for (i, at) in [t0, t0 + SEC].into_iter().enumerate() {
        crash(ds, &w, vm.id, "boom").await;
        let (_, attempt) = started(auto_restart(ds, &w, vm.id, at).await);
        assert_eq!(attempt, i as i64 + 1);
        finish_running(ds, vm.id).await;
    }
    // ... but the next crash comes after the window: a new window.
    crash(ds, &w, vm.id, "boom").await;
    let (_, attempt) = started(auto_restart(ds, &w, vm.id, t0 + 601 * SEC).await);
    assert_eq!(attempt, 1, "a crash after the window opens a new one");
    finish_running(ds, vm.id).await;

    // Given up within the new window ...
    let t1 = t0 + 601 * SEC;
    crash(ds, &w, vm.id, "boom").await;
    started(auto_restart(ds, &w, vm.id, t1 + SEC).await);
    finish_running(ds, vm.id).await;
    crash(ds, &w, vm.id, "boom").await;
    assert!(matches!(
        auto_restart(ds, &w, vm.id, t1 + 2 * SEC).await,
        AutoRestart::GaveUp { .. }
    ));
    // ... the operator's start resets the record.
    let (v, _) = ds
        .vm_begin_operation(
            vm.id,
            VmDesiredState::Running,
            VmState::Starting,
            false,
            job(&w, "vm_start", vm.id),
        )
        .await
        .expect("operator start");
    assert_eq!(v.auto_restarts, 0);
    assert!(v.auto_restart_given_up_at.is_none() && v.auto_restart_window_at.is_none());
    finish_running(ds, vm.id).await;
    crash(ds, &w, vm.id, "boom").await;
    let (_, attempt) = started(auto_restart(ds, &w, vm.id, t1 + 3 * SEC).await);
    assert_eq!(attempt, 1);
    finish_running(ds, vm.id).await;

    // Given up again; setting the policy re-arms too.
    crash(ds, &w, vm.id, "boom").await;
    started(auto_restart(ds, &w, vm.id, t1 + 4 * SEC).await);
    finish_running(ds, vm.id).await;
    crash(ds, &w, vm.id, "boom").await;
    assert!(matches!(
        auto_restart(ds, &w, vm.id, t1 + 5 * SEC).await,
        AutoRestart::GaveUp { .. }
    ));
    assert!(candidates(ds).await.is_empty());
    ds.vm_set_restart_policy(vm.id, RestartPolicy::OnCrash)
        .await
        .expect("re-arm");
    assert_eq!(candidates(ds).await, vec![vm.id]);
    let (_, attempt) = started(auto_restart(ds, &w, vm.id, t1 + 6 * SEC).await);
    assert_eq!(attempt, 1);
}

async fn only_crashed_on_crash_vms_on_up_hosts_are_restarted(ds: &Datastore) {
    let w = world(ds).await;
    let never = running_vm(ds, &w, "never", RestartPolicy::Never).await;
    let on_crash = running_vm(ds, &w, "on-crash", RestartPolicy::OnCrash).await;
    crash(ds, &w, never.id, "boom").await;
    assert!(candidates(ds).await.is_empty(), "policy never");
    assert!(matches!(
        auto_restart(ds, &w, never.id, now_micros()).await,
        AutoRestart::NotEligible
    ));
    assert_eq!(
        ds.vm_get(never.id).await.expect("vm").state,
        VmState::Crashed,
        "left as it is"
    );
    // A VM that was asked to stop is not restarted.
    ds.vm_set_desired(on_crash.id, VmDesiredState::Stopped)
        .await
        .expect("desired");
    crash(ds, &w, on_crash.id, "boom").await;
    assert!(candidates(ds).await.is_empty(), "not wanted running");
    ds.vm_set_desired(on_crash.id, VmDesiredState::Running)
        .await
        .expect("desired");
    assert_eq!(candidates(ds).await, vec![on_crash.id]);
    // Its host silent: not now.
    assert_eq!(
        ds.host_mark_unreachable(now_micros() + 60 * SEC)
            .await
            .expect("mark"),
        1
    );
    assert_eq!(
        ds.host_get(w.host).await.expect("host").state,
        HostState::Unreachable
    );
    assert!(candidates(ds).await.is_empty(), "host unreachable");
    assert!(matches!(
        auto_restart(ds, &w, on_crash.id, now_micros()).await,
        AutoRestart::NotEligible
    ));
    ds.hosts_heard(&[w.host], now_micros())
        .await
        .expect("heard");
    assert_eq!(candidates(ds).await, vec![on_crash.id]);
    assert!(matches!(
        ds.vm_auto_restart(
            VmId::new(),
            LIMIT,
            now_micros(),
            job(&w, "vm_start", VmId::new())
        )
        .await
        .expect("unknown VM"),
        AutoRestart::NotEligible
    ));
}

/// Two controllers restarting one VM at once: one start, one job.
async fn concurrent_restarts_of_one_vm_start_it_once(ds: &Datastore) {
    let w = world(ds).await;
    let vm = running_vm(ds, &w, "web", RestartPolicy::OnCrash).await;
    crash(ds, &w, vm.id, "boom").await;
    let now = now_micros();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let ds = ds.clone();
        let j = job(&w, "vm_start", vm.id);
        set.spawn(async move { ds.vm_auto_restart(vm.id, LIMIT, now, j).await });
    }
    let mut starts = 0;
    while let Some(r) = set.join_next().await {
        match r.expect("task").expect("auto restart") {
            AutoRestart::Started { .. } => starts += 1,
            AutoRestart::NotEligible => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(starts, 1);
    let jobs = ds
        .job_list(
            &JobListFilter {
                kind: Some("vm_start"),
                ..Default::default()
            },
            &PageRequest::first(100),
        )
        .await
        .expect("jobs");
    assert_eq!(jobs.items.len(), 1, "one job, no strays");
    assert_eq!(ds.vm_get(vm.id).await.expect("vm").auto_restarts, 1);
}

// ---- orphans ----

async fn orphans_are_recorded_listed_and_forgotten(ds: &Datastore) {
    let w = world(ds).await;
    let (kept, destroyed) = (VmId::new(), VmId::new());
    let t = now_micros();
    ds.hosts_heard(&[w.host], t).await.expect("heard");
    assert!(ds
        .host_orphans_seen(w.host, &[], t)
        .await
        .expect("nothing")
        .is_empty());
    let new = ds
        .host_orphans_seen(
            w.host,
            &[
                (kept, OrphanAction::Kept),
                (destroyed, OrphanAction::Destroyed),
            ],
            t,
        )
        .await
        .expect("seen");
    assert_eq!(new.len(), 2);
    // Reported again: nothing new; first seen stays, last seen moves.
    let again = ds
        .host_orphans_seen(w.host, &[(kept, OrphanAction::Kept)], t + SEC)
        .await
        .expect("seen again");
    assert!(again.is_empty());
    let listed = ds.host_orphans(w.host).await.expect("list");
    assert_eq!(listed.len(), 2);
    let k = listed.iter().find(|o| o.vm_id == kept).expect("kept");
    assert_eq!(
        (k.action, k.first_seen_at, k.last_seen_at),
        (OrphanAction::Kept, t, t + SEC)
    );
    let d = listed
        .iter()
        .find(|o| o.vm_id == destroyed)
        .expect("destroyed");
    assert_eq!(d.action, OrphanAction::Destroyed);
    // Pruning: a kept orphan stays while its host is silent, or while the
    // host's reports without it span less than the grace period.
    assert_eq!(
        ds.host_orphans_prune(30 * SEC, t - SEC)
            .await
            .expect("prune"),
        0
    );
    ds.hosts_heard(&[w.host], t + 20 * SEC)
        .await
        .expect("heard");
    assert_eq!(
        ds.host_orphans_prune(30 * SEC, t - SEC)
            .await
            .expect("prune"),
        0
    );
    ds.hosts_heard(&[w.host], t + 40 * SEC)
        .await
        .expect("heard");
    assert_eq!(
        ds.host_orphans_prune(30 * SEC, t - SEC)
            .await
            .expect("prune"),
        1
    );
    let listed = ds.host_orphans(w.host).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].vm_id, destroyed);
    // Destroyed ones go once old enough.
    assert_eq!(
        ds.host_orphans_prune(30 * SEC, t + SEC)
            .await
            .expect("prune"),
        1
    );
    assert!(ds.host_orphans(w.host).await.expect("list").is_empty());
}

/// Host requests answered or expired before the cut-off go; pending and
/// recent ones stay.
async fn old_host_requests_are_forgotten(ds: &Datastore) {
    let w = world(ds).await;
    let payload = serde_json::json!({"kind": "verify_backup", "file": "/b/x.qcow2"});
    let far = i64::MAX / 2;
    let answered = ds
        .host_request_create(w.host, None, "verify_backup", &payload, far)
        .await
        .expect("request");
    ds.host_request_answer(answered, w.host, None, Some("no"))
        .await
        .expect("answer");
    let pending = ds
        .host_request_create(w.host, None, "verify_backup", &payload, far)
        .await
        .expect("request");
    let expired = ds
        .host_request_create(w.host, None, "verify_backup", &payload, 1)
        .await
        .expect("request");
    // A cut-off in the past keeps all but the long-expired one.
    assert_eq!(ds.host_requests_prune(1, 2).await.expect("prune"), 1);
    assert!(ds.host_request_get(expired).await.is_err());
    // A cut-off now forgets the answered one; the pending one stays.
    let now = stratus_common::time::now_micros() + 1;
    assert_eq!(ds.host_requests_prune(now, now).await.expect("prune"), 1);
    assert!(ds.host_request_get(answered).await.is_err());
    assert!(ds.host_request_get(pending).await.is_ok());
}

/// A shared pool: hosts that report it usable list it (for the scheduler);
/// VMs in it claim their disks against its capacity, never beyond, and not
/// against their host's own disk; removing a VM gives its share back; a
/// pool in use cannot be deleted.
async fn shared_pools_are_seen_claimed_and_released(ds: &Datastore) {
    let w = world(ds).await;
    let pool = ds.pool_create("shared", "/srv/pool").await.expect("pool");
    let dup = ds
        .pool_create("shared", "/srv/other")
        .await
        .expect_err("dup");
    assert_eq!(dup.error_code(), "name_in_use");
    let dup = ds
        .pool_create("other", "/srv/pool")
        .await
        .expect_err("dup path");
    assert_eq!(dup.error_code(), "name_in_use");

    let ok = PoolReport {
        pool_id: pool.id,
        error: None,
        total_bytes: 10 << 30,
        available_bytes: 8 << 30,
    };
    assert!(ds
        .host_report_pools(w.host, std::slice::from_ref(&ok))
        .await
        .expect("report"));
    assert!(!ds
        .host_report_pools(w.host, std::slice::from_ref(&ok))
        .await
        .expect("again"));
    assert_eq!(
        ds.host_get(w.host).await.expect("host").pools,
        vec!["shared"]
    );
    let p = ds.pool_get(pool.id).await.expect("get");
    assert_eq!((p.capacity_bytes, p.available_bytes), (10 << 30, 8 << 30));
    let hosts = ds.pool_hosts(pool.id).await.expect("hosts");
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0].error, None);

    // Two 4 GiB disks fit the 10 GiB pool; a third does not, and nothing
    // of it is written.
    let in_pool = |name: &str| {
        let mut c = to_create(&w, name, RestartPolicy::Never);
        c.vm.disk_bytes = 4 << 30;
        c.vm.pool_id = Some(pool.id);
        c
    };
    let a = in_pool("a");
    let b = in_pool("b");
    ds.vms_create(std::slice::from_ref(&a), None)
        .await
        .expect("a");
    ds.vms_create(std::slice::from_ref(&b), None)
        .await
        .expect("b");
    let c = in_pool("c");
    let refused = match ds.vms_create(std::slice::from_ref(&c), None).await {
        Err(CreateError::Other(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(refused.error_code(), "no_host_available");
    assert!(
        refused
            .to_string()
            .contains("storage pool shared has room for 2147483648"),
        "{refused}"
    );
    assert!(ds.vm_get(c.vm.id).await.is_err());
    assert_eq!(
        ds.pool_get(pool.id).await.expect("get").alloc_bytes,
        8 << 30
    );
    let vm = ds.vm_get(a.vm.id).await.expect("a");
    assert_eq!(vm.pool_id, Some(pool.id));
    // The host's own disk is not claimed; its other resources are.
    let host = ds.host_get(w.host).await.expect("host");
    assert_eq!(host.alloc_disk_bytes, 0);
    assert_eq!(host.alloc_vcpus, 2);
    assert_eq!(ds.host_allocated(w.host).await.expect("sum").2, 0);

    let busy = ds.pool_delete(pool.id).await.expect_err("in use");
    assert_eq!(busy.error_code(), "pool_in_use");

    // Removing a VM gives its share back.
    assert!(ds.vm_discard(a.vm.id, a.job.id).await.expect("discard"));
    assert_eq!(
        ds.pool_get(pool.id).await.expect("get").alloc_bytes,
        4 << 30
    );

    // A host that no longer sees the pool stops listing it.
    let lost = PoolReport {
        error: Some("gone".into()),
        total_bytes: 0,
        available_bytes: 0,
        ..ok
    };
    assert!(ds.host_report_pools(w.host, &[lost]).await.expect("lost"));
    assert!(ds.host_get(w.host).await.expect("host").pools.is_empty());
    assert_eq!(
        ds.pool_hosts(pool.id).await.expect("hosts")[0]
            .error
            .as_deref(),
        Some("gone")
    );

    assert!(ds.vm_discard(b.vm.id, b.job.id).await.expect("discard"));
    assert_eq!(ds.pool_get(pool.id).await.expect("get").alloc_bytes, 0);
    ds.pool_delete(pool.id).await.expect("delete");
    assert!(ds.pool_hosts(pool.id).await.expect("hosts").is_empty());
    assert_eq!(
        ds.pool_delete(pool.id)
            .await
            .expect_err("gone")
            .error_code(),
        "not_found"
    );
}

/// A volume in a shared pool claims its size in the create transaction
/// (never beyond the pool's capacity, counted with the pool's VM disks; a
/// refusal writes nothing), its growth on resize, and gives it all back on
/// delete; the pool cannot be deleted while the volume lives there. Local
/// volumes claim nothing.
async fn pool_volumes_claim_their_size_and_give_it_back(ds: &Datastore) {
    let w = world(ds).await;
    let pool = ds.pool_create("shared", "/srv/pool").await.expect("pool");
    let alloc = |ds: &Datastore| {
        let id = pool.id;
        let ds = ds.clone();
        async move { ds.pool_get(id).await.expect("get").alloc_bytes }
    };
    // No host has reported the pool: it has no room at all.
    let none = ds
        .volume_create(w.project, "early", 1 << 20, None, Some(pool.id))
        .await
        .expect_err("no capacity reported");
    assert_eq!(none.error_code(), "pool_full");
    let ok = PoolReport {
        pool_id: pool.id,
        error: None,
        total_bytes: 10 << 30,
        available_bytes: 8 << 30,
    };
    ds.host_report_pools(w.host, std::slice::from_ref(&ok))
        .await
        .expect("report");

    // A VM's 4 GiB disk and a 4 GiB volume share the 10 GiB.
    let mut c = to_create(&w, "vm", RestartPolicy::Never);
    c.vm.disk_bytes = 4 << 30;
    c.vm.pool_id = Some(pool.id);
    ds.vms_create(std::slice::from_ref(&c), None)
        .await
        .expect("vm");
    let v = ds
        .volume_create(w.project, "data", 4 << 30, None, Some(pool.id))
        .await
        .expect("volume");
    assert_eq!(v.pool_id, Some(pool.id));
    assert_eq!(v.pool_name.as_deref(), Some("shared"));
    assert_eq!(v.clone().into_view().pool.as_deref(), Some("shared"));
    assert_eq!(alloc(ds).await, 8 << 30);

    // 3 GiB more does not fit: refused, naming the pool and its room, and
    // no record is left (the name is still free).
    let full = ds
        .volume_create(w.project, "more", 3 << 30, None, Some(pool.id))
        .await
        .expect_err("full");
    assert_eq!(full.error_code(), "pool_full");
    assert!(
        full.to_string()
            .contains("storage pool shared has room for 2GiB more (8GiB of 10GiB allocated); the volume needs 3GiB"),
        "{full}"
    );
    assert!(ds
        .volume_find_by_name(Some(w.project), "more")
        .await
        .expect("find")
        .is_empty());
    assert_eq!(alloc(ds).await, 8 << 30);
    // A local volume claims nothing of the pool.
    let local = ds
        .volume_create(w.project, "local", 3 << 30, None, None)
        .await
        .expect("local");
    assert_eq!(local.pool_id, None);
    assert_eq!(alloc(ds).await, 8 << 30);

    // Growth: 1 GiB fits, 2 GiB more does not; a release gives it back.
    ds.volume_pool_claim(pool.id, 4 << 30, 5 << 30)
        .await
        .expect("grow");
    assert_eq!(alloc(ds).await, 9 << 30);
    let e = ds
        .volume_pool_claim(pool.id, 5 << 30, 7 << 30)
        .await
        .expect_err("full");
    assert_eq!(e.error_code(), "pool_full");
    assert_eq!(alloc(ds).await, 9 << 30);
    ds.volume_pool_claim(pool.id, 5 << 30, 5 << 30)
        .await
        .expect("no growth claims nothing");
    ds.volume_set_size(v.id, 5 << 30).await.expect("size");
    ds.volume_pool_release(pool.id, 0).await.expect("release 0");
    assert_eq!(alloc(ds).await, 9 << 30);

    // The pool cannot go while the volume (or the VM) lives there.
    let busy = ds.pool_delete(pool.id).await.expect_err("in use");
    assert_eq!(busy.error_code(), "pool_in_use");
    assert!(busy.to_string().contains("1 volume(s)"), "{busy}");
    assert!(ds.vm_discard(c.vm.id, c.job.id).await.expect("discard"));
    assert_eq!(alloc(ds).await, 5 << 30);
    let busy = ds.pool_delete(pool.id).await.expect_err("in use");
    assert!(busy.to_string().contains("0 VM(s)"), "{busy}");

    // Deleting the volume gives its (grown) size back, once.
    ds.volume_delete(v.id).await.expect("delete");
    assert_eq!(alloc(ds).await, 0);
    assert_eq!(
        ds.volume_delete(v.id).await.expect_err("gone").error_code(),
        "not_found"
    );
    assert_eq!(alloc(ds).await, 0);
    ds.volume_delete(local.id).await.expect("delete local");
    ds.pool_delete(pool.id).await.expect("pool delete");
}

/// A move claims its target with the job (never beyond capacity), commits
/// by moving the VM and releasing the source, or is abandoned by releasing
/// the target; either runs twice harmlessly. A move into a shared pool
/// claims the pool and leaves the host's disk alone.
async fn moves_claim_the_target_and_release_exactly_one_host(ds: &Datastore) {
    let w = world(ds).await;
    let facts = HostFacts {
        cpus: 2,
        memory_bytes: 1 << 30,
        disk_bytes: 1 << 40,
        qemu_version: None,
        accel: None,
        driver: "sim".into(),
        migration_tls: false,
    };
    let hash = format!("enroll-{}", uuid::Uuid::new_v4());
    let admin = ds
        .token_create(NewToken {
            name: "admin2",
            role: Role::Admin,
            project_id: None,
            token_hash: &format!("hash-{}", uuid::Uuid::new_v4()),
            prefix: "y",
            expires_at: None,
        })
        .await
        .expect("token");
    ds.enrollment_token_create(&hash, admin.id, i64::MAX / 2, 10)
        .await
        .expect("enrollment token");
    let h2 = ds
        .host_enroll(
            &hash,
            &NewHost {
                name: "h2",
                zone: "z",
                cluster: "east",
                address: "127.0.0.1",
                facts: &facts,
                tags: &[],
                credential_hash: &format!("cred-{}", uuid::Uuid::new_v4()),
            },
        )
        .await
        .expect("enroll")
        .id;
    let mut c = to_create(&w, "mover", RestartPolicy::Never);
    // Asked for its first host's zone and cluster: a move elsewhere takes
    // these constraints with it.
    let first = ds.host_get(w.host).await.expect("host");
    c.vm.placement.zone = Some(first.zone.clone());
    c.vm.placement.cluster = Some(first.cluster.clone());
    ds.vms_create(std::slice::from_ref(&c), None)
        .await
        .expect("create");
    finish_running(ds, c.vm.id).await;
    let alloc = |h: HostId| async move {
        let h = ds.host_get(h).await.expect("host");
        (h.alloc_vcpus, h.alloc_memory_bytes, h.alloc_disk_bytes)
    };
    let full = (1, 128 << 20, 1 << 30);

    // Begin: both hosts carry it; the VM names its target.
    let move_job = |kind: &str| job(&w, kind, c.vm.id);
    let j1 = move_job("vm_migrate");
    let (vm, _) = ds
        .vm_move_begin(
            c.vm.id,
            VmDesiredState::Running,
            VmState::Migrating,
            j1.clone(),
            h2,
            None,
        )
        .await
        .expect("begin");
    assert_eq!(vm.migration_target, Some(h2));
    assert_eq!(vm.state, VmState::Migrating);
    assert_eq!(alloc(w.host).await, full);
    assert_eq!(alloc(h2).await, full);
    // Abandoned (twice): the target is released, the VM stays.
    ds.vm_move_abandon(c.vm.id, j1.id).await.expect("abandon");
    ds.vm_move_abandon(c.vm.id, j1.id)
        .await
        .expect("abandon again");
    assert_eq!(alloc(h2).await, (0, 0, 0));
    assert_eq!(alloc(w.host).await, full);
    let vm = ds.vm_get(c.vm.id).await.expect("vm");
    assert_eq!((vm.host_id, vm.migration_target), (Some(w.host), None));
    // The job ends (as the engine would, holding its lease).
    let claimed = ds
        .job_claim_next("runner", now_micros() + 60 * SEC)
        .await
        .expect("claim")
        .expect("the move job");
    assert_eq!(claimed.id, j1.id);
    ds.job_finish(
        claimed.id,
        "runner",
        JobOutcome::Cancelled {
            message: "x".into(),
        },
        Some(VmEffect::Update {
            vm_id: c.vm.id,
            state: VmState::Running,
            state_reason: None,
            host_id: Some(w.host),
            desired_state: None,
        }),
    )
    .await
    .expect("finish");
    assert_eq!(
        alloc(w.host).await,
        full,
        "the VM's own host still carries it"
    );

    // A target without room is refused, and nothing is left held.
    let big = HostFacts {
        cpus: 0,
        ..facts.clone()
    };
    ds.host_heartbeat(h2, &big).await.expect("shrink");
    let refused = ds
        .vm_move_begin(
            c.vm.id,
            VmDesiredState::Running,
            VmState::Migrating,
            move_job("vm_migrate"),
            h2,
            None,
        )
        .await
        .expect_err("no room");
    assert_eq!(refused.error_code(), "no_host_available");
    assert!(ds
        .vm_get(c.vm.id)
        .await
        .expect("vm")
        .active_job_id
        .is_none());
    ds.host_heartbeat(h2, &facts).await.expect("grow");

    // Into a shared pool, committed (twice): the VM is on h2 in the pool,
    // the source is released, h2's own disk untouched.
    let pool = ds.pool_create("shared", "/srv/pool").await.expect("pool");
    let ok = PoolReport {
        pool_id: pool.id,
        error: None,
        total_bytes: 10 << 30,
        available_bytes: 8 << 30,
    };
    ds.host_report_pools(h2, &[ok]).await.expect("report");
    // Its volumes: one in the host's own directory, one in the pool.
    let local = ds
        .volume_create(w.project, "local-vol", 1 << 20, None, None)
        .await
        .expect("volume");
    ds.volume_settle(
        local.id,
        VolumeStatus::Attached,
        Some(c.vm.id),
        Some(w.host),
    )
    .await
    .expect("attach");
    let pooled = ds
        .volume_create(w.project, "pool-vol", 1 << 20, None, Some(pool.id))
        .await
        .expect("pool volume");
    ds.volume_settle(
        pooled.id,
        VolumeStatus::Attached,
        Some(c.vm.id),
        Some(w.host),
    )
    .await
    .expect("attach");
    let j2 = move_job("vm_migrate");
    ds.vm_move_begin(
        c.vm.id,
        VmDesiredState::Running,
        VmState::Migrating,
        j2.clone(),
        h2,
        Some(pool.id),
    )
    .await
    .expect("begin into the pool");
    assert_eq!(alloc(h2).await, (1, 128 << 20, 0));
    // The disk, and the pool volume's 1 MiB claimed when it was made.
    assert_eq!(
        ds.pool_get(pool.id).await.expect("pool").alloc_bytes,
        (1 << 30) + (1 << 20)
    );
    assert!(ds.vm_move_commit(c.vm.id, j2.id).await.expect("commit"));
    assert!(!ds
        .vm_move_commit(c.vm.id, j2.id)
        .await
        .expect("commit again"));
    let vm = ds.vm_get(c.vm.id).await.expect("vm");
    assert_eq!(vm.host_id, Some(h2));
    assert_eq!(vm.pool_id, Some(pool.id));
    assert_eq!(vm.migration_target, None);
    // The local volume moved with it (mirrored); the pool one stays put.
    assert_eq!(ds.volume_get(local.id).await.expect("v").host_id, Some(h2));
    assert_eq!(
        ds.volume_get(pooled.id).await.expect("v").host_id,
        Some(w.host)
    );
    // Its constraints followed it to h2's cluster and into the pool.
    assert_eq!(vm.placement.cluster.as_deref(), Some("east"));
    assert_eq!(vm.placement.zone.as_deref(), Some("z"));
    assert_eq!(vm.placement.pool.as_deref(), Some("shared"));
    assert_ne!(first.cluster, "east", "the move crossed clusters");
    assert_eq!(alloc(w.host).await, (0, 0, 0));
    assert_eq!(alloc(h2).await, (1, 128 << 20, 0));
    assert_eq!(ds.host_allocated(h2).await.expect("sum"), (1, 128 << 20, 0));
    assert_eq!(ds.host_allocated(w.host).await.expect("sum"), (0, 0, 0));
}
