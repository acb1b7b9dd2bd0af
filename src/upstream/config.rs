//! Upstream configuration: the `[upstreams]` table, holding `default = "<name>"` and one
//! `[upstreams.<name>]` sub-table per upstream.
//!
//! Field names follow the spec's `STAPIConfig`, `RetryConfig`, `CircuitBreakerConfig` and
//! `STWebSocketConfig`, in snake_case, with durations as integer milliseconds (`_ms`). Every struct
//! rejects unknown keys so a typo fails loudly at startup instead of silently using a default.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Name of the upstream created by `Default` and targeted by the `TAPROOM_UPSTREAM_*` variables
/// when no other default is configured.
pub const DEFAULT_UPSTREAM_NAME: &str = "main";

/// All configured upstreams plus the name of the one used when a caller names none.
///
/// In TOML this is one table: the `default` key names the default upstream and every other key
/// is an upstream (`[upstreams.main]`, `[upstreams.openrouter]`, ...), so "default" cannot be an
/// upstream name. Without `default`, a single configured upstream is the default; with no
/// upstream at all, the built-in `main` (OpenAI-compatible at `http://127.0.0.1:8080/v1`) is used.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamsConfig {
    /// Name of the default upstream; must be a key of `upstreams`.
    pub default: String,
    /// Named upstreams, keyed by a short name used in logs and at `GET /api/admin/upstreams`.
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// A bad `TAPROOM_UPSTREAM_*` value seen by `apply_env`, reported by `validate`.
    env_error: Option<String>,
}

impl Default for UpstreamsConfig {
    fn default() -> Self {
        let mut upstreams = BTreeMap::new();
        upstreams.insert(DEFAULT_UPSTREAM_NAME.to_owned(), UpstreamConfig::default());
        Self {
            default: DEFAULT_UPSTREAM_NAME.to_owned(),
            upstreams,
            env_error: None,
        }
    }
}

impl<'de> Deserialize<'de> for UpstreamsConfig {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = UpstreamsConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table with `default = \"name\"` and one sub-table per upstream")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut default = None;
                let mut upstreams = BTreeMap::new();
                // Read key by key so a bad field inside one upstream reports its own message
                // (an untagged enum would collapse it into "did not match any variant").
                while let Some(key) = map.next_key::<String>()? {
                    if key == "default" {
                        default = Some(map.next_value::<String>()?);
                    } else {
                        let upstream = map.next_value::<UpstreamConfig>()?;
                        upstreams.insert(key, upstream);
                    }
                }
                if upstreams.is_empty() {
                    let mut cfg = UpstreamsConfig::default();
                    if let Some(d) = default {
                        cfg.default = d;
                    }
                    return Ok(cfg);
                }
                let default = match default {
                    Some(d) => d,
                    None if upstreams.len() == 1 => {
                        upstreams.keys().next().cloned().unwrap_or_default()
                    }
                    None => DEFAULT_UPSTREAM_NAME.to_owned(),
                };
                Ok(UpstreamsConfig {
                    default,
                    upstreams,
                    env_error: None,
                })
            }
        }
        de.deserialize_map(Visit)
    }
}

/// Which wire protocol an upstream speaks.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    /// OpenAI-compatible `POST {url}/chat/completions`, JSON or SSE.
    Openai,
    /// The spec's SillyTavern API: HTTP generate plus WebSocket streaming.
    Sillytavern,
}

impl UpstreamKind {
    /// Lowercase name as used in config and status output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::Sillytavern => "sillytavern",
        }
    }
}

/// An upstream credential; its `Debug` never shows the value so it cannot leak through logs.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key read from config or the environment.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The secret itself; only the request builders call this.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when no key is configured (local servers such as llama.cpp need none).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("ApiKey(<none>)")
        } else {
            f.write_str("ApiKey(<redacted>)")
        }
    }
}

/// One upstream: the spec's `STAPIConfig` plus retry, breaker and WebSocket settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Protocol spoken by the upstream.
    pub kind: UpstreamKind,
    /// Base URL (`baseURL`): for `openai` the part before `/chat/completions`.
    pub url: String,
    /// Bearer token (`apiKey`); empty sends no `Authorization` header.
    pub api_key: ApiKey,
    /// Model name sent when the request does not name one.
    pub model: String,
    /// Per-attempt timeout (`timeout`): connect plus response headers, and the longest silence
    /// tolerated between streamed chunks.
    pub timeout_ms: u64,
    /// Extra PEM CA bundle trusted in addition to the system roots.
    pub ca_file: Option<PathBuf>,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout_ms: u64,
    /// Most idle pooled connections kept per host.
    pub pool_max_idle_per_host: usize,
    /// Retry policy (`RetryConfig`).
    pub retry: RetryConfig,
    /// Circuit breaker policy (`CircuitBreakerConfig`).
    pub circuit_breaker: CircuitBreakerConfig,
    /// WebSocket streaming settings for `sillytavern` (`STWebSocketConfig`).
    pub websocket: WebSocketConfig,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            kind: UpstreamKind::Openai,
            url: "http://127.0.0.1:8080/v1".to_owned(),
            api_key: ApiKey::default(),
            model: "default".to_owned(),
            timeout_ms: 120_000,
            ca_file: None,
            pool_idle_timeout_ms: 90_000,
            pool_max_idle_per_host: 32,
            retry: RetryConfig::default(),
            circuit_breaker: CircuitBreakerConfig::default(),
            websocket: WebSocketConfig::default(),
        }
    }
}

