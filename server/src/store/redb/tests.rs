//! The redb backend's own cases, beyond the conformance suite: what it does with damaged
//! or rewritten tables, its counter, and its migration from the older layout. The
//! backend-neutral cases are in `crate::store::conformance`.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle, WriteTransaction};

use super::schema::{
    ENVELOPES, EXPIRY_QUEUE, MAILBOXES, MAILBOX_USAGE, META, META_NEXT_SEQUENCE, OLD_EXPIRY,
    OLD_MAILBOX, RETRACT_ENTRIES,
};
use super::RedbStore;
use crate::store::at_rest::{read_tag, read_u64, EXPIRES_AT};
use crate::store::conformance::{enqueue, enqueue_retractable, register, retract, NOW, TTL};
use crate::store::{MailboxUsage, Outcome, Store, Write};
use hush_protocol::DeviceAddress;

/// A write transaction on the store's database, past the store's own write paths: for
/// tests that damage or rewrite what is stored.
fn raw_write(store: &RedbStore) -> WriteTransaction {
    store
        .db
        .read()
        .unwrap()
        .as_ref()
        .unwrap()
        .begin_write()
        .unwrap()
}

/// A store holding one envelope for Bob: the store, its directory, Bob, the envelope's
/// sequence.
fn one_envelope_for_bob() -> (RedbStore, tempfile::TempDir, DeviceAddress, u64) {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let bob = register(&store, 2);
    store.apply(vec![enqueue(&[bob], b"x", NOW)]).unwrap();
    let sequence = store.backlog(&bob, None, NOW, 1).unwrap()[0].id.0;
    (store, dir, bob, sequence)
}

#[test]
fn a_corrupted_value_is_skipped_not_delivered() {
    let (store, _dir, bob, sequence) = one_envelope_for_bob();
    let txn = raw_write(&store);
    {
        let mut envelopes = txn.open_table(ENVELOPES).unwrap();
        let mut value = envelopes.get(sequence).unwrap().unwrap().value().to_vec();
        let last = value.len() - 1;
        value[last] ^= 1;
        envelopes.insert(sequence, value.as_slice()).unwrap();
    }
    txn.commit().unwrap();
    store.apply(vec![enqueue(&[bob], b"after", NOW)]).unwrap();
    let delivered = store.backlog(&bob, None, NOW, 10).unwrap();
    assert_eq!(
        delivered.len(),
        1,
        "the damaged envelope is skipped, the next one still comes"
    );
    assert_eq!(delivered[0].payload, b"after");
}

#[test]
fn an_envelope_that_lost_its_mailbox_entry_still_goes_when_it_expires() {
    let (store, _dir, bob, sequence) = one_envelope_for_bob();
    let tag = store.rules.at_rest().device_tag(&bob);
    let txn = raw_write(&store);
    {
        let mut mailboxes = txn.open_table(MAILBOXES).unwrap();
        assert!(mailboxes.remove((tag, sequence)).unwrap().is_some());
    }
    txn.commit().unwrap();
    assert_eq!(store.stats().unwrap().envelopes, 1);

    let expired = store.apply(vec![Write::Expire { now: NOW + TTL }]).unwrap();
    assert_eq!(expired, vec![Ok(Outcome::Expired { envelopes: 1 })]);
    let stats = store.stats().unwrap();
    assert_eq!(
        (stats.envelopes, stats.mailbox_entries, stats.expiry_entries),
        (0, 0, 0)
    );
    assert_eq!(store.mailbox_usage(&bob).unwrap(), MailboxUsage::default());
}

#[test]
fn an_ack_through_a_damaged_index_entry_leaves_the_other_mailbox_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let bob = register(&store, 2);
    let carol = register(&store, 3);
    store
        .apply(vec![enqueue(&[carol], b"carol's", NOW)])
        .unwrap();
    let carols = store.backlog(&carol, None, NOW, 10).unwrap()[0].id;
    // Bob's mailbox index claims Carol's envelope.
    let txn = raw_write(&store);
    txn.open_table(MAILBOXES)
        .unwrap()
        .insert((store.rules.at_rest().device_tag(&bob), carols.0), ())
        .unwrap();
    txn.commit().unwrap();

    store
        .apply(vec![Write::Ack {
            address: bob,
            ids: vec![carols],
        }])
        .unwrap();
    let left = store.backlog(&carol, None, NOW, 10).unwrap();
    assert_eq!(left.len(), 1, "Carol's envelope is still hers");
    assert_eq!(left[0].payload, b"carol's");
    assert_eq!(store.mailbox_usage(&carol).unwrap().envelopes, 1);
}

#[test]
fn sequences_continue_after_the_newest_envelope_even_without_their_counter() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let bob = register(&store, 2);
    store.apply(vec![enqueue(&[bob], b"a", NOW)]).unwrap();
    let txn = raw_write(&store);
    txn.open_table(META)
        .unwrap()
        .remove(META_NEXT_SEQUENCE)
        .unwrap();
    txn.commit().unwrap();
    drop(store);

    let store = RedbStore::open(dir.path()).unwrap();
    store.apply(vec![enqueue(&[bob], b"b", NOW)]).unwrap();
    let payloads: Vec<Vec<u8>> = store
        .backlog(&bob, None, NOW, 10)
        .unwrap()
        .into_iter()
        .map(|e| e.payload)
        .collect();
    assert_eq!(
        payloads,
        [b"a".to_vec(), b"b".to_vec()],
        "nothing overwritten"
    );
}

