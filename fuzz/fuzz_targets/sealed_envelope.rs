//! The sealed-sender parsers on the protocol side: the `SealedEnvelope` a `SealedSend`
//! carries and the relay-signed `SenderCertificate`. The first byte picks which:
//!
//! - 0: the bytes as a postcard `SealedEnvelope`: round-trips, and its `Debug` output
//!   leaves out the delivery token and the retraction tag.
//! - 1: the bytes as a postcard `SenderCertificate`, checked against the relay key: only
//!   the one certificate the relay signed (Alice's) verifies; any other is a bad signature.
//! - otherwise: the bytes as a certificate *body* the relay really signed: `verify` parses
//!   it, and what it accepts is unexpired and re-issues to a certificate that verifies to
//!   the same body; with one signature bit flipped it never verifies.
#![no_main]

use hush_fuzz::{keys, NOW};
use hush_protocol::sealed::{CertificateError, SealedEnvelope, SenderCertificate};
use libfuzzer_sys::fuzz_target;

fn envelope(bytes: &[u8]) {
    let Ok(envelope) = postcard::from_bytes::<SealedEnvelope>(bytes) else {
        return;
    };
    let encoded = postcard::to_allocvec(&envelope).expect("envelopes encode");
    assert!(encoded.len() <= bytes.len());
    assert_eq!(
        postcard::from_bytes::<SealedEnvelope>(&encoded).expect("re-encoding decodes"),
        envelope
    );
    let printed = format!("{envelope:?}");
    for secret in envelope.access.iter().map(|a| format!("{a:?}")) {
        assert!(!printed.contains(&secret), "Debug shows the token");
    }
    for secret in envelope.retract_tag.iter().map(|t| format!("{t:?}")) {
        assert!(!printed.contains(&secret), "Debug shows the tag");
    }
}

fn certificate(bytes: &[u8]) {
    let Ok(certificate) = postcard::from_bytes::<SenderCertificate>(bytes) else {
        return;
    };
    let genuine = keys().alice_certificate(2_000);
    match certificate.verify(&keys().relay_key(), NOW) {
        Ok(body) => {
            assert_eq!(
                certificate, genuine,
                "a certificate the relay did not sign verified"
            );
            assert_eq!(body.identity_key, keys().alice.public().to_bytes().to_vec());
        }
        Err(CertificateError::BadSignature) => {}
        Err(other) => panic!("a certificate the relay did not sign got as far as {other}"),
    }
}

fn signed_body(bytes: &[u8]) {
    let keys = keys();
    let certificate = keys.sign_certificate_body(bytes.to_vec());
    match certificate.verify(&keys.relay_key(), NOW) {
        Ok(body) => {
            assert!(body.expires_at > NOW, "an expired certificate verified");
            let reissued = SenderCertificate::issue(&body, |t| {
                ed25519_dalek::Signer::sign(&keys.relay, t).to_bytes()
            });
            assert!(reissued.body.len() <= bytes.len());
            assert_eq!(reissued.verify(&keys.relay_key(), NOW), Ok(body));
        }
        Err(CertificateError::Malformed | CertificateError::Expired) => {}
        Err(CertificateError::BadSignature) => panic!("the relay's own signature refused"),
    }
    let mut forged = certificate;
    forged.signature.0[usize::from(bytes.first().copied().unwrap_or(0)) % 64] ^= 1;
    assert_eq!(
        forged.verify(&keys.relay_key(), NOW),
        Err(CertificateError::BadSignature)
    );
}

fuzz_target!(|data: &[u8]| {
    hush_fuzz::by_mode(data, [envelope, certificate, signed_body]);
});
