//! Envelopes: sends (every recipient known, every mailbox under its quota, all or
//! nothing), sealed sends (delivery access, then the exact device list), acks, retraction
//! and expiry.
//!
//! This is the commit thread's hot path: per envelope copy it computes at most one tag,
//! seals into one allocation and hands the backend one append; per batch it keys the
//! mailboxes it touches in one map.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use hush_protocol::{AccountId, DeviceAddress, EnvelopeId, OutgoingEnvelope, SealedEnvelope};

use super::{decide, Rules, EXPIRE_BATCH};
use crate::store::at_rest::{expiry_day, seal_envelope};
use crate::store::backend::Transaction;
use crate::store::records::AccountRecord;
use crate::store::{FreshEnvelope, MailboxQuota, Outcome, Refusal, StoreError, WriteResult};

impl Rules {
    /// Checks each sealed envelope's access, and that the envelopes to each account cover
    /// its device list exactly (pairwise ciphertexts are one envelope per device; a group
    /// ciphertext may name several), then enqueues them all through the same path as an
    /// authenticated send.
    pub(super) fn sealed_enqueue<T: Transaction>(
        &self,
        t: &mut T,
        envelopes: Vec<SealedEnvelope>,
        quota: MailboxQuota,
        received_at: u64,
        expires_at: u64,
    ) -> Result<WriteResult, StoreError> {
        let mut requested: HashMap<AccountId, (Arc<AccountRecord>, Vec<u32>)> = HashMap::new();
        for envelope in &envelopes {
            let entry = match requested.entry(envelope.account) {
                Entry::Occupied(entry) => entry.into_mut(),
                Entry::Vacant(entry) => {
                    // An unknown account and a refused token give the same answer, checked
                    // before the device list, so that a sender without access learns
                    // nothing.
                    let Some(record) = self.cached_account(t, &envelope.account)? else {
                        return Ok(Err(Refusal::DeliveryRefused));
                    };
                    entry.insert((record, Vec::new()))
                }
            };
            let tag = self.at_rest.account_tag(&envelope.account);
            let sealed = t.delivery_access(&tag)?;
            let access = self.at_rest.open_delivery_access(&tag, sealed.as_deref())?;
            if !decide::admits(&access, envelope.access.as_ref()) {
                return Ok(Err(Refusal::DeliveryRefused));
            }
            entry.1.extend(envelope.devices.iter().map(|d| d.0));
        }
        for (record, devices) in requested.values_mut() {
            if let Err(refusal) = decide::exact_device_list(devices, &record.device_ids()) {
                return Ok(Err(refusal));
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

    pub(super) fn enqueue<T: Transaction>(
        &self,
        t: &mut T,
        envelopes: Vec<OutgoingEnvelope>,
        quota: MailboxQuota,
        received_at: u64,
        expires_at: u64,
    ) -> Result<WriteResult, StoreError> {
        // Check every recipient before writing anything: a send is all or nothing.
        let mut accounts: HashMap<AccountId, Arc<AccountRecord>> = HashMap::new();
        for recipient in envelopes.iter().flat_map(|e| &e.recipients) {
            let record = match accounts.entry(recipient.account) {
                Entry::Occupied(entry) => entry.into_mut(),
                Entry::Vacant(entry) => {
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
        for (recipient, adding) in added {
            let tag = self.at_rest.device_tag(&recipient);
            tags.insert(recipient, tag);
            match decide::within_quota(t.usage(tag)?, adding, quota) {
                Ok(after) => usage.push((tag, after)),
                Err(refusal) => return Ok(Err(refusal)),
            }
        }
        for (tag, after) in usage {
            t.set_usage(tag, after);
        }

        let key = self.at_rest.day_key(expiry_day(expires_at))?;
        let mut woken = BTreeSet::new();
        let mut fresh = Vec::with_capacity(envelopes.len());
        let mut sequence = t.next_sequence();
        for envelope in envelopes {
            let distinct: BTreeSet<&DeviceAddress> = envelope.recipients.iter().collect();
            let blind = envelope
                .retract_tag
                .as_ref()
                .map(|r| self.at_rest.retract_blind(r));
            // Shared, not copied, by the copies handed to connected recipients.
            let payload = Bytes::from(envelope.payload);
            for recipient in distinct {
                let tag = match tags.get(recipient) {
                    Some(tag) => *tag,
                    None => self.at_rest.device_tag(recipient),
                };
                let value = seal_envelope(&key, &tag, sequence, received_at, expires_at, &payload);
                t.append_envelope(tag, sequence, expires_at, blind, &value)?;
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
        t.set_next_sequence(sequence);
        Ok(Ok(Outcome::Enqueued {
            recipients: woken.into_iter().collect(),
            fresh,
        }))
    }

    /// Deletes acknowledged envelopes; only the acking device's own go.
    pub(super) fn ack<T: Transaction>(
        &self,
        t: &mut T,
        address: DeviceAddress,
        ids: &[EnvelopeId],
    ) -> Result<WriteResult, StoreError> {
        let tag = self.at_rest.device_tag(&address);
        let mut unknown = 0;
        for id in ids {
            if !t.remove_envelope(tag, id.0)? {
                unknown += 1;
            }
        }
        Ok(Ok(Outcome::Acked { unknown }))
    }

    /// Deletes every copy stored under each retraction tag.
    pub(super) fn retract<T: Transaction>(
        &self,
        t: &mut T,
        tags: &[[u8; 32]],
    ) -> Result<WriteResult, StoreError> {
        let mut count = 0u32;
        for retract_tag in tags {
            let blind = self.at_rest.retract_blind(retract_tag);
            for (mailbox, sequence) in t.retractable(&blind)? {
                if t.remove_envelope(mailbox, sequence)? {
                    count = count.saturating_add(1);
                }
            }
        }
        Ok(Ok(Outcome::Retracted { count }))
    }

    /// Deletes up to [`EXPIRE_BATCH`] envelopes that expired at or before `now`.
    pub(super) fn expire<T: Transaction>(t: &mut T, now: u64) -> Result<WriteResult, StoreError> {
        let doomed = t.expired(now, EXPIRE_BATCH)?;
        for entry in &doomed {
            t.remove_expired(*entry)?;
        }
        Ok(Ok(Outcome::Expired {
            envelopes: doomed.len() as u64,
        }))
    }
}
