//! Sealed sender: the envelope the relay carries names only the recipient device; who sent
//! it travels inside, encrypted to the recipient's identity key (P5).
//!
//! ```text
//! sealed:   0x01 | ephemeral key E (32) | encrypted sender identity (65 + 16) | encrypted content
//!
//! (chain, k1) = HKDF(salt = "hush-sealed-v1", ikm = DH(e, IK_R), info = E || IK_R)
//! encrypted sender identity = AEAD(k1, IK_S, aad = E)
//! k2 = HKDF(salt = chain, ikm = DH(IK_S, IK_R), info = encrypted sender identity)
//! encrypted content = AEAD(k2, content, aad = E || encrypted sender identity)
//! content:  certificate length (u16 BE) | sender certificate (postcard)
//!           | recipient device id (u32 BE) | end-to-end message
//! ```
//!
//! The first layer hides the sender's identity key from anyone but the recipient; the
//! second proves the sender holds it (only the holders of IK_S or IK_R can compute
//! DH(IK_S, IK_R)). The relay-signed certificate inside must name that same identity key,
//! must not be expired, and names the account and device to answer.

use std::collections::HashMap;

use hush_protocol::sealed::{CertificateError, SenderCertificate, SenderCertificateBody};
use rand_core::CryptoRngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use x25519_dalek::PublicKey;
use zeroize::Zeroizing;

use crate::error::CryptoError;
use crate::kdf;
use crate::keys::{EcKeyPair, IdentityKey, IdentityKeyPair, IDENTITY_KEY_LEN};
use crate::message::Reader;

const VERSION: u8 = 1;
const SALT: &[u8] = b"hush-sealed-v1";
const STATIC_LABEL: &[u8] = b"hush-sealed-static-v1";
const CONTENT_LABEL: &[u8] = b"hush-sealed-content-v1";
const TAG_LEN: usize = 16;
const ENCRYPTED_STATIC_LEN: usize = IDENTITY_KEY_LEN + TAG_LEN;
/// Entries a [`SealCache`] keeps of each kind; when full it starts over (a device talks
/// to far fewer identities than this at a time).
const CACHE_ENTRIES: usize = 4096;

/// Our public agreement key and a peer's.
type KeyPair = ([u8; 32], [u8; 32]);

/// What a device may remember between envelopes instead of computing again: the static
/// agreement `DH(IK_ours, IK_peer)` with each peer identity (the same for every envelope
/// between the two), and the sender certificates it has verified (a sender uses one for a
/// day). Half the public-key operations of sealing and opening an envelope repeat; the
/// cache skips them and changes nothing else: the ephemeral agreement, both AEADs and
/// the certificate's expiry are checked for every envelope as before. Bounded; the
/// agreements are secrets, zeroized when dropped, never printed.
#[derive(Default)]
pub struct SealCache {
    /// By our agreement key and the peer's.
    statics: HashMap<KeyPair, Zeroizing<[u8; 32]>>,
    /// By SHA-256 of the relay key, the certificate body and its signature.
    certificates: HashMap<[u8; 32], SenderCertificateBody>,
    /// Identity keys already parsed and checked (a point decompression, a small-order
    /// check on each half), by their encoding.
    identities: HashMap<[u8; IDENTITY_KEY_LEN], IdentityKey>,
}

impl std::fmt::Debug for SealCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealCache(<redacted>)")
    }
}

impl SealCache {
    /// An encoded identity key, parsed and checked once. Remembered at once: only for
    /// identities we seal to, whose encoding we hold already.
    pub(crate) fn identity(&mut self, bytes: &[u8]) -> Result<IdentityKey, CryptoError> {
        let (key, fresh) = self.parse_identity(bytes)?;
        if fresh {
            self.remember_identity(key);
        }
        Ok(key)
    }

