//! The receive path: from pushed envelopes to stored messages, events and acks.
//!
//! The receive loop takes every envelope that has arrived (up to [`RECEIVE_BATCH`]),
//! opens them all under one short hold of the state lock, submits what they changed as
//! one batch, and once that batch is durable emits their events and acknowledges them. An
//! envelope is acknowledged to the relay only after the session state that opened it and
//! the message it carried are on disk; a crash before means the relay delivers it again
//! and the old session state opens it again. Under load, envelopes arrive while a commit
//! is under way and the next batch is larger: one fsync for many messages.

use std::collections::HashSet;
use std::sync::Arc;

use hush_protocol::{AccountId, DeviceAddress, EnvelopeId};
use rand_core::OsRng;
use tokio::sync::mpsc;

use super::calls::own_call_signal;
use super::commit::Durability;
use super::state::{encode, expiry, message_key, Contact, Inner, State, Work, SEEN_SETUPS_SECS};
use super::{ClientError, ClientEvent, StoredMessage};
use crate::connection::{Envelope, Event};
use crate::content::{Body, Content, MessageId};
use crate::error::CryptoError;
use crate::message::CiphertextMessage;
use crate::sealed;
use crate::session::{Session, SessionSet};
use crate::store::Table;

/// Envelopes opened under one hold of the lock and committed together at most.
const RECEIVE_BATCH: usize = 256;

/// What handling one envelope produced.
struct Handled {
    /// For the app, in order.
    events: Vec<ClientEvent>,
    /// A delivery receipt owed to this contact for this message.
    receipt: Option<(AccountId, MessageId)>,
}

/// Whether the connection closed during the batch.
#[derive(Default)]
enum Closed {
    #[default]
    Open,
    With(Option<hush_protocol::ErrorCode>),
}

/// What an envelope's content asks of the app: an event, and a delivery receipt owed.
type Outcome = (Option<ClientEvent>, Option<(AccountId, MessageId)>);

/// What one batch of pushed events produced, to act on once its commit is durable.
#[derive(Default)]
struct Batch {
    /// Events in the order of what caused them, each marked whether it may be emitted
    /// only if the batch's commit succeeds (what an envelope said) or regardless (a call
    /// the relay ended, events raised elsewhere).
    events: Vec<(ClientEvent, Needs)>,
    acks: Vec<EnvelopeId>,
    receipts: Vec<(AccountId, MessageId)>,
    /// The connection closed (with the relay's code, if it gave one).
    closed: Closed,
    /// An envelope failed for a local reason after it moved the state: the batch is not
    /// committed, and memory goes back to the store.
    local_failure: bool,
}

/// Whether an event waits for its batch's commit.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Needs {
    Commit,
    Nothing,
}

/// Reads what the relay pushes and handles it in batches. Acknowledgements, receipts and
/// prekey uploads go to helper tasks: this loop must keep reading, or the relay's answers
/// to those requests would queue behind the envelopes it is not reading.
pub(super) async fn receive_loop(inner: Arc<Inner>, acks: mpsc::UnboundedSender<EnvelopeId>) {
    while let Some(first) = inner.connection.next_event().await {
        let mut events = vec![first];
        while events.len() < RECEIVE_BATCH {
            match inner.connection.try_next_event() {
                Some(event) => events.push(event),
                None => break,
            }
        }
        let (batch, ticket, calls_before) = {
            let mut state = inner.lock();
            // Calls are not stored: if the batch fails, the call table goes back to this,
            // so the redelivered signals find it as they first did.
            let calls_before = state.calls.clone();
            let batch = inner.handle_batch(&mut state, events);
            let ticket = if batch.local_failure {
                Err(ClientError::Store(crate::store::StoreError::Interrupted))
            } else {
                inner.submit(&mut state, Vec::new(), Durability::Immediate)
            };
            (batch, ticket, calls_before)
        };
        let committed = if batch.local_failure {
            inner.recover().await;
            false
        } else {
            inner.committed(ticket).await.is_ok()
        };
        if !committed {
            // Local trouble (the store): the envelopes stay on the relay and come again
            // on the next connection, to the old session state.
            tracing::warn!("could not store a batch of envelopes");
            let mut state = inner.lock();
            for (allocation, call_id) in state
                .calls
                .iter()
                .filter(|(id, _)| !calls_before.contains_key(*id))
                .map(|(id, call)| (call.allocation, *id))
                .collect::<Vec<_>>()
            {
                inner.drop_media(allocation, &call_id);
            }
            state.calls = calls_before;
        }
        for (event, needs) in batch.events {
            if (committed || needs == Needs::Nothing) && inner.events.send(event).await.is_err() {
                return;
            }
        }
        // Acknowledged once stored and handed to the app: an app that stops reading
        // stops the acks, and the relay holds the rest.
        if committed {
            for id in batch.acks {
                let _ = acks.send(id);
            }
            for (to, id) in batch.receipts {
                let _ = inner.work.send(Work::Receipt(to, id));
            }
        }
        if let Closed::With(code) = batch.closed {
            let _ = inner.events.send(ClientEvent::Disconnected(code)).await;
            return;
        }
    }
}

