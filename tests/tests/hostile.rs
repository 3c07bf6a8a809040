//! Bad input from the network: each case gets a typed error, its connection is closed with
//! that code, the relay keeps serving everyone else, and nothing acknowledged is lost.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ed25519_dalek::{Signer, SigningKey};
use hush_client::protocol::auth::auth_transcript;
use hush_client::protocol::{
    encode_frame, Authenticate, ClientFrame, DeviceAddress, ErrorCode, Hello, OutgoingEnvelope,
    Request, RequestBody, RequestId, Send, ServerFrame, Signature, VersionRange,
    SUPPORTED_VERSIONS,
};
use hush_client::{Connector, DeviceKey, RawStream};
use hush_tests::{drain, fatal, raw_after_hello, Device, TestRelay};

/// A relay with Alice, and Bob offline with one acknowledged envelope waiting.
struct World {
    relay: TestRelay,
    alice: Device,
    bob_address: DeviceAddress,
    bob_key: DeviceKey,
}

async fn world() -> World {
    let relay = TestRelay::start().await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    alice
        .connection
        .send_to(&[bob.address], b"acknowledged before the attack".to_vec())
        .await
        .unwrap();
    World {
        relay,
        alice,
        bob_address: bob.address,
        bob_key: bob.key,
    }
}

impl World {
    async fn raw(&self) -> RawStream {
        Connector::new(self.relay.options())
            .unwrap()
            .connect_raw()
            .await
            .unwrap()
    }

    /// A raw stream past `Hello`, with the relay's challenge.
    async fn raw_after_hello(&self) -> (RawStream, [u8; 32]) {
        raw_after_hello(&Connector::new(self.relay.options()).unwrap()).await
    }

    /// The relay still serves others, and Bob's acknowledged envelope is still there.
    async fn assert_unharmed(self) {
        self.alice
            .connection
            .send_to(&[self.alice.address], b"still serving".to_vec())
            .await
            .unwrap();
        let bob = self.relay.login(self.bob_address, &self.bob_key).await;
        let waiting = drain(&bob).await;
        assert_eq!(waiting[0].payload, b"acknowledged before the attack");
    }
}

fn request(body: RequestBody) -> Vec<u8> {
    encode_frame(&ClientFrame::Request(Request {
        id: RequestId(1),
        body,
    }))
}

#[tokio::test]
async fn an_oversized_length_prefix_is_refused_before_the_body_arrives() {
    let world = world().await;
    let mut raw = world.raw().await;
    let mut header = u32::MAX.to_be_bytes().to_vec();
    header.push(0x08); // Send
    raw.write(&header).await.unwrap();
    assert_eq!(fatal(&mut raw).await, ErrorCode::FrameTooLarge);
    world.assert_unharmed().await;
}

#[tokio::test]
async fn a_truncated_frame_is_malformed() {
    let world = world().await;
    let mut raw = world.raw().await;
    let hello = encode_frame(&ClientFrame::Hello(Hello::current()));
    raw.write(&hello[..hello.len() - 2]).await.unwrap();
    raw.finish();
    assert_eq!(fatal(&mut raw).await, ErrorCode::MalformedFrame);
    world.assert_unharmed().await;
}

