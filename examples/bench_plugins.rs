//! Plugin hook overhead benchmark: a fresh `Store` + instantiation from the `InstancePre` + one
//! `before-generate` call of the small dice plugin (a plain message, so the plugin does its
//! `{{roll:..}}` scan and returns "unchanged"), measured on the calling thread, then the same
//! through the async API (permit + `spawn_blocking`).
//!
//! Run: `cargo run --release --example bench_plugins -- [ITERATIONS]` (builds the guest plugins
//! for wasm32-wasip2 first, like the tests do). Targets: p50 ≤ 50 µs, p99 ≤ 150 µs.

#[path = "../tests/support/plugins.rs"]
mod plugins_support;

use std::time::Instant;

use taproom::plugins::{
    percentile, BeforeContext, Binding, CallContext, PluginHost, PluginsConfig, PromptMessage,
};

fn report(label: &str, mut samples: Vec<u64>) {
    samples.sort_unstable();
    let mean = samples.iter().sum::<u64>() as f64 / samples.len().max(1) as f64;
    println!(
        "{label:<34} n={:<6} p50={:>6} µs  p99={:>6} µs  mean={mean:>8.1} µs  max={:>7} µs",
        samples.len(),
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        samples.last().copied().unwrap_or(0),
    );
}

fn main() {
    let iterations: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5_000);
    let dir = plugins_support::PluginsDir::new();
    dir.add(
        "dice",
        "taproom_plugin_dice",
        plugins_support::BEFORE,
        "fail-open",
        "",
    );
    let cfg = PluginsConfig {
        dir: dir.path().to_path_buf(),
        watch: false,
        ..PluginsConfig::default()
    };
    let load_started = Instant::now();
    let host = match PluginHost::load(&cfg) {
        Ok(h) => h,
        Err(e) => panic!("load: {e}"),
    };
    println!(
        "load + compile of the dice component: {:.1} ms",
        load_started.elapsed().as_secs_f64() * 1e3
    );
    let binding = Binding {
        name: "dice".into(),
        config: serde_json::json!({}),
    };
    let ctx = BeforeContext {
        base: CallContext {
            conversation_id: "bench".into(),
            user_name: "Ann".into(),
            user_message: "Tell me about the forest, please.".into(),
            ..CallContext::default()
        },
        prompt: vec![
            PromptMessage {
                role: "system".into(),
                content: "You are Seraphina, a guardian of the forest.".into(),
            },
            PromptMessage {
                role: "user".into(),
                content: "Tell me about the forest, please.".into(),
            },
        ],
    };
    for _ in 0..200 {
        let _ = host.before_generate_blocking(&binding, &ctx);
    }
    let mut sync = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        let r = host.before_generate_blocking(&binding, &ctx);
        sync.push(t.elapsed().as_micros() as u64);
        assert!(r.is_ok());
    }
    report("before-generate, calling thread", sync);

    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    };
    let samples = rt.block_on(async {
        let mut samples = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let t = tokio::time::Instant::now();
            let r = host.before_generate(&binding, &ctx).await;
            samples.push(t.elapsed().as_micros() as u64);
            assert!(r.is_ok());
        }
        samples
    });
    report("before-generate, async API", samples);
    for s in host.stats() {
        println!(
            "host stats: {} calls={} p50={} µs p99={} µs",
            s.name, s.calls, s.p50_us, s.p99_us
        );
    }
}
