//! The HTTP surface: routes, extractors, the error mapping and the OpenAPI
//! document.
//!
//! **Boundary**: handlers are thin. They extract (authentication, JSON,
//! query), call one `app` function and wrap the answer. No SQL, no policy.

pub mod error;
pub mod extract;
pub mod handlers;
pub mod openapi;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post, put};
use axum::Router;

use crate::app::App;

/// Largest JSON body accepted (image data goes through the upload route,
/// which streams and has its own limit).
const JSON_BODY_LIMIT: usize = 1 << 20;

/// Nothing is acknowledged before it is on stable storage: a request that
/// may have changed something (any method but GET and HEAD) is answered
/// only after the store's next durable point (see `Datastore::durable`).
/// Doing it here, once, covers every handler, and lets the store share one
/// disk flush among every change waiting at that moment.
async fn durable_changes(
    axum::extract::State(app): axum::extract::State<Arc<App>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let reads_only = matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    let resp = next.run(req).await;
    if reads_only {
        return resp;
    }
    match app.ds.durable().await {
        Ok(()) => resp,
        Err(e) => {
            use axum::response::IntoResponse;
            error::ApiError(e).into_response()
        }
    }
}

/// Builds the router with every route, the request-id and error layer, and
/// panic containment.
pub fn router(app: Arc<App>) -> Router {
    use handlers::*;
    let v1 = Router::new()
        .route("/openapi.json", get(system::openapi_document))
        .route("/whoami", get(tokens::whoami))
        .route(
            "/projects",
            get(projects::project_list).post(projects::project_create),
        )
        .route(
            "/projects/{project}",
            get(projects::project_view).delete(projects::project_delete),
        )
        .route(
            "/tokens",
            get(tokens::token_list).post(tokens::token_create),
        )
        .route(
            "/tokens/{token}",
            get(tokens::token_view).delete(tokens::token_revoke),
        )
        .route("/hosts", get(hosts::host_list))
        .route(
            "/hosts/{host}",
            get(hosts::host_view).patch(scheduling::host_update),
        )
        .route("/clusters", get(scheduling::cluster_list))
        .route(
            "/clusters/{cluster}",
            get(scheduling::cluster_view).patch(scheduling::cluster_update),
        )
        .route(
            "/server-groups",
            get(scheduling::server_group_list).post(scheduling::server_group_create),
        )
        .route(
            "/server-groups/{group}",
            get(scheduling::server_group_view).delete(scheduling::server_group_delete),
        )
        .route(
            "/host-enrollment-tokens",
            post(hosts::enrollment_token_create),
        )
        .route(
            "/flavors",
            get(flavors::flavor_list).post(flavors::flavor_create),
        )
        .route(
            "/flavors/{flavor}",
            get(flavors::flavor_view).delete(flavors::flavor_delete),
        )
        .route(
            "/images",
            get(images::image_list).post(images::image_create),
        )
        .route(
            "/images/{image}",
            get(images::image_view).delete(images::image_delete),
        )
        .route(
            "/images/{image}/data",
            put(images::image_upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/vms", get(vms::vm_list).post(vms::vm_create))
        .route("/vm-batches", post(vms::vm_batch_create))
        .route("/vm-placements", post(vms::vm_placement_preview))
        .route(
            "/vms/{vm}",
            get(vms::vm_view)
                .delete(vms::vm_delete)
                .patch(vms::vm_update),
        )
        .route("/vms/{vm}/start", post(vms::vm_start))
        .route("/vms/{vm}/stop", post(vms::vm_stop))
        .route("/vms/{vm}/reboot", post(vms::vm_reboot))
        .route("/vms/{vm}/console", get(vms::vm_console))
        .route("/vms/{vm}/exec", post(vms::vm_exec))
        .route("/vms/{vm}/backups", post(backups::backup_create))
        .route("/vms/{vm}/migrate", post(migrate::vm_migrate))
        .route("/hosts/{host}/maintenance", post(migrate::host_maintenance))
        .route(
            "/storage-pools",
            get(pools::pool_list).post(pools::pool_create),
        )
        .route(
            "/storage-pools/{pool}",
            get(pools::pool_view).delete(pools::pool_delete),
        )
        .route(
            "/backup-targets",
            get(backups::backup_target_list).post(backups::backup_target_create),
        )
        .route(
            "/backup-targets/{target}",
            delete(backups::backup_target_delete),
        )
        .route("/backups", get(backups::backup_list))
        .route(
            "/backups/{backup}",
            get(backups::backup_view).delete(backups::backup_delete),
        )
        .route(
            "/vms/{vm}/backup-policy",
            get(backups::backup_policy_view)
                .put(backups::backup_policy_set)
                .delete(backups::backup_policy_delete),
        )
        .route("/backup-policies", get(backups::backup_policy_list))
        .route(
            "/volumes",
            get(volumes::volume_list).post(volumes::volume_create),
        )
        .route(
            "/volumes/{volume}",
            get(volumes::volume_view).delete(volumes::volume_delete),
        )
        .route("/volumes/{volume}/attach", post(volumes::volume_attach))
        .route("/volumes/{volume}/detach", post(volumes::volume_detach))
        .route("/volumes/{volume}/resize", post(volumes::volume_resize))
        .route(
            "/vms/{vm}/snapshots",
            get(snapshots::snapshot_list).post(snapshots::snapshot_create),
        )
        .route(
            "/vms/{vm}/snapshots/{snapshot}",
            delete(snapshots::snapshot_delete),
        )
        .route(
            "/vms/{vm}/snapshot-policy",
            get(snapshots::snapshot_policy_view)
                .put(snapshots::snapshot_policy_set)
                .delete(snapshots::snapshot_policy_delete),
        )
        .route(
            "/vms/{vm}/snapshot-policy/run",
            post(snapshots::snapshot_policy_run),
        )
        .route("/snapshot-policies", get(snapshots::snapshot_policy_list))
        .route(
            "/vms/{vm}/snapshots/{snapshot}/revert",
            post(snapshots::snapshot_revert),
        )
        .route("/backups/{backup}/verify", post(backups::backup_verify))
        .route("/backups/{backup}/restore", post(backups::backup_restore))
        .route("/agent/enroll", post(agent::agent_enroll))
        .route("/agent/report", post(agent::agent_report))
        .route("/agent/desired", get(agent::agent_desired))
        .route(
            "/agent/requests/{request}/result",
            post(agent::agent_request_result),
        )
        .route(
            "/agent/requests/{request}/progress",
            post(agent::agent_request_progress),
        )
        .route("/agent/vms/{vm}/console", put(agent::agent_console_append))
        .route(
            "/agent/images/{image}/{part}",
            get(agent::agent_image_download),
        )
        .route("/jobs", get(jobs::job_list))
        .route("/jobs/{job}", get(jobs::job_view))
        .route("/jobs/{job}/wait", get(jobs::job_wait))
        .route("/jobs/{job}/cancel", post(jobs::job_cancel));
    Router::new()
        .route("/healthz", get(system::healthz))
        .nest("/v1", v1)
        .fallback(system::not_found)
        .method_not_allowed_fallback(system::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            durable_changes,
        ))
        .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            error::panic_response,
        ))
        .layer(axum::middleware::from_fn(error::request_context))
        .with_state(app)
}
