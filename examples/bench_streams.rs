//! SSE load generator for the streaming and overhead benchmarks (issues #5, #6, #9; driven by
//! `benches/passthrough.sh`). It either keeps `--conc` streams open at all times (closed loop,
//! starts spread over `--ramp-ms`) or starts `--rate` requests per second on a fixed schedule
//! (open loop, each request its own task), and records per request: time to the
//! first body byte (TTFB), time to the first delta (TTFD: the first SSE event carrying generated
//! text, i.e. an OpenAI chunk with non-empty `delta.content` or an interact `event: chunk`; for
//! a JSON reply, the whole body) and the total time, plus deltas per stream and the most
//! requests in flight at once.
//!
//! `cargo run --release --example bench_streams -- URL [--conc 32 | --rate 50] [--secs 10]
//! [--warmup-secs 1] [--ramp-ms 0] [--auth "Bearer <jwt>"] [--body '<json>']`
//!
//! Prints one JSON object: `ok`, `errors`, `rps`, `deltas_per_stream`, `max_inflight`, and
//! `ttfb_ms` / `ttfd_ms` / `total_ms` with `p50`, `p90`, `p99`, `max`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::time::Instant;

/// Command-line options.
#[derive(Parser, Debug, Clone)]
#[command(about = "SSE load generator: TTFB, time to first delta and total time per stream")]
struct Args {
    /// Target URL (POST).
    url: hyper::Uri,
    /// Closed loop: streams kept open at once.
    #[arg(long, default_value_t = 32)]
    conc: usize,
    /// Open loop: requests started per second (overrides --conc).
    #[arg(long)]
    rate: Option<f64>,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Seconds run before measuring; requests started in it are not counted.
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
    /// Closed loop: spread the first request of each worker over this many ms.
    #[arg(long, default_value_t = 0)]
    ramp_ms: u64,
    /// Authorization header value, e.g. "Bearer <jwt>".
    #[arg(long)]
    auth: Option<String>,
    /// Request body (JSON).
    #[arg(
        long,
        default_value = r#"{"model":"fake-model","messages":[{"role":"user","content":"hello"}],"stream":true}"#
    )]
    body: String,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// What one request measured, in seconds since its (scheduled) start.
struct Sample {
    ttfb: f64,
    ttfd: f64,
    total: f64,
    deltas: u64,
}

/// Finds SSE events in a byte stream and tells which of them carry generated text.
#[derive(Default)]
struct SseScanner {
    buf: Vec<u8>,
}

impl SseScanner {
    /// Feeds bytes; returns how many complete events in them were deltas.
    fn feed(&mut self, data: &[u8]) -> u64 {
        self.buf.extend_from_slice(data);
        let mut deltas = 0;
        let mut start = 0;
        while let Some(end) = memchr::memmem::find(&self.buf[start..], b"\n\n") {
            if is_delta(&self.buf[start..start + end]) {
                deltas += 1;
            }
            start += end + 2;
        }
        self.buf.drain(..start);
        deltas
    }
}

/// An interact `event: chunk`, or an unnamed event whose data has a non-empty
/// `"content":"…"` (OpenAI `chat.completion.chunk`; the role-only first chunk has `""`).
fn is_delta(event: &[u8]) -> bool {
    let mut named = None;
    let mut content = false;
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(name) = line.strip_prefix(b"event:") {
            named = Some(name.trim_ascii() == b"chunk");
        } else if let Some(data) = line.strip_prefix(b"data:") {
            const KEY: &[u8] = b"\"content\":\"";
            if let Some(i) = memchr::memmem::find(data, KEY) {
                content |= data.get(i + KEY.len()).is_some_and(|&b| b != b'"');
            }
        }
    }
    named.unwrap_or(content)
}