impl UpstreamConfig {
    /// Per-attempt timeout as a `Duration`.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// One entry of `retryable_errors`: an HTTP status code or an error name.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum RetryableError {
    /// An upstream HTTP status, e.g. `500`.
    Code(u16),
    /// A spec code (`ST_GENERATION_FAILED`, `TIMEOUT`, ...), a numeric string, or one of
    /// `connect`, `timeout`, `reset`, `malformed`.
    Name(String),
}

/// The spec's `RetryConfig` plus the overall deadline and the retry budget.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts per call including the first (`maxAttempts`); 1 disables retries.
    pub max_attempts: u32,
    /// First backoff ceiling (`baseDelay`).
    pub base_delay_ms: u64,
    /// Largest backoff and largest honoured `Retry-After` (`maxDelay`).
    pub max_delay_ms: u64,
    /// Growth of the backoff ceiling per attempt (`backoffFactor`).
    pub backoff_factor: f64,
    /// Extra retryable conditions beyond the built-in ones (connect errors, timeouts, 429, 502,
    /// 503, 504). 400, 401, 403, 404 and 422 are never retried.
    pub retryable_errors: Vec<RetryableError>,
    /// Deadline across all attempts of one call, backoff included.
    pub deadline_ms: u64,
    /// Retries allowed as a fraction of calls in the monitoring window, so an outage cannot
    /// multiply traffic by `max_attempts`.
    pub retry_budget_ratio: f64,
    /// Retries always allowed per monitoring window regardless of traffic, so low-traffic
    /// deployments still retry.
    pub retry_budget_floor: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base_delay_ms: 250,
            max_delay_ms: 10_000,
            backoff_factor: 2.0,
            retryable_errors: Vec::new(),
            deadline_ms: 300_000,
            // 0.5 leaves headroom above the ~0.42 retries per call that a 30% failure rate needs
            // with four attempts, while still capping a full outage at 1.5x traffic.
            retry_budget_ratio: 0.5,
            retry_budget_floor: 10,
        }
    }
}

/// The spec's `CircuitBreakerConfig` plus the guards that make it behave at low and high traffic.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerConfig {
    /// Failures inside the window that open the breaker (`failureThreshold`), provided the
    /// window also holds `min_calls` calls and the failure ratio reaches `failure_ratio`.
    pub failure_threshold: u32,
    /// Smallest failure fraction of the window's attempts that may open the breaker.
    pub failure_ratio: f64,
    /// Attempts the window must hold before the threshold and ratio are considered.
    pub min_calls: u32,
    /// Consecutive failures that open the breaker regardless of the window, so a dead upstream
    /// at low traffic is caught; 0 disables this rule.
    pub consecutive_failures: u32,
    /// Time spent open before one half-open probe is allowed (`recoveryTimeout`).
    pub recovery_timeout_ms: u64,
    /// Length of the rolling window over which failures are counted (`monitoringWindow`).
    pub monitoring_window_ms: u64,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            failure_ratio: 0.5,
            // Small samples are noisy: at a steady 30% failure rate, 10 attempts reach a 50%
            // ratio often enough to trip the breaker (~18% of runs); 50 attempts almost never do.
            min_calls: 50,
            // High enough that a 30% failure rate almost never produces such a run, low enough
            // that a dead upstream opens within three or four calls.
            consecutive_failures: 10,
            recovery_timeout_ms: 30_000,
            monitoring_window_ms: 60_000,
        }
    }
}

/// The spec's `STWebSocketConfig`, used by `sillytavern` upstreams for streaming.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// WebSocket URL; derived from `url` (`http` -> `ws`, path `/ws`) when absent.
    pub url: Option<String>,
    /// Subprotocols offered in `Sec-WebSocket-Protocol`.
    pub protocols: Vec<String>,
    /// Smallest wait between connection attempts (`reconnectInterval`).
    pub reconnect_interval_ms: u64,
    /// Most reconnections after the first connection attempt (`maxReconnectAttempts`); bounds
    /// the retry loop's attempts for WebSocket streams.
    pub max_reconnect_attempts: u32,
    /// How long the stream may be silent before Taproom sends a `heartbeat`; 0 disables.
    pub heartbeat_interval_ms: u64,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            url: None,
            protocols: Vec::new(),
            reconnect_interval_ms: 1_000,
            max_reconnect_attempts: 5,
            heartbeat_interval_ms: 15_000,
        }
    }
}

