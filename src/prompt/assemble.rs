//! Prompt assembly in SillyTavern's default chat-completion order, within a token budget, with
//! an itemization report (what `dryRun: true` returns).
//!
//! Order: main system prompt, world info before, persona, description, personality, scenario,
//! world info after, example dialogue, memory, `[Start a new Chat]`, the history with depth
//! injections, post-history instructions (SILLYTAVERN.md "Prompt order"; DESIGN.md puts memory
//! after the example dialogue).
//!
//! Each section is its own `system` message, as SillyTavern sends them with its default
//! "squash system messages" off; [`to_sillytavern`] joins them for upstreams that take a single
//! system prompt. Each example block is one system message `[Example Chat]\n<block>`: SillyTavern
//! splits blocks further into name-tagged messages, which OpenAI-style messages here cannot carry.
//! In-chat injections at the same depth and role are joined with a newline into one message,
//! roles ordered system, user, assistant, as SillyTavern does.
//!
//! Budget: every message costs its content tokens plus [`MESSAGE_OVERHEAD`], and the reply
//! priming costs [`REPLY_PRIMING`] (OpenAI's accounting for chat formats). Fixed parts are always
//! kept; then history newest→oldest while it fits (the newest message is always kept, and the
//! first one that does not fit ends the history, so no gap is ever created); then example blocks
//! in card order while they fit.

use std::collections::BTreeMap;

use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::lorebook::{self, ActivationInput, CompiledLorebook, LoreReport, LoreState, Position};
use super::macros::{substitute, MacroContext};
use super::tokens::Tokenizer;
use super::{HistoryMessage, Role};
use crate::model::Character;

/// SillyTavern's default main prompt, also what `{{original}}` means in a card's `system_prompt`.
pub const DEFAULT_MAIN_PROMPT: &str =
    "Write {{char}}'s next reply in a fictional chat between {{char}} and {{user}}.";
/// The system message that opens the chat history.
pub const NEW_CHAT_PROMPT: &str = "[Start a new Chat]";
/// The header of each example dialogue block.
pub const NEW_EXAMPLE_CHAT_PROMPT: &str = "[Example Chat]";
/// Tokens a chat-completion message costs beyond its content (role and separators).
pub const MESSAGE_OVERHEAD: usize = 3;
/// Tokens the upstream adds to prime the reply.
pub const REPLY_PRIMING: usize = 3;
/// SillyTavern's default World Info budget, in percent of the prompt budget.
pub const DEFAULT_WORLD_INFO_PERCENT: u32 = 25;
/// Depth of SillyTavern's default author's note, where "author's note" entries go.
const AUTHORS_NOTE_DEPTH: usize = 4;

/// The model's context window and the part of it reserved for the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    /// The model's context size in tokens.
    pub max_context_tokens: usize,
    /// Tokens reserved for the reply.
    pub max_reply_tokens: usize,
}

/// Server-wide defaults a card may override.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PromptOptions {
    /// The main system prompt (and `{{original}}` in a card's `system_prompt`).
    pub main_prompt: String,
    /// Default post-history instructions (and `{{original}}` in the card's); empty = none.
    pub post_history_instructions: String,
    /// World Info budget in percent of the prompt budget, unless the book sets `token_budget`.
    pub world_info_budget_percent: u32,
}

impl Default for PromptOptions {
    fn default() -> Self {
        PromptOptions {
            main_prompt: DEFAULT_MAIN_PROMPT.to_owned(),
            post_history_instructions: String::new(),
            world_info_budget_percent: DEFAULT_WORLD_INFO_PERCENT,
        }
    }
}

/// Long-term memory placed after the example dialogue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryBlock {
    /// Summary of the earlier conversation; empty = none.
    #[serde(default)]
    pub summary: String,
    /// Recalled memory lines, one per line in the prompt.
    #[serde(default)]
    pub recalled: Vec<String>,
}

/// Where a plugin-provided section goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SectionPosition {
    /// After memory, before `[Start a new Chat]`.
    BeforeHistory,
    /// After the history, before the post-history instructions.
    AfterHistory,
    /// In the chat, N messages from the end.
    Depth(usize),
}

/// An extra prompt section (plugins add these).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtraSection {
    /// Section name in the itemization.
    pub name: String,
    /// Content; macros are substituted.
    pub content: String,
    /// Message role.
    pub role: Role,
    /// Placement.
    pub position: SectionPosition,
}

