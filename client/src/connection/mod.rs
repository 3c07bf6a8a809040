//! A connection to a relay: one QUIC connection, one control stream, requests answered by
//! id, and envelopes pushed by the relay as [`Event`]s. [`connector`] opens connections
//! (trust, TLS, the QUIC endpoint); [`control`] runs the control stream's reader and
//! writer; this module is the request API.

mod connector;
mod control;

pub use self::connector::{close_code, ConnectOptions, Connector, RawStream, Trust};
use self::control::{lock, read_loop, write_loop, Waiting};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use hush_protocol::auth::{auth_transcript, register_transcript, EXPORTER_LEN};
use hush_protocol::media::{
    encode_media, parse_media, MediaError, MAX_MEDIA_PAYLOAD, MEDIA_HEADER_LEN,
};
use hush_protocol::media_udp::MediaLeg;
use hush_protocol::sealed::{SealedEnvelope, SenderCertificate};
use hush_protocol::{
    encode_frame, AccountId, Ack, AddDevice, AllocateCall, Authenticate, CallEndCause, CallOutcome,
    CallToken, ClientFrame, DecodeError, DeviceAddress, DeviceId, EndCall, EnvelopeId, ErrorCode,
    FetchPrekeys, Frame, JoinCall, ListDevices, OutgoingEnvelope, PrekeyBundles, Provision,
    Register, RemoveDevice, Request, RequestBody, RequestId, ResponseBody, Retract, SealedSend,
    Send, SetDeliveryAccess, Signature, UploadPrekeys, HEADER_LEN,
};
use quinn::VarInt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::error::ConnectionError;
use crate::keys::DeviceKey;
use crate::udp_media::{Sent, UdpMedia};

/// Pushed events buffered before the reader waits for the app (and the relay, through
/// QUIC flow control, waits for the reader).
const EVENT_BUFFER: usize = 1024;
/// Encoded frames waiting for the writer.
const OUTBOX_DEPTH: usize = 1024;

/// An envelope pushed by the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Acknowledge with this id once the envelope is safely handled.
    pub id: EnvelopeId,
    /// When the relay accepted it (seconds since the Unix epoch).
    pub received_at: u64,
    /// The ciphertext.
    pub payload: Vec<u8>,
}

/// Something the relay pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An envelope for this device.
    Envelope(Envelope),
    /// Everything queued while the device was away has been pushed.
    Drained,
    /// The device should upload more one-time prekeys.
    LowPrekeys {
        /// One-time EC prekeys left.
        one_time: u32,
        /// One-time ML-KEM prekeys left.
        kem_one_time: u32,
    },
    /// The one-shot message sent to this connection's provisioning address.
    Provisioning(Vec<u8>),
    /// A call allocation this connection is a party of ended, not by its own `end_call`
    /// (the other party hung up or went away, or a timeout).
    CallEnded {
        /// The allocation.
        allocation: u32,
        /// Why the relay ended it.
        cause: CallEndCause,
    },
    /// The connection is over; the relay's code, if it gave one.
    Closed(Option<ErrorCode>),
}

/// A connection to a relay, usable from many tasks at once: requests are pipelined and
/// answered by id.
///
/// A connection that has only said `Hello` (as [`Connector::connect`] leaves it) may
/// already send sealed envelopes, retract envelopes, and open a provisioning address;
/// everything else needs [`Connection::register`] or [`Connection::authenticate`] first.
pub struct Connection {
    quic: quinn::Connection,
    exporter: [u8; EXPORTER_LEN],
    challenge: [u8; 32],
    outbox: mpsc::Sender<Vec<u8>>,
    waiting: Arc<Mutex<Waiting>>,
    events: tokio::sync::Mutex<mpsc::Receiver<Event>>,
    next_request: AtomicU32,
    reader: JoinHandle<()>,
    /// The socket, when the connection was made by `Connection::connect` and owns it.
    own_endpoint: Option<quinn::Endpoint>,
    /// The relay's UDP media port socket, made with the first leg the relay grants.
    udp: tokio::sync::watch::Sender<Option<Arc<UdpMedia>>>,
    udp_allowed: bool,
}

impl Connection {
    /// Connects to the relay on a socket of its own.
    pub async fn connect(options: &ConnectOptions) -> Result<Connection, ConnectionError> {
        let connector = Connector::new(options.clone())?;
        let mut connection = connector.connect().await?;
        connection.own_endpoint = Some(connector.endpoint);
        Ok(connection)
    }

