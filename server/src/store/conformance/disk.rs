//! A simulated disk for the fault model: bytes that start failing after N mutating
//! operations, as written (what a crash leaves) and as synced (what a power cut leaves).
//! A backend's factory puts its storage on it (redb: a `StorageBackend`).

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

/// The bytes of a simulated disk.
#[derive(Default)]
pub(crate) struct Disk {
    /// What the OS holds: every write so far.
    pub written: Vec<u8>,
    /// What survives a power cut: `written` as of the last `sync_data`.
    pub synced: Vec<u8>,
    /// Mutating operations (write, set_len, sync_data) left before the disk fails.
    pub budget: Option<u64>,
    /// Once failing, how many more operations fail before the disk heals (None: never).
    pub heals_after: Option<u64>,
    /// Mutating operations since the budget was set, failed ones included.
    pub operations: u64,
}

impl Disk {
    /// Counts one mutating operation and says whether it may go ahead. A failing disk
    /// reports itself full, as a full disk does (ENOSPC).
    pub(crate) fn spend(&mut self) -> io::Result<()> {
        self.operations += 1;
        match self.budget {
            None => Ok(()),
            Some(left) if left > 0 => {
                self.budget = Some(left - 1);
                Ok(())
            }
            Some(_) => {
                match &mut self.heals_after {
                    Some(0) => self.budget = None,
                    Some(left) => *left -= 1,
                    None => {}
                }
                Err(io::Error::new(io::ErrorKind::StorageFull, "injected fault"))
            }
        }
    }
}

/// A [`Disk`] shared by every handle opened on it.
#[derive(Clone, Default)]
pub(crate) struct SharedDisk(Arc<Mutex<Disk>>);

impl SharedDisk {
    /// A disk whose every byte, written and synced, is `image`.
    pub(crate) fn with_image(image: Vec<u8>) -> Self {
        SharedDisk(Arc::new(Mutex::new(Disk {
            written: image.clone(),
            synced: image,
            ..Disk::default()
        })))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Disk> {
        self.0.lock().unwrap()
    }
}
