//! Call media frames. The first byte picks what the rest is:
//!
//! - 0: a media datagram as the relay parses it (`allocation (u32 BE) || frame`): parsing
//!   succeeds exactly for 4..=1,200 bytes and re-encodes to the same bytes.
//! - 1: a sealed frame handed to a call's receiver: only the caller's genuine first frame
//!   opens, a forged one never.
//! - otherwise: a script run against a real sender and receiver: seal the next frame,
//!   deliver a sealed frame (any one, again and again, in any order), deliver it with one
//!   bit flipped, rotate the key. Every authentic frame opens at most once and to its own
//!   bytes, a refused one is refused as replayed, too old or of an unknown epoch, never as
//!   undecryptable; a flipped one never opens.
#![no_main]

use std::collections::HashSet;

use hush_client::media::{Direction, MediaError, MediaReceiver, MediaSender};
use hush_fuzz::{call_key, genuine_media_frame, ALLOCATION, CALL_ID, GENUINE_MEDIA};
use hush_protocol::limits::MAX_MEDIA_FRAME;
use hush_protocol::media::{encode_media, media_allocation, parse_media, MediaError as WireError};
use libfuzzer_sys::fuzz_target;

fn datagram(bytes: &[u8]) {
    match parse_media(bytes) {
        Ok((allocation, frame)) => {
            assert!((4..=MAX_MEDIA_FRAME).contains(&bytes.len()));
            assert_eq!(media_allocation(bytes), Ok(allocation));
            assert_eq!(encode_media(allocation, frame).as_deref(), Ok(bytes));
        }
        Err(WireError::TooShort(len)) => assert!(len == bytes.len() && len < 4),
        Err(WireError::TooLarge(len)) => assert!(len == bytes.len() && len > MAX_MEDIA_FRAME),
    }
}

fn forged(bytes: &[u8]) {
    let mut receiver = MediaReceiver::new(&call_key(), CALL_ID, Direction::FromCaller, ALLOCATION);
    if let Ok(plaintext) = receiver.open(bytes) {
        assert_eq!(bytes, genuine_media_frame(), "a forged media frame opened");
        assert_eq!(plaintext, GENUINE_MEDIA);
    }
}

fn script(ops: &[u8]) {
    let key = call_key();
    let mut sender = MediaSender::new(&key, CALL_ID, Direction::FromCaller, ALLOCATION);
    let mut receiver = MediaReceiver::new(&key, CALL_ID, Direction::FromCaller, ALLOCATION);
    let mut sent: Vec<Vec<u8>> = Vec::new();
    let mut opened = HashSet::new();
    let mut ops = ops.iter().copied();
    while let Some(op) = ops.next() {
        let pick = usize::from(ops.next().unwrap_or(0));
        match op % 4 {
            0 => {
                let plaintext = u32::try_from(sent.len()).expect("few frames").to_be_bytes();
                sent.push(sender.seal(&plaintext).expect("seal"));
            }
            1 if !sent.is_empty() => {
                let index = pick % sent.len();
                match receiver.open(&sent[index]) {
                    Ok(plaintext) => {
                        assert_eq!(plaintext, u32::try_from(index).expect("few").to_be_bytes());
                        assert!(opened.insert(index), "frame {index} opened twice");
                    }
                    Err(MediaError::Replayed | MediaError::TooOld | MediaError::UnknownEpoch) => {}
                    Err(other) => panic!("authentic frame {index} refused: {other}"),
                }
            }
            2 if !sent.is_empty() => {
                let mut tampered = sent[pick % sent.len()].clone();
                let bit = usize::from(ops.next().unwrap_or(0)) % (tampered.len() * 8);
                tampered[bit / 8] ^= 1 << (bit % 8);
                assert!(receiver.open(&tampered).is_err(), "a tampered frame opened");
            }
            3 => sender.rotate(),
            _ => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    hush_fuzz::by_mode(data, [datagram, forged, script]);
});
