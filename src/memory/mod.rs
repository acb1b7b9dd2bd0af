//! Long-term memory: the memory API's domain logic (validation, scopes, access), recall into
//! the prompt, and the background summarizer. Knows nothing of HTTP; storage goes through
//! `Store`, generation through `Upstreams`.
//!
//! # Layout
//! - [`types`]: `ConversationMemory`, `MemorySummary` and the summarizer state.
//! - [`rank`]: the BM25 index and the documented relevance + importance + recency score. Pure.
//! - [`embed`]: optional embeddings (OpenAI-compatible `/embeddings`) and cosine similarity.
//! - [`summarize`]: summarizer and fact-extraction prompts and reply parsing. Pure.
//!
//! # Scopes
//! Every user has a private memory with each character (`scope: "user"`, keyed by the user), and
//! each character has one shared memory (`scope: "character"`) used in every user's
//! conversations, managed by its owner or an admin. A private memory is only ever addressed
//! under the caller's own key, so nobody — not the character's owner, not an admin — can read or
//! change another user's private memories.
//!
//! # Recall hot path
//! One BM25 index per (character, user) covering both scopes is cached in moka. Writes through
//! this service update a cached index in place or mark it stale with a generation counter, so a
//! recall never sees an index older than the last acknowledged write. `recallCount` and
//! `lastRecalledAt` are written by a background task after the recall has returned. With an
//! embeddings upstream, memories are embedded in the background on write and the query's
//! embedding is awaited for at most `embed_timeout_ms`, falling back to BM25 alone.

pub mod embed;
pub mod rank;
pub mod summarize;
pub mod types;

use crate::auth::User;
use crate::characters::{blocking, can_edit, can_view, CharacterService};
use crate::error::ApiError;
use crate::model::{Character, MessageRole, StoredMessage};
use crate::prompt::assemble::MemoryBlock;
use crate::prompt::tokens::Tokenizer;
use crate::store::{self, Store, SHARED_MEMORY};
use crate::upstream::Upstreams;
use rank::MemoryIndex;
pub use rank::RecalledMemory;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use types::{
    ConversationMemory, MemoryKind, MemoryScope, MemorySource, MemorySummary, SummaryState,
};
use uuid::Uuid;

/// Longest memory content in bytes.
pub const MAX_CONTENT_BYTES: usize = 8 * 1024;
/// Most tags on one memory.
pub const MAX_TAGS: usize = 32;
/// Longest tag in characters.
pub const MAX_TAG_CHARS: usize = 64;
/// Largest page of the memory listing.
pub const MAX_LIMIT: usize = 500;

/// The `[memory]` config section (documented in `config/taproom.toml`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Summarize a conversation every this many user turns; 0 disables the summarizer.
    pub summarize_every_turns: u32,
    /// After each summary, also ask the upstream for durable facts and store them as
    /// `kind: fact`, `source: auto` memories.
    pub extract_facts: bool,
    /// Most memories recalled into one prompt.
    pub recall_top_k: usize,
    /// Tokens the summary plus the recalled memories may take in one prompt.
    pub budget_tokens: usize,
    /// Longest summary asked for, in words.
    pub summary_max_words: u32,
    /// Most recent messages sent to the summarizer in one call.
    pub summary_window_messages: usize,
    /// (character, user) recall indexes kept in memory.
    pub index_cache_capacity: u64,
    /// Name of an upstream with an OpenAI-compatible `/embeddings` endpoint; when set, memories
    /// are embedded in the background on write (vectors stored in redb) and semantic
    /// similarity joins the recall score. Unset: BM25 only.
    pub embeddings_upstream: Option<String>,
    /// Longest wait for the query embedding during a recall; past it the recall uses BM25
    /// only, so a slow embeddings server never stalls a turn.
    pub embed_timeout_ms: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            summarize_every_turns: 10,
            extract_facts: false,
            recall_top_k: 8,
            budget_tokens: 512,
            summary_max_words: 200,
            summary_window_messages: 40,
            index_cache_capacity: 1024,
            embeddings_upstream: None,
            embed_timeout_ms: 500,
        }
    }
}

/// A memory as a client sends it in `POST /api/characters/{id}/memory`; every field optional
/// so that validation can name exactly what is missing or wrong.
#[derive(Debug, Clone, Default)]
pub struct MemoryInput {
    pub id: Option<String>,
    pub content: Option<String>,
    pub kind: Option<String>,
    pub importance: Option<f64>,
    pub tags: Option<Vec<String>>,
    pub scope: Option<String>,
    pub conversation_id: Option<String>,
}

/// A memory a plugin adds.
#[derive(Debug, Clone)]
pub struct PluginMemory {
    pub content: String,
    pub kind: MemoryKind,
    /// 0..=1.
    pub importance: f64,
    pub tags: Vec<String>,
}

/// What `POST` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryOperation {
    Add,
    Update,
    Remove,
}

impl MemoryOperation {
    /// Parses the spec's `operation`.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        match s {
            "add" => Ok(Self::Add),
            "update" => Ok(Self::Update),
            "remove" => Ok(Self::Remove),
            _ => Err(ApiError::validation(
                "operation",
                "must be one of add, update, remove",
            )),
        }
    }
}