    /// An identity from the cache, or parsed (then `true`: not remembered yet).
    fn parse_identity(&self, bytes: &[u8]) -> Result<(IdentityKey, bool), CryptoError> {
        if let Some(key) = <&[u8; IDENTITY_KEY_LEN]>::try_from(bytes)
            .ok()
            .and_then(|encoded| self.identities.get(encoded))
        {
            return Ok((*key, false));
        }
        Ok((IdentityKey::from_bytes(bytes)?, true))
    }

    fn remember_identity(&mut self, key: IdentityKey) {
        if self.identities.len() >= CACHE_ENTRIES {
            self.identities.clear();
        }
        self.identities.insert(key.to_bytes(), key);
    }

    /// `DH(ours, peer)`, computed once per pair.
    fn static_agreement(
        &mut self,
        ours: &IdentityKeyPair,
        peer: &PublicKey,
    ) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
        let (shared, fresh) = self.agreement(ours, peer)?;
        if fresh {
            self.remember(ours, peer, &shared);
        }
        Ok(shared)
    }

    /// `DH(ours, peer)` from the cache, or computed (then `true`: not remembered yet).
    fn agreement(
        &self,
        ours: &IdentityKeyPair,
        peer: &PublicKey,
    ) -> Result<(Zeroizing<[u8; 32]>, bool), CryptoError> {
        let key = (ours.public().agreement().to_bytes(), peer.to_bytes());
        if let Some(shared) = self.statics.get(&key) {
            return Ok((shared.clone(), false));
        }
        Ok((
            Zeroizing::new(kdf::dh(ours.agreement(), peer)?.to_bytes()),
            true,
        ))
    }

    fn remember(&mut self, ours: &IdentityKeyPair, peer: &PublicKey, shared: &[u8; 32]) {
        if self.statics.len() >= CACHE_ENTRIES {
            self.statics.clear();
        }
        let key = (ours.public().agreement().to_bytes(), peer.to_bytes());
        self.statics.insert(key, Zeroizing::new(*shared));
    }

    /// What `certificate` asserts, if it is signed by `relay_key` and unexpired at `now`:
    /// the signature is checked once per certificate, the expiry every time.
    fn verified(
        &mut self,
        certificate: &SenderCertificate,
        relay_key: &[u8; 32],
        now: u64,
    ) -> Result<SenderCertificateBody, CertificateError> {
        let mut hash = Sha256::new();
        hash.update(relay_key);
        hash.update((certificate.body.len() as u64).to_be_bytes());
        hash.update(&certificate.body);
        hash.update(certificate.signature.0);
        let key: [u8; 32] = hash.finalize().into();
        if let Some(body) = self.certificates.get(&key) {
            if now >= body.expires_at {
                return Err(CertificateError::Expired);
            }
            return Ok(body.clone());
        }
        let body = certificate.verify(relay_key, now)?;
        if self.certificates.len() >= CACHE_ENTRIES {
            self.certificates.clear();
        }
        self.certificates.insert(key, body.clone());
        Ok(body)
    }
}

/// What opening a sealed envelope yields.
#[derive(Debug)]
pub struct Unsealed {
    /// The sender, as the relay certified it.
    pub sender: SenderCertificateBody,
    /// The sender's identity key (equal to the certificate's).
    pub sender_identity: IdentityKey,
    /// The end-to-end message inside.
    pub message: Vec<u8>,
}

/// Seals `message` for one device of the account whose identity is `recipient`.
pub fn seal(
    sender: &IdentityKeyPair,
    certificate: &SenderCertificate,
    recipient: &IdentityKey,
    recipient_device: u32,
    message: &[u8],
    rng: &mut impl CryptoRngCore,
) -> Result<Vec<u8>, CryptoError> {
    seal_cached(
        &mut SealCache::default(),
        sender,
        certificate,
        recipient,
        recipient_device,
        message,
        rng,
    )
}

