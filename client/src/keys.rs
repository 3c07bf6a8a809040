//! Device keys.

use std::fmt;

use ed25519_dalek::{Signer, SigningKey};
use rand_core::OsRng;

/// A device's Ed25519 signing key: authenticates the device to the relay. Zeroized on
/// drop (by `ed25519-dalek`), never printed.
pub struct DeviceKey(SigningKey);

impl DeviceKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        DeviceKey(SigningKey::generate(&mut OsRng))
    }

    /// Restores a key from its 32 secret bytes.
    pub fn from_secret_bytes(bytes: &[u8; 32]) -> Self {
        DeviceKey(SigningKey::from_bytes(bytes))
    }

    /// The public half, as the relay stores it.
    pub fn public_key(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    pub(crate) fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceKey(<redacted>)")
    }
}
