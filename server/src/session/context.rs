//! What every session shares, and the part of it that a request's decision reads.

use std::sync::Arc;

use crate::calls::Calls;
use crate::clock::Clock;
use crate::commit::Committer;
use crate::config::Config;
use crate::mailbox::Hub;
use crate::media::MediaPlane;
use crate::metrics::Metrics;
use crate::party::PartyLink;
use crate::provisioning::Provisioning;
use crate::quota::Quotas;
use crate::sender_key::SenderKey;
use crate::store::Store;

/// What every session shares: built once by the relay, handed to each connection.
pub(crate) struct SessionContext {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub committer: Committer,
    pub hub: Arc<Hub>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub sender_key: SenderKey,
    pub provisioning: Provisioning,
    pub calls: Arc<Calls<PartyLink>>,
    pub media: Arc<MediaPlane>,
    pub quotas: Quotas,
}

/// What a request's decision reads besides the connection's own state: the relay's rules,
/// the limits shared across connections, the counters and the clock. Borrowed, per
/// request; a test builds one without a store, a committer or a socket. The clock is
/// passed rather than a time read up front, so that a request that needs no time (an
/// `Ack`) reads none.
#[derive(Clone, Copy)]
pub(super) struct Rules<'a> {
    pub config: &'a Config,
    pub quotas: &'a Quotas,
    pub metrics: &'a Metrics,
    pub clock: &'a dyn Clock,
}

impl SessionContext {
    /// The rules decisions read.
    pub(super) fn rules(&self) -> Rules<'_> {
        Rules {
            config: &self.config,
            quotas: &self.quotas,
            metrics: &self.metrics,
            clock: self.clock.as_ref(),
        }
    }
}
