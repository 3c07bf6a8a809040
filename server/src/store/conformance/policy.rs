//! One case per store rule, each through the backend's own transaction: what the rules
//! layer decides must hold on every backend.

use hush_protocol::{AccountId, DeviceAddress, DeviceId, Prekey, UploadPrekeys};
use sha2::{Digest, Sha256};

use super::{
    add_device, enqueue, enqueue_within, open_to_anyone, register, sealed, StoreFactory, NOW,
};
use crate::store::{MailboxQuota, MailboxUsage, Outcome, PrekeyCounts, Refusal, Store, Write};

fn registration(account: u8, invite: Option<&[u8]>, require_invite: bool) -> Write {
    Write::Register {
        account: AccountId([account; 16]),
        identity_key: vec![account],
        device_key: [account; 32],
        invite: invite.map(<[u8]>::to_vec),
        require_invite,
    }
}

pub(super) fn registration_without_an_invite_is_refused_when_one_is_required<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
    let results = store
        .apply(vec![
            registration(1, None, true),
            registration(2, None, false),
        ])
        .unwrap();
    assert_eq!(results[0], Err(Refusal::InviteRequired));
    assert_eq!(results[1], Ok(Outcome::Registered));
    assert!(store.account(&AccountId([1; 16])).unwrap().is_none());
    assert_eq!(store.stats().unwrap().accounts, 1);
}

pub(super) fn an_invite_is_consumed_by_the_registration_that_uses_it<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
    store
        .apply(vec![
            Write::AddInvite {
                token: b"first".to_vec(),
            },
            Write::AddInvite {
                token: b"second".to_vec(),
            },
        ])
        .unwrap();
    assert_eq!(store.stats().unwrap().invites, 2);
    let results = store
        .apply(vec![
            registration(1, Some(b"unknown"), true),
            registration(2, Some(b"first"), true),
            registration(3, Some(b"first"), true),
            // An invite given is checked even where none is required.
            registration(4, Some(b"first"), false),
        ])
        .unwrap();
    assert_eq!(results[0], Err(Refusal::InvalidInvite));
    assert_eq!(results[1], Ok(Outcome::Registered));
    assert_eq!(results[2], Err(Refusal::InvalidInvite), "used once only");
    assert_eq!(results[3], Err(Refusal::InvalidInvite));
    assert_eq!(store.stats().unwrap().invites, 1);
    assert_eq!(store.stats().unwrap().accounts, 1);
    // The refused registration did not consume the invite it did not reach.
    assert_eq!(
        store
            .apply(vec![registration(5, Some(b"second"), true)])
            .unwrap(),
        vec![Ok(Outcome::Registered)]
    );
    assert_eq!(store.stats().unwrap().invites, 0);
}

pub(super) fn an_existing_account_cannot_be_registered_again<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
    register(&store, 1);
    store
        .apply(vec![Write::AddInvite {
            token: b"kept".to_vec(),
        }])
        .unwrap();
    assert_eq!(
        store
            .apply(vec![registration(1, Some(b"kept"), true)])
            .unwrap(),
        vec![Err(Refusal::NotPermitted)]
    );
    assert_eq!(store.stats().unwrap().invites, 1, "the invite is not spent");
    assert_eq!(
        store
            .account(&AccountId([1; 16]))
            .unwrap()
            .unwrap()
            .identity_key,
        vec![1]
    );
}

