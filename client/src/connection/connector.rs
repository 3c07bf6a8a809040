//! Opening connections to a relay: how its certificate is trusted, the QUIC endpoint and
//! its transport settings, and the raw stream under a [`Connection`](super::Connection).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hush_protocol::auth::{EXPORTER_LABEL, EXPORTER_LEN};
use hush_protocol::{encode_frame, ClientFrame, ErrorCode, Hello, ServerFrame, SUPPORTED_VERSIONS};
use quinn::{IdleTimeout, RecvStream, SendStream, VarInt};
use rustls::RootCertStore;

use super::control::read_frame;
use super::Connection;
use crate::error::ConnectionError;
use crate::tls::PinnedCertificate;

/// Keep-alives stop NAT bindings and the relay's idle timer from dropping a quiet device.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
const IDLE_TIMEOUT_MS: u32 = 60_000;
/// Bytes of media datagrams buffered each way.
const DATAGRAM_BUFFER: usize = 256 * 1024;

/// How the client decides to trust the relay's certificate.
#[derive(Clone, Debug)]
pub enum Trust {
    /// The SHA-256 fingerprint of the relay's certificate, as `hush-relay serve` prints it.
    Pinned([u8; 32]),
    /// Certificates chaining to these roots, for the server name in [`ConnectOptions`].
    WebPki(Arc<RootCertStore>),
}

/// Where a relay is and how to trust it.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// The relay's UDP address.
    pub address: SocketAddr,
    /// The TLS server name (checked under [`Trust::WebPki`]).
    pub server_name: String,
    /// How to trust the certificate.
    pub trust: Trust,
    /// Whether call media may use the relay's UDP media port when the relay offers one
    /// (falling back to QUIC datagrams where the port does not answer); `false` keeps media
    /// on QUIC datagrams.
    pub udp_media: bool,
}

impl ConnectOptions {
    /// Options for `address` with server name `localhost`.
    pub fn new(address: SocketAddr, trust: Trust) -> Self {
        ConnectOptions {
            address,
            server_name: "localhost".to_owned(),
            trust,
            udp_media: true,
        }
    }
}

/// Opens connections to one relay, sharing one UDP socket among them.
pub struct Connector {
    pub(super) endpoint: quinn::Endpoint,
    options: ConnectOptions,
}

impl Connector {
    /// Binds a UDP socket and prepares TLS for `options`.
    pub fn new(options: ConnectOptions) -> Result<Self, ConnectionError> {
        Self::with_keep_alive(options, Some(KEEP_ALIVE))
    }

