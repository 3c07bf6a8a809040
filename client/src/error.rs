//! What can go wrong talking to a relay.

use hush_protocol::media::MediaError;
use hush_protocol::{DecodeError, ErrorCode, VersionRange};

/// A connection or request failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The local UDP socket could not be set up.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// TLS could not be configured.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The connection attempt was refused before it started (bad address or name).
    #[error("connecting: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The QUIC connection failed or was closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The relay speaks no protocol version this client does.
    #[error("the relay speaks protocol versions {}..={}, this client {}..={}", relay.min, relay.max, client.min, client.max)]
    UnsupportedVersion {
        /// The relay's versions.
        relay: VersionRange,
        /// Ours.
        client: VersionRange,
    },
    /// The relay refused the request; the connection is still usable. Among the codes:
    /// [`ErrorCode::MailboxFull`] (a recipient device holds as much as it may; nothing of
    /// the send was stored: try again later, it frees up as that device reads).
    #[error("the relay refused the request: {0}")]
    Refused(ErrorCode),
    /// A rate limit of the relay refused the request; nothing of it was done, the
    /// connection is still usable, and the same request may succeed after `retry_after`.
    #[error("rate limited by the relay; retry after {} ms", retry_after.as_millis())]
    RateLimited {
        /// How long the relay says to wait.
        retry_after: std::time::Duration,
    },
    /// The relay refused a new connection before the handshake: it is at its connection
    /// limit, or this address has as many connections as it may. Try again later.
    #[error("the relay refused the connection")]
    ConnectionRefused,
    /// The relay closed the connection, giving this code where it gave one.
    #[error("the relay closed the connection ({})", .0.map_or("no code".to_owned(), |c| c.to_string()))]
    Closed(Option<ErrorCode>),
    /// The relay sent bytes that are not a valid frame.
    #[error("the relay sent an invalid frame: {0}")]
    Protocol(#[from] DecodeError),
    /// The relay answered with a response of the wrong kind.
    #[error("unexpected response from the relay")]
    UnexpectedResponse,
    /// The request is over a protocol limit and was not sent.
    #[error("request not sent: {0}")]
    TooLarge(DecodeError),
    /// A media frame is over the media limit and was not sent.
    #[error("media frame not sent: {0}")]
    Media(#[from] MediaError),
    /// QUIC refused the datagram: larger than the path carries, or the connection is gone.
    #[error("datagram not sent: {0}")]
    Datagram(#[from] quinn::SendDatagramError),
}

/// An end-to-end operation failed. Whatever failed left the session it touched exactly as
/// it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// A public key is malformed, of the wrong type, or of low order.
    #[error("invalid public key")]
    InvalidKey,
    /// A signature (prekey, certificate) does not verify.
    #[error("bad signature")]
    BadSignature,
    /// The message is malformed or truncated.
    #[error("malformed message")]
    InvalidMessage,
    /// The message names a format version this build does not speak.
    #[error("unsupported message version {0}")]
    UnsupportedVersion(u8),
    /// Authentication failed: the ciphertext was tampered with, or is not for this session.
    #[error("decryption failed")]
    DecryptionFailed,
    /// This message was already decrypted (or its key was dropped as too old).
    #[error("duplicate or too old message")]
    DuplicateMessage,
    /// The message claims a counter too far ahead of the chain: more skipped keys than the
    /// bound allows.
    #[error("message too far ahead ({skipped} skipped, at most {limit})")]
    TooFarAhead {
        /// Keys that would have to be skipped.
        skipped: u32,
        /// The bound.
        limit: u32,
    },
    /// A prekey message names a prekey this device does not have (used up or rotated out).
    #[error("unknown or used prekey")]
    UnknownPrekey,
    /// The peer's prekey bundle lacks a required key.
    #[error("incomplete prekey bundle")]
    IncompleteBundle,
    /// The sender certificate is expired, forged or does not match the sender.
    #[error("invalid sender certificate: {0}")]
    InvalidCertificate(&'static str),
    /// The message arrived for a device other than this one.
    #[error("message addressed to another device")]
    WrongRecipient,
    /// A device claims to belong to our own account but does not hold our identity key.
    #[error("a device of our own account with a foreign identity key")]
    UntrustedIdentity,
    /// A message's content could not be encoded; nothing was sent.
    #[error("message content does not encode")]
    Encode,
    /// A plaintext is over what the AEAD can seal (about 256 GiB); nothing was sealed.
    #[error("plaintext too large to seal")]
    PlaintextTooLarge,
}

/// A persisted value (a pickle of secret state, or a plain record of the local store) did
/// not encode or decode. Every persisted value is `version byte || postcard body`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PickleError {
    /// The value could not be serialized; nothing was written.
    #[error("a value for the local store does not encode")]
    Encode,
    /// The value was written in a format version this build does not read.
    #[error("a stored value has the unknown format version {0}")]
    UnknownVersion(u8),
    /// The value does not decode: truncated, garbage, trailing bytes, or a key inside it
    /// that does not parse.
    #[error("a stored value is damaged")]
    Corrupt,
}
