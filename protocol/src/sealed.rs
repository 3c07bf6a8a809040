//! Sealed sender on the wire: the relay-signed sender certificate, the sealed envelope
//! that names only its recipient, and the retraction tag.
//!
//! A sender certificate binds an account, a device and the account's identity key to an
//! expiry time, signed by the relay's long-term sender-certificate key. The sender puts it
//! *inside* the end-to-end encryption, so the relay that carries a sealed envelope never
//! sees who sent it (P5); the recipient checks it with [`SenderCertificate::verify`].
//!
//! ```
//! use ed25519_dalek::{Signer, SigningKey};
//! use hush_protocol::sealed::{SenderCertificate, SenderCertificateBody};
//! use hush_protocol::{AccountId, DeviceId};
//!
//! let relay = SigningKey::from_bytes(&[7; 32]);
//! let body = SenderCertificateBody {
//!     account: AccountId([1; 16]),
//!     device: DeviceId(1),
//!     identity_key: b"identity".to_vec(),
//!     expires_at: 2_000,
//! };
//! let certificate = SenderCertificate::issue(&body, |t| relay.sign(t).to_bytes());
//! let relay_key = relay.verifying_key().to_bytes();
//! assert_eq!(certificate.verify(&relay_key, 1_000).unwrap(), body);
//! assert!(certificate.verify(&relay_key, 2_000).is_err());
//! ```

use std::fmt;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::{AccountId, DeviceId};
use crate::Signature;

/// The domain separator of the certificate signature transcript.
pub const SENDER_CERTIFICATE_CONTEXT: &[u8] = b"hush-sender-cert-v1";

/// The domain separator of the retraction tag.
pub const RETRACT_CONTEXT: &[u8] = b"hush-retract-v1";

/// What a sender certificate asserts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SenderCertificateBody {
    /// The sender's account.
    pub account: AccountId,
    /// The sender's device.
    pub device: DeviceId,
    /// The account's identity key blob, as registered.
    #[serde(with = "serde_bytes")]
    pub identity_key: Vec<u8>,
    /// Seconds since the Unix epoch after which the certificate is no longer valid.
    pub expires_at: u64,
}

/// A relay-signed [`SenderCertificateBody`]. The body travels as its exact postcard bytes,
/// so that the signature covers precisely what the recipient decodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SenderCertificate {
    /// The postcard encoding of a [`SenderCertificateBody`].
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// The relay's Ed25519 signature over [`SenderCertificate::transcript`].
    pub signature: Signature,
}

/// Why a sender certificate is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CertificateError {
    /// The signature does not verify under the relay key (or the key is not a valid key).
    #[error("the sender certificate's signature does not verify")]
    BadSignature,
    /// The certificate expired.
    #[error("the sender certificate has expired")]
    Expired,
    /// The signed body does not decode.
    #[error("the sender certificate is malformed")]
    Malformed,
}

impl SenderCertificate {
    /// The bytes the relay signs: the context string, then the body.
    pub fn transcript(body: &[u8]) -> Vec<u8> {
        let mut t = Vec::with_capacity(SENDER_CERTIFICATE_CONTEXT.len() + body.len());
        t.extend_from_slice(SENDER_CERTIFICATE_CONTEXT);
        t.extend_from_slice(body);
        t
    }

    /// Encodes `body` and signs its transcript with `sign` (an Ed25519 signer).
    pub fn issue(body: &SenderCertificateBody, sign: impl FnOnce(&[u8]) -> [u8; 64]) -> Self {
        // Encoding a struct of plain fields into a Vec cannot fail.
        let body = postcard::to_allocvec(body).unwrap_or_default();
        let signature = Signature(sign(&Self::transcript(&body)));
        SenderCertificate { body, signature }
    }

    /// Checks the signature (strictly) under `relay_key`, then the expiry against `now`
    /// (seconds since the Unix epoch), and returns what the certificate asserts.
    pub fn verify(
        &self,
        relay_key: &[u8; 32],
        now: u64,
    ) -> Result<SenderCertificateBody, CertificateError> {
        let key =
            VerifyingKey::from_bytes(relay_key).map_err(|_| CertificateError::BadSignature)?;
        let signature = ed25519_dalek::Signature::from_bytes(&self.signature.0);
        key.verify_strict(&Self::transcript(&self.body), &signature)
            .map_err(|_| CertificateError::BadSignature)?;
        let body: SenderCertificateBody =
            postcard::from_bytes(&self.body).map_err(|_| CertificateError::Malformed)?;
        if now >= body.expires_at {
            return Err(CertificateError::Expired);
        }
        Ok(body)
    }
}

