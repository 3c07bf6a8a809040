//! Identifiers that travel on the wire.
//!
//! Their `Debug` output is redacted on purpose: promise P9 says logs and errors never carry
//! account or device ids, and a stray `{:?}` is the easiest way to break that.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An account, chosen at random by the relay at registration.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AccountId(pub [u8; 16]);

impl AccountId {
    /// The id as lower-case hex, for apps that show or store it. Never log it.
    pub fn to_hex(&self) -> String {
        use fmt::Write;
        self.0.iter().fold(String::with_capacity(32), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }
}

impl fmt::Debug for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccountId(<redacted>)")
    }
}

/// A device of an account: 1 is the primary, further devices count up.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceId(pub u32);

impl DeviceId {
    /// The device that registered the account.
    pub const PRIMARY: DeviceId = DeviceId(1);
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceId(<redacted>)")
    }
}

/// Where an envelope goes: one device of one account.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug)]
pub struct DeviceAddress {
    /// The account.
    pub account: AccountId,
    /// The device within it.
    pub device: DeviceId,
}

impl DeviceAddress {
    /// The address's canonical 20-byte form, used in signed transcripts and storage tags.
    pub fn to_bytes(&self) -> [u8; 20] {
        let mut out = [0u8; 20];
        out[..16].copy_from_slice(&self.account.0);
        out[16..].copy_from_slice(&self.device.0.to_be_bytes());
        out
    }
}

/// An envelope in one device's mailbox. Ids grow with arrival order and are meaningful only
/// to the device they were delivered to.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug)]
pub struct EnvelopeId(pub u64);

/// Chosen by the client per request; the response echoes it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug)]
pub struct RequestId(pub u32);
