//! `/v1/vms/{vm}/snapshots`: disk snapshots of a VM. Taking, reverting and
//! deleting answer `202 Accepted` with the job carrying it out.

use axum::extract::Path;
use axum::http::StatusCode;
use axum::Json;
use stratus_api_types::params::{ProjectScope, SnapshotCreate};
use stratus_api_types::views::{Snapshot, SnapshotOperation, VmOperation};

use super::AppState;
use crate::app::{snapshots, Actor};
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