/// A listing request, as parsed from the query string.
#[derive(Debug, Clone, Default)]
pub struct MemoryQuery {
    pub scope: Option<String>,
    pub kind: Option<String>,
    pub search: Option<String>,
    pub conversation_id: Option<String>,
    pub limit: Option<usize>,
    pub offset: Option<usize>,
}

/// The spec's MemoryStatistics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemoryStatistics {
    pub by_kind: BTreeMap<&'static str, u64>,
    pub by_scope: BTreeMap<&'static str, u64>,
    pub total: u64,
    pub total_tokens: u64,
    pub last_summarized_message: Option<u64>,
    pub last_recall_at: Option<String>,
}

/// The spec's MemoryResponse.
#[derive(Debug, Clone)]
pub struct MemoryView {
    pub memory: Vec<ConversationMemory>,
    pub summary: MemorySummary,
    pub statistics: MemoryStatistics,
}

/// What a turn gets from memory.
#[derive(Debug, Clone, Default)]
pub struct Recall {
    /// The conversation's rolling summary, if one was written yet.
    pub summary: Option<String>,
    /// Recalled memories, best first.
    pub memories: Vec<RecalledMemory>,
    /// The same, in the shape `prompt::assemble` takes.
    pub block: MemoryBlock,
}

/// A cached index and the write generations it reflects.
struct CachedIndex {
    /// (shared-memory generation, user-memory generation) when built or last updated.
    generation: (u64, u64),
    index: MemoryIndex,
}

type IndexKey = (u128, String);

struct Inner {
    store: Store,
    characters: CharacterService,
    upstreams: Arc<Upstreams>,
    tokenizer: Arc<Tokenizer>,
    config: MemoryConfig,
    /// Recall indexes by (character, user). RwLock because recalls read concurrently and
    /// writes patch in place; no lock is held across an await.
    indexes: moka::sync::Cache<IndexKey, Arc<RwLock<CachedIndex>>>,
    /// Write generations by (character, scope user); `""` is the shared memory. Never evicted
    /// (one integer per key) so a stale index can always be recognized.
    generations: Mutex<HashMap<IndexKey, u64>>,
    /// Conversations whose summarizer is running, so a burst of turns starts it only once.
    in_flight: Mutex<HashSet<(u128, String, u128)>>,
}

