//! Prompt assembly benchmark: a card with a 1,000-entry lorebook and a 200-message history.
//!
//! Run with `cargo run --release --example bench_prompt`. The lorebook is compiled once (as the
//! server caches it by character id and version) and every history message carries its stored
//! token count, so each iteration measures what a generation pays: activation, macro
//! substitution, counting the fixed sections (cached) and budget trimming.

use std::time::{Duration, Instant};

use chrono::{FixedOffset, TimeZone};
use serde_json::{json, Value};
use taproom::model::{Character, CharacterBook};
use taproom::prompt::assemble::{assemble, Budget, PromptInput, PromptOptions};
use taproom::prompt::lorebook::{CompiledLorebook, LoreState};
use taproom::prompt::tokens::Tokenizer;
use taproom::prompt::{HistoryMessage, Role};

const WORDS: &[&str] = &[
    "forest", "river", "castle", "dragon", "sword", "shield", "tavern", "merchant", "king",
    "queen", "shadow", "light", "storm", "harbor", "mountain", "valley", "temple", "ruins",
    "crystal", "ember", "frost", "whisper", "lantern", "compass", "raven", "wolf", "oak", "silver",
    "golden", "ancient",
];

fn word(i: usize) -> &'static str {
    WORDS[i % WORDS.len()]
}

fn lorebook() -> CharacterBook {
    let entries: Vec<Value> = (0..1000)
        .map(|i| {
            let mut keys = vec![
                format!("{}{}", word(i), i),
                format!("{} {}", word(i), word(i / 7)),
            ];
            if i % 10 == 0 {
                keys.push(format!("/{}-?{}\\b/i", word(i + 3), i));
            }
            let content = format!(
                "{{{{char}}}} knows the lore of {} {}: {}",
                word(i),
                i,
                (0..40)
                    .map(|j| word(i * 3 + j))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            let mut e = json!({
                "id": i, "keys": keys, "content": content, "insertion_order": i % 200,
                "extensions": {"position": i % 2, "probability": 100, "useProbability": true,
                    "match_whole_words": i % 3 == 0}
            });
            if i % 5 == 0 {
                e["selective"] = json!(true);
                e["secondary_keys"] = json!([word(i + 1), word(i + 2)]);
                e["extensions"]["selectiveLogic"] = json!(i % 4);
            }
            if i % 50 == 0 {
                e["extensions"]["group"] = json!(format!("g{}", i % 3));
            }
            e
        })
        .collect();
    serde_json::from_value(json!({"scan_depth": 4, "recursive_scanning": true, "entries": entries}))
        .unwrap_or_default()
}

fn character(book: CharacterBook) -> Option<Character> {
    let description = (0..400).map(word).collect::<Vec<_>>().join(" ");
    let examples = (0..3)
        .map(|b| {
            format!(
                "<START>\n{{{{user}}}}: {}\n{{{{char}}}}: {}",
                word(b),
                (0..60).map(|j| word(j + b)).collect::<Vec<_>>().join(" ")
            )
        })
        .collect::<String>();
    let mut v = json!({
        "id": "c1", "name": "Seraphina", "description": description, "createdAt": "2026-01-01T00:00:00Z",
        "updatedAt": "2026-01-01T00:00:00Z", "scenario": "A glade in the {{random:forest,woods}}.",
        "mesExample": examples, "isPublic": false, "isActive": true, "usageCount": 0,
        "creatorId": "u1", "version": 1,
        "personality": {"personality": "caring, protective", "extensions":
            {"depth_prompt": {"prompt": "Stay in character as {{char}}.", "depth": 4, "role": "system"}}}
    });
    v["personality"]["characterBook"] = serde_json::to_value(book).ok()?;
    serde_json::from_value(v).ok()
}

fn history(tokenizer: &Tokenizer) -> Vec<HistoryMessage<'static>> {
    (0..200)
        .map(|i| {
            let user = i % 2 == 1;
            // Mention a few lorebook keys in the recent messages so that entries fire.
            let content = format!(
                "{} {}{} and the {} {} {}",
                (0..50)
                    .map(|j| word(i * 13 + j))
                    .collect::<Vec<_>>()
                    .join(" "),
                word(i * 5),
                i * 5 % 1000,
                word(i),
                word(i / 7),
                if i % 3 == 0 { "storm-12" } else { "" }
            );
            HistoryMessage {
                role: if user { Role::User } else { Role::Assistant },
                name: if user { "Ann" } else { "Seraphina" }.into(),
                tokens: Some(tokenizer.count(&content)),
                content: content.into(),
            }
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn main() {
    let tokenizer = match Tokenizer::cl100k() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let book = lorebook();
    let Some(character) = character(book.clone()) else {
        eprintln!("benchmark character did not deserialize");
        std::process::exit(1);
    };
    let started = Instant::now();
    let compiled = CompiledLorebook::compile(&book, &tokenizer);
    let compile_time = started.elapsed();
    let history = history(&tokenizer);
    let options = PromptOptions::default();
    let state = LoreState::default();
    let now = FixedOffset::east_opt(0)
        .and_then(|o| o.with_ymd_and_hms(2026, 11, 26, 12, 0, 0).single())
        .unwrap_or_default();
    let run = |seed: u64| {
        let input = PromptInput {
            character: &character,
            lorebook: Some(&compiled),
            user_name: "Ann",
            persona: "A traveller.",
            history: &history,
            memory: None,
            budget: Budget {
                max_context_tokens: 8192,
                max_reply_tokens: 512,
            },
            lore_state: &state,
            rng_seed: seed,
            conversation_seed: 7,
            now,
            extra_sections: &[],
            options: &options,
        };
        assemble(&input, &tokenizer)
    };
    let sample = run(0);
    for seed in 0..50 {
        std::hint::black_box(run(seed));
    }
    let iterations = 1000;
    let mut times = Vec::with_capacity(iterations);
    // BENCH_FIXED_SEED=1 repeats one generation, separating scheduler noise from input variety.
    let fixed_seed = std::env::var_os("BENCH_FIXED_SEED").is_some();
    for seed in 0..iterations as u64 {
        let seed = if fixed_seed { 0 } else { seed };
        let t = Instant::now();
        std::hint::black_box(run(seed));
        times.push(t.elapsed());
    }
    times.sort();
    let it = &sample.itemization;
    println!("lorebook compile (1,000 entries): {compile_time:?}");
    println!(
        "prompt: {} messages, {} tokens of {} budget; history kept {}/{}; examples {}/{}; lorebook fired {}, rejected {}",
        sample.messages.len(),
        it.total_tokens,
        it.budget_tokens,
        it.history_kept,
        history.len(),
        it.example_blocks_kept,
        it.example_blocks_total,
        it.lorebook.activated.len(),
        it.lorebook.rejected.len()
    );
    println!(
        "assemble over {iterations} runs: p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
        percentile(&times, 0.50),
        percentile(&times, 0.90),
        percentile(&times, 0.99),
        times[times.len() - 1]
    );
}
