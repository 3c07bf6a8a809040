#![allow(clippy::unwrap_used)]

use hush_protocol::sealed::retract_tag;
use hush_protocol::{
    AccountId, DeviceAddress, DeviceId, EnvelopeId, OutgoingEnvelope, SealedEnvelope,
};

use super::*;
use crate::cdr::CallRecord;
use crate::clock::{Clock, ManualClock};
use crate::store::{MailboxQuota, MailboxUsage, Outcome, Refusal, Store, Write};
use hush_protocol::CallOutcome;

const NOW: u64 = 1_800_000_000;
const TTL: u64 = 14 * DAY;

pub(super) fn register(store: &RedbStore, account: u8) -> DeviceAddress {
    let result = store
        .apply(vec![Write::Register {
            account: AccountId([account; 16]),
            identity_key: vec![account],
            device_key: [account; 32],
            invite: None,
            require_invite: false,
        }])
        .unwrap();
    assert_eq!(result, vec![Ok(Outcome::Registered)]);
    DeviceAddress {
        account: AccountId([account; 16]),
        device: DeviceId::PRIMARY,
    }
}

/// Lets anyone send sealed envelopes to `device`'s account.
fn open_to_anyone(store: &RedbStore, device: DeviceAddress) {
    store
        .apply(vec![Write::SetDeliveryAccess {
            account: device.account,
            token_hash: None,
            allow_unknown_senders: true,
        }])
        .unwrap();
}

/// Adds a device with key `[key; 32]` to `primary`'s account.
fn add_device(store: &RedbStore, primary: DeviceAddress, key: u8) -> DeviceAddress {
    let added = store
        .apply(vec![Write::AddDevice {
            account: primary.account,
            device_key: [key; 32],
            max_devices: 5,
        }])
        .unwrap();
    let Ok(Outcome::DeviceAdded(device)) = added[0] else {
        panic!("{added:?}")
    };
    DeviceAddress {
        account: primary.account,
        device,
    }
}

fn enqueue(to: &[DeviceAddress], payload: &[u8], at: u64) -> Write {
    Write::Enqueue {
        envelopes: vec![OutgoingEnvelope {
            recipients: to.to_vec(),
            payload: payload.to_vec(),
            retract_tag: None,
        }],
        quota: MailboxQuota::UNLIMITED,
        received_at: at,
        expires_at: at + TTL,
    }
}

/// An envelope with the retraction tag of `secret`.
fn enqueue_retractable(to: &[DeviceAddress], secret: u8, at: u64) -> Write {
    Write::Enqueue {
        envelopes: vec![OutgoingEnvelope {
            recipients: to.to_vec(),
            payload: vec![secret],
            retract_tag: Some(retract_tag(&[secret; 32])),
        }],
        quota: MailboxQuota::UNLIMITED,
        received_at: at,
        expires_at: at + TTL,
    }
}

fn retract(secrets: &[u8]) -> Write {
    Write::Retract {
        tags: secrets.iter().map(|s| retract_tag(&[*s; 32])).collect(),
    }
}

fn sealed(to: DeviceAddress, devices: &[u32], access: Option<[u8; 16]>) -> Write {
    Write::SealedEnqueue {
        envelopes: vec![SealedEnvelope {
            account: to.account,
            devices: devices.iter().copied().map(DeviceId).collect(),
            access,
            retract_tag: None,
            payload: b"sealed".to_vec(),
        }],
        quota: MailboxQuota::UNLIMITED,
        received_at: NOW,
        expires_at: NOW + TTL,
    }
}

