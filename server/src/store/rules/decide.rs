//! The store's policy decisions as pure functions: no database, no keys, so each is
//! unit-tested on its own. The rules call them inside a transaction, before they change
//! anything.

use hush_protocol::DeviceId;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::store::records::{AccountRecord, DeliveryAccess};
use crate::store::{MailboxQuota, PrekeyCounts, Refusal};

/// SHA-256 of an invite or delivery token: tokens are stored by hash, never as they
/// are, so a stolen database does not hand them out.
pub(crate) fn token_hash(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// The invite a registration must consume (by hash), if any: an invite given is always
/// consumed; none given is refused when the policy requires one.
pub(crate) fn invite_to_consume(
    invite: Option<&[u8]>,
    require_invite: bool,
) -> Result<Option<[u8; 32]>, Refusal> {
    match invite {
        Some(token) => Ok(Some(token_hash(token))),
        None if require_invite => Err(Refusal::InviteRequired),
        None => Ok(None),
    }
}

/// Whether an account may take one more device with `key`: under its limit, and not a
/// key it already has.
pub(crate) fn device_may_join(
    record: &AccountRecord,
    key: &[u8; 32],
    max_devices: u32,
) -> Result<(), Refusal> {
    if record.devices.len() >= max_devices as usize {
        return Err(Refusal::DeviceLimitReached);
    }
    if record.devices.iter().any(|d| d.key == *key) {
        return Err(Refusal::DuplicateDeviceKey);
    }
    Ok(())
}

/// Whether `device` may be removed from `record`'s account: never the primary, and only
/// a device it has.
pub(crate) fn device_removable(record: &AccountRecord, device: DeviceId) -> Result<(), Refusal> {
    if device == DeviceId::PRIMARY {
        return Err(Refusal::NotPermitted);
    }
    if record.device(device).is_none() {
        return Err(Refusal::UnknownDevice);
    }
    Ok(())
}

/// Whether a sender presenting `token` may deliver sealed envelopes under `access`. The
/// hash comparison is constant-time, so timing does not tell how much of a guessed token
/// was right.
pub(crate) fn admits(access: &DeliveryAccess, token: Option<&[u8; 16]>) -> bool {
    if access.allow_unknown_senders {
        return true;
    }
    match (&access.token_hash, token) {
        (Some(stored), Some(token)) => bool::from(token_hash(token).ct_eq(stored)),
        _ => false,
    }
}

/// Whether the devices a sealed send names for one account (`requested`, sorted here) are
/// exactly its current ones (`current`, ascending): none missing, none extra, none twice.
pub(crate) fn exact_device_list(requested: &mut [u32], current: &[u32]) -> Result<(), Refusal> {
    requested.sort_unstable();
    if requested == current {
        Ok(())
    } else {
        Err(Refusal::DeviceListChanged)
    }
}

/// What a mailbox holding `held` (envelopes, bytes) would hold after `adding`, if that
/// stays within `quota`.
pub(crate) fn within_quota(
    held: (u64, u64),
    adding: (u64, u64),
    quota: MailboxQuota,
) -> Result<(u64, u64), Refusal> {
    let after = (
        held.0.saturating_add(adding.0),
        held.1.saturating_add(adding.1),
    );
    if after.0 > quota.max_envelopes || after.1 > quota.max_bytes {
        return Err(Refusal::MailboxFull);
    }
    Ok(after)
}

/// Whether an envelope expiring at `expires_at` may still be delivered at `now` (P3: an
/// expired envelope never is, swept or not).
pub(crate) fn deliverable(expires_at: u64, now: u64) -> bool {
    expires_at > now
}

/// Whether a device left with `counts` one-time keys should be told to upload more.
pub(crate) fn low_on_prekeys(counts: PrekeyCounts, threshold: u32) -> bool {
    counts.one_time < threshold || counts.kem_one_time < threshold
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn account_with(devices: &[(u32, u8)]) -> AccountRecord {
        let mut record = AccountRecord::new(vec![1], [devices[0].1; 32]);
        for &(id, key) in &devices[1..] {
            record
                .devices
                .push(crate::store::records::DeviceRecord { id, key: [key; 32] });
        }
        record
    }

    #[test]
    fn an_invite_given_is_consumed_and_none_is_refused_only_when_required() {
        assert_eq!(
            invite_to_consume(Some(b"token"), false),
            Ok(Some(token_hash(b"token")))
        );
        assert_eq!(
            invite_to_consume(Some(b"token"), true),
            Ok(Some(token_hash(b"token")))
        );
        assert_eq!(invite_to_consume(None, false), Ok(None));
        assert_eq!(invite_to_consume(None, true), Err(Refusal::InviteRequired));
        assert_ne!(token_hash(b"token"), token_hash(b"tokeN"));
    }

    #[test]
    fn a_device_joins_only_under_the_limit_and_with_a_new_key() {
        let record = account_with(&[(1, 1), (2, 2)]);
        assert_eq!(device_may_join(&record, &[3; 32], 3), Ok(()));
        assert_eq!(
            device_may_join(&record, &[3; 32], 2),
            Err(Refusal::DeviceLimitReached)
        );
        assert_eq!(
            device_may_join(&record, &[2; 32], 3),
            Err(Refusal::DuplicateDeviceKey)
        );
    }

    #[test]
    fn the_primary_device_is_never_removable_and_an_unknown_one_is_unknown() {
        let record = account_with(&[(1, 1), (2, 2)]);
        assert_eq!(
            device_removable(&record, DeviceId::PRIMARY),
            Err(Refusal::NotPermitted)
        );
        assert_eq!(device_removable(&record, DeviceId(2)), Ok(()));
        assert_eq!(
            device_removable(&record, DeviceId(3)),
            Err(Refusal::UnknownDevice)
        );
    }

    #[test]
    fn sealed_admission_needs_the_right_token_unless_unknown_senders_are_allowed() {
        let token = [7u8; 16];
        let hash: [u8; 32] = Sha256::digest(token).into();
        let none = DeliveryAccess::default();
        assert!(!admits(&none, None), "no access set: nothing sealed");
        assert!(!admits(&none, Some(&token)));
        let with_token = DeliveryAccess {
            token_hash: Some(hash),
            allow_unknown_senders: false,
        };
        assert!(admits(&with_token, Some(&token)));
        assert!(!admits(&with_token, Some(&[8; 16])), "wrong token");
        assert!(!admits(&with_token, None), "no token");
        let open = DeliveryAccess {
            token_hash: None,
            allow_unknown_senders: true,
        };
        assert!(admits(&open, None));
        assert!(admits(&open, Some(&[8; 16])));
    }

    #[test]
    fn a_sealed_device_list_must_be_exact() {
        let current = [1, 2];
        assert_eq!(exact_device_list(&mut [2, 1], &current), Ok(()));
        for mut requested in [vec![1], vec![1, 2, 3], vec![1, 2, 2], vec![1, 1], vec![]] {
            assert_eq!(
                exact_device_list(&mut requested, &current),
                Err(Refusal::DeviceListChanged),
                "{requested:?}"
            );
        }
    }

    #[test]
    fn the_quota_counts_envelopes_and_bytes_and_allows_exactly_the_limit() {
        let quota = MailboxQuota {
            max_envelopes: 3,
            max_bytes: 10,
        };
        assert_eq!(within_quota((2, 6), (1, 4), quota), Ok((3, 10)));
        assert_eq!(
            within_quota((3, 6), (1, 0), quota),
            Err(Refusal::MailboxFull),
            "by envelopes"
        );
        assert_eq!(
            within_quota((1, 6), (1, 5), quota),
            Err(Refusal::MailboxFull),
            "by bytes"
        );
        assert_eq!(
            within_quota((u64::MAX, u64::MAX), (1, 1), MailboxQuota::UNLIMITED),
            Ok((u64::MAX, u64::MAX)),
            "saturates, never wraps"
        );
    }

    #[test]
    fn an_envelope_is_deliverable_only_before_it_expires() {
        assert!(deliverable(11, 10));
        assert!(!deliverable(10, 10));
        assert!(!deliverable(9, 10));
    }

    #[test]
    fn a_device_is_low_when_either_kind_of_one_time_key_is_below_the_threshold() {
        let counts = |one_time, kem_one_time| PrekeyCounts {
            one_time,
            kem_one_time,
        };
        assert!(!low_on_prekeys(counts(10, 10), 10));
        assert!(low_on_prekeys(counts(9, 10), 10));
        assert!(low_on_prekeys(counts(10, 9), 10));
    }
}