#[tokio::test]
async fn garbage_bytes_are_refused() {
    let world = world().await;
    let mut raw = world.raw().await;
    // A valid header for a Hello, then a body that is not one.
    raw.write(&[0, 0, 0, 6, 0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF])
        .await
        .unwrap();
    assert_eq!(fatal(&mut raw).await, ErrorCode::MalformedFrame);

    let mut raw = world.raw().await;
    raw.write(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
        .await
        .unwrap();
    let code = fatal(&mut raw).await;
    assert!(
        matches!(code, ErrorCode::UnknownFrameType | ErrorCode::FrameTooLarge),
        "{code:?}"
    );
    world.assert_unharmed().await;
}

#[tokio::test]
async fn an_unknown_frame_type_is_refused() {
    let world = world().await;
    let (mut raw, _) = world.raw_after_hello().await;
    raw.write(&[0, 0, 0, 0, 0x7F]).await.unwrap();
    assert_eq!(fatal(&mut raw).await, ErrorCode::UnknownFrameType);
    world.assert_unharmed().await;
}

#[tokio::test]
async fn a_version_mismatch_gets_a_clear_error_naming_the_relays_versions() {
    let world = world().await;
    let mut raw = world.raw().await;
    let hello = Hello {
        versions: VersionRange { min: 900, max: 901 },
    };
    raw.write(&encode_frame(&ClientFrame::Hello(hello)))
        .await
        .unwrap();
    match raw.read_frame().await.unwrap() {
        Some(ServerFrame::Fatal(fatal)) => {
            assert_eq!(fatal.code, ErrorCode::UnsupportedVersion);
            assert_eq!(fatal.supported_versions, SUPPORTED_VERSIONS);
        }
        other => panic!("expected Fatal, got {other:?}"),
    }
    assert_eq!(raw.closed().await, Some(ErrorCode::UnsupportedVersion));
    world.assert_unharmed().await;
}

#[tokio::test]
async fn requests_before_hello_or_authentication_are_refused() {
    let world = world().await;
    let send = RequestBody::Send(Send {
        envelopes: vec![OutgoingEnvelope {
            recipients: vec![world.bob_address],
            payload: b"spam".to_vec(),
            retract_tag: None,
        }],
    });

    let mut raw = world.raw().await;
    raw.write(&request(send.clone())).await.unwrap();
    assert_eq!(fatal(&mut raw).await, ErrorCode::HelloRequired);

    let (mut raw, _) = world.raw_after_hello().await;
    raw.write(&request(send)).await.unwrap();
    assert_eq!(fatal(&mut raw).await, ErrorCode::NotAuthenticated);

    let (mut raw, _) = world.raw_after_hello().await;
    raw.write(&encode_frame(&ClientFrame::Hello(Hello::current())))
        .await
        .unwrap();
    assert_eq!(fatal(&mut raw).await, ErrorCode::HelloRequired);

    assert_eq!(
        world.relay.relay().store_stats().await.unwrap().envelopes,
        1,
        "no spam was stored"
    );
    world.assert_unharmed().await;
}

#[tokio::test]
async fn a_signature_for_another_connections_challenge_is_refused() {
    let relay = TestRelay::start().await;
    let secret = SigningKey::from_bytes(&[7u8; 32]);
    let device_key = DeviceKey::from_secret_bytes(&[7u8; 32]);
    let alice = relay.register().await;
    let victim = relay.connect().await;
    let victim_address = victim.register(b"victim", &device_key, None).await.unwrap();
    alice
        .connection
        .send_to(
            &[victim_address],
            b"acknowledged before the attack".to_vec(),
        )
        .await
        .unwrap();
    drop(victim);
    let world = World {
        relay,
        alice,
        bob_address: victim_address,
        bob_key: device_key,
    };

    // The honest device signs on its own connection (A); the attacker replays that
    // signature on connection B. The challenge and the TLS exporter both differ.
    let (connection_a, challenge_a) = world.raw_after_hello().await;
    let signed_on_a = secret.sign(&auth_transcript(
        &connection_a.exporter().unwrap(),
        &challenge_a,
        &victim_address,
    ));
    let (mut connection_b, _) = world.raw_after_hello().await;
    let replay = RequestBody::Authenticate(Authenticate {
        address: victim_address,
        signature: Signature(signed_on_a.to_bytes()),
    });
    connection_b.write(&request(replay)).await.unwrap();
    assert_eq!(
        fatal(&mut connection_b).await,
        ErrorCode::AuthenticationFailed
    );

    // Even with B's challenge, a signature over A's exporter (a relaying attacker who
    // forwards B's challenge to the victim on A) does not verify on B.
    let (mut connection_b, challenge_b2) = world.raw_after_hello().await;
    let relayed = secret.sign(&auth_transcript(
        &connection_a.exporter().unwrap(),
        &challenge_b2,
        &victim_address,
    ));
    let replay = RequestBody::Authenticate(Authenticate {
        address: victim_address,
        signature: Signature(relayed.to_bytes()),
    });
    connection_b.write(&request(replay)).await.unwrap();
    assert_eq!(
        fatal(&mut connection_b).await,
        ErrorCode::AuthenticationFailed
    );
    world.assert_unharmed().await;
}

#[tokio::test]
async fn many_bad_connections_do_not_disturb_a_well_behaved_one() {
    let world = world().await;
    let watcher = world.relay.register().await;
    for round in 0..20u8 {
        let mut raw = world.raw().await;
        raw.write(&[0, 0, 0, 1, 0x80 | round]).await.unwrap();
        assert_eq!(fatal(&mut raw).await, ErrorCode::UnknownFrameType);
        world
            .alice
            .connection
            .send_to(&[watcher.address], vec![round])
            .await
            .unwrap();
    }
    let received = hush_tests::next_envelope(&watcher.connection).await;
    assert_eq!(received.payload, vec![0]);
    assert_eq!(
        world
            .relay
            .relay()
            .metrics()
            .closed_count(ErrorCode::UnknownFrameType),
        20
    );
    world.assert_unharmed().await;
}