    /// As [`Connector::new`], with QUIC keep-alives every `keep_alive`, or none. Without
    /// them a quiet connection ends at the idle timeout; tests and tools use that.
    pub fn with_keep_alive(
        options: ConnectOptions,
        keep_alive: Option<Duration>,
    ) -> Result<Self, ConnectionError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        let mut tls = match &options.trust {
            Trust::Pinned(fingerprint) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCertificate::new(
                    *fingerprint,
                    &provider,
                )))
                .with_no_client_auth(),
            Trust::WebPki(roots) => builder
                .with_root_certificates(roots.clone())
                .with_no_client_auth(),
        };
        tls.alpn_protocols = vec![hush_protocol::ALPN.to_vec()];
        // Early data is replayable; nothing a client sends may be.
        tls.enable_early_data = false;
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|_| rustls::Error::General("no QUIC-capable cipher suite".into()))?;

        let mut transport = quinn::TransportConfig::default();
        transport
            .max_concurrent_bidi_streams(VarInt::from_u32(0))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .receive_window(VarInt::from_u32(8 * 1024 * 1024))
            .stream_receive_window(VarInt::from_u32(4 * 1024 * 1024))
            .keep_alive_interval(keep_alive)
            .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(IDLE_TIMEOUT_MS))))
            // Call media: bounded buffers that drop the oldest datagrams when full.
            .datagram_receive_buffer_size(Some(DATAGRAM_BUFFER))
            .datagram_send_buffer_size(DATAGRAM_BUFFER);
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(transport));

        let bind: SocketAddr = if options.address.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint = quinn::Endpoint::client(bind)?;
        endpoint.set_default_client_config(config);
        Ok(Connector { endpoint, options })
    }

    /// Opens a connection and negotiates the protocol version.
    pub async fn connect(&self) -> Result<Connection, ConnectionError> {
        let mut raw = self.connect_raw().await?;
        raw.write(&encode_frame(&ClientFrame::Hello(Hello::current())))
            .await?;
        let hello = match raw.read_frame().await? {
            Some(ServerFrame::HelloOk(ok)) => ok,
            Some(ServerFrame::Fatal(fatal)) if fatal.code == ErrorCode::UnsupportedVersion => {
                return Err(ConnectionError::UnsupportedVersion {
                    relay: fatal.supported_versions,
                    client: SUPPORTED_VERSIONS,
                })
            }
            Some(ServerFrame::Fatal(fatal)) => {
                return Err(ConnectionError::Closed(Some(fatal.code)))
            }
            Some(_) => return Err(ConnectionError::UnexpectedResponse),
            None => return Err(ConnectionError::Closed(raw.close_code())),
        };
        Ok(Connection::start(
            raw,
            hello.challenge,
            self.options.udp_media,
        ))
    }

    /// Opens a QUIC connection and its control stream and stops there: no `Hello`, no
    /// framing. For conformance tests and tools that must speak to the relay byte by byte.
    pub async fn connect_raw(&self) -> Result<RawStream, ConnectionError> {
        let connection = self.connect_quic().await?;
        let (send, recv) = connection.open_bi().await?;
        Ok(RawStream {
            connection,
            send,
            recv,
        })
    }

    /// Completes a QUIC handshake and stops there: no stream at all. For abuse tests and
    /// tools that must do with streams and datagrams what no client would.
    pub async fn connect_quic(&self) -> Result<quinn::Connection, ConnectionError> {
        self.endpoint
            .connect(self.options.address, &self.options.server_name)?
            .await
            .map_err(|error| match error {
                quinn::ConnectionError::ConnectionClosed(close)
                    if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
                {
                    ConnectionError::ConnectionRefused
                }
                other => other.into(),
            })
    }
}

/// A QUIC connection's control stream without the protocol on top.
pub struct RawStream {
    pub(super) connection: quinn::Connection,
    pub(super) send: SendStream,
    pub(super) recv: RecvStream,
}

impl RawStream {
    /// Writes bytes as they are.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), ConnectionError> {
        self.send
            .write_all(bytes)
            .await
            .map_err(|_| ConnectionError::Closed(self.close_code()))
    }

    /// Ends the sending side of the stream.
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }

    /// Reads one frame from the relay; `None` when the relay ended the stream or the
    /// connection.
    pub async fn read_frame(&mut self) -> Result<Option<ServerFrame>, ConnectionError> {
        read_frame(&mut self.recv).await
    }

    /// The exporter secret this connection's authentication signatures are bound to.
    pub fn exporter(&self) -> Result<[u8; EXPORTER_LEN], ConnectionError> {
        let mut out = [0u8; EXPORTER_LEN];
        self.connection
            .export_keying_material(&mut out, EXPORTER_LABEL, b"")
            .map_err(|_| ConnectionError::Tls(rustls::Error::General("no exporter".into())))?;
        Ok(out)
    }

    /// The relay's close code, once the connection is closed by the relay with one.
    pub fn close_code(&self) -> Option<ErrorCode> {
        close_code(&self.connection)
    }

    /// The QUIC connection under the stream, for tests that open more streams on it.
    pub fn quic(&self) -> &quinn::Connection {
        &self.connection
    }

    /// Waits until the connection is closed and returns the relay's code, if any.
    pub async fn closed(&self) -> Option<ErrorCode> {
        self.connection.closed().await;
        self.close_code()
    }
}

/// The relay's close code on a closed QUIC connection, if it gave one.
pub fn close_code(connection: &quinn::Connection) -> Option<ErrorCode> {
    match connection.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(close) => {
            u16::try_from(close.error_code.into_inner())
                .ok()
                .filter(|c| *c != 0)
                .map(ErrorCode::from_u16)
        }
        _ => None,
    }
}
