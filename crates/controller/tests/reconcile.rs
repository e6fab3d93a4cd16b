//! The reconcilers as controllers run them: silent hosts marked
//! unreachable on both backends, and on PostgreSQL several controllers
//! running the loop with exactly one acting, the next one taking over when
//! the leader stops. Through the HTTP API (both backends): restart policies
//! set at create and changed, a crashed `on_crash` VM restarted by a pass,
//! and orphans an agent reports listed on its host.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use common::{Backend, Ctx};
use serde_json::{json, Value};

use stratus_api_types::agent::HostFacts;
use stratus_api_types::views::HostState;
use stratus_common::time::now_micros;
use stratus_common::{HostId, Role};
use stratus_controller::app::image_store::ImageStore;
use stratus_controller::app::reconcile::{self, ReconcilerConfig, LEASE_NAME};
use stratus_controller::App;
use stratus_datastore::{Datastore, NewHost, NewToken};

/// A controller's application layer on the store at `url` (no HTTP, no
/// job runner: the reconcilers need neither).
async fn controller(url: &str, dir: &std::path::Path) -> Arc<App> {
    let ds = Datastore::open(url).await.expect("open store");
    let images = ImageStore::open(&dir.join(format!("images-{}", uuid::Uuid::new_v4())))
        .expect("image store");
    let scheduler = stratus_scheduler::Scheduler::load(ds.clone())
        .await
        .expect("scheduler");
    Arc::new(App::new(
        ds,
        images,
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(stratus_jobs::Signals::default()),
        scheduler,
    ))
}

/// Fast settings, so a test sees several passes and a takeover in seconds.
fn fast(holder: &str) -> ReconcilerConfig {
    let mut c = ReconcilerConfig::new(holder);
    c.interval = Duration::from_millis(100);
    c.lease = Duration::from_millis(800);
    c.host_timeout = Duration::from_secs(20);
    c
}

/// Enrolls a host straight in the store; it is up, just heard from.
async fn host(ds: &Datastore, name: &str) -> HostId {
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
    ds.enrollment_token_create(&hash, admin.id, i64::MAX / 2, 1)
        .await
        .expect("enrollment token");
    ds.host_enroll(
        &hash,
        &NewHost {
            name,
            zone: "z",
            cluster: "default",
            address: "127.0.0.1",
            facts: &HostFacts {
                cpus: 4,
                memory_bytes: 8 << 30,
                disk_bytes: 100 << 30,
                qemu_version: None,
                accel: None,
                driver: "sim".into(),
                migration_tls: false,
            },
            tags: &[],
            credential_hash: &format!("cred-{}", uuid::Uuid::new_v4()),
        },
    )
    .await
    .expect("enroll")
    .id
}

/// Polls `f` until it answers `Ok`, or fails the test after `timeout`.
async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(last) => panic!("timed out waiting for {what}; last seen: {last}"),
        }
    }
}

/// A host silent for longer than the timeout is marked unreachable by the
/// reconciler, and one that reports again is up.
async fn silent_hosts_are_marked_unreachable(url: &str) {
    let dir = tempfile::tempdir().expect("dir");
    let app = controller(url, dir.path()).await;
    let quiet = host(&app.ds, "quiet").await;
    let lively = host(&app.ds, "lively").await;
    app.ds
        .hosts_heard(&[quiet], now_micros() - 60_000_000)
        .await
        .expect("an old heartbeat");
    let r = reconcile::start(&app, fast("c1"));
    wait_until(
        "the silent host to be unreachable",
        Duration::from_secs(10),
        || async {
            let h = app.ds.host_get(quiet).await.map_err(|e| e.to_string())?;
            match h.state {
                HostState::Unreachable => Ok(()),
                s => Err(format!("{s:?}")),
            }
        },
    )
    .await;
    assert_eq!(
        app.ds.host_get(lively).await.expect("host").state,
        HostState::Up,
        "a host heard from recently stays up"
    );
    app.ds
        .hosts_heard(&[quiet], now_micros())
        .await
        .expect("heard again");
    assert_eq!(
        app.ds.host_get(quiet).await.expect("host").state,
        HostState::Up
    );
    r.shutdown().await;
    assert_eq!(
        app.ds.lease_holder(LEASE_NAME).await.expect("lease"),
        None,
        "a stopped reconciler gives its lease up"
    );
}

