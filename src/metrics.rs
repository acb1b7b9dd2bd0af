//! Prometheus metrics: one `Metrics` registry built at startup and shared through `AppState`
//! (no global registry), the tower middleware that counts requests and times them by matched
//! route and status, and the handles other modules use (streams, sockets, plugins, upstreams).
//!
//! Values that already live elsewhere (database size, breaker states, cache hits, upstream
//! attempt counters) are read at scrape time in `Metrics::render`, so the hot path never touches
//! them twice.

use crate::http::AppState;
use crate::upstream::BreakerState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use std::path::PathBuf;
use tokio::time::Instant;

/// Latency buckets in seconds: sub-millisecond store reads up to multi-minute generations.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Every metric Taproom exports, registered in its own registry.
pub struct Metrics {
    registry: Registry,
    /// `taproom_http_requests_total{route,method,status}`.
    pub http_requests: IntCounterVec,
    /// `taproom_http_request_duration_seconds{route,method,status}` (to response headers).
    pub http_duration: HistogramVec,
    /// `taproom_upstream_attempts_total{upstream}`: every attempt, first tries included. Brought
    /// up to the upstream module's own atomic totals at scrape time, so nothing else bumps it.
    upstream_attempts: IntCounterVec,
    /// `taproom_upstream_retries_total{upstream}`: attempts after the first (same source).
    upstream_retries: IntCounterVec,
    /// `taproom_upstream_breaker_state{upstream,state}`: 1 for the current state, else 0.
    upstream_breaker: IntGaugeVec,
    /// `taproom_character_cache_{hits,misses}_total` and the derived ratio.
    cache_hits: IntCounter,
    cache_misses: IntCounter,
    cache_hit_ratio: Gauge,
    /// `taproom_active_streams`: SSE / WebSocket replies in flight. Streaming code holds a
    /// `GaugeGuard::new(&metrics.active_streams)` for as long as a stream is open.
    pub active_streams: IntGauge,
    /// `taproom_active_sockets`: accepted TCP connections still open.
    pub active_sockets: IntGauge,
    /// `taproom_plugin_calls_total{plugin,hook}`; the plugin host records calls through
    /// `record_plugin_call`.
    pub plugin_calls: IntCounterVec,
    /// `taproom_plugin_call_duration_seconds{plugin,hook}`.
    pub plugin_duration: HistogramVec,
    /// `taproom_plugin_traps_total{plugin,hook}`: traps, fuel or deadline overruns.
    pub plugin_traps: IntCounterVec,
    /// `taproom_database_size_bytes`: size of `taproom.redb`.
    db_size: IntGauge,
    /// The file measured by `db_size`.
    db_path: PathBuf,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// `taproom_http_requests_total` and `taproom_http_request_duration_seconds` of one label set.
#[derive(Clone)]
pub struct RequestSeries {
    count: IntCounter,
    duration: prometheus::Histogram,
}

impl RequestSeries {
    /// Counts and times one request of this series.
    pub fn observe(&self, elapsed: std::time::Duration) {
        self.count.inc();
        self.duration.observe(elapsed.as_secs_f64());
    }
}

/// What a scrape reads from the rest of the application.
pub struct Snapshot<'a> {
    /// Character cache (hits, misses) since start.
    pub cache: (u64, u64),
    /// Per upstream: name, breaker state, attempts and retries since start.
    pub upstreams: &'a [(String, BreakerState, u64, u64)],
}

impl Metrics {
    /// Counts and times one served request.
    pub fn observe_request(
        &self,
        route: &str,
        method: &str,
        status: axum::http::StatusCode,
        elapsed: std::time::Duration,
    ) {
        self.request_series(route, method, status).observe(elapsed);
    }

    /// The counter and histogram of one route, method and status, looked up once: a route that
    /// holds them skips hashing its labels on every request.
    pub fn request_series(
        &self,
        route: &str,
        method: &str,
        status: axum::http::StatusCode,
    ) -> RequestSeries {
        let labels = [route, method, status.as_str()];
        RequestSeries {
            count: self.http_requests.with_label_values(&labels),
            duration: self.http_duration.with_label_values(&labels),
        }
    }

