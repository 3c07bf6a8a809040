//! Token buckets, the relay's one rate-limit mechanism: a single bucket for state that one
//! task owns (a connection's), and a sharded, bounded map of buckets for state shared by
//! key (an account's, a source address's). Pure: the time is passed in, in milliseconds.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Mutex, PoisonError};

use serde::Deserialize;

/// A limit's shape: at most `burst` at once, refilled continuously at `refill` per
/// `period_secs` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Most tokens a bucket holds: what may be spent at once after a quiet spell.
    pub burst: u32,
    /// Tokens added per period.
    pub refill: u32,
    /// The period, in seconds.
    pub period_secs: u32,
}

impl Rate {
    /// `refill` per second, with room for `burst` at once.
    pub const fn per_second(burst: u32, refill: u32) -> Self {
        Rate {
            burst,
            refill,
            period_secs: 1,
        }
    }

    /// `refill` per hour, with room for `burst` at once.
    pub const fn per_hour(burst: u32, refill: u32) -> Self {
        Rate {
            burst,
            refill,
            period_secs: 3600,
        }
    }

    /// Whether the rate can ever admit anything.
    pub fn is_valid(self) -> bool {
        self.burst >= 1 && self.refill >= 1 && self.period_secs >= 1
    }

    /// The period in milliseconds: a token is `period_ms` units, and every millisecond
    /// adds `refill` units, so that all arithmetic is exact integers.
    fn period_ms(self) -> u128 {
        u128::from(self.period_secs) * 1000
    }

    fn units(self, tokens: u32) -> u128 {
        u128::from(tokens) * self.period_ms()
    }
}

/// One bucket. A request costing more than the burst is charged the burst, so that the
/// largest legal request still passes when the bucket is full.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    /// Tokens held, in units of 1/`period_ms` token.
    units: u128,
    updated_ms: u64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(rate: Rate, now_ms: u64) -> Self {
        TokenBucket {
            units: rate.units(rate.burst),
            updated_ms: now_ms,
        }
    }

    /// What the bucket holds at `now_ms`, without changing it.
    fn level(&self, rate: Rate, now_ms: u64) -> u128 {
        // A clock that steps back refills nothing rather than panicking or draining.
        let elapsed = u128::from(now_ms.saturating_sub(self.updated_ms));
        self.units
            .saturating_add(elapsed.saturating_mul(u128::from(rate.refill)))
            .min(rate.units(rate.burst))
    }

    /// Takes `cost` tokens, or says in how many milliseconds there will be enough.
    pub fn take(&mut self, rate: Rate, cost: u32, now_ms: u64) -> Result<(), u32> {
        self.units = self.level(rate, now_ms);
        self.updated_ms = self.updated_ms.max(now_ms);
        let cost = rate.units(cost.min(rate.burst));
        if self.units >= cost {
            self.units -= cost;
            return Ok(());
        }
        let wait = (cost - self.units).div_ceil(u128::from(rate.refill).max(1));
        Err(u32::try_from(wait).unwrap_or(u32::MAX))
    }

    /// Gives back tokens taken for a request that another limit then refused.
    pub fn refund(&mut self, rate: Rate, cost: u32) {
        self.units = self
            .units
            .saturating_add(rate.units(cost.min(rate.burst)))
            .min(rate.units(rate.burst));
    }

    /// Whether the bucket would be full by now: its key has been idle, and forgetting it
    /// changes nothing.
    fn is_idle(&self, rate: Rate, now_ms: u64) -> bool {
        self.level(rate, now_ms) >= rate.units(rate.burst)
    }
}

/// Shards of the keyed map: enough that concurrent connections rarely meet on one lock.
const SHARDS: usize = 32;

/// Buckets by key (an account, an address), sharded so that the send path takes one short
/// lock of 32, and bounded: at most `capacity` keys are tracked. A full shard first forgets
/// idle keys (whose buckets are full anyway), then, if all are busy, an eighth of its keys,
/// so the map can never be what exhausts the relay's memory. A forgotten busy key starts
/// again with a full bucket: under a flood of distinct keys the limit loosens rather than
/// the memory growing.
pub struct KeyedBuckets<K> {
    rate: Rate,
    per_shard: usize,
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<K, TokenBucket>>>,
}

