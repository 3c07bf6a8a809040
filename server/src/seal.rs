//! Sealing stored values (P10): XChaCha20-Poly1305 under a storage key, with the row's
//! table and key as associated data so that a sealed value cannot be moved to another row.
//!
//! XChaCha's 192-bit random nonces are used rather than ChaCha20-Poly1305's 96-bit ones
//! because one day key may seal billions of envelopes, past the safe bound for random
//! 96-bit nonces.
//!
//! XChaCha20-Poly1305 is built as its specification (draft-irtf-cfrg-xchacha) defines it:
//! HChaCha20 of the key and the nonce's first 16 bytes gives a subkey, which seals with
//! ChaCha20-Poly1305 under the nonce's last 8 bytes. The AEAD is ring's, already in the tree
//! for TLS: on a few hundred bytes it is several times faster than the RustCrypto one,
//! whose Poly1305 is tuned for long inputs, and sealing every envelope runs on the commit
//! thread, the relay's one serial path. The bytes are exactly those of the RustCrypto
//! `XChaCha20Poly1305` this module used before, so stores sealed by either open with both.

use std::cell::RefCell;
use std::fmt;

use chacha20::cipher::consts::U10;
use chacha20::hchacha;
use rand_chacha::ChaCha20Rng;
use rand_core::{OsRng, RngCore, SeedableRng};
use ring::aead::{
    Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN as IETF_NONCE_LEN,
};
use zeroize::{Zeroize, ZeroizeOnDrop};

const NONCE_LEN: usize = 24;
/// The nonce bytes HChaCha20 takes; the rest go to ChaCha20-Poly1305.
const HCHACHA_INPUT_LEN: usize = 16;
const TAG_LEN: usize = 16;
/// Bytes sealing adds to a plaintext: the nonce and the tag.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

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
        let mut out = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD);
        self.seal_into(aad, plaintext, &mut out);
        out
    }

    /// Seals `plaintext` onto the end of `out` (`nonce || ciphertext || tag`), so that a
    /// record's header and its sealed value take one allocation.
    pub fn seal_into(&self, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        let nonce = fresh_nonce();
        let (key, ietf_nonce) = self.subkey(&nonce);
        out.reserve(NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let body = &mut out[start + NONCE_LEN..];
        // ring refuses only inputs past ChaCha's 256 GiB message limit.
        match key.seal_in_place_separate_tag(ietf_nonce, Aad::from(aad), body) {
            Ok(tag) => out.extend_from_slice(tag.as_ref()),
            Err(_) => out.truncate(start + NONCE_LEN),
        }
    }

    /// Opens a value sealed by [`SealingKey::seal`] with the same associated data.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(SealError);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce: &[u8; NONCE_LEN] = nonce.try_into().map_err(|_| SealError)?;
        let (key, ietf_nonce) = self.subkey(nonce);
        let mut buffer = ciphertext.to_vec();
        let plain_len = key
            .open_in_place(ietf_nonce, Aad::from(aad), &mut buffer)
            .map_err(|_| SealError)?
            .len();
        buffer.truncate(plain_len);
        Ok(buffer)
    }

    /// The ChaCha20-Poly1305 key and nonce that XChaCha20-Poly1305 uses for `nonce`. The
    /// subkey's copy here is zeroized; ring's (one record's key, dropped at once) is not:
    /// ring does not zeroize its keys.
    fn subkey(&self, nonce: &[u8; NONCE_LEN]) -> (LessSafeKey, Nonce) {
        let (derive, rest) = nonce.split_at(HCHACHA_INPUT_LEN);
        // U10: ten double rounds, i.e. HChaCha20.
        let mut subkey = hchacha::<U10>((&self.0).into(), derive.into());
        let key = UnboundKey::new(&CHACHA20_POLY1305, &subkey);
        subkey.zeroize();
        let mut ietf = [0u8; IETF_NONCE_LEN];
        ietf[IETF_NONCE_LEN - rest.len()..].copy_from_slice(rest);
        // A 32-byte key is what CHACHA20_POLY1305 takes, so `new` cannot fail.
        let key = LessSafeKey::new(
            key.unwrap_or_else(|_| unreachable!("ChaCha20-Poly1305 takes 32-byte keys")),
        );
        (key, Nonce::assume_unique_for_key(ietf))
    }
}

