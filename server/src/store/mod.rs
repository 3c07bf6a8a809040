//! The relay's storage, behind one narrow trait that speaks the relay's language.
//!
//! Writes are batched: [`Store::apply`] runs a batch of [`Write`]s in one durable
//! transaction, which is what lets the group committer ([`crate::commit`]) share one fsync
//! among many concurrent senders. Each write either is refused *before* it changes
//! anything (a [`Refusal`], which leaves the rest of the batch alone) or is applied; a
//! storage failure fails the whole batch and nothing of it is committed.
//!
//! Three layers, so that a second backend copies no rule:
//! - [`rules`]: what each write means (invites, the device limit, the primary device,
//!   sealed admission, device-list exactness, quotas, prekey consumption), decided above
//!   the backend, inside its transaction, and generic over it;
//! - [`at_rest`]: blinded tags and sealed values (P10), shared by every backend;
//! - a backend ([`backend::Backend`]): one write transaction at a time with typed
//!   primitives over tags and sealed bytes. [`RedbStore`] is the one there is.
//!
//! What every backend must pass is the conformance suite (`conformance`, run on each
//! backend by `cargo test -p hush-server`).

pub(crate) mod at_rest;
pub(crate) mod backend;
#[cfg(test)]
mod conformance;
pub(crate) mod records;
mod redb;
pub(crate) mod rules;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use hush_protocol::{
    AccountId, DeviceAddress, DeviceId, EnvelopeId, ErrorCode, OutgoingEnvelope, PrekeyBundles,
    SealedEnvelope, UploadPrekeys,
};

pub use self::redb::RedbStore;
use crate::cdr::{CallRecord, DayStats};
use crate::config::StoreKind;
use crate::keyring::KeyringError;

/// Opens the backend the configuration names, in `dir`.
pub fn open(kind: StoreKind, dir: &Path, cache_bytes: usize) -> Result<Arc<dyn Store>, StoreError> {
    match kind {
        StoreKind::Redb => Ok(Arc::new(RedbStore::open_with_cache(dir, cache_bytes)?)),
    }
}

/// Runs a store read on the blocking pool (a read may touch the disk), off the runtime's
/// workers.
pub(crate) async fn read_blocking<T: Send + 'static>(
    store: Arc<dyn Store>,
    read: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(move || read(store.as_ref()))
        .await
        .unwrap_or_else(|e| Err(StoreError::ReadTask(e)))
}

/// One change to the store.
#[derive(Debug)]
pub enum Write {
    /// Creates an account with its primary device, consuming an invite if one is given.
    Register {
        /// The new account's id (chosen at random by the caller).
        account: AccountId,
        /// Opaque public identity key.
        identity_key: Vec<u8>,
        /// The primary device's Ed25519 public key.
        device_key: [u8; 32],
        /// The invite token, consumed if valid.
        invite: Option<Vec<u8>>,
        /// Whether registration without a valid invite is refused.
        require_invite: bool,
    },
    /// Adds a device to an account.
    AddDevice {
        /// The account.
        account: AccountId,
        /// The new device's Ed25519 public key.
        device_key: [u8; 32],
        /// The most devices an account may have.
        max_devices: u32,
    },
    /// Removes a device with its prekeys and mailbox.
    RemoveDevice {
        /// The device to remove.
        address: DeviceAddress,
    },
    /// Stores prekeys for a device.
    UploadPrekeys {
        /// The device.
        address: DeviceAddress,
        /// The keys.
        upload: UploadPrekeys,
    },
    /// Takes a prekey bundle for each requested device, consuming one-time keys.
    TakePrekeys {
        /// The account.
        account: AccountId,
        /// One device or all of them.
        device: Option<DeviceId>,
        /// Devices left with fewer one-time keys than this are reported as low.
        low_threshold: u32,
    },
    /// Appends envelopes to every recipient's mailbox; refused whole if one mailbox would
    /// go over `quota`.
    Enqueue {
        /// The envelopes.
        envelopes: Vec<OutgoingEnvelope>,
        /// How much a mailbox may hold.
        quota: MailboxQuota,
        /// Seconds since the epoch, now.
        received_at: u64,
        /// Seconds since the epoch, when they expire.
        expires_at: u64,
    },
    /// Appends sealed envelopes to every device of their recipient accounts, after checking
    /// each account's delivery access and device list. All or nothing.
    SealedEnqueue {
        /// The envelopes.
        envelopes: Vec<SealedEnvelope>,
        /// How much a mailbox may hold.
        quota: MailboxQuota,
        /// Seconds since the epoch, now.
        received_at: u64,
        /// Seconds since the epoch, when they expire.
        expires_at: u64,
    },
    /// Sets an account's delivery access for sealed envelopes.
    SetDeliveryAccess {
        /// The account.
        account: AccountId,
        /// SHA-256 of the delivery token, if there is one.
        token_hash: Option<[u8; 32]>,
        /// Whether senders without the token may deliver.
        allow_unknown_senders: bool,
    },
    /// Deletes every stored envelope carrying one of these retraction tags.
    Retract {
        /// Retraction tags (already derived from the secrets).
        tags: Vec<[u8; 32]>,
    },
    /// Deletes acknowledged envelopes from one device's mailbox.
    Ack {
        /// The acknowledging device.
        address: DeviceAddress,
        /// Envelope ids from its mailbox.
        ids: Vec<EnvelopeId>,
    },
    /// Deletes every envelope that expired at or before `now`.
    Expire {
        /// Seconds since the epoch.
        now: u64,
    },
    /// Records an invite token.
    AddInvite {
        /// The token.
        token: Vec<u8>,
    },
    /// Writes a call-detail record and counts it in its day's statistics, in the same
    /// transaction.
    RecordCall {
        /// The record.
        record: CallRecord,
        /// When its retention ends (seconds since the epoch); the record is sealed under
        /// that day's key, which goes when the day is over.
        delete_at: u64,
    },
    /// Deletes call-detail records of calls that started at or before `until`, with their
    /// account index entries. The day statistics stay.
    ExpireCalls {
        /// Seconds since the epoch.
        until: u64,
    },
    /// Deletes every call-detail record naming `account` (account erasure). The day
    /// statistics stay.
    ForgetCalls {
        /// The account.
        account: AccountId,
    },
}

