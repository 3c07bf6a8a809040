//! Round trips for every frame, and the decoder's answers to hostile bytes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_protocol::limits::{self, frame as frame_limit};
use hush_protocol::media_udp::{HopKey, MediaLeg};
use hush_protocol::sealed::{SealedEnvelope, SenderCertificate};
use hush_protocol::{
    encode_frame, media, AccountId, Ack, AddDevice, AllocateCall, Authenticate, CallEndCause,
    CallEnded, CallOutcome, CallToken, ClientFrame, DecodeError, Deliver, DeviceAddress,
    DeviceBundle, DeviceId, EndCall, EnvelopeId, ErrorCode, Fatal, FetchPrekeys, Frame,
    FrameDecoder, FrameHeader, Hello, HelloOk, JoinCall, ListDevices, LowPrekeys, OutgoingEnvelope,
    Prekey, PrekeyBundles, Provision, ProvisioningMessage, RateLimited, Register, RemoveDevice,
    Request, RequestBody, RequestId, Response, ResponseBody, Retract, SealedSend, Send,
    ServerFrame, SetDeliveryAccess, Signature, UploadPrekeys, VersionRange, HEADER_LEN,
};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..=max)
}

fn account() -> impl Strategy<Value = AccountId> {
    any::<[u8; 16]>().prop_map(AccountId)
}

fn address() -> impl Strategy<Value = DeviceAddress> {
    (account(), any::<u32>()).prop_map(|(account, d)| DeviceAddress {
        account,
        device: DeviceId(d),
    })
}

fn signature() -> impl Strategy<Value = Signature> {
    (any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(a, b)| {
        let mut s = [0u8; 64];
        s[..32].copy_from_slice(&a);
        s[32..].copy_from_slice(&b);
        Signature(s)
    })
}

fn prekey() -> impl Strategy<Value = Prekey> {
    (
        any::<u32>(),
        bytes(1200),
        bytes(limits::MAX_PREKEY_SIGNATURE),
    )
        .prop_map(|(id, public_key, signature)| Prekey {
            id,
            public_key,
            signature,
        })
}

fn versions() -> impl Strategy<Value = VersionRange> {
    (any::<u16>(), any::<u16>()).prop_map(|(min, max)| VersionRange { min, max })
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    any::<u16>().prop_map(ErrorCode::from_u16)
}

fn sealed_envelope() -> impl Strategy<Value = SealedEnvelope> {
    (
        account(),
        vec(any::<u32>(), 1..8),
        option::of(any::<[u8; 16]>()),
        option::of(any::<[u8; 32]>()),
        bytes(2048),
    )
        .prop_map(
            |(account, devices, access, retract_tag, payload)| SealedEnvelope {
                account,
                devices: devices.into_iter().map(DeviceId).collect(),
                access,
                retract_tag,
                payload,
            },
        )
}

