//! A device's own prekeys: the signed prekey and its rotation, one-time X25519 and ML-KEM
//! prekeys and their replenishment, the last-resort ML-KEM key.

use std::collections::BTreeMap;

use rand_core::CryptoRngCore;

use crate::keys::{IdentityKeyPair, KemPrekey, OneTimePrekey, SignedPrekey};

/// How often the signed prekey and last-resort ML-KEM key rotate.
pub const ROTATE_AFTER_SECS: u64 = 7 * 24 * 3600;
/// How long a rotated-out key is kept so that first messages sent to it still open: the
/// relay keeps an undelivered message 14 days at most.
pub const KEEP_ROTATED_SECS: u64 = 14 * 24 * 3600;

/// The prekeys one device holds, with the secrets.
#[derive(Default)]
pub struct PrekeySet {
    pub(crate) signed: Vec<SignedPrekey>,
    pub(crate) one_time: BTreeMap<u32, OneTimePrekey>,
    pub(crate) kem: BTreeMap<u32, KemPrekey>,
    pub(crate) next_id: u32,
}

/// What a prekey message used up; the caller deletes these in the same commit that stores
/// the new session, so a crash cannot consume a key without a session or the reverse.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsedPrekeys {
    /// A one-time X25519 prekey.
    pub one_time: Option<u32>,
    /// A one-time ML-KEM prekey (never the last-resort one).
    pub kem_one_time: Option<u32>,
}

impl PrekeySet {
    fn take_id(&mut self) -> u32 {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.next_id
    }

    /// A new signed prekey and last-resort ML-KEM key, returned as the upload for the relay; the previous ones stay until
    /// [`PrekeySet::forget_rotated`] drops them.
    pub fn rotate(
        &mut self,
        identity: &IdentityKeyPair,
        now: u64,
        rng: &mut impl CryptoRngCore,
    ) -> hush_protocol::UploadPrekeys {
        let id = self.take_id();
        let signed = SignedPrekey::generate(rng, identity, id, now);
        let kem_id = self.take_id();
        let last_resort = KemPrekey::generate(rng, identity, kem_id, true);
        let upload = hush_protocol::UploadPrekeys {
            signed_prekey: Some(signed.to_wire()),
            kem_last_resort: Some(last_resort.to_wire()),
            ..Default::default()
        };
        self.signed.push(signed);
        self.kem.insert(kem_id, last_resort);
        upload
    }

    /// Whether the current signed prekey is due for rotation.
    pub fn needs_rotation(&self, now: u64) -> bool {
        self.signed
            .last()
            .is_none_or(|key| now.saturating_sub(key.created_at) >= ROTATE_AFTER_SECS)
    }

    /// Drops signed and last-resort keys rotated out more than [`KEEP_ROTATED_SECS`] ago.
    pub fn forget_rotated(&mut self, now: u64) {
        let Some(newest) = self.signed.last().map(|key| key.id) else {
            return;
        };
        // A rotated-out key's retirement time is its successor's creation time.
        let mut retired_at = Vec::new();
        for pair in self.signed.windows(2) {
            retired_at.push((pair[0].id, pair[1].created_at));
        }
        let expired: Vec<u32> = retired_at
            .into_iter()
            .filter(|(_, at)| now.saturating_sub(*at) >= KEEP_ROTATED_SECS)
            .map(|(id, _)| id)
            .collect();
        self.signed
            .retain(|key| key.id == newest || !expired.contains(&key.id));
        // Last-resort KEM keys are created right after their signed prekey (id + 1).
        self.kem
            .retain(|id, key| !key.last_resort || !expired.contains(&id.wrapping_sub(1)));
    }

    /// Fresh one-time prekeys of both kinds, `count` each.
    pub fn replenish(
        &mut self,
        identity: &IdentityKeyPair,
        count: u32,
        rng: &mut impl CryptoRngCore,
    ) -> hush_protocol::UploadPrekeys {
        let mut upload = hush_protocol::UploadPrekeys::default();
        for _ in 0..count {
            let id = self.take_id();
            let key = OneTimePrekey::generate(rng, id);
            upload.one_time.push(key.to_wire());
            self.one_time.insert(id, key);
            let id = self.take_id();
            let key = KemPrekey::generate(rng, identity, id, false);
            upload.kem_one_time.push(key.to_wire());
            self.kem.insert(id, key);
        }
        upload
    }

    pub(crate) fn signed_prekey(&self, id: u32) -> Option<&SignedPrekey> {
        self.signed.iter().find(|key| key.id == id)
    }

    pub(crate) fn one_time_prekey(&self, id: u32) -> Option<&OneTimePrekey> {
        self.one_time.get(&id)
    }

    pub(crate) fn kem_prekey(&self, id: u32) -> Option<&KemPrekey> {
        self.kem.get(&id)
    }

    /// Deletes what a prekey message used.
    pub fn consume(&mut self, used: UsedPrekeys) {
        if let Some(id) = used.one_time {
            self.one_time.remove(&id);
        }
        if let Some(id) = used.kem_one_time {
            self.kem.remove(&id);
        }
    }

    /// One-time prekeys held locally (X25519, ML-KEM).
    pub fn one_time_counts(&self) -> (usize, usize) {
        (
            self.one_time.len(),
            self.kem.values().filter(|key| !key.last_resort).count(),
        )
    }
}