/// How much one device's mailbox may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxQuota {
    /// Envelopes.
    pub max_envelopes: u64,
    /// Payload bytes (as the sender sent them, before sealing at rest).
    pub max_bytes: u64,
}

impl MailboxQuota {
    /// No limit that a test would reach.
    pub const UNLIMITED: MailboxQuota = MailboxQuota {
        max_envelopes: u64::MAX,
        max_bytes: u64::MAX,
    };
}

/// What an applied write did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The account exists.
    Registered,
    /// The device exists.
    DeviceAdded(DeviceId),
    /// The device is gone.
    DeviceRemoved {
        /// The removed device, whose live connection must go too.
        address: DeviceAddress,
    },
    /// Prekeys stored; what the device now holds.
    PrekeysStored(PrekeyCounts),
    /// Bundles, and the devices now low on one-time keys.
    Prekeys {
        /// The bundles.
        bundles: PrekeyBundles,
        /// Devices below the threshold, with what they have left.
        low: Vec<(DeviceAddress, PrekeyCounts)>,
    },
    /// Envelopes queued; the distinct recipient devices, to wake their deliveries.
    Enqueued {
        /// Devices that received at least one envelope.
        recipients: Vec<DeviceAddress>,
        /// Each copy queued, as its recipient's delivery would read it back: the relay
        /// hands these to connected devices once the commit is durable.
        fresh: Vec<FreshEnvelope>,
    },
    /// Envelopes deleted; `unknown` ids were not in this device's mailbox.
    Acked {
        /// How many ids were not found.
        unknown: usize,
    },
    /// Envelopes deleted by expiry.
    Expired {
        /// How many.
        envelopes: u64,
    },
    /// The invite is recorded.
    InviteAdded,
    /// The delivery access is stored.
    DeliveryAccessSet,
    /// Envelopes deleted by retraction.
    Retracted {
        /// Mailbox entries deleted.
        count: u32,
    },
    /// The call-detail record is stored and counted.
    CallRecorded,
    /// Call-detail records deleted by retention or erasure.
    CallsDeleted {
        /// How many records.
        records: u64,
    },
}

