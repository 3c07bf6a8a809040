//! Safety numbers: what two users compare, out of band, to know that no one sits between
//! them. The construction is Signal's numeric fingerprint (version 2): each side's
//! fingerprint is SHA-512 iterated 5,200 times over its identity key and account id; the
//! displayed number is both, as twelve groups of five digits, lower fingerprint first so
//! both users see the same digits. The QR payload carries both fingerprints in the scanning
//! side's order, so a scan checks both directions.

use std::fmt::Write as _;

use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

use crate::error::CryptoError;
use crate::keys::IdentityKey;

const VERSION: u16 = 2;
const ITERATIONS: usize = 5_200;
const FINGERPRINT_LEN: usize = 30;
const QR_VERSION: u8 = 1;

/// A safety number between the local user and one contact.
#[derive(Clone, PartialEq, Eq)]
pub struct SafetyNumber {
    local: [u8; FINGERPRINT_LEN],
    remote: [u8; FINGERPRINT_LEN],
}

fn fingerprint(identity: &IdentityKey, account: &[u8; 16]) -> [u8; FINGERPRINT_LEN] {
    let key = identity.to_bytes();
    let mut hash = {
        let mut first = Sha512::new();
        first.update(VERSION.to_be_bytes());
        first.update(key);
        first.update(account);
        first.finalize()
    };
    for _ in 0..ITERATIONS {
        let mut next = Sha512::new();
        next.update(hash);
        next.update(key);
        hash = next.finalize();
    }
    let mut out = [0u8; FINGERPRINT_LEN];
    out.copy_from_slice(&hash[..FINGERPRINT_LEN]);
    out
}

fn digits(fingerprint: &[u8; FINGERPRINT_LEN]) -> String {
    let mut out = String::with_capacity(30);
    for chunk in fingerprint.chunks_exact(5) {
        let value = chunk
            .iter()
            .fold(0u64, |acc, &byte| (acc << 8) | u64::from(byte));
        let _ = write!(out, "{:05}", value % 100_000);
    }
    out
}

impl SafetyNumber {
    /// The safety number between us and a contact.
    pub fn new(
        local_identity: &IdentityKey,
        local_account: &[u8; 16],
        remote_identity: &IdentityKey,
        remote_account: &[u8; 16],
    ) -> Self {
        SafetyNumber {
            local: fingerprint(local_identity, local_account),
            remote: fingerprint(remote_identity, remote_account),
        }
    }

    /// Sixty digits, the same on both phones.
    pub fn displayable(&self) -> String {
        let (local, remote) = (digits(&self.local), digits(&self.remote));
        if local <= remote {
            local + &remote
        } else {
            remote + &local
        }
    }

    /// The bytes to show as a QR code: version, our fingerprint, theirs.
    pub fn qr_payload(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 2 * FINGERPRINT_LEN);
        out.push(QR_VERSION);
        out.extend_from_slice(&self.local);
        out.extend_from_slice(&self.remote);
        out
    }

    /// Checks a QR payload scanned from the contact's screen: their "local" must be our
    /// "remote" and the reverse. `Ok(false)` means the keys differ: someone may be in the
    /// middle, or one side reinstalled.
    pub fn matches_qr(&self, scanned: &[u8]) -> Result<bool, CryptoError> {
        if scanned.len() != 1 + 2 * FINGERPRINT_LEN {
            return Err(CryptoError::InvalidMessage);
        }
        if scanned[0] != QR_VERSION {
            return Err(CryptoError::UnsupportedVersion(scanned[0]));
        }
        let (theirs, ours) = scanned[1..].split_at(FINGERPRINT_LEN);
        Ok(bool::from(
            theirs.ct_eq(&self.remote) & ours.ct_eq(&self.local),
        ))
    }
}

impl std::fmt::Debug for SafetyNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SafetyNumber(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use rand_chacha::rand_core::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;
    use crate::keys::IdentityKeyPair;

    #[test]
    fn both_sides_see_the_same_number_and_scans_match() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let alice = IdentityKeyPair::generate_with(&mut rng);
        let bob = IdentityKeyPair::generate_with(&mut rng);
        let mallory = IdentityKeyPair::generate_with(&mut rng);
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let at_alice = SafetyNumber::new(alice.public(), &a, bob.public(), &b);
        let at_bob = SafetyNumber::new(bob.public(), &b, alice.public(), &a);
        assert_eq!(at_alice.displayable(), at_bob.displayable());
        assert_eq!(at_alice.displayable().len(), 60);
        assert!(at_alice.displayable().chars().all(|c| c.is_ascii_digit()));
        assert!(at_alice.matches_qr(&at_bob.qr_payload()).unwrap());
        assert!(at_bob.matches_qr(&at_alice.qr_payload()).unwrap());

        // Mallory in the middle: Alice holds Mallory's key for Bob.
        let fooled = SafetyNumber::new(alice.public(), &a, mallory.public(), &b);
        assert_ne!(fooled.displayable(), at_bob.displayable());
        assert!(!fooled.matches_qr(&at_bob.qr_payload()).unwrap());
        assert!(fooled.matches_qr(&[9; 3]).is_err());
    }
}
