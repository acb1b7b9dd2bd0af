//! Conversations, their messages (keyed by (conversation, seq)), per-character statistics and
//! idempotency records. A conversation's record and its messages always change in one
//! transaction, and a moka cache keeps hot histories so a turn does not re-read them.

use super::characters::parse_id;
use super::group_commit::lock;
use super::turn_log::{Record, TurnLog};
use super::{decode_record, encode_record, record_json, Store, StoreError, CHARACTERS, META};
use crate::model::{Character, Conversation, StoredMessage};
use redb::{Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use std::collections::hash_map::{Entry, HashMap};
use std::sync::Arc;

/// How long the store must have had no commit running before a writer commits its own change
/// inline (see `save_conversation`).
const INLINE_AFTER_IDLE: std::time::Duration = std::time::Duration::from_millis(1);

/// id → Conversation.
pub(crate) const CONVERSATIONS: TableDefinition<u128, &[u8]> =
    TableDefinition::new("conversations");
/// (user, character, lastActivity ms, conversation) → (): a user's conversations with a
/// character, newest activity last.
pub(crate) const CONV_BY_USER: TableDefinition<(&str, u128, i64, u128), ()> =
    TableDefinition::new("conv_by_user");
/// (character, conversation) → (): everything to delete with a character.
pub(crate) const CONV_BY_CHARACTER: TableDefinition<(u128, u128), ()> =
    TableDefinition::new("conv_by_character");
/// (conversation, seq) → StoredMessage.
pub(crate) const MESSAGES: TableDefinition<(u128, u64), &[u8]> = TableDefinition::new("messages");
/// character → CharacterStats.
pub(crate) const CHARACTER_STATS: TableDefinition<u128, &[u8]> =
    TableDefinition::new("character_stats");
/// (user, idempotency key) → stored response.
pub(crate) const IDEMPOTENCY: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("idempotency");

/// Counters kept per character.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CharacterStats {
    pub conversation_count: u64,
    pub message_count: u64,
    pub memory_count: u64,
    pub last_used_ms: Option<i64>,
    /// The character's usageCount. Kept here rather than in the character record, so that a
    /// turn does not decode and rewrite the whole card (half a megabyte with a large lorebook).
    /// `None` until the character's first turn since it moved here; the record's count holds
    /// until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_count: Option<u64>,
}

/// One conversation change: the new record, the record it replaces (None for a new
/// conversation), new or changed messages, removed seqs, and new turns for usageCount. It is
/// also what the turn log records. `log_record` writes it field by field: a new field goes
/// there too (its test compares the two byte for byte).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConversationChange {
    pub conversation: Conversation,
    pub previous: Option<Conversation>,
    pub upserts: Vec<StoredMessage>,
    pub removed: Vec<u64>,
    pub usage_delta: u64,
}

/// A change waiting for a group commit, with its parsed keys.
pub(crate) struct Queued {
    cid: u128,
    chid: u128,
    change: ConversationChange,
    /// The change's conversation record as stored (`encode_record`).
    conversation: Vec<u8>,
    /// Its upserted messages as stored, in order.
    upserts: Vec<Vec<u8>>,
}

impl Queued {
    /// Encodes the change's records once: the same bytes go into the tables and, spliced into
    /// the turn log record, stand for the conversation and messages there.
    fn new(cid: u128, chid: u128, change: ConversationChange) -> Result<Self, StoreError> {
        Ok(Self {
            cid,
            chid,
            conversation: encode_record(&change.conversation)?,
            upserts: change
                .upserts
                .iter()
                .map(encode_record)
                .collect::<Result<_, _>>()?,
            change,
        })
    }
}

/// The turn log record of `batch`: the JSON array of its `ConversationChange`s, byte for byte
/// what serializing them gives, but with the conversation and message records already encoded
/// for the tables spliced in instead of serialized a second time.
fn log_record(batch: &[Queued]) -> Result<Vec<u8>, StoreError> {
    let size: usize = batch
        .iter()
        .map(|q| q.conversation.len() + q.upserts.iter().map(Vec::len).sum::<usize>() + 128)
        .sum();
    let mut out = Vec::with_capacity(size);
    out.push(b'[');
    for (i, q) in batch.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"conversation\":");
        out.extend_from_slice(record_json(&q.conversation));
        out.extend_from_slice(b",\"previous\":");
        serde_json::to_writer(&mut out, &q.change.previous)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        out.extend_from_slice(b",\"upserts\":[");
        for (j, m) in q.upserts.iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            out.extend_from_slice(record_json(m));
        }
        out.extend_from_slice(b"],\"removed\":");
        serde_json::to_writer(&mut out, &q.change.removed)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        out.extend_from_slice(b",\"usageDelta\":");
        out.extend_from_slice(q.change.usage_delta.to_string().as_bytes());
        out.push(b'}');
    }
    out.push(b']');
    Ok(out)
}