    fn start(raw: RawStream, challenge: [u8; 32], udp_allowed: bool) -> Connection {
        let exporter = raw.exporter().unwrap_or([0; EXPORTER_LEN]);
        let RawStream {
            connection,
            send,
            recv,
        } = raw;
        let (outbox, frames) = mpsc::channel(OUTBOX_DEPTH);
        let (events_tx, events) = mpsc::channel(EVENT_BUFFER);
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        tokio::spawn(write_loop(send, frames));
        let reader = tokio::spawn(read_loop(
            recv,
            connection.clone(),
            waiting.clone(),
            events_tx,
        ));
        Connection {
            quic: connection,
            exporter,
            challenge,
            outbox,
            waiting,
            events: tokio::sync::Mutex::new(events),
            next_request: AtomicU32::new(1),
            reader,
            own_endpoint: None,
            udp: tokio::sync::watch::Sender::new(None),
            udp_allowed,
        }
    }

    /// Creates an account; this connection is then authenticated as its primary device.
    pub async fn register(
        &self,
        identity_key: &[u8],
        device: &DeviceKey,
        invite: Option<&[u8]>,
    ) -> Result<DeviceAddress, ConnectionError> {
        let device_key = device.public_key();
        let transcript =
            register_transcript(&self.exporter, &self.challenge, identity_key, &device_key);
        let register = Register {
            identity_key: identity_key.to_vec(),
            device_key,
            invite: invite.map(<[u8]>::to_vec),
            signature: Signature(device.sign(&transcript)),
        };
        match self.request(RequestBody::Register(register)).await? {
            ResponseBody::Registered { address } => Ok(address),
            _ => Err(ConnectionError::UnexpectedResponse),
        }
    }

    /// Authenticates this connection as an existing device; its mailbox starts arriving.
    pub async fn authenticate(
        &self,
        address: DeviceAddress,
        device: &DeviceKey,
    ) -> Result<(), ConnectionError> {
        let transcript = auth_transcript(&self.exporter, &self.challenge, &address);
        let auth = Authenticate {
            address,
            signature: Signature(device.sign(&transcript)),
        };
        expect(
            &self.request(RequestBody::Authenticate(auth)).await?,
            &ResponseBody::Authenticated,
        )
    }

    /// Adds a device (by its public key) to this device's account.
    pub async fn add_device(&self, device_key: [u8; 32]) -> Result<DeviceId, ConnectionError> {
        match self
            .request(RequestBody::AddDevice(AddDevice { device_key }))
            .await?
        {
            ResponseBody::DeviceAdded { device } => Ok(device),
            _ => Err(ConnectionError::UnexpectedResponse),
        }
    }

    /// Removes another device of this account, with its mailbox.
    pub async fn remove_device(&self, device: DeviceId) -> Result<(), ConnectionError> {
        expect(
            &self
                .request(RequestBody::RemoveDevice(RemoveDevice { device }))
                .await?,
            &ResponseBody::DeviceRemoved,
        )
    }

    /// Uploads prekeys; returns the one-time EC and ML-KEM counts the relay now holds.
    pub async fn upload_prekeys(
        &self,
        upload: UploadPrekeys,
    ) -> Result<(u32, u32), ConnectionError> {
        match self.request(RequestBody::UploadPrekeys(upload)).await? {
            ResponseBody::PrekeysStored {
                one_time,
                kem_one_time,
            } => Ok((one_time, kem_one_time)),
            _ => Err(ConnectionError::UnexpectedResponse),
        }
    }

    /// Fetches prekey bundles of one device of an account, or of all its devices (needs an
    /// authenticated connection).
    pub async fn fetch_prekeys(
        &self,
        account: AccountId,
        device: Option<DeviceId>,
    ) -> Result<PrekeyBundles, ConnectionError> {
        self.fetch_prekeys_with(account, device, None).await
    }

    /// [`Connection::fetch_prekeys`] on an anonymous connection, presenting the account's
    /// delivery token, so the relay cannot tell who sets up a session with whom.
    pub async fn fetch_prekeys_with(
        &self,
        account: AccountId,
        device: Option<DeviceId>,
        access: Option<[u8; 16]>,
    ) -> Result<PrekeyBundles, ConnectionError> {
        let fetch = FetchPrekeys {
            account,
            device,
            access,
        };
        match self.request(RequestBody::FetchPrekeys(fetch)).await? {
            ResponseBody::PrekeyBundles(bundles) => Ok(bundles),
            _ => Err(ConnectionError::UnexpectedResponse),
        }
    }

