//! `/v1/projects`

use axum::extract::Path;
use axum::http::StatusCode;
use axum::Json;
use stratus_api_types::params::{PageParams, ProjectCreate, ProjectFilter};
use stratus_api_types::views::{Project, ProjectPage};

use super::AppState;
use crate::app::{projects, Actor};
use crate::http::error::ApiError;
use crate::http::extract::{ApiJson, ApiQuery};

/// Create a project (admin).
#[utoipa::path(post, path = "/v1/projects", tag = "projects", operation_id = "project_create",
    request_body = ProjectCreate,
    responses((status = 201, body = Project, description = "created"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn project_create(
    s: AppState,
    actor: Actor,
    ApiJson(p): ApiJson<ProjectCreate>,
) -> Result<(StatusCode, Json<Project>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(projects::project_create(&s.0, &actor, p).await?),
    ))
}

/// List projects (a non-admin sees its own).
#[utoipa::path(get, path = "/v1/projects", tag = "projects", operation_id = "project_list",
    params(ProjectFilter, PageParams),
    responses((status = 200, body = ProjectPage, description = "a page of projects"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn project_list(
    s: AppState,
    actor: Actor,
    ApiQuery(f): ApiQuery<ProjectFilter>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<Json<ProjectPage>, ApiError> {
    Ok(Json(projects::project_list(&s.0, &actor, f, page).await?))
}

/// Show a project.
#[utoipa::path(get, path = "/v1/projects/{project}", tag = "projects", operation_id = "project_view",
    params(("project" = String, Path, description = "project name or id")),
    responses((status = 200, body = Project, description = "the project"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn project_view(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
) -> Result<Json<Project>, ApiError> {
    Ok(Json(projects::project_view(&s.0, &actor, &key).await?))
}

/// Delete an empty project (admin). Its tokens and job history go with it.
#[utoipa::path(delete, path = "/v1/projects/{project}", tag = "projects", operation_id = "project_delete",
    params(("project" = String, Path, description = "project name or id")),
    responses((status = 204, description = "deleted"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn project_delete(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    projects::project_delete(&s.0, &actor, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}
