//! Character API benchmark (issue: gateway core). Seeds 100,000 characters (10,000 owned by the
//! benchmarking user) straight into a fresh redb file, starts the real server in-process on
//! 127.0.0.1, and drives it over HTTP at concurrency 32 with a closed loop:
//! GET by id (cached), list page (limit 50, default sort), list with `search`, and create.
//!
//! Run: `cargo run --release --example bench_characters -- [SECONDS_PER_SCENARIO]`
//! (`BENCH_ONLY=GET,search` limits the run to scenarios whose names contain those words).

use std::sync::Arc;
use std::time::Duration;
use taproom::config::Config;
use taproom::model::{Character, PersonalityProfile};
use tokio::time::Instant;

const TOTAL: usize = 100_000;
const MINE: usize = 10_000;
const CONCURRENCY: usize = 32;

const WORDS: &[&str] = &[
    "forest",
    "guardian",
    "gentle",
    "sword",
    "ancient",
    "river",
    "merchant",
    "dragon",
    "quiet",
    "storm",
    "library",
    "sailor",
    "witty",
    "loyal",
    "candle",
    "mountain",
    "healer",
    "clockwork",
    "shadow",
    "garden",
    "tavern",
    "knight",
    "scholar",
    "velvet",
    "ember",
    "frost",
    "harbor",
];

fn words(seed: &mut u64, n: usize) -> String {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        out.push(WORDS[(*seed % WORDS.len() as u64) as usize]);
    }
    out.join(" ")
}

fn character(i: usize, owner: &str, seed: &mut u64) -> Character {
    let now = taproom::time::ms_to_rfc3339(1_700_000_000_000 + i as i64 * 1000);
    let name = format!("{} {}", words(seed, 2), i);
    // One in a hundred descriptions mentions the search term.
    let mut description = words(seed, 60);
    if i.is_multiple_of(100) {
        description.push_str(" lighthouse");
    }
    Character {
        id: uuid::Uuid::now_v7().to_string(),
        name: name.clone(),
        description: description.clone(),
        created_at: now.clone(),
        updated_at: now,
        personality: PersonalityProfile {
            name,
            description,
            personality: words(seed, 12),
            first_mes: words(seed, 20),
            ..PersonalityProfile::default()
        },
        scenario: String::new(),
        first_mes: String::new(),
        mes_example: String::new(),
        avatar: None,
        voice: None,
        tags: vec![words(seed, 1), words(seed, 1)],
        is_public: i.is_multiple_of(10),
        is_active: true,
        usage_count: 0,
        creator_id: owner.to_string(),
        group_id: None,
        version: 1,
        slug: Some(format!("bench-{i}")),
    }
}

struct Stats {
    name: &'static str,
    latencies: Vec<Duration>,
    elapsed: Duration,
    errors: usize,
}

impl Stats {
    fn print(&mut self) {
        self.latencies.sort();
        if self.latencies.is_empty() {
            println!(
                "{:<22} no successful requests, errors={}",
                self.name, self.errors
            );
            return;
        }
        let n = self.latencies.len();
        let pct = |p: f64| self.latencies[((n as f64 * p) as usize).min(n - 1)];
        println!(
            "{:<22} {:>9.0} req/s   p50 {:>7.2} ms   p99 {:>7.2} ms   n={} errors={}",
            self.name,
            self.latencies.len() as f64 / self.elapsed.as_secs_f64(),
            pct(0.50).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            self.latencies.len(),
            self.errors
        );
    }
}

async fn run<F, Fut>(name: &'static str, secs: u64, f: F) -> Stats
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let f = Arc::new(f);
    // `BENCH_ONLY=GET,search` runs only the scenarios whose names contain one of the words
    // (for profiling one path); the others run for zero seconds.
    let wanted = std::env::var("BENCH_ONLY").map_or(true, |only| {
        only.split(',').any(|w| name.contains(w.trim()))
    });
    let secs = if wanted { secs } else { 0 };
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for worker in 0..CONCURRENCY {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            let mut i = worker;
            while Instant::now() < deadline {
                let t = Instant::now();
                if f(i).await {
                    lat.push(t.elapsed());
                } else {
                    errors += 1;
                }
                i += CONCURRENCY;
            }
            (lat, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            latencies.extend(l);
            errors += e;
        }
    }
    Stats {
        name,
        latencies,
        elapsed: start.elapsed(),
        errors,
    }
}

/// True for the expected status with the body read to the end (so the connection is reused, as
/// a real client's would be).
async fn ok_body(r: reqwest::Result<reqwest::Response>, status: u16) -> bool {
    match r {
        Ok(r) if r.status() == status => r.bytes().await.is_ok(),
        _ => false,
    }
}

/// The floor: a bare hyper server answering every request with `body`, no routing, no auth.
async fn floor_server(body: bytes::Bytes) -> String {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        hyper::Response::builder()
                            .header("content-type", "application/json")
                            .body(http_body_util::Full::new(body))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    base
}

