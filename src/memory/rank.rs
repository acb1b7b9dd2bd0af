//! Recall ranking: an in-memory BM25 index (the `bm25` crate: tokenizer with stemming and stop
//! words, sparse embeddings, an inverted index) over the content and tags of one (character,
//! user)'s memories, combined with importance and recency. Pure: the caller passes `now`.
//!
//! # Score
//! ```text
//! score = 0.60 · bm25 / max_bm25            (relevance to the query, 0..1 within this recall)
//!       + 0.25 · importance                 (0..1, set by whoever wrote the memory)
//!       + 0.15 · 0.5^(age_days / 30)        (recency: halves every 30 days since updatedAt)
//! ```
//! With an embeddings upstream configured, semantic similarity joins the score:
//! ```text
//! score = 0.35 · bm25 / max_bm25 + 0.35 · max(0, cosine) + 0.20 · importance + 0.10 · recency
//! ```
//! and memories whose cosine similarity to the query is at least 0.5 become candidates too.
//!
//! Only memories that share at least one term with the query are candidates, plus "standing"
//! memories with importance ≥ 0.8 (a user's name, a hard preference), which are worth recalling
//! whatever was just said. Relevance dominates: a memory matching the query best always
//! outranks one matching nothing, while importance and recency order weaker matches.

use super::types::{ConversationMemory, MemoryKind, MemoryScope};
use bm25::{Embedder, EmbedderBuilder, Language, Scorer};
use std::collections::{HashMap, HashSet};

/// Weight of normalized BM25 relevance.
pub const W_RELEVANCE: f64 = 0.60;
/// Weight of importance.
pub const W_IMPORTANCE: f64 = 0.25;
/// Weight of recency.
pub const W_RECENCY: f64 = 0.15;
/// Recency halves every this many days.
pub const HALF_LIFE_DAYS: f64 = 30.0;
/// Weights when semantic similarity is available: relevance, similarity, importance, recency.
pub const SEMANTIC_WEIGHTS: [f64; 4] = [0.35, 0.35, 0.20, 0.10];
/// Cosine similarity that makes a memory a candidate without a matching term.
pub const SEMANTIC_MIN: f64 = 0.5;
/// Memories at least this important are candidates even without a matching term.
pub const STANDING_IMPORTANCE: f64 = 0.8;

const DAY_MS: f64 = 86_400_000.0;

/// What the index keeps per memory besides its BM25 embedding.
#[derive(Debug, Clone)]
pub struct Indexed {
    /// The owner part of the store key (`""` for character scope).
    pub scope_user: String,
    pub memory: ConversationMemory,
    updated_ms: i64,
}

/// One ranked memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    pub id: u128,
    pub score: f64,
    /// BM25 relevance normalized to 0..1 within this query.
    pub relevance: f64,
}

/// BM25 index plus metadata of one (character, user)'s visible memories (private and shared).
pub struct MemoryIndex {
    embedder: Embedder,
    scorer: Scorer<u128>,
    entries: HashMap<u128, Indexed>,
    /// Embeddings by memory id (only with an embeddings upstream).
    vectors: HashMap<u128, Vec<f32>>,
}

impl std::fmt::Debug for MemoryIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryIndex")
            .field("entries", &self.entries.len())
            .finish()
    }
}

/// The text BM25 sees: the content followed by the tags.
fn indexed_text(m: &ConversationMemory) -> String {
    let mut s = String::with_capacity(m.content.len() + 16 * m.tags.len());
    s.push_str(&m.content);
    for t in &m.tags {
        s.push(' ');
        s.push_str(t);
    }
    s
}