#[test]
fn mailbox_quota_refuses_the_whole_send_and_frees_up_as_envelopes_go() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let alice = register(&store, 1);
    let bob = register(&store, 2);
    let quota = MailboxQuota {
        max_envelopes: 3,
        max_bytes: 10,
    };
    let send = |to: &[DeviceAddress], payload: &[u8]| match enqueue(to, payload, NOW) {
        Write::Enqueue {
            envelopes,
            received_at,
            expires_at,
            ..
        } => Write::Enqueue {
            envelopes,
            quota,
            received_at,
            expires_at,
        },
        _ => unreachable!(),
    };
    let results = store
        .apply(vec![
            send(&[bob], b"1234"),
            send(&[bob], b"1234"),
            // 12 bytes: over the byte quota; refused for Alice too, nothing stored.
            send(&[alice, bob], b"1234"),
            send(&[bob], b"12"),
            // A fourth envelope: over the count quota.
            send(&[bob], b""),
        ])
        .unwrap();
    assert!(matches!(results[0], Ok(Outcome::Enqueued { .. })));
    assert!(matches!(results[1], Ok(Outcome::Enqueued { .. })));
    assert_eq!(results[2], Err(Refusal::MailboxFull));
    assert!(matches!(results[3], Ok(Outcome::Enqueued { .. })));
    assert_eq!(results[4], Err(Refusal::MailboxFull));
    assert_eq!(
        store.mailbox_usage(&bob).unwrap(),
        MailboxUsage {
            envelopes: 3,
            bytes: 10
        }
    );
    assert_eq!(
        store.mailbox_usage(&alice).unwrap(),
        MailboxUsage::default()
    );
    let first = store.backlog(&bob, None, NOW, 1).unwrap()[0].id;
    store
        .apply(vec![Write::Ack {
            address: bob,
            ids: vec![first],
        }])
        .unwrap();
    assert_eq!(
        store.mailbox_usage(&bob).unwrap(),
        MailboxUsage {
            envelopes: 2,
            bytes: 6
        }
    );
    assert!(matches!(
        store.apply(vec![send(&[bob], b"1234")]).unwrap()[0],
        Ok(Outcome::Enqueued { .. })
    ));
    // Expiry empties the mailbox and its usage with it.
    store.apply(vec![Write::Expire { now: NOW + TTL }]).unwrap();
    assert_eq!(store.mailbox_usage(&bob).unwrap(), MailboxUsage::default());
}

#[test]
fn a_refused_write_leaves_the_rest_of_its_batch_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let bob = register(&store, 2);
    let ghost = DeviceAddress {
        account: AccountId([9; 16]),
        device: DeviceId::PRIMARY,
    };
    let results = store
        .apply(vec![
            enqueue(&[bob], b"one", NOW),
            enqueue(&[bob, ghost], b"bad", NOW),
            enqueue(&[bob], b"two", NOW),
        ])
        .unwrap();
    assert!(matches!(results[0], Ok(Outcome::Enqueued { .. })));
    assert_eq!(results[1], Err(Refusal::UnknownRecipient));
    assert!(matches!(results[2], Ok(Outcome::Enqueued { .. })));
    let payloads: Vec<Vec<u8>> = store
        .backlog(&bob, None, NOW, 10)
        .unwrap()
        .into_iter()
        .map(|e| e.payload)
        .collect();
    assert_eq!(payloads, vec![b"one".to_vec(), b"two".to_vec()]);
}

#[test]
fn sends_see_device_list_changes_at_once_despite_the_account_cache() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let bob = register(&store, 2);
    open_to_anyone(&store, bob);
    // Warm the cache with Bob's one-device record.
    assert!(matches!(
        store.apply(vec![enqueue(&[bob], b"one", NOW)]).unwrap()[0],
        Ok(Outcome::Enqueued { .. })
    ));
    let bob2 = add_device(&store, bob, 42);
    // The new device is a recipient at once, and so is it for a sealed send that must
    // name both devices.
    let results = store
        .apply(vec![
            enqueue(&[bob, bob2], b"two", NOW),
            sealed(bob, &[1, bob2.device.0], None),
        ])
        .unwrap();
    assert!(matches!(results[0], Ok(Outcome::Enqueued { .. })));
    assert!(matches!(results[1], Ok(Outcome::Enqueued { .. })));
    // Removed in the same batch as a send to it: the send after the removal is refused.
    let results = store
        .apply(vec![
            Write::RemoveDevice { address: bob2 },
            enqueue(&[bob, bob2], b"three", NOW),
        ])
        .unwrap();
    assert_eq!(results[1], Err(Refusal::UnknownRecipient));
    assert_eq!(
        store
            .apply(vec![sealed(bob, &[1, bob2.device.0], None)])
            .unwrap()[0],
        Err(Refusal::DeviceListChanged)
    );
}

