//! The frames themselves. Client frames flow to the relay, server frames to the client.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{DecodeError, ErrorCode};
use crate::ids::{AccountId, DeviceAddress, DeviceId, EnvelopeId, RequestId};
use crate::limits;
use crate::media_udp::MediaLeg;
use crate::sealed::{SealedEnvelope, SenderCertificate};
use crate::Signature;

/// An inclusive range of protocol versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRange {
    /// Oldest version.
    pub min: u16,
    /// Newest version.
    pub max: u16,
}

impl VersionRange {
    /// The newest version both ranges contain, if any.
    pub fn negotiate(self, other: VersionRange) -> Option<u16> {
        let newest = self.max.min(other.max);
        (newest >= self.min.max(other.min)).then_some(newest)
    }
}

/// The first frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The versions the client speaks.
    pub versions: VersionRange,
}

impl Hello {
    /// A `Hello` offering every version this build speaks.
    pub fn current() -> Self {
        Hello {
            versions: crate::SUPPORTED_VERSIONS,
        }
    }
}

/// The relay's answer to `Hello`: the chosen version and this connection's challenge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloOk {
    /// The negotiated version.
    pub version: u16,
    /// A fresh random challenge, signed (with the TLS exporter) to authenticate.
    pub challenge: [u8; 32],
}

/// Creates an account whose primary device is the one on this connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// The account's public identity key(s), opaque to the relay and served with prekeys.
    #[serde(with = "serde_bytes")]
    pub identity_key: Vec<u8>,
    /// The primary device's Ed25519 public key.
    pub device_key: [u8; 32],
    /// An invite token, where the relay requires one.
    #[serde(with = "serde_bytes")]
    pub invite: Option<Vec<u8>>,
    /// The device key's signature over [`crate::auth::register_transcript`].
    pub signature: Signature,
}

/// Authenticates this connection as an existing device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authenticate {
    /// The device.
    pub address: DeviceAddress,
    /// The device key's signature over [`crate::auth::auth_transcript`].
    pub signature: Signature,
}

/// Adds a device to the authenticated device's account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddDevice {
    /// The new device's Ed25519 public key.
    pub device_key: [u8; 32],
}

/// Removes a device from the authenticated device's account; its mailbox goes with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveDevice {
    /// The device to remove.
    pub device: DeviceId,
}

/// A public prekey with its signature, opaque to the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prekey {
    /// The client's id for the key.
    pub id: u32,
    /// Public key bytes.
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
    /// Signature bytes (empty for unsigned one-time keys).
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Uploads prekeys for the authenticated device. Absent fields leave stored keys as they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct UploadPrekeys {
    /// Replaces the signed prekey.
    pub signed_prekey: Option<Prekey>,
    /// Added to the one-time prekeys.
    pub one_time: Vec<Prekey>,
    /// Added to the one-time ML-KEM prekeys.
    pub kem_one_time: Vec<Prekey>,
    /// Replaces the last-resort ML-KEM prekey, served when one-time ones run out.
    pub kem_last_resort: Option<Prekey>,
}

/// Fetches prekey bundles for one device of an account, or all of them. An authenticated
/// device may fetch any account's; an anonymous connection (a sealed sender that must not
/// say who it is) presents the account's delivery token. `Debug` leaves out the token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchPrekeys {
    /// The account.
    pub account: AccountId,
    /// One device, or `None` for every device.
    pub device: Option<DeviceId>,
    /// The account's delivery token, on an anonymous connection.
    pub access: Option<[u8; 16]>,
}

impl std::fmt::Debug for FetchPrekeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchPrekeys")
            .field("account", &self.account)
            .field("device", &self.device)
            .field("access", &self.access.map(|_| "<redacted>"))
            .finish()
    }
}

/// One envelope and the devices it goes to. Pairwise ciphertexts have one recipient; a
/// group ciphertext is fanned out to many.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutgoingEnvelope {
    /// Recipient devices.
    pub recipients: Vec<DeviceAddress>,
    /// Opaque ciphertext.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// A retraction tag ([`crate::sealed::retract_tag`]) for delete-for-everyone, if wanted.
    pub retract_tag: Option<[u8; 32]>,
}

