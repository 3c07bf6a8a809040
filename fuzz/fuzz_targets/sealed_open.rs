//! The sealed-sender parsers on the client side. The first byte picks which:
//!
//! - 0: the bytes as a whole sealed envelope for Bob's device (the outer seal): only the
//!   one genuine envelope Alice sealed opens, a forged one never.
//! - 1: the bytes as the *inner* content (certificate length, certificate, recipient
//!   device, message), sealed with both real layers from Alice to Bob and opened: `open`
//!   accepts exactly what parses, carries a certificate the relay signed for Alice that
//!   has not expired, and names Bob's device; and then it yields the parsed message.
//! - otherwise: the bytes as the padded end-to-end content inside: what decodes
//!   re-encodes to a content that decodes to the same encoding.
#![no_main]

use hush_client::sealed::open;
use hush_client::test_support::{decode_content, parse_sealed_content, seal_content};
use hush_client::CryptoError;
use hush_fuzz::{genuine_sealed_envelope, keys, rng_from, BOB_DEVICE, GENUINE_SEALED, NOW};
use libfuzzer_sys::fuzz_target;

fn outer(bytes: &[u8]) {
    let keys = keys();
    if let Ok(opened) = open(&keys.bob, BOB_DEVICE, &keys.relay_key(), bytes, NOW) {
        assert_eq!(bytes, genuine_sealed_envelope(), "a forged envelope opened");
        assert_eq!(opened.message, GENUINE_SEALED);
    }
}

fn inner(content: &[u8]) {
    let keys = keys();
    let parsed = parse_sealed_content(content);
    let sealed = seal_content(
        &keys.alice,
        keys.bob.public(),
        content,
        &mut rng_from(content),
    )
    .expect("sealing to a valid identity key");
    let opened = open(&keys.bob, BOB_DEVICE, &keys.relay_key(), &sealed, NOW);
    match (parsed, opened) {
        (Ok(parsed), Ok(opened)) => {
            assert_eq!(opened.message, parsed.message);
            assert_eq!(parsed.recipient_device, BOB_DEVICE);
            assert_eq!(
                parsed.certificate.verify(&keys.relay_key(), NOW),
                Ok(opened.sender.clone())
            );
            assert_eq!(
                opened.sender.identity_key,
                keys.alice.public().to_bytes().to_vec()
            );
            assert_eq!(&opened.sender_identity, keys.alice.public());
        }
        (Ok(parsed), Err(CryptoError::WrongRecipient)) => {
            assert_ne!(parsed.recipient_device, BOB_DEVICE);
        }
        (Ok(parsed), Err(CryptoError::InvalidCertificate(_))) => {
            let certified_alice = parsed
                .certificate
                .verify(&keys.relay_key(), NOW)
                .is_ok_and(|body| body.identity_key == keys.alice.public().to_bytes());
            assert!(
                !certified_alice,
                "a valid certificate for the sender refused"
            );
        }
        (Ok(_), Err(error)) => panic!("a well-formed content refused: {error}"),
        (Err(_), Ok(_)) => panic!("unparsable content opened"),
        (Err(_), Err(_)) => {}
    }
}

fn padded_content(bytes: &[u8]) {
    if let Ok(encoded) = decode_content(bytes) {
        assert_eq!(decode_content(&encoded), Ok(encoded));
    }
}

fuzz_target!(|data: &[u8]| {
    hush_fuzz::by_mode(data, [outer, inner, padded_content]);
});
