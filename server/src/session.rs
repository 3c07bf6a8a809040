//! One connected device: the handshake, authentication, the request loop, the writer that
//! owns the stream's send half, and the delivery loop that pushes its mailbox.
//!
//! Protocol violations (a frame that does not decode, a request before authentication, a
//! bad signature, a second `Hello`) end the connection: the relay sends a `Fatal` frame
//! and closes with the same error code. Refusals of a well-formed request (unknown
//! account, unknown envelope, device limit) are answered with an error response and the
//! connection carries on, because honest clients meet them too.

use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::{Signature, VerifyingKey};
use hush_protocol::auth::{auth_transcript, register_transcript, EXPORTER_LABEL, EXPORTER_LEN};
use hush_protocol::{
    encode_frame, AccountId, ClientFrame, DecodeError, Deliver, DeviceAddress, DeviceId, ErrorCode,
    Fatal, Frame, FrameHeader, HelloOk, LowPrekeys, Request, RequestBody, RequestId, Response,
    ResponseBody, ServerFrame, HEADER_LEN, SUPPORTED_VERSIONS,
};
use quinn::{ReadExactError, RecvStream, SendStream, VarInt};
use rand_core::{OsRng, RngCore};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::commit::CommitError;
use crate::mailbox::DeviceLink;
use crate::metrics::Metrics;
use crate::relay::Shared;
use crate::store::{Outcome, PrekeyCounts, Refusal, Write, WriteResult};

/// How long a client has to complete the QUIC handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to open its control stream and say `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Encoded frames waiting for the writer; bounds a connection's memory.
const OUTBOX_DEPTH: usize = 128;
/// Envelopes read from the store per delivery round.
const DELIVERY_BATCH: usize = 128;
/// How long in-flight requests get to finish when a connection ends.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the writer gets to flush the last frames before the connection is closed.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// Bytes of queued frames the writer coalesces into one write.
const WRITE_COALESCE: usize = 64 * 1024;

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client finished its stream or closed the connection.
    Peer,
    /// The relay ends the connection with this code.
    Close(ErrorCode),
}

impl From<DecodeError> for End {
    fn from(e: DecodeError) -> Self {
        End::Close(e.code())
    }
}

/// Reading a frame failed.
enum ReadFailure {
    Decode(DecodeError),
    Gone,
}

impl From<ReadFailure> for End {
    fn from(f: ReadFailure) -> Self {
        match f {
            ReadFailure::Decode(e) => e.into(),
            ReadFailure::Gone => End::Peer,
        }
    }
}

