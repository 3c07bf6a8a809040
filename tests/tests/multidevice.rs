//! Multi-device end to end: device linking through a provisioning code, messages to every
//! device of the recipient and copies to the sender's own devices, devices going on and
//! offline, and a removed device that stops receiving.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use hush_client::{Client, ClientEvent, StoredMessage};
use hush_tests::users::{link, next_message, scan, text, User};
use hush_tests::TestRelay;

async fn sent_elsewhere(client: &Client) -> StoredMessage {
    match next_message(client).await {
        ClientEvent::SentElsewhere { message } => message,
        other => panic!("expected a copy of our own message, got {other:?}"),
    }
}

/// No message event (receipts aside) for a while.
async fn quiet(client: &Client) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, client.next_event()).await {
        assert!(
            matches!(event, ClientEvent::Receipt { .. }),
            "unexpected {event:?}"
        );
    }
}

#[tokio::test]
async fn two_devices_each_exchange_sealed_messages_while_going_on_and_offline() {
    let relay = TestRelay::start().await;
    let users: Vec<User> = (20..24).map(User::new).collect();
    let (alice1_user, alice2_user, bob1_user, bob2_user) =
        (&users[0], &users[1], &users[2], &users[3]);
    let alice1 = alice1_user.create(&relay).await;
    let bob1 = bob1_user.create(&relay).await;
    let bob_account = alice1
        .add_contact(&bob1.contact_card().await)
        .await
        .unwrap();
    let alice_account = alice1.address().await.account;
    let bob2 = link(&relay, &bob1, bob2_user).await;
    // Alice's second device learns her contacts while linking.
    let alice2 = link(&relay, &alice1, alice2_user).await;

    // To both of Bob's devices, and a copy to Alice's other device.
    alice1.send_text(bob_account, "one").await.unwrap();
    assert_eq!(text(&next_message(&bob1).await).0, "one");
    assert_eq!(text(&next_message(&bob2).await).0, "one");
    let copy = sent_elsewhere(&alice2).await;
    assert_eq!(copy.conversation, bob_account);
    assert!(copy.outgoing);

    // Bob's second device goes offline; Alice's second device writes.
    bob2.shutdown().await;
    let canary = "two, while bob2 sleeps";
    alice2.send_text(bob_account, canary).await.unwrap();
    assert_eq!(text(&next_message(&bob1).await).0, canary);
    assert_eq!(sent_elsewhere(&alice1).await.body, copy_body(canary));
    scan(
        relay.data_dir(),
        &[
            ("plaintext", canary.as_bytes().to_vec()),
            ("sender account", alice_account.0.to_vec()),
        ],
    );
    let bob2 = bob2_user.open(&relay).await;
    assert_eq!(text(&next_message(&bob2).await).0, canary);

    // Bob answers from his second device: both of Alice's devices get it, Bob's first
    // device gets the copy.
    bob2.send_text(alice_account, "three").await.unwrap();
    assert_eq!(text(&next_message(&alice1).await).0, "three");
    assert_eq!(text(&next_message(&alice2).await).0, "three");
    assert_eq!(sent_elsewhere(&bob1).await.body, copy_body("three"));

    // Bob removes his second device: it stops receiving, and Alice's next send notices the
    // changed device list and goes to Bob's first device only.
    let bob2_device = bob2.address().await.device;
    bob2.shutdown().await;
    bob1.remove_device(bob2_device).await.unwrap();
    alice1.send_text(bob_account, "four").await.unwrap();
    assert_eq!(text(&next_message(&bob1).await).0, "four");
    assert!(
        hush_client::Client::open(bob2_user.config(&relay))
            .await
            .is_err(),
        "a removed device can no longer authenticate"
    );
    assert_eq!(sent_elsewhere(&alice2).await.body, copy_body("four"));
    quiet(&bob1).await;
}

/// A message a device sent just before it was removed still opens, even when the recipient
/// first sends to that account, hears that the device list changed and stops sending to
/// the removed device. (Alice's second device once hit this: her delivery receipt to Bob
/// learned of the removal while Bob's removed device's last receipt waited to be read.)
#[tokio::test]
async fn a_removed_devices_last_message_opens_after_a_send_learned_of_the_removal() {
    let relay = TestRelay::start().await;
    let users: Vec<User> = (30..33).map(User::new).collect();
    let (alice_user, bob1_user, bob2_user) = (&users[0], &users[1], &users[2]);
    let alice = alice_user.create(&relay).await;
    let bob1 = bob1_user.create(&relay).await;
    let bob_account = alice.add_contact(&bob1.contact_card().await).await.unwrap();
    let alice_account = alice.address().await.account;
    let bob2 = link(&relay, &bob1, bob2_user).await;
    let bob2_device = bob2.address().await.device;
    alice.send_text(bob_account, "hello").await.unwrap();
    assert_eq!(text(&next_message(&bob1).await).0, "hello");
    assert_eq!(text(&next_message(&bob2).await).0, "hello");

    // While Alice is offline, Bob's second device answers on the session Alice started,
    // and is then removed.
    alice.shutdown().await;
    bob2.send_text(alice_account, "last words").await.unwrap();
    bob2.shutdown().await;
    bob1.remove_device(bob2_device).await.unwrap();

    // Alice writes before she has read what waited for her (on this single-threaded
    // runtime the send holds her state until it is done, so the receive loop waits): the
    // relay refuses the old device list, and the message goes to Bob's first device only.
    let alice = alice_user.open(&relay).await;
    alice.send_text(bob_account, "welcome back").await.unwrap();
    loop {
        match next_message(&bob1).await {
            // The removed device's copy of its last message, if it got out in time.
            ClientEvent::SentElsewhere { .. } => {}
            other => {
                assert_eq!(text(&other).0, "welcome back");
                break;
            }
        }
    }
    match next_message(&alice).await {
        ClientEvent::Message {
            device, message, ..
        } => {
            assert_eq!(device, bob2_device);
            assert_eq!(message.body, copy_body("last words"));
        }
        other => panic!("expected the removed device's last message, got {other:?}"),
    }
    quiet(&alice).await;
}

fn copy_body(text: &str) -> hush_client::Body {
    hush_client::Body::Text { text: text.into() }
}