/// The memory service. Cheap to clone.
#[derive(Clone)]
pub struct MemoryService {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these small maps leaves it consistent; keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn character_key(c: &Character) -> Result<u128, ApiError> {
    store::parse_id(&c.id).ok_or_else(|| ApiError::character_not_found(&c.id))
}

impl MemoryService {
    /// A service over the store, with the upstreams the summarizer calls.
    pub fn new(
        store: Store,
        characters: CharacterService,
        upstreams: Arc<Upstreams>,
        tokenizer: Arc<Tokenizer>,
        config: MemoryConfig,
    ) -> Self {
        let indexes = moka::sync::Cache::builder()
            .max_capacity(config.index_cache_capacity.max(1))
            .build();
        Self {
            inner: Arc::new(Inner {
                store,
                characters,
                upstreams,
                tokenizer,
                config,
                indexes,
                generations: Mutex::new(HashMap::new()),
                in_flight: Mutex::new(HashSet::new()),
            }),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &MemoryConfig {
        &self.inner.config
    }

    // ---- API: list and change -------------------------------------------------------------

    /// `GET /api/characters/{id}/memory`: the caller's private memories plus the character's
    /// shared ones, filtered and paged, with the newest summary and statistics.
    pub async fn list(
        &self,
        user: &User,
        character_id: &str,
        q: MemoryQuery,
    ) -> Result<MemoryView, ApiError> {
        let character = self.inner.characters.get(character_id, Some(user))?;
        let key = character_key(&character)?;
        let scope =
            match q.scope.as_deref().filter(|s| !s.is_empty() && *s != "all") {
                Some(s) => Some(MemoryScope::parse(s).ok_or_else(|| {
                    ApiError::validation("scope", "must be user, character or all")
                })?),
                None => None,
            };
        let kind = match q.kind.as_deref().filter(|s| !s.is_empty()) {
            Some(k) => Some(MemoryKind::parse(k).ok_or_else(|| {
                ApiError::validation(
                    "kind",
                    "must be one of fact, event, preference, summary, note",
                )
            })?),
            None => None,
        };
        let limit = q.limit.unwrap_or(50);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(ApiError::validation(
                "limit",
                format!("must be 1..={MAX_LIMIT}"),
            ));
        }
        let offset = q.offset.unwrap_or(0);
        let conversation = match q.conversation_id.as_deref().filter(|s| !s.is_empty()) {
            Some(c) => Some(
                store::parse_id(c)
                    .ok_or_else(|| ApiError::validation("conversationId", "must be a UUID"))?,
            ),
            None => None,
        };

        let store = self.inner.store.clone();
        let uid = user.id.clone();
        let (own, shared, states) = blocking(move || {
            Ok((
                store.list_memories(key, &uid)?,
                store.list_memories(key, SHARED_MEMORY)?,
                store.summary_states(key, &uid)?,
            ))
        })
        .await?;

        let mut statistics = statistics(own.iter().chain(shared.iter()));
        let summary = states
            .into_iter()
            .filter(|(cid, _)| conversation.is_none_or(|c| c == *cid))
            .filter_map(|(_, s)| s.summary)
            .max_by(|a, b| a.updated_at.cmp(&b.updated_at))
            .unwrap_or_default();
        statistics.last_summarized_message =
            (!summary.conversation_id.is_empty()).then_some(summary.last_summarized_message);

        let mut visible: Vec<ConversationMemory> = own
            .into_iter()
            .chain(shared)
            .filter(|m| scope.is_none_or(|s| m.scope == s))
            .filter(|m| kind.is_none_or(|k| m.kind == k))
            .collect();
        let search = q.search.as_deref().map(str::trim).filter(|s| !s.is_empty());
        match search {
            Some(text) => {
                // Relevance order from the same BM25 index recall uses.
                let cached = self.index_for(key, &user.id).await?;
                let order: HashMap<u128, usize> = {
                    let guard = cached
                        .read()
                        .map_err(|_| ApiError::internal("memory index lock poisoned"))?;
                    guard
                        .index
                        .search(text)
                        .into_iter()
                        .enumerate()
                        .map(|(rank, (id, _))| (id, rank))
                        .collect()
                };
                visible
                    .retain(|m| store::parse_id(&m.id).is_some_and(|id| order.contains_key(&id)));
                visible
                    .sort_by_key(|m| store::parse_id(&m.id).and_then(|id| order.get(&id).copied()));
            }
            // Newest first; ids are UUID v7 so they order by creation.
            None => visible.sort_by(|a, b| b.id.cmp(&a.id)),
        }
        let memory = visible.into_iter().skip(offset).take(limit).collect();
        Ok(MemoryView {
            memory,
            summary,
            statistics,
        })
    }

    /// `POST /api/characters/{id}/memory`: add, update or remove one entry.
    pub async fn apply(
        &self,
        user: &User,
        character_id: &str,
        operation: MemoryOperation,
        input: MemoryInput,
    ) -> Result<ConversationMemory, ApiError> {
        let character = self.inner.characters.get(character_id, Some(user))?;
        match operation {
            MemoryOperation::Add => {
                let scope = parse_scope(input.scope.as_deref())?.unwrap_or(MemoryScope::User);
                self.authorize_write(&character, user, scope)?;
                let entry = self.new_entry(&input, scope, MemorySource::User)?;
                self.insert(&character, user, vec![entry])
                    .await
                    .map(|mut v| v.remove(0))
            }
            MemoryOperation::Update => {
                let (scope, _id, mut current) = self.find(&character, user, &input).await?;
                self.authorize_write(&character, user, scope)?;
                if let Some(content) = &input.content {
                    current.content = validate_content(content)?;
                    current.tokens = self.count_tokens(&current.content);
                }
                if let Some(kind) = &input.kind {
                    current.kind = parse_kind(kind)?;
                }
                if let Some(importance) = input.importance {
                    current.importance = validate_importance(importance)?;
                }
                if let Some(tags) = &input.tags {
                    current.tags = validate_tags(tags)?;
                }
                if let Some(cid) = &input.conversation_id {
                    current.conversation_id = validate_conversation(Some(cid))?;
                }
                current.updated_at = crate::time::now_rfc3339();
                let key = character_key(&character)?;
                let scope_user = scope_user(scope, user);
                let store = self.inner.store.clone();
                let to_store = current.clone();
                let su = scope_user.clone();
                blocking(move || store.update_memory(key, &su, &to_store))
                    .await
                    .map_err(|e| not_found_memory(e, &current.id))?;
                self.after_write(key, &scope_user, |ix| {
                    ix.upsert(scope_user.clone(), current.clone())
                });
                self.spawn_embeddings(key, &scope_user, std::slice::from_ref(&current));
                Ok(current)
            }
            MemoryOperation::Remove => {
                let (scope, id, current) = self.find(&character, user, &input).await?;
                self.authorize_write(&character, user, scope)?;
                let key = character_key(&character)?;
                let scope_user = scope_user(scope, user);
                let store = self.inner.store.clone();
                let su = scope_user.clone();
                blocking(move || store.remove_memory(key, &su, id)).await?;
                self.after_write(key, &scope_user, |ix| ix.remove(id));
                Ok(current)
            }
        }
    }

    /// Adds a plugin-written entry to the user's private memory with the character
    /// (`source: plugin`); validated like an API entry.
    pub async fn add_from_plugin(
        &self,
        user: &User,
        character: &Character,
        conversation_id: Option<&str>,
        entry: PluginMemory,
    ) -> Result<ConversationMemory, ApiError> {
        let input = MemoryInput {
            content: Some(entry.content),
            kind: Some(entry.kind.as_str().to_string()),
            importance: Some(entry.importance),
            tags: Some(entry.tags),
            conversation_id: conversation_id.map(str::to_string),
            ..MemoryInput::default()
        };
        let entry = self.new_entry(&input, MemoryScope::User, MemorySource::Plugin)?;
        self.insert(character, user, vec![entry])
            .await
            .map(|mut v| v.remove(0))
    }

    fn authorize_write(
        &self,
        c: &Character,
        user: &User,
        scope: MemoryScope,
    ) -> Result<(), ApiError> {
        if scope == MemoryScope::Character && !can_edit(c, user) {
            return Err(ApiError::character_access_denied(format!(
                "only the owner of character {} or an admin may change its shared memory",
                c.id
            )));
        }
        Ok(())
    }

    fn new_entry(
        &self,
        input: &MemoryInput,
        scope: MemoryScope,
        source: MemorySource,
    ) -> Result<ConversationMemory, ApiError> {
        let content = validate_content(input.content.as_deref().unwrap_or(""))?;
        let kind = match input.kind.as_deref() {
            Some(k) => parse_kind(k)?,
            None => MemoryKind::Note,
        };
        let importance = validate_importance(input.importance.unwrap_or(0.5))?;
        let tags = validate_tags(input.tags.as_deref().unwrap_or(&[]))?;
        let conversation_id = validate_conversation(input.conversation_id.as_deref())?;
        let now = crate::time::now_rfc3339();
        Ok(ConversationMemory {
            id: Uuid::now_v7().to_string(),
            tokens: self.count_tokens(&content),
            content,
            kind,
            importance,
            tags,
            scope,
            conversation_id,
            source,
            created_at: now.clone(),
            updated_at: now,
            last_recalled_at: None,
            recall_count: 0,
        })
    }

    fn count_tokens(&self, text: &str) -> u32 {
        u32::try_from(self.inner.tokenizer.count(text)).unwrap_or(u32::MAX)
    }

    /// Stores new entries (all of one scope) and updates the caller's cached index.
    async fn insert(
        &self,
        character: &Character,
        user: &User,
        entries: Vec<ConversationMemory>,
    ) -> Result<Vec<ConversationMemory>, ApiError> {
        let Some(scope) = entries.first().map(|e| e.scope) else {
            return Ok(entries);
        };
        let key = character_key(character)?;
        let scope_user = scope_user(scope, user);
        let store = self.inner.store.clone();
        let su = scope_user.clone();
        let to_store = entries.clone();
        blocking(move || store.insert_memories(key, &su, &to_store)).await?;
        self.after_write(key, &scope_user, |ix| {
            for e in &entries {
                ix.upsert(scope_user.clone(), e.clone());
            }
        });
        self.spawn_embeddings(key, &scope_user, &entries);
        Ok(entries)
    }

    /// Looks up the entry `input.id` names under the caller's key: in the given scope, or the
    /// private scope first and then the shared one.
    async fn find(
        &self,
        character: &Character,
        user: &User,
        input: &MemoryInput,
    ) -> Result<(MemoryScope, u128, ConversationMemory), ApiError> {
        let raw_id = input
            .id
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| {
                ApiError::validation("memory.id", "is required for update and remove")
            })?;
        let id = store::parse_id(raw_id)
            .ok_or_else(|| ApiError::validation("memory.id", "must be a UUID"))?;
        let scopes = match parse_scope(input.scope.as_deref())? {
            Some(s) => vec![s],
            None => vec![MemoryScope::User, MemoryScope::Character],
        };
        let key = character_key(character)?;
        for scope in scopes {
            let store = self.inner.store.clone();
            let su = scope_user(scope, user);
            if let Some(m) = blocking(move || store.get_memory(key, &su, id)).await? {
                return Ok((scope, id, m));
            }
        }
        Err(ApiError::not_found(format!(
            "memory {raw_id} does not exist (or is another user's private memory)"
        )))
    }