/// Everything one prompt is built from. Borrowed so that the caller's cached data is not copied.
#[derive(Debug, Clone)]
pub struct PromptInput<'a> {
    /// The character.
    pub character: &'a Character,
    /// The character's compiled lorebook, cached by (character id, version).
    pub lorebook: Option<&'a CompiledLorebook>,
    /// `{{user}}`.
    pub user_name: &'a str,
    /// The user persona description; empty = none.
    pub persona: &'a str,
    /// The chat, oldest first: greeting first, the new user message last.
    pub history: &'a [HistoryMessage<'a>],
    /// Summary and recalled memories.
    pub memory: Option<&'a MemoryBlock>,
    /// Context size and reply reservation.
    pub budget: Budget,
    /// The conversation's lorebook timed-effect state.
    pub lore_state: &'a LoreState,
    /// Seeds this generation's randomness (`{{random}}`, `{{roll}}`, lorebook rolls).
    pub rng_seed: u64,
    /// Seeds `{{pick}}`; fixed per conversation.
    pub conversation_seed: u64,
    /// The generation time in the user's offset.
    pub now: DateTime<FixedOffset>,
    /// Plugin sections.
    pub extra_sections: &'a [ExtraSection],
    /// Server defaults.
    pub options: &'a PromptOptions,
}

/// One OpenAI-style chat-completion message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptMessage {
    /// Role.
    pub role: Role,
    /// Content.
    pub content: String,
}

/// Tokens per prompt section (consecutive messages of a section are summed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SectionTokens {
    /// Section name (`main`, `description`, `chatHistory`, …).
    pub section: String,
    /// Messages in the section.
    pub messages: usize,
    /// Content tokens, without per-message overhead.
    pub tokens: usize,
}

/// SillyTavern's "prompt itemization": what went into the prompt and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Itemization {
    /// Per section, in prompt order.
    pub sections: Vec<SectionTokens>,
    /// Content tokens plus per-message overhead and reply priming.
    pub total_tokens: usize,
    /// `max_context_tokens - max_reply_tokens`.
    pub budget_tokens: usize,
    /// True when the fixed parts plus the newest message exceed the budget.
    pub over_budget: bool,
    /// History messages kept.
    pub history_kept: usize,
    /// History messages dropped (oldest first).
    pub history_dropped: usize,
    /// Example blocks kept.
    pub example_blocks_kept: usize,
    /// Example blocks in the card.
    pub example_blocks_total: usize,
    /// Lorebook activation details.
    pub lorebook: LoreReport,
    /// The updated lorebook state.
    pub lore_state: LoreState,
}

/// The assembled prompt.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AssembledPrompt {
    /// The messages to send, in order.
    pub messages: Vec<PromptMessage>,
    /// The itemization report.
    pub itemization: Itemization,
}

impl AssembledPrompt {
    /// The lorebook state to store with the conversation.
    pub fn lore_state(&self) -> &LoreState {
        &self.itemization.lore_state
    }
}

/// A prompt reshaped for an upstream that takes one system prompt plus the chat
/// (SillyTavern's `overrideSettings`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SplitPrompt {
    /// The leading system messages joined with blank lines.
    pub system_prompt: String,
    /// Everything from the first non-leading-system message on.
    pub history: Vec<PromptMessage>,
}

/// Joins the leading system messages into one system prompt and keeps the rest as the chat.
pub fn to_sillytavern(prompt: &AssembledPrompt) -> SplitPrompt {
    let lead = prompt
        .messages
        .iter()
        .take_while(|m| m.role == Role::System)
        .count();
    let system_prompt = prompt.messages[..lead]
        .iter()
        .map(|m| m.content.as_str())
        .collect::<Vec<_>>()
        .join("\n\n");
    SplitPrompt {
        system_prompt,
        history: prompt.messages[lead..].to_vec(),
    }
}

/// The card fields prompt building reads, resolved once: top-level fields win, the profile's
/// card copy fills the gaps.
struct CardText<'a> {
    char_name: &'a str,
    description: &'a str,
    personality: &'a str,
    scenario: &'a str,
    mes_example: &'a str,
}

fn card_text(c: &Character) -> CardText<'_> {
    let p = &c.personality;
    CardText {
        char_name: p
            .nickname
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or(first_non_empty(&c.name, &p.name)),
        description: first_non_empty(&c.description, &p.description),
        personality: &p.personality,
        scenario: first_non_empty(&c.scenario, &p.scenario),
        mes_example: first_non_empty(&c.mes_example, &p.mes_example),
    }
}

fn first_non_empty<'a>(a: &'a str, b: &'a str) -> &'a str {
    if a.is_empty() {
        b
    } else {
        a
    }
}

