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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, Weak};

use hush_protocol::media::encode_media;
use hush_protocol::media_udp::{
    packet_leg, HopCipher, HopError, HopKey, MediaLeg, ReplayWindow, MAX_HOP_PACKET,
};
use rand_core::{OsRng, RngCore};
use tokio::net::UdpSocket;

use crate::calls::{Calls, Route};
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::party::PartyLink;

/// Shards of the leg table: packets from different calls rarely touch the same lock.
const SHARDS: usize = 16;

/// One party's leg.
pub struct Leg {
    id: u64,
    allocation: u32,
    /// The party's connection number.
    connection: u64,
    up: HopCipher,
    down: HopCipher,
    state: Mutex<LegState>,
    /// The other party's leg, once it has one.
    peer: OnceLock<Weak<Leg>>,
    /// The relay-clock second in which the call registry last routed a frame of this leg.
    /// Within that second frames go straight to the peer's leg; once a second the registry
    /// is asked again (it records media activity at that granularity anyway, and tells
    /// whether the call is still live).
    routed_at: AtomicU64,
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

    /// The allocation this leg belongs to.
    pub fn allocation(&self) -> u32 {
        self.allocation
    }

    /// The connection number of the leg's party.
    pub fn connection(&self) -> u64 {
        self.connection
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

    /// The peer's leg, if the registry routed this leg's frames within second `now`.
    fn routed_peer(&self, now: u64) -> Option<Arc<Leg>> {
        if self.routed_at.load(Ordering::Relaxed) != now {
            return None;
        }
        self.peer.get()?.upgrade()
    }
}

/// What an incoming packet is.
pub enum Incoming<'a> {
    /// A media frame on `leg`.
    Frame {
        /// The sending party's leg.
        leg: Arc<Leg>,
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
    by_id: Vec<RwLock<HashMap<u64, Arc<Leg>>>>,
    by_allocation: Mutex<HashMap<u32, Vec<Arc<Leg>>>>,
    socket: Option<Arc<UdpSocket>>,
    port: u16,
}

fn shard(id: u64) -> usize {
    (id % SHARDS as u64) as usize
}

impl MediaPlane {
    /// A plane on `socket`, or none at all (legs are never granted then).
    pub fn new(socket: Option<Arc<UdpSocket>>) -> std::io::Result<Self> {
        let port = match &socket {
            Some(socket) => socket.local_addr()?.port(),
            None => 0,
        };
        Ok(MediaPlane {
            by_id: (0..SHARDS).map(|_| RwLock::default()).collect(),
            by_allocation: Mutex::default(),
            socket,
            port,
        })
    }

