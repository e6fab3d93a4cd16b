//! `/v1/flavors`

use axum::extract::Path;
use axum::http::StatusCode;
use axum::Json;
use stratus_api_types::params::{FlavorCreate, FlavorFilter, PageParams};
use stratus_api_types::views::{Flavor, FlavorPage};

use super::AppState;
use crate::app::{flavors, Actor};
use crate::http::error::ApiError;
use crate::http::extract::{ApiJson, ApiQuery};

/// Create a flavor (admin).
#[utoipa::path(post, path = "/v1/flavors", tag = "flavors", operation_id = "flavor_create",
    request_body = FlavorCreate,
    responses((status = 201, body = Flavor, description = "created"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn flavor_create(
    s: AppState,
    actor: Actor,
    ApiJson(p): ApiJson<FlavorCreate>,
) -> Result<(StatusCode, Json<Flavor>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(flavors::flavor_create(&s.0, &actor, p).await?),
    ))
}

/// List flavors.
#[utoipa::path(get, path = "/v1/flavors", tag = "flavors", operation_id = "flavor_list",
    params(FlavorFilter, PageParams),
    responses((status = 200, body = FlavorPage, description = "a page of flavors"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn flavor_list(
    s: AppState,
    actor: Actor,
    ApiQuery(f): ApiQuery<FlavorFilter>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<Json<FlavorPage>, ApiError> {
    Ok(Json(flavors::flavor_list(&s.0, &actor, f, page).await?))
}

/// Show a flavor.
#[utoipa::path(get, path = "/v1/flavors/{flavor}", tag = "flavors", operation_id = "flavor_view",
    params(("flavor" = String, Path, description = "flavor name or id")),
    responses((status = 200, body = Flavor, description = "the flavor"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn flavor_view(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
) -> Result<Json<Flavor>, ApiError> {
    Ok(Json(flavors::flavor_view(&s.0, &actor, &key).await?))
}

/// Delete a flavor no VM uses (admin).
#[utoipa::path(delete, path = "/v1/flavors/{flavor}", tag = "flavors", operation_id = "flavor_delete",
    params(("flavor" = String, Path, description = "flavor name or id")),
    responses((status = 204, description = "deleted"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn flavor_delete(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    flavors::flavor_delete(&s.0, &actor, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}
