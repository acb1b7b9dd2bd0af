//! A fake generation upstream over real sockets, speaking both protocols Taproom uses:
//! OpenAI-compatible (`POST .../chat/completions` JSON and SSE, `GET .../models`,
//! `POST .../embeddings`) and the spec's SillyTavern API (`POST /api/characters/{id}/generate`,
//! WebSocket streaming at `GET /ws`).
//!
//! Replies are derived from the request (`echo: <last user message>`), so tests can assert what
//! was sent; every request is recorded (body, headers, timing, whether the client hung up early).
//! Faults are injected globally (setters), for the next N requests (`fail_next`), at random with
//! a seeded generator (`set_random_failure`, reproducible run to run), or per request through a
//! marker in the last user message / `userInput` or an `x-fake-fault` header:
//! `[[fault:503]]`, `[[fault:429:2]]` (Retry-After 2 s), `[[fault:reset]]`, `[[fault:cut:3]]`
//! (stream cut after 3 frames), `[[fault:stall:2]]` (an SSE stream goes silent after 2 frames,
//! connection open), `[[fault:malformed]]`, `[[fault:drip:50]]` (50 ms between frames),
//! `[[delay:200]]`, `[[chunks:5]]`.
//!
//! `start_tls` serves HTTPS (h2 + HTTP/1.1 via ALPN) for the TLS tests.
//!
//! Self-contained (hyper, tokio, serde_json, futures-util, tokio-tungstenite, rand, rustls,
//! tokio-rustls) so both the
//! tests and `examples/fake_upstream.rs` can include it with `#[path]`.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Body = UnsyncBoxBody<Bytes, io::Error>;

/// An injected failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and a JSON error body.
    Status(u16),
    /// Answer 429 with this `Retry-After` value (seconds or an HTTP-date).
    RateLimited { retry_after: String },
    /// Close the connection before sending any response.
    Reset,
    /// Stream (SSE or WebSocket) this many frames, then cut the connection.
    Cut { after: usize },
    /// Stream (SSE) this many frames, then send nothing more and keep the connection open.
    Stall { after: usize },
    /// Answer 200 with a body that is not valid JSON.
    Malformed,
    /// Stream slowly: this many milliseconds before each frame.
    Drip { ms: u64 },
}

impl Fault {
    /// Parses `503`, `429:2`, `reset`, `cut:3`, `stall:2`, `malformed`, `drip:50`.
    pub fn parse(spec: &str) -> Option<Fault> {
        let mut parts = spec.trim().splitn(2, ':');
        let head = parts.next()?;
        let arg = parts.next();
        match head {
            "reset" => Some(Fault::Reset),
            "malformed" => Some(Fault::Malformed),
            "cut" => Some(Fault::Cut {
                after: arg?.parse().ok()?,
            }),
            "stall" => Some(Fault::Stall {
                after: arg?.parse().ok()?,
            }),
            "drip" => Some(Fault::Drip {
                ms: arg?.parse().ok()?,
            }),
            "429" if arg.is_some() => Some(Fault::RateLimited {
                retry_after: arg?.to_owned(),
            }),
            code => code.parse::<u16>().ok().map(Fault::Status),
        }
    }
}

/// Response latency added before the response headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Latency {
    /// No added latency.
    None,
    /// Always this many milliseconds.
    Fixed(u64),
    /// Uniform in `[min, max]` milliseconds.
    Random { min: u64, max: u64 },
}

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// HTTP method (`WS` for WebSocket `generate` messages).
    pub method: String,
    /// Request path (`/ws` for WebSocket messages).
    pub path: String,
    /// HTTP version, e.g. `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// Headers, lowercase names.
    pub headers: Vec<(String, String)>,
    /// Parsed JSON body (`Null` when not JSON); the `payload` for WebSocket messages.
    pub body: Value,
    /// Whether a streamed reply was requested.
    pub stream: bool,
    /// Fault applied, if any.
    pub fault: Option<Fault>,
    /// When it arrived.
    pub received_at: Instant,
    /// When the full reply was sent.
    pub finished_at: Option<Instant>,
    /// When the client went away (or cancelled) before the reply finished.
    pub closed_early_at: Option<Instant>,
}