pub(super) fn the_device_limit_holds_within_one_batch<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
    let alice = register(&store, 1);
    let add = |key: u8| Write::AddDevice {
        account: alice.account,
        device_key: [key; 32],
        max_devices: 3,
    };
    let results = store.apply(vec![add(2), add(3), add(4)]).unwrap();
    assert_eq!(results[0], Ok(Outcome::DeviceAdded(DeviceId(2))));
    assert_eq!(results[1], Ok(Outcome::DeviceAdded(DeviceId(3))));
    assert_eq!(results[2], Err(Refusal::DeviceLimitReached));
    assert_eq!(
        store.account(&alice.account).unwrap().unwrap().devices,
        vec![DeviceId(1), DeviceId(2), DeviceId(3)]
    );
    assert_eq!(store.stats().unwrap().devices, 3);
    // A removed device frees its place; its id is not handed out again.
    store
        .apply(vec![Write::RemoveDevice {
            address: DeviceAddress {
                account: alice.account,
                device: DeviceId(2),
            },
        }])
        .unwrap();
    assert_eq!(
        store.apply(vec![add(5)]).unwrap(),
        vec![Ok(Outcome::DeviceAdded(DeviceId(4)))]
    );
    assert_eq!(
        store
            .apply(vec![Write::AddDevice {
                account: AccountId([9; 16]),
                device_key: [9; 32],
                max_devices: 3,
            }])
            .unwrap(),
        vec![Err(Refusal::UnknownAccount)]
    );
}

pub(super) fn a_device_key_cannot_join_its_account_twice<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
    let alice = register(&store, 1);
    add_device(&store, alice, 2);
    let results = store
        .apply(vec![
            Write::AddDevice {
                account: alice.account,
                device_key: [1; 32],
                max_devices: 5,
            },
            Write::AddDevice {
                account: alice.account,
                device_key: [2; 32],
                max_devices: 5,
            },
        ])
        .unwrap();
    assert_eq!(
        results,
        vec![
            Err(Refusal::DuplicateDeviceKey),
            Err(Refusal::DuplicateDeviceKey)
        ]
    );
    assert_eq!(
        store
            .account(&alice.account)
            .unwrap()
            .unwrap()
            .devices
            .len(),
        2
    );
}

pub(super) fn the_primary_device_cannot_be_removed<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
    let alice = register(&store, 1);
    let ghost_account = DeviceAddress {
        account: AccountId([9; 16]),
        device: DeviceId(2),
    };
    let ghost_device = DeviceAddress {
        account: alice.account,
        device: DeviceId(7),
    };
    let results = store
        .apply(vec![
            Write::RemoveDevice { address: alice },
            Write::RemoveDevice {
                address: ghost_device,
            },
            Write::RemoveDevice {
                address: ghost_account,
            },
        ])
        .unwrap();
    assert_eq!(results[0], Err(Refusal::NotPermitted));
    assert_eq!(results[1], Err(Refusal::UnknownDevice));
    assert_eq!(results[2], Err(Refusal::UnknownAccount));
    assert_eq!(store.device_key(&alice).unwrap(), Some([1; 32]));
}

pub(super) fn removing_a_device_takes_its_prekeys_and_mailbox<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
    let alice = register(&store, 1);
    let phone = add_device(&store, alice, 2);
    store
        .apply(vec![
            upload(phone, 0..3, true),
            enqueue(&[alice, phone], b"both", NOW),
        ])
        .unwrap();
    assert_eq!(store.stats().unwrap().prekeys, 8);
    let removed = store
        .apply(vec![Write::RemoveDevice { address: phone }])
        .unwrap();
    assert_eq!(removed, vec![Ok(Outcome::DeviceRemoved { address: phone })]);
    let stats = store.stats().unwrap();
    assert_eq!((stats.prekeys, stats.envelopes), (0, 1));
    assert_eq!(store.device_key(&phone).unwrap(), None);
    assert_eq!(
        store.mailbox_usage(&phone).unwrap(),
        MailboxUsage::default()
    );
    assert!(store.backlog(&phone, None, NOW, 10).unwrap().is_empty());
    assert_eq!(store.backlog(&alice, None, NOW, 10).unwrap().len(), 1);
}