/// The greeting for swipe `swipe` (0 = `first_mes`, n = `alternate_greetings[n-1]`), with
/// macros substituted as SillyTavern does when it starts a chat. `None` if that swipe is missing
/// or empty.
pub fn render_greeting(
    character: &Character,
    swipe: usize,
    ctx: &MacroContext<'_>,
) -> Option<String> {
    let first = first_non_empty(&character.first_mes, &character.personality.first_mes);
    let text = if swipe == 0 {
        first
    } else {
        character
            .personality
            .alternate_greetings
            .as_ref()?
            .get(swipe - 1)?
            .as_str()
    };
    (!text.is_empty()).then(|| substitute(text, ctx))
}

/// Splits `mes_example` on `<START>` (case-insensitive) into trimmed, non-empty blocks.
pub fn example_blocks(mes_example: &str) -> Vec<&str> {
    let lower = mes_example.to_ascii_lowercase();
    let mut blocks = Vec::new();
    let mut start = 0;
    // ASCII lowercasing keeps byte offsets, so positions found in `lower` index `mes_example`.
    for (i, _) in lower.match_indices("<start>") {
        blocks.push(&mes_example[start..i]);
        start = i + "<start>".len();
    }
    blocks.push(&mes_example[start..]);
    blocks
        .into_iter()
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .collect()
}

/// A card's `extensions.depth_prompt`: `{prompt, depth (4), role ("system")}`.
fn depth_prompt(c: &Character) -> Option<(usize, Role, &str)> {
    let dp = c.personality.extensions.get("depth_prompt")?;
    let prompt = dp.get("prompt")?.as_str()?;
    if prompt.trim().is_empty() {
        return None;
    }
    let depth = dp
        .get("depth")
        .and_then(|d| {
            d.as_u64()
                .or_else(|| d.as_str().and_then(|s| s.trim().parse().ok()))
        })
        .unwrap_or(lorebook::DEFAULT_DEPTH as u64) as usize;
    let role = match dp.get("role") {
        Some(Value::String(r)) => match r.as_str() {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            _ => Role::System,
        },
        Some(Value::Number(n)) => Role::from_st(n.as_i64().unwrap_or(0)),
        _ => Role::System,
    };
    Some((depth, role, prompt))
}

/// Tokens of the `\n` joining two pieces of a joined section.
const NEWLINE_TOKENS: usize = 1;

/// Tokens of pieces joined with newlines, counted piece by piece. cl100k_base's pre-tokenizer
/// splits at newlines, so this matches counting the joined text to within a token per join, and
/// it lets the tokenizer cache serve each entry even when the set of activated entries (and so
/// the joined text) changes every generation.
fn joined_tokens<'s>(tokenizer: &Tokenizer, pieces: impl Iterator<Item = &'s str>) -> usize {
    let mut total = 0;
    for (i, piece) in pieces.enumerate() {
        total += tokenizer.count(piece) + if i > 0 { NEWLINE_TOKENS } else { 0 };
    }
    total
}

/// A message under construction: its section and its content token count.
struct Part {
    section: String,
    role: Role,
    content: String,
    tokens: usize,
}

impl Part {
    fn cost(&self) -> usize {
        self.tokens + MESSAGE_OVERHEAD
    }
}