fn request_body() -> impl Strategy<Value = RequestBody> {
    prop_oneof![
        (
            bytes(limits::MAX_IDENTITY_KEY),
            any::<[u8; 32]>(),
            option::of(bytes(64)),
            signature()
        )
            .prop_map(|(identity_key, device_key, invite, signature)| {
                RequestBody::Register(Register {
                    identity_key,
                    device_key,
                    invite,
                    signature,
                })
            }),
        (address(), signature()).prop_map(|(address, signature)| RequestBody::Authenticate(
            Authenticate { address, signature }
        )),
        any::<[u8; 32]>().prop_map(|device_key| RequestBody::AddDevice(AddDevice { device_key })),
        any::<u32>().prop_map(|d| RequestBody::RemoveDevice(RemoveDevice {
            device: DeviceId(d)
        })),
        (
            option::of(prekey()),
            vec(prekey(), 0..4),
            vec(prekey(), 0..4),
            option::of(prekey())
        )
            .prop_map(|(signed_prekey, one_time, kem_one_time, kem_last_resort)| {
                RequestBody::UploadPrekeys(UploadPrekeys {
                    signed_prekey,
                    one_time,
                    kem_one_time,
                    kem_last_resort,
                })
            }),
        (
            account(),
            option::of(any::<u32>()),
            option::of(any::<[u8; 16]>())
        )
            .prop_map(|(account, device, access)| {
                RequestBody::FetchPrekeys(FetchPrekeys {
                    account,
                    device: device.map(DeviceId),
                    access,
                })
            }),
        vec(
            (
                vec(address(), 1..8),
                bytes(2048),
                option::of(any::<[u8; 32]>())
            ),
            1..8
        )
        .prop_map(|envelopes| {
            RequestBody::Send(Send {
                envelopes: envelopes
                    .into_iter()
                    .map(|(recipients, payload, retract_tag)| OutgoingEnvelope {
                        recipients,
                        payload,
                        retract_tag,
                    })
                    .collect(),
            })
        }),
        Just(RequestBody::GetSenderCertificate),
        (option::of(any::<[u8; 16]>()), any::<bool>()).prop_map(
            |(token, allow_unknown_senders)| RequestBody::SetDeliveryAccess(SetDeliveryAccess {
                token,
                allow_unknown_senders,
            })
        ),
        vec(sealed_envelope(), 1..6)
            .prop_map(|envelopes| RequestBody::SealedSend(SealedSend { envelopes })),
        (account(), option::of(any::<[u8; 16]>())).prop_map(|(account, access)| {
            RequestBody::ListDevices(ListDevices { account, access })
        }),
        vec(any::<[u8; 32]>(), 1..16).prop_map(|secrets| RequestBody::Retract(Retract { secrets })),
        Just(RequestBody::OpenProvisioning),
        (any::<[u8; 16]>(), bytes(4096))
            .prop_map(|(address, payload)| RequestBody::Provision(Provision { address, payload })),
        vec(any::<u64>(), 1..64).prop_map(|ids| RequestBody::Ack(Ack {
            ids: ids.into_iter().map(EnvelopeId).collect()
        })),
        account().prop_map(|callee| RequestBody::AllocateCall(AllocateCall { callee })),
        (any::<u32>(), any::<[u8; 16]>()).prop_map(|(allocation, token)| {
            RequestBody::JoinCall(JoinCall {
                allocation,
                token: CallToken(token),
            })
        }),
        (any::<u32>(), call_outcome()).prop_map(|(allocation, outcome)| RequestBody::EndCall(
            EndCall {
                allocation,
                outcome
            }
        )),
    ]
}

fn media_leg() -> impl Strategy<Value = Option<MediaLeg>> {
    option::of(
        (
            any::<u16>(),
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
        )
            .prop_map(|(port, leg, up, down)| MediaLeg {
                port,
                leg,
                up: HopKey::from_bytes(up),
                down: HopKey::from_bytes(down),
            }),
    )
}

fn call_outcome() -> impl Strategy<Value = CallOutcome> {
    prop_oneof![
        Just(CallOutcome::Answered),
        Just(CallOutcome::Missed),
        Just(CallOutcome::Rejected),
        Just(CallOutcome::Busy),
        Just(CallOutcome::Failed),
    ]
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        versions().prop_map(|versions| ClientFrame::Hello(Hello { versions })),
        (any::<u32>(), request_body()).prop_map(|(id, body)| ClientFrame::Request(Request {
            id: RequestId(id),
            body
        })),
    ]
}

fn bundle() -> impl Strategy<Value = DeviceBundle> {
    (
        any::<u32>(),
        any::<[u8; 32]>(),
        option::of(prekey()),
        option::of(prekey()),
        option::of(prekey()),
        any::<bool>(),
    )
        .prop_map(
            |(d, device_key, signed_prekey, one_time, kem, kem_is_last_resort)| DeviceBundle {
                device: DeviceId(d),
                device_key,
                signed_prekey,
                one_time,
                kem,
                kem_is_last_resort,
            },
        )
}