/// Serves one incoming connection until it ends.
pub(crate) async fn run(
    incoming: quinn::Incoming,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    _connection_slot: OwnedSemaphorePermit,
) {
    let Ok(Ok(connection)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await else {
        Metrics::inc(&shared.metrics.handshake_failures);
        return;
    };
    Metrics::inc(&shared.metrics.connections_opened);
    let number = shared.hub.connection_number();
    let stream = tokio::time::timeout(HELLO_TIMEOUT, connection.accept_bi()).await;
    let Ok(Ok((send, mut recv))) = stream else {
        connection.close(code_of(ErrorCode::HelloRequired), b"HelloRequired");
        return;
    };

    let (outbox, frames) = mpsc::channel(OUTBOX_DEPTH);
    let writer = tokio::spawn(write_loop(send, frames));
    let mut session = Session {
        connection: connection.clone(),
        shared: shared.clone(),
        number,
        outbox,
        device: None,
        in_flight: Arc::new(Semaphore::new(shared.config.limits.max_in_flight_requests)),
        challenge: random_challenge(),
    };
    let end = session.serve(&mut recv, shutdown).await;
    session.finish(end, writer).await;
    tracing::debug!(connection = number, end = ?end, "connection ended");
}

fn random_challenge() -> [u8; 32] {
    let mut challenge = [0u8; 32];
    OsRng.fill_bytes(&mut challenge);
    challenge
}

fn code_of(code: ErrorCode) -> VarInt {
    VarInt::from_u32(u32::from(code.as_u16()))
}

struct Attached {
    address: DeviceAddress,
    link: DeviceLink,
    delivery: JoinHandle<()>,
}

struct Session {
    connection: quinn::Connection,
    shared: Arc<Shared>,
    number: u64,
    outbox: mpsc::Sender<Vec<u8>>,
    device: Option<Attached>,
    in_flight: Arc<Semaphore>,
    challenge: [u8; 32],
}

impl Session {
    async fn serve(&mut self, recv: &mut RecvStream, mut shutdown: watch::Receiver<bool>) -> End {
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_frame(recv)).await {
            Ok(Ok(Some(ClientFrame::Hello(hello)))) => hello,
            Ok(Ok(Some(ClientFrame::Request(_)))) | Err(_) => {
                return End::Close(ErrorCode::HelloRequired)
            }
            Ok(Ok(None)) => return End::Peer,
            Ok(Err(failure)) => return failure.into(),
        };
        let Some(version) = SUPPORTED_VERSIONS.negotiate(hello.versions) else {
            return End::Close(ErrorCode::UnsupportedVersion);
        };
        self.send(&ServerFrame::HelloOk(HelloOk {
            version,
            challenge: self.challenge,
        }))
        .await;

        loop {
            let evicted = async {
                match &self.device {
                    Some(device) => device.link.evicted.notified().await,
                    None => std::future::pending().await,
                }
            };
            let frame = tokio::select! {
                biased;
                _ = shutdown.changed() => return End::Close(ErrorCode::ShuttingDown),
                () = evicted => return End::Close(ErrorCode::ConnectionReplaced),
                frame = read_frame(recv) => frame,
            };
            match frame {
                Ok(Some(ClientFrame::Request(request))) => {
                    if let Err(end) = self.handle(request).await {
                        return end;
                    }
                }
                Ok(Some(ClientFrame::Hello(_))) => return End::Close(ErrorCode::HelloRequired),
                Ok(None) => return End::Peer,
                Err(failure) => return failure.into(),
            }
        }
    }

    async fn handle(&mut self, request: Request) -> Result<(), End> {
        let Request { id, body } = request;
        let Some(address) = self.device.as_ref().map(|d| d.address) else {
            return match body {
                RequestBody::Register(register) => self.register(id, register).await,
                RequestBody::Authenticate(auth) => self.authenticate(id, auth).await,
                _ => Err(End::Close(ErrorCode::NotAuthenticated)),
            };
        };
        let config = &self.shared.config;
        let write = match body {
            RequestBody::AddDevice(add) => Write::AddDevice {
                account: address.account,
                device_key: add.device_key,
                max_devices: config.max_devices_per_account,
            },
            RequestBody::RemoveDevice(remove) => Write::RemoveDevice {
                address: DeviceAddress {
                    account: address.account,
                    device: remove.device,
                },
            },
            RequestBody::UploadPrekeys(upload) => Write::UploadPrekeys { address, upload },
            RequestBody::FetchPrekeys(fetch) => Write::TakePrekeys {
                account: fetch.account,
                device: fetch.device,
                low_threshold: config.low_prekey_threshold,
            },
            RequestBody::Send(send) => {
                let now = self.shared.clock.now();
                Write::Enqueue {
                    envelopes: send.envelopes,
                    received_at: now,
                    expires_at: now.saturating_add(config.message_expiry_secs()),
                }
            }
            RequestBody::Ack(ack) => Write::Ack {
                address,
                ids: ack.ids,
            },
            RequestBody::Register(_) | RequestBody::Authenticate(_) => {
                self.respond(id, Err(ErrorCode::AlreadyAuthenticated)).await;
                return Ok(());
            }
        };

        // The permit bounds this connection's concurrent requests; waiting for it stops
        // the read loop, which pushes back on the client through QUIC flow control.
        let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
            return Err(End::Close(ErrorCode::ShuttingDown));
        };
        // Submitted from the read loop, so writes reach the committer in the order the
        // client sent them; only the wait for the fsync runs concurrently.
        let pending = self.shared.committer.submit(write).await;
        let shared = self.shared.clone();
        let outbox = self.outbox.clone();
        tokio::spawn(async move {
            let result = respond_to_write(&shared, pending.outcome().await);
            let frame = encode_frame(&ServerFrame::Response(Response { id, result }));
            let _ = outbox.send(frame).await;
            drop(permit);
        });
        Ok(())
    }

    async fn register(
        &mut self,
        id: RequestId,
        register: hush_protocol::Register,
    ) -> Result<(), End> {
        let exporter = self.exporter()?;
        let transcript = register_transcript(
            &exporter,
            &self.challenge,
            &register.identity_key,
            &register.device_key,
        );
        if !verify(&register.device_key, &transcript, &register.signature.0) {
            return Err(End::Close(ErrorCode::AuthenticationFailed));
        }
        let mut account = AccountId([0; 16]);
        OsRng.fill_bytes(&mut account.0);
        let write = Write::Register {
            account,
            identity_key: register.identity_key,
            device_key: register.device_key,
            invite: register.invite,
            require_invite: self.shared.config.registration
                == crate::config::RegistrationPolicy::Invite,
        };
        match self.shared.committer.commit(write).await {
            Ok(Ok(_)) => {
                Metrics::inc(&self.shared.metrics.registrations);
                let address = DeviceAddress {
                    account,
                    device: DeviceId::PRIMARY,
                };
                self.respond(id, Ok(ResponseBody::Registered { address }))
                    .await;
                self.attach(address);
            }
            Ok(Err(refusal)) => self.respond(id, Err(refusal.code())).await,
            Err(e) => self.respond(id, Err(commit_error_code(e))).await,
        }
        Ok(())
    }

    async fn authenticate(
        &mut self,
        id: RequestId,
        auth: hush_protocol::Authenticate,
    ) -> Result<(), End> {
        let exporter = self.exporter()?;
        let store = self.shared.store.clone();
        let address = auth.address;
        let key = tokio::task::spawn_blocking(move || store.device_key(&address)).await;
        let key = match key {
            Ok(Ok(key)) => key,
            Ok(Err(error)) => {
                tracing::error!(%error, "reading a device key failed");
                self.respond(id, Err(ErrorCode::StorageFailure)).await;
                return Ok(());
            }
            Err(_) => return Err(End::Close(ErrorCode::Internal)),
        };
        // An unknown device and a wrong signature look the same from outside, so that the
        // relay does not confirm which devices exist.
        let transcript = auth_transcript(&exporter, &self.challenge, &address);
        let valid = key.is_some_and(|key| verify(&key, &transcript, &auth.signature.0));
        if !valid {
            return Err(End::Close(ErrorCode::AuthenticationFailed));
        }
        Metrics::inc(&self.shared.metrics.authentications);
        self.respond(id, Ok(ResponseBody::Authenticated)).await;
        self.attach(address);
        Ok(())
    }

    /// Makes this connection the device's live one and starts pushing its mailbox.
    fn attach(&mut self, address: DeviceAddress) {
        let link = self
            .shared
            .hub
            .attach(address, self.number, self.outbox.clone());
        let delivery = tokio::spawn(deliver_loop(
            self.shared.clone(),
            address,
            link.clone(),
            self.outbox.clone(),
        ));
        self.device = Some(Attached {
            address,
            link,
            delivery,
        });
    }

    fn exporter(&self) -> Result<[u8; EXPORTER_LEN], End> {
        let mut exporter = [0u8; EXPORTER_LEN];
        self.connection
            .export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
            .map_err(|_| End::Close(ErrorCode::Internal))?;
        Ok(exporter)
    }

    async fn send(&self, frame: &ServerFrame) {
        let _ = self.outbox.send(encode_frame(frame)).await;
    }

    async fn respond(&self, id: RequestId, result: Result<ResponseBody, ErrorCode>) {
        self.send(&ServerFrame::Response(Response { id, result }))
            .await;
    }

    /// Lets started requests finish (their commits are answered), stops delivery, tells the
    /// client why, flushes, and closes.
    async fn finish(mut self, end: End, writer: JoinHandle<()>) {
        let all =
            u32::try_from(self.shared.config.limits.max_in_flight_requests).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, self.in_flight.acquire_many(all)).await;
        if let Some(device) = self.device.take() {
            device.delivery.abort();
            let _ = device.delivery.await;
            self.shared.hub.detach(&device.address, self.number);
        }
        let (code, reason) = match end {
            End::Peer => (VarInt::from_u32(0), "bye"),
            End::Close(code) => {
                self.shared.metrics.closed_with(code);
                tracing::debug!(
                    connection = self.number,
                    code = code.description(),
                    "closing connection"
                );
                let fatal = Fatal {
                    code,
                    supported_versions: SUPPORTED_VERSIONS,
                };
                self.send(&ServerFrame::Fatal(fatal)).await;
                (code_of(code), code.description())
            }
        };
        drop(self.outbox);
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, writer).await;
        self.connection.close(code, reason.as_bytes());
    }
}

