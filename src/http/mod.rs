//! The HTTP surface: routing and the tower layers (request id, logs, panics, CORS, compression,
//! timeouts, body limits). Only this module knows JSON wire shapes and status codes.

pub mod cards;
pub mod characters;
pub mod conversations;
pub mod extract;
pub mod fast_path;
pub mod interact;
pub mod memory;
pub mod openai;
pub mod openapi;
pub mod ops;
pub mod plugins;
pub mod rate_limit;
pub mod request_id;
pub mod ws;

use crate::auth::Authenticator;
use crate::characters::CharacterService;
use crate::config::Config;
use crate::conversations::ConversationService;
use crate::error::ApiError;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::predicate::{And, NotForContentType, Predicate, SizeAbove};
use tower_http::compression::CompressionLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tracing::Span;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Shared state handed to every handler. axum clones it for every request and extractor, so a
/// clone is one reference count.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    /// Wraps the services for sharing.
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The services and settings every handler reads.
pub struct Shared {
    pub config: Arc<Config>,
    pub auth: Arc<Authenticator>,
    pub characters: CharacterService,
    pub conversations: ConversationService,
    pub interact: crate::interact::InteractService,
    pub memory: crate::memory::MemoryService,
    /// The plugin host (per-character behaviour plugins).
    pub plugins: Arc<crate::plugins::PluginHost>,
    /// Set once the server accepts requests; `/healthz` reports it.
    pub ready: Arc<AtomicBool>,
    /// Generation backends with their breakers; `/readyz` and `/metrics` read their state.
    pub upstreams: Arc<crate::upstream::Upstreams>,
    /// The Prometheus registry and its handles.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Per-caller token buckets.
    pub limiter: Arc<rate_limit::RateLimiter>,
}

/// The complete router with every layer.
pub fn router(state: AppState) -> Router {
    let config = state.config.clone();
    let mut api = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(characters::list, characters::create))
        .routes(routes!(
            characters::get,
            characters::update,
            characters::delete
        ))
        .routes(routes!(cards::import))
        .routes(routes!(cards::export))
        .routes(routes!(cards::get_lorebook, cards::put_lorebook))
        .routes(routes!(characters::get_avatar, characters::put_avatar))
        .routes(routes!(memory::list, memory::update))
        .routes(routes!(conversations::list))
        .routes(routes!(conversations::import))
        .routes(routes!(conversations::get, conversations::delete))
        .routes(routes!(conversations::export))
        .routes(routes!(
            conversations::edit_message,
            conversations::delete_message
        ))
        .routes(routes!(conversations::choose_swipe))
        .routes(routes!(interact::interact))
        .routes(routes!(interact::regenerate))
        .routes(routes!(interact::admin_upstreams))
        .routes(routes!(plugins::get_bindings, plugins::put_bindings))
        .routes(routes!(plugins::admin_stats))
        .routes(routes!(plugins::admin_reload))
        .routes(routes!(ws::upgrade))
        .routes(routes!(openai::models))
        .routes(routes!(openai::chat_completions))
        .routes(routes!(openai::custom_models))
        .routes(routes!(ops::backup))
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(openapi::document));
    if config.metrics.enabled {
        api = api.routes(routes!(ops::metrics));
    }
    let (api, doc) = api.split_for_parts();
    // Rendering a derived document cannot fail; an empty body would fail the OpenAPI test loudly.
    let doc = serde_json::to_vec(&doc).unwrap_or_default();
    // Each `Router::layer` call wraps every route in one more boxed service, and axum clones
    // the whole chain of boxes at every level per request; so the layers come as three stacks.
    let api = api
        .fallback(not_found)
        .layer(
            ServiceBuilder::new()
                .layer(middleware::from_fn_with_state(
                    state.clone(),
                    rate_limit::layer,
                ))
                .layer(Extension(openapi::Document(doc.into()))),
        )
        .with_state(state.clone());
    // Outermost, so the count and latency include every layer's own answers (413, 504, 429).
    with_layers(api, &config).layer(middleware::from_fn_with_state(state, crate::metrics::track))
}

/// The compression predicate's type, named so the fast path can hold a compression service.
pub type Compressible =
    And<And<And<SizeAbove, NotForContentType>, NotForContentType>, NotForContentType>;

/// Response compression (gzip or br, as the client accepts) for what `compressible` allows.
pub fn compression() -> CompressionLayer<Compressible> {
    CompressionLayer::new()
        .gzip(true)
        .br(true)
        .compress_when(compressible())
}