fn response_body() -> impl Strategy<Value = ResponseBody> {
    prop_oneof![
        address().prop_map(|address| ResponseBody::Registered { address }),
        Just(ResponseBody::Authenticated),
        any::<u32>().prop_map(|d| ResponseBody::DeviceAdded {
            device: DeviceId(d)
        }),
        Just(ResponseBody::DeviceRemoved),
        (any::<u32>(), any::<u32>()).prop_map(|(one_time, kem_one_time)| {
            ResponseBody::PrekeysStored {
                one_time,
                kem_one_time,
            }
        }),
        (bytes(limits::MAX_IDENTITY_KEY), vec(bundle(), 0..5)).prop_map(
            |(identity_key, devices)| {
                ResponseBody::PrekeyBundles(PrekeyBundles {
                    identity_key,
                    devices,
                })
            }
        ),
        Just(ResponseBody::Sent),
        Just(ResponseBody::Acked),
        (
            bytes(limits::MAX_SENDER_CERTIFICATE_BODY),
            signature(),
            any::<[u8; 32]>()
        )
            .prop_map(
                |(body, signature, relay_key)| ResponseBody::SenderCertificate {
                    certificate: SenderCertificate { body, signature },
                    relay_key,
                }
            ),
        Just(ResponseBody::DeliveryAccessSet),
        vec(any::<u32>(), 0..limits::MAX_BUNDLES).prop_map(|devices| ResponseBody::Devices {
            devices: devices.into_iter().map(DeviceId).collect()
        }),
        any::<u32>().prop_map(|count| ResponseBody::Retracted { count }),
        any::<[u8; 16]>().prop_map(|address| ResponseBody::ProvisioningOpened { address }),
        Just(ResponseBody::Provisioned),
        (
            any::<u32>(),
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            media_leg()
        )
            .prop_map(|(allocation, token, call_id, media)| {
                ResponseBody::CallAllocated {
                    allocation,
                    token: CallToken(token),
                    call_id,
                    media,
                }
            }),
        media_leg().prop_map(|media| ResponseBody::CallJoined { media }),
        Just(ResponseBody::CallEnded),
    ]
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    prop_oneof![
        (any::<u16>(), any::<[u8; 32]>())
            .prop_map(|(version, challenge)| ServerFrame::HelloOk(HelloOk { version, challenge })),
        (
            any::<u32>(),
            prop_oneof![response_body().prop_map(Ok), error_code().prop_map(Err)]
        )
            .prop_map(|(id, result)| ServerFrame::Response(Response {
                id: RequestId(id),
                result
            })),
        (any::<u64>(), any::<u64>(), bytes(4096)).prop_map(|(id, received_at, payload)| {
            ServerFrame::Deliver(Deliver {
                id: EnvelopeId(id),
                received_at,
                payload,
            })
        }),
        Just(ServerFrame::Drained),
        (any::<u32>(), any::<u32>()).prop_map(|(one_time, kem_one_time)| ServerFrame::LowPrekeys(
            LowPrekeys {
                one_time,
                kem_one_time
            }
        )),
        (error_code(), versions()).prop_map(|(code, supported_versions)| ServerFrame::Fatal(
            Fatal {
                code,
                supported_versions
            }
        )),
        bytes(4096)
            .prop_map(|payload| ServerFrame::ProvisioningMessage(ProvisioningMessage { payload })),
        (
            any::<u32>(),
            prop_oneof![
                Just(CallEndCause::EndedByPeer),
                Just(CallEndCause::RingTimeout),
                Just(CallEndCause::MediaIdle),
                Just(CallEndCause::PeerGone),
            ]
        )
            .prop_map(|(allocation, cause)| ServerFrame::CallEnded(CallEnded {
                allocation,
                cause
            })),
        (any::<u32>(), any::<u32>()).prop_map(|(id, retry_after_ms)| ServerFrame::RateLimited(
            RateLimited {
                id: RequestId(id),
                retry_after_ms
            }
        )),
    ]
}

/// Feeds `bytes` to a decoder in chunks of `chunk` bytes and collects the frames.
fn decode_chunked<F: Frame>(bytes: &[u8], chunk: usize) -> Result<Vec<F>, DecodeError> {
    let mut decoder = FrameDecoder::<F>::new();
    let mut frames = Vec::new();
    for piece in bytes.chunks(chunk.max(1)) {
        decoder.extend(piece);
        while let Some(frame) = decoder.next_frame()? {
            frames.push(frame);
        }
    }
    if decoder.has_partial_frame() {
        return Err(DecodeError::Truncated);
    }
    Ok(frames)
}

