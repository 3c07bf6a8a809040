//! Key types: one type per role. Secrets zeroize on drop (the dalek and ml-kem types do it
//! themselves; our seeds are `Zeroizing`) and print as `<redacted>`.
//!
//! Public keys that take part in session setup are *encoded* with a type byte in front
//! (`0x05` for X25519, `0x0B` for ML-KEM-768), and signatures cover the encoding, so that a
//! Diffie-Hellman key can never be accepted where a KEM key is expected or the other way
//! round: the PQXDH formal analysis found exactly that confusion when both shared an
//! encoding.

use std::fmt;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use kem::Decapsulate;
use ml_kem::{EncodedSizeUser, KemCore, MlKem768, B32};
use rand_core::{CryptoRngCore, OsRng};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::error::CryptoError;

/// Type byte of an encoded X25519 public key.
pub const EC_KEY_TYPE: u8 = 0x05;
/// Type byte of an encoded ML-KEM-768 encapsulation key.
pub const KEM_KEY_TYPE: u8 = 0x0B;
/// Length of an ML-KEM-768 encapsulation key.
pub const KEM_PUBLIC_LEN: usize = 1184;
/// Length of an ML-KEM-768 ciphertext.
pub const KEM_CIPHERTEXT_LEN: usize = 1088;
/// Length of an encoded identity key: version byte, Ed25519 key, X25519 key.
pub const IDENTITY_KEY_LEN: usize = 65;
const IDENTITY_KEY_VERSION: u8 = 1;

type KemDecapsulationKey = <MlKem768 as KemCore>::DecapsulationKey;
type KemEncapsulationKey = <MlKem768 as KemCore>::EncapsulationKey;

macro_rules! redacted_debug {
    ($($ty:ident),*) => {$(
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($ty), "(<redacted>)"))
            }
        }
    )*};
}

/// A device's Ed25519 signing key: authenticates the device to the relay.
pub struct DeviceKey(SigningKey);

impl DeviceKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        DeviceKey(SigningKey::generate(&mut OsRng))
    }

    /// Restores a key from its 32 secret bytes.
    pub fn from_secret_bytes(bytes: &[u8; 32]) -> Self {
        DeviceKey(SigningKey::from_bytes(bytes))
    }

    /// The public half, as the relay stores it.
    pub fn public_key(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    pub(crate) fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }

    /// The 32 secret bytes, for the encrypted local store.
    pub(crate) fn to_secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }
}

/// An account's public identity: an Ed25519 key that signs prekeys and an X25519 key that
/// takes part in key agreement. Shared by all devices of the account.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdentityKey {
    signing: VerifyingKey,
    agreement: PublicKey,
}

impl IdentityKey {
    /// The encoding registered with the relay and bound into every session.
    pub fn to_bytes(&self) -> [u8; IDENTITY_KEY_LEN] {
        let mut out = [0u8; IDENTITY_KEY_LEN];
        out[0] = IDENTITY_KEY_VERSION;
        out[1..33].copy_from_slice(self.signing.as_bytes());
        out[33..].copy_from_slice(self.agreement.as_bytes());
        out
    }

    /// Parses an encoded identity key. Rejects an Ed25519 key of small order and an X25519
    /// key of low order, either of which would let an attacker force a known secret.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        let bytes: &[u8; IDENTITY_KEY_LEN] =
            bytes.try_into().map_err(|_| CryptoError::InvalidKey)?;
        if bytes[0] != IDENTITY_KEY_VERSION {
            return Err(CryptoError::InvalidKey);
        }
        let mut signing = [0u8; 32];
        signing.copy_from_slice(&bytes[1..33]);
        let signing = VerifyingKey::from_bytes(&signing).map_err(|_| CryptoError::InvalidKey)?;
        if signing.is_weak() {
            return Err(CryptoError::InvalidKey);
        }
        let mut agreement = [0u8; 32];
        agreement.copy_from_slice(&bytes[33..]);
        let agreement = PublicKey::from(agreement);
        if crate::kdf::is_low_order(&agreement) {
            return Err(CryptoError::InvalidKey);
        }
        Ok(IdentityKey { signing, agreement })
    }

    pub(crate) fn agreement(&self) -> &PublicKey {
        &self.agreement
    }

    /// Checks an Ed25519 signature made by this identity.
    pub(crate) fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), CryptoError> {
        let signature = ed25519_dalek::Signature::from_slice(signature)
            .map_err(|_| CryptoError::BadSignature)?;
        self.signing
            .verify_strict(message, &signature)
            .map_err(|_| CryptoError::BadSignature)
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Public, but it identifies a person: keep it out of logs like the ids.
        f.write_str("IdentityKey(<redacted>)")
    }
}

/// The secret half of an account identity.
pub struct IdentityKeyPair {
    signing: SigningKey,
    agreement: StaticSecret,
    public: IdentityKey,
}

impl IdentityKeyPair {
    /// A fresh identity from the OS RNG.
    pub fn generate() -> Self {
        Self::generate_with(&mut OsRng)
    }

