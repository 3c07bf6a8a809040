//! Hard limits. Frame-size limits are checked on the length prefix before any allocation;
//! field limits are checked right after a body decodes, so no frame that breaks one ever
//! reaches the relay's or the client's logic.

/// Largest envelope payload (ciphertext) in bytes. Media travels as blobs, not envelopes.
pub const MAX_ENVELOPE_PAYLOAD: usize = 64 * 1024;
/// Largest number of recipient devices one `Send` may address, summed over its envelopes.
pub const MAX_RECIPIENTS_PER_SEND: usize = 1024;
/// Largest number of distinct envelopes in one `Send`.
pub const MAX_ENVELOPES_PER_SEND: usize = 256;
/// Largest number of envelope ids in one `Ack`.
pub const MAX_ACKS_PER_FRAME: usize = 4096;
/// Largest public identity key blob (the relay treats it as opaque bytes).
pub const MAX_IDENTITY_KEY: usize = 128;
/// Largest prekey public key (ML-KEM-1024 keys are 1568 bytes).
pub const MAX_PREKEY_PUBLIC: usize = 1600;
/// Largest prekey signature blob.
pub const MAX_PREKEY_SIGNATURE: usize = 128;
/// Largest number of one-time prekeys of each kind in one upload.
pub const MAX_PREKEYS_PER_UPLOAD: usize = 200;
/// Largest invite token.
pub const MAX_INVITE_TOKEN: usize = 64;
/// Largest number of device bundles in one prekey response.
pub const MAX_BUNDLES: usize = 64;

/// Largest number of retraction secrets in one `Retract`.
pub const MAX_RETRACTS_PER_FRAME: usize = 256;
/// Largest provisioning message payload.
pub const MAX_PROVISIONING_PAYLOAD: usize = 64 * 1024;
/// Largest encoded sender certificate body (ids, an identity key, an expiry).
pub const MAX_SENDER_CERTIFICATE_BODY: usize = 256;

/// Largest media datagram, header included: `allocation (u32 BE) || encrypted frame`.
/// Sized to fit the QUIC minimum path MTU's datagram room with IPv6 headers to spare
/// once the path MTU has been discovered; larger datagrams are dropped by the relay.
pub const MAX_MEDIA_FRAME: usize = 1200;

/// Body limits per frame kind, in bytes. Each is the largest body that the field limits
/// above allow, rounded up; a peer that announces more is cut off before we read it.
pub mod frame {
    /// `Hello`.
    pub const HELLO: usize = 64;
    /// `Register`.
    pub const REGISTER: usize = 512;
    /// `Authenticate`.
    pub const AUTHENTICATE: usize = 128;
    /// `AddDevice` and `RemoveDevice`.
    pub const DEVICE: usize = 64;
    /// `UploadPrekeys`: two lists of 200 keys of up to 1,600 bytes plus signatures.
    pub const UPLOAD_PREKEYS: usize = 768 * 1024;
    /// `FetchPrekeys`.
    pub const FETCH_PREKEYS: usize = 64;
    /// `Send`: at most 1 MiB of payload plus addressing.
    pub const SEND: usize = 1024 * 1024 + 64 * 1024;
    /// `Ack`.
    pub const ACK: usize = 64 * 1024;
    /// Requests without a body: `GetSenderCertificate`, `OpenProvisioning`.
    pub const EMPTY_REQUEST: usize = 16;
    /// `SetDeliveryAccess`.
    pub const SET_DELIVERY_ACCESS: usize = 64;
    /// `SealedSend`: at most 1 MiB of payload plus addressing, tokens and tags.
    pub const SEALED_SEND: usize = 1024 * 1024 + 64 * 1024;
    /// `ListDevices`.
    pub const LIST_DEVICES: usize = 64;
    /// `Retract`: 256 secrets of 32 bytes.
    pub const RETRACT: usize = 9 * 1024;
    /// `Provision`.
    pub const PROVISION: usize = super::MAX_PROVISIONING_PAYLOAD + 64;
    /// `AllocateCall`, `JoinCall`, `EndCall`.
    pub const CALL: usize = 64;
    /// `HelloOk`.
    pub const HELLO_OK: usize = 64;
    /// `Response`: a prekey response is the largest: 64 bundles of three keys of up to
    /// 1,600 bytes plus signatures, about 330 KiB.
    pub const RESPONSE: usize = 384 * 1024;
    /// `Deliver`.
    pub const DELIVER: usize = super::MAX_ENVELOPE_PAYLOAD + 64;
    /// Small pushes: `Drained`, `LowPrekeys`, `Fatal`, `CallEnded`.
    pub const SMALL: usize = 64;
    /// `ProvisioningMessage`.
    pub const PROVISIONING_MESSAGE: usize = super::MAX_PROVISIONING_PAYLOAD + 16;
}

/// Largest total payload of one `Send` frame.
pub const MAX_SEND_PAYLOAD_TOTAL: usize = 1024 * 1024;
