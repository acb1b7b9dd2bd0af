//! Memory entries and rolling summaries. Keys put the character first and the owning user
//! second (`""` for the character's shared memory), so everything recall needs for one
//! (character, user) is two range scans, and deleting a character is one more.

use super::conversations::{CharacterStats, CHARACTER_STATS};
use super::{decode_record, encode_record, Store, StoreError};
use crate::memory::types::{ConversationMemory, SummaryState};
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

/// (character, scope user — `""` for character scope, id) → ConversationMemory.
pub(crate) const MEMORY: TableDefinition<(u128, &str, u128), &[u8]> =
    TableDefinition::new("memory");
/// (character, user, conversation) → SummaryState.
pub(crate) const MEMORY_SUMMARY: TableDefinition<(u128, &str, u128), &[u8]> =
    TableDefinition::new("memory_summary");

/// (character, scope user, id) → embedding vector (little-endian f32s), when an embeddings
/// upstream is configured.
pub(crate) const MEMORY_VECTORS: TableDefinition<(u128, &str, u128), &[u8]> =
    TableDefinition::new("memory_vectors");

/// The key owner of the character's shared memory.
pub const SHARED_MEMORY: &str = "";

impl Store {
    fn memory_txn(&self) -> Result<super::Write, StoreError> {
        self.write()
    }

    /// Inserts new memory entries of one (character, scope user) and counts them in the
    /// character's statistics, in one durable transaction.
    pub fn insert_memories(
        &self,
        character: u128,
        scope_user: &str,
        entries: &[ConversationMemory],
    ) -> Result<(), StoreError> {
        let txn = self.memory_txn()?;
        {
            let mut table = txn.open_table(MEMORY)?;
            let mut added = 0u64;
            for e in entries {
                let id = super::parse_id(&e.id)
                    .ok_or_else(|| StoreError::Corrupt("memory id".into()))?;
                let existed = table
                    .insert((character, scope_user, id), encode_record(e)?.as_slice())?
                    .is_some();
                added += u64::from(!existed);
            }
            adjust_memory_count(&txn, character, added as i64)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Replaces an existing entry; `NotFound` when it does not exist under that key.
    pub fn update_memory(
        &self,
        character: u128,
        scope_user: &str,
        entry: &ConversationMemory,
    ) -> Result<(), StoreError> {
        let id =
            super::parse_id(&entry.id).ok_or_else(|| StoreError::NotFound(entry.id.clone()))?;
        let txn = self.memory_txn()?;
        {
            let mut table = txn.open_table(MEMORY)?;
            if table.get((character, scope_user, id))?.is_none() {
                return Err(StoreError::NotFound(entry.id.clone()));
            }
            table.insert(
                (character, scope_user, id),
                encode_record(entry)?.as_slice(),
            )?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Removes an entry and returns it; `None` when it did not exist.
    pub fn remove_memory(
        &self,
        character: u128,
        scope_user: &str,
        id: u128,
    ) -> Result<Option<ConversationMemory>, StoreError> {
        let txn = self.memory_txn()?;
        let removed: Option<ConversationMemory> = {
            let mut table = txn.open_table(MEMORY)?;
            let raw = table.remove((character, scope_user, id))?;
            match raw {
                Some(raw) => Some(decode_record(raw.value())?),
                None => None,
            }
        };
        if removed.is_some() {
            adjust_memory_count(&txn, character, -1)?;
            txn.open_table(MEMORY_VECTORS)?
                .remove((character, scope_user, id))?;
        }
        txn.commit()?;
        Ok(removed)
    }

    /// One entry.
    pub fn get_memory(
        &self,
        character: u128,
        scope_user: &str,
        id: u128,
    ) -> Result<Option<ConversationMemory>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MEMORY)?;
        match table.get((character, scope_user, id))? {
            Some(raw) => Ok(Some(decode_record(raw.value())?)),
            None => Ok(None),
        }
    }

    /// Every entry of one (character, scope user), oldest first (ids are UUID v7).
    pub fn list_memories(
        &self,
        character: u128,
        scope_user: &str,
    ) -> Result<Vec<ConversationMemory>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MEMORY)?;
        let mut out = Vec::new();
        for item in
            table.range((character, scope_user, 0u128)..=(character, scope_user, u128::MAX))?
        {
            let (_, v) = item?;
            out.push(decode_record(v.value())?);
        }
        Ok(out)
    }

