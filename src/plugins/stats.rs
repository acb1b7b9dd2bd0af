//! Per-plugin counters, latency percentiles and the failure breaker.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::manifest::Hook;
use super::types::FailureKind;

/// How many recent call durations the percentiles are computed over.
const WINDOW: usize = 1024;

/// Admin view of one plugin.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PluginStats {
    /// Plugin name.
    pub name: String,
    /// Loaded version.
    pub version: String,
    /// Declared hooks.
    pub hooks: Vec<Hook>,
    /// Hook calls since start (across reloads).
    pub calls: u64,
    /// Failed calls of any kind.
    pub failures: u64,
    /// Traps (including memory-limit traps).
    pub traps: u64,
    /// Deadline overruns.
    pub timeouts: u64,
    /// Median call duration over the last 1024 calls, in µs.
    pub p50_us: u64,
    /// 99th percentile call duration over the last 1024 calls, in µs.
    pub p99_us: u64,
    /// Unix ms until which the plugin is disabled, when cooling down.
    pub disabled_until: Option<u64>,
}

/// Counters kept per plugin name, so they survive reloads.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    calls: AtomicU64,
    failures: AtomicU64,
    traps: AtomicU64,
    timeouts: AtomicU64,
    /// Recent durations in µs; a mutex because pushes are rare relative to wasm work and the
    /// window must be read consistently for percentiles.
    recent: Mutex<VecDeque<u64>>,
}

impl Counters {
    /// Records one finished call.
    pub(crate) fn record(&self, elapsed: Duration, failure: Option<FailureKind>) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match failure {
            None => {}
            Some(kind) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                match kind {
                    FailureKind::Trap | FailureKind::MemoryLimit => {
                        self.traps.fetch_add(1, Ordering::Relaxed);
                    }
                    FailureKind::Timeout => {
                        self.timeouts.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        }
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        if let Ok(mut recent) = self.recent.lock() {
            if recent.len() == WINDOW {
                recent.pop_front();
            }
            recent.push_back(us);
        }
    }

    /// Records a call refused without running (plugin disabled).
    pub(crate) fn record_refused(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// (calls, failures, traps, timeouts, p50, p99).
    pub(crate) fn snapshot(&self) -> (u64, u64, u64, u64, u64, u64) {
        let mut sorted: Vec<u64> = self
            .recent
            .lock()
            .map(|r| r.iter().copied().collect())
            .unwrap_or_default();
        sorted.sort_unstable();
        (
            self.calls.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
            self.traps.load(Ordering::Relaxed),
            self.timeouts.load(Ordering::Relaxed),
            percentile(&sorted, 50.0),
            percentile(&sorted, 99.0),
        )
    }
}

/// Nearest-rank percentile of sorted samples (0 when empty).
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Consecutive-failure breaker: after `threshold` failures in a row the plugin is skipped until
/// the cool-down ends; the next call is a trial, and one success closes the breaker.
#[derive(Debug, Default)]
pub(crate) struct Breaker {
    state: Mutex<BreakerState>,
}

#[derive(Debug, Default)]
struct BreakerState {
    consecutive: u32,
    open_until: Option<Instant>,
}

impl Breaker {
    /// `Some(remaining)` while the plugin is cooling down.
    pub(crate) fn blocked(&self, now: Instant) -> Option<Duration> {
        let state = self.state.lock().ok()?;
        let until = state.open_until?;
        (until > now).then(|| until - now)
    }

    /// Notes a call result.
    pub(crate) fn record(&self, ok: bool, now: Instant, threshold: u32, cooldown: Duration) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if ok {
            state.consecutive = 0;
            state.open_until = None;
            return;
        }
        state.consecutive = state.consecutive.saturating_add(1);
        if state.consecutive >= threshold {
            state.open_until = Some(now + cooldown);
            // A failed trial after the cool-down re-opens at once rather than after another
            // `threshold` failures.
            state.consecutive = threshold.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn breaker_opens_after_threshold_and_closes_on_success() {
        let b = Breaker::default();
        let cool = Duration::from_secs(10);
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(11);
        b.record(false, t0, 2, cool);
        assert!(b.blocked(t0).is_none());
        b.record(false, t0, 2, cool);
        assert!(b.blocked(t0).is_some());
        assert!(b.blocked(later).is_none());
        b.record(false, later, 2, cool);
        assert!(
            b.blocked(later).is_some(),
            "a failed trial re-opens at once"
        );
        let much_later = later + Duration::from_secs(11);
        b.record(true, much_later, 2, cool);
        b.record(false, much_later, 2, cool);
        assert!(b.blocked(much_later).is_none());
    }
}
