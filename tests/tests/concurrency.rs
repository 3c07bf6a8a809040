//! A client does not wait on itself: what one contact's send waits for (the relay, the
//! disk) does not hold up what arrives from another. Shown by the order of events: the
//! relay's answers to one connection are held back, not timed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_client::{ConnectOptions, Trust};
use hush_tests::proxy::UdpProxy;
use hush_tests::users::{next_message, text, User};
use hush_tests::{TestRelay, WAIT};

#[tokio::test]
async fn a_send_the_relay_is_slow_to_answer_does_not_hold_up_a_message_from_another_contact() {
    let relay = TestRelay::start().await;
    let proxy = UdpProxy::start(relay.relay().local_addr()).await;
    let through_proxy =
        ConnectOptions::new(proxy.addr(), Trust::Pinned(relay.relay().fingerprint()));
    let (alice_user, bob_user, carol_user) = (User::new(1), User::new(2), User::new(3));
    // Alice's two connections go through the proxy: first the authenticated one that
    // receives, then the anonymous one her sealed sends take.
    let alice = hush_client::Client::create(alice_user.config_with(through_proxy), None)
        .await
        .unwrap();
    let bob = bob_user.create(&relay).await;
    let carol = carol_user.create(&relay).await;
    let alice_account = alice.address().await.account;
    alice.add_contact(&bob.contact_card().await).await.unwrap();
    let carol_account = alice
        .add_contact(&carol.contact_card().await)
        .await
        .unwrap();
    bob.add_contact(&alice.contact_card().await).await.unwrap();
    // Sessions with both exist before the test proper.
    alice.send_text(carol_account, "hello carol").await.unwrap();
    assert_eq!(text(&next_message(&carol).await).0, "hello carol");
    bob.send_text(alice_account, "hello alice").await.unwrap();
    assert_eq!(text(&next_message(&alice).await).0, "hello alice");

    // The relay's answers to Alice's sealed sends stop arriving.
    proxy.hold(1);
    let alice = std::sync::Arc::new(alice);
    let sending = {
        let alice = alice.clone();
        tokio::spawn(async move { alice.send_text(carol_account, "are you there").await })
    };
    // The send has gone out and waits for the relay.
    proxy.wait_for_dropped().await;
    assert!(!sending.is_finished(), "the held send completed");

    bob.send_text(alice_account, "while you wait")
        .await
        .unwrap();
    let event = next_message(&alice).await;
    assert_eq!(text(&event).0, "while you wait");
    assert!(
        !sending.is_finished(),
        "the incoming message was decrypted only after the send returned"
    );

    proxy.release();
    tokio::time::timeout(WAIT * 3, sending)
        .await
        .expect("the send completes once the relay answers")
        .unwrap()
        .unwrap();
    assert_eq!(text(&next_message(&carol).await).0, "are you there");
}
