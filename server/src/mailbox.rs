//! Live delivery: which devices are connected, and how to wake their delivery loops.
//!
//! The store is the only queue. A connected device's delivery loop reads its mailbox from
//! the store, pushes what it finds, and sleeps until woken; a commit that adds envelopes
//! wakes the loops of their recipients. Because nothing is queued in memory, a device that
//! stops reading costs the relay its socket buffers and nothing more, and a reconnecting
//! device drains its backlog through the same path as live traffic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hush_protocol::DeviceAddress;
use tokio::sync::{mpsc, Notify};

/// What the hub holds for one connected device.
#[derive(Clone)]
pub struct DeviceLink {
    connection: u64,
    /// Wakes the device's delivery loop.
    pub wake: Arc<Notify>,
    /// Tells the connection that another one took its place.
    pub evicted: Arc<Notify>,
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

    /// Wakes the delivery loops of the devices that are connected.
    pub fn wake<'a>(&self, addresses: impl IntoIterator<Item = &'a DeviceAddress>) {
        let devices = self.lock();
        for address in addresses {
            if let Some(link) = devices.get(address) {
                link.wake.notify_one();
            }
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
