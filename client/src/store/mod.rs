//! The encrypted local store: everything the client must keep, in one redb file.
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
mod tests {
    use serde::Deserialize;

    use super::*;

    /// Where a test's store lives. `open` opens it again, as the app does after a restart.
    enum Place {
        File(tempfile::TempDir),
        Memory(MemoryBackend),
    }

    impl Place {
        fn file() -> Self {
            Place::File(tempfile::tempdir().unwrap())
        }

        fn memory() -> Self {
            Place::Memory(MemoryBackend::default())
        }

        fn open(&self, key: &StorageKey) -> LocalStore {
            match self {
                Place::File(dir) => LocalStore::open(dir.path(), key).unwrap(),
                Place::Memory(rows) => LocalStore::with_backend(Box::new(rows.clone()), key),
            }
        }

        /// The raw backend, as the store would open it.
        fn backend(&self) -> Box<dyn Backend> {
            match self {
                Place::File(dir) => {
                    Box::new(RedbBackend::open(&dir.path().join(STORE_FILE)).unwrap())
                }
                Place::Memory(rows) => Box::new(rows.clone()),
            }
        }

        /// Every byte the backend keeps.
        fn raw_bytes(&self) -> Vec<u8> {
            match self {
                Place::File(dir) => std::fs::read(dir.path().join(STORE_FILE)).unwrap(),
                Place::Memory(rows) => {
                    let mut out = Vec::new();
                    for table in Table::ALL {
                        rows.scan(table, &mut |row, sealed| {
                            out.extend_from_slice(row);
                            out.extend_from_slice(sealed);
                            Ok(())
                        })
                        .unwrap();
                    }
                    out
                }
            }
        }
    }

    /// Each listed test, `fn name(place: &Place)`, runs once on a redb file and once in
    /// memory: both backends keep the store's promises.
    macro_rules! on_both_backends {
        ($($name:ident),* $(,)?) => {
            mod on_redb {
                $(#[test]
                fn $name() {
                    super::$name(&super::Place::file());
                })*
            }
            mod in_memory {
                $(#[test]
                fn $name() {
                    super::$name(&super::Place::memory());
                })*
            }
        };
    }

    on_both_backends!(
        values_round_trip_sealed_and_only_with_the_key,
        a_deferred_commit_is_visible_to_reads_at_once,
        a_value_moved_to_another_row_does_not_open,
        a_damaged_record_in_the_store_is_a_typed_pickle_error,
        a_backend_applies_a_batch_in_order_across_tables,
        a_backend_scans_in_row_order_and_stops_at_the_visitors_error,
    );

    fn put(table: Table, row: &[u8], sealed: &[u8]) -> RawChange {
        RawChange::Put {
            table,
            row: row.to_vec(),
            sealed: sealed.to_vec(),
        }
    }

    fn delete(table: Table, row: &[u8]) -> RawChange {
        RawChange::Delete {
            table,
            row: row.to_vec(),
        }
    }

    fn a_backend_applies_a_batch_in_order_across_tables(place: &Place) {
        let backend = place.backend();
        assert_eq!(backend.get(Table::Sessions, b"s").unwrap(), None);
        backend
            .apply(
                vec![
                    put(Table::Sessions, b"s", b"first"),
                    put(Table::Messages, b"m", b"message"),
                    put(Table::Outbox, b"o", b"queued"),
                    // Later changes in a batch win over earlier ones to the same row.
                    put(Table::Sessions, b"s", b"second"),
                    delete(Table::Outbox, b"o"),
                    // Deleting a row that is not there is no error.
                    delete(Table::Contacts, b"nobody"),
                ],
                Durability::Immediate,
            )
            .unwrap();
        assert_eq!(
            backend.get(Table::Sessions, b"s").unwrap().as_deref(),
            Some(&b"second"[..])
        );
        assert_eq!(
            backend.get(Table::Messages, b"m").unwrap().as_deref(),
            Some(&b"message"[..])
        );
        assert_eq!(backend.get(Table::Outbox, b"o").unwrap(), None);
        // Tables are apart: a row of one is not found in another.
        assert_eq!(backend.get(Table::State, b"s").unwrap(), None);
    }

