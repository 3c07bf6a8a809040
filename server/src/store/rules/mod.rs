//! The store rules: what a write means, decided above the backend. Every backend runs its
//! batches through [`Rules::apply_batch`], inside its own write transaction, so the checks
//! (invites, the device limit, the primary device, sealed admission, device-list
//! exactness, quotas, which prekeys are consumed) are atomic with the changes they allow,
//! and no backend has a copy of them.
//!
//! A rule first reads what it needs, decides (the pure functions of [`decide`]), and only
//! then changes anything: a [`Refusal`] leaves the transaction as it found it.

mod accounts;
mod calls;
pub(crate) mod decide;
mod envelopes;
mod prekeys;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use hush_protocol::AccountId;

use super::at_rest::{expiry_day, AtRest};
use super::backend::{Backend, Transaction};
use super::records::AccountRecord;
use super::{Outcome, StoreError, Write, WriteResult};
use crate::keyring::{Keyring, Tag};

/// Most expired envelopes (or call records) one write deletes; the sweeper repeats until
/// done, so a huge backlog expiring at once never makes one giant transaction.
pub(crate) const EXPIRE_BATCH: usize = 20_000;

/// Most account records kept in memory; past it the cache starts again empty.
const ACCOUNT_CACHE_ENTRIES: usize = 100_000;

/// The rules with what they keep between batches: the at-rest layer and the account
/// cache.
pub(crate) struct Rules {
    at_rest: AtRest,
    /// Account records as the last committed write transaction left them, for the
    /// commit thread's sends (every send checks its recipients' device lists; reading and
    /// unsealing the records was a fifth of the commit thread's time). Used and changed
    /// only inside write transactions, which are serial, so it never holds a record older
    /// than the store's; emptied when a transaction fails, since it may then hold a
    /// change that was never committed.
    accounts: Mutex<HashMap<AccountId, Arc<AccountRecord>>>,
}

impl Rules {
    pub(crate) fn new(keys: Arc<Keyring>) -> Self {
        Rules {
            at_rest: AtRest::new(keys),
            accounts: Mutex::new(HashMap::new()),
        }
    }

    /// The at-rest layer, for a backend's reads.
    pub(crate) fn at_rest(&self) -> &AtRest {
        &self.at_rest
    }

    /// One batch in one transaction of `backend`; see [`super::Store::apply`].
    pub(crate) fn apply_batch<B: Backend>(
        &self,
        backend: &B,
        writes: Vec<Write>,
    ) -> Result<Vec<WriteResult>, StoreError> {
        // Day keys are made durable before the transaction that seals under them.
        for write in &writes {
            if let Write::Enqueue { expires_at, .. }
            | Write::SealedEnqueue { expires_at, .. }
            | Write::RecordCall {
                delete_at: expires_at,
                ..
            } = write
            {
                self.at_rest.day_key(expiry_day(*expires_at))?;
            }
        }
        let expire_now = writes.iter().find_map(|w| match w {
            Write::Expire { now } => Some(*now),
            _ => None,
        });
        let applied = backend
            .transact(|t| {
                let mut results = Vec::with_capacity(writes.len());
                for write in writes {
                    results.push(self.apply(t, write)?);
                }
                Ok(results)
            })
            .and_then(|results| {
                self.after_commit(&results, expire_now)?;
                Ok(results)
            });
        if applied.is_err() {
            self.accounts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
        applied
    }

    /// Every envelope expiring before today has now been deleted (unless the sweep hit
    /// its batch limit and will come back), so the keys of past days can go.
    fn after_commit(
        &self,
        results: &[WriteResult],
        expire_now: Option<u64>,
    ) -> Result<(), StoreError> {
        if let Some(now) = expire_now {
            let finished = results.iter().any(|r| {
                matches!(r, Ok(Outcome::Expired { envelopes }) if *envelopes < EXPIRE_BATCH as u64)
            });
            if finished {
                self.at_rest.drop_days_before(expiry_day(now))?;
            }
        }
        Ok(())
    }

    fn apply<T: Transaction>(&self, t: &mut T, write: Write) -> Result<WriteResult, StoreError> {
        match write {
            Write::Register {
                account,
                identity_key,
                device_key,
                invite,
                require_invite,
            } => self.register(
                t,
                account,
                identity_key,
                device_key,
                invite.as_deref(),
                require_invite,
            ),
            Write::AddDevice {
                account,
                device_key,
                max_devices,
            } => self.add_device(t, account, device_key, max_devices),
            Write::RemoveDevice { address } => self.remove_device(t, address),
            Write::UploadPrekeys { address, upload } => self.upload_prekeys(t, address, &upload),
            Write::TakePrekeys {
                account,
                device,
                low_threshold,
            } => self.take_prekeys(t, account, device, low_threshold),
            Write::Enqueue {
                envelopes,
                quota,
                received_at,
                expires_at,
            } => self.enqueue(t, envelopes, quota, received_at, expires_at),
            Write::SealedEnqueue {
                envelopes,
                quota,
                received_at,
                expires_at,
            } => self.sealed_enqueue(t, envelopes, quota, received_at, expires_at),
            Write::SetDeliveryAccess {
                account,
                token_hash,
                allow_unknown_senders,
            } => self.set_delivery_access(t, account, token_hash, allow_unknown_senders),
            Write::Retract { tags } => self.retract(t, &tags),
            Write::Ack { address, ids } => self.ack(t, address, &ids),
            Write::Expire { now } => Self::expire(t, now),
            Write::AddInvite { token } => {
                t.put_invite(&decide::token_hash(&token))?;
                Ok(Ok(Outcome::InviteAdded))
            }
            Write::RecordCall { record, delete_at } => {
                self.record_call(t, &record, delete_at)?;
                Ok(Ok(Outcome::CallRecorded))
            }
            Write::ExpireCalls { until } => Self::expire_calls(t, until),
            Write::ForgetCalls { account } => self.forget_calls(t, account),
        }
    }

    /// An account's record, read through the transaction (not the cache).
    fn load_account<T: Transaction>(
        &self,
        t: &T,
        tag: &Tag,
    ) -> Result<Option<AccountRecord>, StoreError> {
        t.account(tag)?
            .map(|sealed| self.at_rest.open_account(tag, &sealed))
            .transpose()
    }

    /// An account's record inside a write transaction, from the cache when it is there.
    fn cached_account<T: Transaction>(
        &self,
        t: &T,
        account: &AccountId,
    ) -> Result<Option<Arc<AccountRecord>>, StoreError> {
        let mut cache = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(record) = cache.get(account) {
            return Ok(Some(record.clone()));
        }
        let Some(record) = self.load_account(t, &self.at_rest.account_tag(account))? else {
            return Ok(None);
        };
        if cache.len() >= ACCOUNT_CACHE_ENTRIES {
            cache.clear();
        }
        let record = Arc::new(record);
        cache.insert(*account, record.clone());
        Ok(Some(record))
    }

    /// Writes an account's record, keeping the cache in step.
    fn put_account<T: Transaction>(
        &self,
        t: &mut T,
        account: &AccountId,
        tag: &Tag,
        record: &AccountRecord,
    ) -> Result<(), StoreError> {
        self.accounts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(account);
        t.put_account(tag, &self.at_rest.seal_account(tag, record)?)
    }
}
