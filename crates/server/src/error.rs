//! OpenAI-style errors: an HTTP status and `{"error": {"message", "type", "param", "code"}}`.

use std::borrow::Cow;

use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// OpenAI's error body.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    /// What went wrong.
    pub error: ErrorDetail<'a>,
}

/// The inside of an [`ErrorBody`].
#[derive(Debug, Serialize)]
pub struct ErrorDetail<'a> {
    /// What was wrong, with the offending value, and what to do.
    pub message: &'a str,
    /// `invalid_request_error`, `rate_limit_exceeded`, `server_error`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request parameter concerned, when one is (a path: `messages[1].content`).
    pub param: Option<&'a str>,
    /// A machine-readable code (`context_length_exceeded`, `model_not_found`).
    pub code: Option<&'static str>,
}

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status: 4xx for the client's mistakes, 429 when the queue is full, 503 when
    /// the cluster cannot serve.
    pub status: StatusCode,
    /// What was wrong, with the offending value, and what to do (the body's `message`).
    pub message: String,
    /// The body's `type`: `invalid_request_error`, `rate_limit_exceeded` or `server_error`.
    pub kind: &'static str,
    /// The body's `param`: the request field at fault, when one is (its path in the body,
    /// `messages[1].content`, `prompt[0]`).
    pub param: Option<Cow<'static, str>>,
    /// The body's `code`, for programs (`context_length_exceeded`, `model_not_found`).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400: the request is wrong; `param` names the field.
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), kind: "invalid_request_error", param: param.map(Cow::Borrowed), code: None }
    }

    /// 400 naming a parameter by its path in the body (`messages[2].content`).
    pub fn invalid_at(param: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self { param: Some(param.into()), ..Self::invalid(None, message) }
    }

    /// 408: the request body did not arrive within `limit`; the connection is closed.
    pub fn body_timeout(limit: std::time::Duration) -> Self {
        Self {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!("the request body did not arrive within {} s", limit.as_secs_f64()),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_timeout"),
        }
    }

    /// 431: the request's headers are over the server's limit (`what` says which limit).
    pub fn headers_too_large(what: String) -> Self {
        Self { status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, message: what, kind: "invalid_request_error", param: None, code: None }
    }

    /// The same error with the machine-readable `code` set.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 404: the request named a `model` this server does not serve.
    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist."),
            kind: "invalid_request_error",
            param: Some(Cow::Borrowed("model")),
            code: Some("model_not_found"),
        }
    }

    /// 401: the API key is missing or wrong (only when the server has one); answered with
    /// `WWW-Authenticate: Bearer`.
    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: "Incorrect or missing API key: send it as `Authorization: Bearer <key>`.".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// 429 with `Retry-After: 1`: the waiting queue is full; the client should retry later.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self { status: StatusCode::TOO_MANY_REQUESTS, message: message.into(), kind: "rate_limit_exceeded", param: None, code: Some("rate_limit_exceeded") }
    }

    /// 503 with `Retry-After: 2`: the server cannot serve now (loading, draining, or the
    /// cluster failed and is recovering); the message says which. Also the error event of
    /// a stream that fails midway.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self { status: StatusCode::SERVICE_UNAVAILABLE, message: message.into(), kind: "server_error", param: None, code: Some("unavailable") }
    }

    /// 404: no route at `path`.
    pub fn not_found(path: &str) -> Self {
        Self { status: StatusCode::NOT_FOUND, message: format!("no route {path}"), kind: "invalid_request_error", param: None, code: Some("not_found") }
    }

    /// 405: a route asked with the wrong method (OpenAI answers its error body, not an empty one).
    pub fn method_not_allowed(method: &Method, path: &str) -> Self {
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: format!("Invalid method for URL ({method} {path})"),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    /// The body could not be read: 413 over `limit` bytes, else 400.
    pub fn unreadable_body(e: &BytesRejection, limit: usize) -> Self {
        let message = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            format!("the request body is over the server's limit of {limit} bytes: send a shorter prompt")
        } else {
            format!("cannot read the request body: {}", e.body_text())
        };
        Self { status: e.status(), message, kind: "invalid_request_error", param: None, code: None }
    }

    /// The JSON body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody { error: ErrorDetail { message: &self.message, kind: self.kind, param: self.param.as_deref(), code: self.code } }
    }
}

impl From<tpserve_coordinator::InvalidParam> for ApiError {
    fn from(e: tpserve_coordinator::InvalidParam) -> Self {
        let message = e.to_string();
        let err = Self::invalid(Some(e.param), message);
        match e.code {
            Some(c) => err.with_code(c),
            None => err,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        match self.status {
            StatusCode::TOO_MANY_REQUESTS => {
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            StatusCode::UNAUTHORIZED => {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            // The rest of the body or of the headers may still be on the way: start afresh.
            StatusCode::REQUEST_TIMEOUT | StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => {
                r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        // Loading, recovering or draining: a client (or a load balancer) should come back
        // in a few seconds, or try another replica.
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        }
        r
    }
}
