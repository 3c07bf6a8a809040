//! One connected device: the handshake, authentication, the request loop, the writer that
//! owns the stream's send half, and the delivery loop that pushes its mailbox.
//!
//! Before authentication a connection may register, authenticate, send sealed envelopes,
//! retract envelopes and open a provisioning address; nothing else.
//!
//! Protocol violations (a frame that does not decode, any other request before
//! authentication, a bad signature, a second `Hello`) end the connection: the relay sends
//! a `Fatal` frame and closes with the same error code. Refusals of a well-formed request (unknown
//! account, unknown envelope, device limit) are answered with an error response and the
//! connection carries on, because honest clients meet them too.

use std::collections::{HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use ed25519_dalek::{Signature, VerifyingKey};
use hush_protocol::auth::{auth_transcript, register_transcript, EXPORTER_LABEL, EXPORTER_LEN};
use hush_protocol::media::{media_allocation, MediaError, MEDIA_HEADER_LEN};
use hush_protocol::sealed::{retract_tag, SenderCertificateBody};
use hush_protocol::{
    encode_frame, AccountId, CallEnded, CallOutcome, CallToken, ClientFrame, DecodeError, Deliver,
    DeviceAddress, DeviceId, EnvelopeId, ErrorCode, Fatal, Frame, FrameHeader, HelloOk, LowPrekeys,
    Provision, ProvisioningMessage, RateLimited, Request, RequestBody, RequestId, Response,
    ResponseBody, Retract, SealedSend, ServerFrame, HEADER_LEN, SUPPORTED_VERSIONS,
};
use quinn::{ReadExactError, RecvStream, SendStream, VarInt};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::task::JoinHandle;

use crate::calls::{Ended, Party, Route};
use crate::commit::{CommitError, Pending};
use crate::mailbox::{DeviceLink, Hub};
use crate::media;
use crate::metrics::Metrics;
use crate::provisioning::ProvisioningError;
use crate::quota::{address_key, AddressSlot, Requester};
use crate::rate::TokenBucket;
use crate::relay::Shared;
use crate::store::{
    AccountView, MailboxQuota, Outcome, PrekeyCounts, Refusal, StoredEnvelope, Write, WriteResult,
};

/// How long a client has to complete the QUIC handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Encoded frames waiting for the writer; bounds a connection's memory.
const OUTBOX_DEPTH: usize = 128;
/// Envelopes read from the store per delivery round.
const DELIVERY_BATCH: usize = 128;
/// How long a `CallEnded` push may wait for room in a party's outbox.
const CALL_END_PUSH_WAIT: Duration = Duration::from_secs(5);
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

/// Serves one incoming connection until it ends.
pub(crate) async fn run(
    incoming: quinn::Incoming,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    _connection_slots: (OwnedSemaphorePermit, AddressSlot),
) {
    let _open = shared.metrics.open_connection();
    let Ok(Ok(connection)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await else {
        Metrics::inc(&shared.metrics.handshake_failures);
        return;
    };
    Metrics::inc(&shared.metrics.connections_opened);
    let number = shared.hub.connection_number();
    // One deadline for opening the control stream and sending `Hello`, not one each.
    let hello_deadline = tokio::time::Instant::now() + shared.config.hello_timeout();
    let stream = tokio::time::timeout_at(hello_deadline, connection.accept_bi()).await;
    let Ok(Ok((send, mut recv))) = stream else {
        shared.metrics.closed_with(ErrorCode::HelloRequired);
        connection.close(code_of(ErrorCode::HelloRequired), b"HelloRequired");
        return;
    };

    let (outbox, frames) = mpsc::channel(OUTBOX_DEPTH);
    let answers = Arc::new(AnswerQueue::default());
    let writer = tokio::spawn(write_loop(send, frames, Answers::new(answers.clone())));
    let envelope_budget = TokenBucket::full(
        shared.config.limits.connection_envelopes,
        shared.clock.now_millis(),
    );
    let mut session = Session {
        peer: address_key(connection.remote_address().ip()),
        envelope_budget,
        connection: connection.clone(),
        shared: shared.clone(),
        number,
        outbox,
        answers,
        device: None,
        provisioning: None,
        calls: Vec::new(),
        in_flight: Arc::new(Semaphore::new(shared.config.limits.max_in_flight_requests)),
        challenge: random_challenge(),
    };
    let end = session.serve(&mut recv, hello_deadline, shutdown).await;
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
    window: Arc<DeliveryWindow>,
    delivery: JoinHandle<()>,
    media: JoinHandle<()>,
}

/// How the call registry reaches a party: its QUIC connection (media datagrams) and its
/// outbox (the `CallEnded` push).
#[derive(Clone)]
pub(crate) struct PartyLink {
    /// The connection's number.
    pub number: u64,
    pub quic: quinn::Connection,
    outbox: mpsc::Sender<Vec<u8>>,
}

/// Carries out an allocation's end: writes its call-detail record through the committer,
/// then tells the parties that did not end it. Returns the commit's outcome.
pub(crate) async fn record_call_end(
    shared: &Shared,
    ended: Ended<PartyLink>,
) -> Result<WriteResult, CommitError> {
    let Ended {
        allocation,
        record,
        notify,
        cause,
    } = ended;
    Metrics::inc(&shared.metrics.calls_ended);
    shared.media.close(allocation);
    let delete_at = record
        .started_at
        .saturating_add(shared.config.cdr_retention_secs());
    let result = shared
        .committer
        .commit(Write::RecordCall { record, delete_at })
        .await;
    if !matches!(result, Ok(Ok(_))) {
        tracing::error!("writing a call-detail record failed");
    }
    // Told after the record is durable, as every answer of the relay is.
    let frame = encode_frame(&ServerFrame::CallEnded(CallEnded { allocation, cause }));
    for party in notify {
        // For a timeout or a vanished peer this push is the party's only end signal, so it
        // must not be lost to a momentarily full outbox (a mailbox drain fills it); it
        // waits, boundedly, off this path.
        let frame = frame.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CALL_END_PUSH_WAIT, party.outbox.send(frame)).await;
        });
    }
    result
}

