//! Upstream clients: everything Taproom knows about talking to a generation backend.
//!
//! # Layout
//! - `config`: the `[upstreams]` table (spec `STAPIConfig`, `RetryConfig`, `CircuitBreakerConfig`,
//!   `STWebSocketConfig`).
//! - `error`: `UpstreamError`, tagged with spec code, status, retryability and breaker relevance.
//! - `breaker`: per-upstream circuit breaker and retry budget over one rolling window.
//! - `retry`: backoff with full jitter, `Retry-After` parsing, retryable-error rules.
//! - `transport`: the pooled hyper client (HTTP/1.1 + h2, rustls with system roots + a CA file).
//! - `http1_pool`: keep-alive HTTP/1.1 connections to a plain `http://` upstream, moved by the
//!   request using them instead of a task per connection (TLS upstreams use `transport`).
//! - `openai`, `sillytavern`: the two wire protocols.
//!
//! # Lifecycle of a call
//! 1. `Upstreams::get` picks the named (or default) upstream.
//! 2. The single retry loop (`Upstream::attempts`) asks the breaker for a permit (failing fast with
//!    `ST_API_UNAVAILABLE` while open), runs one attempt under the per-attempt timeout and the
//!    overall deadline, settles the permit with the outcome, and decides whether to retry
//!    (retryable error, attempts left, retry budget left, deadline not passed).
//! 3. For streams, an attempt ends at the first event; after that nothing is retried, and the
//!    stream itself settles the permit when it completes or breaks.
//!
//! Architecture invariant: the API key is read only where request headers are built; it never
//! reaches `Debug`, errors, tracing fields or status output.

pub mod config;
pub mod error;

mod breaker;
mod http1_pool;
mod openai;
mod retry;
mod sillytavern;
mod transport;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http::{HeaderMap, HeaderValue, StatusCode, Uri};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

pub use breaker::BreakerState;
use breaker::{Breaker, Outcome, Permit};
pub use config::{UpstreamConfig, UpstreamKind, UpstreamsConfig};
pub use error::{UpstreamError, UpstreamErrorKind};
pub use http1_pool::UpstreamBody;
use retry::RetryPolicy;

/// One chat message in OpenAI shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Message text.
    pub content: String,
}

impl ChatMessage {
    /// Builds a message from a role and text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Sampling parameters; `None` leaves the upstream's default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GenParams {
    /// Sampling temperature.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Top-k sampling (not every OpenAI-compatible server honours it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Completion length limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Stop sequences.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub stop: Vec<String>,
    /// Model overriding the upstream's configured `model`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// What to generate: the already assembled prompt plus the SillyTavern-specific context.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// Character the reply is for (path segment of the ST generate endpoint).
    pub character_id: String,
    /// Full OpenAI-style prompt, system prompt first; what `openai` upstreams receive.
    pub messages: Vec<ChatMessage>,
    /// The user's latest message (ST `userInput`).
    pub user_input: String,
    /// Earlier turns for ST (`history`).
    pub history: Vec<ChatMessage>,
    /// Sampling parameters.
    pub params: GenParams,
    /// System prompt and card for ST (`overrideSettings`), so a stateless service can generate.
    pub override_settings: Option<Value>,
}

/// Token counts reported by the upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenUsage {
    /// Tokens in the prompt.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Tokens generated.
    #[serde(default)]
    pub completion_tokens: u64,
    /// Sum of both.
    #[serde(default)]
    pub total_tokens: u64,
}

/// The counts as stored with a reply and sent to clients.
impl From<TokenUsage> for crate::model::TokenUsage {
    fn from(u: TokenUsage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
        }
    }
}

/// A complete reply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerateResult {
    /// Reply text.
    pub content: String,
    /// Model that produced it.
    pub model: String,
    /// Token usage.
    pub usage: TokenUsage,
    /// Why generation stopped (`stop`, `length`, ...).
    pub finish_reason: String,
    /// Wall time of the call in milliseconds, retries included.
    pub generation_time_ms: u64,
    /// ST `characterState` updates, if the upstream sent any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub character_state: Option<Value>,
}

