//! The relay's storage keys, kept in one file beside (not inside) the database.
//!
//! - the *index key* blinds every identifier used as a database key (HMAC-SHA256), so the
//!   database file holds no account or device id in clear;
//! - the *directory key* seals account and prekey records;
//! - one *day key* per expiry day seals the envelopes that expire that day. When a day has
//!   passed, every envelope sealed under its key has expired; the key is deleted from this
//!   file, and whatever bytes of those envelopes redb's free pages still hold become noise.
//!
//! The keys live outside the redb file on purpose: a key deleted from redb could itself
//! linger in a free page. The file is replaced atomically (write, fsync, rename, fsync dir)
//! so that a crash leaves either the old or the new set of keys.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use crate::seal::SealingKey;

/// Seconds in a day; expiry days are `expires_at / DAY`.
pub const DAY: u64 = 86_400;

/// A blinded 16-byte database key derived from an identifier.
pub type Tag = [u8; 16];

/// Failure to read or write the key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// Reading or writing the file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The file is not a key file of this version.
    #[error("key file {0} is corrupt or of an unknown version")]
    Corrupt(PathBuf),
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    version: u8,
    index: [u8; 32],
    directory: [u8; 32],
    days: Vec<(u32, [u8; 32])>,
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        self.index.zeroize();
        self.directory.zeroize();
        for (_, key) in &mut self.days {
            key.zeroize();
        }
    }
}

const KEY_FILE_VERSION: u8 = 1;

/// The storage keys. Day keys are created on demand and dropped after their day.
pub struct Keyring {
    path: PathBuf,
    index: SealingKey,
    /// HMAC-SHA256 keyed with `index`, cloned for each tag: keying it costs two of the
    /// four SHA-256 blocks a tag takes, and every envelope and ack needs a tag, on the
    /// commit thread. Its state is as good as `index` and, unlike `index`, is not zeroized
    /// when dropped (the hmac crate does not); it lives as long as the keyring, that is the
    /// relay, as did the state each tag used to build and drop.
    tagger: Hmac<Sha256>,
    directory: SealingKey,
    days: Mutex<BTreeMap<u32, Arc<SealingKey>>>,
}

fn tagger(index: &[u8; 32]) -> Hmac<Sha256> {
    <Hmac<Sha256> as Mac>::new_from_slice(index)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"))
}

