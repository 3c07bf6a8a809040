//! Charging a request to the rate limits: the connection's own envelope budget, and the
//! limits shared across connections per account and per source address ([`Quotas`]). A
//! refusal is the number of milliseconds until the request would pass; nothing stays
//! charged by a refused request.
//!
//! [`Quotas`]: crate::quota::Quotas

use std::net::IpAddr;
use std::sync::atomic::AtomicU64;

use hush_protocol::AccountId;

use super::context::Rules;
use crate::metrics::Metrics;
use crate::quota::{address_key, Requester};
use crate::rate::TokenBucket;

/// What one connection may still spend, and the key its source address has in the
/// shared limits.
pub(super) struct Budget {
    /// The source address as rate limits key it; never logged.
    peer: IpAddr,
    /// Envelope copies this connection may still submit (`limits.connection_envelopes`).
    envelopes: TokenBucket,
}

impl Budget {
    /// A full budget for a connection from `remote`.
    pub(super) fn new(remote: IpAddr, rules: &Rules<'_>) -> Self {
        Budget {
            peer: address_key(remote),
            envelopes: TokenBucket::full(
                rules.config.limits.connection_envelopes,
                rules.clock.now_millis(),
            ),
        }
    }

    /// The connection's source address, as the shared limits key it.
    pub(super) fn peer(&self) -> IpAddr {
        self.peer
    }

    /// Charges `copies` envelope copies to this connection, and to the sending account
    /// (or, on an anonymous connection, to its source address).
    pub(super) fn envelopes(
        &mut self,
        rules: &Rules<'_>,
        account: Option<AccountId>,
        copies: usize,
    ) -> Result<(), u32> {
        let copies = u32::try_from(copies).unwrap_or(u32::MAX);
        let limits = &rules.config.limits;
        let metrics = rules.metrics;
        let now = rules.clock.now_millis();
        if let Err(wait) = self
            .envelopes
            .take(limits.connection_envelopes, copies, now)
        {
            Metrics::inc(&metrics.rate_limited_connection_envelopes);
            return Err(wait);
        }
        let shared: Result<(), (u32, &AtomicU64)> = match account {
            Some(account) => rules
                .quotas
                .account_envelopes
                .take(&account, copies, now)
                .map_err(|wait| (wait, &metrics.rate_limited_account_envelopes)),
            None => rules
                .quotas
                .address_sealed_sends
                .take(&self.peer, copies, now)
                .map_err(|wait| (wait, &metrics.rate_limited_address_sealed_sends)),
        };
        shared.map_err(|(wait, refused)| {
            self.envelopes.refund(limits.connection_envelopes, copies);
            Metrics::inc(refused);
            wait
        })
    }

    /// Charges one registration attempt to this connection's source address.
    pub(super) fn registration(&self, rules: &Rules<'_>) -> Result<(), u32> {
        let now = rules.clock.now_millis();
        rules
            .quotas
            .registrations
            .take(&self.peer, 1, now)
            .inspect_err(|_| Metrics::inc(&rules.metrics.rate_limited_registrations))
    }
}

/// Charges one prekey fetch to `requester`.
pub(super) fn prekey_fetch(rules: &Rules<'_>, requester: Requester) -> Result<(), u32> {
    let now = rules.clock.now_millis();
    rules
        .quotas
        .prekey_fetches
        .take(&requester, 1, now)
        .inspect_err(|_| Metrics::inc(&rules.metrics.rate_limited_prekey_fetches))
}