/// Whether a push found room at once or had to wait for the device (its acks, its reads).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Room {
    AtOnce,
    AfterWaiting,
}

/// Envelopes pushed on this connection and not yet acknowledged, at most
/// `limits.delivery_window` of them.
struct DeliveryWindow {
    permits: Semaphore,
    unacked: std::sync::Mutex<HashSet<EnvelopeId>>,
}

impl DeliveryWindow {
    fn new(size: usize) -> Self {
        DeliveryWindow {
            permits: Semaphore::new(size),
            unacked: std::sync::Mutex::new(HashSet::new()),
        }
    }

    /// Records `id` as in flight, waiting for room first if the window is full; `None`
    /// if the window was closed.
    async fn push(&self, id: EnvelopeId) -> Option<Room> {
        let room = match self.permits.try_acquire() {
            Ok(permit) => {
                permit.forget();
                Room::AtOnce
            }
            Err(TryAcquireError::NoPermits) => {
                self.permits.acquire().await.ok()?.forget();
                Room::AfterWaiting
            }
            Err(TryAcquireError::Closed) => return None,
        };
        if let Ok(mut unacked) = self.unacked.lock() {
            unacked.insert(id);
        }
        Some(room)
    }

    /// Frees the room of the acknowledged ids that were in flight here (ids from another
    /// connection, or acked twice, free nothing).
    fn acked(&self, ids: &[EnvelopeId]) {
        let freed = match self.unacked.lock() {
            Ok(mut unacked) => ids.iter().filter(|id| unacked.remove(id)).count(),
            Err(_) => 0,
        };
        self.permits.add_permits(freed);
    }
}

struct Session {
    /// The source address as rate limits key it; never logged.
    peer: IpAddr,
    /// Envelope copies this connection may still submit (`limits.connection_envelopes`).
    envelope_budget: TokenBucket,
    connection: quinn::Connection,
    shared: Arc<Shared>,
    number: u64,
    outbox: mpsc::Sender<Vec<u8>>,
    /// Writes awaiting their commits, for the writer to answer in order.
    answers: Arc<AnswerQueue>,
    device: Option<Attached>,
    /// The provisioning address this connection opened, if any (at most one, ever).
    provisioning: Option<[u8; 16]>,
    /// Call allocations this connection is (or was) a party of; ended when it closes.
    calls: Vec<u32>,
    in_flight: Arc<Semaphore>,
    challenge: [u8; 32],
}

