//! Lorebook (World Info) activation, following SillyTavern's eight steps (see SILLYTAVERN.md).
//!
//! A `character_book` is compiled once into a [`CompiledLorebook`]: keys lowercased and loaded
//! into two Aho-Corasick automata (case-insensitive and case-sensitive), regex keys compiled,
//! SillyTavern's per-entry `extensions` parsed and every entry's content counted in tokens. The
//! caller caches it by (character id, version); [`activate`] then scans a 1,000-entry book with
//! one pass of each automaton over the scan buffer instead of one substring search per key.
//!
//! Positions: SillyTavern's `extensions.position` 0..6 map to [`Position`]. Taproom has no
//! author's note, so "author's note top/bottom" (2/3) are injected where SillyTavern's default
//! author's note sits, in the chat at depth 4 as a system message, top before bottom. "Example
//! messages top/bottom" (5/6) become system messages right before / after the example dialogue.
//!
//! Timed effects live in a serializable [`LoreState`] keyed by entry uid and measured in chat
//! messages: an entry activated when the chat had `n` messages stays active (sticky `s`) while the
//! chat has `n+1..=n+s` messages, then is blocked (cooldown `c`) for the next `c` messages.

use std::collections::{BTreeMap, HashMap};

use aho_corasick::{AhoCorasick, MatchKind};
use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::tokens::Tokenizer;
use super::{HistoryMessage, Role, SplitMix64};
use crate::model::{CharacterBook, LorebookEntry};

/// SillyTavern's default scan depth (messages).
pub const DEFAULT_SCAN_DEPTH: usize = 2;
/// SillyTavern's default depth for "at depth" entries and the author's note.
pub const DEFAULT_DEPTH: usize = 4;
/// Compiled regexes are capped so that a hostile card cannot make compilation explode.
const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Recursion stops after this many passes even if a pathological book keeps activating.
const MAX_PASSES: usize = 64;

/// Where an activated entry's content goes in the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Position {
    /// Before the character description (`before_char`, ST 0).
    Before,
    /// After the scenario (`after_char`, ST 1).
    After,
    /// Author's note top (ST 2): in the chat at depth 4, system role, before `AuthorsNoteBottom`.
    AuthorsNoteTop,
    /// Author's note bottom (ST 3): in the chat at depth 4, system role.
    AuthorsNoteBottom,
    /// In the chat, `depth` messages from the end, with a role (ST 4).
    AtDepth {
        /// 0 = after the last message.
        depth: usize,
        /// The role of the injected message.
        role: Role,
    },
    /// A system message just before the example dialogue (ST 5).
    ExamplesTop,
    /// A system message just after the example dialogue (ST 6).
    ExamplesBottom,
}

/// SillyTavern's secondary-key logic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SelectiveLogic {
    /// At least one secondary key matches (0).
    AndAny,
    /// Not every secondary key matches (1).
    NotAll,
    /// No secondary key matches (2).
    NotAny,
    /// Every secondary key matches (3).
    AndAll,
}

/// A content decorator (`@@activate` / `@@dont_activate` lines at the start of the content).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decorator {
    Activate,
    DontActivate,
}

/// How one key is matched.
#[derive(Debug)]
enum Matcher {
    /// Index into the case-insensitive (`cs == false`) or case-sensitive automaton.
    Plain {
        cs: bool,
        pattern: usize,
        whole_word: bool,
    },
    Regex(Regex),
    /// The key was a regex that failed to compile: it never matches (reported at compile time).
    Invalid,
}

#[derive(Debug)]
struct Key {
    raw: String,
    matcher: Matcher,
}

