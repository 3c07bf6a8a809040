//! Sealing stored values (P10): XChaCha20-Poly1305 under a storage key, with the row's
//! table and key as associated data so that a sealed value cannot be moved to another row.
//!
//! XChaCha's 192-bit random nonces are used rather than ChaCha20-Poly1305's 96-bit ones
//! because one day key may seal billions of envelopes, past the safe bound for random
//! 96-bit nonces.

use std::fmt;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand_core::{OsRng, RngCore};
use zeroize::{Zeroize, ZeroizeOnDrop};

const NONCE_LEN: usize = 24;
/// Bytes sealing adds to a plaintext: the nonce and the tag.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + 16;

/// A 256-bit storage key. Zeroized on drop, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SealingKey([u8; 32]);

impl SealingKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        SealingKey(key)
    }

    pub(crate) fn from_bytes(bytes: [u8; 32]) -> Self {
        SealingKey(bytes)
    }

    pub(crate) fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Seals `plaintext`; the output is `nonce || ciphertext || tag`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let cipher = XChaCha20Poly1305::new((&self.0).into());
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + 16);
        out.extend_from_slice(&nonce);
        // Encryption into a Vec fails only past ChaCha's 256 GiB message limit.
        if let Ok(ct) = cipher.encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        ) {
            out.extend_from_slice(&ct);
        }
        out
    }

    /// Opens a value sealed by [`SealingKey::seal`] with the same associated data.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < NONCE_LEN + 16 {
            return Err(SealError);
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        XChaCha20Poly1305::new((&self.0).into())
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
            .map_err(|_| SealError)
    }
}

impl fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealingKey(<redacted>)")
    }
}

/// A sealed value failed to authenticate: corrupted, moved, or sealed under another key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("sealed value failed to authenticate")]
pub struct SealError;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_row() {
        let key = SealingKey::generate();
        let sealed = key.seal(b"row-1", b"secret");
        assert_eq!(key.open(b"row-1", &sealed).unwrap(), b"secret");
        assert_eq!(key.open(b"row-2", &sealed), Err(SealError));
        assert_eq!(
            SealingKey::generate().open(b"row-1", &sealed),
            Err(SealError)
        );
        assert_eq!(key.open(b"row-1", &sealed[..10]), Err(SealError));
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
    }
}