    // ---- cache maintenance -----------------------------------------------------------------

    fn generation(&self, key: u128, scope_user: &str) -> u64 {
        lock(&self.inner.generations)
            .get(&(key, scope_user.to_string()))
            .copied()
            .unwrap_or(0)
    }

    fn generations_for(&self, key: u128, user: &str) -> (u64, u64) {
        let g = lock(&self.inner.generations);
        let shared = g
            .get(&(key, SHARED_MEMORY.to_string()))
            .copied()
            .unwrap_or(0);
        let own = g.get(&(key, user.to_string())).copied().unwrap_or(0);
        (shared, own)
    }

    /// After a committed write: bumps the generation, and patches the cached index of that
    /// user in place when it was current (shared-memory writes leave every user's index to be
    /// rebuilt on its next use).
    fn after_write(&self, key: u128, scope_user: &str, patch: impl FnOnce(&mut MemoryIndex)) {
        let (before, after) = {
            let mut g = lock(&self.inner.generations);
            let slot = g.entry((key, scope_user.to_string())).or_insert(0);
            let before = *slot;
            *slot += 1;
            (before, *slot)
        };
        if scope_user == SHARED_MEMORY {
            return;
        }
        let shared = self.generation(key, SHARED_MEMORY);
        if let Some(cached) = self.inner.indexes.get(&(key, scope_user.to_string())) {
            if let Ok(mut guard) = cached.write() {
                if guard.generation == (shared, before) {
                    patch(&mut guard.index);
                    guard.generation = (shared, after);
                }
            }
        }
    }

