//! Connection abuse: half-sent frames, connections that never say `Hello`, extra and
//! churned streams, idle connections, handshake floods and media datagram floods. Each
//! case: the abuser's connection is refused or closed (with a typed code where the relay
//! gives one), what it held is given back (the relay's open-connection gauge returns to
//! its baseline), and a well-behaved pair keeps sending and receiving meanwhile.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use hush_client::protocol::{
    encode_frame, ClientFrame, DeviceAddress, ErrorCode, Hello, Request, RequestBody, RequestId,
    ServerFrame,
};
use hush_client::{close_code, Connection, Connector, DeviceKey};
use hush_server::config::Config;
use hush_server::metrics::Metrics;
use hush_tests::flood::HandshakeFlood;
use hush_tests::{fatal, next_envelope, raw_after_hello, TestRelay, WAIT};

/// Keep-alives for the well-behaved clients, well inside every idle timeout used here.
const KEEP_ALIVE: Duration = Duration::from_millis(250);

/// How long an abuser's refused stream gets to show it was not opened.
const REFUSED_WAIT: Duration = Duration::from_millis(300);

/// A relay and a well-behaved pair on it.
struct World {
    relay: TestRelay,
    connector: Connector,
    alice: Connection,
    bob: Connection,
    bob_address: DeviceAddress,
    /// Connections open when the attack starts: the pair.
    baseline: u64,
    sent: std::cell::Cell<u8>,
}

async fn world(adjust: impl FnOnce(&mut Config)) -> World {
    let relay = TestRelay::start_with(adjust).await;
    let connector = Connector::with_keep_alive(relay.options(), Some(KEEP_ALIVE)).unwrap();
    let (alice, _) = register(&connector).await;
    let (bob, bob_address) = register(&connector).await;
    let baseline = relay.relay().open_connections();
    assert_eq!(baseline, 2);
    World {
        relay,
        connector,
        alice,
        bob,
        bob_address,
        baseline,
        sent: std::cell::Cell::new(0),
    }
}

async fn register(connector: &Connector) -> (Connection, DeviceAddress) {
    let connection = tokio::time::timeout(WAIT, connector.connect())
        .await
        .unwrap()
        .unwrap();
    let address = connection
        .register(b"identity-key", &DeviceKey::generate(), None)
        .await
        .unwrap();
    (connection, address)
}

impl World {
    /// Alice sends Bob one envelope and Bob receives it, each within the wait.
    async fn assert_served(&self) {
        self.sent.set(self.sent.get() + 1);
        let payload = vec![self.sent.get()];
        tokio::time::timeout(
            WAIT,
            self.alice.send_to(&[self.bob_address], payload.clone()),
        )
        .await
        .expect("the send is answered within the wait")
        .unwrap();
        let envelope = next_envelope(&self.bob).await;
        assert_eq!(envelope.payload, payload);
        self.bob.ack(&[envelope.id]).await.unwrap();
    }

