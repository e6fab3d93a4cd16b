//! `/v1/images`

use axum::body::Body;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::Json;
use stratus_api_types::params::{ImageCreate, ImageFilter, PageParams, ProjectScope};
use stratus_api_types::views::{Image, ImagePage};

use super::AppState;
use crate::app::{images, Actor};
use crate::http::error::ApiError;
use crate::http::extract::{ApiJson, ApiQuery};

/// Register an image: from a file on the controller host (`path`, admin), or
/// as a pending record whose data is then uploaded to
/// `PUT /v1/images/{image}/data`.
#[utoipa::path(post, path = "/v1/images", tag = "images", operation_id = "image_create",
    request_body = ImageCreate,
    responses((status = 201, body = Image, description = "registered"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn image_create(
    s: AppState,
    actor: Actor,
    ApiJson(p): ApiJson<ImageCreate>,
) -> Result<(StatusCode, Json<Image>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(images::image_create(&s.0, &actor, p).await?),
    ))
}

/// Upload a pending image's data (raw bytes of a qcow2 or raw file). The
/// data is validated with `qemu-img info` and checksummed before the image
/// becomes ready.
#[utoipa::path(put, path = "/v1/images/{image}/data", tag = "images", operation_id = "image_upload",
    params(("image" = String, Path, description = "image name or id"), ProjectScope),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the image file"),
    responses((status = 200, body = Image, description = "the image, now ready"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn image_upload(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
    body: Body,
) -> Result<Json<Image>, ApiError> {
    let stream = body.into_data_stream();
    Ok(Json(
        images::image_upload(&s.0, &actor, &key, scope.project.as_deref(), stream).await?,
    ))
}

/// List images: the caller's project's and public ones.
#[utoipa::path(get, path = "/v1/images", tag = "images", operation_id = "image_list",
    params(ImageFilter, PageParams),
    responses((status = 200, body = ImagePage, description = "a page of images"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn image_list(
    s: AppState,
    actor: Actor,
    ApiQuery(f): ApiQuery<ImageFilter>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<Json<ImagePage>, ApiError> {
    Ok(Json(images::image_list(&s.0, &actor, f, page).await?))
}

/// Show an image.
#[utoipa::path(get, path = "/v1/images/{image}", tag = "images", operation_id = "image_view",
    params(("image" = String, Path, description = "image name or id"), ProjectScope),
    responses((status = 200, body = Image, description = "the image"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn image_view(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
) -> Result<Json<Image>, ApiError> {
    Ok(Json(
        images::image_view(&s.0, &actor, &key, scope.project.as_deref()).await?,
    ))
}

/// Delete an image no VM was created from.
#[utoipa::path(delete, path = "/v1/images/{image}", tag = "images", operation_id = "image_delete",
    params(("image" = String, Path, description = "image name or id"), ProjectScope),
    responses((status = 204, description = "deleted"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn image_delete(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
) -> Result<StatusCode, ApiError> {
    images::image_delete(&s.0, &actor, &key, scope.project.as_deref()).await?;
    Ok(StatusCode::NO_CONTENT)
}
