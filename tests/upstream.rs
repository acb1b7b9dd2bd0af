//! Upstream clients against the fake upstream over real sockets: both protocols, the retry rules,
//! the circuit breaker, error mapping, cancellation and key redaction.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use support::fake_upstream::{FakeUpstream, Fault, Latency};
use taproom::upstream::config::{ApiKey, RetryableError};
use taproom::upstream::{
    BreakerState, ChatMessage, GenParams, GenerateRequest, StreamEvent, Upstream, UpstreamConfig,
    UpstreamErrorKind, UpstreamKind, Upstreams, UpstreamsConfig,
};
use tokio::time::Instant;

const KEY: &str = "sk-test-SECRET-4242";

/// An upstream config with test-sized delays so the whole file runs in seconds.
fn config(kind: UpstreamKind, url: String) -> UpstreamConfig {
    let mut u = UpstreamConfig {
        kind,
        url,
        api_key: ApiKey::new(KEY),
        model: "fake-model".into(),
        timeout_ms: 2_000,
        ..UpstreamConfig::default()
    };
    u.retry.base_delay_ms = 1;
    u.retry.max_delay_ms = 20;
    u.retry.deadline_ms = 10_000;
    u.websocket.reconnect_interval_ms = 1;
    u
}

fn build(u: UpstreamConfig) -> (Upstreams, Arc<Upstream>) {
    let mut cfg = UpstreamsConfig::default();
    cfg.upstreams.insert("main".into(), u);
    let ups = match Upstreams::new(&cfg) {
        Ok(u) => u,
        Err(e) => panic!("building upstreams failed: {e}"),
    };
    let main = match ups.get(None) {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    };
    (ups, main)
}

fn request(text: &str) -> GenerateRequest {
    GenerateRequest {
        character_id: "char-ada".into(),
        messages: vec![
            ChatMessage::new("system", "You are Ada."),
            ChatMessage::new("user", text),
        ],
        user_input: text.into(),
        history: vec![ChatMessage::new("assistant", "Hello there.")],
        params: GenParams {
            temperature: Some(0.7),
            max_tokens: Some(64),
            ..GenParams::default()
        },
        override_settings: Some(json!({"systemPrompt": "You are Ada.", "card": {"name": "Ada"}})),
    }
}

async fn collect(
    stream: taproom::upstream::EventStream,
) -> (
    Vec<String>,
    Option<taproom::upstream::GenerateResult>,
    Option<taproom::upstream::UpstreamError>,
) {
    let mut deltas = Vec::new();
    let mut done = None;
    let mut err = None;
    let mut s = stream;
    while let Some(item) = s.next().await {
        match item {
            Ok(StreamEvent::Delta(d)) => deltas.push(d),
            Ok(StreamEvent::Done(r)) => done = Some(r),
            Err(e) => err = Some(e),
        }
    }
    (deltas, done, err)
}

#[tokio::test]
async fn openai_generate_sends_the_prompt_and_parses_the_reply() {
    let fake = FakeUpstream::start().await;
    let (_u, up) = build(config(UpstreamKind::Openai, fake.openai_url()));
    let res = up.generate(&request("hi there")).await;
    let res = res.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(res.content, "echo: hi there");
    assert_eq!(res.model, "fake-model");
    assert_eq!(res.finish_reason, "stop");
    assert_eq!(res.usage.prompt_tokens, 5);
    assert_eq!(res.usage.completion_tokens, 3);
    assert_eq!(res.usage.total_tokens, 8);
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].path, "/v1/chat/completions");
    assert_eq!(
        reqs[0].header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(
        reqs[0].body,
        json!({"model": "fake-model", "stream": false, "temperature": 0.7, "max_tokens": 64,
            "messages": [{"role": "system", "content": "You are Ada."}, {"role": "user", "content": "hi there"}]})
    );
    let usage = serde_json::to_value(res.usage).unwrap_or_default();
    assert_eq!(
        usage,
        json!({"promptTokens": 5, "completionTokens": 3, "totalTokens": 8})
    );
}

#[tokio::test]
async fn openai_stream_yields_deltas_then_the_same_result() {
    let fake = FakeUpstream::start().await;
    fake.set_chunks(5);
    let (_u, up) = build(config(UpstreamKind::Openai, fake.openai_url()));
    let stream = up.stream(&request("stream me please")).await;
    let (deltas, done, err) = collect(stream.unwrap_or_else(|e| panic!("{e}"))).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(deltas.len(), 5);
    let done = done.unwrap_or_default();
    assert_eq!(deltas.concat(), "echo: stream me please");
    assert_eq!(done.content, "echo: stream me please");
    assert_eq!(done.usage.total_tokens, 6 + 4);
    assert_eq!(done.finish_reason, "stop");
    assert_eq!(fake.requests()[0].body["stream"], json!(true));
}

