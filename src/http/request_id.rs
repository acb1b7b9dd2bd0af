//! The outermost layer: gives every request an id (the client's `x-request-id` or a new one),
//! echoes it on every response, and turns any error response that is not already the spec's
//! envelope (the router's 404/405, the body limit's 413, a timeout, a caught panic) into one.

use crate::error::{ApiError, EnvelopeMarker, ErrorCode};
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, Version};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Header carrying the request id both ways.
pub const HEADER: &str = "x-request-id";

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being served on this task ("" outside a request).
pub fn current() -> String {
    REQUEST_ID.try_with(|id| id.clone()).unwrap_or_default()
}

/// Runs `fut` with `id` as the current request id. Not an `async fn`: that would hold `fut`
/// twice (its argument and the scoped future it awaits), and `fut` is a whole request.
pub fn scope<F: std::future::Future>(
    id: String,
    fut: F,
) -> tokio::task::futures::TaskLocalFuture<String, F> {
    REQUEST_ID.scope(id, fut)
}

/// The client's id when it is usable, else a new one.
pub fn from_request(headers: &http::HeaderMap) -> String {
    headers
        .get(HEADER)
        .and_then(usable)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}

fn usable(id: &HeaderValue) -> Option<String> {
    let s = id.to_str().ok()?;
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    ok.then(|| s.to_string())
}

/// Middleware: request id, envelope normalisation, 204 preflights.
pub async fn layer(mut req: Request, next: Next) -> Response {
    let id = from_request(req.headers());
    if let Ok(v) = HeaderValue::from_str(&id) {
        req.headers_mut().insert(HEADER, v);
    }
    let http1 = req.version() <= Version::HTTP_11;
    let is_preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = REQUEST_ID
        .scope(id.clone(), async move {
            let response = next.run(req).await;
            normalize(response)
        })
        .await;
    if is_preflight && response.status() == StatusCode::OK {
        *response.status_mut() = StatusCode::NO_CONTENT;
        *response.body_mut() = Body::empty();
    }
    stamp(&mut response, &id, http1);
    response
}

/// Echoes the id on a response, and on HTTP/1 tells the client a 413 closes the connection.
pub fn stamp(response: &mut Response, id: &str, http1: bool) {
    if let Ok(v) = HeaderValue::from_str(id) {
        response.headers_mut().insert(HEADER, v);
    }
    // A 413 is answered before the body is read; the server then drops the connection, so tell
    // the client not to reuse it (a pooled client would otherwise race the close).
    if http1 && response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        response
            .headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// Turns a bare error response (one a layer or the router produced) into the spec's envelope.
pub fn normalize(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error())
        || response.extensions().get::<EnvelopeMarker>().is_some()
    {
        return response;
    }
    let code = ErrorCode::from_status(status);
    let message = match code {
        ErrorCode::NotFound => "no such route; see /openapi.json for the API".to_string(),
        ErrorCode::MethodNotAllowed => {
            "method not allowed on this route; the allow header lists the methods".to_string()
        }
        ErrorCode::PayloadTooLarge => "request body is larger than the configured limit".into(),
        ErrorCode::Timeout => "the request took longer than the configured timeout".into(),
        ErrorCode::InternalServerError => {
            "internal server error; the request id identifies it in the server log".into()
        }
        _ => status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_lowercase(),
    };
    let allow = response.headers().get(http::header::ALLOW).cloned();
    let mut out = ApiError::new(code, message).into_response();
    *out.status_mut() = status;
    if let Some(allow) = allow {
        out.headers_mut().insert(http::header::ALLOW, allow);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_ids_are_replaced() {
        assert!(usable(&HeaderValue::from_static("abc-123")).is_some());
        assert!(usable(&HeaderValue::from_static("a b")).is_none());
        assert!(usable(&HeaderValue::from_static("")).is_none());
    }
}
