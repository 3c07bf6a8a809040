//! The media relay: call allocations in memory, and which connection's datagrams go where.
//!
//! A caller's `AllocateCall` makes an allocation: a compact random id (the first four
//! bytes of every media datagram), a 16-byte token and a random call id. The caller passes
//! id and token to the callee end to end; a device of the callee account presents both in
//! `JoinCall`. From then on a datagram from one party's connection is forwarded, as it is,
//! to the other's; anything else is dropped and counted. Signaling and media content are
//! end-to-end encrypted (P1); the relay sees sizes and timing only.
//!
//! The registry is pure: it holds an opaque `link` per party (the session's handle to the
//! connection) and returns effects ([`Ended`], [`Route`]) for the session to carry out, so
//! it is tested here without sockets or real time. Each allocation ends exactly once (the
//! entry is removed under the lock), and each end yields exactly one [`CallRecord`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use hush_protocol::{AccountId, CallEndCause, CallOutcome, ErrorCode};
use rand_core::{OsRng, RngCore};
use subtle::ConstantTimeEq;

use crate::cdr::CallRecord;

/// One side of a call: the connection's number and the session's handle to it.
#[derive(Debug, Clone)]
pub struct Party<L> {
    /// The connection number (never an identifier of a person).
    pub connection: u64,
    /// How to reach the connection.
    pub link: L,
}

struct Allocation<L> {
    call_id: [u8; 16],
    token: [u8; 16],
    caller_account: AccountId,
    callee_account: AccountId,
    caller: Party<L>,
    callee: Option<Party<L>>,
    started_at: u64,
    answered_at: Option<u64>,
    /// When a party last sent media (or joined); read and written under the read lock.
    last_media: AtomicU64,
}

impl<L: Clone> Allocation<L> {
    fn record(&self, ended_at: u64, outcome: CallOutcome) -> CallRecord {
        CallRecord::new(
            self.call_id,
            self.caller_account,
            self.callee_account,
            self.started_at,
            self.answered_at,
            ended_at,
            outcome,
        )
    }

    fn is_party(&self, connection: u64) -> bool {
        self.caller.connection == connection
            || self
                .callee
                .as_ref()
                .is_some_and(|c| c.connection == connection)
    }

    /// The parties to tell, leaving out `except`.
    fn others(&self, except: Option<u64>) -> Vec<L> {
        std::iter::once(&self.caller)
            .chain(self.callee.as_ref())
            .filter(|p| Some(p.connection) != except)
            .map(|p| p.link.clone())
            .collect()
    }
}

/// A new allocation, for the caller.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Allocated {
    /// The compact id.
    pub allocation: u32,
    /// The join token.
    pub token: [u8; 16],
    /// The call id.
    pub call_id: [u8; 16],
}

/// An allocation that ended: its record, and whom to tell.
#[derive(Debug)]
pub struct Ended<L> {
    /// The allocation id.
    pub allocation: u32,
    /// The call-detail record to write.
    pub record: CallRecord,
    /// Parties that did not end it themselves and must be told.
    pub notify: Vec<L>,
    /// Why it ended, as they are told.
    pub cause: CallEndCause,
}

/// What to do with a media datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<L> {
    /// Forward it to this party.
    Forward(L),
    /// No live allocation has that id.
    Unknown,
    /// The sending connection is not a party of the allocation.
    NotParty,
    /// The other party has not joined yet.
    NoPeer,
}

/// Why a call request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// As many allocations are live as the relay holds.
    #[error("the relay holds as many call allocations as it may")]
    Full,
    /// The account has as many live allocations as it may.
    #[error("the account has as many call allocations as it may")]
    AccountLimit,
    /// Unknown or ended allocation, wrong token, wrong account, or not a party.
    #[error("unknown call")]
    Unknown,
    /// The callee has joined already.
    #[error("the call already has its callee")]
    AlreadyJoined,
}

