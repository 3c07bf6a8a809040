//! Calls on the relay (issue #4): allocations, joining, media datagrams forwarded between
//! exactly the two parties, every way a call ends, one call-detail record per call,
//! retention, and the operator's admin socket.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hush_client::protocol::media::{MAX_MEDIA_FRAME, MAX_MEDIA_PAYLOAD};
use hush_client::protocol::{AccountId, CallOutcome, CallToken, ErrorCode};
use hush_client::ConnectionError;
use hush_server::cdr::{day_of, format_date};
use hush_server::clock::Clock;
use hush_tests::{
    add_device, assert_no_call_ended, check_numbered, collect_media, contains, next_call_ended,
    read_tree, refused, relay_binary, send_numbered, wait_for_count, Device, TestRelay,
};

const QUIET: Duration = Duration::from_millis(300);

fn count(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// A relay whose call media goes as QUIC datagrams only.
async fn quic_only_relay() -> TestRelay {
    TestRelay::start_with(|c| c.udp_media = false).await
}

/// A relay whose timers do not fire while a test moves the clock on purpose. Its media
/// goes as QUIC datagrams only; `tests/udp_media.rs` covers the UDP media port.
async fn relay_without_idle_timeout() -> TestRelay {
    TestRelay::start_with(|c| {
        c.call_media_idle_secs = 3600;
        c.udp_media = false;
    })
    .await
}

/// Alice has allocated a call to Bob, who has not joined.
async fn allocated_call(relay: &TestRelay) -> (Device, Device, u32, CallToken) {
    let alice = relay.register().await;
    let bob = relay.register().await;
    let (allocation, token, _) = alice
        .connection
        .allocate_call(bob.address.account)
        .await
        .unwrap();
    (alice, bob, allocation, token)
}

/// Alice calls Bob, who has joined.
async fn joined_call(relay: &TestRelay) -> (Device, Device, u32, CallToken) {
    let (alice, bob, allocation, token) = allocated_call(relay).await;
    bob.connection.join_call(allocation, token).await.unwrap();
    (alice, bob, allocation, token)
}

#[tokio::test]
async fn an_answered_call_relays_media_both_ways_and_records_one_cdr() {
    let relay = relay_without_idle_timeout().await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    let bob2 = add_device(&relay, &bob).await;

    let started = relay.clock.now();
    let (allocation, token, call_id) = alice
        .connection
        .allocate_call(bob.address.account)
        .await
        .unwrap();
    relay.clock.advance(7);
    bob2.connection.join_call(allocation, token).await.unwrap();

    let (sent, received) = tokio::join!(
        async {
            tokio::join!(
                send_numbered(&alice.connection, allocation, 0xa1, 1000),
                send_numbered(&bob2.connection, allocation, 0xb2, 1000)
            )
        },
        async {
            tokio::join!(
                collect_media(&bob2.connection, Duration::from_secs(1)),
                collect_media(&alice.connection, Duration::from_secs(1))
            )
        }
    );
    let () = sent.0;
    check_numbered(&received.0, allocation, 0xa1, 1000);
    check_numbered(&received.1, allocation, 0xb2, 1000);
    assert!(count(&relay.relay().metrics().media_forwarded) >= 1980);
    // Bob's other device is not in the call and hears nothing.
    assert!(collect_media(&bob.connection, QUIET).await.is_empty());

    relay.clock.advance(125);
    alice
        .connection
        .end_call(allocation, CallOutcome::Missed)
        .await
        .unwrap();
    assert_eq!(next_call_ended(&bob2.connection).await, allocation);
    assert_no_call_ended(&alice.connection, QUIET).await;
    assert_eq!(relay.relay().live_calls(), 0);

    let records = relay
        .relay()
        .call_records_of(alice.address.account)
        .await
        .unwrap();
    assert_eq!(records.len(), 1, "exactly one record");
    let record = &records[0];
    assert_eq!(record.call_id, call_id);
    assert_eq!(record.caller, alice.address.account);
    assert_eq!(record.callee, bob.address.account);
    assert_eq!(
        record.outcome,
        CallOutcome::Answered,
        "the hint is overruled"
    );
    assert_eq!(record.started_at, started);
    assert_eq!(record.answered_at, Some(started + 7));
    assert_eq!(record.ended_at, started + 132);
    assert_eq!(record.duration_secs, 125);
    assert_eq!(
        relay
            .relay()
            .call_records_of(bob.address.account)
            .await
            .unwrap(),
        records
    );
    // Bob's late hang-up finds nothing and writes nothing.
    refused(
        bob2.connection
            .end_call(allocation, CallOutcome::Answered)
            .await,
        ErrorCode::UnknownCall,
    );
    assert_eq!(relay.relay().store_stats().await.unwrap().call_records, 1);
}

#[tokio::test]
async fn unanswered_calls_record_the_callers_outcome() {
    let relay = quic_only_relay().await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    for outcome in [
        CallOutcome::Missed,
        CallOutcome::Rejected,
        CallOutcome::Busy,
    ] {
        let (allocation, _, call_id) = alice
            .connection
            .allocate_call(bob.address.account)
            .await
            .unwrap();
        relay.clock.advance(5);
        alice
            .connection
            .end_call(allocation, outcome)
            .await
            .unwrap();
        let records = relay
            .relay()
            .call_records_of(alice.address.account)
            .await
            .unwrap();
        let record = records.iter().find(|r| r.call_id == call_id).unwrap();
        assert_eq!(record.outcome, outcome);
        assert_eq!(record.answered_at, None);
        assert_eq!(record.duration_secs, 0);
    }
    assert_no_call_ended(&bob.connection, QUIET).await;
    let days = relay.relay().call_day_stats().await.unwrap();
    let calls: u64 = days.iter().map(|d| d.calls).sum();
    let unanswered: u64 = days.iter().map(|d| d.unanswered).sum();
    let missed: u64 = days.iter().map(|d| d.missed).sum();
    assert_eq!((calls, unanswered, missed), (3, 3, 1));
}

#[tokio::test]
async fn an_unanswered_call_rings_out_as_missed() {
    let relay = quic_only_relay().await;
    let (alice, bob, allocation, token) = allocated_call(&relay).await;
    relay.clock.advance(89);
    relay.relay().expire_calls_now().await;
    assert_eq!(relay.relay().live_calls(), 1);
    relay.clock.advance(1);
    relay.relay().expire_calls_now().await;
    assert_eq!(next_call_ended(&alice.connection).await, allocation);
    let records = relay
        .relay()
        .call_records_of(bob.address.account)
        .await
        .unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].outcome, CallOutcome::Missed);
    assert_eq!(records[0].ended_at - records[0].started_at, 90);
    refused(
        bob.connection.join_call(allocation, token).await,
        ErrorCode::UnknownCall,
    );
}

