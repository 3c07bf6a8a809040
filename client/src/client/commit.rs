//! Group commit for the local store, as the relay's committer does for its own: batches
//! submitted while a commit is under way are written together by the next one, so a
//! client sending and receiving many messages pays one fsync per group, not one each.
//!
//! Invariants:
//! - Batches are applied in the order they were submitted (callers submit under the state
//!   lock, so that order is the order the state went through); a later write of a row
//!   wins.
//! - A [`Ticket`] resolves `Ok` only once its batch is durable (an `Immediate` batch) or
//!   applied (a `Deferred` one, which the next `Immediate` commit makes durable). A group
//!   with nothing to write is answered without a transaction.
//! - After a failed commit, every batch is refused ([`StoreError::Interrupted`]) until
//!   [`Committer::resume`]: those batches were computed from a memory that ran ahead of
//!   the disk, and writing them would persist state derived from what was lost.
//! - [`Committer::fence`] answers once every batch submitted before it is applied or
//!   refused, and refuses every batch after it until `resume`: only then may the client
//!   read its state back from the store, which nothing queued can change any more.
//! - Dropping the committer writes what is deferred durably and waits for the thread, so
//!   the store is released when the client is.

use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

pub(crate) use crate::store::Durability;
use crate::store::{Change, LocalStore, StoreError};

/// Batches written by one transaction at most (a bound on its size, not a wait).
const MAX_GROUP: usize = 512;

