//! The end-to-end message parser (ratchet and prekey messages, fixed-width layout) and the
//! session that reads it. What parses re-serializes to the same length and parses back to
//! the same message; fed to Bob's real session with Alice, a message that is not one Alice
//! sent never decrypts, and fails with a typed error.
#![no_main]

use std::sync::{Mutex, OnceLock};

use hush_client::message::{CiphertextMessage, RatchetMessage};
use hush_client::test_support::pairwise_sessions;
use hush_client::Session;
use hush_fuzz::rng_from;
use libfuzzer_sys::fuzz_target;
use rand_chacha::ChaCha20Rng;

struct Bob {
    session: Session,
    /// The one message Alice sent that Bob has not read: it would decrypt.
    genuine: CiphertextMessage,
    rng: ChaCha20Rng,
}

fn bob() -> &'static Mutex<Bob> {
    static BOB: OnceLock<Mutex<Bob>> = OnceLock::new();
    BOB.get_or_init(|| {
        let mut rng = rng_from(b"ratchet");
        let mut parties = pairwise_sessions(2, &mut rng).expect("sessions");
        let mut bob = parties.pop().expect("bob");
        let mut alice = parties.pop().expect("alice");
        let genuine = alice.sessions[1]
            .as_mut()
            .expect("alice's session")
            .encrypt(b"genuine")
            .expect("encrypt");
        Mutex::new(Bob {
            session: bob.sessions[0].take().expect("bob's session"),
            genuine,
            rng,
        })
    })
}

fn ratchet_part(message: &CiphertextMessage) -> &RatchetMessage {
    match message {
        CiphertextMessage::Ratchet(message) => message,
        CiphertextMessage::Prekey(prekey) => &prekey.message,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(message) = CiphertextMessage::from_bytes(data) else {
        return;
    };
    let bytes = message.to_bytes();
    assert_eq!(bytes.len(), data.len(), "re-serialized to another length");
    assert_eq!(
        CiphertextMessage::from_bytes(&bytes).expect("re-serialization parses"),
        message
    );

    let mut bob = bob()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Bob {
        session,
        genuine,
        rng,
    } = &mut *bob;
    // The same ratchet message, bare or wrapped in any prekey message, is Alice's.
    if ratchet_part(&message) == ratchet_part(genuine) {
        return;
    }
    if let Ok(plaintext) = session.decrypt(&message, 0, rng) {
        panic!("a forged message decrypted to {} bytes", plaintext.len());
    }
});