impl Keyring {
    /// Opens the key file at `path`, creating it with fresh keys if it does not exist.
    pub fn open_or_create(path: &Path) -> Result<Self, KeyringError> {
        let io = |source| KeyringError::Io {
            path: path.to_owned(),
            source,
        };
        match fs::read(path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                let file: KeyFile = postcard::from_bytes(&bytes)
                    .map_err(|_| KeyringError::Corrupt(path.to_owned()))?;
                if file.version != KEY_FILE_VERSION {
                    return Err(KeyringError::Corrupt(path.to_owned()));
                }
                let days = file
                    .days
                    .iter()
                    .map(|(day, key)| (*day, Arc::new(SealingKey::from_bytes(*key))))
                    .collect();
                Ok(Keyring {
                    path: path.to_owned(),
                    tagger: tagger(&file.index),
                    index: SealingKey::from_bytes(file.index),
                    directory: SealingKey::from_bytes(file.directory),
                    days: Mutex::new(days),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let index = SealingKey::generate();
                let keyring = Keyring {
                    path: path.to_owned(),
                    tagger: tagger(index.as_bytes()),
                    index,
                    directory: SealingKey::generate(),
                    days: Mutex::new(BTreeMap::new()),
                };
                keyring.persist(&keyring.lock_days())?;
                Ok(keyring)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The blinded database key for `data` in `domain`. Domains keep an account tag from
    /// ever equalling a device tag.
    pub fn tag(&self, domain: &[u8], data: &[u8]) -> Tag {
        let mut mac = self.tagger.clone();
        mac.update(&(domain.len() as u32).to_be_bytes());
        mac.update(domain);
        mac.update(data);
        let digest = mac.finalize().into_bytes();
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&digest[..16]);
        tag
    }

    /// The key that seals directory records (accounts, prekeys).
    pub fn directory(&self) -> &SealingKey {
        &self.directory
    }

    /// The key of an expiry day, if it still exists.
    pub fn day(&self, day: u32) -> Option<Arc<SealingKey>> {
        self.lock_days().get(&day).cloned()
    }

    /// The key of an expiry day, created and durably saved first if it is new. Callers seal
    /// under it only after this returns, so no envelope is ever written under a key that a
    /// crash could lose.
    pub fn day_or_create(&self, day: u32) -> Result<Arc<SealingKey>, KeyringError> {
        let mut days = self.lock_days();
        if let Some(key) = days.get(&day) {
            return Ok(key.clone());
        }
        let key = Arc::new(SealingKey::generate());
        days.insert(day, key.clone());
        if let Err(e) = self.persist(&days) {
            days.remove(&day);
            return Err(e);
        }
        Ok(key)
    }

    /// Deletes the keys of days before `day`, shredding whatever they sealed. Returns how
    /// many keys went.
    pub fn drop_days_before(&self, day: u32) -> Result<usize, KeyringError> {
        let mut days = self.lock_days();
        let kept = days.split_off(&day);
        let dropped = std::mem::replace(&mut *days, kept);
        if dropped.is_empty() {
            return Ok(0);
        }
        if let Err(e) = self.persist(&days) {
            days.extend(dropped);
            return Err(e);
        }
        Ok(dropped.len())
    }

    /// The expiry days that still have keys.
    pub fn days(&self) -> Vec<u32> {
        self.lock_days().keys().copied().collect()
    }

    fn lock_days(&self) -> MutexGuard<'_, BTreeMap<u32, Arc<SealingKey>>> {
        // A panic while holding the lock cannot leave the map half-updated (every update
        // is a single insert, remove or swap), so a poisoned lock is still consistent.
        self.days.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn persist(&self, days: &BTreeMap<u32, Arc<SealingKey>>) -> Result<(), KeyringError> {
        let io = |source| KeyringError::Io {
            path: self.path.clone(),
            source,
        };
        let file = KeyFile {
            version: KEY_FILE_VERSION,
            index: *self.index.as_bytes(),
            directory: *self.directory.as_bytes(),
            days: days
                .iter()
                .map(|(day, key)| (*day, *key.as_bytes()))
                .collect(),
        };
        let bytes = Zeroizing::new(
            postcard::to_allocvec(&file).map_err(|_| KeyringError::Corrupt(self.path.clone()))?,
        );
        write_private_file(&self.path, &bytes).map_err(io)
    }
}

/// Replaces the file at `path` with `bytes` atomically (write a temporary file with mode
/// 0600, fsync, rename, fsync the directory): a crash leaves the old or the new content.
pub(crate) fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut out = options.open(&tmp)?;
        out.write_all(bytes)?;
        out.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir).and_then(|d| d.sync_all())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_survive_reopen_and_dropped_days_stay_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let ring = Keyring::open_or_create(&path).unwrap();
        let sealed = ring.day_or_create(10).unwrap().seal(b"x", b"hello");
        ring.day_or_create(11).unwrap();
        let tag = ring.tag(b"account", b"abc");
        drop(ring);

        let ring = Keyring::open_or_create(&path).unwrap();
        assert_eq!(ring.tag(b"account", b"abc"), tag);
        assert_ne!(ring.tag(b"device", b"abc"), tag);
        assert_eq!(ring.day(10).unwrap().open(b"x", &sealed).unwrap(), b"hello");
        assert_eq!(ring.drop_days_before(11).unwrap(), 1);
        drop(ring);

        let ring = Keyring::open_or_create(&path).unwrap();
        assert!(ring.day(10).is_none());
        assert_eq!(ring.days(), vec![11]);
    }
}
