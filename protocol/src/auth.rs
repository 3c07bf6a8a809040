//! What a device signs to register or authenticate.
//!
//! Both transcripts bind the signature to this one connection twice over: through the
//! relay's random challenge and through TLS exporter keying material, which only the two
//! ends of this TLS session can compute. A signature captured on one connection is
//! therefore worthless on any other, even one that sees the same challenge.

use crate::ids::DeviceAddress;

/// The TLS exporter label both sides use (RFC 8446 §7.5).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-hush-auth-v1";

/// Bytes of exporter keying material mixed into the transcripts.
pub const EXPORTER_LEN: usize = 32;

const AUTH_CONTEXT: &[u8] = b"hush/1 authenticate\0";
const REGISTER_CONTEXT: &[u8] = b"hush/1 register\0";

/// The bytes a device signs to authenticate as `address`.
pub fn auth_transcript(
    exporter: &[u8; EXPORTER_LEN],
    challenge: &[u8; 32],
    address: &DeviceAddress,
) -> Vec<u8> {
    let mut t = Vec::with_capacity(AUTH_CONTEXT.len() + 32 + 32 + 20);
    t.extend_from_slice(AUTH_CONTEXT);
    t.extend_from_slice(exporter);
    t.extend_from_slice(challenge);
    t.extend_from_slice(&address.to_bytes());
    t
}

/// The bytes a new primary device signs to register, proving it holds `device_key`.
pub fn register_transcript(
    exporter: &[u8; EXPORTER_LEN],
    challenge: &[u8; 32],
    identity_key: &[u8],
    device_key: &[u8; 32],
) -> Vec<u8> {
    let mut t = Vec::with_capacity(REGISTER_CONTEXT.len() + 32 + 32 + 8 + identity_key.len() + 32);
    t.extend_from_slice(REGISTER_CONTEXT);
    t.extend_from_slice(exporter);
    t.extend_from_slice(challenge);
    // Length-prefixed so that no two (identity, device) pairs give the same bytes.
    t.extend_from_slice(&(identity_key.len() as u64).to_be_bytes());
    t.extend_from_slice(identity_key);
    t.extend_from_slice(device_key);
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{AccountId, DeviceId};

    #[test]
    fn transcripts_differ_by_context_exporter_and_address() {
        let address = DeviceAddress {
            account: AccountId([7; 16]),
            device: DeviceId(2),
        };
        let a = auth_transcript(&[1; 32], &[2; 32], &address);
        let b = auth_transcript(&[9; 32], &[2; 32], &address);
        let other = DeviceAddress {
            device: DeviceId(3),
            ..address
        };
        let c = auth_transcript(&[1; 32], &[2; 32], &other);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, register_transcript(&[1; 32], &[2; 32], &[], &[0; 32]));
    }
}
