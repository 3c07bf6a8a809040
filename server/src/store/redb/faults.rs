//! Storage faults under the store's real write paths, after redb's own approach: the
//! database runs on a simulated disk that starts failing after N mutating operations, N
//! swept over the whole run. Three faults: the process dies (reopen from everything
//! written), the power is cut (reopen from what was synced), and the disk heals (the same
//! store carries on, as when a full disk gets space back). After reopening, the store
//! holds exactly what was acknowledged.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use hush_protocol::{DeviceAddress, OutgoingEnvelope};
use redb::{Builder, Database, StorageBackend};

use super::tests::register;
use super::RedbStore;
use crate::commit::{CommitError, Committer};
use crate::keyring::DAY;
use crate::store::{MailboxQuota, Store, Write, WriteResult};

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

/// The bytes of a simulated disk, shared by every backend opened on it.
#[derive(Default)]
struct Disk {
    /// What the OS holds: every write so far.
    written: Vec<u8>,
    /// What survives a power cut: `written` as of the last `sync_data`.
    synced: Vec<u8>,
    /// Mutating operations (write, set_len, sync_data) left before the disk fails.
    budget: Option<u64>,
    /// Once failing, how many more operations fail before the disk heals (None: never).
    heals_after: Option<u64>,
    /// Mutating operations since the budget was set, failed ones included.
    operations: u64,
}

impl Disk {
    /// Counts one mutating operation and says whether it may go ahead.
    fn spend(&mut self) -> io::Result<()> {
        self.operations += 1;
        match self.budget {
            None => Ok(()),
            Some(left) if left > 0 => {
                self.budget = Some(left - 1);
                Ok(())
            }
            Some(_) => {
                match &mut self.heals_after {
                    Some(0) => self.budget = None,
                    Some(left) => *left -= 1,
                    None => {}
                }
                Err(io::Error::new(io::ErrorKind::StorageFull, "injected fault"))
            }
        }
    }
}

#[derive(Clone, Default)]
struct SharedDisk(Arc<Mutex<Disk>>);

impl SharedDisk {
    /// A disk whose every byte, written and synced, is `image`.
    fn with_image(image: Vec<u8>) -> Self {
        SharedDisk(Arc::new(Mutex::new(Disk {
            written: image.clone(),
            synced: image,
            ..Disk::default()
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Disk> {
        self.0.lock().unwrap()
    }

    fn backend(&self) -> DiskBackend {
        DiskBackend(self.clone())
    }
}

/// One open handle on a [`SharedDisk`].
struct DiskBackend(SharedDisk);

impl fmt::Debug for DiskBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DiskBackend")
    }
}

fn out_of_range() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "out of range")
}

impl StorageBackend for DiskBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.lock().written.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let disk = self.0.lock();
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let bytes = disk
            .written
            .get(start..start + out.len())
            .ok_or_else(out_of_range)?;
        out.copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut disk = self.0.lock();
        disk.spend()?;
        disk.written
            .resize(usize::try_from(len).map_err(|_| out_of_range())?, 0);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut disk = self.0.lock();
        disk.spend()?;
        disk.synced = disk.written.clone();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut disk = self.0.lock();
        disk.spend()?;
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        disk.written
            .get_mut(start..start + data.len())
            .ok_or_else(out_of_range)?
            .copy_from_slice(data);
        Ok(())
    }
}

fn open_store(keys_dir: &Path, disk: &SharedDisk) -> Result<RedbStore, super::StoreError> {
    let disk = disk.clone();
    RedbStore::open_with(
        keys_dir,
        Box::new(move || Builder::new().create_with_backend(disk.backend())),
    )
}

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
fn run(budget: Option<u64>, fault: Fault) -> Run {
    let keys = tempfile::tempdir().unwrap();
    let disk = SharedDisk::default();
    let store = Arc::new(open_store(keys.path(), &disk).unwrap());
    let recipients = [register(&store, 1), register(&store, 2)];
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
        Committer::start(store.clone(), |_: &mut [_]| {}, || {}).unwrap();
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
    check(keys.path(), image, &reference, &recipients);
    Run {
        operations,
        recovered,
        failed,
    }
}

/// Reopens `image` on a healthy disk and compares the store with the reference.
fn check(keys: &Path, image: Vec<u8>, reference: &Reference, recipients: &[DeviceAddress]) {
    let disk = SharedDisk::with_image(image);
    {
        let mut db: Database = Builder::new()
            .create_with_backend(disk.backend())
            .expect("the image reopens");
        assert!(db.check_integrity().unwrap(), "redb's integrity check");
    }
    let store = open_store(keys, &disk).unwrap();
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
fn sweep(fault: Fault) {
    let clean = run(None, fault);
    assert_eq!(clean.failed, 0);
    let step = (clean.operations / 50).max(1);
    let (mut hit, mut recovered) = (0, 0);
    let mut budget = 0;
    while budget < clean.operations {
        let run = run(Some(budget), fault);
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

#[test]
fn a_crash_at_any_write_keeps_exactly_what_was_acknowledged() {
    sweep(Fault::Crash);
}

#[test]
fn a_power_cut_at_any_write_keeps_exactly_what_was_acknowledged() {
    sweep(Fault::PowerCut);
}

#[test]
fn the_store_recovers_in_place_when_a_failing_disk_heals() {
    sweep(Fault::Healing);
}
