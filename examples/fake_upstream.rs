//! Runs the fake generation upstream (OpenAI-compatible + SillyTavern API) from the command line,
//! for manual testing and as the benchmark upstream.
//!
//! `cargo run --example fake_upstream -- --port 18080 [--fault 503] [--random-fail 0.3:503]
//! [--latency 20 | --latency 10-50] [--chunks 8] [--drip 30] [--api-key KEY]`
//!
//! Per-request faults work as in tests: put `[[fault:503]]`, `[[fault:cut:3]]`, `[[delay:200]]`,
//! ... in the last user message, or send an `x-fake-fault` header.

#[path = "../tests/support/fake_upstream.rs"]
mod fake_upstream;

use std::net::SocketAddr;

use clap::Parser;
use fake_upstream::{FakeUpstream, Fault, Latency};

/// Command-line options.
#[derive(Parser, Debug)]
#[command(about = "Fake OpenAI-compatible and SillyTavern upstream for Taproom")]
struct Args {
    /// Port to listen on (127.0.0.1).
    #[arg(long, default_value_t = 18080)]
    port: u16,
    /// Address to bind instead of 127.0.0.1.
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Fault applied to every request: 503, 429:2, 401, reset, cut:3, malformed, drip:50.
    #[arg(long)]
    fault: Option<String>,
    /// Random failures as PROBABILITY:STATUS, e.g. 0.3:503.
    #[arg(long)]
    random_fail: Option<String>,
    /// Seed for random failures and latency.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Added latency in ms, fixed (`20`) or uniform in a range (`10-50`).
    #[arg(long)]
    latency: Option<String>,
    /// Frames per streamed reply.
    #[arg(long, default_value_t = 4)]
    chunks: usize,
    /// Milliseconds before each streamed frame.
    #[arg(long, default_value_t = 0)]
    drip: u64,
    /// Require this bearer key.
    #[arg(long)]
    api_key: Option<String>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let fake = FakeUpstream::start_on(SocketAddr::new(args.host, args.port)).await?;
    if let Some(f) = &args.fault {
        let fault = Fault::parse(f).ok_or_else(|| format!("--fault: unknown fault {f:?}"))?;
        fake.set_fault(Some(fault));
    }
    if let Some(r) = &args.random_fail {
        let (p, s) = r
            .split_once(':')
            .ok_or("--random-fail: expected PROBABILITY:STATUS, e.g. 0.3:503")?;
        fake.set_random_failure(p.parse()?, s.parse()?, args.seed);
    }
    if let Some(l) = &args.latency {
        let latency = match l.split_once('-') {
            Some((min, max)) => Latency::Random {
                min: min.parse()?,
                max: max.parse()?,
            },
            None => Latency::Fixed(l.parse()?),
        };
        fake.set_latency(latency);
    }
    fake.set_chunks(args.chunks);
    fake.set_drip(args.drip);
    fake.require_api_key(args.api_key.as_deref());
    println!(
        "fake upstream on http://{0} (openai base http://{0}/v1, sillytavern base http://{0}, ws ws://{0}/ws)",
        fake.addr
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
