//! Every datastore function, on both backends: each test body runs once on
//! SQLite and once on a real PostgreSQL (see `both_backends!`).

use stratus_api_types::views::{
    ImageFormat, ImageState, ImageVisibility, JobState, VmDesiredState, VmState,
};
use stratus_common::time::now_micros;
use stratus_common::{ImageId, JobId, Role, VmId};
use stratus_datastore::model::NewJob;
use stratus_datastore::*;

/// A store on a fresh database, plus the temp dir it may live in.
struct TestStore {
    ds: Datastore,
    _dir: tempfile::TempDir,
}

async fn sqlite() -> TestStore {
    let dir = tempfile::tempdir().expect("temp dir");
    let ds = Datastore::open(&stratus_test_utils::sqlite_url(dir.path()))
        .await
        .expect("open sqlite");
    TestStore { ds, _dir: dir }
}

async fn postgres() -> TestStore {
    let dir = tempfile::tempdir().expect("temp dir");
    let ds = Datastore::open(&stratus_test_utils::postgres_url().await)
        .await
        .expect("open postgres");
    TestStore { ds, _dir: dir }
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[tokio::test] async fn $name() { super::$name(&super::sqlite().await.ds).await; })*
        }
        mod on_postgres {
            $(#[tokio::test] async fn $name() { super::$name(&super::postgres().await.ds).await; })*
        }
    };
}

both_backends!(
    projects_crud_and_unique_names,
    pagination_walks_every_row_once,
    tokens_authenticate_until_revoked_or_expired,
    flavors_and_images,
    vm_intent_and_job_are_one_transaction,
    jobs_claim_step_finish_and_cancel,
    expired_leases_are_adopted_with_their_saga_log,
    project_delete_refuses_while_in_use,
    backups_chain_and_prune,
    backup_volumes_recorded_and_merged,
    backup_restored_volumes_lifecycle,
    snapshots_and_volumes,
);

fn page() -> PageRequest {
    PageRequest::first(100)
}

async fn projects_crud_and_unique_names(ds: &Datastore) {
    let p = ds.project_create("alpha", "first").await.expect("create");
    let dup = ds
        .project_create("alpha", "again")
        .await
        .expect_err("duplicate");
    assert_eq!(dup.error_code(), "name_in_use");
    assert_eq!(ds.project_get(p.id).await.expect("get").name, "alpha");
    assert_eq!(
        ds.project_get_by_name("alpha").await.expect("by name").id,
        p.id
    );
    assert_eq!(
        ds.project_get_by_name("nope")
            .await
            .expect_err("absent")
            .error_code(),
        "not_found"
    );
    let all = ds.project_list(None, None, &page()).await.expect("list");
    assert_eq!(all.items.len(), 1);
    let only = ds
        .project_list(Some(p.id), Some("alpha"), &page())
        .await
        .expect("filtered");
    assert_eq!(only.items.len(), 1);
    ds.project_delete(p.id).await.expect("delete");
    assert_eq!(
        ds.project_get(p.id).await.expect_err("gone").error_code(),
        "not_found"
    );
    assert_eq!(
        ds.project_delete(p.id)
            .await
            .expect_err("twice")
            .error_code(),
        "not_found"
    );
}

