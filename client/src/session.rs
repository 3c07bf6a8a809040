//! A pairwise session with one peer device: PQXDH setup plus the Double Ratchet, and the
//! rule that the initiator keeps sending prekey messages until the responder answers.

use rand_core::CryptoRngCore;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::error::CryptoError;
use crate::keys::{IdentityKey, IdentityKeyPair};
use crate::message::{CiphertextMessage, PrekeyMessage, RatchetMessage};
use crate::pqxdh::{self, PeerBundle, ResponderKeys};
use crate::prekeys::{PrekeySet, UsedPrekeys};
use crate::ratchet::Ratchet;

/// Setup data the initiator repeats in every message until the first reply.
#[derive(Clone)]
pub(crate) struct PendingPrekey {
    pub(crate) identity: IdentityKey,
    pub(crate) signed_prekey_id: u32,
    pub(crate) one_time_prekey_id: Option<u32>,
    pub(crate) kem_prekey_id: u32,
    pub(crate) kem_ciphertext: Vec<u8>,
}

/// An end-to-end session with one device of a peer.
pub struct Session {
    pub(crate) ratchet: Ratchet,
    pub(crate) remote_identity: IdentityKey,
    /// The initiator's base key: names this setup on both sides, so a repeated prekey
    /// message is recognised as belonging to this session rather than starting a new one.
    pub(crate) base_key: [u8; 32],
    pub(crate) pending: Option<PendingPrekey>,
}

impl Session {
    /// Starts a session from a verified prekey bundle.
    pub fn initiate(
        ours: &IdentityKeyPair,
        bundle: &PeerBundle,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Self, CryptoError> {
        let setup = pqxdh::initiate(ours, bundle, rng)?;
        let ratchet = Ratchet::initiator(
            &setup.shared_secret,
            bundle.signed_prekey,
            setup.associated_data,
            rng,
        )?;
        Ok(Session {
            ratchet,
            remote_identity: bundle.identity,
            base_key: setup.base_key.to_bytes(),
            pending: Some(PendingPrekey {
                identity: *ours.public(),
                signed_prekey_id: bundle.signed_prekey_id,
                one_time_prekey_id: bundle.one_time.as_ref().map(|(id, _)| *id),
                kem_prekey_id: bundle.kem_id,
                kem_ciphertext: setup.kem_ciphertext,
            }),
        })
    }

    /// Accepts a prekey message as the responder: a new session, the first plaintext, and
    /// the one-time prekeys to delete. Nothing is changed on error (prekeys included).
    pub fn accept(
        ours: &IdentityKeyPair,
        prekeys: &PrekeySet,
        message: &PrekeyMessage,
        now: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<(Self, Zeroizing<Vec<u8>>, UsedPrekeys), CryptoError> {
        let signed_prekey = prekeys
            .signed_prekey(message.signed_prekey_id)
            .ok_or(CryptoError::UnknownPrekey)?;
        let one_time = message
            .one_time_prekey_id
            .map(|id| {
                prekeys
                    .one_time_prekey(id)
                    .ok_or(CryptoError::UnknownPrekey)
            })
            .transpose()?;
        let kem = prekeys
            .kem_prekey(message.kem_prekey_id)
            .ok_or(CryptoError::UnknownPrekey)?;
        let keys = ResponderKeys {
            signed_prekey,
            one_time,
            kem,
        };
        let (shared_secret, associated_data) = pqxdh::respond(
            ours,
            &message.identity,
            &message.base_key,
            &keys,
            &message.kem_ciphertext,
        )?;
        let mut ratchet =
            Ratchet::responder(&shared_secret, signed_prekey.key.clone(), associated_data);
        let plaintext = ratchet.decrypt(
            &message.message.header,
            &message.message.ciphertext,
            now,
            rng,
        )?;
        let used = UsedPrekeys {
            one_time: message.one_time_prekey_id,
            kem_one_time: (!kem.last_resort).then_some(kem.id),
        };
        let session = Session {
            ratchet,
            remote_identity: message.identity,
            base_key: message.base_key.to_bytes(),
            pending: None,
        };
        Ok((session, plaintext, used))
    }

    /// Encrypts a message: a prekey message until the peer has answered, then a ratchet
    /// message.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<CiphertextMessage, CryptoError> {
        let (header, ciphertext) = self.ratchet.encrypt(plaintext)?;
        let message = RatchetMessage { header, ciphertext };
        Ok(match &self.pending {
            None => CiphertextMessage::Ratchet(message),
            Some(pending) => CiphertextMessage::Prekey(Box::new(PrekeyMessage {
                identity: pending.identity,
                base_key: x25519_dalek::PublicKey::from(self.base_key),
                signed_prekey_id: pending.signed_prekey_id,
                one_time_prekey_id: pending.one_time_prekey_id,
                kem_prekey_id: pending.kem_prekey_id,
                kem_ciphertext: pending.kem_ciphertext.clone(),
                message,
            })),
        })
    }

    /// Whether a prekey message continues this session (same setup) rather than starting
    /// a new one.
    pub fn continues(&self, message: &PrekeyMessage) -> bool {
        bool::from(self.base_key.ct_eq(message.base_key.as_bytes()))
            && message.identity == self.remote_identity
    }

    /// Decrypts a message of this session. On error the session is unchanged.
    pub fn decrypt(
        &mut self,
        message: &CiphertextMessage,
        now: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let inner = match message {
            CiphertextMessage::Ratchet(inner) => inner,
            CiphertextMessage::Prekey(prekey) if self.continues(prekey) => &prekey.message,
            CiphertextMessage::Prekey(_) => return Err(CryptoError::DecryptionFailed),
        };
        let plaintext = self
            .ratchet
            .decrypt(&inner.header, &inner.ciphertext, now, rng)?;
        // Anything that decrypts came from the peer's ratchet, so it has our setup.
        if matches!(message, CiphertextMessage::Ratchet(_)) {
            self.pending = None;
        }
        Ok(plaintext)
    }

    /// The peer's identity key.
    pub fn remote_identity(&self) -> &IdentityKey {
        &self.remote_identity
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Session(<redacted>)")
    }
}

/// How many sessions with one device are kept.
const MAX_SESSIONS_PER_DEVICE: usize = 4;

/// The sessions with one peer device: the current one first, then a few earlier ones.
/// Earlier ones matter when both sides set up a session at the same moment: each accepts
/// the other's, and messages keep arriving on either until both settle on one.
pub(crate) struct SessionSet {
    pub(crate) sessions: Vec<Session>,
}

impl SessionSet {
    pub(crate) fn new(session: Session) -> Self {
        SessionSet {
            sessions: vec![session],
        }
    }

