//! The send path: from a message to sealed envelopes on the relay.
//!
//! Each send takes the state lock three short times and never across a round trip: to
//! see what it lacks (sessions, the device list, a sender certificate), which it then
//! fetches unlocked; to encrypt for every device and submit the moved ratchets (with the
//! outbox entry) to the committer; and, once the relay has the envelopes, to note the
//! device list it confirmed. Between them it waits for the commit and for the relay, while
//! other sends and the receive path use the state.
//!
//! Crash safety: nothing leaves the device before the ratchet state that encrypted it is
//! durable (a crash cannot make us reuse a message key), and a message stays in the
//! outbox until the relay has taken it; what records it as sent may be lost in a crash,
//! and then it is sent again, which the recipient drops as a duplicate.

use hush_protocol::sealed::{retract_tag, SealedEnvelope, SenderCertificate};
use hush_protocol::{AccountId, DeviceAddress, DeviceId, ErrorCode, OutgoingEnvelope};
use rand_core::OsRng;
use zeroize::Zeroizing;

use super::commit::Durability;
use super::state::{
    delivery_token, encode, expiry, message_key, Inner, PendingMessage, State, Work,
};
use super::{ClientError, StoredMessage};
use crate::content::{Body, Content, MessageId, ReceiptKind};
use crate::error::{ConnectionError, CryptoError};
use crate::keys::{IdentityKey, IdentityKeyPair};
use crate::pqxdh::PeerBundle;
use crate::session::{Session, SessionSet};
use crate::store::{Change, Table};
use crate::{kdf, sealed};

/// Refresh the sender certificate when less than this is left of it.
const CERTIFICATE_MARGIN_SECS: u64 = 3600;
/// Tries of a send whose recipient's device list changed under it.
const DEVICE_LIST_TRIES: usize = 3;

/// A relay refusal of an anonymous request, in the client's terms.
pub(super) fn refusal(error: ConnectionError) -> ClientError {
    match error {
        ConnectionError::Refused(ErrorCode::DeliveryRefused) => ClientError::NotAccepted,
        other => other.into(),
    }
}

/// The secret whose hash tags every copy of message `id` on the relay. Derived from the
/// identity (shared by our devices) so any of them can retract it.
pub(super) fn retract_secret(identity: &IdentityKeyPair, id: &MessageId) -> Zeroizing<[u8; 32]> {
    kdf::hkdf::<32>(
        &id.0,
        identity.to_secret_bytes().as_ref(),
        b"hush-retract-secret-v1",
    )
}

impl Inner {
    /// The sender certificate, refreshed when it is about to expire.
    async fn certificate(&self) -> Result<SenderCertificate, ClientError> {
        let now = self.now();
        if let Some((certificate, expires)) = &self.lock().certificate {
            if *expires > now + CERTIFICATE_MARGIN_SECS {
                return Ok(certificate.clone());
            }
        }
        let (certificate, relay_key) = self.connection.sender_certificate().await?;
        let expires = certificate
            .verify(&relay_key, now)
            .map_or(0, |b| b.expires_at);
        let mut state = self.lock();
        state.certificate = Some((certificate.clone(), expires));
        state.relay_key = relay_key;
        Ok(certificate)
    }

    /// Makes sure we hold a session with each of `devices` of `account`, fetching prekey
    /// bundles for the missing ones (unlocked). Raises `IdentityChanged` if the account's
    /// identity is not the one we knew. Two sends that both miss a session fetch a bundle
    /// each; the first session set up is the one both use.
    async fn ensure_sessions(
        &self,
        account: AccountId,
        devices: &[DeviceId],
    ) -> Result<(), ClientError> {
        let (missing, own, access) = {
            let mut state = self.lock();
            let mut missing = Vec::new();
            for &device in devices {
                let address = DeviceAddress { account, device };
                if state.load_session(&self.store, address)?.is_none() {
                    missing.push(device);
                }
            }
            let own = account == state.address.account;
            (missing, own, state.contact_token(account))
        };
        for device in missing {
            let bundles = if own {
                self.connection.fetch_prekeys(account, Some(device)).await?
            } else {
                // Anonymously, with the contact's token: the relay must not see who is
                // about to write to whom.
                self.anonymous
                    .fetch_prekeys_with(account, Some(device), access)
                    .await
                    .map_err(refusal)?
            };
            let Some(bundle) = bundles.devices.iter().find(|b| b.device == device) else {
                continue;
            };
            let peer = PeerBundle::verify(&bundles.identity_key, bundle)?;
            let mut state = self.lock();
            // Our own devices share our identity; anything else is an impostor the relay
            // slipped in.
            if own && peer.identity() != state.identity.public() {
                return Err(CryptoError::UntrustedIdentity.into());
            }
            state.note_identity(&self.store, account, &peer.identity().to_bytes());
            let address = DeviceAddress { account, device };
            if !state.sessions.contains_key(&address) {
                let session = Session::initiate(&state.identity, &peer, &mut OsRng)?;
                state.sessions.insert(address, SessionSet::new(session));
                state.session_changed(address);
            }
        }
        Ok(())
    }

