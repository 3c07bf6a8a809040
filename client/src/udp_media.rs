//! The client's side of the relay's UDP media port (`hush_protocol::media_udp`): one UDP
//! socket per connection, connected to the relay, carrying the legs of its calls.
//!
//! A leg starts on QUIC datagrams: its frames move to the UDP port only once the relay
//! has answered a binding packet there, so a network that blocks the port costs nothing
//! but the bindings (retried at most every [`BIND_RETRY`]), and media keeps flowing over
//! QUIC.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hush_protocol::media_udp::{packet_leg, HopCipher, MediaLeg, ReplayWindow, MAX_HOP_PACKET};
use tokio::net::UdpSocket;

/// How long to wait for the relay's answer before binding again.
pub const BIND_RETRY: Duration = Duration::from_millis(500);

struct SendLeg {
    grant: MediaLeg,
    leg: u64,
    up: HopCipher,
    /// The last counter sealed with `up`.
    sent: u64,
    /// The relay answered a binding: media goes here.
    confirmed: bool,
    last_bind: Option<Instant>,
}

struct ReceiveLeg {
    allocation: u32,
    down: HopCipher,
    received: ReplayWindow,
}

#[derive(Default)]
struct Legs {
    by_allocation: HashMap<u32, SendLeg>,
    by_leg: HashMap<u64, ReceiveLeg>,
}

/// What [`UdpMedia::send`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// The frame went out on the media port.
    Udp,
    /// The call has no confirmed leg here: send the frame as a QUIC datagram.
    UseQuic,
}

/// The media port socket of one connection and the legs it carries.
pub struct UdpMedia {
    socket: UdpSocket,
    legs: Mutex<Legs>,
}

impl UdpMedia {
    /// A socket connected to the relay's media port.
    pub async fn connect(relay: SocketAddr) -> std::io::Result<UdpMedia> {
        let bind: SocketAddr = if relay.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(bind).await?;
        socket.connect(relay).await?;
        Ok(UdpMedia {
            socket,
            legs: Mutex::new(Legs::default()),
        })
    }

    fn legs(&self) -> MutexGuard<'_, Legs> {
        // Every critical section leaves the maps consistent.
        self.legs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds the leg the relay granted for `allocation` and sends its first binding.
    pub async fn add(&self, allocation: u32, grant: &MediaLeg) {
        {
            let mut legs = self.legs();
            legs.by_allocation.insert(
                allocation,
                SendLeg {
                    grant: grant.clone(),
                    leg: grant.leg,
                    up: HopCipher::new(&grant.up),
                    sent: 0,
                    confirmed: false,
                    last_bind: Some(Instant::now()),
                },
            );
            legs.by_leg.insert(
                grant.leg,
                ReceiveLeg {
                    allocation,
                    down: HopCipher::new(&grant.down),
                    received: ReplayWindow::default(),
                },
            );
        }
        // Awaited, not tried: a new socket is not known to be writable until the reactor
        // has polled it, and `try_send` would give up at once.
        let mut packet = Vec::new();
        if self.seal(allocation, &[], &mut packet).is_some() {
            let _ = self.socket.send(&packet).await;
        }
    }

    /// Forgets the leg of a call that ended.
    pub fn remove(&self, allocation: u32) {
        let mut legs = self.legs();
        if let Some(leg) = legs.by_allocation.remove(&allocation) {
            legs.by_leg.remove(&leg.leg);
        }
    }

    /// Seals the next packet of `allocation`'s leg into `out`; `None` without a leg.
    fn seal(&self, allocation: u32, payload: &[u8], out: &mut Vec<u8>) -> Option<bool> {
        let mut legs = self.legs();
        let leg = legs.by_allocation.get_mut(&allocation)?;
        leg.sent += 1;
        out.clear();
        leg.up.seal_into(leg.leg, leg.sent, payload, out).ok()?;
        Some(leg.confirmed)
    }

    /// Sends a binding packet for `allocation` unless one went out within [`BIND_RETRY`].
    fn bind_if_due(&self, allocation: u32) {
        let now = Instant::now();
        {
            let mut legs = self.legs();
            let Some(leg) = legs.by_allocation.get_mut(&allocation) else {
                return;
            };
            if leg.last_bind.is_some_and(|at| now - at < BIND_RETRY) {
                return;
            }
            leg.last_bind = Some(now);
        }
        let mut packet = Vec::new();
        if self.seal(allocation, &[], &mut packet).is_some() {
            // Best effort, like every media packet.
            let _ = self.socket.try_send(&packet);
        }
    }

    /// Sends one frame of `allocation` on the media port if its leg is confirmed; otherwise
    /// binds (again, when due) and says to use QUIC. Never waits; one lock per frame.
    pub fn send(&self, allocation: u32, frame: &[u8]) -> std::io::Result<Sent> {
        let mut packet = Vec::with_capacity(frame.len() + hush_protocol::media_udp::HOP_OVERHEAD);
        let sealed = match self.legs().by_allocation.get_mut(&allocation) {
            Some(leg) if leg.confirmed => {
                leg.sent += 1;
                leg.up
                    .seal_into(leg.leg, leg.sent, frame, &mut packet)
                    .is_ok()
            }
            _ => false,
        };
        if !sealed {
            self.bind_if_due(allocation);
            return Ok(Sent::UseQuic);
        }
        self.socket.try_send(&packet)?;
        Ok(Sent::Udp)
    }

    /// The next frame from the relay on this port, with its allocation. Packets that are
    /// not authentic, replayed, or for no leg of ours are skipped; binding answers confirm
    /// their leg.
    pub async fn receive(&self) -> (u32, Vec<u8>) {
        // On the stack: this runs once per frame.
        let mut buffer = [0u8; MAX_HOP_PACKET + 1];
        loop {
            let Ok(len) = self.socket.recv(&mut buffer).await else {
                // An ICMP error of an earlier send; the socket is fine.
                continue;
            };
            if let Some(frame) = self.open(&mut buffer[..len]) {
                return frame;
            }
        }
    }

    fn open(&self, packet: &mut [u8]) -> Option<(u32, Vec<u8>)> {
        let (id, counter) = packet_leg(packet).ok()?;
        let mut legs = self.legs();
        let leg = legs.by_leg.get_mut(&id)?;
        leg.received.check(counter).ok()?;
        let (_, payload) = leg.down.open(packet).ok()?;
        leg.received.accept(counter).ok()?;
        let allocation = leg.allocation;
        if payload.is_empty() {
            if let Some(sender) = legs.by_allocation.get_mut(&allocation) {
                sender.confirmed = true;
            }
            return None;
        }
        Some((allocation, payload.to_vec()))
    }

    /// The leg the relay granted for `allocation`.
    pub fn grant(&self, allocation: u32) -> Option<MediaLeg> {
        self.legs()
            .by_allocation
            .get(&allocation)
            .map(|leg| leg.grant.clone())
    }

    /// Whether `allocation`'s frames go out on the media port.
    pub fn confirmed(&self, allocation: u32) -> bool {
        self.legs()
            .by_allocation
            .get(&allocation)
            .is_some_and(|leg| leg.confirmed)
    }
}
