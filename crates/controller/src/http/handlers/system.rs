//! Health, the OpenAPI document, and the fallbacks.

use axum::http::StatusCode;
use axum::Json;
use stratus_api_types::views::Health;

use crate::app::Actor;
use crate::http::error::ApiError;

/// Liveness and readiness: the controller answers and its database does.
/// The one endpoint that needs no token.
#[utoipa::path(get, path = "/healthz", tag = "system", operation_id = "healthz",
    responses((status = 200, body = Health, description = "healthy"),
              (status = "5XX", body = ErrorBody, description = "unhealthy")))]
pub async fn healthz(state: super::AppState) -> Result<Json<Health>, ApiError> {
    state.0.ds.ping().await?;
    Ok(Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    }))
}

/// This API's OpenAPI 3 document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "system", operation_id = "openapi_document",
    responses((status = 200, description = "the OpenAPI document", content_type = "application/json", body = Object),
              (status = "4XX", body = ErrorBody, description = "client error")),
    security(("bearer" = [])))]
pub async fn openapi_document(_actor: Actor) -> Json<serde_json::Value> {
    Json(crate::http::openapi::document_json())
}

/// Unknown routes; the error layer renders the JSON body.
pub async fn not_found() -> StatusCode {
    StatusCode::NOT_FOUND
}

/// Known routes, wrong method; the error layer renders the JSON body.
pub async fn method_not_allowed() -> StatusCode {
    StatusCode::METHOD_NOT_ALLOWED
}
