//! The client's background tasks besides the receive loop: acknowledgements, the worker
//! (receipts, copies for our own devices, call signals, prekey upkeep) and call media.

use std::collections::HashMap;
use std::sync::Arc;

use hush_protocol::{AccountId, EnvelopeId};
use rand_core::OsRng;
use tokio::sync::mpsc;

use super::commit::Durability;
use super::state::{Inner, State, Work};
use super::ClientError;
use crate::connection::Connection;
use crate::content::MessageId;
use crate::util::random;

/// One-time prekeys of each kind kept on the relay.
const PREKEY_BATCH: u32 = 100;

/// Hands media datagrams to their calls.
pub(super) async fn media_loop(inner: Arc<Inner>) {
    while let Some((allocation, sealed)) = inner.connection.next_media().await {
        inner.media_arrived(allocation, &sealed);
    }
}

/// Acknowledges handled envelopes, batching whatever is ready into one request.
pub(super) async fn ack_loop(inner: Arc<Inner>, mut queue: mpsc::UnboundedReceiver<EnvelopeId>) {
    while let Some(first) = queue.recv().await {
        let mut ids = vec![first];
        while ids.len() < hush_protocol::limits::MAX_ACKS_PER_FRAME {
            match queue.try_recv() {
                Ok(id) => ids.push(id),
                Err(_) => break,
            }
        }
        // A failed ack only means the relay delivers the envelope again, and the ratchet
        // then refuses it as a duplicate.
        if let Err(error) = inner.connection.ack(&ids).await {
            tracing::debug!(%error, "ack not sent");
        }
    }
}

/// Delivery receipts, copies for our own devices, and prekey maintenance. Receipts and
/// copies wait a random moment (up to a second) and receipts go out in one message per
/// contact, so their timing says less about the message that caused them.
pub(super) async fn work_loop(inner: Arc<Inner>, mut queue: mpsc::UnboundedReceiver<Work>) {
    while let Some(first) = queue.recv().await {
        let mut receipts: HashMap<AccountId, Vec<MessageId>> = HashMap::new();
        let mut copies = Vec::new();
        let mut next = Some(first);
        let mut delayed = false;
        while let Some(work) = next.take() {
            if !delayed && matches!(work, Work::Receipt(..) | Work::OwnCopy(_)) {
                delayed = true;
                let jitter = u64::from(random::<1>()[0]) * 1000 / 255;
                tokio::time::sleep(std::time::Duration::from_millis(jitter)).await;
            }
            match work {
                Work::Receipt(to, id) => receipts.entry(to).or_default().push(id),
                Work::OwnCopy(content) => copies.push(content),
                Work::CallSignal(to, signal) => {
                    if let Err(error) = inner.send_signal(to, signal).await {
                        tracing::debug!(%error, "call signal not sent");
                    }
                }
                Work::EndCall(allocation, outcome) => {
                    if let Err(error) = inner.connection.end_call(allocation, outcome).await {
                        tracing::debug!(%error, "call end not sent");
                    }
                }
                Work::Prekeys { replenish } => {
                    if let Err(error) = inner.maintain_prekeys(replenish).await {
                        tracing::warn!(%error, "could not upload prekeys");
                    }
                }
            }
            next = queue.try_recv().ok();
        }
        for content in copies {
            if let Err(error) = inner.send_to_own_devices(&content).await {
                tracing::debug!(%error, "copy to own devices not sent");
            }
        }
        for (to, ids) in receipts {
            if let Err(error) = inner.send_receipt(to, ids).await {
                tracing::debug!(%error, "delivery receipt not sent");
            }
        }
    }
}

impl Inner {
    /// Rotates and replenishes our prekeys as due, stores them, then uploads what is new.
    pub(super) async fn maintain_prekeys(&self, replenish: bool) -> Result<(), ClientError> {
        let now = self.now();
        let (upload, ticket) = {
            let mut state = self.lock();
            let Some(upload) = renew_prekeys(&mut state, now, replenish) else {
                return Ok(());
            };
            state.prekeys_changed();
            (
                upload,
                self.submit(&mut state, Vec::new(), Durability::Immediate),
            )
        };
        // The store comes first: a key the relay hands out must never be one we lost.
        self.committed(ticket).await?;
        self.connection.upload_prekeys(upload).await?;
        Ok(())
    }
}

/// Rotates the signed and last-resort prekeys when due, forgets long-rotated ones, adds a
/// batch of one-time prekeys if asked. Returns what to upload, if anything is new.
pub(super) fn renew_prekeys(
    state: &mut State,
    now: u64,
    replenish: bool,
) -> Option<hush_protocol::UploadPrekeys> {
    let mut upload = hush_protocol::UploadPrekeys::default();
    if state.prekeys.needs_rotation(now) {
        upload = state.prekeys.rotate(&state.identity, now, &mut OsRng);
    }
    state.prekeys.forget_rotated(now);
    if replenish {
        let fresh = state
            .prekeys
            .replenish(&state.identity, PREKEY_BATCH, &mut OsRng);
        upload.one_time = fresh.one_time;
        upload.kem_one_time = fresh.kem_one_time;
    }
    (upload != hush_protocol::UploadPrekeys::default()).then_some(upload)
}

/// Uploads prekeys at start, before the background tasks run (the state is not shared
/// yet, so the commit is direct).
pub(super) async fn initial_prekeys(
    store: &crate::store::LocalStore,
    connection: &Connection,
    state: &mut State,
    now: u64,
    replenish: bool,
) -> Result<(), ClientError> {
    let Some(upload) = renew_prekeys(state, now, replenish) else {
        return Ok(());
    };
    state.prekeys_changed();
    store.commit(state.take_changes(store)?)?;
    connection.upload_prekeys(upload).await?;
    Ok(())
}
