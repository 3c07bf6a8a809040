//! Call media encryption, without IO: every audio or video frame the app hands over is
//! sealed before it leaves the device; the relay forwards ciphertext and sees only sizes
//! and timing (P1).
//!
//! ```text
//! key(direction, epoch) = HKDF-SHA256(salt = call id, ikm = call key,
//!                                     info = "hush-call-media-v1" || direction || epoch (u32 BE))
//! frame = epoch (u32 BE) | counter (u64 BE) | ChaCha20-Poly1305(key, nonce = epoch || counter,
//!                                                          frame, aad = allocation (u32 BE))
//! ```
//!
//! Each direction has its own keys, so the two sides never share a (key, nonce) pair; the
//! counter is the nonce and never repeats under one key. The receiver keeps a sliding
//! window of the last [`REPLAY_WINDOW`] counters: a replayed frame, or one older than the
//! window, is refused, and the window moves only after a frame has authenticated, so
//! forged frames cannot push it. Key rotation moves to the next epoch; the receiver
//! follows on the first frame of the new epoch and keeps the previous epoch's key for
//! frames still in flight.

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::kdf;

/// Frames the receiver tolerates out of order.
pub const REPLAY_WINDOW: u64 = 1024;
/// Bytes a sealed frame adds: epoch, counter, tag.
pub const MEDIA_OVERHEAD: usize = 4 + 8 + 16;

const INFO: &[u8] = b"hush-call-media-v1";
const WORDS: usize = (REPLAY_WINDOW / 64) as usize;

/// Why a media frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MediaError {
    /// Shorter than the header and tag.
    #[error("malformed media frame")]
    Malformed,
    /// From an epoch that is neither current, previous nor next.
    #[error("media frame from an unknown key epoch")]
    UnknownEpoch,
    /// Its counter was seen already.
    #[error("replayed media frame")]
    Replayed,
    /// Its counter is older than the replay window.
    #[error("media frame too old")]
    TooOld,
    /// It did not authenticate.
    #[error("media frame failed to authenticate")]
    DecryptionFailed,
    /// The sender used up its counters (2^64 frames); rotate the key.
    #[error("media counter exhausted")]
    Exhausted,
}

/// The secret both parties of a call share, sent inside the end-to-end encrypted offer.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop, serde::Serialize, serde::Deserialize)]
pub struct CallKey(pub(crate) [u8; 32]);

impl CallKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        CallKey(crate::util::random())
    }
}

impl std::fmt::Debug for CallKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallKey(<redacted>)")
    }
}

/// Which way media flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Caller to callee.
    FromCaller,
    /// Callee to caller.
    FromCallee,
}

impl Direction {
    fn byte(self) -> u8 {
        match self {
            Direction::FromCaller => 0,
            Direction::FromCallee => 1,
        }
    }
}

fn derive(
    call_key: &CallKey,
    call_id: &[u8; 16],
    direction: Direction,
    epoch: u32,
) -> Zeroizing<[u8; 32]> {
    let mut info = Vec::with_capacity(INFO.len() + 5);
    info.extend_from_slice(INFO);
    info.push(direction.byte());
    info.extend_from_slice(&epoch.to_be_bytes());
    kdf::hkdf::<32>(call_id, &call_key.0, &info)
}

fn nonce(epoch: u32, counter: u64) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[..4].copy_from_slice(&epoch.to_be_bytes());
    nonce[4..].copy_from_slice(&counter.to_be_bytes());
    nonce
}

fn aead(key: &[u8; 32]) -> chacha20poly1305::ChaCha20Poly1305 {
    use chacha20poly1305::KeyInit;
    chacha20poly1305::ChaCha20Poly1305::new(key.into())
}

/// Seals the frames of one direction.
pub struct MediaSender {
    call_key: CallKey,
    call_id: [u8; 16],
    direction: Direction,
    allocation: u32,
    epoch: u32,
    key: Zeroizing<[u8; 32]>,
    counter: u64,
}

impl MediaSender {
    /// The sender for `direction` of a call.
    pub fn new(
        call_key: &CallKey,
        call_id: [u8; 16],
        direction: Direction,
        allocation: u32,
    ) -> Self {
        MediaSender {
            key: derive(call_key, &call_id, direction, 0),
            call_key: call_key.clone(),
            call_id,
            direction,
            allocation,
            epoch: 0,
            counter: 0,
        }
    }

