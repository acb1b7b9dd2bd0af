//! SillyTavern macro substitution (`{{char}}`, `{{user}}`, `{{random:a,b}}`, `<BOT>`, …).
//!
//! Macros are parsed innermost first, so `{{random:{{user}},{{char}}}}` works as in SillyTavern.
//! Macro names are matched case-insensitively; an unknown macro is left in the text unchanged.
//! Randomness comes from seeds in [`MacroContext`]: `{{random}}` and `{{roll}}` use the
//! per-generation seed, `{{pick}}` the conversation seed plus the macro's position in the text,
//! so a pick stays the same for the whole conversation.

use std::cell::Cell;

use chrono::{DateTime, FixedOffset};

use super::{mix_seed, SplitMix64};

/// Deepest macro nesting expanded (`{{random:{{user}},…}}` is depth 2).
const MAX_NESTING: usize = 8;

/// Placeholder left by `{{trim}}` until the surrounding newlines can be removed; a private-use
/// code point, so it cannot collide with card text in practice.
const TRIM_MARK: char = '\u{F8FF}';

/// Everything macros can expand to. Borrowed so that building one per section costs nothing.
#[derive(Debug, Clone)]
pub struct MacroContext<'a> {
    /// `{{char}}`, `<BOT>`, `<CHAR>`: the card's nickname if set, else its name.
    pub char_name: &'a str,
    /// `{{user}}`, `<USER>`.
    pub user_name: &'a str,
    /// `{{description}}`.
    pub description: &'a str,
    /// `{{personality}}`.
    pub personality: &'a str,
    /// `{{scenario}}`.
    pub scenario: &'a str,
    /// `{{persona}}`.
    pub persona: &'a str,
    /// `{{mesExamples}}`.
    pub mes_examples: &'a str,
    /// `{{original}}`: the default a card's `system_prompt` / `post_history_instructions`
    /// replaces. `None` leaves the macro untouched.
    pub original: Option<&'a str>,
    /// `{{lastMessage}}`.
    pub last_message: &'a str,
    /// `{{lastUserMessage}}`.
    pub last_user_message: &'a str,
    /// `{{lastCharMessage}}`.
    pub last_char_message: &'a str,
    /// The moment of the generation, in the user's offset (`{{time}}`, `{{date}}`, …).
    pub now: DateTime<FixedOffset>,
    /// Seeds `{{random}}` and `{{roll}}`; vary it per generation.
    pub rng_seed: u64,
    /// Seeds `{{pick}}`; keep it fixed for a conversation.
    pub conversation_seed: u64,
}

impl<'a> MacroContext<'a> {
    /// A context with only the two names set and every other value empty.
    pub fn names(char_name: &'a str, user_name: &'a str, now: DateTime<FixedOffset>) -> Self {
        MacroContext {
            char_name,
            user_name,
            description: "",
            personality: "",
            scenario: "",
            persona: "",
            mes_examples: "",
            original: None,
            last_message: "",
            last_user_message: "",
            last_char_message: "",
            now,
            rng_seed: 0,
            conversation_seed: 0,
        }
    }
}

/// Substitutes every known macro in `text`.
pub fn substitute(text: &str, ctx: &MacroContext<'_>) -> String {
    // Fast path: most lorebook entries and messages have no macro at all.
    if !text.contains("{{") && !text.contains('<') {
        return text.to_owned();
    }
    let mut state = State {
        ctx,
        original_used: Cell::new(false),
        random_count: Cell::new(0),
        trimmed: Cell::new(false),
    };
    let mut out = String::with_capacity(text.len());
    let mut pos = 0;
    expand(text, &mut pos, &mut state, &mut out, 0);
    if state.trimmed.get() {
        out = apply_trim(&out);
    }
    out
}

struct State<'c, 'a> {
    ctx: &'c MacroContext<'a>,
    /// `{{original}}` expands only once per text, like SillyTavern.
    original_used: Cell<bool>,
    /// Distinguishes several `{{random}}` in one text so they do not all pick the same item.
    random_count: Cell<u64>,
    trimmed: Cell<bool>,
}

