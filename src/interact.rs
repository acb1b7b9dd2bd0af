//! Talking to a character: one turn is prepare (load or start the conversation, append the
//! user message, assemble the SillyTavern prompt) → generate (upstream, whole or streamed) →
//! finish (store the reply with the updated lorebook state, usage and statistics).
//!
//! The user message commit runs concurrently with the upstream call, so it never sits between
//! the first token and the client; if the upstream fails, the user message stays and the
//! conversation remains valid.

use crate::auth::User;
use crate::characters::{blocking, CharacterService};
use crate::config::PromptConfig;
use crate::conversations::{char_display_name, new_message, ConversationService};
use crate::error::{ApiError, ErrorCode};
use crate::model::{Character, Conversation, MessageRole, StoredMessage, TokenUsage};
use crate::prompt::assemble::{
    self, AssembledPrompt, Budget, ExtraSection, MemoryBlock, PromptInput, PromptOptions,
};
use crate::prompt::lorebook::{CompiledLorebook, LoreState};
use crate::prompt::tokens::Tokenizer;
use crate::prompt::{HistoryMessage, Role};
use crate::store::{self, History, IdempotentRecord, Store};
use crate::upstream::{
    ChatMessage, GenParams, GenerateRequest, GenerateResult, Upstream, UpstreamError, UpstreamKind,
    Upstreams,
};
use serde::Deserialize;
use serde_json::{json, Value};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

/// Longest user message accepted, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The spec's InteractionParameters, plus Taproom's extras.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, utoipa::ToSchema)]
#[schema(as = InteractionParameters)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InteractParams {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<u32>,
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub stop: Option<Vec<String>>,
    /// `{{user}}`; default the JWT's `name` claim, else "User".
    pub user_name: Option<String>,
    /// The user persona description.
    pub persona: Option<String>,
    /// A named upstream instead of the default.
    pub upstream: Option<String>,
    pub model: Option<String>,
    /// Stream the reply (SSE on the HTTP endpoint).
    #[serde(default)]
    pub stream: bool,
    /// Return the prompt that would be sent, without calling the upstream or storing anything.
    #[serde(default)]
    pub dry_run: bool,
    /// For a new conversation: 0 = `firstMes`, n = the n-th alternate greeting.
    pub greeting_index: Option<usize>,
}

/// One user turn.
#[derive(Debug, Clone)]
pub struct TurnInput {
    pub character_id: String,
    pub message: String,
    pub conversation_id: Option<String>,
    pub params: InteractParams,
    pub idempotency_key: Option<String>,
}

/// Where a generated reply goes.
#[derive(Debug, Clone, Copy)]
pub enum ReplyTarget {
    /// A new character message at this seq.
    NewMessage(u64),
    /// A new swipe on the existing character message at this seq (regenerate).
    Swipe(u64),
}

/// Everything prepared for one generation.
pub struct Prepared {
    pub user: User,
    pub character: Arc<Character>,
    /// The conversation as stored after the user message (and greeting) are saved.
    pub conversation: Conversation,
    /// The stored record it replaces (None for a new conversation).
    pub previous: Option<Conversation>,
    /// Messages to store before generating (greeting, user message).
    pub pending: Vec<StoredMessage>,
    pub prompt: AssembledPrompt,
    pub request: GenerateRequest,
    pub upstream: Arc<Upstream>,
    pub target: ReplyTarget,
    /// The message a swipe is added to (regenerate).
    pub swipe_base: Option<StoredMessage>,
    pub idempotency: Option<(String, u64)>,
    /// Memories recalled into the prompt (shown by dry runs).
    pub recalled: Vec<crate::memory::RecalledMemory>,
    /// Enabled plugins of the character, in call order.
    pub bindings: Vec<crate::store::PluginBindingRecord>,
    /// A before-generate plugin's own reply (plugin name, text): the upstream is not called.
    pub short_circuit: Option<(String, String)>,
    /// Fail-open plugin failures, reported in the response metadata.
    pub plugin_notes: Vec<Value>,
}

impl Prepared {
    /// Frees what only the upstream request needed: the prompt's messages, held twice (as
    /// assembled and as sent). A stream holds its turn until it ends, and with a long chat
    /// those copies are most of what it holds.
    fn release_prompt(&mut self) {
        self.prompt.messages = Vec::new();
        self.request.messages = Vec::new();
        self.request.history = Vec::new();
        self.request.user_input = String::new();
        self.request.override_settings = None;
    }
}

/// Deltas buffered per stream before the upstream read waits for the client.
const STREAM_BUFFER: usize = 64;

/// How a generation ended, for storage.
#[derive(Debug, Clone)]
pub struct Generated {
    pub content: String,
    pub model: String,
    pub usage: TokenUsage,
    pub finish_reason: String,
    pub character_state: Option<Value>,
    pub generation_time_ms: u64,
}

impl From<GenerateResult> for Generated {
    fn from(r: GenerateResult) -> Self {
        Self {
            content: r.content,
            model: r.model,
            usage: r.usage.into(),
            finish_reason: r.finish_reason,
            character_state: r.character_state,
            generation_time_ms: r.generation_time_ms,
        }
    }
}

/// The interaction service.
#[derive(Clone)]
pub struct InteractService {
    store: Store,
    characters: CharacterService,
    conversations: ConversationService,
    memory: crate::memory::MemoryService,
    plugins: Arc<crate::plugins::PluginHost>,
    upstreams: Arc<Upstreams>,
    tokenizer: Arc<Tokenizer>,
    prompt: PromptConfig,
    /// Compiled lorebooks per (character, version): compiling a big book takes tens of ms.
    lorebooks: moka::sync::Cache<(u128, u64), Arc<Option<CompiledLorebook>>>,
    /// Serialises requests carrying the same (user, Idempotency-Key).
    inflight: moka::sync::Cache<(String, String), Arc<tokio::sync::Mutex<()>>>,
}

