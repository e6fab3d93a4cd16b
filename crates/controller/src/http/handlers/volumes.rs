//! `/v1/volumes`: data volumes. Attaching and detaching answer `202
//! Accepted` with the job carrying it out.

use axum::extract::Path;
use axum::http::StatusCode;
use axum::Json;
use stratus_api_types::params::{
    PageParams, ProjectScope, VolumeAttach, VolumeCreate, VolumeFilter, VolumeResize,
};
use stratus_api_types::views::{Volume, VolumeOperation, VolumePage};

use super::AppState;
use crate::app::{volumes, Actor};
use crate::http::error::ApiError;
use crate::http::extract::{ApiJson, ApiQuery};

/// Create a volume: blank, or a copy-on-write clone of an image. Its file
/// is made on a host at its first attach.
#[utoipa::path(post, path = "/v1/volumes", tag = "volumes", operation_id = "volume_create",
    request_body = VolumeCreate,
    responses((status = 201, body = Volume, description = "created"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn volume_create(
    s: AppState,
    actor: Actor,
    ApiJson(p): ApiJson<VolumeCreate>,
) -> Result<(StatusCode, Json<Volume>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(volumes::volume_create(&s.0, &actor, p).await?),
    ))
}

/// List volumes.
#[utoipa::path(get, path = "/v1/volumes", tag = "volumes", operation_id = "volume_list",
    params(VolumeFilter, PageParams),
    responses((status = 200, body = VolumePage, description = "a page of volumes"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn volume_list(
    s: AppState,
    actor: Actor,
    ApiQuery(f): ApiQuery<VolumeFilter>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<Json<VolumePage>, ApiError> {
    Ok(Json(
        volumes::volume_list(&s.0, &actor, f.project.as_deref(), page).await?,
    ))
}

/// Show a volume.
#[utoipa::path(get, path = "/v1/volumes/{volume}", tag = "volumes", operation_id = "volume_view",
    params(("volume" = String, Path, description = "volume name or id"), ProjectScope),
    responses((status = 200, body = Volume, description = "the volume"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn volume_view(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
) -> Result<Json<Volume>, ApiError> {
    Ok(Json(
        volumes::volume_view(&s.0, &actor, &key, scope.project.as_deref()).await?,
    ))
}

/// Delete a volume that is not attached (`409 volume_attached` otherwise).
#[utoipa::path(delete, path = "/v1/volumes/{volume}", tag = "volumes", operation_id = "volume_delete",
    params(("volume" = String, Path, description = "volume name or id"), ProjectScope),
    responses((status = 204, description = "deleted"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn volume_delete(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
) -> Result<StatusCode, ApiError> {
    volumes::volume_delete(&s.0, &actor, &key, scope.project.as_deref()).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Attach a volume to a VM: hot-plugged while the VM runs (the guest sees a
/// new virtio disk whose serial is the volume id's first 20 hex digits),
/// on the VM's next boot otherwise.
#[utoipa::path(post, path = "/v1/volumes/{volume}/attach", tag = "volumes", operation_id = "volume_attach",
    params(("volume" = String, Path, description = "volume name or id"), ProjectScope),
    request_body = VolumeAttach,
    responses((status = 202, body = VolumeOperation, description = "accepted"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn volume_attach(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
    ApiJson(p): ApiJson<VolumeAttach>,
) -> Result<(StatusCode, Json<VolumeOperation>), ApiError> {
    Ok((
        StatusCode::ACCEPTED,
        Json(volumes::volume_attach(&s.0, &actor, &key, scope.project.as_deref(), p).await?),
    ))
}

/// Detach a volume from its VM (hot-unplugged while the VM runs; the guest
/// must release the disk).
#[utoipa::path(post, path = "/v1/volumes/{volume}/detach", tag = "volumes", operation_id = "volume_detach",
    params(("volume" = String, Path, description = "volume name or id"), ProjectScope),
    responses((status = 202, body = VolumeOperation, description = "accepted"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn volume_detach(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
) -> Result<(StatusCode, Json<VolumeOperation>), ApiError> {
    Ok((
        StatusCode::ACCEPTED,
        Json(volumes::volume_detach(&s.0, &actor, &key, scope.project.as_deref()).await?),
    ))
}

/// Grow a volume (live when attached to a running VM).
#[utoipa::path(post, path = "/v1/volumes/{volume}/resize", tag = "volumes", operation_id = "volume_resize",
    params(("volume" = String, Path, description = "volume name or id"), ProjectScope),
    request_body = VolumeResize,
    responses((status = 200, body = Volume, description = "grown"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn volume_resize(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
    ApiJson(p): ApiJson<VolumeResize>,
) -> Result<Json<Volume>, ApiError> {
    Ok(Json(
        volumes::volume_resize(&s.0, &actor, &key, scope.project.as_deref(), p).await?,
    ))
}