pub(super) fn sealed_admission_follows_the_accounts_delivery_access<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
    let bob = register(&store, 2);
    let token = [7u8; 16];
    let set = |token_hash: Option<[u8; 32]>, allow_unknown_senders| Write::SetDeliveryAccess {
        account: bob.account,
        token_hash,
        allow_unknown_senders,
    };
    let admitted = |presented: Option<[u8; 16]>| {
        let read = store.admits(&bob.account, presented.as_ref()).unwrap();
        let written = store.apply(vec![sealed(bob, &[1], presented)]).unwrap();
        let applied = matches!(written[0], Ok(Outcome::Enqueued { .. }));
        if !applied {
            assert_eq!(written[0], Err(Refusal::DeliveryRefused));
        }
        assert_eq!(read, applied, "the read and the write agree");
        applied
    };
    // No access set: nothing sealed.
    assert!(!admitted(None));
    assert!(!admitted(Some(token)));
    // A token: only that token.
    store
        .apply(vec![set(Some(Sha256::digest(token).into()), false)])
        .unwrap();
    assert!(admitted(Some(token)));
    assert!(!admitted(Some([8; 16])), "the wrong token");
    assert!(!admitted(None));
    // Unknown senders allowed: anyone.
    open_to_anyone(&store, bob);
    assert!(admitted(None));
    assert!(admitted(Some([8; 16])));
    // An unknown account is refused like a refused token, and cannot be set.
    let ghost = AccountId([9; 16]);
    assert!(!store.admits(&ghost, None).unwrap());
    assert_eq!(
        store
            .apply(vec![Write::SetDeliveryAccess {
                account: ghost,
                token_hash: None,
                allow_unknown_senders: true,
            }])
            .unwrap(),
        vec![Err(Refusal::UnknownAccount)]
    );
}

pub(super) fn a_sealed_send_must_name_exactly_the_current_devices<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
    let bob = register(&store, 2);
    let phone = add_device(&store, bob, 3);
    open_to_anyone(&store, bob);
    let two = phone.device.0;
    let results = store
        .apply(vec![
            sealed(bob, &[1], None),           // a device missing
            sealed(bob, &[1, two, 9], None),   // a device extra
            sealed(bob, &[1, two, two], None), // a device twice
            sealed(bob, &[two, 1], None),      // exact, in any order
        ])
        .unwrap();
    assert_eq!(results[0], Err(Refusal::DeviceListChanged));
    assert_eq!(results[1], Err(Refusal::DeviceListChanged));
    assert_eq!(results[2], Err(Refusal::DeviceListChanged));
    assert!(matches!(results[3], Ok(Outcome::Enqueued { .. })));
    assert_eq!(store.stats().unwrap().envelopes, 2);
}

pub(super) fn the_mailbox_quota_counts_envelopes<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
    let bob = register(&store, 2);
    let quota = MailboxQuota {
        max_envelopes: 2,
        max_bytes: u64::MAX,
    };
    let results = store
        .apply(
            (0..3u8)
                .map(|i| enqueue_within(&[bob], &[i], NOW, quota))
                .collect(),
        )
        .unwrap();
    assert!(matches!(results[1], Ok(Outcome::Enqueued { .. })));
    assert_eq!(results[2], Err(Refusal::MailboxFull));
    assert_eq!(store.mailbox_usage(&bob).unwrap().envelopes, 2);
}

pub(super) fn the_mailbox_quota_counts_payload_bytes<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
    let bob = register(&store, 2);
    let quota = MailboxQuota {
        max_envelopes: u64::MAX,
        max_bytes: 100,
    };
    let results = store
        .apply(vec![
            enqueue_within(&[bob], &[0; 60], NOW, quota),
            enqueue_within(&[bob], &[1; 41], NOW, quota),
            enqueue_within(&[bob], &[2; 40], NOW, quota),
        ])
        .unwrap();
    assert!(matches!(results[0], Ok(Outcome::Enqueued { .. })));
    assert_eq!(results[1], Err(Refusal::MailboxFull));
    assert!(
        matches!(results[2], Ok(Outcome::Enqueued { .. })),
        "exactly full"
    );
    assert_eq!(
        store.mailbox_usage(&bob).unwrap(),
        MailboxUsage {
            envelopes: 2,
            bytes: 100
        }
    );
}

