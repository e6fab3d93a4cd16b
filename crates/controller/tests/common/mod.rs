//! A whole controller in process for tests: a real store (SQLite or
//! PostgreSQL), the real router (no socket: requests go through
//! `tower::ServiceExt::oneshot`), and optionally the real job runner.

#![allow(dead_code)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use stratus_controller::app::image_store::ImageStore;
use stratus_controller::App;
use stratus_datastore::Datastore;
use stratus_jobs::{JobRunner, RunnerConfig, RunnerHandle};
use tower::ServiceExt;

#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct Ctx {
    pub app: Arc<App>,
    pub router: axum::Router,
    pub admin: String,
    pub dir: tempfile::TempDir,
    pub runner: Option<RunnerHandle>,
}

pub struct Resp {
    pub status: StatusCode,
    pub body: Value,
    pub request_id: Option<String>,
}

impl Resp {
    /// The `error_code` of an error body.
    pub fn code(&self) -> &str {
        self.body["error_code"].as_str().unwrap_or("")
    }
}

impl Ctx {
    /// A controller on a fresh database. With `run_jobs`, the job runner
    /// runs; without it, jobs stay queued (to test what happens before).
    pub async fn new(backend: Backend, run_jobs: bool) -> Ctx {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = match backend {
            Backend::Sqlite => stratus_test_utils::sqlite_url(dir.path()),
            Backend::Postgres => stratus_test_utils::postgres_url().await,
        };
        let ds = Datastore::open(&url).await.expect("open store");
        let images = ImageStore::open(&dir.path().join("images")).expect("image store");
        let signals = Arc::new(stratus_jobs::Signals::default());
        let (waker, runner) = if run_jobs {
            let mut cfg = RunnerConfig::new("test-controller");
            cfg.poll_interval = std::time::Duration::from_millis(50);
            let r = JobRunner::new(ds.clone(), cfg, signals.clone()).start();
            (r.waker(), Some(r))
        } else {
            (Arc::new(tokio::sync::Notify::new()), None)
        };
        let scheduler = stratus_scheduler::Scheduler::load(ds.clone())
            .await
            .expect("scheduler");
        let app = Arc::new(App::new(ds, images, waker, signals, scheduler));
        let admin = stratus_controller::app::tokens::bootstrap_admin(&app)
            .await
            .expect("bootstrap")
            .expect("first admin token");
        let router = stratus_controller::http::router(app.clone());
        Ctx {
            app,
            router,
            admin,
            dir,
            runner,
        }
    }

    pub async fn raw(&self, req: Request<Body>) -> Resp {
        let resp = self
            .router
            .clone()
            .oneshot(req)
            .await
            .expect("router answers");
        let status = resp.status();
        let request_id = resp
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Resp {
            status,
            body,
            request_id,
        }
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let req = match body {
            Some(v) => b
                .header("content-type", "application/json")
                .body(Body::from(v.to_string()))
                .expect("request"),
            None => b.body(Body::empty()).expect("request"),
        };
        self.raw(req).await
    }

    pub async fn get(&self, path: &str, token: &str) -> Resp {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Resp {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    pub async fn delete(&self, path: &str, token: &str) -> Resp {
        self.call(Method::DELETE, path, Some(token), None).await
    }

    pub async fn put_bytes(&self, path: &str, token: &str, data: Vec<u8>) -> Resp {
        let req = Request::builder()
            .method(Method::PUT)
            .uri(path)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/octet-stream")
            .body(Body::from(data))
            .expect("request");
        self.raw(req).await
    }

    /// Creates something and returns its body, failing the test otherwise.
    pub async fn must(&self, r: Resp, what: &str) -> Value {
        assert!(r.status.is_success(), "{what}: {} {}", r.status, r.body);
        r.body
    }

    /// A small real qcow2 file made with qemu-img.
    pub fn qcow2(&self, name: &str, size: &str) -> std::path::PathBuf {
        let p = self.dir.path().join(name);
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&p)
            .arg(size)
            .status()
            .expect("qemu-img runs (run scripts/setup-host.sh)");
        assert!(st.success());
        p
    }

    pub async fn shutdown(mut self) {
        if let Some(r) = self.runner.take() {
            r.shutdown().await;
        }
    }
}

/// Every error body has the documented shape.
pub fn assert_error_shape(r: &Resp) {
    assert!(
        r.status.is_client_error() || r.status.is_server_error(),
        "{}",
        r.status
    );
    let b = &r.body;
    assert!(
        b["error_code"].as_str().is_some_and(|s| !s.is_empty()),
        "error_code in {b}"
    );
    assert!(
        b["message"].as_str().is_some_and(|s| !s.is_empty()),
        "message in {b}"
    );
    let rid = b["request_id"].as_str().expect("request_id");
    assert_eq!(
        Some(rid),
        r.request_id.as_deref(),
        "body and header request ids agree"
    );
}
