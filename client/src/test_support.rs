//! Helpers shared by the property tests and the fuzz targets (cargo feature
//! `test-support`, off by default): parties with pairwise sessions set up by the real
//! PQXDH and ratchet code, a ledger that checks every message opens exactly once, and
//! entry points to parsers that are otherwise private. Apps never need any of it.

use std::collections::HashSet;

use hush_protocol::sealed::SenderCertificate;
use hush_protocol::{DeviceBundle, DeviceId};
use rand_core::CryptoRngCore;
use zeroize::Zeroizing;

use crate::error::CryptoError;
use crate::keys::{IdentityKey, IdentityKeyPair};
use crate::message::CiphertextMessage;
use crate::pickle::{pickle_session, unpickle_session};
use crate::pqxdh::PeerBundle;
use crate::prekeys::PrekeySet;
use crate::session::Session;

/// One party of a simulated conversation.
pub struct Party {
    /// Its identity.
    pub identity: IdentityKeyPair,
    /// `sessions[j]`: the session with party `j` (`None` for itself).
    pub sessions: Vec<Option<Session>>,
}

/// `n` parties with pairwise sessions: `i` initiates to `j` for `i < j` from `j`'s real
/// prekey bundle, and its first message is accepted, so that both sides hold the session.
/// The initiator keeps sending prekey messages until it hears back, as in real use.
pub fn pairwise_sessions(
    n: usize,
    rng: &mut impl CryptoRngCore,
) -> Result<Vec<Party>, CryptoError> {
    let mut parties: Vec<Party> = (0..n)
        .map(|_| Party {
            identity: IdentityKeyPair::generate_with(rng),
            sessions: (0..n).map(|_| None).collect(),
        })
        .collect();
    let one_time_count = u32::try_from(n).map_err(|_| CryptoError::IncompleteBundle)?;
    for j in 0..n {
        let mut prekeys = PrekeySet::default();
        let mut upload = prekeys.rotate(&parties[j].identity, 0, rng);
        let more = prekeys.replenish(&parties[j].identity, one_time_count, rng);
        upload.one_time = more.one_time;
        upload.kem_one_time = more.kem_one_time;
        for i in 0..j {
            let bundle = DeviceBundle {
                device: DeviceId(1),
                device_key: [0; 32],
                signed_prekey: upload.signed_prekey.clone(),
                one_time: upload.one_time.get(i).cloned(),
                kem: upload.kem_one_time.get(i).cloned(),
                kem_is_last_resort: false,
            };
            let peer = PeerBundle::verify(&parties[j].identity.public().to_bytes(), &bundle)?;
            let mut session = Session::initiate(&parties[i].identity, &peer, rng)?;
            let CiphertextMessage::Prekey(first) = session.encrypt(b"hello")? else {
                return Err(CryptoError::InvalidMessage);
            };
            let (accepted, plaintext, used) =
                Session::accept(&parties[j].identity, &prekeys, &first, 0, rng)?;
            if plaintext.as_slice() != b"hello" {
                return Err(CryptoError::DecryptionFailed);
            }
            prekeys.consume(used);
            parties[i].sessions[j] = Some(session);
            parties[j].sessions[i] = Some(accepted);
        }
    }
    Ok(parties)
}

/// Every party's sessions as pickles (the encoding the encrypted local store keeps), so
/// that a fuzz target can set sessions up once per process and start each input from the
/// same state: thawing is a decode, setting up is PQXDH with ML-KEM.
pub struct FrozenSessions(Vec<Vec<Option<Zeroizing<Vec<u8>>>>>);

impl FrozenSessions {
    /// Freezes the sessions of `parties`.
    ///
    /// # Panics
    ///
    /// If a session does not pickle, which the derived serializers never make happen.
    // A test fixture, never on a path from the network or the disk; its signature stays
    // infallible for the fuzz targets that build it once.
    #[allow(clippy::expect_used)]
    pub fn freeze(parties: &[Party]) -> Self {
        FrozenSessions(
            parties
                .iter()
                .map(|party| {
                    let pickles = party.sessions.iter();
                    pickles
                        .map(|session| {
                            session
                                .as_ref()
                                .map(|session| pickle_session(session).expect("a session pickles"))
                        })
                        .collect()
                })
                .collect(),
        )
    }

    /// Fresh sessions equal to the frozen ones: `thaw()[i][j]` is party `i`'s session
    /// with party `j`.
    pub fn thaw(&self) -> Result<Vec<Vec<Option<Session>>>, CryptoError> {
        self.0
            .iter()
            .map(|party| {
                let pickles = party.iter();
                pickles
                    .map(|pickle| {
                        pickle
                            .as_ref()
                            .map(|bytes| {
                                unpickle_session(bytes).map_err(|_| CryptoError::InvalidMessage)
                            })
                            .transpose()
                    })
                    .collect()
            })
            .collect()
    }
}

/// What delivering a message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// It opened, for the first time.
    Opened,
    /// It was refused as a duplicate of one that opened before.
    Duplicate,
    /// It had opened before, and its chain is older than the ratchet keys the session
    /// remembers, so it could only fail to decrypt (`DecryptionFailed`): refused, though
    /// not recognised as a duplicate.
    ForgottenChain,
}