impl Inner {
    /// Handles pushed events in order under the lock.
    fn handle_batch(self: &Arc<Self>, state: &mut State, events: Vec<Event>) -> Batch {
        let mut batch = Batch::default();
        // Events raised elsewhere (a send's identity change, what did not fit the app's
        // channel) go first and do not wait for this batch.
        batch.events.extend(
            std::mem::take(&mut state.pending_events)
                .into_iter()
                .map(|event| (event, Needs::Nothing)),
        );
        let mut stored_now = HashSet::new();
        for event in events {
            match event {
                Event::Envelope(envelope) => {
                    let unsealed = match self.unseal(state, &envelope) {
                        Ok(unsealed) => unsealed,
                        // Already handled (we crashed or lost the connection before the
                        // ack).
                        Err(ClientError::Crypto(CryptoError::DuplicateMessage)) => {
                            batch.acks.push(envelope.id);
                            continue;
                        }
                        Err(ClientError::Crypto(error)) => {
                            batch
                                .events
                                .push((ClientEvent::Undecryptable { error }, Needs::Commit));
                            batch.acks.push(envelope.id);
                            continue;
                        }
                        Err(error) => {
                            // Nothing moved yet (a session did not load): only this envelope
                            // stays on the relay, for the next connection.
                            tracing::warn!(%error, "could not handle an envelope");
                            continue;
                        }
                    };
                    match self.handle(state, &unsealed, &mut stored_now) {
                        Ok(handled) => {
                            // What the envelope raised on the way (an identity change)
                            // comes before what it says.
                            let raised = std::mem::take(&mut state.pending_events);
                            batch.events.extend(
                                raised
                                    .into_iter()
                                    .chain(handled.events)
                                    .map(|event| (event, Needs::Commit)),
                            );
                            batch.receipts.extend(handled.receipt);
                            batch.acks.push(envelope.id);
                        }
                        Err(ClientError::Crypto(CryptoError::DuplicateMessage)) => {
                            batch.acks.push(envelope.id);
                        }
                        Err(ClientError::Crypto(error)) => {
                            batch
                                .events
                                .push((ClientEvent::Undecryptable { error }, Needs::Commit));
                            batch.acks.push(envelope.id);
                        }
                        Err(error) => {
                            tracing::warn!(%error, "could not handle an envelope");
                            batch.local_failure = true;
                        }
                    }
                }
                // Low on one-time keys: a new batch. Drained (once per connection):
                // rotation.
                Event::LowPrekeys { .. } => {
                    let _ = self.work.send(Work::Prekeys { replenish: true });
                }
                Event::Drained => {
                    let _ = self.work.send(Work::Prekeys { replenish: false });
                }
                Event::CallEnded { allocation, cause } => {
                    if let Some(event) = self.allocation_ended(state, allocation, cause) {
                        batch.events.push((event, Needs::Nothing));
                    }
                }
                Event::Provisioning(_) => {}
                Event::Closed(code) => batch.closed = Closed::With(code),
            }
        }
        // Raised by an envelope that then failed: told all the same.
        batch.events.extend(
            std::mem::take(&mut state.pending_events)
                .into_iter()
                .map(|event| (event, Needs::Nothing)),
        );
        batch
    }

    /// Opens the sealed layer of an envelope and loads the session with its sender.
    /// Changes nothing but the session cache: an error here leaves the state as it was.
    fn unseal(
        &self,
        state: &mut State,
        envelope: &Envelope,
    ) -> Result<sealed::Unsealed, ClientError> {
        // The certificate must have been valid when the relay took the envelope, not now:
        // a device that was offline for a day still gets what waited for it.
        let unsealed = sealed::open_cached(
            &mut state.seal_cache,
            &state.identity,
            state.address.device.0,
            &state.relay_key,
            &envelope.payload,
            envelope.received_at,
        )?;
        if unsealed.sender.account == state.address.account
            && unsealed.sender_identity != *state.identity.public()
        {
            return Err(CryptoError::UntrustedIdentity.into());
        }
        let from = DeviceAddress {
            account: unsealed.sender.account,
            device: unsealed.sender.device,
        };
        state.load_session(&self.store, from)?;
        Ok(unsealed)
    }