impl RecordedRequest {
    /// Value of a header, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct State {
    requests: Vec<RecordedRequest>,
    global_fault: Option<Fault>,
    queued: VecDeque<Fault>,
    random: Option<(f64, u16, StdRng)>,
    latency: Latency,
    latency_rng: StdRng,
    chunks: usize,
    drip_ms: u64,
    api_key: Option<String>,
    heartbeats: usize,
    /// TCP connections accepted.
    accepted: usize,
    /// The tasks serving open connections, to close them on demand.
    connections: Vec<tokio::task::AbortHandle>,
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mark_finished(&self, idx: usize) {
        if let Some(r) = self.lock().requests.get_mut(idx) {
            r.finished_at = Some(Instant::now());
        }
    }

    fn mark_closed_early(&self, idx: usize) {
        if let Some(r) = self.lock().requests.get_mut(idx) {
            if r.finished_at.is_none() && r.closed_early_at.is_none() {
                r.closed_early_at = Some(Instant::now());
            }
        }
    }
}

/// A running fake upstream; stops when dropped.
pub struct FakeUpstream {
    /// Address it listens on.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: oneshot::Sender<()>,
}

impl FakeUpstream {
    /// Starts on an ephemeral 127.0.0.1 port.
    pub async fn start() -> FakeUpstream {
        match Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await {
            Ok(f) => f,
            Err(e) => panic!("fake upstream could not bind: {e}"),
        }
    }

    /// Starts on the given address.
    pub async fn start_on(addr: SocketAddr) -> io::Result<FakeUpstream> {
        Self::start_with(addr, None).await
    }