/// Copies `src[*pos..]` to `out`, expanding macros. When nested (`depth` > 0), stops after the `}}` that
/// closes the current macro and returns true; returns false at the end of the text.
fn expand(
    src: &str,
    pos: &mut usize,
    st: &mut State<'_, '_>,
    out: &mut String,
    depth: usize,
) -> bool {
    let nested = depth > 0;
    let bytes = src.as_bytes();
    while *pos < bytes.len() {
        let rest = &src[*pos..];
        // Past the nesting limit `{{` is plain text: a hostile card must not be able to recurse
        // the server's stack away.
        if depth < MAX_NESTING && rest.starts_with("{{") {
            let start = *pos;
            *pos += 2;
            let mut inner = String::new();
            if expand(src, pos, st, &mut inner, depth + 1) {
                evaluate(&inner, start, st, out);
            } else {
                // Unclosed: keep the text as written.
                out.push_str("{{");
                out.push_str(&inner);
            }
            continue;
        }
        if nested && rest.starts_with("}}") {
            *pos += 2;
            return true;
        }
        if rest.starts_with('<') {
            if let Some((len, value)) = legacy_macro(rest, st.ctx) {
                out.push_str(value);
                *pos += len;
                continue;
            }
        }
        let ch_len = rest.chars().next().map_or(1, char::len_utf8);
        out.push_str(&rest[..ch_len]);
        *pos += ch_len;
    }
    false
}

/// `<BOT>`, `<CHAR>` and `<USER>`, matched case-insensitively (TavernAI's legacy placeholders).
fn legacy_macro<'a>(rest: &str, ctx: &MacroContext<'a>) -> Option<(usize, &'a str)> {
    let head = rest.get(..6).or_else(|| rest.get(..5))?;
    let starts = |tag: &str| head.len() >= tag.len() && head[..tag.len()].eq_ignore_ascii_case(tag);
    if starts("<bot>") {
        Some((5, ctx.char_name))
    } else if starts("<char>") {
        Some((6, ctx.char_name))
    } else if starts("<user>") {
        Some((6, ctx.user_name))
    } else {
        None
    }
}

/// Expands one macro whose (already expanded) body is `inner`; `offset` is where it started in
/// the source text, which seeds `{{pick}}`.
fn evaluate(inner: &str, offset: usize, st: &State<'_, '_>, out: &mut String) {
    let ctx = st.ctx;
    if inner.trim_start().starts_with("//") {
        return;
    }
    let (name, arg) = match inner.find(':') {
        Some(i) => (&inner[..i], Some(&inner[i + 1..])),
        None => (inner, None),
    };
    let name = name.trim().to_ascii_lowercase();
    let simple = match (name.as_str(), arg) {
        ("char", None) => Some(ctx.char_name),
        ("user", None) => Some(ctx.user_name),
        ("description", None) => Some(ctx.description),
        ("personality", None) => Some(ctx.personality),
        ("scenario", None) => Some(ctx.scenario),
        ("persona", None) => Some(ctx.persona),
        ("mesexamples", None) => Some(ctx.mes_examples),
        ("lastmessage", None) => Some(ctx.last_message),
        ("lastusermessage", None) => Some(ctx.last_user_message),
        ("lastcharmessage", None) => Some(ctx.last_char_message),
        ("newline", None) => Some("\n"),
        _ => None,
    };
    if let Some(v) = simple {
        out.push_str(v);
        return;
    }
    match (name.as_str(), arg) {
        ("original", None) => match ctx.original {
            Some(orig) => {
                // Later occurrences vanish: SillyTavern substitutes the default only once.
                if !st.original_used.replace(true) {
                    out.push_str(orig);
                }
            }
            None => push_raw(out, inner),
        },
        ("trim", None) => {
            st.trimmed.set(true);
            out.push(TRIM_MARK);
        }
        ("time", None) => out.push_str(&ctx.now.format("%-I:%M %p").to_string()),
        ("date", None) => out.push_str(&ctx.now.format("%B %-d, %Y").to_string()),
        ("weekday", None) => out.push_str(&ctx.now.format("%A").to_string()),
        ("isodate", None) => out.push_str(&ctx.now.format("%Y-%m-%d").to_string()),
        ("isotime", None) => out.push_str(&ctx.now.format("%H:%M").to_string()),
        ("random", Some(list)) => {
            let items = split_list(list);
            let n = st.random_count.get();
            st.random_count.set(n + 1);
            let mut rng = SplitMix64::new(mix_seed(ctx.rng_seed, n));
            out.push_str(items[rng.below(items.len() as u64) as usize]);
        }
        ("pick", Some(list)) => {
            let items = split_list(list);
            // The list text is part of the seed so that equal offsets in different sections do
            // not force the same choice; FNV rather than `DefaultHasher`, whose output may
            // change between Rust releases and would reshuffle every stored conversation.
            let seed = mix_seed(ctx.conversation_seed, offset as u64) ^ fnv1a(list);
            let mut rng = SplitMix64::new(seed);
            out.push_str(items[rng.below(items.len() as u64) as usize]);
        }
        ("roll", Some(spec)) => match roll(spec, st) {
            Some(v) => out.push_str(&v.to_string()),
            None => push_raw(out, inner),
        },
        _ => push_raw(out, inner),
    }
}

