//! The embedded store: one redb file, values sealed at rest, keys blinded.
//!
//! Every identifier that would name a person (account ids, device addresses) appears in
//! the file only as an HMAC tag under the keyring's index key; every value is sealed. The
//! only clear numbers are envelope sequence numbers and expiry times.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use bytes::Bytes;
use hush_protocol::{
    AccountId, DeviceAddress, DeviceBundle, DeviceId, EnvelopeId, OutgoingEnvelope, Prekey,
    PrekeyBundles, SealedEnvelope,
};
use redb::{
    Database, DatabaseError, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, Table, TableDefinition, TableHandle, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{
    AccountView, FreshEnvelope, MailboxQuota, MailboxUsage, Outcome, PrekeyCounts, Refusal,
    RetentionSummary, Store, StoreError, StoreStats, StoredEnvelope, Write, WriteResult,
};
use crate::cdr::{CallRecord, DayStats};
use crate::keyring::{Keyring, Tag, DAY};
use crate::seal::{SealingKey, SEAL_OVERHEAD};

/// Accounts by account tag: sealed [`AccountRecord`].
const ACCOUNTS: TableDefinition<Tag, &[u8]> = TableDefinition::new("accounts");
/// Prekeys by (device tag, kind, prekey id): sealed [`Prekey`].
const PREKEYS: TableDefinition<(Tag, u8, u32), &[u8]> = TableDefinition::new("prekeys");
/// Envelopes by sequence: the recipient device's tag, expires-at, arrival, then the sealed
/// payload. Sequences are handed out in arrival order, so a group commit's new envelopes
/// land on the last pages of the tree and deliveries, which come in about that order,
/// empty the first ones: a commit dirties (and fsyncs) few pages however many mailboxes
/// it reaches. Keyed by mailbox, the same commit touched a page per mailbox.
const ENVELOPES: TableDefinition<u64, &[u8]> = TableDefinition::new("envelopes");
/// Each mailbox's envelopes by (device tag, sequence). No value, so that a commit's index
/// entries, spread over every mailbox it reaches, fill few pages.
const MAILBOXES: TableDefinition<(Tag, u64), ()> = TableDefinition::new("mailboxes");
/// The expiry index by (expires at, sequence): in arrival order too, for one expiry time.
/// The value is the device tag, so that expiry finds every entry of an envelope even if
/// its value is lost or damaged.
const EXPIRY_QUEUE: TableDefinition<(u64, u64), Tag> = TableDefinition::new("expiry_queue");
/// The layout before [`ENVELOPES`]: mailboxes by (device tag, sequence) with the value
/// [`ENVELOPES`] has after the tag. Read once, when an older store is opened.
const OLD_MAILBOX: TableDefinition<(Tag, u64), &[u8]> = TableDefinition::new("mailbox");
/// The expiry index of the older layout, by (expires at, device tag, sequence).
const OLD_EXPIRY: TableDefinition<(u64, Tag, u64), ()> = TableDefinition::new("expiry");
/// Unused invites by SHA-256 of the token.
const INVITES: TableDefinition<[u8; 32], ()> = TableDefinition::new("invites");
/// Delivery access by account tag: sealed [`DeliveryAccess`]. No row: no token, and
/// unknown senders refused.
const DELIVERY_ACCESS: TableDefinition<Tag, &[u8]> = TableDefinition::new("delivery_access");
/// The retraction index by (retraction tag's blind, device tag, sequence). The tag itself
/// (SHA-256 of the sender's secret) is blinded like every other key.
const RETRACT: TableDefinition<(Tag, Tag, u64), ()> = TableDefinition::new("retract");
/// The retraction blind of each mailbox entry that has one, by (device tag, sequence), so
/// that deleting an envelope finds its index entry.
const RETRACT_ENTRIES: TableDefinition<(Tag, u64), Tag> = TableDefinition::new("retract_entries");
/// Call-detail records by (call start, call tag): the caller's and the callee's account
/// tags, the day whose key seals the record (its retention day, big-endian), then the
/// sealed [`CallRecord`]. The tags in clear let retention and erasure delete the index
/// entries without opening the record.
const CALL_RECORDS: TableDefinition<(u64, Tag), &[u8]> = TableDefinition::new("call_records");
/// The account index of call records by (account tag, call start, call tag).
const CALL_ACCOUNTS: TableDefinition<(Tag, u64, Tag), ()> = TableDefinition::new("call_accounts");
/// Day statistics of calls by UTC day of the start: sealed [`DayStats`], no identities.
const CALL_DAYS: TableDefinition<u32, &[u8]> = TableDefinition::new("call_days");
/// What each mailbox holds, by device tag: (envelopes, payload bytes). No row: empty.
/// Kept in the transaction that adds or deletes envelopes, so quotas cost no scan.
const MAILBOX_USAGE: TableDefinition<Tag, (u64, u64)> = TableDefinition::new("mailbox_usage");
/// Counters.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const META_NEXT_SEQUENCE: &str = "next_sequence";

const SIGNED: u8 = 0;
const ONE_TIME: u8 = 1;
const KEM_ONE_TIME: u8 = 2;
const KEM_LAST_RESORT: u8 = 3;

/// Call record value header: caller tag, callee tag, sealing day.
const CALL_HEADER: usize = 16 + 16 + 4;

/// Envelope value header: the device tag, then expires-at and received-at, big-endian.
const ENVELOPE_HEADER: usize = 16 + 8 + 8;
/// Where expires-at and received-at sit in an envelope value.
const EXPIRES_AT: usize = 16;
const RECEIVED_AT: usize = 24;

/// Most expired envelopes one `Expire` write deletes; the sweeper repeats until done, so a
/// huge backlog expiring at once never makes one giant transaction.
const EXPIRE_BATCH: usize = 20_000;

#[derive(Serialize, Deserialize)]
struct AccountRecord {
    identity_key: Vec<u8>,
    devices: Vec<DeviceRecord>,
    next_device: u32,
}

#[derive(Serialize, Deserialize)]
struct DeviceRecord {
    id: u32,
    key: [u8; 32],
}

/// Who may send sealed envelopes to an account.
#[derive(Serialize, Deserialize, Default)]
struct DeliveryAccess {
    token_hash: Option<[u8; 32]>,
    allow_unknown_senders: bool,
}

impl DeliveryAccess {
    /// Whether a sender presenting `token` may deliver. The hash comparison is
    /// constant-time, so timing does not tell how much of a guessed token was right.
    fn admits(&self, token: Option<&[u8; 16]>) -> bool {
        if self.allow_unknown_senders {
            return true;
        }
        match (&self.token_hash, token) {
            (Some(stored), Some(token)) => {
                let presented: [u8; 32] = Sha256::digest(token).into();
                bool::from(presented.ct_eq(stored))
            }
            _ => false,
        }
    }
}

impl AccountRecord {
    fn device(&self, device: DeviceId) -> Option<&DeviceRecord> {
        self.devices.iter().find(|d| d.id == device.0)
    }
}

/// Opens the database; called again to reopen it after a failed write.
type OpenDatabase = Box<dyn Fn() -> Result<Database, DatabaseError> + Send + Sync>;

/// The redb-backed [`Store`].
pub struct RedbStore {
    /// `None` from a failed write until the reopen succeeds: after an IO error redb
    /// refuses every operation (`PreviousIo`) until the database is closed and reopened,
    /// so a full disk would otherwise stop the relay for good.
    db: RwLock<Option<Database>>,
    open_database: OpenDatabase,
    keys: Arc<Keyring>,
    next_sequence: AtomicU64,
    /// Account records as the last committed write transaction left them, for the
    /// commit thread's sends (every send checks its recipients' device lists; reading and
    /// unsealing the records was a fifth of the commit thread's time). Used and changed
    /// only inside write transactions, which are serial, so it never holds a record older
    /// than the store's; emptied when a transaction fails, since it may then hold a
    /// change that was never committed.
    accounts: Mutex<HashMap<AccountId, Arc<AccountRecord>>>,
}

/// Most account records kept in memory; past it the cache starts again empty.
const ACCOUNT_CACHE_ENTRIES: usize = 100_000;

struct Tables<'txn> {
    accounts: Table<'txn, Tag, &'static [u8]>,
    prekeys: Table<'txn, (Tag, u8, u32), &'static [u8]>,
    envelopes: Table<'txn, u64, &'static [u8]>,
    mailboxes: Table<'txn, (Tag, u64), ()>,
    expiry: Table<'txn, (u64, u64), Tag>,
    invites: Table<'txn, [u8; 32], ()>,
    delivery_access: Table<'txn, Tag, &'static [u8]>,
    retract: Table<'txn, (Tag, Tag, u64), ()>,
    retract_entries: Table<'txn, (Tag, u64), Tag>,
    call_records: Table<'txn, (u64, Tag), &'static [u8]>,
    call_accounts: Table<'txn, (Tag, u64, Tag), ()>,
    call_days: Table<'txn, u32, &'static [u8]>,
    mailbox_usage: Table<'txn, Tag, (u64, u64)>,
    /// Mailbox usage as this transaction has changed it, written back once per mailbox by
    /// [`Tables::flush_usage`]: a batch touches each busy mailbox many times.
    usage: HashMap<Tag, (u64, u64)>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(Tables {
            accounts: txn.open_table(ACCOUNTS)?,
            prekeys: txn.open_table(PREKEYS)?,
            envelopes: txn.open_table(ENVELOPES)?,
            mailboxes: txn.open_table(MAILBOXES)?,
            expiry: txn.open_table(EXPIRY_QUEUE)?,
            invites: txn.open_table(INVITES)?,
            delivery_access: txn.open_table(DELIVERY_ACCESS)?,
            retract: txn.open_table(RETRACT)?,
            retract_entries: txn.open_table(RETRACT_ENTRIES)?,
            call_records: txn.open_table(CALL_RECORDS)?,
            call_accounts: txn.open_table(CALL_ACCOUNTS)?,
            call_days: txn.open_table(CALL_DAYS)?,
            mailbox_usage: txn.open_table(MAILBOX_USAGE)?,
            usage: HashMap::new(),
        })
    }

    /// What a mailbox holds, as this transaction has left it so far.
    fn usage(&self, tag: Tag) -> Result<(u64, u64), StoreError> {
        match self.usage.get(&tag) {
            Some(usage) => Ok(*usage),
            None => stored_usage(&self.mailbox_usage, tag),
        }
    }

    /// Writes back this transaction's usage changes; an empty mailbox keeps no row.
    fn flush_usage(&mut self) -> Result<(), StoreError> {
        for (tag, usage) in self.usage.drain() {
            if usage == (0, 0) {
                self.mailbox_usage.remove(&tag)?;
            } else {
                self.mailbox_usage.insert(&tag, usage)?;
            }
        }
        Ok(())
    }
}

