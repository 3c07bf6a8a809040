//! The `Client` handle: the one object an app holds. It owns the keys, the encrypted local
//! store and two relay connections (an authenticated one that receives, and an anonymous
//! one for sealed sends, on a socket of its own so the relay cannot tie them together),
//! and turns what arrives into [`ClientEvent`]s.
//!
//! One concern per module: this one is the API; [`state`] what is kept and how it is
//! persisted, [`commit`] the local group commit, [`send`] and [`receive`] the two paths
//! of a message, [`tasks`] the background work, [`link`] device linking, [`calls`] calls.
//!
//! Concurrency: the state lock is never held across an `.await` (it is a plain mutex),
//! so sends to different contacts, and the decryption of what arrives, go on while a send
//! waits for the relay or the disk; what they change is written in shared commits.
//!
//! Crash safety: an envelope is acknowledged to the relay only after the session state
//! that decrypted it and the message it carried are committed to the local store;
//! nothing is sent before the ratchet state that encrypted it is committed.

mod calls;
mod commit;
mod events;
mod link;
mod receive;
mod send;
mod state;
mod tasks;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use hush_protocol::{AccountId, DeviceAddress, DeviceId};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Mutex};

use self::calls::MediaTable;
pub use self::calls::{CallEndReason, CallMedia};
use self::commit::{Committer, Durability};
pub use self::events::{ClientEvent, StoredMessage};
pub use self::link::LinkRequest;
use self::state::{
    decode, delivery_token, encode, message_key, AccountRecord, Contact, Inner, PendingMessage,
    State, ACCOUNT_KEY, RETIRED_SESSIONS_KEY, SEEN_SETUPS_KEY, SETTINGS_KEY,
};
use crate::connection::{ConnectOptions, Connection};
use crate::content::{Body, Content, MessageId, ReceiptKind};
use crate::error::{ConnectionError, CryptoError};
use crate::keys::{DeviceKey, IdentityKey, IdentityKeyPair};
use crate::safety::SafetyNumber;
use crate::store::{LocalStore, PrekeyStore, StorageKey, StoreError, Table};
use crate::util::{hex_decode, hex_encode, random, Clock, SystemClock};

/// Events buffered for the app; when it stops reading, the client stops acknowledging and
/// the relay holds the rest.
const EVENT_BUFFER: usize = 256;
const CONTACT_CARD_PREFIX: &str = "hush-contact:1:";

/// Something went wrong in the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Talking to the relay failed.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    /// An end-to-end operation failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// There is no account in this data directory (use `Client::create`).
    #[error("no account in this data directory")]
    NoAccount,
    /// The account is not a contact (add it from its contact card first).
    #[error("unknown contact")]
    UnknownContact,
    /// The recipient does not accept sealed messages from us (no or wrong profile key).
    #[error("the recipient does not accept messages from this sender")]
    NotAccepted,
    /// A contact card or link code did not parse.
    #[error("invalid {0}")]
    InvalidCode(&'static str),
    /// The recipient's devices kept changing while we sent.
    #[error("the recipient's device list kept changing")]
    DeviceListUnstable,
    /// A call is already ringing or under way on this device.
    #[error("a call is already in progress")]
    CallInProgress,
    /// No such call (ended, answered elsewhere, or never known here).
    #[error("no such call")]
    NoSuchCall,
    /// A media frame could not be sealed (its key epoch is used up: rotate).
    #[error("media frame not sealed")]
    CallMedia,
}

/// Where the client keeps its state, which relay it talks to, and its clock. Made with
/// [`ClientConfig::new`]; fields may be set after.
#[non_exhaustive]
pub struct ClientConfig {
    /// The relay.
    pub relay: ConnectOptions,
    /// The directory of the encrypted local store.
    pub data_dir: PathBuf,
    /// The key of the local store.
    pub storage_key: StorageKey,
    /// Where the client reads the time ([`SystemClock`] but in tests).
    pub clock: Arc<dyn Clock>,
}

impl ClientConfig {
    /// A configuration on the system clock.
    pub fn new(relay: ConnectOptions, data_dir: PathBuf, storage_key: StorageKey) -> Self {
        ClientConfig {
            relay,
            data_dir,
            storage_key,
            clock: Arc::new(SystemClock),
        }
    }
}

