//! What travels inside the end-to-end encryption: messages, receipts, typing, control
//! messages. Encoded with postcard and padded (see [`crate::padding`]) before encryption.

use serde::{Deserialize, Serialize};

use crate::error::CryptoError;
use crate::padding;

/// A message's id: random, chosen by its sender, the same on every device.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId(pub [u8; 16]);

impl std::fmt::Debug for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MessageId(<redacted>)")
    }
}

/// Which receipt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReceiptKind {
    /// The message reached a device of the recipient.
    Delivered,
    /// The recipient read it.
    Read,
}

/// What a message says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// A text message.
    Text {
        /// The text.
        text: String,
    },
    /// Structured content the app defines (a reaction, a location, a contact card…).
    Structured {
        /// The app's name for the kind of content.
        kind: String,
        /// The app's bytes.
        data: Vec<u8>,
    },
    /// Delivery or read receipts for messages from the receipt's recipient.
    Receipt {
        /// Which.
        kind: ReceiptKind,
        /// The messages.
        ids: Vec<MessageId>,
    },
    /// The sender started or stopped typing.
    Typing {
        /// Started (true) or stopped.
        started: bool,
    },
    /// Delete-for-everyone of one of the sender's earlier messages.
    Delete {
        /// The message.
        target: MessageId,
    },
    /// The conversation's disappearing-message timer changed.
    Timer {
        /// Seconds a message lives after it is received; `None` switches it off.
        expires_in: Option<u32>,
    },
    /// Call signaling (the client's call API sends and handles these).
    Call(CallSignal),
}

/// A call's id, chosen by the relay when the caller allocates the call.
pub type CallId = [u8; 16];

/// Call signaling, end-to-end encrypted like any message: the relay never sees a call key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallSignal {
    /// The caller rings every device of the callee.
    Offer {
        /// The call.
        call_id: CallId,
        /// The media key, fresh for this call.
        key: crate::media::CallKey,
        /// The relay allocation that carries the media.
        allocation: u32,
        /// The token that lets the callee join the allocation.
        token: [u8; 16],
        /// Whether video is offered.
        video: bool,
    },
    /// The callee answered (also copied to the callee's other devices: stop ringing).
    Answer {
        /// The call.
        call_id: CallId,
    },
    /// The callee declined (also copied to the callee's other devices).
    Reject {
        /// The call.
        call_id: CallId,
    },
    /// The callee is in another call.
    Busy {
        /// The call.
        call_id: CallId,
    },
    /// Either side ended an answered call.
    HangUp {
        /// The call.
        call_id: CallId,
    },
    /// The caller gave up before an answer (or the ringing timed out).
    Cancel {
        /// The call.
        call_id: CallId,
    },
}

impl Body {
    /// Whether the recipient keeps this as a message (and sends a delivery receipt).
    pub(crate) fn is_message(&self) -> bool {
        matches!(self, Body::Text { .. } | Body::Structured { .. })
    }
}

/// The full plaintext of one end-to-end message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Content {
    pub(crate) id: MessageId,
    /// Sender's clock, seconds since the epoch.
    pub(crate) sent_at: u64,
    /// The conversation's disappearing timer as the sender has it.
    pub(crate) expires_in: Option<u32>,
    /// The sender's profile key, so the recipient can derive its delivery token and answer
    /// with sealed sender.
    pub(crate) profile_key: Option<[u8; 32]>,
    /// Set when this is a copy for the sender's own other devices: the conversation.
    pub(crate) sent_to: Option<[u8; 16]>,
    pub(crate) body: Body,
}

impl Content {
    /// A control message (receipt, call signal): a fresh id, sent now, never disappearing.
    pub(crate) fn control(
        body: Body,
        profile_key: Option<[u8; 32]>,
        sent_to: Option<[u8; 16]>,
        now: u64,
    ) -> Self {
        Content {
            id: MessageId(crate::util::random()),
            sent_at: now,
            expires_in: None,
            profile_key,
            sent_to,
            body,
        }
    }

    /// The padded plaintext. A content that does not encode is an error, never an empty
    /// plaintext that would be encrypted and sent in its place.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, CryptoError> {
        let encoded = postcard::to_allocvec(self).map_err(|_| CryptoError::Encode)?;
        Ok(padding::pad(&encoded))
    }

    pub(crate) fn decode(padded: &[u8]) -> Result<Self, CryptoError> {
        postcard::from_bytes(padding::unpad(padded)?).map_err(|_| CryptoError::InvalidMessage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_round_trips_padded() {
        let content = Content {
            id: MessageId([5; 16]),
            sent_at: 1_700_000_000,
            expires_in: Some(3600),
            profile_key: Some([6; 32]),
            sent_to: None,
            body: Body::Text {
                text: "hello".into(),
            },
        };
        let encoded = content.encode().unwrap();
        assert_eq!(encoded.len(), padding::MIN_PADDED_LEN);
        assert_eq!(Content::decode(&encoded).unwrap(), content);
        assert!(Content::decode(&[0x80]).is_err());
    }
}
