//! Group commit: one thread owns every write to the store. Writes that arrive while a
//! commit is being fsynced wait in the queue and go into the next transaction together, so
//! under load many senders share one fsync, and nobody is answered before the fsync that
//! covers their write (P4).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use crate::store::{Store, Write, WriteResult};

/// Most writes in one transaction; bounds commit latency under a flood.
const MAX_BATCH: usize = 2048;
/// Writes queued for the committer before submitters wait.
const QUEUE_DEPTH: usize = 8192;

/// A write could not be committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// The store failed; the whole batch was rolled back.
    #[error("the store failed to commit")]
    Storage,
    /// The relay is shutting down.
    #[error("the committer has stopped")]
    Stopped,
}

/// Counters of the committer's work.
#[derive(Debug, Default)]
pub struct CommitStats {
    /// Durable transactions committed (one fsync each).
    pub commits: AtomicU64,
    /// Writes those transactions carried.
    pub writes: AtomicU64,
    /// Transactions that failed.
    pub failures: AtomicU64,
}

struct Job {
    write: Write,
    reply: oneshot::Sender<Result<WriteResult, CommitError>>,
}

/// The handle through which writes reach the commit thread. Clones share the thread.
#[derive(Clone)]
pub struct Committer {
    queue: mpsc::Sender<Job>,
    stats: Arc<CommitStats>,
}

/// Joins the commit thread once every [`Committer`] handle is gone.
pub struct CommitThread(JoinHandle<()>);

impl CommitThread {
    /// Waits for the thread to commit what is queued and stop.
    pub fn join(self) {
        // The thread's body does not panic; if it did, there is nothing left to do here.
        let _ = self.0.join();
    }
}

/// A write handed to the committer; await it for the outcome.
pub struct Pending(oneshot::Receiver<Result<WriteResult, CommitError>>);

impl Pending {
    /// The write's outcome, after its transaction is durable.
    pub async fn outcome(mut self) -> Result<WriteResult, CommitError> {
        self.wait().await
    }

    /// Waits for the outcome without giving the write up, so the wait can be cancelled and
    /// resumed. Not to be called again once it has returned.
    pub async fn wait(&mut self) -> Result<WriteResult, CommitError> {
        (&mut self.0).await.unwrap_or(Err(CommitError::Stopped))
    }

    /// The outcome if the write's transaction is already durable.
    pub fn ready(&mut self) -> Option<Result<WriteResult, CommitError>> {
        match self.0.try_recv() {
            Ok(outcome) => Some(outcome),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(CommitError::Stopped)),
        }
    }

    /// A pending outcome and the sender that settles it, for tests of what waits on one.
    #[cfg(test)]
    pub(crate) fn channel() -> (oneshot::Sender<Result<WriteResult, CommitError>>, Pending) {
        let (reply, outcome) = oneshot::channel();
        (reply, Pending(outcome))
    }
}

impl Committer {
    /// Starts the commit thread for `store`. `on_durable` sees each transaction's results
    /// once it is durable, before any submitter hears of it (the relay hands new envelopes
    /// to their connected recipients there, without waiting for the sender's connection),
    /// and may take from them what the submitters do not need. `on_failure` runs when a
    /// transaction fails, before its submitters hear of it: whether its writes reached
    /// the disk is then unknown.
    pub fn start(
        store: Arc<dyn Store>,
        on_durable: impl Fn(&mut [WriteResult]) + Send + 'static,
        on_failure: impl Fn() + Send + 'static,
    ) -> std::io::Result<(Committer, CommitThread)> {
        let (queue, jobs) = mpsc::channel(QUEUE_DEPTH);
        let stats = Arc::new(CommitStats::default());
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("hush-commit".into())
            .spawn(move || {
                run(
                    store.as_ref(),
                    jobs,
                    &thread_stats,
                    &on_durable,
                    &on_failure,
                );
            })?;
        Ok((Committer { queue, stats }, CommitThread(thread)))
    }

    /// Queues a write, waiting for room if the queue is full. Writes are applied in the
    /// order they were submitted.
    pub async fn submit(&self, write: Write) -> Pending {
        let (reply, outcome) = oneshot::channel();
        // If the thread is gone, the dropped reply makes `outcome` report `Stopped`.
        let _ = self.queue.send(Job { write, reply }).await;
        Pending(outcome)
    }

    /// Submits and waits.
    pub async fn commit(&self, write: Write) -> Result<WriteResult, CommitError> {
        self.submit(write).await.outcome().await
    }

    /// The committer's counters.
    pub fn stats(&self) -> &CommitStats {
        &self.stats
    }

    /// The committer's counters, to be read by what must not hold a committer (the admin
    /// socket: a handle would keep the commit thread alive and could write).
    pub fn shared_stats(&self) -> Arc<CommitStats> {
        self.stats.clone()
    }
}

fn run(
    store: &dyn Store,
    mut jobs: mpsc::Receiver<Job>,
    stats: &CommitStats,
    on_durable: &dyn Fn(&mut [WriteResult]),
    on_failure: &dyn Fn(),
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = jobs.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let (writes, replies): (Vec<_>, Vec<_>) =
            batch.drain(..).map(|j| (j.write, j.reply)).unzip();
        let count = writes.len() as u64;
        match store.apply(writes) {
            Ok(mut results) => {
                stats.commits.fetch_add(1, Ordering::Relaxed);
                stats.writes.fetch_add(count, Ordering::Relaxed);
                on_durable(&mut results);
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(result));
                }
            }
            Err(error) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                // Store errors name files and redb internals, never people.
                tracing::error!(%error, writes = count, "commit failed; batch rolled back");
                on_failure();
                for reply in replies {
                    let _ = reply.send(Err(CommitError::Storage));
                }
            }
        }
    }
}
