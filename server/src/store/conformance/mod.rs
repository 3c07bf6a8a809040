//! The store conformance suite: what every backend must do, run on each one.
//!
//! Each case is a function generic over a [`StoreFactory`]; [`conformance_suite!`]
//! instantiates every case as a `#[test]` for one backend. Adding a backend is its factory
//! and one line beside `conformance_suite!(redb, …)` below.
//!
//! The cases: the store's batches and refusals (`envelopes`), one case per policy rule
//! (`policy`), call records (`calls`), and the crash, power-cut and full-disk model
//! (`faults`), which runs the backend on a simulated disk ([`disk::SharedDisk`]).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod calls;
pub(crate) mod disk;
mod envelopes;
mod faults;
mod policy;

use std::path::Path;
use std::sync::Arc;

use hush_protocol::sealed::retract_tag;
use hush_protocol::{AccountId, DeviceAddress, DeviceId, OutgoingEnvelope, SealedEnvelope};

use self::disk::SharedDisk;
use crate::keyring::{Keyring, DAY};
use crate::store::{MailboxQuota, Outcome, Store, StoreError, Write};

/// How the suite opens a backend.
pub(crate) trait StoreFactory {
    /// The backend's store.
    type Store: Store;

    /// Opens (or creates) the store kept in `dir`.
    fn open(dir: &Path) -> Self::Store;

    /// Opens the store kept in `dir` again, after the last handle on it was dropped.
    fn reopen(dir: &Path) -> Self::Store {
        Self::open(dir)
    }

    /// Opens the store with its key file in `keys_dir` and its data on `disk`, which may
    /// be set to fail (the crash and full-disk model).
    fn open_with_faults(keys_dir: &Path, disk: &SharedDisk) -> Result<Self::Store, StoreError>;

    /// Whether the backend's own integrity check passes on what `disk` holds.
    fn image_is_intact(disk: &SharedDisk) -> bool;

    /// The keyring of an open store (shared by every backend: the at-rest layer).
    fn keyring(store: &Self::Store) -> &Arc<Keyring>;
}

/// Instantiates every conformance case as a `#[test]` for one backend:
/// `conformance_suite!(redb, RedbFactory);`.
macro_rules! conformance_suite {
    ($backend:ident, $factory:ty) => {
        mod $backend {
            conformance_suite!(@cases $factory;
                envelopes::a_refused_write_leaves_the_rest_of_its_batch_alone,
                envelopes::mailbox_quota_refuses_the_whole_send_and_frees_up_as_envelopes_go,
                envelopes::sends_see_device_list_changes_at_once_despite_the_account_cache,
                envelopes::sequence_numbers_keep_growing_across_reopen,
                envelopes::backlog_pages_in_order_and_skips_expired_envelopes,
                envelopes::acks_delete_only_from_the_acking_devices_mailbox,
                envelopes::retraction_deletes_every_copy_and_its_index_entries,
                envelopes::the_retract_index_goes_with_acked_expired_and_removed_envelopes,
                envelopes::sealed_envelopes_need_access_and_the_exact_device_list,
                envelopes::per_device_sealed_envelopes_must_cover_the_device_list_together,
                envelopes::a_batch_is_applied_in_order_and_ids_grow_in_each_mailbox,
                policy::registration_without_an_invite_is_refused_when_one_is_required,
                policy::an_invite_is_consumed_by_the_registration_that_uses_it,
                policy::an_existing_account_cannot_be_registered_again,
                policy::the_device_limit_holds_within_one_batch,
                policy::a_device_key_cannot_join_its_account_twice,
                policy::the_primary_device_cannot_be_removed,
                policy::removing_a_device_takes_its_prekeys_and_mailbox,
                policy::sealed_admission_follows_the_accounts_delivery_access,
                policy::a_sealed_send_must_name_exactly_the_current_devices,
                policy::the_mailbox_quota_counts_envelopes,
                policy::the_mailbox_quota_counts_payload_bytes,
                policy::one_time_prekeys_are_consumed_and_the_last_resort_one_is_not,
                policy::prekeys_go_only_to_known_devices,
                calls::call_records_are_indexed_by_account_and_time_and_counted_per_day,
                calls::call_records_go_after_retention_while_day_counts_stay,
                faults::a_crash_at_any_write_keeps_exactly_what_was_acknowledged,
                faults::a_power_cut_at_any_write_keeps_exactly_what_was_acknowledged,
                faults::the_store_recovers_in_place_when_a_failing_disk_heals,
                faults::a_full_disk_fails_the_batch_with_a_typed_error_and_keeps_what_was_acknowledged,
            );
        }
    };
    (@cases $factory:ty; $($group:ident :: $case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::store::conformance::$group::$case::<$factory>();
            }
        )*
    };
}

conformance_suite!(redb, crate::store::redb::RedbFactory);

/// Seconds since the epoch in the cases.
pub(crate) const NOW: u64 = 1_800_000_000;
/// How long an envelope lives in the cases.
pub(crate) const TTL: u64 = 14 * DAY;

/// Registers account `[account; 16]` with its primary device key `[account; 32]`.
pub(crate) fn register(store: &dyn Store, account: u8) -> DeviceAddress {
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
fn open_to_anyone(store: &dyn Store, device: DeviceAddress) {
    store
        .apply(vec![Write::SetDeliveryAccess {
            account: device.account,
            token_hash: None,
            allow_unknown_senders: true,
        }])
        .unwrap();
}

/// Adds a device with key `[key; 32]` to `primary`'s account.
fn add_device(store: &dyn Store, primary: DeviceAddress, key: u8) -> DeviceAddress {
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

/// One envelope to `to`, arriving `at`, with no quota a case would reach.
pub(crate) fn enqueue(to: &[DeviceAddress], payload: &[u8], at: u64) -> Write {
    enqueue_within(to, payload, at, MailboxQuota::UNLIMITED)
}

/// One envelope to `to`, arriving `at`, under `quota`.
fn enqueue_within(to: &[DeviceAddress], payload: &[u8], at: u64, quota: MailboxQuota) -> Write {
    Write::Enqueue {
        envelopes: vec![OutgoingEnvelope {
            recipients: to.to_vec(),
            payload: payload.to_vec(),
            retract_tag: None,
        }],
        quota,
        received_at: at,
        expires_at: at + TTL,
    }
}

/// An envelope with the retraction tag of `secret`.
pub(crate) fn enqueue_retractable(to: &[DeviceAddress], secret: u8, at: u64) -> Write {
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

/// Retracts the envelopes of each of `secrets`.
pub(crate) fn retract(secrets: &[u8]) -> Write {
    Write::Retract {
        tags: secrets.iter().map(|s| retract_tag(&[*s; 32])).collect(),
    }
}

/// One sealed envelope to `to`'s account naming `devices`, presenting `access`.
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

/// The payloads of a mailbox, in order.
fn payloads(store: &dyn Store, device: &DeviceAddress) -> Vec<Vec<u8>> {
    store
        .backlog(device, None, NOW, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|e| e.payload)
        .collect()
}
