//! Live delivery: which devices are connected, and how to wake their delivery loops.
//!
//! The store is the queue. A connected device's delivery loop reads its mailbox from the
//! store, pushes what it finds, and sleeps until woken; a commit that adds envelopes wakes
//! the loops of their recipients. A device that stops reading costs the relay its socket
//! buffers, its bounded outbox and its bounded handoff, and a reconnecting device drains
//! its backlog through the same path as live traffic.
//!
//! One shortcut, for devices that keep up: the commit that queued an envelope also hands a
//! copy, once durable, to its recipient's [`Handoff`], so that a loop that has read
//! everything before it can push the new envelopes without reading them back. A handoff
//! holds at most one delivery batch and [`HANDOFF_BYTES`]; past that it only records that
//! it overflowed, and the loop reads the store again, as it does after a retraction or a
//! failed commit ([`Hub::invalidate`]). So it never holds more than a read would, and
//! never decides what is delivered: whatever it lacks, the store has.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hush_protocol::{DeviceAddress, EnvelopeId};
use tokio::sync::{mpsc, Notify};

use crate::store::FreshEnvelope;

/// Most envelopes a handoff holds: one delivery batch.
pub const HANDOFF_ENVELOPES: usize = 128;
/// Most payload bytes a handoff holds.
pub const HANDOFF_BYTES: usize = 256 * 1024;

/// Envelopes committed for one connected device since its delivery loop last read its
/// mailbox, in commit (so id) order; or the fact that there were more than it holds, or
/// that the store changed in a way it cannot follow.
pub struct Handoff {
    handed: Mutex<Handed>,
    /// The hub's count of store changes behind every handoff's back ([`Hub::invalidate`]).
    changes: Arc<AtomicU64>,
}

#[derive(Default)]
struct Handed {
    envelopes: Vec<FreshEnvelope>,
    bytes: usize,
    overflowed: bool,
    /// `changes` when the loop last read the store.
    read_at: u64,
}

impl Handoff {
    fn new(changes: Arc<AtomicU64>) -> Self {
        Handoff {
            handed: Mutex::default(),
            changes,
        }
    }

    /// Adds an envelope that a durable commit queued for this device.
    pub fn offer(&self, envelope: FreshEnvelope) {
        let mut handed = self.lock();
        let bytes = handed.bytes + envelope.payload.len();
        if handed.overflowed || handed.envelopes.len() == HANDOFF_ENVELOPES || bytes > HANDOFF_BYTES
        {
            // The store has it; the loop will read it there.
            handed.overflowed = true;
            handed.envelopes = Vec::new();
            handed.bytes = 0;
        } else {
            handed.envelopes.push(envelope);
            handed.bytes = bytes;
        }
    }

    /// Empties the handoff: the envelopes after `after`, or `None` if some were not kept
    /// (then the store must be read). Only a loop that has read everything up to `after`
    /// may push what this returns.
    pub fn take(&self, after: Option<EnvelopeId>) -> Option<Vec<FreshEnvelope>> {
        let mut handed = self.lock();
        let stale = handed.overflowed || self.changes.load(Ordering::SeqCst) != handed.read_at;
        let mut envelopes = std::mem::take(&mut handed.envelopes);
        handed.bytes = 0;
        handed.overflowed = false;
        if stale {
            return None;
        }
        // A commit made durable while the store was being read is in both.
        envelopes.retain(|e| after.is_none_or(|after| e.id > after));
        Some(envelopes)
    }

    /// Forgets what it holds, before the loop reads the store (which has all of it).
    pub fn clear(&self) {
        *self.lock() = Handed {
            read_at: self.changes.load(Ordering::SeqCst),
            ..Handed::default()
        };
    }

