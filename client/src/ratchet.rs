//! The Double Ratchet (Signal specification, revision 4), without IO.
//!
//! - Root KDF: HKDF-SHA256 with the root key as salt and the DH output as input, 64 bytes
//!   out: the new root key and a chain key.
//! - Chain KDF: HMAC-SHA256 of the chain key: over `0x01` for the message key, `0x02` for
//!   the next chain key.
//! - Messages: ChaCha20-Poly1305 under a key and nonce derived from the message key, with
//!   the session's associated data (both identity keys) and the header as AAD.
//!
//! Decryption is transactional: everything it would change (skipped keys, new chains, a new
//! ratchet key) is computed into a [`Staged`] value first and applied only once the AEAD
//! has accepted the message, so a failed decrypt leaves the state exactly as it was.

use std::collections::{BTreeMap, VecDeque};

use rand_core::CryptoRngCore;
use x25519_dalek::PublicKey;
use zeroize::Zeroizing;

use crate::error::CryptoError;
use crate::kdf;
use crate::keys::EcKeyPair;

/// How far one message may jump ahead in a chain. libsignal allows 25,000, vodozemac 2,000;
/// we take the smaller: a gap this large on a phone means lost messages, not a backlog.
pub const MAX_FORWARD_JUMP: u32 = 2_000;
/// How many skipped message keys a session keeps in total; the oldest go first.
pub const MAX_SKIPPED_KEYS: usize = 2_000;
/// How long a skipped key is kept, in seconds: the relay deletes any undelivered message
/// after 14 days (P3), so a key older than that can never be used.
pub const MAX_SKIPPED_AGE_SECS: u64 = 14 * 24 * 3600;
/// How many previous receiving ratchet keys are remembered, to tell a replayed message of
/// an old chain from a new ratchet step.
const REMEMBERED_RATCHET_KEYS: usize = 8;

const ROOT_INFO: &[u8] = b"hush-ratchet-root-v1";
const MESSAGE_LABEL: &[u8] = b"hush-ratchet-message-v1";

/// A message header: the sender's ratchet key, the length of its previous sending chain,
/// and this message's number in the current chain.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Header {
    /// The sender's current ratchet public key.
    pub ratchet_key: [u8; 32],
    /// Messages in the sender's previous sending chain.
    pub previous_chain_length: u32,
    /// This message's number in its chain.
    pub counter: u32,
}

/// Length of an encoded header.
pub const HEADER_LEN: usize = 40;

impl Header {
    /// `ratchet_key || previous_chain_length (BE) || counter (BE)`.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..32].copy_from_slice(&self.ratchet_key);
        out[32..36].copy_from_slice(&self.previous_chain_length.to_be_bytes());
        out[36..].copy_from_slice(&self.counter.to_be_bytes());
        out
    }

    /// Parses an encoded header.
    pub fn from_bytes(bytes: &[u8; HEADER_LEN]) -> Self {
        let mut ratchet_key = [0u8; 32];
        ratchet_key.copy_from_slice(&bytes[..32]);
        let mut previous = [0u8; 4];
        previous.copy_from_slice(&bytes[32..36]);
        let mut counter = [0u8; 4];
        counter.copy_from_slice(&bytes[36..]);
        Header {
            ratchet_key,
            previous_chain_length: u32::from_be_bytes(previous),
            counter: u32::from_be_bytes(counter),
        }
    }
}

/// A symmetric chain: its key and the number of the next message key it yields.
#[derive(Clone)]
pub(crate) struct Chain {
    pub(crate) key: Zeroizing<[u8; 32]>,
    pub(crate) index: u32,
}

impl Chain {
    fn new(key: &[u8; 32]) -> Self {
        Chain {
            key: Zeroizing::new(*key),
            index: 0,
        }
    }

    /// Yields the current message key and steps the chain. A chain ends after 2^32 - 1
    /// messages; the ratchet steps long before that in any real conversation.
    fn step(&mut self) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
        let next = self
            .index
            .checked_add(1)
            .ok_or(CryptoError::InvalidMessage)?;
        let message_key = kdf::hmac(self.key.as_ref(), &[0x01]);
        self.key = kdf::hmac(self.key.as_ref(), &[0x02]);
        self.index = next;
        Ok(message_key)
    }
}

