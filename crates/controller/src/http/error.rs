//! The one place errors become HTTP responses.
//!
//! Handlers return [`ApiError`] (a wrapped [`stratus_common::Error`]); its
//! response carries the error as an extension, and [`request_context`] (the
//! outermost layer, which knows the request id) renders the JSON body
//! `{error_code, message, request_id, field?}`. Responses produced outside
//! our handlers (unknown routes, wrong methods, framework rejections,
//! panics) get the same body, so *every* error a client sees has that shape.

use std::time::Instant;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use stratus_api_types::views::ErrorBody;
use stratus_common::Error;

/// The request id, available to handlers as an extension.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// A handler's error.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

/// The error's parts, waiting for the request id.
#[derive(Clone, Debug)]
struct ErrorPayload {
    code: String,
    message: String,
    field: Option<String>,
    details: Option<serde_json::Value>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = self.0;
        let status =
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if let Error::Internal { internal } = &e {
            tracing::error!(error = %internal, "internal error");
        }
        let field = match &e {
            Error::InvalidRequest { field, .. } => field.clone(),
            _ => None,
        };
        let details = match &e {
            Error::NoCapacity { details, .. } => Some(details.clone()),
            _ => None,
        };
        let mut resp = Response::new(Body::empty());
        *resp.status_mut() = status;
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp.extensions_mut().insert(ErrorPayload {
            code: e.error_code().to_string(),
            message: e.external_message(),
            field,
            details,
        });
        resp
    }
}

pub fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError(Error::internal("handler panicked")).into_response()
}

/// The generic code for an error status produced outside our handlers.
fn generic(status: StatusCode) -> (&'static str, &'static str) {
    match status {
        StatusCode::BAD_REQUEST => ("invalid_request", "the request is malformed"),
        StatusCode::NOT_FOUND => ("not_found", "no such route"),
        StatusCode::METHOD_NOT_ALLOWED => {
            ("method_not_allowed", "this route does not take that method")
        }
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "the request body is too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "unsupported_media_type",
            "the request body has the wrong content type",
        ),
        s if s.is_server_error() => ("internal", "internal error"),
        _ => ("invalid_request", "the request was refused"),
    }
}

/// Outermost layer: gives each request an id, renders error bodies, sets
/// `x-request-id`, and logs one line per request.
pub async fn request_context(mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = uuid::Uuid::new_v4().to_string();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    req.extensions_mut().insert(RequestId(id.clone()));
    let resp = next.run(req).await;
    let (mut parts, body) = resp.into_parts();
    let status = parts.status;
    let payload = parts.extensions.remove::<ErrorPayload>();
    let resp = match payload {
        Some(p) => render(parts, &id, p),
        None if status.is_client_error() || status.is_server_error() => {
            let is_json = parts
                .headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
            if is_json {
                Response::from_parts(parts, body)
            } else {
                // A framework rejection: keep its text as the message, it
                // says what was wrong (bad UTF-8 in a path, say).
                let text = axum::body::to_bytes(body, 16 * 1024)
                    .await
                    .unwrap_or_default();
                let (code, default) = generic(status);
                let text = String::from_utf8_lossy(&text).trim().to_string();
                let message = if text.is_empty() || status.is_server_error() {
                    default.to_string()
                } else {
                    text
                };
                render(
                    parts,
                    &id,
                    ErrorPayload {
                        code: code.to_string(),
                        message,
                        field: None,
                        details: None,
                    },
                )
            }
        }
        None => Response::from_parts(parts, body),
    };
    let mut resp = resp;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    tracing::info!(
        request_id = %id,
        %method,
        path,
        status = resp.status().as_u16(),
        latency_us = started.elapsed().as_micros() as u64,
        "request"
    );
    resp
}

fn render(mut parts: axum::http::response::Parts, id: &str, p: ErrorPayload) -> Response {
    let body = ErrorBody {
        error_code: p.code,
        message: p.message,
        request_id: id.to_string(),
        field: p.field,
        details: p.details,
    };
    let json = serde_json::to_vec(&body).unwrap_or_default();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(json))
}
