//! Retry policy: which errors are retried, how long to wait (exponential backoff with full jitter,
//! or the upstream's `Retry-After`), all pure functions so they are tested without a network.

use std::time::{Duration, SystemTime};

use rand::Rng;

use super::config::{RetryConfig, RetryableError, NEVER_RETRY};
use super::error::UpstreamError;

/// Retry rules resolved from config once per upstream.
#[derive(Debug, Clone)]
pub(crate) struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub backoff_factor: f64,
    pub deadline: Duration,
    /// Smallest wait between attempts (the WebSocket `reconnect_interval`).
    pub min_delay: Duration,
    extra_codes: Vec<u16>,
    extra_names: Vec<String>,
}

impl RetryPolicy {
    pub(crate) fn new(cfg: &RetryConfig) -> Self {
        let mut extra_codes = Vec::new();
        let mut extra_names = Vec::new();
        for e in &cfg.retryable_errors {
            match e {
                RetryableError::Code(c) => extra_codes.push(*c),
                RetryableError::Name(n) => match n.parse::<u16>() {
                    Ok(c) => extra_codes.push(c),
                    Err(_) => extra_names.push(n.to_ascii_lowercase()),
                },
            }
        }
        Self {
            max_attempts: cfg.max_attempts.max(1),
            base_delay: Duration::from_millis(cfg.base_delay_ms),
            max_delay: Duration::from_millis(cfg.max_delay_ms),
            backoff_factor: cfg.backoff_factor,
            deadline: Duration::from_millis(cfg.deadline_ms),
            min_delay: Duration::ZERO,
            extra_codes,
            extra_names,
        }
    }

    /// Whether `err` may be retried: the built-in rules plus `retryable_errors`, but never the
    /// caller's own 400/401/403/404/422.
    pub(crate) fn is_retryable(&self, err: &UpstreamError) -> bool {
        if let Some(s) = err.upstream_status() {
            if NEVER_RETRY.contains(&s) {
                return false;
            }
            if self.extra_codes.contains(&s) {
                return true;
            }
        }
        if err.is_retryable() {
            return true;
        }
        let code = err.spec_code().to_ascii_lowercase();
        let short = err.short_name();
        self.extra_names
            .iter()
            .any(|n| *n == code || (!short.is_empty() && n == short))
    }

    /// Full-jitter backoff before attempt `attempt + 1` (attempt counts from 1): a uniform draw
    /// from zero up to `base * factor^(attempt-1)`, capped at `max_delay`.
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .backoff_factor
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let ceiling = self.base_delay.as_secs_f64() * exp;
        let ceiling = ceiling.min(self.max_delay.as_secs_f64());
        let drawn = if ceiling > 0.0 {
            rand::rng().random_range(0.0..=ceiling)
        } else {
            0.0
        };
        Duration::from_secs_f64(drawn).max(self.min_delay)
    }
}

/// Parses `Retry-After` as delay-seconds or an HTTP-date relative to `now`.
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    // A date in the past means "now".
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::error::UpstreamErrorKind;

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(7));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(7)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(7));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let p = RetryPolicy::new(&RetryConfig {
            base_delay_ms: 100,
            max_delay_ms: 300,
            backoff_factor: 2.0,
            ..RetryConfig::default()
        });
        for attempt in 1..10 {
            let ceiling = (100.0 * 2f64.powi(attempt as i32 - 1)).min(300.0);
            for _ in 0..50 {
                let d = p.backoff(attempt).as_secs_f64() * 1000.0;
                assert!(d <= ceiling + 0.001, "attempt {attempt}: {d} > {ceiling}");
            }
        }
    }

    #[test]
    fn retryable_rules() {
        let p = RetryPolicy::new(&RetryConfig {
            retryable_errors: vec![
                RetryableError::Code(500),
                RetryableError::Name("malformed".into()),
            ],
            ..RetryConfig::default()
        });
        let status = |s| UpstreamError::from_status("u", s, b"");
        for s in [429, 500, 502, 503, 504] {
            assert!(p.is_retryable(&status(s)), "{s}");
        }
        for s in [400, 401, 403, 404, 422, 501] {
            assert!(!p.is_retryable(&status(s)), "{s}");
        }
        let kind = |k| UpstreamError::new(k, "u", "x");
        assert!(p.is_retryable(&kind(UpstreamErrorKind::Connect)));
        assert!(p.is_retryable(&kind(UpstreamErrorKind::Timeout)));
        assert!(p.is_retryable(&kind(UpstreamErrorKind::Malformed)));
        assert!(!p.is_retryable(&kind(UpstreamErrorKind::Deadline)));
        assert!(!RetryPolicy::new(&RetryConfig::default())
            .is_retryable(&kind(UpstreamErrorKind::Malformed)));
    }
}