/// META key of the turn log's id and the sequence number of the last commit: 16 + 8 bytes.
pub(crate) const TURN_LOG_KEY: &str = "turn_log";

/// The committer checkpoints when it goes idle with this many changes in the log…
const CHECKPOINT_CHANGES: usize = 256;
/// …or this many bytes of log.
const CHECKPOINT_BYTES: u64 = 1 << 20;

fn lost() -> StoreError {
    StoreError::Task("the commit of this change did not finish".into())
}

/// A conversation and its whole history, as cached. Messages are shared: a turn that appends
/// to a long history copies pointers, not texts.
#[derive(Debug, Clone)]
pub struct History {
    pub conversation: Conversation,
    pub messages: Vec<Arc<StoredMessage>>,
}

impl History {
    /// Approximate heap bytes, for the cache's byte budget: the texts plus fixed costs for the
    /// other fields' allocations and the cache entry (calibrated against RSS under load, where
    /// 3-message histories took ~4 KB each).
    pub(crate) fn weight(&self) -> u32 {
        let texts: usize = self
            .messages
            .iter()
            .map(|m| {
                let swipes: usize = m.swipes.iter().map(|s| s.len() + 32).sum();
                m.content.len() + swipes + std::mem::size_of::<StoredMessage>() + 320
            })
            .sum();
        u32::try_from(texts + std::mem::size_of::<Conversation>() + 1536).unwrap_or(u32::MAX)
    }
}

/// A stored idempotent result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdempotentRecord {
    /// Hash of the request it answered, so a reused key with another body is refused.
    pub request_hash: u64,
    pub response: serde_json::Value,
    pub created_ms: i64,
}

/// One page of a user's conversations with a character.
#[derive(Debug, Clone)]
pub struct ConversationPage {
    pub conversations: Vec<Conversation>,
    /// Cursor for the next (older) page.
    pub next: Option<(i64, u128)>,
}

fn ms(rfc: &str) -> i64 {
    crate::time::rfc3339_to_ms(rfc)
}

impl Store {
    /// A conversation with all its messages (cached).
    pub fn history(&self, conversation_id: u128) -> Result<Option<Arc<History>>, StoreError> {
        if let Some(h) = self.histories.get(&conversation_id) {
            return Ok(Some(h));
        }
        let txn = self.db.begin_read()?;
        let convs = txn.open_table(CONVERSATIONS)?;
        let Some(raw) = convs.get(conversation_id)? else {
            return Ok(None);
        };
        let conversation: Conversation = decode_record(raw.value())?;
        let table = txn.open_table(MESSAGES)?;
        let mut messages = Vec::new();
        for item in table.range((conversation_id, 0u64)..=(conversation_id, u64::MAX))? {
            let (_, v) = item?;
            messages.push(Arc::new(decode_record(v.value())?));
        }
        let h = Arc::new(History {
            conversation,
            messages,
        });
        // Writers replace the entry after each commit; only fill an empty slot here.
        self.histories
            .entry(conversation_id)
            .or_insert_with(|| h.clone());
        Ok(Some(h))
    }

    /// Writes a conversation record plus new or changed messages, and removes `removed`
    /// seqs, durably. Concurrent saves share one transaction and one fsync (group commit); each
    /// still succeeds or fails on its own. Waiting takes no thread: one blocking thread commits
    /// for everyone.
    pub async fn save_conversation(
        &self,
        change: ConversationChange,
    ) -> Result<Arc<History>, StoreError> {
        let cid = parse_id(&change.conversation.id)
            .ok_or_else(|| StoreError::Corrupt("conversation id".into()))?;
        let chid = parse_id(&change.conversation.character_id)
            .ok_or_else(|| StoreError::NotFound(change.conversation.character_id.clone()))?;
        // Encoded here, on the writer's own thread, rather than by the committer that every
        // writer waits for.
        let (done, committer) = self.turns.enqueue(Queued::new(cid, chid, change)?);
        if let Some(mut committer) = committer {
            // After a quiet spell this writer commits its own change on its own thread: that
            // saves waking a blocking thread and being woken back (~0.1 ms at low load). Under
            // load the hand-over of the worker that `block_in_place` costs outweighs it (c=32
            // ran ~5 % slower). The rest (changes queued meanwhile, the idle checkpoint) goes
            // to a blocking thread either way.
            let multi_threaded = tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
            if multi_threaded && committer.idle_for_at_least(INLINE_AFTER_IDLE) {
                tokio::task::block_in_place(|| {
                    committer.commit_queued(|batch| self.commit_changes(batch))
                });
            }
            let store = self.clone();
            // If the runtime refuses the task, the committer is dropped and fails the queue.
            drop(tokio::task::spawn_blocking(move || {
                committer.run(
                    |batch| store.commit_changes(batch),
                    || store.checkpoint_if_due(),
                )
            }));
        }
        done.await.unwrap_or_else(|_| Err(lost()))
    }

