//! `/v1/vms`: every change answers `202 Accepted` with the VM and the job
//! carrying the change out.

use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use stratus_api_types::agent::ExecResult;
use stratus_api_types::params::{
    ConsoleQuery, PageParams, ProjectScope, VmBatchCreate, VmCreate, VmExec, VmFilter, VmUpdate,
};
use stratus_api_types::views::{PlacementPreview, Vm, VmBatch, VmConsole, VmOperation, VmPage};

use super::AppState;
use crate::app::vms::{self, VmAction};
use crate::app::Actor;
use crate::http::error::ApiError;
use crate::http::extract::{idempotency_key, ApiJson, ApiQuery};

/// Create a VM. The scheduler chooses its host and claims room there in the
/// same transaction that records the VM and its job; the job then has the
/// host build and boot it. When no host can take the VM, the answer is
/// `409 no_host_available` with the scheduler's explanation in `details`
/// (which filters ruled out how many hosts, and the closest near-misses).
///
/// Send an `Idempotency-Key` header (1-200 ASCII characters) to make retries
/// safe: a retry with the same key returns the first request's VM and job.
/// (It is described here rather than as a parameter because the generated
/// Rust client cannot yet express optional headers.)
#[utoipa::path(post, path = "/v1/vms", tag = "vms", operation_id = "vm_create",
    request_body = VmCreate,
    responses((status = 202, body = VmOperation, description = "accepted"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn vm_create(
    s: AppState,
    actor: Actor,
    headers: HeaderMap,
    ApiJson(p): ApiJson<VmCreate>,
) -> Result<(StatusCode, Json<VmOperation>), ApiError> {
    let key = idempotency_key(&headers)?;
    let (_, op) = vms::vm_create(&s.0, &actor, p, key).await?;
    Ok((StatusCode::ACCEPTED, Json(op)))
}

/// Create several VMs of one shape (`NAME-1` … `NAME-COUNT`), placed in one
/// scheduling pass: all of them or none (`409 no_host_available`).
#[utoipa::path(post, path = "/v1/vm-batches", tag = "vms", operation_id = "vm_batch_create",
    request_body = VmBatchCreate,
    responses((status = 202, body = VmBatch, description = "accepted"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn vm_batch_create(
    s: AppState,
    actor: Actor,
    ApiJson(p): ApiJson<VmBatchCreate>,
) -> Result<(StatusCode, Json<VmBatch>), ApiError> {
    let b = vms::vm_batch_create(&s.0, &actor, p).await?;
    Ok((StatusCode::ACCEPTED, Json(b)))
}

/// Where would these VMs go, and why not elsewhere? A dry run of a create
/// (or batch create): nothing is created or reserved.
#[utoipa::path(post, path = "/v1/vm-placements", tag = "vms", operation_id = "vm_placement_preview",
    request_body = VmBatchCreate,
    responses((status = 200, body = PlacementPreview, description = "the scheduler's answer"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn vm_placement_preview(
    s: AppState,
    actor: Actor,
    ApiJson(p): ApiJson<VmBatchCreate>,
) -> Result<Json<PlacementPreview>, ApiError> {
    Ok(Json(vms::vm_placement_preview(&s.0, &actor, p).await?))
}

/// List VMs.
#[utoipa::path(get, path = "/v1/vms", tag = "vms", operation_id = "vm_list",
    params(VmFilter, PageParams),
    responses((status = 200, body = VmPage, description = "a page of VMs"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn vm_list(
    s: AppState,
    actor: Actor,
    ApiQuery(f): ApiQuery<VmFilter>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<Json<VmPage>, ApiError> {
    Ok(Json(vms::vm_list(&s.0, &actor, f, page).await?))
}

/// Show a VM.
#[utoipa::path(get, path = "/v1/vms/{vm}", tag = "vms", operation_id = "vm_view",
    params(("vm" = String, Path, description = "VM name or id"), ProjectScope),
    responses((status = 200, body = Vm, description = "the VM"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn vm_view(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
) -> Result<Json<Vm>, ApiError> {
    Ok(Json(
        vms::vm_view(&s.0, &actor, &key, scope.project.as_deref()).await?,
    ))
}

/// Change a VM's settings (its restart policy).
///
/// These need nothing of the VM's host: the answer is the VM as changed, at
/// once, with no job.
#[utoipa::path(patch, path = "/v1/vms/{vm}", tag = "vms", operation_id = "vm_update",
    params(("vm" = String, Path, description = "VM name or id"), ProjectScope),
    request_body = VmUpdate,
    responses((status = 200, body = Vm, description = "the VM as changed"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn vm_update(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
    ApiJson(p): ApiJson<VmUpdate>,
) -> Result<Json<Vm>, ApiError> {
    Ok(Json(
        vms::vm_update(&s.0, &actor, &key, scope.project.as_deref(), p).await?,
    ))
}

async fn action(
    s: AppState,
    actor: Actor,
    key: String,
    scope: ProjectScope,
    headers: HeaderMap,
    a: VmAction,
) -> Result<(StatusCode, Json<VmOperation>), ApiError> {
    let idem = idempotency_key(&headers)?;
    let op = vms::vm_action(&s.0, &actor, &key, scope.project.as_deref(), a, idem).await?;
    Ok((StatusCode::ACCEPTED, Json(op)))
}

/// Delete a VM (and, on its host, its disks and process).
///
/// Honours an `Idempotency-Key` header like `POST /v1/vms`: a retry with the
/// same key returns the first request's job.
#[utoipa::path(delete, path = "/v1/vms/{vm}", tag = "vms", operation_id = "vm_delete",
    params(("vm" = String, Path, description = "VM name or id"), ProjectScope),
    responses((status = 202, body = VmOperation, description = "accepted"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn vm_delete(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<VmOperation>), ApiError> {
    action(s, actor, key, scope, headers, VmAction::Delete).await
}

/// Start a stopped VM.
///
/// Honours an `Idempotency-Key` header like `POST /v1/vms`: a retry with the
/// same key returns the first request's job.
#[utoipa::path(post, path = "/v1/vms/{vm}/start", tag = "vms", operation_id = "vm_start",
    params(("vm" = String, Path, description = "VM name or id"), ProjectScope),
    responses((status = 202, body = VmOperation, description = "accepted"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn vm_start(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<VmOperation>), ApiError> {
    action(s, actor, key, scope, headers, VmAction::Start).await
}

/// Stop a running VM (ACPI power-down, then a hard stop after a timeout).
///
/// Honours an `Idempotency-Key` header like `POST /v1/vms`: a retry with the
/// same key returns the first request's job.
#[utoipa::path(post, path = "/v1/vms/{vm}/stop", tag = "vms", operation_id = "vm_stop",
    params(("vm" = String, Path, description = "VM name or id"), ProjectScope),
    responses((status = 202, body = VmOperation, description = "accepted"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn vm_stop(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<VmOperation>), ApiError> {
    action(s, actor, key, scope, headers, VmAction::Stop).await
}

/// Reboot a running VM.
///
/// Honours an `Idempotency-Key` header like `POST /v1/vms`: a retry with the
/// same key returns the first request's job.
#[utoipa::path(post, path = "/v1/vms/{vm}/reboot", tag = "vms", operation_id = "vm_reboot",
    params(("vm" = String, Path, description = "VM name or id"), ProjectScope),
    responses((status = 202, body = VmOperation, description = "accepted"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn vm_reboot(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<VmOperation>), ApiError> {
    action(s, actor, key, scope, headers, VmAction::Reboot).await
}

/// Read a VM's serial console.
#[utoipa::path(get, path = "/v1/vms/{vm}/console", tag = "vms", operation_id = "vm_console",
    params(("vm" = String, Path, description = "VM name or id"), ConsoleQuery),
    responses((status = 200, body = VmConsole, description = "console output"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn vm_console(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(q): ApiQuery<ConsoleQuery>,
) -> Result<Json<VmConsole>, ApiError> {
    Ok(Json(vms::vm_console(&s.0, &actor, &key, q).await?))
}

/// Run a command in a running VM through its guest agent; answers with the
/// exit code and output once it ends.
#[utoipa::path(post, path = "/v1/vms/{vm}/exec", tag = "vms", operation_id = "vm_exec",
    params(("vm" = String, Path, description = "VM name or id"), ProjectScope),
    request_body = VmExec,
    responses((status = 200, body = ExecResult, description = "the command ended"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn vm_exec(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
    ApiJson(p): ApiJson<VmExec>,
) -> Result<Json<ExecResult>, ApiError> {
    Ok(Json(
        vms::vm_exec(&s.0, &actor, &key, scope.project.as_deref(), p).await?,
    ))
}