async fn pagination_walks_every_row_once(ds: &Datastore) {
    let mut made = Vec::new();
    for i in 0..23 {
        made.push(
            ds.flavor_create(&format!("f{i}"), 1, 1 << 30, 1 << 30)
                .await
                .expect("flavor")
                .id,
        );
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let req = PageRequest::parse(Some(5), cursor.as_deref()).expect("page");
        let p = ds.flavor_list(None, &req).await.expect("list");
        pages += 1;
        seen.extend(p.items.iter().map(|f| f.id));
        match p.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(pages, 5);
    assert_eq!(seen, made, "every row once, in creation order");
    let exact = ds
        .flavor_list(None, &PageRequest::first(23))
        .await
        .expect("exact");
    assert!(
        exact.next_cursor.is_none(),
        "no next page when the page is exactly full"
    );
}

async fn tokens_authenticate_until_revoked_or_expired(ds: &Datastore) {
    let p = ds.project_create("p", "").await.expect("project");
    let t = ds
        .token_create(NewToken {
            name: "t",
            role: Role::Member,
            project_id: Some(p.id),
            token_hash: "h1",
            prefix: "stratus_ab",
            expires_at: None,
        })
        .await
        .expect("token");
    let found = ds
        .token_authenticate("h1")
        .await
        .expect("auth")
        .expect("live");
    assert_eq!(found.id, t.id);
    assert!(found.last_used_at.is_none());
    assert!(
        ds.token_get(t.id)
            .await
            .expect("get")
            .last_used_at
            .is_some(),
        "use recorded"
    );
    assert!(ds
        .token_authenticate("other")
        .await
        .expect("auth")
        .is_none());
    assert!(!ds.token_admin_exists().await.expect("admins"));
    let revoked = ds.token_revoke(t.id).await.expect("revoke");
    assert!(revoked.revoked_at.is_some());
    assert!(
        ds.token_authenticate("h1").await.expect("auth").is_none(),
        "revoked"
    );
    let again = ds.token_revoke(t.id).await.expect("revoke twice");
    assert_eq!(
        again.revoked_at, revoked.revoked_at,
        "first revocation stands"
    );

    ds.token_create(NewToken {
        name: "old",
        role: Role::Admin,
        project_id: None,
        token_hash: "h2",
        prefix: "x",
        expires_at: Some(now_micros() - 1),
    })
    .await
    .expect("expired token");
    assert!(
        ds.token_authenticate("h2").await.expect("auth").is_none(),
        "expired"
    );
    assert!(ds.token_admin_exists().await.expect("admins"));
    let live = ds
        .token_list(Some(p.id), None, false, &page())
        .await
        .expect("list");
    assert!(live.items.is_empty());
    let all = ds
        .token_list(Some(p.id), Some(Role::Member), true, &page())
        .await
        .expect("list");
    assert_eq!(all.items.len(), 1);

    let bad = ds
        .token_create(NewToken {
            name: "t",
            role: Role::Member,
            project_id: Some(stratus_common::ProjectId::new()),
            token_hash: "h3",
            prefix: "x",
            expires_at: None,
        })
        .await
        .expect_err("unknown project");
    assert_eq!(bad.error_code(), "not_found");
}

fn data() -> ImageData {
    ImageData {
        format: ImageFormat::Qcow2,
        virtual_size: 1 << 30,
        file_size: 1 << 20,
        sha256: "ab".repeat(32),
    }
}

async fn flavors_and_images(ds: &Datastore) {
    let f = ds
        .flavor_create("small", 1, 256 << 20, 1 << 30)
        .await
        .expect("flavor");
    assert_eq!(
        ds.flavor_get_by_name("small").await.expect("by name").id,
        f.id
    );
    assert_eq!(
        ds.flavor_create("small", 2, 1, 1)
            .await
            .expect_err("dup")
            .error_code(),
        "name_in_use"
    );
    let a = ds.project_create("a", "").await.expect("a");
    let b = ds.project_create("b", "").await.expect("b");
    let private = ds
        .image_create(ImageId::new(), a.id, "img", ImageVisibility::Private, None)
        .await
        .expect("pending image");
    assert_eq!(private.state, ImageState::Pending);
    let ready = ds
        .image_set_ready(private.id, &data())
        .await
        .expect("ready");
    assert_eq!(ready.state, ImageState::Ready);
    assert_eq!(ready.sha256.as_deref(), Some("ab".repeat(32).as_str()));
    assert_eq!(
        ds.image_set_ready(private.id, &data())
            .await
            .expect_err("twice")
            .error_code(),
        "image_not_pending"
    );
    ds.image_create(
        ImageId::new(),
        b.id,
        "pub",
        ImageVisibility::Public,
        Some(&data()),
    )
    .await
    .expect("public image");
    // b sees its own image and no private image of a.
    let seen_by_b = ds
        .image_list(ImageScope::Project(b.id), None, None, None, &page())
        .await
        .expect("list");
    assert_eq!(seen_by_b.items.len(), 1);
    let seen_by_a = ds
        .image_list(ImageScope::Project(a.id), None, None, None, &page())
        .await
        .expect("list");
    assert_eq!(seen_by_a.items.len(), 2, "own and public");
    assert!(ds
        .image_find_by_name(ImageScope::Project(b.id), "img")
        .await
        .expect("find")
        .is_empty());
    assert_eq!(
        ds.image_find_by_name(ImageScope::Project(a.id), "pub")
            .await
            .expect("find")
            .len(),
        1
    );
    assert_eq!(
        ds.image_find_by_name(ImageScope::All, "img")
            .await
            .expect("find")
            .len(),
        1
    );
    let pending_only = ds
        .image_list(
            ImageScope::All,
            None,
            None,
            Some(ImageState::Pending),
            &page(),
        )
        .await
        .expect("list");
    assert!(pending_only.items.is_empty());
    ds.image_delete(private.id).await.expect("delete image");
    ds.flavor_delete(f.id).await.expect("delete flavor");
    assert_eq!(
        ds.flavor_delete(f.id)
            .await
            .expect_err("twice")
            .error_code(),
        "not_found"
    );
}

struct Fixture {
    project: stratus_common::ProjectId,
    flavor: stratus_common::FlavorId,
    image: ImageId,
}

async fn fixture(ds: &Datastore) -> Fixture {
    let p = ds.project_create("proj", "").await.expect("project");
    let f = ds
        .flavor_create("tiny", 1, 128 << 20, 1 << 30)
        .await
        .expect("flavor");
    let i = ds
        .image_create(
            ImageId::new(),
            p.id,
            "img",
            ImageVisibility::Private,
            Some(&data()),
        )
        .await
        .expect("image");
    Fixture {
        project: p.id,
        flavor: f.id,
        image: i.id,
    }
}

fn new_vm(fx: &Fixture, name: &str) -> NewVm {
    NewVm {
        id: VmId::new(),
        project_id: fx.project,
        name: name.to_string(),
        flavor_id: fx.flavor,
        image_id: fx.image,
        vcpus: 1,
        memory_bytes: 128 << 20,
        disk_bytes: 1 << 30,
        desired_state: VmDesiredState::Running,
        server_group_id: None,
        placement: Default::default(),
        restart_policy: Default::default(),
        restore_from: None,
        pool_id: None,
    }
}

fn new_job(fx: &Fixture, kind: &str, vm: VmId) -> NewJob {
    NewJob {
        id: JobId::new(),
        project_id: Some(fx.project),
        kind: kind.to_string(),
        target_kind: "vm",
        target_id: vm.as_uuid(),
        params: serde_json::json!({}),
        idempotency_key: None,
    }
}

async fn vm_intent_and_job_are_one_transaction(ds: &Datastore) {
    let fx = fixture(ds).await;
    let vm = new_vm(&fx, "web");
    let (v, j) = ds
        .vm_create_with_job(vm.clone(), new_job(&fx, "vm_create", vm.id))
        .await
        .expect("create");
    assert_eq!(v.state, VmState::Creating);
    assert_eq!(v.active_job_id, Some(j.id));
    assert_eq!(j.state, JobState::Queued);
    assert_eq!(ds.job_events(j.id).await.expect("events").len(), 1);

    // A duplicate name rolls back the job too: no orphan job row.
    let dup = new_vm(&fx, "web");
    let dup_job = new_job(&fx, "vm_create", dup.id);
    let dup_job_id = dup_job.id;
    let e = ds.vm_create_with_job(dup, dup_job).await.expect_err("dup");
    assert_eq!(e.error_code(), "name_in_use");
    assert_eq!(
        ds.job_get(dup_job_id)
            .await
            .expect_err("no job")
            .error_code(),
        "not_found"
    );

    // While the create job holds the VM, another operation is refused and
    // leaves nothing behind.
    let stop = new_job(&fx, "vm_stop", v.id);
    let stop_id = stop.id;
    let busy = ds
        .vm_begin_operation(
            v.id,
            VmDesiredState::Stopped,
            VmState::Stopping,
            false,
            stop,
        )
        .await
        .expect_err("busy");
    assert_eq!(busy.error_code(), "vm_busy");
    assert_eq!(
        ds.job_get(stop_id).await.expect_err("no job").error_code(),
        "not_found"
    );
    assert_eq!(
        ds.vm_get(v.id).await.expect("vm").desired_state,
        VmDesiredState::Running
    );

    let listed = ds
        .vm_list(
            &VmListFilter {
                project: Some(fx.project),
                state: Some(VmState::Creating),
                ..Default::default()
            },
            &page(),
        )
        .await
        .expect("list");
    assert_eq!(listed.items.len(), 1);
    assert_eq!(
        ds.vm_find_by_name(Some(fx.project), "web")
            .await
            .expect("find")
            .len(),
        1
    );
    assert_eq!(
        ds.vm_find_by_name(None, "web").await.expect("find").len(),
        1
    );
    assert_eq!(
        ds.vm_of_job(j.id).await.expect("of job").map(|v| v.id),
        Some(v.id)
    );

    // Finish the create: the VM is released with its new state.
    let claimed = ds
        .job_claim_next("c1", now_micros() + 60_000_000)
        .await
        .expect("claim")
        .expect("a job");
    assert_eq!(claimed.id, j.id);
    ds.job_finish(
        j.id,
        "c1",
        JobOutcome::Succeeded,
        Some(VmEffect::Update {
            vm_id: v.id,
            state: VmState::Stopped,
            state_reason: None,
            host_id: None,
            desired_state: Some(VmDesiredState::Stopped),
        }),
    )
    .await
    .expect("finish");
    let after = ds.vm_get(v.id).await.expect("vm");
    assert_eq!(after.state, VmState::Stopped);
    assert_eq!(after.desired_state, VmDesiredState::Stopped);
    assert!(after.active_job_id.is_none());
    assert!(after.generation > v.generation);

    let (v2, j2) = ds
        .vm_begin_operation(
            v.id,
            VmDesiredState::Deleted,
            VmState::Deleting,
            false,
            new_job(&fx, "vm_delete", v.id),
        )
        .await
        .expect("delete intent");
    assert_eq!(v2.state, VmState::Deleting);
    ds.job_claim_next("c1", now_micros() + 60_000_000)
        .await
        .expect("claim")
        .expect("a job");
    ds.job_finish(
        j2.id,
        "c1",
        JobOutcome::Succeeded,
        Some(VmEffect::Remove { vm_id: v.id }),
    )
    .await
    .expect("finish delete");
    assert_eq!(
        ds.vm_get(v.id).await.expect_err("gone").error_code(),
        "not_found"
    );
}

async fn jobs_claim_step_finish_and_cancel(ds: &Datastore) {
    let fx = fixture(ds).await;
    let vm = new_vm(&fx, "a");
    let (_, j) = ds
        .vm_create_with_job(vm.clone(), new_job(&fx, "vm_create", vm.id))
        .await
        .expect("create");
    let lease = now_micros() + 60_000_000;
    let c = ds
        .job_claim_next("ctl-1", lease)
        .await
        .expect("claim")
        .expect("job");
    assert_eq!(c.state, JobState::Running);
    assert_eq!(c.owner.as_deref(), Some("ctl-1"));
    assert!(
        ds.job_claim_next("ctl-2", lease)
            .await
            .expect("claim")
            .is_none(),
        "claimed once"
    );

    let s = ds
        .job_step(j.id, "ctl-1", "schedule", 30, "choosing a host", lease)
        .await
        .expect("step");
    assert_eq!(s.progress, 30);
    assert_eq!(s.current_step.as_deref(), Some("schedule"));
    let wrong = ds
        .job_step(j.id, "ctl-2", "x", 40, "x", lease)
        .await
        .expect_err("not owner");
    assert_eq!(wrong.error_code(), "job_not_owned");
    assert_eq!(
        ds.job_renew_leases("ctl-1", lease + 1)
            .await
            .expect("renew"),
        1
    );
    assert_eq!(
        ds.job_renew_leases("ctl-2", lease + 1)
            .await
            .expect("renew"),
        0
    );

    let cancelling = ds.job_request_cancel(j.id).await.expect("cancel");
    assert_eq!(cancelling.state, JobState::Cancelling);
    assert!(cancelling.cancel_requested_at.is_some());
    let done = ds
        .job_finish(
            j.id,
            "ctl-1",
            JobOutcome::Cancelled {
                message: "by request".into(),
            },
            Some(VmEffect::Remove { vm_id: vm.id }),
        )
        .await
        .expect("finish");
    assert_eq!(done.state, JobState::Cancelled);
    assert_eq!(done.error_code.as_deref(), Some("cancelled"));
    assert_eq!(
        ds.job_request_cancel(j.id)
            .await
            .expect_err("ended")
            .error_code(),
        "job_finished"
    );
    let steps: Vec<String> = ds
        .job_events(j.id)
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.step)
        .collect();
    assert_eq!(steps, ["queued", "schedule", "cancel", "cancelled"]);

    let by_state = ds
        .job_list(
            &JobListFilter {
                state: Some(JobState::Cancelled),
                kind: Some("vm_create"),
                target: Some(vm.id.as_uuid()),
                project: Some(fx.project),
            },
            &page(),
        )
        .await
        .expect("list");
    assert_eq!(by_state.items.len(), 1);

    // Idempotency keys: one job per key per project.
    let vm2 = new_vm(&fx, "b");
    let mut job2 = new_job(&fx, "vm_create", vm2.id);
    job2.idempotency_key = Some("key-1".into());
    let (_, j2) = ds.vm_create_with_job(vm2, job2).await.expect("create");
    let found = ds
        .job_by_idempotency_key(Some(fx.project), "key-1")
        .await
        .expect("by key")
        .expect("found");
    assert_eq!(found.id, j2.id);
    assert!(ds
        .job_by_idempotency_key(None, "key-1")
        .await
        .expect("by key")
        .is_none());
}

