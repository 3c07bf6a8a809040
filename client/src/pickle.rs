//! Serialized forms of secret state, for the encrypted local store only (vodozemac calls
//! these pickles). They zeroize on drop; nothing else serializes a secret.
//!
//! Every pickle is `version byte || postcard body`: a reader checks the version before it
//! decodes, and refuses a body with bytes left over, so a damaged or foreign value is a
//! typed [`PickleError`], never a half-read state.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

pub(crate) use crate::error::PickleError;
use crate::keys::{EcKeyPair, IdentityKey, KemPrekey, OneTimePrekey, SignedPrekey};
use crate::prekeys::PrekeySet;
use crate::ratchet::{Chain, Ratchet, SkippedKey};
use crate::session::{PendingPrekey, Session, SessionSet};

// The format versions this build writes and reads, one per pickled type so that one can
// change without the others. Version 1 is the first versioned format: stores written before
// it (a bare postcard body, no version byte) are not read, as none was ever deployed.
const SESSION_VERSION: u8 = 1;
const SESSION_SET_VERSION: u8 = 1;
const PREKEYS_VERSION: u8 = 1;

/// `version || postcard(value)`. Postcard fails only for a `Serialize` impl that reports an
/// error (the derived ones never do), but a failure is an error, never an empty value that
/// would be persisted in place of the state.
pub(crate) fn versioned(
    version: u8,
    value: &impl Serialize,
) -> Result<Zeroizing<Vec<u8>>, PickleError> {
    postcard::to_extend(value, vec![version])
        .map(Zeroizing::new)
        .map_err(|_| PickleError::Encode)
}

/// The reverse of [`versioned`]: the version must be `version`, the body must decode and
/// be all of the input.
pub(crate) fn unversioned<'a, T: Deserialize<'a>>(
    version: u8,
    bytes: &'a [u8],
) -> Result<T, PickleError> {
    let (&found, body) = bytes.split_first().ok_or(PickleError::Corrupt)?;
    if found != version {
        return Err(PickleError::UnknownVersion(found));
    }
    let (value, rest) = postcard::take_from_bytes(body).map_err(|_| PickleError::Corrupt)?;
    if !rest.is_empty() {
        return Err(PickleError::Corrupt);
    }
    Ok(value)
}

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct ChainPickle {
    key: [u8; 32],
    index: u32,
}

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct SkippedPickle {
    ratchet_key: [u8; 32],
    counter: u32,
    key: [u8; 32],
    stored_at: u64,
}

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct PendingPickle {
    identity: Vec<u8>,
    signed_prekey_id: u32,
    one_time_prekey_id: Option<u32>,
    kem_prekey_id: u32,
    kem_ciphertext: Vec<u8>,
}

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct SessionPickle {
    root_key: [u8; 32],
    our_ratchet_key: [u8; 32],
    their_ratchet_key: Option<[u8; 32]>,
    sending: Option<ChainPickle>,
    receiving: Option<ChainPickle>,
    previous_sending_length: u32,
    skipped: Vec<SkippedPickle>,
    previous_their_keys: Vec<[u8; 32]>,
    associated_data: Vec<u8>,
    remote_identity: Vec<u8>,
    base_key: [u8; 32],
    pending: Option<PendingPickle>,
}

fn chain_pickle(chain: &Chain) -> ChainPickle {
    ChainPickle {
        key: *chain.key,
        index: chain.index,
    }
}

fn chain_unpickle(pickle: &ChainPickle) -> Chain {
    Chain {
        key: Zeroizing::new(pickle.key),
        index: pickle.index,
    }
}