impl CallError {
    /// The wire code.
    pub fn code(self) -> ErrorCode {
        match self {
            CallError::Full => ErrorCode::Overloaded,
            CallError::AccountLimit => ErrorCode::CallLimitReached,
            CallError::Unknown => ErrorCode::UnknownCall,
            CallError::AlreadyJoined => ErrorCode::CallAlreadyJoined,
        }
    }
}

/// The timing rules of allocations.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// An allocation nobody joined ends as missed after this long.
    pub ring_secs: u64,
    /// A joined allocation with no media for this long ends.
    pub media_idle_secs: u64,
}

struct Registry<L> {
    live: HashMap<u32, Allocation<L>>,
    per_account: HashMap<AccountId, usize>,
}

impl<L> Registry<L> {
    fn remove(&mut self, allocation: u32) -> Option<Allocation<L>> {
        let removed = self.live.remove(&allocation)?;
        if let Some(count) = self.per_account.get_mut(&removed.caller_account) {
            *count -= 1;
            if *count == 0 {
                self.per_account.remove(&removed.caller_account);
            }
        }
        Some(removed)
    }
}

/// The live allocations. `L` is the session's handle to a connection.
pub struct Calls<L> {
    registry: RwLock<Registry<L>>,
    max_allocations: usize,
    max_per_account: usize,
}

impl<L: Clone> Calls<L> {
    /// An empty registry with these bounds.
    pub fn new(max_allocations: usize, max_per_account: usize) -> Self {
        Calls {
            registry: RwLock::new(Registry {
                live: HashMap::new(),
                per_account: HashMap::new(),
            }),
            max_allocations,
            max_per_account,
        }
    }

    /// Makes an allocation for a call from `caller_account` (on `caller`) to `callee`.
    pub fn allocate(
        &self,
        caller_account: AccountId,
        caller: Party<L>,
        callee: AccountId,
        now: u64,
    ) -> Result<Allocated, CallError> {
        let mut registry = self.write();
        if registry.live.len() >= self.max_allocations {
            return Err(CallError::Full);
        }
        let count = registry
            .per_account
            .get(&caller_account)
            .copied()
            .unwrap_or(0);
        if count >= self.max_per_account {
            return Err(CallError::AccountLimit);
        }
        // Unique among live allocations; with at most a few thousand live out of 2^32,
        // a second draw is rare and a tenth practically never happens.
        let allocation = loop {
            let candidate = OsRng.next_u32();
            if !registry.live.contains_key(&candidate) {
                break candidate;
            }
        };
        let mut token = [0u8; 16];
        OsRng.fill_bytes(&mut token);
        let mut call_id = [0u8; 16];
        OsRng.fill_bytes(&mut call_id);
        registry.live.insert(
            allocation,
            Allocation {
                call_id,
                token,
                caller_account,
                callee_account: callee,
                caller,
                callee: None,
                started_at: now,
                answered_at: None,
                last_media: AtomicU64::new(now),
            },
        );
        *registry.per_account.entry(caller_account).or_insert(0) += 1;
        Ok(Allocated {
            allocation,
            token,
            call_id,
        })
    }

    /// Joins `party`, a connection of `account`, as the callee. The token is compared in
    /// constant time; a wrong token, a wrong account and an unknown allocation all give
    /// [`CallError::Unknown`].
    pub fn join(
        &self,
        allocation: u32,
        token: &[u8; 16],
        account: AccountId,
        party: Party<L>,
        now: u64,
    ) -> Result<(), CallError> {
        let mut registry = self.write();
        let Some(entry) = registry.live.get_mut(&allocation) else {
            return Err(CallError::Unknown);
        };
        let token_ok = bool::from(entry.token.ct_eq(token));
        if !token_ok
            || entry.callee_account != account
            || entry.caller.connection == party.connection
        {
            return Err(CallError::Unknown);
        }
        if entry.callee.is_some() {
            return Err(CallError::AlreadyJoined);
        }
        entry.callee = Some(party);
        entry.answered_at = Some(now);
        entry.last_media.store(now, Ordering::Relaxed);
        Ok(())
    }