/// What is worth compressing: bodies of at least a kilobyte (a chat completion or an error is
/// smaller, and compressing it costs more than it saves on the wire), never images, gRPC or
/// event streams (SSE must flush every event).
pub fn compressible() -> Compressible {
    SizeAbove::new(1024)
        .and(NotForContentType::GRPC)
        .and(NotForContentType::IMAGES)
        .and(NotForContentType::SSE)
}

/// Wraps routes in the common tower layers as one stack, request id outermost. Each
/// `map_response` turns a body back into axum's where the next layer out cannot take the
/// inner layer's body type.
pub fn with_layers(api: Router, config: &Config) -> Router {
    let limit = config.http.body_limit_bytes;
    api.layer(
        ServiceBuilder::new()
            .layer(middleware::from_fn(request_id::layer))
            .map_response(IntoResponse::into_response)
            // The access log: a span per request named by its matched route.
            .layer(
                TraceLayer::new_for_http()
                    .make_span_with(|req: &Request| {
                        let route = req
                            .extensions()
                            .get::<MatchedPath>()
                            .map(|p| p.as_str().to_string())
                            .unwrap_or_else(|| "unmatched".into());
                        let id = req
                            .headers()
                            .get(request_id::HEADER)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("");
                        tracing::info_span!(
                            "request",
                            method = %req.method(),
                            route = %route,
                            request_id = %id,
                            user = tracing::field::Empty,
                        )
                    })
                    .on_request(())
                    .on_response(|res: &Response, latency: Duration, _span: &Span| {
                        tracing::info!(
                            status = res.status().as_u16(),
                            latency_ms = latency.as_secs_f64() * 1000.0,
                            "served"
                        );
                    })
                    .on_failure(()),
            )
            .map_response(IntoResponse::into_response)
            .layer(CatchPanicLayer::custom(on_panic))
            .layer(cors(config))
            // CORS answers preflights itself, with a default body that compression's lacks.
            .map_response(IntoResponse::into_response)
            .layer(compression())
            // Outside the timeout, whose own 504 needs a body type with a default.
            .layer(RequestBodyLimitLayer::new(limit))
            .layer(TimeoutLayer::with_status_code(
                StatusCode::GATEWAY_TIMEOUT,
                config.request_timeout(),
            ))
            .layer(DefaultBodyLimit::max(limit)),
    )
}

/// The configured CORS origins; `None` when any origin is allowed.
pub fn cors_origins(config: &Config) -> Option<Vec<HeaderValue>> {
    let origins = &config.http.cors_origins;
    if origins.iter().any(|o| o == "*") {
        return None;
    }
    Some(
        origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect(),
    )
}

fn cors(config: &Config) -> CorsLayer {
    let allow_origin = match cors_origins(config) {
        None => AllowOrigin::any(),
        Some(list) => AllowOrigin::list(list),
    };
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            HeaderName::from_static("authorization"),
            HeaderName::from_static("content-type"),
            HeaderName::from_static("accept"),
            HeaderName::from_static("x-requested-with"),
        ])
        .expose_headers([HeaderName::from_static(request_id::HEADER)])
        .max_age(Duration::from_secs(600))
}

/// The 500 envelope for a caught panic; the panic message goes to the log only.
pub fn on_panic(err: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = err
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| err.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    tracing::error!(panic = %what, "handler panicked");
    ApiError::new(
        crate::error::ErrorCode::InternalServerError,
        "internal server error; the request id identifies it in the server log",
    )
    .into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see the README for the API")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_panicking_handler_becomes_a_500_envelope() {
        async fn boom() -> &'static str {
            panic!("kaboom")
        }
        let app = with_layers(Router::new().route("/boom", get(boom)), &Config::default());
        let res = app
            .oneshot(
                Request::builder()
                    .uri("/boom")
                    .header("x-request-id", "panic-1")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(res.headers()["x-request-id"], "panic-1");
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "INTERNAL_SERVER_ERROR");
        assert_eq!(v["error"]["requestId"], "panic-1");
        assert!(!v["error"]["message"].as_str().unwrap().contains("kaboom"));
    }

    #[tokio::test]
    async fn a_slow_handler_times_out_with_an_envelope() {
        async fn slow() -> &'static str {
            tokio::time::sleep(Duration::from_secs(5)).await;
            "late"
        }
        let mut config = Config::default();
        config.http.request_timeout_ms = 50;
        let app = with_layers(Router::new().route("/slow", get(slow)), &config);
        let res = app
            .oneshot(Request::builder().uri("/slow").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "TIMEOUT");
    }
}
