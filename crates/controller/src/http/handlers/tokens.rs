//! `/v1/tokens` and `/v1/whoami`

use axum::extract::Path;
use axum::http::StatusCode;
use axum::Json;
use stratus_api_types::params::{PageParams, TokenCreate, TokenFilter};
use stratus_api_types::views::{Token, TokenCreated, TokenPage, WhoAmI};

use super::AppState;
use crate::app::{tokens, Actor};
use crate::http::error::ApiError;
use crate::http::extract::{ApiJson, ApiQuery};

/// Create an API token. The secret is in this response and nowhere else.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", operation_id = "token_create",
    request_body = TokenCreate,
    responses((status = 201, body = TokenCreated, description = "created; the secret is shown once"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn token_create(
    s: AppState,
    actor: Actor,
    ApiJson(p): ApiJson<TokenCreate>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(tokens::token_create(&s.0, &actor, p).await?),
    ))
}

/// List API tokens (never their secrets).
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens", operation_id = "token_list",
    params(TokenFilter, PageParams),
    responses((status = 200, body = TokenPage, description = "a page of tokens"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn token_list(
    s: AppState,
    actor: Actor,
    ApiQuery(f): ApiQuery<TokenFilter>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<Json<TokenPage>, ApiError> {
    Ok(Json(tokens::token_list(&s.0, &actor, f, page).await?))
}

/// Show a token.
#[utoipa::path(get, path = "/v1/tokens/{token}", tag = "tokens", operation_id = "token_view",
    params(("token" = String, Path, description = "token id")),
    responses((status = 200, body = Token, description = "the token"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn token_view(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
) -> Result<Json<Token>, ApiError> {
    Ok(Json(tokens::token_view(&s.0, &actor, &key).await?))
}

/// Revoke a token. It stops working at once; revoking twice is harmless.
#[utoipa::path(delete, path = "/v1/tokens/{token}", tag = "tokens", operation_id = "token_revoke",
    params(("token" = String, Path, description = "token id")),
    responses((status = 200, body = Token, description = "the revoked token"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn token_revoke(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
) -> Result<Json<Token>, ApiError> {
    Ok(Json(tokens::token_revoke(&s.0, &actor, &key).await?))
}

/// Who the presented token is.
#[utoipa::path(get, path = "/v1/whoami", tag = "tokens", operation_id = "whoami",
    responses((status = 200, body = WhoAmI, description = "the caller"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn whoami(s: AppState, actor: Actor) -> Result<Json<WhoAmI>, ApiError> {
    Ok(Json(tokens::whoami(&s.0, &actor).await?))
}
