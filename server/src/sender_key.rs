//! The relay's long-term sender-certificate key (Ed25519), made on first start and kept in
//! its own file beside the keyring (mode 0600), so that certificates issued before a
//! restart still verify after it. The key signs sender certificates and nothing else.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, SigningKey};
use hush_protocol::sealed::{SenderCertificate, SenderCertificateBody};
use rand_core::OsRng;
use zeroize::Zeroizing;

use crate::keyring::{write_private_file, KeyringError};

const KEY_FILE_VERSION: u8 = 1;

/// The sender-certificate signing key. Never printed; zeroized on drop.
pub struct SenderKey {
    key: SigningKey,
}

impl SenderKey {
    /// Opens the key file at `path`, creating it with a fresh key if it does not exist.
    pub fn open_or_create(path: &Path) -> Result<Self, KeyringError> {
        let io = |source| KeyringError::Io {
            path: path.to_owned(),
            source,
        };
        let corrupt = || KeyringError::Corrupt(PathBuf::from(path));
        match fs::read(path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                let (&version, seed) = bytes.split_first().ok_or_else(corrupt)?;
                let seed: &[u8; 32] = seed.try_into().map_err(|_| corrupt())?;
                if version != KEY_FILE_VERSION {
                    return Err(corrupt());
                }
                Ok(SenderKey {
                    key: SigningKey::from_bytes(seed),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = SigningKey::generate(&mut OsRng);
                let mut bytes = Zeroizing::new(Vec::with_capacity(33));
                bytes.push(KEY_FILE_VERSION);
                bytes.extend_from_slice(key.as_bytes());
                write_private_file(path, &bytes).map_err(io)?;
                Ok(SenderKey { key })
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The public key recipients verify certificates with.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// Signs a certificate for `body`.
    pub fn issue(&self, body: &SenderCertificateBody) -> SenderCertificate {
        SenderCertificate::issue(body, |transcript| self.key.sign(transcript).to_bytes())
    }
}

impl fmt::Debug for SenderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SenderKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hush_protocol::{AccountId, DeviceId};

    #[test]
    fn the_key_survives_reopen_and_its_certificates_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sender-certificate-key");
        let key = SenderKey::open_or_create(&path).unwrap();
        let public = key.public_key();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        drop(key);
        let key = SenderKey::open_or_create(&path).unwrap();
        assert_eq!(key.public_key(), public);
        let body = SenderCertificateBody {
            account: AccountId([1; 16]),
            device: DeviceId(1),
            identity_key: vec![1, 2, 3],
            expires_at: 10,
        };
        assert_eq!(key.issue(&body).verify(&public, 9).unwrap(), body);
        assert_eq!(format!("{key:?}"), "SenderKey(<redacted>)");
    }
}