    /// Commits a batch in one transaction; if that fails as a whole, commits each change on its
    /// own so one bad change cannot take the others down.
    fn commit_changes(&self, batch: Vec<Queued>) -> Vec<Result<Arc<History>, StoreError>> {
        let mut log = lock(&self.turn_log);
        if batch.len() > 1 {
            if let Ok(results) = self.commit_logged(&mut log, &batch) {
                return results;
            }
        }
        batch
            .iter()
            .map(|q| {
                self.commit_logged(&mut log, std::slice::from_ref(q))
                    .and_then(|mut r| r.pop().unwrap_or_else(|| Err(lost())))
            })
            .collect()
    }

    /// Commits `batch` in one transaction and makes it durable: committed without a sync while
    /// its record is written to the turn log and synced on another thread (a turn waits for the
    /// longer of the two, not both), or, when the record does not fit in the log, committed
    /// durably (which starts the log over). The outer error fails the whole batch (nothing was
    /// committed); inner errors are changes refused on their own (their character is gone) or
    /// a commit that could not be made durable.
    #[allow(clippy::type_complexity)]
    fn commit_logged(
        &self,
        log: &mut TurnLog,
        batch: &[Queued],
    ) -> Result<Vec<Result<Arc<History>, StoreError>>, StoreError> {
        let record = log_record(batch)?;
        let lsn = log.last_lsn + 1;
        if !log.fits(record.len()) {
            let (accepted, usage) = self.commit_batch(batch, log.id, lsn, Durability::Immediate)?;
            log.last_lsn = lsn;
            log.reset();
            return Ok(self.publish(batch, accepted, usage));
        }
        let appending = log.start_append(lsn, &record);
        // The caches are updated while the log syncs: readers of the database see the commit
        // already, and the caches only follow it (they are dropped below if it cannot be made
        // durable).
        let published = self
            .commit_batch(batch, log.id, lsn, Durability::None)
            .map(|(accepted, usage)| self.publish(batch, accepted, usage));
        let written = log.finish_append(&appending);
        let results = match published {
            Ok(r) => r,
            Err(e) => {
                // Nothing was committed, so the record must never be applied: erased, or
                // else its sequence number is stored as spent.
                if let Err(erase) = log.erase(&appending) {
                    log.last_lsn = lsn;
                    if let Err(spent) = self.checkpoint(log) {
                        tracing::error!(%erase, %spent, "a failed commit's turn log record \
                            could not be withdrawn; it may be applied at the next start");
                    }
                }
                return Err(e);
            }
        };
        log.last_lsn = lsn;
        if let Err(e) = written {
            // Committed but not yet durable: a durable commit makes it so, or the writers hear
            // that it may not survive a crash. Retrying the changes would apply them twice.
            tracing::warn!(error = %e, "turn log write failed; committing durably instead");
            if let Err(e) = self.checkpoint(log) {
                // The caches are dropped for these conversations, so the next read loads
                // whatever the database holds.
                for q in batch {
                    self.histories.invalidate(&q.cid);
                    self.cache.invalidate(&q.chid);
                }
                return Ok(batch
                    .iter()
                    .map(|_| {
                        Err(StoreError::Task(format!(
                            "the commit could not be made durable: {e}"
                        )))
                    })
                    .collect());
            }
        } else {
            log.pending += batch.len();
        }
        Ok(results)
    }

    /// Applies `batch` and records the log position `lsn` in one commit.
    fn commit_batch(
        &self,
        batch: &[Queued],
        log_id: u128,
        lsn: u64,
        durability: Durability,
    ) -> Result<Applied, StoreError> {
        let txn = self.write_with(durability)?;
        let applied = apply_changes(&txn, batch)?;
        set_log_position(&txn, log_id, lsn)?;
        txn.commit()?;
        Ok(applied)
    }