/// Why a single write was refused. Nothing of it was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The account does not exist.
    #[error("unknown account")]
    UnknownAccount,
    /// The device does not exist.
    #[error("unknown device")]
    UnknownDevice,
    /// A recipient device does not exist.
    #[error("unknown recipient")]
    UnknownRecipient,
    /// Registration needs an invite.
    #[error("invite required")]
    InviteRequired,
    /// The invite is unknown or used.
    #[error("invalid invite")]
    InvalidInvite,
    /// The account has its maximum number of devices.
    #[error("device limit reached")]
    DeviceLimitReached,
    /// The device key is already one of the account's.
    #[error("duplicate device key")]
    DuplicateDeviceKey,
    /// The primary device cannot be removed.
    #[error("not permitted")]
    NotPermitted,
    /// A sealed envelope's account does not exist or does not accept it.
    #[error("delivery refused")]
    DeliveryRefused,
    /// A sealed envelope's device list is not the account's current one.
    #[error("device list changed")]
    DeviceListChanged,
    /// A recipient device's mailbox would go over its quota.
    #[error("mailbox full")]
    MailboxFull,
}

impl Refusal {
    /// The wire code for this refusal.
    pub fn code(self) -> ErrorCode {
        match self {
            Refusal::UnknownAccount => ErrorCode::UnknownAccount,
            Refusal::UnknownDevice => ErrorCode::UnknownDevice,
            Refusal::UnknownRecipient => ErrorCode::UnknownRecipient,
            Refusal::InviteRequired => ErrorCode::InviteRequired,
            Refusal::InvalidInvite => ErrorCode::InvalidInvite,
            Refusal::DeviceLimitReached => ErrorCode::DeviceLimitReached,
            Refusal::DuplicateDeviceKey => ErrorCode::DuplicateDeviceKey,
            Refusal::NotPermitted => ErrorCode::NotPermitted,
            Refusal::DeliveryRefused => ErrorCode::DeliveryRefused,
            Refusal::DeviceListChanged => ErrorCode::DeviceListChanged,
            Refusal::MailboxFull => ErrorCode::MailboxFull,
        }
    }
}

/// One-time prekeys a device has left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrekeyCounts {
    /// One-time EC prekeys.
    pub one_time: u32,
    /// One-time ML-KEM prekeys.
    pub kem_one_time: u32,
}

/// What a device's mailbox holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MailboxUsage {
    /// Envelopes.
    pub envelopes: u64,
    /// Payload bytes.
    pub bytes: u64,
}

/// A copy of an envelope that a transaction queued for one device: what a delivery would
/// read back, in memory. The payload is shared by the copies of one envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreshEnvelope {
    /// The device whose mailbox holds it.
    pub recipient: DeviceAddress,
    /// Its id in that mailbox.
    pub id: EnvelopeId,
    /// Seconds since the epoch when the relay accepted it.
    pub received_at: u64,
    /// Seconds since the epoch when it expires.
    pub expires_at: u64,
    /// Opaque ciphertext.
    pub payload: Bytes,
}

/// An envelope as read back for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEnvelope {
    /// Its id in the device's mailbox.
    pub id: EnvelopeId,
    /// Seconds since the epoch when the relay accepted it.
    pub received_at: u64,
    /// Seconds since the epoch when it expires.
    pub expires_at: u64,
    /// Opaque ciphertext.
    pub payload: Vec<u8>,
}

/// Counts of what the store holds, in the relay's words, for tests, stats and the bench.
/// Several count the same envelopes from different sides (as listed in mailboxes, as
/// scheduled for expiry): equal counts are how a test sees that nothing is held that the
/// relay cannot reach, or that it would never delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    /// Accounts.
    pub accounts: u64,
    /// Devices of all accounts.
    pub devices: u64,
    /// Envelope copies held (one per recipient device), pending delivery.
    pub envelopes: u64,
    /// Envelope copies as the mailboxes list them (equals `envelopes` when consistent).
    pub mailbox_entries: u64,
    /// Envelope copies scheduled for expiry (equals `envelopes` when consistent).
    pub expiry_entries: u64,
    /// Stored prekeys of every kind.
    pub prekeys: u64,
    /// Unused invites.
    pub invites: u64,
    /// Expiry days with a live key.
    pub day_keys: u64,
    /// Envelope copies that carry a retraction tag.
    pub retract_entries: u64,
    /// Accounts with delivery access settings.
    pub delivery_access: u64,
    /// Call-detail records.
    pub call_records: u64,
    /// (account, call) pairs by which records can be found for an account: one per
    /// distinct party of each call.
    pub call_index_entries: u64,
    /// Days with call statistics.
    pub call_days: u64,
}

