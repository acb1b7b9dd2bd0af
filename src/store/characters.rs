//! Character records, their index entries, avatars and the per-owner quota counter, always
//! written together in one transaction.

use super::conversations::{CharacterStats, CHARACTER_STATS};
use super::summary::{Summary, SummaryView};
use super::{
    decode_record, encode_record, Cached, RowsKey, Store, StoreError, AVATARS, BY_GROUP, BY_OWNER,
    BY_OWNER_MODIFIED, BY_TAG, CHARACTERS, OWNER_COUNTS, PUBLIC, SLUGS,
};
use crate::model::Character;
use moka::ops::compute::Op;
use redb::{ReadableDatabase, ReadableTable, WriteTransaction};
use std::sync::Arc;
use uuid::Uuid;

/// Which characters a listing covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The caller's own.
    Own,
    /// Everyone's public characters.
    Public,
    /// Own plus everyone's public.
    All,
}

/// Listing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CharacterSort {
    Name,
    Created,
    Modified,
    Usage,
}

/// A listing request, already validated.
#[derive(Debug, Clone)]
pub struct CharacterQuery {
    pub owner: String,
    pub scope: Scope,
    /// Lowercased search text.
    pub search: Option<String>,
    /// Lowercased tags that must all be present.
    pub tags: Vec<String>,
    pub sort: CharacterSort,
    pub descending: bool,
    pub limit: usize,
    pub offset: usize,
}

/// A stored avatar image.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAvatar {
    pub content_type: String,
    pub etag: String,
    pub bytes: Vec<u8>,
}

impl StoredAvatar {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes.len() + 64);
        out.push(1u8);
        for s in [&self.content_type, &self.etag] {
            out.extend_from_slice(&(s.len() as u16).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        out.extend_from_slice(&self.bytes);
        out
    }

    fn decode(b: &[u8]) -> Result<Self, StoreError> {
        let corrupt = || StoreError::Corrupt("avatar record".into());
        let mut pos = 1usize;
        if b.first() != Some(&1) {
            return Err(corrupt());
        }
        let mut strings = Vec::with_capacity(2);
        for _ in 0..2 {
            let len = b.get(pos..pos + 2).ok_or_else(corrupt)?;
            let n = u16::from_le_bytes([len[0], len[1]]) as usize;
            let s = b.get(pos + 2..pos + 2 + n).ok_or_else(corrupt)?;
            strings.push(String::from_utf8(s.to_vec()).map_err(|_| corrupt())?);
            pos += 2 + n;
        }
        let etag = strings.pop().ok_or_else(corrupt)?;
        let content_type = strings.pop().ok_or_else(corrupt)?;
        Ok(Self {
            content_type,
            etag,
            bytes: b.get(pos..).ok_or_else(corrupt)?.to_vec(),
        })
    }
}

/// What an update does to the stored avatar image.
#[derive(Debug, Clone)]
pub enum AvatarChange {
    Keep,
    Set(StoredAvatar),
    Remove,
}

/// A related-character candidate.
#[derive(Debug, Clone)]
pub struct RelatedCandidate {
    pub id: u128,
    pub owner: String,
    pub public: bool,
    pub score: u32,
}

fn encode_posting(c: &Character) -> Vec<u8> {
    let mut out = Vec::with_capacity(c.creator_id.len() + 1);
    out.push(u8::from(c.is_public && c.is_active));
    out.extend_from_slice(c.creator_id.as_bytes());
    out
}

/// (owner, public) of a posting, borrowed: most postings are skipped, so allocate only for kept ones.
fn decode_posting(raw: &[u8]) -> Option<(&str, bool)> {
    let (flag, owner) = raw.split_first()?;
    Some((std::str::from_utf8(owner).ok()?, *flag == 1))
}

/// Parses a character id; anything that is not a UUID cannot exist.
pub fn parse_id(id: &str) -> Option<u128> {
    Uuid::parse_str(id).ok().map(|u| u.as_u128())
}

