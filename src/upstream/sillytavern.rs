//! SillyTavern API wire protocol from the spec: `POST {baseURL}/api/characters/{id}/generate`
//! with `STGenerateRequest`/`STGenerateResponse`, and streaming over the WebSocket envelope
//! `{type, id, payload, timestamp}` (`generate` out; `stream` deltas and a final `done` in;
//! `control`/`cancel` out when the caller goes away; `heartbeat` out while the stream is silent,
//! and accepted in).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Uri};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use super::config::WebSocketConfig;
use super::error::{UpstreamError, UpstreamErrorKind};
use super::transport::error_chain;
use super::{ChatMessage, GenParams, GenerateRequest, GenerateResult, StreamEvent, TokenUsage};

/// `STGenerateRequest` in camelCase as the spec names it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StGenerateRequest<'a> {
    character_id: &'a str,
    user_input: &'a str,
    history: &'a [ChatMessage],
    gen_params: GenParams,
    #[serde(skip_serializing_if = "Option::is_none")]
    override_settings: Option<&'a Value>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

fn st_request<'a>(
    req: &'a GenerateRequest,
    default_model: &str,
    stream: bool,
) -> StGenerateRequest<'a> {
    let mut gen_params = req.params.clone();
    if gen_params.model.is_none() && !default_model.is_empty() {
        gen_params.model = Some(default_model.to_owned());
    }
    StGenerateRequest {
        character_id: &req.character_id,
        user_input: &req.user_input,
        history: &req.history,
        gen_params,
        override_settings: req.override_settings.as_ref(),
        stream,
    }
}

/// Serializes `STGenerateRequest` for the HTTP endpoint.
pub(crate) fn request_body(
    req: &GenerateRequest,
    default_model: &str,
    stream: bool,
) -> Result<Bytes, UpstreamError> {
    serde_json::to_vec(&st_request(req, default_model, stream))
        .map(Bytes::from)
        .map_err(|e| UpstreamError::new(UpstreamErrorKind::Rejected, "", e.to_string()))
}

/// The WebSocket `generate` envelope (id, text) for a request.
pub(crate) fn ws_generate_message(
    req: &GenerateRequest,
    default_model: &str,
) -> Result<(String, String), UpstreamError> {
    let id = uuid::Uuid::new_v4().to_string();
    let msg = json!({
        "type": "generate",
        "id": id,
        "payload": st_request(req, default_model, true),
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    let text = serde_json::to_string(&msg)
        .map_err(|e| UpstreamError::new(UpstreamErrorKind::Rejected, "", e.to_string()))?;
    Ok((id, text))
}

/// `{base}/api/characters/{id}/generate` with the id percent-encoded as one path segment.
pub(crate) fn generate_uri(base: &str, character_id: &str) -> Result<Uri, String> {
    let mut id = String::with_capacity(character_id.len());
    for b in character_id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            id.push(b as char);
        } else {
            id.push_str(&format!("%{b:02X}"));
        }
    }
    format!("{base}/api/characters/{id}/generate")
        .parse()
        .map_err(|e| format!("bad character id for the generate URL: {e}"))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StUsage {
    #[serde(default, alias = "prompt_tokens")]
    prompt_tokens: u64,
    #[serde(default, alias = "completion_tokens")]
    completion_tokens: u64,
    #[serde(default, alias = "total_tokens")]
    total_tokens: u64,
}

/// `STGenerateResponse`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StGenerateResponse {
    content: String,
    #[serde(default)]
    model: String,
    usage: Option<StUsage>,
    #[serde(default)]
    generation_time: f64,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    character_state: Option<Value>,
}

impl From<StGenerateResponse> for GenerateResult {
    fn from(r: StGenerateResponse) -> Self {
        let usage = r.usage.map_or_else(TokenUsage::default, |u| TokenUsage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: if u.total_tokens > 0 {
                u.total_tokens
            } else {
                u.prompt_tokens + u.completion_tokens
            },
        });
        GenerateResult {
            content: r.content,
            model: r.model,
            usage,
            finish_reason: r.finish_reason.unwrap_or_else(|| "stop".to_owned()),
            generation_time_ms: r.generation_time.max(0.0) as u64,
            character_state: r.character_state,
        }
    }
}

/// Parses `STGenerateResponse`.
pub(crate) fn parse_response(
    upstream: &str,
    bytes: &[u8],
) -> Result<GenerateResult, UpstreamError> {
    serde_json::from_slice::<StGenerateResponse>(bytes)
        .map(GenerateResult::from)
        .map_err(|e| UpstreamError::malformed(upstream, e))
}

