//! What the client keeps in memory, how it is loaded from the local store, and how what it
//! changed finds its way back there.
//!
//! The state sits behind a plain (not async) mutex that is never held across an `.await`:
//! the compiler refuses to keep its guard in a spawned future, so no relay round trip and
//! no disk wait can ever happen under it. Work under the lock is computation only:
//! encrypting, decrypting, updating maps.
//!
//! Changes are not written where they happen. A change marks what it touched ([`Dirty`]),
//! and [`Inner::submit`] turns everything marked into one batch for the committer, taking
//! each session's newest form once however many messages moved it. Submitting happens
//! under the lock, so batches reach the committer in the order the state went through.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, MutexGuard, PoisonError};

use hush_protocol::sealed::SenderCertificate;
use hush_protocol::{AccountId, DeviceAddress, DeviceId};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::calls::{ActiveCall, MediaTable};
use super::commit::{Committer, Durability, Ticket};
use super::{ClientError, ClientEvent, Settings};
use crate::connection::Connection;
use crate::content::{CallId, CallSignal, Content, MessageId};
use crate::kdf;
use crate::keys::IdentityKeyPair;
use crate::prekeys::PrekeySet;
use crate::session::SessionSet;
use crate::store::{Change, LocalStore, PrekeyStore, SessionStore, Table};
use crate::util::Clock;

pub(super) const ACCOUNT_KEY: &[u8] = b"account";
pub(super) const SETTINGS_KEY: &[u8] = b"settings";
pub(super) const SEEN_SETUPS_KEY: &[u8] = b"seen-setups";
pub(super) const RETIRED_SESSIONS_KEY: &[u8] = b"retired-sessions";
/// How long an accepted setup's base key is remembered: longer than any signed prekey
/// lives (a week current, two more weeks kept), so a replayed prekey message that used
/// only the last-resort KEM key can never start a second session.
pub(super) const SEEN_SETUPS_SECS: u64 =
    crate::prekeys::ROTATE_AFTER_SECS + crate::prekeys::KEEP_ROTATED_SECS + 24 * 3600;
/// How long the sessions with a device that left its account are kept once we notice:
/// what it sent before it left can wait on the relay that long at most, plus a day.
pub(super) const RETIRED_SESSIONS_SECS: u64 = crate::ratchet::MAX_SKIPPED_AGE_SECS + 24 * 3600;

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub(super) struct AccountRecord {
    pub(super) identity: Vec<u8>,
    pub(super) device_key: [u8; 32],
    pub(super) account: [u8; 16],
    pub(super) device: u32,
    pub(super) profile_key: [u8; 32],
}

/// Work the receive loop hands off, so it never waits on a relay request itself.
pub(crate) enum Work {
    Receipt(AccountId, MessageId),
    /// A call signal to send at once (e.g. `Busy` for an offer while in a call).
    CallSignal(AccountId, CallSignal),
    /// Tells the relay a call allocation is over.
    EndCall(u32, hush_protocol::CallOutcome),
    /// A copy of a sent message for our other devices.
    OwnCopy(Box<Content>),
    Prekeys {
        replenish: bool,
    },
}

/// A message not yet accepted by the relay.
#[derive(Serialize, Deserialize)]
pub(super) struct PendingMessage {
    pub(super) to: [u8; 16],
    pub(super) content: Content,
}

#[derive(Clone, Serialize, Deserialize)]
pub(super) struct Contact {
    pub(super) account: [u8; 16],
    pub(super) identity: Option<Vec<u8>>,
    pub(super) profile_key: Option<[u8; 32]>,
    pub(super) devices: Vec<u32>,
    pub(super) expires_in: Option<u32>,
}

impl Contact {
    pub(super) fn new(account: AccountId) -> Self {
        Contact {
            account: account.0,
            identity: None,
            profile_key: None,
            devices: Vec::new(),
            expires_in: None,
        }
    }
}

