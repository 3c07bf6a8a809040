//! Calls between full clients over the real relay: end-to-end signaling, ringing on every
//! device, answering on one, encrypted media through the relay, and the ways a call ends.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use hush_client::protocol::AccountId;
use hush_client::{CallEndReason, CallId, Client, ClientEvent, Settings};
use hush_tests::users::{link, next, User};
use hush_tests::{TestRelay, WAIT};

/// The next call event, skipping messages, receipts and typing.
async fn next_call(client: &Client) -> ClientEvent {
    loop {
        let event = next(client).await;
        if matches!(
            event,
            ClientEvent::IncomingCall { .. }
                | ClientEvent::CallAnswered { .. }
                | ClientEvent::CallEnded { .. }
        ) {
            return event;
        }
    }
}

async fn incoming(client: &Client) -> CallId {
    match next_call(client).await {
        ClientEvent::IncomingCall { call_id, .. } => call_id,
        other => panic!("expected an incoming call, got {other:?}"),
    }
}

async fn ended(client: &Client) -> (CallId, CallEndReason) {
    match next_call(client).await {
        ClientEvent::CallEnded { call_id, reason } => (call_id, reason),
        other => panic!("expected the call to end, got {other:?}"),
    }
}

/// Each a contact of the other: (alice's account, bob's account).
async fn acquainted(alice: &Client, bob: &Client) -> (AccountId, AccountId) {
    let bob_account = alice.add_contact(&bob.contact_card().await).await.unwrap();
    let alice_account = bob.add_contact(&alice.contact_card().await).await.unwrap();
    (alice_account, bob_account)
}

#[tokio::test]
async fn a_call_rings_every_device_is_answered_on_one_and_carries_media_both_ways() {
    let relay = TestRelay::start().await;
    let users: Vec<User> = (40..43).map(User::new).collect();
    let alice = users[0].create(&relay).await;
    let bob1 = users[1].create(&relay).await;
    let bob2 = link(&relay, &bob1, &users[2]).await;
    let (alice_account, bob_account) = acquainted(&alice, &bob1).await;

    let call = alice.start_call(bob_account, false).await.unwrap();
    assert_eq!(incoming(&bob1).await, call);
    assert_eq!(incoming(&bob2).await, call);
    bob2.answer_call(call).await.unwrap();
    match next_call(&alice).await {
        ClientEvent::CallAnswered { call_id } => assert_eq!(call_id, call),
        other => panic!("expected the answer, got {other:?}"),
    }
    assert_eq!(ended(&bob1).await, (call, CallEndReason::AnsweredElsewhere));

    let mut alice_media = alice.take_media(call).expect("caller media");
    let mut bob_media = bob2.take_media(call).expect("callee media");
    assert!(alice.take_media(call).is_none(), "media is handed out once");
    // Both move to the relay's UDP media port once it answers their bindings (the first
    // frames would go as QUIC datagrams otherwise, and could overtake each other at the
    // switch).
    for media in [&alice_media, &bob_media] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !media.on_udp_port() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(media.on_udp_port(), "the media port never answered");
    }
    const FRAMES: u32 = 1_000;
    let mut received: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
    let collect = |media: &mut hush_client::CallMedia, direction: u8, into: &mut Vec<u32>| {
        while let Some(frame) = media.try_recv() {
            assert_eq!(frame.len(), 160);
            assert_eq!(frame[4], direction, "frames come from the other side only");
            into.push(u32::from_be_bytes(frame[..4].try_into().unwrap()));
        }
    };
    for i in 0..FRAMES {
        let mut frame = vec![0u8; 160];
        frame[..4].copy_from_slice(&i.to_be_bytes());
        alice_media.send(&frame).unwrap();
        frame[4] = 1;
        bob_media.send(&frame).unwrap();
        // 20 ms of audio per frame, sent ten times faster.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let [to_bob, to_alice] = &mut received;
        collect(&mut bob_media, 0, to_bob);
        collect(&mut alice_media, 1, to_alice);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let [to_bob, to_alice] = &mut received;
    collect(&mut bob_media, 0, to_bob);
    collect(&mut alice_media, 1, to_alice);
    for frames in &received {
        assert!(
            frames.windows(2).all(|w| w[0] < w[1]),
            "in order, each once"
        );
        // Datagrams may be lost even on loopback, but not many.
        assert!(
            frames.len() as u32 * 100 >= FRAMES * 99,
            "only {} of {FRAMES} frames",
            frames.len()
        );
    }

    bob2.hang_up(call).await.unwrap();
    assert_eq!(ended(&alice).await, (call, CallEndReason::HungUp));
    assert!(
        alice_media.recv().await.is_none(),
        "media ends with the call"
    );
    let _ = alice_account;
}

#[tokio::test]
async fn declined_busy_and_unanswered_calls_end_for_the_caller() {
    let relay = TestRelay::start().await;
    let users: Vec<User> = (44..47).map(User::new).collect();
    let alice = users[0].create(&relay).await;
    let bob = users[1].create(&relay).await;
    let carol = users[2].create(&relay).await;
    let (_, bob_account) = acquainted(&alice, &bob).await;
    let (_, bob_account_for_carol) = acquainted(&carol, &bob).await;

    // Declined.
    let call = alice.start_call(bob_account, false).await.unwrap();
    assert_eq!(incoming(&bob).await, call);
    bob.reject_call(call).await.unwrap();
    assert_eq!(ended(&alice).await, (call, CallEndReason::Rejected));

    // Busy: Bob is on a call with Carol.
    let with_carol = carol
        .start_call(bob_account_for_carol, false)
        .await
        .unwrap();
    assert_eq!(incoming(&bob).await, with_carol);
    bob.answer_call(with_carol).await.unwrap();
    let call = alice.start_call(bob_account, true).await.unwrap();
    assert_eq!(ended(&alice).await, (call, CallEndReason::Busy));
    carol.hang_up(with_carol).await.unwrap();
    assert_eq!(ended(&bob).await, (with_carol, CallEndReason::HungUp));

    // Nobody answers within the ring timeout.
    alice
        .set_settings(Settings {
            ring_timeout_secs: 1,
            ..Settings::default()
        })
        .await
        .unwrap();
    let call = alice.start_call(bob_account, false).await.unwrap();
    assert_eq!(incoming(&bob).await, call);
    assert_eq!(ended(&alice).await, (call, CallEndReason::NoAnswer));
    assert_eq!(ended(&bob).await, (call, CallEndReason::Cancelled));
    assert!(matches!(
        bob.answer_call(call).await,
        Err(hush_client::ClientError::NoSuchCall)
    ));

    // One record per call, with the outcome each ended with.
    let alice_account = alice.address().await.account;
    let deadline = tokio::time::Instant::now() + WAIT;
    let outcomes = loop {
        let mut outcomes: Vec<String> = relay
            .relay()
            .call_records_of(alice_account)
            .await
            .unwrap()
            .iter()
            .map(|r| format!("{:?}", r.outcome))
            .collect();
        outcomes.sort();
        if outcomes.len() == 3 || tokio::time::Instant::now() > deadline {
            break outcomes;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(outcomes, ["Busy", "Missed", "Rejected"]);
}
