//! `/v1/clusters` (admin), `/v1/server-groups`, and `PATCH /v1/hosts/{host}`
//! (admin): the scheduler's policy.

use axum::extract::Path;
use axum::http::StatusCode;
use axum::Json;
use stratus_api_types::params::{
    ClusterUpdate, HostUpdate, PageParams, ProjectScope, ServerGroupCreate, ServerGroupFilter,
};
use stratus_api_types::views::{Cluster, ClusterPage, Host, ServerGroup, ServerGroupPage};

use super::AppState;
use crate::app::{scheduling, Actor};
use crate::http::error::ApiError;
use crate::http::extract::{ApiJson, ApiQuery};

/// List clusters with their scheduling policy (admin).
#[utoipa::path(get, path = "/v1/clusters", tag = "scheduling", operation_id = "cluster_list",
    responses((status = 200, body = ClusterPage, description = "every cluster"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn cluster_list(s: AppState, actor: Actor) -> Result<Json<ClusterPage>, ApiError> {
    Ok(Json(scheduling::cluster_list(&s.0, &actor).await?))
}

/// Show a cluster (admin).
#[utoipa::path(get, path = "/v1/clusters/{cluster}", tag = "scheduling", operation_id = "cluster_view",
    params(("cluster" = String, Path, description = "cluster name")),
    responses((status = 200, body = Cluster, description = "the cluster"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn cluster_view(
    s: AppState,
    actor: Actor,
    Path(name): Path<String>,
) -> Result<Json<Cluster>, ApiError> {
    Ok(Json(scheduling::cluster_view(&s.0, &actor, &name).await?))
}

/// Change a cluster's overcommit ratios or weigher (admin). VMs already
/// placed stay where they are.
#[utoipa::path(patch, path = "/v1/clusters/{cluster}", tag = "scheduling", operation_id = "cluster_update",
    params(("cluster" = String, Path, description = "cluster name")),
    request_body = ClusterUpdate,
    responses((status = 200, body = Cluster, description = "the cluster as changed"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn cluster_update(
    s: AppState,
    actor: Actor,
    Path(name): Path<String>,
    ApiJson(p): ApiJson<ClusterUpdate>,
) -> Result<Json<Cluster>, ApiError> {
    Ok(Json(
        scheduling::cluster_update(&s.0, &actor, &name, p).await?,
    ))
}

/// Change a host's tags (admin).
#[utoipa::path(patch, path = "/v1/hosts/{host}", tag = "hosts", operation_id = "host_update",
    params(("host" = String, Path, description = "host name or id")),
    request_body = HostUpdate,
    responses((status = 200, body = Host, description = "the host as changed"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn host_update(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiJson(p): ApiJson<HostUpdate>,
) -> Result<Json<Host>, ApiError> {
    Ok(Json(scheduling::host_update(&s.0, &actor, &key, p).await?))
}

/// Create a server group: VMs that join it are placed together
/// (affinity) or apart (anti-affinity), strictly or where possible (soft).
#[utoipa::path(post, path = "/v1/server-groups", tag = "scheduling", operation_id = "server_group_create",
    request_body = ServerGroupCreate,
    responses((status = 201, body = ServerGroup, description = "created"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn server_group_create(
    s: AppState,
    actor: Actor,
    ApiJson(p): ApiJson<ServerGroupCreate>,
) -> Result<(StatusCode, Json<ServerGroup>), ApiError> {
    let g = scheduling::server_group_create(&s.0, &actor, p).await?;
    Ok((StatusCode::CREATED, Json(g)))
}

/// List server groups.
#[utoipa::path(get, path = "/v1/server-groups", tag = "scheduling", operation_id = "server_group_list",
    params(ServerGroupFilter, PageParams),
    responses((status = 200, body = ServerGroupPage, description = "a page of server groups"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn server_group_list(
    s: AppState,
    actor: Actor,
    ApiQuery(f): ApiQuery<ServerGroupFilter>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<Json<ServerGroupPage>, ApiError> {
    Ok(Json(
        scheduling::server_group_list(&s.0, &actor, f, page).await?,
    ))
}

/// Show a server group.
#[utoipa::path(get, path = "/v1/server-groups/{group}", tag = "scheduling", operation_id = "server_group_view",
    params(("group" = String, Path, description = "server group name or id"), ProjectScope),
    responses((status = 200, body = ServerGroup, description = "the server group"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn server_group_view(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
) -> Result<Json<ServerGroup>, ApiError> {
    Ok(Json(
        scheduling::server_group_view(&s.0, &actor, &key, scope.project.as_deref()).await?,
    ))
}

/// Delete a server group without members.
#[utoipa::path(delete, path = "/v1/server-groups/{group}", tag = "scheduling", operation_id = "server_group_delete",
    params(("group" = String, Path, description = "server group name or id"), ProjectScope),
    responses((status = 204, description = "deleted"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn server_group_delete(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
) -> Result<StatusCode, ApiError> {
    scheduling::server_group_delete(&s.0, &actor, &key, scope.project.as_deref()).await?;
    Ok(StatusCode::NO_CONTENT)
}
