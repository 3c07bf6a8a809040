//! What the session's decision tests share: the relay's rules without a store or a
//! socket, a fake clock, keys and transcripts.

use ed25519_dalek::{Signer, SigningKey};
use hush_protocol::auth::{auth_transcript, register_transcript, EXPORTER_LEN};
use hush_protocol::{AccountId, DeviceAddress, DeviceId, Register, Signature};

use super::context::Rules;
use crate::clock::ManualClock;
use crate::config::{Config, Limits};
use crate::metrics::Metrics;
use crate::quota::Quotas;

/// The exporter and challenge of the connection under test.
pub(super) const EXPORTER: [u8; EXPORTER_LEN] = [3; EXPORTER_LEN];
pub(super) const CHALLENGE: [u8; 32] = [5; 32];

/// The relay's rules, shared limits, counters and a clock that moves when told.
pub(super) struct Fixture {
    pub config: Config,
    pub quotas: Quotas,
    pub metrics: Metrics,
    pub clock: ManualClock,
}

impl Fixture {
    /// The default configuration, with `limits` changed as the test needs.
    pub(super) fn with_limits(change: impl FnOnce(&mut Limits)) -> Self {
        let mut config = Config::default();
        change(&mut config.limits);
        Fixture {
            quotas: Quotas::new(&config.limits),
            config,
            metrics: Metrics::default(),
            clock: ManualClock::new(1_000_000),
        }
    }

    pub(super) fn new() -> Self {
        Fixture::with_limits(|_| {})
    }

    pub(super) fn rules(&self) -> Rules<'_> {
        Rules {
            config: &self.config,
            quotas: &self.quotas,
            metrics: &self.metrics,
            clock: &self.clock,
        }
    }
}

pub(super) fn device_key() -> SigningKey {
    SigningKey::from_bytes(&[9; 32])
}

pub(super) fn alice() -> DeviceAddress {
    DeviceAddress {
        account: AccountId([1; 16]),
        device: DeviceId(2),
    }
}

/// An `Authenticate` signature by `key` over the transcript of `exporter` and `challenge`.
pub(super) fn auth_signature(
    key: &SigningKey,
    exporter: &[u8; EXPORTER_LEN],
    challenge: &[u8; 32],
    address: &DeviceAddress,
) -> [u8; 64] {
    key.sign(&auth_transcript(exporter, challenge, address))
        .to_bytes()
}

/// A registration signed over the transcript of `exporter` and `challenge`.
pub(super) fn register(exporter: &[u8; EXPORTER_LEN], challenge: &[u8; 32]) -> Register {
    let key = device_key();
    let device_key = key.verifying_key().to_bytes();
    let identity_key = vec![7; 32];
    let signature = key
        .sign(&register_transcript(
            exporter,
            challenge,
            &identity_key,
            &device_key,
        ))
        .to_bytes();
    Register {
        identity_key,
        device_key,
        invite: None,
        signature: Signature(signature),
    }
}
