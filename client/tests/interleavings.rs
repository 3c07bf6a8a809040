//! Property test: two and three parties talking over a network that loses, reorders and
//! duplicates messages. Every message that arrives decrypts exactly once; duplicates are
//! refused; nothing that arrives is lost.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;

use hush_client::test_support::{pairwise_sessions, Delivery, ExactlyOnce, FrozenSessions, Party};
use proptest::prelude::*;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

struct InFlight {
    from: usize,
    to: usize,
    id: u32,
    bytes: Vec<u8>,
}

#[derive(Clone, Debug)]
enum Op {
    Send { from: usize, to: usize },
    Deliver { pick: usize },
    Duplicate { pick: usize },
    Drop { pick: usize },
}

fn op(parties: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..parties, 0..parties).prop_map(|(from, to)| Op::Send { from, to }),
        4 => any::<usize>().prop_map(|pick| Op::Deliver { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Duplicate { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Drop { pick }),
    ]
}

fn deliver(
    parties: &mut [Party],
    message: &InFlight,
    rng: &mut ChaCha20Rng,
    ledger: &mut ExactlyOnce,
) {
    let session = parties[message.to].sessions[message.from].as_mut().unwrap();
    ledger
        .deliver(session, message.id, &message.bytes, 0, rng)
        .unwrap();
}

fn run(n: usize, seed: u64, ops: &[Op]) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut parties = pairwise_sessions(n, &mut rng).unwrap();
    let mut network: Vec<InFlight> = Vec::new();
    let mut ledger = ExactlyOnce::default();
    let mut dropped = HashSet::new();
    let mut next_id = 0u32;
    for op in ops {
        match *op {
            Op::Send { from, to } if from != to => {
                next_id += 1;
                let session = parties[from].sessions[to].as_mut().unwrap();
                let bytes = session
                    .encrypt(&ExactlyOnce::plaintext(next_id))
                    .unwrap()
                    .to_bytes();
                network.push(InFlight {
                    from,
                    to,
                    id: next_id,
                    bytes,
                });
            }
            Op::Deliver { pick } if !network.is_empty() => {
                let message = network.remove(pick % network.len());
                deliver(&mut parties, &message, &mut rng, &mut ledger);
            }
            Op::Duplicate { pick } if !network.is_empty() => {
                let message = &network[pick % network.len()];
                let copy = InFlight {
                    from: message.from,
                    to: message.to,
                    id: message.id,
                    bytes: message.bytes.clone(),
                };
                deliver(&mut parties, &copy, &mut rng, &mut ledger);
            }
            Op::Drop { pick } if !network.is_empty() => {
                dropped.insert(network.remove(pick % network.len()).id);
            }
            // Sends to oneself, and picks from an empty network.
            Op::Send { .. } | Op::Deliver { .. } | Op::Duplicate { .. } | Op::Drop { .. } => {}
        }
    }
    // Whatever is still in flight arrives, in a shuffled order.
    while !network.is_empty() {
        let pick = (next_id as usize * 7919 + network.len()) % network.len();
        let message = network.remove(pick);
        deliver(&mut parties, &message, &mut rng, &mut ledger);
    }
    // A dropped message may still have arrived as an earlier duplicate.
    ledger.check_none_lost(next_id, &dropped).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn two_parties_lossy_reordering_duplicating_network(
        seed in any::<u64>(),
        ops in prop::collection::vec(op(2), 1..200),
    ) {
        run(2, seed, &ops);
    }

    #[test]
    fn three_parties_lossy_reordering_duplicating_network(
        seed in any::<u64>(),
        ops in prop::collection::vec(op(3), 1..200),
    ) {
        run(3, seed, &ops);
    }
}

/// A replay of a message from a receiving chain many ratchet steps back, past the ratchet
/// keys the session remembers, is refused and never opens twice; within them it is a
/// duplicate. Found while writing the `interaction` fuzz target's replay action.
#[test]
fn replays_never_open_twice_however_old_their_chain() {
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let mut parties = pairwise_sessions(2, &mut rng).unwrap();
    let mut ledger = ExactlyOnce::default();
    let mut sent = Vec::new();
    for id in 1..=40u32 {
        let (from, to) = if id % 2 == 1 { (0, 1) } else { (1, 0) };
        let bytes = parties[from].sessions[to]
            .as_mut()
            .unwrap()
            .encrypt(&ExactlyOnce::plaintext(id))
            .unwrap()
            .to_bytes();
        let session = parties[to].sessions[from].as_mut().unwrap();
        assert_eq!(
            ledger.deliver(session, id, &bytes, 0, &mut rng),
            Ok(Delivery::Opened)
        );
        sent.push(bytes);
    }
    let at_bob = parties[1].sessions[0].as_mut().unwrap();
    assert_eq!(
        ledger.deliver(at_bob, 1, &sent[0], 0, &mut rng),
        Ok(Delivery::ForgottenChain)
    );
    assert_eq!(
        ledger.deliver(at_bob, 39, &sent[38], 0, &mut rng),
        Ok(Delivery::Duplicate)
    );
}

/// Sessions thawed from their pickles (as the `interaction` fuzz target starts every input)
/// carry on the conversation exactly as the originals would: each thawed copy opens the
/// next message, answers, and is answered.
#[test]
fn frozen_sessions_thaw_into_sessions_that_carry_on() {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let mut parties = pairwise_sessions(2, &mut rng).unwrap();
    let frozen = FrozenSessions::freeze(&parties);
    let next = parties[0].sessions[1]
        .as_mut()
        .unwrap()
        .encrypt(b"after the freeze")
        .unwrap()
        .to_bytes();
    for _ in 0..2 {
        let mut sessions = frozen.thaw().unwrap();
        let [alice, bob] = &mut sessions[..] else {
            panic!("two parties");
        };
        let message = hush_client::message::CiphertextMessage::from_bytes(&next).unwrap();
        let bob_alice = bob[0].as_mut().unwrap();
        let opened = bob_alice.decrypt(&message, 0, &mut rng).unwrap();
        assert_eq!(opened.as_slice(), b"after the freeze");
        let reply = bob_alice.encrypt(b"reply").unwrap();
        let alice_bob = alice[1].as_mut().unwrap();
        assert_eq!(
            alice_bob.decrypt(&reply, 0, &mut rng).unwrap().as_slice(),
            b"reply"
        );
    }
}
