//! Every frame body kind: the first byte is the kind (client kinds `0x01..=0x13`, server
//! kinds `0x81..=0x88`; the seed corpus holds a real body of each), the rest the body. A
//! known kind decodes or fails with a typed error; what decodes obeys the field limits,
//! fits its kind's body limit, and survives decode -> encode -> decode unchanged. An
//! unknown kind is refused as unknown.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    hush_fuzz::check_body(kind, body);
});
