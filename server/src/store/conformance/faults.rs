//! Storage faults under the store's real write paths, after redb's own approach: the
//! backend runs on a simulated disk ([`SharedDisk`]) that starts failing after N mutating
//! operations, N swept over the whole run. Three faults: the process dies (reopen from
//! everything written), the power is cut (reopen from what was synced), and the disk heals
//! (the same store carries on, as when a full disk gets space back). After reopening, the
//! store holds exactly what was acknowledged.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use hush_protocol::{DeviceAddress, OutgoingEnvelope};

use super::disk::SharedDisk;
use super::{enqueue, register, StoreFactory};
use crate::commit::{CommitError, Committer};
use crate::keyring::DAY;
use crate::store::{BackendFailure, MailboxQuota, Store, StoreError, Write, WriteResult};

const NOW: u64 = 1_800_000_000;
/// Envelopes that the sweeps in the run delete expire at `NOW + SHORT`.
const SHORT: u64 = 10;
/// The sweeps run at this time.
const SWEEP_AT: u64 = NOW + 2 * SHORT;
const LONG: u64 = 14 * DAY;
/// Rounds of group commits, acks and sweeps in one run.
const ROUNDS: usize = 24;
/// Enqueues in flight together, so that the committer batches them.
const IN_FLIGHT: usize = 4;
/// Failing operations before a healing disk works again.
const FAILURES_BEFORE_HEALING: u64 = 6;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// The process dies at the fault: whatever reached the OS stays.
    Crash,
    /// The power goes at the fault: only what was synced stays.
    PowerCut,
    /// The disk fails for a while and heals; the same store carries on.
    Healing,
}

/// What the store must hold of one envelope, given the outcomes it reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Enqueue acknowledged, no deletion attempted: present.
    Stored,
    /// A write about it failed: present or not.
    Either,
    /// Deletion acknowledged: absent.
    Deleted,
}

struct Sent {
    recipient: DeviceAddress,
    expires_at: u64,
    fate: Fate,
}

/// The reference: every envelope submitted, by payload.
#[derive(Default)]
struct Reference(BTreeMap<Vec<u8>, Sent>);

impl Reference {
    /// Records the outcome of a deletion of `payload`.
    fn deletion(&mut self, payload: &[u8], acknowledged: bool) {
        let sent = self.0.get_mut(payload).unwrap();
        sent.fate = match (acknowledged, sent.fate) {
            (true, _) | (false, Fate::Deleted) => Fate::Deleted,
            (false, _) => Fate::Either,
        };
    }
}

/// Whether a commit was acknowledged. Failures must be typed storage errors: a panic in
/// the commit thread would show as `Stopped`.
fn acknowledged(outcome: &Result<WriteResult, CommitError>) -> bool {
    match outcome {
        Ok(Ok(_)) => true,
        Ok(Err(refusal)) => panic!("no write in this run is refused, got {refusal:?}"),
        Err(CommitError::Storage) => false,
        Err(CommitError::Stopped) => panic!("the commit thread died"),
    }
}

/// What one run did.
struct Run {
    /// The disk's mutating operations before the last round (whose commits fail if the
    /// fault came before them; a failed best-effort write after the last sync fails none).
    operations: u64,
    /// Commits acknowledged after the first failed one.
    recovered: usize,
    /// Commits that failed.
    failed: usize,
}

