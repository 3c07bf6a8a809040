//! The byte layout of end-to-end messages. Fixed-width fields, no self-describing format,
//! so a port in another language needs only this page:
//!
//! ```text
//! ratchet message:  0x01 | 0x01 | header (40) | ciphertext
//! prekey message:   0x01 | 0x02 | identity key (65) | base key (33: 0x05 || X25519)
//!                   | signed prekey id (u32 BE) | one-time flag (0/1) | one-time id (u32 BE)
//!                   | ML-KEM prekey id (u32 BE) | ML-KEM ciphertext (1088)
//!                   | header (40) | ciphertext
//! header:           ratchet key (32) | previous chain length (u32 BE) | counter (u32 BE)
//! ```
//!
//! The first byte is the format version; the ciphertext is ChaCha20-Poly1305 output, so at
//! least 16 bytes.

use x25519_dalek::PublicKey;

use crate::error::CryptoError;
use crate::keys::{decode_ec, encode_ec, IdentityKey, IDENTITY_KEY_LEN, KEM_CIPHERTEXT_LEN};
use crate::ratchet::{Header, HEADER_LEN};

/// The message format version this build writes and reads.
pub const MESSAGE_VERSION: u8 = 1;
const KIND_RATCHET: u8 = 0x01;
const KIND_PREKEY: u8 = 0x02;
const TAG_LEN: usize = 16;

/// A message in an established session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RatchetMessage {
    /// The ratchet header.
    pub header: Header,
    /// The AEAD ciphertext.
    pub ciphertext: Vec<u8>,
}

/// A first message: the session setup and the first ratchet message. Sent until the
/// responder's first reply arrives, so the setup survives a lost first message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrekeyMessage {
    /// The initiator's identity.
    pub identity: IdentityKey,
    /// The initiator's ephemeral key.
    pub base_key: PublicKey,
    /// Which signed prekey was used.
    pub signed_prekey_id: u32,
    /// Which one-time prekey was used, if any.
    pub one_time_prekey_id: Option<u32>,
    /// Which ML-KEM prekey was used.
    pub kem_prekey_id: u32,
    /// The ML-KEM ciphertext.
    pub kem_ciphertext: Vec<u8>,
    /// The first ratchet message.
    pub message: RatchetMessage,
}

/// Either kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CiphertextMessage {
    /// See [`RatchetMessage`].
    Ratchet(RatchetMessage),
    /// See [`PrekeyMessage`].
    Prekey(Box<PrekeyMessage>),
}

const PREKEY_FIXED_LEN: usize = IDENTITY_KEY_LEN + 33 + 4 + 1 + 4 + 4 + KEM_CIPHERTEXT_LEN;

impl CiphertextMessage {
    /// Serializes the message.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            CiphertextMessage::Ratchet(message) => {
                let mut out = Vec::with_capacity(2 + HEADER_LEN + message.ciphertext.len());
                out.extend_from_slice(&[MESSAGE_VERSION, KIND_RATCHET]);
                write_ratchet(&mut out, message);
                out
            }
            CiphertextMessage::Prekey(prekey) => {
                let mut out = Vec::with_capacity(
                    2 + PREKEY_FIXED_LEN + HEADER_LEN + prekey.message.ciphertext.len(),
                );
                out.extend_from_slice(&[MESSAGE_VERSION, KIND_PREKEY]);
                out.extend_from_slice(&prekey.identity.to_bytes());
                out.extend_from_slice(&encode_ec(&prekey.base_key));
                out.extend_from_slice(&prekey.signed_prekey_id.to_be_bytes());
                out.push(u8::from(prekey.one_time_prekey_id.is_some()));
                out.extend_from_slice(&prekey.one_time_prekey_id.unwrap_or(0).to_be_bytes());
                out.extend_from_slice(&prekey.kem_prekey_id.to_be_bytes());
                out.extend_from_slice(&prekey.kem_ciphertext);
                write_ratchet(&mut out, &prekey.message);
                out
            }
        }
    }

    /// Parses a message, checking every length and key encoding.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        let mut reader = Reader(bytes);
        let version = reader.byte()?;
        if version != MESSAGE_VERSION {
            return Err(CryptoError::UnsupportedVersion(version));
        }
        match reader.byte()? {
            KIND_RATCHET => Ok(CiphertextMessage::Ratchet(read_ratchet(reader)?)),
            KIND_PREKEY => {
                let identity = IdentityKey::from_bytes(reader.take(IDENTITY_KEY_LEN)?)?;
                let base_key = decode_ec(reader.take(33)?)?;
                let signed_prekey_id = reader.u32()?;
                let has_one_time = reader.byte()?;
                let one_time_id = reader.u32()?;
                let one_time_prekey_id = match has_one_time {
                    0 => None,
                    1 => Some(one_time_id),
                    _ => return Err(CryptoError::InvalidMessage),
                };
                let kem_prekey_id = reader.u32()?;
                let kem_ciphertext = reader.take(KEM_CIPHERTEXT_LEN)?.to_vec();
                Ok(CiphertextMessage::Prekey(Box::new(PrekeyMessage {
                    identity,
                    base_key,
                    signed_prekey_id,
                    one_time_prekey_id,
                    kem_prekey_id,
                    kem_ciphertext,
                    message: read_ratchet(reader)?,
                })))
            }
            _ => Err(CryptoError::InvalidMessage),
        }
    }
}

fn write_ratchet(out: &mut Vec<u8>, message: &RatchetMessage) {
    out.extend_from_slice(&message.header.to_bytes());
    out.extend_from_slice(&message.ciphertext);
}

fn read_ratchet(mut reader: Reader<'_>) -> Result<RatchetMessage, CryptoError> {
    let header: &[u8; HEADER_LEN] = reader
        .take(HEADER_LEN)?
        .try_into()
        .map_err(|_| CryptoError::InvalidMessage)?;
    let header = Header::from_bytes(header);
    if reader.0.len() < TAG_LEN {
        return Err(CryptoError::InvalidMessage);
    }
    Ok(RatchetMessage {
        header,
        ciphertext: reader.0.to_vec(),
    })
}

/// A cursor that fails with `InvalidMessage` instead of panicking on short input.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], CryptoError> {
        if self.0.len() < n {
            return Err(CryptoError::InvalidMessage);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    pub(crate) fn byte(&mut self) -> Result<u8, CryptoError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, CryptoError> {
        let mut out = [0u8; 4];
        out.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(out))
    }
}