#[tokio::test]
async fn sillytavern_generate_posts_the_spec_request() {
    let fake = FakeUpstream::start().await;
    fake.require_api_key(Some(KEY));
    let (_u, up) = build(config(UpstreamKind::Sillytavern, fake.st_url()));
    let res = up
        .generate(&request("hello Ada"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(res.content, "echo: hello Ada");
    assert_eq!(
        res.character_state,
        Some(json!({"characterId": "char-ada"}))
    );
    assert_eq!(res.usage.total_tokens, 2 + 2 + 3);
    let r = &fake.requests()[0];
    assert_eq!(r.path, "/api/characters/char-ada/generate");
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(
        r.body,
        json!({"characterId": "char-ada", "userInput": "hello Ada",
            "history": [{"role": "assistant", "content": "Hello there."}],
            "genParams": {"temperature": 0.7, "maxTokens": 64, "model": "fake-model"},
            "overrideSettings": {"systemPrompt": "You are Ada.", "card": {"name": "Ada"}}})
    );
}

#[tokio::test]
async fn sillytavern_streams_over_the_websocket_envelope() {
    let fake = FakeUpstream::start().await;
    fake.require_api_key(Some(KEY));
    let mut cfg = config(UpstreamKind::Sillytavern, fake.st_url());
    cfg.websocket.protocols = vec!["st-v1".into()];
    let (_u, up) = build(cfg);
    let stream = up.stream(&request("tell me more")).await;
    let (deltas, done, err) = collect(stream.unwrap_or_else(|e| panic!("{e}"))).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(deltas.len(), 4);
    assert_eq!(deltas.concat(), "echo: tell me more");
    let done = done.unwrap_or_default();
    assert_eq!(done.content, "echo: tell me more");
    assert_eq!(
        done.character_state,
        Some(json!({"characterId": "char-ada"}))
    );
    let r = &fake.requests()[0];
    assert_eq!(r.method, "WS");
    assert_eq!(r.header("sec-websocket-protocol"), Some("st-v1"));
    assert_eq!(r.body["overrideSettings"]["card"]["name"], json!("Ada"));
    assert_eq!(r.body["stream"], json!(true));
}

#[tokio::test]
async fn thirty_percent_503_with_four_attempts_succeeds_at_least_99_percent() {
    let fake = FakeUpstream::start().await;
    // Seeded so the run is reproducible; the rate is still 30% per request. A call fails only if
    // all four attempts do (0.3^4), so about 4 of 500 are expected to fail; this seed gives 4.
    fake.set_random_failure(0.3, 503, 5);
    let mut cfg = config(UpstreamKind::Openai, fake.openai_url());
    cfg.retry.max_attempts = 4;
    // Default breaker and retry budget: they must not get in the way of a 30% failure rate.
    let (ups, up) = build(cfg);
    let mut ok = 0;
    let mut errors = Vec::new();
    for i in 0..500 {
        match up.generate(&request(&format!("call {i}"))).await {
            Ok(_) => ok += 1,
            Err(e) => errors.push(format!("{:?} at {}", e.kind(), fake.request_count())),
        }
    }
    assert!(ok >= 495, "only {ok} of 500 calls succeeded: {errors:?}");
    assert_eq!(ups.status()[0].state, BreakerState::Closed);
    let per_call = (fake.request_count() as f64 - 500.0) / 500.0;
    assert!(per_call < 0.5, "{per_call} retries per call");
}

#[tokio::test]
async fn connect_errors_are_retried_then_reported_unavailable() {
    // Bind and drop to get a port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        l.local_addr().map(|a| a.port()).unwrap_or(1)
    };
    let (ups, up) = build(config(
        UpstreamKind::Openai,
        format!("http://127.0.0.1:{port}/v1"),
    ));
    let err = up
        .generate(&request("x"))
        .await
        .err()
        .unwrap_or_else(|| panic!("expected error"));
    assert_eq!(err.kind(), UpstreamErrorKind::Connect);
    assert_eq!(
        (err.spec_code(), err.http_status()),
        ("ST_API_UNAVAILABLE", 503)
    );
    // Three attempts were made and each counted.
    assert_eq!(ups.status()[0].failures_in_window, 3);
}

#[tokio::test]
async fn reset_before_the_response_is_retried() {
    let fake = FakeUpstream::start().await;
    fake.fail_next(1, Fault::Reset);
    let (_u, up) = build(config(UpstreamKind::Openai, fake.openai_url()));
    let res = up.generate(&request("after reset")).await;
    assert_eq!(
        res.map(|r| r.content).ok().as_deref(),
        Some("echo: after reset")
    );
    assert_eq!(fake.request_count(), 2);
}

#[tokio::test]
async fn timeouts_are_retried_and_the_deadline_answers_timeout() {
    let fake = FakeUpstream::start().await;
    let mut cfg = config(UpstreamKind::Openai, fake.openai_url());
    cfg.timeout_ms = 100;
    let (_u, up) = build(cfg.clone());
    let err = up.generate(&request("[[delay:400]] slow")).await.err();
    let err = err.unwrap_or_else(|| panic!("expected a timeout"));
    assert_eq!((err.spec_code(), err.http_status()), ("TIMEOUT", 504));
    assert_eq!(fake.request_count(), 3, "each timed-out attempt is retried");

    // The overall deadline cuts the retries short.
    fake.clear_requests();
    cfg.timeout_ms = 150;
    cfg.retry.max_attempts = 10;
    cfg.retry.deadline_ms = 250;
    let (_u, up) = build(cfg);
    let started = Instant::now();
    let err = up.generate(&request("[[delay:1000]] slow")).await.err();
    let err = err.unwrap_or_else(|| panic!("expected a timeout"));
    assert_eq!(err.kind(), UpstreamErrorKind::Deadline);
    assert_eq!(err.spec_code(), "TIMEOUT");
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(fake.request_count(), 2);
}

#[tokio::test]
async fn caller_errors_are_never_retried_and_map_to_spec_codes() {
    let fake = FakeUpstream::start().await;
    let mut cfg = config(UpstreamKind::Openai, fake.openai_url());
    // Even listed as retryable, a caller error is not retried (validation forbids listing these,
    // so list 500 to show the list is honoured while 4xx stay final).
    cfg.retry.retryable_errors = vec![RetryableError::Code(500)];
    let (ups, up) = build(cfg);
    let cases = [
        (400, "VALIDATION_ERROR", 400),
        (401, "ST_API_AUTH_FAILED", 502),
        (403, "ST_API_AUTH_FAILED", 502),
        (404, "VALIDATION_ERROR", 404),
        (422, "VALIDATION_ERROR", 422),
    ];
    for (status, code, http) in cases {
        fake.clear_requests();
        let err = up
            .generate(&request(&format!("[[fault:{status}]] x")))
            .await
            .err();
        let err = err.unwrap_or_else(|| panic!("{status}: expected error"));
        assert_eq!(
            (err.spec_code(), err.http_status()),
            (code, http),
            "{status}"
        );
        assert_eq!(fake.request_count(), 1, "{status} must not be retried");
        let details = err.details().unwrap_or_default();
        assert_eq!(details["upstreamStatus"], json!(status));
        assert_eq!(
            details["upstreamError"]["error"]["message"],
            json!(format!("fake upstream fault {status}"))
        );
    }
    // None of those count against the upstream's health.
    assert_eq!(ups.status()[0].failures_in_window, 0);

    // 500 is retried only because retryable_errors lists it.
    fake.clear_requests();
    let err = up.generate(&request("[[fault:500]] x")).await.err();
    assert_eq!(err.map(|e| e.spec_code()), Some("ST_GENERATION_FAILED"));
    assert_eq!(fake.request_count(), 3);
}

#[tokio::test]
async fn server_errors_502_503_504_are_retried_and_500_is_not_by_default() {
    let fake = FakeUpstream::start().await;
    let (_u, up) = build(config(UpstreamKind::Openai, fake.openai_url()));
    for status in [502u16, 503, 504] {
        fake.clear_requests();
        fake.fail_next(2, Fault::Status(status));
        let res = up.generate(&request("ok")).await;
        assert!(res.is_ok(), "{status}: {res:?}");
        assert_eq!(fake.request_count(), 3, "{status}");
    }
    fake.clear_requests();
    let err = up.generate(&request("[[fault:500]] x")).await.err();
    let err = err.unwrap_or_else(|| panic!("expected error"));
    assert_eq!(
        (err.spec_code(), err.http_status()),
        ("ST_GENERATION_FAILED", 502)
    );
    assert_eq!(fake.request_count(), 1);
}

#[tokio::test]
async fn malformed_body_is_generation_failed() {
    let fake = FakeUpstream::start().await;
    let (ups, up) = build(config(UpstreamKind::Openai, fake.openai_url()));
    let err = up.generate(&request("[[fault:malformed]] x")).await.err();
    let err = err.unwrap_or_else(|| panic!("expected error"));
    assert_eq!(err.kind(), UpstreamErrorKind::Malformed);
    assert_eq!(
        (err.spec_code(), err.http_status()),
        ("ST_GENERATION_FAILED", 502)
    );
    assert_eq!(ups.status()[0].failures_in_window, 1);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let fake = FakeUpstream::start().await;
    let mut cfg = config(UpstreamKind::Openai, fake.openai_url());
    cfg.retry.max_delay_ms = 2_000;
    let (ups, up) = build(cfg);
    fake.fail_next(
        1,
        Fault::RateLimited {
            retry_after: "1".into(),
        },
    );
    let res = up.generate(&request("patience")).await;
    assert!(res.is_ok(), "{res:?}");
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2);
    let waited = reqs[1].received_at - reqs[0].received_at;
    assert!(
        waited >= Duration::from_millis(1_000),
        "retried after {waited:?}"
    );
    assert!(
        waited < Duration::from_millis(1_500),
        "retried after {waited:?}"
    );
    // A rate limit is not ill health.
    assert_eq!(ups.status()[0].failures_in_window, 0);

    // An HTTP-date works too.
    fake.clear_requests();
    let when = std::time::SystemTime::now() + Duration::from_secs(2);
    fake.fail_next(
        1,
        Fault::RateLimited {
            retry_after: httpdate::fmt_http_date(when),
        },
    );
    assert!(up.generate(&request("dated")).await.is_ok());
    let reqs = fake.requests();
    let waited = reqs[1].received_at - reqs[0].received_at;
    // Whole-second dates: somewhere in (1, 2] seconds from now.
    assert!(
        waited >= Duration::from_millis(900),
        "retried after {waited:?}"
    );
}