/// HTTP statuses that are the caller's fault and therefore never retried.
pub(crate) const NEVER_RETRY: [u16; 5] = [400, 401, 403, 404, 422];

impl UpstreamsConfig {
    /// Applies `TAPROOM_UPSTREAM_{KIND,URL,API_KEY,MODEL}` from `env` to the default upstream,
    /// creating it when missing. An unknown kind is kept aside so `validate` can report it.
    pub fn apply_env(&mut self, env: &HashMap<String, String>) {
        let names = [
            "TAPROOM_UPSTREAM_KIND",
            "TAPROOM_UPSTREAM_URL",
            "TAPROOM_UPSTREAM_API_KEY",
            "TAPROOM_UPSTREAM_MODEL",
        ];
        if !names.iter().any(|n| env.contains_key(*n)) {
            return;
        }
        if self.default.is_empty() {
            self.default = DEFAULT_UPSTREAM_NAME.to_owned();
        }
        let upstream = self.upstreams.entry(self.default.clone()).or_default();
        if let Some(kind) = env.get("TAPROOM_UPSTREAM_KIND") {
            match kind.trim().to_ascii_lowercase().as_str() {
                "openai" => upstream.kind = UpstreamKind::Openai,
                "sillytavern" => upstream.kind = UpstreamKind::Sillytavern,
                other => {
                    self.env_error = Some(format!(
                        "TAPROOM_UPSTREAM_KIND: {other:?} is not a kind; use openai or sillytavern"
                    ))
                }
            }
        }
        if let Some(url) = env.get("TAPROOM_UPSTREAM_URL") {
            upstream.url = url.trim().to_owned();
        }
        if let Some(key) = env.get("TAPROOM_UPSTREAM_API_KEY") {
            upstream.api_key = ApiKey::new(key.trim());
        }
        if let Some(model) = env.get("TAPROOM_UPSTREAM_MODEL") {
            upstream.model = model.trim().to_owned();
        }
    }

    /// Checks every upstream; the error names the offending key, e.g. `upstreams.main.url: ...`.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(e) = &self.env_error {
            return Err(e.clone());
        }
        if !self.upstreams.contains_key(&self.default) {
            return Err(format!(
                "upstreams.default: {:?} is not a configured upstream; add [upstreams.{}] or change the default",
                self.default, self.default
            ));
        }
        for (name, u) in &self.upstreams {
            let key = |k: &str| format!("upstreams.{name}.{k}");
            check_url(&u.url, &["http://", "https://"])
                .map_err(|e| format!("{}: {e}", key("url")))?;
            if u.timeout_ms == 0 {
                return Err(format!("{}: must be greater than 0", key("timeout_ms")));
            }
            if let Some(ca) = &u.ca_file {
                if !ca.is_file() {
                    return Err(format!(
                        "{}: {} is not a readable file",
                        key("ca_file"),
                        ca.display()
                    ));
                }
            }
            let r = &u.retry;
            if r.max_attempts == 0 {
                return Err(format!(
                    "{}: must be at least 1 (1 disables retries)",
                    key("retry.max_attempts")
                ));
            }
            if r.max_delay_ms < r.base_delay_ms {
                return Err(format!(
                    "{}: must be at least retry.base_delay_ms ({})",
                    key("retry.max_delay_ms"),
                    r.base_delay_ms
                ));
            }
            if !(r.backoff_factor.is_finite() && r.backoff_factor >= 1.0) {
                return Err(format!(
                    "{}: must be a number >= 1.0",
                    key("retry.backoff_factor")
                ));
            }
            if r.deadline_ms == 0 {
                return Err(format!(
                    "{}: must be greater than 0",
                    key("retry.deadline_ms")
                ));
            }
            if !(r.retry_budget_ratio.is_finite() && r.retry_budget_ratio >= 0.0) {
                return Err(format!(
                    "{}: must be a number >= 0",
                    key("retry.retry_budget_ratio")
                ));
            }
            for e in &r.retryable_errors {
                validate_retryable(e)
                    .map_err(|m| format!("{}: {m}", key("retry.retryable_errors")))?;
            }
            let cb = &u.circuit_breaker;
            if cb.failure_threshold == 0 {
                return Err(format!(
                    "{}: must be at least 1",
                    key("circuit_breaker.failure_threshold")
                ));
            }
            if !(cb.failure_ratio > 0.0 && cb.failure_ratio <= 1.0) {
                return Err(format!(
                    "{}: must be in (0, 1]",
                    key("circuit_breaker.failure_ratio")
                ));
            }
            if cb.monitoring_window_ms == 0 {
                return Err(format!(
                    "{}: must be greater than 0",
                    key("circuit_breaker.monitoring_window_ms")
                ));
            }
            if let Some(ws) = &u.websocket.url {
                check_url(ws, &["ws://", "wss://"])
                    .map_err(|e| format!("{}: {e}", key("websocket.url")))?;
            }
        }
        Ok(())
    }
}

