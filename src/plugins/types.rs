//! The host API's data: what a hook sees (`BeforeContext`, `AfterContext`), what it may change
//! (`BeforeOutcome`, `AfterOutcome`) and how it failed (`PluginFailure`). Plain data, no wasmtime.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::manifest::FailurePolicy;

/// Looks up memories for the plugin's `recall(query, limit)` import.
pub type RecallFn = Arc<dyn Fn(&str, u32) -> Vec<String> + Send + Sync>;

/// A character's attachment of one plugin, with its config for that character.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Binding {
    /// The plugin's manifest name.
    pub name: String,
    /// The plugin config for this character (validated with `PluginHost::validate_binding`).
    #[serde(default)]
    pub config: serde_json::Value,
}

/// The card fields a plugin may see.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginCharacter {
    /// Character id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Card description.
    pub description: String,
    /// Card personality.
    pub personality: String,
    /// Card scenario.
    pub scenario: String,
    /// Card first message.
    pub first_mes: String,
    /// Tags.
    pub tags: Vec<String>,
}

impl PluginCharacter {
    /// The plugin view of a stored character.
    pub fn from_character(c: &crate::model::Character) -> Self {
        Self {
            id: c.id.clone(),
            name: c.name.clone(),
            description: c.description.clone(),
            personality: c.personality.personality.clone(),
            scenario: c.scenario.clone(),
            first_mes: c.first_mes.clone(),
            tags: c.tags.clone(),
        }
    }
}

/// One history message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryMessage {
    /// "user", "assistant" or "system".
    pub role: String,
    /// Speaker name, when known.
    pub name: Option<String>,
    /// Text.
    pub content: String,
}

/// One prompt message as it goes upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptMessage {
    /// "system", "user" or "assistant".
    pub role: String,
    /// Text.
    pub content: String,
}

/// Where an added prompt section goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SectionPosition {
    /// Right after the leading system prompt.
    System,
    /// Just before the history.
    BeforeHistory,
    /// After the history, before the new user message.
    AfterHistory,
    /// This many messages from the end of the prompt (0 = last).
    Depth(u32),
}

/// A prompt section added by a plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptSection {
    /// Text.
    pub content: String,
    /// "system", "user" or "assistant".
    pub role: String,
    /// Placement.
    pub position: SectionPosition,
}

/// A memory the plugin asked Taproom to keep; the caller stores it through the memory service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryEntry {
    /// Text.
    pub content: String,
    /// Free-form kind ("fact", "event", …).
    pub kind: String,
    /// 0.0 ..= 1.0 (clamped by the host).
    pub importance: f32,
    /// Tags.
    pub tags: Vec<String>,
}

/// Log severity of a plugin log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Trace.
    Trace,
    /// Debug.
    Debug,
    /// Info.
    Info,
    /// Warn.
    Warn,
    /// Error.
    Error,
}

/// A line a plugin logged during the call (also emitted through `tracing`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginLog {
    /// Severity.
    pub level: LogLevel,
    /// Text (truncated by the host).
    pub message: String,
}

/// What both hooks see.
#[derive(Clone, Default)]
pub struct CallContext {
    /// Conversation id (state is kept per conversation and plugin).
    pub conversation_id: String,
    /// The character.
    pub character: PluginCharacter,
    /// The user's display name.
    pub user_name: String,
    /// The new user message.
    pub user_message: String,
    /// Recent history, oldest first.
    pub history: Vec<HistoryMessage>,
    /// This plugin's state for this conversation (JSON), as last returned.
    pub state: Option<String>,
    /// Seed of the plugin's random source for this call.
    pub seed: u64,
    /// Memory lookup for the `recall` import; `None` answers every recall with nothing.
    pub recall: Option<RecallFn>,
}

impl fmt::Debug for CallContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallContext")
            .field("conversation_id", &self.conversation_id)
            .field("character", &self.character.id)
            .field("history", &self.history.len())
            .field("state", &self.state.as_ref().map(String::len))
            .field("recall", &self.recall.is_some())
            .finish_non_exhaustive()
    }
}

/// Input of before-generate.
#[derive(Debug, Clone, Default)]
pub struct BeforeContext {
    /// Common context.
    pub base: CallContext,
    /// The assembled prompt.
    pub prompt: Vec<PromptMessage>,
}