/// 64-bit FNV-1a: a tiny hash with a fixed, documented output.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

fn push_raw(out: &mut String, inner: &str) {
    out.push_str("{{");
    out.push_str(inner);
    out.push_str("}}");
}

/// `a,b,c` or, when the list contains `::`, `:a::b` (SillyTavern's form for items with commas).
/// Never empty, so indexing by a random position is always valid.
fn split_list(list: &str) -> Vec<&str> {
    let items: Vec<&str> = if let Some(rest) = list
        .strip_prefix(':')
        .filter(|r| r.contains("::") || !r.contains(','))
    {
        rest.split("::").collect()
    } else if list.contains("::") {
        list.split("::").collect()
    } else {
        list.split(',').map(str::trim).collect()
    };
    if items.is_empty() {
        vec![""]
    } else {
        items
    }
}

/// `dN`, `N`, `NdM`, optionally followed by `+K` / `-K`; at most 100 dice of 1..=1e6 sides.
fn roll(spec: &str, st: &State<'_, '_>) -> Option<i64> {
    let spec: String = spec.chars().filter(|c| !c.is_whitespace()).collect();
    let spec = spec.to_ascii_lowercase();
    let (dice, modifier) = match spec.find(['+', '-']) {
        Some(i) => (&spec[..i], spec[i..].parse::<i64>().ok()?),
        None => (spec.as_str(), 0),
    };
    let (count, sides) = match dice.split_once('d') {
        Some(("", s)) => (1, s.parse::<u64>().ok()?),
        Some((c, s)) => (c.parse::<u64>().ok()?, s.parse::<u64>().ok()?),
        None => (1, dice.parse::<u64>().ok()?),
    };
    if count == 0 || count > 100 || sides == 0 || sides > 1_000_000 {
        return None;
    }
    let n = st.random_count.get();
    st.random_count.set(n + 1);
    let mut rng = SplitMix64::new(mix_seed(st.ctx.rng_seed ^ 0x524F_4C4C, n));
    let total: u64 = (0..count).map(|_| rng.below(sides) + 1).sum();
    Some(total as i64 + modifier)
}

