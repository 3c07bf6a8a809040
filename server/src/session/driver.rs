//! The driver: it accepts the connection, reads its frames, asks the connection's phase
//! what each request comes to, and carries that out; when the connection ends it drains,
//! stops delivery, ends its calls and closes.

use std::sync::Arc;
use std::time::Duration;

use hush_protocol::auth::{EXPORTER_LABEL, EXPORTER_LEN};
use hush_protocol::{
    encode_frame, ClientFrame, DeviceAddress, DeviceId, ErrorCode, Fatal, Provision,
    ProvisioningMessage, RateLimited, Request, RequestId, Response, ResponseBody, ServerFrame,
    SUPPORTED_VERSIONS,
};
use quinn::{RecvStream, VarInt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::anonymous::{self, Anonymous};
use super::authenticated::{self, Authenticated};
use super::calls::ConnectionCalls;
use super::charge::Budget;
use super::datagrams::media_loop;
use super::delivery::{deliver_loop, DeliveryWindow};
use super::frames::read_frame;
use super::handshake::{self, Binding};
use super::writer::{commit_error_code, write_loop, Answer, AnswerQueue, Answers};
use super::{record_call_end, Decision, End, SessionContext};
use crate::mailbox::DeviceLink;
use crate::metrics::Metrics;
use crate::provisioning::ProvisioningError;
use crate::quota::AddressSlot;
use crate::store::Write;

/// How long a client has to complete the QUIC handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Encoded frames waiting for the writer; bounds a connection's memory.
const OUTBOX_DEPTH: usize = 128;
/// How long in-flight requests get to finish when a connection ends.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the writer gets to flush the last frames before the connection is closed.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves one incoming connection until it ends.
pub(crate) async fn run(
    incoming: quinn::Incoming,
    context: Arc<SessionContext>,
    shutdown: watch::Receiver<bool>,
    _connection_slots: (OwnedSemaphorePermit, AddressSlot),
) {
    let _open = context.metrics.open_connection();
    let Ok(Ok(connection)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await else {
        Metrics::inc(&context.metrics.handshake_failures);
        return;
    };
    Metrics::inc(&context.metrics.connections_opened);
    let number = context.hub.connection_number();
    // One deadline for opening the control stream and sending `Hello`, not one each.
    let hello_deadline = tokio::time::Instant::now() + context.config.hello_timeout();
    let stream = tokio::time::timeout_at(hello_deadline, connection.accept_bi()).await;
    let Ok(Ok((send, mut recv))) = stream else {
        context.metrics.closed_with(ErrorCode::HelloRequired);
        connection.close(code_of(ErrorCode::HelloRequired), b"HelloRequired");
        return;
    };

    let (outbox, frames) = mpsc::channel(OUTBOX_DEPTH);
    let answers = Arc::new(AnswerQueue::default());
    let writer = tokio::spawn(write_loop(send, frames, Answers::new(answers.clone())));
    let budget = Budget::new(connection.remote_address().ip(), &context.rules());
    let binding = Binding::new(exporter(&connection));
    let mut session = Session {
        budget,
        connection: connection.clone(),
        context: context.clone(),
        number,
        outbox,
        answers,
        phase: Phase::AwaitingHello,
        calls: ConnectionCalls::default(),
        in_flight: Arc::new(Semaphore::new(context.config.limits.max_in_flight_requests)),
    };
    let end = session
        .serve(&mut recv, hello_deadline, binding, shutdown)
        .await;
    session.finish(end, writer).await;
    tracing::debug!(connection = number, end = ?end, "connection ended");
}

/// This TLS session's exporter, which authentication signatures cover.
fn exporter(connection: &quinn::Connection) -> Option<[u8; EXPORTER_LEN]> {
    let mut exporter = [0u8; EXPORTER_LEN];
    connection
        .export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
        .ok()?;
    Some(exporter)
}

fn code_of(code: ErrorCode) -> VarInt {
    VarInt::from_u32(u32::from(code.as_u16()))
}

/// Where the connection is: each phase allows its own requests (its `decide`).
enum Phase {
    /// Before `Hello` (and once the connection is ending): no request is allowed.
    AwaitingHello,
    Anonymous(Anonymous),
    Authenticated(Attached),
}

/// An authenticated connection: its decisions' state, and the tasks that serve the device.
struct Attached {
    state: Authenticated,
    link: DeviceLink,
    delivery: JoinHandle<()>,
    media: JoinHandle<()>,
}

/// One connection, as the driver holds it: the handles its effects need, and its phase.
pub(super) struct Session {
    /// What this connection may still spend under the rate limits.
    budget: Budget,
    pub(super) connection: quinn::Connection,
    pub(super) context: Arc<SessionContext>,
    pub(super) number: u64,
    pub(super) outbox: mpsc::Sender<Vec<u8>>,
    /// Writes awaiting their commits, for the writer to answer in order.
    answers: Arc<AnswerQueue>,
    phase: Phase,
    /// Call allocations this connection is (or was) a party of; ended when it closes.
    pub(super) calls: ConnectionCalls,
    pub(super) in_flight: Arc<Semaphore>,
}

impl Session {
    async fn serve(
        &mut self,
        recv: &mut RecvStream,
        hello_deadline: tokio::time::Instant,
        binding: Binding,
        mut shutdown: watch::Receiver<bool>,
    ) -> End {
        let rest_within = self.context.config.frame_read_timeout();
        let hello =
            match tokio::time::timeout_at(hello_deadline, read_frame(recv, rest_within)).await {
                Ok(Ok(Some(frame))) => match handshake::expect_hello(frame) {
                    Ok(hello) => hello,
                    Err(code) => return End::Close(code),
                },
                Err(_) => return End::Close(ErrorCode::HelloRequired),
                Ok(Ok(None)) => return End::Peer,
                Ok(Err(failure)) => return failure.into(),
            };
        let (hello_ok, anonymous) = match handshake::accept(&hello, binding) {
            Ok(accepted) => accepted,
            Err(code) => return End::Close(code),
        };
        self.phase = Phase::Anonymous(anonymous);
        self.send(&ServerFrame::HelloOk(hello_ok)).await;

        loop {
            let evicted = async {
                match &self.phase {
                    Phase::Authenticated(device) => device.link.evicted.notified().await,
                    Phase::AwaitingHello | Phase::Anonymous(_) => std::future::pending().await,
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
        let rules = self.context.rules();
        let decision = match &self.phase {
            Phase::AwaitingHello => Decision::Close(ErrorCode::HelloRequired),
            Phase::Anonymous(state) => anonymous::decide(state, &mut self.budget, &rules, body),
            Phase::Authenticated(device) => {
                authenticated::decide(&device.state, &mut self.budget, &rules, body)
            }
        };
        self.perform(id, decision).await
    }

    /// Carries out what a request came to.
    async fn perform(&mut self, id: RequestId, decision: Decision) -> Result<(), End> {
        match decision {
            Decision::Submit(write) => return self.submit(id, write).await,
            Decision::Respond(result) => self.respond(id, result).await,
            Decision::RateLimited { retry_after_ms } => {
                self.send(&ServerFrame::RateLimited(RateLimited {
                    id,
                    retry_after_ms,
                }))
                .await;
            }
            Decision::Close(code) => return Err(End::Close(code)),
            Decision::Read(read) => return self.read(id, read).await,
            Decision::Register { account, write } => self.register(id, account, write).await,
            Decision::OpenProvisioning => self.open_provisioning(id).await,
            Decision::Provision(provision) => self.provision(id, provision).await,
            Decision::Call(request) => return self.call(id, request).await,
        }
        Ok(())
    }

    /// Hands a write to the committer and answers once it is durable.
    pub(super) async fn submit(&self, id: RequestId, write: Write) -> Result<(), End> {
        // The permit bounds this connection's concurrent requests; waiting for it stops
        // the read loop, which pushes back on the client through QUIC flow control.
        let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
            return Err(End::Close(ErrorCode::ShuttingDown));
        };
        // Submitted from the read loop, so writes reach the committer in the order the
        // client sent them; the writer answers them as their commits become durable.
        let pending = self.context.committer.submit(write).await;
        self.answers.push(Answer::new(id, pending, permit));
        Ok(())
    }

    /// The authentication's signature checked against the key the store holds: the
    /// connection becomes the device's, or ends.
    pub(super) async fn authenticated(
        &mut self,
        id: RequestId,
        address: DeviceAddress,
        verdict: Result<(), ErrorCode>,
    ) -> Result<(), End> {
        verdict.map_err(End::Close)?;
        Metrics::inc(&self.context.metrics.authentications);
        self.respond(id, Ok(ResponseBody::Authenticated)).await;
        self.attach(address);
        Ok(())
    }

    /// The signature was checked when the request was decided.
    async fn register(&mut self, id: RequestId, account: hush_protocol::AccountId, write: Write) {
        match self.context.committer.commit(write).await {
            Ok(Ok(_)) => {
                Metrics::inc(&self.context.metrics.registrations);
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
    }

    /// The anonymous phase's binding, which authentication is checked against.
    pub(super) fn binding(&self) -> Option<&Binding> {
        match &self.phase {
            Phase::Anonymous(anonymous) => Some(&anonymous.binding),
            Phase::AwaitingHello | Phase::Authenticated(_) => None,
        }
    }

    /// Makes this connection the device's live one and starts pushing its mailbox.
    fn attach(&mut self, address: DeviceAddress) {
        // An authenticated connection is no longer a new device waiting to be provisioned.
        self.close_provisioning();
        let context = &self.context;
        let link = context
            .hub
            .attach(address, self.number, self.outbox.clone());
        let window = Arc::new(DeliveryWindow::new(context.config.limits.delivery_window));
        let delivery = tokio::spawn(deliver_loop(
            context.clone(),
            address,
            link.clone(),
            window.clone(),
            self.outbox.clone(),
        ));
        let media = tokio::spawn(media_loop(
            context.clone(),
            self.number,
            self.connection.clone(),
        ));
        self.phase = Phase::Authenticated(Attached {
            state: Authenticated { address, window },
            link,
            delivery,
            media,
        });
    }

    /// Opens this connection's provisioning address (it has none: the phase checked).
    async fn open_provisioning(&mut self, id: RequestId) {
        let now = self.context.clock.now();
        let opened = self
            .context
            .provisioning
            .open(self.number, self.outbox.clone(), now);
        let result = match opened {
            Ok(address) => {
                if let Phase::Anonymous(anonymous) = &mut self.phase {
                    anonymous.provisioning = Some(address);
                }
                Ok(ResponseBody::ProvisioningOpened { address })
            }
            Err(ProvisioningError::Full) => Err(ErrorCode::Overloaded),
        };
        self.respond(id, result).await;
    }

    /// Pushes a provisioning message to the connection waiting at its address.
    async fn provision(&self, id: RequestId, provision: Provision) {
        let now = self.context.clock.now();
        let waiting = self.context.provisioning.take(&provision.address, now);
        let frame = encode_frame(&ServerFrame::ProvisioningMessage(ProvisioningMessage {
            payload: provision.payload,
        }));
        // The waiting connection has sent nothing but Hello and OpenProvisioning, so its
        // outbox has room; if it is gone, the address is as good as unknown.
        let result = match waiting.map(|outbox| outbox.try_send(frame)) {
            Some(Ok(())) => {
                Metrics::inc(&self.context.metrics.provisioning_messages);
                Ok(ResponseBody::Provisioned)
            }
            Some(Err(_)) | None => Err(ErrorCode::UnknownProvisioningAddress),
        };
        self.respond(id, result).await;
    }

    fn close_provisioning(&mut self) {
        if let Phase::Anonymous(Anonymous {
            provisioning: Some(address),
            ..
        }) = &self.phase
        {
            self.context.provisioning.close(address, self.number);
        }
    }

    pub(super) async fn send(&self, frame: &ServerFrame) {
        let _ = self.outbox.send(encode_frame(frame)).await;
    }

    pub(super) async fn respond(&self, id: RequestId, result: Result<ResponseBody, ErrorCode>) {
        self.send(&ServerFrame::Response(Response { id, result }))
            .await;
    }

    /// Lets started requests finish (their commits are answered), stops delivery, tells the
    /// client why, flushes, and closes.
    async fn finish(mut self, end: End, writer: JoinHandle<()>) {
        // A call ends when its connection did, not after the drain below.
        let ended_at = self.context.clock.now();
        let all =
            u32::try_from(self.context.config.limits.max_in_flight_requests).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, self.in_flight.acquire_many(all)).await;
        match std::mem::replace(&mut self.phase, Phase::AwaitingHello) {
            Phase::Authenticated(device) => {
                device.delivery.abort();
                device.media.abort();
                let _ = device.delivery.await;
                let _ = device.media.await;
                self.context.hub.detach(&device.state.address, self.number);
            }
            // An anonymous phase keeps its provisioning address until it is closed below.
            other => self.phase = other,
        }
        // Calls this connection is still a party of end with it, each with its record.
        for allocation in self.calls.take() {
            if let Some(ended) =
                self.context
                    .calls
                    .connection_closed(allocation, self.number, ended_at)
            {
                let _ = record_call_end(&self.context, ended).await;
            }
        }
        // The registry holds a sender of this connection's outbox: release it, or the
        // writer below would not see the outbox close.
        self.close_provisioning();
        let (code, reason) = match end {
            End::Peer => (VarInt::from_u32(0), "bye"),
            End::Close(code) => {
                self.context.metrics.closed_with(code);
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