/// One entry after compilation; public fields are what prompt assembly needs.
#[derive(Debug)]
pub struct CompiledEntry {
    /// The entry's `id` (number or string) or, without one, `#<index>`.
    pub uid: String,
    /// `comment` or `name`, for reports.
    pub label: String,
    /// Content with decorator lines removed (macros not yet substituted).
    pub content: String,
    /// Where the content goes.
    pub position: Position,
    /// `insertion_order`: output is sorted ascending (higher = closer to the chat).
    pub order: i64,
    /// Tokens in `content`, counted once at compile time.
    pub tokens: usize,
    keys: Vec<Key>,
    secondary: Vec<Key>,
    logic: Option<SelectiveLogic>,
    constant: bool,
    decorator: Option<Decorator>,
    probability: u32,
    groups: Vec<String>,
    group_override: bool,
    group_weight: u64,
    scan_depth: Option<usize>,
    exclude_recursion: bool,
    prevent_recursion: bool,
    delay_until_recursion: bool,
    sticky: u64,
    cooldown: u64,
    delay: u64,
    priority: i64,
}

/// A lorebook ready for fast activation. Build once per (character id, version) and share.
#[derive(Debug)]
pub struct CompiledLorebook {
    entries: Vec<CompiledEntry>,
    ci: Option<AhoCorasick>,
    ci_len: usize,
    cs: Option<AhoCorasick>,
    cs_len: usize,
    scan_depth: usize,
    token_budget: Option<usize>,
    recursive: bool,
    warnings: Vec<String>,
}

/// Per-conversation timed-effect state, stored with the conversation between generations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoreState {
    /// Keyed by entry uid.
    #[serde(default)]
    pub effects: BTreeMap<String, TimedEffect>,
}

/// The timed effects of one entry, in chat-message counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimedEffect {
    /// Chat length when the entry activated.
    pub activated_at: u64,
    /// Sticky while `activated_at < len <= sticky_until`.
    pub sticky_until: u64,
    /// Blocked while `sticky_until < len <= cooldown_until`.
    pub cooldown_until: u64,
}

impl TimedEffect {
    fn sticky(&self, len: u64) -> bool {
        self.activated_at < len && len <= self.sticky_until
    }
    fn cooling(&self, len: u64) -> bool {
        self.sticky_until < len && len <= self.cooldown_until
    }
}

/// Why an entry fired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum FireReason {
    /// `constant: true`.
    Constant,
    /// `@@activate` decorator.
    Decorator,
    /// Still inside its sticky window.
    Sticky,
    /// A key matched the scan buffer.
    #[serde(rename_all = "camelCase")]
    Key {
        /// The primary key that matched.
        key: String,
        /// Secondary keys that matched (for selective entries).
        secondary_keys: Vec<String>,
    },
    /// A key matched the content of an entry activated in an earlier pass.
    #[serde(rename_all = "camelCase")]
    Recursion {
        /// The primary key that matched.
        key: String,
        /// Secondary keys that matched.
        secondary_keys: Vec<String>,
        /// Recursion pass (1 = first recursive scan).
        pass: usize,
    },
}

/// Why an entry that would have fired did not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum RejectReason {
    /// The probability roll failed (`roll` in 0..100 was not below `probability`).
    Probability {
        /// The roll.
        roll: u32,
        /// The entry's probability.
        probability: u32,
    },
    /// Another entry won the inclusion group.
    GroupLost {
        /// The group.
        group: String,
        /// The uid of the winner.
        winner: String,
    },
    /// Adding it would have crossed the token budget; scanning stopped here.
    Budget {
        /// Tokens the entry needs.
        needed: usize,
        /// Tokens left in the budget.
        remaining: usize,
    },
    /// Blocked by its cooldown until the chat has more than `until` messages.
    Cooldown {
        /// Last blocked chat length.
        until: u64,
    },
    /// Blocked until the chat has `until` messages.
    Delay {
        /// Required chat length.
        until: u64,
    },
    /// `@@dont_activate` decorator.
    Decorator,
}

/// An activated entry in the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FiredEntry {
    /// Entry uid.
    pub uid: String,
    /// Entry comment / name.
    pub label: String,
    /// Why it fired.
    pub reason: FireReason,
    /// Where it went.
    pub position: Position,
    /// Its content tokens.
    pub tokens: usize,
}

/// A rejected entry in the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RejectedEntry {
    /// Entry uid.
    pub uid: String,
    /// Entry comment / name.
    pub label: String,
    /// Why it was rejected.
    pub reason: RejectReason,
}