proptest! {
    #[test]
    fn client_frames_round_trip(frames in vec(client_frame(), 1..6), chunk in 1usize..512) {
        let wire: Vec<u8> = frames.iter().flat_map(encode_frame).collect();
        prop_assert_eq!(decode_chunked::<ClientFrame>(&wire, chunk)?, frames);
    }

    #[test]
    fn server_frames_round_trip(frames in vec(server_frame(), 1..6), chunk in 1usize..512) {
        let wire: Vec<u8> = frames.iter().flat_map(encode_frame).collect();
        prop_assert_eq!(decode_chunked::<ServerFrame>(&wire, chunk)?, frames);
    }

    #[test]
    fn media_datagrams_round_trip(allocation in any::<u32>(), frame in bytes(media::MAX_MEDIA_PAYLOAD)) {
        let datagram = media::encode_media(allocation, &frame).unwrap();
        prop_assert!(datagram.len() <= limits::MAX_MEDIA_FRAME);
        prop_assert_eq!(media::parse_media(&datagram), Ok((allocation, frame.as_slice())));
    }

    #[test]
    fn media_garbage_never_panics(garbage in bytes(2 * limits::MAX_MEDIA_FRAME)) {
        let _ = media::parse_media(&garbage);
    }

    #[test]
    fn garbage_never_panics(garbage in bytes(4096)) {
        let _ = decode_chunked::<ClientFrame>(&garbage, 7);
        let _ = decode_chunked::<ServerFrame>(&garbage, 7);
    }

    #[test]
    fn truncated_frames_are_incomplete_not_wrong(frame in client_frame(), cut in 1usize..64) {
        let wire = encode_frame(&frame);
        let cut = cut.min(wire.len() - 1);
        let result = decode_chunked::<ClientFrame>(&wire[..wire.len() - cut], 16);
        prop_assert!(matches!(result, Err(DecodeError::Truncated)), "got {:?}", result);
    }
}

#[test]
fn oversized_length_prefix_is_refused_from_the_header_alone() {
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(&u32::MAX.to_be_bytes());
    header[4] = encode_frame(&ClientFrame::Hello(Hello::current()))[4];
    let err = FrameHeader::parse::<ClientFrame>(header).unwrap_err();
    assert_eq!(err.code(), ErrorCode::FrameTooLarge);

    // The decoder reports it as soon as the five header bytes arrive: nothing is allocated
    // for a 4 GiB body, and no more bytes are awaited.
    let mut decoder = FrameDecoder::<ClientFrame>::new();
    decoder.extend(&header);
    assert!(matches!(
        decoder.next_frame(),
        Err(DecodeError::FrameTooLarge { .. })
    ));
}

#[test]
fn each_kind_has_its_own_limit() {
    let ack = encode_frame(&ClientFrame::Request(Request {
        id: RequestId(1),
        body: RequestBody::Ack(Ack {
            ids: vec![EnvelopeId(1)],
        }),
    }));
    let mut header: [u8; HEADER_LEN] = ack[..HEADER_LEN].try_into().unwrap();
    // Legal for a Send, too big for an Ack.
    header[..4].copy_from_slice(&((frame_limit::ACK + 1) as u32).to_be_bytes());
    assert!(matches!(
        FrameHeader::parse::<ClientFrame>(header),
        Err(DecodeError::FrameTooLarge { limit, .. }) if limit == frame_limit::ACK
    ));
}

#[test]
fn unknown_frame_kind_is_refused() {
    for kind in [0x00, 0x14, 0x7f, 0x81, 0xff] {
        let header = [0, 0, 0, 0, kind];
        assert_eq!(
            FrameHeader::parse::<ClientFrame>(header),
            Err(DecodeError::UnknownFrameType(kind))
        );
    }
    assert_eq!(
        FrameHeader::parse::<ServerFrame>([0, 0, 0, 0, 0x01]),
        Err(DecodeError::UnknownFrameType(1))
    );
}

#[test]
fn garbage_body_and_trailing_bytes_are_malformed() {
    let mut wire = encode_frame(&ClientFrame::Hello(Hello::current()));
    wire.push(0xAA);
    let len = (wire.len() - HEADER_LEN) as u32;
    wire[..4].copy_from_slice(&len.to_be_bytes());
    assert!(matches!(
        decode_chunked::<ClientFrame>(&wire, 64),
        Err(DecodeError::TrailingBytes { .. })
    ));

    let garbage = [0, 0, 0, 3, 0x08, 0xFF, 0xFF, 0xFF];
    let err = decode_chunked::<ClientFrame>(&garbage, 64).unwrap_err();
    assert_eq!(err.code(), ErrorCode::MalformedFrame);
}

