//! P4 under fire: a relay child under steady load from several senders and receivers is
//! SIGKILLed at random moments (inside group commits, expiry sweeps and deliveries),
//! restarted on the same data dir, and the clients reconnect and carry on. At the end every
//! send the relay acknowledged has reached the application exactly once (the receivers
//! deduplicate by message id, as a client does; relay redeliveries of envelopes whose ack
//! a kill cut off are allowed and counted), nothing was delivered that was not sent, and
//! the store passes redb's integrity check.
//!
//! `HUSH_CRASH_CYCLES` sets the number of kills (default 20, enough for CI);
//! `HUSH_CRASH_SEED` replays a run (the seed is printed).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hush_client::protocol::DeviceAddress;
use hush_client::{ConnectOptions, Connection, DeviceKey, Event};
use hush_server::store::{RedbStore, Store};
use hush_tests::{drain_acking, relay_binary, ChildRelay, WAIT};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::task::JoinSet;

const SENDERS: usize = 3;
/// Sends each sender keeps in flight, so that group commits carry several writes.
const LANES: usize = 2;
const RECEIVERS: usize = 2;
/// Padding that makes every envelope this long.
const PAYLOAD_LEN: usize = 200;
/// How long the load runs before a kill: from `MIN_RUN` to `MIN_RUN + RUN_SPREAD`.
const MIN_RUN: Duration = Duration::from_millis(30);
const RUN_SPREAD: u64 = 900;

/// A message's id at the application layer: who sent it, its number, and for whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct MessageId {
    sender: usize,
    number: u64,
    receiver: usize,
}

impl MessageId {
    fn payload(self) -> Vec<u8> {
        let mut payload =
            format!("{}:{}:{}:", self.sender, self.number, self.receiver).into_bytes();
        payload.resize(PAYLOAD_LEN, b'.');
        payload
    }

    /// The id in a payload, if it is one of ours, whole.
    fn parse(payload: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(payload).ok()?;
        let mut fields = text.splitn(4, ':');
        let id = MessageId {
            sender: fields.next()?.parse().ok()?,
            number: fields.next()?.parse().ok()?,
            receiver: fields.next()?.parse().ok()?,
        };
        (payload == id.payload().as_slice()).then_some(id)
    }
}

/// What the clients saw, across every relay life.
#[derive(Default)]
struct Ledger {
    /// Sends started (the relay may or may not have stored them).
    attempted: BTreeSet<MessageId>,
    /// Sends the relay acknowledged.
    acknowledged: BTreeSet<MessageId>,
    /// What each receiver's application got, deduplicated by message id.
    delivered: BTreeMap<MessageId, usize>,
    /// Envelopes pushed again after their first delivery (a kill cut off the ack).
    redeliveries: u64,
    /// Payloads that were not one of our messages, or reached the wrong receiver.
    foreign: u64,
    /// Each sender's next message number.
    next_number: [u64; SENDERS],
}

impl Ledger {
    /// Records a delivery to `receiver`; says whether it is new to the application.
    fn deliver(&mut self, receiver: usize, payload: &[u8]) {
        match MessageId::parse(payload) {
            Some(id) if id.receiver == receiver => {
                let count = self.delivered.entry(id).or_insert(0);
                *count += 1;
                if *count > 1 {
                    self.redeliveries += 1;
                }
            }
            _ => self.foreign += 1,
        }
    }
}

struct Account {
    address: DeviceAddress,
    key: DeviceKey,
}

async fn register(options: &ConnectOptions) -> Account {
    let key = DeviceKey::generate();
    let connection = Connection::connect(options).await.unwrap();
    let address = connection.register(b"identity", &key, None).await.unwrap();
    Account { address, key }
}

async fn login(options: &ConnectOptions, account: &Account) -> Option<Connection> {
    let connection = tokio::time::timeout(WAIT, Connection::connect(options))
        .await
        .ok()?
        .ok()?;
    tokio::time::timeout(WAIT, connection.authenticate(account.address, &account.key))
        .await
        .ok()?
        .ok()?;
    Some(connection)
}

/// Sends until the relay goes away. Each send is recorded as attempted before it starts
/// and as acknowledged once the relay says it is stored.
async fn send_lane(
    connection: Arc<Connection>,
    sender: usize,
    receivers: Arc<Vec<DeviceAddress>>,
    ledger: Arc<Mutex<Ledger>>,
) {
    loop {
        let id = {
            let mut ledger = ledger.lock().unwrap();
            let number = ledger.next_number[sender];
            ledger.next_number[sender] += 1;
            let id = MessageId {
                sender,
                number,
                receiver: (number % RECEIVERS as u64) as usize,
            };
            ledger.attempted.insert(id);
            id
        };
        let sent = tokio::time::timeout(
            WAIT,
            connection.send_to(&[receivers[id.receiver]], id.payload()),
        )
        .await;
        match sent {
            Ok(Ok(())) => {
                ledger.lock().unwrap().acknowledged.insert(id);
            }
            _ => return,
        }
    }
}

