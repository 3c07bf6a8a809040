//! Accounts, invites and delivery access in redb: the rows, and the reads the sessions
//! make of them.

use hush_protocol::{AccountId, DeviceAddress, DeviceId};
use redb::ReadableTable;

use super::schema::{Tables, ACCOUNTS, DELIVERY_ACCESS};
use super::RedbStore;
use crate::keyring::Tag;
use crate::store::backend::AccountRows;
use crate::store::records::AccountRecord;
use crate::store::rules::decide;
use crate::store::{AccountView, StoreError};

impl AccountRows for Tables<'_> {
    fn account(&self, account: &Tag) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.accounts.get(account)?.map(|v| v.value().to_vec()))
    }

    fn account_exists(&self, account: &Tag) -> Result<bool, StoreError> {
        Ok(self.accounts.get(account)?.is_some())
    }

    fn put_account(&mut self, account: &Tag, sealed: &[u8]) -> Result<(), StoreError> {
        self.accounts.insert(account, sealed)?;
        Ok(())
    }

    fn take_invite(&mut self, hash: &[u8; 32]) -> Result<bool, StoreError> {
        Ok(self.invites.remove(hash)?.is_some())
    }

    fn put_invite(&mut self, hash: &[u8; 32]) -> Result<(), StoreError> {
        self.invites.insert(hash, ())?;
        Ok(())
    }

    fn delivery_access(&self, account: &Tag) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .delivery_access
            .get(account)?
            .map(|v| v.value().to_vec()))
    }

    fn put_delivery_access(&mut self, account: &Tag, sealed: &[u8]) -> Result<(), StoreError> {
        self.delivery_access.insert(account, sealed)?;
        Ok(())
    }
}

impl RedbStore {
    /// An account's record as committed.
    fn committed_account(
        &self,
        txn: &redb::ReadTransaction,
        tag: &Tag,
    ) -> Result<Option<AccountRecord>, StoreError> {
        let accounts = txn.open_table(ACCOUNTS)?;
        let sealed = accounts.get(tag)?.map(|v| v.value().to_vec());
        sealed
            .map(|s| self.rules.at_rest().open_account(tag, &s))
            .transpose()
    }

    pub(super) fn read_device_key(
        &self,
        address: &DeviceAddress,
    ) -> Result<Option<[u8; 32]>, StoreError> {
        let txn = self.begin_read()?;
        let tag = self.rules.at_rest().account_tag(&address.account);
        let record = self.committed_account(&txn, &tag)?;
        Ok(record.and_then(|r| r.device(address.device).map(|d| d.key)))
    }

    pub(super) fn read_account(
        &self,
        account: &AccountId,
    ) -> Result<Option<AccountView>, StoreError> {
        let txn = self.begin_read()?;
        let tag = self.rules.at_rest().account_tag(account);
        let record = self.committed_account(&txn, &tag)?;
        Ok(record.map(|r| AccountView {
            devices: r.device_ids().into_iter().map(DeviceId).collect(),
            identity_key: r.identity_key,
        }))
    }

    pub(super) fn read_admits(
        &self,
        account: &AccountId,
        token: Option<&[u8; 16]>,
    ) -> Result<bool, StoreError> {
        let txn = self.begin_read()?;
        let at_rest = self.rules.at_rest();
        let tag = at_rest.account_tag(account);
        if self.committed_account(&txn, &tag)?.is_none() {
            return Ok(false);
        }
        let table = txn.open_table(DELIVERY_ACCESS)?;
        let sealed = table.get(&tag)?.map(|v| v.value().to_vec());
        let access = at_rest.open_delivery_access(&tag, sealed.as_deref())?;
        Ok(decide::admits(&access, token))
    }

    /// Devices of every account, for the stats. A record that fails to open is left out
    /// with a warning: the counts are for operators and tests, and one damaged record must
    /// not hide the rest.
    pub(super) fn count_devices(&self, txn: &redb::ReadTransaction) -> Result<u64, StoreError> {
        let accounts = txn.open_table(ACCOUNTS)?;
        let mut devices = 0u64;
        for entry in accounts.iter()? {
            let (tag, sealed) = entry?;
            let opened = self
                .rules
                .at_rest()
                .open_account(&tag.value(), sealed.value());
            if let Ok(record) = opened {
                devices += record.devices.len() as u64;
            } else {
                tracing::warn!("leaving a damaged account record out of the stats");
            }
        }
        Ok(devices)
    }
}
