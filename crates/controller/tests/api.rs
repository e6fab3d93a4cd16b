//! The API end to end in process (real router, real store, real job runner),
//! each test on SQLite and on PostgreSQL.

mod common;

use axum::http::{Method, StatusCode};
use common::{assert_error_shape, Backend, Ctx};
use serde_json::{json, Value};

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Backend::Sqlite).await; })*
        }
        mod on_postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Backend::Postgres).await; })*
        }
    };
}

both_backends!(
    tenant_isolation_sweep,
    readers_cannot_change_anything,
    every_operation_needs_a_token,
    bad_input_gets_clear_errors,
    vm_intent_lifecycle,
    images_are_validated_and_checksummed,
    lists_page_with_cursors_and_filter,
    idempotency_key_returns_the_same_job,
    cancelling_a_queued_job_unwinds_it,
    tokens_are_shown_once_and_revocable,
    agent_endpoints_take_host_credentials_only,
    agent_reports_are_gated_by_generation,
    pool_volumes_claim_room_and_refuse_clearly,
);

/// A world with two projects. A holds one of everything.
struct World {
    a_member: String,
    a_reader: String,
    b_member: String,
    /// Path parameter name → A's resource id.
    a_ids: Vec<(&'static str, String)>,
    flavor: String,
    /// The backup target (shared by every project, like a flavor).
    target: String,
    /// A shared storage pool (shared by every project, like a flavor).
    pool: String,
    host: String,
    /// The world's host, when it enrolled one (settle() answers for it as
    /// its agent would).
    host_credential: Option<String>,
}

async fn world(ctx: &Ctx) -> World {
    let admin = &ctx.admin;
    let a = ctx
        .must(
            ctx.post("/v1/projects", admin, json!({"name": "a"})).await,
            "project a",
        )
        .await;
    ctx.must(
        ctx.post("/v1/projects", admin, json!({"name": "b"})).await,
        "project b",
    )
    .await;
    let flavor = ctx
        .must(
            ctx.post("/v1/flavors", admin, json!({"name": "tiny", "vcpus": 1, "memory_bytes": 128u64 << 20, "disk_bytes": 1u64 << 30})).await,
            "flavor",
        )
        .await;
    let token = |role: &str, project: &str, name: &str| json!({"name": name, "role": role, "project": project});
    let a_member = ctx
        .must(
            ctx.post("/v1/tokens", admin, token("member", "a", "am"))
                .await,
            "a member",
        )
        .await;
    let a_reader = ctx
        .must(
            ctx.post("/v1/tokens", admin, token("reader", "a", "ar"))
                .await,
            "a reader",
        )
        .await;
    let b_member = ctx
        .must(
            ctx.post("/v1/tokens", admin, token("member", "b", "bm"))
                .await,
            "b member",
        )
        .await;
    let am = a_member["secret"].as_str().expect("secret").to_string();
    // A member can make tokens for its own project.
    let a_extra = ctx
        .must(
            ctx.post(
                "/v1/tokens",
                &am,
                json!({"name": "extra", "role": "reader"}),
            )
            .await,
            "extra",
        )
        .await;

    let img = ctx
        .must(
            ctx.post("/v1/images", &am, json!({"name": "img-a"})).await,
            "image",
        )
        .await;
    let img_id = img["id"].as_str().expect("id").to_string();
    let data = std::fs::read(ctx.qcow2("a.qcow2", "64M")).expect("read qcow2");
    ctx.must(
        ctx.put_bytes(&format!("/v1/images/{img_id}/data"), &am, data)
            .await,
        "upload",
    )
    .await;
    let group = ctx
        .must(
            ctx.post(
                "/v1/server-groups",
                &am,
                json!({"name": "grp-a", "policy": "soft_anti_affinity"}),
            )
            .await,
            "server group",
        )
        .await;
    // VMs need a host with room: enroll one unless the test did.
    let hosts = ctx.get("/v1/hosts", admin).await.body;
    let host_credential = match hosts["items"].as_array().map(|a| a.is_empty()) {
        Some(true) => Some(enroll(ctx, "host-w").await),
        _ => None,
    };
    let host = ctx.get("/v1/hosts", admin).await.body["items"][0]["id"]
        .as_str()
        .expect("host id")
        .to_string();
    let op = ctx
        .must(
            ctx.post(
                "/v1/vms",
                &am,
                json!({"name": "vm-a", "flavor": "tiny", "image": "img-a"}),
            )
            .await,
            "vm",
        )
        .await;
    // A's storage: a volume, and (once the VM runs) a backup and a snapshot,
    // their requests answered as the host's agent would.
    let target = ctx
        .must(
            ctx.post(
                "/v1/backup-targets",
                admin,
                json!({"name": "t", "path": "/srv/backups"}),
            )
            .await,
            "backup target",
        )
        .await;
    let pool = ctx
        .must(
            ctx.post(
                "/v1/storage-pools",
                admin,
                json!({"name": "shared", "path": "/srv/pool"}),
            )
            .await,
            "storage pool",
        )
        .await;
    let volume = ctx
        .must(
            ctx.post(
                "/v1/volumes",
                &am,
                json!({"name": "vol-a", "size_bytes": 16u64 << 20}),
            )
            .await,
            "volume",
        )
        .await;
    // Only a world whose jobs run and whose host answers can take them;
    // other worlds get ids nothing has (their tests do not look them up).
    let (backup_id, snapshot_id) = if ctx.runner.is_some() && host_credential.is_some() {
        settle_host(ctx, host_credential.as_deref()).await;
        let vm_id = op["vm"]["id"].as_str().expect("id").to_string();
        let backup = ctx
            .must(
                ctx.post(&format!("/v1/vms/{vm_id}/backups"), &am, json!({}))
                    .await,
                "backup",
            )
            .await;
        settle_host(ctx, host_credential.as_deref()).await;
        let snap = ctx
            .must(
                ctx.post(
                    &format!("/v1/vms/{vm_id}/snapshots"),
                    &am,
                    json!({"name": "snap-a"}),
                )
                .await,
                "snapshot",
            )
            .await;
        settle_host(ctx, host_credential.as_deref()).await;
        (
            backup["backup"]["id"].as_str().expect("id").to_string(),
            snap["snapshot"]["id"].as_str().expect("id").to_string(),
        )
    } else {
        (
            uuid::Uuid::new_v4().to_string(),
            uuid::Uuid::new_v4().to_string(),
        )
    };
    World {
        a_member: am,
        a_reader: a_reader["secret"].as_str().expect("secret").to_string(),
        b_member: b_member["secret"].as_str().expect("secret").to_string(),
        a_ids: vec![
            ("project", a["id"].as_str().expect("id").to_string()),
            (
                "token",
                a_extra["token"]["id"].as_str().expect("id").to_string(),
            ),
            ("image", img_id),
            ("vm", op["vm"]["id"].as_str().expect("id").to_string()),
            ("job", op["job"]["id"].as_str().expect("id").to_string()),
            ("group", group["id"].as_str().expect("id").to_string()),
            ("backup", backup_id),
            ("snapshot", snapshot_id),
            ("volume", volume["id"].as_str().expect("id").to_string()),
        ],
        target: target["id"].as_str().expect("id").to_string(),
        pool: pool["id"].as_str().expect("id").to_string(),
        flavor: flavor["id"].as_str().expect("id").to_string(),
        host,
        host_credential,
    }
}

/// Every operation of the checked-in API document: (method, path template,
/// operation id).
fn operations() -> Vec<(Method, String, String)> {
    let doc = stratus_controller::http::openapi::document_json();
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("item") {
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            ops.push((
                m,
                path.clone(),
                op["operationId"].as_str().expect("operationId").to_string(),
            ));
        }
    }
    assert!(ops.len() >= 30);
    ops
}