enum Job {
    Commit {
        changes: Vec<Change>,
        durability: Durability,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    Resume,
    Fence(oneshot::Sender<()>),
}

/// The handle that submits batches to the commit thread.
pub(crate) struct Committer {
    queue: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

/// The answer to one submitted batch.
pub(crate) struct Ticket(oneshot::Receiver<Result<(), StoreError>>);

impl Ticket {
    /// Waits until the batch is committed.
    pub(crate) async fn committed(self) -> Result<(), StoreError> {
        self.0.await.unwrap_or(Err(StoreError::Interrupted))
    }
}

impl Committer {
    /// Starts the commit thread for `store`.
    pub(crate) fn start(store: std::sync::Arc<LocalStore>) -> Result<Self, StoreError> {
        let (queue, jobs) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("hush-client-commit".into())
            .spawn(move || run(&store, &jobs))?;
        Ok(Committer {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    /// Queues a batch; it is written with whatever else is queued when its turn comes.
    pub(crate) fn submit(&self, changes: Vec<Change>, durability: Durability) -> Ticket {
        let (done, answer) = oneshot::channel();
        if let Some(queue) = &self.queue {
            // A send fails only once the thread is gone; the ticket then says Interrupted.
            let _ = queue.send(Job::Commit {
                changes,
                durability,
                done,
            });
        }
        Ticket(answer)
    }

    /// Refuses every batch from now until [`Committer::resume`]; the answer comes once
    /// everything submitted before is applied or refused.
    pub(crate) fn fence(&self) -> impl std::future::Future<Output = ()> {
        let (done, answer) = oneshot::channel();
        if let Some(queue) = &self.queue {
            let _ = queue.send(Job::Fence(done));
        }
        async move {
            let _ = answer.await;
        }
    }

    /// Takes batches again after a failure (the caller has reset the state it derives
    /// them from).
    pub(crate) fn resume(&self) {
        if let Some(queue) = &self.queue {
            let _ = queue.send(Job::Resume);
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.queue = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(store: &LocalStore, jobs: &mpsc::Receiver<Job>) {
    let mut failed = false;
    // Something was committed `Deferred` since the last `Immediate` commit.
    let mut deferred = false;
    let mut next = None;
    loop {
        let first = match next.take() {
            Some(job) => job,
            None => match jobs.recv() {
                Ok(job) => job,
                Err(_) => break,
            },
        };
        let mut group = Vec::new();
        let mut job = Some(first);
        while let Some(current) = job.take() {
            match current {
                Job::Resume if group.is_empty() => failed = false,
                Job::Fence(done) if group.is_empty() => {
                    failed = true;
                    let _ = done.send(());
                }
                // A resume or a fence ends the group: what precedes it is written (or
                // refused) first.
                job @ (Job::Resume | Job::Fence(_)) => {
                    next = Some(job);
                    break;
                }
                Job::Commit {
                    changes,
                    durability,
                    done,
                } => group.push((changes, durability, done)),
            }
            if group.len() < MAX_GROUP {
                job = jobs.try_recv().ok();
            }
        }
        if group.is_empty() {
            continue;
        }
        if failed {
            for (_, _, done) in group {
                let _ = done.send(Err(StoreError::Interrupted));
            }
            continue;
        }
        let durability = if group
            .iter()
            .any(|(_, durability, _)| *durability == Durability::Immediate)
        {
            Durability::Immediate
        } else {
            Durability::Deferred
        };
        let mut changes = Vec::new();
        let mut answers = Vec::with_capacity(group.len());
        for (batch, _, done) in group {
            changes.extend(batch);
            answers.push(done);
        }
        if changes.is_empty() {
            // Nothing to write (a batch of pushed events that changed nothing): no
            // transaction, no fsync. What is deferred stays so until something is written.
            for done in answers {
                let _ = done.send(Ok(()));
            }
            continue;
        }
        match store.commit_with(changes, durability) {
            Ok(()) => {
                deferred = durability == Durability::Deferred;
                for done in answers {
                    let _ = done.send(Ok(()));
                }
            }
            Err(error) => {
                failed = true;
                tracing::warn!(%error, "local store commit failed");
                let mut answers = answers.into_iter();
                if let Some(done) = answers.next() {
                    let _ = done.send(Err(error));
                }
                for done in answers {
                    let _ = done.send(Err(StoreError::Interrupted));
                }
            }
        }
    }
    // Deferred batches already applied are made durable even after a failure: they were
    // answered `Ok`.
    if deferred {
        if let Err(error) = store.commit_with(Vec::new(), Durability::Immediate) {
            tracing::warn!(%error, "local store: the last deferred commits are not durable");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use zeroize::Zeroizing;

    use super::*;
    use crate::store::{StorageKey, Table};

    fn put(store: &LocalStore, key: &[u8], value: &[u8]) -> Change {
        store.put(Table::State, key, Zeroizing::new(value.to_vec()))
    }

    #[tokio::test]
    async fn batches_land_in_submission_order_and_a_later_write_wins() {
        let store = Arc::new(LocalStore::in_memory(&StorageKey::from_bytes([1; 32])));
        let committer = Committer::start(store.clone()).unwrap();
        let tickets: Vec<Ticket> = (0u8..50)
            .map(|i| committer.submit(vec![put(&store, b"row", &[i])], Durability::Immediate))
            .collect();
        for ticket in tickets {
            ticket.committed().await.unwrap();
        }
        assert_eq!(
            store.get(Table::State, b"row").unwrap().unwrap().as_slice(),
            &[49]
        );
    }

    #[tokio::test]
    async fn deferred_batches_are_durable_once_the_committer_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let key = [2; 32];
        {
            let store =
                Arc::new(LocalStore::open(dir.path(), &StorageKey::from_bytes(key)).unwrap());
            let committer = Committer::start(store.clone()).unwrap();
            committer
                .submit(vec![put(&store, b"late", b"yes")], Durability::Deferred)
                .committed()
                .await
                .unwrap();
            // Visible at once, before any fsync.
            assert!(store.get(Table::State, b"late").unwrap().is_some());
            drop(committer);
        }
        let store = LocalStore::open(dir.path(), &StorageKey::from_bytes(key)).unwrap();
        assert_eq!(
            store
                .get(Table::State, b"late")
                .unwrap()
                .unwrap()
                .as_slice(),
            b"yes"
        );
    }

    #[tokio::test]
    async fn after_a_failed_commit_nothing_is_written_until_resumed() {
        let store = Arc::new(LocalStore::in_memory(&StorageKey::from_bytes([3; 32])));
        let committer = Committer::start(store.clone()).unwrap();
        store.fail_next_commit();
        let failed = committer.submit(vec![put(&store, b"a", b"1")], Durability::Immediate);
        assert!(failed.committed().await.is_err());
        let refused = committer.submit(vec![put(&store, b"b", b"2")], Durability::Immediate);
        assert!(matches!(
            refused.committed().await,
            Err(StoreError::Interrupted)
        ));
        assert!(store.get(Table::State, b"b").unwrap().is_none());
        committer.resume();
        committer
            .submit(vec![put(&store, b"c", b"3")], Durability::Immediate)
            .committed()
            .await
            .unwrap();
        assert!(store.get(Table::State, b"a").unwrap().is_none());
        assert!(store.get(Table::State, b"c").unwrap().is_some());
    }

    /// The client reads its state back from the store only behind a fence: everything
    /// queued before is on disk (or refused), and nothing after it is written until resumed.
    #[tokio::test]
    async fn a_fence_waits_for_what_was_queued_and_refuses_what_follows() {
        let store = Arc::new(LocalStore::in_memory(&StorageKey::from_bytes([4; 32])));
        let committer = Committer::start(store.clone()).unwrap();
        let before = committer.submit(vec![put(&store, b"before", b"1")], Durability::Immediate);
        committer.fence().await;
        assert!(store.get(Table::State, b"before").unwrap().is_some());
        before.committed().await.unwrap();
        let after = committer.submit(vec![put(&store, b"after", b"2")], Durability::Immediate);
        assert!(matches!(
            after.committed().await,
            Err(StoreError::Interrupted)
        ));
        assert!(store.get(Table::State, b"after").unwrap().is_none());
        committer.resume();
        committer
            .submit(vec![put(&store, b"after", b"3")], Durability::Immediate)
            .committed()
            .await
            .unwrap();
        assert!(store.get(Table::State, b"after").unwrap().is_some());
    }
}