/// What the lorebook did in one generation (part of the prompt itemization).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoreReport {
    /// Entries that fired, in activation order.
    pub activated: Vec<FiredEntry>,
    /// Entries that matched but were dropped.
    pub rejected: Vec<RejectedEntry>,
    /// Compile-time problems, e.g. invalid regex keys (treated as never matching).
    pub warnings: Vec<String>,
    /// The token budget used for activation.
    pub budget_tokens: usize,
    /// Tokens of activated content.
    pub used_tokens: usize,
    /// Scan passes run (1 + recursion passes).
    pub passes: usize,
}

/// The inputs of one activation.
#[derive(Debug, Clone, Copy)]
pub struct ActivationInput<'a> {
    /// The chat, oldest first, including the new user message.
    pub history: &'a [HistoryMessage<'a>],
    /// Token budget for activated content.
    pub budget_tokens: usize,
    /// The conversation's timed-effect state before this generation.
    pub state: &'a LoreState,
    /// Seeds probability rolls and weighted group picks.
    pub rng_seed: u64,
}

/// The result of one activation.
#[derive(Debug, Clone)]
pub struct Activation {
    /// Indices of activated entries (see [`CompiledLorebook::entry`]), sorted by
    /// `insertion_order` ascending then book order.
    pub entries: Vec<usize>,
    /// Itemization of the activation.
    pub report: LoreReport,
    /// The updated timed-effect state to store with the conversation.
    pub state: LoreState,
}

