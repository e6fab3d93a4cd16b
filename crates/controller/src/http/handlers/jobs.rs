//! `/v1/jobs`

use axum::extract::Path;
use axum::http::StatusCode;
use axum::Json;
use stratus_api_types::params::{JobFilter, JobWait, PageParams};
use stratus_api_types::views::{Job, JobPage};

use super::AppState;
use crate::app::{jobs, Actor};
use crate::http::error::ApiError;
use crate::http::extract::ApiQuery;

/// List jobs, newest last.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", operation_id = "job_list",
    params(JobFilter, PageParams),
    responses((status = 200, body = JobPage, description = "a page of jobs"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn job_list(
    s: AppState,
    actor: Actor,
    ApiQuery(f): ApiQuery<JobFilter>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<Json<JobPage>, ApiError> {
    Ok(Json(jobs::job_list(&s.0, &actor, f, page).await?))
}

/// Show a job with its step log.
#[utoipa::path(get, path = "/v1/jobs/{job}", tag = "jobs", operation_id = "job_view",
    params(("job" = String, Path, description = "job id")),
    responses((status = 200, body = Job, description = "the job"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn job_view(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
) -> Result<Json<Job>, ApiError> {
    Ok(Json(jobs::job_view(&s.0, &actor, &key).await?))
}

/// Wait for a job to end (or for the timeout), then show it.
#[utoipa::path(get, path = "/v1/jobs/{job}/wait", tag = "jobs", operation_id = "job_wait",
    params(("job" = String, Path, description = "job id"), JobWait),
    responses((status = 200, body = Job, description = "the job, ended or as it stands at the timeout"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn job_wait(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(w): ApiQuery<JobWait>,
) -> Result<Json<Job>, ApiError> {
    Ok(Json(jobs::job_wait(&s.0, &actor, &key, w).await?))
}

/// Cancel a job: it stops and unwinds what it did.
#[utoipa::path(post, path = "/v1/jobs/{job}/cancel", tag = "jobs", operation_id = "job_cancel",
    params(("job" = String, Path, description = "job id")),
    responses((status = 202, body = Job, description = "cancellation requested"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn job_cancel(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    Ok((
        StatusCode::ACCEPTED,
        Json(jobs::job_cancel(&s.0, &actor, &key).await?),
    ))
}
