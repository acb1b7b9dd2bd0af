//! Operations endpoints: `/healthz` (alive), `/readyz` (store answers and an upstream is
//! usable), `/metrics` (Prometheus text, unauthenticated) and `POST /api/admin/backup` (a
//! consistent snapshot of the database, streamed).

use super::extract::Auth;
use super::AppState;
use crate::error::{ApiError, ErrorCode};
use crate::metrics::Snapshot;
use crate::upstream::BreakerState;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::atomic::Ordering;
use tokio::io::AsyncReadExt;

/// `GET /healthz`: 200 once the server takes requests.
#[utoipa::path(
    get,    operation_id = "healthz",

    path = "/healthz",
    tag = "ops",
    responses((status = 200, description = "`{status: \"ok\"}`", body = serde_json::Value), (status = 503, description = "starting up", body = crate::error::ErrorEnvelope))
)]
pub async fn healthz(State(state): State<AppState>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        (
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ok"})),
        )
            .into_response()
    } else {
        ApiError::new(ErrorCode::ServiceUnavailable, "starting up").into_response()
    }
}

/// `GET /readyz`: 200 when the store answers a read and at least one upstream's circuit
/// breaker is not open; otherwise 503 naming what is wrong.
#[utoipa::path(
    get,    operation_id = "readyz",

    path = "/readyz",
    tag = "ops",
    responses((status = 200, description = "`{status: \"ready\"}`", body = serde_json::Value), (status = 503, description = "store does not answer or every upstream circuit is open", body = crate::error::ErrorEnvelope))
)]
pub async fn readyz(State(state): State<AppState>) -> Response {
    if !state.ready.load(Ordering::Acquire) {
        return ApiError::new(
            ErrorCode::ServiceUnavailable,
            "starting up or shutting down",
        )
        .into_response();
    }
    let store = state.characters.store().clone();
    let store_ok = match tokio::task::spawn_blocking(move || store.ping()).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: store read failed");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "readiness: store task failed");
            false
        }
    };
    let upstreams = state.upstreams.status();
    let usable = upstreams.iter().any(|u| u.state != BreakerState::Open);
    let open: Vec<&str> = upstreams
        .iter()
        .filter(|u| u.state == BreakerState::Open)
        .map(|u| u.name.as_str())
        .collect();
    if store_ok && usable {
        return (
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ready"})),
        )
            .into_response();
    }
    let message = if !store_ok {
        "not ready: the database does not answer; see the server log"
    } else {
        "not ready: every upstream's circuit breaker is open; check the upstreams"
    };
    ApiError::new(ErrorCode::ServiceUnavailable, message)
        .with_details(serde_json::json!({ "store": store_ok, "openUpstreams": open }))
        .into_response()
}

/// `GET /metrics`: Prometheus text exposition format.
#[utoipa::path(
    get,    operation_id = "metrics",

    path = "/metrics",
    tag = "ops",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain"))
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let breakers: Vec<_> = state
        .upstreams
        .status()
        .into_iter()
        .map(|s| (s.name, s.state))
        .collect();
    let counters = state.upstreams.counters();
    let upstreams: Vec<(String, BreakerState, u64, u64)> = breakers
        .into_iter()
        .map(|(name, st)| {
            let (a, r) = counters
                .iter()
                .find(|(n, _, _)| *n == name)
                .map(|(_, a, r)| (*a, *r))
                .unwrap_or((0, 0));
            (name, st, a, r)
        })
        .collect();
    let snap = Snapshot {
        cache: state.characters.store().cache_stats(),
        upstreams: &upstreams,
    };
    match state.metrics.render(&snap) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError::internal(format!("cannot encode metrics: {e}")).into_response(),
    }
}

/// `POST /api/admin/backup` (admin only): streams a redb file holding one consistent snapshot
/// of every table. Writes continue while it is made.
#[utoipa::path(
    post,    operation_id = "backup",

    path = "/api/admin/backup",
    tag = "ops",
    responses((status = 200, description = "A redb file with one consistent snapshot", content_type = "application/octet-stream"), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 403, description = "admin only", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn backup(State(state): State<AppState>, Auth(user): Auth) -> Result<Response, ApiError> {
    if !user.admin {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "backup needs an admin token (role: admin)",
        ));
    }
    let store = state.characters.store().clone();
    let tmp = state
        .config
        .data_dir
        .join(format!("backup-{}.redb.tmp", uuid::Uuid::now_v7()));
    let path = tmp.clone();
    let rows = tokio::task::spawn_blocking(move || store.snapshot_to(&path))
        .await
        .map_err(ApiError::internal)?;
    let rows = match rows {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(ApiError::internal(format!("backup failed: {e}")));
        }
    };
    let file = tokio::fs::File::open(&tmp).await;
    // The open handle keeps the data readable; unlinking now means no temp file outlives a
    // client that disconnects mid-download.
    let _ = tokio::fs::remove_file(&tmp).await;
    let file = file.map_err(ApiError::internal)?;
    let len = file.metadata().await.map(|m| m.len()).ok();
    tracing::info!(rows, bytes = len.unwrap_or(0), admin = %user.id, "backup snapshot sent");
    let stream = futures_util::stream::unfold(file, |mut file| async move {
        let mut buf = vec![0u8; 64 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"taproom-backup.redb\""),
    );
    if let Some(len) = len {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    Ok(response)
}
