//! Call media over the relay's UDP media port: one UDP packet per media frame, sealed hop
//! by hop between a party and the relay.
//!
//! ```text
//! +--------------+----------------+------------------------------+-----------+
//! | leg id       | counter        | payload (ChaCha20-Poly1305)  | tag       |
//! | u64 BE       | u64 BE         | the end-to-end sealed frame  | 16 bytes  |
//! +--------------+----------------+------------------------------+-----------+
//! ```
//!
//! Each party of a call gets its own *leg* from the relay over its authenticated QUIC
//! connection (`AllocateCall`, `JoinCall`): a random leg id and two random keys, one per
//! direction. The header is the AEAD's associated data and the counter its nonce, so only
//! the party holding the leg's keys can send into the call or read from it, a replayed
//! packet is recognised by its counter ([`ReplayWindow`]), and the two legs of one call
//! share no bytes on the wire (their ids, keys and ciphertexts differ), as two QUIC
//! connections' packets would not. Inside is the same end-to-end sealed frame a QUIC media
//! datagram carries; the relay opens only the hop layer (P1).
//!
//! ```
//! use hush_protocol::media_udp::{HopKey, HopCipher, packet_leg};
//!
//! let key = HopKey::from_bytes([7; 32]);
//! let cipher = HopCipher::new(&key);
//! let mut packet = Vec::new();
//! cipher.seal_into(42, 1, b"sealed frame", &mut packet).unwrap();
//! assert_eq!(packet_leg(&packet), Ok((42, 1)));
//! assert_eq!(cipher.open(&mut packet).unwrap(), (1, &b"sealed frame"[..]));
//! ```

use std::fmt;

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::media::MAX_MEDIA_PAYLOAD;

/// Bytes before the payload: leg id and counter.
pub const HOP_HEADER_LEN: usize = 16;

/// Bytes of the authentication tag after the payload.
pub const HOP_TAG_LEN: usize = 16;

/// What the hop layer adds to a frame.
pub const HOP_OVERHEAD: usize = HOP_HEADER_LEN + HOP_TAG_LEN;

/// The largest packet: the same largest frame a QUIC media datagram carries, plus the hop
/// layer.
pub const MAX_HOP_PACKET: usize = MAX_MEDIA_PAYLOAD + HOP_OVERHEAD;

/// Counters a [`ReplayWindow`] remembers behind the newest.
pub const REPLAY_WINDOW: u64 = 128;

/// Why bytes are not an authentic media packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HopError {
    /// Shorter than header and tag.
    #[error("media packet of {0} bytes is shorter than its header and tag")]
    TooShort(usize),
    /// Longer than [`MAX_HOP_PACKET`].
    #[error("media packet of {0} bytes exceeds the limit of {MAX_HOP_PACKET}")]
    TooLarge(usize),
    /// The tag does not verify under the leg's key.
    #[error("media packet failed authentication")]
    Forged,
    /// The counter was seen already, or is too far behind the newest.
    #[error("media packet replayed or too old")]
    Replayed,
}

/// One direction's key of a leg. Zeroized on drop; `Debug` prints `<redacted>`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct HopKey([u8; 32]);

impl HopKey {
    /// A key from its bytes (the relay draws them at random).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        HopKey(bytes)
    }
}

impl fmt::Debug for HopKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HopKey(<redacted>)")
    }
}

/// A party's leg of a call on the UDP media port, as the relay grants it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaLeg {
    /// The relay's media port, on the address the QUIC connection reached.
    pub port: u16,
    /// The leg id every packet of this party starts with, both ways.
    pub leg: u64,
    /// Seals what the party sends to the relay.
    pub up: HopKey,
    /// Seals what the relay sends to the party.
    pub down: HopKey,
}

/// Seals and opens one direction of a leg (ChaCha20-Poly1305).
pub struct HopCipher(LessSafeKey);

impl fmt::Debug for HopCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HopCipher(<redacted>)")
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(nonce)
}

impl HopCipher {
    /// The cipher of `key`.
    pub fn new(key: &HopKey) -> Self {
        // A 32-byte key is what ChaCha20-Poly1305 takes, so this cannot fail.
        let key = UnboundKey::new(&CHACHA20_POLY1305, &key.0).map_or_else(
            |_| unreachable!("a 32-byte ChaCha20-Poly1305 key"),
            LessSafeKey::new,
        );
        HopCipher(key)
    }

    /// Appends the packet carrying `payload` as number `counter` of `leg` to `out`. A
    /// counter must never be used twice with one key: senders count up from 1.
    pub fn seal_into(
        &self,
        leg: u64,
        counter: u64,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), HopError> {
        let len = payload.len() + HOP_OVERHEAD;
        if len > MAX_HOP_PACKET {
            return Err(HopError::TooLarge(len));
        }
        let start = out.len();
        out.reserve(len);
        out.extend_from_slice(&leg.to_be_bytes());
        out.extend_from_slice(&counter.to_be_bytes());
        out.extend_from_slice(payload);
        let (header, body) = out[start..].split_at_mut(HOP_HEADER_LEN);
        let tag = self
            .0
            .seal_in_place_separate_tag(nonce(counter), Aad::from(&*header), body)
            .map_err(|_| HopError::TooLarge(len))?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Opens a packet in place: its counter and payload, or why it is not authentic. The
    /// caller checks the counter against its [`ReplayWindow`].
    pub fn open<'a>(&self, packet: &'a mut [u8]) -> Result<(u64, &'a [u8]), HopError> {
        let (_, counter) = packet_leg(packet)?;
        let (header, rest) = packet.split_at_mut(HOP_HEADER_LEN);
        let (body, tag) = rest.split_at_mut(rest.len() - HOP_TAG_LEN);
        let tag = Tag::try_from(&*tag).map_err(|_| HopError::Forged)?;
        let plain = self
            .0
            .open_in_place_separate_tag(nonce(counter), Aad::from(&*header), tag, body, 0..)
            .map_err(|_| HopError::Forged)?;
        Ok((counter, plain))
    }
}