#[tokio::test]
async fn rate_limit_beyond_the_cap_is_returned_with_retry_after() {
    let fake = FakeUpstream::start().await;
    let (ups, up) = build(config(UpstreamKind::Openai, fake.openai_url()));
    fake.set_fault(Some(Fault::RateLimited {
        retry_after: "30".into(),
    }));
    for _ in 0..12 {
        let err = up.generate(&request("x")).await.err();
        let err = err.unwrap_or_else(|| panic!("expected error"));
        assert_eq!(
            (err.spec_code(), err.http_status()),
            ("ST_API_RATE_LIMITED", 429)
        );
        assert_eq!(err.retry_after(), Some(Duration::from_secs(30)));
    }
    assert_eq!(
        fake.request_count(),
        12,
        "a 30 s Retry-After is above max_delay: no retry"
    );
    // Many 429s never open the breaker.
    assert_eq!(ups.status()[0].state, BreakerState::Closed);

    // Within the cap it is retried, then reported with its Retry-After.
    fake.clear_requests();
    fake.set_fault(Some(Fault::RateLimited {
        retry_after: "0".into(),
    }));
    let err = up.generate(&request("x")).await.err();
    let err = err.unwrap_or_else(|| panic!("expected error"));
    assert_eq!(err.spec_code(), "ST_API_RATE_LIMITED");
    assert!(err.retry_after().is_some());
    assert_eq!(fake.request_count(), 3);
}

