//! Group commit: writers that arrive while a durable commit is in progress wait for it, then the
//! next of them commits everyone's changes in one transaction. A lone writer commits at once (no
//! timer, no extra latency); under load one fsync covers many writers, which is what lifts the
//! single-writer ceiling of redb (about one durable commit per millisecond here).

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Mutex, MutexGuard};

/// A queue of changes and the lock held by whoever is committing them.
pub(crate) struct GroupCommit<C, R> {
    pending: Mutex<Vec<(C, SyncSender<R>)>>,
    leader: Mutex<()>,
}

impl<C, R> Default for GroupCommit<C, R> {
    fn default() -> Self {
        Self {
            pending: Mutex::new(Vec::new()),
            leader: Mutex::new(()),
        }
    }
}

/// A poisoned lock only means another writer panicked; the queue itself is still consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<C, R> GroupCommit<C, R> {
    /// Queues `change` and blocks until a commit that includes it has finished. `commit` gets
    /// a batch in arrival order and must return one result per change, in the same order; it
    /// runs on the calling thread when this caller becomes the leader. `None` only if `commit`
    /// returned fewer results than changes.
    pub(crate) fn submit(&self, change: C, commit: impl FnOnce(Vec<C>) -> Vec<R>) -> Option<R> {
        let (tx, rx): (SyncSender<R>, Receiver<R>) = sync_channel(1);
        lock(&self.pending).push((change, tx));
        let _leader = lock(&self.leader);
        // A previous leader may have committed this change while we waited for the lock.
        if let Ok(done) = rx.try_recv() {
            return Some(done);
        }
        let batch = std::mem::take(&mut *lock(&self.pending));
        let (changes, senders): (Vec<C>, Vec<SyncSender<R>>) = batch.into_iter().unzip();
        for (result, sender) in commit(changes).into_iter().zip(senders) {
            // Each sender has room for exactly its one result; the receiver may be gone only
            // if its thread died, and then nobody is waiting for the answer.
            let _ = sender.try_send(result);
        }
        rx.try_recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_lone_writer_commits_its_own_change() {
        let g = GroupCommit::<u32, u32>::default();
        let r = g.submit(7, |batch| batch.iter().map(|x| x * 2).collect());
        assert_eq!(r, Some(14));
    }

    #[test]
    fn concurrent_writers_share_commits_and_each_gets_its_own_result() {
        let g = Arc::new(GroupCommit::<usize, usize>::default());
        let commits = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..32)
            .map(|i| {
                let g = g.clone();
                let commits = commits.clone();
                std::thread::spawn(move || {
                    g.submit(i, |batch| {
                        commits.fetch_add(1, Ordering::SeqCst);
                        // A slow "fsync" so the others queue up behind it.
                        std::thread::sleep(Duration::from_millis(20));
                        batch.iter().map(|x| x + 1000).collect()
                    })
                })
            })
            .collect();
        for (i, t) in threads.into_iter().enumerate() {
            assert_eq!(t.join().ok().flatten(), Some(i + 1000));
        }
        let n = commits.load(Ordering::SeqCst);
        assert!(n < 32, "32 writers behind a slow commit took {n} commits");
    }

    #[test]
    fn a_short_result_list_is_reported_not_hung() {
        let g = GroupCommit::<u32, u32>::default();
        assert_eq!(g.submit(1, |_| Vec::new()), None);
    }
}