/// The leg id and counter of a packet, from its header alone, after the size checks.
pub fn packet_leg(packet: &[u8]) -> Result<(u64, u64), HopError> {
    if packet.len() > MAX_HOP_PACKET {
        return Err(HopError::TooLarge(packet.len()));
    }
    if packet.len() < HOP_OVERHEAD {
        return Err(HopError::TooShort(packet.len()));
    }
    let mut leg = [0u8; 8];
    leg.copy_from_slice(&packet[..8]);
    let mut counter = [0u8; 8];
    counter.copy_from_slice(&packet[8..HOP_HEADER_LEN]);
    Ok((u64::from_be_bytes(leg), u64::from_be_bytes(counter)))
}

/// The counters of one direction of a leg seen so far: the newest, and which of the
/// [`REPLAY_WINDOW`] before it. Check before opening (cheap refusals), accept after.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    newest: u64,
    /// Bit `i` set: counter `newest - i` was accepted.
    seen: u128,
}

impl ReplayWindow {
    /// Whether `counter` is new: not seen, and not too far behind the newest. Counter 0
    /// is never valid (senders start at 1).
    pub fn check(&self, counter: u64) -> Result<(), HopError> {
        if counter == 0 {
            return Err(HopError::Replayed);
        }
        if counter > self.newest {
            return Ok(());
        }
        let behind = self.newest - counter;
        if behind >= REPLAY_WINDOW || self.seen & (1 << behind) != 0 {
            return Err(HopError::Replayed);
        }
        Ok(())
    }

    /// Records an authentic `counter`; true if it is the newest yet (the sender's address
    /// may then be taken as its current one).
    pub fn accept(&mut self, counter: u64) -> Result<bool, HopError> {
        self.check(counter)?;
        if counter > self.newest {
            let shift = counter - self.newest;
            self.seen = if shift >= REPLAY_WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.newest = counter;
            Ok(true)
        } else {
            self.seen |= 1 << (self.newest - counter);
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher(byte: u8) -> HopCipher {
        HopCipher::new(&HopKey::from_bytes([byte; 32]))
    }

    #[test]
    fn packets_open_only_under_their_key_and_unaltered() {
        let mut packet = Vec::new();
        cipher(1).seal_into(9, 5, b"frame", &mut packet).unwrap();
        assert_eq!(packet.len(), 5 + HOP_OVERHEAD);
        assert_eq!(packet_leg(&packet), Ok((9, 5)));
        assert_eq!(cipher(2).open(&mut packet.clone()), Err(HopError::Forged));
        for index in 0..packet.len() {
            let mut flipped = packet.clone();
            flipped[index] ^= 0x80;
            assert_eq!(
                cipher(1).open(&mut flipped),
                Err(HopError::Forged),
                "{index}"
            );
        }
        assert_eq!(cipher(1).open(&mut packet).unwrap(), (5, &b"frame"[..]));
    }

    #[test]
    fn sizes_are_bounded_both_ways() {
        let mut out = Vec::new();
        assert!(cipher(1)
            .seal_into(1, 1, &[0; MAX_MEDIA_PAYLOAD], &mut out)
            .is_ok());
        assert_eq!(out.len(), MAX_HOP_PACKET);
        assert_eq!(
            cipher(1).seal_into(1, 1, &[0; MAX_MEDIA_PAYLOAD + 1], &mut Vec::new()),
            Err(HopError::TooLarge(MAX_HOP_PACKET + 1))
        );
        assert_eq!(
            packet_leg(&[0; MAX_HOP_PACKET + 1]),
            Err(HopError::TooLarge(MAX_HOP_PACKET + 1))
        );
        assert_eq!(
            packet_leg(&[0; HOP_OVERHEAD - 1]),
            Err(HopError::TooShort(HOP_OVERHEAD - 1))
        );
        // An empty payload (a binding packet) is a valid packet.
        let mut empty = Vec::new();
        cipher(3).seal_into(1, 1, &[], &mut empty).unwrap();
        assert_eq!(cipher(3).open(&mut empty).unwrap(), (1, &[][..]));
    }

    #[test]
    fn the_replay_window_takes_each_counter_once_and_forgets_the_too_old() {
        let mut window = ReplayWindow::default();
        assert_eq!(window.accept(0), Err(HopError::Replayed));
        assert_eq!(window.accept(3), Ok(true));
        assert_eq!(window.accept(3), Err(HopError::Replayed));
        assert_eq!(window.accept(1), Ok(false));
        assert_eq!(window.accept(2), Ok(false));
        assert_eq!(window.accept(1), Err(HopError::Replayed));
        assert_eq!(window.accept(200), Ok(true));
        assert_eq!(window.check(200 - REPLAY_WINDOW), Err(HopError::Replayed));
        assert_eq!(window.accept(200 - REPLAY_WINDOW + 1), Ok(false));
        assert_eq!(window.accept(199), Ok(false));
        assert_eq!(window.accept(1000), Ok(true));
        assert_eq!(window.check(999), Ok(()));
        assert_eq!(window.check(200), Err(HopError::Replayed));
    }
}
