//! The control stream of a connection: the reader that matches responses to requests by
//! id and turns pushed frames into events, and the writer that coalesces frames.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hush_protocol::{
    DecodeError, Frame, FrameHeader, RequestId, ResponseBody, ServerFrame, HEADER_LEN,
};
use quinn::{ReadExactError, RecvStream, SendStream};
use tokio::sync::{mpsc, oneshot};

use super::connector::close_code;
use super::{Envelope, Event};
use crate::error::ConnectionError;

/// Bytes of queued frames the writer coalesces into one write.
const WRITE_COALESCE: usize = 64 * 1024;

pub(super) type Reply = oneshot::Sender<Result<ResponseBody, ConnectionError>>;

#[derive(Default)]
pub(super) struct Waiting {
    pub(super) replies: HashMap<RequestId, Reply>,
    /// Set once the reader has stopped: later requests fail at once.
    pub(super) closed: bool,
    /// The relay's close code, once closed.
    pub(super) close_code: Option<hush_protocol::ErrorCode>,
}

pub(super) fn lock(waiting: &Mutex<Waiting>) -> MutexGuard<'_, Waiting> {
    // Critical sections are single map operations; a poisoned lock is still consistent.
    waiting.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(super) async fn read_loop(
    mut recv: RecvStream,
    connection: quinn::Connection,
    waiting: Arc<Mutex<Waiting>>,
    events: mpsc::Sender<Event>,
) {
    let mut fatal = None;
    loop {
        match read_frame(&mut recv).await {
            Ok(Some(ServerFrame::Response(response))) => {
                let reply = lock(&waiting).replies.remove(&response.id);
                if let Some(reply) = reply {
                    let _ = reply.send(response.result.map_err(ConnectionError::Refused));
                }
            }
            Ok(Some(ServerFrame::RateLimited(limited))) => {
                let reply = lock(&waiting).replies.remove(&limited.id);
                if let Some(reply) = reply {
                    let retry_after = Duration::from_millis(u64::from(limited.retry_after_ms));
                    let _ = reply.send(Err(ConnectionError::RateLimited { retry_after }));
                }
            }
            Ok(Some(ServerFrame::Deliver(deliver))) => {
                let envelope = Envelope {
                    id: deliver.id,
                    received_at: deliver.received_at,
                    payload: deliver.payload,
                };
                if events.send(Event::Envelope(envelope)).await.is_err() {
                    break;
                }
            }
            Ok(Some(ServerFrame::Drained)) => {
                let _ = events.send(Event::Drained).await;
            }
            Ok(Some(ServerFrame::LowPrekeys(low))) => {
                let event = Event::LowPrekeys {
                    one_time: low.one_time,
                    kem_one_time: low.kem_one_time,
                };
                let _ = events.send(event).await;
            }
            Ok(Some(ServerFrame::ProvisioningMessage(message))) => {
                let _ = events.send(Event::Provisioning(message.payload)).await;
            }
            Ok(Some(ServerFrame::CallEnded(ended))) => {
                let event = Event::CallEnded {
                    allocation: ended.allocation,
                    cause: ended.cause,
                };
                let _ = events.send(event).await;
            }
            Ok(Some(ServerFrame::Fatal(f))) => fatal = Some(f.code),
            Ok(Some(ServerFrame::HelloOk(_)) | None) | Err(_) => break,
        }
    }
    // Wait briefly for the close frame so that its code can be reported.
    let _ = tokio::time::timeout(Duration::from_millis(500), connection.closed()).await;
    let code = close_code(&connection).or(fatal);
    let replies = {
        let mut waiting = lock(&waiting);
        waiting.closed = true;
        waiting.close_code = code;
        std::mem::take(&mut waiting.replies)
    };
    for (_, reply) in replies {
        let _ = reply.send(Err(ConnectionError::Closed(code)));
    }
    let _ = events.send(Event::Closed(code)).await;
}

pub(super) async fn write_loop(mut send: SendStream, mut frames: mpsc::Receiver<Vec<u8>>) {
    while let Some(mut buffer) = frames.recv().await {
        while buffer.len() < WRITE_COALESCE {
            match frames.try_recv() {
                Ok(more) => buffer.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if send.write_all(&buffer).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

/// Reads one server frame; `None` at the end of the stream or connection.
pub(super) async fn read_frame(
    recv: &mut RecvStream,
) -> Result<Option<ServerFrame>, ConnectionError> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0) | ReadExactError::ReadError(_)) => return Ok(None),
        Err(ReadExactError::FinishedEarly(_)) => return Err(DecodeError::Truncated.into()),
    }
    let header = FrameHeader::parse::<ServerFrame>(header)?;
    let mut body = vec![0u8; header.body_len];
    match recv.read_exact(&mut body).await {
        Ok(()) => Ok(Some(ServerFrame::decode_body(header.kind, &body)?)),
        Err(ReadExactError::FinishedEarly(_)) => Err(DecodeError::Truncated.into()),
        Err(ReadExactError::ReadError(_)) => Ok(None),
    }
}
