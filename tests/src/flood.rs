//! Handshake floods at the packet level, for the abuse tests and the bench's `abuse`
//! scenario. quinn's own client always finishes what it starts; these drive quinn-proto's
//! sans-IO client by hand so that a connection attempt can stop wherever an attacker
//! would: after its first Initial (never answering the relay's Retry), or after proving
//! its address (answering the Retry) and then going silent mid-handshake.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn_proto::crypto::rustls::QuicClientConfig;
use quinn_proto::{ClientConfig, ConnectionHandle, DatagramEvent, Endpoint, EndpointConfig};
use tokio::net::UdpSocket;

/// Connection attempts made per endpoint before it is replaced: an abandoned attempt
/// stays in its endpoint's tables, and the flooder must not grow without bound.
const ATTEMPTS_PER_ENDPOINT: usize = 4096;

/// One flooding socket aimed at one relay.
pub struct HandshakeFlood {
    socket: UdpSocket,
    relay: SocketAddr,
    config: ClientConfig,
    endpoint: Endpoint,
    attempts: usize,
    buf: Vec<u8>,
}

/// What one round of abandoned handshakes did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Abandoned {
    /// Initials sent.
    pub initials: usize,
    /// Retries received and answered: each is a handshake the relay then started.
    pub retries_answered: usize,
}

impl HandshakeFlood {
    /// Binds a loopback socket for flooding `relay`.
    pub async fn new(relay: SocketAddr) -> io::Result<Self> {
        let socket = UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        // The certificate is never checked: no attempt gets that far. An empty root store
        // would refuse it if one did.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(io::Error::other)?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        tls.alpn_protocols = vec![hush_protocol::ALPN.to_vec()];
        let quic = QuicClientConfig::try_from(tls).map_err(io::Error::other)?;
        Ok(HandshakeFlood {
            socket,
            relay,
            config: ClientConfig::new(Arc::new(quic)),
            endpoint: new_endpoint(),
            attempts: 0,
            buf: Vec::with_capacity(2048),
        })
    }

    /// Sends `count` Initials and never answers: each costs the relay one Retry and
    /// nothing else. Returns how many went out.
    pub async fn unanswered_initials(&mut self, count: usize) -> io::Result<usize> {
        let mut sent = 0;
        for _ in 0..count {
            if self.start_attempt().await?.is_some() {
                sent += 1;
            }
        }
        Ok(sent)
    }

    /// Sends `count` Initials, answers each Retry that comes back within `wait` (so the
    /// relay sees a validated address and starts a real handshake, with its crypto), then
    /// goes silent: the relay holds those handshakes until they time out.
    pub async fn abandoned_handshakes(
        &mut self,
        count: usize,
        wait: Duration,
    ) -> io::Result<Abandoned> {
        let mut pending = HashMap::new();
        let mut done = Abandoned::default();
        for _ in 0..count {
            if let Some((handle, connection)) = self.start_attempt().await? {
                pending.insert(handle, connection);
                done.initials += 1;
            }
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut datagram = vec![0u8; 65_536];
        while !pending.is_empty() {
            let received =
                tokio::time::timeout_at(deadline, self.socket.recv_from(&mut datagram)).await;
            let Ok(received) = received else { break };
            let (len, from) = received?;
            let event = self.endpoint.handle(
                Instant::now(),
                from,
                None,
                None,
                BytesMut::from(&datagram[..len]),
                &mut self.buf,
            );
            let Some(DatagramEvent::ConnectionEvent(handle, event)) = event else {
                continue;
            };
            // The Retry: answered once with the token, then the attempt is dropped.
            let Some(mut connection) = pending.remove(&handle) else {
                continue;
            };
            connection.handle_event(event);
            if self.transmit(&mut connection).await? {
                done.retries_answered += 1;
            }
        }
        Ok(done)
    }

    async fn start_attempt(
        &mut self,
    ) -> io::Result<Option<(ConnectionHandle, quinn_proto::Connection)>> {
        if self.attempts >= ATTEMPTS_PER_ENDPOINT {
            self.endpoint = new_endpoint();
            self.attempts = 0;
        }
        self.attempts += 1;
        let Ok((handle, mut connection)) =
            self.endpoint
                .connect(Instant::now(), self.config.clone(), self.relay, "localhost")
        else {
            return Ok(None);
        };
        let sent = self.transmit(&mut connection).await?;
        Ok(sent.then_some((handle, connection)))
    }

    /// Sends the attempt's next datagram, if it has one.
    async fn transmit(&mut self, connection: &mut quinn_proto::Connection) -> io::Result<bool> {
        self.buf.clear();
        let Some(transmit) = connection.poll_transmit(Instant::now(), 1, &mut self.buf) else {
            return Ok(false);
        };
        self.socket
            .send_to(&self.buf[..transmit.size], transmit.destination)
            .await?;
        Ok(true)
    }
}

fn new_endpoint() -> Endpoint {
    Endpoint::new(Arc::new(EndpointConfig::default()), None, false, None)
}
