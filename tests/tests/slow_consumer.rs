//! Slow and stuck consumers (issue #6): a device that stops reading its stream while a
//! sender floods it costs the relay a bounded amount of memory (the delivery window: pushes
//! wait for acks), the envelopes wait in the store, and all of them arrive, in order, once
//! the device reads again. The relay runs as a child process so that its own memory can be
//! read from `/proc`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use ed25519_dalek::SigningKey;
use hush_client::protocol::{
    encode_frame, Ack, ClientFrame, OutgoingEnvelope, Request, RequestBody, RequestId,
    ResponseBody, ServerFrame,
};
use hush_client::{Connection, DeviceKey, RawStream};
use hush_tests::{authenticated_raw_stream, relay_binary, ChildRelay, WAIT};

/// Envelope size: large enough that buffering the flood would show, small enough that many
/// fit in one `Send`.
const ENVELOPE: usize = 16 * 1024;
/// Envelopes per `Send` request (960 KiB, under the 1 MiB a send may carry).
const PER_SEND: usize = 60;
/// Sends of the flood: 3,060 envelopes, 47.8 MiB of payload.
const SENDS: usize = 51;
/// Sends in flight at once.
const CONCURRENT_SENDS: usize = 4;
/// How much the relay's peak resident memory may grow over the flood: two thirds of the
/// flood, so a relay that queued the flood for the stuck device would go over it. (Growth
/// measured on the reference machine: 13 MiB for a 16 MiB flood, 17 MiB for 32 MiB; most
/// of it allocator arenas of the worker threads, which level off.)
const GROWTH_BOUND: u64 = 32 * 1024 * 1024;

/// The relay's page cache is kept small so that what is measured is the relay's own
/// buffering, not the cache of the data it wrote; the flood is let through the rate limits.
const CONFIG: &str = "
[limits]
max_in_flight_requests = 4
store_cache_bytes = 2097152
[limits.connection_envelopes]
burst = 1000000
refill = 1000000
period_secs = 1
[limits.account_envelopes]
burst = 1000000
refill = 1000000
period_secs = 1
";

fn payload(index: usize) -> Vec<u8> {
    let mut payload = vec![(index % 251) as u8; ENVELOPE];
    payload[..8].copy_from_slice(&(index as u64).to_be_bytes());
    payload
}

fn frame(id: u32, body: RequestBody) -> Vec<u8> {
    encode_frame(&ClientFrame::Request(Request {
        id: RequestId(id),
        body,
    }))
}

/// Floods `to` with the numbered envelopes, a few sends in flight at a time; returns once
/// the relay has acknowledged every one (durably stored).
async fn flood(sender: Arc<Connection>, to: hush_client::protocol::DeviceAddress) {
    let mut in_flight = tokio::task::JoinSet::new();
    for send in 0..SENDS {
        if in_flight.len() == CONCURRENT_SENDS {
            in_flight.join_next().await.unwrap().unwrap();
        }
        let sender = sender.clone();
        let envelopes = (send * PER_SEND..(send + 1) * PER_SEND)
            .map(|index| OutgoingEnvelope {
                recipients: vec![to],
                payload: payload(index),
                retract_tag: None,
            })
            .collect();
        in_flight.spawn(async move { sender.send(envelopes).await.unwrap() });
    }
    while let Some(done) = in_flight.join_next().await {
        done.unwrap();
    }
}

/// Reads the device's stream again, acknowledging as it goes, until `count` envelopes came;
/// returns their indexes in arrival order.
async fn read_again(raw: &mut RawStream, count: usize) -> Vec<u64> {
    let mut indexes = Vec::with_capacity(count);
    let mut unacked = Vec::new();
    let mut request = 2;
    while indexes.len() < count {
        match raw.read_frame().await.unwrap() {
            Some(ServerFrame::Deliver(deliver)) => {
                assert_eq!(deliver.payload.len(), ENVELOPE);
                let index = u64::from_be_bytes(deliver.payload[..8].try_into().unwrap());
                assert_eq!(deliver.payload, payload(index as usize), "intact");
                indexes.push(index);
                unacked.push(deliver.id);
            }
            Some(ServerFrame::Response(response)) => {
                assert_eq!(response.result, Ok(ResponseBody::Acked));
            }
            Some(_) => {}
            None => panic!("closed after {} envelopes", indexes.len()),
        }
        if unacked.len() == 128 || (indexes.len() == count && !unacked.is_empty()) {
            let ids = std::mem::take(&mut unacked);
            raw.write(&frame(request, RequestBody::Ack(Ack { ids })))
                .await
                .unwrap();
            request += 1;
        }
    }
    indexes
}

#[tokio::test]
async fn a_device_that_stops_reading_costs_bounded_memory_and_gets_everything_later() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let data = dir.path().join("data");
    let relay = ChildRelay::spawn_configured(relay_binary!(), Some(&config), &data, None, "warn");
    let alice = Connection::connect(&relay.options()).await.unwrap();
    alice
        .register(b"alice", &DeviceKey::generate(), None)
        .await
        .unwrap();
    let secret = SigningKey::from_bytes(&[0x5c; 32]);
    let bob_key = DeviceKey::from_secret_bytes(&[0x5c; 32]);
    let registration = Connection::connect(&relay.options()).await.unwrap();
    let bob = registration.register(b"bob", &bob_key, None).await.unwrap();
    drop(registration);
    // Bob connects, authenticates, and then stops reading.
    let mut stuck = authenticated_raw_stream(relay.options(), bob, &secret).await;

    let before = relay.memory();
    let total = SENDS * PER_SEND;
    let flooded = tokio::time::timeout(WAIT * 12, flood(Arc::new(alice), bob)).await;
    assert!(flooded.is_ok(), "the flood was not accepted in time");
    let after = relay.memory();
    let growth = after.peak.saturating_sub(before.resident);
    let flood_bytes = (total * ENVELOPE) as u64;
    eprintln!(
        "relay memory: {} KiB before, peak {} KiB during a flood of {} KiB to a stuck device \
         (growth {} KiB)",
        before.resident / 1024,
        after.peak / 1024,
        flood_bytes / 1024,
        growth / 1024
    );
    assert!(
        growth < GROWTH_BOUND,
        "relay memory grew by {growth} bytes over a {flood_bytes}-byte flood"
    );
    // The flood is in the store, not in memory.
    let stored = std::fs::metadata(data.join("relay.redb")).unwrap().len();
    assert!(
        stored >= flood_bytes,
        "the store holds {stored} bytes of a {flood_bytes}-byte flood"
    );

    // Bob reads again: every envelope, once, in order.
    let indexes = tokio::time::timeout(WAIT * 12, read_again(&mut stuck, total))
        .await
        .expect("the backlog drains in time");
    let expected: Vec<u64> = (0..total as u64).collect();
    assert!(indexes == expected, "envelopes lost, repeated or reordered");
}
