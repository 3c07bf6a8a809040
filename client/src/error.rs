//! What can go wrong talking to a relay.

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
    /// The relay refused the request; the connection is still usable.
    #[error("the relay refused the request: {0}")]
    Refused(ErrorCode),
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
}