impl Session {
    async fn serve(
        &mut self,
        recv: &mut RecvStream,
        hello_deadline: tokio::time::Instant,
        mut shutdown: watch::Receiver<bool>,
    ) -> End {
        let rest_within = self.shared.config.frame_read_timeout();
        let hello =
            match tokio::time::timeout_at(hello_deadline, read_frame(recv, rest_within)).await {
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
                frame = read_frame(recv, rest_within) => frame,
            };
            match frame {
                Ok(Some(ClientFrame::Request(request))) => {
                    // Boxed: handling a request needs far more state than waiting for
                    // one, and an idle connection should not carry it.
                    if let Err(end) = Box::pin(self.handle(request)).await {
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
            return self.handle_anonymous(id, body).await;
        };
        let shared = self.shared.clone();
        let config = &shared.config;
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
            RequestBody::FetchPrekeys(fetch) => {
                if let Err(wait) = self.charge_prekey_fetch(Requester::Account(address.account)) {
                    self.rate_limited(id, wait).await;
                    return Ok(());
                }
                Write::TakePrekeys {
                    account: fetch.account,
                    device: fetch.device,
                    low_threshold: config.low_prekey_threshold,
                }
            }
            RequestBody::Send(send) => {
                let copies = send.envelopes.iter().map(|e| e.recipients.len()).sum();
                if let Err(wait) = self.charge_envelopes(Some(address.account), copies) {
                    self.rate_limited(id, wait).await;
                    return Ok(());
                }
                let now = self.shared.clock.now();
                Write::Enqueue {
                    envelopes: send.envelopes,
                    quota: self.mailbox_quota(),
                    received_at: now,
                    expires_at: now.saturating_add(config.message_expiry_secs()),
                }
            }
            RequestBody::Ack(ack) => {
                if let Some(device) = &self.device {
                    device.window.acked(&ack.ids);
                }
                Write::Ack {
                    address,
                    ids: ack.ids,
                }
            }
            RequestBody::SealedSend(send) => {
                if let Err(wait) =
                    self.charge_envelopes(Some(address.account), sealed_copies(&send))
                {
                    self.rate_limited(id, wait).await;
                    return Ok(());
                }
                self.sealed_write(send)
            }
            RequestBody::Retract(retract) => retract_write(&retract),
            RequestBody::SetDeliveryAccess(set) => Write::SetDeliveryAccess {
                account: address.account,
                // Only the hash is kept: a stolen database does not hand out tokens.
                token_hash: set.token.map(|token| Sha256::digest(token).into()),
                allow_unknown_senders: set.allow_unknown_senders,
            },
            RequestBody::GetSenderCertificate => return self.sender_certificate(id, address).await,
            RequestBody::ListDevices(list) => return self.list_devices(id, list.account).await,
            RequestBody::Provision(provision) => {
                self.provision(id, provision).await;
                return Ok(());
            }
            RequestBody::AllocateCall(allocate) => {
                return self.allocate_call(id, address, allocate.callee).await
            }
            RequestBody::JoinCall(join) => {
                self.join_call(id, address, join.allocation, join.token)
                    .await;
                return Ok(());
            }
            RequestBody::EndCall(end) => {
                return self.end_call(id, end.allocation, end.outcome).await
            }
            RequestBody::Register(_)
            | RequestBody::Authenticate(_)
            | RequestBody::OpenProvisioning => {
                self.respond(id, Err(ErrorCode::AlreadyAuthenticated)).await;
                return Ok(());
            }
        };
        self.submit(id, write).await
    }

    /// Requests on a connection that has said `Hello` but not authenticated: registration,
    /// authentication, and what needs no identity (sealed sends, retraction, provisioning).
    async fn handle_anonymous(&mut self, id: RequestId, body: RequestBody) -> Result<(), End> {
        match body {
            RequestBody::Register(register) => {
                // Checked before the signature, which costs more than the check.
                let now = self.shared.clock.now_millis();
                if let Err(wait) = self.shared.quotas.registrations.take(&self.peer, 1, now) {
                    Metrics::inc(&self.shared.metrics.rate_limited_registrations);
                    self.rate_limited(id, wait).await;
                    return Ok(());
                }
                self.register(id, register).await
            }
            RequestBody::Authenticate(auth) => self.authenticate(id, auth).await,
            RequestBody::SealedSend(send) => {
                if let Err(wait) = self.charge_envelopes(None, sealed_copies(&send)) {
                    self.rate_limited(id, wait).await;
                    return Ok(());
                }
                let write = self.sealed_write(send);
                self.submit(id, write).await
            }
            RequestBody::Retract(retract) => self.submit(id, retract_write(&retract)).await,
            // A sealed sender sets up sessions without saying who it is: with the
            // recipient's delivery token (or where the recipient admits anyone).
            RequestBody::FetchPrekeys(fetch) => {
                if let Err(wait) = self.charge_prekey_fetch(Requester::Address(self.peer)) {
                    self.rate_limited(id, wait).await;
                    return Ok(());
                }
                if !self.admitted(fetch.account, fetch.access).await? {
                    self.respond(id, Err(ErrorCode::DeliveryRefused)).await;
                    return Ok(());
                }
                let write = Write::TakePrekeys {
                    account: fetch.account,
                    device: fetch.device,
                    low_threshold: self.shared.config.low_prekey_threshold,
                };
                self.submit(id, write).await
            }
            RequestBody::ListDevices(list) => {
                if !self.admitted(list.account, list.access).await? {
                    self.respond(id, Err(ErrorCode::DeliveryRefused)).await;
                    return Ok(());
                }
                self.list_devices(id, list.account).await
            }
            RequestBody::OpenProvisioning => {
                self.open_provisioning(id).await;
                Ok(())
            }
            _ => Err(End::Close(ErrorCode::NotAuthenticated)),
        }
    }

    fn sealed_write(&self, send: SealedSend) -> Write {
        let now = self.shared.clock.now();
        Write::SealedEnqueue {
            envelopes: send.envelopes,
            quota: self.mailbox_quota(),
            received_at: now,
            expires_at: now.saturating_add(self.shared.config.message_expiry_secs()),
        }
    }

    fn mailbox_quota(&self) -> MailboxQuota {
        let limits = &self.shared.config.limits;
        MailboxQuota {
            max_envelopes: limits.mailbox_max_envelopes,
            max_bytes: limits.mailbox_max_bytes,
        }
    }

    /// Charges `copies` envelope copies to this connection, and to the sending account
    /// (or, on an anonymous connection, to its source address). On refusal, nothing stays
    /// charged and the answer is how long to wait, in milliseconds.
    fn charge_envelopes(&mut self, account: Option<AccountId>, copies: usize) -> Result<(), u32> {
        let copies = u32::try_from(copies).unwrap_or(u32::MAX);
        let limits = &self.shared.config.limits;
        let quotas = &self.shared.quotas;
        let metrics = &self.shared.metrics;
        let now = self.shared.clock.now_millis();
        if let Err(wait) = self
            .envelope_budget
            .take(limits.connection_envelopes, copies, now)
        {
            Metrics::inc(&metrics.rate_limited_connection_envelopes);
            return Err(wait);
        }
        let shared: Result<(), (u32, &AtomicU64)> = match account {
            Some(account) => quotas
                .account_envelopes
                .take(&account, copies, now)
                .map_err(|wait| (wait, &metrics.rate_limited_account_envelopes)),
            None => quotas
                .address_sealed_sends
                .take(&self.peer, copies, now)
                .map_err(|wait| (wait, &metrics.rate_limited_address_sealed_sends)),
        };
        shared.map_err(|(wait, refused)| {
            self.envelope_budget
                .refund(limits.connection_envelopes, copies);
            Metrics::inc(refused);
            wait
        })
    }

    /// Charges one prekey fetch to `requester`.
    fn charge_prekey_fetch(&self, requester: Requester) -> Result<(), u32> {
        let now = self.shared.clock.now_millis();
        self.shared
            .quotas
            .prekey_fetches
            .take(&requester, 1, now)
            .inspect_err(|_| Metrics::inc(&self.shared.metrics.rate_limited_prekey_fetches))
    }

    /// Answers a request that a rate limit refused.
    async fn rate_limited(&self, id: RequestId, retry_after_ms: u32) {
        self.send(&ServerFrame::RateLimited(RateLimited {
            id,
            retry_after_ms,
        }))
        .await;
    }

    /// Hands a write to the committer and answers once it is durable.
    async fn submit(&self, id: RequestId, write: Write) -> Result<(), End> {
        // The permit bounds this connection's concurrent requests; waiting for it stops
        // the read loop, which pushes back on the client through QUIC flow control.
        let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
            return Err(End::Close(ErrorCode::ShuttingDown));
        };
        // Submitted from the read loop, so writes reach the committer in the order the
        // client sent them; the writer answers them as their commits become durable.
        let pending = self.shared.committer.submit(write).await;
        self.answers.push(Answer {
            id,
            pending,
            _permit: permit,
        });
        Ok(())
    }

