//! The only module that knows redb. One table per entity, values prefixed with a format
//! version byte so the schema can migrate, index tables so listing one user's characters never
//! deserializes the whole file, and a moka cache of characters in front.
//!
//! Every write is durable before the call returns, so an acknowledged write survives a crash:
//! most commit with `Durability::Immediate`; conversation turns commit without a sync and are
//! made durable by the turn log (`turn_log.rs`), which a later durable commit checkpoints.

mod backup;
mod characters;
mod conversations;
mod file;
mod group_commit;
mod log_writer;
mod memory;
mod plugins;
mod summary;
mod turn_log;
mod versioned;

pub use backup::{check_backup, snapshot_file};
pub use characters::{
    parse_id, AvatarChange, CharacterQuery, CharacterSort, RelatedCandidate, Scope, StoredAvatar,
};
pub use conversations::{
    CharacterStats, ConversationChange, ConversationPage, History, IdempotentRecord,
};
pub use memory::SHARED_MEMORY;
pub use plugins::PluginBindingRecord;
pub use summary::Summary;

use crate::config::StoreConfig;
use crate::model::Character;
use moka::sync::Cache;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The schema this build writes; older files are migrated on open, newer ones refused.
pub const SCHEMA_VERSION: u32 = 1;

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// id → versioned JSON of the Character.
pub(crate) const CHARACTERS: TableDefinition<u128, &[u8]> = TableDefinition::new("characters");
/// (owner, id) → Summary: the owner's characters in creation order (ids are UUID v7).
pub(crate) const BY_OWNER: TableDefinition<(&str, u128), &[u8]> = TableDefinition::new("by_owner");
/// (owner, updatedAt ms, id) → (): the default listing order without reading characters.
pub(crate) const BY_OWNER_MODIFIED: TableDefinition<(&str, i64, u128), ()> =
    TableDefinition::new("by_owner_modified");
/// id → Summary for public characters.
pub(crate) const PUBLIC: TableDefinition<u128, &[u8]> = TableDefinition::new("public");
/// owner → number of characters (the quota counter).
pub(crate) const OWNER_COUNTS: TableDefinition<&str, u64> = TableDefinition::new("owner_counts");
/// (lowercased tag, id) → (owner, public flag): candidates for related characters.
pub(crate) const BY_TAG: TableDefinition<(&str, u128), &[u8]> = TableDefinition::new("by_tag");
/// (group id, id) → (owner, public flag).
pub(crate) const BY_GROUP: TableDefinition<(&str, u128), &[u8]> = TableDefinition::new("by_group");
/// slug → character id: the OpenAI-compatible model ids.
pub(crate) const SLUGS: TableDefinition<&str, u128> = TableDefinition::new("slugs");
/// id → avatar (content type, etag, bytes).
pub(crate) const AVATARS: TableDefinition<u128, &[u8]> = TableDefinition::new("avatars");

/// Storage failures, converted into `ApiError` at the HTTP boundary.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("version conflict: current version is {current}")]
    VersionConflict { current: u64 },
    #[error("slug {0} is taken")]
    SlugTaken(String),
    #[error("quota of {limit} characters exceeded")]
    QuotaExceeded { limit: u64 },
    #[error("database: {0}")]
    Db(#[from] redb::Error),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("data file schema {found} is newer than this build ({supported}); upgrade taproom")]
    SchemaTooNew { found: u32, supported: u32 },
    #[error("store task failed: {0}")]
    Task(String),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// A cached character, or the knowledge that it was deleted (so a slow reader holding an older
/// snapshot cannot put it back into the cache).
#[derive(Clone)]
enum Cached {
    Live(Arc<Character>),
    Gone,
}

/// The embedded database plus its caches. Cloning is one reference count: every service and
/// every blocking task holds a clone.
#[derive(Clone)]
pub struct Store(Arc<StoreInner>);

impl Deref for Store {
    type Target = StoreInner;
    fn deref(&self) -> &StoreInner {
        &self.0
    }
}

/// What a [`Store`] shares.
pub struct StoreInner {
    db: Arc<Database>,
    /// Characters by id; written after every commit, so reads never see older data than the file.
    cache: Cache<u128, Cached>,
    /// Conversation histories by id, replaced after every commit that changes them; bounded in
    /// bytes because one long chat outweighs hundreds of short ones.
    histories: Cache<u128, Arc<History>>,
    /// Character cache hits and misses since open; atomics because moka keeps no counters and
    /// every request thread reads characters.
    cache_counters: Arc<CacheCounters>,
    /// Raw summary rows per owner (and of all public characters) for searches and non-default
    /// sorts, so those scan memory instead of the B-tree. Valid while `generation` is unchanged.
    summaries: Cache<RowsKey, Arc<SummaryRows>>,
    /// Bumped after every commit that may change summaries (see [`Write`]).
    generation: Arc<AtomicU64>,
    /// Per-character statistics as of a store generation, so reading a character's detail
    /// does not open a read transaction while nothing is written.
    stats: Cache<u128, (u64, conversations::CharacterStats)>,
    /// Plugin bindings per character as of a bindings generation, so a turn does not open a
    /// read transaction for them; the generation moves on every change to any binding.
    bindings: versioned::Versioned<u128, Vec<plugins::PluginBindingRecord>>,
    /// The character each slug names (or none), so resolving a `char-<slug>` model does not
    /// open a read transaction; moved on by every commit that writes slugs.
    slugs: versioned::Versioned<String, Option<u128>>,
    /// The log that makes turn commits durable, and its position; held by whoever commits
    /// turns or checkpoints.
    turn_log: std::sync::Mutex<turn_log::TurnLog>,
    /// Conversation saves waiting to share a durable commit.
    turns: Arc<
        group_commit::GroupCommit<
            conversations::Queued,
            Result<Arc<conversations::History>, StoreError>,
        >,
    >,
}

/// Which summary table a cached row list mirrors.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum RowsKey {
    Owner(String),
    Public,
}