fn check_url(url: &str, schemes: &[&str]) -> Result<(), String> {
    if !schemes.iter().any(|s| url.starts_with(s)) {
        return Err(format!("{url:?} must start with {}", schemes.join(" or ")));
    }
    url.parse::<http::Uri>()
        .map(|_| ())
        .map_err(|e| format!("{url:?} is not a valid URL: {e}"))
}

fn validate_retryable(e: &RetryableError) -> Result<(), String> {
    let code = match e {
        RetryableError::Code(c) => Some(*c),
        RetryableError::Name(n) => n.parse::<u16>().ok(),
    };
    if let Some(c) = code {
        if NEVER_RETRY.contains(&c) {
            return Err(format!(
                "{c} is the caller's error and is never retried; remove it"
            ));
        }
        if !(100..=599).contains(&c) {
            return Err(format!("{c} is not an HTTP status code"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `text` as a whole config file holding the `[upstreams]` table.
    fn parse(text: &str) -> Result<UpstreamsConfig, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[serde(default)]
            upstreams: UpstreamsConfig,
        }
        toml::from_str::<File>(text)
            .map(|f| f.upstreams)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn empty_section_is_the_default_and_valid() {
        // config/taproom.toml documenting these defaults is checked in config.rs.
        assert_eq!(parse(""), Ok(UpstreamsConfig::default()));
        assert_eq!(UpstreamsConfig::default().validate(), Ok(()));
    }

    #[test]
    fn env_overrides_default_upstream() {
        let mut cfg = UpstreamsConfig::default();
        let env: HashMap<String, String> = [
            ("TAPROOM_UPSTREAM_KIND", "sillytavern"),
            ("TAPROOM_UPSTREAM_URL", "https://st.example"),
            ("TAPROOM_UPSTREAM_API_KEY", "sk-secret"),
            ("TAPROOM_UPSTREAM_MODEL", "m"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        cfg.apply_env(&env);
        let main = &cfg.upstreams[DEFAULT_UPSTREAM_NAME];
        assert_eq!(main.kind, UpstreamKind::Sillytavern);
        assert_eq!(main.url, "https://st.example");
        assert_eq!(main.api_key.expose(), "sk-secret");
        assert_eq!(main.model, "m");
        assert!(!format!("{cfg:?}").contains("sk-secret"));
    }

    #[test]
    fn bad_env_kind_is_reported_by_validate() {
        let mut cfg = UpstreamsConfig::default();
        let env = HashMap::from([("TAPROOM_UPSTREAM_KIND".to_owned(), "kobold".to_owned())]);
        cfg.apply_env(&env);
        let err = cfg.validate().err().unwrap_or_default();
        assert!(err.starts_with("TAPROOM_UPSTREAM_KIND"), "{err}");
    }

    #[test]
    fn validation_names_the_key() {
        let cases: &[(&str, &str)] = &[
            ("[upstreams.main]\nurl = \"ftp://x\"", "upstreams.main.url"),
            (
                "[upstreams.main.retry]\nmax_attempts = 0",
                "upstreams.main.retry.max_attempts",
            ),
            (
                "[upstreams.main.retry]\nretryable_errors = [401]",
                "upstreams.main.retry.retryable_errors",
            ),
            (
                "[upstreams]\ndefault = \"nope\"\n[upstreams.main]",
                "upstreams.default",
            ),
        ];
        for (text, want) in cases {
            let cfg = match parse(text) {
                Ok(c) => c,
                Err(e) => panic!("{text}: {e}"),
            };
            let err = cfg.validate().err().unwrap_or_default();
            assert!(err.starts_with(want), "{text}: got {err:?}");
        }
        let err = parse("[upstreams.main]\nurll = \"x\"")
            .err()
            .unwrap_or_default();
        assert!(err.contains("urll"), "{err}");
    }

    #[test]
    fn retryable_errors_accept_codes_and_names() {
        let cfg = match parse(
            "[upstreams.main.retry]\nretryable_errors = [500, \"ST_GENERATION_FAILED\", \"reset\"]",
        ) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            cfg.upstreams["main"].retry.retryable_errors,
            vec![
                RetryableError::Code(500),
                RetryableError::Name("ST_GENERATION_FAILED".into()),
                RetryableError::Name("reset".into())
            ]
        );
    }
}
