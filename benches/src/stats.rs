//! What a messaging run counts: exact sends, deliveries, duplicates and send→deliver
//! latencies, overall and second by second.

use std::collections::HashSet;
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
    seen: HashSet<u64>,
    overall: Histogram<u64>,
    interval: Histogram<u64>,
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
                seen: HashSet::new(),
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