fn breaker_config(fake: &FakeUpstream) -> UpstreamConfig {
    let mut cfg = config(UpstreamKind::Openai, fake.openai_url());
    cfg.circuit_breaker.failure_threshold = 3;
    cfg.circuit_breaker.min_calls = 3;
    cfg.circuit_breaker.consecutive_failures = 0;
    cfg.circuit_breaker.recovery_timeout_ms = 200;
    cfg
}

#[tokio::test]
async fn breaker_opens_at_the_threshold_and_fails_fast_without_the_network() {
    let fake = FakeUpstream::start().await;
    fake.set_fault(Some(Fault::Status(500)));
    let (ups, up) = build(breaker_config(&fake));
    for _ in 0..3 {
        let err = up.generate(&request("x")).await.err();
        assert_eq!(err.map(|e| e.spec_code()), Some("ST_GENERATION_FAILED"));
    }
    assert_eq!(fake.request_count(), 3);
    let status = &ups.status()[0];
    assert_eq!(status.state, BreakerState::Open);
    assert_eq!(status.failures_in_window, 3);
    assert!(status.open_until.is_some());
    assert!(status.last_error.as_deref().unwrap_or("").contains("500"));
    let json = serde_json::to_value(status).unwrap_or_default();
    assert_eq!(json["state"], json!("open"));
    assert!(json.get("failuresInWindow").is_some() && json.get("openUntil").is_some());

    let mut took = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let err = up.generate(&request("x")).await.err();
        took.push(started.elapsed());
        let err = err.unwrap_or_else(|| panic!("expected error"));
        assert_eq!(err.kind(), UpstreamErrorKind::CircuitOpen);
        assert_eq!(
            (err.spec_code(), err.http_status()),
            ("ST_API_UNAVAILABLE", 503)
        );
        let ra = err.retry_after().unwrap_or_default();
        assert!(
            ra > Duration::ZERO && ra <= Duration::from_millis(200),
            "{ra:?}"
        );
    }
    // Fail-fast is microseconds; on a shared 2-core machine one call in twenty may still be
    // descheduled for a few ms, so require 19 of 20 under 5 ms and none anywhere near a request.
    took.sort();
    assert!(
        took[18] < Duration::from_millis(5),
        "fail-fast took {took:?}"
    );
    assert!(
        took[19] < Duration::from_millis(50),
        "fail-fast took {took:?}"
    );
    assert_eq!(
        fake.request_count(),
        3,
        "open breaker must not reach the upstream"
    );
    // Streams fail fast as well.
    assert!(up.stream(&request("x")).await.is_err());
    assert_eq!(fake.request_count(), 3);
}

