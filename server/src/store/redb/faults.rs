//! The redb backend under the conformance suite: its factory, and the suite's simulated
//! disk as a redb `StorageBackend`, so that the crash, power-cut and full-disk model runs
//! under redb's real write paths.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

use redb::{Builder, Database, StorageBackend};

use super::RedbStore;
use crate::keyring::Keyring;
use crate::store::conformance::disk::SharedDisk;
use crate::store::conformance::StoreFactory;
use crate::store::StoreError;

/// Opens [`RedbStore`]s for the conformance suite.
pub(crate) struct RedbFactory;

impl StoreFactory for RedbFactory {
    type Store = RedbStore;

    fn open(dir: &Path) -> RedbStore {
        RedbStore::open(dir).unwrap()
    }

    fn open_with_faults(keys_dir: &Path, disk: &SharedDisk) -> Result<RedbStore, StoreError> {
        let disk = disk.clone();
        RedbStore::open_with(
            keys_dir,
            Box::new(move || Builder::new().create_with_backend(DiskBackend(disk.clone()))),
        )
    }

    fn image_is_intact(disk: &SharedDisk) -> bool {
        let mut db: Database = Builder::new()
            .create_with_backend(DiskBackend(disk.clone()))
            .expect("the image reopens");
        db.check_integrity().unwrap()
    }

    fn keyring(store: &RedbStore) -> &Arc<Keyring> {
        store.keyring()
    }
}

/// One open handle on a [`SharedDisk`].
struct DiskBackend(SharedDisk);

impl fmt::Debug for DiskBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DiskBackend")
    }
}

fn out_of_range() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "out of range")
}

impl StorageBackend for DiskBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.lock().written.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let disk = self.0.lock();
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let bytes = disk
            .written
            .get(start..start + out.len())
            .ok_or_else(out_of_range)?;
        out.copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut disk = self.0.lock();
        disk.spend()?;
        disk.written
            .resize(usize::try_from(len).map_err(|_| out_of_range())?, 0);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut disk = self.0.lock();
        disk.spend()?;
        disk.synced = disk.written.clone();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut disk = self.0.lock();
        disk.spend()?;
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        disk.written
            .get_mut(start..start + data.len())
            .ok_or_else(out_of_range)?
            .copy_from_slice(data);
        Ok(())
    }
}
