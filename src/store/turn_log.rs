//! The turn log: an append-only file beside the database that makes a conversation commit
//! durable with one small sequential write and one `fdatasync`, instead of syncing the 15–25
//! scattered B-tree pages a redb commit dirties. On this class of disk a sync that follows a
//! pause costs ~0.44 ms for one sequential record against ~1.2 ms for 20 scattered pages
//! (`examples/bench_fsync.rs`, docs/BENCHMARKS.md #9).
//!
//! A batch of conversation changes is committed to redb without a sync (`Durability::None`)
//! while its record is appended here and synced on another thread; no writer is answered
//! before both are done. A record whose commit fails is erased (or its sequence number stored
//! as spent), so it is never applied. A checkpoint (any durable redb commit) makes everything
//! before it durable in the database, and the log starts over.
//! On open, the records newer than the sequence number the database holds are applied again,
//! in order: each commit stores its own sequence number, so a record is never applied twice.
//!
//! Layout: a 32-byte header (magic, the log's random id), then records
//! `[len u32][crc32 u32][lsn u64][payload]` with the crc over len, lsn and payload. The file is
//! zero-filled ahead, so an append never changes its size and `fdatasync` writes data only.
//! Starting over rewrites from the front: the stale records behind the new tail have smaller
//! sequence numbers, and a scan stops at the first record that does not increase.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::log_writer::{write_synced, LogWriter};

const MAGIC: &[u8; 16] = b"taproom-turns-v1";
const HEADER: u64 = 32;
const RECORD_HEADER: usize = 16;

/// The open log file and where the next record goes.
pub(crate) struct TurnLog {
    /// Shared with the thread that writes a record while its commit runs.
    file: std::sync::Arc<File>,
    /// Writes and syncs a record while its commit runs.
    writer: LogWriter,
    /// Random id written in the header and stored with the database's sequence number, so a
    /// log from another database (a restored backup) is never applied to this one.
    pub id: u128,
    end: u64,
    capacity: u64,
    /// Sequence number of the last commit (logged or durable).
    pub last_lsn: u64,
    /// Changes logged since the last checkpoint.
    pub pending: usize,
}

/// A record found when the log was opened.
#[derive(Debug, PartialEq)]
pub(crate) struct Record {
    pub lsn: u64,
    pub payload: Vec<u8>,
}

impl TurnLog {
    /// Opens (or creates) the log at `path`, zero-filled to `capacity` bytes, and returns it
    /// with the records it holds, oldest first.
    pub fn open(path: &Path, capacity: u64) -> io::Result<(Self, Vec<Record>)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let id = match stored_id(&file)? {
            Some(id) => id,
            None => {
                // New (or not a log at all): a fresh id, then the header made durable with
                // the file's directory entry.
                let id = rand::random::<u128>();
                let mut header = [0u8; HEADER as usize];
                header[..16].copy_from_slice(MAGIC);
                header[16..].copy_from_slice(&id.to_le_bytes());
                file.set_len(0)?;
                file.write_all_at(&header, 0)?;
                fill(&file, HEADER, capacity)?;
                file.sync_all()?;
                if let Some(dir) = path.parent() {
                    File::open(dir)?.sync_all()?;
                }
                id
            }
        };
        let len = file.metadata()?.len();
        let capacity = capacity.max(len);
        if len < capacity {
            fill(&file, len, capacity)?;
            file.sync_all()?;
        }
        let records = scan(&file, capacity)?;
        let file = std::sync::Arc::new(file);
        let log = Self {
            writer: LogWriter::start(file.clone()),
            file,
            id,
            end: HEADER,
            capacity,
            last_lsn: records.last().map_or(0, |r| r.lsn),
            pending: 0,
        };
        Ok((log, records))
    }

    /// Whether a record of `payload_len` bytes fits before the end of the file.
    pub fn fits(&self, payload_len: usize) -> bool {
        self.end + (RECORD_HEADER + payload_len) as u64 <= self.capacity
    }

    /// Bytes written since the log started over.
    pub fn used(&self) -> u64 {
        self.end - HEADER
    }

    /// Appends one record and syncs it. The caller checked [`TurnLog::fits`].
    #[cfg(test)]
    pub fn append(&mut self, lsn: u64, payload: &[u8]) -> io::Result<()> {
        let appending = self.start_append(lsn, payload);
        self.finish_append(&appending)
    }

    /// Starts writing and syncing one record on the log's writer thread, so that the caller
    /// can commit the same changes to the database meanwhile; [`TurnLog::finish_append`]
    /// waits for it. The caller checked [`TurnLog::fits`] and appends nothing else until it
    /// finishes.
    pub fn start_append(&mut self, lsn: u64, payload: &[u8]) -> Appending {
        let at = self.end;
        let record = match encode(lsn, payload) {
            Ok(r) => r,
            Err(e) => return Appending::done(at, 0, Err(e)),
        };
        let len = record.len() as u64;
        let done = self.writer.submit(at, record);
        Appending { at, len, done }
    }

    /// Waits for the record [`TurnLog::start_append`] is writing; once it is synced it is part
    /// of the log. On an error the log ends before it (a torn record is not read back).
    pub fn finish_append(&mut self, appending: &Appending) -> io::Result<()> {
        let written = appending.done.recv().unwrap_or_else(|_| {
            Err(io::Error::other(
                "the turn log writer stopped before syncing",
            ))
        });
        if written.is_ok() {
            self.end = appending.at + appending.len;
        }
        written
    }

    /// Makes a record whose commit failed unreadable, durably: its changes are not in the
    /// database and must never be applied from here. The next record takes its place.
    pub fn erase(&mut self, appending: &Appending) -> io::Result<()> {
        self.end = appending.at;
        write_synced(&self.file, appending.at, &[0u8; RECORD_HEADER])
    }

    /// Gives the log a new id (durably) and starts it over: for a database that follows no
    /// log or another one, so that a database file swapped in later (an older copy that
    /// followed the old id) never gets this log's records.
    pub fn renew(&mut self) -> io::Result<()> {
        let id = rand::random::<u128>();
        write_synced(&self.file, 16, &id.to_le_bytes())?;
        self.id = id;
        self.reset();
        Ok(())
    }

    /// Starts over after a checkpoint: every record so far is durable in the database.
    pub fn reset(&mut self) {
        self.end = HEADER;
        self.pending = 0;
    }
}