    /// Seals one frame.
    pub fn seal(&mut self, frame: &[u8]) -> Result<Vec<u8>, MediaError> {
        use chacha20poly1305::aead::{Aead, Payload};
        let counter = self.counter;
        self.counter = counter.checked_add(1).ok_or(MediaError::Exhausted)?;
        let sealed = aead(&self.key)
            .encrypt(
                (&nonce(self.epoch, counter)).into(),
                Payload {
                    msg: frame,
                    aad: &self.allocation.to_be_bytes(),
                },
            )
            .map_err(|_| MediaError::Malformed)?;
        let mut out = Vec::with_capacity(MEDIA_OVERHEAD + frame.len());
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&counter.to_be_bytes());
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Moves to the next key epoch (on request, e.g. when a device joins or leaves, or
    /// periodically); the counter starts again under the new key.
    pub fn rotate(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        self.key = derive(&self.call_key, &self.call_id, self.direction, self.epoch);
        self.counter = 0;
    }

    /// The current key epoch.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }
}

/// A sliding window of seen counters: the highest seen, and a bitmap of the
/// [`REPLAY_WINDOW`] counters below it.
#[derive(Clone)]
struct ReplayWindow {
    highest: Option<u64>,
    seen: [u64; WORDS],
}

impl ReplayWindow {
    fn new() -> Self {
        ReplayWindow {
            highest: None,
            seen: [0; WORDS],
        }
    }

    fn check(&self, counter: u64) -> Result<(), MediaError> {
        let Some(highest) = self.highest else {
            return Ok(());
        };
        if counter > highest {
            return Ok(());
        }
        let age = highest - counter;
        if age >= REPLAY_WINDOW {
            return Err(MediaError::TooOld);
        }
        if self.bit(counter) {
            Err(MediaError::Replayed)
        } else {
            Ok(())
        }
    }

    fn bit(&self, counter: u64) -> bool {
        let slot = counter % REPLAY_WINDOW;
        self.seen[(slot / 64) as usize] & (1 << (slot % 64)) != 0
    }

    fn set(&mut self, counter: u64) {
        let slot = counter % REPLAY_WINDOW;
        self.seen[(slot / 64) as usize] |= 1 << (slot % 64);
    }

    fn clear(&mut self, counter: u64) {
        let slot = counter % REPLAY_WINDOW;
        self.seen[(slot / 64) as usize] &= !(1 << (slot % 64));
    }

    /// Records an authenticated counter.
    fn accept(&mut self, counter: u64) {
        match self.highest {
            Some(highest) if counter <= highest => {}
            Some(highest) => {
                // Slide: forget the slots the window moves past.
                let advance = counter - highest;
                if advance >= REPLAY_WINDOW {
                    self.seen = [0; WORDS];
                } else {
                    for passed in highest + 1..=counter {
                        self.clear(passed);
                    }
                }
                self.highest = Some(counter);
            }
            None => self.highest = Some(counter),
        }
        self.set(counter);
    }
}

/// The key and window of one epoch.
struct EpochState {
    epoch: u32,
    key: Zeroizing<[u8; 32]>,
    window: ReplayWindow,
}

/// Which epoch a frame belongs to.
enum Slot {
    Current,
    Previous,
    /// The sender rotated: its key, derived once, becomes current if the frame opens.
    Next(EpochState),
}

/// Opens the frames of one direction.
pub struct MediaReceiver {
    call_key: CallKey,
    call_id: [u8; 16],
    direction: Direction,
    allocation: u32,
    current: EpochState,
    previous: Option<EpochState>,
}

impl MediaReceiver {
    /// The receiver for `direction` of a call.
    pub fn new(
        call_key: &CallKey,
        call_id: [u8; 16],
        direction: Direction,
        allocation: u32,
    ) -> Self {
        MediaReceiver {
            current: EpochState {
                epoch: 0,
                key: derive(call_key, &call_id, direction, 0),
                window: ReplayWindow::new(),
            },
            call_key: call_key.clone(),
            call_id,
            direction,
            allocation,
            previous: None,
        }
    }

