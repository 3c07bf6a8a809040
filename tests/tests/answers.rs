//! Answers to pipelined writes: a connection that sends many writes without waiting gets
//! every one answered, once, in the order it sent them, each with its own outcome, though
//! the relay writes the answers that one commit made durable together.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ed25519_dalek::SigningKey;
use hush_client::protocol::{
    encode_frame, Ack, ClientFrame, EnvelopeId, ErrorCode, OutgoingEnvelope, Request, RequestBody,
    RequestId, ResponseBody, Send, ServerFrame,
};
use hush_client::DeviceKey;
use hush_tests::{authenticated_raw_stream, drain_acking, TestRelay, WAIT};

/// More writes than the relay lets a connection have in flight (256 by default), so the
/// answers also cross the point where the relay stops reading to wait for them.
const WRITES: u32 = 600;

/// Every seventh write acknowledges an envelope that does not exist (refused), the others
/// send one envelope to Bob.
fn is_bogus_ack(index: u32) -> bool {
    index % 7 == 3
}

#[tokio::test]
async fn pipelined_writes_are_answered_once_each_in_order() {
    let relay = TestRelay::start().await;
    let bob = relay.register().await;
    let bob_address = bob.address;
    let bob_key = bob.key;
    drop(bob.connection);
    let alice_key = DeviceKey::from_secret_bytes(&[0x3a; 32]);
    let registration = relay.connect().await;
    let alice = registration
        .register(b"alice", &alice_key, None)
        .await
        .unwrap();
    drop(registration);
    let mut raw =
        authenticated_raw_stream(relay.options(), alice, &SigningKey::from_bytes(&[0x3a; 32]))
            .await;

    // All of them in one go, before reading a single answer.
    let mut frames = Vec::new();
    for index in 0..WRITES {
        let body = if is_bogus_ack(index) {
            RequestBody::Ack(Ack {
                ids: vec![EnvelopeId(u64::MAX - u64::from(index))],
            })
        } else {
            RequestBody::Send(Send {
                envelopes: vec![OutgoingEnvelope {
                    recipients: vec![bob_address],
                    payload: index.to_be_bytes().to_vec(),
                    retract_tag: None,
                }],
            })
        };
        frames.extend(encode_frame(&ClientFrame::Request(Request {
            id: RequestId(index + 2),
            body,
        })));
    }
    raw.write(&frames).await.unwrap();

    let mut next = 0;
    while next < WRITES {
        let frame = tokio::time::timeout(WAIT, raw.read_frame()).await;
        match frame.expect("the answers keep coming").unwrap() {
            Some(ServerFrame::Response(response)) => {
                assert_eq!(response.id, RequestId(next + 2), "answered in order");
                let expected = if is_bogus_ack(next) {
                    Err(ErrorCode::UnknownEnvelope)
                } else {
                    Ok(ResponseBody::Sent)
                };
                assert_eq!(response.result, expected, "answer to write {next}");
                next += 1;
            }
            Some(_) => {}
            None => panic!("closed after {next} answers"),
        }
    }

    // What was answered `Sent` is stored, once each, in the order sent.
    let bob = relay.login(bob_address, &bob_key).await;
    let received: Vec<u32> = drain_acking(&bob)
        .await
        .iter()
        .map(|envelope| u32::from_be_bytes(envelope.payload[..4].try_into().unwrap()))
        .collect();
    let sent: Vec<u32> = (0..WRITES).filter(|&i| !is_bogus_ack(i)).collect();
    assert_eq!(received, sent);
}