/// A record being written on another thread (see [`TurnLog::start_append`]).
pub(crate) struct Appending {
    at: u64,
    len: u64,
    done: std::sync::mpsc::Receiver<io::Result<()>>,
}

impl Appending {
    /// An append that already finished (or never started) with `result`.
    fn done(at: u64, len: u64, result: io::Result<()>) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let _ = tx.send(result);
        Self { at, len, done: rx }
    }
}

/// One record's bytes: header, then payload.
fn encode(lsn: u64, payload: &[u8]) -> io::Result<Vec<u8>> {
    let len = u32::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "record too large"))?;
    let mut record = Vec::with_capacity(RECORD_HEADER + payload.len());
    record.extend_from_slice(&len.to_le_bytes());
    record.extend_from_slice(&checksum(len, lsn, payload).to_le_bytes());
    record.extend_from_slice(&lsn.to_le_bytes());
    record.extend_from_slice(payload);
    Ok(record)
}

/// The id in the file's header, or `None` when it has no valid header.
fn stored_id(file: &File) -> io::Result<Option<u128>> {
    let mut header = [0u8; HEADER as usize];
    if file.metadata()?.len() < HEADER {
        return Ok(None);
    }
    file.read_exact_at(&mut header, 0)?;
    if &header[..16] != MAGIC {
        return Ok(None);
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&header[16..]);
    Ok(Some(u128::from_le_bytes(id)))
}

/// Writes zeros over `[from, to)`.
fn fill(file: &File, from: u64, to: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK as usize];
    let mut at = from;
    while at < to {
        let n = (to - at).min(CHUNK);
        file.write_all_at(&zeros[..n as usize], at)?;
        at += n;
    }
    Ok(())
}

