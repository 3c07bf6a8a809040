//! The provisioning mailbox: a one-shot, in-memory address for linking a new device.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use hush_client::protocol::ErrorCode;
use hush_client::{Connection, ConnectionError, Event};
use hush_tests::{contains, read_tree, refused, TestRelay, WAIT};

async fn provisioning_message(connection: &Connection) -> Vec<u8> {
    tokio::time::timeout(WAIT, async {
        loop {
            match connection.next_event().await {
                Some(Event::Provisioning(payload)) => return payload,
                Some(Event::Closed(code)) => panic!("closed while waiting: {code:?}"),
                None => panic!("connection ended"),
                Some(_) => {}
            }
        }
    })
    .await
    .expect("a provisioning message within the wait")
}

#[tokio::test]
async fn a_provisioning_message_is_pushed_exactly_once() {
    let relay = TestRelay::start().await;
    let primary = relay.register().await;
    let new_device = relay.connect().await;
    let address = new_device.open_provisioning().await.unwrap();
    refused(
        new_device.open_provisioning().await.map(|_| ()),
        ErrorCode::NotPermitted,
    );

    let payload = b"PROVISIONING-CANARY identity key material (encrypted)".to_vec();
    primary
        .connection
        .provision(address, payload.clone())
        .await
        .unwrap();
    assert_eq!(provisioning_message(&new_device).await, payload);

    // One message per address.
    refused(
        primary
            .connection
            .provision(address, b"again".to_vec())
            .await,
        ErrorCode::UnknownProvisioningAddress,
    );
    let nothing_more = tokio::time::timeout(Duration::from_millis(200), async {
        loop {
            if let Some(Event::Provisioning(_)) = new_device.next_event().await {
                return;
            }
        }
    })
    .await;
    assert!(nothing_more.is_err(), "the message came exactly once");

    // Unknown addresses are refused the same way, and nothing reached the disk.
    refused(
        primary.connection.provision([0; 16], b"x".to_vec()).await,
        ErrorCode::UnknownProvisioningAddress,
    );
    let dir = relay.stop().await;
    for (path, bytes) in read_tree(dir.path()) {
        assert!(!contains(&bytes, &payload), "{} holds it", path.display());
        assert!(
            !contains(&bytes, &address),
            "{} holds the address",
            path.display()
        );
    }
}

#[tokio::test]
async fn an_address_is_gone_when_its_connection_closes_or_expires() {
    let relay = TestRelay::start().await;
    let primary = relay.register().await;

    let waiting = relay.connect().await;
    let address = waiting.open_provisioning().await.unwrap();
    assert_eq!(relay.relay().open_provisioning_addresses(), 1);
    waiting.close();
    drop(waiting);
    // The relay notices the close asynchronously; the address goes with the connection.
    let deadline = tokio::time::Instant::now() + WAIT;
    while relay.relay().open_provisioning_addresses() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "address still open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    refused(
        primary
            .connection
            .provision(address, b"late".to_vec())
            .await,
        ErrorCode::UnknownProvisioningAddress,
    );

    // Ten minutes later an address is gone too.
    let waiting = relay.connect().await;
    let address = waiting.open_provisioning().await.unwrap();
    relay.clock.advance(10 * 60);
    refused(
        primary
            .connection
            .provision(address, b"too late".to_vec())
            .await,
        ErrorCode::UnknownProvisioningAddress,
    );
}

#[tokio::test]
async fn provisioning_needs_an_authenticated_sender_and_an_anonymous_receiver() {
    let relay = TestRelay::start().await;
    let primary = relay.register().await;
    let waiting = relay.connect().await;
    let address = waiting.open_provisioning().await.unwrap();

    // An authenticated connection cannot open one.
    refused(
        primary.connection.open_provisioning().await.map(|_| ()),
        ErrorCode::AlreadyAuthenticated,
    );

    // An unauthenticated connection cannot provision: the relay closes it.
    let anonymous = relay.connect().await;
    match anonymous.provision(address, b"spoof".to_vec()).await {
        Err(ConnectionError::Closed(code)) => assert_eq!(code, Some(ErrorCode::NotAuthenticated)),
        other => panic!("expected the connection to close, got {other:?}"),
    }
    // The address is still open for the real sender.
    primary
        .connection
        .provision(address, b"real".to_vec())
        .await
        .unwrap();
    assert_eq!(provisioning_message(&waiting).await, b"real");
}
