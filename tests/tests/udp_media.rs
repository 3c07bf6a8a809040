//! Call media on the relay's UDP media port (issue #4): legs granted over the
//! authenticated QUIC connection, packets sealed hop by hop, media moving to the port once
//! it answers and back to QUIC datagrams where it is off, and every kind of bad packet
//! dropped and counted without reaching the other party.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hush_client::protocol::media_udp::{HopCipher, HopKey, MediaLeg, HOP_OVERHEAD, MAX_HOP_PACKET};
use hush_client::protocol::CallOutcome;
use hush_client::{ConnectOptions, Connection, DeviceKey};
use hush_tests::{check_numbered, collect_media, send_numbered, Device, TestRelay};
use tokio::net::UdpSocket;

const QUIET: Duration = Duration::from_millis(300);
const WAIT: Duration = Duration::from_secs(5);

fn count(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Reads media (and with it the relay's binding answers) until `allocation`'s frames go
/// over the UDP port, for at most [`WAIT`].
async fn until_on_udp(connection: &Connection, allocation: u32) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !connection.media_on_udp(allocation) && tokio::time::Instant::now() < deadline {
        let _ = tokio::time::timeout(Duration::from_millis(20), connection.next_media()).await;
    }
    assert!(
        connection.media_on_udp(allocation),
        "the media port never answered"
    );
}

/// Alice calls Bob, who joins.
async fn call(relay: &TestRelay) -> (Device, Device, u32) {
    let alice = relay.register().await;
    let bob = relay.register().await;
    let (allocation, token, _) = alice
        .connection
        .allocate_call(bob.address.account)
        .await
        .unwrap();
    bob.connection.join_call(allocation, token).await.unwrap();
    (alice, bob, allocation)
}

/// Alice calls Bob, who joins; both on the UDP port.
async fn call_on_udp(relay: &TestRelay) -> (Device, Device, u32) {
    let (alice, bob, allocation) = call(relay).await;
    until_on_udp(&alice.connection, allocation).await;
    until_on_udp(&bob.connection, allocation).await;
    (alice, bob, allocation)
}

/// A socket of our own on the relay's media port, speaking for `leg` (or pretending to).
async fn port_socket(relay: &TestRelay) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket
        .connect(relay.relay().media_addr().unwrap())
        .await
        .unwrap();
    socket
}

fn seal(leg: &MediaLeg, key: &HopKey, counter: u64, payload: &[u8]) -> Vec<u8> {
    let mut packet = Vec::new();
    HopCipher::new(key)
        .seal_into(leg.leg, counter, payload, &mut packet)
        .unwrap();
    packet
}

/// Waits until a relay counter reaches `at_least`, boundedly.
async fn reaches(counter: &AtomicU64, at_least: u64) {
    let value = hush_tests::wait_for_count(|| count(counter), at_least).await;
    assert!(value >= at_least, "counter at {value}, expected {at_least}");
}

#[tokio::test]
async fn media_moves_to_the_udp_port_carries_1000_frames_each_way_and_its_legs_end_with_the_call() {
    let relay = TestRelay::start().await;
    let metrics = relay.relay().metrics();
    let (alice, bob, allocation) = call_on_udp(&relay).await;
    assert!(count(&metrics.media_bindings) >= 2);
    assert_eq!(relay.relay().live_media_legs(), 2);
    // Each party has its own leg: nothing on the wire links the two halves of the call.
    let (alice_leg, bob_leg) = (
        alice.connection.media_leg(allocation).unwrap(),
        bob.connection.media_leg(allocation).unwrap(),
    );
    assert_ne!(alice_leg.leg, bob_leg.leg);
    assert_ne!(alice_leg.up, bob_leg.up);
    assert_ne!(alice_leg.down, bob_leg.down);

    let forwarded = count(&metrics.media_forwarded);
    let (sent, received) = tokio::join!(
        async {
            tokio::join!(
                send_numbered(&alice.connection, allocation, 0xa1, 1000),
                send_numbered(&bob.connection, allocation, 0xb2, 1000)
            )
        },
        async {
            tokio::join!(
                collect_media(&bob.connection, Duration::from_secs(1)),
                collect_media(&alice.connection, Duration::from_secs(1))
            )
        }
    );
    let () = sent.0;
    check_numbered(&received.0, allocation, 0xa1, 1000);
    check_numbered(&received.1, allocation, 0xb2, 1000);
    assert!(count(&metrics.media_forwarded) - forwarded >= 1980);
    assert_eq!(count(&metrics.media_dropped_forged), 0);
    assert_eq!(count(&metrics.media_dropped_replayed), 0);

    alice
        .connection
        .end_call(allocation, CallOutcome::Answered)
        .await
        .unwrap();
    assert_eq!(relay.relay().live_media_legs(), 0);
    // A packet on an ended leg, even a genuine one, reaches nobody.
    let unknown = count(&metrics.media_dropped_unknown);
    let socket = port_socket(&relay).await;
    socket
        .send(&seal(&alice_leg, &alice_leg.up, 1 << 40, b"after"))
        .await
        .unwrap();
    reaches(&metrics.media_dropped_unknown, unknown + 1).await;
    assert!(collect_media(&bob.connection, QUIET).await.is_empty());
}

