//! The provisioning mailbox: one-shot addresses for device linking, in memory only.
//!
//! A new device, not yet authenticated, opens an address on its connection and shows it
//! (with an ephemeral key) as a QR code; an authenticated device of the account then sends
//! one encrypted message there, which the relay pushes to the waiting connection. Nothing
//! of it ever reaches the store: an address lives until its connection closes, until its
//! one message, or for [`PROVISIONING_TTL`], whichever comes first.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use rand_core::{OsRng, RngCore};
use tokio::sync::mpsc;

use crate::clock::UnixSeconds;

/// How long an address stays open, in seconds.
pub const PROVISIONING_TTL: u64 = 10 * 60;

/// A provisioning address could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProvisioningError {
    /// As many addresses are open as the relay allows.
    #[error("too many open provisioning addresses")]
    Full,
}

struct Slot {
    connection: u64,
    opened_at: UnixSeconds,
    outbox: mpsc::Sender<Vec<u8>>,
}

/// The open provisioning addresses, bounded in number.
pub struct Provisioning {
    slots: Mutex<HashMap<[u8; 16], Slot>>,
    max_open: usize,
}

impl Provisioning {
    /// A registry that holds at most `max_open` addresses.
    pub fn new(max_open: usize) -> Self {
        Provisioning {
            slots: Mutex::new(HashMap::new()),
            max_open,
        }
    }

    /// Opens a fresh random address whose message goes to `outbox`. When the registry is
    /// full, expired addresses are dropped first.
    pub fn open(
        &self,
        connection: u64,
        outbox: mpsc::Sender<Vec<u8>>,
        now: UnixSeconds,
    ) -> Result<[u8; 16], ProvisioningError> {
        let mut slots = self.lock();
        if slots.len() >= self.max_open {
            slots.retain(|_, slot| !expired(slot, now));
            if slots.len() >= self.max_open {
                return Err(ProvisioningError::Full);
            }
        }
        let mut address = [0u8; 16];
        // 128 random bits: a collision is not a practical concern, but never overwrite.
        loop {
            OsRng.fill_bytes(&mut address);
            if !slots.contains_key(&address) {
                break;
            }
        }
        slots.insert(
            address,
            Slot {
                connection,
                opened_at: now,
                outbox,
            },
        );
        Ok(address)
    }

    /// Takes the address for its one message: the waiting connection's outbox, or `None`
    /// if the address is unknown, used or expired. The address is gone afterwards.
    pub fn take(&self, address: &[u8; 16], now: UnixSeconds) -> Option<mpsc::Sender<Vec<u8>>> {
        let slot = self.lock().remove(address)?;
        (!expired(&slot, now)).then_some(slot.outbox)
    }

    /// Closes the address if it still belongs to `connection` (the connection ended).
    pub fn close(&self, address: &[u8; 16], connection: u64) {
        let mut slots = self.lock();
        if slots
            .get(address)
            .is_some_and(|s| s.connection == connection)
        {
            slots.remove(address);
        }
    }

    /// Addresses open now (expired ones included until they are dropped).
    pub fn open_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<[u8; 16], Slot>> {
        // Every critical section is a single map operation, so a poisoned map is intact.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn expired(slot: &Slot, now: UnixSeconds) -> bool {
    now >= slot.opened_at.saturating_add(PROVISIONING_TTL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_takes_one_message_and_expires() {
        let registry = Provisioning::new(10);
        let (tx, _rx) = mpsc::channel(1);
        let a = registry.open(1, tx.clone(), 100).unwrap();
        assert!(registry.take(&a, 100).is_some());
        assert!(registry.take(&a, 100).is_none(), "one message only");

        let b = registry.open(1, tx.clone(), 100).unwrap();
        assert!(registry.take(&b, 100 + PROVISIONING_TTL).is_none());

        let c = registry.open(2, tx, 100).unwrap();
        registry.close(&c, 3);
        assert_eq!(
            registry.open_count(),
            1,
            "another connection cannot close it"
        );
        registry.close(&c, 2);
        assert!(registry.take(&c, 100).is_none());
    }

    #[test]
    fn the_registry_is_bounded_and_reclaims_expired_addresses() {
        let registry = Provisioning::new(2);
        let (tx, _rx) = mpsc::channel(1);
        registry.open(1, tx.clone(), 0).unwrap();
        registry.open(2, tx.clone(), 0).unwrap();
        assert_eq!(
            registry.open(3, tx.clone(), 1),
            Err(ProvisioningError::Full)
        );
        assert!(registry.open(3, tx, PROVISIONING_TTL).is_ok());
        assert_eq!(registry.open_count(), 1);
    }
}
