//! Plugin hook overhead benchmark: a fresh `Store` + instantiation from the `InstancePre` + one
//! `before-generate` call of the small dice plugin (a plain message, so the plugin does its
//! `{{roll:..}}` scan and returns "unchanged"), measured on the calling thread, then the same
//! through the async API (permit + `spawn_blocking`). Then interact end to end over HTTP
//! against the in-process server and a zero-latency fake upstream: a character with two plugins
//! bound (mood before, guard after) against one with none, requests alternating, same run.
//!
//! Run: `cargo run --release --example bench_plugins -- [ITERATIONS] [TURNS]` (builds the guest
//! plugins for wasm32-wasip2 first, like the tests do). Targets: p50 ≤ 50 µs, p99 ≤ 150 µs.

#[path = "../tests/support/fake_upstream.rs"]
mod fake_upstream;
#[path = "../tests/support/plugins.rs"]
mod plugins_support;

use std::time::{Duration, Instant};

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
    let turns: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2_000);
    let dir = plugins_support::PluginsDir::new();
    dir.add(
        "dice",
        "taproom_plugin_dice",
        plugins_support::BEFORE,
        "fail-open",
        "",
    );
    dir.add(
        "mood",
        "taproom_plugin_mood",
        plugins_support::BEFORE,
        "fail-open",
        "",
    );
    dir.add(
        "guard",
        "taproom_plugin_guard",
        plugins_support::AFTER,
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
    rt.block_on(interact_end_to_end(dir.path(), turns));
}

/// Interact over HTTP with two plugins bound vs none, alternating, one request at a time.
async fn interact_end_to_end(plugins_dir: &std::path::Path, turns: usize) {
    let fake = fake_upstream::FakeUpstream::start().await;
    let data = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    };
    let toml = format!(
        "log = \"warn\"\n[upstreams.main]\nurl = \"{}\"\n[rate_limit]\ninteract_per_minute = 0\nother_per_minute = 0\n",
        fake.openai_url()
    );
    let mut config = match taproom::config::Config::from_toml(&toml) {
        Ok(c) => c,
        Err(e) => panic!("config: {e}"),
    };
    config.data_dir = data.path().to_path_buf();
    config.auth.jwt_secret = "bench-secret-0123456789".into();
    config.plugins.dir = plugins_dir.to_path_buf();
    config.plugins.watch = false;
    // Summaries would add upstream calls that have nothing to do with plugins.
    config.memory.summarize_every_turns = 0;
    let state = match taproom::server::build_state(config) {
        Ok(s) => s,
        Err(e) => panic!("state: {e}"),
    };
    let token = match state.auth.mint("bench", false, Duration::from_secs(3600)) {
        Ok(t) => t,
        Err(e) => panic!("token: {e}"),
    };
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => panic!("bind: {e}"),
    };
    let base = match listener.local_addr() {
        Ok(a) => format!("http://{a}"),
        Err(e) => panic!("addr: {e}"),
    };
    tokio::spawn(taproom::server::run(
        listener,
        state,
        std::future::pending::<()>(),
    ));
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let create = |name: &'static str| {
        let (client, base, token) = (client.clone(), base.clone(), token.clone());
        async move {
            let v: serde_json::Value = client
                .post(format!("{base}/api/characters"))
                .bearer_auth(&token)
                .json(&serde_json::json!({"name": name, "description": "A guardian of the forest.", "firstMes": "Welcome, traveller."}))
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .unwrap_or_else(|e| panic!("create: {e}"))
                .json()
                .await
                .unwrap_or_else(|e| panic!("create: {e}"));
            v["id"].as_str().unwrap_or_default().to_string()
        }
    };
    let plain = create("Plain").await;
    let plugged = create("Plugged").await;
    let bindings = serde_json::json!([
        {"name": "mood", "config": {"step": 5, "depth": 1}, "enabled": true},
        {"name": "guard", "config": {"rules": [{"match": "forbidden", "action": "veto", "reason": "spoilers"}]}, "enabled": true}
    ]);
    let r = client
        .put(format!("{base}/api/characters/{plugged}/plugins"))
        .bearer_auth(&token)
        .json(&bindings)
        .send()
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    assert!(r.status().is_success(), "bind: {}", r.status());
    // Each turn continues one conversation per character, so history (and prompt) grow alike.
    let mut conversations: [Option<String>; 2] = [None, None];
    let mut samples: [Vec<u64>; 2] = [Vec::with_capacity(turns), Vec::with_capacity(turns)];
    let ids = [plain, plugged];
    for turn in 0..(turns + 100) {
        // Alternate which goes first so both see the same machine state.
        let order = if turn % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            if turn % 20 == 0 {
                conversations[which] = None;
            }
            let body = serde_json::json!({
                "message": "Thank you for the tea. Tell me about the forest, please.",
                "conversationId": conversations[which],
            });
            let t = Instant::now();
            let r = client
                .post(format!("{base}/api/characters/{}/interact", ids[which]))
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await
                .unwrap_or_else(|e| panic!("interact: {e}"));
            assert!(r.status().is_success(), "interact: {}", r.status());
            let v: serde_json::Value = r.json().await.unwrap_or_else(|e| panic!("interact: {e}"));
            let elapsed = t.elapsed().as_micros() as u64;
            conversations[which] = v["conversationId"].as_str().map(str::to_string);
            if turn >= 100 {
                samples[which].push(elapsed);
            }
        }
    }
    let [none, two] = samples;
    let (n50, n99) = p50_p99(&none);
    let (t50, t99) = p50_p99(&two);
    report("interact, no plugins", none);
    report("interact, mood + guard", two);
    println!(
        "added by two plugins: p50 +{} µs, p99 +{} µs",
        t50 as i64 - n50 as i64,
        t99 as i64 - n99 as i64
    );
}

fn p50_p99(samples: &[u64]) -> (u64, u64) {
    let mut s = samples.to_vec();
    s.sort_unstable();
    (percentile(&s, 50.0), percentile(&s, 99.0))
}
