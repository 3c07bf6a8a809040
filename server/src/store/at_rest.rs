//! The at-rest layer every backend shares (P10): identifiers blinded into tags, values
//! sealed under the keyring's keys with their row as associated data.
//!
//! A backend stores what this module hands it (tags and sealed bytes) and hands back what
//! it stored; it never sees an account id, a device address or a plaintext record. The
//! byte layouts of an envelope and a call record (a short clear header, then the seal) are
//! defined here, so that every backend holds the same bytes and reads them the same way.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use hush_protocol::{AccountId, DeviceAddress, Prekey};

use super::records::{AccountRecord, DeliveryAccess, PrekeyKind};
use super::StoreError;
use crate::cdr::{CallRecord, DayStats};
use crate::keyring::{Keyring, Tag, DAY};
use crate::seal::{SealingKey, SEAL_OVERHEAD};

/// Envelope value header: the device tag, then expires-at and received-at, big-endian.
pub(crate) const ENVELOPE_HEADER: usize = 16 + 8 + 8;
/// Where expires-at and received-at sit in an envelope value.
pub(crate) const EXPIRES_AT: usize = 16;
pub(crate) const RECEIVED_AT: usize = 24;

/// Call record value header: caller tag, callee tag, sealing day.
pub(crate) const CALL_HEADER: usize = 16 + 16 + 4;

/// The UTC day whose key seals what goes at `expires_at`.
pub(crate) fn expiry_day(expires_at: u64) -> u32 {
    u32::try_from(expires_at / DAY).unwrap_or(u32::MAX)
}

fn row_aad(table: &str, parts: &[&[u8]]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(64);
    aad.extend_from_slice(table.as_bytes());
    for part in parts {
        aad.push(0);
        aad.extend_from_slice(part);
    }
    aad
}

/// The associated data of an envelope: its mailbox and its sequence, not the table, so
/// a layout migration moves seals unchanged.
pub(crate) fn mailbox_aad(tag: &Tag, sequence: u64) -> Vec<u8> {
    row_aad("mailbox", &[tag, &sequence.to_be_bytes()])
}

fn prekey_aad(tag: &Tag, kind: PrekeyKind, id: u32) -> Vec<u8> {
    row_aad("prekeys", &[tag, &[kind as u8], &id.to_be_bytes()])
}

fn call_aad(start: u64, call: &Tag) -> Vec<u8> {
    row_aad("call_records", &[&start.to_be_bytes(), call])
}

fn call_day_aad(day: u32) -> Vec<u8> {
    row_aad("call_days", &[&day.to_be_bytes()])
}

/// The recipient device's tag at the head of an envelope value.
pub(crate) fn read_tag(value: &[u8]) -> Option<Tag> {
    value.get(..16).and_then(|b| b.try_into().ok())
}

/// A big-endian `u64` at `at`, if the value is long enough.
pub(crate) fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    bytes
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
}

/// The payload bytes an envelope value holds, as its mailbox's quota counts them.
pub(crate) fn envelope_payload_len(value: &[u8]) -> u64 {
    value.len().saturating_sub(ENVELOPE_HEADER + SEAL_OVERHEAD) as u64
}

/// Seals one envelope copy for `tag`'s mailbox into its stored value, in one allocation:
/// the clear header (tag, expires-at, received-at), then the sealed payload.
pub(crate) fn seal_envelope(
    key: &SealingKey,
    tag: &Tag,
    sequence: u64,
    received_at: u64,
    expires_at: u64,
    payload: &[u8],
) -> Vec<u8> {
    let mut value = Vec::with_capacity(ENVELOPE_HEADER + payload.len() + SEAL_OVERHEAD);
    value.extend_from_slice(tag);
    value.extend_from_slice(&expires_at.to_be_bytes());
    value.extend_from_slice(&received_at.to_be_bytes());
    key.seal_into(&mailbox_aad(tag, sequence), payload, &mut value);
    value
}

/// The caller's and callee's tags in a call record's clear header.
pub(crate) fn call_parties(value: &[u8]) -> [Option<Tag>; 2] {
    [
        value.get(..16).and_then(|b| b.try_into().ok()),
        value.get(16..32).and_then(|b| b.try_into().ok()),
    ]
}

/// A call record sealed for storage, with the tags that index it.
pub(crate) struct SealedCall {
    /// The call's tag.
    pub call: Tag,
    /// The caller's account tag.
    pub caller: Tag,
    /// The callee's account tag.
    pub callee: Tag,
    /// The stored value: the header, then the sealed record.
    pub value: Vec<u8>,
}

/// Blinds and seals for the store, with the keyring's keys.
pub(crate) struct AtRest {
    keys: Arc<Keyring>,
}

impl AtRest {
    pub(crate) fn new(keys: Arc<Keyring>) -> Self {
        AtRest { keys }
    }

    /// The keyring, shared with whoever needs to blind identifiers the same way.
    pub(crate) fn keyring(&self) -> &Arc<Keyring> {
        &self.keys
    }

    pub(crate) fn account_tag(&self, account: &AccountId) -> Tag {
        self.keys.tag(b"account", &account.0)
    }

    pub(crate) fn device_tag(&self, address: &DeviceAddress) -> Tag {
        self.keys.tag(b"device", &address.to_bytes())
    }

    /// The blinded key of a retraction tag.
    pub(crate) fn retract_blind(&self, retract_tag: &[u8; 32]) -> Tag {
        self.keys.tag(b"retract", retract_tag)
    }

