//! The delivery loop: it pushes one connected device's mailbox, within the connection's
//! delivery window, from the store or from the handoff of the commits since its last read
//! (mailbox.rs).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use hush_protocol::{encode_frame, Deliver, DeviceAddress, EnvelopeId, ServerFrame};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, Semaphore, TryAcquireError};

use super::after_commit::low_prekeys_frame;
use super::SessionContext;
use crate::mailbox::DeviceLink;
use crate::metrics::Metrics;
use crate::store::rules::decide;
use crate::store::StoredEnvelope;

/// Envelopes read from the store per delivery round.
const DELIVERY_BATCH: usize = 128;

/// Whether a push found room at once or had to wait for the device (its acks, its reads).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Room {
    AtOnce,
    AfterWaiting,
}

/// Envelopes pushed on this connection and not yet acknowledged, at most
/// `limits.delivery_window` of them.
pub(super) struct DeliveryWindow {
    permits: Semaphore,
    unacked: std::sync::Mutex<HashSet<EnvelopeId>>,
}

impl DeliveryWindow {
    pub(super) fn new(size: usize) -> Self {
        DeliveryWindow {
            permits: Semaphore::new(size),
            unacked: std::sync::Mutex::new(HashSet::new()),
        }
    }

    /// Records `id` as in flight, waiting for room first if the window is full; `None`
    /// if the window was closed.
    pub(super) async fn push(&self, id: EnvelopeId) -> Option<Room> {
        let room = match self.permits.try_acquire() {
            Ok(permit) => {
                permit.forget();
                Room::AtOnce
            }
            Err(TryAcquireError::NoPermits) => {
                self.permits.acquire().await.ok()?.forget();
                Room::AfterWaiting
            }
            Err(TryAcquireError::Closed) => return None,
        };
        if let Ok(mut unacked) = self.unacked.lock() {
            unacked.insert(id);
        }
        Some(room)
    }

    /// Room left in the window.
    #[cfg(test)]
    pub(super) fn room(&self) -> usize {
        self.permits.available_permits()
    }

    /// Frees the room of the acknowledged ids that were in flight here (ids from another
    /// connection, or acked twice, free nothing).
    pub(super) fn acked(&self, ids: &[EnvelopeId]) {
        let freed = match self.unacked.lock() {
            Ok(mut unacked) => ids.iter().filter(|id| unacked.remove(id)).count(),
            Err(_) => 0,
        };
        self.permits.add_permits(freed);
    }
}

/// Pushes a device's mailbox: first the backlog, in order, then `Drained`, then whatever
/// arrives while it is connected. Reads the store in bounded batches, so memory stays flat
/// however far behind the device is.
///
/// While the device keeps up (the last round read less than a batch, and none of its
/// pushes waited for the device), the envelopes committed since are in the link's handoff
/// (mailbox.rs), and the round pushes them from there without reading the store. A round
/// reads the store first thing after the device connects, after a round that waited, and
/// whenever the handoff cannot vouch for everything since the last read (it overflowed, or
/// a retraction or a failed commit changed the store behind it). Reads go to the blocking
/// pool: they may be of a long backlog, on pages long out of cache.
pub(super) async fn deliver_loop(
    context: Arc<SessionContext>,
    address: DeviceAddress,
    link: DeviceLink,
    window: Arc<DeliveryWindow>,
    outbox: mpsc::Sender<Vec<u8>>,
) {
    let store = context.store.clone();
    let counts = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.prekey_counts(&address)).await
    };
    if let Ok(Ok(counts)) = counts {
        let threshold = context.config.low_prekey_threshold;
        if decide::low_on_prekeys(counts, threshold) {
            let _ = outbox.send(low_prekeys_frame(counts)).await;
        }
    }

    let mut after = None;
    let mut drained = false;
    let mut keeping_up = false;
    loop {
        let now = context.clock.now();
        let handed = if keeping_up {
            link.handoff.take(after)
        } else {
            None
        };
        let from_store = handed.is_none();
        let batch = if let Some(fresh) = handed {
            // Everything committed for the device since the last read, from memory.
            Ok(Ok(fresh
                .into_iter()
                // P3, as the store's read does it.
                .filter(|envelope| decide::deliverable(envelope.expires_at, now))
                .map(|envelope| StoredEnvelope {
                    id: envelope.id,
                    received_at: envelope.received_at,
                    expires_at: envelope.expires_at,
                    // No copy when this device was the only recipient.
                    payload: envelope.payload.into(),
                })
                .collect()))
        } else {
            // The read covers whatever the handoff holds; commits from now on go there again.
            // Until it has succeeded, the handoff is not to be trusted.
            keeping_up = false;
            link.handoff.clear();
            let reader = store.clone();
            tokio::task::spawn_blocking(move || {
                reader.backlog(&address, after, now, DELIVERY_BATCH)
            })
            .await
        };
        let batch = match batch {
            Ok(Ok(batch)) => batch,
            Ok(Err(error)) => {
                tracing::error!(%error, "reading a mailbox failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(_) => return,
        };
        let more = from_store && batch.len() == DELIVERY_BATCH;
        let mut waited = false;
        for envelope in batch {
            match window.push(envelope.id).await {
                Some(Room::AtOnce) => {}
                Some(Room::AfterWaiting) => {
                    waited = true;
                    // P3: the device may have kept the window full for longer than the
                    // envelope had left.
                    if !decide::deliverable(envelope.expires_at, context.clock.now()) {
                        window.acked(&[envelope.id]);
                        after = Some(envelope.id);
                        continue;
                    }
                }
                None => return,
            }
            after = Some(envelope.id);
            let frame = encode_frame(&ServerFrame::Deliver(Deliver {
                id: envelope.id,
                received_at: envelope.received_at,
                payload: envelope.payload,
            }));
            match outbox.try_send(frame) {
                Ok(()) => {}
                Err(TrySendError::Full(frame)) => {
                    waited = true;
                    if outbox.send(frame).await.is_err() {
                        return;
                    }
                }
                Err(TrySendError::Closed(_)) => return,
            }
            Metrics::inc(&context.metrics.envelopes_delivered);
        }
        keeping_up = !more && !waited;
        if more {
            continue;
        }
        if !drained {
            drained = true;
            if outbox
                .send(encode_frame(&ServerFrame::Drained))
                .await
                .is_err()
            {
                return;
            }
        }
        link.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;

    #[tokio::test]
    async fn a_full_window_waits_for_an_ack_of_what_is_in_flight_here() {
        let window = DeliveryWindow::new(2);
        assert!(window.push(EnvelopeId(1)).await == Some(Room::AtOnce));
        assert!(window.push(EnvelopeId(2)).await == Some(Room::AtOnce));
        // Ids not in flight here, and an id acked twice, free nothing.
        window.acked(&[EnvelopeId(9)]);
        window.acked(&[EnvelopeId(1)]);
        window.acked(&[EnvelopeId(1)]);
        assert_eq!(window.room(), 1);
        assert!(window.push(EnvelopeId(3)).await == Some(Room::AtOnce));
        let mut waiting = std::pin::pin!(window.push(EnvelopeId(4)));
        let mut polled = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(
            waiting.as_mut().poll(&mut polled).is_pending(),
            "a full window gave room"
        );
        window.acked(&[EnvelopeId(2)]);
        assert!(waiting.await == Some(Room::AfterWaiting));
        window.permits.close();
        assert!(window.push(EnvelopeId(5)).await.is_none());
    }
}