/// What changed in memory since the last submitted batch.
#[derive(Default)]
pub(super) struct Dirty {
    sessions: BTreeSet<DeviceAddress>,
    contacts: BTreeSet<AccountId>,
    prekeys: bool,
    seen_setups: bool,
    retired: bool,
    /// Rows written or deleted as they are (messages, the outbox, deleted sessions); they
    /// go first, so a session deleted and set up again in one batch ends up stored.
    rows: Vec<Change>,
}

pub(crate) struct State {
    pub(super) identity: IdentityKeyPair,
    pub(super) address: DeviceAddress,
    pub(crate) profile_key: Zeroizing<[u8; 32]>,
    pub(super) prekeys: PrekeySet,
    pub(super) sessions: HashMap<DeviceAddress, SessionSet>,
    pub(super) contacts: HashMap<AccountId, Contact>,
    pub(crate) settings: Settings,
    pub(super) certificate: Option<(SenderCertificate, u64)>,
    /// The key that signs sender certificates, as the relay last told us.
    pub(super) relay_key: [u8; 32],
    /// Events raised while the state was locked, emitted once it is not: sending into
    /// the app's bounded channel under the lock could wait on an app that waits on us.
    pub(crate) pending_events: Vec<ClientEvent>,
    /// Calls ringing or under way, by call id.
    pub(crate) calls: HashMap<CallId, ActiveCall>,
    /// A `start_call` is between its check that no call is under way and its insert: an
    /// offer arriving meanwhile finds this device busy, as it would once the call exists.
    pub(super) call_starting: bool,
    /// Base keys of accepted session setups, with when we accepted them.
    pub(super) seen_setups: BTreeMap<[u8; 32], u64>,
    /// Our account's other devices, as last learned (asking before every send would tell
    /// the relay when we send).
    pub(super) own_devices: Option<Vec<DeviceId>>,
    /// Devices that left their account, with when we noticed. We no longer send to them,
    /// but keep their sessions for [`RETIRED_SESSIONS_SECS`]: what they sent before they
    /// left may still be on the relay, or queued behind the send that noticed.
    pub(super) retired: BTreeMap<DeviceAddress, u64>,
    pub(super) dirty: Dirty,
    /// Static agreements and verified certificates of sealed sender, kept between
    /// envelopes.
    pub(super) seal_cache: crate::sealed::SealCache,
    /// Outbox messages being sent right now.
    pub(super) sending: std::collections::HashSet<MessageId>,
    /// Messages we sent whose record is marked but not yet committed (by message key):
    /// the store does not show them yet.
    pub(super) sent_unrecorded: std::collections::HashSet<[u8; 32]>,
}

impl Dirty {
    fn is_empty(&self) -> bool {
        self.sessions.is_empty()
            && self.contacts.is_empty()
            && !self.prekeys
            && !self.seen_setups
            && !self.retired
            && self.rows.is_empty()
    }
}

impl State {
    /// The state of a device with nothing loaded yet.
    pub(super) fn new(
        identity: IdentityKeyPair,
        address: DeviceAddress,
        profile_key: [u8; 32],
        settings: Settings,
    ) -> Self {
        State {
            identity,
            address,
            profile_key: Zeroizing::new(profile_key),
            prekeys: PrekeySet::default(),
            sessions: HashMap::new(),
            contacts: HashMap::new(),
            settings,
            certificate: None,
            relay_key: [0; 32],
            pending_events: Vec::new(),
            calls: HashMap::new(),
            call_starting: false,
            seen_setups: BTreeMap::new(),
            own_devices: None,
            retired: BTreeMap::new(),
            dirty: Dirty::default(),
            seal_cache: crate::sealed::SealCache::default(),
            sending: std::collections::HashSet::new(),
            sent_unrecorded: std::collections::HashSet::new(),
        }
    }

    /// Marks a session as moved: its new form goes with the next batch.
    pub(super) fn session_changed(&mut self, address: DeviceAddress) {
        self.dirty.sessions.insert(address);
    }

    pub(super) fn contact_changed(&mut self, account: AccountId) {
        self.dirty.contacts.insert(account);
    }

    pub(super) fn prekeys_changed(&mut self) {
        self.dirty.prekeys = true;
    }