/// Converts an upstream failure into the API error.
pub fn upstream_error(e: UpstreamError) -> ApiError {
    let code = match e.spec_code() {
        "ST_API_UNAVAILABLE" => ErrorCode::StApiUnavailable,
        "ST_API_AUTH_FAILED" => ErrorCode::StApiAuthFailed,
        "ST_API_RATE_LIMITED" => ErrorCode::StApiRateLimited,
        "ST_GENERATION_FAILED" => ErrorCode::StGenerationFailed,
        "TIMEOUT" => ErrorCode::Timeout,
        _ => ErrorCode::ValidationError,
    };
    let mut err = ApiError::new(code, e.message().to_string());
    if let Some(d) = e.details() {
        err = err.with_details(d);
    }
    if let Some(after) = e.retry_after() {
        err = err.with_retry_after(after);
    }
    err.no_retry = e.kind() == crate::upstream::UpstreamErrorKind::CircuitOpen;
    err
}

fn role_of(m: &StoredMessage) -> Role {
    match m.role {
        MessageRole::User => Role::User,
        MessageRole::Character => Role::Assistant,
        MessageRole::System => Role::System,
    }
}

fn role_str(r: Role) -> &'static str {
    match r {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

/// The services a turn uses.
pub struct InteractDeps {
    pub store: Store,
    pub characters: CharacterService,
    pub conversations: ConversationService,
    pub memory: crate::memory::MemoryService,
    pub plugins: Arc<crate::plugins::PluginHost>,
    pub upstreams: Arc<Upstreams>,
    pub tokenizer: Arc<Tokenizer>,
}

impl InteractService {
    /// Builds the service.
    pub fn new(deps: InteractDeps, prompt: PromptConfig) -> Self {
        Self {
            store: deps.store,
            characters: deps.characters,
            conversations: deps.conversations,
            memory: deps.memory,
            plugins: deps.plugins,
            upstreams: deps.upstreams,
            tokenizer: deps.tokenizer,
            prompt,
            lorebooks: moka::sync::Cache::builder().max_capacity(256).build(),
            inflight: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
        }
    }

    /// The upstream registry.
    pub fn upstreams(&self) -> &Arc<Upstreams> {
        &self.upstreams
    }

    /// The shared tokenizer.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    fn lorebook(&self, c: &Character) -> Arc<Option<CompiledLorebook>> {
        let key = (store::parse_id(&c.id).unwrap_or(0), c.version);
        self.lorebooks.get_with(key, || {
            Arc::new(CompiledLorebook::for_character(c, &self.tokenizer))
        })
    }

    /// A character the caller may talk to.
    pub fn interactable(&self, id: &str, user: &User) -> Result<Arc<Character>, ApiError> {
        let c = self.characters.get(id, Some(user))?;
        if !c.is_active {
            return Err(ApiError::character_access_denied(format!(
                "character {id} is inactive; its owner must reactivate it before chatting"
            )));
        }
        Ok(c)
    }

    /// A previously stored result for this Idempotency-Key, or a lock guard to hold while this
    /// request runs. A key reused with a different request is refused.
    pub async fn idempotency_begin(
        &self,
        user: &User,
        key: &str,
        request_hash: u64,
    ) -> Result<(Option<Value>, tokio::sync::OwnedMutexGuard<()>), ApiError> {
        if key.is_empty() || key.len() > 255 {
            return Err(ApiError::validation(
                "Idempotency-Key",
                "must be 1..=255 characters",
            ));
        }
        let lock = self
            .inflight
            .get_with((user.id.clone(), key.to_string()), || {
                Arc::new(tokio::sync::Mutex::new(()))
            });
        let guard = lock.lock_owned().await;
        let store = self.store.clone();
        let (uid, k) = (user.id.clone(), key.to_string());
        let found = blocking(move || store.idempotent(&uid, &k)).await?;
        match found {
            Some(r) if r.request_hash == request_hash => Ok((Some(r.response), guard)),
            Some(_) => Err(ApiError::new(
                ErrorCode::VersionConflict,
                "Idempotency-Key was already used for a different request",
            )),
            None => Ok((None, guard)),
        }
    }

    /// Remembers the response of an idempotent request.
    pub async fn idempotency_store(
        &self,
        user: &User,
        key: &str,
        request_hash: u64,
        response: &Value,
    ) -> Result<(), ApiError> {
        let store = self.store.clone();
        let record = IdempotentRecord {
            request_hash,
            response: response.clone(),
            created_ms: chrono::Utc::now().timestamp_millis(),
        };
        let (uid, k) = (user.id.clone(), key.to_string());
        blocking(move || store.put_idempotent(&uid, &k, &record)).await?;
        Ok(())
    }

    /// Prepares a user turn: conversation, user message, prompt, upstream request.
    pub async fn prepare_turn(&self, user: &User, input: &TurnInput) -> Result<Prepared, ApiError> {
        let character = self.interactable(&input.character_id, user)?;
        let message = input.message.trim_end();
        if message.trim().is_empty() {
            return Err(ApiError::validation("message", "must not be empty"));
        }
        if message.len() > MAX_MESSAGE_BYTES {
            return Err(ApiError::validation(
                "message",
                format!("must be at most {MAX_MESSAGE_BYTES} bytes"),
            ));
        }
        let requested_name = input
            .params
            .user_name
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty());
        let (previous, mut conversation, mut messages, mut pending) = match &input.conversation_id {
            Some(cid) => {
                let h = self.conversations.load_owned(cid, user)?;
                if h.conversation.character_id != character.id {
                    return Err(ApiError::validation(
                        "conversationId",
                        "belongs to another character",
                    ));
                }
                (
                    Some(h.conversation.clone()),
                    h.conversation.clone(),
                    h.messages.clone(),
                    Vec::new(),
                )
            }
            None => {
                let name = requested_name
                    .map(str::to_string)
                    .or_else(|| user.name.clone())
                    .unwrap_or_else(|| "User".into());
                let (conv, greeting) = self.conversations.start(
                    user,
                    &character,
                    &name,
                    input.params.greeting_index.unwrap_or(0),
                )?;
                (
                    None,
                    conv,
                    greeting.iter().cloned().map(Arc::new).collect(),
                    greeting,
                )
            }
        };
        if let Some(name) = requested_name {
            conversation.user_name = name.to_string();
        }
        let user_name = conversation.user_name.clone();
        let seq = next_seq(&conversation, &messages);
        let mut user_message = new_message(seq, MessageRole::User, &user_name, message.to_string());
        user_message.tokens = Some(self.tokenizer.count(&user_message.content) as u32);
        messages.push(Arc::new(user_message.clone()));
        pending.push(user_message);
        let now = crate::time::now_rfc3339();
        conversation.last_activity = now;
        conversation.message_count = messages.len() as u64;
        conversation.next_seq = seq + 1;

        let (memory, recalled) = self
            .recall(
                user,
                &character,
                &conversation,
                previous.is_some(),
                &messages,
                input.params.dry_run,
            )
            .await?;
        let prompt = self.assemble(
            &character,
            &conversation,
            &messages,
            &input.params,
            &[],
            memory.as_ref(),
        )?;
        let bindings = self.enabled_bindings(&character)?;
        let mut hooks = BeforeHooks::default();
        let mut prompt = prompt;
        if !bindings.is_empty() && !input.params.dry_run {
            hooks = self
                .before_hooks(
                    user,
                    &bindings,
                    &character,
                    &mut conversation,
                    &mut messages,
                    &prompt,
                )
                .await?;
            if let Some(rewritten) = &hooks.user_message {
                if let Some(last) = pending.last_mut() {
                    last.content = rewritten.clone();
                    last.tokens = Some(self.tokenizer.count(rewritten) as u32);
                }
            }
            if !hooks.sections.is_empty() || hooks.user_message.is_some() {
                prompt = self.assemble(
                    &character,
                    &conversation,
                    &messages,
                    &input.params,
                    &hooks.sections,
                    memory.as_ref(),
                )?;
            }
            if let Some(replaced) = hooks.prompt.take() {
                prompt.messages = replaced;
            }
            let remembered = std::mem::take(&mut hooks.memories);
            self.remember_from_plugins(user, &character, &conversation.id, remembered);
        }
        let message = messages
            .last()
            .map(|m| m.content.clone())
            .unwrap_or_default();
        let message = message.as_str();
        let upstream = self
            .upstreams
            .get(input.params.upstream.as_deref())
            .map_err(upstream_error)?;
        let request = self.build_request(
            &character,
            &conversation,
            &prompt,
            &upstream,
            &input.params,
            message,
        );
        Ok(Prepared {
            user: user.clone(),
            character,
            conversation,
            previous,
            pending,
            prompt,
            request,
            upstream,
            target: ReplyTarget::NewMessage(seq + 1),
            swipe_base: None,
            idempotency: None,
            recalled,
            bindings,
            short_circuit: hooks.reply,
            plugin_notes: hooks.notes,
        })
    }

    /// The summary and memories relevant to the last few messages. Dry runs do not count as
    /// recalls. A conversation that is not stored yet has no summary.
    async fn recall(
        &self,
        user: &User,
        character: &Character,
        conversation: &Conversation,
        stored: bool,
        messages: &[Arc<StoredMessage>],
        dry_run: bool,
    ) -> Result<(Option<MemoryBlock>, Vec<crate::memory::RecalledMemory>), ApiError> {
        let query: Vec<&str> = messages
            .iter()
            .rev()
            .take(3)
            .map(|m| m.content.as_str())
            .collect();
        let query = query.join("\n");
        let cfg = self.memory.config();
        let (budget, top_k) = (cfg.budget_tokens, cfg.recall_top_k);
        // A conversation this turn starts has no rolling summary to read yet.
        let cid = stored.then_some(conversation.id.as_str());
        let recall = if dry_run {
            self.memory
                .recall_preview(user, character, cid, &query, budget, top_k)
                .await?
        } else {
            self.memory
                .recall(user, character, cid, &query, budget, top_k)
                .await?
        };
        let block = (!recall.block.summary.is_empty() || !recall.block.recalled.is_empty())
            .then_some(recall.block);
        Ok((block, recall.memories))
    }

    /// Prepares a regeneration of the conversation's last character reply (a new swipe).
    pub async fn prepare_regenerate(
        &self,
        user: &User,
        cid: &str,
        params: &InteractParams,
    ) -> Result<Prepared, ApiError> {
        let h = self.conversations.load_owned(cid, user)?;
        let character = self.interactable(&h.conversation.character_id, user)?;
        let Some(last) = h.messages.last() else {
            return Err(ApiError::validation(
                "conversation",
                "has no messages to regenerate",
            ));
        };
        if last.role != MessageRole::Character {
            return Err(ApiError::validation(
                "conversation",
                "the last message is not a character reply; send a message instead",
            ));
        }
        let earlier = &h.messages[..h.messages.len() - 1];
        let user_input = earlier
            .iter()
            .rev()
            .find(|m| m.role == MessageRole::User)
            .map(|m| m.content.clone())
            .unwrap_or_default();
        let mut conversation = h.conversation.clone();
        conversation.last_activity = crate::time::now_rfc3339();
        let (memory, recalled) = self
            .recall(
                user,
                &character,
                &conversation,
                true,
                earlier,
                params.dry_run,
            )
            .await?;
        let prompt = self.assemble(
            &character,
            &conversation,
            earlier,
            params,
            &[],
            memory.as_ref(),
        )?;
        let upstream = self
            .upstreams
            .get(params.upstream.as_deref())
            .map_err(upstream_error)?;
        let request = self.build_request(
            &character,
            &conversation,
            &prompt,
            &upstream,
            params,
            &user_input,
        );
        let bindings = self.enabled_bindings(&character)?;
        Ok(Prepared {
            user: user.clone(),
            character,
            conversation,
            previous: Some(h.conversation.clone()),
            pending: Vec::new(),
            prompt,
            request,
            upstream,
            target: ReplyTarget::Swipe(last.seq),
            swipe_base: Some(StoredMessage::clone(last)),
            idempotency: None,
            recalled,
            bindings,
            short_circuit: None,
            plugin_notes: Vec::new(),
        })
    }

    /// Assembles the prompt for `messages` (oldest first, the new user message last).
    pub fn assemble(
        &self,
        character: &Character,
        conversation: &Conversation,
        messages: &[Arc<StoredMessage>],
        params: &InteractParams,
        extra_sections: &[ExtraSection],
        memory: Option<&MemoryBlock>,
    ) -> Result<AssembledPrompt, ApiError> {
        let history: Vec<HistoryMessage> = messages
            .iter()
            .map(|m| HistoryMessage {
                role: role_of(m),
                name: m.name.as_str().into(),
                content: m.content.as_str().into(),
                tokens: m.tokens.map(|t| t as usize),
            })
            .collect();
        let lore_state: LoreState = if conversation.lore_state.is_null() {
            LoreState::default()
        } else {
            serde_json::from_value(conversation.lore_state.clone()).unwrap_or_default()
        };
        let lorebook = self.lorebook(character);
        let max_reply = params
            .max_tokens
            .map(|t| t as usize)
            .unwrap_or(self.prompt.max_reply_tokens)
            .min(self.prompt.max_context_tokens.saturating_sub(1));
        let options = PromptOptions {
            main_prompt: self.prompt.main_prompt.clone(),
            post_history_instructions: self.prompt.post_history_instructions.clone(),
            world_info_budget_percent: self.prompt.world_info_budget_percent,
        };
        let input = PromptInput {
            character,
            lorebook: lorebook.as_ref().as_ref(),
            user_name: &conversation.user_name,
            persona: params.persona.as_deref().unwrap_or(""),
            history: &history,
            memory,
            budget: Budget {
                max_context_tokens: self.prompt.max_context_tokens,
                max_reply_tokens: max_reply,
            },
            lore_state: &lore_state,
            rng_seed: rand::random(),
            conversation_seed: conversation.seed,
            now: chrono::Utc::now().fixed_offset(),
            extra_sections,
            options: &options,
        };
        Ok(assemble::assemble(&input, &self.tokenizer))
    }

    fn build_request(
        &self,
        character: &Character,
        conversation: &Conversation,
        prompt: &AssembledPrompt,
        upstream: &Upstream,
        params: &InteractParams,
        user_input: &str,
    ) -> GenerateRequest {
        let messages: Vec<ChatMessage> = prompt
            .messages
            .iter()
            .map(|m| ChatMessage::new(role_str(m.role), m.content.clone()))
            .collect();
        let (history, override_settings) = if upstream.kind() == UpstreamKind::Sillytavern {
            let split = assemble::to_sillytavern(prompt);
            // The last user turn travels as `userInput`, so it is not repeated in `history`.
            let mut history: Vec<ChatMessage> = split
                .history
                .iter()
                .map(|m| ChatMessage::new(role_str(m.role), m.content.clone()))
                .collect();
            if history
                .last()
                .is_some_and(|m| m.role == "user" && m.content == user_input)
            {
                history.pop();
            }
            let p = &character.personality;
            let settings = json!({
                "systemPrompt": split.system_prompt,
                "userName": conversation.user_name,
                "persona": params.persona,
                "character": {
                    "id": character.id,
                    "name": character.name,
                    "nickname": p.nickname,
                    "description": character.description,
                    "personality": p.personality,
                    "scenario": character.scenario,
                    "firstMes": character.first_mes,
                    "mesExample": character.mes_example,
                    "systemPrompt": p.system_prompt,
                    "postHistoryInstructions": p.post_history_instructions,
                    "alternateGreetings": p.alternate_greetings,
                    "tags": character.tags,
                },
                "characterState": conversation.character_state,
            });
            (history, Some(settings))
        } else {
            (Vec::new(), None)
        };
        GenerateRequest {
            character_id: character.id.clone(),
            messages,
            user_input: user_input.to_string(),
            history,
            params: GenParams {
                temperature: params.temperature,
                top_p: params.top_p,
                top_k: params.top_k,
                max_tokens: Some(
                    params
                        .max_tokens
                        .unwrap_or(self.prompt.max_reply_tokens as u32),
                ),
                stop: params.stop.clone().unwrap_or_default(),
                model: params.model.clone(),
            },
            override_settings,
        }
    }

    /// The dry-run answer: the exact messages, per-section tokens and lorebook report.
    pub fn dry_run_json(&self, p: &Prepared) -> Value {
        json!({
            "dryRun": true,
            "conversationId": p.previous.as_ref().map(|c| c.id.clone()),
            "upstream": p.upstream.name(),
            "model": p.request.params.model.clone().unwrap_or_else(|| p.upstream.default_model().to_string()),
            "messages": p.request.messages,
            "request": p.request,
            "itemization": p.prompt.itemization,
            "memory": p.recalled.iter().map(|m| json!({
                "id": m.id, "content": m.content, "score": m.score, "kind": m.kind, "scope": m.scope,
            })).collect::<Vec<_>>(),
        })
    }

    /// Stores the user message (and greeting) of a prepared turn.
    pub async fn save_pending(&self, p: &Prepared) -> Result<Arc<History>, ApiError> {
        self.conversations
            .save(
                p.conversation.clone(),
                p.previous.clone(),
                p.pending.clone(),
                vec![],
                0,
            )
            .await
    }

    /// Stores a generated (or partial) reply after `save_pending` stored the user message, and
    /// returns the stored message and history.
    pub async fn finish(
        &self,
        p: &Prepared,
        generated: Generated,
    ) -> Result<(StoredMessage, Arc<History>), ApiError> {
        self.store_reply(p, generated, false).await
    }

    /// Stores a reply; with `with_pending` the turn's user message (and greeting) go in the same
    /// durable commit, replacing the record as it was before the turn.
    async fn store_reply(
        &self,
        p: &Prepared,
        generated: Generated,
        with_pending: bool,
    ) -> Result<(StoredMessage, Arc<History>), ApiError> {
        let mut conversation = p.conversation.clone();
        conversation.lore_state =
            serde_json::to_value(&p.prompt.itemization.lore_state).unwrap_or(Value::Null);
        if generated.character_state.is_some() {
            conversation.character_state = generated.character_state.clone();
        }
        conversation.last_activity = crate::time::now_rfc3339();
        let tokens = self.tokenizer.count(&generated.content) as u32;
        let usage = if generated.usage.total_tokens > 0 {
            generated.usage
        } else {
            let prompt_tokens = p.prompt.itemization.total_tokens as u64;
            TokenUsage {
                prompt_tokens,
                completion_tokens: u64::from(tokens),
                total_tokens: prompt_tokens + u64::from(tokens),
            }
        };
        let char_name = char_display_name(&p.character).to_string();
        let message = match p.target {
            ReplyTarget::NewMessage(seq) => {
                let mut m = new_message(
                    seq,
                    MessageRole::Character,
                    &char_name,
                    generated.content.clone(),
                );
                conversation.message_count += 1;
                conversation.next_seq = conversation.next_seq.max(seq + 1);
                m.generated = true;
                m.model = Some(generated.model.clone());
                m.usage = Some(usage);
                m.finish_reason = Some(generated.finish_reason.clone());
                m.tokens = Some(tokens);
                m
            }
            ReplyTarget::Swipe(_) => {
                let mut m = p
                    .swipe_base
                    .clone()
                    .ok_or_else(|| ApiError::internal("regenerate without a base message"))?;
                if m.swipes.is_empty() {
                    m.swipes.push(m.content.clone());
                }
                m.swipes.push(generated.content.clone());
                m.swipe_id = m.swipes.len() - 1;
                m.content = generated.content.clone();
                m.timestamp = crate::time::now_rfc3339();
                m.generated = true;
                m.model = Some(generated.model.clone());
                m.usage = Some(usage);
                m.finish_reason = Some(generated.finish_reason.clone());
                m.tokens = Some(tokens);
                m
            }
        };
        let (previous, mut upserts) = if with_pending {
            (p.previous.clone(), p.pending.clone())
        } else if matches!(p.target, ReplyTarget::Swipe(_)) {
            (
                Some(p.previous.clone().unwrap_or_else(|| p.conversation.clone())),
                Vec::new(),
            )
        } else {
            // The user message was saved by `save_pending`; this save replaces that record.
            (Some(p.conversation.clone()), Vec::new())
        };
        upserts.push(message.clone());
        let history = self
            .conversations
            .save(conversation, previous, upserts, vec![], 1)
            .await?;
        // Rolling summaries run in the background and never delay this reply.
        self.memory.note_turn(
            &p.user,
            &p.character,
            &history.conversation.id,
            &history.messages,
        );
        Ok((message, history))
    }

    /// A whole (non-streaming) turn or regeneration, as the spec's
    /// CharacterInteractionResponse.
    pub async fn run(&self, p: Prepared) -> Result<Value, ApiError> {
        Ok(self.run_turn(p).await?.response_json())
    }

    /// A whole (non-streaming) turn or regeneration. The user message and the reply are stored
    /// in one durable commit before the response (a turn waits for one commit, not two); when
    /// no reply comes (upstream failure, a plugin veto) the user message is stored on its own.
    pub async fn run_turn(&self, p: Prepared) -> Result<Turn, ApiError> {
        let outcome = async {
            let generated = match &p.short_circuit {
                Some((plugin, reply)) => plugin_reply(plugin, reply),
                None => p
                    .upstream
                    .generate(&p.request)
                    .await
                    .map(Generated::from)
                    .map_err(upstream_error)?,
            };
            self.after_hooks(&p, generated).await
        }
        .await;
        let (generated, after) = match outcome {
            Ok(done) => done,
            Err(e) => {
                if !p.pending.is_empty() {
                    self.save_pending(&p).await?;
                }
                return Err(e);
            }
        };
        let with_pending = !p.pending.is_empty();
        let (message, history) = self.store_reply(&p, generated, with_pending).await?;
        Ok(Turn {
            plugins: plugin_meta(&p, &after),
            message,
            history,
        })
    }

    fn enabled_bindings(
        &self,
        c: &Character,
    ) -> Result<Vec<crate::store::PluginBindingRecord>, ApiError> {
        let Some(key) = store::parse_id(&c.id) else {
            return Ok(Vec::new());
        };
        Ok(self
            .store
            .plugin_bindings(key)?
            .into_iter()
            .filter(|b| b.enabled)
            .collect())
    }

    fn call_context(
        &self,
        character: &Character,
        conversation: &Conversation,
        messages: &[Arc<StoredMessage>],
        plugin: &str,
        recall: Option<crate::plugins::RecallFn>,
    ) -> crate::plugins::CallContext {
        let recent = messages.len().saturating_sub(20);
        crate::plugins::CallContext {
            conversation_id: conversation.id.clone(),
            character: crate::plugins::PluginCharacter::from_character(character),
            user_name: conversation.user_name.clone(),
            user_message: messages
                .iter()
                .rev()
                .find(|m| m.role == MessageRole::User)
                .map(|m| m.content.clone())
                .unwrap_or_default(),
            history: messages[recent..]
                .iter()
                .map(|m| crate::plugins::HistoryMessage {
                    role: role_str(role_of(m)).to_string(),
                    name: Some(m.name.clone()),
                    content: m.content.clone(),
                })
                .collect(),
            state: conversation.plugin_state.get(plugin).map(|v| v.to_string()),
            seed: rand::random(),
            recall,
        }
    }

    /// The plugins' `recall` import for this user and character. A failure to load the memory
    /// index leaves plugins without recall rather than failing the turn.
    async fn plugin_recall(
        &self,
        user: &User,
        character: &Character,
    ) -> Option<crate::plugins::RecallFn> {
        match self.memory.lookup(user, character).await {
            Ok(f) => Some(Arc::new(move |q: &str, limit: u32| f(q, limit as usize))),
            Err(e) => {
                tracing::warn!(error = %e.message, "plugin recall unavailable");
                None
            }
        }
    }

    /// Runs every bound plugin's before-generate in order. Fail-open failures are noted;
    /// a fail-closed failure ends the turn with PLUGIN_FAILED.
    async fn before_hooks(
        &self,
        user: &User,
        bindings: &[crate::store::PluginBindingRecord],
        character: &Character,
        conversation: &mut Conversation,
        messages: &mut [Arc<StoredMessage>],
        prompt: &AssembledPrompt,
    ) -> Result<BeforeHooks, ApiError> {
        let mut out = BeforeHooks::default();
        let recall = self.plugin_recall(user, character).await;
        let mut current: Vec<crate::plugins::PromptMessage> = prompt
            .messages
            .iter()
            .map(|m| crate::plugins::PromptMessage {
                role: role_str(m.role).to_string(),
                content: m.content.clone(),
            })
            .collect();
        for b in bindings {
            let ctx = crate::plugins::BeforeContext {
                base: self.call_context(character, conversation, messages, &b.name, recall.clone()),
                prompt: current.clone(),
            };
            let binding = crate::plugins::Binding {
                name: b.name.clone(),
                config: b.config.clone(),
            };
            match self.plugins.before_generate(&binding, &ctx).await {
                Ok(o) => {
                    if let Some(state) = o.state {
                        let v = serde_json::from_str(&state).unwrap_or(Value::String(state));
                        conversation.plugin_state.insert(b.name.clone(), v);
                    }
                    if let Some(text) = o.user_message {
                        if let Some(last) = messages.last_mut() {
                            Arc::make_mut(last).content = text.clone();
                        }
                        out.user_message = Some(text);
                    }
                    for section in o.sections {
                        out.sections.push(ExtraSection {
                            name: format!("plugin:{}", b.name),
                            content: section.content,
                            role: match section.role.as_str() {
                                "user" => Role::User,
                                "assistant" => Role::Assistant,
                                _ => Role::System,
                            },
                            position: match section.position {
                                crate::plugins::SectionPosition::AfterHistory => {
                                    assemble::SectionPosition::AfterHistory
                                }
                                crate::plugins::SectionPosition::Depth(d) => {
                                    assemble::SectionPosition::Depth(d as usize)
                                }
                                _ => assemble::SectionPosition::BeforeHistory,
                            },
                        });
                    }
                    if let Some(p) = o.prompt {
                        current = p;
                        out.prompt = Some(
                            current
                                .iter()
                                .map(|m| assemble::PromptMessage {
                                    role: match m.role.as_str() {
                                        "user" => Role::User,
                                        "assistant" => Role::Assistant,
                                        _ => Role::System,
                                    },
                                    content: m.content.clone(),
                                })
                                .collect(),
                        );
                    }
                    out.memories.extend(o.memories);
                    if let Some(reply) = o.reply {
                        out.reply = Some((b.name.clone(), reply));
                        break;
                    }
                }
                Err(f) if f.is_fail_open() => out
                    .notes
                    .push(serde_json::to_value(&f).unwrap_or(Value::Null)),
                Err(f) => return Err(plugin_failed(&f)),
            }
        }
        Ok(out)
    }

    /// Runs every bound plugin's after-generate on the reply, in order; a veto stops the chain.
    pub async fn after_hooks(
        &self,
        p: &Prepared,
        mut generated: Generated,
    ) -> Result<(Generated, AfterReport), ApiError> {
        let mut report = AfterReport::default();
        if p.bindings.is_empty() {
            return Ok((generated, report));
        }
        let history: Vec<Arc<StoredMessage>> =
            match self.conversations.load_owned(&p.conversation.id, &p.user) {
                Ok(h) => h.messages.clone(),
                Err(_) => p.pending.iter().cloned().map(Arc::new).collect(),
            };
        let recall = self.plugin_recall(&p.user, &p.character).await;
        for b in &p.bindings {
            let ctx = self.call_context(
                &p.character,
                &p.conversation,
                &history,
                &b.name,
                recall.clone(),
            );
            let binding = crate::plugins::Binding {
                name: b.name.clone(),
                config: b.config.clone(),
            };
            match self
                .plugins
                .after_generate(&binding, &ctx, &generated.content)
                .await
            {
                Ok(o) => {
                    self.remember_from_plugins(
                        &p.user,
                        &p.character,
                        &p.conversation.id,
                        o.memories,
                    );
                    match o.action {
                        crate::plugins::ReplyAction::Keep => {}
                        crate::plugins::ReplyAction::Rewrite(text) => {
                            generated.content = text;
                            report.replaced = true;
                        }
                        crate::plugins::ReplyAction::Veto(reason) => {
                            generated.content = format!("[reply withheld: {reason}]");
                            generated.finish_reason = "vetoed".into();
                            report.vetoed = Some(json!({"plugin": b.name, "reason": reason}));
                            break;
                        }
                    }
                }
                Err(f) if f.is_fail_open() => report
                    .notes
                    .push(serde_json::to_value(&f).unwrap_or(Value::Null)),
                Err(f) => return Err(plugin_failed(&f)),
            }
        }
        Ok((generated, report))
    }
}

