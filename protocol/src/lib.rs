//! The Hush wire protocol: every frame the relay and its clients exchange, how frames are
//! delimited on a QUIC stream, the hard limits each frame type obeys, and the stable error
//! codes on the wire.
//!
//! This crate does no IO. A frame on the wire is
//!
//! ```text
//! +----------------+-----------+---------------------------+
//! | body length    | kind      | body (postcard)           |
//! | u32 big-endian | u8        | `body length` bytes       |
//! +----------------+-----------+---------------------------+
//! ```
//!
//! The kind byte comes before the body so that a reader can check the body length against
//! that kind's limit *before* it allocates anything.
//!
//! ```
//! use hush_protocol::{ClientFrame, FrameDecoder, Hello, encode_frame};
//!
//! let bytes = encode_frame(&ClientFrame::Hello(Hello::current()));
//! let mut decoder = FrameDecoder::<ClientFrame>::new();
//! decoder.extend(&bytes);
//! assert_eq!(decoder.next_frame().unwrap(), Some(ClientFrame::Hello(Hello::current())));
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
mod bytes;
mod codec;
mod error;
mod frames;
mod ids;
pub mod limits;
pub mod media;
pub mod media_udp;
pub mod sealed;

pub use bytes::Signature;
pub use codec::{encode_frame, Frame, FrameDecoder, FrameHeader, HEADER_LEN};
pub use error::{DecodeError, ErrorCode};
pub use frames::{
    Ack, AddDevice, AllocateCall, Authenticate, CallEndCause, CallEnded, CallOutcome, CallToken,
    ClientFrame, Deliver, DeviceBundle, EndCall, Fatal, FetchPrekeys, Hello, HelloOk, JoinCall,
    ListDevices, LowPrekeys, OutgoingEnvelope, Prekey, PrekeyBundles, Provision,
    ProvisioningMessage, RateLimited, Register, RemoveDevice, Request, RequestBody, Response,
    ResponseBody, Retract, SealedSend, Send, ServerFrame, SetDeliveryAccess, UploadPrekeys,
    VersionRange,
};
pub use ids::{AccountId, DeviceAddress, DeviceId, EnvelopeId, RequestId};
pub use sealed::{SealedEnvelope, SenderCertificate};

/// The ALPN protocol id the relay and clients negotiate in the TLS handshake.
pub const ALPN: &[u8] = b"hush/1";

/// The protocol versions this build speaks, oldest first.
pub const SUPPORTED_VERSIONS: VersionRange = VersionRange { min: 1, max: 1 };
