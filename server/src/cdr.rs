//! Call-detail records (P8): what a record holds, the day-level counts kept without
//! identities, and how both are printed for the operator.
//!
//! A record holds exactly: call id, caller account, callee account, start, answer, end,
//! duration and outcome. No devices, addresses, sizes or media counts. Records live in the
//! store (sealed, keyed by blinded tags, see [`crate::store`]) for `cdr_retention_days`;
//! the day counts, which name nobody, stay after the records are gone.
//!
//! ```
//! use hush_protocol::{AccountId, CallOutcome};
//! use hush_server::cdr::{format_date, CallRecord, DayStats};
//!
//! let record = CallRecord::new([1; 16], AccountId([2; 16]), AccountId([3; 16]),
//!     86_400, Some(86_410), 86_500, CallOutcome::Answered);
//! assert_eq!(record.duration_secs, 90);
//! let mut day = DayStats::new(1);
//! day.add(&record);
//! assert_eq!((day.calls, day.answered, day.minutes()), (1, 1, 2));
//! assert_eq!(format_date(day.day), "1970-01-02");
//! ```

use std::fmt;
use std::fmt::Write as _;

use hush_protocol::{AccountId, CallOutcome};
use serde::{Deserialize, Serialize};

use crate::keyring::DAY;

/// One call, as the relay records it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    /// The call's random id.
    pub call_id: [u8; 16],
    /// The account that allocated the call.
    pub caller: AccountId,
    /// The account called.
    pub callee: AccountId,
    /// When the allocation was made (seconds since the Unix epoch).
    pub started_at: u64,
    /// When the callee joined, if it did.
    pub answered_at: Option<u64>,
    /// When the allocation ended.
    pub ended_at: u64,
    /// `ended_at - answered_at`, 0 if unanswered.
    pub duration_secs: u64,
    /// How it ended.
    pub outcome: CallOutcome,
}

impl CallRecord {
    /// A record, with the duration computed from the answer and end times.
    pub fn new(
        call_id: [u8; 16],
        caller: AccountId,
        callee: AccountId,
        started_at: u64,
        answered_at: Option<u64>,
        ended_at: u64,
        outcome: CallOutcome,
    ) -> Self {
        CallRecord {
            call_id,
            caller,
            callee,
            started_at,
            answered_at,
            ended_at,
            duration_secs: answered_at.map_or(0, |a| ended_at.saturating_sub(a)),
            outcome,
        }
    }

    /// The UTC day (days since the Unix epoch) the call started on.
    pub fn day(&self) -> u32 {
        day_of(self.started_at)
    }
}

/// Leaves out the call id; the accounts print redacted already.
impl fmt::Debug for CallRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallRecord")
            .field("call_id", &"<redacted>")
            .field("started_at", &self.started_at)
            .field("answered_at", &self.answered_at)
            .field("ended_at", &self.ended_at)
            .field("duration_secs", &self.duration_secs)
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}

/// The counts of one UTC day (by the calls' start), with no identities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DayStats {
    /// Days since the Unix epoch.
    pub day: u32,
    /// Calls that started that day and have ended.
    pub calls: u64,
    /// Of those, answered.
    pub answered: u64,
    /// Not answered: missed, rejected, busy and failed together.
    pub unanswered: u64,
    /// Of the unanswered, missed.
    pub missed: u64,
    /// Seconds of answered calls.
    pub seconds: u64,
}

impl DayStats {
    /// An empty day.
    pub fn new(day: u32) -> Self {
        DayStats {
            day,
            ..DayStats::default()
        }
    }

    /// Counts one ended call.
    pub fn add(&mut self, record: &CallRecord) {
        self.calls += 1;
        if record.outcome == CallOutcome::Answered {
            self.answered += 1;
        } else {
            self.unanswered += 1;
        }
        if record.outcome == CallOutcome::Missed {
            self.missed += 1;
        }
        self.seconds = self.seconds.saturating_add(record.duration_secs);
    }

    /// Minutes of answered calls, rounded up.
    pub fn minutes(&self) -> u64 {
        self.seconds.div_ceil(60)
    }
}

/// The UTC day of a time.
pub fn day_of(time: u64) -> u32 {
    u32::try_from(time / DAY).unwrap_or(u32::MAX)
}

/// A day since the Unix epoch as `YYYY-MM-DD` (proleptic Gregorian, UTC).
pub fn format_date(day: u32) -> String {
    let (year, month, date) = civil_from_days(i64::from(day));
    format!("{year:04}-{month:02}-{date:02}")
}

/// A time as RFC 3339 in UTC, `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_time(time: u64) -> String {
    let secs = time % DAY;
    format!(
        "{}T{:02}:{:02}:{:02}Z",
        format_date(day_of(time)),
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let date = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, date)
}

/// The operator's day report: a header, then one line per day, oldest first.
pub fn day_report(days: &[DayStats]) -> String {
    let mut out = String::from("date calls answered unanswered missed minutes\n");
    for day in days {
        let _ = writeln!(
            out,
            "{} {} {} {} {} {}",
            format_date(day.day),
            day.calls,
            day.answered,
            day.unanswered,
            day.missed,
            day.minutes()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(outcome: CallOutcome, answered: Option<u64>, end: u64) -> CallRecord {
        CallRecord::new(
            [9; 16],
            AccountId([1; 16]),
            AccountId([2; 16]),
            100,
            answered,
            end,
            outcome,
        )
    }

    #[test]
    fn day_counts_split_answered_unanswered_and_missed() {
        let mut day = DayStats::new(0);
        day.add(&record(CallOutcome::Answered, Some(110), 171));
        day.add(&record(CallOutcome::Answered, Some(110), 111));
        day.add(&record(CallOutcome::Missed, None, 150));
        day.add(&record(CallOutcome::Rejected, None, 150));
        day.add(&record(CallOutcome::Busy, None, 150));
        day.add(&record(CallOutcome::Failed, None, 150));
        assert_eq!(
            (day.calls, day.answered, day.unanswered, day.missed),
            (6, 2, 4, 1)
        );
        assert_eq!(day.seconds, 62);
        assert_eq!(day.minutes(), 2);
        assert_eq!(record(CallOutcome::Missed, None, 150).duration_secs, 0);
    }

    #[test]
    fn dates_are_utc_gregorian() {
        assert_eq!(format_date(0), "1970-01-01");
        assert_eq!(format_date(11_016), "2000-02-29");
        assert_eq!(format_date(20_417), "2025-11-25");
        assert_eq!(format_time(1_764_079_200), "2025-11-25T14:00:00Z");
        assert_eq!(format_time(59), "1970-01-01T00:00:59Z");
    }

    #[test]
    fn debug_leaves_out_ids() {
        let printed = format!("{:?}", record(CallOutcome::Busy, None, 1));
        assert!(printed.contains("call_id: \"<redacted>\""), "{printed}");
        assert!(
            !printed.contains("[9") && !printed.contains("[1,"),
            "{printed}"
        );
    }
}
