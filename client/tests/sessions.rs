//! Session setup and messaging between in-memory parties, with seeded randomness.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_client::message::CiphertextMessage;
use hush_client::protocol::{DeviceBundle, DeviceId};
use hush_client::{CryptoError, IdentityKeyPair, PeerBundle, PrekeySet, Session};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

struct Party {
    identity: IdentityKeyPair,
    prekeys: PrekeySet,
    uploaded: hush_client::protocol::UploadPrekeys,
}

fn party(rng: &mut ChaCha20Rng) -> Party {
    let identity = IdentityKeyPair::generate_with(rng);
    let mut prekeys = PrekeySet::default();
    let mut uploaded = prekeys.rotate(&identity, 0, rng);
    let more = prekeys.replenish(&identity, 3, rng);
    uploaded.one_time = more.one_time;
    uploaded.kem_one_time = more.kem_one_time;
    Party {
        identity,
        prekeys,
        uploaded,
    }
}

/// The bundle a relay would serve: the signed prekey, one one-time key of each kind (or
/// the last-resort KEM key when `last_resort`).
fn bundle(party: &Party, one_time: bool, last_resort: bool) -> DeviceBundle {
    DeviceBundle {
        device: DeviceId(1),
        device_key: [0; 32],
        signed_prekey: party.uploaded.signed_prekey.clone(),
        one_time: one_time.then(|| party.uploaded.one_time[0].clone()),
        kem: if last_resort {
            party.uploaded.kem_last_resort.clone()
        } else {
            Some(party.uploaded.kem_one_time[0].clone())
        },
        kem_is_last_resort: last_resort,
    }
}

fn prekey_message(message: &CiphertextMessage) -> &hush_client::message::PrekeyMessage {
    match message {
        CiphertextMessage::Prekey(prekey) => prekey,
        CiphertextMessage::Ratchet(_) => panic!("expected a prekey message"),
    }
}

#[test]
fn alice_and_bob_set_up_a_session_and_talk() {
    for (one_time, last_resort) in [(true, false), (false, false), (false, true)] {
        let mut rng = ChaCha20Rng::seed_from_u64(10);
        let alice = party(&mut rng);
        let mut bob = party(&mut rng);
        let peer = PeerBundle::verify(
            &bob.identity.public().to_bytes(),
            &bundle(&bob, one_time, last_resort),
        )
        .unwrap();
        let mut alice_session = Session::initiate(&alice.identity, &peer, &mut rng).unwrap();
        let first = alice_session.encrypt(b"hello bob").unwrap();
        let second = alice_session.encrypt(b"still there?").unwrap();

        let (mut bob_session, plaintext, used) = Session::accept(
            &bob.identity,
            &bob.prekeys,
            prekey_message(&first),
            0,
            &mut rng,
        )
        .unwrap();
        assert_eq!(plaintext.as_slice(), b"hello bob");
        assert_eq!(used.one_time.is_some(), one_time);
        assert_eq!(used.kem_one_time.is_some(), !last_resort);
        bob.prekeys.consume(used);

        // The second prekey message continues the session instead of starting another.
        assert!(bob_session.continues(prekey_message(&second)));
        let plaintext = bob_session.decrypt(&second, 0, &mut rng).unwrap();
        assert_eq!(plaintext.as_slice(), b"still there?");

        let reply = bob_session.encrypt(b"hi alice").unwrap();
        assert!(matches!(reply, CiphertextMessage::Ratchet(_)));
        let plaintext = alice_session.decrypt(&reply, 0, &mut rng).unwrap();
        assert_eq!(plaintext.as_slice(), b"hi alice");
        // Once Bob has answered, Alice stops repeating the setup.
        let next = alice_session.encrypt(b"great").unwrap();
        assert!(matches!(next, CiphertextMessage::Ratchet(_)));
        let bytes = next.to_bytes();
        let parsed = CiphertextMessage::from_bytes(&bytes).unwrap();
        assert_eq!(
            bob_session
                .decrypt(&parsed, 0, &mut rng)
                .unwrap()
                .as_slice(),
            b"great"
        );
        assert_eq!(alice_session.remote_identity(), bob.identity.public(),);
        assert_eq!(bob_session.remote_identity(), alice.identity.public());
    }
}

#[test]
fn a_one_time_prekey_is_accepted_once() {
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let alice = party(&mut rng);
    let mut bob = party(&mut rng);
    let peer = PeerBundle::verify(
        &bob.identity.public().to_bytes(),
        &bundle(&bob, true, false),
    )
    .unwrap();
    let mut session = Session::initiate(&alice.identity, &peer, &mut rng).unwrap();
    let first = session.encrypt(b"once").unwrap();
    let (_, _, used) = Session::accept(
        &bob.identity,
        &bob.prekeys,
        prekey_message(&first),
        0,
        &mut rng,
    )
    .unwrap();
    bob.prekeys.consume(used);
    // A replay of the first message as a new session finds its one-time key gone.
    let err = Session::accept(
        &bob.identity,
        &bob.prekeys,
        prekey_message(&first),
        0,
        &mut rng,
    )
    .unwrap_err();
    assert_eq!(err, CryptoError::UnknownPrekey);
}

