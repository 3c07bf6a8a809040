//! P4: an envelope the relay acknowledged survives a restart, graceful or kill -9.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_client::protocol::ErrorCode;
use hush_client::{Connection, DeviceKey, Event};
use hush_tests::{drain, relay_binary, ChildRelay, TestRelay, WAIT};

#[tokio::test]
async fn graceful_restart_keeps_acknowledged_envelopes() {
    let mut relay = TestRelay::start().await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    drop(bob.connection);
    alice
        .connection
        .send_to(&[bob.address], b"before restart".to_vec())
        .await
        .unwrap();
    let fingerprint = relay.relay().fingerprint();
    relay.restart().await;
    assert_eq!(
        relay.relay().fingerprint(),
        fingerprint,
        "the self-signed certificate is reused"
    );
    let bob_connection = relay.login(bob.address, &bob.key).await;
    assert_eq!(drain(&bob_connection).await[0].payload, b"before restart");
}

#[tokio::test]
async fn kill_minus_nine_after_the_ack_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let child = ChildRelay::spawn(relay_binary!(), dir.path(), None, "warn");
    let fingerprint = child.fingerprint;
    let alice_key = DeviceKey::generate();
    let bob_key = DeviceKey::generate();
    let alice = Connection::connect(&child.options()).await.unwrap();
    alice.register(b"alice", &alice_key, None).await.unwrap();
    let bob = Connection::connect(&child.options()).await.unwrap();
    let bob_address = bob.register(b"bob", &bob_key, None).await.unwrap();
    drop(bob);
    let mut sent = Vec::new();
    for i in 0..50u32 {
        let payload = format!("acknowledged message {i}").into_bytes();
        alice
            .send_to(&[bob_address], payload.clone())
            .await
            .unwrap();
        sent.push(payload);
    }
    // Every send above returned, so the relay acknowledged it: now pull the plug.
    child.kill();

    let child = ChildRelay::spawn(relay_binary!(), dir.path(), None, "warn");
    assert_eq!(child.fingerprint, fingerprint);
    let bob = Connection::connect(&child.options()).await.unwrap();
    bob.authenticate(bob_address, &bob_key).await.unwrap();
    let received: Vec<Vec<u8>> = drain(&bob).await.into_iter().map(|e| e.payload).collect();
    assert_eq!(received, sent);
}

#[tokio::test]
async fn sigterm_closes_connections_with_a_code_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let child = ChildRelay::spawn(relay_binary!(), dir.path(), None, "warn");
    let key = DeviceKey::generate();
    let connection = Connection::connect(&child.options()).await.unwrap();
    connection.register(b"identity", &key, None).await.unwrap();
    let status = tokio::task::spawn_blocking(move || child.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(Event::Closed(code)) = connection.next_event().await {
                return code;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(closed, Some(ErrorCode::ShuttingDown));
}
