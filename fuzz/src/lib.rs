//! What the fuzz targets share: the frame invariants, fixed keys, and the seed corpora's
//! sources. A target asserts the properties that matter (round trips, limits, that a
//! forgery never opens), not only that nothing panics.
#![forbid(unsafe_code)]

use std::fmt::Debug;
use std::sync::OnceLock;

use ed25519_dalek::{Signer, SigningKey};
use hush_client::IdentityKeyPair;
use hush_protocol::sealed::{SenderCertificate, SenderCertificateBody};
use hush_protocol::{
    encode_frame, AccountId, ClientFrame, DecodeError, DeviceId, Frame, FrameDecoder, FrameHeader,
    ServerFrame, HEADER_LEN,
};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

pub mod seeds;

/// A frame type whose decoded values can be checked against the field limits.
pub trait CheckedFrame: Frame + PartialEq + Debug {
    /// The field limits of `hush_protocol::limits`.
    fn check_limits(&self) -> Result<(), DecodeError>;
}

impl CheckedFrame for ClientFrame {
    fn check_limits(&self) -> Result<(), DecodeError> {
        match self {
            ClientFrame::Hello(_) => Ok(()),
            ClientFrame::Request(request) => request.body.check_limits(),
        }
    }
}

impl CheckedFrame for ServerFrame {
    fn check_limits(&self) -> Result<(), DecodeError> {
        ServerFrame::check_limits(self)
    }
}

/// The invariants of a frame decoded from `raw_body`: it is of the kind it was decoded as,
/// obeys the field limits, re-encodes within its kind's body limit and no longer than the
/// bytes it came from (postcard accepts over-long varints but writes minimal ones), and
/// the re-encoding decodes to the same frame.
pub fn check_decoded<F: CheckedFrame>(kind: u8, raw_body: &[u8], frame: &F) {
    assert_eq!(frame.kind(), kind, "decoded as another kind");
    frame
        .check_limits()
        .expect("a decoded frame obeys the field limits");
    let encoded = encode_frame(frame);
    let header: [u8; HEADER_LEN] = encoded[..HEADER_LEN].try_into().expect("header");
    let header = FrameHeader::parse::<F>(header)
        .expect("a frame within the field limits fits its kind's body limit");
    assert_eq!(header.kind, kind);
    assert_eq!(header.body_len, encoded.len() - HEADER_LEN);
    assert!(
        header.body_len <= raw_body.len(),
        "re-encoding is longer than the decoded bytes"
    );
    let again = F::decode_body(kind, &encoded[HEADER_LEN..]).expect("re-encoding decodes");
    assert_eq!(
        &again, frame,
        "decode -> encode -> decode changed the frame"
    );
}

/// What a stream of bytes decodes to: the frames, then the first error if any.
#[derive(Debug, PartialEq)]
pub struct StreamOutcome<F> {
    /// The frames in order.
    pub frames: Vec<F>,
    /// The error that ended decoding (a reader closes the connection there).
    pub error: Option<DecodeError>,
    /// Whether an incomplete frame was left over at the end.
    pub partial: bool,
}

/// Decodes `stream` with [`FrameDecoder`], fed in chunks of `chunk` bytes.
pub fn decode_stream<F: CheckedFrame>(stream: &[u8], chunk: usize) -> StreamOutcome<F> {
    let mut decoder = FrameDecoder::<F>::new();
    let mut frames = Vec::new();
    for piece in stream.chunks(chunk.max(1)) {
        decoder.extend(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(error) => {
                    return StreamOutcome {
                        frames,
                        error: Some(error),
                        partial: false,
                    }
                }
            }
        }
    }
    StreamOutcome {
        frames,
        error: None,
        partial: decoder.has_partial_frame(),
    }
}

/// Decodes `stream` by hand, header by header, checking every frame's invariants: the
/// reference [`decode_stream`] must agree with.
pub fn decode_reference<F: CheckedFrame>(mut stream: &[u8]) -> StreamOutcome<F> {
    let mut frames = Vec::new();
    loop {
        let Some(header) = stream.first_chunk::<HEADER_LEN>() else {
            return StreamOutcome {
                frames,
                error: None,
                partial: !stream.is_empty(),
            };
        };
        let header = match FrameHeader::parse::<F>(*header) {
            Ok(header) => header,
            Err(error) => {
                return StreamOutcome {
                    frames,
                    error: Some(error),
                    partial: false,
                }
            }
        };
        let limit = F::body_limit(header.kind).expect("a parsed header has a known kind");
        assert!(header.body_len <= limit, "header over its kind's limit");
        let Some(body) = stream.get(HEADER_LEN..HEADER_LEN + header.body_len) else {
            return StreamOutcome {
                frames,
                error: None,
                partial: true,
            };
        };
        match F::decode_body(header.kind, body) {
            Ok(frame) => {
                check_decoded(header.kind, body, &frame);
                frames.push(frame);
            }
            Err(error) => {
                return StreamOutcome {
                    frames,
                    error: Some(error),
                    partial: false,
                }
            }
        }
        stream = &stream[HEADER_LEN + header.body_len..];
    }
}

/// Decodes one body of `kind` (client kinds below 0x80, server kinds above) and checks it.
pub fn check_body(kind: u8, body: &[u8]) {
    if kind < 0x80 {
        check_body_of::<ClientFrame>(kind, body);
    } else {
        check_body_of::<ServerFrame>(kind, body);
    }
}