/// Removes the `{{trim}}` marks and every newline directly around them.
fn apply_trim(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut parts = text.split(TRIM_MARK).peekable();
    let mut first = true;
    while let Some(part) = parts.next() {
        let mut p = part;
        if !first {
            p = p.trim_start_matches(['\r', '\n']);
        }
        if parts.peek().is_some() {
            p = p.trim_end_matches(['\r', '\n']);
        }
        out.push_str(p);
        first = false;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn ctx() -> MacroContext<'static> {
        let now = FixedOffset::east_opt(3600)
            .unwrap()
            .with_ymd_and_hms(2026, 11, 26, 15, 4, 5)
            .unwrap();
        MacroContext {
            char_name: "Sera",
            user_name: "Ann",
            description: "DESC",
            personality: "PERS",
            scenario: "SCEN",
            persona: "PERSONA",
            mes_examples: "EX",
            original: Some("ORIG"),
            last_message: "last",
            last_user_message: "lastU",
            last_char_message: "lastC",
            now,
            rng_seed: 7,
            conversation_seed: 42,
        }
    }

    fn check(input: &str, expected: &str) {
        assert_eq!(substitute(input, &ctx()), expected, "input {input:?}");
    }

    #[test]
    fn names() {
        check("{{char}} and {{user}}", "Sera and Ann");
        check("{{CHAR}} {{User}}", "Sera Ann");
    }

    #[test]
    fn legacy_names_case_insensitive() {
        check(
            "<BOT> <bot> <CHAR> <Char> <USER> <user>",
            "Sera Sera Sera Sera Ann Ann",
        );
        check("<b> <other>", "<b> <other>");
    }

    #[test]
    fn card_fields() {
        check(
            "{{description}}|{{personality}}|{{scenario}}|{{persona}}|{{mesExamples}}",
            "DESC|PERS|SCEN|PERSONA|EX",
        );
    }

    #[test]
    fn original_only_first_occurrence() {
        check("a {{original}} b {{original}}", "a ORIG b ");
        let mut c = ctx();
        c.original = None;
        assert_eq!(substitute("x {{original}}", &c), "x {{original}}");
    }

    #[test]
    fn dates_and_times() {
        check("{{time}}", "3:04 PM");
        check("{{date}}", "November 26, 2026");
        check("{{weekday}}", "Thursday");
        check("{{isodate}}", "2026-11-26");
        check("{{isotime}}", "15:04");
    }

    #[test]
    fn newline_trim_comment() {
        check("a{{newline}}b", "a\nb");
        check("a\n\n{{trim}}\n b", "a b");
        check("x{{// a comment}}y", "xy");
    }

    #[test]
    fn last_messages() {
        check(
            "{{lastMessage}}/{{lastUserMessage}}/{{lastCharMessage}}",
            "last/lastU/lastC",
        );
    }

    #[test]
    fn unknown_and_unclosed_left_alone() {
        check("{{nope}} {{getvar::x}}", "{{nope}} {{getvar::x}}");
        check("{{char", "{{char");
        check("}} {", "}} {");
    }

    #[test]
    fn random_picks_from_list_and_is_seeded() {
        let out = substitute("{{random:a,b,c}}", &ctx());
        assert!(["a", "b", "c"].contains(&out.as_str()));
        assert_eq!(out, substitute("{{random:a,b,c}}", &ctx()));
        let out = substitute("{{random::x,1::y,2}}", &ctx());
        assert!(["x,1", "y,2"].contains(&out.as_str()), "{out}");
        // Different seeds eventually give different picks.
        let picks: std::collections::HashSet<String> = (0..20)
            .map(|s| {
                let mut c = ctx();
                c.rng_seed = s;
                substitute("{{random:a,b,c}}", &c)
            })
            .collect();
        assert!(picks.len() > 1);
    }

    #[test]
    fn nested_macros_expand_inside_out() {
        let out = substitute("{{random:{{char}},{{char}}}}", &ctx());
        assert_eq!(out, "Sera");
    }

    #[test]
    fn pick_is_stable_per_conversation() {
        let a = substitute("{{pick:a,b,c,d,e,f}}", &ctx());
        let mut c = ctx();
        c.rng_seed = 999;
        assert_eq!(
            substitute("{{pick:a,b,c,d,e,f}}", &c),
            a,
            "ignores the per-generation seed"
        );
        let picks: std::collections::HashSet<String> = (0..20)
            .map(|s| {
                let mut c = ctx();
                c.conversation_seed = s;
                substitute("{{pick:a,b,c,d,e,f}}", &c)
            })
            .collect();
        assert!(picks.len() > 1);
    }

    #[test]
    fn deep_nesting_is_bounded() {
        let hostile = "{{".repeat(100_000);
        assert_eq!(substitute(&hostile, &ctx()), hostile);
        let deep = format!("{}char{}", "{{".repeat(20), "}}".repeat(20));
        assert!(substitute(&deep, &ctx()).contains("char"));
    }

    #[test]
    fn roll_dice() {
        for spec in ["d6", "6", "1d6"] {
            let v: i64 = substitute(&format!("{{{{roll:{spec}}}}}"), &ctx())
                .parse()
                .unwrap();
            assert!((1..=6).contains(&v), "{spec} -> {v}");
        }
        let v: i64 = substitute("{{roll:3d4+10}}", &ctx()).parse().unwrap();
        assert!((13..=22).contains(&v));
        check("{{roll:0d6}}", "{{roll:0d6}}");
        check("{{roll:abc}}", "{{roll:abc}}");
    }
}
