//! `UpstreamError`: every way a call to an upstream can fail, tagged with what the retry loop and
//! the circuit breaker need to know (retryable? ill health?) and how the HTTP layer reports it.
//!
//! Messages never contain the API key: they are built from statuses, kinds and the upstream's own
//! response body, and the request builders are the only code that reads the key.

use std::time::Duration;

use serde_json::Value;

/// What went wrong, coarse enough for retry and breaker decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// TCP connect refused, DNS failure, TLS handshake failure.
    Connect,
    /// The connection was reset or closed before a response arrived.
    Reset,
    /// One attempt exceeded `timeout_ms`.
    Timeout,
    /// The overall deadline across attempts ran out.
    Deadline,
    /// The circuit breaker is open (or half-open with a probe in flight).
    CircuitOpen,
    /// Upstream answered 401 or 403: Taproom's credentials are wrong.
    Auth,
    /// Upstream answered 429.
    RateLimited,
    /// Upstream answered 5xx.
    Server,
    /// Upstream answered 400, 404, 422 or another 4xx: the request itself was refused.
    Rejected,
    /// The body could not be parsed.
    Malformed,
    /// A stream broke after it started.
    StreamBroken,
    /// The caller named an upstream that is not configured.
    UnknownUpstream,
}

/// A failed upstream call.
#[derive(Debug, Clone, thiserror::Error)]
#[error("upstream {upstream}: {message}")]
pub struct UpstreamError {
    kind: UpstreamErrorKind,
    upstream: String,
    message: String,
    status: Option<u16>,
    retry_after: Option<Duration>,
    upstream_body: Option<Value>,
}

impl UpstreamError {
    /// Builds an error of `kind` for the named upstream.
    pub(crate) fn new(kind: UpstreamErrorKind, upstream: &str, message: impl Into<String>) -> Self {
        Self {
            kind,
            upstream: upstream.to_owned(),
            message: message.into(),
            status: None,
            retry_after: None,
            upstream_body: None,
        }
    }

    /// A response body the protocol could not parse.
    pub(crate) fn malformed(upstream: &str, what: impl std::fmt::Display) -> Self {
        Self::new(
            UpstreamErrorKind::Malformed,
            upstream,
            format!("upstream sent an unparseable body: {what}"),
        )
    }

    /// Builds the error for an upstream HTTP status, keeping the upstream's body for `details`.
    pub(crate) fn from_status(upstream: &str, status: u16, body: &[u8]) -> Self {
        let kind = match status {
            401 | 403 => UpstreamErrorKind::Auth,
            429 => UpstreamErrorKind::RateLimited,
            500..=599 => UpstreamErrorKind::Server,
            _ => UpstreamErrorKind::Rejected,
        };
        let message = match kind {
            UpstreamErrorKind::Auth => format!(
                "upstream refused Taproom's credentials ({status}); check its api_key in the config"
            ),
            UpstreamErrorKind::RateLimited => {
                "upstream rate limit reached (429); retry after the given delay".to_owned()
            }
            UpstreamErrorKind::Server => format!("upstream failed with status {status}"),
            _ => format!("upstream rejected the request with status {status}"),
        };
        // Keep the upstream's message as JSON when it is JSON, else as (bounded) text.
        let upstream_body = if body.is_empty() {
            None
        } else {
            match serde_json::from_slice::<Value>(body) {
                Ok(v) => Some(v),
                Err(_) => {
                    let text = String::from_utf8_lossy(&body[..body.len().min(2048)]);
                    Some(Value::String(text.into_owned()))
                }
            }
        };
        Self {
            status: Some(status),
            upstream_body,
            ..Self::new(kind, upstream, message)
        }
    }

    /// Sets the delay the caller should wait before trying again.
    pub(crate) fn with_retry_after(mut self, d: Option<Duration>) -> Self {
        self.retry_after = d;
        self
    }

    /// Coarse classification of the failure.
    pub fn kind(&self) -> UpstreamErrorKind {
        self.kind
    }

    /// Name of the configured upstream that failed.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// HTTP status the upstream returned, if it returned one.
    pub fn upstream_status(&self) -> Option<u16> {
        self.status
    }

