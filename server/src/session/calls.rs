//! The session's side of calls: which calls a connection is a party of, the checks made
//! before the registry is asked (the callee exists; the account is the connection's own),
//! carrying out a call request, and an allocation's end (its record, then the parties
//! told). The registry's own rules (who may join, route, hang up) are in `crate::calls`.

use std::time::Duration;

use hush_protocol::{
    encode_frame, AccountId, CallEnded, CallToken, ErrorCode, RequestId, Response, ResponseBody,
    ServerFrame,
};

use super::decision::CallRequest;
use super::driver::Session;
use super::writer::respond_to_write;
use super::{End, SessionContext};
use crate::calls::{Allocated, CallError, Calls, Ended, Party};
use crate::commit::CommitError;
use crate::metrics::Metrics;
use crate::party::PartyLink;
use crate::store::{Write, WriteResult};

/// How long a `CallEnded` push may wait for room in a party's outbox.
const CALL_END_PUSH_WAIT: Duration = Duration::from_secs(5);

/// Call allocations a connection is (or was) a party of, so that they end when it closes.
#[derive(Debug, Default)]
pub(super) struct ConnectionCalls(Vec<u32>);

impl ConnectionCalls {
    /// Remembers a call `connection` is a party of, forgetting those that ended.
    pub(super) fn track<L: Clone>(&mut self, calls: &Calls<L>, connection: u64, allocation: u32) {
        self.0.retain(|&a| calls.is_party(a, connection));
        self.0.push(allocation);
    }

    /// The calls to end with the connection.
    pub(super) fn take(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.0)
    }
}

/// Makes an allocation for a call from `caller` (on `party`) to `callee`, which the store
/// said does or does not exist (`callee_known`).
pub(super) fn allocate<L: Clone>(
    calls: &Calls<L>,
    tracked: &mut ConnectionCalls,
    caller: AccountId,
    party: Party<L>,
    callee: AccountId,
    callee_known: Result<(), ErrorCode>,
    now: u64,
) -> Result<Allocated, ErrorCode> {
    callee_known?;
    let connection = party.connection;
    let allocated = calls
        .allocate(caller, party, callee, now)
        .map_err(CallError::code)?;
    tracked.track(calls, connection, allocated.allocation);
    Ok(allocated)
}

/// Joins `party`, a connection of `account`, to an allocation as the callee.
pub(super) fn join<L: Clone>(
    calls: &Calls<L>,
    tracked: &mut ConnectionCalls,
    account: AccountId,
    party: Party<L>,
    allocation: u32,
    token: &CallToken,
    now: u64,
) -> Result<(), ErrorCode> {
    let connection = party.connection;
    calls
        .join(allocation, &token.0, account, party, now)
        .map_err(CallError::code)?;
    tracked.track(calls, connection, allocation);
    Ok(())
}

impl Session {
    fn party(&self) -> Party<PartyLink> {
        Party {
            connection: self.number,
            link: PartyLink {
                number: self.number,
                quic: self.connection.clone(),
                outbox: self.outbox.clone(),
            },
        }
    }

    /// Carries out a call request of this (authenticated) connection.
    pub(super) async fn call(&mut self, id: RequestId, request: CallRequest) -> Result<(), End> {
        match request {
            CallRequest::Allocate { caller, callee } => {
                let callee_known = self.read_account(callee).await?.map(drop);
                let context = self.context.clone();
                let now = context.clock.now();
                let party = self.party();
                let result = allocate(
                    &context.calls,
                    &mut self.calls,
                    caller.account,
                    party,
                    callee,
                    callee_known,
                    now,
                )
                .map(|allocated| {
                    Metrics::inc(&context.metrics.calls_allocated);
                    ResponseBody::CallAllocated {
                        allocation: allocated.allocation,
                        token: CallToken(allocated.token),
                        call_id: allocated.call_id,
                        media: context.media.open(allocated.allocation, self.number),
                    }
                });
                self.respond(id, result).await;
            }
            CallRequest::Join {
                account,
                allocation,
                token,
            } => {
                let context = self.context.clone();
                let now = context.clock.now();
                let party = self.party();
                let result = join(
                    &context.calls,
                    &mut self.calls,
                    account,
                    party,
                    allocation,
                    &token,
                    now,
                )
                .map(|()| ResponseBody::CallJoined {
                    media: context.media.open(allocation, self.number),
                });
                self.respond(id, result).await;
            }
            CallRequest::End { allocation, hint } => {
                let now = self.context.clock.now();
                match self
                    .context
                    .calls
                    .hang_up(allocation, self.number, hint, now)
                {
                    Ok(ended) => self.end_call(id, ended).await?,
                    Err(error) => self.respond(id, Err(error.code())).await,
                }
            }
        }
        Ok(())
    }

