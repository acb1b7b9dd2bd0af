//! Builds the application from a `Config` and serves it until shutdown: stop accepting, let
//! in-flight requests finish within the grace period, then return.

use crate::auth::Authenticator;
use crate::characters::CharacterService;
use crate::config::{Config, ConfigError};
use crate::conversations::ConversationService;
use crate::http::{self, AppState};
use crate::memory::{MemoryConfig, MemoryService};
use crate::prompt::tokens::Tokenizer;
use crate::store::{Store, StoreError};
use crate::upstream::{Upstreams, UpstreamsConfig};
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
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
}

/// Everything the handlers share, built from config.
pub fn build_state(config: Config) -> Result<AppState, StartError> {
    std::fs::create_dir_all(&config.data_dir)?;
    let auth = Authenticator::from_config(&config.auth, &config.data_dir)?;
    let store = Store::open(&config.db_path(), config.store.cache_capacity)?;
    let characters = CharacterService::new(store.clone(), config.limits.clone());
    let conversations = ConversationService::new(store.clone(), characters.clone());
    // TODO(lead): use `config.upstreams` and `config.memory` once Config has them; until then
    // the built-in default upstream and memory settings apply.
    let upstreams =
        Upstreams::new(&UpstreamsConfig::default()).map_err(|e| ConfigError::Invalid {
            key: "upstreams".into(),
            message: e.to_string(),
        })?;
    let tokenizer = Tokenizer::cl100k().map_err(|e| ConfigError::Invalid {
        key: "tokenizer".into(),
        message: e.to_string(),
    })?;
    let memory = MemoryService::new(
        store,
        characters.clone(),
        Arc::new(upstreams),
        tokenizer,
        MemoryConfig::default(),
    );
    Ok(AppState {
        config: Arc::new(config),
        auth: Arc::new(auth),
        characters,
        conversations,
        memory,
        ready: Arc::new(AtomicBool::new(false)),
    })
}

/// Serves `state` on `listener` until `shutdown` resolves, then drains for the grace period.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let grace = Duration::from_millis(state.config.http.shutdown_grace_ms);
    let ready = state.ready.clone();
    let app = http::router(state);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = stop_rx.changed().await;
    });
    let server = std::future::IntoFuture::into_future(server);
    tokio::pin!(server);
    ready.store(true, Ordering::Release);
    tokio::select! {
        res = &mut server => return res,
        _ = shutdown => {
            tracing::info!(grace_ms = grace.as_millis() as u64, "shutting down: draining in-flight requests");
            ready.store(false, Ordering::Release);
            let _ = stop_tx.send(true);
        }
    }
    match tokio::time::timeout(grace, server).await {
        Ok(res) => res,
        Err(_) => {
            tracing::warn!("grace period over; closing remaining connections");
            Ok(())
        }
    }
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