    /// Ends an allocation on a party's `EndCall`. Once the callee has joined the outcome is
    /// `Answered` whatever the hint; before, the caller's hint (an `Answered` hint before
    /// any answer is recorded as `Missed`). A connection that is not a party gets
    /// [`CallError::Unknown`] and changes nothing.
    pub fn hang_up(
        &self,
        allocation: u32,
        connection: u64,
        hint: CallOutcome,
        now: u64,
    ) -> Result<Ended<L>, CallError> {
        let mut registry = self.write();
        if !registry
            .live
            .get(&allocation)
            .is_some_and(|a| a.is_party(connection))
        {
            return Err(CallError::Unknown);
        }
        let removed = registry.remove(allocation).ok_or(CallError::Unknown)?;
        let outcome = match (removed.answered_at, hint) {
            (Some(_), _) => CallOutcome::Answered,
            (None, CallOutcome::Answered) => CallOutcome::Missed,
            (None, hint) => hint,
        };
        Ok(Ended {
            allocation,
            record: removed.record(now, outcome),
            notify: removed.others(Some(connection)),
            cause: CallEndCause::EndedByPeer,
        })
    }

    /// Ends an allocation because `connection`, a party of it, closed: `Answered` if the
    /// callee had joined, else `Failed`. `None` if the allocation is gone or the
    /// connection is not a party.
    pub fn connection_closed(
        &self,
        allocation: u32,
        connection: u64,
        now: u64,
    ) -> Option<Ended<L>> {
        let mut registry = self.write();
        if !registry
            .live
            .get(&allocation)
            .is_some_and(|a| a.is_party(connection))
        {
            return None;
        }
        let removed = registry.remove(allocation)?;
        let outcome = if removed.answered_at.is_some() {
            CallOutcome::Answered
        } else {
            CallOutcome::Failed
        };
        Some(Ended {
            allocation,
            record: removed.record(now, outcome),
            notify: removed.others(Some(connection)),
            cause: CallEndCause::PeerGone,
        })
    }

    /// Ends allocations that rang unanswered for too long (`Missed`) or went without media
    /// for too long (`Answered`); every party is told.
    pub fn expire(&self, now: u64, timeouts: Timeouts) -> Vec<Ended<L>> {
        let mut registry = self.write();
        let due: Vec<(u32, CallOutcome)> = registry
            .live
            .iter()
            .filter_map(|(&id, a)| match a.answered_at {
                None if now.saturating_sub(a.started_at) >= timeouts.ring_secs => {
                    Some((id, CallOutcome::Missed))
                }
                Some(_)
                    if now.saturating_sub(a.last_media.load(Ordering::Relaxed))
                        >= timeouts.media_idle_secs =>
                {
                    Some((id, CallOutcome::Answered))
                }
                _ => None,
            })
            .collect();
        due.into_iter()
            .filter_map(|(id, outcome)| {
                let removed = registry.remove(id)?;
                let cause = if outcome == CallOutcome::Missed {
                    CallEndCause::RingTimeout
                } else {
                    CallEndCause::MediaIdle
                };
                Some(Ended {
                    allocation: id,
                    record: removed.record(now, outcome),
                    notify: removed.others(None),
                    cause,
                })
            })
            .collect()
    }

    /// Ends every live allocation (the relay is shutting down): `Answered` if joined, else
    /// `Failed`, so no call goes without its record.
    pub fn end_all(&self, now: u64) -> Vec<Ended<L>> {
        let mut registry = self.write();
        let ids: Vec<u32> = registry.live.keys().copied().collect();
        ids.into_iter()
            .filter_map(|id| {
                let removed = registry.remove(id)?;
                let outcome = if removed.answered_at.is_some() {
                    CallOutcome::Answered
                } else {
                    CallOutcome::Failed
                };
                Some(Ended {
                    allocation: id,
                    record: removed.record(now, outcome),
                    notify: Vec::new(),
                    cause: CallEndCause::PeerGone,
                })
            })
            .collect()
    }

