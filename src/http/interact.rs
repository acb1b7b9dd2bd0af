//! `POST /api/characters/{id}/interact` (JSON, or SSE when `parameters.stream` is true or the
//! client accepts `text/event-stream`), `POST /api/conversations/{cid}/regenerate`, and the
//! admin view of the upstreams.
//!
//! SSE framing: `event: chunk` / `data: {"delta":"…"}` per delta, then `event: done` with the
//! full CharacterInteractionResponse, or `event: error` with the error envelope; `: keepalive`
//! comments every 15 s. Headers are sent at once and the body is never compressed.

use super::extract::{Auth, JsonBody};
use super::AppState;
use crate::error::{ApiError, ErrorCode};
use crate::interact::{request_hash, GenEvent, InteractParams, Prepared, TurnInput};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::time::Duration;

/// The spec's CharacterInteractionRequest.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = CharacterInteractionRequest)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InteractRequest {
    message: String,
    conversation_id: Option<String>,
    /// The client's view of the context; the stored conversation is the truth, so only its
    /// `conversationId` is used when the top-level one is absent.
    context: Option<Value>,
    #[serde(default)]
    parameters: InteractParams,
}

/// Body of a regenerate call.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegenerateRequest {
    #[serde(default)]
    parameters: InteractParams,
}

fn wants_sse(headers: &HeaderMap, params: &InteractParams) -> bool {
    params.stream
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/event-stream"))
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim().to_string()))
            .map_err(|_| ApiError::validation("Idempotency-Key", "must be visible ASCII")),
    }
}