impl MemoryIndex {
    /// Builds the index, fitting BM25's average document length to these memories.
    pub fn build(memories: Vec<(String, ConversationMemory)>) -> Self {
        let texts: Vec<String> = memories.iter().map(|(_, m)| indexed_text(m)).collect();
        let corpus: Vec<&str> = texts.iter().map(String::as_str).collect();
        let embedder: Embedder =
            EmbedderBuilder::with_fit_to_corpus(Language::English, &corpus).build();
        let mut index = Self {
            embedder,
            scorer: Scorer::new(),
            entries: HashMap::with_capacity(memories.len()),
            vectors: HashMap::new(),
        };
        for ((scope_user, m), text) in memories.into_iter().zip(texts) {
            index.insert_with_text(scope_user, m, &text);
        }
        index
    }

    fn insert_with_text(&mut self, scope_user: String, m: ConversationMemory, text: &str) {
        let Some(id) = crate::store::parse_id(&m.id) else {
            return;
        };
        self.scorer.upsert(&id, self.embedder.embed(text));
        let updated_ms = crate::time::rfc3339_to_ms(&m.updated_at);
        self.entries.insert(
            id,
            Indexed {
                scope_user,
                memory: m,
                updated_ms,
            },
        );
    }

    /// Adds or replaces one memory. The average document length is not refitted: it drifts
    /// slowly and the index is rebuilt whenever it falls out of the cache.
    pub fn upsert(&mut self, scope_user: String, m: ConversationMemory) {
        let text = indexed_text(&m);
        self.insert_with_text(scope_user, m, &text);
    }

    /// Removes one memory.
    pub fn remove(&mut self, id: u128) {
        self.scorer.remove(&id);
        self.entries.remove(&id);
        self.vectors.remove(&id);
    }

    /// Sets the embedding of an indexed memory.
    pub fn set_vector(&mut self, id: u128, vector: Vec<f32>) {
        if self.entries.contains_key(&id) {
            self.vectors.insert(id, vector);
        }
    }

    /// Number of indexed memories.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// One indexed memory.
    pub fn get(&self, id: u128) -> Option<&Indexed> {
        self.entries.get(&id)
    }

    /// Every indexed memory, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u128, &Indexed)> {
        self.entries.iter().map(|(k, v)| (*k, v))
    }

    /// BM25 scores of the memories sharing a term with `query`, best first.
    pub fn search(&self, query: &str) -> Vec<(u128, f32)> {
        let q = self.embedder.embed(query);
        self.scorer
            .matches(&q)
            .into_iter()
            .map(|d| (d.id, d.score))
            .collect()
    }

    /// All candidates for `query` ranked by the combined score, best first; ties go to the
    /// newer memory so the order is deterministic.
    pub fn rank(&self, query: &str, now_ms: i64) -> Vec<Ranked> {
        self.rank_top(query, None, now_ms, usize::MAX).0
    }

    /// The best `keep` candidates, best first, and how many candidates there were in all.
    /// Selecting before sorting keeps a recall over thousands of candidates cheap.
    /// With `query_vector`, semantic similarity joins the score (see the module docs).
    pub fn rank_top(
        &self,
        query: &str,
        query_vector: Option<&[f32]>,
        now_ms: i64,
        keep: usize,
    ) -> (Vec<Ranked>, usize) {
        if self.entries.is_empty() {
            // Most characters have no memories yet: skip tokenizing the query for nothing.
            return (Vec::new(), 0);
        }
        let matches = self.search(query);
        let max = matches
            .iter()
            .map(|(_, s)| f64::from(*s))
            .fold(0.0f64, f64::max);
        let mut out: Vec<Ranked> = Vec::with_capacity(matches.len() + 16);
        let mut matched: HashSet<u128> = HashSet::with_capacity(matches.len());
        let similarity = |id: &u128| -> f64 {
            match (query_vector, self.vectors.get(id)) {
                (Some(q), Some(v)) => super::embed::cosine(q, v).max(0.0),
                _ => 0.0,
            }
        };
        let score = |rel: f64, sim: f64, e: &Indexed| match query_vector {
            Some(_) => combined_semantic(rel, sim, e.memory.importance, e.updated_ms, now_ms),
            None => combined(rel, e.memory.importance, e.updated_ms, now_ms),
        };
        if max > 0.0 {
            for (id, s) in &matches {
                let Some(e) = self.entries.get(id) else {
                    continue;
                };
                let rel = f64::from(*s) / max;
                matched.insert(*id);
                out.push(Ranked {
                    id: *id,
                    score: score(rel, similarity(id), e),
                    relevance: rel,
                });
            }
        }
        for (id, e) in &self.entries {
            let standing = e.memory.importance >= STANDING_IMPORTANCE;
            // Cheap test first: without a query vector only standing memories can join, and
            // the hash lookups below are most of this loop's cost over thousands of entries.
            if (!standing && query_vector.is_none()) || matched.contains(id) {
                continue;
            }
            let sim = similarity(id);
            if standing || sim >= SEMANTIC_MIN {
                out.push(Ranked {
                    id: *id,
                    score: score(0.0, sim, e),
                    relevance: 0.0,
                });
            }
        }
        let total = out.len();
        let order = |a: &Ranked, b: &Ranked| b.score.total_cmp(&a.score).then(b.id.cmp(&a.id));
        if keep < out.len() {
            out.select_nth_unstable_by(keep, order);
            out.truncate(keep);
        }
        out.sort_unstable_by(order);
        (out, total)
    }
}