async fn expired_leases_are_adopted_with_their_saga_log(ds: &Datastore) {
    let fx = fixture(ds).await;
    let vm = new_vm(&fx, "a");
    let (_, j) = ds
        .vm_create_with_job(vm.clone(), new_job(&fx, "vm_create", vm.id))
        .await
        .expect("create");
    let now = now_micros();
    ds.job_claim_next("dead", now + 1_000)
        .await
        .expect("claim")
        .expect("job");
    ds.saga_create(j.id, "dead", "{\"dag\":1}")
        .await
        .expect("saga");
    assert_eq!(
        ds.saga_dag(j.id).await.expect("dag").as_deref(),
        Some("{\"dag\":1}")
    );
    assert!(ds
        .saga_record(j.id, "dead", 1, "started", "e1")
        .await
        .expect("record"));
    // Recording an event twice is recording it once.
    assert!(ds
        .saga_record(j.id, "dead", 1, "started", "e1")
        .await
        .expect("record again"));
    assert_eq!(ds.saga_events(j.id).await.expect("log"), vec!["e1"]);

    // Not adopted while the lease holds; adopted once it ran out.
    let none = ds
        .job_adopt("alive", now, now + 60_000_000, Adopt::Expired, 10)
        .await
        .expect("adopt");
    assert!(none.is_empty(), "lease still valid");
    let got = ds
        .job_adopt("alive", now + 2_000, now + 60_000_000, Adopt::Expired, 10)
        .await
        .expect("adopt");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id, j.id);
    assert_eq!(got[0].owner.as_deref(), Some("alive"));
    assert_eq!(
        got[0].state,
        JobState::Running,
        "adoption keeps the saga running"
    );

    // The old owner can no longer write the log, the saga or the outcome.
    assert!(!ds
        .saga_record(j.id, "dead", 1, "succeeded", "e2")
        .await
        .expect("record"));
    assert_eq!(ds.saga_events(j.id).await.expect("log"), vec!["e1"]);
    assert_eq!(
        ds.saga_create(j.id, "dead", "{}")
            .await
            .expect_err("not owner")
            .error_code(),
        "job_not_owned"
    );
    let late = ds
        .job_finish(j.id, "dead", JobOutcome::Succeeded, None)
        .await
        .expect_err("old owner");
    assert_eq!(late.error_code(), "job_not_owned");
    assert!(ds
        .saga_record(j.id, "alive", 1, "succeeded", "e2")
        .await
        .expect("record"));
    assert_eq!(ds.saga_events(j.id).await.expect("log").len(), 2);

    // Renewal covers every job of an owner; release hands them over at once.
    assert_eq!(
        ds.job_renew_leases("alive", now + 120_000_000)
            .await
            .expect("renew"),
        1
    );
    assert_eq!(ds.job_release_all("alive").await.expect("release"), 1);
    let third = ds
        .job_adopt("third", now, now + 60_000_000, Adopt::Expired, 10)
        .await
        .expect("adopt");
    assert_eq!(third.len(), 1, "a released job is adopted at once");
    // `everything` (SQLite's single controller) takes even valid leases.
    let all = ds
        .job_adopt("fourth", now, now + 60_000_000, Adopt::Everything, 10)
        .await
        .expect("adopt");
    assert_eq!(all.len(), 1);
    assert!(ds.job_owned_by(j.id, "fourth").await.expect("owner"));
    assert!(!ds.job_owned_by(j.id, "third").await.expect("owner"));

    // A controller restarted under its name takes its earlier life's jobs
    // at once, and nobody else's.
    let later = now + 60_000_000;
    let adopt = |who: &'static str, name: &'static str| {
        ds.job_adopt(who, now, later, Adopt::EarlierLivesOf(name), 10)
    };
    assert!(adopt("ctl#new", "ctl").await.expect("adopt").is_empty());
    ds.job_adopt("ctl#old", now, later, Adopt::Everything, 10)
        .await
        .expect("adopt");
    assert!(adopt("ctlx#1", "ctlx").await.expect("adopt").is_empty());
    assert!(adopt("o'ther#1", "o'ther").await.expect("adopt").is_empty());
    assert_eq!(adopt("ctl#new", "ctl").await.expect("adopt").len(), 1);
    assert!(ds.job_owned_by(j.id, "ctl#new").await.expect("owner"));

    // Discarding the create's VM: once, then nothing left to discard.
    assert!(ds.vm_discard(vm.id, j.id).await.expect("discard"));
    assert!(!ds.vm_discard(vm.id, j.id).await.expect("discard again"));
    assert_eq!(
        ds.vm_get(vm.id).await.expect_err("gone").error_code(),
        "not_found"
    );
}

