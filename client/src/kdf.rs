//! The few primitives every layer shares: HKDF and HMAC-SHA256, AEAD under single-use
//! keys, and the low-order point check.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use x25519_dalek::{PublicKey, SharedSecret, StaticSecret};
use zeroize::Zeroizing;

use crate::error::CryptoError;

/// HKDF-SHA256 into `N` bytes.
pub(crate) fn hkdf<const N: usize>(salt: &[u8], ikm: &[u8], info: &[u8]) -> Zeroizing<[u8; N]> {
    let mut out = Zeroizing::new([0u8; N]);
    // N is a compile-time constant far below HKDF's 255 * 32 byte limit.
    let _ = Hkdf::<Sha256>::new(Some(salt), ikm).expand(info, out.as_mut());
    out
}

/// HMAC-SHA256.
pub(crate) fn hmac(key: &[u8], data: &[u8]) -> Zeroizing<[u8; 32]> {
    // HMAC accepts keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(data);
    Zeroizing::new(mac.finalize().into_bytes().into())
}

/// Seals `plaintext` under a key that is used for exactly one message: the AEAD key and
/// nonce both come from HKDF over it, so no nonce is ever reused under one key.
///
/// ChaCha20-Poly1305 refuses only a plaintext or AAD over about 256 GiB (RFC 8439's 32-bit
/// block counter), which no caller comes near; it is still an error, never an empty
/// ciphertext that would be sent as if it were one.
pub(crate) fn seal_once(
    single_use_key: &[u8; 32],
    label: &[u8],
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let material = hkdf::<44>(&[], single_use_key, label);
    let cipher = ChaCha20Poly1305::new((&material[..32]).into());
    cipher
        .encrypt(
            (&material[32..]).into(),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| CryptoError::PlaintextTooLarge)
}

/// Opens what [`seal_once`] sealed.
pub(crate) fn open_once(
    single_use_key: &[u8; 32],
    label: &[u8],
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let material = hkdf::<44>(&[], single_use_key, label);
    let cipher = ChaCha20Poly1305::new((&material[..32]).into());
    cipher
        .decrypt(
            (&material[32..]).into(),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| CryptoError::DecryptionFailed)
}

/// X25519 that refuses a non-contributory result: a low-order peer key makes the shared
/// secret all zeros, which an attacker would know.
pub(crate) fn dh(secret: &StaticSecret, public: &PublicKey) -> Result<SharedSecret, CryptoError> {
    let shared = secret.diffie_hellman(public);
    if shared.was_contributory() {
        Ok(shared)
    } else {
        Err(CryptoError::InvalidKey)
    }
}

/// Whether `key` is a low-order point. Any clamped scalar is a multiple of the cofactor,
/// so multiplying a low-order point by it gives the identity (an all-zero output).
pub(crate) fn is_low_order(key: &PublicKey) -> bool {
    const PROBE: [u8; 32] = [0x5a; 32];
    !StaticSecret::from(PROBE)
        .diffie_hellman(key)
        .was_contributory()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_order_points_are_detected() {
        // The canonical encodings of the points of order 1, 2, 4 and 8 on Curve25519.
        let low_order: [[u8; 32]; 4] = [
            [0; 32],
            {
                let mut k = [0u8; 32];
                k[0] = 1;
                k
            },
            hex_array("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
            hex_array("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
        ];
        for key in low_order {
            assert!(is_low_order(&PublicKey::from(key)));
        }
        let honest = PublicKey::from(&StaticSecret::from([7u8; 32]));
        assert!(!is_low_order(&honest));
    }

    #[test]
    fn sealed_once_opens_only_with_same_key_label_and_aad() {
        let key = [9u8; 32];
        let sealed = seal_once(&key, b"label", b"hello", b"aad").unwrap();
        assert_eq!(
            open_once(&key, b"label", &sealed, b"aad")
                .unwrap()
                .as_slice(),
            b"hello"
        );
        assert!(open_once(&[8u8; 32], b"label", &sealed, b"aad").is_err());
        assert!(open_once(&key, b"other", &sealed, b"aad").is_err());
        assert!(open_once(&key, b"label", &sealed, b"aab").is_err());
    }

    fn hex_array(text: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }
}