fn verify(key: &[u8; 32], message: &[u8], signature: &[u8; 64]) -> bool {
    VerifyingKey::from_bytes(key).is_ok_and(|key| {
        key.verify_strict(message, &Signature::from_bytes(signature))
            .is_ok()
    })
}

fn commit_error_code(error: CommitError) -> ErrorCode {
    match error {
        CommitError::Storage => ErrorCode::StorageFailure,
        CommitError::Stopped => ErrorCode::ShuttingDown,
    }
}

/// Turns a committed write into the client's response, waking recipients and telling
/// devices about low prekeys on the way.
fn respond_to_write(
    shared: &Shared,
    outcome: Result<WriteResult, CommitError>,
) -> Result<ResponseBody, ErrorCode> {
    let outcome = outcome.map_err(commit_error_code)?.map_err(Refusal::code)?;
    Ok(match outcome {
        Outcome::Enqueued { recipients } => {
            Metrics::add(&shared.metrics.envelopes_accepted, recipients.len() as u64);
            shared.hub.wake(&recipients);
            ResponseBody::Sent
        }
        Outcome::Acked { unknown: 0 } => ResponseBody::Acked,
        Outcome::Acked { .. } => return Err(ErrorCode::UnknownEnvelope),
        Outcome::Prekeys { bundles, low } => {
            for (address, counts) in low {
                shared.hub.push(&address, low_prekeys_frame(counts));
            }
            ResponseBody::PrekeyBundles(bundles)
        }
        Outcome::PrekeysStored(counts) => ResponseBody::PrekeysStored {
            one_time: counts.one_time,
            kem_one_time: counts.kem_one_time,
        },
        Outcome::DeviceAdded(device) => ResponseBody::DeviceAdded { device },
        Outcome::DeviceRemoved { address } => {
            shared.hub.evict(&address);
            ResponseBody::DeviceRemoved
        }
        Outcome::Registered | Outcome::Expired { .. } | Outcome::InviteAdded => {
            return Err(ErrorCode::Internal)
        }
    })
}

