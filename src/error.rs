//! One error type for every request path: `ApiError` knows its spec code, its HTTP status and
//! its retryability, and renders the spec's envelope
//! `{"error":{"code","message","details?","timestamp","requestId"}}`.
//!
//! Boundary errors (`StoreError`, `ConfigError`, …) convert into it; handlers only ever return it.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{json, Value};
use std::time::Duration;
use utoipa::ToSchema;

/// The spec's error codes, each with exactly one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    ValidationError,
    Unauthenticated,
    CharacterAccessDenied,
    CharacterQuotaExceeded,
    CharacterNotFound,
    NotFound,
    MethodNotAllowed,
    VersionConflict,
    PayloadTooLarge,
    UnsupportedMediaType,
    CharacterInvalidData,
    RateLimited,
    InternalServerError,
    ServiceUnavailable,
    StApiUnavailable,
    StApiRateLimited,
    StApiAuthFailed,
    StGenerationFailed,
    Timeout,
    PluginFailed,
    Forbidden,
}

impl ErrorCode {
    /// The code as the spec spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ValidationError => "VALIDATION_ERROR",
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::CharacterAccessDenied => "CHARACTER_ACCESS_DENIED",
            Self::CharacterQuotaExceeded => "CHARACTER_QUOTA_EXCEEDED",
            Self::CharacterNotFound => "CHARACTER_NOT_FOUND",
            Self::NotFound => "NOT_FOUND",
            Self::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Self::VersionConflict => "VERSION_CONFLICT",
            Self::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Self::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            Self::CharacterInvalidData => "CHARACTER_INVALID_DATA",
            Self::RateLimited => "RATE_LIMITED",
            Self::InternalServerError => "INTERNAL_SERVER_ERROR",
            Self::ServiceUnavailable => "SERVICE_UNAVAILABLE",
            Self::StApiUnavailable => "ST_API_UNAVAILABLE",
            Self::StApiRateLimited => "ST_API_RATE_LIMITED",
            Self::StApiAuthFailed => "ST_API_AUTH_FAILED",
            Self::StGenerationFailed => "ST_GENERATION_FAILED",
            Self::Timeout => "TIMEOUT",
            Self::PluginFailed => "PLUGIN_FAILED",
            Self::Forbidden => "FORBIDDEN",
        }
    }

    /// The HTTP status the code is always answered with.
    pub fn status(self) -> StatusCode {
        match self {
            Self::ValidationError => StatusCode::BAD_REQUEST,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::CharacterAccessDenied | Self::CharacterQuotaExceeded | Self::Forbidden => {
                StatusCode::FORBIDDEN
            }
            Self::CharacterNotFound | Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::VersionConflict => StatusCode::CONFLICT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::CharacterInvalidData => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RateLimited | Self::StApiRateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::InternalServerError => StatusCode::INTERNAL_SERVER_ERROR,
            Self::ServiceUnavailable | Self::StApiUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::StApiAuthFailed | Self::StGenerationFailed | Self::PluginFailed => {
                StatusCode::BAD_GATEWAY
            }
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Whether a client may usefully retry the same request later.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::RateLimited
                | Self::ServiceUnavailable
                | Self::StApiUnavailable
                | Self::StApiRateLimited
                | Self::Timeout
        )
    }

    /// The code for a bare status produced outside a handler (by a layer or the router).
    pub fn from_status(status: StatusCode) -> Self {
        match status.as_u16() {
            400 => Self::ValidationError,
            401 => Self::Unauthenticated,
            403 => Self::Forbidden,
            404 => Self::NotFound,
            405 => Self::MethodNotAllowed,
            408 | 504 => Self::Timeout,
            409 => Self::VersionConflict,
            413 => Self::PayloadTooLarge,
            415 => Self::UnsupportedMediaType,
            422 => Self::CharacterInvalidData,
            429 => Self::RateLimited,
            502 => Self::StGenerationFailed,
            503 => Self::ServiceUnavailable,
            _ => Self::InternalServerError,
        }
    }
}

