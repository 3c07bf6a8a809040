//! How the call registry reaches a party of a call: its QUIC connection (media datagrams)
//! and its outbox (the `CallEnded` push). Its own module so that the session, which makes
//! these, and the media port, which forwards to them, need not know each other.

use tokio::sync::mpsc;

/// One connection's handle in the call registry ([`crate::calls::Calls`]).
#[derive(Clone)]
pub(crate) struct PartyLink {
    /// The connection's number.
    pub number: u64,
    /// The connection, for media datagrams.
    pub quic: quinn::Connection,
    /// The connection's outbox, for the `CallEnded` push.
    pub outbox: mpsc::Sender<Vec<u8>>,
}