#[test]
fn field_limits_are_checked_after_decode() {
    let too_big = ClientFrame::Request(Request {
        id: RequestId(1),
        body: RequestBody::Send(Send {
            envelopes: vec![OutgoingEnvelope {
                recipients: vec![DeviceAddress {
                    account: AccountId([1; 16]),
                    device: DeviceId(1),
                }],
                payload: vec![0; limits::MAX_ENVELOPE_PAYLOAD + 1],
                retract_tag: None,
            }],
        }),
    });
    let err = decode_chunked::<ClientFrame>(&encode_frame(&too_big), 4096).unwrap_err();
    assert_eq!(
        err,
        DecodeError::LimitExceeded {
            what: "envelope payload size"
        }
    );

    let empty = ClientFrame::Request(Request {
        id: RequestId(2),
        body: RequestBody::Send(Send { envelopes: vec![] }),
    });
    assert!(decode_chunked::<ClientFrame>(&encode_frame(&empty), 64).is_err());

    let retract = |n: usize| {
        encode_frame(&ClientFrame::Request(Request {
            id: RequestId(3),
            body: RequestBody::Retract(Retract {
                secrets: vec![[1; 32]; n],
            }),
        }))
    };
    assert!(decode_chunked::<ClientFrame>(&retract(limits::MAX_RETRACTS_PER_FRAME), 64).is_ok());
    assert_eq!(
        decode_chunked::<ClientFrame>(&retract(limits::MAX_RETRACTS_PER_FRAME + 1), 64),
        Err(DecodeError::LimitExceeded {
            what: "retractions per frame"
        })
    );

    let sealed = |devices: usize, payload: usize| {
        encode_frame(&ClientFrame::Request(Request {
            id: RequestId(4),
            body: RequestBody::SealedSend(SealedSend {
                envelopes: vec![SealedEnvelope {
                    account: AccountId([1; 16]),
                    devices: (0..devices as u32).map(DeviceId).collect(),
                    access: None,
                    retract_tag: None,
                    payload: vec![0; payload],
                }],
            }),
        }))
    };
    assert!(decode_chunked::<ClientFrame>(&sealed(1, limits::MAX_ENVELOPE_PAYLOAD), 4096).is_ok());
    assert!(decode_chunked::<ClientFrame>(&sealed(0, 1), 64).is_err());
    assert!(decode_chunked::<ClientFrame>(&sealed(limits::MAX_BUNDLES + 1, 1), 64).is_err());
    assert!(
        decode_chunked::<ClientFrame>(&sealed(1, limits::MAX_ENVELOPE_PAYLOAD + 1), 4096).is_err()
    );

    let provision = encode_frame(&ClientFrame::Request(Request {
        id: RequestId(5),
        body: RequestBody::Provision(Provision {
            address: [0; 16],
            payload: vec![0; limits::MAX_PROVISIONING_PAYLOAD + 1],
        }),
    }));
    assert!(decode_chunked::<ClientFrame>(&provision, 4096).is_err());
}