    /// The current index of a (character, user), built from the store when missing or stale.
    async fn index_for(&self, key: u128, user: &str) -> Result<Arc<RwLock<CachedIndex>>, ApiError> {
        let cache_key = (key, user.to_string());
        let wanted = self.generations_for(key, user);
        if let Some(cached) = self.inner.indexes.get(&cache_key) {
            let fresh = cached
                .read()
                .map(|g| g.generation == wanted)
                .unwrap_or(false);
            if fresh {
                return Ok(cached);
            }
        }
        let store = self.inner.store.clone();
        let uid = user.to_string();
        // Generations read before the store: a write racing this build makes the result stale,
        // never silently current.
        let index = blocking(move || {
            let mut all: Vec<(String, ConversationMemory)> = store
                .list_memories(key, &uid)?
                .into_iter()
                .map(|m| (uid.clone(), m))
                .collect();
            all.extend(
                store
                    .list_memories(key, SHARED_MEMORY)?
                    .into_iter()
                    .map(|m| (SHARED_MEMORY.to_string(), m)),
            );
            let mut index = MemoryIndex::build(all);
            for scope_user in [uid.as_str(), SHARED_MEMORY] {
                for (id, v) in store.list_memory_vectors(key, scope_user)? {
                    index.set_vector(id, v);
                }
            }
            Ok(index)
        })
        .await?;
        let cached = Arc::new(RwLock::new(CachedIndex {
            generation: wanted,
            index,
        }));
        self.inner.indexes.insert(cache_key, cached.clone());
        Ok(cached)
    }

    // ---- recall ----------------------------------------------------------------------------

    /// A synchronous lookup for plugins' `recall(query, limit)` import: the memories this user
    /// may see with `character`, best first by BM25 relevance and recency (no embeddings: those
    /// need an upstream call, and a plugin call must not wait on the network). The index is
    /// loaded here so the lookup itself never touches the store.
    pub async fn lookup(
        &self,
        user: &User,
        character: &Character,
    ) -> Result<impl Fn(&str, usize) -> Vec<String> + Send + Sync + 'static, ApiError> {
        if !can_view(character, Some(user)) {
            return Err(ApiError::character_access_denied(format!(
                "character {} is private to its owner",
                character.id
            )));
        }
        let key = character_key(character)?;
        let cached = self.index_for(key, &user.id).await?;
        Ok(move |query: &str, limit: usize| {
            let Ok(guard) = cached.read() else {
                return Vec::new();
            };
            let now_ms = chrono::Utc::now().timestamp_millis();
            let (ranked, _) = guard.index.rank_top(query, None, now_ms, limit);
            ranked
                .iter()
                .filter_map(|r| guard.index.get(r.id))
                .map(|e| e.memory.content.clone())
                .collect()
        })
    }

    /// The summary and the top-k memories relevant to `query_text` within `budget_tokens`, for
    /// a turn of `user` with `character`. Updates `recallCount` / `lastRecalledAt` in the
    /// background.
    pub async fn recall(
        &self,
        user: &User,
        character: &Character,
        conversation_id: Option<&str>,
        query_text: &str,
        budget_tokens: usize,
        top_k: usize,
    ) -> Result<Recall, ApiError> {
        let recall = self
            .recall_preview(
                user,
                character,
                conversation_id,
                query_text,
                budget_tokens,
                top_k,
            )
            .await?;
        self.note_recalled(character, user, &recall);
        Ok(recall)
    }

    /// What `recall` would return, without counting it (for `dryRun`).
    pub async fn recall_preview(
        &self,
        user: &User,
        character: &Character,
        conversation_id: Option<&str>,
        query_text: &str,
        budget_tokens: usize,
        top_k: usize,
    ) -> Result<Recall, ApiError> {
        if !can_view(character, Some(user)) {
            return Err(ApiError::character_access_denied(format!(
                "character {} is private to its owner",
                character.id
            )));
        }
        let key = character_key(character)?;
        let summary = match conversation_id.and_then(store::parse_id) {
            Some(cid) => self.inner.store.summary_state(key, &user.id, cid)?.summary,
            None => None,
        };
        let used = summary.as_ref().map_or(0, |s| s.tokens as usize);
        let query_vector = self.query_vector(query_text).await;
        let cached = self.index_for(key, &user.id).await?;
        let now_ms = chrono::Utc::now().timestamp_millis();
        let memories = {
            let guard = cached
                .read()
                .map_err(|_| ApiError::internal("memory index lock poisoned"))?;
            // Usually the best few candidates fill top-k; rank them all only when the budget
            // skipped so many that the short list ran out.
            let keep = top_k.saturating_mul(8).max(32);
            let qv = query_vector.as_deref();
            let (ranked, total) = guard.index.rank_top(query_text, qv, now_ms, keep);
            let (picked, _) = select(&guard.index, &ranked, budget_tokens, used, top_k);
            if picked.len() < top_k && total > ranked.len() {
                let (all, _) = guard.index.rank_top(query_text, qv, now_ms, usize::MAX);
                select(&guard.index, &all, budget_tokens, used, top_k).0
            } else {
                picked
            }
        };
        let summary = summary.map(|s| s.content).filter(|s| !s.trim().is_empty());
        let block = MemoryBlock {
            summary: summary.clone().unwrap_or_default(),
            recalled: memories.iter().map(|m| m.content.clone()).collect(),
        };
        Ok(Recall {
            summary,
            memories,
            block,
        })
    }

