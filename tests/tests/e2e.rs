//! End-to-end encryption over a real relay: full clients (PQXDH, Double Ratchet, sealed
//! sender, encrypted local stores) talking through QUIC on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_client::{ClientError, ClientEvent, ReceiptKind, Settings};
use hush_tests::users::{next, next_message, scan, text, User};
use hush_tests::TestRelay;

#[tokio::test]
async fn alice_and_bob_talk_sealed_and_the_relay_sees_no_plaintext_or_sender() {
    let relay = TestRelay::start().await;
    let (alice_user, bob_user) = (User::new(1), User::new(2));
    let alice = alice_user.create(&relay).await;
    let bob = bob_user.create(&relay).await;
    let bob_account = alice.add_contact(&bob.contact_card().await).await.unwrap();
    let alice_account = alice.address().await.account;
    bob.shutdown().await;

    // Bob is offline: the message waits on the relay, sealed.
    let canary = "the canary sings at midnight";
    alice.send_text(bob_account, canary).await.unwrap();
    scan(
        relay.data_dir(),
        &[
            ("plaintext", canary.as_bytes().to_vec()),
            ("sender account", alice_account.0.to_vec()),
            ("sender account (hex)", alice_account.to_hex().into_bytes()),
        ],
    );

    let bob = bob_user.open(&relay).await;
    let event = next_message(&bob).await;
    assert_eq!(text(&event).0, canary);
    let ClientEvent::Message { from, .. } = &event else {
        unreachable!()
    };
    assert_eq!(*from, alice_account);
    // Alice gets Bob's delivery receipt.
    let (_, id) = text(&event);
    match next(&alice).await {
        ClientEvent::Receipt { from, kind, ids } => {
            assert_eq!(from, bob_account);
            assert_eq!(kind, ReceiptKind::Delivered);
            assert_eq!(ids, vec![id]);
        }
        other => panic!("expected a receipt, got {other:?}"),
    }

    // Bob learned Alice's profile key from her message and answers, sealed.
    bob.send_text(alice_account, "hello alice").await.unwrap();
    assert_eq!(text(&next_message(&alice).await).0, "hello alice");
    for i in 0..5 {
        alice
            .send_text(bob_account, &format!("ping {i}"))
            .await
            .unwrap();
        assert_eq!(text(&next_message(&bob).await).0, format!("ping {i}"));
        bob.send_text(alice_account, &format!("pong {i}"))
            .await
            .unwrap();
        assert_eq!(text(&next_message(&alice).await).0, format!("pong {i}"));
    }

    // Both sides see the same safety number.
    let at_alice = alice.safety_number(bob_account).await.unwrap();
    let at_bob = bob.safety_number(alice_account).await.unwrap();
    assert_eq!(at_alice.displayable(), at_bob.displayable());
    assert!(at_alice.matches_qr(&at_bob.qr_payload()).unwrap());

    // The message history is kept, encrypted, in each local store.
    let history = bob.messages(alice_account).await.unwrap();
    assert_eq!(
        history.len(),
        12,
        "the canary, one hello, five pings and five pongs"
    );
    scan(
        bob_user.dir.path(),
        &[
            ("plaintext", canary.as_bytes().to_vec()),
            ("contact account", alice_account.0.to_vec()),
        ],
    );
}

#[tokio::test]
async fn delete_for_everyone_removes_an_undelivered_message_from_the_relay() {
    let relay = TestRelay::start().await;
    let (alice_user, bob_user) = (User::new(3), User::new(4));
    let alice = alice_user.create(&relay).await;
    let bob = bob_user.create(&relay).await;
    let bob_account = alice.add_contact(&bob.contact_card().await).await.unwrap();
    bob.shutdown().await;

    let regret = alice
        .send_text(bob_account, "I should not have said this")
        .await
        .unwrap();
    assert_eq!(
        alice
            .delete_for_everyone(bob_account, regret)
            .await
            .unwrap(),
        1
    );
    alice.send_text(bob_account, "never mind").await.unwrap();

    let bob = bob_user.open(&relay).await;
    match next_message(&bob).await {
        ClientEvent::Deleted { id, .. } => assert_eq!(id, regret),
        other => panic!("expected the delete control message, got {other:?}"),
    }
    assert_eq!(text(&next_message(&bob).await).0, "never mind");
    let history = bob.messages(alice.address().await.account).await.unwrap();
    assert_eq!(history.len(), 1);
}