#[tokio::test]
async fn consecutive_failures_open_the_breaker_at_low_traffic() {
    let fake = FakeUpstream::start().await;
    fake.set_fault(Some(Fault::Status(503)));
    let mut cfg = config(UpstreamKind::Openai, fake.openai_url());
    cfg.retry.max_attempts = 1;
    cfg.circuit_breaker.min_calls = 1_000;
    cfg.circuit_breaker.consecutive_failures = 4;
    let (ups, up) = build(cfg);
    for _ in 0..4 {
        let _ = up.generate(&request("x")).await;
    }
    assert_eq!(ups.status()[0].state, BreakerState::Open);
    let _ = up.generate(&request("x")).await;
    assert_eq!(fake.request_count(), 4);
}

#[tokio::test]
async fn half_open_lets_exactly_one_probe_through() {
    let fake = FakeUpstream::start().await;
    fake.set_fault(Some(Fault::Status(500)));
    let (ups, up) = build(breaker_config(&fake));
    for _ in 0..3 {
        let _ = up.generate(&request("x")).await;
    }
    assert_eq!(ups.status()[0].state, BreakerState::Open);
    fake.set_fault(None);
    fake.set_latency(Latency::Fixed(150));
    tokio::time::sleep(Duration::from_millis(220)).await;
    assert_eq!(fake.request_count(), 3);

    let mut calls = Vec::new();
    for i in 0..5 {
        let up = Arc::clone(&up);
        calls.push(tokio::spawn(async move {
            up.generate(&request(&format!("probe {i}"))).await
        }));
    }
    let mut ok = 0;
    let mut rejected = 0;
    for c in calls {
        match c.await {
            Ok(Ok(_)) => ok += 1,
            Ok(Err(e)) if e.kind() == UpstreamErrorKind::CircuitOpen => rejected += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((ok, rejected), (1, 4));
    assert_eq!(
        fake.request_count(),
        4,
        "exactly one probe reached the upstream"
    );
    assert_eq!(ups.status()[0].state, BreakerState::Closed);
    fake.set_latency(Latency::None);
    assert!(up.generate(&request("after")).await.is_ok());
}

#[tokio::test]
async fn failed_probe_reopens_the_breaker() {
    let fake = FakeUpstream::start().await;
    fake.set_fault(Some(Fault::Status(500)));
    let (ups, up) = build(breaker_config(&fake));
    for _ in 0..3 {
        let _ = up.generate(&request("x")).await;
    }
    tokio::time::sleep(Duration::from_millis(220)).await;
    let err = up.generate(&request("probe")).await.err();
    assert_eq!(err.map(|e| e.kind()), Some(UpstreamErrorKind::Server));
    assert_eq!(fake.request_count(), 4);
    assert_eq!(ups.status()[0].state, BreakerState::Open);
    let err = up.generate(&request("x")).await.err();
    assert_eq!(err.map(|e| e.kind()), Some(UpstreamErrorKind::CircuitOpen));
    assert_eq!(fake.request_count(), 4);
}

#[tokio::test]
async fn retry_budget_caps_retries_during_an_outage() {
    let fake = FakeUpstream::start().await;
    fake.set_fault(Some(Fault::Status(503)));
    let mut cfg = config(UpstreamKind::Openai, fake.openai_url());
    cfg.retry.max_attempts = 4;
    cfg.retry.retry_budget_ratio = 0.1;
    cfg.retry.retry_budget_floor = 2;
    cfg.circuit_breaker.min_calls = 1_000;
    cfg.circuit_breaker.consecutive_failures = 0;
    let (_u, up) = build(cfg);
    for _ in 0..10 {
        let _ = up.generate(&request("x")).await;
    }
    // Without a budget: 40 requests. With it: 10 calls + floor 2 + 10% of 10 calls.
    assert_eq!(fake.request_count(), 13);
}

#[tokio::test]
async fn no_retry_after_the_first_delta_and_a_cut_stream_is_a_failure() {
    let fake = FakeUpstream::start().await;
    let (ups, up) = build(config(UpstreamKind::Openai, fake.openai_url()));
    let stream = up
        .stream(&request("[[chunks:6]][[fault:cut:2]] a long reply here"))
        .await;
    let (deltas, done, err) = collect(stream.unwrap_or_else(|e| panic!("{e}"))).await;
    assert_eq!(deltas.len(), 2);
    assert!(done.is_none());
    let err = err.unwrap_or_else(|| panic!("expected an error"));
    assert_eq!(err.kind(), UpstreamErrorKind::StreamBroken);
    assert_eq!(
        (err.spec_code(), err.http_status()),
        ("ST_GENERATION_FAILED", 502)
    );
    assert_eq!(
        fake.request_count(),
        1,
        "never retried after a delta reached the caller"
    );
    assert_eq!(ups.status()[0].failures_in_window, 1);

    // The WebSocket transport behaves the same.
    let fake = FakeUpstream::start().await;
    let (_u, up) = build(config(UpstreamKind::Sillytavern, fake.st_url()));
    let stream = up
        .stream(&request("[[chunks:6]][[fault:cut:2]] a long reply here"))
        .await;
    let (deltas, done, err) = collect(stream.unwrap_or_else(|e| panic!("{e}"))).await;
    assert_eq!((deltas.len(), done.is_none()), (2, true));
    assert_eq!(err.map(|e| e.kind()), Some(UpstreamErrorKind::StreamBroken));
    assert_eq!(fake.request_count(), 1);
}

#[tokio::test]
async fn opening_a_stream_is_retried_before_the_first_delta() {
    let fake = FakeUpstream::start().await;
    let (_u, up) = build(config(UpstreamKind::Openai, fake.openai_url()));
    fake.fail_next(1, Fault::Status(503));
    fake.fail_next(1, Fault::Cut { after: 0 });
    let stream = up.stream(&request("third time")).await;
    let (deltas, done, err) = collect(stream.unwrap_or_else(|e| panic!("{e}"))).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(deltas.concat(), "echo: third time");
    assert!(done.is_some());
    assert_eq!(fake.request_count(), 3);

    let fake = FakeUpstream::start().await;
    let (_u, up) = build(config(UpstreamKind::Sillytavern, fake.st_url()));
    fake.fail_next(1, Fault::Status(503));
    let stream = up.stream(&request("again")).await;
    let (deltas, _, err) = collect(stream.unwrap_or_else(|e| panic!("{e}"))).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(deltas.concat(), "echo: again");
    assert_eq!(fake.request_count(), 2);
}

/// When the fake upstream saw the client hang up on its first request (polled for 500 ms).
async fn hang_up_seen(fake: &FakeUpstream) -> Option<Instant> {
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let closed = fake.requests()[0].closed_early_at;
        if closed.is_some() {
            return closed;
        }
    }
    None
}

async fn assert_drop_aborts(kind: UpstreamKind) {
    let fake = FakeUpstream::start().await;
    fake.set_chunks(40);
    fake.set_drip(20);
    let url = match kind {
        UpstreamKind::Openai => fake.openai_url(),
        UpstreamKind::Sillytavern => fake.st_url(),
    };
    let (ups, up) = build(config(kind, url));
    let mut stream = up
        .stream(&request("a long story please, with many many words in it"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        stream.next().await,
        Some(Ok(StreamEvent::Delta(_)))
    ));
    let dropped_at = Instant::now();
    drop(stream);
    let closed = hang_up_seen(&fake)
        .await
        .unwrap_or_else(|| panic!("{kind:?}: upstream never saw the cancel"));
    let lag = closed.saturating_duration_since(dropped_at);
    assert!(
        lag < Duration::from_millis(100),
        "{kind:?}: cancel reached upstream after {lag:?}"
    );
    assert!(fake.requests()[0].finished_at.is_none());
    // The caller going away is not the upstream's fault.
    assert_eq!(ups.status()[0].failures_in_window, 0);
}

#[tokio::test]
async fn dropping_an_openai_stream_aborts_the_upstream_request() {
    assert_drop_aborts(UpstreamKind::Openai).await;
}

#[tokio::test]
async fn dropping_a_sillytavern_stream_sends_cancel() {
    assert_drop_aborts(UpstreamKind::Sillytavern).await;
}

#[tokio::test]
async fn passthrough_returns_the_raw_response_and_retries_before_bytes() {
    use http_body_util::BodyExt;
    let fake = FakeUpstream::start().await;
    let (_u, up) = build(config(UpstreamKind::Openai, fake.openai_url()));
    fake.fail_next(1, Fault::Status(502));
    let body =
        json!({"model": "m", "messages": [{"role": "user", "content": "raw"}], "stream": true});
    let resp = up
        .passthrough("/chat/completions", body.to_string().into(), true)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let bytes = resp
        .body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("data: [DONE]"), "{text}");
    assert_eq!(fake.request_count(), 2);
    assert_eq!(fake.last_body(), Some(body));

    // The caller's own 4xx comes back as it is; Taproom's credentials failing does not.
    let resp = up.passthrough("/nope", "{}".into(), false).await;
    assert_eq!(resp.map(|r| r.status.as_u16()).ok(), Some(404));
    let err = up
        .passthrough(
            "chat/completions",
            json!({"messages": [{"role": "user", "content": "[[fault:401]]"}]})
                .to_string()
                .into(),
            false,
        )
        .await
        .err();
    assert_eq!(err.map(|e| e.spec_code()), Some("ST_API_AUTH_FAILED"));
}