impl Store {
    /// A character by id, from the cache when possible.
    pub fn get_character(&self, id: u128) -> Result<Option<Arc<Character>>, StoreError> {
        if let Some(cached) = self.cache.get(&id) {
            self.count_cache(true);
            return Ok(match cached {
                Cached::Live(c) => Some(c),
                Cached::Gone => None,
            });
        }
        self.count_cache(false);
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CHARACTERS)?;
        let Some(raw) = table.get(id)? else {
            return Ok(None);
        };
        let mut loaded: Character = decode_record(raw.value())?;
        loaded.usage_count = usage(&txn.open_table(CHARACTER_STATS)?, id, loaded.usage_count)?;
        let loaded = Arc::new(loaded);
        // Never replace a newer cached version (or a deletion) with this older snapshot.
        let result = self.cache.entry(id).and_compute_with(|existing| {
            match existing.map(|e| e.into_value()) {
                Some(Cached::Gone) => Op::Nop,
                Some(Cached::Live(c)) if c.version >= loaded.version => Op::Nop,
                _ => Op::Put(Cached::Live(loaded.clone())),
            }
        });
        drop(result);
        Ok(Some(loaded))
    }

    /// Inserts a new character (and its avatar), enforcing the owner's quota in the same
    /// transaction so concurrent creates cannot overshoot it.
    pub fn create_character(
        &self,
        character: &mut Character,
        avatar: Option<&StoredAvatar>,
        quota: u64,
    ) -> Result<(), StoreError> {
        let id = parse_id(&character.id).ok_or_else(|| StoreError::Corrupt("bad id".into()))?;
        let txn = self.write()?;
        {
            let mut counts = txn.open_table(OWNER_COUNTS)?;
            let count = counts
                .get(character.creator_id.as_str())?
                .map(|v| v.value())
                .unwrap_or(0);
            if count >= quota {
                return Err(StoreError::QuotaExceeded { limit: quota });
            }
            counts.insert(character.creator_id.as_str(), count + 1)?;
            let base = character.slug.clone().unwrap_or_else(|| "character".into());
            let slug = claim_slug(&txn, &base, id)?;
            character.slug = Some(slug);
            write_character(&txn, id, character, None)?;
            if let Some(avatar) = avatar {
                txn.open_table(AVATARS)?
                    .insert(id, avatar.encode().as_slice())?;
            }
        }
        txn.commit()?;
        self.slugs.changed();
        self.cache
            .insert(id, Cached::Live(Arc::new(character.clone())));
        Ok(())
    }

    /// Inserts many new characters in one transaction (bulk import and benchmarks seeding);
    /// the quota is not applied.
    pub fn create_many(&self, characters: &[Character]) -> Result<(), StoreError> {
        let txn = self.write()?;
        {
            let mut per_owner: std::collections::HashMap<String, u64> = Default::default();
            for c in characters {
                let id = parse_id(&c.id).ok_or_else(|| StoreError::Corrupt("bad id".into()))?;
                let mut c = c.clone();
                if let Some(base) = c.slug.clone() {
                    c.slug = Some(claim_slug(&txn, &base, id)?);
                }
                write_character(&txn, id, &c, None)?;
                *per_owner.entry(c.creator_id.clone()).or_default() += 1;
            }
            let mut counts = txn.open_table(OWNER_COUNTS)?;
            for (owner, n) in per_owner {
                let count = counts.get(owner.as_str())?.map(|v| v.value()).unwrap_or(0);
                counts.insert(owner.as_str(), count + n)?;
            }
        }
        txn.commit()?;
        self.slugs.changed();
        Ok(())
    }

    /// Replaces a character if its stored version still equals `expected_version`.
    pub fn update_character(
        &self,
        updated: &Character,
        expected_version: u64,
        avatar: AvatarChange,
    ) -> Result<Character, StoreError> {
        let id = parse_id(&updated.id).ok_or_else(|| StoreError::NotFound(updated.id.clone()))?;
        let txn = self.write()?;
        let stored;
        {
            let current: Character = {
                let table = txn.open_table(CHARACTERS)?;
                let raw = table
                    .get(id)?
                    .ok_or_else(|| StoreError::NotFound(updated.id.clone()))?;
                decode_record(raw.value())?
            };
            if current.version != expected_version {
                return Err(StoreError::VersionConflict {
                    current: current.version,
                });
            }
            // usageCount moves with chatting, not with edits: keep the current count.
            let mut updated = updated.clone();
            updated.usage_count =
                usage(&txn.open_table(CHARACTER_STATS)?, id, current.usage_count)?;
            if updated.slug != current.slug {
                if let Some(new) = &updated.slug {
                    let mut slugs = txn.open_table(SLUGS)?;
                    if slugs.get(new.as_str())?.is_some_and(|v| v.value() != id) {
                        return Err(StoreError::SlugTaken(new.clone()));
                    }
                    slugs.insert(new.as_str(), id)?;
                    if let Some(old) = &current.slug {
                        slugs.remove(old.as_str())?;
                    }
                } else {
                    updated.slug = current.slug.clone();
                }
            }
            write_character(&txn, id, &updated, Some(&current))?;
            stored = updated;
            let mut avatars = txn.open_table(AVATARS)?;
            match avatar {
                AvatarChange::Keep => {}
                AvatarChange::Set(a) => {
                    avatars.insert(id, a.encode().as_slice())?;
                }
                AvatarChange::Remove => {
                    avatars.remove(id)?;
                }
            }
        }
        txn.commit()?;
        self.slugs.changed();
        self.cache
            .insert(id, Cached::Live(Arc::new(stored.clone())));
        Ok(stored)
    }

    /// Deletes a character and everything stored for it, in one transaction.
    pub fn delete_character(&self, id: u128) -> Result<(), StoreError> {
        let txn = self.write()?;
        let removed_conversations;
        {
            let current: Character = {
                let table = txn.open_table(CHARACTERS)?;
                let raw = table
                    .get(id)?
                    .ok_or_else(|| StoreError::NotFound(Uuid::from_u128(id).to_string()))?;
                decode_record(raw.value())?
            };
            remove_indexes(&txn, id, &current)?;
            if let Some(slug) = &current.slug {
                txn.open_table(SLUGS)?.remove(slug.as_str())?;
            }
            txn.open_table(CHARACTERS)?.remove(id)?;
            txn.open_table(AVATARS)?.remove(id)?;
            txn.open_table(super::plugins::PLUGIN_BINDINGS)?
                .remove(id)?;
            let mut counts = txn.open_table(OWNER_COUNTS)?;
            let owner = current.creator_id.as_str();
            let count = counts.get(owner)?.map(|v| v.value()).unwrap_or(0);
            if count <= 1 {
                counts.remove(owner)?;
            } else {
                counts.insert(owner, count - 1)?;
            }
            removed_conversations = super::conversations::delete_character_conversations(&txn, id)?;
            super::memory::delete_character_memories(&txn, id)?;
        }
        txn.commit()?;
        self.cache.insert(id, Cached::Gone);
        self.bindings.changed();
        self.slugs.changed();
        for cid in removed_conversations {
            self.histories.invalidate(&cid);
        }
        Ok(())
    }

    /// The character a slug names.
    pub fn character_by_slug(&self, slug: &str) -> Result<Option<u128>, StoreError> {
        self.slugs.get_or_load(slug, || {
            let txn = self.db.begin_read()?;
            let t = txn.open_table(SLUGS)?;
            Ok(t.get(slug)?.map(|v| v.value()))
        })
    }

    /// The stored avatar image of a character.
    pub fn get_avatar(&self, id: u128) -> Result<Option<StoredAvatar>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(AVATARS)?;
        match table.get(id)? {
            Some(raw) => Ok(Some(StoredAvatar::decode(raw.value())?)),
            None => Ok(None),
        }
    }

    /// Number of characters a user owns.
    pub fn owner_count(&self, owner: &str) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let counts = txn.open_table(OWNER_COUNTS)?;
        Ok(counts.get(owner)?.map(|v| v.value()).unwrap_or(0))
    }

    /// One page of characters and the total matching the query.
    pub fn list_characters(
        &self,
        q: &CharacterQuery,
    ) -> Result<(Vec<Arc<Character>>, u64), StoreError> {
        // Before the read transaction, so cached rows are never newer than what it could see.
        let generation = self.generation();
        let txn = self.db.begin_read()?;
        // Fast path: the default order over one owner's characters is an index range scan.
        if q.scope == Scope::Own
            && q.search.is_none()
            && q.tags.is_empty()
            && q.sort == CharacterSort::Modified
        {
            let total = txn
                .open_table(OWNER_COUNTS)?
                .get(q.owner.as_str())?
                .map(|v| v.value())
                .unwrap_or(0);
            let index = txn.open_table(BY_OWNER_MODIFIED)?;
            let range = index.range(
                (q.owner.as_str(), i64::MIN, 0u128)..=(q.owner.as_str(), i64::MAX, u128::MAX),
            )?;
            let mut ids = Vec::with_capacity(q.limit);
            let iter: Box<dyn Iterator<Item = _>> = if q.descending {
                Box::new(range.rev())
            } else {
                Box::new(range)
            };
            for item in iter.skip(q.offset).take(q.limit) {
                let (key, _) = item?;
                ids.push(key.value().2);
            }
            drop(index);
            let page = self.load_many(&txn, &ids)?;
            return Ok((page, total));
        }

        // Both lists stay alive for the whole call: the views below borrow from them.
        let owned = match q.scope {
            Scope::Own | Scope::All => {
                Some(self.summary_rows(&txn, RowsKey::Owner(q.owner.clone()), generation)?)
            }
            Scope::Public => None,
        };
        let public = match q.scope {
            Scope::Public | Scope::All => {
                Some(self.summary_rows(&txn, RowsKey::Public, generation)?)
            }
            Scope::Own => None,
        };
        let mut rows: Vec<SummaryView<'_>> = Vec::new();
        let keep = |s: &SummaryView<'_>| {
            q.search.as_deref().is_none_or(|n| s.matches_search(n)) && s.has_all_tags(&q.tags)
        };
        // Every searched field is stored lowercased in the summary bytes, so a record whose
        // bytes lack the needle (or a wanted tag) cannot match: skip it without decoding.
        let needles: Vec<memchr::memmem::Finder> = q
            .search
            .iter()
            .chain(q.tags.iter())
            .map(|n| memchr::memmem::Finder::new(n.as_bytes()))
            .collect();
        let may_match = |raw: &[u8]| needles.iter().all(|f| f.find(raw).is_some());
        if let Some(owned) = &owned {
            for (_, raw) in owned.rows.iter() {
                if !may_match(raw) {
                    continue;
                }
                let s =
                    SummaryView::parse(raw).ok_or_else(|| StoreError::Corrupt("summary".into()))?;
                if keep(&s) {
                    rows.push(s);
                }
            }
        }
        if let Some(public) = &public {
            for (_, raw) in public.rows.iter() {
                if !may_match(raw) {
                    continue;
                }
                let s =
                    SummaryView::parse(raw).ok_or_else(|| StoreError::Corrupt("summary".into()))?;
                // Own public characters were already collected above.
                if q.scope == Scope::All && s.owner == q.owner {
                    continue;
                }
                if keep(&s) {
                    rows.push(s);
                }
            }
        }
        let total = rows.len() as u64;
        if q.sort == CharacterSort::Usage {
            // A summary holds the count from the character record; turns move it in the stats.
            let stats = txn.open_table(CHARACTER_STATS)?;
            for row in &mut rows {
                row.usage = usage(&stats, row.id, row.usage)?;
            }
        }
        sort_summaries(&mut rows, q.sort, q.descending);
        let ids: Vec<u128> = rows
            .iter()
            .skip(q.offset)
            .take(q.limit)
            .map(|s| s.id)
            .collect();
        let page = self.load_many(&txn, &ids)?;
        Ok((page, total))
    }

    /// Characters related to `c` that its owner's audience may see (same owner or public):
    /// same group first, then most shared tags. Each returned entry says who owns it and
    /// whether it is public so callers can filter for their own viewer.
    pub fn related_candidates(
        &self,
        c: &Character,
        limit: usize,
    ) -> Result<Vec<RelatedCandidate>, StoreError> {
        // Postings per tag are capped so a very common tag cannot make this a full scan.
        const PER_KEY: usize = 300;
        let me = parse_id(&c.id).unwrap_or(0);
        let txn = self.db.begin_read()?;
        let mut scores: std::collections::HashMap<u128, RelatedCandidate> = Default::default();
        let mut visit = |id: u128, raw: &[u8], weight: u32| {
            if id == me {
                return;
            }
            if let Some((owner, public)) = decode_posting(raw) {
                if public || owner == c.creator_id {
                    scores
                        .entry(id)
                        .or_insert_with(|| RelatedCandidate {
                            id,
                            owner: owner.to_string(),
                            public,
                            score: 0,
                        })
                        .score += weight;
                }
            }
        };
        if let Some(group) = &c.group_id {
            let table = txn.open_table(BY_GROUP)?;
            for item in table
                .range((group.as_str(), 0u128)..=(group.as_str(), u128::MAX))?
                .rev()
                .take(PER_KEY)
            {
                let (k, v) = item?;
                visit(k.value().1, v.value(), 1000);
            }
        }
        let table = txn.open_table(BY_TAG)?;
        for tag in &c.tags {
            let tag = tag.to_lowercase();
            for item in table
                .range((tag.as_str(), 0u128)..=(tag.as_str(), u128::MAX))?
                .rev()
                .take(PER_KEY)
            {
                let (k, v) = item?;
                visit(k.value().1, v.value(), 1);
            }
        }
        let mut out: Vec<RelatedCandidate> = scores.into_values().collect();
        // Newer ids (UUID v7) win ties.
        out.sort_by(|a, b| b.score.cmp(&a.score).then(b.id.cmp(&a.id)));
        out.truncate(limit);
        Ok(out)
    }

    fn load_many(
        &self,
        txn: &redb::ReadTransaction,
        ids: &[u128],
    ) -> Result<Vec<Arc<Character>>, StoreError> {
        let table = txn.open_table(CHARACTERS)?;
        let stats = txn.open_table(CHARACTER_STATS)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(Cached::Live(c)) = self.cache.get(id) {
                out.push(c);
                continue;
            }
            if let Some(raw) = table.get(*id)? {
                let mut c: Character = decode_record(raw.value())?;
                c.usage_count = usage(&stats, *id, c.usage_count)?;
                out.push(Arc::new(c));
            }
        }
        Ok(out)
    }

    /// Puts the usageCount a turn committed into the character's cached copy.
    pub(crate) fn set_cached_usage(&self, id: u128, usage: u64) {
        let _ = self.cache.entry(id).and_compute_with(|existing| {
            match existing.map(|e| e.into_value()) {
                Some(Cached::Live(c)) if c.usage_count != usage => {
                    let mut c = Character::clone(&c);
                    c.usage_count = usage;
                    Op::Put(Cached::Live(Arc::new(c)))
                }
                _ => Op::Nop,
            }
        });
    }
}

