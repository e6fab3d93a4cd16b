//! `/v1/hosts` and `/v1/host-enrollment-tokens` (admin)

use axum::extract::Path;
use axum::http::StatusCode;
use axum::Json;
use stratus_api_types::params::{EnrollmentTokenCreate, HostFilter, PageParams};
use stratus_api_types::views::{EnrollmentTokenCreated, Host, HostPage};

use super::AppState;
use crate::app::{hosts, Actor};
use crate::http::error::ApiError;
use crate::http::extract::{ApiJson, ApiQuery};

/// List hosts (admin).
#[utoipa::path(get, path = "/v1/hosts", tag = "hosts", operation_id = "host_list",
    params(HostFilter, PageParams),
    responses((status = 200, body = HostPage, description = "a page of hosts"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn host_list(
    s: AppState,
    actor: Actor,
    ApiQuery(f): ApiQuery<HostFilter>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<Json<HostPage>, ApiError> {
    Ok(Json(hosts::host_list(&s.0, &actor, f, page).await?))
}

/// Show a host (admin).
#[utoipa::path(get, path = "/v1/hosts/{host}", tag = "hosts", operation_id = "host_view",
    params(("host" = String, Path, description = "host name or id")),
    responses((status = 200, body = Host, description = "the host"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn host_view(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
) -> Result<Json<Host>, ApiError> {
    Ok(Json(hosts::host_view(&s.0, &actor, &key).await?))
}

/// Create a one-time token for enrolling a host's agent (admin).
#[utoipa::path(post, path = "/v1/host-enrollment-tokens", tag = "hosts", operation_id = "enrollment_token_create",
    request_body = EnrollmentTokenCreate,
    responses((status = 201, body = EnrollmentTokenCreated, description = "created; the token is shown once"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn enrollment_token_create(
    s: AppState,
    actor: Actor,
    ApiJson(p): ApiJson<EnrollmentTokenCreate>,
) -> Result<(StatusCode, Json<EnrollmentTokenCreated>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(hosts::enrollment_token_create(&s.0, &actor, p).await?),
    ))
}