    /// Starts on an ephemeral 127.0.0.1 port serving HTTPS (h2 and HTTP/1.1 via ALPN) with the
    /// given PEM certificate chain and key.
    pub async fn start_tls(
        cert_pem: &std::path::Path,
        key_pem: &std::path::Path,
    ) -> io::Result<FakeUpstream> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad =
            |e: &dyn std::fmt::Display| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
        let certs = CertificateDer::pem_file_iter(cert_pem)
            .map_err(|e| bad(&e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&e))?;
        let key = PrivateKeyDer::from_pem_file(key_pem).map_err(|e| bad(&e))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(&e))?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        Self::start_with(SocketAddr::from(([127, 0, 0, 1], 0)), Some(acceptor)).await
    }

    async fn start_with(
        addr: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> io::Result<FakeUpstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                requests: Vec::new(),
                global_fault: None,
                queued: VecDeque::new(),
                random: None,
                latency: Latency::None,
                latency_rng: StdRng::seed_from_u64(7),
                chunks: 4,
                drip_ms: 0,
                api_key: None,
                heartbeats: 0,
                accepted: 0,
                connections: Vec::new(),
            }),
        });
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let srv = Arc::clone(&shared);
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                    _ = &mut stop_rx => break,
                };
                let _ = tcp.set_nodelay(true);
                let shared = Arc::clone(&srv);
                let tls = tls.clone();
                let conn = tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                serve_conn(shared, stream).await;
                            }
                        }
                        None => serve_conn(shared, tcp).await,
                    }
                });
                let mut s = srv.lock();
                s.accepted += 1;
                s.connections.retain(|c| !c.is_finished());
                s.connections.push(conn.abort_handle());
            }
        });
        Ok(FakeUpstream {
            addr,
            shared,
            _stop: stop_tx,
        })
    }

    /// Base URL for `openai` upstreams over TLS: `https://localhost:port/v1`.
    pub fn openai_tls_url(&self) -> String {
        format!("https://localhost:{}/v1", self.addr.port())
    }

    /// Base URL for `openai` upstreams: `http://addr/v1`.
    pub fn openai_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Base URL for `sillytavern` upstreams: `http://addr`.
    pub fn st_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every recorded request, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// Number of recorded requests.
    pub fn request_count(&self) -> usize {
        self.shared.lock().requests.len()
    }

    /// Body of the latest request.
    pub fn last_body(&self) -> Option<Value> {
        self.shared.lock().requests.last().map(|r| r.body.clone())
    }

    /// WebSocket heartbeats received from clients.
    pub fn heartbeats_received(&self) -> usize {
        self.shared.lock().heartbeats
    }

    /// TCP connections accepted so far.
    pub fn connections_accepted(&self) -> usize {
        self.shared.lock().accepted
    }

    /// Closes every open connection, as a server's keep-alive timeout closes idle ones.
    pub fn close_connections(&self) {
        for conn in self.shared.lock().connections.drain(..) {
            conn.abort();
        }
    }

    /// Forgets recorded requests.
    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// Applies `fault` to every request (until cleared with `None`).
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.shared.lock().global_fault = fault;
    }

    /// Applies `fault` to the next `n` requests only.
    pub fn fail_next(&self, n: usize, fault: Fault) {
        let mut s = self.shared.lock();
        for _ in 0..n {
            s.queued.push_back(fault.clone());
        }
    }

    /// Fails each request with `status` with `probability`, from a generator seeded with `seed`
    /// so a sequential run sees the same sequence every time.
    pub fn set_random_failure(&self, probability: f64, status: u16, seed: u64) {
        self.shared.lock().random = Some((probability, status, StdRng::seed_from_u64(seed)));
    }

    /// Adds latency before every response.
    pub fn set_latency(&self, latency: Latency) {
        self.shared.lock().latency = latency;
    }

    /// Frames per streamed reply (default 4).
    pub fn set_chunks(&self, n: usize) {
        self.shared.lock().chunks = n.max(1);
    }

    /// Milliseconds before each streamed frame (default 0).
    pub fn set_drip(&self, ms: u64) {
        self.shared.lock().drip_ms = ms;
    }

    /// Requires `Authorization: Bearer <key>`; others get 401.
    pub fn require_api_key(&self, key: Option<&str>) {
        self.shared.lock().api_key = key.map(str::to_owned);
    }

    /// Clears every fault, latency and drip setting.
    pub fn clear_faults(&self) {
        let mut s = self.shared.lock();
        s.global_fault = None;
        s.queued.clear();
        s.random = None;
        s.latency = Latency::None;
        s.drip_ms = 0;
    }
}

/// Serves HTTP/1.1 and h2 (with upgrades, for the WebSocket) on one connection.
async fn serve_conn<I>(shared: Arc<Shared>, io: I)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let shared = Arc::clone(&shared);
        async move { handle(shared, req).await }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .await;
}

/// Per-request settings read from markers in the prompt.
#[derive(Default)]
struct Markers {
    fault: Option<Fault>,
    delay_ms: Option<u64>,
    chunks: Option<usize>,
}

