//! Call media on the wire: one QUIC datagram per media frame, `allocation (u32 BE) ||
//! opaque encrypted frame`, at most [`MAX_MEDIA_FRAME`] bytes in all.
//!
//! The relay reads the four-byte allocation id to find the call's other party and forwards
//! the datagram as it is; the rest is end-to-end encrypted by the clients (P1).
//!
//! ```
//! use hush_protocol::media::{encode_media, parse_media};
//!
//! let datagram = encode_media(7, b"sealed frame").unwrap();
//! assert_eq!(&datagram[..4], &[0, 0, 0, 7]);
//! assert_eq!(parse_media(&datagram), Ok((7, &b"sealed frame"[..])));
//! ```

pub use crate::limits::MAX_MEDIA_FRAME;

/// Bytes before the encrypted frame: the allocation id.
pub const MEDIA_HEADER_LEN: usize = 4;

/// The largest encrypted frame one datagram carries.
pub const MAX_MEDIA_PAYLOAD: usize = MAX_MEDIA_FRAME - MEDIA_HEADER_LEN;

/// Why bytes are not a media datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MediaError {
    /// Shorter than the allocation header.
    #[error("media datagram of {0} bytes is shorter than its header")]
    TooShort(usize),
    /// Longer than [`MAX_MEDIA_FRAME`].
    #[error("media datagram of {0} bytes exceeds the limit of {MAX_MEDIA_FRAME}")]
    TooLarge(usize),
}

/// The allocation id a datagram is for, or why it is not a media datagram. Checks only
/// the header and the size, without copying anything.
pub fn media_allocation(datagram: &[u8]) -> Result<u32, MediaError> {
    if datagram.len() > MAX_MEDIA_FRAME {
        return Err(MediaError::TooLarge(datagram.len()));
    }
    match datagram.first_chunk::<MEDIA_HEADER_LEN>() {
        Some(header) => Ok(u32::from_be_bytes(*header)),
        None => Err(MediaError::TooShort(datagram.len())),
    }
}

/// Splits a datagram into its allocation id and encrypted frame.
pub fn parse_media(datagram: &[u8]) -> Result<(u32, &[u8]), MediaError> {
    let allocation = media_allocation(datagram)?;
    Ok((allocation, &datagram[MEDIA_HEADER_LEN..]))
}

/// Appends the datagram for `frame` in `allocation` to `out`.
pub fn encode_media_into(
    allocation: u32,
    frame: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), MediaError> {
    let len = MEDIA_HEADER_LEN + frame.len();
    if len > MAX_MEDIA_FRAME {
        return Err(MediaError::TooLarge(len));
    }
    out.reserve(len);
    out.extend_from_slice(&allocation.to_be_bytes());
    out.extend_from_slice(frame);
    Ok(())
}

/// The datagram for `frame` in `allocation`.
pub fn encode_media(allocation: u32, frame: &[u8]) -> Result<Vec<u8>, MediaError> {
    let mut out = Vec::with_capacity(MEDIA_HEADER_LEN + frame.len());
    encode_media_into(allocation, frame, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_sizes_are_bounded() {
        let datagram = encode_media(0xdead_beef, &[1, 2, 3]).unwrap();
        assert_eq!(datagram, [0xde, 0xad, 0xbe, 0xef, 1, 2, 3]);
        assert_eq!(parse_media(&datagram), Ok((0xdead_beef, &[1u8, 2, 3][..])));
        assert_eq!(parse_media(&[0, 0, 1, 0]), Ok((256, &[][..])));
        assert_eq!(parse_media(&[0, 0, 1]), Err(MediaError::TooShort(3)));
        assert!(encode_media(1, &[0; MAX_MEDIA_PAYLOAD]).is_ok());
        assert_eq!(
            encode_media(1, &[0; MAX_MEDIA_PAYLOAD + 1]),
            Err(MediaError::TooLarge(MAX_MEDIA_FRAME + 1))
        );
        assert_eq!(
            media_allocation(&[0; MAX_MEDIA_FRAME + 1]),
            Err(MediaError::TooLarge(MAX_MEDIA_FRAME + 1))
        );
    }
}
