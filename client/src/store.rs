//! The encrypted local store: everything the client must keep, in one redb file.
//!
//! Every value is sealed with XChaCha20-Poly1305 under a key derived from the app's
//! 32-byte storage key (from the platform keystore) or from a passphrase with Argon2id;
//! the table name and row key are the associated data, so a value cannot be moved to
//! another row. Row keys are HMAC-SHA256 tags of what they name (a contact's account, a
//! session's device address), so the file shows no identifiers either. Changes are applied
//! in one write transaction with immediate durability: a session update and the message it
//! decrypted land together or not at all.

use std::path::Path;

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand_core::{OsRng, RngCore};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::kdf;

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
    fn definition(self) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
        TableDefinition::new(self.name())
    }

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

/// When a commit is on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Durability {
    /// Before the commit returns (fsync).
    Immediate,
    /// Visible to reads at once, on disk with the next `Immediate` commit: a crash before
    /// that loses it.
    Deferred,
}

/// One change in a commit.
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
}

fn db_error(error: impl std::fmt::Display) -> StoreError {
    StoreError::Database(error.to_string())
}

/// The open store.
pub(crate) struct LocalStore {
    db: Database,
    /// Set by tests: the next commit fails as a full disk would.
    fail_next: std::sync::atomic::AtomicBool,
    seal_key: Zeroizing<[u8; 32]>,
    index_key: Zeroizing<[u8; 32]>,
}

impl LocalStore {
    /// Opens (or creates) the store in `dir`.
    pub(crate) fn open(dir: &Path, key: &StorageKey) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)?;
        let db = Database::create(dir.join(STORE_FILE)).map_err(db_error)?;
        let txn = db.begin_write().map_err(db_error)?;
        for table in Table::ALL {
            txn.open_table(table.definition()).map_err(db_error)?;
        }
        txn.commit().map_err(db_error)?;
        Ok(LocalStore {
            db,
            fail_next: std::sync::atomic::AtomicBool::new(false),
            seal_key: kdf::hkdf::<32>(&[], &key.0, b"hush-local-store-seal-v1"),
            index_key: kdf::hkdf::<32>(&[], &key.0, b"hush-local-store-index-v1"),
        })
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

    fn seal(&self, table: Table, row: &[u8], value: &[u8]) -> Vec<u8> {
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
            .unwrap_or_default();
        let mut out = Vec::with_capacity(24 + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
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
        let txn = self.db.begin_read().map_err(db_error)?;
        let t = txn.open_table(table.definition()).map_err(db_error)?;
        let Some(value) = t.get(row.as_slice()).map_err(db_error)? else {
            return Ok(None);
        };
        self.unseal(table, &row, value.value()).map(Some)
    }

    /// Every value of a table.
    pub(crate) fn values(&self, table: Table) -> Result<Vec<Zeroizing<Vec<u8>>>, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let t = txn.open_table(table.definition()).map_err(db_error)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(db_error)? {
            let (row, value) = entry.map_err(db_error)?;
            out.push(self.unseal(table, row.value(), value.value())?);
        }
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

    /// Applies `changes` in one transaction of the given durability.
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
        let mut txn = self.db.begin_write().map_err(db_error)?;
        txn.set_durability(match durability {
            Durability::Immediate => redb::Durability::Immediate,
            Durability::Deferred => redb::Durability::None,
        })
        .map_err(db_error)?;
        {
            for change in changes {
                match change {
                    Change::Put { table, key, value } => {
                        let sealed = self.seal(table, &key, &value);
                        let mut t = txn.open_table(table.definition()).map_err(db_error)?;
                        t.insert(key.as_slice(), sealed.as_slice())
                            .map_err(db_error)?;
                    }
                    Change::Delete { table, key } => {
                        let mut t = txn.open_table(table.definition()).map_err(db_error)?;
                        t.remove(key.as_slice()).map_err(db_error)?;
                    }
                }
            }
        }
        txn.commit().map_err(db_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_sealed_and_only_with_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = StorageKey::from_bytes([3; 32]);
        {
            let store = LocalStore::open(dir.path(), &key).unwrap();
            store
                .commit(vec![
                    store.put(
                        Table::State,
                        b"identity",
                        Zeroizing::new(b"secret-identity".to_vec()),
                    ),
                    store.put(
                        Table::Contacts,
                        b"alice-account",
                        Zeroizing::new(b"alice".to_vec()),
                    ),
                ])
                .unwrap();
            assert_eq!(
                store
                    .get(Table::State, b"identity")
                    .unwrap()
                    .unwrap()
                    .as_slice(),
                b"secret-identity"
            );
            store
                .commit(vec![store.delete(Table::Contacts, b"alice-account")])
                .unwrap();
            assert!(store.values(Table::Contacts).unwrap().is_empty());
        }
        let bytes = std::fs::read(dir.path().join(STORE_FILE)).unwrap();
        for needle in [&b"secret-identity"[..], b"identity", b"alice"] {
            assert!(!bytes.windows(needle.len()).any(|w| w == needle));
        }
        let wrong = LocalStore::open(dir.path(), &StorageKey::from_bytes([4; 32])).unwrap();
        // Another key derives other row tags, and cannot open the rows it finds.
        assert!(wrong.get(Table::State, b"identity").unwrap().is_none());
        assert!(matches!(
            wrong.values(Table::State),
            Err(StoreError::Corrupt)
        ));
    }

    #[test]
    fn passphrase_keys_depend_on_passphrase_and_salt() {
        let cost = PassphraseCost {
            memory_kib: 256,
            iterations: 1,
        };
        let a = StorageKey::from_passphrase(b"correct horse", &[1; 16], cost).unwrap();
        let b = StorageKey::from_passphrase(b"correct horse", &[1; 16], cost).unwrap();
        let c = StorageKey::from_passphrase(b"correct horse", &[2; 16], cost).unwrap();
        let d = StorageKey::from_passphrase(b"wrong horse", &[1; 16], cost).unwrap();
        assert_eq!(a.0, b.0);
        assert_ne!(a.0, c.0);
        assert_ne!(a.0, d.0);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(salt_for(dir.path()).unwrap(), salt_for(dir.path()).unwrap());
    }
}
