//! The thread that writes and syncs turn log records while the committer commits the same
//! changes to the database. Woken from the committer, Linux tends to run it on the
//! committer's own CPU first, so the commit waited for the write and the start of the sync
//! (~0.1 ms per turn on an idle server, docs/BENCHMARKS.md #9); the thread is therefore kept
//! off the CPU the committer is on whenever another one is allowed.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// One record to write at an offset, and where to report the outcome.
struct Job {
    at: u64,
    bytes: Vec<u8>,
    done: SyncSender<io::Result<()>>,
}

/// The writer thread of one file; records are written inline when it could not be started.
pub(crate) struct LogWriter {
    file: Arc<File>,
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    placement: Placement,
}

impl LogWriter {
    /// Starts the thread that writes to `file`.
    pub fn start(file: Arc<File>) -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (tid_tx, tid_rx) = mpsc::sync_channel(1);
        let thread_file = file.clone();
        let spawned = std::thread::Builder::new()
            .name("taproom-turn-log".into())
            .spawn(move || {
                let _ = tid_tx.send(Placement::current_thread());
                for job in queue {
                    let _ = job
                        .done
                        .send(write_synced(&thread_file, job.at, &job.bytes));
                }
            });
        match spawned {
            Ok(thread) => Self {
                file,
                jobs: Some(jobs),
                thread: Some(thread),
                placement: tid_rx.recv().unwrap_or_default(),
            },
            Err(e) => {
                tracing::warn!(error = %e, "no turn log thread; records are written inline");
                Self {
                    file,
                    jobs: None,
                    thread: None,
                    placement: Placement::default(),
                }
            }
        }
    }

    /// Writes `bytes` at `at` and syncs the file, on the thread when there is one; the
    /// outcome arrives on the returned channel.
    pub fn submit(&mut self, at: u64, bytes: Vec<u8>) -> Receiver<io::Result<()>> {
        let (done, outcome) = mpsc::sync_channel(1);
        let Some(jobs) = &self.jobs else {
            let _ = done.send(write_synced(&self.file, at, &bytes));
            return outcome;
        };
        self.placement.keep_off_this_cpu();
        if let Err(mpsc::SendError(job)) = jobs.send(Job { at, bytes, done }) {
            // The thread is gone: write inline rather than fail the turn.
            let _ = job.done.send(write_synced(&self.file, job.at, &job.bytes));
        }
        outcome
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Writes `bytes` at `at` and syncs the file's data.
pub(crate) fn write_synced(file: &File, at: u64, bytes: &[u8]) -> io::Result<()> {
    file.write_all_at(bytes, at)?;
    file.sync_data()
}

/// Which CPUs the writer thread may use.
#[derive(Default)]
struct Placement {
    /// The writer's thread id.
    #[cfg(target_os = "linux")]
    tid: Option<rustix::thread::Pid>,
    /// The CPU it was last kept off, so a committer that stays put costs no system call.
    #[cfg(target_os = "linux")]
    kept_off: Option<usize>,
}

impl Placement {
    #[cfg(target_os = "linux")]
    fn current_thread() -> Self {
        Self {
            tid: Some(rustix::thread::gettid()),
            kept_off: None,
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn current_thread() -> Self {
        Self::default()
    }

    /// Lets the writer run on any CPU the caller may use except the caller's current one,
    /// when there is another.
    #[cfg(target_os = "linux")]
    fn keep_off_this_cpu(&mut self) {
        use rustix::thread::{sched_getaffinity, sched_getcpu, sched_setaffinity};
        let Some(tid) = self.tid else { return };
        let cpu = sched_getcpu();
        if self.kept_off == Some(cpu) {
            return;
        }
        let Ok(mut allowed) = sched_getaffinity(None) else {
            return;
        };
        allowed.unset(cpu);
        if allowed.count() > 0 && sched_setaffinity(Some(tid), &allowed).is_ok() {
            self.kept_off = Some(cpu);
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn keep_off_this_cpu(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer for a new file in `dir`, and the file to read back.
    fn writer_in(dir: &tempfile::TempDir) -> (LogWriter, Arc<File>) {
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join("log"))
                .unwrap(),
        );
        (LogWriter::start(file.clone()), file)
    }

    #[test]
    fn records_reach_the_file_through_the_thread_and_after_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, file) = writer_in(&dir);
        writer.submit(0, b"first".to_vec()).recv().unwrap().unwrap();
        // A thread that died leaves the writer writing inline.
        writer.jobs = None;
        writer
            .submit(5, b"second".to_vec())
            .recv()
            .unwrap()
            .unwrap();
        let mut back = [0u8; 11];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back, b"firstsecond");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_writer_is_kept_off_the_cpu_that_submits() {
        use rustix::thread::sched_getaffinity;
        let allowed = sched_getaffinity(None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, _) = writer_in(&dir);
        writer.submit(0, b"x".to_vec()).recv().unwrap().unwrap();
        let tid = writer.placement.tid.unwrap();
        let theirs = sched_getaffinity(Some(tid)).unwrap();
        if allowed.count() < 2 {
            // One CPU: nothing to keep off, and the writer may use it.
            assert_eq!(theirs, allowed);
            return;
        }
        let cpu = writer.placement.kept_off.unwrap();
        assert!(allowed.is_set(cpu) && !theirs.is_set(cpu));
        assert_eq!(theirs.count(), allowed.count() - 1);
    }
}