#[test]
fn sequence_numbers_keep_growing_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let bob;
    let first;
    {
        let store = RedbStore::open(dir.path()).unwrap();
        bob = register(&store, 2);
        store.apply(vec![enqueue(&[bob], b"a", NOW)]).unwrap();
        first = store.backlog(&bob, None, NOW, 10).unwrap()[0].id;
        store
            .apply(vec![Write::Ack {
                address: bob,
                ids: vec![first],
            }])
            .unwrap();
    }
    let store = RedbStore::open(dir.path()).unwrap();
    store.apply(vec![enqueue(&[bob], b"b", NOW)]).unwrap();
    let second = store.backlog(&bob, None, NOW, 10).unwrap()[0].id;
    assert!(
        second > first,
        "an id is never reused, so a stale ack cannot hit a new envelope"
    );
}

#[test]
fn backlog_pages_in_order_and_skips_expired_envelopes() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let bob = register(&store, 2);
    store
        .apply(vec![enqueue(&[bob], b"old", NOW - TTL)])
        .unwrap();
    let writes = (0..5u8).map(|i| enqueue(&[bob], &[i], NOW)).collect();
    store.apply(writes).unwrap();
    let page = store.backlog(&bob, None, NOW, 3).unwrap();
    assert_eq!(
        page.iter().map(|e| e.payload[0]).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    let rest = store.backlog(&bob, Some(page[2].id), NOW, 3).unwrap();
    assert_eq!(
        rest.iter().map(|e| e.payload[0]).collect::<Vec<_>>(),
        vec![3, 4]
    );
    assert_eq!(
        store.apply(vec![Write::Expire { now: NOW }]).unwrap(),
        vec![Ok(Outcome::Expired { envelopes: 1 })]
    );
    assert_eq!(store.stats().unwrap().envelopes, 5);
}

#[test]
fn acks_delete_only_from_the_acking_devices_mailbox() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let bob = register(&store, 2);
    let carol = register(&store, 3);
    store
        .apply(vec![enqueue(&[bob, carol], b"x", NOW)])
        .unwrap();
    let bobs = store.backlog(&bob, None, NOW, 10).unwrap()[0].id;
    let carols = store.backlog(&carol, None, NOW, 10).unwrap()[0].id;
    let result = store
        .apply(vec![Write::Ack {
            address: carol,
            ids: vec![bobs, EnvelopeId(u64::MAX)],
        }])
        .unwrap();
    assert_eq!(result, vec![Ok(Outcome::Acked { unknown: 2 })]);
    assert_eq!(store.stats().unwrap().envelopes, 2);
    store
        .apply(vec![Write::Ack {
            address: carol,
            ids: vec![carols],
        }])
        .unwrap();
    let stats = store.stats().unwrap();
    assert_eq!(
        (stats.envelopes, stats.mailbox_entries, stats.expiry_entries),
        (1, 1, 1)
    );
}

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
    let tag = store.device_tag(&bob);
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
        .insert((store.device_tag(&bob), carols.0), ())
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
        store.device_tag(&bob),
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