fn params_of(path: &str) -> Vec<String> {
    path.split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(str::to_string)
        .collect()
}

/// A valid body for each operation that takes one, so a refusal is about
/// authorization and not about the body.
fn valid_body(op: &str) -> Option<Value> {
    Some(match op {
        "project_create" => json!({"name": "new-project"}),
        "token_create" => json!({"name": "new-token", "role": "reader"}),
        "enrollment_token_create" => json!({}),
        "flavor_create" => {
            json!({"name": "new-flavor", "vcpus": 1, "memory_bytes": 134217728u64, "disk_bytes": 1073741824u64})
        }
        "image_create" => json!({"name": "new-image"}),
        "vm_create" => json!({"name": "new-vm", "flavor": "tiny", "image": "img-a"}),
        "vm_batch_create" | "vm_placement_preview" => {
            json!({"count": 2, "vm": {"name": "new-vm", "flavor": "tiny", "image": "img-a"}})
        }
        "server_group_create" => json!({"name": "new-group", "policy": "anti_affinity"}),
        "cluster_update" => json!({"cpu_ratio": 2.0}),
        "host_update" => json!({"add_tags": ["ssd"]}),
        "vm_update" => json!({"restart_policy": "on_crash"}),
        "vm_exec" => json!({"argv": ["true"]}),
        "backup_target_create" => json!({"name": "new-target", "path": "/srv/new"}),
        "pool_create" => json!({"name": "new-pool", "path": "/srv/new-pool"}),
        "host_maintenance" => json!({"enabled": true}),
        "vm_migrate" => json!({}),
        "backup_create" => json!({}),
        "backup_restore" => json!({"as_vm": "restored"}),
        "backup_policy_set" => json!({"keep_last": 3}),
        "snapshot_create" => json!({"name": "new-snap"}),
        "snapshot_policy_set" => json!({"keep": 3}),
        "volume_create" => json!({"name": "new-vol", "size_bytes": 16u64 << 20}),
        "volume_attach" => json!({"vm": "vm-a"}),
        "volume_resize" => json!({"size_bytes": 32u64 << 20}),
        "agent_request_progress" => json!({"done_bytes": 0, "total_bytes": 0}),
        "agent_enroll" => {
            json!({"enroll_token": "stratus-enroll_bogus", "name": "h", "address": "127.0.0.1",
            "facts": {"cpus": 2, "memory_bytes": 1073741824u64, "disk_bytes": 1073741824u64, "driver": "sim"}})
        }
        "agent_report" => {
            json!({"facts": {"cpus": 2, "memory_bytes": 1073741824u64, "disk_bytes": 1073741824u64, "driver": "sim"}, "vms": []})
        }
        "agent_request_result" => json!({"error": "x"}),
        "agent_console_append" => json!({"offset": 0, "data_base64": ""}),
        _ => return None,
    })
}

async fn send(ctx: &Ctx, method: &Method, path: &str, op: &str, token: &str) -> common::Resp {
    if op == "image_upload" {
        let req = axum::http::Request::builder()
            .method(method.clone())
            .uri(path)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/octet-stream")
            .body(axum::body::Body::from(vec![0u8; 512]))
            .expect("request");
        return ctx.raw(req).await;
    }
    ctx.call(method.clone(), path, Some(token), valid_body(op))
        .await
}

/// Everything an admin can list, with the fields that change on mere use
/// (token last use) removed: "did anything change?" in one value.
async fn snapshot(ctx: &Ctx) -> Value {
    let mut all = serde_json::Map::new();
    for list in [
        "/v1/projects",
        "/v1/tokens?include_revoked=true",
        "/v1/images",
        "/v1/vms",
        "/v1/jobs",
        "/v1/flavors",
        "/v1/hosts",
        "/v1/clusters",
        "/v1/server-groups",
    ] {
        let mut r = ctx.get(list, &ctx.admin).await;
        assert_eq!(r.status, StatusCode::OK, "{list}");
        if let Some(items) = r.body["items"].as_array_mut() {
            for i in items {
                if let Some(o) = i.as_object_mut() {
                    o.remove("last_used_at");
                    o.remove("updated_at");
                }
            }
        }
        all.insert(list.to_string(), r.body);
    }
    Value::Object(all)
}

async fn settle(ctx: &Ctx, w: &World) {
    settle_host(ctx, w.host_credential.as_deref()).await
}

/// What the world's host answers to a request, as its agent would.
fn request_answer(kind: &str) -> Value {
    match kind {
        "backup" => json!({"backup": {"mode": "full", "fallback_reason": null, "data_bytes": 0,
            "file_bytes": 0, "disk_bytes": 0, "sha256": "00", "duration_ms": 0}}),
        "snapshot_create" => json!({"snapshot": {"quiesced": false, "bytes": 0}}),
        _ => json!({}),
    }
}