/// Reads a passthrough body to its end.
async fn read_body(body: taproom::upstream::UpstreamBody) -> String {
    use http_body_util::BodyExt;
    let bytes = body.collect().await.unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&bytes.to_bytes()).into_owned()
}

#[tokio::test]
async fn plain_http_connections_are_reused_and_replaced_when_the_upstream_closes_them() {
    let fake = FakeUpstream::start().await;
    let (ups, up) = build(config(UpstreamKind::Openai, fake.openai_url()));
    for i in 0..3 {
        let r = up.generate(&request(&format!("turn {i}"))).await;
        assert_eq!(r.map(|r| r.content).ok(), Some(format!("echo: turn {i}")));
    }
    let (_, _, err) = collect(up.stream(&request("streamed")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "raw"}]});
    for stream in [false, true] {
        let resp = up
            .passthrough("chat/completions", body.to_string().into(), stream)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(read_body(resp.body).await.contains("echo: raw"));
    }
    assert_eq!(fake.request_count(), 6);
    assert_eq!(fake.connections_accepted(), 1, "one keep-alive connection");

    // An idle connection the upstream closed (a keep-alive timeout) is noticed and replaced,
    // not handed a request that would fail.
    fake.close_connections();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = up.generate(&request("after the close")).await;
    assert_eq!(
        r.map(|r| r.content).ok(),
        Some("echo: after the close".into())
    );
    assert_eq!(fake.connections_accepted(), 2);
    assert_eq!(fake.request_count(), 7, "no request was lost or retried");
    assert_eq!(ups.status()[0].failures_in_window, 0);
}