#[test]
fn retraction_deletes_every_copy_and_its_index_entries() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let bob = register(&store, 2);
    let carol = register(&store, 3);
    store
        .apply(vec![
            enqueue_retractable(&[bob, carol], 1, NOW),
            enqueue_retractable(&[bob], 2, NOW),
            enqueue(&[bob], b"plain", NOW),
        ])
        .unwrap();
    assert_eq!(store.stats().unwrap().retract_entries, 3);
    assert_eq!(
        store.apply(vec![retract(&[1, 9])]).unwrap(),
        vec![Ok(Outcome::Retracted { count: 2 })]
    );
    let left: Vec<Vec<u8>> = store
        .backlog(&bob, None, NOW, 10)
        .unwrap()
        .into_iter()
        .map(|e| e.payload)
        .collect();
    assert_eq!(left, vec![vec![2], b"plain".to_vec()]);
    assert!(store.backlog(&carol, None, NOW, 10).unwrap().is_empty());
    let stats = store.stats().unwrap();
    assert_eq!(
        (
            stats.envelopes,
            stats.mailbox_entries,
            stats.expiry_entries,
            stats.retract_entries
        ),
        (2, 2, 2, 1)
    );
    assert_eq!(
        store.apply(vec![retract(&[1])]).unwrap(),
        vec![Ok(Outcome::Retracted { count: 0 })],
        "a second retraction finds nothing"
    );
}

#[test]
fn the_retract_index_goes_with_acked_expired_and_removed_envelopes() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let bob = register(&store, 2);

    // Ack.
    store
        .apply(vec![enqueue_retractable(&[bob], 1, NOW)])
        .unwrap();
    let id = store.backlog(&bob, None, NOW, 10).unwrap()[0].id;
    store
        .apply(vec![Write::Ack {
            address: bob,
            ids: vec![id],
        }])
        .unwrap();
    assert_eq!(store.stats().unwrap().retract_entries, 0);
    assert_eq!(
        store.apply(vec![retract(&[1])]).unwrap(),
        vec![Ok(Outcome::Retracted { count: 0 })]
    );

    // Expiry.
    store
        .apply(vec![enqueue_retractable(&[bob], 2, NOW - TTL)])
        .unwrap();
    assert_eq!(store.stats().unwrap().retract_entries, 1);
    store.apply(vec![Write::Expire { now: NOW }]).unwrap();
    assert_eq!(store.stats().unwrap().retract_entries, 0);

    // Device removal.
    let bob2 = add_device(&store, bob, 42);
    store
        .apply(vec![enqueue_retractable(&[bob, bob2], 3, NOW)])
        .unwrap();
    assert_eq!(store.stats().unwrap().retract_entries, 2);
    store
        .apply(vec![Write::RemoveDevice { address: bob2 }])
        .unwrap();
    let stats = store.stats().unwrap();
    assert_eq!((stats.envelopes, stats.retract_entries), (1, 1));
    let txn = store.begin_read().unwrap();
    assert_eq!(txn.open_table(RETRACT_ENTRIES).unwrap().len().unwrap(), 1);
}

#[test]
fn sealed_envelopes_need_access_and_the_exact_device_list() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let bob = register(&store, 2);
    let ghost = DeviceAddress {
        account: AccountId([9; 16]),
        device: DeviceId::PRIMARY,
    };
    let token = [7u8; 16];
    let hash: [u8; 32] = Sha256::digest(token).into();

    // A new account accepts nothing sealed; an unknown account looks the same.
    let refused = store
        .apply(vec![
            sealed(bob, &[1], None),
            sealed(bob, &[1], Some(token)),
            sealed(ghost, &[1], Some(token)),
        ])
        .unwrap();
    assert!(refused.iter().all(|r| *r == Err(Refusal::DeliveryRefused)));

    store
        .apply(vec![Write::SetDeliveryAccess {
            account: bob.account,
            token_hash: Some(hash),
            allow_unknown_senders: false,
        }])
        .unwrap();
    let results = store
        .apply(vec![
            sealed(bob, &[1], Some([8; 16])),
            sealed(bob, &[1], None),
            sealed(bob, &[1, 1], Some(token)),
            sealed(bob, &[1, 2], Some(token)),
            sealed(bob, &[1], Some(token)),
        ])
        .unwrap();
    assert_eq!(results[0], Err(Refusal::DeliveryRefused));
    assert_eq!(results[1], Err(Refusal::DeliveryRefused));
    assert_eq!(results[2], Err(Refusal::DeviceListChanged));
    assert_eq!(results[3], Err(Refusal::DeviceListChanged));
    assert!(matches!(results[4], Ok(Outcome::Enqueued { .. })));
    assert_eq!(store.stats().unwrap().envelopes, 1);

    open_to_anyone(&store, bob);
    assert!(matches!(
        store.apply(vec![sealed(bob, &[1], None)]).unwrap()[0],
        Ok(Outcome::Enqueued { .. })
    ));
    let stats = store.stats().unwrap();
    assert_eq!((stats.envelopes, stats.delivery_access), (2, 1));
}