/// A stored key for a message that was skipped over.
#[derive(Clone)]
pub(crate) struct SkippedKey {
    pub(crate) key: Zeroizing<[u8; 32]>,
    pub(crate) stored_at: u64,
}

/// The state of one Double Ratchet session.
pub struct Ratchet {
    pub(crate) root_key: Zeroizing<[u8; 32]>,
    pub(crate) our_ratchet_key: EcKeyPair,
    pub(crate) their_ratchet_key: Option<PublicKey>,
    pub(crate) sending: Option<Chain>,
    pub(crate) receiving: Option<Chain>,
    pub(crate) previous_sending_length: u32,
    /// Keyed by (ratchet key, counter).
    pub(crate) skipped: BTreeMap<([u8; 32], u32), SkippedKey>,
    /// Receiving ratchet keys we have moved past, newest last.
    pub(crate) previous_their_keys: VecDeque<[u8; 32]>,
    /// Both identity keys (initiator's first); authenticated with every message.
    pub(crate) associated_data: Vec<u8>,
}

/// A 32-byte secret (root, chain or message key).
type SecretKey = Zeroizing<[u8; 32]>;

/// Message keys passed over, by (ratchet key, counter).
type SkippedKeys = Vec<(([u8; 32], u32), Zeroizing<[u8; 32]>)>;

/// What a successful decrypt will change, computed before the AEAD check.
struct Staged {
    skipped: SkippedKeys,
    step: Option<RatchetStep>,
    receiving: Chain,
}

/// A DH ratchet step in waiting: the root key after the receiving half, and their new key.
struct RatchetStep {
    root_key: Zeroizing<[u8; 32]>,
    their_key: PublicKey,
}

fn kdf_root(
    root_key: &[u8; 32],
    ours: &EcKeyPair,
    theirs: &PublicKey,
) -> Result<(SecretKey, SecretKey), CryptoError> {
    let shared = kdf::dh(ours.secret(), theirs)?;
    let out = kdf::hkdf::<64>(root_key, shared.as_bytes(), ROOT_INFO);
    let mut root = Zeroizing::new([0u8; 32]);
    root.copy_from_slice(&out[..32]);
    let mut chain = Zeroizing::new([0u8; 32]);
    chain.copy_from_slice(&out[32..]);
    Ok((root, chain))
}

impl Ratchet {
    /// The initiator's state: it knows the responder's signed prekey, which serves as the
    /// responder's first ratchet key, and starts a sending chain at once.
    pub(crate) fn initiator(
        shared_secret: &[u8; 32],
        their_ratchet_key: PublicKey,
        associated_data: Vec<u8>,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Self, CryptoError> {
        let ours = EcKeyPair::generate(rng);
        let (root_key, sending) = kdf_root(shared_secret, &ours, &their_ratchet_key)?;
        Ok(Ratchet {
            root_key,
            our_ratchet_key: ours,
            their_ratchet_key: Some(their_ratchet_key),
            sending: Some(Chain::new(&sending)),
            receiving: None,
            previous_sending_length: 0,
            skipped: BTreeMap::new(),
            previous_their_keys: VecDeque::new(),
            associated_data,
        })
    }

    /// The responder's state: its signed prekey is its first ratchet key; it can send once
    /// it has received.
    pub(crate) fn responder(
        shared_secret: &[u8; 32],
        our_ratchet_key: EcKeyPair,
        associated_data: Vec<u8>,
    ) -> Self {
        Ratchet {
            root_key: Zeroizing::new(*shared_secret),
            our_ratchet_key,
            their_ratchet_key: None,
            sending: None,
            receiving: None,
            previous_sending_length: 0,
            skipped: BTreeMap::new(),
            previous_their_keys: VecDeque::new(),
            associated_data,
        }
    }

    /// Whether this side can send (the responder can only after its first receive).
    pub fn can_send(&self) -> bool {
        self.sending.is_some()
    }

    /// Encrypts one message: returns its header and ciphertext.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<(Header, Vec<u8>), CryptoError> {
        let chain = self.sending.as_mut().ok_or(CryptoError::InvalidMessage)?;
        let header = Header {
            ratchet_key: self.our_ratchet_key.public().to_bytes(),
            previous_chain_length: self.previous_sending_length,
            counter: chain.index,
        };
        let message_key = chain.step()?;
        let aad = aad(&self.associated_data, &header);
        Ok((
            header,
            kdf::seal_once(&message_key, MESSAGE_LABEL, plaintext, &aad)?,
        ))
    }