    /// Sends a pending message to its contact, then records it as sent (dropping it from
    /// the outbox), then has the worker copy it to our other devices. `outbox` is the
    /// message's outbox entry when it is not stored yet: it goes in the same commit as
    /// the ratchets that encrypt it, or is stored on its own if the send fails for a
    /// reason worth a retry (the relay, the disk). While it is under way, `retry_pending`
    /// leaves it alone.
    pub(super) async fn deliver(
        &self,
        pending: &PendingMessage,
        mut outbox: Option<Change>,
    ) -> Result<(), ClientError> {
        let to = AccountId(pending.to);
        let content = &pending.content;
        let new = outbox.is_some();
        let retract = {
            let mut state = self.lock();
            if !state.sending.insert(content.id) {
                // Already under way (a `retry_pending` beside the `send` that queued it).
                return Ok(());
            }
            retract_secret(&state.identity, &content.id)
        };
        let sent = self
            .send_to_contact(to, content, Some(retract_tag(&retract)), &mut outbox)
            .await;
        self.lock().sending.remove(&content.id);
        if let Err(error) = sent {
            if new && matches!(error, ClientError::Connection(_) | ClientError::Store(_)) {
                // Not sent: kept for `retry_pending`. The entry may have gone down with a
                // failed commit; written again it is the same row.
                let entry = self
                    .store
                    .put(Table::Outbox, &content.id.0, encode(pending)?);
                self.commit_now(vec![entry]).await?;
            }
            return Err(error);
        }
        {
            // Recorded as sent with the next commit, whatever it is (the next send's, the
            // next received batch's; reads of the store flush first): a crash before that
            // resends it once, and the recipient drops the duplicate id.
            let mut state = self.lock();
            state.write(self.store.delete(Table::Outbox, &content.id.0));
            if content.body.is_message() {
                let message = StoredMessage {
                    id: content.id,
                    conversation: to,
                    outgoing: true,
                    sent_at: content.sent_at,
                    expires_at: expiry(content.sent_at, content.expires_in),
                    body: content.body.clone(),
                };
                let key = message_key(to, content.id);
                state.write(self.store.put(Table::Messages, &key, encode(&message)?));
                state.sent_unrecorded.insert(key);
            }
            if let Body::Timer { expires_in } = content.body {
                if let Some(contact) = state.contacts.get_mut(&to) {
                    contact.expires_in = expires_in;
                    state.contact_changed(to);
                }
            }
        }
        let copy = Content {
            sent_to: Some(to.0),
            ..content.clone()
        };
        // The copy for our other devices goes out a moment later from the worker, so the
        // relay does not see an authenticated send right on the heels of every sealed one.
        let _ = self.work.send(Work::OwnCopy(Box::new(copy)));
        Ok(())
    }

