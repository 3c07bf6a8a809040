//! The records the store rules read and write, as they are sealed at rest. Their postcard
//! encoding is the stored format: fields are only ever appended.

use hush_protocol::DeviceId;
use serde::{Deserialize, Serialize};

/// An account: its identity key and devices.
#[derive(Serialize, Deserialize)]
pub(crate) struct AccountRecord {
    pub identity_key: Vec<u8>,
    pub devices: Vec<DeviceRecord>,
    /// The id the next added device gets; ids are never reused.
    pub next_device: u32,
}

/// One device of an account.
#[derive(Serialize, Deserialize)]
pub(crate) struct DeviceRecord {
    pub id: u32,
    pub key: [u8; 32],
}

impl AccountRecord {
    /// A new account with only its primary device.
    pub(crate) fn new(identity_key: Vec<u8>, device_key: [u8; 32]) -> Self {
        AccountRecord {
            identity_key,
            devices: vec![DeviceRecord {
                id: DeviceId::PRIMARY.0,
                key: device_key,
            }],
            next_device: DeviceId::PRIMARY.0 + 1,
        }
    }

    pub(crate) fn device(&self, device: DeviceId) -> Option<&DeviceRecord> {
        self.devices.iter().find(|d| d.id == device.0)
    }

    /// The device ids, ascending.
    pub(crate) fn device_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.devices.iter().map(|d| d.id).collect();
        ids.sort_unstable();
        ids
    }
}

/// Who may send sealed envelopes to an account. No record: no token, and unknown senders
/// refused. No `Debug`: the token's hash stays out of logs (P9).
#[derive(Serialize, Deserialize, Default)]
pub(crate) struct DeliveryAccess {
    pub token_hash: Option<[u8; 32]>,
    pub allow_unknown_senders: bool,
}

/// The kinds of prekey a device stores, as their stored keys name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum PrekeyKind {
    /// The signed EC prekey: one, replaced by each upload.
    Signed = 0,
    /// One-time EC prekeys: each handed out once.
    OneTime = 1,
    /// One-time ML-KEM prekeys: each handed out once.
    KemOneTime = 2,
    /// The last-resort ML-KEM prekey: handed out, never consumed, when no one-time one is
    /// left.
    KemLastResort = 3,
}

impl PrekeyKind {
    /// Every kind, as a removed device's keys are deleted.
    pub(crate) const ALL: [PrekeyKind; 4] = [
        PrekeyKind::Signed,
        PrekeyKind::OneTime,
        PrekeyKind::KemOneTime,
        PrekeyKind::KemLastResort,
    ];
}
