//! The embedded backend: one redb file, holding what the at-rest layer hands it.
//!
//! Every identifier that would name a person (account ids, device addresses) appears in
//! the file only as an HMAC tag under the keyring's index key; every value is sealed. The
//! only clear numbers are envelope sequence numbers and expiry times. The rules run
//! inside its write transactions ([`Backend::transact`]); its reads are its own.
//!
//! Files by concern: [`schema`] (tables, migration), `accounts`, `prekeys`, `envelopes`
//! (mailboxes, ack, retraction, expiry), `calls` (records, day statistics).

mod accounts;
mod calls;
mod envelopes;
mod prekeys;
mod schema;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use hush_protocol::{AccountId, DeviceAddress, EnvelopeId};
use redb::{
    Database, DatabaseError, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata,
};

use self::schema::{
    migrate_mailboxes, Tables, ACCOUNTS, CALL_ACCOUNTS, CALL_DAYS, CALL_RECORDS, DELIVERY_ACCESS,
    ENVELOPES, EXPIRY_QUEUE, INVITES, MAILBOXES, META, META_NEXT_SEQUENCE, PREKEYS, RETRACT,
};
use super::backend::Backend;
use super::rules::Rules;
use super::{
    AccountView, BackendFailure, MailboxUsage, PrekeyCounts, RetentionSummary, Store, StoreError,
    StoreStats, StoredEnvelope, Write, WriteResult,
};
use crate::cdr::{CallRecord, DayStats};
use crate::keyring::Keyring;

/// Opens the database; called again to reopen it after a failed write.
pub(crate) type OpenDatabase = Box<dyn Fn() -> Result<Database, DatabaseError> + Send + Sync>;

/// The redb-backed [`Store`].
pub struct RedbStore {
    /// `None` from a failed write until the reopen succeeds: after an IO error redb
    /// refuses every operation (`PreviousIo`) until the database is closed and reopened,
    /// so a full disk would otherwise stop the relay for good.
    db: RwLock<Option<Database>>,
    open_database: OpenDatabase,
    rules: Rules,
    next_sequence: AtomicU64,
}

impl RedbStore {
    /// Opens (or creates) the store: `relay.redb` and its key file `storage-keys` in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(dir, crate::config::Limits::default().store_cache_bytes)
    }

    /// [`RedbStore::open`] with a page cache of `cache_bytes` (reopening keeps it).
    pub fn open_with_cache(dir: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        let path = dir.join("relay.redb");
        Self::open_with(
            dir,
            Box::new(move || {
                redb::Builder::new()
                    .set_cache_size(cache_bytes)
                    .create(&path)
            }),
        )
    }

    /// Opens the store on the database `open_database` opens (a file, or in tests a
    /// backend that injects faults), with its key file in `keys_dir`.
    pub(crate) fn open_with(
        keys_dir: &Path,
        open_database: OpenDatabase,
    ) -> Result<Self, StoreError> {
        let keys = Arc::new(Keyring::open_or_create(&keys_dir.join("storage-keys"))?);
        let db = open_database()?;
        let txn = db.begin_write()?;
        let next_sequence = AtomicU64::new(1);
        let next = {
            Tables::open(&txn, &next_sequence)?;
            migrate_mailboxes(&txn)?;
            let meta = txn.open_table(META)?;
            let counted = meta.get(META_NEXT_SEQUENCE)?.map_or(1, |v| v.value());
            // Never below the newest envelope, even if the counter were lost: a reused
            // sequence would put two envelopes, and two owners, on one key.
            let newest = txn.open_table(ENVELOPES)?.last()?.map(|(k, _)| k.value());
            counted.max(newest.map_or(1, |n| n.saturating_add(1)))
        };
        txn.commit()?;
        next_sequence.store(next, Ordering::Relaxed);
        Ok(RedbStore {
            db: RwLock::new(Some(db)),
            open_database,
            rules: Rules::new(keys),
            next_sequence,
        })
    }

    /// A read transaction on the open database.
    fn begin_read(&self) -> Result<ReadTransaction, StoreError> {
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
        Ok(db.as_ref().ok_or(StoreError::Reopening)?.begin_read()?)
    }

    /// Closes the database and opens it again, which clears redb's latched IO failure
    /// once the cause (a full disk, a file-size limit) is gone. If it cannot be opened
    /// yet, the store stays closed and the next batch tries again.
    fn reopen(&self) -> Result<(), StoreError> {
        let mut db = self.db.write().unwrap_or_else(PoisonError::into_inner);
        // The old handle must be closed first: it holds the file's lock.
        drop(db.take());
        *db = Some((self.open_database)()?);
        Ok(())
    }

    /// The keyring, shared with whoever needs to blind identifiers the same way.
    pub fn keyring(&self) -> &Arc<Keyring> {
        self.rules.at_rest().keyring()
    }
}

impl Backend for RedbStore {
    type Txn<'t> = Tables<'t>;