/// Builds the prompt. Pure: same input, same output.
pub fn assemble(input: &PromptInput<'_>, tokenizer: &Tokenizer) -> AssembledPrompt {
    let card = card_text(input.character);
    let history = input.history;
    let last_of = |role: Option<Role>| {
        history
            .iter()
            .rev()
            .find(|m| role.is_none_or(|r| m.role == r))
            .map_or("", |m| &*m.content)
    };
    let ctx = MacroContext {
        char_name: card.char_name,
        user_name: input.user_name,
        description: card.description,
        personality: card.personality,
        scenario: card.scenario,
        persona: input.persona,
        mes_examples: card.mes_example,
        original: None,
        last_message: last_of(None),
        last_user_message: last_of(Some(Role::User)),
        last_char_message: last_of(Some(Role::Assistant)),
        now: input.now,
        rng_seed: input.rng_seed,
        conversation_seed: input.conversation_seed,
    };
    let sub = |text: &str| substitute(text, &ctx);
    let part = |section: &str, role: Role, content: String| Part {
        section: section.to_owned(),
        role,
        tokens: tokenizer.count(&content),
        content,
    };
    let available = input
        .budget
        .max_context_tokens
        .saturating_sub(input.budget.max_reply_tokens);

    // Lorebook.
    let mut lore_report = LoreReport::default();
    let mut lore_state = input.lore_state.clone();
    let mut wi: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    let mut injections: Vec<(usize, Role, u8, String)> = Vec::new();
    if let Some(book) = input.lorebook {
        let budget_tokens = book
            .token_budget()
            .unwrap_or(available * input.options.world_info_budget_percent as usize / 100);
        let act = lorebook::activate(
            book,
            &ActivationInput {
                history,
                budget_tokens,
                state: input.lore_state,
                rng_seed: input.rng_seed,
            },
        );
        for i in &act.entries {
            let Some(e) = book.entry(*i) else { continue };
            let content = sub(&e.content);
            // The third field orders injections sharing a depth and role: author's-note top, then
            // bottom, then plain depth entries.
            match e.position {
                Position::Before => wi.entry("before").or_default().push(content),
                Position::After => wi.entry("after").or_default().push(content),
                Position::ExamplesTop => wi.entry("examplesTop").or_default().push(content),
                Position::ExamplesBottom => wi.entry("examplesBottom").or_default().push(content),
                Position::AuthorsNoteTop => {
                    injections.push((AUTHORS_NOTE_DEPTH, Role::System, 1, content))
                }
                Position::AuthorsNoteBottom => {
                    injections.push((AUTHORS_NOTE_DEPTH, Role::System, 2, content))
                }
                Position::AtDepth { depth, role } => injections.push((depth, role, 3, content)),
            }
        }
        lore_report = act.report;
        lore_state = act.state;
    }
    let wi_part = |key: &str, section: &str| {
        wi.get(key).filter(|v| !v.is_empty()).map(|v| Part {
            section: section.to_owned(),
            role: Role::System,
            tokens: joined_tokens(tokenizer, v.iter().map(String::as_str)),
            content: v.join("\n"),
        })
    };

    // Fixed parts before the examples.
    let mut head: Vec<Part> = Vec::new();
    let main_prompt = match input.character.personality.system_prompt.as_deref() {
        Some(sp) if !sp.trim().is_empty() => substitute(
            sp,
            &MacroContext {
                original: Some(&sub(&input.options.main_prompt)),
                ..ctx.clone()
            },
        ),
        _ => sub(&input.options.main_prompt),
    };
    let push_if = |parts: &mut Vec<Part>, section: &str, content: String| {
        if !content.trim().is_empty() {
            parts.push(part(section, Role::System, content));
        }
    };
    push_if(&mut head, "main", main_prompt);
    head.extend(wi_part("before", "worldInfoBefore"));
    push_if(&mut head, "persona", sub(input.persona));
    push_if(&mut head, "description", sub(card.description));
    if !card.personality.trim().is_empty() {
        push_if(
            &mut head,
            "personality",
            format!(
                "[{}'s personality: {}]",
                card.char_name,
                sub(card.personality)
            ),
        );
    }
    if !card.scenario.trim().is_empty() {
        push_if(
            &mut head,
            "scenario",
            format!(
                "[Circumstances and context of the dialogue: {}]",
                sub(card.scenario)
            ),
        );
    }
    head.extend(wi_part("after", "worldInfoAfter"));
    head.extend(wi_part("examplesTop", "worldInfoExamplesTop"));

    let examples: Vec<Part> = example_blocks(card.mes_example)
        .into_iter()
        .map(|b| {
            part(
                "exampleChat",
                Role::System,
                format!("{NEW_EXAMPLE_CHAT_PROMPT}\n{}", sub(b)),
            )
        })
        .collect();

    let mut mid: Vec<Part> = Vec::new();
    mid.extend(wi_part("examplesBottom", "worldInfoExamplesBottom"));
    if let Some(mem) = input.memory {
        let pieces: Vec<String> = std::iter::once(&mem.summary)
            .chain(&mem.recalled)
            .filter(|t| !t.trim().is_empty())
            .map(|t| sub(t))
            .collect();
        if !pieces.is_empty() {
            // Counted per piece: recalled memories change every turn, their texts do not.
            mid.push(Part {
                section: "memory".to_owned(),
                role: Role::System,
                tokens: joined_tokens(tokenizer, pieces.iter().map(String::as_str)),
                content: pieces.join("\n"),
            });
        }
    }
    for s in input.extra_sections {
        match s.position {
            SectionPosition::BeforeHistory => {
                if !s.content.trim().is_empty() {
                    mid.push(part(&s.name, s.role, sub(&s.content)));
                }
            }
            SectionPosition::Depth(d) => injections.push((d, s.role, 4, sub(&s.content))),
            SectionPosition::AfterHistory => {}
        }
    }
    mid.push(part("newChat", Role::System, NEW_CHAT_PROMPT.to_owned()));

    let mut tail: Vec<Part> = Vec::new();
    for s in input.extra_sections {
        if s.position == SectionPosition::AfterHistory && !s.content.trim().is_empty() {
            tail.push(part(&s.name, s.role, sub(&s.content)));
        }
    }
    let phi = match input
        .character
        .personality
        .post_history_instructions
        .as_deref()
    {
        Some(p) if !p.trim().is_empty() => substitute(
            p,
            &MacroContext {
                original: Some(&sub(&input.options.post_history_instructions)),
                ..ctx.clone()
            },
        ),
        _ => sub(&input.options.post_history_instructions),
    };
    push_if(&mut tail, "postHistoryInstructions", phi);

    // In-chat injections: the card's depth prompt, then lorebook and plugin ones, joined per
    // (depth, role) into one message.
    if let Some((depth, role, prompt)) = depth_prompt(input.character) {
        injections.push((depth, role, 0, sub(prompt)));
    }
    injections.retain(|(_, _, _, c)| !c.trim().is_empty());
    injections.sort_by_key(|(d, r, k, _)| (std::cmp::Reverse(*d), *r, *k));
    let mut grouped: Vec<(usize, Part)> = Vec::new();
    for (depth, role, _, content) in injections {
        let tokens = tokenizer.count(&content);
        match grouped.last_mut() {
            Some((d, p)) if *d == depth && p.role == role => {
                p.content.push('\n');
                p.content.push_str(&content);
                p.tokens += tokens + NEWLINE_TOKENS;
            }
            _ => grouped.push((
                depth,
                Part {
                    section: format!("inChat@{depth}"),
                    role,
                    content,
                    tokens,
                },
            )),
        }
    }

    // Budget: fixed parts first, then history newest→oldest, then examples.
    let fixed: usize = head
        .iter()
        .chain(&mid)
        .chain(&tail)
        .map(Part::cost)
        .sum::<usize>()
        + grouped.iter().map(|(_, p)| p.cost()).sum::<usize>()
        + REPLY_PRIMING;
    let mut used = fixed;
    let mut kept_from = history.len();
    let mut over_budget = false;
    for (i, m) in history.iter().enumerate().rev() {
        let cost = m.tokens.unwrap_or_else(|| tokenizer.count(&m.content)) + MESSAGE_OVERHEAD;
        if used + cost > available {
            if i + 1 == history.len() {
                // The new message is never dropped; the caller sees `overBudget` instead.
                over_budget = true;
                used += cost;
                kept_from = i;
            }
            break;
        }
        used += cost;
        kept_from = i;
    }
    let mut examples_kept = 0;
    for e in &examples {
        if used + e.cost() > available {
            break;
        }
        used += e.cost();
        examples_kept += 1;
    }
    let example_blocks_total = examples.len();

    // Emit in order.
    let kept = &history[kept_from..];
    let mut parts: Vec<Part> = Vec::with_capacity(head.len() + kept.len() + 16);
    parts.extend(head);
    parts.extend(examples.into_iter().take(examples_kept));
    parts.extend(mid);
    let mut pending = grouped.into_iter().peekable();
    for (i, m) in kept.iter().enumerate() {
        while let Some((_, p)) = pending.next_if(|(d, _)| kept.len().saturating_sub(*d) <= i) {
            parts.push(p);
        }
        parts.push(Part {
            section: "chatHistory".to_owned(),
            role: m.role,
            content: m.content.to_string(),
            tokens: m.tokens.unwrap_or_else(|| tokenizer.count(&m.content)),
        });
    }
    parts.extend(pending.map(|(_, p)| p));
    parts.extend(tail);

    let mut sections: Vec<SectionTokens> = Vec::new();
    let mut total = REPLY_PRIMING;
    for p in &parts {
        total += p.cost();
        match sections.iter_mut().find(|s| s.section == p.section) {
            Some(s) => {
                s.messages += 1;
                s.tokens += p.tokens;
            }
            None => sections.push(SectionTokens {
                section: p.section.clone(),
                messages: 1,
                tokens: p.tokens,
            }),
        }
    }
    let messages = parts
        .into_iter()
        .map(|p| PromptMessage {
            role: p.role,
            content: p.content,
        })
        .collect();
    AssembledPrompt {
        messages,
        itemization: Itemization {
            sections,
            total_tokens: total,
            budget_tokens: available,
            over_budget,
            history_kept: kept.len(),
            history_dropped: kept_from,
            example_blocks_kept: examples_kept,
            example_blocks_total,
            lorebook: lore_report,
            lore_state,
        },
    }
}

#[cfg(test)]
#[path = "assemble_tests.rs"]
mod tests;