impl CompiledLorebook {
    /// Compiles a book: parses SillyTavern's extensions, builds the key automata, compiles
    /// regex keys (invalid ones become warnings) and counts entry tokens.
    pub fn compile(book: &CharacterBook, tokenizer: &Tokenizer) -> CompiledLorebook {
        let mut ci_patterns: Vec<String> = Vec::new();
        let mut cs_patterns: Vec<String> = Vec::new();
        let mut ci_ids: HashMap<String, usize> = HashMap::new();
        let mut cs_ids: HashMap<String, usize> = HashMap::new();
        let mut warnings = Vec::new();
        let mut entries = Vec::new();
        for (index, e) in book.entries.iter().enumerate() {
            if !e.enabled || bool_ext(&e.extensions, "disable").unwrap_or(false) {
                // Disabled entries can never fire; dropping them keeps activation loops short.
                continue;
            }
            let ext = &e.extensions;
            let uid = entry_uid(e, index);
            let case_sensitive = bool_ext(ext, "case_sensitive")
                .or(e.case_sensitive)
                .unwrap_or(false);
            let whole_words = bool_ext(ext, "match_whole_words").unwrap_or(false);
            let use_regex = e.use_regex.unwrap_or(false);
            let mut compile_keys = |raw_keys: &[String]| -> Vec<Key> {
                let mut out = Vec::new();
                for raw in raw_keys {
                    let trimmed = raw.trim();
                    if trimmed.is_empty() {
                        continue;
                    }
                    let matcher = match regex_key(trimmed, use_regex, case_sensitive) {
                        Some(Ok(re)) => Matcher::Regex(re),
                        Some(Err(err)) => {
                            warnings.push(format!(
                                "entry {uid}: invalid regex key {trimmed:?} never matches: {err}"
                            ));
                            Matcher::Invalid
                        }
                        None => {
                            let (ids, patterns, text) = if case_sensitive {
                                (&mut cs_ids, &mut cs_patterns, trimmed.to_owned())
                            } else {
                                (&mut ci_ids, &mut ci_patterns, trimmed.to_lowercase())
                            };
                            let whole_word = whole_words && !text.contains(char::is_whitespace);
                            let next = patterns.len();
                            let pattern = *ids.entry(text.clone()).or_insert(next);
                            if pattern == next {
                                patterns.push(text);
                            }
                            Matcher::Plain {
                                cs: case_sensitive,
                                pattern,
                                whole_word,
                            }
                        }
                    };
                    out.push(Key {
                        raw: trimmed.to_owned(),
                        matcher,
                    });
                }
                out
            };
            let keys = compile_keys(&e.keys);
            let secondary = compile_keys(e.secondary_keys.as_deref().unwrap_or(&[]));
            let logic = (e.selective.unwrap_or(false) && !secondary.is_empty()).then(|| {
                match int_ext(ext, "selectiveLogic").unwrap_or(0) {
                    1 => SelectiveLogic::NotAll,
                    2 => SelectiveLogic::NotAny,
                    3 => SelectiveLogic::AndAll,
                    _ => SelectiveLogic::AndAny,
                }
            });
            let (decorator, content) = split_decorators(&e.content);
            let depth = nonneg(int_ext(ext, "depth")).unwrap_or(DEFAULT_DEPTH as u64) as usize;
            let position = match int_ext(ext, "position") {
                Some(0) => Position::Before,
                Some(1) => Position::After,
                Some(2) => Position::AuthorsNoteTop,
                Some(3) => Position::AuthorsNoteBottom,
                Some(4) => Position::AtDepth {
                    depth,
                    role: Role::from_st(int_ext(ext, "role").unwrap_or(0)),
                },
                Some(5) => Position::ExamplesTop,
                Some(6) => Position::ExamplesBottom,
                _ if e.position.as_deref() == Some("after_char") => Position::After,
                _ => Position::Before,
            };
            // `useProbability: false` means "ignore probability", as SillyTavern's UI does.
            let probability = if bool_ext(ext, "useProbability").unwrap_or(true) {
                nonneg(int_ext(ext, "probability")).map_or(100, |p| p.min(100) as u32)
            } else {
                100
            };
            let groups = ext
                .get("group")
                .and_then(Value::as_str)
                .map(|g| {
                    g.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            let label = e
                .comment
                .clone()
                .filter(|c| !c.is_empty())
                .or_else(|| e.name.clone())
                .unwrap_or_default();
            entries.push(CompiledEntry {
                tokens: tokenizer.count(&content),
                uid,
                label,
                content,
                position,
                order: e.insertion_order,
                keys,
                secondary,
                logic,
                constant: e.constant.unwrap_or(false),
                decorator,
                probability,
                groups,
                group_override: bool_ext(ext, "group_override").unwrap_or(false),
                group_weight: nonneg(int_ext(ext, "group_weight")).unwrap_or(100),
                scan_depth: nonneg(int_ext(ext, "scan_depth")).map(|d| d as usize),
                exclude_recursion: bool_ext(ext, "exclude_recursion").unwrap_or(false),
                prevent_recursion: bool_ext(ext, "prevent_recursion").unwrap_or(false),
                delay_until_recursion: bool_ext(ext, "delay_until_recursion").unwrap_or(false),
                sticky: nonneg(int_ext(ext, "sticky")).unwrap_or(0),
                cooldown: nonneg(int_ext(ext, "cooldown")).unwrap_or(0),
                delay: nonneg(int_ext(ext, "delay")).unwrap_or(0),
                priority: e.priority.unwrap_or(0),
            });
        }
        let build = |patterns: &[String], warnings: &mut Vec<String>| {
            if patterns.is_empty() {
                return None;
            }
            match AhoCorasick::builder()
                .match_kind(MatchKind::Standard)
                .build(patterns)
            {
                Ok(ac) => Some(ac),
                Err(err) => {
                    warnings.push(format!("lorebook keys could not be indexed: {err}"));
                    None
                }
            }
        };
        let ci = build(&ci_patterns, &mut warnings);
        let cs = build(&cs_patterns, &mut warnings);
        CompiledLorebook {
            entries,
            ci,
            ci_len: ci_patterns.len(),
            cs,
            cs_len: cs_patterns.len(),
            scan_depth: book.scan_depth.map_or(DEFAULT_SCAN_DEPTH, |d| d as usize),
            token_budget: book.token_budget.map(|b| b as usize),
            recursive: book.recursive_scanning.unwrap_or(false),
            warnings,
        }
    }

    /// Compiles the character's own `character_book`, if it has one.
    pub fn for_character(
        character: &crate::model::Character,
        tokenizer: &Tokenizer,
    ) -> Option<CompiledLorebook> {
        let book = character.personality.character_book.as_ref()?;
        Some(CompiledLorebook::compile(book, tokenizer))
    }

    /// The compiled entry at `index` (as returned in [`Activation::entries`]).
    pub fn entry(&self, index: usize) -> Option<&CompiledEntry> {
        self.entries.get(index)
    }

    /// Number of enabled entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the book has no enabled entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The book's own `token_budget`, which overrides the percent-of-context budget.
    pub fn token_budget(&self) -> Option<usize> {
        self.token_budget
    }

    /// Compile-time warnings (invalid regex keys, …).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    fn scan(&self, text: &str) -> ScanHits {
        let lower = text.to_lowercase();
        ScanHits {
            ci: hits(self.ci.as_ref(), self.ci_len, &lower),
            cs: hits(self.cs.as_ref(), self.cs_len, text),
            raw: text.to_owned(),
        }
    }
}

/// Which patterns occur in a text, anywhere and as whole words.
#[derive(Debug, Default, Clone)]
struct Hits {
    any: Vec<bool>,
    whole: Vec<bool>,
}

#[derive(Debug, Default, Clone)]
struct ScanHits {
    ci: Hits,
    cs: Hits,
    /// The scanned text itself, for regex keys.
    raw: String,
}

impl ScanHits {
    fn merge(&mut self, other: ScanHits) {
        for (a, b) in [(&mut self.ci, other.ci), (&mut self.cs, other.cs)] {
            if a.any.is_empty() {
                *a = b;
                continue;
            }
            for (x, y) in a.any.iter_mut().zip(b.any) {
                *x |= y;
            }
            for (x, y) in a.whole.iter_mut().zip(b.whole) {
                *x |= y;
            }
        }
        self.raw.push('\n');
        self.raw.push_str(&other.raw);
    }