/// `POST /api/characters/{id}/interact`.
#[utoipa::path(
    post,    operation_id = "interact",

    path = "/api/characters/{id}/interact",
    tag = "interact",
    params(("id" = String, Path, description = "Character id (UUID v7)"), ("Idempotency-Key" = Option<String>, Header, description = "replays the stored reply of a repeated JSON request")),
    request_body = InteractRequest,
    responses((status = 200, description = "The reply (`CharacterInteractionResponse`), or with `parameters.stream` / `Accept: text/event-stream` an SSE stream of `delta`, `done` and `error` events", content((serde_json::Value = "application/json"), (String = "text/event-stream"))), (status = 400, description = "invalid parameter or body; details.field names it", body = crate::error::ErrorEnvelope), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 403, description = "not a viewer of the character", body = crate::error::ErrorEnvelope), (status = 404, description = "no such character (or not visible to the caller)", body = crate::error::ErrorEnvelope), (status = 429, description = "rate limited (Retry-After)", body = crate::error::ErrorEnvelope), (status = 502, description = "upstream or plugin failure", body = crate::error::ErrorEnvelope), (status = 503, description = "upstream unavailable or circuit open (Retry-After)", body = crate::error::ErrorEnvelope), (status = 504, description = "upstream deadline passed", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn interact(
    State(state): State<AppState>,
    Auth(user): Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<InteractRequest>,
) -> Result<Response, ApiError> {
    let conversation_id = body.conversation_id.clone().or_else(|| {
        body.context
            .as_ref()
            .and_then(|c| c.get("conversationId"))
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    let sse = wants_sse(&headers, &body.parameters);
    let input = TurnInput {
        character_id: id.clone(),
        message: body.message,
        conversation_id,
        params: body.parameters,
        idempotency_key: idempotency_key(&headers)?,
    };
    let service = &state.interact;
    if input.params.dry_run {
        let p = service.prepare_turn(&user, &input).await?;
        return Ok(Json(service.dry_run_json(&p)).into_response());
    }
    // Streams cannot be replayed, so idempotency applies to whole (JSON) replies.
    let idempotency = match (&input.idempotency_key, sse) {
        (Some(key), false) => {
            let hash = request_hash(&[
                &id,
                &input.message,
                input.conversation_id.as_deref().unwrap_or(""),
                &format!("{:?}", input.params),
            ]);
            let (found, guard) = service.idempotency_begin(&user, key, hash).await?;
            if let Some(stored) = found {
                let mut r = Json(stored).into_response();
                r.headers_mut()
                    .insert("idempotent-replayed", HeaderValue::from_static("true"));
                return Ok(r);
            }
            Some((key.clone(), hash, guard))
        }
        _ => None,
    };
    let prepared = service.prepare_turn(&user, &input).await?;
    if sse {
        return Ok(sse_response(state.clone(), prepared).await);
    }
    let response = service.run(prepared).await?;
    if let Some((key, hash, _guard)) = idempotency {
        service
            .idempotency_store(&user, &key, hash, &response)
            .await?;
    }
    Ok(Json(response).into_response())
}

/// `POST /api/conversations/{cid}/regenerate`: a new swipe for the last reply.
#[utoipa::path(
    post,    operation_id = "regenerate",

    path = "/api/conversations/{cid}/regenerate",
    tag = "interact",
    params(("cid" = String, Path, description = "Conversation id")),
    request_body = RegenerateRequest,
    responses((status = 200, description = "A new swipe of the last reply (JSON or SSE like interact)", content((serde_json::Value = "application/json"), (String = "text/event-stream"))), (status = 400, description = "invalid parameter or body; details.field names it", body = crate::error::ErrorEnvelope), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 404, description = "no such conversation for this user", body = crate::error::ErrorEnvelope), (status = 429, description = "rate limited (Retry-After)", body = crate::error::ErrorEnvelope), (status = 502, description = "upstream or plugin failure", body = crate::error::ErrorEnvelope), (status = 503, description = "upstream unavailable or circuit open (Retry-After)", body = crate::error::ErrorEnvelope), (status = 504, description = "upstream deadline passed", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn regenerate(
    State(state): State<AppState>,
    Auth(user): Auth,
    Path(cid): Path<String>,
    headers: HeaderMap,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    // The body is optional: an empty one regenerates with default parameters.
    let bytes = super::extract::body_bytes(req, &state).await?;
    let params = if bytes.iter().all(u8::is_ascii_whitespace) {
        InteractParams::default()
    } else {
        if !super::extract::is_json(&headers) {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                "expected content-type: application/json",
            ));
        }
        super::extract::parse_json::<RegenerateRequest>(&bytes)?.parameters
    };
    let prepared = state
        .interact
        .prepare_regenerate(&user, &cid, &params)
        .await?;
    if params.dry_run {
        return Ok(Json(state.interact.dry_run_json(&prepared)).into_response());
    }
    if wants_sse(&headers, &params) {
        return Ok(sse_response(state.clone(), prepared).await);
    }
    Ok(Json(state.interact.run(prepared).await?).into_response())
}

/// An SSE `chunk` event's data, serialized straight from the delta (no JSON tree per delta).
#[derive(serde::Serialize)]
struct DeltaData<'a> {
    delta: &'a str,
}

async fn sse_response(state: AppState, prepared: Prepared) -> Response {
    let (rx, cancel) = state.interact.start_stream(prepared).await;
    let request_id = crate::http::request_id::current();
    // Dropping the response body (the client went away) drops the guard, which cancels the
    // generation and with it the upstream request.
    let guard = cancel.drop_guard();
    let stream = futures_util::stream::unfold(
        (rx, guard, request_id, false),
        |(mut rx, guard, rid, finished)| async move {
            if finished {
                return None;
            }
            let (event, done) = match rx.recv().await? {
                GenEvent::Delta(d) => (
                    Event::default()
                        .event("chunk")
                        .json_data(DeltaData { delta: &d }),
                    false,
                ),
                GenEvent::Done(v) => (Event::default().event("done").json_data(v), true),
                GenEvent::Error(e) => (
                    Event::default().event("error").json_data(e.envelope(&rid)),
                    true,
                ),
                // Only sent after a cancel, when the client is already gone.
                GenEvent::Cancelled(_) => return None,
            };
            let event = event.unwrap_or_else(|_| Event::default().event("error").data("{}"));
            Some((Ok::<_, Infallible>(event), (rx, guard, rid, done)))
        },
    );
    let mut response = Sse::new(stream)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(15))
                .text("keepalive"),
        )
        .into_response();
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// `GET /api/admin/upstreams`: breaker state per upstream (admin only).
#[utoipa::path(
    get,    operation_id = "adminUpstreams",

    path = "/api/admin/upstreams",
    tag = "ops",
    responses((status = 200, description = "`{upstreams: [UpstreamStatus]}`", body = serde_json::Value), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 403, description = "admin only", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn admin_upstreams(
    State(state): State<AppState>,
    Auth(user): Auth,
) -> Result<Json<Value>, ApiError> {
    if !user.admin {
        return Err(ApiError::new(ErrorCode::Forbidden, "admin only"));
    }
    Ok(Json(
        json!({ "upstreams": state.interact.upstreams().status() }),
    ))
}
