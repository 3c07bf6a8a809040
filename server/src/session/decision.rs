//! What a request comes to, as decided by its connection's phase: the effects that the
//! driver carries out. Payloads are moved into the decision, never copied.

use hush_protocol::sealed::retract_tag;
use hush_protocol::{
    AccountId, Authenticate, CallOutcome, CallToken, DeviceAddress, ErrorCode, Provision,
    ResponseBody, Retract, SealedSend,
};

use super::context::Rules;
use crate::store::{MailboxQuota, Write};

/// What the driver does with a request.
pub(super) enum Decision {
    /// Hand the write to the committer; the writer answers once it is durable.
    Submit(Write),
    /// Answer now.
    Respond(Result<ResponseBody, ErrorCode>),
    /// A rate limit refused the request; it may be sent again after this long.
    RateLimited { retry_after_ms: u32 },
    /// A protocol violation: end the connection.
    Close(ErrorCode),
    /// Read the store, then answer.
    Read(Read),
    /// Register this new account (its request's signature checked): commit, answer, and
    /// make the connection its primary device's.
    Register { account: AccountId, write: Write },
    /// Open this connection's provisioning address.
    OpenProvisioning,
    /// Push a provisioning message to the connection waiting at its address.
    Provision(Provision),
    /// A call request, for the call registry.
    Call(CallRequest),
}

/// A read a request needs before it can be answered; reads go to the blocking pool.
pub(super) enum Read {
    /// The device key the authentication names, to check its signature.
    DeviceKey(Authenticate),
    /// An account's devices.
    Devices(AccountId),
    /// A sender certificate for this device: its account's identity key.
    SenderCertificate(DeviceAddress),
    /// Whether an anonymous caller holding `token` may reach `account`; if so, `then`.
    Admission {
        account: AccountId,
        token: Option<[u8; 16]>,
        then: Admitted,
    },
}

/// What an admitted anonymous request goes on to do.
pub(super) enum Admitted {
    /// Take the account's prekeys (a `TakePrekeys` write).
    Submit(Write),
    /// List the account's devices.
    Devices(AccountId),
}

/// A call request of an authenticated device. The account is the connection's own, never
/// one the request names.
pub(super) enum CallRequest {
    /// A new allocation, from this device to `callee`.
    Allocate {
        caller: DeviceAddress,
        callee: AccountId,
    },
    /// Joining an allocation as a device of the callee account.
    Join {
        account: AccountId,
        allocation: u32,
        token: CallToken,
    },
    /// Ending an allocation this connection is a party of.
    End { allocation: u32, hint: CallOutcome },
}

/// A refused charge, as the decision says it.
pub(super) fn rate_limited(retry_after_ms: u32) -> Decision {
    Decision::RateLimited { retry_after_ms }
}

/// Queues sealed envelopes, stamped now.
pub(super) fn sealed_write(rules: &Rules<'_>, send: SealedSend) -> Write {
    let now = rules.clock.now();
    Write::SealedEnqueue {
        envelopes: send.envelopes,
        quota: mailbox_quota(rules),
        received_at: now,
        expires_at: now.saturating_add(rules.config.message_expiry_secs()),
    }
}

/// The mailbox limits a queued envelope must fit.
pub(super) fn mailbox_quota(rules: &Rules<'_>) -> MailboxQuota {
    let limits = &rules.config.limits;
    MailboxQuota {
        max_envelopes: limits.mailbox_max_envelopes,
        max_bytes: limits.mailbox_max_bytes,
    }
}

/// Envelope copies a sealed send asks for: one per named device.
pub(super) fn sealed_copies(send: &SealedSend) -> usize {
    send.envelopes.iter().map(|e| e.devices.len()).sum()
}

/// Retraction by secret: the store sees only the derived tags.
pub(super) fn retract_write(retract: &Retract) -> Write {
    Write::Retract {
        tags: retract.secrets.iter().map(retract_tag).collect(),
    }
}