    pub(super) fn seen_setups_changed(&mut self) {
        self.dirty.seen_setups = true;
    }

    pub(super) fn retired_changed(&mut self) {
        self.dirty.retired = true;
    }

    /// A row written as it is, with the next batch.
    pub(super) fn write(&mut self, change: Change) {
        self.dirty.rows.push(change);
    }

    /// Everything marked, as store changes; the marks are cleared.
    pub(super) fn take_changes(&mut self, store: &LocalStore) -> Result<Vec<Change>, ClientError> {
        let dirty = std::mem::take(&mut self.dirty);
        self.sent_unrecorded.clear();
        let mut changes = dirty.rows;
        for address in dirty.sessions {
            // A session deleted since it was marked is not written back.
            if let Some(set) = self.sessions.get(&address) {
                changes.push(store.store_sessions(&address, set)?);
            }
        }
        for account in dirty.contacts {
            if let Some(contact) = self.contacts.get(&account) {
                changes.push(store.put(Table::Contacts, &account.0, encode(contact)?));
            }
        }
        if dirty.prekeys {
            changes.push(store.store_prekeys(&self.prekeys)?);
        }
        if dirty.seen_setups {
            changes.push(store.put(Table::State, SEEN_SETUPS_KEY, encode(&self.seen_setups)?));
        }
        if dirty.retired {
            changes.push(store.put(Table::State, RETIRED_SESSIONS_KEY, encode(&self.retired)?));
        }
        Ok(changes)
    }

    /// The delivery token of a contact whose profile key we know.
    pub(super) fn contact_token(&self, account: AccountId) -> Option<[u8; 16]> {
        self.contacts
            .get(&account)
            .and_then(|c| c.profile_key.as_ref())
            .map(delivery_token)
    }

    /// The session set with `address`, from memory or else from the store.
    pub(super) fn load_session(
        &mut self,
        store: &LocalStore,
        address: DeviceAddress,
    ) -> Result<Option<&mut SessionSet>, ClientError> {
        if let std::collections::hash_map::Entry::Vacant(slot) = self.sessions.entry(address) {
            // A record that does not decode is a damaged store, not a bad message: the
            // envelope must stay on the relay, not be dropped as undecryptable.
            let Some(set) = store.load_sessions(&address)? else {
                return Ok(None);
            };
            slot.insert(set);
        }
        Ok(self.sessions.get_mut(&address))
    }

    /// Marks the sessions with devices that left their account as retired (from `now`,
    /// unless already), and deletes those retired long enough ago.
    pub(super) fn retire_sessions(
        &mut self,
        store: &LocalStore,
        addresses: &[DeviceAddress],
        now: u64,
    ) {
        let before = self.retired.len();
        for address in addresses {
            self.retired.entry(*address).or_insert(now);
        }
        if self.retired.len() != before {
            self.retired_changed();
        }
        self.purge_retired(store, now);
    }

    /// Deletes the sessions of devices retired at least [`RETIRED_SESSIONS_SECS`] before
    /// `now`: nothing they sent can still be on the relay.
    pub(super) fn purge_retired(&mut self, store: &LocalStore, now: u64) {
        let expired: Vec<DeviceAddress> = self
            .retired
            .iter()
            .filter(|(_, at)| now.saturating_sub(**at) >= RETIRED_SESSIONS_SECS)
            .map(|(address, _)| *address)
            .collect();
        for address in expired {
            self.retired.remove(&address);
            self.sessions.remove(&address);
            self.write(store.delete_sessions(&address));
            self.retired_changed();
        }
    }

