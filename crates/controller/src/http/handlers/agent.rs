//! `/v1/agent/*`: the host agents' side of the API. Authenticated with the
//! host credential (not an API token), except enrollment, which spends a
//! one-time enrollment token.

use axum::body::Body;
use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::Json;
use stratus_api_types::agent::{
    AgentDesired, AgentEnroll, AgentEnrolled, AgentReport, AgentReportAck, AgentRequestResult,
    ConsoleAppend, DesiredQuery, ImagePart, RequestProgress,
};
use stratus_common::Error;

use super::AppState;
use crate::app::agent::{self, HostActor};
use crate::http::error::ApiError;
use crate::http::extract::{ApiJson, ApiQuery};

/// Enroll a host with a one-time enrollment token; answers the host's own
/// credential.
#[utoipa::path(post, path = "/v1/agent/enroll", tag = "agent", operation_id = "agent_enroll",
    request_body = AgentEnroll,
    responses((status = 201, body = AgentEnrolled, description = "enrolled; the credential is shown once"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(()))]
pub async fn agent_enroll(
    s: AppState,
    ApiJson(p): ApiJson<AgentEnroll>,
) -> Result<(StatusCode, Json<AgentEnrolled>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(agent::agent_enroll(&s.0, p).await?),
    ))
}

/// Heartbeat, host facts and observed VM states.
#[utoipa::path(post, path = "/v1/agent/report", tag = "agent", operation_id = "agent_report",
    request_body = AgentReport,
    responses((status = 200, body = AgentReportAck, description = "applied"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn agent_report(
    s: AppState,
    host: HostActor,
    ApiJson(r): ApiJson<AgentReport>,
) -> Result<Json<AgentReportAck>, ApiError> {
    Ok(Json(agent::agent_report(&s.0, &host, r).await?))
}

/// What this host should run (long poll on `since`).
#[utoipa::path(get, path = "/v1/agent/desired", tag = "agent", operation_id = "agent_desired",
    params(DesiredQuery),
    responses((status = 200, body = AgentDesired, description = "the host's desired state"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn agent_desired(
    s: AppState,
    host: HostActor,
    ApiQuery(q): ApiQuery<DesiredQuery>,
) -> Result<Json<AgentDesired>, ApiError> {
    Ok(Json(agent::agent_desired(&s.0, &host, q).await?))
}

/// The outcome of a request the agent was given.
#[utoipa::path(post, path = "/v1/agent/requests/{request}/result", tag = "agent", operation_id = "agent_request_result",
    params(("request" = String, Path, description = "request id")),
    request_body = AgentRequestResult,
    responses((status = 204, description = "recorded"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn agent_request_result(
    s: AppState,
    host: HostActor,
    Path(id): Path<String>,
    ApiJson(r): ApiJson<AgentRequestResult>,
) -> Result<StatusCode, ApiError> {
    agent::agent_request_result(&s.0, &host, &id, r).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// How far a long request (a backup) has come.
#[utoipa::path(post, path = "/v1/agent/requests/{request}/progress", tag = "agent", operation_id = "agent_request_progress",
    params(("request" = String, Path, description = "request id")),
    request_body = RequestProgress,
    responses((status = 204, description = "recorded"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn agent_request_progress(
    s: AppState,
    host: HostActor,
    Path(id): Path<String>,
    ApiJson(p): ApiJson<RequestProgress>,
) -> Result<StatusCode, ApiError> {
    agent::agent_request_progress(&s.0, &host, &id, p).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// New console output of a VM on this host.
#[utoipa::path(put, path = "/v1/agent/vms/{vm}/console", tag = "agent", operation_id = "agent_console_append",
    params(("vm" = String, Path, description = "VM id")),
    request_body = ConsoleAppend,
    responses((status = 204, description = "stored"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn agent_console_append(
    s: AppState,
    host: HostActor,
    Path(vm): Path<String>,
    ApiJson(c): ApiJson<ConsoleAppend>,
) -> Result<StatusCode, ApiError> {
    agent::agent_console_append(&s.0, &host, &vm, c).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Download an image part (disk, kernel or initrd) to cache on the host.
#[utoipa::path(get, path = "/v1/agent/images/{image}/{part}", tag = "agent", operation_id = "agent_image_download",
    params(("image" = String, Path, description = "image id"), ("part" = ImagePart, Path, description = "which file")),
    responses((status = 200, description = "the file", content_type = "application/octet-stream", body = Vec<u8>),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn agent_image_download(
    s: AppState,
    host: HostActor,
    Path((image, part)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let part: ImagePart = serde_json::from_value(serde_json::Value::String(part.clone()))
        .map_err(|_| Error::invalid("part", format!("{part:?} is not disk, kernel or initrd")))?;
    let path = agent::agent_image_file(&s.0, &host, &image, part).await?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| Error::internal(format!("opening {}: {e}", path.display())))?;
    let len = file
        .metadata()
        .await
        .map_err(|e| Error::internal(format!("reading {}: {e}", path.display())))?
        .len();
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20));
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .body(body)
        .map_err(|e| ApiError(Error::internal(format!("building a response: {e}"))))
}
