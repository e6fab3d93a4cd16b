//! Extractors that report bad input as our errors, naming the field.
//!
//! - [`Actor`] (from `Authorization: Bearer ...`) runs before any body is
//!   read, so an unauthenticated request is a 401 whatever its body.
//! - [`ApiJson`] and [`ApiQuery`] use `serde_path_to_error` so a 400 says
//!   which field was wrong (`field: "memory_bytes"`).

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use serde::de::DeserializeOwned;
use stratus_common::Error;

use crate::app::agent::HostActor;
use crate::app::{secrets, Actor, App};
use crate::http::error::ApiError;

impl FromRequestParts<Arc<App>> for Actor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Err(ApiError(Error::Unauthenticated {
                message: "this endpoint needs an `Authorization: Bearer <token>` header".into(),
            }));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError(Error::Unauthenticated {
                    message: "the Authorization header must be `Bearer <token>`".into(),
                })
            })?;
        let hash = secrets::hash(token);
        if let Some(token) = app.tokens.get(&hash) {
            return Ok(Actor { token });
        }
        match app.ds.token_authenticate(&hash).await? {
            Some(token) => {
                app.tokens.put(&hash, &token);
                Ok(Actor { token })
            }
            None => Err(ApiError(Error::Unauthenticated {
                message: "the token is not valid: unknown, revoked or expired".into(),
            })),
        }
    }
}

impl FromRequestParts<Arc<App>> for HostActor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError(Error::Unauthenticated {
                    message: "agent endpoints need `Authorization: Bearer <host credential>`"
                        .into(),
                })
            })?;
        match crate::app::agent::host_from_credential(app, token).await? {
            Some(h) => Ok(h),
            None => Err(ApiError(Error::Unauthenticated {
                message: "the host credential is not valid; re-enroll the agent".into(),
            })),
        }
    }
}

/// A JSON body.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !is_json {
            return Err(ApiError(Error::bad_request(
                "the request body must be JSON, with `Content-Type: application/json`",
            )));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                ApiError(Error::bad_request(format!(
                    "cannot read the request body: {e}"
                )))
            })?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(de)
            .map(ApiJson)
            .map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                let message = format!("invalid request body: {inner}");
                if path == "." || path.is_empty() {
                    ApiError(Error::bad_request(message))
                } else {
                    ApiError(Error::invalid(
                        path.clone(),
                        format!("invalid value for `{path}`: {inner}"),
                    ))
                }
            })
    }
}

/// Query parameters.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let q = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(form_urlencoded_parse(q));
        serde_path_to_error::deserialize(de)
            .map(ApiQuery)
            .map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                if path == "." || path.is_empty() {
                    ApiError(Error::bad_request(format!("invalid query: {inner}")))
                } else {
                    ApiError(Error::invalid(
                        path.clone(),
                        format!("invalid value for `{path}`: {inner}"),
                    ))
                }
            })
    }
}

fn form_urlencoded_parse(q: &str) -> form_urlencoded::Parse<'_> {
    form_urlencoded::parse(q.as_bytes())
}

/// The `Idempotency-Key` header, if any.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => v.to_str().map(|s| Some(s.to_string())).map_err(|_| {
            ApiError(Error::invalid(
                "Idempotency-Key",
                "Idempotency-Key must be ASCII",
            ))
        }),
    }
}