    /// Decrypts an unsealed envelope and applies it to the state. Returns the events to
    /// emit and, for a message, who should get a delivery receipt. `stored_now` holds the
    /// messages this batch stores, which the store does not show until it is committed.
    fn handle(
        self: &Arc<Self>,
        state: &mut State,
        unsealed: &sealed::Unsealed,
        stored_now: &mut HashSet<[u8; 32]>,
    ) -> Result<Handled, ClientError> {
        let now = self.now();
        let from = DeviceAddress {
            account: unsealed.sender.account,
            device: unsealed.sender.device,
        };
        let message = CiphertextMessage::from_bytes(&unsealed.message)?;
        let identity = unsealed.sender_identity.to_bytes();
        let plaintext = match &message {
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
                state.seen_setups_changed();
                state.prekeys.consume(used);
                state.prekeys_changed();
                state.note_identity(&self.store, from.account, &identity);
                match state.sessions.get_mut(&from) {
                    Some(set) => set.promote_new(session),
                    None => {
                        state.sessions.insert(from, SessionSet::new(session));
                    }
                }
                plaintext
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
                set.decrypt(&message, now, &mut OsRng)?
            }
        };
        // The ratchet moved (and prekeys may be used up): that is stored with whatever the
        // content turns out to be, in the batch's one commit.
        state.session_changed(from);
        let content = Content::decode(&plaintext)?;
        let own = from.account == state.address.account;
        if own && !state.retired.contains_key(&from) {
            if let Some(devices) = state.own_devices.as_mut() {
                if !devices.contains(&from.device) {
                    // Linked from another of our devices.
                    devices.push(from.device);
                }
            }
        }
        let (event, receipt) = if own {
            self.own_copy(state, content, stored_now)?
        } else {
            self.contact_content(state, from, content, stored_now)?
        };
        Ok(Handled {
            events: event.into_iter().collect(),
            receipt,
        })
    }

    /// A copy of something we sent from another device.
    fn own_copy(
        &self,
        state: &mut State,
        content: Content,
        stored_now: &mut HashSet<[u8; 32]>,
    ) -> Result<Outcome, ClientError> {
        let Some(conversation) = content.sent_to.map(AccountId) else {
            return Ok((None, None));
        };
        if let Body::Call(signal) = &content.body {
            return Ok((own_call_signal(state, signal), None));
        }
        if let Body::Delete { target } = content.body {
            // We deleted one of our messages for everyone from another device.
            state.write(
                self.store
                    .delete(Table::Messages, &message_key(conversation, target)),
            );
            return Ok((None, None));
        }
        if !content.body.is_message() {
            return Ok((None, None));
        }
        let key = message_key(conversation, content.id);
        if stored_now.contains(&key)
            || self
                .store
                .get(Table::Messages, &key)
                .is_ok_and(|m| m.is_some())
        {
            // A copy sent again (the sending device resent it after a crash).
            return Ok((None, None));
        }
        stored_now.insert(key);
        let message = StoredMessage {
            id: content.id,
            conversation,
            outgoing: true,
            sent_at: content.sent_at,
            expires_at: expiry(content.sent_at, content.expires_in),
            body: content.body,
        };
        state.write(self.store.put(Table::Messages, &key, encode(&message)?));
        Ok((Some(ClientEvent::SentElsewhere { message }), None))
    }

    /// Something a contact sent.
    fn contact_content(
        self: &Arc<Self>,
        state: &mut State,
        from: DeviceAddress,
        content: Content,
        stored_now: &mut HashSet<[u8; 32]>,
    ) -> Result<Outcome, ClientError> {
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
                    .and_then(|bytes| super::state::decode::<StoredMessage>(&bytes).ok());
                match stored {
                    Some(message) if message.outgoing => (None, None),
                    None if state.sent_unrecorded.contains(&key) => (None, None),
                    stored => {
                        if stored.is_some() || stored_now.contains(&key) {
                            state.write(self.store.delete(Table::Messages, &key));
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
                if stored_now.contains(&message_key(account, content.id))
                    || self
                        .store
                        .get(Table::Messages, &message_key(account, content.id))
                        .is_ok_and(|m| m.is_some()) =>
            {
                // A resend of a message we already have.
                (None, None)
            }
            body @ (Body::Text { .. } | Body::Structured { .. }) => {
                let received = self.now();
                let message = StoredMessage {
                    id: content.id,
                    conversation: account,
                    outgoing: false,
                    sent_at: content.sent_at,
                    // A disappearing message's clock starts when it arrives.
                    expires_at: expiry(received, content.expires_in),
                    body,
                };
                let key = message_key(account, message.id);
                state.write(self.store.put(Table::Messages, &key, encode(&message)?));
                stored_now.insert(key);
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
            state.contact_changed(account);
        }
        Ok(result)
    }
}