/// Removes `[[...]]` markers from `text`, returning the clean text and the markers found.
fn strip_markers(text: &str) -> (String, Markers) {
    let mut out = String::with_capacity(text.len());
    let mut m = Markers::default();
    let mut rest = text;
    while let Some(start) = rest.find("[[") {
        let Some(len) = rest[start..].find("]]") else {
            break;
        };
        out.push_str(&rest[..start]);
        let inner = &rest[start + 2..start + len];
        if let Some(f) = inner.strip_prefix("fault:") {
            m.fault = Fault::parse(f);
        } else if let Some(d) = inner.strip_prefix("delay:") {
            m.delay_ms = d.parse().ok();
        } else if let Some(c) = inner.strip_prefix("chunks:") {
            m.chunks = c.parse().ok();
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    (out.trim().to_owned(), m)
}

fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// Splits `text` into `n` pieces on char boundaries.
fn split_chunks(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let n = n.clamp(1, chars.len().max(1));
    let size = chars.len().div_ceil(n).max(1);
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never: Infallible| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    full(status, "application/json", v.to_string())
}

fn error_response(status: u16) -> Response<Body> {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(
        code,
        &json!({"error": {"message": format!("fake upstream fault {status}"), "type": "fake_fault", "code": status}}),
    )
}

/// What a request asked for, after markers and the fault queue are resolved.
struct Plan {
    idx: usize,
    fault: Option<Fault>,
    delay: Duration,
    chunks: usize,
    drip: Duration,
    authorized: bool,
}

/// Records the request and decides its fault and timing.
fn plan(
    shared: &Shared,
    rec: RecordedRequest,
    marker_text: &str,
    auth: Option<&str>,
) -> (Plan, String) {
    let (clean, markers) = strip_markers(marker_text);
    let header_fault = rec.header("x-fake-fault").and_then(Fault::parse);
    let header_delay = rec
        .header("x-fake-delay")
        .and_then(|d| d.parse::<u64>().ok());
    let mut s = shared.lock();
    let authorized = match &s.api_key {
        Some(k) => auth == Some(format!("Bearer {k}").as_str()),
        None => true,
    };
    let mut fault = markers.fault.or(header_fault);
    if fault.is_none() {
        fault = s.queued.pop_front();
    }
    if fault.is_none() {
        fault = s.global_fault.clone();
    }
    if fault.is_none() {
        if let Some((p, status, rng)) = s.random.as_mut() {
            if rng.random_bool(p.clamp(0.0, 1.0)) {
                fault = Some(Fault::Status(*status));
            }
        }
    }
    let base = match s.latency {
        Latency::None => 0,
        Latency::Fixed(ms) => ms,
        Latency::Random { min, max } => s.latency_rng.random_range(min..=max.max(min)),
    };
    let delay = Duration::from_millis(base + markers.delay_ms.or(header_delay).unwrap_or(0));
    let drip = match &fault {
        Some(Fault::Drip { ms }) => Duration::from_millis(*ms),
        _ => Duration::from_millis(s.drip_ms),
    };
    let chunks = markers.chunks.unwrap_or(s.chunks);
    let mut rec = rec;
    rec.fault = fault.clone();
    s.requests.push(rec);
    let idx = s.requests.len() - 1;
    (
        Plan {
            idx,
            fault,
            delay,
            chunks,
            drip,
            authorized,
        },
        clean,
    )
}

async fn handle(
    shared: Arc<Shared>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, io::Error> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let version = format!("{:?}", req.version());
    if method == hyper::Method::GET && path.ends_with("/ws") {
        return Ok(upgrade_ws(shared, &mut req));
    }
    if method == hyper::Method::GET && path.ends_with("/models") {
        return Ok(json_response(
            StatusCode::OK,
            &json!({"object": "list", "data": [
                {"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"},
                {"id": "fake-model-large", "object": "model", "created": 0, "owned_by": "fake"}
            ]}),
        ));
    }
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let auth = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let stream = json.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let rec = RecordedRequest {
        method: method.to_string(),
        path: path.clone(),
        version,
        headers,
        body: json.clone(),
        stream,
        fault: None,
        received_at: Instant::now(),
        finished_at: None,
        closed_early_at: None,
    };

    let is_openai = path.ends_with("/chat/completions");
    let is_st = path.starts_with("/api/characters/") && path.ends_with("/generate");
    let is_embed = path.ends_with("/embeddings");
    let marker_text = if is_openai {
        last_user_message(&json)
    } else {
        json.get("userInput")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let (plan, clean) = plan(&shared, rec, &marker_text, auth.as_deref());
    if !plan.delay.is_zero() {
        tokio::time::sleep(plan.delay).await;
    }
    if !plan.authorized {
        shared.mark_finished(plan.idx);
        return Ok(json_response(
            StatusCode::UNAUTHORIZED,
            &json!({"error": {"message": "invalid api key", "type": "auth"}}),
        ));
    }
    match &plan.fault {
        Some(Fault::Reset) => {
            // Returning an error makes hyper drop the connection without a response.
            return Err(io::Error::new(io::ErrorKind::ConnectionReset, "fake reset"));
        }
        Some(Fault::Status(s)) => {
            shared.mark_finished(plan.idx);
            return Ok(error_response(*s));
        }
        Some(Fault::RateLimited { retry_after }) => {
            shared.mark_finished(plan.idx);
            let mut r = error_response(429);
            if let Ok(v) = retry_after.parse() {
                r.headers_mut().insert(hyper::header::RETRY_AFTER, v);
            }
            return Ok(r);
        }
        Some(Fault::Malformed) if !stream => {
            shared.mark_finished(plan.idx);
            return Ok(full(
                StatusCode::OK,
                "application/json",
                "{\"choices\": [ this is not json",
            ));
        }
        _ => {}
    }
    if is_embed {
        shared.mark_finished(plan.idx);
        return Ok(embeddings(&json));
    }
    if is_st {
        let id = path
            .trim_start_matches("/api/characters/")
            .trim_end_matches("/generate")
            .to_owned();
        shared.mark_finished(plan.idx);
        return Ok(json_response(
            StatusCode::OK,
            &st_response(&json, &id, &clean),
        ));
    }
    if !is_openai {
        shared.mark_finished(plan.idx);
        return Ok(json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": {"message": format!("no route for {path}")}}),
        ));
    }
    let model = json
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("fake-model")
        .to_owned();
    let reply = format!("echo: {clean}");
    let prompt_tokens = prompt_tokens(&json);
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": words(&reply),
        "total_tokens": prompt_tokens + words(&reply),
    });
    if !stream {
        shared.mark_finished(plan.idx);
        return Ok(json_response(
            StatusCode::OK,
            &json!({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
                "usage": usage,
            }),
        ));
    }
    let mut frames: Vec<Bytes> = split_chunks(&reply, plan.chunks)
        .into_iter()
        .map(|piece| {
            sse(&json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]}))
        })
        .collect();
    if plan.fault == Some(Fault::Malformed) {
        frames.insert(
            1.min(frames.len()),
            Bytes::from_static(b"data: {this is not json\n\n"),
        );
    }
    frames.push(sse(&json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})));
    frames.push(sse(&json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
        "choices": [], "usage": usage})));
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let end = match plan.fault {
        Some(Fault::Cut { after }) => Some(StreamEnd::Cut(after)),
        Some(Fault::Stall { after }) => Some(StreamEnd::Stall(after)),
        _ => None,
    };
    Ok(sse_response(shared, plan.idx, frames, plan.drip, end))
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn last_user_message(json: &Value) -> String {
    json.get("messages")
        .and_then(Value::as_array)
        .and_then(|m| {
            m.iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        })
        .and_then(|m| m.get("content").and_then(Value::as_str))
        .unwrap_or("")
        .to_owned()
}