    /// Adds one to `recallCount` and sets `lastRecalledAt` on each entry that still exists.
    /// Bookkeeping only: the recall that caused it has already been answered.
    pub fn note_recalls(
        &self,
        character: u128,
        recalled: &[(String, u128)],
        at: &str,
    ) -> Result<(), StoreError> {
        let txn = self.memory_txn()?;
        {
            let mut table = txn.open_table(MEMORY)?;
            for (scope_user, id) in recalled {
                let key = (character, scope_user.as_str(), *id);
                let current: Option<ConversationMemory> = match table.get(key)? {
                    Some(raw) => Some(decode_record(raw.value())?),
                    None => None,
                };
                if let Some(mut m) = current {
                    m.recall_count += 1;
                    m.last_recalled_at = Some(at.to_string());
                    table.insert(key, encode_record(&m)?.as_slice())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Stores the embedding of an entry that still exists (a vector computed for an entry
    /// removed meanwhile is dropped).
    pub fn put_memory_vector(
        &self,
        character: u128,
        scope_user: &str,
        id: u128,
        vector: &[f32],
    ) -> Result<bool, StoreError> {
        let txn = self.memory_txn()?;
        let exists = txn
            .open_table(MEMORY)?
            .get((character, scope_user, id))?
            .is_some();
        if exists {
            let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
            txn.open_table(MEMORY_VECTORS)?
                .insert((character, scope_user, id), bytes.as_slice())?;
        }
        txn.commit()?;
        Ok(exists)
    }

    /// Every stored embedding of one (character, scope user).
    pub fn list_memory_vectors(
        &self,
        character: u128,
        scope_user: &str,
    ) -> Result<Vec<(u128, Vec<f32>)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MEMORY_VECTORS)?;
        let mut out = Vec::new();
        for item in
            table.range((character, scope_user, 0u128)..=(character, scope_user, u128::MAX))?
        {
            let (k, v) = item?;
            let vector = v
                .value()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            out.push((k.value().2, vector));
        }
        Ok(out)
    }

    /// The summarizer state of one conversation (default when none was stored).
    pub fn summary_state(
        &self,
        character: u128,
        user: &str,
        conversation: u128,
    ) -> Result<SummaryState, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MEMORY_SUMMARY)?;
        match table.get((character, user, conversation))? {
            Some(raw) => decode_record(raw.value()),
            None => Ok(SummaryState::default()),
        }
    }

    /// Stores the summarizer state of one conversation; `NotFound` once the character is gone.
    pub fn put_summary_state(
        &self,
        character: u128,
        user: &str,
        conversation: u128,
        state: &SummaryState,
    ) -> Result<(), StoreError> {
        let txn = self.memory_txn()?;
        // Checked in the same transaction so a summary never outlives its character.
        if txn.open_table(super::CHARACTERS)?.get(character)?.is_none() {
            return Err(StoreError::NotFound(
                uuid::Uuid::from_u128(character).to_string(),
            ));
        }
        txn.open_table(MEMORY_SUMMARY)?.insert(
            (character, user, conversation),
            encode_record(state)?.as_slice(),
        )?;
        txn.commit()?;
        Ok(())
    }

    /// Every summarizer state of a user with a character, by conversation.
    pub fn summary_states(
        &self,
        character: u128,
        user: &str,
    ) -> Result<Vec<(u128, SummaryState)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MEMORY_SUMMARY)?;
        let mut out = Vec::new();
        for item in table.range((character, user, 0u128)..=(character, user, u128::MAX))? {
            let (k, v) = item?;
            out.push((k.value().2, decode_record(v.value())?));
        }
        Ok(out)
    }
}

/// Moves the character's `memoryCount` statistic by `delta`.
fn adjust_memory_count(
    txn: &WriteTransaction,
    character: u128,
    delta: i64,
) -> Result<(), StoreError> {
    if delta == 0 {
        return Ok(());
    }
    let mut stats_table = txn.open_table(CHARACTER_STATS)?;
    let mut stats: CharacterStats = match stats_table.get(character)? {
        Some(raw) => decode_record(raw.value())?,
        None => CharacterStats::default(),
    };
    stats.memory_count = stats.memory_count.saturating_add_signed(delta);
    stats_table.insert(character, encode_record(&stats)?.as_slice())?;
    Ok(())
}

/// Removes every memory entry and summary of a character (inside the character-deleting
/// transaction).
pub(crate) fn delete_character_memories(
    txn: &WriteTransaction,
    character: u128,
) -> Result<(), StoreError> {
    for def in [MEMORY, MEMORY_SUMMARY, MEMORY_VECTORS] {
        let mut table = txn.open_table(def)?;
        let keys: Vec<(String, u128)> = {
            let lower = (character, "", 0u128);
            let items: Vec<_> = match character.checked_add(1) {
                Some(next) => table.range(lower..(next, "", 0u128))?.collect(),
                None => table.range(lower..)?.collect(),
            };
            let mut keys = Vec::with_capacity(items.len());
            for item in items {
                let (k, _) = item?;
                let (_, user, id) = k.value();
                keys.push((user.to_string(), id));
            }
            keys
        };
        for (user, id) in keys {
            table.remove((character, user.as_str(), id))?;
        }
    }
    Ok(())
}