/// Sends envelopes. The relay commits all of them, to every recipient, atomically and
/// durably before it answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Send {
    /// The envelopes.
    pub envelopes: Vec<OutgoingEnvelope>,
}

/// Acknowledges delivered envelopes; the relay deletes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Ids from `Deliver` frames on this device's connection.
    pub ids: Vec<EnvelopeId>,
}

/// Sets who may send sealed envelopes to the authenticated device's account. `Debug`
/// leaves out the token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetDeliveryAccess {
    /// The delivery token contacts present; `None` removes it. The relay keeps its SHA-256.
    pub token: Option<[u8; 16]>,
    /// Whether senders without the token may deliver too.
    pub allow_unknown_senders: bool,
}

/// Sends sealed envelopes, which do not name their sender. Allowed without
/// authentication; the relay commits all of them atomically and durably before it answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSend {
    /// The envelopes.
    pub envelopes: Vec<SealedEnvelope>,
}

/// Asks for the current device list of an account: from an authenticated device, or
/// anonymously with the account's delivery token. `Debug` leaves out the token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListDevices {
    /// The account.
    pub account: AccountId,
    /// The account's delivery token, on an anonymous connection.
    pub access: Option<[u8; 16]>,
}

impl std::fmt::Debug for ListDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListDevices")
            .field("account", &self.account)
            .field("access", &self.access.map(|_| "<redacted>"))
            .finish()
    }
}

/// Deletes every still-stored envelope whose retraction tag matches one of these secrets.
/// `Debug` leaves out the secrets.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retract {
    /// The secrets behind the tags ([`crate::sealed::retract_tag`]).
    pub secrets: Vec<[u8; 32]>,
}

/// Hands a one-shot message to the connection waiting at a provisioning address. `Debug`
/// leaves out the address.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provision {
    /// The address from the waiting connection's `ProvisioningOpened`.
    pub address: [u8; 16],
    /// Opaque ciphertext for the new device.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl fmt::Debug for SetDeliveryAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SetDeliveryAccess")
            .field("token", &self.token.map(|_| "<redacted>"))
            .field("allow_unknown_senders", &self.allow_unknown_senders)
            .finish()
    }
}

impl fmt::Debug for Retract {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retract")
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl fmt::Debug for Provision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provision")
            .field("address", &"<redacted>")
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// A call allocation's join token: 16 random bytes the caller passes to the callee inside
/// the end-to-end signaling. `Debug` prints `<redacted>`.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallToken(pub [u8; 16]);

impl fmt::Debug for CallToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CallToken(<redacted>)")
    }
}

/// How a call ended, as the call-detail record keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CallOutcome {
    /// The callee joined; the call took place.
    Answered,
    /// Nobody answered (the caller gave up, or the ring timed out).
    Missed,
    /// The callee declined.
    Rejected,
    /// The callee was in another call.
    Busy,
    /// The call could not be set up (or a connection went away before the answer).
    Failed,
}

/// Asks the relay for a media allocation for a call to `callee`'s account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocateCall {
    /// The account called.
    pub callee: AccountId,
}

/// Joins a call allocation as a device of the callee account. `Debug` leaves out the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinCall {
    /// The allocation, from the caller's signaling.
    pub allocation: u32,
    /// Its token, from the caller's signaling.
    pub token: CallToken,
}

/// Ends a call allocation this connection is a party of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndCall {
    /// The allocation.
    pub allocation: u32,
    /// The caller's view of how it ended; once the callee has joined the relay records
    /// `Answered` whatever this says.
    pub outcome: CallOutcome,
}

/// Why the relay ended an allocation, as told to the parties that did not end it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CallEndCause {
    /// The other party sent `EndCall`.
    EndedByPeer,
    /// Nobody joined within the relay's ring timeout.
    RingTimeout,
    /// No media flowed for the relay's idle timeout.
    MediaIdle,
    /// The other party's connection closed.
    PeerGone,
}

/// Pushed to a party of a call whose allocation ended for any reason but its own `EndCall`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallEnded {
    /// The allocation that ended.
    pub allocation: u32,
    /// Why.
    pub cause: CallEndCause,
}

/// A request; the relay answers each with a [`Response`] carrying the same id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Echoed in the response.
    pub id: RequestId,
    /// What is asked.
    pub body: RequestBody,
}

