//! The UDP media port: call media as plain UDP packets, sealed hop by hop
//! (`hush_protocol::media_udp`), beside the QUIC datagrams of the same calls.
//!
//! QUIC datagrams cost the relay a full connection's machinery per frame (packet
//! protection, ACKs both ways, congestion control, several task wake-ups), about half of
//! what a TURN server spends. This port costs one `recvfrom`, one AEAD open, one AEAD seal
//! and one `sendto` per frame, and keeps what QUIC gave the media: only a party holding its
//! leg's keys (granted over its authenticated QUIC connection) can send into a call or
//! read from it, replays are refused, and the two legs of a call share no bytes on the wire.
//!
//! A party's packets bind its leg to their source address (the newest authentic packet
//! wins, so a NAT rebinding or a network change moves the leg; a replay cannot). A party
//! whose leg is bound receives the other party's frames here, whichever way they came in;
//! one that is not (its UDP never arrived: a firewall) receives them as QUIC datagrams.
//! An empty payload is a binding packet: the relay answers it with an empty packet, so the
//! client knows the port works before it moves its media here. The legs of an allocation
//! go when it ends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use hush_protocol::media::encode_media;
use hush_protocol::media_udp::{
    packet_leg, HopCipher, HopError, HopKey, MediaLeg, ReplayWindow, MAX_HOP_PACKET,
};
use rand_core::{OsRng, RngCore};
use tokio::net::UdpSocket;

use crate::calls::Route;
use crate::metrics::Metrics;
use crate::relay::Shared;
use crate::session::PartyLink;

/// One party's leg.
struct Leg {
    id: u64,
    allocation: u32,
    /// The party's connection number.
    connection: u64,
    up: HopCipher,
    down: HopCipher,
    state: Mutex<LegState>,
}

#[derive(Default)]
struct LegState {
    /// Where the party's newest authentic packet came from.
    address: Option<SocketAddr>,
    received: ReplayWindow,
    /// The last counter the relay sealed to the party with.
    sent: u64,
}

impl Leg {
    fn state(&self) -> std::sync::MutexGuard<'_, LegState> {
        // Every critical section leaves the state consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Seals `payload` for the party, if its leg is bound: the packet goes to the address.
    fn seal(&self, payload: &[u8], out: &mut Vec<u8>) -> Option<SocketAddr> {
        let (address, counter) = {
            let mut state = self.state();
            let address = state.address?;
            state.sent += 1;
            (address, state.sent)
        };
        out.clear();
        self.down.seal_into(self.id, counter, payload, out).ok()?;
        Some(address)
    }
}

#[derive(Default)]
struct Legs {
    by_id: HashMap<u64, Arc<Leg>>,
    by_allocation: HashMap<u32, Vec<Arc<Leg>>>,
}

/// What an incoming packet is.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// A media frame of `allocation` from the party on `connection`.
    Frame {
        /// The allocation.
        allocation: u32,
        /// The sending party's connection number.
        connection: u64,
        /// The end-to-end sealed frame.
        payload: &'a [u8],
    },
    /// A binding packet; answer it with this packet, to the address it came from.
    Bind(Vec<u8>),
}

/// Why an incoming packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Too short or too long.
    Malformed,
    /// No live leg has its id.
    Unknown,
    /// Its tag does not verify under the leg's key.
    Forged,
    /// Its counter was seen already, or is too old.
    Replayed,
}

/// The legs of live calls, and the port's socket. Pure but for the socket, which only
/// [`receive_loop`] and [`forward`] use.
pub struct MediaPlane {
    legs: RwLock<Legs>,
    socket: Option<Arc<UdpSocket>>,
    port: u16,
}

impl MediaPlane {
    /// A plane on `socket`, or none at all (legs are never granted then).
    pub fn new(socket: Option<Arc<UdpSocket>>) -> std::io::Result<Self> {
        let port = match &socket {
            Some(socket) => socket.local_addr()?.port(),
            None => 0,
        };
        Ok(MediaPlane {
            legs: RwLock::new(Legs::default()),
            socket,
            port,
        })
    }

