//! Server-side SillyTavern prompt building: token counting, macro substitution, lorebook (World
//! Info) activation and chat-completion prompt assembly with itemization.
//!
//! # Layout
//! - [`tokens`]: the cl100k_base BPE tokenizer behind a cheap, cached `count`.
//! - [`macros`]: `{{char}}`, `{{user}}`, `{{random}}`, … substitution.
//! - [`lorebook`]: compiling a `character_book` once and activating its entries per generation.
//! - [`assemble`]: the ordered OpenAI-style messages, the context budget and the itemization report.
//!
//! Architecture invariant: everything here is pure. There is no IO, no HTTP type, no clock and no
//! global RNG: the caller passes `now`, the seeds and the per-conversation [`lorebook::LoreState`],
//! and gets the updated state back. The same input always produces the same prompt.

#![warn(missing_docs)]

pub mod assemble;
pub mod lorebook;
pub mod macros;
pub mod tokens;

use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// The role of a chat or prompt message, as OpenAI-style chat completion names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions and context.
    System,
    /// The human side of the chat.
    User,
    /// The character.
    Assistant,
}

impl Role {
    /// SillyTavern's numeric World Info role (0 system, 1 user, 2 assistant).
    pub fn from_st(n: i64) -> Role {
        match n {
            1 => Role::User,
            2 => Role::Assistant,
            _ => Role::System,
        }
    }
}

/// One stored chat message, oldest first in a history (the greeting is the first assistant
/// message, the new user message the last). Texts are borrowed from the stored messages when
/// the server builds a prompt: a long history is then not copied on every turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryMessage<'a> {
    /// Who spoke.
    pub role: Role,
    /// Display name used in the lorebook scan buffer (`Name: text`).
    pub name: Cow<'a, str>,
    /// The message text, already macro-substituted when it was stored.
    pub content: Cow<'a, str>,
    /// Token count stored with the message; counted on the fly when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<usize>,
}

/// A small deterministic PRNG (SplitMix64). Implemented here rather than taken from `rand`
/// because `{{pick}}` must stay stable per conversation across releases, and `rand`'s `StdRng`
/// does not promise a stable stream.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    /// Starts a stream from `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform integer in `0..n` (`n` > 0; returns 0 for `n` == 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        // Multiply-shift keeps the bias negligible for the small ranges used here.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Mixes two values into one seed, so that derived streams (per macro, per pass) differ.
pub(crate) fn mix_seed(a: u64, b: u64) -> u64 {
    SplitMix64::new(a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64()
}