/// What a request asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestBody {
    /// See [`Register`].
    Register(Register),
    /// See [`Authenticate`].
    Authenticate(Authenticate),
    /// See [`AddDevice`].
    AddDevice(AddDevice),
    /// See [`RemoveDevice`].
    RemoveDevice(RemoveDevice),
    /// See [`UploadPrekeys`].
    UploadPrekeys(UploadPrekeys),
    /// See [`FetchPrekeys`].
    FetchPrekeys(FetchPrekeys),
    /// See [`Send`].
    Send(Send),
    /// See [`Ack`].
    Ack(Ack),
    /// Asks for a sender certificate for the authenticated device.
    GetSenderCertificate,
    /// See [`SetDeliveryAccess`].
    SetDeliveryAccess(SetDeliveryAccess),
    /// See [`SealedSend`].
    SealedSend(SealedSend),
    /// See [`ListDevices`].
    ListDevices(ListDevices),
    /// See [`Retract`].
    Retract(Retract),
    /// Opens a provisioning address on this (unauthenticated) connection.
    OpenProvisioning,
    /// See [`Provision`].
    Provision(Provision),
    /// See [`AllocateCall`].
    AllocateCall(AllocateCall),
    /// See [`JoinCall`].
    JoinCall(JoinCall),
    /// See [`EndCall`].
    EndCall(EndCall),
}

/// Frames a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// Must be first.
    Hello(Hello),
    /// Every later frame.
    Request(Request),
}

/// The prekeys of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceBundle {
    /// The device.
    pub device: DeviceId,
    /// The device's Ed25519 public key.
    pub device_key: [u8; 32],
    /// Its signed prekey, if it uploaded one.
    pub signed_prekey: Option<Prekey>,
    /// One one-time prekey, now deleted from the relay; `None` when they ran out.
    pub one_time: Option<Prekey>,
    /// One ML-KEM prekey: a one-time one (now deleted), or else the last-resort one.
    pub kem: Option<Prekey>,
    /// Whether `kem` is the last-resort key.
    pub kem_is_last_resort: bool,
}

/// The answer to [`FetchPrekeys`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrekeyBundles {
    /// The account's public identity key.
    #[serde(with = "serde_bytes")]
    pub identity_key: Vec<u8>,
    /// One bundle per requested device.
    pub devices: Vec<DeviceBundle>,
}

/// What a successful request returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseBody {
    /// The account exists; this connection is authenticated as its primary device.
    Registered {
        /// The new device's address.
        address: DeviceAddress,
    },
    /// This connection is authenticated.
    Authenticated,
    /// The device was added.
    DeviceAdded {
        /// Its id.
        device: DeviceId,
    },
    /// The device and its mailbox are gone.
    DeviceRemoved,
    /// Prekeys stored; the counts are what the relay now holds for this device.
    PrekeysStored {
        /// One-time EC prekeys held.
        one_time: u32,
        /// One-time ML-KEM prekeys held.
        kem_one_time: u32,
    },
    /// See [`PrekeyBundles`].
    PrekeyBundles(PrekeyBundles),
    /// Every envelope is durably committed to every recipient's mailbox.
    Sent,
    /// The acknowledged envelopes are deleted.
    Acked,
    /// A sender certificate for the authenticated device.
    SenderCertificate {
        /// The certificate.
        certificate: SenderCertificate,
        /// The relay's Ed25519 sender-certificate public key.
        relay_key: [u8; 32],
    },
    /// The delivery access settings are stored.
    DeliveryAccessSet,
    /// The account's current devices, in ascending order.
    Devices {
        /// The devices.
        devices: Vec<DeviceId>,
    },
    /// Envelopes retracted.
    Retracted {
        /// Mailbox entries deleted (one per recipient device of each envelope).
        count: u32,
    },
    /// A provisioning address is open on this connection.
    ProvisioningOpened {
        /// Give it to the device that will provision this one.
        address: [u8; 16],
    },
    /// The provisioning message was handed to the waiting connection.
    Provisioned,
    /// A media allocation for a call; the caller passes `allocation` and `token` to the
    /// callee end to end.
    CallAllocated {
        /// The compact id every media datagram of the call starts with.
        allocation: u32,
        /// What the callee presents to join.
        token: CallToken,
        /// The call's id, as its call-detail record keeps it.
        call_id: [u8; 16],
        /// The caller's leg on the relay's UDP media port, if the relay has one.
        media: Option<MediaLeg>,
    },
    /// This connection is the callee's party of the allocation.
    CallJoined {
        /// The callee's leg on the relay's UDP media port, if the relay has one.
        media: Option<MediaLeg>,
    },
    /// The allocation has ended and its call-detail record is durably written.
    CallEnded,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The request's id.
    pub id: RequestId,
    /// The outcome.
    pub result: Result<ResponseBody, ErrorCode>,
}