/// One item of a streamed reply: text deltas, then the assembled result.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// Next piece of reply text.
    Delta(String),
    /// The finished reply; always the last item of a successful stream.
    Done(GenerateResult),
}

/// A streamed reply; dropping it aborts the upstream request.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, UpstreamError>> + Send>>;

/// A raw upstream response for pass-through endpoints.
#[derive(Debug)]
pub struct PassthroughResponse {
    /// Upstream status (2xx or a caller error such as 400/404/422).
    pub status: StatusCode,
    /// Upstream headers, hop-by-hop ones included; the caller filters.
    pub headers: HeaderMap,
    /// Upstream body, streamed; dropping it aborts the upstream request.
    pub body: UpstreamBody,
}

/// One upstream's state for `GET /api/admin/upstreams`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamStatus {
    /// Configured name.
    pub name: String,
    /// Protocol.
    pub kind: UpstreamKind,
    /// Base URL, with any `user:password@` masked.
    pub url: String,
    /// Whether this is the default upstream.
    pub is_default: bool,
    /// Breaker state.
    pub state: BreakerState,
    /// Failed attempts inside the monitoring window.
    pub failures_in_window: u32,
    /// Attempts inside the monitoring window.
    pub attempts_in_window: u32,
    /// Current run of consecutive failures.
    pub consecutive_failures: u32,
    /// Most recent error message.
    pub last_error: Option<String>,
    /// When an open breaker allows its next probe (RFC 3339).
    pub open_until: Option<String>,
}

/// Error building the registry from config (bad CA file, invalid URL).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UpstreamBuildError(String);

/// All configured upstreams, built once at startup and shared.
#[derive(Debug)]
pub struct Upstreams {
    default: String,
    map: BTreeMap<String, Arc<Upstream>>,
}

impl Upstreams {
    /// Builds every upstream's client, breaker and retry policy from validated config.
    pub fn new(cfg: &UpstreamsConfig) -> Result<Self, UpstreamBuildError> {
        cfg.validate().map_err(UpstreamBuildError)?;
        let tls = transport::TlsRoots::new(cfg).map_err(UpstreamBuildError)?;
        let mut map = BTreeMap::new();
        for (name, u) in &cfg.upstreams {
            let up = Upstream::new(name, u, &tls)
                .map_err(|e| UpstreamBuildError(format!("upstreams.{name}: {e}")))?;
            map.insert(name.clone(), Arc::new(up));
        }
        Ok(Self {
            default: cfg.default.clone(),
            map,
        })
    }

    /// The named upstream, or the default one for `None`.
    pub fn get(&self, name: Option<&str>) -> Result<Arc<Upstream>, UpstreamError> {
        let name = name.unwrap_or(&self.default);
        self.map.get(name).cloned().ok_or_else(|| {
            UpstreamError::new(
                UpstreamErrorKind::UnknownUpstream,
                name,
                "no upstream with this name is configured",
            )
        })
    }

    /// Name of the default upstream.
    pub fn default_name(&self) -> &str {
        &self.default
    }

