//! `GET /ws`: the spec's WebSocket protocol. Every frame is the envelope
//! `{type, payload, id, timestamp}`.
//!
//! - client → server: `generate` `{characterId, message, conversationId?, parameters?}`;
//!   `control` `{action:"cancel"}` with the id of a running generation; `control`
//!   `{action:"auth", token}` as the first message when the browser could not send a header;
//!   `heartbeat`.
//! - server → client: `stream` `{delta}` chunks, a final `stream` `{done:true, response}`,
//!   errors as `control` `{event:"error", error:<envelope>}`, `heartbeat` replies and a server
//!   `heartbeat` every interval. A client silent for `missed_heartbeats` intervals is dropped.
//!
//! Several generations run at once, told apart by id. Backpressure: one bounded queue feeds the
//! socket writer and each generation has its own bounded channel, so a slow client slows the
//! upstream reads rather than growing buffers. Closing the socket cancels every generation.

use super::extract::bearer;
use super::AppState;
use crate::auth::User;
use crate::error::{ApiError, ErrorCode};
use crate::interact::{GenEvent, InteractParams, TurnInput};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;

/// Close code for a socket that never authenticated (4000-4999 are application codes).
pub const CLOSE_UNAUTHENTICATED: u16 = 4401;
/// Close code for a client that stopped answering heartbeats.
pub const CLOSE_HEARTBEAT: u16 = 4408;

/// WebSocket settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsConfig {
    /// Server heartbeat interval.
    pub heartbeat_interval_ms: u64,
    /// Intervals a client may stay silent before it is dropped.
    pub missed_heartbeats: u32,
    /// Time allowed for the first `control {action:"auth"}` message.
    pub auth_timeout_ms: u64,
    /// Generations one socket may run at once.
    pub max_concurrent_generations: usize,
}

impl Default for WsConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 30_000,
            missed_heartbeats: 3,
            auth_timeout_ms: 10_000,
            max_concurrent_generations: 8,
        }
    }
}

#[derive(Debug, Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    payload: Value,
    #[serde(default)]
    id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GeneratePayload {
    character_id: String,
    message: String,
    conversation_id: Option<String>,
    #[serde(default)]
    parameters: InteractParams,
}

fn envelope(kind: &str, id: Option<&str>, payload: Value) -> Message {
    let mut v = json!({
        "type": kind,
        "payload": payload,
        "timestamp": crate::time::now_rfc3339(),
    });
    if let Some(id) = id {
        v["id"] = json!(id);
    }
    Message::Text(v.to_string().into())
}

fn error_frame(id: Option<&str>, err: &ApiError, request_id: &str) -> Message {
    envelope(
        "control",
        id,
        json!({ "event": "error", "error": err.envelope(request_id)["error"] }),
    )
}

/// `GET /ws` upgrade. A token in the `Authorization` header or `?token=` authenticates at once.
#[utoipa::path(
    get,    operation_id = "websocket",

    path = "/ws",
    tag = "interact",
    params(("token" = Option<String>, Query, description = "JWT, when the Authorization header cannot be set")),
    responses((status = 101, description = "WebSocket: the spec's `{type, id, payload}` envelope (generate, cancel, ping)"), (status = 400, description = "not a WebSocket upgrade", body = crate::error::ErrorEnvelope)),
    security((), ("bearer" = []))
)]
pub async fn upgrade(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .map(str::to_string)
        .or_else(|| query.get("token").cloned());
    let request_id = crate::http::request_id::current();
    ws.on_upgrade(move |socket| serve(socket, state, token, request_id))
}

async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.to_string().into(),
        })))
        .await;
}

async fn authenticate(
    socket: &mut WebSocket,
    state: &AppState,
    token: Option<String>,
) -> Result<User, String> {
    if let Some(token) = token {
        return state.auth.verify(&token);
    }
    let wait = Duration::from_millis(state.config.websocket.auth_timeout_ms);
    let first = tokio::time::timeout(wait, socket.recv())
        .await
        .map_err(|_| "no auth message within the time allowed".to_string())?;
    let Some(Ok(Message::Text(text))) = first else {
        return Err("expected a control {action:\"auth\", token} message first".into());
    };
    let env: Envelope = serde_json::from_str(&text)
        .map_err(|_| "first message is not a JSON envelope".to_string())?;
    let token = (env.kind == "control" && env.payload["action"] == "auth")
        .then(|| env.payload["token"].as_str().map(str::to_string))
        .flatten()
        .ok_or_else(|| "expected a control {action:\"auth\", token} message first".to_string())?;
    state.auth.verify(&token)
}

