//! Latency of one non-streaming call through Taproom's full upstream stack (pool + retry +
//! breaker + JSON encode/parse) against a bare hyper-util client POSTing the same bytes to the
//! same in-process fake upstream. Calls are sequential and interleaved (alternating which goes
//! first) so both see the same machine state.
//!
//! `cargo run --release --example bench_upstream -- [CALLS] [WARMUP]` (defaults 5000 and 500).

#[path = "../tests/support/fake_upstream.rs"]
mod fake_upstream;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use taproom::upstream::{ChatMessage, GenerateRequest, UpstreamConfig, Upstreams, UpstreamsConfig};
use tokio::time::Instant;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Two workers, like the target machine; the fake upstream shares them.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let calls: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(5_000);
    let warmup: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(500);

    let fake = fake_upstream::FakeUpstream::start().await;
    let mut cfg = UpstreamsConfig::default();
    cfg.upstreams.insert(
        "main".into(),
        UpstreamConfig {
            url: fake.openai_url(),
            model: "bench-model".into(),
            ..UpstreamConfig::default()
        },
    );
    let ups = Upstreams::new(&cfg)?;
    let up = ups.get(None)?;
    let req = GenerateRequest {
        character_id: "char-bench".into(),
        messages: vec![
            ChatMessage::new("system", "You are Ada, a helpful and witty engineer."),
            ChatMessage::new("user", "Tell me about the analytical engine."),
        ],
        user_input: "Tell me about the analytical engine.".into(),
        ..GenerateRequest::default()
    };
    // The same bytes Taproom sends, so both sides move identical requests.
    let body = Bytes::from(serde_json::to_vec(&serde_json::json!({
        "model": "bench-model", "messages": req.messages, "stream": false
    }))?);
    let uri: http::Uri = format!("{}/chat/completions", fake.openai_url()).parse()?;
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let bare: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(http);

    let bare_call = || {
        let bare = &bare;
        let uri = uri.clone();
        let body = body.clone();
        async move {
            let req = http::Request::post(uri)
                .header("content-type", "application/json")
                .body(Full::new(body))?;
            let resp = bare.request(req).await?;
            let bytes = resp.into_body().collect().await?.to_bytes();
            Ok::<usize, Box<dyn std::error::Error>>(bytes.len())
        }
    };

    for _ in 0..warmup {
        up.generate(&req).await?;
        bare_call().await?;
    }
    let mut ours = Vec::with_capacity(calls);
    let mut base = Vec::with_capacity(calls);
    for i in 0..calls {
        // Alternate the order so neither side always runs on a just-warmed connection.
        for first in [i % 2 == 0, i % 2 != 0] {
            let t = Instant::now();
            if first {
                up.generate(&req).await?;
                ours.push(t.elapsed());
            } else {
                bare_call().await?;
                base.push(t.elapsed());
            }
        }
    }
    ours.sort();
    base.sort();
    let (o50, o99) = (percentile(&ours, 0.50), percentile(&ours, 0.99));
    let (b50, b99) = (percentile(&base, 0.50), percentile(&base, 0.99));
    println!("calls: {calls} sequential, interleaved (warmup {warmup})");
    println!(
        "bare hyper client : p50 {:8.1} us   p99 {:8.1} us",
        micros(b50),
        micros(b99)
    );
    println!(
        "taproom upstream  : p50 {:8.1} us   p99 {:8.1} us",
        micros(o50),
        micros(o99)
    );
    println!(
        "ratio (taproom / bare): p50 {:.3}   p99 {:.3}",
        micros(o50) / micros(b50),
        micros(o99) / micros(b99)
    );
    println!(
        "upstream requests seen by the fake: {}",
        fake.request_count()
    );
    Ok(())
}