    /// Attempts and retries per upstream since start, for the metrics scrape.
    pub fn counters(&self) -> Vec<(String, u64, u64)> {
        self.map
            .values()
            .map(|u| {
                (
                    u.name.clone(),
                    u.attempt_count.load(std::sync::atomic::Ordering::Relaxed),
                    u.retry_count.load(std::sync::atomic::Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// State of every upstream for the admin endpoint.
    pub fn status(&self) -> Vec<UpstreamStatus> {
        self.map
            .values()
            .map(|u| u.status(u.name == self.default))
            .collect()
    }
}

/// One configured upstream with its pooled client, retry policy and breaker.
pub struct Upstream {
    name: String,
    kind: UpstreamKind,
    url: String,
    /// `url` with any userinfo masked, for status output and `Debug`.
    shown_url: String,
    model: String,
    timeout: Duration,
    client: transport::HttpClient,
    /// Connections driven by their requests, for a plain `http://` upstream.
    direct: Option<Arc<http1_pool::Http1Pool>>,
    /// Pre-built so the key is turned into a header once and marked sensitive.
    auth: Option<HeaderValue>,
    completions_uri: Uri,
    ws: sillytavern::WsTarget,
    policy: RetryPolicy,
    ws_policy: RetryPolicy,
    /// Shared with in-flight streams and permits, which settle outcomes after `generate` returns.
    breaker: Arc<Breaker>,
    /// Attempts (first tries included) and retries since start; atomics because concurrent
    /// calls share the upstream, read at metrics scrape time.
    attempt_count: std::sync::atomic::AtomicU64,
    retry_count: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("url", &self.shown_url)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    fn new(name: &str, cfg: &UpstreamConfig, tls: &transport::TlsRoots) -> Result<Self, String> {
        let url = cfg.url.trim_end_matches('/').to_owned();
        let tls_config = tls.client_config(cfg)?;
        let client = transport::build_client(cfg, tls_config.clone())?;
        let auth = if cfg.api_key.is_empty() {
            None
        } else {
            let mut v = HeaderValue::try_from(format!("Bearer {}", cfg.api_key.expose()))
                .map_err(|_| "api_key: contains characters not allowed in a header".to_owned())?;
            v.set_sensitive(true);
            Some(v)
        };
        let completions_uri = format!("{url}/chat/completions")
            .parse::<Uri>()
            .map_err(|e| format!("url: {e}"))?;
        let ws = sillytavern::WsTarget::new(&url, &cfg.websocket, tls_config)?;
        let policy = RetryPolicy::new(&cfg.retry);
        let mut ws_policy = policy.clone();
        // WebSocket reconnects are the same retry loop, bounded by the ST config's own limits.
        ws_policy.max_attempts = ws_policy
            .max_attempts
            .min(cfg.websocket.max_reconnect_attempts.saturating_add(1));
        ws_policy.min_delay = Duration::from_millis(cfg.websocket.reconnect_interval_ms);
        Ok(Self {
            name: name.to_owned(),
            kind: cfg.kind,
            shown_url: mask_userinfo(&url),
            url,
            model: cfg.model.clone(),
            timeout: cfg.timeout(),
            client,
            direct: http1_pool::Http1Pool::for_upstream(cfg),
            auth,
            completions_uri,
            ws,
            policy,
            ws_policy,
            breaker: Arc::new(Breaker::new(&cfg.circuit_breaker, &cfg.retry)),
            attempt_count: std::sync::atomic::AtomicU64::new(0),
            retry_count: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Protocol spoken.
    pub fn kind(&self) -> UpstreamKind {
        self.kind
    }

    /// Model used when a request names none.
    pub fn default_model(&self) -> &str {
        &self.model
    }

    /// Generates a whole reply.
    pub async fn generate(&self, req: &GenerateRequest) -> Result<GenerateResult, UpstreamError> {
        let started = Instant::now();
        let (uri, body) = match self.kind {
            UpstreamKind::Openai => (
                self.completions_uri.clone(),
                openai::request_body(req, &self.model, false)?,
            ),
            UpstreamKind::Sillytavern => (
                sillytavern::generate_uri(&self.url, &req.character_id)
                    .map_err(|e| self.err(UpstreamErrorKind::Rejected, e))?,
                sillytavern::request_body(req, &self.model, false)?,
            ),
        };
        let (mut result, permit) = self
            .attempts(&self.policy, || {
                let uri = uri.clone();
                let body = body.clone();
                async move {
                    let resp = self.send(uri, body).await?;
                    let bytes = self.read_ok_body(resp).await?;
                    match self.kind {
                        UpstreamKind::Openai => openai::parse_response(&self.name, &bytes),
                        UpstreamKind::Sillytavern => {
                            sillytavern::parse_response(&self.name, &bytes)
                        }
                    }
                }
            })
            .await?;
        permit.settle(Outcome::Success, None);
        if result.generation_time_ms == 0 {
            result.generation_time_ms = started.elapsed().as_millis() as u64;
        }
        Ok(result)
    }

    /// Streams a reply: deltas, then `StreamEvent::Done`. Opening (up to the first event) is
    /// retried; once an event has been returned nothing is, and a break yields an error.
    /// Dropping the stream aborts the upstream request.
    pub async fn stream(&self, req: &GenerateRequest) -> Result<EventStream, UpstreamError> {
        let started = Instant::now();
        let (reader, first, permit) = match self.kind {
            UpstreamKind::Openai => {
                let body = openai::request_body(req, &self.model, true)?;
                let ((reader, first), p) = self
                    .attempts(&self.policy, || {
                        let body = body.clone();
                        async move {
                            let resp = self.send(self.completions_uri.clone(), body).await?;
                            let resp = self.check_status(resp).await?;
                            let mut r =
                                openai::SseReader::new(&self.name, resp.into_body(), started);
                            let first = r.next_event().await.map_err(pre_first_event)?;
                            Ok((Reader::Sse(Box::new(r)), first))
                        }
                    })
                    .await?;
                (reader, Some(first), p)
            }
            UpstreamKind::Sillytavern => {
                let msg = sillytavern::ws_generate_message(req, &self.model)?;
                let ((reader, first), p) = self
                    .attempts(&self.ws_policy, || {
                        let msg = msg.clone();
                        async move {
                            let mut r = self
                                .ws
                                .open(&self.name, self.auth.as_ref(), msg, started)
                                .await?;
                            let first = r.next_event().await.map_err(pre_first_event)?;
                            Ok((Reader::Ws(Box::new(r)), first))
                        }
                    })
                    .await?;
                (reader, Some(first), p)
            }
        };
        let live = Live {
            reader,
            permit: Some(permit),
            first,
            idle: self.timeout,
            stall: Box::pin(tokio::time::sleep(self.timeout)),
            name: self.name.clone(),
        };
        Ok(Box::pin(futures_util::stream::unfold(Some(live), step)))
    }

    /// Sends `body` to `{url}/{path}` and returns the raw response once its headers arrive.
    /// Retries only before that point. 401/403, 429 and 5xx become errors (with the upstream's
    /// message in `details`); 2xx and the caller's other 4xx come back as they are.
    pub async fn passthrough(
        &self,
        path: &str,
        body: Bytes,
        stream: bool,
    ) -> Result<PassthroughResponse, UpstreamError> {
        let path = path.trim_start_matches('/');
        // The chat route is every NextChat message; its URI is built once, at startup.
        let uri = if path == "chat/completions" {
            self.completions_uri.clone()
        } else {
            format!("{}/{path}", self.url)
                .parse::<Uri>()
                .map_err(|e| self.err(UpstreamErrorKind::Rejected, format!("bad path: {e}")))?
        };
        let (resp, permit) = self
            .attempts(&self.policy, || {
                let uri = uri.clone();
                let body = body.clone();
                async move {
                    let resp = self.send(uri, body).await?;
                    self.check_status_passthrough(resp).await
                }
            })
            .await?;
        let outcome = if resp.status().is_success() {
            Outcome::Success
        } else {
            Outcome::Neutral
        };
        permit.settle(outcome, None);
        tracing::debug!(upstream = %self.name, stream, status = resp.status().as_u16(), "passthrough");
        let (parts, body) = resp.into_parts();
        Ok(PassthroughResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// The single retry loop: breaker permit, per-attempt timeout, overall deadline, backoff,
    /// `Retry-After`, retry budget. Returns the value with its still-unsettled permit.
    async fn attempts<T, F, Fut>(
        &self,
        policy: &RetryPolicy,
        mut attempt: F,
    ) -> Result<(T, Permit), UpstreamError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        let deadline = Instant::now() + policy.deadline;
        self.breaker.note_call();
        let mut n = 0u32;
        loop {
            n += 1;
            let permit = self.breaker.acquire().map_err(|left| {
                self.err(
                    UpstreamErrorKind::CircuitOpen,
                    "circuit breaker is open; the upstream is failing, try again later",
                )
                .with_retry_after(Some(left))
            })?;
            let now = Instant::now();
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                return Err(self.err(
                    UpstreamErrorKind::Deadline,
                    "deadline exceeded across retries",
                ));
            }
            // Counted only when an attempt really starts: breaker fail-fasts and a passed
            // deadline are no attempt.
            self.attempt_count
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n > 1 {
                self.retry_count
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let bounded_by_deadline = left < self.timeout;
            let err = match tokio::time::timeout(left.min(self.timeout), attempt()).await {
                Ok(Ok(v)) => return Ok((v, permit)),
                Ok(Err(e)) => e,
                Err(_) if bounded_by_deadline => self.err(
                    UpstreamErrorKind::Deadline,
                    "deadline exceeded across retries",
                ),
                Err(_) => self.err(
                    UpstreamErrorKind::Timeout,
                    format!("no response within {} ms", self.timeout.as_millis()),
                ),
            };
            let outcome = if err.counts_as_failure() || err.kind() == UpstreamErrorKind::Deadline {
                Outcome::Failure
            } else {
                Outcome::Neutral
            };
            permit.settle(
                outcome,
                Some(format!("{}: {}", err.spec_code(), err.message())),
            );
            tracing::debug!(upstream = %self.name, attempt = n, code = err.spec_code(), error = %err, "upstream attempt failed");
            if n >= policy.max_attempts || !policy.is_retryable(&err) {
                return Err(finish(err));
            }
            let mut delay = policy.backoff(n);
            if let Some(ra) = err.retry_after() {
                if ra > policy.max_delay {
                    // Waiting that long would hold the caller beyond our cap; let them decide.
                    return Err(finish(err));
                }
                delay = delay.max(ra);
            }
            if Instant::now() + delay >= deadline {
                return Err(finish(err));
            }
            if !self.breaker.try_spend_retry() {
                tracing::warn!(upstream = %self.name, "retry budget exhausted; not retrying");
                return Err(finish(err));
            }
            tokio::time::sleep(delay).await;
        }
    }

    fn err(&self, kind: UpstreamErrorKind, msg: impl Into<String>) -> UpstreamError {
        UpstreamError::new(kind, &self.name, msg)
    }

    async fn send(
        &self,
        uri: Uri,
        body: Bytes,
    ) -> Result<http::Response<UpstreamBody>, UpstreamError> {
        transport::post_json(
            &self.client,
            self.direct.as_ref(),
            &self.name,
            uri,
            self.auth.as_ref(),
            body,
        )
        .await
    }

    /// Turns a non-2xx response into an error (reading a bounded body for `details`).
    async fn check_status(
        &self,
        resp: http::Response<UpstreamBody>,
    ) -> Result<http::Response<UpstreamBody>, UpstreamError> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(self.status_error(resp).await)
    }

    async fn check_status_passthrough(
        &self,
        resp: http::Response<UpstreamBody>,
    ) -> Result<http::Response<UpstreamBody>, UpstreamError> {
        let s = resp.status().as_u16();
        if s < 400 || (s < 500 && !matches!(s, 401 | 403 | 429)) {
            return Ok(resp);
        }
        Err(self.status_error(resp).await)
    }

    /// Boxed: the error path is rare, and inline it would grow every attempt's future.
    fn status_error(
        &self,
        resp: http::Response<UpstreamBody>,
    ) -> futures_util::future::BoxFuture<'_, UpstreamError> {
        Box::pin(async move {
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry::parse_retry_after(v, std::time::SystemTime::now()));
            let body = transport::read_limited(resp.into_body(), 64 * 1024)
                .await
                .unwrap_or_default();
            UpstreamError::from_status(&self.name, status, &body).with_retry_after(retry_after)
        })
    }

    async fn read_ok_body(
        &self,
        resp: http::Response<UpstreamBody>,
    ) -> Result<Bytes, UpstreamError> {
        let resp = self.check_status(resp).await?;
        transport::read_limited(resp.into_body(), 16 * 1024 * 1024)
            .await
            .map_err(|e| self.err(UpstreamErrorKind::Reset, e))
    }

    fn status(&self, is_default: bool) -> UpstreamStatus {
        let s = self.breaker.snapshot();
        let open_until = s.open_for.and_then(|d| {
            let d = chrono::Duration::from_std(d).ok()?;
            Some((chrono::Utc::now() + d).to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        });
        UpstreamStatus {
            name: self.name.clone(),
            kind: self.kind,
            url: self.shown_url.clone(),
            is_default,
            state: s.state,
            failures_in_window: s.failures_in_window,
            attempts_in_window: s.attempts_in_window,
            consecutive_failures: s.consecutive_failures,
            last_error: s.last_error,
            open_until,
        }
    }
}

/// Masks `user:password@` in a URL: credentials there must not reach status output.
fn mask_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find('/').unwrap_or(rest.len());
    match rest[..end].rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://***@{host}{}", &rest[end..]),
        None => url.to_owned(),
    }
}

/// Final touches on the error the loop gives up with: a 429 always carries a `Retry-After`.
fn finish(err: UpstreamError) -> UpstreamError {
    if err.kind() == UpstreamErrorKind::RateLimited && err.retry_after().is_none() {
        return err.with_retry_after(Some(Duration::from_secs(1)));
    }
    err
}

/// A stream that ends before its first event is a failed attempt, not a broken stream: nothing
/// reached the caller, so it may be retried like a reset connection.
fn pre_first_event(e: UpstreamError) -> UpstreamError {
    if e.kind() == UpstreamErrorKind::StreamBroken {
        UpstreamError::new(UpstreamErrorKind::Reset, e.upstream(), e.message())
    } else {
        e
    }
}

/// Protocol-specific event source behind a stream.
enum Reader {
    Sse(Box<openai::SseReader>),
    Ws(Box<sillytavern::WsReader>),
}

impl Reader {
    async fn next_event(&mut self) -> Result<StreamEvent, UpstreamError> {
        match self {
            Reader::Sse(r) => r.next_event().await,
            Reader::Ws(r) => r.next_event().await,
        }
    }
}

/// State of a stream after its first event.
struct Live {
    reader: Reader,
    /// Settled when the stream completes or breaks; dropped (neutral) if the caller goes away.
    permit: Option<Permit>,
    first: Option<StreamEvent>,
    idle: Duration,
    /// The stall deadline: one timer per stream, pushed `idle` ahead before each event (lock-free
    /// while the deadline only moves later) rather than a new timer registered per event.
    stall: Pin<Box<tokio::time::Sleep>>,
    name: String,
}

type Step = Option<(Result<StreamEvent, UpstreamError>, Option<Live>)>;

async fn step(state: Option<Live>) -> Step {
    let mut live = state?;
    let item = match live.first.take() {
        Some(ev) => Ok(ev),
        None => {
            let deadline = tokio::time::Instant::now() + live.idle;
            live.stall.as_mut().reset(deadline);
            tokio::select! {
                biased;
                r = live.reader.next_event() => r,
                _ = live.stall.as_mut() => Err(UpstreamError::new(
                    UpstreamErrorKind::StreamBroken,
                    &live.name,
                    format!("stream stalled for {} ms", live.idle.as_millis()),
                )),
            }
        }
    };
    match item {
        Ok(StreamEvent::Delta(d)) => Some((Ok(StreamEvent::Delta(d)), Some(live))),
        Ok(done @ StreamEvent::Done(_)) => {
            if let Some(p) = live.permit.take() {
                p.settle(Outcome::Success, None);
            }
            Some((Ok(done), None))
        }
        Err(e) => {
            let e = if e.counts_as_failure() {
                UpstreamError::new(UpstreamErrorKind::StreamBroken, &live.name, e.message())
            } else {
                e
            };
            if let Some(p) = live.permit.take() {
                let outcome = if e.counts_as_failure() {
                    Outcome::Failure
                } else {
                    Outcome::Neutral
                };
                p.settle(outcome, Some(format!("{}: {}", e.spec_code(), e.message())));
            }
            tracing::debug!(upstream = %live.name, error = %e, "upstream stream broke");
            Some((Err(e), None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mask_userinfo;

    #[test]
    fn userinfo_is_masked() {
        let cases = [
            ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080/v1"),
            ("https://u:secret@host/v1", "https://***@host/v1"),
            ("https://u:secret@host", "https://***@host"),
            ("https://host/v1/a@b", "https://host/v1/a@b"),
        ];
        for (url, want) in cases {
            assert_eq!(mask_userinfo(url), want);
        }
    }
}