/// A breach of exactly-once delivery.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A message opened a second time.
    #[error("message {0} opened twice")]
    OpenedTwice(u32),
    /// A message that never opened was refused as a duplicate.
    #[error("fresh message {0} refused as a duplicate")]
    FreshRefused(u32),
    /// A message opened to the plaintext of another.
    #[error("message {sent} opened as {opened:?}")]
    WrongPlaintext {
        /// The id that was sent.
        sent: u32,
        /// What came out.
        opened: Vec<u8>,
    },
    /// A message failed with an error other than `DuplicateMessage`.
    #[error("message {id} failed: {error}")]
    Failed {
        /// The message.
        id: u32,
        /// How.
        error: CryptoError,
    },
    /// A message that was sent was neither opened nor dropped by the network.
    #[error("message {0} was lost")]
    Lost(u32),
}

/// The messages that opened, each exactly once. Message `id` carries `id` as its four
/// big-endian bytes of plaintext.
#[derive(Debug, Default)]
pub struct ExactlyOnce {
    opened: HashSet<u32>,
}

impl ExactlyOnce {
    /// The plaintext message `id` carries.
    pub fn plaintext(id: u32) -> [u8; 4] {
        id.to_be_bytes()
    }

    /// Delivers the bytes of message `id` to the receiving session, and checks the outcome:
    /// a first arrival must open to its own plaintext; a later one must be refused, with
    /// `DuplicateMessage` while the session remembers its chain.
    pub fn deliver(
        &mut self,
        session: &mut Session,
        id: u32,
        bytes: &[u8],
        now: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Delivery, Violation> {
        let outcome = CiphertextMessage::from_bytes(bytes)
            .and_then(|message| session.decrypt(&message, now, rng));
        match outcome {
            Ok(plaintext) if plaintext.as_slice() != Self::plaintext(id) => {
                Err(Violation::WrongPlaintext {
                    sent: id,
                    opened: plaintext.to_vec(),
                })
            }
            Ok(_) if self.opened.insert(id) => Ok(Delivery::Opened),
            Ok(_) => Err(Violation::OpenedTwice(id)),
            Err(CryptoError::DuplicateMessage) if self.opened.contains(&id) => {
                Ok(Delivery::Duplicate)
            }
            Err(CryptoError::DuplicateMessage) => Err(Violation::FreshRefused(id)),
            Err(CryptoError::DecryptionFailed)
                if self.opened.contains(&id) && !remembers_chain(session, bytes) =>
            {
                Ok(Delivery::ForgottenChain)
            }
            Err(error) => Err(Violation::Failed { id, error }),
        }
    }

    /// Whether message `id` has opened.
    pub fn opened(&self, id: u32) -> bool {
        self.opened.contains(&id)
    }

    /// Checks that each of the messages `1..=sent` opened or was dropped by the network.
    pub fn check_none_lost(&self, sent: u32, dropped: &HashSet<u32>) -> Result<(), Violation> {
        match (1..=sent).find(|id| !self.opened.contains(id) && !dropped.contains(id)) {
            Some(lost) => Err(Violation::Lost(lost)),
            None => Ok(()),
        }
    }
}

/// Whether the session still knows the receiving chain of the message in `bytes`.
fn remembers_chain(session: &Session, bytes: &[u8]) -> bool {
    let ratchet_key = match CiphertextMessage::from_bytes(bytes) {
        Ok(CiphertextMessage::Ratchet(message)) => message.header.ratchet_key,
        Ok(CiphertextMessage::Prekey(prekey)) => prekey.message.header.ratchet_key,
        Err(_) => return false,
    };
    session.ratchet.remembers_chain(&ratchet_key)
}

/// The content of a sealed envelope, as [`parse_sealed_content`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedContent {
    /// The sender certificate (signature unchecked).
    pub certificate: SenderCertificate,
    /// The recipient device.
    pub recipient_device: u32,
    /// The end-to-end message.
    pub message: Vec<u8>,
}

/// Parses the decrypted inner content of a sealed envelope, the part no forged envelope
/// reaches because it sits behind the AEAD.
pub fn parse_sealed_content(content: &[u8]) -> Result<SealedContent, CryptoError> {
    let parsed = crate::sealed::parse_content(content)?;
    Ok(SealedContent {
        certificate: parsed.certificate,
        recipient_device: parsed.recipient_device,
        message: parsed.message.to_vec(),
    })
}

/// Seals arbitrary `content` with both real encryption layers, so that a fuzzer can feed
/// any inner bytes through [`crate::sealed::open`].
pub fn seal_content(
    sender: &IdentityKeyPair,
    recipient: &IdentityKey,
    content: &[u8],
    rng: &mut impl CryptoRngCore,
) -> Result<Vec<u8>, CryptoError> {
    crate::sealed::seal_content(sender, recipient, content, rng)
}

/// Decodes the padded end-to-end plaintext of a message and returns the re-encoding of
/// what it decoded, so that a caller can check the round trip without the private type.
pub fn decode_content(padded: &[u8]) -> Result<Vec<u8>, CryptoError> {
    crate::content::Content::decode(padded).and_then(|content| content.encode())
}

/// A call key from fixed bytes, so that a fuzz input always meets the same keys.
pub fn call_key_from(bytes: [u8; 32]) -> crate::media::CallKey {
    crate::media::CallKey(bytes)
}

/// A real padded end-to-end content carrying `text` (a seed for the content parser).
///
/// # Panics
///
/// If the content does not encode, which the derived serializer never makes happen.
// A fuzz seed, never on a path from the network or the disk.
#[allow(clippy::expect_used)]
pub fn text_content(text: &str) -> Vec<u8> {
    crate::content::Content {
        id: crate::content::MessageId([7; 16]),
        sent_at: 1_700_000_000,
        expires_in: Some(3_600),
        profile_key: Some([9; 32]),
        sent_to: None,
        body: crate::content::Body::Text { text: text.into() },
    }
    .encode()
    .expect("a text content encodes")
}
