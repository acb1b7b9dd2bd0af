//! The OpenAI-compatible surface, so an unmodified NextChat (`BASE_URL` = Taproom's origin), the
//! OpenAI SDKs and SillyTavern's "Custom (OpenAI-compatible)" source can talk to characters:
//! `GET /v1/models`, `POST /v1/chat/completions`, and `GET /api/nextchat/custom-models`.
//!
//! A `char-<slug>` (or `char-<uuid>`) model routes to that character, and Taproom's stored
//! conversation is the truth: only the last user message of the request is used. NextChat's
//! background requests (auto-title, memory summary) are answered by the upstream directly and
//! never stored. Any other model id is passed through to the default upstream unchanged.

use super::AppState;
use crate::auth::User;
use crate::error::{ApiError, ErrorCode};
use crate::interact::{upstream_error, GenEvent, InteractParams, Prepared, TurnInput};
use crate::model::TokenUsage;
use crate::store::{CharacterQuery, CharacterSort, Scope};
use crate::upstream::{ChatMessage, GenParams, GenerateRequest, StreamEvent};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::time::Duration;

/// `[openai]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiConfig {
    /// Pass non-character models through to the default upstream.
    pub passthrough: bool,
    /// When non-empty, only these model ids are passed through.
    pub passthrough_models: Vec<String>,
    /// Shared bearer keys (a service key, or NextChat's `nk-<code>`), stored as SHA-256 hex of
    /// the whole bearer value, each mapped to one user.
    pub keys: Vec<SharedKey>,
}

/// One shared key mapped to a user.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedKey {
    /// Lowercase hex SHA-256 of the bearer value (`echo -n 'nk-code' | sha256sum`).
    pub sha256: String,
    /// The user id the key acts as.
    pub user: String,
    /// Whether that user is an admin.
    #[serde(default)]
    pub admin: bool,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            passthrough: true,
            passthrough_models: Vec::new(),
            keys: Vec::new(),
        }
    }
}

/// The request body fields Taproom reads; everything else (tools, penalties, …) is tolerated.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = ChatCompletionRequest)]
struct ChatRequest {
    model: String,
    #[serde(default)]
    messages: Vec<Value>,
    #[serde(default)]
    stream: bool,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    stop: Option<Value>,
}

/// What routes a request: the model, and whether the answer streams.
#[derive(Debug, Deserialize)]
struct Target {
    model: String,
    #[serde(default)]
    stream: bool,
}

/// An error in OpenAI's shape plus the spec's fields.
fn openai_error(err: &ApiError) -> Response {
    let request_id = super::request_id::current();
    let env = err.envelope(&request_id);
    let status = err.code.status();
    let kind = match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "invalid_request_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    };
    let code = match err.code {
        ErrorCode::Unauthenticated => "invalid_api_key".to_string(),
        ErrorCode::CharacterNotFound | ErrorCode::NotFound => "model_not_found".to_string(),
        other => other.as_str().to_lowercase(),
    };
    let mut body = json!({"error": {
        "message": err.message,
        "type": kind,
        "code": code,
        "param": Value::Null,
        "taproomCode": err.code.as_str(),
        "timestamp": env["error"]["timestamp"],
        "requestId": request_id,
    }});
    if let Some(d) = &err.details {
        body["error"]["details"] = d.clone();
    }
    let mut r = (status, axum::Json(body)).into_response();
    // The spec envelope's headers (Retry-After, WWW-Authenticate, x-should-retry) carry over.
    let enveloped = err.clone().into_response();
    for name in [header::RETRY_AFTER, header::WWW_AUTHENTICATE] {
        if let Some(v) = enveloped.headers().get(&name) {
            r.headers_mut().insert(name, v.clone());
        }
    }
    if let Some(v) = enveloped.headers().get("x-should-retry") {
        r.headers_mut().insert("x-should-retry", v.clone());
    }
    r.extensions_mut().insert(crate::error::EnvelopeMarker);
    r
}