    /// Records the identity key seen for a contact (trust on first use). Returns whether
    /// it replaced a different one: then the sessions with the old identity are dropped
    /// and the app must be told, so the user can compare safety numbers again.
    pub(super) fn record_identity(
        &mut self,
        store: &LocalStore,
        account: AccountId,
        identity: &[u8],
    ) -> bool {
        if account == self.address.account {
            return false;
        }
        let contact = self
            .contacts
            .entry(account)
            .or_insert_with(|| Contact::new(account));
        if contact.identity.as_deref() == Some(identity) {
            return false;
        }
        let changed = contact.identity.is_some();
        contact.identity = Some(identity.to_vec());
        self.contact_changed(account);
        if changed {
            let stale: Vec<_> = self
                .sessions
                .keys()
                .filter(|a| a.account == account)
                .copied()
                .collect();
            for address in stale {
                self.sessions.remove(&address);
                self.write(store.delete_sessions(&address));
            }
        }
        changed
    }

    /// Records the identity seen for `account`; a change raises an event.
    pub(super) fn note_identity(
        &mut self,
        store: &LocalStore,
        account: AccountId,
        identity: &[u8],
    ) {
        if self.record_identity(store, account, identity) {
            self.pending_events
                .push(ClientEvent::IdentityChanged { account });
        }
    }

    /// Whether a call rings or runs here, or is being started.
    pub(super) fn in_call(&self) -> bool {
        self.call_starting || !self.calls.is_empty()
    }
}

impl Drop for Inner {
    /// What is marked but not committed yet (the records of the last messages sent) goes
    /// to the committer, whose own drop writes it durably before the store is released.
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Ok(changes) = state.take_changes(&self.store) {
            if !changes.is_empty() {
                drop(self.committer.submit(changes, Durability::Deferred));
            }
        }
    }
}

pub(crate) struct Inner {
    pub(super) store: Arc<LocalStore>,
    pub(super) committer: Committer,
    pub(crate) connection: Connection,
    pub(super) anonymous: Connection,
    pub(super) state: std::sync::Mutex<State>,
    pub(super) events: mpsc::Sender<ClientEvent>,
    /// Receipts, copies for our own devices and prekey upkeep, done by the worker task.
    pub(crate) work: mpsc::UnboundedSender<Work>,
    /// Media of connected calls (a plain mutex: held only for one frame at a time).
    pub(crate) media: std::sync::Mutex<MediaTable>,
    /// Serializes the call operations of the app (start, answer, reject, hang up) and of
    /// the ring timer among themselves; each takes the state lock only briefly.
    pub(super) call_operations: tokio::sync::Mutex<()>,
    pub(super) clock: Arc<dyn Clock>,
}

impl Inner {
    /// The state. A poisoned lock (a panic under it, which is a bug) is taken as it is:
    /// the client goes on rather than failing every later call.
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn now(&self) -> u64 {
        self.clock.now()
    }

    /// Hands everything the state marked, plus `extra`, to the committer as one batch.
    /// Called under the lock, which keeps batches in the order the state went through.
    /// Wait for it with [`Inner::committed`].
    pub(super) fn submit(
        &self,
        state: &mut State,
        extra: Vec<Change>,
        durability: Durability,
    ) -> Result<Ticket, ClientError> {
        let mut changes = state.take_changes(&self.store)?;
        changes.extend(extra);
        Ok(self.committer.submit(changes, durability))
    }

    /// Commits `changes` with whatever the state has marked, durably, and waits for it.
    pub(super) async fn commit_now(&self, changes: Vec<Change>) -> Result<(), ClientError> {
        let ticket = {
            let mut state = self.lock();
            self.submit(&mut state, changes, Durability::Immediate)
        };
        self.committed(ticket).await
    }

    /// Commits whatever the state has marked and waits for it: what the API returned is
    /// then in the store for a read of it.
    pub(super) async fn flush(&self) -> Result<(), ClientError> {
        let ticket = {
            let mut state = self.lock();
            if state.dirty.is_empty() {
                return Ok(());
            }
            self.submit(&mut state, Vec::new(), Durability::Deferred)
        };
        self.committed(ticket).await
    }

    /// Waits until a submitted batch is committed. If it is not (or could not even be
    /// submitted), memory is put back to what the store holds before the error is
    /// returned: see [`Inner::recover`].
    pub(super) async fn committed(
        &self,
        ticket: Result<Ticket, ClientError>,
    ) -> Result<(), ClientError> {
        let result = match ticket {
            Ok(ticket) => ticket.committed().await.map_err(ClientError::from),
            Err(error) => Err(error),
        };
        if result.is_err() {
            self.recover().await;
        }
        result
    }

