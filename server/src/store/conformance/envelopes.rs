//! Batches, refusals, order, acks, retraction, expiry and sealed sends.

use hush_protocol::{AccountId, DeviceAddress, DeviceId, EnvelopeId, SealedEnvelope};
use sha2::{Digest, Sha256};

use super::{
    add_device, enqueue, enqueue_retractable, open_to_anyone, payloads, register, retract, sealed,
    StoreFactory, NOW, TTL,
};
use crate::store::{MailboxQuota, MailboxUsage, Outcome, Refusal, Store, Write};

pub(super) fn mailbox_quota_refuses_the_whole_send_and_frees_up_as_envelopes_go<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
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

pub(super) fn a_refused_write_leaves_the_rest_of_its_batch_alone<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
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

pub(super) fn sends_see_device_list_changes_at_once_despite_the_account_cache<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
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

pub(super) fn sequence_numbers_keep_growing_across_reopen<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let bob;
    let first;
    {
        let store = F::open(dir.path());
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
    let store = F::reopen(dir.path());
    store.apply(vec![enqueue(&[bob], b"b", NOW)]).unwrap();
    let second = store.backlog(&bob, None, NOW, 10).unwrap()[0].id;
    assert!(
        second > first,
        "an id is never reused, so a stale ack cannot hit a new envelope"
    );
}

pub(super) fn backlog_pages_in_order_and_skips_expired_envelopes<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
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

pub(super) fn acks_delete_only_from_the_acking_devices_mailbox<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
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

pub(super) fn retraction_deletes_every_copy_and_its_index_entries<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
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

/// (The redb backend's own index table is checked after the removal in
/// `redb::tests::a_removed_devices_copies_leave_the_retraction_entries_table`.)
pub(super) fn the_retract_index_goes_with_acked_expired_and_removed_envelopes<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
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
}

pub(super) fn sealed_envelopes_need_access_and_the_exact_device_list<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
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

pub(super) fn per_device_sealed_envelopes_must_cover_the_device_list_together<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
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

/// Per-mailbox order: the writes of a batch land in submission order, every mailbox reads
/// back in arrival order, and the ids a send reports are the ones its recipients read.
pub(super) fn a_batch_is_applied_in_order_and_ids_grow_in_each_mailbox<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
    let bob = register(&store, 2);
    let carol = register(&store, 3);
    let writes = (0..6u8)
        .map(|i| {
            let to = if i % 2 == 0 {
                vec![bob, carol]
            } else {
                vec![bob]
            };
            enqueue(&to, &[i], NOW)
        })
        .collect();
    let results = store.apply(writes).unwrap();
    let mut reported = Vec::new();
    for result in results {
        let Ok(Outcome::Enqueued { fresh, .. }) = result else {
            panic!("{result:?}")
        };
        reported.extend(
            fresh
                .into_iter()
                .filter(|f| f.recipient == bob)
                .map(|f| f.id),
        );
    }
    let backlog = store.backlog(&bob, None, NOW, usize::MAX).unwrap();
    let ids: Vec<EnvelopeId> = backlog.iter().map(|e| e.id).collect();
    assert_eq!(ids, reported, "a send reports the ids its recipient reads");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids grow: {ids:?}");
    assert_eq!(
        payloads(&store, &bob),
        (0..6u8).map(|i| vec![i]).collect::<Vec<_>>()
    );
    assert_eq!(payloads(&store, &carol), vec![vec![0], vec![2], vec![4]]);
}