    /// Opens one frame. Refused frames change nothing.
    pub fn open(&mut self, sealed: &[u8]) -> Result<Vec<u8>, MediaError> {
        use chacha20poly1305::aead::{Aead, Payload};
        if sealed.len() < MEDIA_OVERHEAD {
            return Err(MediaError::Malformed);
        }
        let mut epoch = [0u8; 4];
        epoch.copy_from_slice(&sealed[..4]);
        let epoch = u32::from_be_bytes(epoch);
        let mut counter = [0u8; 8];
        counter.copy_from_slice(&sealed[4..12]);
        let counter = u64::from_be_bytes(counter);

        // The key for this epoch: current, previous, or the next one (the sender rotated).
        let slot = if epoch == self.current.epoch {
            Slot::Current
        } else if self.previous.as_ref().is_some_and(|p| p.epoch == epoch) {
            Slot::Previous
        } else if epoch == self.current.epoch.wrapping_add(1) {
            Slot::Next(EpochState {
                epoch,
                key: derive(&self.call_key, &self.call_id, self.direction, epoch),
                window: ReplayWindow::new(),
            })
        } else {
            return Err(MediaError::UnknownEpoch);
        };
        let state = match &slot {
            Slot::Current => &self.current,
            Slot::Previous => self.previous.as_ref().ok_or(MediaError::UnknownEpoch)?,
            Slot::Next(next) => next,
        };
        state.window.check(counter)?;
        let frame = aead(&state.key)
            .decrypt(
                (&nonce(epoch, counter)).into(),
                Payload {
                    msg: &sealed[12..],
                    aad: &self.allocation.to_be_bytes(),
                },
            )
            .map_err(|_| MediaError::DecryptionFailed)?;

        // Authenticated: now the window (and, on a new epoch, the keys) may move.
        match slot {
            Slot::Current => self.current.window.accept(counter),
            Slot::Previous => {
                if let Some(previous) = self.previous.as_mut() {
                    previous.window.accept(counter);
                }
            }
            Slot::Next(mut next) => {
                next.window.accept(counter);
                self.previous = Some(std::mem::replace(&mut self.current, next));
            }
        }
        Ok(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (MediaSender, MediaReceiver) {
        let key = CallKey([7; 32]);
        (
            MediaSender::new(&key, [1; 16], Direction::FromCaller, 42),
            MediaReceiver::new(&key, [1; 16], Direction::FromCaller, 42),
        )
    }

    #[test]
    fn frames_open_in_and_out_of_order_once() {
        let (mut tx, mut rx) = pair();
        let frames: Vec<Vec<u8>> = (0..10u8).map(|i| tx.seal(&[i; 160]).unwrap()).collect();
        for i in [0usize, 2, 1, 5, 3, 4, 9, 6, 8, 7] {
            assert_eq!(rx.open(&frames[i]).unwrap(), vec![i as u8; 160]);
        }
        for frame in &frames {
            assert_eq!(rx.open(frame).unwrap_err(), MediaError::Replayed);
        }
    }

    #[test]
    fn frames_older_than_the_window_are_refused() {
        let (mut tx, mut rx) = pair();
        let old = tx.seal(b"old").unwrap();
        for _ in 0..REPLAY_WINDOW {
            let frame = tx.seal(b"x").unwrap();
            rx.open(&frame).unwrap();
        }
        assert_eq!(rx.open(&old).unwrap_err(), MediaError::TooOld);
    }

    #[test]
    fn tampered_foreign_and_misdirected_frames_are_refused_without_moving_the_window() {
        let (mut tx, mut rx) = pair();
        let frame = tx.seal(b"audio").unwrap();
        let mut tampered = frame.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(
            rx.open(&tampered).unwrap_err(),
            MediaError::DecryptionFailed
        );
        // A forged frame with a huge counter must not slide the window past real ones.
        let mut forged = frame.clone();
        forged[4..12].copy_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(rx.open(&forged).unwrap_err(), MediaError::DecryptionFailed);
        assert_eq!(rx.open(&frame).unwrap(), b"audio");
        assert_eq!(rx.open(&frame[..10]).unwrap_err(), MediaError::Malformed);

        // The other direction's keys, another call's allocation: nothing opens.
        let key = CallKey([7; 32]);
        let mut fresh = MediaReceiver::new(&key, [1; 16], Direction::FromCaller, 42);
        let mut back = MediaSender::new(&key, [1; 16], Direction::FromCallee, 42);
        assert_eq!(
            fresh.open(&back.seal(b"reflected").unwrap()).unwrap_err(),
            MediaError::DecryptionFailed
        );
        let mut elsewhere = MediaSender::new(&key, [1; 16], Direction::FromCaller, 43);
        assert_eq!(
            fresh.open(&elsewhere.seal(b"moved").unwrap()).unwrap_err(),
            MediaError::DecryptionFailed
        );
    }

    #[test]
    fn rotation_is_followed_and_late_frames_of_the_previous_epoch_still_open() {
        let (mut tx, mut rx) = pair();
        let late = tx.seal(b"late").unwrap();
        rx.open(&tx.seal(b"a").unwrap()).unwrap();
        tx.rotate();
        assert_eq!(tx.epoch(), 1);
        rx.open(&tx.seal(b"b").unwrap()).unwrap();
        assert_eq!(rx.open(&late).unwrap(), b"late");
        tx.rotate();
        tx.rotate();
        // Two epochs ahead: not followed (a rotation frame was lost, or a forgery).
        assert_eq!(
            rx.open(&tx.seal(b"c").unwrap()).unwrap_err(),
            MediaError::UnknownEpoch
        );
    }
}
