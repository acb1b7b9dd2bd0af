//! Per-caller token buckets: one budget for generation routes, one for everything else.
//! Beyond the budget a request gets 429 `RATE_LIMITED` with `Retry-After`.
//!
//! The caller is the JWT `sub`, so the middleware verifies the bearer token. To keep that to
//! one verification per request it stores the verified user in the request extensions, where the
//! `Auth`/`MaybeAuth` extractors pick it up. Callers without a valid token are keyed by peer IP,
//! which also slows down token guessing. Health and metrics are never limited so probes keep
//! working under load.

use super::AppState;
use crate::auth::User;
use crate::config::RateLimitConfig;
use crate::error::{ApiError, ErrorCode};
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use moka::sync::Cache;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// A user verified by the rate-limit middleware, reused by the auth extractors.
#[derive(Debug, Clone)]
pub struct VerifiedUser(pub User);

/// Which budget a route draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Generation: `/interact`, `/regenerate`, `/v1/chat/completions`, `/ws`.
    Interact,
    /// Every other limited route.
    Other,
}

/// Classifies a request path; `None` for routes that are never limited.
pub fn classify(path: &str) -> Option<Class> {
    if matches!(path, "/healthz" | "/readyz" | "/metrics") {
        return None;
    }
    let path = path.trim_end_matches('/');
    if path.ends_with("/interact")
        || path.ends_with("/regenerate")
        || path == "/v1/chat/completions"
        || path == "/ws"
    {
        Some(Class::Interact)
    } else {
        Some(Class::Other)
    }
}

/// One bucket: up to a minute's budget of tokens, refilled continuously.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Every caller's buckets. Idle buckets expire, so memory follows active callers only.
pub struct RateLimiter {
    interact_per_minute: u32,
    other_per_minute: u32,
    /// (caller, class) → bucket; a `Mutex` per bucket because one caller's requests may land on
    /// several worker threads at once, and the critical section is a few float operations.
    buckets: Cache<(String, Class), Arc<Mutex<Bucket>>>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("interact_per_minute", &self.interact_per_minute)
            .field("other_per_minute", &self.other_per_minute)
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// Builds the limiter from config.
    pub fn new(cfg: &RateLimitConfig) -> Self {
        Self {
            interact_per_minute: cfg.interact_per_minute,
            other_per_minute: cfg.other_per_minute,
            buckets: Cache::builder()
                .max_capacity(100_000)
                // A bucket idle for two minutes is full again; forgetting it changes nothing.
                .time_to_idle(Duration::from_secs(120))
                .build(),
        }
    }

    /// Whether any budget is limited.
    pub fn enabled(&self) -> bool {
        self.interact_per_minute > 0 || self.other_per_minute > 0
    }

    /// Takes one token for `caller`; `Err(wait)` says how long until one is available.
    pub fn check(&self, caller: &str, class: Class, now: Instant) -> Result<(), Duration> {
        let per_minute = match class {
            Class::Interact => self.interact_per_minute,
            Class::Other => self.other_per_minute,
        };
        if per_minute == 0 {
            return Ok(());
        }
        let capacity = f64::from(per_minute);
        let per_sec = capacity / 60.0;
        let bucket = self.buckets.get_with((caller.to_owned(), class), || {
            Arc::new(Mutex::new(Bucket {
                tokens: capacity,
                last: now,
            }))
        });
        // A poisoned lock only means another thread panicked mid-update; the numbers are
        // still usable.
        let mut b = bucket.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * per_sec).min(capacity);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / per_sec))
        }
    }
}

/// Middleware: identifies the caller, charges its bucket, and hands the verified user on.
pub async fn layer(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    // CORS preflights carry no credentials and precede a real request that is counted.
    if req.method() == http::Method::OPTIONS {
        return next.run(req).await;
    }
    let Some(class) = classify(req.uri().path()) else {
        return next.run(req).await;
    };
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| *addr);
    match admit(&state, req.headers(), peer, class) {
        Ok(Some(user)) => {
            req.extensions_mut().insert(VerifiedUser(user));
            next.run(req).await
        }
        Ok(None) => next.run(req).await,
        Err(limited) => limited.into_response(),
    }
}

/// Charges the caller of a `class` request (its verified user, else its peer address) one
/// token. `Ok` carries the user when the bearer token verified; `Err` is the 429 to answer.
pub fn admit(
    state: &AppState,
    headers: &http::HeaderMap,
    peer: Option<SocketAddr>,
    class: Class,
) -> Result<Option<User>, ApiError> {
    if !state.limiter.enabled() {
        return Ok(None);
    }
    let user = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(super::extract::bearer)
        .and_then(|token| state.auth.verify(token).ok());
    let caller = match (&user, peer) {
        (Some(u), _) => format!("user:{}", u.id),
        (None, Some(addr)) => format!("ip:{}", addr.ip()),
        (None, None) => "ip:unknown".to_owned(),
    };
    match state.limiter.check(&caller, class, Instant::now()) {
        Ok(()) => Ok(user),
        Err(wait) => Err(ApiError::new(
            ErrorCode::RateLimited,
            "too many requests; wait for the retry-after seconds and try again",
        )
        .with_retry_after(wait)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_classified() {
        for (path, want) in [
            ("/healthz", None),
            ("/metrics", None),
            ("/readyz", None),
            ("/api/characters", Some(Class::Other)),
            ("/api/characters/x/interact", Some(Class::Interact)),
            ("/api/conversations/x/regenerate", Some(Class::Interact)),
            ("/v1/chat/completions", Some(Class::Interact)),
            ("/v1/models", Some(Class::Other)),
            ("/ws", Some(Class::Interact)),
        ] {
            assert_eq!(classify(path), want, "{path}");
        }
    }

    #[test]
    fn bucket_allows_a_burst_then_refills() {
        let limiter = RateLimiter::new(&RateLimitConfig {
            interact_per_minute: 2,
            other_per_minute: 0,
        });
        let t0 = Instant::now();
        assert!(limiter.check("a", Class::Interact, t0).is_ok());
        assert!(limiter.check("a", Class::Interact, t0).is_ok());
        let wait = limiter.check("a", Class::Interact, t0).unwrap_err();
        assert!(wait > Duration::from_secs(29) && wait <= Duration::from_secs(30));
        // Another caller and the unlimited class are unaffected.
        assert!(limiter.check("b", Class::Interact, t0).is_ok());
        for _ in 0..1000 {
            assert!(limiter.check("a", Class::Other, t0).is_ok());
        }
        assert!(limiter
            .check("a", Class::Interact, t0 + Duration::from_secs(30))
            .is_ok());
    }
}