/// The retraction tag of an envelope: `SHA-256("hush-retract-v1" || secret)`. The sender
/// attaches the tag and keeps the secret; presenting the secret later deletes every
/// still-stored copy. The relay learns the tag only, and which envelopes were retracted.
pub fn retract_tag(secret: &[u8; 32]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(RETRACT_CONTEXT);
    hash.update(secret);
    hash.finalize().into()
}

/// An envelope sent without naming its sender: it names the recipient account and some of
/// its devices. The envelopes of one `SealedSend` to an account must together name each of
/// its current devices exactly once. `Debug` leaves out the token and the tag.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedEnvelope {
    /// The recipient account.
    pub account: AccountId,
    /// Devices of the account this payload goes to. Across the request's envelopes to the
    /// account, every current device exactly once; the relay refuses a stale list.
    pub devices: Vec<DeviceId>,
    /// The recipient's delivery token, if the sender knows it.
    pub access: Option<[u8; 16]>,
    /// A retraction tag ([`retract_tag`]) for delete-for-everyone, if wanted.
    pub retract_tag: Option<[u8; 32]>,
    /// Opaque ciphertext.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl fmt::Debug for SealedEnvelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedEnvelope")
            .field("account", &self.account)
            .field("devices", &self.devices.len())
            .field("access", &self.access.map(|_| "<redacted>"))
            .field("retract_tag", &self.retract_tag.map(|_| "<redacted>"))
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn body(expires_at: u64) -> SenderCertificateBody {
        SenderCertificateBody {
            account: AccountId([3; 16]),
            device: DeviceId(2),
            identity_key: vec![9; 40],
            expires_at,
        }
    }

    #[test]
    fn certificates_verify_expire_and_refuse_tampering() {
        let relay = SigningKey::from_bytes(&[5; 32]);
        let key = relay.verifying_key().to_bytes();
        let certificate = SenderCertificate::issue(&body(100), |t| relay.sign(t).to_bytes());
        assert_eq!(certificate.verify(&key, 99), Ok(body(100)));
        assert_eq!(
            certificate.verify(&key, 100),
            Err(CertificateError::Expired)
        );

        let mut tampered = certificate.clone();
        tampered.body[0] ^= 1;
        assert_eq!(
            tampered.verify(&key, 0),
            Err(CertificateError::BadSignature)
        );
        let other = SigningKey::from_bytes(&[6; 32]).verifying_key().to_bytes();
        assert_eq!(
            certificate.verify(&other, 0),
            Err(CertificateError::BadSignature)
        );

        // A validly signed body that is not a certificate body.
        let junk = SenderCertificate {
            body: vec![0xff; 3],
            signature: Signature(
                relay
                    .sign(&SenderCertificate::transcript(&[0xff; 3]))
                    .to_bytes(),
            ),
        };
        assert_eq!(junk.verify(&key, 0), Err(CertificateError::Malformed));

        // The signature is domain-separated: a bare signature over the body is refused.
        let bare = SenderCertificate {
            signature: Signature(relay.sign(&certificate.body).to_bytes()),
            ..certificate
        };
        assert_eq!(bare.verify(&key, 0), Err(CertificateError::BadSignature));
    }

    #[test]
    fn debug_output_leaves_out_tokens_and_tags() {
        let envelope = SealedEnvelope {
            account: AccountId([0xab; 16]),
            devices: vec![DeviceId(77)],
            access: Some([0xcd; 16]),
            retract_tag: Some([0xef; 32]),
            payload: vec![0x42; 3],
        };
        let printed = format!("{envelope:?}");
        for leak in ["171", "ab", "205", "cd", "239", "ef", "66"] {
            assert!(!printed.contains(leak), "{printed}");
        }
    }

    #[test]
    fn retract_tags_are_domain_separated_hashes() {
        let tag = retract_tag(&[1; 32]);
        assert_ne!(tag, retract_tag(&[2; 32]));
        let plain: [u8; 32] = Sha256::digest([1u8; 32]).into();
        assert_ne!(tag, plain);
    }
}
