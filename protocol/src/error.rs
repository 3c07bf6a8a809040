//! Decode errors, and the stable error codes that travel on the wire.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a byte sequence is not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix announces more bytes than this frame kind may have.
    #[error("frame of kind {kind:#04x} announces {len} bytes, the limit is {limit}")]
    FrameTooLarge {
        /// The frame kind byte.
        kind: u8,
        /// The announced body length.
        len: u64,
        /// That kind's limit.
        limit: usize,
    },
    /// The kind byte names no frame this side accepts.
    #[error("unknown frame kind {0:#04x}")]
    UnknownFrameType(u8),
    /// The body does not decode as the frame its kind names.
    #[error("malformed body for frame kind {kind:#04x}")]
    Malformed {
        /// The frame kind byte.
        kind: u8,
    },
    /// The body decoded but bytes were left over.
    #[error("{extra} trailing bytes after frame kind {kind:#04x}")]
    TrailingBytes {
        /// The frame kind byte.
        kind: u8,
        /// How many bytes were left.
        extra: usize,
    },
    /// A field breaks a limit of [`crate::limits`].
    #[error("frame exceeds the limit on {what}")]
    LimitExceeded {
        /// Which limit.
        what: &'static str,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
}

impl DecodeError {
    /// The wire code a peer is told when its frame fails to decode.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::UnknownFrameType(_) => ErrorCode::UnknownFrameType,
            DecodeError::Malformed { .. }
            | DecodeError::TrailingBytes { .. }
            | DecodeError::Truncated => ErrorCode::MalformedFrame,
            DecodeError::LimitExceeded { .. } => ErrorCode::LimitExceeded,
        }
    }
}

macro_rules! error_codes {
    ($($(#[$doc:meta])* $name:ident = $value:literal,)*) => {
        /// A stable error code. The numbers never change meaning; codes this build does not
        /// know decode as [`ErrorCode::Unknown`] so that a newer relay does not break an
        /// older client. The same numbers are used as QUIC application close codes.
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[$doc])* $name,)*
            /// A code from a newer peer.
            Unknown(u16),
        }

        impl ErrorCode {
            /// The code's number on the wire.
            pub fn as_u16(self) -> u16 {
                match self {
                    $(ErrorCode::$name => $value,)*
                    ErrorCode::Unknown(v) => v,
                }
            }

            /// The code for a number read from the wire.
            pub fn from_u16(value: u16) -> Self {
                match value {
                    $($value => ErrorCode::$name,)*
                    other => ErrorCode::Unknown(other),
                }
            }

            /// A short, fixed description. Carries no data, so it is safe to log.
            pub fn description(self) -> &'static str {
                match self {
                    $(ErrorCode::$name => stringify!($name),)*
                    ErrorCode::Unknown(_) => "Unknown",
                }
            }
        }
    };
}

error_codes! {
    /// The frame's body did not decode.
    MalformedFrame = 1,
    /// The frame's length prefix exceeds its kind's limit.
    FrameTooLarge = 2,
    /// The frame's kind byte is unknown.
    UnknownFrameType = 3,
    /// No protocol version is spoken by both sides.
    UnsupportedVersion = 4,
    /// The first frame must be `Hello`, and only the first.
    HelloRequired = 5,
    /// The request needs an authenticated device.
    NotAuthenticated = 6,
    /// The signature did not verify for this connection's challenge.
    AuthenticationFailed = 7,
    /// The connection is already authenticated.
    AlreadyAuthenticated = 8,
    /// Registration needs an invite token on this relay.
    InviteRequired = 9,
    /// The invite token is unknown or used.
    InvalidInvite = 10,
    /// The account already has the maximum number of devices.
    DeviceLimitReached = 11,
    /// No such account.
    UnknownAccount = 12,
    /// No such device in the account.
    UnknownDevice = 13,
    /// A recipient device does not exist.
    UnknownRecipient = 14,
    /// The envelope is not in this device's mailbox (never was, or already acknowledged).
    UnknownEnvelope = 15,
    /// A field exceeds a protocol limit.
    LimitExceeded = 16,
    /// The relay could not durably commit; nothing was accepted.
    StorageFailure = 17,
    /// The relay is shutting down.
    ShuttingDown = 18,
    /// That device key is already registered.
    DuplicateDeviceKey = 19,
    /// Another connection authenticated as this device.
    ConnectionReplaced = 20,
    /// The relay failed in a way that is not the client's fault.
    Internal = 21,
    /// The request is not permitted for this device.
    NotPermitted = 22,
    /// The connection was idle for too long.
    IdleTimeout = 23,
    /// The recipient does not accept this sealed envelope: an unknown account and a
    /// missing or wrong delivery token look the same, so that nobody can probe accounts.
    DeliveryRefused = 24,
    /// A sealed envelope's device list is not the account's current one; fetch it again.
    DeviceListChanged = 25,
    /// No connection waits at that provisioning address (never did, used, or expired).
    UnknownProvisioningAddress = 26,
    /// The relay is at a capacity limit; try again later.
    Overloaded = 27,
    /// No live call allocation with that id and token for this connection: unknown,
    /// already ended, a wrong token, or not a party. One code, so that allocations cannot
    /// be probed.
    UnknownCall = 28,
    /// The call allocation already has its callee.
    CallAlreadyJoined = 29,
    /// The account has as many live call allocations as it may.
    CallLimitReached = 30,
    /// A rate limit refused the request; nothing of it was done. The relay answers with a
    /// `RateLimited` frame saying when to try again; the connection carries on.
    RateLimited = 31,
    /// A recipient device's mailbox is at its size limit (envelopes or bytes); nothing of
    /// the send was stored. It frees up as that device reads, or as its envelopes expire.
    MailboxFull = 32,
    /// A frame began but did not arrive in full within the relay's frame deadline: a
    /// stalled half-frame would otherwise hold the connection's buffers forever.
    FrameTimeout = 33,
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::Unknown(v) => write!(f, "Unknown({v})"),
            known => f.write_str(known.description()),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} ({})", self, self.as_u16())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u16(self.as_u16())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        u16::deserialize(deserializer).map(ErrorCode::from_u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_numbers() {
        for n in 0..64u16 {
            assert_eq!(ErrorCode::from_u16(n).as_u16(), n);
        }
        assert_eq!(ErrorCode::from_u16(15), ErrorCode::UnknownEnvelope);
        assert_eq!(ErrorCode::from_u16(999), ErrorCode::Unknown(999));
    }
}