    /// A durable commit of the log position: everything logged so far is now durable in the
    /// database, so the log starts over.
    fn checkpoint(&self, log: &mut TurnLog) -> Result<(), StoreError> {
        let txn = self.write()?;
        set_log_position(&txn, log.id, log.last_lsn)?;
        txn.commit()?;
        log.reset();
        Ok(())
    }

    /// Makes every logged turn durable in the database itself and starts the log over, so the
    /// database file alone is complete (the server calls it when it shuts down).
    pub fn checkpoint_turns(&self) -> Result<(), StoreError> {
        let mut log = lock(&self.turn_log);
        if log.pending == 0 {
            return Ok(());
        }
        self.checkpoint(&mut log)
    }

    /// Checkpoints once enough is logged; the committer calls it when its queue empties, after
    /// answering the writers, so the durable commit's sync is off their path.
    fn checkpoint_if_due(&self) {
        let mut log = lock(&self.turn_log);
        if log.pending >= CHECKPOINT_CHANGES || log.used() >= CHECKPOINT_BYTES {
            if let Err(e) = self.checkpoint(&mut log) {
                tracing::warn!(error = %e, "turn log checkpoint failed; the log keeps the turns");
            }
        }
    }

    /// Applies the records a crash left in the turn log past the database's last durable
    /// commit, in order, in one durable commit; then the log starts over. A log from another
    /// database (its id differs from the one stored here) is not applied, and gets a new id.
    pub(crate) fn replay_turn_log(&self, records: Vec<Record>) -> Result<(), StoreError> {
        let mut log = lock(&self.turn_log);
        let txn = self.write()?;
        let stored = log_position(&txn)?;
        let from = match stored {
            Some((id, lsn)) if id == log.id => lsn,
            _ => u64::MAX,
        };
        let mut applied = 0usize;
        for r in records.iter().filter(|r| r.lsn > from) {
            let changes: Vec<ConversationChange> =
                serde_json::from_slice(&r.payload).map_err(|e| {
                    StoreError::Corrupt(format!(
                        "turn log record {}: {e}; move the .turns file aside to open the \
                         database without it",
                        r.lsn
                    ))
                })?;
            let mut batch = Vec::with_capacity(changes.len());
            for change in changes {
                let (Some(cid), Some(chid)) = (
                    parse_id(&change.conversation.id),
                    parse_id(&change.conversation.character_id),
                ) else {
                    continue;
                };
                batch.push(Queued::new(cid, chid, change)?);
            }
            apply_changes(&txn, &batch)?;
            applied += batch.len();
        }
        if let Some((_, lsn)) = stored {
            log.last_lsn = log.last_lsn.max(lsn);
        }
        let renew = from == u64::MAX;
        if renew {
            log.renew()
                .map_err(|e| StoreError::Corrupt(format!("turn log: {e}")))?;
        }
        // With nothing applied and the same log, the stored position already covers every
        // record: no commit (and no sync) at start-up.
        if renew || records.iter().any(|r| r.lsn > from) {
            set_log_position(&txn, log.id, log.last_lsn)?;
            txn.commit()?;
        }
        log.reset();
        if applied > 0 {
            tracing::info!(
                changes = applied,
                "applied conversation changes from the turn log"
            );
        }
        Ok(())
    }

    /// Updates the caches after a commit and returns each change's history.
    fn publish(
        &self,
        batch: &[Queued],
        accepted: Vec<bool>,
        usage: HashMap<u128, u64>,
    ) -> Vec<Result<Arc<History>, StoreError>> {
        for (chid, n) in usage {
            self.set_cached_usage(chid, n);
        }
        batch
            .iter()
            .zip(accepted)
            .map(|(q, ok)| {
                if ok {
                    self.cached_history_after(q.cid, &q.change)
                } else {
                    Err(StoreError::NotFound(
                        q.change.conversation.character_id.clone(),
                    ))
                }
            })
            .collect()
    }