#[tokio::test]
async fn concurrent_requests_each_get_a_connection_and_leave_it_for_the_next() {
    let fake = FakeUpstream::start().await;
    fake.set_latency(Latency::Fixed(30));
    let (_u, up) = build(config(UpstreamKind::Openai, fake.openai_url()));
    let turns = (0..8).map(|i| {
        let up = Arc::clone(&up);
        async move {
            up.generate(&request(&format!("c{i}")))
                .await
                .map(|r| r.content)
        }
    });
    let texts = futures_util::future::join_all(turns).await;
    for (i, t) in texts.into_iter().enumerate() {
        assert_eq!(t.ok(), Some(format!("echo: c{i}")));
    }
    assert_eq!(
        fake.connections_accepted(),
        8,
        "overlapping requests do not share one"
    );
    for i in 0..8 {
        let r = up.generate(&request(&format!("s{i}"))).await;
        assert_eq!(r.map(|r| r.content).ok(), Some(format!("echo: s{i}")));
    }
    assert_eq!(fake.connections_accepted(), 8, "the idle ones were reused");
}

#[tokio::test]
async fn a_passthrough_body_dropped_unread_closes_its_connection() {
    use http_body_util::BodyExt;
    let fake = FakeUpstream::start().await;
    fake.set_chunks(40);
    fake.set_drip(20);
    let (_u, up) = build(config(UpstreamKind::Openai, fake.openai_url()));
    let body =
        json!({"model": "m", "messages": [{"role": "user", "content": "long"}], "stream": true});
    let mut resp = up
        .passthrough("chat/completions", body.to_string().into(), true)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let first = resp.body.frame().await;
    assert!(matches!(first, Some(Ok(_))), "{first:?}");
    let dropped_at = Instant::now();
    drop(resp);
    let closed = hang_up_seen(&fake)
        .await
        .unwrap_or_else(|| panic!("the upstream never saw the hang-up"));
    assert!(closed.saturating_duration_since(dropped_at) < Duration::from_millis(100));
    // The half-read connection is not reused: the next request opens a new one.
    fake.set_drip(0);
    let r = up.generate(&request("next")).await;
    assert_eq!(r.map(|r| r.content).ok(), Some("echo: next".into()));
    assert_eq!(fake.connections_accepted(), 2);
}

