//! Limits and quotas (issue #6): each limit set small, exceeded, answered with its typed
//! error; the connection carries on where it should (rate limits) or is refused
//! (connection caps); nothing already accepted is lost; and the limit recovers, by the
//! relay's test clock rather than by sleeping.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use hush_client::protocol::sealed::SealedEnvelope;
use hush_client::protocol::{CallOutcome, DeviceId, ErrorCode, OutgoingEnvelope, UploadPrekeys};
use hush_client::{Connection, ConnectionError};
use hush_server::metrics::Metrics;
use hush_server::rate::Rate;
use hush_tests::{add_device, drain, prekey, refused, Device, TestRelay, WAIT};

const TOKEN: [u8; 16] = [0x42; 16];

/// Asserts a rate-limit refusal and returns how long the relay said to wait.
fn rate_limited(result: Result<impl std::fmt::Debug, ConnectionError>) -> Duration {
    match result {
        Err(ConnectionError::RateLimited { retry_after }) => retry_after,
        other => panic!("expected RateLimited, got {other:?}"),
    }
}

fn millis(wait: Duration) -> u64 {
    u64::try_from(wait.as_millis()).unwrap()
}

/// Payloads of everything `device` has waiting, in order, acknowledged (on a connection
/// of its own, which takes over from any other).
async fn received(relay: &TestRelay, device: &Device) -> Vec<Vec<u8>> {
    let connection = relay.login(device.address, &device.key).await;
    let envelopes = drain(&connection).await;
    if !envelopes.is_empty() {
        let ids: Vec<_> = envelopes.iter().map(|e| e.id).collect();
        connection.ack(&ids).await.unwrap();
    }
    envelopes.into_iter().map(|e| e.payload).collect()
}

fn numbered(i: usize) -> Vec<u8> {
    format!("envelope {i}").into_bytes()
}

#[tokio::test]
async fn a_connection_over_its_envelope_rate_is_told_when_to_retry_and_carries_on() {
    let relay =
        TestRelay::start_with(|c| c.limits.connection_envelopes = Rate::per_second(5, 5)).await;
    let alice = relay.register().await;
    let alice2 = add_device(&relay, &alice).await;
    let bob = relay.register().await;

    for i in 0..5 {
        alice
            .connection
            .send_to(&[bob.address], numbered(i))
            .await
            .unwrap();
    }
    // One token comes back every 200 ms; the relay says so.
    let wait = rate_limited(alice.connection.send_to(&[bob.address], numbered(99)).await);
    assert_eq!(wait, Duration::from_millis(200));
    // Envelope copies count: two recipients cost two.
    relay.clock.advance_millis(200);
    rate_limited(
        alice
            .connection
            .send_to(&[bob.address, alice2.address], numbered(98))
            .await,
    );
    // The connection carries on, and the limit is the connection's: the account's other
    // device sends meanwhile.
    alice
        .connection
        .list_devices(bob.address.account)
        .await
        .unwrap();
    alice2
        .connection
        .send_to(&[bob.address], numbered(5))
        .await
        .unwrap();
    alice
        .connection
        .send_to(&[bob.address], numbered(6))
        .await
        .unwrap();
    relay.clock.advance_millis(400);
    alice
        .connection
        .send_to(&[bob.address, alice2.address], numbered(7))
        .await
        .unwrap();

    // Everything accepted arrived once, in order; nothing refused was stored.
    let expected: Vec<Vec<u8>> = (0..8).map(numbered).collect();
    assert_eq!(received(&relay, &bob).await, expected);
    let metrics = relay.relay().metrics();
    assert_eq!(Metrics::get(&metrics.rate_limited_connection_envelopes), 2);
    assert!(!metrics.render().contains("127.0.0.1"));
}

#[tokio::test]
async fn an_account_over_its_envelope_rate_is_limited_across_its_devices() {
    let relay =
        TestRelay::start_with(|c| c.limits.account_envelopes = Rate::per_second(4, 2)).await;
    let alice = relay.register().await;
    let alice2 = add_device(&relay, &alice).await;
    let bob = relay.register().await;

    for device in [&alice, &alice2, &alice, &alice2] {
        device
            .connection
            .send_to(&[bob.address], b"within the burst".to_vec())
            .await
            .unwrap();
    }
    let wait = rate_limited(
        alice2
            .connection
            .send_to(&[bob.address], b"over".to_vec())
            .await,
    );
    assert_eq!(wait, Duration::from_millis(500));
    // Another account is not held back by Alice's.
    bob.connection
        .send_to(&[alice.address], b"bob is free".to_vec())
        .await
        .unwrap();
    relay.clock.advance_millis(millis(wait));
    alice
        .connection
        .send_to(&[bob.address], b"after the wait".to_vec())
        .await
        .unwrap();
    assert_eq!(received(&relay, &bob).await.len(), 5);
    assert_eq!(
        Metrics::get(&relay.relay().metrics().rate_limited_account_envelopes),
        1
    );
}