    /// Decrypts one message. On any error the state is unchanged.
    pub fn decrypt(
        &mut self,
        header: &Header,
        ciphertext: &[u8],
        now: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let aad = aad(&self.associated_data, header);
        let skipped_id = (header.ratchet_key, header.counter);
        if let Some(skipped) = self.skipped.get(&skipped_id) {
            if now.saturating_sub(skipped.stored_at) >= MAX_SKIPPED_AGE_SECS {
                // Past its age: as good as dropped, whether or not a prune has run.
                return Err(CryptoError::DuplicateMessage);
            }
            let plaintext = kdf::open_once(&skipped.key, MESSAGE_LABEL, ciphertext, &aad)?;
            self.skipped.remove(&skipped_id);
            return Ok(plaintext);
        }

        let mut staged = self.stage(header)?;
        let message_key = staged.receiving.step()?;
        let plaintext = kdf::open_once(&message_key, MESSAGE_LABEL, ciphertext, &aad)?;
        self.apply(staged, now, rng)?;
        Ok(plaintext)
    }

    /// Works out the receiving chain positioned at `header.counter`, and the skipped keys
    /// on the way, without touching `self`.
    fn stage(&self, header: &Header) -> Result<Staged, CryptoError> {
        let current = self
            .their_ratchet_key
            .filter(|key| key.as_bytes() == &header.ratchet_key);
        if current.is_some() {
            // Same chain as before.
            let mut chain = self
                .receiving
                .clone()
                .ok_or(CryptoError::DecryptionFailed)?;
            if header.counter < chain.index {
                return Err(CryptoError::DuplicateMessage);
            }
            let mut skipped = Vec::new();
            skip(&mut chain, header.ratchet_key, header.counter, &mut skipped)?;
            return Ok(Staged {
                skipped,
                step: None,
                receiving: chain,
            });
        }
        if self.previous_their_keys.contains(&header.ratchet_key) {
            // An old chain whose key for this counter is not stored: used or dropped.
            return Err(CryptoError::DuplicateMessage);
        }

        // A new ratchet key: finish the current receiving chain up to the length the
        // sender says it had, then step the root.
        let mut skipped = Vec::new();
        if let (Some(mut chain), Some(theirs)) = (self.receiving.clone(), self.their_ratchet_key) {
            skip(
                &mut chain,
                theirs.to_bytes(),
                header.previous_chain_length,
                &mut skipped,
            )?;
        }
        let their_key = PublicKey::from(header.ratchet_key);
        let (root_key, receiving) = kdf_root(&self.root_key, &self.our_ratchet_key, &their_key)?;
        let mut chain = Chain::new(&receiving);
        skip(&mut chain, header.ratchet_key, header.counter, &mut skipped)?;
        Ok(Staged {
            skipped,
            step: Some(RatchetStep {
                root_key,
                their_key,
            }),
            receiving: chain,
        })
    }