    /// The key of an expiry day, created (and durable) first if it is new.
    pub(crate) fn day_key(&self, day: u32) -> Result<Arc<SealingKey>, StoreError> {
        Ok(self.keys.day_or_create(day)?)
    }

    /// The key of an expiry day, if it still exists: without it, what it sealed is gone.
    pub(crate) fn existing_day_key(&self, day: u32) -> Option<Arc<SealingKey>> {
        self.keys.day(day)
    }

    /// Deletes the keys of days before `day`, shredding whatever they sealed.
    pub(crate) fn drop_days_before(&self, day: u32) -> Result<(), StoreError> {
        self.keys.drop_days_before(day)?;
        Ok(())
    }

    /// Expiry days with a live key.
    pub(crate) fn day_keys(&self) -> u64 {
        self.keys.days().len() as u64
    }

    fn seal_directory<T: Serialize>(
        &self,
        table: &'static str,
        aad: &[u8],
        record: &T,
    ) -> Result<Vec<u8>, StoreError> {
        let plain = postcard::to_allocvec(record).map_err(|_| StoreError::Corrupt { table })?;
        Ok(self.keys.directory().seal(aad, &plain))
    }

    fn open_directory<T: DeserializeOwned>(
        &self,
        table: &'static str,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<T, StoreError> {
        let corrupt = || StoreError::Corrupt { table };
        let plain = self
            .keys
            .directory()
            .open(aad, sealed)
            .map_err(|_| corrupt())?;
        postcard::from_bytes(&plain).map_err(|_| corrupt())
    }

    pub(crate) fn seal_account(
        &self,
        tag: &Tag,
        record: &AccountRecord,
    ) -> Result<Vec<u8>, StoreError> {
        self.seal_directory("accounts", &row_aad("accounts", &[tag]), record)
    }

    pub(crate) fn open_account(
        &self,
        tag: &Tag,
        sealed: &[u8],
    ) -> Result<AccountRecord, StoreError> {
        self.open_directory("accounts", &row_aad("accounts", &[tag]), sealed)
    }

    pub(crate) fn seal_delivery_access(
        &self,
        tag: &Tag,
        access: &DeliveryAccess,
    ) -> Result<Vec<u8>, StoreError> {
        self.seal_directory(
            "delivery_access",
            &row_aad("delivery_access", &[tag]),
            access,
        )
    }

    /// An account's delivery access from its stored row; no row: the default (no token,
    /// unknown senders refused).
    pub(crate) fn open_delivery_access(
        &self,
        tag: &Tag,
        sealed: Option<&[u8]>,
    ) -> Result<DeliveryAccess, StoreError> {
        match sealed {
            None => Ok(DeliveryAccess::default()),
            Some(sealed) => self.open_directory(
                "delivery_access",
                &row_aad("delivery_access", &[tag]),
                sealed,
            ),
        }
    }

    pub(crate) fn seal_prekey(
        &self,
        tag: &Tag,
        kind: PrekeyKind,
        slot: u32,
        key: &Prekey,
    ) -> Result<Vec<u8>, StoreError> {
        self.seal_directory("prekeys", &prekey_aad(tag, kind, slot), key)
    }

    pub(crate) fn open_prekey(
        &self,
        tag: &Tag,
        kind: PrekeyKind,
        slot: u32,
        sealed: &[u8],
    ) -> Result<Prekey, StoreError> {
        self.open_directory("prekeys", &prekey_aad(tag, kind, slot), sealed)
    }

    /// Seals a call record under the key of the day its retention ends (`delete_at`), so
    /// that dropping that day's key shreds it.
    pub(crate) fn seal_call(
        &self,
        record: &CallRecord,
        delete_at: u64,
    ) -> Result<SealedCall, StoreError> {
        let call = self.keys.tag(b"call", &record.call_id);
        let caller = self.account_tag(&record.caller);
        let callee = self.account_tag(&record.callee);
        let day = expiry_day(delete_at);
        let key = self.day_key(day)?;
        let plain = postcard::to_allocvec(record).map_err(|_| StoreError::Corrupt {
            table: "call_records",
        })?;
        let sealed = key.seal(&call_aad(record.started_at, &call), &plain);
        let mut value = Vec::with_capacity(CALL_HEADER + sealed.len());
        value.extend_from_slice(&caller);
        value.extend_from_slice(&callee);
        value.extend_from_slice(&day.to_be_bytes());
        value.extend_from_slice(&sealed);
        Ok(SealedCall {
            call,
            caller,
            callee,
            value,
        })
    }

    /// Opens a stored call record; `None` if its day key is gone (past retention) or it
    /// fails to authenticate.
    pub(crate) fn open_call(&self, start: u64, call: &Tag, value: &[u8]) -> Option<CallRecord> {
        let day = value
            .get(32..CALL_HEADER)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)?;
        let key = self.keys.day(day)?;
        let Ok(plain) = key.open(&call_aad(start, call), &value[CALL_HEADER..]) else {
            tracing::warn!("skipping a call record that failed to authenticate");
            return None;
        };
        postcard::from_bytes(&plain).ok()
    }

    pub(crate) fn seal_day_stats(&self, day: u32, stats: &DayStats) -> Result<Vec<u8>, StoreError> {
        self.seal_directory("call_days", &call_day_aad(day), stats)
    }

    pub(crate) fn open_day_stats(&self, day: u32, sealed: &[u8]) -> Result<DayStats, StoreError> {
        self.open_directory("call_days", &call_day_aad(day), sealed)
    }
}
