//! Before `Hello`, and what `Hello` sets up: the version, and the challenge that an
//! authentication signs together with the TLS session's exporter. An [`Anonymous`] state
//! is had only by accepting a `Hello`.

use ed25519_dalek::{Signature, VerifyingKey};
use hush_protocol::auth::{auth_transcript, register_transcript, EXPORTER_LEN};
use hush_protocol::{
    ClientFrame, DeviceAddress, ErrorCode, Hello, HelloOk, Register, SUPPORTED_VERSIONS,
};
use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

use super::anonymous::Anonymous;

/// What a signature of this connection must cover: the TLS session's exporter and the
/// challenge sent in `HelloOk`, so that it proves nothing on any other connection.
pub(super) struct Binding {
    challenge: [u8; 32],
    /// `None` if the TLS session would not export one; then nobody authenticates here.
    exporter: Option<Zeroizing<[u8; EXPORTER_LEN]>>,
}

impl Binding {
    /// A fresh random challenge, bound to `exporter`.
    pub(super) fn new(exporter: Option<[u8; EXPORTER_LEN]>) -> Self {
        let mut challenge = [0u8; 32];
        OsRng.fill_bytes(&mut challenge);
        Binding::with_challenge(challenge, exporter)
    }

    pub(super) fn with_challenge(
        challenge: [u8; 32],
        exporter: Option<[u8; EXPORTER_LEN]>,
    ) -> Self {
        Binding {
            challenge,
            exporter: exporter.map(Zeroizing::new),
        }
    }

    /// The exporter, or why no signature can be checked on this connection.
    pub(super) fn exporter(&self) -> Result<&[u8; EXPORTER_LEN], ErrorCode> {
        self.exporter.as_deref().ok_or(ErrorCode::Internal)
    }

    /// Whether `register` is signed by its device key over this connection's transcript.
    pub(super) fn registration_holds(&self, register: &Register) -> Result<(), ErrorCode> {
        let transcript = register_transcript(
            self.exporter()?,
            &self.challenge,
            &register.identity_key,
            &register.device_key,
        );
        if verify(&register.device_key, &transcript, &register.signature.0) {
            Ok(())
        } else {
            Err(ErrorCode::AuthenticationFailed)
        }
    }

    /// Whether `signature`, by the device key the store holds for `address` (`None`: no
    /// such device), covers this connection's transcript. An unknown device and a wrong
    /// signature give the same answer, so that the relay does not confirm which devices
    /// exist.
    pub(super) fn authentication_holds(
        &self,
        address: &DeviceAddress,
        key: Option<&[u8; 32]>,
        signature: &[u8; 64],
    ) -> Result<(), ErrorCode> {
        let transcript = auth_transcript(self.exporter()?, &self.challenge, address);
        if key.is_some_and(|key| verify(key, &transcript, signature)) {
            Ok(())
        } else {
            Err(ErrorCode::AuthenticationFailed)
        }
    }
}

fn verify(key: &[u8; 32], message: &[u8], signature: &[u8; 64]) -> bool {
    VerifyingKey::from_bytes(key).is_ok_and(|key| {
        key.verify_strict(message, &Signature::from_bytes(signature))
            .is_ok()
    })
}

/// The first frame must be `Hello`.
pub(super) fn expect_hello(frame: ClientFrame) -> Result<Hello, ErrorCode> {
    match frame {
        ClientFrame::Hello(hello) => Ok(hello),
        ClientFrame::Request(_) => Err(ErrorCode::HelloRequired),
    }
}