    /// A fresh identity from the given RNG (test vectors use a seeded one).
    pub fn generate_with(rng: &mut impl CryptoRngCore) -> Self {
        let signing = SigningKey::generate(rng);
        let agreement = StaticSecret::random_from_rng(rng);
        Self::from_parts(signing, agreement)
    }

    fn from_parts(signing: SigningKey, agreement: StaticSecret) -> Self {
        let public = IdentityKey {
            signing: signing.verifying_key(),
            agreement: PublicKey::from(&agreement),
        };
        IdentityKeyPair {
            signing,
            agreement,
            public,
        }
    }

    /// The public identity.
    pub fn public(&self) -> &IdentityKey {
        &self.public
    }

    pub(crate) fn agreement(&self) -> &StaticSecret {
        &self.agreement
    }

    pub(crate) fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }

    /// The 64 secret bytes, for the encrypted local store and device linking only.
    pub(crate) fn to_secret_bytes(&self) -> Zeroizing<[u8; 64]> {
        let mut out = Zeroizing::new([0u8; 64]);
        out[..32].copy_from_slice(&self.signing.to_bytes());
        out[32..].copy_from_slice(self.agreement.as_bytes());
        out
    }

    /// The reverse of [`IdentityKeyPair::to_secret_bytes`].
    pub(crate) fn from_secret_bytes(bytes: &[u8; 64]) -> Self {
        let mut signing = Zeroizing::new([0u8; 32]);
        signing.copy_from_slice(&bytes[..32]);
        let mut agreement = Zeroizing::new([0u8; 32]);
        agreement.copy_from_slice(&bytes[32..]);
        Self::from_parts(
            SigningKey::from_bytes(&signing),
            StaticSecret::from(*agreement),
        )
    }
}

/// An X25519 key pair used as a signed or one-time prekey, or as a ratchet key.
pub(crate) struct EcKeyPair {
    secret: StaticSecret,
    public: PublicKey,
}

impl EcKeyPair {
    pub(crate) fn generate(rng: &mut impl CryptoRngCore) -> Self {
        Self::from_secret(StaticSecret::random_from_rng(rng))
    }

    pub(crate) fn from_secret(secret: StaticSecret) -> Self {
        let public = PublicKey::from(&secret);
        EcKeyPair { secret, public }
    }

    pub(crate) fn secret(&self) -> &StaticSecret {
        &self.secret
    }

    pub(crate) fn public(&self) -> &PublicKey {
        &self.public
    }
}

impl Clone for EcKeyPair {
    fn clone(&self) -> Self {
        Self::from_secret(self.secret.clone())
    }
}

/// `0x05 || key`: an X25519 public key as signed and as bound into transcripts.
pub(crate) fn encode_ec(key: &PublicKey) -> [u8; 33] {
    let mut out = [0u8; 33];
    out[0] = EC_KEY_TYPE;
    out[1..].copy_from_slice(key.as_bytes());
    out
}

/// Parses `0x05 || key`, rejecting low-order points.
pub(crate) fn decode_ec(bytes: &[u8]) -> Result<PublicKey, CryptoError> {
    let bytes: &[u8; 33] = bytes.try_into().map_err(|_| CryptoError::InvalidKey)?;
    if bytes[0] != EC_KEY_TYPE {
        return Err(CryptoError::InvalidKey);
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&bytes[1..]);
    let key = PublicKey::from(key);
    if crate::kdf::is_low_order(&key) {
        return Err(CryptoError::InvalidKey);
    }
    Ok(key)
}

/// What a prekey signature covers: a context, the key's id, and its encoding.
pub(crate) fn prekey_signature_transcript(id: u32, encoded: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + 4 + encoded.len());
    out.extend_from_slice(b"hush-prekey-signature-v1");
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(encoded);
    out
}

/// A signed X25519 prekey (rotated periodically; its secret kept a while after rotation
/// so late first messages still open).
pub struct SignedPrekey {
    pub(crate) id: u32,
    pub(crate) key: EcKeyPair,
    pub(crate) signature: [u8; 64],
    pub(crate) created_at: u64,
}

impl SignedPrekey {
    /// A fresh signed prekey.
    pub(crate) fn generate(
        rng: &mut impl CryptoRngCore,
        identity: &IdentityKeyPair,
        id: u32,
        now: u64,
    ) -> Self {
        let key = EcKeyPair::generate(rng);
        let signature = identity.sign(&prekey_signature_transcript(id, &encode_ec(key.public())));
        SignedPrekey {
            id,
            key,
            signature,
            created_at: now,
        }
    }

    /// The public part as uploaded to the relay.
    pub fn to_wire(&self) -> hush_protocol::Prekey {
        hush_protocol::Prekey {
            id: self.id,
            public_key: encode_ec(self.key.public()).to_vec(),
            signature: self.signature.to_vec(),
        }
    }
}

/// A one-time X25519 prekey. Unsigned, as in X3DH: a forged one only costs the forger the
/// one-time key's contribution, which the signed prekey and KEM key still cover.
pub struct OneTimePrekey {
    pub(crate) id: u32,
    pub(crate) key: EcKeyPair,
}

