//! Padding before encryption, so that ciphertext lengths say little about content.
//!
//! Every message is padded to at least [`MIN_PADDED_LEN`] bytes, so all short texts look
//! alike; above that, to the next *Padmé* length (Nikitin et al., "Reducing Metadata
//! Leakage from Encrypted Files and Communication with PURBs", PETS 2019): a length `L` is
//! rounded up so that only its top `floor(log2(log2 L)) + 1` bits can be non-zero. That
//! leaks O(log log L) bits of the length and costs at most 12 % overhead, where a fixed
//! block size (Signal pads to 80-byte blocks) leaks ever more for large messages.
//!
//! Format: `content || 0x80 || 0x00*` (ISO/IEC 7816-4), removed after decryption.

use crate::error::CryptoError;

/// The smallest padded size.
pub const MIN_PADDED_LEN: usize = 256;

/// The padded length for `len` bytes of content (including the `0x80` marker).
pub fn padded_len(len: usize) -> usize {
    let needed = len + 1;
    if needed <= MIN_PADDED_LEN {
        return MIN_PADDED_LEN;
    }
    let exponent = usize::BITS - 1 - needed.leading_zeros(); // floor(log2 L)
    let significant = u32::BITS - exponent.leading_zeros(); // floor(log2 E) + 1
    let low_bits = exponent - significant;
    let mask = (1usize << low_bits) - 1;
    (needed + mask) & !mask
}

/// Pads `content`.
pub fn pad(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(padded_len(content.len()));
    out.extend_from_slice(content);
    out.push(0x80);
    out.resize(padded_len(content.len()), 0);
    out
}

/// Removes the padding.
pub fn unpad(padded: &[u8]) -> Result<&[u8], CryptoError> {
    let end = padded
        .iter()
        .rposition(|&byte| byte != 0)
        .ok_or(CryptoError::InvalidMessage)?;
    if padded[end] == 0x80 {
        Ok(&padded[..end])
    } else {
        Err(CryptoError::InvalidMessage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_messages_share_one_size() {
        assert_eq!(pad(b"").len(), MIN_PADDED_LEN);
        assert_eq!(pad(&[7; 255]).len(), MIN_PADDED_LEN);
        assert_eq!(pad(&[7; 256]).len(), 272);
    }

    #[test]
    fn padme_overhead_is_at_most_twelve_percent_and_sizes_are_few() {
        let mut sizes = std::collections::BTreeSet::new();
        for len in 256..70_000usize {
            let padded = padded_len(len);
            assert!(padded > len);
            assert!(
                padded as f64 <= (len + 1) as f64 * 1.12 + 1.0,
                "{len} -> {padded}"
            );
            sizes.insert(padded);
        }
        // ~70,000 lengths map to a few hundred sizes.
        assert!(sizes.len() < 400, "{}", sizes.len());
    }

    #[test]
    fn round_trip_and_bad_padding() {
        for len in [0, 1, 255, 256, 1000, 65_000] {
            let content: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            assert_eq!(unpad(&pad(&content)).unwrap(), content.as_slice());
        }
        assert!(unpad(&[0; 10]).is_err());
        assert!(unpad(&[1, 2, 3, 0]).is_err());
        assert!(unpad(&[]).is_err());
    }
}