/// A session as bytes, for sealing into the local store.
pub(crate) fn pickle_session(session: &Session) -> Result<Zeroizing<Vec<u8>>, PickleError> {
    let ratchet = &session.ratchet;
    let pickle = SessionPickle {
        root_key: *ratchet.root_key,
        our_ratchet_key: ratchet.our_ratchet_key.secret().to_bytes(),
        their_ratchet_key: ratchet.their_ratchet_key.map(|key| key.to_bytes()),
        sending: ratchet.sending.as_ref().map(chain_pickle),
        receiving: ratchet.receiving.as_ref().map(chain_pickle),
        previous_sending_length: ratchet.previous_sending_length,
        skipped: ratchet
            .skipped
            .iter()
            .map(|((ratchet_key, counter), skipped)| SkippedPickle {
                ratchet_key: *ratchet_key,
                counter: *counter,
                key: *skipped.key,
                stored_at: skipped.stored_at,
            })
            .collect(),
        previous_their_keys: ratchet.previous_their_keys.iter().copied().collect(),
        associated_data: ratchet.associated_data.clone(),
        remote_identity: session.remote_identity.to_bytes().to_vec(),
        base_key: session.base_key,
        pending: session.pending.as_ref().map(|pending| PendingPickle {
            identity: pending.identity.to_bytes().to_vec(),
            signed_prekey_id: pending.signed_prekey_id,
            one_time_prekey_id: pending.one_time_prekey_id,
            kem_prekey_id: pending.kem_prekey_id,
            kem_ciphertext: pending.kem_ciphertext.clone(),
        }),
    };
    versioned(SESSION_VERSION, &pickle)
}

/// The reverse of [`pickle_session`].
pub(crate) fn unpickle_session(bytes: &[u8]) -> Result<Session, PickleError> {
    let pickle: SessionPickle = unversioned(SESSION_VERSION, bytes)?;
    let ratchet = Ratchet {
        root_key: Zeroizing::new(pickle.root_key),
        our_ratchet_key: EcKeyPair::from_secret(StaticSecret::from(pickle.our_ratchet_key)),
        their_ratchet_key: pickle.their_ratchet_key.map(PublicKey::from),
        sending: pickle.sending.as_ref().map(chain_unpickle),
        receiving: pickle.receiving.as_ref().map(chain_unpickle),
        previous_sending_length: pickle.previous_sending_length,
        skipped: pickle
            .skipped
            .iter()
            .map(|s| {
                (
                    (s.ratchet_key, s.counter),
                    SkippedKey {
                        key: Zeroizing::new(s.key),
                        stored_at: s.stored_at,
                    },
                )
            })
            .collect::<BTreeMap<_, _>>(),
        previous_their_keys: pickle
            .previous_their_keys
            .iter()
            .copied()
            .collect::<VecDeque<_>>(),
        associated_data: pickle.associated_data.clone(),
    };
    let pending = match &pickle.pending {
        None => None,
        Some(p) => Some(PendingPrekey {
            identity: IdentityKey::from_bytes(&p.identity).map_err(|_| PickleError::Corrupt)?,
            signed_prekey_id: p.signed_prekey_id,
            one_time_prekey_id: p.one_time_prekey_id,
            kem_prekey_id: p.kem_prekey_id,
            kem_ciphertext: p.kem_ciphertext.clone(),
        }),
    };
    Ok(Session {
        ratchet,
        remote_identity: IdentityKey::from_bytes(&pickle.remote_identity)
            .map_err(|_| PickleError::Corrupt)?,
        base_key: pickle.base_key,
        pending,
    })
}

/// The sessions with one device, current first.
pub(crate) fn pickle_session_set(set: &SessionSet) -> Result<Zeroizing<Vec<u8>>, PickleError> {
    let pickles = set
        .sessions
        .iter()
        .map(pickle_session)
        .collect::<Result<Vec<_>, _>>()?;
    let raw: Vec<&[u8]> = pickles.iter().map(|p| p.as_slice()).collect();
    versioned(SESSION_SET_VERSION, &raw)
}