impl OneTimePrekey {
    pub(crate) fn generate(rng: &mut impl CryptoRngCore, id: u32) -> Self {
        OneTimePrekey {
            id,
            key: EcKeyPair::generate(rng),
        }
    }

    /// The public part as uploaded to the relay.
    pub fn to_wire(&self) -> hush_protocol::Prekey {
        hush_protocol::Prekey {
            id: self.id,
            public_key: encode_ec(self.key.public()).to_vec(),
            signature: Vec::new(),
        }
    }
}

/// A signed ML-KEM-768 prekey: one-time, or the last-resort key served when the one-time
/// ones run out. Kept as its 64-byte seed.
pub struct KemPrekey {
    pub(crate) id: u32,
    pub(crate) seed: Zeroizing<[u8; 64]>,
    /// The encoded public key, kept so uploads need not re-derive it from the seed.
    pub(crate) public: Vec<u8>,
    pub(crate) signature: [u8; 64],
    pub(crate) last_resort: bool,
}

impl KemPrekey {
    pub(crate) fn generate(
        rng: &mut impl CryptoRngCore,
        identity: &IdentityKeyPair,
        id: u32,
        last_resort: bool,
    ) -> Self {
        let mut seed = Zeroizing::new([0u8; 64]);
        rng.fill_bytes(seed.as_mut());
        let public = encode_kem(&kem_keys(&seed).1);
        let signature = identity.sign(&prekey_signature_transcript(id, &public));
        KemPrekey {
            id,
            seed,
            public,
            signature,
            last_resort,
        }
    }

    /// The public part as uploaded to the relay.
    pub fn to_wire(&self) -> hush_protocol::Prekey {
        hush_protocol::Prekey {
            id: self.id,
            public_key: self.public.clone(),
            signature: self.signature.to_vec(),
        }
    }

    /// Decapsulates a ciphertext sent to this key.
    pub(crate) fn decapsulate(
        &self,
        ciphertext: &[u8],
    ) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
        let ciphertext: &[u8; KEM_CIPHERTEXT_LEN] = ciphertext
            .try_into()
            .map_err(|_| CryptoError::InvalidMessage)?;
        let (decapsulation_key, _) = kem_keys(&self.seed);
        // ML-KEM decapsulation never fails on a well-sized ciphertext (implicit rejection
        // yields an unrelated secret), so a tampered ciphertext surfaces as a failed AEAD.
        let shared = decapsulation_key
            .decapsulate(&(*ciphertext).into())
            .map_err(|()| CryptoError::InvalidMessage)?;
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(&shared);
        Ok(out)
    }
}

fn kem_keys(seed: &[u8; 64]) -> (KemDecapsulationKey, KemEncapsulationKey) {
    let mut d = B32::default();
    d.copy_from_slice(&seed[..32]);
    let mut z = B32::default();
    z.copy_from_slice(&seed[32..]);
    MlKem768::generate_deterministic(&d, &z)
}

pub(crate) fn kem_public_from_seed(seed: &[u8; 64]) -> Vec<u8> {
    encode_kem(&kem_keys(seed).1)
}

fn encode_kem(key: &KemEncapsulationKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + KEM_PUBLIC_LEN);
    out.push(KEM_KEY_TYPE);
    out.extend_from_slice(&key.as_bytes());
    out
}

/// A peer's ML-KEM encapsulation key, checked.
pub(crate) struct KemPublicKey(KemEncapsulationKey);

impl KemPublicKey {
    /// Parses `0x0B || key`. Applies FIPS 203's input check (re-encoding must give the
    /// same bytes, i.e. every coefficient is reduced) so a malformed key is refused rather
    /// than silently encapsulated to.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, CryptoError> {
        let (&kind, key) = bytes.split_first().ok_or(CryptoError::InvalidKey)?;
        if kind != KEM_KEY_TYPE {
            return Err(CryptoError::InvalidKey);
        }
        let key: &[u8; KEM_PUBLIC_LEN] = key.try_into().map_err(|_| CryptoError::InvalidKey)?;
        let parsed = KemEncapsulationKey::from_bytes(&(*key).into());
        if parsed.as_bytes().as_slice() != key.as_slice() {
            return Err(CryptoError::InvalidKey);
        }
        Ok(KemPublicKey(parsed))
    }

    /// Encapsulates a fresh secret: (ciphertext, shared secret).
    pub(crate) fn encapsulate(
        &self,
        rng: &mut impl CryptoRngCore,
    ) -> Result<(Vec<u8>, Zeroizing<[u8; 32]>), CryptoError> {
        use ml_kem::EncapsulateDeterministic;
        // The message m is drawn from our RNG so that test vectors are reproducible.
        let mut m = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(m.as_mut());
        let (ciphertext, shared) = self
            .0
            .encapsulate_deterministic(&B32::from(*m))
            .map_err(|()| CryptoError::InvalidKey)?;
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(&shared);
        Ok((ciphertext.to_vec(), out))
    }
}

redacted_debug!(
    DeviceKey,
    IdentityKeyPair,
    EcKeyPair,
    SignedPrekey,
    OneTimePrekey,
    KemPrekey,
    KemPublicKey
);
