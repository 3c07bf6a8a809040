//! The `Client` handle: the one object an app holds. It owns the keys, the encrypted local
//! store and two relay connections (an authenticated one that receives, and an anonymous
//! one for sealed sends, on a socket of its own so the relay cannot tie them together),
//! and turns what arrives into [`ClientEvent`]s.
//!
//! Crash safety: an envelope is acknowledged to the relay only after the session state
//! that decrypted it and the message it carried are committed to the local store in one
//! transaction; a crash before that means the relay delivers it again and the old session
//! state opens it again.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hush_protocol::sealed::{retract_tag, SealedEnvelope, SenderCertificate};
use hush_protocol::{
    AccountId, CallOutcome, DeviceAddress, DeviceId, EnvelopeId, ErrorCode, OutgoingEnvelope,
};
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Mutex};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::call::{ActiveCall, CallEndReason, MediaTable};
use crate::connection::{ConnectOptions, Connection, Envelope, Event};
use crate::content::{Body, CallId, CallSignal, Content, MessageId, ReceiptKind};
use crate::error::{ConnectionError, CryptoError};
use crate::keys::{DeviceKey, EcKeyPair, IdentityKey, IdentityKeyPair};
use crate::link::{self, LinkCode, LinkedContact, ProvisionBundle};
use crate::message::CiphertextMessage;
use crate::pqxdh::PeerBundle;
use crate::prekeys::PrekeySet;
use crate::safety::SafetyNumber;
use crate::session::{Session, SessionSet};
use crate::store::{Change, LocalStore, StorageKey, StoreError, Table};
use crate::{kdf, pickle, sealed};

/// One-time prekeys of each kind kept on the relay.
const PREKEY_BATCH: u32 = 100;
/// Refresh the sender certificate when less than this is left of it.
const CERTIFICATE_MARGIN_SECS: u64 = 3600;
/// Events buffered for the app; when it stops reading, the client stops acknowledging and
/// the relay holds the rest.
const EVENT_BUFFER: usize = 256;
const ACCOUNT_KEY: &[u8] = b"account";
const PREKEYS_KEY: &[u8] = b"prekeys";
const SETTINGS_KEY: &[u8] = b"settings";
const SEEN_SETUPS_KEY: &[u8] = b"seen-setups";
/// How long an accepted setup's base key is remembered: longer than any signed prekey
/// lives (a week current, two more weeks kept), so a replayed prekey message that used
/// only the last-resort KEM key can never start a second session.
const SEEN_SETUPS_SECS: u64 =
    crate::prekeys::ROTATE_AFTER_SECS + crate::prekeys::KEEP_ROTATED_SECS + 24 * 3600;
const RETIRED_SESSIONS_KEY: &[u8] = b"retired-sessions";
/// How long the sessions with a device that left its account are kept once we notice:
/// what it sent before it left can wait on the relay that long at most, plus a day.
const RETIRED_SESSIONS_SECS: u64 = crate::ratchet::MAX_SKIPPED_AGE_SECS + 24 * 3600;
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

/// Where the client keeps its state and which relay it talks to.
pub struct ClientConfig {
    /// The relay.
    pub relay: ConnectOptions,
    /// The directory of the encrypted local store.
    pub data_dir: PathBuf,
    /// The key of the local store.
    pub storage_key: StorageKey,
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

/// A message kept in the local store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Its id.
    pub id: MessageId,
    /// The other party of the conversation.
    pub conversation: AccountId,
    /// Sent by this account (from this or another of its devices).
    pub outgoing: bool,
    /// Sender's clock.
    pub sent_at: u64,
    /// When it disappears (seconds since the epoch), if a timer was set.
    pub expires_at: Option<u64>,
    /// What it says.
    pub body: Body,
}

/// What the client tells the app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// A message from a contact (stored before this event).
    Message {
        /// Sender account.
        from: AccountId,
        /// Sender device.
        device: DeviceId,
        /// The message.
        message: StoredMessage,
    },
    /// A message this account sent from another of its devices.
    SentElsewhere {
        /// The message.
        message: StoredMessage,
    },
    /// Receipts from a contact.
    Receipt {
        /// Who.
        from: AccountId,
        /// Which.
        kind: ReceiptKind,
        /// For which of our messages.
        ids: Vec<MessageId>,
    },
    /// A contact started or stopped typing.
    Typing {
        /// Who.
        from: AccountId,
        /// Started or stopped.
        started: bool,
    },
    /// A contact deleted one of their messages for everyone.
    Deleted {
        /// Who.
        from: AccountId,
        /// Which.
        id: MessageId,
    },
    /// A contact changed the conversation's disappearing timer.
    TimerChanged {
        /// Who.
        from: AccountId,
        /// The new timer.
        expires_in: Option<u32>,
    },
    /// A contact's identity key changed: compare safety numbers again.
    IdentityChanged {
        /// Whose.
        account: AccountId,
    },
    /// An envelope could not be opened (tampered, forged, not for this device…); it was
    /// dropped.
    Undecryptable {
        /// Why.
        error: CryptoError,
    },
    /// A contact is calling: ring, then `answer_call` or `reject_call`.
    IncomingCall {
        /// Who.
        from: AccountId,
        /// From which of their devices.
        device: DeviceId,
        /// The call.
        call_id: CallId,
        /// Whether video is offered.
        video: bool,
    },
    /// Our outgoing call was answered: its media is ready (`take_media`).
    CallAnswered {
        /// The call.
        call_id: CallId,
    },
    /// A call ended (or stopped ringing here).
    CallEnded {
        /// The call.
        call_id: CallId,
        /// Why.
        reason: CallEndReason,
    },
    /// The relay connection ended.
    Disconnected(Option<ErrorCode>),
}

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct AccountRecord {
    identity: Vec<u8>,
    device_key: [u8; 32],
    account: [u8; 16],
    device: u32,
    profile_key: [u8; 32],
}

/// What handling one envelope produced.
struct Handled {
    /// For the app, in order.
    events: Vec<ClientEvent>,
    /// A delivery receipt owed to this contact for this message.
    receipt: Option<(AccountId, MessageId)>,
}

/// Work the receive loop hands off, so it never waits on a relay request itself.
pub(crate) enum Work {
    Receipt(AccountId, MessageId),
    /// A call signal to send at once (e.g. `Busy` for an offer while in a call).
    CallSignal(AccountId, CallSignal),
    /// Tells the relay a call allocation is over.
    EndCall(u32, CallOutcome),
    /// A copy of a sent message for our other devices.
    OwnCopy(Box<Content>),
    Prekeys {
        replenish: bool,
    },
}

/// A message not yet accepted by the relay.
#[derive(Serialize, Deserialize)]
struct PendingMessage {
    to: [u8; 16],
    content: Content,
}

#[derive(Clone, Serialize, Deserialize)]
struct Contact {
    account: [u8; 16],
    identity: Option<Vec<u8>>,
    profile_key: Option<[u8; 32]>,
    devices: Vec<u32>,
    expires_in: Option<u32>,
}

impl Contact {
    fn new(account: AccountId) -> Self {
        Contact {
            account: account.0,
            identity: None,
            profile_key: None,
            devices: Vec::new(),
            expires_in: None,
        }
    }
}

