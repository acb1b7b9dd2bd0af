//! Group commit: writers queue their changes and wait asynchronously; one committer on a
//! blocking thread commits whatever is queued in one transaction, then the next batch, until the
//! queue is empty. A lone writer is committed at once (no timer, no extra latency); under load
//! one fsync covers many writers, which lifts the single-writer ceiling of redb (about one
//! durable commit per millisecond here). Waiting writers hold no thread: with 1,000 concurrent
//! turns a thread per waiter grew the blocking pool to its 512-thread limit.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The queue and whether a committer is running.
struct Queue<C, R> {
    pending: Vec<(C, oneshot::Sender<R>)>,
    committing: bool,
    /// When the last committer finished.
    idle_since: Option<Instant>,
}

/// Changes waiting for the committer.
pub(crate) struct GroupCommit<C, R> {
    queue: Mutex<Queue<C, R>>,
}

impl<C, R> Default for GroupCommit<C, R> {
    fn default() -> Self {
        Self {
            queue: Mutex::new(Queue {
                pending: Vec::new(),
                committing: false,
                idle_since: None,
            }),
        }
    }
}

/// A poisoned lock only means another writer panicked; the queue (like the store file's extent)
/// is still consistent.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Handed to the caller that must start the committer: run [`Committer::run`] on a blocking
/// thread. Dropped without running (a panic, a runtime shutting down), it fails every queued
/// change instead of leaving its writer waiting forever.
pub(crate) struct Committer<C, R> {
    group: Arc<GroupCommit<C, R>>,
    /// Set by `run`, under the queue lock, when it leaves an empty queue behind; from then on
    /// the queue may already belong to the next committer.
    finished: bool,
    /// How long no committer had been running when this one was started (`None`: never).
    idle_for: Option<Duration>,
}

impl<C, R> GroupCommit<C, R> {
    /// Queues `change`. The receiver gets its result once a commit including it has finished
    /// (or is closed if that commit panicked). When no committer is running, the caller gets
    /// the job of starting one.
    pub(crate) fn enqueue(
        self: &Arc<Self>,
        change: C,
    ) -> (oneshot::Receiver<R>, Option<Committer<C, R>>) {
        let (tx, rx) = oneshot::channel();
        let mut q = lock(&self.queue);
        q.pending.push((change, tx));
        let start = !q.committing;
        q.committing = true;
        (
            rx,
            start.then(|| Committer {
                group: self.clone(),
                finished: false,
                idle_for: q.idle_since.map(|t| t.elapsed()),
            }),
        )
    }
}

impl<C, R> Committer<C, R> {
    /// Commits batches in arrival order until the queue is empty. `commit` must return one
    /// result per change, in order; a change left without a result sees its receiver closed.
    /// `idle` runs once each time the queue empties, after the batch's writers were answered
    /// (the store checkpoints its turn log there); changes queued meanwhile are committed next.
    pub(crate) fn run(mut self, mut commit: impl FnMut(Vec<C>) -> Vec<R>, mut idle: impl FnMut()) {
        let mut idled = false;
        loop {
            let batch = {
                let mut q = lock(&self.group.queue);
                if q.pending.is_empty() {
                    if idled {
                        q.committing = false;
                        q.idle_since = Some(Instant::now());
                        self.finished = true;
                        break;
                    }
                    None
                } else {
                    Some(std::mem::take(&mut q.pending))
                }
            };
            let Some(batch) = batch else {
                idled = true;
                idle();
                continue;
            };
            idled = false;
            answer(batch, &mut commit);
        }
    }

    /// Whether the store had been idle for at least `gap` before this committer started.
    pub(crate) fn idle_for_at_least(&self, gap: Duration) -> bool {
        self.idle_for.is_none_or(|d| d >= gap)
    }

    /// Commits the queue as it is now (the caller's own change among it) on the calling
    /// thread, then stays the running committer: pass it on to [`Committer::run`] for whatever
    /// queued meanwhile and the idle step.
    pub(crate) fn commit_queued(&mut self, mut commit: impl FnMut(Vec<C>) -> Vec<R>) {
        let batch = std::mem::take(&mut lock(&self.group.queue).pending);
        if !batch.is_empty() {
            answer(batch, &mut commit);
        }
    }
}

/// Commits `batch` and hands each writer its result.
fn answer<C, R>(batch: Vec<(C, oneshot::Sender<R>)>, commit: &mut impl FnMut(Vec<C>) -> Vec<R>) {
    let (changes, senders): (Vec<C>, Vec<oneshot::Sender<R>>) = batch.into_iter().unzip();
    for (result, sender) in commit(changes).into_iter().zip(senders) {
        // The writer may have gone away (its request was cancelled); the change is
        // committed all the same.
        let _ = sender.send(result);
    }
}

