//! Store-until-delivered: offline and online delivery, order, acks, multi-device.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use hush_client::protocol::{DeviceAddress, DeviceId, EnvelopeId, ErrorCode, OutgoingEnvelope};
use hush_client::{ConnectionError, DeviceKey, Event};
use hush_tests::{add_device, assert_no_envelope, drain, next_envelope, TestRelay, WAIT};

#[tokio::test]
async fn offline_devices_each_receive_exactly_once_in_order_then_the_store_forgets() {
    let relay = TestRelay::start().await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    let bob2 = add_device(&relay, &bob).await;
    let (bob1_address, bob1_key) = (bob.address, bob.key);
    let (bob2_address, bob2_key) = (bob2.address, bob2.key);
    drop(bob.connection);
    drop(bob2.connection);

    let messages: Vec<Vec<u8>> = (0..5)
        .map(|i| format!("envelope {i} for bob, plaintext-looking canary").into_bytes())
        .collect();
    for message in &messages {
        alice
            .connection
            .send_to(&[bob1_address, bob2_address], message.clone())
            .await
            .unwrap();
    }
    assert_eq!(relay.relay().store_stats().await.unwrap().envelopes, 10);

    for (address, key) in [(bob1_address, &bob1_key), (bob2_address, &bob2_key)] {
        let connection = relay.login(address, key).await;
        let received = drain(&connection).await;
        let payloads: Vec<Vec<u8>> = received.iter().map(|e| e.payload.clone()).collect();
        assert_eq!(
            payloads, messages,
            "each device gets every message once, in order"
        );
        let ids: Vec<EnvelopeId> = received.iter().map(|e| e.id).collect();
        connection.ack(&ids).await.unwrap();
        assert_no_envelope(&connection, Duration::from_millis(200)).await;
    }

    let stats = relay.relay().store_stats().await.unwrap();
    assert_eq!(
        (stats.envelopes, stats.mailbox_entries, stats.expiry_entries),
        (0, 0, 0),
        "acked envelopes leave no trace"
    );
    let dir = relay.stop().await;
    for (path, bytes) in hush_tests::read_tree(dir.path()) {
        for message in &messages {
            assert!(
                !hush_tests::contains(&bytes, message),
                "{} holds a payload",
                path.display()
            );
        }
    }
}

#[tokio::test]
async fn a_connected_device_gets_envelopes_pushed_without_polling() {
    let relay = TestRelay::start().await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    assert!(drain(&bob.connection).await.is_empty());

    alice
        .connection
        .send_to(&[bob.address], b"hello bob".to_vec())
        .await
        .unwrap();
    let envelope = next_envelope(&bob.connection).await;
    assert_eq!(envelope.payload, b"hello bob");
    bob.connection.ack(&[envelope.id]).await.unwrap();
}

#[tokio::test]
async fn unacknowledged_envelopes_come_back_on_the_next_connection() {
    let relay = TestRelay::start().await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    alice
        .connection
        .send_to(&[bob.address], b"one".to_vec())
        .await
        .unwrap();
    alice
        .connection
        .send_to(&[bob.address], b"two".to_vec())
        .await
        .unwrap();
    let first = next_envelope(&bob.connection).await;
    bob.connection.ack(&[first.id]).await.unwrap();
    let _second_not_acked = next_envelope(&bob.connection).await;
    drop(bob.connection);

    let again = relay.login(bob.address, &bob.key).await;
    let redelivered = drain(&again).await;
    assert_eq!(redelivered.len(), 1);
    assert_eq!(redelivered[0].payload, b"two");
}