async fn project_delete_refuses_while_in_use(ds: &Datastore) {
    let fx = fixture(ds).await;
    let e = ds
        .project_delete(fx.project)
        .await
        .expect_err("has an image");
    assert_eq!(e.error_code(), "project_not_empty");
    let vm = new_vm(&fx, "a");
    ds.vm_create_with_job(vm.clone(), new_job(&fx, "vm_create", vm.id))
        .await
        .expect("create");
    assert_eq!(
        ds.image_delete(fx.image)
            .await
            .expect_err("in use")
            .error_code(),
        "image_in_use"
    );
    assert_eq!(
        ds.flavor_delete(fx.flavor)
            .await
            .expect_err("in use")
            .error_code(),
        "flavor_in_use"
    );
    assert!(
        ds.project_get(fx.project).await.is_ok(),
        "nothing half-deleted"
    );
}

#[tokio::test]
async fn sqlite_refuses_a_second_controller_on_the_same_file() {
    let dir = tempfile::tempdir().expect("dir");
    let url = stratus_test_utils::sqlite_url(dir.path());
    let first = Datastore::open(&url).await.expect("first");
    let second = Datastore::open(&url).await.err().expect("second must fail");
    let msg = second.to_string();
    assert!(matches!(second, OpenError::Locked { .. }), "{msg}");
    assert!(
        msg.contains("already in use by another Stratus controller"),
        "{msg}"
    );
    drop(first);
    // Once the first is gone, the file opens again (and migrations are a no-op).
    let reopened = Datastore::open(&url).await.expect("reopen after release");
    reopened.ping().await.expect("ping");
}

