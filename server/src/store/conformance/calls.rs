//! Call-detail records: indexed by account and time, counted per day, deleted by
//! retention and erasure while the day counts stay.

use hush_protocol::{AccountId, CallOutcome};

use super::StoreFactory;
use crate::cdr::CallRecord;
use crate::clock::{Clock, ManualClock};
use crate::keyring::DAY;
use crate::store::at_rest::expiry_day;
use crate::store::{Outcome, Store, Write};

const NOW: u64 = super::NOW;

fn call(id: u8, caller: u8, callee: u8, start: u64, outcome: CallOutcome) -> CallRecord {
    let answered = (outcome == CallOutcome::Answered).then_some(start + 10);
    CallRecord::new(
        [id; 16],
        AccountId([caller; 16]),
        AccountId([callee; 16]),
        start,
        answered,
        start + 100,
        outcome,
    )
}

fn record(record: CallRecord, retention: u64) -> Write {
    let delete_at = record.started_at + retention;
    Write::RecordCall { record, delete_at }
}

pub(super) fn call_records_are_indexed_by_account_and_time_and_counted_per_day<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
    let retention = 90 * DAY;
    let start = NOW - NOW % DAY;
    let results = store
        .apply(vec![
            record(
                call(1, 0xa1, 0xb1, start + 10, CallOutcome::Answered),
                retention,
            ),
            record(
                call(2, 0xa1, 0xc1, start + 20, CallOutcome::Missed),
                retention,
            ),
            record(
                call(3, 0xc1, 0xb1, start + DAY, CallOutcome::Busy),
                retention,
            ),
        ])
        .unwrap();
    assert!(results.iter().all(|r| *r == Ok(Outcome::CallRecorded)));

    let of_a = store.records_of(&AccountId([0xa1; 16])).unwrap();
    assert_eq!(of_a.len(), 2);
    assert_eq!(
        of_a[0],
        call(1, 0xa1, 0xb1, start + 10, CallOutcome::Answered)
    );
    assert_eq!(of_a[0].duration_secs, 90);
    assert_eq!(store.records_of(&AccountId([0xb1; 16])).unwrap().len(), 2);
    assert_eq!(store.records_between(start, start + DAY).unwrap().len(), 2);
    assert_eq!(
        store
            .records_between(start + DAY, start + 2 * DAY)
            .unwrap()
            .len(),
        1
    );

    let days = store.day_stats().unwrap();
    assert_eq!(days.len(), 2);
    assert_eq!(
        (
            days[0].calls,
            days[0].answered,
            days[0].unanswered,
            days[0].missed
        ),
        (2, 1, 1, 1)
    );
    assert_eq!(days[0].minutes(), 2);
    assert_eq!(
        (days[1].calls, days[1].unanswered, days[1].missed),
        (1, 1, 0)
    );

    // Erasure of one account takes every record naming it, on both sides' indexes.
    let forgotten = store
        .apply(vec![Write::ForgetCalls {
            account: AccountId([0xc1; 16]),
        }])
        .unwrap();
    assert_eq!(forgotten, vec![Ok(Outcome::CallsDeleted { records: 2 })]);
    let stats = store.stats().unwrap();
    assert_eq!((stats.call_records, stats.call_index_entries), (1, 2));
    assert_eq!(store.records_of(&AccountId([0xb1; 16])).unwrap().len(), 1);
    assert_eq!(store.day_stats().unwrap(), days, "day counts stay");
}

pub(super) fn call_records_go_after_retention_while_day_counts_stay<F: StoreFactory>() {
    let dir = tempfile::tempdir().unwrap();
    let store = F::open(dir.path());
    let clock = ManualClock::new(NOW);
    let retention = 30 * DAY;
    let (caller, callee) = (AccountId([0x7a; 16]), AccountId([0x7b; 16]));
    let old = call(9, 0x7a, 0x7b, clock.now(), CallOutcome::Answered);
    store.apply(vec![record(old, retention)]).unwrap();
    clock.advance(20 * DAY);
    let recent = call(8, 0x7c, 0x7d, clock.now(), CallOutcome::Rejected);
    store.apply(vec![record(recent, retention)]).unwrap();
    let summary = store.retention_summary().unwrap();
    assert_eq!(summary.call_records, 2);
    assert_eq!(summary.oldest_call_start, Some(NOW));

    // Not yet past retention: nothing goes.
    clock.advance(10 * DAY - 1);
    let sweep = |now: u64| {
        store
            .apply(vec![
                Write::ExpireCalls {
                    until: now - retention,
                },
                Write::Expire { now },
            ])
            .unwrap()
    };
    assert_eq!(
        sweep(clock.now())[0],
        Ok(Outcome::CallsDeleted { records: 0 })
    );
    clock.advance(1);
    assert_eq!(
        sweep(clock.now())[0],
        Ok(Outcome::CallsDeleted { records: 1 })
    );
    assert!(store.records_of(&caller).unwrap().is_empty());
    assert!(store.records_of(&callee).unwrap().is_empty());
    let stats = store.stats().unwrap();
    assert_eq!((stats.call_records, stats.call_index_entries), (1, 2));
    let days = store.day_stats().unwrap();
    assert_eq!(days.iter().map(|d| d.calls).sum::<u64>(), 2);
    assert_eq!(days.iter().map(|d| d.answered).sum::<u64>(), 1);

    // A day later the old record's day key is gone too (its bytes in free pages are
    // noise), and no file of the store holds the callers' ids, raw or hex.
    clock.advance(DAY);
    sweep(clock.now());
    let old_key_day = expiry_day(NOW + retention);
    assert!(F::keyring(&store).day(old_key_day).is_none());
    drop(store);
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        for id in [caller, callee] {
            for needle in [id.0.to_vec(), id.to_hex().into_bytes()] {
                assert!(!bytes.windows(needle.len()).any(|w| w == needle));
            }
        }
    }
}