#[tokio::test]
async fn acking_another_devices_envelope_is_refused_and_changes_nothing() {
    let relay = TestRelay::start().await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    let mallory = relay.register().await;
    alice
        .connection
        .send_to(&[bob.address], b"for bob only".to_vec())
        .await
        .unwrap();
    let envelope = next_envelope(&bob.connection).await;

    let refused = mallory.connection.ack(&[envelope.id]).await;
    assert!(
        matches!(
            refused,
            Err(ConnectionError::Refused(ErrorCode::UnknownEnvelope))
        ),
        "{refused:?}"
    );
    // Mallory's connection is still usable, and Bob's envelope is still there.
    mallory
        .connection
        .send_to(&[alice.address], b"still here".to_vec())
        .await
        .unwrap();
    assert_eq!(relay.relay().store_stats().await.unwrap().envelopes, 2);
    drop(bob.connection);
    let bob_again = relay.login(bob.address, &bob.key).await;
    assert_eq!(drain(&bob_again).await[0].payload, b"for bob only");

    // Acking one's own envelope twice is refused the same way.
    bob_again.ack(&[envelope.id]).await.unwrap();
    let twice = bob_again.ack(&[envelope.id]).await;
    assert!(matches!(
        twice,
        Err(ConnectionError::Refused(ErrorCode::UnknownEnvelope))
    ));
}

#[tokio::test]
async fn a_send_with_an_unknown_recipient_stores_nothing() {
    let relay = TestRelay::start().await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    let ghost = DeviceAddress {
        device: DeviceId(9),
        ..bob.address
    };
    let result = alice
        .connection
        .send(vec![
            OutgoingEnvelope {
                recipients: vec![bob.address],
                payload: b"a".to_vec(),
                retract_tag: None,
            },
            OutgoingEnvelope {
                recipients: vec![ghost],
                payload: b"b".to_vec(),
                retract_tag: None,
            },
        ])
        .await;
    assert!(
        matches!(
            result,
            Err(ConnectionError::Refused(ErrorCode::UnknownRecipient))
        ),
        "{result:?}"
    );
    assert_eq!(relay.relay().store_stats().await.unwrap().envelopes, 0);
    assert!(drain(&bob.connection).await.is_empty());
}

#[tokio::test]
async fn one_payload_fans_out_to_many_devices_in_one_commit() {
    let relay = TestRelay::start().await;
    let alice = relay.register().await;
    let mut members = Vec::new();
    for _ in 0..6 {
        members.push(relay.register().await);
    }
    let addresses: Vec<DeviceAddress> = members.iter().map(|m| m.address).collect();
    let (commits_before, _) = relay.relay().commit_counts();
    alice
        .connection
        .send_to(&addresses, b"group ciphertext".to_vec())
        .await
        .unwrap();
    let (commits_after, _) = relay.relay().commit_counts();
    assert_eq!(
        commits_after - commits_before,
        1,
        "a send to many devices is one transaction"
    );
    for member in &members {
        assert_eq!(
            next_envelope(&member.connection).await.payload,
            b"group ciphertext"
        );
    }
}