/// The reverse of [`pickle_session_set`]. A set is never empty: an empty one is damage.
pub(crate) fn unpickle_session_set(bytes: &[u8]) -> Result<SessionSet, PickleError> {
    let raw: Vec<&[u8]> = unversioned(SESSION_SET_VERSION, bytes)?;
    let sessions = raw
        .into_iter()
        .map(unpickle_session)
        .collect::<Result<Vec<_>, _>>()?;
    if sessions.is_empty() {
        return Err(PickleError::Corrupt);
    }
    Ok(SessionSet { sessions })
}

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct SignedPickle {
    id: u32,
    secret: [u8; 32],
    signature: Vec<u8>,
    created_at: u64,
}

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct KemPickle {
    id: u32,
    seed: Vec<u8>,
    signature: Vec<u8>,
    last_resort: bool,
}

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct PrekeysPickle {
    signed: Vec<SignedPickle>,
    one_time: Vec<(u32, [u8; 32])>,
    kem: Vec<KemPickle>,
    next_id: u32,
}

/// A device's prekeys as bytes.
pub(crate) fn pickle_prekeys(prekeys: &PrekeySet) -> Result<Zeroizing<Vec<u8>>, PickleError> {
    let pickle = PrekeysPickle {
        signed: prekeys
            .signed
            .iter()
            .map(|key| SignedPickle {
                id: key.id,
                secret: key.key.secret().to_bytes(),
                signature: key.signature.to_vec(),
                created_at: key.created_at,
            })
            .collect(),
        one_time: prekeys
            .one_time
            .values()
            .map(|key| (key.id, key.key.secret().to_bytes()))
            .collect(),
        kem: prekeys
            .kem
            .values()
            .map(|key| KemPickle {
                id: key.id,
                seed: key.seed.to_vec(),
                signature: key.signature.to_vec(),
                last_resort: key.last_resort,
            })
            .collect(),
        next_id: prekeys.next_id,
    };
    versioned(PREKEYS_VERSION, &pickle)
}