/// The caller: a JWT, or a configured shared key (service key / NextChat access code).
fn caller(state: &AppState, headers: &HeaderMap) -> Result<User, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::unauthenticated(
                "missing API key: use your Taproom JWT as the OpenAI API key (Authorization: Bearer <jwt>)",
            )
        })?;
    let token = super::extract::bearer(value)
        .ok_or_else(|| ApiError::unauthenticated("authorization header must be `Bearer <key>`"))?;
    if token == "undefined" || token == "null" {
        return Err(ApiError::unauthenticated(
            "no API key was set in the client (it sent `Bearer undefined`); paste your Taproom JWT as the API key",
        ));
    }
    let keys = &state.config.openai.keys;
    if !keys.is_empty() {
        let digest = hex(&Sha256::digest(token.as_bytes()));
        if let Some(k) = keys.iter().find(|k| k.sha256.eq_ignore_ascii_case(&digest)) {
            return Ok(User {
                id: k.user.clone(),
                admin: k.admin,
                name: None,
            });
        }
    }
    if token.starts_with("nk-") {
        return Err(ApiError::unauthenticated(
            "this NextChat access code is not mapped to a Taproom user (openai.keys)",
        ));
    }
    state.auth.verify(token).map_err(|why| {
        ApiError::unauthenticated(format!("API key is not a valid Taproom token: {why}"))
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Text of an OpenAI message content: a string or an array of parts (text parts joined).
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// Roles Taproom forwards for background requests (`developer` is `system`, `tool` is `user`).
fn plain_role(role: &str) -> &'static str {
    match role {
        "system" | "developer" => "system",
        "assistant" => "assistant",
        _ => "user",
    }
}

/// NextChat's auto-title and memory-summary requests (see NEXTCHAT.md).
fn is_background(messages: &[Value]) -> bool {
    let Some(last) = messages.last() else {
        return false;
    };
    let text = content_text(&last["content"]).to_lowercase();
    (text.contains("title")
        && (text.contains("four to five word") || text.contains("summarizing our conversation")))
        || (text.contains("summarize the discussion") && text.contains("200 words"))
}

fn visible_characters(
    state: &AppState,
    user: &User,
) -> Result<Vec<std::sync::Arc<crate::model::Character>>, ApiError> {
    let q = CharacterQuery {
        owner: user.id.clone(),
        scope: Scope::All,
        search: None,
        tags: Vec::new(),
        sort: CharacterSort::Name,
        descending: false,
        limit: 1000,
        offset: 0,
    };
    let (page, _) = state.characters.store().list_characters(&q)?;
    Ok(page.into_iter().filter(|c| c.is_active).collect())
}

/// The model id of a character.
pub fn model_id(c: &crate::model::Character) -> String {
    match &c.slug {
        Some(slug) => format!("char-{slug}"),
        None => format!("char-{}", c.id),
    }
}

/// `GET /v1/models`.
#[utoipa::path(
    get,    operation_id = "listModels",

    path = "/v1/models",
    tag = "openai",
    responses((status = 200, description = "OpenAI model list: `char-<slug>` per visible character, plus passthrough models", body = serde_json::Value), (status = 401, description = "OpenAI-shaped error", body = serde_json::Value)),
    security(("bearer" = []))
)]
pub async fn models(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let user = match caller(&state, &headers) {
        Ok(u) => u,
        Err(e) => return openai_error(&e),
    };
    let chars = match visible_characters(&state, &user) {
        Ok(c) => c,
        Err(e) => return openai_error(&e),
    };
    let mut data: Vec<Value> = chars
        .iter()
        .map(|c| {
            json!({
                "id": model_id(c),
                "object": "model",
                "created": crate::time::rfc3339_to_ms(&c.created_at) / 1000,
                "owned_by": c.creator_id,
                "name": c.name,
            })
        })
        .collect();
    if state.config.openai.passthrough {
        let mut seen = std::collections::BTreeSet::new();
        for u in state.config.upstreams.upstreams.values() {
            let allowed = state.config.openai.passthrough_models.is_empty()
                || state.config.openai.passthrough_models.contains(&u.model);
            if allowed && seen.insert(u.model.clone()) {
                data.push(
                    json!({"id": u.model, "object": "model", "created": 0, "owned_by": "upstream"}),
                );
            }
        }
        for m in &state.config.openai.passthrough_models {
            if seen.insert(m.clone()) {
                data.push(
                    json!({"id": m, "object": "model", "created": 0, "owned_by": "upstream"}),
                );
            }
        }
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /api/nextchat/custom-models`: NextChat's `CUSTOM_MODELS` and `DEFAULT_MODEL` values.
#[utoipa::path(
    get,    operation_id = "nextchatCustomModels",

    path = "/api/nextchat/custom-models",
    tag = "openai",
    responses((status = 200, description = "`{customModels, defaultModel, env}` for NextChat's CUSTOM_MODELS / DEFAULT_MODEL", body = serde_json::Value), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn custom_models(
    State(state): State<AppState>,
    super::extract::Auth(user): super::extract::Auth,
) -> Result<axum::Json<Value>, ApiError> {
    let chars = visible_characters(&state, &user)?;
    let clean = |s: &str| s.replace([',', '=', '@', '+'], " ").trim().to_string();
    let mut parts = vec!["-all".to_string()];
    for c in &chars {
        parts.push(format!("+{}@openai={}", model_id(c), clean(&c.name)));
    }
    let default = chars.first().map(|c| format!("{}@openai", model_id(c)));
    Ok(axum::Json(json!({
        "customModels": parts.join(","),
        "defaultModel": default,
        "env": format!(
            "CUSTOM_MODELS={}\nDEFAULT_MODEL={}",
            parts.join(","),
            default.clone().unwrap_or_default()
        ),
    })))
}

/// `POST /v1/chat/completions`.
#[utoipa::path(
    post,    operation_id = "chatCompletions",

    path = "/v1/chat/completions",
    tag = "openai",
    request_body = ChatRequest,
    responses((status = 200, description = "OpenAI chat completion, or with `stream: true` `chat.completion.chunk` SSE ending in `[DONE]`", content((serde_json::Value = "application/json"), (String = "text/event-stream"))), (status = 400, description = "OpenAI-shaped error with `taproomCode`", body = serde_json::Value), (status = 401, description = "OpenAI-shaped error", body = serde_json::Value), (status = 404, description = "unknown model", body = serde_json::Value), (status = 502, description = "upstream failure", body = serde_json::Value)),
    security(("bearer" = []))
)]
pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    complete(&state, &headers, body).await
}

/// The chat completion for a read body, errors in the OpenAI shape; the fast path calls it
/// directly.
pub async fn complete(state: &AppState, headers: &HeaderMap, body: Bytes) -> Response {
    match chat(state, headers, body).await {
        Ok(r) => r,
        Err(e) => openai_error(&e),
    }
}

async fn chat(state: &AppState, headers: &HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let user = caller(state, headers)?;
    // Only the model and `stream` decide a passthrough, and the body goes upstream unchanged;
    // the whole request is read only for a character.
    let req: Target = super::extract::parse_json(&body)?;
    if let Some(rest) = req.model.strip_prefix("char-") {
        let full: ChatRequest = super::extract::parse_json(&body)?;
        // Boxed: the character path's state machine is large, and keeping it out of this
        // future spares every passthrough request copying it.
        return Box::pin(character_chat(state, headers, &user, rest, full)).await;
    }
    let cfg = &state.config.openai;
    if !cfg.passthrough
        || (!cfg.passthrough_models.is_empty() && !cfg.passthrough_models.contains(&req.model))
    {
        return Err(ApiError::not_found(format!(
            "model {} does not exist; characters are char-<slug> (see /v1/models)",
            req.model
        )));
    }
    let upstream = state
        .interact
        .upstreams()
        .get(None)
        .map_err(upstream_error)?;
    let resp = upstream
        .passthrough("chat/completions", body, req.stream)
        .await
        .map_err(upstream_error)?;
    let mut out = Response::builder().status(resp.status);
    for name in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
        if let Some(v) = resp.headers.get(&name) {
            out = out.header(name, v.clone());
        }
    }
    if req.stream {
        out = out.header("x-accel-buffering", "no");
    }
    out.body(Body::new(resp.body)).map_err(ApiError::internal)
}

fn stop_list(v: &Option<Value>) -> Option<Vec<String>> {
    match v {
        Some(Value::String(s)) => Some(vec![s.clone()]),
        Some(Value::Array(a)) => Some(
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect(),
        ),
        _ => None,
    }
}

async fn character_chat(
    state: &AppState,
    headers: &HeaderMap,
    user: &User,
    rest: &str,
    req: ChatRequest,
) -> Result<Response, ApiError> {
    let not_found = || {
        ApiError::new(
            ErrorCode::CharacterNotFound,
            format!("model char-{rest} is not a character you can use (see /v1/models)"),
        )
    };
    let id = match uuid::Uuid::parse_str(rest) {
        Ok(u) => u.as_u128(),
        Err(_) => state
            .characters
            .store()
            .character_by_slug(rest)?
            .ok_or_else(not_found)?,
    };
    let character_id = uuid::Uuid::from_u128(id).to_string();
    let character = state
        .interact
        .interactable(&character_id, user)
        .map_err(|e| {
            if e.code == ErrorCode::CharacterNotFound || e.code == ErrorCode::CharacterAccessDenied
            {
                not_found()
            } else {
                e
            }
        })?;
    let model = req.model.clone();
    let params = InteractParams {
        temperature: req.temperature,
        top_p: req.top_p,
        max_tokens: req.max_tokens.or(req.max_completion_tokens),
        stop: stop_list(&req.stop),
        ..InteractParams::default()
    };
    if is_background(&req.messages) {
        return background(state, &req, &model, params).await;
    }
    let message = req
        .messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .map(|m| content_text(&m["content"]))
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| ApiError::validation("messages", "needs a user message with text"))?;
    // Which stored conversation continues: the named one, a new one when the client's window
    // holds no earlier reply (only the greeting, if any), else the caller's latest.
    let named = headers
        .get("x-taproom-conversation")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let greetings: Vec<String> = std::iter::once(character.first_mes.clone())
        .chain(
            character
                .personality
                .alternate_greetings
                .iter()
                .flatten()
                .cloned(),
        )
        .collect();
    let user_name = user.name.clone().unwrap_or_else(|| "User".into());
    let char_name = crate::conversations::char_display_name(&character).to_string();
    let greeting_texts: Vec<String> = greetings
        .iter()
        .filter(|g| !g.trim().is_empty())
        .flat_map(|g| {
            [
                g.trim().to_string(),
                crate::conversations::greeting_macros(g, &char_name, &user_name)
                    .trim()
                    .to_string(),
            ]
        })
        .collect();
    let has_reply = req.messages.iter().any(|m| {
        m["role"] == "assistant"
            && !greeting_texts.contains(&content_text(&m["content"]).trim().to_string())
    });
    let conversation_id = match named {
        Some(c) => Some(c),
        None if has_reply => {
            let uid = user.id.clone();
            let store = state.characters.store().clone();
            crate::characters::blocking(move || store.latest_conversation(&uid, id))
                .await?
                .map(|c| uuid::Uuid::from_u128(c).to_string())
        }
        None => None,
    };
    let input = TurnInput {
        character_id,
        message,
        conversation_id,
        params,
        idempotency_key: None,
    };
    let prepared = state.interact.prepare_turn(user, &input).await?;
    let cid = prepared.conversation.id.clone();
    let mut response = if req.stream {
        stream_response(state, prepared, model).await
    } else {
        // Only the reply's text, finish reason and usage go out: the spec's interaction
        // response (its context and lorebook state) is never built here.
        let turn = state.interact.run_turn(prepared).await?;
        let m = &turn.message;
        let finish = m.finish_reason.as_deref().unwrap_or("stop");
        let usage = m.usage.unwrap_or_default();
        axum::Json(completion_json(&model, &m.content, finish, &usage)).into_response()
    };
    if let Ok(v) = HeaderValue::from_str(&cid) {
        response.headers_mut().insert("x-taproom-conversation", v);
    }
    Ok(response)
}

fn completion_id() -> String {
    format!("chatcmpl-{}", uuid::Uuid::now_v7().simple())
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

fn completion_json(model: &str, content: &str, finish: &str, usage: &TokenUsage) -> Value {
    json!({
        "id": completion_id(),
        "object": "chat.completion",
        "created": now_secs(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": openai_finish(finish),
        }],
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        },
    })
}

fn openai_finish(reason: &str) -> &str {
    match reason {
        "length" | "max_tokens" => "length",
        _ => "stop",
    }
}

fn chunk(id: &str, created: i64, model: &str, delta: Value, finish: Option<&str>) -> Bytes {
    let v = json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    });
    Bytes::from(format!("data: {v}\n\n"))
}

/// A stream's content-delta chunks, built around bytes that are the same for every chunk of the
/// stream, so a delta costs one string escape and one allocation (at 1,000 streams that is
/// ~46,000 deltas/s) instead of a JSON tree per delta.
struct DeltaFrames {
    prefix: Vec<u8>,
}

impl DeltaFrames {
    const SUFFIX: &'static [u8] = b"},\"finish_reason\":null}]}\n\n";

    fn new(id: &str, created: i64, model: &str) -> Self {
        let mut prefix = b"data: {\"id\":".to_vec();
        push_json_str(&mut prefix, id);
        prefix.extend_from_slice(b",\"object\":\"chat.completion.chunk\",\"created\":");
        prefix.extend_from_slice(created.to_string().as_bytes());
        prefix.extend_from_slice(b",\"model\":");
        push_json_str(&mut prefix, model);
        prefix.extend_from_slice(b",\"choices\":[{\"index\":0,\"delta\":{\"content\":");
        Self { prefix }
    }

    /// `data: {…"delta":{"content":text}…}` and the blank line ending the event.
    fn delta(&self, text: &str) -> Bytes {
        let mut b = Vec::with_capacity(self.prefix.len() + text.len() + 48);
        b.extend_from_slice(&self.prefix);
        push_json_str(&mut b, text);
        b.extend_from_slice(Self::SUFFIX);
        Bytes::from(b)
    }
}

/// Appends `s` as a JSON string literal.
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // Serializing a string into a Vec has no failure case (no I/O, no non-string keys).
    let _ = serde_json::to_writer(&mut *out, s);
}

fn sse_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// Streams a character reply as `chat.completion.chunk` events; an error mid-stream is sent as
/// an `{"error":…}` event and the stream still ends with `data: [DONE]`.
async fn stream_response(state: &AppState, prepared: Prepared, model: String) -> Response {
    let (rx, cancel) = state.interact.start_stream(prepared).await;
    let guard = cancel.drop_guard();
    let id = completion_id();
    let created = now_secs();
    let request_id = super::request_id::current();
    let first = chunk(
        &id,
        created,
        &model,
        json!({"role": "assistant", "content": ""}),
        None,
    );
    let head = futures_util::stream::once(async move { Ok::<_, Infallible>(first) });
    let frames = DeltaFrames::new(&id, created, &model);
    // Everything the events need lives in the unfold state: nothing is cloned per delta.
    let state = (rx, guard, false, (frames, id, model, request_id));
    let events =
        futures_util::stream::unfold(state, move |(mut rx, guard, finished, ctx)| async move {
            if finished {
                return None;
            }
            let (frames, id, model, request_id) = &ctx;
            let Some(ev) = rx.recv().await else {
                let end = Bytes::from_static(b"data: [DONE]\n\n");
                return Some((end, (rx, guard, true, ctx)));
            };
            let (bytes, done) = match ev {
                GenEvent::Delta(d) => (frames.delta(&d), false),
                GenEvent::Done(v) => {
                    let finish = v["response"]["metadata"]["finishReason"]
                        .as_str()
                        .unwrap_or("stop");
                    let mut b =
                        chunk(id, created, model, json!({}), Some(openai_finish(finish))).to_vec();
                    b.extend_from_slice(b"data: [DONE]\n\n");
                    (Bytes::from(b), true)
                }
                GenEvent::Error(e) => {
                    let env = e.envelope(request_id);
                    let err = json!({"error": {
                        "message": e.message,
                        "type": "api_error",
                        "code": e.code.as_str().to_lowercase(),
                        "taproomCode": e.code.as_str(),
                        "requestId": env["error"]["requestId"],
                    }});
                    (
                        Bytes::from(format!("data: {err}\n\ndata: [DONE]\n\n")),
                        true,
                    )
                }
                GenEvent::Cancelled(_) => (Bytes::from_static(b"data: [DONE]\n\n"), true),
            };
            Some((bytes, (rx, guard, done, ctx)))
        })
        .map(Ok::<_, Infallible>);
    let body = head.chain(keepalive(events));
    sse_headers(Response::new(Body::from_stream(body)))
}

/// Interleaves `: keepalive` comments every 15 s into a byte stream, ending with it.
fn keepalive<S>(inner: S) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>>
where
    S: futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
{
    let period = Duration::from_secs(15);
    let ticks = futures_util::stream::unfold(
        tokio::time::interval_at(tokio::time::Instant::now() + period, period),
        |mut i| async move {
            i.tick().await;
            Some((Some(Ok(Bytes::from_static(b": keepalive\n\n"))), i))
        },
    );
    // `None` marks the end of the inner stream; the ticker never ends by itself.
    let inner = inner
        .map(Some)
        .chain(futures_util::stream::once(async { None }));
    futures_util::stream::select(inner, ticks)
        .take_while(|item| futures_util::future::ready(item.is_some()))
        .filter_map(futures_util::future::ready)
}

/// Answers NextChat's title and summary requests through the upstream, out of character and
/// without storing anything.
async fn background(
    state: &AppState,
    req: &ChatRequest,
    model: &str,
    params: InteractParams,
) -> Result<Response, ApiError> {
    let upstream = state
        .interact
        .upstreams()
        .get(None)
        .map_err(upstream_error)?;
    let messages: Vec<ChatMessage> = req
        .messages
        .iter()
        .map(|m| {
            ChatMessage::new(
                plain_role(m["role"].as_str().unwrap_or("user")),
                content_text(&m["content"]),
            )
        })
        .collect();
    let request = GenerateRequest {
        character_id: String::new(),
        user_input: messages
            .last()
            .map(|m| m.content.clone())
            .unwrap_or_default(),
        messages,
        history: Vec::new(),
        params: GenParams {
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: None,
            max_tokens: params.max_tokens,
            stop: params.stop.unwrap_or_default(),
            model: None,
        },
        override_settings: None,
    };
    if !req.stream {
        let r = upstream.generate(&request).await.map_err(upstream_error)?;
        return Ok(axum::Json(completion_json(
            model,
            &r.content,
            &r.finish_reason,
            &r.usage.into(),
        ))
        .into_response());
    }
    let stream = upstream.stream(&request).await.map_err(upstream_error)?;
    let id = completion_id();
    let created = now_secs();
    let model = model.to_string();
    let first = chunk(
        &id,
        created,
        &model,
        json!({"role": "assistant", "content": ""}),
        None,
    );
    let body = futures_util::stream::once(async move { first }).chain(stream.map(move |ev| match ev {
        Ok(StreamEvent::Delta(d)) => chunk(&id, created, &model, json!({"content": d}), None),
        Ok(StreamEvent::Done(r)) => {
            let mut b = chunk(&id, created, &model, json!({}), Some(openai_finish(&r.finish_reason))).to_vec();
            b.extend_from_slice(b"data: [DONE]\n\n");
            Bytes::from(b)
        }
        Err(e) => {
            let err = json!({"error": {"message": e.message(), "type": "api_error", "code": e.spec_code().to_lowercase()}});
            Bytes::from(format!("data: {err}\n\ndata: [DONE]\n\n"))
        }
    }));
    Ok(sse_headers(Response::new(Body::from_stream(
        body.map(Ok::<_, Infallible>),
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_frames_are_the_chunk_json() {
        let frames = DeltaFrames::new("chatcmpl-1", 1_700_000_000, "char-\"q\"");
        let text = "line \"one\"\n\u{1F600} \\ end";
        let bytes = frames.delta(text);
        let body = std::str::from_utf8(&bytes).unwrap();
        let json = body
            .strip_prefix("data: ")
            .and_then(|b| b.strip_suffix("\n\n"))
            .unwrap();
        let got: Value = serde_json::from_str(json).unwrap();
        let want = json!({
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": "char-\"q\"",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}],
        });
        assert_eq!(got, want);
        assert!(!json.contains('\n'), "one SSE data line");
    }

    #[test]
    fn content_arrays_are_joined() {
        assert_eq!(content_text(&json!("hi")), "hi");
        assert_eq!(
            content_text(
                &json!([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "b"}])
            ),
            "a\nb"
        );
    }

    #[test]
    fn nextchat_background_requests_are_recognised() {
        let title = json!([{"role": "user", "content": "hi"}, {"role": "user", "content": "Please generate a four to five word title summarizing our conversation without any lead-in, punctuation, quotation marks, periods, symbols, bold text, or additional text. Remove enclosing quotation marks."}]);
        assert!(is_background(title.as_array().unwrap()));
        let summary = json!([{"role": "system", "content": "Summarize the discussion briefly in 200 words or less to use as a prompt for future context."}]);
        assert!(is_background(summary.as_array().unwrap()));
        let normal = json!([{"role": "user", "content": "Give my story a title?"}]);
        assert!(!is_background(normal.as_array().unwrap()));
    }
}
