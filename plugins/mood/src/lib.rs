//! Mood / affection tracker.
//!
//! Keeps an affection score (-100..=100) per conversation in the plugin state, moves it by the
//! user's words, and adds a system line telling the model how the character currently feels.
//! When the mood label changes it asks Taproom to remember the change, and a new conversation
//! (no state yet) starts from the last remembered mood, found through `recall`.
//!
//! Config (all optional): `{"positive": [..words], "negative": [..words], "step": 5,
//! "depth": 0}` — `depth` places the line that many messages from the end of the prompt.

use serde::{Deserialize, Serialize};
use taproom_plugin_sdk::{
    config, host, plugin, state, to_state, unchanged, BeforeContext, BeforeResult, MemoryEntry,
    Plugin, PromptSection, SectionPosition,
};

const DEFAULT_POSITIVE: &[&str] = &[
    "thank",
    "thanks",
    "love",
    "great",
    "awesome",
    "sweet",
    "kind",
    "please",
    "beautiful",
    "happy",
];
const DEFAULT_NEGATIVE: &[&str] = &[
    "hate", "stupid", "idiot", "shut up", "ugly", "annoying", "boring", "useless",
];

/// The per-conversation state this plugin keeps.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Mood {
    affection: i32,
    turns: u32,
}

fn label(affection: i32) -> &'static str {
    match affection {
        i32::MIN..=-50 => "hostile",
        -49..=-15 => "cold",
        -14..=14 => "neutral",
        15..=49 => "friendly",
        _ => "affectionate",
    }
}

/// Midpoint affection of the label named in a remembered mood line, if any.
fn remembered_affection(memories: &[String]) -> Option<i32> {
    memories.iter().find_map(|m| {
        let m = m.to_lowercase();
        [
            ("affectionate", 60),
            ("friendly", 30),
            ("neutral", 0),
            ("cold", -30),
            ("hostile", -60),
        ]
        .iter()
        .find(|(label, _)| m.contains(&format!("became {label}")))
        .map(|&(_, value)| value)
    })
}

fn words(cfg: &serde_json::Value, key: &str, default: &[&str]) -> Vec<String> {
    match cfg[key].as_array() {
        Some(list) => list
            .iter()
            .filter_map(|v| v.as_str().map(str::to_lowercase))
            .collect(),
        None => default.iter().map(|s| s.to_string()).collect(),
    }
}

/// Net count of positive minus negative cue words in the message.
fn score(message: &str, positive: &[String], negative: &[String]) -> i32 {
    let text = message.to_lowercase();
    let count = |list: &[String]| list.iter().filter(|w| text.contains(w.as_str())).count() as i32;
    count(positive) - count(negative)
}

struct MoodTracker;

impl Plugin for MoodTracker {
    fn before_generate(ctx: BeforeContext) -> Result<BeforeResult, String> {
        let cfg = config(&ctx.base);
        let step = cfg["step"].as_i64().unwrap_or(5).clamp(1, 50) as i32;
        let depth = cfg["depth"].as_u64().unwrap_or(0).min(100) as u32;
        let character = &ctx.base.character.name;
        let user = &ctx.base.user_name;
        let mut mood: Mood = state(&ctx.base);
        if ctx.base.state.is_none() {
            let found = host::recall(&format!("{character}'s feelings toward {user}"), 3);
            mood.affection = remembered_affection(&found).unwrap_or(0);
        }
        let before = label(mood.affection);
        let delta = score(
            &ctx.base.user_message,
            &words(&cfg, "positive", DEFAULT_POSITIVE),
            &words(&cfg, "negative", DEFAULT_NEGATIVE),
        );
        mood.affection = (mood.affection + delta * step).clamp(-100, 100);
        mood.turns += 1;
        let now = label(mood.affection);
        if now != before {
            host::info(&format!("mood changed from {before} to {now}"));
            host::remember(&MemoryEntry {
                content: format!("{character}'s feelings toward {user} became {now}."),
                kind: "event".into(),
                importance: 0.4,
                tags: vec!["mood".into()],
            });
        }
        let mut out = unchanged();
        out.sections.push(PromptSection {
            content: format!(
                "[{character}'s mood toward {user}: {now} (affection {}/100)]",
                mood.affection
            ),
            role: "system".into(),
            position: SectionPosition::Depth(depth),
        });
        out.state = to_state(&mood);
        Ok(out)
    }
}

plugin!(MoodTracker);
