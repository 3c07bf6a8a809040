//! Deterministic test vectors for our own protocol, checked in at
//! `client/tests/vectors/session-v1.json`, so that a port in another language can prove it
//! is compatible. Every random value the protocol draws is recorded, in order, so a port
//! replays them through its own injectable RNG. Regenerate (after a deliberate format
//! change) with `HUSH_REGENERATE_VECTORS=1 cargo test -p hush-client vectors`.

use rand_chacha::rand_core::{CryptoRng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde_json::{json, Value};

use crate::keys::IdentityKeyPair;
use crate::message::CiphertextMessage;
use crate::pqxdh::{self, PeerBundle, ResponderKeys};
use crate::prekeys::PrekeySet;
use crate::session::Session;

const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/session-v1.json");

/// An RNG that records what it hands out.
struct Recording {
    inner: ChaCha20Rng,
    draws: Vec<String>,
}

impl RngCore for Recording {
    fn next_u32(&mut self) -> u32 {
        let mut bytes = [0u8; 4];
        self.fill_bytes(&mut bytes);
        u32::from_le_bytes(bytes)
    }
    fn next_u64(&mut self) -> u64 {
        let mut bytes = [0u8; 8];
        self.fill_bytes(&mut bytes);
        u64::from_le_bytes(bytes)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.inner.fill_bytes(dest);
        self.draws.push(hex::encode(&dest));
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_chacha::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for Recording {}

fn generate() -> Value {
    let mut rng = Recording {
        inner: ChaCha20Rng::seed_from_u64(0x4855_5348),
        draws: Vec::new(),
    };
    let alice = IdentityKeyPair::generate_with(&mut rng);
    let bob = IdentityKeyPair::generate_with(&mut rng);
    let mut bob_prekeys = PrekeySet::default();
    let rotated = bob_prekeys.rotate(&bob, 1_700_000_000, &mut rng);
    let fresh = bob_prekeys.replenish(&bob, 1, &mut rng);
    let bundle = hush_protocol::DeviceBundle {
        device: hush_protocol::DeviceId(1),
        device_key: [0; 32],
        signed_prekey: rotated.signed_prekey.clone(),
        one_time: Some(fresh.one_time[0].clone()),
        kem: Some(fresh.kem_one_time[0].clone()),
        kem_is_last_resort: false,
    };
    let peer = PeerBundle::verify(&bob.public().to_bytes(), &bundle).unwrap();
    let mut alice_session = Session::initiate(&alice, &peer, &mut rng).unwrap();
    let first = alice_session.encrypt(b"Hello Bob").unwrap();
    let CiphertextMessage::Prekey(prekey) = &first else {
        unreachable!("a new session sends a prekey message")
    };

    // The shared secret, recomputed on Bob's side for the record.
    let keys = ResponderKeys {
        signed_prekey: bob_prekeys.signed_prekey(prekey.signed_prekey_id).unwrap(),
        one_time: bob_prekeys.one_time_prekey(prekey.one_time_prekey_id.unwrap()),
        kem: bob_prekeys.kem_prekey(prekey.kem_prekey_id).unwrap(),
    };
    let (shared_secret, associated_data) = pqxdh::respond(
        &bob,
        &prekey.identity,
        &prekey.base_key,
        &keys,
        &prekey.kem_ciphertext,
    )
    .unwrap();

    let (mut bob_session, plaintext, _) =
        Session::accept(&bob, &bob_prekeys, prekey, 0, &mut rng).unwrap();
    assert_eq!(plaintext.as_slice(), b"Hello Bob");
    let reply = bob_session.encrypt(b"Hello Alice").unwrap();
    assert_eq!(
        alice_session
            .decrypt(&reply, 0, &mut rng)
            .unwrap()
            .as_slice(),
        b"Hello Alice"
    );
    let third = alice_session.encrypt(b"A ratchet step later").unwrap();
    assert_eq!(
        bob_session.decrypt(&third, 0, &mut rng).unwrap().as_slice(),
        b"A ratchet step later"
    );

    json!({
        "description": "PQXDH setup, a first (prekey) message, a reply, and a message after a DH ratchet step. 'random' lists every value the protocol drew from its RNG, in order.",
        "random": rng.draws,
        "alice_identity": hex::encode(alice.public().to_bytes()),
        "bob_identity": hex::encode(bob.public().to_bytes()),
        "bob_signed_prekey": {
            "id": rotated.signed_prekey.as_ref().unwrap().id,
            "public": hex::encode(&rotated.signed_prekey.as_ref().unwrap().public_key),
            "signature": hex::encode(&rotated.signed_prekey.as_ref().unwrap().signature),
        },
        "bob_one_time_prekey": {
            "id": fresh.one_time[0].id,
            "public": hex::encode(&fresh.one_time[0].public_key),
        },
        "bob_kem_prekey": {
            "id": fresh.kem_one_time[0].id,
            "public": hex::encode(&fresh.kem_one_time[0].public_key),
            "signature": hex::encode(&fresh.kem_one_time[0].signature),
        },
        "shared_secret": hex::encode(&shared_secret[..]),
        "associated_data": hex::encode(&associated_data),
        "messages": [
            { "from": "alice", "plaintext": "Hello Bob", "bytes": hex::encode(first.to_bytes()) },
            { "from": "bob", "plaintext": "Hello Alice", "bytes": hex::encode(reply.to_bytes()) },
            { "from": "alice", "plaintext": "A ratchet step later", "bytes": hex::encode(third.to_bytes()) },
        ],
    })
}

#[test]
fn session_vectors_match_the_checked_in_file() {
    let generated = generate();
    if std::env::var_os("HUSH_REGENERATE_VECTORS").is_some() {
        let text = serde_json::to_string_pretty(&generated).unwrap() + "\n";
        std::fs::write(PATH, text).unwrap();
    }
    let checked_in: Value = serde_json::from_str(&std::fs::read_to_string(PATH).unwrap()).unwrap();
    assert_eq!(
        generated, checked_in,
        "the protocol's output changed; if deliberate, regenerate the vectors"
    );
}