fn low_prekeys_frame(counts: PrekeyCounts) -> Vec<u8> {
    encode_frame(&ServerFrame::LowPrekeys(LowPrekeys {
        one_time: counts.one_time,
        kem_one_time: counts.kem_one_time,
    }))
}

/// Pushes a device's mailbox: first the backlog, in order, then `Drained`, then whatever
/// arrives while it is connected. Reads the store each round, so memory stays flat however
/// far behind the device is.
async fn deliver_loop(
    shared: Arc<Shared>,
    address: DeviceAddress,
    link: DeviceLink,
    outbox: mpsc::Sender<Vec<u8>>,
) {
    let store = shared.store.clone();
    let counts = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.prekey_counts(&address)).await
    };
    if let Ok(Ok(counts)) = counts {
        let threshold = shared.config.low_prekey_threshold;
        if counts.one_time < threshold || counts.kem_one_time < threshold {
            let _ = outbox.send(low_prekeys_frame(counts)).await;
        }
    }

    let mut after = None;
    let mut drained = false;
    loop {
        let now = shared.clock.now();
        let reader = store.clone();
        let batch = tokio::task::spawn_blocking(move || {
            reader.backlog(&address, after, now, DELIVERY_BATCH)
        })
        .await;
        let batch = match batch {
            Ok(Ok(batch)) => batch,
            Ok(Err(error)) => {
                tracing::error!(%error, "reading a mailbox failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(_) => return,
        };
        let more = batch.len() == DELIVERY_BATCH;
        for envelope in batch {
            after = Some(envelope.id);
            let frame = ServerFrame::Deliver(Deliver {
                id: envelope.id,
                received_at: envelope.received_at,
                payload: envelope.payload,
            });
            if outbox.send(encode_frame(&frame)).await.is_err() {
                return;
            }
            Metrics::inc(&shared.metrics.envelopes_delivered);
        }
        if more {
            continue;
        }
        if !drained {
            drained = true;
            if outbox
                .send(encode_frame(&ServerFrame::Drained))
                .await
                .is_err()
            {
                return;
            }
        }
        link.wake.notified().await;
    }
}

/// Owns the send half: writes queued frames, coalescing whatever is ready into one write.
async fn write_loop(mut send: SendStream, mut frames: mpsc::Receiver<Vec<u8>>) {
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
    let _ = send.stopped().await;
}

/// Reads one client frame: `None` at a clean end of stream. The body buffer is allocated
/// only after the header passed its kind's size limit.
async fn read_frame(recv: &mut RecvStream) -> Result<Option<ClientFrame>, ReadFailure> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
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