/// Where and how to open the streaming WebSocket.
#[derive(Debug)]
pub(crate) struct WsTarget {
    url: String,
    heartbeat: Option<std::time::Duration>,
    protocols: Option<HeaderValue>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl WsTarget {
    pub(crate) fn new(
        base: &str,
        cfg: &WebSocketConfig,
        tls: rustls::ClientConfig,
    ) -> Result<Self, String> {
        let url = match &cfg.url {
            Some(u) => u.clone(),
            None => {
                // No explicit URL: the same host, `ws(s)` scheme, path `{base}/ws`.
                let rest = base
                    .strip_prefix("https://")
                    .map(|r| format!("wss://{r}"))
                    .or_else(|| base.strip_prefix("http://").map(|r| format!("ws://{r}")))
                    .ok_or_else(|| "url: must start with http:// or https://".to_owned())?;
                format!("{rest}/ws")
            }
        };
        let protocols = if cfg.protocols.is_empty() {
            None
        } else {
            Some(
                HeaderValue::try_from(cfg.protocols.join(", "))
                    .map_err(|_| "websocket.protocols: not valid header text".to_owned())?,
            )
        };
        // The ALPN list stays empty: a WebSocket handshake is HTTP/1.1 only.
        let tls = url.starts_with("wss://").then(|| Arc::new(tls));
        let heartbeat = (cfg.heartbeat_interval_ms > 0)
            .then(|| std::time::Duration::from_millis(cfg.heartbeat_interval_ms));
        Ok(Self {
            url,
            heartbeat,
            protocols,
            tls,
        })
    }

    /// Connects, sends the `generate` envelope and returns a reader for the replies.
    pub(crate) async fn open(
        &self,
        upstream: &str,
        auth: Option<&HeaderValue>,
        (id, text): (String, String),
        started: Instant,
    ) -> Result<WsReader, UpstreamError> {
        let mut req =
            self.url.as_str().into_client_request().map_err(|e| {
                UpstreamError::new(UpstreamErrorKind::Connect, upstream, e.to_string())
            })?;
        if let Some(p) = &self.protocols {
            req.headers_mut()
                .insert(http::header::SEC_WEBSOCKET_PROTOCOL, p.clone());
        }
        if let Some(a) = auth {
            req.headers_mut()
                .insert(http::header::AUTHORIZATION, a.clone());
        }
        let connector = match &self.tls {
            Some(cfg) => Connector::Rustls(Arc::clone(cfg)),
            None => Connector::Plain,
        };
        let (mut ws, _resp) =
            tokio_tungstenite::connect_async_tls_with_config(req, None, true, Some(connector))
                .await
                .map_err(|e| connect_error(upstream, e))?;
        ws.send(Message::text(text))
            .await
            .map_err(|e| UpstreamError::new(UpstreamErrorKind::Reset, upstream, error_chain(&e)))?;
        Ok(WsReader {
            heartbeat: self.heartbeat,
            upstream: upstream.to_owned(),
            ws: Some(ws),
            id,
            started,
            done: false,
        })
    }
}

fn connect_error(upstream: &str, e: tokio_tungstenite::tungstenite::Error) -> UpstreamError {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::Http(resp) => {
            let status = resp.status().as_u16();
            let body = resp.body().clone().unwrap_or_default();
            UpstreamError::from_status(upstream, status, &body)
        }
        other => UpstreamError::new(UpstreamErrorKind::Connect, upstream, error_chain(&other)),
    }
}