fn sealed_to(device: &Device, payload: &[u8]) -> SealedEnvelope {
    SealedEnvelope {
        account: device.address.account,
        devices: vec![DeviceId::PRIMARY],
        access: Some(TOKEN),
        retract_tag: None,
        payload: payload.to_vec(),
    }
}

#[tokio::test]
async fn anonymous_sealed_sends_are_limited_per_source_address() {
    let relay =
        TestRelay::start_with(|c| c.limits.address_sealed_sends = Rate::per_second(3, 1)).await;
    let bob = relay.register().await;
    bob.connection
        .set_delivery_access(Some(TOKEN), false)
        .await
        .unwrap();
    // Two anonymous connections from the same address share one budget.
    let first = relay.connect().await;
    let second = relay.connect().await;
    for payload in [b"1", b"2"] {
        first
            .sealed_send(vec![sealed_to(&bob, payload)])
            .await
            .unwrap();
    }
    second
        .sealed_send(vec![sealed_to(&bob, b"3")])
        .await
        .unwrap();
    let wait = rate_limited(second.sealed_send(vec![sealed_to(&bob, b"x")]).await);
    assert_eq!(wait, Duration::from_secs(1));
    rate_limited(first.sealed_send(vec![sealed_to(&bob, b"y")]).await);
    // An authenticated sender is limited by its account, not by the address.
    let alice = relay.register().await;
    alice
        .connection
        .sealed_send(vec![sealed_to(&bob, b"4")])
        .await
        .unwrap();
    relay.clock.advance_millis(millis(wait));
    second
        .sealed_send(vec![sealed_to(&bob, b"5")])
        .await
        .unwrap();

    let payloads: Vec<Vec<u8>> = ["1", "2", "3", "4", "5"]
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    assert_eq!(received(&relay, &bob).await, payloads);
    assert_eq!(
        Metrics::get(&relay.relay().metrics().rate_limited_address_sealed_sends),
        2
    );
}

#[tokio::test]
async fn prekey_fetches_are_limited_per_requester_and_end_in_the_last_resort_key() {
    let relay = TestRelay::start_with(|c| c.limits.prekey_fetches = Rate::per_hour(3, 3)).await;
    let bob = relay.register().await;
    bob.connection
        .upload_prekeys(UploadPrekeys {
            signed_prekey: Some(prekey(100, 32)),
            one_time: vec![prekey(1, 32)],
            kem_one_time: vec![prekey(11, 1184)],
            kem_last_resort: Some(prekey(99, 1184)),
        })
        .await
        .unwrap();
    bob.connection
        .set_delivery_access(Some(TOKEN), false)
        .await
        .unwrap();

    let alice = relay.register().await;
    let mut served = Vec::new();
    for _ in 0..3 {
        let bundles = alice
            .connection
            .fetch_prekeys(bob.address.account, None)
            .await
            .unwrap();
        let bundle = &bundles.devices[0];
        served.push((
            bundle.one_time.as_ref().map(|k| k.id),
            bundle.kem.as_ref().map(|k| k.id),
            bundle.kem_is_last_resort,
        ));
    }
    // Exhaustion ends in the last-resort KEM key, never in an empty bundle.
    assert_eq!(
        served,
        vec![
            (Some(1), Some(11), false),
            (None, Some(99), true),
            (None, Some(99), true)
        ]
    );
    let wait = rate_limited(
        alice
            .connection
            .fetch_prekeys(bob.address.account, None)
            .await,
    );
    assert_eq!(wait, Duration::from_secs(1200), "one fetch per 20 minutes");

    // Another account, and an anonymous caller (keyed by its address), have their own.
    let carol = relay.register().await;
    carol
        .connection
        .fetch_prekeys(bob.address.account, None)
        .await
        .unwrap();
    let anonymous = relay.connect().await;
    for _ in 0..3 {
        anonymous
            .fetch_prekeys_with(bob.address.account, None, Some(TOKEN))
            .await
            .unwrap();
    }
    rate_limited(
        anonymous
            .fetch_prekeys_with(bob.address.account, None, Some(TOKEN))
            .await,
    );

    relay.clock.advance_millis(millis(wait));
    alice
        .connection
        .fetch_prekeys(bob.address.account, None)
        .await
        .unwrap();
    assert_eq!(
        Metrics::get(&relay.relay().metrics().rate_limited_prekey_fetches),
        2
    );
}

#[tokio::test]
async fn registrations_are_limited_per_source_address() {
    let relay = TestRelay::start_with(|c| c.limits.registrations = Rate::per_hour(2, 2)).await;
    let first = relay.register().await;
    relay.register().await;
    let connection = relay.connect().await;
    let key = hush_client::DeviceKey::generate();
    let wait = rate_limited(connection.register(b"identity-key", &key, None).await);
    assert_eq!(wait, Duration::from_secs(1800));
    // Registered accounts are untouched: they still authenticate and send.
    relay
        .login(first.address, &first.key)
        .await
        .send_to(&[first.address], b"still here".to_vec())
        .await
        .unwrap();
    // The same connection may try again once the wait is over.
    relay.clock.advance_millis(millis(wait));
    connection
        .register(b"identity-key", &key, None)
        .await
        .unwrap();
    assert_eq!(
        Metrics::get(&relay.relay().metrics().rate_limited_registrations),
        1
    );
}