fn prompt_tokens(json: &Value) -> u64 {
    json.get("messages")
        .and_then(Value::as_array)
        .map(|m| {
            m.iter()
                .filter_map(|m| m.get("content").and_then(Value::as_str))
                .map(words)
                .sum()
        })
        .unwrap_or(0)
}

fn st_response(json: &Value, id: &str, clean_input: &str) -> Value {
    let reply = format!("echo: {clean_input}");
    let history_words: u64 = json
        .get("history")
        .and_then(Value::as_array)
        .map(|h| {
            h.iter()
                .filter_map(|m| m.get("content").and_then(Value::as_str))
                .map(words)
                .sum()
        })
        .unwrap_or(0);
    let prompt = history_words + words(clean_input);
    let model = json
        .pointer("/genParams/model")
        .and_then(Value::as_str)
        .unwrap_or("fake-st");
    json!({
        "content": reply,
        "model": model,
        "usage": {"promptTokens": prompt, "completionTokens": words(&reply), "totalTokens": prompt + words(&reply)},
        "generationTime": 1,
        "finishReason": "stop",
        "characterState": {"characterId": id},
    })
}

/// Deterministic 8-dimensional unit vectors from an FNV-1a hash of each input.
fn embeddings(json: &Value) -> Response<Body> {
    let inputs: Vec<String> = match json.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().unwrap_or("").to_owned())
            .collect(),
        _ => Vec::new(),
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            let mut v = Vec::with_capacity(8);
            for d in 0..8u8 {
                for b in text.bytes().chain([d]) {
                    h ^= u64::from(b);
                    h = h.wrapping_mul(0x0100_0000_01b3);
                }
                v.push((h % 2000) as f64 / 1000.0 - 1.0);
            }
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-9);
            let v: Vec<f64> = v.iter().map(|x| x / norm).collect();
            json!({"object": "embedding", "index": i, "embedding": v})
        })
        .collect();
    let tokens: u64 = inputs.iter().map(|s| words(s)).sum();
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": data, "model": json.get("model").cloned().unwrap_or(json!("fake-embed")),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
    )
}

