//! End-to-end crypto micro-benchmarks, side by side with vodozemac's Olm (Matrix's Double
//! Ratchet in Rust) for the comparable operations.
//!
//! `cargo bench -p hush-bench --bench e2e`
//!
//! - `symmetric`: one 256-byte message encrypted and decrypted on an established chain.
//! - `dh_step`: one 256-byte message that makes both sides take a DH ratchet step (the
//!   direction alternates every message).
//! - `sealed`: sealing a 256-byte message for a recipient and opening it (vodozemac has
//!   no sealed sender; listed for scale).
//! - `call_media`: one 160-byte audio frame sealed and opened (a call carries 50 a second
//!   each way).
//! - `setup`: a session set up and its first message opened. Hush's is PQXDH (four X25519
//!   agreements plus ML-KEM-768); Olm's is 3DH without a KEM, so it is listed, not
//!   compared.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use hush_client::message::CiphertextMessage;
use hush_client::protocol::{DeviceBundle, DeviceId};
use hush_client::{IdentityKeyPair, PeerBundle, PrekeySet, Session};
use rand_core::OsRng;
use vodozemac::olm::{Account, OlmMessage, Session as OlmSession, SessionConfig};

const PAYLOAD: [u8; 256] = [0x42; 256];

struct HushPair {
    alice: Session,
    bob: Session,
}

struct HushSetup {
    alice: IdentityKeyPair,
    bob: IdentityKeyPair,
    bob_prekeys: PrekeySet,
    bundle: DeviceBundle,
}

fn hush_setup() -> HushSetup {
    let alice = IdentityKeyPair::generate();
    let bob = IdentityKeyPair::generate();
    let mut bob_prekeys = PrekeySet::default();
    let rotated = bob_prekeys.rotate(&bob, 0, &mut OsRng);
    let fresh = bob_prekeys.replenish(&bob, 1, &mut OsRng);
    let bundle = DeviceBundle {
        device: DeviceId(1),
        device_key: [0; 32],
        signed_prekey: rotated.signed_prekey,
        one_time: Some(fresh.one_time[0].clone()),
        kem: Some(fresh.kem_one_time[0].clone()),
        kem_is_last_resort: false,
    };
    HushSetup {
        alice,
        bob,
        bob_prekeys,
        bundle,
    }
}

fn hush_establish(setup: &HushSetup) -> HushPair {
    let peer = PeerBundle::verify(&setup.bob.public().to_bytes(), &setup.bundle).unwrap();
    let mut alice = Session::initiate(&setup.alice, &peer, &mut OsRng).unwrap();
    let CiphertextMessage::Prekey(first) = alice.encrypt(&PAYLOAD).unwrap() else {
        panic!("expected a prekey message")
    };
    let (mut bob, _, _) =
        Session::accept(&setup.bob, &setup.bob_prekeys, &first, 0, &mut OsRng).unwrap();
    let reply = bob.encrypt(&PAYLOAD).unwrap();
    alice.decrypt(&reply, 0, &mut OsRng).unwrap();
    HushPair { alice, bob }
}

fn olm_establish() -> (OlmSession, OlmSession) {
    let alice = Account::new();
    let mut bob = Account::new();
    bob.generate_one_time_keys(1);
    let one_time = *bob.one_time_keys().values().next().unwrap();
    bob.mark_keys_as_published();
    let mut alice_session =
        alice.create_outbound_session(SessionConfig::version_2(), bob.curve25519_key(), one_time);
    let OlmMessage::PreKey(first) = alice_session.encrypt(PAYLOAD) else {
        panic!("expected a pre-key message")
    };
    let mut bob_session = bob
        .create_inbound_session(alice.curve25519_key(), &first)
        .unwrap()
        .session;
    let reply = bob_session.encrypt(PAYLOAD);
    alice_session.decrypt(&reply).unwrap();
    (alice_session, bob_session)
}

fn symmetric(c: &mut Criterion) {
    let mut group = c.benchmark_group("symmetric");
    group.throughput(Throughput::Elements(1));
    let setup = hush_setup();
    let mut hush = hush_establish(&setup);
    group.bench_function("hush", |b| {
        b.iter(|| {
            let message = hush.alice.encrypt(&PAYLOAD).unwrap();
            hush.bob.decrypt(&message, 0, &mut OsRng).unwrap()
        });
    });
    let (mut alice, mut bob) = olm_establish();
    group.bench_function("vodozemac", |b| {
        b.iter(|| {
            let message = alice.encrypt(PAYLOAD);
            bob.decrypt(&message).unwrap()
        });
    });
    group.finish();
}