#[tokio::test]
async fn receipts_and_typing_are_the_users_choice() {
    let relay = TestRelay::start().await;
    let (alice_user, bob_user) = (User::new(5), User::new(6));
    let alice = alice_user.create(&relay).await;
    let bob = bob_user.create(&relay).await;
    let bob_account = alice.add_contact(&bob.contact_card().await).await.unwrap();
    let alice_account = alice.address().await.account;
    bob.set_settings(Settings {
        delivery_receipts: false,
        read_receipts: false,
        typing_indicators: false,
        ..Settings::default()
    })
    .await
    .unwrap();

    let first = alice.send_text(bob_account, "receipts?").await.unwrap();
    let (_, id) = text(&next_message(&bob).await);
    assert_eq!(id, first);
    bob.mark_read(alice_account, vec![id]).await.unwrap();
    bob.typing(alice_account, true).await.unwrap();
    // Bob now writes for real; the first thing Alice sees is that message, no receipt or
    // typing indicator before it.
    bob.send_text(alice_account, "no receipts here")
        .await
        .unwrap();
    assert_eq!(text(&next(&alice).await).0, "no receipts here");

    // Alice's side sends them; Bob sees them. (Alice's delivery receipt for Bob's message
    // may come first: it leaves after a random delay of up to a second.)
    alice.typing(bob_account, true).await.unwrap();
    let typing = loop {
        match next(&bob).await {
            ClientEvent::Receipt { .. } => {}
            other => break other,
        }
    };
    assert_eq!(
        typing,
        ClientEvent::Typing {
            from: alice_account,
            started: true
        }
    );
}

#[tokio::test]
async fn a_wrong_profile_key_is_refused_by_the_relay() {
    let relay = TestRelay::start().await;
    let (alice_user, bob_user) = (User::new(7), User::new(8));
    let alice = alice_user.create(&relay).await;
    let bob = bob_user.create(&relay).await;
    let card = bob.contact_card().await;
    // Same account, another profile key: the delivery token is wrong.
    let forged = format!("{}{}", &card[..card.len() - 64], "00".repeat(32));
    let bob_account = alice.add_contact(&forged).await.unwrap();
    let error = alice.send_text(bob_account, "let me in").await.unwrap_err();
    assert!(matches!(error, ClientError::NotAccepted), "{error:?}");
    assert!(matches!(
        alice.add_contact("hush-contact:1:zz").await,
        Err(ClientError::InvalidCode(_))
    ));
}

#[tokio::test]
async fn disappearing_messages_are_purged_when_their_timer_runs_out() {
    let relay = TestRelay::start().await;
    let (alice_user, bob_user) = (User::new(9), User::new(10));
    let alice = alice_user.create(&relay).await;
    let bob = bob_user.create(&relay).await;
    let bob_account = alice.add_contact(&bob.contact_card().await).await.unwrap();
    let alice_account = alice.address().await.account;
    alice.set_timer(bob_account, Some(60)).await.unwrap();
    assert_eq!(
        next_message(&bob).await,
        ClientEvent::TimerChanged {
            from: alice_account,
            expires_in: Some(60)
        }
    );
    alice
        .send_text(bob_account, "gone in a minute")
        .await
        .unwrap();
    let ClientEvent::Message { message, .. } = next_message(&bob).await else {
        panic!("expected a message")
    };
    let expires_at = message.expires_at.expect("a disappearing message");
    assert_eq!(bob.purge_expired(expires_at - 1).await.unwrap(), 0);
    assert_eq!(bob.purge_expired(expires_at).await.unwrap(), 1);
    assert!(bob.messages(alice_account).await.unwrap().is_empty());
    assert_eq!(alice.purge_expired(expires_at + 60).await.unwrap(), 1);
}