fn next_seq(conversation: &Conversation, messages: &[Arc<StoredMessage>]) -> u64 {
    let after_last = messages.last().map(|m| m.seq + 1).unwrap_or(0);
    conversation.next_seq.max(after_last)
}

/// The spec's CharacterInteractionResponse for a stored reply.
pub fn response_json(message: &StoredMessage, history: &History) -> Value {
    let usage = message.usage.unwrap_or_default();
    let c = &history.conversation;
    json!({
        "response": crate::http::conversations::message_json(message, c),
        "conversationId": c.id,
        "context": {
            "conversationId": c.id,
            "characterId": c.character_id,
            "userId": c.user_id,
            "currentMes": history.messages.len(),
            "messageCount": c.message_count,
            "sessionId": c.id,
            "startedAt": c.started_at,
            "lastActivity": c.last_activity,
            "characterState": c.character_state,
            "lorebook": c.lore_state,
            "settings": { "userName": c.user_name },
        },
        "usage": usage,
    })
}

/// A finished whole turn: the stored reply, the conversation after it, and the plugin marker.
pub struct Turn {
    pub message: StoredMessage,
    pub history: Arc<History>,
    /// The response's `plugins` field, if any.
    pub plugins: Option<Value>,
}

impl Turn {
    /// The spec's CharacterInteractionResponse.
    pub fn response_json(self) -> Value {
        let mut v = response_json(&self.message, &self.history);
        if let Some(plugins) = self.plugins {
            v["plugins"] = plugins;
        }
        v
    }
}