    fn matches(&self, key: &Key) -> bool {
        match &key.matcher {
            Matcher::Plain {
                cs,
                pattern,
                whole_word,
            } => {
                let h = if *cs { &self.cs } else { &self.ci };
                let v = if *whole_word { &h.whole } else { &h.any };
                v.get(*pattern).copied().unwrap_or(false)
            }
            Matcher::Regex(re) => re.is_match(&self.raw),
            Matcher::Invalid => false,
        }
    }
}

fn hits(ac: Option<&AhoCorasick>, n: usize, text: &str) -> Hits {
    let mut h = Hits {
        any: vec![false; n],
        whole: vec![false; n],
    };
    let Some(ac) = ac else { return h };
    for m in ac.find_overlapping_iter(text) {
        let p = m.pattern().as_usize();
        h.any[p] = true;
        if !h.whole[p] {
            // UTF-8 patterns only match on char boundaries, so these slices always exist.
            let before = text.get(..m.start()).and_then(|t| t.chars().next_back());
            let after = text.get(m.end()..).and_then(|t| t.chars().next());
            h.whole[p] = !before.is_some_and(is_word) && !after.is_some_and(is_word);
        }
    }
    h
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `Some` when the key is a regex: `/pattern/flags`, or any key of a `use_regex` entry.
fn regex_key(key: &str, use_regex: bool, case_sensitive: bool) -> Option<Result<Regex, String>> {
    let (pattern, flags) = match parse_slashed(key) {
        Some(pf) => pf,
        None if use_regex => (key, if case_sensitive { "" } else { "i" }),
        None => return None,
    };
    let built = RegexBuilder::new(pattern)
        .case_insensitive(flags.contains('i'))
        .multi_line(flags.contains('m'))
        .dot_matches_new_line(flags.contains('s'))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| e.to_string());
    Some(built)
}

/// Splits `/pattern/flags` (JavaScript flags `dgimsuy`); anything else is a plain key.
fn parse_slashed(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix('/')?;
    let end = rest.rfind('/')?;
    let (pattern, flags) = (&rest[..end], &rest[end + 1..]);
    if pattern.is_empty() || !flags.chars().all(|c| "dgimsuy".contains(c)) {
        return None;
    }
    Some((pattern, flags))
}

/// Removes leading `@@name` lines; returns the activation decorator, if any, and the content.
fn split_decorators(content: &str) -> (Option<Decorator>, String) {
    if !content.starts_with("@@") {
        return (None, content.to_owned());
    }
    let mut decorator = None;
    let mut rest = content;
    while rest.starts_with("@@") {
        let (line, tail) = rest.split_once('\n').unwrap_or((rest, ""));
        match line
            .trim()
            .trim_start_matches("@@")
            .split_whitespace()
            .next()
        {
            Some("activate") => decorator = Some(Decorator::Activate),
            Some("dont_activate") => decorator = Some(Decorator::DontActivate),
            // Other decorators (`@@depth`, …) are not interpreted but still kept out of the prompt.
            _ => {}
        }
        rest = tail;
    }
    (decorator, rest.to_owned())
}

fn entry_uid(e: &LorebookEntry, index: usize) -> String {
    match e.id.as_ref().or_else(|| e.extra.get("uid")) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => format!("#{index}"),
    }
}

