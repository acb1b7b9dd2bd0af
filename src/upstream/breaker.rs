//! Per-upstream circuit breaker and retry budget, both fed by one rolling window of counters.
//!
//! The window is a ring of time buckets, so memory and work per call are constant however busy
//! the upstream is. The breaker counts attempts (each retry is a separate attempt); the retry
//! budget counts calls and the retries spent on them.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::config::{CircuitBreakerConfig, RetryConfig};

/// Buckets in the rolling window; more buckets make expiry smoother at a small cost.
const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which bucket period (since `origin`) these counts belong to.
    epoch: u64,
    attempts: u32,
    failures: u32,
    calls: u32,
    retries: u32,
}

/// Sums of the buckets still inside the window.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    attempts: u32,
    failures: u32,
    calls: u32,
    retries: u32,
}

#[derive(Debug)]
struct Window {
    origin: Instant,
    bucket_len: Duration,
    buckets: [Bucket; BUCKETS],
}

impl Window {
    fn new(window: Duration, origin: Instant) -> Self {
        let bucket_len = (window / BUCKETS as u32).max(Duration::from_millis(1));
        Self {
            origin,
            bucket_len,
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.origin).as_nanos() / self.bucket_len.as_nanos()) as u64
    }

    /// The bucket for `now`, cleared first if it still holds an older period's counts.
    fn current(&mut self, now: Instant) -> &mut Bucket {
        let epoch = self.epoch(now);
        let slot = &mut self.buckets[(epoch % BUCKETS as u64) as usize];
        if slot.epoch != epoch {
            *slot = Bucket {
                epoch,
                ..Bucket::default()
            };
        }
        slot
    }

    fn totals(&self, now: Instant) -> Totals {
        let epoch = self.epoch(now);
        let oldest = epoch.saturating_sub(BUCKETS as u64 - 1);
        let mut t = Totals::default();
        for b in &self.buckets {
            if b.epoch >= oldest && b.epoch <= epoch {
                t.attempts += b.attempts;
                t.failures += b.failures;
                t.calls += b.calls;
                t.retries += b.retries;
            }
        }
        t
    }

    fn clear_attempts(&mut self) {
        for b in &mut self.buckets {
            b.attempts = 0;
            b.failures = 0;
        }
    }
}

/// Breaker position as shown at `GET /api/admin/upstreams`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls flow normally.
    Closed,
    /// Calls fail fast until the recovery timeout passes.
    Open,
    /// One probe call decides whether to close or reopen.
    HalfOpen,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { probe_in_flight: bool },
}

#[derive(Debug)]
struct Inner {
    state: State,
    window: Window,
    consecutive_failures: u32,
    last_error: Option<String>,
}

/// Outcome of one attempt as the breaker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The upstream answered well.
    Success,
    /// A sign of ill health (connect error, timeout, 5xx, broken stream).
    Failure,
    /// Neither: a rate limit, the caller's 4xx, or the caller going away.
    Neutral,
}

/// Snapshot for status output.
#[derive(Debug, Clone)]
pub(crate) struct BreakerSnapshot {
    pub state: BreakerState,
    pub failures_in_window: u32,
    pub attempts_in_window: u32,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    pub open_for: Option<Duration>,
}

/// Circuit breaker plus retry budget for one upstream.
#[derive(Debug)]
pub(crate) struct Breaker {
    cfg: CircuitBreakerConfig,
    budget_ratio: f64,
    budget_floor: u32,
    /// A std mutex: every critical section is a few arithmetic operations and never awaits.
    inner: Mutex<Inner>,
}

