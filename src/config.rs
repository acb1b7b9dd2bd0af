//! One typed `Config`, loaded once as a pure function of (config file text, environment map)
//! and passed down explicitly. Every key and its default is documented in `config/taproom.toml`.

use serde::Deserialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a configuration could not be loaded; `serve` exits with code 2 on any of these.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for {key}: {message}")]
    Invalid { key: String, message: String },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the gateway listens on.
    pub listen: SocketAddr,
    /// Folder holding `taproom.redb`, `jwt.secret` and other state.
    pub data_dir: PathBuf,
    /// tracing filter, e.g. `info` or `taproom=debug`.
    pub log: String,
    pub http: HttpConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub store: StoreConfig,
    pub prompt: PromptConfig,
    /// The `/ws` WebSocket.
    pub websocket: crate::http::ws::WsConfig,
    /// The OpenAI-compatible `/v1` surface.
    pub openai: crate::http::openai::OpenAiConfig,
    pub tls: TlsConfig,
    pub metrics: MetricsConfig,
    pub rate_limit: RateLimitConfig,
    /// Long-term memory (`[memory]`).
    pub memory: crate::memory::MemoryConfig,
    /// Behaviour plugins (`[plugins]`).
    pub plugins: crate::plugins::PluginsConfig,
    /// Named upstreams (`[upstreams]`), see `config/taproom.toml`.
    pub upstreams: crate::upstream::UpstreamsConfig,
}

/// Prompt building.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromptConfig {
    /// The model's context window in tokens.
    pub max_context_tokens: usize,
    /// Tokens reserved for the reply (also the default `max_tokens` sent upstream).
    pub max_reply_tokens: usize,
    /// Main system prompt; a card's `system_prompt` replaces it (`{{original}}` = this).
    pub main_prompt: String,
    /// Default post-history instructions (empty = none).
    pub post_history_instructions: String,
    /// Lorebook budget in percent of the prompt budget, unless the book sets `token_budget`.
    pub world_info_budget_percent: u32,
}

impl Default for PromptConfig {
    fn default() -> Self {
        let options = crate::prompt::assemble::PromptOptions::default();
        Self {
            max_context_tokens: 8192,
            max_reply_tokens: 512,
            main_prompt: options.main_prompt,
            post_history_instructions: options.post_history_instructions,
            world_info_budget_percent: options.world_info_budget_percent,
        }
    }
}

/// HTTP server behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Largest accepted request body; larger ones get 413 PAYLOAD_TOO_LARGE.
    pub body_limit_bytes: usize,
    /// Time a handler may take before its response headers (streams are not cut by it).
    pub request_timeout_ms: u64,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace_ms: u64,
    /// Allowed CORS origins; `"*"` allows any.
    pub cors_origins: Vec<String>,
}

/// JWT verification.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Accepted algorithm: HS256, HS384, HS512, RS256, ES256 or EdDSA. Tokens naming any other
    /// algorithm are rejected.
    pub algorithm: String,
    /// HS* secret. Empty: `<data_dir>/jwt.secret` (created on first `serve`).
    pub jwt_secret: String,
    /// PEM public key for RS256 / ES256 / EdDSA.
    pub public_key_file: Option<PathBuf>,
    /// JWKS file; the token's `kid` selects the key.
    pub jwks_file: Option<PathBuf>,
    /// Required `iss` when set.
    pub issuer: Option<String>,
    /// Required `aud` when set.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` / `nbf`.
    pub leeway_secs: u64,
}

/// Per-user limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_characters_per_user: u64,
    pub max_avatar_bytes: usize,
}

/// Storage tuning.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Characters kept in the in-memory cache.
    pub cache_capacity: u64,
    /// MiB of conversation histories kept in memory, so a turn does not re-read its history.
    pub history_cache_mb: u64,
    /// MiB of database pages redb keeps in memory (its own default, 1 GiB, lets RSS grow with the
    /// file); pages beyond it are read back from the OS page cache.
    pub page_cache_mb: u64,
}

/// TLS termination. Serving HTTPS needs both `cert` and `key`; with neither, plain HTTP.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first. Reloaded on change or SIGHUP.
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// Optional plain-HTTP listener that answers every request with 308 to the https URL.
    pub redirect_http: Option<SocketAddr>,
}

impl TlsConfig {
    /// Whether HTTPS is configured.
    pub fn enabled(&self) -> bool {
        self.cert.is_some() && self.key.is_some()
    }
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `GET /metrics` (unauthenticated; restrict it at the network edge).
    pub enabled: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// Per-user token buckets; 0 disables a bucket.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Requests per minute to generation routes (`/interact`, `/regenerate`,
    /// `/v1/chat/completions`, `/ws`).
    pub interact_per_minute: u32,
    /// Requests per minute to every other route.
    pub other_per_minute: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            interact_per_minute: 60,
            other_per_minute: 600,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8787)),
            data_dir: PathBuf::from("./data"),
            log: "info".into(),
            http: HttpConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            store: StoreConfig::default(),
            prompt: PromptConfig::default(),
            websocket: crate::http::ws::WsConfig::default(),
            openai: crate::http::openai::OpenAiConfig::default(),
            tls: TlsConfig::default(),
            metrics: MetricsConfig::default(),
            rate_limit: RateLimitConfig::default(),
            memory: crate::memory::MemoryConfig::default(),
            plugins: crate::plugins::PluginsConfig::default(),
            upstreams: crate::upstream::UpstreamsConfig::default(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            body_limit_bytes: 10 * 1024 * 1024,
            request_timeout_ms: 120_000,
            shutdown_grace_ms: 10_000,
            cors_origins: vec!["*".into()],
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            algorithm: "HS256".into(),
            jwt_secret: String::new(),
            public_key_file: None,
            jwks_file: None,
            issuer: None,
            audience: None,
            leeway_secs: 60,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_characters_per_user: 1000,
            max_avatar_bytes: 5 * 1024 * 1024,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            cache_capacity: 20_000,
            history_cache_mb: 8,
            page_cache_mb: 8,
        }
    }
}