#[tokio::test]
async fn a_message_the_relay_did_not_take_is_sent_when_the_client_opens_again() {
    let mut relay = TestRelay::start().await;
    let (alice_user, bob_user) = (User::new(11), User::new(12));
    let alice = alice_user.create(&relay).await;
    let bob = bob_user.create(&relay).await;
    let bob_account = alice.add_contact(&bob.contact_card().await).await.unwrap();
    bob.shutdown().await;

    // The relay goes away under Alice: the send fails, the message stays queued.
    relay.restart().await;
    let error = alice.send_text(bob_account, "queued").await.unwrap_err();
    assert!(matches!(error, ClientError::Connection(_)), "{error:?}");
    alice.shutdown().await;

    let alice = alice_user.open(&relay).await;
    let bob = bob_user.open(&relay).await;
    assert_eq!(text(&next_message(&bob).await).0, "queued");
    assert_eq!(
        alice.retry_pending().await.unwrap(),
        0,
        "nothing left to send"
    );
    let history = alice.messages(bob_account).await.unwrap();
    assert_eq!(history.len(), 1);
}

#[tokio::test]
async fn garbage_from_an_unknown_sender_is_reported_and_changes_nothing() {
    let relay = TestRelay::start().await;
    let (alice_user, bob_user) = (User::new(13), User::new(14));
    let alice = alice_user.create(&relay).await;
    let bob = bob_user.create(&relay).await;
    bob.set_settings(Settings {
        allow_unknown_senders: true,
        ..Settings::default()
    })
    .await
    .unwrap();
    let bob_address = bob.address().await;
    let bob_account = alice.add_contact(&bob.contact_card().await).await.unwrap();
    alice.send_text(bob_account, "before").await.unwrap();
    assert_eq!(text(&next_message(&bob).await).0, "before");

    // Anyone may now send Bob sealed envelopes; these are not from anyone.
    let stranger = relay.connect().await;
    for payload in [vec![], vec![1], vec![0x01; 200], vec![0x02; 2000]] {
        stranger
            .sealed_send(vec![hush_client::protocol::sealed::SealedEnvelope {
                account: bob_address.account,
                devices: vec![bob_address.device],
                access: None,
                retract_tag: None,
                payload,
            }])
            .await
            .unwrap();
        assert!(matches!(
            next_message(&bob).await,
            ClientEvent::Undecryptable { .. }
        ));
    }
    // Bob's session with Alice is untouched.
    alice.send_text(bob_account, "after").await.unwrap();
    assert_eq!(text(&next_message(&bob).await).0, "after");
    bob.send_text(alice.address().await.account, "still here")
        .await
        .unwrap();
    assert_eq!(text(&next_message(&alice).await).0, "still here");
}

#[tokio::test]
async fn a_client_running_low_on_one_time_prekeys_uploads_more() {
    let relay = TestRelay::start().await;
    let bob_user = User::new(15);
    let bob = bob_user.create(&relay).await;
    let bob_account = bob.address().await.account;
    let fetcher = relay.register().await;
    // The client uploads 100; the relay warns it at 10 left.
    for _ in 0..95 {
        let bundles = fetcher
            .connection
            .fetch_prekeys(bob_account, None)
            .await
            .unwrap();
        assert!(bundles.devices[0].one_time.is_some());
    }
    // Bob's client answers the warning with a fresh batch: one-time keys never run out.
    let deadline = tokio::time::Instant::now() + hush_tests::WAIT;
    let mut fetched = 0;
    while fetched < 20 {
        let bundles = fetcher
            .connection
            .fetch_prekeys(bob_account, None)
            .await
            .unwrap();
        if bundles.devices[0].one_time.is_some() {
            fetched += 1;
        } else {
            assert!(tokio::time::Instant::now() < deadline, "no new prekeys");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn a_contact_cannot_delete_our_own_messages() {
    let relay = TestRelay::start().await;
    let (alice_user, bob_user) = (User::new(16), User::new(17));
    let alice = alice_user.create(&relay).await;
    let bob = bob_user.create(&relay).await;
    let bob_account = alice.add_contact(&bob.contact_card().await).await.unwrap();
    let alice_account = alice.address().await.account;
    let mine = alice.send_text(bob_account, "mine to keep").await.unwrap();
    assert_eq!(text(&next_message(&bob).await).1, mine);

    // Bob asks Alice's client to delete Alice's own message: ignored.
    bob.send(alice_account, hush_client::Body::Delete { target: mine })
        .await
        .unwrap();
    bob.send_text(alice_account, "marker").await.unwrap();
    assert_eq!(text(&next_message(&alice).await).0, "marker");
    let history = alice.messages(bob_account).await.unwrap();
    assert!(history.iter().any(|m| m.id == mine && m.outgoing));
}