async fn serve(mut socket: WebSocket, state: AppState, token: Option<String>, request_id: String) {
    let user = match authenticate(&mut socket, &state, token).await {
        Ok(u) => u,
        Err(why) => {
            let reason: String = format!("unauthenticated: {why}")
                .chars()
                .take(120)
                .collect();
            close(&mut socket, CLOSE_UNAUTHENTICATED, &reason).await;
            return;
        }
    };
    let cfg = state.config.websocket.clone();
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(256);
    let running: Arc<Mutex<HashMap<String, CancellationToken>>> = Arc::default();
    let mut heartbeat = tokio::time::interval(Duration::from_millis(cfg.heartbeat_interval_ms));
    heartbeat.tick().await;
    let mut last_seen = tokio::time::Instant::now();
    let allowed_silence =
        Duration::from_millis(cfg.heartbeat_interval_ms * u64::from(cfg.missed_heartbeats));
    let _ = out_tx
        .send(envelope(
            "control",
            None,
            json!({"event": "ready", "userId": user.id}),
        ))
        .await;
    loop {
        tokio::select! {
            outgoing = out_rx.recv() => {
                let Some(msg) = outgoing else { break };
                if socket.send(msg).await.is_err() {
                    break;
                }
            }
            incoming = socket.recv() => {
                let Some(Ok(msg)) = incoming else { break };
                last_seen = tokio::time::Instant::now();
                match msg {
                    Message::Text(text) => {
                        handle_text(&state, &user, &text, &out_tx, &running, &cfg, &request_id).await;
                    }
                    Message::Close(_) => break,
                    // Pings are answered by the library; pongs only prove liveness.
                    _ => {}
                }
            }
            _ = heartbeat.tick() => {
                if last_seen.elapsed() > allowed_silence {
                    close(&mut socket, CLOSE_HEARTBEAT, "heartbeat timeout: no message from the client").await;
                    break;
                }
                if socket.send(envelope("heartbeat", None, json!({}))).await.is_err() {
                    break;
                }
            }
        }
    }
    for (_, token) in running.lock().await.drain() {
        token.cancel();
    }
}

async fn handle_text(
    state: &AppState,
    user: &User,
    text: &str,
    out: &mpsc::Sender<Message>,
    running: &Arc<Mutex<HashMap<String, CancellationToken>>>,
    cfg: &WsConfig,
    request_id: &str,
) {
    let env: Envelope = match serde_json::from_str(text) {
        Ok(e) => e,
        Err(e) => {
            let err = ApiError::validation("message", format!("not a JSON envelope: {e}"));
            let _ = out.send(error_frame(None, &err, request_id)).await;
            return;
        }
    };
    let id = env.id.clone();
    match env.kind.as_str() {
        "heartbeat" => {
            let _ = out
                .send(envelope("heartbeat", id.as_deref(), json!({})))
                .await;
        }
        "control" => match env.payload["action"].as_str() {
            Some("cancel") => {
                let token = match &id {
                    Some(id) => running.lock().await.get(id).cloned(),
                    None => None,
                };
                match token {
                    Some(t) => t.cancel(),
                    None => {
                        let err = ApiError::not_found("no running generation with that id");
                        let _ = out.send(error_frame(id.as_deref(), &err, request_id)).await;
                    }
                }
            }
            Some("auth") => {}
            _ => {
                let err = ApiError::validation("payload.action", "must be cancel, auth");
                let _ = out.send(error_frame(id.as_deref(), &err, request_id)).await;
            }
        },
        "generate" => {
            let Some(gen_id) = id.clone().filter(|i| !i.is_empty()) else {
                let err = ApiError::validation("id", "a generate message needs an id");
                let _ = out.send(error_frame(None, &err, request_id)).await;
                return;
            };
            let payload: GeneratePayload = match serde_json::from_value(env.payload) {
                Ok(p) => p,
                Err(e) => {
                    let err = ApiError::validation("payload", e.to_string());
                    let _ = out.send(error_frame(Some(&gen_id), &err, request_id)).await;
                    return;
                }
            };
            {
                let guard = running.lock().await;
                if guard.contains_key(&gen_id) {
                    drop(guard);
                    let err = ApiError::validation("id", "a generation with this id is running");
                    let _ = out.send(error_frame(Some(&gen_id), &err, request_id)).await;
                    return;
                }
                if guard.len() >= cfg.max_concurrent_generations {
                    drop(guard);
                    let err = ApiError::new(
                        ErrorCode::RateLimited,
                        "too many generations running on this socket",
                    );
                    let _ = out.send(error_frame(Some(&gen_id), &err, request_id)).await;
                    return;
                }
            }
            let input = TurnInput {
                character_id: payload.character_id,
                message: payload.message,
                conversation_id: payload.conversation_id,
                params: payload.parameters,
                idempotency_key: None,
            };
            let prepared = match state.interact.prepare_turn(user, &input).await {
                Ok(p) => p,
                Err(err) => {
                    let _ = out.send(error_frame(Some(&gen_id), &err, request_id)).await;
                    return;
                }
            };
            let (mut rx, cancel) = state.interact.start_stream(prepared).await;
            running.lock().await.insert(gen_id.clone(), cancel);
            let out = out.clone();
            let running = running.clone();
            let rid = request_id.to_string();
            tokio::spawn(async move {
                while let Some(ev) = rx.recv().await {
                    let frame = match ev {
                        GenEvent::Delta(d) => {
                            envelope("stream", Some(&gen_id), json!({ "delta": d }))
                        }
                        GenEvent::Done(response) => envelope(
                            "stream",
                            Some(&gen_id),
                            json!({ "done": true, "response": response }),
                        ),
                        GenEvent::Error(e) => error_frame(Some(&gen_id), &e, &rid),
                        GenEvent::Cancelled(response) => envelope(
                            "stream",
                            Some(&gen_id),
                            json!({ "done": true, "cancelled": true, "response": response }),
                        ),
                    };
                    if out.send(frame).await.is_err() {
                        break;
                    }
                }
                running.lock().await.remove(&gen_id);
            });
        }
        other => {
            let err = ApiError::validation(
                "type",
                format!("unknown message type {other:?}; expected generate, control or heartbeat"),
            );
            let _ = out.send(error_frame(id.as_deref(), &err, request_id)).await;
        }
    }
}