pub(crate) struct State {
    identity: IdentityKeyPair,
    address: DeviceAddress,
    pub(crate) profile_key: Zeroizing<[u8; 32]>,
    prekeys: PrekeySet,
    sessions: HashMap<DeviceAddress, SessionSet>,
    contacts: HashMap<AccountId, Contact>,
    pub(crate) settings: Settings,
    certificate: Option<(SenderCertificate, u64)>,
    /// The key that signs sender certificates, as the relay last told us.
    relay_key: [u8; 32],
    /// Events raised while the state was locked, emitted once it is not: sending into
    /// the app's bounded channel under the lock could wait on an app that waits on us.
    pub(crate) pending_events: Vec<ClientEvent>,
    /// Calls ringing or under way, by call id.
    pub(crate) calls: HashMap<CallId, ActiveCall>,
    /// Base keys of accepted session setups, with when we accepted them.
    seen_setups: BTreeMap<[u8; 32], u64>,
    /// Our account's other devices, as last learned (asking before every send would tell
    /// the relay when we send).
    own_devices: Option<Vec<DeviceId>>,
    /// Devices that left their account, with when we noticed. We no longer send to them,
    /// but keep their sessions for [`RETIRED_SESSIONS_SECS`]: what they sent before they
    /// left may still be on the relay, or queued behind the send that noticed.
    retired: BTreeMap<DeviceAddress, u64>,
}

pub(crate) struct Inner {
    store: LocalStore,
    pub(crate) connection: Connection,
    anonymous: Connection,
    pub(crate) state: Mutex<State>,
    events: mpsc::Sender<ClientEvent>,
    /// Receipts, copies for our own devices and prekey upkeep, done by the worker task.
    pub(crate) work: mpsc::UnboundedSender<Work>,
    /// Media of connected calls (a plain mutex: held only for one frame at a time).
    pub(crate) media: std::sync::Mutex<MediaTable>,
}

/// The client: one per device.
pub struct Client {
    inner: Arc<Inner>,
    events: Mutex<mpsc::Receiver<ClientEvent>>,
    /// The receive loop and its helpers (acks; receipts and prekeys).
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The delivery token that holders of `profile_key` present to send sealed messages.
pub(crate) fn delivery_token(profile_key: &[u8; 32]) -> [u8; 16] {
    *kdf::hkdf::<16>(&[], profile_key, b"hush-delivery-token-v1")
}

/// What a received content raised: an event for the app, and a message to send a
/// delivery receipt for.
type ContentOutcome = (Option<ClientEvent>, Option<(AccountId, MessageId)>);

/// A stored session set. A record that does not decode is a damaged store, not a bad
/// message: the envelope must stay on the relay, not be dropped as undecryptable.
fn load_sessions(bytes: &[u8]) -> Result<SessionSet, ClientError> {
    pickle::unpickle_session_set(bytes).map_err(|_| ClientError::Store(StoreError::Corrupt))
}

fn session_key(address: &DeviceAddress) -> [u8; 20] {
    address.to_bytes()
}

/// Messages are kept per conversation: an id chosen by one contact can never touch a row
/// of another conversation.
fn message_key(conversation: AccountId, id: MessageId) -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(&conversation.0);
    key[16..].copy_from_slice(&id.0);
    key
}

/// A relay refusal of an anonymous request, in the client's terms.
fn refusal(error: ConnectionError) -> ClientError {
    match error {
        ConnectionError::Refused(ErrorCode::DeliveryRefused) => ClientError::NotAccepted,
        other => other.into(),
    }
}

/// The delivery token of a contact whose profile key we know.
fn contact_token(state: &State, account: AccountId) -> Option<[u8; 16]> {
    state
        .contacts
        .get(&account)
        .and_then(|c| c.profile_key.as_ref())
        .map(delivery_token)
}

/// When a message with a timer disappears; a hostile timestamp saturates, never wraps.
fn expiry(start: u64, expires_in: Option<u32>) -> Option<u64> {
    expires_in.map(|secs| start.saturating_add(u64::from(secs)))
}