fn heartbeat() -> String {
    json!({
        "type": "heartbeat",
        "payload": {},
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    })
    .to_string()
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Reads `stream` envelopes for one generation; sends `cancel` if dropped before `done`.
pub(crate) struct WsReader {
    heartbeat: Option<std::time::Duration>,
    upstream: String,
    /// `Option` so `Drop` can move the socket into a task that sends the cancel message.
    ws: Option<Ws>,
    id: String,
    started: Instant,
    done: bool,
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    payload: Value,
}

impl WsReader {
    fn broken(&self, msg: impl Into<String>) -> UpstreamError {
        UpstreamError::new(UpstreamErrorKind::StreamBroken, &self.upstream, msg)
    }

    /// The next delta or the final result.
    pub(crate) async fn next_event(&mut self) -> Result<StreamEvent, UpstreamError> {
        loop {
            let Some(ws) = self.ws.as_mut() else {
                return Err(self.broken("stream already finished"));
            };
            let next = match self.heartbeat {
                Some(every) => match tokio::time::timeout(every, ws.next()).await {
                    Ok(n) => n,
                    Err(_) => {
                        // Silence: show the server we are still here (the caller's idle
                        // timeout, not this, decides when to give up).
                        let _ = ws.send(Message::text(heartbeat())).await;
                        continue;
                    }
                },
                None => ws.next().await,
            };
            let msg = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    return Err(self.broken(format!("stream broke: {}", error_chain(&e))))
                }
                None => return Err(self.broken("upstream closed the WebSocket before it finished")),
            };
            let text = match msg {
                Message::Text(t) => t,
                Message::Close(_) => {
                    return Err(self.broken("upstream closed the WebSocket before it finished"))
                }
                // Pings are answered by tungstenite itself; binary frames are not part of the protocol.
                _ => continue,
            };
            let env: Envelope = serde_json::from_str(text.as_str()).map_err(|e| {
                UpstreamError::new(
                    UpstreamErrorKind::Malformed,
                    &self.upstream,
                    format!("upstream sent an unparseable WebSocket message: {e}"),
                )
            })?;
            match env.kind.as_str() {
                // The server's heartbeat only proves it is alive; answering it could ping-pong forever.
                "heartbeat" => continue,
                "stream" if env.id.as_deref().is_none_or(|i| i == self.id) => {}
                _ => continue,
            }
            let p = env.payload;
            if let Some(err) = p.get("error") {
                let status = err
                    .get("status")
                    .and_then(Value::as_u64)
                    .and_then(|s| u16::try_from(s).ok())
                    .unwrap_or(502);
                let body = serde_json::to_vec(err).unwrap_or_default();
                return Err(UpstreamError::from_status(&self.upstream, status, &body));
            }
            if p.get("done").and_then(Value::as_bool) == Some(true) {
                let resp = p.get("response").cloned().unwrap_or(Value::Null);
                let mut result: GenerateResult = serde_json::from_value::<StGenerateResponse>(resp)
                    .map(GenerateResult::from)
                    .map_err(|e| UpstreamError::malformed(&self.upstream, e))?;
                if result.generation_time_ms == 0 {
                    result.generation_time_ms = self.started.elapsed().as_millis() as u64;
                }
                self.done = true;
                if let Some(mut ws) = self.ws.take() {
                    // Close politely in the background so the caller gets the result now.
                    tokio::spawn(async move {
                        let _ = ws.close(None).await;
                    });
                }
                return Ok(StreamEvent::Done(result));
            }
            if let Some(d) = p.get("delta").and_then(Value::as_str) {
                if !d.is_empty() {
                    return Ok(StreamEvent::Delta(d.to_owned()));
                }
            }
        }
    }
}

impl Drop for WsReader {
    fn drop(&mut self) {
        let Some(mut ws) = self.ws.take() else { return };
        if self.done {
            return;
        }
        let cancel = json!({
            "type": "control",
            "id": self.id,
            "payload": {"action": "cancel"},
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        })
        .to_string();
        // Drop cannot await; tell the upstream to stop in a short-lived task when a runtime is
        // around. Without one the socket just closes, which a server also treats as cancel.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = ws.send(Message::text(cancel)).await;
                let _ = ws.close(None).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_uri_encodes_the_character_id() {
        let cases = [
            ("abc-123", "http://h/api/characters/abc-123/generate"),
            ("a b/c?", "http://h/api/characters/a%20b%2Fc%3F/generate"),
            ("é", "http://h/api/characters/%C3%A9/generate"),
        ];
        for (id, want) in cases {
            let got = generate_uri("http://h", id).map(|u| u.to_string());
            assert_eq!(got.as_deref(), Ok(want));
        }
    }

    #[test]
    fn ws_url_is_derived_from_the_base_url() {
        let tls = || {
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map(|b| {
                b.with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth()
            })
        };
        let cfg = WebSocketConfig::default();
        for (base, want) in [
            ("http://h:8000", "ws://h:8000/ws"),
            ("https://h/st", "wss://h/st/ws"),
        ] {
            let t = tls()
                .map_err(|e| e.to_string())
                .and_then(|c| WsTarget::new(base, &cfg, c));
            assert_eq!(t.map(|t| t.url).as_deref(), Ok(want));
        }
    }
}