    /// The query's embedding, when an embeddings upstream is configured and answers in time.
    async fn query_vector(&self, text: &str) -> Option<Vec<f32>> {
        let name = self.inner.config.embeddings_upstream.as_deref()?;
        if text.trim().is_empty() {
            return None;
        }
        let up = match self.inner.upstreams.get(Some(name)) {
            Ok(up) => up,
            Err(e) => {
                tracing::warn!(error = %e, "embeddings upstream is not configured");
                return None;
            }
        };
        let timeout = std::time::Duration::from_millis(self.inner.config.embed_timeout_ms);
        let inputs = [text.to_string()];
        match tokio::time::timeout(timeout, embed::embed(&up, &inputs)).await {
            Ok(Ok(mut v)) => v.pop(),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "query embedding failed; recalling with BM25 only");
                None
            }
            Err(_) => {
                tracing::debug!("query embedding timed out; recalling with BM25 only");
                None
            }
        }
    }

    /// Embeds written entries in the background and stores their vectors (no-op without an
    /// embeddings upstream). A failure leaves those entries to BM25 only.
    fn spawn_embeddings(&self, key: u128, scope_user: &str, entries: &[ConversationMemory]) {
        let Some(name) = self.inner.config.embeddings_upstream.clone() else {
            return;
        };
        if entries.is_empty() {
            return;
        }
        let this = self.clone();
        let scope_user = scope_user.to_string();
        let items: Vec<(u128, String)> = entries
            .iter()
            .filter_map(|m| {
                let id = store::parse_id(&m.id)?;
                let mut text = m.content.clone();
                for t in &m.tags {
                    text.push(' ');
                    text.push_str(t);
                }
                Some((id, text))
            })
            .collect();
        tokio::spawn(async move {
            let up = match this.inner.upstreams.get(Some(&name)) {
                Ok(up) => up,
                Err(e) => {
                    tracing::warn!(error = %e, "embeddings upstream is not configured");
                    return;
                }
            };
            let texts: Vec<String> = items.iter().map(|(_, t)| t.clone()).collect();
            let vectors = match embed::embed(&up, &texts).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "embedding memories failed; they recall by BM25 only");
                    return;
                }
            };
            for ((id, _), vector) in items.into_iter().zip(vectors) {
                let store = this.inner.store.clone();
                let su = scope_user.clone();
                let v = vector.clone();
                match blocking(move || store.put_memory_vector(key, &su, id, &v)).await {
                    Ok(true) => this.after_write(key, &scope_user, |ix| ix.set_vector(id, vector)),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot store a memory embedding"),
                }
            }
        });
    }

    /// Counts a recall on the recalled entries, off the request path.
    fn note_recalled(&self, character: &Character, user: &User, recall: &Recall) {
        if recall.memories.is_empty() {
            return;
        }
        let Ok(key) = character_key(character) else {
            return;
        };
        let items: Vec<(String, u128)> = recall
            .memories
            .iter()
            .filter_map(|m| {
                let id = store::parse_id(&m.id)?;
                Some((scope_user(m.scope, user), id))
            })
            .collect();
        let store = self.inner.store.clone();
        let at = crate::time::now_rfc3339();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.note_recalls(key, &items, &at) {
                tracing::warn!(error = %e, "could not record memory recalls");
            }
        });
    }

    // ---- summarizer ------------------------------------------------------------------------

    /// Called after each stored reply with the conversation's messages (in seq order). Every
    /// `summarize_every_turns` user turns since the last summary, starts the summarizer in the
    /// background and returns its handle (callers may ignore it; tests await it). A failed run
    /// leaves the turns unsummarized, so a later turn retries.
    pub fn note_turn(
        &self,
        user: &User,
        character: &Character,
        conversation_id: &str,
        history: &[Arc<StoredMessage>],
    ) -> Option<tokio::task::JoinHandle<()>> {
        let every = self.inner.config.summarize_every_turns;
        // Each user turn is a message: a shorter history cannot be due, whatever the stored
        // state says, so most turns skip reading it.
        if every == 0 || history.len() < every as usize {
            return None;
        }
        let key = store::parse_id(&character.id)?;
        let cid = store::parse_id(conversation_id)?;
        let state = match self.inner.store.summary_state(key, &user.id, cid) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the summarizer state");
                return None;
            }
        };
        let covered = state.summary.as_ref().map(|s| s.last_summarized_message);
        // A history is in seq order: find the first unsummarized message without walking a
        // long history every turn.
        let first = history.partition_point(|m| covered.is_some_and(|c| m.seq <= c));
        let fresh = &history[first..];
        let user_turns = fresh.iter().filter(|m| m.role == MessageRole::User).count();
        if user_turns < every as usize {
            return None;
        }
        let flight = (key, user.id.clone(), cid);
        if !lock(&self.inner.in_flight).insert(flight.clone()) {
            return None;
        }
        let window = self.inner.config.summary_window_messages.max(2);
        let start = fresh.len().saturating_sub(window);
        let messages: Vec<StoredMessage> = fresh[start..]
            .iter()
            .map(|m| StoredMessage::clone(m))
            .collect();
        let this = self.clone();
        let user = user.clone();
        let character = character.clone();
        let conversation_id = conversation_id.to_string();
        Some(tokio::spawn(async move {
            this.summarize(
                &user,
                &character,
                key,
                cid,
                &conversation_id,
                state,
                messages,
            )
            .await;
            lock(&this.inner.in_flight).remove(&flight);
        }))
    }

    #[allow(clippy::too_many_arguments)]
    async fn summarize(
        &self,
        user: &User,
        character: &Character,
        key: u128,
        cid: u128,
        conversation_id: &str,
        mut state: SummaryState,
        messages: Vec<StoredMessage>,
    ) {
        let Some(last_seq) = messages.last().map(|m| m.seq) else {
            return;
        };
        let cfg = &self.inner.config;
        let previous = state.summary.as_ref().map(|s| s.content.as_str());
        let req =
            summarize::summary_request(&character.id, previous, &messages, cfg.summary_max_words);
        let result = match self.inner.upstreams.get(None) {
            Ok(up) => up.generate(&req).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(reply) if !reply.content.trim().is_empty() => {
                let content = reply.content.trim().to_string();
                state.summary = Some(MemorySummary {
                    tokens: self.count_tokens(&content),
                    content,
                    conversation_id: conversation_id.to_string(),
                    last_summarized_message: last_seq,
                    updated_at: crate::time::now_rfc3339(),
                });
                state.failures = 0;
                state.last_error = None;
            }
            Ok(_) => {
                state.failures += 1;
                state.last_error = Some("the upstream returned an empty summary".into());
            }
            Err(e) => {
                state.failures += 1;
                state.last_error = Some(e.to_string());
            }
        }
        if let Some(err) = &state.last_error {
            tracing::warn!(conversation = %conversation_id, failures = state.failures, error = %err,
                "summarizing failed; it is retried on a later turn");
        }
        let succeeded = state.failures == 0;
        let store = self.inner.store.clone();
        let uid = user.id.clone();
        // The character may have been deleted while the upstream was thinking; the store then
        // refuses the write and there is nothing left to do.
        let stored = blocking(move || store.put_summary_state(key, &uid, cid, &state)).await;
        if matches!(stored, Err(store::StoreError::NotFound(_))) {
            return;
        }
        if let Err(e) = stored {
            tracing::warn!(error = %e, "cannot store the conversation summary");
            return;
        }
        if succeeded && cfg.extract_facts {
            self.extract_facts(user, character, conversation_id, &messages)
                .await;
        }
    }

    async fn extract_facts(
        &self,
        user: &User,
        character: &Character,
        conversation_id: &str,
        messages: &[StoredMessage],
    ) {
        let req = summarize::facts_request(&character.id, messages);
        let reply = match self.inner.upstreams.get(None) {
            Ok(up) => up.generate(&req).await,
            Err(e) => Err(e),
        };
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "fact extraction failed");
                return;
            }
        };
        let mut entries = Vec::new();
        for fact in summarize::parse_facts(&reply.content) {
            let input = MemoryInput {
                content: Some(fact),
                kind: Some("fact".into()),
                importance: Some(0.5),
                conversation_id: Some(conversation_id.to_string()),
                ..MemoryInput::default()
            };
            match self.new_entry(&input, MemoryScope::User, MemorySource::Auto) {
                Ok(e) => entries.push(e),
                Err(e) => tracing::debug!(error = %e, "skipping an extracted fact"),
            }
        }
        if let Err(e) = self.insert(character, user, entries).await {
            tracing::warn!(error = %e, "cannot store extracted facts");
        }
    }
}