/// Marks the request finished when the body completes, or closed early when hyper drops the
/// body first (the client went away).
struct CloseGuard {
    shared: Arc<Shared>,
    idx: usize,
    completed: bool,
}

impl Drop for CloseGuard {
    fn drop(&mut self) {
        if self.completed {
            self.shared.mark_finished(self.idx);
        } else {
            self.shared.mark_closed_early(self.idx);
        }
    }
}

/// How a faulty SSE stream ends early: cut after N frames, or silent after N frames.
#[derive(Clone, Copy, PartialEq)]
enum StreamEnd {
    Cut(usize),
    Stall(usize),
}

fn sse_response(
    shared: Arc<Shared>,
    idx: usize,
    frames: Vec<Bytes>,
    drip: Duration,
    end: Option<StreamEnd>,
) -> Response<Body> {
    struct S {
        frames: std::vec::IntoIter<Bytes>,
        sent: usize,
        drip: Duration,
        end: Option<StreamEnd>,
        guard: CloseGuard,
    }
    let state = S {
        frames: frames.into_iter(),
        sent: 0,
        drip,
        end,
        guard: CloseGuard {
            shared,
            idx,
            completed: false,
        },
    };
    let stream = futures_util::stream::unfold(Some(state), |st| async move {
        let mut st = st?;
        if st.end == Some(StreamEnd::Stall(st.sent)) {
            // Silent until the client gives up (dropping the body records the hang-up).
            std::future::pending::<()>().await;
        }
        if st.end == Some(StreamEnd::Cut(st.sent)) {
            // Let hyper flush what was sent so far (it writes when the body is pending), then
            // fail the body: hyper aborts the connection without the final chunk.
            if st.sent > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let e = io::Error::new(io::ErrorKind::ConnectionAborted, "fake cut");
            return Some((Err(e), None));
        }
        if !st.drip.is_zero() {
            tokio::time::sleep(st.drip).await;
        }
        match st.frames.next() {
            Some(f) => {
                st.sent += 1;
                Some((Ok(Frame::data(f)), Some(st)))
            }
            None => {
                st.guard.completed = true;
                None
            }
        }
    });
    let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    r
}

fn upgrade_ws(shared: Arc<Shared>, req: &mut Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": {"message": "not a websocket request"}}),
        );
    };
    let required = shared.lock().api_key.clone();
    if let Some(k) = required {
        let auth = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if auth != Some(format!("Bearer {k}").as_str()) {
            return json_response(
                StatusCode::UNAUTHORIZED,
                &json!({"error": {"message": "invalid api key"}}),
            );
        }
    }
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let protocol = req
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|p| p.trim().to_owned());
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        serve_ws(shared, ws, headers).await;
    });
    let mut r = full(StatusCode::SWITCHING_PROTOCOLS, "text/plain", Bytes::new());
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let h = r.headers_mut();
    h.remove(hyper::header::CONTENT_TYPE);
    h.insert(
        hyper::header::UPGRADE,
        hyper::header::HeaderValue::from_static("websocket"),
    );
    h.insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("Upgrade"),
    );
    if let Ok(v) = accept.parse() {
        h.insert("sec-websocket-accept", v);
    }
    if let Some(p) = protocol.and_then(|p| p.parse().ok()) {
        h.insert("sec-websocket-protocol", p);
    }
    r
}