#[test]
fn a_bundle_with_a_bad_signature_is_refused() {
    let mut rng = ChaCha20Rng::seed_from_u64(12);
    let bob = party(&mut rng);
    let mallory = party(&mut rng);
    let identity = bob.identity.public().to_bytes();

    let mut forged = bundle(&bob, true, false);
    forged.signed_prekey = mallory.uploaded.signed_prekey.clone();
    assert_eq!(
        PeerBundle::verify(&identity, &forged).err(),
        Some(CryptoError::BadSignature)
    );

    let mut forged = bundle(&bob, true, false);
    forged.kem = Some(mallory.uploaded.kem_one_time[0].clone());
    assert_eq!(
        PeerBundle::verify(&identity, &forged).err(),
        Some(CryptoError::BadSignature)
    );

    // An X25519 key relabelled as a KEM key (or the reverse) fails: the type byte is signed.
    let mut confused = bundle(&bob, true, false);
    if let Some(kem) = confused.kem.as_mut() {
        kem.public_key[0] = 0x05;
    }
    assert!(PeerBundle::verify(&identity, &confused).is_err());

    let mut missing = bundle(&bob, true, false);
    missing.kem = None;
    assert_eq!(
        PeerBundle::verify(&identity, &missing).err(),
        Some(CryptoError::IncompleteBundle)
    );
}

#[test]
fn a_low_order_base_key_is_refused_without_consuming_prekeys() {
    let mut rng = ChaCha20Rng::seed_from_u64(13);
    let alice = party(&mut rng);
    let bob = party(&mut rng);
    let peer = PeerBundle::verify(
        &bob.identity.public().to_bytes(),
        &bundle(&bob, true, false),
    )
    .unwrap();
    let mut session = Session::initiate(&alice.identity, &peer, &mut rng).unwrap();
    let mut bytes = session.encrypt(b"x").unwrap().to_bytes();
    // Base key field: after version, kind and the 65-byte identity; 0x05 then 32 key bytes.
    bytes[2 + 65 + 1..2 + 65 + 33].fill(0);
    assert_eq!(
        CiphertextMessage::from_bytes(&bytes).unwrap_err(),
        CryptoError::InvalidKey
    );
}

#[test]
fn tampered_truncated_and_misdirected_messages_fail_cleanly() {
    let mut rng = ChaCha20Rng::seed_from_u64(14);
    let alice = party(&mut rng);
    let bob = party(&mut rng);
    let carol = party(&mut rng);
    let peer = PeerBundle::verify(
        &bob.identity.public().to_bytes(),
        &bundle(&bob, true, false),
    )
    .unwrap();
    let mut session = Session::initiate(&alice.identity, &peer, &mut rng).unwrap();
    let bytes = session.encrypt(b"for bob only").unwrap().to_bytes();

    // Cut inside the fixed fields: a parse error.
    for cut in [0, 1, 2, 50, 1200, bytes.len() - 17] {
        assert!(
            CiphertextMessage::from_bytes(&bytes[..cut]).is_err(),
            "cut at {cut}"
        );
    }
    // Cut inside the ciphertext: parses, fails authentication.
    let short = CiphertextMessage::from_bytes(&bytes[..bytes.len() - 1]).unwrap();
    assert_eq!(
        Session::accept(
            &bob.identity,
            &bob.prekeys,
            prekey_message(&short),
            0,
            &mut rng
        )
        .unwrap_err(),
        CryptoError::DecryptionFailed
    );
    let mut tampered = bytes.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x80;
    let tampered = CiphertextMessage::from_bytes(&tampered).unwrap();
    assert_eq!(
        Session::accept(
            &bob.identity,
            &bob.prekeys,
            prekey_message(&tampered),
            0,
            &mut rng
        )
        .unwrap_err(),
        CryptoError::DecryptionFailed
    );
    // Carol holds other prekeys with other ids: the message is not for her.
    let message = CiphertextMessage::from_bytes(&bytes).unwrap();
    assert!(Session::accept(
        &carol.identity,
        &carol.prekeys,
        prekey_message(&message),
        0,
        &mut rng
    )
    .is_err());
    // Bob still opens the original afterwards.
    let (_, plaintext, _) = Session::accept(
        &bob.identity,
        &bob.prekeys,
        prekey_message(&message),
        0,
        &mut rng,
    )
    .unwrap();
    assert_eq!(plaintext.as_slice(), b"for bob only");
}