/// What a mailbox holds by its usage row (nothing, without one).
fn stored_usage<T: ReadableTable<Tag, (u64, u64)>>(
    table: &T,
    tag: Tag,
) -> Result<(u64, u64), StoreError> {
    Ok(table.get(&tag)?.map_or((0, 0), |v| v.value()))
}

fn expiry_day(expires_at: u64) -> u32 {
    u32::try_from(expires_at / DAY).unwrap_or(u32::MAX)
}

fn row_aad(table: &str, parts: &[&[u8]]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(64);
    aad.extend_from_slice(table.as_bytes());
    for part in parts {
        aad.push(0);
        aad.extend_from_slice(part);
    }
    aad
}

fn mailbox_aad(tag: &Tag, sequence: u64) -> Vec<u8> {
    row_aad("mailbox", &[tag, &sequence.to_be_bytes()])
}

fn prekey_aad(tag: &Tag, kind: u8, id: u32) -> Vec<u8> {
    row_aad("prekeys", &[tag, &[kind], &id.to_be_bytes()])
}

fn call_aad(start: u64, call: &Tag) -> Vec<u8> {
    row_aad("call_records", &[&start.to_be_bytes(), call])
}

fn call_day_aad(day: u32) -> Vec<u8> {
    row_aad("call_days", &[&day.to_be_bytes()])
}

/// Moves the envelopes of a store written in the older layout ([`OLD_MAILBOX`],
/// [`OLD_EXPIRY`]) into [`ENVELOPES`], [`MAILBOXES`] and [`EXPIRY_QUEUE`], in the
/// transaction that opens the store, and deletes the old tables. Seals are unchanged:
/// their associated data names the device and the sequence, not the table.
fn migrate_mailboxes(txn: &WriteTransaction) -> Result<(), StoreError> {
    let old_layout = txn
        .list_tables()?
        .any(|table| table.name() == OLD_MAILBOX.name());
    if !old_layout {
        return Ok(());
    }
    {
        let old = txn.open_table(OLD_MAILBOX)?;
        let mut envelopes = txn.open_table(ENVELOPES)?;
        let mut mailboxes = txn.open_table(MAILBOXES)?;
        let mut expiry = txn.open_table(EXPIRY_QUEUE)?;
        let mut value = Vec::new();
        let (mut moved, mut damaged) = (0u64, 0u64);
        for entry in old.iter()? {
            let (key, old_value) = entry?;
            let (tag, sequence) = key.value();
            let old_value = old_value.value();
            // A damaged value is moved too, expiring at once: the next sweep deletes it
            // with its index entries, and one bad record does not keep the store shut.
            let expires_at = read_u64(old_value, 0).unwrap_or_else(|| {
                damaged += 1;
                0
            });
            value.clear();
            value.extend_from_slice(&tag);
            value.extend_from_slice(old_value);
            envelopes.insert(sequence, value.as_slice())?;
            mailboxes.insert((tag, sequence), ())?;
            expiry.insert((expires_at, sequence), tag)?;
            moved += 1;
        }
        tracing::info!(
            moved,
            damaged,
            "moved the store's envelopes to the layout by arrival"
        );
    }
    txn.delete_table(OLD_MAILBOX)?;
    txn.delete_table(OLD_EXPIRY)?;
    Ok(())
}