#[tokio::test]
async fn a_call_without_media_ends_after_the_idle_timeout() {
    let relay = quic_only_relay().await;
    let (alice, bob, allocation, _) = joined_call(&relay).await;
    relay.clock.advance(20);
    // Media keeps it alive.
    alice.connection.send_media(allocation, b"frame").unwrap();
    let media = relay.relay().metrics();
    wait_for_count(|| count(&media.media_forwarded), 1).await;
    relay.clock.advance(29);
    relay.relay().expire_calls_now().await;
    assert_eq!(relay.relay().live_calls(), 1);
    relay.clock.advance(1);
    relay.relay().expire_calls_now().await;
    assert_eq!(next_call_ended(&alice.connection).await, allocation);
    assert_eq!(next_call_ended(&bob.connection).await, allocation);
    let records = relay
        .relay()
        .call_records_of(alice.address.account)
        .await
        .unwrap();
    assert_eq!(records[0].outcome, CallOutcome::Answered);
    assert_eq!(records[0].duration_secs, 50);
}

#[tokio::test]
async fn a_closed_connection_ends_its_calls() {
    let relay = relay_without_idle_timeout().await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    let carol = relay.register().await;

    // Answered, then the callee's connection goes away.
    let (answered, token, _) = alice
        .connection
        .allocate_call(bob.address.account)
        .await
        .unwrap();
    bob.connection.join_call(answered, token).await.unwrap();
    relay.clock.advance(40);
    drop(bob.connection);
    assert_eq!(next_call_ended(&alice.connection).await, answered);

    // Ringing, then the caller's connection goes away.
    let (ringing, _, _) = carol
        .connection
        .allocate_call(alice.address.account)
        .await
        .unwrap();
    drop(carol.connection);
    let deadline = std::time::Instant::now() + hush_tests::WAIT;
    while relay.relay().live_calls() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(relay.relay().live_calls(), 0);
    let _ = ringing;

    // The record is committed just after the allocation leaves the registry.
    let mut records = Vec::new();
    while records.len() < 2 && std::time::Instant::now() < deadline {
        records = relay
            .relay()
            .call_records_of(alice.address.account)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let outcomes: Vec<CallOutcome> = records.iter().map(|r| r.outcome).collect();
    assert_eq!(outcomes.len(), 2);
    assert!(outcomes.contains(&CallOutcome::Answered));
    assert!(outcomes.contains(&CallOutcome::Failed));
    let answered = records
        .iter()
        .find(|r| r.outcome == CallOutcome::Answered)
        .unwrap();
    assert_eq!(answered.duration_secs, 40);
}

#[tokio::test]
async fn media_for_unknown_or_finished_allocations_is_dropped_and_counted() {
    let relay = quic_only_relay().await;
    let (alice, bob, allocation, _) = joined_call(&relay).await;
    let metrics = relay.relay().metrics();
    for i in 0..10u8 {
        alice
            .connection
            .send_media(allocation.wrapping_add(1 + u32::from(i)), b"stray")
            .unwrap();
    }
    assert!(wait_for_count(|| count(&metrics.media_dropped_unknown), 10).await >= 10);

    alice
        .connection
        .end_call(allocation, CallOutcome::Answered)
        .await
        .unwrap();
    for _ in 0..5 {
        alice.connection.send_media(allocation, b"late").unwrap();
    }
    assert!(wait_for_count(|| count(&metrics.media_dropped_unknown), 15).await >= 15);
    assert!(collect_media(&bob.connection, QUIET).await.is_empty());
    assert_eq!(count(&metrics.media_forwarded), 0);
    assert!(metrics
        .render()
        .contains("hush_media_dropped_unknown_total 15"));
}

#[tokio::test]
async fn a_stolen_allocation_id_reaches_nobody() {
    let relay = quic_only_relay().await;
    let (alice, bob, allocation, _) = joined_call(&relay).await;
    let eve = relay.register().await;
    for _ in 0..20 {
        eve.connection.send_media(allocation, b"injected").unwrap();
    }
    let metrics = relay.relay().metrics();
    assert!(wait_for_count(|| count(&metrics.media_dropped_not_party), 20).await >= 20);
    assert!(collect_media(&alice.connection, QUIET).await.is_empty());
    assert!(collect_media(&bob.connection, QUIET).await.is_empty());
    // The parties' own media still flows.
    alice.connection.send_media(allocation, b"real").unwrap();
    let got = collect_media(&bob.connection, Duration::from_secs(2)).await;
    assert_eq!(got, vec![(allocation, b"real".to_vec())]);
}

#[tokio::test]
async fn oversized_media_is_refused_locally_and_dropped_by_the_relay() {
    let relay = quic_only_relay().await;
    let (alice, bob, allocation, _) = joined_call(&relay).await;
    assert!(matches!(
        alice
            .connection
            .send_media(allocation, &[0; MAX_MEDIA_PAYLOAD + 1]),
        Err(ConnectionError::Media(_))
    ));

    // Past the client's own check: a raw datagram over the limit, once the path carries it.
    let mut oversized = allocation.to_be_bytes().to_vec();
    oversized.resize(MAX_MEDIA_FRAME + 100, 0xee);
    let deadline = std::time::Instant::now() + hush_tests::WAIT;
    while alice
        .connection
        .send_raw_datagram(oversized.clone())
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "path MTU never grew past the media limit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = relay.relay().metrics();
    assert!(wait_for_count(|| count(&metrics.media_dropped_malformed), 1).await >= 1);
    assert!(collect_media(&bob.connection, QUIET).await.is_empty());
    assert_eq!(count(&metrics.media_forwarded), 0);
}

#[tokio::test]
async fn joining_needs_the_right_token_and_works_once() {
    let relay = quic_only_relay().await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    let bob2 = add_device(&relay, &bob).await;
    let eve = relay.register().await;
    let (allocation, token, _) = alice
        .connection
        .allocate_call(bob.address.account)
        .await
        .unwrap();
    let mut wrong = token;
    wrong.0[15] ^= 1;
    refused(
        bob.connection.join_call(allocation, wrong).await,
        ErrorCode::UnknownCall,
    );
    refused(
        bob.connection.join_call(allocation ^ 1, token).await,
        ErrorCode::UnknownCall,
    );
    // The right token from another account is no better.
    refused(
        eve.connection.join_call(allocation, token).await,
        ErrorCode::UnknownCall,
    );
    bob.connection.join_call(allocation, token).await.unwrap();
    refused(
        bob2.connection.join_call(allocation, token).await,
        ErrorCode::CallAlreadyJoined,
    );
    refused(
        bob.connection.join_call(allocation, token).await,
        ErrorCode::CallAlreadyJoined,
    );
    // Calling an account that does not exist is refused up front.
    refused(
        alice.connection.allocate_call(AccountId([0x42; 16])).await,
        ErrorCode::UnknownAccount,
    );
}

#[tokio::test]
async fn joining_after_the_hang_up_is_refused() {
    let relay = quic_only_relay().await;
    let (alice, bob, allocation, token) = allocated_call(&relay).await;
    alice
        .connection
        .end_call(allocation, CallOutcome::Missed)
        .await
        .unwrap();
    refused(
        bob.connection.join_call(allocation, token).await,
        ErrorCode::UnknownCall,
    );
    refused(
        alice
            .connection
            .end_call(allocation, CallOutcome::Missed)
            .await,
        ErrorCode::UnknownCall,
    );
    assert_eq!(relay.relay().store_stats().await.unwrap().call_records, 1);
}

#[tokio::test]
async fn a_forged_hang_up_from_a_non_party_changes_nothing() {
    let relay = quic_only_relay().await;
    let (alice, bob, allocation, _) = joined_call(&relay).await;
    let eve = relay.register().await;
    refused(
        eve.connection
            .end_call(allocation, CallOutcome::Rejected)
            .await,
        ErrorCode::UnknownCall,
    );
    assert_eq!(relay.relay().live_calls(), 1);
    assert_no_call_ended(&alice.connection, QUIET).await;
    bob.connection
        .send_media(allocation, b"still here")
        .unwrap();
    let got = collect_media(&alice.connection, Duration::from_secs(2)).await;
    assert_eq!(got, vec![(allocation, b"still here".to_vec())]);
    assert_eq!(relay.relay().store_stats().await.unwrap().call_records, 0);
}

#[tokio::test]
async fn call_allocations_are_limited_per_account() {
    let relay = TestRelay::start_with(|c| c.limits.max_calls_per_account = 2).await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    let (first, _, _) = alice
        .connection
        .allocate_call(bob.address.account)
        .await
        .unwrap();
    alice
        .connection
        .allocate_call(bob.address.account)
        .await
        .unwrap();
    refused(
        alice.connection.allocate_call(bob.address.account).await,
        ErrorCode::CallLimitReached,
    );
    // Calls need an authenticated device.
    let anonymous = relay.connect().await;
    assert!(matches!(
        anonymous.allocate_call(bob.address.account).await,
        Err(ConnectionError::Closed(Some(ErrorCode::NotAuthenticated)))
    ));
    alice
        .connection
        .end_call(first, CallOutcome::Busy)
        .await
        .unwrap();
    alice
        .connection
        .allocate_call(bob.address.account)
        .await
        .unwrap();
}

#[tokio::test]
async fn call_records_go_after_retention_and_day_counts_stay() {
    let relay = relay_without_idle_timeout().await;
    let (alice, bob, allocation, _) = joined_call(&relay).await;
    relay.clock.advance(61);
    alice
        .connection
        .end_call(allocation, CallOutcome::Answered)
        .await
        .unwrap();
    let (missed, _, _) = bob
        .connection
        .allocate_call(alice.address.account)
        .await
        .unwrap();
    bob.connection
        .end_call(missed, CallOutcome::Missed)
        .await
        .unwrap();
    assert_eq!(
        relay
            .relay()
            .call_records_of(alice.address.account)
            .await
            .unwrap()
            .len(),
        2
    );

    relay.clock.advance(89 * 86_400);
    relay.relay().sweep_now().await.unwrap();
    assert_eq!(relay.relay().store_stats().await.unwrap().call_records, 2);
    relay.clock.advance(86_400);
    relay.relay().sweep_now().await.unwrap();
    let stats = relay.relay().store_stats().await.unwrap();
    assert_eq!((stats.call_records, stats.call_index_entries), (0, 0));
    assert!(relay
        .relay()
        .call_records_of(alice.address.account)
        .await
        .unwrap()
        .is_empty());
    let days = relay.relay().call_day_stats().await.unwrap();
    assert_eq!(days.iter().map(|d| d.calls).sum::<u64>(), 2);
    assert_eq!(days.iter().map(|d| d.answered).sum::<u64>(), 1);
    assert_eq!(
        days.iter()
            .map(hush_server::cdr::DayStats::minutes)
            .sum::<u64>(),
        2
    );

    let ids = [alice.address.account, bob.address.account];
    drop((alice, bob));
    let dir = relay.stop().await;
    for (path, bytes) in read_tree(dir.path()) {
        for id in ids {
            assert!(!contains(&bytes, &id.0), "account id in {}", path.display());
            assert!(
                !contains(&bytes, id.to_hex().as_bytes()),
                "hex account id in {}",
                path.display()
            );
        }
    }
}

fn admin_cli(args: &[&str]) -> (bool, String) {
    let output = std::process::Command::new(relay_binary!())
        .arg("admin")
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test]
async fn the_admin_cli_reports_day_counts_and_retention() {
    let relay = relay_without_idle_timeout().await;
    let (alice, bob, allocation, _) = joined_call(&relay).await;
    let day = format_date(day_of(relay.clock.now()));
    relay.clock.advance(61);
    alice
        .connection
        .end_call(allocation, CallOutcome::Answered)
        .await
        .unwrap();
    let (missed, _, _) = alice
        .connection
        .allocate_call(bob.address.account)
        .await
        .unwrap();
    alice
        .connection
        .end_call(missed, CallOutcome::Missed)
        .await
        .unwrap();

    let socket = relay.data_dir().join("admin.sock");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let data_dir = relay.data_dir().to_str().unwrap().to_owned();
    let (ok, report) = tokio::task::spawn_blocking({
        let data_dir = data_dir.clone();
        move || admin_cli(&["cdr-report", "--data-dir", &data_dir])
    })
    .await
    .unwrap();
    assert!(ok, "{report}");
    assert!(report.starts_with("date calls answered unanswered missed minutes\n"));
    assert!(report.contains(&format!("{day} 2 1 1 1 2\n")), "{report}");

    let socket_arg = socket.to_str().unwrap().to_owned();
    let (ok, retention) =
        tokio::task::spawn_blocking(move || admin_cli(&["retention", "--socket", &socket_arg]))
            .await
            .unwrap();
    assert!(ok, "{retention}");
    assert!(retention.contains("message_expiry_days 14"), "{retention}");
    assert!(retention.contains("cdr_retention_days 90"), "{retention}");
    assert!(
        retention.contains("envelopes 0; the first expires -"),
        "{retention}"
    );
    assert!(
        retention.contains("call_records 2; the oldest is deleted "),
        "{retention}"
    );
    for id in [alice.address.account, bob.address.account] {
        assert!(!report.contains(&id.to_hex()) && !retention.contains(&id.to_hex()));
    }

    // The socket goes with the relay; the CLI then fails cleanly.
    drop((alice, bob));
    let dir = relay.stop().await;
    assert!(!dir.path().join("admin.sock").exists());
    let (ok, _) =
        tokio::task::spawn_blocking(move || admin_cli(&["cdr-report", "--data-dir", &data_dir]))
            .await
            .unwrap();
    assert!(!ok);
}

#[tokio::test]
async fn a_stale_admin_socket_is_replaced_and_a_live_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists(), "a stale socket file is left behind");
    let config = hush_tests::test_config(dir.path());
    let clock = std::sync::Arc::new(hush_server::clock::ManualClock::starting_now());
    let relay = hush_server::Relay::start(config.clone(), clock.clone())
        .await
        .unwrap();
    let answer = tokio::task::spawn_blocking({
        let socket = socket.clone();
        move || hush_server::admin::query(&socket, "retention").unwrap()
    })
    .await
    .unwrap();
    assert!(answer.contains("cdr_retention_days 90"), "{answer}");
    let metrics = tokio::task::spawn_blocking({
        let socket = socket.clone();
        move || hush_server::admin::query(&socket, "metrics").unwrap()
    })
    .await
    .unwrap();
    assert!(
        metrics.contains("hush_connections_opened_total 0")
            && metrics.contains("hush_store_commits_total "),
        "{metrics}"
    );
    let unknown = tokio::task::spawn_blocking({
        let socket = socket.clone();
        move || hush_server::admin::query(&socket, "erase everything").unwrap()
    })
    .await
    .unwrap();
    assert!(unknown.starts_with("error: unknown command"), "{unknown}");

    // A second relay on the same data dir is refused and does not take the live socket.
    let mut second = config;
    second.listen = "127.0.0.1:0".parse().unwrap();
    assert!(hush_server::Relay::start(second, clock).await.is_err());
    let still = tokio::task::spawn_blocking({
        let socket = socket.clone();
        move || hush_server::admin::query(&socket, "cdr-report").unwrap()
    })
    .await
    .unwrap();
    assert!(still.starts_with("date "), "{still}");
    relay.shutdown().await;
    assert!(!socket.exists());
}

#[tokio::test]
async fn metrics_after_calls_name_nobody() {
    let relay = quic_only_relay().await;
    let (alice, bob, allocation, token) = joined_call(&relay).await;
    alice.connection.send_media(allocation, b"frame").unwrap();
    let metrics = relay.relay().metrics();
    wait_for_count(|| count(&metrics.media_forwarded), 1).await;
    alice
        .connection
        .end_call(allocation, CallOutcome::Answered)
        .await
        .unwrap();
    let rendered = metrics.render();
    assert!(
        rendered.contains("hush_calls_allocated_total 1"),
        "{rendered}"
    );
    assert!(rendered.contains("hush_calls_ended_total 1"), "{rendered}");
    for id in [alice.address.account, bob.address.account] {
        assert!(!rendered.contains(&id.to_hex()));
    }
    assert!(!rendered.contains(&hex::encode(token.0)));
    assert!(!rendered.contains(&allocation.to_string()) || allocation < 100);
}