    /// Sends envelopes; returns once the relay has durably stored all of them.
    pub async fn send(&self, envelopes: Vec<OutgoingEnvelope>) -> Result<(), ConnectionError> {
        expect(
            &self.request(RequestBody::Send(Send { envelopes })).await?,
            &ResponseBody::Sent,
        )
    }

    /// Sends one payload to several devices.
    pub async fn send_to(
        &self,
        recipients: &[DeviceAddress],
        payload: Vec<u8>,
    ) -> Result<(), ConnectionError> {
        self.send(vec![OutgoingEnvelope {
            recipients: recipients.to_vec(),
            payload,
            retract_tag: None,
        }])
        .await
    }

    /// A sender certificate for this (authenticated) device, and the relay key that
    /// verifies it ([`SenderCertificate::verify`]).
    pub async fn sender_certificate(
        &self,
    ) -> Result<(SenderCertificate, [u8; 32]), ConnectionError> {
        match self.request(RequestBody::GetSenderCertificate).await? {
            ResponseBody::SenderCertificate {
                certificate,
                relay_key,
            } => Ok((certificate, relay_key)),
            _ => Err(ConnectionError::UnexpectedResponse),
        }
    }

    /// Sets who may send sealed envelopes to this account: holders of `token` (the relay
    /// keeps only its hash), and everyone if `allow_unknown_senders`.
    pub async fn set_delivery_access(
        &self,
        token: Option<[u8; 16]>,
        allow_unknown_senders: bool,
    ) -> Result<(), ConnectionError> {
        let set = SetDeliveryAccess {
            token,
            allow_unknown_senders,
        };
        expect(
            &self.request(RequestBody::SetDeliveryAccess(set)).await?,
            &ResponseBody::DeliveryAccessSet,
        )
    }

    /// Sends sealed envelopes (no authentication needed); returns once the relay has
    /// durably stored all of them. `DeliveryRefused` means no access (or no such account),
    /// `DeviceListChanged` that the recipient's device list must be fetched again.
    pub async fn sealed_send(&self, envelopes: Vec<SealedEnvelope>) -> Result<(), ConnectionError> {
        expect(
            &self
                .request(RequestBody::SealedSend(SealedSend { envelopes }))
                .await?,
            &ResponseBody::Sent,
        )
    }

    /// The current devices of an account; consumes no prekeys (needs an authenticated
    /// connection).
    pub async fn list_devices(&self, account: AccountId) -> Result<Vec<DeviceId>, ConnectionError> {
        self.list_devices_with(account, None).await
    }

    /// [`Connection::list_devices`] on an anonymous connection, presenting the account's
    /// delivery token.
    pub async fn list_devices_with(
        &self,
        account: AccountId,
        access: Option<[u8; 16]>,
    ) -> Result<Vec<DeviceId>, ConnectionError> {
        match self
            .request(RequestBody::ListDevices(ListDevices { account, access }))
            .await?
        {
            ResponseBody::Devices { devices } => Ok(devices),
            _ => Err(ConnectionError::UnexpectedResponse),
        }
    }

    /// Deletes every still-stored envelope sent with the retraction tags of these secrets
    /// ([`hush_protocol::sealed::retract_tag`]); returns how many mailbox entries went.
    pub async fn retract(&self, secrets: &[[u8; 32]]) -> Result<u32, ConnectionError> {
        let retract = Retract {
            secrets: secrets.to_vec(),
        };
        match self.request(RequestBody::Retract(retract)).await? {
            ResponseBody::Retracted { count } => Ok(count),
            _ => Err(ConnectionError::UnexpectedResponse),
        }
    }

    /// Opens a one-shot provisioning address on this unauthenticated connection; the
    /// message sent there arrives as [`Event::Provisioning`].
    pub async fn open_provisioning(&self) -> Result<[u8; 16], ConnectionError> {
        match self.request(RequestBody::OpenProvisioning).await? {
            ResponseBody::ProvisioningOpened { address } => Ok(address),
            _ => Err(ConnectionError::UnexpectedResponse),
        }
    }