    /// Encrypts `content` for every device of `to` and sends it sealed. `with` joins the
    /// commit of the ratchets (taken from the option once it does).
    pub(crate) async fn send_to_contact(
        &self,
        to: AccountId,
        content: &Content,
        retract: Option<[u8; 32]>,
        with: &mut Option<Change>,
    ) -> Result<(), ClientError> {
        let (access, mut devices) = {
            let state = self.lock();
            let contact = state.contacts.get(&to).ok_or(ClientError::UnknownContact)?;
            (
                contact.profile_key.as_ref().map(delivery_token),
                contact
                    .devices
                    .iter()
                    .copied()
                    .map(DeviceId)
                    .collect::<Vec<_>>(),
            )
        };
        let plaintext = content.encode()?;
        for _attempt in 0..DEVICE_LIST_TRIES {
            if devices.is_empty() {
                devices = self
                    .anonymous
                    .list_devices_with(to, access)
                    .await
                    .map_err(refusal)?;
            }
            self.ensure_sessions(to, &devices).await?;
            let certificate = self.certificate().await?;
            let (envelopes, ticket) = {
                let mut state = self.lock();
                let identity = state
                    .contacts
                    .get(&to)
                    .and_then(|c| c.identity.clone())
                    .ok_or(ClientError::UnknownContact)?;
                let recipient_identity = state.seal_cache.identity(&identity)?;
                let addresses: Vec<DeviceAddress> = devices
                    .iter()
                    .map(|&device| DeviceAddress {
                        account: to,
                        device,
                    })
                    .collect();
                if !addresses.iter().all(|a| state.sessions.contains_key(a)) {
                    // A session went between `ensure_sessions` and now (an identity
                    // change, a failed commit): set it up again rather than send to fewer
                    // devices.
                    continue;
                }
                let mut envelopes = Vec::with_capacity(devices.len());
                for address in addresses {
                    let Some(payload) = encrypt_for(
                        &mut state,
                        address,
                        &recipient_identity,
                        &certificate,
                        &plaintext,
                    )?
                    else {
                        continue;
                    };
                    envelopes.push(SealedEnvelope {
                        account: to,
                        devices: vec![address.device],
                        access,
                        retract_tag: retract,
                        payload,
                    });
                }
                if envelopes.len() != devices.len() {
                    continue;
                }
                let extra = with.take().into_iter().collect();
                (
                    envelopes,
                    self.submit(&mut state, extra, Durability::Immediate),
                )
            };
            // The ratchet moved: that is durable before anything leaves the device.
            self.committed(ticket).await?;
            match self.anonymous.sealed_send(envelopes).await {
                Ok(()) => {
                    let mut state = self.lock();
                    let list: Vec<u32> = devices.iter().map(|d| d.0).collect();
                    if let Some(contact) = state.contacts.get_mut(&to) {
                        if contact.devices != list {
                            contact.devices = list;
                            state.contact_changed(to);
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
                    let now = self.now();
                    let mut state = self.lock();
                    let stale: Vec<_> = state
                        .sessions
                        .keys()
                        .filter(|a| a.account == to && !devices.contains(&a.device))
                        .copied()
                        .collect();
                    state.retire_sessions(&self.store, &stale, now);
                }
                Err(error) => return Err(refusal(error)),
            }
        }
        Err(ClientError::DeviceListUnstable)
    }

    /// Sends a copy of `content` to this account's other devices (authenticated: the relay
    /// knows we talk to ourselves anyway).
    pub(crate) async fn send_to_own_devices(&self, content: &Content) -> Result<(), ClientError> {
        let (own, known) = {
            let state = self.lock();
            (state.address, state.own_devices.clone())
        };
        for attempt in 0..2 {
            let devices = match &known {
                Some(devices) if attempt == 0 => devices.clone(),
                _ => {
                    let devices: Vec<DeviceId> = self
                        .connection
                        .list_devices(own.account)
                        .await?
                        .into_iter()
                        .filter(|d| *d != own.device)
                        .collect();
                    self.lock().own_devices = Some(devices.clone());
                    devices
                }
            };
            if devices.is_empty() {
                return Ok(());
            }
            self.ensure_sessions(own.account, &devices).await?;
            let certificate = self.certificate().await?;
            let plaintext = content.encode()?;
            let (envelopes, ticket) = {
                let mut state = self.lock();
                let identity = *state.identity.public();
                let mut envelopes = Vec::new();
                for device in devices {
                    let address = DeviceAddress {
                        account: own.account,
                        device,
                    };
                    let Some(payload) =
                        encrypt_for(&mut state, address, &identity, &certificate, &plaintext)?
                    else {
                        continue;
                    };
                    envelopes.push(OutgoingEnvelope {
                        recipients: vec![address],
                        payload,
                        retract_tag: None,
                    });
                }
                (
                    envelopes,
                    self.submit(&mut state, Vec::new(), Durability::Immediate),
                )
            };
            self.committed(ticket).await?;
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

    /// A delivery receipt for `ids`, sealed to the contact.
    pub(super) async fn send_receipt(
        &self,
        to: AccountId,
        ids: Vec<MessageId>,
    ) -> Result<(), ClientError> {
        let content = {
            let state = self.lock();
            Content::control(
                Body::Receipt {
                    kind: ReceiptKind::Delivered,
                    ids,
                },
                Some(*state.profile_key),
                None,
                self.now(),
            )
        };
        self.send_to_contact(to, &content, None, &mut None).await
    }
}

/// Encrypts `plaintext` with the current session for `address` and seals it; the session
/// is marked for the next batch. `None` when there is no session.
fn encrypt_for(
    state: &mut State,
    address: DeviceAddress,
    recipient_identity: &IdentityKey,
    certificate: &SenderCertificate,
    plaintext: &[u8],
) -> Result<Option<Vec<u8>>, ClientError> {
    let Some(set) = state.sessions.get_mut(&address) else {
        return Ok(None);
    };
    let Some(session) = set.current_mut() else {
        return Ok(None);
    };
    let message = session.encrypt(plaintext)?.to_bytes();
    state.session_changed(address);
    let payload = sealed::seal_cached(
        &mut state.seal_cache,
        &state.identity,
        certificate,
        recipient_identity,
        address.device.0,
        &message,
        &mut OsRng,
    )?;
    Ok(Some(payload))
}
