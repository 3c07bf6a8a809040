//! One connected device, one concern per file.
//!
//! A connection goes through three phases, each a type: before `Hello` ([`handshake`]:
//! version negotiation, the challenge), anonymous ([`anonymous`]: register, authenticate,
//! sealed sends, retraction, provisioning, anonymous `ListDevices`/`FetchPrekeys` with a
//! token) and authenticated ([`authenticated`]: the rest). What a request means is decided
//! by its phase's `decide`, a function of the connection's state, the relay's rules and
//! clock, and the request, returning a [`Decision`] that the [`driver`] carries out
//! (submit a write, answer, read the store, end the connection). It does no IO and never
//! waits, so it is tested without sockets; it is not free of effects: it charges the rate
//! limits ([`charge`]: the connection's, and the relay's shared per-account and
//! per-address buckets), frees delivery-window room on an `Ack`, and draws a new
//! account's id. Call requests are carried out in [`calls`].
//!
//! Around the request loop: the [`writer`] owns the stream's send half and answers writes
//! as their commits become durable; the [`delivery`] loop pushes the device's mailbox;
//! `after_commit` is what a commit causes besides its answers, on the commit thread;
//! [`datagrams`] forwards the connection's media datagrams.
//!
//! Protocol violations (a frame that does not decode, a request its phase does not allow,
//! a bad signature, a second `Hello`) end the connection: the relay sends a `Fatal` frame
//! and closes with the same error code. Refusals of a well-formed request (unknown
//! account, unknown envelope, device limit) are answered with an error response and the
//! connection carries on, because honest clients meet them too.

mod after_commit;
mod anonymous;
mod authenticated;
mod calls;
mod charge;
mod context;
mod datagrams;
mod decision;
mod delivery;
mod driver;
#[cfg(test)]
mod fixtures;
mod frames;
mod handshake;
mod reads;
mod writer;

use hush_protocol::{DecodeError, ErrorCode};

pub(crate) use after_commit::after_commit;
pub(crate) use calls::record_call_end;
pub(crate) use context::SessionContext;
use decision::Decision;
pub(crate) use driver::run;

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client finished its stream or closed the connection.
    Peer,
    /// The relay ends the connection with this code.
    Close(ErrorCode),
}

impl From<DecodeError> for End {
    fn from(e: DecodeError) -> Self {
        End::Close(e.code())
    }
}