/// The documented combination of relevance, importance and recency.
pub fn combined(relevance: f64, importance: f64, updated_ms: i64, now_ms: i64) -> f64 {
    let age_days = ((now_ms - updated_ms).max(0) as f64) / DAY_MS;
    let recency = 0.5f64.powf(age_days / HALF_LIFE_DAYS);
    W_RELEVANCE * relevance + W_IMPORTANCE * importance.clamp(0.0, 1.0) + W_RECENCY * recency
}

/// The documented combination when semantic similarity is available.
pub fn combined_semantic(
    relevance: f64,
    similarity: f64,
    importance: f64,
    updated_ms: i64,
    now_ms: i64,
) -> f64 {
    let age_days = ((now_ms - updated_ms).max(0) as f64) / DAY_MS;
    let recency = 0.5f64.powf(age_days / HALF_LIFE_DAYS);
    let [w_rel, w_sim, w_imp, w_rec] = SEMANTIC_WEIGHTS;
    w_rel * relevance + w_sim * similarity + w_imp * importance.clamp(0.0, 1.0) + w_rec * recency
}

/// A recalled memory as the prompt and `dryRun` see it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecalledMemory {
    pub id: String,
    pub content: String,
    pub score: f64,
    pub kind: MemoryKind,
    pub scope: MemoryScope,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::types::{MemoryScope, MemorySource};

    const NOW: i64 = 1_800_000_000_000;

    fn mem(
        n: u128,
        content: &str,
        importance: f64,
        age_days: i64,
        tags: &[&str],
    ) -> (String, ConversationMemory) {
        let at = crate::time::ms_to_rfc3339(NOW - age_days * 86_400_000);
        (
            "u".to_string(),
            ConversationMemory {
                id: uuid::Uuid::from_u128(n).to_string(),
                content: content.into(),
                kind: MemoryKind::Fact,
                importance,
                tags: tags.iter().map(|t| t.to_string()).collect(),
                scope: MemoryScope::User,
                conversation_id: None,
                source: MemorySource::User,
                created_at: at.clone(),
                updated_at: at,
                last_recalled_at: None,
                recall_count: 0,
                tokens: 0,
            },
        )
    }

    /// (case name, memories, query, expected ids best first)
    type Case = (
        &'static str,
        Vec<(String, ConversationMemory)>,
        &'static str,
        Vec<u128>,
    );

    fn check(cases: Vec<Case>) {
        for (name, memories, query, expected) in cases {
            let index = MemoryIndex::build(memories);
            let got: Vec<u128> = index.rank(query, NOW).iter().map(|r| r.id).collect();
            assert_eq!(got, expected, "case {name}");
        }
    }

    #[test]
    fn ranking_cases() {
        check(vec![
            (
                "only matching memories are recalled",
                vec![
                    mem(1, "The user has a dog named Rex", 0.5, 0, &[]),
                    mem(2, "The user likes green tea", 0.5, 0, &[]),
                ],
                "how is your dog doing?",
                vec![1],
            ),
            (
                "stemming matches inflections",
                vec![mem(1, "User went fishing on the lake", 0.5, 0, &[])],
                "do you still fish?",
                vec![1],
            ),
            (
                "tags are searched",
                vec![
                    mem(1, "Birthday is in May", 0.5, 0, &["birthday", "calendar"]),
                    mem(2, "Owns a bicycle", 0.5, 0, &[]),
                ],
                "check the calendar",
                vec![1],
            ),
            (
                "importance orders equally relevant memories",
                vec![
                    mem(1, "The user plays chess", 0.2, 0, &[]),
                    mem(2, "The user plays chess", 0.7, 0, &[]),
                ],
                "chess",
                vec![2, 1],
            ),
            (
                "recency orders equally relevant and important memories",
                vec![
                    mem(1, "Visited Paris", 0.5, 90, &[]),
                    mem(2, "Visited Paris", 0.5, 1, &[]),
                ],
                "paris",
                vec![2, 1],
            ),
            (
                "a standing memory is recalled without a matching term, after the match",
                vec![
                    mem(1, "The user's name is Ada", 0.9, 0, &[]),
                    mem(2, "The user hates rain", 0.3, 0, &[]),
                ],
                "rain again today",
                vec![2, 1],
            ),
            (
                "the best match outranks an important memory that matches nothing",
                vec![
                    mem(1, "The user is allergic to peanuts", 1.0, 0, &[]),
                    mem(2, "The user's cat is called Miso", 0.0, 400, &[]),
                ],
                "cat",
                vec![2, 1],
            ),
            ("no memories, no recall", vec![], "anything", vec![]),
        ]);
    }

    #[test]
    fn combined_is_the_documented_formula() {
        let s = combined(1.0, 1.0, NOW, NOW);
        assert!((s - 1.0).abs() < 1e-9);
        let half = combined(0.0, 0.0, NOW - 30 * 86_400_000, NOW);
        assert!((half - W_RECENCY * 0.5).abs() < 1e-9);
    }

    #[test]
    fn rank_top_keeps_the_best_in_order() {
        let memories = (1..=50u128)
            .map(|i| mem(i, "tea", i as f64 / 50.0, 0, &[]))
            .collect();
        let index = MemoryIndex::build(memories);
        let full = index.rank("tea", NOW);
        let (top, total) = index.rank_top("tea", None, NOW, 5);
        assert_eq!(total, 50);
        assert_eq!(top, full[..5].to_vec());
        assert_eq!(top[0].id, 50);
    }

    #[test]
    fn semantic_similarity_recalls_without_a_matching_term() {
        let mut index = MemoryIndex::build(vec![
            mem(1, "The user adores felines", 0.1, 0, &[]),
            mem(2, "The user owns a boat", 0.1, 0, &[]),
        ]);
        index.set_vector(1, vec![1.0, 0.0]);
        index.set_vector(2, vec![0.0, 1.0]);
        assert!(index.rank("cats", NOW).is_empty());
        let (ranked, _) = index.rank_top("cats", Some(&[0.9, 0.1]), NOW, 10);
        assert_eq!(ranked.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn upsert_and_remove_change_results() {
        let mut index = MemoryIndex::build(vec![mem(1, "likes jazz", 0.5, 0, &[])]);
        let (u, m) = mem(2, "likes jazz and blues", 0.5, 0, &[]);
        index.upsert(u, m);
        assert_eq!(index.rank("blues", NOW).len(), 1);
        index.remove(2);
        assert!(index.rank("blues", NOW).is_empty());
        assert_eq!(index.len(), 1);
    }
}