async fn settle_host(ctx: &Ctx, host_credential: Option<&str>) {
    // Let the runner finish what the world queued, answering for the
    // world's host as its agent would: every VM as it is desired, every
    // request carried out.
    let mut generation = 1000;
    for _ in 0..200 {
        if let Some(cred) = host_credential {
            let desired = ctx.get("/v1/agent/desired", cred).await.body;
            for r in desired["requests"].as_array().cloned().unwrap_or_default() {
                let (Some(id), Some(kind)) = (r["id"].as_str(), r["request"]["kind"].as_str())
                else {
                    continue;
                };
                ctx.post(
                    &format!("/v1/agent/requests/{id}/result"),
                    cred,
                    request_answer(kind),
                )
                .await;
            }
            let mut vms = Vec::new();
            for v in desired["vms"].as_array().cloned().unwrap_or_default() {
                generation += 1;
                let state = match v["desired_state"].as_str() {
                    Some("running") => "running",
                    Some("stopped") => "stopped",
                    _ => "absent",
                };
                vms.push(json!({"vm_id": v["vm_id"], "generation": generation, "state": state,
                    "reboot_generation": v["reboot_generation"], "intent_generation": v["generation"]}));
            }
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
        let r = ctx.get("/v1/jobs?state=queued", &ctx.admin).await;
        let r2 = ctx.get("/v1/jobs?state=running", &ctx.admin).await;
        if r.body["items"].as_array().is_some_and(|a| a.is_empty())
            && r2.body["items"].as_array().is_some_and(|a| a.is_empty())
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("jobs did not settle");
}

async fn tenant_isolation_sweep(b: Backend) {
    let ctx = Ctx::new(b, true).await;
    let w = world(&ctx).await;
    settle(&ctx, &w).await;
    let before = snapshot(&ctx).await;
    let mut checked = 0;
    for (method, template, op) in operations() {
        let params = params_of(&template);
        if params.is_empty() || template.starts_with("/v1/agent/") {
            continue;
        }
        // Hosts, clusters and flavors belong to no project: not a tenancy
        // question.
        if params
            .iter()
            .any(|p| p == "host" || p == "flavor" || p == "cluster" || p == "target" || p == "pool")
        {
            continue;
        }
        // Fill every parameter with A's resource, by id and (where it has
        // one) by name.
        let mut path = template.clone();
        for p in &params {
            let id = &w
                .a_ids
                .iter()
                .find(|(k, _)| k == p)
                .unwrap_or_else(|| panic!("no A resource for {{{p}}} in {template}"))
                .1;
            path = path.replace(&format!("{{{p}}}"), id);
        }
        let r = send(&ctx, &method, &path, &op, &w.b_member).await;
        assert_eq!(
            r.status,
            StatusCode::NOT_FOUND,
            "{method} {path} ({op}) as B: {}",
            r.body
        );
        assert_error_shape(&r);
        assert_eq!(r.code(), "not_found");
        checked += 1;
    }
    assert!(checked >= 15, "swept only {checked} operations");
    for by_name in [
        "/v1/vms/vm-a",
        "/v1/images/img-a",
        "/v1/projects/a",
        "/v1/vms/vm-a?project=a",
        "/v1/server-groups/grp-a",
    ] {
        let r = ctx.get(by_name, &w.b_member).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{by_name}");
    }
    // Lists never show A's resources to B, filtered or not.
    for list in [
        "/v1/projects",
        "/v1/tokens",
        "/v1/images",
        "/v1/vms",
        "/v1/jobs",
        "/v1/server-groups",
    ] {
        let r = ctx.get(list, &w.b_member).await;
        assert_eq!(r.status, StatusCode::OK, "{list}");
        let text = r.body.to_string();
        for (kind, id) in &w.a_ids {
            assert!(!text.contains(id.as_str()), "{list} shows A's {kind} to B");
        }
        if list == "/v1/projects" {
            let named = ctx.get("/v1/projects?name=a", &w.b_member).await;
            assert_eq!(named.body["items"].as_array().map(|a| a.len()), Some(0));
        } else {
            let filtered = ctx.get(&format!("{list}?project=a"), &w.b_member).await;
            assert_eq!(filtered.status, StatusCode::NOT_FOUND, "{list}?project=a");
        }
    }
    // And B cannot create in A.
    let r = ctx
        .post(
            "/v1/vms",
            &w.b_member,
            json!({"name": "x", "flavor": "tiny", "image": "img-a", "project": "a"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["field"], "project");
    let r = ctx
        .post(
            "/v1/vms",
            &w.b_member,
            json!({"name": "x", "flavor": "tiny", "image": "img-a"}),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "A's private image is invisible to B"
    );
    assert_eq!(r.body["field"], "image");
    assert_eq!(snapshot(&ctx).await, before, "nothing changed");
    // A itself sees all of it.
    for (kind, id) in &w.a_ids {
        let path = match *kind {
            "project" => format!("/v1/projects/{id}"),
            "token" => format!("/v1/tokens/{id}"),
            "image" => format!("/v1/images/{id}"),
            "vm" => format!("/v1/vms/{id}"),
            "group" => format!("/v1/server-groups/{id}"),
            "backup" => format!("/v1/backups/{id}"),
            "volume" => format!("/v1/volumes/{id}"),
            // A snapshot is shown in its VM's list.
            "snapshot" => {
                let vm = w.a_ids.iter().find(|(k, _)| *k == "vm").expect("vm");
                format!("/v1/vms/{}/snapshots", vm.1)
            }
            _ => format!("/v1/jobs/{id}"),
        };
        assert_eq!(
            ctx.get(&path, &w.a_member).await.status,
            StatusCode::OK,
            "{path} as A"
        );
    }
    ctx.shutdown().await;
}

async fn readers_cannot_change_anything(b: Backend) {
    let ctx = Ctx::new(b, true).await;
    let w = world(&ctx).await;
    settle(&ctx, &w).await;
    let before = snapshot(&ctx).await;
    let mut checked = 0;
    for (method, template, op) in operations() {
        // Agent endpoints take host credentials, not API tokens (see
        // agent_endpoints_take_host_credentials_only).
        if method == Method::GET || template.starts_with("/v1/agent/") {
            continue;
        }
        let mut path = template.clone();
        for p in params_of(&template) {
            let id = match p.as_str() {
                "flavor" => w.flavor.clone(),
                "host" => w.host.clone(),
                "cluster" => "default".to_string(),
                "target" => w.target.clone(),
                "pool" => w.pool.clone(),
                other => w
                    .a_ids
                    .iter()
                    .find(|(k, _)| *k == other)
                    .expect("resource")
                    .1
                    .clone(),
            };
            path = path.replace(&format!("{{{p}}}"), &id);
        }
        let r = send(&ctx, &method, &path, &op, &w.a_reader).await;
        assert_eq!(
            r.status,
            StatusCode::FORBIDDEN,
            "{method} {path} ({op}) as reader: {}",
            r.body
        );
        assert_error_shape(&r);
        checked += 1;
    }
    assert!(checked >= 15, "checked only {checked} mutations");
    assert_eq!(snapshot(&ctx).await, before, "nothing changed");
    // Reading works.
    assert_eq!(
        ctx.get("/v1/vms/vm-a", &w.a_reader).await.status,
        StatusCode::OK
    );
    ctx.shutdown().await;
}

async fn every_operation_needs_a_token(b: Backend) {
    let ctx = Ctx::new(b, false).await;
    for (method, template, op) in operations() {
        let path = template.replace(['{', '}'], "");
        let r = ctx.call(method.clone(), &path, None, valid_body(&op)).await;
        if template == "/healthz" {
            assert_eq!(r.status, StatusCode::OK);
            continue;
        }
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{method} {template}");
        assert_error_shape(&r);
        assert_eq!(r.code(), "unauthenticated");
        if template == "/v1/agent/enroll" {
            continue; // authenticated by the token in its body
        }
        for bad in ["Bearer nope", "Basic abc", "Bearer "] {
            let req = axum::http::Request::builder()
                .method(method.clone())
                .uri(&path)
                .header("authorization", bad)
                .body(axum::body::Body::empty())
                .expect("request");
            let r = ctx.raw(req).await;
            assert_eq!(
                r.status,
                StatusCode::UNAUTHORIZED,
                "{method} {template} with {bad:?}"
            );
        }
    }
}

async fn bad_input_gets_clear_errors(b: Backend) {
    let ctx = Ctx::new(b, false).await;
    let admin = ctx.admin.clone();
    type Case<'a> = (Method, &'a str, Option<Value>, StatusCode, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (
            Method::POST,
            "/v1/vm-batches",
            Some(json!({"count": 0, "vm": {"name": "x", "flavor": "f", "image": "i"}})),
            StatusCode::BAD_REQUEST,
            Some("count"),
        ),
        (
            Method::POST,
            "/v1/vm-batches",
            Some(json!({"count": 1001, "vm": {"name": "x", "flavor": "f", "image": "i"}})),
            StatusCode::BAD_REQUEST,
            Some("count"),
        ),
        (
            Method::POST,
            "/v1/vm-placements",
            Some(json!({"count": 0, "vm": {"name": "x", "flavor": "f", "image": "i"}})),
            StatusCode::BAD_REQUEST,
            Some("count"),
        ),
        (
            Method::PATCH,
            "/v1/clusters/default",
            Some(json!({"cpu_ratio": 0.0})),
            StatusCode::BAD_REQUEST,
            Some("cpu_ratio"),
        ),
        (
            Method::PATCH,
            "/v1/clusters/default",
            Some(json!({"weigher": "random"})),
            StatusCode::BAD_REQUEST,
            Some("weigher"),
        ),
        (
            Method::POST,
            "/v1/server-groups",
            Some(json!({"name": "g", "policy": "sideways", "project": "p"})),
            StatusCode::BAD_REQUEST,
            Some("policy"),
        ),
        (
            Method::POST,
            "/v1/host-enrollment-tokens",
            Some(json!({"uses": 0})),
            StatusCode::BAD_REQUEST,
            Some("uses"),
        ),
        (
            Method::POST,
            "/v1/vms",
            Some(json!({"name": "x", "flavor": "f", "image": "i", "require_tags": ["Not A Tag"]})),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            Method::POST,
            "/v1/flavors",
            Some(json!({"name": "f", "vcpus": 1, "memory_bytes": "lots", "disk_bytes": 1})),
            StatusCode::BAD_REQUEST,
            Some("memory_bytes"),
        ),
        (
            Method::POST,
            "/v1/flavors",
            Some(
                json!({"name": "f", "vcpus": 0, "memory_bytes": 134217728u64, "disk_bytes": 1073741824u64}),
            ),
            StatusCode::BAD_REQUEST,
            Some("vcpus"),
        ),
        (
            Method::POST,
            "/v1/flavors",
            Some(
                json!({"name": "f", "vcpus": 1, "memory_bytes": 1000, "disk_bytes": 1073741824u64}),
            ),
            StatusCode::BAD_REQUEST,
            Some("memory_bytes"),
        ),
        (
            Method::POST,
            "/v1/flavors",
            Some(json!({"name": "f", "vcpus": -1, "memory_bytes": 134217728u64, "disk_bytes": 1})),
            StatusCode::BAD_REQUEST,
            Some("vcpus"),
        ),
        (
            Method::POST,
            "/v1/projects",
            Some(json!({"name": "Not Valid"})),
            StatusCode::BAD_REQUEST,
            Some("name"),
        ),
        (
            Method::POST,
            "/v1/projects",
            Some(json!({"name": "ok", "extra": 1})),
            StatusCode::BAD_REQUEST,
            Some("extra"),
        ),
        (
            Method::POST,
            "/v1/projects",
            Some(json!({})),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            Method::POST,
            "/v1/projects",
            Some(json!({"name": "p", "description": "x".repeat(5000)})),
            StatusCode::BAD_REQUEST,
            Some("description"),
        ),
        (
            Method::POST,
            "/v1/tokens",
            Some(json!({"name": "t", "role": "god"})),
            StatusCode::BAD_REQUEST,
            Some("role"),
        ),
        (
            Method::POST,
            "/v1/tokens",
            Some(json!({"name": "t", "role": "member"})),
            StatusCode::BAD_REQUEST,
            Some("project"),
        ),
        (
            Method::POST,
            "/v1/tokens",
            Some(json!({"name": "t", "role": "admin", "project": "x"})),
            StatusCode::BAD_REQUEST,
            Some("project"),
        ),
        (
            Method::POST,
            "/v1/vms",
            Some(json!({"name": "v", "flavor": "f", "image": "i"})),
            StatusCode::BAD_REQUEST,
            Some("project"),
        ),
        (
            Method::GET,
            "/v1/vms?limit=0",
            None,
            StatusCode::BAD_REQUEST,
            Some("limit"),
        ),
        (
            Method::GET,
            "/v1/vms?limit=abc",
            None,
            StatusCode::BAD_REQUEST,
            Some("limit"),
        ),
        (
            Method::GET,
            "/v1/vms?cursor=forged",
            None,
            StatusCode::BAD_REQUEST,
            Some("cursor"),
        ),
        (
            Method::GET,
            "/v1/vms?state=dancing",
            None,
            StatusCode::BAD_REQUEST,
            Some("state"),
        ),
        (
            Method::GET,
            "/v1/jobs?kind=nonsense",
            None,
            StatusCode::BAD_REQUEST,
            Some("kind"),
        ),
        (
            Method::GET,
            "/v1/jobs/not-a-uuid",
            None,
            StatusCode::BAD_REQUEST,
            Some("job"),
        ),
        (
            Method::GET,
            "/v1/jobs/0190b6d2-7f0e-7c3a-9d6b-2f8e1f2a3b4c/wait?timeout_secs=1000",
            None,
            StatusCode::BAD_REQUEST,
            Some("timeout_secs"),
        ),
        (
            Method::GET,
            "/v1/vms/0190b6d2-7f0e-7c3a-9d6b-2f8e1f2a3b4c",
            None,
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            Method::GET,
            "/v1/nothing-here",
            None,
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            Method::PATCH,
            "/v1/vms",
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            None,
        ),
        (
            Method::POST,
            "/v1/images",
            Some(json!({"name": "i", "project": "nope"})),
            StatusCode::BAD_REQUEST,
            Some("project"),
        ),
    ];
    for (method, path, body, status, field) in cases {
        let r = ctx.call(method.clone(), path, Some(&admin), body).await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        assert_error_shape(&r);
        if let Some(f) = field {
            assert_eq!(r.body["field"], f, "{method} {path}: {}", r.body);
        }
    }
    // Malformed JSON and the wrong content type.
    let req = axum::http::Request::builder()
        .method(Method::POST)
        .uri("/v1/projects")
        .header("authorization", format!("Bearer {admin}"))
        .header("content-type", "application/json")
        .body(axum::body::Body::from("{not json"))
        .expect("request");
    let r = ctx.raw(req).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_error_shape(&r);
    let req = axum::http::Request::builder()
        .method(Method::POST)
        .uri("/v1/projects")
        .header("authorization", format!("Bearer {admin}"))
        .header("content-type", "text/plain")
        .body(axum::body::Body::from("{}"))
        .expect("request");
    let r = ctx.raw(req).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_error_shape(&r);
    // A body over the limit.
    let big = json!({"name": "p", "description": "x".repeat(2 << 20)});
    let r = ctx.post("/v1/projects", &admin, big).await;
    assert!(r.status.is_client_error(), "{}", r.status);
    assert_error_shape(&r);
    // Nothing was created by any of it.
    let s = ctx.get("/v1/projects", &admin).await;
    assert_eq!(s.body["items"].as_array().map(|a| a.len()), Some(0));
    let s = ctx.get("/v1/flavors", &admin).await;
    assert_eq!(s.body["items"].as_array().map(|a| a.len()), Some(0));
    // Duplicates are conflicts.
    ctx.must(
        ctx.post("/v1/projects", &admin, json!({"name": "p"})).await,
        "p",
    )
    .await;
    let r = ctx.post("/v1/projects", &admin, json!({"name": "p"})).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.code(), "name_in_use");
}

async fn vm_intent_lifecycle(b: Backend) {
    let ctx = Ctx::new(b, true).await;
    let w = world(&ctx).await;
    let am = &w.a_member;
    let cred = w
        .host_credential
        .clone()
        .expect("the world enrolled its host");
    let host_alloc = |h: &Value| h["allocated"]["memory_bytes"].as_u64().unwrap_or(u64::MAX);
    // vm-a was placed at creation and holds its share of the host.
    let vm = ctx.get("/v1/vms/vm-a", am).await.body;
    assert_eq!(vm["host_id"], w.host.as_str(), "{vm}");
    let host = ctx
        .get(&format!("/v1/hosts/{}", w.host), &ctx.admin)
        .await
        .body;
    assert_eq!(host_alloc(&host), 128 << 20, "{host}");
    // Its job waits for the host, which reports the VM running.
    settle(&ctx, &w).await;
    let job_id = &w.a_ids.iter().find(|(k, _)| *k == "job").expect("job").1;
    let job = ctx
        .get(&format!("/v1/jobs/{job_id}/wait?timeout_secs=5"), am)
        .await
        .body;
    assert_eq!(job["state"], "succeeded", "{job}");
    let steps: Vec<&str> = job["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["step"].as_str())
        .collect();
    assert_eq!(steps.first(), Some(&"queued"), "{job}");
    assert_eq!(steps.last(), Some(&"succeeded"), "{job}");
    assert_eq!(ctx.get("/v1/vms/vm-a", am).await.body["state"], "running");

    // What does not fit is refused at once, with the scheduler's reasons,
    // and nothing is recorded. The host has 8 GiB; a 16 GiB flavor fits
    // nowhere.
    ctx.must(ctx.post("/v1/flavors", &ctx.admin, json!({"name": "huge", "vcpus": 2, "memory_bytes": 16u64 << 30, "disk_bytes": 10u64 << 30})).await, "huge").await;
    let r = ctx
        .post(
            "/v1/vms",
            am,
            json!({"name": "big", "flavor": "huge", "image": "img-a"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(r.code(), "no_host_available");
    assert!(
        r.body["message"].as_str().unwrap_or("").contains("memory"),
        "{}",
        r.body
    );
    assert_eq!(r.body["details"]["hosts_total"], 1, "{}", r.body);
    assert_eq!(
        r.body["details"]["eliminated"][0]["filter"], "memory",
        "{}",
        r.body
    );
    assert_eq!(
        r.body["details"]["near_misses"].as_array().map(|a| a.len()),
        Some(0),
        "host names are the operator's: {}",
        r.body
    );
    assert_eq!(
        ctx.get("/v1/vms/big", am).await.status,
        StatusCode::NOT_FOUND
    );
    // The admin sees the closest host by name.
    let r = ctx
        .post(
            "/v1/vms",
            &ctx.admin,
            json!({"name": "big", "flavor": "huge", "image": "img-a", "project": "a"}),
        )
        .await;
    assert_eq!(
        r.body["details"]["near_misses"][0]["host"], "host-w",
        "{}",
        r.body
    );
    // A dry run answers the same question without creating anything.
    let r = ctx
        .post("/v1/vm-placements", &ctx.admin, json!({"count": 3, "vm": {"name": "web", "flavor": "tiny", "image": "img-a", "project": "a"}}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["fits"], true, "{}", r.body);
    assert_eq!(r.body["placements"].as_array().map(|a| a.len()), Some(3));
    assert_eq!(r.body["placements"][0]["host"], "host-w");
    assert_eq!(r.body["explanation"]["feasible"], 1);
    let r = ctx
        .post("/v1/vm-placements", am, json!({"count": 1, "vm": {"name": "web", "flavor": "tiny", "image": "img-a", "zone": "nowhere"}}))
        .await;
    assert_eq!(r.body["fits"], false, "{}", r.body);
    assert_eq!(
        r.body["explanation"]["eliminated"][0]["filter"], "zone",
        "{}",
        r.body
    );
    assert!(r.body["placements"]
        .as_array()
        .is_some_and(|a| a.is_empty()));
    assert_eq!(
        ctx.get("/v1/vms/web-1", am).await.status,
        StatusCode::NOT_FOUND
    );
    // A batch is all or nothing: 80 tiny VMs (1 vCPU each) do not fit in
    // the host's 16 vCPUs (4 CPUs at the default 4.0 overcommit) with vm-a
    // on it, so none is created.
    let r = ctx
        .post(
            "/v1/vm-batches",
            am,
            json!({"count": 80, "vm": {"name": "many", "flavor": "tiny", "image": "img-a"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap_or("")
            .contains("15 of 80"),
        "{}",
        r.body
    );
    assert_eq!(
        ctx.get("/v1/vms/many-1", am).await.status,
        StatusCode::NOT_FOUND
    );
    // Three fit; hard anti-affinity with one host takes one, refuses more.
    let r = ctx
        .post("/v1/vm-batches", am, json!({"count": 3, "vm": {"name": "trio", "flavor": "tiny", "image": "img-a", "group": "grp-a"}}))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert_eq!(r.body["items"].as_array().map(|a| a.len()), Some(3));
    assert_eq!(r.body["items"][2]["vm"]["name"], "trio-3");
    assert_eq!(
        r.body["items"][0]["vm"]["server_group_id"],
        w.a_ids
            .iter()
            .find(|(k, _)| *k == "group")
            .expect("group")
            .1
            .as_str()
    );
    ctx.must(
        ctx.post(
            "/v1/server-groups",
            am,
            json!({"name": "apart", "policy": "anti_affinity"}),
        )
        .await,
        "apart",
    )
    .await;
    let r = ctx
        .post("/v1/vm-batches", am, json!({"count": 2, "vm": {"name": "pair", "flavor": "tiny", "image": "img-a", "group": "apart"}}))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(
        r.body["details"]["eliminated"][0]["filter"], "anti_affinity",
        "{}",
        r.body
    );
    let host = ctx
        .get(&format!("/v1/hosts/{}", w.host), &ctx.admin)
        .await
        .body;
    assert_eq!(
        host_alloc(&host),
        4 * (128 << 20),
        "vm-a and the trio: {host}"
    );
    // A group with members cannot be deleted.
    let r = ctx.delete("/v1/server-groups/grp-a", am).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.code(), "group_in_use");
    // Placement constraints: tags the host lacks.
    let r = ctx
        .post(
            "/v1/vms",
            am,
            json!({"name": "fast", "flavor": "tiny", "image": "img-a", "require_tags": ["ssd"]}),
        )
        .await;
    assert_eq!(
        r.body["details"]["eliminated"][0]["filter"], "required_tags",
        "{}",
        r.body
    );
    ctx.must(
        ctx.call(
            Method::PATCH,
            &format!("/v1/hosts/{}", w.host),
            Some(&ctx.admin),
            Some(json!({"add_tags": ["ssd"]})),
        )
        .await,
        "tag",
    )
    .await;
    let r = ctx
        .post(
            "/v1/vms",
            am,
            json!({"name": "fast", "flavor": "tiny", "image": "img-a", "require_tags": ["ssd"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert_eq!(r.body["vm"]["placement"]["require_tags"][0], "ssd");
    settle(&ctx, &w).await;
    let _ = cred;
    // Names are unique per project, not globally.
    let r = ctx
        .post(
            "/v1/vms",
            am,
            json!({"name": "vm-a", "flavor": "tiny", "image": "img-a"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.code(), "name_in_use");
    // The image and flavor are in use.
    assert_eq!(
        ctx.delete("/v1/images/img-a", am).await.status,
        StatusCode::CONFLICT
    );
    assert_eq!(
        ctx.delete("/v1/flavors/tiny", &ctx.admin).await.status,
        StatusCode::CONFLICT
    );
    // Delete.
    let op = ctx.delete("/v1/vms/vm-a", am).await;
    assert_eq!(op.status, StatusCode::ACCEPTED);
    assert_eq!(op.body["vm"]["state"], "deleting");
    settle(&ctx, &w).await;
    let job = ctx
        .get(
            &format!(
                "/v1/jobs/{}/wait?timeout_secs=10",
                op.body["job"]["id"].as_str().expect("id")
            ),
            am,
        )
        .await
        .body;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["progress"], 100);
    assert_eq!(
        ctx.get("/v1/vms/vm-a", am).await.status,
        StatusCode::NOT_FOUND
    );
    let host = ctx
        .get(&format!("/v1/hosts/{}", w.host), &ctx.admin)
        .await
        .body;
    assert_eq!(
        host_alloc(&host),
        4 * (128 << 20),
        "vm-a's share was released: {host}"
    );
    // A too-small flavor is refused up front.
    ctx.must(ctx.post("/v1/flavors", &ctx.admin, json!({"name": "mini", "vcpus": 1, "memory_bytes": 134217728u64, "disk_bytes": 1048576u64})).await, "mini").await;
    let r = ctx
        .post(
            "/v1/vms",
            am,
            json!({"name": "v2", "flavor": "mini", "image": "img-a"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.code(), "disk_too_small");
    ctx.shutdown().await;
}

async fn images_are_validated_and_checksummed(b: Backend) {
    let ctx = Ctx::new(b, false).await;
    let admin = ctx.admin.clone();
    ctx.must(
        ctx.post("/v1/projects", &admin, json!({"name": "p"})).await,
        "p",
    )
    .await;
    let qcow = ctx.qcow2("good.qcow2", "100M");
    let data = std::fs::read(&qcow).expect("read");
    let want = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&data))
    };
    // By path (admin).
    let img = ctx
        .must(
            ctx.post(
                "/v1/images",
                &admin,
                json!({"name": "by-path", "project": "p", "path": qcow.display().to_string()}),
            )
            .await,
            "by path",
        )
        .await;
    assert_eq!(img["state"], "ready");
    assert_eq!(img["format"], "qcow2");
    assert_eq!(img["virtual_size"], 100u64 << 20);
    assert_eq!(img["file_size"], data.len() as u64);
    assert_eq!(img["sha256"], want.as_str());
    let stored = ctx
        .app
        .images
        .path_of(img["id"].as_str().expect("id").parse().expect("uuid"));
    assert_eq!(std::fs::read(&stored).expect("stored copy"), data);
    // By upload.
    let pending = ctx
        .must(
            ctx.post("/v1/images", &admin, json!({"name": "up", "project": "p"}))
                .await,
            "pending",
        )
        .await;
    assert_eq!(pending["state"], "pending");
    let id = pending["id"].as_str().expect("id").to_string();
    let r = ctx
        .put_bytes(&format!("/v1/images/{id}/data"), &admin, vec![])
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "empty upload");
    let r = ctx
        .put_bytes(&format!("/v1/images/{id}/data"), &admin, data.clone())
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["sha256"], want.as_str());
    let r = ctx
        .put_bytes(&format!("/v1/images/{id}/data"), &admin, data.clone())
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "second upload");
    // Refusals: relative or missing paths, an image with a backing file, a
    // format other than the one asked for, paths from non-admins.
    let r = ctx
        .post(
            "/v1/images",
            &admin,
            json!({"name": "rel", "project": "p", "path": "relative.qcow2"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["field"], "path");
    let r = ctx
        .post(
            "/v1/images",
            &admin,
            json!({"name": "missing", "project": "p", "path": "/nonexistent/x.qcow2"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.code(), "image_source_unreadable");
    let overlay = ctx.dir.path().join("overlay.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&qcow)
        .arg(&overlay)
        .status()
        .expect("qemu-img");
    assert!(st.success());
    let r = ctx
        .post(
            "/v1/images",
            &admin,
            json!({"name": "backed", "project": "p", "path": overlay.display().to_string()}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert_eq!(r.code(), "invalid_image");
    let r = ctx.post("/v1/images", &admin, json!({"name": "wrong", "project": "p", "path": qcow.display().to_string(), "format": "raw"})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.code(), "image_format_mismatch");
    let member = ctx
        .must(
            ctx.post(
                "/v1/tokens",
                &admin,
                json!({"name": "m", "role": "member", "project": "p"}),
            )
            .await,
            "m",
        )
        .await;
    let m = member["secret"].as_str().expect("secret");
    let r = ctx
        .post(
            "/v1/images",
            m,
            json!({"name": "sneaky", "path": "/etc/hostname"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = ctx
        .post(
            "/v1/images",
            m,
            json!({"name": "pub", "visibility": "public"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // None of the refusals left a record or a file.
    let names: Vec<String> = ctx.get("/v1/images", &admin).await.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(names, ["by-path", "up"]);
    let files = std::fs::read_dir(ctx.dir.path().join("images"))
        .expect("dir")
        .count();
    assert_eq!(files, 3, "two images plus tmp/");
    assert_eq!(
        std::fs::read_dir(ctx.dir.path().join("images/tmp"))
            .expect("tmp")
            .count(),
        0
    );
    // A pending image cannot back a VM.
    ctx.must(ctx.post("/v1/flavors", &admin, json!({"name": "f", "vcpus": 1, "memory_bytes": 134217728u64, "disk_bytes": 1073741824u64})).await, "f").await;
    ctx.must(
        ctx.post(
            "/v1/images",
            &admin,
            json!({"name": "empty", "project": "p"}),
        )
        .await,
        "empty",
    )
    .await;
    let r = ctx
        .post(
            "/v1/vms",
            m,
            json!({"name": "v", "flavor": "f", "image": "empty"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.code(), "image_not_ready");
    // Delete removes the file.
    assert_eq!(
        ctx.delete("/v1/images/by-path?project=p", &admin)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert!(!stored.exists());
}

async fn lists_page_with_cursors_and_filter(b: Backend) {
    let ctx = Ctx::new(b, false).await;
    let admin = ctx.admin.clone();
    for i in 0..7 {
        ctx.must(
            ctx.post("/v1/projects", &admin, json!({"name": format!("p{i}")}))
                .await,
            "p",
        )
        .await;
    }
    let mut names = Vec::new();
    let mut url = "/v1/projects?limit=3".to_string();
    loop {
        let r = ctx.get(&url, &admin).await;
        assert_eq!(r.status, StatusCode::OK);
        for p in r.body["items"].as_array().expect("items") {
            names.push(p["name"].as_str().expect("name").to_string());
        }
        match r.body["next_cursor"].as_str() {
            Some(c) => url = format!("/v1/projects?limit=3&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(names, ["p0", "p1", "p2", "p3", "p4", "p5", "p6"]);
    let r = ctx.get("/v1/projects?name=p4", &admin).await;
    assert_eq!(r.body["items"].as_array().map(|a| a.len()), Some(1));
}

async fn idempotency_key_returns_the_same_job(b: Backend) {
    let ctx = Ctx::new(b, false).await;
    let w = world(&ctx).await;
    let req = |key: &str| {
        axum::http::Request::builder()
            .method(Method::POST)
            .uri("/v1/vms")
            .header("authorization", format!("Bearer {}", w.a_member))
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(axum::body::Body::from(
                json!({"name": "idem", "flavor": "tiny", "image": "img-a"}).to_string(),
            ))
            .expect("request")
    };
    let first = ctx.raw(req("k-1")).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.body);
    let again = ctx.raw(req("k-1")).await;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{}", again.body);
    assert_eq!(first.body["job"]["id"], again.body["job"]["id"]);
    assert_eq!(first.body["vm"]["id"], again.body["vm"]["id"]);
    let other = ctx.raw(req("k-2")).await;
    assert_eq!(
        other.status,
        StatusCode::CONFLICT,
        "same name, new key: a real duplicate"
    );
}

async fn cancelling_a_queued_job_unwinds_it(b: Backend) {
    // No runner yet: the create job stays queued.
    let ctx = Ctx::new(b, false).await;
    let w = world(&ctx).await;
    let job_id = w
        .a_ids
        .iter()
        .find(|(k, _)| *k == "job")
        .expect("job")
        .1
        .clone();
    let job = ctx
        .get(&format!("/v1/jobs/{job_id}"), &w.a_member)
        .await
        .body;
    assert_eq!(job["state"], "queued");
    let r = ctx
        .call(Method::POST, "/v1/vms/vm-a/stop", Some(&w.a_member), None)
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "busy with its create job");
    assert_eq!(r.code(), "vm_busy");
    let c = ctx
        .call(
            Method::POST,
            &format!("/v1/jobs/{job_id}/cancel"),
            Some(&w.a_member),
            None,
        )
        .await;
    assert_eq!(c.status, StatusCode::ACCEPTED, "{}", c.body);
    // Now a controller starts and finds it.
    let mut cfg = stratus_jobs::RunnerConfig::new("late-controller");
    cfg.poll_interval = std::time::Duration::from_millis(50);
    let runner =
        stratus_jobs::JobRunner::new(ctx.app.ds.clone(), cfg, ctx.app.signals.clone()).start();
    let job = ctx
        .get(
            &format!("/v1/jobs/{job_id}/wait?timeout_secs=10"),
            &w.a_member,
        )
        .await
        .body;
    assert_eq!(job["state"], "cancelled", "{job}");
    assert_eq!(
        ctx.get("/v1/vms/vm-a", &w.a_member).await.status,
        StatusCode::NOT_FOUND,
        "the create was undone"
    );
    let again = ctx
        .call(
            Method::POST,
            &format!("/v1/jobs/{job_id}/cancel"),
            Some(&w.a_member),
            None,
        )
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert_eq!(again.code(), "job_finished");
    runner.shutdown().await;
}

async fn tokens_are_shown_once_and_revocable(b: Backend) {
    let ctx = Ctx::new(b, false).await;
    let w = world(&ctx).await;
    let created = ctx
        .must(
            ctx.post(
                "/v1/tokens",
                &w.a_member,
                json!({"name": "tmp", "role": "member"}),
            )
            .await,
            "tmp",
        )
        .await;
    let secret = created["secret"].as_str().expect("secret").to_string();
    assert!(secret.starts_with("stratus_") && secret.len() >= 40);
    let id = created["token"]["id"].as_str().expect("id").to_string();
    let shown = ctx.get(&format!("/v1/tokens/{id}"), &w.a_member).await.body;
    assert!(
        !shown.to_string().contains(&secret),
        "the secret is never shown again"
    );
    assert_eq!(
        ctx.get("/v1/whoami", &secret).await.body["token"]["name"],
        "tmp"
    );
    // Members cannot mint admin tokens.
    let r = ctx
        .post(
            "/v1/tokens",
            &w.a_member,
            json!({"name": "boss", "role": "admin"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = ctx.delete(&format!("/v1/tokens/{id}"), &w.a_member).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body["revoked_at"].is_string());
    let r = ctx.get("/v1/whoami", &secret).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "revoked at once");
    assert_error_shape(&r);
    let stored = ctx
        .app
        .ds
        .token_list(
            None,
            None,
            true,
            &stratus_datastore::PageRequest::first(100),
        )
        .await
        .expect("list");
    assert!(
        stored
            .items
            .iter()
            .all(|t| !t.token_hash.contains(&secret) && t.token_hash.len() == 64),
        "only hashes stored"
    );
}

fn facts() -> Value {
    json!({"cpus": 4, "memory_bytes": 8u64 << 30, "disk_bytes": 100u64 << 30, "qemu_version": "10.0.2", "accel": "tcg", "driver": "sim"})
}

/// Enrolls a host named `name`; returns its credential.
async fn enroll(ctx: &Ctx, name: &str) -> String {
    let t = ctx
        .must(
            ctx.post("/v1/host-enrollment-tokens", &ctx.admin, json!({}))
                .await,
            "enroll token",
        )
        .await;
    let token = t["token"].as_str().expect("token").to_string();
    let body =
        json!({"enroll_token": token, "name": name, "address": "127.0.0.1", "facts": facts()});
    let r = ctx
        .call(Method::POST, "/v1/agent/enroll", None, Some(body.clone()))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    // One time only.
    let again = ctx
        .call(Method::POST, "/v1/agent/enroll", None, Some(body))
        .await;
    assert_eq!(again.status, StatusCode::UNAUTHORIZED);
    assert_error_shape(&again);
    r.body["credential"]
        .as_str()
        .expect("credential")
        .to_string()
}

async fn agent_endpoints_take_host_credentials_only(b: Backend) {
    let ctx = Ctx::new(b, false).await;
    let cred = enroll(&ctx, "host-1").await;
    assert!(cred.starts_with("stratus-host_"));
    // The host shows up, with its facts.
    let hosts = ctx.get("/v1/hosts", &ctx.admin).await.body;
    assert_eq!(hosts["items"][0]["name"], "host-1");
    assert_eq!(hosts["items"][0]["state"], "up");
    assert_eq!(hosts["items"][0]["cpus"], 4);
    // An API token is no host credential, and a host credential is no API token.
    let r = ctx.get("/v1/agent/desired", &ctx.admin).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_error_shape(&r);
    let r = ctx.get("/v1/vms", &cred).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = ctx.get("/v1/agent/desired", "stratus-host_forged").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // The host's desired state: nothing yet; a long poll with a current
    // revision waits and then answers the same revision.
    let d = ctx.get("/v1/agent/desired", &cred).await;
    assert_eq!(d.status, StatusCode::OK, "{}", d.body);
    let rev = d.body["revision"].as_u64().expect("revision");
    let t0 = std::time::Instant::now();
    let d2 = ctx
        .get(&format!("/v1/agent/desired?since={rev}&wait_secs=1"), &cred)
        .await;
    assert!(
        t0.elapsed() >= std::time::Duration::from_millis(900),
        "long poll waited"
    );
    assert_eq!(d2.body["revision"].as_u64(), Some(rev));
    let r = ctx.get("/v1/agent/desired?wait_secs=1000", &cred).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // A second host cannot take the same name.
    let t = ctx
        .must(
            ctx.post("/v1/host-enrollment-tokens", &ctx.admin, json!({}))
                .await,
            "token",
        )
        .await;
    let r = ctx
        .call(Method::POST, "/v1/agent/enroll", None, Some(json!({"enroll_token": t["token"], "name": "host-1", "address": "x", "facts": facts()})))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
}

async fn agent_reports_are_gated_by_generation(b: Backend) {
    let ctx = Ctx::new(b, true).await;
    let cred = enroll(&ctx, "host-1").await;
    let w = world(&ctx).await;
    // vm-a is placed on host-1 and the job waits for the host.
    let vm_id = w
        .a_ids
        .iter()
        .find(|(k, _)| *k == "vm")
        .expect("vm")
        .1
        .clone();
    let job_id = w
        .a_ids
        .iter()
        .find(|(k, _)| *k == "job")
        .expect("job")
        .1
        .clone();
    let mut desired = Value::Null;
    for _ in 0..100 {
        desired = ctx.get("/v1/agent/desired", &cred).await.body;
        if desired["vms"].as_array().is_some_and(|v| !v.is_empty()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(desired["vms"][0]["vm_id"], vm_id.as_str(), "{desired}");
    assert_eq!(desired["vms"][0]["desired_state"], "running");
    let report = |generation: u64, state: &str| {
        json!({"facts": facts(), "vms": [{"vm_id": vm_id, "generation": generation, "state": state, "reboot_generation": 0,
            "guest": {"connected": true, "os_name": "Stratus test guest", "ip_addresses": ["10.0.2.15"]}}]})
    };
    let r = ctx
        .post("/v1/agent/report", &cred, report(10, "running"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["stale"], 0);
    let job = ctx
        .get(
            &format!("/v1/jobs/{job_id}/wait?timeout_secs=10"),
            &w.a_member,
        )
        .await
        .body;
    assert_eq!(job["state"], "succeeded", "{job}");
    let vm = ctx.get(&format!("/v1/vms/{vm_id}"), &w.a_member).await.body;
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["guest"]["ip_addresses"][0], "10.0.2.15");
    // An older report arriving late changes nothing.
    let r = ctx
        .post("/v1/agent/report", &cred, report(9, "stopped"))
        .await;
    assert_eq!(r.body["stale"], 1);
    assert_eq!(
        ctx.get(&format!("/v1/vms/{vm_id}"), &w.a_member).await.body["state"],
        "running"
    );
    // A newer crash report shows at once, with no job involved.
    let r = ctx
        .post("/v1/agent/report", &cred, report(11, "crashed"))
        .await;
    assert_eq!(r.body["stale"], 0);
    assert_eq!(
        ctx.get(&format!("/v1/vms/{vm_id}"), &w.a_member).await.body["state"],
        "crashed"
    );
    // Start the crashed VM; a crash report made before the host acted on the
    // start (an older intent generation) must not fail the job, one made
    // after must, at once.
    let op = ctx
        .call(
            Method::POST,
            &format!("/v1/vms/{vm_id}/start"),
            Some(&w.a_member),
            None,
        )
        .await;
    assert_eq!(op.status, StatusCode::ACCEPTED, "{}", op.body);
    let start_job = op.body["job"]["id"].as_str().expect("job").to_string();
    let desired = ctx.get("/v1/agent/desired", &cred).await.body;
    let intent = desired["vms"][0]["generation"]
        .as_u64()
        .expect("generation");
    let crash = |generation: u64, intent: u64| {
        json!({"facts": facts(), "vms": [{"vm_id": vm_id, "generation": generation, "state": "crashed",
            "reason": "QEMU exited unexpectedly", "reboot_generation": 0, "intent_generation": intent}]})
    };
    ctx.must(
        ctx.post("/v1/agent/report", &cred, crash(20, intent - 1))
            .await,
        "stale crash",
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let job = ctx
        .get(&format!("/v1/jobs/{start_job}"), &w.a_member)
        .await
        .body;
    assert_eq!(
        job["state"], "running",
        "a crash from before the start does not fail it: {job}"
    );
    ctx.must(
        ctx.post("/v1/agent/report", &cred, crash(21, intent)).await,
        "crash",
    )
    .await;
    let job = ctx
        .get(
            &format!("/v1/jobs/{start_job}/wait?timeout_secs=10"),
            &w.a_member,
        )
        .await
        .body;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "vm_crashed");
    // Another host cannot report on this VM.
    let other = enroll(&ctx, "host-2").await;
    let r = ctx
        .post("/v1/agent/report", &other, report(12, "running"))
        .await;
    assert_eq!(r.body["stale"], 1, "not its VM");
    assert_eq!(
        ctx.get(&format!("/v1/vms/{vm_id}"), &w.a_member).await.body["state"],
        "crashed"
    );
    // Console output: appended, deduplicated by offset, readable by the owner only.
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    for (off, text) in [(0, "hello "), (3, "lo world"), (11, "\n")] {
        let r = ctx
            .call(
                Method::PUT,
                &format!("/v1/agent/vms/{vm_id}/console"),
                Some(&cred),
                Some(json!({"offset": off, "data_base64": b64(text)})),
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    }
    let c = ctx
        .get(&format!("/v1/vms/{vm_id}/console?offset=0"), &w.a_member)
        .await
        .body;
    let text = base64::engine::general_purpose::STANDARD
        .decode(c["data_base64"].as_str().expect("data"))
        .expect("b64");
    assert_eq!(String::from_utf8_lossy(&text), "hello world\n");
    assert_eq!(c["next_offset"], 12);
    assert_eq!(
        ctx.get(&format!("/v1/vms/{vm_id}/console"), &w.b_member)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let r = ctx
        .call(
            Method::PUT,
            &format!("/v1/agent/vms/{vm_id}/console"),
            Some(&other),
            Some(json!({"offset": 0, "data_base64": b64("x")})),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "only the VM's host writes its console"
    );
    ctx.shutdown().await;
}

/// Volumes in a shared pool: the create claims the size against the pool's
/// reported capacity (a full pool is `409 pool_full` naming the pool and
/// its room, recording nothing), a resize claims the growth the same way,
/// a VM on a host that does not see the pool cannot take the volume (`409
/// pool_not_on_host` naming both), the pool cannot be deleted while the
/// volume lives there, and deleting the volume gives its size back.
async fn pool_volumes_claim_room_and_refuse_clearly(b: Backend) {
    use stratus_api_types::agent::PoolReport;
    let ctx = Ctx::new(b, true).await;
    let w = world(&ctx).await;
    let am = &w.a_member;
    let host: stratus_common::HostId = w.host.parse().expect("host id");
    let pool_id: stratus_common::StoragePoolId = w.pool.parse().expect("pool id");
    let report = |error: Option<&str>| PoolReport {
        pool_id,
        error: error.map(str::to_string),
        total_bytes: 100 << 20,
        available_bytes: 90 << 20,
    };
    ctx.app
        .ds
        .host_report_pools(host, &[report(None)])
        .await
        .expect("report");
    let create =
        |name: &str, size: u64, pool: &str| json!({"name": name, "size_bytes": size, "pool": pool});

    let r = ctx
        .post("/v1/volumes", am, create("big", 200 << 20, "shared"))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(r.code(), "pool_full", "{}", r.body);
    let msg = r.body["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("storage pool shared has room for 100MiB"),
        "{msg}"
    );
    assert_error_shape(&r);
    let r = ctx
        .post("/v1/volumes", am, create("typo", 1 << 20, "nope"))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(
        r.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("storage pool \"nope\" not found")),
        "{}",
        r.body
    );
    assert_eq!(pool_view(&ctx, &w.pool).await["allocated_bytes"], 0);

    let v = ctx
        .must(
            ctx.post("/v1/volumes", am, create("data", 60 << 20, "shared"))
                .await,
            "pool volume",
        )
        .await;
    assert_eq!(v["pool"], "shared", "{v}");
    assert_eq!(v["pool_id"], w.pool.as_str(), "{v}");
    assert_eq!(
        pool_view(&ctx, &w.pool).await["allocated_bytes"],
        60u64 << 20
    );
    let local = ctx
        .must(
            ctx.post(
                "/v1/volumes",
                am,
                json!({"name": "local", "size_bytes": 1u64 << 20}),
            )
            .await,
            "local volume",
        )
        .await;
    assert!(local.get("pool").is_none(), "{local}");
    assert_eq!(
        pool_view(&ctx, &w.pool).await["allocated_bytes"],
        60u64 << 20
    );
    let r = ctx
        .post("/v1/volumes", am, create("second", 60 << 20, "shared"))
        .await;
    assert_eq!(r.code(), "pool_full", "{}", r.body);

    // Growth is claimed too; a refused resize changes nothing.
    let vid = v["id"].as_str().expect("id");
    let resize = |size: u64| json!({"size_bytes": size});
    let r = ctx
        .post(&format!("/v1/volumes/{vid}/resize"), am, resize(120 << 20))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(r.code(), "pool_full", "{}", r.body);
    let r = ctx.get(&format!("/v1/volumes/{vid}"), am).await;
    assert_eq!(r.body["size_bytes"], 60u64 << 20);
    assert_eq!(
        pool_view(&ctx, &w.pool).await["allocated_bytes"],
        60u64 << 20
    );
    ctx.must(
        ctx.post(&format!("/v1/volumes/{vid}/resize"), am, resize(80 << 20))
            .await,
        "resize",
    )
    .await;
    assert_eq!(
        pool_view(&ctx, &w.pool).await["allocated_bytes"],
        80u64 << 20
    );

    // The VM's host stops seeing the pool: the volume cannot go there.
    ctx.app
        .ds
        .host_report_pools(host, &[report(Some("not mounted"))])
        .await
        .expect("report");
    let r = ctx
        .post(
            &format!("/v1/volumes/{vid}/attach"),
            am,
            json!({"vm": "vm-a"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(r.code(), "pool_not_on_host", "{}", r.body);
    let msg = r.body["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("\"host-w\"") && msg.contains("\"shared\""),
        "{msg}"
    );
    assert_eq!(
        ctx.get(&format!("/v1/volumes/{vid}"), am).await.body["status"],
        "available"
    );

    let r = ctx
        .delete(&format!("/v1/storage-pools/{}", w.pool), &ctx.admin)
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(r.code(), "pool_in_use", "{}", r.body);
    assert!(
        r.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("1 volume(s)")),
        "{}",
        r.body
    );

    // Never attached, so no file anywhere: the record goes, the room comes back.
    let r = ctx.delete(&format!("/v1/volumes/{vid}"), am).await;
    assert!(r.status.is_success(), "{}", r.body);
    assert_eq!(pool_view(&ctx, &w.pool).await["allocated_bytes"], 0);
    let r = ctx
        .delete(&format!("/v1/storage-pools/{}", w.pool), &ctx.admin)
        .await;
    assert!(r.status.is_success(), "{}", r.body);
    ctx.shutdown().await;
}

async fn pool_view(ctx: &Ctx, pool: &str) -> Value {
    ctx.get(&format!("/v1/storage-pools/{pool}"), &ctx.admin)
        .await
        .body
}