/// [`seal`], remembering in `cache` what repeats for the next envelope to the same
/// identity. One cache per sender identity.
pub fn seal_cached(
    cache: &mut SealCache,
    sender: &IdentityKeyPair,
    certificate: &SenderCertificate,
    recipient: &IdentityKey,
    recipient_device: u32,
    message: &[u8],
    rng: &mut impl CryptoRngCore,
) -> Result<Vec<u8>, CryptoError> {
    let certificate =
        postcard::to_allocvec(certificate).map_err(|_| CryptoError::InvalidMessage)?;
    let certificate_len =
        u16::try_from(certificate.len()).map_err(|_| CryptoError::InvalidMessage)?;
    let mut content = Zeroizing::new(Vec::with_capacity(6 + certificate.len() + message.len()));
    content.extend_from_slice(&certificate_len.to_be_bytes());
    content.extend_from_slice(&certificate);
    content.extend_from_slice(&recipient_device.to_be_bytes());
    content.extend_from_slice(message);
    seal_layers(cache, sender, recipient, &content, rng)
}

/// The two encryption layers around already-encoded content (see the module docs).
#[cfg_attr(not(feature = "test-support"), allow(dead_code))]
pub(crate) fn seal_content(
    sender: &IdentityKeyPair,
    recipient: &IdentityKey,
    content: &[u8],
    rng: &mut impl CryptoRngCore,
) -> Result<Vec<u8>, CryptoError> {
    seal_layers(&mut SealCache::default(), sender, recipient, content, rng)
}

fn seal_layers(
    cache: &mut SealCache,
    sender: &IdentityKeyPair,
    recipient: &IdentityKey,
    content: &[u8],
    rng: &mut impl CryptoRngCore,
) -> Result<Vec<u8>, CryptoError> {
    let ephemeral = EcKeyPair::generate(rng);
    let (chain, static_key) = first_layer(
        &kdf::dh(ephemeral.secret(), recipient.agreement())?.to_bytes(),
        ephemeral.public(),
        recipient,
    );
    let encrypted_static = kdf::seal_once(
        &static_key,
        STATIC_LABEL,
        &sender.public().to_bytes(),
        ephemeral.public().as_bytes(),
    )?;
    let content_key = second_layer(
        &chain,
        &*cache.static_agreement(sender, recipient.agreement())?,
        &encrypted_static,
    );

    let mut aad = Vec::with_capacity(32 + ENCRYPTED_STATIC_LEN);
    aad.extend_from_slice(ephemeral.public().as_bytes());
    aad.extend_from_slice(&encrypted_static);
    let encrypted_content = kdf::seal_once(&content_key, CONTENT_LABEL, content, &aad)?;

    let mut out = Vec::with_capacity(1 + aad.len() + encrypted_content.len());
    out.push(VERSION);
    out.extend_from_slice(&aad);
    out.extend_from_slice(&encrypted_content);
    Ok(out)
}

/// Opens a sealed envelope addressed to `our_device`, checking the sender certificate
/// against the relay's key at time `now`.
pub fn open(
    ours: &IdentityKeyPair,
    our_device: u32,
    relay_key: &[u8; 32],
    sealed: &[u8],
    now: u64,
) -> Result<Unsealed, CryptoError> {
    open_cached(
        &mut SealCache::default(),
        ours,
        our_device,
        relay_key,
        sealed,
        now,
    )
}

