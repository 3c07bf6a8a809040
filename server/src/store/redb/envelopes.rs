//! Envelopes in redb: appended by sequence with their mailbox, expiry and retraction index
//! entries; deleted by ack, retraction, device removal and expiry; read back for delivery.

use std::sync::atomic::Ordering;

use hush_protocol::{DeviceAddress, EnvelopeId};
use redb::{ReadableTable, ReadableTableMetadata};

use super::schema::{stored_usage, Tables, ENVELOPES, MAILBOXES, MAILBOX_USAGE};
use super::RedbStore;
use crate::keyring::Tag;
use crate::store::at_rest::{
    envelope_payload_len, expiry_day, mailbox_aad, read_tag, read_u64, ENVELOPE_HEADER, EXPIRES_AT,
    RECEIVED_AT,
};
use crate::store::backend::{EnvelopeRows, ExpiryEntry};
use crate::store::rules::decide;
use crate::store::{MailboxUsage, StoreError, StoredEnvelope};

impl Tables<'_> {
    /// Deletes an envelope of `tag`'s mailbox with its mailbox, expiry and retraction
    /// index entries, and takes it off the mailbox's usage. Returns whether the mailbox
    /// listed it. Only an envelope whose value names `tag` goes, so a device can only
    /// delete its own; an `expired` one goes whatever its value says, and even without
    /// its mailbox entry (P3).
    fn delete_envelope(
        &mut self,
        tag: Tag,
        sequence: u64,
        expired: bool,
    ) -> Result<bool, StoreError> {
        let listed = self.mailboxes.remove((tag, sequence))?.is_some();
        // (expires-at, payload bytes) of the envelope deleted.
        let mut deleted = None;
        if listed || expired {
            let mut foreign = None;
            if let Some(value) = self.envelopes.remove(sequence)? {
                let value = value.value();
                if expired || read_tag(value) == Some(tag) {
                    deleted = Some((read_u64(value, EXPIRES_AT), envelope_payload_len(value)));
                } else {
                    foreign = Some(value.to_vec());
                }
            }
            // Another mailbox's envelope under a damaged index entry stays where it is.
            if let Some(value) = foreign {
                self.envelopes.insert(sequence, value.as_slice())?;
            }
        }
        if let Some((Some(expires_at), _)) = deleted {
            self.expiry.remove((expires_at, sequence))?;
        }
        if listed || deleted.is_some() {
            let payload = deleted.map_or(0, |(_, payload)| payload);
            let (count, bytes) = self.usage(tag)?;
            self.usage.insert(
                tag,
                (count.saturating_sub(1), bytes.saturating_sub(payload)),
            );
        }
        let blind = self
            .retract_entries
            .remove((tag, sequence))?
            .map(|v| v.value());
        if let Some(blind) = blind {
            self.retract.remove((blind, tag, sequence))?;
        }
        Ok(listed)
    }
}

impl EnvelopeRows for Tables<'_> {
    fn next_sequence(&self) -> u64 {
        self.next_sequence.load(Ordering::Relaxed)
    }

    fn set_next_sequence(&mut self, next: u64) {
        self.next_sequence.store(next, Ordering::Relaxed);
    }

    fn usage(&self, mailbox: Tag) -> Result<(u64, u64), StoreError> {
        match self.usage.get(&mailbox) {
            Some(usage) => Ok(*usage),
            None => stored_usage(&self.mailbox_usage, mailbox),
        }
    }

    fn set_usage(&mut self, mailbox: Tag, usage: (u64, u64)) {
        self.usage.insert(mailbox, usage);
    }

    fn append_envelope(
        &mut self,
        mailbox: Tag,
        sequence: u64,
        expires_at: u64,
        retract_blind: Option<Tag>,
        value: &[u8],
    ) -> Result<(), StoreError> {
        self.envelopes.insert(sequence, value)?;
        self.mailboxes.insert((mailbox, sequence), ())?;
        self.expiry.insert((expires_at, sequence), mailbox)?;
        if let Some(blind) = retract_blind {
            self.retract.insert((blind, mailbox, sequence), ())?;
            self.retract_entries.insert((mailbox, sequence), blind)?;
        }
        Ok(())
    }

    fn remove_envelope(&mut self, mailbox: Tag, sequence: u64) -> Result<bool, StoreError> {
        self.delete_envelope(mailbox, sequence, false)
    }

    fn mailbox_sequences(&self, mailbox: Tag) -> Result<Vec<u64>, StoreError> {
        let mut sequences = Vec::new();
        for entry in self.mailboxes.range((mailbox, 0)..=(mailbox, u64::MAX))? {
            let (k, _) = entry?;
            sequences.push(k.value().1);
        }
        Ok(sequences)
    }

    fn retractable(&self, blind: &Tag) -> Result<Vec<(Tag, u64)>, StoreError> {
        let mut copies = Vec::new();
        for entry in self
            .retract
            .range((*blind, [0; 16], 0)..=(*blind, [0xff; 16], u64::MAX))?
        {
            let (key, _) = entry?;
            let (_, device, sequence) = key.value();
            copies.push((device, sequence));
        }
        Ok(copies)
    }

    fn expired(&self, now: u64, limit: usize) -> Result<Vec<ExpiryEntry>, StoreError> {
        let mut doomed = Vec::new();
        for entry in self.expiry.range(..=(now, u64::MAX))? {
            let (key, tag) = entry?;
            let (expires_at, sequence) = key.value();
            doomed.push(ExpiryEntry {
                expires_at,
                sequence,
                mailbox: tag.value(),
            });
            if doomed.len() == limit {
                break;
            }
        }
        Ok(doomed)
    }

    fn remove_expired(&mut self, entry: ExpiryEntry) -> Result<(), StoreError> {
        self.expiry.remove((entry.expires_at, entry.sequence))?;
        self.delete_envelope(entry.mailbox, entry.sequence, true)?;
        Ok(())
    }
}

impl RedbStore {
    pub(super) fn read_backlog(
        &self,
        address: &DeviceAddress,
        after: Option<EnvelopeId>,
        now: u64,
        limit: usize,
    ) -> Result<Vec<StoredEnvelope>, StoreError> {
        let at_rest = self.rules.at_rest();
        let tag = at_rest.device_tag(address);
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
            if !decide::deliverable(expires_at, now) {
                continue;
            }
            // A missing day key means its day is over: the envelope is shredded.
            let Some(key) = at_rest.existing_day_key(expiry_day(expires_at)) else {
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

    pub(super) fn read_mailbox_usage(
        &self,
        address: &DeviceAddress,
    ) -> Result<MailboxUsage, StoreError> {
        let txn = self.begin_read()?;
        let table = txn.open_table(MAILBOX_USAGE)?;
        let (envelopes, bytes) = stored_usage(&table, self.rules.at_rest().device_tag(address))?;
        Ok(MailboxUsage { envelopes, bytes })
    }

    /// Envelope copies held, for the retention report.
    pub(super) fn count_envelopes(txn: &redb::ReadTransaction) -> Result<u64, StoreError> {
        Ok(txn.open_table(ENVELOPES)?.len()?)
    }
}
