//! The redb layout: every table, named for what it holds, the write transaction's open
//! tables, and the migration from the older mailbox layout.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;

use redb::{ReadableTable, Table, TableDefinition, TableHandle, WriteTransaction};

use crate::keyring::Tag;
use crate::store::at_rest::read_u64;
use crate::store::StoreError;

/// Accounts by account tag: sealed account record.
pub(super) const ACCOUNTS: TableDefinition<Tag, &[u8]> = TableDefinition::new("accounts");
/// Prekeys by (device tag, kind, prekey id): sealed prekey.
pub(super) const PREKEYS: TableDefinition<(Tag, u8, u32), &[u8]> = TableDefinition::new("prekeys");
/// Envelopes by sequence: the recipient device's tag, expires-at, arrival, then the sealed
/// payload. Sequences are handed out in arrival order, so a group commit's new envelopes
/// land on the last pages of the tree and deliveries, which come in about that order,
/// empty the first ones: a commit dirties (and fsyncs) few pages however many mailboxes
/// it reaches. Keyed by mailbox, the same commit touched a page per mailbox.
pub(super) const ENVELOPES: TableDefinition<u64, &[u8]> = TableDefinition::new("envelopes");
/// Each mailbox's envelopes by (device tag, sequence). No value, so that a commit's index
/// entries, spread over every mailbox it reaches, fill few pages.
pub(super) const MAILBOXES: TableDefinition<(Tag, u64), ()> = TableDefinition::new("mailboxes");
/// The expiry index by (expires at, sequence): in arrival order too, for one expiry time.
/// The value is the device tag, so that expiry finds every entry of an envelope even if
/// its value is lost or damaged.
pub(super) const EXPIRY_QUEUE: TableDefinition<(u64, u64), Tag> =
    TableDefinition::new("expiry_queue");
/// The layout before [`ENVELOPES`]: mailboxes by (device tag, sequence) with the value
/// [`ENVELOPES`] has after the tag. Read once, when an older store is opened.
pub(super) const OLD_MAILBOX: TableDefinition<(Tag, u64), &[u8]> = TableDefinition::new("mailbox");
/// The expiry index of the older layout, by (expires at, device tag, sequence).
pub(super) const OLD_EXPIRY: TableDefinition<(u64, Tag, u64), ()> = TableDefinition::new("expiry");
/// Unused invites by SHA-256 of the token.
pub(super) const INVITES: TableDefinition<[u8; 32], ()> = TableDefinition::new("invites");
/// Delivery access by account tag: sealed delivery access. No row: no token, and
/// unknown senders refused.
pub(super) const DELIVERY_ACCESS: TableDefinition<Tag, &[u8]> =
    TableDefinition::new("delivery_access");
/// The retraction index by (retraction tag's blind, device tag, sequence). The tag itself
/// (SHA-256 of the sender's secret) is blinded like every other key.
pub(super) const RETRACT: TableDefinition<(Tag, Tag, u64), ()> = TableDefinition::new("retract");
/// The retraction blind of each mailbox entry that has one, by (device tag, sequence), so
/// that deleting an envelope finds its index entry.
pub(super) const RETRACT_ENTRIES: TableDefinition<(Tag, u64), Tag> =
    TableDefinition::new("retract_entries");
/// Call-detail records by (call start, call tag): the caller's and the callee's account
/// tags, the day whose key seals the record (its retention day, big-endian), then the
/// sealed [`crate::cdr::CallRecord`]. The tags in clear let retention and erasure delete
/// the index entries without opening the record.
pub(super) const CALL_RECORDS: TableDefinition<(u64, Tag), &[u8]> =
    TableDefinition::new("call_records");
/// The account index of call records by (account tag, call start, call tag).
pub(super) const CALL_ACCOUNTS: TableDefinition<(Tag, u64, Tag), ()> =
    TableDefinition::new("call_accounts");
/// Day statistics of calls by UTC day of the start: sealed [`crate::cdr::DayStats`], no
/// identities.
pub(super) const CALL_DAYS: TableDefinition<u32, &[u8]> = TableDefinition::new("call_days");
/// What each mailbox holds, by device tag: (envelopes, payload bytes). No row: empty.
/// Kept in the transaction that adds or deletes envelopes, so quotas cost no scan.
pub(super) const MAILBOX_USAGE: TableDefinition<Tag, (u64, u64)> =
    TableDefinition::new("mailbox_usage");
/// Counters.
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

pub(super) const META_NEXT_SEQUENCE: &str = "next_sequence";

/// One write transaction's open tables: the rules' [`crate::store::backend::Transaction`].
pub(crate) struct Tables<'txn> {
    pub(super) accounts: Table<'txn, Tag, &'static [u8]>,
    pub(super) prekeys: Table<'txn, (Tag, u8, u32), &'static [u8]>,
    pub(super) envelopes: Table<'txn, u64, &'static [u8]>,
    pub(super) mailboxes: Table<'txn, (Tag, u64), ()>,
    pub(super) expiry: Table<'txn, (u64, u64), Tag>,
    pub(super) invites: Table<'txn, [u8; 32], ()>,
    pub(super) delivery_access: Table<'txn, Tag, &'static [u8]>,
    pub(super) retract: Table<'txn, (Tag, Tag, u64), ()>,
    pub(super) retract_entries: Table<'txn, (Tag, u64), Tag>,
    pub(super) call_records: Table<'txn, (u64, Tag), &'static [u8]>,
    pub(super) call_accounts: Table<'txn, (Tag, u64, Tag), ()>,
    pub(super) call_days: Table<'txn, u32, &'static [u8]>,
    pub(super) mailbox_usage: Table<'txn, Tag, (u64, u64)>,
    /// Mailbox usage as this transaction has changed it, written back once per mailbox by
    /// [`Tables::flush_usage`]: a batch touches each busy mailbox many times.
    pub(super) usage: HashMap<Tag, (u64, u64)>,
    /// The store's next sequence, moved on as soon as a sequence is used, so that even a
    /// transaction that fails never has its sequences handed out again.
    pub(super) next_sequence: &'txn AtomicU64,
}

impl<'txn> Tables<'txn> {
    pub(super) fn open(
        txn: &'txn WriteTransaction,
        next_sequence: &'txn AtomicU64,
    ) -> Result<Self, StoreError> {
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
            next_sequence,
        })
    }

    /// Writes back this transaction's usage changes; an empty mailbox keeps no row.
    pub(super) fn flush_usage(&mut self) -> Result<(), StoreError> {
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
pub(super) fn stored_usage<T: ReadableTable<Tag, (u64, u64)>>(
    table: &T,
    tag: Tag,
) -> Result<(u64, u64), StoreError> {
    Ok(table.get(&tag)?.map_or((0, 0), |v| v.value()))
}

/// Moves the envelopes of a store written in the older layout ([`OLD_MAILBOX`],
/// [`OLD_EXPIRY`]) into [`ENVELOPES`], [`MAILBOXES`] and [`EXPIRY_QUEUE`], in the
/// transaction that opens the store, and deletes the old tables. Seals are unchanged:
/// their associated data names the device and the sequence, not the table.
pub(super) fn migrate_mailboxes(txn: &WriteTransaction) -> Result<(), StoreError> {
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
