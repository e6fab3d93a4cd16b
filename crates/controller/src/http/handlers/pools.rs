//! `/v1/storage-pools`: shared storage pools (directories several hosts
//! mount), with each host's view of them.

use axum::extract::Path;
use axum::http::StatusCode;
use axum::Json;
use stratus_api_types::params::StoragePoolCreate;
use stratus_api_types::views::StoragePool;

use super::AppState;
use crate::app::{pools, Actor};
use crate::http::error::ApiError;
use crate::http::extract::ApiJson;

/// Create a shared storage pool (administrators): a directory hosts mount
/// at the same path. Hosts check it within a report or two and say whether
/// they see it; VMs created with `pool` go only to hosts that do.
#[utoipa::path(post, path = "/v1/storage-pools", tag = "storage", operation_id = "pool_create",
    request_body = StoragePoolCreate,
    responses((status = 201, body = StoragePool, description = "created"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn pool_create(
    s: AppState,
    actor: Actor,
    ApiJson(p): ApiJson<StoragePoolCreate>,
) -> Result<(StatusCode, Json<StoragePool>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(pools::pool_create(&s.0, &actor, p).await?),
    ))
}

/// List shared storage pools with their capacity, allocation and hosts.
#[utoipa::path(get, path = "/v1/storage-pools", tag = "storage", operation_id = "pool_list",
    responses((status = 200, body = Vec<StoragePool>, description = "every shared storage pool"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn pool_list(s: AppState, _actor: Actor) -> Result<Json<Vec<StoragePool>>, ApiError> {
    Ok(Json(pools::pool_list(&s.0).await?))
}

/// One shared storage pool.
#[utoipa::path(get, path = "/v1/storage-pools/{pool}", tag = "storage", operation_id = "pool_view",
    params(("pool" = String, Path, description = "storage pool name or id")),
    responses((status = 200, body = StoragePool, description = "the pool"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn pool_view(
    s: AppState,
    _actor: Actor,
    Path(key): Path<String>,
) -> Result<Json<StoragePool>, ApiError> {
    Ok(Json(pools::pool_get(&s.0, &key).await?))
}

/// Delete a shared storage pool no VM uses (administrators). The files in
/// its directory stay.
#[utoipa::path(delete, path = "/v1/storage-pools/{pool}", tag = "storage", operation_id = "pool_delete",
    params(("pool" = String, Path, description = "storage pool name or id")),
    responses((status = 204, description = "deleted"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn pool_delete(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    pools::pool_delete(&s.0, &actor, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}