/// One owner's (or the public) summary rows as of a store generation.
#[derive(Debug)]
pub(crate) struct SummaryRows {
    pub generation: u64,
    pub rows: Vec<(u128, Box<[u8]>)>,
}

/// Size of the turn log file; a batch that does not fit is committed durably instead, which
/// starts the log over.
const TURN_LOG_BYTES: u64 = 4 << 20;

/// The turn log beside the database file: `taproom.redb` → `taproom.turns`.
fn turn_log_path(db: &Path) -> std::path::PathBuf {
    db.with_extension("turns")
}

/// Characters whose plugin binding lists are cached.
const CACHED_BINDINGS: usize = 4096;

/// Slugs whose characters are cached.
const CACHED_SLUGS: usize = 16384;

/// Upper bound on the memory held by cached summary rows.
const SUMMARY_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// A durable write transaction that, once committed, marks every cached summary list stale.
pub(crate) struct Write {
    txn: WriteTransaction,
    generation: Arc<AtomicU64>,
}

impl Deref for Write {
    type Target = WriteTransaction;
    fn deref(&self) -> &WriteTransaction {
        &self.txn
    }
}

impl DerefMut for Write {
    fn deref_mut(&mut self) -> &mut WriteTransaction {
        &mut self.txn
    }
}

impl Write {
    /// Commits, then bumps the generation: a reader that loaded the old generation read its
    /// rows before this commit and must not publish them as current.
    pub(crate) fn commit(self) -> Result<(), redb::CommitError> {
        self.txn.commit()?;
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

/// Hit and miss totals of the character cache.
#[derive(Debug, Default)]
struct CacheCounters {
    hits: std::sync::atomic::AtomicU64,
    misses: std::sync::atomic::AtomicU64,
}

impl Store {
    /// Opens (or creates) the database file and checks its schema version.
    pub fn open(path: &Path, config: &StoreConfig) -> Result<Self, StoreError> {
        let cache_capacity = config.cache_capacity;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Corrupt(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        let page_cache =
            usize::try_from(config.page_cache_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        let file = file::FilledFile::open(path)?;
        let (log, logged) =
            turn_log::TurnLog::open(&turn_log_path(path), TURN_LOG_BYTES).map_err(|e| {
                StoreError::Corrupt(format!("turn log {}: {e}", turn_log_path(path).display()))
            })?;
        let db = Database::builder()
            .set_cache_size(page_cache)
            .create_with_backend(file)?;
        let store = Self(Arc::new(StoreInner {
            db: Arc::new(db),
            cache: Cache::builder().max_capacity(cache_capacity).build(),
            histories: Cache::builder()
                .max_capacity(config.history_cache_mb.saturating_mul(1 << 20))
                .weigher(|_, h: &Arc<History>| h.weight())
                .build(),
            cache_counters: Arc::default(),
            summaries: Cache::builder()
                .max_capacity(SUMMARY_CACHE_BYTES)
                .weigher(|_, rows: &Arc<SummaryRows>| {
                    let bytes: usize = rows.rows.iter().map(|(_, r)| r.len() + 40).sum();
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .build(),
            generation: Arc::default(),
            stats: Cache::builder().max_capacity(cache_capacity).build(),
            bindings: versioned::Versioned::new(CACHED_BINDINGS),
            slugs: versioned::Versioned::new(CACHED_SLUGS),
            turn_log: std::sync::Mutex::new(log),
            turns: Default::default(),
        }));
        store.init_schema()?;
        store.replay_turn_log(logged)?;
        Ok(store)
    }

    /// A durable write transaction (committed with `Durability::Immediate`).
    pub(crate) fn write(&self) -> Result<Write, StoreError> {
        self.write_with(Durability::Immediate)
    }

    /// A write transaction committed with `durability`.
    pub(crate) fn write_with(&self, durability: Durability) -> Result<Write, StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(durability)?;
        Ok(Write {
            txn,
            generation: self.generation.clone(),
        })
    }

    /// The current write generation; read it before opening the read transaction that the
    /// result will be paired with.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The raw rows of one summary table for `key`, from memory when no commit happened since
    /// they were loaded, else read through `txn` (whose snapshot is at least `generation`).
    pub(crate) fn summary_rows(
        &self,
        txn: &redb::ReadTransaction,
        key: RowsKey,
        generation: u64,
    ) -> Result<Arc<SummaryRows>, StoreError> {
        if let Some(found) = self.summaries.get(&key) {
            if found.generation == generation {
                return Ok(found);
            }
        }
        let mut rows = Vec::new();
        match &key {
            RowsKey::Owner(owner) => {
                let table = txn.open_table(BY_OWNER)?;
                for item in table.range((owner.as_str(), 0u128)..=(owner.as_str(), u128::MAX))? {
                    let (k, v) = item?;
                    rows.push((k.value().1, Box::from(v.value())));
                }
            }
            RowsKey::Public => {
                let table = txn.open_table(PUBLIC)?;
                for item in table.iter()? {
                    let (k, v) = item?;
                    rows.push((k.value(), Box::from(v.value())));
                }
            }
        }
        let loaded = Arc::new(SummaryRows { generation, rows });
        self.summaries.insert(key, loaded.clone());
        Ok(loaded)
    }

    fn init_schema(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get("schema_version")?.map(|v| {
                let b = v.value();
                u32::from_le_bytes([
                    *b.first().unwrap_or(&0),
                    *b.get(1).unwrap_or(&0),
                    *b.get(2).unwrap_or(&0),
                    *b.get(3).unwrap_or(&0),
                ])
            });
            if let Some(found) = found {
                if found > SCHEMA_VERSION {
                    return Err(StoreError::SchemaTooNew {
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
            }
            meta.insert("schema_version", SCHEMA_VERSION.to_le_bytes().as_slice())?;
            // Create every table up front so read transactions never see a missing table.
            txn.open_table(CHARACTERS)?;
            txn.open_table(BY_OWNER)?;
            txn.open_table(BY_OWNER_MODIFIED)?;
            txn.open_table(PUBLIC)?;
            txn.open_table(OWNER_COUNTS)?;
            txn.open_table(AVATARS)?;
            txn.open_table(BY_TAG)?;
            txn.open_table(BY_GROUP)?;
            txn.open_table(SLUGS)?;
            txn.open_table(plugins::PLUGIN_BINDINGS)?;
            txn.open_table(conversations::CONVERSATIONS)?;
            txn.open_table(conversations::CONV_BY_USER)?;
            txn.open_table(conversations::CONV_BY_CHARACTER)?;
            txn.open_table(conversations::MESSAGES)?;
            txn.open_table(conversations::CHARACTER_STATS)?;
            txn.open_table(conversations::IDEMPOTENCY)?;
            txn.open_table(memory::MEMORY)?;
            txn.open_table(memory::MEMORY_SUMMARY)?;
            txn.open_table(memory::MEMORY_VECTORS)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// The schema version recorded in the file.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let v = meta
            .get("schema_version")?
            .map(|v| {
                let b = v.value();
                b.try_into().map(u32::from_le_bytes).unwrap_or(0)
            })
            .unwrap_or(0);
        Ok(v)
    }

    /// Character cache (hits, misses) since the store was opened.
    pub fn cache_stats(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.cache_counters.hits.load(Relaxed),
            self.cache_counters.misses.load(Relaxed),
        )
    }

    /// Counts one character cache lookup.
    pub(crate) fn count_cache(&self, hit: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        let c = if hit {
            &self.cache_counters.hits
        } else {
            &self.cache_counters.misses
        };
        c.fetch_add(1, Relaxed);
    }

    /// Whether the database answers a read transaction (readiness probe).
    pub fn ping(&self) -> Result<(), StoreError> {
        self.schema_version().map(|_| ())
    }

    /// Size of the database file in bytes.
    pub fn file_size(&self, path: &Path) -> u64 {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }
}

/// Encodes a JSON record with its format version byte in front.
pub(crate) fn encode_record<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![1u8];
    serde_json::to_writer(&mut out, value).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(out)
}

/// The JSON text of a record `encode_record` wrote: what follows its format version byte.
pub(crate) fn record_json(record: &[u8]) -> &[u8] {
    record.get(1..).unwrap_or_default()
}

/// Decodes a record written by `encode_record`.
pub(crate) fn decode_record<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((1, rest)) => {
            serde_json::from_slice(rest).map_err(|e| StoreError::Corrupt(e.to_string()))
        }
        Some((v, _)) => Err(StoreError::Corrupt(format!("unknown record format {v}"))),
        None => Err(StoreError::Corrupt("empty record".into())),
    }
}