    /// Replaces the cached history of a committed change: the previous one plus the changes.
    fn cached_history_after(
        &self,
        cid: u128,
        change: &ConversationChange,
    ) -> Result<Arc<History>, StoreError> {
        let ConversationChange {
            conversation,
            previous,
            upserts,
            removed,
            ..
        } = change;
        let mut messages = match self.histories.get(&cid) {
            Some(h) => h.messages.clone(),
            None => Vec::new(),
        };
        if previous.is_some()
            && messages.is_empty()
            && conversation.message_count > upserts.len() as u64
        {
            // Not cached before: drop it so the next read loads the whole history.
            self.histories.invalidate(&cid);
            return self
                .history(cid)?
                .ok_or_else(|| StoreError::NotFound(conversation.id.clone()));
        }
        if !removed.is_empty() {
            messages.retain(|m| !removed.contains(&m.seq));
        }
        // Upserts are almost always new messages after the last one: append those without
        // touching (or re-sorting) the rest of a long history.
        let mut sorted = true;
        for m in upserts {
            let m = Arc::new(m.clone());
            if messages.last().is_none_or(|last| last.seq < m.seq) {
                messages.push(m);
                continue;
            }
            match messages.iter_mut().rev().find(|x| x.seq == m.seq) {
                Some(slot) => *slot = m,
                None => {
                    messages.push(m);
                    sorted = false;
                }
            }
        }
        if !sorted {
            messages.sort_by_key(|m| m.seq);
        }
        let h = Arc::new(History {
            conversation: conversation.clone(),
            messages,
        });
        self.histories.insert(cid, h.clone());
        Ok(h)
    }

    /// Deletes a conversation and its messages.
    pub fn delete_conversation(&self, cid: u128) -> Result<(), StoreError> {
        let txn = self.write()?;
        {
            let conv: Conversation = {
                let t = txn.open_table(CONVERSATIONS)?;
                let raw = t
                    .get(cid)?
                    .ok_or_else(|| StoreError::NotFound("conversation".into()))?;
                decode_record(raw.value())?
            };
            delete_conversation_rows(&txn, cid, &conv)?;
        }
        txn.commit()?;
        self.histories.invalidate(&cid);
        Ok(())
    }

    /// A user's conversations with a character, newest activity first.
    pub fn list_conversations(
        &self,
        user: &str,
        character: u128,
        before: Option<(i64, u128)>,
        limit: usize,
    ) -> Result<ConversationPage, StoreError> {
        let txn = self.db.begin_read()?;
        let index = txn.open_table(CONV_BY_USER)?;
        let upper = match before {
            Some((t, id)) => (user, character, t, id),
            None => (user, character, i64::MAX, u128::MAX),
        };
        let lower = (user, character, i64::MIN, 0u128);
        let convs = txn.open_table(CONVERSATIONS)?;
        let mut out = Vec::with_capacity(limit);
        let mut next = None;
        for item in index.range(lower..=upper)?.rev() {
            let (k, _) = item?;
            let (_, _, t, id) = k.value();
            if Some((t, id)) == before {
                continue;
            }
            if out.len() == limit {
                next = out
                    .last()
                    .map(|c: &Conversation| (ms(&c.last_activity), parse_id(&c.id).unwrap_or(0)));
                break;
            }
            if let Some(raw) = convs.get(id)? {
                out.push(decode_record(raw.value())?);
            }
        }
        Ok(ConversationPage {
            conversations: out,
            next,
        })
    }

    /// Ids of every conversation of a user, with any character (export).
    pub fn user_conversation_ids(&self, user: &str) -> Result<Vec<u128>, StoreError> {
        let txn = self.db.begin_read()?;
        let index = txn.open_table(CONV_BY_USER)?;
        let mut out = Vec::new();
        for item in
            index.range((user, 0u128, i64::MIN, 0u128)..=(user, u128::MAX, i64::MAX, u128::MAX))?
        {
            out.push(item?.0.value().3);
        }
        Ok(out)
    }

    /// The user's most recently active conversation with a character.
    pub fn latest_conversation(
        &self,
        user: &str,
        character: u128,
    ) -> Result<Option<u128>, StoreError> {
        let txn = self.db.begin_read()?;
        let index = txn.open_table(CONV_BY_USER)?;
        let mut range = index
            .range((user, character, i64::MIN, 0u128)..=(user, character, i64::MAX, u128::MAX))?;
        match range.next_back() {
            Some(item) => Ok(Some(item?.0.value().3)),
            None => Ok(None),
        }
    }