/// A stable hash of a request body, to recognise a reused Idempotency-Key.
pub fn request_hash(parts: &[&str]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

/// What a streamed generation tells its client, in order: deltas, then exactly one of done or
/// error.
#[derive(Debug, Clone)]
pub enum GenEvent {
    /// Next piece of the reply.
    Delta(String),
    /// The stored reply: the spec's CharacterInteractionResponse.
    Done(Value),
    /// The generation failed; a partial reply (if any) was stored with `finishReason: "error"`.
    /// Boxed: the channel's slots are as large as the largest event, and errors are rare.
    Error(Box<ApiError>),
    /// The generation was cancelled; the partial reply (if any) was stored with
    /// `finishReason: "cancelled"` and is given here.
    Cancelled(Option<Value>),
}

impl InteractService {
    /// Streams a prepared generation on a task of its own; its events arrive on the returned
    /// receiver (a bounded channel, so a slow client slows the upstream read instead of growing
    /// a buffer). When the receiver goes away or the returned token is cancelled, the upstream
    /// stream is dropped at once (which aborts the upstream request) and the partial reply is
    /// stored with `finishReason: "cancelled"`.
    pub async fn start_stream(
        &self,
        p: Prepared,
    ) -> (
        tokio::sync::mpsc::Receiver<GenEvent>,
        tokio_util::sync::CancellationToken,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        let cancel = tokio_util::sync::CancellationToken::new();
        // Boxed before the spawn: the task lives as long as the stream, and both the spawned
        // block and the async fn would otherwise hold the whole turn inline.
        let p = Box::new(p);
        let service = self.clone();
        let task_cancel = cancel.clone();
        tokio::spawn(async move { service.run_stream(p, tx, task_cancel).await });
        // The caller goes on to write the response head, which no client waits for; yielding
        // lets the new task send the upstream request first (~0.1 ms sooner to the first
        // delta on an idle server, docs/BENCHMARKS.md #9).
        tokio::task::yield_now().await;
        (rx, cancel)
    }

    /// The generation task of [`InteractService::start_stream`].
    async fn run_stream(
        &self,
        mut p: Box<Prepared>,
        tx: tokio::sync::mpsc::Sender<GenEvent>,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        use futures_util::StreamExt;
        if let Some((plugin, reply)) = p.short_circuit.clone() {
            let saved = if p.pending.is_empty() {
                Ok(None)
            } else {
                Box::pin(self.save_pending(&p)).await.map(Some)
            };
            if let Err(e) = saved {
                let _ = tx.send(GenEvent::Error(Box::new(e))).await;
                return;
            }
            let _ = tx.send(GenEvent::Delta(reply.clone())).await;
            let event =
                match Box::pin(self.finish_with_hooks(&p, plugin_reply(&plugin, &reply))).await {
                    Ok(v) => GenEvent::Done(v),
                    Err(e) => GenEvent::Error(Box::new(e)),
                };
            let _ = tx.send(event).await;
            return;
        }
        let started = tokio::time::Instant::now();
        // The user message commits while the upstream opens and produces its first event; that
        // event is held until the commit is done, so nothing reaches the client before it.
        // The upstream is polled first: its request is on its way before the commit, which
        // may run inline on this thread and hold the task until it is done.
        let (opened, saved) = tokio::join!(
            biased;
            async {
                let mut upstream = Box::pin(p.upstream.stream(&p.request)).await?;
                let first = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => None,
                    _ = tx.closed() => None,
                    next = upstream.next() => Some(next),
                };
                Ok::<_, crate::upstream::UpstreamError>((upstream, first))
            },
            async {
                if p.pending.is_empty() {
                    Ok(None)
                } else {
                    Box::pin(self.save_pending(&p)).await.map(Some)
                }
            }
        );
        if let Err(e) = saved {
            let _ = tx.send(GenEvent::Error(Box::new(e))).await;
            return;
        }
        let (mut upstream, mut first) = match opened {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(GenEvent::Error(Box::new(upstream_error(e)))).await;
                return;
            }
        };
        p.release_prompt();
        let mut partial = String::new();
        // Made once: a fresh `cancelled()`/`closed()` per event would register and unregister a
        // waiter (two locks) for every delta.
        let cancelled = cancel.cancelled();
        let closed = tx.closed();
        tokio::pin!(cancelled, closed);
        let outcome: Result<Generated, (String, Option<ApiError>)> = loop {
            let next = match first.take() {
                Some(next) => next,
                None => tokio::select! {
                    biased;
                    _ = &mut cancelled => break Err(("cancelled".into(), None)),
                    _ = &mut closed => break Err(("cancelled".into(), None)),
                    next = upstream.next() => next,
                },
            };
            match next {
                Some(Ok(crate::upstream::StreamEvent::Delta(d))) => {
                    partial.push_str(&d);
                    tokio::select! {
                        biased;
                        _ = &mut cancelled => break Err(("cancelled".into(), None)),
                        sent = tx.send(GenEvent::Delta(d)) => {
                            if sent.is_err() {
                                break Err(("cancelled".into(), None));
                            }
                        }
                    }
                }
                Some(Ok(crate::upstream::StreamEvent::Done(result))) => break Ok(result.into()),
                Some(Err(e)) => break Err(("error".into(), Some(upstream_error(e)))),
                None => {
                    break Err((
                        "error".into(),
                        Some(ApiError::new(
                            ErrorCode::StGenerationFailed,
                            "upstream stream ended without a final result",
                        )),
                    ))
                }
            }
        };
        // Dropping the upstream stream aborts the upstream request before anything is stored.
        drop(upstream);
        match outcome {
            Ok(generated) => {
                let event = match Box::pin(self.finish_with_hooks(&p, generated)).await {
                    Ok(v) => GenEvent::Done(v),
                    Err(e) => GenEvent::Error(Box::new(e)),
                };
                let _ = tx.send(event).await;
            }
            Err((reason, error)) => {
                let generated = Generated {
                    content: partial,
                    model: p
                        .request
                        .params
                        .model
                        .clone()
                        .unwrap_or_else(|| p.upstream.default_model().to_string()),
                    usage: TokenUsage::default(),
                    finish_reason: reason,
                    character_state: None,
                    generation_time_ms: started.elapsed().as_millis() as u64,
                };
                // A partial reply is kept only when something was generated.
                let stored = if generated.content.is_empty() {
                    Ok(None)
                } else {
                    Box::pin(self.finish(&p, generated))
                        .await
                        .map(|(m, h)| Some(response_json(&m, &h)))
                };
                let response = match stored {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not store partial reply");
                        None
                    }
                };
                let _ = match error {
                    Some(e) => tx.send(GenEvent::Error(Box::new(e))).await,
                    None => tx.send(GenEvent::Cancelled(response)).await,
                };
            }
        }
    }
}

