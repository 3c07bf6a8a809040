//! The encrypted local store: everything the client must keep, in one redb file (in
//! memory for tests).
//!
//! Every value is sealed with XChaCha20-Poly1305 under a key derived from the app's
//! 32-byte storage key (from the platform keystore) or from a passphrase with Argon2id;
//! the table name and row key are the associated data, so a value cannot be moved to
//! another row. Row keys are HMAC-SHA256 tags of what they name (a contact's account, a
//! session's device address), so the file shows no identifiers either. Changes are applied
//! in one write transaction: a session update and the message it decrypted land together
//! or not at all.
//!
//! That policy lives here, over a [`Backend`] that only keeps opaque rows: the redb file
//! ([`redb`]) for the app, or memory ([`memory`]) for tests. What a backend holds is
//! already sealed and tagged, so it never sees a plaintext or an identifier.
//!
//! Values are `version byte || postcard body`: secret state through [`crate::pickle`],
//! plain records through [`encode_record`] and [`decode_record`]. [`typed`] reads and
//! writes sessions and prekeys by what they are, libsignal-style.

mod memory;
mod redb;
pub(crate) mod typed;

use std::path::Path;

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand_core::{OsRng, RngCore};
use serde::de::DeserializeOwned;
use serde::Serialize;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::PickleError;
use crate::{kdf, pickle};

pub(crate) use self::memory::MemoryBackend;
pub(crate) use self::redb::RedbBackend;
pub(crate) use self::typed::{PrekeyStore, SessionStore};

/// The file in the data directory.
pub const STORE_FILE: &str = "client.redb";

/// What the store can hold, one table each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Table {
    /// Singletons by name: identity, device, prekeys, settings.
    State,
    /// One session per peer device.
    Sessions,
    /// One record per contact.
    Contacts,
    /// Received and sent messages kept for the app.
    Messages,
    /// Messages the relay has not accepted yet.
    Outbox,
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::State => "state",
            Table::Sessions => "sessions",
            Table::Contacts => "contacts",
            Table::Messages => "messages",
            Table::Outbox => "outbox",
        }
    }

    const ALL: [Table; 5] = [
        Table::State,
        Table::Sessions,
        Table::Contacts,
        Table::Messages,
        Table::Outbox,
    ];
}

/// One change in a commit, as the client names it (the value not sealed yet).
pub(crate) enum Change {
    Put {
        table: Table,
        key: Vec<u8>,
        value: Zeroizing<Vec<u8>>,
    },
    Delete {
        table: Table,
        key: Vec<u8>,
    },
}

/// The key that opens a local store.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct StorageKey([u8; 32]);

impl StorageKey {
    /// A key the app keeps in the platform keystore.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        StorageKey(bytes)
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        StorageKey(key)
    }

    /// A key from a passphrase with Argon2id (RFC 9106) at the given cost. The salt is
    /// kept, unencrypted, beside the store ([`salt_for`]).
    pub fn from_passphrase(
        passphrase: &[u8],
        salt: &[u8; 16],
        cost: PassphraseCost,
    ) -> Result<Self, StoreError> {
        let params = Params::new(cost.memory_kib, cost.iterations, 1, Some(32))
            .map_err(|_| StoreError::Passphrase)?;
        let mut key = [0u8; 32];
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into(passphrase, salt, &mut key)
            .map_err(|_| StoreError::Passphrase)?;
        Ok(StorageKey(key))
    }
}

impl std::fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StorageKey(<redacted>)")
    }
}

/// Argon2id cost for passphrase-derived keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassphraseCost {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes.
    pub iterations: u32,
}

impl Default for PassphraseCost {
    /// 64 MiB and 3 passes: RFC 9106's second recommended option, scaled to what a phone
    /// affords in about a second.
    fn default() -> Self {
        PassphraseCost {
            memory_kib: 64 * 1024,
            iterations: 3,
        }
    }
}

/// The salt for a passphrase-derived key in `dir`: read, or created and kept on first use.
pub fn salt_for(dir: &Path) -> Result<[u8; 16], StoreError> {
    let path = dir.join("passphrase-salt");
    match std::fs::read(&path) {
        Ok(bytes) => bytes.try_into().map_err(|_| StoreError::Corrupt),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)?;
            let mut salt = [0u8; 16];
            OsRng.fill_bytes(&mut salt);
            std::fs::write(&path, salt)?;
            Ok(salt)
        }
        Err(error) => Err(error.into()),
    }
}

