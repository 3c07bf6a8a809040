//! A full disk refuses sends with a typed error, costs nothing already acknowledged, and
//! passes: once space returns, sends succeed again without a restart. The relay child's
//! file-size limit (RLIMIT_FSIZE) stands in for the full disk: a write that would grow
//! the database fails with EFBIG (the relay catches SIGXFSZ, which would kill it), as a
//! full disk fails it with ENOSPC.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_client::protocol::ErrorCode;
use hush_client::{Connection, ConnectionError, DeviceKey};
use hush_tests::{drain_acking, relay_binary, ChildRelay};
use rustix::process::{prlimit, Pid, Resource, Rlimit};

/// Envelopes as large as the protocol allows fill the file fastest.
const LARGE: usize = 60 * 1024;
/// Sends tried before the limit must have been hit (the database grows in steps far
/// smaller than this many envelopes).
const MOST_SENDS_TO_FILL: usize = 2000;

fn payload(label: &str, number: usize, len: usize) -> Vec<u8> {
    let mut payload = format!("{label} {number}:").into_bytes();
    payload.resize(len, b'.');
    payload
}

/// Sets the child's file-size limit (soft; the hard limit stays unlimited, so the test
/// needs no privilege to raise it again).
fn limit_file_size(relay: &ChildRelay, bytes: Option<u64>) {
    let pid = Pid::from_raw(i32::try_from(relay.pid()).unwrap()).unwrap();
    prlimit(
        Some(pid),
        Resource::Fsize,
        Rlimit {
            current: bytes,
            maximum: None,
        },
    )
    .unwrap();
}

#[tokio::test]
async fn a_full_disk_refuses_sends_with_a_typed_error_and_recovers_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let log = dir.path().join("relay.log");
    let mut relay = ChildRelay::spawn(relay_binary!(), &data_dir, Some(&log), "warn");
    let alice_key = DeviceKey::generate();
    let bob_key = DeviceKey::generate();
    let alice = Connection::connect(&relay.options()).await.unwrap();
    alice.register(b"alice", &alice_key, None).await.unwrap();
    let bob = Connection::connect(&relay.options()).await.unwrap();
    let bob_address = bob.register(b"bob", &bob_key, None).await.unwrap();
    drop(bob);

    let mut acknowledged = Vec::new();
    for number in 0..10 {
        let message = payload("before", number, 100);
        alice
            .send_to(&[bob_address], message.clone())
            .await
            .unwrap();
        acknowledged.push(message);
    }

    // The disk is full: the database file may not grow past its present size.
    let size = std::fs::metadata(data_dir.join("relay.redb"))
        .unwrap()
        .len();
    limit_file_size(&relay, Some(size));
    let before_the_limit = acknowledged.len();
    let mut refusal = None;
    for number in 0..MOST_SENDS_TO_FILL {
        let message = payload("filling", number, LARGE);
        match alice.send_to(&[bob_address], message.clone()).await {
            Ok(()) => acknowledged.push(message),
            Err(error) => {
                refusal = Some(error);
                break;
            }
        }
    }
    let refusal = refusal.expect("a send fails once the file may not grow");
    println!(
        "disk full: {} sends of {LARGE} bytes acknowledged past the limit ({size} bytes)",
        acknowledged.len() - before_the_limit
    );
    assert!(
        matches!(refusal, ConnectionError::Refused(ErrorCode::StorageFailure)),
        "a typed refusal, not an ack or a dropped connection: {refusal:?}"
    );
    assert!(relay.is_running(), "the relay survives the failed write");
    // Still full: still refused, and the connection still answers.
    let still_full = alice
        .send_to(&[bob_address], payload("still full", 0, LARGE))
        .await;
    assert!(
        matches!(
            still_full,
            Err(ConnectionError::Refused(ErrorCode::StorageFailure))
        ),
        "{still_full:?}"
    );

    // Space returns; the same relay process takes sends again.
    limit_file_size(&relay, None);
    for number in 0..10 {
        let message = payload("after", number, LARGE);
        alice
            .send_to(&[bob_address], message.clone())
            .await
            .unwrap();
        acknowledged.push(message);
    }
    assert!(relay.is_running());

    // Bob gets exactly what was acknowledged: nothing lost, and no refused send.
    let bob = Connection::connect(&relay.options()).await.unwrap();
    bob.authenticate(bob_address, &bob_key).await.unwrap();
    let delivered: Vec<Vec<u8>> = drain_acking(&bob)
        .await
        .into_iter()
        .map(|e| e.payload)
        .collect();
    assert_eq!(delivered, acknowledged);

    relay.kill();
    let mut db = redb::Database::open(data_dir.join("relay.redb")).unwrap();
    assert!(
        db.check_integrity().unwrap(),
        "redb's integrity check passes"
    );
}
