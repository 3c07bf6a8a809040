//! Prekeys: uploads replace the signed and last-resort keys and add one-time ones; a
//! bundle consumes one-time keys and never the last-resort one.

use hush_protocol::{
    AccountId, DeviceAddress, DeviceBundle, DeviceId, PrekeyBundles, UploadPrekeys,
};

use super::{decide, Rules};
use crate::keyring::Tag;
use crate::store::backend::Transaction;
use crate::store::records::{DeviceRecord, PrekeyKind};
use crate::store::{Outcome, PrekeyCounts, Refusal, StoreError, WriteResult};

/// The one-time keys a device holds, through the transaction.
pub(crate) fn counts<T: Transaction>(t: &T, tag: Tag) -> Result<PrekeyCounts, StoreError> {
    Ok(PrekeyCounts {
        one_time: t.count_prekeys(tag, PrekeyKind::OneTime)?,
        kem_one_time: t.count_prekeys(tag, PrekeyKind::KemOneTime)?,
    })
}

impl Rules {
    pub(super) fn upload_prekeys<T: Transaction>(
        &self,
        t: &mut T,
        address: DeviceAddress,
        upload: &UploadPrekeys,
    ) -> Result<WriteResult, StoreError> {
        let account_tag = self.at_rest.account_tag(&address.account);
        let exists = self
            .load_account(t, &account_tag)?
            .is_some_and(|r| r.device(address.device).is_some());
        if !exists {
            return Ok(Err(Refusal::UnknownDevice));
        }
        let tag = self.at_rest.device_tag(&address);
        let slots = upload
            .signed_prekey
            .iter()
            .map(|key| (PrekeyKind::Signed, 0, key))
            .chain(
                upload
                    .kem_last_resort
                    .iter()
                    .map(|key| (PrekeyKind::KemLastResort, 0, key)),
            )
            .chain(
                upload
                    .one_time
                    .iter()
                    .map(|key| (PrekeyKind::OneTime, key.id, key)),
            )
            .chain(
                upload
                    .kem_one_time
                    .iter()
                    .map(|key| (PrekeyKind::KemOneTime, key.id, key)),
            );
        for (kind, slot, key) in slots {
            let sealed = self.at_rest.seal_prekey(&tag, kind, slot, key)?;
            t.put_prekey(tag, kind, slot, &sealed)?;
        }
        Ok(Ok(Outcome::PrekeysStored(counts(t, tag)?)))
    }

    pub(super) fn take_prekeys<T: Transaction>(
        &self,
        t: &mut T,
        account: AccountId,
        device: Option<DeviceId>,
        low_threshold: u32,
    ) -> Result<WriteResult, StoreError> {
        let account_tag = self.at_rest.account_tag(&account);
        let Some(record) = self.load_account(t, &account_tag)? else {
            return Ok(Err(Refusal::UnknownAccount));
        };
        let devices: Vec<&DeviceRecord> = match device {
            Some(id) => match record.device(id) {
                Some(d) => vec![d],
                None => return Ok(Err(Refusal::UnknownDevice)),
            },
            None => record.devices.iter().collect(),
        };
        let mut bundles = Vec::with_capacity(devices.len());
        let mut low = Vec::new();
        for d in devices {
            let address = DeviceAddress {
                account,
                device: DeviceId(d.id),
            };
            let tag = self.at_rest.device_tag(&address);
            let signed_prekey = self.kept_prekey(t, tag, PrekeyKind::Signed)?;
            let one_time = self.take_prekey(t, tag, PrekeyKind::OneTime)?;
            let mut kem = self.take_prekey(t, tag, PrekeyKind::KemOneTime)?;
            // No one-time KEM key left: the last-resort one, handed out and kept.
            let kem_is_last_resort = kem.is_none();
            if kem.is_none() {
                kem = self.kept_prekey(t, tag, PrekeyKind::KemLastResort)?;
            }
            let counts = counts(t, tag)?;
            if decide::low_on_prekeys(counts, low_threshold) {
                low.push((address, counts));
            }
            bundles.push(DeviceBundle {
                device: DeviceId(d.id),
                device_key: d.key,
                signed_prekey,
                one_time,
                kem_is_last_resort: kem_is_last_resort && kem.is_some(),
                kem,
            });
        }
        let bundles = PrekeyBundles {
            identity_key: record.identity_key.clone(),
            devices: bundles,
        };
        Ok(Ok(Outcome::Prekeys { bundles, low }))
    }

    /// A key that stays when handed out (slot 0 of its kind).
    fn kept_prekey<T: Transaction>(
        &self,
        t: &T,
        tag: Tag,
        kind: PrekeyKind,
    ) -> Result<Option<hush_protocol::Prekey>, StoreError> {
        t.prekey(tag, kind, 0)?
            .map(|sealed| self.at_rest.open_prekey(&tag, kind, 0, &sealed))
            .transpose()
    }

    /// The first one-time key of `kind`, consumed.
    fn take_prekey<T: Transaction>(
        &self,
        t: &mut T,
        tag: Tag,
        kind: PrekeyKind,
    ) -> Result<Option<hush_protocol::Prekey>, StoreError> {
        t.take_first_prekey(tag, kind)?
            .map(|(slot, sealed)| self.at_rest.open_prekey(&tag, kind, slot, &sealed))
            .transpose()
    }
}