    /// After a failed batch memory is ahead of the disk. The committer is fenced first, so
    /// nothing queued can change the store any more (what was queued before the fence is
    /// written or refused, what comes after is refused); then the state goes back to what
    /// the store holds (sessions reload from it when next used) and the committer takes
    /// batches again. What the relay delivered meanwhile was not acknowledged and comes
    /// again; the old session state opens it. If the store cannot even be read, the
    /// committer stays fenced and the next failing caller tries again.
    pub(super) async fn recover(&self) {
        self.committer.fence().await;
        let mut state = self.lock();
        match self.reload(&mut state) {
            Ok(()) => self.committer.resume(),
            Err(error) => tracing::warn!(%error, "local store unreadable; commits stay refused"),
        }
    }

    fn reload(&self, state: &mut State) -> Result<(), ClientError> {
        state.dirty = Dirty::default();
        state.sessions.clear();
        state.prekeys = self.store.load_prekeys()?.unwrap_or_default();
        state.seen_setups = match self.store.get(Table::State, SEEN_SETUPS_KEY)? {
            Some(bytes) => decode(&bytes)?,
            None => BTreeMap::new(),
        };
        state.retired = match self.store.get(Table::State, RETIRED_SESSIONS_KEY)? {
            Some(bytes) => decode(&bytes)?,
            None => BTreeMap::new(),
        };
        let mut contacts = HashMap::new();
        for bytes in self.store.values(Table::Contacts)? {
            let contact: Contact = decode(&bytes)?;
            contacts.insert(AccountId(contact.account), contact);
        }
        state.contacts = contacts;
        Ok(())
    }
}

/// The delivery token that holders of `profile_key` present to send sealed messages.
pub(crate) fn delivery_token(profile_key: &[u8; 32]) -> [u8; 16] {
    *kdf::hkdf::<16>(&[], profile_key, b"hush-delivery-token-v1")
}

/// Messages are kept per conversation: an id chosen by one contact can never touch a row
/// of another conversation.
pub(super) fn message_key(conversation: AccountId, id: MessageId) -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(&conversation.0);
    key[16..].copy_from_slice(&id.0);
    key
}

/// When a message with a timer disappears; a hostile timestamp saturates, never wraps.
pub(super) fn expiry(start: u64, expires_in: Option<u32>) -> Option<u64> {
    expires_in.map(|secs| start.saturating_add(u64::from(secs)))
}

pub(super) fn encode(value: &impl Serialize) -> Result<Zeroizing<Vec<u8>>, ClientError> {
    Ok(crate::store::encode_record(value)?)
}

pub(super) fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ClientError> {
    Ok(crate::store::decode_record(bytes)?)
}

#[cfg(test)]
mod tests {
    use rand_core::OsRng;

    use super::*;
    use crate::pqxdh::PeerBundle;
    use crate::session::Session;
    use crate::store::StorageKey;

    fn state() -> State {
        State::new(
            IdentityKeyPair::generate(),
            DeviceAddress {
                account: AccountId([1; 16]),
                device: DeviceId(1),
            },
            [0; 32],
            Settings::default(),
        )
    }

    fn session_with(identity: &IdentityKeyPair, device: u32) -> SessionSet {
        let mut prekeys = PrekeySet::default();
        let upload = prekeys.rotate(identity, 0, &mut OsRng);
        let bundle = hush_protocol::DeviceBundle {
            device: DeviceId(device),
            device_key: [0; 32],
            signed_prekey: upload.signed_prekey,
            one_time: None,
            kem: upload.kem_last_resort,
            kem_is_last_resort: true,
        };
        let peer = PeerBundle::verify(&identity.public().to_bytes(), &bundle).unwrap();
        SessionSet::new(Session::initiate(&IdentityKeyPair::generate(), &peer, &mut OsRng).unwrap())
    }