/// What can go wrong with the local store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be read or written.
    #[error("local store I/O: {0}")]
    Io(#[from] std::io::Error),
    /// redb failed.
    #[error("local store: {0}")]
    Database(String),
    /// A value did not open: wrong key, or the file was tampered with.
    #[error("the local store does not open with this key, or is damaged")]
    Corrupt,
    /// The passphrase could not be turned into a key.
    #[error("passphrase key derivation failed")]
    Passphrase,
    /// An earlier commit failed, and this one was refused until the client had gone back
    /// to what the store holds.
    #[error("an earlier commit to the local store failed")]
    Interrupted,
    /// A value inside a row did not encode or decode (the row itself opened).
    #[error("local store value: {0}")]
    Pickle(#[from] PickleError),
    /// A value is over what XChaCha20-Poly1305 seals (about 256 GiB); nothing was written.
    #[error("a value too large to seal into the local store")]
    Seal,
}

/// How durable a commit is when [`LocalStore::commit_with`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Durability {
    /// On disk (fsynced) before the call returns, as [`LocalStore::commit`] is.
    Immediate,
    /// Applied and visible to every read at once, but made durable only by the next
    /// `Immediate` commit (or a clean close of the store): a group committer batches
    /// several of these behind one fsync. What a crash loses is said at
    /// [`RedbBackend`]'s `apply`.
    Deferred,
}

/// One change as a backend stores it: a tagged row and, for a put, the sealed value.
pub(crate) enum RawChange {
    Put {
        table: Table,
        row: Vec<u8>,
        sealed: Vec<u8>,
    },
    Delete {
        table: Table,
        row: Vec<u8>,
    },
}

/// What [`Backend::scan`] calls with each row and its sealed value.
pub(crate) type Visit<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), StoreError> + 'a;

/// Raw byte storage under the store: rows of opaque bytes per table, changed in atomic
/// batches. Everything it is given is already sealed and tagged.
pub(crate) trait Backend: Send + Sync {
    /// The sealed value at `row`, if there is one.
    fn get(&self, table: Table, row: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Calls `visit` with every row and sealed value of `table`, in row order, stopping
    /// at the first error (its own or `visit`'s).
    fn scan(&self, table: Table, visit: &mut Visit<'_>) -> Result<(), StoreError>;

    /// Applies every change or none, visible to reads once this returns, and durable as
    /// `durability` says.
    fn apply(&self, changes: Vec<RawChange>, durability: Durability) -> Result<(), StoreError>;
}

/// The open store.
pub(crate) struct LocalStore {
    backend: Box<dyn Backend>,
    /// Set by tests: the next commit fails as a full disk would.
    fail_next: std::sync::atomic::AtomicBool,
    seal_key: Zeroizing<[u8; 32]>,
    index_key: Zeroizing<[u8; 32]>,
}

impl LocalStore {
    /// Opens (or creates) the store in `dir`.
    pub(crate) fn open(dir: &Path, key: &StorageKey) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)?;
        let backend = RedbBackend::open(&dir.join(STORE_FILE))?;
        Ok(Self::with_backend(Box::new(backend), key))
    }

    /// An empty store that lives in memory only, for tests.
    #[cfg_attr(not(test), allow(dead_code))] // For the client's tests, not the app.
    pub(crate) fn in_memory(key: &StorageKey) -> Self {
        Self::with_backend(Box::new(MemoryBackend::default()), key)
    }

    /// The store over any backend.
    pub(crate) fn with_backend(backend: Box<dyn Backend>, key: &StorageKey) -> Self {
        LocalStore {
            backend,
            fail_next: std::sync::atomic::AtomicBool::new(false),
            seal_key: kdf::hkdf::<32>(&[], &key.0, b"hush-local-store-seal-v1"),
            index_key: kdf::hkdf::<32>(&[], &key.0, b"hush-local-store-index-v1"),
        }
    }

    /// The row key for `name` in `table`.
    pub(crate) fn row(&self, table: Table, name: &[u8]) -> Vec<u8> {
        let mut input = Vec::with_capacity(16 + name.len());
        input.extend_from_slice(table.name().as_bytes());
        input.push(0);
        input.extend_from_slice(name);
        kdf::hmac(self.index_key.as_ref(), &input).to_vec()
    }

