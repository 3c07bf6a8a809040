//! A two-party protocol fuzzer after libsignal's `interaction` target: Alice and Bob with
//! a real session (real PQXDH and Double Ratchet; set up once per process and thawed from
//! its pickles for every input, the ratchet's new keys from an RNG seeded by the input),
//! and a network the input drives: send either way, deliver, drop, shuffle, duplicate,
//! and replay a message already delivered. Every message that arrives opens exactly once
//! and to its own plaintext; a duplicate or a replay is refused with `DuplicateMessage`
//! while the receiver remembers its chain (the last eight ratchet keys), and fails to
//! decrypt once it does not (never opening twice either way); at the end whatever is still in flight arrives, and every message sent was opened or
//! dropped.
#![no_main]

use std::collections::HashSet;
use std::sync::OnceLock;

use hush_client::test_support::{pairwise_sessions, Delivery, ExactlyOnce, FrozenSessions};
use hush_client::Session;
use hush_fuzz::rng_from;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

/// At most this many actions run per input: far below the ratchet's bounds (2,000
/// skipped keys), within which nothing delivered may be lost, and room for the nine round
/// trips after which a chain is forgotten. Longer scripts mostly revisit the states shorter
/// ones reach, at a quarter of the inputs per hour.
const MAX_ACTIONS: usize = 128;

#[derive(Arbitrary, Debug)]
enum Action {
    /// Alice (false) or Bob (true) sends the next message.
    Send { from_bob: bool },
    /// One message in flight arrives.
    Deliver { pick: u16 },
    /// One message in flight is lost.
    Drop { pick: u16 },
    /// The network reorders what is in flight.
    Shuffle { seed: u16 },
    /// One message in flight arrives and stays in flight (it will arrive again).
    Duplicate { pick: u16 },
    /// A message that already arrived is sent again by an attacker.
    Replay { pick: u16 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    seed: u64,
    actions: Vec<Action>,
}

#[derive(Clone)]
struct InFlight {
    to: usize,
    id: u32,
    bytes: Vec<u8>,
}

struct World {
    /// `sessions[i][j]`: party `i`'s session with party `j`.
    sessions: Vec<Vec<Option<Session>>>,
    rng: ChaCha20Rng,
    ledger: ExactlyOnce,
    /// Messages that have arrived at least once, for replays.
    arrived: Vec<InFlight>,
}

impl World {
    fn deliver(&mut self, message: &InFlight) -> Delivery {
        let session = self.sessions[message.to][1 - message.to]
            .as_mut()
            .expect("pairwise session");
        let delivery = self
            .ledger
            .deliver(session, message.id, &message.bytes, 0, &mut self.rng)
            .unwrap_or_else(|violation| panic!("{violation}"));
        if delivery == Delivery::Opened {
            self.arrived.push(message.clone());
        }
        delivery
    }
}

fn pick<T>(items: &[T], pick: u16) -> Option<usize> {
    (!items.is_empty()).then(|| usize::from(pick) % items.len())
}

/// Alice's and Bob's sessions right after setup (Alice's first message accepted).
fn frozen() -> &'static FrozenSessions {
    static FROZEN: OnceLock<FrozenSessions> = OnceLock::new();
    FROZEN.get_or_init(|| {
        let parties = pairwise_sessions(2, &mut rng_from(b"interaction")).expect("sessions");
        FrozenSessions::freeze(&parties)
    })
}

fuzz_target!(|input: Input| {
    let mut world = World {
        sessions: frozen().thaw().expect("thawing the pickled sessions"),
        rng: ChaCha20Rng::seed_from_u64(input.seed),
        ledger: ExactlyOnce::default(),
        arrived: Vec::new(),
    };
    let mut network: Vec<InFlight> = Vec::new();
    let mut dropped = HashSet::new();
    let mut sent = 0u32;
    for action in input.actions.iter().take(MAX_ACTIONS) {
        match *action {
            Action::Send { from_bob } => {
                sent += 1;
                let (from, to) = if from_bob { (1, 0) } else { (0, 1) };
                let session = world.sessions[from][to].as_mut().expect("pairwise session");
                let bytes = session
                    .encrypt(&ExactlyOnce::plaintext(sent))
                    .expect("encrypt")
                    .to_bytes();
                network.push(InFlight {
                    to,
                    id: sent,
                    bytes,
                });
            }
            Action::Deliver { pick: p } => {
                if let Some(index) = pick(&network, p) {
                    let message = network.remove(index);
                    world.deliver(&message);
                }
            }
            Action::Drop { pick: p } => {
                if let Some(index) = pick(&network, p) {
                    dropped.insert(network.remove(index).id);
                }
            }
            Action::Shuffle { seed } => {
                // A deterministic permutation: rotate, then swap pairs chosen by the seed.
                if let Some(index) = pick(&network, seed) {
                    network.rotate_left(index);
                    let len = network.len();
                    for i in (0..len).step_by(2) {
                        network.swap(i, (i + usize::from(seed)) % len);
                    }
                }
            }
            Action::Duplicate { pick: p } => {
                if let Some(index) = pick(&network, p) {
                    let copy = network[index].clone();
                    world.deliver(&copy);
                }
            }
            Action::Replay { pick: p } => {
                if let Some(index) = pick(&world.arrived, p) {
                    let replay = world.arrived[index].clone();
                    // `deliver` fails on a second opening; this names the refusal.
                    assert_ne!(world.deliver(&replay), Delivery::Opened);
                }
            }
        }
    }
    // Whatever is still in flight arrives, in the network's order.
    for message in std::mem::take(&mut network) {
        world.deliver(&message);
    }
    world
        .ledger
        .check_none_lost(sent, &dropped)
        .unwrap_or_else(|violation| panic!("{violation}"));
});
