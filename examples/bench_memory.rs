//! Memory recall benchmark: 10,000 memories of one (user, character), recall p50/p99.
//!
//! Run with `cargo run --release --example bench_memory [memories] [iterations]`. Memories are
//! 8–20 words drawn from a 2,000-word synthetic vocabulary with uniform importance (so a fifth
//! are "standing" memories that are candidates for every query) and ages up to a year; each
//! query is a 6–12 word user message from the same vocabulary. The index is built once (as the
//! server caches it per (character, user)); each iteration measures what a turn pays: BM25
//! matching, the combined score over the candidates, top-k selection within the token budget,
//! the summary lookup and building the prompt block. `recall_preview` is timed, which is
//! `recall` minus handing the recall-count update to a background task.

use std::sync::Arc;
use taproom::auth::User;
use taproom::characters::{CharacterService, NewCharacter};
use taproom::config::LimitsConfig;
use taproom::memory::types::{ConversationMemory, MemoryKind, MemoryScope, MemorySource};
use taproom::memory::{MemoryConfig, MemoryService};
use taproom::prompt::tokens::Tokenizer;
use taproom::store::Store;
use taproom::upstream::{Upstreams, UpstreamsConfig};
use tokio::time::Instant;

/// SplitMix64, so runs are reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const SYLLABLES: &[&str] = &[
    "ka", "lo", "mi", "ren", "dor", "sa", "vel", "tor", "an", "is", "qua", "ber", "nil", "fo",
    "gra", "em", "ul", "zen", "pha", "rio",
];

fn vocabulary() -> Vec<String> {
    let mut rng = Rng(7);
    (0..2000)
        .map(|_| {
            let n = 2 + rng.below(2);
            (0..n)
                .map(|_| SYLLABLES[rng.below(SYLLABLES.len() as u64) as usize])
                .collect::<String>()
        })
        .collect()
}

fn sentence(rng: &mut Rng, vocab: &[String], min: u64, max: u64) -> String {
    let n = min + rng.below(max - min + 1);
    (0..n)
        .map(|_| vocab[rng.below(vocab.len() as u64) as usize].as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let count: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let iterations: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2_000);

    let dir = tempfile::tempdir()?;
    let store = Store::open(&dir.path().join("bench.redb"), &Default::default())?;
    let characters = CharacterService::new(store.clone(), LimitsConfig::default(), 1024);
    let user = User {
        id: "bench-user".into(),
        admin: false,
        name: None,
    };
    let character = characters
        .create(
            &user,
            NewCharacter {
                name: "Bench".into(),
                description: "benchmark character".into(),
                ..NewCharacter::default()
            },
        )
        .await?;
    let tokenizer = Tokenizer::cl100k()?;
    let vocab = vocabulary();
    let mut rng = Rng(42);
    let now = chrono::Utc::now().timestamp_millis();
    let kinds = MemoryKind::ALL;
    let memories: Vec<ConversationMemory> = (0..count)
        .map(|i| {
            let content = sentence(&mut rng, &vocab, 8, 20);
            let at = taproom::time::ms_to_rfc3339(now - rng.below(365 * 86_400_000) as i64);
            ConversationMemory {
                id: uuid::Uuid::now_v7().to_string(),
                tokens: tokenizer.count(&content) as u32,
                content,
                kind: kinds[i % kinds.len()],
                importance: rng.below(1001) as f64 / 1000.0,
                tags: vec![vocab[rng.below(vocab.len() as u64) as usize].clone()],
                scope: MemoryScope::User,
                conversation_id: None,
                source: MemorySource::User,
                created_at: at.clone(),
                updated_at: at,
                last_recalled_at: None,
                recall_count: 0,
            }
        })
        .collect();
    let key = taproom::store::parse_id(&character.id).ok_or("bad id")?;
    store.insert_memories(key, &user.id, &memories)?;
    let upstreams = Arc::new(Upstreams::new(&UpstreamsConfig::default())?);
    let memory = MemoryService::new(
        store,
        characters,
        upstreams,
        tokenizer,
        MemoryConfig::default(),
    );
    let queries: Vec<String> = (0..256)
        .map(|_| sentence(&mut rng, &vocab, 6, 12))
        .collect();
    let conversation = uuid::Uuid::now_v7().to_string();

    let built = Instant::now();
    let first = memory
        .recall_preview(&user, &character, Some(&conversation), &queries[0], 512, 8)
        .await?;
    println!(
        "index build + first recall over {count} memories: {:.1} ms ({} recalled)",
        built.elapsed().as_secs_f64() * 1e3,
        first.memories.len()
    );
    for q in queries.iter().take(100) {
        memory
            .recall_preview(&user, &character, Some(&conversation), q, 512, 8)
            .await?;
    }
    let mut samples = Vec::with_capacity(iterations);
    let mut recalled = 0usize;
    for i in 0..iterations {
        let q = &queries[i % queries.len()];
        let t = Instant::now();
        let r = memory
            .recall_preview(&user, &character, Some(&conversation), q, 512, 8)
            .await?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
        recalled += r.memories.len();
    }
    samples.sort_by(f64::total_cmp);
    println!(
        "recall over {count} memories, {iterations} iterations: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms, {:.1} memories recalled on average",
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
        percentile(&samples, 1.0),
        recalled as f64 / iterations as f64
    );
    Ok(())
}