fn checksum(len: u32, lsn: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(&lsn.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// The valid records from the front: stops at zeros, a torn or corrupt record, or a sequence
/// number that does not increase (the stale tail of an earlier round).
fn scan(file: &File, capacity: u64) -> io::Result<Vec<Record>> {
    let mut records: Vec<Record> = Vec::new();
    let mut at = HEADER;
    let mut head = [0u8; RECORD_HEADER];
    while at + RECORD_HEADER as u64 <= capacity {
        file.read_exact_at(&mut head, at)?;
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let mut lsn_bytes = [0u8; 8];
        lsn_bytes.copy_from_slice(&head[8..16]);
        let lsn = u64::from_le_bytes(lsn_bytes);
        let next = at + RECORD_HEADER as u64 + u64::from(len);
        if len == 0 || next > capacity || records.last().is_some_and(|r| r.lsn >= lsn) {
            break;
        }
        let mut payload = vec![0u8; len as usize];
        file.read_exact_at(&mut payload, at + RECORD_HEADER as u64)?;
        if checksum(len, lsn, &payload) != crc {
            break;
        }
        records.push(Record { lsn, payload });
        at = next;
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: u64 = 64 * 1024;

    fn reopen(path: &Path) -> (TurnLog, Vec<Record>) {
        TurnLog::open(path, CAP).unwrap()
    }

    #[test]
    fn records_come_back_in_order_and_the_id_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut log, found) = reopen(&path);
        assert!(found.is_empty());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), CAP);
        log.append(1, b"one").unwrap();
        log.append(2, b"two").unwrap();
        let id = log.id;
        drop(log);
        let (log, found) = reopen(&path);
        assert_eq!(log.id, id);
        assert_eq!(log.last_lsn, 2);
        assert_eq!(
            found,
            vec![
                Record {
                    lsn: 1,
                    payload: b"one".to_vec()
                },
                Record {
                    lsn: 2,
                    payload: b"two".to_vec()
                },
            ]
        );
    }

    #[tokio::test]
    async fn a_record_written_on_another_thread_is_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut log, _) = reopen(&path);
        let appending = log.start_append(1, b"from the pool");
        log.finish_append(&appending).unwrap();
        assert_eq!(log.used(), (RECORD_HEADER + 13) as u64);
        drop(log);
        let (_, found) = reopen(&path);
        assert_eq!(
            found,
            vec![Record {
                lsn: 1,
                payload: b"from the pool".to_vec()
            }]
        );
    }

    #[test]
    fn an_erased_record_is_never_read_and_the_next_one_takes_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut log, _) = reopen(&path);
        log.append(1, b"kept").unwrap();
        let failed = log.start_append(2, b"its commit failed");
        log.finish_append(&failed).unwrap();
        log.erase(&failed).unwrap();
        let (_, found) = reopen(&path);
        assert_eq!(
            found,
            vec![Record {
                lsn: 1,
                payload: b"kept".to_vec()
            }]
        );
        log.append(2, b"next").unwrap();
        drop(log);
        let (_, found) = reopen(&path);
        assert_eq!(
            found,
            vec![
                Record {
                    lsn: 1,
                    payload: b"kept".to_vec()
                },
                Record {
                    lsn: 2,
                    payload: b"next".to_vec()
                },
            ]
        );
    }

    #[test]
    fn a_torn_record_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut log, _) = reopen(&path);
        log.append(1, b"kept").unwrap();
        log.append(2, b"torn in half").unwrap();
        drop(log);
        // Damage the second record's payload as a crash mid-write would.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        let second = HEADER + (RECORD_HEADER + 4) as u64;
        f.write_all_at(b"XXXX", second + RECORD_HEADER as u64 + 6)
            .unwrap();
        let (log, found) = reopen(&path);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].payload, b"kept");
        assert_eq!(log.last_lsn, 1);
    }

    #[test]
    fn after_starting_over_the_stale_tail_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut log, _) = reopen(&path);
        for lsn in 1..=5 {
            log.append(lsn, b"an older round").unwrap();
        }
        log.reset();
        log.append(6, b"new").unwrap();
        drop(log);
        let (_, found) = reopen(&path);
        assert_eq!(
            found,
            vec![Record {
                lsn: 6,
                payload: b"new".to_vec()
            }]
        );
    }

    #[test]
    fn a_renewed_log_has_a_new_id_and_no_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut log, _) = reopen(&path);
        log.append(1, b"old").unwrap();
        let old = log.id;
        log.renew().unwrap();
        log.append(2, b"new").unwrap();
        drop(log);
        let (log, found) = reopen(&path);
        assert_ne!(log.id, old);
        assert_eq!(
            found,
            vec![Record {
                lsn: 2,
                payload: b"new".to_vec()
            }]
        );
    }

    #[test]
    fn a_full_log_says_so_and_a_foreign_file_gets_a_new_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut log, _) = reopen(&path);
        assert!(log.fits(1000));
        assert!(!log.fits(CAP as usize));
        log.append(1, &[7u8; 1000]).unwrap();
        assert_eq!(log.used(), 1016);
        drop(log);
        std::fs::write(&path, b"something else entirely").unwrap();
        let (log, found) = reopen(&path);
        assert!(found.is_empty());
        assert_eq!(log.last_lsn, 0);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), CAP);
    }
}