#[tokio::test]
async fn connections_per_address_are_capped_and_freed_when_one_closes() {
    let relay = TestRelay::start_with(|c| c.limits.connections_per_address = 2).await;
    let alice = relay.register().await;
    let second = relay.connect().await;
    match Connection::connect(&relay.options()).await {
        Err(ConnectionError::ConnectionRefused) => {}
        Ok(_) => panic!("a third connection from the address was accepted"),
        Err(other) => panic!("expected ConnectionRefused, got {other:?}"),
    }
    // The live ones are not disturbed.
    alice
        .connection
        .send_to(&[alice.address], b"still connected".to_vec())
        .await
        .unwrap();
    second.open_provisioning().await.unwrap();

    second.close();
    drop(second);
    // The relay frees the slot once that session has ended (bounded wait).
    let deadline = tokio::time::Instant::now() + WAIT;
    let third = loop {
        match Connection::connect(&relay.options()).await {
            Ok(connection) => break connection,
            Err(ConnectionError::ConnectionRefused) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(other) => panic!("no slot freed: {other:?}"),
        }
    };
    third.open_provisioning().await.unwrap();
    assert!(Metrics::get(&relay.relay().metrics().connections_refused_per_address) >= 1);
}

#[tokio::test]
async fn a_full_mailbox_refuses_the_send_for_every_recipient_until_the_device_reads() {
    let relay = TestRelay::start_with(|c| c.limits.mailbox_max_envelopes = 3).await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    let carol = relay.register().await;
    for i in 0..3 {
        alice
            .connection
            .send_to(&[bob.address], numbered(i))
            .await
            .unwrap();
    }
    refused(
        alice.connection.send_to(&[bob.address], numbered(9)).await,
        ErrorCode::MailboxFull,
    );
    // A send is all or nothing: Carol does not get what Bob could not take.
    refused(
        alice
            .connection
            .send_to(&[carol.address, bob.address], numbered(9))
            .await,
        ErrorCode::MailboxFull,
    );
    let usage = relay.relay().mailbox_usage(bob.address).await.unwrap();
    assert_eq!(usage.envelopes, 3);
    // The connection carries on.
    alice
        .connection
        .send_to(&[carol.address], numbered(3))
        .await
        .unwrap();

    // Bob reads and acknowledges: room again.
    let expected: Vec<Vec<u8>> = (0..3).map(numbered).collect();
    assert_eq!(received(&relay, &bob).await, expected);
    alice
        .connection
        .send_to(&[bob.address], numbered(4))
        .await
        .unwrap();
    assert_eq!(received(&relay, &bob).await, vec![numbered(4)]);
    assert_eq!(received(&relay, &carol).await, vec![numbered(3)]);
    assert_eq!(
        Metrics::get(&relay.relay().metrics().mailbox_full_refusals),
        2
    );
}

#[tokio::test]
async fn a_mailbox_is_limited_in_bytes_too() {
    let relay = TestRelay::start_with(|c| c.limits.mailbox_max_bytes = 1024 * 1024).await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    let chunk = vec![0x77; 60 * 1024];
    // 17 envelopes of 60 KiB: 1,020 KiB, under the MiB.
    let batch: Vec<OutgoingEnvelope> = (0..17)
        .map(|_| OutgoingEnvelope {
            recipients: vec![bob.address],
            payload: chunk.clone(),
            retract_tag: None,
        })
        .collect();
    alice.connection.send(batch).await.unwrap();
    let usage = relay.relay().mailbox_usage(bob.address).await.unwrap();
    assert_eq!(usage.bytes, 17 * 60 * 1024);
    refused(
        alice
            .connection
            .send_to(&[bob.address], chunk.clone())
            .await,
        ErrorCode::MailboxFull,
    );
    // Small envelopes still fit in the 4 KiB left.
    alice
        .connection
        .send_to(&[bob.address], vec![1; 4096])
        .await
        .unwrap();
}

#[tokio::test]
async fn call_allocations_are_capped_per_account_and_in_all_and_freed_by_ending() {
    let relay = TestRelay::start_with(|c| {
        c.limits.max_call_allocations = 2;
        c.limits.max_calls_per_account = 1;
    })
    .await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    let carol = relay.register().await;
    let (allocation, _, _) = alice
        .connection
        .allocate_call(bob.address.account)
        .await
        .unwrap();
    refused(
        alice.connection.allocate_call(carol.address.account).await,
        ErrorCode::CallLimitReached,
    );
    carol
        .connection
        .allocate_call(bob.address.account)
        .await
        .unwrap();
    refused(
        bob.connection.allocate_call(alice.address.account).await,
        ErrorCode::Overloaded,
    );
    alice
        .connection
        .end_call(allocation, CallOutcome::Missed)
        .await
        .unwrap();
    bob.connection
        .allocate_call(alice.address.account)
        .await
        .unwrap();
    assert_eq!(relay.relay().live_calls(), 2);
}