#[tokio::test]
async fn forged_stolen_replayed_oversized_and_unknown_packets_reach_nobody() {
    let relay = TestRelay::start().await;
    let metrics = relay.relay().metrics();
    let (alice, bob, allocation) = call_on_udp(&relay).await;
    let leg = alice.connection.media_leg(allocation).unwrap();
    let eve = port_socket(&relay).await;

    // Alice's leg id without her key: forged.
    let wrong_key = HopKey::from_bytes([0x42; 32]);
    eve.send(&seal(&leg, &wrong_key, 1 << 40, b"injected"))
        .await
        .unwrap();
    reaches(&metrics.media_dropped_forged, 1).await;
    // Alice's own packet with one bit flipped: forged.
    let mut flipped = seal(&leg, &leg.up, 1 << 40, b"injected");
    flipped[HOP_OVERHEAD] ^= 1;
    eve.send(&flipped).await.unwrap();
    reaches(&metrics.media_dropped_forged, 2).await;
    // No such leg.
    let unknown = MediaLeg {
        leg: leg.leg ^ 1,
        ..leg.clone()
    };
    eve.send(&seal(&unknown, &leg.up, 1 << 40, b"nobody"))
        .await
        .unwrap();
    reaches(&metrics.media_dropped_unknown, 1).await;
    // Too large, too small.
    let malformed = count(&metrics.media_dropped_malformed);
    eve.send(&vec![0u8; MAX_HOP_PACKET + 1]).await.unwrap();
    eve.send(&[0u8; HOP_OVERHEAD - 1]).await.unwrap();
    reaches(&metrics.media_dropped_malformed, malformed + 2).await;
    assert!(collect_media(&bob.connection, QUIET).await.is_empty());

    // A genuine packet from a socket holding Alice's keys moves her leg there (as a network
    // change would); Bob hears it once. Eve replays its bytes from elsewhere: refused, and
    // the leg stays where it was.
    let owner = port_socket(&relay).await;
    let genuine = seal(&leg, &leg.up, 1 << 41, b"genuine frame");
    owner.send(&genuine).await.unwrap();
    let heard = collect_media(&bob.connection, QUIET).await;
    assert_eq!(heard, vec![(allocation, b"genuine frame".to_vec())]);
    eve.send(&genuine).await.unwrap();
    reaches(&metrics.media_dropped_replayed, 1).await;
    assert!(collect_media(&bob.connection, QUIET).await.is_empty());
    bob.connection.send_media(allocation, b"for alice").unwrap();
    let mut buffer = vec![0u8; MAX_HOP_PACKET];
    let len = tokio::time::timeout(WAIT, owner.recv(&mut buffer))
        .await
        .expect("the leg's owner hears Bob")
        .unwrap();
    let (_, payload) = HopCipher::new(&leg.down).open(&mut buffer[..len]).unwrap();
    assert_eq!(payload, b"for alice");
    let mut nothing = [0u8; 64];
    assert!(
        tokio::time::timeout(QUIET, eve.recv(&mut nothing))
            .await
            .is_err(),
        "the replaying socket got media"
    );
}

#[tokio::test]
async fn media_falls_back_to_quic_datagrams_where_the_port_is_off_or_unused() {
    // A relay without the port grants no legs: media goes as QUIC datagrams.
    let relay = TestRelay::start_with(|c| c.udp_media = false).await;
    assert!(relay.relay().media_addr().is_none());
    let (alice, bob, allocation) = call(&relay).await;
    assert!(alice.connection.media_leg(allocation).is_none());
    send_numbered(&alice.connection, allocation, 0xa1, 100).await;
    check_numbered(
        &collect_media(&bob.connection, QUIET).await,
        allocation,
        0xa1,
        100,
    );

    // One party on the port, the other (told not to use it) on QUIC: the relay carries
    // the frames across, both ways.
    let relay = TestRelay::start().await;
    let alice = relay.register().await;
    let options = ConnectOptions {
        udp_media: false,
        ..relay.options()
    };
    let bob = Connection::connect(&options).await.unwrap();
    let bob_address = bob
        .register(b"identity-key", &DeviceKey::generate(), None)
        .await
        .unwrap();
    let (allocation, token, _) = alice
        .connection
        .allocate_call(bob_address.account)
        .await
        .unwrap();
    bob.join_call(allocation, token).await.unwrap();
    until_on_udp(&alice.connection, allocation).await;
    assert!(!bob.media_on_udp(allocation));
    let (sent, received) = tokio::join!(
        async {
            tokio::join!(
                send_numbered(&alice.connection, allocation, 0xa1, 200),
                send_numbered(&bob, allocation, 0xb2, 200)
            )
        },
        async {
            tokio::join!(
                collect_media(&bob, QUIET),
                collect_media(&alice.connection, QUIET)
            )
        }
    );
    let () = sent.0;
    check_numbered(&received.0, allocation, 0xa1, 200);
    check_numbered(&received.1, allocation, 0xb2, 200);
}