#[tokio::main]
async fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config {
        data_dir: dir.path().to_path_buf(),
        log: "warn".into(),
        ..Config::default()
    };
    config.auth.jwt_secret = "bench-secret-0123456789".into();
    config.limits.max_characters_per_user = 1_000_000;
    // Measure the server, not the per-user rate limiter.
    config.rate_limit.interact_per_minute = 0;
    config.rate_limit.other_per_minute = 0;

    let state = taproom::server::build_state(config.clone()).expect("state");
    let seed_start = Instant::now();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut mine = Vec::with_capacity(MINE);
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..TOTAL {
        let owner = if i.is_multiple_of(10) {
            "bench".to_string()
        } else {
            format!("user{}", i % 997)
        };
        let c = character(i, &owner, &mut seed);
        if owner == "bench" {
            mine.push(c.id.clone());
        }
        batch.push(c);
        if batch.len() == 10_000 {
            state.characters.store().create_many(&batch).expect("seed");
            batch.clear();
        }
    }
    println!(
        "seeded {TOTAL} characters ({} owned by the bench user) in {:.1}s",
        mine.len(),
        seed_start.elapsed().as_secs_f64()
    );
    let token = state
        .auth
        .mint("bench", false, Duration::from_secs(3600))
        .expect("token");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(taproom::server::run(
        listener,
        state,
        std::future::pending::<()>(),
    ));
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .build()
        .expect("client");
    let mine = Arc::new(mine);

    let ctx = (client.clone(), base.clone(), token.clone());
    // Warm the cache for GET by id.
    for id in mine.iter() {
        let _ = ctx
            .0
            .get(format!("{}/api/characters/{id}", ctx.1))
            .bearer_auth(&ctx.2)
            .send()
            .await;
    }

    // Same client, same concurrency, same response bytes, nothing behind them: what this machine
    // and this load generator can do at all.
    let sample = client
        .get(format!("{base}/api/characters/{}", mine[0]))
        .bearer_auth(&token)
        .send()
        .await
        .expect("get")
        .bytes()
        .await
        .expect("body");
    println!("GET by id response: {} bytes", sample.len());
    let floor_base = floor_server(sample).await;
    let (c, b, t, m) = (client.clone(), floor_base, token.clone(), mine.clone());
    let mut floor = run("floor: bare hyper, same bytes", secs, move |i| {
        let (c, b, t, m) = (c.clone(), b.clone(), t.clone(), m.clone());
        async move {
            let id = &m[i % m.len()];
            ok_body(
                c.get(format!("{b}/api/characters/{id}"))
                    .bearer_auth(t)
                    .send()
                    .await,
                200,
            )
            .await
        }
    })
    .await;
    let (c, b, t, m) = (client.clone(), base.clone(), token.clone(), mine.clone());
    let mut get = run("GET by id (cached)", secs, move |i| {
        let (c, b, t, m) = (c.clone(), b.clone(), t.clone(), m.clone());
        async move {
            let id = &m[i % m.len()];
            ok_body(
                c.get(format!("{b}/api/characters/{id}"))
                    .bearer_auth(t)
                    .send()
                    .await,
                200,
            )
            .await
        }
    })
    .await;
    let (c, b, t) = (client.clone(), base.clone(), token.clone());
    let mut list = run("list page (limit 50)", secs, move |i| {
        let (c, b, t) = (c.clone(), b.clone(), t.clone());
        async move {
            let offset = (i % 20) * 50;
            ok_body(
                c.get(format!("{b}/api/characters?limit=50&offset={offset}"))
                    .bearer_auth(t)
                    .send()
                    .await,
                200,
            )
            .await
        }
    })
    .await;
    let (c, b, t) = (client.clone(), base.clone(), token.clone());
    let mut search = run("list with search", secs, move |_| {
        let (c, b, t) = (c.clone(), b.clone(), t.clone());
        async move {
            ok_body(
                c.get(format!("{b}/api/characters?search=lighthouse&limit=50"))
                    .bearer_auth(t)
                    .send()
                    .await,
                200,
            )
            .await
        }
    })
    .await;
    let (c, b, t) = (client.clone(), base.clone(), token.clone());
    let mut create = run("create (durable)", secs, move |i| {
        let (c, b, t) = (c.clone(), b.clone(), t.clone());
        async move {
            let body = serde_json::json!({"name": format!("new {i}"), "description": "fresh", "tags": ["bench"]});
            ok_body(c.post(format!("{b}/api/characters")).bearer_auth(t).json(&body).send().await, 201).await
        }
    })
    .await;
    // Cards (issue: card import/export): the 530 KB Seraphina PNG card end to end over HTTP.
    let card = Arc::new(
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/default_Seraphina.png"
        ))
        .expect("fixture"),
    );
    let (c, b, t, k) = (client.clone(), base.clone(), token.clone(), card.clone());
    let mut import = run("import PNG card (HTTP)", secs, move |_| {
        let (c, b, t, k) = (c.clone(), b.clone(), t.clone(), k.clone());
        async move {
            ok_body(
                c.post(format!("{b}/api/characters/import"))
                    .bearer_auth(t)
                    .header("content-type", "image/png")
                    .body(k.to_vec())
                    .send()
                    .await,
                201,
            )
            .await
        }
    })
    .await;
    let first: serde_json::Value = client
        .post(format!("{base}/api/characters/import"))
        .bearer_auth(&token)
        .header("content-type", "image/png")
        .body(card.to_vec())
        .send()
        .await
        .expect("import")
        .json()
        .await
        .expect("json");
    let card_id = first["id"].as_str().unwrap_or_default().to_string();
    let (c, b, t) = (client.clone(), base.clone(), token.clone());
    let mut export = run("export PNG card (HTTP)", secs, move |_| {
        let (c, b, t, id) = (c.clone(), b.clone(), t.clone(), card_id.clone());
        async move {
            match c
                .get(format!("{b}/api/characters/{id}/export?format=png"))
                .bearer_auth(t)
                .send()
                .await
            {
                Ok(r) if r.status() == 200 => r.bytes().await.is_ok(),
                _ => false,
            }
        }
    })
    .await;
    println!("concurrency {CONCURRENCY}, {secs}s per scenario");
    for s in [
        &mut floor,
        &mut get,
        &mut list,
        &mut search,
        &mut create,
        &mut import,
        &mut export,
    ] {
        s.print();
    }
}