fn dh_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("dh_step");
    group.throughput(Throughput::Elements(1));
    let setup = hush_setup();
    let mut hush = hush_establish(&setup);
    let mut forward = true;
    group.bench_function("hush", |b| {
        b.iter(|| {
            let (from, to) = if forward {
                (&mut hush.alice, &mut hush.bob)
            } else {
                (&mut hush.bob, &mut hush.alice)
            };
            forward = !forward;
            let message = from.encrypt(&PAYLOAD).unwrap();
            to.decrypt(&message, 0, &mut OsRng).unwrap()
        });
    });
    let (mut alice, mut bob) = olm_establish();
    let mut forward = true;
    group.bench_function("vodozemac", |b| {
        b.iter(|| {
            let (from, to) = if forward {
                (&mut alice, &mut bob)
            } else {
                (&mut bob, &mut alice)
            };
            forward = !forward;
            let message = from.encrypt(PAYLOAD);
            to.decrypt(&message).unwrap()
        });
    });
    group.finish();
}

fn setup(c: &mut Criterion) {
    let mut group = c.benchmark_group("setup");
    group.sample_size(30);
    let setup = hush_setup();
    group.bench_function("hush_pqxdh", |b| {
        b.iter(|| {
            let peer = PeerBundle::verify(&setup.bob.public().to_bytes(), &setup.bundle).unwrap();
            let mut alice = Session::initiate(&setup.alice, &peer, &mut OsRng).unwrap();
            let CiphertextMessage::Prekey(first) = alice.encrypt(&PAYLOAD).unwrap() else {
                panic!("expected a prekey message")
            };
            Session::accept(&setup.bob, &setup.bob_prekeys, &first, 0, &mut OsRng).unwrap()
        });
    });
    group.bench_function("vodozemac_3dh", |b| {
        b.iter_batched(
            || {
                let alice = Account::new();
                let mut bob = Account::new();
                bob.generate_one_time_keys(1);
                (alice, bob)
            },
            |(alice, mut bob)| {
                let one_time = *bob.one_time_keys().values().next().unwrap();
                let mut session = alice.create_outbound_session(
                    SessionConfig::version_2(),
                    bob.curve25519_key(),
                    one_time,
                );
                let OlmMessage::PreKey(first) = session.encrypt(PAYLOAD) else {
                    panic!("expected a pre-key message")
                };
                bob.create_inbound_session(alice.curve25519_key(), &first)
                    .unwrap()
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn sealed_sender(c: &mut Criterion) {
    use ed25519_dalek::{Signer, SigningKey};
    use hush_client::protocol::sealed::{SenderCertificate, SenderCertificateBody};
    use hush_client::protocol::{AccountId, DeviceId};

    let mut group = c.benchmark_group("sealed");
    group.throughput(Throughput::Elements(1));
    let relay = SigningKey::generate(&mut OsRng);
    let relay_key = relay.verifying_key().to_bytes();
    let alice = IdentityKeyPair::generate();
    let bob = IdentityKeyPair::generate();
    let certificate = SenderCertificate::issue(
        &SenderCertificateBody {
            account: AccountId([1; 16]),
            device: DeviceId(1),
            identity_key: alice.public().to_bytes().to_vec(),
            expires_at: u64::MAX,
        },
        |transcript| relay.sign(transcript).to_bytes(),
    );
    group.bench_function("seal", |b| {
        b.iter(|| {
            hush_client::sealed::seal(&alice, &certificate, bob.public(), 1, &PAYLOAD, &mut OsRng)
                .unwrap()
        });
    });
    let sealed =
        hush_client::sealed::seal(&alice, &certificate, bob.public(), 1, &PAYLOAD, &mut OsRng)
            .unwrap();
    group.bench_function("open", |b| {
        b.iter(|| hush_client::sealed::open(&bob, 1, &relay_key, &sealed, 0).unwrap());
    });
    // What a client pays once it has met the peer: the static agreement and the
    // certificate's signature are remembered (the client keeps one cache).
    let mut sending = hush_client::sealed::SealCache::default();
    group.bench_function("seal_cached", |b| {
        b.iter(|| {
            hush_client::sealed::seal_cached(
                &mut sending,
                &alice,
                &certificate,
                bob.public(),
                1,
                &PAYLOAD,
                &mut OsRng,
            )
            .unwrap()
        });
    });
    let mut receiving = hush_client::sealed::SealCache::default();
    group.bench_function("open_cached", |b| {
        b.iter(|| {
            hush_client::sealed::open_cached(&mut receiving, &bob, 1, &relay_key, &sealed, 0)
                .unwrap()
        });
    });
    group.finish();
}

fn call_media(c: &mut Criterion) {
    use hush_client::media::{CallKey, Direction, MediaReceiver, MediaSender};

    let mut group = c.benchmark_group("call_media");
    group.throughput(Throughput::Elements(1));
    let key = CallKey::generate();
    let mut sender = MediaSender::new(&key, [1; 16], Direction::FromCaller, 7);
    let mut receiver = MediaReceiver::new(&key, [1; 16], Direction::FromCaller, 7);
    let frame = [0x42u8; 160];
    group.bench_function("seal_open_160B", |b| {
        b.iter(|| receiver.open(&sender.seal(&frame).unwrap()).unwrap());
    });
    group.finish();
}

criterion_group!(
    benches,
    symmetric,
    dh_step,
    sealed_sender,
    call_media,
    setup
);
criterion_main!(benches);