/// What the before-generate plugins decided.
#[derive(Default)]
struct BeforeHooks {
    user_message: Option<String>,
    sections: Vec<ExtraSection>,
    prompt: Option<Vec<assemble::PromptMessage>>,
    memories: Vec<crate::plugins::MemoryEntry>,
    reply: Option<(String, String)>,
    notes: Vec<Value>,
}

/// What the after-generate plugins did to a reply.
#[derive(Debug, Default)]
pub struct AfterReport {
    /// A plugin rewrote the reply: what the client finally gets (and what is stored) differs
    /// from the streamed deltas.
    pub replaced: bool,
    /// A plugin vetoed the reply: `{plugin, reason}`.
    pub vetoed: Option<Value>,
    /// Fail-open failures.
    pub notes: Vec<Value>,
}

impl InteractService {
    /// Stores memories plugins asked to keep, in the background (source `plugin`).
    fn remember_from_plugins(
        &self,
        user: &User,
        character: &Arc<Character>,
        conversation_id: &str,
        entries: Vec<crate::plugins::MemoryEntry>,
    ) {
        if entries.is_empty() {
            return;
        }
        let memory = self.memory.clone();
        let (user, character, cid) = (user.clone(), character.clone(), conversation_id.to_string());
        tokio::spawn(async move {
            for e in entries {
                let entry = crate::memory::PluginMemory {
                    content: e.content,
                    kind: crate::memory::types::MemoryKind::parse(&e.kind)
                        .unwrap_or(crate::memory::types::MemoryKind::Note),
                    importance: f64::from(e.importance).clamp(0.0, 1.0),
                    tags: e.tags,
                };
                if let Err(err) = memory
                    .add_from_plugin(&user, &character, Some(&cid), entry)
                    .await
                {
                    tracing::warn!(error = %err, "could not store a plugin memory");
                }
            }
        });
    }
}