#[tokio::test]
async fn sqlite_database_is_in_wal_mode() {
    let dir = tempfile::tempdir().expect("dir");
    let ds = Datastore::open(&stratus_test_utils::sqlite_url(dir.path()))
        .await
        .expect("open");
    ds.ping().await.expect("ping");
    assert!(
        dir.path().join("stratus.db-wal").exists(),
        "WAL file present"
    );
}

#[tokio::test]
async fn unknown_urls_are_refused() {
    let e = Datastore::open("mysql://x").await.err().expect("refused");
    assert!(matches!(e, OpenError::BadUrl(_)));
}

#[tokio::test]
async fn postgres_migrations_are_idempotent_across_controllers() {
    let url = stratus_test_utils::postgres_url().await;
    let (a, b) = tokio::join!(Datastore::open(&url), Datastore::open(&url));
    a.expect("first controller");
    b.expect("second controller");
}

/// A VM recorded with its create job ended, so other jobs can hold it.
async fn settled_vm(ds: &Datastore, fx: &Fixture, name: &str) -> VmId {
    let vm = new_vm(fx, name);
    let id = vm.id;
    let (_, job) = ds
        .vm_create_with_job(vm.clone(), new_job(fx, "vm_create", id))
        .await
        .expect("create");
    finish(ds, job.id, id).await;
    id
}

/// Ends a job on `vm` as succeeded, as its owner would (which frees the VM).
async fn finish(ds: &Datastore, job: JobId, vm: VmId) {
    let claimed = ds
        .job_claim_next("t", now_micros() + 60_000_000)
        .await
        .expect("claim")
        .expect("a job");
    assert_eq!(claimed.id, job);
    let effect = VmEffect::Update {
        vm_id: vm,
        state: VmState::Running,
        state_reason: None,
        host_id: None,
        desired_state: None,
    };
    ds.job_finish(job, "t", JobOutcome::Succeeded, Some(effect))
        .await
        .expect("finish");
}

fn new_backup(
    fx: &Fixture,
    vm: VmId,
    target: stratus_common::BackupTargetId,
    parent: Option<stratus_common::BackupId>,
) -> NewBackup {
    let id = stratus_common::BackupId::new();
    NewBackup {
        id,
        project_id: fx.project,
        vm_id: vm,
        vm_name: "web".into(),
        target_id: target,
        parent_id: parent,
        requested_mode: if parent.is_some() {
            stratus_api_types::views::BackupMode::Incremental
        } else {
            stratus_api_types::views::BackupMode::Full
        },
        file: format!("/b/{id}.qcow2"),
        host_id: None,
        image_id: fx.image,
        flavor_id: fx.flavor,
        vcpus: 1,
        memory_bytes: 128 << 20,
        disk_bytes: 1 << 30,
    }
}

fn done(mode: stratus_api_types::views::BackupMode) -> stratus_api_types::agent::BackupDone {
    stratus_api_types::agent::BackupDone {
        mode,
        fallback_reason: None,
        data_bytes: 10,
        file_bytes: 20,
        disk_bytes: 1 << 30,
        sha256: "ab".into(),
        duration_ms: 1,
        volumes: vec![],
    }
}

fn volume_done(
    volume_id: uuid::Uuid,
    mode: stratus_api_types::views::BackupMode,
    reason: Option<&str>,
) -> stratus_api_types::agent::VolumeBackupDone {
    stratus_api_types::agent::VolumeBackupDone {
        volume_id,
        file: format!("/b/x.vol-{volume_id}.qcow2"),
        mode,
        fallback_reason: reason.map(str::to_string),
        data_bytes: 5,
        file_bytes: 6,
        disk_bytes: 16 << 20,
        sha256: format!("sha-{volume_id}"),
    }
}