/// An error on a request path, rendered as the spec's envelope.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub details: Option<Value>,
    /// Sent as `Retry-After` (seconds, rounded up) when set.
    pub retry_after: Option<Duration>,
    /// Tells SDK clients not to retry (`x-should-retry: false`), e.g. while a breaker is open.
    pub no_retry: bool,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    /// An error with a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: None,
            retry_after: None,
            no_retry: false,
        }
    }

    /// Adds the envelope's `details`.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// Adds a `Retry-After`.
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// 400 naming the offending field and why.
    pub fn validation(field: &str, reason: impl Into<String>) -> Self {
        let reason = reason.into();
        Self::new(ErrorCode::ValidationError, format!("{field}: {reason}"))
            .with_details(json!({ "field": field, "reason": reason }))
    }

    /// 401 with a message saying what was wrong with the credentials.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthenticated, message)
    }

    /// 404 for a character that does not exist (or whose id is malformed).
    pub fn character_not_found(id: &str) -> Self {
        Self::new(
            ErrorCode::CharacterNotFound,
            format!("character {id} does not exist"),
        )
    }

    /// 403 for a character the caller may not see or change.
    pub fn character_access_denied(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::CharacterAccessDenied, message)
    }

    /// 404 for any other missing resource.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    /// 500; the cause is logged, not sent.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            ErrorCode::InternalServerError,
            "internal server error; the request id identifies it in the server log",
        )
    }

    /// The JSON envelope for this error.
    pub fn envelope(&self, request_id: &str) -> Value {
        let envelope = ErrorEnvelope {
            error: ErrorBody {
                code: self.code.as_str().to_string(),
                message: self.message.clone(),
                details: self.details.clone(),
                timestamp: crate::time::now_rfc3339(),
                request_id: request_id.to_string(),
            },
        };
        // Plain strings and a Value: serializing cannot fail.
        serde_json::to_value(envelope).unwrap_or(Value::Null)
    }
}

/// The spec's error envelope, exactly as sent with every 4xx/5xx.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

/// The envelope's `error` object.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// A code from the README's error table, e.g. `VALIDATION_ERROR`.
    pub code: String,
    /// What went wrong, for a person.
    pub message: String,
    /// Machine-readable context (`field`, `currentVersion`, …) when there is any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
    /// RFC 3339 UTC.
    pub timestamp: String,
    /// The request's `x-request-id`.
    pub request_id: String,
}

/// Marker put on responses whose body already is an envelope, so the outer error layer leaves
/// them alone.
#[derive(Debug, Clone, Copy)]
pub struct EnvelopeMarker;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let request_id = crate::http::request_id::current();
        let body = self.envelope(&request_id);
        let mut response = (self.code.status(), axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(after) = self.retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if self.no_retry {
            headers.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        if self.code == ErrorCode::Unauthenticated {
            headers.insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        response.extensions_mut().insert(EnvelopeMarker);
        response.extensions_mut().insert(self);
        response
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(err: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match err {
            StoreError::NotFound(id) => Self::character_not_found(&id),
            StoreError::VersionConflict { current } => Self::new(
                ErrorCode::VersionConflict,
                format!("version is stale: the character is now at version {current}; reload it and retry"),
            )
            .with_details(json!({ "currentVersion": current })),
            StoreError::SlugTaken(slug) => Self::validation("slug", format!("{slug} is already taken")),
            StoreError::QuotaExceeded { limit } => Self::new(
                ErrorCode::CharacterQuotaExceeded,
                format!("character limit reached: at most {limit} characters per user"),
            )
            .with_details(json!({ "limit": limit })),
            other => Self::internal(other),
        }
    }
}

impl From<crate::cards::CardError> for ApiError {
    fn from(err: crate::cards::CardError) -> Self {
        let code = if err.is_too_large() {
            ErrorCode::PayloadTooLarge
        } else if matches!(err, crate::cards::CardError::Write(_)) {
            return Self::internal(err);
        } else {
            ErrorCode::CharacterInvalidData
        };
        Self::new(code, err.to_string())
    }
}