#[tokio::test]
async fn registry_picks_named_and_default_upstreams() {
    let fake = FakeUpstream::start().await;
    let mut cfg = UpstreamsConfig::default();
    cfg.upstreams.insert(
        "main".into(),
        config(UpstreamKind::Openai, fake.openai_url()),
    );
    cfg.upstreams.insert(
        "st".into(),
        config(UpstreamKind::Sillytavern, fake.st_url()),
    );
    let ups = Upstreams::new(&cfg).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        ups.get(None).map(|u| u.kind()).ok(),
        Some(UpstreamKind::Openai)
    );
    assert_eq!(
        ups.get(Some("st")).map(|u| u.kind()).ok(),
        Some(UpstreamKind::Sillytavern)
    );
    let err = ups.get(Some("nope")).err();
    assert_eq!(err.map(|e| e.spec_code()), Some("VALIDATION_ERROR"));
    let status = serde_json::to_value(ups.status()).unwrap_or_default();
    assert_eq!(status[0]["name"], json!("main"));
    assert_eq!(status[0]["state"], json!("closed"));
    assert_eq!(status[0]["isDefault"], json!(true));
    assert_eq!(status[1]["kind"], json!("sillytavern"));
}

/// A `MakeWriter` that appends every log line to a shared buffer.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

#[tokio::test]
async fn the_api_key_never_appears_in_logs_errors_or_status() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(capture.clone())
        .with_ansi(false)
        .finish();
    // The default test runtime is single-threaded, so the thread-local default covers it all.
    let _guard = tracing::subscriber::set_default(subscriber);

    let fake = FakeUpstream::start().await;
    fake.require_api_key(Some("a-different-key"));
    let (ups, up) = build(config(UpstreamKind::Openai, fake.openai_url()));
    let mut texts = Vec::new();
    let err = up.generate(&request("x")).await.err();
    let err = err.unwrap_or_else(|| panic!("expected auth failure"));
    assert_eq!(err.spec_code(), "ST_API_AUTH_FAILED");
    texts.push(err.to_string());
    texts.push(format!("{err:?}"));
    texts.push(err.details().unwrap_or_default().to_string());
    fake.require_api_key(None);
    fake.fail_next(2, Fault::Status(503));
    fake.fail_next(1, Fault::Reset);
    let err = up.generate(&request("x")).await.err();
    let err = err.unwrap_or_else(|| panic!("expected failure"));
    texts.push(err.to_string());
    texts.push(format!("{err:?}"));
    texts.push(err.details().unwrap_or_default().to_string());
    let (_u2, st) = build(config(UpstreamKind::Sillytavern, fake.st_url()));
    let _ = st.stream(&request("[[fault:503]]")).await.err();
    texts.push(serde_json::to_string(&ups.status()).unwrap_or_default());
    texts.push(format!("{ups:?} {up:?}"));
    let mut cfg = UpstreamsConfig::default();
    cfg.upstreams.insert(
        "main".into(),
        config(UpstreamKind::Openai, fake.openai_url()),
    );
    texts.push(format!("{cfg:?}"));

    let logs =
        String::from_utf8_lossy(&capture.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    assert!(
        logs.contains("upstream attempt failed"),
        "logs were not captured: {logs}"
    );
    assert!(!logs.contains(KEY), "key leaked into logs");
    for t in texts {
        assert!(!t.contains(KEY), "key leaked: {t}");
    }
}

#[tokio::test]
async fn https_upstream_trusts_the_extra_ca_file_and_negotiates_h2() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    let fake = FakeUpstream::start_tls(&dir.join("server.pem"), &dir.join("server.key"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = config(UpstreamKind::Openai, fake.openai_tls_url());
    cfg.retry.max_attempts = 1;
    // System roots alone do not trust the test CA.
    let (_u, up) = build(cfg.clone());
    let err = up.generate(&request("x")).await.err();
    assert_eq!(err.map(|e| e.kind()), Some(UpstreamErrorKind::Connect));
    assert_eq!(fake.request_count(), 0);

    cfg.ca_file = Some(dir.join("ca.pem"));
    let (_u, up) = build(cfg);
    let res = up.generate(&request("secure")).await;
    assert_eq!(res.map(|r| r.content).ok().as_deref(), Some("echo: secure"));
    let stream = up.stream(&request("secure stream")).await;
    let (deltas, done, err) = collect(stream.unwrap_or_else(|e| panic!("{e}"))).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(deltas.concat(), "echo: secure stream");
    assert!(done.is_some());
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2);
    assert!(
        reqs.iter().all(|r| r.version == "HTTP/2.0"),
        "ALPN should pick h2"
    );
}

#[tokio::test]
async fn websocket_stream_sends_heartbeats_while_silent() {
    let fake = FakeUpstream::start().await;
    fake.set_chunks(2);
    fake.set_drip(120);
    let mut cfg = config(UpstreamKind::Sillytavern, fake.st_url());
    cfg.websocket.heartbeat_interval_ms = 40;
    let (_u, up) = build(cfg);
    let stream = up.stream(&request("slow one")).await;
    let (deltas, done, err) = collect(stream.unwrap_or_else(|e| panic!("{e}"))).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(deltas.concat(), "echo: slow one");
    assert!(done.is_some());
    assert!(
        fake.heartbeats_received() >= 2,
        "{}",
        fake.heartbeats_received()
    );
}
