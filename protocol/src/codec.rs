//! Framing: `u32` big-endian body length, one kind byte, then the postcard body.

use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::DecodeError;
use crate::frames::{ClientFrame, Request, RequestBody, ServerFrame};
use crate::ids::RequestId;
use crate::limits::frame as limit;

/// Bytes before the body: the length prefix and the kind byte.
pub const HEADER_LEN: usize = 5;

/// A frame type with a kind byte per variant and a body limit per kind.
pub trait Frame: Sized {
    /// The largest body a frame of `kind` may have, or `None` if `kind` is not one of ours.
    fn body_limit(kind: u8) -> Option<usize>;
    /// The kind byte of this frame.
    fn kind(&self) -> u8;
    /// Appends the body (without header) to `out`.
    fn encode_body(&self, out: &mut Vec<u8>);
    /// Decodes a body of the given kind and checks its field limits.
    fn decode_body(kind: u8, body: &[u8]) -> Result<Self, DecodeError>;
}

/// A parsed frame header whose length is already within its kind's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The frame kind byte.
    pub kind: u8,
    /// The body length in bytes.
    pub body_len: usize,
}

impl FrameHeader {
    /// Parses and checks a header: unknown kinds and lengths over the kind's limit are
    /// refused here, before anyone allocates a body buffer.
    pub fn parse<F: Frame>(header: [u8; HEADER_LEN]) -> Result<Self, DecodeError> {
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let kind = header[4];
        let limit = F::body_limit(kind).ok_or(DecodeError::UnknownFrameType(kind))?;
        let body_len = usize::try_from(len).unwrap_or(usize::MAX);
        if body_len > limit {
            return Err(DecodeError::FrameTooLarge {
                kind,
                len: u64::from(len),
                limit,
            });
        }
        Ok(FrameHeader { kind, body_len })
    }
}

/// Encodes a whole frame, header included.
pub fn encode_frame<F: Frame>(frame: &F) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN];
    frame.encode_body(&mut out);
    let body_len = u32::try_from(out.len() - HEADER_LEN).unwrap_or(u32::MAX);
    out[..4].copy_from_slice(&body_len.to_be_bytes());
    out[4] = frame.kind();
    out
}

/// A sans-IO decoder for a byte stream of frames, fed in arbitrary chunks.
#[derive(Debug)]
pub struct FrameDecoder<F> {
    buffer: Vec<u8>,
    _frame: PhantomData<F>,
}

impl<F: Frame> Default for FrameDecoder<F> {
    fn default() -> Self {
        Self::new()
    }
}

impl<F: Frame> FrameDecoder<F> {
    /// An empty decoder.
    pub fn new() -> Self {
        FrameDecoder {
            buffer: Vec::new(),
            _frame: PhantomData,
        }
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete frame, `None` if more bytes are needed. A bad header is reported
    /// as soon as its five bytes are here, without waiting for the body.
    pub fn next_frame(&mut self) -> Result<Option<F>, DecodeError> {
        let Some(header) = self.buffer.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = FrameHeader::parse::<F>(*header)?;
        let end = HEADER_LEN + header.body_len;
        if self.buffer.len() < end {
            return Ok(None);
        }
        let frame = F::decode_body(header.kind, &self.buffer[HEADER_LEN..end]);
        self.buffer.drain(..end);
        frame.map(Some)
    }

    /// Whether bytes of an incomplete frame are buffered (at end of stream: truncation).
    pub fn has_partial_frame(&self) -> bool {
        !self.buffer.is_empty()
    }
}

fn append<T: Serialize>(value: &T, out: &mut Vec<u8>) {
    let taken = std::mem::take(out);
    // Serializing plain structs into a Vec cannot fail: postcard errors only for sequences
    // of unknown length or failing custom `Serialize` impls, and no frame has either.
    #[allow(clippy::expect_used)]
    let extended = postcard::to_extend(value, taken).expect("frames serialize infallibly");
    *out = extended;
}

fn parse<T: DeserializeOwned>(kind: u8, body: &[u8]) -> Result<T, DecodeError> {
    let (value, rest) =
        postcard::take_from_bytes::<T>(body).map_err(|_| DecodeError::Malformed { kind })?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(DecodeError::TrailingBytes {
            kind,
            extra: rest.len(),
        })
    }
}

mod kind {
    pub const HELLO: u8 = 0x01;
    pub const REGISTER: u8 = 0x02;
    pub const AUTHENTICATE: u8 = 0x03;
    pub const ADD_DEVICE: u8 = 0x04;
    pub const REMOVE_DEVICE: u8 = 0x05;
    pub const UPLOAD_PREKEYS: u8 = 0x06;
    pub const FETCH_PREKEYS: u8 = 0x07;
    pub const SEND: u8 = 0x08;
    pub const ACK: u8 = 0x09;
    pub const GET_SENDER_CERTIFICATE: u8 = 0x0a;
    pub const SET_DELIVERY_ACCESS: u8 = 0x0b;
    pub const SEALED_SEND: u8 = 0x0c;
    pub const LIST_DEVICES: u8 = 0x0d;
    pub const RETRACT: u8 = 0x0e;
    pub const OPEN_PROVISIONING: u8 = 0x0f;
    pub const PROVISION: u8 = 0x10;
    pub const ALLOCATE_CALL: u8 = 0x11;
    pub const JOIN_CALL: u8 = 0x12;
    pub const END_CALL: u8 = 0x13;

