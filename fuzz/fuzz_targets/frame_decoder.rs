//! The frame decoder (length prefix, kind byte, per-kind limit, body) on an arbitrary byte
//! stream, as either end reads it: fed in arbitrary chunks, `FrameDecoder` yields exactly
//! what a header-by-header reference decoding yields, and every frame it yields obeys the
//! limits and round-trips.
#![no_main]

use hush_fuzz::{decode_reference, decode_stream, CheckedFrame};
use hush_protocol::{ClientFrame, ServerFrame};
use libfuzzer_sys::fuzz_target;

fn check<F: CheckedFrame>(stream: &[u8], chunk: usize) {
    let reference = decode_reference::<F>(stream);
    assert_eq!(decode_stream::<F>(stream, stream.len()), reference);
    assert_eq!(decode_stream::<F>(stream, chunk), reference);
}

fuzz_target!(|data: &[u8]| {
    // The first byte is the chunk size the bytes arrive in; the rest is the stream.
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk % 64) + 1;
    check::<ClientFrame>(stream, chunk);
    check::<ServerFrame>(stream, chunk);
});
