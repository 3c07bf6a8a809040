//! The Hush relay: a QUIC server that stores ciphertext envelopes durably until every
//! recipient device has acknowledged them, deletes them then, and deletes anything
//! undelivered after at most 14 days.
//!
//! The data path reads top-down: [`transport`] (the quinn endpoint) → `session` (one
//! connected device) → `mailbox` (live delivery) and `commit` (group commit) → [`store`]
//! (the [`store::Store`] trait and its redb implementation).
//!
//! ```no_run
//! # async fn run() -> Result<(), hush_server::StartError> {
//! use std::sync::Arc;
//! use hush_server::{clock::SystemClock, config::Config, Relay};
//!
//! let relay = Relay::start(Config::default(), Arc::new(SystemClock)).await?;
//! println!("listening on {}", relay.local_addr());
//! relay.shutdown().await;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

pub mod admin;
pub mod calls;
pub mod cdr;
pub mod clock;
pub mod commit;
pub mod config;
pub mod keyring;
mod mailbox;
pub mod media;
pub mod metrics;
mod party;
pub mod provisioning;
pub mod quota;
pub mod rate;
pub mod redact;
mod relay;
pub mod seal;
pub mod sender_key;
mod session;
pub mod signals;
pub mod store;
pub mod tls;
pub mod transport;

pub use relay::{Relay, StartError};