    /// One group commit's transaction: every write applied, then the commit (and fsync).
    fn transact<R>(
        &self,
        body: impl FnOnce(&mut Tables<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let txn = {
            let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
            db.as_ref().ok_or(StoreError::Reopening)?.begin_write()?
        };
        let result = {
            let mut tables = Tables::open(&txn, &self.next_sequence)?;
            let result = body(&mut tables)?;
            tables.flush_usage()?;
            let mut meta = txn.open_table(META)?;
            meta.insert(
                META_NEXT_SEQUENCE,
                self.next_sequence.load(Ordering::Relaxed),
            )?;
            result
        };
        // The commit point: with redb's default `Durability::Immediate`, `commit` returns
        // only after the data is fsynced. Senders are answered after this and not before.
        txn.commit()?;
        Ok(result)
    }
}

impl Store for RedbStore {
    fn apply(&self, writes: Vec<Write>) -> Result<Vec<WriteResult>, StoreError> {
        // Only the commit thread writes, so only it reopens: a closed store is retried at
        // the next batch, and a batch that hit redb's error reopens it for the next one.
        let closed = self
            .db
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none();
        if closed {
            self.reopen()?;
        }
        let result = self.rules.apply_batch(self, writes);
        if let Err(StoreError::Backend { .. }) = &result {
            if let Err(error) = self.reopen() {
                tracing::warn!(%error, "reopening the database failed; will retry");
            }
        }
        result
    }

    fn device_key(&self, address: &DeviceAddress) -> Result<Option<[u8; 32]>, StoreError> {
        self.read_device_key(address)
    }

    fn backlog(
        &self,
        address: &DeviceAddress,
        after: Option<EnvelopeId>,
        now: u64,
        limit: usize,
    ) -> Result<Vec<StoredEnvelope>, StoreError> {
        self.read_backlog(address, after, now, limit)
    }

    fn account(&self, account: &AccountId) -> Result<Option<AccountView>, StoreError> {
        self.read_account(account)
    }

    fn admits(&self, account: &AccountId, token: Option<&[u8; 16]>) -> Result<bool, StoreError> {
        self.read_admits(account, token)
    }

    fn mailbox_usage(&self, address: &DeviceAddress) -> Result<MailboxUsage, StoreError> {
        self.read_mailbox_usage(address)
    }

    fn prekey_counts(&self, address: &DeviceAddress) -> Result<PrekeyCounts, StoreError> {
        self.read_prekey_counts(address)
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        let txn = self.begin_read()?;
        Ok(StoreStats {
            accounts: txn.open_table(ACCOUNTS)?.len()?,
            devices: self.count_devices(&txn)?,
            envelopes: Self::count_envelopes(&txn)?,
            mailbox_entries: txn.open_table(MAILBOXES)?.len()?,
            expiry_entries: txn.open_table(EXPIRY_QUEUE)?.len()?,
            prekeys: txn.open_table(PREKEYS)?.len()?,
            invites: txn.open_table(INVITES)?.len()?,
            day_keys: self.rules.at_rest().day_keys(),
            retract_entries: txn.open_table(RETRACT)?.len()?,
            delivery_access: txn.open_table(DELIVERY_ACCESS)?.len()?,
            call_records: txn.open_table(CALL_RECORDS)?.len()?,
            call_index_entries: txn.open_table(CALL_ACCOUNTS)?.len()?,
            call_days: txn.open_table(CALL_DAYS)?.len()?,
        })
    }

    fn records_of(&self, account: &AccountId) -> Result<Vec<CallRecord>, StoreError> {
        self.read_records_of(account)
    }

    fn records_between(&self, from: u64, to: u64) -> Result<Vec<CallRecord>, StoreError> {
        self.read_records_between(from, to)
    }

    fn day_stats(&self) -> Result<Vec<DayStats>, StoreError> {
        self.read_day_stats()
    }

    fn retention_summary(&self) -> Result<RetentionSummary, StoreError> {
        let txn = self.begin_read()?;
        let expiry = txn.open_table(EXPIRY_QUEUE)?;
        let records = txn.open_table(CALL_RECORDS)?;
        let oldest_envelope_expiry = expiry.first()?.map(|(k, _)| k.value().0);
        let oldest_call_start = records.first()?.map(|(k, _)| k.value().0);
        Ok(RetentionSummary {
            envelopes: Self::count_envelopes(&txn)?,
            oldest_envelope_expiry,
            call_records: records.len()?,
            oldest_call_start,
        })
    }
}

/// What kind of failure a redb error is: a full disk (or a file-size limit) is told apart
/// from other IO, so that the log says why the relay refuses writes.
fn failure_of(error: &redb::Error) -> BackendFailure {
    match error {
        redb::Error::Io(io) => match io.kind() {
            std::io::ErrorKind::StorageFull
            | std::io::ErrorKind::FileTooLarge
            | std::io::ErrorKind::QuotaExceeded => BackendFailure::Full,
            _ => BackendFailure::Io,
        },
        redb::Error::PreviousIo => BackendFailure::Io,
        redb::Error::Corrupted(_) => BackendFailure::Corrupt,
        _ => BackendFailure::Other,
    }
}

impl From<redb::Error> for StoreError {
    fn from(error: redb::Error) -> Self {
        StoreError::Backend {
            kind: failure_of(&error),
            source: Box::new(error),
        }
    }
}

macro_rules! from_redb_errors {
    ($($ty:ty),*) => {$(
        impl From<$ty> for StoreError {
            fn from(e: $ty) -> Self {
                redb::Error::from(e).into()
            }
        }
    )*};
}

from_redb_errors!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

#[cfg(test)]
mod faults;
#[cfg(test)]
pub(crate) use self::faults::RedbFactory;
#[cfg(test)]
mod tests;