    /// The port's address, if there is one.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.socket.as_ref().and_then(|s| s.local_addr().ok())
    }

    /// Grants the party on `connection` a leg of `allocation`; `None` without a port.
    pub fn open(&self, allocation: u32, connection: u64) -> Option<MediaLeg> {
        self.socket.as_ref()?;
        let key = || {
            let mut bytes = [0u8; 32];
            OsRng.fill_bytes(&mut bytes);
            HopKey::from_bytes(bytes)
        };
        let (up, down) = (key(), key());
        let mut legs = self.legs.write().unwrap_or_else(PoisonError::into_inner);
        // Unique among live legs; 2^64 makes a second draw practically never needed.
        let id = loop {
            let candidate = OsRng.next_u64();
            if !legs.by_id.contains_key(&candidate) {
                break candidate;
            }
        };
        let leg = Arc::new(Leg {
            id,
            allocation,
            connection,
            up: HopCipher::new(&up),
            down: HopCipher::new(&down),
            state: Mutex::new(LegState::default()),
        });
        legs.by_id.insert(id, leg.clone());
        legs.by_allocation.entry(allocation).or_default().push(leg);
        Some(MediaLeg {
            port: self.port,
            leg: id,
            up,
            down,
        })
    }

    /// Forgets the legs of an allocation that ended.
    pub fn close(&self, allocation: u32) {
        let mut legs = self.legs.write().unwrap_or_else(PoisonError::into_inner);
        for leg in legs.by_allocation.remove(&allocation).unwrap_or_default() {
            legs.by_id.remove(&leg.id);
        }
    }

    /// Live legs.
    pub fn live_legs(&self) -> usize {
        self.legs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_id
            .len()
    }

    /// Checks and opens a packet from `from`, in place.
    pub fn receive<'a>(
        &self,
        packet: &'a mut [u8],
        from: SocketAddr,
    ) -> Result<Incoming<'a>, Dropped> {
        let (id, counter) = packet_leg(packet).map_err(|_| Dropped::Malformed)?;
        let leg = self
            .legs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_id
            .get(&id)
            .cloned()
            .ok_or(Dropped::Unknown)?;
        // Refuse replays before spending an AEAD on them.
        leg.state()
            .received
            .check(counter)
            .map_err(|_| Dropped::Replayed)?;
        let (_, payload) = leg.up.open(packet).map_err(|error| match error {
            HopError::Forged => Dropped::Forged,
            _ => Dropped::Malformed,
        })?;
        {
            let mut state = leg.state();
            // Checked again: another worker may have taken the same counter meanwhile.
            if state
                .received
                .accept(counter)
                .map_err(|_| Dropped::Replayed)?
            {
                state.address = Some(from);
            }
        }
        if payload.is_empty() {
            let mut answer = Vec::new();
            leg.seal(&[], &mut answer).ok_or(Dropped::Unknown)?;
            return Ok(Incoming::Bind(answer));
        }
        Ok(Incoming::Frame {
            allocation: leg.allocation,
            connection: leg.connection,
            payload,
        })
    }

    /// Seals `payload` for the party on `connection` in `allocation` if its leg is bound,
    /// returning where the packet in `out` goes.
    pub fn seal_for(
        &self,
        allocation: u32,
        connection: u64,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<SocketAddr> {
        let leg = self
            .legs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_allocation
            .get(&allocation)?
            .iter()
            .find(|leg| leg.connection == connection)?
            .clone();
        leg.seal(payload, out)
    }
}

/// Sends a frame of `allocation` on to `peer`: on the media port if its leg is bound,
/// else as a QUIC datagram (`datagram` is the frame with its allocation header, when the
/// frame came in as one). Never waits: what cannot go at once is dropped and counted.
pub(crate) fn forward(
    shared: &Shared,
    allocation: u32,
    peer: &PartyLink,
    payload: &[u8],
    datagram: Option<bytes::Bytes>,
    out: &mut Vec<u8>,
) {
    let metrics = &shared.metrics;
    let plane = &shared.media;
    if let (Some(socket), Some(to)) = (
        plane.socket.as_ref(),
        plane.seal_for(allocation, peer.number, payload, out),
    ) {
        match socket.try_send_to(out, to) {
            Ok(_) => Metrics::inc(&metrics.media_forwarded),
            Err(_) => Metrics::inc(&metrics.media_dropped_send_failed),
        }
        return;
    }
    let datagram = match datagram {
        Some(datagram) => datagram,
        None => match encode_media(allocation, payload) {
            Ok(datagram) => datagram.into(),
            Err(_) => return Metrics::inc(&metrics.media_dropped_malformed),
        },
    };
    match peer.quic.send_datagram(datagram) {
        Ok(()) => Metrics::inc(&metrics.media_forwarded),
        Err(_) => Metrics::inc(&metrics.media_dropped_send_failed),
    }
}