/// What is held and when it goes, for the operator's retention report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetentionSummary {
    /// Envelopes held.
    pub envelopes: u64,
    /// When the envelope that expires first expires (seconds since the epoch).
    pub oldest_envelope_expiry: Option<u64>,
    /// Call-detail records held.
    pub call_records: u64,
    /// When the oldest call-detail record's call started.
    pub oldest_call_start: Option<u64>,
}

/// What the relay may tell about an account: its identity key and current devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountView {
    /// The opaque public identity key from registration.
    pub identity_key: Vec<u8>,
    /// The current devices, ascending.
    pub devices: Vec<DeviceId>,
}

/// The store failed; the batch that hit this was not committed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The storage backend failed (IO, a full disk, damage it detected, …).
    #[error("storage backend ({kind}): {source}")]
    Backend {
        /// What kind of failure.
        kind: BackendFailure,
        /// The backend's own error: it names files and internals, never people.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The key file could not be read or written.
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    /// The database is closed after a failed write and could not be reopened yet.
    #[error("database closed after a failed write; reopening")]
    Reopening,
    /// A stored record failed to authenticate or decode.
    #[error("corrupt record in table {table}")]
    Corrupt {
        /// The table.
        table: &'static str,
    },
    /// The blocking task that ran a read failed (it panicked or was cancelled).
    #[error("the store read task failed: {0}")]
    ReadTask(#[source] tokio::task::JoinError),
}

/// What kind of backend failure a [`StoreError::Backend`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BackendFailure {
    /// The disk (or a file-size or quota limit) is full: writes fail until space returns.
    #[error("full")]
    Full,
    /// Another IO failure.
    #[error("io")]
    Io,
    /// The backend found its own data damaged.
    #[error("corrupt")]
    Corrupt,
    /// Anything else the backend reports.
    #[error("other")]
    Other,
}

/// The result of one write inside a batch.
pub type WriteResult = Result<Outcome, Refusal>;

/// What the relay needs from storage. Implementations: [`RedbStore`] (embedded).
///
/// What an implementation must guarantee (the conformance suite checks each): a batch
/// lands whole or not at all; each mailbox keeps arrival order and ids only grow; a batch
/// is durable before `apply` returns; a failed batch leaves the store as before it.
pub trait Store: Send + Sync + 'static {
    /// Applies `writes` in order in one transaction and makes it durable before returning.
    fn apply(&self, writes: Vec<Write>) -> Result<Vec<WriteResult>, StoreError>;

    /// The Ed25519 public key of a device, if it exists.
    fn device_key(&self, address: &DeviceAddress) -> Result<Option<[u8; 32]>, StoreError>;

    /// Up to `limit` unexpired envelopes of a mailbox with ids after `after`, in order.
    fn backlog(
        &self,
        address: &DeviceAddress,
        after: Option<EnvelopeId>,
        now: u64,
        limit: usize,
    ) -> Result<Vec<StoredEnvelope>, StoreError>;

    /// An account's identity key and device list, if it exists.
    fn account(&self, account: &AccountId) -> Result<Option<AccountView>, StoreError>;

    /// Whether an anonymous sender presenting `token` may reach `account` (false for an
    /// unknown account, so the two cannot be told apart).
    fn admits(&self, account: &AccountId, token: Option<&[u8; 16]>) -> Result<bool, StoreError>;

    /// What a device's mailbox holds: envelopes and payload bytes, as its quota counts them.
    fn mailbox_usage(&self, address: &DeviceAddress) -> Result<MailboxUsage, StoreError>;

    /// One-time prekeys a device has left.
    fn prekey_counts(&self, address: &DeviceAddress) -> Result<PrekeyCounts, StoreError>;

    /// What the store holds.
    fn stats(&self) -> Result<StoreStats, StoreError>;

    /// Call-detail records naming `account` (as caller or callee), oldest first.
    fn records_of(&self, account: &AccountId) -> Result<Vec<CallRecord>, StoreError>;

    /// Call-detail records of calls that started in `from..to`, oldest first.
    fn records_between(&self, from: u64, to: u64) -> Result<Vec<CallRecord>, StoreError>;

    /// The day statistics, oldest day first.
    fn day_stats(&self) -> Result<Vec<DayStats>, StoreError>;

    /// Counts and oldest times, for the retention report.
    fn retention_summary(&self) -> Result<RetentionSummary, StoreError>;
}