#[tokio::test]
async fn silent_hosts_are_marked_unreachable_on_sqlite() {
    let dir = tempfile::tempdir().expect("dir");
    silent_hosts_are_marked_unreachable(&stratus_test_utils::sqlite_url(dir.path())).await;
}

#[tokio::test]
async fn silent_hosts_are_marked_unreachable_on_postgres() {
    silent_hosts_are_marked_unreachable(&stratus_test_utils::postgres_url().await).await;
}

/// Three controllers on one PostgreSQL: one leads and acts; when it stops,
/// another takes over within a lease and acts in its place.
#[tokio::test]
async fn on_postgres_one_controller_leads_and_another_takes_over() {
    let url = stratus_test_utils::postgres_url().await;
    let dir = tempfile::tempdir().expect("dir");
    let mut apps = Vec::new();
    let mut handles = Vec::new();
    for i in 0..3 {
        let app = controller(&url, dir.path()).await;
        handles.push(Some(reconcile::start(&app, fast(&format!("c{i}")))));
        apps.push(app);
    }
    let ds = apps[0].ds.clone();
    let leader = |ds: Datastore| async move {
        ds.lease_holder(LEASE_NAME)
            .await
            .expect("lease")
            .filter(|l| l.expires_at > now_micros())
            .map(|l| l.holder)
    };
    let first = wait_until("a leader", Duration::from_secs(10), || async {
        leader(ds.clone()).await.ok_or_else(|| "none".to_string())
    })
    .await;
    // It keeps the lead while it runs: renewed every pass, never stolen.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(leader(ds.clone()).await.as_deref(), Some(first.as_str()));
    }
    // The leader acts.
    let a = host(&ds, "a").await;
    ds.hosts_heard(&[a], now_micros() - 60_000_000)
        .await
        .expect("old heartbeat");
    wait_until("host a unreachable", Duration::from_secs(10), || async {
        match ds.host_get(a).await.map_err(|e| e.to_string())?.state {
            HostState::Unreachable => Ok(()),
            s => Err(format!("{s:?}")),
        }
    })
    .await;

    // The leader stops (gives the lease up): another one leads, and acts.
    let idx: usize = first[1..].parse().expect("c<i>");
    handles[idx].take().expect("handle").shutdown().await;
    let second = wait_until("a new leader", Duration::from_secs(10), || async {
        match leader(ds.clone()).await {
            Some(h) if h != first => Ok(h),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let b = host(&ds, "b").await;
    ds.hosts_heard(&[b], now_micros() - 60_000_000)
        .await
        .expect("old heartbeat");
    wait_until("host b unreachable", Duration::from_secs(10), || async {
        match ds.host_get(b).await.map_err(|e| e.to_string())?.state {
            HostState::Unreachable => Ok(()),
            s => Err(format!("{s:?}")),
        }
    })
    .await;

    // A leader that dies without a word (its task aborted, the lease left
    // to expire) is replaced within a lease too.
    let idx: usize = second[1..].parse().expect("c<i>");
    let h = handles[idx].take().expect("handle");
    h.abort();
    let died = Instant::now();
    wait_until("a third leader", Duration::from_secs(10), || async {
        match leader(ds.clone()).await {
            Some(h) if h != first && h != second => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(
        died.elapsed() < Duration::from_secs(5),
        "took over after {:?}",
        died.elapsed()
    );
    for h in handles.into_iter().flatten() {
        h.shutdown().await;
    }
}

// ---- through the API ----

fn facts() -> Value {
    json!({"cpus": 8, "memory_bytes": 17179869184u64, "disk_bytes": 107374182400u64, "driver": "sim"})
}

/// A project `p` (member token returned), flavor, ready image, and a host
/// (its credential returned).
async fn api_world(ctx: &Ctx) -> (String, String) {
    let admin = &ctx.admin;
    ctx.must(
        ctx.post("/v1/projects", admin, json!({"name": "p"})).await,
        "project",
    )
    .await;
    ctx.must(
        ctx.post(
            "/v1/flavors",
            admin,
            json!({"name": "tiny", "vcpus": 1, "memory_bytes": 128u64 << 20, "disk_bytes": 1u64 << 30}),
        )
        .await,
        "flavor",
    )
    .await;
    let member = ctx
        .must(
            ctx.post(
                "/v1/tokens",
                admin,
                json!({"name": "m", "role": "member", "project": "p"}),
            )
            .await,
            "member",
        )
        .await["secret"]
        .as_str()
        .expect("secret")
        .to_string();
    let img = ctx
        .must(
            ctx.post("/v1/images", &member, json!({"name": "img"}))
                .await,
            "image",
        )
        .await;
    let data = std::fs::read(ctx.qcow2("a.qcow2", "64M")).expect("read qcow2");
    ctx.must(
        ctx.put_bytes(
            &format!("/v1/images/{}/data", img["id"].as_str().expect("id")),
            &member,
            data,
        )
        .await,
        "upload",
    )
    .await;
    let t = ctx
        .must(
            ctx.post("/v1/host-enrollment-tokens", admin, json!({}))
                .await,
            "enroll token",
        )
        .await;
    let r = ctx
        .call(
            Method::POST,
            "/v1/agent/enroll",
            None,
            Some(json!({"enroll_token": t["token"], "name": "h1", "address": "127.0.0.1", "facts": facts()})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let cred = r.body["credential"]
        .as_str()
        .expect("credential")
        .to_string();
    (member, cred)
}

/// Reports every VM of the host as `state` (or, with `only`, that VM), as
/// its agent would, with newer generations each time.
async fn report(ctx: &Ctx, cred: &str, only: Option<&str>, state: &str, reason: Option<&str>) {
    let desired = ctx.get("/v1/agent/desired", cred).await.body;
    let gen = now_micros();
    let vms: Vec<Value> = desired["vms"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|v| only.is_none_or(|id| v["vm_id"] == id))
        .map(|v| {
            json!({"vm_id": v["vm_id"], "generation": gen, "state": state, "reason": reason,
                "reboot_generation": v["reboot_generation"], "intent_generation": v["generation"]})
        })
        .collect();
    ctx.must(
        ctx.post(
            "/v1/agent/report",
            cred,
            json!({"facts": facts(), "vms": vms}),
        )
        .await,
        "report",
    )
    .await;
}

/// Waits until the job ends, reporting the host's VMs running meanwhile.
async fn job_done(ctx: &Ctx, cred: &str, job: &str) -> Value {
    for _ in 0..200 {
        report(ctx, cred, None, "running", None).await;
        let j = ctx.get(&format!("/v1/jobs/{job}"), &ctx.admin).await.body;
        if matches!(
            j["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("job {job} did not end");
}

async fn restart_policies_through_the_api(b: Backend) {
    let ctx = Ctx::new(b, true).await;
    let (member, cred) = api_world(&ctx).await;
    // Default, explicit, and in a batch.
    let plain = ctx
        .must(
            ctx.post(
                "/v1/vms",
                &member,
                json!({"name": "plain", "flavor": "tiny", "image": "img"}),
            )
            .await,
            "vm",
        )
        .await;
    assert_eq!(plain["vm"]["restart_policy"], "never", "{plain}");
    let web = ctx
        .must(
            ctx.post(
                "/v1/vms",
                &member,
                json!({"name": "web", "flavor": "tiny", "image": "img", "restart_policy": "on_crash"}),
            )
            .await,
            "vm",
        )
        .await;
    assert_eq!(web["vm"]["restart_policy"], "on_crash");
    let batch = ctx
        .must(
            ctx.post(
                "/v1/vm-batches",
                &member,
                json!({"count": 2, "vm": {"name": "many", "flavor": "tiny", "image": "img", "restart_policy": "on_crash"}}),
            )
            .await,
            "batch",
        )
        .await;
    for op in batch["items"].as_array().expect("items") {
        assert_eq!(op["vm"]["restart_policy"], "on_crash");
    }
    // Bad values are refused with the field named; nothing changes.
    let bad = ctx
        .call(
            Method::POST,
            "/v1/vms",
            Some(&member),
            Some(json!({"name": "bad", "flavor": "tiny", "image": "img", "restart_policy": "always"})),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.body);
    common::assert_error_shape(&bad);
    let plain_path = format!("/v1/vms/{}", plain["vm"]["id"].as_str().expect("id"));
    for body in [
        json!({"restart_policy": "sometimes"}),
        json!({"restart_policy": "never", "extra": 1}),
    ] {
        let r = ctx
            .call(Method::PATCH, &plain_path, Some(&member), Some(body))
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
        common::assert_error_shape(&r);
    }
    let changed = ctx
        .call(
            Method::PATCH,
            &plain_path,
            Some(&member),
            Some(json!({"restart_policy": "on_crash"})),
        )
        .await;
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.body);
    assert_eq!(changed.body["restart_policy"], "on_crash");
    assert_eq!(
        ctx.get(&plain_path, &member).await.body["restart_policy"],
        "on_crash"
    );
    let unchanged = ctx
        .call(Method::PATCH, &plain_path, Some(&member), Some(json!({})))
        .await;
    assert_eq!(unchanged.body["restart_policy"], "on_crash");

    // The create job runs (the host reports the VM running); then the VM
    // crashes and one reconciler pass starts it again.
    let job = web["job"]["id"].as_str().expect("job");
    assert_eq!(job_done(&ctx, &cred, job).await["state"], "succeeded");
    let vm_id = web["vm"]["id"].as_str().expect("id").to_string();
    report(&ctx, &cred, Some(&vm_id), "crashed", Some("QEMU exited")).await;
    let vm_path = format!("/v1/vms/{vm_id}");
    let crashed = ctx.get(&vm_path, &member).await.body;
    assert_eq!(crashed["state"], "crashed", "{crashed}");
    reconcile::pass(&ctx.app, &ReconcilerConfig::new("test")).await;
    let restarting = ctx.get(&vm_path, &member).await.body;
    assert_eq!(restarting["state"], "starting", "{restarting}");
    assert!(
        restarting["state_reason"]
            .as_str()
            .is_some_and(|r| r.contains("automatic restart 1 of at most 3")),
        "{restarting}"
    );
    let jobs = ctx
        .get(&format!("/v1/jobs?target={vm_id}&kind=vm_start"), &member)
        .await
        .body;
    let items = jobs["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{jobs}");
    let start = items[0]["id"].as_str().expect("id").to_string();
    assert_eq!(job_done(&ctx, &cred, &start).await["state"], "succeeded");
    let v = ctx.get(&vm_path, &member).await.body;
    assert_eq!(v["state"], "running", "{v}");
    ctx.shutdown().await;
}

async fn orphans_reported_by_an_agent_show_on_its_host(b: Backend) {
    let ctx = Ctx::new(b, false).await;
    let (_, cred) = api_world(&ctx).await;
    let host = ctx.get("/v1/hosts/h1", &ctx.admin).await.body;
    assert_eq!(host["orphans"], json!([]), "{host}");
    let (kept, destroyed) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    ctx.must(
        ctx.post(
            "/v1/agent/report",
            &cred,
            json!({"facts": facts(), "vms": [], "orphans": [
                {"vm_id": kept, "action": "kept"},
                {"vm_id": destroyed, "action": "destroyed"}]}),
        )
        .await,
        "report",
    )
    .await;
    let host = ctx.get("/v1/hosts/h1", &ctx.admin).await.body;
    let orphans = host["orphans"].as_array().expect("orphans");
    assert_eq!(orphans.len(), 2, "{host}");
    let action = |id: uuid::Uuid| {
        orphans
            .iter()
            .find(|o| o["vm_id"] == id.to_string())
            .map(|o| o["action"].clone())
    };
    assert_eq!(action(kept), Some(json!("kept")));
    assert_eq!(action(destroyed), Some(json!("destroyed")));
    assert!(orphans.iter().all(|o| o["first_seen_at"].is_string()));
    // Lists are not burdened with them.
    let list = ctx.get("/v1/hosts", &ctx.admin).await.body;
    assert_eq!(list["items"][0]["orphans"], json!([]), "{list}");
    // A bad action is refused.
    let r = ctx
        .post(
            "/v1/agent/report",
            &cred,
            json!({"facts": facts(), "vms": [], "orphans": [{"vm_id": kept, "action": "eaten"}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    ctx.shutdown().await;
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[tokio::test] async fn $name() { super::$name(super::Backend::Sqlite).await; })*
        }
        mod on_postgres {
            $(#[tokio::test] async fn $name() { super::$name(super::Backend::Postgres).await; })*
        }
    };
}

both_backends!(
    restart_policies_through_the_api,
    orphans_reported_by_an_agent_show_on_its_host,
);