    /// The session we send with.
    pub(crate) fn current_mut(&mut self) -> Option<&mut Session> {
        self.sessions.first_mut()
    }

    /// The current session's peer identity.
    pub(crate) fn remote_identity(&self) -> Option<&IdentityKey> {
        self.sessions.first().map(Session::remote_identity)
    }

    /// Whether any kept session continues this prekey message's setup.
    pub(crate) fn continues(&self, message: &PrekeyMessage) -> bool {
        self.sessions.iter().any(|s| s.continues(message))
    }

    /// Makes a new session current, keeping a few earlier ones.
    pub(crate) fn promote_new(&mut self, session: Session) {
        self.sessions.insert(0, session);
        self.sessions.truncate(MAX_SESSIONS_PER_DEVICE);
    }

    /// Decrypts with whichever kept session opens the message, and makes that one current.
    /// On error every session is unchanged. A session that recognises the message as one it
    /// has already opened says so (`DuplicateMessage`, a redelivery the caller drops
    /// quietly); otherwise the error is the current session's.
    pub(crate) fn decrypt(
        &mut self,
        message: &CiphertextMessage,
        now: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let mut first_error = None;
        for index in 0..self.sessions.len() {
            match self.sessions[index].decrypt(message, now, rng) {
                Ok(plaintext) => {
                    let session = self.sessions.remove(index);
                    self.sessions.insert(0, session);
                    return Ok(plaintext);
                }
                Err(CryptoError::DuplicateMessage) => {
                    return Err(CryptoError::DuplicateMessage);
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        Err(first_error.unwrap_or(CryptoError::DecryptionFailed))
    }
}

#[cfg(test)]
mod tests {
    use hush_protocol::{DeviceBundle, DeviceId};
    use rand_chacha::rand_core::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;

    struct Party {
        identity: IdentityKeyPair,
        prekeys: PrekeySet,
        bundle: DeviceBundle,
    }

    fn party(rng: &mut ChaCha20Rng) -> Party {
        let identity = IdentityKeyPair::generate_with(rng);
        let mut prekeys = PrekeySet::default();
        let signed = prekeys.rotate(&identity, 0, rng);
        let one_time = prekeys.replenish(&identity, 1, rng);
        let bundle = DeviceBundle {
            device: DeviceId(1),
            device_key: [0; 32],
            signed_prekey: signed.signed_prekey,
            one_time: one_time.one_time.into_iter().next(),
            kem: one_time.kem_one_time.into_iter().next(),
            kem_is_last_resort: false,
        };
        Party {
            identity,
            prekeys,
            bundle,
        }
    }

    fn initiate(from: &Party, to: &Party, rng: &mut ChaCha20Rng) -> Session {
        let peer = PeerBundle::verify(&to.identity.public().to_bytes(), &to.bundle).unwrap();
        Session::initiate(&from.identity, &peer, rng).unwrap()
    }

    fn accept(at: &Party, message: &CiphertextMessage, rng: &mut ChaCha20Rng) -> Session {
        let CiphertextMessage::Prekey(prekey) = message else {
            panic!("expected a prekey message");
        };
        Session::accept(&at.identity, &at.prekeys, prekey, 0, rng)
            .unwrap()
            .0
    }

    /// Both sides set up a session at once; each keeps both, and they settle on one.
    /// A redelivered message of the session that is no longer current is recognised as a
    /// duplicate, not reported as undecryptable.
    #[test]
    fn simultaneous_setups_settle_and_redeliveries_are_duplicates() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let (alice, bob) = (party(&mut rng), party(&mut rng));
        let mut alice_first = initiate(&alice, &bob, &mut rng);
        let mut bob_first = initiate(&bob, &alice, &mut rng);
        let from_alice = alice_first.encrypt(b"from alice").unwrap();
        let from_bob = bob_first.encrypt(b"from bob").unwrap();

        let mut at_alice = SessionSet::new(alice_first);
        let mut at_bob = SessionSet::new(bob_first);
        at_alice.promote_new(accept(&alice, &from_bob, &mut rng));
        at_bob.promote_new(accept(&bob, &from_alice, &mut rng));

        // Bob answers on the session Alice started: Alice switches to it.
        let answer = at_bob.current_mut().unwrap().encrypt(b"answer").unwrap();
        assert!(matches!(answer, CiphertextMessage::Ratchet(_)));
        let opened = at_alice.decrypt(&answer, 0, &mut rng).unwrap();
        assert_eq!(opened.as_slice(), b"answer");
        let reply = at_alice.current_mut().unwrap().encrypt(b"reply").unwrap();
        assert_eq!(
            at_bob.decrypt(&reply, 0, &mut rng).unwrap().as_slice(),
            b"reply"
        );

        // Bob's setup comes again (the relay redelivers what was not acknowledged).
        let CiphertextMessage::Prekey(prekey) = &from_bob else {
            panic!("expected a prekey message");
        };
        assert!(at_alice.continues(prekey));
        assert_eq!(
            at_alice.decrypt(&from_bob, 0, &mut rng).unwrap_err(),
            CryptoError::DuplicateMessage
        );
        assert_eq!(
            at_alice.decrypt(&answer, 0, &mut rng).unwrap_err(),
            CryptoError::DuplicateMessage
        );
        // Something no kept session knows is still undecryptable.
        let mut stranger = initiate(&party(&mut rng), &alice, &mut rng);
        let foreign = CiphertextMessage::Ratchet(match stranger.encrypt(b"?").unwrap() {
            CiphertextMessage::Prekey(prekey) => prekey.message,
            CiphertextMessage::Ratchet(message) => message,
        });
        assert_eq!(
            at_alice.decrypt(&foreign, 0, &mut rng).unwrap_err(),
            CryptoError::DecryptionFailed
        );
    }
}