/// Rewrites the store's envelopes in the layout before `ENVELOPES`: one table keyed by
/// (device tag, sequence) holding the value without its tag, and the older expiry index.
fn downgrade_to_old_layout(store: &RedbStore) {
    let txn = raw_write(store);
    {
        let envelopes = txn.open_table(ENVELOPES).unwrap();
        let mut old = txn.open_table(OLD_MAILBOX).unwrap();
        let mut old_expiry = txn.open_table(OLD_EXPIRY).unwrap();
        for entry in envelopes.iter().unwrap() {
            let (sequence, value) = entry.unwrap();
            let value = value.value();
            let tag = read_tag(value).unwrap();
            let expires_at = read_u64(value, EXPIRES_AT).unwrap();
            old.insert((tag, sequence.value()), &value[16..]).unwrap();
            old_expiry
                .insert((expires_at, tag, sequence.value()), ())
                .unwrap();
        }
    }
    for table in [ENVELOPES.name(), MAILBOXES.name(), EXPIRY_QUEUE.name()] {
        let definition: TableDefinition<(), ()> = TableDefinition::new(table);
        assert!(txn.delete_table(definition).unwrap());
    }
    txn.commit().unwrap();
}

#[test]
fn a_store_in_the_older_layout_is_migrated_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let bob = register(&store, 2);
    let carol = register(&store, 3);
    store
        .apply(vec![
            enqueue(&[bob, carol], b"both", NOW),
            enqueue_retractable(&[bob], 7, NOW),
            enqueue(&[carol], b"soon", NOW - TTL + 10),
        ])
        .unwrap();
    downgrade_to_old_layout(&store);
    // A damaged old record (too short to hold its expiry) is moved too, to expire at once.
    let txn = raw_write(&store);
    let (bobs, damaged_sequence) = (
        store.rules.at_rest().device_tag(&bob),
        store.next_sequence.load(Ordering::Relaxed),
    );
    txn.open_table(OLD_MAILBOX)
        .unwrap()
        .insert((bobs, damaged_sequence), &[1u8, 2, 3][..])
        .unwrap();
    {
        let mut usage = txn.open_table(MAILBOX_USAGE).unwrap();
        let (count, bytes) = usage.get(bobs).unwrap().unwrap().value();
        usage.insert(bobs, (count + 1, bytes)).unwrap();
    }
    txn.commit().unwrap();
    drop(store);

    let store = RedbStore::open(dir.path()).unwrap();
    let payloads = |device| -> Vec<Vec<u8>> {
        let backlog = store.backlog(device, None, NOW, 10).unwrap();
        backlog.into_iter().map(|e| e.payload).collect()
    };
    assert_eq!(payloads(&bob), vec![b"both".to_vec(), vec![7]]);
    assert_eq!(payloads(&carol), vec![b"both".to_vec(), b"soon".to_vec()]);
    let stats = store.stats().unwrap();
    assert_eq!(
        (stats.envelopes, stats.mailbox_entries, stats.expiry_entries),
        (5, 5, 5)
    );
    let tables: Vec<String> = {
        let txn = store.begin_read().unwrap();
        let names = txn.list_tables().unwrap().map(|t| t.name().to_owned());
        names.collect()
    };
    assert!(!tables.iter().any(|t| t == "mailbox" || t == "expiry"));

    // The migrated envelopes carry on: the expiry index, retraction and usage still work.
    let expired = store.apply(vec![Write::Expire { now: NOW + 10 }]).unwrap();
    assert_eq!(expired, vec![Ok(Outcome::Expired { envelopes: 2 })]);
    let retracted = store.apply(vec![retract(&[7])]).unwrap();
    assert_eq!(retracted, vec![Ok(Outcome::Retracted { count: 1 })]);
    assert_eq!(store.mailbox_usage(&bob).unwrap().envelopes, 1);
    assert_eq!(payloads(&carol), vec![b"both".to_vec()]);
}

/// The device-removal part of
/// `conformance::envelopes::the_retract_index_goes_with_acked_expired_and_removed_envelopes`,
/// checked on redb's own table of retraction entries too.
#[test]
fn a_removed_devices_copies_leave_the_retraction_entries_table() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let bob = register(&store, 2);
    let added = store
        .apply(vec![Write::AddDevice {
            account: bob.account,
            device_key: [42; 32],
            max_devices: 5,
        }])
        .unwrap();
    let Ok(Outcome::DeviceAdded(device)) = added[0] else {
        panic!("{added:?}")
    };
    let bob2 = DeviceAddress {
        account: bob.account,
        device,
    };
    store
        .apply(vec![enqueue_retractable(&[bob, bob2], 3, NOW)])
        .unwrap();
    store
        .apply(vec![Write::RemoveDevice { address: bob2 }])
        .unwrap();
    let stats = store.stats().unwrap();
    assert_eq!((stats.envelopes, stats.retract_entries), (1, 1));
    let txn = store.begin_read().unwrap();
    assert_eq!(txn.open_table(RETRACT_ENTRIES).unwrap().len().unwrap(), 1);
}
