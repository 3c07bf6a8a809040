//! P3: undelivered envelopes expire after at most 14 days, and are never delivered after.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_tests::{drain, TestRelay};

const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;

#[tokio::test]
async fn undelivered_envelope_expires_after_14_days_and_is_shredded() {
    let relay = TestRelay::start().await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    drop(bob.connection);
    alice
        .connection
        .send_to(&[bob.address], b"still fresh".to_vec())
        .await
        .unwrap();

    // 13 days 23 hours: still delivered (and not acked).
    relay.clock.advance(13 * DAY + 23 * HOUR);
    let bob_connection = relay.login(bob.address, &bob.key).await;
    assert_eq!(drain(&bob_connection).await.len(), 1);
    drop(bob_connection);

    // Past 14 days: never delivered, even though no sweep has run yet.
    relay.clock.advance(HOUR + 1);
    assert_eq!(
        relay.relay().store_stats().await.unwrap().envelopes,
        1,
        "not swept yet"
    );
    let bob_connection = relay.login(bob.address, &bob.key).await;
    assert!(
        drain(&bob_connection).await.is_empty(),
        "an expired envelope is never delivered"
    );

    // The sweep deletes it and its index entry.
    assert_eq!(relay.relay().sweep_now().await.unwrap(), 1);
    let stats = relay.relay().store_stats().await.unwrap();
    assert_eq!(
        (stats.envelopes, stats.mailbox_entries, stats.expiry_entries),
        (0, 0, 0)
    );

    // Once its expiry day is over, the day's storage key is dropped too: whatever bytes
    // of the envelope redb's free pages still hold can no longer be opened.
    assert!(stats.day_keys >= 1);
    relay.clock.advance(DAY);
    relay.relay().sweep_now().await.unwrap();
    assert_eq!(relay.relay().store_stats().await.unwrap().day_keys, 0);
}

#[tokio::test]
async fn a_shorter_expiry_is_honoured() {
    let relay = TestRelay::start_with(|c| c.message_expiry_days = 2).await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    drop(bob.connection);
    alice
        .connection
        .send_to(&[bob.address], b"short-lived".to_vec())
        .await
        .unwrap();
    relay.clock.advance(2 * DAY + 1);
    let bob_connection = relay.login(bob.address, &bob.key).await;
    assert!(drain(&bob_connection).await.is_empty());
    assert_eq!(relay.relay().sweep_now().await.unwrap(), 1);
}

#[tokio::test]
async fn a_longer_expiry_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = hush_tests::test_config(dir.path());
    config.message_expiry_days = 15;
    let clock = std::sync::Arc::new(hush_server::clock::SystemClock);
    let started = hush_server::Relay::start(config, clock).await;
    assert!(matches!(started, Err(hush_server::StartError::Config(_))));
}

/// An envelope that expires while its push waits for the device's acks is not pushed when
/// the room comes.
#[tokio::test]
async fn an_envelope_that_expires_while_the_window_is_full_is_never_delivered() {
    let relay = TestRelay::start_with(|c| c.limits.delivery_window = 1).await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    assert!(drain(&bob.connection).await.is_empty());

    for text in [&b"first"[..], b"second, which will expire waiting"] {
        alice
            .connection
            .send_to(&[bob.address], text.to_vec())
            .await
            .unwrap();
    }
    let first = hush_tests::next_envelope(&bob.connection).await;
    assert_eq!(first.payload, b"first");
    // The window holds one envelope: "second" waits for the ack, until it has expired.
    hush_tests::assert_no_envelope(&bob.connection, std::time::Duration::from_millis(200)).await;
    relay.clock.advance(14 * DAY + 1);
    bob.connection.ack(&[first.id]).await.unwrap();
    hush_tests::assert_no_envelope(&bob.connection, std::time::Duration::from_millis(300)).await;
}