    fn apply(
        &mut self,
        staged: Staged,
        now: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<(), CryptoError> {
        if let Some(step) = staged.step {
            // The sending half of the DH ratchet: a fresh key pair and a new sending chain.
            let ours = EcKeyPair::generate(rng);
            let (root_key, sending) = kdf_root(&step.root_key, &ours, &step.their_key)?;
            if let Some(old) = self.their_ratchet_key.replace(step.their_key) {
                if self.previous_their_keys.len() == REMEMBERED_RATCHET_KEYS {
                    self.previous_their_keys.pop_front();
                }
                self.previous_their_keys.push_back(old.to_bytes());
            }
            self.previous_sending_length = self.sending.as_ref().map_or(0, |chain| chain.index);
            self.root_key = root_key;
            self.our_ratchet_key = ours;
            self.sending = Some(Chain::new(&sending));
        }
        self.receiving = Some(staged.receiving);
        for (id, key) in staged.skipped {
            self.skipped.insert(
                id,
                SkippedKey {
                    key,
                    stored_at: now,
                },
            );
        }
        self.prune_skipped(now);
        Ok(())
    }

    /// Drops skipped keys past their age, then the oldest ones beyond the count bound.
    fn prune_skipped(&mut self, now: u64) {
        self.skipped
            .retain(|_, key| now.saturating_sub(key.stored_at) < MAX_SKIPPED_AGE_SECS);
        if self.skipped.len() > MAX_SKIPPED_KEYS {
            let mut by_age: Vec<_> = self
                .skipped
                .iter()
                .map(|(id, key)| (key.stored_at, *id))
                .collect();
            by_age.sort_unstable();
            let excess = self.skipped.len() - MAX_SKIPPED_KEYS;
            for (_, id) in by_age.into_iter().take(excess) {
                self.skipped.remove(&id);
            }
        }
    }

    /// Whether `ratchet_key` is the peer's current ratchet key or one of the last
    /// [`REMEMBERED_RATCHET_KEYS`] before it: a replay of a message of such a chain is
    /// recognised as `DuplicateMessage`; one from an older chain can only fail to decrypt.
    #[cfg(feature = "test-support")]
    pub(crate) fn remembers_chain(&self, ratchet_key: &[u8; 32]) -> bool {
        self.their_ratchet_key
            .is_some_and(|key| key.as_bytes() == ratchet_key)
            || self.previous_their_keys.contains(ratchet_key)
    }

    /// Number of stored skipped keys (for tests and diagnostics).
    pub fn skipped_keys(&self) -> usize {
        self.skipped.len()
    }
}

/// Steps `chain` up to `until`, collecting the keys it passes.
fn skip(
    chain: &mut Chain,
    ratchet_key: [u8; 32],
    until: u32,
    out: &mut SkippedKeys,
) -> Result<(), CryptoError> {
    let gap = until.saturating_sub(chain.index);
    if gap > MAX_FORWARD_JUMP {
        return Err(CryptoError::TooFarAhead {
            skipped: gap,
            limit: MAX_FORWARD_JUMP,
        });
    }
    while chain.index < until {
        let index = chain.index;
        out.push(((ratchet_key, index), chain.step()?));
    }
    Ok(())
}

fn aad(associated_data: &[u8], header: &Header) -> Vec<u8> {
    let mut out = Vec::with_capacity(associated_data.len() + HEADER_LEN);
    out.extend_from_slice(associated_data);
    out.extend_from_slice(&header.to_bytes());
    out
}

#[cfg(test)]
mod tests {
    use rand_chacha::rand_core::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;

    fn pair(rng: &mut ChaCha20Rng) -> (Ratchet, Ratchet) {
        let secret = [42u8; 32];
        let bob_key = EcKeyPair::generate(rng);
        let alice = Ratchet::initiator(&secret, *bob_key.public(), b"ad".to_vec(), rng).unwrap();
        let bob = Ratchet::responder(&secret, bob_key, b"ad".to_vec());
        (alice, bob)
    }

    #[test]
    fn messages_flow_both_ways_with_ratchet_steps() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let (mut alice, mut bob) = pair(&mut rng);
        for round in 0..5u8 {
            let (h, c) = alice.encrypt(&[round]).unwrap();
            assert_eq!(
                bob.decrypt(&h, &c, 0, &mut rng).unwrap().as_slice(),
                &[round]
            );
            let (h, c) = bob.encrypt(&[round, 1]).unwrap();
            assert_eq!(
                alice.decrypt(&h, &c, 0, &mut rng).unwrap().as_slice(),
                &[round, 1]
            );
        }
    }

