//! The short soak run in CI (the long one is `hush-bench soak`, see docs/RELIABILITY.md):
//! users in pairs connect, send, receive, acknowledge and disconnect, round after round,
//! against a relay child process whose descriptors and memory are read from /proc after a
//! warm-up and at the end. Every message arrives exactly once; nothing the relay holds per
//! connection outlives the connection.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use hush_client::protocol::{DeviceAddress, EnvelopeId};
use hush_client::{Connection, DeviceKey, Event};
use hush_tests::{relay_binary, ChildRelay, WAIT};
use tokio::task::JoinSet;

const USERS: usize = 16;
const ROUNDS: usize = 30;
const WARM_UP_ROUNDS: usize = 5;
const MESSAGES_PER_ROUND: u32 = 10;

struct User {
    address: DeviceAddress,
    key: DeviceKey,
    /// Message keys (sender, sequence) received so far.
    received: HashSet<(usize, u32)>,
}

/// Resident memory and open descriptors of a process.
fn resources(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (rss_kib * 1024, fds)
}

async fn connect(relay: &ChildRelay) -> Connection {
    tokio::time::timeout(WAIT, Connection::connect(&relay.options()))
        .await
        .unwrap()
        .unwrap()
}

/// One user's round: connect, send this round's messages to the partner, take until the
/// partner's have all arrived, acknowledge, disconnect.
async fn round(
    relay: &ChildRelay,
    index: usize,
    mut user: User,
    partner: DeviceAddress,
    round: usize,
) -> User {
    let connection = connect(relay).await;
    connection
        .authenticate(user.address, &user.key)
        .await
        .unwrap();
    for n in 0..MESSAGES_PER_ROUND {
        let sequence = round as u32 * MESSAGES_PER_ROUND + n;
        let mut message = (index as u32).to_be_bytes().to_vec();
        message.extend_from_slice(&sequence.to_be_bytes());
        message.resize(256, b'~');
        connection.send_to(&[partner], message).await.unwrap();
    }
    let expected = (round + 1) * MESSAGES_PER_ROUND as usize;
    let mut seen: HashSet<EnvelopeId> = HashSet::new();
    let mut pending = Vec::new();
    tokio::time::timeout(WAIT, async {
        while user.received.len() < expected {
            match connection.next_event().await {
                Some(Event::Envelope(envelope)) => {
                    pending.push(envelope.id);
                    // A redelivery of an envelope (same id) is allowed; the same message
                    // under a new id is a duplicate.
                    if seen.insert(envelope.id) {
                        let sender = u32::from_be_bytes(envelope.payload[..4].try_into().unwrap());
                        let sequence =
                            u32::from_be_bytes(envelope.payload[4..8].try_into().unwrap());
                        assert!(
                            user.received.insert((sender as usize, sequence)),
                            "message {sequence} from {sender} arrived twice"
                        );
                    }
                }
                Some(Event::Drained | Event::LowPrekeys { .. }) => {}
                other => panic!("connection ended in round {round}: {other:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("user {index} missed messages in round {round}"));
    connection.ack(&pending).await.unwrap();
    connection.close();
    user
}

#[tokio::test]
async fn rounds_of_reconnects_leave_no_descriptors_or_memory_behind() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Arc::new(ChildRelay::spawn(relay_binary!(), dir.path(), None, "warn"));
    let mut users = Vec::new();
    for _ in 0..USERS {
        let key = DeviceKey::generate();
        let connection = connect(&relay).await;
        let address = connection
            .register(b"identity-key", &key, None)
            .await
            .unwrap();
        connection.close();
        users.push(User {
            address,
            key,
            received: HashSet::new(),
        });
    }
    let addresses: Vec<DeviceAddress> = users.iter().map(|u| u.address).collect();
    let mut warm = None;
    for r in 0..ROUNDS {
        // All at once: each user's round waits on its partner's sends.
        let mut tasks = JoinSet::new();
        for (index, user) in users.into_iter().enumerate() {
            let (relay, partner) = (relay.clone(), addresses[index ^ 1]);
            tasks.spawn(async move { (index, round(&relay, index, user, partner, r).await) });
        }
        let mut done: Vec<(usize, User)> = tasks.join_all().await;
        done.sort_by_key(|(index, _)| *index);
        users = done.into_iter().map(|(_, user)| user).collect();
        if r + 1 == WARM_UP_ROUNDS {
            warm = Some(resources(relay.pid()));
        }
    }
    let (warm_rss, warm_fds) = warm.unwrap();
    let (end_rss, end_fds) = resources(relay.pid());
    eprintln!(
        "soak: {ROUNDS} rounds, {} reconnects; relay RSS {:.1} -> {:.1} MiB, fds {warm_fds} -> \
         {end_fds}",
        ROUNDS * USERS,
        warm_rss as f64 / 1_048_576.0,
        end_rss as f64 / 1_048_576.0
    );
    let per_partner: HashMap<usize, usize> = users
        .iter()
        .enumerate()
        .map(|(index, user)| (index, user.received.len()))
        .collect();
    for (index, count) in per_partner {
        assert_eq!(count, ROUNDS * MESSAGES_PER_ROUND as usize, "user {index}");
    }
    assert!(
        end_fds <= warm_fds + 2,
        "descriptors grew from {warm_fds} to {end_fds}"
    );
    // Generous for allocator noise; a connection's state (~36 KiB) kept per reconnect
    // would add ~14 MiB over these rounds.
    assert!(
        end_rss <= warm_rss + warm_rss / 4 + 4 * 1024 * 1024,
        "relay memory grew from {warm_rss} to {end_rss} bytes"
    );
}