fn plugin_reply(plugin: &str, reply: &str) -> Generated {
    Generated {
        content: reply.to_string(),
        model: format!("plugin:{plugin}"),
        usage: TokenUsage::default(),
        finish_reason: "stop".into(),
        character_state: None,
        generation_time_ms: 0,
    }
}

fn plugin_failed(f: &crate::plugins::PluginFailure) -> ApiError {
    ApiError::new(
        ErrorCode::PluginFailed,
        format!("plugin {} failed in {}: {}", f.plugin, f.hook, f.message),
    )
    .with_details(serde_json::to_value(f).unwrap_or(Value::Null))
}

/// The response's `plugins` marker, when the character has plugins or some were skipped.
fn plugin_meta(p: &Prepared, after: &AfterReport) -> Option<Value> {
    let mut notes = p.plugin_notes.clone();
    notes.extend(after.notes.iter().cloned());
    if p.bindings.is_empty() && notes.is_empty() {
        return None;
    }
    Some(json!({
        "shortCircuit": p.short_circuit.as_ref().map(|(name, _)| name),
        "replaced": after.replaced,
        "vetoed": after.vetoed,
        "skipped": notes,
    }))
}

impl InteractService {
    /// after-generate, then store; the response carries the plugin markers.
    async fn finish_with_hooks(
        &self,
        p: &Prepared,
        generated: Generated,
    ) -> Result<Value, ApiError> {
        let (generated, after) = self.after_hooks(p, generated).await?;
        let (message, history) = self.finish(p, generated).await?;
        Ok(Turn {
            plugins: plugin_meta(p, &after),
            message,
            history,
        }
        .response_json())
    }
}
