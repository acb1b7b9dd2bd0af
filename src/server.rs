//! Builds the application from a `Config` and serves it until shutdown: stop accepting, let
//! in-flight requests finish within the grace period, then return.

use crate::auth::Authenticator;
use crate::characters::CharacterService;
use crate::config::{Config, ConfigError};
use crate::conversations::ConversationService;
use crate::http::rate_limit::RateLimiter;
use crate::http::{self, AppState, Shared};
use crate::interact::InteractService;
use crate::memory::MemoryService;
use crate::metrics::{GaugeGuard, Metrics};
use crate::prompt::tokens::Tokenizer;
use crate::store::{Store, StoreError};
use crate::tls::Tls;
use crate::upstream::Upstreams;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the database: {0}")]
    Store(#[from] StoreError),
    #[error("cannot load plugins: {0}")]
    Plugins(String),
    #[error("cannot load the tokenizer: {0}")]
    Tokenizer(String),
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot set up metrics: {0}")]
    Metrics(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Everything the handlers share, built from config.
pub fn build_state(config: Config) -> Result<AppState, StartError> {
    std::fs::create_dir_all(&config.data_dir)?;
    let auth = Authenticator::from_config(&config.auth, &config.data_dir)?;
    let upstreams =
        Arc::new(
            Upstreams::new(&config.upstreams).map_err(|e| ConfigError::Invalid {
                key: "upstreams".into(),
                message: e.to_string(),
            })?,
        );
    let metrics = Metrics::new(config.db_path()).map_err(|e| StartError::Metrics(e.to_string()))?;
    let store = Store::open(&config.db_path(), &config.store)?;
    let characters = CharacterService::new(
        store.clone(),
        config.limits.clone(),
        config.store.cache_capacity,
    );
    let conversations = ConversationService::new(store.clone(), characters.clone());
    let tokenizer = Tokenizer::cl100k().map_err(|e| StartError::Tokenizer(e.to_string()))?;
    let memory = MemoryService::new(
        store.clone(),
        characters.clone(),
        upstreams.clone(),
        tokenizer.clone(),
        config.memory.clone(),
    );
    let plugins = crate::plugins::PluginHost::load(&config.plugins)
        .map_err(|e| StartError::Plugins(e.to_string()))?;
    if config.plugins.watch && tokio::runtime::Handle::try_current().is_ok() {
        // Reload on file change; the watcher holds only a weak reference to the host.
        let _watcher = crate::plugins::spawn_watcher(&plugins);
    }
    let interact = InteractService::new(
        crate::interact::InteractDeps {
            store,
            characters: characters.clone(),
            conversations: conversations.clone(),
            memory: memory.clone(),
            plugins: plugins.clone(),
            upstreams: upstreams.clone(),
            tokenizer,
        },
        config.prompt.clone(),
    );
    let limiter = RateLimiter::new(&config.rate_limit);
    Ok(AppState::new(Shared {
        interact,
        config: Arc::new(config),
        auth: Arc::new(auth),
        characters,
        conversations,
        memory,
        plugins,
        ready: Arc::new(AtomicBool::new(false)),
        upstreams,
        metrics: Arc::new(metrics),
        limiter: Arc::new(limiter),
    }))
}

/// Serves `state` over plain HTTP on `listener` until `shutdown` resolves, then drains for the
/// grace period.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    serve(listener, state, None, shutdown).await
}

/// Like `run`, but every connection is TLS (h2 or HTTP/1.1 by ALPN) with the certificate
/// `tls` currently holds, and a certificate watcher runs alongside.
pub async fn run_tls(
    listener: TcpListener,
    state: AppState,
    tls: Arc<Tls>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let watcher = tokio::spawn(tls.clone().watch());
    let res = serve(listener, state, Some(tls), shutdown).await;
    watcher.abort();
    res
}

/// The accept loop shared by plain and TLS serving. Each connection runs on its own task and
/// is registered with `GracefulShutdown`, so shutdown stops accepting, lets in-flight requests
/// finish (HTTP/1.1 connections close after their current response, h2 sends GOAWAY) and waits
/// at most the grace period.
async fn serve(
    listener: TcpListener,
    state: AppState,
    tls: Option<Arc<Tls>>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let grace = Duration::from_millis(state.config.http.shutdown_grace_ms);
    let ready = state.ready.clone();
    let metrics = state.metrics.clone();
    let fast = Arc::new(http::fast_path::FastPath::new(state.clone()));
    let store = state.characters.store().clone();
    let app = http::router(state);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    ready.store(true, Ordering::Release);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning, keep serving open sockets.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let socket = GaugeGuard::new(&metrics.active_sockets);
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        let watcher = graceful.watcher();
        let app = app.clone();
        let fast = fast.clone();
        tokio::spawn(async move {
            let _socket = socket;
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let (app, fast) = (app.clone(), fast.clone());
                async move {
                    if http::fast_path::FastPath::claims(&req) {
                        return Ok(fast.serve(req, peer).await);
                    }
                    let mut req = req.map(axum::body::Body::new);
                    req.extensions_mut().insert(ConnectInfo(peer));
                    tower::ServiceExt::oneshot(app, req).await
                }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let result = match acceptor {
                None => {
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "tls handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "tls handshake timed out");
                                return;
                            }
                        };
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        "shutting down: draining in-flight requests"
    );
    ready.store(false, Ordering::Release);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; closing remaining connections");
    }
    // The turns the log made durable go into the database file, so a copy of the file taken
    // after a clean stop is complete.
    match tokio::task::spawn_blocking(move || store.checkpoint_turns()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "turn log checkpoint at shutdown failed"),
        Err(e) => tracing::warn!(error = %e, "turn log checkpoint at shutdown did not run"),
    }
    Ok(())
}

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers every request on `listener` with 308 to the same host and path over https on
/// `https_port`, until `shutdown` resolves.
pub async fn run_redirect(
    listener: TcpListener,
    https_port: u16,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "redirect accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                std::future::ready(Ok::<_, std::convert::Infallible>(redirect_response(
                    &req, https_port,
                )))
            });
            let conn = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .into_owned();
            let _ = watcher.watch(conn).await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
    Ok(())
}

/// The 308 answer of the redirect listener.
fn redirect_response<B>(req: &hyper::Request<B>, https_port: u16) -> hyper::Response<String> {
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .unwrap_or("localhost");
    // Strip any port (keeping IPv6 brackets) and put the https one in its place.
    let bare = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let location = if https_port == 443 {
        format!("https://{bare}{path}")
    } else {
        format!("https://{bare}:{https_port}{path}")
    };
    let mut res = hyper::Response::new(format!("moved to {location}\n"));
    *res.status_mut() = hyper::StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = hyper::header::HeaderValue::from_str(&location) {
        res.headers_mut().insert(hyper::header::LOCATION, v);
    }
    res
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_keeps_host_path_and_query() {
        for (host, port, want) in [
            ("example.com", 443, "https://example.com/a?b=1"),
            ("example.com:80", 8443, "https://example.com:8443/a?b=1"),
            ("[::1]:80", 443, "https://[::1]/a?b=1"),
            ("[::1]", 8443, "https://[::1]:8443/a?b=1"),
        ] {
            let req = hyper::Request::get("/a?b=1")
                .header("host", host)
                .body(())
                .unwrap();
            let res = redirect_response(&req, port);
            assert_eq!(res.status(), 308);
            assert_eq!(res.headers()["location"], want, "{host}");
        }
    }
}