/// [`open`], remembering in `cache` what repeats for the next envelope from the same
/// sender. One cache per recipient identity.
pub fn open_cached(
    cache: &mut SealCache,
    ours: &IdentityKeyPair,
    our_device: u32,
    relay_key: &[u8; 32],
    sealed: &[u8],
    now: u64,
) -> Result<Unsealed, CryptoError> {
    let mut reader = Reader(sealed);
    let version = reader.byte()?;
    if version != VERSION {
        return Err(CryptoError::UnsupportedVersion(version));
    }
    let aad = sealed
        .get(1..1 + 32 + ENCRYPTED_STATIC_LEN)
        .ok_or(CryptoError::InvalidMessage)?;
    let mut ephemeral = [0u8; 32];
    ephemeral.copy_from_slice(reader.take(32)?);
    let ephemeral = PublicKey::from(ephemeral);
    let encrypted_static = reader.take(ENCRYPTED_STATIC_LEN)?;
    let encrypted_content = reader.0;

    let (chain, static_key) = first_layer(
        &kdf::dh(ours.agreement(), &ephemeral)?.to_bytes(),
        &ephemeral,
        ours.public(),
    );
    let sender_identity = kdf::open_once(
        &static_key,
        STATIC_LABEL,
        encrypted_static,
        ephemeral.as_bytes(),
    )?;
    let (sender_identity, fresh_identity) = cache.parse_identity(&sender_identity)?;
    // Remembered only once the content opens: anyone may send us envelopes naming any
    // identity, and must not fill the cache with them.
    let (shared, fresh) = cache.agreement(ours, sender_identity.agreement())?;
    let content_key = second_layer(&chain, &shared, encrypted_static);
    let content = kdf::open_once(&content_key, CONTENT_LABEL, encrypted_content, aad)?;
    if fresh {
        cache.remember(ours, sender_identity.agreement(), &shared);
    }
    if fresh_identity {
        cache.remember_identity(sender_identity);
    }

    let inner = parse_content(&content)?;
    let sender =
        cache
            .verified(&inner.certificate, relay_key, now)
            .map_err(|error| match error {
                CertificateError::Expired => CryptoError::InvalidCertificate("expired"),
                CertificateError::BadSignature => CryptoError::InvalidCertificate("bad signature"),
                CertificateError::Malformed => CryptoError::InvalidCertificate("malformed"),
            })?;
    if !bool::from(sender.identity_key.ct_eq(&sender_identity.to_bytes())) {
        return Err(CryptoError::InvalidCertificate(
            "certificate names another identity",
        ));
    }
    if inner.recipient_device != our_device {
        return Err(CryptoError::WrongRecipient);
    }
    Ok(Unsealed {
        sender,
        sender_identity,
        message: inner.message.to_vec(),
    })
}

/// The decrypted content of a sealed envelope, parsed but not yet checked.
pub(crate) struct SealedContent<'a> {
    /// The sender certificate, signature unchecked.
    pub(crate) certificate: SenderCertificate,
    /// The device the sender addressed.
    pub(crate) recipient_device: u32,
    /// The end-to-end message.
    pub(crate) message: &'a [u8],
}

/// Parses decrypted content: `certificate length | certificate | recipient device | message`.
pub(crate) fn parse_content(content: &[u8]) -> Result<SealedContent<'_>, CryptoError> {
    let mut reader = Reader(content);
    let certificate_len = usize::from(u16::from_be_bytes([reader.byte()?, reader.byte()?]));
    let certificate: SenderCertificate = postcard::from_bytes(reader.take(certificate_len)?)
        .map_err(|_| CryptoError::InvalidCertificate("malformed"))?;
    let recipient_device = reader.u32()?;
    Ok(SealedContent {
        certificate,
        recipient_device,
        message: reader.0,
    })
}

fn first_layer(
    shared: &[u8; 32],
    ephemeral: &PublicKey,
    recipient: &IdentityKey,
) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    let mut info = [0u8; 32 + IDENTITY_KEY_LEN];
    info[..32].copy_from_slice(ephemeral.as_bytes());
    info[32..].copy_from_slice(&recipient.to_bytes());
    let out = kdf::hkdf::<64>(SALT, shared, &info);
    let mut chain = Zeroizing::new([0u8; 32]);
    chain.copy_from_slice(&out[..32]);
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&out[32..]);
    (chain, key)
}

