//! Consistent snapshots: every table as seen by one read transaction, copied into a fresh redb
//! file. redb lets only one process open a file, so a running server makes the snapshot itself
//! (`POST /api/admin/backup`) and the CLI only copies a file no server holds.
//!
//! Every table is listed in `copy_all`; the `snapshot_copies_every_table` test fails when a new
//! table is added to the schema but not here.

use super::conversations::{
    CHARACTER_STATS, CONVERSATIONS, CONV_BY_CHARACTER, CONV_BY_USER, IDEMPOTENCY, MESSAGES,
};
use super::{
    Store, StoreError, AVATARS, BY_GROUP, BY_OWNER, BY_OWNER_MODIFIED, BY_TAG, CHARACTERS, META,
    OWNER_COUNTS, PUBLIC,
};
use crate::config::StoreConfig;
use redb::{Database, Key, ReadTransaction, ReadableDatabase, TableDefinition, Value};
use std::path::Path;

impl Store {
    /// Writes a consistent snapshot of the whole database to `dest` (which must not exist) and
    /// returns the number of rows copied. Writers are not blocked: the copy reads one MVCC
    /// snapshot.
    pub fn snapshot_to(&self, dest: &Path) -> Result<u64, StoreError> {
        let src = self.db.begin_read()?;
        copy_all(&src, dest)
    }
}

/// Snapshots the database file at `src` (no server may hold it) into `dest`. Opening it as a
/// store first applies what a crash left in its turn log.
pub fn snapshot_file(src: &Path, config: &StoreConfig, dest: &Path) -> Result<u64, StoreError> {
    Store::open(src, config)?.snapshot_to(dest)
}

/// Opens a backup file and returns its schema version; fails if it is not a Taproom database.
pub fn check_backup(path: &Path) -> Result<u32, StoreError> {
    let db = Database::open(path)?;
    let txn = db.begin_read()?;
    let meta = txn
        .open_table(META)
        .map_err(|e| StoreError::Corrupt(format!("no meta table ({e}); not a taproom database")))?;
    let raw = meta
        .get("schema_version")?
        .ok_or_else(|| StoreError::Corrupt("no schema version; not a taproom database".into()))?;
    let version = <[u8; 4]>::try_from(raw.value())
        .map(u32::from_le_bytes)
        .map_err(|_| StoreError::Corrupt("malformed schema version".into()))?;
    if version > super::SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: version,
            supported: super::SCHEMA_VERSION,
        });
    }
    Ok(version)
}

fn copy_all(src: &ReadTransaction, dest: &Path) -> Result<u64, StoreError> {
    if dest.exists() {
        return Err(StoreError::Corrupt(format!(
            "{} already exists; choose a new backup file",
            dest.display()
        )));
    }
    let out = Database::create(dest)?;
    let txn = out.begin_write()?;
    let mut rows = 0;
    rows += copy(src, &txn, META)?;
    // The snapshot belongs to no turn log: the source's log must never be applied to it.
    if txn
        .open_table(META)?
        .remove(super::conversations::TURN_LOG_KEY)?
        .is_some()
    {
        rows -= 1;
    }
    rows += copy(src, &txn, CHARACTERS)?;
    rows += copy(src, &txn, BY_OWNER)?;
    rows += copy(src, &txn, BY_OWNER_MODIFIED)?;
    rows += copy(src, &txn, PUBLIC)?;
    rows += copy(src, &txn, OWNER_COUNTS)?;
    rows += copy(src, &txn, BY_TAG)?;
    rows += copy(src, &txn, BY_GROUP)?;
    rows += copy(src, &txn, AVATARS)?;
    rows += copy(src, &txn, CONVERSATIONS)?;
    rows += copy(src, &txn, CONV_BY_USER)?;
    rows += copy(src, &txn, CONV_BY_CHARACTER)?;
    rows += copy(src, &txn, MESSAGES)?;
    rows += copy(src, &txn, CHARACTER_STATS)?;
    rows += copy(src, &txn, IDEMPOTENCY)?;
    rows += copy(src, &txn, super::SLUGS)?;
    rows += copy(src, &txn, super::plugins::PLUGIN_BINDINGS)?;
    rows += copy(src, &txn, super::memory::MEMORY)?;
    rows += copy(src, &txn, super::memory::MEMORY_SUMMARY)?;
    rows += copy(src, &txn, super::memory::MEMORY_VECTORS)?;
    txn.commit()?;
    Ok(rows)
}

fn copy<K: Key + 'static, V: Value + 'static>(
    src: &ReadTransaction,
    dst: &redb::WriteTransaction,
    def: TableDefinition<K, V>,
) -> Result<u64, StoreError> {
    let from = match src.open_table(def) {
        Ok(t) => t,
        // A file from an older build may lack a table; the snapshot simply lacks it too.
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let mut to = dst.open_table(def)?;
    let mut n = 0;
    for row in redb::ReadableTable::iter(&from)? {
        let (k, v) = row?;
        to.insert(k.value(), v.value())?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::TableHandle;

    #[test]
    fn snapshot_copies_every_table() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("taproom.redb"), &Default::default()).unwrap();
        let dest = dir.path().join("backup.redb");
        store.snapshot_to(&dest).unwrap();
        let names = |db: &Database| -> Vec<String> {
            let txn = db.begin_read().unwrap();
            let mut v: Vec<String> = txn
                .list_tables()
                .unwrap()
                .map(|t| t.name().to_string())
                .collect();
            v.sort();
            v
        };
        let copied = names(&Database::open(&dest).unwrap());
        assert_eq!(names(&store.db), copied);
        assert_eq!(check_backup(&dest).unwrap(), super::super::SCHEMA_VERSION);
        assert!(
            store.snapshot_to(&dest).is_err(),
            "must not overwrite a file"
        );
    }

    #[test]
    fn a_file_that_is_not_a_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bogus = dir.path().join("bogus.redb");
        std::fs::write(&bogus, b"not a database at all").unwrap();
        assert!(check_backup(&bogus).is_err());
    }
}
