//! `/v1/backup-targets` and `/v1/backups`, plus `POST /v1/vms/{vm}/backups`:
//! taking a backup and restoring one answer `202 Accepted` with the job
//! carrying it out.

use axum::extract::Path;
use axum::http::StatusCode;
use axum::Json;
use stratus_api_types::params::{
    BackupCreate, BackupFilter, BackupPolicySet, BackupRestore, BackupTargetCreate, PageParams,
    ProjectScope,
};
use stratus_api_types::views::{
    Backup, BackupOperation, BackupPage, BackupPolicy, BackupTarget, BackupVerification,
    VmOperation,
};

use super::AppState;
use crate::app::{backups, Actor};
use crate::http::error::ApiError;
use crate::http::extract::{ApiJson, ApiQuery};

/// Create a backup target (administrators): a directory every host sees at
/// the same path.
#[utoipa::path(post, path = "/v1/backup-targets", tag = "backups", operation_id = "backup_target_create",
    request_body = BackupTargetCreate,
    responses((status = 201, body = BackupTarget, description = "created"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn backup_target_create(
    s: AppState,
    actor: Actor,
    ApiJson(p): ApiJson<BackupTargetCreate>,
) -> Result<(StatusCode, Json<BackupTarget>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(backups::backup_target_create(&s.0, &actor, p).await?),
    ))
}