/// Takes deliveries until the relay goes away: the application records each envelope,
/// then acknowledges it to the relay.
async fn receive(connection: Connection, receiver: usize, ledger: Arc<Mutex<Ledger>>) {
    loop {
        let event = tokio::time::timeout(WAIT, connection.next_event()).await;
        match event {
            Ok(Some(Event::Envelope(envelope))) => {
                ledger.lock().unwrap().deliver(receiver, &envelope.payload);
                if connection.ack(&[envelope.id]).await.is_err() {
                    return;
                }
            }
            Ok(Some(Event::Drained | Event::LowPrekeys { .. })) => {}
            _ => return,
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number")),
    )
}

fn spawn(config: &Path, data_dir: &Path, log: &Path) -> ChildRelay {
    ChildRelay::spawn_configured(relay_binary!(), Some(config), data_dir, Some(log), "warn")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_minus_nine_under_load_loses_and_duplicates_nothing_acknowledged() {
    let cycles = env_u64("HUSH_CRASH_CYCLES").unwrap_or(20);
    let seed = env_u64("HUSH_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    println!("crash loop: {cycles} cycles, HUSH_CRASH_SEED={seed}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let started = Instant::now();

    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let log = dir.path().join("relay.log");
    let config = dir.path().join("relay.toml");
    // Sweeps as often as the relay allows, so that kills land in them too.
    std::fs::write(&config, "sweep_interval_secs = 1\n").unwrap();

    let mut relay = spawn(&config, &data_dir, &log);
    let mut senders = Vec::new();
    for _ in 0..SENDERS {
        senders.push(register(&relay.options()).await);
    }
    let mut receivers = Vec::new();
    for _ in 0..RECEIVERS {
        receivers.push(register(&relay.options()).await);
    }
    let receiver_addresses = Arc::new(receivers.iter().map(|r| r.address).collect::<Vec<_>>());
    let ledger = Arc::new(Mutex::new(Ledger::default()));

    for _ in 0..cycles {
        let options = relay.options();
        let mut load = JoinSet::new();
        for (index, account) in receivers.iter().enumerate() {
            if let Some(connection) = login(&options, account).await {
                load.spawn(receive(connection, index, ledger.clone()));
            }
        }
        for (index, account) in senders.iter().enumerate() {
            if let Some(connection) = login(&options, account).await {
                let connection = Arc::new(connection);
                for _ in 0..LANES {
                    load.spawn(send_lane(
                        connection.clone(),
                        index,
                        receiver_addresses.clone(),
                        ledger.clone(),
                    ));
                }
            }
        }
        tokio::time::sleep(MIN_RUN + Duration::from_millis(rng.next_u64() % RUN_SPREAD)).await;
        relay.kill();
        // The clients' requests die with the relay; a reply that was on its way is lost,
        // which is what a real client sees.
        load.shutdown().await;
        relay = spawn(&config, &data_dir, &log);
    }

    // Last life: the receivers take everything left, then the relay is killed once more.
    let options = relay.options();
    for (index, account) in receivers.iter().enumerate() {
        let connection = login(&options, account).await.expect("receiver logs in");
        for envelope in drain_acking(&connection).await {
            ledger.lock().unwrap().deliver(index, &envelope.payload);
        }
    }
    relay.kill();

    let db_path = data_dir.join("relay.redb");
    {
        let mut db = redb::Database::open(&db_path).unwrap();
        assert!(
            db.check_integrity().unwrap(),
            "redb's integrity check passes"
        );
    }
    let stats = RedbStore::open(&data_dir).unwrap().stats().unwrap();
    assert_eq!(
        (stats.envelopes, stats.mailbox_entries, stats.expiry_entries),
        (0, 0, 0),
        "every envelope was delivered and acknowledged, and the index agrees"
    );

    let ledger = ledger.lock().unwrap();
    let lost: Vec<_> = ledger
        .acknowledged
        .iter()
        .filter(|id| !ledger.delivered.contains_key(id))
        .collect();
    let invented: Vec<_> = ledger
        .delivered
        .keys()
        .filter(|id| !ledger.attempted.contains(id))
        .collect();
    println!(
        "crash loop: {cycles} kills in {:.1?}; {} sends attempted, {} acknowledged, {} delivered \
         to the application, {} relay redeliveries deduplicated",
        started.elapsed(),
        ledger.attempted.len(),
        ledger.acknowledged.len(),
        ledger.delivered.len(),
        ledger.redeliveries,
    );
    assert!(
        lost.is_empty(),
        "acknowledged but never delivered: {lost:?}"
    );
    assert!(
        invented.is_empty(),
        "delivered but never sent: {invented:?}"
    );
    assert_eq!(ledger.foreign, 0, "payloads intact and to their receiver");
    assert!(
        ledger.acknowledged.len() as u64 >= cycles,
        "the load kept going across restarts"
    );
}
