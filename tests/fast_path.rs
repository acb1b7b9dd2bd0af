//! `POST /v1/chat/completions` is served beside the router, with the generic layers done inline
//! (src/http/fast_path.rs). These hold it to what the router's layers do for every other route:
//! request ids, CORS headers, body limits, the shared rate-limit budget, timeouts, compression,
//! the access log and metrics.

mod support;

use serde_json::{json, Value};
use support::app::{expect_error, token, Options, TestServer};
use support::fake_upstream::{FakeUpstream, Latency};

async fn start(fake: &FakeUpstream, extra: &str) -> TestServer {
    TestServer::start_with(Options {
        config: Some(format!(
            "{extra}\n[upstreams.main]\nurl = \"{}\"\nmodel = \"fake-model\"\n[upstreams.main.retry]\nmax_attempts = 1\n",
            fake.openai_url()
        )),
        ..Options::default()
    })
    .await
}

fn completion(text: &str) -> Value {
    json!({"model": "fake-model", "messages": [{"role": "user", "content": text}]})
}

async fn post(
    s: &TestServer,
    t: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = s
        .client
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(t)
        .header("content-type", "application/json")
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn cors_and_request_id_headers_match_the_router() {
    let fake = FakeUpstream::start().await;
    let s = start(
        &fake,
        "[http]\ncors_origins = [\"http://tauri.localhost\"]\n",
    )
    .await;
    let t = token("ann");
    for origin in ["http://tauri.localhost", "http://evil.example"] {
        let fast = post(
            &s,
            &t,
            &completion("hi"),
            &[("origin", origin), ("x-request-id", "fast-1")],
        )
        .await;
        assert_eq!(fast.status(), 200);
        let routed = s
            .client
            .get(s.url("/v1/models"))
            .bearer_auth(&t)
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        assert_eq!(routed.status(), 200);
        for name in [
            "vary",
            "access-control-allow-origin",
            "access-control-expose-headers",
        ] {
            assert_eq!(
                header(&fast, name),
                header(&routed, name),
                "{name} for {origin}"
            );
        }
        assert_eq!(header(&fast, "x-request-id"), Some("fast-1"));
    }
    // The listed origin is allowed, a foreign one is not.
    let r = post(
        &s,
        &t,
        &completion("hi"),
        &[("origin", "http://tauri.localhost")],
    )
    .await;
    assert_eq!(
        header(&r, "access-control-allow-origin"),
        Some("http://tauri.localhost")
    );
    assert_eq!(
        header(&r, "access-control-expose-headers"),
        Some("x-request-id")
    );
    let r = post(
        &s,
        &t,
        &completion("hi"),
        &[("origin", "http://evil.example")],
    )
    .await;
    assert_eq!(header(&r, "access-control-allow-origin"), None);
    // Without a client id one is generated; errors carry it in the envelope too.
    let r = post(&s, &t, &completion("hi"), &[]).await;
    assert!(!header(&r, "x-request-id").unwrap_or("").is_empty());
    let r = post(
        &s,
        "not-a-jwt",
        &completion("hi"),
        &[("x-request-id", "bad-key-7")],
    )
    .await;
    assert_eq!(r.status(), 401);
    assert_eq!(header(&r, "x-request-id"), Some("bad-key-7"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["requestId"], "bad-key-7", "{v}");
}

#[tokio::test]
async fn any_origin_gets_a_wildcard_like_every_other_route() {
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "").await;
    let r = post(
        &s,
        &token("ann"),
        &completion("hi"),
        &[("origin", "http://anywhere.example")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "access-control-allow-origin"), Some("*"));
    // A preflight is not this path's business: the router's CORS layer answers it.
    let r = s
        .preflight("/v1/chat/completions", "http://anywhere.example")
        .await;
    assert_eq!(r.status(), 204);
    assert!(header(&r, "access-control-allow-methods")
        .unwrap()
        .contains("POST"));
}

#[tokio::test]
async fn oversized_bodies_are_413_and_never_reach_the_upstream() {
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "[http]\nbody_limit_bytes = 2048\n").await;
    let t = token("ann");
    let big = completion(&"x".repeat(4096));
    let r = post(&s, &t, &big, &[]).await;
    assert_eq!(header(&r, "connection"), Some("close"));
    expect_error(r, 413, "PAYLOAD_TOO_LARGE").await;
    // Chunked bodies (no content-length) are cut off while being read.
    let body =
        reqwest::Body::wrap_stream(futures_util::stream::iter(vec![Ok::<_, std::io::Error>(
            big.to_string().into_bytes(),
        )]));
    let r = s
        .client
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(&t)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    expect_error(r, 413, "PAYLOAD_TOO_LARGE").await;
    assert_eq!(fake.request_count(), 0);
    // A body under the limit still goes through.
    assert_eq!(post(&s, &t, &completion("small"), &[]).await.status(), 200);
    assert_eq!(fake.request_count(), 1);
}