/// An envelope pushed to its recipient device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deliver {
    /// Acknowledge with this id.
    pub id: EnvelopeId,
    /// When the relay accepted it, in seconds since the Unix epoch.
    pub received_at: u64,
    /// Opaque ciphertext.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// The device is running low on one-time prekeys and should upload more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LowPrekeys {
    /// One-time EC prekeys left.
    pub one_time: u32,
    /// One-time ML-KEM prekeys left.
    pub kem_one_time: u32,
}

/// A provisioning message pushed to the connection that opened the address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisioningMessage {
    /// Opaque ciphertext.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// A connection-level error, sent just before the relay closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fatal {
    /// Why.
    pub code: ErrorCode,
    /// The versions the relay speaks, so a client can say what to upgrade.
    pub supported_versions: VersionRange,
}

/// The answer to a request that a rate limit refused: nothing of it was done, and the
/// same request may succeed after `retry_after_ms`. The connection carries on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimited {
    /// The request's id.
    pub id: RequestId,
    /// Milliseconds until the limit has room for this request again.
    pub retry_after_ms: u32,
}

/// Frames the relay sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// The answer to `Hello`.
    HelloOk(HelloOk),
    /// The answer to a request.
    Response(Response),
    /// An envelope for this device.
    Deliver(Deliver),
    /// Everything queued when the device connected has been pushed; what follows is live.
    Drained,
    /// See [`LowPrekeys`].
    LowPrekeys(LowPrekeys),
    /// See [`Fatal`].
    Fatal(Fatal),
    /// See [`ProvisioningMessage`].
    ProvisioningMessage(ProvisioningMessage),
    /// See [`CallEnded`].
    CallEnded(CallEnded),
    /// See [`RateLimited`].
    RateLimited(RateLimited),
}

fn check(ok: bool, what: &'static str) -> Result<(), DecodeError> {
    if ok {
        Ok(())
    } else {
        Err(DecodeError::LimitExceeded { what })
    }
}

fn check_prekey(key: &Prekey) -> Result<(), DecodeError> {
    check(
        key.public_key.len() <= limits::MAX_PREKEY_PUBLIC,
        "prekey size",
    )?;
    check(
        key.signature.len() <= limits::MAX_PREKEY_SIGNATURE,
        "prekey signature size",
    )
}

/// The limits shared by `Send` and `SealedSend`, over (recipients, payload length) per
/// envelope.
fn check_envelopes(
    envelopes: impl ExactSizeIterator<Item = (usize, usize)>,
    max_recipients_per_envelope: usize,
) -> Result<(), DecodeError> {
    check(envelopes.len() > 0, "envelopes per send")?;
    check(
        envelopes.len() <= limits::MAX_ENVELOPES_PER_SEND,
        "envelopes per send",
    )?;
    let mut recipients = 0usize;
    let mut payload = 0usize;
    for (count, len) in envelopes {
        check(count > 0, "recipients per envelope")?;
        check(
            count <= max_recipients_per_envelope,
            "recipients per envelope",
        )?;
        check(len <= limits::MAX_ENVELOPE_PAYLOAD, "envelope payload size")?;
        recipients += count;
        payload += len;
    }
    check(
        recipients <= limits::MAX_RECIPIENTS_PER_SEND,
        "recipients per send",
    )?;
    check(
        payload <= limits::MAX_SEND_PAYLOAD_TOTAL,
        "payload per send",
    )
}