fn check_body_of<F: CheckedFrame>(kind: u8, body: &[u8]) {
    let result = F::decode_body(kind, body);
    match (F::body_limit(kind), result) {
        (None, Err(DecodeError::UnknownFrameType(k))) => assert_eq!(k, kind),
        (None, other) => panic!("unknown kind {kind:#04x} decoded as {other:?}"),
        (Some(_), Err(DecodeError::UnknownFrameType(_))) => {
            panic!("known kind {kind:#04x} refused as unknown")
        }
        (Some(_), Err(_)) => {}
        (Some(_), Ok(frame)) => check_decoded(kind, body, &frame),
    }
}

/// Fixed keys for the targets that need a session or an envelope: deterministic, so that
/// an input always does the same thing.
pub struct Keys {
    /// The relay's sender-certificate key.
    pub relay: SigningKey,
    /// The sender.
    pub alice: IdentityKeyPair,
    /// The recipient.
    pub bob: IdentityKeyPair,
}

/// The device the sealed-sender targets address.
pub const BOB_DEVICE: u32 = 3;
/// The time the sealed-sender targets open envelopes at.
pub const NOW: u64 = 1_000;

/// The process-wide fixed keys.
pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut rng = ChaCha20Rng::seed_from_u64(0x4855_5348);
        Keys {
            relay: SigningKey::generate(&mut rng),
            alice: IdentityKeyPair::generate_with(&mut rng),
            bob: IdentityKeyPair::generate_with(&mut rng),
        }
    })
}

impl Keys {
    /// The relay's public key, as clients hold it.
    pub fn relay_key(&self) -> [u8; 32] {
        self.relay.verifying_key().to_bytes()
    }

    /// Signs `body` (any bytes) as a sender certificate body.
    pub fn sign_certificate_body(&self, body: Vec<u8>) -> SenderCertificate {
        let signature = self.relay.sign(&SenderCertificate::transcript(&body));
        SenderCertificate {
            body,
            signature: hush_protocol::Signature(signature.to_bytes()),
        }
    }

    /// A genuine certificate for Alice, valid until `expires_at`.
    pub fn alice_certificate(&self, expires_at: u64) -> SenderCertificate {
        let body = SenderCertificateBody {
            account: AccountId([0xA1; 16]),
            device: DeviceId(2),
            identity_key: self.alice.public().to_bytes().to_vec(),
            expires_at,
        };
        SenderCertificate::issue(&body, |transcript| self.relay.sign(transcript).to_bytes())
    }
}

/// A seeded RNG from the first eight bytes of `data` (zero-padded).
pub fn rng_from(data: &[u8]) -> ChaCha20Rng {
    let mut seed = [0u8; 8];
    let n = data.len().min(8);
    seed[..n].copy_from_slice(&data[..n]);
    ChaCha20Rng::seed_from_u64(u64::from_le_bytes(seed))
}

/// The call the media targets use.
pub const CALL_ID: [u8; 16] = [0xC0; 16];
/// The call's allocation.
pub const ALLOCATION: u32 = 7;
/// The first frame of the genuine media stream.
pub const GENUINE_MEDIA: &[u8] = b"opus frame";

/// The call key the media targets use.
pub fn call_key() -> hush_client::media::CallKey {
    hush_client::test_support::call_key_from([0x5A; 32])
}

/// The first frame the caller seals in the fixed call: the one frame a fresh receiver
/// may open.
pub fn genuine_media_frame() -> Vec<u8> {
    use hush_client::media::{Direction, MediaSender};
    let mut sender = MediaSender::new(&call_key(), CALL_ID, Direction::FromCaller, ALLOCATION);
    sender.seal(GENUINE_MEDIA).expect("sealing a frame")
}

/// The leg of the media port targets' packets.
pub const MEDIA_LEG: u64 = 0x0123_4567_89ab_cdef;

/// The key the media port targets seal with.
pub fn hop_key() -> hush_protocol::media_udp::HopKey {
    hush_protocol::media_udp::HopKey::from_bytes([0xA5; 32])
}

/// The one packet a leg keyed with [`hop_key`] opens in the `forged` mode.
pub fn genuine_media_packet() -> Vec<u8> {
    let mut packet = Vec::new();
    hush_protocol::media_udp::HopCipher::new(&hop_key())
        .seal_into(MEDIA_LEG, 1, GENUINE_MEDIA, &mut packet)
        .expect("sealing a packet");
    packet
}

/// The message inside the genuine sealed envelope.
pub const GENUINE_SEALED: &[u8] = b"inner message";

/// The inner content of the genuine sealed envelope: Alice's certificate, Bob's device,
/// the message.
pub fn genuine_sealed_content() -> Vec<u8> {
    let certificate = postcard::to_allocvec(&keys().alice_certificate(2_000)).expect("encodes");
    let mut content = Vec::new();
    content.extend_from_slice(
        &u16::try_from(certificate.len())
            .expect("short")
            .to_be_bytes(),
    );
    content.extend_from_slice(&certificate);
    content.extend_from_slice(&BOB_DEVICE.to_be_bytes());
    content.extend_from_slice(GENUINE_SEALED);
    content
}

/// The one sealed envelope from Alice to Bob that exists in this world: the one envelope
/// Bob may open.
pub fn genuine_sealed_envelope() -> &'static [u8] {
    static SEALED: OnceLock<Vec<u8>> = OnceLock::new();
    SEALED.get_or_init(|| {
        let keys = keys();
        hush_client::test_support::seal_content(
            &keys.alice,
            keys.bob.public(),
            &genuine_sealed_content(),
            &mut rng_from(b"seeds"),
        )
        .expect("sealing to a valid identity key")
    })
}

/// Runs one of three checks on the bytes after the first, the first byte choosing: 0 the
/// first check, 1 the second, anything else the third.
pub fn by_mode(data: &[u8], checks: [fn(&[u8]); 3]) {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    checks[usize::from(mode.min(2))](bytes);
}
