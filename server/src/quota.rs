//! Who is limited by what: the keyed rate limits shared across connections (per account,
//! per source address), and the count of connections per source address. A connection's
//! own envelope budget lives in its session, where no lock is needed.
//!
//! Keys stay in memory only, are never logged, and are forgotten when idle (see
//! [`KeyedBuckets`]); refusals are counted in aggregate metrics without them (P9).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};

use hush_protocol::AccountId;

use crate::config::Limits;
use crate::rate::KeyedBuckets;

/// The part of a source address that identifies a client: an IPv4 address, or an IPv6
/// /64 (one host is routinely handed a whole /64, so finer keys would be free to rotate).
pub fn address_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let [a, b, c, d, ..] = v6.segments();
            IpAddr::V6(Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0))
        }
    }
}

/// Who fetches prekeys: an authenticated account, or an anonymous caller's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Requester {
    /// An authenticated device's account.
    Account(AccountId),
    /// An anonymous connection's source address (its [`address_key`]).
    Address(IpAddr),
}

/// The rate limits shared across connections.
pub struct Quotas {
    /// Envelope copies per sending account (authenticated sends).
    pub account_envelopes: KeyedBuckets<AccountId>,
    /// Envelope copies of anonymous sealed sends per source address.
    pub address_sealed_sends: KeyedBuckets<IpAddr>,
    /// Prekey fetches per requesting account or anonymous address.
    pub prekey_fetches: KeyedBuckets<Requester>,
    /// Registration attempts per source address.
    pub registrations: KeyedBuckets<IpAddr>,
    /// Live connections per source address.
    pub connections: AddressSlots,
}

impl Quotas {
    /// The limits of `limits`.
    pub fn new(limits: &Limits) -> Self {
        let keys = limits.rate_limit_keys;
        Quotas {
            account_envelopes: KeyedBuckets::new(limits.account_envelopes, keys),
            address_sealed_sends: KeyedBuckets::new(limits.address_sealed_sends, keys),
            prekey_fetches: KeyedBuckets::new(limits.prekey_fetches, keys),
            registrations: KeyedBuckets::new(limits.registrations, keys),
            connections: AddressSlots::new(limits.connections_per_address),
        }
    }
}

/// Live connections per source address, at most `max` each. Only addresses with a live
/// connection are tracked, so the map is bounded by the connection limit.
pub struct AddressSlots {
    max: u32,
    live: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl AddressSlots {
    /// At most `max` connections per address.
    pub fn new(max: u32) -> Self {
        AddressSlots {
            max,
            live: Arc::default(),
        }
    }

    /// A slot for one more connection from `address`, held until the connection ends;
    /// `None` if the address has `max` already.
    pub fn acquire(&self, address: IpAddr) -> Option<AddressSlot> {
        let key = address_key(address);
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let count = live.entry(key).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            key,
            live: self.live.clone(),
        })
    }

    /// Addresses with a live connection.
    pub fn tracked(&self) -> usize {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// One connection's place in [`AddressSlots`]; given back when dropped.
pub struct AddressSlot {
    key: IpAddr,
    live: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = live.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                live.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_count_per_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(address_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn address_slots_are_counted_and_given_back() {
        let slots = AddressSlots::new(2);
        let here: IpAddr = "192.0.2.1".parse().unwrap();
        let there: IpAddr = "192.0.2.2".parse().unwrap();
        let first = slots.acquire(here).unwrap();
        let second = slots.acquire(here).unwrap();
        assert!(slots.acquire(here).is_none());
        let _elsewhere = slots.acquire(there).unwrap();
        drop(first);
        let third = slots.acquire(here).unwrap();
        drop(second);
        drop(third);
        // Addresses without live connections are forgotten.
        assert_eq!(slots.tracked(), 1);
    }
}