    #[test]
    fn out_of_order_messages_use_skipped_keys_once() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let (mut alice, mut bob) = pair(&mut rng);
        let sent: Vec<_> = (0..5u8).map(|i| alice.encrypt(&[i]).unwrap()).collect();
        for i in [4usize, 0, 2, 1, 3] {
            let (h, c) = &sent[i];
            assert_eq!(
                bob.decrypt(h, c, 0, &mut rng).unwrap().as_slice(),
                &[i as u8]
            );
        }
        assert_eq!(bob.skipped_keys(), 0);
        let (h, c) = &sent[2];
        assert_eq!(
            bob.decrypt(h, c, 0, &mut rng).unwrap_err(),
            CryptoError::DuplicateMessage
        );
    }

    #[test]
    fn skipped_keys_of_a_previous_chain_survive_a_ratchet_step() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let (mut alice, mut bob) = pair(&mut rng);
        let late = alice.encrypt(b"late").unwrap();
        let first = alice.encrypt(b"first").unwrap();
        bob.decrypt(&first.0, &first.1, 0, &mut rng).unwrap();
        let reply = bob.encrypt(b"reply").unwrap();
        alice.decrypt(&reply.0, &reply.1, 0, &mut rng).unwrap();
        let next = alice.encrypt(b"next").unwrap();
        bob.decrypt(&next.0, &next.1, 0, &mut rng).unwrap();
        assert_eq!(
            bob.decrypt(&late.0, &late.1, 0, &mut rng)
                .unwrap()
                .as_slice(),
            b"late"
        );
    }

    #[test]
    fn a_jump_beyond_the_bound_is_refused_and_changes_nothing() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let (mut alice, mut bob) = pair(&mut rng);
        let (mut header, ciphertext) = alice.encrypt(b"x").unwrap();
        header.counter = MAX_FORWARD_JUMP + 1;
        assert!(matches!(
            bob.decrypt(&header, &ciphertext, 0, &mut rng),
            Err(CryptoError::TooFarAhead { .. })
        ));
        assert!(bob.receiving.is_none() && bob.skipped_keys() == 0);
        header.counter = 0;
        assert_eq!(
            bob.decrypt(&header, &ciphertext, 0, &mut rng)
                .unwrap()
                .as_slice(),
            b"x"
        );
    }

    #[test]
    fn tampering_fails_and_leaves_the_state_as_it_was() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let (mut alice, mut bob) = pair(&mut rng);
        let (header, ciphertext) = alice.encrypt(b"hello").unwrap();
        let mut bad = ciphertext.clone();
        bad[0] ^= 1;
        let root_before = *bob.root_key;
        assert_eq!(
            bob.decrypt(&header, &bad, 0, &mut rng).unwrap_err(),
            CryptoError::DecryptionFailed
        );
        assert_eq!(*bob.root_key, root_before);
        assert!(bob.receiving.is_none() && !bob.can_send());
        assert_eq!(
            bob.decrypt(&header, &ciphertext, 0, &mut rng)
                .unwrap()
                .as_slice(),
            b"hello"
        );
    }

    #[test]
    fn a_skipped_key_past_its_age_no_longer_opens() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let (mut alice, mut bob) = pair(&mut rng);
        let late = alice.encrypt(b"late").unwrap();
        let now = alice.encrypt(b"now").unwrap();
        bob.decrypt(&now.0, &now.1, 1_000, &mut rng).unwrap();
        assert_eq!(
            bob.decrypt(&late.0, &late.1, 1_000 + MAX_SKIPPED_AGE_SECS, &mut rng)
                .unwrap_err(),
            CryptoError::DuplicateMessage
        );
        assert_eq!(
            bob.decrypt(&late.0, &late.1, 1_000 + MAX_SKIPPED_AGE_SECS - 1, &mut rng)
                .unwrap()
                .as_slice(),
            b"late"
        );
    }

    #[test]
    fn skipped_keys_are_bounded_in_count_and_age() {
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        let (mut alice, mut bob) = pair(&mut rng);
        // Three jumps of MAX_FORWARD_JUMP each: more keys than the total bound.
        for _ in 0..3 {
            for _ in 0..MAX_FORWARD_JUMP {
                alice.encrypt(b"").unwrap();
            }
            let (h, c) = alice.encrypt(b"seen").unwrap();
            bob.decrypt(&h, &c, 0, &mut rng).unwrap();
        }
        assert_eq!(bob.skipped_keys(), MAX_SKIPPED_KEYS);
        let (h, c) = alice.encrypt(b"later").unwrap();
        bob.decrypt(&h, &c, MAX_SKIPPED_AGE_SECS, &mut rng).unwrap();
        assert_eq!(bob.skipped_keys(), 0);
    }
}