    fn commit(store: &LocalStore, state: &mut State) {
        let changes = state.take_changes(store).unwrap();
        store.commit(changes).unwrap();
    }

    #[test]
    fn a_changed_identity_is_reported_and_drops_its_sessions() {
        let store = LocalStore::in_memory(&StorageKey::from_bytes([1; 32]));
        let mut state = state();
        let bob = AccountId([2; 16]);
        let first = IdentityKeyPair::generate().public().to_bytes();
        let second = IdentityKeyPair::generate().public().to_bytes();
        // First sight: recorded, not a change.
        assert!(!state.record_identity(&store, bob, &first));
        assert!(!state.record_identity(&store, bob, &first));
        commit(&store, &mut state);

        // A session with Bob's device, as if set up under the first identity.
        let address = DeviceAddress {
            account: bob,
            device: DeviceId(1),
        };
        state
            .sessions
            .insert(address, session_with(&IdentityKeyPair::generate(), 1));
        state.session_changed(address);
        commit(&store, &mut state);
        assert!(store.load_sessions(&address).unwrap().is_some());

        assert!(state.record_identity(&store, bob, &second));
        commit(&store, &mut state);
        assert!(state.sessions.is_empty());
        assert!(store.load_sessions(&address).unwrap().is_none());
        let stored: Contact =
            decode(&store.get(Table::Contacts, &bob.0).unwrap().unwrap()).unwrap();
        assert_eq!(stored.identity.as_deref(), Some(&second[..]));
        // Our own account is never a contact.
        let own = state.address.account;
        assert!(!state.record_identity(&store, own, &second));
    }

    /// A departed device's session is kept as long as something it sent may still arrive,
    /// then deleted from memory and store.
    #[test]
    fn retired_sessions_are_purged_only_once_nothing_of_theirs_can_arrive() {
        let store = LocalStore::in_memory(&StorageKey::from_bytes([1; 32]));
        let mut state = state();
        let address = DeviceAddress {
            account: AccountId([2; 16]),
            device: DeviceId(2),
        };
        state
            .sessions
            .insert(address, session_with(&IdentityKeyPair::generate(), 2));
        state.session_changed(address);
        state.retire_sessions(&store, &[address], 1000);
        commit(&store, &mut state);

        let almost = 1000 + RETIRED_SESSIONS_SECS - 1;
        state.purge_retired(&store, almost);
        assert!(state.dirty.rows.is_empty());
        assert!(state.sessions.contains_key(&address));

        state.purge_retired(&store, almost + 1);
        commit(&store, &mut state);
        assert!(state.retired.is_empty());
        assert!(state.sessions.is_empty());
        assert!(store.load_sessions(&address).unwrap().is_none());
        let stored: BTreeMap<DeviceAddress, u64> = decode(
            &store
                .get(Table::State, RETIRED_SESSIONS_KEY)
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        assert!(stored.is_empty());
    }

    /// However many messages moved a session between two batches, the batch writes it
    /// once, in its newest form.
    #[test]
    fn a_batch_writes_each_moved_session_once_in_its_newest_form() {
        let store = LocalStore::in_memory(&StorageKey::from_bytes([1; 32]));
        let mut state = state();
        let address = DeviceAddress {
            account: AccountId([2; 16]),
            device: DeviceId(1),
        };
        state
            .sessions
            .insert(address, session_with(&IdentityKeyPair::generate(), 1));
        for _ in 0..3 {
            let set = state.sessions.get_mut(&address).unwrap();
            set.current_mut().unwrap().encrypt(b"hi").unwrap();
            state.session_changed(address);
        }
        let changes = state.take_changes(&store).unwrap();
        assert_eq!(changes.len(), 1);
        store.commit(changes).unwrap();
        let stored = store.load_sessions(&address).unwrap().unwrap();
        assert_eq!(
            crate::pickle::pickle_session_set(&stored)
                .unwrap()
                .as_slice(),
            crate::pickle::pickle_session_set(&state.sessions[&address])
                .unwrap()
                .as_slice()
        );
        assert!(state.take_changes(&store).unwrap().is_empty());
    }
}