    fn lock(&self) -> MutexGuard<'_, Handed> {
        // Every critical section leaves `Handed` consistent.
        self.handed.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What the hub holds for one connected device.
#[derive(Clone)]
pub struct DeviceLink {
    connection: u64,
    /// Wakes the device's delivery loop.
    pub wake: Arc<Notify>,
    /// Tells the connection that another one took its place.
    pub evicted: Arc<Notify>,
    /// What commits queued for the device since its loop last read the store.
    pub handoff: Arc<Handoff>,
    /// Encoded frames for the connection's writer (for pushes from other connections).
    pub outbox: mpsc::Sender<Vec<u8>>,
}

/// The registry of connected devices.
#[derive(Default)]
pub struct Hub {
    devices: Mutex<HashMap<DeviceAddress, DeviceLink>>,
    next_connection: AtomicU64,
    /// Store changes that handoffs cannot follow ([`Hub::invalidate`]).
    changes: Arc<AtomicU64>,
}

impl Hub {
    /// A number that tells this connection's link from any other's.
    pub fn connection_number(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers `connection` as the live connection of `address`. A connection that held
    /// the device before is told it was evicted: a device has one live connection.
    pub fn attach(
        &self,
        address: DeviceAddress,
        connection: u64,
        outbox: mpsc::Sender<Vec<u8>>,
    ) -> DeviceLink {
        let link = DeviceLink {
            connection,
            wake: Arc::new(Notify::new()),
            evicted: Arc::new(Notify::new()),
            handoff: Arc::new(Handoff::new(self.changes.clone())),
            outbox,
        };
        if let Some(old) = self.lock().insert(address, link.clone()) {
            old.evicted.notify_one();
        }
        link
    }

    /// Removes the registration, if it is still `connection`'s.
    pub fn detach(&self, address: &DeviceAddress, connection: u64) {
        let mut devices = self.lock();
        if devices
            .get(address)
            .is_some_and(|l| l.connection == connection)
        {
            devices.remove(address);
        }
    }

    /// Tells every handoff that the store changed behind it (envelopes were retracted, or
    /// a commit failed and may or may not be on disk): each loop reads the store before it
    /// trusts its handoff again, so that it pushes no envelope the store no longer holds
    /// and misses none it does.
    pub fn invalidate(&self) {
        self.changes.fetch_add(1, Ordering::SeqCst);
    }

    /// Hands each envelope to its recipient's handoff, if the recipient is connected, then
    /// wakes the recipients' delivery loops: one pass over the registry for a commit.
    pub fn deliver_fresh(&self, envelopes: impl IntoIterator<Item = FreshEnvelope>) {
        let devices = self.lock();
        let mut woken: Vec<&DeviceLink> = Vec::new();
        for envelope in envelopes {
            if let Some(link) = devices.get(&envelope.recipient) {
                link.handoff.offer(envelope);
                woken.push(link);
            }
        }
        // Wakes after every offer, so a woken loop finds the whole commit, and once each.
        woken.sort_unstable_by_key(|link| link.connection);
        woken.dedup_by_key(|link| link.connection);
        for link in woken {
            link.wake.notify_one();
        }
    }

    /// Evicts a device's live connection, if any (the device was removed).
    pub fn evict(&self, address: &DeviceAddress) {
        if let Some(link) = self.lock().remove(address) {
            link.evicted.notify_one();
        }
    }

    /// Hands an encoded frame to a connected device without waiting; dropped if the device
    /// is offline or its outbox is full (used for advisory pushes only).
    pub fn push(&self, address: &DeviceAddress, frame: Vec<u8>) {
        if let Some(link) = self.lock().get(address) {
            let _ = link.outbox.try_send(frame);
        }
    }

    /// Connected devices.
    pub fn connected(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<DeviceAddress, DeviceLink>> {
        // Every critical section is a single map operation, so a poisoned map is intact.
        self.devices.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use hush_protocol::{AccountId, DeviceId};

    use super::*;

    fn fresh(id: u64, len: usize) -> FreshEnvelope {
        FreshEnvelope {
            recipient: DeviceAddress {
                account: AccountId([1; 16]),
                device: DeviceId(1),
            },
            id: EnvelopeId(id),
            received_at: 0,
            expires_at: u64::MAX,
            payload: Bytes::from(vec![0; len]),
        }
    }

    fn ids(envelopes: &[FreshEnvelope]) -> Vec<u64> {
        envelopes.iter().map(|e| e.id.0).collect()
    }

    #[test]
    fn a_handoff_gives_what_came_after_the_last_read_once() {
        let handoff = Handoff::new(Arc::default());
        for id in [3, 4, 5] {
            handoff.offer(fresh(id, 10));
        }
        // 3 was in the read that delivered up to 3.
        assert_eq!(ids(&handoff.take(Some(EnvelopeId(3))).unwrap()), [4, 5]);
        assert_eq!(
            ids(&handoff.take(Some(EnvelopeId(5))).unwrap()),
            [] as [u64; 0]
        );
        handoff.offer(fresh(6, 10));
        assert_eq!(ids(&handoff.take(None).unwrap()), [6]);
    }

    #[test]
    fn a_handoff_past_its_bounds_sends_the_loop_to_the_store_until_cleared() {
        let handoff = Handoff::new(Arc::default());
        for id in 0..=HANDOFF_ENVELOPES as u64 {
            handoff.offer(fresh(id, 1));
        }
        assert!(handoff.take(None).is_none(), "one envelope too many");
        // Taking reset it; what comes next is kept again.
        handoff.offer(fresh(1000, 1));
        assert_eq!(ids(&handoff.take(None).unwrap()), [1000]);

        handoff.offer(fresh(1, HANDOFF_BYTES / 2));
        handoff.offer(fresh(2, HANDOFF_BYTES / 2 + 1));
        // Still overflowed after more offers: the store has everything since.
        handoff.offer(fresh(3, 1));
        assert!(handoff.take(None).is_none(), "one byte too many");

        handoff.offer(fresh(4, HANDOFF_BYTES + 1));
        handoff.clear();
        handoff.offer(fresh(5, 1));
        assert_eq!(ids(&handoff.take(None).unwrap()), [5]);
    }

    #[test]
    fn a_store_change_behind_the_handoffs_sends_every_loop_to_the_store_once() {
        let hub = Hub::default();
        let (outbox, _frames) = mpsc::channel(1);
        let link = hub.attach(fresh(0, 0).recipient, hub.connection_number(), outbox);
        // The loop read the store, then a commit handed it two envelopes.
        link.handoff.clear();
        hub.deliver_fresh([fresh(1, 1), fresh(2, 1)]);
        assert_eq!(ids(&link.handoff.take(None).unwrap()), [1, 2]);

        // A retraction (or a failed commit) lands; what is handed over after it is not
        // enough to go on, until the loop has read the store again.
        hub.invalidate();
        hub.deliver_fresh([fresh(3, 1)]);
        assert!(link.handoff.take(Some(EnvelopeId(2))).is_none());
        link.handoff.clear();
        hub.deliver_fresh([fresh(4, 1)]);
        assert_eq!(ids(&link.handoff.take(Some(EnvelopeId(3))).unwrap()), [4]);

        // Offline devices are skipped.
        let mut elsewhere = fresh(5, 1);
        elsewhere.recipient.device = DeviceId(2);
        hub.deliver_fresh([elsewhere]);
        assert_eq!(ids(&link.handoff.take(None).unwrap()), [] as [u64; 0]);
    }
}
