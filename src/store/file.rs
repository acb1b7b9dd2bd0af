//! The database file as redb's storage backend: redb's own file backend, except that the file is
//! filled with zeros a little ahead of where redb writes.
//!
//! redb grows its file with `set_len`, which leaves a sparse hole. The first write into a hole
//! makes ext4 (and most file systems) allocate blocks, and the next `fdatasync` must then commit
//! that allocation to the journal as well as the data: measured here, a commit's sync took 0.35 ms
//! at p50 and 0.6–0.8 ms at p99 when one of its pages was new, against 0.26 / 0.4 ms when every
//! page was already allocated (docs/BENCHMARKS.md, #9). Filling a megabyte ahead at a time puts
//! one allocation behind many commits instead of one behind nearly every commit.

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};
use std::fs::OpenOptions;
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::Mutex;

use super::group_commit::lock;

/// How far past the end of a write the file is filled, at most.
const FILL_AHEAD: u64 = 1 << 20;

/// Zeros written per call while filling.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// redb's file backend with its growth filled ahead of time.
#[derive(Debug)]
pub(crate) struct FilledFile {
    inner: FileBackend,
    extent: Mutex<Extent>,
}

/// What is known of the file's layout.
#[derive(Debug)]
struct Extent {
    /// The file's length.
    len: u64,
    /// Every byte below this is allocated (written at least once, by redb or with zeros).
    filled: u64,
}

impl FilledFile {
    /// Opens (or creates) the file the way `redb::Builder::create` does; a file another
    /// process holds is `DatabaseAlreadyOpen`, as from redb itself.
    pub(crate) fn open(path: &Path) -> Result<Self, redb::DatabaseError> {
        let io = |e: io::Error| redb::DatabaseError::Storage(e.into());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        // What is already in the file is taken as allocated: holes an earlier run left there
        // are only slower to write, not wrong.
        let len = file.metadata().map_err(io)?.len();
        let inner = FileBackend::new(file)?;
        Ok(Self {
            inner,
            extent: Mutex::new(Extent { len, filled: len }),
        })
    }

    /// Writes zeros over `[from, to)`.
    fn zero(&self, mut from: u64, to: u64) -> io::Result<()> {
        while from < to {
            let n = (to - from).min(ZEROS.len() as u64);
            // `n` is at most ZEROS.len(), so the cast cannot truncate.
            self.inner.write(from, &ZEROS[..n as usize])?;
            from += n;
        }
        Ok(())
    }
}

impl StorageBackend for FilledFile {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut extent = lock(&self.extent);
        self.inner.set_len(len)?;
        extent.len = len;
        extent.filled = extent.filled.min(len);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset.saturating_add(data.len() as u64);
        let mut extent = lock(&self.extent);
        extent.len = extent.len.max(end);
        if end > extent.filled {
            // Only bytes redb has never written are zeroed: everything below `filled` is left
            // alone, and the part of this range that `data` covers is overwritten just below.
            let to = end.saturating_add(FILL_AHEAD).min(extent.len);
            self.zero(extent.filled, to)?;
            extent.filled = to;
        }
        self.inner.write(offset, data)
    }

    fn close(&self) -> io::Result<()> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{Database, ReadableDatabase, ReadableTableMetadata, TableDefinition};

    const T: TableDefinition<u64, &[u8]> = TableDefinition::new("t");

    fn backend(dir: &Path) -> FilledFile {
        FilledFile::open(&dir.join("f")).expect("open")
    }

    #[test]
    fn growth_is_filled_ahead_and_data_is_never_zeroed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = backend(dir.path());
        f.set_len(8 << 20).expect("grow");
        f.write(4096, b"first").expect("write");
        let filled = lock(&f.extent).filled;
        assert_eq!(
            filled,
            4096 + 5 + FILL_AHEAD,
            "filled a megabyte past the write"
        );
        // A write below the filled mark zeroes nothing, and one past it keeps what is below.
        f.write(100, b"low").expect("write");
        f.write(filled + 10, b"past").expect("write");
        let mut out = [0u8; 5];
        f.read(4096, &mut out).expect("read");
        assert_eq!(&out, b"first");
        let mut out = [0u8; 3];
        f.read(100, &mut out).expect("read");
        assert_eq!(&out, b"low");
        let mut out = [0u8; 4];
        f.read(filled + 10, &mut out).expect("read");
        assert_eq!(&out, b"past");
        // Filling stops at the file's end: the file is never made longer than redb set it.
        f.write((8 << 20) - 4, b"last").expect("write");
        assert_eq!(f.len().expect("len"), 8 << 20);
        assert_eq!(lock(&f.extent).filled, 8 << 20);
    }

    #[test]
    fn shrinking_lowers_the_filled_mark() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = backend(dir.path());
        f.set_len(4 << 20).expect("grow");
        f.write(0, b"x").expect("write");
        f.set_len(4096).expect("shrink");
        assert_eq!(lock(&f.extent).filled, 4096);
        f.set_len(4 << 20).expect("grow again");
        f.write(8192, b"y").expect("write");
        let mut out = [1u8; 1];
        f.read(0, &mut out).expect("read");
        assert_eq!(&out, b"x");
    }

    #[test]
    fn a_database_on_it_keeps_its_data_across_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let value = vec![7u8; 3000];
        {
            let db = Database::builder()
                .create_with_backend(backend(dir.path()))
                .expect("create");
            for i in 0..2_000u64 {
                let txn = db.begin_write().expect("txn");
                txn.open_table(T)
                    .expect("table")
                    .insert(i, value.as_slice())
                    .expect("insert");
                txn.commit().expect("commit");
            }
        }
        let db = Database::builder()
            .create_with_backend(backend(dir.path()))
            .expect("reopen");
        let txn = db.begin_read().expect("read");
        let t = txn.open_table(T).expect("table");
        for i in [0u64, 999, 1_999] {
            let v = t.get(i).expect("get").expect("present");
            assert_eq!(v.value(), value.as_slice());
        }
        assert_eq!(t.len().expect("len"), 2_000);
    }
}