/// The recipient device's tag at the head of an envelope value.
fn read_tag(value: &[u8]) -> Option<Tag> {
    value.get(..16).and_then(|b| b.try_into().ok())
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    bytes
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
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
        let next_sequence = {
            Tables::open(&txn)?;
            migrate_mailboxes(&txn)?;
            let meta = txn.open_table(META)?;
            let counted = meta.get(META_NEXT_SEQUENCE)?.map_or(1, |v| v.value());
            // Never below the newest envelope, even if the counter were lost: a reused
            // sequence would put two envelopes, and two owners, on one key.
            let newest = txn.open_table(ENVELOPES)?.last()?.map(|(k, _)| k.value());
            counted.max(newest.map_or(1, |n| n.saturating_add(1)))
        };
        txn.commit()?;
        Ok(RedbStore {
            db: RwLock::new(Some(db)),
            open_database,
            keys,
            next_sequence: AtomicU64::new(next_sequence),
            accounts: Mutex::new(HashMap::new()),
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
        &self.keys
    }

    fn account_tag(&self, account: &AccountId) -> Tag {
        self.keys.tag(b"account", &account.0)
    }

    fn device_tag(&self, address: &DeviceAddress) -> Tag {
        self.keys.tag(b"device", &address.to_bytes())
    }

    /// The blinded key of a retraction tag.
    fn retract_blind(&self, retract_tag: &[u8; 32]) -> Tag {
        self.keys.tag(b"retract", retract_tag)
    }

    fn load_delivery_access<T: ReadableTable<Tag, &'static [u8]>>(
        &self,
        table: &T,
        tag: &Tag,
    ) -> Result<DeliveryAccess, StoreError> {
        let corrupt = || StoreError::Corrupt {
            table: "delivery_access",
        };
        let Some(sealed) = table.get(tag)?.map(|v| v.value().to_vec()) else {
            return Ok(DeliveryAccess::default());
        };
        let plain = self
            .keys
            .directory()
            .open(&row_aad("delivery_access", &[tag]), &sealed)
            .map_err(|_| corrupt())?;
        postcard::from_bytes(&plain).map_err(|_| corrupt())
    }

    fn seal_account(&self, tag: &Tag, record: &AccountRecord) -> Result<Vec<u8>, StoreError> {
        let plain =
            postcard::to_allocvec(record).map_err(|_| StoreError::Corrupt { table: "accounts" })?;
        Ok(self
            .keys
            .directory()
            .seal(&row_aad("accounts", &[tag]), &plain))
    }

    fn open_account(&self, tag: &Tag, sealed: &[u8]) -> Result<AccountRecord, StoreError> {
        let corrupt = || StoreError::Corrupt { table: "accounts" };
        let plain = self
            .keys
            .directory()
            .open(&row_aad("accounts", &[tag]), sealed)
            .map_err(|_| corrupt())?;
        postcard::from_bytes(&plain).map_err(|_| corrupt())
    }

    fn load_account<T: ReadableTable<Tag, &'static [u8]>>(
        &self,
        table: &T,
        tag: &Tag,
    ) -> Result<Option<AccountRecord>, StoreError> {
        let sealed = table.get(tag)?.map(|v| v.value().to_vec());
        sealed.map(|s| self.open_account(tag, &s)).transpose()
    }

    /// An account's record inside a write transaction, from the cache when it is there.
    fn cached_account(
        &self,
        t: &Tables<'_>,
        account: &AccountId,
    ) -> Result<Option<Arc<AccountRecord>>, StoreError> {
        let mut cache = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(record) = cache.get(account) {
            return Ok(Some(record.clone()));
        }
        let Some(record) = self.load_account(&t.accounts, &self.account_tag(account))? else {
            return Ok(None);
        };
        if cache.len() >= ACCOUNT_CACHE_ENTRIES {
            cache.clear();
        }
        let record = Arc::new(record);
        cache.insert(*account, record.clone());
        Ok(Some(record))
    }

    /// Writes an account's record, keeping the cache in step.
    fn put_account(
        &self,
        t: &mut Tables<'_>,
        account: &AccountId,
        tag: &Tag,
        record: &AccountRecord,
    ) -> Result<(), StoreError> {
        self.accounts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(account);
        t.accounts
            .insert(tag, self.seal_account(tag, record)?.as_slice())?;
        Ok(())
    }

    fn put_prekey(
        &self,
        table: &mut Table<'_, (Tag, u8, u32), &'static [u8]>,
        tag: Tag,
        kind: u8,
        slot: u32,
        key: &Prekey,
    ) -> Result<(), StoreError> {
        let plain =
            postcard::to_allocvec(key).map_err(|_| StoreError::Corrupt { table: "prekeys" })?;
        let sealed = self
            .keys
            .directory()
            .seal(&prekey_aad(&tag, kind, slot), &plain);
        table.insert((tag, kind, slot), sealed.as_slice())?;
        Ok(())
    }

    fn open_prekey(
        &self,
        tag: &Tag,
        kind: u8,
        slot: u32,
        sealed: &[u8],
    ) -> Result<Prekey, StoreError> {
        let corrupt = || StoreError::Corrupt { table: "prekeys" };
        let plain = self
            .keys
            .directory()
            .open(&prekey_aad(tag, kind, slot), sealed)
            .map_err(|_| corrupt())?;
        postcard::from_bytes(&plain).map_err(|_| corrupt())
    }

    /// Removes and returns the first prekey of `kind` for a device.
    fn take_first_prekey(
        &self,
        table: &mut Table<'_, (Tag, u8, u32), &'static [u8]>,
        tag: Tag,
        kind: u8,
    ) -> Result<Option<Prekey>, StoreError> {
        let first = table
            .range((tag, kind, 0)..=(tag, kind, u32::MAX))?
            .next()
            .transpose()?
            .map(|(k, v)| (k.value().2, v.value().to_vec()));
        let Some((slot, sealed)) = first else {
            return Ok(None);
        };
        table.remove((tag, kind, slot))?;
        self.open_prekey(&tag, kind, slot, &sealed).map(Some)
    }

    fn count_prekeys<T: ReadableTable<(Tag, u8, u32), &'static [u8]>>(
        table: &T,
        tag: Tag,
        kind: u8,
    ) -> Result<u32, StoreError> {
        let mut n = 0u32;
        for entry in table.range((tag, kind, 0)..=(tag, kind, u32::MAX))? {
            entry?;
            n += 1;
        }
        Ok(n)
    }

    fn counts<T: ReadableTable<(Tag, u8, u32), &'static [u8]>>(
        table: &T,
        tag: Tag,
    ) -> Result<PrekeyCounts, StoreError> {
        Ok(PrekeyCounts {
            one_time: Self::count_prekeys(table, tag, ONE_TIME)?,
            kem_one_time: Self::count_prekeys(table, tag, KEM_ONE_TIME)?,
        })
    }

    /// Deletes an envelope of `tag`'s mailbox with its mailbox, expiry and retraction
    /// index entries, and takes it off the mailbox's usage. Returns whether the mailbox
    /// listed it. Only an envelope whose value names `tag` goes, so a device can only
    /// delete its own; an `expired` one goes whatever its value says, and even without
    /// its mailbox entry (P3).
    fn remove_envelope(
        t: &mut Tables<'_>,
        tag: Tag,
        sequence: u64,
        expired: bool,
    ) -> Result<bool, StoreError> {
        let listed = t.mailboxes.remove((tag, sequence))?.is_some();
        // (expires-at, payload bytes) of the envelope deleted.
        let mut deleted = None;
        if listed || expired {
            let mut foreign = None;
            if let Some(value) = t.envelopes.remove(sequence)? {
                let value = value.value();
                if expired || read_tag(value) == Some(tag) {
                    let payload = value.len().saturating_sub(ENVELOPE_HEADER + SEAL_OVERHEAD);
                    deleted = Some((read_u64(value, EXPIRES_AT), payload as u64));
                } else {
                    foreign = Some(value.to_vec());
                }
            }
            // Another mailbox's envelope under a damaged index entry stays where it is.
            if let Some(value) = foreign {
                t.envelopes.insert(sequence, value.as_slice())?;
            }
        }
        if let Some((Some(expires_at), _)) = deleted {
            t.expiry.remove((expires_at, sequence))?;
        }
        if listed || deleted.is_some() {
            let payload = deleted.map_or(0, |(_, payload)| payload);
            let (count, bytes) = t.usage(tag)?;
            t.usage.insert(
                tag,
                (count.saturating_sub(1), bytes.saturating_sub(payload)),
            );
        }
        let blind = t
            .retract_entries
            .remove((tag, sequence))?
            .map(|v| v.value());
        if let Some(blind) = blind {
            t.retract.remove((blind, tag, sequence))?;
        }
        Ok(listed)
    }

    /// Deletes a device's mailbox and its index entries.
    fn purge_mailbox(tables: &mut Tables<'_>, tag: Tag) -> Result<(), StoreError> {
        let mut doomed = Vec::new();
        for entry in tables.mailboxes.range((tag, 0)..=(tag, u64::MAX))? {
            let (k, _) = entry?;
            doomed.push(k.value().1);
        }
        for sequence in doomed {
            Self::remove_envelope(tables, tag, sequence, false)?;
        }
        Ok(())
    }

    fn apply_one(&self, t: &mut Tables<'_>, write: Write) -> Result<WriteResult, StoreError> {
        match write {
            Write::Register {
                account,
                identity_key,
                device_key,
                invite,
                require_invite,
            } => {
                let tag = self.account_tag(&account);
                if t.accounts.get(&tag)?.is_some() {
                    return Ok(Err(Refusal::NotPermitted));
                }
                match invite {
                    Some(token) => {
                        let hash: [u8; 32] = Sha256::digest(&token).into();
                        if t.invites.remove(&hash)?.is_none() {
                            return Ok(Err(Refusal::InvalidInvite));
                        }
                    }
                    None if require_invite => return Ok(Err(Refusal::InviteRequired)),
                    None => {}
                }
                let record = AccountRecord {
                    identity_key,
                    devices: vec![DeviceRecord {
                        id: DeviceId::PRIMARY.0,
                        key: device_key,
                    }],
                    next_device: DeviceId::PRIMARY.0 + 1,
                };
                self.put_account(t, &account, &tag, &record)?;
                Ok(Ok(Outcome::Registered))
            }
            Write::AddDevice {
                account,
                device_key,
                max_devices,
            } => {
                let tag = self.account_tag(&account);
                let Some(mut record) = self.load_account(&t.accounts, &tag)? else {
                    return Ok(Err(Refusal::UnknownAccount));
                };
                if record.devices.len() >= max_devices as usize {
                    return Ok(Err(Refusal::DeviceLimitReached));
                }
                if record.devices.iter().any(|d| d.key == device_key) {
                    return Ok(Err(Refusal::DuplicateDeviceKey));
                }
                let id = record.next_device;
                record.next_device += 1;
                record.devices.push(DeviceRecord {
                    id,
                    key: device_key,
                });
                self.put_account(t, &account, &tag, &record)?;
                Ok(Ok(Outcome::DeviceAdded(DeviceId(id))))
            }
            Write::RemoveDevice { address } => {
                let tag = self.account_tag(&address.account);
                let Some(mut record) = self.load_account(&t.accounts, &tag)? else {
                    return Ok(Err(Refusal::UnknownAccount));
                };
                if address.device == DeviceId::PRIMARY {
                    return Ok(Err(Refusal::NotPermitted));
                }
                if record.device(address.device).is_none() {
                    return Ok(Err(Refusal::UnknownDevice));
                }
                record.devices.retain(|d| d.id != address.device.0);
                self.put_account(t, &address.account, &tag, &record)?;
                let device_tag = self.device_tag(&address);
                for kind in [SIGNED, ONE_TIME, KEM_ONE_TIME, KEM_LAST_RESORT] {
                    t.prekeys.retain_in(
                        (device_tag, kind, 0)..=(device_tag, kind, u32::MAX),
                        |_, _| false,
                    )?;
                }
                Self::purge_mailbox(t, device_tag)?;
                Ok(Ok(Outcome::DeviceRemoved { address }))
            }
            Write::UploadPrekeys { address, upload } => {
                let account_tag = self.account_tag(&address.account);
                let exists = self
                    .load_account(&t.accounts, &account_tag)?
                    .is_some_and(|r| r.device(address.device).is_some());
                if !exists {
                    return Ok(Err(Refusal::UnknownDevice));
                }
                let tag = self.device_tag(&address);
                if let Some(key) = &upload.signed_prekey {
                    self.put_prekey(&mut t.prekeys, tag, SIGNED, 0, key)?;
                }
                if let Some(key) = &upload.kem_last_resort {
                    self.put_prekey(&mut t.prekeys, tag, KEM_LAST_RESORT, 0, key)?;
                }
                for key in &upload.one_time {
                    self.put_prekey(&mut t.prekeys, tag, ONE_TIME, key.id, key)?;
                }
                for key in &upload.kem_one_time {
                    self.put_prekey(&mut t.prekeys, tag, KEM_ONE_TIME, key.id, key)?;
                }
                Ok(Ok(Outcome::PrekeysStored(Self::counts(&t.prekeys, tag)?)))
            }
            Write::TakePrekeys {
                account,
                device,
                low_threshold,
            } => {
                let account_tag = self.account_tag(&account);
                let Some(record) = self.load_account(&t.accounts, &account_tag)? else {
                    return Ok(Err(Refusal::UnknownAccount));
                };
                let devices: Vec<&DeviceRecord> = match device {
                    Some(id) => match record.device(id) {
                        Some(d) => vec![d],
                        None => return Ok(Err(Refusal::UnknownDevice)),
                    },
                    None => record.devices.iter().collect(),
                };
                let mut bundles = Vec::with_capacity(devices.len());
                let mut low = Vec::new();
                for d in devices {
                    let address = DeviceAddress {
                        account,
                        device: DeviceId(d.id),
                    };
                    let tag = self.device_tag(&address);
                    let signed = t.prekeys.get((tag, SIGNED, 0))?.map(|v| v.value().to_vec());
                    let signed_prekey = signed
                        .map(|s| self.open_prekey(&tag, SIGNED, 0, &s))
                        .transpose()?;
                    let one_time = self.take_first_prekey(&mut t.prekeys, tag, ONE_TIME)?;
                    let mut kem = self.take_first_prekey(&mut t.prekeys, tag, KEM_ONE_TIME)?;
                    let kem_is_last_resort = kem.is_none();
                    if kem.is_none() {
                        let last = t
                            .prekeys
                            .get((tag, KEM_LAST_RESORT, 0))?
                            .map(|v| v.value().to_vec());
                        kem = last
                            .map(|s| self.open_prekey(&tag, KEM_LAST_RESORT, 0, &s))
                            .transpose()?;
                    }
                    let counts = Self::counts(&t.prekeys, tag)?;
                    if counts.one_time < low_threshold || counts.kem_one_time < low_threshold {
                        low.push((address, counts));
                    }
                    bundles.push(DeviceBundle {
                        device: DeviceId(d.id),
                        device_key: d.key,
                        signed_prekey,
                        one_time,
                        kem_is_last_resort: kem_is_last_resort && kem.is_some(),
                        kem,
                    });
                }
                let bundles = PrekeyBundles {
                    identity_key: record.identity_key.clone(),
                    devices: bundles,
                };
                Ok(Ok(Outcome::Prekeys { bundles, low }))
            }
            Write::Enqueue {
                envelopes,
                quota,
                received_at,
                expires_at,
            } => self.enqueue(t, envelopes, quota, received_at, expires_at),
            Write::SealedEnqueue {
                envelopes,
                quota,
                received_at,
                expires_at,
            } => self.sealed_enqueue(t, envelopes, quota, received_at, expires_at),
            Write::SetDeliveryAccess {
                account,
                token_hash,
                allow_unknown_senders,
            } => {
                let tag = self.account_tag(&account);
                if t.accounts.get(&tag)?.is_none() {
                    return Ok(Err(Refusal::UnknownAccount));
                }
                let record = DeliveryAccess {
                    token_hash,
                    allow_unknown_senders,
                };
                let plain = postcard::to_allocvec(&record).map_err(|_| StoreError::Corrupt {
                    table: "delivery_access",
                })?;
                let sealed = self
                    .keys
                    .directory()
                    .seal(&row_aad("delivery_access", &[&tag]), &plain);
                t.delivery_access.insert(&tag, sealed.as_slice())?;
                Ok(Ok(Outcome::DeliveryAccessSet))
            }
            Write::Retract { tags } => {
                let mut count = 0u32;
                for retract_tag in tags {
                    let blind = self.retract_blind(&retract_tag);
                    let mut doomed = Vec::new();
                    for entry in t
                        .retract
                        .range((blind, [0; 16], 0)..=(blind, [0xff; 16], u64::MAX))?
                    {
                        let (key, _) = entry?;
                        let (_, device, sequence) = key.value();
                        doomed.push((device, sequence));
                    }
                    for (device, sequence) in doomed {
                        if Self::remove_envelope(t, device, sequence, false)? {
                            count = count.saturating_add(1);
                        }
                    }
                }
                Ok(Ok(Outcome::Retracted { count }))
            }
            Write::Ack { address, ids } => {
                let tag = self.device_tag(&address);
                let mut unknown = 0;
                for id in ids {
                    if !Self::remove_envelope(t, tag, id.0, false)? {
                        unknown += 1;
                    }
                }
                Ok(Ok(Outcome::Acked { unknown }))
            }
            Write::Expire { now } => {
                let mut doomed = Vec::new();
                for entry in t.expiry.range(..=(now, u64::MAX))? {
                    let (key, tag) = entry?;
                    doomed.push((key.value(), tag.value()));
                    if doomed.len() == EXPIRE_BATCH {
                        break;
                    }
                }
                for &((expires_at, sequence), tag) in &doomed {
                    t.expiry.remove((expires_at, sequence))?;
                    Self::remove_envelope(t, tag, sequence, true)?;
                }
                Ok(Ok(Outcome::Expired {
                    envelopes: doomed.len() as u64,
                }))
            }
            Write::AddInvite { token } => {
                let hash: [u8; 32] = Sha256::digest(&token).into();
                t.invites.insert(&hash, ())?;
                Ok(Ok(Outcome::InviteAdded))
            }
            Write::RecordCall { record, delete_at } => {
                self.record_call(t, &record, delete_at)?;
                Ok(Ok(Outcome::CallRecorded))
            }
            Write::ExpireCalls { until } => {
                let mut doomed = Vec::new();
                for entry in t.call_records.range(..=(until, [0xff; 16]))? {
                    let (key, _) = entry?;
                    doomed.push(key.value());
                    if doomed.len() == EXPIRE_BATCH {
                        break;
                    }
                }
                for (start, call) in &doomed {
                    Self::remove_call(t, *start, *call)?;
                }
                Ok(Ok(Outcome::CallsDeleted {
                    records: doomed.len() as u64,
                }))
            }
            Write::ForgetCalls { account } => {
                let tag = self.account_tag(&account);
                let mut doomed = Vec::new();
                for entry in t
                    .call_accounts
                    .range((tag, 0, [0; 16])..=(tag, u64::MAX, [0xff; 16]))?
                {
                    let (key, _) = entry?;
                    let (_, start, call) = key.value();
                    doomed.push((start, call));
                }
                let mut records = 0;
                for (start, call) in doomed {
                    if Self::remove_call(t, start, call)? {
                        records += 1;
                    }
                }
                Ok(Ok(Outcome::CallsDeleted { records }))
            }
        }
    }

    /// Stores a call record with its account index entries and counts it in its day.
    fn record_call(
        &self,
        t: &mut Tables<'_>,
        record: &CallRecord,
        delete_at: u64,
    ) -> Result<(), StoreError> {
        let corrupt = |table| StoreError::Corrupt { table };
        let call = self.keys.tag(b"call", &record.call_id);
        let caller = self.account_tag(&record.caller);
        let callee = self.account_tag(&record.callee);
        let day = expiry_day(delete_at);
        let key = self.keys.day_or_create(day)?;
        let plain = postcard::to_allocvec(record).map_err(|_| corrupt("call_records"))?;
        let sealed = key.seal(&call_aad(record.started_at, &call), &plain);
        let mut value = Vec::with_capacity(CALL_HEADER + sealed.len());
        value.extend_from_slice(&caller);
        value.extend_from_slice(&callee);
        value.extend_from_slice(&day.to_be_bytes());
        value.extend_from_slice(&sealed);
        t.call_records
            .insert((record.started_at, call), value.as_slice())?;
        t.call_accounts
            .insert((caller, record.started_at, call), ())?;
        t.call_accounts
            .insert((callee, record.started_at, call), ())?;

        // The day's counts, updated in the same transaction as the record.
        let stats_day = record.day();
        let aad = call_day_aad(stats_day);
        let existing = t.call_days.get(stats_day)?.map(|v| v.value().to_vec());
        let mut stats = match existing {
            Some(sealed) => {
                let plain = self
                    .keys
                    .directory()
                    .open(&aad, &sealed)
                    .map_err(|_| corrupt("call_days"))?;
                postcard::from_bytes(&plain).map_err(|_| corrupt("call_days"))?
            }
            None => DayStats::new(stats_day),
        };
        stats.add(record);
        let plain = postcard::to_allocvec(&stats).map_err(|_| corrupt("call_days"))?;
        let sealed = self.keys.directory().seal(&aad, &plain);
        t.call_days.insert(stats_day, sealed.as_slice())?;
        Ok(())
    }

    /// Deletes a call record and its account index entries; whether it was there.
    fn remove_call(t: &mut Tables<'_>, start: u64, call: Tag) -> Result<bool, StoreError> {
        let tags = match t.call_records.remove((start, call))? {
            Some(value) => {
                let value = value.value();
                let caller: Option<Tag> = value.get(..16).and_then(|b| b.try_into().ok());
                let callee: Option<Tag> = value.get(16..32).and_then(|b| b.try_into().ok());
                Some((caller, callee))
            }
            None => None,
        };
        let Some((caller, callee)) = tags else {
            return Ok(false);
        };
        for tag in [caller, callee].into_iter().flatten() {
            t.call_accounts.remove((tag, start, call))?;
        }
        Ok(true)
    }

    /// Opens a stored call record; `None` if its day key is gone (past retention) or it
    /// fails to authenticate.
    fn open_call(&self, start: u64, call: &Tag, value: &[u8]) -> Option<CallRecord> {
        let day = value
            .get(32..CALL_HEADER)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)?;
        let key = self.keys.day(day)?;
        let Ok(plain) = key.open(&call_aad(start, call), &value[CALL_HEADER..]) else {
            tracing::warn!("skipping a call record that failed to authenticate");
            return None;
        };
        postcard::from_bytes(&plain).ok()
    }

    /// Checks each sealed envelope's access, and that the envelopes to each account cover
    /// its device list exactly (pairwise ciphertexts are one envelope per device; a group
    /// ciphertext may name several), then enqueues them all through the same path as an
    /// authenticated send.
    fn sealed_enqueue(
        &self,
        t: &mut Tables<'_>,
        envelopes: Vec<SealedEnvelope>,
        quota: MailboxQuota,
        received_at: u64,
        expires_at: u64,
    ) -> Result<WriteResult, StoreError> {
        let mut requested: HashMap<AccountId, (Arc<AccountRecord>, Vec<u32>)> = HashMap::new();
        for envelope in &envelopes {
            let entry = match requested.entry(envelope.account) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(entry) => {
                    // An unknown account and a refused token give the same answer, checked
                    // before the device list, so that a sender without access learns
                    // nothing.
                    let Some(record) = self.cached_account(t, &envelope.account)? else {
                        return Ok(Err(Refusal::DeliveryRefused));
                    };
                    entry.insert((record, Vec::new()))
                }
            };
            let tag = self.account_tag(&envelope.account);
            let access = self.load_delivery_access(&t.delivery_access, &tag)?;
            if !access.admits(envelope.access.as_ref()) {
                return Ok(Err(Refusal::DeliveryRefused));
            }
            entry.1.extend(envelope.devices.iter().map(|d| d.0));
        }
        for (record, devices) in requested.values_mut() {
            devices.sort_unstable();
            let mut current: Vec<u32> = record.devices.iter().map(|d| d.id).collect();
            current.sort_unstable();
            // Equal sorted lists: no device missing, none extra, none twice.
            if *devices != current {
                return Ok(Err(Refusal::DeviceListChanged));
            }
        }
        let outgoing: Vec<OutgoingEnvelope> = envelopes
            .into_iter()
            .map(|envelope| {
                let account = envelope.account;
                OutgoingEnvelope {
                    recipients: envelope
                        .devices
                        .iter()
                        .map(|&device| DeviceAddress { account, device })
                        .collect(),
                    payload: envelope.payload,
                    retract_tag: envelope.retract_tag,
                }
            })
            .collect();
        self.enqueue(t, outgoing, quota, received_at, expires_at)
    }

    fn enqueue(
        &self,
        t: &mut Tables<'_>,
        envelopes: Vec<OutgoingEnvelope>,
        quota: MailboxQuota,
        received_at: u64,
        expires_at: u64,
    ) -> Result<WriteResult, StoreError> {
        // Check every recipient before writing anything: a send is all or nothing.
        let mut accounts: HashMap<AccountId, Arc<AccountRecord>> = HashMap::new();
        for recipient in envelopes.iter().flat_map(|e| &e.recipients) {
            let record = match accounts.entry(recipient.account) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(entry) => {
                    let Some(record) = self.cached_account(t, &recipient.account)? else {
                        return Ok(Err(Refusal::UnknownRecipient));
                    };
                    entry.insert(record)
                }
            };
            if record.device(recipient.device).is_none() {
                return Ok(Err(Refusal::UnknownRecipient));
            }
        }
        // What each mailbox would hold afterwards: a send that would overfill one is
        // refused whole, like any other refusal of a send.
        let mut added: HashMap<DeviceAddress, (u64, u64)> = HashMap::new();
        for envelope in &envelopes {
            let distinct: BTreeSet<&DeviceAddress> = envelope.recipients.iter().collect();
            for recipient in distinct {
                let entry = added.entry(*recipient).or_default();
                entry.0 += 1;
                entry.1 += envelope.payload.len() as u64;
            }
        }
        let mut usage = Vec::with_capacity(added.len());
        // Each recipient's tag, computed once for the quota check and the inserts.
        let mut tags = HashMap::with_capacity(added.len());
        for (recipient, (count, bytes)) in added {
            let tag = self.device_tag(&recipient);
            tags.insert(recipient, tag);
            let (held, held_bytes) = t.usage(tag)?;
            let after = (held.saturating_add(count), held_bytes.saturating_add(bytes));
            if after.0 > quota.max_envelopes || after.1 > quota.max_bytes {
                return Ok(Err(Refusal::MailboxFull));
            }
            usage.push((tag, after));
        }
        t.usage.extend(usage);

        let key = self.keys.day_or_create(expiry_day(expires_at))?;
        let mut woken = BTreeSet::new();
        let mut fresh = Vec::with_capacity(envelopes.len());
        let mut sequence = self.next_sequence.load(Ordering::Relaxed);
        for envelope in envelopes {
            let distinct: BTreeSet<&DeviceAddress> = envelope.recipients.iter().collect();
            let blind = envelope.retract_tag.as_ref().map(|r| self.retract_blind(r));
            // Shared, not copied, by the copies handed to connected recipients.
            let payload = Bytes::from(envelope.payload);
            for recipient in distinct {
                let tag = match tags.get(recipient) {
                    Some(tag) => *tag,
                    None => self.device_tag(recipient),
                };
                let value = seal_envelope(&key, &tag, sequence, received_at, expires_at, &payload);
                t.envelopes.insert(sequence, value.as_slice())?;
                t.mailboxes.insert((tag, sequence), ())?;
                t.expiry.insert((expires_at, sequence), tag)?;
                if let Some(blind) = blind {
                    t.retract.insert((blind, tag, sequence), ())?;
                    t.retract_entries.insert((tag, sequence), blind)?;
                }
                woken.insert(*recipient);
                fresh.push(FreshEnvelope {
                    recipient: *recipient,
                    id: EnvelopeId(sequence),
                    received_at,
                    expires_at,
                    payload: payload.clone(),
                });
                sequence += 1;
            }
        }
        // Never reuse a sequence number, even if this transaction fails later.
        self.next_sequence.store(sequence, Ordering::Relaxed);
        Ok(Ok(Outcome::Enqueued {
            recipients: woken.into_iter().collect(),
            fresh,
        }))
    }
}