    pub const HELLO_OK: u8 = 0x81;
    pub const RESPONSE: u8 = 0x82;
    pub const DELIVER: u8 = 0x83;
    pub const DRAINED: u8 = 0x84;
    pub const LOW_PREKEYS: u8 = 0x85;
    pub const FATAL: u8 = 0x86;
    pub const PROVISIONING_MESSAGE: u8 = 0x87;
    pub const CALL_ENDED: u8 = 0x88;
    pub const RATE_LIMITED: u8 = 0x89;
}

impl Frame for ClientFrame {
    fn body_limit(kind: u8) -> Option<usize> {
        Some(match kind {
            kind::HELLO => limit::HELLO,
            kind::REGISTER => limit::REGISTER,
            kind::AUTHENTICATE => limit::AUTHENTICATE,
            kind::ADD_DEVICE | kind::REMOVE_DEVICE => limit::DEVICE,
            kind::UPLOAD_PREKEYS => limit::UPLOAD_PREKEYS,
            kind::FETCH_PREKEYS => limit::FETCH_PREKEYS,
            kind::SEND => limit::SEND,
            kind::ACK => limit::ACK,
            kind::GET_SENDER_CERTIFICATE | kind::OPEN_PROVISIONING => limit::EMPTY_REQUEST,
            kind::SET_DELIVERY_ACCESS => limit::SET_DELIVERY_ACCESS,
            kind::SEALED_SEND => limit::SEALED_SEND,
            kind::LIST_DEVICES => limit::LIST_DEVICES,
            kind::RETRACT => limit::RETRACT,
            kind::PROVISION => limit::PROVISION,
            kind::ALLOCATE_CALL | kind::JOIN_CALL | kind::END_CALL => limit::CALL,
            _ => return None,
        })
    }

    fn kind(&self) -> u8 {
        match self {
            ClientFrame::Hello(_) => kind::HELLO,
            ClientFrame::Request(Request { body, .. }) => match body {
                RequestBody::Register(_) => kind::REGISTER,
                RequestBody::Authenticate(_) => kind::AUTHENTICATE,
                RequestBody::AddDevice(_) => kind::ADD_DEVICE,
                RequestBody::RemoveDevice(_) => kind::REMOVE_DEVICE,
                RequestBody::UploadPrekeys(_) => kind::UPLOAD_PREKEYS,
                RequestBody::FetchPrekeys(_) => kind::FETCH_PREKEYS,
                RequestBody::Send(_) => kind::SEND,
                RequestBody::Ack(_) => kind::ACK,
                RequestBody::GetSenderCertificate => kind::GET_SENDER_CERTIFICATE,
                RequestBody::SetDeliveryAccess(_) => kind::SET_DELIVERY_ACCESS,
                RequestBody::SealedSend(_) => kind::SEALED_SEND,
                RequestBody::ListDevices(_) => kind::LIST_DEVICES,
                RequestBody::Retract(_) => kind::RETRACT,
                RequestBody::OpenProvisioning => kind::OPEN_PROVISIONING,
                RequestBody::Provision(_) => kind::PROVISION,
                RequestBody::AllocateCall(_) => kind::ALLOCATE_CALL,
                RequestBody::JoinCall(_) => kind::JOIN_CALL,
                RequestBody::EndCall(_) => kind::END_CALL,
            },
        }
    }

    fn encode_body(&self, out: &mut Vec<u8>) {
        let (id, body) = match self {
            ClientFrame::Hello(hello) => return append(hello, out),
            ClientFrame::Request(Request { id, body }) => (*id, body),
        };
        match body {
            RequestBody::Register(b) => append(&(id, b), out),
            RequestBody::Authenticate(b) => append(&(id, b), out),
            RequestBody::AddDevice(b) => append(&(id, b), out),
            RequestBody::RemoveDevice(b) => append(&(id, b), out),
            RequestBody::UploadPrekeys(b) => append(&(id, b), out),
            RequestBody::FetchPrekeys(b) => append(&(id, b), out),
            RequestBody::Send(b) => append(&(id, b), out),
            RequestBody::Ack(b) => append(&(id, b), out),
            RequestBody::GetSenderCertificate | RequestBody::OpenProvisioning => append(&id, out),
            RequestBody::SetDeliveryAccess(b) => append(&(id, b), out),
            RequestBody::SealedSend(b) => append(&(id, b), out),
            RequestBody::ListDevices(b) => append(&(id, b), out),
            RequestBody::Retract(b) => append(&(id, b), out),
            RequestBody::Provision(b) => append(&(id, b), out),
            RequestBody::AllocateCall(b) => append(&(id, b), out),
            RequestBody::JoinCall(b) => append(&(id, b), out),
            RequestBody::EndCall(b) => append(&(id, b), out),
        }
    }