/// The largest requests the field limits allow fit their kind's frame limit.
#[test]
fn largest_new_requests_fit_their_frame_limits() {
    let largest_sealed = ClientFrame::Request(Request {
        id: RequestId(u32::MAX),
        body: RequestBody::SealedSend(SealedSend {
            envelopes: (0..limits::MAX_ENVELOPES_PER_SEND)
                .map(|i| SealedEnvelope {
                    account: AccountId([0xff; 16]),
                    devices: (0..4).map(|d| DeviceId(u32::MAX - d)).collect(),
                    access: Some([0xff; 16]),
                    retract_tag: Some([0xff; 32]),
                    payload: vec![
                        0;
                        if i < 16 {
                            limits::MAX_ENVELOPE_PAYLOAD
                        } else {
                            0
                        }
                    ],
                })
                .collect(),
        }),
    });
    let largest_retract = ClientFrame::Request(Request {
        id: RequestId(u32::MAX),
        body: RequestBody::Retract(Retract {
            secrets: vec![[0xff; 32]; limits::MAX_RETRACTS_PER_FRAME],
        }),
    });
    let largest_provision = ClientFrame::Request(Request {
        id: RequestId(u32::MAX),
        body: RequestBody::Provision(Provision {
            address: [0xff; 16],
            payload: vec![0; limits::MAX_PROVISIONING_PAYLOAD],
        }),
    });
    for frame in [largest_sealed, largest_retract, largest_provision] {
        let wire = encode_frame(&frame);
        assert_eq!(
            decode_chunked::<ClientFrame>(&wire, 65_536).unwrap(),
            vec![frame]
        );
    }
    let message = ServerFrame::ProvisioningMessage(ProvisioningMessage {
        payload: vec![0; limits::MAX_PROVISIONING_PAYLOAD],
    });
    let wire = encode_frame(&message);
    assert_eq!(
        decode_chunked::<ServerFrame>(&wire, 65_536).unwrap(),
        vec![message]
    );
}

#[test]
fn version_negotiation_picks_the_newest_common_version() {
    let ours = VersionRange { min: 1, max: 3 };
    assert_eq!(ours.negotiate(VersionRange { min: 2, max: 5 }), Some(3));
    assert_eq!(ours.negotiate(VersionRange { min: 1, max: 1 }), Some(1));
    assert_eq!(ours.negotiate(VersionRange { min: 4, max: 9 }), None);
    assert_eq!(ours.negotiate(VersionRange { min: 3, max: 2 }), None);
}

#[test]
fn debug_output_redacts_identifiers() {
    let address = DeviceAddress {
        account: AccountId([0xAB; 16]),
        device: DeviceId(77),
    };
    let printed = format!("{address:?}");
    assert!(
        !printed.contains("ab") && !printed.contains("171") && !printed.contains("77"),
        "{printed}"
    );
}