/// Accepts a `Hello` if it shares a version with the relay: the answer to send, and the
/// connection's anonymous phase.
pub(super) fn accept(hello: &Hello, binding: Binding) -> Result<(HelloOk, Anonymous), ErrorCode> {
    let version = SUPPORTED_VERSIONS
        .negotiate(hello.versions)
        .ok_or(ErrorCode::UnsupportedVersion)?;
    let hello_ok = HelloOk {
        version,
        challenge: binding.challenge,
    };
    Ok((hello_ok, Anonymous::new(binding)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use ed25519_dalek::SigningKey;
    use hush_protocol::{DeviceId, Request, RequestBody, RequestId, VersionRange};

    use super::super::fixtures::{
        alice, auth_signature, device_key, register, CHALLENGE, EXPORTER,
    };
    use super::*;

    fn binding() -> Binding {
        Binding::with_challenge(CHALLENGE, Some(EXPORTER))
    }

    #[test]
    fn an_authentication_signed_over_this_connection_is_accepted() {
        let key = device_key();
        let public = key.verifying_key().to_bytes();
        let signature = auth_signature(&key, &EXPORTER, &CHALLENGE, &alice());
        assert_eq!(
            binding().authentication_holds(&alice(), Some(&public), &signature),
            Ok(())
        );
    }

    #[test]
    fn an_authentication_signed_for_another_connection_or_challenge_is_refused() {
        let key = device_key();
        let public = key.verifying_key().to_bytes();
        let other_exporter = auth_signature(&key, &[4; EXPORTER_LEN], &CHALLENGE, &alice());
        let other_challenge = auth_signature(&key, &EXPORTER, &[6; 32], &alice());
        let mut bob = alice();
        bob.device = DeviceId(3);
        let other_device = auth_signature(&key, &EXPORTER, &CHALLENGE, &bob);
        for signature in [other_exporter, other_challenge, other_device] {
            assert_eq!(
                binding().authentication_holds(&alice(), Some(&public), &signature),
                Err(ErrorCode::AuthenticationFailed)
            );
        }
    }

    #[test]
    fn an_unknown_device_looks_like_a_wrong_signature() {
        let signature = auth_signature(&device_key(), &EXPORTER, &CHALLENGE, &alice());
        let stranger = SigningKey::from_bytes(&[8; 32]).verifying_key().to_bytes();
        assert_eq!(
            binding().authentication_holds(&alice(), None, &signature),
            Err(ErrorCode::AuthenticationFailed)
        );
        assert_eq!(
            binding().authentication_holds(&alice(), Some(&stranger), &signature),
            Err(ErrorCode::AuthenticationFailed)
        );
    }

    #[test]
    fn a_registration_is_checked_against_this_connections_transcript() {
        assert_eq!(
            binding().registration_holds(&register(&EXPORTER, &CHALLENGE)),
            Ok(())
        );
        assert_eq!(
            binding().registration_holds(&register(&[4; EXPORTER_LEN], &CHALLENGE)),
            Err(ErrorCode::AuthenticationFailed)
        );
        assert_eq!(
            binding().registration_holds(&register(&EXPORTER, &[6; 32])),
            Err(ErrorCode::AuthenticationFailed)
        );
        let mut tampered = register(&EXPORTER, &CHALLENGE);
        tampered.identity_key[0] ^= 1;
        assert_eq!(
            binding().registration_holds(&tampered),
            Err(ErrorCode::AuthenticationFailed)
        );
    }

    #[test]
    fn without_an_exporter_nothing_authenticates() {
        let binding = Binding::with_challenge(CHALLENGE, None);
        let key = device_key();
        let public = key.verifying_key().to_bytes();
        let signature = auth_signature(&key, &EXPORTER, &CHALLENGE, &alice());
        assert_eq!(
            binding.authentication_holds(&alice(), Some(&public), &signature),
            Err(ErrorCode::Internal)
        );
        assert_eq!(
            binding.registration_holds(&register(&EXPORTER, &CHALLENGE)),
            Err(ErrorCode::Internal)
        );
    }

    #[test]
    fn a_request_before_hello_closes_the_connection() {
        let request = ClientFrame::Request(Request {
            id: RequestId(1),
            body: RequestBody::GetSenderCertificate,
        });
        assert_eq!(expect_hello(request).err(), Some(ErrorCode::HelloRequired));
        assert!(expect_hello(ClientFrame::Hello(Hello::current())).is_ok());
    }

    #[test]
    fn a_hello_answers_with_the_connections_challenge_or_no_common_version() {
        let (hello_ok, _) = accept(&Hello::current(), binding()).ok().unwrap();
        assert_eq!(hello_ok.challenge, CHALLENGE);
        assert_eq!(hello_ok.version, SUPPORTED_VERSIONS.max);
        let future = Hello {
            versions: VersionRange {
                min: SUPPORTED_VERSIONS.max + 1,
                max: SUPPORTED_VERSIONS.max + 5,
            },
        };
        assert_eq!(
            accept(&future, binding()).err(),
            Some(ErrorCode::UnsupportedVersion)
        );
    }
}