/// The user's privacy choices (P7). Receipts and typing are end-to-end messages; switched
/// off, they are simply not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[allow(clippy::struct_excessive_bools)] // Independent switches the user sets one by one.
pub struct Settings {
    /// Send delivery receipts.
    pub delivery_receipts: bool,
    /// Send read receipts.
    pub read_receipts: bool,
    /// Send typing indicators.
    pub typing_indicators: bool,
    /// Accept sealed messages from senders who do not know our profile key.
    pub allow_unknown_senders: bool,
    /// How long an outgoing call rings before it counts as missed, in seconds.
    pub ring_timeout_secs: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            delivery_receipts: true,
            read_receipts: true,
            typing_indicators: true,
            allow_unknown_senders: false,
            ring_timeout_secs: 60,
        }
    }
}

/// The client: one per device.
pub struct Client {
    inner: Arc<Inner>,
    events: Mutex<mpsc::Receiver<ClientEvent>>,
    /// The receive loop and its helpers (acks; receipts and prekeys).
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Client {
    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// Creates an account on the relay and a new local store for it.
    pub async fn create(
        config: ClientConfig,
        invite: Option<&[u8]>,
    ) -> Result<Client, ClientError> {
        let store = LocalStore::open(&config.data_dir, &config.storage_key)?;
        let identity = IdentityKeyPair::generate();
        let device_key = DeviceKey::generate();
        let connection = Connection::connect(&config.relay).await?;
        let address = connection
            .register(&identity.public().to_bytes(), &device_key, invite)
            .await?;
        let profile_key = random::<32>();
        let record = AccountRecord {
            identity: identity.to_secret_bytes().to_vec(),
            device_key: *device_key.to_secret_bytes(),
            account: address.account.0,
            device: address.device.0,
            profile_key,
        };
        let settings = Settings::default();
        connection
            .set_delivery_access(
                Some(delivery_token(&profile_key)),
                settings.allow_unknown_senders,
            )
            .await?;
        store.commit(vec![
            store.put(Table::State, ACCOUNT_KEY, encode(&record)?),
            store.put(Table::State, SETTINGS_KEY, encode(&settings)?),
        ])?;
        Self::start(config, store, connection, true).await
    }

    /// Opens the account kept in the data directory and connects.
    pub async fn open(config: ClientConfig) -> Result<Client, ClientError> {
        let store = LocalStore::open(&config.data_dir, &config.storage_key)?;
        let connection = Connection::connect(&config.relay).await?;
        Self::start(config, store, connection, false).await
    }

    async fn start(
        config: ClientConfig,
        store: LocalStore,
        connection: Connection,
        authenticated: bool,
    ) -> Result<Client, ClientError> {
        let record: AccountRecord = decode(
            &store
                .get(Table::State, ACCOUNT_KEY)?
                .ok_or(ClientError::NoAccount)?,
        )?;
        let identity_bytes: &[u8; 64] = record
            .identity
            .as_slice()
            .try_into()
            .map_err(|_| ClientError::Store(StoreError::Corrupt))?;
        let identity = IdentityKeyPair::from_secret_bytes(identity_bytes);
        let device_key = DeviceKey::from_secret_bytes(&record.device_key);
        let address = DeviceAddress {
            account: AccountId(record.account),
            device: DeviceId(record.device),
        };
        if !authenticated {
            connection.authenticate(address, &device_key).await?;
        }
        let settings = match store.get(Table::State, SETTINGS_KEY)? {
            Some(bytes) => decode(&bytes)?,
            None => Settings::default(),
        };
        let prekeys = store.load_prekeys()?.unwrap_or_default();
        let seen_setups: BTreeMap<[u8; 32], u64> = match store.get(Table::State, SEEN_SETUPS_KEY)? {
            Some(bytes) => decode(&bytes)?,
            None => BTreeMap::new(),
        };
        let mut contacts = HashMap::new();
        for bytes in store.values(Table::Contacts)? {
            let contact: Contact = decode(&bytes)?;
            contacts.insert(AccountId(contact.account), contact);
        }
        let retired: BTreeMap<DeviceAddress, u64> =
            match store.get(Table::State, RETIRED_SESSIONS_KEY)? {
                Some(bytes) => decode(&bytes)?,
                None => BTreeMap::new(),
            };
        let now = config.clock.now();
        let mut state = State::new(identity, address, record.profile_key, settings);
        state.prekeys = prekeys;
        state.contacts = contacts;
        state.seen_setups = seen_setups;
        state.retired = retired;
        state.purge_retired(&store, now);
        let first_start = state.prekeys.one_time_counts().0 == 0;
        tasks::initial_prekeys(&store, &connection, &mut state, now, first_start).await?;
        let (certificate, relay_key) = connection.sender_certificate().await?;
        let expires = certificate
            .verify(&relay_key, now)
            .map_or(0, |b| b.expires_at);
        state.certificate = Some((certificate, expires));
        state.relay_key = relay_key;

        let anonymous = Connection::connect(&config.relay).await?;
        let store = Arc::new(store);
        let (events_tx, events_rx) = mpsc::channel(EVENT_BUFFER);
        let (work, work_queue) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            committer: Committer::start(store.clone())?,
            store,
            connection,
            anonymous,
            state: std::sync::Mutex::new(state),
            events: events_tx,
            work,
            media: std::sync::Mutex::new(MediaTable::default()),
            call_operations: Mutex::new(()),
            clock: config.clock,
        });
        let (acks, ack_queue) = mpsc::unbounded_channel();
        let tasks = vec![
            tokio::spawn(tasks::media_loop(inner.clone())),
            tokio::spawn(receive::receive_loop(inner.clone(), acks)),
            tokio::spawn(tasks::ack_loop(inner.clone(), ack_queue)),
            tokio::spawn(tasks::work_loop(inner.clone(), work_queue)),
        ];
        let client = Client {
            inner,
            events: Mutex::new(events_rx),
            tasks,
        };
        if let Err(error) = client.retry_pending().await {
            tracing::debug!(%error, "pending messages stay queued");
        }
        Ok(client)
    }

    /// This device's address.
    #[allow(clippy::unused_async)] // async like the rest of the API, which apps await.
    pub async fn address(&self) -> DeviceAddress {
        self.inner.lock().address
    }

    /// The next event; `None` once the client is closed.
    pub async fn next_event(&self) -> Option<ClientEvent> {
        self.events.lock().await.recv().await
    }

    /// A string to hand to people who may message us (as a QR code or link): our account
    /// and profile key, from which they derive our delivery token.
    #[allow(clippy::unused_async)] // async like the rest of the API, which apps await.
    pub async fn contact_card(&self) -> String {
        let state = self.inner.lock();
        let mut bytes = Vec::with_capacity(48);
        bytes.extend_from_slice(&state.address.account.0);
        bytes.extend_from_slice(state.profile_key.as_ref());
        format!("{CONTACT_CARD_PREFIX}{}", hex_encode(&bytes))
    }

    /// Adds a contact from its contact card.
    pub async fn add_contact(&self, card: &str) -> Result<AccountId, ClientError> {
        let bytes = card
            .strip_prefix(CONTACT_CARD_PREFIX)
            .and_then(hex_decode)
            .filter(|bytes| bytes.len() == 48)
            .ok_or(ClientError::InvalidCode("contact card"))?;
        let mut account = [0u8; 16];
        account.copy_from_slice(&bytes[..16]);
        let mut profile_key = [0u8; 32];
        profile_key.copy_from_slice(&bytes[16..]);
        let account = AccountId(account);
        let ticket = {
            let mut state = self.inner.lock();
            state
                .contacts
                .entry(account)
                .or_insert_with(|| Contact::new(account))
                .profile_key = Some(profile_key);
            state.contact_changed(account);
            self.inner
                .submit(&mut state, Vec::new(), Durability::Immediate)
        };
        self.inner.committed(ticket).await?;
        Ok(account)
    }

    /// The safety number with a contact whose identity we know.
    #[allow(clippy::unused_async)] // async like the rest of the API, which apps await.
    pub async fn safety_number(&self, contact: AccountId) -> Result<SafetyNumber, ClientError> {
        let state = self.inner.lock();
        let identity = state
            .contacts
            .get(&contact)
            .and_then(|c| c.identity.as_ref())
            .ok_or(ClientError::UnknownContact)?;
        let theirs = IdentityKey::from_bytes(identity)?;
        Ok(SafetyNumber::new(
            state.identity.public(),
            &state.address.account.0,
            &theirs,
            &contact.0,
        ))
    }

    /// Current settings.
    #[allow(clippy::unused_async)] // async like the rest of the API, which apps await.
    pub async fn settings(&self) -> Settings {
        self.inner.lock().settings
    }

    /// Changes the settings (and tells the relay if unknown senders are now allowed or not).
    pub async fn set_settings(&self, settings: Settings) -> Result<(), ClientError> {
        let (current, profile_key) = {
            let state = self.inner.lock();
            (state.settings, *state.profile_key)
        };
        if settings.allow_unknown_senders != current.allow_unknown_senders {
            self.inner
                .connection
                .set_delivery_access(
                    Some(delivery_token(&profile_key)),
                    settings.allow_unknown_senders,
                )
                .await?;
        }
        let ticket = {
            let mut state = self.inner.lock();
            state.settings = settings;
            let change = self
                .inner
                .store
                .put(Table::State, SETTINGS_KEY, encode(&settings)?);
            self.inner
                .submit(&mut state, vec![change], Durability::Immediate)
        };
        self.inner.committed(ticket).await?;
        Ok(())
    }

    /// Sends a text message.
    pub async fn send_text(&self, to: AccountId, text: &str) -> Result<MessageId, ClientError> {
        self.send(to, Body::Text { text: text.into() }).await
    }

    /// Sends any body to a contact (and a copy to our other devices). Sends to different
    /// contacts, and several to one, go on at once; each returns once the relay has it.
    pub async fn send(&self, to: AccountId, body: Body) -> Result<MessageId, ClientError> {
        let id = MessageId(random());
        let pending = {
            let state = self.inner.lock();
            let content = Content {
                id,
                sent_at: self.inner.now(),
                expires_in: state.contacts.get(&to).and_then(|c| c.expires_in),
                profile_key: Some(*state.profile_key),
                sent_to: None,
                body,
            };
            PendingMessage { to: to.0, content }
        };
        // Kept until the relay has it, so a crash or a dropped connection does not lose it:
        // `retry_pending` (also run when the client opens) sends it again.
        let outbox = self
            .inner
            .store
            .put(Table::Outbox, &id.0, encode(&pending)?);
        let result = self.inner.deliver(&pending, Some(outbox)).await;
        let events = std::mem::take(&mut self.inner.lock().pending_events);
        self.inner.emit_soon(events);
        match result {
            Ok(()) => Ok(id),
            Err(error @ (ClientError::Connection(_) | ClientError::Store(_))) => Err(error),
            Err(error) => {
                // Refused for good (unknown contact, no access): nothing to retry. The
                // outbox entry may be stored (the relay refused after the commit).
                let delete = self.inner.store.delete(Table::Outbox, &id.0);
                self.inner.commit_now(vec![delete]).await?;
                Err(error)
            }
        }
    }

    /// Sends again whatever an earlier `send` could not hand to the relay; returns how many
    /// went out. Receivers drop a message id they already have, so a resend after a crash
    /// that hid a success shows up once.
    pub async fn retry_pending(&self) -> Result<usize, ClientError> {
        // What was sent and not yet recorded must not be read as pending.
        self.inner.flush().await?;
        let mut sent = 0;
        for bytes in self.inner.store.values(Table::Outbox)? {
            let pending: PendingMessage = decode(&bytes)?;
            match self.inner.deliver(&pending, None).await {
                Ok(()) => sent += 1,
                Err(error @ (ClientError::Connection(_) | ClientError::Store(_))) => {
                    return Err(error)
                }
                Err(error) => {
                    tracing::debug!(%error, "dropping a pending message the relay refuses");
                    let delete = self
                        .inner
                        .store
                        .delete(Table::Outbox, &pending.content.id.0);
                    self.inner.commit_now(vec![delete]).await?;
                }
            }
        }
        Ok(sent)
    }

    /// Marks messages from a contact as read: sends a read receipt if the user allows it.
    pub async fn mark_read(&self, from: AccountId, ids: Vec<MessageId>) -> Result<(), ClientError> {
        if !self.settings().await.read_receipts {
            return Ok(());
        }
        self.send(
            from,
            Body::Receipt {
                kind: ReceiptKind::Read,
                ids,
            },
        )
        .await
        .map(|_| ())
    }

    /// Tells a contact we started or stopped typing, if the user allows it.
    pub async fn typing(&self, to: AccountId, started: bool) -> Result<(), ClientError> {
        if !self.settings().await.typing_indicators {
            return Ok(());
        }
        self.send(to, Body::Typing { started }).await.map(|_| ())
    }

    /// Sets the disappearing-message timer of a conversation, for both sides.
    pub async fn set_timer(
        &self,
        to: AccountId,
        expires_in: Option<u32>,
    ) -> Result<(), ClientError> {
        self.send(to, Body::Timer { expires_in }).await.map(|_| ())
    }

    /// Deletes one of our messages for everyone: an end-to-end control message for the
    /// devices that have it, and a retraction that drops it from the relay's mailboxes
    /// where it is still undelivered. Returns how many undelivered copies the relay
    /// dropped.
    pub async fn delete_for_everyone(
        &self,
        to: AccountId,
        id: MessageId,
    ) -> Result<u32, ClientError> {
        let secret = send::retract_secret(&self.inner.lock().identity, &id);
        let dropped = self.inner.anonymous.retract(&[*secret]).await?;
        self.send(to, Body::Delete { target: id }).await?;
        let delete = self
            .inner
            .store
            .delete(Table::Messages, &message_key(to, id));
        self.inner.commit_now(vec![delete]).await?;
        Ok(dropped)
    }

    /// The messages kept for a conversation, oldest first.
    pub async fn messages(
        &self,
        conversation: AccountId,
    ) -> Result<Vec<StoredMessage>, ClientError> {
        self.inner.flush().await?;
        let mut out = Vec::new();
        for bytes in self.inner.store.values(Table::Messages)? {
            let message: StoredMessage = decode(&bytes)?;
            if message.conversation == conversation {
                out.push(message);
            }
        }
        out.sort_by_key(|m| m.sent_at);
        Ok(out)
    }

    /// Deletes messages whose disappearing timer ran out by `now`; returns how many.
    pub async fn purge_expired(&self, now: u64) -> Result<usize, ClientError> {
        self.inner.flush().await?;
        let mut changes = Vec::new();
        for bytes in self.inner.store.values(Table::Messages)? {
            let message: StoredMessage = decode(&bytes)?;
            if message.expires_at.is_some_and(|at| at <= now) {
                changes.push(self.inner.store.delete(
                    Table::Messages,
                    &message_key(message.conversation, message.id),
                ));
            }
        }
        let count = changes.len();
        self.inner.commit_now(changes).await?;
        Ok(count)
    }

    /// Removes another device of this account; it stops receiving at once.
    pub async fn remove_device(&self, device: DeviceId) -> Result<(), ClientError> {
        self.inner.connection.remove_device(device).await?;
        let now = self.inner.now();
        let ticket = {
            let mut state = self.inner.lock();
            let address = DeviceAddress {
                account: state.address.account,
                device,
            };
            if let Some(devices) = state.own_devices.as_mut() {
                devices.retain(|d| *d != device);
            }
            state.retire_sessions(&self.inner.store, &[address], now);
            self.inner
                .submit(&mut state, Vec::new(), Durability::Immediate)
        };
        self.inner.committed(ticket).await?;
        Ok(())
    }

    /// Closes both connections and stops receiving. The local store is released once the
    /// background tasks have stopped; [`Client::shutdown`] waits for that.
    pub fn close(&self) {
        for task in &self.tasks {
            task.abort();
        }
        self.inner.connection.close();
        self.inner.anonymous.close();
    }

    /// Closes the client and waits until its local store is released, so the same data
    /// directory can be opened again at once.
    pub async fn shutdown(mut self) {
        self.close();
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
    }
}

impl Inner {
    /// Emits events raised on the app's side (from `send`) without waiting: the app may be
    /// the one that reads them. What does not fit now goes out after the next envelope.
    pub(crate) fn emit_soon(&self, events: Vec<ClientEvent>) {
        let mut left = Vec::new();
        for event in events {
            if let Err(mpsc::error::TrySendError::Full(event)) = self.events.try_send(event) {
                left.push(event);
            }
        }
        if !left.is_empty() {
            self.lock().pending_events.extend(left);
        }
    }
}