thread_local! {
    /// Where this thread's nonces come from: ChaCha20 seeded once from the OS. A nonce
    /// must be unique, not secret (it is stored beside its ciphertext), and 192 random bits
    /// from a CSPRNG are that; the OS's generator would cost a system call per value sealed,
    /// on the commit thread.
    static NONCES: RefCell<ChaCha20Rng> = RefCell::new(ChaCha20Rng::from_entropy());
}

fn fresh_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    NONCES.with(|rng| rng.borrow_mut().fill_bytes(&mut nonce));
    nonce
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
    use std::collections::HashSet;

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

    /// Stores sealed before this module moved to ring hold RustCrypto's XChaCha20-Poly1305;
    /// both must read each other's values, byte for byte.
    #[test]
    fn sealed_values_are_rustcrypto_xchacha20poly1305_both_ways() {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        use chacha20poly1305::{XChaCha20Poly1305, XNonce};

        let key = SealingKey::generate();
        let reference = XChaCha20Poly1305::new(key.as_bytes().into());
        for len in [0usize, 1, 15, 16, 17, 63, 64, 65, 300, 4096] {
            let plaintext: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let aad = format!("row-{len}");

            let ours = key.seal(aad.as_bytes(), &plaintext);
            assert_eq!(ours.len(), plaintext.len() + SEAL_OVERHEAD);
            let (nonce, body) = ours.split_at(NONCE_LEN);
            let opened = reference
                .decrypt(
                    XNonce::from_slice(nonce),
                    Payload {
                        msg: body,
                        aad: aad.as_bytes(),
                    },
                )
                .unwrap();
            assert_eq!(opened, plaintext);

            let nonce = [len as u8; NONCE_LEN];
            let mut theirs = nonce.to_vec();
            theirs.extend(
                reference
                    .encrypt(
                        XNonce::from_slice(&nonce),
                        Payload {
                            msg: &plaintext,
                            aad: aad.as_bytes(),
                        },
                    )
                    .unwrap(),
            );
            assert_eq!(key.open(aad.as_bytes(), &theirs).unwrap(), plaintext);
            // The same nonce gives the same bytes: the construction is the same.
            let (key_ring, ietf) = key.subkey(&nonce);
            let mut body = plaintext.clone();
            let tag = key_ring
                .seal_in_place_separate_tag(ietf, Aad::from(aad.as_bytes()), &mut body)
                .unwrap();
            body.extend_from_slice(tag.as_ref());
            assert_eq!(body, theirs[NONCE_LEN..]);
        }
    }

    #[test]
    fn sealing_onto_a_record_keeps_its_header_and_never_repeats_a_nonce() {
        let key = SealingKey::generate();
        let mut record = b"header".to_vec();
        key.seal_into(b"row", b"payload", &mut record);
        assert_eq!(&record[..6], b"header");
        assert_eq!(key.open(b"row", &record[6..]).unwrap(), b"payload");

        let nonces: HashSet<Vec<u8>> = (0..10_000)
            .map(|_| key.seal(b"row", b"same")[..NONCE_LEN].to_vec())
            .collect();
        assert_eq!(nonces.len(), 10_000);
    }

    #[test]
    fn each_thread_draws_its_own_nonces() {
        let here = fresh_nonce();
        let there = std::thread::spawn(fresh_nonce).join().unwrap();
        let again = std::thread::spawn(fresh_nonce).join().unwrap();
        assert_ne!(here, there);
        assert_ne!(there, again, "each thread is seeded afresh by the OS");
    }

    #[test]
    fn a_tampered_value_does_not_open() {
        let key = SealingKey::generate();
        let sealed = key.seal(b"row", b"some stored bytes");
        for index in 0..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[index] ^= 0x01;
            assert_eq!(key.open(b"row", &tampered), Err(SealError), "byte {index}");
        }
    }
}
