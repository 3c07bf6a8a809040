#![allow(clippy::unwrap_used)]

use hush_protocol::{AccountId, DeviceAddress, DeviceId, EnvelopeId, OutgoingEnvelope};

use super::*;
use crate::store::{Outcome, Refusal, Store, Write};

const NOW: u64 = 1_800_000_000;
const TTL: u64 = 14 * DAY;

fn register(store: &RedbStore, account: u8) -> DeviceAddress {
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

fn enqueue(to: &[DeviceAddress], payload: &[u8], at: u64) -> Write {
    Write::Enqueue {
        envelopes: vec![OutgoingEnvelope {
            recipients: to.to_vec(),
            payload: payload.to_vec(),
        }],
        received_at: at,
        expires_at: at + TTL,
    }
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
    assert_eq!((stats.envelopes, stats.expiry_entries), (1, 1));
}

#[test]
fn a_corrupted_value_is_skipped_not_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let bob = register(&store, 2);
    store.apply(vec![enqueue(&[bob], b"x", NOW)]).unwrap();
    let tag = store.device_tag(&bob);
    let txn = store.db.begin_write().unwrap();
    {
        let mut mailbox = txn.open_table(MAILBOX).unwrap();
        let key = mailbox
            .range((tag, 0)..=(tag, u64::MAX))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .0
            .value();
        let mut value = mailbox.get(key).unwrap().unwrap().value().to_vec();
        let last = value.len() - 1;
        value[last] ^= 1;
        mailbox.insert(key, value.as_slice()).unwrap();
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