    /// Registers every metric; `db_path` is the redb file whose size is reported.
    pub fn new(db_path: PathBuf) -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("taproom".into()), None)?;
        let http_labels = &["route", "method", "status"];
        let plugin_labels = &["plugin", "hook"];
        let http_requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests answered"),
            http_labels,
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "Time from request to response headers",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            http_labels,
        )?;
        let upstream_attempts = IntCounterVec::new(
            Opts::new(
                "upstream_attempts_total",
                "Upstream attempts, first tries included",
            ),
            &["upstream"],
        )?;
        let upstream_retries = IntCounterVec::new(
            Opts::new(
                "upstream_retries_total",
                "Upstream attempts after the first",
            ),
            &["upstream"],
        )?;
        let upstream_breaker = IntGaugeVec::new(
            Opts::new(
                "upstream_breaker_state",
                "Circuit breaker state per upstream: 1 for the current state",
            ),
            &["upstream", "state"],
        )?;
        let cache_hits = IntCounter::new(
            "character_cache_hits_total",
            "Character reads served from the cache",
        )?;
        let cache_misses = IntCounter::new(
            "character_cache_misses_total",
            "Character reads that went to the database",
        )?;
        let cache_hit_ratio = Gauge::new(
            "character_cache_hit_ratio",
            "Hits / (hits + misses) since start; 0 before the first read",
        )?;
        let active_streams = IntGauge::new("active_streams", "Streamed replies in flight")?;
        let active_sockets = IntGauge::new("active_sockets", "Open client connections")?;
        let plugin_calls = IntCounterVec::new(
            Opts::new("plugin_calls_total", "Plugin hook calls"),
            plugin_labels,
        )?;
        let plugin_duration = HistogramVec::new(
            HistogramOpts::new("plugin_call_duration_seconds", "Plugin hook call time")
                .buckets(vec![0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            plugin_labels,
        )?;
        let plugin_traps = IntCounterVec::new(
            Opts::new(
                "plugin_traps_total",
                "Plugin calls that trapped or ran out of fuel or time",
            ),
            plugin_labels,
        )?;
        let db_size = IntGauge::new("database_size_bytes", "Size of the redb file")?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_duration.clone()))?;
        registry.register(Box::new(upstream_attempts.clone()))?;
        registry.register(Box::new(upstream_retries.clone()))?;
        registry.register(Box::new(upstream_breaker.clone()))?;
        registry.register(Box::new(cache_hits.clone()))?;
        registry.register(Box::new(cache_misses.clone()))?;
        registry.register(Box::new(cache_hit_ratio.clone()))?;
        registry.register(Box::new(active_streams.clone()))?;
        registry.register(Box::new(active_sockets.clone()))?;
        registry.register(Box::new(plugin_calls.clone()))?;
        registry.register(Box::new(plugin_duration.clone()))?;
        registry.register(Box::new(plugin_traps.clone()))?;
        registry.register(Box::new(db_size.clone()))?;
        Ok(Self {
            registry,
            http_requests,
            http_duration,
            upstream_attempts,
            upstream_retries,
            upstream_breaker,
            cache_hits,
            cache_misses,
            cache_hit_ratio,
            active_streams,
            active_sockets,
            plugin_calls,
            plugin_duration,
            plugin_traps,
            db_size,
            db_path,
        })
    }

    /// Records one plugin call; `trapped` counts traps and fuel or deadline overruns.
    pub fn record_plugin_call(&self, plugin: &str, hook: &str, seconds: f64, trapped: bool) {
        let labels = &[plugin, hook];
        self.plugin_calls.with_label_values(labels).inc();
        self.plugin_duration
            .with_label_values(labels)
            .observe(seconds);
        if trapped {
            self.plugin_traps.with_label_values(labels).inc();
        }
    }

    /// Updates the scrape-time values and encodes everything in the Prometheus text format.
    pub fn render(&self, snap: &Snapshot<'_>) -> Result<String, prometheus::Error> {
        let size = std::fs::metadata(&self.db_path)
            .map(|m| m.len())
            .unwrap_or(0);
        self.db_size.set(i64::try_from(size).unwrap_or(i64::MAX));
        let (hits, misses) = snap.cache;
        // The store owns the monotonic totals; bring the exported counters up to them.
        self.cache_hits
            .inc_by(hits.saturating_sub(self.cache_hits.get()));
        self.cache_misses
            .inc_by(misses.saturating_sub(self.cache_misses.get()));
        let total = hits + misses;
        self.cache_hit_ratio.set(if total == 0 {
            0.0
        } else {
            hits as f64 / total as f64
        });
        for (name, state, attempts, retries) in snap.upstreams {
            for s in [
                BreakerState::Closed,
                BreakerState::Open,
                BreakerState::HalfOpen,
            ] {
                self.upstream_breaker
                    .with_label_values(&[name.as_str(), breaker_label(s)])
                    .set(i64::from(s == *state));
            }
            let a = self.upstream_attempts.with_label_values(&[name.as_str()]);
            a.inc_by(attempts.saturating_sub(a.get()));
            let r = self.upstream_retries.with_label_values(&[name.as_str()]);
            r.inc_by(retries.saturating_sub(r.get()));
        }
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

/// The label value of a breaker state.
pub fn breaker_label(state: BreakerState) -> &'static str {
    match state {
        BreakerState::Closed => "closed",
        BreakerState::Open => "open",
        BreakerState::HalfOpen => "half_open",
    }
}

/// Keeps a gauge raised while alive: one per open socket or stream.
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    /// Increments `gauge` now and decrements it on drop.
    pub fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Middleware: counts and times every request by matched route (the route template, so ids do
/// not explode the label set), method and status.
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    // Only the standard methods get their own label, for the same cardinality reason.
    let method = match *req.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let response = next.run(req).await;
    state
        .metrics
        .observe_request(&route, method, response.status(), started.elapsed());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_reports_scrape_time_values() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("taproom.redb");
        std::fs::write(&db, vec![0u8; 4096]).unwrap();
        let m = Metrics::new(db).unwrap();
        m.record_plugin_call("mood", "before-generate", 0.002, true);
        let ups = vec![("main".to_string(), BreakerState::Open, 7, 2)];
        let text = m
            .render(&Snapshot {
                cache: (3, 1),
                upstreams: &ups,
            })
            .unwrap();
        for want in [
            "taproom_database_size_bytes 4096",
            "taproom_character_cache_hit_ratio 0.75",
            "taproom_character_cache_hits_total 3",
            r#"taproom_upstream_breaker_state{state="open",upstream="main"} 1"#,
            r#"taproom_upstream_breaker_state{state="closed",upstream="main"} 0"#,
            r#"taproom_upstream_attempts_total{upstream="main"} 7"#,
            r#"taproom_upstream_retries_total{upstream="main"} 2"#,
            r#"taproom_plugin_traps_total{hook="before-generate",plugin="mood"} 1"#,
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        // A second scrape with the same totals must not double-count.
        let text = m
            .render(&Snapshot {
                cache: (3, 1),
                upstreams: &ups,
            })
            .unwrap();
        assert!(text.contains("taproom_character_cache_hits_total 3"));
        assert!(text.contains(r#"taproom_upstream_attempts_total{upstream="main"} 7"#));
    }
}