/// A host in the store (settled volumes name it).
async fn enrolled_host(ds: &Datastore) -> stratus_common::HostId {
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
    let facts = stratus_api_types::agent::HostFacts {
        cpus: 16,
        memory_bytes: 64 << 30,
        disk_bytes: 1 << 40,
        qemu_version: None,
        accel: None,
        driver: "sim".into(),
        migration_tls: false,
    };
    ds.host_enroll(
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
    .id
}

/// Volumes restored beside a new VM: recorded all or none before it (a
/// taken name refuses them all), listed for its host until its create
/// settles them as attached, or discarded with a create taken back.
async fn backup_restored_volumes_lifecycle(ds: &Datastore) {
    use stratus_api_types::views::VolumeStatus;
    use stratus_datastore::RestoredVolume;
    let fx = fixture(ds).await;
    let vm = settled_vm(ds, &fx, "web").await;
    ds.volume_create(fx.project, "r-taken", 1 << 20, None, None)
        .await
        .expect("volume");
    let rv = |name: &str| RestoredVolume {
        id: stratus_common::VolumeId::new(),
        name: name.into(),
        size_bytes: 16 << 20,
        file: format!("/b/x.vol-{name}.qcow2"),
    };
    let err = ds
        .backup_restored_volumes_create(fx.project, vm, &[rv("r-ok"), rv("r-taken")])
        .await
        .expect_err("name taken");
    assert_eq!(err.error_code(), "name_in_use");
    assert!(ds
        .backup_restored_volumes_of_vm(vm)
        .await
        .expect("none")
        .is_empty());
    let (a, b) = (rv("r-a"), rv("r-b"));
    ds.backup_restored_volumes_create(fx.project, vm, &[a.clone(), b.clone()])
        .await
        .expect("create");
    let listed = ds.backup_restored_volumes_of_vm(vm).await.expect("listed");
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().any(|v| v.id == a.id && v.file == a.file));
    assert_eq!(
        ds.volume_get(a.id).await.expect("a").status,
        VolumeStatus::Attaching
    );
    let host = enrolled_host(ds).await;
    ds.backup_restored_volumes_settle(vm, host)
        .await
        .expect("settle");
    assert!(ds
        .backup_restored_volumes_of_vm(vm)
        .await
        .expect("settled")
        .is_empty());
    let got = ds.volume_get(a.id).await.expect("a");
    assert_eq!(
        (got.status, got.vm_id, got.host_id),
        (VolumeStatus::Attached, Some(vm), Some(host))
    );
    // A discard takes only volumes still waiting to be built.
    let c = rv("r-c");
    ds.backup_restored_volumes_create(fx.project, vm, std::slice::from_ref(&c))
        .await
        .expect("create c");
    ds.backup_restored_volumes_discard(vm)
        .await
        .expect("discard");
    assert_eq!(
        ds.volume_get(c.id).await.expect_err("gone").error_code(),
        "not_found"
    );
    assert!(ds.volume_get(b.id).await.is_ok(), "settled volumes stay");
    // Recorded for a VM that was never created (a controller died between
    // the two writes): forgotten once old enough; a live VM's are kept.
    let unborn = stratus_common::VmId::new();
    let (d, e) = (rv("r-d"), rv("r-e"));
    ds.backup_restored_volumes_create(fx.project, unborn, std::slice::from_ref(&d))
        .await
        .expect("create d");
    ds.backup_restored_volumes_create(fx.project, vm, std::slice::from_ref(&e))
        .await
        .expect("create e");
    let now = stratus_common::time::now_micros();
    assert_eq!(
        ds.backup_restored_volumes_forget_unborn(now - 60_000_000)
            .await
            .expect("too young"),
        0
    );
    assert_eq!(
        ds.backup_restored_volumes_forget_unborn(now + 1)
            .await
            .expect("forget"),
        1
    );
    assert!(
        ds.volume_get(d.id).await.is_err(),
        "the unborn VM's volume went"
    );
    assert!(ds.volume_get(e.id).await.is_ok(), "the live VM's stays");
}

/// A restore point's volumes: recorded with its success (named as the
/// volume was then, or by id when the store has no such volume), listed,
/// each volume's fallback reason in the restore point's; merged into the
/// child's rows on delete, and gone with the deleted restore point.
async fn backup_volumes_recorded_and_merged(ds: &Datastore) {
    use stratus_api_types::views::BackupMode;
    let fx = fixture(ds).await;
    let vm = settled_vm(ds, &fx, "web").await;
    let host = stratus_common::HostId::new();
    let t = ds.backup_target_create("t", "/b").await.expect("target");
    let data = ds
        .volume_create(fx.project, "data", 16 << 20, None, None)
        .await
        .expect("volume");
    let unknown = uuid::Uuid::new_v4();

    let b1 = new_backup(&fx, vm, t.id, None);
    let (_, job) = ds
        .backup_begin(&b1, &new_job(&fx, "vm_backup", vm))
        .await
        .expect("begin");
    let mut d1 = done(BackupMode::Full);
    d1.volumes = vec![
        volume_done(data.id.as_uuid(), BackupMode::Full, None),
        volume_done(unknown, BackupMode::Full, None),
    ];
    assert!(ds.backup_succeed(b1.id, host, &d1).await.expect("ok"));
    finish(ds, job.id, vm).await;
    let r1 = ds.backup_get(b1.id).await.expect("get");
    assert_eq!(r1.volumes.len(), 2);
    let v = r1.volume(data.id).expect("data volume");
    assert_eq!(
        (v.volume_name.as_str(), v.mode, v.data_bytes, v.file_bytes),
        ("data", BackupMode::Full, 5, 6)
    );
    assert_eq!(
        r1.volume(stratus_common::VolumeId(unknown))
            .expect("unknown")
            .volume_name,
        unknown.to_string()
    );
    // A second outcome of the same backup records no second set of rows.
    assert!(!ds.backup_succeed(b1.id, host, &d1).await.expect("again"));
    assert_eq!(ds.backup_get(b1.id).await.expect("get").volumes.len(), 2);

    // The next: data incremental; a newly attached volume full, and why.
    let b2 = new_backup(&fx, vm, t.id, Some(b1.id));
    let (_, job) = ds
        .backup_begin(&b2, &new_job(&fx, "vm_backup", vm))
        .await
        .expect("begin 2");
    let newer = uuid::Uuid::new_v4();
    let mut d2 = done(BackupMode::Incremental);
    d2.volumes = vec![
        volume_done(data.id.as_uuid(), BackupMode::Incremental, None),
        volume_done(newer, BackupMode::Full, Some("attached since")),
    ];
    assert!(ds.backup_succeed(b2.id, host, &d2).await.expect("ok 2"));
    finish(ds, job.id, vm).await;
    let r2 = ds.backup_get(b2.id).await.expect("get 2");
    assert_eq!(r2.mode, Some(BackupMode::Incremental));
    assert_eq!(
        r2.fallback_reason,
        Some(format!("volume {newer}: attached since"))
    );
    let listed = ds
        .backup_list(
            &stratus_datastore::BackupListFilter {
                project: None,
                vm: Some(vm),
            },
            &page(),
        )
        .await
        .expect("list");
    assert_eq!(
        listed
            .items
            .iter()
            .map(|b| b.volumes.len())
            .collect::<Vec<_>>(),
        vec![2, 2]
    );
    let view = r2.clone().into_view();
    assert_eq!(view.volumes.len(), 2);

    // Deleting b1 merges its data file into b2's, which stands alone now;
    // b1's rows go with it, b2's other volume is untouched.
    ds.backup_delete_begin(b1.id).await.expect("delete begin");
    let pruned = stratus_api_types::agent::BackupPruned {
        data_bytes: 30,
        file_bytes: 40,
        sha256: "cd".into(),
    };
    let merged = stratus_datastore::VolumeMerged {
        pruned: stratus_api_types::agent::VolumePruned {
            volume_id: data.id.as_uuid(),
            data_bytes: 50,
            file_bytes: 60,
            sha256: "ef".into(),
        },
        now_full: true,
    };
    ds.backup_delete_finish(b1.id, Some((b2.id, &pruned)), &[merged], None)
        .await
        .expect("delete finish");
    let r2 = ds.backup_get(b2.id).await.expect("child");
    let v = r2.volume(data.id).expect("data");
    assert_eq!(
        (v.mode, v.data_bytes, v.file_bytes, v.sha256.as_str()),
        (BackupMode::Full, 50, 60, "ef")
    );
    let other = r2.volume(stratus_common::VolumeId(newer)).expect("newer");
    assert_eq!(
        (other.data_bytes, other.sha256.clone()),
        (5, format!("sha-{newer}"))
    );
    assert_eq!(
        ds.backup_get(b1.id).await.expect_err("gone").error_code(),
        "not_found"
    );
    // Deleting the volume leaves the restore point's record of it.
    ds.volume_delete(data.id).await.expect("volume delete");
    assert_eq!(
        ds.backup_get(b2.id)
            .await
            .expect("still")
            .volume(data.id)
            .expect("kept")
            .volume_name,
        "data"
    );
}