/// Command-line overrides, applied after the environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
}

impl Config {
    /// Loads the config: the file (if any), then environment variables, then CLI overrides.
    pub fn load(
        path: Option<&Path>,
        env: &HashMap<String, String>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Unreadable {
                        path: path.to_path_buf(),
                        source,
                    })?;
                Self::from_toml(&text).map_err(|message| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message,
                })?
            }
            None => Self::default(),
        };
        config.apply_env(env)?;
        if let Some(listen) = overrides.listen {
            config.listen = listen;
        }
        if let Some(dir) = &overrides.data_dir {
            config.data_dir = dir.clone();
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text; the message names the offending key.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim().to_string())
    }

    fn apply_env(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        if let Some(v) = env.get("TAPROOM_LISTEN") {
            self.listen = v.parse().map_err(|e| ConfigError::Invalid {
                key: "TAPROOM_LISTEN".into(),
                message: format!("{e} (expected host:port, e.g. 127.0.0.1:8787)"),
            })?;
        }
        if let Some(v) = env.get("TAPROOM_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = env.get("TAPROOM_JWT_SECRET") {
            self.auth.jwt_secret = v.clone();
        }
        if let Some(v) = env.get("TAPROOM_LOG") {
            self.log = v.clone();
        }
        self.upstreams.apply_env(env);
        self.plugins.apply_env(env);
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        };
        if self.http.body_limit_bytes == 0 {
            return Err(invalid("http.body_limit_bytes", "must be greater than 0"));
        }
        if self.http.request_timeout_ms == 0 {
            return Err(invalid("http.request_timeout_ms", "must be greater than 0"));
        }
        if self.limits.max_avatar_bytes == 0 {
            return Err(invalid("limits.max_avatar_bytes", "must be greater than 0"));
        }
        if self.websocket.heartbeat_interval_ms == 0 || self.websocket.missed_heartbeats == 0 {
            return Err(invalid(
                "websocket.heartbeat_interval_ms",
                "heartbeat interval and missed_heartbeats must be greater than 0",
            ));
        }
        if self.prompt.max_reply_tokens >= self.prompt.max_context_tokens {
            return Err(invalid(
                "prompt.max_reply_tokens",
                "must be smaller than prompt.max_context_tokens",
            ));
        }
        if self.prompt.world_info_budget_percent > 100 {
            return Err(invalid(
                "prompt.world_info_budget_percent",
                "must be 0..=100",
            ));
        }
        if let Err(message) = self.upstreams.validate() {
            let (key, why) = message.split_once(": ").unwrap_or(("upstreams", &message));
            return Err(invalid(key, why));
        }
        if let Err(message) = self.plugins.validate() {
            let (key, why) = message.split_once(": ").unwrap_or(("plugins", &message));
            return Err(invalid(key, why));
        }
        let alg = self.auth.algorithm.as_str();
        if !matches!(
            alg,
            "HS256" | "HS384" | "HS512" | "RS256" | "ES256" | "EdDSA"
        ) {
            return Err(invalid(
                "auth.algorithm",
                "must be one of HS256, HS384, HS512, RS256, ES256, EdDSA",
            ));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(invalid(
                "tls.cert",
                "set both tls.cert and tls.key to serve HTTPS, or neither",
            ));
        }
        if self.tls.redirect_http.is_some() && !self.tls.enabled() {
            return Err(invalid(
                "tls.redirect_http",
                "the redirect listener needs tls.cert and tls.key",
            ));
        }
        if !alg.starts_with("HS")
            && self.auth.public_key_file.is_none()
            && self.auth.jwks_file.is_none()
        {
            return Err(invalid(
                "auth.public_key_file",
                "an asymmetric algorithm needs auth.public_key_file or auth.jwks_file",
            ));
        }
        Ok(())
    }

    /// Path of the redb file.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("taproom.redb")
    }

    /// The per-request handler timeout.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.http.request_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_file() {
        let c = Config::load(None, &HashMap::new(), &Overrides::default()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8787");
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.http.body_limit_bytes, 10 * 1024 * 1024);
    }

    #[test]
    fn documented_file_equals_the_defaults() {
        let text = include_str!("../config/taproom.toml");
        let from_file = Config::from_toml(text).unwrap();
        assert_eq!(format!("{from_file:?}"), format!("{:?}", Config::default()));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[http]\nbody_limit = 3\n").unwrap_err();
        assert!(err.contains("body_limit"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Config::from_toml("[limits]\nmax_characters_per_user = \"many\"\n").unwrap_err();
        assert!(err.contains("max_characters_per_user"), "{err}");
    }

    #[test]
    fn env_overrides_file() {
        let env = HashMap::from([
            ("TAPROOM_LISTEN".to_string(), "127.0.0.1:9999".to_string()),
            ("TAPROOM_JWT_SECRET".to_string(), "s3cret".to_string()),
        ]);
        let c = Config::load(None, &env, &Overrides::default()).unwrap();
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.auth.jwt_secret, "s3cret");
    }

    #[test]
    fn bad_env_value_is_named() {
        let env = HashMap::from([("TAPROOM_LISTEN".to_string(), "nope".to_string())]);
        let err = Config::load(None, &env, &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("TAPROOM_LISTEN"));
    }

    #[test]
    fn asymmetric_algorithm_needs_a_key() {
        let mut c = Config::default();
        c.auth.algorithm = "RS256".into();
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("auth.public_key_file"));
    }
}
