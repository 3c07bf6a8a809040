//! What a messaging run counts: exact sends, deliveries, duplicates and send→deliver
//! latencies, overall and second by second.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in microseconds, up to a minute.
const MAX_LATENCY_US: u64 = 60_000_000;

/// Counts shared by every sending and receiving task of a run.
pub struct Tally {
    /// Sends the relay acknowledged (durably committed).
    pub sent: AtomicU64,
    /// Sends that failed (refused, or the connection broke).
    pub failed: AtomicU64,
    /// Distinct messages delivered.
    pub delivered: AtomicU64,
    /// Deliveries of a message already delivered.
    pub duplicated: AtomicU64,
    inner: Mutex<Inner>,
}

struct Inner {
    seen: Seen,
    overall: Histogram<u64>,
    interval: Histogram<u64>,
}

/// Which messages have been delivered: a bitmap of sequence numbers per sender.
///
/// Sequences are dense from 0, so a bitmap takes a bit a message, and growing it copies a
/// word per 64 messages. A hash set of the keys took 16 bytes a message, and each time it
/// doubled it rehashed every key while every receiver waited on the tally's lock: at a
/// few hundred thousand messages that stalled all deliveries for milliseconds, and the
/// stall showed up as the relay's latency.
#[derive(Default)]
struct Seen {
    senders: HashMap<u32, Vec<u64>>,
    /// Keys whose sequence is past any run's (a damaged stamp), so that no payload can
    /// make the bitmap huge.
    beyond: HashSet<u64>,
}

/// Sequences a sender's bitmap covers (2 MiB of bits); far more than any run sends.
const DENSE_SEQUENCES: usize = 1 << 24;

impl Seen {
    /// Records `key` ([`message_key`]); `false` if it was there already.
    fn insert(&mut self, key: u64) -> bool {
        let sender = (key >> 32) as u32;
        let sequence = key as u32 as usize;
        if sequence >= DENSE_SEQUENCES {
            return self.beyond.insert(key);
        }
        let bits = self.senders.entry(sender).or_default();
        let (word, bit) = (sequence / 64, 1u64 << (sequence % 64));
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        let fresh = bits[word] & bit == 0;
        bits[word] |= bit;
        fresh
    }
}

/// One second of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// Seconds since the measured window started.
    pub at_s: f64,
    pub delivered_per_s: f64,
    pub latency_ms: Percentiles,
    /// Resident memory of the relay, when the bench started it.
    pub relay_rss_bytes: Option<u64>,
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            p50: ms(histogram.value_at_quantile(0.5)),
            p90: ms(histogram.value_at_quantile(0.9)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p99_9: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
        }
    }
}

impl Tally {
    pub fn new() -> anyhow::Result<Self> {
        let histogram = || Histogram::new_with_bounds(1, MAX_LATENCY_US, 3);
        Ok(Tally {
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                seen: Seen::default(),
                overall: histogram()?,
                interval: histogram()?,
            }),
        })
    }

    pub fn sent(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }

    pub fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// A delivery of message `key` (unique per sender and sequence) that took `latency`.
    /// Only the first delivery of a key counts; later ones are duplicates.
    pub fn delivered(&self, key: u64, latency: Duration) {
        let micros = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, MAX_LATENCY_US);
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if inner.seen.insert(key) {
            let _ = inner.overall.record(micros);
            let _ = inner.interval.record(micros);
            self.delivered.fetch_add(1, Ordering::Relaxed);
        } else {
            self.duplicated.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The latencies since the previous call, and resets them.
    pub fn take_interval(&self) -> Percentiles {
        let Ok(mut inner) = self.inner.lock() else {
            return Percentiles::default();
        };
        let percentiles = Percentiles::of(&inner.interval);
        inner.interval.reset();
        percentiles
    }

    /// The latencies of the whole run.
    pub fn overall(&self) -> Percentiles {
        self.inner
            .lock()
            .map(|inner| Percentiles::of(&inner.overall))
            .unwrap_or_default()
    }

    pub fn count(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Waits until every acknowledged send has been delivered, or `limit` has passed.
    pub async fn wait_for_delivery(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Self::count(&self.delivered) < Self::count(&self.sent) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The counts and latencies of a finished run.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Counts {
    /// Sends the system acknowledged.
    pub sent: u64,
    pub failed: u64,
    /// Distinct messages delivered.
    pub delivered: u64,
    /// Acknowledged but never delivered.
    pub lost: u64,
    pub duplicated: u64,
    /// Deliveries per second within the measured window.
    pub delivered_per_s: f64,
    pub latency_ms: Percentiles,
}

impl Tally {
    /// The run's counts, `delivered_in_window` of the deliveries falling within the
    /// measured `seconds`.
    pub fn counts(&self, seconds: f64, delivered_in_window: u64) -> Counts {
        let sent = Self::count(&self.sent);
        let delivered = Self::count(&self.delivered);
        Counts {
            sent,
            failed: Self::count(&self.failed),
            delivered,
            lost: sent.saturating_sub(delivered),
            duplicated: Self::count(&self.duplicated),
            delivered_per_s: delivered_in_window as f64 / seconds,
            latency_ms: self.overall(),
        }
    }
}

/// A message key: sender index and sequence number.
pub fn message_key(sender: u32, sequence: u32) -> u64 {
    (u64::from(sender) << 32) | u64::from(sequence)
}

/// A raw message: sender, sequence and due time (nanoseconds since the run's epoch) in
/// its first 16 bytes, padded to `size` with `fill`.
pub fn stamped(sender: u32, sequence: u32, due_nanos: u64, size: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(size.max(16));
    bytes.extend_from_slice(&sender.to_be_bytes());
    bytes.extend_from_slice(&sequence.to_be_bytes());
    bytes.extend_from_slice(&due_nanos.to_be_bytes());
    bytes.resize(size, b'~');
    bytes
}

/// The message key and due time of a [`stamped`] message.
pub fn read_stamp(payload: &[u8]) -> Option<(u64, u64)> {
    let sender = u32::from_be_bytes(payload.get(..4)?.try_into().ok()?);
    let sequence = u32::from_be_bytes(payload.get(4..8)?.try_into().ok()?);
    let due = u64::from_be_bytes(payload.get(8..16)?.try_into().ok()?);
    Some((message_key(sender, sequence), due))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_seen_once_per_sender_and_sequence() {
        let mut seen = Seen::default();
        assert!(seen.insert(message_key(0, 0)));
        assert!(!seen.insert(message_key(0, 0)));
        assert!(seen.insert(message_key(1, 0)));
        assert!(seen.insert(message_key(0, 1_000_000)));
        assert!(!seen.insert(message_key(0, 1_000_000)));
        assert!(seen.insert(message_key(0, 63)));
        assert!(seen.insert(message_key(0, 64)));
        assert!(seen.insert(message_key(u32::MAX, u32::MAX)));
        assert!(!seen.insert(message_key(u32::MAX, u32::MAX)));
    }
}
