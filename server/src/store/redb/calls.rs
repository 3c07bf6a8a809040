//! Call-detail records and day statistics in redb, and their reads.

use hush_protocol::AccountId;
use redb::ReadableTable;

use super::schema::{Tables, CALL_ACCOUNTS, CALL_DAYS, CALL_RECORDS};
use super::RedbStore;
use crate::cdr::{CallRecord, DayStats};
use crate::keyring::Tag;
use crate::store::at_rest::call_parties;
use crate::store::backend::CallRows;
use crate::store::StoreError;

impl CallRows for Tables<'_> {
    fn put_call(
        &mut self,
        start: u64,
        call: Tag,
        parties: [Tag; 2],
        value: &[u8],
    ) -> Result<(), StoreError> {
        self.call_records.insert((start, call), value)?;
        for party in parties {
            self.call_accounts.insert((party, start, call), ())?;
        }
        Ok(())
    }

    fn calls_until(&self, until: u64, limit: usize) -> Result<Vec<(u64, Tag)>, StoreError> {
        let mut doomed = Vec::new();
        for entry in self.call_records.range(..=(until, [0xff; 16]))? {
            let (key, _) = entry?;
            doomed.push(key.value());
            if doomed.len() == limit {
                break;
            }
        }
        Ok(doomed)
    }

    fn calls_of(&self, account: &Tag) -> Result<Vec<(u64, Tag)>, StoreError> {
        let tag = *account;
        let mut calls = Vec::new();
        for entry in self
            .call_accounts
            .range((tag, 0, [0; 16])..=(tag, u64::MAX, [0xff; 16]))?
        {
            let (key, _) = entry?;
            let (_, start, call) = key.value();
            calls.push((start, call));
        }
        Ok(calls)
    }

    fn remove_call(&mut self, start: u64, call: Tag) -> Result<bool, StoreError> {
        let parties = self
            .call_records
            .remove((start, call))?
            .map(|value| call_parties(value.value()));
        let Some(parties) = parties else {
            return Ok(false);
        };
        for tag in parties.into_iter().flatten() {
            self.call_accounts.remove((tag, start, call))?;
        }
        Ok(true)
    }

    fn day_stats(&self, day: u32) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.call_days.get(day)?.map(|v| v.value().to_vec()))
    }

    fn put_day_stats(&mut self, day: u32, sealed: &[u8]) -> Result<(), StoreError> {
        self.call_days.insert(day, sealed)?;
        Ok(())
    }
}

impl RedbStore {
    pub(super) fn read_records_of(
        &self,
        account: &AccountId,
    ) -> Result<Vec<CallRecord>, StoreError> {
        let at_rest = self.rules.at_rest();
        let tag = at_rest.account_tag(account);
        let txn = self.begin_read()?;
        let index = txn.open_table(CALL_ACCOUNTS)?;
        let records = txn.open_table(CALL_RECORDS)?;
        let mut out = Vec::new();
        for entry in index.range((tag, 0, [0; 16])..=(tag, u64::MAX, [0xff; 16]))? {
            let (key, _) = entry?;
            let (_, start, call) = key.value();
            if let Some(value) = records.get((start, call))? {
                out.extend(at_rest.open_call(start, &call, value.value()));
            }
        }
        Ok(out)
    }

    pub(super) fn read_records_between(
        &self,
        from: u64,
        to: u64,
    ) -> Result<Vec<CallRecord>, StoreError> {
        let txn = self.begin_read()?;
        let records = txn.open_table(CALL_RECORDS)?;
        let mut out = Vec::new();
        if from >= to {
            return Ok(out);
        }
        for entry in records.range((from, [0; 16])..(to, [0; 16]))? {
            let (key, value) = entry?;
            let (start, call) = key.value();
            out.extend(self.rules.at_rest().open_call(start, &call, value.value()));
        }
        Ok(out)
    }

    pub(super) fn read_day_stats(&self) -> Result<Vec<DayStats>, StoreError> {
        let txn = self.begin_read()?;
        let days = txn.open_table(CALL_DAYS)?;
        let mut out = Vec::new();
        for entry in days.iter()? {
            let (key, value) = entry?;
            out.push(
                self.rules
                    .at_rest()
                    .open_day_stats(key.value(), value.value())?,
            );
        }
        Ok(out)
    }
}
