//! The store's promises, on both backends where a backend could break them.

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
            Place::File(dir) => Box::new(RedbBackend::open(&dir.path().join(STORE_FILE)).unwrap()),
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
    let put =
        |name: &[u8], value: &[u8]| store.put(Table::State, name, Zeroizing::new(value.to_vec()));
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