#[test]
fn per_device_sealed_envelopes_must_cover_the_device_list_together() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let bob = register(&store, 2);
    store
        .apply(vec![
            Write::AddDevice {
                account: bob.account,
                device_key: [0x22; 32],
                max_devices: 5,
            },
            Write::SetDeliveryAccess {
                account: bob.account,
                token_hash: None,
                allow_unknown_senders: true,
            },
        ])
        .unwrap();
    let pairwise = |devices: &[&[u32]]| {
        let envelopes = devices
            .iter()
            .map(|ids| SealedEnvelope {
                account: bob.account,
                devices: ids.iter().copied().map(DeviceId).collect(),
                access: None,
                retract_tag: None,
                payload: b"one per device".to_vec(),
            })
            .collect();
        Write::SealedEnqueue {
            envelopes,
            quota: MailboxQuota::UNLIMITED,
            received_at: NOW,
            expires_at: NOW + TTL,
        }
    };
    let results = store
        .apply(vec![
            pairwise(&[&[1]]),
            pairwise(&[&[1], &[1]]),
            pairwise(&[&[1], &[2], &[2]]),
            pairwise(&[&[2], &[1]]),
        ])
        .unwrap();
    assert_eq!(results[0], Err(Refusal::DeviceListChanged));
    assert_eq!(results[1], Err(Refusal::DeviceListChanged));
    assert_eq!(results[2], Err(Refusal::DeviceListChanged));
    assert!(matches!(results[3], Ok(Outcome::Enqueued { .. })));
    assert_eq!(store.stats().unwrap().envelopes, 2);
}

fn call(id: u8, caller: u8, callee: u8, start: u64, outcome: CallOutcome) -> CallRecord {
    let answered = (outcome == CallOutcome::Answered).then_some(start + 10);
    CallRecord::new(
        [id; 16],
        AccountId([caller; 16]),
        AccountId([callee; 16]),
        start,
        answered,
        start + 100,
        outcome,
    )
}

fn record(record: CallRecord, retention: u64) -> Write {
    let delete_at = record.started_at + retention;
    Write::RecordCall { record, delete_at }
}

