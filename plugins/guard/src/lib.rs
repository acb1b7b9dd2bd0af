//! Content guard: rewrites or vetoes generated replies by configured rules.
//!
//! Config:
//! ```json
//! {"rules": [
//!    {"match": "darn", "action": "rewrite", "replacement": "d***"},
//!    {"match": "secret plan", "action": "veto", "reason": "the reply revealed the plot"}
//!  ],
//!  "maxChars": 4000}
//! ```
//! Matching is case-insensitive on whole substrings. Vetoes win over rewrites; a reply longer
//! than `maxChars` is cut at a character boundary with an ellipsis.

use taproom_plugin_sdk::{
    config, host, keep, plugin, AfterResult, CallContext, Plugin, ReplyAction,
};

enum Rule {
    Rewrite { needle: String, replacement: String },
    Veto { needle: String, reason: String },
}

fn rules(cfg: &serde_json::Value) -> Vec<Rule> {
    let Some(list) = cfg["rules"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|r| {
            let needle = r["match"].as_str()?.to_lowercase();
            if needle.is_empty() {
                return None;
            }
            match r["action"].as_str().unwrap_or("rewrite") {
                "veto" => Some(Rule::Veto {
                    needle,
                    reason: r["reason"]
                        .as_str()
                        .unwrap_or("blocked by the content guard")
                        .into(),
                }),
                _ => Some(Rule::Rewrite {
                    needle,
                    replacement: r["replacement"].as_str().unwrap_or("***").into(),
                }),
            }
        })
        .collect()
}

/// Replaces every case-insensitive occurrence of `needle` (already lowercase).
fn replace_ci(text: &str, needle: &str, replacement: &str) -> String {
    let lower = text.to_lowercase();
    // Lowercasing can change byte lengths outside ASCII; fall back to exact matching then.
    if lower.len() != text.len() {
        return text.replace(needle, replacement);
    }
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (i, _) in lower.match_indices(needle) {
        out.push_str(&text[last..i]);
        out.push_str(replacement);
        last = i + needle.len();
    }
    out.push_str(&text[last..]);
    out
}

struct Guard;

impl Plugin for Guard {
    fn after_generate(ctx: CallContext, reply: String) -> Result<AfterResult, String> {
        let cfg = config(&ctx);
        let lower = reply.to_lowercase();
        let rules = rules(&cfg);
        for rule in &rules {
            if let Rule::Veto { needle, reason } = rule {
                if lower.contains(needle.as_str()) {
                    host::warn(&format!("vetoed a reply: {reason}"));
                    let mut out = keep();
                    out.action = ReplyAction::Veto(reason.clone());
                    return Ok(out);
                }
            }
        }
        let mut text = reply.clone();
        for rule in &rules {
            if let Rule::Rewrite {
                needle,
                replacement,
            } = rule
            {
                text = replace_ci(&text, needle, replacement);
            }
        }
        if let Some(max) = cfg["maxChars"].as_u64() {
            let max = max as usize;
            if text.chars().count() > max {
                text = text.chars().take(max).collect::<String>() + "…";
            }
        }
        let mut out = keep();
        if text != reply {
            out.action = ReplyAction::Rewrite(text);
        }
        Ok(out)
    }
}

plugin!(Guard);