/// Takes ranked memories in order while they fit the token budget (skipping one that does not
/// fit: a shorter, lower-ranked one may still), up to `top_k`; returns them and the tokens used.
fn select(
    index: &MemoryIndex,
    ranked: &[rank::Ranked],
    budget_tokens: usize,
    mut used: usize,
    top_k: usize,
) -> (Vec<RecalledMemory>, usize) {
    let mut out = Vec::with_capacity(top_k.min(ranked.len()));
    for r in ranked {
        if out.len() >= top_k {
            break;
        }
        let Some(e) = index.get(r.id) else {
            continue;
        };
        let cost = e.memory.tokens as usize;
        if used + cost > budget_tokens {
            continue;
        }
        used += cost;
        out.push(RecalledMemory {
            id: e.memory.id.clone(),
            content: e.memory.content.clone(),
            score: r.score,
            kind: e.memory.kind,
            scope: e.memory.scope,
        });
    }
    (out, used)
}

/// The owner part of the store key for a scope.
fn scope_user(scope: MemoryScope, user: &User) -> String {
    match scope {
        MemoryScope::User => user.id.clone(),
        MemoryScope::Character => SHARED_MEMORY.to_string(),
    }
}

fn not_found_memory(e: store::StoreError, id: &str) -> ApiError {
    match e {
        store::StoreError::NotFound(_) => {
            ApiError::not_found(format!("memory {id} does not exist"))
        }
        other => other.into(),
    }
}

