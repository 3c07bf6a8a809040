//! Prekeys in redb, by (device tag, kind, slot).

use hush_protocol::DeviceAddress;
use redb::ReadableTable;

use super::schema::{Tables, PREKEYS};
use super::RedbStore;
use crate::keyring::Tag;
use crate::store::backend::PrekeyRows;
use crate::store::records::PrekeyKind;
use crate::store::{PrekeyCounts, StoreError};

fn count<T: ReadableTable<(Tag, u8, u32), &'static [u8]>>(
    table: &T,
    device: Tag,
    kind: PrekeyKind,
) -> Result<u32, StoreError> {
    let kind = kind as u8;
    let mut n = 0u32;
    for entry in table.range((device, kind, 0)..=(device, kind, u32::MAX))? {
        entry?;
        n += 1;
    }
    Ok(n)
}

impl PrekeyRows for Tables<'_> {
    fn put_prekey(
        &mut self,
        device: Tag,
        kind: PrekeyKind,
        slot: u32,
        sealed: &[u8],
    ) -> Result<(), StoreError> {
        self.prekeys.insert((device, kind as u8, slot), sealed)?;
        Ok(())
    }

    fn prekey(
        &self,
        device: Tag,
        kind: PrekeyKind,
        slot: u32,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .prekeys
            .get((device, kind as u8, slot))?
            .map(|v| v.value().to_vec()))
    }

    fn take_first_prekey(
        &mut self,
        device: Tag,
        kind: PrekeyKind,
    ) -> Result<Option<(u32, Vec<u8>)>, StoreError> {
        let kind = kind as u8;
        let first = self
            .prekeys
            .range((device, kind, 0)..=(device, kind, u32::MAX))?
            .next()
            .transpose()?
            .map(|(k, v)| (k.value().2, v.value().to_vec()));
        if let Some((slot, _)) = &first {
            self.prekeys.remove((device, kind, *slot))?;
        }
        Ok(first)
    }

    fn count_prekeys(&self, device: Tag, kind: PrekeyKind) -> Result<u32, StoreError> {
        count(&self.prekeys, device, kind)
    }

    fn remove_prekeys(&mut self, device: Tag) -> Result<(), StoreError> {
        for kind in PrekeyKind::ALL {
            let kind = kind as u8;
            self.prekeys
                .retain_in((device, kind, 0)..=(device, kind, u32::MAX), |_, _| false)?;
        }
        Ok(())
    }
}

impl RedbStore {
    pub(super) fn read_prekey_counts(
        &self,
        address: &DeviceAddress,
    ) -> Result<PrekeyCounts, StoreError> {
        let txn = self.begin_read()?;
        let prekeys = txn.open_table(PREKEYS)?;
        let tag = self.rules.at_rest().device_tag(address);
        Ok(PrekeyCounts {
            one_time: count(&prekeys, tag, PrekeyKind::OneTime)?,
            kem_one_time: count(&prekeys, tag, PrekeyKind::KemOneTime)?,
        })
    }
}