fn seal_envelope(
    key: &SealingKey,
    tag: &Tag,
    sequence: u64,
    received_at: u64,
    expires_at: u64,
    payload: &[u8],
) -> Vec<u8> {
    let mut value = Vec::with_capacity(ENVELOPE_HEADER + payload.len() + SEAL_OVERHEAD);
    value.extend_from_slice(tag);
    value.extend_from_slice(&expires_at.to_be_bytes());
    value.extend_from_slice(&received_at.to_be_bytes());
    key.seal_into(&mailbox_aad(tag, sequence), payload, &mut value);
    value
}

impl RedbStore {
    /// One batch in one transaction; see [`Store::apply`].
    fn apply_batch(&self, writes: Vec<Write>) -> Result<Vec<WriteResult>, StoreError> {
        // Day keys are made durable before the transaction that seals under them.
        for write in &writes {
            if let Write::Enqueue { expires_at, .. }
            | Write::SealedEnqueue { expires_at, .. }
            | Write::RecordCall {
                delete_at: expires_at,
                ..
            } = write
            {
                self.keys.day_or_create(expiry_day(*expires_at))?;
            }
        }
        let expire_now = writes.iter().find_map(|w| match w {
            Write::Expire { now } => Some(*now),
            _ => None,
        });

        let applied = self.apply_in_transaction(writes, expire_now);
        if applied.is_err() {
            self.accounts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
        applied
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
        let result = self.apply_batch(writes);
        if let Err(StoreError::Database(_)) = &result {
            if let Err(error) = self.reopen() {
                tracing::warn!(%error, "reopening the database failed; will retry");
            }
        }
        result
    }

    fn device_key(&self, address: &DeviceAddress) -> Result<Option<[u8; 32]>, StoreError> {
        let txn = self.begin_read()?;
        let accounts = txn.open_table(ACCOUNTS)?;
        let record = self.load_account(&accounts, &self.account_tag(&address.account))?;
        Ok(record.and_then(|r| r.device(address.device).map(|d| d.key)))
    }

    fn backlog(
        &self,
        address: &DeviceAddress,
        after: Option<EnvelopeId>,
        now: u64,
        limit: usize,
    ) -> Result<Vec<StoredEnvelope>, StoreError> {
        let tag = self.device_tag(address);
        let start = after.map_or(0, |id| id.0.saturating_add(1));
        let txn = self.begin_read()?;
        let mailboxes = txn.open_table(MAILBOXES)?;
        let envelopes = txn.open_table(ENVELOPES)?;
        let mut out = Vec::new();
        for entry in mailboxes.range((tag, start)..=(tag, u64::MAX))? {
            let sequence = entry?.0.value().1;
            let Some(value) = envelopes.get(sequence)? else {
                tracing::warn!("skipping a mailbox entry without its envelope");
                continue;
            };
            let value = value.value();
            let (Some(expires_at), Some(received_at)) =
                (read_u64(value, EXPIRES_AT), read_u64(value, RECEIVED_AT))
            else {
                tracing::warn!("skipping a mailbox record too short to be an envelope");
                continue;
            };
            // P3: an expired envelope is never delivered, swept or not.
            if expires_at <= now {
                continue;
            }
            // A missing day key means its day is over: the envelope is shredded.
            let Some(key) = self.keys.day(expiry_day(expires_at)) else {
                continue;
            };
            // A record that fails to authenticate is skipped, not fatal: one damaged
            // envelope must not stall the whole mailbox behind it.
            let Ok(payload) = key.open(&mailbox_aad(&tag, sequence), &value[ENVELOPE_HEADER..])
            else {
                tracing::warn!("skipping a mailbox record that failed to authenticate");
                continue;
            };
            out.push(StoredEnvelope {
                id: EnvelopeId(sequence),
                received_at,
                expires_at,
                payload,
            });
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    fn account(&self, account: &AccountId) -> Result<Option<AccountView>, StoreError> {
        let txn = self.begin_read()?;
        let accounts = txn.open_table(ACCOUNTS)?;
        let record = self.load_account(&accounts, &self.account_tag(account))?;
        Ok(record.map(|r| {
            let mut devices: Vec<DeviceId> = r.devices.iter().map(|d| DeviceId(d.id)).collect();
            devices.sort_unstable();
            AccountView {
                identity_key: r.identity_key,
                devices,
            }
        }))
    }

    fn admits(&self, account: &AccountId, token: Option<&[u8; 16]>) -> Result<bool, StoreError> {
        let txn = self.begin_read()?;
        let tag = self.account_tag(account);
        if self
            .load_account(&txn.open_table(ACCOUNTS)?, &tag)?
            .is_none()
        {
            return Ok(false);
        }
        let access = self.load_delivery_access(&txn.open_table(DELIVERY_ACCESS)?, &tag)?;
        Ok(access.admits(token))
    }

    fn mailbox_usage(&self, address: &DeviceAddress) -> Result<MailboxUsage, StoreError> {
        let txn = self.begin_read()?;
        let table = txn.open_table(MAILBOX_USAGE)?;
        let (envelopes, bytes) = stored_usage(&table, self.device_tag(address))?;
        Ok(MailboxUsage { envelopes, bytes })
    }

    fn prekey_counts(&self, address: &DeviceAddress) -> Result<PrekeyCounts, StoreError> {
        let txn = self.begin_read()?;
        let prekeys = txn.open_table(PREKEYS)?;
        Self::counts(&prekeys, self.device_tag(address))
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        let txn = self.begin_read()?;
        Ok(StoreStats {
            accounts: txn.open_table(ACCOUNTS)?.len()?,
            envelopes: txn.open_table(ENVELOPES)?.len()?,
            mailbox_entries: txn.open_table(MAILBOXES)?.len()?,
            expiry_entries: txn.open_table(EXPIRY_QUEUE)?.len()?,
            prekeys: txn.open_table(PREKEYS)?.len()?,
            invites: txn.open_table(INVITES)?.len()?,
            day_keys: self.keys.days().len() as u64,
            retract_entries: txn.open_table(RETRACT)?.len()?,
            delivery_access: txn.open_table(DELIVERY_ACCESS)?.len()?,
            call_records: txn.open_table(CALL_RECORDS)?.len()?,
            call_index_entries: txn.open_table(CALL_ACCOUNTS)?.len()?,
            call_days: txn.open_table(CALL_DAYS)?.len()?,
        })
    }

    fn records_of(&self, account: &AccountId) -> Result<Vec<CallRecord>, StoreError> {
        let tag = self.account_tag(account);
        let txn = self.begin_read()?;
        let index = txn.open_table(CALL_ACCOUNTS)?;
        let records = txn.open_table(CALL_RECORDS)?;
        let mut out = Vec::new();
        for entry in index.range((tag, 0, [0; 16])..=(tag, u64::MAX, [0xff; 16]))? {
            let (key, _) = entry?;
            let (_, start, call) = key.value();
            if let Some(value) = records.get((start, call))? {
                out.extend(self.open_call(start, &call, value.value()));
            }
        }
        Ok(out)
    }

    fn records_between(&self, from: u64, to: u64) -> Result<Vec<CallRecord>, StoreError> {
        let txn = self.begin_read()?;
        let records = txn.open_table(CALL_RECORDS)?;
        let mut out = Vec::new();
        if from >= to {
            return Ok(out);
        }
        for entry in records.range((from, [0; 16])..(to, [0; 16]))? {
            let (key, value) = entry?;
            let (start, call) = key.value();
            out.extend(self.open_call(start, &call, value.value()));
        }
        Ok(out)
    }

    fn day_stats(&self) -> Result<Vec<DayStats>, StoreError> {
        let txn = self.begin_read()?;
        let days = txn.open_table(CALL_DAYS)?;
        let mut out = Vec::new();
        for entry in days.iter()? {
            let (key, value) = entry?;
            let corrupt = || StoreError::Corrupt { table: "call_days" };
            let plain = self
                .keys
                .directory()
                .open(&call_day_aad(key.value()), value.value())
                .map_err(|_| corrupt())?;
            out.push(postcard::from_bytes(&plain).map_err(|_| corrupt())?);
        }
        Ok(out)
    }

    fn retention_summary(&self) -> Result<RetentionSummary, StoreError> {
        let txn = self.begin_read()?;
        let expiry = txn.open_table(EXPIRY_QUEUE)?;
        let records = txn.open_table(CALL_RECORDS)?;
        let oldest_envelope_expiry = expiry.first()?.map(|(k, _)| k.value().0);
        let oldest_call_start = records.first()?.map(|(k, _)| k.value().0);
        Ok(RetentionSummary {
            envelopes: txn.open_table(ENVELOPES)?.len()?,
            oldest_envelope_expiry,
            call_records: records.len()?,
            oldest_call_start,
        })
    }
}

impl RedbStore {
    /// One group commit's transaction: every write applied, then the commit (and fsync).
    fn apply_in_transaction(
        &self,
        writes: Vec<Write>,
        expire_now: Option<u64>,
    ) -> Result<Vec<WriteResult>, StoreError> {
        let txn = {
            let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
            db.as_ref().ok_or(StoreError::Reopening)?.begin_write()?
        };
        let mut results = Vec::with_capacity(writes.len());
        {
            let mut tables = Tables::open(&txn)?;
            for write in writes {
                results.push(self.apply_one(&mut tables, write)?);
            }
            tables.flush_usage()?;
            let mut meta = txn.open_table(META)?;
            meta.insert(
                META_NEXT_SEQUENCE,
                self.next_sequence.load(Ordering::Relaxed),
            )?;
        }
        // The commit point: with redb's default `Durability::Immediate`, `commit` returns
        // only after the data is fsynced. Senders are answered after this and not before.
        txn.commit()?;

        // Every envelope expiring before today has now been deleted (unless the sweep hit
        // its batch limit and will come back), so the keys of past days can go.
        if let Some(now) = expire_now {
            let finished = results.iter().any(|r| {
                matches!(r, Ok(Outcome::Expired { envelopes }) if *envelopes < EXPIRE_BATCH as u64)
            });
            if finished {
                self.keys.drop_days_before(expiry_day(now))?;
            }
        }
        Ok(results)
    }
}

#[cfg(test)]
mod faults;
#[cfg(test)]
mod tests;