fn second_layer(
    chain: &[u8; 32],
    shared: &[u8; 32],
    encrypted_static: &[u8],
) -> Zeroizing<[u8; 32]> {
    kdf::hkdf::<32>(chain, shared, encrypted_static)
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::{Signer, SigningKey};
    use hush_protocol::{AccountId, DeviceId};
    use rand_chacha::rand_core::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;

    struct World {
        rng: ChaCha20Rng,
        relay: SigningKey,
        alice: IdentityKeyPair,
        bob: IdentityKeyPair,
    }

    fn world() -> World {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let relay = SigningKey::generate(&mut rng);
        let alice = IdentityKeyPair::generate_with(&mut rng);
        let bob = IdentityKeyPair::generate_with(&mut rng);
        World {
            rng,
            relay,
            alice,
            bob,
        }
    }

    fn certificate(
        signer: &SigningKey,
        identity: &IdentityKey,
        expires_at: u64,
    ) -> SenderCertificate {
        let body = SenderCertificateBody {
            account: AccountId([0xA1; 16]),
            device: DeviceId(2),
            identity_key: identity.to_bytes().to_vec(),
            expires_at,
        };
        SenderCertificate::issue(&body, |transcript| signer.sign(transcript).to_bytes())
    }

    #[test]
    fn sealed_message_opens_with_the_certified_sender() {
        let mut w = world();
        let cert = certificate(&w.relay, w.alice.public(), 1_000);
        let sealed = seal(&w.alice, &cert, w.bob.public(), 3, b"inner", &mut w.rng).unwrap();
        let relay_key = w.relay.verifying_key().to_bytes();
        let opened = open(&w.bob, 3, &relay_key, &sealed, 999).unwrap();
        assert_eq!(opened.message, b"inner");
        assert_eq!(opened.sender.account, AccountId([0xA1; 16]));
        assert_eq!(opened.sender.device, DeviceId(2));
        assert_eq!(&opened.sender_identity, w.alice.public());
        // The sender's identity is nowhere in clear.
        let identity = w.alice.public().to_bytes();
        assert!(!sealed
            .windows(identity.len())
            .any(|window| window == identity));
    }

    #[test]
    fn expired_forged_mismatched_and_misdirected_envelopes_are_refused() {
        let mut w = world();
        let relay_key = w.relay.verifying_key().to_bytes();
        let cert = certificate(&w.relay, w.alice.public(), 1_000);
        let sealed = seal(&w.alice, &cert, w.bob.public(), 3, b"x", &mut w.rng).unwrap();
        assert_eq!(
            open(&w.bob, 3, &relay_key, &sealed, 1_000).unwrap_err(),
            CryptoError::InvalidCertificate("expired")
        );
        assert_eq!(
            open(&w.bob, 4, &relay_key, &sealed, 10).unwrap_err(),
            CryptoError::WrongRecipient
        );

        // A certificate signed by someone other than the relay.
        let forger = SigningKey::generate(&mut w.rng);
        let forged = certificate(&forger, w.alice.public(), 1_000);
        let sealed = seal(&w.alice, &forged, w.bob.public(), 3, b"x", &mut w.rng).unwrap();
        assert_eq!(
            open(&w.bob, 3, &relay_key, &sealed, 10).unwrap_err(),
            CryptoError::InvalidCertificate("bad signature")
        );

        // Mallory holds a genuine certificate for Alice but not Alice's key.
        let mallory = IdentityKeyPair::generate_with(&mut w.rng);
        let stolen = certificate(&w.relay, w.alice.public(), 1_000);
        let sealed = seal(&mallory, &stolen, w.bob.public(), 3, b"x", &mut w.rng).unwrap();
        assert_eq!(
            open(&w.bob, 3, &relay_key, &sealed, 10).unwrap_err(),
            CryptoError::InvalidCertificate("certificate names another identity")
        );

        // Not for us at all, tampered, truncated.
        let sealed = seal(&w.alice, &cert, w.bob.public(), 3, b"x", &mut w.rng).unwrap();
        assert_eq!(
            open(&w.alice, 3, &relay_key, &sealed, 10).unwrap_err(),
            CryptoError::DecryptionFailed
        );
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(
            open(&w.bob, 3, &relay_key, &tampered, 10).unwrap_err(),
            CryptoError::DecryptionFailed
        );
        for cut in [0, 1, 20, 33, 100, sealed.len() - 1] {
            assert!(open(&w.bob, 3, &relay_key, &sealed[..cut], 10).is_err());
        }
    }

    /// Cached and uncached sealing produce envelopes the other side opens either way: the
    /// cache changes what is computed, not what is sent.
    #[test]
    fn cached_and_uncached_sealing_and_opening_interoperate() {
        let mut w = world();
        let relay_key = w.relay.verifying_key().to_bytes();
        let cert = certificate(&w.relay, w.alice.public(), 1_000);
        let (mut sending, mut receiving) = (SealCache::default(), SealCache::default());
        for round in 0u8..3 {
            let cached = seal_cached(
                &mut sending,
                &w.alice,
                &cert,
                w.bob.public(),
                3,
                &[round],
                &mut w.rng,
            )
            .unwrap();
            assert_eq!(
                open(&w.bob, 3, &relay_key, &cached, 10).unwrap().message,
                [round]
            );
            let plain = seal(&w.alice, &cert, w.bob.public(), 3, &[round], &mut w.rng).unwrap();
            let opened = open_cached(&mut receiving, &w.bob, 3, &relay_key, &plain, 10).unwrap();
            assert_eq!(opened.message, [round]);
            assert_eq!(&opened.sender_identity, w.alice.public());
        }
    }

    /// A certificate verified once is still checked for expiry on every envelope, and is
    /// trusted only under the relay key it was verified under, with its own signature.
    #[test]
    fn a_cached_certificate_still_expires_and_binds_its_relay_key_and_signature() {
        let mut w = world();
        let relay_key = w.relay.verifying_key().to_bytes();
        let cert = certificate(&w.relay, w.alice.public(), 1_000);
        let mut cache = SealCache::default();
        let sealed = seal(&w.alice, &cert, w.bob.public(), 3, b"x", &mut w.rng).unwrap();
        open_cached(&mut cache, &w.bob, 3, &relay_key, &sealed, 999).unwrap();
        assert_eq!(
            open_cached(&mut cache, &w.bob, 3, &relay_key, &sealed, 1_000).unwrap_err(),
            CryptoError::InvalidCertificate("expired")
        );

        // The same certificate under another relay's key.
        let other_relay = SigningKey::generate(&mut w.rng).verifying_key().to_bytes();
        assert_eq!(
            open_cached(&mut cache, &w.bob, 3, &other_relay, &sealed, 10).unwrap_err(),
            CryptoError::InvalidCertificate("bad signature")
        );

        // The verified body with a signature that is not the relay's.
        let mut forged = cert.clone();
        forged.signature.0[0] ^= 1;
        let sealed = seal(&w.alice, &forged, w.bob.public(), 3, b"x", &mut w.rng).unwrap();
        assert_eq!(
            open_cached(&mut cache, &w.bob, 3, &relay_key, &sealed, 10).unwrap_err(),
            CryptoError::InvalidCertificate("bad signature")
        );

        // Mallory, with Alice's genuine (and cached) certificate but not her key.
        let mallory = IdentityKeyPair::generate_with(&mut w.rng);
        let sealed = seal(&mallory, &cert, w.bob.public(), 3, b"x", &mut w.rng).unwrap();
        assert_eq!(
            open_cached(&mut cache, &w.bob, 3, &relay_key, &sealed, 10).unwrap_err(),
            CryptoError::InvalidCertificate("certificate names another identity")
        );
    }

    /// The identity cache hands back exactly what parsing gives, and never lets an
    /// encoding through that parsing refuses.
    #[test]
    fn a_cached_identity_is_the_parsed_one_and_a_bad_encoding_is_still_refused() {
        let w = world();
        let mut cache = SealCache::default();
        let encoded = w.alice.public().to_bytes();
        assert_eq!(&cache.identity(&encoded).unwrap(), w.alice.public());
        assert_eq!(&cache.identity(&encoded).unwrap(), w.alice.public());
        let mut low_order = encoded;
        low_order[33..].copy_from_slice(&[0; 32]);
        for _ in 0..2 {
            assert_eq!(cache.identity(&low_order), Err(CryptoError::InvalidKey));
        }
        assert_eq!(cache.identity(&encoded[..64]), Err(CryptoError::InvalidKey));
    }
}
