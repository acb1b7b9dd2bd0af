//! Extractors that turn every bad input into the spec's envelope: JSON bodies whose errors name
//! the field, and the authenticated caller.

use super::AppState;
use crate::auth::User;
use crate::error::{ApiError, ErrorCode};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

/// A JSON body; wrong content type → 415, bad JSON or field types → 400 naming the field,
/// too large → 413.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                "expected content-type: application/json",
            ));
        }
        let bytes = body_bytes(req, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Whether the request declares a JSON body.
pub fn is_json(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| {
            let m = m.trim().to_ascii_lowercase();
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        })
        .unwrap_or(false)
}

/// Reads the whole body within the configured limit.
pub async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state)
        .await
        .map_err(|e: BytesRejection| {
            if e.status() == http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    "request body is larger than the configured limit",
                )
            } else {
                ApiError::validation("body", format!("cannot read request body: {e}"))
            }
        })
}

/// Whether the request body is multipart/form-data.
pub fn is_multipart(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"))
}

/// Maps a multipart failure: an over-limit body is 413, anything else 400.
pub fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    if e.status() == http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            "request body is larger than the configured limit",
        )
    } else {
        ApiError::validation("body", format!("bad multipart body: {e}"))
    }
}

/// Uploaded files as (file name, bytes): the raw body as one file, or every multipart part
/// whose field name is in `fields`. Other parts are ignored.
pub async fn uploads<S: Send + Sync>(
    req: Request,
    state: &S,
    fields: &[&str],
) -> Result<Vec<(String, Vec<u8>)>, ApiError> {
    if !is_multipart(req.headers()) {
        let bytes = body_bytes(req, state).await?;
        return Ok(vec![("body".to_string(), bytes.to_vec())]);
    }
    let mut multipart = axum::extract::Multipart::from_request(req, state)
        .await
        .map_err(|e| ApiError::validation("body", format!("bad multipart body: {e}")))?;
    let mut files = Vec::new();
    while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
        if !field.name().is_some_and(|n| fields.contains(&n)) {
            continue;
        }
        let name = field.file_name().unwrap_or("upload").to_string();
        files.push((name, field.bytes().await.map_err(multipart_error)?.to_vec()));
    }
    if files.is_empty() {
        return Err(ApiError::validation(
            fields.first().copied().unwrap_or("file"),
            format!("multipart body needs a part named {}", fields.join(" or ")),
        ));
    }
    Ok(files)
}

/// Parses JSON, naming the offending field on error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // The plain parse is the common case and costs less; the path-tracking one runs only to
    // name the field in an error.
    let first = match serde_json::from_slice(bytes) {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        // The value itself parsed, so what failed was the input after it.
        Ok(_) => Err(ApiError::validation(
            "body",
            format!("malformed JSON: {first}"),
        )),
        Err(err) => {
            let path = err.path().to_string();
            let inner = err.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                Err(ApiError::validation(
                    "body",
                    format!("malformed JSON: {inner}"),
                ))
            } else if path.is_empty() || path == "." {
                Err(ApiError::validation("body", inner.to_string()))
            } else {
                Err(ApiError::validation(&path, inner.to_string()))
            }
        }
    }
}

/// The authenticated caller; missing or bad credentials → 401.
pub struct Auth(pub User);

/// The caller if a token was sent; a token that is sent but bad still → 401.
pub struct MaybeAuth(pub Option<User>);

impl FromRequestParts<AppState> for MaybeAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // The rate limiter already verified this token; don't verify it twice.
        if let Some(super::rate_limit::VerifiedUser(user)) = parts.extensions.get() {
            tracing::Span::current().record("user", user.id.as_str());
            return Ok(MaybeAuth(Some(user.clone())));
        }
        let Some(value) = parts.headers.get(http::header::AUTHORIZATION) else {
            return Ok(MaybeAuth(None));
        };
        let value = value
            .to_str()
            .map_err(|_| ApiError::unauthenticated("authorization header is not valid text"))?;
        let token = bearer(value).ok_or_else(|| {
            ApiError::unauthenticated("authorization header must be `Bearer <token>`")
        })?;
        let user = state
            .auth
            .verify(token)
            .map_err(ApiError::unauthenticated)?;
        tracing::Span::current().record("user", user.id.as_str());
        Ok(MaybeAuth(Some(user)))
    }
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match MaybeAuth::from_request_parts(parts, state).await? {
            MaybeAuth(Some(user)) => Ok(Auth(user)),
            MaybeAuth(None) => Err(ApiError::unauthenticated(
                "missing authorization header: send `Authorization: Bearer <jwt>`",
            )),
        }
    }
}

/// The token of a `Bearer` authorization value (scheme case-insensitive).
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}
