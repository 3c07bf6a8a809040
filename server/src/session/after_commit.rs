//! What a commit causes besides its answers, on the commit thread once it is durable.

use hush_protocol::{encode_frame, LowPrekeys, ServerFrame};

use crate::mailbox::Hub;
use crate::metrics::Metrics;
use crate::store::{Outcome, PrekeyCounts, Refusal, WriteResult};

/// What a commit's writes cause besides their answers: recipients woken, devices told of
/// low prekeys, a removed device's connection evicted, counters. Runs on the commit thread
/// as soon as the commit is durable, so none of it waits for, or is lost with, the
/// connection that submitted the write.
pub(crate) fn after_commit(hub: &Hub, metrics: &Metrics, results: &mut [WriteResult]) {
    let mut fresh = Vec::new();
    for result in results.iter_mut() {
        match result {
            Ok(Outcome::Enqueued {
                recipients,
                fresh: envelopes,
            }) => {
                Metrics::add(&metrics.envelopes_accepted, recipients.len() as u64);
                // The sender's answer needs none of them.
                fresh.append(envelopes);
            }
            Ok(Outcome::Prekeys { low, .. }) => {
                for (address, counts) in low {
                    hub.push(address, low_prekeys_frame(*counts));
                }
            }
            Ok(Outcome::DeviceRemoved { address }) => hub.evict(address),
            Ok(Outcome::Retracted { count }) => {
                Metrics::add(&metrics.envelopes_retracted, u64::from(*count));
                if *count > 0 {
                    // Before this batch's envelopes are handed over: one of them may be
                    // what was retracted.
                    hub.invalidate();
                }
            }
            Err(Refusal::MailboxFull) => Metrics::inc(&metrics.mailbox_full_refusals),
            _ => {}
        }
    }
    // One pass over the registry for the whole batch.
    hub.deliver_fresh(fresh);
}

/// The push that tells a device it is low on prekeys.
pub(super) fn low_prekeys_frame(counts: PrekeyCounts) -> Vec<u8> {
    encode_frame(&ServerFrame::LowPrekeys(LowPrekeys {
        one_time: counts.one_time,
        kem_one_time: counts.kem_one_time,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use hush_protocol::{DeviceAddress, EnvelopeId};
    use tokio::sync::mpsc;

    use super::*;

    /// A batch that queues an envelope and retracts (perhaps that same envelope) must not
    /// leave it in a handoff: the store no longer has it.
    #[test]
    fn a_batch_with_a_retraction_sends_the_recipients_loops_to_the_store() {
        let hub = Hub::default();
        let metrics = Metrics::default();
        let bob = DeviceAddress {
            account: hush_protocol::AccountId([7; 16]),
            device: hush_protocol::DeviceId(1),
        };
        let (outbox, _frames) = mpsc::channel(1);
        let link = hub.attach(bob, hub.connection_number(), outbox);
        link.handoff.clear();
        let queued = |id| crate::store::FreshEnvelope {
            recipient: bob,
            id: EnvelopeId(id),
            received_at: 0,
            expires_at: u64::MAX,
            payload: bytes::Bytes::from_static(b"x"),
        };

        let mut results: Vec<WriteResult> = vec![Ok(Outcome::Enqueued {
            recipients: vec![bob],
            fresh: vec![queued(1)],
        })];
        after_commit(&hub, &metrics, &mut results);
        assert_eq!(link.handoff.take(None).map(|e| e.len()), Some(1));
        assert!(
            matches!(&results[0], Ok(Outcome::Enqueued { fresh, .. }) if fresh.is_empty()),
            "the sender's answer does not carry the payloads"
        );

        let mut results: Vec<WriteResult> = vec![
            Ok(Outcome::Enqueued {
                recipients: vec![bob],
                fresh: vec![queued(2)],
            }),
            Ok(Outcome::Retracted { count: 1 }),
        ];
        after_commit(&hub, &metrics, &mut results);
        assert!(link.handoff.take(Some(EnvelopeId(1))).is_none());
    }
}