fn envelope(kind: &str, id: &str, payload: Value) -> Message {
    Message::text(json!({"type": kind, "id": id, "payload": payload, "timestamp": "1970-01-01T00:00:00.000Z"}).to_string())
}

async fn serve_ws<S>(
    shared: Arc<Shared>,
    mut ws: WebSocketStream<S>,
    headers: Vec<(String, String)>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(Ok(msg)) = ws.next().await {
        let Message::Text(text) = msg else { continue };
        let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
            continue;
        };
        match v.get("type").and_then(Value::as_str) {
            Some("heartbeat") => {
                shared.lock().heartbeats += 1;
                let _ = ws.send(envelope("heartbeat", "", json!({}))).await;
                continue;
            }
            Some("generate") => {}
            _ => continue,
        }
        let id = v.get("id").and_then(Value::as_str).unwrap_or("").to_owned();
        let payload = v.get("payload").cloned().unwrap_or(Value::Null);
        let input = payload
            .get("userInput")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let rec = RecordedRequest {
            method: "WS".to_owned(),
            path: "/ws".to_owned(),
            version: "HTTP/1.1".to_owned(),
            headers: headers.clone(),
            body: payload.clone(),
            stream: true,
            fault: None,
            received_at: Instant::now(),
            finished_at: None,
            closed_early_at: None,
        };
        let (plan, clean) = plan(&shared, rec, &input, None);
        if !plan.delay.is_zero() {
            tokio::time::sleep(plan.delay).await;
        }
        match &plan.fault {
            Some(Fault::Reset) => return,
            Some(Fault::Status(s)) => {
                let _ = ws
                    .send(envelope("stream", &id, json!({"error": {"status": s, "message": format!("fake upstream fault {s}")}})))
                    .await;
                shared.mark_finished(plan.idx);
                continue;
            }
            Some(Fault::RateLimited { .. }) => {
                let _ = ws
                    .send(envelope(
                        "stream",
                        &id,
                        json!({"error": {"status": 429, "message": "fake rate limit"}}),
                    ))
                    .await;
                shared.mark_finished(plan.idx);
                continue;
            }
            Some(Fault::Malformed) => {
                let _ = ws.send(Message::text("{this is not json")).await;
                shared.mark_finished(plan.idx);
                continue;
            }
            _ => {}
        }
        let character = payload
            .get("characterId")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let response = st_response(&payload, &character, &clean);
        let reply = response
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let pieces = split_chunks(&reply, plan.chunks);
        let cut = match plan.fault {
            Some(Fault::Cut { after }) => Some(after),
            _ => None,
        };
        let mut cancelled = false;
        for (sent, piece) in pieces.into_iter().enumerate() {
            if cut == Some(sent) {
                // Drop the socket without a close frame, like a crashed server.
                shared.mark_closed_early(plan.idx);
                return;
            }
            if !plan.drip.is_zero() {
                // Listen for a cancel while waiting, so cancellation is seen promptly.
                let sleep = tokio::time::sleep(plan.drip);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        m = ws.next() => match m {
                            Some(Ok(Message::Text(t))) => {
                                if t.as_str().contains("\"cancel\"") {
                                    cancelled = true;
                                    break;
                                }
                                if t.as_str().contains("\"heartbeat\"") {
                                    shared.lock().heartbeats += 1;
                                    let _ = ws.send(envelope("heartbeat", "", json!({}))).await;
                                }
                            }
                            Some(Ok(_)) => {}
                            _ => {
                                shared.mark_closed_early(plan.idx);
                                return;
                            }
                        }
                    }
                }
            }
            if cancelled {
                break;
            }
            if ws
                .send(envelope("stream", &id, json!({"delta": piece})))
                .await
                .is_err()
            {
                shared.mark_closed_early(plan.idx);
                return;
            }
        }
        if cancelled {
            shared.mark_closed_early(plan.idx);
            continue;
        }
        let _ = ws
            .send(envelope(
                "stream",
                &id,
                json!({"done": true, "response": response}),
            ))
            .await;
        shared.mark_finished(plan.idx);
    }
}
