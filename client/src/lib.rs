//! The Hush client library: the part of Hush that apps link. It holds every key; the relay
//! sees only ciphertext.
//!
//! This release carries the transport: a [`Connection`] to a relay that registers or
//! authenticates a device, manages prekeys, sends opaque envelopes and receives pushed
//! ones. The end-to-end layer (sessions, sealed sender) builds on it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), hush_client::ConnectionError> {
//! use hush_client::{ConnectOptions, Connection, DeviceKey, Event, Trust};
//!
//! let options = ConnectOptions::new("127.0.0.1:4433".parse().unwrap(), Trust::Pinned([0u8; 32]));
//! let key = DeviceKey::generate();
//! let alice = Connection::connect(&options).await?;
//! let address = alice.register(b"identity", &key, None).await?;
//! alice.send_to(&[address], b"ciphertext".to_vec()).await?;
//! while let Some(event) = alice.next_event().await {
//!     if let Event::Envelope(envelope) = event {
//!         alice.ack(&[envelope.id]).await?;
//!     }
//! }
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod connection;
mod content;
mod error;
mod kdf;
mod keys;
mod link;
pub mod media;
pub mod message;
pub mod padding;
mod pickle;
mod pqxdh;
mod prekeys;
pub mod ratchet;
mod safety;
pub mod sealed;
mod session;
mod store;
#[cfg(feature = "test-support")]
#[doc(hidden)]
pub mod test_support;
mod tls;
mod udp_media;
mod util;
#[cfg(test)]
mod vectors;

pub use client::{
    CallEndReason, CallMedia, Client, ClientConfig, ClientError, ClientEvent, LinkRequest,
    Settings, StoredMessage,
};
pub use connection::{
    close_code, ConnectOptions, Connection, Connector, Envelope, Event, RawStream, Trust,
};
pub use content::{Body, CallId, CallSignal, MessageId, ReceiptKind};
pub use error::{ConnectionError, CryptoError, PickleError};
pub use hush_protocol as protocol;
pub use keys::{DeviceKey, IdentityKey, IdentityKeyPair, KemPrekey, OneTimePrekey, SignedPrekey};
pub use pqxdh::PeerBundle;
pub use prekeys::{PrekeySet, UsedPrekeys};
pub use safety::SafetyNumber;
pub use session::Session;
pub use store::{salt_for, PassphraseCost, StorageKey, StoreError};
pub use util::{Clock, ManualClock, SystemClock};