#[test]
fn call_records_are_indexed_by_account_and_time_and_counted_per_day() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let retention = 90 * DAY;
    let start = NOW - NOW % DAY;
    let results = store
        .apply(vec![
            record(
                call(1, 0xa1, 0xb1, start + 10, CallOutcome::Answered),
                retention,
            ),
            record(
                call(2, 0xa1, 0xc1, start + 20, CallOutcome::Missed),
                retention,
            ),
            record(
                call(3, 0xc1, 0xb1, start + DAY, CallOutcome::Busy),
                retention,
            ),
        ])
        .unwrap();
    assert!(results.iter().all(|r| *r == Ok(Outcome::CallRecorded)));

    let of_a = store.records_of(&AccountId([0xa1; 16])).unwrap();
    assert_eq!(of_a.len(), 2);
    assert_eq!(
        of_a[0],
        call(1, 0xa1, 0xb1, start + 10, CallOutcome::Answered)
    );
    assert_eq!(of_a[0].duration_secs, 90);
    assert_eq!(store.records_of(&AccountId([0xb1; 16])).unwrap().len(), 2);
    assert_eq!(store.records_between(start, start + DAY).unwrap().len(), 2);
    assert_eq!(
        store
            .records_between(start + DAY, start + 2 * DAY)
            .unwrap()
            .len(),
        1
    );

    let days = store.day_stats().unwrap();
    assert_eq!(days.len(), 2);
    assert_eq!(
        (
            days[0].calls,
            days[0].answered,
            days[0].unanswered,
            days[0].missed
        ),
        (2, 1, 1, 1)
    );
    assert_eq!(days[0].minutes(), 2);
    assert_eq!(
        (days[1].calls, days[1].unanswered, days[1].missed),
        (1, 1, 0)
    );

    // Erasure of one account takes every record naming it, on both sides' indexes.
    let forgotten = store
        .apply(vec![Write::ForgetCalls {
            account: AccountId([0xc1; 16]),
        }])
        .unwrap();
    assert_eq!(forgotten, vec![Ok(Outcome::CallsDeleted { records: 2 })]);
    let stats = store.stats().unwrap();
    assert_eq!((stats.call_records, stats.call_index_entries), (1, 2));
    assert_eq!(store.records_of(&AccountId([0xb1; 16])).unwrap().len(), 1);
    assert_eq!(store.day_stats().unwrap(), days, "day counts stay");
}

#[test]
fn call_records_go_after_retention_while_day_counts_stay() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let clock = ManualClock::new(NOW);
    let retention = 30 * DAY;
    let (caller, callee) = (AccountId([0x7a; 16]), AccountId([0x7b; 16]));
    let old = call(9, 0x7a, 0x7b, clock.now(), CallOutcome::Answered);
    store.apply(vec![record(old, retention)]).unwrap();
    clock.advance(20 * DAY);
    let recent = call(8, 0x7c, 0x7d, clock.now(), CallOutcome::Rejected);
    store.apply(vec![record(recent, retention)]).unwrap();
    let summary = store.retention_summary().unwrap();
    assert_eq!(summary.call_records, 2);
    assert_eq!(summary.oldest_call_start, Some(NOW));

    // Not yet past retention: nothing goes.
    clock.advance(10 * DAY - 1);
    let sweep = |now: u64| {
        store
            .apply(vec![
                Write::ExpireCalls {
                    until: now - retention,
                },
                Write::Expire { now },
            ])
            .unwrap()
    };
    assert_eq!(
        sweep(clock.now())[0],
        Ok(Outcome::CallsDeleted { records: 0 })
    );
    clock.advance(1);
    assert_eq!(
        sweep(clock.now())[0],
        Ok(Outcome::CallsDeleted { records: 1 })
    );
    assert!(store.records_of(&caller).unwrap().is_empty());
    assert!(store.records_of(&callee).unwrap().is_empty());
    let stats = store.stats().unwrap();
    assert_eq!((stats.call_records, stats.call_index_entries), (1, 2));
    let days = store.day_stats().unwrap();
    assert_eq!(days.iter().map(|d| d.calls).sum::<u64>(), 2);
    assert_eq!(days.iter().map(|d| d.answered).sum::<u64>(), 1);

    // A day later the old record's day key is gone too (its bytes in free pages are
    // noise), and no file of the store holds the callers' ids, raw or hex.
    clock.advance(DAY);
    sweep(clock.now());
    let old_key_day = expiry_day(NOW + retention);
    assert!(store.keyring().day(old_key_day).is_none());
    drop(store);
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        for id in [caller, callee] {
            for needle in [id.0.to_vec(), id.to_hex().into_bytes()] {
                assert!(!bytes.windows(needle.len()).any(|w| w == needle));
            }
        }
    }
}