/// List backup targets.
#[utoipa::path(get, path = "/v1/backup-targets", tag = "backups", operation_id = "backup_target_list",
    responses((status = 200, body = Vec<BackupTarget>, description = "every backup target"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn backup_target_list(
    s: AppState,
    _actor: Actor,
) -> Result<Json<Vec<BackupTarget>>, ApiError> {
    Ok(Json(backups::backup_target_list(&s.0).await?))
}

/// Delete a backup target that holds no backups (administrators).
#[utoipa::path(delete, path = "/v1/backup-targets/{target}", tag = "backups", operation_id = "backup_target_delete",
    params(("target" = String, Path, description = "backup target name or id")),
    responses((status = 204, description = "deleted"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn backup_target_delete(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    backups::backup_target_delete(&s.0, &actor, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Back up a running VM's disk: incremental to its last restore point on the
/// same target (only the clusters written since, tracked by a persistent
/// dirty bitmap that survives VM restarts), or full when `full` is set, when
/// there is no restore point yet, or when change tracking was lost (the
/// backup's `fallback_reason` then says why).
#[utoipa::path(post, path = "/v1/vms/{vm}/backups", tag = "backups", operation_id = "backup_create",
    params(("vm" = String, Path, description = "VM name or id"), ProjectScope),
    request_body = BackupCreate,
    responses((status = 202, body = BackupOperation, description = "accepted"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn backup_create(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
    ApiJson(p): ApiJson<BackupCreate>,
) -> Result<(StatusCode, Json<BackupOperation>), ApiError> {
    Ok((
        StatusCode::ACCEPTED,
        Json(backups::backup_create(&s.0, &actor, &key, scope.project.as_deref(), p).await?),
    ))
}

/// List backups, oldest first.
#[utoipa::path(get, path = "/v1/backups", tag = "backups", operation_id = "backup_list",
    params(BackupFilter, PageParams),
    responses((status = 200, body = BackupPage, description = "a page of backups"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn backup_list(
    s: AppState,
    actor: Actor,
    ApiQuery(f): ApiQuery<BackupFilter>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<Json<BackupPage>, ApiError> {
    Ok(Json(backups::backup_list(&s.0, &actor, f, page).await?))
}

/// Show a backup.
#[utoipa::path(get, path = "/v1/backups/{backup}", tag = "backups", operation_id = "backup_view",
    params(("backup" = String, Path, description = "backup id")),
    responses((status = 200, body = Backup, description = "the backup"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn backup_view(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
) -> Result<Json<Backup>, ApiError> {
    Ok(Json(backups::backup_view(&s.0, &actor, &key).await?))
}

/// Read a backup back on a host: its SHA-256 against the one recorded, and
/// `qemu-img check` over it and its chain. The result is recorded on the
/// backup.
#[utoipa::path(post, path = "/v1/backups/{backup}/verify", tag = "backups", operation_id = "backup_verify",
    params(("backup" = String, Path, description = "backup id")),
    responses((status = 200, body = BackupVerification, description = "what reading it back found"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn backup_verify(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
) -> Result<Json<BackupVerification>, ApiError> {
    Ok(Json(backups::backup_verify(&s.0, &actor, &key).await?))
}

/// Restore a backup into a new VM (`as_vm`: same image, flavor and size,
/// placed by the scheduler) or over the stopped VM it was taken of
/// (`in_place`).
#[utoipa::path(post, path = "/v1/backups/{backup}/restore", tag = "backups", operation_id = "backup_restore",
    params(("backup" = String, Path, description = "backup id")),
    request_body = BackupRestore,
    responses((status = 202, body = VmOperation, description = "accepted"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn backup_restore(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiJson(p): ApiJson<BackupRestore>,
) -> Result<(StatusCode, Json<VmOperation>), ApiError> {
    Ok((
        StatusCode::ACCEPTED,
        Json(backups::backup_restore(&s.0, &actor, &key, p).await?),
    ))
}

/// Delete a backup. A restore point is first merged into the restore point
/// built on it (on a host), so every restore point left reads as before;
/// the newest one's deletion makes the VM's next backup a full one.
#[utoipa::path(delete, path = "/v1/backups/{backup}", tag = "backups", operation_id = "backup_delete",
    params(("backup" = String, Path, description = "backup id")),
    responses((status = 204, description = "deleted"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn backup_delete(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    backups::backup_delete(&s.0, &actor, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Set a VM's backup policy: a schedule and retention (keep the newest N,
/// the newest of each of the last N days and weeks). Restore points the
/// policy does not keep are deleted by the controller, merged into the ones
/// built on them.
#[utoipa::path(put, path = "/v1/vms/{vm}/backup-policy", tag = "backups", operation_id = "backup_policy_set",
    params(("vm" = String, Path, description = "VM name or id"), ProjectScope),
    request_body = BackupPolicySet,
    responses((status = 200, body = BackupPolicy, description = "the policy"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn backup_policy_set(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
    ApiJson(p): ApiJson<BackupPolicySet>,
) -> Result<Json<BackupPolicy>, ApiError> {
    Ok(Json(
        backups::backup_policy_set(&s.0, &actor, &key, scope.project.as_deref(), p).await?,
    ))
}

/// Show a VM's backup policy.
#[utoipa::path(get, path = "/v1/vms/{vm}/backup-policy", tag = "backups", operation_id = "backup_policy_view",
    params(("vm" = String, Path, description = "VM name or id"), ProjectScope),
    responses((status = 200, body = BackupPolicy, description = "the policy"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn backup_policy_view(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
) -> Result<Json<BackupPolicy>, ApiError> {
    Ok(Json(
        backups::backup_policy_view(&s.0, &actor, &key, scope.project.as_deref()).await?,
    ))
}

/// Remove a VM's backup policy (its backups stay).
#[utoipa::path(delete, path = "/v1/vms/{vm}/backup-policy", tag = "backups", operation_id = "backup_policy_delete",
    params(("vm" = String, Path, description = "VM name or id"), ProjectScope),
    responses((status = 204, description = "removed"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn backup_policy_delete(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
) -> Result<StatusCode, ApiError> {
    backups::backup_policy_delete(&s.0, &actor, &key, scope.project.as_deref()).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// List backup policies.
#[utoipa::path(get, path = "/v1/backup-policies", tag = "backups", operation_id = "backup_policy_list",
    params(ProjectScope),
    responses((status = 200, body = Vec<BackupPolicy>, description = "the policies"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn backup_policy_list(
    s: AppState,
    actor: Actor,
    ApiQuery(scope): ApiQuery<ProjectScope>,
) -> Result<Json<Vec<BackupPolicy>>, ApiError> {
    Ok(Json(
        backups::backup_policy_list(&s.0, &actor, scope.project.as_deref()).await?,
    ))
}
