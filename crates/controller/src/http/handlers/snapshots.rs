//! `/v1/vms/{vm}/snapshots`: disk snapshots of a VM. Taking, reverting and
//! deleting answer `202 Accepted` with the job carrying it out.

use axum::extract::Path;
use axum::http::StatusCode;
use axum::Json;
use stratus_api_types::params::{ProjectScope, SnapshotCreate, SnapshotPolicySet};
use stratus_api_types::views::{Snapshot, SnapshotOperation, SnapshotPolicy, VmOperation};

use super::AppState;
use crate::app::{snapshot_policies, snapshots, Actor};
use crate::http::error::ApiError;
use crate::http::extract::{ApiJson, ApiQuery};

/// Snapshot a VM's disk: live when it runs (the guest's file systems are
/// frozen for the moment when its guest agent answers; `quiesced` says
/// whether they were), or stopped. At most 16 per VM.
#[utoipa::path(post, path = "/v1/vms/{vm}/snapshots", tag = "snapshots", operation_id = "snapshot_create",
    params(("vm" = String, Path, description = "VM name or id"), ProjectScope),
    request_body = SnapshotCreate,
    responses((status = 202, body = SnapshotOperation, description = "accepted"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn snapshot_create(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
    ApiJson(p): ApiJson<SnapshotCreate>,
) -> Result<(StatusCode, Json<SnapshotOperation>), ApiError> {
    Ok((
        StatusCode::ACCEPTED,
        Json(snapshots::snapshot_create(&s.0, &actor, &key, scope.project.as_deref(), p).await?),
    ))
}

/// A VM's snapshots, oldest first.
#[utoipa::path(get, path = "/v1/vms/{vm}/snapshots", tag = "snapshots", operation_id = "snapshot_list",
    params(("vm" = String, Path, description = "VM name or id"), ProjectScope),
    responses((status = 200, body = Vec<Snapshot>, description = "the snapshots"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn snapshot_list(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
) -> Result<Json<Vec<Snapshot>>, ApiError> {
    Ok(Json(
        snapshots::snapshot_list(&s.0, &actor, &key, scope.project.as_deref()).await?,
    ))
}

/// Delete a snapshot: its layer is merged into the next one (live when the
/// VM runs), so every other snapshot keeps its content.
#[utoipa::path(delete, path = "/v1/vms/{vm}/snapshots/{snapshot}", tag = "snapshots", operation_id = "snapshot_delete",
    params(("vm" = String, Path, description = "VM name or id"),
           ("snapshot" = String, Path, description = "snapshot name or id"), ProjectScope),
    responses((status = 202, body = SnapshotOperation, description = "accepted"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn snapshot_delete(
    s: AppState,
    actor: Actor,
    Path((key, snapshot)): Path<(String, String)>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
) -> Result<(StatusCode, Json<SnapshotOperation>), ApiError> {
    Ok((
        StatusCode::ACCEPTED,
        Json(
            snapshots::snapshot_delete(&s.0, &actor, &key, &snapshot, scope.project.as_deref())
                .await?,
        ),
    ))
}

/// Revert a stopped VM's disk to a snapshot. Snapshots taken after it are
/// dropped; the VM's next backup is a full one.
#[utoipa::path(post, path = "/v1/vms/{vm}/snapshots/{snapshot}/revert", tag = "snapshots", operation_id = "snapshot_revert",
    params(("vm" = String, Path, description = "VM name or id"),
           ("snapshot" = String, Path, description = "snapshot name or id"), ProjectScope),
    responses((status = 202, body = VmOperation, description = "accepted"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn snapshot_revert(
    s: AppState,
    actor: Actor,
    Path((key, snapshot)): Path<(String, String)>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
) -> Result<(StatusCode, Json<VmOperation>), ApiError> {
    Ok((
        StatusCode::ACCEPTED,
        Json(
            snapshots::snapshot_revert(&s.0, &actor, &key, &snapshot, scope.project.as_deref())
                .await?,
        ),
    ))
}

/// Set a VM's snapshot policy: a snapshot at most every `every_secs`, and
/// the policy's own snapshots kept to the newest `keep` (older ones are
/// deleted, their layers merged, by the controller). An operator's
/// snapshots are never deleted by it.
#[utoipa::path(put, path = "/v1/vms/{vm}/snapshot-policy", tag = "snapshots", operation_id = "snapshot_policy_set",
    params(("vm" = String, Path, description = "VM name or id"), ProjectScope),
    request_body = SnapshotPolicySet,
    responses((status = 200, body = SnapshotPolicy, description = "the policy"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn snapshot_policy_set(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
    ApiJson(p): ApiJson<SnapshotPolicySet>,
) -> Result<Json<SnapshotPolicy>, ApiError> {
    Ok(Json(
        snapshot_policies::snapshot_policy_set(&s.0, &actor, &key, scope.project.as_deref(), p)
            .await?,
    ))
}

/// Show a VM's snapshot policy.
#[utoipa::path(get, path = "/v1/vms/{vm}/snapshot-policy", tag = "snapshots", operation_id = "snapshot_policy_view",
    params(("vm" = String, Path, description = "VM name or id"), ProjectScope),
    responses((status = 200, body = SnapshotPolicy, description = "the policy"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn snapshot_policy_view(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
) -> Result<Json<SnapshotPolicy>, ApiError> {
    Ok(Json(
        snapshot_policies::snapshot_policy_view(&s.0, &actor, &key, scope.project.as_deref())
            .await?,
    ))
}

/// Remove a VM's snapshot policy (its snapshots stay, as ordinary ones
/// nobody deletes automatically).
#[utoipa::path(delete, path = "/v1/vms/{vm}/snapshot-policy", tag = "snapshots", operation_id = "snapshot_policy_delete",
    params(("vm" = String, Path, description = "VM name or id"), ProjectScope),
    responses((status = 204, description = "removed"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn snapshot_policy_delete(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
) -> Result<StatusCode, ApiError> {
    snapshot_policies::snapshot_policy_delete(&s.0, &actor, &key, scope.project.as_deref()).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Take the policy's snapshot now, whatever its schedule; its rotation
/// then keeps the newest `keep` as usual.
#[utoipa::path(post, path = "/v1/vms/{vm}/snapshot-policy/run", tag = "snapshots", operation_id = "snapshot_policy_run",
    params(("vm" = String, Path, description = "VM name or id"), ProjectScope),
    responses((status = 202, body = SnapshotOperation, description = "accepted"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn snapshot_policy_run(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
) -> Result<(StatusCode, Json<SnapshotOperation>), ApiError> {
    Ok((
        StatusCode::ACCEPTED,
        Json(
            snapshot_policies::snapshot_policy_run(&s.0, &actor, &key, scope.project.as_deref())
                .await?,
        ),
    ))
}

/// List snapshot policies.
#[utoipa::path(get, path = "/v1/snapshot-policies", tag = "snapshots", operation_id = "snapshot_policy_list",
    params(ProjectScope),
    responses((status = 200, body = Vec<SnapshotPolicy>, description = "the policies"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn snapshot_policy_list(
    s: AppState,
    actor: Actor,
    ApiQuery(scope): ApiQuery<ProjectScope>,
) -> Result<Json<Vec<SnapshotPolicy>>, ApiError> {
    Ok(Json(
        snapshot_policies::snapshot_policy_list(&s.0, &actor, scope.project.as_deref()).await?,
    ))
}