/// The usageCount of character `id` whose record says `recorded`, as of the transaction that
/// opened `stats`.
fn usage(
    stats: &impl ReadableTable<u128, &'static [u8]>,
    id: u128,
    recorded: u64,
) -> Result<u64, StoreError> {
    Ok(match stats.get(id)? {
        Some(raw) => decode_record::<CharacterStats>(raw.value())?
            .usage_count
            .unwrap_or(recorded),
        None => recorded,
    })
}

fn sort_summaries(rows: &mut [SummaryView<'_>], sort: CharacterSort, descending: bool) {
    rows.sort_by(|a, b| {
        let ord = match sort {
            CharacterSort::Name => a.name.cmp(b.name),
            CharacterSort::Created => a.created_ms.cmp(&b.created_ms),
            CharacterSort::Modified => a.updated_ms.cmp(&b.updated_ms),
            CharacterSort::Usage => a.usage.cmp(&b.usage),
        }
        // The id breaks ties so pages never overlap or skip.
        .then(a.id.cmp(&b.id));
        if descending {
            ord.reverse()
        } else {
            ord
        }
    });
}

/// Writes a character and its index rows, replacing the rows of `previous` when given.
fn write_character(
    txn: &WriteTransaction,
    id: u128,
    c: &Character,
    previous: Option<&Character>,
) -> Result<(), StoreError> {
    if let Some(prev) = previous {
        remove_indexes(txn, id, prev)?;
    }
    let summary = Summary::of(c, id).encode();
    txn.open_table(CHARACTERS)?
        .insert(id, encode_record(c)?.as_slice())?;
    txn.open_table(BY_OWNER)?
        .insert((c.creator_id.as_str(), id), summary.as_slice())?;
    txn.open_table(BY_OWNER_MODIFIED)?.insert(
        (
            c.creator_id.as_str(),
            crate::time::rfc3339_to_ms(&c.updated_at),
            id,
        ),
        (),
    )?;
    if c.is_public {
        txn.open_table(PUBLIC)?.insert(id, summary.as_slice())?;
    }
    let posting = encode_posting(c);
    let mut tags = txn.open_table(BY_TAG)?;
    for tag in &c.tags {
        tags.insert((tag.to_lowercase().as_str(), id), posting.as_slice())?;
    }
    if let Some(group) = &c.group_id {
        txn.open_table(BY_GROUP)?
            .insert((group.as_str(), id), posting.as_slice())?;
    }
    Ok(())
}

/// Claims `base`, or `base-2`, `base-3`, … for `id`.
fn claim_slug(txn: &WriteTransaction, base: &str, id: u128) -> Result<String, StoreError> {
    let mut slugs = txn.open_table(SLUGS)?;
    let mut n = 1u32;
    loop {
        let candidate = if n == 1 {
            base.to_string()
        } else {
            format!("{base}-{n}")
        };
        let taken = slugs.get(candidate.as_str())?.is_some();
        if !taken {
            slugs.insert(candidate.as_str(), id)?;
            return Ok(candidate);
        }
        n += 1;
    }
}

fn remove_indexes(txn: &WriteTransaction, id: u128, c: &Character) -> Result<(), StoreError> {
    txn.open_table(BY_OWNER)?
        .remove((c.creator_id.as_str(), id))?;
    txn.open_table(BY_OWNER_MODIFIED)?.remove((
        c.creator_id.as_str(),
        crate::time::rfc3339_to_ms(&c.updated_at),
        id,
    ))?;
    txn.open_table(PUBLIC)?.remove(id)?;
    let mut tags = txn.open_table(BY_TAG)?;
    for tag in &c.tags {
        tags.remove((tag.to_lowercase().as_str(), id))?;
    }
    if let Some(group) = &c.group_id {
        txn.open_table(BY_GROUP)?.remove((group.as_str(), id))?;
    }
    Ok(())
}
