//! The QUIC endpoint: TLS 1.3 only, ALPN `hush/1`, no 0-RTT, explicit limits, and UDP
//! socket buffers sized for bursts.

use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};

use quinn::{IdleTimeout, VarInt};

use crate::config::Config;
use crate::tls::{ServerIdentity, TlsError};

/// Bidirectional streams a client may have open: the control stream only. The relay
/// accepts one stream per connection, so a second one would sit unaccepted, pinning up to
/// a stream window of buffered bytes; with a limit of 1, QUIC flow control (MAX_STREAMS)
/// refuses it instead, and finishing or resetting the control stream ends the session, so
/// stream churn holds nothing. Blob streams will raise this, with an acceptor for them.
const MAX_BIDI_STREAMS: u32 = 1;

/// The UDP receive and send buffers asked for. The kernel's default (about 208 KiB) holds
/// some 150 full-size packets: a reconnect storm's handshakes, or a burst of call media,
/// overflow it and are dropped before quinn sees them. Linux caps the request at
/// `net.core.rmem_max` / `wmem_max`; the sizes granted are logged at start.
const UDP_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// A UDP socket bound to `listen`, with large buffers asked for.
fn udp_socket(listen: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    // Best effort: a smaller buffer than asked for is still a working relay.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    socket.bind(&listen.into())?;
    Ok(socket)
}

/// Binds the relay's UDP socket with large buffers and makes it a QUIC endpoint.
pub fn bind(listen: SocketAddr, server: quinn::ServerConfig) -> std::io::Result<quinn::Endpoint> {
    let socket = udp_socket(listen)?;
    tracing::info!(
        receive_buffer = socket.recv_buffer_size().unwrap_or_default(),
        send_buffer = socket.send_buffer_size().unwrap_or_default(),
        "UDP socket buffers"
    );
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for the QUIC endpoint"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket.into(),
        runtime,
    )
}

/// Binds the UDP media port (`crate::media`), with the same large buffers.
pub fn bind_media(listen: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    let socket = udp_socket(listen)?;
    socket.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// Tasks reading the media port: one per core, all on the one socket.
pub fn media_workers() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Builds the endpoint's server configuration.
pub fn server_config(
    config: &Config,
    identity: ServerIdentity,
) -> Result<quinn::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)?;
    tls.alpn_protocols = vec![hush_protocol::ALPN.to_vec()];
    // 0-RTT data can be replayed by anyone who saw it; nothing we accept may be replayable.
    tls.max_early_data_size = 0;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|_| {
        TlsError::Rustls(rustls::Error::General(
            "no QUIC-capable cipher suite".into(),
        ))
    })?;

    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(Arc::new(transport_config(config)));
    // Bound what unvalidated handshakes may make the relay hold.
    server.max_incoming(config.limits.max_connections.min(65_536));
    Ok(server)
}

fn transport_config(config: &Config) -> quinn::TransportConfig {
    let limits = &config.limits;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_BIDI_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        // quinn's default connection window is unbounded; a peer could make us buffer
        // without limit across streams.
        .receive_window(VarInt::from_u32(limits.connection_receive_window))
        .stream_receive_window(VarInt::from_u32(limits.stream_receive_window))
        .send_window(u64::from(limits.connection_receive_window) * 2)
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(
            u32::try_from(limits.idle_timeout_secs.saturating_mul(1000)).unwrap_or(u32::MAX),
        ))))
        // Call media: datagrams beyond these buffers drop the oldest, so a flood costs a
        // bounded amount of memory per connection and forwarding never waits.
        .datagram_receive_buffer_size(Some(limits.datagram_receive_buffer))
        .datagram_send_buffer_size(limits.datagram_send_buffer);
    transport
}