/// Checked-in vectors: the wire bytes of a few frames. A change here is a protocol change.
#[test]
fn wire_vectors_are_stable() {
    let hello = encode_frame(&ClientFrame::Hello(Hello {
        versions: VersionRange { min: 1, max: 1 },
    }));
    assert_eq!(hex(&hello), "000000020101 01".replace(' ', ""));
    let deliver = encode_frame(&ServerFrame::Deliver(Deliver {
        id: EnvelopeId(300),
        received_at: 1_800_000_000,
        payload: b"ct".to_vec(),
    }));
    assert_eq!(
        hex(&deliver),
        "0000000a83 ac02 80a4a7da06 02 6374".replace(' ', "")
    );
    let ack = encode_frame(&ClientFrame::Request(Request {
        id: RequestId(7),
        body: RequestBody::Ack(Ack {
            ids: vec![EnvelopeId(1), EnvelopeId(128)],
        }),
    }));
    assert_eq!(hex(&ack), "0000000509 07 02 01 8001".replace(' ', ""));
    let send = encode_frame(&ClientFrame::Request(Request {
        id: RequestId(1),
        body: RequestBody::Send(Send {
            envelopes: vec![OutgoingEnvelope {
                recipients: vec![DeviceAddress {
                    account: AccountId([0xaa; 16]),
                    device: DeviceId(1),
                }],
                payload: b"ct".to_vec(),
                retract_tag: Some([0x11; 32]),
            }],
        }),
    }));
    assert_eq!(
        hex(&send),
        format!(
            "0000003808 01 01 01 {} 01 02 6374 01 {}",
            "aa".repeat(16),
            "11".repeat(32)
        )
        .replace(' ', "")
    );
    let sealed = encode_frame(&ClientFrame::Request(Request {
        id: RequestId(2),
        body: RequestBody::SealedSend(SealedSend {
            envelopes: vec![SealedEnvelope {
                account: AccountId([0xbb; 16]),
                devices: vec![DeviceId(1), DeviceId(2)],
                access: Some([0x22; 16]),
                retract_tag: None,
                payload: b"ct".to_vec(),
            }],
        }),
    }));
    assert_eq!(
        hex(&sealed),
        format!(
            "0000002a0c 02 01 {} 02 01 02 01 {} 00 02 6374",
            "bb".repeat(16),
            "22".repeat(16)
        )
        .replace(' ', "")
    );
    let opened = encode_frame(&ServerFrame::Response(Response {
        id: RequestId(3),
        result: Ok(ResponseBody::Retracted { count: 2 }),
    }));
    assert_eq!(hex(&opened), "0000000482 03 00 0b 02".replace(' ', ""));
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

#[test]
fn call_frames_fit_their_limits_and_keep_tokens_out_of_debug() {
    let largest = [
        RequestBody::AllocateCall(AllocateCall {
            callee: AccountId([0xff; 16]),
        }),
        RequestBody::JoinCall(JoinCall {
            allocation: u32::MAX,
            token: CallToken([0xee; 16]),
        }),
        RequestBody::EndCall(EndCall {
            allocation: u32::MAX,
            outcome: CallOutcome::Failed,
        }),
    ];
    for body in largest {
        let frame = ClientFrame::Request(Request {
            id: RequestId(u32::MAX),
            body,
        });
        let wire = encode_frame(&frame);
        assert!(wire.len() - HEADER_LEN <= limits::frame::CALL);
        assert_eq!(
            decode_chunked::<ClientFrame>(&wire, 7).unwrap(),
            vec![frame]
        );
    }
    let allocated = ServerFrame::Response(Response {
        id: RequestId(u32::MAX),
        result: Ok(ResponseBody::CallAllocated {
            allocation: u32::MAX,
            token: CallToken([0xee; 16]),
            call_id: [0xdd; 16],
            media: Some(MediaLeg {
                port: u16::MAX,
                leg: u64::MAX,
                up: HopKey::from_bytes([0xcc; 32]),
                down: HopKey::from_bytes([0xbb; 32]),
            }),
        }),
    });
    let wire = encode_frame(&allocated);
    assert_eq!(
        decode_chunked::<ServerFrame>(&wire, 9).unwrap(),
        vec![allocated.clone()]
    );
    let ended = ServerFrame::CallEnded(CallEnded {
        allocation: u32::MAX,
        cause: CallEndCause::PeerGone,
    });
    let wire = encode_frame(&ended);
    assert!(wire.len() - HEADER_LEN <= limits::frame::SMALL);

    let printed = format!(
        "{allocated:?} {:?}",
        JoinCall {
            allocation: 1,
            token: CallToken([0xee; 16])
        }
    );
    assert!(
        !printed.contains("238") && !printed.contains("ee"),
        "{printed}"
    );

    // A call request announcing more than its kind allows is cut off from the header.
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(&(limits::frame::CALL as u32 + 1).to_be_bytes());
    header[4] = 0x12;
    assert!(matches!(
        FrameHeader::parse::<ClientFrame>(header),
        Err(DecodeError::FrameTooLarge { .. })
    ));
}

/// Found while writing the fuzz invariant "what passes the field limits fits its kind's
/// frame limit" (the body limit was 256 KiB): a prekey response with the most bundles, each with the largest keys the
/// field limits allow, must still be a frame the client accepts.
#[test]
fn largest_prekey_response_fits_its_frame_limit() {
    let largest_key = |id| Prekey {
        id,
        public_key: vec![0xff; limits::MAX_PREKEY_PUBLIC],
        signature: vec![0xff; limits::MAX_PREKEY_SIGNATURE],
    };
    let response = ServerFrame::Response(Response {
        id: RequestId(u32::MAX),
        result: Ok(ResponseBody::PrekeyBundles(PrekeyBundles {
            identity_key: vec![0xff; limits::MAX_IDENTITY_KEY],
            devices: (0..limits::MAX_BUNDLES)
                .map(|d| DeviceBundle {
                    device: DeviceId(u32::MAX - d as u32),
                    device_key: [0xff; 32],
                    signed_prekey: Some(largest_key(u32::MAX)),
                    one_time: Some(largest_key(u32::MAX - 1)),
                    kem: Some(largest_key(u32::MAX - 2)),
                    kem_is_last_resort: true,
                })
                .collect(),
        })),
    });
    let wire = encode_frame(&response);
    assert_eq!(
        decode_chunked::<ServerFrame>(&wire, 65_536).unwrap(),
        vec![response]
    );
}