    /// The spec's error code for this failure.
    pub fn spec_code(&self) -> &'static str {
        use UpstreamErrorKind as K;
        match self.kind {
            K::Connect | K::Reset | K::CircuitOpen => "ST_API_UNAVAILABLE",
            K::Auth => "ST_API_AUTH_FAILED",
            K::RateLimited => "ST_API_RATE_LIMITED",
            K::Server | K::Malformed | K::StreamBroken => "ST_GENERATION_FAILED",
            K::Timeout | K::Deadline => "TIMEOUT",
            K::Rejected | K::UnknownUpstream => "VALIDATION_ERROR",
        }
    }

    /// HTTP status Taproom should answer with.
    pub fn http_status(&self) -> u16 {
        use UpstreamErrorKind as K;
        match self.kind {
            K::Connect | K::Reset | K::CircuitOpen => 503,
            K::UnknownUpstream => 400,
            // The user's request was fine; Taproom's upstream credentials are not.
            K::Auth => 502,
            K::RateLimited => 429,
            K::Server | K::Malformed | K::StreamBroken => 502,
            K::Timeout | K::Deadline => 504,
            K::Rejected => match self.status {
                Some(404) => 404,
                Some(422) => 422,
                _ => 400,
            },
        }
    }

    /// Delay for the `Retry-After` header: time left while the breaker is open, or the
    /// upstream's own `Retry-After` on 429.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Structured details for the error envelope: upstream name, its status and its own message.
    pub fn details(&self) -> Option<Value> {
        let mut map = serde_json::Map::new();
        map.insert("upstream".into(), Value::String(self.upstream.clone()));
        if let Some(s) = self.status {
            map.insert("upstreamStatus".into(), Value::from(s));
        }
        if let Some(b) = &self.upstream_body {
            map.insert("upstreamError".into(), b.clone());
        }
        if let Some(d) = self.retry_after {
            map.insert("retryAfterSeconds".into(), Value::from(retry_after_secs(d)));
        }
        Some(Value::Object(map))
    }

    /// Whether the retry loop may try again by default (before `retryable_errors` are added).
    pub fn is_retryable(&self) -> bool {
        use UpstreamErrorKind as K;
        match self.kind {
            K::Connect | K::Reset | K::Timeout | K::RateLimited => true,
            K::Server => matches!(self.status, Some(502..=504)),
            _ => false,
        }
    }

    /// Whether this failure is a sign of ill health that the circuit breaker should count.
    /// Rate limits and the caller's own 4xx are not.
    pub fn counts_as_failure(&self) -> bool {
        use UpstreamErrorKind as K;
        matches!(
            self.kind,
            K::Connect | K::Reset | K::Timeout | K::Server | K::Malformed | K::StreamBroken
        )
    }

    /// Short name used to match `retryable_errors` entries and for status output.
    pub(crate) fn short_name(&self) -> &'static str {
        use UpstreamErrorKind as K;
        match self.kind {
            K::Connect => "connect",
            K::Reset => "reset",
            K::Timeout => "timeout",
            K::Malformed => "malformed",
            K::StreamBroken => "stream_broken",
            _ => "",
        }
    }

    /// Message without the `upstream <name>:` prefix, for the error envelope's `message`.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Whole seconds for a `Retry-After` header, rounded up so clients never come back too early.
pub fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs();
    if d.subsec_nanos() > 0 {
        secs + 1
    } else {
        secs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping_follows_the_issue() {
        let cases: &[(u16, &str, u16, bool, bool)] = &[
            // status, code, http, retryable, counts as failure
            (401, "ST_API_AUTH_FAILED", 502, false, false),
            (403, "ST_API_AUTH_FAILED", 502, false, false),
            (429, "ST_API_RATE_LIMITED", 429, true, false),
            (500, "ST_GENERATION_FAILED", 502, false, true),
            (502, "ST_GENERATION_FAILED", 502, true, true),
            (503, "ST_GENERATION_FAILED", 502, true, true),
            (504, "ST_GENERATION_FAILED", 502, true, true),
            (400, "VALIDATION_ERROR", 400, false, false),
            (404, "VALIDATION_ERROR", 404, false, false),
            (422, "VALIDATION_ERROR", 422, false, false),
        ];
        for &(status, code, http, retry, fail) in cases {
            let e = UpstreamError::from_status("u", status, b"{\"error\":\"x\"}");
            assert_eq!(e.spec_code(), code, "{status}");
            assert_eq!(e.http_status(), http, "{status}");
            assert_eq!(e.is_retryable(), retry, "{status}");
            assert_eq!(e.counts_as_failure(), fail, "{status}");
        }
        let e = UpstreamError::new(UpstreamErrorKind::Connect, "u", "refused");
        assert_eq!(
            (e.spec_code(), e.http_status()),
            ("ST_API_UNAVAILABLE", 503)
        );
        let e = UpstreamError::new(UpstreamErrorKind::Deadline, "u", "late");
        assert_eq!((e.spec_code(), e.http_status()), ("TIMEOUT", 504));
    }
}
