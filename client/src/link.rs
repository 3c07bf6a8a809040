//! Linking a new device to an account through a provisioning code.
//!
//! The new device opens a one-shot provisioning mailbox on the relay (anonymous, in memory
//! only) and shows a code, as a QR code or URI:
//!
//! ```text
//! hush-link:1:<hex of: mailbox address (16) | ephemeral X25519 key (32) | new device's Ed25519 key (32)>
//! ```
//!
//! An existing device scans it, adds the new device key to the account, and sends the
//! account's secrets into the mailbox, encrypted to the ephemeral key:
//!
//! ```text
//! E2 = fresh X25519 key; k = HKDF(salt = EK || E2, ikm = DH(E2, EK), info = "hush-provision-v1")
//! payload = E2 | ChaCha20-Poly1305(k, bundle, aad = E2)
//! ```
//!
//! The code travels out of band (a camera), so the relay can neither read the bundle nor
//! slip its own device key in.

use rand_core::CryptoRngCore;
use serde::{Deserialize, Serialize};
use x25519_dalek::PublicKey;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::CryptoError;
use crate::kdf;
use crate::keys::EcKeyPair;

const PREFIX: &str = "hush-link:1:";
const INFO: &[u8] = b"hush-provision-v1";
const LABEL: &[u8] = b"hush-provision-message-v1";

/// What a link code carries.
pub(crate) struct LinkCode {
    pub(crate) mailbox: [u8; 16],
    pub(crate) ephemeral: PublicKey,
    pub(crate) device_key: [u8; 32],
}

impl LinkCode {
    pub(crate) fn encode(&self) -> String {
        let mut bytes = Vec::with_capacity(80);
        bytes.extend_from_slice(&self.mailbox);
        bytes.extend_from_slice(self.ephemeral.as_bytes());
        bytes.extend_from_slice(&self.device_key);
        format!("{PREFIX}{}", crate::util::hex_encode(&bytes))
    }

    pub(crate) fn decode(code: &str) -> Option<Self> {
        let bytes = crate::util::hex_decode(code.trim().strip_prefix(PREFIX)?)?;
        if bytes.len() != 80 {
            return None;
        }
        let mut mailbox = [0u8; 16];
        mailbox.copy_from_slice(&bytes[..16]);
        let mut ephemeral = [0u8; 32];
        ephemeral.copy_from_slice(&bytes[16..48]);
        let mut device_key = [0u8; 32];
        device_key.copy_from_slice(&bytes[48..]);
        let ephemeral = PublicKey::from(ephemeral);
        if kdf::is_low_order(&ephemeral) {
            return None;
        }
        Some(LinkCode {
            mailbox,
            ephemeral,
            device_key,
        })
    }
}

/// A contact as handed to a new device.
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub(crate) struct LinkedContact {
    pub(crate) account: [u8; 16],
    pub(crate) identity: Option<Vec<u8>>,
    pub(crate) profile_key: Option<[u8; 32]>,
}

/// What the new device needs to act for the account.
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub(crate) struct ProvisionBundle {
    pub(crate) identity: Vec<u8>,
    pub(crate) account: [u8; 16],
    pub(crate) device: u32,
    pub(crate) profile_key: [u8; 32],
    pub(crate) contacts: Vec<LinkedContact>,
}

fn key(shared: &[u8; 32], theirs: &PublicKey, ours: &PublicKey) -> Zeroizing<[u8; 32]> {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(theirs.as_bytes());
    salt[32..].copy_from_slice(ours.as_bytes());
    kdf::hkdf::<32>(&salt, shared, INFO)
}

/// Encrypts a bundle to the ephemeral key of a link code.
pub(crate) fn seal_bundle(
    bundle: &ProvisionBundle,
    to: &PublicKey,
    rng: &mut impl CryptoRngCore,
) -> Result<Vec<u8>, CryptoError> {
    let ours = EcKeyPair::generate(rng);
    let shared = kdf::dh(ours.secret(), to)?;
    let key = key(shared.as_bytes(), to, ours.public());
    let plaintext = Zeroizing::new(postcard::to_allocvec(bundle).map_err(|_| CryptoError::Encode)?);
    let mut out = ours.public().as_bytes().to_vec();
    out.extend_from_slice(&kdf::seal_once(
        &key,
        LABEL,
        &plaintext,
        ours.public().as_bytes(),
    )?);
    Ok(out)
}

/// Opens a bundle with the ephemeral key the code carried.
pub(crate) fn open_bundle(
    ephemeral: &EcKeyPair,
    payload: &[u8],
) -> Result<ProvisionBundle, CryptoError> {
    if payload.len() < 32 {
        return Err(CryptoError::InvalidMessage);
    }
    let (sender, sealed) = payload.split_at(32);
    let mut sender_key = [0u8; 32];
    sender_key.copy_from_slice(sender);
    let sender = PublicKey::from(sender_key);
    let shared = kdf::dh(ephemeral.secret(), &sender)?;
    let key = key(shared.as_bytes(), ephemeral.public(), &sender);
    let plaintext = kdf::open_once(&key, LABEL, sealed, sender.as_bytes())?;
    postcard::from_bytes(&plaintext).map_err(|_| CryptoError::InvalidMessage)
}

#[cfg(test)]
mod tests {
    use rand_chacha::rand_core::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;

    #[test]
    fn codes_round_trip_and_bundles_open_only_with_the_ephemeral_key() {
        let mut rng = ChaCha20Rng::seed_from_u64(31);
        let ephemeral = EcKeyPair::generate(&mut rng);
        let code = LinkCode {
            mailbox: [1; 16],
            ephemeral: *ephemeral.public(),
            device_key: [2; 32],
        };
        let parsed = LinkCode::decode(&code.encode()).unwrap();
        assert_eq!(parsed.mailbox, [1; 16]);
        assert_eq!(parsed.device_key, [2; 32]);
        assert!(LinkCode::decode("hush-link:1:00").is_none());
        assert!(LinkCode::decode(&format!("{PREFIX}{}", "00".repeat(80))).is_none());

        let bundle = ProvisionBundle {
            identity: vec![7; 64],
            account: [3; 16],
            device: 2,
            profile_key: [4; 32],
            contacts: Vec::new(),
        };
        let sealed = seal_bundle(&bundle, &parsed.ephemeral, &mut rng).unwrap();
        let opened = open_bundle(&ephemeral, &sealed).unwrap();
        assert_eq!(opened.account, [3; 16]);
        assert_eq!(opened.identity, vec![7; 64]);
        let other = EcKeyPair::generate(&mut rng);
        assert!(open_bundle(&other, &sealed).is_err());
        assert!(open_bundle(&ephemeral, &sealed[..40]).is_err());
    }
}