#[tokio::test]
async fn completions_draw_from_the_generation_budget_shared_with_interact() {
    let fake = FakeUpstream::start().await;
    let s = start(
        &fake,
        "[rate_limit]\ninteract_per_minute = 2\nother_per_minute = 100\n",
    )
    .await;
    let t = token("ann");
    let c = s.create_character(&t, json!({"name": "Budget"})).await;
    let id = c["id"].as_str().unwrap();
    for _ in 0..2 {
        assert_eq!(post(&s, &t, &completion("hi"), &[]).await.status(), 200);
    }
    let r = post(&s, &t, &completion("hi"), &[]).await;
    assert!(header(&r, "retry-after").is_some());
    expect_error(r, 429, "RATE_LIMITED").await;
    // The same bucket as the router's generation routes.
    let r = s
        .post_json(
            &format!("/api/characters/{id}/interact"),
            Some(&t),
            &json!({"message": "hi"}),
        )
        .await;
    expect_error(r, 429, "RATE_LIMITED").await;
    // Another user has a budget of their own; other routes are not charged.
    assert_eq!(
        post(&s, &token("bob"), &completion("hi"), &[])
            .await
            .status(),
        200
    );
    assert_eq!(s.get("/api/characters", Some(&t)).await.status(), 200);
    assert_eq!(fake.request_count(), 3);
}

#[tokio::test]
async fn a_slow_upstream_hits_the_request_timeout_with_the_envelope() {
    let fake = FakeUpstream::start().await;
    fake.set_latency(Latency::Fixed(3_000));
    let s = start(&fake, "[http]\nrequest_timeout_ms = 300\n").await;
    let started = std::time::Instant::now();
    let r = post(
        &s,
        &token("ann"),
        &completion("hi"),
        &[("x-request-id", "slow-1")],
    )
    .await;
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    let v = expect_error(r, 504, "TIMEOUT").await;
    assert_eq!(v["error"]["requestId"], "slow-1");
}

#[tokio::test]
async fn large_answers_are_compressed_when_asked_and_streams_never() {
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "").await;
    let t = token("ann");
    let long = "words ".repeat(400);
    for enc in ["gzip", "br"] {
        let r = post(&s, &t, &completion(&long), &[("accept-encoding", enc)]).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "content-encoding"), Some(enc));
    }
    // reqwest decodes nothing here, so read the identity body to prove it is the real answer.
    let r = post(&s, &t, &completion(&long), &[]).await;
    assert_eq!(header(&r, "content-encoding"), None);
    let v: Value = r.json().await.unwrap();
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .starts_with("echo: words"));
    let mut stream = completion(&long);
    stream["stream"] = json!(true);
    let r = post(&s, &t, &stream, &[("accept-encoding", "gzip")]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-encoding"), None);
    assert!(r.text().await.unwrap().contains("data: [DONE]"));
}

#[tokio::test]
async fn requests_are_logged_and_counted_under_the_route() {
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "").await;
    let t = token("ann");
    for _ in 0..3 {
        assert_eq!(
            post(&s, &t, &completion("hi"), &[("x-request-id", "logged-1")])
                .await
                .status(),
            200
        );
    }
    assert_eq!(
        post(&s, "not-a-jwt", &completion("hi"), &[]).await.status(),
        401
    );
    let text = s.get("/metrics", None).await.text().await.unwrap();
    for want in [
        r#"taproom_http_requests_total{method="POST",route="/v1/chat/completions",status="200"} 3"#,
        r#"taproom_http_requests_total{method="POST",route="/v1/chat/completions",status="401"} 1"#,
    ] {
        assert!(text.contains(want), "missing {want} in\n{text}");
    }
    let logs = s.logs();
    let served = logs
        .lines()
        .find(|l| l.contains("served") && l.contains("logged-1"))
        .unwrap_or_else(|| panic!("no access log line in\n{logs}"));
    assert!(served.contains("/v1/chat/completions"), "{served}");
    assert!(served.contains("status=200"), "{served}");
}