    /// Waits (bounded) until the relay holds no more connections than before the attack.
    async fn assert_reclaimed(&self) {
        let relay = self.relay.relay();
        let back = tokio::time::timeout(WAIT, async {
            while relay.open_connections() > self.baseline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            back.is_ok(),
            "{} connections open, baseline {}",
            relay.open_connections(),
            self.baseline
        );
    }

    fn closed_with(&self, code: ErrorCode) -> u64 {
        self.relay.relay().metrics().closed_count(code)
    }
}

/// Waits (bounded) for a QUIC connection to close; returns the relay's code, if any.
async fn closed(connection: &quinn::Connection) -> Option<ErrorCode> {
    tokio::time::timeout(WAIT, connection.closed())
        .await
        .expect("the relay closes the connection within the wait");
    close_code(connection)
}

#[tokio::test]
async fn a_half_sent_frame_is_closed_at_the_frame_deadline_though_keep_alives_flow() {
    let world = world(|config| config.limits.frame_read_timeout_secs = 1).await;

    // Three bytes of a header; then a full header promising 1,000 bytes and 10 of them.
    let mut header_only = raw_after_hello(&world.connector).await.0;
    header_only.write(&[0, 0, 3]).await.unwrap();
    let mut half_body = raw_after_hello(&world.connector).await.0;
    let mut frame = 1000u32.to_be_bytes().to_vec();
    frame.push(0x08); // Send
    frame.extend_from_slice(&[0; 10]);
    half_body.write(&frame).await.unwrap();
    // Both stall; keep-alives every 250 ms keep the connections from idling out.
    world.assert_served().await;

    assert_eq!(fatal(&mut header_only).await, ErrorCode::FrameTimeout);
    assert_eq!(fatal(&mut half_body).await, ErrorCode::FrameTimeout);
    assert_eq!(world.closed_with(ErrorCode::FrameTimeout), 2);
    world.assert_reclaimed().await;
    // Alice and Bob sat quiet past the frame deadline with no frame begun: still served.
    world.assert_served().await;
}

#[tokio::test]
async fn a_connection_that_never_says_hello_is_closed_at_the_hello_deadline() {
    let world = world(|config| config.limits.hello_timeout_secs = 1).await;

    // No stream at all; a control stream with one byte of a `Hello` and then nothing.
    let no_stream = world.connector.connect_quic().await.unwrap();
    let mut one_byte = world.connector.connect_raw().await.unwrap();
    one_byte.write(&[0]).await.unwrap();
    world.assert_served().await;

    assert_eq!(closed(&no_stream).await, Some(ErrorCode::HelloRequired));
    assert_eq!(fatal(&mut one_byte).await, ErrorCode::HelloRequired);
    assert_eq!(world.closed_with(ErrorCode::HelloRequired), 2);
    world.assert_reclaimed().await;
    world.assert_served().await;
}

#[tokio::test]
async fn streams_beyond_the_control_stream_are_refused_by_flow_control() {
    let world = world(|_| {}).await;
    let mut raw = raw_after_hello(&world.connector).await.0;

    // MAX_STREAMS allows the control stream only: a second bidirectional stream and any
    // unidirectional one wait for credit the relay never gives.
    let second = tokio::time::timeout(REFUSED_WAIT, raw.quic().open_bi()).await;
    assert!(second.is_err(), "a second stream was opened");
    let uni = tokio::time::timeout(REFUSED_WAIT, raw.quic().open_uni()).await;
    assert!(uni.is_err(), "a unidirectional stream was opened");
    assert_eq!(world.relay.relay().open_connections(), world.baseline + 1);

    // The control stream carries on.
    let open = encode_frame(&ClientFrame::Request(Request {
        id: RequestId(7),
        body: RequestBody::OpenProvisioning,
    }));
    raw.write(&open).await.unwrap();
    match tokio::time::timeout(WAIT, raw.read_frame()).await.unwrap() {
        Ok(Some(ServerFrame::Response(response))) => assert_eq!(response.id, RequestId(7)),
        other => panic!("expected a response, got {other:?}"),
    }
    world.assert_served().await;
    raw.quic().close(0u32.into(), b"done");
    world.assert_reclaimed().await;
}

#[tokio::test]
async fn opening_finishing_and_resetting_streams_in_a_loop_holds_nothing() {
    let world = world(|_| {}).await;
    let hello = encode_frame(&ClientFrame::Hello(Hello::current()));
    for round in 0..24u32 {
        let connection = world.connector.connect_quic().await.unwrap();
        let (mut send, _recv) = connection.open_bi().await.unwrap();
        send.write_all(&hello).await.unwrap();
        // Ending the only stream a connection may have ends its session.
        match round % 3 {
            0 => send.finish().unwrap(),
            1 => send.reset(1u32.into()).unwrap(),
            _ => {
                // Half a frame, then the reset.
                send.write_all(&[0, 0]).await.unwrap();
                send.reset(2u32.into()).unwrap();
            }
        }
        closed(&connection).await;
        if round % 8 == 7 {
            world.assert_served().await;
        }
    }
    world.assert_reclaimed().await;
    world.assert_served().await;
}

#[tokio::test]
async fn connections_without_keep_alives_are_closed_at_the_idle_timeout() {
    let world = world(|config| config.limits.idle_timeout_secs = 1).await;
    let silent = Connector::with_keep_alive(world.relay.options(), None).unwrap();
    let mut quiet = Vec::new();
    for _ in 0..16 {
        quiet.push(silent.connect().await.unwrap());
    }
    assert_eq!(world.relay.relay().open_connections(), world.baseline + 16);

    world.assert_reclaimed().await;
    for connection in &quiet {
        tokio::time::timeout(WAIT, async {
            while connection.next_event().await.is_some() {}
        })
        .await
        .expect("the idle connection ends");
    }
    // The pair, quiet as well but sending keep-alives, is still connected.
    assert_eq!(world.alice.close_code(), None);
    world.assert_served().await;
}

#[tokio::test]
async fn a_handshake_flood_does_not_keep_a_well_behaved_client_out() {
    const MAX_CONNECTIONS: u64 = 12;
    let world = world(|config| {
        config.limits.max_connections = MAX_CONNECTIONS as usize;
        // Abandoned handshakes end at the idle timeout.
        config.limits.idle_timeout_secs = 2;
    })
    .await;
    let metrics = world.relay.relay().metrics();
    let opened_before = Metrics::get(&metrics.connections_opened);
    let mut flood = HandshakeFlood::new(world.relay.relay().local_addr())
        .await
        .unwrap();

    // Initials that never answer the Retry: a Retry each, and no slot, no handshake. In
    // batches, because `max_incoming` (12 here, as the connection limit) refuses, without
    // a Retry, whatever of a burst the accept loop has not taken yet.
    let mut sent = 0;
    for _ in 0..50 {
        sent += flood.unanswered_initials(8).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(sent, 400);
    let validations =
        hush_tests::wait_for_count(|| Metrics::get(&metrics.address_validations), 200).await;
    assert!(validations >= 200, "{validations} Retries for 400 Initials");
    assert_eq!(world.relay.relay().open_connections(), world.baseline);
    world.assert_served().await;

    // Attempts that prove their address and then go silent mid-handshake: the relay
    // starts at most as many as it has slots, and refuses the rest.
    let mut answered = 0;
    for _ in 0..5 {
        let round = flood
            .abandoned_handshakes(8, Duration::from_secs(1))
            .await
            .unwrap();
        answered += round.retries_answered;
    }
    assert!(answered >= 20, "{answered} of 40 Retries answered");
    let refused =
        hush_tests::wait_for_count(|| Metrics::get(&metrics.connections_refused), 1).await;
    assert!(refused >= 1, "the connection limit refused none");
    assert!(world.relay.relay().open_connections() <= MAX_CONNECTIONS);
    // Connections already up are not disturbed.
    world.assert_served().await;

    world.assert_reclaimed().await;
    assert_eq!(
        Metrics::get(&metrics.connections_opened),
        opened_before,
        "no flood attempt completed a handshake"
    );
    // A newcomer connects and is served once the abandoned handshakes have timed out.
    let (carol, _) = register(&world.connector).await;
    carol
        .send_to(&[world.bob_address], b"from a newcomer".to_vec())
        .await
        .unwrap();
    assert_eq!(next_envelope(&world.bob).await.payload, b"from a newcomer");
}

#[tokio::test]
async fn a_datagram_flood_is_dropped_and_counted_and_does_not_delay_envelopes() {
    let world = world(|_| {}).await;
    let (flooder, _) = register(&world.connector).await;
    let (callee, callee_address) = register(&world.connector).await;
    let (allocation, _token, _call_id) =
        flooder.allocate_call(callee_address.account).await.unwrap();
    let metrics = world.relay.relay().metrics();

    // Datagrams for an allocation that does not exist, and for the flooder's own
    // allocation before anyone joined it, interleaved with the pair's envelopes.
    let mut sent = 0u64;
    for burst in 0..20u32 {
        for n in 0..500u32 {
            let datagram = if n % 2 == 0 {
                let mut unknown = (allocation ^ 0x5A5A_0000 ^ burst).to_be_bytes().to_vec();
                unknown.extend_from_slice(&[0xAB; 160]);
                flooder.send_raw_datagram(unknown)
            } else {
                flooder.send_media(allocation, &[0xCD; 160])
            };
            if datagram.is_ok() {
                sent += 1;
            }
        }
        world.assert_served().await;
    }
    assert!(sent > 0);
    let dropped = || {
        Metrics::get(&metrics.media_dropped_unknown) + Metrics::get(&metrics.media_dropped_no_peer)
    };
    let counted = hush_tests::wait_for_count(dropped, 1).await;
    assert!(counted >= 1 && counted <= sent, "{counted} of {sent}");
    assert!(Metrics::get(&metrics.media_dropped_unknown) >= 1);
    assert!(Metrics::get(&metrics.media_dropped_no_peer) >= 1);
    assert_eq!(Metrics::get(&metrics.media_forwarded), 0);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), callee.next_media())
            .await
            .is_err()
    );
    // The flooder's connection itself carries on: datagrams are not a protocol violation.
    assert_eq!(flooder.close_code(), None);
    world.assert_served().await;
}
