//! PQXDH-style session setup (Signal's PQXDH specification, revision 3, with X25519,
//! SHA-256 and ML-KEM-768), without IO.
//!
//! ```text
//! DH1 = DH(IK_A, SPK_B)   DH2 = DH(EK_A, IK_B)   DH3 = DH(EK_A, SPK_B)   DH4 = DH(EK_A, OPK_B)
//! (CT, SS) = ML-KEM-768.Encaps(PQPK_B)
//! SK = HKDF-SHA256(salt = 0^32, ikm = 0xFF^32 || DH1 || DH2 || DH3 [|| DH4] || SS,
//!                  info = "Hush_X25519_SHA-256_ML-KEM-768")
//! AD = Encode(IK_A) || Encode(IK_B)
//! ```
//!
//! One HKDF over all the secrets, with the spec's 32 `0xFF` bytes in front for domain
//! separation from XEdDSA. Signatures on SPK and PQPK are checked before anything is
//! computed; every DH must be contributory; X25519 and ML-KEM keys carry distinct type
//! bytes, which the signatures cover.

use rand_core::CryptoRngCore;
use x25519_dalek::PublicKey;
use zeroize::Zeroizing;

use crate::error::CryptoError;
use crate::kdf;
use crate::keys::{
    decode_ec, prekey_signature_transcript, EcKeyPair, IdentityKey, IdentityKeyPair, KemPrekey,
    KemPublicKey, OneTimePrekey, SignedPrekey,
};

const KDF_INFO: &[u8] = b"Hush_X25519_SHA-256_ML-KEM-768";

/// A peer device's prekeys, signatures checked.
pub struct PeerBundle {
    pub(crate) identity: IdentityKey,
    pub(crate) signed_prekey_id: u32,
    pub(crate) signed_prekey: PublicKey,
    pub(crate) one_time: Option<(u32, PublicKey)>,
    pub(crate) kem_id: u32,
    pub(crate) kem: KemPublicKey,
}

impl PeerBundle {
    /// Checks a bundle as the relay served it: the identity key parses, the signed prekey
    /// and the ML-KEM prekey carry valid signatures by it, every key has the right type.
    pub fn verify(
        identity_key: &[u8],
        bundle: &hush_protocol::DeviceBundle,
    ) -> Result<Self, CryptoError> {
        let identity = IdentityKey::from_bytes(identity_key)?;
        let signed = bundle
            .signed_prekey
            .as_ref()
            .ok_or(CryptoError::IncompleteBundle)?;
        identity.verify(
            &prekey_signature_transcript(signed.id, &signed.public_key),
            &signed.signature,
        )?;
        let signed_prekey = decode_ec(&signed.public_key)?;
        let kem = bundle.kem.as_ref().ok_or(CryptoError::IncompleteBundle)?;
        identity.verify(
            &prekey_signature_transcript(kem.id, &kem.public_key),
            &kem.signature,
        )?;
        let kem_key = KemPublicKey::decode(&kem.public_key)?;
        let one_time = bundle
            .one_time
            .as_ref()
            .map(|key| decode_ec(&key.public_key).map(|public| (key.id, public)))
            .transpose()?;
        Ok(PeerBundle {
            identity,
            signed_prekey_id: signed.id,
            signed_prekey,
            one_time,
            kem_id: kem.id,
            kem: kem_key,
        })
    }

    /// The peer's identity.
    pub fn identity(&self) -> &IdentityKey {
        &self.identity
    }
}

/// What the initiator learns and must send.
pub(crate) struct Initiated {
    pub(crate) shared_secret: Zeroizing<[u8; 32]>,
    pub(crate) associated_data: Vec<u8>,
    pub(crate) base_key: PublicKey,
    pub(crate) kem_ciphertext: Vec<u8>,
}

/// The initiator's side.
pub(crate) fn initiate(
    ours: &IdentityKeyPair,
    bundle: &PeerBundle,
    rng: &mut impl CryptoRngCore,
) -> Result<Initiated, CryptoError> {
    let ephemeral = EcKeyPair::generate(rng);
    let mut secrets = Zeroizing::new(Vec::with_capacity(32 * 6));
    secrets.extend_from_slice(&[0xFF; 32]);
    secrets.extend_from_slice(kdf::dh(ours.agreement(), &bundle.signed_prekey)?.as_bytes());
    secrets.extend_from_slice(kdf::dh(ephemeral.secret(), bundle.identity.agreement())?.as_bytes());
    secrets.extend_from_slice(kdf::dh(ephemeral.secret(), &bundle.signed_prekey)?.as_bytes());
    if let Some((_, one_time)) = &bundle.one_time {
        secrets.extend_from_slice(kdf::dh(ephemeral.secret(), one_time)?.as_bytes());
    }
    let (kem_ciphertext, kem_secret) = bundle.kem.encapsulate(rng)?;
    secrets.extend_from_slice(kem_secret.as_ref());
    Ok(Initiated {
        shared_secret: kdf::hkdf::<32>(&[0u8; 32], &secrets, KDF_INFO),
        associated_data: associated_data(ours.public(), &bundle.identity),
        base_key: *ephemeral.public(),
        kem_ciphertext,
    })
}

/// The prekeys a prekey message used, as the responder found them.
pub(crate) struct ResponderKeys<'a> {
    pub(crate) signed_prekey: &'a SignedPrekey,
    pub(crate) one_time: Option<&'a OneTimePrekey>,
    pub(crate) kem: &'a KemPrekey,
}

/// The responder's side: the same shared secret, from the initiator's identity, base key
/// and KEM ciphertext.
pub(crate) fn respond(
    ours: &IdentityKeyPair,
    theirs: &IdentityKey,
    base_key: &PublicKey,
    keys: &ResponderKeys<'_>,
    kem_ciphertext: &[u8],
) -> Result<(Zeroizing<[u8; 32]>, Vec<u8>), CryptoError> {
    let mut secrets = Zeroizing::new(Vec::with_capacity(32 * 6));
    secrets.extend_from_slice(&[0xFF; 32]);
    let spk = keys.signed_prekey.key.secret();
    secrets.extend_from_slice(kdf::dh(spk, theirs.agreement())?.as_bytes());
    secrets.extend_from_slice(kdf::dh(ours.agreement(), base_key)?.as_bytes());
    secrets.extend_from_slice(kdf::dh(spk, base_key)?.as_bytes());
    if let Some(one_time) = keys.one_time {
        secrets.extend_from_slice(kdf::dh(one_time.key.secret(), base_key)?.as_bytes());
    }
    secrets.extend_from_slice(keys.kem.decapsulate(kem_ciphertext)?.as_ref());
    Ok((
        kdf::hkdf::<32>(&[0u8; 32], &secrets, KDF_INFO),
        associated_data(theirs, ours.public()),
    ))
}

/// `Encode(IK_A) || Encode(IK_B)`, initiator first.
fn associated_data(initiator: &IdentityKey, responder: &IdentityKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(130);
    out.extend_from_slice(&initiator.to_bytes());
    out.extend_from_slice(&responder.to_bytes());
    out
}