    /// Reads an account's identity key and devices: `UnknownAccount` if there is none,
    /// `StorageFailure` if the read failed.
    async fn read_account(
        &self,
        account: AccountId,
    ) -> Result<Result<AccountView, ErrorCode>, End> {
        let store = self.shared.store.clone();
        match tokio::task::spawn_blocking(move || store.account(&account)).await {
            Ok(Ok(view)) => Ok(view.ok_or(ErrorCode::UnknownAccount)),
            Ok(Err(error)) => {
                tracing::error!(%error, "reading an account failed");
                Ok(Err(ErrorCode::StorageFailure))
            }
            Err(_) => Err(End::Close(ErrorCode::Internal)),
        }
    }

    /// Whether an anonymous caller with `token` may reach `account`.
    async fn admitted(&self, account: AccountId, token: Option<[u8; 16]>) -> Result<bool, End> {
        let store = self.shared.store.clone();
        match tokio::task::spawn_blocking(move || store.admits(&account, token.as_ref())).await {
            Ok(Ok(admitted)) => Ok(admitted),
            Ok(Err(error)) => {
                tracing::error!(%error, "reading delivery access failed");
                Ok(false)
            }
            Err(_) => Err(End::Close(ErrorCode::Internal)),
        }
    }

    /// Issues a sender certificate for this connection's device.
    async fn sender_certificate(&self, id: RequestId, address: DeviceAddress) -> Result<(), End> {
        let result = self.read_account(address.account).await?.map(|view| {
            let body = SenderCertificateBody {
                account: address.account,
                device: address.device,
                identity_key: view.identity_key,
                expires_at: self
                    .shared
                    .clock
                    .now()
                    .saturating_add(self.shared.config.sender_certificate_secs()),
            };
            Metrics::inc(&self.shared.metrics.sender_certificates);
            ResponseBody::SenderCertificate {
                certificate: self.shared.sender_key.issue(&body),
                relay_key: self.shared.sender_key.public_key(),
            }
        });
        self.respond(id, result).await;
        Ok(())
    }

    /// Answers with an account's current devices; consumes nothing.
    async fn list_devices(&self, id: RequestId, account: AccountId) -> Result<(), End> {
        let result = self
            .read_account(account)
            .await?
            .map(|view| ResponseBody::Devices {
                devices: view.devices,
            });
        self.respond(id, result).await;
        Ok(())
    }

    fn party(&self) -> Party<PartyLink> {
        Party {
            connection: self.number,
            link: PartyLink {
                number: self.number,
                quic: self.connection.clone(),
                outbox: self.outbox.clone(),
            },
        }
    }

    /// Remembers a call this connection is a party of, forgetting ended ones.
    fn track_call(&mut self, allocation: u32) {
        let calls = &self.shared.calls;
        let number = self.number;
        self.calls.retain(|&a| calls.is_party(a, number));
        self.calls.push(allocation);
    }

    /// Makes a call allocation to `callee`, which must be an existing account.
    async fn allocate_call(
        &mut self,
        id: RequestId,
        caller: DeviceAddress,
        callee: AccountId,
    ) -> Result<(), End> {
        if let Err(code) = self.read_account(callee).await? {
            self.respond(id, Err(code)).await;
            return Ok(());
        }
        let now = self.shared.clock.now();
        let party = self.party();
        let result = match self
            .shared
            .calls
            .allocate(caller.account, party, callee, now)
        {
            Ok(allocated) => {
                Metrics::inc(&self.shared.metrics.calls_allocated);
                self.track_call(allocated.allocation);
                Ok(ResponseBody::CallAllocated {
                    allocation: allocated.allocation,
                    token: CallToken(allocated.token),
                    call_id: allocated.call_id,
                    media: self.shared.media.open(allocated.allocation, self.number),
                })
            }
            Err(error) => Err(error.code()),
        };
        self.respond(id, result).await;
        Ok(())
    }

    /// Joins an allocation as the callee.
    async fn join_call(
        &mut self,
        id: RequestId,
        address: DeviceAddress,
        allocation: u32,
        token: CallToken,
    ) {
        let now = self.shared.clock.now();
        let party = self.party();
        let joined = self
            .shared
            .calls
            .join(allocation, &token.0, address.account, party, now);
        let result = match joined {
            Ok(()) => {
                self.track_call(allocation);
                Ok(ResponseBody::CallJoined {
                    media: self.shared.media.open(allocation, self.number),
                })
            }
            Err(error) => Err(error.code()),
        };
        self.respond(id, result).await;
    }