impl Breaker {
    pub(crate) fn new(cfg: &CircuitBreakerConfig, retry: &RetryConfig) -> Self {
        let window = Duration::from_millis(cfg.monitoring_window_ms);
        Self {
            cfg: cfg.clone(),
            budget_ratio: retry.retry_budget_ratio,
            budget_floor: retry.retry_budget_floor,
            inner: Mutex::new(Inner {
                state: State::Closed,
                window: Window::new(window, Instant::now()),
                consecutive_failures: 0,
                last_error: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves only counters behind, which stay usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks to start an attempt; `Err` carries how long the breaker stays open.
    pub(crate) fn acquire(self: &Arc<Self>) -> Result<Permit, Duration> {
        let now = Instant::now();
        let mut inner = self.lock();
        let probe = match inner.state {
            State::Closed => false,
            State::Open { until } if now >= until => {
                inner.state = State::HalfOpen {
                    probe_in_flight: true,
                };
                true
            }
            State::Open { until } => return Err(until - now),
            State::HalfOpen {
                probe_in_flight: false,
            } => {
                inner.state = State::HalfOpen {
                    probe_in_flight: true,
                };
                true
            }
            // Another caller is probing; come back after it has had a chance to finish.
            State::HalfOpen {
                probe_in_flight: true,
            } => return Err(Duration::from_secs(1)),
        };
        Ok(Permit {
            breaker: Arc::clone(self),
            probe,
            settled: false,
        })
    }

    fn settle(&self, probe: bool, outcome: Outcome, error: Option<String>) {
        let now = Instant::now();
        let mut inner = self.lock();
        if let Some(e) = error {
            inner.last_error = Some(e);
        }
        {
            let b = inner.window.current(now);
            b.attempts += 1;
            if outcome == Outcome::Failure {
                b.failures += 1;
            }
        }
        match outcome {
            Outcome::Failure => inner.consecutive_failures += 1,
            Outcome::Success => inner.consecutive_failures = 0,
            Outcome::Neutral => {}
        }
        let recovery = Duration::from_millis(self.cfg.recovery_timeout_ms);
        if probe {
            inner.state = match outcome {
                Outcome::Failure => State::Open {
                    until: now + recovery,
                },
                // A rate limit or a 4xx still proves the upstream is up and answering.
                Outcome::Success | Outcome::Neutral => {
                    inner.window.clear_attempts();
                    inner.consecutive_failures = 0;
                    State::Closed
                }
            };
            return;
        }
        if matches!(inner.state, State::Closed) && outcome == Outcome::Failure {
            let t = inner.window.totals(now);
            let by_window = t.attempts >= self.cfg.min_calls
                && t.failures >= self.cfg.failure_threshold
                && f64::from(t.failures) >= self.cfg.failure_ratio * f64::from(t.attempts);
            let by_run = self.cfg.consecutive_failures > 0
                && inner.consecutive_failures >= self.cfg.consecutive_failures;
            if by_window || by_run {
                inner.state = State::Open {
                    until: now + recovery,
                };
            }
        }
    }

    /// Counts one call for the retry budget.
    pub(crate) fn note_call(&self) {
        let now = Instant::now();
        self.lock().window.current(now).calls += 1;
    }

    /// Spends one retry from the budget; false when the budget is exhausted.
    pub(crate) fn try_spend_retry(&self) -> bool {
        let now = Instant::now();
        let mut inner = self.lock();
        let t = inner.window.totals(now);
        let allowed = f64::from(self.budget_floor) + self.budget_ratio * f64::from(t.calls);
        if f64::from(t.retries) + 1.0 > allowed {
            return false;
        }
        inner.window.current(now).retries += 1;
        true
    }

    pub(crate) fn snapshot(&self) -> BreakerSnapshot {
        let now = Instant::now();
        let inner = self.lock();
        let t = inner.window.totals(now);
        let (state, open_for) = match inner.state {
            State::Closed => (BreakerState::Closed, None),
            State::Open { until } if until > now => (BreakerState::Open, Some(until - now)),
            // Past the recovery timeout the next call will probe.
            State::Open { .. } | State::HalfOpen { .. } => (BreakerState::HalfOpen, None),
        };
        BreakerSnapshot {
            state,
            failures_in_window: t.failures,
            attempts_in_window: t.attempts,
            consecutive_failures: inner.consecutive_failures,
            last_error: inner.last_error.clone(),
            open_for,
        }
    }
}

/// Permission for one attempt; settle it with its outcome. Dropping it unsettled (the caller
/// went away) records nothing and frees the half-open probe slot.
#[derive(Debug)]
pub(crate) struct Permit {
    breaker: Arc<Breaker>,
    probe: bool,
    settled: bool,
}

impl Permit {
    /// Records the attempt's outcome; `error` becomes the upstream's "last error".
    pub(crate) fn settle(mut self, outcome: Outcome, error: Option<String>) {
        self.settled = true;
        self.breaker.settle(self.probe, outcome, error);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.settled && self.probe {
            // The probe's caller went away without a verdict: let the next caller probe.
            let mut inner = self.breaker.lock();
            if let State::HalfOpen { .. } = inner.state {
                inner.state = State::HalfOpen {
                    probe_in_flight: false,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32, min_calls: u32, consecutive: u32) -> Arc<Breaker> {
        let cfg = CircuitBreakerConfig {
            failure_threshold: threshold,
            failure_ratio: 0.5,
            min_calls,
            consecutive_failures: consecutive,
            recovery_timeout_ms: 1_000,
            monitoring_window_ms: 10_000,
        };
        Arc::new(Breaker::new(&cfg, &RetryConfig::default()))
    }

    fn run(b: &Arc<Breaker>, outcomes: &[Outcome]) -> Vec<bool> {
        outcomes
            .iter()
            .map(|o| match b.acquire() {
                Ok(p) => {
                    p.settle(*o, None);
                    true
                }
                Err(_) => false,
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_needs_min_calls_and_ratio() {
        use Outcome::{Failure as F, Success as S};
        let b = breaker(3, 6, 0);
        // Three failures among five attempts: threshold met, min_calls not yet.
        run(&b, &[F, S, F, S, F]);
        assert_eq!(b.snapshot().state, BreakerState::Closed);
        // Sixth attempt brings min_calls; 4 of 6 failed.
        run(&b, &[F]);
        assert_eq!(b.snapshot().state, BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn low_ratio_keeps_it_closed_and_window_expires() {
        use Outcome::{Failure as F, Success as S};
        let b = breaker(3, 3, 0);
        run(&b, &[F, S, S, F, S, S, F, S, S]);
        assert_eq!(b.snapshot().state, BreakerState::Closed);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(b.snapshot().failures_in_window, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_run_opens_then_one_probe() {
        use Outcome::Failure as F;
        let b = breaker(100, 100, 3);
        run(&b, &[F, F, F]);
        assert_eq!(b.snapshot().state, BreakerState::Open);
        assert!(b.acquire().is_err());
        tokio::time::advance(Duration::from_millis(1_001)).await;
        let probe = b.acquire();
        assert!(probe.is_ok());
        assert!(b.acquire().is_err(), "only one probe at a time");
        drop(probe);
        let probe = b.acquire();
        assert!(probe.is_ok(), "a dropped probe frees the slot");
        if let Ok(p) = probe {
            p.settle(Outcome::Failure, None);
        }
        assert_eq!(b.snapshot().state, BreakerState::Open);
        tokio::time::advance(Duration::from_millis(1_001)).await;
        run(&b, &[Outcome::Success]);
        assert_eq!(b.snapshot().state, BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_budget_has_floor_and_ratio() {
        let cfg = RetryConfig {
            retry_budget_ratio: 0.5,
            retry_budget_floor: 2,
            ..RetryConfig::default()
        };
        let b = Breaker::new(&CircuitBreakerConfig::default(), &cfg);
        assert!(b.try_spend_retry());
        assert!(b.try_spend_retry());
        assert!(!b.try_spend_retry());
        for _ in 0..4 {
            b.note_call();
        }
        assert!(b.try_spend_retry());
        assert!(b.try_spend_retry());
        assert!(!b.try_spend_retry());
    }
}