fn parse_scope(s: Option<&str>) -> Result<Option<MemoryScope>, ApiError> {
    match s {
        None => Ok(None),
        Some(s) => MemoryScope::parse(s)
            .map(Some)
            .ok_or_else(|| ApiError::validation("memory.scope", "must be user or character")),
    }
}

fn parse_kind(s: &str) -> Result<MemoryKind, ApiError> {
    MemoryKind::parse(s).ok_or_else(|| {
        ApiError::validation(
            "memory.kind",
            "must be one of fact, event, preference, summary, note",
        )
    })
}

fn validate_content(s: &str) -> Result<String, ApiError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(ApiError::validation("memory.content", "must not be empty"));
    }
    if t.len() > MAX_CONTENT_BYTES {
        return Err(ApiError::validation(
            "memory.content",
            format!("must be at most {MAX_CONTENT_BYTES} bytes"),
        ));
    }
    Ok(t.to_string())
}

fn validate_importance(v: f64) -> Result<f64, ApiError> {
    if !v.is_finite() || !(0.0..=1.0).contains(&v) {
        return Err(ApiError::validation(
            "memory.importance",
            "must be a number from 0 to 1",
        ));
    }
    Ok(v)
}

fn validate_tags(tags: &[String]) -> Result<Vec<String>, ApiError> {
    if tags.len() > MAX_TAGS {
        return Err(ApiError::validation(
            "memory.tags",
            format!("at most {MAX_TAGS} tags"),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(tags.len());
    for t in tags {
        let t = t.trim();
        if t.is_empty() {
            return Err(ApiError::validation(
                "memory.tags",
                "a tag must not be empty",
            ));
        }
        if t.chars().count() > MAX_TAG_CHARS {
            return Err(ApiError::validation(
                "memory.tags",
                format!("a tag must be at most {MAX_TAG_CHARS} characters"),
            ));
        }
        if !out.iter().any(|o| o.eq_ignore_ascii_case(t)) {
            out.push(t.to_string());
        }
    }
    Ok(out)
}

fn validate_conversation(s: Option<&str>) -> Result<Option<String>, ApiError> {
    match s.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(c) => store::parse_id(c)
            .map(|id| Some(Uuid::from_u128(id).to_string()))
            .ok_or_else(|| ApiError::validation("memory.conversationId", "must be a UUID")),
    }
}

/// Counts by kind and scope, tokens and the last recall over `memories`.
fn statistics<'a>(memories: impl Iterator<Item = &'a ConversationMemory>) -> MemoryStatistics {
    let mut s = MemoryStatistics::default();
    for k in MemoryKind::ALL {
        s.by_kind.insert(k.as_str(), 0);
    }
    for sc in [MemoryScope::User, MemoryScope::Character] {
        s.by_scope.insert(sc.as_str(), 0);
    }
    for m in memories {
        *s.by_kind.entry(m.kind.as_str()).or_default() += 1;
        *s.by_scope.entry(m.scope.as_str()).or_default() += 1;
        s.total += 1;
        s.total_tokens += u64::from(m.tokens);
        if let Some(at) = &m.last_recalled_at {
            if s.last_recall_at.as_ref().is_none_or(|cur| at > cur) {
                s.last_recall_at = Some(at.clone());
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let cases: Vec<(Result<(), ApiError>, &str)> = vec![
            (validate_content("  ").map(drop), "memory.content"),
            (
                validate_content(&"x".repeat(MAX_CONTENT_BYTES + 1)).map(drop),
                "memory.content",
            ),
            (validate_importance(1.5).map(drop), "memory.importance"),
            (validate_importance(f64::NAN).map(drop), "memory.importance"),
            (
                validate_tags(&vec!["t".to_string(); 33]).map(drop),
                "memory.tags",
            ),
            (validate_tags(&[" ".to_string()]).map(drop), "memory.tags"),
            (parse_kind("gossip").map(drop), "memory.kind"),
            (parse_scope(Some("world")).map(drop), "memory.scope"),
            (MemoryOperation::parse("upsert").map(drop), "operation"),
            (
                validate_conversation(Some("nope")).map(drop),
                "memory.conversationId",
            ),
        ];
        for (result, field) in cases {
            let err = result.expect_err(field);
            assert_eq!(
                err.details.as_ref().and_then(|d| d["field"].as_str()),
                Some(field)
            );
        }
    }

    #[test]
    fn config_defaults_parse_from_an_empty_table() {
        let cfg: MemoryConfig = toml::from_str("").expect("empty config");
        assert_eq!(cfg, MemoryConfig::default());
        assert!(toml::from_str::<MemoryConfig>("typo = 1").is_err());
    }
}