    /// Per-character counters.
    pub fn character_stats(&self, character: u128) -> Result<CharacterStats, StoreError> {
        // Read before the transaction: the snapshot is then at least this generation.
        let generation = self.generation();
        if let Some((at, stats)) = self.stats.get(&character) {
            if at == generation {
                return Ok(stats);
            }
        }
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CHARACTER_STATS)?;
        let stats = match t.get(character)? {
            Some(raw) => decode_record(raw.value())?,
            None => CharacterStats::default(),
        };
        self.stats.insert(character, (generation, stats.clone()));
        Ok(stats)
    }

    /// A stored idempotent response.
    pub fn idempotent(
        &self,
        user: &str,
        key: &str,
    ) -> Result<Option<IdempotentRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(IDEMPOTENCY)?;
        match t.get((user, key))? {
            Some(raw) => Ok(Some(decode_record(raw.value())?)),
            None => Ok(None),
        }
    }

    /// Records an idempotent response.
    pub fn put_idempotent(
        &self,
        user: &str,
        key: &str,
        record: &IdempotentRecord,
    ) -> Result<(), StoreError> {
        let txn = self.write()?;
        txn.open_table(IDEMPOTENCY)?
            .insert((user, key), encode_record(record)?.as_slice())?;
        txn.commit()?;
        Ok(())
    }
}

fn delete_conversation_rows(
    txn: &WriteTransaction,
    cid: u128,
    conv: &Conversation,
) -> Result<(), StoreError> {
    let chid = parse_id(&conv.character_id).unwrap_or(0);
    txn.open_table(CONV_BY_USER)?.remove((
        conv.user_id.as_str(),
        chid,
        ms(&conv.last_activity),
        cid,
    ))?;
    txn.open_table(CONV_BY_CHARACTER)?.remove((chid, cid))?;
    txn.open_table(CONVERSATIONS)?.remove(cid)?;
    let mut msgs = txn.open_table(MESSAGES)?;
    let seqs: Vec<u64> = msgs
        .range((cid, 0u64)..=(cid, u64::MAX))?
        .filter_map(|i| i.ok().map(|(k, _)| k.value().1))
        .collect();
    let removed = seqs.len() as u64;
    for seq in seqs {
        msgs.remove((cid, seq))?;
    }
    let mut stats_table = txn.open_table(CHARACTER_STATS)?;
    let stats: Option<CharacterStats> = match stats_table.get(chid)? {
        Some(raw) => Some(decode_record(raw.value())?),
        None => None,
    };
    if let Some(mut stats) = stats {
        stats.conversation_count = stats.conversation_count.saturating_sub(1);
        stats.message_count = stats.message_count.saturating_sub(removed);
        stats_table.insert(chid, encode_record(&stats)?.as_slice())?;
    }
    Ok(())
}

/// Removes every conversation of a character (inside the character-deleting transaction).
pub(crate) fn delete_character_conversations(
    txn: &WriteTransaction,
    chid: u128,
) -> Result<Vec<u128>, StoreError> {
    let ids: Vec<u128> = txn
        .open_table(CONV_BY_CHARACTER)?
        .range((chid, 0u128)..=(chid, u128::MAX))?
        .filter_map(|i| i.ok().map(|(k, _)| k.value().1))
        .collect();
    for cid in &ids {
        let conv: Option<Conversation> = {
            let t = txn.open_table(CONVERSATIONS)?;
            let raw = t.get(*cid)?;
            match raw {
                Some(raw) => Some(decode_record(raw.value())?),
                None => None,
            }
        };
        if let Some(conv) = conv {
            delete_conversation_rows(txn, *cid, &conv)?;
        }
    }
    txn.open_table(CHARACTER_STATS)?.remove(chid)?;
    Ok(ids)
}

/// For each change of a batch whether it was accepted (its character still exists), and the
/// new usageCount of each character whose count moved (for the cache).
type Applied = (Vec<bool>, HashMap<u128, u64>);