/// One request: sends, reads the whole body, times it from `start`.
async fn one(client: &HttpClient, args: &Args, body: &Bytes, start: Instant) -> Option<Sample> {
    let mut req = hyper::Request::post(args.url.clone()).header("content-type", "application/json");
    if let Some(a) = &args.auth {
        req = req.header("authorization", a.as_str());
    }
    let req = req.body(Full::new(body.clone())).ok()?;
    let resp = client.request(req).await.ok()?;
    if !resp.status().is_success() {
        let _ = resp.into_body().collect().await;
        return None;
    }
    let sse = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut body = resp.into_body();
    let mut scanner = SseScanner::default();
    let (mut ttfb, mut ttfd, mut deltas) = (None, None, 0);
    while let Some(frame) = body.frame().await {
        let frame = frame.ok()?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        ttfb.get_or_insert_with(|| start.elapsed().as_secs_f64());
        if sse {
            let n = scanner.feed(data);
            if n > 0 {
                ttfd.get_or_insert_with(|| start.elapsed().as_secs_f64());
                deltas += n;
            }
        }
    }
    let total = start.elapsed().as_secs_f64();
    Some(Sample {
        ttfb: ttfb.unwrap_or(total),
        // A JSON reply's text arrives with its last byte; a stream without deltas is an error.
        ttfd: if sse { ttfd? } else { total },
        total,
        deltas,
    })
}

/// Collected results plus the in-flight gauge.
#[derive(Default)]
struct Shared {
    samples: std::sync::Mutex<Vec<Sample>>,
    errors: AtomicUsize,
    inflight: AtomicUsize,
    max_inflight: AtomicUsize,
}

impl Shared {
    async fn run_one(
        &self,
        client: &HttpClient,
        args: &Args,
        body: &Bytes,
        start: Instant,
        keep: bool,
    ) {
        let now = self.inflight.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_inflight.fetch_max(now, Ordering::Relaxed);
        let result = one(client, args, body, start).await;
        self.inflight.fetch_sub(1, Ordering::Relaxed);
        if !keep {
            return;
        }
        match result {
            Some(s) => self
                .samples
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(s),
            None => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn percentiles(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(f64::total_cmp);
    let at = |p: f64| {
        let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        (v[i] * 1e6).round() / 1e3
    };
    json!({"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": at(1.0)})
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let pool = args.conc.max(64);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(pool)
        .build(http);
    let body = Bytes::from(args.body.clone());
    let shared = Arc::new(Shared::default());
    let begin = Instant::now();
    let measure_from = begin + Duration::from_secs_f64(args.warmup_secs);
    let end = measure_from + Duration::from_secs_f64(args.secs);
    let mut tasks = tokio::task::JoinSet::new();
    match args.rate {
        Some(rate) if rate > 0.0 => {
            let period = Duration::from_secs_f64(1.0 / rate);
            let mut next = begin;
            while next < end {
                tokio::time::sleep_until(next).await;
                let (c, a, b, s) = (client.clone(), args.clone(), body.clone(), shared.clone());
                let keep = next >= measure_from;
                // Timed from the real send: tasks never wait for each other, so nothing queues
                // in the generator, and tokio's 1 ms timer lateness is not the target's.
                tasks.spawn(async move { s.run_one(&c, &a, &b, Instant::now(), keep).await });
                next += period;
            }
        }
        _ => {
            for i in 0..args.conc {
                let (c, a, b, s) = (client.clone(), args.clone(), body.clone(), shared.clone());
                let delay = Duration::from_millis(args.ramp_ms * i as u64 / args.conc as u64);
                tasks.spawn(async move {
                    tokio::time::sleep_until(begin + delay).await;
                    loop {
                        let start = Instant::now();
                        if start >= end {
                            break;
                        }
                        s.run_one(&c, &a, &b, start, start >= measure_from).await;
                    }
                });
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    // Requests started inside the measured window, per second of it (the last ones may end
    // after it).
    let elapsed = args.secs;
    let samples = std::mem::take(
        &mut *shared
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let n = samples.len();
    let deltas: u64 = samples.iter().map(|s| s.deltas).sum();
    let report = json!({
        "ok": n,
        "errors": shared.errors.load(Ordering::Relaxed),
        "rps": (n as f64 / elapsed * 10.0).round() / 10.0,
        "deltas_per_stream": if n > 0 { deltas as f64 / n as f64 } else { 0.0 },
        "max_inflight": shared.max_inflight.load(Ordering::Relaxed),
        "ttfb_ms": percentiles(samples.iter().map(|s| s.ttfb).collect()),
        "ttfd_ms": percentiles(samples.iter().map(|s| s.ttfd).collect()),
        "total_ms": percentiles(samples.iter().map(|s| s.total).collect()),
    });
    println!("{report}");
    Ok(())
}