/// Backups: one job per VM at a time, only succeeded ones are parents, a
/// backup leaves `running` once, deletes merge into the child in one
/// transaction, policies are one per VM.
async fn backups_chain_and_prune(ds: &Datastore) {
    use stratus_api_types::views::{BackupMode, BackupStatus};
    let fx = fixture(ds).await;
    let vm = settled_vm(ds, &fx, "web").await;
    // The host that took a backup is only noted (no foreign key).
    let host = stratus_common::HostId::new();
    let t = ds.backup_target_create("t", "/b").await.expect("target");
    assert_eq!(
        ds.backup_target_create("t", "/c")
            .await
            .expect_err("dup")
            .error_code(),
        "name_in_use"
    );

    // A full backup holds the VM; a second one is refused meanwhile.
    let b1 = new_backup(&fx, vm, t.id, None);
    let (rec, job) = ds
        .backup_begin(&b1, &new_job(&fx, "vm_backup", vm))
        .await
        .expect("begin");
    assert_eq!(rec.status, BackupStatus::Running);
    let busy = ds
        .backup_begin(
            &new_backup(&fx, vm, t.id, None),
            &new_job(&fx, "vm_backup", vm),
        )
        .await
        .expect_err("busy");
    assert_eq!(busy.error_code(), "vm_busy");
    assert!(ds
        .backup_latest_succeeded(vm, None)
        .await
        .expect("latest")
        .is_none());
    assert!(ds
        .backup_succeed(b1.id, host, &done(BackupMode::Full))
        .await
        .expect("ok"));
    // A late failure does not undo success; a second success changes nothing.
    ds.backup_fail(b1.id, "late").await.expect("fail");
    assert!(!ds
        .backup_succeed(b1.id, host, &done(BackupMode::Full))
        .await
        .expect("again"));
    assert_eq!(
        ds.backup_get(b1.id).await.expect("get").status,
        BackupStatus::Succeeded
    );
    finish(ds, job.id, vm).await;

    // An incremental on it; the newest succeeded one is the next parent.
    let b2 = new_backup(&fx, vm, t.id, Some(b1.id));
    let (_, job) = ds
        .backup_begin(&b2, &new_job(&fx, "vm_backup", vm))
        .await
        .expect("begin 2");
    // The parent of a running backup cannot be deleted.
    assert_eq!(
        ds.backup_delete_begin(b1.id)
            .await
            .expect_err("busy")
            .error_code(),
        "backup_busy"
    );
    ds.backup_succeed(b2.id, host, &done(BackupMode::Incremental))
        .await
        .expect("ok 2");
    finish(ds, job.id, vm).await;
    assert_eq!(
        ds.backup_latest_succeeded(vm, Some(t.id))
            .await
            .expect("latest")
            .map(|b| b.id),
        Some(b2.id)
    );
    assert_eq!(ds.backup_children(b1.id).await.expect("children").len(), 1);

    // Deleting the full one merges it into the incremental: a full now.
    let d = ds.backup_delete_begin(b1.id).await.expect("delete begin");
    assert_eq!(d.status, BackupStatus::Deleting);
    let pruned = stratus_api_types::agent::BackupPruned {
        data_bytes: 30,
        file_bytes: 40,
        sha256: "cd".into(),
    };
    ds.backup_delete_finish(b1.id, Some((b2.id, &pruned)), &[], None)
        .await
        .expect("delete finish");
    let now = ds.backup_get(b2.id).await.expect("child");
    assert_eq!(now.parent_id, None);
    assert_eq!(now.mode, Some(BackupMode::Full));
    assert_eq!(now.sha256.as_deref(), Some("cd"));
    assert_eq!(
        ds.backup_get(b1.id).await.expect_err("gone").error_code(),
        "not_found"
    );
    // The target holds backups: not deletable.
    assert_eq!(
        ds.backup_target_delete(t.id)
            .await
            .expect_err("in use")
            .error_code(),
        "target_in_use"
    );

    // Policies: one per VM, replaced by a second set.
    let mut p = BackupPolicyRecord {
        vm_id: vm,
        project_id: fx.project,
        target_id: Some(t.id),
        every_secs: Some(3600),
        keep_last: 3,
        keep_daily: 0,
        keep_weekly: 0,
        created_at: 0,
        updated_at: 0,
    };
    ds.backup_policy_set(&p).await.expect("policy");
    p.keep_last = 5;
    assert_eq!(ds.backup_policy_set(&p).await.expect("again").keep_last, 5);
    assert_eq!(
        ds.backup_policy_list(Some(fx.project))
            .await
            .expect("list")
            .len(),
        1
    );
    assert!(ds.backup_policy_delete(vm).await.expect("delete"));
    assert!(ds.backup_policy_get(vm).await.expect("get").is_none());
}