    fn aad(table: Table, row: &[u8]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(16 + row.len());
        aad.extend_from_slice(table.name().as_bytes());
        aad.push(0);
        aad.extend_from_slice(row);
        aad
    }

    /// `nonce || ciphertext`, or an error: never an empty value written in its place.
    fn seal(&self, table: Table, row: &[u8], value: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut nonce = [0u8; 24];
        OsRng.fill_bytes(&mut nonce);
        let cipher = XChaCha20Poly1305::new((&*self.seal_key).into());
        let sealed = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: value,
                    aad: &Self::aad(table, row),
                },
            )
            .map_err(|_| StoreError::Seal)?;
        let mut out = Vec::with_capacity(24 + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn unseal(
        &self,
        table: Table,
        row: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        if sealed.len() < 24 {
            return Err(StoreError::Corrupt);
        }
        let (nonce, ciphertext) = sealed.split_at(24);
        XChaCha20Poly1305::new((&*self.seal_key).into())
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &Self::aad(table, row),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| StoreError::Corrupt)
    }

    /// Reads one value by its name.
    pub(crate) fn get(
        &self,
        table: Table,
        name: &[u8],
    ) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        let row = self.row(table, name);
        let Some(sealed) = self.backend.get(table, &row)? else {
            return Ok(None);
        };
        self.unseal(table, &row, &sealed).map(Some)
    }

    /// Every value of a table.
    pub(crate) fn values(&self, table: Table) -> Result<Vec<Zeroizing<Vec<u8>>>, StoreError> {
        let mut out = Vec::new();
        self.backend.scan(table, &mut |row, sealed| {
            out.push(self.unseal(table, row, sealed)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// A `Put` of `value` under `name`.
    pub(crate) fn put(&self, table: Table, name: &[u8], value: Zeroizing<Vec<u8>>) -> Change {
        Change::Put {
            table,
            key: self.row(table, name),
            value,
        }
    }

    /// A `Delete` of `name`.
    pub(crate) fn delete(&self, table: Table, name: &[u8]) -> Change {
        Change::Delete {
            table,
            key: self.row(table, name),
        }
    }

    /// Makes the next commit fail (tests of what a failed commit leaves behind).
    #[cfg(test)]
    pub(crate) fn fail_next_commit(&self) {
        self.fail_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Applies `changes` in one durable transaction.
    pub(crate) fn commit(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        self.commit_with(changes, Durability::Immediate)
    }

    /// Applies `changes` in one transaction, all or nothing, as durable as `durability`
    /// says. Every value is sealed before the backend's transaction begins, so a value
    /// that does not seal leaves the store as it was.
    pub(crate) fn commit_with(
        &self,
        changes: Vec<Change>,
        durability: Durability,
    ) -> Result<(), StoreError> {
        if self
            .fail_next
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(StoreError::Io(std::io::Error::other("injected failure")));
        }
        let raw = changes
            .into_iter()
            .map(|change| match change {
                Change::Put { table, key, value } => Ok(RawChange::Put {
                    sealed: self.seal(table, &key, &value)?,
                    table,
                    row: key,
                }),
                Change::Delete { table, key } => Ok(RawChange::Delete { table, row: key }),
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.backend.apply(raw, durability)
    }
}

/// The format version of the store's plain records (account record, settings, contacts,
/// messages, outbox, seen set-ups, retired sessions). Version 1 is the first versioned
/// format: stores written before it (a bare postcard body, no version byte) are not read,
/// as none was ever deployed.
const RECORD_VERSION: u8 = 1;

/// A plain record as `version || postcard body`, for [`LocalStore::put`]. A record that
/// does not encode is an error, never an empty value persisted in its place.
pub(crate) fn encode_record(value: &impl Serialize) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    Ok(pickle::versioned(RECORD_VERSION, value)?)
}

/// The reverse of [`encode_record`]: the version must be this build's, and the body must
/// decode and be all of `bytes`.
pub(crate) fn decode_record<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    Ok(pickle::unversioned(RECORD_VERSION, bytes)?)
}

#[cfg(test)]
mod tests;