/// Writes `batch` into `txn`.
fn apply_changes(txn: &WriteTransaction, batch: &[Queued]) -> Result<Applied, StoreError> {
    let mut accepted = Vec::with_capacity(batch.len());
    // Counters touched by several changes are read and written once.
    let mut stats: HashMap<u128, CharacterStats> = HashMap::new();
    let mut usage: HashMap<u128, u64> = HashMap::new();
    {
        let chars = txn.open_table(CHARACTERS)?;
        let mut by_user = txn.open_table(CONV_BY_USER)?;
        let mut by_character = txn.open_table(CONV_BY_CHARACTER)?;
        let mut convs = txn.open_table(CONVERSATIONS)?;
        let mut msgs = txn.open_table(MESSAGES)?;
        let mut stats_table = txn.open_table(CHARACTER_STATS)?;
        for q in batch {
            let (cid, chid, change) = (q.cid, q.chid, &q.change);
            // The character must still exist: a conversation never outlives it.
            let Some(record) = chars.get(chid)? else {
                accepted.push(false);
                continue;
            };
            accepted.push(true);
            let conversation = &change.conversation;
            if let Some(prev) = &change.previous {
                by_user.remove((prev.user_id.as_str(), chid, ms(&prev.last_activity), cid))?;
            }
            by_user.insert(
                (
                    conversation.user_id.as_str(),
                    chid,
                    ms(&conversation.last_activity),
                    cid,
                ),
                (),
            )?;
            let existed = convs.insert(cid, q.conversation.as_slice())?.is_some();
            // Its character-index key never changes: rewriting it would only dirty pages
            // that the commit then has to write and sync.
            if !existed {
                by_character.insert((chid, cid), ())?;
            }
            let mut new_messages = 0u64;
            for (m, encoded) in change.upserts.iter().zip(&q.upserts) {
                let existed = msgs.insert((cid, m.seq), encoded.as_slice())?.is_some();
                new_messages += u64::from(!existed);
            }
            let mut removed_count = 0u64;
            for seq in &change.removed {
                removed_count += u64::from(msgs.remove((cid, *seq))?.is_some());
            }
            let s = match stats.entry(chid) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => e.insert(match stats_table.get(chid)? {
                    Some(raw) => decode_record(raw.value())?,
                    None => CharacterStats::default(),
                }),
            };
            s.conversation_count += u64::from(change.previous.is_none());
            s.message_count = (s.message_count + new_messages).saturating_sub(removed_count);
            s.last_used_ms = Some(ms(&conversation.last_activity));
            if change.usage_delta > 0 {
                // The record's count is read once per character, at its first turn here.
                let base = match s.usage_count {
                    Some(n) => n,
                    None => decode_record::<Character>(record.value())?.usage_count,
                };
                let n = base + change.usage_delta;
                s.usage_count = Some(n);
                usage.insert(chid, n);
            }
        }
        for (chid, s) in &stats {
            stats_table.insert(*chid, encode_record(s)?.as_slice())?;
        }
    }
    Ok((accepted, usage))
}

/// Records in `txn` which turn log the database follows and the last commit's sequence number.
fn set_log_position(txn: &WriteTransaction, id: u128, lsn: u64) -> Result<(), StoreError> {
    let mut value = [0u8; 24];
    value[..16].copy_from_slice(&id.to_le_bytes());
    value[16..].copy_from_slice(&lsn.to_le_bytes());
    txn.open_table(META)?
        .insert(TURN_LOG_KEY, value.as_slice())?;
    Ok(())
}

