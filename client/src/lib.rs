//! The Hush client library: the part of Hush that apps link. It holds every key; the relay
//! sees only ciphertext.
//!
//! An app holds one [`Client`] per device. It registers or opens the account kept in an
//! encrypted local store, sets up end-to-end sessions (PQXDH, then the Double Ratchet),
//! sends sealed (the relay does not learn the sender) to every device of a contact and a
//! copy to the account's other devices, and turns what arrives into [`ClientEvent`]s:
//! messages, receipts, typing, deletions, identity changes, calls. The transport under it,
//! [`Connection`], is public for tools and tests.
//!
//! ```no_run
//! # async fn demo(relay: std::net::SocketAddr, fingerprint: [u8; 32], card: &str)
//! #     -> Result<(), hush_client::ClientError> {
//! use hush_client::{Client, ClientConfig, ClientEvent, ConnectOptions, StorageKey, Trust};
//!
//! let config = ClientConfig::new(
//!     ConnectOptions::new(relay, Trust::Pinned(fingerprint)),
//!     "alice".into(),
//!     // From the platform keystore in an app.
//!     StorageKey::from_bytes([7; 32]),
//! );
//! let alice = Client::create(config, None).await?;
//! println!("my contact card: {}", alice.contact_card().await);
//! let bob = alice.add_contact(card).await?;
//! alice.send_text(bob, "hello bob").await?;
//! while let Some(event) = alice.next_event().await {
//!     if let ClientEvent::Message { message, .. } = event {
//!         println!("{:?}", message.body);
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Sends, receives and calls go on concurrently: the client's state is never locked
//! across a round trip to the relay or the disk, and what they change is written in
//! shared commits to the local store.
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