    /// Sends the one message to a waiting connection's provisioning address.
    pub async fn provision(
        &self,
        address: [u8; 16],
        payload: Vec<u8>,
    ) -> Result<(), ConnectionError> {
        expect(
            &self
                .request(RequestBody::Provision(Provision { address, payload }))
                .await?,
            &ResponseBody::Provisioned,
        )
    }

    /// Asks the relay for a media allocation for a call to `callee`'s account; returns the
    /// allocation id, the join token (both go to the callee inside the end-to-end call
    /// offer) and the call id.
    pub async fn allocate_call(
        &self,
        callee: AccountId,
    ) -> Result<(u32, CallToken, [u8; 16]), ConnectionError> {
        match self
            .request(RequestBody::AllocateCall(AllocateCall { callee }))
            .await?
        {
            ResponseBody::CallAllocated {
                allocation,
                token,
                call_id,
                media,
            } => {
                self.add_leg(allocation, media.as_ref()).await;
                Ok((allocation, token, call_id))
            }
            _ => Err(ConnectionError::UnexpectedResponse),
        }
    }

    /// Starts using the relay's media port for `allocation`, if the relay granted a leg
    /// and the options allow it. A socket that cannot be made leaves media on QUIC.
    async fn add_leg(&self, allocation: u32, grant: Option<&MediaLeg>) {
        let Some(grant) = grant.filter(|_| self.udp_allowed) else {
            return;
        };
        let existing = self.udp.borrow().clone();
        let udp = if let Some(udp) = existing {
            udp
        } else {
            let relay = SocketAddr::new(self.quic.remote_address().ip(), grant.port);
            let Ok(udp) = UdpMedia::connect(relay).await else {
                return;
            };
            let udp = Arc::new(udp);
            // Two calls set up at once: the first socket stays.
            self.udp.send_if_modified(|slot| {
                if slot.is_none() {
                    *slot = Some(udp.clone());
                    true
                } else {
                    false
                }
            });
            let current = self.udp.borrow().clone();
            let Some(udp) = current else {
                return;
            };
            udp
        };
        udp.add(allocation, grant).await;
    }

    /// The leg the relay granted this connection for `allocation` on its UDP media port,
    /// keys included: for conformance tests and tools that speak to the port themselves.
    pub fn media_leg(&self, allocation: u32) -> Option<MediaLeg> {
        self.udp.borrow().as_ref()?.grant(allocation)
    }

    /// Whether `allocation`'s media goes over the relay's UDP media port (the relay has
    /// answered its binding there) rather than QUIC datagrams.
    pub fn media_on_udp(&self, allocation: u32) -> bool {
        self.udp
            .borrow()
            .as_ref()
            .is_some_and(|udp| udp.confirmed(allocation))
    }

    /// Joins a call allocation as a device of the callee account, with the token from the
    /// caller's offer. Media flows once this returns.
    pub async fn join_call(
        &self,
        allocation: u32,
        token: CallToken,
    ) -> Result<(), ConnectionError> {
        match self
            .request(RequestBody::JoinCall(JoinCall { allocation, token }))
            .await?
        {
            ResponseBody::CallJoined { media } => {
                self.add_leg(allocation, media.as_ref()).await;
                Ok(())
            }
            _ => Err(ConnectionError::UnexpectedResponse),
        }
    }

    /// Ends a call allocation this connection is a party of; `outcome` is the caller's
    /// account of an unanswered call (once answered, the relay records `Answered`).
    /// Returns once the relay has durably written the call-detail record.
    pub async fn end_call(
        &self,
        allocation: u32,
        outcome: CallOutcome,
    ) -> Result<(), ConnectionError> {
        if let Some(udp) = self.udp.borrow().as_ref() {
            udp.remove(allocation);
        }
        expect(
            &self
                .request(RequestBody::EndCall(EndCall {
                    allocation,
                    outcome,
                }))
                .await?,
            &ResponseBody::CallEnded,
        )
    }

    /// Sends one (already encrypted) media frame of a call as a QUIC datagram. Never
    /// waits: a frame over [`hush_protocol::media::MAX_MEDIA_PAYLOAD`] or over what the
    /// path carries, or on a closed connection, is an error; a full send buffer drops the
    /// oldest queued datagram.
    pub fn send_media(&self, allocation: u32, frame: &[u8]) -> Result<(), ConnectionError> {
        if frame.len() > MAX_MEDIA_PAYLOAD {
            return Err(MediaError::TooLarge(frame.len() + MEDIA_HEADER_LEN).into());
        }
        let udp = self.udp.borrow().clone();
        if let Some(udp) = udp {
            if udp.send(allocation, frame)? == Sent::Udp {
                return Ok(());
            }
        }
        let datagram = encode_media(allocation, frame)?;
        self.send_raw_datagram(datagram)
    }

