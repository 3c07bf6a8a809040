//! The client reads time from its `Clock`: what it times is tested by moving a clock, not
//! by waiting.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_client::{Client, ClientEvent, Clock, ManualClock, SystemClock};
use hush_tests::users::{next_message, User};
use hush_tests::TestRelay;

#[tokio::test]
async fn a_disappearing_message_is_timed_from_its_arrival_by_the_receivers_clock() {
    let relay = TestRelay::start().await;
    let (alice_user, bob_user) = (User::new(30), User::new(31));
    let now = SystemClock.now();
    let (alice_clock, bob_clock) = (ManualClock::new(now), ManualClock::new(now + 5_000));
    let mut config = alice_user.config(&relay);
    config.clock = alice_clock.clone();
    let alice = Client::create(config, None).await.unwrap();
    let mut config = bob_user.config(&relay);
    config.clock = bob_clock.clone();
    let bob = Client::create(config, None).await.unwrap();
    let bob_account = alice.add_contact(&bob.contact_card().await).await.unwrap();
    let alice_account = alice.address().await.account;

    alice.set_timer(bob_account, Some(60)).await.unwrap();
    assert!(matches!(
        next_message(&bob).await,
        ClientEvent::TimerChanged { .. }
    ));
    alice_clock.advance(7);
    bob_clock.advance(3);
    alice
        .send_text(bob_account, "gone in a minute")
        .await
        .unwrap();
    let ClientEvent::Message { message, .. } = next_message(&bob).await else {
        panic!("expected a message")
    };
    // Sent at the sender's time; disappearing from when it arrived, by the receiver's.
    assert_eq!(message.sent_at, now + 7);
    assert_eq!(message.expires_at, Some(now + 5_003 + 60));

    bob_clock.advance(59);
    assert_eq!(bob.purge_expired(bob_clock.now()).await.unwrap(), 0);
    bob_clock.advance(1);
    assert_eq!(bob.purge_expired(bob_clock.now()).await.unwrap(), 1);
    assert!(bob.messages(alice_account).await.unwrap().is_empty());
}