/// A boolean extension; numbers count as true when non-zero (SillyTavern writes both).
fn bool_ext(ext: &Map<String, Value>, key: &str) -> Option<bool> {
    match ext.get(key)? {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => n.as_f64().map(|f| f != 0.0),
        _ => None,
    }
}

/// An integer extension; accepts numbers and numeric strings, `null` is absent.
fn int_ext(ext: &Map<String, Value>, key: &str) -> Option<i64> {
    match ext.get(key)? {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn nonneg(v: Option<i64>) -> Option<u64> {
    v.map(|n| n.max(0) as u64)
}

/// A scan candidate: the entry index and why it fired.
struct Candidate {
    index: usize,
    reason: FireReason,
}

/// Runs SillyTavern's activation for one generation.
pub fn activate(book: &CompiledLorebook, input: &ActivationInput<'_>) -> Activation {
    let len = input.history.len() as u64;
    let mut rng = SplitMix64::new(input.rng_seed);
    let mut report = LoreReport {
        warnings: book.warnings.clone(),
        budget_tokens: input.budget_tokens,
        ..LoreReport::default()
    };
    // Drop effects from the future (the chat was rewound) and ones that have run out.
    let mut state = input.state.clone();
    state
        .effects
        .retain(|_, t| t.activated_at <= len && len <= t.cooldown_until.max(t.sticky_until));

    // Scan buffers per distinct scan depth, built lazily: usually there is only one.
    let mut buffers: HashMap<usize, ScanHits> = HashMap::new();
    let mut done = vec![false; book.entries.len()];
    let mut recursion: Option<ScanHits> = None;
    let mut activated: Vec<(usize, FireReason)> = Vec::new();
    let mut won_groups: BTreeMap<String, String> = BTreeMap::new();
    let mut used = 0usize;

    for pass in 0..MAX_PASSES {
        report.passes = pass + 1;
        let mut candidates: Vec<Candidate> = Vec::new();
        for (i, e) in book.entries.iter().enumerate() {
            if done[i] {
                continue;
            }
            let effect = state.effects.get(&e.uid).copied();
            let reason = if pass == 0 && effect.is_some_and(|t| t.sticky(len)) {
                Some(FireReason::Sticky)
            } else if pass == 0 && e.decorator == Some(Decorator::Activate) {
                Some(FireReason::Decorator)
            } else if pass == 0 && e.constant {
                Some(FireReason::Constant)
            } else if (pass == 0 && e.delay_until_recursion)
                || (pass > 0 && (e.exclude_recursion || e.constant))
            {
                // Delayed entries wait for a recursive pass; excluded ones never take part in one.
                None
            } else {
                // The scan buffer is only (re)read on the first pass and by entries delayed until
                // recursion; everything else already failed against it.
                let from_buffer = if pass == 0 || e.delay_until_recursion {
                    let depth = e.scan_depth.unwrap_or(book.scan_depth);
                    let buffer = buffers
                        .entry(depth)
                        .or_insert_with(|| book.scan(&scan_text(input.history, depth)));
                    key_match(e, buffer)
                } else {
                    None
                };
                let found =
                    from_buffer.or_else(|| recursion.as_ref().and_then(|r| key_match(e, r)));
                found.map(|(key, secondary_keys)| {
                    if pass == 0 {
                        FireReason::Key {
                            key,
                            secondary_keys,
                        }
                    } else {
                        FireReason::Recursion {
                            key,
                            secondary_keys,
                            pass,
                        }
                    }
                })
            };
            let Some(reason) = reason else { continue };
            // Anything past this point either fires or is reported once; never re-examined.
            done[i] = true;
            let reject = |reason: RejectReason| RejectedEntry {
                uid: e.uid.clone(),
                label: e.label.clone(),
                reason,
            };
            if reason == FireReason::Sticky {
                candidates.push(Candidate { index: i, reason });
                continue;
            }
            if e.decorator == Some(Decorator::DontActivate) {
                report.rejected.push(reject(RejectReason::Decorator));
                continue;
            }
            if len < e.delay {
                report
                    .rejected
                    .push(reject(RejectReason::Delay { until: e.delay }));
                continue;
            }
            if let Some(t) = effect.filter(|t| t.cooling(len)) {
                report.rejected.push(reject(RejectReason::Cooldown {
                    until: t.cooldown_until,
                }));
                continue;
            }
            if e.probability < 100 {
                let roll = rng.below(100) as u32;
                if roll >= e.probability {
                    report.rejected.push(reject(RejectReason::Probability {
                        roll,
                        probability: e.probability,
                    }));
                    continue;
                }
            }
            candidates.push(Candidate { index: i, reason });
        }
        if candidates.is_empty() {
            break;
        }

        let candidates = filter_groups(book, candidates, &mut won_groups, &mut rng, &mut report);

        // Budget: most important first, so that what gets cut is the least important.
        let mut ordered = candidates;
        ordered.sort_by_key(|c| {
            let e = &book.entries[c.index];
            (
                c.reason != FireReason::Sticky,
                c.reason != FireReason::Constant,
                std::cmp::Reverse(e.order),
                std::cmp::Reverse(e.priority),
                c.index,
            )
        });
        let mut overflowed = false;
        let mut new_text = String::new();
        for c in ordered {
            let e = &book.entries[c.index];
            if overflowed || used + e.tokens > input.budget_tokens {
                overflowed = true;
                report.rejected.push(RejectedEntry {
                    uid: e.uid.clone(),
                    label: e.label.clone(),
                    reason: RejectReason::Budget {
                        needed: e.tokens,
                        remaining: input.budget_tokens.saturating_sub(used),
                    },
                });
                continue;
            }
            used += e.tokens;
            if !e.prevent_recursion {
                new_text.push_str(&e.content);
                new_text.push('\n');
            }
            activated.push((c.index, c.reason));
        }
        if overflowed || !book.recursive || new_text.is_empty() {
            break;
        }
        let scanned = book.scan(&new_text);
        match recursion.as_mut() {
            Some(r) => r.merge(scanned),
            None => recursion = Some(scanned),
        }
    }

    // Timed effects start on a fresh activation; a sticky re-fire keeps its original window.
    for (i, reason) in &activated {
        let e = &book.entries[*i];
        if *reason != FireReason::Sticky && (e.sticky > 0 || e.cooldown > 0) {
            state.effects.insert(
                e.uid.clone(),
                TimedEffect {
                    activated_at: len,
                    sticky_until: len + e.sticky,
                    cooldown_until: len + e.sticky + e.cooldown,
                },
            );
        }
    }

    report.used_tokens = used;
    report.activated = activated
        .iter()
        .map(|(i, reason)| {
            let e = &book.entries[*i];
            FiredEntry {
                uid: e.uid.clone(),
                label: e.label.clone(),
                reason: reason.clone(),
                position: e.position,
                tokens: e.tokens,
            }
        })
        .collect();
    let mut entries: Vec<usize> = activated.into_iter().map(|(i, _)| i).collect();
    entries.sort_by_key(|i| (book.entries[*i].order, *i));
    Activation {
        entries,
        report,
        state,
    }
}

/// Step 4: one winner per inclusion group; entries in a group already won earlier lose.
fn filter_groups(
    book: &CompiledLorebook,
    candidates: Vec<Candidate>,
    won: &mut BTreeMap<String, String>,
    rng: &mut SplitMix64,
    report: &mut LoreReport,
) -> Vec<Candidate> {
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (ci, c) in candidates.iter().enumerate() {
        for g in &book.entries[c.index].groups {
            groups.entry(g.as_str()).or_default().push(ci);
        }
    }
    if groups.is_empty() {
        return candidates;
    }
    let mut lost: BTreeMap<usize, (String, String)> = BTreeMap::new();
    for (group, members) in groups {
        let winner_uid = if let Some(w) = won.get(group) {
            w.clone()
        } else {
            let alive: Vec<usize> = members
                .iter()
                .copied()
                .filter(|m| !lost.contains_key(m))
                .collect();
            let Some(winner) = pick_winner(book, &candidates, &alive, rng) else {
                continue;
            };
            let uid = book.entries[candidates[winner].index].uid.clone();
            won.insert(group.to_owned(), uid.clone());
            uid
        };
        for m in members {
            if book.entries[candidates[m].index].uid != winner_uid {
                lost.entry(m)
                    .or_insert_with(|| (group.to_owned(), winner_uid.clone()));
            }
        }
    }
    let mut kept = Vec::with_capacity(candidates.len());
    for (ci, c) in candidates.into_iter().enumerate() {
        match lost.remove(&ci) {
            Some((group, winner)) => {
                let e = &book.entries[c.index];
                report.rejected.push(RejectedEntry {
                    uid: e.uid.clone(),
                    label: e.label.clone(),
                    reason: RejectReason::GroupLost { group, winner },
                });
            }
            None => kept.push(c),
        }
    }
    kept
}

/// A sticky member wins outright; then the highest order among `group_override` members; else a
/// draw weighted by `group_weight`.
fn pick_winner(
    book: &CompiledLorebook,
    candidates: &[Candidate],
    members: &[usize],
    rng: &mut SplitMix64,
) -> Option<usize> {
    if let Some(m) = members
        .iter()
        .find(|m| candidates[**m].reason == FireReason::Sticky)
    {
        return Some(*m);
    }
    let entry = |m: usize| &book.entries[candidates[m].index];
    let overriding = members
        .iter()
        .copied()
        .filter(|m| entry(*m).group_override)
        .fold(None::<usize>, |best, m| match best {
            Some(b) if entry(b).order >= entry(m).order => Some(b),
            _ => Some(m),
        });
    if overriding.is_some() {
        return overriding;
    }
    let total: u64 = members.iter().map(|m| entry(*m).group_weight).sum();
    if total == 0 {
        return members.first().copied();
    }
    let mut roll = rng.below(total);
    for m in members {
        let w = entry(*m).group_weight;
        if roll < w {
            return Some(*m);
        }
        roll -= w;
    }
    members.last().copied()
}

/// Steps 2–3 for one entry against one scanned text: the first matching primary key and, for
/// selective entries, the secondary keys that matched if the selective logic holds.
fn key_match(e: &CompiledEntry, hits: &ScanHits) -> Option<(String, Vec<String>)> {
    let primary = e.keys.iter().find(|k| hits.matches(k))?;
    let Some(logic) = e.logic else {
        return Some((primary.raw.clone(), Vec::new()));
    };
    let matched: Vec<String> = e
        .secondary
        .iter()
        .filter(|k| hits.matches(k))
        .map(|k| k.raw.clone())
        .collect();
    let n = e.secondary.len();
    let ok = match logic {
        SelectiveLogic::AndAny => !matched.is_empty(),
        SelectiveLogic::NotAll => matched.len() < n,
        SelectiveLogic::NotAny => matched.is_empty(),
        SelectiveLogic::AndAll => matched.len() == n,
    };
    ok.then(|| (primary.raw.clone(), matched))
}

/// Step 1: the last `depth` messages, newest first, each as `Name: text`.
pub fn scan_text(history: &[HistoryMessage], depth: usize) -> String {
    let mut out = String::new();
    for m in history.iter().rev().take(depth) {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&m.name);
        out.push_str(": ");
        out.push_str(&m.content);
    }
    out
}

#[cfg(test)]
#[path = "lorebook_tests.rs"]
mod tests;