    /// Sends a datagram as it is, without the media size check: for conformance tests
    /// and tools.
    pub fn send_raw_datagram(&self, datagram: Vec<u8>) -> Result<(), ConnectionError> {
        self.quic.send_datagram(datagram.into())?;
        Ok(())
    }

    /// The next media frame, from a QUIC datagram or the relay's UDP media port: its
    /// allocation id and the encrypted frame. Datagrams too short to carry an allocation
    /// id, and packets on the port that are not authentic, are skipped; `None` once the
    /// connection is closed.
    pub async fn next_media(&self) -> Option<(u32, Vec<u8>)> {
        let mut port = self.udp.subscribe();
        loop {
            let udp = port.borrow_and_update().clone();
            let datagram = if let Some(udp) = udp {
                tokio::select! {
                    // The port first: a frame waiting there is taken without touching
                    // the QUIC connection's state at all.
                    biased;
                    frame = udp.receive() => return Some(frame),
                    datagram = self.quic.read_datagram() => datagram.ok()?,
                }
            } else {
                tokio::select! {
                    datagram = self.quic.read_datagram() => datagram.ok()?,
                    changed = port.changed() => {
                        if changed.is_err() {
                            return None;
                        }
                        continue;
                    }
                }
            };
            if let Ok((allocation, frame)) = parse_media(&datagram) {
                return Some((allocation, frame.to_vec()));
            }
        }
    }

    /// Acknowledges envelopes; the relay deletes them.
    pub async fn ack(&self, ids: &[EnvelopeId]) -> Result<(), ConnectionError> {
        expect(
            &self
                .request(RequestBody::Ack(Ack { ids: ids.to_vec() }))
                .await?,
            &ResponseBody::Acked,
        )
    }

    /// The next pushed event; `None` after [`Event::Closed`].
    pub async fn next_event(&self) -> Option<Event> {
        self.events.lock().await.recv().await
    }

    /// A pushed event that has already arrived, without waiting; `None` if there is none
    /// (or another task is waiting in [`Connection::next_event`]).
    pub fn try_next_event(&self) -> Option<Event> {
        self.events.try_lock().ok()?.try_recv().ok()
    }

    /// Closes the connection politely.
    pub fn close(&self) {
        self.quic.close(VarInt::from_u32(0), b"bye");
    }

    /// The relay's close code, once it has closed the connection with one.
    pub fn close_code(&self) -> Option<ErrorCode> {
        close_code(&self.quic)
    }

    async fn request(&self, body: RequestBody) -> Result<ResponseBody, ConnectionError> {
        body.check_limits().map_err(ConnectionError::TooLarge)?;
        let id = RequestId(self.next_request.fetch_add(1, Ordering::Relaxed));
        let frame = encode_frame(&ClientFrame::Request(Request { id, body }));
        let kind = frame[HEADER_LEN - 1];
        let limit = ClientFrame::body_limit(kind).unwrap_or(0);
        if frame.len() - HEADER_LEN > limit {
            let len = (frame.len() - HEADER_LEN) as u64;
            return Err(ConnectionError::TooLarge(DecodeError::FrameTooLarge {
                kind,
                len,
                limit,
            }));
        }
        let (reply, response) = oneshot::channel();
        {
            let mut waiting = lock(&self.waiting);
            if waiting.closed {
                return Err(ConnectionError::Closed(waiting.close_code));
            }
            waiting.replies.insert(id, reply);
        }
        if self.outbox.send(frame).await.is_err() {
            lock(&self.waiting).replies.remove(&id);
            return Err(ConnectionError::Closed(self.close_code()));
        }
        response
            .await
            .unwrap_or_else(|_| Err(ConnectionError::Closed(self.close_code())))
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
        self.quic.close(VarInt::from_u32(0), b"bye");
    }
}

fn expect(got: &ResponseBody, wanted: &ResponseBody) -> Result<(), ConnectionError> {
    if got == wanted {
        Ok(())
    } else {
        Err(ConnectionError::UnexpectedResponse)
    }
}