/// The turn log id and sequence number `set_log_position` stored, if any.
fn log_position(txn: &WriteTransaction) -> Result<Option<(u128, u64)>, StoreError> {
    let meta = txn.open_table(META)?;
    let Some(raw) = meta.get(TURN_LOG_KEY)? else {
        return Ok(None);
    };
    let v = raw.value();
    let (Some(id), Some(lsn)) = (v.get(..16), v.get(16..24)) else {
        return Ok(None);
    };
    let mut id_bytes = [0u8; 16];
    id_bytes.copy_from_slice(id);
    let mut lsn_bytes = [0u8; 8];
    lsn_bytes.copy_from_slice(lsn);
    Ok(Some((
        u128::from_le_bytes(id_bytes),
        u64::from_le_bytes(lsn_bytes),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreConfig;
    use crate::conversations::new_message;
    use crate::model::MessageRole;
    use serde_json::{Map, Value};

    fn history(messages: usize, bytes_each: usize) -> History {
        History {
            conversation: Conversation {
                id: uuid::Uuid::now_v7().to_string(),
                character_id: uuid::Uuid::now_v7().to_string(),
                user_id: "u".into(),
                started_at: String::new(),
                last_activity: String::new(),
                title: None,
                message_count: messages as u64,
                next_seq: messages as u64,
                user_name: "User".into(),
                lore_state: Value::Null,
                character_state: None,
                seed: 0,
                chat_metadata: Map::new(),
                plugin_state: Map::new(),
            },
            messages: (0..messages)
                .map(|i| {
                    Arc::new(new_message(
                        i as u64,
                        MessageRole::User,
                        "User",
                        "x".repeat(bytes_each),
                    ))
                })
                .collect(),
        }
    }

    /// Opens the file again once the last committer has let go of it: a committer answers its
    /// writers before its idle step and drops its handle on the store only after that, so the
    /// file can stay locked for a moment after the test's own handle is dropped.
    async fn reopen(path: &std::path::Path) -> Store {
        for _ in 0..500 {
            match Store::open(path, &StoreConfig::default()) {
                Err(StoreError::Db(redb::Error::DatabaseAlreadyOpen)) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await
                }
                other => return other.unwrap(),
            }
        }
        panic!("the store was still held after 5 s");
    }

    #[tokio::test]
    async fn usage_moves_to_the_stats_from_the_records_count_without_rewriting_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let store = Store::open(&path, &StoreConfig::default()).unwrap();
        // A record that carries a count from before counts moved to the stats.
        let character: Character = serde_json::from_value(serde_json::json!({
            "id": uuid::Uuid::now_v7().to_string(), "name": "Old", "description": "",
            "createdAt": "2026-01-01T00:00:00Z", "updatedAt": "2026-01-01T00:00:00Z",
            "personality": {}, "isPublic": false, "isActive": true, "usageCount": 7,
            "creatorId": "u", "version": 1
        }))
        .unwrap();
        store.create_many(std::slice::from_ref(&character)).unwrap();
        let id = parse_id(&character.id).unwrap();
        let mut conversation = history(0, 0).conversation;
        conversation.character_id = character.id.clone();
        for _ in 0..2 {
            store
                .save_conversation(ConversationChange {
                    conversation: conversation.clone(),
                    previous: None,
                    upserts: Vec::new(),
                    removed: Vec::new(),
                    usage_delta: 1,
                })
                .await
                .unwrap();
        }
        assert_eq!(store.get_character(id).unwrap().unwrap().usage_count, 9);
        assert_eq!(store.character_stats(id).unwrap().usage_count, Some(9));
        let recorded: Character = {
            let txn = store.db.begin_read().unwrap();
            let t = txn.open_table(CHARACTERS).unwrap();
            decode_record(t.get(id).unwrap().unwrap().value()).unwrap()
        };
        assert_eq!(
            recorded, character,
            "a turn leaves the character record alone"
        );
        store.checkpoint_turns().unwrap();
        drop(store);
        let store = reopen(&path).await;
        assert_eq!(store.get_character(id).unwrap().unwrap().usage_count, 9);
    }

    #[test]
    fn the_log_record_is_the_serialized_changes_with_the_stored_records_spliced_in() {
        let first = history(2, 10);
        let mut second = history(0, 0);
        // Text that JSON must escape, a removal and a previous record exercise every field.
        second.conversation.title = Some("quote \" and \u{2028} and \\".into());
        let mut message = new_message(7, MessageRole::Character, "Sera", "line\nbreak".into());
        message.swipes = vec!["a".into(), "b\t".into()];
        let changes = vec![
            ConversationChange {
                conversation: first.conversation.clone(),
                previous: None,
                upserts: first.messages.iter().map(|m| (**m).clone()).collect(),
                removed: vec![],
                usage_delta: 1,
            },
            ConversationChange {
                conversation: second.conversation.clone(),
                previous: Some(first.conversation.clone()),
                upserts: vec![message],
                removed: vec![3, 4],
                usage_delta: 0,
            },
        ];
        let batch: Vec<Queued> = changes
            .iter()
            .map(|c| Queued::new(1, 2, c.clone()).unwrap())
            .collect();
        let record = log_record(&batch).unwrap();
        assert_eq!(
            String::from_utf8(record.clone()).unwrap(),
            String::from_utf8(serde_json::to_vec(&changes).unwrap()).unwrap()
        );
        // What replay reads back is what was queued.
        let back: Vec<ConversationChange> = serde_json::from_slice(&record).unwrap();
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&changes).unwrap()
        );
        assert_eq!(log_record(&[]).unwrap(), b"[]");
    }

    #[test]
    fn a_history_weighs_at_least_its_texts() {
        let long = history(10, 100_000);
        assert!(long.weight() >= 1_000_000, "{}", long.weight());
        // Calibrated on short chats: three short messages cost a few KB, not a few bytes.
        let short = history(3, 50).weight();
        assert!((2_000..8_000).contains(&short), "{short}");
    }

    #[test]
    fn the_history_cache_keeps_to_its_byte_budget() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            history_cache_mb: 1,
            ..StoreConfig::default()
        };
        let store = Store::open(&dir.path().join("t.redb"), &config).unwrap();
        // 40 histories of ~100 KB each: far over 1 MiB, so most must be evicted.
        for i in 0..40u128 {
            store.histories.insert(i, Arc::new(history(4, 25_000)));
        }
        store.histories.run_pending_tasks();
        assert!(
            store.histories.weighted_size() <= 1 << 20,
            "{} bytes cached",
            store.histories.weighted_size()
        );
        assert!(
            store.histories.entry_count() >= 5,
            "the budget still holds some"
        );
    }
}
