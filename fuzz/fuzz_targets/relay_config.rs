//! The relay's configuration parser (`Config::from_toml`, which runs `validate`): any text
//! is refused with a typed error or accepted; what is accepted passes `validate` again,
//! keeps the privacy bounds (messages kept at most 14 days), yields its derived durations
//! without overflow, and parses the same every time.
#![no_main]

use hush_server::config::{Config, MAX_CDR_RETENTION_DAYS, MAX_MESSAGE_EXPIRY_DAYS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::from_toml(text) else {
        return;
    };
    config.validate().expect("an accepted config validates");
    assert!((1..=MAX_MESSAGE_EXPIRY_DAYS).contains(&config.message_expiry_days));
    assert!((1..=MAX_CDR_RETENTION_DAYS).contains(&config.cdr_retention_days));
    assert!(config.message_expiry_secs() <= u64::from(MAX_MESSAGE_EXPIRY_DAYS) * 86_400);
    let _ = (
        config.cdr_retention_secs(),
        config.sender_certificate_secs(),
        config.idle_timeout(),
    );
    assert_eq!(Config::from_toml(text).expect("parses again"), config);
});