    /// Where a datagram for `allocation` from `connection` goes. Takes the read lock only
    /// and allocates nothing; a party's datagram counts as media activity.
    pub fn route(&self, allocation: u32, connection: u64, now: u64) -> Route<L> {
        let registry = self.read();
        let Some(entry) = registry.live.get(&allocation) else {
            return Route::Unknown;
        };
        let peer = if entry.caller.connection == connection {
            entry.callee.as_ref()
        } else if entry
            .callee
            .as_ref()
            .is_some_and(|c| c.connection == connection)
        {
            Some(&entry.caller)
        } else {
            return Route::NotParty;
        };
        entry.last_media.fetch_max(now, Ordering::Relaxed);
        match peer {
            Some(peer) => Route::Forward(peer.link.clone()),
            None => Route::NoPeer,
        }
    }

    /// Whether `connection` is a party of the live `allocation`.
    pub fn is_party(&self, allocation: u32, connection: u64) -> bool {
        self.read()
            .live
            .get(&allocation)
            .is_some_and(|a| a.is_party(connection))
    }

    /// Live allocations.
    pub fn live(&self) -> usize {
        self.read().live.len()
    }

    fn read(&self) -> RwLockReadGuard<'_, Registry<L>> {
        // Every critical section leaves the maps consistent (single inserts and removes),
        // so a poisoned lock is still usable.
        self.registry.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Registry<L>> {
        self.registry
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: AccountId = AccountId([1; 16]);
    const BOB: AccountId = AccountId([2; 16]);
    const EVE: AccountId = AccountId([3; 16]);
    const TIMEOUTS: Timeouts = Timeouts {
        ring_secs: 90,
        media_idle_secs: 30,
    };

    fn party(connection: u64) -> Party<u64> {
        Party {
            connection,
            link: connection,
        }
    }

    fn calls() -> Calls<u64> {
        Calls::new(100, 2)
    }

    #[test]
    fn an_answered_call_routes_both_ways_and_records_its_duration() {
        let calls = calls();
        let a = calls.allocate(ALICE, party(1), BOB, 1000).unwrap();
        assert_eq!(calls.route(a.allocation, 1, 1001), Route::NoPeer);
        assert_eq!(calls.route(a.allocation, 2, 1001), Route::NotParty);
        calls
            .join(a.allocation, &a.token, BOB, party(2), 1010)
            .unwrap();
        assert_eq!(calls.route(a.allocation, 1, 1011), Route::Forward(2));
        assert_eq!(calls.route(a.allocation, 2, 1011), Route::Forward(1));
        assert_eq!(calls.route(a.allocation, 3, 1011), Route::NotParty);
        assert_eq!(calls.route(a.allocation ^ 1, 1, 1011), Route::Unknown);

        // A non-party cannot hang up; the caller's "missed" hint is overruled.
        assert_eq!(
            calls
                .hang_up(a.allocation, 3, CallOutcome::Rejected, 1050)
                .unwrap_err(),
            CallError::Unknown
        );
        let ended = calls
            .hang_up(a.allocation, 1, CallOutcome::Missed, 1070)
            .unwrap();
        assert_eq!(ended.record.outcome, CallOutcome::Answered);
        assert_eq!(ended.record.answered_at, Some(1010));
        assert_eq!(ended.record.duration_secs, 60);
        assert_eq!(ended.record.call_id, a.call_id);
        assert_eq!(ended.notify, vec![2]);
        assert_eq!(calls.live(), 0);
        // Exactly once: the other side's hang-up and a late join find nothing.
        assert!(calls
            .hang_up(a.allocation, 2, CallOutcome::Answered, 1071)
            .is_err());
        assert_eq!(
            calls.join(a.allocation, &a.token, BOB, party(2), 1072),
            Err(CallError::Unknown)
        );
    }

    #[test]
    fn joining_needs_the_token_the_callee_account_and_happens_once() {
        let calls = calls();
        let a = calls.allocate(ALICE, party(1), BOB, 0).unwrap();
        let mut wrong = a.token;
        wrong[0] ^= 1;
        assert_eq!(
            calls.join(a.allocation, &wrong, BOB, party(2), 1),
            Err(CallError::Unknown)
        );
        assert_eq!(
            calls.join(a.allocation, &a.token, EVE, party(3), 1),
            Err(CallError::Unknown)
        );
        assert_eq!(
            calls.join(a.allocation, &a.token, BOB, party(1), 1),
            Err(CallError::Unknown)
        );
        calls
            .join(a.allocation, &a.token, BOB, party(2), 1)
            .unwrap();
        assert_eq!(
            calls.join(a.allocation, &a.token, BOB, party(4), 2),
            Err(CallError::AlreadyJoined)
        );
    }

    #[test]
    fn unanswered_hang_ups_keep_the_callers_hint() {
        let calls = calls();
        for hint in [
            CallOutcome::Missed,
            CallOutcome::Rejected,
            CallOutcome::Busy,
            CallOutcome::Failed,
        ] {
            let a = calls.allocate(ALICE, party(1), BOB, 0).unwrap();
            let ended = calls.hang_up(a.allocation, 1, hint, 5).unwrap();
            assert_eq!(ended.record.outcome, hint);
            assert_eq!(ended.record.duration_secs, 0);
            assert!(ended.notify.is_empty());
        }
        let a = calls.allocate(ALICE, party(1), BOB, 0).unwrap();
        let ended = calls
            .hang_up(a.allocation, 1, CallOutcome::Answered, 5)
            .unwrap();
        assert_eq!(ended.record.outcome, CallOutcome::Missed);
    }

    #[test]
    fn ring_and_media_idle_timeouts_end_calls() {
        let calls = calls();
        let ringing = calls.allocate(ALICE, party(1), BOB, 0).unwrap();
        let talking = calls.allocate(ALICE, party(3), BOB, 0).unwrap();
        calls
            .join(talking.allocation, &talking.token, BOB, party(4), 10)
            .unwrap();
        assert!(calls.expire(39, TIMEOUTS).is_empty());
        // Media keeps the call alive.
        assert_eq!(calls.route(talking.allocation, 4, 35), Route::Forward(3));
        assert!(calls.expire(64, TIMEOUTS).is_empty());
        let ended = calls.expire(65, TIMEOUTS);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].allocation, talking.allocation);
        assert_eq!(ended[0].record.outcome, CallOutcome::Answered);
        assert_eq!(ended[0].record.duration_secs, 55);
        assert_eq!(ended[0].notify.len(), 2);
        let ended = calls.expire(90, TIMEOUTS);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].allocation, ringing.allocation);
        assert_eq!(ended[0].record.outcome, CallOutcome::Missed);
        assert_eq!(ended[0].notify, vec![1]);
    }

    #[test]
    fn closed_connections_end_their_calls_and_limits_hold() {
        let calls = calls();
        let a = calls.allocate(ALICE, party(1), BOB, 0).unwrap();
        let b = calls.allocate(ALICE, party(1), BOB, 0).unwrap();
        assert_eq!(
            calls.allocate(ALICE, party(1), BOB, 0).map(|_| ()),
            Err(CallError::AccountLimit)
        );
        calls
            .join(b.allocation, &b.token, BOB, party(2), 5)
            .unwrap();
        assert!(calls.connection_closed(a.allocation, 9, 6).is_none());
        let ended = calls.connection_closed(a.allocation, 1, 6).unwrap();
        assert_eq!(ended.record.outcome, CallOutcome::Failed);
        let ended = calls.connection_closed(b.allocation, 2, 8).unwrap();
        assert_eq!(ended.record.outcome, CallOutcome::Answered);
        assert_eq!(ended.notify, vec![1]);
        // The account's slots are free again.
        assert!(calls.allocate(ALICE, party(1), BOB, 9).is_ok());

        let tiny: Calls<u64> = Calls::new(1, 5);
        tiny.allocate(ALICE, party(1), BOB, 0).unwrap();
        assert_eq!(
            tiny.allocate(EVE, party(2), BOB, 0).map(|_| ()),
            Err(CallError::Full)
        );
    }
}
