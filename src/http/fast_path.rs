//! `POST /v1/chat/completions` served straight from the connection instead of through the
//! router. It is the route NextChat calls for every message, and for a passthrough model the
//! generic stack (axum routing plus ten tower layers, each cloned and boxed per request) cost
//! more CPU than the proxying itself (docs/BENCHMARKS.md, #9). This does the same work inline,
//! in the same order: request id, CORS, body limit, rate limit, timeout, panic guard,
//! compression, access log and metrics. tests/fast_path.rs holds it to the generic stack's
//! behaviour.

use super::rate_limit::{self, Class};
use super::{openai, request_id, AppState};
use crate::config::Config;
use crate::error::ApiError;
use crate::metrics::RequestSeries;
use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::{Body as _, Incoming};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};
use tower::{Layer, ServiceExt};
use tower_http::compression::{CompressionLayer, Predicate};
use tracing::Instrument;

/// The one route served here.
pub const ROUTE: &str = "/v1/chat/completions";

/// The chat-completions route with its layers done inline; built once per server.
pub struct FastPath {
    state: AppState,
    cors: CorsHeaders,
    compression: CompressionLayer<super::Compressible>,
    compressible: super::Compressible,
    body_limit: usize,
    timeout: Duration,
    /// The metrics series of a 200, the answer nearly every request gets.
    ok_series: RequestSeries,
}

impl FastPath {
    /// Builds the route from the state's config.
    pub fn new(state: AppState) -> Self {
        let config = state.config.clone();
        Self {
            cors: CorsHeaders::new(&config),
            compression: super::compression(),
            compressible: super::compressible(),
            body_limit: config.http.body_limit_bytes,
            timeout: config.request_timeout(),
            ok_series: state.metrics.request_series(ROUTE, "POST", StatusCode::OK),
            state,
        }
    }

    /// Whether `req` is for this route (anything else, preflights included, goes to the router).
    pub fn claims<B>(req: &Request<B>) -> bool {
        req.method() == Method::POST && req.uri().path() == ROUTE
    }

    /// Answers one request the way the router and its layers would.
    pub async fn serve(&self, req: Request<Incoming>, peer: SocketAddr) -> Response {
        let started = Instant::now();
        let id = request_id::from_request(req.headers());
        let http1 = req.version() <= Version::HTTP_11;
        let origin = req.headers().get(header::ORIGIN).cloned();
        let span = tracing::info_span!(
            "request",
            method = "POST",
            route = ROUTE,
            request_id = %id,
            user = tracing::field::Empty,
        );
        let answer = async {
            let guarded = AssertUnwindSafe(Box::pin(self.respond(req, peer))).catch_unwind();
            // Bare statuses (413, 504) get their envelope from `normalize`, as on the router.
            request_id::normalize(match tokio::time::timeout(self.timeout, guarded).await {
                Ok(Ok(response)) => response,
                Ok(Err(panic)) => super::on_panic(panic),
                Err(_) => StatusCode::GATEWAY_TIMEOUT.into_response(),
            })
        };
        // A disabled span (the access log off) is not worth entering on every poll.
        let mut response = if span.is_disabled() {
            request_id::scope(id.clone(), answer).await
        } else {
            request_id::scope(id.clone(), answer)
                .instrument(span.clone())
                .await
        };
        self.cors.apply(origin.as_ref(), response.headers_mut());
        request_id::stamp(&mut response, &id, http1);
        let elapsed = started.elapsed();
        span.in_scope(|| {
            tracing::info!(
                status = response.status().as_u16(),
                latency_ms = elapsed.as_secs_f64() * 1000.0,
                "served"
            )
        });
        if response.status() == StatusCode::OK {
            self.ok_series.observe(elapsed);
        } else {
            self.state
                .metrics
                .observe_request(ROUTE, "POST", response.status(), elapsed);
        }
        response
    }

    /// Body limit, rate limit, the handler, then compression.
    async fn respond(&self, req: Request<Incoming>, peer: SocketAddr) -> Response {
        let (parts, body) = req.into_parts();
        if body.size_hint().lower() > self.body_limit as u64 {
            return StatusCode::PAYLOAD_TOO_LARGE.into_response();
        }
        if let Err(limited) =
            rate_limit::admit(&self.state, &parts.headers, Some(peer), Class::Interact)
        {
            return limited.into_response();
        }
        let bytes = match Limited::new(body, self.body_limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<LengthLimitError>() => {
                return StatusCode::PAYLOAD_TOO_LARGE.into_response()
            }
            Err(e) => {
                return ApiError::validation("body", format!("could not read the body: {e}"))
                    .into_response()
            }
        };
        let response = openai::complete(&self.state, &parts.headers, bytes).await;
        self.compress(parts, response).await
    }

    /// The router's compression layer, applied to the finished response. What the layer would
    /// pass through untouched (a reply under a kilobyte, an event stream: nearly every reply
    /// here) skips it, and with it the layer's body wrapper.
    async fn compress(&self, request: Parts, response: Response) -> Response {
        let headers = response.headers();
        if headers.contains_key(header::CONTENT_ENCODING)
            || headers.contains_key(header::CONTENT_RANGE)
            || !self.compressible.should_compress(&response)
        {
            return response;
        }
        let mut once = Some(response);
        let finished = tower::service_fn(move |_: Request<()>| {
            std::future::ready(Ok::<_, Infallible>(once.take().unwrap_or_default()))
        });
        match self
            .compression
            .layer(finished)
            .oneshot(Request::from_parts(request, ()))
            .await
        {
            Ok(response) => response.map(Body::new),
            Err(never) => match never {},
        }
    }
}

/// The `Vary` value `CorsLayer` sets by default: the preflight request headers, joined.
fn vary_value() -> HeaderValue {
    let names: Vec<String> = tower_http::cors::preflight_request_headers()
        .map(|h| h.as_str().to_owned())
        .collect();
    HeaderValue::from_str(&names.join(", ")).unwrap_or(HeaderValue::from_static("origin"))
}

/// The CORS headers of a non-preflight response, as the router's `CorsLayer` sets them.
struct CorsHeaders {
    /// `None` allows any origin.
    origins: Option<Vec<HeaderValue>>,
    vary: HeaderValue,
    expose: HeaderValue,
}

impl CorsHeaders {
    fn new(config: &Config) -> Self {
        Self {
            origins: super::cors_origins(config),
            vary: vary_value(),
            expose: HeaderValue::from_static(request_id::HEADER),
        }
    }

    fn apply(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
        headers.append(header::VARY, self.vary.clone());
        let allow = match &self.origins {
            None => Some(HeaderValue::from_static("*")),
            Some(list) => origin.filter(|o| list.contains(o)).cloned(),
        };
        if let Some(v) = allow {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        }
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, self.expose.clone());
    }
}