/// Snapshots and volumes: names unique per VM or project, every change's
/// job holds the VM, a volume attached once.
async fn snapshots_and_volumes(ds: &Datastore) {
    use stratus_api_types::views::{SnapshotStatus, VolumeStatus};
    use stratus_datastore::{SnapshotOrigin, SnapshotPolicyRecord};
    let fx = fixture(ds).await;
    let vm = settled_vm(ds, &fx, "web").await;
    let vm2 = settled_vm(ds, &fx, "other").await;
    let s1 = stratus_common::SnapshotId::new();
    let (snap, job) = ds
        .snapshot_begin(
            s1,
            vm,
            fx.project,
            "s1",
            SnapshotOrigin::Operator,
            &new_job(&fx, "vm_snapshot_create", vm),
        )
        .await
        .expect("begin");
    assert_eq!(snap.status, SnapshotStatus::Creating);
    ds.snapshot_ready(s1, true, 42, &[]).await.expect("ready");
    finish(ds, job.id, vm).await;
    let dup = ds
        .snapshot_begin(
            stratus_common::SnapshotId::new(),
            vm,
            fx.project,
            "s1",
            SnapshotOrigin::Operator,
            &new_job(&fx, "vm_snapshot_create", vm),
        )
        .await
        .expect_err("dup");
    assert_eq!(dup.error_code(), "name_in_use");
    let found = ds.snapshot_find(vm, "s1").await.expect("find").expect("s1");
    assert_eq!((found.quiesced, found.bytes), (Some(true), Some(42)));
    assert!(found.volumes.is_empty());
    assert_eq!(found.origin, SnapshotOrigin::Operator);
    // A policy per VM, replaced by a second set; its snapshots say so.
    let mut p = SnapshotPolicyRecord {
        vm_id: vm,
        project_id: fx.project,
        every_secs: Some(3600),
        keep: 3,
        created_at: 0,
        updated_at: 0,
    };
    ds.snapshot_policy_set(&p).await.expect("policy");
    p.keep = 5;
    p.every_secs = None;
    let again = ds.snapshot_policy_set(&p).await.expect("again");
    assert_eq!((again.keep, again.every_secs), (5, None));
    assert_eq!(
        ds.snapshot_policy_list(Some(fx.project))
            .await
            .expect("list")
            .len(),
        1
    );
    assert!(ds.snapshot_policy_delete(vm).await.expect("delete"));
    assert!(ds.snapshot_policy_get(vm).await.expect("get").is_none());
    assert!(!ds.snapshot_policy_delete(vm).await.expect("again"));
    let job = ds
        .snapshot_delete_begin(s1, vm, &new_job(&fx, "vm_snapshot_delete", vm))
        .await
        .expect("delete begin");
    assert_eq!(
        ds.snapshot_get(s1).await.expect("get").status,
        SnapshotStatus::Deleting
    );
    ds.snapshot_undelete(s1).await.expect("undelete");
    assert_eq!(
        ds.snapshot_get(s1).await.expect("get").status,
        SnapshotStatus::Ready
    );
    finish(ds, job.id, vm).await;
    ds.snapshot_forget(&[s1]).await.expect("forget");
    assert!(ds.snapshot_list(vm).await.expect("list").is_empty());

    let v = ds
        .volume_create(fx.project, "data", 16 << 20, None, None)
        .await
        .expect("volume");
    assert_eq!(
        ds.volume_create(fx.project, "data", 1 << 20, None, None)
            .await
            .expect_err("dup")
            .error_code(),
        "name_in_use"
    );
    let job = ds
        .volume_attach_begin(v.id, vm, &new_job(&fx, "vm_volume_attach", vm))
        .await
        .expect("attach");
    let again = ds
        .volume_attach_begin(v.id, vm2, &new_job(&fx, "vm_volume_attach", vm2))
        .await
        .expect_err("in use");
    assert_eq!(again.error_code(), "volume_in_use");
    ds.volume_settle(v.id, VolumeStatus::Attached, Some(vm), None)
        .await
        .expect("settle");
    finish(ds, job.id, vm).await;
    assert_eq!(ds.volumes_of_vm(vm).await.expect("of vm").len(), 1);
    assert_eq!(
        ds.volume_delete(v.id)
            .await
            .expect_err("attached")
            .error_code(),
        "volume_attached"
    );
    ds.volume_set_size(v.id, 32 << 20).await.expect("grow");
    assert_eq!(ds.volume_get(v.id).await.expect("get").size_bytes, 32 << 20);
    // A snapshot that covers the volume holds it: no detach until it goes.
    let s2 = stratus_common::SnapshotId::new();
    let (_, job) = ds
        .snapshot_begin(
            s2,
            vm,
            fx.project,
            "with data",
            SnapshotOrigin::Policy,
            &new_job(&fx, "vm_snapshot_create", vm),
        )
        .await
        .expect("begin");
    assert_eq!(
        ds.snapshot_get(s2).await.expect("get").origin,
        SnapshotOrigin::Policy
    );
    let other = stratus_common::VolumeId::new();
    ds.snapshot_ready(s2, false, 7, &[other, v.id])
        .await
        .expect("ready");
    finish(ds, job.id, vm).await;
    assert_eq!(
        ds.snapshot_get(s2).await.expect("get").volumes,
        vec![other, v.id]
    );
    let held = ds
        .volume_detach_begin(v.id, vm, &new_job(&fx, "vm_volume_detach", vm))
        .await
        .expect_err("covered");
    assert_eq!(held.error_code(), "volume_in_snapshot");
    assert!(held.to_string().contains("\"with data\""), "{held}");
    assert_eq!(
        ds.vm_get(vm).await.expect("vm").active_job_id,
        None,
        "the refused detach left the VM free"
    );
    ds.snapshot_forget(&[s2]).await.expect("forget");
    let job = ds
        .volume_detach_begin(v.id, vm, &new_job(&fx, "vm_volume_detach", vm))
        .await
        .expect("detach");
    ds.volume_settle(v.id, VolumeStatus::Available, None, None)
        .await
        .expect("settle");
    finish(ds, job.id, vm).await;
    ds.volume_delete(v.id).await.expect("delete");
}
