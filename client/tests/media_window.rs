//! Property test: the media replay window against a plain reference model. Frames arrive
//! in any order, duplicated, skipped; a frame opens exactly when its counter is new and
//! within the window of the highest counter that opened before it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::sync::OnceLock;

use hush_client::media::{
    CallKey, Direction, MediaError, MediaReceiver, MediaSender, REPLAY_WINDOW,
};
use proptest::prelude::*;

/// One call's frames 0..3·window, sealed once for every case.
fn fixture() -> &'static (CallKey, Vec<Vec<u8>>) {
    static FRAMES: OnceLock<(CallKey, Vec<Vec<u8>>)> = OnceLock::new();
    FRAMES.get_or_init(|| {
        let key = CallKey::generate();
        let mut sender = MediaSender::new(&key, [9; 16], Direction::FromCallee, 5);
        let frames = (0..3 * REPLAY_WINDOW)
            .map(|i| sender.seal(&i.to_be_bytes()).unwrap())
            .collect();
        (key, frames)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_window_accepts_exactly_the_new_frames_within_reach(
        order in prop::collection::vec(0u64..3 * REPLAY_WINDOW, 1..600),
    ) {
        let (key, frames) = fixture();
        let mut receiver = MediaReceiver::new(key, [9; 16], Direction::FromCallee, 5);

        let mut seen = HashSet::new();
        let mut highest: Option<u64> = None;
        for counter in order {
            let fresh = !seen.contains(&counter);
            let in_reach = highest.is_none_or(|h| counter > h || h - counter < REPLAY_WINDOW);
            match receiver.open(&frames[counter as usize]) {
                Ok(frame) => {
                    prop_assert!(fresh && in_reach, "counter {counter} opened twice or too late");
                    prop_assert_eq!(frame, counter.to_be_bytes().to_vec());
                    seen.insert(counter);
                    highest = Some(highest.map_or(counter, |h| h.max(counter)));
                }
                Err(MediaError::Replayed) => prop_assert!(!fresh && in_reach),
                Err(MediaError::TooOld) => prop_assert!(!in_reach),
                Err(other) => prop_assert!(false, "unexpected {other}"),
            }
        }
    }
}
