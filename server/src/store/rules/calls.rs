//! Call-detail records (P8): each stored with its account index entries and counted in
//! its day, in one transaction; deleted by retention or erasure while the day counts stay.

use hush_protocol::AccountId;

use super::{Rules, EXPIRE_BATCH};
use crate::cdr::{CallRecord, DayStats};
use crate::store::backend::Transaction;
use crate::store::{Outcome, StoreError, WriteResult};

impl Rules {
    /// Stores a call record with its account index entries and counts it in its day.
    pub(super) fn record_call<T: Transaction>(
        &self,
        t: &mut T,
        record: &CallRecord,
        delete_at: u64,
    ) -> Result<(), StoreError> {
        let sealed = self.at_rest.seal_call(record, delete_at)?;
        t.put_call(
            record.started_at,
            sealed.call,
            [sealed.caller, sealed.callee],
            &sealed.value,
        )?;
        // The day's counts, updated in the same transaction as the record.
        let day = record.day();
        let mut stats = match t.day_stats(day)? {
            Some(sealed) => self.at_rest.open_day_stats(day, &sealed)?,
            None => DayStats::new(day),
        };
        stats.add(record);
        t.put_day_stats(day, &self.at_rest.seal_day_stats(day, &stats)?)
    }

    /// Deletes up to [`EXPIRE_BATCH`] records of calls that started at or before `until`.
    pub(super) fn expire_calls<T: Transaction>(
        t: &mut T,
        until: u64,
    ) -> Result<WriteResult, StoreError> {
        let doomed = t.calls_until(until, EXPIRE_BATCH)?;
        for (start, call) in &doomed {
            t.remove_call(*start, *call)?;
        }
        Ok(Ok(Outcome::CallsDeleted {
            records: doomed.len() as u64,
        }))
    }

    /// Deletes every record naming `account` (account erasure).
    pub(super) fn forget_calls<T: Transaction>(
        &self,
        t: &mut T,
        account: AccountId,
    ) -> Result<WriteResult, StoreError> {
        let tag = self.at_rest.account_tag(&account);
        let mut records = 0;
        for (start, call) in t.calls_of(&tag)? {
            if t.remove_call(start, call)? {
                records += 1;
            }
        }
        Ok(Ok(Outcome::CallsDeleted { records }))
    }
}
