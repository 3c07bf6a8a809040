//! The writer: it owns the stream's send half, and answers a connection's writes in the
//! order they were submitted, as their commits become durable, coalescing what is ready
//! into one write.

use std::collections::VecDeque;
use std::sync::{Arc, PoisonError};

use hush_protocol::{encode_frame, ErrorCode, RequestId, Response, ResponseBody, ServerFrame};
use quinn::SendStream;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit};

use crate::commit::{CommitError, Pending};
use crate::store::{Outcome, Refusal, WriteResult};

/// Bytes of queued frames the writer coalesces into one write.
const WRITE_COALESCE: usize = 64 * 1024;

/// A write this connection submitted, answered once its commit is durable.
pub(super) struct Answer {
    id: RequestId,
    pending: Pending,
    /// Bounds requests in flight; released when the writer takes the answer to write it,
    /// or when the queue drops it because the writer has stopped.
    _permit: OwnedSemaphorePermit,
}

impl Answer {
    /// The answer to request `id`, once `pending` is durable; holds `permit` till then.
    pub(super) fn new(id: RequestId, pending: Pending, permit: OwnedSemaphorePermit) -> Self {
        Answer {
            id,
            pending,
            _permit: permit,
        }
    }
}

/// A connection's writes awaiting their commits, oldest first, between the read loop that
/// submits them and the writer that answers them. Commits are applied in submission order,
/// so the oldest is always the next to become durable. A queue that empties gives its
/// buffer back: a quiet connection holds none (a channel would hold its first block of
/// slots for the connection's life).
#[derive(Default)]
pub(super) struct AnswerQueue {
    waiting: std::sync::Mutex<Waiting>,
    added: Notify,
}

#[derive(Default)]
struct Waiting {
    answers: VecDeque<Answer>,
    /// The writer has stopped: nothing will be answered, so nothing may wait (a waiting
    /// answer holds an in-flight permit that the end of the session waits for).
    writer_gone: bool,
}

impl AnswerQueue {
    pub(super) fn push(&self, answer: Answer) {
        let mut waiting = self.lock();
        if !waiting.writer_gone {
            waiting.answers.push_back(answer);
            drop(waiting);
            self.added.notify_one();
        }
    }

    fn pop(&self) -> Option<Answer> {
        let mut waiting = self.lock();
        let oldest = waiting.answers.pop_front();
        if waiting.answers.is_empty() {
            waiting.answers.shrink_to_fit();
        }
        oldest
    }