#[tokio::test]
async fn a_device_has_one_live_connection() {
    let relay = TestRelay::start().await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    let second = relay.login(bob.address, &bob.key).await;
    // The first connection is closed with a code saying why.
    let closed = tokio::time::timeout(hush_tests::WAIT, async {
        loop {
            if let Some(hush_client::Event::Closed(code)) = bob.connection.next_event().await {
                return code;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(closed, Some(ErrorCode::ConnectionReplaced));
    alice
        .connection
        .send_to(&[bob.address], b"to the new one".to_vec())
        .await
        .unwrap();
    assert_eq!(next_envelope(&second).await.payload, b"to the new one");
}

#[tokio::test]
async fn devices_are_limited_per_account_and_removed_devices_stop_receiving() {
    let relay = TestRelay::start_with(|c| c.max_devices_per_account = 3).await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    let bob2 = add_device(&relay, &bob).await;
    let _bob3 = add_device(&relay, &bob).await;
    let fourth = bob
        .connection
        .add_device(DeviceKey::generate().public_key())
        .await;
    assert!(
        matches!(
            fourth,
            Err(ConnectionError::Refused(ErrorCode::DeviceLimitReached))
        ),
        "{fourth:?}"
    );

    alice
        .connection
        .send_to(&[bob2.address], b"queued for bob2".to_vec())
        .await
        .unwrap();
    bob.connection
        .remove_device(bob2.address.device)
        .await
        .unwrap();
    let stats = relay.relay().store_stats().await.unwrap();
    assert_eq!(
        stats.envelopes, 0,
        "the removed device's mailbox went with it"
    );
    // Its live connection is closed at once, not left acting as the device.
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match bob2.connection.next_event().await {
                Some(Event::Closed(code)) => return code,
                None => return None,
                Some(_) => {}
            }
        }
    })
    .await
    .expect("the removed device's connection stayed open");
    assert_eq!(closed, Some(ErrorCode::ConnectionReplaced));
    let to_removed = alice
        .connection
        .send_to(&[bob2.address], b"x".to_vec())
        .await;
    assert!(matches!(
        to_removed,
        Err(ConnectionError::Refused(ErrorCode::UnknownRecipient))
    ));
    let primary = bob.connection.remove_device(DeviceId::PRIMARY).await;
    assert!(matches!(
        primary,
        Err(ConnectionError::Refused(ErrorCode::NotPermitted))
    ));
}

#[tokio::test]
async fn a_device_that_does_not_ack_gets_no_more_than_the_delivery_window() {
    let relay = TestRelay::start_with(|c| c.limits.delivery_window = 4).await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    let (address, key) = (bob.address, bob.key);
    drop(bob.connection);
    for i in 0..10u8 {
        alice.connection.send_to(&[address], vec![i]).await.unwrap();
    }

    let bob = relay.login(address, &key).await;
    let mut first = Vec::new();
    for _ in 0..4 {
        first.push(next_envelope(&bob).await);
    }
    // The window is full: nothing more until Bob acknowledges.
    assert_no_envelope(&bob, Duration::from_millis(300)).await;
    bob.ack(&[first[0].id, first[1].id]).await.unwrap();
    let more = [next_envelope(&bob).await, next_envelope(&bob).await];
    assert_eq!(more.map(|e| e.payload), [vec![4], vec![5]]);
    assert_no_envelope(&bob, Duration::from_millis(300)).await;
    // Acking the same id again frees nothing.
    assert!(bob.ack(&[first[0].id]).await.is_err());
    assert_no_envelope(&bob, Duration::from_millis(300)).await;
}

/// A commit that queues more for a connected device than the relay hands over from memory
/// (one delivery batch, or its byte limit) is read back from the store instead: the device
/// still gets everything once, in order, between envelopes that were handed over.
#[tokio::test]
async fn a_device_that_keeps_up_gets_bursts_past_the_handoff_once_and_in_order() {
    let relay = TestRelay::start().await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    assert!(drain(&bob.connection).await.is_empty());

    let envelope = |payload: Vec<u8>| OutgoingEnvelope {
        recipients: vec![bob.address],
        payload,
        retract_tag: None,
    };
    let mut sent = Vec::new();
    // A single envelope (handed over), a burst of 200 in one commit (more than a batch), a
    // single one, 6 of 60 KiB in one commit (past the byte limit), a single one.
    let sends: Vec<Vec<Vec<u8>>> = vec![
        vec![b"one".to_vec()],
        (0..200)
            .map(|i| format!("burst {i}").into_bytes())
            .collect(),
        vec![b"two".to_vec()],
        (0..6u8).map(|i| vec![i; 60 * 1024]).collect(),
        vec![b"three".to_vec()],
    ];
    for payloads in sends {
        sent.extend(payloads.iter().cloned());
        alice
            .connection
            .send(payloads.into_iter().map(envelope).collect())
            .await
            .unwrap();
    }

    let mut received = Vec::new();
    while received.len() < sent.len() {
        let envelope = next_envelope(&bob.connection).await;
        bob.connection.ack(&[envelope.id]).await.unwrap();
        received.push(envelope);
    }
    let payloads: Vec<&Vec<u8>> = received.iter().map(|e| &e.payload).collect();
    assert_eq!(
        payloads,
        sent.iter().collect::<Vec<_>>(),
        "once each, in order"
    );
    assert!(received.windows(2).all(|w| w[0].id < w[1].id));
    assert_no_envelope(&bob.connection, Duration::from_millis(200)).await;
}
