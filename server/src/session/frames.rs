//! Reading client frames off the control stream, with the deadline a begun frame has.

use std::time::Duration;

use hush_protocol::{ClientFrame, DecodeError, ErrorCode, Frame, FrameHeader, HEADER_LEN};
use quinn::{ReadExactError, RecvStream};

use super::End;

/// Reading a frame failed.
pub(super) enum ReadFailure {
    Decode(DecodeError),
    /// The frame began but its rest did not arrive within the frame deadline.
    Stalled,
    Gone,
}

impl From<ReadFailure> for End {
    fn from(f: ReadFailure) -> Self {
        match f {
            ReadFailure::Decode(e) => e.into(),
            ReadFailure::Stalled => End::Close(ErrorCode::FrameTimeout),
            ReadFailure::Gone => End::Peer,
        }
    }
}

/// Reads one client frame: `None` at a clean end of stream. The body buffer is allocated
/// only after the header passed its kind's size limit. Waiting for a frame's first byte
/// has no deadline (a quiet device waits for pushes; the idle timeout covers a dead one);
/// once it has come, the rest must follow within `rest_within`, so a half-sent frame
/// cannot pin its buffer.
pub(super) async fn read_frame(
    recv: &mut RecvStream,
    rest_within: Duration,
) -> Result<Option<ClientFrame>, ReadFailure> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header[..1]).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(_)) => return Ok(None),
        Err(ReadExactError::ReadError(_)) => return Err(ReadFailure::Gone),
    }
    tokio::time::timeout(rest_within, read_rest_of_frame(recv, header))
        .await
        .map_err(|_| ReadFailure::Stalled)?
}

async fn read_rest_of_frame(
    recv: &mut RecvStream,
    mut header: [u8; HEADER_LEN],
) -> Result<Option<ClientFrame>, ReadFailure> {
    match recv.read_exact(&mut header[1..]).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(_)) => {
            return Err(ReadFailure::Decode(DecodeError::Truncated))
        }
        Err(ReadExactError::ReadError(_)) => return Err(ReadFailure::Gone),
    }
    let header = FrameHeader::parse::<ClientFrame>(header).map_err(ReadFailure::Decode)?;
    let mut body = vec![0u8; header.body_len];
    match recv.read_exact(&mut body).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(_)) => {
            return Err(ReadFailure::Decode(DecodeError::Truncated))
        }
        Err(ReadExactError::ReadError(_)) => return Err(ReadFailure::Gone),
    }
    ClientFrame::decode_body(header.kind, &body)
        .map(Some)
        .map_err(ReadFailure::Decode)
}
