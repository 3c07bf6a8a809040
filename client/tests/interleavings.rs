//! Property test: two and three parties talking over a network that loses, reorders and
//! duplicates messages. Every message that arrives decrypts exactly once; duplicates are
//! refused; nothing that arrives is lost.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;

use hush_client::message::CiphertextMessage;
use hush_client::protocol::{DeviceBundle, DeviceId};
use hush_client::{CryptoError, IdentityKeyPair, PeerBundle, PrekeySet, Session};
use proptest::prelude::*;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

struct Party {
    identity: IdentityKeyPair,
    /// sessions[j]: the session with party j.
    sessions: Vec<Option<Session>>,
}

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

/// Parties with pairwise sessions: i initiates to j for i < j, and the first message is
/// delivered so that both sides hold the session.
fn setup(n: usize, rng: &mut ChaCha20Rng) -> Vec<Party> {
    let mut parties: Vec<Party> = (0..n)
        .map(|_| Party {
            identity: IdentityKeyPair::generate_with(rng),
            sessions: (0..n).map(|_| None).collect(),
        })
        .collect();
    for j in 0..n {
        let mut prekeys = PrekeySet::default();
        let mut upload = prekeys.rotate(&parties[j].identity, 0, rng);
        let more = prekeys.replenish(&parties[j].identity, n as u32, rng);
        upload.one_time = more.one_time;
        upload.kem_one_time = more.kem_one_time;
        for i in 0..j {
            let bundle = DeviceBundle {
                device: DeviceId(1),
                device_key: [0; 32],
                signed_prekey: upload.signed_prekey.clone(),
                one_time: Some(upload.one_time[i].clone()),
                kem: Some(upload.kem_one_time[i].clone()),
                kem_is_last_resort: false,
            };
            let peer =
                PeerBundle::verify(&parties[j].identity.public().to_bytes(), &bundle).unwrap();
            let mut session = Session::initiate(&parties[i].identity, &peer, rng).unwrap();
            let CiphertextMessage::Prekey(first) = session.encrypt(b"hello").unwrap() else {
                panic!("first message is a prekey message")
            };
            let (accepted, plaintext, used) =
                Session::accept(&parties[j].identity, &prekeys, &first, 0, rng).unwrap();
            assert_eq!(plaintext.as_slice(), b"hello");
            prekeys.consume(used);
            parties[i].sessions[j] = Some(session);
            parties[j].sessions[i] = Some(accepted);
        }
    }
    parties
}

fn deliver(
    parties: &mut [Party],
    message: &InFlight,
    rng: &mut ChaCha20Rng,
    delivered: &mut HashSet<u32>,
) {
    let session = parties[message.to].sessions[message.from].as_mut().unwrap();
    let parsed = CiphertextMessage::from_bytes(&message.bytes).unwrap();
    match session.decrypt(&parsed, 0, rng) {
        Ok(plaintext) => {
            let id = u32::from_be_bytes(plaintext[..4].try_into().unwrap());
            assert_eq!(id, message.id);
            assert!(delivered.insert(id), "message {id} decrypted twice");
        }
        Err(CryptoError::DuplicateMessage) => {
            assert!(
                delivered.contains(&message.id),
                "fresh message {} refused",
                message.id
            );
        }
        Err(other) => panic!("message {} failed: {other}", message.id),
    }
}

fn run(n: usize, seed: u64, ops: &[Op]) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut parties = setup(n, &mut rng);
    let mut network: Vec<InFlight> = Vec::new();
    let mut delivered = HashSet::new();
    let mut dropped = HashSet::new();
    let mut next_id = 0u32;
    for op in ops {
        match *op {
            Op::Send { from, to } if from != to => {
                next_id += 1;
                let session = parties[from].sessions[to].as_mut().unwrap();
                let bytes = session.encrypt(&next_id.to_be_bytes()).unwrap().to_bytes();
                network.push(InFlight {
                    from,
                    to,
                    id: next_id,
                    bytes,
                });
            }
            Op::Deliver { pick } if !network.is_empty() => {
                let message = network.remove(pick % network.len());
                deliver(&mut parties, &message, &mut rng, &mut delivered);
            }
            Op::Duplicate { pick } if !network.is_empty() => {
                let message = &network[pick % network.len()];
                let copy = InFlight {
                    from: message.from,
                    to: message.to,
                    id: message.id,
                    bytes: message.bytes.clone(),
                };
                deliver(&mut parties, &copy, &mut rng, &mut delivered);
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
        deliver(&mut parties, &message, &mut rng, &mut delivered);
    }
    // A dropped message may still have arrived as an earlier duplicate.
    for id in 1..=next_id {
        assert!(
            delivered.contains(&id) || dropped.contains(&id),
            "message {id} was neither delivered nor dropped"
        );
    }
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