impl<C, R> Drop for Committer<C, R> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Not a clean exit from `run`, so this is still the running committer: close every
        // waiter so it reports an error, and let the next writer start a new committer.
        let mut q = lock(&self.group.queue);
        q.pending.clear();
        q.committing = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Commits running right now, and the most seen at once.
    static RUNNING: AtomicUsize = AtomicUsize::new(0);
    static MOST_RUNNING: AtomicUsize = AtomicUsize::new(0);

    /// What the store does: whoever is told to, runs the committer on a blocking thread.
    async fn submit(
        g: &Arc<GroupCommit<usize, usize>>,
        change: usize,
        commits: &Arc<AtomicUsize>,
    ) -> Option<usize> {
        let (rx, committer) = g.enqueue(change);
        if let Some(committer) = committer {
            let commits = commits.clone();
            tokio::task::spawn_blocking(move || {
                committer.run(
                    |batch| {
                        commits.fetch_add(1, Ordering::SeqCst);
                        let now = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
                        MOST_RUNNING.fetch_max(now, Ordering::SeqCst);
                        // A slow "fsync" so that others queue up behind it.
                        std::thread::sleep(Duration::from_millis(20));
                        RUNNING.fetch_sub(1, Ordering::SeqCst);
                        batch.iter().map(|x| x + 1000).collect()
                    },
                    || {},
                )
            });
        }
        rx.await.ok()
    }

    #[tokio::test]
    async fn a_lone_writer_commits_its_own_change() {
        let g = Arc::new(GroupCommit::<u32, u32>::default());
        let (rx, committer) = g.enqueue(7);
        committer
            .expect("the first writer starts the committer")
            .run(|batch| batch.iter().map(|x| x * 2).collect(), || {});
        assert_eq!(rx.await.ok(), Some(14));
        let (_rx, committer) = g.enqueue(8);
        assert!(committer.is_some(), "an idle queue starts a new committer");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_share_commits_and_each_gets_its_own_result() {
        let g = Arc::new(GroupCommit::<usize, usize>::default());
        let commits = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let (g, commits) = (g.clone(), commits.clone());
                tokio::spawn(async move { submit(&g, i, &commits).await })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.ok().flatten(), Some(i + 1000));
        }
        let n = commits.load(Ordering::SeqCst);
        assert!(n < 32, "32 writers behind a slow commit took {n} commits");
        // Waiters hold no thread: one committer at a time drains the queue.
        assert_eq!(MOST_RUNNING.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn idle_runs_after_the_writers_are_answered_and_changes_queued_meanwhile_commit() {
        let g = Arc::new(GroupCommit::<u32, u32>::default());
        let (rx1, committer) = g.enqueue(1);
        let mut idles = 0;
        let mut late = None;
        committer.expect("committer").run(
            |batch| batch,
            || {
                idles += 1;
                if idles == 1 {
                    // A writer arriving while the committer checkpoints joins its queue.
                    let (rx, none) = g.enqueue(2);
                    assert!(none.is_none(), "the running committer takes it");
                    late = Some(rx);
                }
            },
        );
        assert_eq!(rx1.await.ok(), Some(1));
        assert_eq!(late.expect("queued").await.ok(), Some(2));
        assert_eq!(idles, 2, "once after each batch that emptied the queue");
    }

    #[tokio::test]
    async fn a_writer_commits_the_queue_on_its_own_thread_and_hands_the_rest_on() {
        let g = Arc::new(GroupCommit::<u32, u32>::default());
        let (rx1, committer) = g.enqueue(1);
        let mut committer = committer.expect("the first writer starts the committer");
        assert!(
            committer.idle_for_at_least(Duration::from_secs(3600)),
            "a store that never committed counts as idle"
        );
        let caller = std::thread::current().id();
        let mut late = None;
        committer.commit_queued(|batch| {
            assert_eq!(std::thread::current().id(), caller);
            // A writer arriving meanwhile joins the running committer's next batch.
            let (rx, none) = g.enqueue(2);
            assert!(none.is_none(), "still the running committer");
            late = Some(rx);
            batch.iter().map(|x| x * 10).collect()
        });
        assert_eq!(rx1.await.ok(), Some(10));
        committer.run(|batch| batch.iter().map(|x| x * 10).collect(), || {});
        assert_eq!(late.expect("queued").await.ok(), Some(20));
        let (_rx, next) = g.enqueue(3);
        let next = next.expect("an idle queue starts a new committer");
        assert!(next.idle_for_at_least(Duration::ZERO));
        assert!(
            !next.idle_for_at_least(Duration::from_secs(3600)),
            "the store committed just now"
        );
    }

    #[tokio::test]
    async fn a_short_result_list_closes_the_waiter_instead_of_hanging() {
        let g = Arc::new(GroupCommit::<u32, u32>::default());
        let (rx, committer) = g.enqueue(1);
        committer.expect("committer").run(|_| Vec::new(), || {});
        assert!(rx.await.is_err());
    }

    #[tokio::test]
    async fn a_committer_dropped_unrun_fails_its_waiters_and_frees_the_queue() {
        let g = Arc::new(GroupCommit::<u32, u32>::default());
        let (rx1, committer) = g.enqueue(1);
        let (rx2, none) = g.enqueue(2);
        assert!(none.is_none(), "one committer at a time");
        drop(committer);
        assert!(rx1.await.is_err());
        assert!(rx2.await.is_err());
        let (rx3, committer) = g.enqueue(3);
        committer.expect("a new committer").run(|b| b, || {});
        assert_eq!(rx3.await.ok(), Some(3));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_finishing_committer_never_fails_the_next_writers() {
        // Tiny commits, so the queue keeps going idle and a new committer starts while the
        // previous one is still returning from `run`.
        let g = Arc::new(GroupCommit::<u32, u32>::default());
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let g = g.clone();
                tokio::spawn(async move {
                    for i in 0..300 {
                        let (rx, committer) = g.enqueue(i);
                        if let Some(committer) = committer {
                            tokio::task::spawn_blocking(move || committer.run(|b| b, || {}));
                        }
                        if rx.await != Ok(i) {
                            return false;
                        }
                    }
                    true
                })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap_or(false), "a change lost its result");
        }
    }
}