/// The reverse of [`pickle_prekeys`].
pub(crate) fn unpickle_prekeys(bytes: &[u8]) -> Result<PrekeySet, PickleError> {
    let pickle: PrekeysPickle = unversioned(PREKEYS_VERSION, bytes)?;
    let signature = |bytes: &[u8]| -> Result<[u8; 64], PickleError> {
        bytes.try_into().map_err(|_| PickleError::Corrupt)
    };
    let mut set = PrekeySet {
        next_id: pickle.next_id,
        ..PrekeySet::default()
    };
    for key in &pickle.signed {
        set.signed.push(SignedPrekey {
            id: key.id,
            key: EcKeyPair::from_secret(StaticSecret::from(key.secret)),
            signature: signature(&key.signature)?,
            created_at: key.created_at,
        });
    }
    for (id, secret) in &pickle.one_time {
        set.one_time.insert(
            *id,
            OneTimePrekey {
                id: *id,
                key: EcKeyPair::from_secret(StaticSecret::from(*secret)),
            },
        );
    }
    for key in &pickle.kem {
        let seed: [u8; 64] = key
            .seed
            .as_slice()
            .try_into()
            .map_err(|_| PickleError::Corrupt)?;
        set.kem.insert(
            key.id,
            KemPrekey {
                id: key.id,
                public: crate::keys::kem_public_from_seed(&seed),
                seed: Zeroizing::new(seed),
                signature: signature(&key.signature)?,
                last_resort: key.last_resort,
            },
        );
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use rand_chacha::rand_core::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;
    use crate::keys::IdentityKeyPair;
    use crate::message::CiphertextMessage;
    use crate::pqxdh::PeerBundle;

    #[test]
    fn pickled_sessions_and_prekeys_carry_on_where_they_left_off() {
        let mut rng = ChaCha20Rng::seed_from_u64(21);
        let alice = IdentityKeyPair::generate_with(&mut rng);
        let bob = IdentityKeyPair::generate_with(&mut rng);
        let mut prekeys = PrekeySet::default();
        let upload = prekeys.rotate(&bob, 0, &mut rng);
        let fresh = prekeys.replenish(&bob, 2, &mut rng);
        let prekeys = unpickle_prekeys(&pickle_prekeys(&prekeys).unwrap()).unwrap();
        let bundle = hush_protocol::DeviceBundle {
            device: hush_protocol::DeviceId(1),
            device_key: [0; 32],
            signed_prekey: upload.signed_prekey,
            one_time: Some(fresh.one_time[1].clone()),
            kem: Some(fresh.kem_one_time[1].clone()),
            kem_is_last_resort: false,
        };
        let peer = PeerBundle::verify(&bob.public().to_bytes(), &bundle).unwrap();
        let mut a = Session::initiate(&alice, &peer, &mut rng).unwrap();
        let _lost = a.encrypt(b"lost for now").unwrap();
        let CiphertextMessage::Prekey(first) = a.encrypt(b"one").unwrap() else {
            panic!("prekey message expected")
        };
        let mut a = unpickle_session(&pickle_session(&a).unwrap()).unwrap();
        let (b, _, _) = Session::accept(&bob, &prekeys, &first, 0, &mut rng).unwrap();
        let mut b = unpickle_session(&pickle_session(&b).unwrap()).unwrap();
        assert_eq!(b.ratchet.skipped_keys(), 1);
        let reply = b.encrypt(b"two").unwrap();
        assert_eq!(a.decrypt(&reply, 0, &mut rng).unwrap().as_slice(), b"two");
        let mut a = unpickle_session(&pickle_session(&a).unwrap()).unwrap();
        let three = a.encrypt(b"three").unwrap();
        assert_eq!(b.decrypt(&three, 0, &mut rng).unwrap().as_slice(), b"three");
    }

    /// A session that has sent a prekey message (so it carries its pending prekey), and
    /// the prekeys of its peer.
    fn a_session_and_prekeys() -> (Session, PrekeySet) {
        let mut rng = ChaCha20Rng::seed_from_u64(22);
        let alice = IdentityKeyPair::generate_with(&mut rng);
        let bob = IdentityKeyPair::generate_with(&mut rng);
        let mut prekeys = PrekeySet::default();
        let upload = prekeys.rotate(&bob, 0, &mut rng);
        let fresh = prekeys.replenish(&bob, 1, &mut rng);
        let bundle = hush_protocol::DeviceBundle {
            device: hush_protocol::DeviceId(1),
            device_key: [0; 32],
            signed_prekey: upload.signed_prekey,
            one_time: Some(fresh.one_time[0].clone()),
            kem: Some(fresh.kem_one_time[0].clone()),
            kem_is_last_resort: false,
        };
        let peer = PeerBundle::verify(&bob.public().to_bytes(), &bundle).unwrap();
        let mut session = Session::initiate(&alice, &peer, &mut rng).unwrap();
        session.encrypt(b"hello").unwrap();
        assert!(session.pending.is_some());
        (session, prekeys)
    }

    /// Checks that every damaged copy of the good pickle `good` is refused with the
    /// error that names the damage, by `unpickle`.
    fn refuses_damaged_copies<T>(good: &[u8], unpickle: impl Fn(&[u8]) -> Result<T, PickleError>) {
        assert!(unpickle(good).is_ok(), "the good pickle opens");
        let version = good[0];
        let checks: [(&str, Vec<u8>, PickleError); 5] = [
            ("empty", Vec::new(), PickleError::Corrupt),
            (
                "truncated",
                good[..good.len() - 1].to_vec(),
                PickleError::Corrupt,
            ),
            ("trailing byte", [good, &[0]].concat(), PickleError::Corrupt),
            (
                "garbage",
                [&[version][..], &[0xff; 40]].concat(),
                PickleError::Corrupt,
            ),
            (
                "another version",
                [&[version.wrapping_add(1)][..], &good[1..]].concat(),
                PickleError::UnknownVersion(version.wrapping_add(1)),
            ),
        ];
        for (damage, bytes, expected) in checks {
            assert_eq!(unpickle(&bytes).err(), Some(expected), "{damage}");
        }
    }

    #[test]
    fn a_damaged_session_pickle_is_a_typed_error() {
        let (session, _) = a_session_and_prekeys();
        let good = pickle_session(&session).unwrap();
        assert_eq!(good[0], SESSION_VERSION);
        refuses_damaged_copies(&good, unpickle_session);
    }

    #[test]
    fn a_damaged_session_set_pickle_is_a_typed_error() {
        let (session, _) = a_session_and_prekeys();
        let good = pickle_session_set(&SessionSet::new(session)).unwrap();
        assert_eq!(good[0], SESSION_SET_VERSION);
        refuses_damaged_copies(&good, unpickle_session_set);
    }

    #[test]
    fn a_damaged_prekeys_pickle_is_a_typed_error() {
        let (_, prekeys) = a_session_and_prekeys();
        let good = pickle_prekeys(&prekeys).unwrap();
        assert_eq!(good[0], PREKEYS_VERSION);
        refuses_damaged_copies(&good, unpickle_prekeys);
    }

    #[test]
    fn a_session_pickle_whose_identity_keys_do_not_parse_is_corrupt() {
        let (session, _) = a_session_and_prekeys();
        let good = pickle_session(&session).unwrap();
        let mut pickle: SessionPickle = unversioned(SESSION_VERSION, &good).unwrap();
        pickle.remote_identity = vec![7; 3];
        let bad_remote = versioned(SESSION_VERSION, &pickle).unwrap();
        assert_eq!(
            unpickle_session(&bad_remote).err(),
            Some(PickleError::Corrupt)
        );

        let mut pickle: SessionPickle = unversioned(SESSION_VERSION, &good).unwrap();
        pickle.pending.as_mut().unwrap().identity = vec![7; 3];
        let bad_pending = versioned(SESSION_VERSION, &pickle).unwrap();
        assert_eq!(
            unpickle_session(&bad_pending).err(),
            Some(PickleError::Corrupt)
        );
    }

    #[test]
    fn an_empty_session_set_pickle_is_corrupt() {
        let empty: Vec<&[u8]> = Vec::new();
        let bytes = versioned(SESSION_SET_VERSION, &empty).unwrap();
        assert_eq!(
            unpickle_session_set(&bytes).err(),
            Some(PickleError::Corrupt)
        );
    }

    #[test]
    fn a_prekeys_pickle_with_a_short_signature_or_seed_is_corrupt() {
        let (_, prekeys) = a_session_and_prekeys();
        let good = pickle_prekeys(&prekeys).unwrap();
        let mut pickle: PrekeysPickle = unversioned(PREKEYS_VERSION, &good).unwrap();
        pickle.signed[0].signature.truncate(63);
        let short_signature = versioned(PREKEYS_VERSION, &pickle).unwrap();
        assert_eq!(
            unpickle_prekeys(&short_signature).err(),
            Some(PickleError::Corrupt)
        );

        let mut pickle: PrekeysPickle = unversioned(PREKEYS_VERSION, &good).unwrap();
        pickle.kem[0].seed.truncate(63);
        let short_seed = versioned(PREKEYS_VERSION, &pickle).unwrap();
        assert_eq!(
            unpickle_prekeys(&short_seed).err(),
            Some(PickleError::Corrupt)
        );
    }

    /// A value whose serializer fails, as a hand-written `Serialize` may.
    struct Unencodable;

    impl Serialize for Unencodable {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("refuses to encode"))
        }
    }

    #[test]
    fn a_value_that_does_not_encode_is_an_encode_error_not_an_empty_pickle() {
        assert_eq!(
            versioned(SESSION_VERSION, &Unencodable).err(),
            Some(PickleError::Encode)
        );
    }
}
