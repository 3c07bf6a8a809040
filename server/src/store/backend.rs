//! What a storage backend gives the store rules: one write transaction at a time, with
//! typed primitives in the relay's words over tags and sealed bytes.
//!
//! The rules ([`super::rules`]) decide; a backend only stores. Every primitive is exact
//! (it does what it says or fails with a [`StoreError`]), and nothing is visible outside
//! the transaction until [`Backend::transact`] has committed it durably. The rules call
//! these generically (monomorphised per backend), so a primitive costs what the backend's
//! own code costs: no dynamic dispatch on the commit thread's path.

use super::StoreError;
use crate::keyring::Tag;

use super::records::PrekeyKind;

/// An entry of the expiry index that is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExpiryEntry {
    /// When it expires (seconds since the epoch).
    pub expires_at: u64,
    /// The envelope's sequence.
    pub sequence: u64,
    /// The mailbox (device tag) it belongs to.
    pub mailbox: Tag,
}

/// One open write transaction of a backend: the four groups of rows the rules use.
pub(crate) trait Transaction: AccountRows + PrekeyRows + EnvelopeRows + CallRows {}

impl<T: AccountRows + PrekeyRows + EnvelopeRows + CallRows> Transaction for T {}

/// Accounts, invites and delivery access.
pub(crate) trait AccountRows {
    /// The sealed record of an account, if it exists.
    fn account(&self, account: &Tag) -> Result<Option<Vec<u8>>, StoreError>;
    /// Whether an account exists, without reading its record.
    fn account_exists(&self, account: &Tag) -> Result<bool, StoreError>;
    /// Stores an account's sealed record, replacing any.
    fn put_account(&mut self, account: &Tag, sealed: &[u8]) -> Result<(), StoreError>;
    /// Deletes an unused invite by its hash; whether it was there.
    fn take_invite(&mut self, hash: &[u8; 32]) -> Result<bool, StoreError>;
    /// Records an unused invite by its hash.
    fn put_invite(&mut self, hash: &[u8; 32]) -> Result<(), StoreError>;
    /// The sealed delivery access of an account, if it has one.
    fn delivery_access(&self, account: &Tag) -> Result<Option<Vec<u8>>, StoreError>;
    /// Stores an account's sealed delivery access, replacing any.
    fn put_delivery_access(&mut self, account: &Tag, sealed: &[u8]) -> Result<(), StoreError>;
}

/// Prekeys by device, kind and slot.
pub(crate) trait PrekeyRows {
    /// Stores a sealed prekey in `device`'s slot of `kind`, replacing any.
    fn put_prekey(
        &mut self,
        device: Tag,
        kind: PrekeyKind,
        slot: u32,
        sealed: &[u8],
    ) -> Result<(), StoreError>;
    /// A sealed prekey, if the slot holds one.
    fn prekey(
        &self,
        device: Tag,
        kind: PrekeyKind,
        slot: u32,
    ) -> Result<Option<Vec<u8>>, StoreError>;
    /// Removes and returns the lowest slot of `kind` with its sealed prekey.
    fn take_first_prekey(
        &mut self,
        device: Tag,
        kind: PrekeyKind,
    ) -> Result<Option<(u32, Vec<u8>)>, StoreError>;
    /// How many prekeys of `kind` a device holds.
    fn count_prekeys(&self, device: Tag, kind: PrekeyKind) -> Result<u32, StoreError>;
    /// Deletes every prekey of a device.
    fn remove_prekeys(&mut self, device: Tag) -> Result<(), StoreError>;
}

/// Envelopes, their mailboxes and their expiry and retraction indexes.
pub(crate) trait EnvelopeRows {
    /// The sequence the next envelope copy gets. Sequences grow across transactions and
    /// reopens and are never reused, even when a transaction fails.
    fn next_sequence(&self) -> u64;
    /// Moves the next sequence on, past every sequence this transaction used.
    fn set_next_sequence(&mut self, next: u64);
    /// What a mailbox holds (envelopes, payload bytes), as this transaction left it.
    fn usage(&self, mailbox: Tag) -> Result<(u64, u64), StoreError>;
    /// Sets what a mailbox holds, for the quota.
    fn set_usage(&mut self, mailbox: Tag, usage: (u64, u64));
    /// Appends an envelope copy (its sealed value, [`super::at_rest::seal_envelope`]) to
    /// `mailbox` at `sequence`, indexed for expiry and, with a blind, for retraction. Does
    /// not count it in the mailbox's usage (the rules set that).
    fn append_envelope(
        &mut self,
        mailbox: Tag,
        sequence: u64,
        expires_at: u64,
        retract_blind: Option<Tag>,
        value: &[u8],
    ) -> Result<(), StoreError>;
    /// Deletes an envelope of `mailbox` with its index entries and takes it off the
    /// mailbox's usage; whether the mailbox listed it. Only an envelope stored for
    /// `mailbox` goes, so a device can only delete its own.
    fn remove_envelope(&mut self, mailbox: Tag, sequence: u64) -> Result<bool, StoreError>;
    /// The sequences a mailbox lists, in order.
    fn mailbox_sequences(&self, mailbox: Tag) -> Result<Vec<u64>, StoreError>;
    /// The copies stored under a retraction blind: (mailbox, sequence).
    fn retractable(&self, blind: &Tag) -> Result<Vec<(Tag, u64)>, StoreError>;
    /// Up to `limit` expiry entries due at or before `now`, oldest first.
    fn expired(&self, now: u64, limit: usize) -> Result<Vec<ExpiryEntry>, StoreError>;
    /// Deletes an expired envelope with its index entries, whatever its value says and
    /// even without its mailbox entry (P3).
    fn remove_expired(&mut self, entry: ExpiryEntry) -> Result<(), StoreError>;
}

/// Call-detail records, their account index and the day statistics.
pub(crate) trait CallRows {
    /// Stores a call record's value under (start, call tag) with an index entry for each
    /// party.
    fn put_call(
        &mut self,
        start: u64,
        call: Tag,
        parties: [Tag; 2],
        value: &[u8],
    ) -> Result<(), StoreError>;
    /// Up to `limit` calls that started at or before `until`: (start, call tag).
    fn calls_until(&self, until: u64, limit: usize) -> Result<Vec<(u64, Tag)>, StoreError>;
    /// Every call naming an account: (start, call tag).
    fn calls_of(&self, account: &Tag) -> Result<Vec<(u64, Tag)>, StoreError>;
    /// Deletes a call record with its index entries; whether it was there.
    fn remove_call(&mut self, start: u64, call: Tag) -> Result<bool, StoreError>;
    /// The sealed statistics of a day, if it has any.
    fn day_stats(&self, day: u32) -> Result<Option<Vec<u8>>, StoreError>;
    /// Stores a day's sealed statistics, replacing any.
    fn put_day_stats(&mut self, day: u32, sealed: &[u8]) -> Result<(), StoreError>;
}

/// A store's storage: opens write transactions, one at a time.
pub(crate) trait Backend {
    /// Its write transaction.
    type Txn<'t>: Transaction
    where
        Self: 't;

    /// Runs `body` in one write transaction. If `body` returns `Ok`, the transaction is
    /// committed and durable before this returns (the commit point senders are answered
    /// after, P4); otherwise, or if the commit fails, nothing of it is kept.
    fn transact<R>(
        &self,
        body: impl FnOnce(&mut Self::Txn<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError>;
}