    /// Ends an allocation this connection is a party of; answers once the call-detail
    /// record is durable.
    async fn end_call(
        &mut self,
        id: RequestId,
        allocation: u32,
        hint: CallOutcome,
    ) -> Result<(), End> {
        let now = self.shared.clock.now();
        let ended = self
            .shared
            .calls
            .hang_up(allocation, self.number, hint, now);
        match ended {
            Ok(ended) => {
                let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
                    return Err(End::Close(ErrorCode::ShuttingDown));
                };
                let shared = self.shared.clone();
                let outbox = self.outbox.clone();
                tokio::spawn(async move {
                    let outcome = record_call_end(&shared, ended).await;
                    let result = respond_to_write(outcome);
                    let frame = encode_frame(&ServerFrame::Response(Response { id, result }));
                    let _ = outbox.send(frame).await;
                    drop(permit);
                });
            }
            Err(error) => {
                self.respond(id, Err(error.code())).await;
            }
        }
        Ok(())
    }

    /// Opens this connection's provisioning address.
    async fn open_provisioning(&mut self, id: RequestId) {
        if self.provisioning.is_some() {
            self.respond(id, Err(ErrorCode::NotPermitted)).await;
            return;
        }
        let now = self.shared.clock.now();
        let opened = self
            .shared
            .provisioning
            .open(self.number, self.outbox.clone(), now);
        let result = match opened {
            Ok(address) => {
                self.provisioning = Some(address);
                Ok(ResponseBody::ProvisioningOpened { address })
            }
            Err(ProvisioningError::Full) => Err(ErrorCode::Overloaded),
        };
        self.respond(id, result).await;
    }

    /// Pushes a provisioning message to the connection waiting at its address.
    async fn provision(&self, id: RequestId, provision: Provision) {
        let now = self.shared.clock.now();
        let waiting = self.shared.provisioning.take(&provision.address, now);
        let frame = encode_frame(&ServerFrame::ProvisioningMessage(ProvisioningMessage {
            payload: provision.payload,
        }));
        // The waiting connection has sent nothing but Hello and OpenProvisioning, so its
        // outbox has room; if it is gone, the address is as good as unknown.
        let result = match waiting.map(|outbox| outbox.try_send(frame)) {
            Some(Ok(())) => {
                Metrics::inc(&self.shared.metrics.provisioning_messages);
                Ok(ResponseBody::Provisioned)
            }
            Some(Err(_)) | None => Err(ErrorCode::UnknownProvisioningAddress),
        };
        self.respond(id, result).await;
    }

    fn close_provisioning(&mut self) {
        if let Some(address) = self.provisioning {
            self.shared.provisioning.close(&address, self.number);
        }
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
        // An authenticated connection is no longer a new device waiting to be provisioned.
        self.close_provisioning();
        let link = self
            .shared
            .hub
            .attach(address, self.number, self.outbox.clone());
        let window = Arc::new(DeliveryWindow::new(
            self.shared.config.limits.delivery_window,
        ));
        let delivery = tokio::spawn(deliver_loop(
            self.shared.clone(),
            address,
            link.clone(),
            window.clone(),
            self.outbox.clone(),
        ));
        let media = tokio::spawn(media_loop(
            self.shared.clone(),
            self.number,
            self.connection.clone(),
        ));
        self.device = Some(Attached {
            address,
            link,
            window,
            delivery,
            media,
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
        // A call ends when its connection did, not after the drain below.
        let ended_at = self.shared.clock.now();
        let all =
            u32::try_from(self.shared.config.limits.max_in_flight_requests).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, self.in_flight.acquire_many(all)).await;
        if let Some(device) = self.device.take() {
            device.delivery.abort();
            device.media.abort();
            let _ = device.delivery.await;
            let _ = device.media.await;
            self.shared.hub.detach(&device.address, self.number);
        }
        // Calls this connection is still a party of end with it, each with its record.
        for allocation in std::mem::take(&mut self.calls) {
            if let Some(ended) =
                self.shared
                    .calls
                    .connection_closed(allocation, self.number, ended_at)
            {
                let _ = record_call_end(&self.shared, ended).await;
            }
        }
        // The registry holds a sender of this connection's outbox: release it, or the
        // writer below would not see the outbox close.
        self.close_provisioning();
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
                // A client that stopped reading could keep the outbox full for good.
                let fatal = encode_frame(&ServerFrame::Fatal(fatal));
                let _ = tokio::time::timeout(FLUSH_TIMEOUT, self.outbox.send(fatal)).await;
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

/// What a commit's writes cause besides their answers: recipients woken, devices told of
/// low prekeys, a removed device's connection evicted, counters. Runs on the commit thread
/// as soon as the commit is durable, so none of it waits for, or is lost with, the
/// connection that submitted the write.
pub(crate) fn after_commit(hub: &Hub, metrics: &Metrics, results: &mut [WriteResult]) {
    let mut fresh = Vec::new();
    for result in results.iter_mut() {
        match result {
            Ok(Outcome::Enqueued {
                recipients,
                fresh: envelopes,
            }) => {
                Metrics::add(&metrics.envelopes_accepted, recipients.len() as u64);
                // The sender's answer needs none of them.
                fresh.append(envelopes);
            }
            Ok(Outcome::Prekeys { low, .. }) => {
                for (address, counts) in low {
                    hub.push(address, low_prekeys_frame(*counts));
                }
            }
            Ok(Outcome::DeviceRemoved { address }) => hub.evict(address),
            Ok(Outcome::Retracted { count }) => {
                Metrics::add(&metrics.envelopes_retracted, u64::from(*count));
                if *count > 0 {
                    // Before this batch's envelopes are handed over: one of them may be
                    // what was retracted.
                    hub.invalidate();
                }
            }
            Err(Refusal::MailboxFull) => Metrics::inc(&metrics.mailbox_full_refusals),
            _ => {}
        }
    }
    // One pass over the registry for the whole batch.
    hub.deliver_fresh(fresh);
}

/// Turns a committed write into the client's response.
fn respond_to_write(outcome: Result<WriteResult, CommitError>) -> Result<ResponseBody, ErrorCode> {
    let outcome = outcome.map_err(commit_error_code)?.map_err(Refusal::code)?;
    Ok(match outcome {
        Outcome::Enqueued { .. } => ResponseBody::Sent,
        Outcome::Acked { unknown: 0 } => ResponseBody::Acked,
        Outcome::Acked { .. } => return Err(ErrorCode::UnknownEnvelope),
        Outcome::Prekeys { bundles, .. } => ResponseBody::PrekeyBundles(bundles),
        Outcome::PrekeysStored(counts) => ResponseBody::PrekeysStored {
            one_time: counts.one_time,
            kem_one_time: counts.kem_one_time,
        },
        Outcome::DeviceAdded(device) => ResponseBody::DeviceAdded { device },
        Outcome::DeviceRemoved { .. } => ResponseBody::DeviceRemoved,
        Outcome::DeliveryAccessSet => ResponseBody::DeliveryAccessSet,
        Outcome::Retracted { count } => ResponseBody::Retracted { count },
        Outcome::CallRecorded => ResponseBody::CallEnded,
        Outcome::Registered
        | Outcome::Expired { .. }
        | Outcome::InviteAdded
        | Outcome::CallsDeleted { .. } => return Err(ErrorCode::Internal),
    })
}

/// Envelope copies a sealed send asks for: one per named device.
fn sealed_copies(send: &SealedSend) -> usize {
    send.envelopes.iter().map(|e| e.devices.len()).sum()
}

/// Retraction by secret: the store sees only the derived tags.
fn retract_write(retract: &Retract) -> Write {
    Write::Retract {
        tags: retract.secrets.iter().map(retract_tag).collect(),
    }
}

fn low_prekeys_frame(counts: PrekeyCounts) -> Vec<u8> {
    encode_frame(&ServerFrame::LowPrekeys(LowPrekeys {
        one_time: counts.one_time,
        kem_one_time: counts.kem_one_time,
    }))
}

/// Pushes a device's mailbox: first the backlog, in order, then `Drained`, then whatever
/// arrives while it is connected. Reads the store in bounded batches, so memory stays flat
/// however far behind the device is.
///
/// While the device keeps up (the last round read less than a batch, and none of its
/// pushes waited for the device), the envelopes committed since are in the link's handoff
/// (mailbox.rs), and the round pushes them from there without reading the store. A round
/// reads the store first thing after the device connects, after a round that waited, and
/// whenever the handoff cannot vouch for everything since the last read (it overflowed, or
/// a retraction or a failed commit changed the store behind it). Reads go to the blocking
/// pool: they may be of a long backlog, on pages long out of cache.
async fn deliver_loop(
    shared: Arc<Shared>,
    address: DeviceAddress,
    link: DeviceLink,
    window: Arc<DeliveryWindow>,
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
    let mut keeping_up = false;
    loop {
        let now = shared.clock.now();
        let handed = if keeping_up {
            link.handoff.take(after)
        } else {
            None
        };
        let from_store = handed.is_none();
        let batch = if let Some(fresh) = handed {
            // Everything committed for the device since the last read, from memory.
            Ok(Ok(fresh
                .into_iter()
                // P3, as the store's read does it.
                .filter(|envelope| envelope.expires_at > now)
                .map(|envelope| StoredEnvelope {
                    id: envelope.id,
                    received_at: envelope.received_at,
                    expires_at: envelope.expires_at,
                    // No copy when this device was the only recipient.
                    payload: envelope.payload.into(),
                })
                .collect()))
        } else {
            // The read covers whatever the handoff holds; commits from now on go there again.
            // Until it has succeeded, the handoff is not to be trusted.
            keeping_up = false;
            link.handoff.clear();
            let reader = store.clone();
            tokio::task::spawn_blocking(move || {
                reader.backlog(&address, after, now, DELIVERY_BATCH)
            })
            .await
        };
        let batch = match batch {
            Ok(Ok(batch)) => batch,
            Ok(Err(error)) => {
                tracing::error!(%error, "reading a mailbox failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(_) => return,
        };
        let more = from_store && batch.len() == DELIVERY_BATCH;
        let mut waited = false;
        for envelope in batch {
            match window.push(envelope.id).await {
                Some(Room::AtOnce) => {}
                Some(Room::AfterWaiting) => {
                    waited = true;
                    // P3: the device may have kept the window full for longer than the
                    // envelope had left.
                    if envelope.expires_at <= shared.clock.now() {
                        window.acked(&[envelope.id]);
                        after = Some(envelope.id);
                        continue;
                    }
                }
                None => return,
            }
            after = Some(envelope.id);
            let frame = encode_frame(&ServerFrame::Deliver(Deliver {
                id: envelope.id,
                received_at: envelope.received_at,
                payload: envelope.payload,
            }));
            match outbox.try_send(frame) {
                Ok(()) => {}
                Err(TrySendError::Full(frame)) => {
                    waited = true;
                    if outbox.send(frame).await.is_err() {
                        return;
                    }
                }
                Err(TrySendError::Closed(_)) => return,
            }
            Metrics::inc(&shared.metrics.envelopes_delivered);
        }
        keeping_up = !more && !waited;
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

/// Reads this connection's media datagrams and forwards each, as it is, to the other
/// party of its allocation. Nothing here waits on anything but the next datagram: a
/// datagram that cannot go on at once is dropped and counted, and the forwarded bytes are
/// the received buffer itself (no copy).
async fn media_loop(shared: Arc<Shared>, number: u64, connection: quinn::Connection) {
    let metrics = &shared.metrics;
    let mut out = Vec::new();
    while let Ok(datagram) = connection.read_datagram().await {
        let allocation = match media_allocation(&datagram) {
            Ok(allocation) => allocation,
            Err(MediaError::TooLarge(_) | MediaError::TooShort(_)) => {
                Metrics::inc(&metrics.media_dropped_malformed);
                continue;
            }
        };
        match shared.calls.route(allocation, number, shared.clock.now()) {
            Route::Forward(peer) => {
                let payload = datagram.slice(MEDIA_HEADER_LEN..);
                media::forward(
                    &shared,
                    allocation,
                    &peer,
                    &payload,
                    Some(datagram),
                    &mut out,
                );
            }
            Route::Unknown => Metrics::inc(&metrics.media_dropped_unknown),
            Route::NotParty => Metrics::inc(&metrics.media_dropped_not_party),
            Route::NoPeer => Metrics::inc(&metrics.media_dropped_no_peer),
        }
    }
}

/// A write this connection submitted, answered once its commit is durable.
struct Answer {
    id: RequestId,
    pending: Pending,
    /// Bounds requests in flight; released when the writer takes the answer to write it,
    /// or when the queue drops it because the writer has stopped.
    _permit: OwnedSemaphorePermit,
}

/// A connection's writes awaiting their commits, oldest first, between the read loop that
/// submits them and the writer that answers them. Commits are applied in submission order,
/// so the oldest is always the next to become durable. A queue that empties gives its
/// buffer back: a quiet connection holds none (a channel would hold its first block of
/// slots for the connection's life).
#[derive(Default)]
struct AnswerQueue {
    waiting: std::sync::Mutex<Waiting>,
    added: Notify,
}

#[derive(Default)]
struct Waiting {
    answers: VecDeque<Answer>,
    /// The writer has stopped: nothing will be answered, so nothing may wait (a waiting
    /// answer holds an in-flight permit that the end of the session waits for).
    writer_gone: bool,
}

impl AnswerQueue {
    fn push(&self, answer: Answer) {
        let mut waiting = self.lock();
        if !waiting.writer_gone {
            waiting.answers.push_back(answer);
            drop(waiting);
            self.added.notify_one();
        }
    }

    fn pop(&self) -> Option<Answer> {
        let mut waiting = self.lock();
        let oldest = waiting.answers.pop_front();
        if waiting.answers.is_empty() {
            waiting.answers.shrink_to_fit();
        }
        oldest
    }

    /// Drops every waiting answer, and every answer pushed from now on.
    fn close(&self) {
        let mut waiting = self.lock();
        waiting.writer_gone = true;
        waiting.answers = VecDeque::new();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        // Every critical section is one queue operation, so a poisoned queue is intact.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The writer's side of the [`AnswerQueue`].
struct Answers {
    queue: Arc<AnswerQueue>,
    /// The oldest, taken from the queue and still waiting for its commit.
    oldest: Option<Answer>,
}

impl Drop for Answers {
    fn drop(&mut self) {
        self.queue.close();
    }
}

impl Answers {
    fn new(queue: Arc<AnswerQueue>) -> Self {
        Answers {
            queue,
            oldest: None,
        }
    }

    /// Waits for the oldest write's outcome. Cancel-safe: a write taken from the queue
    /// waits in `oldest`, and the queue is looked at before every wait for a push.
    async fn next(&mut self) -> (RequestId, Result<WriteResult, CommitError>) {
        loop {
            if self.oldest.is_none() {
                self.oldest = self.queue.pop();
            }
            if let Some(answer) = self.oldest.as_mut() {
                let outcome = answer.pending.wait().await;
                if let Some(answer) = self.oldest.take() {
                    return (answer.id, outcome);
                }
            }
            self.queue.added.notified().await;
        }
    }

    /// The oldest write's outcome, if its commit is already durable.
    fn ready(&mut self) -> Option<(RequestId, Result<WriteResult, CommitError>)> {
        if self.oldest.is_none() {
            self.oldest = self.queue.pop();
        }
        let outcome = self.oldest.as_mut()?.pending.ready()?;
        self.oldest.take().map(|answer| (answer.id, outcome))
    }
}

fn encode_answer(id: RequestId, outcome: Result<WriteResult, CommitError>) -> Vec<u8> {
    let result = respond_to_write(outcome);
    encode_frame(&ServerFrame::Response(Response { id, result }))
}

/// Writes the connection's frames and the answers to its writes. One commit makes a batch
/// of answers durable at once; they, and whatever frames are queued, go out in one write,
/// so that a busy connection sends full packets rather than a packet per answer.
async fn write_loop(
    mut send: SendStream,
    mut frames: mpsc::Receiver<Vec<u8>>,
    mut answers: Answers,
) {
    loop {
        let mut buffer = tokio::select! {
            frame = frames.recv() => match frame {
                Some(frame) => frame,
                None => break,
            },
            (id, outcome) = answers.next() => encode_answer(id, outcome),
        };
        while buffer.len() < WRITE_COALESCE {
            if let Some((id, outcome)) = answers.ready() {
                buffer.extend_from_slice(&encode_answer(id, outcome));
                continue;
            }
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
/// only after the header passed its kind's size limit. Waiting for a frame's first byte
/// has no deadline (a quiet device waits for pushes; the idle timeout covers a dead one);
/// once it has come, the rest must follow within `rest_within`, so a half-sent frame
/// cannot pin its buffer.
async fn read_frame(
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::sync::oneshot;

    use super::*;

    /// A batch that queues an envelope and retracts (perhaps that same envelope) must not
    /// leave it in a handoff: the store no longer has it.
    #[test]
    fn a_batch_with_a_retraction_sends_the_recipients_loops_to_the_store() {
        let hub = Hub::default();
        let metrics = Metrics::default();
        let bob = DeviceAddress {
            account: hush_protocol::AccountId([7; 16]),
            device: hush_protocol::DeviceId(1),
        };
        let (outbox, _frames) = mpsc::channel(1);
        let link = hub.attach(bob, hub.connection_number(), outbox);
        link.handoff.clear();
        let queued = |id| crate::store::FreshEnvelope {
            recipient: bob,
            id: EnvelopeId(id),
            received_at: 0,
            expires_at: u64::MAX,
            payload: bytes::Bytes::from_static(b"x"),
        };

        let mut results: Vec<WriteResult> = vec![Ok(Outcome::Enqueued {
            recipients: vec![bob],
            fresh: vec![queued(1)],
        })];
        after_commit(&hub, &metrics, &mut results);
        assert_eq!(link.handoff.take(None).map(|e| e.len()), Some(1));
        assert!(
            matches!(&results[0], Ok(Outcome::Enqueued { fresh, .. }) if fresh.is_empty()),
            "the sender's answer does not carry the payloads"
        );

        let mut results: Vec<WriteResult> = vec![
            Ok(Outcome::Enqueued {
                recipients: vec![bob],
                fresh: vec![queued(2)],
            }),
            Ok(Outcome::Retracted { count: 1 }),
        ];
        after_commit(&hub, &metrics, &mut results);
        assert!(link.handoff.take(Some(EnvelopeId(1))).is_none());
    }

    fn answer(
        id: u32,
        permits: &Arc<Semaphore>,
    ) -> (oneshot::Sender<Result<WriteResult, CommitError>>, Answer) {
        let (reply, pending) = Pending::channel();
        let permit = permits.clone().try_acquire_owned().unwrap();
        let answer = Answer {
            id: RequestId(id),
            pending,
            _permit: permit,
        };
        (reply, answer)
    }

    /// A queue, its writer's side, and `permits` in-flight permits for answers to hold.
    fn answer_queue(permits: usize) -> (Arc<Semaphore>, Arc<AnswerQueue>, Answers) {
        let queue = Arc::new(AnswerQueue::default());
        let answers = Answers::new(queue.clone());
        (Arc::new(Semaphore::new(permits)), queue, answers)
    }

    fn acked() -> Outcome {
        Outcome::Acked { unknown: 0 }
    }

    #[tokio::test]
    async fn answers_come_oldest_first_and_an_empty_queue_holds_no_buffer() {
        let (permits, queue, mut answers) = answer_queue(3);
        let (first, a) = answer(1, &permits);
        let (second, b) = answer(2, &permits);
        let (third, c) = answer(3, &permits);
        queue.push(a);
        queue.push(b);
        queue.push(c);

        // A later commit done first does not jump the queue.
        second.send(Ok(Ok(acked()))).unwrap();
        assert!(answers.ready().is_none());
        first.send(Ok(Ok(acked()))).unwrap();
        assert_eq!(answers.ready().map(|(id, _)| id), Some(RequestId(1)));
        assert_eq!(answers.ready().map(|(id, _)| id), Some(RequestId(2)));
        assert!(answers.ready().is_none());
        assert_eq!(
            permits.available_permits(),
            2,
            "answered writes release their permits"
        );

        third.send(Ok(Ok(acked()))).unwrap();
        let (id, outcome) = tokio::time::timeout(Duration::from_secs(5), answers.next())
            .await
            .unwrap();
        assert_eq!(id, RequestId(3));
        assert_eq!(outcome, Ok(Ok(acked())));
        assert_eq!(
            queue.lock().answers.capacity(),
            0,
            "the drained queue kept its buffer"
        );
        assert_eq!(permits.available_permits(), 3);
    }

    #[tokio::test]
    async fn a_push_wakes_a_writer_waiting_on_an_empty_queue() {
        let (permits, queue, mut answers) = answer_queue(1);
        let writer = tokio::spawn(async move { answers.next().await.0 });
        tokio::task::yield_now().await;
        let (reply, a) = answer(7, &permits);
        queue.push(a);
        reply.send(Ok(Ok(acked()))).unwrap();
        let id = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(id, RequestId(7));
    }

    #[tokio::test]
    async fn a_wait_given_up_keeps_its_answer_for_the_next() {
        let (permits, queue, mut answers) = answer_queue(2);
        let (first, a) = answer(1, &permits);
        let (second, b) = answer(2, &permits);
        queue.push(a);
        queue.push(b);
        // The writer's `select!` drops `next()` whenever a frame comes first.
        let gave_up = tokio::time::timeout(Duration::ZERO, answers.next()).await;
        assert!(gave_up.is_err());
        first.send(Ok(Ok(acked()))).unwrap();
        assert_eq!(answers.ready().map(|(id, _)| id), Some(RequestId(1)));
        // A write whose commit can no longer happen is answered, not forgotten.
        drop(second);
        let (id, outcome) = answers.ready().unwrap();
        assert_eq!(id, RequestId(2));
        assert_eq!(outcome, Err(CommitError::Stopped));
        assert!(answers.ready().is_none());
        assert_eq!(permits.available_permits(), 2);
    }

    #[test]
    fn when_the_writer_stops_no_answer_keeps_its_permit() {
        let (permits, queue, answers) = answer_queue(2);
        let (_waiting_reply, waiting) = answer(1, &permits);
        queue.push(waiting);
        assert_eq!(permits.available_permits(), 1);
        drop(answers);
        assert_eq!(
            permits.available_permits(),
            2,
            "a queued answer kept its permit"
        );
        let (_late_reply, late) = answer(2, &permits);
        queue.push(late);
        assert_eq!(
            permits.available_permits(),
            2,
            "a late answer kept its permit"
        );
    }
}
