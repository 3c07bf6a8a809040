//! Live delivery: which devices are connected, and how to wake their delivery loops.
//!
//! The store is the queue. A connected device's delivery loop reads its mailbox from the
//! store, pushes what it finds, and sleeps until woken; a commit that adds envelopes wakes
//! the loops of their recipients. A device that stops reading costs the relay its socket
//! buffers and nothing more, and a reconnecting device drains its backlog through the same
//! path as live traffic.
//!
//! One shortcut, for devices that keep up: the commit that queued an envelope also hands a
//! copy, once durable, to its recipient's [`Handoff`], so that a loop that has read
//! everything before it can push the new envelopes without reading them back. A handoff
//! holds at most one delivery batch and [`HANDOFF_BYTES`]; past that it only records that
//! it overflowed, and the loop reads the store again. So it never holds more than a read
//! would, and never decides what is delivered: whatever it lacks, the store has.

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
/// mailbox, in commit (so id) order; or the fact that there were more than it holds.
#[derive(Default)]
pub struct Handoff(Mutex<Handed>);

#[derive(Default)]
struct Handed {
    envelopes: Vec<FreshEnvelope>,
    bytes: usize,
    overflowed: bool,
}

impl Handoff {
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
        let mut handed = std::mem::take(&mut *self.lock());
        if handed.overflowed {
            return None;
        }
        // A commit made durable while the store was being read is in both.
        handed
            .envelopes
            .retain(|e| after.is_none_or(|after| e.id > after));
        Some(handed.envelopes)
    }

    /// Forgets what it holds, before the loop reads the store (which has all of it).
    pub fn clear(&self) {
        *self.lock() = Handed::default();
    }

    fn lock(&self) -> MutexGuard<'_, Handed> {
        // Every critical section leaves `Handed` consistent.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
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
            handoff: Arc::new(Handoff::default()),
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
        let handoff = Handoff::default();
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
        let handoff = Handoff::default();
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
}