impl<K: Hash + Eq + Clone> KeyedBuckets<K> {
    /// Buckets of `rate` for at most `capacity` keys (at least one per shard).
    pub fn new(rate: Rate, capacity: usize) -> Self {
        KeyedBuckets {
            rate,
            per_shard: capacity.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// The limit's shape.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    fn shard(&self, key: &K) -> &Mutex<HashMap<K, TokenBucket>> {
        let index = (self.hasher.hash_one(key) as usize) % SHARDS;
        &self.shards[index]
    }

    /// Takes `cost` tokens from `key`'s bucket, or says in how many milliseconds there
    /// will be enough.
    pub fn take(&self, key: &K, cost: u32, now_ms: u64) -> Result<(), u32> {
        // A poisoned shard is still a consistent map of buckets.
        let mut shard = self
            .shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(bucket) = shard.get_mut(key) {
            return bucket.take(self.rate, cost, now_ms);
        }
        if shard.len() >= self.per_shard {
            let rate = self.rate;
            shard.retain(|_, bucket| !bucket.is_idle(rate, now_ms));
            if shard.len() >= self.per_shard {
                let doomed: Vec<K> = shard
                    .keys()
                    .take((self.per_shard / 8).max(1))
                    .cloned()
                    .collect();
                for key in doomed {
                    shard.remove(&key);
                }
            }
        }
        let mut bucket = TokenBucket::full(self.rate, now_ms);
        let taken = bucket.take(self.rate, cost, now_ms);
        shard.insert(key.clone(), bucket);
        taken
    }

    /// Gives back tokens taken for a request that another limit then refused.
    pub fn refund(&self, key: &K, cost: u32) {
        let mut shard = self
            .shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(bucket) = shard.get_mut(key) {
            bucket.refund(self.rate, cost);
        }
    }

    /// Keys tracked now.
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_spends_its_burst_then_refills_at_its_rate() {
        let rate = Rate::per_second(10, 5);
        let mut bucket = TokenBucket::full(rate, 0);
        assert_eq!(bucket.take(rate, 10, 0), Ok(()));
        // One token comes every 200 ms.
        assert_eq!(bucket.take(rate, 1, 0), Err(200));
        assert_eq!(bucket.take(rate, 1, 199), Err(1));
        assert_eq!(bucket.take(rate, 1, 200), Ok(()));
        // Never more than the burst, however long the quiet.
        assert_eq!(bucket.take(rate, 10, 1_000_000), Ok(()));
        assert!(bucket.take(rate, 1, 1_000_000).is_err());
    }

    #[test]
    fn a_request_larger_than_the_burst_needs_a_full_bucket() {
        let rate = Rate::per_second(4, 4);
        let mut bucket = TokenBucket::full(rate, 0);
        assert_eq!(bucket.take(rate, 100, 0), Ok(()));
        assert_eq!(bucket.take(rate, 100, 0), Err(1000));
    }

    #[test]
    fn a_clock_stepping_back_refills_nothing() {
        let rate = Rate::per_second(2, 1);
        let mut bucket = TokenBucket::full(rate, 10_000);
        assert_eq!(bucket.take(rate, 2, 10_000), Ok(()));
        assert!(bucket.take(rate, 1, 5_000).is_err());
        assert_eq!(bucket.take(rate, 1, 11_000), Ok(()));
    }

    #[test]
    fn refunds_never_exceed_the_burst() {
        let rate = Rate::per_hour(3, 3);
        let mut bucket = TokenBucket::full(rate, 0);
        bucket.refund(rate, 100);
        assert_eq!(bucket.take(rate, 3, 0), Ok(()));
        assert!(bucket.take(rate, 1, 0).is_err());
        bucket.refund(rate, 1);
        assert_eq!(bucket.take(rate, 1, 0), Ok(()));
    }

    #[test]
    fn keys_have_their_own_buckets() {
        let buckets = KeyedBuckets::new(Rate::per_second(1, 1), 100);
        assert_eq!(buckets.take(&1u32, 1, 0), Ok(()));
        assert!(buckets.take(&1u32, 1, 0).is_err());
        assert_eq!(buckets.take(&2u32, 1, 0), Ok(()));
        assert_eq!(buckets.take(&1u32, 1, 1000), Ok(()));
    }

    #[test]
    fn the_map_stays_bounded_under_a_flood_of_keys() {
        let capacity = 1000;
        let buckets = KeyedBuckets::new(Rate::per_hour(5, 5), capacity);
        for key in 0..100_000u32 {
            let _ = buckets.take(&key, 5, 0);
        }
        let bound = capacity.div_ceil(SHARDS) * SHARDS;
        assert!(buckets.tracked() <= bound, "{} keys", buckets.tracked());
        // Idle keys are the first to go: after a refill period every bucket is idle.
        for key in 0..100_000u32 {
            let _ = buckets.take(&key, 1, 3_600_000 + u64::from(key));
        }
        assert!(buckets.tracked() <= bound);
    }
}