    /// Answers a hang-up once the call-detail record is durable, off the read loop.
    async fn end_call(&self, id: RequestId, ended: Ended<PartyLink>) -> Result<(), End> {
        let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
            return Err(End::Close(ErrorCode::ShuttingDown));
        };
        let context = self.context.clone();
        let outbox = self.outbox.clone();
        tokio::spawn(async move {
            let outcome = record_call_end(&context, ended).await;
            let result = respond_to_write(outcome);
            let frame = encode_frame(&ServerFrame::Response(Response { id, result }));
            let _ = outbox.send(frame).await;
            drop(permit);
        });
        Ok(())
    }
}

/// Carries out an allocation's end: writes its call-detail record through the committer,
/// then tells the parties that did not end it. Returns the commit's outcome.
pub(crate) async fn record_call_end(
    context: &SessionContext,
    ended: Ended<PartyLink>,
) -> Result<WriteResult, CommitError> {
    let Ended {
        allocation,
        record,
        notify,
        cause,
    } = ended;
    Metrics::inc(&context.metrics.calls_ended);
    context.media.close(allocation);
    let delete_at = record
        .started_at
        .saturating_add(context.config.cdr_retention_secs());
    let result = context
        .committer
        .commit(Write::RecordCall { record, delete_at })
        .await;
    if !matches!(result, Ok(Ok(_))) {
        tracing::error!("writing a call-detail record failed");
    }
    // Told after the record is durable, as every answer of the relay is.
    let frame = encode_frame(&ServerFrame::CallEnded(CallEnded { allocation, cause }));
    for party in notify {
        // For a timeout or a vanished peer this push is the party's only end signal, so it
        // must not be lost to a momentarily full outbox (a mailbox drain fills it); it
        // waits, boundedly, off this path.
        let frame = frame.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CALL_END_PUSH_WAIT, party.outbox.send(frame)).await;
        });
    }
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use hush_protocol::CallOutcome;

    use super::*;

    const ALICE: AccountId = AccountId([1; 16]);
    const BOB: AccountId = AccountId([2; 16]);
    const EVE: AccountId = AccountId([3; 16]);

    fn party(connection: u64) -> Party<u64> {
        Party {
            connection,
            link: connection,
        }
    }

    #[test]
    fn a_call_to_an_unknown_account_is_refused_before_the_registry_is_asked() {
        let calls: Calls<u64> = Calls::new(10, 10);
        let mut tracked = ConnectionCalls::default();
        let refused = allocate(
            &calls,
            &mut tracked,
            ALICE,
            party(1),
            BOB,
            Err(ErrorCode::UnknownAccount),
            0,
        );
        assert_eq!(refused.map(|_| ()), Err(ErrorCode::UnknownAccount));
        assert_eq!(calls.live(), 0);
        assert!(tracked.take().is_empty());
    }

    #[test]
    fn only_a_device_of_the_callee_account_with_the_token_joins() {
        let calls: Calls<u64> = Calls::new(10, 10);
        let mut caller = ConnectionCalls::default();
        let allocated = allocate(&calls, &mut caller, ALICE, party(1), BOB, Ok(()), 0).unwrap();
        assert_eq!(caller.take(), [allocated.allocation]);

        let token = CallToken(allocated.token);
        let mut eve = ConnectionCalls::default();
        assert_eq!(
            join(
                &calls,
                &mut eve,
                EVE,
                party(3),
                allocated.allocation,
                &token,
                1
            ),
            Err(ErrorCode::UnknownCall)
        );
        assert!(eve.take().is_empty(), "a refused join is not tracked");
        let mut bob = ConnectionCalls::default();
        let mut wrong = token;
        wrong.0[0] ^= 1;
        assert_eq!(
            join(
                &calls,
                &mut bob,
                BOB,
                party(2),
                allocated.allocation,
                &wrong,
                1
            ),
            Err(ErrorCode::UnknownCall)
        );
        assert_eq!(
            join(
                &calls,
                &mut bob,
                BOB,
                party(2),
                allocated.allocation,
                &token,
                1
            ),
            Ok(())
        );
        assert_eq!(bob.take(), [allocated.allocation]);
        assert_eq!(
            join(
                &calls,
                &mut bob,
                BOB,
                party(4),
                allocated.allocation,
                &token,
                2
            ),
            Err(ErrorCode::CallAlreadyJoined)
        );
    }

    #[test]
    fn a_connection_forgets_the_calls_that_ended_and_keeps_the_live_ones() {
        let calls: Calls<u64> = Calls::new(10, 10);
        let mut tracked = ConnectionCalls::default();
        let first = allocate(&calls, &mut tracked, ALICE, party(1), BOB, Ok(()), 0).unwrap();
        let second = allocate(&calls, &mut tracked, ALICE, party(1), BOB, Ok(()), 0).unwrap();
        calls
            .hang_up(first.allocation, 1, CallOutcome::Missed, 5)
            .unwrap();
        let third = allocate(&calls, &mut tracked, ALICE, party(1), BOB, Ok(()), 6).unwrap();
        assert_eq!(tracked.take(), [second.allocation, third.allocation]);
    }
}
