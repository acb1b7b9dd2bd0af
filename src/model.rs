//! Domain types shared by every layer: the spec's Character entity, its PersonalityProfile and
//! the SillyTavern lorebook (`character_book`). Pure data: no IO, no HTTP.
//!
//! Wire names are the spec's camelCase. The lorebook keeps the character-card field names
//! (`keys`, `insertion_order`, …) because that is the shape every card tool exchanges, and
//! SillyTavern's own per-entry fields live in each entry's `extensions` exactly as it writes them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A stored character, exactly as the spec names its fields, plus `version` for optimistic locking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Character {
    /// UUID v7 (time ordered).
    pub id: String,
    pub name: String,
    pub description: String,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// RFC 3339 UTC.
    pub updated_at: String,
    pub personality: PersonalityProfile,
    #[serde(default)]
    pub scenario: String,
    #[serde(default)]
    pub first_mes: String,
    #[serde(default)]
    pub mes_example: String,
    /// URL of the stored avatar (`/api/characters/{id}/avatar`) or an external http(s) URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
    /// VoiceSettings: the spec leaves the shape open, so it is kept verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voice: Option<Value>,
    #[serde(default)]
    pub tags: Vec<String>,
    pub is_public: bool,
    pub is_active: bool,
    pub usage_count: u64,
    pub creator_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    pub version: u64,
    /// Unique lowercase slug; the OpenAI-compatible model id is `char-<slug>`. Kept across
    /// renames unless changed explicitly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slug: Option<String>,
}

/// The spec's PersonalityProfile plus the card fields a SillyTavern card carries, so that an
/// imported card can be exported again without loss.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PersonalityProfile {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub personality: String,
    #[serde(default)]
    pub scenario: String,
    #[serde(default)]
    pub first_mes: String,
    #[serde(default)]
    pub mes_example: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creatorcomment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view_screen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_history_instructions: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alternate_greetings: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub character_book: Option<CharacterBook>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_groups: Option<Vec<String>>,

    // Card fields (V2/V3) the spec has no column for; kept so export reproduces the card.
    /// V2 `creator_notes`: shown to users, never put into a prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator_notes: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub character_version: Option<String>,
    /// V3 `nickname`: replaces `{{char}}` in prompts when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nickname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator_notes_multilingual: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_only_greetings: Option<Vec<String>>,
    /// V3 `creation_date` (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_date: Option<i64>,
    /// V3 `modification_date` (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modification_date: Option<i64>,
    /// V3 `assets[]` kept verbatim (`{type, uri, name, ext}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assets: Option<Vec<Value>>,
    /// The card's `data.extensions`, unknown keys preserved verbatim (e.g. `depth_prompt`,
    /// `talkativeness`, `fav`, `world`).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extensions: Map<String, Value>,
    /// Anything else a client or card sent that has no field here, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A lorebook in the character-card `character_book` shape.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CharacterBook {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan_depth: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_budget: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recursive_scanning: Option<bool>,
    #[serde(default)]
    pub extensions: Map<String, Value>,
    #[serde(default)]
    pub entries: Vec<LorebookEntry>,
    /// Unknown book-level fields, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One lorebook entry in the card shape. SillyTavern's own fields (`position` 0..6, `depth`,
/// `role`, `selectiveLogic`, `probability`, `group`, `sticky`, …) live in `extensions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LorebookEntry {
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub content: String,
    #[serde(default)]
    pub extensions: Map<String, Value>,
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default)]
    pub insertion_order: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case_sensitive: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    /// Numeric in V2, may be a string in V3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selective: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_keys: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constant: Option<bool>,
    /// `"before_char"` | `"after_char"` (card shape); SillyTavern's finer position is in extensions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
    /// V3: keys are regular expressions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_regex: Option<bool>,
    /// Unknown entry fields, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_true() -> bool {
    true
}

impl Default for LorebookEntry {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            content: String::new(),
            extensions: Map::new(),
            enabled: true,
            insertion_order: 100,
            case_sensitive: None,
            name: None,
            priority: None,
            id: None,
            comment: None,
            selective: None,
            secondary_keys: None,
            constant: None,
            position: None,
            use_regex: None,
            extra: Map::new(),
        }
    }
}

/// Who wrote a stored message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MessageRole {
    User,
    Character,
    System,
}

/// The spec's TokenUsage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// One stored chat message. Character messages keep their alternatives as SillyTavern swipes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoredMessage {
    /// UUID v7.
    pub id: String,
    /// Position in the conversation, starting at 0.
    pub seq: u64,
    pub role: MessageRole,
    /// Display name at the time (user name or character name).
    pub name: String,
    /// The chosen text (`swipes[swipe_id]` when there are swipes).
    pub content: String,
    /// RFC 3339 UTC.
    pub timestamp: String,
    /// Alternatives, SillyTavern style; empty when there is only `content`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub swipes: Vec<String>,
    #[serde(default)]
    pub swipe_id: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub swipe_info: Vec<serde_json::Value>,
    /// Whether an upstream generated it (greetings and imports are not generated).
    #[serde(default)]
    pub generated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<TokenUsage>,
    /// `stop`, `length`, `cancelled`, `error`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// Token count of `content`, cached for prompt budgeting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u32>,
    /// SillyTavern's `extra` object, kept verbatim.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Map<String, Value>,
}

/// A conversation between one user and one character.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Conversation {
    /// UUID v7.
    pub id: String,
    pub character_id: String,
    pub user_id: String,
    pub started_at: String,
    pub last_activity: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    pub message_count: u64,
    /// The next message's `seq`.
    pub next_seq: u64,
    /// The `{{user}}` name used in this conversation.
    #[serde(default)]
    pub user_name: String,
    /// Per-conversation lorebook timed-effect state (sticky/cooldown/delay), opaque here.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub lore_state: Value,
    /// The last `characterState` a SillyTavern upstream returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub character_state: Option<Value>,
    /// Seed for macros that must be stable per conversation (`{{pick}}`).
    #[serde(default)]
    pub seed: u64,
    /// SillyTavern's chat header `chat_metadata`, kept verbatim.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub chat_metadata: Map<String, Value>,
    /// Per-plugin state, by plugin name.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub plugin_state: Map<String, Value>,
}
