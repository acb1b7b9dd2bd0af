//! The memory records: `ConversationMemory` entries, the rolling `MemorySummary` and the
//! per-conversation summarizer state. Pure data, stored as versioned JSON by `store::memory` and
//! serialized by `http::memory` with the spec's camelCase names.

use serde::{Deserialize, Serialize};

/// What a memory entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MemoryKind {
    Fact,
    Event,
    Preference,
    Summary,
    Note,
}

impl MemoryKind {
    /// Every kind, in the order statistics list them.
    pub const ALL: [MemoryKind; 5] = [
        MemoryKind::Fact,
        MemoryKind::Event,
        MemoryKind::Preference,
        MemoryKind::Summary,
        MemoryKind::Note,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fact => "fact",
            Self::Event => "event",
            Self::Preference => "preference",
            Self::Summary => "summary",
            Self::Note => "note",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Whose memory an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MemoryScope {
    /// Private to one user and one character.
    User,
    /// Shared by the character with every user; managed by its owner (or an admin).
    Character,
}

impl MemoryScope {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Character => "character",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "user" => Some(Self::User),
            "character" => Some(Self::Character),
            _ => None,
        }
    }
}

/// Who wrote an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MemorySource {
    /// Through the memory API.
    User,
    /// Extracted by the summarizer.
    Auto,
    /// Added by a behaviour plugin.
    Plugin,
}

/// One memory entry: the spec's `ConversationMemory`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConversationMemory {
    /// UUID v7.
    pub id: String,
    pub content: String,
    pub kind: MemoryKind,
    /// 0..=1; weighs into recall.
    pub importance: f64,
    #[serde(default)]
    pub tags: Vec<String>,
    pub scope: MemoryScope,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    pub source: MemorySource,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// RFC 3339 UTC.
    pub updated_at: String,
    /// RFC 3339 UTC; `null` until first recalled.
    pub last_recalled_at: Option<String>,
    pub recall_count: u64,
    /// cl100k tokens of `content`, counted once on write for budgeting and statistics.
    #[serde(default)]
    pub tokens: u32,
}

/// The rolling summary of one conversation, like SillyTavern's Summarize extension keeps.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemorySummary {
    pub content: String,
    pub conversation_id: String,
    /// `seq` of the newest message the summary covers.
    pub last_summarized_message: u64,
    /// RFC 3339 UTC.
    pub updated_at: String,
    /// cl100k tokens of `content`.
    pub tokens: u32,
}

/// Summarizer bookkeeping per (character, user, conversation), stored next to the summary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SummaryState {
    /// The latest successful summary, if any.
    #[serde(default)]
    pub summary: Option<MemorySummary>,
    /// Failed attempts since the last success: the summary is "pending" and retried on a later
    /// turn while this is non-zero.
    #[serde(default)]
    pub failures: u32,
    /// Last failure, for operators.
    #[serde(default)]
    pub last_error: Option<String>,
}
