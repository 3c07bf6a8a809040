//! Packets of the relay's UDP media port (`hush_protocol::media_udp`). The first byte
//! picks what the rest is:
//!
//! - 0: a packet's header as the relay reads it before any cryptography: it parses exactly
//!   for 32..=1,228 bytes, to the leg id and counter its first 16 bytes say.
//! - 1: a packet opened under a leg's key: only the genuine packet opens, a forged one
//!   never, and what opens is the genuine payload.
//! - otherwise: a script run against a real sealing and opening end with the relay's
//!   replay rule: seal the next packet, deliver any sealed packet (again, in any order),
//!   deliver one with a bit flipped. Every packet is accepted at most once and to its own
//!   bytes, a refused authentic one is refused as replayed (never as forged), and a
//!   flipped one never opens.
#![no_main]

use std::collections::HashSet;

use hush_fuzz::{genuine_media_packet, hop_key, GENUINE_MEDIA, MEDIA_LEG};
use hush_protocol::media_udp::{
    packet_leg, HopCipher, HopError, ReplayWindow, HOP_HEADER_LEN, HOP_OVERHEAD, MAX_HOP_PACKET,
    REPLAY_WINDOW,
};
use libfuzzer_sys::fuzz_target;

fn header(bytes: &[u8]) {
    match packet_leg(bytes) {
        Ok((leg, counter)) => {
            assert!((HOP_OVERHEAD..=MAX_HOP_PACKET).contains(&bytes.len()));
            let mut expected = [0u8; HOP_HEADER_LEN];
            expected[..8].copy_from_slice(&leg.to_be_bytes());
            expected[8..].copy_from_slice(&counter.to_be_bytes());
            assert_eq!(&bytes[..HOP_HEADER_LEN], &expected);
        }
        Err(HopError::TooShort(len)) => assert!(len == bytes.len() && len < HOP_OVERHEAD),
        Err(HopError::TooLarge(len)) => assert!(len == bytes.len() && len > MAX_HOP_PACKET),
        Err(other) => panic!("the header check said {other}"),
    }
}

fn forged(bytes: &[u8]) {
    let mut packet = bytes.to_vec();
    if let Ok((_, payload)) = HopCipher::new(&hop_key()).open(&mut packet) {
        assert_eq!(
            bytes,
            genuine_media_packet(),
            "a forged media packet opened"
        );
        assert_eq!(payload, GENUINE_MEDIA);
    }
}

fn script(ops: &[u8]) {
    let cipher = HopCipher::new(&hop_key());
    let mut window = ReplayWindow::default();
    let mut sent: Vec<Vec<u8>> = Vec::new();
    let mut accepted = HashSet::new();
    let mut newest = 0u64;
    let mut ops = ops.iter().copied();
    while let Some(op) = ops.next() {
        let pick = usize::from(ops.next().unwrap_or(0));
        match op % 3 {
            0 => {
                let payload = u32::try_from(sent.len())
                    .expect("few packets")
                    .to_be_bytes();
                let mut packet = Vec::new();
                let counter = sent.len() as u64 + 1;
                cipher
                    .seal_into(MEDIA_LEG, counter, &payload, &mut packet)
                    .expect("seal");
                sent.push(packet);
            }
            1 if !sent.is_empty() => {
                let index = pick % sent.len();
                let mut packet = sent[index].clone();
                let (_, counter) = packet_leg(&packet).expect("header");
                if window.check(counter).is_err() {
                    // Refused: accepted before, or too far behind the newest accepted.
                    assert!(accepted.contains(&index) || newest - counter >= REPLAY_WINDOW);
                    continue;
                }
                let (opened, payload) = cipher.open(&mut packet).expect("authentic");
                assert_eq!(opened, counter);
                assert_eq!(payload, u32::try_from(index).expect("few").to_be_bytes());
                window.accept(counter).expect("checked");
                newest = newest.max(counter);
                assert!(accepted.insert(index), "packet {index} accepted twice");
            }
            2 if !sent.is_empty() => {
                let mut tampered = sent[pick % sent.len()].clone();
                let bit = usize::from(ops.next().unwrap_or(0)) % (tampered.len() * 8);
                tampered[bit / 8] ^= 1 << (bit % 8);
                assert!(
                    cipher.open(&mut tampered).is_err(),
                    "a tampered packet opened"
                );
            }
            _ => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    hush_fuzz::by_mode(data, [header, forged, script]);
});