fn encode(value: &impl Serialize) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    crate::store::encode_record(value)
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ClientError> {
    Ok(crate::store::decode_record(bytes)?)
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
        let mut profile_key = [0u8; 32];
        OsRng.fill_bytes(&mut profile_key);
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
        let mut prekeys = match store.get(Table::State, PREKEYS_KEY)? {
            Some(bytes) => pickle::unpickle_prekeys(&bytes).map_err(|_| StoreError::Corrupt)?,
            None => PrekeySet::default(),
        };
        let seen_setups: BTreeMap<[u8; 32], u64> = match store.get(Table::State, SEEN_SETUPS_KEY)? {
            Some(bytes) => decode(&bytes)?,
            None => BTreeMap::new(),
        };
        let mut contacts = HashMap::new();
        for bytes in store.values(Table::Contacts)? {
            let contact: Contact = decode(&bytes)?;
            contacts.insert(AccountId(contact.account), contact);
        }

        let now = now();
        let mut retired: BTreeMap<DeviceAddress, u64> =
            match store.get(Table::State, RETIRED_SESSIONS_KEY)? {
                Some(bytes) => decode(&bytes)?,
                None => BTreeMap::new(),
            };
        let purged = purge_retired(&store, &mut retired, &mut HashMap::new(), now)?;
        if !purged.is_empty() {
            store.commit(purged)?;
        }
        let first_start = prekeys.one_time_counts().0 == 0;
        maintain_prekeys(
            &store,
            &connection,
            &identity,
            &mut prekeys,
            now,
            first_start,
        )
        .await?;
        let (certificate, relay_key) = connection.sender_certificate().await?;
        let expires = certificate
            .verify(&relay_key, now)
            .map_or(0, |b| b.expires_at);

        let anonymous = Connection::connect(&config.relay).await?;
        let (events_tx, events_rx) = mpsc::channel(EVENT_BUFFER);
        let (work, work_queue) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            store,
            connection,
            anonymous,
            state: Mutex::new(State {
                identity,
                address,
                profile_key: Zeroizing::new(record.profile_key),
                prekeys,
                sessions: HashMap::new(),
                contacts,
                settings,
                certificate: Some((certificate, expires)),
                relay_key,
                pending_events: Vec::new(),
                seen_setups,
                own_devices: None,
                retired,
                calls: HashMap::new(),
            }),
            events: events_tx,
            work,
            media: std::sync::Mutex::new(MediaTable::default()),
        });
        let (acks, ack_queue) = mpsc::unbounded_channel();
        let tasks = vec![
            tokio::spawn(media_loop(inner.clone())),
            tokio::spawn(receive_loop(inner.clone(), acks)),
            tokio::spawn(ack_loop(inner.clone(), ack_queue)),
            tokio::spawn(work_loop(inner.clone(), work_queue)),
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
    pub async fn address(&self) -> DeviceAddress {
        self.inner.state.lock().await.address
    }

    /// The next event; `None` once the client is closed.
    pub async fn next_event(&self) -> Option<ClientEvent> {
        self.events.lock().await.recv().await
    }

    /// A string to hand to people who may message us (as a QR code or link): our account
    /// and profile key, from which they derive our delivery token.
    pub async fn contact_card(&self) -> String {
        let state = self.inner.state.lock().await;
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
        let mut state = self.inner.state.lock().await;
        let mut contact = state
            .contacts
            .get(&account)
            .cloned()
            .unwrap_or_else(|| Contact::new(account));
        contact.profile_key = Some(profile_key);
        self.inner.store.commit(vec![self.inner.store.put(
            Table::Contacts,
            &account.0,
            encode(&contact)?,
        )])?;
        state.contacts.insert(account, contact);
        Ok(account)
    }

    /// The safety number with a contact whose identity we know.
    pub async fn safety_number(&self, contact: AccountId) -> Result<SafetyNumber, ClientError> {
        let state = self.inner.state.lock().await;
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
    pub async fn settings(&self) -> Settings {
        self.inner.state.lock().await.settings
    }

    /// Changes the settings (and tells the relay if unknown senders are now allowed or not).
    pub async fn set_settings(&self, settings: Settings) -> Result<(), ClientError> {
        let mut state = self.inner.state.lock().await;
        if settings.allow_unknown_senders != state.settings.allow_unknown_senders {
            self.inner
                .connection
                .set_delivery_access(
                    Some(delivery_token(&state.profile_key)),
                    settings.allow_unknown_senders,
                )
                .await?;
        }
        self.inner.store.commit(vec![self.inner.store.put(
            Table::State,
            SETTINGS_KEY,
            encode(&settings)?,
        )])?;
        state.settings = settings;
        Ok(())
    }

    /// Sends a text message.
    pub async fn send_text(&self, to: AccountId, text: &str) -> Result<MessageId, ClientError> {
        self.send(to, Body::Text { text: text.into() }).await
    }

    /// Sends any body to a contact (and a copy to our other devices).
    pub async fn send(&self, to: AccountId, body: Body) -> Result<MessageId, ClientError> {
        let mut state = self.inner.state.lock().await;
        let id = MessageId(random());
        let expires_in = state.contacts.get(&to).and_then(|c| c.expires_in);
        let content = Content {
            id,
            sent_at: now(),
            expires_in,
            profile_key: Some(*state.profile_key),
            sent_to: None,
            body: body.clone(),
        };
        // Kept until the relay has it, so a crash or a dropped connection does not lose it:
        // `retry_pending` (also run when the client opens) sends it again.
        let pending = PendingMessage { to: to.0, content };
        self.inner.store.commit(vec![self.inner.store.put(
            Table::Outbox,
            &id.0,
            encode(&pending)?,
        )])?;
        let result = self.inner.deliver(&mut state, &pending).await;
        let events = std::mem::take(&mut state.pending_events);
        drop(state);
        self.inner.emit_soon(events).await;
        match result {
            Ok(()) => Ok(id),
            Err(error @ ClientError::Connection(_)) => Err(error),
            Err(error) => {
                // Refused for good (unknown contact, no access): nothing to retry.
                self.inner
                    .store
                    .commit(vec![self.inner.store.delete(Table::Outbox, &id.0)])?;
                Err(error)
            }
        }
    }

    /// Sends again whatever an earlier `send` could not hand to the relay; returns how many
    /// went out. Receivers drop a message id they already have, so a resend after a crash
    /// that hid a success shows up once.
    pub async fn retry_pending(&self) -> Result<usize, ClientError> {
        let mut state = self.inner.state.lock().await;
        let mut sent = 0;
        for bytes in self.inner.store.values(Table::Outbox)? {
            let pending: PendingMessage = decode(&bytes)?;
            match self.inner.deliver(&mut state, &pending).await {
                Ok(()) => sent += 1,
                Err(error @ ClientError::Connection(_)) => return Err(error),
                Err(error) => {
                    tracing::debug!(%error, "dropping a pending message the relay refuses");
                    self.inner.store.commit(vec![self
                        .inner
                        .store
                        .delete(Table::Outbox, &pending.content.id.0)])?;
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
        let secret = retract_secret(&self.inner.state.lock().await.identity, &id);
        let dropped = self.inner.anonymous.retract(&[*secret]).await?;
        self.send(to, Body::Delete { target: id }).await?;
        self.inner.store.commit(vec![self
            .inner
            .store
            .delete(Table::Messages, &message_key(to, id))])?;
        Ok(dropped)
    }

    /// The messages kept for a conversation, oldest first.
    pub async fn messages(
        &self,
        conversation: AccountId,
    ) -> Result<Vec<StoredMessage>, ClientError> {
        let _state = self.inner.state.lock().await;
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
        let _state = self.inner.state.lock().await;
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
        self.inner.store.commit(changes)?;
        Ok(count)
    }

    /// Removes another device of this account; it stops receiving at once.
    pub async fn remove_device(&self, device: DeviceId) -> Result<(), ClientError> {
        let mut state = self.inner.state.lock().await;
        self.inner.connection.remove_device(device).await?;
        let address = DeviceAddress {
            account: state.address.account,
            device,
        };
        if let Some(devices) = state.own_devices.as_mut() {
            devices.retain(|d| *d != device);
        }
        self.inner.retire_sessions(&mut state, &[address])
    }

    /// Links a new device from the code it shows: adds its key to the account and sends it
    /// the account's keys, profile key and contacts through its provisioning mailbox.
    pub async fn link_device(&self, code: &str) -> Result<DeviceId, ClientError> {
        let code = LinkCode::decode(code).ok_or(ClientError::InvalidCode("link code"))?;
        let mut state = self.inner.state.lock().await;
        let device = self.inner.connection.add_device(code.device_key).await?;
        let bundle = ProvisionBundle {
            identity: state.identity.to_secret_bytes().to_vec(),
            account: state.address.account.0,
            device: device.0,
            profile_key: *state.profile_key,
            contacts: state
                .contacts
                .values()
                .map(|c| LinkedContact {
                    account: c.account,
                    identity: c.identity.clone(),
                    profile_key: c.profile_key,
                })
                .collect(),
        };
        let payload = link::seal_bundle(&bundle, &code.ephemeral, &mut OsRng)?;
        self.inner
            .connection
            .provision(code.mailbox, payload)
            .await?;
        state.own_devices.get_or_insert_with(Vec::new).push(device);
        Ok(device)
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

/// A device waiting to be linked to an account: show [`LinkRequest::code`] to a device of
/// the account (as a QR code), then [`LinkRequest::finish`].
pub struct LinkRequest {
    connection: Connection,
    mailbox: [u8; 16],
    ephemeral: EcKeyPair,
    device_key: DeviceKey,
    config: ClientConfig,
}

impl LinkRequest {
    /// Opens a provisioning mailbox on the relay.
    pub async fn start(config: ClientConfig) -> Result<LinkRequest, ClientError> {
        let connection = Connection::connect(&config.relay).await?;
        let mailbox = connection.open_provisioning().await?;
        Ok(LinkRequest {
            connection,
            mailbox,
            ephemeral: EcKeyPair::generate(&mut OsRng),
            device_key: DeviceKey::generate(),
            config,
        })
    }

    /// The code to show.
    pub fn code(&self) -> String {
        LinkCode {
            mailbox: self.mailbox,
            ephemeral: *self.ephemeral.public(),
            device_key: self.device_key.public_key(),
        }
        .encode()
    }

    /// Waits for the account's keys, stores them, and opens the client as the new device.
    pub async fn finish(self) -> Result<Client, ClientError> {
        let payload = loop {
            match self.connection.next_event().await {
                Some(Event::Provisioning(payload)) => break payload,
                Some(Event::Closed(code)) => return Err(ConnectionError::Closed(code).into()),
                None => return Err(ConnectionError::Closed(None).into()),
                Some(_) => {}
            }
        };
        self.connection.close();
        let bundle = link::open_bundle(&self.ephemeral, &payload)?;
        let store = LocalStore::open(&self.config.data_dir, &self.config.storage_key)?;
        let record = AccountRecord {
            identity: bundle.identity.clone(),
            device_key: *self.device_key.to_secret_bytes(),
            account: bundle.account,
            device: bundle.device,
            profile_key: bundle.profile_key,
        };
        let mut changes = vec![
            store.put(Table::State, ACCOUNT_KEY, encode(&record)?),
            store.put(Table::State, SETTINGS_KEY, encode(&Settings::default())?),
        ];
        for linked in &bundle.contacts {
            let contact = Contact {
                account: linked.account,
                identity: linked.identity.clone(),
                profile_key: linked.profile_key,
                devices: Vec::new(),
                expires_in: None,
            };
            changes.push(store.put(Table::Contacts, &linked.account, encode(&contact)?));
        }
        store.commit(changes)?;
        drop(store);
        Client::open(self.config).await
    }
}

pub(crate) fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    OsRng.fill_bytes(&mut out);
    out
}

/// The secret whose hash tags every copy of message `id` on the relay. Derived from the
/// identity (shared by our devices) so any of them can retract it.
fn retract_secret(identity: &IdentityKeyPair, id: &MessageId) -> Zeroizing<[u8; 32]> {
    kdf::hkdf::<32>(
        &id.0,
        identity.to_secret_bytes().as_ref(),
        b"hush-retract-secret-v1",
    )
}

pub(crate) fn hex_encode(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

pub(crate) fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

impl Inner {
    /// The sender certificate, refreshed when it is about to expire.
    async fn certificate(&self, state: &mut State) -> Result<SenderCertificate, ClientError> {
        let now = now();
        if let Some((certificate, expires)) = &state.certificate {
            if *expires > now + CERTIFICATE_MARGIN_SECS {
                return Ok(certificate.clone());
            }
        }
        let (certificate, relay_key) = self.connection.sender_certificate().await?;
        let expires = certificate
            .verify(&relay_key, now)
            .map_or(0, |b| b.expires_at);
        state.certificate = Some((certificate.clone(), expires));
        state.relay_key = relay_key;
        Ok(certificate)
    }

    /// Makes sure we hold a session with each of `devices` of `account`, fetching prekey
    /// bundles for the missing ones. Raises `IdentityChanged` if the account's identity
    /// is not the one we knew.
    async fn ensure_sessions(
        &self,
        state: &mut State,
        account: AccountId,
        devices: &[DeviceId],
    ) -> Result<(), ClientError> {
        for &device in devices {
            let address = DeviceAddress { account, device };
            if state.sessions.contains_key(&address) {
                continue;
            }
            if let Some(bytes) = self.store.get(Table::Sessions, &session_key(&address))? {
                state.sessions.insert(address, load_sessions(&bytes)?);
                continue;
            }
            let bundles = if account == state.address.account {
                self.connection.fetch_prekeys(account, Some(device)).await?
            } else {
                // Anonymously, with the contact's token: the relay must not see who is
                // about to write to whom.
                let access = contact_token(state, account);
                self.anonymous
                    .fetch_prekeys_with(account, Some(device), access)
                    .await
                    .map_err(refusal)?
            };
            let Some(bundle) = bundles.devices.iter().find(|b| b.device == device) else {
                continue;
            };
            let peer = PeerBundle::verify(&bundles.identity_key, bundle)?;
            // Our own devices share our identity; anything else is an impostor the relay
            // slipped in.
            if account == state.address.account && peer.identity() != state.identity.public() {
                return Err(CryptoError::UntrustedIdentity.into());
            }
            self.note_identity(state, account, &peer.identity().to_bytes())?;
            let session = Session::initiate(&state.identity, &peer, &mut OsRng)?;
            state.sessions.insert(address, SessionSet::new(session));
        }
        Ok(())
    }

    /// Records the identity key seen for `account`; a change raises an event.
    fn note_identity(
        &self,
        state: &mut State,
        account: AccountId,
        identity: &[u8],
    ) -> Result<(), ClientError> {
        if record_identity(&self.store, state, account, identity)? {
            state
                .pending_events
                .push(ClientEvent::IdentityChanged { account });
        }
        Ok(())
    }

    /// Sends a pending message to its contact, then records it as sent (one commit that
    /// also drops it from the outbox), then copies it to our other devices.
    async fn deliver(
        &self,
        state: &mut State,
        pending: &PendingMessage,
    ) -> Result<(), ClientError> {
        let to = AccountId(pending.to);
        let content = &pending.content;
        let retract = retract_secret(&state.identity, &content.id);
        self.send_to_contact(state, to, content, Some(retract_tag(&retract)))
            .await?;
        let mut changes = vec![self.store.delete(Table::Outbox, &content.id.0)];
        if content.body.is_message() {
            let message = StoredMessage {
                id: content.id,
                conversation: to,
                outgoing: true,
                sent_at: content.sent_at,
                expires_at: expiry(content.sent_at, content.expires_in),
                body: content.body.clone(),
            };
            changes.push(self.store.put(
                Table::Messages,
                &message_key(to, content.id),
                encode(&message)?,
            ));
        }
        if let Body::Timer { expires_in } = content.body {
            if let Some(contact) = state.contacts.get_mut(&to) {
                contact.expires_in = expires_in;
                changes.push(self.store.put(Table::Contacts, &to.0, encode(contact)?));
            }
        }
        self.store.commit(changes)?;
        let copy = Content {
            sent_to: Some(to.0),
            ..content.clone()
        };
        // The copy for our other devices goes out a moment later from the worker, so the
        // relay does not see an authenticated send right on the heels of every sealed one.
        let _ = self.work.send(Work::OwnCopy(Box::new(copy)));
        Ok(())
    }

    /// Encrypts `content` for every device of `to` and sends it sealed.
    pub(crate) async fn send_to_contact(
        &self,
        state: &mut State,
        to: AccountId,
        content: &Content,
        retract: Option<[u8; 32]>,
    ) -> Result<(), ClientError> {
        let contact = state
            .contacts
            .get(&to)
            .cloned()
            .ok_or(ClientError::UnknownContact)?;
        let access = contact.profile_key.as_ref().map(delivery_token);
        let mut devices: Vec<DeviceId> = contact.devices.iter().copied().map(DeviceId).collect();
        let plaintext = content.encode()?;
        for _attempt in 0..3 {
            if devices.is_empty() {
                devices = self
                    .anonymous
                    .list_devices_with(to, access)
                    .await
                    .map_err(refusal)?;
            }
            self.ensure_sessions(state, to, &devices).await?;
            let certificate = self.certificate(state).await?;
            let identity = state
                .contacts
                .get(&to)
                .and_then(|c| c.identity.clone())
                .ok_or(ClientError::UnknownContact)?;
            let recipient_identity = IdentityKey::from_bytes(&identity)?;
            let mut envelopes = Vec::with_capacity(devices.len());
            let mut changes = Vec::with_capacity(devices.len());
            for &device in &devices {
                let address = DeviceAddress {
                    account: to,
                    device,
                };
                let Some(payload) = self.encrypt_for(
                    state,
                    address,
                    &recipient_identity,
                    &certificate,
                    &plaintext,
                    &mut changes,
                )?
                else {
                    continue;
                };
                envelopes.push(SealedEnvelope {
                    account: to,
                    devices: vec![device],
                    access,
                    retract_tag: retract,
                    payload,
                });
            }
            // The ratchet moved: keep that before anything leaves the device.
            self.store.commit(changes)?;
            match self.anonymous.sealed_send(envelopes).await {
                Ok(()) => {
                    if let Some(contact) = state.contacts.get_mut(&to) {
                        let list: Vec<u32> = devices.iter().map(|d| d.0).collect();
                        if contact.devices != list {
                            contact.devices = list;
                            self.store.commit(vec![self.store.put(
                                Table::Contacts,
                                &to.0,
                                encode(contact)?,
                            )])?;
                        }
                    }
                    return Ok(());
                }
                Err(ConnectionError::Refused(ErrorCode::DeviceListChanged)) => {
                    // A device came or went: retire the sessions of devices no longer
                    // there (not delete: their last messages may still be on the way).
                    devices = self
                        .anonymous
                        .list_devices_with(to, access)
                        .await
                        .map_err(refusal)?;
                    let stale: Vec<_> = state
                        .sessions
                        .keys()
                        .filter(|a| a.account == to && !devices.contains(&a.device))
                        .copied()
                        .collect();
                    self.retire_sessions(state, &stale)?;
                }
                Err(error) => return Err(refusal(error)),
            }
        }
        Err(ClientError::DeviceListUnstable)
    }

    /// Marks the sessions with devices that left their account as retired (from now, unless
    /// already), and deletes those retired long enough ago.
    fn retire_sessions(
        &self,
        state: &mut State,
        addresses: &[DeviceAddress],
    ) -> Result<(), ClientError> {
        let now = now();
        let before = state.retired.len();
        for address in addresses {
            state.retired.entry(*address).or_insert(now);
        }
        let added = state.retired.len() != before;
        let mut changes = purge_retired(&self.store, &mut state.retired, &mut state.sessions, now)?;
        if changes.is_empty() && added {
            changes.push(self.store.put(
                Table::State,
                RETIRED_SESSIONS_KEY,
                encode(&state.retired)?,
            ));
        }
        if !changes.is_empty() {
            self.store.commit(changes)?;
        }
        Ok(())
    }

    /// Encrypts `plaintext` with the current session for `address` and seals it; the
    /// session's new state joins `changes`. `None` when there is no session.
    fn encrypt_for(
        &self,
        state: &mut State,
        address: DeviceAddress,
        recipient_identity: &IdentityKey,
        certificate: &SenderCertificate,
        plaintext: &[u8],
        changes: &mut Vec<Change>,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let Some(set) = state.sessions.get_mut(&address) else {
            return Ok(None);
        };
        let Some(session) = set.current_mut() else {
            return Ok(None);
        };
        let message = session.encrypt(plaintext)?.to_bytes();
        changes.push(self.store.put(
            Table::Sessions,
            &session_key(&address),
            pickle::pickle_session_set(set).map_err(StoreError::Pickle)?,
        ));
        let payload = sealed::seal(
            &state.identity,
            certificate,
            recipient_identity,
            address.device.0,
            &message,
            &mut OsRng,
        )?;
        Ok(Some(payload))
    }

    /// Sends a copy of `content` to this account's other devices (authenticated: the relay
    /// knows we talk to ourselves anyway).
    pub(crate) async fn send_to_own_devices(
        &self,
        state: &mut State,
        content: &Content,
    ) -> Result<(), ClientError> {
        let own = state.address;
        for attempt in 0..2 {
            let devices = match &state.own_devices {
                Some(devices) if attempt == 0 => devices.clone(),
                _ => {
                    let devices: Vec<DeviceId> = self
                        .connection
                        .list_devices(own.account)
                        .await?
                        .into_iter()
                        .filter(|d| *d != own.device)
                        .collect();
                    state.own_devices = Some(devices.clone());
                    devices
                }
            };
            if devices.is_empty() {
                return Ok(());
            }
            self.ensure_sessions(state, own.account, &devices).await?;
            let certificate = self.certificate(state).await?;
            let plaintext = content.encode()?;
            let identity = *state.identity.public();
            let mut envelopes = Vec::new();
            let mut changes = Vec::new();
            for device in devices {
                let address = DeviceAddress {
                    account: own.account,
                    device,
                };
                let Some(payload) = self.encrypt_for(
                    state,
                    address,
                    &identity,
                    &certificate,
                    &plaintext,
                    &mut changes,
                )?
                else {
                    continue;
                };
                envelopes.push(OutgoingEnvelope {
                    recipients: vec![address],
                    payload,
                    retract_tag: None,
                });
            }
            self.store.commit(changes)?;
            if envelopes.is_empty() {
                return Ok(());
            }
            match self.connection.send(envelopes).await {
                // One of our devices is gone: learn the list again and retry once.
                Err(ConnectionError::Refused(ErrorCode::UnknownRecipient)) if attempt == 0 => {}
                result => return result.map_err(Into::into),
            }
        }
        Ok(())
    }

    /// Opens one envelope, commits what it changed, and reports it. Returns the event to
    /// emit and, for a message, who should get a delivery receipt.
    async fn handle(self: &Arc<Self>, envelope: &Envelope) -> Result<Handled, ClientError> {
        let mut guard = self.state.lock().await;
        let state = &mut *guard;
        let now = now();
        // The certificate must have been valid when the relay took the envelope, not now:
        // a device that was offline for a day still gets what waited for it.
        let unsealed = sealed::open(
            &state.identity,
            state.address.device.0,
            &state.relay_key,
            &envelope.payload,
            envelope.received_at,
        )?;
        let from = DeviceAddress {
            account: unsealed.sender.account,
            device: unsealed.sender.device,
        };
        let message = CiphertextMessage::from_bytes(&unsealed.message)?;
        let identity = unsealed.sender_identity.to_bytes();
        if from.account == state.address.account
            && unsealed.sender_identity != *state.identity.public()
        {
            return Err(CryptoError::UntrustedIdentity.into());
        }

        if let std::collections::hash_map::Entry::Vacant(slot) = state.sessions.entry(from) {
            if let Some(bytes) = self.store.get(Table::Sessions, &session_key(&from))? {
                slot.insert(load_sessions(&bytes)?);
            }
        }
        let (plaintext, used) = match &message {
            CiphertextMessage::Prekey(prekey)
                if !state
                    .sessions
                    .get(&from)
                    .is_some_and(|s| s.continues(prekey)) =>
            {
                if prekey.identity != unsealed.sender_identity {
                    return Err(CryptoError::InvalidCertificate(
                        "certificate names another identity",
                    )
                    .into());
                }
                let base_key = prekey.base_key.to_bytes();
                if state.seen_setups.contains_key(&base_key) {
                    // A replay of a setup we accepted and have since moved on from.
                    return Err(CryptoError::DuplicateMessage.into());
                }
                let (session, plaintext, used) =
                    Session::accept(&state.identity, &state.prekeys, prekey, now, &mut OsRng)?;
                state
                    .seen_setups
                    .retain(|_, at| now.saturating_sub(*at) < SEEN_SETUPS_SECS);
                state.seen_setups.insert(base_key, now);
                self.note_identity(state, from.account, &identity)?;
                match state.sessions.get_mut(&from) {
                    Some(set) => set.promote_new(session),
                    None => {
                        state.sessions.insert(from, SessionSet::new(session));
                    }
                }
                (plaintext, Some(used))
            }
            _ => {
                let set = state
                    .sessions
                    .get_mut(&from)
                    .ok_or(CryptoError::DecryptionFailed)?;
                if set.remote_identity() != Some(&unsealed.sender_identity) {
                    return Err(CryptoError::InvalidCertificate(
                        "certificate names another identity",
                    )
                    .into());
                }
                (set.decrypt(&message, now, &mut OsRng)?, None)
            }
        };
        // The ratchet moved (and prekeys may be used up): that is stored with whatever the
        // content turns out to be, in one commit.
        let mut changes = match self.session_changes(state, &from, used) {
            Ok(changes) => changes,
            Err(error) => return Err(self.forget(state, &from, error)),
        };
        let content = match Content::decode(&plaintext) {
            Ok(content) => content,
            Err(error) => {
                self.commit_or_forget(state, &from, changes)?;
                return Err(error.into());
            }
        };
        let own = from.account == state.address.account;
        if own && !state.retired.contains_key(&from) {
            if let Some(devices) = state.own_devices.as_mut() {
                if !devices.contains(&from.device) {
                    // Linked from another of our devices.
                    devices.push(from.device);
                }
            }
        }
        let outcome = if own {
            self.own_copy(state, content, &mut changes)
        } else {
            self.contact_content(state, from, content, &mut changes)
        };
        let (event, receipt) = match outcome {
            Ok(outcome) => outcome,
            Err(error) => return Err(self.forget(state, &from, error)),
        };
        self.commit_or_forget(state, &from, changes)?;
        let mut events = std::mem::take(&mut state.pending_events);
        events.extend(event);
        Ok(Handled { events, receipt })
    }

    /// The store changes for the session with `from` and any prekeys it used.
    fn session_changes(
        &self,
        state: &mut State,
        from: &DeviceAddress,
        used: Option<crate::prekeys::UsedPrekeys>,
    ) -> Result<Vec<Change>, StoreError> {
        let mut changes = Vec::new();
        if let Some(set) = state.sessions.get(from) {
            changes.push(self.store.put(
                Table::Sessions,
                &session_key(from),
                pickle::pickle_session_set(set).map_err(StoreError::Pickle)?,
            ));
        }
        if let Some(used) = used {
            state.prekeys.consume(used);
            changes.push(self.store.put(
                Table::State,
                PREKEYS_KEY,
                pickle::pickle_prekeys(&state.prekeys).map_err(StoreError::Pickle)?,
            ));
            changes.push(self.store.put(
                Table::State,
                SEEN_SETUPS_KEY,
                encode(&state.seen_setups)?,
            ));
        }
        Ok(changes)
    }

    /// Commits; if that fails, memory ran ahead of the disk: forget the session and reload
    /// the prekeys, so the relay's redelivery opens the envelope again from the old state.
    fn commit_or_forget(
        &self,
        state: &mut State,
        from: &DeviceAddress,
        changes: Vec<Change>,
    ) -> Result<(), ClientError> {
        self.store
            .commit(changes)
            .map_err(|error| self.forget(state, from, error))
    }

    /// Memory ran ahead of the disk (a commit, or the encoding of what it would have
    /// written, failed): forget the session and reload the prekeys. Returns `error`.
    fn forget(&self, state: &mut State, from: &DeviceAddress, error: StoreError) -> ClientError {
        state.sessions.remove(from);
        if let Ok(Some(bytes)) = self.store.get(Table::State, PREKEYS_KEY) {
            if let Ok(prekeys) = pickle::unpickle_prekeys(&bytes) {
                state.prekeys = prekeys;
            }
        }
        if let Ok(Some(bytes)) = self.store.get(Table::State, SEEN_SETUPS_KEY) {
            if let Ok(seen) = decode(&bytes) {
                state.seen_setups = seen;
            }
        }
        error.into()
    }

    /// A copy of something we sent from another device.
    fn own_copy(
        &self,
        state: &mut State,
        content: Content,
        changes: &mut Vec<Change>,
    ) -> Result<ContentOutcome, StoreError> {
        let Some(conversation) = content.sent_to.map(AccountId) else {
            return Ok((None, None));
        };
        if let Body::Call(signal) = &content.body {
            return Ok((crate::call::own_call_signal(state, signal), None));
        }
        if let Body::Delete { target } = content.body {
            // We deleted one of our messages for everyone from another device.
            changes.push(
                self.store
                    .delete(Table::Messages, &message_key(conversation, target)),
            );
            return Ok((None, None));
        }
        if !content.body.is_message() {
            return Ok((None, None));
        }
        let message = StoredMessage {
            id: content.id,
            conversation,
            outgoing: true,
            sent_at: content.sent_at,
            expires_at: expiry(content.sent_at, content.expires_in),
            body: content.body,
        };
        changes.push(self.store.put(
            Table::Messages,
            &message_key(conversation, message.id),
            encode(&message)?,
        ));
        Ok((Some(ClientEvent::SentElsewhere { message }), None))
    }

    /// Something a contact sent.
    fn contact_content(
        self: &Arc<Self>,
        state: &mut State,
        from: DeviceAddress,
        content: Content,
        changes: &mut Vec<Change>,
    ) -> Result<ContentOutcome, StoreError> {
        let account = from.account;
        // A device that left still has its last messages read, but is not sent to again.
        let retired = state.retired.contains_key(&from);
        let contact = state
            .contacts
            .entry(account)
            .or_insert_with(|| Contact::new(account));
        let mut contact_changed = false;
        if content.profile_key.is_some() && contact.profile_key != content.profile_key {
            contact.profile_key = content.profile_key;
            contact_changed = true;
        }
        if !retired && !contact.devices.contains(&from.device.0) {
            contact.devices.push(from.device.0);
            contact.devices.sort_unstable();
            contact_changed = true;
        }
        let result = match content.body {
            Body::Call(signal) => (
                self.call_signal(state, account, from.device, content.sent_at, signal),
                None,
            ),
            Body::Receipt { kind, ids } => (
                Some(ClientEvent::Receipt {
                    from: account,
                    kind,
                    ids,
                }),
                None,
            ),
            Body::Typing { started } => (
                Some(ClientEvent::Typing {
                    from: account,
                    started,
                }),
                None,
            ),
            Body::Delete { target } => {
                // Only a message this contact sent us: never ours, never another chat's.
                let key = message_key(account, target);
                let stored = self
                    .store
                    .get(Table::Messages, &key)
                    .ok()
                    .flatten()
                    .and_then(|bytes| decode::<StoredMessage>(&bytes).ok());
                match stored {
                    Some(message) if message.outgoing => (None, None),
                    stored => {
                        if stored.is_some() {
                            changes.push(self.store.delete(Table::Messages, &key));
                        }
                        // Reported even when the message never arrived (retracted in
                        // time), so the app can show that something was deleted.
                        (
                            Some(ClientEvent::Deleted {
                                from: account,
                                id: target,
                            }),
                            None,
                        )
                    }
                }
            }
            Body::Timer { expires_in } => {
                contact.expires_in = expires_in;
                contact_changed = true;
                (
                    Some(ClientEvent::TimerChanged {
                        from: account,
                        expires_in,
                    }),
                    None,
                )
            }
            Body::Text { .. } | Body::Structured { .. }
                if self
                    .store
                    .get(Table::Messages, &message_key(account, content.id))
                    .is_ok_and(|m| m.is_some()) =>
            {
                // A resend of a message we already have.
                (None, None)
            }
            body @ (Body::Text { .. } | Body::Structured { .. }) => {
                let received = now();
                let message = StoredMessage {
                    id: content.id,
                    conversation: account,
                    outgoing: false,
                    sent_at: content.sent_at,
                    // A disappearing message's clock starts when it arrives.
                    expires_at: expiry(received, content.expires_in),
                    body,
                };
                changes.push(self.store.put(
                    Table::Messages,
                    &message_key(account, message.id),
                    encode(&message)?,
                ));
                let receipt = state
                    .settings
                    .delivery_receipts
                    .then_some((account, message.id));
                (
                    Some(ClientEvent::Message {
                        from: account,
                        device: from.device,
                        message,
                    }),
                    receipt,
                )
            }
        };
        if contact_changed {
            if let Some(contact) = state.contacts.get(&account) {
                changes.push(
                    self.store
                        .put(Table::Contacts, &account.0, encode(contact)?),
                );
            }
        }
        Ok(result)
    }

    /// Emits events raised on the app's side (from `send`) without waiting: the app may be
    /// the one that reads them. What does not fit now goes out after the next envelope.
    pub(crate) async fn emit_soon(&self, events: Vec<ClientEvent>) {
        let mut left = Vec::new();
        for event in events {
            if let Err(mpsc::error::TrySendError::Full(event)) = self.events.try_send(event) {
                left.push(event);
            }
        }
        if !left.is_empty() {
            self.state.lock().await.pending_events.extend(left);
        }
    }

    async fn send_receipt(&self, to: AccountId, ids: Vec<MessageId>) -> Result<(), ClientError> {
        let mut state = self.state.lock().await;
        let content = Content::control(
            Body::Receipt {
                kind: ReceiptKind::Delivered,
                ids,
            },
            Some(*state.profile_key),
            None,
        );
        self.send_to_contact(&mut state, to, &content, None).await
    }

    async fn maintain_prekeys(&self, replenish: bool) -> Result<(), ClientError> {
        let mut state = self.state.lock().await;
        let state = &mut *state;
        maintain_prekeys(
            &self.store,
            &self.connection,
            &state.identity,
            &mut state.prekeys,
            now(),
            replenish,
        )
        .await
    }
}

/// Rotates the signed and last-resort prekeys when due, forgets long-rotated ones, adds a
/// batch of one-time prekeys if asked, stores the result, then uploads what is new. The
/// store comes first: a key the relay hands out must never be one we lost.
async fn maintain_prekeys(
    store: &LocalStore,
    connection: &Connection,
    identity: &IdentityKeyPair,
    prekeys: &mut PrekeySet,
    now: u64,
    replenish: bool,
) -> Result<(), ClientError> {
    let mut upload = hush_protocol::UploadPrekeys::default();
    if prekeys.needs_rotation(now) {
        upload = prekeys.rotate(identity, now, &mut OsRng);
    }
    prekeys.forget_rotated(now);
    if replenish {
        let fresh = prekeys.replenish(identity, PREKEY_BATCH, &mut OsRng);
        upload.one_time = fresh.one_time;
        upload.kem_one_time = fresh.kem_one_time;
    }
    if upload == hush_protocol::UploadPrekeys::default() {
        return Ok(());
    }
    store.commit(vec![store.put(
        Table::State,
        PREKEYS_KEY,
        pickle::pickle_prekeys(prekeys).map_err(StoreError::Pickle)?,
    )])?;
    connection.upload_prekeys(upload).await?;
    Ok(())
}

/// Deletes the sessions of devices retired at least [`RETIRED_SESSIONS_SECS`] before `now`:
/// nothing they sent can still be on the relay. Returns the store changes, with the
/// shortened list; none if nothing expired.
fn purge_retired(
    store: &LocalStore,
    retired: &mut BTreeMap<DeviceAddress, u64>,
    sessions: &mut HashMap<DeviceAddress, SessionSet>,
    now: u64,
) -> Result<Vec<Change>, StoreError> {
    let expired: Vec<DeviceAddress> = retired
        .iter()
        .filter(|(_, at)| now.saturating_sub(**at) >= RETIRED_SESSIONS_SECS)
        .map(|(address, _)| *address)
        .collect();
    if expired.is_empty() {
        return Ok(Vec::new());
    }
    let mut changes = Vec::with_capacity(expired.len() + 1);
    for address in expired {
        retired.remove(&address);
        sessions.remove(&address);
        changes.push(store.delete(Table::Sessions, &session_key(&address)));
    }
    changes.push(store.put(Table::State, RETIRED_SESSIONS_KEY, encode(retired)?));
    Ok(changes)
}

/// Records the identity key seen for a contact (trust on first use). Returns whether it
/// replaced a different one: then the sessions with the old identity are dropped and the
/// app must be told, so the user can compare safety numbers again.
fn record_identity(
    store: &LocalStore,
    state: &mut State,
    account: AccountId,
    identity: &[u8],
) -> Result<bool, ClientError> {
    if account == state.address.account {
        return Ok(false);
    }
    let contact = state
        .contacts
        .entry(account)
        .or_insert_with(|| Contact::new(account));
    if contact.identity.as_deref() == Some(identity) {
        return Ok(false);
    }
    let changed = contact.identity.is_some();
    contact.identity = Some(identity.to_vec());
    let mut changes = vec![store.put(Table::Contacts, &account.0, encode(contact)?)];
    if changed {
        let stale: Vec<_> = state
            .sessions
            .keys()
            .filter(|a| a.account == account)
            .copied()
            .collect();
        for address in stale {
            state.sessions.remove(&address);
            changes.push(store.delete(Table::Sessions, &session_key(&address)));
        }
    }
    store.commit(changes)?;
    Ok(changed)
}

/// Reads what the relay pushes, one envelope at a time, and acknowledges each only after
/// it is handled. Acknowledgements, receipts and prekey uploads go to helper tasks: this
/// loop must keep reading, or the relay's answers to those requests would queue behind
/// the envelopes it is not reading.
async fn receive_loop(inner: Arc<Inner>, acks: mpsc::UnboundedSender<EnvelopeId>) {
    let work = inner.work.clone();
    while let Some(event) = inner.connection.next_event().await {
        match event {
            Event::Envelope(envelope) => {
                let handled = match inner.handle(&envelope).await {
                    Ok(handled) => handled,
                    // Already handled (we crashed or lost the connection before the ack).
                    Err(ClientError::Crypto(CryptoError::DuplicateMessage)) => Handled {
                        events: Vec::new(),
                        receipt: None,
                    },
                    Err(ClientError::Crypto(error)) => Handled {
                        events: vec![ClientEvent::Undecryptable { error }],
                        receipt: None,
                    },
                    Err(error) => {
                        // Local trouble (the store): leave the envelope on the relay; it
                        // comes again on the next connection.
                        tracing::warn!(%error, "could not handle an envelope");
                        continue;
                    }
                };
                for event in handled.events {
                    if inner.events.send(event).await.is_err() {
                        return;
                    }
                }
                let _ = acks.send(envelope.id);
                if let Some((to, id)) = handled.receipt {
                    let _ = work.send(Work::Receipt(to, id));
                }
            }
            // Low on one-time keys: a new batch. Drained (once per connection): rotation.
            Event::LowPrekeys { .. } => {
                let _ = work.send(Work::Prekeys { replenish: true });
            }
            Event::Drained => {
                let _ = work.send(Work::Prekeys { replenish: false });
            }
            // Calls on the Client handle are a later issue; the transport `Connection`
            // carries them today.
            Event::CallEnded { allocation, cause } => {
                let mut state = inner.state.lock().await;
                let event = inner.allocation_ended(&mut state, allocation, cause);
                drop(state);
                if let Some(event) = event {
                    if inner.events.send(event).await.is_err() {
                        return;
                    }
                }
            }
            Event::Provisioning(_) => {}
            Event::Closed(code) => {
                let _ = inner.events.send(ClientEvent::Disconnected(code)).await;
                return;
            }
        }
    }
}

/// Hands media datagrams to their calls.
async fn media_loop(inner: Arc<Inner>) {
    while let Some((allocation, sealed)) = inner.connection.next_media().await {
        inner.media_arrived(allocation, &sealed);
    }
}

/// Acknowledges handled envelopes, batching whatever is ready into one request.
async fn ack_loop(inner: Arc<Inner>, mut queue: mpsc::UnboundedReceiver<EnvelopeId>) {
    while let Some(first) = queue.recv().await {
        let mut ids = vec![first];
        while ids.len() < hush_protocol::limits::MAX_ACKS_PER_FRAME {
            match queue.try_recv() {
                Ok(id) => ids.push(id),
                Err(_) => break,
            }
        }
        // A failed ack only means the relay delivers the envelope again, and the ratchet
        // then refuses it as a duplicate.
        if let Err(error) = inner.connection.ack(&ids).await {
            tracing::debug!(%error, "ack not sent");
        }
    }
}

/// Delivery receipts, copies for our own devices, and prekey maintenance. Receipts and
/// copies wait a random moment (up to a second) and receipts go out in one message per
/// contact, so their timing says less about the message that caused them.
async fn work_loop(inner: Arc<Inner>, mut queue: mpsc::UnboundedReceiver<Work>) {
    while let Some(first) = queue.recv().await {
        let mut receipts: HashMap<AccountId, Vec<MessageId>> = HashMap::new();
        let mut copies = Vec::new();
        let mut next = Some(first);
        let mut delayed = false;
        while let Some(work) = next.take() {
            if !delayed && matches!(work, Work::Receipt(..) | Work::OwnCopy(_)) {
                delayed = true;
                let jitter = u64::from(random::<1>()[0]) * 1000 / 255;
                tokio::time::sleep(std::time::Duration::from_millis(jitter)).await;
            }
            match work {
                Work::Receipt(to, id) => receipts.entry(to).or_default().push(id),
                Work::OwnCopy(content) => copies.push(content),
                Work::CallSignal(to, signal) => {
                    let mut state = inner.state.lock().await;
                    if let Err(error) = inner.send_signal(&mut state, to, signal).await {
                        tracing::debug!(%error, "call signal not sent");
                    }
                }
                Work::EndCall(allocation, outcome) => {
                    if let Err(error) = inner.connection.end_call(allocation, outcome).await {
                        tracing::debug!(%error, "call end not sent");
                    }
                }
                Work::Prekeys { replenish } => {
                    if let Err(error) = inner.maintain_prekeys(replenish).await {
                        tracing::warn!(%error, "could not upload prekeys");
                    }
                }
            }
            next = queue.try_recv().ok();
        }
        for content in copies {
            let mut state = inner.state.lock().await;
            if let Err(error) = inner.send_to_own_devices(&mut state, &content).await {
                tracing::debug!(%error, "copy to own devices not sent");
            }
        }
        for (to, ids) in receipts {
            if let Err(error) = inner.send_receipt(to, ids).await {
                tracing::debug!(%error, "delivery receipt not sent");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_identity_is_reported_and_drops_its_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), &StorageKey::from_bytes([1; 32])).unwrap();
        let mut state = State {
            identity: IdentityKeyPair::generate(),
            address: DeviceAddress {
                account: AccountId([1; 16]),
                device: DeviceId(1),
            },
            profile_key: Zeroizing::new([0; 32]),
            prekeys: PrekeySet::default(),
            sessions: HashMap::new(),
            contacts: HashMap::new(),
            settings: Settings::default(),
            certificate: None,
            relay_key: [0; 32],
            pending_events: Vec::new(),
            seen_setups: BTreeMap::new(),
            own_devices: None,
            retired: BTreeMap::new(),
            calls: HashMap::new(),
        };
        let bob = AccountId([2; 16]);
        let first = IdentityKeyPair::generate().public().to_bytes();
        let second = IdentityKeyPair::generate().public().to_bytes();
        // First sight: recorded, not a change.
        assert!(!record_identity(&store, &mut state, bob, &first).unwrap());
        assert!(!record_identity(&store, &mut state, bob, &first).unwrap());

        // A session with Bob's device, as if set up under the first identity.
        let mut bob_prekeys = PrekeySet::default();
        let bob_identity = IdentityKeyPair::generate();
        let upload = bob_prekeys.rotate(&bob_identity, 0, &mut OsRng);
        let bundle = hush_protocol::DeviceBundle {
            device: DeviceId(1),
            device_key: [0; 32],
            signed_prekey: upload.signed_prekey,
            one_time: None,
            kem: upload.kem_last_resort,
            kem_is_last_resort: true,
        };
        let peer = PeerBundle::verify(&bob_identity.public().to_bytes(), &bundle).unwrap();
        let session = Session::initiate(&state.identity, &peer, &mut OsRng).unwrap();
        let address = DeviceAddress {
            account: bob,
            device: DeviceId(1),
        };
        state.sessions.insert(address, SessionSet::new(session));

        assert!(record_identity(&store, &mut state, bob, &second).unwrap());
        assert!(state.sessions.is_empty());
        let stored: Contact =
            decode(&store.get(Table::Contacts, &bob.0).unwrap().unwrap()).unwrap();
        assert_eq!(stored.identity.as_deref(), Some(&second[..]));
        // Our own account is never a contact.
        let own = state.address.account;
        assert!(!record_identity(&store, &mut state, own, &second).unwrap());
    }

    /// A departed device's session is kept as long as something it sent may still arrive,
    /// then deleted from memory and store.
    #[test]
    fn retired_sessions_are_purged_only_once_nothing_of_theirs_can_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), &StorageKey::from_bytes([1; 32])).unwrap();
        let identity = IdentityKeyPair::generate();
        let mut prekeys = PrekeySet::default();
        let upload = prekeys.rotate(&identity, 0, &mut OsRng);
        let bundle = hush_protocol::DeviceBundle {
            device: DeviceId(2),
            device_key: [0; 32],
            signed_prekey: upload.signed_prekey,
            one_time: None,
            kem: upload.kem_last_resort,
            kem_is_last_resort: true,
        };
        let peer = PeerBundle::verify(&identity.public().to_bytes(), &bundle).unwrap();
        let set = SessionSet::new(Session::initiate(&identity, &peer, &mut OsRng).unwrap());
        let address = DeviceAddress {
            account: AccountId([2; 16]),
            device: DeviceId(2),
        };
        store
            .commit(vec![store.put(
                Table::Sessions,
                &session_key(&address),
                pickle::pickle_session_set(&set).unwrap(),
            )])
            .unwrap();
        let mut sessions = HashMap::from([(address, set)]);
        let mut retired = BTreeMap::from([(address, 1000)]);

        let almost = 1000 + RETIRED_SESSIONS_SECS - 1;
        assert!(purge_retired(&store, &mut retired, &mut sessions, almost)
            .unwrap()
            .is_empty());
        assert!(sessions.contains_key(&address));

        let changes = purge_retired(&store, &mut retired, &mut sessions, almost + 1).unwrap();
        store.commit(changes).unwrap();
        assert!(retired.is_empty());
        assert!(sessions.is_empty());
        assert!(store
            .get(Table::Sessions, &session_key(&address))
            .unwrap()
            .is_none());
        let stored: BTreeMap<DeviceAddress, u64> = decode(
            &store
                .get(Table::State, RETIRED_SESSIONS_KEY)
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        assert!(stored.is_empty());
    }
}