/// Runs group commits, acks and sweeps on a disk that fails after `budget` operations,
/// then reopens the store as `fault` leaves it and checks it against the reference.
fn run<F: StoreFactory>(budget: Option<u64>, fault: Fault) -> Run {
    let keys = tempfile::tempdir().unwrap();
    let disk = SharedDisk::default();
    let store = Arc::new(F::open_with_faults(keys.path(), &disk).unwrap());
    let recipients = [register(store.as_ref(), 1), register(store.as_ref(), 2)];
    {
        let mut disk = disk.lock();
        disk.budget = budget;
        disk.operations = 0;
        disk.heals_after = (fault == Fault::Healing).then_some(FAILURES_BEFORE_HEALING);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (committer, commit_thread) =
        Committer::start(store.clone() as Arc<dyn Store>, |_: &mut [_]| {}, || {}).unwrap();
    let mut reference = Reference::default();
    let (mut failed, mut recovered) = (0, 0);
    let mut tally = |ok: bool| {
        if ok && failed > 0 {
            recovered += 1;
        }
        if !ok {
            failed += 1;
        }
        ok
    };
    let mut operations = 0;
    runtime.block_on(async {
        for round in 0..ROUNDS {
            operations = disk.lock().operations;
            // One group commit: the enqueues are all queued before any is awaited.
            let mut pending = Vec::new();
            for k in 0..IN_FLIGHT {
                let payload = format!("round {round} envelope {k}").into_bytes();
                let recipient = recipients[k % recipients.len()];
                let expires_at = if k == 0 { NOW + SHORT } else { NOW + LONG };
                let write = Write::Enqueue {
                    envelopes: vec![OutgoingEnvelope {
                        recipients: vec![recipient],
                        payload: payload.clone(),
                        retract_tag: None,
                    }],
                    quota: MailboxQuota::UNLIMITED,
                    received_at: NOW,
                    expires_at,
                };
                pending.push((payload.clone(), committer.submit(write).await));
                reference.0.insert(
                    payload,
                    Sent {
                        recipient,
                        expires_at,
                        fate: Fate::Either,
                    },
                );
            }
            for (payload, pending) in pending {
                if tally(acknowledged(&pending.outcome().await)) {
                    reference.0.get_mut(&payload).unwrap().fate = Fate::Stored;
                }
            }
            // The first recipient acknowledges the two oldest envelopes it can see.
            if round % 3 == 1 {
                if let Ok(backlog) = store.backlog(&recipients[0], None, NOW, 2) {
                    let ids = backlog.iter().map(|e| e.id).collect();
                    let ack = Write::Ack {
                        address: recipients[0],
                        ids,
                    };
                    let ok = tally(acknowledged(&committer.commit(ack).await));
                    for envelope in &backlog {
                        reference.deletion(&envelope.payload, ok);
                    }
                }
            }
            // A sweep deletes every short-lived envelope sent so far.
            if round % 5 == 4 {
                let ok = tally(acknowledged(
                    &committer.commit(Write::Expire { now: SWEEP_AT }).await,
                ));
                let swept: Vec<Vec<u8>> = reference
                    .0
                    .iter()
                    .filter(|(_, sent)| sent.expires_at <= SWEEP_AT)
                    .map(|(payload, _)| payload.clone())
                    .collect();
                for payload in swept {
                    reference.deletion(&payload, ok);
                }
            }
        }
    });
    drop(committer);
    commit_thread.join();
    drop(store);

    let image = {
        let disk = disk.lock();
        match fault {
            Fault::Crash | Fault::Healing => disk.written.clone(),
            Fault::PowerCut => disk.synced.clone(),
        }
    };
    check::<F>(keys.path(), image, &reference, &recipients);
    Run {
        operations,
        recovered,
        failed,
    }
}

/// Reopens `image` on a healthy disk and compares the store with the reference.
fn check<F: StoreFactory>(
    keys: &Path,
    image: Vec<u8>,
    reference: &Reference,
    recipients: &[DeviceAddress],
) {
    let disk = SharedDisk::with_image(image);
    assert!(F::image_is_intact(&disk), "the backend's integrity check");
    let store = F::open_with_faults(keys, &disk).unwrap();
    let mut present = BTreeMap::new();
    for recipient in recipients {
        for envelope in store.backlog(recipient, None, NOW, usize::MAX).unwrap() {
            assert!(
                present.insert(envelope.payload, *recipient).is_none(),
                "an envelope is stored once"
            );
        }
    }
    let held = present.len() as u64;
    for (payload, sent) in &reference.0 {
        let found = present.remove(payload);
        assert!(
            found.is_none_or(|to| to == sent.recipient),
            "an envelope stays in its recipient's mailbox"
        );
        match sent.fate {
            Fate::Stored => assert!(found.is_some(), "an acknowledged envelope is lost"),
            Fate::Deleted => assert!(found.is_none(), "an acknowledged deletion is undone"),
            Fate::Either => {}
        }
    }
    assert!(present.is_empty(), "the store holds envelopes never sent");
    let stats = store.stats().unwrap();
    assert_eq!(
        (stats.envelopes, stats.mailbox_entries, stats.expiry_entries),
        (held, held, held),
        "no envelope is stored beyond the mailboxes, and the indexes agree"
    );
}

/// Runs `fault` at every `step`-th operation of an unfaulted run. (How the committer
/// batches varies with timing, so a run's operation count does too.)
fn sweep<F: StoreFactory>(fault: Fault) {
    let clean = run::<F>(None, fault);
    assert_eq!(clean.failed, 0);
    let step = (clean.operations / 50).max(1);
    let (mut hit, mut recovered) = (0, 0);
    let mut budget = 0;
    while budget < clean.operations {
        let run = run::<F>(Some(budget), fault);
        if budget < run.operations {
            assert!(
                run.failed > 0,
                "the failed write at {budget} failed a commit"
            );
            hit += 1;
        }
        recovered += run.recovered;
        budget += step;
    }
    eprintln!("{fault:?}: {hit} faults injected, every {step} operations");
    assert!(hit >= 40, "the faults were reached");
    if fault == Fault::Healing {
        assert!(recovered > 0, "commits succeed again once the disk heals");
    }
}

pub(super) fn a_crash_at_any_write_keeps_exactly_what_was_acknowledged<F: StoreFactory>() {
    sweep::<F>(Fault::Crash);
}

pub(super) fn a_power_cut_at_any_write_keeps_exactly_what_was_acknowledged<F: StoreFactory>() {
    sweep::<F>(Fault::PowerCut);
}

pub(super) fn the_store_recovers_in_place_when_a_failing_disk_heals<F: StoreFactory>() {
    sweep::<F>(Fault::Healing);
}

/// The disk-full behaviour the relay relies on (`tests/tests/disk_full.rs` shows it end to
/// end): a batch on a full disk fails as a typed backend error that says the disk is full,
/// never a panic and never an answer; the store keeps what was acknowledged; once space
/// returns, the same store takes writes again without a restart.
pub(super) fn a_full_disk_fails_the_batch_with_a_typed_error_and_keeps_what_was_acknowledged<
    F: StoreFactory,
>() {
    let keys = tempfile::tempdir().unwrap();
    let disk = SharedDisk::default();
    let store = F::open_with_faults(keys.path(), &disk).unwrap();
    let bob = register(&store, 2);
    store.apply(vec![enqueue(&[bob], b"before", NOW)]).unwrap();
    {
        let mut disk = disk.lock();
        disk.budget = Some(0);
        disk.heals_after = None;
    }
    let failed = store.apply(vec![enqueue(&[bob], b"refused", NOW)]);
    assert!(
        matches!(
            failed,
            Err(StoreError::Backend {
                kind: BackendFailure::Full,
                ..
            })
        ),
        "{failed:?}"
    );
    // Still full: still a typed failure (the store may be closed, waiting to reopen).
    let still = store.apply(vec![enqueue(&[bob], b"refused too", NOW)]);
    assert!(
        matches!(
            still,
            Err(StoreError::Backend { .. } | StoreError::Reopening)
        ),
        "{still:?}"
    );
    // Space returns: the same store carries on.
    disk.lock().budget = None;
    let mut recovered = None;
    for _ in 0..3 {
        recovered = Some(store.apply(vec![enqueue(&[bob], b"after", NOW)]));
        if matches!(recovered, Some(Ok(_))) {
            break;
        }
    }
    assert!(matches!(recovered, Some(Ok(_))), "{recovered:?}");
    let held: Vec<Vec<u8>> = store
        .backlog(&bob, None, NOW, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|e| e.payload)
        .collect();
    assert_eq!(held, vec![b"before".to_vec(), b"after".to_vec()]);
    let stats = store.stats().unwrap();
    assert_eq!(
        (stats.envelopes, stats.mailbox_entries, stats.expiry_entries),
        (2, 2, 2)
    );
}