fn key(id: u32) -> Prekey {
    Prekey {
        id,
        public_key: vec![u8::try_from(id).unwrap(); 32],
        signature: vec![],
    }
}

/// One-time EC and ML-KEM keys with `ids`, and the signed and last-resort keys if `kept`.
fn upload(address: DeviceAddress, ids: std::ops::Range<u32>, kept: bool) -> Write {
    Write::UploadPrekeys {
        address,
        upload: UploadPrekeys {
            signed_prekey: kept.then(|| key(100)),
            one_time: ids.clone().map(key).collect(),
            kem_one_time: ids.map(|id| key(id + 50)).collect(),
            kem_last_resort: kept.then(|| key(200)),
        },
    }
}

pub(super) fn one_time_prekeys_are_consumed_and_the_last_resort_one_is_not<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
    let bob = register(&store, 2);
    assert_eq!(
        store.apply(vec![upload(bob, 0..2, true)]).unwrap(),
        vec![Ok(Outcome::PrekeysStored(PrekeyCounts {
            one_time: 2,
            kem_one_time: 2
        }))]
    );
    let take = Write::TakePrekeys {
        account: bob.account,
        device: None,
        low_threshold: 2,
    };
    let mut handed = Vec::new();
    for _ in 0..4 {
        let result = store
            .apply(vec![Write::TakePrekeys {
                account: bob.account,
                device: Some(DeviceId::PRIMARY),
                low_threshold: 2,
            }])
            .unwrap();
        let Ok(Outcome::Prekeys { bundles, low }) = &result[0] else {
            panic!("{result:?}")
        };
        let bundle = &bundles.devices[0];
        assert_eq!(bundles.identity_key, vec![2]);
        assert_eq!(bundle.device_key, [2; 32]);
        assert_eq!(bundle.signed_prekey, Some(key(100)), "the signed key stays");
        assert_eq!(low.len(), 1, "below the threshold after each take");
        handed.push((
            bundle.one_time.as_ref().map(|k| k.id),
            bundle.kem.as_ref().map(|k| k.id),
            bundle.kem_is_last_resort,
        ));
    }
    assert_eq!(
        handed,
        vec![
            (Some(0), Some(50), false),
            (Some(1), Some(51), false),
            (None, Some(200), true),
            (None, Some(200), true),
        ],
        "each one-time key once, lowest first; then the last-resort key, kept"
    );
    assert_eq!(store.prekey_counts(&bob).unwrap(), PrekeyCounts::default());
    assert_eq!(store.stats().unwrap().prekeys, 2);
    // A fresh upload serves one-time keys again before the last-resort one.
    store.apply(vec![upload(bob, 5..6, false)]).unwrap();
    let result = store.apply(vec![take]).unwrap();
    let Ok(Outcome::Prekeys { bundles, .. }) = &result[0] else {
        panic!("{result:?}")
    };
    assert_eq!(bundles.devices[0].kem.as_ref().map(|k| k.id), Some(55));
    assert!(!bundles.devices[0].kem_is_last_resort);
}

pub(super) fn prekeys_go_only_to_known_devices<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
    let bob = register(&store, 2);
    let ghost = DeviceAddress {
        account: bob.account,
        device: DeviceId(5),
    };
    let results = store
        .apply(vec![
            upload(ghost, 0..2, true),
            Write::TakePrekeys {
                account: bob.account,
                device: Some(DeviceId(5)),
                low_threshold: 0,
            },
            Write::TakePrekeys {
                account: AccountId([9; 16]),
                device: None,
                low_threshold: 0,
            },
        ])
        .unwrap();
    assert_eq!(results[0], Err(Refusal::UnknownDevice));
    assert_eq!(results[1], Err(Refusal::UnknownDevice));
    assert_eq!(results[2], Err(Refusal::UnknownAccount));
    assert_eq!(store.stats().unwrap().prekeys, 0);
}
