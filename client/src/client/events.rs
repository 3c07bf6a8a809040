//! What the client tells the app, and the messages it keeps for it.

use hush_protocol::{AccountId, DeviceId, ErrorCode};
use serde::{Deserialize, Serialize};

use super::calls::CallEndReason;
use crate::content::{Body, CallId, MessageId, ReceiptKind};
use crate::error::CryptoError;

/// A message kept in the local store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Its id.
    pub id: MessageId,
    /// The other party of the conversation.
    pub conversation: AccountId,
    /// Sent by this account (from this or another of its devices).
    pub outgoing: bool,
    /// Sender's clock.
    pub sent_at: u64,
    /// When it disappears (seconds since the epoch), if a timer was set.
    pub expires_at: Option<u64>,
    /// What it says.
    pub body: Body,
}

/// What the client tells the app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// A message from a contact (stored before this event).
    Message {
        /// Sender account.
        from: AccountId,
        /// Sender device.
        device: DeviceId,
        /// The message.
        message: StoredMessage,
    },
    /// A message this account sent from another of its devices.
    SentElsewhere {
        /// The message.
        message: StoredMessage,
    },
    /// Receipts from a contact.
    Receipt {
        /// Who.
        from: AccountId,
        /// Which.
        kind: ReceiptKind,
        /// For which of our messages.
        ids: Vec<MessageId>,
    },
    /// A contact started or stopped typing.
    Typing {
        /// Who.
        from: AccountId,
        /// Started or stopped.
        started: bool,
    },
    /// A contact deleted one of their messages for everyone.
    Deleted {
        /// Who.
        from: AccountId,
        /// Which.
        id: MessageId,
    },
    /// A contact changed the conversation's disappearing timer.
    TimerChanged {
        /// Who.
        from: AccountId,
        /// The new timer.
        expires_in: Option<u32>,
    },
    /// A contact's identity key changed: compare safety numbers again.
    IdentityChanged {
        /// Whose.
        account: AccountId,
    },
    /// An envelope could not be opened (tampered, forged, not for this device…); it was
    /// dropped.
    Undecryptable {
        /// Why.
        error: CryptoError,
    },
    /// A contact is calling: ring, then `answer_call` or `reject_call`.
    IncomingCall {
        /// Who.
        from: AccountId,
        /// From which of their devices.
        device: DeviceId,
        /// The call.
        call_id: CallId,
        /// Whether video is offered.
        video: bool,
    },
    /// Our outgoing call was answered: its media is ready (`take_media`).
    CallAnswered {
        /// The call.
        call_id: CallId,
    },
    /// A call ended (or stopped ringing here).
    CallEnded {
        /// The call.
        call_id: CallId,
        /// Why.
        reason: CallEndReason,
    },
    /// The relay connection ended.
    Disconnected(Option<ErrorCode>),
}