impl RequestBody {
    /// Checks the field limits of [`crate::limits`], as the relay will on receipt; clients
    /// call it to refuse an oversized request locally instead of being disconnected.
    pub fn check_limits(&self) -> Result<(), DecodeError> {
        match self {
            RequestBody::Register(r) => {
                check(
                    r.identity_key.len() <= limits::MAX_IDENTITY_KEY,
                    "identity key size",
                )?;
                let invite_len = r.invite.as_ref().map_or(0, Vec::len);
                check(invite_len <= limits::MAX_INVITE_TOKEN, "invite token size")
            }
            RequestBody::UploadPrekeys(u) => {
                check(
                    u.one_time.len() <= limits::MAX_PREKEYS_PER_UPLOAD,
                    "prekeys per upload",
                )?;
                check(
                    u.kem_one_time.len() <= limits::MAX_PREKEYS_PER_UPLOAD,
                    "prekeys per upload",
                )?;
                u.signed_prekey
                    .iter()
                    .chain(u.kem_last_resort.iter())
                    .chain(u.one_time.iter())
                    .chain(u.kem_one_time.iter())
                    .try_for_each(check_prekey)
            }
            RequestBody::Send(s) => check_envelopes(
                s.envelopes
                    .iter()
                    .map(|e| (e.recipients.len(), e.payload.len())),
                limits::MAX_RECIPIENTS_PER_SEND,
            ),
            RequestBody::Ack(a) => {
                check(!a.ids.is_empty(), "acks per frame")?;
                check(a.ids.len() <= limits::MAX_ACKS_PER_FRAME, "acks per frame")
            }
            // No account has more devices than a prekey response may carry.
            RequestBody::SealedSend(s) => check_envelopes(
                s.envelopes
                    .iter()
                    .map(|e| (e.devices.len(), e.payload.len())),
                limits::MAX_BUNDLES,
            ),
            RequestBody::Retract(r) => {
                check(!r.secrets.is_empty(), "retractions per frame")?;
                check(
                    r.secrets.len() <= limits::MAX_RETRACTS_PER_FRAME,
                    "retractions per frame",
                )
            }
            RequestBody::Provision(p) => check(
                p.payload.len() <= limits::MAX_PROVISIONING_PAYLOAD,
                "provisioning payload size",
            ),
            RequestBody::Authenticate(_)
            | RequestBody::AddDevice(_)
            | RequestBody::RemoveDevice(_)
            | RequestBody::FetchPrekeys(_)
            | RequestBody::GetSenderCertificate
            | RequestBody::SetDeliveryAccess(_)
            | RequestBody::ListDevices(_)
            | RequestBody::OpenProvisioning
            | RequestBody::AllocateCall(_)
            | RequestBody::JoinCall(_)
            | RequestBody::EndCall(_) => Ok(()),
        }
    }
}

impl ServerFrame {
    /// Checks the field limits of [`crate::limits`], as the client does on receipt.
    pub fn check_limits(&self) -> Result<(), DecodeError> {
        match self {
            ServerFrame::Deliver(d) => check(
                d.payload.len() <= limits::MAX_ENVELOPE_PAYLOAD,
                "envelope payload size",
            ),
            ServerFrame::Response(Response {
                result: Ok(ResponseBody::PrekeyBundles(b)),
                ..
            }) => {
                check(
                    b.identity_key.len() <= limits::MAX_IDENTITY_KEY,
                    "identity key size",
                )?;
                check(
                    b.devices.len() <= limits::MAX_BUNDLES,
                    "bundles per response",
                )?;
                b.devices
                    .iter()
                    .flat_map(|d| d.signed_prekey.iter().chain(&d.one_time).chain(&d.kem))
                    .try_for_each(check_prekey)
            }
            ServerFrame::Response(Response {
                result: Ok(ResponseBody::SenderCertificate { certificate, .. }),
                ..
            }) => check(
                certificate.body.len() <= limits::MAX_SENDER_CERTIFICATE_BODY,
                "sender certificate size",
            ),
            ServerFrame::Response(Response {
                result: Ok(ResponseBody::Devices { devices }),
                ..
            }) => check(devices.len() <= limits::MAX_BUNDLES, "devices per response"),
            ServerFrame::ProvisioningMessage(m) => check(
                m.payload.len() <= limits::MAX_PROVISIONING_PAYLOAD,
                "provisioning payload size",
            ),
            _ => Ok(()),
        }
    }
}
