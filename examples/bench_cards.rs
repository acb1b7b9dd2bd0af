//! Card import/export throughput on one core.
//!
//! `cargo run --release --example bench_cards [iterations]`
//!
//! Parses `tests/fixtures/default_Seraphina.png` (a ~530 KB SillyTavern PNG card with a lorebook)
//! and exports it back to a PNG, printing per-operation percentiles and operations per second.
//! Single-threaded on purpose: the numbers are per core.

use std::time::{Duration, Instant};

use taproom::cards::{self, CardLimits, NewCharacterMeta};

const CARD: &[u8] = include_bytes!("../tests/fixtures/default_Seraphina.png");

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn report(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let total: Duration = samples.iter().sum();
    let per_sec = samples.len() as f64 / total.as_secs_f64();
    println!(
        "{label:<28} n={:<6} p50={:>8.3?} p90={:>8.3?} p99={:>8.3?} max={:>8.3?}  {per_sec:>9.1}/s",
        samples.len(),
        percentile(&samples, 0.50),
        percentile(&samples, 0.90),
        percentile(&samples, 0.99),
        samples[samples.len() - 1],
    );
}

fn time<T>(iterations: usize, mut op: impl FnMut() -> T) -> Vec<Duration> {
    // Warm caches and the allocator before measuring.
    for _ in 0..iterations.min(20) {
        std::hint::black_box(op());
    }
    (0..iterations)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(op());
            start.elapsed()
        })
        .collect()
}

fn main() -> Result<(), cards::CardError> {
    let iterations = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    let limits = CardLimits::default();
    let card = cards::import_card(CARD, &limits)?;
    let avatar = card.avatar.clone().map(|a| a.bytes).unwrap_or_default();
    let character = card.character.into_character(NewCharacterMeta {
        id: "bench".into(),
        creator_id: "bench".into(),
        now: "2026-11-26T00:00:00Z".into(),
        avatar_url: None,
        is_public: false,
    });
    let exported = cards::export_png(&character, Some(&avatar))?;
    let charx = cards::export_charx(&character, Some((&avatar, "png")))?;
    println!(
        "input: {} byte png card ({} lorebook entries); exported png {} bytes, charx {} bytes",
        CARD.len(),
        character
            .personality
            .character_book
            .as_ref()
            .map_or(0, |b| b.entries.len()),
        exported.len(),
        charx.len()
    );
    report(
        "import png (parse only)",
        time(iterations, || cards::import_card(CARD, &limits)),
    );
    report(
        "png chunk walk + crc",
        time(iterations, || {
            cards::png::parse(CARD).map(|p| p.chunks.len())
        }),
    );
    report(
        "export png",
        time(iterations, || cards::export_png(&character, Some(&avatar))),
    );
    report(
        "import charx",
        time(iterations, || cards::import_card(&charx, &limits)),
    );
    report(
        "export charx",
        time(iterations / 4, || {
            cards::export_charx(&character, Some((&avatar, "png")))
        }),
    );
    report(
        "to_v3_json",
        time(iterations, || cards::to_v3_json(&character)),
    );
    Ok(())
}