    fn decode_body(kind: u8, body: &[u8]) -> Result<Self, DecodeError> {
        fn request<T: DeserializeOwned>(
            kind: u8,
            body: &[u8],
            wrap: fn(T) -> RequestBody,
        ) -> Result<ClientFrame, DecodeError> {
            let (id, inner) = parse::<(RequestId, T)>(kind, body)?;
            let body = wrap(inner);
            body.check_limits()?;
            Ok(ClientFrame::Request(Request { id, body }))
        }

        match kind {
            kind::HELLO => parse(kind, body).map(ClientFrame::Hello),
            kind::REGISTER => request(kind, body, RequestBody::Register),
            kind::AUTHENTICATE => request(kind, body, RequestBody::Authenticate),
            kind::ADD_DEVICE => request(kind, body, RequestBody::AddDevice),
            kind::REMOVE_DEVICE => request(kind, body, RequestBody::RemoveDevice),
            kind::UPLOAD_PREKEYS => request(kind, body, RequestBody::UploadPrekeys),
            kind::FETCH_PREKEYS => request(kind, body, RequestBody::FetchPrekeys),
            kind::SEND => request(kind, body, RequestBody::Send),
            kind::ACK => request(kind, body, RequestBody::Ack),
            kind::GET_SENDER_CERTIFICATE => {
                request(kind, body, |()| RequestBody::GetSenderCertificate)
            }
            kind::SET_DELIVERY_ACCESS => request(kind, body, RequestBody::SetDeliveryAccess),
            kind::SEALED_SEND => request(kind, body, RequestBody::SealedSend),
            kind::LIST_DEVICES => request(kind, body, RequestBody::ListDevices),
            kind::RETRACT => request(kind, body, RequestBody::Retract),
            kind::OPEN_PROVISIONING => request(kind, body, |()| RequestBody::OpenProvisioning),
            kind::PROVISION => request(kind, body, RequestBody::Provision),
            kind::ALLOCATE_CALL => request(kind, body, RequestBody::AllocateCall),
            kind::JOIN_CALL => request(kind, body, RequestBody::JoinCall),
            kind::END_CALL => request(kind, body, RequestBody::EndCall),
            other => Err(DecodeError::UnknownFrameType(other)),
        }
    }
}

impl Frame for ServerFrame {
    fn body_limit(kind: u8) -> Option<usize> {
        Some(match kind {
            kind::HELLO_OK => limit::HELLO_OK,
            kind::RESPONSE => limit::RESPONSE,
            kind::DELIVER => limit::DELIVER,
            kind::DRAINED
            | kind::LOW_PREKEYS
            | kind::FATAL
            | kind::CALL_ENDED
            | kind::RATE_LIMITED => limit::SMALL,
            kind::PROVISIONING_MESSAGE => limit::PROVISIONING_MESSAGE,
            _ => return None,
        })
    }

    fn kind(&self) -> u8 {
        match self {
            ServerFrame::HelloOk(_) => kind::HELLO_OK,
            ServerFrame::Response(_) => kind::RESPONSE,
            ServerFrame::Deliver(_) => kind::DELIVER,
            ServerFrame::Drained => kind::DRAINED,
            ServerFrame::LowPrekeys(_) => kind::LOW_PREKEYS,
            ServerFrame::Fatal(_) => kind::FATAL,
            ServerFrame::ProvisioningMessage(_) => kind::PROVISIONING_MESSAGE,
            ServerFrame::CallEnded(_) => kind::CALL_ENDED,
            ServerFrame::RateLimited(_) => kind::RATE_LIMITED,
        }
    }

    fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            ServerFrame::HelloOk(b) => append(b, out),
            ServerFrame::Response(b) => append(b, out),
            ServerFrame::Deliver(b) => append(b, out),
            ServerFrame::Drained => {}
            ServerFrame::LowPrekeys(b) => append(b, out),
            ServerFrame::Fatal(b) => append(b, out),
            ServerFrame::ProvisioningMessage(b) => append(b, out),
            ServerFrame::CallEnded(b) => append(b, out),
            ServerFrame::RateLimited(b) => append(b, out),
        }
    }

    fn decode_body(kind: u8, body: &[u8]) -> Result<Self, DecodeError> {
        let frame = match kind {
            kind::HELLO_OK => ServerFrame::HelloOk(parse(kind, body)?),
            kind::RESPONSE => ServerFrame::Response(parse(kind, body)?),
            kind::DELIVER => ServerFrame::Deliver(parse(kind, body)?),
            kind::DRAINED => {
                parse::<()>(kind, body)?;
                ServerFrame::Drained
            }
            kind::LOW_PREKEYS => ServerFrame::LowPrekeys(parse(kind, body)?),
            kind::FATAL => ServerFrame::Fatal(parse(kind, body)?),
            kind::PROVISIONING_MESSAGE => ServerFrame::ProvisioningMessage(parse(kind, body)?),
            kind::CALL_ENDED => ServerFrame::CallEnded(parse(kind, body)?),
            kind::RATE_LIMITED => ServerFrame::RateLimited(parse(kind, body)?),
            other => return Err(DecodeError::UnknownFrameType(other)),
        };
        frame.check_limits()?;
        Ok(frame)
    }
}