/// Reads the media port and forwards each authentic frame to the other party of its call.
/// Several of these share the socket, one per core.
pub(crate) async fn receive_loop(shared: Arc<Shared>, socket: Arc<UdpSocket>) {
    // One byte over the limit, so that an oversized packet is seen as one, not truncated.
    let mut buffer = vec![0u8; MAX_HOP_PACKET + 1];
    let mut out = Vec::with_capacity(MAX_HOP_PACKET);
    loop {
        let Ok((len, from)) = socket.recv_from(&mut buffer).await else {
            // ICMP errors of earlier sends surface here; the socket itself is fine.
            continue;
        };
        let metrics = &shared.metrics;
        let incoming = shared.media.receive(&mut buffer[..len], from);
        match incoming {
            Ok(Incoming::Frame {
                allocation,
                connection,
                payload,
            }) => match shared
                .calls
                .route(allocation, connection, shared.clock.now())
            {
                Route::Forward(peer) => {
                    forward(&shared, allocation, &peer, payload, None, &mut out);
                }
                Route::Unknown | Route::NotParty => Metrics::inc(&metrics.media_dropped_unknown),
                Route::NoPeer => Metrics::inc(&metrics.media_dropped_no_peer),
            },
            Ok(Incoming::Bind(answer)) => {
                Metrics::inc(&metrics.media_bindings);
                let _ = socket.try_send_to(&answer, from);
            }
            Err(Dropped::Malformed) => Metrics::inc(&metrics.media_dropped_malformed),
            Err(Dropped::Unknown) => Metrics::inc(&metrics.media_dropped_unknown),
            Err(Dropped::Forged) => Metrics::inc(&metrics.media_dropped_forged),
            Err(Dropped::Replayed) => Metrics::inc(&metrics.media_dropped_replayed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plane() -> MediaPlane {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let socket = runtime.block_on(async { UdpSocket::from_std(socket).unwrap() });
        // The runtime may go: the tests never touch the socket's IO.
        std::mem::forget(runtime);
        MediaPlane::new(Some(Arc::new(socket))).unwrap()
    }

    fn packet(leg: &MediaLeg, counter: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        HopCipher::new(&leg.up)
            .seal_into(leg.leg, counter, payload, &mut out)
            .unwrap();
        out
    }

    const A: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);
    const B: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 2);

    #[test]
    fn frames_open_once_and_bind_the_leg_to_the_newest_address() {
        let plane = plane();
        let caller = plane.open(7, 1).unwrap();
        let callee = plane.open(7, 2).unwrap();
        assert_ne!(caller.leg, callee.leg);
        assert_ne!(caller.up, callee.up);

        // Unbound: nothing is sealed for the callee yet.
        assert_eq!(plane.seal_for(7, 2, b"x", &mut Vec::new()), None);
        let mut bind = packet(&callee, 1, b"");
        let Ok(Incoming::Bind(answer)) = plane.receive(&mut bind, B) else {
            panic!("not a binding");
        };
        let mut answer = answer;
        assert_eq!(
            HopCipher::new(&callee.down).open(&mut answer).unwrap(),
            (1, &[][..])
        );
        let mut out = Vec::new();
        assert_eq!(plane.seal_for(7, 2, b"frame", &mut out), Some(B));
        assert_eq!(
            HopCipher::new(&callee.down).open(&mut out).unwrap(),
            (2, &b"frame"[..])
        );

        let mut frame = packet(&caller, 5, b"hello");
        let replay = frame.clone();
        assert_eq!(
            plane.receive(&mut frame, A),
            Ok(Incoming::Frame {
                allocation: 7,
                connection: 1,
                payload: b"hello"
            })
        );
        assert_eq!(
            plane.receive(&mut replay.clone(), A),
            Err(Dropped::Replayed)
        );
        // A replay from elsewhere does not move the leg; a newer packet does.
        assert_eq!(
            plane.receive(&mut replay.clone(), B),
            Err(Dropped::Replayed)
        );
        let mut older = packet(&caller, 4, b"late");
        assert!(plane.receive(&mut older, B).is_ok());
        assert_eq!(plane.seal_for(7, 1, b"x", &mut out), Some(A));
        let mut newer = packet(&caller, 6, b"moved");
        assert!(plane.receive(&mut newer, B).is_ok());
        assert_eq!(plane.seal_for(7, 1, b"x", &mut out), Some(B));
    }

    #[test]
    fn forged_unknown_malformed_and_ended_legs_are_dropped() {
        let plane = plane();
        let leg = plane.open(9, 1).unwrap();
        let mut forged = packet(&leg, 1, b"frame");
        forged[20] ^= 1;
        assert_eq!(plane.receive(&mut forged, A), Err(Dropped::Forged));
        // The forged packet did not use up its counter.
        assert!(plane.receive(&mut packet(&leg, 1, b"frame"), A).is_ok());

        let stolen = MediaLeg {
            up: HopKey::from_bytes([0; 32]),
            ..leg.clone()
        };
        assert_eq!(
            plane.receive(&mut packet(&stolen, 2, b"in"), A),
            Err(Dropped::Forged)
        );
        let unknown = MediaLeg {
            leg: leg.leg ^ 1,
            ..leg.clone()
        };
        assert_eq!(
            plane.receive(&mut packet(&unknown, 2, b"in"), A),
            Err(Dropped::Unknown)
        );
        assert_eq!(plane.receive(&mut [0u8; 10], A), Err(Dropped::Malformed));
        assert_eq!(
            plane.receive(&mut vec![0u8; MAX_HOP_PACKET + 1], A),
            Err(Dropped::Malformed)
        );

        plane.close(9);
        assert_eq!(plane.live_legs(), 0);
        assert_eq!(
            plane.receive(&mut packet(&leg, 3, b"after"), A),
            Err(Dropped::Unknown)
        );
        assert_eq!(MediaPlane::new(None).unwrap().open(1, 1), None);
    }
}