    fn allocations(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Vec<Arc<Leg>>>> {
        // Every critical section leaves the maps consistent.
        self.by_allocation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn lookup(&self, id: u64) -> Option<Arc<Leg>> {
        self.by_id[shard(id)]
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned()
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
        let mut allocations = self.allocations();
        // Unique among live legs; 2^64 makes a second draw practically never needed.
        let (id, mut shard_map) = loop {
            let candidate = OsRng.next_u64();
            let map = self.by_id[shard(candidate)]
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if !map.contains_key(&candidate) {
                break (candidate, map);
            }
        };
        let leg = Arc::new(Leg {
            id,
            allocation,
            connection,
            up: HopCipher::new(&up),
            down: HopCipher::new(&down),
            state: Mutex::new(LegState::default()),
            peer: OnceLock::new(),
            routed_at: AtomicU64::new(u64::MAX),
        });
        shard_map.insert(id, leg.clone());
        drop(shard_map);
        let legs = allocations.entry(allocation).or_default();
        // The callee's leg and the caller's point at each other, once.
        if let Some(other) = legs.iter().find(|l| l.connection != connection) {
            let _ = other.peer.set(Arc::downgrade(&leg));
            let _ = leg.peer.set(Arc::downgrade(other));
        }
        legs.push(leg);
        Some(MediaLeg {
            port: self.port,
            leg: id,
            up,
            down,
        })
    }

    /// Forgets the legs of an allocation that ended.
    pub fn close(&self, allocation: u32) {
        let legs = self.allocations().remove(&allocation).unwrap_or_default();
        for leg in legs {
            self.by_id[shard(leg.id)]
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&leg.id);
        }
    }

    /// Live legs.
    pub fn live_legs(&self) -> usize {
        self.by_id
            .iter()
            .map(|map| map.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// Checks and opens a packet from `from`, in place.
    pub fn receive<'a>(
        &self,
        packet: &'a mut [u8],
        from: SocketAddr,
    ) -> Result<Incoming<'a>, Dropped> {
        let (id, counter) = packet_leg(packet).map_err(|_| Dropped::Malformed)?;
        let leg = self.lookup(id).ok_or(Dropped::Unknown)?;
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
        Ok(Incoming::Frame { leg, payload })
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
            .allocations()
            .get(&allocation)?
            .iter()
            .find(|leg| leg.connection == connection)?
            .clone();
        leg.seal(payload, out)
    }
}

/// What the media port's receive loops use: the legs, the call registry that routes
/// between them, the counters and the clock; nothing else of the relay.
#[derive(Clone)]
pub(crate) struct MediaRoutes {
    /// The legs of live calls.
    pub plane: Arc<MediaPlane>,
    /// The call registry.
    pub calls: Arc<Calls<PartyLink>>,
    /// The relay's counters.
    pub metrics: Arc<Metrics>,
    /// The relay's clock (calls record media activity by it).
    pub clock: Arc<dyn Clock>,
}

/// Sends a frame of `allocation` on to `peer`: on the media port if its leg is bound,
/// else as a QUIC datagram (`datagram` is the frame with its allocation header, when the
/// frame came in as one). Never waits: what cannot go at once is dropped and counted.
pub(crate) fn forward(
    plane: &MediaPlane,
    metrics: &Metrics,
    allocation: u32,
    peer: &PartyLink,
    payload: &[u8],
    datagram: Option<bytes::Bytes>,
    out: &mut Vec<u8>,
) {
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
pub(crate) async fn receive_loop(routes: MediaRoutes, socket: Arc<UdpSocket>) {
    let MediaRoutes {
        plane,
        calls,
        metrics,
        clock,
    } = routes;
    // One byte over the limit, so that an oversized packet is seen as one, not truncated.
    let mut buffer = vec![0u8; MAX_HOP_PACKET + 1];
    let mut out = Vec::with_capacity(MAX_HOP_PACKET);
    loop {
        let Ok((len, from)) = socket.recv_from(&mut buffer).await else {
            // ICMP errors of earlier sends surface here; the socket itself is fine.
            continue;
        };
        let incoming = plane.receive(&mut buffer[..len], from);
        match incoming {
            Ok(Incoming::Frame { leg, payload }) => {
                let now = clock.now();
                // The fast path: routed within this second, and the peer's leg is bound.
                if let Some(to) = leg
                    .routed_peer(now)
                    .and_then(|peer| peer.seal(payload, &mut out))
                {
                    match socket.try_send_to(&out, to) {
                        Ok(_) => Metrics::inc(&metrics.media_forwarded),
                        Err(_) => Metrics::inc(&metrics.media_dropped_send_failed),
                    }
                    continue;
                }
                match calls.route(leg.allocation, leg.connection, now) {
                    Route::Forward(peer) => {
                        leg.routed_at.store(now, Ordering::Relaxed);
                        forward(
                            &plane,
                            &metrics,
                            leg.allocation,
                            &peer,
                            payload,
                            None,
                            &mut out,
                        );
                    }
                    Route::Unknown | Route::NotParty => {
                        Metrics::inc(&metrics.media_dropped_unknown);
                    }
                    Route::NoPeer => Metrics::inc(&metrics.media_dropped_no_peer),
                }
            }
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
        let Ok(Incoming::Frame { leg, payload }) = plane.receive(&mut frame, A) else {
            panic!("not a frame");
        };
        assert_eq!(
            (leg.allocation(), leg.connection(), payload),
            (7, 1, &b"hello"[..])
        );
        // The legs know each other; within a routed second the peer is at hand.
        assert!(leg.routed_peer(100).is_none());
        leg.routed_at.store(100, Ordering::Relaxed);
        assert_eq!(leg.routed_peer(100).unwrap().connection(), 2);
        assert!(leg.routed_peer(101).is_none());
        assert_eq!(
            plane.receive(&mut replay.clone(), A).err(),
            Some(Dropped::Replayed)
        );
        // A replay from elsewhere does not move the leg; a newer packet does.
        assert_eq!(
            plane.receive(&mut replay.clone(), B).err(),
            Some(Dropped::Replayed)
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
        assert_eq!(plane.receive(&mut forged, A).err(), Some(Dropped::Forged));
        // The forged packet did not use up its counter.
        assert!(plane.receive(&mut packet(&leg, 1, b"frame"), A).is_ok());

        let stolen = MediaLeg {
            up: HopKey::from_bytes([0; 32]),
            ..leg.clone()
        };
        assert_eq!(
            plane.receive(&mut packet(&stolen, 2, b"in"), A).err(),
            Some(Dropped::Forged)
        );
        let unknown = MediaLeg {
            leg: leg.leg ^ 1,
            ..leg.clone()
        };
        assert_eq!(
            plane.receive(&mut packet(&unknown, 2, b"in"), A).err(),
            Some(Dropped::Unknown)
        );
        assert_eq!(
            plane.receive(&mut [0u8; 10], A).err(),
            Some(Dropped::Malformed)
        );
        assert_eq!(
            plane.receive(&mut vec![0u8; MAX_HOP_PACKET + 1], A).err(),
            Some(Dropped::Malformed)
        );

        plane.close(9);
        assert_eq!(plane.live_legs(), 0);
        assert_eq!(
            plane.receive(&mut packet(&leg, 3, b"after"), A).err(),
            Some(Dropped::Unknown)
        );
        assert_eq!(MediaPlane::new(None).unwrap().open(1, 1), None);
    }
}