/// Input of after-generate (the reply is passed separately).
pub type AfterContext = CallContext;

/// What before-generate decided. `Default` is "changed nothing" (also returned when the plugin
/// does not declare the hook).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BeforeOutcome {
    /// Rewritten user message.
    pub user_message: Option<String>,
    /// Replacement prompt.
    pub prompt: Option<Vec<PromptMessage>>,
    /// Sections to add to the prompt.
    pub sections: Vec<PromptSection>,
    /// Memories to store after the turn.
    pub memories: Vec<MemoryEntry>,
    /// New state to keep (valid JSON, within `max_state_bytes`); `None` keeps the old state.
    pub state: Option<String>,
    /// Short-circuit reply: answer with this and skip the upstream.
    pub reply: Option<String>,
    /// Lines the plugin logged.
    pub logs: Vec<PluginLog>,
}

/// What after-generate did to the reply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind", content = "value")]
pub enum ReplyAction {
    /// Unchanged.
    #[default]
    Keep,
    /// Replaced by this text (`replaced: true` on the final stream event).
    Rewrite(String),
    /// Refused with this reason (`vetoed` on the final stream event).
    Veto(String),
}

/// What after-generate decided.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AfterOutcome {
    /// The reply decision.
    pub action: ReplyAction,
    /// Memories to store after the turn.
    pub memories: Vec<MemoryEntry>,
    /// New state; `None` keeps the old state.
    pub state: Option<String>,
    /// Lines the plugin logged.
    pub logs: Vec<PluginLog>,
}

/// What went wrong in a plugin call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FailureKind {
    /// The binding names no loaded plugin.
    NotFound,
    /// The plugin is cooling down after repeated failures.
    Disabled,
    /// The call ran past its deadline.
    Timeout,
    /// The plugin tried to grow memory past its cap.
    MemoryLimit,
    /// The plugin trapped (panic, abort, unreachable, a denied WASI call, …).
    Trap,
    /// The plugin returned `err(..)`.
    PluginError,
    /// The output broke a rule (unknown role, state not JSON, …).
    InvalidOutput,
    /// The output was larger than allowed.
    OutputTooLarge,
    /// Every instance slot was busy, or instantiation failed.
    Unavailable,
}

/// A failed plugin call. The caller applies `policy`: fail-open skips the plugin and reports
/// this in the response metadata; fail-closed answers `PLUGIN_FAILED` (502).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginFailure {
    /// Plugin name.
    pub plugin: String,
    /// The hook that failed ("before-generate" / "after-generate").
    pub hook: String,
    /// Category.
    pub kind: FailureKind,
    /// The plugin's declared policy.
    pub policy: FailurePolicy,
    /// Human-readable detail (lowercase, no trailing dot).
    pub message: String,
}

impl PluginFailure {
    /// The API error code for fail-closed failures.
    pub const CODE: &'static str = "PLUGIN_FAILED";
    /// The HTTP status for fail-closed failures.
    pub const STATUS: u16 = 502;

    /// True when the request should continue without this plugin.
    pub fn is_fail_open(&self) -> bool {
        self.policy == FailurePolicy::FailOpen
    }
}

impl fmt::Display for PluginFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "plugin {} failed in {} ({:?}): {}",
            self.plugin, self.hook, self.kind, self.message
        )
    }
}

impl std::error::Error for PluginFailure {}

/// Errors loading or reloading the plugin set.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// Bad `[plugins]` values.
    #[error("invalid [plugins] config: {0}")]
    Config(String),
    /// The plugins dir could not be read.
    #[error("cannot read plugins dir {path}: {message}")]
    Dir {
        /// The dir.
        path: String,
        /// Why.
        message: String,
    },
    /// A manifest is missing or invalid.
    #[error("invalid plugin manifest: {0}")]
    Manifest(String),
    /// Two folders declare the same plugin name.
    #[error("plugin name {0} is declared twice; rename one")]
    Duplicate(String),
    /// The component failed to compile or does not implement `taproom:plugin@0.1.0`.
    #[error("plugin {name} cannot be loaded: {message}")]
    Component {
        /// Plugin name.
        name: String,
        /// Why.
        message: String,
    },
    /// The wasm engine could not be created.
    #[error("cannot start the plugin engine: {0}")]
    Engine(String),
}