    /// Drops every waiting answer, and every answer pushed from now on.
    fn close(&self) {
        let mut waiting = self.lock();
        waiting.writer_gone = true;
        waiting.answers = VecDeque::new();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        // Every critical section is one queue operation, so a poisoned queue is intact.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The writer's side of the [`AnswerQueue`].
pub(super) struct Answers {
    queue: Arc<AnswerQueue>,
    /// The oldest, taken from the queue and still waiting for its commit.
    oldest: Option<Answer>,
}

impl Drop for Answers {
    fn drop(&mut self) {
        self.queue.close();
    }
}

impl Answers {
    pub(super) fn new(queue: Arc<AnswerQueue>) -> Self {
        Answers {
            queue,
            oldest: None,
        }
    }

    /// Waits for the oldest write's outcome. Cancel-safe: a write taken from the queue
    /// waits in `oldest`, and the queue is looked at before every wait for a push.
    async fn next(&mut self) -> (RequestId, Result<WriteResult, CommitError>) {
        loop {
            if self.oldest.is_none() {
                self.oldest = self.queue.pop();
            }
            if let Some(answer) = self.oldest.as_mut() {
                let outcome = answer.pending.wait().await;
                if let Some(answer) = self.oldest.take() {
                    return (answer.id, outcome);
                }
            }
            self.queue.added.notified().await;
        }
    }

    /// The oldest write's outcome, if its commit is already durable.
    fn ready(&mut self) -> Option<(RequestId, Result<WriteResult, CommitError>)> {
        if self.oldest.is_none() {
            self.oldest = self.queue.pop();
        }
        let outcome = self.oldest.as_mut()?.pending.ready()?;
        self.oldest.take().map(|answer| (answer.id, outcome))
    }
}

pub(super) fn encode_answer(id: RequestId, outcome: Result<WriteResult, CommitError>) -> Vec<u8> {
    let result = respond_to_write(outcome);
    encode_frame(&ServerFrame::Response(Response { id, result }))
}

/// Writes the connection's frames and the answers to its writes. One commit makes a batch
/// of answers durable at once; they, and whatever frames are queued, go out in one write,
/// so that a busy connection sends full packets rather than a packet per answer.
pub(super) async fn write_loop(
    mut send: SendStream,
    mut frames: mpsc::Receiver<Vec<u8>>,
    mut answers: Answers,
) {
    loop {
        let mut buffer = tokio::select! {
            frame = frames.recv() => match frame {
                Some(frame) => frame,
                None => break,
            },
            (id, outcome) = answers.next() => encode_answer(id, outcome),
        };
        while buffer.len() < WRITE_COALESCE {
            if let Some((id, outcome)) = answers.ready() {
                buffer.extend_from_slice(&encode_answer(id, outcome));
                continue;
            }
            match frames.try_recv() {
                Ok(more) => buffer.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if send.write_all(&buffer).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
    let _ = send.stopped().await;
}

/// Turns a committed write into the client's response.
pub(super) fn respond_to_write(
    outcome: Result<WriteResult, CommitError>,
) -> Result<ResponseBody, ErrorCode> {
    let outcome = outcome.map_err(commit_error_code)?.map_err(Refusal::code)?;
    Ok(match outcome {
        Outcome::Enqueued { .. } => ResponseBody::Sent,
        Outcome::Acked { unknown: 0 } => ResponseBody::Acked,
        Outcome::Acked { .. } => return Err(ErrorCode::UnknownEnvelope),
        Outcome::Prekeys { bundles, .. } => ResponseBody::PrekeyBundles(bundles),
        Outcome::PrekeysStored(counts) => ResponseBody::PrekeysStored {
            one_time: counts.one_time,
            kem_one_time: counts.kem_one_time,
        },
        Outcome::DeviceAdded(device) => ResponseBody::DeviceAdded { device },
        Outcome::DeviceRemoved { .. } => ResponseBody::DeviceRemoved,
        Outcome::DeliveryAccessSet => ResponseBody::DeliveryAccessSet,
        Outcome::Retracted { count } => ResponseBody::Retracted { count },
        Outcome::CallRecorded => ResponseBody::CallEnded,
        Outcome::Registered
        | Outcome::Expired { .. }
        | Outcome::InviteAdded
        | Outcome::CallsDeleted { .. } => return Err(ErrorCode::Internal),
    })
}

pub(super) fn commit_error_code(error: CommitError) -> ErrorCode {
    match error {
        CommitError::Storage => ErrorCode::StorageFailure,
        CommitError::Stopped => ErrorCode::ShuttingDown,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use tokio::sync::{oneshot, Semaphore};

    use super::*;

    fn answer(
        id: u32,
        permits: &Arc<Semaphore>,
    ) -> (oneshot::Sender<Result<WriteResult, CommitError>>, Answer) {
        let (reply, pending) = Pending::channel();
        let permit = permits.clone().try_acquire_owned().unwrap();
        let answer = Answer {
            id: RequestId(id),
            pending,
            _permit: permit,
        };
        (reply, answer)
    }

    /// A queue, its writer's side, and `permits` in-flight permits for answers to hold.
    fn answer_queue(permits: usize) -> (Arc<Semaphore>, Arc<AnswerQueue>, Answers) {
        let queue = Arc::new(AnswerQueue::default());
        let answers = Answers::new(queue.clone());
        (Arc::new(Semaphore::new(permits)), queue, answers)
    }

    fn acked() -> Outcome {
        Outcome::Acked { unknown: 0 }
    }

    #[tokio::test]
    async fn answers_come_oldest_first_and_an_empty_queue_holds_no_buffer() {
        let (permits, queue, mut answers) = answer_queue(3);
        let (first, a) = answer(1, &permits);
        let (second, b) = answer(2, &permits);
        let (third, c) = answer(3, &permits);
        queue.push(a);
        queue.push(b);
        queue.push(c);

        // A later commit done first does not jump the queue.
        second.send(Ok(Ok(acked()))).unwrap();
        assert!(answers.ready().is_none());
        first.send(Ok(Ok(acked()))).unwrap();
        assert_eq!(answers.ready().map(|(id, _)| id), Some(RequestId(1)));
        assert_eq!(answers.ready().map(|(id, _)| id), Some(RequestId(2)));
        assert!(answers.ready().is_none());
        assert_eq!(
            permits.available_permits(),
            2,
            "answered writes release their permits"
        );

        third.send(Ok(Ok(acked()))).unwrap();
        let (id, outcome) = tokio::time::timeout(Duration::from_secs(5), answers.next())
            .await
            .unwrap();
        assert_eq!(id, RequestId(3));
        assert_eq!(outcome, Ok(Ok(acked())));
        assert_eq!(
            queue.lock().answers.capacity(),
            0,
            "the drained queue kept its buffer"
        );
        assert_eq!(permits.available_permits(), 3);
    }

    #[tokio::test]
    async fn a_push_wakes_a_writer_waiting_on_an_empty_queue() {
        let (permits, queue, mut answers) = answer_queue(1);
        let writer = tokio::spawn(async move { answers.next().await.0 });
        tokio::task::yield_now().await;
        let (reply, a) = answer(7, &permits);
        queue.push(a);
        reply.send(Ok(Ok(acked()))).unwrap();
        let id = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(id, RequestId(7));
    }

    #[tokio::test]
    async fn a_wait_given_up_keeps_its_answer_for_the_next() {
        let (permits, queue, mut answers) = answer_queue(2);
        let (first, a) = answer(1, &permits);
        let (second, b) = answer(2, &permits);
        queue.push(a);
        queue.push(b);
        // The writer's `select!` drops `next()` whenever a frame comes first.
        let gave_up = tokio::time::timeout(Duration::ZERO, answers.next()).await;
        assert!(gave_up.is_err());
        first.send(Ok(Ok(acked()))).unwrap();
        assert_eq!(answers.ready().map(|(id, _)| id), Some(RequestId(1)));
        // A write whose commit can no longer happen is answered, not forgotten.
        drop(second);
        let (id, outcome) = answers.ready().unwrap();
        assert_eq!(id, RequestId(2));
        assert_eq!(outcome, Err(CommitError::Stopped));
        assert!(answers.ready().is_none());
        assert_eq!(permits.available_permits(), 2);
    }

    #[test]
    fn when_the_writer_stops_no_answer_keeps_its_permit() {
        let (permits, queue, answers) = answer_queue(2);
        let (_waiting_reply, waiting) = answer(1, &permits);
        queue.push(waiting);
        assert_eq!(permits.available_permits(), 1);
        drop(answers);
        assert_eq!(
            permits.available_permits(),
            2,
            "a queued answer kept its permit"
        );
        let (_late_reply, late) = answer(2, &permits);
        queue.push(late);
        assert_eq!(
            permits.available_permits(),
            2,
            "a late answer kept its permit"
        );
    }

    #[test]
    fn a_commit_outcome_becomes_the_clients_answer() {
        assert_eq!(respond_to_write(Ok(Ok(acked()))), Ok(ResponseBody::Acked));
        assert_eq!(
            respond_to_write(Ok(Ok(Outcome::Acked { unknown: 2 }))),
            Err(ErrorCode::UnknownEnvelope)
        );
        assert_eq!(
            respond_to_write(Ok(Err(Refusal::MailboxFull))),
            Err(Refusal::MailboxFull.code())
        );
        assert_eq!(
            respond_to_write(Err(CommitError::Storage)),
            Err(ErrorCode::StorageFailure)
        );
        assert_eq!(
            respond_to_write(Err(CommitError::Stopped)),
            Err(ErrorCode::ShuttingDown)
        );
        // Outcomes no client request can have.
        assert_eq!(
            respond_to_write(Ok(Ok(Outcome::Registered))),
            Err(ErrorCode::Internal)
        );
    }
}