    fn a_backend_scans_in_row_order_and_stops_at_the_visitors_error(place: &Place) {
        let backend = place.backend();
        backend
            .apply(
                vec![
                    put(Table::Contacts, b"c", b"3"),
                    put(Table::Contacts, b"a", b"1"),
                    put(Table::Contacts, b"b", b"2"),
                    put(Table::Messages, b"x", b"elsewhere"),
                ],
                Durability::Deferred,
            )
            .unwrap();
        let mut seen = Vec::new();
        backend
            .scan(Table::Contacts, &mut |row, sealed| {
                seen.push((row.to_vec(), sealed.to_vec()));
                Ok(())
            })
            .unwrap();
        assert_eq!(
            seen,
            [
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"2".to_vec()),
                (b"c".to_vec(), b"3".to_vec()),
            ]
        );
        let mut visited = 0;
        let stopped = backend.scan(Table::Contacts, &mut |_, _| {
            visited += 1;
            Err(StoreError::Corrupt)
        });
        assert!(matches!(stopped, Err(StoreError::Corrupt)));
        assert_eq!(visited, 1);
    }

    fn values_round_trip_sealed_and_only_with_the_key(place: &Place) {
        let key = StorageKey::from_bytes([3; 32]);
        {
            let store = place.open(&key);
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
        let bytes = place.raw_bytes();
        for needle in [&b"secret-identity"[..], b"identity", b"alice"] {
            assert!(!bytes.windows(needle.len()).any(|w| w == needle));
        }
        let wrong = place.open(&StorageKey::from_bytes([4; 32]));
        // Another key derives other row tags, and cannot open the rows it finds.
        assert!(wrong.get(Table::State, b"identity").unwrap().is_none());
        assert!(matches!(
            wrong.values(Table::State),
            Err(StoreError::Corrupt)
        ));
    }

    fn a_deferred_commit_is_visible_to_reads_at_once(place: &Place) {
        let store = place.open(&StorageKey::from_bytes([5; 32]));
        store
            .commit_with(
                vec![
                    store.put(Table::Sessions, b"bob-1", Zeroizing::new(b"one".to_vec())),
                    store.put(Table::Outbox, b"m-1", Zeroizing::new(b"queued".to_vec())),
                ],
                Durability::Deferred,
            )
            .unwrap();
        assert_eq!(
            store
                .get(Table::Sessions, b"bob-1")
                .unwrap()
                .unwrap()
                .as_slice(),
            b"one"
        );
        assert_eq!(store.values(Table::Outbox).unwrap().len(), 1);
        store
            .commit_with(
                vec![store.delete(Table::Outbox, b"m-1")],
                Durability::Deferred,
            )
            .unwrap();
        assert!(store.values(Table::Outbox).unwrap().is_empty());
        assert!(store.get(Table::Sessions, b"bob-1").unwrap().is_some());
    }

    fn a_value_moved_to_another_row_does_not_open(place: &Place) {
        let key = StorageKey::from_bytes([6; 32]);
        let store = place.open(&key);
        store
            .commit(vec![store.put(
                Table::Contacts,
                b"alice",
                Zeroizing::new(b"alice's record".to_vec()),
            )])
            .unwrap();
        // Copy the sealed value, as a tamperer with the file would, under another row.
        let alice = store.row(Table::Contacts, b"alice");
        let sealed = store.backend.get(Table::Contacts, &alice).unwrap().unwrap();
        let mallory = store.row(Table::Contacts, b"mallory");
        store
            .backend
            .apply(
                vec![RawChange::Put {
                    table: Table::Contacts,
                    row: mallory,
                    sealed,
                }],
                Durability::Immediate,
            )
            .unwrap();
        assert!(matches!(
            store.get(Table::Contacts, b"mallory"),
            Err(StoreError::Corrupt)
        ));
        assert!(store.get(Table::Contacts, b"alice").unwrap().is_some());
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Record {
        name: String,
        count: u64,
    }

    fn a_damaged_record_in_the_store_is_a_typed_pickle_error(place: &Place) {
        let store = place.open(&StorageKey::from_bytes([7; 32]));
        let record = Record {
            name: "settings".into(),
            count: 3,
        };
        let good = encode_record(&record).unwrap();
        let mut foreign = good.clone();
        foreign[0] = RECORD_VERSION.wrapping_add(1);
        store
            .commit(vec![
                store.put(Table::State, b"good", good),
                store.put(Table::State, b"foreign", foreign),
                store.put(
                    Table::State,
                    b"garbage",
                    Zeroizing::new(vec![RECORD_VERSION, 0xff]),
                ),
            ])
            .unwrap();
        let read =
            |name: &[u8]| decode_record::<Record>(&store.get(Table::State, name).unwrap().unwrap());
        assert_eq!(read(b"good").unwrap(), record);
        assert!(matches!(
            read(b"foreign"),
            Err(StoreError::Pickle(PickleError::UnknownVersion(v))) if v == RECORD_VERSION.wrapping_add(1)
        ));
        assert!(matches!(
            read(b"garbage"),
            Err(StoreError::Pickle(PickleError::Corrupt))
        ));
    }

    #[test]
    fn an_in_memory_store_keeps_what_it_is_given_for_as_long_as_it_lives() {
        let key = StorageKey::from_bytes([11; 32]);
        let store = LocalStore::in_memory(&key);
        assert!(store.values(Table::Contacts).unwrap().is_empty());
        store
            .commit(vec![store.put(
                Table::Contacts,
                b"bob",
                Zeroizing::new(b"bob's record".to_vec()),
            )])
            .unwrap();
        assert_eq!(
            store
                .get(Table::Contacts, b"bob")
                .unwrap()
                .unwrap()
                .as_slice(),
            b"bob's record"
        );
        // Each in-memory store is its own: another starts empty.
        assert!(LocalStore::in_memory(&key)
            .get(Table::Contacts, b"bob")
            .unwrap()
            .is_none());
    }

    #[test]
    fn records_are_versioned_and_refuse_any_damage() {
        let record = Record {
            name: "contact".into(),
            count: 9,
        };
        let good = encode_record(&record).unwrap();
        assert_eq!(good[0], RECORD_VERSION);
        assert_eq!(decode_record::<Record>(&good).unwrap(), record);
        let damaged: [(&str, Vec<u8>, PickleError); 5] = [
            ("empty", Vec::new(), PickleError::Corrupt),
            (
                "truncated",
                good[..good.len() - 1].to_vec(),
                PickleError::Corrupt,
            ),
            (
                "trailing byte",
                [&good[..], &[0]].concat(),
                PickleError::Corrupt,
            ),
            (
                "garbage",
                [RECORD_VERSION, 0xff, 0xff, 0xff].to_vec(),
                PickleError::Corrupt,
            ),
            (
                "another version",
                [&[RECORD_VERSION + 1][..], &good[1..]].concat(),
                PickleError::UnknownVersion(RECORD_VERSION + 1),
            ),
        ];
        for (damage, bytes, expected) in damaged {
            match decode_record::<Record>(&bytes) {
                Err(StoreError::Pickle(error)) => assert_eq!(error, expected, "{damage}"),
                other => panic!("{damage}: {other:?}"),
            }
        }
    }

    /// A value whose serializer fails, as a hand-written `Serialize` may.
    struct Unencodable;

    impl Serialize for Unencodable {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("refuses to encode"))
        }
    }

    #[test]
    fn a_record_that_does_not_encode_is_an_error_not_an_empty_value() {
        assert!(matches!(
            encode_record(&Unencodable),
            Err(StoreError::Pickle(PickleError::Encode))
        ));
    }

    #[test]
    fn a_deferred_commit_survives_a_reopen_after_a_later_immediate_commit() {
        let place = Place::file();
        let key = StorageKey::from_bytes([8; 32]);
        {
            let store = place.open(&key);
            store
                .commit_with(
                    vec![store.put(
                        Table::Sessions,
                        b"bob-1",
                        Zeroizing::new(b"ratchet".to_vec()),
                    )],
                    Durability::Deferred,
                )
                .unwrap();
            store
                .commit(vec![store.put(
                    Table::Messages,
                    b"m-1",
                    Zeroizing::new(b"hello".to_vec()),
                )])
                .unwrap();
        }
        let store = place.open(&key);
        assert_eq!(
            store
                .get(Table::Sessions, b"bob-1")
                .unwrap()
                .unwrap()
                .as_slice(),
            b"ratchet"
        );
        assert_eq!(
            store
                .get(Table::Messages, b"m-1")
                .unwrap()
                .unwrap()
                .as_slice(),
            b"hello"
        );
    }

    #[test]
    fn a_deferred_commit_survives_a_clean_close() {
        let place = Place::file();
        let key = StorageKey::from_bytes([9; 32]);
        {
            let store = place.open(&key);
            store
                .commit_with(
                    vec![store.put(Table::State, b"settings", Zeroizing::new(b"s".to_vec()))],
                    Durability::Deferred,
                )
                .unwrap();
        }
        let store = place.open(&key);
        assert!(store.get(Table::State, b"settings").unwrap().is_some());
    }

    /// Set in the child process of the crash test: the directory of its store.
    const CRASH_DIR: &str = "HUSH_STORE_CRASH_DIR";
    const CRASHED: i32 = 86;

    #[test]
    fn a_crash_loses_the_deferred_commits_since_the_last_immediate_one() {
        if let Some(dir) = std::env::var_os(CRASH_DIR) {
            crash_after_deferred_commits(Path::new(&dir));
        }
        let dir = tempfile::tempdir().unwrap();
        // This same test, in a child process that takes the branch above.
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::tests::a_crash_loses_the_deferred_commits_since_the_last_immediate_one",
                "--test-threads=1",
            ])
            .env(CRASH_DIR, dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        // The child got as far as its crash, not an early failure.
        assert_eq!(status.code(), Some(CRASHED));
        let store = LocalStore::open(dir.path(), &StorageKey::from_bytes([10; 32])).unwrap();
        let read = |name: &[u8]| {
            store
                .get(Table::State, name)
                .unwrap()
                .map(|value| value.to_vec())
        };
        assert_eq!(read(b"a"), Some(b"immediate a".to_vec()));
        // Both deferred commits after it are gone, the put and the delete: the file is
        // back at the last immediate commit, not at part of what followed.
        assert_eq!(read(b"b"), Some(b"immediate b".to_vec()));
        assert_eq!(read(b"c"), None);
    }

    /// Commits, then exits without closing the store, as a crash would.
    fn crash_after_deferred_commits(dir: &Path) -> ! {
        let store = LocalStore::open(dir, &StorageKey::from_bytes([10; 32])).unwrap();
        let put = |name: &[u8], value: &[u8]| {
            store.put(Table::State, name, Zeroizing::new(value.to_vec()))
        };
        store
            .commit(vec![put(b"a", b"immediate a"), put(b"b", b"immediate b")])
            .unwrap();
        store
            .commit_with(vec![put(b"c", b"deferred c")], Durability::Deferred)
            .unwrap();
        store
            .commit_with(vec![store.delete(Table::State, b"b")], Durability::Deferred)
            .unwrap();
        assert!(store.get(Table::State, b"b").unwrap().is_none());
        // No destructor runs: redb never gets to close the file.
        std::process::exit(CRASHED);
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
